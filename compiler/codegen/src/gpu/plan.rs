//! GPU plans: how one scheduled kernel maps onto workgroups and invocations, chosen from the
//! kernel's sizes and the target's [`GpuCaps`]. A plan is a value; the emitters render it to
//! MLIR, and `kiln inspect --stage gpu` prints it above each kernel.

use super::{GpuCaps, GpuLowering};
use crate::CodegenError;

/// Workgroups and invocations of one dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Workgroups along x, y, z.
    pub grid: [u32; 3],
    /// Invocations per workgroup along x, y, z.
    pub workgroup: [u32; 3],
}

impl Launch {
    /// Invocations per workgroup.
    pub fn invocations(&self) -> u32 {
        self.workgroup.iter().product()
    }
}

/// How a kernel's work is divided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Work {
    /// One invocation per output element, `group` per workgroup (elementwise groups, data
    /// movement, convolution, pooling, reductions with many outputs).
    Elements { count: usize, group: u32 },
    /// One invocation per output column of `rows` elements, `group` per workgroup: it zeroes
    /// its column, then adds `positions` updates into it in order (scatter-add; no two
    /// invocations write the same element, so no atomics and a fixed order).
    Columns { columns: usize, rows: usize, positions: usize, group: u32 },
    /// One workgroup per row of `len` elements: `group` invocations stride over the row and
    /// combine their partial results (softmax, norms, long reductions). With `held` > 0 each
    /// invocation reads its `held` elements of the row once and keeps them in registers for
    /// every pass over it (the norms' and softmax's statistics, then the outputs); with 0 each
    /// pass reads the row again. With a `warp` width the partial results combine by warp
    /// shuffles, then once across the warps through shared memory; without, through a tree in
    /// shared memory.
    Rows { rows: usize, len: usize, group: u32, held: u32, warp: Option<u32> },
    /// One invocation per row of `len` elements, `group` per workgroup, for rows that lie
    /// side by side in memory (a norm over the channels of `[N, C, H, W]`, whose rows are
    /// strided and whose neighbouring pixels' rows are adjacent): each invocation walks its
    /// own row on every pass, and a warp's loads of one element of 32 neighbouring rows are
    /// adjacent, where a workgroup per row would read one element per memory transaction.
    RowsSideBySide { rows: usize, len: usize, group: u32 },
    /// A tiled product `[batch] × (m×k · k×n)`: each workgroup computes a `tile[0]×tile[1]`
    /// block of the result, stepping over k by `tile[2]` with both operand tiles in shared
    /// memory; each invocation accumulates a `thread[0]×thread[1]` block in registers, made of
    /// runs of `vector` adjacent rows and columns (read from shared memory as one vector each).
    /// With 2 `stages` the next k tile is read from memory while the current one is multiplied.
    Matmul {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        tile: [u32; 3],
        thread: [u32; 2],
        vector: u32,
        stages: u32,
        /// Whether operand tiles that allow it are copied to shared memory asynchronously, up
        /// to `stages − 1` tiles ahead (the others go through registers, one tile ahead).
        async_copies: bool,
    },
    /// The same tiled product on tensor cores: the workgroup's `warps[0]×warps[1]` warps each
    /// own a `tile[0]/warps[0] × tile[1]/warps[1]` block of the tile, made of `shape`-sized
    /// warp-wide matrix products (`mma.sync`) whose operands are rounded to `precision`.
    MatmulTensorCores {
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        tile: [u32; 3],
        warps: [u32; 2],
        shape: [u32; 3],
        precision: MmaPrecision,
        stages: u32,
        /// Whether operand tiles that allow it are copied to shared memory asynchronously, up
        /// to `stages − 1` tiles ahead (the others go through registers, one tile ahead).
        async_copies: bool,
        /// Per warp (`mma.sync`), or per warpgroup of four warps straight from shared memory
        /// (`wgmma`: then `warps[0]` counts the warpgroups' warps along m, four each, and
        /// `shape` is one warpgroup's product).
        instruction: MmaInstruction,
    },
    /// Flash attention: one workgroup per block of `block_q` queries (one invocation each),
    /// keys and values in tiles of `block_k` rows through shared memory, an online softmax in
    /// registers; no `sq × sk` buffer exists.
    Attention { batch: usize, sq: usize, sk: usize, d: usize, dv: usize, block_q: u32, block_k: u32 },
    /// Flash attention in register tiles: one workgroup per block of `16·rows` queries, 16
    /// groups of `lanes` invocations. Group `g` owns queries `g, g + 16, …` (`rows` of them);
    /// per tile of `block_k` keys each invocation forms their scores against every `lanes`-th
    /// key and, after the online softmax, their output over every `lanes`-th run of 4 value
    /// columns, so each value read from shared memory feeds several FMAs. The group combines
    /// its rows' maxima and sums across its lanes; the weights go through shared memory.
    AttentionTiled {
        batch: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        rows: u32,
        lanes: u32,
        block_k: u32,
    },
    /// Flash attention on tensor cores: one workgroup per block of `16·warps` queries, each
    /// warp 16 of them. The warp forms its 16 × `block_k` scores with `shape`-sized products
    /// (`mma.sync`) of its queries (held as fragments for the whole walk) and the key tile,
    /// runs the online softmax on them in registers, and adds the weights times the value tile
    /// with products again; operands rounded to `precision`, f32 accumulators. With 2 `stages`
    /// the next key and value tiles are read from memory while the current ones are used.
    /// As warpgroup products (`wgmma`), each four warps multiply their 64 queries' fragments
    /// (and then their weights, still in registers) by the whole key (value) tile, which lies
    /// in shared memory as core matrices; `shape` is then one warpgroup's score product.
    AttentionTensorCores {
        batch: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        warps: u32,
        block_k: u32,
        shape: [u32; 3],
        precision: MmaPrecision,
        stages: u32,
        /// Whether key and value tiles that allow it are copied to shared memory
        /// asynchronously, `stages − 1` tiles ahead.
        async_copies: bool,
        /// Per warp (`mma.sync`), or per warpgroup (`wgmma`, every group of products awaited
        /// within the step that issued it).
        instruction: MmaInstruction,
    },
}

/// The tensor-core instruction a product's plan issues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaInstruction {
    /// `mma.sync`: each warp multiplies operand fragments it read from shared memory into
    /// registers.
    Sync,
    /// `wgmma.mma_async` (NVIDIA `sm_90a`): each warpgroup (four warps) multiplies a
    /// 64-row A tile and a B tile that lie in shared memory as 8 × 8 core matrices, named by
    /// matrix descriptors; only the f32 accumulators are in registers. The products of a k
    /// tile run asynchronously as one group; `in_flight` groups may still run when the next
    /// tile's are issued, so the stages they read are refilled that many steps later. In
    /// attention (at most one) a key tile's value products run while the next tile's scores
    /// form and its softmax is computed.
    Warpgroup { in_flight: u32 },
}

impl MmaInstruction {
    /// As plans print it.
    fn name(self) -> &'static str {
        match self {
            MmaInstruction::Sync => "mma.sync",
            MmaInstruction::Warpgroup { .. } => "wgmma",
        }
    }

    /// Whether tensor-core attention with value rows of `dv` runs overlapped (`attention_mma`):
    /// with a group of warpgroup products in flight, each key tile's value products run while
    /// the next tile's scores form and its softmax is computed.
    pub fn overlaps_attention(self, dv: usize) -> bool {
        matches!(self, MmaInstruction::Warpgroup { in_flight } if in_flight > 0) && dv > 0
    }

    /// How plans print the shared tiles' layout and the products left in flight.
    fn layout_and_flight(self) -> (&'static str, String) {
        match self {
            MmaInstruction::Sync => ("", String::new()),
            MmaInstruction::Warpgroup { in_flight: 0 } => (" as core matrices", String::new()),
            MmaInstruction::Warpgroup { in_flight } => {
                (" as core matrices", format!(", {in_flight} group of products in flight"))
            }
        }
    }
}

/// The operand precision of a tensor-core product (accumulation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaPrecision {
    /// f32 operands rounded to TF32 (10 mantissa bits, f32's range): `m16n8k8`.
    Tf32,
    /// f32 operands split into a TF32 high part and a TF32 low part (what the high part left,
    /// rounded), multiplied as three TF32 products (low·high, high·low, high·high; the
    /// low·low term is below f32's rounding): close to f32 accuracy on TF32 tensor cores.
    Tf32x3,
    /// f16 operands (f16 tensors, exact at it): `m16n8k16`.
    F16,
    /// bf16 operands (bf16 tensors, exact at it): `m16n8k16`.
    Bf16,
}

impl MmaPrecision {
    /// As `--precision` and manifests spell it.
    pub fn name(self) -> &'static str {
        match self {
            MmaPrecision::Tf32 => "tf32",
            MmaPrecision::Tf32x3 => "tf32x3",
            MmaPrecision::F16 => "f16",
            MmaPrecision::Bf16 => "bf16",
        }
    }

    /// Whether a target whose tensor cores take `hardware` operands runs products at this
    /// precision (those that take TF32, NVIDIA's since sm_80, take f16 and bf16 too).
    pub fn runs_on(self, hardware: MmaPrecision) -> bool {
        match self {
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 | MmaPrecision::F16 | MmaPrecision::Bf16 => {
                hardware == MmaPrecision::Tf32
            }
        }
    }

    /// Registers one operand element takes at most (its parts; 16-bit ones take half).
    pub fn parts(self) -> usize {
        match self {
            MmaPrecision::Tf32 | MmaPrecision::F16 | MmaPrecision::Bf16 => 1,
            MmaPrecision::Tf32x3 => 2,
        }
    }

    /// Bytes one operand element takes in shared memory: f32 values for the TF32 precisions
    /// (rounded, or split as they are read), 16-bit ones as they are.
    pub fn shared_bytes(self) -> usize {
        match self {
            MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => 4,
            MmaPrecision::F16 | MmaPrecision::Bf16 => 2,
        }
    }

    /// Whether two operand elements share a register (16-bit ones), so that a fragment's
    /// pairs lie next to each other along k.
    pub fn paired(self) -> bool {
        self.shared_bytes() == 2
    }

    /// The k of one warpgroup product: 32 bytes of each operand row.
    pub fn warpgroup_k(self) -> u32 {
        WARPGROUP_K * 2 / self.shared_bytes() as u32
    }

    /// How the plans describe the operands.
    fn operands(self) -> &'static str {
        match self {
            MmaPrecision::Tf32 => "tf32 operands",
            MmaPrecision::Tf32x3 => "f32 operands split into two tf32 parts (3 products each)",
            MmaPrecision::F16 => "f16 operands",
            MmaPrecision::Bf16 => "bf16 operands",
        }
    }
}

/// A kernel's plan: its division of work, the dispatch it needs and its shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuPlan {
    pub work: Work,
    pub launch: Launch,
    pub shared_bytes: u32,
    /// Workgroups each multiprocessor should hold at once: on NVVM the kernel is compiled
    /// for it (`.minnctapersm`, which bounds the registers per invocation), so a register-hungry
    /// kernel still overlaps one workgroup's memory waits with another's arithmetic. 1: no
    /// bound.
    pub resident: u32,
}

/// The `m × n × k` of one warp-wide product at `precision`, where the target's tensor cores run
/// it (and its warps are 32 lanes, as the fragment tables assume).
fn mma_shape(precision: MmaPrecision, caps: &GpuCaps) -> Option<[u32; 3]> {
    if !caps.mma.is_some_and(|hw| precision.runs_on(hw)) || caps.subgroup_size != Some(32) {
        return None;
    }
    Some(match precision {
        MmaPrecision::Tf32 | MmaPrecision::Tf32x3 => [16, 8, 8],
        MmaPrecision::F16 | MmaPrecision::Bf16 => [16, 8, 16],
    })
}

fn too_big(what: String) -> CodegenError {
    CodegenError::Unsupported(what)
}

/// `n` workgroups laid out as `[x, y, 1]` within the grid limits (x as large as allowed); the
/// kernel numbers them `y·grid_x + x` and skips numbers past `n`.
fn fold(n: usize, caps: &GpuCaps) -> Result<[u32; 3], CodegenError> {
    let n = n.max(1);
    let x = n.min(caps.max_workgroup_count[0] as usize);
    let y = n.div_ceil(x);
    if y > caps.max_workgroup_count[1] as usize {
        return Err(too_big(format!("{n} workgroups on the {} target", caps.name)));
    }
    Ok([x as u32, y as u32, 1])
}

/// The invocations per workgroup of a one-dimensional plan: `want` rounded up to a power of
/// two, within `[min, caps' limit]`.
fn group_size(want: usize, min: u32, caps: &GpuCaps) -> u32 {
    let cap = caps.max_workgroup_invocations.min(caps.max_workgroup_size[0]).min(256);
    (want.max(1).next_power_of_two() as u32).clamp(min.min(cap), cap)
}

/// What a row plan's invocations combine, and how often they pass over the row.
#[derive(Clone, Copy, Debug)]
pub struct RowValue {
    /// Bytes of one partial result in registers.
    pub bytes: usize,
    /// Whether partial results are 32-bit values a warp shuffle moves (f32, i32).
    pub shuffled: bool,
    /// Passes over the row (3 for a layer norm: mean, variance, outputs; 1 for a reduction).
    pub passes: u32,
}

/// The values a row plan's `group` invocations put in shared memory to combine their partial
/// results: one per warp after warp shuffles (none for a single warp), one per invocation for
/// a tree or where the shuffles are `emulated` (SPIR-V: through shared memory).
pub(crate) fn row_combine_slots(group: u32, warp: Option<u32>, emulated: bool) -> usize {
    let slots = match warp {
        Some(w) if !emulated && w == group => 0,
        Some(w) if !emulated => group / w,
        Some(_) | None => group,
    };
    slots as usize
}

/// Elements of a row each invocation should hold in registers when a row plan holds them.
const HELD_TARGET: usize = 4;
/// The most elements of a row an invocation holds; longer rows are read again on each pass.
const MAX_HELD: usize = 8;

/// The stages of a product's pipeline over `tiles` k tiles whose stage takes `stage_bytes`
/// (besides `fixed` bytes of other arrays), and whether its tiles are copied asynchronously
/// (where `copies`: the target copies so and an operand's tiles allow it). With copies, as
/// many stages (up to 4, and no more than there are k tiles, but at least 2) as fit in half
/// the dynamic shared memory (two workgroups per multiprocessor) or in the static; else two
/// stages when they fit in shared memory, one otherwise.
fn pipeline_depth(
    [stage_bytes, fixed]: [usize; 2],
    tiles: usize,
    copies: bool,
    caps: &GpuCaps,
) -> (usize, bool) {
    let fits = |stages: usize, room: u32| stages * stage_bytes + fixed <= room as usize;
    let async_copies = copies && fits(2, caps.max_shared_bytes);
    let stages = if async_copies {
        let room = caps.max_shared_bytes.max(caps.max_dynamic_shared_bytes / 2);
        (2..=tiles.clamp(2, 4)).rev().find(|&s| fits(s, room)).unwrap_or(2)
    } else if fits(2, caps.max_shared_bytes) {
        2
    } else {
        1
    };
    (stages, async_copies)
}

/// A SIMT product's candidate plan: its `m × n × k` tile, each invocation's `rm × rn` block
/// of results and the run of adjacent rows and columns it reads as one vector.
pub type SimtTile = ([u32; 3], [u32; 2], u32);

/// The SIMT tiles of products of at least 64 rows, largest first. 128×96 tiles (12 × 16
/// invocations) sit between the two square ones for the products whose 128×128 tiles leave
/// the device's last wave part empty: a MiniLM-sized batch of 64 × 128 rows with 384 columns
/// makes 192 such tiles for 132 multiprocessors, 256 of 128×96.
pub const SIMT_TILES: &[SimtTile] = &[
    ([128, 128, 16], [8, 8], 4),
    ([128, 96, 16], [8, 8], 4),
    ([64, 64, 16], [4, 4], 4),
    ([32, 32, 8], [2, 2], 1),
    ([16, 16, 8], [1, 1], 1),
];

/// The SIMT tiles of products of fewer than 64 rows (such as a batch-1 projection): 16 rows.
const SIMT_SHORT_TILES: &[SimtTile] =
    &[([16, 64, 16], [1, 4], 1), ([16, 32, 8], [1, 2], 1), ([16, 16, 8], [1, 1], 1)];

/// The warpgroup products' tiles, with the warpgroups each stacks along m (64 rows each, all
/// the tile's columns).
pub const WARPGROUP_TILES: &[([u32; 3], u32)] =
    &[([128, 256, 64], 2), ([128, 128, 64], 2), ([128, 64, 32], 2), ([64, 64, 32], 1)];

/// The most shared memory a CUDA kernel may declare statically; a kernel whose plan needs
/// more takes all of it as dynamic shared memory, which the launch sizes (after the runtime
/// opts the function in to it).
pub const NVVM_STATIC_SHARED_BYTES: u32 = 48 * 1024;

impl GpuPlan {
    /// The dynamic shared memory a CUDA launch of this plan's kernel needs: all of its shared
    /// memory when that is more than [`NVVM_STATIC_SHARED_BYTES`], else none (static arrays).
    pub fn dynamic_shared_bytes(&self) -> u32 {
        if self.shared_bytes > NVVM_STATIC_SHARED_BYTES {
            self.shared_bytes
        } else {
            0
        }
    }

    /// One invocation per element of `count`.
    pub fn elements(count: usize, caps: &GpuCaps) -> Result<GpuPlan, CodegenError> {
        let group = group_size(count, 1, caps).max(64.min(caps.max_workgroup_invocations));
        let grid = fold(count.div_ceil(group as usize), caps)?;
        Ok(GpuPlan {
            work: Work::Elements { count, group },
            launch: Launch { grid, workgroup: [group, 1, 1] },
            shared_bytes: 0,
            resident: 1,
        })
    }

    /// One invocation per column of a scatter-add.
    pub fn columns(
        columns: usize,
        rows: usize,
        positions: usize,
        caps: &GpuCaps,
    ) -> Result<GpuPlan, CodegenError> {
        let group = group_size(columns, 1, caps).max(64.min(caps.max_workgroup_invocations));
        let grid = fold(columns.div_ceil(group as usize), caps)?;
        Ok(GpuPlan {
            work: Work::Columns { columns, rows, positions, group },
            launch: Launch { grid, workgroup: [group, 1, 1] },
            shared_bytes: 0,
            resident: 1,
        })
    }

    /// One workgroup per row of `len`. A kernel that passes over the row more than once holds
    /// it in registers where about `HELD_TARGET` (at most `MAX_HELD`) elements per invocation
    /// cover it; its partial results combine by warp shuffles where the target fixes the warp
    /// width and `value` is 32 bits, else by a tree (shared memory: [`row_combine_slots`]).
    pub fn rows(rows: usize, len: usize, value: RowValue, caps: &GpuCaps) -> Result<GpuPlan, CodegenError> {
        // Rows a workgroup covers in a few elements per invocation are held in registers:
        // enough invocations that each holds about `HELD_TARGET`, at most `MAX_HELD`.
        let held_group = group_size(len.div_ceil(HELD_TARGET), 32, caps);
        let holds = value.passes > 1 && len.div_ceil(held_group as usize) <= MAX_HELD;
        let mut group = if holds { held_group } else { group_size(len, 32, caps) };
        let warp = caps.subgroup_size.filter(|&w| value.shuffled && w > 1 && group % w == 0);
        let emulated = caps.flavor() != super::GpuFlavor::Nvvm;
        let bytes = |group: u32| row_combine_slots(group, warp, emulated) * value.bytes;
        while group > 1 && bytes(group) > caps.max_shared_bytes as usize && warp.is_none() {
            group /= 2;
        }
        if bytes(group) > caps.max_shared_bytes as usize {
            return Err(too_big(format!(
                "a row reduction of {group} invocations on the {} target",
                caps.name
            )));
        }
        let held = if holds { len.div_ceil(group as usize) as u32 } else { 0 };
        let grid = fold(rows, caps)?;
        Ok(GpuPlan {
            work: Work::Rows { rows, len, group, held, warp },
            launch: Launch { grid, workgroup: [group, 1, 1] },
            shared_bytes: bytes(group) as u32,
            resident: 1,
        })
    }

    /// One invocation per row of rows that lie side by side ([`Work::RowsSideBySide`]), 64
    /// per workgroup: two warps of neighbouring rows are enough for whole memory transactions,
    /// and an invocation walks its row several times, so more, smaller workgroups spread a
    /// few thousand rows over more multiprocessors.
    pub fn rows_side_by_side(rows: usize, len: usize, caps: &GpuCaps) -> Result<GpuPlan, CodegenError> {
        let group = group_size(rows, 1, caps).min(64);
        let grid = fold(rows.div_ceil(group as usize), caps)?;
        Ok(GpuPlan {
            work: Work::RowsSideBySide { rows, len, group },
            launch: Launch { grid, workgroup: [group, 1, 1] },
            shared_bytes: 0,
            resident: 1,
        })
    }

    /// A tiled product. Candidates go from 128×128 tiles of 8×8 per invocation down to 16×16
    /// tiles of 1×1 ([`SIMT_TILES`]; 16-row tiles for products with few rows, such as a
    /// batch-1 projection); of those the target's limits allow (workgroup size, shared memory,
    /// registers for the accumulators) and the caps' `matmul_tile` names, the first with the
    /// least estimated time wins (see [`matmul_cost`]). Two stages when both fit in shared
    /// memory. Where the target copies asynchronously and an f32 operand's whole tiles lie in
    /// memory as in shared memory (`copyable`: A's columns and B's rows contiguous), as many
    /// stages as fit, as for tensor cores ([`GpuPlan::matmul_tensor_cores`]).
    pub fn matmul(
        batch: usize,
        [m, n, k]: [usize; 3],
        reg_bytes: usize,
        copyable: [bool; 2],
        caps: &GpuCaps,
    ) -> Result<GpuPlan, CodegenError> {
        let candidates: &[SimtTile] = if m >= 64 { SIMT_TILES } else { SIMT_SHORT_TILES };
        let imposed = |tile: [u32; 3]| m < 64 || caps.matmul_tile.is_none_or(|t| t == [tile[0], tile[1]]);
        let mut best: Option<(usize, GpuPlan)> = None;
        for &(tile, thread, vector) in candidates.iter().filter(|(tile, ..)| imposed(*tile)) {
            let workgroup = [tile[1] / thread[1], tile[0] / thread[0], 1];
            let invocations = workgroup[0] * workgroup[1];
            let [la, lb] = matmul_layouts(tile, None, false);
            let stage_bytes = (la.len + lb.len) * reg_bytes;
            if (thread[0] * thread[1]) as usize * reg_bytes / 4 > caps.registers as usize / 2
                || invocations > caps.max_workgroup_invocations
                || workgroup[0] > caps.max_workgroup_size[0]
                || workgroup[1] > caps.max_workgroup_size[1]
                || stage_bytes > caps.max_shared_bytes as usize
            {
                continue;
            }
            let grid = matmul_grid(batch, m, n, k, tile, caps)?;
            let cost = matmul_cost(grid, tile, thread, k, caps);
            if best.as_ref().is_some_and(|(c, _)| *c <= cost) {
                continue;
            }
            // Whole tiles that split evenly into the invocations' 16-byte copies.
            let [tm, tn, tk] = tile.map(|t| t as usize);
            let copied = |along: usize, tile: usize| {
                along.is_multiple_of(tile) && (tile * tk / 4).is_multiple_of(invocations as usize)
            };
            let whole =
                k.is_multiple_of(tk) && ((copyable[0] && copied(m, tm)) || (copyable[1] && copied(n, tn)));
            let copies = caps.async_copies && reg_bytes == 4 && whole;
            let (stages, async_copies) = pipeline_depth([stage_bytes, 0], k.div_ceil(tk), copies, caps);
            // Two workgroups of 8×8 blocks per multiprocessor: at most 128 registers each.
            let resident = if thread[0] * thread[1] >= 64 { 2 } else { 1 };
            let plan = GpuPlan {
                work: Work::Matmul {
                    batch,
                    m,
                    n,
                    k,
                    tile,
                    thread,
                    vector,
                    stages: stages as u32,
                    async_copies,
                },
                launch: Launch { grid, workgroup },
                shared_bytes: (stages * stage_bytes) as u32,
                resident,
            };
            best = Some((cost, plan));
        }
        best.map(|(_, p)| p).ok_or_else(|| match caps.matmul_tile {
            Some([tm, tn]) if m >= 64 => too_big(format!(
                "a product in {tm}×{tn} tiles (--matmul-tile) on the {} target: the tile does not fit its limits (workgroup size, shared memory, registers)",
                caps.name
            )),
            Some(_) | None => {
                too_big(format!("a product on the {} target: no tile fits its workgroup limits", caps.name))
            }
        })
    }

    /// A tiled product on tensor cores, when the target has them for `precision`: 128×128×16
    /// tiles of 2×4 warps (4×4 `m16n8` products each, 64 f32 accumulators per invocation)
    /// or 64×64×16 tiles of 2×2 warps (2×4 products each), k 32 for 16-bit operands,
    /// whichever [`matmul_cost`] estimates faster. With async copies (where A's or B's tiles
    /// are whole, the only ones copied so), as many stages (up to 4,
    /// and no more than there are k tiles, but at least 2) as fit in half the dynamic shared
    /// memory (two workgroups per multiprocessor) or in the static; else two stages when they
    /// fit in shared memory. Where the target emulates the products (SPIR-V, to check the
    /// fragment bookkeeping), their scratch arrays count against shared memory too. The caller
    /// decides whether the operands may be rounded to `precision`.
    pub fn matmul_tensor_cores(
        batch: usize,
        m: usize,
        n: usize,
        k: usize,
        precision: MmaPrecision,
        caps: &GpuCaps,
    ) -> Result<Option<GpuPlan>, CodegenError> {
        let Some(shape) = mma_shape(precision, caps) else { return Ok(None) };
        // 16-bit tiles take twice the k (two `m16n8k16` steps per barrier) in the bytes of
        // a TF32 tile.
        let tk = if precision.paired() { 32 } else { 16 };
        let candidates: [([u32; 3], [u32; 2]); 2] = [([128, 128, tk], [2, 4]), ([64, 64, tk], [2, 2])];
        let mut best: Option<(usize, GpuPlan)> = None;
        for &(tile, warps) in &candidates {
            let count = warps[0] * warps[1];
            let [la, lb] = matmul_layouts(tile, Some(precision), false);
            let stage_bytes = (la.len + lb.len) * precision.shared_bytes();
            let scratch = match caps.lowering {
                GpuLowering::Spirv => (count * (shape[0] * shape[2] + shape[2] * shape[1])) as usize * 4,
                GpuLowering::Nvvm(_) => 0,
            };
            // Each lane holds 4 f32 accumulators per m16n8 product of its warp's block.
            let accumulators = (tile[0] * tile[1] / (32 * count)) as usize;
            if stage_bytes + scratch > caps.max_shared_bytes as usize
                || accumulators > caps.registers as usize / 2
                || 32 * count > caps.max_workgroup_invocations
            {
                continue;
            }
            let grid = matmul_grid(batch, m, n, k, tile, caps)?;
            // A warp's block of `a × b` products reads `a + b` fragments per k step: time in
            // waves of workgroups times a workgroup's fragment reads, as for SIMT blocks.
            let block = [tile[0] / warps[0] / shape[0], tile[1] / warps[1] / shape[1]];
            let cost = matmul_cost(grid, tile, block, k, caps);
            if best.as_ref().is_some_and(|(c, _)| *c <= cost) {
                continue;
            }
            // Only whole tiles are copied: where neither operand's are, stages stay two.
            let [tm, tn, tk] = tile.map(|t| t as usize);
            let whole = k.is_multiple_of(tk) && (m.is_multiple_of(tm) || n.is_multiple_of(tn));
            let (stages, async_copies) =
                pipeline_depth([stage_bytes, scratch], k.div_ceil(tk), caps.async_copies && whole, caps);
            let stages = stages as u32;
            let plan = GpuPlan {
                work: Work::MatmulTensorCores {
                    batch,
                    m,
                    n,
                    k,
                    tile,
                    warps,
                    shape,
                    precision,
                    stages,
                    async_copies,
                    instruction: MmaInstruction::Sync,
                },
                launch: Launch { grid, workgroup: [32 * count, 1, 1] },
                shared_bytes: (stages as usize * stage_bytes + scratch) as u32,
                resident: 1,
            };
            best = Some((cost, plan));
        }
        Ok(best.map(|(_, p)| p))
    }

    /// A tiled product as warpgroup products (`wgmma`), where the target has them and both
    /// operands' tiles can be copied whole into core matrices (`copies`: each lies contiguous
    /// along one axis in 16-byte runs, and whether that axis is A's rows and B's columns
    /// rather than k; the caller knows). 16-bit operands may lie either way; TF32 ones (and
    /// TF32×3 ones, split in place into a high and a low tile once copied) only along k, as
    /// the instruction reads them. Of [`WARPGROUP_TILES`] (k halved for 4-byte operands, so a
    /// row of a tile is as many bytes) those that divide the product's sizes and that the
    /// caps' `matmul_tile` names, whichever [`matmul_cost`] estimates faster. One workgroup
    /// per multiprocessor: as many stages (2 to 4, no more than there are k tiles) as the
    /// dynamic shared memory holds. The accumulators (half the warpgroup's columns per
    /// invocation) may take three quarters of the registers, since no operand fragments are
    /// held.
    pub fn matmul_warpgroups(
        batch: usize,
        [m, n, k]: [usize; 3],
        precision: MmaPrecision,
        copies: Option<[bool; 2]>,
        caps: &GpuCaps,
    ) -> Result<Option<GpuPlan>, CodegenError> {
        let Some(mn_contiguous) = copies else { return Ok(None) };
        let laid = precision.paired() || mn_contiguous == [false, false];
        if !caps.warpgroup_mma || !caps.async_copies || !laid {
            return Ok(None);
        }
        let imposed = |tile: [u32; 3]| caps.matmul_tile.is_none_or(|t| t == [tile[0], tile[1]]);
        let mut best: Option<(usize, GpuPlan)> = None;
        for &(tile, groups) in WARPGROUP_TILES.iter().filter(|(tile, _)| imposed(*tile)) {
            let tile = [tile[0], tile[1], tile[2] * 2 / precision.shared_bytes() as u32];
            let [tm, tn, tk] = tile.map(|t| t as usize);
            if k == 0 || !(m.is_multiple_of(tm) && n.is_multiple_of(tn) && k.is_multiple_of(tk)) {
                continue;
            }
            // TF32×3 keeps each operand's low parts in a tile of their own beside it.
            let stage_bytes = (tm * tk + tk * tn) * precision.shared_bytes() * precision.parts();
            let room = caps.max_dynamic_shared_bytes.max(caps.max_shared_bytes) as usize;
            let tiles = k / tk;
            let Some(stages) = (2..=tiles.clamp(2, 4)).rev().find(|s| s * stage_bytes <= room) else {
                continue;
            };
            // With 3 stages or more, one k tile's products still run while the next tile's
            // are issued (copies then run one tile less ahead).
            let in_flight = products_in_flight(stages, caps);
            let accumulators = tile[1] / 2;
            let invocations = 128 * groups;
            if accumulators > caps.registers * 3 / 4 || invocations > caps.max_workgroup_invocations {
                continue;
            }
            let grid = matmul_grid(batch, m, n, k, tile, caps)?;
            // A warpgroup's 64 × n block reads 64 + n operand rows per k, as SIMT blocks do.
            let cost = matmul_cost(grid, tile, [64, tile[1]], k, caps);
            if best.as_ref().is_some_and(|(c, _)| *c <= cost) {
                continue;
            }
            let plan = GpuPlan {
                work: Work::MatmulTensorCores {
                    batch,
                    m,
                    n,
                    k,
                    tile,
                    warps: [4 * groups, 1],
                    shape: [64, tile[1], precision.warpgroup_k()],
                    precision,
                    stages: stages as u32,
                    async_copies: true,
                    instruction: MmaInstruction::Warpgroup { in_flight },
                },
                launch: Launch { grid, workgroup: [invocations, 1, 1] },
                shared_bytes: (stages * stage_bytes) as u32,
                resident: 1,
            };
            best = Some((cost, plan));
        }
        Ok(best.map(|(_, p)| p))
    }

    /// Flash attention: 64 queries per workgroup (fewer for short sequences), and key tiles as
    /// long as half the shared memory allows (at most 32 rows).
    pub fn attention(
        batch: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        reg_bytes: usize,
        caps: &GpuCaps,
    ) -> Result<GpuPlan, CodegenError> {
        let block_q = group_size(sq, 8, caps).min(64);
        let row_bytes = (d + dv).max(1) * reg_bytes;
        let mut block_k: u32 = 32;
        while block_k > 1 && block_k as usize * row_bytes > caps.max_shared_bytes as usize / 2 {
            block_k /= 2;
        }
        if block_k as usize * row_bytes > caps.max_shared_bytes as usize {
            return Err(too_big(format!(
                "attention with head size {d} (values {dv}) on the {} target: one key row does not fit its shared memory",
                caps.name
            )));
        }
        let grid = attention_grid(batch, sq, block_q as usize, caps)?;
        Ok(GpuPlan {
            work: Work::Attention { batch, sq, sk, d, dv, block_q, block_k },
            launch: Launch { grid, workgroup: [block_q, 1, 1] },
            shared_bytes: (block_k as usize * row_bytes) as u32,
            resident: 1,
        })
    }

    /// Flash attention in register tiles ([`Work::AttentionTiled`]) for f32 registers and
    /// heads that are multiples of 4 up to [`ATTENTION_TILED_MAX_HEAD`], with at least 16
    /// queries; `None` where it does not apply or the caps ask for one query per invocation
    /// (`attention_per_query`). The lanes of a group split the value row into runs of 4 (8
    /// lanes where the runs allow); the plan takes the most queries per invocation (4, 2, 1)
    /// and the longest key tile (64, 32, 16) whose live values (scores, outputs, and the runs
    /// of query and key rows the score products read) take at most three quarters of the
    /// registers and whose tiles fit the static shared memory.
    pub fn attention_tiled(
        batch: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        reg_bytes: usize,
        caps: &GpuCaps,
    ) -> Result<Option<GpuPlan>, CodegenError> {
        if caps.attention_per_query
            || reg_bytes != 4
            || sq < ATTENTION_TILED_GROUPS
            || d == 0
            || !d.is_multiple_of(4)
            || !dv.is_multiple_of(4)
            || d > ATTENTION_TILED_MAX_HEAD
            || dv > ATTENTION_TILED_MAX_HEAD
        {
            return Ok(None);
        }
        let runs = dv / 4;
        let lanes = [8usize, 4, 2, 1].into_iter().find(|&g| runs.is_multiple_of(g)).unwrap_or(1);
        if ATTENTION_TILED_GROUPS * lanes > caps.max_workgroup_invocations as usize
            || ATTENTION_TILED_GROUPS * lanes > caps.max_workgroup_size[0] as usize
        {
            return Ok(None);
        }
        for rows in [4usize, 2, 1] {
            if rows > 1 && ATTENTION_TILED_GROUPS * rows > sq {
                continue;
            }
            for block_k in [64usize, 32, 16] {
                // Per lane: its scores and output columns, and a run of 4 of each of its query
                // and key rows in flight.
                let keys = block_k / lanes;
                let live = rows * (keys + dv / lanes) + 4 * (rows + keys);
                if live > caps.registers as usize * 3 / 4 {
                    continue;
                }
                let shared = attention_tiled_shared(d, dv, rows, block_k, lanes, caps.flavor()) * reg_bytes;
                if shared > caps.max_shared_bytes as usize {
                    continue;
                }
                let grid = attention_grid(batch, sq, ATTENTION_TILED_GROUPS * rows, caps)?;
                let (rows, lanes, block_k) = (rows as u32, lanes as u32, block_k as u32);
                return Ok(Some(GpuPlan {
                    work: Work::AttentionTiled { batch, sq, sk, d, dv, rows, lanes, block_k },
                    launch: Launch { grid, workgroup: [ATTENTION_TILED_GROUPS as u32 * lanes, 1, 1] },
                    shared_bytes: shared as u32,
                    resident: 1,
                }));
            }
        }
        Ok(None)
    }

    /// Flash attention on tensor cores, when the target has them for `precision` and the head
    /// sizes are multiples of the products' k (8, or 16 for 16-bit operands) up to
    /// [`ATTENTION_MMA_MAX_HEAD`]: 4 warps of 16 queries per workgroup (fewer for short
    /// sequences), and the longest key tile (at most 32) with the most stages that fits in
    /// shared memory (on SPIR-V with the emulation's scratch arrays),
    /// or the key tile the caps impose (`attention_key_tile`; an error where it does not
    /// fit). The caller decides whether the operands may be rounded to `precision`.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_tensor_cores(
        batch: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        precision: MmaPrecision,
        caps: &GpuCaps,
    ) -> Result<Option<GpuPlan>, CodegenError> {
        let Some(shape) = mma_shape(precision, caps) else { return Ok(None) };
        let k = shape[2] as usize;
        if d == 0
            || !d.is_multiple_of(k)
            || !dv.is_multiple_of(k)
            || d > ATTENTION_MMA_MAX_HEAD
            || dv > ATTENTION_MMA_MAX_HEAD
        {
            return Ok(None);
        }
        let warps = (sq.div_ceil(shape[0] as usize).next_power_of_two() as u32).clamp(1, 4);
        if 32 * warps > caps.max_workgroup_invocations {
            return Ok(None);
        }
        // With async copies a third stage where it fits the static shared memory (attention
        // keeps several workgroups per multiprocessor rather than deeper pipelines). A key
        // tile the caps impose takes the most stages that fit.
        let most = if caps.async_copies { 3 } else { 2 };
        let options: Vec<(u32, u32)> = match caps.attention_key_tile {
            Some(t) => (1..=most).rev().map(|s| (t, s)).collect(),
            None => [32, 16]
                .into_iter()
                .flat_map(|t| (1..=most).rev().map(move |s| (t, s)))
                .chain([(8, 1)])
                .collect(),
        };
        for &(block_k, stages) in &options {
            // The key tile is the k of the products with the value tile.
            if block_k == 0 || !(block_k as usize).is_multiple_of(k) {
                continue;
            }
            let layout = attention_layouts(d, dv, block_k as usize, precision);
            // Per lane: the query fragments, the output accumulators and the tile's scores, or
            // the weights that take their places (the operands in parts).
            if ((d + block_k as usize) * precision.parts() + dv) / 2 > caps.registers as usize {
                continue;
            }
            let scratch = attention_emulation_scratch(warps, shape, caps);
            let bytes =
                stages as usize * (layout.keys.len + layout.values.len) * precision.shared_bytes() + scratch;
            if bytes > caps.max_shared_bytes as usize {
                continue;
            }
            let grid = attention_grid(batch, sq, 16 * warps as usize, caps)?;
            return Ok(Some(GpuPlan {
                work: Work::AttentionTensorCores {
                    batch,
                    sq,
                    sk,
                    d,
                    dv,
                    warps,
                    block_k,
                    shape,
                    precision,
                    stages,
                    async_copies: caps.async_copies && stages >= 2,
                    instruction: MmaInstruction::Sync,
                },
                launch: Launch { grid, workgroup: [32 * warps, 1, 1] },
                shared_bytes: bytes as u32,
                resident: 1,
            }));
        }
        if let Some(t) = caps.attention_key_tile {
            return Err(too_big(format!(
                "attention on tensor cores in key tiles of {t} (heads of {d}) on the {} target: a key tile must be a positive multiple of {k} that fits its {} bytes of shared memory and its registers",
                caps.name, caps.max_shared_bytes
            )));
        }
        Ok(None)
    }

    /// Flash attention as warpgroup products ([`MmaInstruction::Warpgroup`]), where the target
    /// has them, the head sizes are multiples of the products' k (16, 8 for TF32) up to
    /// [`ATTENTION_MMA_MAX_HEAD`], and the key and value tiles can be copied whole into core
    /// matrices (`copyable`: k and v contiguous along their rows in 16-byte runs, sizes known
    /// when the kernel is compiled; the caller knows). Two warpgroups of 64 queries per
    /// workgroup (one for 64 queries or fewer). Of key tiles of 128 and 64 (and 32 for TF32,
    /// whose weights and query fragments take twice the registers, and at TF32×3 both their
    /// parts) or the one the caps impose, the longest whose scores, weights, outputs and query
    /// fragments take at most three quarters of the registers, in as many stages (3, else 2)
    /// as the shared memory holds (at TF32×3 each stage holds the tiles' low parts too);
    /// `None` where none fits (the `mma.sync` plan then takes it).
    #[allow(clippy::too_many_arguments)]
    pub fn attention_warpgroups(
        batch: usize,
        sq: usize,
        sk: usize,
        d: usize,
        dv: usize,
        precision: MmaPrecision,
        copyable: bool,
        caps: &GpuCaps,
    ) -> Result<Option<GpuPlan>, CodegenError> {
        let k = precision.warpgroup_k() as usize;
        if !caps.warpgroup_mma
            || !caps.async_copies
            || !copyable
            || mma_shape(precision, caps).is_none()
            || d == 0
            || !d.is_multiple_of(k)
            || !dv.is_multiple_of(k)
            || d > ATTENTION_MMA_MAX_HEAD
            || dv > ATTENTION_MMA_MAX_HEAD
        {
            return Ok(None);
        }
        let groups: u32 = if sq > 64 { 2 } else { 1 };
        let (warps, invocations) = (4 * groups, 128 * groups);
        if invocations > caps.max_workgroup_invocations {
            return Ok(None);
        }
        let options = match (caps.attention_key_tile, precision.paired()) {
            (Some(t), _) => vec![t],
            (None, true) => vec![128, 64],
            (None, false) => vec![128, 64, 32],
        };
        for block_k in options {
            // A score product's n is at most 256; its tile is the value products' k, in cores
            // of 8 keys.
            let bk = block_k as usize;
            if bk == 0 || !bk.is_multiple_of(k.max(CORE)) || bk > 256 {
                continue;
            }
            // Per invocation (of 128 for 64 rows): the tile's scores and the weights beside
            // them (the previous tile's value products read theirs while this tile's scores
            // form and its softmax runs), the output accumulators and the query fragments.
            // Operands take a register per two 16-bit values, per TF32 value one or (TF32×3)
            // two parts, and stay until their products are done.
            let operand = |n: usize| n / 2 * precision.parts() / (1 + usize::from(precision.paired()));
            let live = bk / 2 + operand(bk) + dv / 2 + operand(d);
            if live > caps.registers as usize * 3 / 4 {
                continue;
            }
            let layout = warpgroup_attention_layouts(d, dv, bk, precision);
            let stage = (layout.keys.len + layout.values.len) * precision.parts() * precision.shared_bytes();
            // Each warp's share of the products is emulated as `mma.sync` products.
            let scratch = attention_emulation_scratch(warps, [16, 8, k as u32], caps);
            let room = caps.max_dynamic_shared_bytes.max(caps.max_shared_bytes) as usize;
            let Some(stages) = [3usize, 2].into_iter().find(|s| s * stage + scratch <= room) else {
                continue;
            };
            let grid = attention_grid(batch, sq, 64 * groups as usize, caps)?;
            return Ok(Some(GpuPlan {
                work: Work::AttentionTensorCores {
                    batch,
                    sq,
                    sk,
                    d,
                    dv,
                    warps,
                    block_k,
                    shape: [64, block_k, k as u32],
                    precision,
                    stages: stages as u32,
                    async_copies: true,
                    // At most one: the value products of one tile while the next tile's
                    // scores form and its softmax runs.
                    instruction: MmaInstruction::Warpgroup {
                        in_flight: products_in_flight(stages, caps).min(1),
                    },
                },
                launch: Launch { grid, workgroup: [invocations, 1, 1] },
                shared_bytes: (stages * stage + scratch) as u32,
                resident: 1,
            }));
        }
        Ok(None)
    }

    /// One line describing the plan, for `kiln inspect --stage gpu`.
    pub fn describe(&self) -> String {
        let work = match &self.work {
            Work::Elements { count, group } => format!("elements: {count}, {group} per workgroup"),
            Work::Columns { columns, rows, positions, group } => format!(
                "columns: {columns} of {rows} rows, {positions} positions added in order, {group} per workgroup"
            ),
            Work::Rows { rows, len, group, held, warp } => {
                let held = match held {
                    0 => String::new(),
                    h => format!(", {h} held in registers each"),
                };
                let combine = match warp {
                    Some(w) if w == group => "warp shuffles".to_string(),
                    Some(w) => format!("warp shuffles, then {} warps through shared memory", group / w),
                    None => "shared-memory tree".to_string(),
                };
                format!("rows: {rows} of {len}, {group} invocations per row{held}, {combine}")
            }
            Work::RowsSideBySide { rows, len, group } => {
                format!("rows side by side: {rows} of {len}, one per invocation, {group} per workgroup")
            }
            Work::Matmul { batch, m, n, k, tile, thread, vector, stages, async_copies } => {
                let copies = if *async_copies { ", async copies" } else { "" };
                format!(
                    "matmul: [{batch}] {m}×{k}·{k}×{n}, tile {}×{}×{} in shared memory ({stages} stages{copies}), {}×{} per invocation in runs of {vector}",
                    tile[0], tile[1], tile[2], thread[0], thread[1]
                )
            }
            Work::MatmulTensorCores {
                batch,
                m,
                n,
                k,
                tile,
                warps,
                shape,
                precision,
                stages,
                async_copies,
                instruction,
            } => {
                let copies = if *async_copies { ", async copies" } else { "" };
                let (layout, flight) = instruction.layout_and_flight();
                format!(
                    "matmul on tensor cores: [{batch}] {m}×{k}·{k}×{n}, tile {}×{}×{} in shared memory{layout} ({stages} stages{copies}{flight}), {}×{} warps, {} m{}n{}k{} on {}, f32 accumulators",
                    tile[0], tile[1], tile[2], warps[0], warps[1], instruction.name(), shape[0], shape[1], shape[2], precision.operands()
                )
            }
            Work::Attention { batch, sq, sk, d, dv, block_q, block_k } => format!(
                "attention: {batch} × {sq} queries × {sk} keys (d {d}, dv {dv}), {block_q} queries per workgroup, key tiles of {block_k} in shared memory, online softmax"
            ),
            Work::AttentionTiled { batch, sq, sk, d, dv, rows, lanes, block_k } => format!(
                "attention: {batch} × {sq} queries × {sk} keys (d {d}, dv {dv}), {} queries per workgroup in 16 groups of {lanes} invocations, {rows} queries × {} keys and {rows} × {} value columns per invocation, key tiles of {block_k} in shared memory, online softmax",
                ATTENTION_TILED_GROUPS as u32 * rows,
                block_k / lanes,
                dv / *lanes as usize
            ),
            Work::AttentionTensorCores {
                batch,
                sq,
                sk,
                d,
                dv,
                warps,
                block_k,
                shape,
                precision,
                stages,
                async_copies,
                instruction,
            } => {
                let copies = if *async_copies { ", async copies" } else { "" };
                let (layout, mut flight) = instruction.layout_and_flight();
                if instruction.overlaps_attention(*dv) {
                    flight = ", each tile's value products beside the next tile's softmax".to_string();
                }
                format!(
                    "attention on tensor cores: {batch} × {sq} queries × {sk} keys (d {d}, dv {dv}), {warps} warps of 16 queries per workgroup, key tiles of {block_k} in shared memory{layout} ({stages} stages{copies}{flight}), {} m{}n{}k{} on {}, f32 accumulators, online softmax",
                    instruction.name(), shape[0], shape[1], shape[2], precision.operands()
                )
            }
        };
        let [gx, gy, gz] = self.launch.grid;
        let [wx, wy, wz] = self.launch.workgroup;
        let resident = match self.resident {
            0 | 1 => String::new(),
            r => format!(", {r} workgroups per multiprocessor"),
        };
        format!(
            "{work}; grid [{gx}, {gy}, {gz}], workgroup [{wx}, {wy}, {wz}], shared {} B{resident}",
            self.shared_bytes
        )
    }
}

/// Where a product's operand tile lies in one shared-memory stage: element `(r, c)` of the
/// tile (rows and columns of the operand) at `r·row + c·col`, `len` values in all. The
/// padding keeps the reads of an inner step free of bank conflicts and 16-byte aligned.
/// With `cores` the tile lies in core matrices instead (what warpgroup products read): 8
/// lines of 16 bytes (`width` elements) each, the lines along the axis `cores` names. With
/// lines along the columns, core `(r / 8, c / width)` starts at `(r / 8)·row + (c /
/// width)·col` and holds its `8·width` elements contiguous (along the rows, the other way
/// round).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    pub row: usize,
    pub col: usize,
    pub len: usize,
    pub cores: Option<Cores>,
}

/// How a tile's core matrices lie: which way their lines run, and how many elements a line
/// holds (16 bytes of them: 8 of a 16-bit operand, 4 of an f32 one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cores {
    pub lines: CoreLines,
    pub width: usize,
}

impl Cores {
    /// Core matrices of `elem`-byte elements with lines along `lines`.
    pub fn of(lines: CoreLines, elem: usize) -> Cores {
        Cores { lines, width: CORE_LINE_BYTES / elem }
    }

    /// The core's extents along the tile's rows and columns.
    pub fn extents(&self) -> (usize, usize) {
        match self.lines {
            CoreLines::AlongColumns => (CORE, self.width),
            CoreLines::AlongRows => (self.width, CORE),
        }
    }

    /// Element `(r, c)` of a tile as (core row, core column, line, place in the line).
    pub fn place(&self, r: usize, c: usize) -> (usize, usize, usize, usize) {
        let (er, ec) = self.extents();
        let (line, at) = match self.lines {
            CoreLines::AlongColumns => (r % er, c % ec),
            CoreLines::AlongRows => (c % ec, r % er),
        };
        (r / er, c / ec, line, at)
    }
}

/// Which way the 8 elements of a core matrix's lines run: along the tile's columns (a line is
/// part of a row) or along its rows (part of a column).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoreLines {
    AlongColumns,
    AlongRows,
}

/// Lines of a core matrix.
pub const CORE: usize = 8;

/// Bytes of one line of a core matrix.
pub const CORE_LINE_BYTES: usize = 16;

impl SharedLayout {
    /// The same memory with rows and columns swapped (a tile read as its transpose).
    pub fn transposed(&self) -> SharedLayout {
        let cores = self.cores.map(|c| Cores {
            lines: match c.lines {
                CoreLines::AlongColumns => CoreLines::AlongRows,
                CoreLines::AlongRows => CoreLines::AlongColumns,
            },
            ..c
        });
        SharedLayout { row: self.col, col: self.row, len: self.len, cores }
    }

    /// The offset of element `(r, c)` from the stage's start, for sizes known when the kernel
    /// is compiled.
    pub fn offset(&self, r: usize, c: usize) -> usize {
        match self.cores {
            None => r * self.row + c * self.col,
            Some(cores) => {
                let (cr, cc, line, at) = cores.place(r, c);
                cr * self.row + cc * self.col + line * cores.width + at
            }
        }
    }
}

/// The k of one warpgroup product of 16-bit operands (`m64nNk16`; TF32 ones take 8).
pub const WARPGROUP_K: u32 = 16;

/// The shared layouts of a product's A tile (`tile[0]×tile[2]`) and B tile
/// (`tile[2]×tile[1]`), in elements. On TF32 tensor cores A is row-major with rows of
/// `tile[2] + 4` (a warp's fragment reads of 8 rows × 4 columns then fall in 32 different
/// banks) and B row-major with rows of `tile[1] + 8` (4 rows × 8 columns, likewise). With
/// 16-bit operands (read with `ldmatrix`, 8 rows of 16 bytes at a time) A is row-major with
/// rows of `tile[2] + 8`, and B as it lies in memory: row-major with rows of `tile[1] + 8`
/// where its rows are contiguous (`b_row_major`, read transposed), else transposed
/// (column-major), each column `tile[2] + 8`; either way 8 rows of 16 bytes fall in 32
/// different banks. The transposed B is the larger, so plans size B's stages by it. On the
/// SIMT path A is stored transposed (k-major, rows of `tile[0] + 4`) so an invocation reads
/// its run of rows as one vector, and B row-major with rows of `tile[1] + 4`.
pub fn matmul_layouts(
    tile: [u32; 3],
    tensor_cores: Option<MmaPrecision>,
    b_row_major: bool,
) -> [SharedLayout; 2] {
    let [tm, tn, tk] = tile.map(|t| t as usize);
    match tensor_cores {
        Some(p) if p.paired() && b_row_major => [
            SharedLayout { row: tk + 8, col: 1, len: tm * (tk + 8), cores: None },
            SharedLayout { row: tn + 8, col: 1, len: tk * (tn + 8), cores: None },
        ],
        Some(p) if p.paired() => [
            SharedLayout { row: tk + 8, col: 1, len: tm * (tk + 8), cores: None },
            SharedLayout { row: 1, col: tk + 8, len: tn * (tk + 8), cores: None },
        ],
        Some(_) => [
            SharedLayout { row: tk + 4, col: 1, len: tm * (tk + 4), cores: None },
            SharedLayout { row: tn + 8, col: 1, len: tk * (tn + 8), cores: None },
        ],
        None => [
            SharedLayout { row: 1, col: tm + 4, len: tk * (tm + 4), cores: None },
            SharedLayout { row: tn + 4, col: 1, len: tk * (tn + 4), cores: None },
        ],
    }
}

/// The shared layouts of a warpgroup product's A tile (`tile[0]×tile[2]`) and B tile
/// (`tile[2]×tile[1]`), in elements: core matrices whose lines run along the axis each
/// operand is contiguous along in memory (`mn_contiguous`: A's rows, B's columns; else k),
/// so that 16-byte copies fill one line each. The cores along that axis lie next to each
/// other (128 bytes apart), the lines of cores across it one after another.
pub fn warpgroup_layouts(tile: [u32; 3], mn_contiguous: [bool; 2], elem: usize) -> [SharedLayout; 2] {
    let [tm, tn, tk] = tile.map(|t| t as usize);
    let width = CORE_LINE_BYTES / elem;
    let core = CORE * width;
    let along = |lines| Some(Cores::of(lines, elem));
    let a = if mn_contiguous[0] {
        SharedLayout { row: core, col: tm / width * core, len: tm * tk, cores: along(CoreLines::AlongRows) }
    } else {
        SharedLayout {
            row: tk / width * core,
            col: core,
            len: tm * tk,
            cores: along(CoreLines::AlongColumns),
        }
    };
    let b = if mn_contiguous[1] {
        SharedLayout {
            row: tn / width * core,
            col: core,
            len: tk * tn,
            cores: along(CoreLines::AlongColumns),
        }
    } else {
        SharedLayout { row: core, col: tk / width * core, len: tk * tn, cores: along(CoreLines::AlongRows) }
    };
    [a, b]
}

/// The groups of lanes of a register-tiled attention workgroup: group `g` owns its queries
/// `g, g + 16, …`.
pub const ATTENTION_TILED_GROUPS: usize = 16;

/// The largest head the register-tiled attention takes: its lanes hold `rows` output rows of
/// up to 128 / 8 = 16 columns each.
pub const ATTENTION_TILED_MAX_HEAD: usize = 128;

/// Where the register-tiled attention keeps its tiles in shared memory, in elements: the
/// workgroup's query rows, one key tile, one value tile (each row padded by 4, so a warp's
/// 16-byte reads of consecutive rows fall in different banks) and the weights, query by key
/// (rows of `block_k + 4`), written by the lane that formed each and read by the lanes of
/// its group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TiledAttentionLayouts {
    pub queries: SharedLayout,
    pub keys: SharedLayout,
    pub values: SharedLayout,
    pub weights: SharedLayout,
}

/// The shared layouts of register-tiled attention with `rows` queries per group and key tiles
/// of `block_k`.
pub fn tiled_attention_layouts(d: usize, dv: usize, rows: usize, block_k: usize) -> TiledAttentionLayouts {
    let block_q = ATTENTION_TILED_GROUPS * rows;
    let values = |len| if dv == 0 { 0 } else { len };
    TiledAttentionLayouts {
        queries: SharedLayout { row: d + 4, col: 1, len: block_q * (d + 4), cores: None },
        keys: SharedLayout { row: d + 4, col: 1, len: block_k * (d + 4), cores: None },
        values: SharedLayout { row: dv + 4, col: 1, len: values(block_k * (dv + 4)), cores: None },
        weights: SharedLayout { row: block_k + 4, col: 1, len: values(block_q * (block_k + 4)), cores: None },
    }
}

/// Values of shared memory register-tiled attention takes: its tiles, and on SPIR-V the lane
/// groups' scratch (one maximum or sum per query row and invocation).
fn attention_tiled_shared(
    d: usize,
    dv: usize,
    rows: usize,
    block_k: usize,
    lanes: usize,
    flavor: super::GpuFlavor,
) -> usize {
    let l = tiled_attention_layouts(d, dv, rows, block_k);
    l.queries.len
        + l.keys.len
        + l.values.len
        + l.weights.len
        + super::skeleton::LaneGroups::scratch_len(flavor, ATTENTION_TILED_GROUPS * lanes, rows)
}

/// The largest head (query and value row) the tensor-core attention holds in registers: each
/// lane keeps a quarter of its warp's 16 query rows and 16 output rows.
pub const ATTENTION_MMA_MAX_HEAD: usize = 128;

/// Where the tensor-core attention keeps its tiles in shared memory, in elements (one stage
/// each of keys and values). The weights stay in registers: the score products leave them
/// where the value products' A fragments want them (for TF32 ones with the keys' rows
/// interleaved in their tile, `OperandTile::with_rows_interleaved`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionLayouts {
    /// Key `j`, element `e` at `j·(d + 4) + e`: the score products read it as their B operand
    /// (8 keys × 4 elements per fragment read), which then falls in 32 different banks. With
    /// 16-bit operands `j·(d + 8) + e`: 8 keys × 4 words, likewise.
    pub keys: SharedLayout,
    /// Key `j`, element `e` at `j·(dv + 8) + e`: the value products' B operand (4 keys × 8
    /// elements per read), conflict-free likewise; 16-bit values are read transposed with
    /// `ldmatrix` (8 keys of 16 bytes, in 32 different banks).
    pub values: SharedLayout,
}

/// The shared layouts of tensor-core attention with key tiles of `block_k`, at `precision`.
pub fn attention_layouts(d: usize, dv: usize, block_k: usize, precision: MmaPrecision) -> AttentionLayouts {
    let values = |len| if dv == 0 { 0 } else { len };
    let pad = if precision.paired() { 8 } else { 4 };
    AttentionLayouts {
        keys: SharedLayout { row: d + pad, col: 1, len: block_k * (d + pad), cores: None },
        values: SharedLayout { row: dv + 8, col: 1, len: values(block_k * (dv + 8)), cores: None },
    }
}

/// The shared layouts of attention as warpgroup products with key tiles of `block_k` and
/// operands of `precision`: the key tile as core matrices whose lines run along its rows
/// (what 16-byte copies of k rows fill), the cores of 8 rows side by side, one block of 8 rows
/// after another; the score products read it transposed (its rows are their B operand's
/// columns, k-major). The value tile of 16-bit operands the same way (the value products read
/// it n-major); of TF32 ones, which the instruction reads only along k, with lines along its
/// columns instead (4 keys each: each value is copied on its own), the cores of 4 keys one
/// after another, one block of 8 columns after another. No weights (they stay in registers).
pub fn warpgroup_attention_layouts(
    d: usize,
    dv: usize,
    block_k: usize,
    precision: MmaPrecision,
) -> AttentionLayouts {
    let elem = precision.shared_bytes();
    let core = CORE * CORE_LINE_BYTES / elem;
    let rows = |width: usize| SharedLayout {
        row: width * CORE,
        col: core,
        len: block_k * width,
        cores: Some(Cores::of(CoreLines::AlongColumns, elem)),
    };
    let values = match precision.paired() {
        true => rows(dv),
        false => SharedLayout {
            row: core,
            col: block_k * CORE,
            len: block_k * dv,
            cores: Some(Cores::of(CoreLines::AlongRows, elem)),
        },
    };
    AttentionLayouts { keys: rows(d), values }
}

/// Groups of warpgroup products a pipeline of `stages` leaves in flight across a step: what
/// the caps ask for, else one with 3 stages or more; never more than `stages − 2`, so a stage
/// that products in flight still read is not refilled.
fn products_in_flight(stages: usize, caps: &GpuCaps) -> u32 {
    let room = stages.saturating_sub(2) as u32;
    caps.products_in_flight.unwrap_or(u32::from(stages >= 3)).min(room)
}

/// The grid of attention in blocks of `block_q` queries: the blocks along x, the batch along y.
fn attention_grid(batch: usize, sq: usize, block_q: usize, caps: &GpuCaps) -> Result<[u32; 3], CodegenError> {
    let grid = [sq.div_ceil(block_q).max(1), batch.max(1)];
    if grid[0] > caps.max_workgroup_count[0] as usize || grid[1] > caps.max_workgroup_count[1] as usize {
        return Err(too_big(format!(
            "attention over {batch} heads of {sq} queries on the {} target",
            caps.name
        )));
    }
    Ok([grid[0] as u32, grid[1] as u32, 1])
}

/// Bytes of shared memory tensor-core attention takes beside its tiles where its `warps`'
/// products (`shape`-sized) are emulated (SPIR-V): each warp's operands, and the quads'
/// partial row results (two per invocation).
fn attention_emulation_scratch(warps: u32, shape: [u32; 3], caps: &GpuCaps) -> usize {
    match caps.lowering {
        GpuLowering::Spirv => {
            (warps * (shape[0] * shape[2] + shape[2] * shape[1]) + 32 * warps * 2) as usize * 4
        }
        GpuLowering::Nvvm(_) => 0,
    }
}

/// The grid of a tiled product: columns of tiles, rows of tiles, batch.
fn matmul_grid(
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    tile: [u32; 3],
    caps: &GpuCaps,
) -> Result<[u32; 3], CodegenError> {
    let grid = [n.div_ceil(tile[1] as usize).max(1), m.div_ceil(tile[0] as usize).max(1), batch.max(1)];
    if grid.iter().zip(&caps.max_workgroup_count).any(|(&g, &max)| g > max as usize) {
        return Err(too_big(format!(
            "a [{batch}] × {m}×{k}·{k}×{n} product on the {} target (grid {grid:?})",
            caps.name
        )));
    }
    Ok(grid.map(|g| g as u32))
}

/// A SIMT product's estimated time, in arbitrary units: the waves of workgroups the device
/// runs one after another (`parallel_units` at a time) times one workgroup's shared-memory
/// reads, which bound the inner loop (an `rm×rn` block does `rm·rn` FMAs per `rm + rn`
/// reads).
fn matmul_cost(grid: [u32; 3], tile: [u32; 3], thread: [u32; 2], k: usize, caps: &GpuCaps) -> usize {
    let workgroups: usize = grid.iter().map(|&g| g as usize).product();
    let waves = workgroups.div_ceil(caps.parallel_units.max(1) as usize);
    let fmas = tile[0] as usize * tile[1] as usize * k;
    let (rm, rn) = (thread[0] as usize, thread[1] as usize);
    waves * fmas * (rm + rn) / (rm * rn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_fold_past_the_x_limit() {
        let caps = GpuCaps::vulkan();
        let p = GpuPlan::elements(100_000 * 256, &caps).unwrap();
        assert_eq!(p.launch.grid, [65535, 2, 1]);
        assert_eq!(p.launch.workgroup, [256, 1, 1]);
    }

    #[test]
    fn row_plans_fit_shared_memory_and_rows_get_a_power_of_two() {
        let caps = GpuCaps::vulkan();
        let sum = RowValue { bytes: 4, shuffled: true, passes: 1 };
        let p = GpuPlan::rows(10, 768, sum, &caps).unwrap();
        assert_eq!(p.launch.workgroup[0], 256);
        assert_eq!(p.shared_bytes, 1024);
        let small = GpuPlan::rows(10, 5, sum, &caps).unwrap();
        assert_eq!(small.launch.workgroup[0], 32);
    }

    /// Rows a norm or softmax passes over several times are held in registers, about 4
    /// elements per invocation; on CUDA their statistics combine by warp shuffles, with shared
    /// memory only for one value per warp (none for a single warp). Longer rows are read again
    /// on each pass; f64 values take the tree.
    #[test]
    fn rows_are_held_in_registers_and_combined_by_warp_shuffles() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let norm = RowValue { bytes: 4, shuffled: true, passes: 3 };
        let rows = |len, value, caps: &GpuCaps| {
            let p = GpuPlan::rows(8, len, value, caps).unwrap();
            let Work::Rows { group, held, warp, .. } = p.work else { panic!("{:?}", p.work) };
            (group, held, warp, p.shared_bytes)
        };
        assert_eq!(rows(384, norm, &cuda), (128, 3, Some(32), 16));
        assert_eq!(rows(100, norm, &cuda), (32, 4, Some(32), 0));
        assert_eq!(rows(2048, norm, &cuda), (256, 8, Some(32), 32));
        assert_eq!(rows(5000, norm, &cuda), (256, 0, Some(32), 32));
        assert_eq!(rows(5000, RowValue { passes: 1, ..norm }, &cuda), (256, 0, Some(32), 32));
        let f64_norm = RowValue { bytes: 8, shuffled: false, passes: 3 };
        assert_eq!(rows(384, f64_norm, &cuda), (128, 3, None, 1024));
        let vulkan = GpuCaps::vulkan();
        assert_eq!(rows(384, norm, &vulkan), (128, 3, None, 512));
        // Emulated shuffles (a Vulkan plan with a fixed warp width) exchange through a value
        // per invocation.
        let emulated = GpuCaps { subgroup_size: Some(32), ..vulkan };
        assert_eq!(rows(384, norm, &emulated), (128, 3, Some(32), 512));
        assert!(GpuPlan::rows(8, 384, norm, &cuda).unwrap().describe().contains(
            "rows: 8 of 384, 128 invocations per row, 3 held in registers each, warp shuffles, then 4 warps through shared memory"
        ));
    }

    /// 16-bit products on sm_90a take warpgroup products where a tile divides them: the
    /// 4096³ product two warpgroups of 64 × 256 in 4 stages, one group of products in flight;
    /// a product of 384 columns 128×128 tiles; one no tile divides, operands that cannot be
    /// copied whole, and sm_90 (no `wgmma`) none.
    #[test]
    fn warpgroup_products_take_the_tiles_that_divide_them() {
        let target = |arch| GpuCaps::cuda(super::super::NvvmTarget::by_arch(arch).unwrap());
        let sm90a = target("sm_90a");
        let plan = |mnk, precision, copyable, caps: &GpuCaps| {
            GpuPlan::matmul_warpgroups(1, mnk, precision, copyable, caps).unwrap().map(|p| {
                let Work::MatmulTensorCores { tile, warps, shape, stages, instruction, .. } = p.work else {
                    panic!("{:?}", p.work)
                };
                (tile, warps, shape, stages, instruction, p.launch.workgroup[0], p.shared_bytes)
            })
        };
        let f16 = MmaPrecision::F16;
        // A k-contiguous, B n-contiguous: a product of row-major operands.
        const ROWS: Option<[bool; 2]> = Some([false, true]);
        assert_eq!(
            plan([4096; 3], f16, ROWS, &sm90a),
            Some((
                [128, 256, 64],
                [8, 1],
                [64, 256, 16],
                4,
                MmaInstruction::Warpgroup { in_flight: 1 },
                256,
                196_608
            ))
        );
        let bert = plan([8192, 384, 384], MmaPrecision::Bf16, ROWS, &sm90a).unwrap();
        assert_eq!((bert.0, bert.3, bert.4), ([128, 128, 64], 4, MmaInstruction::Warpgroup { in_flight: 1 }));
        // Two k tiles: two stages, each step's products awaited.
        let short = plan([4096, 4096, 128], f16, ROWS, &sm90a).unwrap();
        assert_eq!(
            (short.0, short.3, short.4),
            ([128, 256, 64], 2, MmaInstruction::Warpgroup { in_flight: 0 })
        );
        // Products in flight as the caps say, as far as the stages leave room (4 stages: 2).
        for (asked, left) in [(0, 0), (2, 2), (3, 2)] {
            let caps = GpuCaps { products_in_flight: Some(asked), ..sm90a.clone() };
            let p = plan([4096; 3], f16, ROWS, &caps).unwrap();
            assert_eq!(p.4, MmaInstruction::Warpgroup { in_flight: left });
        }
        let caps = GpuCaps { products_in_flight: Some(1), ..sm90a.clone() };
        assert_eq!(
            plan([4096, 4096, 128], f16, ROWS, &caps).unwrap().4,
            MmaInstruction::Warpgroup { in_flight: 0 }
        );
        assert_eq!(plan([4096, 4000, 4096], f16, ROWS, &sm90a), None);
        assert_eq!(plan([4096; 3], MmaPrecision::Tf32, ROWS, &sm90a), None);
        assert_eq!(plan([4096; 3], f16, None, &sm90a), None);
        assert_eq!(plan([4096; 3], f16, ROWS, &target("sm_90")), None);
        let described =
            GpuPlan::matmul_warpgroups(1, [4096; 3], f16, ROWS, &sm90a).unwrap().unwrap().describe();
        assert!(described.contains("tile 128×256×64 in shared memory as core matrices (4 stages, async copies, 1 group of products in flight), 8×1 warps, wgmma m64n256k16 on f16 operands"), "{described}");
    }

    /// Core-matrix layouts: lines along the operand's contiguous axis, the cores along it
    /// adjacent (128 bytes apart in 16-bit elements).
    #[test]
    fn warpgroup_layouts_keep_core_matrices_whole() {
        let [a, b] = warpgroup_layouts([128, 256, 64], [false, true], 2);
        // A k-contiguous: (r, c) → core (r/8, c/8) at (r/8)·512 + (c/8)·64, line r%8.
        assert_eq!(
            (a.offset(0, 0), a.offset(0, 7), a.offset(1, 0), a.offset(0, 8), a.offset(8, 0)),
            (0, 7, 8, 64, 512)
        );
        assert_eq!(a.len, 128 * 64);
        // B n-contiguous: (k, n) → core (k/8, n/8) at (k/8)·2048 + (n/8)·64, line k%8.
        assert_eq!((b.offset(0, 1), b.offset(1, 0), b.offset(0, 8), b.offset(8, 0)), (1, 8, 64, 2048));
        let [at, bt] = warpgroup_layouts([128, 256, 64], [true, false], 2);
        // A m-contiguous: lines along m; B k-contiguous: lines along k.
        assert_eq!((at.offset(1, 0), at.offset(0, 1), at.offset(8, 0), at.offset(0, 8)), (1, 8, 64, 1024));
        assert_eq!((bt.offset(1, 0), bt.offset(0, 1), bt.offset(8, 0), bt.offset(0, 8)), (1, 8, 64, 512));
        // f32 operands along k (TF32): cores of 8 lines of 4, 32 elements (128 bytes) each.
        let [a4, b4] = warpgroup_layouts([128, 128, 32], [false, false], 4);
        // A: (r, c) → core (r/8, c/4) at (r/8)·256 + (c/4)·32, line r%8 of 4.
        assert_eq!(
            (a4.offset(0, 3), a4.offset(1, 0), a4.offset(0, 4), a4.offset(8, 0), a4.offset(9, 5)),
            (3, 4, 32, 256, 256 + 32 + 4 + 1)
        );
        // B: (k, n) → core (k/4, n/8) at (k/4)·32 + (n/8)·256, line n%8 of 4 along k.
        assert_eq!((b4.offset(1, 0), b4.offset(0, 1), b4.offset(4, 0), b4.offset(0, 8)), (1, 4, 32, 256));
    }

    /// TF32 operands take warpgroup products only where both lie along k (as `x·Wᵀ` with
    /// `W` stored `[out, in]`): tiles of the same bytes (k halved), `m64nNk8`. At TF32×3
    /// each stage holds the low parts' tiles too: MiniLM's 8192 × 384 × 1536 product in
    /// 128×128×32 tiles of 64 KiB a stage, 3 of them.
    #[test]
    fn tf32_warpgroup_products_take_operands_along_k() {
        let sm90a = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90a").unwrap());
        let plan = |mnk, precision, copies| {
            GpuPlan::matmul_warpgroups(1, mnk, precision, copies, &sm90a).unwrap().map(|p| {
                let Work::MatmulTensorCores { tile, shape, stages, .. } = p.work else {
                    panic!("{:?}", p.work)
                };
                (tile, shape, stages, p.shared_bytes)
            })
        };
        let along_k = Some([false, false]);
        assert_eq!(
            plan([4096; 3], MmaPrecision::Tf32, along_k),
            Some(([128, 256, 32], [64, 256, 8], 4, 4 * 48 * 1024))
        );
        assert_eq!(
            plan([8192, 384, 1536], MmaPrecision::Tf32x3, along_k),
            Some(([128, 128, 32], [64, 128, 8], 3, 3 * 64 * 1024))
        );
        assert_eq!(plan([4096; 3], MmaPrecision::Tf32, Some([false, true])), None);
        assert_eq!(plan([4096; 3], MmaPrecision::Tf32x3, Some([true, false])), None);
        let described = GpuPlan::matmul_warpgroups(1, [4096; 3], MmaPrecision::Tf32x3, along_k, &sm90a)
            .unwrap()
            .unwrap()
            .describe();
        assert!(
            described.contains("wgmma m64n256k8 on f32 operands split into two tf32 parts"),
            "{described}"
        );
    }

    #[test]
    fn matmul_tiles_follow_the_product_and_the_device() {
        let caps = GpuCaps::vulkan();
        let big = GpuPlan::matmul(1, [512, 768, 768], 4, [false; 2], &caps).unwrap();
        // A portable Vulkan device has registers for 4×4 accumulators, not 8×8.
        assert_eq!(
            big.work,
            Work::Matmul {
                batch: 1,
                m: 512,
                n: 768,
                k: 768,
                tile: [64, 64, 16],
                thread: [4, 4],
                vector: 4,
                stages: 2,
                async_copies: false
            }
        );
        assert_eq!(big.launch.grid, [12, 8, 1]);
        assert_eq!(big.launch.workgroup, [16, 16, 1]);
        assert_eq!(big.shared_bytes, 2 * (16 * 68 + 16 * 68) * 4);
        // A large GPU takes 128×128 tiles where there are enough of them to keep it busy, and
        // 64×64 ones where there are not.
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let large = GpuPlan::matmul(1, [4096, 4096, 4096], 4, [false; 2], &cuda).unwrap();
        assert!(matches!(large.work, Work::Matmul { tile: [128, 128, 16], thread: [8, 8], .. }), "{large:?}");
        assert_eq!(large.shared_bytes, 2 * (16 * 132 + 16 * 132) * 4);
        assert_eq!(large.resident, 2);
        let mid = GpuPlan::matmul(1, [512, 768, 768], 4, [false; 2], &cuda).unwrap();
        assert!(matches!(mid.work, Work::Matmul { tile: [64, 64, 16], thread: [4, 4], .. }), "{mid:?}");
        let thin = GpuPlan::matmul(2, [1, 100, 10], 4, [false; 2], &caps).unwrap();
        assert_eq!(thin.launch.workgroup, [16, 16, 1]);
        assert_eq!(thin.launch.grid, [7, 1, 2]);
    }

    /// MiniLM's products at batch 64 (8192 rows) on an H100/H200: 128×96 tiles where 128×128
    /// ones leave the last wave of 132 multiprocessors part empty (384 and 1152 columns), the
    /// square tiles where both fill the same waves (1536 columns, the 4096³ benchmark). B lies
    /// as its tile does and is copied (384 runs of 4 for 192 invocations); A is read through
    /// registers in vectors, the last of its three rounds partly repeated. An imposed tile
    /// (`--matmul-tile`) is taken, or refused where the target's limits exclude it.
    #[test]
    fn wide_tiles_fill_the_last_wave() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let tile = |batch, [m, n, k]: [usize; 3], caps: &GpuCaps| {
            let p = GpuPlan::matmul(batch, [m, n, k], 4, [false, true], caps).unwrap();
            let Work::Matmul { tile, thread, stages, async_copies, .. } = p.work else { panic!("{p:?}") };
            (tile, thread, stages, async_copies, p.launch.workgroup, p.launch.grid)
        };
        assert_eq!(
            tile(64, [128, 384, 384], &cuda),
            ([128, 96, 16], [8, 8], 4, true, [12, 16, 1], [4, 1, 64])
        );
        assert_eq!(tile(64, [128, 384, 1536], &cuda).0, [128, 96, 16]);
        assert_eq!(tile(64, [128, 1152, 384], &cuda).0, [128, 96, 16]);
        assert_eq!(tile(64, [128, 1536, 384], &cuda).0, [128, 128, 16]);
        assert_eq!(tile(1, [4096, 4096, 4096], &cuda).0, [128, 128, 16]);
        let wide = GpuPlan::matmul(64, [128, 384, 384], 4, [false, true], &cuda).unwrap();
        assert_eq!(wide.shared_bytes, 4 * (16 * 132 + 16 * 100) * 4);
        assert_eq!(wide.resident, 2);
        let square = GpuCaps { matmul_tile: Some([128, 128]), ..cuda.clone() };
        assert_eq!(tile(64, [128, 384, 384], &square).0, [128, 128, 16]);
        // Products of fewer than 64 rows keep their 16-row tiles.
        assert_eq!(tile(1, [8, 384, 384], &square).0[0], 16);
        let vulkan = GpuCaps { matmul_tile: Some([128, 96]), ..GpuCaps::vulkan() };
        let err = GpuPlan::matmul(1, [512, 768, 768], 4, [false; 2], &vulkan).unwrap_err().to_string();
        assert!(
            err.contains(
                "a product in 128×96 tiles (--matmul-tile) on the vulkan target: the tile does not fit"
            ),
            "{err}"
        );
    }

    #[test]
    fn tensor_core_tiles_fill_the_device_and_fit_shared_memory() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let big =
            GpuPlan::matmul_tensor_cores(1, 4096, 4096, 4096, MmaPrecision::Tf32, &cuda).unwrap().unwrap();
        assert!(
            matches!(
                big.work,
                Work::MatmulTensorCores { tile: [128, 128, 16], warps: [2, 4], stages: 4, .. }
            ),
            "{big:?}"
        );
        assert_eq!(big.shared_bytes, 4 * (128 * 20 + 16 * 136) * 4);
        let small =
            GpuPlan::matmul_tensor_cores(1, 128, 384, 384, MmaPrecision::Tf32, &cuda).unwrap().unwrap();
        assert!(matches!(small.work, Work::MatmulTensorCores { tile: [64, 64, 16], .. }), "{small:?}");
        // Emulated on SPIR-V, the scratch arrays count too.
        let mut vk = GpuCaps::vulkan();
        vk.mma = Some(MmaPrecision::Tf32);
        vk.subgroup_size = Some(32);
        let p = GpuPlan::matmul_tensor_cores(1, 4096, 4096, 4096, MmaPrecision::Tf32, &vk).unwrap().unwrap();
        assert!(p.shared_bytes <= vk.max_shared_bytes, "{p:?}");
    }

    #[test]
    fn async_copies_deepen_the_pipeline_into_dynamic_shared_memory() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let f16 =
            GpuPlan::matmul_tensor_cores(1, 4096, 4096, 4096, MmaPrecision::F16, &cuda).unwrap().unwrap();
        assert!(
            matches!(
                f16.work,
                Work::MatmulTensorCores { tile: [128, 128, 32], stages: 4, async_copies: true, .. }
            ),
            "{f16:?}"
        );
        // Four stages of A and B, rows of 40 16-bit elements: past the static 48 KiB, so all
        // of it is dynamic; two workgroups still fit a multiprocessor.
        assert_eq!(f16.shared_bytes, 4 * (128 * 40 + 128 * 40) * 2);
        assert_eq!(f16.dynamic_shared_bytes(), f16.shared_bytes);
        assert!(2 * f16.shared_bytes <= cuda.max_dynamic_shared_bytes);
        // No more stages than k tiles; small tiles stay static.
        let short =
            GpuPlan::matmul_tensor_cores(1, 128, 384, 48, MmaPrecision::Tf32, &cuda).unwrap().unwrap();
        assert!(
            matches!(short.work, Work::MatmulTensorCores { stages: 3, tile: [64, 64, 16], .. }),
            "{short:?}"
        );
        assert_eq!(short.dynamic_shared_bytes(), 0);
        // An sm_86 part has less to give: the stages fit half of its 99 KiB.
        let ampere = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_86").unwrap());
        let p =
            GpuPlan::matmul_tensor_cores(1, 4096, 4096, 4096, MmaPrecision::F16, &ampere).unwrap().unwrap();
        assert!(matches!(p.work, Work::MatmulTensorCores { stages: 2, .. }), "{p:?}");
        // Emulated on SPIR-V, within the static shared memory with the scratch arrays.
        let mut vk = GpuCaps::vulkan();
        vk.mma = Some(MmaPrecision::Tf32);
        vk.subgroup_size = Some(32);
        vk.async_copies = true;
        let e = GpuPlan::matmul_tensor_cores(1, 512, 512, 512, MmaPrecision::Tf32, &vk).unwrap().unwrap();
        assert!(matches!(e.work, Work::MatmulTensorCores { stages: 3, async_copies: true, .. }), "{e:?}");
        assert!(e.shared_bytes <= vk.max_shared_bytes);
    }

    /// The f32 product copies whatever operand lies in memory as its shared tile does (B
    /// row-major, A column-major), 4 stages deep in dynamic shared memory; with neither, it
    /// keeps its two static stages.
    #[test]
    fn simt_products_copy_what_lies_as_their_tiles() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let plan =
            |copyable, caps: &GpuCaps| GpuPlan::matmul(1, [4096, 4096, 4096], 4, copyable, caps).unwrap();
        for copyable in [[false, true], [true, false]] {
            let p = plan(copyable, &cuda);
            assert!(
                matches!(p.work, Work::Matmul { tile: [128, 128, 16], stages: 4, async_copies: true, .. }),
                "{p:?}"
            );
            assert_eq!(p.shared_bytes, 4 * (16 * 132 + 16 * 132) * 4);
            assert_eq!(p.dynamic_shared_bytes(), p.shared_bytes);
            assert!(2 * p.shared_bytes <= cuda.max_dynamic_shared_bytes);
        }
        let p = plan([false, false], &cuda);
        assert!(matches!(p.work, Work::Matmul { stages: 2, async_copies: false, .. }), "{p:?}");
        // Ragged tiles are not copied; f64 values never are; nor on a target without copies.
        let ragged = GpuPlan::matmul(1, [4096, 4000, 4096], 4, [false, true], &cuda).unwrap();
        assert!(matches!(ragged.work, Work::Matmul { async_copies: false, .. }), "{ragged:?}");
        let f64 = GpuPlan::matmul(1, [4096, 4096, 4096], 8, [true, true], &cuda).unwrap();
        assert!(matches!(f64.work, Work::Matmul { async_copies: false, .. }), "{f64:?}");
        let vk = plan([true, true], &GpuCaps::vulkan());
        assert!(matches!(vk.work, Work::Matmul { stages: 2, async_copies: false, .. }), "{vk:?}");
    }

    /// A key tile the caps impose is taken with the most stages that fit, and refused where
    /// none does.
    #[test]
    fn tensor_core_attention_takes_an_imposed_key_tile() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let with = |t| GpuCaps { attention_key_tile: Some(t), ..cuda.clone() };
        let plan = |t, d| GpuPlan::attention_tensor_cores(48, 2048, 2048, d, d, MmaPrecision::F16, &with(t));
        let p = plan(64, 64).unwrap().unwrap();
        assert!(
            matches!(p.work, Work::AttentionTensorCores { block_k: 64, stages: 2, async_copies: true, .. }),
            "{p:?}"
        );
        let p = plan(16, 64).unwrap().unwrap();
        assert!(matches!(p.work, Work::AttentionTensorCores { block_k: 16, stages: 3, .. }), "{p:?}");
        for (t, d) in [(24, 64), (0, 64), (256, 128)] {
            let err = plan(t, d).unwrap_err().to_string();
            assert!(err.contains(&format!("in key tiles of {t} (heads of {d})")), "{err}");
        }
    }

    #[test]
    fn tensor_core_attention_takes_the_longest_key_tiles_that_fit() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let tf32 = MmaPrecision::Tf32;
        let p = GpuPlan::attention_tensor_cores(48, 2048, 2048, 64, 64, tf32, &cuda).unwrap().unwrap();
        assert!(
            matches!(
                p.work,
                Work::AttentionTensorCores { warps: 4, block_k: 32, stages: 2, shape: [16, 8, 8], .. }
            ),
            "{p:?}"
        );
        assert_eq!(p.launch.grid, [32, 48, 1]);
        assert_eq!(p.launch.workgroup, [128, 1, 1]);
        // Two stages of keys (rows of 68) and values (rows of 72); the weights stay in
        // registers.
        assert_eq!(p.shared_bytes, 2 * (32 * 68 + 32 * 72) * 4);
        // A head of 128 leaves room for one stage only; a short sequence takes fewer warps.
        let wide = GpuPlan::attention_tensor_cores(12, 20, 128, 128, 128, tf32, &cuda).unwrap().unwrap();
        assert!(
            matches!(wide.work, Work::AttentionTensorCores { warps: 2, block_k: 32, stages: 1, .. }),
            "{wide:?}"
        );
        assert!(wide.shared_bytes <= cuda.max_shared_bytes);
        // Heads the products cannot tile, heads too long for the registers, and targets without
        // tensor cores keep the one-query-per-invocation kernel.
        for (d, dv) in [(12, 64), (64, 20), (136, 64), (64, 0)] {
            let p = GpuPlan::attention_tensor_cores(1, 64, 64, d, dv, tf32, &cuda).unwrap();
            assert_eq!(p.is_some(), (d, dv) == (64, 0), "d {d}, dv {dv}: {p:?}");
        }
        assert_eq!(
            GpuPlan::attention_tensor_cores(1, 64, 64, 64, 64, tf32, &GpuCaps::vulkan()).unwrap(),
            None
        );
    }

    /// 16-bit attention on `sm_90a` takes warpgroup products: two warpgroups, key tiles of
    /// 128 in 3 stages of dynamic shared memory at heads of 64, of 64 at heads of 128 (the
    /// registers); one warpgroup for 64 queries or fewer; the key tile the caps impose; with 3
    /// stages a group of products in flight (the walk overlapped). Not on
    /// sm_90, nor for heads that are not multiples of 16, or tiles that cannot be copied
    /// whole.
    #[test]
    fn sixteen_bit_attention_takes_warpgroups_where_they_fit() {
        let target = |arch| GpuCaps::cuda(super::super::NvvmTarget::by_arch(arch).unwrap());
        let sm90a = target("sm_90a");
        let plan = |sq, d, caps: &GpuCaps| {
            GpuPlan::attention_warpgroups(48, sq, 2048, d, d, MmaPrecision::F16, true, caps).unwrap()
        };
        let at = |p: Option<GpuPlan>| {
            p.map(|p| match p.work {
                Work::AttentionTensorCores {
                    warps,
                    block_k,
                    stages,
                    instruction: MmaInstruction::Warpgroup { in_flight },
                    ..
                } => (warps, block_k, stages, in_flight, p.launch.grid[0], p.dynamic_shared_bytes()),
                other => panic!("{other:?}"),
            })
        };
        assert_eq!(at(plan(2048, 64, &sm90a)), Some((8, 128, 3, 1, 16, 3 * 128 * 128 * 2)));
        assert_eq!(at(plan(2048, 128, &sm90a)), Some((8, 64, 3, 1, 16, 3 * 64 * 256 * 2)));
        assert_eq!(at(plan(40, 64, &sm90a)), Some((4, 128, 3, 1, 1, 3 * 128 * 128 * 2)));
        let k64 = GpuCaps { attention_key_tile: Some(64), ..sm90a.clone() };
        // 3 stages of 64 keys take the 48 KiB a kernel declares statically.
        assert_eq!(at(plan(2048, 64, &k64)), Some((8, 64, 3, 1, 16, 0)));
        // Products in flight as the caps say, at most one (a tile's value products).
        for (asked, left) in [(0, 0), (1, 1), (2, 1)] {
            let caps = GpuCaps { products_in_flight: Some(asked), ..sm90a.clone() };
            assert_eq!(at(plan(2048, 64, &caps)).map(|p| p.3), Some(left));
        }
        assert_eq!(at(plan(2048, 24, &sm90a)), None);
        assert_eq!(at(plan(2048, 64, &target("sm_90"))), None);
        let strided = GpuPlan::attention_warpgroups(48, 2048, 2048, 64, 64, MmaPrecision::F16, false, &sm90a);
        assert_eq!(at(strided.unwrap()), None);
    }

    /// TF32 attention on `sm_90a` takes warpgroup products too, with key tiles as the
    /// registers allow: at heads of 64, 64 keys at TF32 and 32 at TF32×3 (both parts of the
    /// weights and of the queries' fragments stay in registers), each in 3 stages of 32 KiB
    /// (at TF32×3 half of each stage holds the low parts); at heads of 128, 32 keys at TF32
    /// and none at TF32×3 (it stays on `mma.sync`); at heads of 32, 128 keys at TF32 and 64
    /// at TF32×3. Heads that are multiples of 8 qualify, others not.
    #[test]
    fn tf32_attention_takes_warpgroups_where_the_registers_allow() {
        let sm90a = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90a").unwrap());
        let plan = |d, dv, precision| {
            GpuPlan::attention_warpgroups(48, 2048, 2048, d, dv, precision, true, &sm90a).unwrap().map(|p| {
                match p.work {
                    Work::AttentionTensorCores {
                        warps,
                        block_k,
                        stages,
                        shape,
                        instruction: MmaInstruction::Warpgroup { in_flight },
                        ..
                    } => (warps, block_k, stages, shape, in_flight, p.dynamic_shared_bytes()),
                    other => panic!("{other:?}"),
                }
            })
        };
        let (tf32, x3) = (MmaPrecision::Tf32, MmaPrecision::Tf32x3);
        assert_eq!(plan(64, 64, tf32), Some((8, 64, 3, [64, 64, 8], 1, 3 * 32768)));
        assert_eq!(plan(64, 64, x3), Some((8, 32, 3, [64, 32, 8], 1, 3 * 32768)));
        assert_eq!(plan(128, 128, tf32), Some((8, 32, 3, [64, 32, 8], 1, 3 * 32768)));
        assert_eq!(plan(128, 128, x3), None);
        assert_eq!(plan(32, 32, tf32).map(|p| p.1), Some(128));
        assert_eq!(plan(32, 32, x3).map(|p| p.1), Some(64));
        assert_eq!(plan(40, 40, tf32).map(|p| p.1), Some(128));
        assert_eq!(plan(36, 36, tf32), None);
        let sm90 = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        assert_eq!(GpuPlan::attention_warpgroups(48, 2048, 2048, 64, 64, tf32, true, &sm90).unwrap(), None);
    }

    #[test]
    fn attention_key_tiles_fit_half_the_shared_memory() {
        let caps = GpuCaps::vulkan();
        let p = GpuPlan::attention(12, 128, 128, 64, 64, 4, &caps).unwrap();
        assert_eq!(
            p.work,
            Work::Attention { batch: 12, sq: 128, sk: 128, d: 64, dv: 64, block_q: 64, block_k: 32 }
        );
        assert_eq!(p.shared_bytes, 32 * 128 * 4);
        let wide = GpuPlan::attention(1, 4, 4, 1024, 1024, 4, &caps).unwrap();
        assert!(wide.shared_bytes <= caps.max_shared_bytes / 2);
    }

    /// Register-tiled attention takes the most queries per invocation and the longest key tile
    /// that fit the registers and the static shared memory; it leaves to one query per
    /// invocation what it does not take.
    #[test]
    fn tiled_attention_fills_registers_and_shared_memory() {
        let cuda = GpuCaps::cuda(super::super::NvvmTarget::by_arch("sm_90").unwrap());
        let tiled = |p: Option<GpuPlan>| p.map(|p| (p.work, p.launch, p.shared_bytes));
        // MiniLM at batch 64 (heads of 32): 4 queries × 8 keys, 4 × 4 columns, tiles of 64.
        let (work, launch, shared) =
            tiled(GpuPlan::attention_tiled(768, 128, 128, 32, 32, 4, &cuda).unwrap()).unwrap();
        assert_eq!(
            work,
            Work::AttentionTiled {
                batch: 768,
                sq: 128,
                sk: 128,
                d: 32,
                dv: 32,
                rows: 4,
                lanes: 8,
                block_k: 64
            }
        );
        assert_eq!(launch, Launch { grid: [2, 768, 1], workgroup: [128, 1, 1] });
        assert_eq!(shared, (64 * 36 * 3 + 64 * 68) * 4);
        // Heads of 64: tiles of 64 would take 68 KiB; 32 fit.
        let (work, _, shared) =
            tiled(GpuPlan::attention_tiled(48, 2048, 2048, 64, 64, 4, &cuda).unwrap()).unwrap();
        assert!(matches!(work, Work::AttentionTiled { rows: 4, lanes: 8, block_k: 32, .. }), "{work:?}");
        assert!(shared <= cuda.max_shared_bytes, "{shared}");
        // Vulkan's 64 registers: 2 queries per invocation for heads of 64, with the lane
        // groups' scratch in shared memory.
        let vulkan = GpuCaps::vulkan();
        let (work, _, shared) =
            tiled(GpuPlan::attention_tiled(4, 80, 70, 64, 64, 4, &vulkan).unwrap()).unwrap();
        assert!(matches!(work, Work::AttentionTiled { rows: 2, lanes: 8, block_k: 32, .. }), "{work:?}");
        assert_eq!(shared, (32 * 68 + 32 * 68 * 2 + 32 * 36 + 128 * 2) * 4);
        // Value rows of 20 (5 runs of 4) are one lane's; value rows of 16 four lanes'.
        let lanes = |dv| match GpuPlan::attention_tiled(1, 64, 64, 32, dv, 4, &cuda).unwrap().map(|p| p.work)
        {
            Some(Work::AttentionTiled { lanes, .. }) => lanes,
            other => panic!("{other:?}"),
        };
        assert_eq!((lanes(20), lanes(16), lanes(0)), (1, 4, 8));
        // Not taken: fewer than 16 queries, heads that are not multiples of 4 or longer than
        // 128, f64 registers, or caps that ask for one query per invocation.
        let per_query = GpuCaps { attention_per_query: true, ..cuda.clone() };
        for (sq, d, dv, bytes, caps) in [
            (8, 64, 64, 4, &cuda),
            (64, 30, 32, 4, &cuda),
            (64, 32, 136, 4, &cuda),
            (64, 32, 32, 8, &cuda),
            (64, 32, 32, 4, &per_query),
        ] {
            assert_eq!(
                GpuPlan::attention_tiled(1, sq, sq, d, dv, bytes, caps).unwrap(),
                None,
                "{sq} {d} {dv}"
            );
        }
    }
}
