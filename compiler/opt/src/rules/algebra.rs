//! Algebraic simplification: each rule is an identity, stated in its doc comment.

use super::{konst, nodes, same, ty, FnRule, New, Rule};
use crate::analysis::KGraph;
use egg::Id;
use kiln_ir::{BinaryOp as B, Op, UnaryOp as U};

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
    ]
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
        if ty(g, n.children[1]).numel() != 1 {
            continue;
        }
        for inner in nodes(g, n.children[0]) {
            if inner.ir() != n.ir() {
                continue;
            }
            let (Some(ka), true) = (konst(g, inner.children[1]), ty(g, inner.children[1]).numel() == 1)
            else {
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
                if ty(g, m.children[1]).numel() != 1 || same(g, m.children[0], n.children[side]) {
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

/// Whether a class is `op(x)` for a unary op, returning x.
pub fn unary_of(g: &KGraph, id: Id, u: U) -> Vec<Id> {
    nodes(g, id).iter().filter(|n| n.ir() == &Op::Unary(u)).map(|n| n.children[0]).collect()
}
