//! Kernels with one invocation per output element: fused elementwise groups, and the data
//! movement, convolution, pooling and reduction kernels whose per-element code the CPU
//! emitters share (`kernels::data`, `kernels::conv`, `kernels::reduce`); only the iteration
//! differs, a loop nest there and the invocation number here.

use super::plan::GpuPlan;
use super::skeleton::{module, unravel, workgroup_number};
use super::{GpuCtx, GpuKernel};
use crate::kernels::elementwise::{coalesce, eval, store, Ctx, FaultSlot};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::CodegenError;
use kiln_sched::Expr;

/// The invocation's element number, under an `scf.if` that skips numbers past `count` (at
/// the run's rows in row form; close with `b.close("")`).
pub(super) fn open_element(
    b: &mut Body,
    plan: &GpuPlan,
    count: usize,
    cx: &GpuCtx,
) -> Result<String, CodegenError> {
    let wg = workgroup_number(b, plan);
    let tid = b.assign("gpu.thread_id x");
    let g = b.index(plan.launch.workgroup[0] as usize);
    let base = b.assign(format!("arith.muli {wg}, {g} : index"));
    let i = b.assign(format!("arith.addi {base}, {tid} : index"));
    let n = cx.count_value(b, count)?;
    let ok = b.assign(format!("arith.cmpi ult, {i}, {n} : index"));
    b.open(format!("scf.if {ok}"));
    Ok(i)
}

/// A one-invocation-per-element plan's grid at the run's rows (row form), else `None`.
fn element_grid(
    plan: &GpuPlan,
    count: usize,
    cx: &GpuCtx,
) -> Result<Option<[kiln_ir::Dim; 3]>, CodegenError> {
    cx.run_grid(plan, count, plan.launch.workgroup[0] as usize)
}

/// A kernel computing each element of `out` (the last of `memrefs`) with `value`, given the
/// element's multi-index and row-major number.
pub(crate) fn per_element(
    symbol: &str,
    memrefs: &[String],
    out: &View,
    cx: &GpuCtx,
    flops: u64,
    bytes: u64,
    value: impl FnOnce(&mut Body, &[String], &str) -> Result<String, CodegenError>,
) -> Result<GpuKernel, CodegenError> {
    let count = out.numel();
    let plan = GpuPlan::elements(count, cx.caps)?;
    let mut b = cx.body();
    let i = open_element(&mut b, &plan, count, cx)?;
    let idx = unravel(&mut b, &i, &out.shape);
    let v = value(&mut b, &idx, &i)?;
    let at = out.index_expr(&mut b, &idx);
    store(&mut b, &v, &format!("%a{}", memrefs.len() - 1), out, &at);
    b.close("");
    let run_grid = element_grid(&plan, count, cx)?;
    Ok(GpuKernel {
        symbol: symbol.into(),
        mlir: module(symbol, memrefs, &plan, b)?,
        plan,
        flops,
        bytes,
        run_grid,
    })
}

/// The fused elementwise kernel for `expr` over `inputs` (views at the output's shape) into
/// `out`, with `slot` (the fault words) as its last argument when `expr` holds a fault site.
/// Axes every view walks in the same order are merged first, so an invocation finds its
/// operands with as few divisions as the layouts allow.
pub fn emit_elementwise(
    symbol: &str,
    expr: &Expr,
    inputs: &[View],
    out: &View,
    slot: Option<&View>,
    cx: &GpuCtx,
) -> Result<GpuKernel, CodegenError> {
    let mut all: Vec<View> = inputs.to_vec();
    all.push(out.clone());
    let views = coalesce(&all);
    let count = out.numel();
    let plan = GpuPlan::elements(count, cx.caps)?;
    let mut b = cx.body();
    let i = open_element(&mut b, &plan, count, cx)?;
    let merged = views[0].shape.clone();
    let idx = unravel(&mut b, &i, &merged);
    let at: Vec<String> = views.iter().map(|v| v.index_expr(&mut b, &idx)).collect();
    let args: Vec<String> = (0..views.len()).map(|k| format!("%a{k}")).collect();
    let slot_arg = format!("%a{}", views.len());
    let fault = slot.map(|v| FaultSlot { arg: &slot_arg, memref: v.memref() });
    let mut ctx = Ctx {
        inputs: &views[..views.len() - 1],
        args: &args,
        idx: &at,
        lin: &i,
        out_shape: &out.shape,
        fault,
    };
    let (value, _) = eval(&mut b, &mut ctx, expr)?;
    let o = views.len() - 1;
    store(&mut b, &value, &args[o], &views[o], &at[o]);
    b.close("");
    let mut memrefs: Vec<String> = all.iter().map(View::memref).collect();
    memrefs.extend(slot.map(View::memref));
    let flops = (count * expr.op_count().max(1)) as u64;
    let bytes = all.iter().map(|v| v.numel() * v.dtype.size_bytes()).sum::<usize>() as u64;
    let run_grid = element_grid(&plan, count, cx)?;
    Ok(GpuKernel {
        symbol: symbol.into(),
        mlir: module(symbol, &memrefs, &plan, b)?,
        plan,
        flops,
        bytes,
        run_grid,
    })
}
