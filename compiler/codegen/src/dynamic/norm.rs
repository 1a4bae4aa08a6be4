//! Layer and RMS norm (and `norm(a + b)`) over a static last axis, with rows whose index
//! splits by run-time extents: for operands the row form cannot merge (a position table
//! broadcast over the batch, say), where one row index needs the run's sequence length to find
//! its operands. The static emitter's vector code, with each row's start computed from the
//! run's sizes (`kernels::norm::emit_norm_run` with a [`RunLead`]).

use super::{at_hints_and_maxima, at_maxima, refuse, static_view, RunLead};
use crate::program::bad;
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{Dim, NormKind};
use kiln_sched::{Operand, Schedule, StridedView};

/// Emits norm kernel `k`: operands a, (b when `add`), then gamma and beta as `affine` and
/// `kind` give them.
pub(super) fn emit(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    kind: NormKind,
    eps: f64,
    add: bool,
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let out = &k.output;
    let rank = out.view.shape.len();
    let n = match out.view.shape.last().and_then(Dim::as_const) {
        Some(n) if n > 0 => n,
        _ => return Err(refuse(k, "a norm over a symbolic or empty last axis")),
    };
    let rows_in = if add { 2 } else { 1 };
    if k.inputs.len() < rows_in {
        return Err(bad("norm operands"));
    }
    // The row operands broadcast to the result, then the result; gamma and beta are `[n]`.
    let mut views: Vec<StridedView> =
        k.inputs[..rows_in].iter().map(|o| o.view.broadcast_to(&out.view.shape)).collect();
    views.push(out.view.clone());
    // The sum an `add_norm` also stores: its own row starts, after out's.
    let sum = k.extra_outputs.first();
    views.extend(sum.map(|o| o.view.clone()));
    if views.iter().any(|v| v.strides.last().is_none_or(|d| !d.is_static())) {
        return Err(refuse(k, "a norm whose operands have run-time strides along the row"));
    }
    let params: Vec<_> = k.inputs[rows_in..]
        .iter()
        .map(|p| static_view(s, p).filter(|v| v.shape == [n]))
        .collect::<Option<_>>()
        .ok_or_else(|| refuse(k, "gamma and beta must be static vectors of the row length"))?;
    let operands: Vec<&Operand> = k.inputs[..rows_in].iter().chain([out]).chain(sum).collect();
    let flat: Vec<_> = operands.iter().zip(&views).map(|(o, v)| at_maxima(s, o, v)).collect();
    let rows = kiln_sched::product(&out.view.shape[..rank - 1]).map_err(|e| bad(&e.to_string()))?;
    let lead =
        RunLead { extents: &out.view.shape[..rank - 1], views: &views, n_syms: s.symbols.len().max(1) };
    let (gamma, beta) = (params.first(), params.get(1));
    let b = if add { Some(&flat[1]) } else { None };
    let made = crate::kernels::norm::emit_norm_run(
        sym,
        kind,
        eps,
        (&flat[0], b),
        gamma,
        beta,
        (&flat[rows_in], flat.get(rows_in + 1)),
        target,
        crate::kernels::norm::RowStarts::Run(&lead),
    )?;
    // The emitter costed the rows' maximum; the manifest's costs are at the hints.
    let (hint, max) = at_hints_and_maxima(s, &rows);
    let at_hint = |x: u64| (x as u128 * hint as u128 / max.max(1) as u128) as u64;
    Ok((Kernel { flops: at_hint(made.flops), bytes: at_hint(made.bytes), ..made }, rows))
}
