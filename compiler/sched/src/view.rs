//! Strided views: how transposes, reshapes, slices and broadcasts become index arithmetic
//! instead of copies.
//!
//! Element `(i₀, i₁, …)` of a view is element `offset + Σ iₖ·strides[k]` of its buffer. In a
//! graph with symbols, extents, strides and the offset are sizes over the symbols ([`Dim`]):
//! a row-major stride is a product of extents (`seq*384`), the same expression at every run.
//! Static graphs only ever hold `Dim::Const`, so their views are what they always were.

use kiln_ir::{Dim, SizeError};
use serde::Serialize;

/// A strided view of a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StridedView {
    pub shape: Vec<Dim>,
    pub strides: Vec<Dim>,
    pub offset: Dim,
}

/// Row-major strides of `shape`, as sizes.
pub fn row_major(shape: &[Dim]) -> Result<Vec<Dim>, SizeError> {
    let mut s = vec![Dim::Const(1); shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1].mul(&shape[i + 1])?;
    }
    Ok(s)
}

/// The product of `dims`, as a size.
pub fn product(dims: &[Dim]) -> Result<Dim, SizeError> {
    dims.iter().try_fold(Dim::Const(1), |a, d| a.mul(d))
}

/// The static values of `dims`, `None` if one is symbolic.
fn fixed(dims: &[Dim]) -> Option<Vec<usize>> {
    dims.iter().map(Dim::as_const).collect()
}

impl StridedView {
    /// The whole buffer of a static `shape`, row-major.
    pub fn contiguous(shape: &[usize]) -> StridedView {
        StridedView {
            shape: kiln_ir::dims(shape),
            strides: kiln_ir::dims(&kiln_ir::strides(shape)),
            offset: Dim::Const(0),
        }
    }

    /// The whole buffer of `shape` (extents may be symbolic), row-major.
    pub fn contiguous_dims(shape: &[Dim]) -> Result<StridedView, SizeError> {
        Ok(StridedView { shape: shape.to_vec(), strides: row_major(shape)?, offset: Dim::Const(0) })
    }

    /// Whether no extent, stride or the offset reads a symbol.
    pub fn is_static(&self) -> bool {
        self.offset.is_static() && self.shape.iter().chain(&self.strides).all(Dim::is_static)
    }

    /// `(shape, strides, offset)` of a static view; `None` when any of them is symbolic.
    pub fn as_static(&self) -> Option<(Vec<usize>, Vec<usize>, usize)> {
        Some((fixed(&self.shape)?, fixed(&self.strides)?, self.offset.as_const()?))
    }

    /// The static extents; `None` when one is symbolic.
    pub fn static_shape(&self) -> Option<Vec<usize>> {
        fixed(&self.shape)
    }

    /// The element count, as a size.
    pub fn numel(&self) -> Result<Dim, SizeError> {
        product(&self.shape)
    }

    /// Whether the elements are consecutive in row-major order from `offset`.
    pub fn is_dense(&self) -> bool {
        let Ok(want) = row_major(&self.shape) else { return false };
        self.shape.iter().zip(self.strides.iter().zip(&want)).all(|(d, (s, w))| *d == 1 || s == w)
    }

    /// `out.shape[i] = shape[perm[i]]`.
    pub fn transpose(&self, perm: &[usize]) -> StridedView {
        StridedView {
            shape: perm.iter().map(|&p| self.shape[p].clone()).collect(),
            strides: perm.iter().map(|&p| self.strides[p].clone()).collect(),
            offset: self.offset.clone(),
        }
    }

    /// Elements `start, start+step, … < end` along `axis` (`start ≤ end`, which shape
    /// inference proves for symbolic bounds).
    pub fn slice(&self, axis: usize, start: &Dim, end: &Dim, step: usize) -> Result<StridedView, SizeError> {
        let mut v = self.clone();
        let count = match (start, end) {
            (Dim::Const(s), Dim::Const(e)) => Dim::Const(if e > s { (e - s).div_ceil(step) } else { 0 }),
            _ => end.sub(start)?.add(&Dim::Const(step - 1))?.floor_div(step)?,
        };
        v.offset = v.offset.add(&start.mul(&self.strides[axis])?)?;
        v.shape[axis] = count;
        v.strides[axis] = v.strides[axis].mul(&Dim::Const(step))?;
        Ok(v)
    }

    /// Numpy broadcasting to `shape` (right-aligned; new and extent-1 axes get stride 0).
    pub fn broadcast_to(&self, shape: &[Dim]) -> StridedView {
        let lead = shape.len() - self.shape.len();
        let mut strides = vec![Dim::Const(0); shape.len()];
        for (i, d) in self.shape.iter().enumerate() {
            strides[lead + i] =
                if *d == 1 && shape[lead + i] != 1 { Dim::Const(0) } else { self.strides[i].clone() };
        }
        StridedView { shape: shape.to_vec(), strides, offset: self.offset.clone() }
    }

    /// [`StridedView::broadcast_to`] a static shape.
    pub fn broadcast_to_static(&self, shape: &[usize]) -> StridedView {
        self.broadcast_to(&kiln_ir::dims(shape))
    }

    /// The same elements in row-major order under `shape`, when strides can express it
    /// (always for dense views; for others when each group of merged axes is itself dense).
    /// A view with symbols that is not dense needs [`StridedView::reshape_at`]; here it gives
    /// `None`, and the caller copies it first.
    pub fn reshape(&self, shape: &[Dim]) -> Option<StridedView> {
        self.reshape_at(shape, &[])
    }

    /// [`StridedView::reshape`], grouping the axes of a view with symbols by their extents at
    /// `probe` (a value for every symbol): each group found is then proved in normal form (equal
    /// products, dense strides), so a probe only chooses, it never makes a wrong view.
    pub fn reshape_at(&self, shape: &[Dim], probe: &[i64]) -> Option<StridedView> {
        if self.is_dense() {
            return Some(StridedView {
                shape: shape.to_vec(),
                strides: row_major(shape).ok()?,
                offset: self.offset.clone(),
            });
        }
        let strides = reshape_strides(&self.shape, &self.strides, shape, probe)?;
        Some(StridedView { shape: shape.to_vec(), strides, offset: self.offset.clone() })
    }

    /// [`StridedView::reshape`] to a static shape.
    pub fn reshape_static(&self, shape: &[usize]) -> Option<StridedView> {
        self.reshape(&kiln_ir::dims(shape))
    }

    /// Inserts an axis of extent 1 at `axis`.
    pub fn unsqueeze(&self, axis: usize) -> StridedView {
        let mut v = self.clone();
        v.shape.insert(axis, Dim::Const(1));
        v.strides.insert(axis, Dim::Const(0));
        v
    }

    /// The largest element index the view touches, plus one (0 for an empty view), at the
    /// symbols' `values` (none for a static view); `None` when a symbol has no value.
    pub fn extent_at(&self, values: &[i64]) -> Option<usize> {
        let shape: Vec<usize> = self.shape.iter().map(|d| d.eval(values)).collect::<Option<_>>()?;
        let strides: Vec<usize> = self.strides.iter().map(|d| d.eval(values)).collect::<Option<_>>()?;
        if shape.contains(&0) {
            return Some(0);
        }
        let offset = self.offset.eval(values)?;
        Some(offset + shape.iter().zip(&strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1)
    }
}

/// The strides of a non-dense view (`shape`, `strides`) reshaped to `new`, when each group
/// of merged axes is itself dense. Groups are found by the extents' values at `probe` and
/// then proved in normal form.
fn reshape_strides(shape: &[Dim], strides: &[Dim], new: &[Dim], probe: &[i64]) -> Option<Vec<Dim>> {
    let val = |d: &Dim| d.eval(probe);
    let old: Vec<(Dim, Dim)> =
        shape.iter().cloned().zip(strides.iter().cloned()).filter(|(d, _)| *d != 1).collect();
    let mut out = vec![Dim::Const(0); new.len()];
    let (mut i, mut j) = (0, 0);
    while i < old.len() && j < new.len() {
        if new[j] == 1 {
            j += 1;
            continue;
        }
        let (mut ni, mut nj) = (i, j);
        let (mut op, mut np) = (val(&old[i].0)?, val(&new[j])?);
        while op != np {
            if np < op {
                nj += 1;
                np = np.checked_mul(val(new.get(nj)?)?)?;
            } else {
                ni += 1;
                op = op.checked_mul(val(&old.get(ni)?.0)?)?;
            }
        }
        let old_dims: Vec<Dim> = old[i..=ni].iter().map(|(d, _)| d.clone()).collect();
        if product(&old_dims).ok()? != product(&new[j..=nj]).ok()? {
            return None;
        }
        for k in i..ni {
            if old[k].1 != old[k + 1].1.mul(&old[k + 1].0).ok()? {
                return None;
            }
        }
        out[nj] = old[ni].1.clone();
        for k in (j..nj).rev() {
            out[k] = out[k + 1].mul(&new[k + 1]).ok()?;
        }
        i = ni + 1;
        j = nj + 1;
    }
    if i < old.len() || new[j..].iter().any(|d| *d != 1) {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element index of a view in row-major order.
    fn elements(v: &StridedView) -> Vec<usize> {
        let (shape, strides, offset) = v.as_static().expect("a static view");
        let n: usize = shape.iter().product();
        (0..n)
            .map(|mut flat| {
                let mut at = offset;
                for k in (0..shape.len()).rev() {
                    at += (flat % shape[k]) * strides[k];
                    flat /= shape[k];
                }
                at
            })
            .collect()
    }

    #[test]
    fn reshape_of_a_transposed_view_splits_and_merges_where_strides_allow() {
        let base = StridedView::contiguous(&[2, 3, 4]);
        let t = base.transpose(&[1, 0, 2]); // [3, 2, 4], strides [4, 12, 1]
        let split = t.reshape_static(&[3, 2, 2, 2]).expect("splitting the dense last axis");
        assert_eq!(elements(&split), elements(&t));
        assert!(t.reshape_static(&[6, 4]).is_none(), "axes 0 and 1 are not mergeable");
        let merged = t.reshape_static(&[3, 8]);
        assert!(merged.is_none());
        let heads = StridedView::contiguous(&[1, 128, 384]).reshape_static(&[1, 128, 12, 32]).unwrap();
        let q = heads.transpose(&[0, 2, 1, 3]);
        assert_eq!(q.strides, kiln_ir::dims(&[49152, 32, 384, 1]));
        let back = q.transpose(&[0, 2, 1, 3]).reshape_static(&[1, 128, 384]).unwrap();
        assert_eq!(elements(&back), (0..128 * 384).collect::<Vec<_>>());
    }

    #[test]
    fn slices_and_broadcasts_address_the_right_elements() {
        let v = StridedView::contiguous(&[4, 5]).slice(1, &Dim::Const(1), &Dim::Const(5), 2).unwrap();
        assert_eq!(elements(&v), vec![1, 3, 6, 8, 11, 13, 16, 18]);
        let b = StridedView::contiguous(&[3]).broadcast_to_static(&[2, 3]);
        assert_eq!(elements(&b), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(b.extent_at(&[]), Some(3));
    }

    #[test]
    fn symbolic_views_keep_strides_as_sizes() {
        let seq = Dim::Sym(kiln_ir::SizeExpr::symbol(0, "seq"));
        let batch = Dim::Sym(kiln_ir::SizeExpr::symbol(1, "batch"));
        let v = StridedView::contiguous_dims(&[batch.clone(), seq.clone(), Dim::Const(8)]).unwrap();
        assert_eq!(v.strides[0], seq.mul(&Dim::Const(8)).unwrap());
        let heads = v.reshape(&[batch.clone(), seq.clone(), Dim::Const(2), Dim::Const(4)]).unwrap();
        let t = heads.transpose(&[0, 2, 1, 3]);
        assert!(!t.is_dense() && !t.is_static());
        // A transposed symbolic view is not merged: the caller copies it.
        let merged = [batch.clone(), Dim::Const(2), seq.mul(&Dim::Const(4)).unwrap()];
        assert!(t.reshape_at(&merged, &[5, 2]).is_none());
        // A slice of the last axis splits into heads, proved for every value of the symbols.
        let half = v.slice(2, &Dim::Const(4), &Dim::Const(8), 1).unwrap();
        let split = [batch.clone(), seq.clone(), Dim::Const(2), Dim::Const(2)];
        assert!(half.reshape(&split).is_none(), "grouping a symbolic view needs a probe");
        let heads2 = half.reshape_at(&split, &[5, 2]).unwrap();
        assert_eq!(heads2.strides[0], seq.mul(&Dim::Const(8)).unwrap());
        assert_eq!(heads2.strides[1..], kiln_ir::dims(&[8, 2, 1])[..]);
        let back = t.transpose(&[0, 2, 1, 3]).reshape(&[batch, seq, Dim::Const(8)]).unwrap();
        assert_eq!(back, v);
        // At batch 2, seq 3: the last element is 2*3*8 - 1.
        assert_eq!(back.extent_at(&[3, 2]), Some(48));
        let s = v.slice(1, &Dim::Const(1), &v.shape[1], 1).unwrap();
        assert_eq!(s.offset, Dim::Const(8));
        assert_eq!(s.extent_at(&[3, 2]), Some(48));
    }
}
