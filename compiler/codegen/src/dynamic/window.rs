//! Convolution and pooling along run-time spatial extents: a temporal convolution over a
//! sequence of run-time length (`[batch, C, 1, seq]`), an image of run-time size. The row form
//! cannot take them (a window reads across the rows it would merge), so they walk the run's
//! extents and strides through the static emitters' code, which reads them through
//! [`conv::WindowReads`]: the row plan ([`conv::window_row`]) where rows vectorize, else one
//! range iteration per row of the result (every axis but the width) and the taps of
//! [`conv::conv_value`] or [`conv::pool_value`] per element, bounded by the input's run-time
//! extents. The channels and the weight stay static.
//!
//! The GPU twin (`gpu::dynamic`) takes one element per invocation and finds its value with
//! [`value`].

use super::data::{parts, Part};
use super::{address, at_hints_and_maxima, row_kernel, static_view, step, unravel, Walk};
use crate::kernels::conv::{self, WindowReads, WindowRows};
use crate::kernels::elementwise::store;
use crate::kernels::View;
use crate::mlir_text::Body;
use crate::program::bad;
use crate::{CodegenError, Kernel, Target};
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

/// Operands walked at the run's extents and strides ([`parts`]): the inputs, then the result.
pub(crate) struct RunReads<'a> {
    parts: Vec<&'a Part>,
    /// Whether each has unit stride along the width at every size.
    unit: Vec<bool>,
}

impl<'a> RunReads<'a> {
    /// Kernel `k`'s operands, `parts` in the order of its inputs and then its result.
    pub(crate) fn new(k: &kiln_sched::Kernel, parts: Vec<&'a Part>) -> RunReads<'a> {
        let unit = k
            .inputs
            .iter()
            .chain([&k.output])
            .map(|o| o.view.strides.get(3) == Some(&Dim::Const(1)))
            .collect();
        RunReads { parts, unit }
    }
}

impl WindowReads for RunReads<'_> {
    fn extent(&self, _: &mut Body, a: usize) -> String {
        self.parts[0].walk.extents[2 + a].clone()
    }

    fn address(&self, b: &mut Body, i: usize, idx: &[String]) -> String {
        address(b, &self.parts[i].walk, idx)
    }

    fn buffer(&self, i: usize) -> (&str, &View) {
        (&self.parts[i].arg, &self.parts[i].view)
    }

    fn unit_width(&self, i: usize) -> bool {
        self.unit.get(i).copied().unwrap_or(false)
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

/// The CPU window op of kernel `k`: where its rows vectorize ([`WindowRows`]), one range
/// iteration per row of a block of result channels, the static row plan with the width read
/// at run time; else one per row `[n, c, oh]` and a loop along it, element by element.
/// Arguments: x (and w), out, `%syms`.
pub(super) fn emit(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    window: &Window,
    target: &dyn Target,
) -> Result<(Kernel, Dim), CodegenError> {
    let dtype = k.output.dtype;
    let arity = match window {
        Window::Conv { .. } => 2,
        Window::Pool { .. } => 1,
    };
    let shape = &k.output.view.shape;
    if shape.len() != 4 || k.inputs.len() != arity {
        return Err(bad("a window op"));
    }
    if !dtype.is_float() {
        return Err(CodegenError::Unsupported(format!("a window op on {dtype}")));
    }
    let w_shape = weight_shape(s, k, window)?;
    let n_syms = s.symbols.len().max(1);
    let mut b = Body::new();
    let (inputs, out) = parts(s, &mut b, k, n_syms);
    let reads = RunReads::new(k, inputs.iter().chain([&out]).collect());
    let (op, geometry) = match *window {
        Window::Conv { stride, padding, dilation, groups } => (
            conv::RowOp::Conv { groups, w_shape: &w_shape },
            ((stride, padding, dilation), [w_shape[2], w_shape[3]]),
        ),
        Window::Pool { kind, kernel, stride, padding } => {
            (conv::RowOp::Pool(kind), ((stride, padding, [1, 1]), kernel))
        }
    };
    let ((stride, _, _), kernel) = geometry;
    let channels = k.output.view.shape[1].as_const();
    let (_, width) = at_hints_and_maxima(s, &shape[3]);
    let plan = channels.and_then(|c| {
        WindowRows::choose(&op, (kernel[1], stride[1]), [c, width], dtype, &reads, target).map(|p| (p, c))
    });
    let c1 = b.index(1);
    b.open(format!("scf.for %r = %begin to %end step {c1}"));
    let rows = match plan {
        Some((plan, channels)) => {
            let blocks = channels / plan.block;
            let bc = b.index(blocks);
            let extents = [out.walk.extents[0].clone(), bc, out.walk.extents[2].clone()];
            let idx = unravel(&mut b, "%r", &extents, 3);
            let row = [idx[0].as_str(), idx[1].as_str(), idx[2].as_str()];
            conv::window_row(&mut b, geometry, op, plan, dtype, row, &out.walk.extents[3], &reads);
            kiln_sched::product(&[shape[0].clone(), Dim::Const(blocks), shape[2].clone()])
        }
        None => {
            let c0 = b.index(0);
            let mut idx = unravel(&mut b, "%r", &out.walk.extents, 3);
            let lead = Walk { strides: out.walk.strides[..3].to_vec(), ..out.walk.clone() };
            let base = address(&mut b, &lead, &idx);
            b.open(format!("scf.for %ow = {c0} to {} step {c1}", out.walk.extents[3]));
            idx.push("%ow".into());
            let v = value(&mut b, window, &w_shape, dtype, &idx, &reads);
            let at = step(&mut b, &base, "%ow", &out.walk.strides[3]);
            store(&mut b, &v, &out.arg, &out.view, &at);
            b.close("");
            kiln_sched::product(&shape[..3])
        }
    };
    b.close("");
    b.line("return");
    let rows = rows.map_err(|e| bad(&e.to_string()))?;
    let (flops, bytes) = costs(s, k, window, &w_shape);
    let views: Vec<View> = inputs.iter().chain([&out]).map(|p| p.view.clone()).collect();
    let args: Vec<String> = inputs.iter().chain([&out]).map(|p| p.arg.clone()).collect();
    Ok(row_kernel(s, sym, (&views, &args), b, &rows, |_| (flops, bytes)))
}
