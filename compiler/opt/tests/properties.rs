//! Every rule family preserves values: random small graphs (f64) and random inputs evaluate
//! the same before and after optimization, to a relative error of 1e-9 (1e-5 is the bar).
//! Extraction's own invariants (the refined DAG never costs more than the greedy one, and the
//! rebuilt graph costs what extraction said, so no class is duplicated) are checked on every
//! case too.

use kiln_ir::{
    BinaryOp as B, Bindings, CompareOp, DType, Dim, Graph, NodeId, Op, ReduceOp, Tensor, UnaryOp as U,
};
use kiln_opt::{optimize, Options};
use proptest::prelude::*;

/// A small deterministic random source for building graphs from one proptest seed.
struct Dice(u64, u64);

impl Dice {
    fn below(&mut self, n: usize) -> usize {
        self.1 += 1;
        (kiln_ir::rng::uniform(self.0, 99, self.1) * n as f64) as usize % n.max(1)
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn coin(&mut self) -> bool {
        self.below(2) == 1
    }
}

struct Builder {
    g: Graph,
    dice: Dice,
}

impl Builder {
    fn new(seed: u64) -> Builder {
        Builder { g: Graph::new("prop"), dice: Dice(seed, 0) }
    }
    fn param(&mut self, name: &str, shape: &[usize]) -> NodeId {
        let op = Op::Param {
            name: name.into(),
            dtype: DType::F64,
            shape: kiln_ir::dims(shape),
            init: kiln_ir::Init::Normal { mean: 0.0, std: 1.0 },
        };
        self.g.add(op, &[]).expect("param")
    }
    fn input(&mut self, name: &str, shape: &[usize]) -> NodeId {
        self.g
            .add(Op::Input { name: name.into(), dtype: DType::F64, shape: kiln_ir::dims(shape) }, &[])
            .expect("input")
    }
    fn c(&mut self, v: f64) -> NodeId {
        self.g.add(Op::Full { value: v, dtype: DType::F64, shape: kiln_ir::dims(&[]) }, &[]).expect("const")
    }
    fn op(&mut self, op: Op, args: &[NodeId]) -> NodeId {
        self.g.add(op, args).unwrap_or_else(|e| panic!("builder made an ill-typed node: {e}"))
    }
    fn bin(&mut self, b: B, x: NodeId, y: NodeId) -> NodeId {
        self.op(Op::Binary(b), &[x, y])
    }
    fn un(&mut self, u: U, x: NodeId) -> NodeId {
        self.op(Op::Unary(u), &[x])
    }
    fn reduce(&mut self, r: ReduceOp, x: NodeId, axis: usize) -> NodeId {
        self.op(Op::Reduce { op: r, axes: vec![axis], keepdims: true }, &[x])
    }
    /// The mean of `x` over `axes` (kept), as a mean, a sum divided by the count or a sum
    /// times its reciprocal (`sum-to-mean`).
    fn mean(&mut self, x: NodeId, axes: &[usize]) -> NodeId {
        let shape = &self.g.ty(x).shape;
        let n: usize = axes.iter().map(|&a| shape[a].as_const().expect("static shapes")).product();
        let over = |b: &mut Builder, r| b.op(Op::Reduce { op: r, axes: axes.to_vec(), keepdims: true }, &[x]);
        match self.dice.below(3) {
            0 => over(self, ReduceOp::Mean),
            1 => {
                let s = over(self, ReduceOp::Sum);
                let c = self.c(n as f64);
                self.bin(B::Div, s, c)
            }
            _ => {
                let s = over(self, ReduceOp::Sum);
                let c = self.c(1.0 / n as f64);
                self.bin(B::Mul, s, c)
            }
        }
    }
    fn last(&self, x: NodeId) -> usize {
        self.g.ty(x).rank() - 1
    }
    /// The axes a norm runs over: the last as often as any other one axis or the last two.
    fn norm_axes(&mut self, x: NodeId) -> Vec<usize> {
        let rank = self.g.ty(x).rank();
        match self.dice.below(4) {
            0 | 1 => vec![rank - 1],
            2 => vec![self.dice.below(rank)],
            _ => vec![rank - 2, rank - 1],
        }
    }
    /// The shape of a per-feature operand (γ, β) of a norm of `x` over `axes`, broadcasting
    /// along every other axis: `[d]` for the last axis, `[C, 1, 1]` for the channels of
    /// `[N, C, H, W]`, `[H, W]` for the last two.
    fn feature_shape(&self, x: NodeId, axes: &[usize]) -> Vec<usize> {
        let shape = &self.g.ty(x).shape;
        (axes[0]..shape.len())
            .map(|i| if axes.contains(&i) { shape[i].as_const().expect("static shapes") } else { 1 })
            .collect()
    }
    /// `x` with its last two axes swapped.
    fn swap(&mut self, x: NodeId) -> NodeId {
        let r = self.g.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.op(Op::Transpose { perm }, &[x])
    }
    /// A random permutation of `0..n`.
    fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut perm: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.dice.below(i + 1);
            perm.swap(i, j);
        }
        perm
    }
    /// `1 / √v` written one of several ways: rsqrt, pow(v, −0.5), recip(√v), pow(√v, −1),
    /// 1 / √v, 1 / pow(v, 0.5).
    fn inv_root(&mut self, v: NodeId) -> NodeId {
        match self.dice.below(6) {
            0 => self.un(U::Rsqrt, v),
            1 => {
                let e = self.c(-0.5);
                self.bin(B::Pow, v, e)
            }
            2 => {
                let r = self.un(U::Sqrt, v);
                self.un(U::Recip, r)
            }
            3 => {
                let r = self.un(U::Sqrt, v);
                let e = self.c(-1.0);
                self.bin(B::Pow, r, e)
            }
            4 => {
                let r = self.un(U::Sqrt, v);
                let one = self.c(1.0);
                self.bin(B::Div, one, r)
            }
            _ => {
                let h = self.c(0.5);
                let r = self.bin(B::Pow, v, h);
                let one = self.c(1.0);
                self.bin(B::Div, one, r)
            }
        }
    }
    /// `x / √v` written one of several ways: divided by √v or by pow(v, 0.5), or multiplied
    /// (either order) by one of `inv_root`'s forms.
    fn over_root(&mut self, x: NodeId, v: NodeId) -> NodeId {
        match self.dice.below(4) {
            0 => {
                let r = self.un(U::Sqrt, v);
                self.bin(B::Div, x, r)
            }
            1 => {
                let h = self.c(0.5);
                let r = self.bin(B::Pow, v, h);
                self.bin(B::Div, x, r)
            }
            2 => {
                let r = self.inv_root(v);
                self.bin(B::Mul, x, r)
            }
            _ => {
                let r = self.inv_root(v);
                self.bin(B::Mul, r, x)
            }
        }
    }
    /// `x²` as x·x or pow(x, 2).
    fn square(&mut self, x: NodeId) -> NodeId {
        if self.dice.coin() {
            self.bin(B::Mul, x, x)
        } else {
            let two = self.c(2.0);
            self.bin(B::Pow, x, two)
        }
    }
    /// The scores `x` ([…, s, s]) under a causal mask written one of several ways: kept
    /// where `i >= j` (or `j <= i`), filled with −inf where `j > i` (or `i < j`), plus a
    /// mask of 0 and −inf, or kept through a lower-triangular table of a larger size cut to
    /// `[s, s]` (`form` 0 to 3; `flip` swaps the comparison's operands, and for the added
    /// mask which of its forms).
    /// `x` under a causal mask written in form `form` (kept, filled, added, cut from a larger
    /// table), its comparisons flipped or not, masked positions filled with `fill` (−inf, or
    /// the dtype's lowest value as models write it for −inf).
    fn causal(&mut self, x: NodeId, s: usize, (form, flip): (usize, bool), fill: f64) -> NodeId {
        let n = if form == 3 { s + 2 } else { s };
        let iota = |b: &mut Builder, axis| {
            b.op(Op::Iota { dtype: DType::I64, shape: kiln_ir::dims(&[n, n]), axis }, &[])
        };
        let (i0, i1) = (iota(self, 0), iota(self, 1));
        let keep = if flip {
            self.op(Op::Compare(CompareOp::Le), &[i1, i0])
        } else {
            self.op(Op::Compare(CompareOp::Ge), &[i0, i1])
        };
        let drop = if flip {
            self.op(Op::Compare(CompareOp::Lt), &[i0, i1])
        } else {
            self.op(Op::Compare(CompareOp::Gt), &[i1, i0])
        };
        let ninf = self.c(fill);
        match form {
            0 => self.op(Op::Where, &[keep, x, ninf]),
            1 => self.op(Op::Where, &[drop, ninf, x]),
            2 => {
                let zero = self.c(0.0);
                let mask = if flip {
                    self.op(Op::Where, &[keep, zero, ninf])
                } else {
                    self.op(Op::Where, &[drop, ninf, zero])
                };
                self.bin(B::Add, x, mask)
            }
            _ => {
                let cut = |b: &mut Builder, t, axis| {
                    b.op(Op::Slice { axis, start: Dim::Const(0), end: Dim::Const(s), step: 1 }, &[t])
                };
                let rows = cut(self, keep, 0);
                let table = cut(self, rows, 1);
                self.op(Op::Where, &[table, x, ninf])
            }
        }
    }
    /// x·c or c·x, x/c' … : a scalar multiple written one of several ways.
    fn scaled(&mut self, x: NodeId, c: f64) -> NodeId {
        match self.dice.below(3) {
            0 => {
                let k = self.c(c);
                self.bin(B::Mul, x, k)
            }
            1 => {
                let k = self.c(c);
                self.bin(B::Mul, k, x)
            }
            _ => {
                let k = self.c(1.0 / c);
                self.bin(B::Div, x, k)
            }
        }
    }
}

/// Runs both graphs on the same random inputs and compares every output.
fn check(g: &Graph) -> Result<(), TestCaseError> {
    check_with(g, &Options::default())
}

/// `check` under given options; parameters are drawn from their initializers.
fn check_with(g: &Graph, opts: &Options) -> Result<(), TestCaseError> {
    let (opt, r) = optimize(g, opts).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let x = &r.extraction;
    prop_assert!(x.refined_cost <= x.greedy_cost, "refinement raised the cost: {:?}", x);
    // The rebuilt graph costs what extraction computed for its DAG (up to the per-node
    // tie-break term): every class once, none duplicated.
    let slack = 2e-12 * r.nodes_after as f64 + 1e-9 * x.refined_cost;
    prop_assert!(
        (r.cost_after - x.refined_cost).abs() <= slack,
        "graph {} vs DAG {}",
        r.cost_after,
        x.refined_cost
    );
    let params = kiln_ir::bind_params(g, None, 5, false).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut b = Bindings { params, ..Bindings::default() };
    for &i in &g.inputs {
        let Op::Input { name, .. } = &g.node(i).op else { continue };
        let shape = g.ty(i).static_shape();
        let n: usize = shape.iter().product();
        let v = (0..n as u64).map(|k| kiln_ir::rng::normal(11, kiln_ir::rng::stream_of(name), k)).collect();
        b.inputs.insert(name.clone(), Tensor::from_f64(shape.clone(), v).expect("sized"));
    }
    let want = kiln_ir::eval(g, &b).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let got = kiln_ir::eval(&opt, &b).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for ((name, w), (_, o)) in want.iter().zip(&got) {
        prop_assert_eq!(&w.shape, &o.shape);
        for (x, y) in w.to_f64_vec().iter().zip(o.to_f64_vec()) {
            if x.is_nan() && y.is_nan() {
                continue;
            }
            let err = (x - y).abs() / (1.0 + x.abs());
            prop_assert!(err <= 1e-9, "output {}: {} vs {} (relative error {:e})", name, x, y, err);
        }
    }
    Ok(())
}

/// Algebra: random chains of arithmetic with constants, transposes, reshapes, squares and
/// scaled matmuls.
fn algebra_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let shape = [b.dice.pick(&[1, 2, 3]), b.dice.pick(&[2, 3]), b.dice.pick(&[2, 4])];
    let x = b.input("x", &shape);
    let y = b.input("y", &shape);
    let mut pool = vec![x, y];
    for _ in 0..8 {
        let a = pool[b.dice.below(pool.len())];
        let same_shape: Vec<NodeId> =
            pool.iter().copied().filter(|p| b.g.ty(*p).shape == b.g.ty(a).shape).collect();
        let other = same_shape[b.dice.below(same_shape.len())];
        let consts = [0.0, 1.0, 2.0, 0.5, -3.0];
        let n = match b.dice.below(8) {
            0 => {
                let k = b.dice.pick(&consts);
                b.scaled(a, if k == 0.0 { 1.0 } else { k })
            }
            1 => {
                let v = b.dice.pick(&consts);
                let k = b.c(v);
                if b.dice.coin() {
                    b.bin(B::Add, a, k)
                } else {
                    b.bin(B::Add, k, a)
                }
            }
            2 => {
                let op = b.dice.pick(&[B::Add, B::Sub, B::Mul]);
                b.bin(op, a, other)
            }
            3 => {
                // Division by something never near zero.
                let sq = b.bin(B::Mul, other, other);
                let one = b.c(1.0);
                let den = b.bin(B::Add, sq, one);
                b.bin(B::Div, a, den)
            }
            4 => {
                let rank = b.g.ty(a).rank();
                let mut perm: Vec<usize> = (0..rank).collect();
                for i in (1..rank).rev() {
                    let j = b.dice.below(i + 1);
                    perm.swap(i, j);
                }
                let t = b.op(Op::Transpose { perm: perm.clone() }, &[a]);
                if b.dice.coin() {
                    let mut back = vec![0; rank];
                    for (i, p) in perm.iter().enumerate() {
                        back[*p] = i;
                    }
                    b.op(Op::Transpose { perm: back }, &[t])
                } else {
                    t
                }
            }
            5 => {
                let s = b.g.ty(a).shape.clone();
                let flat = b.op(Op::Reshape { shape: kiln_ir::dims(&[b.g.ty(a).numel()]) }, &[a]);
                b.op(Op::Reshape { shape: s }, &[flat])
            }
            6 => {
                let two = b.c(2.0);
                b.bin(B::Pow, a, two)
            }
            _ => {
                let rank = b.g.ty(a).rank();
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(rank - 2, rank - 1);
                let at = b.op(Op::Transpose { perm }, &[a]);
                let k = b.dice.pick(&[0.5, 2.0, 0.125]);
                let sa = b.scaled(a, k);
                let mm = b.op(Op::MatMul, &[sa, at]);
                // Back to the pool's shape through a reduction and a broadcast.
                let r = b.reduce(ReduceOp::Sum, mm, rank - 1);
                let s = b.g.ty(a).shape.clone();
                b.op(
                    Op::BroadcastTo {
                        shape: s.iter().take(rank - 1).cloned().chain([s[rank - 1].clone()]).collect(),
                    },
                    &[r],
                )
            }
        };
        pool.push(n);
    }
    let outs: Vec<NodeId> = pool.iter().rev().take(2).copied().collect();
    for (i, o) in outs.into_iter().enumerate() {
        b.g.add_output(format!("out{i}"), o);
    }
    b.g
}

/// Fusion: softmax, norms, GELU, attention and matmul epilogues in randomly chosen forms.
fn fusion_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let d = b.dice.pick(&[4, 8]);
    let rows = b.dice.pick(&[1, 3]);
    let x = b.input("x", &[rows, 2, d]);
    let y = match b.dice.below(6) {
        0 => {
            // softmax over a random axis, max-shifted or not, divided or reciprocal-multiplied
            let axis = b.dice.below(3);
            let e = if b.dice.coin() {
                let m = b.reduce(ReduceOp::Max, x, axis);
                let d = b.bin(B::Sub, x, m);
                b.un(U::Exp, d)
            } else {
                b.un(U::Exp, x)
            };
            let s = b.reduce(ReduceOp::Sum, e, axis);
            let y = match b.dice.below(3) {
                0 => b.bin(B::Div, e, s),
                1 => {
                    let r = b.un(U::Recip, s);
                    b.bin(B::Mul, e, r)
                }
                _ => {
                    let m1 = b.c(-1.0);
                    let r = b.bin(B::Pow, s, m1);
                    b.bin(B::Mul, r, e)
                }
            };
            // Maybe transposed afterwards, by any permutation (`transpose-softmax` follows the axis).
            if b.dice.coin() {
                let perm = b.permutation(3);
                b.op(Op::Transpose { perm }, &[y])
            } else {
                y
            }
        }
        1 => {
            // layer norm over any axis or the last two: variance centered or expanded, sqrt-divide or
            // rsqrt-multiply, affine or not
            let last = b.norm_axes(x);
            let mu = b.mean(x, &last);
            let xc = b.bin(B::Sub, x, mu);
            let var = if b.dice.coin() {
                let sq = b.square(xc);
                b.mean(sq, &last)
            } else {
                let sq = b.square(x);
                let ms = b.mean(sq, &last);
                let mu2 = b.square(mu);
                b.bin(B::Sub, ms, mu2)
            };
            let e = b.dice.pick(&[1e-5, 1e-12, 0.1]);
            let eps = b.c(e);
            let ve = b.bin(B::Add, var, eps);
            let n = b.over_root(xc, ve);
            if b.dice.coin() {
                let features = b.feature_shape(x, &last);
                let gamma = b.input("gamma", &features);
                let beta = b.input("beta", &features);
                let m = b.bin(B::Mul, n, gamma);
                b.bin(B::Add, m, beta)
            } else {
                n
            }
        }
        2 => {
            // RMS norm over any axis or the last two, maybe after a residual add, maybe with gamma
            let r = b.input("r", &[rows, 2, d]);
            let s = if b.dice.coin() { b.bin(B::Add, x, r) } else { x };
            let last = b.norm_axes(s);
            let sq = b.square(s);
            let ms = b.mean(sq, &last);
            let eps = b.c(1e-6);
            let ve = b.bin(B::Add, ms, eps);
            let n = b.over_root(s, ve);
            if b.dice.coin() {
                let features = b.feature_shape(s, &last);
                let gamma = b.input("gamma", &features);
                b.bin(B::Mul, n, gamma)
            } else {
                n
            }
        }
        3 => {
            // GELU, erf or tanh form
            let half = b.c(0.5);
            let one = b.c(1.0);
            let hx = b.bin(B::Mul, half, x);
            if b.dice.coin() {
                let u = b.scaled(x, std::f64::consts::FRAC_1_SQRT_2);
                let e = b.un(U::Erf, u);
                let t = b.bin(B::Add, one, e);
                b.bin(B::Mul, hx, t)
            } else {
                let x2 = b.bin(B::Mul, x, x);
                let x3 = b.bin(B::Mul, x2, x);
                let k3 = b.c(0.044715);
                let cube = b.bin(B::Mul, x3, k3);
                let inner = b.bin(B::Add, x, cube);
                let u = b.scaled(inner, (2.0 / std::f64::consts::PI).sqrt());
                let t = b.un(U::Tanh, u);
                let t1 = b.bin(B::Add, t, one);
                b.bin(B::Mul, hx, t1)
            }
        }
        4 => {
            // attention with a random scale form, optional additive mask and causal mask
            let (h, s, dh) = (b.dice.pick(&[1, 2]), b.dice.pick(&[3, 5]), b.dice.pick(&[2, 4]));
            let q = b.input("q", &[rows, h, s, dh]);
            let k = b.input("k", &[rows, h, s, dh]);
            let v = b.input("v", &[rows, h, s, dh]);
            let scale = 1.0 / (dh as f64).sqrt();
            let mut scores = match b.dice.below(4) {
                0 => {
                    let kt = b.swap(k);
                    let qs = b.scaled(q, scale);
                    b.op(Op::MatMul, &[qs, kt])
                }
                1 => {
                    let kt = b.swap(k);
                    let mm = b.op(Op::MatMul, &[q, kt]);
                    b.scaled(mm, scale)
                }
                2 => {
                    // (k · qᵀ)ᵀ, scaled after the transpose or before it.
                    let qt = b.swap(q);
                    let mm = b.op(Op::MatMul, &[k, qt]);
                    if b.dice.coin() {
                        let t = b.swap(mm);
                        b.scaled(t, scale)
                    } else {
                        let sc = b.scaled(mm, scale);
                        b.swap(sc)
                    }
                }
                _ => {
                    // The scale split between q and k, k's before its transpose.
                    let split = b.dice.pick(&[0.5, 0.25, 2.0]);
                    let qs = b.scaled(q, scale / split);
                    let ks = b.scaled(k, split);
                    let kt = b.swap(ks);
                    b.op(Op::MatMul, &[qs, kt])
                }
            };
            if b.dice.coin() {
                // A temperature that is a tensor: of rank 0, per head, or per query; multiplied
                // on either side or divided by.
                let shape = match b.dice.below(3) {
                    0 => vec![],
                    1 => vec![h, 1, 1],
                    _ => vec![rows, h, s, 1],
                };
                let t = b.input("temperature", &shape);
                scores = match b.dice.below(3) {
                    0 => b.bin(B::Mul, scores, t),
                    1 => b.bin(B::Mul, t, scores),
                    _ => b.bin(B::Div, scores, t),
                };
            }
            let masked = b.dice.coin();
            if masked {
                let mask = b.input("mask", &[rows, 1, 1, s]);
                scores = b.bin(B::Add, scores, mask);
            }
            if b.dice.coin() {
                let (form, flip) = (b.dice.below(4), b.dice.coin());
                // f64's lowest value stands for −inf where no mask lies under it.
                let fill = if !masked && b.dice.coin() { -f64::MAX } else { f64::NEG_INFINITY };
                scores = b.causal(scores, s, (form, flip), fill);
            }
            // The softmax over the keys, or over axis −2 of the transposed scores, transposed back.
            let transposed = b.dice.coin();
            let scores = if transposed { b.swap(scores) } else { scores };
            let axis = if transposed { b.last(scores) - 1 } else { b.last(scores) };
            let m = b.reduce(ReduceOp::Max, scores, axis);
            let sh = b.bin(B::Sub, scores, m);
            let e = b.un(U::Exp, sh);
            let sum = b.reduce(ReduceOp::Sum, e, axis);
            let p = b.bin(B::Div, e, sum);
            let p = if transposed { b.swap(p) } else { p };
            if b.dice.coin() {
                b.op(Op::MatMul, &[p, v])
            } else {
                // (vᵀ · pᵀ)ᵀ
                let (vt, pt) = (b.swap(v), b.swap(p));
                let mm = b.op(Op::MatMul, &[vt, pt]);
                b.swap(mm)
            }
        }
        _ => {
            // matmul + bias (+ activation)
            let w = b.input("w", &[d, 6]);
            let bias = b.input("bias", &[6]);
            let mm = b.op(Op::MatMul, &[x, w]);
            let z = if b.dice.coin() { b.bin(B::Add, mm, bias) } else { b.bin(B::Add, bias, mm) };
            match b.dice.below(3) {
                0 => b.un(U::Relu, z),
                1 => b.un(U::Tanh, z),
                _ => z,
            }
        }
    };
    b.g.add_output("y", y);
    b.g
}

/// Projections sharing their input: `x @ Wᵢ` (weights as inputs or parameters, of random
/// widths), with or without a bias each and one activation for all, and some other use of `x`.
fn merge_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let k = b.dice.pick(&[3, 4]);
    let rank3 = b.dice.coin();
    let rows = b.dice.pick(&[1, 3]);
    let x = if rank3 { b.input("x", &[2, rows, k]) } else { b.input("x", &[3, k]) };
    let members = 2 + b.dice.below(3);
    let as_params = b.dice.coin();
    let biased = b.dice.coin();
    let activation = b.dice.pick(&[None, Some(U::Relu), Some(U::Tanh)]);
    for i in 0..members {
        let n = b.dice.pick(&[2, 3, 5]);
        let w =
            if as_params { b.param(&format!("w{i}"), &[k, n]) } else { b.input(&format!("w{i}"), &[k, n]) };
        let mut y = b.op(Op::MatMul, &[x, w]);
        if biased {
            let bias = b.param(&format!("b{i}"), &[n]);
            y = b.bin(B::Add, y, bias);
            if let Some(u) = activation {
                y = b.un(u, y);
            }
        }
        b.g.add_output(format!("y{i}"), y);
    }
    if b.dice.coin() {
        let e = b.un(U::Exp, x);
        b.g.add_output("other", e);
    }
    b.g
}

/// A recurrent model unrolled over `steps`, as a spec's `Repeat` writes one: each step slices
/// its rows of the input along the steps axis (kept as an axis of 1 or reshaped away), projects
/// them by one weight (with a bias and an activation, or not), mixes in the previous state,
/// and the states are collected by a concat per step along the steps axis. Some graphs also
/// output a partial concat, or project a step by a weight of its own. What
/// `product-of-row-slices` and `concat-of-concats` rewrite; returns whether the projection
/// should become one product (no step has a weight of its own).
fn recurrent(seed: u64) -> (Graph, bool) {
    let mut b = Builder::new(seed);
    let (batch, steps, k, n) =
        (b.dice.pick(&[1, 3]), b.dice.pick(&[2, 3, 5]), b.dice.pick(&[2, 4]), b.dice.pick(&[3, 4]));
    let lead = b.dice.coin();
    let x = if lead { b.input("x", &[2, batch, steps, k]) } else { b.input("x", &[batch, steps, k]) };
    let axis = usize::from(lead) + 1;
    let w = b.param("w", &[k, n]);
    let bias = b.dice.coin().then(|| b.param("b", &[n]));
    let activation = b.dice.pick(&[None, Some(U::Tanh), Some(U::Relu)]);
    let reshaped = b.dice.coin();
    let own_weight = b.dice.below(4) == 0;
    let partial = b.dice.below(3) == 0;
    let u = b.param("u", &[n, n]);
    let mut state: Option<NodeId> = None;
    let mut collected: Option<NodeId> = None;
    for t in 0..steps {
        let slice = Op::Slice { axis, start: Dim::Const(t), end: Dim::Const(t + 1), step: 1 };
        let mut rows = b.op(slice, &[x]);
        let mut kept: Vec<usize> = if lead { vec![2, batch, 1] } else { vec![batch, 1] };
        if reshaped {
            kept.pop();
            let mut shape = kept.clone();
            shape.push(k);
            rows = b.op(Op::Reshape { shape: kiln_ir::dims(&shape) }, &[rows]);
        }
        let weight = if own_weight && t == steps - 1 { b.param("w_last", &[k, n]) } else { w };
        let mut y = b.op(Op::MatMul, &[rows, weight]);
        if let Some(bias) = bias {
            y = b.bin(B::Add, y, bias);
        }
        if let Some(a) = activation {
            y = b.un(a, y);
        }
        if let Some(h) = state {
            let r = b.op(Op::MatMul, &[h, u]);
            y = b.bin(B::Add, y, r);
        }
        state = Some(y);
        let mut piece = y;
        if reshaped {
            let mut shape = kept.clone();
            shape.extend([1, n]);
            piece = b.op(Op::Reshape { shape: kiln_ir::dims(&shape) }, &[y]);
        }
        collected = Some(match collected {
            None => piece,
            Some(c) => b.op(Op::Concat { axis }, &[c, piece]),
        });
        if partial && t == 1 {
            b.g.add_output("partial", collected.expect("collected"));
        }
    }
    b.g.add_output("states", collected.expect("at least two steps"));
    (b.g, !own_weight)
}

fn recurrent_graph(seed: u64) -> Graph {
    recurrent(seed).0
}

/// Matmul chains of three or four operands with random extents (some tiny, some wide), rank 2
/// or with a batch axis, grouped at random.
fn chain_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let len = 3 + b.dice.below(2);
    let dims: Vec<usize> = (0..=len).map(|_| b.dice.pick(&[1, 2, 3, 16])).collect();
    let batched: Vec<bool> = (0..len).map(|_| b.dice.below(4) == 0).collect();
    let mut operands: Vec<NodeId> = (0..len)
        .map(|i| {
            let shape = if batched[i] { vec![2, dims[i], dims[i + 1]] } else { vec![dims[i], dims[i + 1]] };
            b.input(&format!("m{i}"), &shape)
        })
        .collect();
    while operands.len() > 1 {
        let i = b.dice.below(operands.len() - 1);
        let m = b.op(Op::MatMul, &[operands[i], operands[i + 1]]);
        operands.splice(i..i + 2, [m]);
    }
    b.g.add_output("y", operands[0]);
    b.g
}

/// The sum over every batch axis (kept or not) of a product of two
/// operands with 1 to 3 batch axes, each operand written plain or as a transpose: what
/// `batch-sum-matmul` turns into one product over the merged batch and contraction axes.
fn batch_sum_product_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let lead = 1 + b.dice.below(3);
    let batch: Vec<usize> = (0..lead).map(|_| b.dice.pick(&[1, 2, 3])).collect();
    let (m, k, n) = (b.dice.pick(&[1, 2, 5]), b.dice.pick(&[1, 3, 4]), b.dice.pick(&[2, 3]));
    let operand = |b: &mut Builder, name: &str, rows: usize, cols: usize| {
        let mut shape = batch.clone();
        if b.dice.coin() {
            shape.extend([cols, rows]);
            let t = b.input(name, &shape);
            b.swap(t)
        } else {
            shape.extend([rows, cols]);
            b.input(name, &shape)
        }
    };
    let x = operand(&mut b, "a", m, k);
    let w = operand(&mut b, "b", k, n);
    let p = b.op(Op::MatMul, &[x, w]);
    let axes: Vec<usize> = (0..lead).collect();
    let keepdims = b.dice.coin();
    let y = b.op(Op::Reduce { op: kiln_ir::ReduceOp::Sum, axes, keepdims }, &[p]);
    b.g.add_output("y", y);
    b.g
}

/// Products whose operands have ranks 2 to 5 (batch axes right-aligned, some of extent 1 so
/// they broadcast), some operands written as transposes, under a transpose that permutes the
/// batch axes at random and swaps or keeps the matrix axes; or written as `(bᵀ·aᵀ)ᵀ`, or as
/// `bᵀ·aᵀ`.
fn transposed_product_graph(seed: u64) -> Graph {
    transposed_product(seed).0
}

/// `transposed_product_graph`, and which form it wrote: 0 a transposed product, 1 `(bᵀ·aᵀ)ᵀ`,
/// 2 `bᵀ·aᵀ`.
fn transposed_product(seed: u64) -> (Graph, usize) {
    let mut b = Builder::new(seed);
    let r = 2 + b.dice.below(4);
    let batch: Vec<usize> = (0..r - 2).map(|_| b.dice.pick(&[2, 2, 3])).collect();
    let (m, k, n) = (b.dice.pick(&[2, 3]), b.dice.pick(&[2, 4]), b.dice.pick(&[1, 3]));
    let operand = |b: &mut Builder, name: &str, rows: usize, cols: usize| {
        let rx = if b.dice.coin() { r } else { 2 + b.dice.below(r - 1) };
        let mut shape: Vec<usize> =
            batch[r - rx..].iter().map(|&e| if b.dice.below(3) == 0 { 1 } else { e }).collect();
        if b.dice.coin() {
            shape.extend([cols, rows]);
            let t = b.input(name, &shape);
            b.swap(t)
        } else {
            shape.extend([rows, cols]);
            b.input(name, &shape)
        }
    };
    let x = operand(&mut b, "a", m, k);
    let w = operand(&mut b, "b", k, n);
    let form = b.dice.below(3);
    let y = match form {
        0 => {
            let p = b.op(Op::MatMul, &[x, w]);
            let pr = b.g.ty(p).rank();
            let mut perm = b.permutation(pr - 2);
            perm.extend(if b.dice.coin() { [pr - 1, pr - 2] } else { [pr - 2, pr - 1] });
            b.op(Op::Transpose { perm }, &[p])
        }
        1 => {
            let (xt, wt) = (b.swap(x), b.swap(w));
            let p = b.op(Op::MatMul, &[wt, xt]);
            b.swap(p)
        }
        _ => {
            let (xt, wt) = (b.swap(x), b.swap(w));
            b.op(Op::MatMul, &[wt, xt])
        }
    };
    b.g.add_output("y", y);
    if b.dice.coin() {
        let p = b.op(Op::MatMul, &[x, w]);
        b.g.add_output("p", p);
    }
    (b.g, form)
}

/// Powers of a positive base with constant exponents (the ones `pow-to-root` rewrites, their
/// neighbours it must not, and an exponent whose shape broadcasts the base to a higher rank),
/// reciprocals multiplied in either order and divisions of one.
fn power_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let x = b.input("x", &[2, 3, 4]);
    let y = b.input("y", &[2, 3, 4]);
    let sq = b.bin(B::Mul, x, x);
    let half = b.c(0.5);
    let base = b.bin(B::Add, sq, half);
    let mut pool = vec![base, y];
    for _ in 0..4 {
        let a = pool[b.dice.below(pool.len())];
        let n = match b.dice.below(5) {
            0 | 1 => {
                let e = b.dice.pick(&[0.5, -0.5, -1.0, 1.0, 2.0, 3.0, -0.49, 0.25, -2.0]);
                let shape: Vec<usize> = b.dice.pick(&[&[][..], &[4][..], &[1, 1, 1, 1][..]]).to_vec();
                let k = b.op(Op::Full { value: e, dtype: DType::F64, shape: kiln_ir::dims(&shape) }, &[]);
                b.bin(B::Pow, base, k)
            }
            2 => {
                let r = b.un(U::Recip, base);
                if b.dice.coin() {
                    b.bin(B::Mul, a, r)
                } else {
                    b.bin(B::Mul, r, a)
                }
            }
            3 => {
                let one = b.c(1.0);
                b.bin(B::Div, one, base)
            }
            _ => b.bin(B::Add, a, y),
        };
        pool.push(n);
    }
    let outs: Vec<NodeId> = pool.iter().rev().take(2).copied().collect();
    for (i, o) in outs.into_iter().enumerate() {
        b.g.add_output(format!("out{i}"), o);
    }
    b.g
}

/// `(s·A)·(t·B)`: scalar scales on both operands of a product (multiplied on either side or
/// divided), written before or after a transpose or reshape of the operand.
fn scaled_product_graph(seed: u64) -> Graph {
    let mut b = Builder::new(seed);
    let batched = b.dice.coin();
    let operand = |b: &mut Builder, name: &str, rows: usize, cols: usize| {
        let lead: Vec<usize> = if batched { vec![2] } else { vec![] };
        let k = b.dice.pick(&[0.5, -2.0, 0.125, 3.0]);
        match b.dice.below(4) {
            0 => {
                let x = b.input(name, &[lead.as_slice(), &[rows, cols]].concat());
                b.scaled(x, k)
            }
            1 => {
                let x = b.input(name, &[lead.as_slice(), &[cols, rows]].concat());
                let s = b.scaled(x, k);
                b.swap(s)
            }
            2 => {
                let x = b.input(name, &[lead.iter().product::<usize>() * rows * cols]);
                let s = b.scaled(x, k);
                b.op(Op::Reshape { shape: kiln_ir::dims(&[lead.as_slice(), &[rows, cols]].concat()) }, &[s])
            }
            _ => b.input(name, &[lead.as_slice(), &[rows, cols]].concat()),
        }
    };
    let l = operand(&mut b, "a", 3, 4);
    let r = operand(&mut b, "b", 4, 2);
    let p = b.op(Op::MatMul, &[l, r]);
    let y = if b.dice.coin() { b.scaled(p, 0.25) } else { p };
    b.g.add_output("y", y);
    b.g
}

/// Options whose target folds weight-only subgraphs ahead of the runs.
fn folding() -> Options {
    let mut opts = Options::default();
    opts.target.folds_weights = true;
    opts
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn merging_shared_inputs_preserves_values(seed in any::<u64>()) {
        let g = merge_graph(seed);
        check(&g)?;
        check_with(&g, &folding())?;
    }

    #[test]
    fn matmul_reassociation_preserves_values(seed in any::<u64>()) {
        check(&chain_graph(seed))?;
    }

    #[test]
    fn algebra_rules_preserve_values(seed in any::<u64>()) {
        check(&algebra_graph(seed))?;
    }

    #[test]
    fn batch_sums_of_products_preserve_values(seed in any::<u64>()) {
        check(&batch_sum_product_graph(seed))?;
    }

    #[test]
    fn transposes_through_products_preserve_values(seed in any::<u64>()) {
        check(&transposed_product_graph(seed))?;
    }

    #[test]
    fn constant_powers_and_reciprocals_preserve_values(seed in any::<u64>()) {
        check(&power_graph(seed))?;
    }

    #[test]
    fn scales_across_products_and_views_preserve_values(seed in any::<u64>()) {
        check(&scaled_product_graph(seed))?;
    }

    #[test]
    fn recurrent_projections_and_collected_states_preserve_values(seed in any::<u64>()) {
        check(&recurrent_graph(seed))?;
    }

    #[test]
    fn fusion_rules_preserve_values(seed in any::<u64>()) {
        check(&fusion_graph(seed))?;
    }
}

#[test]
fn batch_sums_of_transposed_products_become_one_product() {
    // The property above is only meaningful if the merged product is what gets evaluated. It
    // is in autodiff's form, `a` written transposed and `b` plain (`Σ_b x[b]ᵀ·gy[b]`): the
    // transpose is then in both forms. Otherwise a transpose the cost model charges as a
    // kernel (the scheduler makes it a view) can tie or tip the estimate, and extraction may
    // keep the batched form.
    let mut merged = 0;
    for seed in 0..60 {
        let g = batch_sum_product_graph(seed);
        let transposed =
            |i: usize| g.users(g.inputs[i]).iter().any(|&u| matches!(g.node(u).op, Op::Transpose { .. }));
        if !transposed(0) || transposed(1) {
            continue;
        }
        let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
        let sums = opt.node_ids().filter(|&n| matches!(opt.node(n).op, Op::Reduce { .. })).count();
        assert_eq!(
            sums,
            0,
            "seed {seed}: {:?}\n{}",
            r.op_counts,
            kiln_ir::print::to_text(&g, Default::default())
        );
        merged += 1;
    }
    assert!(merged >= 10, "{merged}");
}

#[test]
fn fusion_graphs_do_fuse() {
    // The property above is only meaningful if the fused forms are what gets evaluated.
    let mut fused = 0;
    let mut attentions = 0;
    let mut causals = 0;
    let mut affine = 0;
    let mut inner = 0;
    let mut spans = 0;
    let mut temperatures = 0;
    for seed in 0..40 {
        let g = fusion_graph(seed);
        let (opt, _) = optimize(&g, &Options::default()).expect("optimizes");
        if opt.node_ids().any(|n| opt.node(n).op.is_fused()) {
            fused += 1;
        }
        // Every attention form the generator writes (transposed scores, split scales, the
        // softmax over the transposed scores, the context as (vᵀ·pᵀ)ᵀ) must become one.
        let has_q = g.inputs.iter().any(|&i| matches!(&g.node(i).op, Op::Input { name, .. } if name == "q"));
        if has_q {
            attentions += 1;
            let n = opt.node_ids().filter(|&n| matches!(opt.node(n).op, Op::Attention { .. })).count();
            assert_eq!(n, 1, "seed {seed}: an attention graph optimized to {n} attention ops");
            // A causal mask, however written, is the attention's flag: no iota is left.
            let written = g.node_ids().any(|n| matches!(g.node(n).op, Op::Iota { .. }));
            let flagged =
                opt.node_ids().any(|n| matches!(opt.node(n).op, Op::Attention { causal: true, .. }));
            let left = opt.node_ids().any(|n| matches!(opt.node(n).op, Op::Iota { .. }));
            assert_eq!((flagged, left), (written, false), "seed {seed}: causal mask written {written}");
            causals += usize::from(written);
            let named = |want: &str| {
                g.inputs.iter().any(|&i| matches!(&g.node(i).op, Op::Input { name, .. } if name == want))
            };
            temperatures += usize::from(named("temperature"));
        }
        // A norm with γ, over whichever axis, is one affine fused norm with no reduction left.
        let has_gamma =
            g.inputs.iter().any(|&i| matches!(&g.node(i).op, Op::Input { name, .. } if name == "gamma"));
        if has_gamma {
            affine += 1;
            let fused = opt.node_ids().any(|n| {
                matches!(
                    opt.node(n).op,
                    Op::LayerNorm { affine: true, .. }
                        | Op::RmsNorm { affine: true, .. }
                        | Op::AddNorm { affine: true, .. }
                )
            });
            let reduced = opt.node_ids().any(|n| matches!(opt.node(n).op, Op::Reduce { .. }));
            assert!(
                fused && !reduced,
                "seed {seed}: a norm with γ optimized to\n{}",
                kiln_ir::print::to_text(&opt, Default::default())
            );
            // γ of rank > 1 belongs to a norm over another axis than the last, with unit axes,
            // or over the last two, without.
            let gamma = g.inputs.iter().find_map(|&i| match &g.node(i).op {
                Op::Input { name, .. } if name == "gamma" => Some(g.ty(i).shape.clone()),
                _ => None,
            });
            let gamma = gamma.unwrap_or_default();
            let unit = gamma.contains(&kiln_ir::Dim::Const(1));
            inner += usize::from(gamma.len() > 1 && unit);
            spans += usize::from(gamma.len() > 1 && !unit);
        }
    }
    assert!(affine >= 4, "only {affine} of 40 random fusion graphs wrote a norm with γ");
    assert!(inner >= 1, "none of 40 random fusion graphs wrote a norm with γ over an inner axis");
    assert!(spans >= 1, "none of 40 random fusion graphs wrote a norm with γ over the last two axes");
    assert!(fused >= 36, "only {fused} of 40 random fusion graphs fused");
    assert!(attentions >= 4, "only {attentions} of 40 random fusion graphs wrote an attention");
    assert!(causals >= 2, "only {causals} of 40 random fusion graphs wrote a causal mask");
    assert!(temperatures >= 1, "none of 40 random fusion graphs scaled attention by a tensor");
}

/// Where a padding mask goes beside the causal one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Padding {
    None,
    Inside,
    Outside,
}

/// softmax(q·kᵀ under a causal mask in form `form`, and a padding mask inside or outside it)
/// · v.
fn causal_attention_graph(form: usize, flip: bool, padding: Padding, fill: f64) -> Graph {
    let mut b = Builder::new(form as u64);
    let (s, d) = (5, 4);
    let q = b.input("q", &[2, 2, s, d]);
    let k = b.input("k", &[2, 2, s, d]);
    let v = b.input("v", &[2, 2, s, d]);
    let kt = b.swap(k);
    let mut scores = b.op(Op::MatMul, &[q, kt]);
    let mask = b.input("mask", &[2, 1, 1, s]);
    if padding == Padding::Inside {
        scores = b.bin(B::Add, scores, mask);
    }
    scores = b.causal(scores, s, (form, flip), fill);
    if padding == Padding::Outside {
        scores = b.bin(B::Add, scores, mask);
    }
    let p = b.op(Op::Softmax { axis: 3 }, &[scores]);
    let y = b.op(Op::MatMul, &[p, v]);
    b.g.add_output("y", y);
    b.g
}

#[test]
fn causal_masks_in_every_written_form_become_the_attention_flag() {
    // Kept by i >= j, filled where j > i, added as 0/−inf, or cut from a larger table; with
    // and without a padding mask inside or outside it: one causal attention, no iota, the
    // same values. The same with f64's lowest value for −inf, but for a padding mask inside
    // it (a query whose past is all masked would weigh the future): no causal flag there.
    let fills = [f64::NEG_INFINITY, -f64::MAX];
    let paddings = [Padding::None, Padding::Inside, Padding::Outside];
    for (form, flip, padding, fill) in (0..4).flat_map(|form| {
        [false, true].into_iter().flat_map(move |flip| {
            paddings.into_iter().flat_map(move |padding| fills.map(|fill| (form, flip, padding, fill)))
        })
    }) {
        let g = causal_attention_graph(form, flip, padding, fill);
        let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
        let what = format!("form {form}, flip {flip}, padding {padding:?}, fill {fill:e}");
        check(&g).unwrap_or_else(|e| panic!("{what}: {e}"));
        let attention: Vec<(bool, bool)> = opt
            .node_ids()
            .filter_map(|n| match opt.node(n).op {
                Op::Attention { causal, masked, .. } => Some((causal, masked)),
                _ => None,
            })
            .collect();
        if fill.is_finite() && padding == Padding::Inside {
            assert!(attention.iter().all(|(causal, _)| !causal), "{what}: {:?}", r.op_counts);
            continue;
        }
        assert_eq!(attention, [(true, padding != Padding::None)], "{what}: {:?}", r.op_counts);
        assert_eq!(r.op_counts.get("iota"), None, "{what}: {:?}", r.op_counts);
    }
}

#[test]
fn shared_input_graphs_do_merge_when_it_pays() {
    // With folded weights a merge of parameter weights saves kernels for free; with weights
    // as run-time inputs the concat is a kernel per run, paid for by at least two saved ones.
    let (mut merged, mut eligible) = (0, 0);
    for seed in 0..40 {
        let g = merge_graph(seed);
        let members = g.outputs.iter().filter(|o| o.0.starts_with('y')).count();
        let (opt, r) = optimize(&g, &folding()).expect("optimizes");
        assert!(r.rules_fired.contains_key("merge-shared-input"), "seed {seed}: {:?}", r.rules_fired);
        let concats = opt.node_ids().filter(|n| matches!(opt.node(*n).op, Op::Concat { .. })).count();
        let matmuls = r.op_counts.get("matmul").copied().unwrap_or(0)
            + r.op_counts.get("matmul_epilogue").copied().unwrap_or(0);
        // Only `x` is an input when the weights are parameters.
        let weights_are_params = g.inputs.len() == 1;
        if weights_are_params || members >= 3 {
            eligible += 1;
            if matmuls == 1 && concats >= 1 {
                merged += 1;
            }
        }
    }
    eprintln!("{merged} of {eligible} profitable groups merged");
    assert!(
        eligible >= 20 && merged * 10 >= eligible * 9,
        "only {merged} of {eligible} profitable groups merged"
    );
}

#[test]
fn recurrent_graphs_project_every_step_at_once_and_concat_once() {
    // The steps' projections by one weight become one product over the input, and the
    // per-step concats one concat of every state; a step with a weight of its own keeps its
    // product, and a partial concat that is an output stays.
    let reads = |g: &Graph, name: &str| {
        g.node_ids()
            .filter(|&n| {
                matches!(g.node(n).op, Op::MatMul | Op::MatMulEpilogue { .. })
                    && matches!(&g.node(g.operands(n)[1]).op, Op::Param { name: p, .. } if p == name)
            })
            .count()
    };
    let (mut shared, mut own) = (0, 0);
    for seed in 0..40 {
        let (g, one_weight) = recurrent(seed);
        let steps = g.node_ids().filter(|&n| matches!(g.node(n).op, Op::Concat { .. })).count() + 1;
        let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
        let concats: Vec<usize> = opt
            .node_ids()
            .filter(|&n| matches!(opt.node(n).op, Op::Concat { .. }))
            .map(|n| opt.operands(n).len())
            .collect();
        let partial = g.outputs.iter().any(|o| o.0 == "partial");
        assert!(concats.contains(&steps), "seed {seed}: concats of {concats:?}, {steps} steps");
        assert!(concats.len() <= 1 + usize::from(partial), "seed {seed}: concats of {concats:?}");
        if one_weight {
            shared += 1;
            assert_eq!(reads(&opt, "w"), 1, "seed {seed}: {:?}", r.rules_fired);
        } else {
            own += 1;
            assert_eq!(reads(&opt, "w_last"), 1, "seed {seed}");
        }
    }
    assert!(shared >= 20 && own >= 4, "{shared} graphs with one weight, {own} with a step's own");
}

#[test]
fn a_product_of_a_few_rows_of_a_large_input_stays_small() {
    // A pooler reads the first token of 512: projecting all 512 rows to keep one would cost
    // 512 times the work, so the product stays over its one row.
    let mut b = Builder::new(1);
    let x = b.input("x", &[2, 512, 64]);
    let w = b.param("w", &[64, 64]);
    let first = b.op(Op::Slice { axis: 1, start: Dim::Const(0), end: Dim::Const(1), step: 1 }, &[x]);
    let rows = b.op(Op::Reshape { shape: kiln_ir::dims(&[2, 64]) }, &[first]);
    let y = b.op(Op::MatMul, &[rows, w]);
    b.g.add_output("y", y);
    let (opt, r) = optimize(&b.g, &Options::default()).expect("optimizes");
    assert!(r.rules_fired.contains_key("product-of-row-slices"), "{:?}", r.rules_fired);
    let products: Vec<_> = opt
        .node_ids()
        .filter(|&n| matches!(opt.node(n).op, Op::MatMul))
        .map(|n| opt.ty(n).shape.clone())
        .collect();
    assert_eq!(products, vec![kiln_ir::dims(&[2, 64])]);
}

#[test]
fn matmul_chains_take_the_cheaper_grouping() {
    // [64, 2] · [2, 64] · [64, 2]: left to right builds a 64×64 intermediate, right to left a
    // 2×2 one; either way it is written, the optimized graph takes the small one.
    for left_first in [true, false] {
        let mut b = Builder::new(1);
        let a = b.input("a", &[64, 2]);
        let m = b.input("m", &[2, 64]);
        let c = b.input("c", &[64, 2]);
        let y = if left_first {
            let am = b.op(Op::MatMul, &[a, m]);
            b.op(Op::MatMul, &[am, c])
        } else {
            let mc = b.op(Op::MatMul, &[m, c]);
            b.op(Op::MatMul, &[a, mc])
        };
        b.g.add_output("y", y);
        let (opt, r) = optimize(&b.g, &Options::default()).expect("optimizes");
        let wide = opt.node_ids().any(|n| opt.ty(n).shape == vec![64, 64]);
        assert!(!wide, "left_first {left_first}: kept the 64×64 intermediate: {:?}", r.rules_fired);
        assert!(r.cost_after <= r.cost_before);
        check(&b.g).expect("same values");
    }
}

#[test]
fn algebra_graphs_do_rewrite() {
    let mut rewritten = 0;
    let mut fired = std::collections::BTreeSet::new();
    for seed in 0..40 {
        let (_, r) = optimize(&algebra_graph(seed), &Options::default()).expect("optimizes");
        if !r.rules_fired.is_empty() {
            rewritten += 1;
        }
        fired.extend(r.rules_fired.keys().cloned());
    }
    assert!(rewritten >= 30, "only {rewritten} of 40 random algebra graphs were rewritten");
    for rule in [
        "transpose-transpose",
        "reshape-reshape",
        "identity-element",
        "div-const-to-mul",
        "pow2-to-mul",
        "matmul-hoist-scale",
    ] {
        assert!(fired.contains(rule), "no random graph exercised {rule}: {fired:?}");
    }
}

/// A random graph generator of one rule family.
type Generator = fn(u64) -> Graph;

#[test]
fn new_rule_families_do_rewrite() {
    // The three properties above are only meaningful if their rules fire on the random graphs.
    // (generator, rules, the fewest of 40 graphs each must fire on): fusion_graph writes a
    // transposed softmax in one of its six branches only.
    let families: [(Generator, &[&str], usize); 5] = [
        (recurrent_graph, &["product-of-row-slices", "concat-of-concats"], 20),
        (transposed_product_graph, &["transpose-matmul", "matmul-of-transposes"], 5),
        (power_graph, &["pow-to-root", "mul-recip-to-div", "one-over-to-recip"], 5),
        (scaled_product_graph, &["scale-through-view", "matmul-hoist-scale", "scalar-reassociate"], 5),
        (fusion_graph, &["transpose-softmax", "transpose-matmul", "pow-to-root", "sum-to-mean"], 2),
    ];
    for (graph, rules, least) in families {
        let mut fired = std::collections::BTreeMap::<String, usize>::new();
        for seed in 0..40 {
            let (_, r) = optimize(&graph(seed), &Options::default()).expect("optimizes");
            for name in r.rules_fired.keys() {
                *fired.entry(name.clone()).or_default() += 1;
            }
        }
        for rule in rules {
            let n = fired.get(*rule).copied().unwrap_or(0);
            assert!(n >= least, "{rule} fired in only {n} of 40 random graphs: {fired:?}");
        }
    }
}

#[test]
fn products_written_transposed_lose_their_transposes() {
    // (bᵀ·aᵀ)ᵀ is a·b: optimized, the three transposes around the product are gone, whatever
    // the operands' ranks and broadcasting; at most the operands' own transposes of inputs
    // are left, and one product.
    let transposes =
        |g: &Graph| g.node_ids().filter(|n| matches!(g.node(*n).op, Op::Transpose { .. })).count();
    let mut cases = 0;
    for seed in 0..40 {
        let (g, form) = transposed_product(seed);
        if form != 1 {
            continue;
        }
        cases += 1;
        let of_inputs = g
            .node_ids()
            .filter(|n| {
                matches!(g.node(*n).op, Op::Transpose { .. })
                    && matches!(g.node(g.operands(*n)[0]).op, Op::Input { .. })
            })
            .count();
        let (opt, r) = optimize(&g, &Options::default()).expect("optimizes");
        assert!(
            transposes(&opt) <= of_inputs,
            "seed {seed}: {} transposes written ({of_inputs} of inputs), {} left",
            transposes(&g),
            transposes(&opt)
        );
        assert_eq!(r.op_counts.get("matmul"), Some(&1), "seed {seed}: {:?}", r.op_counts);
    }
    assert!(cases >= 8, "only {cases} of 40 graphs wrote (bᵀ·aᵀ)ᵀ");
}

#[test]
fn transposed_matmul_chains_stay_small() {
    // transpose-matmul, matmul-of-transposes and transpose-transpose together with
    // matmul-reassociate: a chain of eight products with every other operand and every other
    // partial product transposed saturates in both stages with 518 e-nodes (when written), not
    // an explosion of groupings times transposed forms.
    let mut b = Builder::new(3);
    let mut operands = vec![];
    for i in 0..8 {
        let x = b.input(&format!("m{i}"), &[2, 4, 4]);
        operands.push(if i % 2 == 0 { b.swap(x) } else { x });
    }
    let mut acc = operands[0];
    for (i, o) in operands[1..].iter().enumerate() {
        acc = b.op(Op::MatMul, &[acc, *o]);
        if i % 2 == 0 {
            acc = b.swap(acc);
        }
    }
    b.g.add_output("y", acc);
    let (_, r) = optimize(&b.g, &Options::default()).expect("optimizes");
    assert!(r.stages.iter().all(|s| s.stop_reason == "saturated"), "{:?}", r.stages);
    assert!(r.egraph_nodes < 1000, "{} e-nodes", r.egraph_nodes);
    assert!(r.rules_fired.contains_key("transpose-matmul"), "{:?}", r.rules_fired);
    check(&b.g).expect("same values");
}
