//! Lowering of each language op to IR ops (most are one IR op; a few are sugar).

use crate::lower::{LValue, Lowerer, Operand};
use kiln_ir::{
    Activation, BinaryOp, CompareOp, DType, Dim, GeluApprox, NodeId, NormKind, Op, PoolKind, ReduceOp,
    Tensor, UnaryOp,
};
use kiln_spec::{Arg, Expr, OpCall, Span, SpannedCExpr};

/// Resolves a possibly negative axis against a rank.
fn axis_of(l: &mut Lowerer, e: &SpannedCExpr, rank: usize) -> Option<usize> {
    let a = l.cint(e, "an axis")?;
    let r = rank as i64;
    let resolved = if a < 0 { a + r } else { a };
    if resolved < 0 || resolved >= r.max(1) {
        let msg = format!("axis {a} is out of range for a tensor of rank {rank}");
        l.diags.push(kiln_spec::Diagnostic::error(msg).at(e.span, "axis out of range"));
        return None;
    }
    Some(resolved as usize)
}

/// One integer or a list of integers.
fn ints(l: &mut Lowerer, a: &Arg) -> Option<Vec<i64>> {
    match a {
        Arg::Config(e) => Some(vec![l.cint(e, "an integer")?]),
        Arg::List(es, _) => es.iter().map(|e| l.cint(e, "an integer")).collect(),
        _ => None,
    }
}

fn ints_span(a: &Arg) -> Span {
    match a {
        Arg::Config(e) => e.span,
        Arg::List(_, s) => *s,
        _ => Span::default(),
    }
}

/// A pair attribute given as one integer (both axes) or `[h, w]`.
fn pair(l: &mut Lowerer, a: &Arg, what: &str) -> Option<[usize; 2]> {
    pair_from(l, a, what, 0)
}

/// A stride, dilation or kernel size: 0 has no meaning (a dilation of 0 would stack every
/// tap of the window on one pixel), so each must be at least 1.
fn positive_pair(l: &mut Lowerer, a: &Arg, what: &str) -> Option<[usize; 2]> {
    pair_from(l, a, what, 1)
}

fn pair_from(l: &mut Lowerer, a: &Arg, what: &str, min: i64) -> Option<[usize; 2]> {
    let v = ints(l, a)?;
    let bad = v.iter().any(|&x| x < min);
    let kind = if min > 0 { "positive" } else { "non-negative" };
    match (v.as_slice(), bad) {
        ([x], false) => Some([*x as usize, *x as usize]),
        ([h, w], false) => Some([*h as usize, *w as usize]),
        _ => {
            l.diags.push(
                kiln_spec::Diagnostic::error(format!("{what} must be one {kind} integer or a pair [h, w]"))
                    .at(ints_span(a), "expected n or [h, w]"),
            );
            None
        }
    }
}

/// A norm's `eps`: finite and not negative (NaN is refused by config evaluation already); a
/// negative or infinite one makes every output NaN or zero.
fn eps_or(l: &mut Lowerer, call: &OpCall, i: usize, default: f64) -> Option<f64> {
    let eps = float_or(l, call, i, "`eps`", default)?;
    if !(eps.is_finite() && eps >= 0.0) {
        if let Some(e) = config_arg(call, i) {
            let msg = format!("`eps` must be a finite non-negative number, but it is {eps}");
            l.diags.push(kiln_spec::Diagnostic::error(msg).at(e.span, "invalid eps"));
        }
        return None;
    }
    Some(eps)
}

fn tensor_arg(call: &OpCall, i: usize) -> &Expr {
    match &call.args[i] {
        Some(Arg::Tensor(e)) => e,
        _ => unreachable!("the converter checked tensor argument {i} of `{}`", call.sig.name),
    }
}

fn config_arg(call: &OpCall, i: usize) -> Option<&SpannedCExpr> {
    match &call.args[i] {
        Some(Arg::Config(e)) => Some(e),
        _ => None,
    }
}

fn dtype_arg(l: &mut Lowerer, call: &OpCall, i: usize, default: DType) -> Option<DType> {
    match &call.args[i] {
        Some(Arg::DType(d, s)) => l.dtype(d, *s),
        _ => Some(default),
    }
}

/// A shape argument, each extent a constant or a size over the symbols; with `allow_infer`
/// one may be -1 (`None`).
fn shape_arg_with(l: &mut Lowerer, call: &OpCall, i: usize, allow_infer: bool) -> Option<Vec<Option<Dim>>> {
    match &call.args[i] {
        Some(Arg::Shape(s)) => l.shape_with(s, allow_infer),
        _ => None,
    }
}

fn shape_arg(l: &mut Lowerer, call: &OpCall, i: usize) -> Option<Vec<Dim>> {
    shape_arg_with(l, call, i, false)?.into_iter().collect()
}

/// The extent a reshape's -1 stands for: the element count of `from` divided by the product
/// of the `known` extents. Extents equal on both sides cancel first (`[batch, seq, 384]` to
/// `[batch, seq, 12, -1]`), so the rest must divide as constants.
fn inferred_extent(from: &[Dim], known: &[Dim]) -> Option<Dim> {
    let mut rest: Vec<Dim> = from.to_vec();
    let mut divisor: usize = 1;
    for k in known {
        match (k, rest.iter().position(|d| d == k && !d.is_static())) {
            (_, Some(i)) => {
                rest.remove(i);
            }
            (Dim::Const(c), None) => divisor = divisor.saturating_mul(*c),
            (Dim::Sym(_), None) => return None,
        }
    }
    let total = kiln_ir::numel_dim(&rest).ok()?;
    match total {
        // Saturating: extents from `--set` may multiply past usize (the typing rules then
        // refuse the shape; a saturated product divides nothing).
        Dim::Const(t) if divisor != 0 && t.is_multiple_of(divisor) => Some(Dim::Const(t / divisor)),
        Dim::Const(_) => None,
        Dim::Sym(e) => {
            let k = i64::try_from(divisor).ok().filter(|k| *k > 0)?;
            Dim::from_expr(e.div_exact(k).ok()?).ok()
        }
    }
}

/// Lowers the op's `i`-th argument as a node; weak literals take `dtype`.
fn node_arg(l: &mut Lowerer, call: &OpCall, i: usize) -> Option<NodeId> {
    let e = tensor_arg(call, i);
    let o = l.operand(e)?;
    let d = l.common_dtype(&[o]);
    l.materialize(o, d, e.span())
}

/// Lowers the tensor arguments at `idx`, each `None` when left out. Every given argument is
/// lowered (so each reports its own errors) before any failure returns; weak literals take the
/// dtype of the first tensor among them.
fn tensor_args(l: &mut Lowerer, call: &OpCall, idx: &[usize]) -> Option<Vec<Option<NodeId>>> {
    let exprs: Vec<Option<&Expr>> = idx
        .iter()
        .map(|&i| match &call.args[i] {
            Some(Arg::Tensor(e)) => Some(e),
            _ => None,
        })
        .collect();
    let mut ok = true;
    let mut ops: Vec<Option<Operand>> = Vec::with_capacity(idx.len());
    for e in &exprs {
        let o = e.and_then(|e| l.operand(e));
        ok &= e.is_none() || o.is_some();
        ops.push(o);
    }
    if !ok {
        return None;
    }
    let given: Vec<Operand> = ops.iter().flatten().copied().collect();
    let d = l.common_dtype(&given);
    let mut out = Vec::with_capacity(idx.len());
    for (o, e) in ops.into_iter().zip(&exprs) {
        out.push(match (o, e) {
            (Some(o), Some(e)) => Some(l.materialize(o, d, e.span())?),
            _ => None,
        });
    }
    Some(out)
}

/// The spec expressions of the tensor arguments at `idx` that are given, in order.
fn given_exprs<'c>(call: &'c OpCall, idx: &[usize]) -> Vec<&'c Expr> {
    idx.iter()
        .filter_map(|&i| match &call.args[i] {
            Some(Arg::Tensor(e)) => Some(e),
            _ => None,
        })
        .collect()
}

/// The value of an `ArgKind::Name` argument, or `default` when left out.
fn name_arg<'c>(call: &'c OpCall, i: usize, default: &'c str) -> &'c str {
    match &call.args[i] {
        Some(Arg::Name(n, _)) => n,
        _ => default,
    }
}

fn float_or(l: &mut Lowerer, call: &OpCall, i: usize, what: &str, default: f64) -> Option<f64> {
    match config_arg(call, i) {
        Some(e) => l.cfloat(e, what),
        None => Some(default),
    }
}

fn bool_or(l: &mut Lowerer, call: &OpCall, i: usize, what: &str, default: bool) -> Option<bool> {
    match config_arg(call, i) {
        Some(e) => l.cbool(e, what),
        None => Some(default),
    }
}

/// An error about which optional tensor arguments were given together.
fn arg_combination(l: &mut Lowerer, call: &OpCall, msg: String) -> Option<LValue> {
    l.diags.push(kiln_spec::Diagnostic::error(msg).at(call.span, "invalid combination of arguments"));
    None
}

/// The fused ops: one IR op each, with optional tensor arguments switched on by flags.
fn lower_fused(l: &mut Lowerer, call: &OpCall) -> Option<LValue> {
    let (name, span) = (call.sig.name, call.span);
    match name {
        "Softmax" | "LogSoftmax" => {
            let x = node_arg(l, call, 0)?;
            let rank = l.graph.ty(x).rank();
            let axis = match config_arg(call, 1) {
                Some(e) => axis_of(l, e, rank)?,
                None => rank.saturating_sub(1),
            };
            let op = if name == "Softmax" { Op::Softmax { axis } } else { Op::LogSoftmax { axis } };
            one(l.add(op, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "LayerNorm" | "RmsNorm" => {
            let layer = name == "LayerNorm";
            let idx: &[usize] = if layer { &[0, 1, 2] } else { &[0, 1] };
            let nodes = tensor_args(l, call, idx);
            let eps_at = idx.len();
            let eps = eps_or(l, call, eps_at, if layer { 1e-5 } else { 1e-6 });
            let (nodes, eps) = (nodes?, eps?);
            if layer && nodes[1].is_some() != nodes[2].is_some() {
                return arg_combination(
                    l,
                    call,
                    "`LayerNorm` takes both `gamma` and `beta`, or neither".into(),
                );
            }
            let affine = nodes[1].is_some();
            let op = if layer { Op::LayerNorm { eps, affine } } else { Op::RmsNorm { eps, affine } };
            let operands: Vec<NodeId> = nodes.into_iter().flatten().collect();
            one(l.add(op, &operands, span, &given_exprs(call, idx))?)
        }
        "Gelu" => {
            let x = node_arg(l, call, 0)?;
            let approx = if name_arg(call, 1, "erf") == "tanh" { GeluApprox::Tanh } else { GeluApprox::Erf };
            one(l.add(Op::Gelu { approx }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Attention" => {
            let idx = [0, 1, 2, 3];
            let nodes = tensor_args(l, call, &idx);
            let scale = match config_arg(call, 4) {
                Some(e) => l.cfloat(e, "`scale`").map(Some),
                None => Some(None),
            };
            let causal = bool_or(l, call, 5, "`causal`", false);
            let (nodes, scale, causal) = (nodes?, scale?, causal?);
            let q = nodes[0]?;
            // 1/√d, with d the last axis of q (a scalar q is left to the typing rule).
            let scale = match (scale, l.graph.ty(q).shape.last().cloned()) {
                (Some(s), _) => s,
                (None, None) => 1.0,
                (None, Some(Dim::Const(d))) => 1.0 / (d as f64).sqrt(),
                (None, Some(d)) => {
                    let msg = format!(
                        "`Attention` without `scale` takes 1/√d from the last axis of `q`, which must then be static, but it is {d}"
                    );
                    l.diags.push(kiln_spec::Diagnostic::error(msg).at(span, "give `scale`"));
                    return None;
                }
            };
            let masked = nodes[3].is_some();
            let operands: Vec<NodeId> = nodes.into_iter().flatten().collect();
            one(l.add(Op::Attention { scale, causal, masked }, &operands, span, &given_exprs(call, &idx))?)
        }
        "AddNorm" => {
            let idx = [0, 1, 2, 3];
            let nodes = tensor_args(l, call, &idx);
            let eps = eps_or(l, call, 4, 1e-5);
            let rms = bool_or(l, call, 5, "`rms`", false);
            let (nodes, eps, rms) = (nodes?, eps?, rms?);
            let (gamma, beta) = (nodes[2].is_some(), nodes[3].is_some());
            if rms && beta {
                return arg_combination(
                    l,
                    call,
                    "`AddNorm` with `rms: true` takes `gamma` but no `beta`".into(),
                );
            }
            if !rms && gamma != beta {
                return arg_combination(
                    l,
                    call,
                    "`AddNorm` takes both `gamma` and `beta`, or neither".into(),
                );
            }
            let kind = if rms { NormKind::Rms } else { NormKind::Layer };
            let operands: Vec<NodeId> = nodes.into_iter().flatten().collect();
            one(l.add(Op::AddNorm { eps, kind, affine: gamma }, &operands, span, &given_exprs(call, &idx))?)
        }
        "MatMulEpilogue" => {
            let idx = [0, 1, 2];
            let nodes = tensor_args(l, call, &idx)?;
            let act = name_arg(call, 3, "none");
            let activation =
                Activation::ALL.into_iter().find(|a| a.name() == act).unwrap_or(Activation::None);
            let bias = nodes[2].is_some();
            let operands: Vec<NodeId> = nodes.into_iter().flatten().collect();
            one(l.add(Op::MatMulEpilogue { bias, activation }, &operands, span, &given_exprs(call, &idx))?)
        }
        other => unreachable!("op `{other}` is in the catalog but has no lowering"),
    }
}

fn one(n: NodeId) -> Option<LValue> {
    Some(LValue::One(Operand::Node(n)))
}

pub fn lower_op(l: &mut Lowerer, call: &OpCall) -> Option<LValue> {
    let name = call.sig.name;
    let span = call.span;
    if let Some(u) = UnaryOp::ALL.iter().find(|u| capitalize(u.name()) == name) {
        let x = node_arg(l, call, 0)?;
        return one(l.add(Op::Unary(*u), &[x], span, &[tensor_arg(call, 0)])?);
    }
    if let Some(b) = BinaryOp::ALL.iter().find(|b| capitalize(b.name()) == name) {
        return elementwise(l, call, Op::Binary(*b));
    }
    if let Some(c) = CompareOp::ALL.iter().find(|c| capitalize(c.name()) == name) {
        return elementwise(l, call, Op::Compare(*c));
    }
    match name {
        "Cast" => {
            let x = node_arg(l, call, 0)?;
            let to = dtype_arg(l, call, 1, DType::F32)?;
            one(l.add(Op::Cast { to }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Where" => {
            let exprs = [tensor_arg(call, 0), tensor_arg(call, 1), tensor_arg(call, 2)];
            let ops: Vec<Operand> = exprs.iter().map(|e| l.operand(e)).collect::<Option<_>>()?;
            let cond = l.materialize(ops[0], DType::Bool, exprs[0].span())?;
            let d = l.common_dtype(&ops[1..]);
            let a = l.materialize(ops[1], d, exprs[1].span())?;
            let b = l.materialize(ops[2], d, exprs[2].span())?;
            one(l.add(Op::Where, &[cond, a, b], span, &exprs)?)
        }
        "Sum" | "Mean" | "ReduceMax" | "ReduceMin" => {
            let op = match name {
                "Sum" => ReduceOp::Sum,
                "Mean" => ReduceOp::Mean,
                "ReduceMax" => ReduceOp::Max,
                _ => ReduceOp::Min,
            };
            let x = node_arg(l, call, 0)?;
            let rank = l.graph.ty(x).rank();
            let mut axes = match &call.args[1] {
                None => (0..rank).collect::<Vec<_>>(),
                Some(a) => {
                    let mut out = Vec::new();
                    let exprs: Vec<SpannedCExpr> = match a {
                        Arg::Config(e) => vec![e.clone()],
                        Arg::List(es, _) => es.clone(),
                        _ => vec![],
                    };
                    for e in &exprs {
                        out.push(axis_of(l, e, rank)?);
                    }
                    out
                }
            };
            axes.sort_unstable();
            axes.dedup();
            let keepdims = match config_arg(call, 2) {
                Some(e) => l.cbool(e, "`keepdims`")?,
                None => false,
            };
            one(l.add(Op::Reduce { op, axes, keepdims }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Reshape" => {
            let x = node_arg(l, call, 0)?;
            let dims = shape_arg_with(l, call, 1, true)?;
            let infer = dims.iter().filter(|d| d.is_none()).count();
            let shape_span = match &call.args[1] {
                Some(Arg::Shape(s)) => s.span(),
                _ => span,
            };
            if infer > 1 {
                l.diags.push(
                    kiln_spec::Diagnostic::error("a reshape may infer at most one extent (-1)")
                        .at(shape_span, "two -1 extents"),
                );
                return None;
            }
            let known: Vec<Dim> = dims.iter().flatten().cloned().collect();
            let shape: Vec<Dim> = if infer == 1 {
                let from = l.graph.ty(x).clone();
                let Some(fill) = inferred_extent(&from.shape, &known) else {
                    let total =
                        kiln_ir::numel_dim(&from.shape).map_or_else(|e| e.to_string(), |d| d.to_string());
                    let product = known
                        .iter()
                        .try_fold(Dim::Const(1), |a, d| a.mul(d))
                        .map_or_else(|e| e.to_string(), |d| d.to_string());
                    let target: Vec<String> =
                        dims.iter().map(|d| d.as_ref().map_or("-1".to_string(), Dim::to_string)).collect();
                    l.diags.push(
                        kiln_spec::Diagnostic::error(format!(
                            "cannot reshape {from} to [{}]: {total} elements do not divide by {product}",
                            target.join(", ")
                        ))
                        .at(shape_span, "no extent fits -1"),
                    );
                    return None;
                };
                dims.into_iter().map(|d| d.unwrap_or_else(|| fill.clone())).collect()
            } else {
                known
            };
            one(l.add(Op::Reshape { shape }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Transpose" => {
            let x = node_arg(l, call, 0)?;
            let rank = l.graph.ty(x).rank();
            let perm = match &call.args[1] {
                None => {
                    if rank < 2 {
                        l.diags.push(kiln_spec::Diagnostic::error(format!("`Transpose` without `perm` swaps the last two axes, but the operand has rank {rank}")).at(span, "rank < 2"));
                        return None;
                    }
                    let mut p: Vec<usize> = (0..rank).collect();
                    p.swap(rank - 2, rank - 1);
                    p
                }
                Some(a) => {
                    let raw = ints(l, a)?;
                    raw.iter().map(|&v| if v < 0 { (v + rank as i64) as usize } else { v as usize }).collect()
                }
            };
            one(l.add(Op::Transpose { perm }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Unsqueeze" | "Squeeze" => {
            let x = node_arg(l, call, 0)?;
            let mut shape = l.graph.ty(x).shape.clone();
            let e = config_arg(call, 1)?;
            if name == "Unsqueeze" {
                let a = axis_of(l, e, shape.len() + 1)?;
                shape.insert(a, Dim::Const(1));
            } else {
                let a = axis_of(l, e, shape.len())?;
                if shape[a] != 1 {
                    l.diags.push(
                        kiln_spec::Diagnostic::error(format!(
                            "cannot squeeze axis {a} of extent {}",
                            shape[a]
                        ))
                        .at(e.span, "extent is not 1"),
                    );
                    return None;
                }
                shape.remove(a);
            }
            one(l.add(Op::Reshape { shape }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "BroadcastTo" => {
            let x = node_arg(l, call, 0)?;
            let shape = shape_arg(l, call, 1)?;
            one(l.add(Op::BroadcastTo { shape }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Slice" => {
            let x = node_arg(l, call, 0)?;
            let shape = l.graph.ty(x).shape.clone();
            let axis = axis_of(l, config_arg(call, 1)?, shape.len())?;
            let extent = shape[axis].clone();
            if let Dim::Const(c) = extent {
                for bound in [config_arg(call, 2), config_arg(call, 3)].into_iter().flatten() {
                    l.check_dynamic_bound(bound, c as i64, x, span)?;
                }
            }
            let start = match config_arg(call, 2) {
                Some(e) => slice_bound(l, e, "`start`", &extent)?,
                None => Dim::Const(0),
            };
            let end = match config_arg(call, 3) {
                Some(e) => slice_bound(l, e, "`end`", &extent)?,
                None => extent.clone(),
            };
            let step = match config_arg(call, 4) {
                Some(e) => l.cint(e, "`step`")?,
                None => 1,
            };
            if step <= 0 {
                l.diags.push(
                    kiln_spec::Diagnostic::error(format!("`step` must be positive, got {step}"))
                        .at(span, "bad step"),
                );
                return None;
            }
            // A static range that runs backwards is empty; a symbolic one is proved by the
            // typing rule.
            let end = match (&start, &end) {
                (Dim::Const(s), Dim::Const(e)) => Dim::Const(*e.max(s)),
                _ => end,
            };
            one(l.add(
                Op::Slice { axis, start, end, step: step as usize },
                &[x],
                span,
                &[tensor_arg(call, 0)],
            )?)
        }
        "Concat" => {
            let Some(Arg::Tensors(xs, _)) = &call.args[0] else { return None };
            let ops: Vec<Operand> = xs.iter().map(|e| l.operand(e)).collect::<Option<_>>()?;
            let d = l.common_dtype(&ops);
            let mut nodes = Vec::new();
            for (o, e) in ops.iter().zip(xs) {
                nodes.push(l.materialize(*o, d, e.span())?);
            }
            let rank = l.graph.ty(nodes[0]).rank();
            let axis = axis_of(l, config_arg(call, 1)?, rank)?;
            let exprs: Vec<&Expr> = xs.iter().collect();
            one(l.add(Op::Concat { axis }, &nodes, span, &exprs)?)
        }
        "Split" => {
            let x = node_arg(l, call, 0)?;
            let shape = l.graph.ty(x).shape.clone();
            let axis = axis_of(l, config_arg(call, 1)?, shape.len())?;
            let sizes_arg = call.args[2].as_ref()?;
            let raw = ints(l, sizes_arg)?;
            let extent = &shape[axis];
            let sizes: Vec<Dim> = match (sizes_arg, raw.as_slice(), split_evenly(l, extent, &raw)) {
                (Arg::Config(_), [n], Some(part)) => vec![part; *n as usize],
                (Arg::List(..), _, _)
                    if raw.iter().all(|&s| s >= 0)
                        && extent.as_const().is_some_and(|e| raw.iter().sum::<i64>() == e as i64) =>
                {
                    raw.iter().map(|&s| Dim::Const(s as usize)).collect()
                }
                _ => {
                    l.diags.push(
                        kiln_spec::Diagnostic::error(format!(
                            "cannot split extent {} of axis {axis} into {raw:?}",
                            shape[axis]
                        ))
                        .at(ints_span(sizes_arg), "sizes must add up to the extent (or n must divide it)"),
                    );
                    return None;
                }
            };
            let mut out = Vec::new();
            let mut start = Dim::Const(0);
            for s in sizes {
                let Ok(end) = start.add(&s) else { return None };
                let n = l.add(
                    Op::Slice { axis, start: start.clone(), end: end.clone(), step: 1 },
                    &[x],
                    span,
                    &[tensor_arg(call, 0)],
                )?;
                out.push(Operand::Node(n));
                start = end;
            }
            Some(LValue::Many(out))
        }
        "Pad" => {
            let x = node_arg(l, call, 0)?;
            let Some(Arg::Pairs(pairs, pspan)) = &call.args[1] else { return None };
            let mut pads = Vec::new();
            for (a, b) in pairs {
                pads.push((l.cextent(a, "a padding")?, l.cextent(b, "a padding")?));
            }
            let rank = l.graph.ty(x).rank();
            if pads.len() < rank {
                // Like PyTorch, unspecified leading axes are not padded.
                let mut full = vec![(0, 0); rank - pads.len()];
                full.extend(pads);
                pads = full;
            } else if pads.len() > rank {
                l.diags.push(
                    kiln_spec::Diagnostic::error(format!(
                        "{} pad pairs for a tensor of rank {rank}",
                        pads.len()
                    ))
                    .at(*pspan, "too many pairs"),
                );
                return None;
            }
            let value = match config_arg(call, 2) {
                Some(e) => l.cfloat(e, "the pad value")?,
                None => 0.0,
            };
            one(l.add(Op::Pad { pads, value }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "Gather" => {
            let table = node_arg(l, call, 0)?;
            let ie = tensor_arg(call, 1);
            let io = l.operand(ie)?;
            let idx = l.materialize(io, DType::I64, ie.span())?;
            let rank = l.graph.ty(table).rank();
            let axis = match config_arg(call, 2) {
                Some(e) => axis_of(l, e, rank)?,
                None => 0,
            };
            one(l.add(Op::Gather { axis }, &[table, idx], span, &[tensor_arg(call, 0), ie])?)
        }
        "Iota" => {
            let shape = shape_arg(l, call, 0)?;
            let axis = axis_of(l, config_arg(call, 1)?, shape.len())?;
            let dtype = dtype_arg(l, call, 2, DType::I64)?;
            one(l.add(Op::Iota { dtype, shape, axis }, &[], span, &[])?)
        }
        "Full" => {
            let shape = shape_arg(l, call, 0)?;
            let value = l.cfloat(config_arg(call, 1)?, "the fill value")?;
            let dtype = dtype_arg(l, call, 2, DType::F32)?;
            one(l.add(Op::Full { value, dtype, shape }, &[], span, &[])?)
        }
        "Const" => {
            let Some(Arg::Values(shape, values, _)) = &call.args[0] else { return None };
            let dtype = dtype_arg(l, call, 1, DType::F32)?;
            let value = Tensor::full(dtype, shape.clone(), 0.0);
            let value = Tensor { data: kiln_ir::Buffer::from_f64(dtype, values.iter().copied()), ..value };
            one(l.add(Op::Const { value }, &[], span, &[])?)
        }
        "MatMul" => elementwise(l, call, Op::MatMul),
        "Conv2d" => {
            let x = node_arg(l, call, 0)?;
            let w = node_arg(l, call, 1)?;
            let stride = match &call.args[2] {
                Some(a) => positive_pair(l, a, "`stride`")?,
                None => [1, 1],
            };
            let padding = match &call.args[3] {
                Some(a) => pair(l, a, "`padding`")?,
                None => [0, 0],
            };
            let dilation = match &call.args[4] {
                Some(a) => positive_pair(l, a, "`dilation`")?,
                None => [1, 1],
            };
            let groups = match config_arg(call, 5) {
                Some(e) => l.cextent(e, "`groups`")?,
                None => 1,
            };
            one(l.add(
                Op::Conv2d { stride, padding, dilation, groups },
                &[x, w],
                span,
                &[tensor_arg(call, 0), tensor_arg(call, 1)],
            )?)
        }
        "MaxPool2d" | "AvgPool2d" => {
            let kind = if name == "MaxPool2d" { PoolKind::Max } else { PoolKind::Avg };
            let x = node_arg(l, call, 0)?;
            let kernel = positive_pair(l, call.args[1].as_ref()?, "`kernel`")?;
            let stride = match &call.args[2] {
                Some(a) => positive_pair(l, a, "`stride`")?,
                None => kernel,
            };
            let padding = match &call.args[3] {
                Some(a) => pair(l, a, "`padding`")?,
                None => [0, 0],
            };
            one(l.add(Op::Pool2d { kind, kernel, stride, padding }, &[x], span, &[tensor_arg(call, 0)])?)
        }
        "RandomUniform" => {
            let shape = shape_arg(l, call, 0)?;
            let seed = match config_arg(call, 1) {
                Some(e) => l.cextent(e, "the seed")? as u64,
                None => l.next_random_seed(),
            };
            let offset = match config_arg(call, 2) {
                Some(e) => l.cextent(e, "the offset")? as u64,
                None => 0,
            };
            let dtype = dtype_arg(l, call, 3, DType::F32)?;
            one(l.add(Op::RandomUniform { dtype, shape, seed, offset, base: false }, &[], span, &[])?)
        }
        _ if call.sig.family == kiln_spec::ops::Family::Fused => lower_fused(l, call),
        other => unreachable!("op `{other}` is in the catalog but has no lowering"),
    }
}

/// A slice bound: a size over the symbols as it is, a static one normalized against the
/// extent (negative counts from the end; a static extent clamps it, a symbolic one leaves
/// the bound for the typing rule to prove).
fn slice_bound(l: &mut Lowerer, e: &SpannedCExpr, what: &str, extent: &Dim) -> Option<Dim> {
    match (l.size_value(e, what)?, extent) {
        (Ok(d), _) => Some(d),
        (Err(v), Dim::Const(c)) => {
            let c = *c as i64;
            Some(Dim::Const(if v < 0 { (v + c).max(0) } else { v.min(c) } as usize))
        }
        // Not clamped: a bound past the smallest extent would mean a different slice at
        // different sizes.
        (Err(v), Dim::Sym(_)) if v.unsigned_abs() > extent.range(&l.graph.symbols).min.unsigned_abs() => {
            let smallest = extent.range(&l.graph.symbols).min;
            let msg = format!(
                "the slice bound `{v}` is past the dynamic axis `{extent}`, which can be as small as {smallest}: a bound on a dynamic axis is not clamped"
            );
            l.diags.push(kiln_spec::Diagnostic::error(msg).at(e.span, format!("{what} past the axis")));
            None
        }
        (Err(v), Dim::Sym(_)) if v >= 0 => Some(Dim::Const(v as usize)),
        (Err(v), Dim::Sym(_)) => match extent.sub(&Dim::Const(v.unsigned_abs() as usize)) {
            Ok(d) => Some(d),
            Err(err) => {
                l.diags.push(kiln_spec::Diagnostic::error(err.to_string()).at(e.span, "bad bound"));
                None
            }
        },
    }
}

/// Each part of `extent` split into `raw = [n]` equal parts, when `n` divides it for every
/// value of the symbols.
fn split_evenly(l: &Lowerer, extent: &Dim, raw: &[i64]) -> Option<Dim> {
    let [n] = raw else { return None };
    let n = usize::try_from(*n).ok().filter(|n| *n > 0)?;
    match extent {
        Dim::Const(e) => e.is_multiple_of(n).then(|| Dim::Const(e / n)),
        Dim::Sym(s) => {
            let k = i64::try_from(n).ok()?;
            if extent.range(&l.graph.symbols).multiple % k != 0 {
                return None;
            }
            Dim::from_expr(s.div_exact(k).or_else(|_| s.floor_div(k)).ok()?).ok()
        }
    }
}

/// Binary ops, comparisons and matmul: weak literals take the other operand's dtype.
fn elementwise(l: &mut Lowerer, call: &OpCall, op: Op) -> Option<LValue> {
    let (ea, eb) = (tensor_arg(call, 0), tensor_arg(call, 1));
    let a = l.operand(ea);
    let b = l.operand(eb);
    let (a, b) = (a?, b?);
    let d = l.common_dtype(&[a, b]);
    let na = l.materialize(a, d, ea.span())?;
    let nb = l.materialize(b, d, eb.span())?;
    one(l.add(op, &[na, nb], call.span, &[ea, eb])?)
}

/// `relu` → `Relu`, `reduce_sum` → `ReduceSum`.
fn capitalize(s: &str) -> String {
    s.split('_')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_uppercase().chain(c).collect::<String>(),
                None => String::new(),
            }
        })
        .collect()
}
