//! Fused ops: softmax, log_softmax, layer_norm, rms_norm, gelu, attention, add_norm and
//! matmul_epilogue.
//!
//! Each kernel computes what its primitive form computes, step by step and in the same
//! order, so a fused op and the primitives it stands for agree (for f32 and f64 to the last
//! bit, when the primitive form is written the way it is given below, as the std layers are):
//!
//! * **Compute type**: f64 for f64 operands, f32 for f32, f16 and bf16 (halves are widened
//!   exactly, the whole op runs in f32 and the result is rounded back once, like every other op).
//! * Elementwise steps run in the compute type. **Sums** (softmax's denominator, the means
//!   of the norms) accumulate in f64 in increasing index order and are rounded once to the
//!   compute type, like `reduce_sum` / `reduce_mean`; **maxima** compare in the compute type
//!   and propagate NaN, like `reduce_max`. **Products** (q·kᵀ, p·v, the epilogue's matmul)
//!   accumulate in the compute type in increasing index order, like `matmul`.
//!
//! Per op (`n` is the extent of the normalized axis, `F(…)` rounds to the compute type):
//!
//! * `softmax`: `m = max x`, `e = exp(x − m)`, `y = e / F(Σ e)`, along the axis (std.softmax).
//!   `log_softmax`: `d = x − m`, `y = d − log F(Σ exp d)`.
//! * `layer_norm` (last axis): `μ = F(Σ x / n)`, `c = x − μ`, `σ² = F(Σ c·c / n)`,
//!   `y = c / √(σ² + eps)`, then `y·γ + β` (std.layer_norm).
//! * `rms_norm` (last axis): `ms = F(Σ x·x / n)`, `y = x · (1 / √(ms + eps))`, then `y·γ`
//!   (std.rms_norm).
//! * `gelu`: erf form `(½·x)·(1 + erf(x / √2))` (std.gelu); tanh form
//!   `(½·x)·(1 + tanh(√(2/π)·(x + 0.044715·(x·(x·x)))))` (std.gelu_tanh).
//! * `attention`, for each batch index and query row `i`: `s_j = (Σ_d q_id·k_jd)·scale`, plus
//!   `mask_ij`; with `causal`, `s_j = −inf` for `j > i` (after the mask, as
//!   `where(iota0 >= iota1, s, −inf)` does); `p = softmax(s)`; `out_i = Σ_j p_j·v_j` over every
//!   `j`. A row whose scores are all −inf gives NaN, as the primitive form does. With no keys
//!   (`Sk = 0`) and a non-empty result it is an [`EvalError::EmptyReduction`], like the
//!   primitive form's `reduce_max`. Only one row of scores per thread is ever held (plus a
//!   transposed copy of k, so the dot products run as contiguous row updates).
//! * `attention_lse`, per query row: the scores `s` as attention forms them, `m = max s`, then
//!   `m + log Σ_j exp(s_j − m)` all in f64 (the exponentials and the logarithm too, so an f32
//!   result is the exact value rounded once: a reference for the kernels, which keep it as a
//!   by-product of their online softmax); `−inf` for a row whose scores are all −inf (the log
//!   of an empty sum), NaN when a score is NaN. No keys is an [`EvalError::EmptyReduction`].
//! * `add_norm`: `s = a + b` (broadcast), then the layer or RMS norm of `s` as above.
//! * `matmul_epilogue`: `act(matmul(a, b) + bias)`; relu keeps NaN (`x < 0 ? 0 : x`), sigmoid
//!   is `1 / (1 + exp(−x))`, gelu as above.
//!
//! Every output element is computed in a fixed order whatever the number of threads.

use super::elem::{broadcast_strides, narrow_like, widen_f32, Real, PAR_MIN};
use super::elementwise::zip_broadcast;
use super::linalg::{matmul_slices, MatElem};
use super::{unravel, EvalError};
use crate::dtype::{numel, DType};
use crate::interp::StaticType;
use crate::op::{Activation, GeluApprox, NormKind};
use crate::tensor::{Buffer, Tensor};
use rayon::prelude::*;

/// Below this many multiply-adds an attention runs on the calling thread.
const PAR_FLOPS: usize = 1 << 16;

/// f32 and f64, the types fused kernels compute in, with access to their buffers.
trait Float: Real + MatElem {
    fn slice(b: &Buffer) -> Option<&[Self]>;
    fn buffer(v: Vec<Self>) -> Buffer;
}

impl Float for f32 {
    fn slice(b: &Buffer) -> Option<&[f32]> {
        match b {
            Buffer::F32(v) => Some(v),
            _ => None,
        }
    }
    fn buffer(v: Vec<f32>) -> Buffer {
        Buffer::F32(v)
    }
}

impl Float for f64 {
    fn slice(b: &Buffer) -> Option<&[f64]> {
        match b {
            Buffer::F64(v) => Some(v),
            _ => None,
        }
    }
    fn buffer(v: Vec<f64>) -> Buffer {
        Buffer::F64(v)
    }
}

/// A fused kernel over the operands' elements in the compute type.
trait Kernel {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError>;
}

fn not_defined(op: &'static str, args: &[&Tensor]) -> EvalError {
    let dtypes: Vec<String> = args.iter().map(|a| a.dtype().to_string()).collect();
    EvalError::Operands { op, msg: format!("not defined on {}", dtypes.join(" × ")) }
}

/// Runs `k` in the compute type of the operands' (common) dtype and wraps the result.
fn apply(k: &impl Kernel, op: &'static str, args: &[&Tensor], ty: &StaticType) -> Result<Tensor, EvalError> {
    fn typed<'a, F: Float>(args: &[&'a Tensor]) -> Option<Vec<&'a [F]>> {
        args.iter().map(|a| F::slice(&a.data)).collect()
    }
    let dtype = args[0].dtype();
    if args.iter().any(|a| a.dtype() != dtype) {
        return Err(not_defined(op, args));
    }
    let data = match dtype {
        DType::F32 => f32::buffer(k.run(&typed::<f32>(args).ok_or_else(|| not_defined(op, args))?)?),
        DType::F64 => f64::buffer(k.run(&typed::<f64>(args).ok_or_else(|| not_defined(op, args))?)?),
        DType::F16 | DType::BF16 => {
            let wide: Vec<Vec<f32>> = args
                .iter()
                .map(|a| widen_f32(&a.data))
                .collect::<Option<_>>()
                .ok_or_else(|| not_defined(op, args))?;
            let refs: Vec<&[f32]> = wide.iter().map(Vec::as_slice).collect();
            narrow_like(dtype, k.run(&refs)?)
        }
        _ => return Err(not_defined(op, args)),
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

/// `f` over consecutive chunks of `len` elements of `y`, in parallel when `y` is large.
fn for_chunks<F: Send>(y: &mut [F], len: usize, f: impl Fn(usize, &mut [F]) + Sync + Send) {
    if y.is_empty() || len == 0 {
        return;
    }
    if y.len() >= PAR_MIN && y.len() > len {
        y.par_chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    } else {
        y.chunks_mut(len).enumerate().for_each(|(i, c)| f(i, c));
    }
}

// ------------------------------------------------------------------------------- softmax

struct SoftmaxK<'a> {
    shape: &'a [usize],
    axis: usize,
    log: bool,
}

impl Kernel for SoftmaxK<'_> {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError> {
        let x = args[0];
        let n = self.shape[self.axis];
        let inner: usize = self.shape[self.axis + 1..].iter().product();
        let mut y = vec![<F as Real>::ZERO; x.len()];
        // One block is the `n × inner` elements of one outer index; the rows run along `n`
        // with stride `inner`, and the `inner` rows of a block are processed together.
        for_chunks(&mut y, n * inner, |b, yb| {
            softmax_block(&x[b * n * inner..(b + 1) * n * inner], yb, inner, self.log)
        });
        Ok(y)
    }
}

fn softmax_block<F: Float>(x: &[F], y: &mut [F], inner: usize, log: bool) {
    let mut max = vec![F::NEG_INFINITY; inner];
    for xr in x.chunks(inner) {
        for (m, &v) in max.iter_mut().zip(xr) {
            *m = m.max_nan(v);
        }
    }
    let mut sum = vec![0f64; inner];
    for (xr, yr) in x.chunks(inner).zip(y.chunks_mut(inner)) {
        for t in 0..inner {
            let d = xr[t].sub(max[t]);
            let e = d.exp();
            sum[t] += e.to_f64();
            yr[t] = if log { d } else { e };
        }
    }
    let denom: Vec<F> = sum.iter().map(|&s| if log { F::from_f64(s).ln() } else { F::from_f64(s) }).collect();
    for yr in y.chunks_mut(inner) {
        for (v, &s) in yr.iter_mut().zip(&denom) {
            *v = if log { v.sub(s) } else { v.div(s) };
        }
    }
}

/// `softmax` (or `log_softmax` when `log`) along `axis`.
pub(crate) fn softmax(x: &Tensor, axis: usize, log: bool, ty: &StaticType) -> Result<Tensor, EvalError> {
    let op = if log { "log_softmax" } else { "softmax" };
    apply(&SoftmaxK { shape: &x.shape, axis, log }, op, &[x], ty)
}

// ------------------------------------------------------------------------------- norms

struct NormK<'a> {
    kind: NormKind,
    eps: f64,
    /// Whether the operands start with two addends (`add_norm`) rather than one input.
    add: bool,
    shapes: Vec<&'a [usize]>,
    out: &'a [usize],
}

impl Kernel for NormK<'_> {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError> {
        let (mut y, params) = if self.add {
            (
                zip_broadcast(args[0], self.shapes[0], args[1], self.shapes[1], self.out, |a, b| a + b),
                &args[2..],
            )
        } else {
            (args[0].to_vec(), &args[1..])
        };
        let n = self.out.last().copied().unwrap_or(1);
        let (gamma, beta) = (params.first().copied(), params.get(1).copied());
        let eps = F::from_f64(self.eps);
        let kind = self.kind;
        for_chunks(&mut y, n, |_, row| normalize(row, kind, eps, gamma, beta));
        Ok(y)
    }
}

/// Normalizes one row in place, then scales by `gamma` and shifts by `beta` when given.
fn normalize<F: Float>(row: &mut [F], kind: NormKind, eps: F, gamma: Option<&[F]>, beta: Option<&[F]>) {
    let n = row.len() as f64;
    match kind {
        NormKind::Layer => {
            let mean = F::from_f64(row.iter().map(|v| v.to_f64()).sum::<f64>() / n);
            for v in row.iter_mut() {
                *v = v.sub(mean);
            }
            let var = F::from_f64(row.iter().map(|&c| (c * c).to_f64()).sum::<f64>() / n);
            let denom = (var + eps).sqrt();
            for v in row.iter_mut() {
                *v = v.div(denom);
            }
        }
        NormKind::Rms => {
            let ms = F::from_f64(row.iter().map(|&v| (v * v).to_f64()).sum::<f64>() / n);
            let r = F::ONE.div((ms + eps).sqrt());
            for v in row.iter_mut() {
                *v = *v * r;
            }
        }
    }
    if let Some(g) = gamma {
        for (v, &g) in row.iter_mut().zip(g) {
            *v = *v * g;
        }
    }
    if let Some(b) = beta {
        for (v, &b) in row.iter_mut().zip(b) {
            *v = *v + b;
        }
    }
}

/// `layer_norm` / `rms_norm` (`add` false: operands `[x, params…]`) and `add_norm` (`add`
/// true: operands `[a, b, params…]`), over the last axis of the result.
pub(crate) fn norm(
    args: &[&Tensor],
    kind: NormKind,
    eps: f64,
    add: bool,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let op = match (add, kind) {
        (true, _) => "add_norm",
        (false, NormKind::Layer) => "layer_norm",
        (false, NormKind::Rms) => "rms_norm",
    };
    let shapes = args.iter().map(|a| a.shape.as_slice()).collect();
    apply(&NormK { kind, eps, add, shapes, out: &ty.shape }, op, args, ty)
}

// ------------------------------------------------------------------------------- gelu

/// GELU of one value, in the order of std.gelu / std.gelu_tanh.
#[inline(always)]
fn gelu_of<F: Real>(x: F, approx: GeluApprox) -> F {
    let half_x = F::from_f64(0.5) * x;
    match approx {
        GeluApprox::Erf => half_x * (F::ONE + x.div(F::from_f64(std::f64::consts::SQRT_2)).erf()),
        GeluApprox::Tanh => {
            let c = F::from_f64((2.0 / std::f64::consts::PI).sqrt());
            let inner = c * (x + F::from_f64(0.044715) * (x * (x * x)));
            half_x * (F::ONE + inner.tanh())
        }
    }
}

/// An epilogue activation of one value, as the unary ops compute it.
#[inline(always)]
fn activate<F: Real>(x: F, act: Activation) -> F {
    match act {
        Activation::None => x,
        Activation::Relu => {
            if x < <F as Real>::ZERO {
                <F as Real>::ZERO
            } else {
                x
            }
        }
        Activation::Gelu(approx) => gelu_of(x, approx),
        Activation::Sigmoid => F::ONE.div(F::ONE + x.neg().exp()),
        Activation::Tanh => x.tanh(),
        Activation::Silu => x.div(F::ONE + x.neg().exp()),
    }
}

struct GeluK(GeluApprox);

impl Kernel for GeluK {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError> {
        let (x, approx) = (args[0], self.0);
        Ok(if x.len() >= PAR_MIN {
            x.par_iter().map(|&v| gelu_of(v, approx)).collect()
        } else {
            x.iter().map(|&v| gelu_of(v, approx)).collect()
        })
    }
}

pub(crate) fn gelu(x: &Tensor, approx: GeluApprox, ty: &StaticType) -> Result<Tensor, EvalError> {
    apply(&GeluK(approx), "gelu", &[x], ty)
}

// ------------------------------------------------------------------------------- attention

struct AttentionK<'a> {
    q: &'a [usize],
    k: &'a [usize],
    v: &'a [usize],
    mask: Option<&'a [usize]>,
    scale: f64,
    causal: bool,
}

impl Kernel for AttentionK<'_> {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError> {
        let (q, k, v, mask) = (args[0], args[1], args[2], args.get(3).copied());
        let r = self.q.len();
        let batch = &self.q[..r - 2];
        let nb = numel(batch);
        let (sq, d) = (self.q[r - 2], self.q[r - 1]);
        let sk = self.k[r - 2];
        let dv = self.v[r - 1];
        let mut out = vec![<F as Real>::ZERO; nb * sq * dv];
        if out.is_empty() {
            return Ok(out);
        }
        let mut scores_shape = batch.to_vec();
        scores_shape.extend([sq, sk]);
        if sk == 0 {
            return Err(EvalError::EmptyReduction { op: "attention", shape: scores_shape });
        }
        // The mask's offset for each batch index, and its strides along i and j.
        let (mask_off, msq, msk) = match self.mask {
            Some(ms) => {
                let st = broadcast_strides(ms, &scores_shape);
                let off: Vec<usize> =
                    (0..nb).map(|b| unravel(b, batch).iter().zip(&st).map(|(i, s)| i * s).sum()).collect();
                (off, st[r - 2], st[r - 1])
            }
            None => (Vec::new(), 0, 0),
        };
        let scale = F::from_f64(self.scale);
        let causal = self.causal;
        // kᵀ per batch, [D, Sk], so that one query's dot products with every key run as
        // contiguous `s += q_d · kᵀ[d]` row updates (each score still sums over d in
        // increasing order from 0, as matmul does).
        let mut kt = vec![<F as Real>::ZERO; k.len()];
        for_chunks(&mut kt, d * sk, |b, ktb| {
            for (j, kj) in k[b * sk * d..(b + 1) * sk * d].chunks_exact(d).enumerate() {
                for (dd, &x) in kj.iter().enumerate() {
                    ktb[dd * sk + j] = x;
                }
            }
        });
        // One output row: scores for every key, softmax, then the weighted sum of values.
        let row = |s: &mut Vec<F>, idx: usize, o: &mut [F]| {
            let (b, i) = (idx / sq, idx % sq);
            let qi = &q[idx * d..(idx + 1) * d];
            let ktb = &kt[b * d * sk..(b + 1) * d * sk];
            let vb = &v[b * sk * dv..(b + 1) * sk * dv];
            // Keys past `seen` are hidden by the causal mask: −inf whatever their score.
            let seen = if causal { (i + 1).min(sk) } else { sk };
            let (live, hidden) = s.split_at_mut(seen);
            live.fill(<F as Real>::ZERO);
            for (dd, &qd) in qi.iter().enumerate() {
                for (sj, &kv) in live.iter_mut().zip(&ktb[dd * sk..dd * sk + seen]) {
                    *sj = *sj + qd * kv;
                }
            }
            for (j, sj) in live.iter_mut().enumerate() {
                *sj = *sj * scale;
                if let Some(m) = mask {
                    *sj = *sj + m[mask_off[b] + i * msq + j * msk];
                }
            }
            hidden.fill(F::NEG_INFINITY);
            let max = s.iter().fold(F::NEG_INFINITY, |m, &x| m.max_nan(x));
            let mut sum = 0f64;
            for x in s.iter_mut() {
                *x = x.sub(max).exp();
                sum += x.to_f64();
            }
            let sum = F::from_f64(sum);
            for (&e, vj) in s.iter().zip(vb.chunks_exact(dv)) {
                let p = e.div(sum);
                for (ov, &vv) in o.iter_mut().zip(vj) {
                    *ov = *ov + p * vv;
                }
            }
        };
        if nb * sq * sk * (d + dv) >= PAR_FLOPS {
            out.par_chunks_mut(dv)
                .enumerate()
                .for_each_init(|| vec![<F as Real>::ZERO; sk], |s, (idx, o)| row(s, idx, o));
        } else {
            let mut s = vec![<F as Real>::ZERO; sk];
            for (idx, o) in out.chunks_mut(dv).enumerate() {
                row(&mut s, idx, o);
            }
        }
        Ok(out)
    }
}

/// `attention(q, k, v[, mask])` with `scale` and `causal`.
pub(crate) fn attention(
    args: &[&Tensor],
    scale: f64,
    causal: bool,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let k = AttentionK {
        q: &args[0].shape,
        k: &args[1].shape,
        v: &args[2].shape,
        mask: args.get(3).map(|m| m.shape.as_slice()),
        scale,
        causal,
    };
    apply(&k, "attention", args, ty)
}

// ------------------------------------------------------------------------------- attention's log-sum-exp

struct AttentionLseK<'a> {
    q: &'a [usize],
    k: &'a [usize],
    mask: Option<&'a [usize]>,
    scale: f64,
    causal: bool,
}

impl Kernel for AttentionLseK<'_> {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError> {
        let (q, k, mask) = (args[0], args[1], args.get(2).copied());
        let r = self.q.len();
        let batch = &self.q[..r - 2];
        let nb = numel(batch);
        let (sq, d) = (self.q[r - 2], self.q[r - 1]);
        let sk = self.k[r - 2];
        let mut out = vec![<F as Real>::ZERO; nb * sq];
        if out.is_empty() {
            return Ok(out);
        }
        let mut scores_shape = batch.to_vec();
        scores_shape.extend([sq, sk]);
        if sk == 0 {
            return Err(EvalError::EmptyReduction { op: "attention_lse", shape: scores_shape });
        }
        let (mask_off, msq, msk) = match self.mask {
            Some(ms) => {
                let st = broadcast_strides(ms, &scores_shape);
                let off: Vec<usize> =
                    (0..nb).map(|b| unravel(b, batch).iter().zip(&st).map(|(i, s)| i * s).sum()).collect();
                (off, st[r - 2], st[r - 1])
            }
            None => (Vec::new(), 0, 0),
        };
        let scale = F::from_f64(self.scale);
        // One row: the scores of the keys it sees (as attention forms them), then the
        // log-sum-exp in f64.
        let row = |s: &mut Vec<F>, idx: usize, o: &mut F| {
            let (b, i) = (idx / sq, idx % sq);
            let qi = &q[idx * d..(idx + 1) * d];
            let seen = if self.causal { (i + 1).min(sk) } else { sk };
            s.clear();
            for j in 0..seen {
                let kj = &k[(b * sk + j) * d..(b * sk + j + 1) * d];
                let dot = qi.iter().zip(kj).fold(<F as Real>::ZERO, |acc, (&x, &y)| acc + x * y);
                let mut sj = dot * scale;
                if let Some(m) = mask {
                    sj = sj + m[mask_off[b] + i * msq + j * msk];
                }
                s.push(sj);
            }
            let max = s.iter().fold(F::NEG_INFINITY, |m, &x| m.max_nan(x)).to_f64();
            *o = F::from_f64(if max == f64::NEG_INFINITY {
                max
            } else {
                max + s.iter().map(|&x| (x.to_f64() - max).exp()).sum::<f64>().ln()
            });
        };
        if nb * sq * sk * d >= PAR_FLOPS {
            out.par_iter_mut()
                .enumerate()
                .for_each_init(|| Vec::with_capacity(sk), |s, (idx, o)| row(s, idx, o));
        } else {
            let mut s = Vec::with_capacity(sk);
            for (idx, o) in out.iter_mut().enumerate() {
                row(&mut s, idx, o);
            }
        }
        Ok(out)
    }
}

/// `attention_lse(q, k[, mask])` with `scale` and `causal`.
pub(crate) fn attention_lse(
    args: &[&Tensor],
    scale: f64,
    causal: bool,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let k = AttentionLseK {
        q: &args[0].shape,
        k: &args[1].shape,
        mask: args.get(2).map(|m| m.shape.as_slice()),
        scale,
        causal,
    };
    apply(&k, "attention_lse", args, ty)
}

// ------------------------------------------------------------------------------- matmul epilogue

struct EpilogueK<'a> {
    a: &'a [usize],
    b: &'a [usize],
    bias: Option<&'a [usize]>,
    out: &'a [usize],
    act: Activation,
}

impl Kernel for EpilogueK<'_> {
    fn run<F: Float>(&self, args: &[&[F]]) -> Result<Vec<F>, EvalError> {
        let p = matmul_slices(args[0], self.a, args[1], self.b);
        let act = self.act;
        Ok(match self.bias {
            Some(bs) => zip_broadcast(&p, self.out, args[2], bs, self.out, |x, c| activate(x + c, act)),
            None if act == Activation::None => p,
            None if p.len() >= PAR_MIN => p.into_par_iter().map(|x| activate(x, act)).collect(),
            None => p.into_iter().map(|x| activate(x, act)).collect(),
        })
    }
}

/// `activation(matmul(a, b) [+ bias])`.
pub(crate) fn matmul_epilogue(
    args: &[&Tensor],
    act: Activation,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let k = EpilogueK {
        a: &args[0].shape,
        b: &args[1].shape,
        bias: args.get(2).map(|c| c.shape.as_slice()),
        out: &ty.shape,
        act,
    };
    apply(&k, "matmul_epilogue", args, ty)
}
