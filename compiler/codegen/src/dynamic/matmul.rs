//! `activation(a · b + bias)` with a run-time row count: K and N are static (B is a weight or
//! another static operand), the rows of a and of the result (every axis but the last, batch
//! axes included) are known at run time only.
//!
//! When a, the result and the bias walk as rows of static extents (the row form of
//! [`super`]), the product is the register-tiled micro-kernel of `kernels::matmul` over the
//! largest row count, told the run's count ([`kernels::matmul::emit_run_rows`]): whole row
//! tiles as in a static product, one tile for the rows left over, and a constant B read from
//! panels packed at compile time. The range is `column blocks × ⌈rows / tile rows⌉`.
//!
//! Otherwise one range iteration is one row. When the row of a and each column of B are
//! contiguous (B a transposed weight, PyTorch's `Linear` layout), each result is a dot product
//! over K in vectors of [`LANES`] (one vector accumulator, reduced at the end, then the K tail
//! one by one), plus the bias, then the activation. Otherwise the result row starts as the
//! bias (or zero), each of the K steps adds `a[r, k] · b[k, :]` to it (a unit-stride loop over
//! N that LLVM vectorizes when the strides are 1), and the activation runs over the finished
//! row.

use super::{
    address, at_hints_and_maxima, buffer_view, refuse, row_kernel, row_view, rows_of, size_value,
    static_view, step, unravel, walk, SYMS_ARG,
};
use crate::kernels::elementwise::{load, store};
use crate::kernels::matmul::{self as tiled, activate, Panels, RunRows};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::program::{bad, Unnamed};
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{Activation, DType, Dim};
use kiln_sched::{Operand, Schedule, Storage};

/// Lanes of the dot products over K.
const LANES: usize = 16;

/// Emits matmul kernel `k` (operands a, b, then `bias` when there is one) over symbolic rows;
/// returns it, its range over the symbols, and B packed when the kernel reads it so.
pub(super) fn emit(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    bias: Option<&Operand>,
    act: Activation,
    target: &dyn Target,
) -> Result<(Kernel, Dim, Option<Unnamed>), CodegenError> {
    let (a, b) = match k.inputs.as_slice() {
        [a, b, ..] => (a, b),
        _ => return Err(bad("matmul")),
    };
    let out = &k.output;
    let ops: Vec<&Operand> = [a, b].into_iter().chain(bias).chain([out]).collect();
    if ops.iter().any(|o| o.dtype != DType::F32) {
        return Err(refuse(k, "only f32 products take a run-time row count"));
    }
    let (ar, rank) = (a.view.shape.len(), out.view.shape.len());
    if b.view.shape.len() != 2 || ar < 2 || ar != rank || !b.view.is_static() {
        return Err(refuse(
            k,
            format!(
                "a run-time row count needs a static 2-D B and a rows×K A, not {} · {}",
                kiln_ir::fmt_shape(&a.view.shape),
                kiln_ir::fmt_shape(&b.view.shape)
            ),
        ));
    }
    let (kd, n) = match (a.view.shape[ar - 1].as_const(), b.view.shape[1].as_const()) {
        (Some(kd), Some(n)) => (kd, n),
        _ => return Err(refuse(k, "K and N must be static")),
    };
    if out.view.shape[rank - 1] != n || a.view.shape[..ar - 1] != out.view.shape[..rank - 1] {
        return Err(bad("matmul result shape"));
    }
    let bias = bias.map(|o| Operand { view: o.view.broadcast_to(&out.view.shape), ..o.clone() });
    if let Some(made) = emit_tiled(s, sym, [a, b, out], bias.as_ref(), act, (kd, n), target)? {
        return Ok(made);
    }
    let (made, range) = emit_rows(s, sym, [a, b, out], bias.as_ref(), act, (kd, n))?;
    Ok((made, range, None))
}

/// The micro-kernel over the run's rows, when a, the result and the bias have row forms;
/// `None` when one of them does not.
fn emit_tiled(
    s: &Schedule,
    sym: &str,
    [a, b, out]: [&Operand; 3],
    bias: Option<&Operand>,
    act: Activation,
    (kd, n): (usize, usize),
    target: &dyn Target,
) -> Result<Option<(Kernel, Dim, Option<Unnamed>)>, CodegenError> {
    let lead = out.view.shape.len() - 1;
    let rows = rows_of(s, &out.view.shape, lead)?;
    let (Some(av), Some(ov), Some(bv)) =
        (row_view(s, a, lead, &rows), row_view(s, out, lead, &rows), static_view(s, b))
    else {
        return Ok(None);
    };
    let cv = match bias.map(|o| row_view(s, o, lead, &rows)) {
        Some(None) => return Ok(None),
        Some(Some(v)) => Some(v),
        None => None,
    };
    let constant = matches!(s.buffers[b.buffer].storage, Storage::Weight { .. } | Storage::Const { .. });
    let panels = (constant && Panels::applies(DType::F32, kd, n)).then(|| Panels::for_target(kd, n, target));
    let n_syms = s.symbols.len().max(1);
    let (hint, _) = at_hints_and_maxima(s, &rows.count);
    let count = rows.count.clone();
    let value = move |bd: &mut Body| size_value(bd, &count, n_syms);
    let run = RunRows { value: &value, param: format!("{SYMS_ARG}: memref<{n_syms}xi64>"), plan: hint };
    let (made, tiling) = tiled::emit_run_rows(sym, &av, &bv, panels, cv.as_ref(), act, &ov, target, &run)?;
    let dim = |e: Result<Dim, kiln_ir::SizeError>| e.map_err(|e| bad(&e.to_string()));
    let tiles = dim(rows.count.add(&Dim::Const(tiling.row_tile - 1)))?;
    let tiles = dim(tiles.floor_div(tiling.row_tile))?;
    let range = dim(tiles.mul(&Dim::Const(tiling.column_blocks)))?;
    let pack = panels.map(|panels| Unnamed {
        source: b.buffer,
        offset: bv.offset,
        sk: bv.strides[0],
        sn: bv.strides[1],
        panels,
    });
    // The emitter costed the largest row count; the manifest's costs are at the hints.
    let made =
        Kernel { flops: (2 * hint * kd * n) as u64, bytes: (4 * (hint * (kd + n) + kd * n)) as u64, ..made };
    Ok(Some((made, range, pack)))
}

/// The row-by-row product (see the module's doc).
fn emit_rows(
    s: &Schedule,
    sym: &str,
    [a, b, out]: [&Operand; 3],
    bias: Option<&Operand>,
    act: Activation,
    (kd, n): (usize, usize),
) -> Result<(Kernel, Dim), CodegenError> {
    let (ar, rank) = (a.view.shape.len(), out.view.shape.len());
    let ops: Vec<&Operand> = [a, b].into_iter().chain(bias).chain([out]).collect();
    let bias_view = bias.map(|o| o.view.clone());
    let rows = kiln_sched::product(&out.view.shape[..rank - 1]).map_err(|e| bad(&e.to_string()))?;
    let n_syms = s.symbols.len().max(1);

    let mut bd = Body::new();
    let c0 = bd.index(0);
    let c1 = bd.index(1);
    let kc = bd.index(kd);
    let nc = bd.index(n);
    let wa = walk(&mut bd, &a.view, n_syms);
    let wb = walk(&mut bd, &b.view, n_syms);
    let wo = walk(&mut bd, &out.view, n_syms);
    let wbias = bias_view.as_ref().map(|v| walk(&mut bd, v, n_syms));
    let views: Vec<_> = ops.iter().map(|o| buffer_view(s, o)).collect();
    let args: Vec<String> = (0..ops.len()).map(|i| format!("%a{i}")).collect();
    let (va, vb, vo) = (&views[0], &views[1], &views[views.len() - 1]);
    let (aa, ab, ao) = (&args[0], &args[1], &args[args.len() - 1]);

    bd.open(format!("scf.for %r = %begin to %end step {c1}"));
    let idx = unravel(&mut bd, "%r", &wo.extents, rank - 1);
    let a_row = address(&mut bd, &wa, &idx);
    let o_row = address(&mut bd, &wo, &idx);
    let bias_row = wbias.as_ref().map(|w| address(&mut bd, w, &idx));
    let contiguous_k =
        a.view.strides[ar - 1].as_const() == Some(1) && b.view.strides[0].as_const() == Some(1);
    if contiguous_k {
        // result[n] = bias[n] + Σ_k a[r, k]·b[k, n]: a dot product of two contiguous runs.
        let (vty, full) = (format!("vector<{LANES}xf32>"), kd / LANES * LANES);
        let (fullc, lanes) = (bd.index(full), bd.index(LANES));
        let zero_v = bd.float(0.0, &vty);
        bd.open(format!("scf.for %n = {c0} to {nc} step {c1}"));
        let b_col = step(&mut bd, &wb.offset, "%n", &wb.strides[1]);
        bd.open(format!(
            "%dv = scf.for %k = {c0} to {fullc} step {lanes} iter_args(%acc = {zero_v}) -> ({vty})"
        ));
        let at_a = bd.assign(format!("arith.addi {a_row}, %k : index"));
        let xa = bd.assign(format!("vector.load {aa}[{at_a}] : {}, {vty}", va.memref()));
        let at_b = bd.assign(format!("arith.addi {b_col}, %k : index"));
        let xb = bd.assign(format!("vector.load {ab}[{at_b}] : {}, {vty}", vb.memref()));
        let f = bd.fma(&xa, &xb, "%acc", &vty);
        bd.line(format!("scf.yield {f} : {vty}"));
        bd.close("");
        let head = bd.assign(format!("vector.reduction <add>, %dv : {vty} into f32"));
        bd.open(format!("%dt = scf.for %k = {fullc} to {kc} step {c1} iter_args(%t = {head}) -> (f32)"));
        let at_a = bd.assign(format!("arith.addi {a_row}, %k : index"));
        let x = load(&mut bd, aa, va, &at_a);
        let at_b = bd.assign(format!("arith.addi {b_col}, %k : index"));
        let w = load(&mut bd, ab, vb, &at_b);
        let f = bd.fma(&x, &w, "%t", "f32");
        bd.line(format!("scf.yield {f} : f32"));
        bd.close("");
        let mut y = "%dt".to_string();
        if let (Some(w), Some(row)) = (&wbias, &bias_row) {
            let at = step(&mut bd, row, "%n", &w.strides[rank - 1]);
            let bv = load(&mut bd, &args[2], &views[2], &at);
            y = bd.assign(format!("arith.addf {y}, {bv} : f32"));
        }
        if act != Activation::None {
            y = activate(&mut bd, act, &y, "f32");
        }
        let at_o = step(&mut bd, &o_row, "%n", &wo.strides[rank - 1]);
        store(&mut bd, &y, ao, vo, &at_o);
        bd.close("");
        bd.close("");
        bd.line("return");
        return Ok(finish(s, sym, bd, (&views, &args), (&rows, kd, n)));
    }
    // The row starts as the bias, or zero.
    bd.open(format!("scf.for %n = {c0} to {nc} step {c1}"));
    let at_o = step(&mut bd, &o_row, "%n", &wo.strides[rank - 1]);
    let init = match (&wbias, &bias_row) {
        (Some(w), Some(row)) => {
            let at = step(&mut bd, row, "%n", &w.strides[rank - 1]);
            load(&mut bd, &args[2], &views[2], &at)
        }
        _ => bd.float(0.0, "f32"),
    };
    store(&mut bd, &init, ao, vo, &at_o);
    bd.close("");
    // Row += a[r, k] · b[k, :], k by k.
    bd.open(format!("scf.for %k = {c0} to {kc} step {c1}"));
    let at_a = step(&mut bd, &a_row, "%k", &wa.strides[ar - 1]);
    let x = load(&mut bd, aa, va, &at_a);
    let b_row = step(&mut bd, &wb.offset, "%k", &wb.strides[0]);
    bd.open(format!("scf.for %n = {c0} to {nc} step {c1}"));
    let at_b = step(&mut bd, &b_row, "%n", &wb.strides[1]);
    let w = load(&mut bd, ab, vb, &at_b);
    let at_o = step(&mut bd, &o_row, "%n", &wo.strides[rank - 1]);
    let acc = load(&mut bd, ao, vo, &at_o);
    let sum = bd.fma(&x, &w, &acc, "f32");
    store(&mut bd, &sum, ao, vo, &at_o);
    bd.close("");
    bd.close("");
    if act != Activation::None {
        bd.open(format!("scf.for %n = {c0} to {nc} step {c1}"));
        let at_o = step(&mut bd, &o_row, "%n", &wo.strides[rank - 1]);
        let v = load(&mut bd, ao, vo, &at_o);
        let y = activate(&mut bd, act, &v, "f32");
        store(&mut bd, &y, ao, vo, &at_o);
        bd.close("");
    }
    bd.close("");
    bd.line("return");
    Ok(finish(s, sym, bd, (&views, &args), (&rows, kd, n)))
}

/// The kernel around body `bd` over `rows` rows of a `K × N` product.
fn finish(
    s: &Schedule,
    sym: &str,
    bd: Body,
    ops: (&[View], &[String]),
    (rows, kd, n): (&Dim, usize, usize),
) -> (Kernel, Dim) {
    row_kernel(s, sym, ops, bd, rows, |hint| {
        ((2 * hint * kd * n) as u64, (4 * (hint * (kd + n) + kd * n)) as u64)
    })
}
