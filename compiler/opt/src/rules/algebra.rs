//! Algebraic simplification: each rule is an identity, stated in its doc comment.

use super::{konst, nodes, same, ty, FnRule, New, Rule};
use crate::analysis::KGraph;
use egg::Id;
use kiln_ir::{BinaryOp as B, Dim, Op, TensorType, UnaryOp as U};

pub fn rules() -> Vec<Rule> {
    vec![
        FnRule::rule("transpose-transpose", transpose_transpose),
        FnRule::rule("transpose-identity", transpose_identity),
        FnRule::rule("reshape-reshape", reshape_reshape),
        FnRule::rule("reshape-identity", reshape_identity),
        FnRule::rule("identity-element", identity_element),
        FnRule::rule("div-const-to-mul", div_const_to_mul),
        FnRule::rule("const-to-right", const_to_right),
        FnRule::rule("scalar-reassociate", scalar_reassociate),
        FnRule::rule("pow2-to-mul", pow2_to_mul),
        FnRule::rule("matmul-hoist-scale", matmul_hoist_scale),
        FnRule::rule("matmul-reassociate", matmul_reassociate),
        FnRule::rule("batch-sum-matmul", batch_sum_matmul),
        FnRule::rule("transpose-matmul", transpose_matmul),
        FnRule::rule("matmul-of-transposes", matmul_of_transposes),
        FnRule::rule("pow-to-root", pow_to_root),
        FnRule::rule("mul-recip-to-div", mul_recip_to_div),
        FnRule::rule("one-over-to-recip", one_over_to_recip),
        FnRule::rule("scale-through-view", scale_through_view),
        FnRule::rule("transpose-softmax", transpose_softmax),
        FnRule::rule("slice-iota", slice_iota),
        FnRule::rule("slice-compare-iotas", slice_compare_iotas),
        FnRule::rule("sum-to-mean", sum_to_mean),
        FnRule::rule("concat-of-concats", concat_of_concats),
        FnRule::rule("product-of-row-slices", product_of_row_slices),
    ]
}

/// concat(…, concat(a, b), …) = concat(…, a, b, …) along one axis, applied through every
/// level at once. A concat built up a piece at a time (a recurrent model collecting its
/// steps' states) copies the first piece once per step, n²/2 copies for n steps; the one
/// concat of every piece copies each once and leaves the partial concats unread.
///
/// Each concat node yields only its fullest flattening (every operand class replaced by its
/// widest concat along the axis, recursively), not every partial one: a chain of n concats
/// then adds n nodes to the e-graph, not n² of them.
fn concat_of_concats(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Concat { axis } = n.ir() else { continue };
        let mut parts = vec![];
        let mut flattened = false;
        for &c in &n.children {
            flattened |= flatten_concat(g, c, *axis, &mut parts, &mut vec![g.find(id)]);
        }
        if flattened {
            out.push(New::over(Op::Concat { axis: *axis }, &parts));
        }
    }
    out
}

/// Appends the pieces that class `id` concatenates along `axis` to `parts`: the operands of
/// its widest such concat, each flattened in turn, or the class itself where it holds none.
/// Returns whether it found a concat. `open` holds the classes being flattened: a concat
/// is longer along its axis than each operand, so only empty operands could lead back to
/// one of them, and such a concat is passed over.
fn flatten_concat(g: &KGraph, id: Id, axis: usize, parts: &mut Vec<Id>, open: &mut Vec<Id>) -> bool {
    let id = g.find(id);
    open.push(id);
    let widest = nodes(g, id)
        .iter()
        .filter(|n| matches!(n.ir(), Op::Concat { axis: a } if *a == axis))
        .filter(|n| n.children.iter().all(|&c| !open.contains(&g.find(c))))
        .max_by_key(|n| n.children.len());
    let found = match widest {
        Some(n) => {
            for &c in &n.children {
                flatten_concat(g, c, axis, parts, open);
            }
            true
        }
        None => {
            parts.push(id);
            false
        }
    };
    open.pop();
    found
}

/// x[rows] @ W = (x @ W)[rows] for a two-dimensional W, where `x[rows]` slices x along an
/// axis other than its last, possibly reshaped with its last axis kept (step t of a sequence,
/// `reshape(x[:, t:t+1], [batch, features])`); a bias and an activation work row by row and
/// come along. Every step of a recurrent model that projects its input this way can then
/// read its rows of one product over the whole sequence: one kernel that reads the weight
/// once, in place of one per step. Extraction takes it where that costs less, and keeps a
/// product over a few rows of a large x (a pooler reading the first token) as it was.
///
/// Extraction switches all the steps at once only if each step's class holds a node over a
/// class they share (the DAG refinement's followers look one class deep). So where a
/// reshape drops the sliced axis, the rows are taken as a slice of the product reshaped
/// once for all steps, `reshape(x @ W, [4, 12·N])[:, t·N:(t+1)·N]`, rather than as a
/// reshape of each step's own slice.
fn product_of_row_slices(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if !matches!(n.ir(), Op::MatMul | Op::MatMulEpilogue { .. }) || ty(g, n.children[1]).rank() != 2 {
            continue;
        }
        for (slice, x, reshaped) in row_slices(g, n.children[0]) {
            let mut operands = vec![New::Class(x)];
            operands.extend(n.children[1..].iter().map(|&c| New::Class(c)));
            let product = New::node(n.ir().clone(), operands);
            let shape = &ty(g, id).shape;
            out.push(match (reshaped, flat_rows(&slice, &ty(g, x).shape, shape)) {
                (false, _) => New::node(slice, vec![product]),
                (true, Some((flat, rows))) => New::node(rows, vec![New::node(flat, vec![product])]),
                (true, None) => {
                    New::node(Op::Reshape { shape: shape.clone() }, vec![New::node(slice, vec![product])])
                }
            });
        }
    }
    out
}

/// The slices of class `a` along an axis other than the last, directly or under a reshape
/// that keeps the last axis (`true`), with the class they slice.
fn row_slices(g: &KGraph, a: Id) -> Vec<(Op, Id, bool)> {
    let slices_of = |c: Id, reshaped: bool| {
        nodes(g, c)
            .iter()
            .filter(
                move |s| matches!(s.ir(), Op::Slice { axis, .. } if axis + 1 < ty(g, s.children[0]).rank()),
            )
            .map(move |s| (s.ir().clone(), s.children[0], reshaped))
    };
    let mut out: Vec<_> = slices_of(a, false).collect();
    for r in nodes(g, a) {
        if matches!(r.ir(), Op::Reshape { .. }) && ty(g, r.children[0]).shape.last() == ty(g, a).shape.last()
        {
            out.extend(slices_of(r.children[0], true));
        }
    }
    out
}

/// For `slice` of an operand of shape `x` along axis k, taken after a product with `N`
/// columns and reshaped to `out`: the reshape that merges the product's axes k.. into one
/// and the slice of it that is `out` itself, where one exists (a step of 1, static extents
/// from axis k on, and `out` the leading axes followed by the merged run).
fn flat_rows(slice: &Op, x: &[Dim], out: &[Dim]) -> Option<(Op, Op)> {
    let Op::Slice { axis, start, end, step: 1 } = slice else { return None };
    let (start, end) = (start.as_const()?, end.as_const()?);
    let columns = out.last()?.as_const()?;
    let mut inner = columns;
    for d in &x[axis + 1..x.len() - 1] {
        inner *= d.as_const()?;
    }
    let extent = x[*axis].as_const()?;
    let mut flat: Vec<Dim> = x[..*axis].to_vec();
    flat.push(Dim::Const(extent * inner));
    let mut rows = x[..*axis].to_vec();
    rows.push(Dim::Const((end - start) * inner));
    (rows == out).then(|| {
        let slice = Op::Slice {
            axis: *axis,
            start: Dim::Const(start * inner),
            end: Dim::Const(end * inner),
            step: 1,
        };
        (Op::Reshape { shape: flat }, slice)
    })
}

/// transpose(transpose(x, p), q) = transpose(x, p∘q).
fn transpose_transpose(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Transpose { perm: outer } = n.ir() else { continue };
        for inner in nodes(g, n.children[0]) {
            if let Op::Transpose { perm: p } = inner.ir() {
                let perm: Vec<usize> = outer.iter().map(|&i| p[i]).collect();
                out.push(New::over(Op::Transpose { perm }, &[inner.children[0]]));
            }
        }
    }
    out
}

/// transpose(x, [0, 1, …]) = x.
fn transpose_identity(g: &KGraph, id: Id) -> Vec<New> {
    nodes(g, id)
        .iter()
        .filter(|n| matches!(n.ir(), Op::Transpose { perm } if perm.iter().enumerate().all(|(i, &p)| i == p)))
        .map(|n| New::Class(n.children[0]))
        .collect()
}

/// reshape(reshape(x, a), b) = reshape(x, b).
fn reshape_reshape(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Reshape { shape } = n.ir() else { continue };
        for inner in nodes(g, n.children[0]) {
            if matches!(inner.ir(), Op::Reshape { .. }) {
                out.push(New::over(Op::Reshape { shape: shape.clone() }, &[inner.children[0]]));
            }
        }
    }
    out
}

/// reshape(x, shape(x)) = x.
fn reshape_identity(g: &KGraph, id: Id) -> Vec<New> {
    nodes(g, id)
        .iter()
        .filter(|n| matches!(n.ir(), Op::Reshape { shape } if *shape == ty(g, n.children[0]).shape))
        .map(|n| New::Class(n.children[0]))
        .collect()
}

/// x·1 = 1·x = x + 0 = 0 + x = x − 0 = x / 1 = x (when no broadcasting changes the shape).
fn identity_element(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Binary(b) = n.ir() else { continue };
        let (l, r) = (n.children[0], n.children[1]);
        let (kl, kr) = (konst(g, l), konst(g, r));
        let keep = |x: Id| (ty(g, x) == ty(g, id)).then_some(New::Class(x));
        let found = match b {
            B::Mul if kr == Some(1.0) => keep(l),
            B::Mul if kl == Some(1.0) => keep(r),
            B::Add if kr == Some(0.0) => keep(l),
            B::Add if kl == Some(0.0) => keep(r),
            B::Sub if kr == Some(0.0) => keep(l),
            B::Div if kr == Some(1.0) => keep(l),
            _ => None,
        };
        out.extend(found);
    }
    out
}

/// x / c = x · (1/c) for a constant c.
fn div_const_to_mul(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Div) {
            continue;
        }
        if let Some(c) = konst(g, n.children[1]) {
            if c != 0.0 && ty(g, n.children[0]).dtype.is_float() {
                let recip = New::constant(1.0 / c, ty(g, n.children[1]));
                out.push(New::node(Op::Binary(B::Mul), vec![New::Class(n.children[0]), recip]));
            }
        }
    }
    out
}

/// c · x = x · c and c + x = x + c for a constant c: constants go right, so rules look in
/// one place.
fn const_to_right(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if let Op::Binary(b @ (B::Mul | B::Add)) = n.ir() {
            if konst(g, n.children[0]).is_some() && konst(g, n.children[1]).is_none() {
                out.push(New::over(Op::Binary(*b), &[n.children[1], n.children[0]]));
            }
        }
    }
    out
}

/// (x · a) · b = x · (a·b) and (x + a) + b = x + (a+b) for scalar constants a, b.
fn scalar_reassociate(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Binary(b @ (B::Mul | B::Add)) = n.ir() else { continue };
        let Some(kb) = konst(g, n.children[1]) else { continue };
        if !ty(g, n.children[1]).is_single() {
            continue;
        }
        for inner in nodes(g, n.children[0]) {
            if inner.ir() != n.ir() {
                continue;
            }
            let (Some(ka), true) = (konst(g, inner.children[1]), ty(g, inner.children[1]).is_single()) else {
                continue;
            };
            let c = if *b == B::Mul { ka * kb } else { ka + kb };
            let cty = ty(g, n.children[1]);
            out.push(New::node(Op::Binary(*b), vec![New::Class(inner.children[0]), New::constant(c, cty)]));
        }
    }
    out
}

/// x² = x · x and x³ = x · (x · x).
fn pow2_to_mul(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Pow) {
            continue;
        }
        let x = n.children[0];
        match konst(g, n.children[1]) {
            Some(2.0) => out.push(New::over(Op::Binary(B::Mul), &[x, x])),
            Some(3.0) => out.push(New::node(
                Op::Binary(B::Mul),
                vec![New::Class(x), New::over(Op::Binary(B::Mul), &[x, x])],
            )),
            _ => {}
        }
    }
    out
}

/// (a · c) @ b = (a @ b) · c and a @ (b · c) = (a @ b) · c for a scalar constant c.
fn matmul_hoist_scale(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if !matches!(n.ir(), Op::MatMul) {
            continue;
        }
        for side in 0..2 {
            for m in nodes(g, n.children[side]) {
                let Op::Binary(B::Mul) = m.ir() else { continue };
                let Some(c) = konst(g, m.children[1]) else { continue };
                if !ty(g, m.children[1]).is_single() || same(g, m.children[0], n.children[side]) {
                    continue;
                }
                let mut operands = n.children.clone();
                operands[side] = m.children[0];
                let scale = New::constant(c, ty(g, m.children[1]));
                out.push(New::node(Op::Binary(B::Mul), vec![New::over(Op::MatMul, &operands), scale]));
            }
        }
    }
    out
}

/// (a @ b) @ c = a @ (b @ c), both ways, for operands of rank ≥ 2 (matrices or batches of
/// them; a rank-1 operand is a vector product, which does not associate this way). The
/// applier keeps a form only if it type-checks to the class's type, so batch axes must
/// broadcast the same way in both groupings. Which grouping is cheaper depends on the shapes
/// (the intermediate's size and the flops); extraction decides.
fn matmul_reassociate(g: &KGraph, id: Id) -> Vec<New> {
    let matrices = |ids: &[Id]| ids.iter().all(|x| ty(g, *x).rank() >= 2);
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::MatMul {
            continue;
        }
        let (l, r) = (n.children[0], n.children[1]);
        for inner in nodes(g, l) {
            let (a, b) = match inner.ir() {
                Op::MatMul => (inner.children[0], inner.children[1]),
                _ => continue,
            };
            if matrices(&[a, b, r]) {
                out.push(New::node(Op::MatMul, vec![New::Class(a), New::over(Op::MatMul, &[b, r])]));
            }
        }
        for inner in nodes(g, r) {
            let (b, c) = match inner.ir() {
                Op::MatMul => (inner.children[0], inner.children[1]),
                _ => continue,
            };
            if matrices(&[l, b, c]) {
                out.push(New::node(Op::MatMul, vec![New::over(Op::MatMul, &[l, b]), New::Class(c)]));
            }
        }
    }
    out
}

/// Σ_b a[b] @ b[b] = a′ @ b′, the sum over every batch axis of a batched product as one
/// product whose contraction runs over the batch axes too: with `a: [B…, m, k]` and
/// `b: [B…, k, n]`, `a′ = reshape(transpose(a, [m, B…, k]), [m, ΠB·k])` and
/// `b′ = reshape(b, [ΠB·k, n])`. This is the weight gradient of `x [B, S, d] · W [d, e]`
/// (`Σ_b x[b]ᵀ · gy[b]`): one `(d × B·S) · (B·S × e)` product instead of B small ones and a
/// `B × d × e` sum. With `transpose-transpose`, `a = x[b]ᵀ` becomes the view `transpose(x,
/// [2, 0, 1])`, whose merge of `B` and `S` the scheduler expresses by strides (no copy).
/// Both operands must have every batch axis (a broadcast operand is another identity), the
/// sum must cover exactly the batch axes; `keepdims` reshapes the product back.
fn batch_sum_matmul(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Reduce { op: kiln_ir::ReduceOp::Sum, axes, keepdims } = n.ir() else { continue };
        let r = ty(g, n.children[0]).rank();
        let batch = r.saturating_sub(2);
        // Reduction axes are sorted and unique (`infer`), so this is "exactly the batch axes".
        if batch == 0 || *axes != (0..batch).collect::<Vec<_>>() {
            continue;
        }
        for m in nodes(g, n.children[0]) {
            if m.ir() != &Op::MatMul {
                continue;
            }
            let (a, b) = (m.children[0], m.children[1]);
            let (sa, sb) = (&ty(g, a).shape, &ty(g, b).shape);
            if sa.len() != r || sb.len() != r || sa[..batch] != sb[..batch] {
                continue;
            }
            let (rows, k, cols) = (sa[batch].clone(), &sa[batch + 1], sb[batch + 1].clone());
            let Ok(depth) = kiln_ir::numel_dim(&sa[..batch]).and_then(|p| p.mul(k)) else { continue };
            let mut perm = vec![batch];
            perm.extend(0..batch);
            perm.push(batch + 1);
            let a2 = New::node(Op::Reshape { shape: vec![rows, depth.clone()] }, vec![permuted(a, perm)]);
            let b2 = New::over(Op::Reshape { shape: vec![depth, cols] }, &[b]);
            let product = New::node(Op::MatMul, vec![a2, b2]);
            out.push(if *keepdims {
                New::node(Op::Reshape { shape: ty(g, id).shape.clone() }, vec![product])
            } else {
                product
            });
        }
    }
    out
}

/// The permutation of one operand of a product that a permutation `perm` of the product's
/// axes induces, for `transpose_matmul`: the operand has rank `rx` (≥ 2), right-aligned with
/// the product's batch axes (numpy broadcasting), so its batch axes are the product's last
/// `rx − 2`; they must be permuted among themselves (else the operand would have to gain or
/// lose an axis). The matrix axes are swapped when `swap` is set. `None` when the operand
/// cannot follow.
fn operand_perm(perm: &[usize], rx: usize, swap: bool) -> Option<Vec<usize>> {
    let batch = perm.len().checked_sub(2)?;
    let offset = perm.len().checked_sub(rx)?;
    if rx < 2 || perm[offset..batch].iter().any(|&p| p < offset) {
        return None;
    }
    let mut p: Vec<usize> = perm[offset..batch].iter().map(|&i| i - offset).collect();
    p.extend(if swap { [rx - 1, rx - 2] } else { [rx - 2, rx - 1] });
    Some(p)
}

/// `x` viewed through `perm`, or `x` itself when `perm` is the identity.
fn permuted(x: Id, perm: Vec<usize>) -> New {
    if perm.iter().enumerate().all(|(i, &p)| i == p) {
        New::Class(x)
    } else {
        New::over(Op::Transpose { perm }, &[x])
    }
}

/// transpose(a @ b, p) = transpose(b, p′) @ transpose(a, p′) when `p` swaps the two matrix
/// axes ((a·b)ᵀ = bᵀ·aᵀ, per batch index), and transpose(a, p′) @ transpose(b, p′) when it
/// keeps them; in both, `p` may permute the batch axes among themselves, and each operand
/// permutes its own batch axes the same way (`operand_perm`; an operand with fewer batch axes
/// broadcasts over the ones it lacks, which `p` may then only permute among themselves). A
/// `p` that moves a batch axis into the matrix or back is no product identity and is left
/// alone, as are rank-1 operands (vector products). This is what makes `(Bᵀ·Aᵀ)ᵀ` the
/// product `A·B` (with `transpose-transpose` and `transpose-identity`), and scores written
/// `(k·qᵀ)ᵀ` the `q·kᵀ` attention looks for.
fn transpose_matmul(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Transpose { perm } = n.ir() else { continue };
        let r = perm.len();
        if r < 2 {
            continue;
        }
        let keep = perm[r - 2] == r - 2 && perm[r - 1] == r - 1;
        let swap = perm[r - 2] == r - 1 && perm[r - 1] == r - 2;
        // Neither: a batch axis moves into the matrix (or out of it), no product identity.
        // The identity permutation is `transpose-identity`'s.
        if !(keep || swap) || perm.iter().enumerate().all(|(i, &p)| i == p) {
            continue;
        }
        for m in nodes(g, n.children[0]) {
            if m.ir() != &Op::MatMul {
                continue;
            }
            let (a, b) = (m.children[0], m.children[1]);
            let (Some(pa), Some(pb)) =
                (operand_perm(perm, ty(g, a).rank(), swap), operand_perm(perm, ty(g, b).rank(), swap))
            else {
                continue;
            };
            let (a, b) = (permuted(a, pa), permuted(b, pb));
            let operands = if swap { vec![b, a] } else { vec![a, b] };
            out.push(New::node(Op::MatMul, operands));
        }
    }
    out
}

/// The swap of the last two axes of a rank-`r` tensor (`Transpose` without `perm`).
fn last_two_swapped(r: usize) -> Vec<usize> {
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    perm
}

/// yᵀ @ xᵀ = (x @ y)ᵀ, with ᵀ the swap of the last two axes and any batch axes (they
/// broadcast the same way in both, being the same axes of the same operands): the other
/// direction of `transpose-matmul`, so a product of transposed operands (`vᵀ·pᵀ`, an
/// attention written for its transposed result) is also a transposed product. Only both
/// operands transposed: one transposed operand alone gains nothing from moving it.
fn matmul_of_transposes(g: &KGraph, id: Id) -> Vec<New> {
    let swapped_of = |x: Id| {
        let r = ty(g, x).rank();
        nodes(g, x)
            .iter()
            .filter(move |n| r >= 2 && n.ir() == &Op::Transpose { perm: last_two_swapped(r) })
            .map(|n| n.children[0])
    };
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::MatMul || ty(g, id).rank() < 2 {
            continue;
        }
        for y in swapped_of(n.children[0]) {
            for x in swapped_of(n.children[1]) {
                let product = New::over(Op::MatMul, &[x, y]);
                out.push(New::node(
                    Op::Transpose { perm: last_two_swapped(ty(g, id).rank()) },
                    vec![product],
                ));
            }
        }
    }
    out
}

/// x¹ = x, x^½ = √x, x^(−½) = 1/√x (`rsqrt`), x^(−1) = 1/x (`recip`), for an exponent that is
/// exactly that splat constant (no tolerance: x^(−0.49) stays a power) and does not broadcast
/// `x` to another shape. The norms and softmax are matched on `sqrt`, `rsqrt` and `recip`;
/// this puts `pow(var + ε, −0.5)`, `pow(…, 0.5)` and `pow(Σ, −1)` in those forms. (x² and x³
/// are `pow2-to-mul`'s.)
fn pow_to_root(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Pow) {
            continue;
        }
        let (x, e) = (n.children[0], n.children[1]);
        if ty(g, x) != ty(g, id) {
            continue;
        }
        let Some(c) = konst(g, e) else { continue };
        if c == 1.0 {
            out.push(New::Class(x));
        } else if c == 0.5 {
            out.push(New::over(Op::Unary(U::Sqrt), &[x]));
        } else if c == -0.5 {
            out.push(New::over(Op::Unary(U::Rsqrt), &[x]));
        } else if c == -1.0 {
            out.push(New::over(Op::Unary(U::Recip), &[x]));
        }
    }
    out
}

/// x · recip(y) = recip(y) · x = x / y: a reciprocal multiplied is a division (the form the
/// norms' `√(var + ε)` denominator is matched in).
fn mul_recip_to_div(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Mul) {
            continue;
        }
        for (x, r) in [(n.children[0], n.children[1]), (n.children[1], n.children[0])] {
            for y in unary_of(g, r, U::Recip) {
                out.push(New::over(Op::Binary(B::Div), &[x, y]));
            }
        }
    }
    out
}

/// 1 / y = recip(y), when the constant 1 does not broadcast `y` to another shape, in a float
/// dtype (an integer 1 / y truncates; `recip` is float-only anyway).
fn one_over_to_recip(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Div) {
            continue;
        }
        let (one, y) = (n.children[0], n.children[1]);
        if konst(g, one) == Some(1.0) && ty(g, y) == ty(g, id) && ty(g, id).dtype.is_float() {
            out.push(New::over(Op::Unary(U::Recip), &[y]));
        }
    }
    out
}

/// transpose(x · c) = transpose(x) · c and reshape(x · c) = reshape(x) · c for a scalar
/// constant `c` that does not broadcast `x` (a view moves elements, a scalar scale does not
/// care where they are). Brings a scale written before a head split (reshape, transpose) or
/// before `kᵀ` to the product's operand, where `matmul-hoist-scale` moves it out.
fn scale_through_view(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if !matches!(n.ir(), Op::Transpose { .. } | Op::Reshape { .. }) {
            continue;
        }
        let scaled = n.children[0];
        for m in nodes(g, scaled) {
            if m.ir() != &Op::Binary(B::Mul) {
                continue;
            }
            let (x, c) = (m.children[0], m.children[1]);
            let (Some(k), true) = (konst(g, c), ty(g, c).is_single()) else { continue };
            if ty(g, x) != ty(g, scaled) || konst(g, x).is_some() {
                continue;
            }
            // A scale on an elementwise value is computed in that value's loop; after a reshape
            // it would be a loop of its own (the scheduler fuses elementwise ops of one shape),
            // so only a transpose, which a product absorbs, takes it there.
            let elementwise = nodes(g, x).iter().all(|e| e.ir().is_elementwise());
            if matches!(n.ir(), Op::Reshape { .. }) && elementwise {
                continue;
            }
            let scale = New::constant(k, &TensorType::new(ty(g, c).dtype, kiln_ir::Shape::new()));
            out.push(New::node(Op::Binary(B::Mul), vec![New::over(n.ir().clone(), &[x]), scale]));
        }
    }
    out
}

/// transpose(softmax(x, a), p) = softmax(transpose(x, p), i) with `p[i] = a`, and the same for
/// log_softmax: normalizing along an axis commutes with moving the axes, as long as the
/// normalized axis is followed to where the permutation puts it. An attention written for its
/// transposed scores (`softmax(k·qᵀ, −2)`, transposed, times `v`) is then a softmax over the
/// last axis of `(k·qᵀ)ᵀ`, which `transpose-matmul` makes `q·kᵀ`.
fn transpose_softmax(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Transpose { perm } = n.ir() else { continue };
        for m in nodes(g, n.children[0]) {
            let (axis, log) = if let Op::Softmax { axis } = m.ir() {
                (*axis, false)
            } else if let Op::LogSoftmax { axis } = m.ir() {
                (*axis, true)
            } else {
                continue;
            };
            let Some(i) = perm.iter().position(|&p| p == axis) else { continue };
            let moved = New::over(Op::Transpose { perm: perm.clone() }, &[m.children[0]]);
            let op = if log { Op::LogSoftmax { axis: i } } else { Op::Softmax { axis: i } };
            out.push(New::node(op, vec![moved]));
        }
    }
    out
}

/// slice(iota(axis a), axis b, start, end, step) = iota(axis a) of the slice's shape, where
/// the slice keeps every index along `a` from the first (`b ≠ a`, or `start = 0` and step 1).
/// A mask built on a table of the largest size and cut to the run's (a causal mask over
/// `max_positions`, sliced to `[S, S]`) is then the iota mask the attention rule reads.
fn slice_iota(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Slice { axis: b, start, step, .. } = n.ir() else { continue };
        for m in nodes(g, n.children[0]) {
            let Op::Iota { dtype, axis: a, .. } = m.ir() else { continue };
            if a != b || (*start == Dim::Const(0) && *step == 1) {
                out.push(New::node(
                    Op::Iota { dtype: *dtype, shape: ty(g, id).shape.clone(), axis: *a },
                    vec![],
                ));
            }
        }
    }
    out
}

/// slice(cmp(x, y)) = cmp(slice(x), slice(y)) for a comparison of two iotas of its own shape:
/// a boolean mask sliced from a larger one (`tril` of the largest size, cut to `[S, S]`)
/// becomes a comparison of sliced iotas, which `slice-iota` makes iotas. Only comparisons of
/// iotas move, so slices do not spread through every elementwise op.
fn slice_compare_iotas(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        let Op::Slice { .. } = n.ir() else { continue };
        let whole = n.children[0];
        for m in nodes(g, whole) {
            let Op::Compare(_) = m.ir() else { continue };
            let iota = |c: Id| {
                ty(g, c).shape == ty(g, whole).shape
                    && nodes(g, c).iter().any(|e| matches!(e.ir(), Op::Iota { .. }))
            };
            if m.children.iter().all(|c| iota(*c)) {
                let sliced = m.children.iter().map(|c| New::over(n.ir().clone(), &[*c])).collect();
                out.push(New::node(m.ir().clone(), sliced));
            }
        }
    }
    out
}

/// sum(x, axes) · c = mean(x, axes) for a scalar constant `c` that is `1/n`, `n` the number of
/// elements each sum adds (static extents; `c·n` within 4 machine epsilons of the dtype of 1,
/// as `close` has it, which `x / n`'s reciprocal meets). A mean written as a sum over the
/// count (`Sum(x, axes: [-1], keepdims: true) / d`) is then the mean the norm rules read.
fn sum_to_mean(g: &KGraph, id: Id) -> Vec<New> {
    let mut out = vec![];
    for n in nodes(g, id) {
        if n.ir() != &Op::Binary(B::Mul) {
            continue;
        }
        let (s, c) = (n.children[0], n.children[1]);
        let (Some(k), true) = (konst(g, c), ty(g, c).is_single()) else { continue };
        let dtype = ty(g, id).dtype;
        for m in nodes(g, s) {
            let Op::Reduce { op: kiln_ir::ReduceOp::Sum, axes, keepdims } = m.ir() else { continue };
            let x = ty(g, m.children[0]);
            let extents: Option<Vec<usize>> =
                axes.iter().map(|&a| x.shape.get(a).and_then(Dim::as_const)).collect();
            let Some(count) = extents.map(|e| e.iter().product::<usize>()) else { continue };
            if count > 0
                && dtype.is_float()
                && ty(g, s) == ty(g, id)
                && super::close(k * count as f64, 1.0, dtype)
            {
                let op = Op::Reduce { op: kiln_ir::ReduceOp::Mean, axes: axes.clone(), keepdims: *keepdims };
                out.push(New::over(op, &[m.children[0]]));
            }
        }
    }
    out
}

/// Whether a class is `op(x)` for a unary op, returning x.
pub fn unary_of(g: &KGraph, id: Id, u: U) -> Vec<Id> {
    nodes(g, id).iter().filter(|n| n.ir() == &Op::Unary(u)).map(|n| n.children[0]).collect()
}
