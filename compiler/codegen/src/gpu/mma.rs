//! Warp-wide matrix products on tensor cores, shared by the products and attention:
//! `mma.sync.m16n8k8` with TF32 operands and `mma.sync.m16n8k16` with f16 or bf16 ones, f32
//! accumulators in both. Here are where each lane's fragment elements lie, the lane
//! coordinates a kernel computes once, and the product itself, written as the NVVM instruction
//! or, on SPIR-V, emulated by the warp through shared memory so the fragment bookkeeping can
//! be checked on any Vulkan device; and how f32 values become operands: rounded to TF32, f16 or
//! bf16, or split in a high and a low TF32 part whose three products keep close to f32
//! accuracy.

use super::plan::MmaPrecision;
use super::skeleton::{shared, shared_type, SharedArray};
use super::tiles::Rounding;
use super::{GpuCaps, GpuFlavor};
use crate::mlir_text::Body;
use kiln_ir::DType;

/// Rows and columns of every product's accumulator tile: `m16n8`.
pub(crate) const MMA_M: usize = 16;
pub(crate) const MMA_N: usize = 8;

/// Whether attention and products whose operands are of `operands` may run on tensor cores,
/// and at which precision: f16 and bf16 operands at their own precision (they fit it exactly),
/// f32 ones where the user allowed rounding them (`--precision tf32` or `tf32x3`). The flag
/// says whether the operands are exact at the precision, so nothing needs rounding as they
/// enter.
pub(crate) fn tensor_core_precision(operands: &[DType], caps: &GpuCaps) -> Option<(MmaPrecision, bool)> {
    let hw = caps.mma?;
    let all = |d: DType| operands.iter().all(|&o| o == d);
    let (precision, exact) = if all(DType::F16) {
        (MmaPrecision::F16, true)
    } else if all(DType::BF16) {
        (MmaPrecision::Bf16, true)
    } else if all(DType::F32) {
        (caps.tensor_cores?, false)
    } else {
        return None;
    };
    precision.runs_on(hw).then_some((precision, exact))
}

/// Where one lane's operand elements of one product lie (PTX ISA, "Matrix Fragments for
/// mma.m16n8k8" with `.tf32`, and for `mma.m16n8k16` with `.f16`/`.bf16`): lane `l` of the warp
/// has `group = l / 4` and `in_group = l % 4`. Each entry of `a` is a `(row, column)` offset
/// added to `(group, lane_k·in_group)` in A (16 × k, row-major); each entry of `b` is added to
/// `(lane_k·in_group, group)` in B (k × 8). 16-bit operands come two to a register: entries
/// `2i` and `2i + 1` share one, the first in its low half.
pub(crate) struct Fragments {
    /// The product's k.
    pub k: usize,
    /// Columns of A (rows of B) between the first elements of neighbouring lanes of a group.
    pub lane_k: usize,
    pub a: &'static [(usize, usize)],
    pub b: &'static [(usize, usize)],
}

/// `m16n8k8` with TF32 operands: one per register.
pub(crate) const TF32_FRAGMENTS: Fragments =
    Fragments { k: 8, lane_k: 1, a: &[(0, 0), (8, 0), (0, 4), (8, 4)], b: &[(0, 0), (4, 0)] };

/// `m16n8k16` with f16 or bf16 operands: two per register.
pub(crate) const HALF_FRAGMENTS: Fragments = Fragments {
    k: 16,
    lane_k: 2,
    a: &[(0, 0), (0, 1), (8, 0), (8, 1), (0, 8), (0, 9), (8, 8), (8, 9)],
    b: &[(0, 0), (1, 0), (8, 0), (9, 0)],
};

/// Where the accumulators lie (the same for every precision): added to `(group,
/// 2·in_group)` of C (16 × 8).
pub(crate) const C_FRAGMENT: [(usize, usize); 4] = [(0, 0), (0, 1), (8, 0), (8, 1)];

/// The fragments of `precision`'s products.
pub(crate) fn fragments(precision: MmaPrecision) -> &'static Fragments {
    match precision {
        MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => &TF32_FRAGMENTS,
        MmaPrecision::F16 | MmaPrecision::Bf16 => &HALF_FRAGMENTS,
    }
}

/// One operand element of a product as the tensor cores take it: TF32 bits (`i32`, and at
/// [`MmaPrecision::Tf32x3`] the low part's bits too), an `f16`, or bf16 bits (`i16`).
#[derive(Clone)]
pub(crate) struct Part {
    pub hi: String,
    pub lo: Option<String>,
}

/// This lane's share of one operand of a product: its elements, or its registers already
/// packed where 16-bit elements were read from shared memory two at a time (on NVVM).
pub(crate) enum Fragment {
    Elements(Vec<Part>),
    Registers(Vec<String>),
}

/// How a kernel turns values into [`Part`]s. Shared tiles hold TF32 operands as f32 values,
/// rounded once as they enter or, at TF32×3, unrounded and split as
/// they are read; 16-bit operands as 16-bit values (`f16`, or bf16 bits as `i16`), so a read
/// is the operand itself.
#[derive(Clone, Copy)]
pub(crate) struct Parts {
    pub precision: MmaPrecision,
    pub rounding: Rounding,
    /// Whether the operands are exact at the precision (f16 and bf16 tensors).
    pub exact: bool,
}

impl Parts {
    pub fn new(precision: MmaPrecision, flavor: GpuFlavor, exact: bool) -> Parts {
        let nvvm = flavor == GpuFlavor::Nvvm;
        let rounding = match precision {
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 if nvvm => Rounding::Tf32Nvvm,
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => Rounding::Tf32Bits,
            MmaPrecision::F16 => Rounding::F16,
            MmaPrecision::Bf16 if nvvm => Rounding::Bf16Nvvm,
            MmaPrecision::Bf16 => Rounding::Bf16Bits,
        };
        Parts { precision, rounding, exact }
    }

    /// The element type of the shared tiles that hold operands.
    pub fn shared_elem(&self) -> &'static str {
        match self.precision {
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => "f32",
            MmaPrecision::F16 => "f16",
            MmaPrecision::Bf16 => "i16",
        }
    }

    /// An f32 operand value as it enters a shared tile: rounded to TF32, kept (TF32×3), or
    /// converted to 16 bits (rounded unless exact).
    pub fn entering(&self, b: &mut Body, x: &str) -> String {
        match self.precision {
            MmaPrecision::Tf32 => self.rounding.apply(b, x),
            MmaPrecision::Tf32x3 => x.to_string(),
            MmaPrecision::F16 | MmaPrecision::Bf16 => self.half(b, x, !self.exact),
        }
    }

    /// An f32 operand value as a raw copy of its bytes leaves it in a shared tile (what
    /// [`Parts::entering`] gives, except that TF32 operands are not yet rounded: see
    /// [`Parts::copy_rounding`]). Only operands whose shared elements are their own bytes are
    /// copied so: f32 ones, and 16-bit ones of 16-bit tensors.
    pub fn copied(&self, b: &mut Body, x: &str) -> String {
        match self.precision {
            MmaPrecision::Tf32 => x.to_string(),
            MmaPrecision::Tf32x3 | MmaPrecision::F16 | MmaPrecision::Bf16 => self.entering(b, x),
        }
    }

    /// The rounding copied operands get in place once they landed ([`Parts::copied`]).
    pub fn copy_rounding(&self) -> Option<Rounding> {
        match self.precision {
            MmaPrecision::Tf32 => Some(self.rounding),
            MmaPrecision::Tf32x3 | MmaPrecision::F16 | MmaPrecision::Bf16 => None,
        }
    }

    /// An operand element read from a shared tile ([`Parts::entering`]).
    pub fn stored(&self, b: &mut Body, x: &str) -> Part {
        match self.precision {
            MmaPrecision::Tf32 => Part { hi: b.assign(format!("arith.bitcast {x} : f32 to i32")), lo: None },
            MmaPrecision::Tf32x3 => self.split(b, x),
            MmaPrecision::F16 | MmaPrecision::Bf16 => Part { hi: x.to_string(), lo: None },
        }
    }

    /// An f32 operand value straight from memory: rounded (unless exact), or split.
    pub fn fresh(&self, b: &mut Body, x: &str) -> Part {
        match self.precision {
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => {
                let v = self.entering(b, x);
                self.stored(b, &v)
            }
            MmaPrecision::F16 | MmaPrecision::Bf16 => Part { hi: self.half(b, x, !self.exact), lo: None },
        }
    }

    /// An f32 value the kernel computed (attention's weights), as an operand: rounded to the
    /// precision, or split.
    pub fn computed(&self, b: &mut Body, x: &str) -> Part {
        match self.precision {
            MmaPrecision::Tf32 => {
                let r = self.rounding.apply(b, x);
                self.stored(b, &r)
            }
            MmaPrecision::Tf32x3 => self.split(b, x),
            MmaPrecision::F16 | MmaPrecision::Bf16 => Part { hi: self.half(b, x, true), lo: None },
        }
    }

    /// An f32 value as a 16-bit operand: an `f16` (to nearest, ties to even), or bf16 bits
    /// (`i16`: the high half of the f32, after rounding it to bf16 unless it is exact).
    fn half(&self, b: &mut Body, x: &str, round: bool) -> String {
        match self.precision {
            MmaPrecision::F16 => b.assign(format!("arith.truncf {x} : f32 to f16")),
            MmaPrecision::Bf16 | MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => {
                let x = if round { self.rounding.apply(b, x) } else { x.to_string() };
                let bits = b.assign(format!("arith.bitcast {x} : f32 to i32"));
                let c16 = b.int(16, "i32");
                let high = b.assign(format!("arith.shrui {bits}, {c16} : i32"));
                b.assign(format!("arith.trunci {high} : i32 to i16"))
            }
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

/// `d = a·b + c` for one product of the warp from operand fragments: one tensor-core
/// product, or at TF32×3 three (the small terms first, so they are not lost to the large).
pub(crate) fn mma_parts(b: &mut Body, l: &Lanes, a: &Fragment, bf: &Fragment, c: &[String]) -> Vec<String> {
    // The high and the low parts as fragments of their own, where every element has both.
    let split = |f: &Fragment| match f {
        Fragment::Elements(p) => {
            let lo = p.iter().map(|x| x.lo.clone()).collect::<Option<Vec<String>>>()?;
            let whole =
                |v: Vec<String>| Fragment::Elements(v.into_iter().map(|hi| Part { hi, lo: None }).collect());
            Some((whole(p.iter().map(|x| x.hi.clone()).collect()), whole(lo)))
        }
        Fragment::Registers(_) => None,
    };
    match (split(a), split(bf)) {
        (Some((a_hi, a_lo)), Some((b_hi, b_lo))) => {
            let acc = mma(b, l, &a_lo, &b_hi, c);
            let acc = mma(b, l, &a_hi, &b_lo, &acc);
            mma(b, l, &a_hi, &b_hi, &acc)
        }
        _ => mma(b, l, a, bf, c),
    }
}

/// A warp lane's coordinates, computed once per kernel, and the products it takes part in.
pub(crate) struct Lanes {
    /// The lane's number in its warp.
    pub lane: String,
    /// `lane / 4` and `lane % 4`.
    pub group: String,
    pub in_group: String,
    /// The first row and column of this warp's block of the tile.
    pub warp_row: String,
    pub warp_col: String,
    /// The operand precision of the warp's products, and where their fragments lie.
    pub precision: MmaPrecision,
    pub frag: &'static Fragments,
    /// Where a lane emulates `mma.sync` (SPIR-V, for checking the fragment bookkeeping on any
    /// Vulkan device): its warp's slices of two shared scratch arrays (a 16 × k A and a k × 8
    /// B per warp), and their types.
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
    pub fn new(
        b: &mut Body,
        lin: &str,
        warps: [usize; 2],
        sub: [usize; 2],
        precision: MmaPrecision,
    ) -> Lanes {
        let emulate = b.gpu() != Some(GpuFlavor::Nvvm);
        Lanes::with_scratch(b, lin, warps, sub, precision, emulate)
    }

    /// The lanes of warps whose products need no `mma.sync` emulation (warpgroup products,
    /// emulated from shared memory directly).
    pub fn placed(
        b: &mut Body,
        lin: &str,
        warps: [usize; 2],
        sub: [usize; 2],
        precision: MmaPrecision,
    ) -> Lanes {
        Lanes::with_scratch(b, lin, warps, sub, precision, false)
    }

    fn with_scratch(
        b: &mut Body,
        lin: &str,
        warps: [usize; 2],
        sub: [usize; 2],
        precision: MmaPrecision,
        emulate: bool,
    ) -> Lanes {
        let frag = fragments(precision);
        let count = warps[0] * warps[1];
        let (a_len, b_len) = (MMA_M * frag.k, frag.k * MMA_N);
        let scratch = emulate.then(|| {
            let a = shared(b, count * a_len, "f32");
            let bb = shared(b, count * b_len, "f32");
            (a, bb, shared_type(b, count * a_len, "f32"), shared_type(b, count * b_len, "f32"))
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
            let ca = b.index(a_len);
            let cb = b.index(b_len);
            let a_base = b.assign(format!("arith.muli {warp}, {ca} : index"));
            let b_base = b.assign(format!("arith.muli {warp}, {cb} : index"));
            Emulation { a_base, b_base, scratch_a, scratch_b, a_type, b_type }
        });
        Lanes { lane, group, in_group, warp_row, warp_col, precision, frag, emulation }
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

    /// Reads this lane's fragment of one operand from a shared tile, whose element at table
    /// entry `(dr, dc)` lies at `at(b, dr, dc)`. Where a register's two 16-bit elements lie
    /// next to each other there (`adjacent`) and the products are not emulated, each pair is
    /// read as one 32-bit word.
    pub fn read(
        &self,
        b: &mut Body,
        ops: &Parts,
        mem: &SharedArray,
        table: &[(usize, usize)],
        adjacent: bool,
        at: &mut dyn FnMut(&mut Body, usize, usize) -> String,
    ) -> Fragment {
        if adjacent && self.precision.paired() && self.emulation.is_none() {
            let elem = ops.shared_elem();
            let registers = table
                .chunks(2)
                .map(|pair| {
                    let i = at(b, pair[0].0, pair[0].1);
                    let v = b.assign(format!(
                        "vector.load {}[{i}] {{alignment = 4}} : {}, vector<2x{elem}>",
                        mem.name, mem.ty
                    ));
                    match self.precision {
                        MmaPrecision::Bf16 => {
                            let w = b.assign(format!("vector.bitcast {v} : vector<2xi16> to vector<1xi32>"));
                            b.assign(format!("vector.extract {w}[0] : i32 from vector<1xi32>"))
                        }
                        MmaPrecision::F16 | MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => v,
                    }
                })
                .collect();
            return Fragment::Registers(registers);
        }
        let parts = table
            .iter()
            .map(|&(dr, dc)| {
                let i = at(b, dr, dc);
                let x = b.assign(format!("memref.load {}[{i}] : {}", mem.name, mem.ty));
                ops.stored(b, &x)
            })
            .collect();
        Fragment::Elements(parts)
    }

    /// Four 8 × 8 matrices of 16-bit elements read as `ldmatrix.sync.aligned.m8n8.x4` reads
    /// them: lane `8j + i` names row `i` of matrix `j`, which starts at `row_at(b, i, j % 2,
    /// j / 2)` in `mem` (8 adjacent elements, 16-byte aligned), and each lane receives one
    /// register per matrix: the elements at its row `lane / 4`, columns `2·(lane % 4)` and the
    /// next; with `trans`, of the transposed matrix (rows `2·(lane % 4)` and the next, column
    /// `lane / 4`). One fragment per matrix, in order. On NVVM the instruction itself, from
    /// `shared`, the array's pointer; where the products are emulated, each lane reads what
    /// the instruction would hand it, from the rows the other lanes would name.
    pub fn ldmatrix(
        &self,
        b: &mut Body,
        ops: &Parts,
        mem: &SharedArray,
        shared: Option<&str>,
        trans: bool,
        row_at: &mut dyn FnMut(&mut Body, &str, &str, &str) -> String,
    ) -> Vec<Fragment> {
        match (shared, &self.emulation) {
            (Some(ptr), None) => {
                let (c8, c16, c2) = (b.index(8), b.index(16), b.index(2));
                let i = b.assign(format!("arith.remui {}, {c8} : index", self.lane));
                let j = b.assign(format!("arith.divui {}, {c8} : index", self.lane));
                let h = b.assign(format!("arith.remui {j}, {c2} : index"));
                let q = b.assign(format!("arith.divui {}, {c16} : index", self.lane));
                let at = row_at(b, &i, &h, &q);
                let at = b.assign(format!("arith.index_cast {at} : index to i32"));
                let elem = ops.shared_elem();
                let p = b.assign(format!(
                    "llvm.getelementptr {ptr}[{at}] : (!llvm.ptr<3>, i32) -> !llvm.ptr<3>, {elem}"
                ));
                let layout = if trans { "col" } else { "row" };
                let st = "!llvm.struct<(i32, i32, i32, i32)>";
                let r = b.assign(format!(
                    "nvvm.ldmatrix {p} {{num = 4 : i32, layout = #nvvm.mma_layout<{layout}>, shape = #nvvm.ld_st_matrix_shape<m = 8, n = 8>, eltType = #nvvm.ld_st_matrix_elt_type<b16>}} : (!llvm.ptr<3>) -> {st}"
                ));
                (0..4)
                    .map(|m| {
                        let w = b.assign(format!("llvm.extractvalue {r}[{m}] : {st}"));
                        let reg = match self.precision {
                            MmaPrecision::F16 => b.assign(format!("llvm.bitcast {w} : i32 to vector<2xf16>")),
                            MmaPrecision::Bf16 | MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => w,
                        };
                        Fragment::Registers(vec![reg])
                    })
                    .collect()
            }
            _ => (0..4)
                .map(|m| {
                    let (h, q) = (b.index(m % 2), b.index(m / 2));
                    let parts = (0..2)
                        .map(|e| {
                            let at = if trans {
                                let c0 = b.index(0);
                                let r = self.at(b, &c0, e, &self.in_group, 2);
                                let start = row_at(b, &r, &h, &q);
                                b.assign(format!("arith.addi {start}, {} : index", self.group))
                            } else {
                                let start = row_at(b, &self.group, &h, &q);
                                self.at(b, &start, e, &self.in_group, 2)
                            };
                            let x = b.assign(format!("memref.load {}[{at}] : {}", mem.name, mem.ty));
                            ops.stored(b, &x)
                        })
                        .collect();
                    Fragment::Elements(parts)
                })
                .collect(),
        }
    }

    /// This lane's first column of A (row of B) in a product: `lane_k·in_group`.
    pub fn k_lane(&self, b: &mut Body) -> String {
        let c0 = b.index(0);
        self.at(b, &c0, 0, &self.in_group, self.frag.lane_k)
    }
}

/// `d = a·b + c` for one product of the warp: `a` and `b` are this lane's fragments (their
/// elements placed as [`Lanes::frag`] says), `c` its 4 accumulators. Returns the 4 new ones.
pub(crate) fn mma(b: &mut Body, l: &Lanes, a: &Fragment, bf: &Fragment, c: &[String]) -> Vec<String> {
    if let Some(em) = &l.emulation {
        return emulate_mma(b, l, em, &elements(a), &elements(bf), c);
    }
    // Operand registers, the PTX type and the register type of the intrinsic.
    let registers = |b: &mut Body, f: &Fragment| match f {
        Fragment::Registers(r) => r.clone(),
        Fragment::Elements(e) => {
            let his: Vec<String> = e.iter().map(|p| p.hi.clone()).collect();
            match l.precision {
                MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => his,
                MmaPrecision::F16 => pack_f16(b, &his),
                MmaPrecision::Bf16 => pack_bf16(b, &his),
            }
        }
    };
    let (a, bf) = (registers(b, a), registers(b, bf));
    let (ptx, reg) = match l.precision {
        MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => ("tf32", "i32"),
        MmaPrecision::F16 => ("f16", "vector<2xf16>"),
        MmaPrecision::Bf16 => ("bf16", "i32"),
    };
    let k = l.frag.k;
    let r = b.assign(format!(
        "nvvm.mma.sync A[{}] B[{}] C[{}] {{layoutA = #nvvm.mma_layout<row>, layoutB = #nvvm.mma_layout<col>, multiplicandAPtxType = #nvvm.mma_type<{ptx}>, multiplicandBPtxType = #nvvm.mma_type<{ptx}>, shape = #nvvm.shape<m = 16, n = 8, k = {k}>}} : ({reg}, {reg}, f32) -> !llvm.struct<(f32, f32, f32, f32)>",
        a.join(", "),
        bf.join(", "),
        c.join(", ")
    ));
    (0..C_FRAGMENT.len())
        .map(|e| b.assign(format!("llvm.extractvalue {r}[{e}] : !llvm.struct<(f32, f32, f32, f32)>")))
        .collect()
}

/// A fragment's registers as `i32` words (what inline assembly takes): TF32 bits, or 16-bit
/// pairs with the first element in the low half.
pub(crate) fn words(b: &mut Body, precision: MmaPrecision, f: &Fragment) -> Vec<String> {
    let registers = match f {
        Fragment::Registers(r) => r.clone(),
        Fragment::Elements(e) => {
            let his: Vec<String> = e.iter().map(|p| p.hi.clone()).collect();
            match precision {
                MmaPrecision::F16 => pack_f16(b, &his),
                MmaPrecision::Bf16 => pack_bf16(b, &his),
                MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => his,
            }
        }
    };
    match precision {
        MmaPrecision::F16 => {
            registers.iter().map(|r| b.assign(format!("llvm.bitcast {r} : vector<2xf16> to i32"))).collect()
        }
        MmaPrecision::Bf16 | MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => registers,
    }
}

/// Pairs of `f16` elements as the `.f16x2` registers of a fragment.
fn pack_f16(b: &mut Body, xs: &[String]) -> Vec<String> {
    xs.chunks(2).map(|p| b.assign(format!("vector.from_elements {} : vector<2xf16>", p.join(", ")))).collect()
}

/// Pairs of bf16 bits (`i16`) as the `.bf16x2` registers of a fragment: the first in the low
/// half.
fn pack_bf16(b: &mut Body, xs: &[String]) -> Vec<String> {
    let c16 = b.int(16, "i32");
    xs.chunks(2)
        .map(|p| {
            let lo = b.assign(format!("arith.extui {} : i16 to i32", p[0]));
            let hi = b.assign(format!("arith.extui {} : i16 to i32", p[1]));
            let hi = b.assign(format!("arith.shli {hi}, {c16} : i32"));
            b.assign(format!("arith.ori {hi}, {lo} : i32"))
        })
        .collect()
}

/// `x + 8·h` for a lane part `h` (`ldmatrix` addressing: which matrix a lane names a row of).
pub(crate) fn eight(b: &mut Body, x: &str, h: &str) -> String {
    let c8 = b.index(8);
    let t = b.assign(format!("arith.muli {h}, {c8} : index"));
    b.assign(format!("arith.addi {x}, {t} : index"))
}

/// One fragment of the registers or elements of `parts`, in order (`ldmatrix` gives them all
/// of one kind).
pub(crate) fn joined(parts: &[Fragment]) -> Fragment {
    let (mut registers, mut elements) = (Vec::new(), Vec::new());
    for f in parts {
        match f {
            Fragment::Registers(r) => registers.extend_from_slice(r),
            Fragment::Elements(e) => elements.extend_from_slice(e),
        }
    }
    debug_assert!(registers.is_empty() || elements.is_empty(), "fragments of two kinds");
    if elements.is_empty() {
        Fragment::Registers(registers)
    } else {
        Fragment::Elements(elements)
    }
}

/// A fragment's elements ([`Part::hi`]s), for the emulation. Only [`Lanes::read`] forms
/// registers, and never where the products are emulated.
fn elements(f: &Fragment) -> Vec<String> {
    match f {
        Fragment::Elements(e) => e.iter().map(|p| p.hi.clone()).collect(),
        Fragment::Registers(_) => unreachable!("emulated products read their fragments as elements"),
    }
}

/// A fragment element as the f32 it stands for, for the emulation.
pub(crate) fn unpack(b: &mut Body, precision: MmaPrecision, x: &str) -> String {
    match precision {
        MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => b.assign(format!("arith.bitcast {x} : i32 to f32")),
        MmaPrecision::F16 => b.assign(format!("arith.extf {x} : f16 to f32")),
        MmaPrecision::Bf16 => {
            let w = b.assign(format!("arith.extui {x} : i16 to i32"));
            let c16 = b.int(16, "i32");
            let w = b.assign(format!("arith.shli {w}, {c16} : i32"));
            b.assign(format!("arith.bitcast {w} : i32 to f32"))
        }
    }
}

/// One product emulated by one warp through shared memory: each lane stores its A and B
/// fragment elements where the fragment tables put them, then computes its four C elements
/// from the whole 16 × k and k × 8 operands. Every lane of the workgroup runs it, so its
/// barriers are uniform.
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
    let frag = l.frag;
    let k_lane = l.k_lane(b);
    for (x, &(dr, dc)) in a.iter().zip(frag.a) {
        let row = plus(b, &l.group, dr);
        let col = plus(b, &k_lane, dc);
        let i = at(b, &em.a_base, &row, frag.k, &col);
        let v = unpack(b, l.precision, x);
        b.line(format!("memref.store {v}, {}[{i}] : {}", em.scratch_a, em.a_type));
    }
    for (x, &(dr, dc)) in bf.iter().zip(frag.b) {
        let row = plus(b, &k_lane, dr);
        let col = plus(b, &l.group, dc);
        let i = at(b, &em.b_base, &row, MMA_N, &col);
        let v = unpack(b, l.precision, x);
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
        for kk in 0..frag.k {
            let k = b.index(kk);
            let ia = at(b, &em.a_base, &row, frag.k, &k);
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

    /// Every element of A (16 × k), B (k × 8) and C (16 × 8) belongs to exactly one lane and
    /// one fragment slot, as the PTX layouts require, for both shapes: a slip in the tables
    /// would show here, not as wrong numbers on a GPU. 16-bit pairs are adjacent along k.
    #[test]
    fn fragments_cover_each_matrix_once() {
        for frag in [&TF32_FRAGMENTS, &HALF_FRAGMENTS] {
            let k = frag.k;
            let mut a = [[0u8; 16]; 16];
            let mut bm = [[0u8; 8]; 16];
            let mut c = [[0u8; 8]; 16];
            for lane in 0..32 {
                let (g, t) = (lane / 4, lane % 4);
                for &(dr, dc) in frag.a {
                    a[g + dr][frag.lane_k * t + dc] += 1;
                }
                for &(dr, dc) in frag.b {
                    bm[frag.lane_k * t + dr][g + dc] += 1;
                }
                for &(dr, dc) in &C_FRAGMENT {
                    c[g + dr][2 * t + dc] += 1;
                }
            }
            assert!(
                a.iter().all(|r| r[..k].iter().all(|&n| n == 1) && r[k..].iter().all(|&n| n == 0)),
                "{a:?}"
            );
            assert!(bm[..k].iter().flatten().all(|&n| n == 1) && bm[k..].iter().flatten().all(|&n| n == 0));
            assert!(c.iter().flatten().all(|&n| n == 1), "{c:?}");
            if frag.lane_k == 2 {
                for p in frag.a.chunks(2) {
                    assert_eq!((p[0].0, p[0].1 + 1), p[1]);
                }
                for p in frag.b.chunks(2) {
                    assert_eq!((p[0].0 + 1, p[0].1), p[1]);
                }
            }
        }
    }
}
