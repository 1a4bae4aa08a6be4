//! Gradient rules of the fused ops a spec may call directly (softmax, log-softmax, the norms,
//! GELU, attention and its log-sum-exp, matmul with epilogue). Each is the closed-form backward of the op's
//! primitive form (`interp/fused.rs`), written with primitives; what the backward needs of
//! the forward (a norm's statistics) is recomputed from the operands rather than saved, so the
//! forward op stays one node, and the e-graph may share the common parts. Attention is the
//! exception: its backward reads the log-sum-exp of the scores (`attention_lse`), a node of
//! its own that the scheduler computes in the forward attention's kernel.

use super::emit::Emit;
use super::rules::{self, Grads, Site};
use crate::dtype::DType;
use crate::graph::NodeId;
use crate::infer::InferError;
use crate::op::{Activation, CompareOp, GeluApprox, NormKind, Op, UnaryOp};
use std::f64::consts::PI;

type R = Result<NodeId, InferError>;

/// `y · (gy − Σ gy·y)` along `axis`.
pub(super) fn softmax(e: &mut Emit, axis: usize, y: NodeId, gy: NodeId) -> R {
    let gyy = e.mul(gy, y)?;
    let s = e.sum(gyy, &[axis], true)?;
    let d = e.sub(gy, s)?;
    e.mul(y, d)
}

/// `gy − exp(y) · Σ gy` along `axis`.
pub(super) fn log_softmax(e: &mut Emit, axis: usize, y: NodeId, gy: NodeId) -> R {
    let s = e.sum(gy, &[axis], true)?;
    let p = e.unary(UnaryOp::Exp, y)?;
    let ps = e.mul(p, s)?;
    e.sub(gy, ps)
}

/// Layer norm, RMS norm and add-norm. With `x̂` the normalized input, `r` the reciprocal
/// standard deviation (or RMS) and `ĝ = gy · gamma`:
/// layer: `gx = r · (ĝ − mean(ĝ) − x̂ · mean(ĝ · x̂))`; rms: `gx = r · (ĝ − x̂ · mean(ĝ · x̂))`;
/// `gamma` gets `Σ gy · x̂` and `beta` gets `Σ gy` over every axis but the last. Add-norm
/// normalizes `a + b` and sums that gradient back to each addend's shape.
pub(super) fn norm(e: &mut Emit, kind: NormKind, eps: f64, add: bool, s: &Site) -> Grads {
    let (x, gy) = (s.x, s.gy);
    let (input, params) = if add { (e.add(x[0], x[1])?, &x[2..]) } else { (x[0], &x[1..]) };
    let first_param = if add { 2 } else { 1 };
    let rank = e.ty(input).rank();
    let eps_n = e.scalar(eps, input)?;
    let (centered, ms) = match kind {
        NormKind::Layer => {
            let mean = e.mean_last(input)?;
            let c = e.sub(input, mean)?;
            let c2 = e.mul(c, c)?;
            (c, e.mean_last(c2)?)
        }
        NormKind::Rms => {
            let x2 = e.mul(input, input)?;
            (input, e.mean_last(x2)?)
        }
    };
    let v = e.add(ms, eps_n)?;
    let r = e.unary(UnaryOp::Rsqrt, v)?;
    let xhat = e.mul(centered, r)?;
    let ghat = match params.first() {
        Some(&gamma) => e.mul(gy, gamma)?,
        None => gy,
    };
    let gx = xhat_back(e, kind, ghat, xhat, r)?;
    let mut out = Vec::with_capacity(x.len());
    if add {
        for (&xi, &want) in x.iter().zip(s.wants).take(2) {
            out.push(if want { Some(e.unbroadcast(gx, &e.shape(xi))?) } else { None });
        }
    } else {
        out.push(if s.wants[0] { Some(gx) } else { None });
    }
    let outer: Vec<usize> = (0..rank - 1).collect();
    if !params.is_empty() {
        out.push(if s.wants[first_param] {
            let t = e.mul(gy, xhat)?;
            Some(e.sum(t, &outer, false)?)
        } else {
            None
        });
    }
    if params.len() == 2 {
        out.push(if s.wants[first_param + 1] { Some(e.sum(gy, &outer, false)?) } else { None });
    }
    Ok(out)
}

/// The gradient of a norm's input from the gradient `ghat` of its normalized value `xhat`.
fn xhat_back(e: &mut Emit, kind: NormKind, ghat: NodeId, xhat: NodeId, r: NodeId) -> R {
    let gx = e.mul(ghat, xhat)?;
    let m = e.mean_last(gx)?;
    let proj = e.mul(xhat, m)?;
    let mut d = e.sub(ghat, proj)?;
    if kind == NormKind::Layer {
        let mg = e.mean_last(ghat)?;
        d = e.sub(d, mg)?;
    }
    e.mul(r, d)
}

/// `gy · gelu'(x)`: erf form `Φ(x) + x·φ(x)`; tanh form
/// `½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²)` with `t = tanh(√(2/π)(x + 0.044715x³))`.
pub(super) fn gelu(e: &mut Emit, approx: GeluApprox, x: NodeId, gy: NodeId) -> R {
    let d = match approx {
        GeluApprox::Erf => {
            let xs = e.scale(x, std::f64::consts::FRAC_1_SQRT_2)?;
            let erf = e.unary(UnaryOp::Erf, xs)?;
            let one = e.scalar(1.0, x)?;
            let cdf = e.add(one, erf)?;
            let cdf = e.scale(cdf, 0.5)?;
            let x2 = e.mul(x, x)?;
            let h = e.scale(x2, -0.5)?;
            let pdf = e.unary(UnaryOp::Exp, h)?;
            let pdf = e.scale(pdf, 1.0 / (2.0 * PI).sqrt())?;
            let xpdf = e.mul(x, pdf)?;
            e.add(cdf, xpdf)?
        }
        GeluApprox::Tanh => {
            let c = (2.0 / PI).sqrt();
            let x2 = e.mul(x, x)?;
            let x3 = e.mul(x2, x)?;
            let k = e.scale(x3, 0.044715)?;
            let inner = e.add(x, k)?;
            let inner = e.scale(inner, c)?;
            let t = e.unary(UnaryOp::Tanh, inner)?;
            let one_t = {
                let one = e.scalar(1.0, t)?;
                e.add(one, t)?
            };
            let left = e.scale(one_t, 0.5)?;
            let t2 = e.mul(t, t)?;
            let sech2 = e.rsub(1.0, t2)?;
            let k3 = e.scale(x2, 3.0 * 0.044715)?;
            let dinner = {
                let one = e.scalar(1.0, k3)?;
                e.add(one, k3)?
            };
            let dinner = e.scale(dinner, c)?;
            let right = e.mul(sech2, dinner)?;
            let right = e.mul(x, right)?;
            let right = e.scale(right, 0.5)?;
            e.add(left, right)?
        }
    };
    e.mul(gy, d)
}

/// SiLU's derivative, σ(x)·(1 + x·(1 − σ(x))), times the incoming gradient.
fn silu(e: &mut Emit, x: NodeId, gy: NodeId) -> R {
    let s = e.unary(UnaryOp::Sigmoid, x)?;
    let not_s = e.rsub(1.0, s)?;
    let x_not_s = e.mul(x, not_s)?;
    let one = e.scalar(1.0, x_not_s)?;
    let t = e.add(one, x_not_s)?;
    let d = e.mul(s, t)?;
    e.mul(gy, d)
}

/// Attention recomputes its probabilities from the log-sum-exp of its scores, the statistic
/// its forward kernel writes beside the output (`attention_lse` of the same operands, one node
/// the scheduler computes with the attention): `p = exp(s − lse)` with
/// `s = q·kᵀ·scale + mask` (causal entries `j > i` at −inf, so `p = 0` there), no second
/// reduction over the keys. Then `gv = pᵀ·gy`, `gp = gy·vᵀ` and, since `Σⱼ gpᵢⱼ·pᵢⱼ` is
/// `Σ_c gyᵢ_c·yᵢ_c`, the row term `Δ = Σ gy·y` from the output instead of the `Sq × Sk`
/// product: `gs = p·(gp − Δ)`, and [`scores_back`] takes `gs` to q, k and the mask.
pub(super) fn attention(e: &mut Emit, scale: f64, causal: bool, s: &Site) -> Grads {
    let (q, k, v, y, gy) = (s.x[0], s.x[1], s.x[2], s.y, s.gy);
    let mask = s.x.get(3).copied();
    let r = e.ty(q).rank();
    let lse_op = Op::AttentionLse { scale, causal, masked: mask.is_some() };
    let lse = match mask {
        Some(m) => e.op(lse_op, &[q, k, m])?,
        None => e.op(lse_op, &[q, k])?,
    };
    let p = probabilities(e, q, k, mask, scale, causal, lse)?;
    let gv = if s.wants[2] {
        let pt = e.swap_last2(p)?;
        Some(e.matmul(pt, gy)?)
    } else {
        None
    };
    let mut out = vec![None, None, gv];
    if s.x.len() == 4 {
        out.push(None);
    }
    let wants_scores = s.wants[0] || s.wants[1] || s.wants.get(3).copied().unwrap_or(false);
    if wants_scores {
        let vt = e.swap_last2(v)?;
        let gp = e.matmul(gy, vt)?;
        let gyy = e.mul(gy, y)?;
        let delta = e.sum(gyy, &[r - 1], true)?;
        let d = e.sub(gp, delta)?;
        let gs = e.mul(p, d)?;
        let (gq, gk, gmask) = scores_back(e, scale, gs, &s.x[..2], mask, s.wants)?;
        out[0] = gq;
        out[1] = gk;
        if s.x.len() == 4 {
            out[3] = gmask;
        }
    }
    Ok(out)
}

/// `lse = log Σⱼ exp(s)`: its gradient with respect to the scores is their softmax,
/// recomputed from the result as `p = exp(s − lse)`, so `gs = p·gy` (gy broadcast along the
/// keys), then [`scores_back`].
pub(super) fn attention_lse(e: &mut Emit, scale: f64, causal: bool, s: &Site) -> Grads {
    let (q, k, lse, gy) = (s.x[0], s.x[1], s.y, s.gy);
    let mask = s.x.get(2).copied();
    let p = probabilities(e, q, k, mask, scale, causal, lse)?;
    let mut col = e.shape(gy);
    col.push(1);
    let gy = e.reshape(gy, &col)?;
    let gs = e.mul(p, gy)?;
    let (gq, gk, gmask) = scores_back(e, scale, gs, &s.x[..2], mask, s.wants)?;
    let mut out = vec![gq, gk];
    if mask.is_some() {
        out.push(gmask);
    }
    Ok(out)
}

/// `p = exp(s − lse)` for the scores `s = q·kᵀ·scale + mask` (causal entries at −inf), `lse`
/// `[…, Sq]` broadcast along the keys.
fn probabilities(
    e: &mut Emit,
    q: NodeId,
    k: NodeId,
    mask: Option<NodeId>,
    scale: f64,
    causal: bool,
    lse: NodeId,
) -> R {
    let r = e.ty(q).rank();
    let kt = e.swap_last2(k)?;
    let scores = e.matmul(q, kt)?;
    let mut scores = e.scale(scores, scale)?;
    if let Some(mask) = mask {
        scores = e.add(scores, mask)?;
    }
    if causal {
        let ss = e.shape(scores);
        let (sq, sk) = (ss[r - 2], ss[r - 1]);
        let i = e.op(Op::Iota { dtype: DType::I64, shape: crate::dtype::dims(&[sq, sk]), axis: 0 }, &[])?;
        let j = e.op(Op::Iota { dtype: DType::I64, shape: crate::dtype::dims(&[sq, sk]), axis: 1 }, &[])?;
        let hidden = e.compare(CompareOp::Gt, j, i)?;
        let ninf = e.scalar(f64::NEG_INFINITY, scores)?;
        scores = e.select(hidden, ninf, scores)?;
    }
    let mut col = e.shape(lse);
    col.push(1);
    let lse = e.reshape(lse, &col)?;
    let d = e.sub(scores, lse)?;
    e.unary(UnaryOp::Exp, d)
}

/// The gradients of q, k and the mask (those `wants` asks for: operands 0, 1 and the last)
/// from the gradient `gs` of the scores `q·kᵀ·scale + mask`: `gq = gs·k·scale`,
/// `gk = gsᵀ·q·scale`, mask: `gs` summed to its shape.
#[allow(clippy::type_complexity)]
fn scores_back(
    e: &mut Emit,
    scale: f64,
    gs: NodeId,
    qk: &[NodeId],
    mask: Option<NodeId>,
    wants: &[bool],
) -> Result<(Option<NodeId>, Option<NodeId>, Option<NodeId>), InferError> {
    let (q, k) = (qk[0], qk[1]);
    let gq = if wants[0] {
        let g = e.matmul(gs, k)?;
        Some(e.scale(g, scale)?)
    } else {
        None
    };
    let gk = if wants[1] {
        let gst = e.swap_last2(gs)?;
        let g = e.matmul(gst, q)?;
        Some(e.scale(g, scale)?)
    } else {
        None
    };
    let gmask = match (mask, wants.last()) {
        (Some(m), Some(true)) => Some(e.unbroadcast(gs, &e.shape(m))?),
        _ => None,
    };
    Ok((gq, gk, gmask))
}

/// `activation(matmul(a, b) + bias)`: the activation's gradient at the pre-activation `z`
/// (recomputed), then the matmul rule, and the bias gets it summed to its shape.
pub(super) fn matmul_epilogue(e: &mut Emit, act: Activation, s: &Site) -> Grads {
    let (a, b, y, gy) = (s.x[0], s.x[1], s.y, s.gy);
    let mut z = e.matmul(a, b)?;
    if let Some(&bias) = s.x.get(2) {
        z = e.add(z, bias)?;
    }
    let gz = match act {
        Activation::None => gy,
        Activation::Relu => rules::unary(e, UnaryOp::Relu, z, y, gy)?,
        Activation::Gelu(approx) => gelu(e, approx, z, gy)?,
        Activation::Sigmoid => rules::unary(e, UnaryOp::Sigmoid, z, y, gy)?,
        Activation::Tanh => rules::unary(e, UnaryOp::Tanh, z, y, gy)?,
        Activation::Silu => silu(e, z, gy)?,
    };
    let (ga, gb) = rules::matmul(e, a, b, gz, s.wants[0], s.wants[1])?;
    let mut out = vec![ga, gb];
    if let Some(&bias) = s.x.get(2) {
        out.push(if s.wants[2] { Some(e.unbroadcast(gz, &e.shape(bias))?) } else { None });
    }
    Ok(out)
}
