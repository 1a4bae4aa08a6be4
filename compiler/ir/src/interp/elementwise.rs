//! Elementwise ops: unary, binary arithmetic, comparisons, `where` and `cast`.
//!
//! Binary ops, comparisons and `where` broadcast like numpy. Float arithmetic is IEEE in the
//! operands' own type (f32 in f32, f64 in f64); f16 and bf16 operands are widened to f32, the
//! op is computed in f32 and the result is rounded back to nearest even. Integer arithmetic
//! wraps around on overflow (two's complement, like numpy); integer division truncates toward
//! zero like C (`-7 / 2 == -3`) and a zero divisor is an [`EvalError::IntDivByZero`].

use super::elem::{broadcast_strides, cast_slice, narrow_like, widen_f32, Elem, Int, Real, Walk, PAR_MIN};
use super::EvalError;
use crate::dtype::DType;
use crate::interp::StaticType;
use crate::op::{BinaryOp, CompareOp, UnaryOp};
use crate::tensor::{Buffer, Tensor};
use rayon::prelude::*;

/// `f` applied to every element, in parallel for large inputs.
fn map<A: Copy + Sync, O: Send>(a: &[A], f: impl Fn(A) -> O + Sync + Send) -> Vec<O> {
    if a.len() >= PAR_MIN {
        a.par_iter().map(|&x| f(x)).collect()
    } else {
        a.iter().map(|&x| f(x)).collect()
    }
}

/// `f(a, b)` with numpy broadcasting to `out`, with fast paths for equal shapes and for a
/// scalar (single-element) side.
pub(crate) fn zip_broadcast<A: Copy + Sync, B: Copy + Sync, O: Send>(
    a: &[A],
    ash: &[usize],
    b: &[B],
    bsh: &[usize],
    out: &[usize],
    f: impl Fn(A, B) -> O + Sync + Send,
) -> Vec<O> {
    let n: usize = out.iter().product();
    if ash == bsh {
        if n >= PAR_MIN {
            return a.par_iter().zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect();
        }
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    if b.len() == 1 && a.len() == n {
        let y = b[0];
        return map(a, |x| f(x, y));
    }
    if a.len() == 1 && b.len() == n {
        let x = a[0];
        return map(b, |y| f(x, y));
    }
    let walk = Walk::new(out, [broadcast_strides(ash, out), broadcast_strides(bsh, out)]);
    let len = walk.row_len();
    let [sa, sb] = walk.row_strides();
    let mut dst = Vec::with_capacity(n);
    walk.for_each_row(|_, [oa, ob]| match (sa, sb) {
        (1, 1) => dst.extend(a[oa..oa + len].iter().zip(&b[ob..ob + len]).map(|(&x, &y)| f(x, y))),
        (1, 0) => {
            let y = b[ob];
            dst.extend(a[oa..oa + len].iter().map(|&x| f(x, y)))
        }
        (0, 1) => {
            let x = a[oa];
            dst.extend(b[ob..ob + len].iter().map(|&y| f(x, y)))
        }
        _ => dst.extend((0..len).map(|j| f(a[oa + j * sa], b[ob + j * sb]))),
    });
    dst
}

fn unary_real<F: Real>(op: UnaryOp, v: &[F]) -> Vec<F> {
    match op {
        UnaryOp::Neg => map(v, F::neg),
        UnaryOp::Abs => map(v, F::abs),
        UnaryOp::Exp => map(v, F::exp),
        UnaryOp::Log => map(v, F::ln),
        UnaryOp::Sqrt => map(v, F::sqrt),
        UnaryOp::Rsqrt => map(v, |x| F::ONE.div(x.sqrt())),
        UnaryOp::Recip => map(v, |x| F::ONE.div(x)),
        UnaryOp::Tanh => map(v, F::tanh),
        UnaryOp::Erf => map(v, F::erf),
        UnaryOp::Sin => map(v, F::sin),
        UnaryOp::Cos => map(v, F::cos),
        UnaryOp::Sigmoid => map(v, |x| F::ONE.div(F::ONE + x.neg().exp())),
        // max(x, 0) that keeps NaN (like numpy `maximum`) and leaves -0.0 alone.
        UnaryOp::Relu => map(v, |x| if x < F::ZERO { F::ZERO } else { x }),
    }
}

fn unary_int<I: Int>(op: UnaryOp, v: &[I]) -> Option<Vec<I>> {
    Some(match op {
        UnaryOp::Neg => map(v, I::wneg),
        UnaryOp::Abs => map(v, I::wabs),
        UnaryOp::Relu => map(v, |x| x.max(I::ZERO)),
        _ => return None,
    })
}

pub(crate) fn unary(op: UnaryOp, x: &Tensor) -> Result<Tensor, EvalError> {
    let data = match &x.data {
        Buffer::F32(v) => Buffer::F32(unary_real(op, v)),
        Buffer::F64(v) => Buffer::F64(unary_real(op, v)),
        Buffer::F16(_) | Buffer::BF16(_) => {
            let w = widen_f32(&x.data).expect("half buffer");
            narrow_like(x.dtype(), unary_real(op, &w))
        }
        Buffer::I32(v) => Buffer::I32(unary_int(op, v).ok_or_else(|| unsupported(op.name(), x.dtype()))?),
        Buffer::I64(v) => Buffer::I64(unary_int(op, v).ok_or_else(|| unsupported(op.name(), x.dtype()))?),
        Buffer::Bool(_) => return Err(unsupported(op.name(), DType::Bool)),
    };
    Ok(Tensor { shape: x.shape.clone(), data })
}

fn unsupported(op: &'static str, d: DType) -> EvalError {
    EvalError::Operands { op, msg: format!("not defined on {d}") }
}

fn binary_real<F: Real>(
    op: BinaryOp,
    a: &[F],
    ash: &[usize],
    b: &[F],
    bsh: &[usize],
    out: &[usize],
) -> Vec<F> {
    match op {
        BinaryOp::Add => zip_broadcast(a, ash, b, bsh, out, |x, y| x + y),
        BinaryOp::Sub => zip_broadcast(a, ash, b, bsh, out, F::sub),
        BinaryOp::Mul => zip_broadcast(a, ash, b, bsh, out, |x, y| x * y),
        BinaryOp::Div => zip_broadcast(a, ash, b, bsh, out, F::div),
        BinaryOp::Pow => zip_broadcast(a, ash, b, bsh, out, F::powf),
        BinaryOp::Max => zip_broadcast(a, ash, b, bsh, out, F::max_nan),
        BinaryOp::Min => zip_broadcast(a, ash, b, bsh, out, F::min_nan),
    }
}

fn binary_int<I: Int>(
    op: BinaryOp,
    dt: DType,
    a: &[I],
    ash: &[usize],
    b: &[I],
    bsh: &[usize],
    out: &[usize],
) -> Result<Vec<I>, EvalError> {
    Ok(match op {
        BinaryOp::Add => zip_broadcast(a, ash, b, bsh, out, I::wadd),
        BinaryOp::Sub => zip_broadcast(a, ash, b, bsh, out, I::wsub),
        BinaryOp::Mul => zip_broadcast(a, ash, b, bsh, out, I::wmul),
        BinaryOp::Div => {
            // Every divisor element is used unless the result is empty.
            if out.iter().product::<usize>() > 0 {
                if let Some(pos) = b.iter().position(|&y| y == I::ZERO) {
                    return Err(EvalError::IntDivByZero { index: crate::interp::unravel(pos, bsh) });
                }
            }
            zip_broadcast(a, ash, b, bsh, out, I::wdiv)
        }
        BinaryOp::Max => zip_broadcast(a, ash, b, bsh, out, |x: I, y: I| x.max(y)),
        BinaryOp::Min => zip_broadcast(a, ash, b, bsh, out, |x: I, y: I| x.min(y)),
        BinaryOp::Pow => return Err(unsupported("pow", dt)),
    })
}

pub(crate) fn binary(op: BinaryOp, a: &Tensor, b: &Tensor, ty: &StaticType) -> Result<Tensor, EvalError> {
    let (ash, bsh, out) = (&a.shape[..], &b.shape[..], &ty.shape[..]);
    let data = match (&a.data, &b.data) {
        (Buffer::F32(x), Buffer::F32(y)) => Buffer::F32(binary_real(op, x, ash, y, bsh, out)),
        (Buffer::F64(x), Buffer::F64(y)) => Buffer::F64(binary_real(op, x, ash, y, bsh, out)),
        (Buffer::F16(_), Buffer::F16(_)) | (Buffer::BF16(_), Buffer::BF16(_)) => {
            let x = widen_f32(&a.data).expect("half buffer");
            let y = widen_f32(&b.data).expect("half buffer");
            narrow_like(a.dtype(), binary_real(op, &x, ash, &y, bsh, out))
        }
        (Buffer::I32(x), Buffer::I32(y)) => Buffer::I32(binary_int(op, DType::I32, x, ash, y, bsh, out)?),
        (Buffer::I64(x), Buffer::I64(y)) => Buffer::I64(binary_int(op, DType::I64, x, ash, y, bsh, out)?),
        _ => return Err(unsupported(op.name(), a.dtype())),
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

fn compare_typed<T: Elem>(
    op: CompareOp,
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
    out: &[usize],
) -> Vec<bool> {
    match op {
        CompareOp::Lt => zip_broadcast(a, ash, b, bsh, out, |x, y| x < y),
        CompareOp::Le => zip_broadcast(a, ash, b, bsh, out, |x, y| x <= y),
        CompareOp::Gt => zip_broadcast(a, ash, b, bsh, out, |x, y| x > y),
        CompareOp::Ge => zip_broadcast(a, ash, b, bsh, out, |x, y| x >= y),
        CompareOp::Eq => zip_broadcast(a, ash, b, bsh, out, |x, y| x == y),
        CompareOp::Ne => zip_broadcast(a, ash, b, bsh, out, |x, y| x != y),
    }
}

/// Comparisons follow IEEE (any comparison with NaN is false except `ne`); bool orders
/// `false < true`.
pub(crate) fn compare(op: CompareOp, a: &Tensor, b: &Tensor, ty: &StaticType) -> Result<Tensor, EvalError> {
    let (ash, bsh, out) = (&a.shape[..], &b.shape[..], &ty.shape[..]);
    let v = match (&a.data, &b.data) {
        (Buffer::F32(x), Buffer::F32(y)) => compare_typed(op, x, ash, y, bsh, out),
        (Buffer::F64(x), Buffer::F64(y)) => compare_typed(op, x, ash, y, bsh, out),
        (Buffer::F16(_), Buffer::F16(_)) | (Buffer::BF16(_), Buffer::BF16(_)) => {
            let x = widen_f32(&a.data).expect("half buffer");
            let y = widen_f32(&b.data).expect("half buffer");
            compare_typed(op, &x, ash, &y, bsh, out)
        }
        (Buffer::I32(x), Buffer::I32(y)) => compare_typed(op, x, ash, y, bsh, out),
        (Buffer::I64(x), Buffer::I64(y)) => compare_typed(op, x, ash, y, bsh, out),
        (Buffer::Bool(x), Buffer::Bool(y)) => compare_typed(op, x, ash, y, bsh, out),
        _ => return Err(unsupported(op.name(), a.dtype())),
    };
    Ok(Tensor { shape: ty.shape.clone(), data: Buffer::Bool(v) })
}

fn where_typed<T: Copy>(
    c: &Tensor,
    cond: &[bool],
    a: &[T],
    ash: &[usize],
    b: &[T],
    bsh: &[usize],
    out: &[usize],
) -> Vec<T> {
    let n: usize = out.iter().product();
    if c.shape == ash && ash == bsh {
        return cond.iter().zip(a.iter().zip(b)).map(|(&c, (&x, &y))| if c { x } else { y }).collect();
    }
    let walk = Walk::new(
        out,
        [broadcast_strides(&c.shape, out), broadcast_strides(ash, out), broadcast_strides(bsh, out)],
    );
    let len = walk.row_len();
    let [sc, sa, sb] = walk.row_strides();
    let mut dst = Vec::with_capacity(n);
    walk.for_each_row(|_, [oc, oa, ob]| {
        dst.extend((0..len).map(|j| if cond[oc + j * sc] { a[oa + j * sa] } else { b[ob + j * sb] }))
    });
    dst
}

/// `where(cond, a, b)` with all three broadcast.
pub(crate) fn select(c: &Tensor, a: &Tensor, b: &Tensor, ty: &StaticType) -> Result<Tensor, EvalError> {
    let Buffer::Bool(cond) = &c.data else {
        return Err(EvalError::Operands {
            op: "where",
            msg: format!("condition must be bool, got {}", c.dtype()),
        });
    };
    let (ash, bsh, out) = (&a.shape[..], &b.shape[..], &ty.shape[..]);
    let data = match (&a.data, &b.data) {
        (Buffer::F32(x), Buffer::F32(y)) => Buffer::F32(where_typed(c, cond, x, ash, y, bsh, out)),
        (Buffer::F64(x), Buffer::F64(y)) => Buffer::F64(where_typed(c, cond, x, ash, y, bsh, out)),
        (Buffer::F16(x), Buffer::F16(y)) => Buffer::F16(where_typed(c, cond, x, ash, y, bsh, out)),
        (Buffer::BF16(x), Buffer::BF16(y)) => Buffer::BF16(where_typed(c, cond, x, ash, y, bsh, out)),
        (Buffer::I32(x), Buffer::I32(y)) => Buffer::I32(where_typed(c, cond, x, ash, y, bsh, out)),
        (Buffer::I64(x), Buffer::I64(y)) => Buffer::I64(where_typed(c, cond, x, ash, y, bsh, out)),
        (Buffer::Bool(x), Buffer::Bool(y)) => Buffer::Bool(where_typed(c, cond, x, ash, y, bsh, out)),
        _ => return Err(unsupported("where", a.dtype())),
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

/// `cast`: float → int truncates toward zero (saturating; NaN → 0), int → int wraps,
/// anything → bool is `x != 0`, bool → number is 0/1, float → float rounds to nearest even.
pub(crate) fn cast(x: &Tensor, to: DType) -> Tensor {
    let data = match &x.data {
        Buffer::F32(v) => cast_slice(v, to),
        Buffer::F64(v) => cast_slice(v, to),
        Buffer::F16(v) => cast_slice(v, to),
        Buffer::BF16(v) => cast_slice(v, to),
        Buffer::I32(v) => cast_slice(v, to),
        Buffer::I64(v) => cast_slice(v, to),
        Buffer::Bool(v) => cast_slice(v, to),
    };
    Tensor { shape: x.shape.clone(), data }
}
