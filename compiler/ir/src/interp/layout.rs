//! Data-movement ops: reshape, transpose, broadcast_to, slice, concat, pad and gather. They
//! work on every dtype and copy elements bit for bit.

use super::elem::{broadcast_strides, map_buffer, strided_copy, Elem, Walk};
use super::EvalError;
use crate::dtype::{numel, strides};
use crate::interp::StaticType;
use crate::tensor::{Buffer, Tensor};

pub(crate) fn reshape(x: &Tensor, ty: &StaticType) -> Tensor {
    Tensor { shape: ty.shape.clone(), data: x.data.clone() }
}

/// `out.shape[i] = in.shape[perm[i]]`.
pub(crate) fn transpose(x: &Tensor, perm: &[usize], ty: &StaticType) -> Tensor {
    let st = strides(&x.shape);
    let s: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
    let data = map_buffer!(&x.data, v => strided_copy(v, 0, &ty.shape, s.clone()));
    Tensor { shape: ty.shape.clone(), data }
}

pub(crate) fn broadcast_to(x: &Tensor, ty: &StaticType) -> Tensor {
    let s = broadcast_strides(&x.shape, &ty.shape);
    let data = map_buffer!(&x.data, v => strided_copy(v, 0, &ty.shape, s.clone()));
    Tensor { shape: ty.shape.clone(), data }
}

/// Elements `start, start + step, … < end` along `axis`.
pub(crate) fn slice(x: &Tensor, axis: usize, start: usize, step: usize, ty: &StaticType) -> Tensor {
    let mut s = strides(&x.shape);
    let base = start * s[axis];
    s[axis] *= step;
    let data = if ty.numel() == 0 {
        map_buffer!(&x.data, _v => Vec::new())
    } else {
        map_buffer!(&x.data, v => strided_copy(v, base, &ty.shape, s.clone()))
    };
    Tensor { shape: ty.shape.clone(), data }
}

fn concat_typed<T: Copy>(parts: &[(&[T], usize)], outer: usize, total: usize) -> Vec<T> {
    let mut dst = Vec::with_capacity(total);
    for o in 0..outer {
        for &(v, chunk) in parts {
            dst.extend_from_slice(&v[o * chunk..(o + 1) * chunk]);
        }
    }
    dst
}

pub(crate) fn concat(xs: &[&Tensor], axis: usize, ty: &StaticType) -> Result<Tensor, EvalError> {
    let outer: usize = ty.shape[..axis].iter().product();
    let chunk = |t: &Tensor| numel(&t.shape[axis..]);
    macro_rules! parts {
        ($variant:ident) => {{
            let mut parts = Vec::with_capacity(xs.len());
            for t in xs {
                match &t.data {
                    Buffer::$variant(v) => parts.push((&v[..], chunk(t))),
                    _ => {
                        return Err(EvalError::Operands {
                            op: "concat",
                            msg: format!("operand dtypes differ: {} vs {}", ty.dtype, t.dtype()),
                        })
                    }
                }
            }
            Buffer::$variant(concat_typed(&parts, outer, ty.numel()))
        }};
    }
    let data = match &xs[0].data {
        Buffer::F32(_) => parts!(F32),
        Buffer::F64(_) => parts!(F64),
        Buffer::F16(_) => parts!(F16),
        Buffer::BF16(_) => parts!(BF16),
        Buffer::I32(_) => parts!(I32),
        Buffer::I64(_) => parts!(I64),
        Buffer::Bool(_) => parts!(Bool),
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

fn pad_typed<T: Elem>(
    v: &[T],
    shape: &[usize],
    pads: &[(usize, usize)],
    value: f64,
    out: &[usize],
) -> Vec<T> {
    let mut dst = vec![T::from_f64(value); numel(out)];
    if v.is_empty() {
        return dst;
    }
    // Walk the input row by row; each row lands at a shifted offset of the output.
    let ost = strides(out);
    let base: usize = pads.iter().zip(&ost).map(|(p, s)| p.0 * s).sum();
    let walk = Walk::new(shape, [strides(shape), ost]);
    let len = walk.row_len();
    let [si, so] = walk.row_strides();
    walk.for_each_row(|_, [oi, oo]| {
        let oo = oo + base;
        if si == 1 && so == 1 {
            dst[oo..oo + len].copy_from_slice(&v[oi..oi + len]);
        } else {
            for j in 0..len {
                dst[oo + j * so] = v[oi + j * si];
            }
        }
    });
    dst
}

/// Pads with `value` converted to the dtype like a `full` (ints truncate, bool is `!= 0`).
pub(crate) fn pad(x: &Tensor, pads: &[(usize, usize)], value: f64, ty: &StaticType) -> Tensor {
    let data = map_buffer!(&x.data, v => pad_typed(v, &x.shape, pads, value, &ty.shape));
    Tensor { shape: ty.shape.clone(), data }
}

fn gather_typed<T: Copy>(table: &[T], pre: usize, extent: usize, post: usize, idx: &[usize]) -> Vec<T> {
    let mut dst = Vec::with_capacity(pre * idx.len() * post);
    for p in 0..pre {
        let block = &table[p * extent * post..(p + 1) * extent * post];
        for &i in idx {
            dst.extend_from_slice(&block[i * post..(i + 1) * post]);
        }
    }
    dst
}

/// The indices of a `gather` or `scatter_add` as i64 values.
fn index_values(op: &'static str, indices: &Tensor) -> Result<Vec<i64>, EvalError> {
    match &indices.data {
        Buffer::I32(v) => Ok(v.iter().map(|&i| i as i64).collect()),
        Buffer::I64(v) => Ok(v.clone()),
        _ => Err(EvalError::Operands {
            op,
            msg: format!("indices must be i32 or i64, got {}", indices.dtype()),
        }),
    }
}

/// `gather(table, indices)` along `axis`. Every index must lie in `0..table.shape[axis]`;
/// negative indices are not wrapped but rejected like any out-of-range index.
pub(crate) fn gather(
    table: &Tensor,
    indices: &Tensor,
    axis: usize,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let extent = table.shape[axis];
    let raw = index_values("gather", indices)?;
    let mut idx = Vec::with_capacity(raw.len());
    for (pos, &i) in raw.iter().enumerate() {
        if i < 0 || i as u64 >= extent as u64 {
            return Err(EvalError::GatherIndex {
                index: i,
                position: super::unravel(pos, &indices.shape),
                axis,
                extent,
            });
        }
        idx.push(i as usize);
    }
    let pre: usize = table.shape[..axis].iter().product();
    let post: usize = table.shape[axis + 1..].iter().product();
    let data = map_buffer!(&table.data, v => gather_typed(v, pre, extent, post, &idx));
    Ok(Tensor { shape: ty.shape.clone(), data })
}

/// `out = 0; out[p, idx[q], c] = add(out[p, idx[q], c], updates[p, q, c])` for every `p`, then
/// every position `q` in order: each output element sums its updates in position order.
fn scatter_add_typed<T: Copy>(
    updates: &[T],
    (pre, extent, post): (usize, usize, usize),
    idx: &[usize],
    zero: T,
    add: impl Fn(T, T) -> T,
) -> Vec<T> {
    let n = idx.len();
    let mut out = vec![zero; pre * extent * post];
    for p in 0..pre {
        for (q, &i) in idx.iter().enumerate() {
            let src = &updates[(p * n + q) * post..(p * n + q + 1) * post];
            let dst = &mut out[(p * extent + i) * post..(p * extent + i + 1) * post];
            for (d, &u) in dst.iter_mut().zip(src) {
                *d = add(*d, u);
            }
        }
    }
    out
}

/// `scatter_add(updates, indices)` along `axis` into `extent` rows, the adjoint of `gather`:
/// every index must lie in `0..extent` like a gather's. Each addition rounds to the dtype
/// (f16 and bf16 add in f32 and round back, like a chain of `add`s); integers wrap.
pub(crate) fn scatter_add(
    updates: &Tensor,
    indices: &Tensor,
    axis: usize,
    extent: usize,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let raw = index_values("scatter_add", indices)?;
    let mut idx = Vec::with_capacity(raw.len());
    for (pos, &i) in raw.iter().enumerate() {
        if i < 0 || i as u64 >= extent as u64 {
            return Err(EvalError::ScatterIndex {
                index: i,
                position: super::unravel(pos, &indices.shape),
                axis,
                extent,
            });
        }
        idx.push(i as usize);
    }
    let pre: usize = updates.shape[..axis].iter().product();
    let post: usize = updates.shape[axis + indices.shape.len()..].iter().product();
    let dims = (pre, extent, post);
    let data = match &updates.data {
        Buffer::F32(v) => Buffer::F32(scatter_add_typed(v, dims, &idx, 0.0, |a, b| a + b)),
        Buffer::F64(v) => Buffer::F64(scatter_add_typed(v, dims, &idx, 0.0, |a, b| a + b)),
        Buffer::F16(v) => Buffer::F16(scatter_add_typed(v, dims, &idx, half::f16::ZERO, |a, b| {
            half::f16::from_f32(a.to_f32() + b.to_f32())
        })),
        Buffer::BF16(v) => Buffer::BF16(scatter_add_typed(v, dims, &idx, half::bf16::ZERO, |a, b| {
            half::bf16::from_f32(a.to_f32() + b.to_f32())
        })),
        Buffer::I32(v) => Buffer::I32(scatter_add_typed(v, dims, &idx, 0, i32::wrapping_add)),
        Buffer::I64(v) => Buffer::I64(scatter_add_typed(v, dims, &idx, 0, i64::wrapping_add)),
        Buffer::Bool(_) => {
            return Err(EvalError::Operands { op: "scatter_add", msg: "bool updates have no sum".into() })
        }
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}
