//! 2-D convolution and pooling (NCHW).
//!
//! Convolution and pooling on the CPU run by rows ([`WindowRows`]): each range iteration
//! computes one output row of a block of up to 8 channels, the row in vectors along the
//! width. A convolution's input vector feeds the block's accumulators; a pool keeps a max,
//! or a sum and a count of taps, per channel. Where every tap of a vector lies inside the
//! input it is a plain load; at the edges (the padding), and everywhere under a width
//! stride, a gather at clamped columns whose lanes outside the input are left out. Taps are
//! taken by rows of the kernel, channels inside, so the height's bounds are checked once per
//! kernel row. Other windows (half types, operands strided along the width, a result
//! narrower than a vector) are direct loops per element with every tap bounds-checked
//! ([`conv_value`], [`pool_value`]), which the GPU kernels also use.

use super::elementwise::{load, reg_type, store};
use super::rows::{open_rows, row_count, wrap};
use super::View;
use crate::mlir_text::Body;
use crate::Target;
use crate::{CodegenError, Kernel};
use kiln_ir::{DType, PoolKind};

/// Where a window op reads and writes: its input's spatial extents and its operands'
/// elements (0: the input, then the weight for a convolution, then the result). The static
/// emitters address views of static extents; the run-time ones (`dynamic::window`) address
/// extents and strides computed from the run's sizes.
pub(crate) trait WindowReads {
    /// The input's extent along spatial axis `a` (0: height, 1: width), an `index` value.
    fn extent(&self, b: &mut Body, a: usize) -> String;
    /// Where element `idx` of operand `i` lies in its buffer, an `index` value.
    fn address(&self, b: &mut Body, i: usize, idx: &[String]) -> String;
    /// Operand `i`'s argument and buffer view (memref type, dtype).
    fn buffer(&self, i: usize) -> (&str, &View);
    /// Whether operand `i` has unit stride along the width, so a run of it is one vector.
    fn unit_width(&self, i: usize) -> bool;
    /// Element `idx` of operand `i` in register type.
    fn load(&self, b: &mut Body, i: usize, idx: &[String]) -> String {
        let at = self.address(b, i, idx);
        let (arg, v) = self.buffer(i);
        load(b, arg, v, &at)
    }
}

/// Operands of static views, in arguments `%a0`, `%a1`, … in order.
pub(crate) struct StaticReads<'a> {
    views: Vec<&'a View>,
    args: Vec<String>,
}

impl<'a> StaticReads<'a> {
    pub(crate) fn new(views: &[&'a View]) -> StaticReads<'a> {
        StaticReads { views: views.to_vec(), args: (0..views.len()).map(|i| format!("%a{i}")).collect() }
    }
}

impl WindowReads for StaticReads<'_> {
    fn extent(&self, b: &mut Body, a: usize) -> String {
        b.index(self.views[0].shape[2 + a])
    }

    fn address(&self, b: &mut Body, i: usize, idx: &[String]) -> String {
        self.views[i].index_expr(b, idx)
    }

    fn buffer(&self, i: usize) -> (&str, &View) {
        (&self.args[i], self.views[i])
    }

    fn unit_width(&self, i: usize) -> bool {
        self.views[i].strides[3] == 1
    }
}

/// In-bounds flag and input coordinate for output coordinate `o` along one spatial axis:
/// `o·stride + k·dilation − pad` must lie in `0..extent`; out of bounds the coordinate is 0,
/// so the read stays inside the tensor and its value is dropped.
fn tap(
    b: &mut Body,
    o: &str,
    k: &str,
    (stride, dilation, pad): (usize, usize, usize),
    extent: &str,
) -> (String, String) {
    let s = b.index(stride);
    let d = b.index(dilation);
    let p = b.index(pad);
    let a = b.assign(format!("arith.muli {o}, {s} : index"));
    let kd = b.assign(format!("arith.muli {k}, {d} : index"));
    let pos = b.assign(format!("arith.addi {a}, {kd} : index"));
    let ge = b.assign(format!("arith.cmpi uge, {pos}, {p} : index"));
    let local = b.assign(format!("arith.subi {pos}, {p} : index"));
    let lt = b.assign(format!("arith.cmpi ult, {local}, {extent} : index"));
    let ok = b.assign(format!("arith.andi {ge}, {lt} : i1"));
    let zero = b.index(0);
    let l = b.assign(format!("arith.select {ok}, {local}, {zero} : index"));
    (ok, l)
}

/// `out = conv2d(x, w)`: x `[N, C, H, W]`, w `[O, C/groups, KH, KW]`, out `[N, O, OH, OW]`.
/// Arguments: x, w, out.
#[allow(clippy::too_many_arguments)]
pub fn emit_conv2d(
    symbol: &str,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    x: &View,
    w: &View,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let dtype = out.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("conv2d on {dtype}")));
    }
    let (cg, kh, kw) = (w.shape[1], w.shape[2], w.shape[3]);
    let mut b = Body::new();
    let reads = StaticReads::new(&[x, w, out]);
    let op = RowOp::Conv { groups, w_shape: &w.shape };
    let geometry = ((stride, padding, dilation), [kh, kw]);
    let range =
        match WindowRows::choose(&op, (kw, stride[1]), [out.shape[1], out.shape[3]], dtype, &reads, target) {
            Some(plan) => static_rows(&mut b, geometry, op, plan, out, &reads),
            None => {
                let idx = open_rows(&mut b, &out.shape);
                let v = conv_value(&mut b, stride, padding, dilation, groups, &w.shape, dtype, &idx, &reads);
                let at_o = out.index_expr(&mut b, &idx);
                store(&mut b, &v, "%a2", out, &at_o);
                b.close("");
                b.close("");
                row_count(&out.shape)
            }
        };
    b.line("return");
    let range = range.max(1);
    let flops = (2 * out.numel() * cg * kh * kw) as u64;
    let bytes = ((x.numel() + w.numel() + out.numel()) * dtype.size_bytes()) as u64;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &[x.memref(), w.memref(), out.memref()], b),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes,
    })
}

/// A window op over static extents by rows ([`window_row`]): one range iteration per row of
/// a block of result channels; returns the range.
fn static_rows(
    b: &mut Body,
    geometry: (Geometry, [usize; 2]),
    op: RowOp,
    plan: WindowRows,
    out: &View,
    reads: &dyn WindowReads,
) -> usize {
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let blocks = out.shape[1] / plan.block;
    let extents: Vec<String> = [out.shape[0], blocks, out.shape[2]].iter().map(|&e| b.index(e)).collect();
    let idx = crate::dynamic::unravel(b, "%r", &extents, 3);
    let width = b.index(out.shape[3]);
    let row = [idx[0].as_str(), idx[1].as_str(), idx[2].as_str()];
    window_row(b, geometry, op, plan, out.dtype, row, &width, reads);
    b.close("");
    out.shape[0] * blocks * out.shape[2]
}

/// `out = pool2d(x)`: max (padding never wins) or average (over the in-bounds taps only).
/// Arguments: x, out.
#[allow(clippy::too_many_arguments)]
pub fn emit_pool2d(
    symbol: &str,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    x: &View,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let dtype = out.dtype;
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("pool2d on {dtype}")));
    }
    let mut b = Body::new();
    let reads = StaticReads::new(&[x, out]);
    let op = RowOp::Pool(kind);
    let geometry = ((stride, padding, [1, 1]), kernel);
    let range = match WindowRows::choose(
        &op,
        (kernel[1], stride[1]),
        [out.shape[1], out.shape[3]],
        dtype,
        &reads,
        target,
    ) {
        Some(plan) => static_rows(&mut b, geometry, op, plan, out, &reads),
        None => {
            let idx = open_rows(&mut b, &out.shape);
            let result = pool_value(&mut b, kind, kernel, stride, padding, dtype, &idx, &reads);
            let at_o = out.index_expr(&mut b, &idx);
            store(&mut b, &result, "%a1", out, &at_o);
            b.close("");
            b.close("");
            row_count(&out.shape)
        }
    };
    b.line("return");
    let range = range.max(1);
    let flops = (out.numel() * kernel[0] * kernel[1]) as u64;
    let bytes = ((x.numel() + out.numel()) * dtype.size_bytes()) as u64;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &[x.memref(), out.memref()], b),
        range,
        grain: Kernel::grain_for(range, flops),
        flops,
        bytes,
    })
}

/// Element `idx` (`[n, o, oh, ow]`) of `conv2d(x, w)` in register type, for a weight of
/// `w_shape` (`[O, C/groups, KH, KW]`); padding taps count as zero.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_value(
    b: &mut Body,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    w_shape: &[usize],
    dtype: kiln_ir::DType,
    idx: &[String],
    reads: &dyn WindowReads,
) -> String {
    let ty = reg_type(dtype);
    let (o_ch, cg, kh, kw) = (w_shape[0], w_shape[1], w_shape[2], w_shape[3]);
    let og = o_ch / groups.max(1);
    let (n, o, oh, ow) = (idx[0].clone(), idx[1].clone(), idx[2].clone(), idx[3].clone());
    let c0 = b.index(0);
    let c1 = b.index(1);
    let zero = b.float(0.0, ty);
    let ogc = b.index(og);
    let g = b.assign(format!("arith.divui {o}, {ogc} : index"));
    let cgc = b.index(cg);
    let cbase = b.assign(format!("arith.muli {g}, {cgc} : index"));
    let (nc, nkh, nkw) = (b.index(cg), b.index(kh), b.index(kw));
    // Fresh names: a row kernel computes several elements in one body.
    let [s0, s1, s2] = [b.fresh("sc"), b.fresh("sy"), b.fresh("sx")];
    let [c, y, x] = [b.fresh("c"), b.fresh("y"), b.fresh("x")];
    let [t0, t1, t2] = [b.fresh("tc"), b.fresh("ty"), b.fresh("tx")];
    b.open(format!("{s0} = scf.for {c} = {c0} to {nc} step {c1} iter_args({t0} = {zero}) -> ({ty})"));
    b.open(format!("{s1} = scf.for {y} = {c0} to {nkh} step {c1} iter_args({t1} = {t0}) -> ({ty})"));
    b.open(format!("{s2} = scf.for {x} = {c0} to {nkw} step {c1} iter_args({t2} = {t1}) -> ({ty})"));
    let (h, w) = (reads.extent(b, 0), reads.extent(b, 1));
    let (ok_h, ih) = tap(b, &oh, &y, (stride[0], dilation[0], padding[0]), &h);
    let (ok_w, iw) = tap(b, &ow, &x, (stride[1], dilation[1], padding[1]), &w);
    let ok = b.assign(format!("arith.andi {ok_h}, {ok_w} : i1"));
    let ci = b.assign(format!("arith.addi {cbase}, {c} : index"));
    let xv = reads.load(b, 0, &[n.clone(), ci, ih, iw]);
    let xv = b.select(&ok, &xv, &zero, ty);
    let wv = reads.load(b, 1, &[o.clone(), c.clone(), y.clone(), x.clone()]);
    let acc = b.fma(&xv, &wv, &t2, ty);
    b.line(format!("scf.yield {acc} : {ty}"));
    b.close("");
    b.line(format!("scf.yield {s2} : {ty}"));
    b.close("");
    b.line(format!("scf.yield {s1} : {ty}"));
    b.close("");
    s0
}

/// Element `idx` (`[n, c, oh, ow]`) of `pool2d(x)` in register type: the max over the
/// in-bounds taps, or their average.
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool_value(
    b: &mut Body,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dtype: kiln_ir::DType,
    idx: &[String],
    reads: &dyn WindowReads,
) -> String {
    let ty = reg_type(dtype);
    let c0 = b.index(0);
    let c1 = b.index(1);
    let init = match kind {
        PoolKind::Max => b.float(f64::NEG_INFINITY, ty),
        PoolKind::Avg => b.float(0.0, ty),
    };
    let zero = b.float(0.0, ty);
    let (nkh, nkw) = (b.index(kernel[0]), b.index(kernel[1]));
    b.open(format!(
        "%s1:2 = scf.for %y = {c0} to {nkh} step {c1} iter_args(%t1 = {init}, %u1 = {zero}) -> ({ty}, {ty})"
    ));
    b.open(format!(
        "%s2:2 = scf.for %x = {c0} to {nkw} step {c1} iter_args(%t2 = %t1, %u2 = %u1) -> ({ty}, {ty})"
    ));
    let (h, w) = (reads.extent(b, 0), reads.extent(b, 1));
    let (ok_h, ih) = tap(b, &idx[2], "%y", (stride[0], 1, padding[0]), &h);
    let (ok_w, iw) = tap(b, &idx[3], "%x", (stride[1], 1, padding[1]), &w);
    let ok = b.assign(format!("arith.andi {ok_h}, {ok_w} : i1"));
    let v = reads.load(b, 0, &[idx[0].clone(), idx[1].clone(), ih, iw]);
    let one = b.float(1.0, ty);
    let (acc, cnt) = match kind {
        PoolKind::Max => {
            let m = b.fmax("%t2", &v, ty);
            (b.select(&ok, &m, "%t2", ty), "%u2".to_string())
        }
        PoolKind::Avg => {
            let s = b.fadd("%t2", &v, ty);
            let c = b.fadd("%u2", &one, ty);
            (b.select(&ok, &s, "%t2", ty), b.select(&ok, &c, "%u2", ty))
        }
    };
    b.line(format!("scf.yield {acc}, {cnt} : {ty}, {ty}"));
    b.close("");
    b.line(format!("scf.yield %s2#0, %s2#1 : {ty}, {ty}"));
    b.close("");
    match kind {
        PoolKind::Max => "%s1#0".to_string(),
        PoolKind::Avg => b.fdiv("%s1#0", "%s1#1", ty),
    }
}

/// A window op's row plan on the CPU: one range iteration per `[n, block of output
/// channels, oh]`, the row's width in vectors where every tap lies inside the input (`lanes`
/// wide, then halves down to `min_lanes`), and vectors of `lanes` gathered at clamped
/// columns at the edges. A convolution's input vector feeds the block's `block`
/// accumulators; a pool's block keeps one accumulator per channel. The per-element loops
/// read one scalar per tap and bounds-check each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WindowRows {
    pub block: usize,
    pub lanes: usize,
    pub min_lanes: usize,
    /// Whether every vector is gathered: a width stride spaces a vector's columns apart.
    pub gather_all: bool,
}

/// What a row of a window op computes: a convolution's sums over its group's channels and
/// taps with the weight (`w_shape`, `[O, C/groups, KH, KW]`), or a pool's max or average
/// over its taps.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowOp<'a> {
    Conv { groups: usize, w_shape: &'a [usize] },
    Pool(PoolKind),
}

impl RowOp<'_> {
    /// The operand the result is: after the input and the weight, or after the input.
    fn out_operand(&self) -> usize {
        match self {
            RowOp::Conv { .. } => 2,
            RowOp::Pool(_) => 1,
        }
    }
}

impl WindowRows {
    /// The plan for window op `op` of `kernel_w` taps along the width and width stride
    /// `stride_w`, over `[channels, width]` of the result (its width at most), whose operands
    /// `reads` addresses; `None` where rows do not vectorize: half types, an operand strided
    /// along the width, a kernel wider than 16 taps, a result narrower than the narrowest
    /// vector (a global pool's one column). A width stride other than 1 gathers every vector
    /// (`gather_all`).
    pub(crate) fn choose(
        op: &RowOp,
        (kernel_w, stride_w): (usize, usize),
        [channels, width]: [usize; 2],
        dtype: DType,
        reads: &dyn WindowReads,
        target: &dyn Target,
    ) -> Option<WindowRows> {
        let (lanes, min_lanes) = match dtype {
            DType::F32 => (target.f32_lanes(), 4),
            DType::F64 => (target.f32_lanes() / 2, 2),
            DType::F16 | DType::BF16 | DType::I32 | DType::I64 | DType::Bool => return None,
        };
        let contiguous = reads.unit_width(0) && reads.unit_width(op.out_operand());
        if !contiguous || kernel_w > 16 || lanes < min_lanes || width < min_lanes {
            return None;
        }
        // A block of channels whose accumulators stay in registers: at most 8, and within one
        // group of a convolution.
        let per_block = match op {
            RowOp::Conv { groups, w_shape } => w_shape[0] / groups.max(&1),
            RowOp::Pool(_) => channels,
        };
        let block = [8, 4, 2, 1].into_iter().find(|b| per_block.is_multiple_of(*b)).unwrap_or(1);
        Some(WindowRows { block, lanes, min_lanes, gather_all: stride_w != 1 })
    }
}

/// `len` names for the results of an op that yields `len` values (`%r:len` on the left, each
/// `%r#i`; one value is `%r` itself): the left-hand side and the results.
fn results(b: &mut Body, hint: &str, len: usize) -> (String, Vec<String>) {
    let r = b.fresh(hint);
    if len == 1 {
        return (r.clone(), vec![r]);
    }
    (format!("{r}:{len}"), (0..len).map(|i| format!("{r}#{i}")).collect())
}

/// A window's geometry: stride, padding and dilation, `[h, w]` each (a pool's dilation is 1).
pub(crate) type Geometry = ([usize; 2], [usize; 2], [usize; 2]);

/// One row of a window op's result under `plan` ([`WindowRows`]): channels `block·ob …` of
/// image `n` at output row `oh` (`index` values), `out_width` wide, for a window of `kernel`
/// taps (`[KH, KW]`). Operands: the input, the weight (a convolution), the result.
#[allow(clippy::too_many_arguments)]
pub(crate) fn window_row(
    b: &mut Body,
    (geometry, kernel): (Geometry, [usize; 2]),
    op: RowOp,
    plan: WindowRows,
    dtype: DType,
    [n, ob, oh]: [&str; 3],
    out_width: &str,
    reads: &dyn WindowReads,
) {
    let (_, padding, dilation) = geometry;
    let blk = b.index(plan.block);
    let first = b.assign(format!("arith.muli {ob}, {blk} : index"));
    let channels: Vec<String> = (0..plan.block)
        .map(|j| {
            let c = b.index(j);
            b.assign(format!("arith.addi {first}, {c} : index"))
        })
        .collect();
    let c0 = b.index(0);
    let row = Row { geometry, kernel, op, dtype, n, oh, channels: &channels, reads };
    if plan.gather_all {
        row.by_vector(b, plan.lanes, (&c0, out_width), true);
        return;
    }
    // Output columns whose taps all lie inside the input: from `pad` (the first whose
    // leftmost tap is) to `width + pad − span` (past the last whose rightmost tap is).
    let w = reads.extent(b, 1);
    let pad = b.index(padding[1]);
    let lo = b.assign(format!("arith.minui {pad}, {out_width} : index"));
    let t = b.assign(format!("arith.addi {w}, {pad} : index"));
    let span = b.index((kernel[1] - 1) * dilation[1]);
    let fits = b.assign(format!("arith.cmpi uge, {t}, {span} : index"));
    let end = b.assign(format!("arith.subi {t}, {span} : index"));
    let end = b.assign(format!("arith.select {fits}, {end}, {c0} : index"));
    let hi = b.assign(format!("arith.minui {end}, {out_width} : index"));
    let hi = b.assign(format!("arith.maxui {hi}, {lo} : index"));
    row.by_vector(b, plan.lanes, (&c0, &lo), true);
    let mut at = lo;
    let mut lanes = plan.lanes;
    while lanes >= plan.min_lanes {
        at = row.by_vector(b, lanes, (&at, &hi), false);
        lanes /= 2;
    }
    row.by_vector(b, plan.lanes, (&at, out_width), true);
}

/// What [`window_row`]'s runs share.
struct Row<'a> {
    geometry: Geometry,
    kernel: [usize; 2],
    op: RowOp<'a>,
    dtype: DType,
    n: &'a str,
    oh: &'a str,
    channels: &'a [String],
    reads: &'a dyn WindowReads,
}

impl Row<'_> {
    /// Vectors of `lanes` columns from `from`: whole ones while they end by `to`, every tap
    /// inside the input (returns where they stop), or, `masked`, up to `to` with the last one
    /// partial and each tap's lanes outside the input left out (gathers at clamped columns,
    /// so no read leaves the row; returns `to`).
    fn by_vector(&self, b: &mut Body, lanes: usize, (from, to): (&str, &str), masked: bool) -> String {
        let (stride, padding, dilation) = self.geometry;
        let [kh, kw] = self.kernel;
        let block = self.channels.len();
        let ty = reg_type(self.dtype);
        let vty = format!("vector<{lanes}x{ty}>");
        let (ity, mty) = (format!("vector<{lanes}xindex>"), format!("vector<{lanes}xi1>"));
        // A convolution's sums; a pool's maxima, or its sums and then its counts of taps.
        let (init, carried) = match self.op {
            RowOp::Conv { .. } => (0.0, block),
            RowOp::Pool(PoolKind::Max) => (f64::NEG_INFINITY, block),
            RowOp::Pool(PoolKind::Avg) => (0.0, 2 * block),
        };
        let vector_types = vec![vty.as_str(); carried].join(", ");
        let (c0, c1, vl) = (b.index(0), b.index(1), b.index(lanes));
        let end = if masked {
            to.to_string()
        } else {
            let left = b.assign(format!("arith.subi {to}, {from} : index"));
            let count = b.assign(format!("arith.divui {left}, {vl} : index"));
            let len = b.assign(format!("arith.muli {count}, {vl} : index"));
            b.assign(format!("arith.addi {from}, {len} : index"))
        };
        let ow = b.fresh("ow");
        b.open(format!("scf.for {ow} = {from} to {end} step {vl}"));
        // Lane l is column ow + l; a masked run keeps the lanes before `to`.
        let lane_ids: Vec<String> = (0..lanes).map(|l| l.to_string()).collect();
        let lane = b.assign(format!("arith.constant dense<[{}]> : {ity}", lane_ids.join(", ")));
        let columns = b.assign(format!("vector.broadcast {ow} : index to {ity}"));
        let columns = b.assign(format!("arith.addi {columns}, {lane} : {ity}"));
        let strided = if stride[1] == 1 {
            columns.clone()
        } else {
            let st = b.assign(format!("arith.constant dense<{}> : {ity}", stride[1]));
            b.assign(format!("arith.muli {columns}, {st} : {ity}"))
        };
        let keep = if masked {
            let tv = b.assign(format!("vector.broadcast {to} : index to {ity}"));
            Some(b.assign(format!("arith.cmpi ult, {columns}, {tv} : {ity}")))
        } else {
            None
        };
        // The channels a convolution sums over (its group's) and where they start; a pool
        // reads each result channel's own.
        let (cbase, cg) = match self.op {
            RowOp::Conv { groups, w_shape } => {
                let per_group = b.index(w_shape[0] / groups.max(1));
                let g = b.assign(format!("arith.divui {}, {per_group} : index", self.channels[0]));
                let cgc = b.index(w_shape[1]);
                (Some(b.assign(format!("arith.muli {g}, {cgc} : index"))), w_shape[1])
            }
            RowOp::Pool(_) => (None, 1),
        };
        let pad = b.index(padding[1]);
        // A whole vector's rows start at the column of its leftmost tap; gathers address
        // columns from the row's start.
        let first = if masked { c0.clone() } else { b.assign(format!("arith.subi {ow}, {pad} : index")) };
        let fill = b.float(init, &vty);
        let zero = b.float(0.0, &vty);
        let one = b.float(1.0, &vty);
        let (h, w) = (self.reads.extent(b, 0), self.reads.extent(b, 1));
        let nkh = b.index(kh);
        let ncg = b.index(cg);
        // Rows of taps (ky) outside, channels inside: one bounds check per row of taps.
        let y = b.fresh("ky");
        let (lhs, totals) = results(b, "sy", carried);
        let accs: Vec<String> = (0..carried).map(|_| b.fresh("ay")).collect();
        let starts: Vec<String> = accs
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{a} = {}", if i < block { &fill } else { &zero }))
            .collect();
        b.open(format!(
            "{lhs} = scf.for {y} = {c0} to {nkh} step {c1} iter_args({}) -> ({vector_types})",
            starts.join(", ")
        ));
        let (ok_h, ih) = tap(b, self.oh, &y, (stride[0], dilation[0], padding[0]), &h);
        let (if_lhs, inside) = results(b, "in", carried);
        b.open(format!("{if_lhs} = scf.if {ok_h} -> ({vector_types})"));
        let c = b.fresh("c");
        let (for_lhs, over_c) = results(b, "sc", carried);
        let partial: Vec<String> = (0..carried).map(|_| b.fresh("ac")).collect();
        let pairs: Vec<String> = partial.iter().zip(&accs).map(|(p, a)| format!("{p} = {a}")).collect();
        b.open(format!(
            "{for_lhs} = scf.for {c} = {c0} to {ncg} step {c1} iter_args({}) -> ({vector_types})",
            pairs.join(", ")
        ));
        let (xarg, xview) = self.reads.buffer(0);
        let (xarg, xmem) = (xarg.to_string(), xview.memref());
        // Where the rows read start: the convolution's channel, or each pooled channel.
        let rows: Vec<String> = match &cbase {
            Some(cbase) => {
                let ci = b.assign(format!("arith.addi {cbase}, {c} : index"));
                vec![self.reads.address(b, 0, &[self.n.to_string(), ci, ih.clone(), first.clone()])]
            }
            None => self
                .channels
                .iter()
                .map(|o| {
                    self.reads.address(b, 0, &[self.n.to_string(), o.clone(), ih.clone(), first.clone()])
                })
                .collect(),
        };
        let mut sums = partial.clone();
        for x in 0..kw {
            let shift = b.index(x * dilation[1]);
            // The lanes this tap reads, with the columns they read (masked runs only).
            let lanes_in = keep.as_ref().map(|keep| {
                // Column `(ow + l)·stride + x·dilation − pad` of the row, where it lies inside.
                let sv = b.assign(format!("vector.broadcast {shift} : index to {ity}"));
                let pos = b.assign(format!("arith.addi {strided}, {sv} : {ity}"));
                let pv = b.assign(format!("vector.broadcast {pad} : index to {ity}"));
                let after = b.assign(format!("arith.cmpi uge, {pos}, {pv} : {ity}"));
                let col = b.assign(format!("arith.subi {pos}, {pv} : {ity}"));
                let wv = b.assign(format!("vector.broadcast {w} : index to {ity}"));
                let before = b.assign(format!("arith.cmpi ult, {col}, {wv} : {ity}"));
                let ok = b.assign(format!("arith.andi {after}, {before} : {mty}"));
                let ok = b.assign(format!("arith.andi {ok}, {keep} : {mty}"));
                let zi = b.assign(format!("arith.constant dense<0> : {ity}"));
                let col = b.assign(format!("arith.select {ok}, {col}, {zi} : {mty}, {ity}"));
                (ok, col)
            });
            // A row's vector at this tap; lanes left out read `fill`.
            let read = |b: &mut Body, start: &str| {
                match &lanes_in {
                None => {
                    let at = b.assign(format!("arith.addi {start}, {shift} : index"));
                    b.assign(format!("vector.load {xarg}[{at}] : {xmem}, {vty}"))
                }
                Some((ok, col)) => b.assign(format!(
                    "vector.gather {xarg}[{start}][{col}], {ok}, {fill} : {xmem}, {ity}, {mty}, {vty} into {vty}"
                )),
            }
            };
            match self.op {
                RowOp::Conv { .. } => {
                    let xv = read(b, &rows[0]);
                    let xc = b.index(x);
                    for (j, o) in self.channels.iter().enumerate() {
                        let wv = self.reads.load(b, 1, &[o.clone(), c.clone(), y.clone(), xc.clone()]);
                        let ws = b.splat(&wv, &vty);
                        sums[j] = b.fma(&xv, &ws, &sums[j], &vty);
                    }
                }
                RowOp::Pool(kind) => {
                    for (j, start) in rows.iter().enumerate() {
                        let xv = read(b, start);
                        sums[j] = match kind {
                            PoolKind::Max => b.fmax(&sums[j], &xv, &vty),
                            PoolKind::Avg => b.fadd(&sums[j], &xv, &vty),
                        };
                        if kind == PoolKind::Avg {
                            let counted = match &lanes_in {
                                None => one.clone(),
                                Some((ok, _)) => b.select(ok, &one, &zero, &vty),
                            };
                            sums[block + j] = b.fadd(&sums[block + j], &counted, &vty);
                        }
                    }
                }
            }
        }
        b.line(format!("scf.yield {} : {vector_types}", sums.join(", ")));
        b.close("");
        b.line(format!("scf.yield {} : {vector_types}", over_c.join(", ")));
        b.close("");
        b.open("else");
        b.line(format!("scf.yield {} : {vector_types}", accs.join(", ")));
        b.close("");
        b.line(format!("scf.yield {} : {vector_types}", inside.join(", ")));
        b.close("");
        let out = self.op.out_operand();
        let (oarg, oview) = self.reads.buffer(out);
        let (oarg, omem) = (oarg.to_string(), oview.memref());
        for (j, o) in self.channels.iter().enumerate() {
            let v = match self.op {
                RowOp::Pool(PoolKind::Avg) => b.fdiv(&totals[j], &totals[block + j], &vty),
                RowOp::Conv { .. } | RowOp::Pool(PoolKind::Max) => totals[j].clone(),
            };
            let at =
                self.reads.address(b, out, &[self.n.to_string(), o.clone(), self.oh.to_string(), ow.clone()]);
            match &keep {
                None => b.line(format!("vector.store {v}, {oarg}[{at}] : {omem}, {vty}")),
                Some(keep) => {
                    b.line(format!("vector.maskedstore {oarg}[{at}], {keep}, {v} : {omem}, {mty}, {vty}"))
                }
            }
        }
        b.close("");
        end
    }
}
