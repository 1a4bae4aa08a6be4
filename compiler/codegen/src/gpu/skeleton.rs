//! The text every GPU kernel shares: the `gpu.module`/`gpu.func` around a body, workgroup and
//! invocation numbers, shared and private arrays, and how a workgroup combines its invocations'
//! partial results.

use super::plan::GpuPlan;
use super::GpuFlavor;
use crate::mlir_text::Body;

/// Workgroup memory on SPIR-V (the `Workgroup` storage class after
/// `map-memref-spirv-storage-class`).
const SPIRV_SHARED_SPACE: &str = "3";
/// Per-invocation memory on SPIR-V (the `Function` storage class).
const SPIRV_PRIVATE_SPACE: &str = "6";
/// Workgroup memory on NVVM (PTX `.shared`).
const NVVM_SHARED_SPACE: &str = "#gpu.address_space<workgroup>";
/// Per-invocation memory on NVVM (a stack array LLVM promotes to registers).
const NVVM_PRIVATE_SPACE: &str = "#gpu.address_space<private>";

/// The flavor a body is written in; bodies made outside a `GpuCtx` (unit tests of emitters)
/// are SPIR-V's.
fn flavor(b: &Body) -> GpuFlavor {
    b.gpu().unwrap_or(GpuFlavor::Spirv)
}

/// `gpu.module @{symbol}` holding the kernel `gpu.func @{symbol}` with arguments `%a0…`
/// (`memrefs`, in binding order) and the plan's workgroup size as its entry-point ABI; the
/// plan is written above it as a comment.
/// An argument bound in pieces becomes one parameter per piece (`%aN_0`, `%aN_1`, …). A body
/// that reads the run's symbol values takes them last, as `%syms` (one `u32` each).
/// Fails where the arrays of a kernel past the static limit do not fit the dynamic shared
/// memory its plan asks for at launch (they would run past it unchecked).
pub(crate) fn module(
    symbol: &str,
    memrefs: &[String],
    plan: &GpuPlan,
    body: Body,
) -> Result<String, crate::CodegenError> {
    let mut params: Vec<String> = Vec::with_capacity(memrefs.len());
    for (i, m) in memrefs.iter().enumerate() {
        let arg = format!("%a{i}");
        match body.split_of(&arg) {
            None => params.push(format!("{arg}: {m}")),
            Some(split) => {
                let elem = m.trim_end_matches('>').rsplit('x').next().unwrap_or("f32").to_string();
                for k in 0..split.pieces() {
                    params.push(format!("{arg}_{k}: memref<{}x{elem}>", split.len_of(k).max(1)));
                }
            }
        }
    }
    if let Some(n) = body.symbols() {
        params.push(format!("{}: memref<{n}xi32>", crate::dynamic::SYMS_ARG));
    }
    let [x, y, z] = plan.launch.workgroup;
    let mut prelude = String::new();
    let (workgroup, abi) = match flavor(&body) {
        GpuFlavor::Spirv => (
            String::new(),
            format!("spirv.entry_point_abi = #spirv.entry_point_abi<workgroup_size = [{x}, {y}, {z}]>"),
        ),
        GpuFlavor::Nvvm if plan.dynamic_shared_bytes() > 0 => {
            // Past the static limit every array is a view of the launch's dynamic shared
            // memory, each at a 16-byte aligned offset.
            let mut views =
                format!("{DYNAMIC_SHARED} = gpu.dynamic_shared_memory : memref<?xi8, {NVVM_SHARED_SPACE}>\n");
            let mut at = 0usize;
            for (i, a) in body.attributions().iter().enumerate() {
                views.push_str(&format!(
                    "%dyn_at{i} = arith.constant {at} : index\n{} = memref.view {DYNAMIC_SHARED}[%dyn_at{i}][] : memref<?xi8, {NVVM_SHARED_SPACE}> to {}\n",
                    a.name, a.ty
                ));
                at += a.bytes.next_multiple_of(16);
            }
            if at > plan.dynamic_shared_bytes() as usize {
                return Err(crate::CodegenError::Unsupported(format!(
                    "a kernel whose shared arrays take {at} B of the {} B of dynamic shared memory its plan launches with ({})",
                    plan.dynamic_shared_bytes(),
                    plan.describe()
                )));
            }
            prelude = views;
            (String::new(), format!("known_block_size = array<i32: {x}, {y}, {z}>{}", resident(plan)))
        }
        GpuFlavor::Nvvm => {
            // 16-byte aligned, so runs of 4 f32 values move as one vector access.
            let arrays: Vec<String> = body
                .attributions()
                .iter()
                .map(|a| format!("{} : {} {{llvm.align = 16 : i64}}", a.name, a.ty))
                .collect();
            let workgroup =
                if arrays.is_empty() { String::new() } else { format!(" workgroup({})", arrays.join(", ")) };
            (workgroup, format!("known_block_size = array<i32: {x}, {y}, {z}>{}", resident(plan)))
        }
    };
    Ok(format!(
        "// plan: {}\ngpu.module @{symbol} {{\n  gpu.func @{symbol}({}){workgroup} kernel attributes {{{abi}}} {{\n{}    gpu.return\n  }}\n}}\n",
        plan.describe(),
        params.join(", "),
        indent(&(prelude + &body.finish())),
    ))
}

/// The name of a CUDA kernel's dynamic shared memory, of which its arrays are views.
const DYNAMIC_SHARED: &str = "%dyn_shared";

/// The NVVM attributes that bound a kernel's registers so that `plan.resident` workgroups fit
/// on a multiprocessor (none for one).
fn resident(plan: &GpuPlan) -> String {
    let [x, y, z] = plan.launch.workgroup;
    if plan.resident > 1 {
        format!(", nvvm.maxntid = array<i32: {x}, {y}, {z}>, nvvm.minctasm = {} : i32", plan.resident)
    } else {
        String::new()
    }
}

/// The body one level deeper (inside the `gpu.func`).
fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

/// The workgroup's number in a grid folded by [`GpuPlan`]: `block_id.y · grid.x + block_id.x`.
pub(crate) fn workgroup_number(b: &mut Body, plan: &GpuPlan) -> String {
    let bx = b.assign("gpu.block_id x");
    let by = b.assign("gpu.block_id y");
    let gx = b.index(plan.launch.grid[0] as usize);
    let row = b.assign(format!("arith.muli {by}, {gx} : index"));
    b.assign(format!("arith.addi {row}, {bx} : index"))
}

/// Opens `scf.if` on `value < bound` (close with `b.close("")`).
pub(crate) fn open_below(b: &mut Body, value: &str, bound: usize) {
    let n = b.index(bound);
    let ok = b.assign(format!("arith.cmpi ult, {value}, {n} : index"));
    b.open(format!("scf.if {ok}"));
}

/// The multi-index of row-major number `i` in `shape` (one `index` value per axis).
pub(crate) fn unravel(b: &mut Body, i: &str, shape: &[usize]) -> Vec<String> {
    let mut idx = vec![String::new(); shape.len()];
    let mut rem = i.to_string();
    for k in (0..shape.len()).rev() {
        if k == 0 {
            idx[0] = rem.clone();
        } else {
            let d = b.index(shape[k]);
            idx[k] = b.assign(format!("arith.remui {rem}, {d} : index"));
            rem = b.assign(format!("arith.divui {rem}, {d} : index"));
        }
    }
    idx
}

/// `min(i, n − 1)`: an index clamped into a buffer of `n`, so a load past the end of a tile
/// reads a real element (selected away afterwards) instead of out of bounds.
pub(crate) fn clamp(b: &mut Body, i: &str, n: usize) -> String {
    let last = b.index(n.saturating_sub(1));
    b.assign(format!("arith.minui {i}, {last} : index"))
}

/// The type of a workgroup array of `len` values of `ty` in `b`'s flavor.
pub(crate) fn shared_type(b: &Body, len: usize, ty: &str) -> String {
    let space = match flavor(b) {
        GpuFlavor::Spirv => SPIRV_SHARED_SPACE,
        GpuFlavor::Nvvm => NVVM_SHARED_SPACE,
    };
    format!("memref<{}x{ty}, {space}>", len.max(1))
}

/// A workgroup array of `len` values of `ty`: allocated in the body on SPIR-V, an attribution
/// of the kernel function on NVVM.
pub(crate) fn shared(b: &mut Body, len: usize, ty: &str) -> String {
    let t = shared_type(b, len, ty);
    match flavor(b) {
        GpuFlavor::Spirv => b.assign(format!("memref.alloc() : {t}")),
        GpuFlavor::Nvvm => b.attribution(t, len.max(1) * scalar_bytes(ty)),
    }
}

/// Bytes of one value of scalar type `ty` (`f32`, `i16`, …).
fn scalar_bytes(ty: &str) -> usize {
    match ty {
        "f64" | "i64" => 8,
        "f16" | "bf16" | "i16" => 2,
        "i8" | "i1" => 1,
        _ => 4,
    }
}

/// The type of a per-invocation array of `len` values of `ty` in `b`'s flavor.
pub(crate) fn private_type(b: &Body, len: usize, ty: &str) -> String {
    let space = match flavor(b) {
        GpuFlavor::Spirv => SPIRV_PRIVATE_SPACE,
        GpuFlavor::Nvvm => NVVM_PRIVATE_SPACE,
    };
    format!("memref<{}x{ty}, {space}>", len.max(1))
}

/// Allocates a per-invocation array of `len` values of `ty`.
pub(crate) fn private(b: &mut Body, len: usize, ty: &str) -> String {
    let t = private_type(b, len, ty);
    b.assign(format!("memref.alloca() : {t}"))
}

/// How two partial results combine in a [`tree`] (float or integer, by the value's type).
#[derive(Clone, Copy)]
pub(crate) enum Combine {
    /// Addition (integers wrap).
    Add,
    /// Maximum; NaN-propagating for floats.
    Max,
    /// Minimum; NaN-propagating for floats.
    Min,
}

impl Combine {
    /// `x op y` for values of type `ty`.
    pub(crate) fn apply(self, b: &mut Body, x: &str, y: &str, ty: &str) -> String {
        let float = ty.starts_with('f');
        match (self, float) {
            (Combine::Add, true) => b.fadd(x, y, ty),
            (Combine::Max, true) => b.fmax(x, y, ty),
            (Combine::Min, true) => b.fmin(x, y, ty),
            (Combine::Add, false) => b.assign(format!("arith.addi {x}, {y} : {ty}")),
            (Combine::Max, false) => b.assign(format!("arith.maxsi {x}, {y} : {ty}")),
            (Combine::Min, false) => b.assign(format!("arith.minsi {x}, {y} : {ty}")),
        }
    }
}

/// How the invocations of a workgroup combine one partial result each into a result every
/// one of them gets: a tree in shared memory, or warp shuffles and then one step across the
/// warps through shared memory (as the plan's `warp` says). Barriers stay in uniform control
/// flow; the last one lets the shared array be reused at once.
pub(crate) struct GroupCombine {
    group: u32,
    tid: String,
    ty: String,
    /// The shared array and its type; none where a single warp combines by shuffles alone.
    sh: Option<(String, String)>,
    warps: Option<Warps>,
}

/// Invocation `tid`'s place among warps of `width` lanes.
struct Warps {
    width: u32,
    lane: String,
    warp: String,
    /// SPIR-V, where no warp width is fixed: each shuffle is emulated through the shared
    /// array (every lane stores, then reads its partner's), in the same order, so the
    /// bookkeeping around the shuffles runs on any Vulkan device.
    emulated: bool,
}

impl GroupCombine {
    /// For `group` invocations numbered `tid` combining values of `ty` (f32 or i32 where `warp`
    /// is given), with the shared memory the plan counted.
    pub(crate) fn new(b: &mut Body, group: u32, tid: &str, ty: &str, warp: Option<u32>) -> GroupCombine {
        let emulated = flavor(b) != GpuFlavor::Nvvm;
        let slots = super::plan::row_combine_slots(group, warp, emulated);
        let sh = (slots > 0).then(|| (shared(b, slots, ty), shared_type(b, slots, ty)));
        let warps = warp.map(|w| {
            let width = b.index(w as usize);
            let lane = b.assign(format!("arith.remui {tid}, {width} : index"));
            let warp = b.assign(format!("arith.divui {tid}, {width} : index"));
            Warps { width: w, lane, warp, emulated }
        });
        GroupCombine { group, tid: tid.to_string(), ty: ty.to_string(), sh, warps }
    }

    /// `value` of every invocation combined by `op`, in every invocation.
    pub(crate) fn all(&self, b: &mut Body, value: &str, op: Combine) -> String {
        match &self.warps {
            None => self.tree(b, value, op),
            Some(w) => self.shuffled(b, w, value, op),
        }
    }

    /// The shared array; every plan but a lone warp's on NVVM has one.
    fn shared(&self) -> (&str, &str) {
        let (sh, st) = self.sh.as_ref().expect("a group combined through shared memory has its array");
        (sh, st)
    }

    fn tree(&self, b: &mut Body, value: &str, op: Combine) -> String {
        let (sh, sty) = self.shared();
        let (ty, tid) = (&self.ty, &self.tid);
        b.line(format!("memref.store {value}, {sh}[{tid}] : {sty}"));
        b.line("gpu.barrier");
        let mut stride = self.group / 2;
        while stride >= 1 {
            let s = b.index(stride as usize);
            let low = b.assign(format!("arith.cmpi ult, {tid}, {s} : index"));
            b.open(format!("scf.if {low}"));
            let other = b.assign(format!("arith.addi {tid}, {s} : index"));
            let x = b.assign(format!("memref.load {sh}[{tid}] : {sty}"));
            let y = b.assign(format!("memref.load {sh}[{other}] : {sty}"));
            let z = op.apply(b, &x, &y, ty);
            b.line(format!("memref.store {z}, {sh}[{tid}] : {sty}"));
            b.close("");
            b.line("gpu.barrier");
            stride /= 2;
        }
        let zero = b.index(0);
        let r = b.assign(format!("memref.load {sh}[{zero}] : {sty}"));
        b.line("gpu.barrier");
        r
    }

    /// Butterfly shuffles within each warp (every lane ends with its warp's result, the same
    /// in each lane since each step's operation is commutative), then each warp's lane 0
    /// stores it and every invocation combines the warps' results in warp order.
    fn shuffled(&self, b: &mut Body, w: &Warps, value: &str, op: Combine) -> String {
        let ty = &self.ty;
        let mut x = value.to_string();
        let mut offset = w.width / 2;
        while offset >= 1 {
            let y = if w.emulated {
                let (sh, sty) = self.shared();
                let tid = &self.tid;
                b.line(format!("memref.store {x}, {sh}[{tid}] : {sty}"));
                b.line("gpu.barrier");
                let off = b.index(offset as usize);
                let partner = b.assign(format!("arith.xori {tid}, {off} : index"));
                let y = b.assign(format!("memref.load {sh}[{partner}] : {sty}"));
                b.line("gpu.barrier");
                y
            } else {
                let all = b.int(-1, "i32");
                let clamp = b.int(w.width as i64 - 1, "i32");
                let off = b.int(offset as i64, "i32");
                b.assign(format!("nvvm.shfl.sync bfly {all}, {x}, {off}, {clamp} : {ty} -> {ty}"))
            };
            x = op.apply(b, &x, &y, ty);
            offset /= 2;
        }
        let warps = self.group / w.width;
        if warps == 1 {
            return x;
        }
        let (sh, sty) = self.shared();
        let zero = b.index(0);
        let first = b.assign(format!("arith.cmpi eq, {}, {zero} : index", w.lane));
        b.open(format!("scf.if {first}"));
        b.line(format!("memref.store {x}, {sh}[{}] : {sty}", w.warp));
        b.close("");
        b.line("gpu.barrier");
        let mut acc = b.assign(format!("memref.load {sh}[{zero}] : {sty}"));
        for k in 1..warps {
            let at = b.index(k as usize);
            let y = b.assign(format!("memref.load {sh}[{at}] : {sty}"));
            acc = op.apply(b, &acc, &y, ty);
        }
        b.line("gpu.barrier");
        acc
    }
}

/// How each group of `width` adjacent invocations (a power of two within a warp) combines up
/// to `values` values at a time, so that every invocation of the group gets its group's
/// results: butterfly shuffles at offsets 1, 2, 4, … on NVVM; on SPIR-V, where no warp width is
/// fixed, through shared memory (every invocation stores, then reads its group's values and
/// combines them pairwise in the butterfly's order), so both give every invocation the same
/// `((x0 ⊕ x1) ⊕ (x2 ⊕ x3)) ⊕ …` and the bookkeeping around it runs on any Vulkan device.
pub(crate) struct LaneGroups {
    width: usize,
    /// SPIR-V's scratch array (`values` per invocation) and its type; `None` on NVVM.
    scratch: Option<(String, String)>,
    lin: String,
    values: usize,
}

impl LaneGroups {
    /// Groups of `width` among `invocations` numbered `lin`, combining at most `values` f32
    /// values per call; the scratch array is [`LaneGroups::scratch_len`] long.
    pub(crate) fn new(
        b: &mut Body,
        width: usize,
        invocations: usize,
        lin: &str,
        values: usize,
    ) -> LaneGroups {
        let len = Self::scratch_len(flavor(b), invocations, values);
        let scratch = (len > 0).then(|| (shared(b, len, "f32"), shared_type(b, len, "f32")));
        LaneGroups { width, scratch, lin: lin.to_string(), values }
    }

    /// The f32 values of shared memory the groups take in `flavor` (none on NVVM).
    pub(crate) fn scratch_len(flavor: GpuFlavor, invocations: usize, values: usize) -> usize {
        match flavor {
            GpuFlavor::Nvvm => 0,
            GpuFlavor::Spirv => invocations * values,
        }
    }

    /// Each of `xs` combined by `op` over the group (every invocation must call it: on SPIR-V
    /// it holds two barriers).
    pub(crate) fn all(&self, b: &mut Body, xs: &[String], op: Combine) -> Vec<String> {
        assert!(xs.len() <= self.values, "a lane group combines at most {} values at once", self.values);
        let ty = "f32";
        match &self.scratch {
            None => {
                let all = b.int(-1, "i32");
                let clamp = b.int(31, "i32");
                let mut out = xs.to_vec();
                let mut offset = 1;
                while offset < self.width {
                    let off = b.int(offset as i64, "i32");
                    for x in out.iter_mut() {
                        let y =
                            b.assign(format!("nvvm.shfl.sync bfly {all}, {x}, {off}, {clamp} : f32 -> f32"));
                        *x = op.apply(b, x, &y, ty);
                    }
                    offset *= 2;
                }
                out
            }
            Some((scratch, st)) => {
                let n = b.index(self.values);
                let mine = b.assign(format!("arith.muli {}, {n} : index", self.lin));
                for (i, x) in xs.iter().enumerate() {
                    let at = plus(b, &mine, i);
                    b.line(format!("memref.store {x}, {scratch}[{at}] : {st}"));
                }
                b.line("gpu.barrier");
                let w = b.index(self.width);
                let within = b.assign(format!("arith.remui {}, {w} : index", self.lin));
                let first = b.assign(format!("arith.subi {}, {within} : index", self.lin));
                let first = b.assign(format!("arith.muli {first}, {n} : index"));
                let out = (0..xs.len())
                    .map(|i| {
                        let mut level: Vec<String> = (0..self.width)
                            .map(|lane| {
                                let at = plus(b, &first, lane * self.values + i);
                                b.assign(format!("memref.load {scratch}[{at}] : {st}"))
                            })
                            .collect();
                        while level.len() > 1 {
                            level = level.chunks(2).map(|p| op.apply(b, &p[0], &p[1], ty)).collect();
                        }
                        level.remove(0)
                    })
                    .collect();
                b.line("gpu.barrier");
                out
            }
        }
    }
}

/// `offset + Σ idx[k]·strides[k]` over the axes given (`None` entries are skipped), for a view's
/// base address at some fixed indices.
pub(crate) fn offset_at(b: &mut Body, offset: usize, parts: &[(Option<&String>, usize)]) -> String {
    let mut acc = b.index(offset);
    for (i, s) in parts {
        let (Some(i), s) = (i, *s) else { continue };
        if s == 0 {
            continue;
        }
        let t = if s == 1 {
            i.to_string()
        } else {
            let c = b.index(s);
            b.assign(format!("arith.muli {i}, {c} : index"))
        };
        acc = b.assign(format!("arith.addi {acc}, {t} : index"));
    }
    acc
}

/// `base + i·stride`.
pub(crate) fn step(b: &mut Body, base: &str, i: &str, stride: usize) -> String {
    match stride {
        0 => base.to_string(),
        1 => b.assign(format!("arith.addi {base}, {i} : index")),
        s => {
            let c = b.index(s);
            let t = b.assign(format!("arith.muli {i}, {c} : index"));
            b.assign(format!("arith.addi {base}, {t} : index"))
        }
    }
}

/// One workgroup array with its type, and whether runs of 4 are read as one vector.
pub(crate) struct SharedArray<'a> {
    pub name: &'a str,
    pub ty: &'a str,
    pub vectors: bool,
}

impl SharedArray<'_> {
    /// `count` adjacent values from `at` (a multiple of 4 when `count` is 4).
    pub fn read(&self, b: &mut Body, at: &str, count: usize, ty: &str) -> Vec<String> {
        if count == 4 && self.vectors {
            let vt = format!("vector<4x{ty}>");
            let v =
                b.assign(format!("vector.load {}[{at}] {{alignment = 16}} : {}, {vt}", self.name, self.ty));
            return (0..4).map(|e| b.assign(format!("vector.extract {v}[{e}] : {ty} from {vt}"))).collect();
        }
        (0..count)
            .map(|e| {
                let i = plus(b, at, e);
                b.assign(format!("memref.load {}[{i}] : {}", self.name, self.ty))
            })
            .collect()
    }

    /// Stores adjacent `values` of type `ty` from `at` (a multiple of 4 when there are 4).
    pub fn write(&self, b: &mut Body, at: &str, values: &[String], ty: &str) {
        if values.len() == 4 && self.vectors {
            let vt = format!("vector<4x{ty}>");
            let align = if matches!(ty, "f16" | "i16") { 8 } else { 16 };
            let v = b.assign(format!("vector.from_elements {} : {vt}", values.join(", ")));
            b.line(format!(
                "vector.store {v}, {}[{at}] {{alignment = {align}}} : {}, {vt}",
                self.name, self.ty
            ));
            return;
        }
        for (e, x) in values.iter().enumerate() {
            let i = plus(b, at, e);
            b.line(format!("memref.store {x}, {}[{i}] : {}", self.name, self.ty));
        }
    }
}

/// `x + d` (no op for 0).
pub(crate) fn plus(b: &mut Body, x: &str, d: usize) -> String {
    if d == 0 {
        return x.to_string();
    }
    let dc = b.index(d);
    b.assign(format!("arith.addi {x}, {dc} : index"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::plan::{Launch, Work};

    /// A CUDA kernel past the static 48 KiB views its arrays in the dynamic shared memory it
    /// launches with, and is refused where they would not fit in it.
    #[test]
    fn arrays_past_the_dynamic_shared_memory_are_refused() {
        let plan = |shared_bytes| GpuPlan {
            work: Work::Elements { count: 1, group: 32 },
            launch: Launch { grid: [1, 1, 1], workgroup: [32, 1, 1] },
            shared_bytes,
            resident: 1,
        };
        let body = || {
            let mut b = Body::for_gpu(Vec::new(), GpuFlavor::Nvvm);
            shared(&mut b, 12 * 1024, "f32");
            shared(&mut b, 3, "f32");
            b
        };
        // 48 KiB, then 12 bytes padded to 16.
        let text = module("k", &[], &plan(48 * 1024 + 16), body()).unwrap();
        assert!(text.contains("gpu.dynamic_shared_memory"), "{text}");
        assert!(text.contains("%dyn_at1 = arith.constant 49152 : index"), "{text}");
        let err = module("k", &[], &plan(48 * 1024 + 8), body()).unwrap_err();
        assert!(err.to_string().contains("take 49168 B of the 49160 B of dynamic shared memory"), "{err}");
    }
}
