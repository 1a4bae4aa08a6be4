//! Sentence embeddings with all-MiniLM-L6-v2, compiled by Kiln: tokenize, run the BERT encoder
//! natively, mean-pool, normalize, compare.
//!
//! ```sh
//! scripts/fetch_minilm.sh                                   # once: weights + tokenizer
//! cargo run --release --example sentence_embeddings         # a built-in list of sentences
//! cargo run --release --example sentence_embeddings -- "A cat sleeps." "A kitten naps."
//! printf 'one\ntwo\n' | cargo run --release --example sentence_embeddings -- --json
//! ```
//!
//! 1. The `tokenizers` crate reads the cached `tokenizer.json` and turns each sentence into
//!    WordPiece ids, truncated and padded to the model's sequence length (`--seq`, 128).
//! 2. `models/bert_encoder.ron` is lowered with `batch` = the number of sentences, optimized,
//!    scheduled and compiled for this machine with the checkpoint's own weights, bound by their
//!    names (`kiln_ir::bind_params_with_warnings`). The artifact is cached next to the weights
//!    and reused while the spec, the weights' digest, batch, sequence length and this program
//!    stay the same.
//! 3. `kiln_runtime::Model` runs it; the output is `last_hidden_state` [batch, seq, 384].
//! 4. The pooling is all-MiniLM-L6-v2's (sentence-transformers' `Pooling` + `Normalize`), done
//!    here, not in the model spec: the mean of the token vectors the attention mask keeps, then
//!    L2 normalization. The cosine similarity of two embeddings is then their dot product.
//!
//! Output: a table of cosine similarities, or with `--json` `{"embeddings": [[…384…], …]}` in
//! input order. Sentences come from the arguments, else one per line from stdin when it is not
//! a terminal, else a built-in list. `tests/minilm.rs` checks the same pipeline against
//! sentence-transformers.

use clap::Parser;
use kiln_runtime::{FileDigest, Model, TensorRef};
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/bert_encoder.ron");
const STD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/std.ron");
const OUTPUT: &str = "last_hidden_state";
/// The model's `max_positions`: longer sequences have no position embedding.
const MAX_SEQ: usize = 512;
/// Row labels of the similarity table are cut to this many characters.
const LABEL: usize = 28;

const BUILT_IN: [&str; 6] = [
    "The cat sits on the mat.",
    "A kitten is sleeping on the rug.",
    "Stock markets fell sharply after the rate decision.",
    "Shares dropped when the central bank raised interest rates.",
    "How do I bake sourdough bread at home?",
    "A simple recipe for homemade bread.",
];

/// Embeds sentences with all-MiniLM-L6-v2 compiled by Kiln and prints their cosine similarities.
#[derive(Parser)]
#[command(after_help = "Weights and tokenizer come from ${KILN_CACHE:-~/.cache/kiln}/minilm/ \
                        (run scripts/fetch_minilm.sh once).")]
struct Args {
    /// Sentences to embed (default: one per line from stdin when it is not a terminal, else a
    /// built-in list).
    sentences: Vec<String>,
    /// Print `{"embeddings": [[...], ...]}` (unit vectors, input order) instead of the table.
    #[arg(long)]
    json: bool,
    /// Tokens per sentence, [CLS] and [SEP] included: longer ones are truncated, shorter padded.
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(2..=MAX_SEQ as u64))]
    seq: u64,
    /// Compile into a temporary directory instead of reusing the cached artifact.
    #[arg(long)]
    no_cache: bool,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    let seq = args.seq as usize;
    let cache = cache_dir()?;
    let weights = cache.join("model.safetensors");
    let tokenizer_file = cache.join("tokenizer.json");
    for f in [&weights, &tokenizer_file] {
        if !f.is_file() {
            return Err(format!(
                "all-MiniLM-L6-v2 is not cached ({} does not exist): run scripts/fetch_minilm.sh first",
                f.display()
            ));
        }
    }
    let sentences = sentences(args)?;

    let start = Instant::now();
    let (ids, mask) = tokenize(&tokenizer_file, &sentences, seq)?;
    let tokenized = start.elapsed();

    let start = Instant::now();
    let (mut model, _scratch) = compiled_model(&cache, &weights, sentences.len(), seq, args.no_cache)?;
    let prepared = start.elapsed();

    let start = Instant::now();
    let shape = [sentences.len() as u64, seq as u64];
    let types = vec![0i64; ids.len()];
    let outputs = model
        .run(&[
            TensorRef::i64("input_ids", &shape, &ids),
            TensorRef::i64("token_type_ids", &shape, &types),
            TensorRef::i64("attention_mask", &shape, &mask),
        ])
        .map_err(|e| format!("running the model: {e}"))?;
    let ran = start.elapsed();
    let hidden = outputs
        .iter()
        .find(|t| t.name() == OUTPUT)
        .ok_or_else(|| format!("the model has no output `{OUTPUT}`"))?;
    let hidden_dim = match hidden.shape() {
        [b, s, h] if *b as usize == sentences.len() && *s as usize == seq => *h as usize,
        other => {
            return Err(format!(
                "`{OUTPUT}` has shape {other:?}, expected [{}, {seq}, hidden]",
                sentences.len()
            ))
        }
    };
    let values =
        hidden.as_f32().ok_or_else(|| format!("`{OUTPUT}` is {:?}, expected f32", hidden.dtype()))?;
    let embeddings = mean_pool_normalize(values, &mask, seq, hidden_dim);
    eprintln!(
        "tokenized in {:.1} ms, model ready in {:.0} ms, ran {} sentences in {:.1} ms on {} threads",
        ms(tokenized),
        ms(prepared),
        sentences.len(),
        ms(ran),
        model.threads()
    );

    let text = if args.json {
        format!("{}\n", serde_json::json!({ "embeddings": embeddings }))
    } else {
        similarity_table(&sentences, &embeddings)
    };
    // A closed pipe (`| head`) ends the output quietly instead of panicking like `print!`.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(format!("writing the output: {e}"))
        }
        _ => {}
    }
    Ok(())
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `${KILN_CACHE:-$HOME/.cache/kiln}/minilm`, as scripts/fetch_minilm.sh fills it.
fn cache_dir() -> Result<PathBuf, String> {
    let nonempty = |v: &str| std::env::var_os(v).filter(|s| !s.is_empty()).map(PathBuf::from);
    let base = nonempty("KILN_CACHE")
        .or_else(|| nonempty("HOME").map(|h| h.join(".cache/kiln")))
        .ok_or("neither KILN_CACHE nor HOME is set: cannot find the weights cache")?;
    Ok(base.join("minilm"))
}

fn sentences(args: &Args) -> Result<Vec<String>, String> {
    if !args.sentences.is_empty() {
        return Ok(args.sentences.clone());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        let mut text = String::new();
        stdin.lock().read_to_string(&mut text).map_err(|e| format!("reading sentences from stdin: {e}"))?;
        let lines: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        if !lines.is_empty() {
            return Ok(lines);
        }
        eprintln!("note: no sentences on stdin; using the built-in list");
    }
    Ok(BUILT_IN.iter().map(|s| s.to_string()).collect())
}

/// Token ids and attention masks, row-major [sentences, seq], from `tokenizer.json`.
fn tokenize(file: &Path, sentences: &[String], seq: usize) -> Result<(Vec<i64>, Vec<i64>), String> {
    let mut tokenizer = Tokenizer::from_file(file)
        .map_err(|e| format!("cannot read the tokenizer {}: {e}", file.display()))?;
    tokenizer
        .with_truncation(Some(TruncationParams { max_length: seq, ..TruncationParams::default() }))
        .map_err(|e| format!("tokenizer truncation: {e}"))?;
    let pad_id = tokenizer.token_to_id("[PAD]").ok_or("the tokenizer has no [PAD] token")?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::Fixed(seq),
        pad_id,
        pad_token: "[PAD]".into(),
        ..PaddingParams::default()
    }));
    let encodings =
        tokenizer.encode_batch(sentences.to_vec(), true).map_err(|e| format!("tokenizing: {e}"))?;
    let (mut ids, mut mask) =
        (Vec::with_capacity(sentences.len() * seq), Vec::with_capacity(sentences.len() * seq));
    for (i, e) in encodings.iter().enumerate() {
        if e.get_ids().len() != seq {
            return Err(format!(
                "sentence {i} has {} tokens after padding, expected {seq}",
                e.get_ids().len()
            ));
        }
        if !e.get_overflowing().is_empty() {
            eprintln!(
                "note: sentence {i} is longer than {seq} tokens and was truncated (--seq sets the length)"
            );
        }
        ids.extend(e.get_ids().iter().map(|&x| i64::from(x)));
        mask.extend(e.get_attention_mask().iter().map(|&x| i64::from(x)));
    }
    Ok((ids, mask))
}

/// The compiled encoder for `batch` sentences of `seq` tokens: the cached artifact when its key
/// matches, else freshly compiled into the cache, or with `no_cache` into a temporary directory
/// (returned too: it must outlive the model, which maps its files).
fn compiled_model(
    cache: &Path,
    weights: &Path,
    batch: usize,
    seq: usize,
    no_cache: bool,
) -> Result<(Model, Option<tempfile::TempDir>), String> {
    if no_cache {
        let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
        compile(weights, batch, seq, dir.path())?;
        let model = Model::load(dir.path()).map_err(|e| format!("loading the compiled model: {e}"))?;
        return Ok((model, Some(dir)));
    }
    let bytes = std::fs::read(weights).map_err(|e| format!("cannot read {}: {e}", weights.display()))?;
    let key = artifact_key(&bytes, batch, seq)?;
    drop(bytes);
    let slot = cache.join("artifact");
    let dir = slot.join("bert_encoder.kiln");
    let key_file = slot.join("key.txt");
    if std::fs::read_to_string(&key_file).is_ok_and(|k| k == key) {
        match Model::load(&dir) {
            Ok(m) => return Ok((m, None)),
            Err(e) => eprintln!("note: the cached artifact does not load ({e}); compiling again"),
        }
    }
    // One slot: an artifact holds a copy of the weights (~87 MiB), so keep only the latest.
    let _ = std::fs::remove_file(&key_file);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&slot).map_err(|e| format!("cannot create {}: {e}", slot.display()))?;
    compile(weights, batch, seq, &dir)?;
    std::fs::write(&key_file, &key).map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
    let model =
        Model::load(&dir).map_err(|e| format!("loading the compiled model {}: {e}", dir.display()))?;
    Ok((model, None))
}

/// What the cached artifact must have been built from: the spec and the standard library, the
/// weights (size and crc32), batch and sequence length, and this program (its size and mtime
/// change with every rebuild, so a changed compiler never reuses an old artifact).
fn artifact_key(weights: &[u8], batch: usize, seq: usize) -> Result<String, String> {
    let text = |p: &str| std::fs::read(p).map_err(|e| format!("cannot read {p}: {e}"));
    let spec = FileDigest::of("spec", &[text(SPEC)?, text(STD)?].concat());
    let w = FileDigest::of("weights", weights);
    let exe = std::env::current_exe()
        .and_then(std::fs::metadata)
        .map(|m| {
            let mtime = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
            format!("{} {}", m.len(), mtime.map_or(0, |d| d.as_nanos()))
        })
        .unwrap_or_default();
    Ok(format!(
        "spec {:08x}\nweights {} {:08x}\nbatch {batch}\nseq {seq}\ncompiler {exe}\nformat {}\n",
        spec.crc32,
        w.bytes,
        w.crc32,
        kiln_runtime::ARTIFACT_FORMAT_VERSION
    ))
}

/// Lowers, optimizes, binds the checkpoint's weights by name, schedules and compiles the encoder
/// for this machine into `dir`.
fn compile(weights: &Path, batch: usize, seq: usize, dir: &Path) -> Result<(), String> {
    let start = Instant::now();
    let overrides = [format!("batch={batch}"), format!("seq={seq}")]
        .iter()
        .map(|s| kiln_lower::Override::parse(s).map_err(|e| format!("--set {s}: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let (sources, lowered) = kiln_lower::load(Path::new(SPEC), &overrides);
    let lowered = lowered.map_err(|d| d.render(&sources))?;
    let (graph, _) = kiln_opt::optimize(&lowered.graph, &kiln_opt::Options::default())
        .map_err(|e| format!("optimizing: {e}"))?;
    let file = kiln_ir::tensor_io::read_safetensors(weights).map_err(|e| e.to_string())?;
    let (params, warning) = kiln_ir::bind_params_with_warnings(&graph, Some(&file), 0, false)
        .map_err(|e| format!("{}: {e}", weights.display()))?;
    if !warning.is_empty() {
        eprintln!("note: {warning}");
    }
    let schedule = kiln_sched::schedule(&graph).map_err(|e| format!("scheduling: {e}"))?;
    let target = kiln_codegen::CpuTarget::host();
    let built = kiln_codegen::build_artifact(&graph.name, &schedule, &params, &target, dir)
        .map_err(|e| format!("compiling: {e}"))?;
    eprintln!(
        "compiled {} for this machine ({} kernels) in {:.1} s into {}",
        SPEC.rsplit('/').next().unwrap_or(SPEC),
        built.manifest.steps.len(),
        start.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}

/// all-MiniLM-L6-v2's pooling: per sentence, the mean of the hidden states of the tokens whose
/// mask is 1, scaled to unit length.
fn mean_pool_normalize(hidden: &[f32], mask: &[i64], seq: usize, dim: usize) -> Vec<Vec<f32>> {
    mask.chunks(seq)
        .zip(hidden.chunks(seq * dim))
        .map(|(m, h)| {
            let mut sum = vec![0.0f64; dim];
            let mut count = 0.0f64;
            for (&keep, token) in m.iter().zip(h.chunks(dim)) {
                if keep != 0 {
                    count += 1.0;
                    for (acc, &x) in sum.iter_mut().zip(token) {
                        *acc += f64::from(x);
                    }
                }
            }
            let mean: Vec<f64> = sum.iter().map(|x| x / count.max(1e-9)).collect();
            let norm = mean.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
            mean.iter().map(|x| (x / norm) as f32).collect()
        })
        .collect()
}

fn label(s: &str) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= LABEL {
        s
    } else {
        format!("{}…", s.chars().take(LABEL - 1).collect::<String>())
    }
}

/// The cosine similarities as an aligned table, rows labelled with the sentences' beginnings.
fn similarity_table(sentences: &[String], embeddings: &[Vec<f32>]) -> String {
    let n = sentences.len();
    let index_width = (n.max(1) - 1).to_string().len();
    let cell = 6.max(index_width + 1);
    let mut out = format!(
        "cosine similarity of {n} sentence embeddings (all-MiniLM-L6-v2, {} dims, mean pooling, L2-normalized)\n\n",
        embeddings.first().map_or(0, Vec::len)
    );
    let mut header = format!("{:width$}", "", width = index_width + 2 + LABEL);
    for j in 0..n {
        let _ = write!(header, " {j:>cell$}");
    }
    let _ = writeln!(out, "{}", header.trim_end());
    for (i, (s, a)) in sentences.iter().zip(embeddings).enumerate() {
        let l = label(s);
        let pad = LABEL - l.chars().count();
        let _ = write!(out, "{i:>index_width$}  {l}{:pad$}", "");
        for b in embeddings {
            let cos: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let _ = write!(out, " {cos:>cell$.3}");
        }
        out.push('\n');
    }
    out
}
