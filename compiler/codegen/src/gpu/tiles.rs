//! Operand tiles that a workgroup reads cooperatively from memory into shared memory, for
//! the products and attention: each invocation reads a few runs of adjacent elements (one
//! vector access per run of 4 where the layout allows, no bounds checks where the tile never
//! crosses the operand's edges), then stores them where the kernel's shared layout puts them,
//! rounded as the kernel asks. Reading and storing are separate steps so that a kernel can
//! read the next tile while it computes on the current one.

use super::mma::Parts;
use super::plan::{CoreLines, SharedLayout, CORE};
use super::skeleton::{clamp, offset_at, plus, SharedArray};
use super::GpuFlavor;
use crate::kernels::elementwise::{load, to_reg};
use crate::kernels::View;
use crate::mlir_text::Body;
use kiln_ir::DType;

/// Whether every element offset of `v` that starts a run of 4 along `axis` (stride 1) is a
/// multiple of 4: its offset and every other stride are, and the axis's extent is.
pub(crate) fn aligned_by_4(v: &View, axis: usize) -> bool {
    aligned_by(v, axis, 4)
}

/// [`aligned_by_4`] for runs of `n`.
pub(crate) fn aligned_by(v: &View, axis: usize, n: usize) -> bool {
    v.strides[axis] == 1
        && v.shape[axis].is_multiple_of(n)
        && v.offset.is_multiple_of(n)
        && v.strides.iter().enumerate().all(|(i, s)| i == axis || s % n == 0 || v.shape[i] == 1)
}

/// Bytes one asynchronous copy moves (`cp.async.cg` copies 16).
const ASYNC_COPY_BYTES: usize = 16;

/// Where the asynchronous copies of a kernel's operand tiles read and write: the operand's
/// global pointer and its shared array's pointer, as LLVM pointers (NVVM only: the memrefs'
/// descriptors, whose aligned pointer is field 1).
pub(crate) struct CopyPointers {
    global: String,
    shared: String,
}

/// Two operand tiles on their way into a kernel's ring of `stages` shared stages: each either
/// copied (elements per copy, [`OperandTile::async_run`]; with `cp.async` on NVVM, emulated as
/// plain reads and writes elsewhere) or read into registers one tile ahead and stored after the
/// step's work. Tile t lies in stage t mod S; a step waits for its own copies of tile t, rounds
/// them where the operands need it, and a barrier publishes everyone's: then no one reads
/// stage (t − 1) mod S any more, and tile t + S − 1 goes there. Where the products of a step
/// may still run during the next one (warpgroup products in flight), copies run that many
/// tiles less `ahead`: tile t + `ahead` goes to the stage read `S − ahead` steps before.
/// Every fill and step commits one group of copies (empty past the end), so each step waits
/// for the same count. Without copies the barrier closes the step instead (the next tile
/// stored, this one no longer read).
pub(crate) struct Pipeline<'p, 'v> {
    tiles: [Option<&'p OperandTile<'v>>; 2],
    mems: [&'p SharedArray<'p>; 2],
    /// Elements of one stage of each array.
    lens: [usize; 2],
    stages: usize,
    /// How many tiles ahead of the step's the copies run (`stages − 1`, less the steps whose
    /// products may still read their stages).
    ahead: usize,
    copies: [Option<usize>; 2],
    pointers: [Option<CopyPointers>; 2],
    /// How tensor-core operands enter the tiles (`None`: register values as they are).
    parts: Option<&'p Parts>,
    nvvm: bool,
    lin: &'p str,
    /// Whether the stages are read through the async proxy (warpgroup products): then each
    /// invocation fences its writes to them before the barrier that publishes them.
    async_proxy: bool,
    /// Where copied TF32×3 operands are split once they landed: the high part in place, the
    /// low part this many elements further into the stage (per array).
    split: Option<[usize; 2]>,
}

/// Where each tile of a [`Pipeline`] starts: operand row and column.
pub(crate) type Origins = [(String, String); 2];

impl<'p, 'v> Pipeline<'p, 'v> {
    /// The pipeline of `tiles` into `mems` (stages of `lens` elements); tiles that allow it are
    /// copied where `async_copies`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &mut Body,
        tiles: [Option<&'p OperandTile<'v>>; 2],
        mems: [&'p SharedArray<'p>; 2],
        lens: [usize; 2],
        stages: usize,
        parts: Option<&'p Parts>,
        async_copies: bool,
        lin: &'p str,
    ) -> Pipeline<'p, 'v> {
        let nvvm = b.gpu() == Some(GpuFlavor::Nvvm);
        // Register values in shared memory are copied only as f32 (`async_run` takes no other
        // register type): 4 bytes each.
        let elem_bytes = parts.map_or(4, |ops| ops.precision.shared_bytes());
        let copies = match async_copies {
            true => tiles.map(|t| t.and_then(|t| t.async_run(b, elem_bytes))),
            false => [None, None],
        };
        let mut pointers = [None, None];
        for ((p, (tile, copy)), mem) in pointers.iter_mut().zip(tiles.iter().zip(copies)).zip(mems) {
            if let (Some(tile), Some(_), true) = (tile, copy, nvvm) {
                *p = Some(tile.pointers(b, mem));
            }
        }
        let ahead = stages.saturating_sub(1);
        Pipeline {
            tiles,
            mems,
            lens,
            stages,
            ahead,
            copies,
            pointers,
            parts,
            nvvm,
            lin,
            async_proxy: false,
            split: None,
        }
    }

    /// The same pipeline, its copied operands split into a high and a low TF32 part once they
    /// land, the low part `lo` elements after the high one (warpgroup products of TF32×3
    /// operands, which read both parts from shared memory).
    pub fn splitting_into(self, lo: Option<[usize; 2]>) -> Pipeline<'p, 'v> {
        Pipeline { split: lo, ..self }
    }

    /// Whether every tile is copied (none goes through registers).
    pub fn copies_whole(&self) -> bool {
        self.tiles.iter().zip(self.copies).all(|(t, c)| t.is_none() || c.is_some())
    }

    /// The same pipeline with the products of `steps` steps still reading their stages when a
    /// step begins: copies run that many tiles less ahead (at least one).
    pub fn with_products_in_flight(self, steps: usize) -> Pipeline<'p, 'v> {
        let ahead = self.stages.saturating_sub(1 + steps).max(1);
        Pipeline { ahead, ..self }
    }

    /// How many tiles ahead of the step's the copies run: the walk fills the first this many
    /// stages before it starts.
    pub fn ahead_by(&self) -> usize {
        self.ahead
    }

    /// The same pipeline, its stages read through the async proxy where `proxy` (NVVM).
    pub fn read_by_async_proxy(self, proxy: bool) -> Pipeline<'p, 'v> {
        Pipeline { async_proxy: proxy && self.nvvm, ..self }
    }

    /// The barrier that publishes the stages' new contents (fenced for the async proxy).
    fn publish(&self, b: &mut Body) {
        if self.async_proxy {
            super::wgmma::proxy_fence(b);
        }
        b.line("gpu.barrier");
    }

    /// Whether any tile is copied.
    pub fn copying(&self) -> bool {
        self.copies.iter().any(Option::is_some)
    }

    /// Fills stage `s` before the walk: the copied tiles at `origins` where `real` holds
    /// (always without it; issued first, so they are on their way soonest), committed as a
    /// group, then the registers' tiles at `clamped`.
    #[allow(clippy::too_many_arguments)]
    pub fn fill(
        &self,
        b: &mut Body,
        s: usize,
        (clamped, origins): (&Origins, &Origins),
        real: Option<&str>,
        zero: &str,
        ty: &str,
    ) {
        let at = self.lens.map(|len| b.index(s * len));
        let at = [at[0].as_str(), at[1].as_str()];
        self.copy_where(b, origins, real, at);
        let fetched = self.fetch(b, clamped, zero, ty);
        self.deposit(b, &fetched, at, ty);
    }

    /// After the fills: without copies, the barrier that publishes them.
    pub fn filled(&self, b: &mut Body) {
        if !self.copying() {
            self.publish(b);
        }
    }

    /// Opens step `t`: returns the offsets of tile t's stage in each array and of the stage
    /// tile t + S − 1 goes to (the other one, with two), after waiting for this invocation's
    /// copies of tile t, rounding them, and the barrier that publishes everyone's.
    pub fn arrive(&self, b: &mut Body, t: &str) -> ([String; 2], [String; 2]) {
        let sc = b.index(self.stages);
        let cur = b.assign(format!("arith.remui {t}, {sc} : index"));
        let lens = self.lens.map(|len| b.index(len));
        let here = [0, 1].map(|i| b.assign(format!("arith.muli {cur}, {} : index", lens[i])));
        let next = if self.stages == 2 && self.ahead == 1 {
            [0, 1].map(|i| b.assign(format!("arith.subi {}, {} : index", lens[i], here[i])))
        } else {
            let ahead = b.index(self.ahead);
            let nt = b.assign(format!("arith.addi {t}, {ahead} : index"));
            let nxt = b.assign(format!("arith.remui {nt}, {sc} : index"));
            [0, 1].map(|i| b.assign(format!("arith.muli {nxt}, {} : index", lens[i])))
        };
        if self.copying() {
            if self.nvvm {
                b.line(format!("nvvm.cp.async.wait.group {}", self.ahead - 1));
            }
            self.round(b, [&here[0], &here[1]]);
            self.publish(b);
        }
        (here, next)
    }

    /// Sends tile t + S − 1 on its way into the stages at `next`: the registers' tiles read
    /// at `clamped` (stored by [`Pipeline::close`]), the copied ones issued at `origins` where
    /// `real` holds (always without it); commits the group.
    #[allow(clippy::too_many_arguments)]
    pub fn ahead(
        &self,
        b: &mut Body,
        (clamped, origins): (&Origins, &Origins),
        real: Option<&str>,
        next: &[String; 2],
        zero: &str,
        ty: &str,
    ) -> [Option<Fetched>; 2] {
        let fetched = self.fetch(b, clamped, zero, ty);
        self.copy_where(b, origins, real, [&next[0], &next[1]]);
        fetched
    }

    /// Closes a step: stores what [`Pipeline::ahead`] read into the stages at `next`, and
    /// without copies the barrier.
    pub fn close(&self, b: &mut Body, fetched: &[Option<Fetched>; 2], next: &[String; 2], ty: &str) {
        self.deposit(b, fetched, [&next[0], &next[1]], ty);
        self.filled(b);
    }

    /// After the walk: no copy may outlive the kernel (only those of tiles no one reads can
    /// be pending).
    pub fn drain(&self, b: &mut Body) {
        if self.nvvm && self.copying() {
            b.line("nvvm.cp.async.wait.group 0");
        }
    }

    /// Copies the copied tiles at `origins` into the stages at `at` where `real` holds, and
    /// commits the group.
    fn copy_where(&self, b: &mut Body, origins: &Origins, real: Option<&str>, at: [&str; 2]) {
        if !self.copying() {
            return;
        }
        if let Some(real) = real {
            b.open(format!("scf.if {real}"));
        }
        let each = self.tiles.iter().zip(self.copies).zip(self.mems).zip(&self.pointers).zip(origins).zip(at);
        for (((((tile, copy), mem), pointers), (row, col)), at) in each {
            if let (Some(tile), Some(run)) = (tile, copy) {
                tile.copy(b, self.lin, (row, col), (mem, at), run, pointers.as_ref(), self.parts);
            }
        }
        if real.is_some() {
            b.close("");
        }
        if self.nvvm {
            b.line("nvvm.cp.async.commit.group");
        }
    }

    /// Reads the registers' tiles at `origins`.
    fn fetch(&self, b: &mut Body, origins: &Origins, zero: &str, ty: &str) -> [Option<Fetched>; 2] {
        let mut fetched = [None, None];
        for ((slot, (tile, copy)), (row, col)) in
            fetched.iter_mut().zip(self.tiles.iter().zip(self.copies)).zip(origins)
        {
            if let (Some(tile), None) = (tile, copy) {
                *slot = Some(tile.fetch(b, self.lin, (row, col), zero, ty));
            }
        }
        fetched
    }

    /// Stores what [`Pipeline::fetch`] read into the stages at `at` (split as the copies are,
    /// [`Pipeline::splitting_into`]).
    fn deposit(&self, b: &mut Body, fetched: &[Option<Fetched>; 2], at: [&str; 2], ty: &str) {
        let split = self.split.map_or([None, None], |lo| lo.map(Some));
        for ((((tile, f), mem), at), lo) in self.tiles.iter().zip(fetched).zip(self.mems).zip(at).zip(split) {
            if let (Some(tile), Some(f)) = (tile, f) {
                tile.deposit_split(b, f, (mem, at), self.parts, lo, ty);
            }
        }
    }

    /// Rounds in place what this invocation copied into the stages at `at`, where the
    /// operands need it ([`Parts::copy_rounding`]), or splits it ([`Pipeline::splitting_into`]).
    fn round(&self, b: &mut Body, at: [&str; 2]) {
        let each = self.tiles.iter().zip(self.copies).zip(self.mems).zip(at);
        match (self.split, self.parts) {
            (Some(lo), Some(parts)) => {
                for ((((tile, copy), mem), at), lo) in each.zip(lo) {
                    if let (Some(tile), Some(run)) = (tile, copy) {
                        tile.split_copied(b, self.lin, (mem, at), run, (parts.rounding, lo));
                    }
                }
            }
            (None, _) | (Some(_), None) => {
                let Some(rounding) = self.parts.and_then(Parts::copy_rounding) else { return };
                for (((tile, copy), mem), at) in each {
                    if let (Some(tile), Some(run)) = (tile, copy) {
                        tile.round_copied(b, self.lin, (mem, at), run, rounding);
                    }
                }
            }
        }
    }
}

/// The pointer to the first element of shared array `mem`, as an LLVM pointer (NVVM only).
pub(crate) fn shared_pointer(b: &mut Body, mem: &SharedArray) -> String {
    let s = "!llvm.struct<(ptr<3>, ptr<3>, i32, array<1 x i32>, array<1 x i32>)>";
    let sd = b.assign(format!("builtin.unrealized_conversion_cast {} : {} to {s}", mem.name, mem.ty));
    b.assign(format!("llvm.extractvalue {sd}[1] : {s}"))
}

/// How f32 values are rounded to a tensor-core precision (and kept as f32), as tensor-core
/// operands are formed from f32 values (`mma::Parts`).
#[derive(Clone, Copy)]
pub(crate) enum Rounding {
    /// `cvt.rna.tf32.f32`.
    Tf32Nvvm,
    /// The same rounding written out (round the 13 dropped mantissa bits to nearest, ties
    /// away from zero), for devices without the instruction.
    Tf32Bits,
    /// To the nearest f16, ties to even (one conversion each way on every device).
    F16,
    /// To the nearest bf16, ties to even: `cvt.rn.bf16.f32` and back.
    Bf16Nvvm,
    /// The same rounding written out (add `0x7FFF` plus the lowest kept bit, drop the low 16
    /// bits; NaNs stay NaNs), for devices without bf16.
    Bf16Bits,
}

impl Rounding {
    pub fn apply(self, b: &mut Body, x: &str) -> String {
        let bits = match self {
            Rounding::Tf32Nvvm => {
                b.assign(format!("llvm.call_intrinsic \"llvm.nvvm.f2tf32.rna\"({x}) : (f32) -> i32"))
            }
            Rounding::Tf32Bits => {
                let bits = b.assign(format!("arith.bitcast {x} : f32 to i32"));
                let half = b.int(0x1000, "i32");
                let up = b.assign(format!("arith.addi {bits}, {half} : i32"));
                let mask = b.int(0xFFFF_E000u32 as i32 as i64, "i32");
                b.assign(format!("arith.andi {up}, {mask} : i32"))
            }
            Rounding::F16 | Rounding::Bf16Nvvm => {
                let t = if matches!(self, Rounding::F16) { "f16" } else { "bf16" };
                let h = b.assign(format!("arith.truncf {x} : f32 to {t}"));
                return b.assign(format!("arith.extf {h} : {t} to f32"));
            }
            Rounding::Bf16Bits => {
                let bits = b.assign(format!("arith.bitcast {x} : f32 to i32"));
                let c16 = b.int(16, "i32");
                let one = b.int(1, "i32");
                let kept = b.assign(format!("arith.shrui {bits}, {c16} : i32"));
                let lowest = b.assign(format!("arith.andi {kept}, {one} : i32"));
                let half = b.int(0x7FFF, "i32");
                let up = b.assign(format!("arith.addi {bits}, {half} : i32"));
                let up = b.assign(format!("arith.addi {up}, {lowest} : i32"));
                let mask = b.int(0xFFFF_0000u32 as i32 as i64, "i32");
                let rounded = b.assign(format!("arith.andi {up}, {mask} : i32"));
                // A NaN keeps its sign and becomes a quiet NaN (the sum could carry it to ±∞).
                let quiet = b.int(0x0040_0000, "i32");
                let nan = b.assign(format!("arith.ori {bits}, {quiet} : i32"));
                let nan = b.assign(format!("arith.andi {nan}, {mask} : i32"));
                let is_nan = b.assign(format!("arith.cmpf uno, {x}, {x} : f32"));
                b.assign(format!("arith.select {is_nan}, {nan}, {rounded} : i32"))
            }
        };
        b.assign(format!("arith.bitcast {bits} : i32 to f32"))
    }
}

/// One operand's tile as the workgroup reads it from memory: `rows × cols` elements of the
/// view (rows and columns of the operand) from an origin that moves with k. Invocation `l`
/// reads runs `l, l + inv, …` of `run` elements, adjacent along the view's contiguous axis so
/// that neighbouring invocations read neighbouring addresses.
pub(crate) struct OperandTile<'a> {
    view: &'a View,
    arg: &'static str,
    base: String,
    rows: usize,
    cols: usize,
    extent: (usize, usize),
    layout: SharedLayout,
    /// Whether runs go along columns (else rows).
    along_cols: bool,
    run: usize,
    /// Whether the tile never crosses the operand's edges (its sizes divide the extents).
    exact: bool,
    inv: usize,
    /// The operand's row count at run time (an `index` value), when it is set by the run:
    /// rows from it to `extent.0` read as zero.
    run_rows: Option<String>,
    /// Whether the rows of each block of 8 lie interleaved in shared memory
    /// ([`OperandTile::with_rows_interleaved`]).
    interleaved: bool,
}

/// The values one invocation read: per run, its tile row and column and the values.
pub(crate) struct Fetched {
    runs: Vec<(String, String, Vec<String>)>,
}

impl<'a> OperandTile<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &Body,
        view: &'a View,
        arg: &'static str,
        base: String,
        (rows, cols): (usize, usize),
        extent: (usize, usize),
        layout: SharedLayout,
        inv: usize,
        vectors: bool,
    ) -> OperandTile<'a> {
        let rk = view.rank();
        let along_cols = view.strides[rk - 1] == 1 || view.strides[rk - 2] != 1;
        let axis = if along_cols { rk - 1 } else { rk - 2 };
        let exact = extent.0.is_multiple_of(rows) && extent.1.is_multiple_of(cols);
        let along = if along_cols { cols } else { rows };
        let run = if vectors
            && exact
            && matches!(view.dtype, DType::F32 | DType::F16 | DType::BF16)
            && along % 4 == 0
            && b.split_of(arg).is_none()
            && aligned_by_4(view, axis)
        {
            4
        } else {
            1
        };
        OperandTile {
            view,
            arg,
            base,
            rows,
            cols,
            extent,
            layout,
            along_cols,
            run,
            exact,
            inv,
            run_rows: None,
            interleaved: false,
        }
    }

    /// The same tile over an operand whose rows past `rows` (an `index` value, at most
    /// `extent.0`) are not the run's: they read as zero, as past the edge.
    pub fn with_run_rows(self, rows: Option<String>) -> OperandTile<'a> {
        match rows {
            Some(r) => OperandTile { exact: false, run: 1, run_rows: Some(r), ..self },
            None => self,
        }
    }

    /// The same tile with the rows of each block of 8 stored interleaved: row `i < 4` of the
    /// block at place `2i`, row `4 + i` at place `2i + 1`. Where a TF32 product reads the tile
    /// as B with its rows as columns (attention's keys), a lane's two accumulators of each 8
    /// columns then hold rows `i` and `4 + i`: where the A fragment of a TF32 product wants
    /// them, so the products' results can feed the next products from registers.
    pub fn with_rows_interleaved(self) -> OperandTile<'a> {
        OperandTile { interleaved: true, ..self }
    }

    /// The place in shared memory of tile row `r` (an `index` value).
    fn shared_row(&self, b: &mut Body, r: &str) -> String {
        if !self.interleaved {
            return r.to_string();
        }
        let [c8, c4, c2] = [8, 4, 2].map(|c| b.index(c));
        let block = b.assign(format!("arith.divui {r}, {c8} : index"));
        let block = b.assign(format!("arith.muli {block}, {c8} : index"));
        let i = b.assign(format!("arith.remui {r}, {c8} : index"));
        let low = b.assign(format!("arith.remui {i}, {c4} : index"));
        let high = b.assign(format!("arith.divui {i}, {c4} : index"));
        let place = b.assign(format!("arith.muli {low}, {c2} : index"));
        let place = b.assign(format!("arith.addi {place}, {high} : index"));
        b.assign(format!("arith.addi {block}, {place} : index"))
    }

    /// The tile row and column where this invocation's `t`-th run of `run` elements starts.
    fn run_start(&self, b: &mut Body, lin: &str, t: usize, run: usize) -> (String, String) {
        let runs_total = self.rows * self.cols / run;
        let per_line = if self.along_cols { self.cols } else { self.rows } / run;
        let l = plus(b, lin, t * self.inv);
        // Past the last run (when the tile is not a multiple of the workgroup), read the
        // last one again: the same value lands in the same place.
        let l = if (t + 1) * self.inv > runs_total { clamp(b, &l, runs_total) } else { l };
        let pl = b.index(per_line);
        let (line, within) = if self.layout.cores.is_some_and(|c| c.width == run) {
            // Into core matrices: 8 neighbouring invocations copy the 8 lines of one core
            // (128 contiguous bytes of shared memory, no bank conflicts), the next 8 the
            // core beside it along the line.
            let c8 = b.index(CORE);
            let in_core = b.assign(format!("arith.remui {l}, {c8} : index"));
            let q = b.assign(format!("arith.divui {l}, {c8} : index"));
            let chunk = b.assign(format!("arith.remui {q}, {pl} : index"));
            let block = b.assign(format!("arith.divui {q}, {pl} : index"));
            let first = b.assign(format!("arith.muli {block}, {c8} : index"));
            (b.assign(format!("arith.addi {first}, {in_core} : index")), chunk)
        } else {
            (
                b.assign(format!("arith.divui {l}, {pl} : index")),
                b.assign(format!("arith.remui {l}, {pl} : index")),
            )
        };
        let within = if run == 1 {
            within
        } else {
            let rc = b.index(run);
            b.assign(format!("arith.muli {within}, {rc} : index"))
        };
        if self.along_cols {
            (line, within)
        } else {
            (within, line)
        }
    }

    /// The element offset in the operand of tile element `(r, c)` of the tile at `origin`.
    fn global_at(&self, b: &mut Body, origin: (&str, &str), r: &str, c: &str) -> String {
        let rk = self.view.rank();
        let (rs, cs) = (self.view.strides[rk - 2], self.view.strides[rk - 1]);
        let gr = b.assign(format!("arith.addi {}, {r} : index", origin.0));
        let gc = b.assign(format!("arith.addi {}, {c} : index", origin.1));
        let at = offset_at(b, 0, &[(Some(&gr), rs), (Some(&gc), cs)]);
        b.assign(format!("arith.addi {}, {at} : index", self.base))
    }

    /// The offset in shared memory of tile element `(r, c)` in the stage at `stage`.
    fn shared_at(&self, b: &mut Body, stage: &str, r: &str, c: &str) -> String {
        let r = self.shared_row(b, r);
        let at = layout_at(b, &self.layout, &r, c);
        b.assign(format!("arith.addi {stage}, {at} : index"))
    }

    /// The pointers this tile's asynchronous copies read from and write to (NVVM only).
    pub fn pointers(&self, b: &mut Body, mem: &SharedArray) -> CopyPointers {
        let g = "!llvm.struct<(ptr, ptr, i32, array<1 x i32>, array<1 x i32>)>";
        let memref = self.view.memref();
        let gd = b.assign(format!("builtin.unrealized_conversion_cast {} : {memref} to {g}", self.arg));
        let gp = b.assign(format!("llvm.extractvalue {gd}[1] : {g}"));
        let global = b.assign(format!("llvm.addrspacecast {gp} : !llvm.ptr to !llvm.ptr<1>"));
        let shared = shared_pointer(b, mem);
        CopyPointers { global, shared }
    }

    /// Elements per asynchronous copy of this tile (16 bytes of them), where it may be copied
    /// so, as raw bytes: a whole tile (no edges, no rows set by the run) of an argument bound
    /// whole, shared elements of the operand's own size, runs along an axis contiguous both
    /// in memory and in the shared layout, and every run 16-byte aligned at both ends. Into
    /// core matrices whose lines run across the axis contiguous in memory, f32 elements are
    /// copied one at a time (4 bytes each; neighbouring invocations still read neighbouring
    /// addresses).
    pub fn async_run(&self, b: &Body, shared_elem_bytes: usize) -> Option<usize> {
        let size = self.view.dtype.size_bytes();
        let across_lines = self.layout.cores.is_some_and(|c| {
            c.lines != if self.along_cols { CoreLines::AlongColumns } else { CoreLines::AlongRows }
        });
        let run = match across_lines && size == 4 {
            true => 1,
            false => ASYNC_COPY_BYTES / size,
        };
        let rk = self.view.rank();
        let axis = if self.along_cols { rk - 1 } else { rk - 2 };
        let along = if self.along_cols { self.cols } else { self.rows };
        let SharedLayout { row, col, len, cores } = self.layout;
        let (step, other) = if self.along_cols { (col, row) } else { (row, col) };
        // Runs along a core matrix's lines fill one line each; else along an axis of stride 1.
        let (lines, across) = if self.along_cols {
            (self.rows, CoreLines::AlongColumns)
        } else {
            (self.cols, CoreLines::AlongRows)
        };
        let laid = match cores {
            Some(c) => (c.lines == across && run == c.width && lines.is_multiple_of(CORE)) || run == 1,
            None => step == 1 && other.is_multiple_of(run),
        };
        let ok = self.exact
            && self.run_rows.is_none()
            && b.split_of(self.arg).is_none()
            && matches!(self.view.dtype, DType::F32 | DType::F16 | DType::BF16)
            && size == shared_elem_bytes
            && along.is_multiple_of(run)
            && (self.rows * self.cols / run).is_multiple_of(self.inv)
            && aligned_by(self.view, axis, run)
            && laid
            && len.is_multiple_of(run);
        ok.then_some(run)
    }

    /// Copies this invocation's runs of the tile at `origin` into the stage at `stage` of
    /// `mem`, `run` elements at a time ([`OperandTile::async_run`]): with `cp.async` where
    /// there are `pointers` (the copies land later: wait for them), else (emulated) read and
    /// stored at once, each value as a raw copy leaves it (`Parts::copied`).
    #[allow(clippy::too_many_arguments)]
    pub fn copy(
        &self,
        b: &mut Body,
        lin: &str,
        origin: (&str, &str),
        (mem, stage): (&SharedArray, &str),
        run: usize,
        pointers: Option<&CopyPointers>,
        operands: Option<&Parts>,
    ) {
        // Tensor-core operands as they enter the tiles; register values (f32) as they are.
        let elem = operands.map_or("f32", Parts::shared_elem);
        for t in 0..self.rows * self.cols / run / self.inv {
            let (r, c) = self.run_start(b, lin, t, run);
            let src = self.global_at(b, origin, &r, &c);
            let dst = self.shared_at(b, stage, &r, &c);
            match pointers {
                Some(p) => {
                    let src = b.assign(format!("arith.index_cast {src} : index to i32"));
                    let dst = b.assign(format!("arith.index_cast {dst} : index to i32"));
                    let (ge, se) = (self.view.elem(), elem);
                    let from = b.assign(format!(
                        "llvm.getelementptr {}[{src}] : (!llvm.ptr<1>, i32) -> !llvm.ptr<1>, {ge}",
                        p.global
                    ));
                    let to = b.assign(format!(
                        "llvm.getelementptr {}[{dst}] : (!llvm.ptr<3>, i32) -> !llvm.ptr<3>, {se}",
                        p.shared
                    ));
                    // 16 bytes bypass L1 (`cg`); fewer may only go through it (`ca`).
                    let bytes = run * self.view.dtype.size_bytes();
                    let cache = if bytes == ASYNC_COPY_BYTES { "cg" } else { "ca" };
                    b.line(format!(
                        "nvvm.cp.async.shared.global {to}, {from}, {bytes}, cache = {cache} : !llvm.ptr<3>, !llvm.ptr<1>"
                    ));
                }
                None => {
                    let values: Vec<String> = (0..run)
                        .map(|e| {
                            let at = plus(b, &src, e);
                            let x = load(b, self.arg, self.view, &at);
                            match operands {
                                Some(ops) => ops.copied(b, &x),
                                None => x,
                            }
                        })
                        .collect();
                    mem.write(b, &dst, &values, elem);
                }
            }
        }
    }

    /// Rounds in place the elements this invocation copied into the stage at `stage` (after
    /// its copies landed): raw f32 values become TF32 operands.
    pub fn round_copied(
        &self,
        b: &mut Body,
        lin: &str,
        (mem, stage): (&SharedArray, &str),
        run: usize,
        rounding: Rounding,
    ) {
        for t in 0..self.rows * self.cols / run / self.inv {
            let (r, c) = self.run_start(b, lin, t, run);
            let at = self.shared_at(b, stage, &r, &c);
            let values: Vec<String> =
                mem.read(b, &at, run, "f32").iter().map(|x| rounding.apply(b, x)).collect();
            mem.write(b, &at, &values, "f32");
        }
    }

    /// Splits in place the f32 elements this invocation copied into the stage at `stage`
    /// (after its copies landed): `hi = tf32(x)` stays, `lo = tf32(x − hi)` goes `lo` elements
    /// further (the difference is exact in f32).
    pub fn split_copied(
        &self,
        b: &mut Body,
        lin: &str,
        (mem, stage): (&SharedArray, &str),
        run: usize,
        (rounding, lo): (Rounding, usize),
    ) {
        for t in 0..self.rows * self.cols / run / self.inv {
            let (r, c) = self.run_start(b, lin, t, run);
            let at = self.shared_at(b, stage, &r, &c);
            let (his, los): (Vec<String>, Vec<String>) = mem
                .read(b, &at, run, "f32")
                .iter()
                .map(|x| {
                    let hi = rounding.apply(b, x);
                    let rest = b.fsub(x, &hi, "f32");
                    (hi, rounding.apply(b, &rest))
                })
                .unzip();
            mem.write(b, &at, &his, "f32");
            let at_lo = plus(b, &at, lo);
            mem.write(b, &at_lo, &los, "f32");
        }
    }

    /// Reads this invocation's runs of the tile at `origin` (operand row, column) into
    /// registers: zero past the operand's edges.
    pub fn fetch(&self, b: &mut Body, lin: &str, origin: (&str, &str), zero: &str, ty: &str) -> Fetched {
        let runs_total = self.rows * self.cols / self.run;
        let rk = self.view.rank();
        let (rs, cs) = (self.view.strides[rk - 2], self.view.strides[rk - 1]);
        let mut runs = Vec::new();
        for t in 0..runs_total.div_ceil(self.inv) {
            let (r, c) = self.run_start(b, lin, t, self.run);
            let gr = b.assign(format!("arith.addi {}, {r} : index", origin.0));
            let gc = b.assign(format!("arith.addi {}, {c} : index", origin.1));
            let values = if self.exact {
                let at = offset_at(b, 0, &[(Some(&gr), rs), (Some(&gc), cs)]);
                let at = b.assign(format!("arith.addi {}, {at} : index", self.base));
                if self.run == 4 {
                    // Four elements as one access (8 bytes of a 16-bit operand, 16 of f32),
                    // each then in its register type.
                    let elem = self.view.elem();
                    let vt = format!("vector<4x{elem}>");
                    let align = 4 * self.view.dtype.size_bytes();
                    let v = b.assign(format!(
                        "vector.load {}[{at}] {{alignment = {align}}} : {}, {vt}",
                        self.arg,
                        self.view.memref()
                    ));
                    (0..4)
                        .map(|e| {
                            let x = b.assign(format!("vector.extract {v}[{e}] : {elem} from {vt}"));
                            to_reg(b, &x, self.view.dtype)
                        })
                        .collect()
                } else {
                    vec![load(b, self.arg, self.view, &at)]
                }
            } else {
                let er = match &self.run_rows {
                    Some(r) => r.clone(),
                    None => b.index(self.extent.0),
                };
                let ec = b.index(self.extent.1);
                let okr = b.assign(format!("arith.cmpi ult, {gr}, {er} : index"));
                let okc = b.assign(format!("arith.cmpi ult, {gc}, {ec} : index"));
                let ok = b.assign(format!("arith.andi {okr}, {okc} : i1"));
                let gr = clamp(b, &gr, self.extent.0);
                let gc = clamp(b, &gc, self.extent.1);
                let at = offset_at(b, 0, &[(Some(&gr), rs), (Some(&gc), cs)]);
                let at = b.assign(format!("arith.addi {}, {at} : index", self.base));
                let x = load(b, self.arg, self.view, &at);
                vec![b.select(&ok, &x, zero, ty)]
            };
            runs.push((r, c, values));
        }
        Fetched { runs }
    }

    /// Stores fetched runs (register values of type `ty`) into the stage that starts at
    /// `stage` of `mem`; tensor-core operands (`operands`) as they enter its tiles.
    pub fn deposit(
        &self,
        b: &mut Body,
        f: &Fetched,
        mem: &SharedArray,
        stage: &str,
        operands: Option<&Parts>,
        ty: &str,
    ) {
        self.deposit_split(b, f, (mem, stage), operands, None, ty);
    }

    /// [`OperandTile::deposit`], TF32×3 operands split as [`OperandTile::split_copied`] splits
    /// copied ones where `lo` (into core matrices only, where warpgroup products read both
    /// parts from shared memory).
    pub fn deposit_split(
        &self,
        b: &mut Body,
        f: &Fetched,
        (mem, stage): (&SharedArray, &str),
        operands: Option<&Parts>,
        lo: Option<usize>,
        ty: &str,
    ) {
        let SharedLayout { row, col, cores, .. } = self.layout;
        debug_assert!(lo.is_none() || cores.is_some(), "split operands are stored into core matrices only");
        let ty = match operands {
            Some(ops) => ops.shared_elem(),
            None => ty,
        };
        if cores.is_some() {
            // Into core matrices, element by element.
            for (r, c, values) in &f.runs {
                for (e, x) in values.iter().enumerate() {
                    let (re, ce) =
                        if self.along_cols { (r.clone(), plus(b, c, e)) } else { (plus(b, r, e), c.clone()) };
                    let at = self.shared_at(b, stage, &re, &ce);
                    let x = match (operands, lo) {
                        (Some(ops), Some(lo)) => {
                            let hi = ops.rounding.apply(b, x);
                            let rest = b.fsub(x, &hi, "f32");
                            let low = ops.rounding.apply(b, &rest);
                            let at_lo = plus(b, &at, lo);
                            mem.write(b, &at_lo, std::slice::from_ref(&low), ty);
                            hi
                        }
                        (Some(ops), None) => ops.entering(b, x),
                        (None, _) => x.clone(),
                    };
                    mem.write(b, &at, std::slice::from_ref(&x), ty);
                }
            }
            return;
        }
        for (r, c, values) in &f.runs {
            let values: Vec<String> = match operands {
                Some(ops) => values.iter().map(|x| ops.entering(b, x)).collect(),
                None => values.clone(),
            };
            let r = self.shared_row(b, r);
            let at = offset_at(b, 0, &[(Some(&r), row), (Some(c), col)]);
            let at = b.assign(format!("arith.addi {stage}, {at} : index"));
            // A run is adjacent in shared memory too when its axis has stride 1 there.
            let adjacent = if self.along_cols { col == 1 } else { row == 1 };
            if adjacent {
                mem.write(b, &at, &values, ty);
            } else {
                let step = if self.along_cols { col } else { row };
                for (e, x) in values.iter().enumerate() {
                    let i = plus(b, &at, e * step);
                    mem.write(b, &i, std::slice::from_ref(x), ty);
                }
            }
        }
    }
}

/// The offset from a stage's start of tile element `(r, c)` (`index` values) in `layout`.
pub(crate) fn layout_at(b: &mut Body, layout: &SharedLayout, r: &str, c: &str) -> String {
    let SharedLayout { row, col, cores, .. } = *layout;
    let (r, c) = (r.to_owned(), c.to_owned());
    let Some(cores) = cores else {
        return offset_at(b, 0, &[(Some(&r), row), (Some(&c), col)]);
    };
    let (er, ec) = cores.extents();
    let (er, ec) = (b.index(er), b.index(ec));
    let [rb, ri, cb, ci] = [("divui", &r, &er), ("remui", &r, &er), ("divui", &c, &ec), ("remui", &c, &ec)]
        .map(|(op, x, e)| b.assign(format!("arith.{op} {x}, {e} : index")));
    let (line, at_line) = match cores.lines {
        CoreLines::AlongColumns => (ri, ci),
        CoreLines::AlongRows => (ci, ri),
    };
    offset_at(b, 0, &[(Some(&rb), row), (Some(&cb), col), (Some(&line), cores.width), (Some(&at_line), 1)])
}
