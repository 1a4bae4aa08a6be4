//! Strided views: how transposes, reshapes, slices and broadcasts become index arithmetic
//! instead of copies.
//!
//! Element `(i₀, i₁, …)` of a view is element `offset + Σ iₖ·strides[k]` of its buffer.

use kiln_ir::strides as row_major;
use serde::Serialize;

/// A strided view of a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StridedView {
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl StridedView {
    /// The whole buffer of `shape`, row-major.
    pub fn contiguous(shape: &[usize]) -> StridedView {
        StridedView { shape: shape.to_vec(), strides: row_major(shape), offset: 0 }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the elements are consecutive in row-major order from `offset`.
    pub fn is_dense(&self) -> bool {
        let want = row_major(&self.shape);
        self.shape.iter().zip(self.strides.iter().zip(&want)).all(|(&d, (&s, &w))| d == 1 || s == w)
    }

    /// `out.shape[i] = shape[perm[i]]`.
    pub fn transpose(&self, perm: &[usize]) -> StridedView {
        StridedView {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        }
    }

    /// Elements `start, start+step, … < end` along `axis`.
    pub fn slice(&self, axis: usize, start: usize, end: usize, step: usize) -> StridedView {
        let mut v = self.clone();
        let count = if end > start { (end - start).div_ceil(step) } else { 0 };
        v.offset += start * self.strides[axis];
        v.shape[axis] = count;
        v.strides[axis] *= step;
        v
    }

    /// Numpy broadcasting to `shape` (right-aligned; new and extent-1 axes get stride 0).
    pub fn broadcast_to(&self, shape: &[usize]) -> StridedView {
        let lead = shape.len() - self.shape.len();
        let mut strides = vec![0; shape.len()];
        for (i, &d) in self.shape.iter().enumerate() {
            strides[lead + i] = if d == 1 && shape[lead + i] != 1 { 0 } else { self.strides[i] };
        }
        StridedView { shape: shape.to_vec(), strides, offset: self.offset }
    }

    /// The same elements in row-major order under `shape`, when strides can express it
    /// (always for dense views; for others when each group of merged axes is itself dense).
    pub fn reshape(&self, shape: &[usize]) -> Option<StridedView> {
        if self.is_dense() {
            return Some(StridedView {
                shape: shape.to_vec(),
                strides: row_major(shape),
                offset: self.offset,
            });
        }
        let old: Vec<(usize, usize)> =
            self.shape.iter().copied().zip(self.strides.iter().copied()).filter(|&(d, _)| d != 1).collect();
        let mut strides = vec![0; shape.len()];
        let (mut i, mut j) = (0, 0);
        while i < old.len() && j < shape.len() {
            if shape[j] == 1 {
                j += 1;
                continue;
            }
            let (mut ni, mut nj) = (i, j);
            let (mut op, mut np) = (old[i].0, shape[j]);
            while op != np {
                if np < op {
                    nj += 1;
                    np *= *shape.get(nj)?;
                } else {
                    ni += 1;
                    op *= old.get(ni)?.0;
                }
            }
            for k in i..ni {
                if old[k].1 != old[k + 1].1 * old[k + 1].0 {
                    return None;
                }
            }
            strides[nj] = old[ni].1;
            for k in (j..nj).rev() {
                strides[k] = strides[k + 1] * shape[k + 1];
            }
            i = ni + 1;
            j = nj + 1;
        }
        if i < old.len() || shape[j..].iter().any(|&d| d != 1) {
            return None;
        }
        Some(StridedView { shape: shape.to_vec(), strides, offset: self.offset })
    }

    /// Inserts an axis of extent 1 at `axis`.
    pub fn unsqueeze(&self, axis: usize) -> StridedView {
        let mut v = self.clone();
        v.shape.insert(axis, 1);
        v.strides.insert(axis, 0);
        v
    }

    /// The largest element index the view touches, plus one (0 for an empty view).
    pub fn extent(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.offset + self.shape.iter().zip(&self.strides).map(|(&d, &s)| (d - 1) * s).sum::<usize>() + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element index of a view in row-major order.
    fn elements(v: &StridedView) -> Vec<usize> {
        let n = v.numel();
        (0..n)
            .map(|mut flat| {
                let mut at = v.offset;
                for k in (0..v.shape.len()).rev() {
                    at += (flat % v.shape[k]) * v.strides[k];
                    flat /= v.shape[k];
                }
                at
            })
            .collect()
    }

    #[test]
    fn reshape_of_a_transposed_view_splits_and_merges_where_strides_allow() {
        let base = StridedView::contiguous(&[2, 3, 4]);
        let t = base.transpose(&[1, 0, 2]); // [3, 2, 4], strides [4, 12, 1]
        let split = t.reshape(&[3, 2, 2, 2]).expect("splitting the dense last axis");
        assert_eq!(elements(&split), elements(&t));
        assert!(t.reshape(&[6, 4]).is_none(), "axes 0 and 1 are not mergeable");
        let merged = t.reshape(&[3, 8]);
        assert!(merged.is_none());
        let heads = StridedView::contiguous(&[1, 128, 384]).reshape(&[1, 128, 12, 32]).unwrap();
        let q = heads.transpose(&[0, 2, 1, 3]);
        assert_eq!(q.strides, vec![49152, 32, 384, 1]);
        let back = q.transpose(&[0, 2, 1, 3]).reshape(&[1, 128, 384]).unwrap();
        assert_eq!(elements(&back), (0..128 * 384).collect::<Vec<_>>());
    }

    #[test]
    fn slices_and_broadcasts_address_the_right_elements() {
        let v = StridedView::contiguous(&[4, 5]).slice(1, 1, 5, 2);
        assert_eq!(elements(&v), vec![1, 3, 6, 8, 11, 13, 16, 18]);
        let b = StridedView::contiguous(&[3]).broadcast_to(&[2, 3]);
        assert_eq!(elements(&b), vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(b.extent(), 3);
    }
}
