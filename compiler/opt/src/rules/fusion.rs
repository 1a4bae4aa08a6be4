//! Fusion: recognizing softmax, the norms, GELU, attention and matmul epilogues in the many
//! forms a spec may write them, and adding the fused op to the same e-class.
//!
//! The rules compose: layer norm without affine is found first, then the affine form on top
//! of it, then a residual add feeding it; softmax is found first, then attention around it.
//! Algebra rules (constants to the right, x / c = x · (1/c), scale hoisting) put the variants
//! into the few shapes these matchers look for.

use super::algebra::unary_of;
use super::{close, konst, nodes, same, ty, FnRule, New, Rule};
use crate::analysis::KGraph;
use egg::Id;
use kiln_ir::{Activation, BinaryOp as B, CompareOp, GeluApprox, NormKind, Op, ReduceOp, UnaryOp as U};

pub fn rules() -> Vec<Rule> {
    vec![
        FnRule::rule("fuse-softmax", softmax),
        FnRule::rule("fuse-log-softmax", log_softmax),
        FnRule::rule("fuse-layer-norm", layer_norm),
        FnRule::rule("fuse-layer-norm-affine", layer_norm_affine),
        FnRule::rule("fuse-rms-norm", rms_norm),
        FnRule::rule("fuse-rms-norm-affine", rms_norm_affine),
        FnRule::rule("fuse-add-norm", add_norm),
        FnRule::rule("fuse-gelu-erf", gelu_erf),
        FnRule::rule("fuse-gelu-tanh", gelu_tanh),
        FnRule::rule("fuse-sigmoid", sigmoid),
        FnRule::rule("fuse-attention", attention),
        FnRule::rule("attention-split-heads", attention_split_heads),
        FnRule::rule("fuse-matmul-bias", matmul_bias),
        FnRule::rule("fuse-matmul-activation", matmul_activation),
    ]
}

// ------------------------------------------------------------------ helpers

/// Operand pairs of the class's `b` nodes; both orders for commutative ops.
fn binary(g: &KGraph, id: Id, b: B) -> Vec<(Id, Id)> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() == &Op::Binary(b) {
            out.push((n.children[0], n.children[1]));
            if matches!(b, B::Add | B::Mul) {
                out.push((n.children[1], n.children[0]));
            }
        }
    }
    out
}

/// Operands of the class's reductions of kind `r` over one axis, keeping dims, with the
/// axis: exactly `axis` when given, any otherwise.
fn reduce_over(g: &KGraph, id: Id, r: ReduceOp, axis: Option<usize>) -> Vec<(Id, usize)> {
    nodes(g, id)
        .iter()
        .filter_map(|n| match n.ir() {
            Op::Reduce { op, axes, keepdims: true } if *op == r && axes.len() == 1 => {
                axis.is_none_or(|want| want == axes[0]).then_some((n.children[0], axes[0]))
            }
            _ => None,
        })
        .collect()
}

/// The axes a norm normalizes: one axis, or a run of adjacent axes that ends at the last
/// (`nn.LayerNorm([C, H, W])`, a group norm over the last three axes of `[N, G, C/G, H, W]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    first: usize,
    last: usize,
}

/// Operands of keepdims means over a [`Span`], with the span.
fn means(g: &KGraph, id: Id) -> Vec<(Id, Span)> {
    nodes(g, id)
        .iter()
        .filter_map(|n| match n.ir() {
            Op::Reduce { op: ReduceOp::Mean, axes, keepdims: true } => {
                let mut sorted = axes.clone();
                sorted.sort_unstable();
                let (first, last) = (*sorted.first()?, *sorted.last()?);
                let adjacent = sorted.windows(2).all(|w| w[1] == w[0] + 1);
                let rank = ty(g, n.children[0]).rank();
                (adjacent && (first == last || last + 1 == rank))
                    .then_some((n.children[0], Span { first, last }))
            }
            _ => None,
        })
        .collect()
}

/// Operands of keepdims means over exactly `span`.
fn means_over(g: &KGraph, id: Id, span: Span) -> Vec<Id> {
    means(g, id).into_iter().filter(|(_, s)| *s == span).map(|(x, _)| x).collect()
}

/// Whether a class is x · x (or x²).
fn is_square_of(g: &KGraph, id: Id, x: Id) -> bool {
    binary(g, id, B::Mul).iter().any(|(a, b)| same(g, *a, x) && same(g, *b, x))
        || binary(g, id, B::Pow).iter().any(|(a, p)| same(g, *a, x) && konst(g, *p) == Some(2.0))
}

/// The scalar constant of a class (a splat of one element), if any.
fn scalar(g: &KGraph, id: Id) -> Option<f64> {
    ty(g, id).is_single().then(|| konst(g, id)).flatten()
}

/// `1 / √(v + eps)` written as rsqrt(v + eps) (for multiplication) or the class under a sqrt
/// (for division): returns (v, eps) for each reading of `id` as the denominator `√(v + eps)`.
fn var_plus_eps(g: &KGraph, id: Id) -> Vec<(Id, f64)> {
    binary(g, id, B::Add).into_iter().filter_map(|(v, e)| Some((v, scalar(g, e)?))).collect()
}

/// Readings of `id` as `num / √(v + eps)`: (num, v, eps), and as `num / √v`: (num, v, 0), a
/// norm written without an ε.
fn over_root(g: &KGraph, id: Id) -> Vec<(Id, Id, f64)> {
    let mut roots = vec![];
    for (num, den) in binary(g, id, B::Div) {
        roots.extend(unary_of(g, den, U::Sqrt).into_iter().map(|s| (num, s)));
    }
    for (num, r) in binary(g, id, B::Mul) {
        roots.extend(unary_of(g, r, U::Rsqrt).into_iter().map(|s| (num, s)));
    }
    let mut out = vec![];
    for (num, s) in roots {
        out.extend(var_plus_eps(g, s).into_iter().map(|(v, e)| (num, v, e)));
        out.push((num, s, 0.0));
    }
    out
}

/// Whether `v` is the variance of `x` over `span`, given the centered `xc = x − μ` and `mu`:
/// mean((x − μ)²) or mean(x²) − μ².
fn is_variance(g: &KGraph, v: Id, x: Id, xc: Id, mu: Id, span: Span) -> bool {
    let mean_of_square = |m: Id, y: Id| means_over(g, m, span).into_iter().any(|sq| is_square_of(g, sq, y));
    let centered = mean_of_square(v, xc);
    let expanded =
        binary(g, v, B::Sub).into_iter().any(|(ms, mu2)| is_square_of(g, mu2, mu) && mean_of_square(ms, x));
    centered || expanded
}

/// A per-feature vector for the last axis of `x`: shape [d].
fn is_feature_vector(g: &KGraph, p: Id, x: Id) -> bool {
    let (pt, xt) = (ty(g, p), ty(g, x));
    pt.rank() == 1 && xt.shape.last() == Some(&pt.shape[0]) && pt.dtype == xt.dtype
}

// ------------------------------------------------------------------ softmax

/// exp(x − max(x)) / Σ exp(x − max(x)) = softmax(x), and exp(x) / Σ exp(x) = softmax(x),
/// along one axis; a reciprocal-multiply denominator too.
fn softmax(g: &KGraph, id: Id) -> Vec<New> {
    let mut pairs = binary(g, id, B::Div);
    for (e, r) in binary(g, id, B::Mul) {
        pairs.extend(unary_of(g, r, U::Recip).into_iter().map(|s| (e, s)));
    }
    let mut out = vec![];
    for (e, s) in pairs {
        for (summed, axis) in reduce_over(g, s, ReduceOp::Sum, None) {
            if !same(g, summed, e) || !ty(g, e).dtype.is_float() {
                continue;
            }
            for d in unary_of(g, e, U::Exp) {
                out.push(New::over(Op::Softmax { axis }, &[d]));
                for (x, m) in binary(g, d, B::Sub) {
                    if reduce_over(g, m, ReduceOp::Max, Some(axis)).iter().any(|(mx, _)| same(g, *mx, x)) {
                        out.push(New::over(Op::Softmax { axis }, &[x]));
                    }
                }
            }
        }
    }
    out
}

/// (x − m) − log Σ exp(x − m) = log_softmax(x) for m = max(x) (or m = 0: x − log Σ exp(x)),
/// and log(softmax(x)) = log_softmax(x).
fn log_softmax(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for x in unary_of(g, id, U::Log) {
        for n in nodes(g, x) {
            if let Op::Softmax { axis } = n.ir() {
                out.push(New::over(Op::LogSoftmax { axis: *axis }, &[n.children[0]]));
            }
        }
    }
    for (d, l) in binary(g, id, B::Sub) {
        for s in unary_of(g, l, U::Log) {
            for (e, axis) in reduce_over(g, s, ReduceOp::Sum, None) {
                if !unary_of(g, e, U::Exp).iter().any(|inner| same(g, *inner, d)) {
                    continue;
                }
                out.push(New::over(Op::LogSoftmax { axis }, &[d]));
                for (x, m) in binary(g, d, B::Sub) {
                    if reduce_over(g, m, ReduceOp::Max, Some(axis)).iter().any(|(mx, _)| same(g, *mx, x)) {
                        out.push(New::over(Op::LogSoftmax { axis }, &[x]));
                    }
                }
            }
        }
    }
    out
}

// ------------------------------------------------------------------ norms

/// The permutation that moves `axis` of a rank-`rank` tensor to the end, keeping the order
/// of the others, and its inverse.
fn axis_to_last(rank: usize, axis: usize) -> (Vec<usize>, Vec<usize>) {
    let to_last: Vec<usize> = (0..rank).filter(|&i| i != axis).chain([axis]).collect();
    let mut back = vec![0; rank];
    for (i, &p) in to_last.iter().enumerate() {
        back[p] = i;
    }
    (to_last, back)
}

/// A norm of `x` over `span`: the fused op itself over the last axis;
/// `transpose(norm(transpose(x)))` over another single axis, since the fused norms normalize
/// the last axis (a channel norm over axis 1 of `[N, C, H, W]` reads `x` through a strided
/// view); over the last few axes, `reshape(norm(reshape(x)))` with those axes merged into one
/// (static extents only).
fn norm_along(g: &KGraph, op: Op, x: Id, span: Span) -> Option<New> {
    let shape = &ty(g, x).shape;
    let rank = shape.len();
    if span.first == span.last && span.last + 1 == rank {
        return Some(New::over(op, &[x]));
    }
    if span.first == span.last {
        let (to_last, back) = axis_to_last(rank, span.first);
        let normed = New::node(op, vec![New::over(Op::Transpose { perm: to_last }, &[x])]);
        return Some(New::node(Op::Transpose { perm: back }, vec![normed]));
    }
    let features: usize =
        shape[span.first..].iter().map(kiln_ir::Dim::as_const).product::<Option<usize>>()?;
    let mut merged = shape[..span.first].to_vec();
    merged.push(kiln_ir::Dim::Const(features));
    let normed = New::node(op, vec![New::over(Op::Reshape { shape: merged }, &[x])]);
    Some(New::node(Op::Reshape { shape: shape.clone() }, vec![normed]))
}

/// (x − μ) / √(σ² + ε) = layer_norm(x) over one axis (`norm_along`), with σ² written either
/// way and the root as sqrt-then-divide or rsqrt-then-multiply.
fn layer_norm(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for (xc, v, eps) in over_root(g, id) {
        for (x, mu) in binary(g, xc, B::Sub) {
            for (m, span) in means(g, mu) {
                if same(g, m, x) && is_variance(g, v, x, xc, mu, span) {
                    out.extend(norm_along(g, Op::LayerNorm { eps, affine: false }, x, span));
                }
            }
        }
    }
    out
}

/// The view a norm's result is seen through where the norm runs over other axes than the
/// last alone (`norm_along`): none, the transpose back from a norm over another axis, or the
/// reshape back from a norm over the last few axes merged into one.
#[derive(Clone, Debug)]
enum Back {
    Direct,
    Transpose(Vec<usize>),
    Reshape(kiln_ir::Shape),
}

/// The norms without affine a class holds, each with the view its result is seen through.
fn plain_norms(g: &KGraph, normed: Id) -> Vec<(&crate::lang::KNode, Back)> {
    let plain = |n: &crate::lang::KNode| {
        matches!(n.ir(), Op::LayerNorm { affine: false, .. } | Op::RmsNorm { affine: false, .. })
    };
    let mut out = vec![];
    for n in nodes(g, normed) {
        let back = match n.ir() {
            _ if plain(n) => {
                out.push((n, Back::Direct));
                continue;
            }
            Op::Transpose { perm } => Back::Transpose(perm.clone()),
            Op::Reshape { shape } => Back::Reshape(shape.clone()),
            _ => continue,
        };
        out.extend(nodes(g, n.children[0]).iter().filter(|m| plain(m)).map(|m| (m, back.clone())));
    }
    out
}

/// The per-feature operand of an affine norm, from `p` applied to `normed`: `p` itself when
/// the norm is over the last axis (`[d]`); for a norm over another axis `a`, transposed back,
/// a `p` that varies along `a` only (`[C, 1, 1]` for the channels of `[N, C, H, W]`),
/// reshaped to `[C]`; for a norm whose features are the last few axes of the view it is
/// reshaped back to, a `p` of exactly those axes (`[C, H, W]`), reshaped to their product.
fn feature_operand(g: &KGraph, p: Id, norm: &crate::lang::KNode, back: &Back) -> Option<New> {
    let x = norm.children[0];
    let (pt, xt) = (ty(g, p), ty(g, x));
    let features = xt.shape.last()?.clone();
    let axes_of_p = |seen: &[kiln_ir::Dim], along: &dyn Fn(usize) -> Option<kiln_ir::Dim>| {
        let lead = seen.len().checked_sub(pt.rank())?;
        let fits = pt
            .shape
            .iter()
            .enumerate()
            .all(|(i, d)| along(i + lead).map_or(*d == kiln_ir::Dim::Const(1), |want| *d == want));
        (pt.dtype == xt.dtype && fits).then(|| New::over(Op::Reshape { shape: vec![features.clone()] }, &[p]))
    };
    match back {
        Back::Direct => is_feature_vector(g, p, x).then_some(New::Class(p)),
        Back::Transpose(perm) => {
            let rank = xt.rank();
            let axis = perm.iter().position(|&b| b + 1 == rank)?;
            let seen: Vec<kiln_ir::Dim> = perm.iter().map(|&b| xt.shape[b].clone()).collect();
            if pt.rank() + axis < seen.len() {
                return None;
            }
            axes_of_p(&seen, &|i| (i == axis).then(|| features.clone()))
        }
        Back::Reshape(seen) => {
            // The trailing axes of the view whose extents multiply to the norm's features.
            let mut first = seen.len();
            let mut product = 1usize;
            let want = features.as_const()?;
            while product < want && first > 0 {
                first -= 1;
                product *= seen[first].as_const()?;
            }
            if product != want || pt.rank() + first < seen.len() {
                return None;
            }
            axes_of_p(seen, &|i| (i >= first).then(|| seen[i].clone()))
        }
    }
}

/// `norm` made affine with `operands` (γ, or γ and β), seen through `back` as it was.
fn affine_norm(norm: &crate::lang::KNode, operands: Vec<New>, back: &Back) -> Option<New> {
    let op = match norm.ir() {
        Op::LayerNorm { eps, affine: false } => Op::LayerNorm { eps: *eps, affine: true },
        Op::RmsNorm { eps, affine: false } => Op::RmsNorm { eps: *eps, affine: true },
        _ => return None,
    };
    let mut children = vec![New::Class(norm.children[0])];
    children.extend(operands);
    let fused = New::node(op, children);
    Some(match back {
        Back::Direct => fused,
        Back::Transpose(perm) => New::node(Op::Transpose { perm: perm.clone() }, vec![fused]),
        Back::Reshape(shape) => New::node(Op::Reshape { shape: shape.clone() }, vec![fused]),
    })
}

/// layer_norm(x) · γ + β = layer_norm(x; γ, β) for per-feature γ, β, and layer_norm(x) · γ =
/// layer_norm(x; γ, 0) for a norm scaled without a shift (the fused kernel adds a constant
/// zero where a separate kernel would reread the normalized tensor to scale it). Over another
/// axis than the last, `transpose(layer_norm(t)) · γ + β = transpose(layer_norm(t; γ′, β′))`
/// with `γ′`, `β′` the vectors of `γ`, `β` (`feature_operand`).
fn layer_norm_affine(g: &KGraph, id: Id) -> Vec<New> {
    let is_layer = |n: &crate::lang::KNode| matches!(n.ir(), Op::LayerNorm { .. });
    let mut out = vec![];
    for (normed, gamma) in binary(g, id, B::Mul) {
        for (n, back) in plain_norms(g, normed).into_iter().filter(|(n, _)| is_layer(n)) {
            if let Some(gamma) = feature_operand(g, gamma, n, &back) {
                let features: kiln_ir::Shape =
                    ty(g, n.children[0]).shape.last().cloned().into_iter().collect();
                let zero = New::constant(0.0, &kiln_ir::TensorType::new(ty(g, id).dtype, features));
                out.extend(affine_norm(n, vec![gamma, zero], &back));
            }
        }
    }
    for (scaled, beta) in binary(g, id, B::Add) {
        for (normed, gamma) in binary(g, scaled, B::Mul) {
            for (n, back) in plain_norms(g, normed).into_iter().filter(|(n, _)| is_layer(n)) {
                let gamma = feature_operand(g, gamma, n, &back);
                let beta = feature_operand(g, beta, n, &back);
                if let (Some(gamma), Some(beta)) = (gamma, beta) {
                    out.extend(affine_norm(n, vec![gamma, beta], &back));
                }
            }
        }
    }
    out
}

/// x / √(mean(x²) + ε) = rms_norm(x) over one axis (`norm_along`).
fn rms_norm(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for (x, ms, eps) in over_root(g, id) {
        for (sq, span) in means(g, ms) {
            if is_square_of(g, sq, x) {
                out.extend(norm_along(g, Op::RmsNorm { eps, affine: false }, x, span));
            }
        }
    }
    out
}

/// rms_norm(x) · γ = rms_norm(x; γ), over the last axis or, transposed back, another
/// (`feature_operand`).
fn rms_norm_affine(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for (normed, gamma) in binary(g, id, B::Mul) {
        for (n, back) in plain_norms(g, normed) {
            if !matches!(n.ir(), Op::RmsNorm { .. }) {
                continue;
            }
            if let Some(gamma) = feature_operand(g, gamma, n, &back) {
                out.extend(affine_norm(n, vec![gamma], &back));
            }
        }
    }
    out
}

/// norm(a + b) = add_norm(a, b): the residual add folded into the norm's read.
fn add_norm(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let (eps, kind, affine) = match n.ir() {
            Op::LayerNorm { eps, affine } => (*eps, NormKind::Layer, *affine),
            Op::RmsNorm { eps, affine } => (*eps, NormKind::Rms, *affine),
            _ => continue,
        };
        for m in nodes(g, n.children[0]) {
            if m.ir() == &Op::Binary(B::Add) {
                let mut operands = m.children.clone();
                operands.extend_from_slice(&n.children[1..]);
                out.push(New::over(Op::AddNorm { eps, kind, affine }, &operands));
            }
        }
    }
    out
}

// ------------------------------------------------------------------ GELU

/// The ways to read a class as a product of factors, expanding `mul` nodes up to `depth`
/// levels; constant factors are multiplied into one number.
fn products(g: &KGraph, id: Id, depth: usize) -> Vec<(Vec<Id>, f64)> {
    let mut out = vec![match scalar(g, id) {
        Some(c) => (vec![], c),
        None => (vec![id], 1.0),
    }];
    if depth == 0 {
        return out;
    }
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Mul)
            || ty(g, n.children[0]) != ty(g, id) && ty(g, n.children[1]) != ty(g, id)
        {
            continue;
        }
        for (fa, ca) in products(g, n.children[0], depth - 1) {
            for (fb, cb) in products(g, n.children[1], depth - 1) {
                out.push(([fa.as_slice(), fb.as_slice()].concat(), ca * cb));
                if out.len() > 64 {
                    return out;
                }
            }
        }
    }
    out
}

/// Readings of a class as `1 + f(u)` for a unary `f`: returns u.
fn one_plus(g: &KGraph, id: Id, f: U) -> Vec<Id> {
    binary(g, id, B::Add)
        .into_iter()
        .filter(|(_, one)| scalar(g, *one) == Some(1.0))
        .flat_map(|(t, _)| unary_of(g, t, f))
        .collect()
}

/// Readings of `id` as c · x for a scalar constant c: (x, c).
fn scaled(g: &KGraph, id: Id) -> Vec<(Id, f64)> {
    products(g, id, 2).into_iter().filter(|(f, _)| f.len() == 1).map(|(f, c)| (f[0], c)).collect()
}

/// Readings of `id` as `1 + e^{−x}`: x, for −x written `neg(x)` or `x · −1`.
fn one_plus_exp_neg(g: &KGraph, id: Id) -> Vec<Id> {
    let mut out = vec![];
    for e in one_plus(g, id, U::Exp) {
        out.extend(unary_of(g, e, U::Neg));
        out.extend(scaled(g, e).into_iter().filter(|(_, k)| *k == -1.0).map(|(x, _)| x));
    }
    out
}

/// 1 / (1 + e^{−x}) = sigmoid(x), the division written as one (`1 / d`, which
/// `one-over-to-recip` also makes `recip(d)`) or as a reciprocal.
fn sigmoid(g: &KGraph, id: Id) -> Vec<New> {
    let mut dens = unary_of(g, id, U::Recip);
    dens.extend(
        binary(g, id, B::Div).into_iter().filter(|(one, _)| scalar(g, *one) == Some(1.0)).map(|(_, d)| d),
    );
    let mut out = vec![];
    for d in dens {
        for x in one_plus_exp_neg(g, d) {
            if ty(g, x) == ty(g, id) && ty(g, x).dtype.is_float() {
                out.push(New::over(Op::Unary(U::Sigmoid), &[x]));
            }
        }
    }
    out
}

/// ½·x·(1 + erf(x/√2)) = gelu(x), in any order and grouping of the product.
fn gelu_erf(g: &KGraph, id: Id) -> Vec<New> {
    let d = ty(g, id).dtype;
    let mut out = vec![];
    for (factors, c) in products(g, id, 3) {
        if factors.len() != 2 || !close(c, 0.5, d) {
            continue;
        }
        for (x, t) in [(factors[0], factors[1]), (factors[1], factors[0])] {
            let matches = one_plus(g, t, U::Erf).into_iter().any(|u| {
                scaled(g, u)
                    .iter()
                    .any(|(ux, k)| same(g, *ux, x) && close(*k, std::f64::consts::FRAC_1_SQRT_2, d))
            });
            if matches {
                out.push(New::over(Op::Gelu { approx: GeluApprox::Erf }, &[x]));
            }
        }
    }
    out
}

/// ½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) = gelu_tanh(x).
fn gelu_tanh(g: &KGraph, id: Id) -> Vec<New> {
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let d = ty(g, id).dtype;
    let mut out = vec![];
    for (factors, c) in products(g, id, 3) {
        if factors.len() != 2 || !close(c, 0.5, d) {
            continue;
        }
        for (x, t) in [(factors[0], factors[1]), (factors[1], factors[0])] {
            let inner_ok = |inner: Id| {
                binary(g, inner, B::Add).into_iter().any(|(a, cube)| {
                    same(g, a, x)
                        && products(g, cube, 3).iter().any(|(f, c3)| {
                            close(*c3, 0.044715, d) && f.len() == 3 && f.iter().all(|y| same(g, *y, x))
                        })
                })
            };
            let matches = one_plus(g, t, U::Tanh)
                .into_iter()
                .any(|u| scaled(g, u).iter().any(|(inner, c1)| close(*c1, k, d) && inner_ok(*inner)));
            if matches {
                out.push(New::over(Op::Gelu { approx: GeluApprox::Tanh }, &[x]));
            }
        }
    }
    out
}

// ------------------------------------------------------------------ attention

/// A reading of attention scores: q · kᵀ · scale (+ mask) (causally masked).
#[derive(Clone, Debug)]
struct Scores {
    q: New,
    kt: Id,
    scale: f64,
    mask: Option<New>,
    causal: bool,
}

/// Which positions a causal condition over the scores' `[Sq, Sk]` selects: the kept ones
/// (`j ≤ i`, written `iota(axis 0) >= iota(axis 1)` or `iota(axis 1) <= iota(axis 0)`), as
/// `where(keep, s, −inf)` takes them, or the dropped ones (`j > i`, written
/// `iota(axis 1) > iota(axis 0)` or `iota(axis 0) < iota(axis 1)`), as a masked fill
/// `where(drop, −inf, s)` takes them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Selects {
    Kept,
    Dropped,
}

/// Whether `cond` is the causal condition that selects `selects` over the last two axes of
/// `scores`, on iotas of exactly the scores' `[Sq, Sk]` (a smaller one would broadcast a
/// different mask).
fn is_causal_condition(g: &KGraph, cond: Id, scores: Id, selects: Selects) -> bool {
    let s = &ty(g, scores).shape;
    let want = s[s.len().saturating_sub(2)..].to_vec();
    let iota_axis = |id: Id| {
        nodes(g, id).iter().find_map(|n| match n.ir() {
            Op::Iota { shape, axis, .. } if *shape == want => Some(*axis),
            _ => None,
        })
    };
    let rows_cols = |n: &crate::lang::KNode, row: usize, col: usize| {
        iota_axis(n.children[row]) == Some(0) && iota_axis(n.children[col]) == Some(1)
    };
    nodes(g, cond).iter().any(|n| match (n.ir(), selects) {
        // i >= j, j <= i
        (Op::Compare(CompareOp::Ge), Selects::Kept) => rows_cols(n, 0, 1),
        (Op::Compare(CompareOp::Le), Selects::Kept) => rows_cols(n, 1, 0),
        // j > i, i < j
        (Op::Compare(CompareOp::Gt), Selects::Dropped) => rows_cols(n, 1, 0),
        (Op::Compare(CompareOp::Lt), Selects::Dropped) => rows_cols(n, 0, 1),
        _ => false,
    })
}

/// What a masked score is filled with: −inf, or the lowest finite value of the dtype as
/// models write it for −inf (`torch.finfo(dtype).min`, so that a row masked throughout gives
/// uniform weights instead of NaN): any constant at most half of it. Such a fill absorbs
/// every score added to it (`s + c` rounds to `c` for `|s|` below half an ulp of `c`, 1e31 in
/// f32), and its weight `exp(c − max)` is 0 in the dtype wherever a row keeps one score.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fill {
    MinusInf,
    Lowest(f64),
}

impl Fill {
    fn of(g: &KGraph, id: Id) -> Option<Fill> {
        let c = scalar(g, id)?;
        let max = match ty(g, id).dtype {
            kiln_ir::DType::F32 => f32::MAX as f64,
            kiln_ir::DType::F64 => f64::MAX,
            kiln_ir::DType::F16 => half::f16::MAX.to_f64(),
            kiln_ir::DType::BF16 => half::bf16::MAX.to_f64(),
            kiln_ir::DType::I32 | kiln_ir::DType::I64 | kiln_ir::DType::Bool => return None,
        };
        match c {
            f64::NEG_INFINITY => Some(Fill::MinusInf),
            c if c.is_finite() && c <= -0.5 * max => Some(Fill::Lowest(c)),
            _ => None,
        }
    }

    fn value(self) -> f64 {
        match self {
            Fill::MinusInf => f64::NEG_INFINITY,
            Fill::Lowest(c) => c,
        }
    }
}

/// Readings of `id` as a mask that is −inf (or the dtype's lowest value, [`Fill`]) where a
/// condition selects and a value elsewhere: `where(keep, v, −inf)` (the condition keeps) and
/// `where(drop, −inf, v)` (it drops), as (condition, what it selects, v, the fill).
fn minus_inf_where(g: &KGraph, id: Id) -> Vec<(Id, Selects, Id, Fill)> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Where {
            continue;
        }
        let [cond, a, b] = n.children[..] else { continue };
        if let Some(fill) = Fill::of(g, b) {
            out.push((cond, Selects::Kept, a, fill));
        }
        if let Some(fill) = Fill::of(g, a) {
            out.push((cond, Selects::Dropped, b, fill));
        }
    }
    out
}

/// Whether a masked fill of `fill` over scores `s` is the additive mask `where(…, 0, fill)`:
/// −inf always; the dtype's lowest value in f32 and f64, where it absorbs any score below
/// 1e31 (f32) in magnitude, so that a row masked throughout is uniform either way, but not in
/// 16 bits, whose lowest value absorbs only scores below 16 (f16) in magnitude.
fn additive_fill(g: &KGraph, s: Id, fill: Fill) -> bool {
    match fill {
        Fill::MinusInf => true,
        Fill::Lowest(_) => matches!(ty(g, s).dtype, kiln_ir::DType::F32 | kiln_ir::DType::F64),
    }
}

/// The readings of `id` as `q · kᵀ`, optionally times a scalar constant: (q, kᵀ, scale).
fn scaled_products(g: &KGraph, id: Id) -> Vec<(Id, Id, f64)> {
    let product = |n: &crate::lang::KNode| {
        n.ir() == &Op::MatMul && ty(g, n.children[0]).rank() >= 2 && ty(g, n.children[1]).rank() >= 2
    };
    let mut out: Vec<(Id, Id, f64)> =
        nodes(g, id).iter().filter(|n| product(n)).map(|n| (n.children[0], n.children[1], 1.0)).collect();
    for (s, c) in binary(g, id, B::Mul) {
        let Some(c) = scalar(g, c) else { continue };
        out.extend(nodes(g, s).iter().filter(|n| product(n)).map(|n| (n.children[0], n.children[1], c)));
    }
    out
}

/// The readings of `id` as attention scores; the mask (outermost) and the causal condition
/// may come in either order, the scale sits directly on the product. A causal condition
/// comes as a `where` with −inf on the scores or as an added mask `where(…, 0, −inf)`
/// (`where(…, −inf, 0)` for the dropping form).
fn scores(g: &KGraph, id: Id, masked: bool, causal: bool) -> Vec<Scores> {
    let mut out: Vec<Scores> = scaled_products(g, id)
        .into_iter()
        .map(|(q, kt, scale)| Scores { q: New::Class(q), kt, scale, mask: None, causal: false })
        .collect();
    // A scale that is a tensor, not a constant (a learned temperature, one per head), and
    // does not vary along the keys: it scales the queries instead, (q·kᵀ)·t = (q·t)·kᵀ and
    // (q·kᵀ)/t = (q/t)·kᵀ.
    let tensor_scales = binary(g, id, B::Mul).into_iter().map(|(s, t)| (s, t, B::Mul));
    for (s, t, op) in tensor_scales.chain(binary(g, id, B::Div).into_iter().map(|(s, t)| (s, t, B::Div))) {
        let (tt, st) = (ty(g, t), ty(g, s));
        let along_keys = tt.shape.last().is_some_and(|d| *d != kiln_ir::Dim::Const(1));
        if scalar(g, t).is_some() || along_keys || tt.dtype != st.dtype || tt.rank() > st.rank() {
            continue;
        }
        for (q, kt, scale) in scaled_products(g, s) {
            let q = New::node(Op::Binary(op), vec![New::Class(q), New::Class(t)]);
            out.push(Scores { q, kt, scale, mask: None, causal: false });
        }
    }
    for (cond, selects, s, fill) in minus_inf_where(g, id) {
        // A row keeps its diagonal, so a causal fill of the dtype's lowest value weighs 0 as
        // −inf does; unless a mask under it lowers the kept scores as far (a query whose
        // past is all padding), where the written form spreads the weights over every key,
        // so that fill only counts over unmasked scores.
        if !causal && is_causal_condition(g, cond, s, selects) {
            for mut sc in scores(g, s, masked, true) {
                if fill == Fill::MinusInf || sc.mask.is_none() {
                    sc.causal = true;
                    out.push(sc);
                }
            }
        } else if !masked && ty(g, cond).dtype == kiln_ir::DType::Bool && additive_fill(g, s, fill) {
            // where(keep, s, −inf) = s + where(keep, 0, −inf) and where(drop, −inf, s) =
            // s + where(drop, −inf, 0): a boolean mask becomes additive (the same with the
            // dtype's lowest value, which absorbs the scores added to it).
            let zero = kiln_ir::TensorType::new(ty(g, s).dtype, kiln_ir::Shape::new());
            let minus_inf = New::constant(fill.value(), &zero);
            let zero = New::constant(0.0, &zero);
            let branches = match selects {
                Selects::Kept => vec![New::Class(cond), zero, minus_inf],
                Selects::Dropped => vec![New::Class(cond), minus_inf, zero],
            };
            let additive = New::node(Op::Where, branches);
            for mut sc in scores(g, s, true, causal) {
                if sc.mask.is_none() {
                    sc.mask = Some(additive.clone());
                    out.push(sc);
                }
            }
        }
    }
    for (s, mask) in binary(g, id, B::Add) {
        // An added causal mask, where(keep, 0, −inf) or where(drop, −inf, 0), of the scores'
        // own [Sq, Sk]: the causal flag, with no mask tensor to read (with the dtype's lowest
        // value for −inf, over unmasked scores only, as above).
        let added_causal = if causal {
            None
        } else {
            minus_inf_where(g, mask).into_iter().find_map(|(cond, selects, v, fill)| {
                (scalar(g, v) == Some(0.0) && is_causal_condition(g, cond, s, selects)).then_some(fill)
            })
        };
        if let Some(fill) = added_causal {
            for mut sc in scores(g, s, masked, true) {
                if fill == Fill::MinusInf || sc.mask.is_none() {
                    sc.causal = true;
                    out.push(sc);
                }
            }
        }
    }
    if !masked {
        for (s, mask) in binary(g, id, B::Add) {
            if scalar(g, mask).is_some() && konst(g, mask) == Some(0.0) {
                // Adding zero: no mask at all.
                out.extend(scores(g, s, true, causal));
                continue;
            }
            for mut sc in scores(g, s, true, causal) {
                if sc.mask.is_none() {
                    sc.mask = Some(New::Class(mask));
                    out.push(sc);
                }
            }
        }
    }
    out
}

/// softmax(q·kᵀ·scale + mask, causal) · v = attention(q, k, v, mask).
fn attention(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::MatMul {
            continue;
        }
        let (p, v) = (n.children[0], n.children[1]);
        for sm in nodes(g, p) {
            let Op::Softmax { axis } = sm.ir() else { continue };
            if axis + 1 != ty(g, p).rank() {
                continue;
            }
            for s in scores(g, sm.children[0], false, false) {
                let rank = ty(g, s.kt).rank();
                if rank < 2 {
                    continue;
                }
                let mut perm: Vec<usize> = (0..rank).collect();
                perm.swap(rank - 2, rank - 1);
                let k = New::over(Op::Transpose { perm }, &[s.kt]);
                let op = Op::Attention { scale: s.scale, causal: s.causal, masked: s.mask.is_some() };
                let mut children = vec![s.q, k, New::Class(v)];
                children.extend(s.mask);
                out.push(New::node(op, children));
            }
        }
    }
    out
}

/// attention(q, reshape(k′), reshape(v′)) = reshape(attention(reshape(q), k′, v′)) where `k′`
/// and `v′` hold the heads axis split in two, `[…, A, G, S, d]` for `[…, A·G, S, d]`, and `q`'s
/// heads are split the same way. Grouped-query attention repeats each of `A` key and value
/// heads `G` times (`reshape(broadcast_to(k, […, A, G, S, d]))`); on the split axes the
/// repeat stays a broadcast, which the attention kernel reads through stride-0 views instead
/// of copying (the reshape of a broadcast is a copy; `TargetCost::reshape_of_broadcast_time`).
/// A mask of rank ≥ 3 must have extent 1 on the heads axis and gets a unit axis there.
fn attention_split_heads(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Attention { .. } = n.ir() else { continue };
        let (q, k, v) = (n.children[0], n.children[1], n.children[2]);
        let r = ty(g, k).rank();
        if r < 3 {
            continue;
        }
        // The split `[A, G]` of the heads axis (r − 3) that `x`'s shape shows, if it is `k`'s
        // or `v`'s shape with that axis split.
        let split_of = |x: Id, of: Id| -> Option<(kiln_ir::Dim, kiln_ir::Dim)> {
            let (xs, os) = (&ty(g, x).shape, &ty(g, of).shape);
            let product = xs.get(r - 3)?.as_const()? * xs.get(r - 2)?.as_const()?;
            let same_rest = xs.len() == r + 1 && xs[..r - 3] == os[..r - 3] && xs[r - 1..] == os[r - 2..];
            (same_rest && os[r - 3].as_const() == Some(product))
                .then(|| (xs[r - 3].clone(), xs[r - 2].clone()))
        };
        let reshaped = |c: Id| -> Vec<Id> {
            nodes(g, c)
                .iter()
                .filter(|m| matches!(m.ir(), Op::Reshape { .. }))
                .map(|m| m.children[0])
                .collect()
        };
        for kx in reshaped(k) {
            let Some(split) = split_of(kx, k) else { continue };
            for vx in reshaped(v) {
                if split_of(vx, v) != Some(split.clone()) {
                    continue;
                }
                let with_split = |shape: &[kiln_ir::Dim]| {
                    let mut s = shape[..r - 3].to_vec();
                    s.extend([split.0.clone(), split.1.clone()]);
                    s.extend_from_slice(&shape[r - 2..]);
                    s
                };
                let mut children = vec![
                    New::over(Op::Reshape { shape: with_split(&ty(g, q).shape) }, &[q]),
                    New::Class(kx),
                    New::Class(vx),
                ];
                if let Some(&mask) = n.children.get(3) {
                    let ms = &ty(g, mask).shape;
                    if ms.len() < 3 {
                        children.push(New::Class(mask));
                    } else if ms.len() == r && ms[r - 3] == kiln_ir::Dim::Const(1) {
                        let mut unit = ms.clone();
                        unit.insert(r - 3, kiln_ir::Dim::Const(1));
                        children.push(New::over(Op::Reshape { shape: unit }, &[mask]));
                    } else {
                        continue;
                    }
                }
                let split_attention = New::node(n.ir().clone(), children);
                out.push(New::node(Op::Reshape { shape: ty(g, id).shape.clone() }, vec![split_attention]));
            }
        }
    }
    out
}

// ------------------------------------------------------------------ matmul epilogues

/// a @ b + bias = matmul_epilogue(a, b, bias) for a bias over the output's last axis: a
/// vector `[N]`, or one written with leading axes of extent 1 (`[1, N]`, `[1, 1, N]`, no more
/// axes than the product has), which the epilogue reads reshaped to `[N]`.
fn matmul_bias(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for (mm, bias) in binary(g, id, B::Add) {
        let (bt, yt) = (ty(g, bias), ty(g, id));
        let Some((last, leading)) = bt.shape.split_last() else { continue };
        let row = leading.iter().all(|d| *d == kiln_ir::Dim::Const(1)) && bt.rank() <= ty(g, mm).rank();
        if !row || yt.shape.last() != Some(last) {
            continue;
        }
        let vector = if bt.rank() == 1 {
            New::Class(bias)
        } else {
            New::over(Op::Reshape { shape: vec![last.clone()] }, &[bias])
        };
        for n in nodes(g, mm) {
            if n.ir() == &Op::MatMul {
                let op = Op::MatMulEpilogue { bias: true, activation: Activation::None };
                out.push(New::node(
                    op,
                    vec![New::Class(n.children[0]), New::Class(n.children[1]), vector.clone()],
                ));
            }
        }
    }
    out
}

/// act(matmul_epilogue(…)) = matmul_epilogue(…, act) for relu, GELU, sigmoid, tanh and SiLU
/// (`z · sigmoid(z)`, either order, or `z / (1 + e^{−z})`), and act(a @ b) = matmul_epilogue(a, b; act) for a
/// product without a bias (the activation then runs on the product's tile in registers
/// instead of as a kernel that rereads it).
fn matmul_activation(g: &KGraph, id: Id) -> Vec<New> {
    let mut activations = vec![];
    for n in nodes(g, id) {
        let activation = match n.ir() {
            Op::Unary(U::Relu) => Activation::Relu,
            Op::Unary(U::Sigmoid) => Activation::Sigmoid,
            Op::Unary(U::Tanh) => Activation::Tanh,
            Op::Gelu { approx } => Activation::Gelu(*approx),
            _ => continue,
        };
        activations.push((activation, n.children[0]));
    }
    for (z, s) in binary(g, id, B::Mul) {
        if unary_of(g, s, U::Sigmoid).iter().any(|x| same(g, *x, z)) {
            activations.push((Activation::Silu, z));
        }
    }
    for (z, d) in binary(g, id, B::Div) {
        if one_plus_exp_neg(g, d).iter().any(|x| same(g, *x, z)) {
            activations.push((Activation::Silu, z));
        }
    }
    let mut out = vec![];
    for (activation, z) in activations {
        for m in nodes(g, z) {
            let bias = match m.ir() {
                Op::MatMul => false,
                Op::MatMulEpilogue { bias, activation: Activation::None } => *bias,
                _ => continue,
            };
            out.push(New::over(Op::MatMulEpilogue { bias, activation }, &m.children));
        }
    }
    out
}
