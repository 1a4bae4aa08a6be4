//! From a schedule to kernels: every scheduled kernel goes to its emitter, with operands
//! turned into views in the shape the emitter's contract asks for (matmul operands promoted
//! and batch-broadcast, masks and residuals broadcast to the result).

use crate::kernels::matmul::Panels;
use crate::kernels::{self, View};
use crate::{CodegenError, Kernel, Target};
use kiln_ir::{Activation, Buffer, Dim, NormKind, Op, Tensor};
use kiln_sched::{BufferId, KernelOp, Operand, Schedule, Storage, StridedView};

/// The MLIR symbol of scheduled kernel `i`.
pub fn symbol(i: usize) -> String {
    format!("k{i}")
}

/// The emitters' view of a static scheduled view. Kernels with a symbolic operand never get
/// here: [`kernel`] sends them to [`crate::dynamic`] first, and the GPU targets refuse a
/// schedule with symbols before emitting anything.
pub(crate) fn view(s: &Schedule, o: &Operand, v: StridedView) -> View {
    View {
        shape: v.shape.iter().map(Dim::fixed).collect(),
        strides: v.strides.iter().map(Dim::fixed).collect(),
        offset: v.offset.fixed(),
        dtype: o.dtype,
        buffer_len: s.buffers[o.buffer].len,
    }
}

pub(crate) fn plain(s: &Schedule, o: &Operand) -> View {
    view(s, o, o.view.clone())
}

pub(crate) fn broadcast(s: &Schedule, o: &Operand, shape: &[usize]) -> View {
    view(s, o, o.view.broadcast_to_static(shape))
}

/// The fault words `k` takes as its last argument when it holds a fault site (see
/// `kiln_sched::Faults`), as a flat `i32` view.
pub(crate) fn fault_slot(s: &Schedule, k: &kiln_sched::Kernel) -> Result<Option<View>, CodegenError> {
    fault_view(fault_words(s), k)
}

/// The number of fault words of `s`, when it has a fault slot.
fn fault_words(s: &Schedule) -> Option<usize> {
    s.faults.as_ref().map(|f| s.buffers[f.slot].len)
}

/// The fault words' view for `k`, given the slot's length in words (`None`: no slot).
fn fault_view(words: Option<usize>, k: &kiln_sched::Kernel) -> Result<Option<View>, CodegenError> {
    if !k.can_fault() {
        return Ok(None);
    }
    let len = words.ok_or_else(|| bad("a fault site without a fault slot"))?;
    Ok(Some(View {
        shape: vec![len],
        strides: vec![1],
        offset: 0,
        dtype: kiln_ir::DType::I32,
        buffer_len: len,
    }))
}

/// Whether two operands address the same elements of the same memory: the same view of one
/// buffer, or of two buffers with one storage (a state slot read through one buffer and
/// updated through another, an arena range handed from a dying input to the output).
pub(crate) fn same_elements(s: &Schedule, a: &Operand, b: &Operand) -> bool {
    a.dtype == b.dtype
        && a.view == b.view
        && (a.buffer == b.buffer || s.buffers[a.buffer].storage == s.buffers[b.buffer].storage)
}

pub(crate) fn bad(what: &str) -> CodegenError {
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
    /// Weights stored packed for the matmul micro-kernel, each distinct packing once.
    pub packed: Vec<PackedWeight>,
    /// For each scheduled kernel, the packed weight (index into `packed`) it reads in place
    /// of its B operand (input 1), if any.
    pub step_packed_b: Vec<Option<usize>>,
    /// For each scheduled kernel, its range when it depends on the symbols (the kernel's own
    /// `range` is then the range at their maxima); `None` for a static range.
    pub step_range: Vec<Option<Dim>>,
}

/// A constant matmul operand (a parameter or literal) that the artifact stores in the
/// micro-kernel's [`Panels`] layout instead of as written: packing happens once, here, rather
/// than in every call.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeight {
    /// The name it is stored under in the artifact's weights.
    pub name: String,
    /// The schedule buffer (a `Weight` or `Const`) it is packed from.
    pub source: BufferId,
    /// Where B's element `(k, n)` is in the source: `offset + k·sk + n·sn`.
    pub offset: usize,
    pub sk: usize,
    pub sn: usize,
    pub panels: Panels,
}

impl PackedWeight {
    /// The packed values, from the source buffer's elements.
    pub fn pack(&self, src: &Tensor) -> Result<Tensor, CodegenError> {
        let bad = |why: &str| CodegenError::Artifact(format!("cannot pack weight `{}`: {why}", self.name));
        let Buffer::F32(values) = &src.data else {
            return Err(bad(&format!("it is {}, not f32", src.dtype())));
        };
        let packed = self.panels.pack(values, self.offset, self.sk, self.sn).ok_or_else(|| {
            bad(&format!(
                "its {} elements do not hold a {}×{} operand",
                values.len(),
                self.panels.k,
                self.panels.n
            ))
        })?;
        let shape = vec![self.panels.n.div_ceil(self.panels.nr), self.panels.k, self.panels.nr];
        Tensor::from_f32(shape, packed).map_err(|e| bad(&e.to_string()))
    }
}

/// Generates every kernel of `s` for `target`. Kernels whose MLIR is the same (the layers of
/// a transformer) are compiled once and shared by their steps.
pub fn kernels(s: &Schedule, target: &dyn Target) -> Result<Program, CodegenError> {
    kernels_with_faults(s, target, &vec![fault_words(s); s.kernels.len()])
}

/// As [`kernels`], for a schedule whose kernels report into different fault slots (the entry
/// points of one artifact, one after another): `words[i]` is the length of kernel `i`'s slot.
pub(crate) fn kernels_with_faults(
    s: &Schedule,
    target: &dyn Target,
    words: &[Option<usize>],
) -> Result<Program, CodegenError> {
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut kernels = Vec::new();
    let mut step_kernel = Vec::with_capacity(s.kernels.len());
    let mut packed: Vec<PackedWeight> = Vec::new();
    let mut step_packed_b = Vec::with_capacity(s.kernels.len());
    let mut step_range = Vec::with_capacity(s.kernels.len());
    for (i, k) in s.kernels.iter().enumerate() {
        let (mut made, pack, range) = if k.operands().all(|o| o.view.is_static()) {
            let (made, pack) = kernel(s, PROVISIONAL, k, words.get(i).copied().flatten(), target)?;
            (made, pack, None)
        } else {
            let slot = fault_view(words.get(i).copied().flatten(), k)?;
            let (made, range, pack) = crate::dynamic::kernel(s, PROVISIONAL, k, slot.as_ref(), target)?;
            (made, pack, Some(range))
        };
        step_range.push(range);
        step_packed_b.push(pack.map(|w| intern(&mut packed, s, w)));
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
    Ok(Program { kernels, step_kernel, packed, step_packed_b, step_range })
}

/// The index of `w` in `packed`, added (and named) if it is new.
fn intern(packed: &mut Vec<PackedWeight>, s: &Schedule, w: Unnamed) -> usize {
    let same = |p: &PackedWeight| {
        (p.source, p.offset, p.sk, p.sn, p.panels) == (w.source, w.offset, w.sk, w.sn, w.panels)
    };
    if let Some(i) = packed.iter().position(same) {
        return i;
    }
    let base = match &s.buffers[w.source].storage {
        Storage::Weight { name } | Storage::Const { name, .. } => name.as_str(),
        _ => "b",
    };
    // `@` does not occur in checkpoint names; a second layout of one weight gets a suffix.
    let mut name = format!("{base}@panels{}", w.panels.nr);
    let mut n = 1;
    while packed.iter().any(|p| p.name == name) {
        n += 1;
        name = format!("{base}@panels{}.{n}", w.panels.nr);
    }
    packed.push(PackedWeight {
        name,
        source: w.source,
        offset: w.offset,
        sk: w.sk,
        sn: w.sn,
        panels: w.panels,
    });
    packed.len() - 1
}

/// A [`PackedWeight`] before it has a name.
pub(crate) struct Unnamed {
    pub source: BufferId,
    pub offset: usize,
    pub sk: usize,
    pub sn: usize,
    pub panels: Panels,
}

fn kernel(
    s: &Schedule,
    sym: &str,
    k: &kiln_sched::Kernel,
    fault_words: Option<usize>,
    target: &dyn Target,
) -> Result<(Kernel, Option<Unnamed>), CodegenError> {
    let out = plain(s, &k.output);
    let ins = &k.inputs;
    let op = match &k.op {
        KernelOp::Elementwise(expr) => {
            let inputs: Vec<View> = ins.iter().map(|o| plain(s, o)).collect();
            let in_place = ins.iter().position(|o| same_elements(s, o, &k.output));
            let slot = fault_view(fault_words, k)?;
            let made = kernels::elementwise::emit(sym, expr, &inputs, &out, in_place, slot.as_ref())?;
            return Ok((made, None));
        }
        KernelOp::Node(op) => op,
    };
    let arg = |n: usize| ins.get(n).ok_or_else(|| bad(op.name()));
    let made = match op {
        Op::MatMul => return matmul(s, sym, arg(0)?, arg(1)?, None, Activation::None, &k.output, target),
        Op::MatMulEpilogue { bias, activation } => {
            let b = if *bias { Some(arg(2)?) } else { None };
            return matmul(s, sym, arg(0)?, arg(1)?, b, *activation, &k.output, target);
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
            let lse = k.extra_outputs.first().map(|o| plain(s, o));
            kernels::attention::emit(
                sym,
                &q,
                &kk,
                Some((&v, &out)),
                mask.as_ref(),
                *scale,
                *causal,
                lse.as_ref(),
                target,
            )
        }
        Op::AttentionLse { scale, causal, masked } => {
            let (q, kk) = (plain(s, arg(0)?), plain(s, arg(1)?));
            let mask = if *masked {
                let mut shape = q.shape.clone();
                let sk = kk.shape[kk.rank() - 2];
                let last = shape.len() - 1;
                shape[last] = sk;
                Some(broadcast(s, arg(2)?, &shape))
            } else {
                None
            };
            kernels::attention::emit(sym, &q, &kk, None, mask.as_ref(), *scale, *causal, Some(&out), target)
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
            kernels::norm::emit_norm(
                sym,
                kind,
                *eps,
                (&x, None),
                gamma.as_ref(),
                beta.as_ref(),
                (&out, None),
                target,
            )
        }
        Op::AddNorm { eps, kind, affine } => {
            let a = broadcast(s, arg(0)?, &out.shape);
            let b = broadcast(s, arg(1)?, &out.shape);
            let gamma = if *affine { Some(plain(s, arg(2)?)) } else { None };
            let beta = if *affine && *kind == NormKind::Layer { Some(plain(s, arg(3)?)) } else { None };
            let sum = k.extra_outputs.first().map(|o| plain(s, o));
            kernels::norm::emit_norm(
                sym,
                *kind,
                *eps,
                (&a, Some(&b)),
                gamma.as_ref(),
                beta.as_ref(),
                (&out, sum.as_ref()),
                target,
            )
        }
        Op::Reduce { op: r, axes, .. } => {
            kernels::reduce::emit(sym, *r, axes, &plain(s, arg(0)?), &out, target)
        }
        Op::Gather { axis } => {
            kernels::data::emit_gather(sym, *axis, &plain(s, arg(0)?), &plain(s, arg(1)?), &out)
        }
        Op::ScatterAdd { axis, extent } => {
            let (u, i, o) = scatter_views(s, arg(0)?, arg(1)?, &k.output, *axis, *extent)?;
            kernels::scatter::emit(sym, &u, &i, &o)
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
            target,
        ),
        Op::Pool2d { kind, kernel, stride, padding } => kernels::conv::emit_pool2d(
            sym,
            *kind,
            *kernel,
            *stride,
            *padding,
            &plain(s, arg(0)?),
            &out,
            target,
        ),
        other => Err(CodegenError::Unsupported(format!("a kernel for `{}`", other.name()))),
    };
    Ok((made?, None))
}

/// Normalizes numpy matmul operands to the emitter's `[B…, M, K] · [B…, K, N]` form. A
/// constant B, the same for every batch index, is read from a packed copy made at compile
/// time (returned for the artifact to store).
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
) -> Result<(Kernel, Option<Unnamed>), CodegenError> {
    let MatmulViews { a: a_view, b: b_view, bias: bias_view, out: o_view, m, k: kd, n } =
        matmul_views(s, a, b, bias, out)?;
    let constant = matches!(s.buffers[b.buffer].storage, Storage::Weight { .. } | Storage::Const { .. });
    let lead = b_view.rank() - 2;
    let shared = b_view.strides[..lead].iter().zip(&b_view.shape).all(|(&st, &d)| st == 0 || d == 1);
    if constant && shared && m > 0 && b.dtype == out.dtype && Panels::applies(out.dtype, kd, n) {
        let panels = Panels::for_target(kd, n, target);
        let (sk, sn) = (b_view.strides[lead], b_view.strides[lead + 1]);
        let pack = Unnamed { source: b.buffer, offset: b_view.offset, sk, sn, panels };
        let k = kernels::matmul::emit_prepacked(
            sym,
            &a_view,
            panels,
            bias_view.as_ref(),
            activation,
            &o_view,
            target,
        )?;
        return Ok((k, Some(pack)));
    }
    let k = kernels::matmul::emit(sym, &a_view, &b_view, bias_view.as_ref(), activation, &o_view, target)?;
    Ok((k, None))
}

/// A matmul's operands in the emitters' `[B…, M, K] · [B…, K, N]` form, batch-broadcast, with
/// the bias and the result as `[B…, M, N]` views.
pub(crate) struct MatmulViews {
    pub a: View,
    pub b: View,
    pub bias: Option<View>,
    pub out: View,
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

/// Normalizes numpy matmul operands (1-D operands promoted, batch axes broadcast).
pub(crate) fn matmul_views(
    s: &Schedule,
    a: &Operand,
    b: &Operand,
    bias: Option<&Operand>,
    out: &Operand,
) -> Result<MatmulViews, CodegenError> {
    let av = if a.view.shape.len() == 1 { a.view.unsqueeze(0) } else { a.view.clone() };
    let bv = if b.view.shape.len() == 1 { b.view.unsqueeze(1) } else { b.view.clone() };
    let (ar, br) = (av.shape.len(), bv.shape.len());
    let batch = kiln_ir::broadcast_shapes("matmul", &av.shape[..ar - 2], &bv.shape[..br - 2])
        .map_err(|e| bad(&e.to_string()))?;
    let batch: Vec<usize> = batch.iter().map(Dim::fixed).collect();
    let (m, kd, n) = (av.shape[ar - 2].fixed(), av.shape[ar - 1].fixed(), bv.shape[br - 1].fixed());
    let shape_of = |x: usize, y: usize| {
        let mut s = batch.clone();
        s.extend([x, y]);
        s
    };
    let out_shape = shape_of(m, n);
    let a = view(s, a, av.broadcast_to_static(&shape_of(m, kd)));
    let b = view(s, b, bv.broadcast_to_static(&shape_of(kd, n)));
    let to_kernel_shape =
        |v: &StridedView| v.reshape_static(&out_shape).ok_or_else(|| bad("matmul result layout"));
    let out_view = view(s, out, to_kernel_shape(&out.view)?);
    let bias = match bias {
        Some(bo) => Some(view(s, bo, to_kernel_shape(&bo.view.broadcast_to(&out.view.shape))?)),
        None => None,
    };
    Ok(MatmulViews { a, b, bias, out: out_view, m, k: kd, n })
}

/// A scatter-add's operands in the emitters' form: updates `[pre, positions, post]`, indices
/// `[positions]`, the result `[pre, extent, post]` (the scheduler copies an operand whose
/// strides cannot be merged that way).
pub(crate) fn scatter_views(
    s: &Schedule,
    updates: &Operand,
    indices: &Operand,
    out: &Operand,
    axis: usize,
    extent: usize,
) -> Result<(View, View, View), CodegenError> {
    let shape: Vec<usize> = updates.view.shape.iter().map(Dim::fixed).collect();
    let n: usize = indices.view.shape.iter().map(Dim::fixed).product();
    let k = indices.view.shape.len();
    if shape.len() < axis + k {
        return Err(bad("scatter_add updates rank"));
    }
    let pre: usize = shape[..axis].iter().product();
    let post: usize = shape[axis + k..].iter().product();
    let as_shape = |o: &Operand, dims: &[usize]| {
        o.view.reshape_static(dims).map(|v| view(s, o, v)).ok_or_else(|| bad("scatter_add operand layout"))
    };
    Ok((as_shape(updates, &[pre, n, post])?, as_shape(indices, &[n])?, as_shape(out, &[pre, extent, post])?))
}
