//! Shape and dtype inference: the result type of an op from its operands' types.
//!
//! This is the single source of typing rules; the lowering reports these errors at the spec
//! position of the op, and the verifier re-runs them over whole graphs.

use crate::dtype::{fmt_shape, numel, DType, Shape, TensorType};
use crate::op::{BinaryOp, Op, UnaryOp};

/// Why an op cannot be applied to operands of the given types.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    #[error("`{op}` takes {expected} operand(s), got {got}")]
    Arity { op: &'static str, expected: usize, got: usize },
    #[error("`{op}`: shapes {} and {} do not broadcast (axis {axis}: {a} vs {b})", fmt_shape(.lhs), fmt_shape(.rhs))]
    Broadcast { op: &'static str, lhs: Shape, rhs: Shape, axis: usize, a: usize, b: usize },
    #[error("`{op}`: operand dtypes differ: {lhs} vs {rhs}")]
    DTypeMismatch { op: &'static str, lhs: DType, rhs: DType },
    #[error("`{op}` needs {expected} operands, got {got}")]
    DTypeKind { op: &'static str, expected: &'static str, got: DType },
    #[error("`{op}`: {msg}")]
    Invalid { op: &'static str, msg: String },
}

fn invalid(op: &Op, msg: impl Into<String>) -> InferError {
    InferError::Invalid { op: op.name(), msg: msg.into() }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Shape, InferError> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            (x, y) => {
                return Err(InferError::Broadcast {
                    op,
                    lhs: a.to_vec(),
                    rhs: b.to_vec(),
                    axis: i,
                    a: x,
                    b: y,
                })
            }
        };
    }
    Ok(out)
}

fn same_dtype(op: &Op, a: DType, b: DType) -> Result<DType, InferError> {
    if a != b {
        return Err(InferError::DTypeMismatch { op: op.name(), lhs: a, rhs: b });
    }
    Ok(a)
}

fn need(op: &Op, cond: bool, expected: &'static str, got: DType) -> Result<(), InferError> {
    if cond {
        Ok(())
    } else {
        Err(InferError::DTypeKind { op: op.name(), expected, got })
    }
}

/// Output size of one spatial axis of a convolution or pooling window.
fn window_out(
    op: &Op,
    size: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
) -> Result<usize, InferError> {
    // A stride or dilation of 0 has no meaning; the language refuses it at the spec, and a
    // graph built by hand gets this error rather than a window of overlapping taps.
    if stride == 0 || dilation == 0 {
        return Err(invalid(op, format!("stride ({stride}) and dilation ({dilation}) must be at least 1")));
    }
    let eff = dilation.saturating_mul(kernel.max(1) - 1).saturating_add(1);
    let padded = pad.checked_mul(2).and_then(|p| size.checked_add(p));
    match padded {
        Some(padded) if padded >= eff => Ok((padded - eff) / stride + 1),
        _ => Err(invalid(
            op,
            format!("window {kernel} (dilation {dilation}) does not fit input {size} with padding {pad}"),
        )),
    }
}

/// The result type of `op` applied to operands of `types`.
pub fn infer(op: &Op, types: &[&TensorType]) -> Result<TensorType, InferError> {
    let ty = infer_unchecked(op, types)?;
    if ty.numel() > crate::dtype::MAX_ELEMENTS {
        return Err(invalid(op, format!("the result {} has more than 2^40 elements", fmt_shape(&ty.shape))));
    }
    Ok(ty)
}

fn infer_unchecked(op: &Op, types: &[&TensorType]) -> Result<TensorType, InferError> {
    if let Some(n) = op.arity() {
        if types.len() != n {
            return Err(InferError::Arity { op: op.name(), expected: n, got: types.len() });
        }
    } else if types.is_empty() {
        return Err(invalid(op, "needs at least one operand"));
    }
    let t = |i: usize| types[i];
    Ok(match op {
        Op::Input { dtype, shape, .. } | Op::Param { dtype, shape, .. } => {
            TensorType::new(*dtype, shape.clone())
        }
        Op::Const { value } => TensorType::new(value.dtype(), value.shape.clone()),
        Op::Full { dtype, shape, .. } => TensorType::new(*dtype, shape.clone()),
        Op::Iota { dtype, shape, axis } => {
            if *axis >= shape.len() {
                return Err(invalid(op, format!("axis {axis} out of range for rank {}", shape.len())));
            }
            need(op, *dtype != DType::Bool, "numeric", *dtype)?;
            TensorType::new(*dtype, shape.clone())
        }
        Op::RandomUniform { dtype, shape, base, .. } => {
            need(op, dtype.is_float(), "floating-point", *dtype)?;
            if *base && (t(0).dtype != DType::I64 || t(0).rank() != 0) {
                return Err(invalid(op, format!("the counter base must be an i64 scalar, not {}", t(0))));
            }
            TensorType::new(*dtype, shape.clone())
        }
        Op::Unary(u) => {
            let d = t(0).dtype;
            if u.float_only() {
                need(op, d.is_float(), "floating-point", d)?;
            } else {
                need(op, d != DType::Bool, "numeric", d)?;
            }
            if *u == UnaryOp::Abs || *u == UnaryOp::Neg || *u == UnaryOp::Relu {
                need(op, d != DType::Bool, "numeric", d)?;
            }
            t(0).clone()
        }
        Op::Binary(b) => {
            let d = same_dtype(op, t(0).dtype, t(1).dtype)?;
            need(op, d != DType::Bool, "numeric", d)?;
            if *b == BinaryOp::Pow {
                need(op, d.is_float(), "floating-point", d)?;
            }
            TensorType::new(d, broadcast_shapes(op.name(), &t(0).shape, &t(1).shape)?)
        }
        Op::Compare(_) => {
            same_dtype(op, t(0).dtype, t(1).dtype)?;
            TensorType::new(DType::Bool, broadcast_shapes(op.name(), &t(0).shape, &t(1).shape)?)
        }
        Op::Where => {
            need(op, t(0).dtype == DType::Bool, "a bool condition and two value", t(0).dtype)?;
            let d = same_dtype(op, t(1).dtype, t(2).dtype)?;
            let s = broadcast_shapes(op.name(), &t(0).shape, &t(1).shape)?;
            TensorType::new(d, broadcast_shapes(op.name(), &s, &t(2).shape)?)
        }
        Op::Cast { to } => TensorType::new(*to, t(0).shape.clone()),
        Op::Reduce { op: r, axes, keepdims } => {
            let s = &t(0).shape;
            if axes.windows(2).any(|w| w[0] >= w[1]) || axes.iter().any(|&a| a >= s.len()) {
                return Err(invalid(
                    op,
                    format!("axes {} must be sorted, unique and below rank {}", fmt_shape(axes), s.len()),
                ));
            }
            let d = t(0).dtype;
            need(op, d != DType::Bool, "numeric", d)?;
            if *r == crate::op::ReduceOp::Mean {
                need(op, d.is_float(), "floating-point", d)?;
            }
            let shape = (0..s.len())
                .filter_map(|i| match (axes.contains(&i), keepdims) {
                    (false, _) => Some(s[i]),
                    (true, true) => Some(1),
                    (true, false) => None,
                })
                .collect::<Shape>();
            TensorType::new(d, shape)
        }
        Op::Reshape { shape } => {
            if numel(shape) != t(0).numel() {
                return Err(invalid(
                    op,
                    format!(
                        "cannot reshape {} ({} elements) to {} ({} elements)",
                        fmt_shape(&t(0).shape),
                        t(0).numel(),
                        fmt_shape(shape),
                        numel(shape)
                    ),
                ));
            }
            TensorType::new(t(0).dtype, shape.clone())
        }
        Op::Transpose { perm } => {
            let s = &t(0).shape;
            let mut seen = perm.clone();
            seen.sort_unstable();
            if seen != (0..s.len()).collect::<Vec<_>>() {
                return Err(invalid(
                    op,
                    format!(
                        "{} is not a permutation of the {} axes of {}",
                        fmt_shape(perm),
                        s.len(),
                        fmt_shape(s)
                    ),
                ));
            }
            TensorType::new(t(0).dtype, perm.iter().map(|&p| s[p]).collect::<Shape>())
        }
        Op::BroadcastTo { shape } => {
            let b = broadcast_shapes(op.name(), &t(0).shape, shape)?;
            if &b != shape {
                return Err(invalid(
                    op,
                    format!("cannot broadcast {} to {}", fmt_shape(&t(0).shape), fmt_shape(shape)),
                ));
            }
            TensorType::new(t(0).dtype, shape.clone())
        }
        Op::Slice { axis, start, end, step } => {
            let s = &t(0).shape;
            if *axis >= s.len() || *step == 0 || start > end || *end > s[*axis] {
                return Err(invalid(
                    op,
                    format!(
                        "slice {start}..{end} step {step} on axis {axis} is out of range for {}",
                        fmt_shape(s)
                    ),
                ));
            }
            let mut shape = s.clone();
            shape[*axis] = (end - start).div_ceil(*step);
            TensorType::new(t(0).dtype, shape)
        }
        Op::Concat { axis } => {
            let first = t(0);
            if *axis >= first.rank() {
                return Err(invalid(op, format!("axis {axis} out of range for rank {}", first.rank())));
            }
            let mut shape = first.shape.clone();
            for other in &types[1..] {
                same_dtype(op, first.dtype, other.dtype)?;
                let compatible = other.rank() == first.rank()
                    && (0..first.rank()).all(|i| i == *axis || other.shape[i] == first.shape[i]);
                if !compatible {
                    return Err(invalid(
                        op,
                        format!(
                            "shapes {} and {} differ outside axis {axis}",
                            fmt_shape(&first.shape),
                            fmt_shape(&other.shape)
                        ),
                    ));
                }
                shape[*axis] = shape[*axis].saturating_add(other.shape[*axis]);
            }
            TensorType::new(first.dtype, shape)
        }
        Op::Pad { pads, .. } => {
            let s = &t(0).shape;
            if pads.len() != s.len() {
                return Err(invalid(op, format!("{} pad pairs for rank {}", pads.len(), s.len())));
            }
            let shape = s
                .iter()
                .zip(pads)
                .map(|(d, (a, b))| d.saturating_add(*a).saturating_add(*b))
                .collect::<Shape>();
            TensorType::new(t(0).dtype, shape)
        }
        Op::Gather { axis } => {
            let (table, idx) = (t(0), t(1));
            need(op, idx.dtype.is_int(), "integer indices (and a table)", idx.dtype)?;
            if *axis >= table.rank() {
                return Err(invalid(op, format!("axis {axis} out of range for rank {}", table.rank())));
            }
            let mut shape = table.shape[..*axis].to_vec();
            shape.extend_from_slice(&idx.shape);
            shape.extend_from_slice(&table.shape[axis + 1..]);
            TensorType::new(table.dtype, shape)
        }
        Op::ScatterAdd { axis, extent } => {
            let (updates, idx) = (t(0), t(1));
            need(op, idx.dtype.is_int(), "integer indices (and numeric updates)", idx.dtype)?;
            need(op, updates.dtype != DType::Bool, "numeric updates (and integer indices)", updates.dtype)?;
            let k = idx.rank();
            let fits =
                updates.rank() >= axis.saturating_add(k) && updates.shape[*axis..axis + k] == idx.shape[..];
            if !fits {
                return Err(invalid(
                    op,
                    format!(
                        "updates {} do not hold indices {} at axis {axis}",
                        fmt_shape(&updates.shape),
                        fmt_shape(&idx.shape)
                    ),
                ));
            }
            let mut shape = updates.shape[..*axis].to_vec();
            shape.push(*extent);
            shape.extend_from_slice(&updates.shape[axis + k..]);
            TensorType::new(updates.dtype, shape)
        }
        Op::MatMul => {
            let (a, b) = (t(0), t(1));
            let d = same_dtype(op, a.dtype, b.dtype)?;
            need(op, d != DType::Bool, "numeric", d)?;
            matmul_shape(&a.shape, &b.shape).map(|s| TensorType::new(d, s)).map_err(|m| invalid(op, m))?
        }
        Op::Conv2d { stride, padding, dilation, groups } => {
            let (x, w) = (t(0), t(1));
            let d = same_dtype(op, x.dtype, w.dtype)?;
            need(op, d.is_float(), "floating-point", d)?;
            if x.rank() != 4 || w.rank() != 4 {
                return Err(invalid(
                    op,
                    format!(
                        "needs NCHW input and OIHW weight, got {} and {}",
                        fmt_shape(&x.shape),
                        fmt_shape(&w.shape)
                    ),
                ));
            }
            let g = *groups;
            if g == 0 || x.shape[1] % g != 0 || w.shape[0] % g != 0 || w.shape[1] * g != x.shape[1] {
                return Err(invalid(
                    op,
                    format!(
                        "input channels {} and weight {} do not agree with groups {g}",
                        x.shape[1],
                        fmt_shape(&w.shape)
                    ),
                ));
            }
            let h = window_out(op, x.shape[2], w.shape[2], stride[0], padding[0], dilation[0])?;
            let wd = window_out(op, x.shape[3], w.shape[3], stride[1], padding[1], dilation[1])?;
            TensorType::new(d, vec![x.shape[0], w.shape[0], h, wd])
        }
        Op::Pool2d { kernel, stride, padding, .. } => {
            let x = t(0);
            need(op, x.dtype.is_float(), "floating-point", x.dtype)?;
            if x.rank() != 4 {
                return Err(invalid(op, format!("needs an NCHW input, got {}", fmt_shape(&x.shape))));
            }
            if padding[0].saturating_mul(2) > kernel[0] || padding[1].saturating_mul(2) > kernel[1] {
                return Err(invalid(op, "padding must be at most half the kernel"));
            }
            let h = window_out(op, x.shape[2], kernel[0], stride[0], padding[0], 1)?;
            let w = window_out(op, x.shape[3], kernel[1], stride[1], padding[1], 1)?;
            TensorType::new(x.dtype, vec![x.shape[0], x.shape[1], h, w])
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            let x = t(0);
            need(op, x.dtype.is_float(), "floating-point", x.dtype)?;
            if *axis >= x.rank() {
                return Err(invalid(op, format!("axis {axis} out of range for rank {}", x.rank())));
            }
            x.clone()
        }
        Op::Gelu { .. } => {
            need(op, t(0).dtype.is_float(), "floating-point", t(0).dtype)?;
            t(0).clone()
        }
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
            let x = t(0);
            need(op, x.dtype.is_float(), "floating-point", x.dtype)?;
            norm_params(op, &x.shape, x.dtype, &types[1..])?;
            x.clone()
        }
        Op::AddNorm { .. } => {
            let (a, b) = (t(0), t(1));
            let d = same_dtype(op, a.dtype, b.dtype)?;
            need(op, d.is_float(), "floating-point", d)?;
            let shape = broadcast_shapes(op.name(), &a.shape, &b.shape)?;
            norm_params(op, &shape, d, &types[2..])?;
            TensorType::new(d, shape)
        }
        Op::Attention { .. } => attention_type(op, types)?,
        Op::MatMulEpilogue { bias, .. } => {
            let (a, b) = (t(0), t(1));
            let d = same_dtype(op, a.dtype, b.dtype)?;
            need(op, d.is_float(), "floating-point", d)?;
            let shape = matmul_shape(&a.shape, &b.shape).map_err(|m| invalid(op, m))?;
            if *bias {
                let c = t(2);
                same_dtype(op, d, c.dtype)?;
                if broadcast_shapes(op.name(), &c.shape, &shape).ok().as_ref() != Some(&shape) {
                    return Err(invalid(
                        op,
                        format!(
                            "the bias {} does not broadcast to the product's shape {}",
                            fmt_shape(&c.shape),
                            fmt_shape(&shape)
                        ),
                    ));
                }
            }
            TensorType::new(d, shape)
        }
    })
}

/// Checks the scale and shift operands of a normalization over the last axis of `shape`: each
/// must have the dtype `d` and the shape `[shape[-1]]`. Also checks the rank is at least 1.
fn norm_params(op: &Op, shape: &[usize], d: DType, params: &[&TensorType]) -> Result<(), InferError> {
    let Some(&last) = shape.last() else {
        return Err(invalid(op, "normalizes over the last axis, but the operand is a scalar"));
    };
    for (p, what) in params.iter().zip(["gamma", "beta"]) {
        same_dtype(op, d, p.dtype)?;
        if p.shape != [last] {
            return Err(invalid(
                op,
                format!(
                    "{what} must have shape [{last}] (the last axis of {}), got {}",
                    fmt_shape(shape),
                    fmt_shape(&p.shape)
                ),
            ));
        }
    }
    Ok(())
}

/// `attention(q, k, v[, mask])`: q `[…, Sq, D]`, k `[…, Sk, D]`, v `[…, Sk, Dv]` with equal
/// batch axes (no broadcasting among them), the mask broadcasting to `[…, Sq, Sk]`.
fn attention_type(op: &Op, types: &[&TensorType]) -> Result<TensorType, InferError> {
    let (q, k, v) = (types[0], types[1], types[2]);
    let d = same_dtype(op, q.dtype, k.dtype)?;
    same_dtype(op, d, v.dtype)?;
    need(op, d.is_float(), "floating-point", d)?;
    let shapes =
        || format!("q {}, k {}, v {}", fmt_shape(&q.shape), fmt_shape(&k.shape), fmt_shape(&v.shape));
    if q.rank() < 2 || k.rank() != q.rank() || v.rank() != q.rank() {
        return Err(invalid(op, format!("q, k and v need one rank of at least 2, got {}", shapes())));
    }
    let r = q.rank();
    if q.shape[..r - 2] != k.shape[..r - 2] || q.shape[..r - 2] != v.shape[..r - 2] {
        return Err(invalid(op, format!("the batch axes of q, k and v differ: {}", shapes())));
    }
    let (sq, dq) = (q.shape[r - 2], q.shape[r - 1]);
    let (sk, dk) = (k.shape[r - 2], k.shape[r - 1]);
    let (sv, dv) = (v.shape[r - 2], v.shape[r - 1]);
    if dq != dk {
        return Err(invalid(op, format!("q and k differ in their last axis ({dq} vs {dk}): {}", shapes())));
    }
    if sk != sv {
        return Err(invalid(
            op,
            format!("k and v differ in their sequence axis ({sk} vs {sv}): {}", shapes()),
        ));
    }
    if let Some(m) = types.get(3) {
        same_dtype(op, d, m.dtype)?;
        let mut scores = q.shape[..r - 2].to_vec();
        scores.extend([sq, sk]);
        if broadcast_shapes(op.name(), &m.shape, &scores).ok().as_ref() != Some(&scores) {
            return Err(invalid(
                op,
                format!(
                    "the mask {} does not broadcast to the scores {} (q {}, k {})",
                    fmt_shape(&m.shape),
                    fmt_shape(&scores),
                    fmt_shape(&q.shape),
                    fmt_shape(&k.shape)
                ),
            ));
        }
    }
    let mut shape = q.shape[..r - 1].to_vec();
    shape.push(dv);
    Ok(TensorType::new(d, shape))
}

/// Numpy `matmul` result shape, or a message saying why the shapes do not multiply.
pub fn matmul_shape(a: &[usize], b: &[usize]) -> Result<Shape, String> {
    if a.is_empty() || b.is_empty() {
        return Err("operands must have rank ≥ 1".into());
    }
    let a2: Shape = if a.len() == 1 { vec![1, a[0]] } else { a.to_vec() };
    let b2: Shape = if b.len() == 1 { vec![b[0], 1] } else { b.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let (k2, n) = (b2[b2.len() - 2], b2[b2.len() - 1]);
    if k != k2 {
        return Err(format!("inner dimensions differ: {} · {} ({k} vs {k2})", fmt_shape(a), fmt_shape(b)));
    }
    let batch = broadcast_shapes("matmul", &a2[..a2.len() - 2], &b2[..b2.len() - 2])
        .map_err(|_| format!("batch dimensions of {} and {} do not broadcast", fmt_shape(a), fmt_shape(b)))?;
    let mut out = batch;
    if a.len() > 1 {
        out.push(m);
    }
    if b.len() > 1 {
        out.push(n);
    }
    Ok(out)
}
