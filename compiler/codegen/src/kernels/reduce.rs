//! Reductions (sum, mean, max, min) over any set of axes.
//!
//! The range walks output elements; reduced axes become nested loops carrying the accumulator,
//! innermost the reduced axis with the smallest stride. Float sums allow reassociation, so LLVM
//! vectorizes a contiguous innermost reduction.

use super::elementwise::{constant, load, reg_type, store};
use super::rows::wrap;
use super::View;
use crate::mlir_text::Body;
use crate::{CodegenError, Kernel};
use kiln_ir::{DType, ReduceOp};

/// `out = reduce(x, axes)`; `out` has the kept axes (with or without extent-1 placeholders).
/// Arguments: x, out.
pub fn emit(
    symbol: &str,
    op: ReduceOp,
    axes: &[usize],
    x: &View,
    out: &View,
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
    let init = match op {
        ReduceOp::Sum | ReduceOp::Mean => constant(b, 0.0, dtype),
        ReduceOp::Max if dtype.is_float() => b.float(f64::NEG_INFINITY, ty),
        ReduceOp::Min if dtype.is_float() => b.float(f64::INFINITY, ty),
        ReduceOp::Max => b.int(if ty == "i32" { i32::MIN as i64 } else { i64::MIN }, ty),
        ReduceOp::Min => b.int(if ty == "i32" { i32::MAX as i64 } else { i64::MAX }, ty),
    };
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
    let next = match (op, dtype.is_float()) {
        (ReduceOp::Sum | ReduceOp::Mean, true) => {
            b.assign(format!("arith.addf {acc}, {v} fastmath<reassoc,contract> : {ty}"))
        }
        (ReduceOp::Max, true) => b.fmax(&acc, &v, ty),
        (ReduceOp::Min, true) => b.fmin(&acc, &v, ty),
        (ReduceOp::Sum | ReduceOp::Mean, false) => b.assign(format!("arith.addi {acc}, {v} : {ty}")),
        (ReduceOp::Max, false) => b.assign(format!("arith.maxsi {acc}, {v} : {ty}")),
        (ReduceOp::Min, false) => b.assign(format!("arith.minsi {acc}, {v} : {ty}")),
    };
    let mut value = next;
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
