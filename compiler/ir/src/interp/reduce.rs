//! Reductions over a sorted set of axes.
//!
//! * Float `sum` and `mean` accumulate in f64 whatever the element type (f32, f16 and bf16
//!   are widened exactly), sequentially in row-major order, and round the result once to the
//!   element type; `mean` divides the f64 sum by the number of reduced elements (a mean over
//!   zero elements is NaN, a sum over zero elements is 0).
//! * Integer `sum` wraps around on overflow in the element type.
//! * `max` / `min` compare in the element type; a NaN anywhere in the reduced set makes the
//!   result NaN (like numpy's `max`). Over zero elements they have no identity and are an
//!   [`EvalError::EmptyReduction`].

use super::elem::{strided_copy, Elem, Int, Real, PAR_MIN};
use super::EvalError;
use crate::dtype::strides;
use crate::interp::StaticType;
use crate::op::ReduceOp;
use crate::tensor::{Buffer, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// The input rearranged so that the reduced axes come last (a copy only when they are not
/// already trailing), and the length of one reduced row.
fn rows<'a, T: Copy>(v: &'a [T], shape: &[usize], axes: &[usize]) -> (Cow<'a, [T]>, usize) {
    let red: usize = axes.iter().map(|&a| shape[a]).product();
    let trailing = axes.iter().enumerate().all(|(i, &a)| a == shape.len() - axes.len() + i);
    // Axes of extent 1 do not change the order either way; only moved axes of extent > 1 do.
    let kept: Vec<usize> = (0..shape.len()).filter(|a| !axes.contains(a)).collect();
    let order_preserved = trailing || {
        let perm: Vec<usize> = kept.iter().chain(axes).copied().filter(|&a| shape[a] != 1).collect();
        perm.windows(2).all(|w| w[0] < w[1])
    };
    if order_preserved {
        return (Cow::Borrowed(v), red);
    }
    let st = strides(shape);
    let perm: Vec<usize> = kept.iter().chain(axes).copied().collect();
    let out_shape: Vec<usize> = perm.iter().map(|&a| shape[a]).collect();
    let out_strides: Vec<usize> = perm.iter().map(|&a| st[a]).collect();
    (Cow::Owned(strided_copy(v, 0, &out_shape, out_strides)), red)
}

/// Applies `f` to each reduced row, producing `n_out` results (in parallel for large inputs).
fn per_row<T: Copy + Sync, O: Send>(
    data: &[T],
    red: usize,
    n_out: usize,
    f: impl Fn(&[T]) -> O + Sync + Send,
) -> Vec<O> {
    if red == 0 {
        return (0..n_out).map(|_| f(&[])).collect();
    }
    if data.len() >= PAR_MIN && n_out > 1 {
        data.par_chunks(red).map(f).collect()
    } else {
        data.chunks(red).map(f).collect()
    }
}

fn reduce_real<T: Elem, F: Real>(
    op: ReduceOp,
    v: &[T],
    shape: &[usize],
    axes: &[usize],
    n_out: usize,
) -> Vec<F> {
    let (data, red) = rows(v, shape, axes);
    match op {
        ReduceOp::Sum => {
            per_row(&data, red, n_out, |r| F::from_f64(r.iter().map(|x| x.to_f64()).sum::<f64>()))
        }
        ReduceOp::Mean => per_row(&data, red, n_out, |r| {
            F::from_f64(r.iter().map(|x| x.to_f64()).sum::<f64>() / red as f64)
        }),
        ReduceOp::Max => per_row(&data, red, n_out, |r| {
            r.iter().fold(F::NEG_INFINITY, |m, &x| m.max_nan(F::from_f64(x.to_f64())))
        }),
        ReduceOp::Min => per_row(&data, red, n_out, |r| {
            r.iter().fold(F::INFINITY, |m, &x| m.min_nan(F::from_f64(x.to_f64())))
        }),
    }
}

fn reduce_int<I: Int>(
    op: ReduceOp,
    v: &[I],
    shape: &[usize],
    axes: &[usize],
    n_out: usize,
) -> Option<Vec<I>> {
    let (data, red) = rows(v, shape, axes);
    Some(match op {
        ReduceOp::Sum => per_row(&data, red, n_out, |r| r.iter().fold(I::ZERO, |s, &x| s.wadd(x))),
        ReduceOp::Max => per_row(&data, red, n_out, |r| r.iter().fold(I::MIN, |m, &x| m.max(x))),
        ReduceOp::Min => per_row(&data, red, n_out, |r| r.iter().fold(I::MAX, |m, &x| m.min(x))),
        ReduceOp::Mean => return None,
    })
}

pub(crate) fn reduce(op: ReduceOp, axes: &[usize], x: &Tensor, ty: &StaticType) -> Result<Tensor, EvalError> {
    let name = crate::op::Op::Reduce { op, axes: vec![], keepdims: false }.name();
    let n_out = ty.numel();
    let red: usize = axes.iter().map(|&a| x.shape[a]).product();
    if red == 0 && n_out > 0 && matches!(op, ReduceOp::Max | ReduceOp::Min) {
        return Err(EvalError::EmptyReduction { op: name, shape: x.shape.clone() });
    }
    let sh = &x.shape[..];
    let data = match &x.data {
        Buffer::F32(v) => Buffer::F32(reduce_real(op, v, sh, axes, n_out)),
        Buffer::F64(v) => Buffer::F64(reduce_real(op, v, sh, axes, n_out)),
        // Computed in f64 and rounded once to the element type.
        Buffer::F16(v) => {
            let r: Vec<f64> = reduce_real(op, v, sh, axes, n_out);
            Buffer::F16(r.into_iter().map(half::f16::from_f64).collect())
        }
        Buffer::BF16(v) => {
            let r: Vec<f64> = reduce_real(op, v, sh, axes, n_out);
            Buffer::BF16(r.into_iter().map(half::bf16::from_f64).collect())
        }
        Buffer::I32(v) => Buffer::I32(reduce_int(op, v, sh, axes, n_out).ok_or_else(|| bad(name, x))?),
        Buffer::I64(v) => Buffer::I64(reduce_int(op, v, sh, axes, n_out).ok_or_else(|| bad(name, x))?),
        Buffer::Bool(_) => return Err(bad(name, x)),
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

fn bad(op: &'static str, x: &Tensor) -> EvalError {
    EvalError::Operands { op, msg: format!("not defined on {}", x.dtype()) }
}
