//! Matrix products and windowed ops: matmul, conv2d and pool2d.
//!
//! Accumulation happens in the element type: f32 products are summed in f32 (as PyTorch does
//! on CPU), f64 in f64, and integers wrap around. f16 and bf16 operands are widened to f32,
//! accumulated in f32, and each result is rounded back once. Every output element is summed
//! in the same fixed order (increasing reduction index) whatever the thread count, so results
//! are deterministic.

use super::elem::{broadcast_strides, narrow_like, widen_f32, Int, Real};
use super::EvalError;
use crate::dtype::numel;
use crate::interp::StaticType;
use crate::op::PoolKind;
use crate::tensor::{Buffer, Tensor};
use rayon::prelude::*;

/// An element a matrix product can accumulate.
pub(crate) trait MatElem: Copy + Send + Sync + 'static {
    const ZERO: Self;
    fn madd(self, a: Self, b: Self) -> Self;
}

macro_rules! mat_float {
    ($t:ty) => {
        impl MatElem for $t {
            const ZERO: Self = 0.0;
            #[inline(always)]
            fn madd(self, a: Self, b: Self) -> Self {
                self + a * b
            }
        }
    };
}
mat_float!(f32);
mat_float!(f64);

macro_rules! mat_int {
    ($t:ty) => {
        impl MatElem for $t {
            const ZERO: Self = 0;
            #[inline(always)]
            fn madd(self, a: Self, b: Self) -> Self {
                Int::wadd(self, Int::wmul(a, b))
            }
        }
    };
}
mat_int!(i32);
mat_int!(i64);

/// Rows of the output computed together (each row of `b` is reused this many times from L1).
const ROW_BLOCK: usize = 4;
/// Columns of the output computed together (keeps a `k × COL_BLOCK` panel of `b` in L2).
const COL_BLOCK: usize = 512;
/// Below this many multiply-adds a product runs on the calling thread.
const PAR_FLOPS: usize = 1 << 16;

/// `c[m×n] = a[m×k] · b[k×n]` (all row-major, `c` zeroed): i-k-j loop order over row blocks
/// and column panels, inner loop a contiguous `c_row += a_ik * b_row` slice update.
fn gemm_rows<T: MatElem>(a: &[T], b: &[T], c: &mut [T], row0: usize, k: usize, n: usize) {
    let rows = c.len() / n;
    for j0 in (0..n).step_by(COL_BLOCK) {
        let j1 = (j0 + COL_BLOCK).min(n);
        for kk in 0..k {
            let brow = &b[kk * n + j0..kk * n + j1];
            for r in 0..rows {
                let aik = a[(row0 + r) * k + kk];
                let crow = &mut c[r * n + j0..r * n + j1];
                for (cv, &bv) in crow.iter_mut().zip(brow) {
                    *cv = cv.madd(aik, bv);
                }
            }
        }
    }
}

fn gemm<T: MatElem>(a: &[T], b: &[T], c: &mut [T], m: usize, k: usize, n: usize, par: bool) {
    if n == 0 || m == 0 {
        return;
    }
    if par {
        c.par_chunks_mut(ROW_BLOCK * n)
            .enumerate()
            .for_each(|(blk, cb)| gemm_rows(a, b, cb, blk * ROW_BLOCK, k, n));
    } else {
        for (blk, cb) in c.chunks_mut(ROW_BLOCK * n).enumerate() {
            gemm_rows(a, b, cb, blk * ROW_BLOCK, k, n);
        }
    }
}

/// Shapes of a numpy matmul after 1-D promotion: batch shape, m, k, n, and for each batch
/// element the offsets of its `a` and `b` matrices.
struct MatPlan {
    m: usize,
    k: usize,
    n: usize,
    offsets: Vec<(usize, usize)>,
}

fn plan(ash: &[usize], bsh: &[usize]) -> MatPlan {
    let a2: Vec<usize> = if ash.len() == 1 { vec![1, ash[0]] } else { ash.to_vec() };
    let b2: Vec<usize> = if bsh.len() == 1 { vec![bsh[0], 1] } else { bsh.to_vec() };
    let (m, k) = (a2[a2.len() - 2], a2[a2.len() - 1]);
    let n = b2[b2.len() - 1];
    let (ab, bb) = (&a2[..a2.len() - 2], &b2[..b2.len() - 2]);
    let rank = ab.len().max(bb.len());
    let batch: Vec<usize> = (0..rank)
        .map(|i| {
            let da = if i + ab.len() >= rank { ab[i + ab.len() - rank] } else { 1 };
            let db = if i + bb.len() >= rank { bb[i + bb.len() - rank] } else { 1 };
            // Broadcasting: an extent of 1 takes the other's, including 0 (not the larger).
            if da == 1 {
                db
            } else {
                da
            }
        })
        .collect();
    // Strides in units of whole matrices, 0 along broadcast batch axes.
    let sa = broadcast_strides(ab, &batch);
    let sb = broadcast_strides(bb, &batch);
    let nb = numel(&batch);
    let mut offsets = Vec::with_capacity(nb);
    let mut idx = vec![0usize; rank];
    for _ in 0..nb {
        let oa: usize = idx.iter().zip(&sa).map(|(i, s)| i * s).sum();
        let ob: usize = idx.iter().zip(&sb).map(|(i, s)| i * s).sum();
        offsets.push((oa * m * k, ob * k * n));
        for d in (0..rank).rev() {
            idx[d] += 1;
            if idx[d] < batch[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    MatPlan { m, k, n, offsets }
}

fn matmul_typed<T: MatElem>(a: &[T], b: &[T], p: &MatPlan) -> Vec<T> {
    let (m, k, n) = (p.m, p.k, p.n);
    let mut c = vec![T::ZERO; p.offsets.len() * m * n];
    if m * n == 0 {
        return c;
    }
    let par = p.offsets.len() * m * n * k >= PAR_FLOPS;
    let run = |(cm, &(oa, ob)): (&mut [T], &(usize, usize))| {
        gemm(&a[oa..oa + m * k], &b[ob..ob + k * n], cm, m, k, n, par)
    };
    if par {
        c.par_chunks_mut(m * n).zip(p.offsets.par_iter()).for_each(run);
    } else {
        c.chunks_mut(m * n).zip(p.offsets.iter()).for_each(run);
    }
    c
}

/// numpy `matmul` on typed slices of shapes `ash` and `bsh` (already checked by inference).
pub(crate) fn matmul_slices<T: MatElem>(a: &[T], ash: &[usize], b: &[T], bsh: &[usize]) -> Vec<T> {
    matmul_typed(a, b, &plan(ash, bsh))
}

/// numpy `matmul`: 1-D operands are promoted (`[k]` → `[1, k]` on the left, `[k, 1]` on the
/// right) and the added axis removed from the result; batch axes broadcast.
pub(crate) fn matmul(a: &Tensor, b: &Tensor, ty: &StaticType) -> Result<Tensor, EvalError> {
    let p = plan(&a.shape, &b.shape);
    let data = match (&a.data, &b.data) {
        (Buffer::F32(x), Buffer::F32(y)) => Buffer::F32(matmul_typed(x, y, &p)),
        (Buffer::F64(x), Buffer::F64(y)) => Buffer::F64(matmul_typed(x, y, &p)),
        (Buffer::I32(x), Buffer::I32(y)) => Buffer::I32(matmul_typed(x, y, &p)),
        (Buffer::I64(x), Buffer::I64(y)) => Buffer::I64(matmul_typed(x, y, &p)),
        (Buffer::F16(_), Buffer::F16(_)) | (Buffer::BF16(_), Buffer::BF16(_)) => {
            let x = widen_f32(&a.data).expect("half buffer");
            let y = widen_f32(&b.data).expect("half buffer");
            narrow_like(a.dtype(), matmul_typed(&x, &y, &p))
        }
        _ => {
            return Err(EvalError::Operands {
                op: "matmul",
                msg: format!("not defined on {} × {}", a.dtype(), b.dtype()),
            })
        }
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

/// Geometry of a 2-D window op along one spatial axis.
#[derive(Clone, Copy)]
struct Axis {
    size: usize,
    out: usize,
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
}

impl Axis {
    /// Input coordinate of output `o`, tap `t`, or `None` inside the padding.
    #[inline(always)]
    fn input(&self, o: usize, t: usize) -> Option<usize> {
        (o * self.stride + t * self.dilation).checked_sub(self.pad).filter(|&i| i < self.size)
    }

    /// The range of outputs whose tap `t` falls inside the input.
    fn valid(&self, t: usize) -> std::ops::Range<usize> {
        let off = t * self.dilation;
        // o*stride + off >= pad  and  o*stride + off < size + pad
        let lo = self.pad.saturating_sub(off).div_ceil(self.stride);
        let hi =
            if self.size + self.pad > off { (self.size + self.pad - off).div_ceil(self.stride) } else { 0 };
        lo.min(self.out)..hi.min(self.out).max(lo.min(self.out))
    }
}

fn conv_typed<F: Real>(
    x: &[F],
    w: &[F],
    xs: &[usize],
    ws: &[usize],
    ys: &[usize],
    ax: [Axis; 2],
    groups: usize,
) -> Vec<F> {
    let (c, h, wd) = (xs[1], xs[2], xs[3]);
    let (o_ch, cg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
    let og = o_ch / groups;
    let (oh, ow) = (ys[2], ys[3]);
    let mut y = vec![F::ZERO; numel(ys)];
    if y.is_empty() {
        return y;
    }
    let [ah, aw] = ax;
    let plane = |yp: &mut [F], idx: usize| {
        let (n, o) = (idx / o_ch, idx % o_ch);
        let g = o / og;
        for ci in 0..cg {
            let ch = g * cg + ci;
            let xp = &x[(n * c + ch) * h * wd..(n * c + ch + 1) * h * wd];
            for ti in 0..kh {
                for tj in 0..kw {
                    let wv = w[((o * cg + ci) * kh + ti) * kw + tj];
                    let cols = aw.valid(tj);
                    for r in ah.valid(ti) {
                        let ih = r * ah.stride + ti * ah.dilation - ah.pad;
                        let xrow = &xp[ih * wd..(ih + 1) * wd];
                        let yrow = &mut yp[r * ow..(r + 1) * ow];
                        for q in cols.clone() {
                            let iw = q * aw.stride + tj * aw.dilation - aw.pad;
                            yrow[q] = yrow[q] + wv * xrow[iw];
                        }
                    }
                }
            }
        }
    };
    let flops = y.len() * cg * kh * kw;
    if flops >= PAR_FLOPS {
        y.par_chunks_mut(oh * ow).enumerate().for_each(|(i, yp)| plane(yp, i));
    } else {
        y.chunks_mut(oh * ow).enumerate().for_each(|(i, yp)| plane(yp, i));
    }
    y
}

/// 2-D convolution (cross-correlation, like PyTorch): NCHW input, OIHW weight with
/// `I = C / groups`, zero padding, stride and dilation per spatial axis. Output channel `o`
/// belongs to group `o / (O / groups)` and reads input channels `g·I .. (g+1)·I`.
pub(crate) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let ax = [0, 1].map(|i| Axis {
        size: x.shape[2 + i],
        out: ty.shape[2 + i],
        kernel: w.shape[2 + i],
        stride: stride[i],
        pad: padding[i],
        dilation: dilation[i],
    });
    let (xs, ws, ys) = (&x.shape[..], &w.shape[..], &ty.shape[..]);
    let data = match (&x.data, &w.data) {
        (Buffer::F32(a), Buffer::F32(b)) => Buffer::F32(conv_typed(a, b, xs, ws, ys, ax, groups)),
        (Buffer::F64(a), Buffer::F64(b)) => Buffer::F64(conv_typed(a, b, xs, ws, ys, ax, groups)),
        (Buffer::F16(_), Buffer::F16(_)) | (Buffer::BF16(_), Buffer::BF16(_)) => {
            let a = widen_f32(&x.data).expect("half buffer");
            let b = widen_f32(&w.data).expect("half buffer");
            narrow_like(x.dtype(), conv_typed(&a, &b, xs, ws, ys, ax, groups))
        }
        _ => {
            return Err(EvalError::Operands {
                op: "conv2d",
                msg: format!("not defined on {} × {}", x.dtype(), w.dtype()),
            })
        }
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}

fn pool_typed<F: Real>(x: &[F], xs: &[usize], ys: &[usize], kind: PoolKind, ax: [Axis; 2]) -> Vec<F> {
    let (h, w) = (xs[2], xs[3]);
    let (oh, ow) = (ys[2], ys[3]);
    let mut y = vec![F::ZERO; numel(ys)];
    if y.is_empty() {
        return y;
    }
    let [ah, aw] = ax;
    let plane = |yp: &mut [F], idx: usize| {
        let xp = &x[idx * h * w..(idx + 1) * h * w];
        for r in 0..oh {
            for q in 0..ow {
                let mut acc = match kind {
                    PoolKind::Max => F::NEG_INFINITY,
                    PoolKind::Avg => F::ZERO,
                };
                let mut count = 0usize;
                for ti in 0..ah.kernel {
                    let Some(ih) = ah.input(r, ti) else { continue };
                    for tj in 0..aw.kernel {
                        let Some(iw) = aw.input(q, tj) else { continue };
                        let v = xp[ih * w + iw];
                        acc = match kind {
                            PoolKind::Max => acc.max_nan(v),
                            PoolKind::Avg => acc + v,
                        };
                        count += 1;
                    }
                }
                yp[r * ow + q] = match kind {
                    PoolKind::Max => acc,
                    PoolKind::Avg => acc.div(F::from_f64(count as f64)),
                };
            }
        }
    };
    if y.len() * ah.kernel * aw.kernel >= PAR_FLOPS {
        y.par_chunks_mut(oh * ow).enumerate().for_each(|(i, yp)| plane(yp, i));
    } else {
        y.chunks_mut(oh * ow).enumerate().for_each(|(i, yp)| plane(yp, i));
    }
    y
}

/// 2-D pooling over NCHW. Max pooling treats padding as -inf (and propagates NaN); average
/// pooling excludes padded positions from both the sum and the divisor (PyTorch's
/// `count_include_pad=False`). The window sum is accumulated in the element type.
pub(crate) fn pool2d(
    x: &Tensor,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    ty: &StaticType,
) -> Result<Tensor, EvalError> {
    let ax = [0, 1].map(|i| Axis {
        size: x.shape[2 + i],
        out: ty.shape[2 + i],
        kernel: kernel[i],
        stride: stride[i],
        pad: padding[i],
        dilation: 1,
    });
    let (xs, ys) = (&x.shape[..], &ty.shape[..]);
    let data = match &x.data {
        Buffer::F32(a) => Buffer::F32(pool_typed(a, xs, ys, kind, ax)),
        Buffer::F64(a) => Buffer::F64(pool_typed(a, xs, ys, kind, ax)),
        Buffer::F16(_) | Buffer::BF16(_) => {
            let a = widen_f32(&x.data).expect("half buffer");
            narrow_like(x.dtype(), pool_typed(&a, xs, ys, kind, ax))
        }
        _ => return Err(EvalError::Operands { op: "pool2d", msg: format!("not defined on {}", x.dtype()) }),
    };
    Ok(Tensor { shape: ty.shape.clone(), data })
}
