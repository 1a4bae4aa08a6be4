//! Loading and running real artifacts: exact results, threading, profiles, the JIT path, and
//! every refusal the loader and `run` promise.

mod common;

use common::*;
use kiln_runtime::{
    BufRef, DType, Dispatch, KernelFn, KernelSource, Manifest, Model, Options, RuntimeError, TensorRef,
    WeightStore, KERNELS_FILE, MANIFEST_FILE, WEIGHTS_FILE,
};

const X_SHAPE: [u64; 2] = [ROWS as u64, COLS as u64];
const S_SHAPE: [u64; 1] = [ROWS as u64];

fn load(toy: &Toy, threads: usize) -> Result<Model, RuntimeError> {
    Model::load_with(toy.path(), &Options { threads: Some(threads), ..Options::default() })
}

fn load_err(toy: &Toy) -> String {
    match load(toy, 1) {
        Ok(_) => panic!("the artifact was accepted"),
        Err(e) => e.to_string(),
    }
}

fn run_toy(model: &mut Model, x: &[f32], scale: &[i32]) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
    let out = model.run(&[TensorRef::f32("x", &X_SHAPE, x), TensorRef::i32("scale", &S_SHAPE, scale)])?;
    assert_eq!(out.len(), 2);
    assert_eq!((out[0].name(), out[0].dtype(), out[0].shape()), ("y", DType::F32, &X_SHAPE[..]));
    assert_eq!((out[1].name(), out[1].shape()), ("s", &S_SHAPE[..]));
    Ok((out[0].as_f32().expect("f32").to_vec(), out[1].to_f32_vec()))
}

#[test]
fn runs_exactly() {
    let toy = Toy::new();
    let mut model = load(&toy, 1).unwrap();
    assert_eq!(model.threads(), 1);
    assert_eq!(model.arena_bytes(), 8192);
    assert_eq!(model.inputs()[1].name, "scale");
    assert_eq!(model.outputs()[0].name, "y");
    assert_eq!(model.manifest().model, "toy");
    let (x, scale) = (x_data(), scale_data());
    let expected = expected(&x, &scale);
    assert_eq!(run_toy(&mut model, &x, &scale).unwrap(), expected);
    // The arena is reused: a second run with other inputs is exact too.
    let x2: Vec<f32> = x.iter().map(|v| v * -0.5 + 1.0).collect();
    assert_eq!(run_toy(&mut model, &x2, &scale).unwrap(), common::expected(&x2, &scale));
}

#[test]
fn threads_split_steps_and_agree_with_one_thread() {
    let toy = Toy::new();
    let (x, scale) = (x_data(), scale_data());
    let single = run_toy(&mut load(&toy, 1).unwrap(), &x, &scale).unwrap();

    let mut model = load(&toy, 2).unwrap();
    assert_eq!(model.threads(), 2);
    let kernels_path = toy.file(KERNELS_FILE);
    let calls = || {
        // SAFETY: the toy's kernels.so, already loaded by the model (same path, same instance).
        let lib = unsafe { libloading::Library::new(&kernels_path) }.unwrap();
        // SAFETY: toy_calls_of_k_mul is `int64_t (void)`.
        let f = unsafe { lib.get::<unsafe extern "C" fn() -> i64>(b"toy_calls_of_k_mul") }.unwrap();
        // SAFETY: as above.
        unsafe { f() }
    };
    let before = calls();
    for _ in 0..3 {
        assert_eq!(run_toy(&mut model, &x, &scale).unwrap(), single);
    }
    // range 64, grain 4, 2 threads: 8 chunks of 8 rows per run.
    assert_eq!(calls() - before, 3 * 8);

    // A grain of the whole range runs each step in one call.
    let mut toy = toy;
    toy.edit(|m| {
        m.steps.iter_mut().for_each(|s| {
            if let Dispatch::Cpu { grain, .. } = &mut s.dispatch {
                *grain = 64;
            }
        })
    });
    let mut model = load(&toy, 2).unwrap();
    let before = calls();
    assert_eq!(run_toy(&mut model, &x, &scale).unwrap(), single);
    assert_eq!(calls() - before, 1);
}

#[test]
fn run_into_and_misaligned_buffers() {
    let toy = Toy::new();
    let mut model = load(&toy, 2).unwrap();
    let (x, scale) = (x_data(), scale_data());
    let (y_expected, s_expected) = expected(&x, &scale);

    // Inputs and outputs one byte off their natural alignment are copied, not refused.
    let mut x_store = vec![0u8; N * 4 + 1];
    x_store[1..].copy_from_slice(&f32_bytes(&x));
    let scale_bytes: Vec<u8> = scale.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut y_store = vec![0u8; N * 4 + 1];
    let mut s_buf = vec![0u8; ROWS * 4];
    let inputs = [
        TensorRef::new("x", DType::F32, &X_SHAPE, &x_store[1..]),
        TensorRef::new("scale", DType::I32, &S_SHAPE, &scale_bytes),
    ];
    model.run_into(&inputs, &mut [&mut y_store[1..], &mut s_buf]).unwrap();
    assert_eq!(y_store[1..], f32_bytes(&y_expected));
    assert_eq!(s_buf, f32_bytes(&s_expected));

    let err = model.run_into(&inputs, &mut [&mut y_store[..8], &mut s_buf]).unwrap_err();
    assert_eq!(err.to_string(), "output \"y\" needs 4096 bytes, got 8");
    let err = model.run_into(&inputs, &mut [&mut s_buf]).unwrap_err();
    assert_eq!(err.to_string(), "the model takes 2 outputs, got 1");
}

#[test]
fn wrong_inputs_are_refused_by_name() {
    let toy = Toy::new();
    let mut model = load(&toy, 1).unwrap();
    let (x, scale) = (x_data(), scale_data());
    let xf = TensorRef::f32("x", &X_SHAPE, &x);
    let sc = TensorRef::i32("scale", &S_SHAPE, &scale);
    let mut model_err = |inputs: &[TensorRef]| model.run(inputs).unwrap_err().to_string();
    assert_eq!(model_err(&[xf]), "the model takes 2 inputs, got 1");
    assert_eq!(model_err(&[sc, xf]), "input 0 must be \"x\", got \"scale\"");
    let x_bytes = f32_bytes(&x);
    assert_eq!(
        model_err(&[TensorRef::new("x", DType::F64, &[ROWS as u64, 8], &x_bytes), sc]),
        "input \"x\" must be f32, got f64"
    );
    assert_eq!(
        model_err(&[TensorRef::f32("x", &[COLS as u64, ROWS as u64], &x), sc]),
        "input \"x\" must have shape [64, 16], got [16, 64]"
    );
    assert_eq!(
        model_err(&[TensorRef::f32("x", &X_SHAPE, &x[..10]), sc]),
        "input \"x\" needs 4096 bytes, got 40"
    );
}

#[test]
fn profile_has_one_entry_per_step() {
    let toy = Toy::new();
    let mut model = load(&toy, 2).unwrap();
    let (x, scale) = (x_data(), scale_data());
    let inputs = [TensorRef::f32("x", &X_SHAPE, &x), TensorRef::i32("scale", &S_SHAPE, &scale)];
    let (outputs, profile) = model.run_profiled(&inputs, 5).unwrap();
    assert_eq!(outputs[0].as_f32().unwrap(), expected(&x, &scale).0);
    let labels: Vec<&str> = profile.steps.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["k0 mul [64,16]", "k1 add [64,16]", "k2 out [64,16]", "k3 rowsum [64]"]);
    assert_eq!((profile.repeats, profile.threads, profile.arena_bytes), (5, 2, 8192));
    let shares: f64 = profile.steps.iter().map(|s| s.share).sum();
    assert!((shares - 1.0).abs() < 1e-9 || shares == 0.0, "{shares}");
    assert_eq!(profile.steps[2].flops, 2 * N as u64);
    let table = profile.to_string();
    for label in labels {
        assert!(table.contains(label), "{table}");
    }
    assert!(table.lines().any(|l| l.starts_with("total (steps)")), "{table}");
    let mut kinds: Vec<String> = profile.by_kind().into_iter().map(|k| k.kind).collect();
    kinds.sort();
    assert_eq!(kinds, ["add", "mul", "out", "rowsum"], "{table}");
    assert!(table.lines().any(|l| l.starts_with("by kind")), "{table}");
}

/// Kernels written in Rust, standing in for a JIT's engine.
struct RustKernels;

unsafe extern "C" fn scale_rows(bufs: *const *mut u8, begin: i64, end: i64) {
    // SAFETY: the manifest below passes [weight f32 [8], output f32 [8]]; chunks are disjoint.
    unsafe {
        let w = *bufs.add(0) as *const f32;
        let y = *bufs.add(1) as *mut f32;
        for i in begin as usize..end as usize {
            *y.add(i) = *w.add(i) * 3.0;
        }
    }
}

impl KernelSource for RustKernels {
    fn lookup(&self, symbol: &str) -> Option<KernelFn> {
        (symbol == "scale_rows").then_some(scale_rows as KernelFn)
    }
}

#[test]
fn from_parts_runs_in_memory_kernels_and_weights() {
    let mut manifest: Manifest = toy_manifest();
    manifest.inputs.clear();
    manifest.outputs = vec![kiln_runtime::TensorSpec { name: "y".into(), dtype: DType::F32, shape: vec![8] }];
    manifest.arena_bytes = 0;
    manifest.steps = vec![kiln_runtime::Step {
        symbol: "scale_rows".into(),
        label: "triple".into(),
        args: vec![BufRef::Weight { name: "w".into(), bytes: 32 }, BufRef::Output { index: 0 }],
        dispatch: kiln_runtime::Dispatch::Cpu { range: 8, grain: 1 },
        flops: 8,
        bytes: 64,
    }];
    let w: Vec<f32> = (0..8).map(|i| i as f32 - 2.5).collect();
    let weights = WeightStore::from_owned(vec![("w".into(), DType::F32, vec![8], f32_bytes(&w))]).unwrap();
    let mut model = Model::from_parts(
        manifest.clone(),
        Box::new(RustKernels),
        weights,
        &Options { threads: Some(3), ..Options::default() },
    )
    .unwrap();
    let out = model.run(&[]).unwrap();
    assert_eq!(out[0].as_f32().unwrap(), w.iter().map(|v| v * 3.0).collect::<Vec<_>>());

    manifest.steps[0].symbol = "nope".into();
    let weights = WeightStore::from_owned(vec![("w".into(), DType::F32, vec![8], f32_bytes(&w))]).unwrap();
    let err = Model::from_parts(manifest, Box::new(RustKernels), weights, &Options::default()).unwrap_err();
    assert_eq!(err.to_string(), "step \"triple\": symbol \"nope\" is not in the kernels");
}

#[test]
fn refuses_another_format_version() {
    let mut toy = Toy::new();
    toy.edit(|m| m.format_version = 7);
    assert_eq!(
        load_err(&toy),
        "artifact format version 7, this runtime reads version 3: recompile the model"
    );
}

#[test]
fn refuses_another_architecture() {
    let mut toy = Toy::new();
    let other = if std::env::consts::ARCH == "aarch64" { "x86_64" } else { "aarch64" };
    toy.edit(|m| cpu_target(m).triple = format!("{other}-unknown-linux-gnu"));
    let err = load_err(&toy);
    assert!(err.contains(&format!("architecture {other}")), "{err}");
    assert!(err.contains(&format!("this machine is {}", std::env::consts::ARCH)), "{err}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn refuses_missing_cpu_features() {
    if is_x86_feature_detected!("avx512f") {
        eprintln!("skipped: this CPU has AVX-512F, so no feature is missing");
        return;
    }
    let mut toy = Toy::new();
    toy.edit(|m| cpu_target(m).features = "+avx2,+fma,+avx512f".into());
    let err = load_err(&toy);
    assert!(err.contains("features this CPU lacks: avx512f"), "{err}");
}

#[test]
fn refuses_missing_and_corrupt_files() {
    let toy = Toy::new();
    std::fs::remove_file(toy.file(WEIGHTS_FILE)).unwrap();
    let err = load_err(&toy);
    assert!(err.contains("weights.safetensors is missing"), "{err}");

    let toy = Toy::new();
    std::fs::remove_file(toy.file(MANIFEST_FILE)).unwrap();
    assert!(load_err(&toy).contains("manifest.ron is missing"));

    // Truncated weights: the size check names the file.
    let toy = Toy::new();
    let bytes = std::fs::read(toy.file(WEIGHTS_FILE)).unwrap();
    std::fs::write(toy.file(WEIGHTS_FILE), &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&toy);
    assert!(
        err.starts_with(&format!(
            "weights.safetensors is {} bytes, the manifest says {}",
            bytes.len() - 100,
            bytes.len()
        )),
        "{err}"
    );

    // One flipped byte: the crc32 check names the file.
    let toy = Toy::new();
    let mut bytes = std::fs::read(toy.file(KERNELS_FILE)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(toy.file(KERNELS_FILE), &bytes).unwrap();
    let err = load_err(&toy);
    assert!(err.starts_with("kernels.so has crc32 0x") && err.contains("the file is corrupt"), "{err}");

    let mut toy = Toy::new();
    toy.edit(|m| m.files.retain(|f| f.name != KERNELS_FILE));
    assert_eq!(load_err(&toy), "the manifest records no size and crc32 for kernels.so: recompile the model");

    let mut toy = Toy::new();
    toy.edit(|m| m.files.push(kiln_runtime::FileDigest::of("../x.bin", b"")));
    assert_eq!(load_err(&toy), "invalid manifest: \"../x.bin\" in files is not a file name");

    let toy = Toy::new();
    std::fs::write(toy.file(MANIFEST_FILE), "(format_version: 1, model: )").unwrap();
    assert!(load_err(&toy).starts_with("manifest.ron is not a valid manifest: 1:"));
}

#[test]
fn refuses_weights_that_do_not_fit() {
    let mut toy = Toy::new();
    toy.edit(|m| m.steps[1].args[1] = BufRef::Weight { name: "bias".into(), bytes: 4096 });
    assert_eq!(
        load_err(&toy),
        "step \"k1 add [64,16]\" uses weight \"bias\", which the weights file does not hold"
    );

    let mut toy = Toy::new();
    toy.edit(|m| m.steps[0].args[1] = BufRef::Weight { name: "w".into(), bytes: 8192 });
    assert_eq!(
        load_err(&toy),
        "step \"k0 mul [64,16]\" expects weight \"w\" of 8192 bytes, the weights file holds 4096 bytes"
    );

    // A weights file that is not safetensors, with a matching digest: the parser's error.
    let mut toy = Toy::new();
    std::fs::write(toy.file(WEIGHTS_FILE), b"not a safetensors file").unwrap();
    toy.refresh_digests();
    assert!(load_err(&toy).starts_with("invalid weights ("), "{}", load_err(&toy));
}

#[test]
fn refuses_bad_buffer_references() {
    let mut toy = Toy::new();
    toy.edit(|m| m.steps[1].args[2] = BufRef::Arena { offset: 4096, bytes: 8192 });
    assert_eq!(
        load_err(&toy),
        "step \"k1 add [64,16]\" uses arena bytes 4096..12288, outside the arena (arena of 8192 bytes)"
    );
    let mut toy = Toy::new();
    toy.edit(|m| m.steps[1].args[2] = BufRef::Arena { offset: 100, bytes: 64 });
    assert!(load_err(&toy).contains("not 64-byte aligned"));

    let mut toy = Toy::new();
    toy.edit(|m| m.steps[3].args[1] = BufRef::Input { index: 2 });
    assert_eq!(load_err(&toy), "step \"k3 rowsum [64]\" uses input 2, but the model has 2 inputs");
    let mut toy = Toy::new();
    toy.edit(|m| m.steps[2].args[2] = BufRef::Output { index: 9 });
    assert_eq!(load_err(&toy), "step \"k2 out [64,16]\" uses output 9, but the model has 2 outputs");
}

#[test]
fn refuses_missing_symbols_and_bad_steps() {
    let mut toy = Toy::new();
    toy.edit(|m| m.steps[2].symbol = "k_gelu".into());
    assert_eq!(load_err(&toy), "step \"k2 out [64,16]\": symbol \"k_gelu\" is not in the kernels");

    let mut toy = Toy::new();
    toy.edit(|m| m.steps[0].dispatch = Dispatch::Cpu { range: 64, grain: 0 });
    assert!(load_err(&toy).contains("grain 0"));

    let mut toy = Toy::new();
    toy.edit(|m| m.outputs[1].name = "y".into());
    assert_eq!(load_err(&toy), "invalid manifest: two outputs are named \"y\"");

    let toy = Toy::new();
    let err = Model::load_with(toy.path(), &Options { threads: Some(0), ..Options::default() }).unwrap_err();
    assert_eq!(err.to_string(), "Options::threads must be at least 1");
}

#[test]
fn model_is_usable_from_another_thread() {
    let toy = Toy::new();
    let mut model = load(&toy, 2).unwrap();
    let (x, scale) = (x_data(), scale_data());
    let got = std::thread::spawn(move || run_toy(&mut model, &x, &scale).unwrap()).join().unwrap();
    assert_eq!(got, expected(&x_data(), &scale_data()));
}

/// The CPU target of a toy manifest.
fn cpu_target(m: &mut Manifest) -> &mut kiln_runtime::TargetInfo {
    match &mut m.target {
        kiln_runtime::Target::Cpu(cpu) => cpu,
        other => panic!("the toy artifact is a CPU one, not {other:?}"),
    }
}
