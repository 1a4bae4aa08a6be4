//! Shape and dtype inference: the result type of an op from its operands' types.
//!
//! This is the single source of typing rules; the lowering reports these errors at the spec
//! position of the op, and the verifier re-runs them over whole graphs.
//!
//! Extents may be sizes over the graph's symbols. Two of them agree when their normal forms
//! are equal ([`SizeExpr`](crate::SizeExpr)); when they are not and either is symbolic, the
//! rule cannot prove what it needs and says so ([`InferError::Unproven`]). Nothing is proved
//! by trying values.

use crate::dtype::{fmt_shape, numel_dim, static_dims, DType, Dim, Shape, TensorType};
use crate::op::{BinaryOp, Op, UnaryOp};
use crate::size::SymbolDecl;

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
    #[error("`{op}`: cannot prove that {what} are equal: {left} vs {right}")]
    Unproven { op: &'static str, what: String, left: Dim, right: Dim },
}

/// Whether `a` and `b` are the same extent: `Ok(false)` when both are constants that differ
/// (the caller's own error), [`InferError::Unproven`] when a symbolic one differs in normal
/// form.
fn same_dim(op: &'static str, what: impl Fn() -> String, a: &Dim, b: &Dim) -> Result<bool, InferError> {
    match (a, b) {
        _ if a == b => Ok(true),
        (Dim::Const(_), Dim::Const(_)) => Ok(false),
        _ => Err(InferError::Unproven { op, what: what(), left: a.clone(), right: b.clone() }),
    }
}

/// An error of [`matmul_shape`] as the error of `op`.
fn rename(op: &Op, e: InferError) -> InferError {
    match e {
        InferError::Invalid { msg, .. } => invalid(op, msg),
        InferError::Unproven { what, left, right, .. } => {
            InferError::Unproven { op: op.name(), what, left, right }
        }
        other => other,
    }
}

fn size_error(op: &Op, e: crate::size::SizeError) -> InferError {
    invalid(op, e.to_string())
}

fn invalid(op: &Op, msg: impl Into<String>) -> InferError {
    InferError::Invalid { op: op.name(), msg: msg.into() }
}

/// Numpy broadcasting of two shapes: equal extents, or a static 1 against any.
pub fn broadcast_shapes(op: &'static str, a: &[Dim], b: &[Dim]) -> Result<Shape, InferError> {
    let rank = a.len().max(b.len());
    let one = Dim::Const(1);
    let mut out = Vec::with_capacity(rank);
    for i in 0..rank {
        let da = if i + a.len() >= rank { &a[i + a.len() - rank] } else { &one };
        let db = if i + b.len() >= rank { &b[i + b.len() - rank] } else { &one };
        out.push(match (da, db) {
            (x, y) if x == y => x.clone(),
            (Dim::Const(1), y) => y.clone(),
            (x, Dim::Const(1)) => x.clone(),
            (&Dim::Const(x), &Dim::Const(y)) => {
                return Err(InferError::Broadcast {
                    op,
                    lhs: a.to_vec(),
                    rhs: b.to_vec(),
                    axis: i,
                    a: x,
                    b: y,
                })
            }
            (x, y) => {
                return Err(InferError::Unproven {
                    op,
                    what: format!("axis {i} of {} and {}", fmt_shape(a), fmt_shape(b)),
                    left: x.clone(),
                    right: y.clone(),
                })
            }
        });
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

/// [`window_out`] along an axis whose extent may be a size over the symbols: then the result
/// is `⌊(size + 2·pad − span) / stride⌋ + 1`, and the window must fit the input at the
/// smallest size the symbols' bounds give (a sequence of 1 under a window of 3 with no padding
/// has no output).
fn window_out_dim(
    op: &Op,
    size: &Dim,
    kernel: usize,
    [stride, pad, dilation]: [usize; 3],
    symbols: &[SymbolDecl],
) -> Result<Dim, InferError> {
    let e = match size {
        Dim::Const(c) => return window_out(op, *c, kernel, stride, pad, dilation).map(Dim::Const),
        Dim::Sym(e) => e,
    };
    // The smallest static extent decides stride, dilation and fit.
    let min = usize::try_from(e.range(symbols).min.max(0)).unwrap_or(0);
    window_out(op, min, kernel, stride, pad, dilation).map_err(|_| {
        invalid(
            op,
            format!(
                "window {kernel} (dilation {dilation}) does not fit input {size} with padding {pad} \
                 at its smallest, {min}"
            ),
        )
    })?;
    let span = dilation * (kernel.max(1) - 1) + 1;
    let out = size
        .add(&Dim::Const(2 * pad))
        .and_then(|d| d.sub(&Dim::Const(span)))
        .and_then(|d| d.floor_div(stride))
        .and_then(|d| d.add(&Dim::Const(1)));
    out.map_err(|err| size_error(op, err))
}

/// The extents of `ty` over `axes`, which must be static (`what` they are: a convolution's
/// channels, its weight); the axes before them are 0 in the result.
fn static_axes(
    op: &Op,
    ty: &TensorType,
    axes: std::ops::Range<usize>,
    what: &str,
) -> Result<Vec<usize>, InferError> {
    let mut out = vec![0; axes.start];
    for d in &ty.shape[axes] {
        match d {
            Dim::Const(c) => out.push(*c),
            Dim::Sym(_) => {
                return Err(invalid(op, format!("needs {what} to be static, got {}", fmt_shape(&ty.shape))))
            }
        }
    }
    Ok(out)
}

/// The result type of `op` applied to operands of `types`.
pub fn infer(op: &Op, types: &[&TensorType]) -> Result<TensorType, InferError> {
    infer_with(op, types, &[])
}

/// [`infer`] in a graph with `symbols`, whose bounds prove a slice's symbolic bounds in range
/// (a symbol not declared there is unbounded). A symbolic result is checked against the
/// element limit when the graph is specialized.
pub fn infer_with(op: &Op, types: &[&TensorType], symbols: &[SymbolDecl]) -> Result<TensorType, InferError> {
    let ty = infer_unchecked(op, types, symbols)?;
    if let Some(s) = static_dims(&ty.shape) {
        if crate::dtype::numel(&s) > crate::dtype::MAX_ELEMENTS {
            return Err(invalid(
                op,
                format!("the result {} has more than 2^40 elements", fmt_shape(&ty.shape)),
            ));
        }
    }
    Ok(ty)
}

fn infer_unchecked(op: &Op, types: &[&TensorType], symbols: &[SymbolDecl]) -> Result<TensorType, InferError> {
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
        Op::Const { value } => TensorType::new(value.dtype(), value.shape.as_slice()),
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
                    (false, _) => Some(s[i].clone()),
                    (true, true) => Some(Dim::Const(1)),
                    (true, false) => None,
                })
                .collect::<Shape>();
            TensorType::new(d, shape)
        }
        Op::Reshape { shape } => {
            let (from, to) = (
                numel_dim(&t(0).shape).map_err(|e| size_error(op, e))?,
                numel_dim(shape).map_err(|e| size_error(op, e))?,
            );
            let what =
                || format!("the element counts of {} and {}", fmt_shape(&t(0).shape), fmt_shape(shape));
            if !same_dim(op.name(), what, &from, &to)? {
                return Err(invalid(
                    op,
                    format!(
                        "cannot reshape {} ({} elements) to {} ({} elements)",
                        fmt_shape(&t(0).shape),
                        from,
                        fmt_shape(shape),
                        to
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
            TensorType::new(t(0).dtype, perm.iter().map(|&p| s[p].clone()).collect::<Shape>())
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
            let out_of_range = || {
                invalid(
                    op,
                    format!(
                        "slice {start}..{end} step {step} on axis {axis} is out of range for {}",
                        fmt_shape(s)
                    ),
                )
            };
            if *axis >= s.len() || *step == 0 {
                return Err(out_of_range());
            }
            // `0 ≤ start ≤ end ≤ extent` for every binding within the bounds.
            let nonneg = |d: &Dim| match d {
                Dim::Const(_) => true,
                Dim::Sym(_) => d.range(symbols).min >= 0,
            };
            let ordered = |lo: &Dim, hi: &Dim| hi.sub(lo).is_ok_and(|d| nonneg(&d));
            if !(nonneg(start) && ordered(start, end) && ordered(end, &s[*axis])) {
                return Err(out_of_range());
            }
            let len =
                end.sub(start).and_then(|d| d.add(&Dim::Const(step - 1))).and_then(|d| d.floor_div(*step));
            let mut shape = s.clone();
            shape[*axis] = len.map_err(|e| size_error(op, e))?;
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
                let mut compatible = other.rank() == first.rank();
                for i in 0..first.rank() {
                    if compatible && i != *axis {
                        let what = || {
                            format!(
                                "axis {i} of the concatenated {} and {}",
                                fmt_shape(&first.shape),
                                fmt_shape(&other.shape)
                            )
                        };
                        compatible = same_dim(op.name(), what, &first.shape[i], &other.shape[i])?;
                    }
                }
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
                shape[*axis] = shape[*axis].add(&other.shape[*axis]).map_err(|e| size_error(op, e))?;
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
                .map(|(d, (a, b))| d.add(&Dim::Const(a.saturating_add(*b))))
                .collect::<Result<Shape, _>>()
                .map_err(|e| size_error(op, e))?;
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
            let mut fits = updates.rank() >= axis.saturating_add(k);
            for i in 0..k {
                if fits {
                    let what = || {
                        format!(
                            "the index axes of updates {} and indices {}",
                            fmt_shape(&updates.shape),
                            fmt_shape(&idx.shape)
                        )
                    };
                    fits = same_dim(op.name(), what, &updates.shape[axis + i], &idx.shape[i])?;
                }
            }
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
            shape.push(Dim::Const(*extent));
            shape.extend_from_slice(&updates.shape[axis + k..]);
            TensorType::new(updates.dtype, shape)
        }
        Op::MatMul => {
            let (a, b) = (t(0), t(1));
            let d = same_dtype(op, a.dtype, b.dtype)?;
            need(op, d != DType::Bool, "numeric", d)?;
            matmul_shape(&a.shape, &b.shape).map(|s| TensorType::new(d, s)).map_err(|e| rename(op, e))?
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
            // Channels and the weight are static; the image may have run-time extents.
            let xs = static_axes(op, x, 1..2, "the input channels (axis 1)")?;
            let ws = static_axes(op, w, 0..4, "the weight's shape")?;
            let g = *groups;
            if g == 0 || xs[1] % g != 0 || ws[0] % g != 0 || ws[1] * g != xs[1] {
                return Err(invalid(
                    op,
                    format!(
                        "input channels {} and weight {} do not agree with groups {g}",
                        xs[1],
                        fmt_shape(&w.shape)
                    ),
                ));
            }
            let h = window_out_dim(op, &x.shape[2], ws[2], [stride[0], padding[0], dilation[0]], symbols)?;
            let wd = window_out_dim(op, &x.shape[3], ws[3], [stride[1], padding[1], dilation[1]], symbols)?;
            TensorType::new(d, vec![x.shape[0].clone(), Dim::Const(ws[0]), h, wd])
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
            let h = window_out_dim(op, &x.shape[2], kernel[0], [stride[0], padding[0], 1], symbols)?;
            let w = window_out_dim(op, &x.shape[3], kernel[1], [stride[1], padding[1], 1], symbols)?;
            TensorType::new(x.dtype, vec![x.shape[0].clone(), x.shape[1].clone(), h, w])
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
        Op::Attention { .. } => attention_type(op, types, false)?,
        Op::AttentionLse { .. } => attention_type(op, types, true)?,
        Op::MatMulEpilogue { bias, .. } => {
            let (a, b) = (t(0), t(1));
            let d = same_dtype(op, a.dtype, b.dtype)?;
            need(op, d.is_float(), "floating-point", d)?;
            let shape = matmul_shape(&a.shape, &b.shape).map_err(|e| rename(op, e))?;
            if *bias {
                let c = t(2);
                same_dtype(op, d, c.dtype)?;
                if bias_mismatch(op, &c.shape, &shape)? {
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
fn norm_params(op: &Op, shape: &[Dim], d: DType, params: &[&TensorType]) -> Result<(), InferError> {
    let Some(last) = shape.last() else {
        return Err(invalid(op, "normalizes over the last axis, but the operand is a scalar"));
    };
    for (p, what) in params.iter().zip(["gamma", "beta"]) {
        same_dtype(op, d, p.dtype)?;
        let axes = || format!("the last axis of {} and the {what} {}", fmt_shape(shape), fmt_shape(&p.shape));
        let fits = p.rank() == 1 && same_dim(op.name(), axes, &p.shape[0], last)?;
        if !fits {
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
/// The result of `attention` (`[…, Sq, Dv]`), or with `lse` of `attention_lse` (`[…, Sq]`,
/// operands `[q, k, (mask)]`: no v).
fn attention_type(op: &Op, types: &[&TensorType], lse: bool) -> Result<TensorType, InferError> {
    let (q, k) = (types[0], types[1]);
    let v = if lse { None } else { Some(types[2]) };
    let d = same_dtype(op, q.dtype, k.dtype)?;
    if let Some(v) = v {
        same_dtype(op, d, v.dtype)?;
    }
    need(op, d.is_float(), "floating-point", d)?;
    let shapes = || match v {
        Some(v) => format!("q {}, k {}, v {}", fmt_shape(&q.shape), fmt_shape(&k.shape), fmt_shape(&v.shape)),
        None => format!("q {}, k {}", fmt_shape(&q.shape), fmt_shape(&k.shape)),
    };
    let names = if lse { "q and k" } else { "q, k and v" };
    if q.rank() < 2 || k.rank() != q.rank() || v.is_some_and(|v| v.rank() != q.rank()) {
        return Err(invalid(op, format!("{names} need one rank of at least 2, got {}", shapes())));
    }
    let r = q.rank();
    for i in 0..r - 2 {
        let what = || format!("batch axis {i} of {}", shapes());
        let v_differs = match v {
            Some(v) => !same_dim(op.name(), what, &q.shape[i], &v.shape[i])?,
            None => false,
        };
        if !same_dim(op.name(), what, &q.shape[i], &k.shape[i])? || v_differs {
            return Err(invalid(op, format!("the batch axes of {names} differ: {}", shapes())));
        }
    }
    let (sq, dq) = (&q.shape[r - 2], &q.shape[r - 1]);
    let (sk, dk) = (&k.shape[r - 2], &k.shape[r - 1]);
    if !same_dim(op.name(), || format!("the last axes of q and k ({})", shapes()), dq, dk)? {
        return Err(invalid(op, format!("q and k differ in their last axis ({dq} vs {dk}): {}", shapes())));
    }
    if let Some(v) = v {
        let sv = &v.shape[r - 2];
        if !same_dim(op.name(), || format!("the sequence axes of k and v ({})", shapes()), sk, sv)? {
            return Err(invalid(
                op,
                format!("k and v differ in their sequence axis ({sk} vs {sv}): {}", shapes()),
            ));
        }
    }
    if let Some(m) = types.get(if lse { 2 } else { 3 }) {
        same_dtype(op, d, m.dtype)?;
        let mut scores = q.shape[..r - 2].to_vec();
        scores.extend([sq.clone(), sk.clone()]);
        if bias_mismatch(op, &m.shape, &scores)? {
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
    if let Some(v) = v {
        shape.push(v.shape[r - 1].clone());
    }
    Ok(TensorType::new(d, shape))
}

/// Whether a bias (or mask) of `bias` fails to broadcast to `shape` (static extents that
/// differ); an extent that may or may not agree is unproven.
fn bias_mismatch(op: &Op, bias: &[Dim], shape: &[Dim]) -> Result<bool, InferError> {
    match broadcast_shapes(op.name(), bias, shape) {
        Ok(b) => Ok(b != shape),
        Err(e @ InferError::Unproven { .. }) => Err(e),
        Err(_) => Ok(true),
    }
}

/// Numpy `matmul` result shape. The inner extents must be provably equal.
pub fn matmul_shape(a: &[Dim], b: &[Dim]) -> Result<Shape, InferError> {
    let fail = |msg: String| InferError::Invalid { op: "matmul", msg };
    if a.is_empty() || b.is_empty() {
        return Err(fail("operands must have rank ≥ 1".into()));
    }
    let a2: Shape = if a.len() == 1 { vec![Dim::Const(1), a[0].clone()] } else { a.to_vec() };
    let b2: Shape = if b.len() == 1 { vec![b[0].clone(), Dim::Const(1)] } else { b.to_vec() };
    let (m, k) = (&a2[a2.len() - 2], &a2[a2.len() - 1]);
    let (k2, n) = (&b2[b2.len() - 2], &b2[b2.len() - 1]);
    let what = || format!("the inner dimensions of {} · {}", fmt_shape(a), fmt_shape(b));
    if !same_dim("matmul", what, k, k2)? {
        return Err(fail(format!(
            "inner dimensions differ: {} · {} ({k} vs {k2})",
            fmt_shape(a),
            fmt_shape(b)
        )));
    }
    let batch = match broadcast_shapes("matmul", &a2[..a2.len() - 2], &b2[..b2.len() - 2]) {
        Ok(batch) => batch,
        Err(e @ InferError::Unproven { .. }) => return Err(e),
        Err(_) => {
            return Err(fail(format!(
                "batch dimensions of {} and {} do not broadcast",
                fmt_shape(a),
                fmt_shape(b)
            )))
        }
    };
    let mut out = batch;
    if a.len() > 1 {
        out.push(m.clone());
    }
    if b.len() > 1 {
        out.push(n.clone());
    }
    Ok(out)
}
