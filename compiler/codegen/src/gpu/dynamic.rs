//! GPU kernels over run-time sizes (`docs/dynamic-shapes.md`, step 6), the GPU twin of
//! `crate::dynamic`. A kernel that reads the run's sizes takes the symbol values as its last
//! argument, `%syms` (one `u32` each, `BufRef::Symbols` in the manifest), and its grid is a size
//! over the symbols ([`GpuKernel::run_grid`]), which the runtime evaluates per run; plans and
//! shared memory are fixed at the symbols' maxima.
//!
//! * Fused elementwise kernels (layout copies included) walk any symbolic views: one invocation
//!   per element of the run, its index split by run-time extents, strides and offsets computed
//!   from `%syms`.
//! * Attention reads its batch offsets and its query and key lengths from `%syms`
//!   ([`attention::emit_run`]); the last key tile stops at the run's keys.
//! * Every other kernel is put in *row form*, as on the CPU: the leading axes up to the last
//!   symbolic one merge into one axis of rows (when their strides chain), which the static
//!   emitters see at its maximum; the emitters bound their work by the run's rows instead
//!   ([`GpuCtx::run`]). Matrix products merge every axis of A before K (B is a static matrix).
//!   A norm whose operands do not merge (a position table broadcast over the batch) splits its
//!   row number by the run's extents ([`rows::emit_norm_run`]).
//!
//! Anything else is refused by name ([`CodegenError::Symbolic`]).

use super::elements::per_element;
use super::plan::GpuPlan;
use super::skeleton::{module, workgroup_number};
use super::{attention, ceil_div, fold_run, matmul, rows, GpuCtx, GpuKernel, RunRows};
use crate::dynamic::data::{self as run_data, Part};
use crate::dynamic::reduce::{self as over, Along};
use crate::dynamic::window as run_window;
use crate::dynamic::{
    address, at_hints_and_maxima, at_maxima, buffer_view, coalesce_sym, merge_leading, pinned, refuse_on,
    row_view, rows_of, rows_then_reduced, size_value, static_view, symbolic_prefix, unravel, walk, Rows,
    Walk,
};
use crate::kernels::elementwise::{convert, eval, load, store, Ctx};
use crate::kernels::{conv, data, reduce, View};
use crate::mlir_text::Body;
use crate::program::bad;
use crate::CodegenError;
use kiln_ir::{Activation, DType, Dim, NormKind, Op};
use kiln_sched::{Expr, KernelOp, Operand, Schedule, StridedView};

/// The refusal of kernel `k` over symbolic extents on the target of `cx`.
fn refusal(k: &kiln_sched::Kernel, cx: &GpuCtx, why: impl Into<String>) -> CodegenError {
    refuse_on(k, &format!("the {} target", cx.caps.name), why)
}

/// Emits kernel `k` of `s`, some of whose operands read symbols, for the target of `cx`.
pub(crate) fn kernel(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let refuse_here = |why: String| refusal(k, cx, why);
    if k.can_fault() {
        return Err(refuse_here("a kernel that can fault reports a position in a static shape".into()));
    }
    let n_syms = s.symbols.len().max(1);
    let op = match &k.op {
        KernelOp::Elementwise(expr) => return elementwise(s, sym, k, expr, cx),
        KernelOp::Node(op) => op,
    };
    let out_shape = &k.output.view.shape;
    let shape_text = kiln_ir::fmt_shape(out_shape);
    let p = symbolic_prefix(out_shape);
    match op {
        Op::Reduce { op: how, axes, .. } if !rows_then_reduced(k, axes) => {
            return reduce_by_element(s, sym, k, *how, axes, cx);
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } if *axis < p => {
            return softmax_by_row(s, sym, k, *axis, matches!(op, Op::LogSoftmax { .. }), cx);
        }
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::AddNorm { .. }
            if out_shape.last().is_some_and(|d| !d.is_static()) =>
        {
            return norm_by_row(s, sym, k, cx);
        }
        _ => {}
    }
    if p == 0 {
        return Err(refuse_here("its result is static but an operand is not".into()));
    }
    let rows = rows_of(s, out_shape, p)?;
    let not_rows = |what: &str| {
        refuse_here(format!(
            "{what} of the result {shape_text} cannot be walked as rows of static extents \
             (its strides do not chain through the symbolic axes)"
        ))
    };
    let fixed = |o: &Operand, what: &str| {
        static_view(s, o).ok_or_else(|| refuse_here(format!("{what} must have a static shape")))
    };
    let in_rows = |rows: &Rows| GpuCtx {
        caps: cx.caps,
        splits: cx.splits.clone(),
        run: Some(RunRows { count: rows.count.clone(), max: rows.max, n_syms }),
    };
    let arg = |n: usize| k.inputs.get(n).ok_or_else(|| bad(op.name()));
    let made = match op {
        Op::MatMul | Op::MatMulEpilogue { .. } => {
            let (bias, act) = match op {
                Op::MatMulEpilogue { bias, activation } => (*bias, *activation),
                _ => (false, Activation::None),
            };
            let (a, b) = (arg(0)?, arg(1)?);
            let rank = out_shape.len();
            if b.view.shape.len() != 2 || a.view.shape.len() != rank || rank < 2 {
                return Err(refuse_here(format!(
                    "a run-time row count needs a static 2-D B and a rows×K A, not {} · {}",
                    kiln_ir::fmt_shape(&a.view.shape),
                    kiln_ir::fmt_shape(&b.view.shape)
                )));
            }
            let lead = rank - 1;
            let rows = rows_of(s, out_shape, lead)?;
            let bv = fixed(b, "B")?;
            let c = if bias { Some(arg(2)?) } else { None };
            let c = c.map(|c| Operand { view: c.view.broadcast_to(out_shape), ..c.clone() });
            let av = row_view(s, a, lead, &rows);
            let ov = row_view(s, &k.output, lead, &rows);
            let cv = c.as_ref().map(|c| row_view(s, c, lead, &rows));
            // Rows that do not merge (a transposed A or result): one invocation per element.
            let (Some(av), Some(ov), None | Some(Some(_))) = (av, ov, &cv) else {
                return matmul_by_element(s, sym, k, [a, b, &k.output], c.as_ref(), act, cx);
            };
            let cv = cv.flatten();
            let made = matmul::emit(sym, &av, &bv, cv.as_ref(), act, &ov, &in_rows(&rows))?;
            return at_hints(s, made, &rows);
        }
        Op::Attention { scale, causal, masked } => {
            let mask = if *masked { Some(arg(3)?) } else { None };
            return attention_run(s, sym, k, *scale, *causal, mask, true, cx);
        }
        Op::AttentionLse { scale, causal, masked } => {
            let mask = if *masked { Some(arg(2)?) } else { None };
            return attention_run(s, sym, k, *scale, *causal, mask, false, cx);
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            // Along one of the static axes after the symbolic ones, as on the CPU (any other
            // is `softmax_by_row`'s, above).
            let log = matches!(op, Op::LogSoftmax { .. });
            let (Some(out), Some(x)) = (row_view(s, &k.output, p, &rows), row_view(s, arg(0)?, p, &rows))
            else {
                // Views that do not merge into rows (a transposed operand).
                return softmax_by_row(s, sym, k, *axis, log, cx);
            };
            rows::emit_softmax(sym, &x, axis + 1 - p, log, &out, &in_rows(&rows))?
        }
        Op::LayerNorm { eps, affine } | Op::RmsNorm { eps, affine } | Op::AddNorm { eps, affine, .. } => {
            let (kind, added) = match op {
                Op::LayerNorm { .. } => (NormKind::Layer, false),
                Op::AddNorm { kind, .. } => (*kind, true),
                _ => (NormKind::Rms, false),
            };
            let first_param = if added { 2 } else { 1 };
            let gamma = if *affine { Some(fixed(arg(first_param)?, "gamma")?) } else { None };
            let beta = if *affine && kind == NormKind::Layer {
                Some(fixed(arg(first_param + 1)?, "beta")?)
            } else {
                None
            };
            let summed: Vec<StridedView> = (0..if added { 2 } else { 1 })
                .map(|i| arg(i).map(|o| o.view.broadcast_to(out_shape)))
                .collect::<Result<_, _>>()?;
            let operands: Vec<Operand> =
                summed.iter().zip(&k.inputs).map(|(v, o)| Operand { view: v.clone(), ..o.clone() }).collect();
            let row_views: Option<Vec<View>> = operands.iter().map(|o| row_view(s, o, p, &rows)).collect();
            let out = row_view(s, &k.output, p, &rows);
            // The sum an add + norm also stores, in the result's layout.
            let sum = k.extra_outputs.first();
            let sum_row = sum.map(|o| row_view(s, o, p, &rows));
            match (row_views, out, sum_row) {
                (Some(xs), Some(out), sum_row @ (None | Some(Some(_)))) => rows::emit_norm(
                    sym,
                    kind,
                    *eps,
                    (&xs[0], xs.get(1)),
                    gamma.as_ref(),
                    beta.as_ref(),
                    (&out, sum_row.flatten().as_ref()),
                    &in_rows(&rows),
                )?,
                // Rows that do not merge: split the row number by the run's extents.
                _ => {
                    let views: Vec<StridedView> = summed
                        .into_iter()
                        .chain([k.output.view.clone()])
                        .chain(sum.map(|o| o.view.clone()))
                        .collect();
                    let flat: Vec<View> =
                        operands.iter().chain([&k.output]).map(|o| at_maxima(s, o, &o.view)).collect();
                    let sum_flat = sum.map(|o| at_maxima(s, o, &o.view));
                    let lead = crate::dynamic::RunLead {
                        extents: &out_shape[..out_shape.len() - 1],
                        views: &views,
                        n_syms,
                    };
                    let len = out_shape.last().and_then(Dim::as_const).unwrap_or(1);
                    rows::emit_norm_run(
                        sym,
                        kind,
                        *eps,
                        (&flat, len, sum_flat.as_ref()),
                        gamma.as_ref(),
                        beta.as_ref(),
                        &lead,
                        &in_rows(&rows),
                    )?
                }
            }
        }
        Op::Reduce { op: how, axes, .. } => {
            // Over static trailing axes after the symbolic ones (any other reduction is
            // `reduce_by_element`'s, above).
            let x = arg(0)?;
            let rank = x.view.shape.len();
            let q = rank.saturating_sub(axes.len());
            let all = rows_of(s, &x.view.shape, q)?;
            let xv = merge_leading(&x.view, q).and_then(|v| pinned(s, x, &v, &all));
            let ov = merge_leading(&k.output.view, q).and_then(|v| pinned(s, &k.output, &v, &all));
            let (Some(xv), Some(ov)) = (xv, ov) else {
                // Views that do not merge into rows (a transposed operand).
                return reduce_by_element(s, sym, k, *how, axes, cx);
            };
            if xv.dtype == DType::Bool || (!xv.dtype.is_float() && *how == kiln_ir::ReduceOp::Mean) {
                return Err(refuse_here(format!("{} reduction of {}", how.name(), xv.dtype)));
            }
            let reduced: Vec<usize> = (1..=axes.len()).collect();
            let count: usize = reduced.iter().map(|&a| xv.shape[a]).product();
            let rcx = in_rows(&all);
            let made = if rows::reduce_by_rows(ov.numel(), count) {
                rows::emit_reduce(sym, *how, &reduced, &xv, &ov, &rcx)?
            } else {
                let bytes = ((xv.numel() + ov.numel()) * xv.dtype.size_bytes()) as u64;
                let memrefs = [xv.memref(), ov.memref()];
                per_element(sym, &memrefs, &ov, &rcx, xv.numel() as u64, bytes, |b, _, lin| {
                    Ok(reduce::reduce_at(b, *how, &reduced, &xv, lin))
                })?
            };
            return at_hints(s, made, &all);
        }
        Op::Gather { axis } => {
            let (table, indices) = (arg(0)?, arg(1)?);
            let ik = indices.view.shape.len();
            if *axis != 0 || p > ik || out_shape.len() < ik + 1 {
                return Err(refuse_here(format!(
                    "a gather along axis {axis} into {shape_text}: only rows of a table (axis 0) picked by symbolic indices"
                )));
            }
            let table = fixed(table, "the table")?;
            if !indices.dtype.is_int() {
                return Err(refuse_here(format!("gather with {} indices", indices.dtype)));
            }
            let all = rows_of(s, out_shape, ik)?;
            let iv = merge_leading(&indices.view, ik)
                .and_then(|v| pinned(s, indices, &v, &all))
                .ok_or_else(|| not_rows("the indices"))?;
            let ov = merge_leading(&k.output.view, ik)
                .and_then(|v| pinned(s, &k.output, &v, &all))
                .ok_or_else(|| not_rows("the result"))?;
            let bytes = (2 * ov.numel() * ov.dtype.size_bytes()) as u64;
            let memrefs = [table.memref(), iv.memref(), ov.memref()];
            let made = per_element(sym, &memrefs, &ov, &in_rows(&all), 0, bytes, |b, idx, _| {
                Ok(data::gather_value(b, 0, &table, &iv, idx))
            })?;
            return at_hints(s, made, &all);
        }
        // In row form where every view merges into rows; else walked at the run's extents
        // (below).
        Op::Concat { axis }
            if *axis >= p
                && [&k.output].into_iter().chain(&k.inputs).all(|o| row_view(s, o, p, &rows).is_some()) =>
        {
            let out = row_view(s, &k.output, p, &rows).ok_or_else(|| not_rows("the result"))?;
            let inputs: Vec<View> = k
                .inputs
                .iter()
                .map(|o| row_view(s, o, p, &rows).ok_or_else(|| not_rows("an operand")))
                .collect::<Result<_, _>>()?;
            let bytes = (2 * out.numel() * out.dtype.size_bytes()) as u64;
            let mut memrefs: Vec<String> = inputs.iter().map(View::memref).collect();
            memrefs.push(out.memref());
            let along = axis + 1 - p;
            per_element(sym, &memrefs, &out, &in_rows(&rows), 0, bytes, |b, idx, _| {
                data::concat_value(b, along, &inputs, &out, idx)
            })?
        }
        Op::Pad { pads, value }
            if pads.iter().take(p).all(|&(a, b)| (a, b) == (0, 0))
                && [&k.output].into_iter().chain(&k.inputs).all(|o| row_view(s, o, p, &rows).is_some()) =>
        {
            let out = row_view(s, &k.output, p, &rows).ok_or_else(|| not_rows("the result"))?;
            let x = row_view(s, arg(0)?, p, &rows).ok_or_else(|| not_rows("the operand"))?;
            let mut row_pads = vec![(0, 0)];
            row_pads.extend(pads.iter().skip(p).copied());
            let bytes = (2 * out.numel() * out.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), out.memref()];
            per_element(sym, &memrefs, &out, &in_rows(&rows), 0, bytes, |b, idx, _| {
                Ok(data::pad_value(b, &row_pads, *value, &x, &out, idx))
            })?
        }
        // Along or before a symbolic axis, or with views that do not merge into rows: one
        // invocation per element of the run's result.
        Op::Concat { axis } => {
            return data_by_element(s, sym, k, cx, copy_costs(s, k), |b, inputs, idx| {
                let bounds = run_data::bounds(b, inputs, *axis);
                run_data::concat_value(b, inputs, &bounds, idx, *axis)
            })
        }
        Op::Pad { pads, value } => {
            return data_by_element(s, sym, k, cx, copy_costs(s, k), |b, inputs, idx| {
                run_data::pad_value(b, &inputs[0], pads, *value, idx)
            })
        }
        Op::ScatterAdd { .. } => {
            return Err(refuse_here(format!("its index arithmetic over {shape_text} uses static extents")))
        }
        // Over a run-time batch alone: the row form's one leading axis.
        Op::Conv2d { stride, padding, dilation, groups }
            if p == 1 && [&k.output, arg(0)?].into_iter().all(|o| row_view(s, o, 1, &rows).is_some()) =>
        {
            let x = row_view(s, arg(0)?, 1, &rows).ok_or_else(|| not_rows("the input"))?;
            let w = fixed(arg(1)?, "the weight")?;
            let out = row_view(s, &k.output, 1, &rows).ok_or_else(|| not_rows("the result"))?;
            let flops = (2 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3]) as u64;
            let bytes = ((x.numel() + w.numel() + out.numel()) * out.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), w.memref(), out.memref()];
            per_element(sym, &memrefs, &out, &in_rows(&rows), flops, bytes, |b, idx, _| {
                let reads = conv::StaticReads::new(&[&x, &w]);
                Ok(conv::conv_value(
                    b, *stride, *padding, *dilation, *groups, &w.shape, out.dtype, idx, &reads,
                ))
            })?
        }
        Op::Pool2d { kind, kernel, stride, padding }
            if p == 1 && [&k.output, arg(0)?].into_iter().all(|o| row_view(s, o, 1, &rows).is_some()) =>
        {
            let x = row_view(s, arg(0)?, 1, &rows).ok_or_else(|| not_rows("the input"))?;
            let out = row_view(s, &k.output, 1, &rows).ok_or_else(|| not_rows("the result"))?;
            let flops = (out.numel() * kernel[0] * kernel[1]) as u64;
            let bytes = ((x.numel() + out.numel()) * out.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), out.memref()];
            per_element(sym, &memrefs, &out, &in_rows(&rows), flops, bytes, |b, idx, _| {
                let reads = conv::StaticReads::new(&[&x]);
                Ok(conv::pool_value(b, *kind, *kernel, *stride, *padding, out.dtype, idx, &reads))
            })?
        }
        // Over a run-time image or sequence, or with views that do not merge into rows: one
        // invocation per element of the run's result.
        Op::Conv2d { stride, padding, dilation, groups } => {
            let window = run_window::Window::Conv {
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            return window_by_element(s, sym, k, cx, &window);
        }
        Op::Pool2d { kind, kernel, stride, padding } => {
            let window =
                run_window::Window::Pool { kind: *kind, kernel: *kernel, stride: *stride, padding: *padding };
            return window_by_element(s, sym, k, cx, &window);
        }
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Const { .. }
        | Op::Full { .. }
        | Op::Iota { .. }
        | Op::RandomUniform { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Where
        | Op::Cast { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::BroadcastTo { .. }
        | Op::Slice { .. }
        | Op::Gelu { .. } => return Err(bad(&format!("`{}` scheduled as a kernel of its own", op.name()))),
    };
    at_hints(s, made, &rows)
}

/// `made` (costed at the rows' maximum) with its costs at the hints, as the manifest records
/// them.
fn at_hints(s: &Schedule, made: GpuKernel, rows: &Rows) -> Result<GpuKernel, CodegenError> {
    if made.run_grid.is_none() {
        return Err(bad("a kernel over run-time rows without a run-time grid"));
    }
    let (hint, _) = at_hints_and_maxima(s, &rows.count);
    let scale = |x: u64| (x as u128 * hint as u128 / rows.max.max(1) as u128) as u64;
    Ok(GpuKernel { flops: scale(made.flops), bytes: scale(made.bytes), ..made })
}

/// Attention over run-time batch and lengths: the static flash kernel with its batch offsets,
/// query count and key count read from `%syms`. Needs static head sizes and static strides
/// along each operand's last two axes.
#[allow(clippy::too_many_arguments)]
fn attention_run(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    scale: f64,
    causal: bool,
    mask: Option<&Operand>,
    with_v: bool,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let ins = &k.inputs;
    let (q, kk) = match ins.as_slice() {
        [q, kk, ..] => (q, kk),
        _ => return Err(bad("attention")),
    };
    let v = if with_v { Some(ins.get(2).ok_or_else(|| bad("attention"))?) } else { None };
    let (out, lse) =
        if with_v { (Some(&k.output), k.extra_outputs.first()) } else { (None, Some(&k.output)) };
    let r = q.view.shape.len();
    if r < 2 || kk.view.shape.len() != r || v.is_some_and(|v| v.view.shape.len() != r) {
        return Err(bad("attention operand ranks"));
    }
    if !q.dtype.is_float() {
        return Err(refusal(k, cx, format!("attention on {}", q.dtype)));
    }
    let mut scores_shape = q.view.shape.clone();
    scores_shape[r - 1] = kk.view.shape[r - 2].clone();
    let mask_view = mask.map(|m| m.view.broadcast_to(&scores_shape));
    let views: [Option<&StridedView>; 6] = [
        Some(&q.view),
        Some(&kk.view),
        v.map(|v| &v.view),
        mask_view.as_ref(),
        out.map(|o| &o.view),
        lse.map(|o| &o.view),
    ];
    // The head sizes and every operand's last two strides are static.
    let heads_static = q.view.shape[r - 1].is_static() && v.is_none_or(|v| v.view.shape[r - 1].is_static());
    let inner_static = views.iter().flatten().all(|w| {
        let n = w.strides.len();
        w.strides[n.saturating_sub(2)..].iter().all(Dim::is_static)
    });
    if heads_static && !inner_static {
        return attention_by_row(s, sym, k, (scale, causal), views, cx);
    }
    if !heads_static {
        return Err(refusal(
            k,
            cx,
            format!("attention over {} needs static head sizes", kiln_ir::fmt_shape(&q.view.shape)),
        ));
    }
    let n_syms = s.symbols.len().max(1);
    let ops: [Option<&Operand>; 6] = [Some(q), Some(kk), v, mask, out, lse];
    let flat: Vec<Option<View>> =
        views.iter().zip(ops).map(|(w, o)| Some(at_maxima(s, o?, w.as_ref()?))).collect();
    let get = |i: usize| flat[i].as_ref().ok_or_else(|| bad("attention operands"));
    let sizes = attention::RunSizes {
        n_syms,
        batch: &q.view.shape[..r - 2],
        sq: &q.view.shape[r - 2],
        sk: &kk.view.shape[r - 2],
        views,
    };
    let v_out = match (&flat[2], &flat[4]) {
        (Some(v), Some(o)) => Some((v, o)),
        _ => None,
    };
    let made = attention::emit_run(
        sym,
        get(0)?,
        get(1)?,
        v_out,
        flat[3].as_ref(),
        scale,
        causal,
        flat[5].as_ref(),
        cx,
        Some(&sizes),
    )?;
    // Costs at the hints.
    let hints: Vec<i64> = s.symbols.iter().map(|d| d.hint).collect();
    let maxima: Vec<i64> = s.symbols.iter().map(|d| d.max).collect();
    let work =
        |shape: &[Dim], at: &[i64]| shape.iter().map(|d| d.eval(at).unwrap_or(0) as u128).product::<u128>();
    let mut both = q.view.shape.clone();
    both.push(kk.view.shape[r - 2].clone());
    let (h, m) = (work(&both, &hints), work(&both, &maxima).max(1));
    let scaled = |x: u64| (x as u128 * h / m) as u64;
    Ok(GpuKernel { flops: scaled(made.flops), bytes: scaled(made.bytes), ..made })
}

/// A fused elementwise kernel over symbolic views: one invocation per element of the run, the
/// element number split by the run's extents (views merged where the normal forms prove it);
/// extents, strides and offsets computed from `%syms`. Arguments: the inputs, the output, then
/// `%syms`.
fn elementwise(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    expr: &Expr,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let n_syms = s.symbols.len().max(1);
    let positional = matches!(expr, Expr::Iota { .. });
    let mut all: Vec<StridedView> = k.inputs.iter().map(|o| o.view.clone()).collect();
    all.push(k.output.view.clone());
    if all.iter().any(|v| v.shape != k.output.view.shape) {
        return Err(bad("an elementwise operand of another shape than the result"));
    }
    // Iota reads the result's own axes; everything else walks merged ones.
    let views: Vec<StridedView> = if positional {
        all.into_iter()
            .map(|mut v| {
                if v.shape.is_empty() {
                    v.shape.push(Dim::Const(1));
                    v.strides.push(Dim::Const(0));
                }
                v
            })
            .collect()
    } else {
        coalesce_sym(&all)
    };
    let rank = views[0].shape.len();
    let count = kiln_sched::product(&views[0].shape).map_err(|e| bad(&e.to_string()))?;
    let (count_hint, count_max) = at_hints_and_maxima(s, &count);
    let operands: Vec<&Operand> = k.inputs.iter().chain([&k.output]).collect();
    let flat: Vec<View> = operands.iter().map(|o| buffer_view(s, o)).collect();
    let plan = GpuPlan::elements(count_max, cx.caps)?;

    let mut b = cx.body();
    let i = open_run_element(&mut b, &plan, &count, n_syms);
    let walks: Vec<_> = views.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    let idx = unravel(&mut b, &i, &walks[0].extents, rank);
    let at: Vec<String> = walks.iter().map(|w| address(&mut b, w, &idx)).collect();
    let args: Vec<String> = (0..views.len()).map(|j| format!("%a{j}")).collect();
    let value = match expr {
        Expr::Iota { axis, dtype } => {
            let x = b.assign(format!("arith.index_cast {} : index to i64", idx[*axis]));
            (convert(&mut b, &x, DType::I64, *dtype), *dtype)
        }
        _ => {
            let mut ctx = Ctx {
                inputs: &flat[..flat.len() - 1],
                args: &args,
                idx: &at,
                lin: &i,
                out_shape: &[],
                fault: None,
            };
            eval(&mut b, &mut ctx, expr)?
        }
    };
    let o = views.len() - 1;
    store(&mut b, &value.0, &args[o], &flat[o], &at[o]);
    // The kernel always reads the element count, so it always takes `%syms`.
    let memrefs: Vec<String> = flat.iter().map(View::memref).collect();
    let bytes: usize = operands.iter().map(|o| count_hint * o.dtype.size_bytes()).sum();
    let costs = ((count_hint * expr.op_count().max(1)) as u64, bytes as u64);
    close_run_element(sym, &memrefs, (plan, b), (&count, n_syms), costs)
}

/// A matrix product whose rows do not merge: one invocation per element of the run's result,
/// a dot product over K in order, then the bias and the activation. Arguments: a, b, [bias],
/// out, `%syms`.
fn matmul_by_element(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    [a, bm, out]: [&Operand; 3],
    bias: Option<&Operand>,
    act: Activation,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    if !out.dtype.is_float() {
        return Err(refusal(k, cx, format!("matmul on {}", out.dtype)));
    }
    let n_syms = s.symbols.len().max(1);
    let rank = out.view.shape.len();
    let kd = bm.view.shape[0].as_const().ok_or_else(|| bad("a static B"))?;
    let count = kiln_sched::product(&out.view.shape).map_err(|e| bad(&e.to_string()))?;
    let (count_hint, count_max) = at_hints_and_maxima(s, &count);
    let operands: Vec<&Operand> = [a, bm].into_iter().chain(bias).chain([out]).collect();
    let flat: Vec<View> = operands.iter().map(|o| buffer_view(s, o)).collect();
    let ty = crate::kernels::elementwise::reg_type(out.dtype);
    let plan = GpuPlan::elements(count_max, cx.caps)?;

    let mut b = cx.body();
    let i = open_run_element(&mut b, &plan, &count, n_syms);
    let wo = walk(&mut b, &out.view, n_syms);
    let wa = walk(&mut b, &a.view, n_syms);
    let wb = walk(&mut b, &bm.view, n_syms);
    let idx = unravel(&mut b, &i, &wo.extents, rank);
    // A's row (every axis but K) and B's column.
    let a_row = address(
        &mut b,
        &crate::dynamic::Walk { strides: wa.strides[..rank - 1].to_vec(), ..wa.clone() },
        &idx[..rank - 1],
    );
    let b_col = crate::dynamic::step(&mut b, &wb.offset, &idx[rank - 1], &wb.strides[1]);
    let (c0, c1, kc) = (b.index(0), b.index(1), b.index(kd));
    let zero = b.float(0.0, ty);
    b.open(format!("%dot = scf.for %kk = {c0} to {kc} step {c1} iter_args(%acc = {zero}) -> ({ty})"));
    let at_a = crate::dynamic::step(&mut b, &a_row, "%kk", &wa.strides[rank - 1]);
    let at_b = crate::dynamic::step(&mut b, &b_col, "%kk", &wb.strides[0]);
    let x = load(&mut b, "%a0", &flat[0], &at_a);
    let y = load(&mut b, "%a1", &flat[1], &at_b);
    let next = b.fma(&x, &y, "%acc", ty);
    b.line(format!("scf.yield {next} : {ty}"));
    b.close("");
    let mut v = "%dot".to_string();
    if let Some(c) = bias {
        let wc = walk(&mut b, &c.view, n_syms);
        let at = address(&mut b, &wc, &idx);
        let cb = load(&mut b, "%a2", &flat[2], &at);
        v = b.fadd(&v, &cb, ty);
    }
    let v = crate::kernels::matmul::activate(&mut b, act, &v, ty);
    let at = address(&mut b, &wo, &idx);
    let o = flat.len() - 1;
    store(&mut b, &v, &format!("%a{o}"), &flat[o], &at);
    let memrefs: Vec<String> = flat.iter().map(View::memref).collect();
    let bytes = (count_hint * (kd + 2) + kd) * out.dtype.size_bytes();
    close_run_element(
        sym,
        &memrefs,
        (plan, b),
        (&count, n_syms),
        ((2 * count_hint * kd) as u64, bytes as u64),
    )
}

/// A reduction along run-time extents (`crate::dynamic::reduce`): one invocation per kept
/// element, loops over the reduced axes. Neighbouring invocations keep neighbouring elements,
/// so where the last kept axis is contiguous (mean pooling over `[batch, seq, d]`) a warp's
/// loads are contiguous. Arguments: x, out, `%syms`.
fn reduce_by_element(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    op: kiln_ir::ReduceOp,
    axes: &[usize],
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let (x, out) = (k.inputs.first().ok_or_else(|| bad("reduce"))?, &k.output);
    over::check_reduce(k, op, x.dtype, |why| refusal(k, cx, why))?;
    let out_full =
        over::out_at_operand_rank(&x.view, &out.view, axes).ok_or_else(|| bad("a reduction's result"))?;
    let sp = over::split(&[x.view.clone(), out_full], axes)?;
    let n_syms = s.symbols.len().max(1);
    let (xv, ov) = (buffer_view(s, x), buffer_view(s, out));
    let (flops, bytes) = over::costs(s, &sp, x, out);
    let (_, rows_max) = at_hints_and_maxima(s, &sp.rows);
    let plan = GpuPlan::elements(rows_max, cx.caps)?;

    let mut b = cx.body();
    let (starts, along) = open_kept_element(&mut b, &plan, &sp, n_syms);
    let count = size_value(&mut b, &sp.count, n_syms);
    let v = over::reduce_from(&mut b, op, ("%a0", &xv), &starts[0], &along[0], &count);
    store(&mut b, &v, "%a1", &ov, &starts[1]);
    close_run_element(sym, &[xv.memref(), ov.memref()], (plan, b), (&sp.rows, n_syms), (flops, bytes))
}

/// A softmax (a log-softmax when `log`) along a run-time axis or one before a run-time axis:
/// a workgroup per contiguous row ([`workgroup_rows`]), else one invocation per row, three
/// passes along it (`crate::dynamic::reduce::softmax_row`). Arguments: x, out, `%syms`.
fn softmax_by_row(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    axis: usize,
    log: bool,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let (x, out) = (k.inputs.first().ok_or_else(|| bad("softmax"))?, &k.output);
    if !x.dtype.is_float() {
        return Err(refusal(k, cx, format!("a softmax of {}", x.dtype)));
    }
    let sp = over::split(&[x.view.clone(), out.view.clone()], &[axis])?;
    let n_syms = s.symbols.len().max(1);
    let (xv, ov) = (buffer_view(s, x), buffer_view(s, out));
    let (rows_hint, rows_max) = at_hints_and_maxima(s, &sp.rows);
    let (count_hint, _) = at_hints_and_maxima(s, &sp.count);
    let n = rows_hint * count_hint;
    let costs = ((4 * n) as u64, (n * (x.dtype.size_bytes() + 2 * out.dtype.size_bytes())) as u64);
    if contiguous_rows(&sp) {
        return workgroup_rows(s, sym, rows::RunRowOp::Softmax { log }, &[xv, ov], &sp, costs, cx);
    }
    let plan = GpuPlan::elements(rows_max, cx.caps)?;

    let mut b = cx.body();
    let (starts, along) = open_kept_element(&mut b, &plan, &sp, n_syms);
    let xa = Along { arg: "%a0", view: &xv, base: &starts[0], stride: &along[0].strides[0] };
    let oa = Along { arg: "%a1", view: &ov, base: &starts[1], stride: &along[1].strides[0] };
    over::softmax_row(&mut b, log, &xa, &oa, &along[0].extents[0]);
    close_run_element(sym, &[xv.memref(), ov.memref()], (plan, b), (&sp.rows, n_syms), costs)
}

/// A norm over a run-time last axis: a workgroup per contiguous row ([`workgroup_rows`]), else
/// one invocation per row, walking it at the run's length and strides
/// (`crate::dynamic::reduce::norm_row`). Arguments: a, (b), out, (sum), `%syms`.
fn norm_by_row(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let norm = over::split_norm(k, |why| refusal(k, cx, why))?;
    let (operands, sp) = (&norm.operands, &norm.split);
    let n_syms = s.symbols.len().max(1);
    let bufs: Vec<View> = operands.iter().map(|o| buffer_view(s, o)).collect();
    let args: Vec<String> = (0..bufs.len()).map(|i| format!("%a{i}")).collect();
    let (rows_hint, rows_max) = at_hints_and_maxima(s, &sp.rows);
    let (count_hint, _) = at_hints_and_maxima(s, &sp.count);
    let n = rows_hint * count_hint;
    let bytes = n * bufs.iter().map(|v| v.dtype.size_bytes()).sum::<usize>();
    if contiguous_rows(sp) {
        let op = rows::RunRowOp::Norm {
            kind: norm.kind,
            eps: norm.eps,
            added: norm.added,
            sum: operands.len() > norm.out() + 1,
        };
        return workgroup_rows(s, sym, op, &bufs, sp, ((10 * n) as u64, bytes as u64), cx);
    }
    let plan = GpuPlan::elements(rows_max, cx.caps)?;

    let mut b = cx.body();
    let (starts, along) = open_kept_element(&mut b, &plan, sp, n_syms);
    let rows_of: Vec<Along> = (0..bufs.len())
        .map(|i| Along { arg: &args[i], view: &bufs[i], base: &starts[i], stride: &along[i].strides[0] })
        .collect();
    let (x, y, o) = (&rows_of[0], norm.added.then(|| &rows_of[1]), norm.out());
    over::norm_row(
        &mut b,
        (norm.kind, norm.eps),
        (x, y),
        (&rows_of[o], rows_of.get(o + 1)),
        &along[0].extents[0],
    );
    let memrefs: Vec<String> = bufs.iter().map(View::memref).collect();
    close_run_element(sym, &memrefs, (plan, b), (&sp.rows, n_syms), ((10 * n) as u64, bytes as u64))
}

/// A copy's costs at the hints: one operation per element of the result, which is read once
/// and written once.
fn copy_costs(s: &Schedule, k: &kiln_sched::Kernel) -> (u64, u64) {
    let count = kiln_sched::product(&k.output.view.shape).map_or(0, |d| at_hints_and_maxima(s, &d).0);
    (count as u64, (2 * count * k.output.dtype.size_bytes()) as u64)
}

/// A concat or pad along a run-time axis (`crate::dynamic::data`): one invocation per element
/// of the run's result, whose value `value` finds from the inputs (at the result's indices).
/// Arguments: the inputs, out, `%syms`.
fn data_by_element(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    cx: &GpuCtx,
    costs: (u64, u64),
    value: impl FnOnce(&mut Body, &[Part], &[String]) -> String,
) -> Result<GpuKernel, CodegenError> {
    let n_syms = s.symbols.len().max(1);
    let rank = k.output.view.shape.len();
    let count = kiln_sched::product(&k.output.view.shape).map_err(|e| bad(&e.to_string()))?;
    let (_, count_max) = at_hints_and_maxima(s, &count);
    let plan = GpuPlan::elements(count_max, cx.caps)?;

    let mut b = cx.body();
    let i = open_run_element(&mut b, &plan, &count, n_syms);
    let (inputs, out) = run_data::parts(s, &mut b, k, n_syms);
    let idx = unravel(&mut b, &i, &out.walk.extents, rank);
    let v = value(&mut b, &inputs, &idx);
    let at = address(&mut b, &out.walk, &idx);
    store(&mut b, &v, &out.arg, &out.view, &at);
    let memrefs: Vec<String> = inputs.iter().chain([&out]).map(|p| p.view.memref()).collect();
    close_run_element(sym, &memrefs, (plan, b), (&count, n_syms), costs)
}

/// A convolution or pooling along run-time spatial extents (`crate::dynamic::window`): one
/// invocation per element of the run's result. Arguments: x (and w), out, `%syms`.
fn window_by_element(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    cx: &GpuCtx,
    window: &run_window::Window,
) -> Result<GpuKernel, CodegenError> {
    let dtype = k.output.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("a window op on {dtype}")));
    }
    let w_shape = run_window::weight_shape(s, k, window)?;
    let costs = run_window::costs(s, k, window, &w_shape);
    data_by_element(s, sym, k, cx, costs, |b, inputs, idx| {
        let reads = run_window::RunReads::new(k, inputs.iter().collect());
        run_window::value(b, window, &w_shape, dtype, idx, &reads)
    })
}

/// Whether every view of `sp` is contiguous along its row (one reduced axis of stride 1).
fn contiguous_rows(sp: &over::Split) -> bool {
    sp.reduced.iter().all(|v| v.strides == [Dim::Const(1)])
}

/// A softmax or norm over contiguous rows of run-time length: one workgroup per row, its
/// invocations striding over the row (`rows::emit_run_rows`), where one invocation per row
/// would have neighbouring invocations read a row apart. `costs` are at the hints.
fn workgroup_rows(
    s: &Schedule,
    sym: &str,
    op: rows::RunRowOp,
    bufs: &[View],
    sp: &over::Split,
    (flops, bytes): (u64, u64),
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let n_syms = s.symbols.len().max(1);
    let (_, rows_max) = at_hints_and_maxima(s, &sp.rows);
    let (_, len_max) = at_hints_and_maxima(s, &sp.count);
    let run = GpuCtx {
        caps: cx.caps,
        splits: cx.splits.clone(),
        run: Some(RunRows { count: sp.rows.clone(), max: rows_max, n_syms }),
    };
    let at = |b: &mut Body, row: &str| {
        let kept: Vec<Walk> = sp.kept.iter().map(|v| walk(b, v, n_syms)).collect();
        let along: Vec<Walk> = sp.reduced.iter().map(|v| walk(b, v, n_syms)).collect();
        rows::RunRow {
            starts: over::starts_at(b, &kept, row),
            strides: along.iter().map(|w| w.strides[0].clone()).collect(),
            len: along[0].extents[0].clone(),
        }
    };
    rows::emit_run_rows(sym, op, bufs, (rows_max, len_max), (flops, bytes), &at, &run)
}

/// Opens one invocation per kept element of `sp` (closed by `close_run_element`): where the
/// element starts in each view, and each view's walk along the reduced axes.
fn open_kept_element(
    b: &mut Body,
    plan: &GpuPlan,
    sp: &over::Split,
    n_syms: usize,
) -> (Vec<String>, Vec<Walk>) {
    let i = open_run_element(b, plan, &sp.rows, n_syms);
    let kept: Vec<Walk> = sp.kept.iter().map(|v| walk(b, v, n_syms)).collect();
    let along: Vec<Walk> = sp.reduced.iter().map(|v| walk(b, v, n_syms)).collect();
    (over::starts_at(b, &kept, &i), along)
}

/// The invocation's element number under an `scf.if` that skips numbers past `count` at the
/// run's sizes (close with `b.close("")`).
fn open_run_element(b: &mut Body, plan: &GpuPlan, count: &Dim, n_syms: usize) -> String {
    let wg = workgroup_number(b, plan);
    let tid = b.assign("gpu.thread_id x");
    let g = b.index(plan.launch.workgroup[0] as usize);
    let first = b.assign(format!("arith.muli {wg}, {g} : index"));
    let i = b.assign(format!("arith.addi {first}, {tid} : index"));
    let n = size_value(b, count, n_syms);
    let ok = b.assign(format!("arith.cmpi ult, {i}, {n} : index"));
    b.open(format!("scf.if {ok}"));
    i
}

/// Closes what [`open_run_element`] opened and makes the kernel: it reads the run's `n_syms`
/// symbol values, and its grid covers `count` elements at the run's sizes. `costs`: (flops,
/// bytes) at the hints.
fn close_run_element(
    sym: &str,
    memrefs: &[String],
    (plan, mut b): (GpuPlan, Body),
    (count, n_syms): (&Dim, usize),
    (flops, bytes): (u64, u64),
) -> Result<GpuKernel, CodegenError> {
    b.close("");
    b.read_symbols(n_syms);
    let run_grid = Some(fold_run(&ceil_div(count, plan.launch.workgroup[0] as usize)?, plan.launch.grid)?);
    Ok(GpuKernel { symbol: sym.into(), mlir: module(sym, memrefs, &plan, b)?, plan, flops, bytes, run_grid })
}

/// Attention whose operands' last axes have run-time strides: one invocation per query row of
/// the run, two passes over the keys (the scores' max, then the weights, their sum and the
/// weighted values), every address computed from `%syms`. Arguments: q, k, [v], [mask], [out],
/// [lse], `%syms`.
fn attention_by_row(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    (scale, causal): (f64, bool),
    views: [Option<&StridedView>; 6],
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let n_syms = s.symbols.len().max(1);
    let [Some(qv), Some(kv), vv, mv, ov, lv] = views else {
        return Err(bad("attention operands"));
    };
    let r = qv.shape.len();
    let d = qv.shape[r - 1].as_const().ok_or_else(|| bad("a static head size"))?;
    let dv = vv.map_or(Some(0), |v| v.shape[r - 1].as_const()).ok_or_else(|| bad("a static head size"))?;
    let rows = kiln_sched::product(&qv.shape[..r - 1]).map_err(|e| bad(&e.to_string()))?;
    let (rows_hint, rows_max) = at_hints_and_maxima(s, &rows);
    // The operands in argument order, with their views.
    let all: Vec<&Operand> = k.inputs.iter().chain([&k.output]).chain(&k.extra_outputs).collect();
    let flat: Vec<View> = all.iter().map(|o| buffer_view(s, o)).collect();
    let ty = crate::kernels::elementwise::reg_type(flat[0].dtype);
    let mut names = (0..).map(|j| format!("%a{j}"));
    let mut next = |present: bool| if present { names.next() } else { None };
    let (qa, ka, va, ma, oa, la) = (
        next(true),
        next(true),
        next(vv.is_some()),
        next(mv.is_some()),
        next(ov.is_some()),
        next(lv.is_some()),
    );
    let view_of = |arg: &Option<String>| {
        arg.as_ref().and_then(|a| a[2..].parse::<usize>().ok()).map(|j| flat[j].clone())
    };
    let plan = GpuPlan::elements(rows_max, cx.caps)?;

    let mut b = cx.body();
    let row = open_run_element(&mut b, &plan, &rows, n_syms);
    let wq = walk(&mut b, qv, n_syms);
    let idx = unravel(&mut b, &row, &wq.extents, r - 1);
    let i = idx[r - 2].clone();
    let sk = size_value(&mut b, &kv.shape[r - 2], n_syms);
    // Each operand's start for this row: q, the mask, out and lse at (batch…, i); k and v at
    // (batch…).
    let head = |b: &mut Body, w: &StridedView, n: usize| {
        let walked = walk(b, w, n_syms);
        let cut = crate::dynamic::Walk { strides: walked.strides[..n].to_vec(), ..walked.clone() };
        (address(b, &cut, &idx[..n]), walked)
    };
    let (q0, _) = head(&mut b, qv, r - 1);
    let (k0, wk) = head(&mut b, kv, r - 2);
    let v0 = vv.map(|v| head(&mut b, v, r - 2));
    let m0 = mv.map(|m| head(&mut b, m, r - 1));
    let (c0, c1) = (b.index(0), b.index(1));
    let zero = b.float(0.0, ty);
    let neg_inf = b.float(f64::NEG_INFINITY, ty);
    let sc = b.float(scale, ty);
    let (qf, kf) = (view_of(&qa).ok_or_else(|| bad("q"))?, view_of(&ka).ok_or_else(|| bad("k"))?);
    let (qa, ka) = (qa.unwrap_or_default(), ka.unwrap_or_default());
    // The score of key `j`: q·k_j in order over d, times `scale`, plus the mask; −inf when hidden.
    let score = |b: &mut Body, j: &str| -> String {
        let kj = crate::dynamic::step(b, &k0, j, &wk.strides[r - 2]);
        let mut dot = zero.clone();
        for dd in 0..d {
            let c = b.index(dd);
            let at_q = crate::dynamic::step(b, &q0, &c, &wq.strides[r - 1]);
            let at_k = crate::dynamic::step(b, &kj, &c, &wk.strides[r - 1]);
            let x = load(b, &qa, &qf, &at_q);
            let y = load(b, &ka, &kf, &at_k);
            dot = b.fma(&x, &y, &dot, ty);
        }
        let mut sv = b.fmul(&dot, &sc, ty);
        if let (Some((m_row, wm)), Some(mf), Some(marg)) = (&m0, view_of(&ma), &ma) {
            let at = crate::dynamic::step(b, m_row, j, &wm.strides[r - 1]);
            let x = load(b, marg, &mf, &at);
            sv = b.fadd(&sv, &x, ty);
        }
        if causal {
            let future = b.assign(format!("arith.cmpi ugt, {j}, {i} : index"));
            sv = b.select(&future, &neg_inf, &sv, ty);
        }
        sv
    };
    b.open(format!("%mx = scf.for %j = {c0} to {sk} step {c1} iter_args(%m = {neg_inf}) -> ({ty})"));
    let sv = score(&mut b, "%j");
    let m = b.fmax("%m", &sv, ty);
    b.line(format!("scf.yield {m} : {ty}"));
    b.close("");
    let dead = b.fcmp("oeq", "%mx", &neg_inf, ty);
    // The weights' sum, then each output element's weighted sum of values (recomputing the
    // weights per element keeps no array of dv values per invocation).
    let weight = |b: &mut Body, j: &str| {
        let sv = score(b, j);
        let t = b.fsub(&sv, "%mx", ty);
        let p = b.exp_nonpositive(&t, ty);
        b.select(&dead, &zero, &p, ty)
    };
    b.open(format!("%l = scf.for %j = {c0} to {sk} step {c1} iter_args(%ls = {zero}) -> ({ty})"));
    let p = weight(&mut b, "%j");
    let ls = b.fadd("%ls", &p, ty);
    b.line(format!("scf.yield {ls} : {ty}"));
    b.close("");
    if let (Some((v_row, wv)), Some(vf), Some(varg), Some(ow), Some(of), Some(oarg)) =
        (&v0, view_of(&va), &va, ov, view_of(&oa), &oa)
    {
        let (o0, wo) = head(&mut b, ow, r - 1);
        for e in 0..dv {
            let ec = b.index(e);
            let acc = b.fresh("acc");
            b.open(format!("{acc} = scf.for %j = {c0} to {sk} step {c1} iter_args(%os = {zero}) -> ({ty})"));
            let p = weight(&mut b, "%j");
            let vj = crate::dynamic::step(&mut b, v_row, "%j", &wv.strides[r - 2]);
            let at = crate::dynamic::step(&mut b, &vj, &ec, &wv.strides[r - 1]);
            let x = load(&mut b, varg, &vf, &at);
            let os = b.fma(&p, &x, "%os", ty);
            b.line(format!("scf.yield {os} : {ty}"));
            b.close("");
            let y = b.fdiv(&acc, "%l", ty);
            let at = crate::dynamic::step(&mut b, &o0, &ec, &wo.strides[r - 1]);
            store(&mut b, &y, oarg, &of, &at);
        }
    }
    if let (Some(lw), Some(lf), Some(larg)) = (lv, view_of(&la), &la) {
        let (l0, _) = head(&mut b, lw, r - 1);
        let log_l = b.log("%l", ty);
        let y = b.fadd("%mx", &log_l, ty);
        store(&mut b, &y, larg, &lf, &l0);
    }
    let memrefs: Vec<String> = flat.iter().map(View::memref).collect();
    let keys_hint = kv.shape[r - 2].eval(&s.symbols.iter().map(|x| x.hint).collect::<Vec<_>>()).unwrap_or(0);
    let costs = (
        (2 * rows_hint * keys_hint * (2 * d + dv)) as u64,
        (rows_hint * (d + dv) * 4 + keys_hint * (d + dv) * 4) as u64,
    );
    close_run_element(sym, &memrefs, (plan, b), (&rows, n_syms), costs)
}
