//! Sentence embeddings with all-MiniLM-L6-v2, compiled by Kiln: tokenize, run the BERT encoder
//! natively, mean-pool, normalize, compare.
//!
//! ```sh
//! scripts/fetch_minilm.sh                                   # once: weights + tokenizer
//! cargo run --release --example sentence_embeddings         # a built-in list of sentences
//! cargo run --release --example sentence_embeddings -- "A cat sleeps." "A kitten naps."
//! printf 'one\ntwo\n' | cargo run --release --example sentence_embeddings -- --json
//! cargo run --release --example sentence_embeddings -- --batch 1 --repeats 5 < sentences.txt
//! ```
//!
//! The `embed` path (the default), the way embedding services run a model:
//!
//! 1. The `tokenizers` crate reads the cached `tokenizer.json` and turns each sentence into
//!    WordPiece ids, truncated to `--seq` tokens (128) and not padded.
//! 2. `kiln_runtime::batching::plan` sorts the sentences by token count and cuts them into
//!    batches of at most `--batch` sentences (32) and `--tokens` padded tokens; each batch is
//!    padded only to its own longest sentence, rounded up to `--multiple-of` (1: not rounded;
//!    8 with `--per-shape` at batches above 1, which bounds the number of artifacts compiled).
//!    A sentence alone runs unpadded.
//! 3. Each batch runs the encoder at its own shape, with an attention mask that hides its
//!    padding; the output is `last_hidden_state` [batch, padded length, 384].
//! 4. The pooling is all-MiniLM-L6-v2's (sentence-transformers' `Pooling` + `Normalize`), done
//!    by `kiln_runtime::pooling`, not in the model spec: the mean of the token vectors the
//!    attention mask keeps, then L2 normalization. The embeddings are put back in input order.
//!
//! `--padded` runs the fixed-shape path instead: every sentence padded to `--seq`, one batch.
//! Both give the same embeddings to 1e-5 (`tests/minilm.rs`): mean pooling ignores padding.
//!
//! One artifact serves every batch: `models/bert_encoder.ron` lowered with `batch` and `seq`
//! made dynamic sizes (`--set 'batch=Dyn(min: 1, max: B, hint: B)' --set 'seq=Dyn(min: 1, max:
//! S, hint: …)'`, B the most sentences per batch, S the most tokens per sentence), optimized,
//! compiled for this machine with the checkpoint's weights bound by their names
//! (`kiln_ir::bind_params_with_warnings`), and cached next to the weights in
//! `artifact/dB-sS/`, reused while the spec, the weights' digest, the bounds and this program
//! stay the same; a batch past the bounds (`--padded` with more sentences than `--batch`)
//! compiles one with wider bounds. Every batch runs at its own shape with no compile, through
//! the same tiled kernels a fixed-shape artifact uses (`docs/dynamic-shapes.md`).
//!
//! `--target vulkan` or `--target cuda[:ARCH]` compiles the encoder for a GPU instead of this
//! CPU (one artifact for every batch and length there too, cached in `artifact/dB-sS-vulkan/`
//! or `…-cuda-ARCH/`), and runs it on the first such device.
//!
//! `--per-shape` compiles one artifact per distinct (batch, padded length) instead, lowered
//! with `--set batch=B --set seq=L` and cached in `artifact/bB-sL/` (at most [`CACHE_SLOTS`]
//! kept, the least recently used dropped first); the first embedding of a new shape pays its
//! compile.
//!
//! Output: a table of cosine similarities, or with `--json` `{"embeddings": [[…384…], …],
//! "timing": {…}}` in input order. `--repeats N` embeds the sentences N more times once every
//! shape is compiled and loaded, and reports the wall time of each of those loops (tokenizing,
//! planning, running, pooling, restoring the order; compile and load excluded, reported
//! separately). Sentences come from the arguments, else one per line from stdin when it is not
//! a terminal, else a built-in list. `tests/minilm.rs` checks the pipeline against
//! sentence-transformers and the `embed` path against the padded one.

use clap::Parser;
use kiln_runtime::batching::{self, Limits};
use kiln_runtime::pooling;
use kiln_runtime::{FileDigest, Model, Options, TensorRef};
use std::fmt::Write as _;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokenizers::{Tokenizer, TruncationParams};

const SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/bert_encoder.ron");
const STD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/std.ron");
const OUTPUT: &str = "last_hidden_state";
/// The model's `max_positions`: longer sequences have no position embedding.
const MAX_SEQ: usize = 512;
/// Compiled shapes kept in the cache (each holds a copy of the weights, ~87 MiB).
pub const CACHE_SLOTS: usize = 64;
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
    /// Print `{"embeddings": [[...], ...], "timing": {...}}` (unit vectors, input order)
    /// instead of the table.
    #[arg(long)]
    json: bool,
    /// Most tokens per sentence, [CLS] and [SEP] included: longer ones are truncated (with
    /// `--padded`, shorter ones are padded to it).
    #[arg(long, default_value_t = 128, value_parser = clap::value_parser!(u64).range(2..=MAX_SEQ as u64))]
    seq: u64,
    /// Most sentences per batch (1: each sentence runs alone, unpadded).
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// Most padded tokens per batch (batch × padded length; default `--batch` × `--seq`).
    #[arg(long, value_parser = clap::value_parser!(u64).range(2..))]
    tokens: Option<u64>,
    /// Padded lengths are rounded up to a multiple of this (default 1; 8 with `--per-shape`
    /// when `--batch` is above 1).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_SEQ as u64))]
    multiple_of: Option<u64>,
    /// Pad every sentence to `--seq` and run them as one batch (the fixed-shape path).
    #[arg(long, conflicts_with_all = ["batch", "tokens", "multiple_of"])]
    padded: bool,
    /// Embed the sentences this many more times once every shape is ready, and report the
    /// wall time of each loop.
    #[arg(long, default_value_t = 0)]
    repeats: u32,
    /// Worker threads (default: `KILN_THREADS`, else every core).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    threads: Option<u64>,
    /// Compile into temporary directories instead of reusing the cached artifacts.
    #[arg(long)]
    no_cache: bool,
    /// Compile one artifact per (batch, padded length) instead of one for every batch and
    /// length.
    #[arg(long)]
    per_shape: bool,
    /// Where the encoder runs: `cpu` (this machine), `vulkan` or `cuda[:ARCH]` (default sm_80).
    #[arg(long, default_value = "cpu")]
    target: String,
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
    let sentences = sentences(args)?;
    let sizes = if args.per_shape { Sizes::PerShape } else { Sizes::Dynamic };
    let mut encoder = Encoder::new(&cache, !args.no_cache, args.threads.map(|t| t as usize), sizes)?
        .on(Device::parse(&args.target)?);
    let how = if args.padded {
        How::Padded { seq }
    } else {
        let max_batch = args.batch as usize;
        let rounded = args.per_shape && max_batch > 1;
        let multiple_of = args.multiple_of.map_or(if rounded { 8 } else { 1 }, |m| m as usize);
        let tokens = args.tokens.map_or(max_batch * seq.next_multiple_of(multiple_of), |t| t as usize);
        How::Embed { seq, limits: Limits { tokens, max_batch, multiple_of } }
    };

    let start = Instant::now();
    let mut embeddings = encoder.run(&sentences, &how)?;
    let first = start.elapsed();
    let prepare = encoder.prepare_time();
    let mut loops = Vec::with_capacity(args.repeats as usize);
    for _ in 0..args.repeats {
        let start = Instant::now();
        embeddings = encoder.run(&sentences, &how)?;
        loops.push(start.elapsed());
    }
    eprintln!(
        "{} sentences in {} shape(s) run by {} artifact(s) ({} compiled, {} loaded from the cache, {:.1} s), \
         first pass {:.1} ms ({:.1} ms without compiling and loading), on {} threads",
        sentences.len(),
        encoder.shapes().len(),
        encoder.artifacts().len(),
        encoder.compiled,
        encoder.loaded,
        prepare.as_secs_f64(),
        ms(first),
        ms(first.saturating_sub(prepare)),
        encoder.threads()
    );
    if !loops.is_empty() {
        let mut sorted: Vec<f64> = loops.iter().map(|&d| ms(d)).collect();
        sorted.sort_by(f64::total_cmp);
        eprintln!(
            "embedding loop: median {:.1} ms, min {:.1} ms over {} repeats",
            sorted[sorted.len() / 2],
            sorted[0],
            sorted.len()
        );
    }

    let text = if args.json {
        let timing = serde_json::json!({
            "sentences": sentences.len(),
            "threads": encoder.threads(),
            "shapes": encoder.shapes(),
            "artifacts": encoder.artifacts().iter().map(|c| format!("{c:?}")).collect::<Vec<_>>(),
            "compiled": encoder.compiled,
            "loaded": encoder.loaded,
            "padded_tokens": encoder.padded_tokens,
            "prepare_s": prepare.as_secs_f64(),
            "first_pass_s": first.as_secs_f64(),
            "loops_s": loops.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
        });
        format!("{}\n", serde_json::json!({ "embeddings": embeddings, "timing": timing }))
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

fn ms(d: Duration) -> f64 {
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

/// How sentences are batched.
#[derive(Clone, Copy, Debug)]
pub enum How {
    /// The `embed` path: truncated to `seq` tokens, length-sorted batches within `limits`,
    /// each padded to its own length.
    Embed {
        /// Most tokens per sentence.
        seq: usize,
        /// What one batch may hold.
        limits: Limits,
    },
    /// Every sentence truncated and padded to `seq` tokens, all in one batch.
    Padded {
        /// Tokens per sentence.
        seq: usize,
    },
}

/// How batches of different shapes are compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizes {
    /// One artifact whose batch and sequence length are set per run, within bounds.
    Dynamic,
    /// One artifact per (batch, padded length).
    PerShape,
}

/// What an artifact was compiled for: one shape, or every shape within bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Compiled {
    /// `batch` sentences of `seq` tokens.
    Shape { batch: usize, seq: usize },
    /// 1 to `batch` sentences of 1 to `seq` tokens.
    Bounds { batch: usize, seq: usize },
}

impl Compiled {
    /// Whether the artifact runs `batch` sentences of `seq` tokens.
    fn runs(self, batch: usize, seq: usize) -> bool {
        match self {
            Compiled::Shape { batch: b, seq: s } => (b, s) == (batch, seq),
            Compiled::Bounds { batch: b, seq: s } => batch <= b && seq <= s,
        }
    }

    /// The `--set`s that lower the spec for it.
    fn overrides(self) -> Vec<String> {
        match self {
            Compiled::Shape { batch, seq } => vec![format!("batch={batch}"), format!("seq={seq}")],
            Compiled::Bounds { batch, seq } => vec![
                format!("batch=Dyn(min: 1, max: {batch}, hint: {batch})"),
                format!("seq=Dyn(min: 1, max: {seq}, hint: {})", seq.min(128)),
            ],
        }
    }

    /// Its folder in the cache.
    fn slot(self) -> String {
        match self {
            Compiled::Shape { batch, seq } => format!("b{batch}-s{seq}"),
            Compiled::Bounds { batch, seq } => format!("d{batch}-s{seq}"),
        }
    }
}

/// Where the encoder is compiled for and runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Device {
    /// This machine's CPU.
    Cpu,
    /// The first Vulkan device.
    Vulkan,
    /// CUDA device 0, with kernels for this architecture (`sm_80`, `sm_90`).
    Cuda(String),
}

impl Device {
    /// `cpu`, `vulkan`, `cuda` or `cuda:ARCH`.
    pub fn parse(name: &str) -> Result<Device, String> {
        match name {
            "cpu" => Ok(Device::Cpu),
            "vulkan" => Ok(Device::Vulkan),
            "cuda" => Ok(Device::Cuda("sm_80".into())),
            other => match other.strip_prefix("cuda:") {
                Some(arch) if kiln_codegen::gpu::NvvmTarget::by_arch(arch).is_some() => {
                    Ok(Device::Cuda(arch.into()))
                }
                _ => Err(format!(
                    "unknown target `{name}` (known: cpu, vulkan, cuda, cuda:{})",
                    kiln_codegen::gpu::NvvmTarget::ARCHES.join("|")
                )),
            },
        }
    }

    /// Its name in cache folders.
    fn slot(&self) -> String {
        match self {
            Device::Cpu => String::new(),
            Device::Vulkan => "-vulkan".into(),
            Device::Cuda(arch) => format!("-cuda-{arch}"),
        }
    }
}

/// A loaded artifact and the temporary directory it lives in (without the cache): the model
/// maps its files, so the directory must outlive it.
struct Loaded {
    model: Model,
    _dir: Option<tempfile::TempDir>,
}

/// The tokenizer and the encoders compiled so far: one for every size within bounds, or one
/// per (batch, padded length).
pub struct Encoder {
    tokenizer: Tokenizer,
    pad_id: u32,
    weights: PathBuf,
    /// `None`: compile into temporary directories.
    cache: Option<PathBuf>,
    options: Options,
    sizes: Sizes,
    device: Device,
    /// The bounds a new dynamic artifact gets (widened by a batch past them).
    bounds: (usize, usize),
    models: Vec<(Compiled, Loaded)>,
    /// Every (batch, padded length) run so far.
    shapes: std::collections::BTreeSet<(usize, usize)>,
    /// Shapes compiled and shapes loaded from the cache, and the time both took.
    pub compiled: usize,
    /// See `compiled`.
    pub loaded: usize,
    /// Tokens the last run computed, padding included (batch × padded length, summed).
    pub padded_tokens: usize,
    prepare: Duration,
}

impl Encoder {
    /// The tokenizer and weights from `dir` (`tokenizer.json`, `model.safetensors`); compiled
    /// artifacts cached in `dir/artifact/` when `use_cache`, one per shape or one for every size
    /// (`sizes`).
    pub fn new(dir: &Path, use_cache: bool, threads: Option<usize>, sizes: Sizes) -> Result<Encoder, String> {
        let weights = dir.join("model.safetensors");
        let tokenizer_file = dir.join("tokenizer.json");
        for f in [&weights, &tokenizer_file] {
            if !f.is_file() {
                return Err(format!(
                    "all-MiniLM-L6-v2 is not cached ({} does not exist): run scripts/fetch_minilm.sh first",
                    f.display()
                ));
            }
        }
        let mut tokenizer = Tokenizer::from_file(&tokenizer_file)
            .map_err(|e| format!("cannot read the tokenizer {}: {e}", tokenizer_file.display()))?;
        // Padding is the plan's business, not the tokenizer's.
        tokenizer.with_padding(None);
        let pad_id = tokenizer.token_to_id("[PAD]").ok_or("the tokenizer has no [PAD] token")?;
        Ok(Encoder {
            tokenizer,
            pad_id,
            weights,
            cache: use_cache.then(|| dir.join("artifact")),
            options: Options { threads, device: None },
            sizes,
            device: Device::Cpu,
            bounds: (1, 1),
            models: Vec::new(),
            shapes: Default::default(),
            compiled: 0,
            loaded: 0,
            padded_tokens: 0,
            prepare: Duration::ZERO,
        })
    }

    /// The same encoder compiled for and run on `device`.
    pub fn on(self, device: Device) -> Encoder {
        Encoder { device, ..self }
    }

    /// Every (batch, padded length) run so far, sorted.
    pub fn shapes(&self) -> Vec<(usize, usize)> {
        self.shapes.iter().copied().collect()
    }

    /// What each artifact compiled or loaded so far was compiled for, sorted.
    pub fn artifacts(&self) -> Vec<Compiled> {
        let mut a: Vec<Compiled> = self.models.iter().map(|(c, _)| *c).collect();
        a.sort_unstable();
        a
    }

    /// Time spent compiling and loading artifacts so far.
    pub fn prepare_time(&self) -> Duration {
        self.prepare
    }

    /// Worker threads of the models (of a fresh one before any is loaded).
    pub fn threads(&self) -> usize {
        self.models.first().map(|(_, l)| l).map_or_else(
            || {
                self.options
                    .threads
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            },
            |l| l.model.threads(),
        )
    }

    /// Unit-length embeddings of `sentences`, in input order.
    pub fn run(&mut self, sentences: &[String], how: &How) -> Result<Vec<Vec<f32>>, String> {
        match *how {
            How::Embed { seq, limits } => {
                // The bounds every batch of the plan fits.
                self.bounds = (self.bounds.0.max(limits.max_batch), self.bounds.1.max(seq));
                self.embed(sentences, seq, &limits)
            }
            How::Padded { seq } => self.embed_padded(sentences, seq),
        }
    }

    /// The `embed` path: tokenize without padding, plan length-sorted batches, run each at its
    /// own padded length, pool, restore the input order.
    pub fn embed(
        &mut self,
        sentences: &[String],
        seq: usize,
        limits: &Limits,
    ) -> Result<Vec<Vec<f32>>, String> {
        let tokens = self.tokenize(sentences, seq)?;
        let lengths: Vec<usize> = tokens.iter().map(Vec::len).collect();
        let plan = batching::plan(&lengths, limits).map_err(|e| format!("planning batches: {e}"))?;
        let mut pooled = Vec::with_capacity(sentences.len());
        self.padded_tokens = plan.batches.iter().map(batching::Batch::padded_tokens).sum();
        for batch in &plan.batches {
            let rows: Vec<&[u32]> = batch.indices.iter().map(|&i| tokens[i].as_slice()).collect();
            pooled.extend(self.run_batch(&rows, batch.padded_len)?);
        }
        Ok(plan.restore(&pooled))
    }

    /// The fixed-shape path: every sentence truncated and padded to `seq`, one batch.
    pub fn embed_padded(&mut self, sentences: &[String], seq: usize) -> Result<Vec<Vec<f32>>, String> {
        if sentences.is_empty() {
            return Ok(Vec::new());
        }
        let tokens = self.tokenize(sentences, seq)?;
        let rows: Vec<&[u32]> = tokens.iter().map(Vec::as_slice).collect();
        self.padded_tokens = rows.len() * seq;
        self.run_batch(&rows, seq)
    }

    /// WordPiece ids of each sentence, [CLS] … [SEP], truncated to `seq`, unpadded.
    fn tokenize(&mut self, sentences: &[String], seq: usize) -> Result<Vec<Vec<u32>>, String> {
        self.tokenizer
            .with_truncation(Some(TruncationParams { max_length: seq, ..TruncationParams::default() }))
            .map_err(|e| format!("tokenizer truncation: {e}"))?;
        let encodings =
            self.tokenizer.encode_batch(sentences.to_vec(), true).map_err(|e| format!("tokenizing: {e}"))?;
        Ok(encodings
            .iter()
            .enumerate()
            .map(|(i, e)| {
                if !e.get_overflowing().is_empty() {
                    eprintln!("note: sentence {i} is longer than {seq} tokens and was truncated (--seq sets the length)");
                }
                e.get_ids().to_vec()
            })
            .collect())
    }

    /// Runs one batch padded to `len` tokens and returns its pooled, normalized embeddings.
    fn run_batch(&mut self, rows: &[&[u32]], len: usize) -> Result<Vec<Vec<f32>>, String> {
        let batch = rows.len();
        let (mut ids, mut mask) = (vec![i64::from(self.pad_id); batch * len], vec![0i64; batch * len]);
        for (r, row) in rows.iter().enumerate() {
            if row.len() > len {
                return Err(format!(
                    "a sentence of {} tokens does not fit a batch padded to {len}",
                    row.len()
                ));
            }
            for (t, &id) in row.iter().enumerate() {
                ids[r * len + t] = i64::from(id);
                mask[r * len + t] = 1;
            }
        }
        let types = vec![0i64; ids.len()];
        let shape = [batch as u64, len as u64];
        let model = self.model(batch, len)?;
        let outputs = model
            .run(&[
                TensorRef::i64("input_ids", &shape, &ids),
                TensorRef::i64("token_type_ids", &shape, &types),
                TensorRef::i64("attention_mask", &shape, &mask),
            ])
            .map_err(|e| format!("running the model: {e}"))?;
        let hidden = outputs
            .iter()
            .find(|t| t.name() == OUTPUT)
            .ok_or_else(|| format!("the model has no output `{OUTPUT}`"))?;
        let hidden_dim = match hidden.shape() {
            [b, s, h] if *b as usize == batch && *s as usize == len => *h as usize,
            other => {
                return Err(format!("`{OUTPUT}` has shape {other:?}, expected [{batch}, {len}, hidden]"))
            }
        };
        let values =
            hidden.as_f32().ok_or_else(|| format!("`{OUTPUT}` is {:?}, expected f32", hidden.dtype()))?;
        let keep: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
        let embeddings =
            pooling::mean_pool_normalize(values, &keep, len, hidden_dim).map_err(|e| e.to_string())?;
        Ok(embeddings.into_iter().map(|e| e.into_iter().map(|x| x as f32).collect()).collect())
    }

    /// The encoder for `batch` sentences of `seq` tokens: one already loaded that runs them,
    /// else the cached artifact when its key matches, else freshly compiled (into the cache, or
    /// into a temporary directory).
    fn model(&mut self, batch: usize, seq: usize) -> Result<&mut Model, String> {
        self.shapes.insert((batch, seq));
        let at = match self.models.iter().position(|(c, _)| c.runs(batch, seq)) {
            Some(at) => at,
            None => {
                let compiled = match self.sizes {
                    Sizes::PerShape => Compiled::Shape { batch, seq },
                    Sizes::Dynamic => {
                        Compiled::Bounds { batch: self.bounds.0.max(batch), seq: self.bounds.1.max(seq) }
                    }
                };
                let start = Instant::now();
                let loaded = self.load_or_compile(compiled)?;
                self.prepare += start.elapsed();
                self.models.push((compiled, loaded));
                self.models.len() - 1
            }
        };
        Ok(&mut self.models[at].1.model)
    }

    fn load_or_compile(&mut self, compiled: Compiled) -> Result<Loaded, String> {
        let Some(cache) = self.cache.clone() else {
            let dir = tempfile::tempdir().map_err(|e| format!("cannot create a temporary directory: {e}"))?;
            compile(&self.weights, compiled, &self.device, dir.path())?;
            self.compiled += 1;
            let model = Model::load_with(dir.path(), &self.options)
                .map_err(|e| format!("loading the compiled model: {e}"))?;
            return Ok(Loaded { model, _dir: Some(dir) });
        };
        let bytes = std::fs::read(&self.weights)
            .map_err(|e| format!("cannot read {}: {e}", self.weights.display()))?;
        let key = artifact_key(&bytes, compiled, &self.device)?;
        drop(bytes);
        let slot = cache.join(format!("{}{}", compiled.slot(), self.device.slot()));
        let dir = slot.join("bert_encoder.kiln");
        let key_file = slot.join("key.txt");
        if std::fs::read_to_string(&key_file).is_ok_and(|k| k == key) {
            match Model::load_with(&dir, &self.options) {
                Ok(model) => {
                    touch(&key_file);
                    self.loaded += 1;
                    return Ok(Loaded { model, _dir: None });
                }
                Err(e) => eprintln!(
                    "note: the cached artifact {} does not load ({e}); compiling again",
                    dir.display()
                ),
            }
        }
        let _ = std::fs::remove_file(&key_file);
        let _ = std::fs::remove_dir_all(&dir);
        prune(&cache, CACHE_SLOTS - 1);
        std::fs::create_dir_all(&slot).map_err(|e| format!("cannot create {}: {e}", slot.display()))?;
        compile(&self.weights, compiled, &self.device, &dir)?;
        self.compiled += 1;
        std::fs::write(&key_file, &key).map_err(|e| format!("cannot write {}: {e}", key_file.display()))?;
        let model = Model::load_with(&dir, &self.options)
            .map_err(|e| format!("loading the compiled model {}: {e}", dir.display()))?;
        Ok(Loaded { model, _dir: None })
    }
}

/// Marks a cache slot as just used (its key file's mtime orders the slots for [`prune`]).
fn touch(file: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(file) {
        let _ = f.set_modified(std::time::SystemTime::now());
    }
}

/// Deletes the least recently used shape slots of `cache` beyond `keep`, and the single slot of
/// earlier versions of this example (`artifact/key.txt` and `artifact/bert_encoder.kiln`).
fn prune(cache: &Path, keep: usize) {
    let _ = std::fs::remove_file(cache.join("key.txt"));
    let _ = std::fs::remove_dir_all(cache.join("bert_encoder.kiln"));
    let Ok(entries) = std::fs::read_dir(cache) else { return };
    let mut slots: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| (n.starts_with('b') || n.starts_with('d')) && n.contains("-s"))
        })
        .map(|e| {
            let used = std::fs::metadata(e.path().join("key.txt"))
                .and_then(|m| m.modified())
                .unwrap_or(std::time::UNIX_EPOCH);
            (used, e.path())
        })
        .collect();
    if slots.len() <= keep {
        return;
    }
    slots.sort();
    for (_, path) in &slots[..slots.len() - keep] {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// What a cached artifact must have been built from: the spec and the standard library, the
/// weights (size and crc32), the shape or bounds, and this program (its size and mtime change
/// with every rebuild, so a changed compiler never reuses an old artifact).
fn artifact_key(weights: &[u8], compiled: Compiled, device: &Device) -> Result<String, String> {
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
        "spec {:08x}\nweights {} {:08x}\nsizes {compiled:?}\ndevice {device:?}\ncompiler {exe}\nformat {}\n",
        spec.crc32,
        w.bytes,
        w.crc32,
        kiln_runtime::ARTIFACT_FORMAT_VERSION
    ))
}

/// Lowers, optimizes, binds the checkpoint's weights by name, schedules and compiles the encoder
/// for `device` into `dir`.
fn compile(weights: &Path, compiled: Compiled, device: &Device, dir: &Path) -> Result<(), String> {
    let start = Instant::now();
    let overrides = compiled
        .overrides()
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
    let compiling = |e: kiln_codegen::CodegenError| format!("compiling: {e}");
    let scheduling = |e: kiln_sched::SchedError| format!("scheduling: {e}");
    let (manifest, place) = match device {
        Device::Cpu => {
            let schedule = kiln_sched::schedule(&graph).map_err(scheduling)?;
            let target = kiln_codegen::CpuTarget::host();
            let built = kiln_codegen::build_artifact(&graph.name, &schedule, &params, &target, dir)
                .map_err(compiling)?;
            (built.manifest, "this machine".to_string())
        }
        Device::Vulkan => {
            let caps = kiln_codegen::gpu::GpuCaps::vulkan();
            let schedule = kiln_sched::schedule_aligned(&graph, caps.buffer_align).map_err(scheduling)?;
            let built = kiln_codegen::build_vulkan_artifact(&graph.name, &schedule, &params, &caps, dir)
                .map_err(compiling)?;
            (built.manifest, "Vulkan".to_string())
        }
        Device::Cuda(arch) => {
            let target =
                kiln_codegen::gpu::NvvmTarget::by_arch(arch).ok_or_else(|| format!("no target {arch}"))?;
            let caps = kiln_codegen::gpu::GpuCaps::cuda(target);
            let schedule = kiln_sched::schedule_aligned(&graph, caps.buffer_align).map_err(scheduling)?;
            let ptxas = kiln_codegen::gpu::ptxas::Ptxas::find();
            let built = kiln_codegen::build_cuda_artifact(
                &graph.name,
                &schedule,
                &params,
                &caps,
                ptxas.as_ref(),
                dir,
            )
            .map_err(compiling)?;
            (built.manifest, format!("CUDA {arch}"))
        }
    };
    let sizes = match compiled {
        Compiled::Shape { batch, seq } => format!("at batch {batch}, seq {seq}"),
        Compiled::Bounds { batch, seq } => format!("for batches of 1 to {batch} and 1 to {seq} tokens"),
    };
    eprintln!(
        "compiled {} {sizes} for {place} ({} kernels, arena {:.1} MiB) in {:.1} s into {}",
        SPEC.rsplit('/').next().unwrap_or(SPEC),
        manifest.steps.len(),
        manifest.arena_bytes as f64 / (1 << 20) as f64,
        start.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
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
