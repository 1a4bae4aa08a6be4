//! The C ABI, called in-process and from a real C program (`examples/c/run_model.c` compiled
//! with `cc` against `libkiln_runtime.so`), on the CPU and on a Vulkan device, and the
//! `run_artifact` example binary.

mod common;

use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::gpu::{chain_expected, r_data, GpuArtifact};
use common::*;
use kiln_runtime::capi::*;
use kiln_runtime::WEIGHTS_FILE;

fn last_error() -> String {
    // SAFETY: kiln_last_error always returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(kiln_last_error()) }.to_string_lossy().into_owned()
}

fn c_str(p: *const std::ffi::c_char) -> String {
    assert!(!p.is_null(), "NULL string: {}", last_error());
    // SAFETY: non-NULL strings from the C API are NUL-terminated and live while the model does.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[test]
fn c_abi_round_trip() {
    let toy = Toy::new();
    let dir = CString::new(toy.path().to_str().unwrap()).unwrap();
    // SAFETY: every pointer below comes from the API or from live Rust buffers of the sizes the
    // API reports; the model is freed once, at the end.
    unsafe {
        let model = kiln_model_load_with_threads(dir.as_ptr(), 2);
        assert!(!model.is_null(), "{}", last_error());
        assert_eq!((kiln_model_input_count(model), kiln_model_output_count(model)), (2, 2));
        assert_eq!(c_str(kiln_model_input_name(model, 1)), "scale");
        assert_eq!(c_str(kiln_model_input_dtype(model, 1)), "i32");
        assert_eq!(c_str(kiln_model_output_name(model, 0)), "y");
        assert_eq!(c_str(kiln_model_output_dtype(model, 1)), "f32");
        let mut rank = 0usize;
        let shape = kiln_model_input_shape(model, 0, &mut rank);
        assert_eq!(std::slice::from_raw_parts(shape, rank), &[ROWS as i64, COLS as i64]);
        let shape = kiln_model_output_shape(model, 1, &mut rank);
        assert_eq!(std::slice::from_raw_parts(shape, rank), &[ROWS as i64]);
        assert_eq!(kiln_model_input_bytes(model, 0), N * 4);
        assert_eq!(kiln_model_output_bytes(model, 0), N * 4);
        assert_eq!(kiln_model_output_bytes(model, 1), ROWS * 4);
        assert!(kiln_model_input_name(model, 2).is_null());
        assert_eq!(last_error(), "input 2 does not exist: the model has 2 inputs");
        assert!(kiln_model_output_shape(model, 5, &mut rank).is_null());

        let (x, scale) = (x_data(), scale_data());
        let mut y = vec![0f32; N];
        let mut s = vec![0f32; ROWS];
        let inputs = [x.as_ptr() as *const c_void, scale.as_ptr() as *const c_void];
        let outputs = [y.as_mut_ptr() as *mut c_void, s.as_mut_ptr() as *mut c_void];
        assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0, "{}", last_error());
        assert_eq!((y, s), expected(&x, &scale));

        let bad_inputs = [x.as_ptr() as *const c_void, std::ptr::null()];
        assert_ne!(kiln_model_run(model, bad_inputs.as_ptr(), outputs.as_ptr()), 0);
        assert_eq!(last_error(), "inputs[1] is NULL");
        assert_ne!(kiln_model_run(model, std::ptr::null(), outputs.as_ptr()), 0);
        assert_eq!(last_error(), "inputs is NULL, the model has 2");
        kiln_model_free(model);

        std::fs::remove_file(toy.file(WEIGHTS_FILE)).unwrap();
        assert!(kiln_model_load(dir.as_ptr()).is_null());
        assert!(last_error().contains("weights.safetensors is missing"), "{}", last_error());
    }
}

#[test]
fn c_abi_lists_and_selects_devices() {
    let count = kiln_device_count();
    assert!(count >= 1);
    assert_eq!(c_str(kiln_device_name(0)), "cpu");
    assert!(c_str(kiln_device_description(0)).starts_with("cpu  host CPU, "));
    assert!(kiln_device_name(count).is_null());
    assert_eq!(last_error(), format!("device {count} does not exist: this machine has {count} devices"));
    assert!(kiln_device_description(count).is_null());
    // The Vulkan devices follow the CPU, the CUDA devices follow them; of each kind, either
    // devices are listed or the reason why none is.
    let names: Vec<String> = (1..count).map(|i| c_str(kiln_device_name(i))).collect();
    let vulkan = names.iter().take_while(|n| n.starts_with("vulkan:")).count();
    let cuda = names.len() - vulkan;
    for (kind, listed, reason) in [
        ("vulkan", vulkan, c_str(kiln_vulkan_unavailable_reason())),
        ("cuda", cuda, c_str(kiln_cuda_unavailable_reason())),
    ] {
        assert_eq!(listed == 0, !reason.is_empty(), "{listed} {kind} devices, reason {reason:?}");
    }
    for (i, name) in names.iter().enumerate() {
        let expected = if i < vulkan { format!("vulkan:{i}") } else { format!("cuda:{}", i - vulkan) };
        assert_eq!(*name, expected);
        assert!(c_str(kiln_device_description(i + 1)).starts_with(&format!("{expected}  ")));
    }

    let toy = Toy::new();
    let dir = CString::new(toy.path().to_str().unwrap()).unwrap();
    let (x, scale) = (x_data(), scale_data());
    let mut y = vec![0f32; N];
    let mut s = vec![0f32; ROWS];
    // SAFETY: valid strings; pointers to live buffers of the sizes the model reports.
    unsafe {
        let model = kiln_model_load_on(dir.as_ptr(), c"cpu".as_ptr(), 2);
        assert!(!model.is_null(), "{}", last_error());
        let inputs = [x.as_ptr() as *const c_void, scale.as_ptr() as *const c_void];
        let outputs = [y.as_mut_ptr() as *mut c_void, s.as_mut_ptr() as *mut c_void];
        assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0, "{}", last_error());
        assert_eq!((y, s), expected(&x, &scale));
        kiln_model_free(model);
        let model = kiln_model_load_on(dir.as_ptr(), std::ptr::null(), 0);
        assert!(!model.is_null(), "{}", last_error());
        kiln_model_free(model);
        assert!(kiln_model_load_on(dir.as_ptr(), c"vulkan:0".as_ptr(), 0).is_null());
        assert!(last_error().contains("cannot run on device vulkan:0"), "{}", last_error());
        assert!(kiln_model_load_on(dir.as_ptr(), c"gpu".as_ptr(), 0).is_null());
        assert!(last_error().starts_with("no device matches \"gpu\""), "{}", last_error());
    }
}

#[test]
fn c_abi_runs_a_vulkan_model() {
    if !common::gpu::ready() {
        return;
    }
    let artifact = GpuArtifact::chain();
    let dir = CString::new(artifact.path().to_str().unwrap()).unwrap();
    let (x, r) = (x_data(), r_data());
    let mut y = vec![0f32; N];
    let mut s = 0f32;
    // SAFETY: valid strings; pointers to live buffers of the sizes the model reports.
    unsafe {
        let model = kiln_model_load_on(dir.as_ptr(), c"vulkan".as_ptr(), 0);
        assert!(!model.is_null(), "{}", last_error());
        assert_eq!(kiln_model_output_bytes(model, 1), 4);
        let inputs = [x.as_ptr() as *const c_void, r.as_ptr() as *const c_void];
        let outputs = [y.as_mut_ptr() as *mut c_void, (&mut s as *mut f32).cast::<c_void>()];
        for _ in 0..2 {
            assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0, "{}", last_error());
            assert_eq!((y.clone(), s), chain_expected(&x, &r));
        }
        kiln_model_free(model);
        assert!(kiln_model_load_on(dir.as_ptr(), c"cpu".as_ptr(), 0).is_null());
        assert!(
            last_error().starts_with("a Vulkan artifact (SPIR-V 1.3) cannot run on device cpu"),
            "{}",
            last_error()
        );
    }
}

/// A stateful artifact: `forward` computes `y = acc + x` from its state `acc` (starting from
/// the weight `c`); `accumulate` adds `x` into `acc` in place, then computes the same `y`.
const STATE_C: &str = r#"
#include <stdint.h>
#define COLS 16
void kiln_k0(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *x = b[0], *acc = b[1];
    float *y = b[2];
    for (int64_t i = begin * COLS; i < end * COLS; i++) y[i] = acc[i] + x[i];
}
void kiln_k1(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const float *x = b[0];
    float *acc = b[1];
    for (int64_t i = begin * COLS; i < end * COLS; i++) acc[i] += x[i];
}
"#;

fn state_manifest() -> kiln_runtime::Manifest {
    use kiln_runtime::{BufRef, DType, Dispatch, Step, TensorSpec};
    let plane = (N * 4) as u64;
    let spec = |name: &str| TensorSpec::fixed(name, DType::F32, &[ROWS as u64, COLS as u64]);
    let slot = || BufRef::Arena { offset: 0, bytes: plane };
    let step = |symbol: &str, label: &str, args: Vec<BufRef>| Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(ROWS as u64), grain: 4 },
        flops: N as u64,
        bytes: 3 * plane,
    };
    let sum = |label: &str| {
        step("kiln_k0", label, vec![BufRef::Input { index: 0 }, slot(), BufRef::Output { index: 0 }])
    };
    kiln_runtime::Manifest {
        inputs: vec![spec("x")],
        outputs: vec![spec("y")],
        arena_bytes: plane,
        index_bounds: Vec::new(),
        state: vec![kiln_runtime::StateSpec {
            name: "acc".into(),
            dtype: DType::F32,
            shape: vec![ROWS as u64, COLS as u64],
            offset: 0,
            init: kiln_runtime::StateInit::Weight { name: "c".into() },
        }],
        entries: vec![kiln_runtime::Entry {
            name: "accumulate".into(),
            inputs: vec![spec("x")],
            index_bounds: Vec::new(),
            outputs: vec![spec("y")],
            steps: vec![
                step("kiln_k1", "k0 accumulate [64,16]", vec![BufRef::Input { index: 0 }, slot()]),
                sum("k1 sum [64,16]"),
            ],
            faults: None,
        }],
        faults: None,
        steps: vec![sum("k0 sum [64,16]")],
        ..toy_manifest()
    }
}

#[test]
fn c_abi_runs_entry_points_and_reads_and_writes_state() {
    let toy = Toy::custom(state_manifest(), STATE_C);
    let dir = CString::new(toy.path().to_str().unwrap()).unwrap();
    let (x, c) = (x_data(), c_data());
    let plus = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(a, b)| a + b).collect() };
    // SAFETY: every pointer below comes from the API or from live Rust buffers of the sizes
    // given (wrong sizes are passed only where the call must refuse them before any access);
    // the models are freed once.
    unsafe {
        let model = kiln_model_load_with_threads(dir.as_ptr(), 2);
        assert!(!model.is_null(), "{}", last_error());
        assert_eq!(kiln_model_entry_count(model), 2);
        assert_eq!(c_str(kiln_model_entry_name(model, 0)), "forward");
        assert_eq!(c_str(kiln_model_entry_name(model, 1)), "accumulate");
        assert!(kiln_model_entry_name(model, 2).is_null());
        assert_eq!(last_error(), "entry point 2 does not exist: the model has 2 entry points");
        assert_eq!((kiln_model_entry_input_count(model, 1), kiln_model_entry_output_count(model, 1)), (1, 1));
        assert_eq!(kiln_model_entry_input_count(model, 2), 0);
        assert_eq!(c_str(kiln_model_entry_input_name(model, 1, 0)), "x");
        assert_eq!(c_str(kiln_model_entry_output_name(model, 1, 0)), "y");
        assert_eq!(c_str(kiln_model_entry_input_dtype(model, 1, 0)), "f32");
        assert_eq!(c_str(kiln_model_entry_output_dtype(model, 0, 0)), "f32");
        let mut rank = 0usize;
        let shape = kiln_model_entry_output_shape(model, 1, 0, &mut rank);
        assert_eq!(std::slice::from_raw_parts(shape, rank), &[ROWS as i64, COLS as i64]);
        assert_eq!(kiln_model_entry_input_bytes(model, 1, 0), N * 4);
        assert_eq!(kiln_model_entry_output_bytes(model, 1, 0), N * 4);
        assert!(kiln_model_entry_output_name(model, 1, 1).is_null());
        assert_eq!(last_error(), "output 1 of entry point `accumulate` does not exist: it has 1 outputs");
        assert!(kiln_model_entry_input_shape(model, 1, 3, &mut rank).is_null());
        assert_eq!(last_error(), "input 3 of entry point `accumulate` does not exist: it has 1 inputs");

        assert_eq!(kiln_model_state_count(model), 1);
        assert_eq!(c_str(kiln_model_state_name(model, 0)), "acc");
        assert_eq!(c_str(kiln_model_state_dtype(model, 0)), "f32");
        let shape = kiln_model_state_shape(model, 0, &mut rank);
        assert_eq!(std::slice::from_raw_parts(shape, rank), &[ROWS as i64, COLS as i64]);
        assert_eq!(kiln_model_state_bytes(model, 0), N * 4);
        assert!(kiln_model_state_name(model, 1).is_null());
        assert_eq!(last_error(), "state 1 does not exist: the model keeps 1 state tensors");

        // The state starts from its weight; each `accumulate` run adds x into it in place, and
        // `forward` computes with what it holds.
        let mut acc = vec![0f32; N];
        let read = |acc: &mut Vec<f32>| {
            kiln_model_read_state(model, c"acc".as_ptr(), acc.as_mut_ptr().cast(), N * 4)
        };
        assert_eq!(read(&mut acc), 0, "{}", last_error());
        assert_eq!(acc, c);
        let mut y = vec![0f32; N];
        let inputs = [x.as_ptr() as *const c_void];
        let outputs = [y.as_mut_ptr() as *mut c_void];
        let mut want = c.clone();
        for _ in 0..2 {
            assert_eq!(
                kiln_model_run_entry(model, c"accumulate".as_ptr(), inputs.as_ptr(), outputs.as_ptr()),
                0,
                "{}",
                last_error()
            );
            want = plus(&want, &x);
            assert_eq!(y, plus(&want, &x));
        }
        assert_eq!(read(&mut acc), 0, "{}", last_error());
        assert_eq!(acc, want);
        assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0, "{}", last_error());
        assert_eq!(y, plus(&want, &x));
        assert_eq!(kiln_model_run_entry(model, c"forward".as_ptr(), inputs.as_ptr(), outputs.as_ptr()), 0);
        assert_eq!(y, plus(&want, &x));
        let zeros = vec![0f32; N];
        assert_eq!(
            kiln_model_write_state(model, c"acc".as_ptr(), zeros.as_ptr().cast(), N * 4),
            0,
            "{}",
            last_error()
        );
        assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0, "{}", last_error());
        assert_eq!(y, x);

        // Misuse fails with its words and changes nothing.
        let run_entry = |entry: *const std::ffi::c_char, inputs: *const *const c_void| {
            assert_ne!(kiln_model_run_entry(model, entry, inputs, outputs.as_ptr()), 0);
            last_error()
        };
        assert_eq!(
            run_entry(c"train_step".as_ptr(), inputs.as_ptr()),
            "the model has no entry point \"train_step\": it has forward, accumulate"
        );
        assert_eq!(run_entry(std::ptr::null(), inputs.as_ptr()), "entry is NULL");
        assert_eq!(run_entry(c"accumulate".as_ptr(), std::ptr::null()), "inputs is NULL, the model has 1");
        let mut buf = vec![0f32; N];
        let out = buf.as_mut_ptr().cast::<c_void>();
        assert_ne!(kiln_model_read_state(model, c"acc".as_ptr(), out, N * 4 - 1), 0);
        assert_eq!(last_error(), "state \"acc\" is f32[64, 16], 4096 bytes; the buffer has 4095");
        assert_ne!(kiln_model_write_state(model, c"acc".as_ptr(), x.as_ptr().cast(), N * 4 + 4), 0);
        assert_eq!(last_error(), "state \"acc\" is f32[64, 16], 4096 bytes; the buffer has 4100");
        assert_ne!(kiln_model_read_state(model, c"bias".as_ptr(), out, N * 4), 0);
        assert_eq!(last_error(), "the model has no state \"bias\": it keeps acc");
        assert_ne!(kiln_model_read_state(model, std::ptr::null(), out, N * 4), 0);
        assert_eq!(last_error(), "name is NULL");
        assert_ne!(kiln_model_read_state(model, c"acc".as_ptr(), std::ptr::null_mut(), N * 4), 0);
        assert_eq!(last_error(), "out is NULL");
        assert_ne!(kiln_model_write_state(model, c"acc".as_ptr(), std::ptr::null(), N * 4), 0);
        assert_eq!(last_error(), "value is NULL");
        assert_ne!(
            kiln_model_write_state(std::ptr::null_mut(), c"acc".as_ptr(), x.as_ptr().cast(), N * 4),
            0
        );
        assert_eq!(last_error(), "model is NULL");
        assert_eq!(read(&mut acc), 0, "{}", last_error());
        assert_eq!(acc, zeros);
        kiln_model_free(model);

        // A plain artifact has one entry point and keeps no state.
        let plain = Toy::new();
        let dir = CString::new(plain.path().to_str().unwrap()).unwrap();
        let model = kiln_model_load_with_threads(dir.as_ptr(), 2);
        assert!(!model.is_null(), "{}", last_error());
        assert_eq!((kiln_model_entry_count(model), kiln_model_state_count(model)), (1, 0));
        assert_eq!(c_str(kiln_model_entry_name(model, 0)), "forward");
        assert!(kiln_model_state_name(model, 0).is_null());
        assert_eq!(last_error(), "state 0 does not exist: the model keeps no state");
        assert_ne!(kiln_model_read_state(model, c"acc".as_ptr(), out, N * 4), 0);
        assert_eq!(last_error(), "the model has no state \"acc\": it keeps none");
        kiln_model_free(model);
    }
}

/// The profile directory (`target/debug`) of this test binary, where cargo puts the cdylib and
/// the examples.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/capi-<hash>
    exe.parent().and_then(Path::parent).expect("target/<profile>").to_path_buf()
}

/// A build product of this package, brought up to date by cargo (a no-op when this test run
/// built it already; `cargo test --test capi` alone builds neither the examples nor, on every
/// cargo version, a fresh cdylib).
fn built(relative: &str, cargo_args: &[&str]) -> PathBuf {
    let dir = profile_dir();
    let target = dir.parent().expect("target dir");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "-p", "kiln-runtime"]).args(cargo_args).env("CARGO_TARGET_DIR", target);
    if dir.file_name().is_some_and(|p| p == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo build");
    assert!(status.success(), "cargo build failed");
    let path = dir.join(relative);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Parses `output NAME DTYPE [dims]: v0 v1 ...` lines into (header, first values).
fn outputs_of(stdout: &str) -> Vec<(String, Vec<f32>)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("output "))
        .map(|l| {
            let (head, values) = l.split_once(": ").expect("output line has values");
            let values = values.split(" ... ").next().unwrap_or("");
            (head.to_string(), values.split_whitespace().map(|v| v.parse().expect("a number")).collect())
        })
        .collect()
}

fn ramp_expected() -> (Vec<f32>, Vec<f32>) {
    let x: Vec<f32> = (0..N).map(|i| (i % 32) as f32 / 16.0 - 1.0).collect();
    expected(&x, &[0; ROWS])
}

fn check_ramp_outputs(stdout: &str) {
    let (y, s) = ramp_expected();
    let outputs = outputs_of(stdout);
    assert_eq!(outputs.len(), 2, "{stdout}");
    assert_eq!(outputs[0].0, "output y f32 [64, 16]", "{stdout}");
    assert_eq!(outputs[1].0, "output s f32 [64]", "{stdout}");
    for (got, want) in outputs[0].1.iter().zip(&y[..8]).chain(outputs[1].1.iter().zip(&s[..8])) {
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "{got} vs {want}\n{stdout}");
    }
    assert_eq!(outputs[0].1.len(), 8);
}

#[test]
fn c_example_runs_against_the_cdylib() {
    let lib = built("libkiln_runtime.so", &["--lib"]);
    let lib_dir = lib.parent().expect("lib dir");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = tempfile::tempdir().unwrap();
    let exe = work.path().join("run_model");
    let status = Command::new("cc")
        .args(["-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(repo.join("runtime/include"))
        .arg(repo.join("examples/c/run_model.c"))
        .arg("-L")
        .arg(lib_dir)
        .arg("-lkiln_runtime")
        .arg("-o")
        .arg(&exe)
        .status()
        .expect("run cc");
    assert!(status.success(), "cc failed on examples/c/run_model.c");

    let toy = Toy::new();
    let out = Command::new(&exe)
        .arg(toy.path())
        .env("LD_LIBRARY_PATH", lib_dir)
        .env("KILN_THREADS", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "run_model failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("input x f32 [64, 16] (ramp)\ninput scale i32 [64] (zeros)\n"), "{stdout}");
    check_ramp_outputs(&stdout);
    assert!(stdout.contains("... (1024 values)"), "{stdout}");

    let out = Command::new(&exe).arg("--devices").env("LD_LIBRARY_PATH", lib_dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.starts_with("cpu  host CPU, "), "{stdout}");

    if common::gpu::ready() {
        let artifact = GpuArtifact::chain();
        let out = Command::new(&exe)
            .arg(artifact.path())
            .arg("vulkan:0")
            .env("LD_LIBRARY_PATH", lib_dir)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "run_model failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        let ramp = |n: usize| (0..n).map(|i| (i % 32) as f32 / 16.0 - 1.0).collect::<Vec<f32>>();
        let (y, s) = chain_expected(&ramp(N), &ramp(256));
        let outputs = outputs_of(&stdout);
        assert_eq!(outputs[0].0, "output y f32 [64, 16]", "{stdout}");
        assert_eq!(outputs[0].1, y[..8], "{stdout}");
        assert_eq!((outputs[1].0.as_str(), &outputs[1].1[..]), ("output s f32 []", &[s][..]), "{stdout}");
    }

    let out = Command::new(&exe)
        .arg(work.path().join("nope.kiln"))
        .env("LD_LIBRARY_PATH", lib_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: ") && stderr.contains("manifest.ron is missing"), "{stderr}");
}

#[test]
fn run_artifact_example() {
    let exe = built("examples/run_artifact", &["--example", "run_artifact"]);
    let toy = Toy::new();
    let out = Command::new(&exe)
        .arg(toy.path())
        .args(["--threads", "2", "--profile", "--repeats", "3"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "run_artifact failed: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("model toy (kiln 0.1.0, "), "{stdout}");
    check_ramp_outputs(&stdout);
    assert!(stdout.contains("profile: 4 steps, 2 threads, arena 8.0 KiB, median of 3 runs"), "{stdout}");
    assert!(stdout.contains("k3 rowsum [64]"), "{stdout}");

    // A raw input file replaces the ramp.
    let x = x_data();
    let scale = scale_data();
    let x_file = toy.file("x.bin");
    let s_file = toy.file("scale.bin");
    std::fs::write(&x_file, f32_bytes(&x)).unwrap();
    std::fs::write(&s_file, scale.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let out = Command::new(&exe)
        .arg(toy.path())
        .arg("--input")
        .arg(format!("x={}", x_file.display()))
        .arg("--input")
        .arg(format!("scale={}", s_file.display()))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (y, _) = expected(&x, &scale);
    assert_eq!(outputs_of(&stdout)[0].1, y[..8], "{stdout}");

    // A Vulkan artifact, profiled with GPU timestamps, and the device list.
    if common::gpu::ready() {
        let artifact = GpuArtifact::chain();
        let out = Command::new(&exe)
            .arg(artifact.path())
            .args(["--device", "vulkan", "--profile", "--repeats", "2"])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}\n{stdout}", String::from_utf8_lossy(&out.stderr));
        assert!(
            stdout.starts_with("model chain (kiln 0.1.0, vulkan (SPIR-V 1.3)): 4 steps, 1 threads"),
            "{stdout}"
        );
        assert!(stdout.contains(", device vulkan:"), "{stdout}");
        assert!(stdout.contains("profile: 4 steps, 1 threads, arena 8.2 KiB, median of 2 runs"), "{stdout}");
        assert!(stdout.contains("\nk3 reduce [256]  "), "{stdout}");
        let out = Command::new(&exe).args(["--device", "list"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.starts_with("cpu  host CPU, ") && stdout.contains("\nvulkan:0  "), "{stdout}");
    }

    let out = Command::new(&exe).arg(toy.path()).args(["--input", "x=/nonexistent.bin"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(&exe).arg("--bogus").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// A one-step model whose kernel stores 1 into its output `entered`, then waits until its input
/// `gate` is nonzero: a run that is provably in progress while the test calls again.
const GATE_C: &str = r#"
#include <stdint.h>
void kiln_k0(void **b, const int64_t *syms, int64_t begin, int64_t end) {
    const int32_t *gate = b[0];
    int32_t *entered = b[1];
    (void)begin; (void)end;
    __atomic_store_n(entered, 1, __ATOMIC_RELEASE);
    while (__atomic_load_n(gate, __ATOMIC_ACQUIRE) == 0) {}
}
"#;

#[test]
fn a_model_run_from_two_threads_at_once_is_an_error() {
    use kiln_runtime::{BufRef, DType, Dispatch, Step, TensorSpec};
    use std::sync::atomic::{AtomicI32, Ordering};
    let mut manifest = toy_manifest();
    let spec = |name: &str| TensorSpec::fixed(name, DType::I32, &[1]);
    manifest.inputs = vec![spec("gate")];
    manifest.outputs = vec![spec("entered")];
    manifest.arena_bytes = 0;
    manifest.steps = vec![Step {
        symbol: "kiln_k0".into(),
        label: "k0 gate [1]".into(),
        args: vec![BufRef::Input { index: 0 }, BufRef::Output { index: 0 }],
        dispatch: Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(1), grain: 1 },
        flops: 0,
        bytes: 8,
    }];
    let toy = Toy::custom(manifest, GATE_C);
    let dir = CString::new(toy.path().to_str().unwrap()).unwrap();
    // SAFETY: the model is loaded, shared with one scoped thread that ends before it is freed,
    // and given buffers of the sizes it declares (atomics, since the kernel and this thread
    // touch them concurrently).
    unsafe {
        let model = kiln_model_load_with_threads(dir.as_ptr(), 1);
        assert!(!model.is_null(), "{}", last_error());
        let (gate, entered) = (AtomicI32::new(0), AtomicI32::new(0));
        let (gate_ptr, entered_ptr) = (gate.as_ptr() as usize, entered.as_ptr() as usize);
        let model_addr = model as usize;
        std::thread::scope(|scope| {
            let first = scope.spawn(move || {
                let inputs = [gate_ptr as *const c_void];
                let outputs = [entered_ptr as *mut c_void];
                let status = kiln_model_run(model_addr as *mut KilnModel, inputs.as_ptr(), outputs.as_ptr());
                (status, last_error())
            });
            while entered.load(Ordering::Acquire) == 0 {
                std::thread::yield_now();
            }
            // The first run is inside its kernel: a second one must be refused, untouched.
            let other_gate = 1i32;
            let mut other_out = 7i32;
            let inputs = [&other_gate as *const i32 as *const c_void];
            let outputs = [&mut other_out as *mut i32 as *mut c_void];
            assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 1);
            assert_eq!(
                last_error(),
                "the model is already running on another thread: one handle runs one call at a time \
                 (load one model per thread)"
            );
            assert_eq!(other_out, 7, "the refused call wrote its output");
            gate.store(1, Ordering::Release);
            let (status, message) = first.join().unwrap();
            assert_eq!(status, 0, "{message}");
        });
        // Free again: the next run succeeds.
        let mut out = 0i32;
        let inputs = [&gate as *const AtomicI32 as *const c_void];
        let outputs = [&mut out as *mut i32 as *mut c_void];
        assert_eq!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0, "{}", last_error());
        assert_eq!(out, 1);
        kiln_model_free(model);
    }
}

#[test]
fn c_abi_runs_a_model_with_symbols_at_the_shapes_given() {
    let toy = Toy::custom(dynamic_manifest(), DYNAMIC_C);
    let dir = CString::new(toy.path().to_str().unwrap()).unwrap();
    // SAFETY: every pointer below comes from the API or from live Rust buffers of at least the
    // sizes the API reports; the model is freed once, at the end.
    unsafe {
        let model = kiln_model_load_with_threads(dir.as_ptr(), 2);
        assert!(!model.is_null(), "{}", last_error());
        assert_eq!(kiln_model_symbol_count(model), 1);
        let (mut name, mut min, mut max, mut hint, mut multiple) = (std::ptr::null(), 0i64, 0i64, 0i64, 0i64);
        let found = kiln_model_symbol(model, 0, &mut name, &mut min, &mut max, &mut hint, &mut multiple);
        assert_eq!(found, 0, "{}", last_error());
        assert_eq!((c_str(name), min, max, hint, multiple), ("rows".to_string(), 1, ROWS as i64, 8, 1));
        assert_ne!(kiln_model_symbol(model, 1, &mut name, &mut min, &mut max, &mut hint, &mut multiple), 0);
        assert_eq!(last_error(), "symbol 1 does not exist: the model has 1");
        // Extents set at run time read -1; sizes are at the symbols' maxima.
        let mut rank = 0usize;
        let shape = kiln_model_input_shape(model, 0, &mut rank);
        assert_eq!(std::slice::from_raw_parts(shape, rank), &[-1, COLS as i64]);
        assert_eq!(kiln_model_output_bytes(model, 0), N * 4);
        assert_eq!(kiln_model_output_bytes(model, 1), ROWS * 4);

        // One row more than the maximum, so the refused shape below still describes live bytes.
        let x: Vec<f32> = x_data().into_iter().chain(std::iter::repeat_n(0.0, COLS)).collect();
        let mut y = vec![0f32; N];
        let mut s = vec![0f32; ROWS];
        let inputs = [x.as_ptr() as *const c_void];
        let outputs = [y.as_mut_ptr() as *mut c_void, s.as_mut_ptr() as *mut c_void];
        assert_ne!(kiln_model_run(model, inputs.as_ptr(), outputs.as_ptr()), 0);
        assert_eq!(
            last_error(),
            "input \"x\" has extents set at run time ([rows, 16]): run it with kiln_model_run_shaped"
        );
        for rows in [1usize, 5, ROWS] {
            let x_shape = [rows as i64, COLS as i64];
            let input_shapes = [x_shape.as_ptr()];
            let (mut y_shape, mut s_shape) = ([0i64; 2], [0i64; 1]);
            let output_shapes = [y_shape.as_mut_ptr(), s_shape.as_mut_ptr()];
            let status = kiln_model_run_shaped(
                model,
                std::ptr::null(),
                inputs.as_ptr(),
                input_shapes.as_ptr(),
                outputs.as_ptr(),
                output_shapes.as_ptr(),
            );
            assert_eq!(status, 0, "{}", last_error());
            assert_eq!((y_shape, s_shape), ([rows as i64, COLS as i64], [rows as i64]));
            let (ey, es) = dynamic_expected(&x[..rows * COLS], rows);
            assert_eq!((&y[..rows * COLS], &s[..rows]), (&ey[..], &es[..]), "{rows} rows");
        }
        let too_many = [ROWS as i64 + 1, COLS as i64];
        let shapes = [too_many.as_ptr()];
        let status = kiln_model_run_shaped(
            model,
            c"forward".as_ptr(),
            inputs.as_ptr(),
            shapes.as_ptr(),
            outputs.as_ptr(),
            std::ptr::null(),
        );
        assert_ne!(status, 0);
        assert_eq!(last_error(), "input `x` axis 0 is 65, but `rows` is at most 64");
        let negative = [-1i64, COLS as i64];
        let shapes = [negative.as_ptr()];
        let status = kiln_model_run_shaped(
            model,
            std::ptr::null(),
            inputs.as_ptr(),
            shapes.as_ptr(),
            outputs.as_ptr(),
            std::ptr::null(),
        );
        assert_ne!(status, 0);
        assert_eq!(last_error(), "input \"x\" has a negative extent -1");
        kiln_model_free(model);
    }
}
