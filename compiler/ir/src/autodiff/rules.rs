//! One vector-Jacobian product per op: given the gradient `gy` of the loss with respect to an
//! op's result `y`, the gradients with respect to its operands `x[i]`.
//!
//! The match in [`vjp`] is exhaustive over [`Op`], so a new op does not compile until it has
//! a rule here (or says why it has none). Rules for the fused ops live in `fused.rs`, those
//! of convolution and pooling in `window.rs`. Each
//! rule returns, per operand, `None` when the operand is not differentiable or not wanted,
//! and otherwise a gradient of exactly the operand's type (the sweep checks it).
//! `docs/autodiff.md` lists every rule as a table.

use super::emit::Emit;
use super::fused;
use super::window;
use crate::dtype::numel;
use crate::graph::NodeId;
use crate::infer::InferError;
use crate::op::{BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};
use std::f64::consts::PI;

/// Why a rule could not be applied.
#[derive(Debug)]
pub(super) enum RuleError {
    /// A backward node failed to type: a bug in a rule.
    Infer(InferError),
    /// The op has no gradient rule, and why. Every op has one today; this is the way for an
    /// op whose gradient cannot be written to say so (never a panic).
    #[allow(dead_code)]
    Unsupported(String),
}

impl From<InferError> for RuleError {
    fn from(e: InferError) -> Self {
        RuleError::Infer(e)
    }
}

pub(super) type Grads = Result<Vec<Option<NodeId>>, RuleError>;

/// One application of a rule: the op, its operands, its result and the result's gradient.
pub(super) struct Site<'a> {
    pub op: &'a Op,
    pub x: &'a [NodeId],
    pub y: NodeId,
    pub gy: NodeId,
    /// Which operands need a gradient (the others get `None` and cost nothing).
    pub wants: &'a [bool],
}

/// The gradients of `s.op`'s operands.
pub(super) fn vjp(e: &mut Emit, s: &Site) -> Grads {
    let (x, y, gy) = (s.x, s.y, s.gy);
    match s.op {
        // Leaves have no operands.
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Full { .. } | Op::Iota { .. } => {
            Ok(vec![])
        }
        // Nothing flows into a counter (an integer).
        Op::RandomUniform { base, .. } => Ok(vec![None; usize::from(*base)]),
        Op::Unary(u) => Ok(vec![Some(unary(e, *u, x[0], y, gy)?)]),
        Op::Binary(b) => binary(e, *b, x[0], x[1], y, gy, s.wants),
        // The result is bool: nothing flows through a comparison.
        Op::Compare(_) => Ok(vec![None, None]),
        Op::Where => {
            let a = if s.wants[1] {
                let g = e.mask(x[0], gy)?;
                Some(e.unbroadcast(g, &e.shape(x[1]))?)
            } else {
                None
            };
            let b = if s.wants[2] {
                let z = e.scalar(0.0, gy)?;
                let g = e.select(x[0], z, gy)?;
                Some(e.unbroadcast(g, &e.shape(x[2]))?)
            } else {
                None
            };
            Ok(vec![None, a, b])
        }
        // Only float → float casts carry a gradient (the sweep never asks for the others).
        Op::Cast { .. } => Ok(vec![Some(e.cast(gy, e.dtype(x[0]))?)]),
        Op::Reduce { op, axes, .. } => Ok(vec![Some(reduce(e, *op, axes, x[0], y, gy)?)]),
        Op::Reshape { .. } => Ok(vec![Some(e.reshape(gy, &e.shape(x[0]))?)]),
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            Ok(vec![Some(e.transpose(gy, &inv)?)])
        }
        Op::BroadcastTo { .. } => Ok(vec![Some(e.unbroadcast(gy, &e.shape(x[0]))?)]),
        Op::Slice { axis, start, end, step } => {
            let (start, end) = (static_extent(start)?, static_extent(end)?);
            Ok(vec![Some(slice_back(e, gy, &e.shape(x[0]), *axis, start, end, *step)?)])
        }
        Op::Concat { axis } => {
            let mut off = 0;
            let mut out = Vec::with_capacity(x.len());
            for (i, &xi) in x.iter().enumerate() {
                let len = e.shape(xi)[*axis];
                out.push(if s.wants[i] { Some(e.slice(gy, *axis, off, off + len, 1)?) } else { None });
                off += len;
            }
            Ok(out)
        }
        Op::Pad { pads, .. } => {
            let shape = e.shape(x[0]);
            let mut g = gy;
            for (axis, (&(before, _), &d)) in pads.iter().zip(&shape).enumerate() {
                g = e.slice(g, axis, before, before + d, 1)?;
            }
            Ok(vec![Some(g)])
        }
        Op::Gather { axis } => Ok(vec![Some(gather_table(e, *axis, x[0], x[1], gy)?), None]),
        // The adjoint of a scatter-add is the gather of the same rows.
        Op::ScatterAdd { axis, .. } => Ok(vec![Some(e.op(Op::Gather { axis: *axis }, &[gy, x[1]])?), None]),
        Op::MatMul => {
            let (ga, gb) = matmul(e, x[0], x[1], gy, s.wants[0], s.wants[1])?;
            Ok(vec![ga, gb])
        }
        Op::Conv2d { stride, padding, dilation, groups } => {
            Ok(window::conv2d(e, *stride, *padding, *dilation, *groups, s)?)
        }
        Op::Pool2d { kind, kernel, stride, padding } => {
            Ok(window::pool2d(e, *kind, *kernel, *stride, *padding, s)?)
        }
        Op::Softmax { axis } => Ok(vec![Some(fused::softmax(e, *axis, y, gy)?)]),
        Op::LogSoftmax { axis } => Ok(vec![Some(fused::log_softmax(e, *axis, y, gy)?)]),
        Op::LayerNorm { eps, .. } => fused::norm(e, crate::op::NormKind::Layer, *eps, false, s),
        Op::RmsNorm { eps, .. } => fused::norm(e, crate::op::NormKind::Rms, *eps, false, s),
        Op::AddNorm { eps, kind, .. } => fused::norm(e, *kind, *eps, true, s),
        Op::Gelu { approx } => Ok(vec![Some(fused::gelu(e, *approx, x[0], gy)?)]),
        Op::Attention { scale, causal, .. } => fused::attention(e, *scale, *causal, s),
        Op::AttentionLse { scale, causal, .. } => fused::attention_lse(e, *scale, *causal, s),
        Op::MatMulEpilogue { activation, .. } => fused::matmul_epilogue(e, *activation, s),
    }
}

/// `gy · y'(x)` for an elementwise op of one operand (`y` is its result).
pub(super) fn unary(
    e: &mut Emit,
    u: UnaryOp,
    x: NodeId,
    y: NodeId,
    gy: NodeId,
) -> Result<NodeId, InferError> {
    match u {
        UnaryOp::Neg => e.neg(gy),
        UnaryOp::Abs => {
            // sign(x), 0 at 0 as in PyTorch.
            let pos = e.compare_zero(CompareOp::Gt, x)?;
            let neg = e.compare_zero(CompareOp::Lt, x)?;
            let (p, n) = (e.cast(pos, e.dtype(x))?, e.cast(neg, e.dtype(x))?);
            let sign = e.sub(p, n)?;
            e.mul(gy, sign)
        }
        UnaryOp::Exp => e.mul(gy, y),
        UnaryOp::Log => e.div(gy, x),
        UnaryOp::Sqrt => {
            let d = e.scale(y, 2.0)?;
            e.div(gy, d)
        }
        UnaryOp::Rsqrt => {
            // d/dx x^(-1/2) = −½ y³
            let y2 = e.mul(y, y)?;
            let y3 = e.mul(y2, y)?;
            let d = e.scale(y3, -0.5)?;
            e.mul(gy, d)
        }
        UnaryOp::Recip => {
            let y2 = e.mul(y, y)?;
            let d = e.neg(y2)?;
            e.mul(gy, d)
        }
        UnaryOp::Tanh => {
            let y2 = e.mul(y, y)?;
            let d = e.rsub(1.0, y2)?;
            e.mul(gy, d)
        }
        UnaryOp::Erf => {
            let x2 = e.mul(x, x)?;
            let nx2 = e.neg(x2)?;
            let ex = e.unary(UnaryOp::Exp, nx2)?;
            let d = e.scale(ex, 2.0 / PI.sqrt())?;
            e.mul(gy, d)
        }
        UnaryOp::Sin => {
            let c = e.unary(UnaryOp::Cos, x)?;
            e.mul(gy, c)
        }
        UnaryOp::Cos => {
            let s = e.unary(UnaryOp::Sin, x)?;
            let ns = e.neg(s)?;
            e.mul(gy, ns)
        }
        UnaryOp::Sigmoid => {
            let one_minus = e.rsub(1.0, y)?;
            let d = e.mul(y, one_minus)?;
            e.mul(gy, d)
        }
        UnaryOp::Relu => {
            // 0 at 0 as in PyTorch.
            let pos = e.compare_zero(CompareOp::Gt, x)?;
            e.mask(pos, gy)
        }
    }
}

/// Gradients of a broadcasting binary op, each summed back to its operand's shape.
fn binary(e: &mut Emit, b: BinaryOp, x0: NodeId, x1: NodeId, y: NodeId, gy: NodeId, wants: &[bool]) -> Grads {
    let (ga, gb) = match b {
        BinaryOp::Add => (Some(gy), Some(gy)),
        BinaryOp::Sub => (Some(gy), if wants[1] { Some(e.neg(gy)?) } else { None }),
        BinaryOp::Mul => (
            if wants[0] { Some(e.mul(gy, x1)?) } else { None },
            if wants[1] { Some(e.mul(gy, x0)?) } else { None },
        ),
        BinaryOp::Div => {
            let ga = if wants[0] { Some(e.div(gy, x1)?) } else { None };
            let gb = if wants[1] {
                // −gy·a/b² = −gy·y/b
                let t = e.mul(gy, y)?;
                let t = e.div(t, x1)?;
                Some(e.neg(t)?)
            } else {
                None
            };
            (ga, gb)
        }
        BinaryOp::Pow => {
            // As PyTorch: the base's gradient is 0 where the exponent is 0, the exponent's
            // is 0 where the base is 0 (instead of 0 · log 0).
            let ga = if wants[0] {
                let one = e.scalar(1.0, x1)?;
                let bm1 = e.sub(x1, one)?;
                let p = e.binary(BinaryOp::Pow, x0, bm1)?;
                let d = e.mul(x1, p)?;
                let g = e.mul(gy, d)?;
                let zero_exp = e.compare_zero(CompareOp::Eq, x1)?;
                let z = e.scalar(0.0, g)?;
                Some(e.select(zero_exp, z, g)?)
            } else {
                None
            };
            let gb = if wants[1] {
                let l = e.unary(UnaryOp::Log, x0)?;
                let d = e.mul(y, l)?;
                let g = e.mul(gy, d)?;
                let zero_base = e.compare_zero(CompareOp::Eq, x0)?;
                let z = e.scalar(0.0, g)?;
                Some(e.select(zero_base, z, g)?)
            } else {
                None
            };
            (ga, gb)
        }
        BinaryOp::Max | BinaryOp::Min => {
            // The gradient goes to the larger (smaller) operand, split in half on a tie, as
            // PyTorch's `maximum` / `minimum`.
            let wins = if b == BinaryOp::Max { CompareOp::Gt } else { CompareOp::Lt };
            let dt = e.dtype(gy);
            let tie = e.compare(CompareOp::Eq, x0, x1)?;
            let tie = e.cast(tie, dt)?;
            let half_tie = e.scale(tie, 0.5)?;
            let share = |e: &mut Emit, w: NodeId| -> Result<NodeId, InferError> {
                let w = e.cast(w, dt)?;
                let f = e.add(w, half_tie)?;
                e.mul(gy, f)
            };
            let ga = if wants[0] {
                let w = e.compare(wins, x0, x1)?;
                Some(share(e, w)?)
            } else {
                None
            };
            let gb = if wants[1] {
                let w = e.compare(wins, x1, x0)?;
                Some(share(e, w)?)
            } else {
                None
            };
            (ga, gb)
        }
    };
    let mut out = Vec::with_capacity(2);
    for (g, (x, w)) in [ga, gb].into_iter().zip([(x0, wants[0]), (x1, wants[1])]) {
        out.push(match (g, w) {
            (Some(g), true) => Some(e.unbroadcast(g, &e.shape(x))?),
            _ => None,
        });
    }
    Ok(out)
}

/// Gradient of a reduction: spread back over the reduced axes; for `max`/`min` only to the
/// elements equal to the result, split evenly among ties (as PyTorch's `amax`/`amin`).
fn reduce(
    e: &mut Emit,
    op: ReduceOp,
    axes: &[usize],
    x: NodeId,
    y: NodeId,
    gy: NodeId,
) -> Result<NodeId, InferError> {
    let shape = e.shape(x);
    let g = e.expand_reduced(gy, &shape, axes)?;
    match op {
        ReduceOp::Sum => Ok(g),
        ReduceOp::Mean => {
            let count = numel(&axes.iter().map(|&a| shape[a]).collect::<Vec<_>>());
            e.scale(g, if count == 0 { 0.0 } else { 1.0 / count as f64 })
        }
        ReduceOp::Max | ReduceOp::Min => {
            let yb = e.expand_reduced(y, &shape, axes)?;
            let hit = e.compare(CompareOp::Eq, x, yb)?;
            let hit = e.cast(hit, e.dtype(x))?;
            let count = e.sum(hit, axes, true)?;
            let g = e.mul(g, hit)?;
            e.div(g, count)
        }
    }
}

/// The gradient of `slice(x, axis, start..end, step)`: `gy` placed back at the positions the
/// slice read, zeros elsewhere. A step above 1 interleaves zeros by padding an extra axis of
/// extent `step` and folding it into `axis`.
pub(super) fn slice_back(
    e: &mut Emit,
    gy: NodeId,
    shape: &[usize],
    axis: usize,
    start: usize,
    end: usize,
    step: usize,
) -> Result<NodeId, InferError> {
    let dim = shape[axis];
    let gs = e.shape(gy);
    let n = gs[axis];
    if n == 0 {
        return e.full(0.0, e.dtype(gy), shape);
    }
    if step == 1 {
        return e.pad_axis(gy, axis, start, dim - end);
    }
    let mut split = gs[..axis].to_vec();
    split.extend([n, 1]);
    split.extend_from_slice(&gs[axis + 1..]);
    let g = e.reshape(gy, &split)?;
    let g = e.pad_axis(g, axis + 1, 0, step - 1)?;
    let mut joined = gs.clone();
    joined[axis] = n * step;
    let g = e.reshape(g, &joined)?;
    // The interleaved run may reach past the operand's end with trailing zeros.
    let len = (n * step).min(dim - start);
    let g = e.slice(g, axis, 0, len, 1)?;
    e.pad_axis(g, axis, start, dim - start - len)
}

/// The table's gradient of `gather(table, indices)` along `axis`: a scatter-add of `gy` into
/// the rows the indices name (a row gathered twice gets both gradients, in position order).
/// It touches only the gathered rows' worth of updates, where a one-hot product would build
/// an `indices × rows` matrix.
fn gather_table(
    e: &mut Emit,
    axis: usize,
    table: NodeId,
    idx: NodeId,
    gy: NodeId,
) -> Result<NodeId, InferError> {
    let extent = e.shape(table)[axis];
    e.op(Op::ScatterAdd { axis, extent }, &[gy, idx])
}

/// Gradients of `matmul(a, b)` with numpy's rules: 1-D operands are promoted to matrices as
/// the forward does, batch axes are summed back where they were broadcast.
pub(super) fn matmul(
    e: &mut Emit,
    a: NodeId,
    b: NodeId,
    gy: NodeId,
    want_a: bool,
    want_b: bool,
) -> Result<(Option<NodeId>, Option<NodeId>), InferError> {
    let (sa, sb) = (e.shape(a), e.shape(b));
    let a2s = if sa.len() == 1 { vec![1, sa[0]] } else { sa.clone() };
    let b2s = if sb.len() == 1 { vec![sb[0], 1] } else { sb.clone() };
    let (m, n) = (a2s[a2s.len() - 2], b2s[b2s.len() - 1]);
    let batch = crate::infer::broadcast_shapes(
        "matmul",
        &crate::dtype::dims(&a2s[..a2s.len() - 2]),
        &crate::dtype::dims(&b2s[..b2s.len() - 2]),
    )?;
    let mut y2s: Vec<usize> = batch.iter().map(static_extent).collect::<Result<_, _>>()?;
    y2s.extend([m, n]);
    let gy2 = e.reshape(gy, &y2s)?;
    let ga = if want_a {
        let b2 = e.reshape(b, &b2s)?;
        let bt = e.swap_last2(b2)?;
        let g = e.matmul(gy2, bt)?;
        let g = e.unbroadcast(g, &a2s)?;
        Some(e.reshape(g, &sa)?)
    } else {
        None
    };
    let gb = if want_b {
        let a2 = e.reshape(a, &a2s)?;
        let at = e.swap_last2(a2)?;
        let g = e.matmul(at, gy2)?;
        let g = e.unbroadcast(g, &b2s)?;
        Some(e.reshape(g, &sb)?)
    } else {
        None
    };
    Ok((ga, gb))
}

/// An extent of a static graph (autodiff refuses symbolic graphs before it starts).
fn static_extent(d: &crate::dtype::Dim) -> Result<usize, InferError> {
    d.as_const().ok_or_else(|| InferError::Invalid { op: "grad", msg: format!("the extent {d} is symbolic") })
}
