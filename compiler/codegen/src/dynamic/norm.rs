//! Layer and RMS norm (and `norm(a + b)`) over a static last axis, with rows whose index
//! splits by run-time extents: the fallback for operands the row form cannot merge (a
//! position table broadcast over the batch, say), where one row index needs the run's
//! sequence length to find its operands.
//!
//! One range iteration is one row: `a (+ b)` is written into the result row while it is summed,
//! then (layer) centred while the squares are summed, then scaled (and shifted) in a last pass,
//! in the interpreter's order of operations. Scalar loops; the static emitter is the fast path.

use super::{address, buffer_view, refuse, row_kernel, step, unravel, walk};
use crate::kernels::elementwise::{load, store};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::program::bad;
use crate::{CodegenError, Kernel};
use kiln_ir::{DType, Dim, NormKind};
use kiln_sched::{Operand, Schedule};

/// Emits norm kernel `k`: operands a, (b when `add`), then gamma and beta as `affine` and
/// `kind` give them.
pub(super) fn emit(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    kind: NormKind,
    eps: f64,
    add: bool,
) -> Result<(Kernel, Dim), CodegenError> {
    let out = &k.output;
    let rank = out.view.shape.len();
    let n = match out.view.shape.last().and_then(Dim::as_const) {
        Some(n) if n > 0 => n,
        _ => return Err(refuse(k, "a norm over a symbolic or empty last axis")),
    };
    let all: Vec<&Operand> = k.inputs.iter().chain([out]).collect();
    if all.iter().any(|o| o.dtype != DType::F32) {
        return Err(refuse(k, "only f32 norms take run-time rows here"));
    }
    let rows_in = if add { 2 } else { 1 };
    if k.inputs.len() < rows_in {
        return Err(bad("norm operands"));
    }
    // The row operands broadcast to the result; gamma and beta are `[n]`.
    let row_views: Vec<_> =
        k.inputs[..rows_in].iter().map(|o| o.view.broadcast_to(&out.view.shape)).collect();
    let params = &k.inputs[rows_in..];
    if params.iter().any(|p| p.view.shape != [n] || !p.view.is_static()) {
        return Err(refuse(k, "gamma and beta must be static vectors of the row length"));
    }
    let rows = kiln_sched::product(&out.view.shape[..rank - 1]).map_err(|e| bad(&e.to_string()))?;
    let n_syms = s.symbols.len().max(1);
    let views: Vec<View> = all.iter().map(|o| buffer_view(s, o)).collect();
    let args: Vec<String> = (0..all.len()).map(|i| format!("%a{i}")).collect();
    let oi = all.len() - 1;

    let mut b = Body::new();
    let c0 = b.index(0);
    let c1 = b.index(1);
    let nc = b.index(n);
    let walks: Vec<_> = row_views.iter().map(|v| walk(&mut b, v, n_syms)).collect();
    let wparams: Vec<_> = params.iter().map(|p| walk(&mut b, &p.view, n_syms)).collect();
    let wo = walk(&mut b, &out.view, n_syms);
    let count = b.float(n as f64, "f32");
    let epsc = b.float(eps, "f32");
    let zero = b.float(0.0, "f32");
    let last = rank - 1;

    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let idx = unravel(&mut b, "%r", &wo.extents, rank - 1);
    let bases: Vec<String> = walks.iter().map(|w| address(&mut b, w, &idx)).collect();
    let o_row = address(&mut b, &wo, &idx);
    let at_out = |b: &mut Body, j: &str| step(b, &o_row, j, &wo.strides[last]);
    // A pass over the row that sums `f(j)` (which may store), starting from zero.
    let sum_over = |b: &mut Body, f: &mut dyn FnMut(&mut Body) -> String| -> String {
        let acc = b.fresh("acc");
        let res = b.fresh("sum");
        b.open(format!("{res} = scf.for %j = {c0} to {nc} step {c1} iter_args({acc} = {zero}) -> (f32)"));
        let v = f(b);
        let next = b.fadd(&acc, &v, "f32");
        b.line(format!("scf.yield {next} : f32"));
        b.close("");
        res
    };
    // Pass 1: x = a (+ b) into the row; its sum, or its squares' sum for RMS.
    let total = sum_over(&mut b, &mut |b| {
        let mut x: Option<String> = None;
        for (i, (w, base)) in walks.iter().zip(&bases).enumerate() {
            let at = step(b, base, "%j", &w.strides[last]);
            let v = load(b, &args[i], &views[i], &at);
            x = Some(match x {
                None => v,
                Some(prev) => b.fadd(&prev, &v, "f32"),
            });
        }
        let x = x.unwrap_or_default();
        let at = at_out(b, "%j");
        store(b, &x, &args[oi], &views[oi], &at);
        match kind {
            NormKind::Layer => x,
            NormKind::Rms => b.fmul(&x, &x, "f32"),
        }
    });
    let mean = b.fdiv(&total, &count, "f32");
    // Layer: centre the row, then the variance; RMS: the mean square is `mean`.
    let scale = match kind {
        NormKind::Layer => {
            let squares = sum_over(&mut b, &mut |b| {
                let at = at_out(b, "%j");
                let x = load(b, &args[oi], &views[oi], &at);
                let c = b.fsub(&x, &mean, "f32");
                store(b, &c, &args[oi], &views[oi], &at);
                b.fmul(&c, &c, "f32")
            });
            let var = b.fdiv(&squares, &count, "f32");
            let ve = b.fadd(&var, &epsc, "f32");
            (b.sqrt(&ve, "f32"), true)
        }
        NormKind::Rms => {
            let me = b.fadd(&mean, &epsc, "f32");
            let root = b.sqrt(&me, "f32");
            let one = b.float(1.0, "f32");
            (b.fdiv(&one, &root, "f32"), false)
        }
    };
    // The last pass: divide (layer) or multiply (RMS), then gamma and beta.
    b.open(format!("scf.for %j = {c0} to {nc} step {c1}"));
    let at = at_out(&mut b, "%j");
    let x = load(&mut b, &args[oi], &views[oi], &at);
    let mut y = if scale.1 { b.fdiv(&x, &scale.0, "f32") } else { b.fmul(&x, &scale.0, "f32") };
    for (p, w) in wparams.iter().enumerate() {
        let pi = rows_in + p;
        let at_p = step(&mut b, &w.offset, "%j", &w.strides[0]);
        let g = load(&mut b, &args[pi], &views[pi], &at_p);
        y = if p == 0 { b.fmul(&y, &g, "f32") } else { b.fadd(&y, &g, "f32") };
    }
    store(&mut b, &y, &args[oi], &views[oi], &at);
    b.close("");
    b.close("");
    b.line("return");

    let costs = |hint: usize| ((8 * hint * n) as u64, (4 * hint * n * (rows_in + 1)) as u64);
    Ok(row_kernel(s, sym, (&views, &args), b, &rows, costs))
}
