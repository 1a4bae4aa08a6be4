//! Reductions and softmax along run-time extents: a reduction whose reduced axes have run-time
//! extents or lie before a run-time axis (mean pooling over a sequence, global average pooling
//! over an image of run-time size, a sum over a static axis of a run-time batch), and a softmax
//! along such an axis (attention pooling's weights over the sequence, scores over run-time keys
//! that did not fuse into attention), and a norm over a run-time last axis (an instance norm
//! over a sequence).
//!
//! The row form cannot take them: it merges every axis up to the last symbolic one into rows,
//! the reduced axis among them. Here every view splits into its kept axes and its reduced ones
//! ([`Split`]), each part merged where the strides chain, and both are walked with extents and
//! strides computed from the run's symbol values: one range iteration (one GPU invocation, in
//! `gpu::dynamic`) per kept element, loops over the reduced axes inside. On the CPU, a float
//! reduction that keeps a contiguous last axis takes a block of adjacent columns per iteration
//! instead, one vector of columns per accumulator ([`Columns`]), so mean pooling over
//! `[batch, seq, d]` reads whole rows of `d`; a softmax takes a vector of rows side by side
//! along such an axis, or walks a contiguous row in vectors, as a norm does.

use super::{
    address, at_hints_and_maxima, buffer_view, coalesce_sym, refuse, row_kernel, unravel, walk, Walk,
};
use crate::kernels::elementwise::{load, reg_type, store};
use crate::kernels::reduce::{combine, count_as, identity, Columns, Ends};
use crate::kernels::{self, View};
use crate::mlir_text::Body;
use crate::program::bad;
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{DType, Dim, NormKind, ReduceOp};
use kiln_sched::{Operand, Schedule, StridedView};

/// Views of one shape split along a set of axes.
pub(crate) struct Split {
    /// Per view, its kept axes (merged where every view's strides chain; one axis of extent 1
    /// when nothing is kept).
    pub kept: Vec<StridedView>,
    /// Per view, its reduced axes (merged likewise).
    pub reduced: Vec<StridedView>,
    /// The kept elements: the product of the kept extents.
    pub rows: Dim,
    /// The elements along the reduced axes per kept one.
    pub count: Dim,
}

/// Splits `views` (all of one shape) into their `axes` and the other axes.
pub(crate) fn split(views: &[StridedView], axes: &[usize]) -> Result<Split, CodegenError> {
    let shape = &views[0].shape;
    if views.iter().any(|v| &v.shape != shape) || axes.iter().any(|&a| a >= shape.len()) {
        return Err(bad("the views of a reduction"));
    }
    let pick = |v: &StridedView, keep: bool| StridedView {
        shape: (0..shape.len()).filter(|a| axes.contains(a) != keep).map(|a| v.shape[a].clone()).collect(),
        strides: (0..shape.len())
            .filter(|a| axes.contains(a) != keep)
            .map(|a| v.strides[a].clone())
            .collect(),
        offset: v.offset.clone(),
    };
    let kept: Vec<StridedView> = views.iter().map(|v| pick(v, true)).collect();
    let reduced: Vec<StridedView> = views.iter().map(|v| pick(v, false)).collect();
    let product = |v: &StridedView| kiln_sched::product(&v.shape).map_err(|e| bad(&e.to_string()));
    let (rows, count) = (product(&kept[0])?, product(&reduced[0])?);
    Ok(Split { kept: coalesce_sym(&kept), reduced: coalesce_sym(&reduced), rows, count })
}

/// A reduction's result as a view of the operand's rank: the kept axes where they are, the
/// reduced ones at the operand's extents with stride 0 (never walked).
pub(crate) fn out_at_operand_rank(x: &StridedView, out: &StridedView, axes: &[usize]) -> Option<StridedView> {
    let rank = x.shape.len();
    let mut v = StridedView {
        shape: x.shape.clone(),
        strides: vec![Dim::Const(0); rank],
        offset: out.offset.clone(),
    };
    let kept: Vec<usize> = (0..rank).filter(|a| !axes.contains(a)).collect();
    let from: Vec<usize> =
        if out.shape.len() == rank { kept.clone() } else { (0..out.shape.len()).collect() };
    if from.len() != kept.len() {
        return None;
    }
    for (&a, &o) in kept.iter().zip(&from) {
        if out.shape[o] != x.shape[a] {
            return None;
        }
        v.strides[a] = out.strides[o].clone();
    }
    Some(v)
}

/// The reduction of `x` (argument `arg`, buffer `xv`) from `base` over the axes `w` walks
/// (outermost first): nested loops carrying the accumulator. `count` is the number of elements
/// reduced, an `index` value a mean divides by.
pub(crate) fn reduce_from(
    b: &mut Body,
    op: ReduceOp,
    (arg, xv): (&str, &View),
    base: &str,
    w: &Walk,
    count: &str,
) -> String {
    let dtype = xv.dtype;
    let ty = reg_type(dtype);
    let (c0, c1) = (b.index(0), b.index(1));
    let init = identity(b, op, dtype);
    let mut at = base.to_string();
    let mut acc = init.clone();
    let mut results = Vec::with_capacity(w.extents.len());
    for (n, stride) in w.extents.iter().zip(&w.strides) {
        let (res, iv, carried) = (b.fresh("red"), b.fresh("i"), b.fresh("acc"));
        b.open(format!(
            "{res} = scf.for {iv} = {c0} to {n} step {c1} iter_args({carried} = {acc}) -> ({ty})"
        ));
        let t = b.assign(format!("arith.muli {iv}, {stride} : index"));
        at = b.assign(format!("arith.addi {at}, {t} : index"));
        acc = carried;
        results.push(res);
    }
    let v = load(b, arg, xv, &at);
    let mut value = combine(b, op, dtype, &acc, &v);
    for res in results.into_iter().rev() {
        b.line(format!("scf.yield {value} : {ty}"));
        b.close("");
        value = res;
    }
    if op == ReduceOp::Mean {
        let n = count_as(b, count, ty);
        value = b.fdiv(&value, &n, ty);
    }
    value
}

/// Where kept element `r` (an `index` value) starts in each view, given the views' walks
/// over their kept axes.
pub(crate) fn starts_at(b: &mut Body, kept: &[Walk], r: &str) -> Vec<String> {
    let idx = unravel(b, r, &kept[0].extents, kept[0].extents.len());
    kept.iter().map(|w| address(b, w, &idx)).collect()
}

/// A row's operand: its argument, its buffer, where the row starts and its stride (`index`
/// values).
pub(crate) struct Along<'a> {
    pub arg: &'a str,
    pub view: &'a View,
    pub base: &'a str,
    pub stride: &'a str,
}

impl Along<'_> {
    fn at(&self, b: &mut Body, j: &str) -> String {
        super::step(b, self.base, j, self.stride)
    }
}

/// One row of a softmax (a log-softmax when `log`) of `n` elements (an `index` value) of `x`
/// into `out`. Three passes: the maximum; the exponentials of `x − max`, stored, and their
/// sum; the stored values divided by the sum (less its log). Every element is read before it
/// is written, so out may be x.
pub(crate) fn softmax_row(b: &mut Body, log: bool, x: &Along, out: &Along, n: &str) {
    let ty = reg_type(x.view.dtype);
    let (c0, c1) = (b.index(0), b.index(1));
    let (neg_inf, zero) = (b.float(f64::NEG_INFINITY, ty), b.float(0.0, ty));
    let max = b.fresh("max");
    b.open(format!("{max} = scf.for %j = {c0} to {n} step {c1} iter_args(%m = {neg_inf}) -> ({ty})"));
    let at = x.at(b, "%j");
    let v = load(b, x.arg, x.view, &at);
    let m = b.fmax("%m", &v, ty);
    b.line(format!("scf.yield {m} : {ty}"));
    b.close("");
    let sum = b.fresh("sum");
    b.open(format!("{sum} = scf.for %j = {c0} to {n} step {c1} iter_args(%s = {zero}) -> ({ty})"));
    let at = x.at(b, "%j");
    let v = load(b, x.arg, x.view, &at);
    let d = b.fsub(&v, &max, ty);
    let e = b.exp(&d, ty);
    let to = out.at(b, "%j");
    store(b, if log { &d } else { &e }, out.arg, out.view, &to);
    let s = b.fadd("%s", &e, ty);
    b.line(format!("scf.yield {s} : {ty}"));
    b.close("");
    let denominator = if log { b.log(&sum, ty) } else { sum };
    b.open(format!("scf.for %j = {c0} to {n} step {c1}"));
    let at = out.at(b, "%j");
    let v = load(b, out.arg, out.view, &at);
    let y = if log { b.fsub(&v, &denominator, ty) } else { b.fdiv(&v, &denominator, ty) };
    store(b, &y, out.arg, out.view, &at);
    b.close("");
}

/// A norm over a run-time last axis, taken apart.
pub(crate) struct NormRows<'a> {
    pub kind: NormKind,
    pub eps: f64,
    /// Whether it normalizes a sum (`add_norm`: operands a and b).
    pub added: bool,
    /// a, (b), out, (the sum an add + norm also stores).
    pub operands: Vec<&'a Operand>,
    /// Their views at the result's shape (b broadcast), split into rows and the last axis.
    pub split: Split,
}

impl NormRows<'_> {
    /// Where out is among the operands (the sum follows it).
    pub fn out(&self) -> usize {
        1 + usize::from(self.added)
    }
}

/// A norm kernel's operands as views of the result's shape, split into rows and their last
/// axis. Refuses an affine norm: γ and β would have the row's run-time extent, which no
/// weight has.
pub(crate) fn split_norm(
    k: &kiln_sched::Kernel,
    refuse: impl Fn(String) -> CodegenError,
) -> Result<NormRows<'_>, CodegenError> {
    use kiln_ir::Op;
    let (kind, eps, added, affine) = match &k.op {
        kiln_sched::KernelOp::Node(Op::LayerNorm { eps, affine }) => (NormKind::Layer, *eps, false, *affine),
        kiln_sched::KernelOp::Node(Op::RmsNorm { eps, affine }) => (NormKind::Rms, *eps, false, *affine),
        kiln_sched::KernelOp::Node(Op::AddNorm { eps, kind, affine }) => (*kind, *eps, true, *affine),
        _ => return Err(bad("a norm")),
    };
    let shape = &k.output.view.shape;
    if affine {
        return Err(refuse(format!(
            "an affine norm over the symbolic last axis of {}: γ and β would have a run-time extent",
            kiln_ir::fmt_shape(shape)
        )));
    }
    if !k.output.dtype.is_float() {
        return Err(refuse(format!("a norm of {}", k.output.dtype)));
    }
    let inputs = k.inputs.get(..1 + usize::from(added)).ok_or_else(|| bad("a norm"))?;
    let operands: Vec<&Operand> = inputs.iter().chain([&k.output]).chain(k.extra_outputs.first()).collect();
    let views: Vec<StridedView> = operands.iter().map(|o| o.view.broadcast_to(shape)).collect();
    let axis = shape.len().checked_sub(1).ok_or_else(|| bad("a norm of a scalar"))?;
    Ok(NormRows { kind, eps, added, operands, split: split(&views, &[axis])? })
}

/// One row of a norm of `n` elements (an `index` value): the row of `x` (plus `added`'s, for
/// an add + norm) normalized into `out`, and the sum stored into `sum` where the kernel keeps
/// it. A layer norm takes three passes (the mean; the squares about it; the result), an RMS
/// norm two. Only `x` and `added` are read, so out may be x.
pub(crate) fn norm_row(
    b: &mut Body,
    (kind, eps): (NormKind, f64),
    (x, added): (&Along, Option<&Along>),
    (out, sum): (&Along, Option<&Along>),
    n: &str,
) {
    let ty = reg_type(out.view.dtype);
    let (c0, c1) = (b.index(0), b.index(1));
    let zero = b.float(0.0, ty);
    let count = count_as(b, n, ty);
    let element = |b: &mut Body| {
        let at = x.at(b, "%j");
        let v = load(b, x.arg, x.view, &at);
        match added {
            Some(y) => {
                let at = y.at(b, "%j");
                let w = load(b, y.arg, y.view, &at);
                b.fadd(&v, &w, ty)
            }
            None => v,
        }
    };
    let mean = match kind {
        NormKind::Layer => {
            let total = b.fresh("total");
            b.open(format!("{total} = scf.for %j = {c0} to {n} step {c1} iter_args(%s = {zero}) -> ({ty})"));
            let v = element(b);
            let s = b.fadd("%s", &v, ty);
            b.line(format!("scf.yield {s} : {ty}"));
            b.close("");
            Some(b.fdiv(&total, &count, ty))
        }
        NormKind::Rms => None,
    };
    let squares = b.fresh("squares");
    b.open(format!("{squares} = scf.for %j = {c0} to {n} step {c1} iter_args(%q = {zero}) -> ({ty})"));
    let v = element(b);
    let c = match &mean {
        Some(m) => b.fsub(&v, m, ty),
        None => v,
    };
    let q = b.fma(&c, &c, "%q", ty);
    b.line(format!("scf.yield {q} : {ty}"));
    b.close("");
    let variance = b.fdiv(&squares, &count, ty);
    let eps = b.float(eps, ty);
    let shifted = b.fadd(&variance, &eps, ty);
    let scale = b.rsqrt(&shifted, ty);
    b.open(format!("scf.for %j = {c0} to {n} step {c1}"));
    let v = element(b);
    if let Some(sum) = sum {
        let at = sum.at(b, "%j");
        store(b, &v, sum.arg, sum.view, &at);
    }
    let c = match &mean {
        Some(m) => b.fsub(&v, m, ty),
        None => v,
    };
    let y = b.fmul(&c, &scale, ty);
    let at = out.at(b, "%j");
    store(b, &y, out.arg, out.view, &at);
    b.close("");
}

/// The CPU norm of kernel `k` over its symbolic last axis: one range iteration per row, in
/// vectors along a contiguous row (the static kernel's passes, `kernels::norm`), else
/// element by element at the run's strides ([`norm_row`]). Arguments: a, (b), out, (sum),
/// `%syms`.
pub(super) fn emit_norm(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let norm = split_norm(k, |why| refuse(k, why))?;
    let (operands, sp) = (&norm.operands, &norm.split);
    let n_syms = s.symbols.len().max(1);
    let bufs: Vec<View> = operands.iter().map(|o| buffer_view(s, o)).collect();
    let args: Vec<String> = (0..bufs.len()).map(|i| format!("%a{i}")).collect();
    let (rows, count) = (at_hints_and_maxima(s, &sp.rows).0, at_hints_and_maxima(s, &sp.count).0);
    let bytes = (rows * count * bufs.iter().map(|v| v.dtype.size_bytes()).sum::<usize>()) as u64;

    let mut b = Body::new();
    let kept: Vec<Walk> = sp.kept.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    let along: Vec<Walk> = sp.reduced.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    // Contiguous rows in a dtype the vector kernels take: in vectors along each row.
    let contiguous = kernels::norm::softmax_lanes_of(&bufs[0], target).is_some()
        && sp.reduced.iter().all(|v| v.strides == [Dim::Const(1)]);
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let bases = starts_at(&mut b, &kept, "%r");
    let n = &along[0].extents[0];
    if contiguous {
        b.line("// plan: one contiguous row per iteration, in vectors of its run-time length");
        kernels::norm::emit_norm_run_row(
            &mut b,
            &bufs,
            norm.added,
            &bases,
            n,
            (norm.kind, norm.eps),
            target,
        )?;
    } else {
        b.line("// plan: one row per iteration, of its run-time length and stride");
        let rows_of: Vec<Along> = (0..bufs.len())
            .map(|i| Along { arg: &args[i], view: &bufs[i], base: &bases[i], stride: &along[i].strides[0] })
            .collect();
        let (x, y, o) = (&rows_of[0], norm.added.then(|| &rows_of[1]), norm.out());
        norm_row(&mut b, (norm.kind, norm.eps), (x, y), (&rows_of[o], rows_of.get(o + 1)), n);
    }
    b.close("");
    b.line("return");
    let flops = (10 * rows * count) as u64;
    Ok(row_kernel(s, sym, (&bufs, &args), b, &sp.rows, |_| (flops, bytes)))
}

/// The CPU reduction of kernel `k` over `axes`: one range iteration per kept element (or per
/// block of columns). Arguments: x, out, `%syms`.
pub(super) fn emit_reduce(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    op: ReduceOp,
    axes: &[usize],
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let (x, out) = (k.inputs.first().ok_or_else(|| bad("reduce"))?, &k.output);
    check_reduce(k, op, x.dtype, |why| refuse(k, why))?;
    let out_full =
        out_at_operand_rank(&x.view, &out.view, axes).ok_or_else(|| bad("a reduction's result"))?;
    let sp = split(&[x.view.clone(), out_full], axes)?;
    let n_syms = s.symbols.len().max(1);
    let (xv, ov) = (buffer_view(s, x), buffer_view(s, out));
    let flops_bytes = costs(s, &sp, x, out);

    let mut b = Body::new();
    let kept: Vec<Walk> = sp.kept.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    let red = walk(&mut b, &sp.reduced[0], n_syms);
    let count = super::size_value(&mut b, &sp.count, n_syms);
    let plan = columns(s, &sp, x.dtype, target);
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let rows = match plan {
        None => {
            let idx = unravel(&mut b, "%r", &kept[0].extents, kept[0].extents.len());
            let (xb, ob) = (address(&mut b, &kept[0], &idx), address(&mut b, &kept[1], &idx));
            let v = reduce_from(&mut b, op, ("%a0", &xv), &xb, &red, &count);
            store(&mut b, &v, "%a1", &ov, &ob);
            sp.rows.clone()
        }
        Some(plan) => {
            let columns = contiguous_columns(&sp).ok_or_else(|| bad("the columns of a reduction"))?;
            b.line(format!(
                "// plan: columns of {columns} in blocks of {} × {} lanes, reduced over run-time extents",
                plan.vectors, plan.lanes
            ));
            let block = open_column_block(&mut b, &kept, plan.width());
            let ends = Ends { left: &block.left, whole: whole_blocks(columns, plan.width()) };
            let loops: Vec<(String, String)> =
                red.extents.iter().cloned().zip(red.strides.iter().cloned()).collect();
            plan.emit_row_block(
                &mut b,
                op,
                (&xv, &ov),
                (&block.x, &block.out),
                ends,
                &loops,
                &count,
                target,
            )?;
            block_range(&sp, plan.width())?
        }
    };
    b.close("");
    b.line("return");
    Ok(row_kernel(s, sym, (&[xv, ov], &["%a0".into(), "%a1".into()]), b, &rows, |_| flops_bytes))
}

/// Where one block of adjacent columns starts, in an iteration of a kernel whose last kept
/// axis is contiguous (its number `%r` counts blocks, row by row).
struct ColumnBlock {
    /// x's and out's first element of the block.
    x: String,
    out: String,
    /// The columns left in the row from the block's first.
    left: String,
}

/// Splits `%r` into a row of the kept axes but the last and a block of `width` of that
/// axis's columns, and finds where the block starts in x and out (`kept`'s walks, whose last
/// extent is the columns').
fn open_column_block(b: &mut Body, kept: &[Walk], width: usize) -> ColumnBlock {
    let last = kept[0].extents.len() - 1;
    let columns = kept[0].extents[last].clone();
    let (w, w1) = (b.index(width), b.index(width - 1));
    let up = b.assign(format!("arith.addi {columns}, {w1} : index"));
    let blocks = b.assign(format!("arith.divui {up}, {w} : index"));
    let row = b.assign(format!("arith.divui %r, {blocks} : index"));
    let blk = b.assign(format!("arith.remui %r, {blocks} : index"));
    let first = b.assign(format!("arith.muli {blk}, {w} : index"));
    let idx = unravel(b, &row, &kept[0].extents, last);
    let mut starts = kept.iter().map(|k| {
        let lead = Walk { strides: k.strides[..last].to_vec(), ..k.clone() };
        let at = address(b, &lead, &idx);
        b.assign(format!("arith.addi {at}, {first} : index"))
    });
    let (x, out) = (starts.next().unwrap_or_default(), starts.next().unwrap_or_default());
    let left = b.assign(format!("arith.subi {columns}, {first} : index"));
    ColumnBlock { x, out, left }
}

/// The iterations of a kernel in blocks of `width` of the last kept axis.
fn block_range(sp: &Split, width: usize) -> Result<Dim, CodegenError> {
    let last = sp.kept[0].shape.len() - 1;
    let outer = kiln_sched::product(&sp.kept[0].shape[..last]).map_err(|e| bad(&e.to_string()))?;
    let blocks = match &sp.kept[0].shape[last] {
        Dim::Const(c) => Dim::Const(c.div_ceil(width)),
        d => {
            d.add(&Dim::Const(width - 1)).and_then(|n| n.floor_div(width)).map_err(|e| bad(&e.to_string()))?
        }
    };
    outer.mul(&blocks).map_err(|e| bad(&e.to_string()))
}

/// The last kept axis's extent, when it is contiguous in every view (rows of a softmax side
/// by side, columns of a reduction) and not a static 1.
fn contiguous_columns(sp: &Split) -> Option<&Dim> {
    let last = sp.kept[0].shape.len() - 1;
    let columns = &sp.kept[0].shape[last];
    let unit = sp.kept.iter().all(|v| v.strides[last] == Dim::Const(1));
    (unit && columns.as_const().is_none_or(|c| c >= 2)).then_some(columns)
}

/// Whether every block of `width` of `columns` is whole (a static multiple).
fn whole_blocks(columns: &Dim, width: usize) -> bool {
    columns.as_const().is_some_and(|c| c.is_multiple_of(width))
}

/// The [`Columns`] plan for a float reduction whose last kept axis is contiguous
/// ([`contiguous_columns`]), its accumulators per block chosen for the columns at the hints.
fn columns(s: &Schedule, sp: &Split, dtype: DType, target: &dyn Target) -> Option<Columns> {
    let columns = contiguous_columns(sp)?;
    if !matches!(dtype, DType::F32 | DType::F64) {
        return None;
    }
    let (at_hints, _) = at_hints_and_maxima(s, columns);
    let n = at_hints.max(2);
    // The static plan over a stand-in view with those columns and one reduced axis.
    let stand_in = View { shape: vec![2, n], strides: vec![n, 1], offset: 0, dtype, buffer_len: 2 * n };
    Columns::choose(&[0], &stand_in, target)
}

/// What a reduction over run-time extents refuses: bool, and a mean of integers.
pub(crate) fn check_reduce(
    k: &kiln_sched::Kernel,
    op: ReduceOp,
    dtype: DType,
    refuse: impl Fn(String) -> CodegenError,
) -> Result<(), CodegenError> {
    if dtype == DType::Bool || (!dtype.is_float() && op == ReduceOp::Mean) {
        return Err(refuse(format!("{} reduction of {dtype} in `{}`", op.name(), k.name())));
    }
    Ok(())
}

/// A reduction's costs at the symbols' hints: one operation per element read, and the bytes of
/// x and out.
pub(crate) fn costs(s: &Schedule, sp: &Split, x: &Operand, out: &Operand) -> (u64, u64) {
    let (rows, _) = at_hints_and_maxima(s, &sp.rows);
    let (count, _) = at_hints_and_maxima(s, &sp.count);
    let read = rows * count;
    (read as u64, (read * x.dtype.size_bytes() + rows * out.dtype.size_bytes()) as u64)
}

/// The CPU softmax (log-softmax when `log`) of kernel `k` along `axis`: one range iteration
/// per row. Arguments: x, out, `%syms`.
pub(super) fn emit_softmax(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    axis: usize,
    log: bool,
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let (x, out) = (k.inputs.first().ok_or_else(|| bad("softmax"))?, &k.output);
    if !x.dtype.is_float() {
        return Err(refuse(k, format!("a softmax of {}", x.dtype)));
    }
    let sp = split(&[x.view.clone(), out.view.clone()], &[axis])?;
    let n_syms = s.symbols.len().max(1);
    let (xv, ov) = (buffer_view(s, x), buffer_view(s, out));
    let (rows, count) = (at_hints_and_maxima(s, &sp.rows).0, at_hints_and_maxima(s, &sp.count).0);
    let bytes = (rows * count * (x.dtype.size_bytes() + 2 * out.dtype.size_bytes())) as u64;

    let mut b = Body::new();
    let kept: Vec<Walk> = sp.kept.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    let along: Vec<Walk> = sp.reduced.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    let (n, xs, os) = (&along[0].extents[0], &along[0].strides[0], &along[1].strides[0]);
    // Rows side by side along a contiguous last kept axis: a vector of them per iteration;
    // or each row contiguous, in vectors along it (float dtypes the vector kernels take).
    let vector = kernels::norm::softmax_lanes_of(&xv, target);
    let lanes = contiguous_columns(&sp).zip(vector);
    let contiguous = vector.is_some() && sp.reduced.iter().all(|v| v.strides == [Dim::Const(1)]);
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let range = match lanes {
        Some((columns, lanes)) => {
            b.line(format!("// plan: {columns} rows side by side, {lanes} per vector"));
            let block = open_column_block(&mut b, &kept, lanes);
            let left = (!whole_blocks(columns, lanes)).then_some(block.left.as_str());
            let starts = (block.x.as_str(), block.out.as_str());
            kernels::norm::emit_softmax_lanes(&mut b, (&xv, &ov), starts, (n, xs, os), left, log, target)?;
            block_range(&sp, lanes)?
        }
        None if contiguous => {
            // One contiguous row of run-time length per iteration, in vectors along it.
            b.line("// plan: one contiguous row per iteration, in vectors of its run-time length");
            let idx = unravel(&mut b, "%r", &kept[0].extents, kept[0].extents.len());
            let (xb, ob) = (address(&mut b, &kept[0], &idx), address(&mut b, &kept[1], &idx));
            kernels::norm::emit_softmax_run_row(&mut b, (&xv, &ov), (&xb, &ob), n, log, target)?;
            sp.rows.clone()
        }
        None => {
            let idx = unravel(&mut b, "%r", &kept[0].extents, kept[0].extents.len());
            let (xb, ob) = (address(&mut b, &kept[0], &idx), address(&mut b, &kept[1], &idx));
            let xa = Along { arg: "%a0", view: &xv, base: &xb, stride: xs };
            let oa = Along { arg: "%a1", view: &ov, base: &ob, stride: os };
            softmax_row(&mut b, log, &xa, &oa, n);
            sp.rows.clone()
        }
    };
    b.close("");
    b.line("return");
    let flops = (4 * rows * count) as u64;
    Ok(row_kernel(s, sym, (&[xv, ov], &["%a0".into(), "%a1".into()]), b, &range, |_| (flops, bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::SizeExpr;

    fn sym(i: u32) -> Dim {
        Dim::Sym(SizeExpr::symbol(i, if i == 0 { "batch" } else { "seq" }))
    }

    #[test]
    fn a_sum_over_a_run_time_sequence_keeps_batch_and_features() {
        // [batch, seq, 8], contiguous, reduced over seq.
        let x = StridedView {
            shape: vec![sym(0), sym(1), Dim::Const(8)],
            strides: vec![sym(1).mul(&Dim::Const(8)).unwrap(), Dim::Const(8), Dim::Const(1)],
            offset: Dim::Const(0),
        };
        let out = StridedView {
            shape: vec![sym(0), Dim::Const(8)],
            strides: vec![Dim::Const(8), Dim::Const(1)],
            offset: Dim::Const(0),
        };
        let full = out_at_operand_rank(&x, &out, &[1]).unwrap();
        let sp = split(&[x, full], &[1]).unwrap();
        assert_eq!(sp.kept[0].shape, vec![sym(0), Dim::Const(8)]);
        assert_eq!(sp.kept[1].strides, vec![Dim::Const(8), Dim::Const(1)]);
        assert_eq!(sp.reduced[0].shape, vec![sym(1)]);
        assert_eq!(sp.reduced[0].strides, vec![Dim::Const(8)]);
        assert_eq!(sp.rows, sym(0).mul(&Dim::Const(8)).unwrap());
        assert_eq!(sp.count, sym(1));
    }
}
