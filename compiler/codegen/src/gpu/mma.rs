//! Warp-wide matrix products on tensor cores (`mma.sync.m16n8k8` with TF32 operands), shared by
//! the products and attention: where each lane's fragment elements lie, the lane coordinates
//! a kernel computes once, and the product itself, written as the NVVM instruction or, on
//! SPIR-V, emulated by the warp through shared memory so the fragment bookkeeping can be
//! checked on any Vulkan device; and how f32 values become operands, rounded to TF32 or split
//! in a high and a low TF32 part whose three products keep close to f32 accuracy.

use super::plan::MmaPrecision;
use super::skeleton::{shared, shared_type};
use super::tiles::Rounding;
use super::{GpuCaps, GpuFlavor};
use crate::mlir_text::Body;

/// Rows and columns of an MMA tile: `m16n8k8`.
pub(crate) const MMA_M: usize = 16;
pub(crate) const MMA_N: usize = 8;
pub(crate) const MMA_K: usize = 8;

/// Whether attention and products may run on tensor cores, and at which precision: where the
/// operands fit it exactly (`exact`: f16 in TF32), or the user allowed rounding f32 to it.
pub(crate) fn tensor_core_precision(exact: bool, ty: &str, caps: &GpuCaps) -> Option<MmaPrecision> {
    match (caps.mma, caps.tensor_cores) {
        (Some(hw), Some(asked)) if asked.runs_on(hw) && ty == "f32" => Some(asked),
        (Some(hw), _) if exact => Some(hw),
        _ => None,
    }
}

/// One operand element of a product as the tensor cores take it: TF32 bits (`i32`), and at
/// [`MmaPrecision::Tf32x3`] the low part's bits too.
#[derive(Clone)]
pub(crate) struct Part {
    pub hi: String,
    pub lo: Option<String>,
}

/// How a kernel turns f32 values into [`Part`]s: at TF32 its shared tiles already hold rounded
/// values (rounded once as they enter), so a read is a bit cast; at TF32×3 they hold f32 values,
/// split as they are read.
#[derive(Clone, Copy)]
pub(crate) struct Parts {
    pub precision: MmaPrecision,
    pub rounding: Rounding,
}

impl Parts {
    pub fn new(precision: MmaPrecision, flavor: GpuFlavor) -> Parts {
        let rounding = match flavor {
            GpuFlavor::Nvvm => Rounding::Tf32Nvvm,
            GpuFlavor::Spirv => Rounding::Tf32Bits,
        };
        Parts { precision, rounding }
    }

    /// The rounding a value gets as it enters shared memory: TF32's, or none at TF32×3.
    pub fn on_entry(&self) -> Option<Rounding> {
        match self.precision {
            MmaPrecision::Tf32 => Some(self.rounding),
            MmaPrecision::Tf32x3 => None,
        }
    }

    /// A value as it was stored in shared memory ([`Parts::on_entry`]).
    pub fn stored(&self, b: &mut Body, x: &str) -> Part {
        match self.precision {
            MmaPrecision::Tf32 => Part { hi: b.assign(format!("arith.bitcast {x} : f32 to i32")), lo: None },
            MmaPrecision::Tf32x3 => self.split(b, x),
        }
    }

    /// An f32 value straight from memory: rounded, or split.
    pub fn fresh(&self, b: &mut Body, x: &str) -> Part {
        match self.precision {
            MmaPrecision::Tf32 => {
                let r = self.rounding.apply(b, x);
                Part { hi: b.assign(format!("arith.bitcast {r} : f32 to i32")), lo: None }
            }
            MmaPrecision::Tf32x3 => self.split(b, x),
        }
    }

    /// `hi = tf32(x)`, `lo = tf32(x − hi)` (the difference is exact in f32).
    fn split(&self, b: &mut Body, x: &str) -> Part {
        let hi = self.rounding.apply(b, x);
        let rest = b.fsub(x, &hi, "f32");
        let lo = self.rounding.apply(b, &rest);
        Part {
            hi: b.assign(format!("arith.bitcast {hi} : f32 to i32")),
            lo: Some(b.assign(format!("arith.bitcast {lo} : f32 to i32"))),
        }
    }
}

/// `d = a·b + c` for one `m16n8k8` product of the warp from operand [`Part`]s: one tensor-core
/// product, or at TF32×3 three (the small terms first, so they are not lost to the large).
pub(crate) fn mma_parts(b: &mut Body, l: &Lanes, a: &[Part], bf: &[Part], c: &[String]) -> Vec<String> {
    let his = |p: &[Part]| p.iter().map(|x| x.hi.clone()).collect::<Vec<_>>();
    let los = |p: &[Part]| p.iter().map(|x| x.lo.clone()).collect::<Option<Vec<_>>>();
    let (a_hi, b_hi) = (his(a), his(bf));
    let mut acc = c.to_vec();
    if let (Some(a_lo), Some(b_lo)) = (los(a), los(bf)) {
        acc = mma(b, l, &a_lo, &b_hi, &acc);
        acc = mma(b, l, &a_hi, &b_lo, &acc);
    }
    mma(b, l, &a_hi, &b_hi, &acc)
}

/// Where the fragments of `mma.sync.m16n8k8` with TF32 operands lie (PTX ISA, "Matrix
/// Fragments for mma.m16n8k8", `.tf32`): lane `l` of the warp has `group = l / 4` and
/// `in_group = l % 4`. Each entry is `(row, column)` offsets added to `(group, in_group)` for A
/// (16×8, row-major) and C (16×8, where the column is `2·in_group + offset`), and to
/// `(in_group, group)` for B (8×8).
pub(crate) const A_FRAGMENT: [(usize, usize); 4] = [(0, 0), (8, 0), (0, 4), (8, 4)];
pub(crate) const B_FRAGMENT: [(usize, usize); 2] = [(0, 0), (4, 0)];
pub(crate) const C_FRAGMENT: [(usize, usize); 4] = [(0, 0), (0, 1), (8, 0), (8, 1)];

/// A warp lane's coordinates, computed once per kernel.
pub(crate) struct Lanes {
    /// `lane / 4` and `lane % 4`.
    pub group: String,
    pub in_group: String,
    /// The first row and column of this warp's block of the tile.
    pub warp_row: String,
    pub warp_col: String,
    /// Where a lane emulates `mma.sync` (SPIR-V, for checking the fragment bookkeeping on any
    /// Vulkan device): its warp's slices of two shared scratch arrays (a 16×8 A and an 8×8 B
    /// per warp), and their types.
    pub emulation: Option<Emulation>,
}

pub(crate) struct Emulation {
    a_base: String,
    b_base: String,
    scratch_a: String,
    scratch_b: String,
    a_type: String,
    b_type: String,
}

impl Lanes {
    pub fn new(b: &mut Body, lin: &str, warps: [usize; 2], sub: [usize; 2]) -> Lanes {
        let emulate = b.gpu() != Some(GpuFlavor::Nvvm);
        let count = warps[0] * warps[1];
        let scratch = emulate.then(|| {
            let a = shared(b, count * MMA_M * MMA_K, "f32");
            let bb = shared(b, count * MMA_K * MMA_N, "f32");
            (
                a,
                bb,
                shared_type(b, count * MMA_M * MMA_K, "f32"),
                shared_type(b, count * MMA_K * MMA_N, "f32"),
            )
        });
        let c32 = b.index(32);
        let lane = b.assign(format!("arith.remui {lin}, {c32} : index"));
        let warp = b.assign(format!("arith.divui {lin}, {c32} : index"));
        let c4 = b.index(4);
        let group = b.assign(format!("arith.divui {lane}, {c4} : index"));
        let in_group = b.assign(format!("arith.remui {lane}, {c4} : index"));
        let wn = b.index(warps[1]);
        let wr = b.assign(format!("arith.divui {warp}, {wn} : index"));
        let wc = b.assign(format!("arith.remui {warp}, {wn} : index"));
        let rows = b.index(sub[0] * MMA_M);
        let cols = b.index(sub[1] * MMA_N);
        let warp_row = b.assign(format!("arith.muli {wr}, {rows} : index"));
        let warp_col = b.assign(format!("arith.muli {wc}, {cols} : index"));
        let emulation = scratch.map(|(scratch_a, scratch_b, a_type, b_type)| {
            let ca = b.index(MMA_M * MMA_K);
            let cb = b.index(MMA_K * MMA_N);
            let a_base = b.assign(format!("arith.muli {warp}, {ca} : index"));
            let b_base = b.assign(format!("arith.muli {warp}, {cb} : index"));
            Emulation { a_base, b_base, scratch_a, scratch_b, a_type, b_type }
        });
        Lanes { group, in_group, warp_row, warp_col, emulation }
    }

    /// `base + offset + scale·lane_part`.
    pub fn at(&self, b: &mut Body, base: &str, offset: usize, lane_part: &str, scale: usize) -> String {
        let part = if scale == 1 {
            lane_part.to_string()
        } else {
            let s = b.index(scale);
            b.assign(format!("arith.muli {lane_part}, {s} : index"))
        };
        let o = b.index(offset);
        let x = b.assign(format!("arith.addi {base}, {o} : index"));
        b.assign(format!("arith.addi {x}, {part} : index"))
    }
}

/// `d = a·b + c` for one `m16n8k8` product of the warp: `a` (4) and `b` (2) are fragment
/// elements as TF32 bits (`i32`), `c` the 4 accumulators of this lane. Returns the 4 new ones.
pub(crate) fn mma(b: &mut Body, l: &Lanes, a: &[String], bf: &[String], c: &[String]) -> Vec<String> {
    if let Some(em) = &l.emulation {
        return emulate_mma(b, l, em, a, bf, c);
    }
    let r = b.assign(format!(
        "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<tf32>, multiplicandBPtxType = #nvvm.mma_type<tf32>, shape = #nvvm.shape<m = 16, n = 8, k = 8>}} : (i32, i32, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
        a.join(", "),
        bf.join(", "),
        c.join(", ")
    ));
    (0..C_FRAGMENT.len())
        .map(|e| b.assign(format!("llvm.extractvalue {r}[{e}] : !llvm.struct<(f32, f32, f32, f32)>")))
        .collect()
}

/// `mma.sync.m16n8k8` with TF32 operands, emulated by one warp through shared memory: each
/// lane stores its A and B fragment elements where the fragment tables put them, then computes
/// its four C elements from the whole 16×8 and 8×8 operands. Every lane of the workgroup runs
/// it, so its barriers are uniform.
fn emulate_mma(
    b: &mut Body,
    l: &Lanes,
    em: &Emulation,
    a: &[String],
    bf: &[String],
    c: &[String],
) -> Vec<String> {
    let at = |b: &mut Body, base: &str, row: &str, stride: usize, col: &str| {
        let s = b.index(stride);
        let r = b.assign(format!("arith.muli {row}, {s} : index"));
        let r = b.assign(format!("arith.addi {base}, {r} : index"));
        b.assign(format!("arith.addi {r}, {col} : index"))
    };
    let plus = |b: &mut Body, x: &str, d: usize| {
        let dc = b.index(d);
        b.assign(format!("arith.addi {x}, {dc} : index"))
    };
    for (x, &(dr, dc)) in a.iter().zip(&A_FRAGMENT) {
        let row = plus(b, &l.group, dr);
        let col = plus(b, &l.in_group, dc);
        let i = at(b, &em.a_base, &row, MMA_K, &col);
        let v = b.assign(format!("arith.bitcast {x} : i32 to f32"));
        b.line(format!("memref.store {v}, {}[{i}] : {}", em.scratch_a, em.a_type));
    }
    for (x, &(dr, dc)) in bf.iter().zip(&B_FRAGMENT) {
        let row = plus(b, &l.in_group, dr);
        let col = plus(b, &l.group, dc);
        let i = at(b, &em.b_base, &row, MMA_N, &col);
        let v = b.assign(format!("arith.bitcast {x} : i32 to f32"));
        b.line(format!("memref.store {v}, {}[{i}] : {}", em.scratch_b, em.b_type));
    }
    b.line("gpu.barrier");
    let mut out = Vec::with_capacity(c.len());
    for (old, &(dr, dc)) in c.iter().zip(&C_FRAGMENT) {
        let row = plus(b, &l.group, dr);
        let two = b.index(2);
        let col = b.assign(format!("arith.muli {}, {two} : index", l.in_group));
        let col = plus(b, &col, dc);
        let mut sum = old.clone();
        for kk in 0..MMA_K {
            let k = b.index(kk);
            let ia = at(b, &em.a_base, &row, MMA_K, &k);
            let ib = at(b, &em.b_base, &k, MMA_N, &col);
            let x = b.assign(format!("memref.load {}[{ia}] : {}", em.scratch_a, em.a_type));
            let y = b.assign(format!("memref.load {}[{ib}] : {}", em.scratch_b, em.b_type));
            sum = b.fma(&x, &y, &sum, "f32");
        }
        out.push(sum);
    }
    b.line("gpu.barrier");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every element of A (16×8), B (8×8) and C (16×8) belongs to exactly one lane and one
    /// fragment slot, as the PTX layout requires: a slip in the tables would show here, not as
    /// wrong numbers on a GPU.
    #[test]
    fn tf32_fragments_cover_each_matrix_once() {
        let mut a = [[0u8; 8]; 16];
        let mut bm = [[0u8; 8]; 8];
        let mut c = [[0u8; 8]; 16];
        for lane in 0..32 {
            let (g, t) = (lane / 4, lane % 4);
            for &(dr, dc) in &A_FRAGMENT {
                a[g + dr][t + dc] += 1;
            }
            for &(dr, dc) in &B_FRAGMENT {
                bm[t + dr][g + dc] += 1;
            }
            for &(dr, dc) in &C_FRAGMENT {
                c[g + dr][2 * t + dc] += 1;
            }
        }
        assert!(a.iter().flatten().all(|&n| n == 1), "{a:?}");
        assert!(bm.iter().flatten().all(|&n| n == 1), "{bm:?}");
        assert!(c.iter().flatten().all(|&n| n == 1), "{c:?}");
    }
}
