//! CPU kernels over symbolic extents (`docs/dynamic-shapes.md`, step 6).
//!
//! A fused elementwise kernel (copies for layout changes included) walks its views with
//! extents, strides and offsets computed at run time: the kernel takes the run's symbol values
//! as `%syms: memref<Nxi64>` (the entry passes its `syms` argument, see `build.rs`), and a size
//! over the symbols becomes `index` arithmetic on them ([`size_value`]).
//!
//! Any other kernel whose operands read the graph's symbols is put in *row form*: the axes up to the
//! last symbolic one merge into one leading axis of `rows` elements (a size over the symbols),
//! and every other extent, every stride and every offset is static. The static emitters then
//! run on the row form with `rows` at its maximum: their code never reads the leading extent
//! (row `r` starts at `offset + r·stride`, and the range decomposes over the other axes only),
//! so one kernel serves every run, and the step's dispatch range is `rows` times what one row
//! takes, a size the runtime evaluates at the run's symbol values (`Dispatch::Cpu::range`).
//!
//! Matrix products with a run-time row count and attention with run-time query and key
//! lengths have emitters of their own ([`matmul`], [`attention`]) that read sizes from `%syms`
//! like the elementwise loops, and so do norms whose operands the row form cannot merge
//! ([`norm`]). A kernel that needs a symbolic extent anywhere else (a row length, a reduced
//! symbolic axis) is refused by name ([`CodegenError::Symbolic`]).

mod attention;
pub(crate) mod data;
mod matmul;
mod norm;
pub(crate) mod reduce;
pub(crate) mod window;

use crate::kernels::elementwise::{convert, eval, store, Ctx, FaultSlot, CHUNK};
use crate::kernels::{self, View};
use crate::mlir_text::Body;
use crate::program::{bad, same_elements, Unnamed};
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{Activation, DType, Dim, NormKind, Op, SizeExpr, TermFactor};
use kiln_sched::{Expr, KernelOp, Operand, Schedule, StridedView};

/// The argument a kernel that reads the run's symbol values takes them in (before `%begin`).
pub const SYMS_ARG: &str = "%syms";

/// A kernel's leading run-time extent: its size over the symbols and its maximum.
#[derive(Clone, Debug)]
pub(crate) struct Rows {
    pub count: Dim,
    pub max: usize,
}

/// The refusal of a kernel over symbolic extents.
pub(crate) fn refuse(k: &kiln_sched::Kernel, why: impl Into<String>) -> CodegenError {
    refuse_on(k, "the CPU", why)
}

/// The refusal of a kernel over symbolic extents for `target` (`the CPU`, `the Vulkan target`).
pub(crate) fn refuse_on(k: &kiln_sched::Kernel, target: &str, why: impl Into<String>) -> CodegenError {
    CodegenError::Symbolic { kernel: k.name(), target: target.into(), why: why.into() }
}

/// Axes `0..p` of `v` merged into one (their extents multiplied), when its strides chain
/// through them (extent-1 axes aside); `None` when they do not.
pub(crate) fn merge_leading(v: &StridedView, p: usize) -> Option<StridedView> {
    let real: Vec<usize> = (0..p).filter(|&k| v.shape[k] != 1).collect();
    for w in real.windows(2) {
        if v.strides[w[0]] != v.strides[w[1]].mul(&v.shape[w[1]]).ok()? {
            return None;
        }
    }
    let count = kiln_sched::product(&v.shape[..p]).ok()?;
    let stride = match real.last() {
        Some(&k) => v.strides[k].clone(),
        None => Dim::Const(0),
    };
    let mut shape = vec![count];
    shape.extend(v.shape[p..].iter().cloned());
    let mut strides = vec![stride];
    strides.extend(v.strides[p..].iter().cloned());
    Some(StridedView { shape, strides, offset: v.offset.clone() })
}

/// The emitters' view of a row-form view: axis 0 at the rows' maximum, everything else
/// static (`None` when something else reads a symbol).
pub(crate) fn pinned(s: &Schedule, o: &Operand, v: &StridedView, rows: &Rows) -> Option<View> {
    let mut shape = vec![rows.max];
    for d in &v.shape[1..] {
        shape.push(d.as_const()?);
    }
    let strides: Vec<usize> = v.strides.iter().map(Dim::as_const).collect::<Option<_>>()?;
    Some(View {
        shape,
        strides,
        offset: v.offset.as_const()?,
        dtype: o.dtype,
        buffer_len: s.buffers[o.buffer].len,
    })
}

/// The number of leading axes of `shape` that hold every symbolic extent (0 for a static one).
pub(crate) fn symbolic_prefix(shape: &[Dim]) -> usize {
    shape.iter().rposition(|d| !d.is_static()).map_or(0, |k| k + 1)
}

/// Whether reduction kernel `k` reduces over static trailing axes after every symbolic one,
/// so that its kept axes merge into run-time rows.
pub(crate) fn rows_then_reduced(k: &kiln_sched::Kernel, axes: &[usize]) -> bool {
    let Some(x) = k.inputs.first() else { return false };
    let rank = x.view.shape.len();
    let q = rank.saturating_sub(axes.len());
    q > 0
        && axes.iter().all(|&a| a >= q && a < rank)
        && (q..rank).all(|a| axes.contains(&a))
        && symbolic_prefix(&x.view.shape) <= q
}

/// The rows of `shape`'s first `p` axes: their product and its maximum.
pub(crate) fn rows_of(s: &Schedule, shape: &[Dim], p: usize) -> Result<Rows, CodegenError> {
    let count = kiln_sched::product(&shape[..p]).map_err(|e| bad(&e.to_string()))?;
    let max = match &count {
        Dim::Const(c) => *c,
        Dim::Sym(e) => {
            usize::try_from(e.range(&s.symbols).max).map_err(|_| bad("a row count without a maximum"))?
        }
    };
    Ok(Rows { count, max })
}

/// Operand `o` in row form over its first `p` axes (a unit axis appended when nothing is
/// left after them, so every row form has a row).
pub(crate) fn row_view(s: &Schedule, o: &Operand, p: usize, rows: &Rows) -> Option<View> {
    let merged = merge_leading(&o.view, p)?;
    let mut v = pinned(s, o, &merged, rows)?;
    if v.shape.len() == 1 {
        v.shape.push(1);
        v.strides.push(0);
    }
    Some(v)
}

/// A static operand's view (weights, norm parameters), or `None` when it reads a symbol.
pub(crate) fn static_view(s: &Schedule, o: &Operand) -> Option<View> {
    let (shape, strides, offset) = o.view.as_static()?;
    Some(View { shape, strides, offset, dtype: o.dtype, buffer_len: s.buffers[o.buffer].len })
}

/// Emits kernel `k` of `s`, some of whose operands read symbols; returns it (its `range` at
/// the symbols' maxima), its range as a size over the symbols, and the weight it reads packed
/// (a matrix product's constant B) when there is one.
pub(crate) fn kernel(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    slot: Option<&View>,
    target: &dyn Target,
) -> Result<(Kernel, Dim, Option<Unnamed>), CodegenError> {
    match &k.op {
        KernelOp::Node(Op::MatMul) => matmul::emit(s, sym, k, None, Activation::None, target),
        KernelOp::Node(Op::MatMulEpilogue { bias, activation }) => {
            let b = if *bias { Some(k.inputs.get(2).ok_or_else(|| bad("matmul"))?) } else { None };
            matmul::emit(s, sym, k, b, *activation, target)
        }
        _ => {
            let (made, range) = unpacked(s, sym, k, slot, target)?;
            Ok((made, range, None))
        }
    }
}

/// [`kernel`] for every kernel but the matrix products.
fn unpacked(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    slot: Option<&View>,
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let out_shape = &k.output.view.shape;
    let p = symbolic_prefix(out_shape);
    match &k.op {
        KernelOp::Node(Op::Reduce { op, axes, .. }) if !rows_then_reduced(k, axes) => {
            return reduce::emit_reduce(s, sym, k, *op, axes, target);
        }
        KernelOp::Node(Op::Softmax { axis } | Op::LogSoftmax { axis }) if *axis < p => {
            let log = matches!(&k.op, KernelOp::Node(Op::LogSoftmax { .. }));
            return reduce::emit_softmax(s, sym, k, *axis, log, target);
        }
        KernelOp::Node(Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::AddNorm { .. })
            if out_shape.last().is_some_and(|d| !d.is_static()) =>
        {
            return reduce::emit_norm(s, sym, k, target);
        }
        _ => {}
    }
    if p == 0 {
        return Err(refuse(k, "its result is static but an operand is not"));
    }
    let rows = rows_of(s, out_shape, p)?;
    let shape_text = kiln_ir::fmt_shape(out_shape);
    let not_rows = |what: &str| {
        refuse(
            k,
            format!(
                "{what} of the result {shape_text} cannot be walked as rows of static extents \
                 (its strides do not chain through the symbolic axes)"
            ),
        )
    };
    let row = |o: &Operand, what: &str| row_view(s, o, p, &rows).ok_or_else(|| not_rows(what));
    let fixed = |o: &Operand, what: &str| {
        static_view(s, o).ok_or_else(|| refuse(k, format!("{what} must have a static shape")))
    };
    let op = match &k.op {
        KernelOp::Elementwise(expr) => return elementwise(s, sym, k, expr, slot),
        KernelOp::Node(op) => op,
    };
    let out_row = row(&k.output, "the result");
    let arg = |n: usize| k.inputs.get(n).ok_or_else(|| bad(op.name()));
    let made = match op {
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            // Along one of the static axes after the symbolic ones (the last, or the channels
            // of [batch, C, H, W]): in row form the symbolic axes merge into the first. Along
            // any other axis, or with views that do not merge into rows (a transposed
            // operand), it is `reduce::emit_softmax`'s.
            let log = matches!(op, Op::LogSoftmax { .. });
            let (Ok(out), Ok(x)) = (out_row, row(arg(0)?, "the operand")) else {
                return reduce::emit_softmax(s, sym, k, *axis, log, target);
            };
            kernels::norm::emit_softmax(sym, &x, axis + 1 - p, log, &out, target)?
        }
        Op::LayerNorm { eps, affine } | Op::RmsNorm { eps, affine } => {
            let kind = if matches!(op, Op::LayerNorm { .. }) { NormKind::Layer } else { NormKind::Rms };
            // Rows the static emitter can walk, else the run-time row split.
            let (Ok(out), Ok(x)) = (out_row, row(arg(0)?, "the operand")) else {
                return norm::emit(s, sym, k, kind, *eps, false, target);
            };
            let gamma = if *affine { Some(fixed(arg(1)?, "gamma")?) } else { None };
            let beta = if *affine && kind == NormKind::Layer { Some(fixed(arg(2)?, "beta")?) } else { None };
            kernels::norm::emit_norm_run(
                sym,
                kind,
                *eps,
                (&x, None),
                gamma.as_ref(),
                beta.as_ref(),
                (&out, None),
                target,
                kernels::norm::RowStarts::OnePerIteration,
            )?
        }
        Op::AddNorm { eps, kind, affine } => {
            let broadcast = |o: &Operand| Operand { view: o.view.broadcast_to(out_shape), ..o.clone() };
            // The sum, when the kernel also stores it, in the result's layout.
            let sum = k.extra_outputs.first().map(|o| row(o, "the sum"));
            let (Ok(out), Ok(a), Ok(b), None | Some(Ok(_))) =
                (out_row, row(&broadcast(arg(0)?), "operand 0"), row(&broadcast(arg(1)?), "operand 1"), &sum)
            else {
                return norm::emit(s, sym, k, *kind, *eps, true, target);
            };
            let sum = sum.and_then(Result::ok);
            let gamma = if *affine { Some(fixed(arg(2)?, "gamma")?) } else { None };
            let beta = if *affine && *kind == NormKind::Layer { Some(fixed(arg(3)?, "beta")?) } else { None };
            kernels::norm::emit_norm_run(
                sym,
                *kind,
                *eps,
                (&a, Some(&b)),
                gamma.as_ref(),
                beta.as_ref(),
                (&out, sum.as_ref()),
                target,
                kernels::norm::RowStarts::OnePerIteration,
            )?
        }
        Op::Gather { axis } => {
            let (table, indices) = (arg(0)?, arg(1)?);
            let ik = indices.view.shape.len();
            if *axis != 0 || p > ik || out_shape.len() < ik + 1 {
                return Err(refuse(
                    k,
                    format!("a gather along axis {axis} into {shape_text}: only rows of a table (axis 0) picked by symbolic indices"),
                ));
            }
            let table = fixed(table, "the table")?;
            // Every index axis merges into the rows; the result's rows are the same count.
            let all = rows_of(s, out_shape, ik)?;
            let iv = merge_leading(&indices.view, ik)
                .and_then(|v| pinned(s, indices, &v, &all))
                .ok_or_else(|| not_rows("the indices"))?;
            let ov = merge_leading(&k.output.view, ik)
                .and_then(|v| pinned(s, &k.output, &v, &all))
                .ok_or_else(|| not_rows("the result"))?;
            let made = kernels::data::emit_gather(sym, 0, &table, &iv, &ov)?;
            return finish(s, k, made, &all);
        }
        Op::MatMul | Op::MatMulEpilogue { .. } => return Err(bad("a matrix product outside `matmul::emit`")),
        Op::Attention { scale, causal, masked } => {
            let mask = if *masked { Some(arg(3)?) } else { None };
            return attention::emit(s, sym, k, *scale, *causal, mask, true, target);
        }
        Op::AttentionLse { scale, causal, masked } => {
            let mask = if *masked { Some(arg(2)?) } else { None };
            return attention::emit(s, sym, k, *scale, *causal, mask, false, target);
        }
        // Ops whose emitters read symbolic extents inside the kernel, or that never see them.
        Op::Reduce { op: how, axes, .. } => {
            // Over static trailing axes (`rows_then_reduced`): every kept axis merges into the
            // rows. Any other, or one whose views do not merge (a transposed operand), is
            // `reduce::emit_reduce`'s.
            let x = arg(0)?;
            let rank = x.view.shape.len();
            let q = rank.saturating_sub(axes.len());
            let all = rows_of(s, &x.view.shape, q)?;
            let xv = merge_leading(&x.view, q).and_then(|v| pinned(s, x, &v, &all));
            let ov = merge_leading(&k.output.view, q).and_then(|v| pinned(s, &k.output, &v, &all));
            let (Some(xv), Some(ov)) = (xv, ov) else {
                return reduce::emit_reduce(s, sym, k, *how, axes, target);
            };
            let reduced: Vec<usize> = (1..=axes.len()).collect();
            let made = kernels::reduce::emit(sym, *how, &reduced, &xv, &ov, target)?;
            return finish(s, k, made, &all);
        }
        // Joined or padded along static axes after the symbolic ones: row form, the axis
        // counted from the one leading axis of rows, where every view merges into rows (a
        // transposed operand does not: walked at the run's extents, below).
        Op::Concat { axis } if *axis >= p => {
            let inputs: Result<Vec<View>, _> = k.inputs.iter().map(|o| row(o, "an operand")).collect();
            match (out_row, inputs) {
                (Ok(out), Ok(inputs)) => kernels::data::emit_concat(sym, axis + 1 - p, &inputs, &out)?,
                _ => return data::emit_concat(s, sym, k, *axis),
            }
        }
        Op::Pad { pads, value } if pads.iter().take(p).all(|&(a, b)| (a, b) == (0, 0)) => {
            let mut row_pads = vec![(0, 0)];
            row_pads.extend(pads.iter().skip(p).copied());
            match (out_row, row(arg(0)?, "the operand")) {
                (Ok(out), Ok(x)) => kernels::data::emit_pad(sym, &row_pads, *value, &x, &out)?,
                _ => return data::emit_pad(s, sym, k, pads, *value),
            }
        }
        // Along or before a symbolic axis: walked at the run's extents.
        Op::Concat { axis } => return data::emit_concat(s, sym, k, *axis),
        Op::Pad { pads, value } => return data::emit_pad(s, sym, k, pads, *value),
        Op::ScatterAdd { .. } => {
            return Err(refuse(k, format!("its index arithmetic over {shape_text} uses static extents")))
        }
        // Over a run-time batch alone (the leading axis; channels and the image static): the
        // batch is the row form's one leading axis, which the static emitters never read. Over
        // a run-time image or sequence, or with views that do not merge into rows: walked at
        // the run's extents.
        Op::Conv2d { stride, padding, dilation, groups } => {
            let window = window::Window::Conv {
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            match (p, row(arg(0)?, "the input"), fixed(arg(1)?, "the weight"), out_row) {
                (1, Ok(x), Ok(w), Ok(out)) => kernels::conv::emit_conv2d(
                    sym, *stride, *padding, *dilation, *groups, &x, &w, &out, target,
                )?,
                _ => return window::emit(s, sym, k, &window, target),
            }
        }
        Op::Pool2d { kind, kernel, stride, padding } => {
            let window =
                window::Window::Pool { kind: *kind, kernel: *kernel, stride: *stride, padding: *padding };
            match (p, row(arg(0)?, "the input"), out_row) {
                (1, Ok(x), Ok(out)) => {
                    kernels::conv::emit_pool2d(sym, *kind, *kernel, *stride, *padding, &x, &out, target)?
                }
                _ => return window::emit(s, sym, k, &window, target),
            }
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
    finish(s, k, made, &rows)
}

/// The kernel and its range over the symbols: the emitted range at the maxima is the rows'
/// maximum times what one row takes, so the run's range is `rows.count` times that.
fn finish(
    s: &Schedule,
    k: &kiln_sched::Kernel,
    made: Kernel,
    rows: &Rows,
) -> Result<(Kernel, Dim), CodegenError> {
    if rows.max == 0 || !made.range.is_multiple_of(rows.max) {
        return Err(refuse(
            k,
            format!("its range {} is not a multiple of its {} rows", made.range, rows.max),
        ));
    }
    let per_row = made.range / rows.max;
    let range = rows.count.mul(&Dim::Const(per_row)).map_err(|e| bad(&e.to_string()))?;
    // The emitter costed the rows' maximum; the manifest's costs are at the hints.
    let (hint, _) = at_hints_and_maxima(s, &rows.count);
    let at_hint = |x: u64| (x as u128 * hint as u128 / rows.max as u128) as u64;
    let made = Kernel { flops: at_hint(made.flops), bytes: at_hint(made.bytes), ..made };
    Ok((made, range))
}

/// `d` as an `index` value: a constant, or its normal form evaluated on the run's symbol values
/// (loaded from [`SYMS_ARG`], which holds `n_syms` of them: `i64` on the CPU, `u32` words in a
/// GPU kernel, which then takes `%syms` as its last argument).
pub(crate) fn size_value(b: &mut Body, d: &Dim, n_syms: usize) -> String {
    match d {
        Dim::Const(c) => b.index(*c),
        Dim::Sym(e) => size_expr_value(b, e, n_syms),
    }
}

fn size_expr_value(b: &mut Body, e: &SizeExpr, n_syms: usize) -> String {
    let mut sum: Option<String> = None;
    for (coeff, factors) in e.terms() {
        let mut term = b.assign(format!("arith.constant {coeff} : index"));
        for f in factors {
            let v = match f {
                TermFactor::Sym(sym) => {
                    let i = b.index(sym.index as usize);
                    if b.gpu().is_some() {
                        b.read_symbols(n_syms);
                        let raw = b.assign(format!("memref.load {SYMS_ARG}[{i}] : memref<{n_syms}xi32>"));
                        b.assign(format!("arith.index_castui {raw} : i32 to index"))
                    } else {
                        let raw = b.assign(format!("memref.load {SYMS_ARG}[{i}] : memref<{n_syms}xi64>"));
                        b.assign(format!("arith.index_cast {raw} : i64 to index"))
                    }
                }
                TermFactor::FloorDiv(inner, k) => {
                    let x = size_expr_value(b, inner, n_syms);
                    let kc = b.assign(format!("arith.constant {k} : index"));
                    // Extents are never negative, so the unsigned quotient is the floor.
                    b.assign(format!("arith.divui {x}, {kc} : index"))
                }
            };
            term = b.assign(format!("arith.muli {term}, {v} : index"));
        }
        sum = Some(match sum {
            None => term,
            Some(acc) => b.assign(format!("arith.addi {acc}, {term} : index")),
        });
    }
    sum.unwrap_or_else(|| b.index(0))
}

/// Drops extent-1 axes and merges adjacent axes every view walks as one (the normal forms
/// prove `stride[k] = stride[k+1] · extent[k+1]`), as the static emitter's `coalesce` does.
pub(crate) fn coalesce_sym(views: &[StridedView]) -> Vec<StridedView> {
    let shape = &views[0].shape;
    let keep: Vec<usize> = (0..shape.len()).filter(|&k| shape[k] != 1).collect();
    let mut out: Vec<StridedView> = views
        .iter()
        .map(|v| StridedView {
            shape: keep.iter().map(|&k| v.shape[k].clone()).collect(),
            strides: keep.iter().map(|&k| v.strides[k].clone()).collect(),
            offset: v.offset.clone(),
        })
        .collect();
    let mut k = 0;
    while k + 1 < out[0].shape.len() {
        let chains =
            out.iter().all(|v| v.strides[k + 1].mul(&v.shape[k + 1]).is_ok_and(|m| m == v.strides[k]));
        let merged: Option<Vec<Dim>> = out.iter().map(|v| v.shape[k].mul(&v.shape[k + 1]).ok()).collect();
        match (chains, merged) {
            (true, Some(merged)) => {
                for (v, m) in out.iter_mut().zip(merged) {
                    v.shape[k] = m;
                    v.strides[k] = v.strides[k + 1].clone();
                    v.shape.remove(k + 1);
                    v.strides.remove(k + 1);
                }
            }
            _ => k += 1,
        }
    }
    for v in &mut out {
        if v.shape.is_empty() {
            v.shape.push(Dim::Const(1));
            v.strides.push(Dim::Const(0));
        }
    }
    out
}

/// A fused elementwise kernel over symbolic views: one range iteration per row (every axis
/// but the last), an inner loop along the last axis; extents, strides and offsets that read
/// symbols are computed from `%syms` once, before the loops. Arguments: the inputs, the
/// output, the fault slot when there is one, then `%syms`.
fn elementwise(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    expr: &Expr,
    slot: Option<&View>,
) -> Result<(Kernel, Dim), CodegenError> {
    let n_syms = s.symbols.len().max(1);
    let positional = matches!(expr, Expr::Iota { .. });
    let mut all: Vec<StridedView> = k.inputs.iter().map(|o| o.view.clone()).collect();
    all.push(k.output.view.clone());
    if all.iter().any(|v| v.shape != k.output.view.shape) {
        return Err(bad("an elementwise operand of another shape than the result"));
    }
    // Iota reads the result's own axes; everything else walks merged ones.
    let views = if positional {
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
    // One contiguous run is cut into chunks, one per range iteration, as a static kernel's is
    // (so the threads share it); otherwise one row per range iteration.
    let chunked = rank == 1;
    let range = if chunked {
        views[0].shape[0].add(&Dim::Const(CHUNK - 1)).and_then(|n| n.floor_div(CHUNK))
    } else {
        kiln_sched::product(&views[0].shape[..rank - 1])
    }
    .map_err(|e| bad(&e.to_string()))?;
    let operands: Vec<&Operand> = k.inputs.iter().chain([&k.output]).collect();
    // The emitters' views: the buffer (memref type) and dtype; addressing is done here.
    let flat: Vec<View> = operands
        .iter()
        .map(|o| View {
            shape: vec![],
            strides: vec![],
            offset: 0,
            dtype: o.dtype,
            buffer_len: s.buffers[o.buffer].len,
        })
        .collect();

    let mut b = Body::new();
    let c0 = b.index(0);
    let c1 = b.index(1);
    // Run-time extents and strides, before the loops.
    let extents: Vec<String> = (0..rank).map(|a| size_value(&mut b, &views[0].shape[a], n_syms)).collect();
    let strides: Vec<Vec<String>> =
        views.iter().map(|v| v.strides.iter().map(|d| size_value(&mut b, d, n_syms)).collect()).collect();
    let offsets: Vec<String> = views.iter().map(|v| size_value(&mut b, &v.offset, n_syms)).collect();
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    // The row's index along every axis but the last (a chunk's first element, chunked).
    let mut idx = vec![String::new(); rank];
    let mut rem = "%r".to_string();
    for a in (0..rank - 1).rev() {
        if a == 0 {
            idx[0] = rem.clone();
        } else {
            idx[a] = b.assign(format!("arith.remui {rem}, {} : index", extents[a]));
            rem = b.assign(format!("arith.divui {rem}, {} : index", extents[a]));
        }
    }
    let (start, inner, lin0) = if chunked {
        let chunk = b.index(CHUNK);
        let start = b.assign(format!("arith.muli %r, {chunk} : index"));
        let left = b.assign(format!("arith.subi {}, {start} : index", extents[0]));
        let count = b.assign(format!("arith.minui {left}, {chunk} : index"));
        (Some(start.clone()), count, start)
    } else {
        let inner = extents[rank - 1].clone();
        let lin0 = b.assign(format!("arith.muli %r, {inner} : index"));
        (None, inner, lin0)
    };
    let bases: Vec<String> = (0..views.len())
        .map(|i| {
            let mut acc = offsets[i].clone();
            for a in 0..rank - 1 {
                let t = b.assign(format!("arith.muli {}, {} : index", idx[a], strides[i][a]));
                acc = b.assign(format!("arith.addi {acc}, {t} : index"));
            }
            if let Some(start) = &start {
                let t = b.assign(format!("arith.muli {start}, {} : index", strides[i][0]));
                acc = b.assign(format!("arith.addi {acc}, {t} : index"));
            }
            acc
        })
        .collect();
    b.open(format!("scf.for %j = {c0} to {inner} step {c1}"));
    idx[rank - 1] = match &start {
        Some(start) => b.assign(format!("arith.addi {start}, %j : index")),
        None => "%j".to_string(),
    };
    let at: Vec<String> = (0..views.len())
        .map(|i| {
            let t = b.assign(format!("arith.muli %j, {} : index", strides[i][rank - 1]));
            b.assign(format!("arith.addi {}, {t} : index", bases[i]))
        })
        .collect();
    let lin = b.assign(format!("arith.addi {lin0}, %j : index"));
    let args: Vec<String> = (0..views.len()).map(|i| format!("%a{i}")).collect();
    let slot_arg = format!("%a{}", views.len());
    let value = match expr {
        Expr::Iota { axis, dtype } => {
            let i = b.assign(format!("arith.index_cast {} : index to i64", idx[*axis]));
            (convert(&mut b, &i, DType::I64, *dtype), *dtype)
        }
        _ => {
            let mut ctx = Ctx {
                inputs: &flat[..flat.len() - 1],
                args: &args,
                idx: &at,
                lin: &lin,
                out_shape: &[],
                fault: slot.map(|v| FaultSlot { arg: &slot_arg, memref: v.memref() }),
            };
            eval(&mut b, &mut ctx, expr)?
        }
    };
    let in_place = k.inputs.iter().position(|o| same_elements(s, o, &k.output));
    let o = in_place.unwrap_or(views.len() - 1);
    store(&mut b, &value.0, &args[o], &flat[o], &at[o]);
    b.close("");
    b.close("");
    b.line("return");

    let mut params: Vec<String> =
        flat.iter().zip(&args).map(|(v, a)| format!("{a}: {}", v.memref())).collect();
    if let Some(v) = slot {
        params.push(format!("{slot_arg}: {}", v.memref()));
    }
    params.push(format!("{SYMS_ARG}: memref<{n_syms}xi64>"));
    let mlir =
        format!("func.func @{sym}({}, %begin: index, %end: index) {{\n{}}}\n", params.join(", "), b.finish());
    // Costs at the hints (the manifest's `flops`/`bytes` are), the range at the maxima.
    let hints: Vec<i64> = s.symbols.iter().map(|d| d.hint).collect();
    let maxima: Vec<i64> = s.symbols.iter().map(|d| d.max).collect();
    let numel = k.output.view.numel().ok().and_then(|n| n.eval(&hints)).unwrap_or(0);
    let bytes: usize = operands.iter().map(|o| numel * o.dtype.size_bytes()).sum();
    let range_max = range.eval(&maxima).unwrap_or(0);
    let made = Kernel {
        symbol: sym.into(),
        mlir,
        range: range_max,
        grain: Kernel::grain_for(range_max, bytes as u64),
        flops: (numel * expr.op_count().max(1)) as u64,
        bytes: bytes as u64,
    };
    Ok((made, range))
}

/// The leading axes of a row kernel whose operands do not merge into rows: their extents and
/// each row operand's symbolic view, from which the kernel finds where a row starts at run
/// time (with the run's `n_syms` symbol values).
pub(crate) struct RunLead<'a> {
    pub extents: &'a [Dim],
    pub views: &'a [StridedView],
    pub n_syms: usize,
}

impl RunLead<'_> {
    /// Each view's run-time walk, emitted where `b` stands (before the row loop).
    pub(crate) fn walks(&self, b: &mut Body) -> (Vec<String>, Vec<Walk>) {
        let extents = self.extents.iter().map(|d| size_value(b, d, self.n_syms)).collect();
        (extents, self.views.iter().map(|v| walk(b, v, self.n_syms)).collect())
    }

    /// Where each view's row `row` starts, given [`RunLead::walks`].
    pub(crate) fn starts(
        &self,
        b: &mut Body,
        row: &str,
        (extents, walks): &(Vec<String>, Vec<Walk>),
    ) -> Vec<String> {
        let idx = unravel(b, row, extents, extents.len());
        walks.iter().map(|w| address(b, w, &idx)).collect()
    }
}

/// An operand's view for an emitter that addresses it through a [`RunLead`]: the buffer (its
/// memref type and dtype), its extents at the maxima, and its strides where they are static
/// (0 elsewhere, never read).
pub(crate) fn at_maxima(s: &Schedule, o: &Operand, v: &StridedView) -> View {
    let maxima: Vec<i64> = s.symbols.iter().map(|d| d.max).collect();
    View {
        shape: v.shape.iter().map(|d| d.eval(&maxima).unwrap_or(0)).collect(),
        strides: v.strides.iter().map(|d| d.as_const().unwrap_or(0)).collect(),
        offset: 0,
        ..buffer_view(s, o)
    }
}

/// A view's extents, strides and offset as `index` values: constants, or computed from
/// `%syms` (emitted where the caller stands, before its loops).
#[derive(Clone)]
pub(crate) struct Walk {
    pub extents: Vec<String>,
    pub strides: Vec<String>,
    pub offset: String,
}

pub(crate) fn walk(b: &mut Body, v: &StridedView, n_syms: usize) -> Walk {
    Walk {
        extents: v.shape.iter().map(|d| size_value(b, d, n_syms)).collect(),
        strides: v.strides.iter().map(|d| size_value(b, d, n_syms)).collect(),
        offset: size_value(b, &v.offset, n_syms),
    }
}

/// Splits the flat row number `r` into indices over axes `0..n` of `extents` (row-major;
/// axis 0's extent is never read).
pub(crate) fn unravel(b: &mut Body, r: &str, extents: &[String], n: usize) -> Vec<String> {
    let mut idx = vec![String::new(); n];
    let mut rem = r.to_string();
    for a in (0..n).rev() {
        if a == 0 {
            idx[0] = rem.clone();
        } else {
            idx[a] = b.assign(format!("arith.remui {rem}, {} : index", extents[a]));
            rem = b.assign(format!("arith.divui {rem}, {} : index", extents[a]));
        }
    }
    idx
}

/// `offset + Σ idx[a]·strides[a]` over the indices given.
pub(crate) fn address(b: &mut Body, w: &Walk, idx: &[String]) -> String {
    let mut acc = w.offset.clone();
    for (i, s) in idx.iter().zip(&w.strides) {
        let t = b.assign(format!("arith.muli {i}, {s} : index"));
        acc = b.assign(format!("arith.addi {acc}, {t} : index"));
    }
    acc
}

/// `base + i·stride`.
pub(crate) fn step(b: &mut Body, base: &str, i: &str, stride: &str) -> String {
    let t = b.assign(format!("arith.muli {i}, {stride} : index"));
    b.assign(format!("arith.addi {base}, {t} : index"))
}

/// The emitters' flat view of an operand's buffer (its memref type and dtype; addressing is
/// done by the caller).
pub(crate) fn buffer_view(s: &Schedule, o: &Operand) -> View {
    View { shape: vec![], strides: vec![], offset: 0, dtype: o.dtype, buffer_len: s.buffers[o.buffer].len }
}

/// The function text: `params` (`%a0: memref<…>`, …) then `%syms` and the range bounds.
pub(super) fn func(sym: &str, mut params: Vec<String>, n_syms: usize, body: Body) -> String {
    params.push(format!("{SYMS_ARG}: memref<{n_syms}xi64>"));
    format!("func.func @{sym}({}, %begin: index, %end: index) {{\n{}}}\n", params.join(", "), body.finish())
}

/// A kernel of the run-time-row emitters: body `bd` over arguments `args` (with the memrefs of
/// `views`), one range iteration per row of `rows`; its range at the maxima, and its costs
/// `costs(rows at the hints)` (flops, bytes).
pub(super) fn row_kernel(
    s: &Schedule,
    sym: &str,
    (views, args): (&[View], &[String]),
    bd: Body,
    rows: &Dim,
    costs: impl FnOnce(usize) -> (u64, u64),
) -> (Kernel, Dim) {
    let n_syms = s.symbols.len().max(1);
    let params: Vec<String> = views.iter().zip(args).map(|(v, a)| format!("{a}: {}", v.memref())).collect();
    let mlir = func(sym, params, n_syms, bd);
    let (rows_hint, rows_max) = at_hints_and_maxima(s, rows);
    let (flops, bytes) = costs(rows_hint);
    let made = Kernel {
        symbol: sym.into(),
        mlir,
        range: rows_max,
        grain: Kernel::grain_for(rows_max, flops),
        flops,
        bytes,
    };
    (made, rows.clone())
}

/// A size at the symbols' hints (costs) and at their maxima (the range the kernel is sized for).
pub(crate) fn at_hints_and_maxima(s: &Schedule, d: &Dim) -> (usize, usize) {
    let hints: Vec<i64> = s.symbols.iter().map(|x| x.hint).collect();
    let maxima: Vec<i64> = s.symbols.iter().map(|x| x.max).collect();
    (d.eval(&hints).unwrap_or(0), d.eval(&maxima).unwrap_or(0))
}
