//! Scatter-add on a GPU: one invocation per output column `(p, c)`, which zeroes the column
//! and adds its updates position by position, with the CPU emitter's per-column code
//! (`kernels::scatter::scatter_columns`). Each element has one writer and a fixed order of
//! additions, so the result is the CPU's and the interpreter's, with no float atomics.

use super::plan::GpuPlan;
use super::skeleton::{module, open_below, workgroup_number};
use super::{GpuCtx, GpuKernel};
use crate::kernels::scatter::{check, scatter_columns, Columns};
use crate::kernels::View;
use crate::CodegenError;

/// `out = scatter_add(updates, indices)` over views `[pre, positions, post]`, `[positions]`
/// and `[pre, extent, post]`. Arguments: updates, indices, out.
pub fn emit(
    symbol: &str,
    updates: &View,
    indices: &View,
    out: &View,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let (pre, n, post) = check(updates, indices, out)?;
    let columns = pre * post;
    let plan = GpuPlan::columns(columns, out.shape[1], n, cx.caps)?;
    let mut b = cx.body();
    let wg = workgroup_number(&mut b, &plan);
    let tid = b.assign("gpu.thread_id x");
    let g = b.index(plan.launch.workgroup[0] as usize);
    let base = b.assign(format!("arith.muli {wg}, {g} : index"));
    let i = b.assign(format!("arith.addi {base}, {tid} : index"));
    open_below(&mut b, &i, columns);
    let width = b.index(post.max(1));
    let p = b.assign(format!("arith.divui {i}, {width} : index"));
    let c = b.assign(format!("arith.remui {i}, {width} : index"));
    scatter_columns(&mut b, updates, indices, out, &p, &Columns::One(&c));
    b.close("");
    let size = out.dtype.size_bytes();
    let bytes = ((out.numel() + 3 * pre * n * post) * size + n * indices.dtype.size_bytes()) as u64;
    let memrefs = [updates.memref(), indices.memref(), out.memref()];
    Ok(GpuKernel {
        symbol: symbol.into(),
        mlir: module(symbol, &memrefs, &plan, b)?,
        plan,
        flops: (pre * n * post) as u64,
        bytes,
        run_grid: None,
    })
}
