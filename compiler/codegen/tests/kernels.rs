//! Generated kernels compile, link, load and compute the right numbers.
//!
//! One test binary for all kernel tests: MLIR and LLVM link statically (~200 MB per binary).

use kiln_codegen::{mlir_text::Body, CpuTarget, Kernel, KernelLibrary};

/// `out[i] = f(x[i])` over 1-D f32 buffers of `n` elements, vectorized by `lanes`, one
/// iteration of the range per vector.
fn unary_kernel(symbol: &str, n: usize, lanes: usize, f: impl Fn(&mut Body, &str, &str) -> String) -> Kernel {
    let ty = format!("vector<{lanes}xf32>");
    let mem = format!("memref<{n}xf32>");
    let mut b = Body::new();
    let one = b.index(1);
    let step = b.index(lanes);
    b.open(format!("scf.for %i = %begin to %end step {one}"));
    let off = b.assign(format!("arith.muli %i, {step} : index"));
    let x = b.assign(format!("vector.load %x[{off}] : {mem}, {ty}"));
    let y = f(&mut b, &x, &ty);
    b.line(format!("vector.store {y}, %y[{off}] : {mem}, {ty}"));
    b.close("");
    b.line("return");
    let mlir = format!(
        "func.func @{symbol}(%x: {mem}, %y: {mem}, %begin: index, %end: index) {{\n{}}}\n",
        b.finish()
    );
    Kernel { symbol: symbol.into(), mlir, range: n / lanes, grain: 1, flops: n as u64, bytes: 8 * n as u64 }
}

fn run_unary(lib: &KernelLibrary, symbol: &str, x: &[f32]) -> Vec<f32> {
    let mut x = x.to_vec();
    let mut y = vec![0f32; x.len()];
    let bufs = [x.as_mut_ptr().cast::<u8>(), y.as_mut_ptr().cast::<u8>()];
    unsafe { lib.call(symbol, &bufs, 0, x.len() / 8).unwrap() };
    y
}

#[test]
fn math_approximations_match_libm() {
    let n = 4096;
    let kernels = vec![
        unary_kernel("k_exp", n, 8, |b, x, ty| b.exp(x, ty)),
        unary_kernel("k_exp2n", n, 8, |b, x, ty| b.exp2_nonpositive(x, ty)),
        unary_kernel("k_exp2n8", 8, 8, |b, x, ty| b.exp2_nonpositive(x, ty)),
        unary_kernel("k_erf", n, 8, |b, x, ty| b.erf(x, ty)),
        unary_kernel("k_tanh", n, 8, |b, x, ty| b.tanh(x, ty)),
        unary_kernel("k_sigmoid", n, 8, |b, x, ty| b.sigmoid(x, ty)),
        unary_kernel("k_gelu", n, 8, |b, x, ty| b.gelu(x, false, ty)),
        unary_kernel("k_erf8", 8, 8, |b, x, ty| b.erf(x, ty)),
        unary_kernel("k_gelu8", 8, 8, |b, x, ty| b.gelu(x, false, ty)),
    ];
    let lib = KernelLibrary::build(&kernels, &CpuTarget::host()).unwrap();
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.02).collect();
    let exp = run_unary(&lib, "k_exp", &x);
    for (a, g) in x.iter().zip(&exp) {
        let want = (*a as f64).exp();
        assert!(((*g as f64) - want).abs() <= 3e-7 * want, "exp({a}) = {g}, want {want}");
    }
    // 2ˣ for x ≤ 0 (softmax in log₂ units): [−130, 0] densely, past the last normal power.
    let xn: Vec<f32> = (0..n).map(|i| -130.0 * i as f32 / (n - 1) as f32).collect();
    let exp2 = run_unary(&lib, "k_exp2n", &xn);
    for (a, g) in xn.iter().zip(&exp2) {
        let want = (*a as f64).exp2();
        if *a >= -126.0 {
            assert!(((*g as f64) - want).abs() <= 2e-7 * want, "exp2({a}) = {g}, want {want}");
        } else if *a < -127.0 {
            assert_eq!(*g, 0.0, "exp2({a})");
        }
    }
    // The row maximum's own p is exactly 1; hidden scores (−inf) and far-out ones are exactly 0.
    let edge2 = [0.0, -0.0, f32::NEG_INFINITY, -1e30, f32::NAN, -0.5, -1.0, -126.0];
    let exp2 = run_unary(&lib, "k_exp2n8", &edge2);
    assert_eq!(&exp2[..4], &[1.0, 1.0, 0.0, 0.0]);
    assert!(exp2[4].is_nan(), "exp2(NaN) = {}", exp2[4]);
    assert_eq!(exp2[6], 0.5);
    assert_eq!(exp2[7], 2f32.powi(-126));
    assert!((exp2[5] as f64 - (-0.5f64).exp2()).abs() <= 1.2e-7, "exp2(-0.5) = {}", exp2[5]);
    let erf = run_unary(&lib, "k_erf", &x);
    for (a, g) in x.iter().zip(&erf) {
        let want = libm::erf(*a as f64);
        assert!(((*g as f64) - want).abs() <= 3e-7, "erf({a}) = {g}, want {want}");
    }
    let tanh = run_unary(&lib, "k_tanh", &x);
    for (a, g) in x.iter().zip(&tanh) {
        let want = (*a as f64).tanh();
        assert!(((*g as f64) - want).abs() <= 3e-7, "tanh({a}) = {g}, want {want}");
    }
    let sig = run_unary(&lib, "k_sigmoid", &x);
    for (a, g) in x.iter().zip(&sig) {
        let want = 1.0 / (1.0 + (-*a as f64).exp());
        assert!(((*g as f64) - want).abs() <= 3e-7, "sigmoid({a}) = {g}, want {want}");
    }
    let gelu = run_unary(&lib, "k_gelu", &x);
    for (a, g) in x.iter().zip(&gelu) {
        let a = *a as f64;
        let want = 0.5 * a * (1.0 + libm::erf(a / std::f64::consts::SQRT_2));
        assert!(((*g as f64) - want).abs() <= 1e-6 * a.abs().max(1.0), "gelu({a}) = {g}, want {want}");
    }
    // Far out the erf saturates exactly, so GELU of a very negative x is exactly 0; NaN stays NaN.
    let edge = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e4, 1e4, -0.0, 3.9, -3.9];
    let erf = run_unary(&lib, "k_erf8", &edge);
    assert!(erf[0].is_nan(), "erf(NaN) = {}", erf[0]);
    assert_eq!(&erf[1..6], &[1.0, -1.0, -1.0, 1.0, 0.0]);
    let gelu = run_unary(&lib, "k_gelu8", &edge);
    assert!(gelu[0].is_nan(), "gelu(NaN) = {}", gelu[0]);
    assert_eq!(&gelu[3..6], &[0.0, 1e4, 0.0], "gelu(-1e4), gelu(1e4), gelu(-0)");
}

// ---- Symbolic sizes: one artifact for every binding within bounds ----

mod symbolic {
    use kiln_ir::{BinaryOp, DType, Dim, Graph, NodeId, Op, SizeExpr, SymbolDecl, Tensor, UnaryOp};
    use kiln_runtime::{Model, TensorRef};

    /// `batch` in 1..=3 (hint 2) and `seq` in 1..=20 (hint 8): the bindings below include both
    /// minima, the hints, the maxima and sizes that are no multiple of any tile.
    fn graph(name: &str) -> (Graph, Dim, Dim) {
        let mut g = Graph::new(name);
        g.symbols = vec![
            SymbolDecl { name: "batch".into(), min: 1, max: 3, hint: 2, multiple_of: 1 },
            SymbolDecl { name: "seq".into(), min: 1, max: 20, hint: 8, multiple_of: 1 },
        ];
        (g, Dim::Sym(SizeExpr::symbol(0, "batch")), Dim::Sym(SizeExpr::symbol(1, "seq")))
    }

    const BINDINGS: [[i64; 2]; 5] = [[1, 1], [2, 8], [3, 20], [2, 7], [3, 13]];

    fn input(g: &mut Graph, name: &str, dtype: DType, shape: Vec<Dim>) -> NodeId {
        g.add(Op::Input { name: name.into(), dtype, shape }, &[]).unwrap()
    }

    fn param(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
        let init = kiln_ir::Init::Normal { mean: 0.0, std: 1.0 };
        g.add(Op::Param { name: name.into(), dtype: DType::F32, shape: kiln_ir::dims(shape), init }, &[])
            .unwrap()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-symbolic-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// Compiles `g` once (symbolic) for the CPU and for Vulkan, then at every binding runs each
    /// artifact (Vulkan where a device exists) and the interpreter on the same inputs and
    /// compares every output. The CUDA artifact is built too (PTX, no device needed).
    fn compiled_matches_interpreter(g: &Graph, tol: f64) {
        kiln_ir::verify(g).unwrap();
        let params = kiln_ir::bind_params(g, None, 7, false).unwrap();
        let s = kiln_sched::schedule(g).expect("a symbolic graph schedules");
        assert_eq!(s.symbols.len(), 2);
        let dir = temp_dir(&g.name);
        let built =
            kiln_codegen::build_artifact(&g.name, &s, &params, &kiln_codegen::CpuTarget::host(), &dir)
                .unwrap_or_else(|e| panic!("{}: {e}", g.name));
        assert_eq!(built.manifest.symbols.len(), 2, "the manifest records the symbols");
        runs_like_interpreter(g, &params, &dir, tol, &BINDINGS);
        let _ = std::fs::remove_dir_all(&dir);

        let caps = kiln_codegen::gpu::GpuCaps::vulkan();
        let s = kiln_sched::schedule_aligned(g, caps.buffer_align).expect("schedules");
        let vdir = temp_dir(&format!("{}-vulkan", g.name));
        let built = kiln_codegen::build_vulkan_artifact(&g.name, &s, &params, &caps, &vdir)
            .unwrap_or_else(|e| panic!("{} for Vulkan: {e}", g.name));
        assert_eq!(built.manifest.symbols.len(), 2, "the Vulkan manifest records the symbols");
        if kiln_runtime::devices().devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(_))) {
            runs_like_interpreter(g, &params, &vdir, tol, &BINDINGS);
        } else {
            eprintln!("skipped: {} on Vulkan: no Vulkan device", g.name);
        }
        let _ = std::fs::remove_dir_all(&vdir);

        let target = kiln_codegen::gpu::NvvmTarget::by_arch("sm_90").expect("sm_90");
        let caps = kiln_codegen::gpu::GpuCaps::cuda(target);
        let s = kiln_sched::schedule_aligned(g, caps.buffer_align).expect("schedules");
        let cdir = temp_dir(&format!("{}-cuda", g.name));
        let built = kiln_codegen::build_cuda_artifact(&g.name, &s, &params, &caps, None, &cdir)
            .unwrap_or_else(|e| panic!("{} for CUDA: {e}", g.name));
        assert_eq!(built.manifest.symbols.len(), 2, "the CUDA manifest records the symbols");
        let _ = std::fs::remove_dir_all(&cdir);
    }

    /// Runs the artifact in `dir` at each of `bindings` and compares it with the interpreter.
    fn runs_like_interpreter(
        g: &Graph,
        params: &std::collections::HashMap<String, Tensor>,
        dir: &std::path::Path,
        tol: f64,
        bindings: &[[i64; 2]],
    ) {
        let mut model = Model::load(dir).unwrap_or_else(|e| panic!("{}: {e}", g.name));
        for &values in bindings {
            let at = g.specialize(&values).expect("specializes");
            let inputs = kiln_ir::seeded_inputs(&at, 11 + values[1] as u64);
            let want =
                kiln_ir::eval(g, &kiln_ir::Bindings { inputs: inputs.clone(), params: params.clone() })
                    .unwrap_or_else(|e| panic!("{} at {values:?}: {e}", g.name));
            let owned: Vec<(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)> = model
                .inputs()
                .iter()
                .map(|spec| {
                    let t: &Tensor = &inputs[&spec.name];
                    let shape = t.shape.iter().map(|&d| d as u64).collect();
                    (spec.name.clone(), spec.dtype, shape, t.data.to_le_bytes())
                })
                .collect();
            let refs: Vec<TensorRef> = owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
            let got = model.run(&refs).unwrap_or_else(|e| panic!("{} at {values:?}: {e}", g.name));
            assert_eq!(got.len(), want.len());
            for ((name, w), t) in want.iter().zip(&got) {
                let wv = w.to_f64_vec();
                let shape: Vec<u64> = w.shape.iter().map(|&d| d as u64).collect();
                assert_eq!(t.shape(), shape.as_slice(), "{} at {values:?}: `{name}` shape", g.name);
                let gv: Vec<f64> = t.as_f32().expect("f32 outputs").iter().map(|&x| x as f64).collect();
                assert_eq!(wv.len(), gv.len());
                for (i, (a, b)) in wv.iter().zip(&gv).enumerate() {
                    assert!(
                        (a - b).abs() <= tol * (1.0 + a.abs()),
                        "{} at {values:?}: `{name}`[{i}]: interpreter {a}, compiled {b}",
                        g.name
                    );
                }
            }
        }
    }

    /// A fused chain over `[batch, seq, 8]` with an operand broadcast over the batch (the row
    /// index splits at run time), and a transposed copy as a second output (a layout copy
    /// whose strides are sizes over the symbols).
    #[test]
    fn an_elementwise_chain_and_a_layout_copy_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_elementwise");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(8)]);
        let y = input(&mut g, "y", DType::F32, vec![s.clone(), Dim::Const(8)]);
        let m = g.add(Op::Binary(BinaryOp::Mul), &[x, y]).unwrap();
        let one = g
            .add(
                Op::Full { value: 1.0, dtype: DType::F32, shape: vec![b.clone(), s.clone(), Dim::Const(8)] },
                &[],
            )
            .unwrap();
        let a = g.add(Op::Binary(BinaryOp::Add), &[m, one]).unwrap();
        let t = g.add(Op::Unary(UnaryOp::Tanh), &[a]).unwrap();
        g.add_output("y", t);
        let tr = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[t]).unwrap();
        g.add_output("t", tr);
        // One contiguous run of up to 3·20·300 elements, cut into chunks of 4096 at run time
        // (2·7·300 = 4200 is a chunk and a tail).
        let w = input(&mut g, "w", DType::F32, vec![b.clone(), s.clone(), Dim::Const(300)]);
        let w2 = g.add(Op::Binary(BinaryOp::Mul), &[w, w]).unwrap();
        let e = g.add(Op::Unary(UnaryOp::Exp), &[w2]).unwrap();
        g.add_output("e", e);
        compiled_matches_interpreter(&g, 1e-5);
    }

    /// Softmax and norms over a static last axis, with a run-time row count: rows the static
    /// emitters walk, and rows split at run time (an operand broadcast over the batch, a
    /// transposed one).
    #[test]
    fn softmax_and_layer_norm_rows_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_rows");
        let s2 = s.clone();
        let x = input(&mut g, "x", DType::F32, vec![b, s, Dim::Const(16)]);
        let sm = g.add(Op::Softmax { axis: 2 }, &[x]).unwrap();
        g.add_output("softmax", sm);
        let gamma = param(&mut g, "gamma", &[16]);
        let beta = param(&mut g, "beta", &[16]);
        let ln = g.add(Op::LayerNorm { eps: 1e-5, affine: true }, &[x, gamma, beta]).unwrap();
        g.add_output("norm", ln);
        // A second operand broadcast over the batch: its rows split at run time.
        let p = input(&mut g, "p", DType::F32, vec![s2.clone(), Dim::Const(16)]);
        let kind = kiln_ir::NormKind::Layer;
        let an = g.add(Op::AddNorm { eps: 1e-5, kind, affine: true }, &[x, p, gamma, beta]).unwrap();
        g.add_output("add_norm", an);
        let rms = kiln_ir::NormKind::Rms;
        let rn = g.add(Op::AddNorm { eps: 1e-6, kind: rms, affine: true }, &[x, p, gamma]).unwrap();
        g.add_output("add_rms_norm", rn);
        // A transposed operand: rows that do not chain.
        let t = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[x]).unwrap();
        let tn = g.add(Op::RmsNorm { eps: 1e-6, affine: false }, &[t]).unwrap();
        g.add_output("transposed_norm", tn);
        compiled_matches_interpreter(&g, 1e-5);
    }

    /// An embedding lookup of `i64[batch, seq]` ids plus the first `seq` rows of a position
    /// table (a slice whose end is a symbol), scaled by a mask broadcast along the features.
    #[test]
    fn an_embedding_lookup_compiles_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_embed");
        let ids = input(&mut g, "input_ids", DType::I64, vec![b.clone(), s.clone()]);
        let mask = input(&mut g, "mask", DType::F32, vec![b.clone(), s.clone()]);
        let table = param(&mut g, "wte", &[10, 8]);
        let pos = param(&mut g, "wpe", &[20, 8]);
        let x = g.add(Op::Gather { axis: 0 }, &[table, ids]).unwrap();
        let p = g.add(Op::Slice { axis: 0, start: Dim::Const(0), end: s.clone(), step: 1 }, &[pos]).unwrap();
        let x = g.add(Op::Binary(BinaryOp::Add), &[x, p]).unwrap();
        let m = g.add(Op::Reshape { shape: vec![b, s, Dim::Const(1)] }, &[mask]).unwrap();
        let x = g.add(Op::Binary(BinaryOp::Mul), &[x, m]).unwrap();
        g.add_output("x", x);
        compiled_matches_interpreter(&g, 1e-6);
    }

    /// Matrix products with a run-time row count and a static B: plain, with a bias and an
    /// activation fused, over several K blocks, and with B an input.
    #[test]
    fn matmuls_over_run_time_rows_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_matmul");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(8)]);
        let w = param(&mut g, "w", &[8, 12]);
        let y = g.add(Op::MatMul, &[x, w]).unwrap();
        g.add_output("y", y);
        let bias = param(&mut g, "bias", &[12]);
        let act = kiln_ir::Activation::Gelu(kiln_ir::GeluApprox::Erf);
        let z = g.add(Op::MatMulEpilogue { bias: true, activation: act }, &[x, w, bias]).unwrap();
        g.add_output("z", z);
        // A transposed weight (PyTorch's `Linear` layout) over K = 37: dot products over
        // contiguous runs, two vectors of 16 and a tail of 5, with a bias and an activation.
        let u = input(&mut g, "u", DType::F32, vec![b.clone(), s.clone(), Dim::Const(37)]);
        let wt = param(&mut g, "wt", &[6, 37]);
        let wt = g.add(Op::Transpose { perm: vec![1, 0] }, &[wt]).unwrap();
        let bias6 = param(&mut g, "bias6", &[6]);
        let relu = kiln_ir::Activation::Relu;
        let v = g.add(Op::MatMulEpilogue { bias: true, activation: relu }, &[u, wt, bias6]).unwrap();
        g.add_output("v", v);
        let plain = g.add(Op::MatMul, &[u, wt]).unwrap();
        g.add_output("plain", plain);
        // K = 600 is three K blocks of the tiled product (C reread between them, the last
        // row tile partial at most sizes), N = 20 a partial panel.
        let long = input(&mut g, "long", DType::F32, vec![b.clone(), s.clone(), Dim::Const(600)]);
        let w600 = param(&mut g, "w600", &[600, 20]);
        let bias20 = param(&mut g, "bias20", &[20]);
        let tanh = kiln_ir::Activation::Tanh;
        let deep = g.add(Op::MatMulEpilogue { bias: true, activation: tanh }, &[long, w600, bias20]).unwrap();
        g.add_output("deep", deep);
        // B an input, not a weight: packed per call rather than at compile time.
        let bm = input(&mut g, "bm", DType::F32, vec![Dim::Const(8), Dim::Const(40)]);
        let by_input = g.add(Op::MatMul, &[x, bm]).unwrap();
        g.add_output("by_input", by_input);
        // Rows that do not merge into one run-time axis (`[seq, batch]` over a `[batch, seq]`
        // layout): the row-by-row product.
        let xt = g.add(Op::Transpose { perm: vec![1, 0, 2] }, &[x]).unwrap();
        let crossed = g.add(Op::MatMul, &[xt, w]).unwrap();
        g.add_output("crossed", crossed);
        compiled_matches_interpreter(&g, 1e-4);
    }

    /// Attention over `[batch, 2, seq, 4]` heads with run-time query and key lengths: with an
    /// additive mask over the keys, and causal with its log-sum-exp as a second result; at a
    /// head size of 32; and with a q the flash kernel cannot walk.
    #[test]
    fn attention_over_run_time_lengths_compiles_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_attention");
        let heads = |b: &Dim, s: &Dim| vec![b.clone(), Dim::Const(2), s.clone(), Dim::Const(4)];
        let q = input(&mut g, "q", DType::F32, heads(&b, &s));
        let k = input(&mut g, "k", DType::F32, heads(&b, &s));
        let v = input(&mut g, "v", DType::F32, heads(&b, &s));
        let mask =
            input(&mut g, "mask", DType::F32, vec![b.clone(), Dim::Const(1), Dim::Const(1), s.clone()]);
        let masked =
            g.add(Op::Attention { scale: 0.5, causal: false, masked: true }, &[q, k, v, mask]).unwrap();
        g.add_output("masked", masked);
        let causal = g.add(Op::Attention { scale: 0.5, causal: true, masked: false }, &[q, k, v]).unwrap();
        g.add_output("causal", causal);
        let lse = g.add(Op::AttentionLse { scale: 0.5, causal: true, masked: false }, &[q, k]).unwrap();
        g.add_output("lse", lse);
        // A head size of 32: the dot products and the weighted values in vectors of 16.
        let wide = |b: &Dim, s: &Dim| vec![b.clone(), Dim::Const(2), s.clone(), Dim::Const(32)];
        let (q32, k32, v32) = (
            input(&mut g, "q32", DType::F32, wide(&b, &s)),
            input(&mut g, "k32", DType::F32, wide(&b, &s)),
            input(&mut g, "v32", DType::F32, wide(&b, &s)),
        );
        let wide_masked = g
            .add(Op::Attention { scale: 0.25, causal: false, masked: true }, &[q32, k32, v32, mask])
            .unwrap();
        g.add_output("wide_masked", wide_masked);
        let wide_causal =
            g.add(Op::Attention { scale: 0.25, causal: true, masked: false }, &[q32, k32, v32]).unwrap();
        g.add_output("wide_causal", wide_causal);
        // q with a run-time stride along its last axis (a transposed `[batch, 2, 4, seq]`):
        // one query row per iteration instead of the flash kernel's blocks.
        let qt = input(&mut g, "qt", DType::F32, vec![b.clone(), Dim::Const(2), Dim::Const(4), s.clone()]);
        let qt = g.add(Op::Transpose { perm: vec![0, 1, 3, 2] }, &[qt]).unwrap();
        let strided = g.add(Op::Attention { scale: 0.5, causal: true, masked: false }, &[qt, k, v]).unwrap();
        g.add_output("strided", strided);
        compiled_matches_interpreter(&g, 1e-4);
    }

    /// The CPU's flash attention planned for a hinted length runs a query shorter than one
    /// block of three row vectors as a single block of just its vectors: planned for
    /// 40 rows (blocks of three vectors of 16 on AVX-512) and for 64 (blocks of two), at
    /// lengths of one, two, three and more vectors, masked and causal with its log-sum-exp.
    #[test]
    fn attention_runs_short_queries_in_one_block_of_their_vectors() {
        for hint in [40, 64] {
            let name = format!("dyn_short_attention_{hint}");
            let mut g = Graph::new(&name);
            g.symbols = vec![
                SymbolDecl { name: "batch".into(), min: 1, max: 2, hint: 1, multiple_of: 1 },
                SymbolDecl { name: "seq".into(), min: 1, max: 70, hint, multiple_of: 1 },
            ];
            let (b, s) = (Dim::Sym(SizeExpr::symbol(0, "batch")), Dim::Sym(SizeExpr::symbol(1, "seq")));
            let heads = vec![b.clone(), Dim::Const(3), s.clone(), Dim::Const(32)];
            let q = input(&mut g, "q", DType::F32, heads.clone());
            let k = input(&mut g, "k", DType::F32, heads.clone());
            let v = input(&mut g, "v", DType::F32, heads);
            let mask = input(&mut g, "mask", DType::F32, vec![b, Dim::Const(1), Dim::Const(1), s]);
            let masked =
                g.add(Op::Attention { scale: 0.2, causal: false, masked: true }, &[q, k, v, mask]).unwrap();
            g.add_output("masked", masked);
            let causal =
                g.add(Op::Attention { scale: 0.2, causal: true, masked: false }, &[q, k, v]).unwrap();
            g.add_output("causal", causal);
            let lse = g.add(Op::AttentionLse { scale: 0.2, causal: true, masked: false }, &[q, k]).unwrap();
            g.add_output("lse", lse);
            kiln_ir::verify(&g).unwrap();
            let params = kiln_ir::bind_params(&g, None, 7, false).unwrap();
            let sched = kiln_sched::schedule(&g).expect("schedules");
            let dir = temp_dir(&name);
            kiln_codegen::build_artifact(&name, &sched, &params, &kiln_codegen::CpuTarget::host(), &dir)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let bindings = [[1, 1], [2, 9], [1, 16], [2, 17], [1, 33], [2, 40], [1, 48], [2, 49], [1, 70]];
            runs_like_interpreter(&g, &params, &dir, 1e-4, &bindings);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// `--profile` over run-time sizes: the manifest costs a step at the hints, the profile at
    /// the run's sizes (a row kernel's flops scale with its rows).
    #[test]
    fn profiles_cost_a_step_at_the_runs_sizes() {
        let (mut g, b, s) = graph("dyn_profile");
        let x = input(&mut g, "x", DType::F32, vec![b, s, Dim::Const(16)]);
        let sm = g.add(Op::Softmax { axis: 2 }, &[x]).unwrap();
        g.add_output("softmax", sm);
        let params = kiln_ir::bind_params(&g, None, 7, false).unwrap();
        let sched = kiln_sched::schedule(&g).unwrap();
        let dir = temp_dir(&g.name);
        let built =
            kiln_codegen::build_artifact(&g.name, &sched, &params, &kiln_codegen::CpuTarget::host(), &dir)
                .unwrap();
        let at_hints: u64 = built.manifest.steps.iter().map(|st| st.flops).sum();
        let mut model = Model::load(&dir).unwrap();
        let flops = |model: &mut Model, batch: u64, seq: u64| {
            let x = vec![0.5f32; (batch * seq * 16) as usize];
            let (_, profile) = model.run_profiled(&[TensorRef::f32("x", &[batch, seq, 16], &x)], 1).unwrap();
            profile.steps.iter().map(|st| st.flops).sum::<u64>()
        };
        assert_eq!(flops(&mut model, 2, 8), at_hints, "at the hints (2 × 8)");
        assert_eq!(flops(&mut model, 3, 20) * 16, at_hints * 60, "at 3 × 20 rows");
        let _ = std::fs::remove_dir_all(&dir);
        // On a GPU, in proportion to the grid: one workgroup per row here.
        if !kiln_runtime::devices().devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(_))) {
            eprintln!("skipped: a profile on Vulkan: no Vulkan device");
            return;
        }
        let caps = kiln_codegen::gpu::GpuCaps::vulkan();
        let sched = kiln_sched::schedule_aligned(&g, caps.buffer_align).unwrap();
        let built = kiln_codegen::build_vulkan_artifact(&g.name, &sched, &params, &caps, &dir).unwrap();
        let at_hints: u64 = built.manifest.steps.iter().map(|st| st.flops).sum();
        let mut model = Model::load(&dir).unwrap();
        assert_eq!(flops(&mut model, 2, 8), at_hints, "at the hints (2 × 8), on Vulkan");
        assert_eq!(flops(&mut model, 3, 20) * 16, at_hints * 60, "at 3 × 20 rows, on Vulkan");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reductions over static trailing axes with run-time rows: a sum over the last axis, a
    /// mean keeping it as 1, a max over the last two.
    #[test]
    fn reductions_over_static_trailing_axes_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_reduce");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(16)]);
        let sum =
            g.add(Op::Reduce { op: kiln_ir::ReduceOp::Sum, axes: vec![2], keepdims: false }, &[x]).unwrap();
        g.add_output("sum", sum);
        let mean =
            g.add(Op::Reduce { op: kiln_ir::ReduceOp::Mean, axes: vec![2], keepdims: true }, &[x]).unwrap();
        g.add_output("mean", mean);
        let y = input(&mut g, "y", DType::F32, vec![b, s, Dim::Const(3), Dim::Const(5)]);
        let max = g
            .add(Op::Reduce { op: kiln_ir::ReduceOp::Max, axes: vec![2, 3], keepdims: false }, &[y])
            .unwrap();
        g.add_output("max", max);
        compiled_matches_interpreter(&g, 1e-5);
    }

    /// Reductions and softmax along run-time axes, or along static axes before one: a mean
    /// over the sequence (pooling; its column blocks on the CPU), kept as 1; a max over the
    /// batch and the sequence into a static result; an integer sum over the sequence; a min
    /// over the sequence of a transposed input; a sum over every axis; a sum over the batch,
    /// whose columns (sequence × features) are a run-time count; a softmax along the sequence
    /// and a log-softmax along the batch; both along a run-time last axis.
    #[test]
    fn reductions_and_softmax_along_run_time_axes_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_pool");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(8)]);
        let reduce = |g: &mut Graph, op, axes: Vec<usize>, keepdims, x| {
            g.add(Op::Reduce { op, axes, keepdims }, &[x]).unwrap()
        };
        let mean = reduce(&mut g, kiln_ir::ReduceOp::Mean, vec![1], true, x);
        g.add_output("mean", mean);
        let max = reduce(&mut g, kiln_ir::ReduceOp::Max, vec![0, 1], false, x);
        g.add_output("max", max);
        let sum = reduce(&mut g, kiln_ir::ReduceOp::Sum, vec![0, 1, 2], false, x);
        g.add_output("sum", sum);
        let over_batch = reduce(&mut g, kiln_ir::ReduceOp::Sum, vec![0], false, x);
        g.add_output("over_batch", over_batch);
        let n = input(&mut g, "n", DType::I32, vec![b.clone(), s.clone(), Dim::Const(3)]);
        let int_sum = reduce(&mut g, kiln_ir::ReduceOp::Sum, vec![1], false, n);
        let int_sum = g.add(Op::Cast { to: DType::F32 }, &[int_sum]).unwrap();
        g.add_output("int_sum", int_sum);
        let t = input(&mut g, "t", DType::F32, vec![b, Dim::Const(5), s.clone()]);
        let t = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[t]).unwrap();
        let min = reduce(&mut g, kiln_ir::ReduceOp::Min, vec![1], false, t);
        g.add_output("min", min);
        let softmax = g.add(Op::Softmax { axis: 1 }, &[x]).unwrap();
        g.add_output("softmax", softmax);
        let log_softmax = g.add(Op::LogSoftmax { axis: 0 }, &[x]).unwrap();
        g.add_output("log_softmax", log_softmax);
        // Along a run-time last axis: contiguous rows of run-time length.
        let r = input(&mut g, "r", DType::F32, vec![Dim::Const(3), s.clone()]);
        let row_softmax = g.add(Op::Softmax { axis: 1 }, &[r]).unwrap();
        g.add_output("row_softmax", row_softmax);
        let row_log_softmax = g.add(Op::LogSoftmax { axis: 1 }, &[r]).unwrap();
        g.add_output("row_log_softmax", row_log_softmax);
        // Rows of twice the sequence: 16 at the hints, whole vectors and no partial one.
        let twice = s.mul(&Dim::Const(2)).unwrap();
        let r2 = input(&mut g, "r2", DType::F32, vec![Dim::Const(2), twice]);
        let even_softmax = g.add(Op::Softmax { axis: 1 }, &[r2]).unwrap();
        g.add_output("even_softmax", even_softmax);
        compiled_matches_interpreter(&g, 1e-5);
    }

    /// Norms over a run-time last axis (an instance norm: each channel of `[batch, C, seq]`
    /// normalized over a sequence of run-time length): a plain RMS norm of contiguous rows, a
    /// layer norm of strided rows (read through a transpose), an add + RMS norm with a
    /// broadcast operand, and a layer norm of a sum that is also an output (the kernel stores
    /// the sum).
    #[test]
    fn norms_over_a_run_time_last_axis_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_norm_seq");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone()]);
        let rms = g.add(Op::RmsNorm { eps: 1e-5, affine: false }, &[x]).unwrap();
        g.add_output("rms", rms);
        let t = input(&mut g, "t", DType::F32, vec![b.clone(), s.clone(), Dim::Const(4)]);
        let t = g.add(Op::Transpose { perm: vec![0, 2, 1] }, &[t]).unwrap();
        let layer = g.add(Op::LayerNorm { eps: 1e-5, affine: false }, &[t]).unwrap();
        g.add_output("layer", layer);
        let a = input(&mut g, "a", DType::F32, vec![b.clone(), Dim::Const(3), s.clone()]);
        let per_step = input(&mut g, "per_step", DType::F32, vec![Dim::Const(1), Dim::Const(1), s.clone()]);
        let kind = kiln_ir::NormKind::Rms;
        let add_rms = g.add(Op::AddNorm { eps: 1e-6, kind, affine: false }, &[a, per_step]).unwrap();
        g.add_output("add_rms", add_rms);
        let c = input(&mut g, "c", DType::F32, vec![b, Dim::Const(3), s]);
        let sum = g.add(Op::Binary(kiln_ir::BinaryOp::Add), &[a, c]).unwrap();
        let summed = g.add(Op::LayerNorm { eps: 1e-5, affine: false }, &[sum]).unwrap();
        g.add_output("summed", summed);
        g.add_output("sum", sum);
        compiled_matches_interpreter(&g, 1e-5);
    }

    /// An affine norm over a run-time last axis is refused by name: its γ would have the
    /// row's run-time extent.
    #[test]
    fn an_affine_norm_over_a_run_time_axis_is_refused_by_name() {
        let (mut g, b, s) = graph("dyn_affine_norm");
        let x = input(&mut g, "x", DType::F32, vec![b, s.clone()]);
        let gamma = input(&mut g, "gamma", DType::F32, vec![s]);
        let y = g.add(Op::RmsNorm { eps: 1e-5, affine: true }, &[x, gamma]).unwrap();
        g.add_output("y", y);
        let params = kiln_ir::bind_params(&g, None, 7, false).unwrap();
        let s = kiln_sched::schedule(&g).expect("schedules");
        let dir = temp_dir("refused_norm");
        let err = kiln_codegen::build_artifact(&g.name, &s, &params, &kiln_codegen::CpuTarget::host(), &dir)
            .err()
            .expect("refused");
        assert_eq!(
            err.to_string(),
            "cannot compile `rms_norm` with run-time sizes for the CPU: an affine norm over the symbolic \
             last axis of [batch, seq]: γ and β would have a run-time extent (specialize the sizes with --set)"
        );
        // The GPU targets refuse it the same way, by their name.
        let caps = kiln_codegen::gpu::GpuCaps::vulkan();
        let s = kiln_sched::schedule_aligned(&g, caps.buffer_align).expect("schedules");
        let err =
            kiln_codegen::build_vulkan_artifact(&g.name, &s, &params, &caps, &dir).err().expect("refused");
        assert_eq!(
            err.to_string(),
            "cannot compile `rms_norm` with run-time sizes for the vulkan target: an affine norm over the \
             symbolic last axis of [batch, seq]: γ and β would have a run-time extent (specialize the sizes \
             with --set)"
        );
    }

    /// `concat` along a static axis after the symbolic ones runs on the row form, at every size.
    #[test]
    fn a_concat_along_a_static_axis_joins_rows_of_run_time_count() {
        let (mut g, b, s) = graph("dyn_concat");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(8)]);
        let z = input(&mut g, "z", DType::F32, vec![b, s, Dim::Const(3)]);
        let y = g.add(Op::Concat { axis: 2 }, &[x, z]).unwrap();
        g.add_output("y", y);
        compiled_matches_interpreter(&g, 0.0);
    }

    /// Concat and pad along run-time axes, or static axes before one: keys joined along the
    /// sequence (a cache and the new tokens'), rows joined along a run-time last axis, a
    /// static row joined before a run-time batch, integers joined along the sequence; a pad
    /// of the sequence, and a pad of a run-time last axis and of the batch before it.
    #[test]
    fn concat_and_pad_along_run_time_axes_compile_once_for_every_binding() {
        let (mut g, b, s) = graph("dyn_join");
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(8)]);
        let past = input(&mut g, "past", DType::F32, vec![b.clone(), Dim::Const(3), Dim::Const(8)]);
        let keys = g.add(Op::Concat { axis: 1 }, &[past, x, x]).unwrap();
        g.add_output("keys", keys);
        let r = input(&mut g, "r", DType::F32, vec![b.clone(), s.clone()]);
        let rows = g.add(Op::Concat { axis: 1 }, &[r, r]).unwrap();
        g.add_output("rows", rows);
        let first = input(&mut g, "first", DType::F32, vec![Dim::Const(1), s.clone(), Dim::Const(8)]);
        let batch = g.add(Op::Concat { axis: 0 }, &[first, x]).unwrap();
        g.add_output("batch", batch);
        let n = input(&mut g, "n", DType::I32, vec![b, s, Dim::Const(2)]);
        let ints = g.add(Op::Concat { axis: 1 }, &[n, n]).unwrap();
        let ints = g.add(Op::Cast { to: DType::F32 }, &[ints]).unwrap();
        g.add_output("ints", ints);
        let padded = g.add(Op::Pad { pads: vec![(0, 0), (2, 3), (0, 0)], value: -1.5 }, &[x]).unwrap();
        g.add_output("padded", padded);
        let around = g.add(Op::Pad { pads: vec![(1, 0), (0, 4)], value: 0.25 }, &[r]).unwrap();
        g.add_output("around", around);
        compiled_matches_interpreter(&g, 0.0);
    }

    /// A small deterministic random source for the graphs below.
    struct Dice(u64, u64);

    impl Dice {
        fn below(&mut self, n: usize) -> usize {
            self.1 += 1;
            (kiln_ir::rng::uniform(self.0, 7, self.1) * n as f64) as usize % n.max(1)
        }
    }

    /// A random graph over `[batch, seq, 8]` and `[batch, 4, seq]`: a chain of bounded
    /// elementwise ops, products with operands broadcast along random axes, transposes,
    /// reductions over random axes, softmax and log-softmax along random axes, norms over
    /// the last axis, products by a weight, strided slices along static axes, and concats and
    /// pads along random axes, its last few values the outputs.
    fn random_run_time_graph(seed: u64) -> Graph {
        let (mut g, b, s) = graph(&format!("dyn_random_{seed}"));
        let mut dice = Dice(seed, 0);
        let x = input(&mut g, "x", DType::F32, vec![b.clone(), s.clone(), Dim::Const(8)]);
        let y = input(&mut g, "y", DType::F32, vec![b, Dim::Const(4), s]);
        let mut pool = vec![x, y];
        let mut made = vec![];
        for step in 0..9 {
            let t = pool[dice.below(pool.len())];
            let shape = g.ty(t).shape.clone();
            let rank = shape.len();
            let axis = dice.below(rank);
            let op = match dice.below(10) {
                0 => Op::Unary([UnaryOp::Tanh, UnaryOp::Sigmoid, UnaryOp::Neg][dice.below(3)]),
                1 => {
                    // A product with an operand of the same shape, broadcast along some axes.
                    let bshape: Vec<Dim> = shape
                        .iter()
                        .map(|d| if dice.below(2) == 0 { Dim::Const(1) } else { d.clone() })
                        .collect();
                    let w = input(&mut g, &format!("w{step}"), DType::F32, bshape);
                    let v = g.add(Op::Binary(BinaryOp::Mul), &[t, w]).unwrap();
                    pool.push(v);
                    made.push(v);
                    continue;
                }
                2 => {
                    let mut perm: Vec<usize> = (0..rank).collect();
                    perm.rotate_left(1 + dice.below(rank - 1));
                    Op::Transpose { perm }
                }
                3 if rank > 1 => {
                    let how = [kiln_ir::ReduceOp::Sum, kiln_ir::ReduceOp::Mean, kiln_ir::ReduceOp::Max]
                        [dice.below(3)];
                    let mut axes = vec![axis];
                    if dice.below(2) == 0 {
                        axes.push((axis + 1) % rank);
                        axes.sort_unstable();
                    }
                    let keepdims = axes.len() == rank || dice.below(2) == 0;
                    Op::Reduce { op: how, axes, keepdims }
                }
                4 => {
                    if dice.below(2) == 0 {
                        Op::Softmax { axis }
                    } else {
                        Op::LogSoftmax { axis }
                    }
                }
                // ε 0.1: a pad makes constant rows, whose norm would otherwise amplify the
                // rounding of their mean by 1/√ε.
                5 => {
                    if dice.below(2) == 0 {
                        Op::LayerNorm { eps: 0.1, affine: false }
                    } else {
                        Op::RmsNorm { eps: 0.1, affine: false }
                    }
                }
                6 => {
                    let other = g.add(Op::Unary(UnaryOp::Tanh), &[t]).unwrap();
                    let v = g.add(Op::Concat { axis }, &[t, other]).unwrap();
                    pool.push(v);
                    made.push(v);
                    continue;
                }
                // A product by a weight, where the last axis is static.
                7 if shape[rank - 1].is_static() => {
                    let k = shape[rank - 1].as_const().unwrap_or(1);
                    let w = param(&mut g, &format!("p{step}"), &[k, 3]);
                    let v = g.add(Op::MatMul, &[t, w]).unwrap();
                    pool.push(v);
                    made.push(v);
                    continue;
                }
                // Every other element from the second along a static axis.
                8 if shape[axis].as_const().is_some_and(|n| n > 1) => {
                    let end = shape[axis].clone();
                    Op::Slice { axis, start: Dim::Const(1), end, step: 2 }
                }
                _ => {
                    let mut pads = vec![(0, 0); rank];
                    pads[axis] = (dice.below(3), 1 + dice.below(2));
                    Op::Pad { pads, value: 0.5 }
                }
            };
            let v = g.add(op.clone(), &[t]).unwrap_or_else(|e| panic!("seed {seed}: {op:?}: {e}"));
            pool.push(v);
            made.push(v);
        }
        for (i, &v) in made.iter().rev().take(3).enumerate() {
            g.add_output(format!("out{i}"), v);
        }
        g
    }

    /// A random chain of windows over a sequence (`[batch, C, 1, seq]`) or an image (`[batch,
    /// C, seq, seq]`): convolutions and pools of random kernel, stride, dilation, padding and
    /// groups (each fitting a size of 1), with the image's axes swapped now and then, so that
    /// a view does not merge into rows; its last two values the outputs.
    fn random_window_graph(seed: u64) -> Graph {
        let (mut g, b, s) = graph(&format!("dyn_windows_{seed}"));
        let mut dice = Dice(seed, 1);
        let image = dice.below(2) == 0;
        let h = if image { s.clone() } else { Dim::Const(1) };
        let mut t = input(&mut g, "x", DType::F32, vec![b, Dim::Const(4), h, s]);
        let mut made = vec![];
        for step in 0..4 {
            let c = g.ty(t).shape[1].as_const().unwrap_or(1);
            // Along the height only where it is the sequence: a 1-high sequence keeps 1 tap.
            let geometry = |dice: &mut Dice, max_kernel: usize| {
                let kernel = 1 + dice.below(max_kernel);
                let stride = 1 + dice.below(2);
                (kernel, stride)
            };
            let hk = |d: &mut Dice, max_kernel| if image { geometry(d, max_kernel) } else { (1, 1) };
            let op = match dice.below(5) {
                0..=2 => {
                    let ((kh, sh), (kw, sw)) = (hk(&mut dice, 3), geometry(&mut dice, 3));
                    let dilation =
                        [1 + dice.below(2) * usize::from(kh > 1), 1 + dice.below(2) * usize::from(kw > 1)];
                    // Enough padding that a size of 1 has an output.
                    let pad = |k: usize, d: usize| (d * (k - 1)).div_ceil(2);
                    let padding = [pad(kh, dilation[0]), pad(kw, dilation[1])];
                    let groups = [1, if c % 2 == 0 { 2 } else { 1 }, c][dice.below(3)];
                    let out = groups * (1 + dice.below(3));
                    let w = param(&mut g, &format!("w{step}"), &[out, c / groups, kh, kw]);
                    let op = Op::Conv2d { stride: [sh, sw], padding, dilation, groups };
                    t = g.add(op.clone(), &[t, w]).unwrap_or_else(|e| panic!("seed {seed}: {op:?}: {e}"));
                    made.push(t);
                    continue;
                }
                3 => {
                    let ((kh, sh), (kw, sw)) = (hk(&mut dice, 3), geometry(&mut dice, 3));
                    let kind = [kiln_ir::PoolKind::Max, kiln_ir::PoolKind::Avg][dice.below(2)];
                    Op::Pool2d { kind, kernel: [kh, kw], stride: [sh, sw], padding: [kh / 2, kw / 2] }
                }
                _ if image => Op::Transpose { perm: vec![0, 1, 3, 2] },
                _ => Op::Unary(UnaryOp::Tanh),
            };
            t = g.add(op.clone(), &[t]).unwrap_or_else(|e| panic!("seed {seed}: {op:?}: {e}"));
            made.push(t);
        }
        for (i, &v) in made.iter().rev().take(2).enumerate() {
            g.add_output(format!("out{i}"), v);
        }
        g
    }

    /// Random chains of windows over run-time sizes, each compiled once for the CPU, Vulkan and
    /// CUDA and compared with the interpreter at every binding.
    #[test]
    fn random_windows_over_run_time_sizes_compile_once_for_every_binding() {
        for seed in 0..24 {
            let g = random_window_graph(seed);
            eprintln!("seed {seed}: {} nodes", g.node_ids().count());
            compiled_matches_interpreter(&g, 1e-4);
        }
    }

    /// Random graphs of the ops above, each compiled once for the CPU, Vulkan and CUDA and
    /// compared with the interpreter at every binding: what the hand-written cases above do
    /// not combine (a softmax of a transposed pad, a norm of a reduction, …).
    #[test]
    fn random_graphs_over_run_time_sizes_compile_once_for_every_binding() {
        for seed in 0..40 {
            let g = random_run_time_graph(seed);
            eprintln!("seed {seed}: {} nodes", g.node_ids().count());
            compiled_matches_interpreter(&g, 1e-4);
        }
    }
}
