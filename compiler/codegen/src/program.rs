//! From a schedule to kernels: every scheduled kernel goes to its emitter, with operands
//! turned into views in the shape the emitter's contract asks for (matmul operands promoted
//! and batch-broadcast, masks and residuals broadcast to the result).

use crate::kernels::{self, View};
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{Activation, NormKind, Op};
use kiln_sched::{KernelOp, Operand, Schedule, StridedView};

/// The MLIR symbol of scheduled kernel `i`.
pub fn symbol(i: usize) -> String {
    format!("k{i}")
}

fn view(s: &Schedule, o: &Operand, v: StridedView) -> View {
    View {
        shape: v.shape,
        strides: v.strides,
        offset: v.offset,
        dtype: o.dtype,
        buffer_len: s.buffers[o.buffer].len,
    }
}

fn plain(s: &Schedule, o: &Operand) -> View {
    view(s, o, o.view.clone())
}

fn broadcast(s: &Schedule, o: &Operand, shape: &[usize]) -> View {
    view(s, o, o.view.broadcast_to(shape))
}

fn bad(what: &str) -> CodegenError {
    CodegenError::Unsupported(format!("scheduled kernel with malformed operands: {what}"))
}

/// The symbol kernels are emitted under before they are told apart.
const PROVISIONAL: &str = "kiln_k";

/// The kernels of a schedule, each distinct kernel once.
pub struct Program {
    /// Distinct kernels, in order of first use.
    pub kernels: Vec<Kernel>,
    /// For each scheduled kernel, the index of the kernel in `kernels` that computes it.
    pub step_kernel: Vec<usize>,
}

/// Generates every kernel of `s` for `target`. Kernels whose MLIR is the same (the layers of
/// a transformer) are compiled once and shared by their steps.
pub fn kernels(s: &Schedule, target: &dyn Target) -> Result<Program, CodegenError> {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut kernels = Vec::new();
    let mut step_kernel = Vec::with_capacity(s.kernels.len());
    for (i, k) in s.kernels.iter().enumerate() {
        let mut made = kernel(s, PROVISIONAL, k, target)?;
        let index = match seen.get(&made.mlir) {
            Some(&j) => j,
            None => {
                seen.insert(made.mlir.clone(), kernels.len());
                let sym = symbol(i);
                made.mlir = made.mlir.replace(&format!("@{PROVISIONAL}"), &format!("@{sym}"));
                made.symbol = sym;
                kernels.push(made);
                kernels.len() - 1
            }
        };
        step_kernel.push(index);
    }
    Ok(Program { kernels, step_kernel })
}

fn kernel(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let out = plain(s, &k.output);
    let ins = &k.inputs;
    let op = match &k.op {
        KernelOp::Elementwise(expr) => {
            let inputs: Vec<View> = ins.iter().map(|o| plain(s, o)).collect();
            return kernels::elementwise::emit(sym, expr, &inputs, &out);
        }
        KernelOp::Node(op) => op,
    };
    let arg = |n: usize| ins.get(n).ok_or_else(|| bad(op.name()));
    match op {
        Op::MatMul => matmul(s, sym, arg(0)?, arg(1)?, None, Activation::None, &k.output, target),
        Op::MatMulEpilogue { bias, activation } => {
            let b = if *bias { Some(arg(2)?) } else { None };
            matmul(s, sym, arg(0)?, arg(1)?, b, *activation, &k.output, target)
        }
        Op::Attention { scale, causal, masked } => {
            let (q, kk, v) = (plain(s, arg(0)?), plain(s, arg(1)?), plain(s, arg(2)?));
            let mask = if *masked {
                let mut shape = q.shape.clone();
                let sk = kk.shape[kk.rank() - 2];
                let last = shape.len() - 1;
                shape[last] = sk;
                Some(broadcast(s, arg(3)?, &shape))
            } else {
                None
            };
            kernels::attention::emit(sym, &q, &kk, &v, mask.as_ref(), *scale, *causal, &out, target)
        }
        Op::Softmax { axis } => {
            kernels::norm::emit_softmax(sym, &plain(s, arg(0)?), *axis, false, &out, target)
        }
        Op::LogSoftmax { axis } => {
            kernels::norm::emit_softmax(sym, &plain(s, arg(0)?), *axis, true, &out, target)
        }
        Op::LayerNorm { eps, affine } | Op::RmsNorm { eps, affine } => {
            let kind = if matches!(op, Op::LayerNorm { .. }) { NormKind::Layer } else { NormKind::Rms };
            let gamma = if *affine { Some(plain(s, arg(1)?)) } else { None };
            let beta = if *affine && kind == NormKind::Layer { Some(plain(s, arg(2)?)) } else { None };
            let x = plain(s, arg(0)?);
            kernels::norm::emit_norm(sym, kind, *eps, &x, None, gamma.as_ref(), beta.as_ref(), &out, target)
        }
        Op::AddNorm { eps, kind, affine } => {
            let a = broadcast(s, arg(0)?, &out.shape);
            let b = broadcast(s, arg(1)?, &out.shape);
            let gamma = if *affine { Some(plain(s, arg(2)?)) } else { None };
            let beta = if *affine && *kind == NormKind::Layer { Some(plain(s, arg(3)?)) } else { None };
            kernels::norm::emit_norm(
                sym,
                *kind,
                *eps,
                &a,
                Some(&b),
                gamma.as_ref(),
                beta.as_ref(),
                &out,
                target,
            )
        }
        Op::Reduce { op: r, axes, .. } => kernels::reduce::emit(sym, *r, axes, &plain(s, arg(0)?), &out),
        Op::Gather { axis } => {
            kernels::data::emit_gather(sym, *axis, &plain(s, arg(0)?), &plain(s, arg(1)?), &out)
        }
        Op::Concat { axis } => {
            let inputs: Vec<View> = ins.iter().map(|o| plain(s, o)).collect();
            kernels::data::emit_concat(sym, *axis, &inputs, &out)
        }
        Op::Pad { pads, value } => kernels::data::emit_pad(sym, pads, *value, &plain(s, arg(0)?), &out),
        Op::Conv2d { stride, padding, dilation, groups } => kernels::conv::emit_conv2d(
            sym,
            *stride,
            *padding,
            *dilation,
            *groups,
            &plain(s, arg(0)?),
            &plain(s, arg(1)?),
            &out,
        ),
        Op::Pool2d { kind, kernel, stride, padding } => {
            kernels::conv::emit_pool2d(sym, *kind, *kernel, *stride, *padding, &plain(s, arg(0)?), &out)
        }
        other => Err(CodegenError::Unsupported(format!("a kernel for `{}`", other.name()))),
    }
}

/// Normalizes numpy matmul operands to the emitter's `[B…, M, K] · [B…, K, N]` form.
#[allow(clippy::too_many_arguments)]
fn matmul(
    s: &Schedule,
    sym: &str,
    a: &Operand,
    b: &Operand,
    bias: Option<&Operand>,
    activation: Activation,
    out: &Operand,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let av = if a.view.shape.len() == 1 { a.view.unsqueeze(0) } else { a.view.clone() };
    let bv = if b.view.shape.len() == 1 { b.view.unsqueeze(1) } else { b.view.clone() };
    let (ar, br) = (av.shape.len(), bv.shape.len());
    let batch = kiln_ir::broadcast_shapes("matmul", &av.shape[..ar - 2], &bv.shape[..br - 2])
        .map_err(|e| bad(&e.to_string()))?;
    let (m, kd, n) = (av.shape[ar - 2], av.shape[ar - 1], bv.shape[br - 1]);
    let shape_of = |x: usize, y: usize| {
        let mut s = batch.clone();
        s.extend([x, y]);
        s
    };
    let out_shape = shape_of(m, n);
    let a_view = view(s, a, av.broadcast_to(&shape_of(m, kd)));
    let b_view = view(s, b, bv.broadcast_to(&shape_of(kd, n)));
    let to_kernel_shape = |v: &StridedView| v.reshape(&out_shape).ok_or_else(|| bad("matmul result layout"));
    let o_view = view(s, out, to_kernel_shape(&out.view)?);
    let bias_view = match bias {
        Some(bo) => Some(view(s, bo, to_kernel_shape(&bo.view.broadcast_to(&out.view.shape))?)),
        None => None,
    };
    kernels::matmul::emit(sym, &a_view, &b_view, bias_view.as_ref(), activation, &o_view, target)
}
