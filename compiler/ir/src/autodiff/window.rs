//! Gradient rules of the window ops, convolution and pooling, written tap by tap.
//!
//! A window op reads, for each kernel tap `(kh, kw)`, a strided slice of the padded input
//! (`tap[n, c, i, j] = xp[n, c, i·s + kh·d, j·s + kw·d]`), so its backward is a sum over
//! taps: each tap's gradient goes back through its slices (the slice rule, which scatters
//! into the strided positions), and the padding is cut off at the end. This costs one small
//! product per tap rather than a transposed-convolution kernel, which the primitive set does
//! not have; the optimizer sees ordinary matmuls, slices and pads.

use super::emit::Emit;
use super::rules::{self, Grads, Site};
use crate::graph::NodeId;
use crate::infer::InferError;
use crate::op::{CompareOp, PoolKind};

type R = Result<NodeId, InferError>;

/// The geometry of a 2-D window over NCHW: per spatial axis the kernel, stride, padding and
/// dilation, the padded input extent and the output extent.
struct Window {
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    padded: [usize; 2],
    out: [usize; 2],
}

impl Window {
    fn new(
        x: &[usize],
        y: &[usize],
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
    ) -> Window {
        Window {
            kernel,
            stride,
            padding,
            dilation,
            padded: [x[2] + 2 * padding[0], x[3] + 2 * padding[1]],
            out: [y[2], y[3]],
        }
    }

    /// Every tap in row-major order.
    fn taps(&self) -> Vec<[usize; 2]> {
        (0..self.kernel[0]).flat_map(|a| (0..self.kernel[1]).map(move |b| [a, b])).collect()
    }

    /// The slice `(start, end, step)` along spatial axis `k` (0 = H, 1 = W) for tap offset `t`.
    fn range(&self, k: usize, t: usize) -> (usize, usize, usize) {
        let start = t * self.dilation[k];
        (start, start + (self.out[k] - 1) * self.stride[k] + 1, self.stride[k])
    }

    /// The tap's view of the padded input `xp`: `[N, C, OH, OW]`.
    fn read(&self, e: &mut Emit, xp: NodeId, tap: [usize; 2]) -> R {
        let mut v = xp;
        for (k, &t) in tap.iter().enumerate() {
            let (start, end, step) = self.range(k, t);
            v = e.slice(v, 2 + k, start, end, step)?;
        }
        Ok(v)
    }

    /// A tap's gradient `[N, C, OH, OW]` placed back into the padded input's shape.
    fn scatter(&self, e: &mut Emit, g: NodeId, tap: [usize; 2]) -> R {
        let mut v = g;
        for k in (0..2).rev() {
            let mut shape = e.shape(v);
            shape[2 + k] = self.padded[k];
            let (start, end, step) = self.range(k, tap[k]);
            v = rules::slice_back(e, v, &shape, 2 + k, start, end, step)?;
        }
        Ok(v)
    }

    /// The padded input: `x` with `value` around its spatial axes.
    fn pad(&self, e: &mut Emit, x: NodeId, value: f64) -> R {
        if self.padding == [0, 0] {
            return Ok(x);
        }
        let p = self.padding;
        e.op(crate::op::Op::Pad { pads: vec![(0, 0), (0, 0), (p[0], p[0]), (p[1], p[1])], value }, &[x])
    }

    /// The gradient of the padded input cut back to the input.
    fn unpad(&self, e: &mut Emit, g: NodeId) -> R {
        let mut v = g;
        for k in 0..2 {
            let p = self.padding[k];
            v = e.slice(v, 2 + k, p, self.padded[k] - p, 1)?;
        }
        Ok(v)
    }
}

/// `conv2d(x, w)` with groups: per tap, `gw[:, :, kh, kw] = Σₙ gy · tapᵀ` and
/// `gtap = wᵀ[:, :, kh, kw] · gy`, both as batched products over the groups.
pub(super) fn conv2d(
    e: &mut Emit,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    s: &Site,
) -> Grads {
    let (x, w, gy) = (s.x[0], s.x[1], s.gy);
    let (xs, ws, ys) = (e.shape(x), e.shape(w), e.shape(s.y));
    let win = Window::new(&xs, &ys, [ws[2], ws[3]], stride, padding, dilation);
    let (n, c, o, g) = (xs[0], xs[1], ws[0], groups);
    let (cg, og, pixels) = (c / g, o / g, ys[2] * ys[3]);
    let gy_r = e.reshape(gy, &[n, g, og, pixels])?;
    let xp = if s.wants[1] { Some(win.pad(e, x, 0.0)?) } else { None };
    let (mut gx, mut gw_taps) = (None, Vec::new());
    for tap in win.taps() {
        if let Some(xp) = xp {
            let t = win.read(e, xp, tap)?;
            let t = e.reshape(t, &[n, g, cg, pixels])?;
            let tt = e.swap_last2(t)?;
            let p = e.matmul(gy_r, tt)?;
            let p = e.sum(p, &[0], false)?;
            gw_taps.push(e.reshape(p, &[o, cg, 1])?);
        }
        if s.wants[0] {
            let wt = e.slice(w, 2, tap[0], tap[0] + 1, 1)?;
            let wt = e.slice(wt, 3, tap[1], tap[1] + 1, 1)?;
            let wt = e.reshape(wt, &[g, og, cg])?;
            let wt = e.swap_last2(wt)?;
            let gt = e.matmul(wt, gy_r)?;
            let gt = e.reshape(gt, &[n, c, ys[2], ys[3]])?;
            let back = win.scatter(e, gt, tap)?;
            gx = Some(match gx {
                Some(acc) => e.add(acc, back)?,
                None => back,
            });
        }
    }
    let gx = match gx {
        Some(g) => Some(win.unpad(e, g)?),
        None => None,
    };
    let gw = match gw_taps.len() {
        0 => None,
        1 => Some(e.reshape(gw_taps[0], &ws)?),
        _ => {
            let all = e.op(crate::op::Op::Concat { axis: 2 }, &gw_taps)?;
            Some(e.reshape(all, &ws)?)
        }
    };
    Ok(vec![gx, gw])
}

/// `pool2d(x)`. Average (padding excluded from the divisor): every tap of a window gets
/// `gy / count`. Max: the whole gradient goes to the first tap (row-major) that holds the
/// maximum, as PyTorch's `max_pool2d` backward does through its saved indices.
pub(super) fn pool2d(
    e: &mut Emit,
    kind: PoolKind,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    s: &Site,
) -> Grads {
    let (x, y, gy) = (s.x[0], s.y, s.gy);
    let (xs, ys) = (e.shape(x), e.shape(s.y));
    let win = Window::new(&xs, &ys, kernel, stride, padding, [1, 1]);
    let mut gxp: Option<NodeId> = None;
    let mut accumulate = |e: &mut Emit, g: NodeId, tap: [usize; 2]| -> Result<(), InferError> {
        let back = win.scatter(e, g, tap)?;
        gxp = Some(match gxp {
            Some(acc) => e.add(acc, back)?,
            None => back,
        });
        Ok(())
    };
    match kind {
        PoolKind::Avg => {
            // How many taps of each window fall inside the input.
            let ones = e.full(1.0, e.dtype(x), &[1, 1, xs[2], xs[3]])?;
            let ones = win.pad(e, ones, 0.0)?;
            let mut count = None;
            for tap in win.taps() {
                let t = win.read(e, ones, tap)?;
                count = Some(match count {
                    Some(c) => e.add(c, t)?,
                    None => t,
                });
            }
            let Some(count) = count else { return Ok(vec![None]) };
            let share = e.div(gy, count)?;
            for tap in win.taps() {
                accumulate(e, share, tap)?;
            }
        }
        PoolKind::Max => {
            let xp = win.pad(e, x, f64::NEG_INFINITY)?;
            // `taken` is 1 where an earlier tap already held the maximum.
            let mut taken: Option<NodeId> = None;
            for tap in win.taps() {
                let t = win.read(e, xp, tap)?;
                let hit = e.compare(CompareOp::Eq, t, y)?;
                let mut first = e.cast(hit, e.dtype(x))?;
                if let Some(tk) = taken {
                    let free = e.rsub(1.0, tk)?;
                    first = e.mul(first, free)?;
                }
                taken = Some(match taken {
                    Some(tk) => e.add(tk, first)?,
                    None => first,
                });
                let g = e.mul(gy, first)?;
                accumulate(e, g, tap)?;
            }
        }
    }
    Ok(vec![match gxp {
        Some(g) => Some(win.unpad(e, g)?),
        None => None,
    }])
}
