//! The native path computes what the reference interpreter computes: every op family, random
//! graphs, and every shipped model, compiled for this CPU and for Vulkan, written as an
//! artifact, loaded by kiln-runtime and run (f32: max |Δ| ≤ 1e-4·(1 + |ref|)). The same suite
//! runs on every target; the Vulkan half runs on whatever Vulkan device the machine has (Mesa's
//! lavapipe in CI) and skips, saying why, on a machine without one.
//!
//! One test binary for all of it: the compiler links MLIR and LLVM statically.

use kiln_ir::{DType, Graph, Op, Tensor};
use kiln_runtime::{Model, Options, TensorRef};
use proptest::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// Where a conformance case runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    /// This CPU, two threads.
    Cpu,
    /// The first Vulkan device.
    Vulkan,
    /// CUDA device 0, with kernels compiled for its own architecture.
    Cuda,
    /// CUDA device 0 with f32 products on tensor cores (`--precision tf32`).
    CudaTf32,
    /// CUDA device 0 with f32 products and attention on tensor cores, operands split in two
    /// TF32 parts (`--precision tf32x3`).
    CudaTf32x3,
}

/// Why the Vulkan half of the suite cannot run here, if it cannot.
fn vulkan_missing() -> Option<String> {
    let found = kiln_runtime::devices();
    if found.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(_))) {
        None
    } else {
        Some(found.vulkan_unavailable.unwrap_or_else(|| "no Vulkan device with a compute queue".into()))
    }
}

/// The architecture of CUDA device 0 as `--target cuda:ARCH` names it (the newest Kiln
/// compiles for that the device runs), or why the CUDA half of the suite cannot run here.
fn cuda_arch() -> Result<&'static str, String> {
    let found = kiln_runtime::devices();
    let device = found.devices.iter().find_map(|d| match d {
        kiln_runtime::DeviceInfo::Cuda(c) => Some(c.clone()),
        _ => None,
    });
    let Some(device) = device else {
        return Err(found.cuda_unavailable.unwrap_or_else(|| "no CUDA device".into()));
    };
    let [major, minor] = device.compute_capability;
    kiln_codegen::gpu::NvvmTarget::ARCHES
        .iter()
        .rev()
        .find(|arch| {
            let t = kiln_codegen::gpu::NvvmTarget::by_arch(arch).expect("a known architecture");
            !t.arch_specific && t.compute_capability <= [major, minor]
        })
        .copied()
        .ok_or_else(|| format!("CUDA device 0 is sm_{major}{minor}, older than every target (sm_80 and up)"))
}

/// Whether `device` can run here; prints why not (a visible skip) when it cannot.
fn available(device: Device, test: &str) -> bool {
    let missing = match device {
        Device::Cpu => None,
        Device::Vulkan => vulkan_missing().map(|r| format!("no Vulkan device ({r})")),
        Device::Cuda | Device::CudaTf32 | Device::CudaTf32x3 => {
            cuda_arch().err().map(|r| format!("no CUDA device ({r})"))
        }
    };
    match missing {
        None => true,
        Some(reason) => {
            eprintln!("skipped: {test}: {reason}");
            false
        }
    }
}

/// Compiles `g` for `device` into `dir`.
fn build_for(device: Device, g: &Graph, params: &HashMap<String, Tensor>, dir: &Path) {
    match device {
        Device::Cpu => {
            let s = kiln_sched::schedule(g).expect("schedules");
            kiln_codegen::build_artifact(&g.name, &s, params, &kiln_codegen::CpuTarget::host(), dir)
                .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        }
        Device::Vulkan => {
            build_vulkan(g, params, dir);
        }
        Device::Cuda | Device::CudaTf32 | Device::CudaTf32x3 => {
            let arch = cuda_arch().unwrap_or_else(|e| panic!("{e}"));
            let (caps, _) = cuda_caps(arch);
            let caps = match device {
                Device::CudaTf32 => caps.with_tf32(),
                Device::CudaTf32x3 => caps.with_tensor_cores(kiln_codegen::gpu::MmaPrecision::Tf32x3),
                Device::Cpu | Device::Vulkan | Device::Cuda => caps,
            };
            let s = kiln_sched::schedule_aligned(g, caps.buffer_align).expect("schedules");
            let ptxas = kiln_codegen::gpu::ptxas::Ptxas::find();
            kiln_codegen::build_cuda_artifact(&g.name, &s, params, &caps, ptxas.as_ref(), dir)
                .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        }
    }
}

/// Outputs as f64, through the compiled path on `device`.
fn run_compiled(
    g: &Graph,
    params: &HashMap<String, Tensor>,
    inputs: &HashMap<String, Tensor>,
    device: Device,
) -> Vec<Vec<f64>> {
    let dir = tempfile::tempdir().unwrap();
    build_for(device, g, params, dir.path());
    run_artifact(dir.path(), inputs, &g.name)
}

/// Loads the artifact in `dir` on its own kind of device, runs it on `inputs` and returns its
/// outputs as f64.
fn run_artifact(dir: &Path, inputs: &HashMap<String, Tensor>, what: &str) -> Vec<Vec<f64>> {
    let mut model = Model::load_with(dir, &Options { threads: Some(2), ..Options::default() })
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let owned: Vec<(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)> = model
        .inputs()
        .iter()
        .map(|spec| {
            let t = &inputs[&spec.name];
            (spec.name.clone(), spec.dtype, t.shape.iter().map(|&d| d as u64).collect(), t.data.to_le_bytes())
        })
        .collect();
    let refs: Vec<TensorRef> = owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
    let outs = model.run(&refs).unwrap_or_else(|e| panic!("{what}: {e}"));
    outs.iter()
        .map(|t| match t.dtype() {
            kiln_runtime::DType::F32 => t.as_f32().unwrap().iter().map(|&x| x as f64).collect(),
            kiln_runtime::DType::F64 => t.as_f64().unwrap().to_vec(),
            kiln_runtime::DType::I32 => t.as_i32().unwrap().iter().map(|&x| x as f64).collect(),
            kiln_runtime::DType::I64 => t.as_i64().unwrap().iter().map(|&x| x as f64).collect(),
            kiln_runtime::DType::Bool => t.bytes().iter().map(|&x| x as f64).collect(),
            kiln_runtime::DType::F16 => {
                t.bytes().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
            }
            kiln_runtime::DType::BF16 => {
                t.bytes().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect()
            }
        })
        .collect()
}

/// Runs the artifact of `g` in `dir` at each of `bindings` (run-time sizes; once at the graph's
/// own sizes where there are none) on seeded inputs and compares every output with the
/// interpreter's within `tolerance`·(1 + |ref|); `what` names the case in failures.
fn check_artifact_at(
    dir: &Path,
    g: &Graph,
    params: &HashMap<String, Tensor>,
    bindings: &[Vec<i64>],
    tolerance: f64,
    what: &str,
) {
    let runs: Vec<Vec<i64>> = if bindings.is_empty() { vec![vec![]] } else { bindings.to_vec() };
    for values in runs {
        let shaped = if values.is_empty() { g.clone() } else { g.specialize(&values).unwrap() };
        let inputs = kiln_ir::seeded_inputs(&shaped, 3);
        let want =
            kiln_ir::eval(g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
        let got = run_artifact(dir, &inputs, &g.name);
        for ((out, w), gv) in want.iter().zip(&got) {
            let wv = w.to_f64_vec();
            assert_eq!(wv.len(), gv.len(), "{what} at {values:?}: `{out}` length");
            for (i, (a, b)) in wv.iter().zip(gv).enumerate() {
                let same =
                    (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tolerance * (1.0 + a.abs());
                assert!(same, "{what} at {values:?} `{out}`[{i}]: interpreter {a}, compiled {b}");
            }
        }
    }
}

/// Compiles and runs `g` on `device`, evaluates it with the interpreter, and compares every
/// output.
fn check_graph(g: &Graph, seed: u64, tol: f64, device: Device) {
    let params = kiln_ir::bind_params(g, None, seed, false).unwrap();
    let inputs = kiln_ir::seeded_inputs(g, seed);
    let want =
        kiln_ir::eval(g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
    let got = run_compiled(g, &params, &inputs, device);
    assert_eq!(got.len(), want.len());
    for ((name, w), gv) in want.iter().zip(&got) {
        let wv = w.to_f64_vec();
        assert_eq!(wv.len(), gv.len(), "{}: output `{name}` length", g.name);
        for (i, (a, b)) in wv.iter().zip(gv).enumerate() {
            let same = (a.is_nan() && b.is_nan()) || a == b || (a - b).abs() <= tol * (1.0 + a.abs());
            assert!(same, "{} on {device:?}: output `{name}`[{i}]: interpreter {a}, compiled {b}", g.name);
        }
    }
}

fn lower(name: &str, text: &str) -> Graph {
    let (sources, l) = kiln_lower::load_str(name, text, &[]);
    match l {
        Ok(l) => l.graph,
        Err(d) => panic!("{}", d.render(&sources)),
    }
}

fn optimized(g: &Graph) -> Graph {
    kiln_opt::optimize(g, &kiln_opt::Options::default()).unwrap().0
}

/// One small model per op family; each is checked as written and after optimization.
const OP_CASES: &[(&str, &str, &str)] = &[
    (
        "elementwise",
        r#"{ "x": (f32, [3, 5, 7]), "y": (f32, [5, 1]) }"#,
        r#"Let("a", Add(Mul(Exp(Mul("x", 0.3)), "y"), Tanh("x"))),
           Let("b", Div(Sub(Erf("x"), Sigmoid("x")), Add(Abs("x"), 1.0))),
           Let("c", Max(Min(Relu(Neg("x")), Sqrt(Abs("y"))), Rsqrt(Add(Abs("x"), 0.5)))),
           Let("d", Add(Log(Add(Abs("x"), 1.0)), Add(Sin("x"), Cos("y")))),
           Let("e", Add(Pow(Abs("x"), 1.5), Recip(Add(Abs("y"), 2.0)))),"#,
    ),
    (
        "math",
        r#"{ "x": (f32, [4, 64]) }"#,
        r#"Let("a", Log(Mul(Abs("x"), 1e-30))),
           Let("b", Log(Mul("x", 1e6))),
           Let("c", Sin(Mul("x", 300.0))),
           Let("d", Cos(Mul("x", 300.0))),
           Let("e", Pow("x", 3.0)),
           Let("f", Pow("x", 0.5)),
           Let("g", Pow(Abs("x"), Mul("x", 4.0))),
           Let("h", Pow(Mul(Abs("x"), 0.0), -1.0)),
           Let("i", Pow(Mul(Abs("x"), 30.0), 40.0)),
           Let("j", LogSoftmax(x: Mul("x", 20.0), axis: 1)),
           Let("k", Exp(Mul("x", 120.0))),
           Let("l", Exp(Add(Mul("x", 0.2), 88.4))),
           Let("m", Sigmoid(Mul("x", 150.0))),"#,
    ),
    (
        // f64: SPIR-V's own 64-bit absolute values and roots, and the math functions GPU
        // kernels compute themselves at 64 bits (no GPU target has exp, log or tanh there),
        // alone, in the fused row kernels, in a product's epilogue and in attention.
        "f64",
        r#"{ "x": (f64, [4, 5]), "y": (f64, [3, 300]), "w": (f64, [5, 6]), "q": (f64, [1, 2, 9, 8]) }"#,
        r#"Let("a", Abs("x")),
           Let("b", Sqrt(Abs("x"))),
           Let("c", Rsqrt(Add(Abs("x"), 1.0))),
           Let("d", Recip(Add(Abs("x"), 0.5))),
           Let("e", ReduceMin(x: Add(Abs("x"), 1.0), axes: [1])),
           Let("f", LayerNorm(x: "y", eps: 1e-5)),
           Let("g", Mean(x: Relu("y"), axes: [1])),
           Let("h", Add(Exp(Mul("x", 3.0)), Log(Abs("x")))),
           Let("i", Add(Tanh("x"), Erf(Mul("x", 2.0)))),
           Let("j", Add(Sin(Mul("x", 30.0)), Cos("x"))),
           Let("k", Add(Pow(Abs("x"), "x"), Sigmoid("x"))),
           Let("l", Add(Gelu("x"), Gelu(x: "x", approx: tanh))),
           Let("m", Softmax(x: Mul("y", 5.0), axis: 1)),
           Let("n", LogSoftmax(x: "y", axis: 0)),
           Let("o", Gelu(MatMul("x", "w"))),
           Let("p", Attention(q: "q", k: "q", v: "q", causal: true, scale: 0.35)),"#,
    ),
    (
        "compare_where_cast",
        r#"{ "x": (f32, [4, 6]), "i": (i64, [4, 6]) }"#,
        r#"Let("a", Where(Gt("x", 0.0), "x", Mul("x", 0.1))),
           Let("b", Cast(x: Le("x", 0.5), to: f32)),
           Let("c", Add(Cast(x: "i", to: f32), Cast(x: Cast(x: Mul("x", 3.0), to: i32), to: f32))),
           Let("d", Cast(x: Ne("i", 1), to: i64)),
           Let("e", Sub(Mul("i", 7), Div(Max("i", 1), 2))),"#,
    ),
    (
        "reduce",
        r#"{ "x": (f32, [4, 6, 8]), "y": (f32, [3, 20, 30]), "n": (i64, [2, 300]), "w": (f32, [5, 7, 300]) }"#,
        r#"Let("a", Sum(x: "x", axes: [2])),
           Let("b", Mean(x: "x", axes: [0, 2])),
           Let("c", ReduceMax(x: "x", axes: [1], keepdims: true)),
           Let("d", ReduceMin(x: Transpose(x: "x", perm: [2, 0, 1]), axes: [0, 1])),
           Let("e", Sum(x: "y", axes: [1, 2])),
           Let("f", Mean(x: Transpose(x: "y", perm: [2, 0, 1]), axes: [0, 2], keepdims: true)),
           Let("g", ReduceMax(x: "y", axes: [0, 2])),
           Let("h", ReduceMin(x: "y", axes: [0, 1])),
           Let("i", Sum(x: "n", axes: [1])),
           Let("j", Sum(x: "w", axes: [0, 1])),
           Let("k", Mean(x: Slice(x: "w", axis: 2, start: 3, end: 250), axes: [1])),
           Let("l", ReduceMax(x: Transpose(x: "w", perm: [1, 0, 2]), axes: [0], keepdims: true)),"#,
    ),
    (
        "layout",
        r#"{ "x": (f32, [2, 3, 4, 5]), "ids": (i64, [2, 3]) }"#,
        r#"Let("a", Reshape(Transpose(x: "x", perm: [0, 2, 1, 3]), [2, 4, 15])),
           Let("b", Slice(x: "x", axis: 3, start: 1, end: 5, step: 2)),
           Let("c", Concat(xs: ["x", Mul("x", 2.0)], axis: 1)),
           Let("d", Pad(x: "x", pads: [[0, 0], [1, 0], [0, 2], [1, 1]], value: -1.0)),
           Let("e", Gather(table: Reshape("x", [6, 20]), indices: "ids")),
           Let("f", BroadcastTo(x: Slice(x: "x", axis: 0, start: 0, end: 1), shape: [3, 3, 4, 5])),
           Let("g", Cast(x: Iota(shape: [3, 4], axis: 1), to: f32)),
           Let("r", Add(RandomUniform(shape: [3, 40], seed: 7, offset: 5), Cast(x: RandomUniform(shape: [40], seed: 9, dtype: f64), to: f32))),
           Let("h", Concat(xs: [Transpose(x: "x", perm: [0, 1, 3, 2]), Slice(x: Transpose(x: "x", perm: [0, 1, 3, 2]), axis: 2, start: 1, end: 3)], axis: 2)),
           Let("i", Concat(xs: ["x", Slice(x: "x", axis: 3, start: 0, end: 5, step: 2)], axis: 3)),"#,
    ),
    (
        "conv_pool",
        r#"{ "x": (f32, [2, 4, 9, 9]) }"#,
        r#"Let("w", Param(shape: [6, 2, 3, 3], init: Normal(std: 0.3))),
           Let("a", Conv2d(x: "x", w: "w", stride: [2, 1], padding: [1, 2], groups: 2)),
           Let("b", MaxPool2d(x: "x", kernel: [3, 3], stride: [2, 2], padding: [1, 1])),
           Let("c", AvgPool2d(x: "x", kernel: [2, 3], stride: [1, 2], padding: [1, 1])),
           Let("w2", Param(shape: [8, 4, 2, 3], init: Normal(std: 0.3))),
           Let("d", Conv2d(x: Cast(x: "x", to: f64), w: Cast(x: "w2", to: f64), padding: [0, 3], dilation: [2, 2])),
           Let("e", Conv2d(x: "x", w: "w2", padding: [1, 0])),"#,
    ),
    (
        "fused",
        r#"{ "x": (f32, [2, 9, 24]), "r": (f32, [2, 9, 24]) }"#,
        r#"Let("a", Softmax(x: "x", axis: 2)),
           Let("b", Softmax(x: "x", axis: 1)),
           Let("c", LogSoftmax(x: "x", axis: 2)),
           Let("d", LayerNorm(x: "x", eps: 1e-5)),
           Let("e", RmsNorm(x: "x", eps: 1e-6)),
           Let("f", Gelu(x: "x")),
           Let("g", AddNorm(a: "x", b: "r", eps: 1e-5)),
           Let("h", LogSoftmax(x: "x", axis: 1)),"#,
    ),
    (
        // Norms written out over another axis than the last: a layer norm over the channels
        // of [N, C, H, W] with a per-channel scale and shift ([C, 1, 1]), an RMS norm over the
        // middle axis with its gain ([5, 1]) and a layer norm over the first axis. Optimized,
        // each is the fused norm over the last axis of a transposed view, transposed back.
        // Then the fused ops written so directly: add + norms (layer with γ and β, RMS with γ)
        // and a layer norm over 40 pixels a row (2.5 vectors of 16 lanes side by side). Last, a
        // layer norm over the last three axes with a γ of [C, H, W]: one norm over 120.
        "norms_across",
        r#"{ "x": (f32, [2, 6, 4, 5]), "y": (f32, [3, 5, 8]), "w": (f32, [6, 1, 1]), "b": (f32, [6, 1, 1]), "g": (f32, [5, 1]), "z": (f32, [2, 6, 4, 5]), "gc": (f32, [6]), "bc": (f32, [6]), "u": (f32, [2, 7, 6, 40]), "gt": (f32, [6, 4, 5]) }"#,
        r#"Let("a", Add(Mul("w", Div(Sub("x", Mean(x: "x", axes: 1, keepdims: true)), Sqrt(Add(Mean(x: Pow(Sub("x", Mean(x: "x", axes: 1, keepdims: true)), 2.0), axes: 1, keepdims: true), 1e-6)))), "b")),
           Let("c", Mul(Mul("y", Rsqrt(Add(Mean(x: Mul("y", "y"), axes: 1, keepdims: true), 1e-6))), "g")),
           Let("d", Div(Sub("y", Mean(x: "y", axes: 0, keepdims: true)), Sqrt(Add(Mean(x: Pow(Sub("y", Mean(x: "y", axes: 0, keepdims: true)), 2.0), axes: 0, keepdims: true), 1e-5)))),
           Let("e", Transpose(x: AddNorm(a: Transpose(x: "x", perm: [0, 2, 3, 1]), b: Transpose(x: "z", perm: [0, 2, 3, 1]), gamma: "gc", beta: "bc", eps: 1e-5), perm: [0, 3, 1, 2])),
           Let("f", Transpose(x: AddNorm(a: Transpose(x: "x", perm: [0, 2, 3, 1]), b: Transpose(x: "z", perm: [0, 2, 3, 1]), gamma: "gc", rms: true, eps: 1e-6), perm: [0, 3, 1, 2])),
           Let("h", Transpose(x: LayerNorm(x: Transpose(x: "u", perm: [0, 2, 3, 1]), eps: 1e-5), perm: [0, 3, 1, 2])),
           Let("i", Mul(Div(Sub("x", Mean(x: "x", axes: [1, 2, 3], keepdims: true)), Sqrt(Add(Mean(x: Mul(Sub("x", Mean(x: "x", axes: [1, 2, 3], keepdims: true)), Sub("x", Mean(x: "x", axes: [1, 2, 3], keepdims: true))), axes: [1, 2, 3], keepdims: true), 1e-5))), "gt")),"#,
    ),
    (
        // Rows held in registers whole (128 of 32 × 4), with a ragged last slot (100, 384 of
        // 128 × 3), and rows read again on each pass (3000); integer sums over a row.
        "rows",
        r#"{ "x": (f32, [3, 100]), "r": (f32, [3, 100]), "y": (f32, [2, 384]), "s": (f32, [2, 128]), "z": (f32, [2, 3000]), "n": (i32, [3, 500]), "gamma": (f32, [384]) }"#,
        r#"Let("a", Softmax(x: "x", axis: 1)),
           Let("b", LogSoftmax(x: "y", axis: 1)),
           Let("c", Softmax(x: "s", axis: 1)),
           Let("d", LayerNorm(x: "y", eps: 1e-5)),
           Let("e", RmsNorm(x: "x", eps: 1e-6)),
           Let("f", AddNorm(a: "x", b: "r", eps: 1e-5)),
           Let("g", Softmax(x: "z", axis: 1)),
           Let("h", LayerNorm(x: "z", eps: 1e-5)),
           Let("i", Sum(x: "n", axes: [1])),
           Let("j", ReduceMax(x: "z", axes: [1])),
           Let("k", Mean(x: "y", axes: [1])),
           Let("l", Mul(LayerNorm(x: "y", eps: 1e-5), "gamma")),
           Let("m", Div("x", Sqrt(Mean(x: Mul("x", "x"), axes: [1], keepdims: true)))),"#,
    ),
    (
        "matmul",
        r#"{ "a": (f32, [2, 7, 12]), "b": (f32, [12, 5]), "c": (f32, [2, 12, 5]), "v": (f32, [12]), "bt": (f32, [5, 12]), "b1": (f32, [1, 5]) }"#,
        r#"Let("x", MatMul("a", "b")),
           Let("y", MatMul("a", "c")),
           Let("z", MatMul("a", "v")),
           Let("w", Relu(Add(MatMul("a", Transpose("bt")), 0.5))),
           Let("u", MatMul("v", "c")),
           Let("t", Add(MatMul("a", "b"), "b1")),
           Let("s", Mul(MatMul("a", "b"), Sigmoid(MatMul("a", "b")))),"#,
    ),
    (
        // Products at sizes that take every tile plan: whole 128×128 and 64×64 tiles (no
        // bounds checks), a transposed A and B, a broadcast batch with a bias, ragged edges in
        // every dimension and a k shorter than one tile.
        "matmul_tiles",
        r#"{ "p": (f32, [512, 64]), "q": (f32, [64, 512]), "ta": (f32, [64, 512]), "a3": (f32, [2, 128, 64]), "bt": (f32, [96, 64]), "c": (f32, [96]), "e": (f32, [130, 20]), "f": (f32, [20, 132]), "g": (f32, [3, 70]), "h": (f32, [70, 5]) }"#,
        r#"Let("x", MatMul("p", "q")),
           Let("y", MatMul(Transpose("ta"), "q")),
           Let("z", Add(MatMul("a3", Transpose("bt")), "c")),
           Let("w", Gelu(MatMul("e", "f"))),
           Let("u", MatMul("g", "h")),
           Let("s", Mul(Sigmoid(Add(MatMul("a3", Transpose("bt")), "c")), Add(MatMul("a3", Transpose("bt")), "c"))),"#,
    ),
    (
        "attention",
        r#"{ "q": (f32, [2, 3, 10, 8]), "k": (f32, [2, 3, 12, 8]), "v": (f32, [2, 3, 12, 8]), "m": (f32, [2, 1, 1, 12]), "w": (f32, [1, 2, 70, 136]) }"#,
        r#"Let("a", Attention(q: "q", k: "k", v: "v", scale: 0.35)),
           Let("b", Attention(q: "q", k: "k", v: "v", mask: "m", scale: 0.35)),
           Let("c", Attention(q: "q", k: "q", v: "q", causal: true, scale: 0.35)),
           Let("d", Attention(q: "w", k: "w", v: "w", causal: true, scale: 0.09)),"#,
    ),
    (
        // Attention written out with its masks as models write them: a masked fill of the
        // future positions, a causal mask of 0 and −inf added to the scores, a causal table
        // of a larger size cut to the scores', a padding mask as a masked fill, a learned
        // temperature per head, and masks filled with f32's lowest value: causal, and padding
        // that masks the second sequence throughout (uniform weights). Optimized, each is one
        // attention (four causal; the temperature scales q); unoptimized, the iotas, slices and
        // `where`s run.
        "attention_written",
        r#"{ "q": (f32, [2, 2, 10, 8]), "k": (f32, [2, 2, 10, 8]), "v": (f32, [2, 2, 10, 8]), "m": (f32, [2, 1, 1, 10]), "t": (f32, [2, 1, 1]) }"#,
        r#"Let("a", MatMul(Softmax(x: Where(Lt(Iota(shape: [10, 10], axis: 0), Iota(shape: [10, 10], axis: 1)), Scalar("-inf"), Mul(MatMul("q", Transpose("k")), 0.35)), axis: 3), "v")),
           Let("b", MatMul(Softmax(x: Add(Mul(MatMul("q", Transpose("k")), 0.35), Where(Gt(Iota(shape: [10, 10], axis: 1), Iota(shape: [10, 10], axis: 0)), Scalar("-inf", f32), 0.0)), axis: 3), "v")),
           Let("c", MatMul(Softmax(x: Where(Slice(x: Slice(x: Ge(Iota(shape: [16, 16], axis: 0), Iota(shape: [16, 16], axis: 1)), axis: 0, end: 10), axis: 1, end: 10), Mul(MatMul("q", Transpose("k")), 0.35), Scalar("-inf")), axis: 3), "v")),
           Let("d", MatMul(Softmax(x: Where(Lt("m", -1.0), Scalar("-inf"), Mul(MatMul("q", Transpose("k")), 0.35)), axis: 3), "v")),
           Let("e", MatMul(Softmax(x: Mul(Mul(MatMul("q", Transpose("k")), 0.35), "t"), axis: 3), "v")),
           Let("f", MatMul(Softmax(x: Where(Ge(Iota(shape: [10, 10], axis: 0), Iota(shape: [10, 10], axis: 1)), Mul(MatMul("q", Transpose("k")), 0.35), -3.4028234663852886e38), axis: 3), "v")),
           Let("g", MatMul(Softmax(x: Where(Ge(Iota(shape: [2, 1, 1, 10], axis: 0), 1), -3.4028234663852886e38, Mul(MatMul("q", Transpose("k")), 0.35)), axis: 3), "v")),"#,
    ),
    (
        // Grouped-query attention: 2 key and value heads repeated for 3 query heads each, as
        // reshape(broadcast_to(unsqueeze(k))). Optimized, one attention over the heads split
        // [2, 3] reads k and v through stride-0 views; unoptimized, the repeats are copies.
        "attention_grouped",
        r#"{ "q": (f32, [2, 6, 7, 8]), "k": (f32, [2, 2, 7, 8]), "v": (f32, [2, 2, 7, 8]) }"#,
        r#"Let("a", MatMul(Softmax(x: Mul(MatMul("q", Transpose(Reshape(BroadcastTo(x: Unsqueeze(x: "k", axis: 2), shape: [2, 2, 3, 7, 8]), [2, 6, 7, 8]))), 0.35), axis: 3), Reshape(BroadcastTo(x: Unsqueeze(x: "v", axis: 2), shape: [2, 2, 3, 7, 8]), [2, 6, 7, 8]))),"#,
    ),
    (
        // Register-tiled attention: 80 queries of 64 over 70 keys (ragged query blocks and key
        // tiles, a mask, value rows of 16), heads of 20 (value runs one lane each) and 100
        // causal queries of 32.
        "attention_tiles",
        r#"{ "x": (f32, [2, 2, 80, 64]), "y": (f32, [2, 2, 70, 64]), "yv": (f32, [2, 2, 70, 16]), "mm": (f32, [2, 1, 80, 70]), "t": (f32, [1, 3, 37, 20]), "s": (f32, [1, 2, 100, 32]) }"#,
        r#"Let("e", Attention(q: "x", k: "y", v: "y", mask: "mm", scale: 0.125)),
           Let("f", Attention(q: "x", k: "y", v: "yv", causal: true, scale: 0.125)),
           Let("g", Attention(q: "t", k: "t", v: "t", causal: true, scale: 0.2)),
           Let("h", Attention(q: "s", k: "s", v: "s", causal: true, scale: 0.17)),"#,
    ),
];

fn op_case(name: &str, inputs: &str, body: &str) -> Graph {
    let lets: Vec<&str> = body.split("Let(\"").skip(1).map(|s| s.split('"').next().unwrap_or("")).collect();
    let outputs: Vec<String> = lets.iter().map(|n| format!("{n:?}")).collect();
    let text = format!(
        "Model(name: {name:?}, config: {{}}, inputs: {inputs}, body: [{body}], outputs: [{}])",
        outputs.join(", ")
    );
    lower(name, &text)
}

fn op_families(device: Device) {
    for (name, inputs, body) in OP_CASES {
        let g = op_case(name, inputs, body);
        check_graph(&g, 1, 1e-4, device);
        check_graph(&optimized(&g), 2, 1e-4, device);
    }
}

#[test]
fn every_op_family_compiles_like_the_interpreter() {
    op_families(Device::Cpu);
}

#[test]
fn every_op_family_runs_on_vulkan_like_the_interpreter() {
    if available(Device::Vulkan, "op families") {
        op_families(Device::Vulkan);
    }
}

/// The math functions GPU kernels compute themselves on f64 (`mlir_text/f64_math.rs`), across
/// their ranges (into the subnormals), in units in the last place against the interpreter,
/// which calls the host's math library: what the op-family tolerance of 1e-4 cannot tell
/// apart. Each limit is the error its function was built to (see `docs/backends.md`) plus
/// one for the reference's own rounding.
const F64_MATH: &[(&str, &str, f64)] = &[
    ("exp", r#"Exp(Mul("x", 200.0))"#, 2.0),
    ("exp_small", r#"Exp(Mul("x", 1e-3))"#, 2.0),
    ("exp_subnormal", r#"Exp(Sub(Mul(Abs("x"), -12.0), 700.0))"#, 2.0),
    ("log", r#"Log(Abs("x"))"#, 2.0),
    ("log_near_one", r#"Log(Add(Mul("x", 1e-3), 1.0))"#, 2.0),
    ("log_huge", r#"Log(Mul(Abs("x"), 1e300))"#, 2.0),
    ("log_subnormal", r#"Log(Mul(Abs("x"), 1e-310))"#, 2.0),
    ("tanh", r#"Tanh(Mul("x", 4.0))"#, 3.0),
    ("tanh_small", r#"Tanh(Mul("x", 1e-4))"#, 3.0),
    ("erf", r#"Erf(Mul("x", 2.0))"#, 8.0),
    ("sin", r#"Sin(Mul("x", 10.0))"#, 3.0),
    ("cos", r#"Cos(Mul("x", 1e5))"#, 3.0),
    ("sigmoid", r#"Sigmoid(Mul("x", 10.0))"#, 4.0),
    // e^{y·ln x}: the product's rounding scales with it (|y·ln x| up to about 50 here).
    ("pow", r#"Pow(Abs("x"), Mul("x", 10.0))"#, 120.0),
];

/// Runs each of `cases` (name, expression of `x`, limit in ulps) on 4096 standard normal
/// values of `x` in `dtype` on `device`, and fails on the first whose largest error against
/// the interpreter passes its limit, naming the input, both values and the error.
fn math_within_ulps(dtype: &str, cases: &[(&str, &str, f64)], device: Device) {
    let body: String = cases.iter().map(|(name, e, _)| format!("Let({name:?}, {e}),")).collect();
    let g = op_case(&format!("{dtype}_math"), &format!(r#"{{ "x": ({dtype}, [4096]) }}"#), &body);
    let params = HashMap::new();
    let inputs = kiln_ir::seeded_inputs(&g, 11);
    let want =
        kiln_ir::eval(&g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
    let got = run_compiled(&g, &params, &inputs, device);
    let x = inputs["x"].to_f64_vec();
    // The distance from `a` to the next value of `dtype` away from zero.
    let ulp = |a: f64| match dtype {
        "f32" => f64::from(f32::from_bits((a.abs() as f32).to_bits() + 1)) - a.abs(),
        _ => f64::from_bits(a.abs().to_bits() + 1) - a.abs(),
    };
    for (((name, _, limit), (_, w)), gv) in cases.iter().zip(&want).zip(&got) {
        let wv = w.to_f64_vec();
        let (worst, at) = wv
            .iter()
            .zip(gv)
            .map(|(&a, &b)| if a == b || (a.is_nan() && b.is_nan()) { 0.0 } else { (a - b).abs() / ulp(a) })
            .enumerate()
            .fold((0.0, 0), |(m, at), (i, e)| if e > m || e.is_nan() { (e, i) } else { (m, at) });
        assert!(
            worst <= *limit,
            "{dtype} `{name}` on {device:?} is {worst:.2} ulp off at x = {:e}: host {:e}, device {:e} (limit {limit})",
            x[at],
            wv[at],
            gv[at]
        );
        eprintln!("{dtype} {name} on {device:?}: at most {worst:.2} ulp");
    }
}

#[test]
fn f64_math_on_vulkan_is_within_a_few_ulp_of_the_host_library() {
    if available(Device::Vulkan, "f64 math") {
        math_within_ulps("f64", F64_MATH, Device::Vulkan);
    }
}

#[test]
fn f64_math_on_cuda_is_within_a_few_ulp_of_the_host_library() {
    if available(Device::Cuda, "f64 math") {
        math_within_ulps("f64", F64_MATH, Device::Cuda);
    }
}

/// The f32 math functions of GPU kernels (`mlir_text.rs`), in ulps as [`F64_MATH`].
const F32_MATH: &[(&str, &str, f64)] = &[
    ("exp", r#"Exp(Mul("x", 25.0))"#, 2.0),
    ("exp_small", r#"Exp(Mul("x", 1e-3))"#, 2.0),
    // From 88.3 past f32's largest (e^88.72): the results up to it, then inf (the product by
    // 0.25 is exact, so the argument is the same whether or not it is fused into the add).
    ("exp_near_overflow", r#"Exp(Add(Mul(Abs("x"), 0.25), 88.3))"#, 2.0),
    ("log", r#"Log(Abs("x"))"#, 2.0),
    ("log_near_one", r#"Log(Add(Mul("x", 1e-3), 1.0))"#, 2.0),
    ("log_huge", r#"Log(Mul(Abs("x"), 1e30))"#, 2.0),
    ("tanh", r#"Tanh(Mul("x", 4.0))"#, 3.0),
    ("tanh_small", r#"Tanh(Mul("x", 1e-4))"#, 3.0),
    ("erf", r#"Erf(Mul("x", 2.0))"#, 5.0),
    ("sin", r#"Sin(Mul("x", 10.0))"#, 3.0),
    // The reduction's error is absolute (about |x|·1e-15), so arguments up to 5·10⁴ stay
    // accurate but their results near a zero of cos lose ulps; here |x| < 4000.
    ("cos", r#"Cos(Mul("x", 1e3))"#, 3.0),
    ("sigmoid", r#"Sigmoid(Mul("x", 10.0))"#, 4.0),
    ("pow", r#"Pow(Abs("x"), Mul("x", 3.0))"#, 20.0),
];

/// On the CPU, f32 exp, tanh and erf (and sigmoid through exp) are the same arithmetic as on
/// GPUs; log, sin, cos and pow go to MLIR's own lowering there.
#[test]
fn f32_exp_tanh_and_erf_on_the_cpu_are_within_a_few_ulp_of_the_host_library() {
    let shared = ["exp", "exp_small", "exp_near_overflow", "tanh", "tanh_small", "erf", "sigmoid"];
    let cases: Vec<(&str, &str, f64)> =
        F32_MATH.iter().filter(|(n, _, _)| shared.contains(n)).copied().collect();
    assert_eq!(cases.len(), shared.len());
    math_within_ulps("f32", &cases, Device::Cpu);
}

#[test]
fn f32_math_on_vulkan_is_within_a_few_ulp_of_the_host_library() {
    if available(Device::Vulkan, "f32 math") {
        math_within_ulps("f32", F32_MATH, Device::Vulkan);
    }
}

#[test]
fn f32_math_on_cuda_is_within_a_few_ulp_of_the_host_library() {
    if available(Device::Cuda, "f32 math") {
        math_within_ulps("f32", F32_MATH, Device::Cuda);
    }
}

#[test]
fn every_op_family_runs_on_cuda_like_the_interpreter() {
    if available(Device::Cuda, "op families") {
        op_families(Device::Cuda);
    }
}

/// The row kernels' warp shuffles (CUDA's plans for softmax, norms and long reductions),
/// checked on the Vulkan device: the same plans rendered for SPIR-V, each shuffle emulated
/// through shared memory, so the lanes' and warps' bookkeeping around them runs here.
#[test]
fn row_warp_shuffles_hold_on_vulkan_with_emulated_shuffles() {
    if !available(Device::Vulkan, "row warp shuffles") {
        return;
    }
    let caps = kiln_codegen::gpu::GpuCaps { subgroup_size: Some(32), ..kiln_codegen::gpu::GpuCaps::vulkan() };
    for (name, inputs, body) in
        OP_CASES.iter().filter(|(n, _, _)| ["math", "reduce", "fused", "rows"].contains(n))
    {
        let g = optimized(&op_case(name, inputs, body));
        let params = kiln_ir::bind_params(&g, None, 3, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let built = build_vulkan_with(&g, &params, &caps, dir.path());
        let shuffled = built
            .program
            .kernels
            .iter()
            .filter(|k| matches!(k.plan.work, kiln_codegen::gpu::Work::Rows { warp: Some(32), .. }))
            .count();
        assert!(shuffled > 0, "{name}: no row plan combines by warp shuffles");
        check_artifact_at(dir.path(), &g, &params, &[], 1e-4, &format!("{name} (emulated shuffles)"));
    }
}

/// A one-layer seed transformer with heads of 16 over a run-time batch (1 to 4) and sequence
/// (1 to 64), optimized.
fn small_dynamic_seed_transformer() -> Graph {
    optimized(&shipped(
        "seed_transformer.ron",
        &[
            "batch=Dyn(min: 1, max: 4, hint: 2)",
            "seq=Dyn(min: 1, max: 64, hint: 32)",
            "layers=1",
            "d_model=32",
            "heads=2",
            "d_ff=64",
            "input_dim=50",
        ],
    ))
}

/// Register-tiled attention (GPU attention without tensor cores, for heads that are multiples
/// of 4 up to 128), checked on the Vulkan device in three plans: Vulkan's own (64 registers,
/// so at most 2 queries per invocation for heads of 64); CUDA's register budget, where heads
/// of 32 take 4 queries per invocation in groups of 8 lanes (each group's maxima and sums
/// combined through shared memory where CUDA shuffles); and one query per invocation
/// (`attention_per_query`), the plan the tiles replace. Graphs: the attention op cases, a
/// log-sum-exp with and without the attention, and shipped models with heads of 16, one of
/// them over run-time sizes.
#[test]
fn tiled_attention_holds_on_vulkan_in_every_plan() {
    use kiln_codegen::gpu::{GpuCaps, Work};
    if !available(Device::Vulkan, "tiled attention") {
        return;
    }
    let vulkan = GpuCaps::vulkan();
    let cuda_budget = GpuCaps { registers: 255, max_workgroup_invocations: 1024, ..vulkan.clone() };
    let per_query = GpuCaps { attention_per_query: true, ..cuda_budget.clone() };
    let mut graphs: Vec<(Graph, Vec<Vec<i64>>)> = OP_CASES
        .iter()
        .filter(|(n, _, _)| n.starts_with("attention"))
        .map(|(name, inputs, body)| (op_case(name, inputs, body), vec![]))
        .collect();
    graphs.extend(attention_lse_graphs_sized(37, 45, 16, 16).into_iter().map(|(g, _)| (g, vec![])));
    graphs.push((
        optimized(&shipped(
            "bert_encoder.ron",
            &["layers=1", "seq=32", "hidden=64", "heads=4", "ffn=128", "vocab=500"],
        )),
        vec![],
    ));
    graphs.push((small_dynamic_seed_transformer(), vec![vec![2, 40], vec![1, 64], vec![3, 17], vec![1, 1]]));
    // Per plan: the (rows, lanes) of its tiled attentions that must occur, or none for one
    // query per invocation.
    let plans = [
        ("vulkan", &vulkan, Some((2, 8))),
        ("cuda budget", &cuda_budget, Some((4, 8))),
        ("per query", &per_query, None::<(u32, u32)>),
    ];
    for (plan_name, caps, wanted) in plans {
        let mut seen = std::collections::HashSet::new();
        for (g, runs) in &graphs {
            let params = kiln_ir::bind_params(g, None, 3, false).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let built = build_vulkan_with(g, &params, caps, dir.path());
            for k in &built.program.kernels {
                match k.plan.work {
                    Work::AttentionTiled { rows, lanes, .. } => {
                        assert!(wanted.is_some(), "{plan_name} {}: a tiled attention", g.name);
                        seen.insert((rows, lanes));
                    }
                    Work::Attention { .. } => {
                        seen.insert((1, 1));
                    }
                    _ => {}
                }
            }
            check_artifact_at(dir.path(), g, &params, runs, 1e-4, &format!("{plan_name} {}", g.name));
        }
        match wanted {
            Some(plan) => {
                assert!(seen.contains(&plan), "{plan_name}: no tiled attention of {plan:?} in {seen:?}")
            }
            None => assert_eq!(seen, [(1, 1)].into_iter().collect(), "{plan_name}"),
        }
    }
}

/// The op families over f32 tensors with those in `dtype` (`f16`, `bf16`), named `NAME_DTYPE`, and
/// attention whose heads the 16-bit tensor-core products tile (multiples of 16).
fn half_op_cases(dtype: &str) -> Vec<Graph> {
    let mut graphs: Vec<Graph> = OP_CASES
        .iter()
        .filter(|(_, inputs, _)| inputs.contains("(f32,"))
        .map(|(name, inputs, body)| {
            let body = body
                .replace("init: Normal(std: 0.3)", &format!("init: Normal(std: 0.3), dtype: {dtype}"))
                .replace(r#"Scalar("-inf", f32)"#, &format!(r#"Scalar("-inf", {dtype})"#));
            op_case(&format!("{name}_{dtype}"), &inputs.replace("(f32,", &format!("({dtype},")), &body)
        })
        .collect();
    graphs.push(op_case(
        &format!("attention_heads_{dtype}"),
        &format!(
            r#"{{ "q": ({dtype}, [1, 2, 70, 16]), "k": ({dtype}, [1, 2, 75, 16]), "v": ({dtype}, [1, 2, 75, 32]), "m": ({dtype}, [1, 1, 70, 75]) }}"#
        ),
        r#"Let("a", Attention(q: "q", k: "k", v: "v", mask: "m", scale: 0.25)),
           Let("c", Attention(q: "q", k: "q", v: "q", causal: true, scale: 0.25)),"#,
    ));
    graphs
}

/// 16-bit results differ from the interpreter's by their own rounding (f16 keeps 11 bits,
/// bf16 8) where sums are formed in another order: 2e-3·(1 + |ref|) for f16 on Vulkan. On
/// tensor cores attention rounds its weights to the tensors' precision too: stated
/// tolerances 1e-2·(1 + |ref|) for f16 and 5e-2·(1 + |ref|) for bf16.
fn half_op_families(dtype: &str, tolerance: f64, device: Device) {
    for g in half_op_cases(dtype) {
        check_graph(&g, 1, tolerance, device);
        check_graph(&optimized(&g), 2, tolerance, device);
    }
}

#[test]
fn every_op_family_runs_on_vulkan_in_f16_like_the_interpreter() {
    if available(Device::Vulkan, "f16 op families") {
        half_op_families("f16", 2e-3, Device::Vulkan);
    }
}

#[test]
fn every_op_family_runs_on_cuda_in_f16_and_bf16_on_tensor_cores_within_their_tolerance() {
    if available(Device::Cuda, "f16 and bf16 op families") {
        half_op_families("f16", 1e-2, Device::Cuda);
        half_op_families("bf16", 5e-2, Device::Cuda);
    }
}

/// TF32 keeps 10 of f32's 23 mantissa bits in products' operands (accumulation stays f32):
/// its stated tolerance here is 1e-2·(1 + |ref|).
#[test]
fn every_op_family_runs_on_cuda_tensor_cores_within_tf32_tolerance() {
    if available(Device::CudaTf32, "op families on tensor cores") {
        for (name, inputs, body) in OP_CASES {
            let g = op_case(name, inputs, body);
            check_graph(&g, 1, 1e-2, Device::CudaTf32);
            check_graph(&optimized(&g), 2, 1e-2, Device::CudaTf32);
        }
    }
}

/// Every shipped model's spec, in `models/`.
const SHIPPED: [&str; 6] =
    ["mlp.ron", "bert_encoder.ron", "seed_transformer.ron", "resnet_block.ron", "lstm.ron", "gpt2.ron"];

fn shipped(model: &str, set: &[&str]) -> Graph {
    spec_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(model), set)
}

/// The graph of the spec at `path` with the config overrides `set` (`NAME=VALUE`).
fn spec_graph(path: &Path, set: &[&str]) -> Graph {
    let ov: Vec<kiln_lower::Override> = set.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
    let (sources, l) = kiln_lower::load(path, &ov);
    match l {
        Ok(l) => l.graph,
        Err(d) => panic!("{}", d.render(&sources)),
    }
}

fn shipped_models(device: Device) {
    for model in SHIPPED {
        check_graph(&optimized(&shipped(model, &[])), 0, 1e-4, device);
    }
}

#[test]
fn shipped_models_compile_like_the_interpreter() {
    shipped_models(Device::Cpu);
}

/// Small BERT and GPT-2 with a dynamic batch and sequence length (as `tests/specs.rs` makes
/// them), compiled once for the CPU: at batch and sequence 1 (GPT-2's smallest sequence is 8),
/// the hints, sizes that are no multiple of any tile and the maxima, every output matches the
/// interpreter on the same inputs.
#[test]
fn dynamic_bert_and_gpt2_compile_once_and_match_the_interpreter_at_every_size() {
    dynamic_bert_and_gpt2(Device::Cpu);
}

/// The same on Vulkan: one artifact whose kernels read the run's sizes and whose grids follow
/// them.
#[test]
fn dynamic_bert_and_gpt2_run_on_vulkan_like_the_interpreter_at_every_size() {
    if available(Device::Vulkan, "dynamic BERT and GPT-2") {
        dynamic_bert_and_gpt2(Device::Vulkan);
    }
}

#[test]
fn dynamic_bert_and_gpt2_run_on_cuda_like_the_interpreter_at_every_size() {
    if available(Device::Cuda, "dynamic BERT and GPT-2") {
        dynamic_bert_and_gpt2(Device::Cuda);
    }
}

fn dynamic_bert_and_gpt2(device: Device) {
    let cases = [
        (
            "bert_encoder.ron",
            r#""batch": 1, "seq": 128,"#,
            r#""batch": Dyn(min: 1, max: 4, hint: 2), "seq": Dyn(min: 1, max: "max_positions", hint: 16),"#,
            vec!["layers=1", "hidden=32", "heads=2", "ffn=64", "vocab=50", "max_positions=64"],
            vec![[1, 1], [2, 16], [3, 13], [4, 64]],
        ),
        (
            "gpt2.ron",
            r#""batch": 1, "seq": 64,"#,
            r#""batch": Dyn(min: 1, max: 4, hint: 2), "seq": Dyn(min: 8, max: "ctx", hint: 16, multiple_of: 8),"#,
            vec!["layers=1", "d=32", "heads=2", "vocab=50", "ctx=64", "eps=1e-5"],
            vec![[1, 8], [2, 16], [3, 40], [4, 64]],
        ),
    ];
    for (model, entry, decl, small, bindings) in cases {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(model);
        let text = std::fs::read_to_string(path).unwrap().replacen(entry, decl, 1);
        let ov: Vec<kiln_lower::Override> =
            small.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
        let (sources, l) = kiln_lower::load_str(model, &text, &ov);
        let g = match l {
            Ok(l) => optimized(&l.graph),
            Err(d) => panic!("{}", d.render(&sources)),
        };
        assert_eq!(g.symbols.len(), 2, "{model} is symbolic");
        compiles_once_like_the_interpreter(&g, model, &bindings, device);
    }
}

/// Compiles symbolic graph `g` once for `device` and runs it at each binding of `bindings`
/// against the interpreter on the same seeded inputs, within 1e-4·(1 + |ref|).
fn compiles_once_like_the_interpreter(
    g: &Graph,
    model: &str,
    bindings: &[impl AsRef<[i64]>],
    device: Device,
) {
    let params = kiln_ir::bind_params(g, None, 0, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    build_for(device, g, &params, dir.path());
    for values in bindings {
        let values = values.as_ref();
        let seed = values.iter().map(|&v| v as u64).sum();
        let inputs = kiln_ir::seeded_inputs(&g.specialize(values).unwrap(), seed);
        let want = kiln_ir::eval(g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() })
            .unwrap_or_else(|e| panic!("{model} at {values:?}: {e}"));
        let got = run_artifact(dir.path(), &inputs, model);
        for ((name, w), gv) in want.iter().zip(&got) {
            let wv = w.to_f64_vec();
            assert_eq!(wv.len(), gv.len(), "{model} at {values:?}: `{name}` length");
            for (i, (a, b)) in wv.iter().zip(gv).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                    "{model} at {values:?}: `{name}`[{i}]: interpreter {a}, compiled {b}"
                );
            }
        }
    }
}

/// The other shipped models with a batch (and a sequence length), made dynamic by `--set
/// NAME=Dyn(…)` and compiled once for the CPU, match the interpreter at 1, sizes in between and
/// the maxima.
#[test]
fn shipped_models_made_dynamic_by_set_match_the_interpreter_at_every_size() {
    shipped_models_made_dynamic(Device::Cpu);
}

#[test]
fn shipped_models_made_dynamic_run_on_vulkan_like_the_interpreter_at_every_size() {
    if available(Device::Vulkan, "shipped models made dynamic") {
        shipped_models_made_dynamic(Device::Vulkan);
    }
}

#[test]
fn shipped_models_made_dynamic_run_on_cuda_like_the_interpreter_at_every_size() {
    if available(Device::Cuda, "shipped models made dynamic") {
        shipped_models_made_dynamic(Device::Cuda);
    }
}

fn shipped_models_made_dynamic(device: Device) {
    // (model, its `--set`s, the symbol values to run at)
    type Case = (&'static str, Vec<&'static str>, Vec<Vec<i64>>);
    let cases: [Case; 4] = [
        ("mlp.ron", vec!["batch=Dyn(min: 1, max: 64, hint: 8)"], vec![vec![1], vec![13], vec![64]]),
        ("lstm.ron", vec!["batch=Dyn(min: 1, max: 8, hint: 4)", "steps=5"], vec![vec![1], vec![3], vec![8]]),
        (
            "seed_transformer.ron",
            vec![
                "batch=Dyn(min: 1, max: 4, hint: 2)",
                "seq=Dyn(min: 1, max: 64, hint: 32)",
                "layers=1",
                "d_model=32",
                "heads=2",
                "d_ff=64",
                "input_dim=50",
            ],
            vec![vec![1, 1], vec![2, 32], vec![3, 17], vec![4, 64]],
        ),
        ("resnet_block.ron", vec!["batch=Dyn(min: 1, max: 4, hint: 2)"], vec![vec![1], vec![3], vec![4]]),
    ];
    for (model, sets, bindings) in cases {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(model);
        let ov: Vec<kiln_lower::Override> =
            sets.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
        let (sources, l) = kiln_lower::load(&path, &ov);
        let g = match l {
            Ok(l) => optimized(&l.graph),
            Err(d) => panic!("{}", d.render(&sources)),
        };
        assert_eq!(g.symbols.len(), bindings[0].len(), "{model} is symbolic");
        compiles_once_like_the_interpreter(&g, model, &bindings, device);
    }
}

/// Norms over the channels of `[N, C, H, W]` with the batch or the height and width known at
/// run time only (`tests/gpu_check/channel_norms.ron`): over a run-time batch the norm reads
/// and writes through the transposes at static strides, and the softmax over the channels
/// runs on rows of a run-time count; over a run-time height and width the rows' stride is a
/// run-time size, so the scheduler copies each norm's input into rows once first, and the
/// softmax walks its channels at that stride, one row per pixel.
fn channel_norms_with_run_time_sizes(device: Device) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpu_check/channel_norms.ron");
    let cases: [(&str, Vec<Vec<i64>>); 2] = [
        ("n=Dyn(min: 1, max: 4, hint: 2)", vec![vec![1], vec![3], vec![4]]),
        ("hw=Dyn(min: 1, max: 32, hint: 28)", vec![vec![1], vec![7], vec![32]]),
    ];
    for (set, bindings) in cases {
        let g = optimized(&spec_graph(&path, &[set, "c=24"]));
        let norms = g
            .node_ids()
            .filter(|&n| matches!(g.node(n).op, Op::LayerNorm { .. } | Op::RmsNorm { .. }))
            .count();
        assert_eq!(norms, 3, "{set}: every norm fused");
        compiles_once_like_the_interpreter(&g, set, &bindings, device);
    }
}

#[test]
fn channel_norms_with_run_time_sizes_match_the_interpreter() {
    channel_norms_with_run_time_sizes(Device::Cpu);
}

#[test]
fn channel_norms_with_run_time_sizes_run_on_vulkan_like_the_interpreter() {
    if available(Device::Vulkan, "channel norms with run-time sizes") {
        channel_norms_with_run_time_sizes(Device::Vulkan);
    }
}

#[test]
fn channel_norms_with_run_time_sizes_run_on_cuda_like_the_interpreter() {
    if available(Device::Cuda, "channel norms with run-time sizes") {
        channel_norms_with_run_time_sizes(Device::Cuda);
    }
}

/// Data movement and reductions along run-time extents, each compiled once and run at several
/// sizes, the bounds included: pooling and softmax (`tests/gpu_check/pooling.ron`) over a
/// run-time sequence, over an image of run-time size, and over a static axis behind a run-time
/// batch; a decoder step joining its key/value cache to the new tokens' along the sequence
/// (`tests/gpu_check/kv_cache.ron`), at run-time cache and prompt lengths; convolution and
/// pooling over a sequence and an image of run-time size (`tests/gpu_check/windows.ron`), and
/// over a static image behind a run-time batch.
fn pooling_and_caches_with_run_time_sizes(device: Device) {
    type Case = (&'static str, Vec<&'static str>, Vec<Vec<i64>>);
    let cases: [Case; 6] = [
        (
            "pooling.ron",
            vec!["batch=Dyn(min: 1, max: 4, hint: 2)", "seq=Dyn(min: 1, max: 40, hint: 16)"],
            vec![vec![1, 1], vec![3, 7], vec![4, 40]],
        ),
        ("pooling.ron", vec!["hw=Dyn(min: 1, max: 12, hint: 6)"], vec![vec![1], vec![5], vec![12]]),
        ("pooling.ron", vec!["batch=Dyn(min: 1, max: 5, hint: 2)"], vec![vec![1], vec![5]]),
        (
            "kv_cache.ron",
            vec!["past=Dyn(min: 1, max: 60, hint: 20)", "seq=Dyn(min: 1, max: 16, hint: 1)"],
            vec![vec![1, 1], vec![20, 1], vec![7, 16], vec![60, 16]],
        ),
        (
            "windows.ron",
            vec![
                "batch=Dyn(min: 1, max: 3, hint: 2)",
                "seq=Dyn(min: 1, max: 40, hint: 16)",
                "hw=Dyn(min: 1, max: 12, hint: 6)",
            ],
            vec![vec![1, 1, 1], vec![2, 2, 2], vec![3, 7, 5], vec![2, 40, 12]],
        ),
        ("windows.ron", vec!["batch=Dyn(min: 1, max: 5, hint: 2)"], vec![vec![1], vec![5]]),
    ];
    for (spec, sets, bindings) in cases {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpu_check").join(spec);
        let g = optimized(&spec_graph(&path, &sets));
        assert_eq!(g.symbols.len(), bindings[0].len(), "{spec} {sets:?} is symbolic");
        compiles_once_like_the_interpreter(&g, &format!("{spec} {}", sets.join(" ")), &bindings, device);
    }
}

#[test]
fn pooling_and_caches_with_run_time_sizes_match_the_interpreter() {
    pooling_and_caches_with_run_time_sizes(Device::Cpu);
}

#[test]
fn pooling_and_caches_with_run_time_sizes_run_on_vulkan_like_the_interpreter() {
    if available(Device::Vulkan, "pooling and caches with run-time sizes") {
        pooling_and_caches_with_run_time_sizes(Device::Vulkan);
    }
}

#[test]
fn pooling_and_caches_with_run_time_sizes_run_on_cuda_like_the_interpreter() {
    if available(Device::Cuda, "pooling and caches with run-time sizes") {
        pooling_and_caches_with_run_time_sizes(Device::Cuda);
    }
}

#[test]
fn shipped_models_run_on_vulkan_like_the_interpreter() {
    if available(Device::Vulkan, "shipped models") {
        shipped_models(Device::Vulkan);
    }
}

#[test]
fn shipped_models_run_on_cuda_like_the_interpreter() {
    if available(Device::Cuda, "shipped models") {
        shipped_models(Device::Cuda);
    }
}

/// A decoder block written out by hand (`llama_block_written_out.ron`: RMS norms, rotary
/// positions, grouped-query attention, a masked-fill causal mask, a SwiGLU feed-forward),
/// optimized into its fused ops (a causal attention, RMS norms, a SiLU epilogue), computes what
/// the interpreter computes on every device there is (`every_written_form_fuses` holds the
/// optimized graph to the written one). Scheduled, it copies nothing: the attention reads the
/// shared key and value heads at stride 0 and writes its heads, split in two, straight into the
/// layout the output projection reads.
#[test]
fn a_decoder_block_written_out_runs_like_the_interpreter() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("compiler/opt/tests/variants/llama_block_written_out.ron");
    let written = spec_graph(&path, &[]);
    let opt = optimized(&written);
    let silu = Op::MatMulEpilogue { bias: false, activation: kiln_ir::Activation::Silu };
    let causal = |op: &Op| matches!(op, Op::Attention { causal: true, masked: false, .. });
    assert!(opt.node_ids().any(|n| opt.node(n).op == silu), "no SiLU epilogue");
    assert!(opt.node_ids().any(|n| causal(&opt.node(n).op)), "no causal attention");
    let schedule = kiln_sched::schedule(&opt).expect("schedules");
    let names: Vec<String> = schedule.kernels.iter().map(|k| k.name()).collect();
    assert!(!names.iter().any(|n| n == "copy"), "a copy kernel: {names:?}");
    for device in [Device::Cpu, Device::Vulkan, Device::Cuda] {
        if device == Device::Cpu || available(device, "a written decoder block") {
            check_graph(&opt, 3, 1e-4, device);
        }
    }
}

#[test]
fn shipped_models_run_on_cuda_tensor_cores_within_tf32_tolerance() {
    if available(Device::CudaTf32, "shipped models on tensor cores") {
        for model in SHIPPED {
            check_graph(&optimized(&shipped(model, &[])), 0, 1e-2, Device::CudaTf32);
        }
    }
}

/// With operands split in two TF32 parts (`--precision tf32x3`), products and attention on
/// tensor cores keep f32's tolerance, 1e-4·(1 + |ref|), on every shipped model and op family.
#[test]
fn shipped_models_run_on_cuda_tf32x3_tensor_cores_within_f32_tolerance() {
    if available(Device::CudaTf32x3, "shipped models on tensor cores with split operands") {
        for model in SHIPPED {
            check_graph(&optimized(&shipped(model, &[])), 0, 1e-4, Device::CudaTf32x3);
        }
        for (name, inputs, body) in OP_CASES {
            check_graph(&optimized(&op_case(name, inputs, body)), 2, 1e-4, Device::CudaTf32x3);
        }
    }
}

/// A random graph of elementwise ops, broadcasts, transposes and reductions over f32 inputs.
fn random_graph(ops: &[(u8, u8, u8)]) -> Graph {
    let mut g = Graph::new("random");
    let shape = vec![3, 4, 5];
    let input = |g: &mut Graph, name: &str, shape: Vec<usize>| {
        g.add(Op::Input { name: name.into(), dtype: DType::F32, shape: kiln_ir::dims(&shape) }, &[]).unwrap()
    };
    let mut pool =
        vec![input(&mut g, "x", shape.clone()), input(&mut g, "y", vec![4, 1]), input(&mut g, "z", vec![5])];
    for &(kind, a, b) in ops {
        let x = pool[a as usize % pool.len()];
        let y = pool[b as usize % pool.len()];
        let unary =
            [kiln_ir::UnaryOp::Exp, kiln_ir::UnaryOp::Tanh, kiln_ir::UnaryOp::Neg, kiln_ir::UnaryOp::Sigmoid];
        let binary =
            [kiln_ir::BinaryOp::Add, kiln_ir::BinaryOp::Mul, kiln_ir::BinaryOp::Sub, kiln_ir::BinaryOp::Max];
        let node = match kind % 5 {
            0 => {
                // Keep exp's argument small so values stay comparable.
                let t = g.add(Op::Unary(kiln_ir::UnaryOp::Tanh), &[x]).unwrap();
                g.add(Op::Unary(unary[b as usize % 4]), &[t]).ok()
            }
            1 | 2 => g.add(Op::Binary(binary[(a ^ b) as usize % 4]), &[x, y]).ok(),
            3 => {
                let r = g.ty(x).shape.len();
                let perm: Vec<usize> = (0..r).rev().collect();
                g.add(Op::Transpose { perm }, &[x]).ok()
            }
            _ => {
                let r = g.ty(x).shape.len();
                if r == 0 {
                    None
                } else {
                    g.add(
                        Op::Reduce {
                            op: kiln_ir::ReduceOp::Sum,
                            axes: vec![b as usize % r],
                            keepdims: a % 2 == 0,
                        },
                        &[x],
                    )
                    .ok()
                }
            }
        };
        if let Some(n) = node {
            pool.push(n);
        }
    }
    let last = *pool.last().expect("inputs");
    g.add_output("out", last);
    if pool.len() > 4 {
        g.add_output("mid", pool[pool.len() / 2 + 1]);
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn random_graphs_compile_like_the_interpreter(ops in prop::collection::vec((0u8..10, 0u8..20, 0u8..20), 1..10)) {
        let g = random_graph(&ops);
        check_graph(&g, 3, 1e-4, Device::Cpu);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]
    #[test]
    fn random_graphs_run_on_vulkan_like_the_interpreter(ops in prop::collection::vec((0u8..10, 0u8..20, 0u8..20), 1..10)) {
        // Where there is no device, the first case says so once and every case is skipped.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            available(Device::Vulkan, "random graphs");
        });
        if vulkan_missing().is_none() {
            let g = random_graph(&ops);
            check_graph(&g, 3, 1e-4, Device::Vulkan);
        }
    }

    #[test]
    fn random_graphs_run_on_cuda_like_the_interpreter(ops in prop::collection::vec((0u8..10, 0u8..20, 0u8..20), 1..10)) {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            available(Device::Cuda, "random graphs");
        });
        if cuda_arch().is_ok() {
            let g = random_graph(&ops);
            check_graph(&g, 3, 1e-4, Device::Cuda);
        }
    }
}

#[test]
fn aarch64_artifacts_are_arm_shared_objects() {
    let g = optimized(&shipped("mlp.ron", &[]));
    let s = kiln_sched::schedule(&g).unwrap();
    let params = kiln_ir::bind_params(&g, None, 0, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    kiln_codegen::build_artifact("mlp", &s, &params, &kiln_codegen::CpuTarget::aarch64(), dir.path())
        .unwrap();
    let so = std::fs::read(dir.path().join("kernels.so")).unwrap();
    // ELF, 64-bit, little-endian, shared object (ET_DYN = 3), machine EM_AARCH64 (183).
    assert_eq!(&so[..4], b"\x7fELF");
    assert_eq!((so[4], so[5]), (2, 1));
    assert_eq!(u16::from_le_bytes([so[16], so[17]]), 3, "a shared object");
    assert_eq!(u16::from_le_bytes([so[18], so[19]]), 183, "for AArch64");
    if let Ok(out) = std::process::Command::new("file").arg(dir.path().join("kernels.so")).output() {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ARM aarch64") && text.contains("shared object"), "{text}");
    }
    // The runtime refuses it here, naming both architectures.
    if std::env::consts::ARCH != "aarch64" {
        let err = match Model::load(dir.path()) {
            Ok(_) => panic!("an AArch64 artifact loaded on {}", std::env::consts::ARCH),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("aarch64"), "{err}");
    }
}

/// What `kiln ARGS` printed on stdout, asserting that it succeeded.
fn kiln_says(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(out.status.success(), "kiln {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `kiln` with `args`, which must exit with `code`, saying `message` on stderr.
fn kiln_refuses(args: &[&str], code: i32, message: &str) {
    let out = kiln(args);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(code) && said.contains(message),
        "kiln {}: {:?} {said}",
        args.join(" "),
        out.status
    );
}

fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .expect("run kiln")
}

#[test]
fn cli_compiles_runs_and_refuses_damaged_artifacts() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("mlp.kiln");
    let art_s = art.to_str().unwrap();
    let out = kiln(&["compile", "models/mlp.ron", "-o", art_s]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("compiled `mlp` for host"), "{text}");

    // The artifact and the in-memory path agree with each other.
    let aot = kiln(&["run", art_s, "--repeats", "2", "--profile"]);
    assert!(aot.status.success(), "{}", String::from_utf8_lossy(&aot.stderr));
    let aot = String::from_utf8_lossy(&aot.stdout).into_owned();
    assert!(aot.contains("arena"), "the profile names the arena:\n{aot}");
    let jit = kiln(&["run", "models/mlp.ron", "--repeats", "1"]);
    assert!(jit.status.success(), "{}", String::from_utf8_lossy(&jit.stderr));
    let jit = String::from_utf8_lossy(&jit.stdout).into_owned();
    let probs = |s: &str| s.lines().find(|l| l.starts_with("probs:")).map(str::to_owned);
    assert_eq!(probs(&aot), probs(&jit), "same model, same seed, same numbers");
    assert!(probs(&jit).is_some(), "{jit}");

    // A truncated weights file is refused by name, with exit status 1.
    let weights = art.join("weights.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let bad = kiln(&["run", art_s]);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("weights.safetensors"), "{err}");

    let usage = kiln(&["compile", "models/mlp.ron", "--target", "riscv64", "-o", art_s]);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("unknown target `riscv64`"));
}

// ------------------------------------------------------------------------------------- Vulkan

/// Compiles `g` for the Vulkan target into `dir` (a schedule aligned for its bindings).
fn build_vulkan(g: &Graph, params: &HashMap<String, Tensor>, dir: &Path) -> kiln_codegen::BuiltGpu {
    build_vulkan_with(g, params, &kiln_codegen::gpu::GpuCaps::vulkan(), dir)
}

/// [`build_vulkan`] with `caps` (another device's plans rendered for the Vulkan device).
fn build_vulkan_with(
    g: &Graph,
    params: &HashMap<String, Tensor>,
    caps: &kiln_codegen::gpu::GpuCaps,
    dir: &Path,
) -> kiln_codegen::BuiltGpu {
    let s = kiln_sched::schedule_aligned(g, caps.buffer_align).expect("schedules");
    kiln_codegen::build_vulkan_artifact(&g.name, &s, params, caps, dir)
        .unwrap_or_else(|e| panic!("{}: {e}", g.name))
}

/// Compiles `g` with `caps` for the Vulkan device, hands its kernels' plans to `check` (before
/// anything runs), then runs it against the interpreter (inputs and parameters of seed 5):
/// every value within `tolerance`·(1 + |ref|).
fn plans_hold_on_vulkan(
    g: &Graph,
    caps: &kiln_codegen::gpu::GpuCaps,
    tolerance: f64,
    check: impl FnOnce(&[kiln_codegen::gpu::GpuPlan]),
) {
    plans_hold_on_vulkan_prepared(g, caps, tolerance, |_, _| {}, check);
}

/// [`plans_hold_on_vulkan`] with the graph and its parameters changed by `prepare` between the
/// interpreter's reference and the build, as `kiln compile` prepares a model for its target
/// (folded weights stored as the target's products read them).
fn plans_hold_on_vulkan_prepared(
    g: &Graph,
    caps: &kiln_codegen::gpu::GpuCaps,
    tolerance: f64,
    prepare: impl FnOnce(&mut Graph, &mut HashMap<String, Tensor>),
    check: impl FnOnce(&[kiln_codegen::gpu::GpuPlan]),
) {
    let mut params = kiln_ir::bind_params(g, None, 5, false).unwrap();
    let inputs = kiln_ir::seeded_inputs(g, 5);
    let want =
        kiln_ir::eval(g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
    let mut g = g.clone();
    prepare(&mut g, &mut params);
    let g = &g;
    let dir = tempfile::tempdir().unwrap();
    let built = build_vulkan_with(g, &params, caps, dir.path());
    let plans: Vec<kiln_codegen::gpu::GpuPlan> =
        built.program.kernels.iter().map(|k| k.plan.clone()).collect();
    check(&plans);
    let got = run_artifact(dir.path(), &inputs, &g.name);
    for ((out, w), gv) in want.iter().zip(&got) {
        for (i, (a, b)) in w.to_f64_vec().iter().zip(gv).enumerate() {
            assert!(
                (a - b).abs() <= tolerance * (1.0 + a.abs()),
                "{} `{out}`[{i}]: interpreter {a}, Vulkan {b}",
                g.name
            );
        }
    }
}

/// The plans' descriptions, for a failure's message.
fn described(plans: &[kiln_codegen::gpu::GpuPlan]) -> Vec<String> {
    plans.iter().map(|p| p.describe()).collect()
}

/// `spirv-val` over every module of a built artifact; `None` when the tool is missing.
fn spirv_val(built: &kiln_codegen::BuiltGpu, what: &str) -> Option<()> {
    let dir = tempfile::tempdir().unwrap();
    for m in &built.modules {
        let path = dir.path().join(format!("{}.spv", m.symbol));
        std::fs::write(&path, &m.words).unwrap();
        let out = match std::process::Command::new("spirv-val")
            .arg("--target-env")
            .arg("vulkan1.1")
            .arg(&path)
            .output()
        {
            Ok(out) => out,
            Err(_) => return None,
        };
        assert!(
            out.status.success(),
            "{what}: kernel {} is not valid SPIR-V:\n{}\n{}",
            m.symbol,
            String::from_utf8_lossy(&out.stderr),
            m.text
        );
    }
    Some(())
}

#[test]
fn vulkan_kernels_are_valid_spirv() {
    let mut graphs: Vec<Graph> = Vec::new();
    for (name, inputs, body) in OP_CASES {
        let g = op_case(name, inputs, body);
        graphs.push(optimized(&g));
        graphs.push(g);
    }
    for model in SHIPPED {
        graphs.push(optimized(&shipped(model, &[])));
    }
    graphs.extend(scatter_graphs());
    graphs.extend(attention_lse_graphs().into_iter().map(|(g, _)| g));
    for g in &graphs {
        let params = kiln_ir::bind_params(g, None, 0, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let built = build_vulkan(g, &params, dir.path());
        if spirv_val(&built, &g.name).is_none() {
            eprintln!("skipped: spirv-val is not installed (Debian package spirv-tools)");
            return;
        }
    }
}

#[test]
fn cli_compiles_inspects_and_runs_for_vulkan() {
    let gpu = kiln(&["inspect", "models/mlp.ron", "--stage", "gpu"]);
    assert!(gpu.status.success(), "{}", String::from_utf8_lossy(&gpu.stderr));
    let gpu = String::from_utf8_lossy(&gpu.stdout).into_owned();
    assert!(gpu.contains("gpu.module @k0") && gpu.contains("// plan: matmul:"), "{gpu}");
    assert!(gpu.contains("spirv.entry_point_abi"), "{gpu}");

    let spirv = kiln(&["inspect", "models/mlp.ron", "--stage", "spirv"]);
    assert!(spirv.status.success(), "{}", String::from_utf8_lossy(&spirv.stderr));
    let spirv = String::from_utf8_lossy(&spirv.stdout).into_owned();
    assert!(spirv.contains("; kernel k0"), "{spirv}");
    // Disassembled by spirv-dis where it is installed, else the spirv dialect it came from.
    assert!(
        spirv.contains("OpEntryPoint GLCompute") || spirv.contains("spirv.EntryPoint \"GLCompute\""),
        "{spirv}"
    );

    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("mlp.kiln");
    let art_s = art.to_str().unwrap();
    let said = kiln_says(&["compile", "models/mlp.ron", "--target", "vulkan", "-o", art_s]);
    assert!(said.contains("for vulkan (SPIR-V 1.3)"), "{said}");
    let manifest = std::fs::read_to_string(art.join("manifest.ron")).unwrap();
    assert!(manifest.contains("target: Vulkan(") && manifest.contains("Gpu("), "{manifest}");
    assert!(art.join("kernels.spv").exists() && !art.join("kernels.so").exists());

    let list = kiln(&["run", "--device", "list"]);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.starts_with("cpu "), "{list}");
    if !available(Device::Vulkan, "kiln run on Vulkan") {
        return;
    }
    assert!(list.contains("vulkan:0"), "{list}");
    let gpu_run = kiln(&["run", art_s, "--repeats", "1", "--profile"]);
    assert!(gpu_run.status.success(), "{}", String::from_utf8_lossy(&gpu_run.stderr));
    let gpu_run = String::from_utf8_lossy(&gpu_run.stdout).into_owned();
    assert!(gpu_run.contains("matmul"), "the profile lists the kernels:\n{gpu_run}");
    let cpu_run = kiln(&["run", "models/mlp.ron", "--repeats", "1"]);
    let cpu_run = String::from_utf8_lossy(&cpu_run.stdout).into_owned();
    let spec_on_gpu = kiln(&["run", "models/mlp.ron", "--device", "vulkan", "--repeats", "1"]);
    assert!(spec_on_gpu.status.success(), "{}", String::from_utf8_lossy(&spec_on_gpu.stderr));
    let spec_on_gpu = String::from_utf8_lossy(&spec_on_gpu.stdout).into_owned();
    assert!(spec_on_gpu.contains("vulkan:0"), "{spec_on_gpu}");
    let line = |s: &str, what: &str| s.lines().find(|l| l.starts_with(what)).map(str::to_owned);
    // The printed values (6 decimals) agree between the CPU and the GPU.
    assert_eq!(line(&cpu_run, "probs:"), line(&gpu_run, "probs:"), "{cpu_run}\n{gpu_run}");
    assert_eq!(line(&gpu_run, "probs:"), line(&spec_on_gpu, "probs:"));
    // A Vulkan artifact asked to run on the CPU is refused with exit status 1.
    let wrong = kiln(&["run", art_s, "--device", "cpu"]);
    assert_eq!(wrong.status.code(), Some(1), "{}", String::from_utf8_lossy(&wrong.stderr));
}

/// The portable Vulkan target as NVIDIA's tensor cores need it: warps of 32 and TF32-capable
/// tensor cores (`mma`), so tensor-core plans render for SPIR-V with their products emulated.
/// f32 products stay f32 unless `with_tensor_cores` asks.
fn vulkan_emulating_tensor_cores() -> kiln_codegen::gpu::GpuCaps {
    kiln_codegen::gpu::GpuCaps {
        mma: Some(kiln_codegen::gpu::MmaPrecision::Tf32),
        subgroup_size: Some(32),
        ..kiln_codegen::gpu::GpuCaps::vulkan()
    }
}

/// [`vulkan_emulating_tensor_cores`] with `sm_90a`'s warpgroup products and the async copies
/// they are fed by (both emulated).
fn vulkan_emulating_warpgroups() -> kiln_codegen::gpu::GpuCaps {
    kiln_codegen::gpu::GpuCaps { async_copies: true, warpgroup_mma: true, ..vulkan_emulating_tensor_cores() }
}

/// The tensor-core matmul's bookkeeping (which fragment element each lane loads from the
/// shared tiles, and where each accumulator lands) checked on the Vulkan device: the same plan
/// rendered for SPIR-V, with `mma.sync` emulated by each warp through shared memory from the
/// same fragment tables. What only an NVIDIA GPU can check is that the hardware's fragments
/// are the tables'.
#[test]
fn tensor_core_matmul_bookkeeping_holds_on_vulkan_with_emulated_mma() {
    if !available(Device::Vulkan, "tensor-core bookkeeping") {
        return;
    }
    let caps = vulkan_emulating_tensor_cores().with_tf32();
    let mut graphs = vec![
        optimized(&shipped("mlp.ron", &[])),
        optimized(&shipped("bert_encoder.ron", &["layers=1", "seq=32"])),
    ];
    for case in ["matmul", "matmul_tiles"] {
        let (name, inputs, body) = OP_CASES.iter().find(|(n, _, _)| *n == case).expect("a matmul case");
        graphs.push(op_case(name, inputs, body));
    }
    // (graph, caps, tile, tolerance): TF32's stated 1e-2·(1 + |ref|); split in two TF32 parts
    // (`tf32x3`), within f32's.
    // (graph, caps, tile, tolerance, the precision the interpreter's f32 inputs are rounded to)
    type Run<'a> = (&'a Graph, kiln_codegen::gpu::GpuCaps, [u32; 2], f64, Option<DType>);
    let mut runs: Vec<Run> = graphs.iter().map(|g| (g, caps.clone(), [64, 64], 1e-2, None)).collect();
    // The large GPUs' plan (128×128 tiles of 2×4 warps, 4×4 products each): with their
    // registers and a device too small for the 64×64 tiles to fill, as for the product of
    // `matmul_tiles` 512 × 512.
    let large = kiln_codegen::gpu::GpuCaps { registers: 255, parallel_units: 1, ..caps.clone() };
    runs.push((&graphs[3], large.clone(), [128, 128], 1e-2, None));
    let x3 =
        |c: &kiln_codegen::gpu::GpuCaps| c.clone().with_tensor_cores(kiln_codegen::gpu::MmaPrecision::Tf32x3);
    // Split operands: a batched product with a transposed B and a bias, and a ragged one.
    let split = op_case(
        "matmul_split",
        r#"{ "a3": (f32, [2, 128, 64]), "bt": (f32, [96, 64]), "c": (f32, [96]), "g": (f32, [3, 70]), "h": (f32, [70, 5]) }"#,
        r#"Let("z", Add(MatMul("a3", Transpose("bt")), "c")),
           Let("u", MatMul("g", "h")),"#,
    );
    runs.push((&split, x3(&caps), [64, 64], 1e-5, None));
    // f32 operands rounded to f16 or bf16 as they enter shared memory (bf16's rounding written
    // out in integer arithmetic, as on devices without bf16), multiplied as `m16n8k16`
    // fragments: the kernel gets the f32 inputs, the interpreter the same rounded to that
    // precision, so the rounding and the fragments must both be exact to agree within f32's
    // rounding.
    let half = |c: &kiln_codegen::gpu::GpuCaps, p| c.clone().with_tensor_cores(p);
    let (f16, bf16) = (kiln_codegen::gpu::MmaPrecision::F16, kiln_codegen::gpu::MmaPrecision::Bf16);
    runs.push((&split, half(&caps, f16), [64, 64], 1e-5, Some(DType::F16)));
    runs.push((&split, half(&caps, bf16), [64, 64], 1e-5, Some(DType::BF16)));
    let f16_graphs: Vec<Graph> = half_op_cases("f16")
        .into_iter()
        .filter(|g| ["matmul_f16", "matmul_tiles_f16"].contains(&g.name.as_str()))
        .collect();
    for g in &f16_graphs {
        runs.push((g, caps.clone(), [64, 64], 2e-3, None));
    }
    runs.push((&f16_graphs[1], large.clone(), [128, 128], 2e-3, None));
    // Operand tiles copied asynchronously (emulated: read and stored at once) through a ring
    // of 3 stages, each reused several times over k = 160: both operands copied, A copied
    // and a transposed B through registers, a transposed A through registers and B copied;
    // within f32's stated 1e-4·(1 + |ref|) with operands split in two TF32 parts (a tile in
    // the wrong stage is far off), at TF32 (rounded in place once copied), and f16 tensors
    // (2 stages).
    let asynch = kiln_codegen::gpu::GpuCaps { async_copies: true, ..caps.clone() };
    let ring_spec = (
        r#"{ "p": (f32, [64, 160]), "q": (f32, [160, 64]), "ta": (f32, [160, 64]), "bt": (f32, [64, 160]) }"#,
        r#"Let("x", MatMul("p", "q")),
           Let("y", MatMul(Transpose("ta"), "q")),
           Let("z", MatMul("p", Transpose("bt"))),"#,
    );
    let ring = op_case("matmul_ring", ring_spec.0, ring_spec.1);
    let ring_f16 = op_case("matmul_ring_f16", &ring_spec.0.replace("f32", "f16"), ring_spec.1);
    runs.push((&ring, x3(&asynch), [64, 64], 1e-4, None));
    // TF32's rounding alone grows with k: 3e-2·(1 + |ref|) at k = 160 (1e-2 held to k = 64).
    runs.push((&ring, asynch.clone(), [64, 64], 3e-2, None));
    runs.push((&ring_f16, asynch.clone(), [64, 64], 2e-3, None));
    for (g, caps, tile, tolerance, rounded) in runs {
        let params = kiln_ir::bind_params(g, None, 0, false).unwrap();
        let inputs = kiln_ir::seeded_inputs(g, 0);
        let mut seen = inputs.clone();
        if let Some(d) = rounded {
            // Product operands only: the bias `c` is added to the f32 accumulators as it is.
            seen.iter_mut()
                .filter(|(name, _)| *name != "c")
                .for_each(|(_, t)| *t = t.cast(d).cast(DType::F32));
        }
        let want = kiln_ir::eval(g, &kiln_ir::Bindings { inputs: seen, params: params.clone() }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let built = build_vulkan_with(g, &params, &caps, dir.path());
        // f16 tensors take f16 products whatever f32 ones may take.
        let want_precision = match g.name.ends_with("_f16") {
            true => Some(kiln_codegen::gpu::MmaPrecision::F16),
            false => caps.tensor_cores,
        };
        assert!(
            built
                .program
                .kernels
                .iter()
                .any(|k| matches!(k.plan.work, kiln_codegen::gpu::Work::MatmulTensorCores { tile: [m, n, _], precision, async_copies, stages, .. } if [m, n] == tile && Some(precision) == want_precision && async_copies == caps.async_copies && (stages == 3 || !async_copies || precision == kiln_codegen::gpu::MmaPrecision::F16))),
            "{}: no tensor-core plan with {tile:?} tiles at {want_precision:?} (async copies: {})",
            g.name,
            caps.async_copies
        );
        let got = run_artifact(dir.path(), &inputs, &g.name);
        for ((out, w), gv) in want.iter().zip(&got) {
            for (i, (a, b)) in w.to_f64_vec().iter().zip(gv).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance * (1.0 + a.abs()),
                    "{} `{out}`[{i}]: interpreter {a}, emulated {:?} {b}",
                    g.name,
                    caps.tensor_cores
                );
            }
        }
    }
}

/// Warpgroup products (`wgmma`, CUDA `sm_90a`) checked on the Vulkan device: the same plans
/// rendered for SPIR-V, the operand tiles copied (emulated) into core matrices through a ring
/// of stages, and each invocation computing its accumulators from the tiles as the matrix
/// descriptors describe them. Products with A and B each contiguous along either axis (the
/// instruction's k-major and transposed operands), a broadcast batch with a bias and a GELU,
/// in one warpgroup (64×64 tiles) and two stacked along m (128×64), and the check pack's
/// `wgmma_operands` (every pairing, 4 stages, a group of products in flight). What only an
/// NVIDIA GPU can check is that the hardware reads the descriptors as these do.
#[test]
fn warpgroup_products_hold_on_vulkan_with_emulated_wgmma() {
    if !available(Device::Vulkan, "warpgroup products") {
        return;
    }
    let caps = vulkan_emulating_warpgroups();
    let g = op_case(
        "wgmma_f16",
        r#"{ "p": (f16, [128, 96]), "q": (f16, [96, 192]), "ta": (f16, [96, 128]), "bt": (f16, [192, 96]), "a3": (f16, [2, 128, 96]), "c": (f16, [192]) }"#,
        r#"Let("x", MatMul("p", "q")),
           Let("y", MatMul(Transpose("ta"), "q")),
           Let("z", MatMul("p", Transpose("bt"))),
           Let("w", Gelu(Add(MatMul("a3", "q"), "c"))),"#,
    );
    // The check pack's model of every operand pairing, as the pack compiles it.
    let pack = spec_graph(Path::new("tests/gpu_check/wgmma_operands.ron"), &[]);
    let large = kiln_codegen::gpu::GpuCaps { parallel_units: 1, ..caps.clone() };
    // k = 96 makes 3 tiles of 32: 3 stages of 8 KiB in 64×64 tiles, 2 of 12 KiB in 128×64 (each
    // step's products awaited); the pack's k = 128 makes 4, in 4 stages with a group of
    // products in flight.
    let runs =
        [(&g, caps.clone(), [64, 64, 32], 3), (&g, large, [128, 64, 32], 2), (&pack, caps, [64, 64, 32], 4)];
    for (g, caps, tile, stages) in runs {
        plans_hold_on_vulkan(g, &caps, 2e-3, |plans| {
            let warpgroups = plans
                .iter()
                .filter(|p| {
                    matches!(p.work, kiln_codegen::gpu::Work::MatmulTensorCores { tile: t, stages: s, instruction: kiln_codegen::gpu::MmaInstruction::Warpgroup { .. }, .. } if t == tile && s == stages)
                })
                .count();
            assert_eq!(warpgroups, 4, "{tile:?} tiles: {:#?}", described(plans));
        });
    }
}

/// Warpgroup products of f32 operands on TF32 tensor cores (`m64nNk8`), which read both
/// operands along k, as `x·Wᵀ` with `W` stored `[out, in]` (a linear layer) lies: the same
/// plans rendered for SPIR-V, products emulated from the descriptors. At `tf32` the copied
/// tiles are rounded in place; at `tf32x3` they are split in place into a high tile and a low
/// one beside it, and three products read them, so the results keep f32's 1e-4 (the high
/// parts alone miss it). A product whose B lies along n stays on `mma.sync`. An encoder
/// layer prepared as for such a target runs every product and its attention so.
#[test]
fn tf32_warpgroup_products_hold_on_vulkan_with_emulated_wgmma() {
    if !available(Device::Vulkan, "TF32 warpgroup products") {
        return;
    }
    let g = op_case(
        "wgmma_tf32",
        r#"{ "p": (f32, [128, 96]), "q": (f32, [96, 192]), "bt": (f32, [192, 96]), "a3": (f32, [2, 128, 96]), "c": (f32, [192]) }"#,
        r#"Let("x", MatMul("p", "q")),
           Let("z", MatMul("p", Transpose("bt"))),
           Let("w", Gelu(Add(MatMul("a3", Transpose("bt")), "c"))),"#,
    );
    let base = vulkan_emulating_warpgroups();
    let large = kiln_codegen::gpu::GpuCaps { parallel_units: 1, ..base.clone() };
    let x3 = kiln_codegen::gpu::MmaPrecision::Tf32x3;
    // (caps, tile, tolerance): k = 96 makes 6 k tiles of 16; two warpgroups' 128×64 tiles at
    // TF32 (at TF32×3 two of their stages take more than the 32 KiB of a portable device).
    let runs = [
        (base.clone().with_tf32(), [64, 64, 16], 1e-2),
        (base.with_tensor_cores(x3), [64, 64, 16], 1e-4),
        (large.with_tf32(), [128, 64, 16], 1e-2),
    ];
    for (caps, tile, tolerance) in runs {
        plans_hold_on_vulkan(&g, &caps, tolerance, |plans| {
            let warpgroups = plans
                .iter()
                .filter(|p| {
                    matches!(p.work, kiln_codegen::gpu::Work::MatmulTensorCores { tile: t, shape: [64, _, 8], instruction: kiln_codegen::gpu::MmaInstruction::Warpgroup { .. }, .. } if t == tile)
                })
                .count();
            assert_eq!(warpgroups, 2, "{tile:?} tiles: {:#?}", described(plans));
        });
    }
    // An encoder layer as `kiln compile` prepares it for such a target: optimized to fold its
    // weights, which are then stored along k (`ProductWeights::AlongK`: the q, k and v
    // weights concatenated and transposed, the others as they are), so that all four of its
    // products are warpgroup products, and so is its attention (with the registers of an
    // NVIDIA GPU, in key tiles of 16 so that 3 stages of them fit the portable device's 32
    // KiB); at TF32×3 the whole layer keeps f32's 1e-4.
    let mut opts = kiln_opt::Options::default();
    opts.target.folds_weights = true;
    let set = ["layers=1", "seq=64", "hidden=128", "heads=4", "ffn=512", "vocab=1000", "max_positions=64"];
    let enc = kiln_opt::optimize(&shipped("bert_encoder.ron", &set), &opts).unwrap().0;
    let caps = kiln_codegen::gpu::GpuCaps {
        registers: 255,
        attention_key_tile: Some(16),
        ..vulkan_emulating_warpgroups().with_tensor_cores(x3)
    };
    let weights = caps.product_weights();
    assert_eq!(weights, kiln_ir::ProductWeights::AlongK);
    let fold = |g: &mut Graph, params: &mut HashMap<String, Tensor>| {
        kiln_ir::fold_weights(g, params, weights).unwrap();
    };
    plans_hold_on_vulkan_prepared(&enc, &caps, 1e-4, fold, |plans| {
        let warpgroups = plans
            .iter()
            .filter(|p| {
                matches!(
                    p.work,
                    kiln_codegen::gpu::Work::MatmulTensorCores {
                        instruction: kiln_codegen::gpu::MmaInstruction::Warpgroup { .. },
                        ..
                    } | kiln_codegen::gpu::Work::AttentionTensorCores {
                        instruction: kiln_codegen::gpu::MmaInstruction::Warpgroup { .. },
                        ..
                    }
                )
            })
            .count();
        assert_eq!(warpgroups, 5, "{:#?}", described(plans));
    });
}

/// Attention as warpgroup products (`sm_90a`'s plan for 16-bit attention): the same plans
/// rendered for SPIR-V, where each warp emulates the products of its queries' (then its
/// weights') fragments with the key (value) tile, read from the core matrices as the
/// descriptors describe them. Two warpgroups over 130 and 150 queries, one over 40; key tiles
/// of 64 in 3 stages (overlapped: a tile's value products run beside the next tile's scores
/// and softmax, so the copies run one tile ahead; over 4 whole tiles, copies two tiles ahead
/// would overwrite the values still to be read) and of 128 in 2, whole (copied, emulated)
/// or past the keys' end (through registers, zeros past it); an overlapped walk over one tile
/// only (no step between its first tile's softmax and its last tile's value products); a
/// mask, a causal attention, and value rows longer than the query rows.
#[test]
fn warpgroup_attention_holds_on_vulkan_with_emulated_wgmma() {
    if !available(Device::Vulkan, "warpgroup attention") {
        return;
    }
    let caps = kiln_codegen::gpu::GpuCaps { registers: 255, ..vulkan_emulating_warpgroups() };
    let tile_64 = kiln_codegen::gpu::GpuCaps { attention_key_tile: Some(64), ..caps.clone() };
    let spec = |name: &str, sq: usize, sk: usize| warpgroup_attention_case(name, "f16", sq, sk);
    // (graph, caps, each attention's warps, key tile, stages, value products left in flight
    // and products' k: a warpgroup's 64 queries leave room for two stages of 128 keys, whose
    // steps wait for all their products)
    let runs = [
        (spec("wgmma_attention", 130, 256), &caps, [(8, 64, 3, 1, 16), (8, 64, 3, 1, 16)]),
        (spec("wgmma_attention_short", 40, 150), &caps, [(4, 128, 2, 0, 16), (8, 64, 3, 1, 16)]),
        (spec("wgmma_attention_one_tile", 40, 60), &tile_64, [(4, 64, 3, 1, 16), (4, 64, 3, 1, 16)]),
    ];
    for (g, caps, expected) in runs {
        plans_hold_on_vulkan(&g, caps, 2e-3, |plans| {
            assert_eq!(warpgroup_attention_plans(plans), expected, "{}: {:#?}", g.name, described(plans));
        });
    }
}

/// The warpgroup attention tests' model: `sq` queries of heads of 16 attending to `sk` keys
/// (value rows of 32) under a mask, and the keys attending to themselves causally, all in
/// `dtype`.
fn warpgroup_attention_case(name: &str, dtype: &str, sq: usize, sk: usize) -> Graph {
    op_case(
        name,
        &format!(
            r#"{{ "q": ({dtype}, [1, 2, {sq}, 16]), "k": ({dtype}, [1, 2, {sk}, 16]), "v": ({dtype}, [1, 2, {sk}, 32]), "m": ({dtype}, [1, 1, {sq}, {sk}]) }}"#
        ),
        r#"Let("a", Attention(q: "q", k: "k", v: "v", mask: "m", scale: 0.3)),
           Let("c", Attention(q: "k", k: "k", v: "v", causal: true, scale: 0.3)),"#,
    )
}

/// Each attention plan of warpgroup products (of 64 rows): its warps, key tile, stages, groups
/// of products left in flight, and the k of its products.
fn warpgroup_attention_plans(plans: &[kiln_codegen::gpu::GpuPlan]) -> Vec<(u32, u32, u32, u32, u32)> {
    plans
        .iter()
        .filter_map(|p| match p.work {
            kiln_codegen::gpu::Work::AttentionTensorCores {
                warps,
                block_k,
                stages,
                shape: [64, _, k],
                instruction: kiln_codegen::gpu::MmaInstruction::Warpgroup { in_flight },
                ..
            } => Some((warps, block_k, stages, in_flight, k)),
            _ => None,
        })
        .collect()
}

/// TF32 attention as warpgroup products (`sm_90a`'s plan at `--precision tf32` or `tf32x3`),
/// emulated on the Vulkan device as above. The keys' rows lie interleaved in their tile so
/// that the weights stay in registers as the value products' A fragments, and the value tile
/// lies transposed (TF32 operands are read only along k), each value copied on its own; at
/// TF32×3 each stage holds the tiles' low parts too and every product is three. Key tiles
/// whole (copied) and past the keys' end (through registers, split as they are stored), in 2
/// stages and in 3 (overlapped); a mask and a causal attention. TF32
/// keeps its stated 1e-2, TF32×3 f32's 1e-4.
#[test]
fn tf32_warpgroup_attention_holds_on_vulkan_with_emulated_wgmma() {
    if !available(Device::Vulkan, "TF32 warpgroup attention") {
        return;
    }
    let base = kiln_codegen::gpu::GpuCaps { registers: 255, ..vulkan_emulating_warpgroups() };
    let spec = |name: &str, sq: usize, sk: usize| warpgroup_attention_case(name, "f32", sq, sk);
    let x3 = kiln_codegen::gpu::MmaPrecision::Tf32x3;
    let tile = |t| kiln_codegen::gpu::GpuCaps { attention_key_tile: Some(t), ..base.clone() };
    // (graph, caps, tolerance, each attention's warps, key tile, stages, value products left
    // in flight and products' k): two stages of 64 keys (of 32 at TF32×3) fill the 32 KiB of
    // a portable device beside the emulation's scratch; imposed tiles of 32 (16 at TF32×3)
    // leave room for three.
    let runs = [
        (spec("wgmma_tf32_attention", 130, 192), base.clone().with_tf32(), 1e-2, [(8, 64, 2, 0, 8); 2]),
        (
            spec("wgmma_tf32x3_attention", 130, 192),
            base.clone().with_tensor_cores(x3),
            1e-4,
            [(8, 32, 2, 0, 8); 2],
        ),
        (
            spec("wgmma_tf32_attention_edge", 40, 150),
            tile(32).with_tf32(),
            1e-2,
            [(4, 32, 3, 1, 8), (8, 32, 3, 1, 8)],
        ),
        (
            spec("wgmma_tf32x3_attention_edge", 40, 150),
            tile(16).with_tensor_cores(x3),
            1e-4,
            [(4, 16, 3, 1, 8), (8, 16, 3, 1, 8)],
        ),
    ];
    for (g, caps, tolerance, expected) in runs {
        plans_hold_on_vulkan(&g, &caps, tolerance, |plans| {
            assert_eq!(warpgroup_attention_plans(plans), expected, "{}: {:#?}", g.name, described(plans));
        });
    }
}

/// The f32 product's asynchronous copies (CUDA's plan for operands that lie in memory as in
/// their shared tiles), checked on the Vulkan device with the copies emulated as plain reads
/// and writes through the same ring of 3 stages over k = 160: B copied and A through
/// registers, both copied, and neither (two stages, as without copies).
#[test]
fn simt_product_async_copies_hold_on_vulkan_with_emulated_copies() {
    if !available(Device::Vulkan, "f32 product async copies") {
        return;
    }
    let caps = kiln_codegen::gpu::GpuCaps { async_copies: true, ..kiln_codegen::gpu::GpuCaps::vulkan() };
    let g = op_case(
        "simt_ring",
        r#"{ "p": (f32, [2, 256, 160]), "q": (f32, [160, 256]), "ta": (f32, [160, 256]), "bt": (f32, [256, 160]) }"#,
        r#"Let("x", MatMul("p", "q")),
           Let("y", MatMul(Transpose("ta"), "q")),
           Let("z", MatMul("p", Transpose("bt"))),"#,
    );
    let params = kiln_ir::bind_params(&g, None, 4, false).unwrap();
    let inputs = kiln_ir::seeded_inputs(&g, 4);
    let want =
        kiln_ir::eval(&g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let built = build_vulkan_with(&g, &params, &caps, dir.path());
    let mut rings: Vec<(u32, bool)> = built
        .program
        .kernels
        .iter()
        .filter_map(|k| match k.plan.work {
            kiln_codegen::gpu::Work::Matmul { stages, async_copies, .. } => Some((stages, async_copies)),
            _ => None,
        })
        .collect();
    rings.sort();
    let plans: Vec<String> = built.program.kernels.iter().map(|k| k.plan.describe()).collect();
    assert_eq!(rings, [(2, false), (3, true), (3, true)], "{plans:#?}");
    let got = run_artifact(dir.path(), &inputs, &g.name);
    for ((out, w), gv) in want.iter().zip(&got) {
        for (i, (a, b)) in w.to_f64_vec().iter().zip(gv).enumerate() {
            assert!(
                (a - b).abs() <= 1e-4 * (1.0 + a.abs()),
                "`{out}`[{i}]: interpreter {a}, emulated copies {b}"
            );
        }
    }
}

/// The f32 product's 128×96 tiles (12 × 16 invocations of 8×8, `--matmul-tile 128x96`), on
/// the Vulkan device with the registers of a large GPU, with the copies emulated and without
/// them: whole tiles of a row-major A (read in vectors, the last of three rounds partly
/// repeated) and B (copied), a transposed A, a batch-broadcast transposed B with a bias, and
/// ragged edges in every dimension under an activation.
#[test]
fn wide_product_tiles_hold_on_vulkan() {
    if !available(Device::Vulkan, "128×96 product tiles") {
        return;
    }
    let g = op_case(
        "wide_tiles",
        r#"{ "p": (f32, [2, 256, 160]), "q": (f32, [160, 288]), "ta": (f32, [160, 256]), "a3": (f32, [2, 128, 64]), "bt": (f32, [192, 64]), "c": (f32, [192]), "e": (f32, [130, 20]), "f": (f32, [20, 100]) }"#,
        r#"Let("x", MatMul("p", "q")),
           Let("y", MatMul(Transpose("ta"), "q")),
           Let("z", Add(MatMul("a3", Transpose("bt")), "c")),
           Let("w", Gelu(MatMul("e", "f"))),"#,
    );
    let params = kiln_ir::bind_params(&g, None, 4, false).unwrap();
    for async_copies in [true, false] {
        let caps = kiln_codegen::gpu::GpuCaps {
            registers: 255,
            async_copies,
            matmul_tile: Some([128, 96]),
            ..kiln_codegen::gpu::GpuCaps::vulkan()
        };
        let dir = tempfile::tempdir().unwrap();
        let built = build_vulkan_with(&g, &params, &caps, dir.path());
        let plans: Vec<(Vec<u32>, u32, bool)> = built
            .program
            .kernels
            .iter()
            .filter_map(|k| match k.plan.work {
                kiln_codegen::gpu::Work::Matmul { tile, stages, async_copies, .. } => {
                    Some((tile.to_vec(), stages, async_copies))
                }
                _ => None,
            })
            .collect();
        let described: Vec<String> = built.program.kernels.iter().map(|k| k.plan.describe()).collect();
        assert_eq!(plans.len(), 4, "{described:#?}");
        assert!(plans.iter().all(|(tile, ..)| tile == &[128, 96, 16]), "{described:#?}");
        // Both whole products with a row-major B copy it (3 stages over k = 160 in 32 KiB).
        let copied = plans.iter().filter(|p| p.2).count();
        assert_eq!(copied, if async_copies { 2 } else { 0 }, "{described:#?}");
        check_artifact_at(
            dir.path(),
            &g,
            &params,
            &[],
            1e-4,
            &format!("128×96 tiles, async copies {async_copies}"),
        );
    }
}

/// A check pack travels to the GPU machine as one archive: `scripts/gpu_check.sh`'s `dedupe`
/// and `archive` write it, and `run`'s `unpacked` and `restore` give back the same files, with
/// the checker still executable, through `tar` and through Python's `tarfile` (where `xz` is
/// missing); an archive that does not unpack fails.
#[test]
fn gpu_check_pack_travels_as_an_archive() {
    use std::os::unix::fs::PermissionsExt;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu_check.sh");
    let files: [(&str, &[u8]); 4] = [
        ("bin/check_pack", b"#!/bin/sh\necho checked\n"),
        ("conformance/mlp.kiln/weights.safetensors", b"weights of the mlp"),
        ("bench/mlp.kiln/weights.safetensors", b"weights of the mlp"),
        ("bench/mlp.kiln/manifest.ron", b"(name: \"mlp\")"),
    ];
    let has_python =
        std::process::Command::new("python3").arg("--version").output().is_ok_and(|o| o.status.success());
    if !has_python {
        eprintln!("skipping the archive through Python's tarfile: no python3 on this machine");
    }
    for python in [false, true].into_iter().filter(|&p| !p || has_python) {
        let root = tempfile::tempdir().unwrap();
        let pack = root.path().join("pack");
        for (name, bytes) in files {
            let path = pack.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        }
        std::fs::set_permissions(pack.join("bin/check_pack"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        // Hiding `xz` from `unpacked` makes it take Python's tarfile.
        let hide_xz =
            if python { r#"command() { [[ "$2" == xz ]] && return 1; builtin command "$@"; }"# } else { "" };
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                r#"set -euo pipefail; source "$1"; pack="$2"; dedupe "$pack"; archive "$pack"; rm -rf "$pack"; {hide_xz}
                   dir="$(unpacked "$pack.tar.xz")"; restore "$dir"; "$dir/bin/check_pack""#
            ))
            .args(["gpu_check".as_ref(), script.as_os_str(), pack.as_os_str()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "python {python}: {stderr}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "checked\n", "python {python}");
        assert!(stderr.contains("KiB of repeated data files left out"), "{stderr}");
        for (name, bytes) in files {
            assert_eq!(std::fs::read(pack.join(name)).unwrap(), bytes, "python {python}: {name}");
        }
    }

    let root = tempfile::tempdir().unwrap();
    let damaged = root.path().join("pack.tar.xz");
    std::fs::write(&damaged, b"not an archive").unwrap();
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(r#"set -euo pipefail; source "$1"; dir="$(unpacked "$2")" || exit 3; echo "$dir""#)
        .args(["gpu_check".as_ref(), script.as_os_str(), damaged.as_os_str()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

/// The entries (`name|spec|overrides`, or `name|shapes`) of the bash array `array` in
/// `scripts/gpu_check.sh`: the check pack's conformance models, as the pack builds them.
fn pack_entries(array: &str) -> Vec<(String, String, Vec<String>)> {
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu_check.sh")).unwrap();
    let start = format!("{array}=(");
    let body = script.split_once(&start).map(|(_, rest)| rest).unwrap_or_else(|| panic!("no {start}"));
    body.lines()
        .take_while(|l| l.trim() != ")")
        .filter_map(|l| l.trim().strip_prefix('"')?.strip_suffix('"'))
        .map(|entry| {
            let fields: Vec<&str> = entry.split('|').collect();
            let set = fields.get(2).map_or(Vec::new(), |set| {
                set.split_whitespace().filter(|w| *w != "--set").map(str::to_string).collect()
            });
            (fields[0].to_string(), fields[1].to_string(), set)
        })
        .collect()
}

/// The check pack's models with sizes set at run time are run again at the shapes of
/// `DYNAMIC_RUNS` (`scripts/gpu_check.sh`), each against the interpreter at that static shape
/// with the same seed. Built here by the pack's own functions for the CPU and run through
/// `kiln run`, each run must match: a shape outside the bounds, or parameters that differ
/// between the static evaluation and the dynamic artifact, fails here rather than on a GPU.
#[test]
fn gpu_check_dynamic_runs_hold_on_the_cpu() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("bash")
        .current_dir(root)
        .arg("-c")
        .arg(
            r#"set -euo pipefail; source scripts/gpu_check.sh; PACK_TARGET=host; kiln="$1"
               for entry in "${DYNAMIC_RUNS[@]}"; do
                   IFS='|' read -r name shapes <<<"$entry"
                   IFS='|' read -r _ spec set <<<"$(conformance_entry "$name")"
                   conformance_artifact "$2/$name.kiln" "$spec" "$set"
                   dynamic_runs "$2/$name.kiln" "$spec" "$set" "$shapes"
               done"#,
        )
        .arg("dynamic_runs")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut checked = Vec::new();
    for (name, _, _) in pack_entries("DYNAMIC_RUNS") {
        let art = tmp.path().join(format!("{name}.kiln"));
        let mut runs: Vec<_> =
            std::fs::read_dir(art.join("runs")).unwrap().map(|e| e.unwrap().path()).collect();
        runs.sort();
        assert!(runs.len() >= 2, "{name}: runs {runs:?}");
        for run in runs {
            let got = run.join("got.safetensors");
            let status = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
                .arg("run")
                .arg(&art)
                .arg("--input")
                .arg(run.join("inputs.safetensors"))
                .arg("-o")
                .arg(&got)
                .output()
                .unwrap();
            assert!(
                status.status.success(),
                "{}: {}",
                run.display(),
                String::from_utf8_lossy(&status.stderr)
            );
            let got: HashMap<_, _> =
                kiln_ir::tensor_io::read_safetensors(&got).unwrap().into_iter().collect();
            let want = kiln_ir::tensor_io::read_safetensors(run.join("expected.safetensors")).unwrap();
            for (output, w) in want {
                let g = &got[&output];
                let what = format!("{}: `{output}`", run.display());
                assert_eq!(g.shape, w.shape, "{what}");
                assert_close(&what, &w.data.to_f64_vec(), &g.data.to_f64_vec(), 1e-4);
            }
            checked.push(run.strip_prefix(tmp.path()).unwrap().display().to_string());
        }
    }
    eprintln!("dynamic runs checked: {}", checked.join(", "));
}

/// The CUDA check's report reads exactly the benchmarks the pack holds: a benchmark without a
/// row, or a row, goal or dynamic twin naming a benchmark the pack lacks (which would show
/// as "–" after the run, when the device time is spent), fails here.
#[test]
fn cuda_report_reads_every_benchmark_of_the_pack() {
    let report = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/cuda/report.py");
    let out = match std::process::Command::new("python3").arg(&report).arg("--names").output() {
        Ok(out) => out,
        Err(e) => {
            eprintln!("skipping the check pack's report names: cannot run python3 ({e})");
            return;
        }
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let read: std::collections::BTreeSet<String> =
        String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
    let packed: std::collections::BTreeSet<String> =
        pack_entries("BENCH").into_iter().map(|(name, _, _)| name).collect();
    let unread: Vec<_> = packed.difference(&read).collect();
    let missing: Vec<_> = read.difference(&packed).collect();
    assert!(
        unread.is_empty() && missing.is_empty(),
        "benchmarks in the pack that report.py does not read: {unread:?}; \
         benchmarks report.py reads that the pack does not hold: {missing:?}"
    );
}

/// The check pack's math conformance specs (read from `scripts/gpu_check.sh`, each with the
/// tolerance its `tolerance.txt` states) hold it on the Vulkan device, which computes the
/// same arithmetic as CUDA: a tolerance too tight for the functions fails here first.
#[test]
fn check_pack_math_tolerances_hold_on_vulkan() {
    if !available(Device::Vulkan, "check pack math tolerances") {
        return;
    }
    let entries = pack_entries("CONFORMANCE_MATH");
    let names: Vec<&str> = entries.iter().map(|(n, _, _)| n.as_str()).collect();
    assert_eq!(names, ["math_f32", "math_f64"]);
    for (name, spec, tolerance) in &entries {
        let tolerance: f64 = tolerance[0].parse().unwrap();
        let g = optimized(&spec_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join(spec), &[]));
        assert_eq!(g.name, *name);
        check_graph(&g, 0, tolerance, Device::Vulkan);
    }
}

/// The check pack's TF32 conformance models (read from `scripts/gpu_check.sh`) hold the
/// tolerance the pack states for them, 1e-2·(1 + |ref|), on the Vulkan device with the
/// tensor-core products emulated (the same operand rounding, in another order of
/// accumulation). Rounding f32 operands to TF32 is the one loss the pack's reference does not
/// share, so a tolerance it can break (a row sum of a TF32 product, a difference of large
/// terms, moves by up to 9e-2) fails here before it fails on a GPU. TF32×3 is held to 1e-4,
/// a hundred times its split products' error (checked at 1e-5 in the emulated op cases), and
/// the 16-bit models' tensors are rounded in the reference too.
#[test]
fn check_pack_tf32_tolerance_holds_with_emulated_tensor_cores() {
    if !available(Device::Vulkan, "check pack TF32 tolerance") {
        return;
    }
    use kiln_codegen::gpu::MmaPrecision;
    // The portable device's own tiles (small shaders, which lavapipe compiles quickly): the
    // rounding, not the tiling, decides whether a tolerance holds.
    let caps = vulkan_emulating_tensor_cores().with_tensor_cores(MmaPrecision::Tf32);
    let mut checked = Vec::new();
    let mut seen: Vec<(String, Vec<String>)> = Vec::new();
    let scratch = tempfile::tempdir().unwrap();
    for (name, spec, set) in pack_entries("CONFORMANCE_TF32") {
        // A twin of a model already checked, compiled for another target (`_wgmma_`: sm_90a),
        // rounds its operands the same way.
        if seen.contains(&(spec.clone(), set.clone())) {
            continue;
        }
        seen.push((spec.clone(), set.clone()));
        let mut path = Path::new(env!("CARGO_MANIFEST_DIR")).join(&spec);
        // An `_f32` name is its spec with the 16-bit tensors renamed f32, as the pack makes it.
        if name.ends_with("_f32") {
            let text = std::fs::read_to_string(&path).unwrap().replace("f16", "f32");
            path = scratch.path().join(format!("{name}.ron"));
            std::fs::write(&path, text).unwrap();
        }
        let set: Vec<&str> = set.iter().map(String::as_str).collect();
        let g = optimized(&spec_graph(&path, &set));
        let params = kiln_ir::bind_params(&g, None, 0, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let built = build_vulkan_with(&g, &params, &caps, dir.path());
        assert!(
            built
                .program
                .kernels
                .iter()
                .any(|k| matches!(k.plan.work, kiln_codegen::gpu::Work::MatmulTensorCores { .. })),
            "{name}: no product on tensor cores"
        );
        check_artifact_at(dir.path(), &g, &params, &[], 1e-2, &format!("the pack's TF32 {name}"));
        checked.push(name);
    }
    assert_eq!(
        checked,
        ["mlp", "bert_encoder", "gpt2", "matmul_shapes", "large_tiles", "operands_wgmma_f32"]
    );
}

/// Tensor-core attention in key tiles of 64 (`--attention-key-tile 64`), on the Vulkan device
/// with the products and the copies emulated: 150 keys are two whole tiles and a partial one,
/// masked and causal, with operands split in two TF32 parts (within f32's 1e-4) and on f16
/// tensors (3 stages of copies).
#[test]
fn tensor_core_attention_in_imposed_key_tiles_holds_on_vulkan() {
    if !available(Device::Vulkan, "tensor-core attention key tiles") {
        return;
    }
    let caps = kiln_codegen::gpu::GpuCaps {
        tensor_cores: Some(kiln_codegen::gpu::MmaPrecision::Tf32x3),
        registers: 255,
        async_copies: true,
        attention_key_tile: Some(64),
        ..vulkan_emulating_tensor_cores()
    };
    let spec = |dtype: &str, d: usize| {
        op_case(
            &format!("attention_k64_{dtype}"),
            &format!(
                r#"{{ "q": ({dtype}, [1, 2, 30, {d}]), "k": ({dtype}, [1, 2, 150, {d}]), "v": ({dtype}, [1, 2, 150, {d}]), "m": ({dtype}, [1, 1, 1, 150]) }}"#
            ),
            r#"Let("a", Attention(q: "q", k: "k", v: "v", mask: "m", scale: 0.3)),
               Let("c", Attention(q: "k", k: "k", v: "v", causal: true, scale: 0.3)),"#,
        )
    };
    // (graph, tolerance, each attention's key tile, stages and async copies; the weights stay
    // in registers, TF32 ones with the keys' rows interleaved)
    let runs = [
        (spec("f32", 8), 1e-4, [(64, 3, true), (64, 3, true)]),
        (spec("f16", 16), 2e-3, [(64, 3, true), (64, 3, true)]),
    ];
    for (g, tolerance, expected) in runs {
        plans_hold_on_vulkan(&g, &caps, tolerance, |plans| {
            let tiles: Vec<(u32, u32, bool)> = plans
                .iter()
                .filter_map(|p| match p.work {
                    kiln_codegen::gpu::Work::AttentionTensorCores {
                        block_k, stages, async_copies, ..
                    } => Some((block_k, stages, async_copies)),
                    _ => None,
                })
                .collect();
            assert_eq!(tiles, expected, "{}: {:#?}", g.name, described(plans));
        });
    }
}

/// Operands rounded to f16 or bf16 as they enter a tensor-core product's shared tiles are
/// rounded exactly as `half` rounds (to nearest, ties to even; NaNs stay NaNs), and f32 ones
/// copied asynchronously into them, then rounded in place to TF32, as `cvt.rna.tf32.f32`
/// rounds (to nearest, ties away from zero): a product with the identity returns each
/// operand as the tensor cores saw it. Checked bit for bit on Vulkan, where bf16's and TF32's
/// roundings are written out in integer arithmetic, over random values, ties both ways,
/// values that carry into the exponent, and NaN.
#[test]
fn operands_rounded_for_tensor_cores_round_as_the_hardware_does() {
    if !available(Device::Vulkan, "16-bit operand rounding") {
        return;
    }
    let g = op_case(
        "round_through_identity",
        r#"{ "x": (f32, [64, 64]), "eye": (f32, [64, 64]) }"#,
        r#"Let("y", MatMul("x", "eye")),"#,
    );
    let mut values: Vec<f32> =
        kiln_ir::seeded_inputs(&g, 5)["x"].to_f64_vec().iter().map(|&v| v as f32).collect();
    // Exact ties below and above an even and an odd kept bit (bf16 keeps 16 bits of the f32,
    // f16 13 fewer mantissa bits), a value that rounds up into the next exponent, NaN.
    let special = [
        0x3F80_8000u32,
        0x3F81_8000,
        0xBF80_8000,
        0xBF81_8000,
        0x3F80_1000,
        0x3F80_3000,
        0x3FFF_FFFF,
        0x4000_7FFF,
        0x46FF_F000,
        0x7FC0_0000,
        0x3F80_0FFF,
        0x3F80_1001,
    ];
    for (i, bits) in special.iter().enumerate() {
        values[i * 64 + 3] = f32::from_bits(*bits);
    }
    let eye: Vec<f32> = (0..64 * 64).map(|i| if i / 64 == i % 64 { 1.0 } else { 0.0 }).collect();
    let inputs: HashMap<String, Tensor> = [
        ("x".to_string(), Tensor::from_f32(vec![64, 64], values.clone()).unwrap()),
        ("eye".to_string(), Tensor::from_f32(vec![64, 64], eye).unwrap()),
    ]
    .into_iter()
    .collect();
    let caps = vulkan_emulating_tensor_cores();
    let f16 = |v: f32| half::f16::from_f32(v).to_f64();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f64();
    // TF32 (`cvt.rna`: to nearest, ties away from zero), rounded in place after an
    // asynchronous copy brought the f32 bytes into shared memory.
    let tf32 = |v: f32| {
        if v.is_nan() {
            return f64::NAN;
        }
        f32::from_bits(v.to_bits().wrapping_add(0x1000) & 0xFFFF_E000) as f64
    };
    // (precision, the rounding, whether the operands are copied asynchronously)
    type Case<'a> = (kiln_codegen::gpu::MmaPrecision, &'a dyn Fn(f32) -> f64, bool);
    let cases: [Case; 3] = [
        (kiln_codegen::gpu::MmaPrecision::F16, &f16, false),
        (kiln_codegen::gpu::MmaPrecision::Bf16, &bf16, false),
        (kiln_codegen::gpu::MmaPrecision::Tf32, &tf32, true),
    ];
    for (precision, round, async_copies) in cases {
        let caps = kiln_codegen::gpu::GpuCaps { async_copies, ..caps.clone() }.with_tensor_cores(precision);
        let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let built =
            kiln_codegen::build_vulkan_artifact(&g.name, &s, &HashMap::new(), &caps, dir.path()).unwrap();
        assert!(built.program.kernels.iter().any(|k| matches!(
            k.plan.work,
            kiln_codegen::gpu::Work::MatmulTensorCores { precision: p, async_copies: a, .. } if p == precision && a == async_copies
        )));
        let got = run_artifact(dir.path(), &inputs, &g.name);
        for (i, (&v, &y)) in values.iter().zip(&got[0]).enumerate() {
            // A NaN's row is NaN throughout (NaN · 0 in every other column's sum).
            let nan_row = values[i / 64 * 64..][..64].iter().any(|x| x.is_nan());
            let want = if nan_row { f64::NAN } else { round(v) };
            let same = (want.is_nan() && y.is_nan()) || want == y;
            assert!(same, "{precision:?} [{i}]: {v:e} ({:#010x}) became {y:e}, not {want:e}", v.to_bits());
        }
    }
}

/// Tensor-core flash attention (`Work::AttentionTensorCores`): the same plans rendered for
/// SPIR-V with `mma.sync` emulated per warp from the fragment tables and the quads' shuffles
/// through shared memory, run on Vulkan: every fragment read and write, the online softmax
/// on the products' accumulator layout, the weights' round trip through shared memory, both
/// stage counts, partial query blocks and key tiles, masks with hidden rows, causal
/// attention, the log-sum-exp alone and beside the output, and lengths set at run time, all
/// against the interpreter within TF32's tolerance.
#[test]
fn tensor_core_attention_bookkeeping_holds_on_vulkan_with_emulated_mma() {
    if !available(Device::Vulkan, "tensor-core attention bookkeeping") {
        return;
    }
    let caps = kiln_codegen::gpu::GpuCaps { registers: 255, ..vulkan_emulating_tensor_cores().with_tf32() };
    let (name, inputs, body) =
        OP_CASES.iter().find(|(n, _, _)| *n == "attention").expect("the attention case");
    let small_shared = kiln_codegen::gpu::GpuCaps { max_shared_bytes: 5 * 1024, ..caps.clone() };
    let at = |values: &[&[i64]]| values.iter().map(|v| v.to_vec()).collect::<Vec<Vec<i64>>>();
    // (graph, caps, the stage count its tensor-core attention must have, run-time sizes)
    let mut graphs: Vec<(Graph, kiln_codegen::gpu::GpuCaps, u32, Vec<Vec<i64>>)> = vec![
        (op_case(name, inputs, body), caps.clone(), 2, vec![]),
        // Shared memory for one stage of 16 keys only.
        (op_case(name, inputs, body), small_shared, 1, vec![]),
        // 70 queries are two workgroups of 4 warps, 75 keys three tiles, the last partial;
        // value rows longer than the query rows.
        (
            op_case(
                "attention_heads",
                r#"{ "q": (f32, [1, 2, 70, 16]), "k": (f32, [1, 2, 75, 16]), "v": (f32, [1, 2, 75, 24]), "m": (f32, [1, 1, 70, 75]) }"#,
                r#"Let("a", Attention(q: "q", k: "k", v: "v", mask: "m", scale: 0.25)),
                   Let("c", Attention(q: "q", k: "q", v: "q", causal: true, scale: 0.25)),"#,
            ),
            caps.clone(),
            2,
            vec![],
        ),
        (
            optimized(&shipped(
                "bert_encoder.ron",
                &["layers=1", "seq=32", "hidden=64", "heads=4", "ffn=128", "vocab=500"],
            )),
            caps.clone(),
            2,
            vec![],
        ),
        (
            optimized(&shipped(
                "gpt2.ron",
                &["layers=1", "seq=20", "d=32", "heads=2", "vocab=300", "ctx=64"],
            )),
            caps.clone(),
            2,
            vec![],
        ),
        (small_dynamic_seed_transformer(), caps.clone(), 2, at(&[&[1, 1], &[3, 17], &[4, 64]])),
    ];
    graphs.extend(attention_lse_graphs_with(8).into_iter().map(|(g, _)| (g, caps.clone(), 2, vec![])));
    // TF32's stated tolerance; then the same bookkeeping with operands split in two TF32 parts
    // (`tf32x3`), within f32's.
    let mut runs: Vec<_> =
        graphs.iter().map(|(g, c, n, at)| (g.clone(), c.clone(), *n, at.clone(), 1e-2)).collect();
    let x3 = caps.clone().with_tensor_cores(kiln_codegen::gpu::MmaPrecision::Tf32x3);
    for (g, c, n, at) in [&graphs[0], &graphs[1], &graphs[8], &graphs[9]] {
        let c = kiln_codegen::gpu::GpuCaps { tensor_cores: x3.tensor_cores, ..c.clone() };
        runs.push((g.clone(), c, *n, at.clone(), 1e-5));
    }
    // `m16n8k16` products: f32 operands and weights rounded to bf16 (the rounding written out
    // in integer arithmetic) or f16, over the graphs whose heads are multiples of 16.
    for (precision, tolerance) in
        [(kiln_codegen::gpu::MmaPrecision::Bf16, 3e-2), (kiln_codegen::gpu::MmaPrecision::F16, 1e-2)]
    {
        let c = caps.clone().with_tensor_cores(precision);
        for (g, _, n, at) in &graphs[2..6] {
            runs.push((g.clone(), c.clone(), *n, at.clone(), tolerance));
        }
    }
    // f16 tensors: f16 products whatever f32 ones take, weights rounded to f16; the result's
    // own rounding and the weights' bound the difference.
    let f16_heads = half_op_cases("f16").into_iter().find(|g| g.name == "attention_heads_f16");
    runs.push((f16_heads.expect("16-bit attention heads"), caps.clone(), 2, vec![], 5e-3));
    // Key and value tiles copied asynchronously (emulated: read and stored at once) through 3
    // stages: 32 queries over 5 whole key tiles, and causal self-attention over 96, where
    // the workgroups visit different counts of tiles (2 stages at TF32, 3 in f16); at TF32,
    // split in two TF32 parts within f32's stated 1e-4, and f16 tensors (16-bit keys and
    // values read as `ldmatrix` would hand them out).
    let asynch = kiln_codegen::gpu::GpuCaps { async_copies: true, ..caps.clone() };
    let ring_spec = (
        r#"{ "q": (f32, [1, 2, 32, 16]), "k": (f32, [1, 2, 160, 16]), "v": (f32, [1, 2, 160, 32]), "s": (f32, [1, 2, 96, 32]) }"#,
        r#"Let("a", Attention(q: "q", k: "k", v: "v", scale: 0.25)),
           Let("c", Attention(q: "s", k: "s", v: "s", causal: true, scale: 0.2)),"#,
    );
    let ring = op_case("attention_ring", ring_spec.0, ring_spec.1);
    let ring_f16 = op_case("attention_ring_f16", &ring_spec.0.replace("f32", "f16"), ring_spec.1);
    let x3_async = kiln_codegen::gpu::GpuCaps { tensor_cores: x3.tensor_cores, ..asynch.clone() };
    runs.push((ring.clone(), asynch.clone(), 3, vec![], 1e-2));
    runs.push((ring, x3_async, 3, vec![], 1e-4));
    runs.push((ring_f16, asynch, 3, vec![], 5e-3));
    for (g, caps, stages, bindings, tolerance) in &runs {
        let params = kiln_ir::bind_params(g, None, 0, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let built = build_vulkan_with(g, &params, caps, dir.path());
        let want_precision = match g.name.ends_with("_f16") {
            true => Some(kiln_codegen::gpu::MmaPrecision::F16),
            false => caps.tensor_cores,
        };
        assert!(
            built.program.kernels.iter().any(|k| matches!(
                k.plan.work,
                kiln_codegen::gpu::Work::AttentionTensorCores { stages: n, precision, async_copies, .. }
                    if n == *stages && Some(precision) == want_precision && async_copies == caps.async_copies
            )),
            "{}: no attention on tensor cores in {stages} stages at {want_precision:?} (async copies: {})",
            g.name,
            caps.async_copies
        );
        let what = format!("{} (emulated {:?})", g.name, caps.tensor_cores);
        check_artifact_at(dir.path(), g, &params, bindings, *tolerance, &what);
    }
}

#[test]
fn weights_larger_than_a_binding_are_bound_in_pieces() {
    // A target whose bindings cover 4 KiB: the 6 KiB table and the 8 KiB matrix are stored as
    // pieces, and the gather and the product read across the piece boundaries.
    let caps = kiln_codegen::gpu::GpuCaps { max_binding_bytes: 4096, ..kiln_codegen::gpu::GpuCaps::vulkan() };
    let g = lower(
        "pieces",
        r#"Model(name: "pieces", config: {}, inputs: { "ids": (i64, [2, 7]), "x": (f32, [5, 64]) },
           body: [
               Let("table", Param(shape: [24, 64], init: Normal(std: 1.0))),
               Let("w", Param(shape: [64, 32], init: Normal(std: 0.2))),
               Let("e", Gather(table: "table", indices: "ids")),
               Let("p", MatMul("x", "w")),
           ],
           outputs: ["e", "p"])"#,
    );
    let params = kiln_ir::bind_params(&g, None, 4, false).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
    let built = kiln_codegen::build_vulkan_artifact(&g.name, &s, &params, &caps, dir.path()).unwrap();
    let pieces: Vec<&str> = built
        .manifest
        .steps
        .iter()
        .flat_map(|st| &st.args)
        .filter_map(|a| match a {
            kiln_runtime::BufRef::Weight { name, bytes } if name.contains("@part") => {
                assert!(*bytes <= 4096, "{name}: {bytes} bytes");
                Some(name.as_str())
            }
            _ => None,
        })
        .collect();
    assert!(pieces.contains(&"table@part1") && pieces.contains(&"w@part1"), "{pieces:?}");
    if spirv_val(&built, "pieces").is_none() {
        eprintln!("skipped: spirv-val is not installed (Debian package spirv-tools)");
    }
    if !available(Device::Vulkan, "weights in pieces") {
        return;
    }
    let inputs = kiln_ir::seeded_inputs(&g, 4);
    let want =
        kiln_ir::eval(&g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
    let got = run_artifact(dir.path(), &inputs, "pieces");
    for ((name, w), gv) in want.iter().zip(&got) {
        for (i, (a, b)) in w.to_f64_vec().iter().zip(gv).enumerate() {
            assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "`{name}`[{i}]: interpreter {a}, Vulkan {b}");
        }
    }
}

#[test]
fn vulkan_refuses_what_it_cannot_run_naming_the_op_and_the_target() {
    let cases = [
        (
            r#"{ "x": (bf16, [4, 8]) }"#,
            r#"Let("y", Add("x", "x")),"#,
            "cannot compile bf16 tensors on the vulkan target (kernel k0 add)",
        ),
        (
            r#"{ "x": (i32, [4, 8]), "w": (i32, [8, 3]) }"#,
            r#"Let("y", MatMul("x", "w")),"#,
            "cannot compile `matmul` on i32 on the vulkan target (kernel k0 matmul)",
        ),
    ];
    let caps = kiln_codegen::gpu::GpuCaps::vulkan();
    for (inputs, body, want) in cases {
        let g = op_case("refused", inputs, body);
        let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
        let dir = tempfile::tempdir().unwrap();
        match kiln_codegen::build_vulkan_artifact(&g.name, &s, &HashMap::new(), &caps, dir.path()) {
            Ok(_) => panic!("`{body}` compiled for Vulkan"),
            Err(e) => assert_eq!(e.to_string(), want),
        }
    }
}

#[test]
fn recompiling_never_breaks_a_loaded_artifact_and_a_failed_compile_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("mlp.kiln");
    let art_s = art.to_str().unwrap();
    let compile = |extra: &[&str]| {
        let mut args = vec!["compile", "models/mlp.ron", "-o", art_s];
        args.extend_from_slice(extra);
        kiln(&args)
    };
    let out = compile(&["--seed", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let g = shipped("mlp.ron", &[]);
    let inputs = kiln_ir::seeded_inputs(&g, 0);
    let before = run_artifact(&art, &inputs, "mlp");
    // A model loaded from the artifact keeps running on it while it is recompiled.
    let mut loaded = Model::load(&art).unwrap();
    let run_loaded = |m: &mut Model| {
        let owned: Vec<(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)> = m
            .inputs()
            .iter()
            .map(|s| {
                let t = &inputs[&s.name];
                (s.name.clone(), s.dtype, t.shape.iter().map(|&d| d as u64).collect(), t.data.to_le_bytes())
            })
            .collect();
        let refs: Vec<TensorRef> = owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
        m.run(&refs).unwrap().iter().map(|t| t.to_f32_vec()).collect::<Vec<_>>()
    };
    let first = run_loaded(&mut loaded);
    let out = compile(&["--seed", "5"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(run_loaded(&mut loaded), first, "the loaded model still computes with its own weights");
    let after = run_artifact(&art, &inputs, "mlp");
    assert_ne!(after, before, "the new artifact has the new seed's weights");
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "mlp.kiln")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A compile that fails leaves the previous artifact as it was, and nothing beside it.
    let bad = dir.path().join("bf.ron");
    std::fs::write(&bad, r#"Model(name: "bf", config: {}, inputs: { "x": (bf16, [4, 8]) }, body: [Let("y", Add("x", "x"))], outputs: ["y"])"#)
        .unwrap();
    let failed = kiln(&["compile", bad.to_str().unwrap(), "--target", "vulkan", "-o", art_s]);
    assert_eq!(failed.status.code(), Some(1), "{}", String::from_utf8_lossy(&failed.stderr));
    assert_eq!(run_artifact(&art, &inputs, "mlp"), after);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // -o into a missing folder, or over a folder that is not an artifact, is an error.
    let missing = dir.path().join("no/such/dir.kiln");
    let out = kiln(&["compile", "models/mlp.ron", "-o", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not exist"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let other = dir.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), "mine").unwrap();
    let out = kiln(&["compile", "models/mlp.ron", "-o", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a Kiln artifact"));
    assert_eq!(std::fs::read_to_string(other.join("keep.txt")).unwrap(), "mine");
}

#[test]
fn outputs_are_written_whole_and_only_into_folders_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.safetensors");
    let missing = dir.path().join("no/such/out.safetensors");
    let ok = kiln(&["eval", "models/mlp.ron", "-o", out.to_str().unwrap()]);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["out.safetensors"], "no temporary file is left beside it");
    for cmd in ["eval", "run"] {
        let bad = kiln(
            &[cmd, "models/mlp.ron", "-o", missing.to_str().unwrap(), "--repeats", "1"]
                [..if cmd == "eval" { 4 } else { 6 }],
        );
        assert_eq!(bad.status.code(), Some(1), "{cmd}: {}", String::from_utf8_lossy(&bad.stderr));
        let err = String::from_utf8_lossy(&bad.stderr);
        assert!(err.contains("does not exist"), "{cmd}: {err}");
    }
}

#[test]
fn eval_and_run_fill_missing_inputs_alike_for_every_shipped_model() {
    let dir = tempfile::tempdir().unwrap();
    for model in ["mlp", "bert_encoder", "seed_transformer", "resnet_block", "lstm", "gpt2"] {
        let spec = format!("models/{model}.ron");
        let art = dir.path().join(format!("{model}.kiln"));
        let (want, got) = (
            dir.path().join(format!("{model}-eval.safetensors")),
            dir.path().join(format!("{model}-run.safetensors")),
        );
        let s = |p: &Path| p.to_str().unwrap().to_string();
        for args in [
            vec!["eval".to_string(), spec.clone(), "--seed".into(), "3".into(), "-o".into(), s(&want)],
            vec!["compile".to_string(), spec.clone(), "--seed".into(), "3".into(), "-o".into(), s(&art)],
            vec![
                "run".to_string(),
                s(&art),
                "--seed".into(),
                "3".into(),
                "--repeats".into(),
                "1".into(),
                "-o".into(),
                s(&got),
            ],
        ] {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = kiln(&refs);
            assert!(out.status.success(), "{refs:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let (want, got) = (
            kiln_ir::tensor_io::read_tensors(&want).unwrap(),
            kiln_ir::tensor_io::read_tensors(&got).unwrap(),
        );
        assert_eq!(want.len(), got.len(), "{model}");
        for (name, w) in &want {
            let g = &got.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{model}: no `{name}`")).1;
            for (i, (a, b)) in w.to_f64_vec().iter().zip(g.to_f64_vec()).enumerate() {
                assert!((a - b).abs() <= 1e-4 * (1.0 + a.abs()), "{model} `{name}`[{i}]: eval {a}, run {b}");
            }
        }
    }
}

// --------------------------------------------------------------------------------------- CUDA

/// The `ptxas` the CUDA checks assemble with (`KILN_PTXAS`, which `make test` sets from
/// `scripts/fetch_ptxas.sh`); prints why a test skips when there is none.
fn ptxas(test: &str) -> Option<kiln_codegen::gpu::ptxas::Ptxas> {
    let found = kiln_codegen::gpu::ptxas::Ptxas::find();
    if found.is_none() {
        eprintln!(
            "skipped: {test}: no ptxas (run scripts/fetch_ptxas.sh and set KILN_PTXAS to what it prints)"
        );
    }
    found
}

/// The CUDA target for `arch`.
fn cuda_caps(arch: &str) -> (kiln_codegen::gpu::GpuCaps, kiln_codegen::gpu::NvvmTarget) {
    let target = kiln_codegen::gpu::NvvmTarget::by_arch(arch).expect("a known architecture");
    (kiln_codegen::gpu::GpuCaps::cuda(target), target)
}

/// A GPU norm or softmax over strided rows takes one invocation per row where the rows are
/// many and short (the channels of each pixel, side by side), and a workgroup per row where
/// they are few and long (64 rows of 4096: one invocation each would leave the device idle).
#[test]
fn gpu_rows_side_by_side_are_many_short_rows() {
    let (caps, _) = cuda_caps("sm_90");
    let plans = |text: &str| -> Vec<kiln_codegen::gpu::Work> {
        let g = optimized(&lower("rows", text));
        let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).expect("schedules");
        let program = kiln_codegen::gpu::kernels(&s, &caps).expect("compiles");
        program.kernels.iter().map(|k| k.plan.work.clone()).collect()
    };
    let norm_over_axis_1 = |shape: &str| {
        format!(
            r#"Model(name: "rows", inputs: {{ "x": (f32, {shape}) }}, body: [
                Let("y", Div(Sub("x", Mean(x: "x", axes: 1, keepdims: true)), Sqrt(Add(Mean(x: Mul(Sub("x", Mean(x: "x", axes: 1, keepdims: true)), Sub("x", Mean(x: "x", axes: 1, keepdims: true))), axes: 1, keepdims: true), 1e-5)))),
                Let("p", Softmax(x: "x", axis: 1)),
            ], outputs: ["y", "p"])"#
        )
    };
    let side = |w: &kiln_codegen::gpu::Work| matches!(w, kiln_codegen::gpu::Work::RowsSideBySide { .. });
    let rows = |w: &kiln_codegen::gpu::Work| matches!(w, kiln_codegen::gpu::Work::Rows { .. });
    let pixels = plans(&norm_over_axis_1("[2, 96, 28, 28]"));
    assert_eq!(pixels.iter().filter(|w| side(w)).count(), 2, "{pixels:?}");
    let long = plans(&norm_over_axis_1("[1, 4096, 64]"));
    assert_eq!(
        (long.iter().filter(|w| side(w)).count(), long.iter().filter(|w| rows(w)).count()),
        (0, 2),
        "{long:?}"
    );
}

/// Every kernel of every op family and shipped model (static, and with its batch and sequence
/// set at run time), lowered to PTX for sm_80 and sm_90 (and sm_90a, whose 16-bit products,
/// and TF32 ones along k, are warpgroup products) and assembled by `ptxas`: an error fails the
/// test, spills are reported.
#[test]
fn cuda_kernels_assemble_with_ptxas_for_sm80_and_sm90() {
    let Some(ptxas) = ptxas("CUDA kernels through ptxas") else { return };
    let mut graphs: Vec<Graph> = Vec::new();
    for (name, inputs, body) in OP_CASES {
        let g = op_case(name, inputs, body);
        graphs.push(optimized(&g));
        graphs.push(g);
    }
    for model in SHIPPED {
        graphs.push(optimized(&shipped(model, &[])));
    }
    // The shipped models with a batch and sequence length known at run time: kernels that read
    // the run's sizes from their last argument and guard by them.
    let dynamic = ["batch=Dyn(min: 1, max: 32, hint: 8)", "seq=Dyn(min: 1, max: 128, hint: 64)"];
    for (model, sets) in [
        ("mlp.ron", &dynamic[..1]),
        ("lstm.ron", &dynamic[..1]),
        ("resnet_block.ron", &dynamic[..1]),
        ("bert_encoder.ron", &dynamic[..]),
        ("seed_transformer.ron", &dynamic[..]),
        ("gpt2.ron", &dynamic[..]),
    ] {
        let g = optimized(&shipped(model, sets));
        assert!(!g.symbols.is_empty(), "{model} made dynamic");
        graphs.push(g);
    }
    // Reductions, softmax and norms along run-time axes, windows over them, and a cache
    // joined along one.
    for (spec, sets) in [
        ("pooling.ron", &["batch=Dyn(min: 1, max: 4, hint: 2)", "seq=Dyn(min: 1, max: 40, hint: 16)"][..]),
        ("pooling.ron", &["hw=Dyn(min: 1, max: 12, hint: 6)"][..]),
        ("windows.ron", &["seq=Dyn(min: 1, max: 40, hint: 16)", "hw=Dyn(min: 1, max: 12, hint: 6)"][..]),
        ("kv_cache.ron", &["past=Dyn(min: 1, max: 60, hint: 20)", "seq=Dyn(min: 1, max: 16, hint: 1)"][..]),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/gpu_check").join(spec);
        graphs.push(optimized(&spec_graph(&path, sets)));
    }
    graphs.extend(scatter_graphs());
    graphs.extend(attention_lse_graphs().into_iter().map(|(g, _)| g));
    graphs.extend(attention_lse_graphs_with(8).into_iter().map(|(g, _)| g));
    let (tf32, tf32x3) = (kiln_codegen::gpu::MmaPrecision::Tf32, kiln_codegen::gpu::MmaPrecision::Tf32x3);
    for (arch, precision) in [
        ("sm_80", None),
        ("sm_90", None),
        ("sm_80", Some(tf32)),
        ("sm_90", Some(tf32)),
        ("sm_80", Some(tf32x3)),
        ("sm_90", Some(tf32x3)),
        ("sm_90a", None),
        ("sm_90a", Some(tf32x3)),
    ] {
        let (caps, target) = cuda_caps(arch);
        let caps = match precision {
            Some(p) => caps.with_tensor_cores(p),
            None => caps,
        };
        let arch_label = match precision {
            Some(p) => format!("{arch} with {} tensor cores", p.name()),
            None => arch.to_string(),
        };
        let tf32 = precision.is_some();
        // 16-bit tensors take tensor cores whatever f32 products take: once per architecture.
        let halves = match precision {
            None => [half_op_cases("f16"), half_op_cases("bf16")].concat(),
            Some(_) => Vec::new(),
        };
        let (mut kernels, mut spilling) = (0, Vec::new());
        for g in graphs.iter().chain(&halves) {
            let s = kiln_sched::schedule_aligned(g, caps.buffer_align).expect("schedules");
            let program = kiln_codegen::gpu::kernels(&s, &caps).unwrap_or_else(|e| panic!("{}: {e}", g.name));
            let modules = kiln_codegen::gpu::nvvm::compile(&program.kernels, &target)
                .unwrap_or_else(|e| panic!("{} for {arch}: {e}", g.name));
            assert_eq!(modules.len(), program.kernels.len());
            if tf32 && g.name == "matmul" {
                assert!(modules
                    .iter()
                    .any(|m| m.ptx.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32")));
            }
            // sm_90a's f32 products along k (the encoder's linear layers) at TF32×3: three
            // warpgroup products of TF32 tiles, which take no transposition flags.
            if arch == "sm_90a" && tf32 && g.name == "bert_encoder" && g.symbols.is_empty() {
                let wgmma = modules
                    .iter()
                    .flat_map(|m| m.ptx.lines())
                    .filter(|l| {
                        l.starts_with("wgmma.mma_async.sync.aligned.m64n") && l.contains("k8.f32.tf32.tf32 ")
                    })
                    .count();
                assert!(wgmma > 0 && wgmma % 3 == 0, "bert_encoder: {wgmma} TF32 warpgroup products");
                // Its attention over whole key tiles: products of fragments in registers, the
                // value tile copied an element at a time (transposed).
                assert!(
                    modules.iter().any(|m| m
                        .ptx
                        .lines()
                        .any(|l| l.starts_with("wgmma.mma_async.sync.aligned.m64n")
                            && l.contains("k8.f32.tf32.tf32 ")
                            && l.contains("}, {%r"))
                        && m.ptx.lines().any(|l| l.trim_start().starts_with("cp.async.ca.shared.global")
                            && l.ends_with(", 4;"))),
                    "bert_encoder: no TF32 warpgroup attention"
                );
            }
            // Attention on tensor cores: products, and the quads' butterfly shuffles (on
            // sm_90a warpgroup products of fragments in registers).
            if tf32 && g.name == "attention" {
                let products = match arch {
                    "sm_90a" => "k8.f32.tf32.tf32 {",
                    _ => "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32",
                };
                assert!(
                    modules.iter().any(|m| m.ptx.contains(products) && m.ptx.contains("shfl.sync.bfly")),
                    "attention for {arch_label}: no {products}"
                );
            }
            for dtype in ["f16", "bf16"] {
                let heads = g.name == format!("attention_heads_{dtype}");
                if g.name == format!("matmul_{dtype}") || (heads && arch != "sm_90a") {
                    let mma = format!("mma.sync.aligned.m16n8k16.row.col.f32.{dtype}.{dtype}.f32");
                    assert!(modules.iter().any(|m| m.ptx.contains(&mma)), "{}: no {mma}", g.name);
                }
                // sm_90a's attention: warpgroup products of fragments in registers with the key
                // tile (k-major) and the value tile (transposed).
                if heads && arch == "sm_90a" {
                    let types = format!("k16.f32.{dtype}.{dtype} ");
                    for trans in ["p, 1, 1, 0;", "p, 1, 1, 1;"] {
                        assert!(
                            modules.iter().any(|m| m.ptx.lines().any(|l| l
                                .starts_with("wgmma.mma_async.sync.aligned.m64n")
                                && l.contains(&types)
                                && l.contains("}, {%r")
                                && l.ends_with(trans))),
                            "{}: no wgmma.mma_async … {types}… {trans}",
                            g.name
                        );
                    }
                }
                // sm_90a's warpgroup products: A k-major and B transposed (row-major), then A
                // transposed too.
                if arch == "sm_90a" && g.name == format!("matmul_tiles_{dtype}") {
                    let types = format!("k16.f32.{dtype}.{dtype} ");
                    for trans in ["0, 1;", "1, 1;"] {
                        assert!(
                            modules.iter().any(|m| m
                                .ptx
                                .lines()
                                .any(|l| l.starts_with("wgmma.mma_async.sync.aligned.m64n")
                                    && l.contains(&types)
                                    && l.ends_with(trans))),
                            "{}: no wgmma.mma_async … {types}… {trans}",
                            g.name
                        );
                    }
                }
            }
            for m in &modules {
                assert!(m.ptx.contains(&format!(".target {arch}")), "{}: {}", g.name, m.ptx);
                let assembled = ptxas
                    .assemble(&m.ptx, arch)
                    .unwrap_or_else(|e| panic!("{} {}: {e}\n{}", g.name, m.symbol, m.ptx));
                assert!(!assembled.cubin.is_empty() && assembled.cubin.starts_with(b"\x7fELF"));
                // Warpgroup products that ptxas must serialize (their accumulators touched
                // while in flight) would lose what they are for.
                assert!(
                    !assembled.warnings.iter().any(|w| w.contains("wgmma")),
                    "{} {}: {:?}",
                    g.name,
                    m.symbol,
                    assembled.warnings
                );
                let usage = assembled.usage.iter().find(|u| u.kernel == m.symbol);
                let usage =
                    usage.unwrap_or_else(|| panic!("{} {}: ptxas said nothing about it", g.name, m.symbol));
                if usage.spill_stores + usage.spill_loads > 0 {
                    spilling.push(format!(
                        "{} {} ({} registers, {} B stored / {} B loaded)",
                        g.name, m.symbol, usage.registers, usage.spill_stores, usage.spill_loads
                    ));
                }
                kernels += 1;
            }
        }
        eprintln!(
            "{arch_label}: {kernels} kernels assembled by ptxas; {} of them spill registers",
            spilling.len()
        );
        for s in &spilling {
            eprintln!("  spills: {s}");
        }
    }
}

#[test]
fn cli_compiles_and_inspects_for_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let art = dir.path().join("mlp.kiln");
    let said =
        kiln_says(&["compile", "models/mlp.ron", "--target", "cuda:sm_90", "-o", art.to_str().unwrap()]);
    assert!(said.contains("compiled `mlp` for cuda (sm_90, PTX 7.8)"), "{said}");
    let manifest =
        kiln_runtime::Manifest::from_ron(&std::fs::read_to_string(art.join("manifest.ron")).unwrap())
            .unwrap();
    let kiln_runtime::Target::Cuda(target) = &manifest.target else { panic!("{:?}", manifest.target) };
    assert_eq!(target.compute_capability, [9, 0]);
    let ptx = std::fs::read_to_string(art.join(kiln_runtime::PTX_FILE)).unwrap();
    // The PTX ends with the digest of the manifest it was compiled for.
    assert_eq!(kiln_runtime::ptx_contract(ptx.as_bytes()), Some(manifest.contract()));
    for step in &manifest.steps {
        let kiln_runtime::Dispatch::Gpu { module, .. } = step.dispatch else { panic!("{step:?}") };
        let range = &manifest.modules[module as usize];
        let text = &ptx[range.offset as usize..(range.offset + range.bytes) as usize];
        assert!(text.contains(&format!(".entry {}(", step.symbol)), "{text}");
    }
    // With ptxas, the cubins come along, one per module.
    if kiln_codegen::gpu::ptxas::Ptxas::find().is_some() {
        assert_eq!(target.cubins.len(), manifest.modules.len());
        assert!(art.join(kiln_runtime::CUBIN_FILE).is_file());
    }

    let ptx = kiln(&["inspect", "models/mlp.ron", "--stage", "ptx", "--target", "cuda:sm_80"]);
    assert!(ptx.status.success(), "{}", String::from_utf8_lossy(&ptx.stderr));
    let ptx = String::from_utf8_lossy(&ptx.stdout).into_owned();
    assert!(
        ptx.contains("// kernel k0 (") && ptx.contains(".target sm_80") && ptx.contains(".entry k0("),
        "{ptx}"
    );
    let gpu = kiln(&["inspect", "models/mlp.ron", "--stage", "gpu", "--target", "cuda"]);
    let gpu = String::from_utf8_lossy(&gpu.stdout).into_owned();
    assert!(gpu.contains("known_block_size = array<i32:") && !gpu.contains("spirv"), "{gpu}");
    let nvvm = kiln(&["inspect", "models/mlp.ron", "--stage", "nvvm"]);
    assert!(String::from_utf8_lossy(&nvvm.stdout).contains("nvvm.read.ptx.sreg.tid.x"));

    // Without a CUDA device the artifact is refused with the reason; with one, it runs.
    let run = kiln(&["run", art.to_str().unwrap(), "--seed", "0"]);
    match cuda_arch() {
        Err(_) => {
            assert_eq!(run.status.code(), Some(1));
            let err = String::from_utf8_lossy(&run.stderr).into_owned();
            assert!(err.contains("CUDA is not available: "), "{err}");
        }
        Ok(_) => assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr)),
    }
    let list = kiln(&["run", "--device", "list"]);
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("cuda:0") || list.contains("(no CUDA device: "), "{list}");

    kiln_refuses(
        &["compile", "models/mlp.ron", "--target", "cuda:sm_70", "-o", art.to_str().unwrap()],
        2,
        "unknown CUDA architecture `sm_70` (known: sm_80, sm_86, sm_89, sm_90, sm_90a)",
    );
    // TF32 tensor cores only when asked for, said by --explain and recorded in the manifest.
    assert_eq!(target.precision, "f32");
    let tf32 = dir.path().join("mlp-tf32.kiln");
    let said = kiln_says(&[
        "compile",
        "models/mlp.ron",
        "--target",
        "cuda:sm_80",
        "--precision",
        "tf32",
        "--explain",
        "-o",
        tf32.to_str().unwrap(),
    ]);
    assert!(said.contains("f32 products: on tensor cores, operands rounded to TF32"), "{said}");
    assert!(
        said.contains("\nf16 and bf16 products: on tensor cores at the tensors' own precision"),
        "{said}"
    );
    assert!(said.contains("  k0: matmul on tensor cores: [1] 8×784·784×256"), "{said}");
    let manifest =
        kiln_runtime::Manifest::from_ron(&std::fs::read_to_string(tf32.join("manifest.ron")).unwrap())
            .unwrap();
    let kiln_runtime::Target::Cuda(t) = &manifest.target else { panic!("{:?}", manifest.target) };
    assert_eq!(t.precision, "tf32");
    assert_eq!(t.tensor_cores, ["tf32"]);
    kiln_refuses(
        &[
            "compile",
            "models/mlp.ron",
            "--target",
            "vulkan",
            "--precision",
            "tf32",
            "-o",
            art.to_str().unwrap(),
        ],
        2,
        "--precision tf32 uses NVIDIA tensor cores: it needs --target cuda[:ARCH]",
    );
    // Operands split in two TF32 parts, attention included, likewise.
    let x3 = dir.path().join("attention-tf32x3.kiln");
    let said = kiln_says(&[
        "compile",
        "bench/cuda/attention.ron",
        "--set",
        "seq=64",
        "--target",
        "cuda:sm_90",
        "--precision",
        "tf32x3",
        "--explain",
        "-o",
        x3.to_str().unwrap(),
    ]);
    assert!(said.contains("each operand split into a TF32 high and low part, three products"), "{said}");
    assert!(
        said.contains("  k0: attention on tensor cores: 48 × 64 queries × 64 keys (d 64, dv 64), 4 warps of 16 queries per workgroup")
            && said.contains("mma.sync m16n8k8 on f32 operands split into two tf32 parts (3 products each)"),
        "{said}"
    );
    let manifest =
        kiln_runtime::Manifest::from_ron(&std::fs::read_to_string(x3.join("manifest.ron")).unwrap()).unwrap();
    let kiln_runtime::Target::Cuda(t) = &manifest.target else { panic!("{:?}", manifest.target) };
    assert_eq!(t.precision, "tf32x3");
    assert_eq!(t.tensor_cores, ["tf32x3"]);
    kiln_refuses(
        &["compile", "models/mlp.ron", "--precision", "tf32x3", "-o", art.to_str().unwrap()],
        2,
        "--precision tf32x3 uses NVIDIA tensor cores: it needs --target cuda[:ARCH]",
    );
    // sm_90a: 16-bit products as warpgroup products, explained; the manifest says the
    // artifact runs on that architecture only.
    let wg_spec = dir.path().join("matmul_f16.ron");
    let text = std::fs::read_to_string("bench/cuda/matmul.ron").unwrap().replace("f32", "f16");
    std::fs::write(&wg_spec, text).unwrap();
    let wg = dir.path().join("matmul_f16.kiln");
    let (spec_s, wg_s) = (wg_spec.to_str().unwrap(), wg.to_str().unwrap());
    let said = kiln_says(&[
        "compile",
        spec_s,
        "--set",
        "n=2048",
        "--target",
        "cuda:sm_90a",
        "--explain",
        "-o",
        wg_s,
    ]);
    assert!(said.contains("compiled `matmul` for cuda (sm_90a, PTX 8.0, tensor cores: f16)"), "{said}");
    assert!(
        said.contains("as warpgroup products (wgmma m64nNk16, operands read from shared memory)"),
        "{said}"
    );
    assert!(
        said.contains("tile 128×256×64 in shared memory as core matrices (4 stages, async copies, 1 group of products in flight), 8×1 warps, wgmma m64n256k16 on f16 operands"),
        "{said}"
    );
    let manifest =
        kiln_runtime::Manifest::from_ron(&std::fs::read_to_string(wg.join("manifest.ron")).unwrap()).unwrap();
    let kiln_runtime::Target::Cuda(t) = &manifest.target else { panic!("{:?}", manifest.target) };
    assert!(t.arch_specific && t.arch() == "sm_90a", "{t:?}");
    // A warpgroup tile imposed, where it divides the product.
    let said = kiln_says(&[
        "compile",
        spec_s,
        "--set",
        "n=2048",
        "--target",
        "cuda:sm_90a",
        "--matmul-tile",
        "128x64",
        "--explain",
        "-o",
        wg_s,
    ]);
    assert!(said.contains("tile 128×64×32 in shared memory as core matrices (4 stages, async copies, 1 group of products in flight), 8×1 warps, wgmma m64n64k16"), "{said}");
    // Each step's products awaited, as asked.
    let said = kiln_says(&[
        "compile",
        spec_s,
        "--target",
        "cuda:sm_90a",
        "--products-in-flight",
        "0",
        "--explain",
        "-o",
        wg_s,
    ]);
    assert!(
        said.contains(
            "tile 128×256×64 in shared memory as core matrices (4 stages, async copies), 8×1 warps"
        ),
        "{said}"
    );
    // TF32×3 on sm_90a: the encoder's linear layers (both operands along k) and its attention
    // as warpgroup products of split tiles, explained.
    let enc = dir.path().join("bert_encoder.kiln");
    let said = kiln_says(&[
        "compile",
        "models/bert_encoder.ron",
        "--target",
        "cuda:sm_90a",
        "--precision",
        "tf32x3",
        "--explain",
        "-o",
        enc.to_str().unwrap(),
    ]);
    assert!(said.contains("products as warpgroup products (wgmma m64nNk8, operands read from shared memory) where both operands lie contiguous along k (x·Wᵀ)"), "{said}");
    assert!(said.contains("in shared memory as core matrices (4 stages, async copies, 1 group of products in flight), 4×1 warps, wgmma m64n64k8 on f32 operands split into two tf32 parts (3 products each)"), "{said}");
    // Its attention (heads of 32) too, from registers, in two tiles of 64 keys.
    assert!(
        said.contains(
            "attention as warpgroup products too (wgmma m64nNk8, queries and weights from registers)"
        ),
        "{said}"
    );
    assert!(said.contains("key tiles of 64 in shared memory as core matrices (3 stages, async copies, each tile's value products beside the next tile's softmax), wgmma m64n64k8 on f32 operands split into two tf32 parts (3 products each)"), "{said}");
    // 16-bit tensors take tensor cores at their own precision with no flag; the manifest and
    // the compile line say so, f32 products beside them staying f32.
    let half = dir.path().join("half_block_bf16.kiln");
    let spec = dir.path().join("half_block_bf16.ron");
    let text = std::fs::read_to_string("tests/gpu_check/half_block.ron").unwrap().replace("f16", "bf16");
    std::fs::write(&spec, text).unwrap();
    // The half block compiled for sm_90 with `flags`, its plans explained.
    let half_with = |flags: &[&str]| {
        let mut args = vec!["compile", spec.to_str().unwrap(), "--target", "cuda:sm_90"];
        args.extend(flags);
        args.extend(["--explain", "-o", half.to_str().unwrap()]);
        kiln_says(&args)
    };
    let said = half_with(&[]);
    assert!(said.contains("compiled `half_block` for cuda (sm_90, PTX 7.8, tensor cores: bf16)"), "{said}");
    assert!(
        said.contains(
            "key tiles of 32 in shared memory (3 stages, async copies), mma.sync m16n8k16 on bf16 operands"
        ),
        "{said}"
    );
    let manifest =
        kiln_runtime::Manifest::from_ron(&std::fs::read_to_string(half.join("manifest.ron")).unwrap())
            .unwrap();
    let kiln_runtime::Target::Cuda(t) = &manifest.target else { panic!("{:?}", manifest.target) };
    assert_eq!((t.precision.as_str(), t.tensor_cores.as_slice()), ("f32", &["bf16".to_string()][..]));
    kiln_refuses(
        &["compile", "models/mlp.ron", "--precision", "bf16", "-o", art.to_str().unwrap()],
        2,
        "unknown precision `bf16` (known: f32, tf32, tf32x3)",
    );
    // The same attention through registers only, for comparing pipelines; CUDA's alone.
    let said = half_with(&["--no-async-copies"]);
    assert!(said.contains("key tiles of 32 in shared memory (2 stages), mma.sync m16n8k16"), "{said}");
    assert!(!said.contains("async copies"), "{said}");
    // Key tiles of 64 on request, or an error naming what a key tile must be.
    let said = half_with(&["--attention-key-tile", "64"]);
    assert!(said.contains("key tiles of 64 in shared memory"), "{said}");
    kiln_refuses(
        &["compile", spec.to_str().unwrap(), "--target", "cuda:sm_90", "--attention-key-tile", "24", "-o", half.to_str().unwrap()],
        1,
        "in key tiles of 24 (heads of 32) on the cuda:sm_90 target: a key tile must be a positive multiple of 16",
    );
    kiln_refuses(
        &["compile", "models/mlp.ron", "--attention-key-tile", "64", "-o", art.to_str().unwrap()],
        2,
        "--attention-key-tile sets the key tile of attention on NVIDIA tensor cores: it needs --target cuda[:ARCH]",
    );
    kiln_refuses(
        &["compile", "models/mlp.ron", "--no-async-copies", "-o", art.to_str().unwrap()],
        2,
        "--no-async-copies turns off CUDA's cp.async pipelines: it needs --target cuda[:ARCH]",
    );
    kiln_refuses(
        &["compile", "models/mlp.ron", "--products-in-flight", "0", "-o", art.to_str().unwrap()],
        2,
        "--products-in-flight sets how many groups of NVIDIA warpgroup products run across a step: it needs --target cuda[:ARCH]",
    );
    // On sm_90a the block's attention takes warpgroup products (heads of 32, 100 queries: two
    // warpgroups, key tiles of 128).
    let said = kiln_says(&[
        "compile",
        spec.to_str().unwrap(),
        "--target",
        "cuda:sm_90a",
        "--explain",
        "-o",
        half.to_str().unwrap(),
    ]);
    assert!(
        said.contains("8 warps of 16 queries per workgroup, key tiles of 128 in shared memory as core matrices (3 stages, async copies, each tile's value products beside the next tile's softmax), wgmma m64n128k16 on bf16 operands"),
        "{said}"
    );
    // f32 attention in register tiles, or one query per invocation on request: on any GPU
    // target, refused on a CPU.
    for target in ["cuda:sm_90", "vulkan"] {
        for (flag, plan) in [
            (None, "64 queries per workgroup in 16 groups of 8 invocations, 4 queries × 4 keys and 4 × 8 value columns per invocation"),
            (Some("--attention-per-query"), "64 queries per workgroup, key tiles of 32 in shared memory"),
        ] {
            let mut args = vec!["compile", "bench/cuda/attention.ron", "--target", target, "--explain"];
            args.extend(flag);
            args.extend(["-o", art.to_str().unwrap()]);
            let said = kiln_says(&args);
            let plan = match (target, flag) {
                ("vulkan", None) => "32 queries per workgroup in 16 groups of 8 invocations, 2 queries × 4 keys",
                _ => plan,
            };
            assert!(said.contains(plan), "{target} {flag:?}: {said}");
        }
    }
    kiln_refuses(
        &["compile", "models/mlp.ron", "--attention-per-query", "-o", art.to_str().unwrap()],
        2,
        "--attention-per-query sets the plan of GPU attention without tensor cores: it needs a GPU target (vulkan, cuda[:ARCH])",
    );
    // f32 products in the plan's tiles (128×96 for MiniLM's 384 columns at batch 64, 128×128
    // for its 1536), or all in one tile on request; a tile the plan lacks, one the target's
    // limits exclude and a CPU target are refused.
    let minilm_b64 = |flags: &[&str]| {
        let mut args = vec!["compile", "models/bert_encoder.ron", "--target", "cuda:sm_90", "--explain"];
        args.extend(["--set", "batch=64", "--set", "layers=1", "--set", "vocab=100"]);
        args.extend(flags);
        args.extend(["-o", art.to_str().unwrap()]);
        kiln_says(&args)
    };
    let said = minilm_b64(&[]);
    assert!(said.contains("matmul: [64] 128×384·384×384, tile 128×96×16 in shared memory (4 stages, async copies), 8×8 per invocation in runs of 4; grid [4, 1, 64], workgroup [12, 16, 1]"), "{said}");
    assert!(said.contains("matmul: [64] 128×384·384×1536, tile 128×128×16"), "{said}");
    let said = minilm_b64(&["--matmul-tile", "128x128"]);
    assert!(said.contains("matmul: [64] 128×384·384×384, tile 128×128×16"), "{said}");
    assert!(!said.contains("tile 128×96×16"), "{said}");
    kiln_refuses(
        &[
            "compile",
            "models/mlp.ron",
            "--target",
            "vulkan",
            "--matmul-tile",
            "128x32",
            "-o",
            art.to_str().unwrap(),
        ],
        2,
        "--matmul-tile 128x32: the tiles are 128x128, 128x96, 64x64, 32x32, 16x16 (products without tensor cores) and 128x256, 128x128, 128x64, 64x64 (warpgroup products, cuda:sm_90a)",
    );
    kiln_refuses(
        &["compile", "bench/cuda/matmul.ron", "--target", "vulkan", "--matmul-tile", "128x96", "-o", art.to_str().unwrap()],
        1,
        "a product in 128×96 tiles (--matmul-tile) on the vulkan target: the tile does not fit its limits (workgroup size, shared memory, registers)",
    );
    kiln_refuses(
        &["compile", "models/mlp.ron", "--matmul-tile", "64x64", "-o", art.to_str().unwrap()],
        2,
        "--matmul-tile sets the tile of GPU products without tensor cores and of warpgroup products: it needs a GPU target (vulkan, cuda[:ARCH])",
    );

    let bad = kiln(&["inspect", "models/mlp.ron", "--stage", "spirv", "--target", "cuda"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`--stage spirv` is the Vulkan target's"));
}

#[test]
fn cuda_refuses_what_it_cannot_run_naming_the_op_and_the_target() {
    let cases = [(
        r#"{ "a": (i32, [4, 8]), "b": (i32, [8, 4]) }"#,
        r#"Let("y", MatMul("a", "b")),"#,
        "cannot compile `matmul` on i32 on the cuda:sm_90 target (kernel k0 matmul)",
    )];
    let (caps, _) = cuda_caps("sm_90");
    for (inputs, body, want) in cases {
        let g = op_case("refused", inputs, body);
        let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
        let dir = tempfile::tempdir().unwrap();
        match kiln_codegen::build_cuda_artifact(&g.name, &s, &HashMap::new(), &caps, None, dir.path()) {
            Ok(_) => panic!("`{body}` compiled for CUDA"),
            Err(e) => assert_eq!(e.to_string(), want),
        }
    }
    // What Vulkan refuses, CUDA compiles: bf16 tensors, stored as such.
    let g = op_case("bf16", r#"{ "x": (bf16, [4, 8]) }"#, r#"Let("y", Add("x", "x")),"#);
    let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
    let dir = tempfile::tempdir().unwrap();
    kiln_codegen::build_cuda_artifact(&g.name, &s, &HashMap::new(), &caps, None, dir.path())
        .unwrap_or_else(|e| panic!("bf16 for CUDA: {e}"));
}

// ---------------------------------------------------------------------- bad data, bad artifacts

const GATHER_SPEC: &str = r#"Model(name: "gather_ids", config: {}, inputs: { "ids": (i32, [2, 3]) },
   body: [
       Let("table", Param(shape: [5, 4], init: Normal(std: 1.0))),
       Let("e", Gather(table: "table", indices: "ids")),
   ],
   outputs: ["e"])"#;

fn ids(values: [i32; 6]) -> Tensor {
    Tensor::new(vec![2, 3], kiln_ir::Buffer::I32(values.to_vec())).unwrap()
}

#[test]
fn out_of_range_gather_indices_are_the_interpreters_error_on_every_path() {
    let g = lower("gather_ids", GATHER_SPEC);
    let params = kiln_ir::bind_params(&g, None, 5, false).unwrap();
    let eval = |t: Tensor| {
        let inputs = HashMap::from([("ids".to_string(), t)]);
        kiln_ir::eval(&g, &kiln_ir::Bindings { inputs, params: params.clone() })
    };
    let good = ids([0, 1, 2, 3, 4, 0]);
    let cases = [
        (ids([0, 1, 2, 3, 7, 4]), "gather index 7 at position [1, 1] of the indices is out of range"),
        (ids([0, -1, 2, 3, 4, 0]), "gather index -1 at position [0, 1] of the indices is out of range"),
    ];
    for (bad, words) in &cases {
        let err = eval(bad.clone()).unwrap_err().to_string();
        assert!(err.contains(words) && err.ends_with("for axis 0 of extent 5"), "interpreter: {err}");
    }
    let want: Vec<f64> = eval(good.clone()).unwrap()[0].1.to_f64_vec();

    for device in [Device::Cpu, Device::Vulkan, Device::Cuda] {
        if !available(device, "out-of-range gather") {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        build_for(device, &g, &params, dir.path());
        let mut model = Model::load_with(dir.path(), &Options::default()).unwrap();
        let run = |model: &mut Model, t: &Tensor| {
            let bytes = t.data.to_le_bytes();
            model
                .run(&[TensorRef::new("ids", kiln_runtime::DType::I32, &[2, 3], &bytes)])
                .map(|o| o[0].as_f32().unwrap().iter().map(|&x| f64::from(x)).collect::<Vec<f64>>())
        };
        assert_eq!(run(&mut model, &good).unwrap(), want, "{device:?}");
        for (bad, words) in &cases {
            let err = run(&mut model, bad).unwrap_err().to_string();
            assert_eq!(err, format!("input \"ids\": {words} for a table of extent 5"), "{device:?}");
        }
        // The model is still good after refusing.
        assert_eq!(run(&mut model, &good).unwrap(), want, "{device:?}");

        // The C ABI reports the runtime's error.
        let c_dir = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
        // SAFETY: the handle comes from the API and is freed once; the buffers have the sizes
        // the model declares (i32 [2, 3] in, f32 [2, 3, 4] out).
        unsafe {
            use kiln_runtime::capi::*;
            let m = kiln_model_load_on(c_dir.as_ptr(), std::ptr::null(), 1);
            assert!(!m.is_null());
            let values = [0i32, 1, 2, 3, 7, 4];
            let mut out = [0f32; 24];
            let inputs = [values.as_ptr().cast::<std::ffi::c_void>()];
            let outputs = [out.as_mut_ptr().cast::<std::ffi::c_void>()];
            assert_eq!(kiln_model_run(m, inputs.as_ptr(), outputs.as_ptr()), 1);
            let message = std::ffi::CStr::from_ptr(kiln_last_error()).to_string_lossy().into_owned();
            assert_eq!(message, format!("input \"ids\": {} for a table of extent 5", cases[0].1));
            kiln_model_free(m);
        }
    }

    // The CLI: `kiln eval`, `kiln run` of the artifact and of the spec (compiled in memory)
    // refuse the same input with exit status 1.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gather_ids.ron");
    std::fs::write(&spec, GATHER_SPEC).unwrap();
    let npy = dir.path().join("ids.npy");
    kiln_ir::tensor_io::write_npy(&npy, &cases[0].0).unwrap();
    let art = dir.path().join("gather_ids.kiln");
    let (spec, npy, art) = (spec.to_str().unwrap(), npy.to_str().unwrap(), art.to_str().unwrap());
    let input = format!("ids={npy}");
    let compiled = kiln(&["compile", spec, "-o", art]);
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    for args in [
        vec!["eval", spec, "--input", &input],
        vec!["run", art, "--input", &input],
        vec!["run", spec, "--input", &input],
    ] {
        let out = kiln(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(cases[0].1), "{args:?}: {err}");
    }
}

/// Integer divisions: `q` by an input broadcast along rows, and one inside a fused chain whose
/// divisor is computed (`a - b`, at the output's shape).
const INT_DIV_SPEC: &str = r#"Model(name: "int_div", config: {}, inputs: { "a": (i32, [2, 3]), "b": (i32, [3]) },
   body: [
       Let("q", Div("a", "b")),
       Let("r", Add(Div(Mul("a", 3), Sub("a", "b")), 7)),
   ],
   outputs: ["q", "r"])"#;

/// `(a, b)` as tensors.
fn int_div_inputs(a: [i32; 6], b: [i32; 3]) -> HashMap<String, Tensor> {
    HashMap::from([
        ("a".to_string(), ids(a)),
        ("b".to_string(), Tensor::new(vec![3], kiln_ir::Buffer::I32(b.to_vec())).unwrap()),
    ])
}

/// An error's words after the node or step it names: `(div `q` at …): integer division by
/// zero (divisor element [1])`.
fn after_node(err: &str) -> &str {
    err.find(" (").map_or(err, |at| &err[at + 1..])
}

#[test]
fn integer_division_by_zero_is_the_interpreters_error_on_cpu_vulkan_and_cuda() {
    let g = lower("int_div", INT_DIV_SPEC);
    let params = HashMap::new();
    let eval = |inputs: &HashMap<String, Tensor>| {
        kiln_ir::eval(&g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() })
    };
    let good = int_div_inputs([7, -9, 4, 10, 11, -12], [2, -4, 5]);
    let cases = [
        // `q`'s divisor, an input, is zero (element 1, broadcast over both rows).
        (
            int_div_inputs([7, -9, 4, 10, 11, -12], [2, 0, 5]),
            "(div `q` at int_div:3:17): integer division by zero (divisor element [1])",
        ),
        // The computed divisor `a - b` is zero at [1, 2].
        (
            int_div_inputs([7, -9, 4, 10, 11, 5], [2, -4, 5]),
            "(div at int_div:4:21): integer division by zero (divisor element [1, 2])",
        ),
        // Both: the interpreter's first error is the compiled one too.
        (
            int_div_inputs([7, -9, 4, 7, 11, 5], [7, 0, 5]),
            "(div `q` at int_div:3:17): integer division by zero (divisor element [1])",
        ),
    ];
    for (bad, words) in &cases {
        let err = eval(bad).unwrap_err().to_string();
        assert_eq!(after_node(&err), *words, "interpreter: {err}");
    }
    let want: Vec<Vec<f64>> = eval(&good).unwrap().iter().map(|(_, t)| t.to_f64_vec()).collect();
    assert_eq!(want, vec![vec![3.0, 2.0, 0.0, 5.0, -2.0, -2.0], vec![11.0, 12.0, -5.0, 10.0, 9.0, 9.0]]);

    for device in [Device::Cpu, Device::Vulkan, Device::Cuda] {
        if !available(device, "integer division by zero") {
            continue;
        }
        // As written and optimized (the chain `r` fuses into one kernel either way).
        for graph in [g.clone(), optimized(&g)] {
            let dir = tempfile::tempdir().unwrap();
            build_for(device, &graph, &params, dir.path());
            let mut model = Model::load_with(dir.path(), &Options::default()).unwrap();
            let run = |model: &mut Model, inputs: &HashMap<String, Tensor>| {
                let (a, b) = (inputs["a"].data.to_le_bytes(), inputs["b"].data.to_le_bytes());
                let refs = [
                    TensorRef::new("a", kiln_runtime::DType::I32, &[2, 3], &a),
                    TensorRef::new("b", kiln_runtime::DType::I32, &[3], &b),
                ];
                model.run(&refs).map(|outs| {
                    outs.iter()
                        .map(|o| o.as_i32().unwrap().iter().map(|&x| f64::from(x)).collect::<Vec<f64>>())
                        .collect::<Vec<_>>()
                })
            };
            assert_eq!(run(&mut model, &good).unwrap(), want, "{device:?}");
            for (bad, words) in &cases {
                let err = run(&mut model, bad).unwrap_err().to_string();
                assert!(err.starts_with("step \"k"), "{device:?}: {err}");
                assert_eq!(after_node(&err), *words, "{device:?}: {err}");
            }
            // The model is still good after the fault.
            assert_eq!(run(&mut model, &good).unwrap(), want, "{device:?}");
            // A profiled run (step by step, timed) reports the fault too.
            let (a, b) = (cases[0].0["a"].data.to_le_bytes(), cases[0].0["b"].data.to_le_bytes());
            let refs = [
                TensorRef::new("a", kiln_runtime::DType::I32, &[2, 3], &a),
                TensorRef::new("b", kiln_runtime::DType::I32, &[3], &b),
            ];
            match model.run_profiled(&refs, 2) {
                Err(kiln_runtime::RuntimeError::NoTimestamps { .. }) => {}
                Err(e) => assert_eq!(after_node(&e.to_string()), cases[0].1, "{device:?}"),
                Ok(_) => panic!("{device:?}: a profiled run divided by zero without an error"),
            }
            assert_eq!(run(&mut model, &good).unwrap(), want, "{device:?}");

            // The C ABI reports the runtime's error.
            let c_dir = std::ffi::CString::new(dir.path().to_str().unwrap()).unwrap();
            // SAFETY: the handle comes from the API and is freed once; the buffers have the
            // sizes the model declares (i32 [2, 3] and [3] in, i32 [2, 3] twice out).
            unsafe {
                use kiln_runtime::capi::*;
                let m = kiln_model_load_on(c_dir.as_ptr(), std::ptr::null(), 1);
                assert!(!m.is_null());
                let (a, b) = ([7i32, -9, 4, 10, 11, -12], [2i32, 0, 5]);
                let (mut q, mut r) = ([0i32; 6], [0i32; 6]);
                let inputs = [a.as_ptr().cast::<std::ffi::c_void>(), b.as_ptr().cast()];
                let outputs = [q.as_mut_ptr().cast::<std::ffi::c_void>(), r.as_mut_ptr().cast()];
                assert_eq!(kiln_model_run(m, inputs.as_ptr(), outputs.as_ptr()), 1);
                let message = std::ffi::CStr::from_ptr(kiln_last_error()).to_string_lossy().into_owned();
                assert_eq!(after_node(&message), cases[0].1, "{device:?}: {message}");
                kiln_model_free(m);
            }
        }
    }

    // The Vulkan kernels that record faults are valid SPIR-V, with or without a device.
    let spirv_dir = tempfile::tempdir().unwrap();
    let built = build_vulkan(&optimized(&g), &params, spirv_dir.path());
    assert!(built.modules.iter().any(|m| m.text.contains("spirv.AtomicUMin")));
    if spirv_val(&built, "integer division by zero").is_none() {
        eprintln!("skipped: integer division by zero: no spirv-val");
    }

    // Without a CUDA device, the CUDA kernels still lower to PTX that records the fault with
    // atomics, and assemble where there is a ptxas.
    if cuda_arch().is_err() {
        let (caps, target) = cuda_caps("sm_80");
        let s = kiln_sched::schedule_aligned(&optimized(&g), caps.buffer_align).expect("schedules");
        let program = kiln_codegen::gpu::kernels(&s, &caps).unwrap();
        let modules = kiln_codegen::gpu::nvvm::compile(&program.kernels, &target).unwrap();
        assert!(modules.iter().any(|m| m.ptx.contains("atom.global") && m.ptx.contains(".min.u32")));
        if let Some(ptxas) = ptxas("integer division by zero on CUDA") {
            for m in &modules {
                ptxas.assemble(&m.ptx, "sm_80").unwrap_or_else(|e| panic!("{}: {e}\n{}", m.symbol, m.ptx));
            }
        }
    }

    // The CLI: `kiln eval`, `kiln run` of the artifact and of the spec (compiled in memory)
    // fail with the same words and exit status 1.
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("int_div.ron");
    std::fs::write(&spec, INT_DIV_SPEC).unwrap();
    let (a, b) = (dir.path().join("a.npy"), dir.path().join("b.npy"));
    kiln_ir::tensor_io::write_npy(&a, &cases[0].0["a"]).unwrap();
    kiln_ir::tensor_io::write_npy(&b, &cases[0].0["b"]).unwrap();
    let art = dir.path().join("int_div.kiln");
    let (spec, art) = (spec.to_str().unwrap(), art.to_str().unwrap());
    let (a, b) = (format!("a={}", a.display()), format!("b={}", b.display()));
    let compiled = kiln(&["compile", spec, "-o", art]);
    assert!(compiled.status.success(), "{}", String::from_utf8_lossy(&compiled.stderr));
    let words = cases[0].1.replace("int_div:", &format!("{spec}:"));
    for args in [
        vec!["eval", spec, "--input", &a, "--input", &b],
        vec!["run", art, "--input", &a, "--input", &b],
        vec!["run", spec, "--input", &a, "--input", &b],
    ] {
        let out = kiln(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(&words), "{args:?}: {err}");
    }
}

/// Random edits of a real compiled artifact's manifest (numbers, names, symbols, shapes,
/// offsets, sizes, ranges, step order, dtypes), written back with a fresh digest line as a
/// careful forger would. Each load runs in this process, so a crash fails the test binary:
/// every case must either load and give exactly the unedited outputs or be refused with a
/// message. 64 cases (a few seconds).
#[test]
fn mutated_manifests_of_a_compiled_artifact_run_correctly_or_are_refused() {
    let g = optimized(&lower(
        "mutants",
        r#"Model(name: "mutants", config: {}, inputs: { "ids": (i32, [2, 3]), "x": (f32, [2, 3, 4]) },
           body: [
               Let("table", Param(shape: [5, 4], init: Normal(std: 1.0))),
               Let("e", Add(Gather(table: "table", indices: "ids"), "x")),
               Let("w", Param(shape: [4, 8], init: Normal(std: 0.5))),
               Let("y", Softmax(x: MatMul(Relu("e"), "w"), axis: -1)),
               Let("k", Div(Add("ids", 7), Add("ids", 1))),
           ],
           outputs: ["e", "y", "k"])"#,
    ));
    let params = kiln_ir::bind_params(&g, None, 6, false).unwrap();
    let base = tempfile::tempdir().unwrap();
    build_for(Device::Cpu, &g, &params, base.path());
    let inputs = kiln_ir::seeded_inputs(&g, 6);
    let want = run_artifact(base.path(), &inputs, "mutants");
    let text = std::fs::read_to_string(base.path().join(kiln_runtime::MANIFEST_FILE)).unwrap();
    let body = kiln_runtime::Manifest::split_digest(&text).unwrap();
    let manifest = kiln_runtime::Manifest::from_ron(body).unwrap();

    let mut runner = proptest::test_runner::TestRunner::new(proptest::test_runner::Config {
        cases: 64,
        failure_persistence: None,
        ..proptest::test_runner::Config::default()
    });
    let (refused, ran) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    runner
        .run(&(0u8..13, any::<u64>(), any::<u64>()), |(kind, a, b)| {
            let mut m = manifest.clone();
            mutate_manifest(&mut m, kind, a, b);
            let dir = tempfile::tempdir().unwrap();
            for f in [kiln_runtime::KERNELS_FILE, kiln_runtime::WEIGHTS_FILE] {
                std::fs::copy(base.path().join(f), dir.path().join(f)).unwrap();
            }
            std::fs::write(dir.path().join(kiln_runtime::MANIFEST_FILE), m.to_ron().unwrap()).unwrap();
            match Model::load_with(dir.path(), &Options { threads: Some(2), ..Options::default() }) {
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    refused.set(refused.get() + 1);
                }
                Ok(_) => {
                    prop_assert_eq!(run_artifact(dir.path(), &inputs, "mutant"), want.clone(), "{:?}", m);
                    ran.set(ran.get() + 1);
                }
            }
            Ok(())
        })
        .unwrap();
    assert!(refused.get() >= 48, "{} refused, {} ran", refused.get(), ran.get());
}

/// Edit number `kind` of `m`, at places and to values picked by `a` and `b`.
fn mutate_manifest(m: &mut kiln_runtime::Manifest, kind: u8, a: u64, b: u64) {
    use kiln_runtime::{BufRef, DType, Dispatch};
    const NUMBERS: [u64; 8] = [0, 1, 4, 64, 4096, u32::MAX as u64, u64::MAX, 1 << 40];
    let pick =
        |n: usize, salt: u64| ((a ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)) % n.max(1) as u64) as usize;
    let value = |old: u64| match b % 3 {
        0 => NUMBERS[(b / 3 % NUMBERS.len() as u64) as usize],
        1 => old.wrapping_add(1 + b % 64),
        _ => old.wrapping_sub(1 + b % 64),
    };
    let s = pick(m.steps.len(), 1);
    let step = &mut m.steps[s];
    let arg = pick(step.args.len(), 2);
    match kind {
        0 => m.arena_bytes = value(m.arena_bytes),
        1 => {
            let i = pick(m.inputs.len(), 3);
            let d = pick(m.inputs[i].shape.len(), 4);
            let fixed = m.inputs[i].shape[d].fixed().unwrap_or(0);
            m.inputs[i].shape[d] = kiln_runtime::Dim::Fixed(value(fixed));
        }
        2 => {
            step.args[arg] = match step.args[arg].clone() {
                BufRef::Arena { offset, bytes } if b.is_multiple_of(2) => {
                    BufRef::Arena { offset: value(offset), bytes }
                }
                BufRef::Arena { offset, bytes } => BufRef::Arena { offset, bytes: value(bytes) },
                BufRef::Weight { name, bytes } => BufRef::Weight { name, bytes: value(bytes) },
                BufRef::Input { index } => BufRef::Input { index: value(u64::from(index)) as u32 },
                BufRef::Output { index } => BufRef::Output { index: value(u64::from(index)) as u32 },
                BufRef::Symbols => BufRef::Input { index: value(0) as u32 },
            }
        }
        3 => {
            if let Dispatch::Cpu { range, grain } = step.dispatch.clone() {
                step.dispatch = if b.is_multiple_of(2) {
                    Dispatch::Cpu {
                        range: kiln_runtime::Dim::Fixed(value(range.fixed().unwrap_or(0))),
                        grain,
                    }
                } else {
                    Dispatch::Cpu { range, grain: value(grain) }
                };
            }
        }
        4 => {
            let symbols =
                ["abort", "exit", "free", "kiln_k0", "kiln_k1", "kiln_k999", "kiln_contract", "malloc"];
            step.symbol = symbols[pick(symbols.len(), 5)].into();
        }
        5 => {
            let other = pick(m.steps.len(), 6);
            m.steps.swap(s, other);
        }
        6 => {
            // Swap two steps but keep the labels in place, so only the contract can tell.
            let other = pick(m.steps.len(), 7);
            let labels: Vec<String> = m.steps.iter().map(|st| st.label.clone()).collect();
            m.steps.swap(s, other);
            m.steps.iter_mut().zip(labels).for_each(|(st, l)| st.label = l);
        }
        7 => {
            let i = pick(m.inputs.len(), 8);
            m.inputs[i].dtype = DType::ALL[pick(DType::ALL.len(), 9)];
        }
        8 => {
            let names = ["../e", "/tmp/e", "e", "y", "ids", "x", "a\u{0}b", "a\u{202E}b", ""];
            let name = names[pick(names.len(), 10)].to_string();
            if b.is_multiple_of(2) {
                let o = pick(m.outputs.len(), 11);
                m.outputs[o].name = name;
            } else {
                let i = pick(m.inputs.len(), 12);
                m.inputs[i].name = name;
            }
        }
        9 => {
            if b.is_multiple_of(2) {
                step.args.remove(arg);
            } else {
                let other = pick(step.args.len(), 13);
                step.args.swap(arg, other);
            }
        }
        10 => {
            let i = pick(m.index_bounds.len(), 14);
            if let Some(bound) = m.index_bounds.get_mut(i) {
                *bound = if b.is_multiple_of(2) { None } else { Some(value(bound.unwrap_or(5))) };
            }
        }
        11 => {
            let Some(faults) = m.faults.as_mut() else { panic!("the mutants model divides integers") };
            let i = pick(faults.sites.len(), 16);
            match b / 3 % 4 {
                0 => faults.offset = value(faults.offset),
                1 => faults.sites[i].step = value(u64::from(faults.sites[i].step)) as u32,
                2 => {
                    let shape = &mut faults.sites[i].shape;
                    let d = pick(shape.len(), 17);
                    if let Some(dim) = shape.get_mut(d) {
                        *dim = value(*dim);
                    }
                }
                _ => faults.sites.clear(),
            }
        }
        _ => {
            let f = pick(m.files.len(), 15);
            m.files[f].crc32 ^= (b as u32) | 1;
        }
    }
}

/// Float → int casts of ±inf, NaN and values outside the integer type saturate (NaN → 0) on
/// every target exactly as the interpreter documents, including at 2³¹ and 2⁶³, where the
/// integer type's MAX is not a float.
#[test]
fn float_to_int_casts_of_inf_nan_and_out_of_range_values_match_the_interpreter() {
    let g = lower(
        "casts",
        r#"Model(name: "casts", config: {}, inputs: { "x": (f32, [12]) },
           body: [ Let("a", Cast(x: "x", to: i32)), Let("b", Cast(x: "x", to: i64)) ],
           outputs: ["a", "b"])"#,
    );
    let x = vec![
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        3e9,
        -3e9,
        2_147_483_520.0,
        2_147_483_648.0,
        -2_147_483_648.0,
        -2.7,
        2.7,
        1e19,
        -1e19,
    ];
    let inputs = HashMap::from([("x".to_string(), Tensor::new(vec![12], kiln_ir::Buffer::F32(x)).unwrap())]);
    let params = HashMap::new();
    let want =
        kiln_ir::eval(&g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
    let want: Vec<Vec<f64>> = want.iter().map(|(_, t)| t.to_f64_vec()).collect();
    assert_eq!(want[0][..3], [i32::MAX as f64, i32::MIN as f64, 0.0], "the interpreter saturates");
    for device in [Device::Cpu, Device::Vulkan] {
        if available(device, "float to int casts") {
            assert_eq!(run_compiled(&g, &params, &inputs, device), want, "{device:?}");
        }
    }
}

/// `kiln check` (kiln-spec) and the runtime refuse the same tensor names, for the same reason.
#[test]
fn the_front_end_and_the_runtime_agree_on_tensor_names() {
    let long = "n".repeat(201);
    for name in [
        "ids",
        "x.1",
        "a-b",
        "",
        ".",
        "..",
        "../x",
        "/abs",
        "a\\b",
        "a\0b",
        "a\nb",
        "a\u{7f}b",
        "a\u{202E}b",
        "a\u{2066}b",
        "a\u{200F}b",
        "logits",
        "é",
        &long,
    ] {
        assert_eq!(kiln_spec::name_problem(name), kiln_runtime::name_problem(name), "{name:?}");
    }
    assert_eq!(kiln_runtime::name_problem("ids"), None);
    assert_eq!(kiln_runtime::name_problem(&long), Some("is longer than 200 bytes"));
}

// ------------------------------------------------------------------ fuzzing past the front end

/// Pieces spliced into small models: tokens, ops, odd numbers, names.
const SPEC_FRAGMENTS: &[&str] = &[
    "(",
    ")",
    "[",
    "]",
    ",",
    "\"x\"",
    "\"y\"",
    "-1",
    "0",
    "1e30",
    "-0.0",
    "0.5",
    "2",
    "65536",
    "Add(\"x\", \"x\")",
    "Mul(\"x\", 0.0)",
    "Div(\"x\", 0.0)",
    "Log(\"x\")",
    "Exp(Mul(\"x\", 100.0))",
    "Transpose(\"x\")",
    "Sum(x: \"x\", axes: [0])",
    "Softmax(x: \"x\", axis: 0)",
    "MatMul(\"x\", \"x\")",
    "Reshape(\"x\", [-1])",
    "Cast(x: \"x\", to: i32)",
    "Cast(x: \"x\", to: f16)",
    "f64",
    "i64",
    "bool",
];

/// The small models the mutations start from (each lowers and compiles as written).
const SEED_SPECS: &[&str] = &[
    r#"Model(name: "a", config: { "n": 4 }, inputs: { "x": (f32, ["n", "n"]) }, body: [Let("y", Softmax(x: Add(MatMul("x", "x"), 1.0), axis: 1))], outputs: ["y"])"#,
    r#"Model(name: "b", config: {}, inputs: { "x": (f32, [3, 5]), "y": (f32, [5]) }, body: [Let("z", Tanh(Mul("x", "y"))), Let("w", Sum(x: "z", axes: [1]))], outputs: ["z", "w"])"#,
    r#"Model(name: "c", config: { "k": 2 }, inputs: { "x": (f32, [2, 4, 6, 6]) }, body: [Let("p", MaxPool2d(x: "x", kernel: ["k", "k"], stride: [2, 2])), Let("q", LayerNorm(x: "p", eps: 1e-5))], outputs: ["q"])"#,
];

/// Lowers `text`; when it lowers, optimizes, schedules, compiles for this CPU, loads and runs
/// it on seeded inputs. Any step may refuse with an error; none may panic.
fn through_the_whole_pipeline(text: &str) {
    let (_, lowered) = kiln_lower::load_str("fuzz.ron", text, &[]);
    let Ok(l) = lowered else { return };
    let Ok((g, _)) = kiln_opt::optimize(&l.graph, &kiln_opt::Options::default()) else { return };
    if g.node_ids().any(|id| g.ty(id).numel() == 0 || g.ty(id).numel() > 1 << 20) {
        return;
    }
    let Ok(params) = kiln_ir::bind_params(&g, None, 0, false) else { return };
    let Ok(s) = kiln_sched::schedule(&g) else { return };
    let dir = tempfile::tempdir().unwrap();
    if kiln_codegen::build_artifact(&g.name, &s, &params, &kiln_codegen::CpuTarget::host(), dir.path())
        .is_err()
    {
        return;
    }
    let Ok(mut model) = Model::load_with(dir.path(), &Options { threads: Some(2), ..Options::default() })
    else {
        return;
    };
    let inputs = kiln_ir::seeded_inputs(&g, 0);
    let owned: Vec<(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)> = model
        .inputs()
        .iter()
        .filter_map(|spec| {
            inputs.get(&spec.name).map(|t| {
                (
                    spec.name.clone(),
                    spec.dtype,
                    t.shape.iter().map(|&d| d as u64).collect(),
                    t.data.to_le_bytes(),
                )
            })
        })
        .collect();
    let refs: Vec<TensorRef> = owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
    let _ = model.run(&refs);
}

/// Arguments the CLI fuzz draws from: every subcommand, its flags, and values good and bad.
const CLI_WORDS: &[&str] = &[
    "check",
    "inspect",
    "eval",
    "compile",
    "run",
    "train",
    "--data",
    "--holdout",
    "--epochs",
    "--resume",
    "--stage",
    "ir",
    "opt",
    "kernels",
    "gpu",
    "ptx",
    "spirv",
    "--format",
    "json",
    "dot",
    "--set",
    "batch=0",
    "batch=-1",
    "layers=99999999999",
    "hidden=3",
    "--seed",
    "-5",
    "18446744073709551615",
    "--target",
    "cuda:sm_1",
    "vulkan",
    "riscv",
    "--precision",
    "tf32",
    "f64",
    "--device",
    "cuda:7",
    "list",
    "--threads",
    "0",
    "100000",
    "--repeats",
    "-o",
    "/nonexistent/x",
    "--input",
    "x=missing.npy",
    "models/mlp.ron",
    "models/lstm.ron",
    "/dev/null",
    "--explain",
    "--origins",
    "--weights",
    "--init-missing",
    "--train",
    "--entry",
    "train_step",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("KILN_FUZZ_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(24), .. ProptestConfig::default() })]

    /// Mutated small models go through lowering, the optimizer, the scheduler, code generation
    /// and the runtime: each stage may refuse, none may panic.
    #[test]
    fn mutated_specs_never_panic_anywhere_in_the_pipeline(
        seed in 0usize..SEED_SPECS.len(),
        edits in prop::collection::vec((0usize..10_000, 0usize..12, 0usize..SPEC_FRAGMENTS.len(), 0u8..3), 0..4),
    ) {
        let mut text = SEED_SPECS[seed].to_string();
        for (at, len, frag, kind) in edits {
            let at = at % (text.len() + 1);
            let end = (at + len).min(text.len());
            match kind {
                0 => text.replace_range(at..end, ""),
                1 => text.insert_str(at, SPEC_FRAGMENTS[frag]),
                _ => text.replace_range(at..end, SPEC_FRAGMENTS[frag]),
            }
        }
        through_the_whole_pipeline(&text);
    }

    /// Random argument lists: kiln answers with exit 0, 1 (an error it explains) or 2 (usage),
    /// never a panic or a signal.
    #[test]
    fn cli_argument_combinations_never_panic(words in prop::collection::vec(0usize..CLI_WORDS.len(), 1..7)) {
        let args: Vec<&str> = words.iter().map(|&w| CLI_WORDS[w]).collect();
        // In a scratch folder holding copies of the models it names, so no combination can
        // write over the repository's files.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("models")).unwrap();
        for m in ["mlp.ron", "lstm.ron"] {
            let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join(m);
            std::fs::copy(from, dir.path().join("models").join(m)).unwrap();
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(dir.path())
            .env("KILN_CACHE", dir.path())
            .args(&args)
            .stdin(std::process::Stdio::null())
            .output()
            .expect("run kiln");
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(matches!(out.status.code(), Some(0..=2)), "kiln {}: {:?}\n{stderr}", args.join(" "), out.status);
        prop_assert!(!stderr.contains("panicked"), "kiln {}: {stderr}", args.join(" "));
    }
}

// ----------------------------------------------------------------------------------- training

/// Graphs around `scatter_add` (not a language op: autodiff makes it, as a gather's table
/// gradient): repeated rows across a block of columns wider than the CPU's 64, a strided
/// (transposed) updates view, indices whose axes strides cannot merge (the scheduler copies
/// them), integers, and the train step of a bag-of-embeddings classifier.
fn scatter_graphs() -> Vec<Graph> {
    let input = |g: &mut Graph, name: &str, dtype: DType, shape: &[usize]| {
        g.add(Op::Input { name: name.into(), dtype, shape: kiln_ir::dims(shape) }, &[]).unwrap()
    };
    let mut graphs = Vec::new();
    /// A graph `scatter_add(transpose(updates), ids)`.
    struct Case {
        name: &'static str,
        updates: (DType, &'static [usize]),
        perm: Option<&'static [usize]>,
        ids: (DType, &'static [usize]),
        axis: usize,
        extent: usize,
    }
    let cases = [
        Case {
            name: "scatter_rows",
            updates: (DType::F32, &[9, 70]),
            perm: None,
            ids: (DType::I64, &[9]),
            axis: 0,
            extent: 5,
        },
        Case {
            name: "scatter_strided",
            updates: (DType::F32, &[2, 3, 4]),
            perm: Some(&[2, 0, 1]),
            ids: (DType::I32, &[2]),
            axis: 1,
            extent: 3,
        },
        Case {
            name: "scatter_copied",
            updates: (DType::F32, &[3, 2, 2]),
            perm: Some(&[0, 2, 1]),
            ids: (DType::I64, &[2, 2]),
            axis: 1,
            extent: 3,
        },
        Case {
            name: "scatter_ints",
            updates: (DType::I32, &[6, 3]),
            perm: None,
            ids: (DType::I32, &[6]),
            axis: 0,
            extent: 2,
        },
    ];
    for c in cases {
        let mut g = Graph::new(c.name);
        let x = input(&mut g, "updates", c.updates.0, c.updates.1);
        let ids = input(&mut g, "ids", c.ids.0, c.ids.1);
        let x = match c.perm {
            Some(perm) => g.add(Op::Transpose { perm: perm.to_vec() }, &[x]).unwrap(),
            None => x,
        };
        let y = g.add(Op::ScatterAdd { axis: c.axis, extent: c.extent }, &[x, ids]).unwrap();
        g.add_output("y", y);
        graphs.push(g);
    }
    let spec = r#"Model(
        name: "bag_of_embeddings",
        config: { "batch": 4, "seq": 6, "vocab": 13, "dim": 70, "classes": 3 },
        inputs: { "tokens": (i64, ["batch", "seq"]), "label": (i64, ["batch"]) },
        use: ["std"],
        body: [
            Let("e", Call(fn: "std.embedding", args: ["tokens"], scope: "embed", with: { "num": "vocab", "dim": "dim" })),
            Let("m", Mean(x: "e", axes: 1)),
            Let("logits", Call(fn: "std.linear", args: ["m"], scope: "head", with: { "out": "classes" })),
        ],
        outputs: ["logits"],
        training: Training(
            loss: CrossEntropy(logits: "logits", labels: "label"),
            optimizer: Adam(lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8),
        ),
    )"#;
    let (sources, l) = kiln_lower::load_str("bag_of_embeddings", spec, &[]);
    let l = l.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let step = kiln_lower::train_step(&l).unwrap();
    assert!(
        step.graph.topo_order().iter().any(|&n| matches!(step.graph.node(n).op, Op::ScatterAdd { .. })),
        "the embedding's gradient is a scatter_add"
    );
    graphs.push(optimized(&step.graph));
    graphs.push(step.graph);
    graphs
}

/// `scatter_add` compiled for this CPU, Vulkan and CUDA computes what the interpreter
/// computes, in the same order of additions; the embedding train step included.
#[test]
fn scatter_add_compiles_like_the_interpreter() {
    let graphs = scatter_graphs();
    for g in &graphs {
        check_graph(g, 6, 1e-5, Device::Cpu);
    }
    if available(Device::Vulkan, "scatter_add on Vulkan") {
        for g in &graphs {
            check_graph(g, 6, 1e-5, Device::Vulkan);
        }
    }
    if available(Device::Cuda, "scatter_add on CUDA") {
        for g in &graphs {
            check_graph(g, 6, 1e-5, Device::Cuda);
        }
    }
}

/// One train step (forward, loss, backward, the optimizer's update and schedule) of a shipped
/// model at small sizes, compiled for this CPU, Vulkan and CUDA, computes what the interpreter
/// computes.
/// The parameters are bound at compile time here, as weights: one step, not a training run.
/// The MLP runs as shipped and with its first layer's ReLU made a SiLU (`z · sigmoid(z)`, whose
/// backward reads both `z` and `sigmoid(z)`).
#[test]
fn a_train_step_compiles_like_the_interpreter() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mlp.ron");
    let shipped = std::fs::read_to_string(&path).unwrap();
    let relu = r#"Let("h", Relu(Call(fn: "std.linear", args: ["image"], scope: "fc1", with: { "out": "hidden1" }))),"#;
    let silu = r#"Let("h", Call(fn: "std.silu", args: [Call(fn: "std.linear", args: ["image"], scope: "fc1", with: { "out": "hidden1" })])),"#;
    assert!(shipped.contains(relu), "mlp.ron's first layer moved");
    let sets = ["batch=8", "in=12", "hidden1=16", "hidden2=16", "classes=4"];
    let overrides: Vec<_> = sets.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
    for (name, text) in [("mlp", shipped.clone()), ("mlp_silu", shipped.replace(relu, silu))] {
        let (sources, r) = kiln_lower::load_str(name, &text, &overrides);
        let l = r.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let step = kiln_lower::train_step(&l).unwrap();
        check_graph(&step.graph, 4, 1e-4, Device::Cpu);
        let opt = optimized(&step.graph);
        check_graph(&opt, 5, 1e-4, Device::Cpu);
        if available(Device::Vulkan, "a train step on Vulkan") {
            check_graph(&opt, 5, 1e-4, Device::Vulkan);
        }
        if available(Device::Cuda, "a train step on CUDA") {
            check_graph(&opt, 5, 1e-4, Device::Cuda);
        }
    }
}

/// Graphs with an `attention` and the `attention_lse` of the same operands, and with the
/// log-sum-exp alone, each with the kernels it must schedule to (`attention` writing both, or
/// `attention_lse`): plain, causal, masked (a mask with −inf entries and a row of them) and
/// both; 11 query rows, so the last row vector of a block is partial.
fn attention_lse_graphs() -> Vec<(Graph, &'static [&'static str])> {
    attention_lse_graphs_with(5)
}

/// [`attention_lse_graphs`] with value rows of `dv`.
fn attention_lse_graphs_with(dv: usize) -> Vec<(Graph, &'static [&'static str])> {
    attention_lse_graphs_sized(11, 13, 8, dv)
}

/// [`attention_lse_graphs`] over `sq` queries and `sk` keys, heads of `d` and value rows of
/// `dv`.
fn attention_lse_graphs_sized(
    sq: usize,
    sk: usize,
    d: usize,
    dv: usize,
) -> Vec<(Graph, &'static [&'static str])> {
    let cases: [(&str, bool, bool, bool); 5] = [
        ("attention_and_lse", false, false, true),
        ("causal_attention_and_lse", true, false, true),
        ("masked_attention_and_lse", false, true, true),
        ("lse_alone", false, false, false),
        ("masked_causal_lse_alone", true, true, false),
    ];
    // Keys j ≡ i (mod 5) hidden from row i, and every key from row 3.
    let mask: Vec<f64> = (0..sq * sk)
        .map(|e| if e / sk == 3 || (e % sk) % 5 == (e / sk) % 5 { f64::NEG_INFINITY } else { 0.0 })
        .collect();
    cases
        .into_iter()
        .map(|(name, causal, masked, with_attention)| {
            let mut g = Graph::new(name);
            let input = |g: &mut Graph, name: &str, shape: &[usize]| {
                let op = Op::Input { name: name.into(), dtype: DType::F32, shape: kiln_ir::dims(shape) };
                g.add(op, &[]).unwrap()
            };
            let q = input(&mut g, "q", &[2, 2, sq, d]);
            let k = input(&mut g, "k", &[2, 2, sk, d]);
            let mut scores = vec![q, k];
            if masked {
                let value = Tensor::from_f64(vec![1, sq, sk], mask.clone()).unwrap().cast(DType::F32);
                scores.push(g.add(Op::Const { value }, &[]).unwrap());
            }
            let lse = g.add(Op::AttentionLse { scale: 0.35, causal, masked }, &scores).unwrap();
            let kernels: &[&str] = if with_attention {
                let v = input(&mut g, "v", &[2, 2, sk, dv]);
                let mut operands = vec![q, k, v];
                operands.extend(scores.get(2));
                let y = g.add(Op::Attention { scale: 0.35, causal, masked }, &operands).unwrap();
                g.add_output("y", y);
                &["attention"]
            } else {
                &["attention_lse"]
            };
            g.add_output("lse", lse);
            (g, kernels)
        })
        .collect()
}

/// An attention and its log-sum-exp are one kernel writing both; the log-sum-exp alone is a
/// kernel of its own; either equals the interpreter on the CPU and on Vulkan.
#[test]
fn attention_lse_compiles_like_the_interpreter() {
    for (g, kernels) in attention_lse_graphs() {
        let s = kiln_sched::schedule(&g).unwrap();
        let names: Vec<String> = s.kernels.iter().map(|k| k.name()).collect();
        assert_eq!(names, kernels, "{}", g.name);
        assert_eq!(s.kernels[0].extra_outputs.len(), usize::from(kernels == ["attention"]), "{}", g.name);
        check_graph(&g, 7, 1e-5, Device::Cpu);
        if available(Device::Vulkan, "attention's log-sum-exp on Vulkan") {
            check_graph(&g, 7, 1e-5, Device::Vulkan);
        }
        if available(Device::Cuda, "attention's log-sum-exp on CUDA") {
            check_graph(&g, 7, 1e-5, Device::Cuda);
        }
    }
}

/// A 2-layer BERT whose layers call the fused `Attention` op: its train step's backward reads
/// each attention's log-sum-exp, which the forward attention's kernel writes (two attention
/// kernels with two results each, no `attention_lse` kernel), and the compiled step equals the
/// interpreter's on the CPU and on Vulkan.
#[test]
fn a_fused_attention_train_step_saves_the_log_sum_exp_in_the_forward_kernel() {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/bert_encoder.ron"))
        .unwrap();
    let module = r#"    modules: {
        // Heads split, the fused op, heads merged.
        "fused_attention": Module(
            args: ["q", "k", "v", "mask"],
            body: [
                Let("q", Transpose(x: Reshape("q", ["dim(q, 0)", "dim(q, 1)", "heads", "dim(q, 2) / heads"]), perm: [0, 2, 1, 3])),
                Let("k", Transpose(x: Reshape("k", ["dim(k, 0)", "dim(k, 1)", "heads", "dim(k, 2) / heads"]), perm: [0, 2, 1, 3])),
                Let("v", Transpose(x: Reshape("v", ["dim(v, 0)", "dim(v, 1)", "heads", "dim(v, 2) / heads"]), perm: [0, 2, 1, 3])),
                Let("ctx", Transpose(x: Attention("q", "k", "v", "mask"), perm: [0, 2, 1, 3])),
                Let("y", Reshape("ctx", ["dim(ctx, 0)", "dim(ctx, 1)", "dim(ctx, 2) * dim(ctx, 3)"])),
            ],
            ret: "y",
        ),
"#;
    let text = text
        .replacen("    modules: {\n", module, 1)
        .replacen(
            r#"Call(fn: "std.attention", args: ["q", "k", "v", "mask"], with: { "heads": "heads" })"#,
            r#"Call(fn: "fused_attention", args: ["q", "k", "v", "mask"])"#,
            1,
        )
        .replacen(
            r#""attention_mask": (i64, ["batch", "seq"]),"#,
            r#""attention_mask": (i64, ["batch", "seq"]), "target": (f32, ["batch", "seq", "hidden"]),"#,
            1,
        )
        .replacen(
            r#"outputs: { "last_hidden_state": "x" },"#,
            r#"outputs: { "last_hidden_state": "x" },
    training: Training(loss: Mse(pred: "x", target: "target"), optimizer: Sgd(lr: 0.1)),"#,
            1,
        );
    assert!(text.contains("fused_attention\", args") && text.contains("Training("), "{text}");
    let sets =
        ["vocab=40", "hidden=16", "layers=2", "heads=2", "ffn=32", "max_positions=12", "batch=2", "seq=8"];
    let overrides: Vec<_> = sets.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
    let (sources, r) = kiln_lower::load_str("bert_fused.ron", &text, &overrides);
    let l = r.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
    let step = optimized(&kiln_lower::train_step(&l).unwrap().graph);
    let s = kiln_sched::schedule(&step).unwrap();
    let count = |name: &str, extra: usize| {
        s.kernels.iter().filter(|k| k.name() == name && k.extra_outputs.len() == extra).count()
    };
    assert_eq!((count("attention", 1), count("attention", 0), count("attention_lse", 0)), (2, 0, 0));
    check_graph(&step, 8, 1e-4, Device::Cpu);
    if available(Device::Vulkan, "a fused-attention train step on Vulkan") {
        check_graph(&step, 8, 1e-4, Device::Vulkan);
    }
}

/// A train step with dropout at step 3: its mask is drawn from counter `3 × span` on, on the
/// CPU and the GPU targets as in the interpreter.
#[test]
fn a_dropout_train_step_draws_the_steps_mask_like_the_interpreter() {
    let dir = tempfile::tempdir().unwrap();
    let spec = with_dropout(&small_mlp(dir.path(), "Sgd(lr: 0.1)"));
    let step = kiln_lower::train_step(&lowered(&spec)).unwrap();
    let g = optimized(&step.graph);
    let params = kiln_ir::bind_params(&g, None, 3, false).unwrap();
    let mut inputs = kiln_ir::seeded_inputs(&g, 3);
    let mut devices = vec![Device::Cpu];
    if available(Device::Vulkan, "a dropout train step on Vulkan") {
        devices.push(Device::Vulkan);
    }
    if available(Device::Cuda, "a dropout train step on CUDA") {
        devices.push(Device::Cuda);
    }
    let mut losses = vec![];
    for count in [0.0, 3.0] {
        inputs.insert("optim.step".into(), Tensor::from_f32(vec![], vec![count]).unwrap());
        let want =
            kiln_ir::eval(&g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() }).unwrap();
        losses.push(want[0].1.to_f64_vec());
        for &device in &devices {
            let got = run_compiled(&g, &params, &inputs, device);
            for ((name, w), gv) in want.iter().zip(&got) {
                assert_close(&format!("step {count} on {device:?} `{name}`"), &w.to_f64_vec(), gv, 1e-4);
            }
        }
    }
    assert_ne!(losses[0], losses[1], "steps 0 and 3 draw different masks");
}

// --------------------------------------------------------------------------- persistent state

/// `models/mlp.ron` at small sizes with its training section's optimizer replaced by
/// `optimizer` and no schedule, written into `dir`; returns its path and the `--set` overrides.
fn small_mlp(dir: &Path, optimizer: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mlp.ron")).unwrap();
    let start = text.find("        optimizer:").expect("mlp.ron has an optimizer line");
    let end = text[start..].find("    ),\n)").map(|e| start + e).expect("mlp.ron ends its training section");
    let text = format!("{}        optimizer: {optimizer},\n{}", &text[..start], &text[end..]);
    let path = dir.join("mlp.ron");
    std::fs::write(&path, text).unwrap();
    path
}

/// The spec at `spec` with dropout (std's, p = 0.5) after its second hidden layer and the
/// config `training` on, written beside it as `dropout.ron`.
fn with_dropout(spec: &Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(spec).unwrap();
    let text = text.replace("\"classes\": 10 },", "\"classes\": 10, \"training\": true },").replacen(
        "        Let(\"logits\"",
        "        Let(\"h\", Call(fn: \"std.dropout\", args: [\"h\"])),\n        Let(\"logits\"",
        1,
    );
    assert!(text.contains("std.dropout") && text.contains("\"training\": true"), "{text}");
    let path = spec.with_file_name("dropout.ron");
    std::fs::write(&path, text).unwrap();
    path
}

const SMALL_MLP: [&str; 6] = ["batch=8", "in=12", "hidden1=16", "hidden2=16", "classes=4", "seed=0"];

/// Runs the `kiln` binary; returns (exit code, stdout, stderr).
fn kiln_cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().expect("run kiln");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `kiln compile SPEC --train` at the small sizes into `out`.
fn compile_train(spec: &Path, out: &Path) {
    compile_train_for(spec, out, "host");
}

/// [`compile_train`] for `--target target`.
fn compile_train_for(spec: &Path, out: &Path, target: &str) {
    let (spec, out) = (spec.to_str().unwrap(), out.to_str().unwrap());
    let mut args = vec!["compile", spec, "--train", "--target", target, "-o", out];
    for s in &SMALL_MLP[..5] {
        args.extend(["--set", s]);
    }
    let (code, stdout, stderr) = kiln_cli(&args);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("entry points: forward ("), "{stdout}");
}

/// The spec lowered as `kiln compile` lowers it (its overrides and the seed).
fn lowered(spec: &Path) -> kiln_lower::Lowered {
    let overrides: Vec<_> = SMALL_MLP.iter().map(|s| kiln_lower::Override::parse(s).unwrap()).collect();
    let (sources, r) = kiln_lower::load(spec, &overrides);
    r.unwrap_or_else(|d| panic!("{}", d.render(&sources)))
}

/// The runtime's tensors for `inputs`, in the order `specs` lists them.
fn runtime_inputs(
    specs: &[kiln_runtime::TensorSpec],
    inputs: &HashMap<String, Tensor>,
) -> Vec<(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)> {
    specs
        .iter()
        .map(|s| {
            let t = &inputs[&s.name];
            (s.name.clone(), s.dtype, t.shape.iter().map(|&d| d as u64).collect(), t.data.to_le_bytes())
        })
        .collect()
}

fn refs(owned: &[(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)]) -> Vec<TensorRef<'_>> {
    owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect()
}

fn f32_values(t: &kiln_runtime::Tensor) -> Vec<f64> {
    t.as_f32().unwrap_or_else(|| panic!("{} is f32", t.name())).iter().map(|&x| x as f64).collect()
}

fn assert_close(what: &str, want: &[f64], got: &[f64], tol: f64) {
    assert_eq!(want.len(), got.len(), "{what}: length");
    for (i, (a, b)) in want.iter().zip(got).enumerate() {
        assert!(
            a == b || (a - b).abs() <= tol * (1.0 + a.abs()),
            "{what}[{i}]: interpreter {a}, compiled {b}"
        );
    }
}

/// N train steps of the compiled training artifact (`kiln compile --train`, state updated in
/// place in its arena) against N interpreter steps of the stateful train-step graph, for Adam
/// and SGD with momentum, and Adam with dropout (a new mask each step, from `optim.step`):
/// every step's loss and learning rate, then every state tensor, within 1e-5·(1 + |ref|); then
/// `forward` computes with the trained parameters.
#[test]
fn a_training_artifact_trains_like_the_interpreter() {
    trains_like_the_interpreter(Device::Cpu);
}

/// The same on Vulkan: the state stays in the device arena, `read_state` copies it out.
#[test]
fn a_vulkan_training_artifact_trains_like_the_interpreter() {
    if available(Device::Vulkan, "a Vulkan training artifact") {
        trains_like_the_interpreter(Device::Vulkan);
    }
}

#[test]
fn a_cuda_training_artifact_trains_like_the_interpreter() {
    if available(Device::Cuda, "a CUDA training artifact") {
        trains_like_the_interpreter(Device::Cuda);
    }
}

fn trains_like_the_interpreter(device: Device) {
    let (target, selector) = match device {
        Device::Cpu => ("host".to_string(), None),
        Device::Vulkan => ("vulkan".to_string(), Some("vulkan".to_string())),
        Device::Cuda => {
            (format!("cuda:{}", cuda_arch().expect("checked by available")), Some("cuda".to_string()))
        }
        Device::CudaTf32 | Device::CudaTf32x3 => panic!("training artifacts are checked in f32"),
    };
    for (optimizer, dropout) in
        [("Adam(lr: 0.01)", false), ("Sgd(lr: 0.1, momentum: 0.9)", false), ("Adam(lr: 0.01)", true)]
    {
        let dir = tempfile::tempdir().unwrap();
        let spec = small_mlp(dir.path(), optimizer);
        let spec = if dropout { with_dropout(&spec) } else { spec };
        let optimizer = if dropout { format!("{optimizer} with dropout") } else { optimizer.to_string() };
        let artifact = dir.path().join("mlp.kiln");
        compile_train_for(&spec, &artifact, &target);
        let l = lowered(&spec);
        let step = kiln_lower::train_step(&l).unwrap();
        let mut g = step.graph.clone();
        kiln_lower::declare_train_state(&mut g, &step.optimizer).unwrap();
        let params = kiln_ir::bind_params(&l.graph, None, 0, false).unwrap();
        let mut state = kiln_ir::initial_state(&g, &params).unwrap();

        let mut model =
            Model::load_with(&artifact, &Options { threads: Some(2), device: selector.clone() }).unwrap();
        assert_eq!(model.entries(), ["forward", "train_step"]);
        let mut names = model.state_names();
        names.sort();
        let mut want_names: Vec<String> = state.keys().cloned().collect();
        want_names.sort();
        assert_eq!(names, want_names, "{optimizer}");
        for k in 0..4 {
            let inputs = kiln_ir::seeded_inputs(&g, 10 + k);
            let want = kiln_ir::eval_step(&g, inputs.clone(), &HashMap::new(), &mut state).unwrap();
            let owned = runtime_inputs(model.entry_inputs("train_step").unwrap(), &inputs);
            let got = model.run_entry("train_step", &refs(&owned)).unwrap();
            assert_eq!(got.len(), want.len());
            for ((name, w), t) in want.iter().zip(&got) {
                assert_eq!(name, t.name());
                assert_close(
                    &format!("{optimizer} step {k} `{name}`"),
                    &w.to_f64_vec(),
                    &f32_values(t),
                    1e-5,
                );
            }
        }
        for (name, value) in &state {
            let got = model.read_state(name).unwrap();
            assert_close(
                &format!("{optimizer} state `{name}`"),
                &value.to_f64_vec(),
                &f32_values(&got),
                1e-5,
            );
        }
        assert_eq!(model.read_state("optim.step").unwrap().as_f32().unwrap(), [4.0]);

        // `forward` reads the trained parameters, which moved the outputs.
        let x = kiln_ir::seeded_inputs(&l.graph, 99);
        let trained: HashMap<String, Tensor> =
            params.keys().map(|name| (name.clone(), state[name].clone())).collect();
        let want =
            kiln_ir::eval(&l.graph, &kiln_ir::Bindings { inputs: x.clone(), params: trained }).unwrap();
        let before =
            kiln_ir::eval(&l.graph, &kiln_ir::Bindings { inputs: x.clone(), params: params.clone() })
                .unwrap();
        let owned = runtime_inputs(model.entry_inputs("forward").unwrap(), &x);
        let got = model.run_entry("forward", &refs(&owned)).unwrap();
        for (((name, w), t), (_, b)) in want.iter().zip(&got).zip(&before) {
            assert_close(
                &format!("{optimizer} trained forward `{name}`"),
                &w.to_f64_vec(),
                &f32_values(t),
                1e-5,
            );
            let moved = w.to_f64_vec().iter().zip(b.to_f64_vec()).any(|(a, b)| (a - b).abs() > 1e-3);
            assert!(moved, "{optimizer}: training did not move `{name}`");
        }
        // `run` is `forward`.
        assert_eq!(model.run(&refs(&owned)).unwrap()[0].bytes(), got[0].bytes());
    }
}

/// The state survives from run to run of one model; `read_state`/`write_state` save and
/// restore it (a resumed run repeats the steps exactly), and each refuses what does not fit.
#[test]
fn training_state_survives_runs_and_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_mlp(dir.path(), "Adam(lr: 0.01)");
    let artifact = dir.path().join("mlp.kiln");
    compile_train(&spec, &artifact);
    let l = lowered(&spec);
    let mut model = Model::load_with(&artifact, &Options { threads: Some(2), ..Options::default() }).unwrap();
    let saved: Vec<(String, kiln_runtime::Tensor)> =
        model.state_names().into_iter().map(|n| (n.clone(), model.read_state(&n).unwrap())).collect();
    let inputs = kiln_ir::seeded_inputs(&kiln_lower::train_step(&l).unwrap().graph, 3);
    let owned = runtime_inputs(model.entry_inputs("train_step").unwrap(), &inputs);
    let first: Vec<Vec<u8>> =
        (0..3).map(|_| model.run_entry("train_step", &refs(&owned)).unwrap()[0].bytes().to_vec()).collect();
    assert_ne!(first[0], first[2], "the loss moves as the state trains");
    assert_eq!(model.read_state("optim.step").unwrap().as_f32().unwrap(), [3.0]);
    for (name, t) in &saved {
        model.write_state(name, &TensorRef::new(name, t.dtype(), t.shape(), t.bytes())).unwrap();
        assert_eq!(model.read_state(name).unwrap().bytes(), t.bytes(), "{name}");
    }
    let again: Vec<Vec<u8>> =
        (0..3).map(|_| model.run_entry("train_step", &refs(&owned)).unwrap()[0].bytes().to_vec()).collect();
    assert_eq!(again, first, "restored state repeats the same steps");

    let zero = [0.0f32; 3];
    assert_eq!(
        model.write_state("optim.step", &TensorRef::f32("x", &[3], &zero)).unwrap_err().to_string(),
        "state \"optim.step\" is f32[], the value given is f32[3] (12 bytes)"
    );
    assert_eq!(
        model.read_state("nope").unwrap_err().to_string(),
        format!("the model keeps no state \"nope\" (it keeps {})", model.state_names().join(", "))
    );
    assert_eq!(
        model.run_entry("backward", &[]).unwrap_err().to_string(),
        "the model has no entry point \"backward\" (it has forward, train_step)"
    );
}

/// Damaged state tables and entry lists of a training artifact are refused at load, each with
/// its reason (the manifest rewritten with a fresh digest line, as a careful forger would).
#[test]
fn a_bad_state_table_is_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_mlp(dir.path(), "Sgd(lr: 0.1, momentum: 0.9)");
    let artifact = dir.path().join("mlp.kiln");
    compile_train(&spec, &artifact);
    let text = std::fs::read_to_string(artifact.join(kiln_runtime::MANIFEST_FILE)).unwrap();
    let manifest =
        kiln_runtime::Manifest::from_ron(kiln_runtime::Manifest::split_digest(&text).unwrap()).unwrap();
    let (s0, s1) = (manifest.state[0].name.clone(), manifest.state[1].name.clone());
    let arena = manifest.arena_bytes;
    type Edit = Box<dyn Fn(&mut kiln_runtime::Manifest)>;
    let cases: Vec<(Edit, String)> = vec![
        (
            Box::new(|m| m.state[0].offset += 8),
            format!("state {s0:?} at arena offset 8 is not 64-byte aligned"),
        ),
        (
            Box::new(move |m| m.state[0].offset = arena),
            format!(
                "state {s0:?} at arena offset {arena} ({} bytes) lies outside the arena of {arena} bytes",
                manifest.state[0].byte_len().unwrap()
            ),
        ),
        (
            Box::new(|m| m.state[1].offset = m.state[0].offset),
            format!("state {s1:?} and {s0:?} overlap in the arena"),
        ),
        (Box::new(|m| m.state[1].name = m.state[0].name.clone()), format!("state {s0:?} is declared twice")),
        (
            Box::new(|m| m.state[0].init = kiln_runtime::StateInit::Weight { name: "nope".into() }),
            format!("state {s0:?} starts from weight \"nope\", which the weights file lacks"),
        ),
        (Box::new(|m| m.state[0].dtype = kiln_runtime::DType::I32), format!("state {s0:?} is i32")),
        (Box::new(|m| m.entries[0].name = "forward".into()), "two entry points are named \"forward\"".into()),
        (
            Box::new(|m| m.entries[0].name = "a/b".into()),
            "entry point name \"a/b\" contains a path separator".into(),
        ),
        (
            Box::new(|m| {
                let slot = m.state[0].offset;
                m.entries[0].steps[0].args[0] = kiln_runtime::BufRef::Arena { offset: slot, bytes: 1 << 30 };
            }),
            "straddle a state slot".into(),
        ),
    ];
    for (edit, message) in cases {
        let mut m = manifest.clone();
        edit(&mut m);
        let bad = tempfile::tempdir().unwrap();
        for f in [kiln_runtime::KERNELS_FILE, kiln_runtime::WEIGHTS_FILE] {
            std::fs::copy(artifact.join(f), bad.path().join(f)).unwrap();
        }
        std::fs::write(bad.path().join(kiln_runtime::MANIFEST_FILE), m.to_ron().unwrap()).unwrap();
        let err = Model::load(bad.path()).unwrap_err().to_string();
        assert!(err.starts_with("invalid manifest: ") && err.contains(&message), "{message}: {err}");
    }
}

/// In a graph with state, weights that do not train are still stored packed for the matmul
/// micro-kernel, and the trained one is not (it lives in its state slot); two runs update it,
/// through a copy at the end of the run since a kernel after the update reads the old value.
#[test]
fn frozen_weights_are_prepacked_and_trained_ones_are_not() {
    let mut g = Graph::new("mixed");
    let x =
        g.add(Op::Input { name: "x".into(), dtype: DType::F32, shape: kiln_ir::dims(&[4, 8]) }, &[]).unwrap();
    let param = |g: &mut Graph, name: &str| {
        let op = Op::Param {
            name: name.into(),
            dtype: DType::F32,
            shape: kiln_ir::dims(&[8, 16]),
            init: kiln_ir::Init::Zeros,
        };
        g.add(op, &[]).unwrap()
    };
    let (wf, wt) = (param(&mut g, "frozen"), param(&mut g, "trained"));
    let (a, b) = (g.add(Op::MatMul, &[x, wf]).unwrap(), g.add(Op::MatMul, &[x, wt]).unwrap());
    let y = g.add(Op::Binary(kiln_ir::BinaryOp::Add), &[a, b]).unwrap();
    let half = g.add(Op::Full { value: 0.5, dtype: DType::F32, shape: kiln_ir::dims(&[]) }, &[]).unwrap();
    let decayed = g.add(Op::Binary(kiln_ir::BinaryOp::Mul), &[wt, half]).unwrap();
    // Read after the update's kernel: the update goes through a copy at the end.
    let late =
        g.add(Op::Reduce { op: kiln_ir::ReduceOp::Sum, axes: vec![0, 1], keepdims: false }, &[wt]).unwrap();
    g.add_output("y", y);
    g.add_output("new", decayed);
    g.add_output("late", late);
    g.declare_state("trained", kiln_ir::StateInit::Weights, Some("new")).unwrap();
    let params = kiln_ir::bind_params(&g, None, 1, false).unwrap();
    // The CUDA target keeps the state in its arena too: the slot comes first, stored once as
    // its initial value, and every step reads and writes it there.
    let dir = tempfile::tempdir().unwrap();
    let (caps, _) = cuda_caps("sm_80");
    let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
    let b = kiln_codegen::build_cuda_artifact("mixed", &s, &params, &caps, None, dir.path()).unwrap();
    let slot = &b.manifest.state[..];
    assert_eq!(slot.len(), 1);
    assert_eq!(
        (slot[0].name.as_str(), slot[0].offset, &slot[0].init),
        ("trained", 0, &kiln_runtime::StateInit::Weight { name: "trained".into() })
    );
    let in_slot =
        |a: &kiln_runtime::BufRef| matches!(a, kiln_runtime::BufRef::Arena { offset: 0, bytes: 512 });
    assert!(b.manifest.steps.iter().any(|st| st.args.iter().any(in_slot)), "{:?}", b.manifest.steps);
    // Initializers of zeros would hide a stale weight: give both values.
    let params: HashMap<String, Tensor> = params
        .into_keys()
        .enumerate()
        .map(|(i, n)| {
            let v = (0..128).map(|j| ((j * 7 + i * 3) % 11) as f32 * 0.1 - 0.5).collect();
            (n, Tensor::from_f32(vec![8, 16], v).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    build_for(Device::Cpu, &g, &params, dir.path());
    let weights = kiln_runtime::WeightStore::open(dir.path().join(kiln_runtime::WEIGHTS_FILE)).unwrap();
    let mut names: Vec<&str> = weights.names();
    names.sort();
    assert!(names.iter().any(|n| n.starts_with("frozen@panels")), "{names:?}");
    assert!(!names.iter().any(|n| n.starts_with("trained@") || *n == "frozen"), "{names:?}");
    assert!(names.contains(&"trained"), "{names:?}");

    let inputs = kiln_ir::seeded_inputs(&g, 2);
    let frozen = HashMap::from([("frozen".to_string(), params["frozen"].clone())]);
    let mut state = kiln_ir::initial_state(&g, &params).unwrap();
    let mut model =
        Model::load_with(dir.path(), &Options { threads: Some(2), ..Options::default() }).unwrap();
    let last = &model.manifest().steps.last().unwrap().label;
    assert!(last.contains(" copy "), "the update is copied into its slot at the end: {last}");
    let owned = runtime_inputs(model.inputs(), &inputs);
    for run in 0..2 {
        let want = kiln_ir::eval_step(&g, inputs.clone(), &frozen, &mut state).unwrap();
        let got = model.run(&refs(&owned)).unwrap();
        for ((name, w), t) in want.iter().zip(&got) {
            assert_close(&format!("run {run} `{name}`"), &w.to_f64_vec(), &f32_values(t), 1e-5);
        }
    }
    assert_close(
        "trained",
        &state["trained"].to_f64_vec(),
        &f32_values(&model.read_state("trained").unwrap()),
        0.0,
    );
}

/// The CLI: `kiln compile --train`, `kiln run --entry`, `kiln inspect` of the artifact, and
/// the refusals (no training section, a GPU target, `--entry` on a spec or unknown).
#[test]
fn the_cli_builds_runs_and_inspects_a_training_artifact() {
    let dir = tempfile::tempdir().unwrap();
    let spec = small_mlp(dir.path(), "Sgd(lr: 0.1, momentum: 0.9)");
    let artifact = dir.path().join("mlp.kiln");
    compile_train(&spec, &artifact);
    let a = artifact.to_str().unwrap();
    let (code, stdout, stderr) = kiln_cli(&["run", a, "--entry", "train_step", "--repeats", "2"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("\nloss: f32[] [") && stdout.contains("\noptim.lr: f32[] [0.100000]"),
        "{stdout}"
    );
    // `--profile` times the entry point asked for: its steps, one of them the weight update.
    let (code, stdout, stderr) =
        kiln_cli(&["run", a, "--entry", "train_step", "--repeats", "1", "--profile"]);
    assert_eq!(code, Some(0), "{stderr}");
    let steps = |out: &str| {
        out.lines().find_map(|l| l.strip_prefix("profile: ")?.split(' ').next()?.parse::<usize>().ok())
    };
    let (_, forward, _) = kiln_cli(&["run", a, "--repeats", "1", "--profile"]);
    assert!(steps(&stdout) > steps(&forward) && steps(&forward).is_some(), "{stdout}\n{forward}");
    assert!(stdout.contains("\nloss: f32[] ["), "{stdout}");
    let (code, stdout, _) = kiln_cli(&["inspect", a]);
    assert_eq!(code, Some(0));
    for line in [
        "entry forward: 4 kernels\n",
        "\n  output loss: f32[]\n",
        "\nstate: 13 tensors, ",
        "\n  fc1.weight: f32[16, 12] at arena offset 0, from weight fc1.weight\n",
        "\n  optim.momentum.fc3.bias: f32[4] at arena offset ",
    ] {
        assert!(stdout.contains(line), "{line:?} in:\n{stdout}");
    }
    // Dropout draws a new mask each step (its counters follow `optim.step`): no warning.
    let dropout = with_dropout(&spec);
    let out = dir.path().join("d.kiln");
    let (code, _, stderr) = kiln_cli(&[
        "compile",
        dropout.to_str().unwrap(),
        "--train",
        "-o",
        out.to_str().unwrap(),
        "--set",
        "in=12",
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");

    // The same artifact for CUDA: both entry points over the state in its arena, every module
    // assembled by `ptxas` when there is one; without a CUDA device its load says why, after
    // every manifest check (state table, entry points, steps) has passed.
    let cuda = dir.path().join("mlp-cuda.kiln");
    compile_train_for(&spec, &cuda, "cuda");
    let text = std::fs::read_to_string(cuda.join(kiln_runtime::MANIFEST_FILE)).unwrap();
    let m = kiln_runtime::Manifest::from_ron(kiln_runtime::Manifest::split_digest(&text).unwrap()).unwrap();
    let names: Vec<&str> = m.entry_views().iter().map(|e| e.name).collect();
    assert_eq!(names, ["forward", "train_step"]);
    assert_eq!(m.state.len(), 13);
    assert_eq!((m.state[0].name.as_str(), m.state[0].offset), ("fc1.weight", 0));
    let kiln_runtime::Target::Cuda(target) = &m.target else { panic!("a CUDA manifest: {:?}", m.target) };
    if ptxas("the CUDA training artifact through ptxas").is_some() {
        assert_eq!(target.cubins.len(), m.modules.len());
        assert!(cuda.join(kiln_runtime::CUBIN_FILE).is_file());
    }
    let c = cuda.to_str().unwrap();
    let (code, stdout, stderr) = kiln_cli(&["run", c, "--entry", "train_step", "--repeats", "2"]);
    match kiln_runtime::devices().cuda_unavailable {
        Some(reason) => {
            assert_eq!(code, Some(1), "{stdout}{stderr}");
            assert!(stderr.contains(&format!("CUDA is not available: {reason}")), "{stderr}");
        }
        None => {
            assert_eq!(code, Some(0), "{stderr}");
            assert!(stdout.contains("\noptim.lr: f32[] [0.100000]"), "{stdout}");
        }
    }

    let lstm = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/lstm.ron");
    let out = dir.path().join("x.kiln");
    let cases: [(Vec<&str>, i32, String); 3] = [
        (
            vec!["compile", lstm.to_str().unwrap(), "--train", "-o", out.to_str().unwrap()],
            1,
            format!("`kiln compile --train` builds a train step from the spec's training section, and {} has none", lstm.display()),
        ),
        (vec!["run", spec.to_str().unwrap(), "--entry", "train_step"], 2, "--entry train_step runs an entry point of an artifact".into()),
        (vec!["run", a, "--entry", "nope"], 1, "the model has no entry point \"nope\" (it has forward, train_step)".into()),
    ];
    for (args, want, message) in cases {
        let (code, _, stderr) = kiln_cli(&args);
        assert_eq!(code, Some(want), "{args:?}: {stderr}");
        assert!(stderr.contains(&message), "{args:?}: {stderr}");
    }
}

// ------------------------------------------------------------------------------ `kiln train`

/// The small MLP the `kiln train` tests train: 4 features, 3 classes, batches of 8.
const TRAIN_MLP: [&str; 10] =
    ["--set", "batch=8", "--set", "in=4", "--set", "hidden1=8", "--set", "hidden2=8", "--set", "classes=3"];

/// `n` examples for [`TRAIN_MLP`]: seeded features in [-1, 1) and as label the index of the
/// largest of the first three, so there is something to learn.
fn train_data(n: usize, image: DType) -> Vec<(String, Tensor)> {
    let x: Vec<f64> = (0..n as u64 * 4).map(|i| 2.0 * kiln_ir::rng::uniform(11, 0, i) - 1.0).collect();
    let y: Vec<i64> =
        x.chunks(4).map(|r| (0..3).fold(0, |m, i| if r[i] > r[m] { i } else { m }) as i64).collect();
    let x = Tensor::from_f64(vec![n, 4], x).unwrap().cast(image);
    vec![("image".into(), x), ("label".into(), Tensor::new(vec![n], kiln_ir::Buffer::I64(y)).unwrap())]
}

fn write_data(dir: &Path, name: &str, tensors: &[(String, Tensor)]) -> String {
    let path = dir.join(name);
    kiln_ir::tensor_io::write_safetensors(&path, tensors).unwrap();
    path.to_str().unwrap().to_string()
}

fn train(extra: &[&str]) -> std::process::Output {
    let mut args = vec!["train", "models/mlp.ron"];
    args.extend(TRAIN_MLP);
    args.extend(extra);
    kiln(&args)
}

/// `epoch N/M: …` lines of a run's stdout.
fn epoch_lines(out: &std::process::Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("epoch "))
        .map(str::to_string)
        .collect()
}

#[test]
fn kiln_train_learns_the_digits_to_95_percent_in_seconds() {
    let cache = match std::env::var_os("KILN_CACHE").filter(|v| !v.is_empty()) {
        Some(c) => std::path::PathBuf::from(c),
        None => std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln"),
    };
    let data = cache.join("digits/digits.safetensors");
    if !data.is_file() {
        eprintln!("skipped: kiln_train_learns_the_digits_to_95_percent_in_seconds: no {} (scripts/fetch_digits.sh writes it)", data.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().to_str().unwrap();
    let start = std::time::Instant::now();
    let out = kiln(&[
        "train",
        "models/mlp.ron",
        "--set",
        "batch=32",
        "--set",
        "in=64",
        "--set",
        "hidden1=128",
        "--set",
        "hidden2=64",
        "--data",
        data.to_str().unwrap(),
        "--holdout",
        "0.2",
        "--epochs",
        "20",
        "--seed",
        "7",
        "--out",
        out_dir,
    ]);
    let seconds = start.elapsed().as_secs_f64();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("note: 1438 training examples make 44 batches of 32 an epoch; the last 30 of each epoch's order are left out"),
        "{stderr}"
    );
    let lines = epoch_lines(&out);
    assert_eq!(lines.len(), 20, "{lines:?}");
    let accuracy: f64 = lines[19]
        .split("eval accuracy ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {}", lines[19]));
    eprintln!("kiln train: digits at {accuracy} % held-out accuracy in {seconds:.1} s");
    assert!(accuracy >= 95.0, "{}", lines.join("\n"));
    let csv = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().next(), Some("epoch,step,train_loss,eval_loss,eval_accuracy,lr,seconds"));
    assert_eq!(csv.lines().count(), 21);
    assert!(csv.lines().nth(20).unwrap().starts_with("20,880,"), "{csv}");
    let png = std::fs::read(dir.path().join("metrics.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let ckpt = kiln_ir::tensor_io::read_safetensors(dir.path().join("checkpoint.safetensors")).unwrap();
    let names: Vec<&str> = ckpt.iter().map(|(n, _)| n.as_str()).collect();
    for name in ["fc1.weight", "fc3.bias", "optim.m.fc1.weight", "optim.v.fc3.bias", "optim.step"] {
        assert!(names.contains(&name), "{name} in {names:?}");
    }
    let step = ckpt.iter().find(|(n, _)| n == "optim.step").unwrap().1.to_f64_vec();
    assert_eq!(step, [880.0]);
}

#[test]
fn kiln_train_resumes_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), "data.safetensors", &train_data(200, DType::F32));
    let (straight, split) = (dir.path().join("straight"), dir.path().join("split"));
    let common = ["--data", &data, "--holdout", "0.2", "--seed", "5"];
    let run = |epochs: &str, out: &Path, resume: Option<&Path>| {
        let mut args: Vec<&str> = common.to_vec();
        args.extend(["--epochs", epochs, "--out", out.to_str().unwrap()]);
        if let Some(r) = resume {
            args.extend(["--resume", r.to_str().unwrap()]);
        }
        let out = train(&args);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let two = run("2", &straight, None);
    run("1", &split, None);
    let first = dir.path().join("after-1.safetensors");
    std::fs::copy(split.join("checkpoint.safetensors"), &first).unwrap();
    let resumed = run("2", &split, Some(&first));
    assert!(String::from_utf8_lossy(&resumed.stderr).contains("resuming at epoch 2, batch 0 of 20"));
    assert_eq!(
        std::fs::read(straight.join("checkpoint.safetensors")).unwrap(),
        std::fs::read(split.join("checkpoint.safetensors")).unwrap(),
        "2 epochs straight and 1 + 1 resumed write the same checkpoint"
    );
    assert_eq!(epoch_lines(&two)[1].split(", lr").next(), epoch_lines(&resumed)[0].split(", lr").next());
    // The resumed run's metrics continue the first run's.
    let csv = std::fs::read_to_string(split.join("metrics.csv")).unwrap();
    let epochs: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(epochs, ["1", "2"]);

    // A resumed run keeps its seed, and trains only what is left.
    let usage =
        train(&["--data", &data, "--holdout", "0.2", "--seed", "6", "--resume", first.to_str().unwrap()]);
    assert_eq!(usage.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&usage.stderr),
        "error: --seed 6 differs from the checkpoint's seed 5: a resumed run keeps its seed\n"
    );
    let done =
        train(&["--data", &data, "--holdout", "0.2", "--epochs", "1", "--resume", first.to_str().unwrap()]);
    assert!(done.status.success());
    assert_eq!(
        String::from_utf8_lossy(&done.stdout),
        "nothing to do: the checkpoint has 1 epochs, --epochs is 1\n"
    );
    // Another data set (here another split) is refused.
    let other =
        train(&["--data", &data, "--holdout", "0.5", "--epochs", "2", "--resume", first.to_str().unwrap()]);
    assert_eq!(other.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&other.stderr).contains("is a checkpoint of model `mlp` on 160 training examples; this run is `mlp` on 100: resume with the same model and data"));
}

/// Ctrl-C (SIGINT) finishes the step, saves a checkpoint mid-epoch and exits with 130; resuming
/// it to the epoch it stopped in gives the checkpoint an uninterrupted run would have written.
#[test]
fn kiln_train_saves_a_checkpoint_on_ctrl_c_and_resumes_from_it() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), "data.safetensors", &train_data(4000, DType::F32));
    let out_dir = dir.path().join("run");
    let mut args: Vec<&str> = vec!["train", "models/mlp.ron"];
    args.extend(TRAIN_MLP);
    args.extend(["--data", &data, "--epochs", "1000", "--out", out_dir.to_str().unwrap()]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.starts_with("epoch 1/1000") {
        line.clear();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "kiln train ended before its first epoch");
    }
    // SAFETY: signalling the child this test started, by its id.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(130), "{stderr}");
    let saved =
        stderr.lines().find(|l| l.starts_with("interrupted at epoch ")).unwrap_or_else(|| panic!("{stderr}"));
    let ckpt = out_dir.join("checkpoint.safetensors");
    assert!(
        saved.ends_with(&format!("saved {} (continue with --resume {})", ckpt.display(), ckpt.display())),
        "{saved}"
    );
    let epoch: usize = saved["interrupted at epoch ".len()..].split(',').next().unwrap().parse().unwrap();
    let kept = dir.path().join("interrupted.safetensors");
    std::fs::copy(&ckpt, &kept).unwrap();

    let finish = |epochs: &str, out: &Path, resume: Option<&Path>| {
        let mut a: Vec<&str> = vec!["--data", &data, "--epochs", epochs, "--out", out.to_str().unwrap()];
        if let Some(r) = resume {
            a.extend(["--resume", r.to_str().unwrap()]);
        }
        let o = train(&a);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let e = epoch.to_string();
    finish(&e, &out_dir, Some(&kept));
    let straight = dir.path().join("straight");
    finish(&e, &straight, None);
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        std::fs::read(straight.join("checkpoint.safetensors")).unwrap(),
        "interrupted in epoch {epoch} and resumed = {epoch} epochs straight"
    );
}

#[test]
fn kiln_train_refuses_bad_usage_and_bad_data_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_data(dir.path(), "good.safetensors", &train_data(50, DType::F32));
    let err = |out: &std::process::Output| String::from_utf8_lossy(&out.stderr).into_owned();

    let no_training = kiln(&["train", "models/lstm.ron", "--data", &good]);
    assert_eq!(no_training.status.code(), Some(1));
    assert_eq!(
        err(&no_training),
        "error: models/lstm.ron has no training section: `kiln train` needs one (docs/spec-language.md, section 7)\n"
    );

    let mut only_images = train_data(50, DType::F32);
    only_images.truncate(1);
    let path = write_data(dir.path(), "images.safetensors", &only_images);
    let out = train(&["--data", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        err(&out),
        format!("error: {path} has no tensor `label` for the model's input `label` (it holds: image)\n")
    );

    let path = write_data(dir.path(), "f64.safetensors", &train_data(50, DType::F64));
    let out = train(&["--data", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        err(&out),
        format!("error: tensor `image` of {path} is f64[50, 4]: the model's input `image` takes f32[4] per example, so the tensor must be f32[examples, 4]\n")
    );

    let mut short = train_data(50, DType::F32);
    short[1].1 = Tensor::new(vec![49], kiln_ir::Buffer::I64(vec![0; 49])).unwrap();
    let path = write_data(dir.path(), "short.safetensors", &short);
    let out = train(&["--data", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        err(&out),
        format!("error: tensor `label` of {path} has 49 examples but `image` has 50: every input needs one entry per example\n")
    );

    let mut wild = train_data(50, DType::F32);
    wild[1].1 = Tensor::new(vec![50], kiln_ir::Buffer::I64((0..50).collect())).unwrap();
    let path = write_data(dir.path(), "wild.safetensors", &wild);
    let out = train(&["--data", &path]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        err(&out),
        format!("error: tensor `label` of {path} holds 3 at element 3: its values must be in 0..3 (or -100, left out of the loss)\n")
    );

    let none_held = train(&["--data", &good, "--holdout", "0.001"]);
    assert_eq!(none_held.status.code(), Some(1));
    assert_eq!(
        err(&none_held),
        "error: the held-out set is empty: hold out a larger fraction (--holdout) or give --eval-data with examples\n"
    );

    let few = write_data(dir.path(), "few.safetensors", &train_data(5, DType::F32));
    let out = train(&["--data", &few]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        err(&out),
        "error: 5 training examples are fewer than one batch of 8: give more data or a smaller batch (`--set batch=…`)\n"
    );

    for (flags, message) in [
        (
            &["--holdout", "1.5"][..],
            "error: --holdout 1.5: the held-out fraction must be above 0 and below 1\n",
        ),
        (&["--lr", "0"][..], "error: --lr 0: the learning rate must be a positive number\n"),
        (&["--epochs", "0"][..], "error: --epochs 0: train at least one epoch\n"),
        (
            &["--device", "tpu"][..],
            "error: --device tpu: `kiln train` runs on `cpu`, `vulkan[:N]` or `cuda[:N]`\n",
        ),
    ] {
        let mut a = vec!["--data", good.as_str()];
        a.extend(flags);
        let out = train(&a);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert_eq!(err(&out), message, "{flags:?}");
    }
    // CUDA trains the same artifact, compiled for it: without a CUDA device its load says why.
    if let Some(reason) = kiln_runtime::devices().cuda_unavailable {
        let out = train(&["--data", &good, "--epochs", "1", "--device", "cuda"]);
        assert_eq!(out.status.code(), Some(1));
        let e = err(&out);
        assert!(e.ends_with(&format!("\nerror: CUDA is not available: {reason}\n")), "{e}");
    }
    let both = train(&["--data", &good, "--holdout", "0.2", "--eval-data", &good]);
    assert_eq!(both.status.code(), Some(2));
    assert!(
        err(&both).contains("'--holdout <FRACTION>' cannot be used with '--eval-data <FILE|DIR>'"),
        "{}",
        err(&both)
    );

    // A folder of NAME.npy files is data too; --eval-data evaluates on its own set.
    let npy = dir.path().join("npy");
    std::fs::create_dir(&npy).unwrap();
    for (name, t) in train_data(48, DType::F32) {
        kiln_ir::tensor_io::write_npy(npy.join(format!("{name}.npy")), &t).unwrap();
    }
    let out = train(&["--data", npy.to_str().unwrap(), "--eval-data", &good, "--lr", "0.01"]);
    assert!(out.status.success(), "{}", err(&out));
    let lines = epoch_lines(&out);
    assert_eq!(lines.len(), 1);
    assert!(
        lines[0].starts_with("epoch 1/1: train loss ") && lines[0].contains(", eval accuracy "),
        "{lines:?}"
    );
    // --lr 0.01 under the MLP's linear warm-up over 100 steps: the epoch's last step (step 5,
    // counting from 0) runs at 5/100 of it.
    assert!(lines[0].contains(", lr 5.000e-4,"), "{lines:?}");
}

/// GPT-2 at two small layers learns the text shipped in `examples/tiny_gpt/` byte by byte:
/// its held-out loss falls from epoch to epoch, below the uniform guess (ln 256).
#[test]
fn a_small_gpt_learns_the_shipped_text() {
    let text =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tiny_gpt/kiln.txt")).unwrap();
    let (seq, stride) = (32, 8);
    let starts: Vec<usize> = (0..text.len() - seq).step_by(stride).collect();
    let window = |offset: usize| -> Tensor {
        let v: Vec<i64> = starts
            .iter()
            .flat_map(|&s| text[s + offset..s + offset + seq].iter().map(|&b| b as i64))
            .collect();
        Tensor::new(vec![starts.len(), seq], kiln_ir::Buffer::I64(v)).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(
        dir.path(),
        "text.safetensors",
        &[("input_ids".into(), window(0)), ("labels".into(), window(1))],
    );
    let out = kiln(&[
        "train",
        "models/gpt2.ron",
        "--set",
        "vocab=256",
        "--set",
        "ctx=32",
        "--set",
        "d=64",
        "--set",
        "heads=4",
        "--set",
        "layers=2",
        "--set",
        "seq=32",
        "--set",
        "batch=16",
        "--data",
        &data,
        "--holdout",
        "0.1",
        "--lr",
        "3e-3",
        "--epochs",
        "3",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = epoch_lines(&out);
    let eval: Vec<f64> = lines
        .iter()
        .map(|l| {
            l.split("eval loss ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .and_then(|s| s.parse().ok())
                .unwrap()
        })
        .collect();
    eprintln!("tiny GPT held-out loss by epoch: {eval:?}");
    assert_eq!(eval.len(), 3, "{lines:?}");
    assert!(eval[0] < 256f64.ln() && eval[1] < eval[0] && eval[2] < eval[1], "{lines:?}");
}

/// The loss, held-out loss and accuracy of an `epoch …` line (without the rate and speed).
fn epoch_numbers(line: &str) -> &str {
    line.split(", lr").next().unwrap_or(line)
}

/// `accumulate: 2` at batch 8 takes 16 examples a step and trains as batch 16 does (the mean
/// of two micro-batches' gradients is the larger batch's).
#[test]
fn kiln_train_accumulates_micro_batches_like_one_larger_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), "data.safetensors", &train_data(210, DType::F32));
    let spec = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/mlp.ron")).unwrap();
    let accumulating = spec.replace("        schedule:", "        accumulate: 2,\n        schedule:");
    assert_ne!(accumulating, spec);
    let model = dir.path().join("mlp_accumulate.ron");
    std::fs::write(&model, accumulating).unwrap();
    let run = |model: &str, batch: &str| {
        let out = kiln(&[
            "train",
            model,
            "--set",
            batch,
            "--set",
            "in=4",
            "--set",
            "hidden1=8",
            "--set",
            "hidden2=8",
            "--set",
            "classes=3",
            "--data",
            &data,
            "--holdout",
            "0.2",
            "--epochs",
            "2",
            "--lr",
            "0.01",
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (epoch_lines(&out), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (large, _) = run("models/mlp.ron", "batch=16");
    let (micro, note) = run(model.to_str().unwrap(), "batch=8");
    assert!(note.contains("note: 168 training examples make 10 batches of 16 an epoch; the last 8 of each epoch's order are left out"), "{note}");
    assert_eq!(large.len(), 2);
    for (a, b) in large.iter().zip(&micro) {
        assert_eq!(epoch_numbers(a), epoch_numbers(b));
    }
}

/// `--device vulkan` compiles the train step and the forward pass for Vulkan and trains as
/// the CPU does.
#[test]
fn kiln_train_runs_on_vulkan_like_on_the_cpu() {
    if !available(Device::Vulkan, "kiln train on Vulkan") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = write_data(dir.path(), "data.safetensors", &train_data(200, DType::F32));
    let cpu = train(&["--data", &data, "--holdout", "0.2", "--epochs", "2", "--lr", "0.01"]);
    let gpu =
        train(&["--data", &data, "--holdout", "0.2", "--epochs", "2", "--lr", "0.01", "--device", "vulkan"]);
    assert!(gpu.status.success(), "{}", String::from_utf8_lossy(&gpu.stderr));
    let (cpu, gpu) = (epoch_lines(&cpu), epoch_lines(&gpu));
    assert_eq!(cpu.len(), 2);
    for (a, b) in cpu.iter().zip(&gpu) {
        assert_eq!(epoch_numbers(a), epoch_numbers(b));
    }
}
