//! Reductions (sum, mean, max, min) over any set of axes.
//!
//! The range walks output elements; reduced axes become nested loops carrying the accumulator,
//! innermost the reduced axis with the smallest stride. Float sums allow reassociation, so LLVM
//! vectorizes a contiguous innermost reduction.
//!
//! A float reduction that keeps a contiguous last axis (a bias gradient, the sum of
//! `[rows, columns]` over its rows) takes the [`Columns`] plan instead: per element, the loop
//! above would walk one column at the row stride, a cache line per element.

use super::elementwise::{constant, load, reg_type, store};
use super::norm::{self, for_close, for_open, ComputeType, Count, Operand, Part};
use super::rows::wrap;
use super::View;
use crate::mlir_text::{bool_type_like, Body};
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{DType, ReduceOp};

/// `out = reduce(x, axes)`; `out` has the kept axes (with or without extent-1 placeholders).
/// Arguments: x, out.
pub fn emit(
    symbol: &str,
    op: ReduceOp,
    axes: &[usize],
    x: &View,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let dtype = x.dtype;
    if dtype == DType::Bool {
        return Err(CodegenError::Unsupported(format!("{op:?} reduction of bool")));
    }
    if !dtype.is_float() && op == ReduceOp::Mean {
        return Err(CodegenError::Unsupported(format!("mean of {dtype}")));
    }
    if !out.is_dense() {
        return Err(CodegenError::Unsupported("a reduction into a strided output".into()));
    }
    let n_out: usize = (0..x.rank()).filter(|a| !axes.contains(a)).map(|a| x.shape[a]).product();
    if let Some(plan) = Columns::choose(axes, x, target) {
        return plan.emit(symbol, op, axes, x, out, n_out, target);
    }

    let mut b = Body::new();
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let value = reduce_at(&mut b, op, axes, x, "%r");
    let out_idx = out.leading_offset_expr(&mut b, "%r", 0);
    let out_at = b.assign(format!("arith.addi {out_idx}, %r : index"));
    store(&mut b, &value, "%a1", out, &out_at);
    b.close("");
    b.line("return");
    let mlir = wrap(symbol, &[x.memref(), out.memref()], b);
    let bytes = ((x.numel() + n_out) * dtype.size_bytes()) as u64;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir,
        range: n_out.max(1),
        grain: Kernel::grain_for(n_out.max(1), bytes),
        flops: x.numel() as u64,
        bytes,
    })
}

/// The reduction of `x` (argument `%a0`) over `axes` for output element `r` (its row-major
/// number over the kept axes): nested loops over the reduced axes carrying the accumulator,
/// innermost the one with the smallest stride. The caller checked the dtype.
pub(crate) fn reduce_at(b: &mut Body, op: ReduceOp, axes: &[usize], x: &View, r: &str) -> String {
    let dtype = x.dtype;
    let kept: Vec<usize> = (0..x.rank()).filter(|a| !axes.contains(a)).collect();
    let mut reduced: Vec<usize> = axes.to_vec();
    reduced.sort_by_key(|&a| std::cmp::Reverse(x.strides[a]));
    let count: usize = axes.iter().map(|&a| x.shape[a]).product();
    let ty = reg_type(dtype);
    let c0 = b.index(0);
    let c1 = b.index(1);
    // Base offset of x at the kept indices; out is addressed by its flat row-major position.
    let mut rem = r.to_string();
    let mut base = b.index(x.offset);
    for (i, &a) in kept.iter().enumerate().rev() {
        let d = b.index(x.shape[a]);
        let idx = if i == 0 { rem.clone() } else { b.assign(format!("arith.remui {rem}, {d} : index")) };
        let s = b.index(x.strides[a]);
        let t = b.assign(format!("arith.muli {idx}, {s} : index"));
        base = b.assign(format!("arith.addi {base}, {t} : index"));
        if i > 0 {
            rem = b.assign(format!("arith.divui {rem}, {d} : index"));
        }
    }
    let init = identity(b, op, dtype);
    // Nested loops over the reduced axes, each carrying the accumulator.
    let mut offsets = vec![base];
    let mut accs = Vec::new();
    for (level, &a) in reduced.iter().enumerate() {
        let n = b.index(x.shape[a]);
        let acc_in = if level == 0 { init.clone() } else { format!("%acc{}", level - 1) };
        let res = b.fresh("red");
        b.open(format!(
            "{res} = scf.for %i{level} = {c0} to {n} step {c1} iter_args(%acc{level} = {acc_in}) -> ({ty})"
        ));
        let s = b.index(x.strides[a]);
        let t = b.assign(format!("arith.muli %i{level}, {s} : index"));
        let prev = offsets.last().cloned().unwrap_or_default();
        offsets.push(b.assign(format!("arith.addi {prev}, {t} : index")));
        accs.push(res);
    }
    let at = offsets.last().cloned().unwrap_or_default();
    let v = load(b, "%a0", x, &at);
    let acc = if reduced.is_empty() { init.clone() } else { format!("%acc{}", reduced.len() - 1) };
    let mut value = combine(b, op, dtype, &acc, &v);
    for level in (0..reduced.len()).rev() {
        b.line(format!("scf.yield {value} : {ty}"));
        b.close("");
        value = accs[level].clone();
    }
    if op == ReduceOp::Mean {
        let n = b.float(count as f64, ty);
        value = b.fdiv(&value, &n, ty);
    }
    value
}

/// The accumulator's start for `op` over `dtype`, in its register type: 0, or the extreme
/// value every element replaces.
pub(crate) fn identity(b: &mut Body, op: ReduceOp, dtype: DType) -> String {
    let ty = reg_type(dtype);
    match op {
        ReduceOp::Sum | ReduceOp::Mean => constant(b, 0.0, dtype),
        ReduceOp::Max if dtype.is_float() => b.float(f64::NEG_INFINITY, ty),
        ReduceOp::Min if dtype.is_float() => b.float(f64::INFINITY, ty),
        ReduceOp::Max => b.int(if ty == "i32" { i32::MIN as i64 } else { i64::MIN }, ty),
        ReduceOp::Min => b.int(if ty == "i32" { i32::MAX as i64 } else { i64::MAX }, ty),
    }
}

/// `count` (an `index` value: a run-time element count) as a float of type `ty`.
pub(crate) fn count_as(b: &mut Body, count: &str, ty: &str) -> String {
    let n = b.assign(format!("arith.index_castui {count} : index to i32"));
    b.assign(format!("arith.uitofp {n} : i32 to {ty}"))
}

/// `acc` combined with element `v` (both in `dtype`'s register type); float sums may
/// reassociate, float extremes propagate NaN.
pub(crate) fn combine(b: &mut Body, op: ReduceOp, dtype: DType, acc: &str, v: &str) -> String {
    let ty = reg_type(dtype);
    match (op, dtype.is_float()) {
        (ReduceOp::Sum | ReduceOp::Mean, true) => {
            b.assign(format!("arith.addf {acc}, {v} fastmath<reassoc,contract> : {ty}"))
        }
        (ReduceOp::Max, true) => b.fmax(acc, v, ty),
        (ReduceOp::Min, true) => b.fmin(acc, v, ty),
        (ReduceOp::Sum | ReduceOp::Mean, false) => b.assign(format!("arith.addi {acc}, {v} : {ty}")),
        (ReduceOp::Max, false) => b.assign(format!("arith.maxsi {acc}, {v} : {ty}")),
        (ReduceOp::Min, false) => b.assign(format!("arith.minsi {acc}, {v} : {ty}")),
    }
}

/// The plan of a reduction that keeps its contiguous last axis: each range iteration owns a
/// block of `vectors × lanes` adjacent output columns (of one index of the other kept axes),
/// carries one accumulator vector per `lanes` columns through the loops over the reduced axes,
/// and stores them once. Every load is a unit-stride vector of one row; the last block of a
/// row that is not whole is read and written under lane masks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    /// Lanes per vector (the target's register width in the element type).
    pub lanes: usize,
    /// Accumulator vectors per block: enough independent additions to hide their latency.
    pub vectors: usize,
}

/// Where a row of columns ends for the block at hand: `left` (an `index` value) columns are
/// left from its first; `whole` when every block of the row is whole (no masks needed).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ends<'a> {
    pub left: &'a str,
    pub whole: bool,
}

impl Columns {
    /// Accumulators per block at most.
    const VECTORS: usize = 4;

    /// The plan for reducing `x` over `axes` on `target`, when it applies: a float dtype, at
    /// least one reduced axis, and a kept last axis of stride 1 with two or more columns.
    pub fn choose(axes: &[usize], x: &View, target: &dyn Target) -> Option<Columns> {
        let last = x.rank().checked_sub(1)?;
        let columns = x.shape[last];
        let reduces = axes.iter().any(|&a| x.shape[a] > 1);
        if !matches!(x.dtype, DType::F32 | DType::F64) || !reduces || axes.contains(&last) {
            return None;
        }
        if x.strides[last] != 1 || columns < 2 {
            return None;
        }
        let lanes = ComputeType::of(&[x], target, "reduction").ok()?.lanes;
        Some(Columns { lanes, vectors: columns.div_ceil(lanes).clamp(1, Self::VECTORS) })
    }

    /// Columns per block.
    pub fn width(&self) -> usize {
        self.lanes * self.vectors
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        symbol: &str,
        op: ReduceOp,
        axes: &[usize],
        x: &View,
        out: &View,
        n_out: usize,
        target: &dyn Target,
    ) -> Result<Kernel, CodegenError> {
        let ct = ComputeType::of(&[x, out], target, "reduction")?;
        let vty = format!("vector<{}x{}>", self.lanes, ct.elem);
        let last = x.rank() - 1;
        let columns = x.shape[last];
        let width = self.width();
        let blocks = columns.div_ceil(width);
        let outer: Vec<usize> = (0..last).filter(|a| !axes.contains(a)).collect();
        let mut reduced: Vec<usize> = axes.iter().copied().filter(|&a| x.shape[a] > 1).collect();
        reduced.sort_by_key(|&a| std::cmp::Reverse(x.strides[a]));
        let count: usize = axes.iter().map(|&a| x.shape[a]).product();
        let xo = Operand::new("%a0", x);
        let oo =
            Operand { name: "%a1".into(), memref: out.memref(), shape: vec![], strides: vec![], offset: 0 };

        let mut b = Body::new();
        b.line(format!(
            "// plan: columns of {columns} in {blocks} block(s) of {} × {} lanes",
            self.vectors, self.lanes
        ));
        let it = norm::open_range(&mut b);
        let nb = b.index(blocks);
        let row = b.assign(format!("arith.divui {it}, {nb} : index"));
        let blk = b.assign(format!("arith.remui {it}, {nb} : index"));
        let w = b.index(width);
        let c0 = b.assign(format!("arith.muli {blk}, {w} : index"));
        // x's offset at this index of the outer kept axes, and the block's first column.
        let dims: Vec<usize> = outer.iter().map(|&a| x.shape[a]).collect();
        let outer_x = Operand {
            strides: outer.iter().map(|&a| x.strides[a]).collect(),
            shape: dims.clone(),
            ..xo.clone()
        };
        let at = norm::offsets(&mut b, &row, &dims, &[&outer_x]);
        let xbase = b.assign(format!("arith.addi {}, {c0} : index", at.offsets[0]));
        let ncols = b.index(columns);
        let orow = norm::scale(&mut b, &row, columns);
        let ooff = b.index(out.offset);
        let obase = b.assign(format!("arith.addi {ooff}, {orow} : index"));
        let obase = b.assign(format!("arith.addi {obase}, {c0} : index"));
        let left = b.assign(format!("arith.subi {ncols}, {c0} : index"));
        let loops: Vec<(String, String)> =
            reduced.iter().map(|&a| (b.index(x.shape[a]), b.index(x.strides[a]))).collect();
        let divisor = (op == ReduceOp::Mean).then(|| b.float(count as f64, &vty));
        let ends = Ends { left: &left, whole: columns.is_multiple_of(width) };
        self.row_block(&mut b, op, (&xo, &oo), (&xbase, &obase), ends, &loops, divisor.as_deref(), &vty);
        norm::close_range(&mut b);
        let mlir = norm::func_text(symbol, &[xo, oo], b);
        let range = n_out.div_ceil(columns) * blocks;
        let bytes = ((x.numel() + n_out) * x.dtype.size_bytes()) as u64;
        Ok(Kernel {
            symbol: symbol.into(),
            mlir,
            range,
            grain: Kernel::grain_for(range, bytes),
            flops: x.numel() as u64,
            bytes,
        })
    }

    /// The block of columns from `xbase` (x) and `obase` (out): whole where at least a block's
    /// columns are left in the row, under lane masks where fewer are.
    #[allow(clippy::too_many_arguments)]
    fn row_block(
        &self,
        b: &mut Body,
        op: ReduceOp,
        (x, out): (&Operand, &Operand),
        (xbase, obase): (&str, &str),
        ends: Ends,
        loops: &[(String, String)],
        divisor: Option<&str>,
        vty: &str,
    ) {
        if ends.whole {
            self.block(b, op, x, out, xbase, obase, loops, divisor, vty, None);
            return;
        }
        let w = b.index(self.width());
        let whole = b.assign(format!("arith.cmpi uge, {}, {w} : index", ends.left));
        b.open(format!("scf.if {whole}"));
        self.block(b, op, x, out, xbase, obase, loops, divisor, vty, None);
        b.close("");
        b.open("else");
        self.block(b, op, x, out, xbase, obase, loops, divisor, vty, Some(ends.left));
        b.close("");
    }

    /// [`Columns::row_block`] for a kernel over run-time sizes: x and out are `%a0` and `%a1`
    /// (buffers `xv`, `ov`, addressed from `xbase` and `obase`), `loops` the reduced axes'
    /// extents and strides as `index` values (outermost first), `count` the elements reduced
    /// per column (an `index` value, read by a mean).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn emit_row_block(
        &self,
        b: &mut Body,
        op: ReduceOp,
        (xv, ov): (&View, &View),
        (xbase, obase): (&str, &str),
        ends: Ends,
        loops: &[(String, String)],
        count: &str,
        target: &dyn Target,
    ) -> Result<(), CodegenError> {
        let ct = ComputeType::of(&[xv, ov], target, "reduction")?;
        let vty = format!("vector<{}x{}>", self.lanes, ct.elem);
        let (xo, oo) = (Operand::new("%a0", xv), Operand::new("%a1", ov));
        let divisor = (op == ReduceOp::Mean).then(|| {
            let f = count_as(b, count, ct.elem);
            b.splat(&f, &vty)
        });
        self.row_block(b, op, (&xo, &oo), (xbase, obase), ends, loops, divisor.as_deref(), &vty);
        Ok(())
    }

    /// One block of columns from `xbase` (x) and `obase` (out); `left`, the columns left in the
    /// row, when the block is the partial last one.
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        b: &mut Body,
        op: ReduceOp,
        x: &Operand,
        out: &Operand,
        xbase: &str,
        obase: &str,
        loops: &[(String, String)],
        divisor: Option<&str>,
        vty: &str,
        left: Option<&str>,
    ) {
        let (pad, float) = match op {
            ReduceOp::Sum | ReduceOp::Mean => (0.0, "addf"),
            ReduceOp::Max => (f64::NEG_INFINITY, "maximumf"),
            ReduceOp::Min => (f64::INFINITY, "minimumf"),
        };
        // Lanes valid in vector v of a partial block: clamp(left − v·lanes, 0, lanes).
        let parts: Vec<Option<(String, String)>> = (0..self.vectors)
            .map(|v| {
                left.map(|left| {
                    let (zero, full) = (b.index(0), b.index(self.lanes));
                    let before = b.index(v * self.lanes);
                    let n = b.assign(format!("arith.subi {left}, {before} : index"));
                    let n = b.assign(format!("arith.maxsi {n}, {zero} : index"));
                    let n = b.assign(format!("arith.minsi {n}, {full} : index"));
                    let mask = b.assign(format!("vector.create_mask {n} : {}", bool_type_like(vty)));
                    (mask, n)
                })
            })
            .collect();
        let part = |v: usize| parts[v].as_ref().map(|(mask, n)| Part { mask, count: Count::Dynamic(n) });
        let init = b.float(pad, vty);
        let inits: Vec<(String, String)> =
            (0..self.vectors).map(|_| (init.clone(), vty.to_string())).collect();
        let (c0, c1) = (b.index(0), b.index(1));
        let mut offset = xbase.to_string();
        let mut opened = Vec::new();
        let mut accs: Vec<String> = inits.iter().map(|(v, _)| v.clone()).collect();
        for (n, stride) in loops {
            let carried: Vec<(String, String)> = accs.iter().map(|v| (v.clone(), vty.to_string())).collect();
            let (iv, args, results) = for_open(b, &c0, n, &c1, &carried);
            let t = b.assign(format!("arith.muli {iv}, {stride} : index"));
            offset = b.assign(format!("arith.addi {offset}, {t} : index"));
            accs = args;
            opened.push(results);
        }
        let mut next = Vec::with_capacity(self.vectors);
        for (v, acc) in accs.iter().enumerate() {
            let lane0 = b.index(v * self.lanes);
            let at = b.assign(format!("arith.addi {offset}, {lane0} : index"));
            let value = norm::load(b, x, &at, 1, vty, part(v).as_ref(), pad);
            next.push(match op {
                ReduceOp::Sum | ReduceOp::Mean => b.fadd(acc, &value, vty),
                ReduceOp::Max | ReduceOp::Min => b.assign(format!("arith.{float} {acc}, {value} : {vty}")),
            });
        }
        let mut sums = next;
        for results in opened.into_iter().rev() {
            for_close(b, &sums, &inits);
            sums = results;
        }
        for (v, sum) in sums.iter().enumerate() {
            let value = match divisor {
                Some(n) => b.fdiv(sum, n, vty),
                None => sum.clone(),
            };
            let lane0 = b.index(v * self.lanes);
            let at = b.assign(format!("arith.addi {obase}, {lane0} : index"));
            norm::store(b, &value, out, &at, 1, vty, part(v).as_ref());
        }
    }
}
