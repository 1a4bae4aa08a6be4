//! How a kernel addresses one operand: a strided view of a flat buffer.
//!
//! The scheduler folds transposes, reshapes, slices and broadcasts into views instead of
//! copying, so a kernel sees each operand as the logical tensor it computes with, while the
//! bytes stay where their producer wrote them. Every kernel argument is a flat
//! `memref<{len}x{elem}>`; element `(i₀, i₁, …)` of the view is at `offset + Σ iₖ·strides[k]`.

use crate::kernel::mlir_elem;
use crate::mlir_text::Body;
use kiln_ir::{strides, DType};

/// A strided view of a flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// The logical shape the kernel iterates over.
    pub shape: Vec<usize>,
    /// Elements to step in the buffer per unit of each axis (0 for a broadcast axis).
    pub strides: Vec<usize>,
    /// Element offset of the view's first element in the buffer.
    pub offset: usize,
    /// Element type.
    pub dtype: DType,
    /// Elements in the whole buffer (the memref's length).
    pub buffer_len: usize,
}

impl View {
    /// A contiguous row-major view of a whole buffer of `shape`.
    pub fn contiguous(shape: &[usize], dtype: DType) -> View {
        View {
            shape: shape.to_vec(),
            strides: strides(shape),
            offset: 0,
            dtype,
            buffer_len: shape.iter().product::<usize>().max(1),
        }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The MLIR element type (`f32`, …; `i8` for bool).
    pub fn elem(&self) -> &'static str {
        mlir_elem(self.dtype)
    }

    /// The flat memref type of the kernel argument, `memref<{buffer_len}x{elem}>`.
    pub fn memref(&self) -> String {
        format!("memref<{}x{}>", self.buffer_len.max(1), self.elem())
    }

    /// Whether the view is the whole buffer in row-major order.
    pub fn is_contiguous(&self) -> bool {
        self.offset == 0 && self.numel() == self.buffer_len && self.is_dense()
    }

    /// Whether the view's elements are consecutive in row-major order (from its offset).
    pub fn is_dense(&self) -> bool {
        let want = strides(&self.shape);
        self.shape.iter().zip(self.strides.iter().zip(&want)).all(|(&d, (&s, &w))| d == 1 || s == w)
    }

    /// Stride of the last axis (1 means rows are contiguous; 0 means broadcast).
    pub fn inner_stride(&self) -> usize {
        self.strides.last().copied().unwrap_or(0)
    }

    /// Emits the buffer offset of the first element of sub-tensor `outer` (a row-major number
    /// over the first `leading` axes): `offset + Σ_{k<leading} iₖ·strides[k]`. For emitters that
    /// loop over the leading axes as one flat range.
    pub fn leading_offset_expr(&self, b: &mut Body, outer: &str, leading: usize) -> String {
        // offset + Σ_{k<leading} i_k · stride_k with i decomposed from `outer` row-major.
        let mut rem = outer.to_string();
        let mut acc = b.index(self.offset);
        for k in (0..leading).rev() {
            let d = self.shape[k];
            if k == 0 {
                let term = self.scaled(b, &rem, self.strides[k]);
                acc = b.assign(format!("arith.addi {acc}, {term} : index"));
            } else {
                let dc = b.index(d);
                let i = b.assign(format!("arith.remui {rem}, {dc} : index"));
                let term = self.scaled(b, &i, self.strides[k]);
                acc = b.assign(format!("arith.addi {acc}, {term} : index"));
                rem = b.assign(format!("arith.divui {rem}, {dc} : index"));
            }
        }
        acc
    }

    fn scaled(&self, b: &mut Body, i: &str, stride: usize) -> String {
        match stride {
            0 => b.index(0),
            1 => i.to_string(),
            s => {
                let c = b.index(s);
                b.assign(format!("arith.muli {i}, {c} : index"))
            }
        }
    }

    /// Emits the flat buffer index of element `idx` (one `index` SSA value per axis).
    pub fn index_expr(&self, b: &mut Body, idx: &[String]) -> String {
        assert_eq!(idx.len(), self.rank(), "one index per axis");
        let mut acc = b.index(self.offset);
        for (i, &s) in idx.iter().zip(&self.strides) {
            if s == 0 {
                continue;
            }
            let term = self.scaled(b, i, s);
            acc = b.assign(format!("arith.addi {acc}, {term} : index"));
        }
        acc
    }
}
