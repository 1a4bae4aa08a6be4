//! Convolution and pooling along run-time spatial extents: a temporal convolution over a
//! sequence of run-time length (`[batch, C, 1, seq]`), an image of run-time size. The row form
//! cannot take them (a window reads across the rows it would merge), so they walk the run's
//! extents and strides: one range iteration per row of the result (every axis but the width),
//! a loop along the width, and per element the static emitters' taps
//! ([`conv::conv_value`], [`conv::pool_value`]) bounded by the input's run-time extents. The
//! channels and the weight stay static.
//!
//! The GPU twin (`gpu::dynamic`) takes one element per invocation and finds its value with
//! [`value`].

use super::data::{parts, Part};
use super::{address, at_hints_and_maxima, row_kernel, static_view, step, unravel, Walk};
use crate::kernels::conv::{self, WindowReads};
use crate::kernels::elementwise::{load, store};
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::program::bad;
use crate::{CodegenError, Kernel};
use kiln_ir::{DType, Dim, PoolKind};
use kiln_sched::Schedule;

/// A window op's geometry.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Window {
    Conv { stride: [usize; 2], padding: [usize; 2], dilation: [usize; 2], groups: usize },
    Pool { kind: PoolKind, kernel: [usize; 2], stride: [usize; 2], padding: [usize; 2] },
}

impl Window {
    /// Taps per element of the result, and the flops each takes (a multiply-add, a compare or
    /// an add).
    fn taps(&self, w_shape: &[usize]) -> (usize, usize) {
        match self {
            Window::Conv { .. } => (w_shape[1..].iter().product(), 2),
            Window::Pool { kernel, .. } => (kernel[0] * kernel[1], 1),
        }
    }
}

/// Operands walked at the run's extents and strides ([`parts`]).
pub(crate) struct RunReads<'a>(pub &'a [Part]);

impl WindowReads for RunReads<'_> {
    fn extent(&self, _: &mut Body, a: usize) -> String {
        self.0[0].walk.extents[2 + a].clone()
    }

    fn load(&self, b: &mut Body, i: usize, idx: &[String]) -> String {
        let p = &self.0[i];
        let at = address(b, &p.walk, idx);
        load(b, &p.arg, &p.view, &at)
    }
}

/// The weight's static extents (`[]` for a pool), or a refusal.
pub(crate) fn weight_shape(
    s: &Schedule,
    k: &kiln_sched::Kernel,
    window: &Window,
) -> Result<Vec<usize>, CodegenError> {
    match window {
        Window::Pool { .. } => Ok(Vec::new()),
        Window::Conv { .. } => {
            let w = k.inputs.get(1).ok_or_else(|| bad("conv2d"))?;
            static_view(s, w)
                .map(|v| v.shape)
                .ok_or_else(|| super::refuse(k, "the weight must have a static shape"))
        }
    }
}

/// Element `idx` (`[n, c, oh, ow]`) of the window op, in register type.
pub(crate) fn value(
    b: &mut Body,
    window: &Window,
    w_shape: &[usize],
    dtype: DType,
    idx: &[String],
    reads: &dyn WindowReads,
) -> String {
    match *window {
        Window::Conv { stride, padding, dilation, groups } => {
            conv::conv_value(b, stride, padding, dilation, groups, w_shape, dtype, idx, reads)
        }
        Window::Pool { kind, kernel, stride, padding } => {
            conv::pool_value(b, kind, kernel, stride, padding, dtype, idx, reads)
        }
    }
}

/// The result's elements and the costs at the hints: flops, and bytes with every operand
/// read once and the result written once.
pub(crate) fn costs(s: &Schedule, k: &kiln_sched::Kernel, window: &Window, w_shape: &[usize]) -> (u64, u64) {
    let numel = |v: &kiln_sched::StridedView| {
        kiln_sched::product(&v.shape).map(|d| at_hints_and_maxima(s, &d).0).unwrap_or(0)
    };
    let (taps, per_tap) = window.taps(w_shape);
    let flops = (numel(&k.output.view) * taps * per_tap) as u64;
    let bytes: usize =
        k.inputs.iter().chain([&k.output]).map(|o| numel(&o.view) * o.dtype.size_bytes()).sum();
    (flops, bytes as u64)
}

/// The CPU window op of kernel `k`: one range iteration per row `[n, c, oh]` of the result, a
/// loop along its run-time width. Arguments: x (and w), out, `%syms`.
pub(super) fn emit(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    window: &Window,
) -> Result<(Kernel, Dim), CodegenError> {
    let dtype = k.output.dtype;
    let arity = match window {
        Window::Conv { .. } => 2,
        Window::Pool { .. } => 1,
    };
    if k.output.view.shape.len() != 4 || k.inputs.len() != arity {
        return Err(bad("a window op"));
    }
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("a window op on {dtype}")));
    }
    let w_shape = weight_shape(s, k, window)?;
    let n_syms = s.symbols.len().max(1);
    let mut b = Body::new();
    let (inputs, out) = parts(s, &mut b, k, n_syms);
    let (c0, c1) = (b.index(0), b.index(1));
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let mut idx = unravel(&mut b, "%r", &out.walk.extents, 3);
    let lead = Walk { strides: out.walk.strides[..3].to_vec(), ..out.walk.clone() };
    let base = address(&mut b, &lead, &idx);
    b.open(format!("scf.for %ow = {c0} to {} step {c1}", out.walk.extents[3]));
    idx.push("%ow".into());
    let v = value(&mut b, window, &w_shape, dtype, &idx, &RunReads(&inputs));
    let at = step(&mut b, &base, "%ow", &out.walk.strides[3]);
    store(&mut b, &v, &out.arg, &out.view, &at);
    b.close("");
    b.close("");
    b.line("return");
    let rows = kiln_sched::product(&k.output.view.shape[..3]).map_err(|e| bad(&e.to_string()))?;
    let (flops, bytes) = costs(s, k, window, &w_shape);
    let views: Vec<View> = inputs.iter().chain([&out]).map(|p| p.view.clone()).collect();
    let args: Vec<String> = inputs.iter().chain([&out]).map(|p| p.arg.clone()).collect();
    Ok(row_kernel(s, sym, (&views, &args), b, &rows, |_| (flops, bytes)))
}
