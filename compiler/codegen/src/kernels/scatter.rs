//! Scatter-add (a gather's adjoint, the table gradient of an embedding): `out = 0`, then
//! `out[p, idx[q], c] += updates[p, q, c]` for each position `q` in order.
//!
//! Each output column `(p, c)` is owned by one iteration, which zeroes it and then adds its
//! updates position by position, so every element sums in the interpreter's order whatever
//! the thread count, with no atomics. On the CPU an iteration owns a block of [`BLOCK`]
//! neighbouring columns, so the innermost loop runs along contiguous memory and vectorizes;
//! the GPU emitter (`gpu::scatter`) gives each invocation one column with the same code.

use super::elementwise::{constant, load, reg_type, store};
use super::rows::wrap;
use super::View;
use crate::mlir_text::Body;
use crate::{CodegenError, Kernel};
use kiln_ir::DType;

/// Columns per range iteration on the CPU.
const BLOCK: usize = 64;

/// The columns one iteration (or invocation) walks: `lo..hi`, or exactly one.
pub(crate) enum Columns<'s> {
    Range(&'s str, &'s str),
    One(&'s str),
}

/// Refuses what the emitters cannot scatter, and returns the sizes `(pre, positions, post)`.
/// `updates` is `[pre, positions, post]`, `indices` `[positions]`, `out` `[pre, extent,
/// post]` (`crate::program::scatter_views`).
pub(crate) fn check(
    updates: &View,
    indices: &View,
    out: &View,
) -> Result<(usize, usize, usize), CodegenError> {
    if !indices.dtype.is_int() {
        return Err(CodegenError::Unsupported(format!("scatter_add with {} indices", indices.dtype)));
    }
    if out.dtype == DType::Bool {
        return Err(CodegenError::Unsupported("scatter_add of bool".into()));
    }
    match (updates.shape.as_slice(), indices.shape.as_slice(), out.shape.as_slice()) {
        ([pre, n, post], [m], [pre2, _, post2]) if n == m && pre == pre2 && post == post2 => {
            Ok((*pre, *n, *post))
        }
        _ => Err(crate::program::bad("scatter_add views")),
    }
}

/// Zeroes column(s) `cols` of row block `p` of `out` (argument `%a2`), then adds the updates
/// (`%a0`) of every position in order into the row its index (`%a1`) names, clamped into the
/// table (compiled code cannot report an index out of range; the runtime checks input
/// indices, as for a gather). The caller checked the operands with [`check`].
pub(crate) fn scatter_columns(
    b: &mut Body,
    updates: &View,
    indices: &View,
    out: &View,
    p: &str,
    cols: &Columns,
) {
    let extent = out.shape[1];
    let c0 = b.index(0);
    let c1 = b.index(1);
    let out_base = step(b, out.offset, p, out.strides[0]);
    let upd_base = step(b, updates.offset, p, updates.strides[0]);
    let zero = constant(b, 0.0, out.dtype);
    let rows = b.index(extent);
    let row = b.fresh("row");
    b.open(format!("scf.for {row} = {c0} to {rows} step {c1}"));
    let row_at = add_scaled(b, &out_base, &row, out.strides[1]);
    let c = open_columns(b, cols);
    let at = add_scaled(b, &row_at, &c, out.strides[2]);
    store(b, &zero, "%a2", out, &at);
    close_columns(b, cols);
    b.close("");
    if extent == 0 {
        return;
    }
    let positions = b.index(indices.shape[0]);
    let q = b.fresh("q");
    b.open(format!("scf.for {q} = {c0} to {positions} step {c1}"));
    let at_i = step(b, indices.offset, &q, indices.strides[0]);
    let raw = load(b, "%a1", indices, &at_i);
    let ity = reg_type(indices.dtype);
    let lo = b.int(0, ity);
    let hi = b.int(extent as i64 - 1, ity);
    let clamped = b.assign(format!("arith.maxsi {raw}, {lo} : {ity}"));
    let clamped = b.assign(format!("arith.minsi {clamped}, {hi} : {ity}"));
    let target = b.assign(format!("arith.index_cast {clamped} : {ity} to index"));
    let out_row = add_scaled(b, &out_base, &target, out.strides[1]);
    let upd_row = add_scaled(b, &upd_base, &q, updates.strides[1]);
    let c = open_columns(b, cols);
    let at_o = add_scaled(b, &out_row, &c, out.strides[2]);
    let at_u = add_scaled(b, &upd_row, &c, updates.strides[2]);
    let acc = load(b, "%a2", out, &at_o);
    let u = load(b, "%a0", updates, &at_u);
    let ty = reg_type(out.dtype);
    let sum = if out.dtype.is_float() {
        // No fast-math flags: the additions happen one by one, in position order.
        b.assign(format!("arith.addf {acc}, {u} : {ty}"))
    } else {
        b.assign(format!("arith.addi {acc}, {u} : {ty}"))
    };
    store(b, &sum, "%a2", out, &at_o);
    close_columns(b, cols);
    b.close("");
}

/// `offset + i·stride` as an index value.
fn step(b: &mut Body, offset: usize, i: &str, stride: usize) -> String {
    let base = b.index(offset);
    add_scaled(b, &base, i, stride)
}

/// `base + i·stride`.
fn add_scaled(b: &mut Body, base: &str, i: &str, stride: usize) -> String {
    match stride {
        0 => base.to_string(),
        1 => b.assign(format!("arith.addi {base}, {i} : index")),
        s => {
            let k = b.index(s);
            let t = b.assign(format!("arith.muli {i}, {k} : index"));
            b.assign(format!("arith.addi {base}, {t} : index"))
        }
    }
}

fn open_columns(b: &mut Body, cols: &Columns) -> String {
    match cols {
        Columns::Range(lo, hi) => {
            let c = b.fresh("c");
            let c1 = b.index(1);
            b.open(format!("scf.for {c} = {lo} to {hi} step {c1}"));
            c
        }
        Columns::One(c) => c.to_string(),
    }
}

fn close_columns(b: &mut Body, cols: &Columns) {
    match cols {
        Columns::Range(..) => b.close(""),
        Columns::One(_) => {}
    }
}

/// `out = scatter_add(updates, indices)` over views `[pre, positions, post]`, `[positions]`
/// and `[pre, extent, post]`: the range walks (row block, column block) pairs of
/// [`BLOCK`] columns. Arguments: updates, indices, out.
pub fn emit(symbol: &str, updates: &View, indices: &View, out: &View) -> Result<Kernel, CodegenError> {
    let (pre, n, post) = check(updates, indices, out)?;
    let blocks = post.div_ceil(BLOCK);
    let range = if out.numel() == 0 { 1 } else { pre * blocks };
    let mut b = Body::new();
    if out.numel() > 0 {
        let c1 = b.index(1);
        b.open(format!("scf.for %r = %begin to %end step {c1}"));
        let nb = b.index(blocks);
        let p = b.assign(format!("arith.divui %r, {nb} : index"));
        let blk = b.assign(format!("arith.remui %r, {nb} : index"));
        let w = b.index(BLOCK);
        let lo = b.assign(format!("arith.muli {blk}, {w} : index"));
        let end = b.assign(format!("arith.addi {lo}, {w} : index"));
        let last = b.index(post);
        let hi = b.assign(format!("arith.minui {end}, {last} : index"));
        scatter_columns(&mut b, updates, indices, out, &p, &Columns::Range(&lo, &hi));
        b.close("");
    }
    b.line("return");
    let size = out.dtype.size_bytes();
    let bytes = ((out.numel() + 3 * pre * n * post) * size + n * indices.dtype.size_bytes()) as u64;
    Ok(Kernel {
        symbol: symbol.into(),
        mlir: wrap(symbol, &[updates.memref(), indices.memref(), out.memref()], b),
        range,
        grain: Kernel::grain_for(range, bytes),
        flops: (pre * n * post) as u64,
        bytes,
    })
}
