//! The small vocabulary the gradient rules are written in: primitive ops appended to the
//! graph, each typed by [`Graph::add`], plus the one generic rule every broadcasting op
//! shares, [`Emit::unbroadcast`].
//!
//! Helpers that would be identities (a reshape to the same shape, a transpose by the
//! identity) return their operand, so the backward graph has no no-op nodes.

use crate::dtype::{dims, DType, Dim, TensorType};
use crate::graph::{Graph, NodeId};
use crate::infer::InferError;
use crate::op::{BinaryOp, CompareOp, Op, ReduceOp, UnaryOp};

/// Appends backward nodes to a graph.
pub(crate) struct Emit<'g> {
    pub g: &'g mut Graph,
}

pub(crate) type R = Result<NodeId, InferError>;

impl Emit<'_> {
    pub fn op(&mut self, op: Op, args: &[NodeId]) -> R {
        self.g.add(op, args)
    }

    pub fn ty(&self, n: NodeId) -> TensorType {
        self.g.ty(n).clone()
    }

    /// The static shape (autodiff runs on static graphs only, `grad` checks).
    pub fn shape(&self, n: NodeId) -> Vec<usize> {
        self.g.ty(n).static_shape()
    }

    pub fn dtype(&self, n: NodeId) -> DType {
        self.g.ty(n).dtype
    }

    /// A scalar of `n`'s dtype, which broadcasts against anything.
    pub fn scalar(&mut self, value: f64, like: NodeId) -> R {
        let dtype = self.dtype(like);
        self.op(Op::Full { value, dtype, shape: crate::dtype::dims(&[]) }, &[])
    }

    pub fn full(&mut self, value: f64, dtype: DType, shape: &[usize]) -> R {
        self.op(Op::Full { value, dtype, shape: dims(shape) }, &[])
    }

    pub fn unary(&mut self, u: UnaryOp, x: NodeId) -> R {
        self.op(Op::Unary(u), &[x])
    }

    pub fn binary(&mut self, b: BinaryOp, x: NodeId, y: NodeId) -> R {
        self.op(Op::Binary(b), &[x, y])
    }

    pub fn add(&mut self, x: NodeId, y: NodeId) -> R {
        self.binary(BinaryOp::Add, x, y)
    }

    pub fn sub(&mut self, x: NodeId, y: NodeId) -> R {
        self.binary(BinaryOp::Sub, x, y)
    }

    pub fn mul(&mut self, x: NodeId, y: NodeId) -> R {
        self.binary(BinaryOp::Mul, x, y)
    }

    pub fn div(&mut self, x: NodeId, y: NodeId) -> R {
        self.binary(BinaryOp::Div, x, y)
    }

    pub fn neg(&mut self, x: NodeId) -> R {
        self.unary(UnaryOp::Neg, x)
    }

    /// `x · c` for a constant `c`.
    pub fn scale(&mut self, x: NodeId, c: f64) -> R {
        if c == 1.0 {
            return Ok(x);
        }
        let s = self.scalar(c, x)?;
        self.mul(x, s)
    }

    /// `c − x` for a constant `c`.
    pub fn rsub(&mut self, c: f64, x: NodeId) -> R {
        let s = self.scalar(c, x)?;
        self.sub(s, x)
    }

    pub fn compare(&mut self, c: CompareOp, x: NodeId, y: NodeId) -> R {
        self.op(Op::Compare(c), &[x, y])
    }

    /// `x c 0`, comparing with a zero of `x`'s dtype.
    pub fn compare_zero(&mut self, c: CompareOp, x: NodeId) -> R {
        let z = self.scalar(0.0, x)?;
        self.compare(c, x, z)
    }

    pub fn select(&mut self, cond: NodeId, a: NodeId, b: NodeId) -> R {
        self.op(Op::Where, &[cond, a, b])
    }

    /// `where(cond, x, 0)`.
    pub fn mask(&mut self, cond: NodeId, x: NodeId) -> R {
        let z = self.scalar(0.0, x)?;
        self.select(cond, x, z)
    }

    pub fn cast(&mut self, x: NodeId, to: DType) -> R {
        if self.dtype(x) == to {
            return Ok(x);
        }
        self.op(Op::Cast { to }, &[x])
    }

    pub fn reduce(&mut self, op: ReduceOp, x: NodeId, axes: &[usize], keepdims: bool) -> R {
        if axes.is_empty() {
            return Ok(x);
        }
        self.op(Op::Reduce { op, axes: axes.to_vec(), keepdims }, &[x])
    }

    pub fn sum(&mut self, x: NodeId, axes: &[usize], keepdims: bool) -> R {
        self.reduce(ReduceOp::Sum, x, axes, keepdims)
    }

    /// The mean over the last axis, kept as extent 1.
    pub fn mean_last(&mut self, x: NodeId) -> R {
        let last = self.g.ty(x).rank().saturating_sub(1);
        self.reduce(ReduceOp::Mean, x, &[last], true)
    }

    pub fn reshape(&mut self, x: NodeId, shape: &[usize]) -> R {
        if self.g.ty(x).shape == dims(shape) {
            return Ok(x);
        }
        self.op(Op::Reshape { shape: dims(shape) }, &[x])
    }

    pub fn transpose(&mut self, x: NodeId, perm: &[usize]) -> R {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(x);
        }
        self.op(Op::Transpose { perm: perm.to_vec() }, &[x])
    }

    /// Swaps the last two axes (a matrix transpose of every batch element).
    pub fn swap_last2(&mut self, x: NodeId) -> R {
        let r = self.g.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.transpose(x, &perm)
    }

    pub fn broadcast_to(&mut self, x: NodeId, shape: &[usize]) -> R {
        if self.g.ty(x).shape == dims(shape) {
            return Ok(x);
        }
        self.op(Op::BroadcastTo { shape: dims(shape) }, &[x])
    }

    pub fn slice(&mut self, x: NodeId, axis: usize, start: usize, end: usize, step: usize) -> R {
        if start == 0 && step == 1 && self.g.ty(x).shape[axis] == end {
            return Ok(x);
        }
        self.op(Op::Slice { axis, start: Dim::Const(start), end: Dim::Const(end), step }, &[x])
    }

    /// Zero padding of `(before, after)` along `axis` only.
    pub fn pad_axis(&mut self, x: NodeId, axis: usize, before: usize, after: usize) -> R {
        if before == 0 && after == 0 {
            return Ok(x);
        }
        let mut pads = vec![(0, 0); self.g.ty(x).rank()];
        pads[axis] = (before, after);
        self.op(Op::Pad { pads, value: 0.0 }, &[x])
    }

    pub fn matmul(&mut self, a: NodeId, b: NodeId) -> R {
        self.op(Op::MatMul, &[a, b])
    }

    /// The generic rule for broadcasting: sums a gradient of a broadcast shape back to the
    /// shape of the operand that was broadcast (leading axes it lacked, and axes where its
    /// extent was 1), as numpy broadcasting repeats each element along exactly those axes.
    pub fn unbroadcast(&mut self, grad: NodeId, shape: &[usize]) -> R {
        let gs = self.shape(grad);
        if gs == shape {
            return Ok(grad);
        }
        let lead = gs.len() - shape.len();
        let axes: Vec<usize> =
            (0..gs.len()).filter(|&i| i < lead || (shape[i - lead] == 1 && gs[i] != 1)).collect();
        let s = self.sum(grad, &axes, false)?;
        self.reshape(s, shape)
    }

    /// Reshapes a reduction's result (or its gradient) to the operand's rank with the reduced
    /// `axes` kept as extent 1, then broadcasts it to the operand's `shape`.
    pub fn expand_reduced(&mut self, y: NodeId, shape: &[usize], axes: &[usize]) -> R {
        let kept: Vec<usize> =
            shape.iter().enumerate().map(|(i, &d)| if axes.contains(&i) { 1 } else { d }).collect();
        let r = self.reshape(y, &kept)?;
        self.broadcast_to(r, shape)
    }
}
