//! From a schedule to GPU kernels: each scheduled kernel's operands become the same views the
//! CPU emitters get ([`crate::program`]'s shaping), the target's limits are checked, and the
//! kernel goes to its GPU emitter. Every op the schedule can hold has an arm here; the ones
//! that never form a kernel of their own (leaves, elementwise ops, layout views) are refused
//! by name.

use super::elements::{emit_elementwise, per_element};
use super::{attention, matmul, rows, GpuCaps, GpuCtx, GpuKernel};
use crate::kernels::{conv, data, reduce, View};
use crate::mlir_text::Split;
use crate::program::{bad, broadcast, fault_slot, matmul_views, plain};
use crate::CodegenError;
use kiln_ir::{Activation, DType, NormKind, Op, ReduceOp};
use kiln_sched::{KernelOp, Schedule};

/// The GPU kernels of a schedule, each distinct kernel once.
pub struct GpuProgram {
    /// Distinct kernels, in order of first use.
    pub kernels: Vec<GpuKernel>,
    /// For each scheduled kernel, the index of the kernel in `kernels` that computes it.
    pub step_kernel: Vec<usize>,
    /// For each scheduled kernel, its arguments bound in pieces: (argument position, split).
    pub step_splits: Vec<Vec<(usize, Split)>>,
}

/// The symbol kernels are emitted under before they are told apart.
const PROVISIONAL: &str = "kiln_k";

/// Generates every kernel of `s` for the GPU target `caps`. Kernels whose text is the same (the
/// layers of a transformer) are kept once and shared by their steps.
pub fn kernels(s: &Schedule, caps: &GpuCaps) -> Result<GpuProgram, CodegenError> {
    kernels_numbered(s, caps, 0)
}

/// [`kernels`], naming each distinct kernel after its step's index plus `first`: the entry
/// points of one artifact number their kernels apart, so their modules' symbols never clash.
pub fn kernels_numbered(s: &Schedule, caps: &GpuCaps, first: usize) -> Result<GpuProgram, CodegenError> {
    if !s.arena_align.is_multiple_of(caps.buffer_align) {
        return Err(CodegenError::Unsupported(format!(
            "a schedule whose arena is aligned to {} bytes on the {} target, which binds buffers at multiples of {} (schedule with kiln_sched::schedule_aligned)",
            s.arena_align, caps.name, caps.buffer_align
        )));
    }
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut kernels = Vec::new();
    let mut step_kernel = Vec::with_capacity(s.kernels.len());
    let mut step_splits = Vec::with_capacity(s.kernels.len());
    for (i, k) in s.kernels.iter().enumerate() {
        let label = format!("k{i} {}", k.name());
        let in_context = |e: CodegenError| match e {
            CodegenError::Unsupported(what) => CodegenError::Unsupported(format!("{what} (kernel {label})")),
            other => other,
        };
        let splits = check_limits(s, k, caps).map_err(in_context)?;
        let cx = GpuCtx {
            caps,
            splits: splits.iter().map(|(j, sp)| (format!("%a{j}"), sp.clone())).collect(),
            run: None,
        };
        let symbolic = k.operands().any(|o| !o.view.is_static());
        let mut made =
            if symbolic { super::dynamic::kernel(s, PROVISIONAL, k, &cx) } else { kernel(s, k, &cx) }
                .map_err(in_context)?;
        // A grid over the run's sizes is printed above the plan (and tells kernels apart).
        if let Some(grid) = &made.run_grid {
            made.mlir =
                format!("// grid at run time: [{}, {}, {}]\n{}", grid[0], grid[1], grid[2], made.mlir);
        }
        step_splits.push(splits);
        let index = match seen.get(&made.mlir) {
            Some(&j) => j,
            None => {
                seen.insert(made.mlir.clone(), kernels.len());
                let sym = crate::program::symbol(first + i);
                made.mlir = made.mlir.replace(&format!("@{PROVISIONAL}"), &format!("@{sym}"));
                made.symbol = sym;
                kernels.push(made);
                kernels.len() - 1
            }
        };
        step_kernel.push(index);
    }
    Ok(GpuProgram { kernels, step_kernel, step_splits })
}

/// Refuses a kernel whose buffers the target cannot bind (a dtype it cannot store, more
/// bindings than one kernel may have, a written buffer larger than one binding may cover), and
/// returns the stored ones (weights, constants) larger than a binding, which are bound in
/// pieces.
fn check_limits(
    s: &Schedule,
    k: &kiln_sched::Kernel,
    caps: &GpuCaps,
) -> Result<Vec<(usize, Split)>, CodegenError> {
    let operands: Vec<&kiln_sched::Operand> = k.operands().collect();
    let mut splits = Vec::new();
    let mut bindings = 0;
    for (j, o) in operands.iter().enumerate() {
        let b = &s.buffers[o.buffer];
        let bytes = b.bytes() as u64;
        if !caps.stores(o.dtype) {
            return Err(CodegenError::Unsupported(format!(
                "{} tensors on the {} target",
                o.dtype, caps.name
            )));
        }
        let elements = (b.bytes() / o.dtype.size_bytes().max(1)) as u64;
        if elements > caps.max_buffer_elements {
            return Err(CodegenError::Unsupported(format!(
                "a buffer of {elements} elements on the {} target, whose kernels index at most {} elements",
                caps.name, caps.max_buffer_elements
            )));
        }
        if bytes <= caps.max_binding_bytes {
            bindings += 1;
            continue;
        }
        let stored =
            matches!(b.storage, kiln_sched::Storage::Weight { .. } | kiln_sched::Storage::Const { .. });
        if !stored {
            return Err(CodegenError::Unsupported(format!(
                "a run-time buffer of {bytes} bytes on the {} target, which binds at most {} bytes per buffer (only stored weights are bound in pieces)",
                caps.name,
                caps.max_binding_bytes
            )));
        }
        let elem = o.dtype.size_bytes();
        let split = Split { piece_len: caps.max_binding_bytes as usize / elem, buffer_len: b.bytes() / elem };
        bindings += split.pieces();
        splits.push((j, split));
    }
    // The fault words, and the run's symbol values, bindings of their own.
    if k.can_fault() {
        bindings += 1;
    }
    if k.operands().any(|o| !o.view.is_static()) {
        bindings += 1;
    }
    if bindings > caps.max_bindings {
        return Err(CodegenError::Unsupported(format!(
            "a kernel of {bindings} bindings on the {} target, which binds at most {}",
            caps.name, caps.max_bindings
        )));
    }
    Ok(splits)
}

fn kernel(s: &Schedule, k: &kiln_sched::Kernel, cx: &GpuCtx) -> Result<GpuKernel, CodegenError> {
    let caps = cx.caps;
    let sym = PROVISIONAL;
    let out = plain(s, &k.output);
    let ins = &k.inputs;
    let op = match &k.op {
        KernelOp::Elementwise(expr) => {
            let inputs: Vec<View> = ins.iter().map(|o| plain(s, o)).collect();
            let slot = fault_slot(s, k)?;
            return emit_elementwise(sym, expr, &inputs, &out, slot.as_ref(), cx);
        }
        KernelOp::Node(op) => op,
    };
    let arg = |n: usize| ins.get(n).ok_or_else(|| bad(op.name()));
    let float_only = |what: &str| -> Result<(), CodegenError> {
        if out.dtype.is_float() {
            Ok(())
        } else {
            Err(CodegenError::Unsupported(format!("`{what}` on {} on the {} target", out.dtype, caps.name)))
        }
    };
    match op {
        Op::MatMul | Op::MatMulEpilogue { .. } => {
            let (bias, act) = match op {
                Op::MatMulEpilogue { bias, activation } => (*bias, *activation),
                _ => (false, Activation::None),
            };
            float_only(op.name())?;
            let c = if bias { Some(arg(2)?) } else { None };
            let mv = matmul_views(s, arg(0)?, arg(1)?, c, &k.output)?;
            matmul::emit(sym, &mv.a, &mv.b, mv.bias.as_ref(), act, &mv.out, cx)
        }
        Op::Attention { scale, causal, masked } => {
            float_only(op.name())?;
            let (q, kk, v) = (plain(s, arg(0)?), plain(s, arg(1)?), plain(s, arg(2)?));
            let mask = if *masked {
                let mut shape = q.shape.clone();
                let last = shape.len() - 1;
                shape[last] = kk.shape[kk.rank() - 2];
                Some(broadcast(s, arg(3)?, &shape))
            } else {
                None
            };
            let lse = k.extra_outputs.first().map(|o| plain(s, o));
            attention::emit(sym, &q, &kk, Some((&v, &out)), mask.as_ref(), *scale, *causal, lse.as_ref(), cx)
        }
        Op::AttentionLse { scale, causal, masked } => {
            float_only(op.name())?;
            let (q, kk) = (plain(s, arg(0)?), plain(s, arg(1)?));
            let mask = if *masked {
                let mut shape = q.shape.clone();
                let last = shape.len() - 1;
                shape[last] = kk.shape[kk.rank() - 2];
                Some(broadcast(s, arg(2)?, &shape))
            } else {
                None
            };
            attention::emit(sym, &q, &kk, None, mask.as_ref(), *scale, *causal, Some(&out), cx)
        }
        Op::Softmax { axis } | Op::LogSoftmax { axis } => {
            float_only(op.name())?;
            let log = matches!(op, Op::LogSoftmax { .. });
            rows::emit_softmax(sym, &plain(s, arg(0)?), *axis, log, &out, cx)
        }
        Op::LayerNorm { eps, affine } | Op::RmsNorm { eps, affine } => {
            float_only(op.name())?;
            let kind = if matches!(op, Op::LayerNorm { .. }) { NormKind::Layer } else { NormKind::Rms };
            let gamma = if *affine { Some(plain(s, arg(1)?)) } else { None };
            let beta = if *affine && kind == NormKind::Layer { Some(plain(s, arg(2)?)) } else { None };
            let x = broadcast(s, arg(0)?, &out.shape);
            rows::emit_norm(sym, kind, *eps, (&x, None), gamma.as_ref(), beta.as_ref(), (&out, None), cx)
        }
        Op::AddNorm { eps, kind, affine } => {
            float_only(op.name())?;
            let a = broadcast(s, arg(0)?, &out.shape);
            let b = broadcast(s, arg(1)?, &out.shape);
            let gamma = if *affine { Some(plain(s, arg(2)?)) } else { None };
            let beta = if *affine && *kind == NormKind::Layer { Some(plain(s, arg(3)?)) } else { None };
            let sum = k.extra_outputs.first().map(|o| plain(s, o));
            rows::emit_norm(sym, *kind, *eps, (&a, Some(&b)), gamma.as_ref(), beta.as_ref(), (&out, sum.as_ref()), cx)
        }
        Op::Reduce { op: r, axes, .. } => {
            let x = plain(s, arg(0)?);
            if x.dtype == DType::Bool || (!x.dtype.is_float() && *r == ReduceOp::Mean) {
                return Err(CodegenError::Unsupported(format!(
                    "{} reduction of {} on the {} target",
                    r.name(),
                    x.dtype,
                    caps.name
                )));
            }
            let count: usize = axes.iter().map(|&a| x.shape[a]).product();
            if rows::reduce_by_rows(out.numel(), count) {
                return rows::emit_reduce(sym, *r, axes, &x, &out, cx);
            }
            let bytes = ((x.numel() + out.numel()) * x.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), out.memref()];
            per_element(sym, &memrefs, &out, cx, x.numel() as u64, bytes, |b, _, lin| {
                Ok(reduce::reduce_at(b, *r, axes, &x, lin))
            })
        }
        Op::Gather { axis } => {
            let (table, indices) = (plain(s, arg(0)?), plain(s, arg(1)?));
            if !indices.dtype.is_int() {
                return Err(CodegenError::Unsupported(format!("gather with {} indices", indices.dtype)));
            }
            let bytes = (2 * out.numel() * out.dtype.size_bytes()) as u64;
            let memrefs = [table.memref(), indices.memref(), out.memref()];
            per_element(sym, &memrefs, &out, cx, 0, bytes, |b, idx, _| {
                Ok(data::gather_value(b, *axis, &table, &indices, idx))
            })
        }
        Op::ScatterAdd { axis, extent } => {
            let (u, i, o) = crate::program::scatter_views(s, arg(0)?, arg(1)?, &k.output, *axis, *extent)?;
            super::scatter::emit(sym, &u, &i, &o, cx)
        }
        Op::Concat { axis } => {
            let inputs: Vec<View> = ins.iter().map(|o| plain(s, o)).collect();
            let bytes = (2 * out.numel() * out.dtype.size_bytes()) as u64;
            let mut memrefs: Vec<String> = inputs.iter().map(View::memref).collect();
            memrefs.push(out.memref());
            per_element(sym, &memrefs, &out, cx, 0, bytes, |b, idx, _| {
                data::concat_value(b, *axis, &inputs, &out, idx)
            })
        }
        Op::Pad { pads, value } => {
            let x = plain(s, arg(0)?);
            let bytes = (2 * out.numel() * out.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), out.memref()];
            per_element(sym, &memrefs, &out, cx, 0, bytes, |b, idx, _| {
                Ok(data::pad_value(b, pads, *value, &x, &out, idx))
            })
        }
        Op::Conv2d { stride, padding, dilation, groups } => {
            float_only(op.name())?;
            let (x, w) = (plain(s, arg(0)?), plain(s, arg(1)?));
            let flops = (2 * out.numel() * w.shape[1] * w.shape[2] * w.shape[3]) as u64;
            let bytes = ((x.numel() + w.numel() + out.numel()) * out.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), w.memref(), out.memref()];
            per_element(sym, &memrefs, &out, cx, flops, bytes, |b, idx, _| {
                let reads = conv::StaticReads::new(&[&x, &w]);
                Ok(conv::conv_value(b, *stride, *padding, *dilation, *groups, &w.shape, out.dtype, idx, &reads))
            })
        }
        Op::Pool2d { kind, kernel, stride, padding } => {
            float_only(op.name())?;
            let x = plain(s, arg(0)?);
            let flops = (out.numel() * kernel[0] * kernel[1]) as u64;
            let bytes = ((x.numel() + out.numel()) * out.dtype.size_bytes()) as u64;
            let memrefs = [x.memref(), out.memref()];
            per_element(sym, &memrefs, &out, cx, flops, bytes, |b, idx, _| {
                let reads = conv::StaticReads::new(&[&x]);
                Ok(conv::pool_value(b, *kind, *kernel, *stride, *padding, out.dtype, idx, &reads))
            })
        }
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Const { .. }
        | Op::Full { .. }
        | Op::Iota { .. }
        | Op::RandomUniform { .. }
        | Op::Unary(_)
        | Op::Binary(_)
        | Op::Compare(_)
        | Op::Where
        | Op::Cast { .. }
        | Op::Gelu { .. }
        | Op::Reshape { .. }
        | Op::Transpose { .. }
        | Op::BroadcastTo { .. }
        | Op::Slice { .. } => Err(CodegenError::Unsupported(format!(
            "`{}` as a kernel of its own on the {} target (the scheduler makes it a buffer, part of an elementwise group, or a view)",
            op.name(),
            caps.name
        ))),
    }
}
