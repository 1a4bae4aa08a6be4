//! Tests of the fused ops: hand-worked values, equivalence with the primitive form they stand
//! for (on seeded random inputs, f64 and f32), half-precision rounding, and the typing errors.

use half::{bf16, f16};
use kiln_ir::{
    eval, eval_op, infer, print, Activation, BinaryOp, Bindings, Buffer, CompareOp, DType, EvalError,
    GeluApprox, Graph, InferError, NodeId, NormKind, Op, ReduceOp, Tensor, TensorType, UnaryOp,
};

// ---------------------------------------------------------------------------------------
// helpers

fn t64(shape: &[usize], v: &[f64]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::F64(v.to_vec())).unwrap()
}
fn t32(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::F32(v.to_vec())).unwrap()
}

fn ty(dtype: DType, shape: &[usize]) -> TensorType {
    TensorType::new(dtype, shape.to_vec())
}

fn infer_of(op: &Op, args: &[&Tensor]) -> Result<TensorType, InferError> {
    let types: Vec<TensorType> = args.iter().map(|t| ty(t.dtype(), &t.shape)).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    infer(op, &refs)
}

fn run(op: Op, args: &[&Tensor]) -> Tensor {
    let ty = infer_of(&op, args).unwrap_or_else(|e| panic!("{e}"));
    let out = eval_op(&op, args, &ty).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.shape, ty.static_shape(), "result shape");
    assert_eq!(out.dtype(), ty.dtype, "result dtype");
    out
}

/// Element-by-element comparison with expected values; NaN matches NaN.
#[track_caller]
fn close(got: &Tensor, shape: &[usize], want: &[f64], tol: f64) {
    assert_eq!(got.shape, shape, "shape");
    let g = got.to_f64_vec();
    assert_eq!(g.len(), want.len());
    for (i, (&a, &b)) in g.iter().zip(want).enumerate() {
        let ok = if b.is_nan() { a.is_nan() } else { (a - b).abs() <= tol * b.abs().max(1.0) };
        assert!(ok, "element {i}: got {a}, want {b} (all: {g:?})");
    }
}

/// Relative error of `got` against `want` in the max norm, after checking that both have the
/// same shape, dtype and NaN positions.
#[track_caller]
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.shape, want.shape, "shape");
    assert_eq!(got.dtype(), want.dtype(), "dtype");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let mut diff = 0f64;
    let mut scale = 0f64;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        assert_eq!(a.is_nan(), b.is_nan(), "element {i}: {a} vs {b}");
        if b.is_nan() {
            continue;
        }
        assert_eq!(a.is_infinite(), b.is_infinite(), "element {i}: {a} vs {b}");
        if b.is_finite() {
            diff = diff.max((a - b).abs());
            scale = scale.max(b.abs());
        }
    }
    diff / scale.max(f64::MIN_POSITIVE)
}

#[track_caller]
fn assert_equivalent(got: &Tensor, want: &Tensor) {
    let tol = if got.dtype() == DType::F64 { 1e-9 } else { 1e-5 };
    let e = rel_err(got, want);
    assert!(e <= tol, "relative error {e:e} > {tol:e}");
}

/// Seeded standard normal values in `dtype`.
fn randn(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let data = Buffer::from_f64(dtype, (0..n as u64).map(|i| kiln_ir::rng::normal(seed, 7, i)));
    Tensor::new(shape.to_vec(), data).unwrap()
}

/// A graph under construction with its input values; `fused` and `prim` are evaluated together.
struct G {
    g: Graph,
    b: Bindings,
}

impl G {
    fn new() -> G {
        G { g: Graph::new("t"), b: Bindings::default() }
    }
    fn input(&mut self, name: &str, t: &Tensor) -> NodeId {
        self.b.inputs.insert(name.to_string(), t.clone());
        self.op(Op::Input { name: name.into(), dtype: t.dtype(), shape: kiln_ir::dims(&t.shape) }, &[])
    }
    fn op(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        self.g.add(op, args).unwrap_or_else(|e| panic!("{e}"))
    }
    fn scalar(&mut self, v: f64, dtype: DType) -> NodeId {
        self.op(Op::Full { value: v, dtype, shape: kiln_ir::dims(&[]) }, &[])
    }
    fn un(&mut self, u: UnaryOp, x: NodeId) -> NodeId {
        self.op(Op::Unary(u), &[x])
    }
    fn bin(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> NodeId {
        self.op(Op::Binary(b), &[x, y])
    }
    fn reduce(&mut self, r: ReduceOp, x: NodeId, axis: usize) -> NodeId {
        self.op(Op::Reduce { op: r, axes: vec![axis], keepdims: true }, &[x])
    }
    fn dtype(&self, x: NodeId) -> DType {
        self.g.ty(x).dtype
    }
    fn last_axis(&self, x: NodeId) -> usize {
        self.g.ty(x).rank() - 1
    }
    /// Evaluates both nodes: (fused, primitive).
    fn run(mut self, fused: NodeId, prim: NodeId) -> (Tensor, Tensor) {
        self.g.add_output("fused", fused);
        self.g.add_output("prim", prim);
        let mut out = eval(&self.g, &self.b).unwrap_or_else(|e| panic!("{e}"));
        let p = out.pop().unwrap().1;
        let f = out.pop().unwrap().1;
        (f, p)
    }
}

// The primitive forms, written as the std layers write them.

fn prim_softmax(g: &mut G, x: NodeId, axis: usize, log: bool) -> NodeId {
    let m = g.reduce(ReduceOp::Max, x, axis);
    let d = g.bin(BinaryOp::Sub, x, m);
    let e = g.un(UnaryOp::Exp, d);
    let s = g.reduce(ReduceOp::Sum, e, axis);
    if log {
        let ls = g.un(UnaryOp::Log, s);
        g.bin(BinaryOp::Sub, d, ls)
    } else {
        g.bin(BinaryOp::Div, e, s)
    }
}

fn prim_layer_norm(g: &mut G, x: NodeId, eps: f64, gamma: Option<NodeId>, beta: Option<NodeId>) -> NodeId {
    let (axis, d) = (g.last_axis(x), g.dtype(x));
    let mu = g.reduce(ReduceOp::Mean, x, axis);
    let xc = g.bin(BinaryOp::Sub, x, mu);
    let sq = g.bin(BinaryOp::Mul, xc, xc);
    let var = g.reduce(ReduceOp::Mean, sq, axis);
    let e = g.scalar(eps, d);
    let ve = g.bin(BinaryOp::Add, var, e);
    let sd = g.un(UnaryOp::Sqrt, ve);
    let mut y = g.bin(BinaryOp::Div, xc, sd);
    if let Some(w) = gamma {
        y = g.bin(BinaryOp::Mul, y, w);
    }
    if let Some(b) = beta {
        y = g.bin(BinaryOp::Add, y, b);
    }
    y
}

fn prim_rms_norm(g: &mut G, x: NodeId, eps: f64, gamma: Option<NodeId>) -> NodeId {
    let (axis, d) = (g.last_axis(x), g.dtype(x));
    let sq = g.bin(BinaryOp::Mul, x, x);
    let ms = g.reduce(ReduceOp::Mean, sq, axis);
    let e = g.scalar(eps, d);
    let me = g.bin(BinaryOp::Add, ms, e);
    let r = g.un(UnaryOp::Rsqrt, me);
    let y = g.bin(BinaryOp::Mul, x, r);
    match gamma {
        Some(w) => g.bin(BinaryOp::Mul, y, w),
        None => y,
    }
}

fn prim_gelu(g: &mut G, x: NodeId, approx: GeluApprox) -> NodeId {
    let d = g.dtype(x);
    let half = g.scalar(0.5, d);
    let one = g.scalar(1.0, d);
    let hx = g.bin(BinaryOp::Mul, half, x);
    let t = match approx {
        GeluApprox::Erf => {
            let r2 = g.scalar(2f64.sqrt(), d);
            let q = g.bin(BinaryOp::Div, x, r2);
            g.un(UnaryOp::Erf, q)
        }
        GeluApprox::Tanh => {
            let c = g.scalar((2.0 / std::f64::consts::PI).sqrt(), d);
            let k = g.scalar(0.044715, d);
            let xx = g.bin(BinaryOp::Mul, x, x);
            let xxx = g.bin(BinaryOp::Mul, x, xx);
            let kx3 = g.bin(BinaryOp::Mul, k, xxx);
            let s = g.bin(BinaryOp::Add, x, kx3);
            let inner = g.bin(BinaryOp::Mul, c, s);
            g.un(UnaryOp::Tanh, inner)
        }
    };
    let p = g.bin(BinaryOp::Add, one, t);
    g.bin(BinaryOp::Mul, hx, p)
}

/// How the primitive attention applies the scale: `· scale` (the fused op's own form) or
/// `/ divisor` (the form of std.attention, with scale = 1/divisor).
#[derive(Clone, Copy)]
enum Scaling {
    Mul(f64),
    Div(f64),
}

fn prim_attention(
    g: &mut G,
    q: NodeId,
    k: NodeId,
    v: NodeId,
    mask: Option<NodeId>,
    s: Scaling,
    causal: bool,
) -> NodeId {
    let d = g.dtype(q);
    let r = g.g.ty(q).rank();
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    let kt = g.op(Op::Transpose { perm }, &[k]);
    let mut scores = g.op(Op::MatMul, &[q, kt]);
    scores = match s {
        Scaling::Mul(c) => {
            let c = g.scalar(c, d);
            g.bin(BinaryOp::Mul, scores, c)
        }
        Scaling::Div(c) => {
            let c = g.scalar(c, d);
            g.bin(BinaryOp::Div, scores, c)
        }
    };
    if let Some(m) = mask {
        scores = g.bin(BinaryOp::Add, scores, m);
    }
    if causal {
        let (sq, sk) = (g.g.ty(q).static_shape()[r - 2], g.g.ty(k).static_shape()[r - 2]);
        let i = g.op(Op::Iota { dtype: DType::I64, shape: kiln_ir::dims(&[sq, sk]), axis: 0 }, &[]);
        let j = g.op(Op::Iota { dtype: DType::I64, shape: kiln_ir::dims(&[sq, sk]), axis: 1 }, &[]);
        let keep = g.op(Op::Compare(CompareOp::Ge), &[i, j]);
        let ninf = g.scalar(f64::NEG_INFINITY, d);
        scores = g.op(Op::Where, &[keep, scores, ninf]);
    }
    let p = prim_softmax(g, scores, r - 1, false);
    g.op(Op::MatMul, &[p, v])
}

fn prim_activation(g: &mut G, x: NodeId, act: Activation) -> NodeId {
    match act {
        Activation::None => x,
        Activation::Relu => g.un(UnaryOp::Relu, x),
        Activation::Sigmoid => g.un(UnaryOp::Sigmoid, x),
        Activation::Tanh => g.un(UnaryOp::Tanh, x),
        Activation::Gelu(a) => prim_gelu(g, x, a),
        Activation::Silu => {
            let s = g.un(UnaryOp::Sigmoid, x);
            g.bin(BinaryOp::Mul, x, s)
        }
    }
}

const FLOATS: [DType; 2] = [DType::F64, DType::F32];

// ---------------------------------------------------------------------------------------
// the op table

#[test]
fn names_arities_flags_and_attrs() {
    let cases: Vec<(Op, &str, usize)> = vec![
        (Op::Softmax { axis: 1 }, "softmax", 1),
        (Op::LogSoftmax { axis: 0 }, "log_softmax", 1),
        (Op::LayerNorm { eps: 1e-5, affine: false }, "layer_norm", 1),
        (Op::LayerNorm { eps: 1e-5, affine: true }, "layer_norm", 3),
        (Op::RmsNorm { eps: 1e-6, affine: false }, "rms_norm", 1),
        (Op::RmsNorm { eps: 1e-6, affine: true }, "rms_norm", 2),
        (Op::Gelu { approx: GeluApprox::Tanh }, "gelu", 1),
        (Op::Attention { scale: 0.5, causal: true, masked: false }, "attention", 3),
        (Op::Attention { scale: 0.5, causal: false, masked: true }, "attention", 4),
        (Op::AttentionLse { scale: 0.5, causal: true, masked: false }, "attention_lse", 2),
        (Op::AttentionLse { scale: 0.5, causal: false, masked: true }, "attention_lse", 3),
        (Op::AddNorm { eps: 1e-5, kind: NormKind::Layer, affine: false }, "add_norm", 2),
        (Op::AddNorm { eps: 1e-5, kind: NormKind::Layer, affine: true }, "add_norm", 4),
        (Op::AddNorm { eps: 1e-5, kind: NormKind::Rms, affine: true }, "add_norm", 3),
        (Op::MatMulEpilogue { bias: false, activation: Activation::None }, "matmul_epilogue", 2),
        (Op::MatMulEpilogue { bias: true, activation: Activation::Relu }, "matmul_epilogue", 3),
    ];
    for (op, name, arity) in &cases {
        assert_eq!(op.name(), *name);
        assert_eq!(op.arity(), Some(*arity), "{op:?}");
        assert!(op.is_fused(), "{op:?}");
        assert!(!op.is_leaf());
    }
    assert!(Op::Gelu { approx: GeluApprox::Erf }.is_elementwise());
    assert!(!Op::Softmax { axis: 0 }.is_elementwise());
    assert!(Op::Unary(UnaryOp::Exp).is_elementwise() && Op::Where.is_elementwise());
    assert!(Op::Cast { to: DType::F32 }.is_elementwise());
    assert!(!Op::MatMul.is_elementwise() && !Op::MatMul.is_fused());
    assert_eq!(Op::Concat { axis: 0 }.arity(), None);

    let attrs =
        |op: Op| op.attrs().into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ");
    assert_eq!(attrs(Op::Softmax { axis: 2 }), "axis=2");
    assert_eq!(attrs(Op::LayerNorm { eps: 1e-5, affine: true }), "eps=1e-5 affine=true");
    assert_eq!(attrs(Op::Gelu { approx: GeluApprox::Tanh }), "approx=tanh");
    assert_eq!(
        attrs(Op::Attention { scale: 0.125, causal: true, masked: false }),
        "scale=0.125 causal=true masked=false"
    );
    assert_eq!(
        attrs(Op::AddNorm { eps: 1e-6, kind: NormKind::Rms, affine: true }),
        "kind=rms eps=1e-6 affine=true"
    );
    assert_eq!(
        attrs(Op::MatMulEpilogue { bias: true, activation: Activation::Gelu(GeluApprox::Tanh) }),
        "bias=true activation=gelu_tanh"
    );
    let names: Vec<&str> = Activation::ALL.iter().map(|a| a.name()).collect();
    assert_eq!(names, ["none", "relu", "gelu", "gelu_tanh", "sigmoid", "tanh", "silu"]);
}

#[test]
fn printers_show_the_attributes() {
    let mut g = G::new();
    let x = g.input("x", &t32(&[2, 4], &[0.0; 8]));
    let w = g.input("w", &t32(&[4], &[1.0; 4]));
    let b = g.input("b", &t32(&[4], &[0.0; 4]));
    let y = g.op(Op::LayerNorm { eps: 1e-5, affine: true }, &[x, w, b]);
    g.g.add_output("y", y);
    let text = print::to_text(&g.g, Default::default());
    assert!(text.contains("%3 = layer_norm(%0, %1, %2) {eps = 1e-5, affine = true} : f32[2, 4]"), "{text}");
    let json = print::to_json(&g.g);
    assert_eq!(json["nodes"][3]["attrs"]["affine"], "true");
    assert!(print::to_dot(&g.g).contains("layer_norm\neps=1e-5\naffine=true"));
}

// ---------------------------------------------------------------------------------------
// hand-worked values

#[test]
fn softmax_values() {
    let x = t64(&[2, 3], &[1.0, 2.0, 3.0, 0.0, 0.0, 0.0]);
    let y = run(Op::Softmax { axis: 1 }, &[&x]);
    let third = 1.0 / 3.0;
    close(
        &y,
        &[2, 3],
        &[0.09003057317038046, 0.24472847105479764, 0.6652409557748218, third, third, third],
        1e-15,
    );
    // Along the first axis: each column [c, 0] gives [eᶜ/(1 + eᶜ), 1/(1 + eᶜ)].
    let y = run(Op::Softmax { axis: 0 }, &[&x]);
    close(
        &y,
        &[2, 3],
        &[
            0.7310585786300049,
            0.8807970779778823,
            0.9525741268224334,
            0.2689414213699951,
            0.11920292202211755,
            0.04742587317756679,
        ],
        1e-15,
    );
    // -inf takes no weight; a row of only -inf is NaN (as exp(x − max) / Σ is).
    let ninf = f64::NEG_INFINITY;
    let x = t64(&[3, 2], &[0.0, ninf, ninf, ninf, 1e308, 1e308]);
    close(&run(Op::Softmax { axis: 1 }, &[&x]), &[3, 2], &[1.0, 0.0, f64::NAN, f64::NAN, 0.5, 0.5], 0.0);
    // f32 and the empty case.
    let x = t32(&[3], &[1.0, 2.0, 3.0]);
    close(
        &run(Op::Softmax { axis: 0 }, &[&x]),
        &[3],
        &[0.09003057317038046, 0.24472847105479764, 0.6652409557748218],
        1e-7,
    );
    let e = run(Op::Softmax { axis: 1 }, &[&t32(&[2, 0], &[])]);
    assert_eq!((e.shape.as_slice(), e.numel()), (&[2usize, 0][..], 0));
}

#[test]
fn log_softmax_values() {
    let x = t64(&[1, 3], &[1.0, 2.0, 3.0]);
    close(
        &run(Op::LogSoftmax { axis: 1 }, &[&x]),
        &[1, 3],
        &[-2.4076059644443806, -1.4076059644443804, -0.4076059644443804],
        1e-15,
    );
    // Stable for large inputs, where exp alone would overflow.
    let x = t64(&[2], &[1000.0, 1000.0]);
    close(&run(Op::LogSoftmax { axis: 0 }, &[&x]), &[2], &[-std::f64::consts::LN_2; 2], 1e-15);
}

#[test]
fn layer_norm_values() {
    let x = t64(&[2, 4], &[1.0, 2.0, 3.0, 4.0, 2.0, 4.0, 6.0, 8.0]);
    let n = [-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738];
    let want: Vec<f64> = n.iter().chain(&n).copied().collect();
    close(&run(Op::LayerNorm { eps: 0.0, affine: false }, &[&x]), &[2, 4], &want, 1e-15);
    close(
        &run(Op::LayerNorm { eps: 1e-5, affine: false }, &[&x.clone()]),
        &[2, 4],
        &[
            -1.3416354199689269,
            -0.447211806656309,
            0.447211806656309,
            1.3416354199689269,
            -1.3416394448610998,
            -0.4472131482870333,
            0.4472131482870333,
            1.3416394448610998,
        ],
        1e-15,
    );
    let gamma = t64(&[4], &[1.0, 2.0, 0.5, -1.0]);
    let beta = t64(&[4], &[0.0, 1.0, 0.0, 1.0]);
    let y = run(Op::LayerNorm { eps: 0.0, affine: true }, &[&x, &gamma, &beta]);
    let a = [-1.3416407864998738, 0.10557280900008414, 0.22360679774997896, -0.34164078649987384];
    close(&y, &[2, 4], &a.iter().chain(&a).copied().collect::<Vec<_>>(), 1e-15);
    // A constant row has zero variance: 0 / √eps = 0.
    let c = t32(&[1, 3], &[5.0, 5.0, 5.0]);
    close(&run(Op::LayerNorm { eps: 1e-5, affine: false }, &[&c]), &[1, 3], &[0.0; 3], 0.0);
}

#[test]
fn rms_norm_values() {
    let x = t64(&[1, 2], &[3.0, 4.0]);
    close(
        &run(Op::RmsNorm { eps: 0.0, affine: false }, &[&x]),
        &[1, 2],
        &[0.848528137423857, 1.131370849898476],
        1e-15,
    );
    close(
        &run(Op::RmsNorm { eps: 1e-6, affine: false }, &[&x]),
        &[1, 2],
        &[0.8485281034827336, 1.1313708046436448],
        1e-15,
    );
    let gamma = t64(&[2], &[2.0, -1.0]);
    close(
        &run(Op::RmsNorm { eps: 0.0, affine: true }, &[&x, &gamma]),
        &[1, 2],
        &[1.697056274847714, -1.131370849898476],
        1e-15,
    );
}

#[test]
fn gelu_values() {
    let x = t64(&[4], &[-1.0, 0.0, 1.0, 2.0]);
    close(
        &run(Op::Gelu { approx: GeluApprox::Erf }, &[&x]),
        &[4],
        &[-0.15865525393145707, 0.0, 0.8413447460685429, 1.9544997361036416],
        1e-15,
    );
    close(
        &run(Op::Gelu { approx: GeluApprox::Tanh }, &[&x]),
        &[4],
        &[-0.15880800939172324, 0.0, 0.8411919906082768, 1.954597694087775],
        1e-15,
    );
    let x = t32(&[2], &[-1.0, 2.0]);
    close(
        &run(Op::Gelu { approx: GeluApprox::Erf }, &[&x]),
        &[2],
        &[-0.15865525393145707, 1.9544997361036416],
        1e-7,
    );
}

#[test]
fn attention_values() {
    // q = I, k = [e0, e1, e0 + e1], v = [1, 2, 3]ᵀ, scale 1.
    let q = t64(&[2, 2], &[1.0, 0.0, 0.0, 1.0]);
    let k = t64(&[3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0]);
    let v = t64(&[3, 1], &[1.0, 2.0, 3.0]);
    let e = std::f64::consts::E;
    let plain = Op::Attention { scale: 1.0, causal: false, masked: false };
    // Row 0 scores [1, 0, 1]: (e·1 + 1·2 + e·3) / (2e + 1) = 2. Row 1 scores [0, 1, 1].
    close(&run(plain.clone(), &[&q, &k, &v]), &[2, 1], &[2.0, (1.0 + 5.0 * e) / (1.0 + 2.0 * e)], 1e-15);
    close(&run(plain.clone(), &[&q, &k, &v]), &[2, 1], &[2.0, 2.2669563947545543], 1e-15);
    // Causal: row 0 sees key 0 only, row 1 keys 0 and 1.
    let causal = Op::Attention { scale: 1.0, causal: true, masked: false };
    close(&run(causal, &[&q, &k, &v]), &[2, 1], &[1.0, 1.7310585786300048], 1e-15);
    // An additive mask [0, -inf, 0] (broadcast over rows) drops key 1.
    let ninf = f64::NEG_INFINITY;
    let mask = t64(&[3], &[0.0, ninf, 0.0]);
    let masked = Op::Attention { scale: 1.0, causal: false, masked: true };
    close(&run(masked, &[&q, &k, &v, &mask]), &[2, 1], &[2.0, 2.46211715726001], 1e-15);
    // Causal and a mask hiding key 0: row 0 has no key left, which gives NaN.
    let mask = t64(&[3], &[ninf, 0.0, 0.0]);
    let both = Op::Attention { scale: 1.0, causal: true, masked: true };
    close(&run(both, &[&q, &k, &v, &mask]), &[2, 1], &[f64::NAN, 2.0], 0.0);
    // The scale multiplies the scores: with scale 0 every key weighs the same.
    let flat = Op::Attention { scale: 0.0, causal: false, masked: false };
    close(&run(flat, &[&q, &k, &v]), &[2, 1], &[2.0, 2.0], 1e-15);
    // Batch axes and Dv > 1 in f32: two batches, each q one row, k and v two rows.
    let q = t32(&[2, 1, 1], &[0.0, 1.0]);
    let k = t32(&[2, 2, 1], &[1.0, 1.0, 0.0, 1.0]);
    let v = t32(&[2, 2, 2], &[1.0, 10.0, 3.0, 30.0, 0.0, 0.0, 1.0, 1.0]);
    // Batch 0: equal scores → mean of the rows [2, 20]. Batch 1: scores [0, 1] → weight of
    // row 1 is e/(1+e).
    let w = e / (1.0 + e);
    close(&run(plain.clone(), &[&q, &k, &v]), &[2, 1, 2], &[2.0, 20.0, w, w], 1e-6);
}

#[test]
fn attention_without_keys_is_an_error() {
    let q = t32(&[2, 3], &[0.0; 6]);
    let k = t32(&[0, 3], &[]);
    let v = t32(&[0, 4], &[]);
    let op = Op::Attention { scale: 1.0, causal: false, masked: false };
    let ty = infer_of(&op, &[&q, &k, &v]).unwrap();
    assert_eq!(ty, TensorType::new(DType::F32, vec![2, 4]));
    let err = eval_op(&op, &[&q, &k, &v], &ty).unwrap_err();
    assert!(matches!(err, EvalError::EmptyReduction { op: "attention", .. }), "{err}");
    // No queries: an empty result, no error.
    let q = t32(&[0, 3], &[]);
    assert_eq!(run(op.clone(), &[&q, &k, &v]).shape, [0, 4]);
    // D = 0: every score is 0, so each row is the mean of the values.
    let q = t32(&[2, 0], &[]);
    let k = t32(&[3, 0], &[]);
    let v = t32(&[3, 2], &[1.0, 10.0, 2.0, 20.0, 6.0, 60.0]);
    close(&run(op, &[&q, &k, &v]), &[2, 2], &[3.0, 30.0, 3.0, 30.0], 1e-6);
}

#[test]
fn add_norm_values() {
    // [1, 2, 3, 4] + [[0], [1]] broadcasts to two rows, each normalizing to the same values.
    let a = t64(&[1, 4], &[1.0, 2.0, 3.0, 4.0]);
    let b = t64(&[2, 1], &[0.0, 1.0]);
    let n = [-1.3416407864998738, -0.4472135954999579, 0.4472135954999579, 1.3416407864998738];
    let want: Vec<f64> = n.iter().chain(&n).copied().collect();
    close(
        &run(Op::AddNorm { eps: 0.0, kind: NormKind::Layer, affine: false }, &[&a, &b]),
        &[2, 4],
        &want,
        1e-15,
    );
    let gamma = t64(&[4], &[1.0, 2.0, 0.5, -1.0]);
    let beta = t64(&[4], &[0.0, 1.0, 0.0, 1.0]);
    let y = run(Op::AddNorm { eps: 0.0, kind: NormKind::Layer, affine: true }, &[&a, &b, &gamma, &beta]);
    let aff = [-1.3416407864998738, 0.10557280900008414, 0.22360679774997896, -0.34164078649987384];
    close(&y, &[2, 4], &aff.iter().chain(&aff).copied().collect::<Vec<_>>(), 1e-15);
    // RMS: [1, 2] + [2, 2] = [3, 4].
    let a = t64(&[1, 2], &[1.0, 2.0]);
    let b = t64(&[2], &[2.0, 2.0]);
    let g = t64(&[2], &[2.0, -1.0]);
    close(
        &run(Op::AddNorm { eps: 0.0, kind: NormKind::Rms, affine: false }, &[&a, &b]),
        &[1, 2],
        &[0.848528137423857, 1.131370849898476],
        1e-15,
    );
    close(
        &run(Op::AddNorm { eps: 0.0, kind: NormKind::Rms, affine: true }, &[&a, &b, &g]),
        &[1, 2],
        &[1.697056274847714, -1.131370849898476],
        1e-15,
    );
}

#[test]
fn matmul_epilogue_values() {
    // [[1, 2], [3, 4]] · [[1, 0], [0, -1]] = [[1, -2], [3, -4]]; + [0.5, 1] = [[1.5, -1], [3.5, -3]].
    let a = t64(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let b = t64(&[2, 2], &[1.0, 0.0, 0.0, -1.0]);
    let bias = t64(&[2], &[0.5, 1.0]);
    let with = |act| run(Op::MatMulEpilogue { bias: true, activation: act }, &[&a, &b, &bias]);
    close(
        &run(Op::MatMulEpilogue { bias: false, activation: Activation::None }, &[&a, &b]),
        &[2, 2],
        &[1.0, -2.0, 3.0, -4.0],
        0.0,
    );
    close(&with(Activation::None), &[2, 2], &[1.5, -1.0, 3.5, -3.0], 0.0);
    close(&with(Activation::Relu), &[2, 2], &[1.5, 0.0, 3.5, 0.0], 0.0);
    close(
        &with(Activation::Sigmoid),
        &[2, 2],
        &[0.8175744761936437, 0.2689414213699951, 0.9706877692486436, 0.04742587317756678],
        1e-15,
    );
    close(
        &with(Activation::Tanh),
        &[2, 2],
        &[0.9051482536448664, -0.7615941559557649, 0.9981778976111987, -0.9950547536867305],
        1e-15,
    );
    close(
        &with(Activation::Gelu(GeluApprox::Erf)),
        &[2, 2],
        &[1.399789198096713, -0.15865525393145707, 3.4991857982233756, -0.00404969409489031],
        1e-14,
    );
    close(
        &with(Activation::Gelu(GeluApprox::Tanh)),
        &[2, 2],
        &[1.3995715769802328, -0.15880800939172324, 3.499383802344626, -0.0036373920817729943],
        1e-14,
    );
    close(
        &with(Activation::Silu),
        &[2, 2],
        &[1.2263617142904655, -0.2689414213699951, 3.3974071923702525, -0.14227761953270035],
        1e-15,
    );
    // numpy rules: a 1-D left operand gives a 1-D result; a column bias broadcasts over rows.
    let v = t64(&[2], &[1.0, 2.0]);
    close(
        &run(Op::MatMulEpilogue { bias: true, activation: Activation::Relu }, &[&v, &b, &bias]),
        &[2],
        &[1.5, 0.0],
        0.0,
    );
    let col = t64(&[2, 1], &[10.0, 20.0]);
    close(
        &run(Op::MatMulEpilogue { bias: true, activation: Activation::None }, &[&a, &b, &col]),
        &[2, 2],
        &[11.0, 8.0, 23.0, 16.0],
        0.0,
    );
}

// ---------------------------------------------------------------------------------------
// equivalence with the primitive forms

#[test]
fn softmax_and_log_softmax_match_their_primitive_form() {
    for d in FLOATS {
        // Small, and large enough to take the parallel paths; every axis.
        for (shape, seed) in [(vec![3, 4, 5], 1), (vec![64, 600], 2), (vec![300, 4, 30], 3)] {
            for axis in 0..shape.len() {
                for log in [false, true] {
                    let mut g = G::new();
                    let x = g.input("x", &randn(&shape, seed, d));
                    let op = if log { Op::LogSoftmax { axis } } else { Op::Softmax { axis } };
                    let f = g.op(op, &[x]);
                    let p = prim_softmax(&mut g, x, axis, log);
                    let (f, p) = g.run(f, p);
                    assert_equivalent(&f, &p);
                }
            }
        }
    }
}

#[test]
fn norms_match_their_primitive_form() {
    for d in FLOATS {
        for (shape, seed) in [(vec![2, 3, 16], 11), (vec![300, 128], 12), (vec![5], 13)] {
            let n = *shape.last().unwrap();
            for affine in [false, true] {
                let mut g = G::new();
                let x = g.input("x", &randn(&shape, seed, d));
                let w = g.input("w", &randn(&[n], seed + 100, d));
                let b = g.input("b", &randn(&[n], seed + 200, d));
                let (ln, rn) = if affine {
                    (
                        g.op(Op::LayerNorm { eps: 1e-5, affine }, &[x, w, b]),
                        g.op(Op::RmsNorm { eps: 1e-6, affine }, &[x, w]),
                    )
                } else {
                    (
                        g.op(Op::LayerNorm { eps: 1e-5, affine }, &[x]),
                        g.op(Op::RmsNorm { eps: 1e-6, affine }, &[x]),
                    )
                };
                let (pw, pb) = if affine { (Some(w), Some(b)) } else { (None, None) };
                let pln = prim_layer_norm(&mut g, x, 1e-5, pw, pb);
                let prn = prim_rms_norm(&mut g, x, 1e-6, pw);
                g.g.add_output("rms_fused", rn);
                g.g.add_output("rms_prim", prn);
                let out = eval(&g.g, &g.b).unwrap();
                assert_equivalent(&out[0].1, &out[1].1);
                let (f, p) = g.run(ln, pln);
                assert_equivalent(&f, &p);
            }
        }
    }
}

#[test]
fn gelu_matches_its_primitive_form() {
    for d in FLOATS {
        for approx in [GeluApprox::Erf, GeluApprox::Tanh] {
            let mut g = G::new();
            let x = g.input("x", &randn(&[40_000], 21, d));
            let f = g.op(Op::Gelu { approx }, &[x]);
            let p = prim_gelu(&mut g, x, approx);
            let (f, p) = g.run(f, p);
            assert_equivalent(&f, &p);
        }
    }
}

/// One attention case: shapes of q, k, v and the mask (if any), and the causal flag.
struct AttnCase {
    q: Vec<usize>,
    k: Vec<usize>,
    v: Vec<usize>,
    mask: Option<Vec<usize>>,
    causal: bool,
}

fn attention_cases() -> Vec<AttnCase> {
    let c = |q: &[usize], k: &[usize], v: &[usize], mask: Option<&[usize]>, causal| AttnCase {
        q: q.to_vec(),
        k: k.to_vec(),
        v: v.to_vec(),
        mask: mask.map(|m| m.to_vec()),
        causal,
    };
    vec![
        c(&[5, 4], &[7, 4], &[7, 3], None, false),
        // Masked and causal, Sq ≠ Sk, batch axes, a padding-style mask [B, 1, 1, Sk].
        c(&[2, 3, 5, 4], &[2, 3, 7, 4], &[2, 3, 7, 6], Some(&[2, 1, 1, 7]), true),
        // Sq > Sk, a rank-2 mask [Sq, Sk], causal.
        c(&[2, 7, 8], &[2, 4, 8], &[2, 4, 3], Some(&[7, 4]), true),
        // A full-rank mask and a 1-D one.
        c(&[3, 4, 2], &[3, 6, 2], &[3, 6, 5], Some(&[3, 4, 6]), false),
        c(&[1, 2, 6, 4], &[1, 2, 6, 4], &[1, 2, 6, 4], Some(&[6]), true),
        // Large enough for the parallel path.
        c(&[2, 4, 32, 16], &[2, 4, 40, 16], &[2, 4, 40, 16], Some(&[2, 1, 32, 40]), true),
    ]
}

/// A mask of standard normal values with about one entry in five set to -inf.
fn rand_mask(shape: &[usize], seed: u64, d: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n as u64).map(|i| {
        if kiln_ir::rng::uniform(seed, 3, i) < 0.2 {
            f64::NEG_INFINITY
        } else {
            kiln_ir::rng::normal(seed, 4, i)
        }
    });
    Tensor::new(shape.to_vec(), Buffer::from_f64(d, v)).unwrap()
}

fn attention_pair(case: &AttnCase, d: DType, seed: u64, scaling: Scaling) -> (Tensor, Tensor) {
    let mut g = G::new();
    let q = g.input("q", &randn(&case.q, seed, d));
    let k = g.input("k", &randn(&case.k, seed + 1, d));
    let v = g.input("v", &randn(&case.v, seed + 2, d));
    let mask = case.mask.as_ref().map(|m| g.input("mask", &rand_mask(m, seed + 3, d)));
    let scale = match scaling {
        Scaling::Mul(s) => s,
        Scaling::Div(s) => 1.0 / s,
    };
    let mut operands = vec![q, k, v];
    operands.extend(mask);
    let f = g.op(Op::Attention { scale, causal: case.causal, masked: mask.is_some() }, &operands);
    let p = prim_attention(&mut g, q, k, v, mask, scaling, case.causal);
    g.run(f, p)
}

#[test]
fn attention_matches_its_primitive_form() {
    for d in FLOATS {
        for (i, case) in attention_cases().iter().enumerate() {
            let dk = *case.q.last().unwrap() as f64;
            // The form std.attention writes: scores / √d.
            let (f, p) = attention_pair(case, d, 100 + i as u64, Scaling::Div(dk.sqrt()));
            assert_equivalent(&f, &p);
            let (f, p) = attention_pair(case, d, 200 + i as u64, Scaling::Mul(0.3));
            assert_equivalent(&f, &p);
        }
    }
}

#[test]
fn add_norm_matches_its_primitive_form() {
    for d in FLOATS {
        for (a_shape, b_shape) in
            [(vec![2, 5, 16], vec![2, 5, 16]), (vec![2, 5, 16], vec![16]), (vec![5, 1], vec![2, 1, 7])]
        {
            let s =
                kiln_ir::broadcast_shapes("t", &kiln_ir::dims(&a_shape), &kiln_ir::dims(&b_shape)).unwrap();
            let n = s.last().and_then(kiln_ir::Dim::as_const).unwrap();
            for kind in [NormKind::Layer, NormKind::Rms] {
                for affine in [false, true] {
                    let mut g = G::new();
                    let a = g.input("a", &randn(&a_shape, 31, d));
                    let b = g.input("b", &randn(&b_shape, 32, d));
                    let w = g.input("w", &randn(&[n], 33, d));
                    let bb = g.input("bb", &randn(&[n], 34, d));
                    let mut operands = vec![a, b];
                    if affine {
                        operands.push(w);
                        if kind == NormKind::Layer {
                            operands.push(bb);
                        }
                    }
                    let f = g.op(Op::AddNorm { eps: 1e-5, kind, affine }, &operands);
                    let sum = g.bin(BinaryOp::Add, a, b);
                    let (pw, pb) = if affine { (Some(w), Some(bb)) } else { (None, None) };
                    let p = match kind {
                        NormKind::Layer => prim_layer_norm(&mut g, sum, 1e-5, pw, pb),
                        NormKind::Rms => prim_rms_norm(&mut g, sum, 1e-5, pw),
                    };
                    let (f, p) = g.run(f, p);
                    assert_equivalent(&f, &p);
                }
            }
        }
    }
}

#[test]
fn matmul_epilogue_matches_its_primitive_form() {
    // Shapes of a, b and the bias (if any).
    type Shapes<'a> = (&'a [usize], &'a [usize], Option<&'a [usize]>);
    let shapes: [Shapes; 4] = [
        (&[7, 5], &[5, 3], Some(&[3])),
        (&[2, 1, 4, 6], &[3, 6, 5], Some(&[3, 1, 5])),
        (&[6], &[2, 6, 4], None),
        (&[64, 96], &[96, 80], Some(&[64, 1])),
    ];
    for d in FLOATS {
        for (i, (ash, bsh, bias)) in shapes.iter().enumerate() {
            for act in Activation::ALL {
                let mut g = G::new();
                let a = g.input("a", &randn(ash, 40 + i as u64, d));
                let b = g.input("b", &randn(bsh, 50 + i as u64, d));
                let c = bias.map(|s| g.input("c", &randn(s, 60 + i as u64, d)));
                let mut operands = vec![a, b];
                operands.extend(c);
                let f = g.op(Op::MatMulEpilogue { bias: c.is_some(), activation: act }, &operands);
                let mut p = g.op(Op::MatMul, &[a, b]);
                if let Some(c) = c {
                    p = g.bin(BinaryOp::Add, p, c);
                }
                let p = prim_activation(&mut g, p, act);
                let (f, p) = g.run(f, p);
                assert_equivalent(&f, &p);
            }
        }
    }
}

/// Fused kernels follow their primitive form step by step, so in f32 and f64 they agree to
/// the bit when the primitive form is written in the same order (the std layers are).
#[test]
fn fused_ops_agree_bit_for_bit_with_the_same_primitive_steps() {
    for d in FLOATS {
        let mut g = G::new();
        let x = g.input("x", &randn(&[3, 4, 24], 71, d));
        let w = g.input("w", &randn(&[24], 72, d));
        let b = g.input("b", &randn(&[24], 73, d));
        let mut pairs = Vec::new();
        let f = g.op(Op::Softmax { axis: 1 }, &[x]);
        pairs.push((f, prim_softmax(&mut g, x, 1, false)));
        let f = g.op(Op::LogSoftmax { axis: 2 }, &[x]);
        pairs.push((f, prim_softmax(&mut g, x, 2, true)));
        let f = g.op(Op::LayerNorm { eps: 1e-5, affine: true }, &[x, w, b]);
        pairs.push((f, prim_layer_norm(&mut g, x, 1e-5, Some(w), Some(b))));
        let f = g.op(Op::RmsNorm { eps: 1e-6, affine: true }, &[x, w]);
        pairs.push((f, prim_rms_norm(&mut g, x, 1e-6, Some(w))));
        for approx in [GeluApprox::Erf, GeluApprox::Tanh] {
            let f = g.op(Op::Gelu { approx }, &[x]);
            pairs.push((f, prim_gelu(&mut g, x, approx)));
        }
        let f = g.op(Op::AddNorm { eps: 1e-5, kind: NormKind::Layer, affine: true }, &[x, b, w, b]);
        let s = g.bin(BinaryOp::Add, x, b);
        pairs.push((f, prim_layer_norm(&mut g, s, 1e-5, Some(w), Some(b))));
        let m = g.input("m", &randn(&[24, 6], 74, d));
        let c = g.input("c", &randn(&[6], 75, d));
        let f = g.op(
            Op::MatMulEpilogue { bias: true, activation: Activation::Gelu(GeluApprox::Tanh) },
            &[x, m, c],
        );
        let mm = g.op(Op::MatMul, &[x, m]);
        let mb = g.bin(BinaryOp::Add, mm, c);
        pairs.push((f, prim_gelu(&mut g, mb, GeluApprox::Tanh)));
        let v = g.input("v", &randn(&[3, 6, 5], 76, d));
        let k = g.input("k", &randn(&[3, 6, 24], 77, d));
        let mask = g.input("mask", &rand_mask(&[4, 6], 78, d));
        let f = g.op(Op::Attention { scale: 0.2, causal: true, masked: true }, &[x, k, v, mask]);
        pairs.push((f, prim_attention(&mut g, x, k, v, Some(mask), Scaling::Mul(0.2), true)));
        for (i, (f, p)) in pairs.iter().enumerate() {
            g.g.add_output(format!("f{i}"), *f);
            g.g.add_output(format!("p{i}"), *p);
        }
        let out = eval(&g.g, &g.b).unwrap();
        for pair in out.chunks(2) {
            let (f, p) = (&pair[0].1, &pair[1].1);
            let same = f
                .to_f64_vec()
                .iter()
                .zip(p.to_f64_vec())
                .all(|(a, b)| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()));
            assert!(same, "{d} {}: fused and primitive differ by {:e}", pair[0].0, rel_err(f, p));
        }
    }
}

/// f16 and bf16 widen exactly, compute in f32 and round once at the end.
#[test]
fn half_precision_computes_in_f32_and_rounds_once() {
    let ops_args: Vec<(Op, Vec<Vec<usize>>)> = vec![
        (Op::Softmax { axis: 1 }, vec![vec![3, 8]]),
        (Op::LogSoftmax { axis: 0 }, vec![vec![3, 8]]),
        (Op::LayerNorm { eps: 1e-5, affine: true }, vec![vec![3, 8], vec![8], vec![8]]),
        (Op::RmsNorm { eps: 1e-6, affine: false }, vec![vec![3, 8]]),
        (Op::Gelu { approx: GeluApprox::Tanh }, vec![vec![3, 8]]),
        (
            Op::Attention { scale: 0.5, causal: true, masked: true },
            vec![vec![2, 3, 8], vec![2, 5, 8], vec![2, 5, 4], vec![5]],
        ),
        (Op::AddNorm { eps: 1e-5, kind: NormKind::Rms, affine: true }, vec![vec![3, 8], vec![8], vec![8]]),
        (
            Op::MatMulEpilogue { bias: true, activation: Activation::Sigmoid },
            vec![vec![3, 8], vec![8, 2], vec![2]],
        ),
    ];
    for half in [DType::F16, DType::BF16] {
        for (op, shapes) in &ops_args {
            let args: Vec<Tensor> =
                shapes.iter().enumerate().map(|(i, s)| randn(s, 80 + i as u64, half)).collect();
            let refs: Vec<&Tensor> = args.iter().collect();
            let got = run(op.clone(), &refs);
            let wide: Vec<Tensor> = args.iter().map(|a| a.cast(DType::F32)).collect();
            let wrefs: Vec<&Tensor> = wide.iter().collect();
            let want = run(op.clone(), &wrefs).cast(half);
            assert_eq!(got, want, "{half} {}", op.name());
        }
    }
    // A concrete value: softmax of [0, 0] in f16 is exactly [0.5, 0.5].
    let x = Tensor::new(vec![2], Buffer::F16(vec![f16::ZERO; 2])).unwrap();
    assert_eq!(run(Op::Softmax { axis: 0 }, &[&x]).data, Buffer::F16(vec![f16::from_f32(0.5); 2]));
    let x = Tensor::new(vec![2], Buffer::BF16(vec![bf16::from_f32(3.0), bf16::from_f32(4.0)])).unwrap();
    let y = run(Op::RmsNorm { eps: 0.0, affine: false }, &[&x]);
    assert_eq!(
        y.data,
        Buffer::BF16(vec![bf16::from_f64(0.848528137423857), bf16::from_f64(1.131370849898476)])
    );
}

#[test]
fn results_do_not_depend_on_the_thread_count() {
    let case = &attention_cases()[5];
    let (a, _) = attention_pair(case, DType::F32, 9, Scaling::Mul(0.25));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (b, _) = pool.install(|| attention_pair(case, DType::F32, 9, Scaling::Mul(0.25)));
    assert_eq!(a, b);
}

// ---------------------------------------------------------------------------------------
// typing errors

#[track_caller]
fn type_err(op: Op, types: &[TensorType]) -> String {
    let refs: Vec<&TensorType> = types.iter().collect();
    match infer(&op, &refs) {
        Ok(t) => panic!("expected a typing error for {op:?}, got {t}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn typing_rules() {
    let f = |s: &[usize]| ty(DType::F32, s);
    let ok = |op: Op, types: &[TensorType]| {
        let refs: Vec<&TensorType> = types.iter().collect();
        infer(&op, &refs).unwrap_or_else(|e| panic!("{e}"))
    };
    assert_eq!(ok(Op::Softmax { axis: 0 }, &[f(&[3, 4])]), f(&[3, 4]));
    assert_eq!(
        ok(Op::LayerNorm { eps: 1e-5, affine: true }, &[f(&[2, 3, 4]), f(&[4]), f(&[4])]),
        f(&[2, 3, 4])
    );
    assert_eq!(
        ok(Op::AddNorm { eps: 1e-5, kind: NormKind::Rms, affine: true }, &[f(&[5, 1]), f(&[3]), f(&[3])]),
        f(&[5, 3])
    );
    let att = Op::Attention { scale: 1.0, causal: false, masked: true };
    assert_eq!(ok(att.clone(), &[f(&[2, 5, 4]), f(&[2, 7, 4]), f(&[2, 7, 3]), f(&[1, 1, 7])]), f(&[2, 5, 3]));
    assert_eq!(ok(att.clone(), &[f(&[5, 4]), f(&[7, 4]), f(&[7, 3]), f(&[])]), f(&[5, 3]));
    let mme = Op::MatMulEpilogue { bias: true, activation: Activation::Relu };
    assert_eq!(ok(mme.clone(), &[f(&[2, 5, 4]), f(&[4, 3]), f(&[5, 1])]), f(&[2, 5, 3]));
    assert_eq!(ok(Op::Gelu { approx: GeluApprox::Erf }, &[ty(DType::BF16, &[2])]), ty(DType::BF16, &[2]));
}

#[test]
fn typing_errors() {
    let f = |s: &[usize]| ty(DType::F32, s);
    let ln = Op::LayerNorm { eps: 1e-5, affine: true };
    // Wrong gamma / beta shapes, or dtypes.
    let e = type_err(ln.clone(), &[f(&[2, 8]), f(&[4]), f(&[8])]);
    assert_eq!(e, "`layer_norm`: gamma must have shape [8] (the last axis of [2, 8]), got [4]");
    let e = type_err(ln.clone(), &[f(&[2, 8]), f(&[8]), f(&[1, 8])]);
    assert!(e.contains("beta must have shape [8]"), "{e}");
    let e = type_err(ln.clone(), &[f(&[2, 8]), ty(DType::F64, &[8]), f(&[8])]);
    assert!(e.contains("operand dtypes differ"), "{e}");
    let e = type_err(Op::RmsNorm { eps: 1e-6, affine: true }, &[f(&[8, 2]), f(&[8])]);
    assert!(e.contains("gamma must have shape [2]"), "{e}");
    assert!(type_err(Op::RmsNorm { eps: 1e-6, affine: false }, &[f(&[])]).contains("scalar"));
    // The operand count follows the flags.
    let e = type_err(ln, &[f(&[2, 8])]);
    assert_eq!(e, "`layer_norm` takes 3 operand(s), got 1");
    let e = type_err(
        Op::AddNorm { eps: 1e-5, kind: NormKind::Rms, affine: true },
        &[f(&[8]), f(&[8]), f(&[8]), f(&[8])],
    );
    assert_eq!(e, "`add_norm` takes 3 operand(s), got 4");
    let e =
        type_err(Op::AddNorm { eps: 1e-5, kind: NormKind::Layer, affine: false }, &[f(&[2, 8]), f(&[3, 8])]);
    assert!(e.contains("do not broadcast"), "{e}");
    // Floats only.
    let e = type_err(Op::Softmax { axis: 0 }, &[ty(DType::I32, &[3])]);
    assert_eq!(e, "`softmax` needs floating-point operands, got i32");
    let e = type_err(Op::Gelu { approx: GeluApprox::Erf }, &[ty(DType::I64, &[3])]);
    assert!(e.contains("floating-point"), "{e}");
    let e = type_err(Op::LogSoftmax { axis: 2 }, &[f(&[3, 4])]);
    assert_eq!(e, "`log_softmax`: axis 2 out of range for rank 2");

    let att = |masked| Op::Attention { scale: 1.0, causal: true, masked };
    // Mismatched batch axes (no broadcasting among q, k, v).
    let e = type_err(att(false), &[f(&[2, 5, 4]), f(&[1, 7, 4]), f(&[2, 7, 3])]);
    assert_eq!(e, "`attention`: the batch axes of q, k and v differ: q [2, 5, 4], k [1, 7, 4], v [2, 7, 3]");
    let e = type_err(att(false), &[f(&[2, 5, 4]), f(&[2, 7, 4]), f(&[3, 7, 3])]);
    assert!(e.contains("batch axes"), "{e}");
    let e = type_err(att(false), &[f(&[2, 5, 4]), f(&[7, 4]), f(&[7, 3])]);
    assert!(e.contains("one rank"), "{e}");
    let e = type_err(att(false), &[f(&[4]), f(&[4]), f(&[4])]);
    assert!(e.contains("at least 2"), "{e}");
    let e = type_err(att(false), &[f(&[5, 4]), f(&[7, 3]), f(&[7, 3])]);
    assert!(e.contains("q and k differ in their last axis (4 vs 3)"), "{e}");
    let e = type_err(att(false), &[f(&[5, 4]), f(&[7, 4]), f(&[6, 3])]);
    assert!(e.contains("k and v differ in their sequence axis (7 vs 6)"), "{e}");
    let e = type_err(att(false), &[f(&[5, 4]), f(&[7, 4]), ty(DType::F64, &[7, 3])]);
    assert!(e.contains("operand dtypes differ"), "{e}");
    // Bad masks: not broadcasting, of higher rank than the scores, or of another dtype.
    let (q, k, v) = (f(&[2, 5, 4]), f(&[2, 7, 4]), f(&[2, 7, 3]));
    let e = type_err(att(true), &[q.clone(), k.clone(), v.clone(), f(&[5, 5])]);
    assert_eq!(
        e,
        "`attention`: the mask [5, 5] does not broadcast to the scores [2, 5, 7] (q [2, 5, 4], k [2, 7, 4])"
    );
    let e = type_err(att(true), &[q.clone(), k.clone(), v.clone(), f(&[1, 2, 5, 7])]);
    assert!(e.contains("does not broadcast to the scores"), "{e}");
    let e = type_err(att(true), &[q.clone(), k.clone(), v.clone(), ty(DType::Bool, &[7])]);
    assert!(e.contains("operand dtypes differ"), "{e}");
    assert_eq!(type_err(att(true), &[q, k, v]), "`attention` takes 4 operand(s), got 3");

    // The log-sum-exp of the same scores: q and k (no v), the mask, the result [.., Sq].
    let lse = |masked| Op::AttentionLse { scale: 1.0, causal: false, masked };
    let e = type_err(lse(false), &[f(&[2, 5, 4]), f(&[1, 7, 4])]);
    assert_eq!(e, "`attention_lse`: the batch axes of q and k differ: q [2, 5, 4], k [1, 7, 4]");
    let e = type_err(lse(false), &[f(&[5, 4]), f(&[7, 3])]);
    assert_eq!(e, "`attention_lse`: q and k differ in their last axis (4 vs 3): q [5, 4], k [7, 3]");
    let e = type_err(lse(true), &[f(&[2, 5, 4]), f(&[2, 7, 4]), f(&[5, 5])]);
    assert_eq!(
        e,
        "`attention_lse`: the mask [5, 5] does not broadcast to the scores [2, 5, 7] (q [2, 5, 4], k [2, 7, 4])"
    );
    assert_eq!(type_err(lse(true), &[f(&[5, 4]), f(&[7, 4])]), "`attention_lse` takes 3 operand(s), got 2");
    let t = infer(&lse(true), &[&f(&[2, 5, 4]), &f(&[2, 7, 4]), &f(&[1, 7])]).unwrap();
    assert_eq!(t, f(&[2, 5]));

    let mme = |bias| Op::MatMulEpilogue { bias, activation: Activation::None };
    let e = type_err(mme(true), &[f(&[2, 4]), f(&[4, 3]), f(&[2])]);
    assert_eq!(e, "`matmul_epilogue`: the bias [2] does not broadcast to the product's shape [2, 3]");
    let e = type_err(mme(false), &[f(&[2, 4]), f(&[5, 3])]);
    assert!(e.contains("inner dimensions differ"), "{e}");
    let e = type_err(mme(false), &[ty(DType::I32, &[2, 4]), ty(DType::I32, &[4, 3])]);
    assert!(e.contains("floating-point"), "{e}");
}

#[test]
fn eval_op_rechecks_the_operands() {
    let x = t32(&[2, 8], &[0.0; 16]);
    let g = t32(&[4], &[0.0; 4]);
    let op = Op::RmsNorm { eps: 1e-6, affine: true };
    let err = eval_op(&op, &[&x, &g], &ty(DType::F32, &[2, 8])).unwrap_err();
    assert!(matches!(err, EvalError::Infer(_)), "{err}");
}
