//! Loading and running real artifacts: exact results, threading, profiles, the JIT path, and
//! every refusal the loader and `run` promise.

mod common;

use common::*;
use kiln_runtime::{
    BufRef, DType, Dim, Dispatch, KernelFn, KernelSource, Manifest, Model, Options, RuntimeError, TensorRef,
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

    // The kernels are loaded from the file (not from the checked in-memory copy `load` uses),
    // so that the counter below reads the same instance of the library as the model's.
    let kernels_path = toy.file(KERNELS_FILE);
    let by_path = |manifest: &Manifest| {
        // SAFETY: the toy's own kernels.so.
        let kernels = unsafe { kiln_runtime::SharedLibrary::open(&kernels_path) }.unwrap();
        let weights = WeightStore::open(toy.file(WEIGHTS_FILE)).unwrap();
        let options = Options { threads: Some(2), ..Options::default() };
        Model::from_parts(manifest.clone(), Box::new(kernels), weights, &options).unwrap()
    };
    let mut model = by_path(&toy.manifest);
    assert_eq!(model.threads(), 2);
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
    let mut manifest = toy.manifest.clone();
    manifest.steps.iter_mut().for_each(|s| {
        if let Dispatch::Cpu { grain, .. } = &mut s.dispatch {
            *grain = 64;
        }
    });
    let mut model = by_path(&manifest);
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

unsafe extern "C" fn scale_rows(bufs: *const *mut u8, _syms: *const i64, begin: i64, end: i64) {
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
        (symbol == "kiln_k0").then_some(scale_rows as KernelFn)
    }
}

#[test]
fn from_parts_runs_in_memory_kernels_and_weights() {
    let mut manifest: Manifest = toy_manifest();
    manifest.inputs.clear();
    manifest.outputs = vec![kiln_runtime::TensorSpec::fixed("y", DType::F32, &[8])];
    manifest.arena_bytes = 0;
    manifest.steps = vec![kiln_runtime::Step {
        symbol: "kiln_k0".into(),
        label: "k0 triple".into(),
        args: vec![BufRef::Weight { name: "w".into(), bytes: 32 }, BufRef::Output { index: 0 }],
        dispatch: kiln_runtime::Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(8), grain: 1 },
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

    manifest.steps[0].symbol = "kiln_k7".into();
    let weights = WeightStore::from_owned(vec![("w".into(), DType::F32, vec![8], f32_bytes(&w))]).unwrap();
    let err = Model::from_parts(manifest, Box::new(RustKernels), weights, &Options::default()).unwrap_err();
    assert_eq!(err.to_string(), "step \"k0 triple\": symbol \"kiln_k7\" is not in the kernels");
}

#[test]
fn refuses_another_format_version() {
    let mut toy = Toy::new();
    toy.edit(|m| m.format_version = 8);
    assert_eq!(
        load_err(&toy),
        "artifact format version 8, this runtime reads version 7: recompile the model"
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
    let body = "(format_version: 7, model: )\n";
    let text = format!("{body}// crc32: {:08x}\n", crc32fast::hash(body.as_bytes()));
    std::fs::write(toy.file(MANIFEST_FILE), text).unwrap();
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
    toy.edit(|m| m.steps[2].symbol = "kiln_k9".into());
    assert_eq!(load_err(&toy), "step \"k2 out [64,16]\": symbol \"kiln_k9\" is not in the kernels");
    // Only kernel entries of the compiler's form are looked up: never a libc function.
    for symbol in ["abort", "exit", "free", "kiln_contract", "kiln_k", "kiln_k1x"] {
        let mut toy = Toy::new();
        toy.edit(|m| m.steps[2].symbol = symbol.into());
        assert_eq!(
            load_err(&toy),
            format!(
                "invalid manifest: step \"k2 out [64,16]\" names symbol {symbol:?}, which is not a kernel entry (kiln_k<N>)"
            )
        );
    }

    let mut toy = Toy::new();
    toy.edit(|m| m.steps[0].dispatch = Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(64), grain: 0 });
    assert!(load_err(&toy).contains("grain 0"));

    let mut toy = Toy::new();
    toy.edit(|m| m.outputs[1].name = "y".into());
    assert_eq!(load_err(&toy), "invalid manifest: two outputs are named \"y\"");

    // A CPU kernel takes the symbol values as its `syms` argument, never as a buffer.
    let mut toy = Toy::custom(dynamic_manifest(), DYNAMIC_C);
    toy.edit(|m| m.steps[0].args.push(BufRef::Symbols));
    assert_eq!(
        load_err(&toy),
        format!(
            "invalid manifest: step {:?} passes the symbol values as a buffer, but a CPU kernel takes them as its `syms` argument",
            toy.manifest.steps[0].label
        )
    );

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

#[test]
fn the_manifest_is_covered_by_its_digest_line() {
    let toy = Toy::new();
    let text = std::fs::read_to_string(toy.file(MANIFEST_FILE)).unwrap();
    let last = text.lines().last().unwrap();
    assert!(last.starts_with("// crc32: ") && last.len() == 18, "{last}");

    // One edited number, digest left as it was.
    let edited = text.replacen("arena_bytes: 8192", "arena_bytes: 8193", 1);
    assert_ne!(edited, text);
    std::fs::write(toy.file(MANIFEST_FILE), &edited).unwrap();
    let err = load_err(&toy);
    assert!(
        err.starts_with("manifest.ron is damaged: its text has crc32 0x")
            && err.ends_with("it was edited or damaged; recompile or copy the artifact again"),
        "{err}"
    );
    // No digest line, a malformed one, or bytes after it.
    let body = text.rsplit_once("// crc32:").unwrap().0.to_string();
    let no_line =
        "manifest.ron is damaged: its last line is not the digest `// crc32: xxxxxxxx` the compiler \
                   writes; recompile or copy the artifact again";
    for damaged in
        [body.clone(), format!("{body}// crc32: 0x12\n"), format!("{text}\n"), format!("{text}()\n")]
    {
        std::fs::write(toy.file(MANIFEST_FILE), damaged).unwrap();
        assert_eq!(load_err(&toy), no_line);
    }
    // A manifest of an older format, which had no digest line, is refused by its version.
    std::fs::write(toy.file(MANIFEST_FILE), body.replacen("format_version: 7", "format_version: 4", 1))
        .unwrap();
    assert_eq!(
        load_err(&toy),
        "artifact format version 4, this runtime reads version 7: recompile the model"
    );
}

#[test]
fn a_manifest_the_kernels_were_not_compiled_for_is_refused() {
    // Each edit passes every structural check: only the contract can tell.
    type Edit = (&'static str, fn(&mut Manifest));
    let edits: [Edit; 6] = [
        ("range", |m| m.steps[0].dispatch = Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(63), grain: 4 }),
        ("shape", |m| m.inputs[1].shape = vec![Dim::Fixed(32)]),
        ("arena offset", |m| m.steps[1].args[2] = BufRef::Arena { offset: 64, bytes: 4096 }),
        ("swapped symbols", |m| m.steps.swap(0, 1)),
        ("swapped arguments", |m| m.steps[1].args.swap(0, 1)),
        ("profile numbers", |m| m.steps[3].flops += 1),
    ];
    for (what, edit) in edits {
        let mut toy = Toy::new();
        toy.edit(|m| {
            edit(m);
            // Keep the labels in order, so the step-order check does not fire first.
            for (i, s) in m.steps.iter_mut().enumerate() {
                let rest = s.label.split_once(' ').map_or("", |(_, r)| r).to_string();
                s.label = format!("k{i} {rest}");
            }
        });
        let err = load_err(&toy);
        assert!(
            err.starts_with("manifest.ron does not describe the kernels in kernels.so (contract digest ")
                && err.ends_with("the manifest was edited or belongs to another build; recompile the model"),
            "{what}: {err}"
        );
    }
    // Kernels that carry no contract at all.
    let dir = tempfile::tempdir().unwrap();
    let so = dir.path().join(KERNELS_FILE);
    compile_shared(KERNELS_C, &so);
    let mut toy = Toy::new();
    std::fs::copy(&so, toy.file(KERNELS_FILE)).unwrap();
    toy.refresh_digests();
    assert_eq!(
        load_err(&toy),
        "manifest.ron does not describe the kernels in kernels.so (kernels.so exports no kiln_contract): the \
         manifest was edited or belongs to another build; recompile the model"
    );
}

#[test]
fn steps_out_of_order_and_truncated_kernels_are_refused() {
    let mut toy = Toy::new();
    toy.edit(|m| m.steps.swap(1, 2));
    assert_eq!(
        load_err(&toy),
        "invalid manifest: step 1 is labelled \"k2 out [64,16]\", not \"k1 …\": the steps are out of order or \
         were edited"
    );
    // A truncated kernels.so whose digest was updated to match: the loader reads it once into
    // memory, so the dynamic loader refuses it with a message (never SIGBUS).
    let mut toy = Toy::new();
    let bytes = std::fs::read(toy.file(KERNELS_FILE)).unwrap();
    std::fs::write(toy.file(KERNELS_FILE), &bytes[..bytes.len() / 3]).unwrap();
    toy.refresh_digests();
    let err = load_err(&toy);
    assert!(
        err.starts_with(&format!(
            "cannot load {}: not a whole shared object: segment ",
            toy.file(KERNELS_FILE).display()
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!(
            "extends past the end of the file ({} bytes): it is truncated",
            bytes.len() / 3
        )),
        "{err}"
    );
    // Not an ELF file at all.
    let mut toy = Toy::new();
    std::fs::write(toy.file(KERNELS_FILE), b"#!/bin/sh\nexit 1\n").unwrap();
    toy.refresh_digests();
    assert_eq!(
        load_err(&toy),
        format!(
            "cannot load {}: not a whole shared object: it is not a 64-bit little-endian ELF file",
            toy.file(KERNELS_FILE).display()
        )
    );
}

#[test]
fn tensor_names_that_are_not_plain_file_names_are_refused() {
    for (name, problem) in [
        ("../x", "contains a path separator"),
        ("/etc/passwd", "contains a path separator"),
        ("..", "is a relative directory"),
        ("", "is empty"),
        ("a\0b", "contains a NUL character"),
        ("a\nb", "contains a control character"),
        ("a\u{202E}b", "contains a bidirectional-text control character"),
    ] {
        let mut toy = Toy::new();
        toy.edit(|m| m.outputs[0].name = name.into());
        assert_eq!(load_err(&toy), format!("invalid manifest: output name {name:?} {problem}"));
        let mut toy = Toy::new();
        toy.edit(|m| m.inputs[1].name = name.into());
        assert_eq!(load_err(&toy), format!("invalid manifest: input name {name:?} {problem}"));
    }
}

#[test]
fn index_inputs_outside_their_table_are_refused_before_any_kernel_runs() {
    // `scale` (i32 [64]) given an index bound of 3, loaded in memory (no contract to match).
    let toy = Toy::new();
    let mut manifest = toy.manifest.clone();
    manifest.index_bounds = vec![None, Some(3)];
    let load_bounded = |manifest: &Manifest| {
        // SAFETY: the toy's own kernels.so.
        let kernels = unsafe { kiln_runtime::SharedLibrary::open(toy.file(KERNELS_FILE)) }.unwrap();
        let weights = WeightStore::open(toy.file(WEIGHTS_FILE)).unwrap();
        Model::from_parts(manifest.clone(), Box::new(kernels), weights, &Options::default())
    };
    let mut model = load_bounded(&manifest).unwrap();
    let x = x_data();
    let scale: Vec<i32> = (0..ROWS as i32).map(|i| i % 3).collect();
    assert_eq!(run_toy(&mut model, &x, &scale).unwrap(), expected(&x, &scale));
    for (at, bad) in [(5usize, 3i32), (9, -1), (63, i32::MIN)] {
        let mut scale = scale.clone();
        scale[at] = bad;
        let err = run_toy(&mut model, &x, &scale).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "input \"scale\": gather index {bad} at position [{at}] of the indices is out of range for a \
                 table of extent 3"
            )
        );
    }
    // A bound on a float input cannot come from the compiler.
    manifest.index_bounds = vec![Some(3), None];
    assert_eq!(
        load_bounded(&manifest).unwrap_err().to_string(),
        "invalid manifest: input \"x\" has an index bound but dtype f32 (gather indices are i32 or i64)"
    );
}

/// Random edits of the toy manifest (numbers, names, symbols, shapes, offsets, step order,
/// dtypes), each written with a fresh digest line as a careful forger would: every load either
/// fails with an error or runs and gives exactly the unedited results. Each case runs in this
/// process, so a crash fails the test binary. Deterministic (a fixed LCG), 150 cases.
#[test]
fn mutated_toy_manifests_load_and_run_correctly_or_are_refused() {
    let (x, scale) = (x_data(), scale_data());
    let want = expected(&x, &scale);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |n: usize| {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((rng >> 33) as usize) % n.max(1)
    };
    let base = Toy::new();
    let (mut refused, mut ran) = (0, 0);
    for case in 0..150 {
        let mut m = base.manifest.clone();
        mutate(&mut m, &mut next);
        let text = m.to_ron().unwrap();
        std::fs::write(base.file(MANIFEST_FILE), text).unwrap();
        match load(&base, 1) {
            Err(e) => {
                assert!(!e.to_string().is_empty(), "case {case}");
                refused += 1;
            }
            Ok(mut model) => {
                assert_eq!(run_toy(&mut model, &x, &scale).unwrap(), want, "case {case}: {m:?}");
                ran += 1;
            }
        }
    }
    assert!(refused > 120, "{refused} refused, {ran} ran");
}

/// One random edit of `m` (see the test above).
fn mutate(m: &mut Manifest, next: &mut impl FnMut(usize) -> usize) {
    const NUMBERS: [u64; 9] = [0, 1, 3, 63, 64, 4096, 8192, u32::MAX as u64, u64::MAX];
    let number = |next: &mut dyn FnMut(usize) -> usize, old: u64| match next(3) {
        0 => NUMBERS[next(NUMBERS.len())],
        1 => old.wrapping_add(1),
        _ => old.wrapping_sub(64),
    };
    let s = next(m.steps.len());
    match next(14) {
        0 => m.arena_bytes = number(next, m.arena_bytes),
        1 => {
            let i = next(m.inputs.len());
            let d = next(m.inputs[i].shape.len());
            m.inputs[i].shape[d] = Dim::Fixed(number(next, m.inputs[i].shape[d].fixed().unwrap_or(0)));
        }
        2 => {
            let o = next(m.outputs.len());
            m.outputs[o].shape.push(Dim::Fixed(1 + next(3) as u64));
        }
        3 => {
            let a = next(m.steps[s].args.len());
            m.steps[s].args[a] = match m.steps[s].args[a].clone() {
                BufRef::Arena { offset, bytes } => {
                    if next(2) == 0 {
                        BufRef::Arena { offset: number(next, offset), bytes }
                    } else {
                        BufRef::Arena { offset, bytes: number(next, bytes) }
                    }
                }
                BufRef::Weight { name, bytes } => BufRef::Weight { name, bytes: number(next, bytes) },
                BufRef::Input { index } => BufRef::Input { index: number(next, u64::from(index)) as u32 },
                BufRef::Output { index } => BufRef::Output { index: number(next, u64::from(index)) as u32 },
                BufRef::Symbols => BufRef::Input { index: number(next, 0) as u32 },
            }
        }
        4 => {
            if let Dispatch::Cpu { range, grain } = m.steps[s].dispatch.clone() {
                m.steps[s].dispatch = if next(2) == 0 {
                    Dispatch::Cpu { range: Dim::Fixed(number(next, range.fixed().unwrap_or(0))), grain }
                } else {
                    Dispatch::Cpu { range, grain: number(next, grain) }
                };
            }
        }
        5 => {
            m.steps[s].symbol =
                ["abort", "exit", "free", "kiln_k0", "kiln_k3", "kiln_k99", "kiln_contract"][next(7)].into()
        }
        6 => {
            let other = next(m.steps.len());
            m.steps.swap(s, other);
        }
        7 => {
            let other = next(m.steps.len());
            let labels: Vec<String> = m.steps.iter().map(|st| st.label.clone()).collect();
            m.steps.swap(s, other);
            for (st, label) in m.steps.iter_mut().zip(labels) {
                st.label = label;
            }
        }
        8 => {
            let i = next(m.inputs.len());
            m.inputs[i].dtype = DType::ALL[next(DType::ALL.len())];
        }
        9 => {
            let names = ["../y", "/tmp/y", "y", "s", "x", "scale", "a\u{0}b", "a\u{202E}b"];
            let name = names[next(names.len())].to_string();
            if next(2) == 0 {
                m.outputs[next(2)].name = name;
            } else {
                m.inputs[next(2)].name = name;
            }
        }
        10 => {
            let a = next(m.steps[s].args.len());
            m.steps[s].args.remove(a);
        }
        11 => {
            let a = next(m.steps[s].args.len());
            let b = next(m.steps[s].args.len());
            m.steps[s].args.swap(a, b);
        }
        12 => m.index_bounds = vec![None, Some(number(next, 3))],
        _ => {
            let f = next(m.files.len());
            m.files[f].bytes = number(next, m.files[f].bytes);
        }
    }
}

#[test]
fn a_manifest_larger_than_any_manifest_is_refused_before_it_is_read_whole() {
    let toy = Toy::new();
    let file = std::fs::File::create(toy.file(MANIFEST_FILE)).unwrap();
    file.set_len((64 << 20) + 1).unwrap();
    assert_eq!(
        load_err(&toy),
        "manifest.ron is damaged: it is larger than 67108864 bytes, which no manifest is; recompile or copy the \
         artifact again"
    );
}

/// A kernel dividing `a` by `b` (i32 [64]) into `q` that records a zero divisor in the fault
/// words (its last argument) as compiled kernels do: atomic minimums of the element and site.
const DIVIDE_C: &str = r#"
#include <stdint.h>

static void min_u32(uint32_t *p, uint32_t v) {
    uint32_t old = __atomic_load_n(p, __ATOMIC_RELAXED);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
}

void kiln_k0(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const int32_t *a = b[0], *d = b[1];
    int32_t *q = b[2];
    uint32_t *faults = b[3];
    for (int64_t i = begin; i < end; i++) {
        if (d[i] == 0) {
            min_u32(&faults[1], (uint32_t)i);
            min_u32(&faults[0], 0);
            q[i] = 0;
        } else {
            q[i] = a[i] / d[i];
        }
    }
}
"#;

/// One integer division of two i32 [64] inputs, with its fault site.
fn divide_manifest() -> Manifest {
    let spec = |name: &str| kiln_runtime::TensorSpec::fixed(name, DType::I32, &[64]);
    Manifest {
        inputs: vec![spec("a"), spec("b")],
        outputs: vec![spec("q")],
        arena_bytes: 8,
        steps: vec![kiln_runtime::Step {
            symbol: "kiln_k0".into(),
            label: "k0 div [64]".into(),
            args: vec![
                BufRef::Input { index: 0 },
                BufRef::Input { index: 1 },
                BufRef::Output { index: 0 },
                BufRef::Arena { offset: 0, bytes: 8 },
            ],
            dispatch: Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(64), grain: 4 },
            flops: 64,
            bytes: 768,
        }],
        faults: Some(kiln_runtime::Faults {
            offset: 0,
            sites: vec![kiln_runtime::FaultSite {
                kind: kiln_runtime::FaultKind::IntDivByZero,
                step: 0,
                op: "div".into(),
                name: Some("q".into()),
                origin: Some("m.ron:3:17".into()),
                shape: vec![64],
                divisor: vec![64],
            }],
        }),
        ..toy_manifest()
    }
}

/// [`divide_manifest`] with a second entry point, `again`, of the same steps and its own fault
/// table (the same words: entry points never run at the same time).
fn divide_manifest_with_entry() -> Manifest {
    let mut m = divide_manifest();
    m.entries.push(kiln_runtime::Entry {
        name: "again".into(),
        inputs: m.inputs.clone(),
        index_bounds: m.index_bounds.clone(),
        outputs: m.outputs.clone(),
        steps: m.steps.clone(),
        faults: m.faults.clone(),
    });
    m
}

/// Each entry point's run fills and reads its own fault words: a fault in `again` fails that
/// run with the interpreter's words, and `forward` then runs clean.
#[test]
fn a_fault_in_any_entry_point_fails_its_run() {
    let toy = Toy::custom(divide_manifest_with_entry(), DIVIDE_C);
    let mut model = load(&toy, 2).unwrap();
    let a: Vec<i32> = (0..64).map(|i| 100 - 7 * i).collect();
    let good = vec![3i32; 64];
    let mut bad = good.clone();
    bad[5] = 0;
    fn inputs<'a>(a: &'a [i32], b: &'a [i32]) -> [TensorRef<'a>; 2] {
        [TensorRef::i32("a", &[64], a), TensorRef::i32("b", &[64], b)]
    }
    assert_eq!(
        model.run_entry("again", &inputs(&a, &bad)).unwrap_err().to_string(),
        "step \"k0 div [64]\" (div `q` at m.ron:3:17): integer division by zero (divisor element [5])"
    );
    let want: Vec<i32> = a.iter().map(|x| x / 3).collect();
    assert_eq!(model.run(&inputs(&a, &good)).unwrap()[0].as_i32().unwrap(), want);
    assert_eq!(model.run_entry("again", &inputs(&a, &good)).unwrap()[0].as_i32().unwrap(), want);
}

#[test]
fn faults_recorded_by_a_kernel_fail_the_run_and_the_next_run_is_clean() {
    let toy = Toy::custom(divide_manifest(), DIVIDE_C);
    let mut model = load(&toy, 4).unwrap();
    let a: Vec<i32> = (0..64).map(|i| 100 - 7 * i).collect();
    let good: Vec<i32> = (0..64).map(|i| if i % 2 == 0 { 3 } else { -5 }).collect();
    let mut bad = good.clone();
    bad[41] = 0;
    bad[17] = 0;
    let mut run = |b: &[i32]| {
        model
            .run(&[TensorRef::i32("a", &[64], &a), TensorRef::i32("b", &[64], b)])
            .map(|o| o[0].as_i32().unwrap().to_vec())
    };
    let want: Vec<i32> = a.iter().zip(&good).map(|(x, y)| x / y).collect();
    assert_eq!(run(&good).unwrap(), want);
    for _ in 0..3 {
        let err = run(&bad).unwrap_err().to_string();
        assert_eq!(
            err,
            "step \"k0 div [64]\" (div `q` at m.ron:3:17): integer division by zero (divisor element [17])"
        );
        assert_eq!(run(&good).unwrap(), want);
    }
}

/// An edit of a manifest.
type Edit = dyn Fn(&mut Manifest);

#[test]
fn fault_tables_are_checked_at_load() {
    let refused = |edit: &Edit| {
        let mut m = divide_manifest();
        edit(&mut m);
        let toy = Toy::custom(m, DIVIDE_C);
        load_err(&toy)
    };
    fn site(m: &mut Manifest) -> &mut kiln_runtime::FaultSite {
        &mut m.faults.as_mut().unwrap().sites[0]
    }
    let cases: [(&Edit, &str); 9] = [
        (&|m| m.faults.as_mut().unwrap().sites.clear(), "fault table of `forward`: 0 sites (the compiler lists 1 to 1048576)"),
        (&|m| m.faults.as_mut().unwrap().offset = 4, "fault table of `forward`: its 8 bytes at 4 lie outside the arena of 8 bytes"),
        (
            &|m| {
                m.arena_bytes = 16;
                m.faults.as_mut().unwrap().offset = 2;
            },
            "fault table of `forward`: its words start at byte 2, not a multiple of 4",
        ),
        (&|m| site(m).step = 1, "fault table of `forward`: site 0 names step 1 (of 1; sites are listed in step order)"),
        (&|m| site(m).divisor = vec![2, 64], "fault table of `forward`: site 0 has divisor shape [2, 64] that does not broadcast to [64]"),
        (&|m| site(m).shape = vec![u64::MAX, 2], "fault table of `forward`: site 0 has shape [18446744073709551615, 2] whose size overflows"),
        (
            &|m| site(m).name = Some("q\u{202E}".into()),
            "fault table of `forward`: site 0 has a name or position that is not plain text: \"q\\u{202e}\"",
        ),
        (
            &|m| {
                m.steps[0].args.pop();
            },
            "fault table of `forward`: step \"k0 div [64]\" holds a fault site, but its last argument is not the fault words (arena bytes 0..8)",
        ),
        (
            &|m| {
                m.arena_bytes = 16;
                m.steps[0].args[2] = BufRef::Arena { offset: 4, bytes: 8 };
            },
            "fault table of `forward`: step \"k0 div [64]\" argument 2 (arena bytes 4..12) overlaps the fault words",
        ),
    ];
    for (edit, words) in cases {
        assert_eq!(refused(edit), format!("invalid manifest: {words}"));
    }
    // Every entry point's table is checked against its own steps.
    let mut m = divide_manifest_with_entry();
    m.entries[0].faults.as_mut().unwrap().sites[0].step = 1;
    assert_eq!(
        load_err(&Toy::custom(m, DIVIDE_C)),
        "invalid manifest: fault table of `again`: site 0 names step 1 (of 1; sites are listed in step order)"
    );
}

fn run_rows(model: &mut Model, rows: usize) -> Result<(Vec<f32>, Vec<f32>), RuntimeError> {
    let x = &x_data()[..rows * COLS];
    let shape = [rows as u64, COLS as u64];
    let out = model.run(&[TensorRef::f32("x", &shape, x)])?;
    assert_eq!(out[0].shape(), &shape[..]);
    assert_eq!(out[1].shape(), &[rows as u64][..]);
    Ok((out[0].as_f32().expect("f32").to_vec(), out[1].to_f32_vec()))
}

#[test]
fn a_model_with_symbols_runs_at_every_size_within_its_bounds() {
    let toy = Toy::custom(dynamic_manifest(), DYNAMIC_C);
    for threads in [1, 2] {
        let mut model = load(&toy, threads).unwrap();
        assert_eq!(model.symbols()[0].name, "rows");
        // 1, a size below and at the hint, an odd one, and the maximum; the same model, one
        // after another, reusing its arena.
        for rows in [1, 7, 8, 33, ROWS, 2] {
            let x = &x_data()[..rows * COLS];
            assert_eq!(run_rows(&mut model, rows).unwrap(), dynamic_expected(x, rows), "{rows} rows");
        }
        // Caller buffers are sized at the shapes the inputs bind.
        let (x, shape) = (&x_data()[..3 * COLS], [3u64, COLS as u64]);
        let inputs = [TensorRef::f32("x", &shape, x)];
        let shapes = model.output_shapes("forward", &inputs).unwrap();
        assert_eq!(shapes, [vec![3, COLS as u64], vec![3]]);
        let (mut y, mut s) = (vec![0u8; 3 * COLS * 4], vec![0u8; 3 * 4]);
        model.run_into(&inputs, &mut [&mut y, &mut s]).unwrap();
        let (ey, es) = dynamic_expected(x, 3);
        assert_eq!((y, s), (f32_bytes(&ey), f32_bytes(&es)));
        let mut short = vec![0u8; 4 * COLS * 4];
        let err = model.run_into(&inputs, &mut [&mut short, &mut [0u8; 12]]).unwrap_err();
        assert_eq!(err.to_string(), "output \"y\" needs 192 bytes, got 256");
    }
}

#[test]
fn a_model_with_symbols_refuses_shapes_outside_its_bounds_by_input_and_axis() {
    let toy = Toy::custom(dynamic_manifest(), DYNAMIC_C);
    let mut model = load(&toy, 1).unwrap();
    let x = vec![0.5f32; (ROWS + 1) * COLS];
    let run = |model: &mut Model, shape: &[u64]| {
        let n = shape.iter().product::<u64>() as usize;
        model.run(&[TensorRef::f32("x", shape, &x[..n])]).unwrap_err().to_string()
    };
    assert_eq!(run(&mut model, &[65, 16]), "input `x` axis 0 is 65, but `rows` is at most 64");
    assert_eq!(run(&mut model, &[0, 16]), "input `x` axis 0 is 0, but `rows` is at least 1");
    assert_eq!(run(&mut model, &[8, 15]), "input `x` axis 1 is 15, but it is fixed at 16");
    assert_eq!(run(&mut model, &[8]), "input \"x\" must have shape [rows, 16], got [8]");
    // A buffer that does not hold the shape it claims.
    let err = model.run(&[TensorRef::f32("x", &[8, 16], &x[..100])]).unwrap_err();
    assert_eq!(err.to_string(), "input \"x\" needs 512 bytes, got 400");
    // The refusals left the model as it was.
    assert_eq!(run_rows(&mut model, 5).unwrap(), dynamic_expected(&x_data()[..5 * COLS], 5));
}

#[test]
fn a_manifest_whose_symbols_cannot_be_bound_is_refused_at_load() {
    type Case = (&'static str, fn(&mut Manifest), &'static str);
    let cases: [Case; 4] = [
        (
            "unbound",
            |m| {
                m.symbols.push(kiln_runtime::SymbolSpec {
                    name: "cols".into(),
                    min: 1,
                    max: 4,
                    hint: 2,
                    multiple_of: 1,
                });
                m.outputs[1].shape = vec![Dim::Size(vec![kiln_runtime::SizeTerm {
                    coeff: 1,
                    factors: vec![kiln_runtime::SizeFactor::Sym(1)],
                }])];
            },
            "invalid manifest: entry point \"forward\" reads symbol \"cols\", but no axis of its inputs is exactly it, so no run could bind it",
        ),
        (
            "undeclared",
            |m| m.symbols.clear(),
            "invalid manifest: entry point \"forward\" reads symbol 0, but the manifest declares 0",
        ),
        (
            "bounds",
            |m| m.symbols[0].hint = 80,
            "invalid manifest: symbol \"rows\" has bounds min 1 ≤ hint 80 ≤ max 64 (multiple of 1) that do not hold or do not fit i64",
        ),
        (
            "too large",
            |m| m.symbols[0].max = 1 << 62,
            "invalid manifest: input \"x\" of shape [rows, 16] is too large for this machine",
        ),
    ];
    for (what, edit, expected) in cases {
        let mut toy = Toy::custom(dynamic_manifest(), DYNAMIC_C);
        toy.edit(edit);
        assert_eq!(load_err(&toy), expected, "{what}");
    }
}
