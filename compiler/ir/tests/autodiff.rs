//! Gradient checks: for every differentiable op, the gradient the autodiff appends is compared
//! in f64 with central differences computed through the interpreter, on small seeded random
//! operands (and, for the broadcasting binary ops, on random shapes with proptest). Then whole
//! graphs (a small MLP, a small attention block), the non-differentiable operands, and the
//! errors.

use kiln_ir::autodiff::check::numeric_gradient;
use kiln_ir::{
    eval, grad, verify, Activation, BinaryOp, Bindings, Buffer, CompareOp, DType, GeluApprox, GradError,
    Graph, Init, NodeId, NormKind, Op, PoolKind, ReduceOp, Tensor, UnaryOp,
};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------
// harness

/// An operand of the op under test.
enum Arg {
    /// A parameter of this shape with values uniform in `[lo, hi)`: its gradient is checked.
    P(Vec<usize>, f64, f64),
    /// A fixed value (indices, conditions, an operand not checked).
    Fixed(Tensor),
}

fn p(shape: &[usize]) -> Arg {
    Arg::P(shape.to_vec(), -2.0, 2.0)
}

/// Positive values (for log, sqrt, a divisor, a power's base).
fn pos(shape: &[usize]) -> Arg {
    Arg::P(shape.to_vec(), 0.5, 2.0)
}

fn uniform(shape: &[usize], lo: f64, hi: f64, seed: u64, stream: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v = (0..n as u64).map(|i| lo + (hi - lo) * kiln_ir::rng::uniform(seed, stream, i)).collect();
    Tensor::from_f64(shape.to_vec(), v).unwrap()
}

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
    g.add(
        Op::Param { name: name.into(), dtype: DType::F64, shape: kiln_ir::dims(shape), init: Init::Zeros },
        &[],
    )
    .unwrap()
}

fn konst(g: &mut Graph, t: Tensor) -> NodeId {
    g.add(Op::Const { value: t }, &[]).unwrap()
}

/// `Σ y · w` for fixed random weights `w` of `y`'s type: a scalar whose gradient with respect
/// to `y` is `w`, so every element of `y` is checked with a different weight.
fn weighted_sum(g: &mut Graph, y: NodeId, seed: u64) -> NodeId {
    let ty = g.ty(y).clone();
    let w = uniform(&ty.static_shape(), -1.0, 1.0, seed, 99).cast(ty.dtype);
    let w = konst(g, w);
    let prod = g.add(Op::Binary(BinaryOp::Mul), &[y, w]).unwrap();
    let axes: Vec<usize> = (0..ty.rank()).collect();
    if axes.is_empty() {
        return prod;
    }
    g.add(Op::Reduce { op: ReduceOp::Sum, axes, keepdims: false }, &[prod]).unwrap()
}

/// Appends the gradients of output `loss` with respect to `params` as outputs `grad.NAME`,
/// then compares each with central differences (step `h`, tolerance `tol` relative to
/// `1 + |numeric|`).
#[track_caller]
fn check_graph(g: &mut Graph, loss: NodeId, params: &[NodeId], b: &Bindings, h: f64, tol: f64) {
    g.add_output("loss", loss);
    let grads = grad(g, loss, params).unwrap_or_else(|e| panic!("{e}"));
    for (name, id) in &grads {
        g.add_output(format!("grad.{name}"), *id);
    }
    verify(g).unwrap_or_else(|e| panic!("{e}"));
    let out = eval(g, b).unwrap_or_else(|e| panic!("{e}"));
    for (name, _) in &grads {
        let analytic = &out.iter().find(|(n, _)| *n == format!("grad.{name}")).unwrap().1;
        let numeric = numeric_gradient(g, "loss", b, name, h).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(analytic.shape, numeric.shape, "gradient shape of {name}");
        let (a, n) = (analytic.to_f64_vec(), numeric.to_f64_vec());
        for (i, (a, n)) in a.iter().zip(&n).enumerate() {
            assert!(
                (a - n).abs() <= tol * (1.0 + n.abs()),
                "{}: d loss / d {name}[{i}]: autodiff {a}, central differences {n}\nautodiff {analytic:?}\nnumeric {numeric:?}",
                g.name
            );
        }
    }
}

/// Checks `op` applied to `args` (see [`Arg`]) with step `h` and tolerance `tol`.
#[track_caller]
fn check_with(op: Op, args: Vec<Arg>, h: f64, tol: f64) {
    let mut g = Graph::new(format!("{op:?}"));
    let mut b = Bindings::default();
    let mut ids = Vec::new();
    let mut params = Vec::new();
    for (i, a) in args.into_iter().enumerate() {
        ids.push(match a {
            Arg::P(shape, lo, hi) => {
                let name = format!("p{i}");
                let id = param(&mut g, &name, &shape);
                b.params.insert(name, uniform(&shape, lo, hi, 7, i as u64));
                params.push(id);
                id
            }
            Arg::Fixed(t) => konst(&mut g, t),
        });
    }
    let y = g.add(op, &ids).unwrap_or_else(|e| panic!("{e}"));
    let loss = weighted_sum(&mut g, y, 3);
    check_graph(&mut g, loss, &params, &b, h, tol);
}

#[track_caller]
fn check(op: Op, args: Vec<Arg>) {
    check_with(op, args, 1e-6, 1e-6);
}

fn i64s(shape: &[usize], v: &[i64]) -> Tensor {
    Tensor::new(shape.to_vec(), Buffer::I64(v.to_vec())).unwrap()
}

// ---------------------------------------------------------------------------------------
// primitives

#[test]
fn unary_ops() {
    for u in UnaryOp::ALL {
        let arg = match u {
            UnaryOp::Log | UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Recip => pos(&[2, 3]),
            UnaryOp::Neg
            | UnaryOp::Abs
            | UnaryOp::Exp
            | UnaryOp::Tanh
            | UnaryOp::Erf
            | UnaryOp::Sin
            | UnaryOp::Cos
            | UnaryOp::Sigmoid
            | UnaryOp::Relu => p(&[2, 3]),
        };
        check(Op::Unary(u), vec![arg]);
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let shapes: [(&[usize], &[usize]); 4] =
        [(&[2, 3], &[2, 3]), (&[2, 3], &[3]), (&[4, 1, 3], &[2, 1]), (&[], &[2, 2])];
    for b in BinaryOp::ALL {
        for (sa, sb) in shapes {
            let args = match b {
                BinaryOp::Pow => vec![pos(sa), p(sb)],
                BinaryOp::Div => vec![p(sa), pos(sb)],
                BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min => {
                    vec![p(sa), p(sb)]
                }
            };
            check(Op::Binary(b), args);
        }
    }
}

#[test]
fn max_and_min_split_a_tie_in_half() {
    for b in [BinaryOp::Max, BinaryOp::Min] {
        // max(x, x) = x: each operand gets half, the sum is 1.
        let mut g = Graph::new("tie");
        let x = param(&mut g, "x", &[3]);
        let y = g.add(Op::Binary(b), &[x, x]).unwrap();
        let loss = weighted_sum(&mut g, y, 1);
        let mut bind = Bindings::default();
        bind.params.insert("x".into(), uniform(&[3], -1.0, 1.0, 1, 1));
        check_graph(&mut g, loss, &[x], &bind, 1e-6, 1e-6);
    }
}

#[test]
fn where_sends_the_gradient_to_the_chosen_operand() {
    let cond = Tensor::new(vec![2, 1, 3], Buffer::Bool(vec![true, false, true, false, false, true])).unwrap();
    check(Op::Where, vec![Arg::Fixed(cond), p(&[2, 4, 3]), p(&[3])]);
}

#[test]
fn casts_between_floats() {
    check(Op::Cast { to: DType::F64 }, vec![p(&[2, 3])]);
    // Through f32 and back: f32 rounding needs a large step (the function is linear).
    let mut g = Graph::new("cast f32");
    let x = param(&mut g, "x", &[2, 3]);
    let n = g.add(Op::Cast { to: DType::F32 }, &[x]).unwrap();
    let y = g.add(Op::Cast { to: DType::F64 }, &[n]).unwrap();
    let loss = weighted_sum(&mut g, y, 2);
    let mut b = Bindings::default();
    b.params.insert("x".into(), uniform(&[2, 3], -2.0, 2.0, 1, 1));
    check_graph(&mut g, loss, &[x], &b, 1e-2, 1e-4);
}

#[test]
fn reductions() {
    for op in [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min] {
        for axes in [vec![0], vec![1], vec![0, 2], vec![0, 1, 2]] {
            for keepdims in [false, true] {
                check(Op::Reduce { op, axes: axes.clone(), keepdims }, vec![p(&[2, 3, 4])]);
            }
        }
    }
}

#[test]
fn reduce_max_splits_ties_evenly() {
    let mut g = Graph::new("max ties");
    let x = param(&mut g, "x", &[4]);
    let y = g.add(Op::Reduce { op: ReduceOp::Max, axes: vec![0], keepdims: false }, &[x]).unwrap();
    g.add_output("y", y);
    let gx = grad(&mut g, y, &[x]).unwrap()[0].1;
    g.add_output("g", gx);
    let mut b = Bindings::default();
    b.params.insert("x".into(), Tensor::from_f64(vec![4], vec![1.0, 3.0, 3.0, 2.0]).unwrap());
    let out = eval(&g, &b).unwrap();
    assert_eq!(out[1].1.to_f64_vec(), vec![0.0, 0.5, 0.5, 0.0]);
}

#[test]
fn layout_ops() {
    check(Op::Reshape { shape: kiln_ir::dims(&[6, 4]) }, vec![p(&[2, 3, 4])]);
    check(Op::Transpose { perm: vec![2, 0, 1] }, vec![p(&[2, 3, 4])]);
    check(Op::BroadcastTo { shape: kiln_ir::dims(&[2, 3, 4]) }, vec![p(&[3, 1])]);
    for (axis, start, end, step) in
        [(1, 1, 7, 2), (1, 0, 7, 3), (0, 1, 3, 1), (1, 2, 6, 4), (1, 3, 3, 1), (1, 6, 7, 5)]
    {
        check(Op::Slice { axis, start: start.into(), end: end.into(), step }, vec![p(&[3, 7])]);
    }
    check(Op::Concat { axis: 1 }, vec![p(&[2, 1]), p(&[2, 3]), p(&[2, 2])]);
    check(Op::Concat { axis: 0 }, vec![p(&[1, 2]), Arg::Fixed(uniform(&[2, 2], 0.0, 1.0, 1, 1)), p(&[3, 2])]);
    check(Op::Pad { pads: vec![(1, 0), (2, 1)], value: 0.5 }, vec![p(&[2, 3])]);
}

#[test]
fn gather_scatters_into_the_table() {
    // Embedding lookup with a repeated row: that row gets the sum of both gradients.
    check(Op::Gather { axis: 0 }, vec![p(&[5, 3]), Arg::Fixed(i64s(&[4], &[1, 3, 1, 4]))]);
    check(Op::Gather { axis: 1 }, vec![p(&[2, 4, 3]), Arg::Fixed(i64s(&[2, 2], &[0, 3, 3, 2]))]);
    check(Op::Gather { axis: 2 }, vec![p(&[2, 2, 3]), Arg::Fixed(i64s(&[], &[2]))]);
}

#[test]
fn scatter_add_gathers_back() {
    check(Op::ScatterAdd { axis: 0, extent: 5 }, vec![p(&[4, 3]), Arg::Fixed(i64s(&[4], &[1, 3, 1, 4]))]);
    check(
        Op::ScatterAdd { axis: 1, extent: 4 },
        vec![p(&[2, 2, 2, 3]), Arg::Fixed(i64s(&[2, 2], &[0, 3, 3, 2]))],
    );
}

/// `⟨gather(t, i), u⟩` and `⟨t, scatter_add(u, i)⟩` in f64, for a table of `table` shape
/// gathered along `axis` by indices of `idx_shape` drawn from `seed`.
fn adjoint_sides(table: &[usize], axis: usize, idx_shape: &[usize], seed: u64) -> (f64, f64) {
    let extent = table[axis];
    let n: usize = idx_shape.iter().product();
    let idx: Vec<i64> =
        (0..n as u64).map(|k| (kiln_ir::rng::uniform(seed, 7, k) * extent as f64) as i64).collect();
    let idx = i64s(idx_shape, &idx);
    let t = uniform(table, -1.0, 1.0, seed, 1);
    let run = |op: Op, args: &[&Tensor]| {
        let types: Vec<kiln_ir::TensorType> =
            args.iter().map(|a| kiln_ir::TensorType::new(a.dtype(), a.shape.clone())).collect();
        let refs: Vec<&kiln_ir::TensorType> = types.iter().collect();
        let ty = kiln_ir::infer(&op, &refs).unwrap();
        kiln_ir::eval_op(&op, args, &ty).unwrap()
    };
    let y = run(Op::Gather { axis }, &[&t, &idx]);
    let u = uniform(&y.shape, -1.0, 1.0, seed, 2);
    let s = run(Op::ScatterAdd { axis, extent }, &[&u, &idx]);
    assert_eq!(s.shape, t.shape);
    let dot =
        |a: &Tensor, b: &Tensor| a.to_f64_vec().iter().zip(b.to_f64_vec()).map(|(x, y)| x * y).sum::<f64>();
    (dot(&y, &u), dot(&t, &s))
}

#[test]
fn matmul_with_promotion_and_batch_broadcasting() {
    let cases: [(&[usize], &[usize]); 7] = [
        (&[2, 3], &[3, 4]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[3], &[3, 4]),
        (&[2, 3], &[3]),
        (&[3], &[3]),
        (&[2, 2, 3], &[3, 2]),
        (&[3], &[2, 3, 4]),
    ];
    for (a, b) in cases {
        check(Op::MatMul, vec![p(a), p(b)]);
    }
}

#[test]
fn conv2d() {
    let conv = |stride, padding, dilation, groups| Op::Conv2d { stride, padding, dilation, groups };
    check(conv([1, 1], [0, 0], [1, 1], 1), vec![p(&[2, 3, 5, 5]), p(&[4, 3, 3, 3])]);
    check(conv([2, 2], [1, 1], [1, 1], 1), vec![p(&[1, 2, 5, 6]), p(&[3, 2, 3, 3])]);
    check(conv([1, 2], [2, 1], [2, 1], 1), vec![p(&[1, 2, 5, 6]), p(&[2, 2, 3, 2])]);
    check(conv([1, 1], [0, 1], [1, 1], 3), vec![p(&[1, 6, 4, 5]), p(&[3, 2, 2, 3])]);
    check(conv([1, 1], [1, 1], [1, 1], 3), vec![p(&[2, 3, 4, 4]), p(&[6, 1, 3, 3])]);
    check(conv([3, 1], [0, 0], [1, 1], 1), vec![p(&[1, 2, 7, 3]), p(&[2, 2, 1, 1])]);
    // The input alone (a fixed kernel) and the kernel alone (a fixed input).
    check(
        conv([1, 1], [1, 1], [1, 1], 1),
        vec![p(&[1, 2, 4, 4]), Arg::Fixed(uniform(&[3, 2, 3, 3], -1.0, 1.0, 2, 2))],
    );
    check(
        conv([2, 1], [0, 0], [1, 1], 1),
        vec![Arg::Fixed(uniform(&[1, 2, 5, 4], -1.0, 1.0, 2, 2)), p(&[3, 2, 2, 2])],
    );
}

#[test]
fn pooling() {
    for kind in [PoolKind::Max, PoolKind::Avg] {
        let pool = |kernel, stride, padding| Op::Pool2d { kind, kernel, stride, padding };
        check(pool([2, 2], [2, 2], [0, 0]), vec![p(&[2, 2, 4, 6])]);
        check(pool([3, 3], [1, 2], [1, 1]), vec![p(&[1, 2, 5, 5])]);
        check(pool([3, 2], [2, 1], [1, 0]), vec![p(&[1, 1, 6, 4])]);
        check(pool([2, 2], [1, 1], [1, 1]), vec![p(&[1, 1, 3, 3])]);
    }
}

#[test]
fn max_pool_gives_a_tie_to_the_first_tap() {
    let mut g = Graph::new("max pool tie");
    let x = param(&mut g, "x", &[1, 1, 2, 4]);
    let op = Op::Pool2d { kind: PoolKind::Max, kernel: [2, 2], stride: [2, 2], padding: [0, 0] };
    let y = g.add(op, &[x]).unwrap();
    let loss =
        g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0, 1, 2, 3], keepdims: false }, &[y]).unwrap();
    let gx = grad(&mut g, loss, &[x]).unwrap()[0].1;
    g.add_output("g", gx);
    let mut b = Bindings::default();
    b.params.insert(
        "x".into(),
        Tensor::from_f64(vec![1, 1, 2, 4], vec![1.0, 1.0, 0.0, 2.0, 1.0, 1.0, 2.0, 0.0]).unwrap(),
    );
    assert_eq!(eval(&g, &b).unwrap()[0].1.to_f64_vec(), vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
}

// ---------------------------------------------------------------------------------------
// fused ops

#[test]
fn softmax_and_log_softmax() {
    for axis in [0, 1, 2] {
        check(Op::Softmax { axis }, vec![p(&[2, 3, 4])]);
        check(Op::LogSoftmax { axis }, vec![p(&[2, 3, 4])]);
    }
}

#[test]
fn norms() {
    for eps in [1e-5, 0.1] {
        check(Op::LayerNorm { eps, affine: false }, vec![p(&[2, 3, 5])]);
        check(Op::LayerNorm { eps, affine: true }, vec![p(&[2, 3, 5]), p(&[5]), p(&[5])]);
        check(Op::RmsNorm { eps, affine: false }, vec![p(&[2, 3, 5])]);
        check(Op::RmsNorm { eps, affine: true }, vec![p(&[2, 3, 5]), p(&[5])]);
        check(Op::LayerNorm { eps, affine: true }, vec![p(&[5]), p(&[5]), p(&[5])]);
    }
}

#[test]
fn add_norm() {
    let add = |kind, affine| Op::AddNorm { eps: 1e-5, kind, affine };
    check(add(NormKind::Layer, false), vec![p(&[2, 3, 4]), p(&[2, 3, 4])]);
    check(add(NormKind::Layer, true), vec![p(&[2, 3, 4]), p(&[4]), p(&[4]), p(&[4])]);
    check(add(NormKind::Rms, true), vec![p(&[3, 4]), p(&[2, 1, 4]), p(&[4])]);
    check(add(NormKind::Rms, false), vec![p(&[1, 4]), p(&[3, 1])]);
}

#[test]
fn gelu() {
    for approx in [GeluApprox::Erf, GeluApprox::Tanh] {
        check(Op::Gelu { approx }, vec![Arg::P(vec![3, 4], -4.0, 4.0)]);
    }
}

#[test]
fn attention() {
    let (q, k, v) = (&[2, 3, 4][..], &[2, 5, 4][..], &[2, 5, 2][..]);
    for causal in [false, true] {
        check(Op::Attention { scale: 0.5, causal, masked: false }, vec![p(q), p(k), p(v)]);
        check(Op::Attention { scale: 0.5, causal, masked: true }, vec![p(q), p(k), p(v), p(&[1, 5])]);
    }
    // Four-dimensional heads, a mask per query row.
    check(
        Op::Attention { scale: 0.7, causal: true, masked: true },
        vec![p(&[1, 2, 3, 2]), p(&[1, 2, 3, 2]), p(&[1, 2, 3, 3]), p(&[1, 1, 3, 3])],
    );
}

#[test]
fn attention_lse() {
    let (q, k) = (&[2, 3, 4][..], &[2, 5, 4][..]);
    for causal in [false, true] {
        check(Op::AttentionLse { scale: 0.5, causal, masked: false }, vec![p(q), p(k)]);
        check(Op::AttentionLse { scale: 0.5, causal, masked: true }, vec![p(q), p(k), p(&[1, 5])]);
    }
    check(
        Op::AttentionLse { scale: 0.7, causal: true, masked: true },
        vec![p(&[1, 2, 3, 2]), p(&[1, 2, 3, 2]), p(&[1, 1, 3, 3])],
    );
}

/// Attention's backward reads the log-sum-exp of its scores (one `attention_lse` of the same
/// operands and attributes) instead of a second softmax over them.
#[test]
fn attention_backward_reads_the_log_sum_exp() {
    for (causal, masked) in [(false, false), (true, false), (false, true), (true, true)] {
        let mut g = Graph::new("att");
        let q = param(&mut g, "q", &[2, 3, 4]);
        let k = param(&mut g, "k", &[2, 5, 4]);
        let v = param(&mut g, "v", &[2, 5, 2]);
        let mut operands = vec![q, k, v];
        if masked {
            operands.push(param(&mut g, "mask", &[1, 5]));
        }
        let y = g.add(Op::Attention { scale: 0.5, causal, masked }, &operands).unwrap();
        let loss = weighted_sum(&mut g, y, 3);
        let grads = grad(&mut g, loss, &operands).unwrap();
        for (name, id) in &grads {
            g.add_output(format!("grad.{name}"), *id);
        }
        let ops = |want: &dyn Fn(&Op) -> bool| g.node_ids().filter(|&n| want(&g.node(n).op)).count();
        let lse = Op::AttentionLse { scale: 0.5, causal, masked };
        assert_eq!(ops(&|o| *o == lse), 1, "causal {causal}, masked {masked}");
        assert_eq!(ops(&|o| matches!(o, Op::Softmax { .. })), 0);
        let lse_node = g.node_ids().find(|&n| g.node(n).op == lse).unwrap();
        assert_eq!(
            g.operands(lse_node),
            operands[..2].iter().chain(operands.get(3)).copied().collect::<Vec<_>>()
        );
    }
}

/// `attention_lse` is `log Σ exp` of the scores the primitives form, in f64; `−inf` for a
/// row that sees no key.
#[test]
fn attention_lse_is_the_log_sum_exp_of_the_scores() {
    let mut g = Graph::new("lse");
    let q = konst(&mut g, Tensor::from_f64(vec![2, 2], vec![1.0, 0.0, 0.0, 2.0]).unwrap());
    let k = konst(&mut g, Tensor::from_f64(vec![3, 2], vec![1.0, 1.0, 0.0, 1.0, 2.0, 0.0]).unwrap());
    let mask = konst(
        &mut g,
        Tensor::from_f64(vec![2, 3], vec![0.0, 0.0, 0.0, f64::NEG_INFINITY, f64::NEG_INFINITY, -1.0])
            .unwrap(),
    );
    let lse = g.add(Op::AttentionLse { scale: 0.5, causal: false, masked: true }, &[q, k, mask]).unwrap();
    let causal = g.add(Op::AttentionLse { scale: 0.5, causal: true, masked: true }, &[q, k, mask]).unwrap();
    g.add_output("lse", lse);
    g.add_output("causal", causal);
    let out = eval(&g, &Bindings::default()).unwrap();
    // Row 0: scores 0.5·(1, 0, 2), max 1 → 1 + log(e^−0.5 + e^−1 + 1); row 1: (−inf, −inf,
    // 0 − 1).
    let row0 = 1.0 + ((-0.5f64).exp() + (-1f64).exp() + 1.0).ln();
    assert_eq!(out[0].1.to_f64_vec(), vec![row0, -1.0]);
    assert_eq!(g.ty(lse).static_shape(), vec![2]);
    // Causal: row 0 sees key 0 only (0.5), row 1 keys 0 and 1, both hidden by the mask.
    assert_eq!(out[1].1.to_f64_vec(), vec![0.5, f64::NEG_INFINITY]);
}

#[test]
fn matmul_epilogue() {
    for activation in Activation::ALL {
        check(Op::MatMulEpilogue { bias: true, activation }, vec![p(&[2, 3]), p(&[3, 4]), p(&[4])]);
        check(Op::MatMulEpilogue { bias: false, activation }, vec![p(&[2, 2, 3]), p(&[3, 4])]);
    }
}

// ---------------------------------------------------------------------------------------
// random broadcasting shapes

/// Two shapes that broadcast: a random result shape, each operand dropping leading axes or
/// setting extents to 1 at random.
fn broadcasting_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
    (prop::collection::vec(1usize..4, 0..4), any::<u64>()).prop_map(|(out, bits)| {
        let mut k = bits;
        let mut operand = || {
            let drop = (k % (out.len() as u64 + 1)) as usize;
            k /= 5;
            out[drop..]
                .iter()
                .map(|&d| {
                    k = k.rotate_right(1);
                    if k & 1 == 1 {
                        1
                    } else {
                        d
                    }
                })
                .collect::<Vec<_>>()
        };
        (operand(), operand())
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn binary_ops_on_random_broadcast_shapes((sa, sb) in broadcasting_pair(), which in 0usize..7) {
        let b = BinaryOp::ALL[which];
        let args = match b {
            BinaryOp::Pow => vec![pos(&sa), p(&sb)],
            BinaryOp::Div => vec![p(&sa), pos(&sb)],
            BinaryOp::Add | BinaryOp::Sub | BinaryOp::Mul | BinaryOp::Max | BinaryOp::Min => vec![p(&sa), p(&sb)],
        };
        check(Op::Binary(b), args);
    }

    #[test]
    fn reductions_over_random_axes(shape in prop::collection::vec(1usize..4, 1..4), mask in any::<u8>(), which in 0usize..4, keepdims in any::<bool>()) {
        let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max, ReduceOp::Min][which];
        let axes: Vec<usize> = (0..shape.len()).filter(|i| mask >> i & 1 == 1).collect();
        check(Op::Reduce { op, axes, keepdims }, vec![p(&shape)]);
    }

    /// `scatter_add` is the adjoint of `gather`: ⟨gather(t, i), u⟩ = ⟨t, scatter_add(u, i)⟩.
    #[test]
    fn scatter_add_is_the_adjoint_of_gather(
        table in prop::collection::vec(1usize..5, 1..4),
        axis_pick in 0usize..3,
        idx_shape in prop::collection::vec(1usize..4, 0..3),
        seed in any::<u64>(),
    ) {
        let axis = axis_pick % table.len();
        let (lhs, rhs) = adjoint_sides(&table, axis, &idx_shape, seed);
        prop_assert!((lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs()), "{lhs} vs {rhs}");
    }
}

// ---------------------------------------------------------------------------------------
// whole graphs

/// A two-layer MLP with a cross-entropy loss on one-hot labels, all in primitives.
#[test]
fn mlp_gradients_match_central_differences() {
    let mut g = Graph::new("mlp");
    let x = konst(&mut g, uniform(&[4, 5], -1.0, 1.0, 11, 0));
    let (w1, b1, w2, b2) = (
        param(&mut g, "w1", &[5, 6]),
        param(&mut g, "b1", &[6]),
        param(&mut g, "w2", &[6, 3]),
        param(&mut g, "b2", &[3]),
    );
    let h = g.add(Op::MatMul, &[x, w1]).unwrap();
    let h = g.add(Op::Binary(BinaryOp::Add), &[h, b1]).unwrap();
    let h = g.add(Op::Unary(UnaryOp::Relu), &[h]).unwrap();
    let z = g.add(Op::MatMul, &[h, w2]).unwrap();
    let z = g.add(Op::Binary(BinaryOp::Add), &[z, b2]).unwrap();
    let logp = g.add(Op::LogSoftmax { axis: 1 }, &[z]).unwrap();
    // One-hot labels from integer labels through iota and a comparison (not differentiable).
    let labels = konst(&mut g, i64s(&[4, 1], &[0, 2, 1, 2]));
    let classes = g.add(Op::Iota { dtype: DType::I64, shape: kiln_ir::dims(&[1, 3]), axis: 1 }, &[]).unwrap();
    let hit = g.add(Op::Compare(CompareOp::Eq), &[labels, classes]).unwrap();
    let onehot = g.add(Op::Cast { to: DType::F64 }, &[hit]).unwrap();
    let picked = g.add(Op::Binary(BinaryOp::Mul), &[logp, onehot]).unwrap();
    let nll = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdims: false }, &[picked]).unwrap();
    let mean = g.add(Op::Reduce { op: ReduceOp::Mean, axes: vec![0], keepdims: false }, &[nll]).unwrap();
    let loss = g.add(Op::Unary(UnaryOp::Neg), &[mean]).unwrap();
    let mut b = Bindings::default();
    for (i, (name, shape)) in
        [("w1", vec![5, 6]), ("b1", vec![6]), ("w2", vec![6, 3]), ("b2", vec![3])].into_iter().enumerate()
    {
        b.params.insert(name.into(), uniform(&shape, -1.0, 1.0, 12, i as u64));
    }
    check_graph(&mut g, loss, &[w1, b1, w2, b2], &b, 1e-6, 1e-6);
}

/// A pre-norm transformer block: layer norm, q/k/v projections split into heads, causal
/// attention, output projection and residual, then a GELU feed-forward through a fused
/// matmul epilogue and a second residual.
#[test]
fn attention_block_gradients_match_central_differences() {
    let (batch, seq, d, heads) = (2, 3, 4, 2);
    let dh = d / heads;
    let mut g = Graph::new("attention block");
    let x = konst(&mut g, uniform(&[batch, seq, d], -1.0, 1.0, 21, 0));
    let names: [(&str, Vec<usize>); 9] = [
        ("gamma", vec![d]),
        ("beta", vec![d]),
        ("wq", vec![d, d]),
        ("wk", vec![d, d]),
        ("wv", vec![d, d]),
        ("wo", vec![d, d]),
        ("w1", vec![d, 6]),
        ("b1", vec![6]),
        ("w2", vec![6, d]),
    ];
    let mut b = Bindings::default();
    let mut ps = Vec::new();
    for (i, (name, shape)) in names.iter().enumerate() {
        ps.push(param(&mut g, name, shape));
        b.params.insert(name.to_string(), uniform(shape, -1.0, 1.0, 22, i as u64));
    }
    let add = |g: &mut Graph, op: Op, args: &[NodeId]| g.add(op, args).unwrap();
    let h = add(&mut g, Op::LayerNorm { eps: 1e-5, affine: true }, &[x, ps[0], ps[1]]);
    let split = |g: &mut Graph, w: NodeId| {
        let t = add(g, Op::MatMul, &[h, w]);
        let t = add(g, Op::Reshape { shape: kiln_ir::dims(&[batch, seq, heads, dh]) }, &[t]);
        add(g, Op::Transpose { perm: vec![0, 2, 1, 3] }, &[t])
    };
    let (q, k, v) = (split(&mut g, ps[2]), split(&mut g, ps[3]), split(&mut g, ps[4]));
    let a = add(
        &mut g,
        Op::Attention { scale: 1.0 / (dh as f64).sqrt(), causal: true, masked: false },
        &[q, k, v],
    );
    let a = add(&mut g, Op::Transpose { perm: vec![0, 2, 1, 3] }, &[a]);
    let a = add(&mut g, Op::Reshape { shape: kiln_ir::dims(&[batch, seq, d]) }, &[a]);
    let a = add(&mut g, Op::MatMul, &[a, ps[5]]);
    let r = add(&mut g, Op::Binary(BinaryOp::Add), &[x, a]);
    let f = add(
        &mut g,
        Op::MatMulEpilogue { bias: true, activation: Activation::Gelu(GeluApprox::Tanh) },
        &[r, ps[6], ps[7]],
    );
    let f = add(&mut g, Op::MatMul, &[f, ps[8]]);
    let out = add(&mut g, Op::Binary(BinaryOp::Add), &[r, f]);
    let loss = weighted_sum(&mut g, out, 23);
    check_graph(&mut g, loss, &ps, &b, 1e-6, 1e-6);
}

// ---------------------------------------------------------------------------------------
// non-differentiable values and errors

#[test]
fn nothing_flows_through_comparisons_indices_and_integers() {
    // loss = Σ x · cast(x > 0) + Σ cast(cast(x, i64), f64): the mask and the integer path
    // are constants to the gradient, which is the mask.
    let mut g = Graph::new("nondiff");
    let x = param(&mut g, "x", &[5]);
    let zero = g.add(Op::Full { value: 0.0, dtype: DType::F64, shape: kiln_ir::dims(&[]) }, &[]).unwrap();
    let gt = g.add(Op::Compare(CompareOp::Gt), &[x, zero]).unwrap();
    let m = g.add(Op::Cast { to: DType::F64 }, &[gt]).unwrap();
    let xm = g.add(Op::Binary(BinaryOp::Mul), &[x, m]).unwrap();
    let xi = g.add(Op::Cast { to: DType::I64 }, &[x]).unwrap();
    let xf = g.add(Op::Cast { to: DType::F64 }, &[xi]).unwrap();
    let s = g.add(Op::Binary(BinaryOp::Add), &[xm, xf]).unwrap();
    let loss = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdims: false }, &[s]).unwrap();
    let gx = grad(&mut g, loss, &[x]).unwrap()[0].1;
    g.add_output("g", gx);
    let mut b = Bindings::default();
    b.params.insert("x".into(), Tensor::from_f64(vec![5], vec![-1.5, 0.5, 2.5, -0.2, 1.0]).unwrap());
    assert_eq!(eval(&g, &b).unwrap()[0].1.to_f64_vec(), vec![0.0, 1.0, 1.0, 0.0, 1.0]);
}

#[test]
fn a_parameter_the_loss_does_not_read_gets_zeros() {
    let mut g = Graph::new("unused");
    let x = param(&mut g, "x", &[2]);
    let unused = param(&mut g, "unused", &[3, 2]);
    let loss = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdims: false }, &[x]).unwrap();
    let grads = grad(&mut g, loss, &[x, unused]).unwrap();
    assert_eq!(grads.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["x", "unused"]);
    assert_eq!(
        g.node(grads[1].1).op,
        Op::Full { value: 0.0, dtype: DType::F64, shape: kiln_ir::dims(&[3, 2]) }
    );
}

#[test]
fn errors_name_the_value() {
    let mut g = Graph::new("errors");
    let x = param(&mut g, "x", &[2, 2]);
    let loss = weighted_sum(&mut g, x, 1);
    let e = grad(&mut g, x, &[x]).unwrap_err();
    assert_eq!(e.to_string(), "the loss must be a floating-point value of one element, got f64[2, 2]");
    let e = grad(&mut g, loss, &[loss]).unwrap_err();
    assert!(matches!(e, GradError::NotAParam { op: "reduce_sum", .. }), "{e}");
}

#[test]
fn gradients_of_a_value_used_twice_add_up() {
    // loss = Σ x·x: the gradient is 2x, from the two uses of x.
    let mut g = Graph::new("twice");
    let x = param(&mut g, "x", &[3]);
    let y = g.add(Op::Binary(BinaryOp::Mul), &[x, x]).unwrap();
    let loss = g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![0], keepdims: false }, &[y]).unwrap();
    let gx = grad(&mut g, loss, &[x]).unwrap()[0].1;
    g.add_output("g", gx);
    let mut b = Bindings::default();
    b.params.insert("x".into(), Tensor::from_f64(vec![3], vec![1.0, -2.0, 0.5]).unwrap());
    assert_eq!(eval(&g, &b).unwrap()[0].1.to_f64_vec(), vec![2.0, -4.0, 1.0]);
}
