//! What a GPU target offers, as data. Plans are chosen from these numbers, never from a
//! target's name, so a new device class is a new value here, not new branches in emitters.

use kiln_ir::DType;

/// How a target's kernels leave MLIR's `gpu` dialect. The kernel text differs only where the
/// lowerings disagree on spelling (the entry point's workgroup size, where workgroup and
/// per-invocation arrays live: see [`GpuFlavor`]); the plans and the arithmetic are the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuLowering {
    /// `convert-gpu-to-spirv`, serialized to SPIR-V words (Vulkan).
    Spirv,
    /// `convert-gpu-to-nvvm`, then LLVM's NVPTX backend to PTX (CUDA).
    Nvvm(NvvmTarget),
}

/// An NVIDIA architecture the NVPTX backend compiles for, with what its plans need to know of
/// the GPUs that have it. Every one comes from [`NvvmTarget::by_arch`]'s table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NvvmTarget {
    /// Compute capability, `[9, 0]` for `sm_90`.
    pub compute_capability: [u32; 2],
    /// The PTX ISA version the modules declare, `[7, 8]`: the lowest that has the
    /// architecture, so the oldest driver that knows the GPU accepts the modules.
    pub ptx_version: [u32; 2],
    /// Whether the modules use the architecture's own features (`sm_90a`: warpgroup products,
    /// `wgmma`), which only GPUs of exactly this compute capability run.
    pub arch_specific: bool,
    /// The multiprocessors of the architecture's data-centre or largest part (A100, RTX 3090
    /// class, RTX 4090 class, H100/H200): how many workgroups a wave of a grid runs.
    pub multiprocessors: u32,
    /// The shared memory a block of those parts may opt in to
    /// (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`: 163, 99, 99 and 227 KiB).
    pub max_dynamic_shared_bytes: u32,
    /// The target's name, `cuda:sm_90a`.
    pub name: &'static str,
}

/// Every architecture `--target cuda:ARCH` accepts, oldest first: one row each, so a new one
/// must state all of its numbers.
const ARCHITECTURES: [NvvmTarget; 5] = [
    NvvmTarget::row("cuda:sm_80", [8, 0], [7, 0], false, 108, 166_912),
    NvvmTarget::row("cuda:sm_86", [8, 6], [7, 1], false, 84, 101_376),
    NvvmTarget::row("cuda:sm_89", [8, 9], [7, 8], false, 128, 101_376),
    NvvmTarget::row("cuda:sm_90", [9, 0], [7, 8], false, 132, 232_448),
    // PTX 8.0 is the first with `wgmma`.
    NvvmTarget::row("cuda:sm_90a", [9, 0], [8, 0], true, 132, 232_448),
];

impl NvvmTarget {
    /// The architectures `--target cuda:ARCH` accepts, oldest first.
    pub const ARCHES: [&'static str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"];

    const fn row(
        name: &'static str,
        compute_capability: [u32; 2],
        ptx_version: [u32; 2],
        arch_specific: bool,
        multiprocessors: u32,
        max_dynamic_shared_bytes: u32,
    ) -> NvvmTarget {
        NvvmTarget {
            compute_capability,
            ptx_version,
            arch_specific,
            multiprocessors,
            max_dynamic_shared_bytes,
            name,
        }
    }

    /// The target for `sm_XY` (one of [`NvvmTarget::ARCHES`]).
    pub fn by_arch(arch: &str) -> Option<NvvmTarget> {
        ARCHITECTURES.into_iter().find(|t| t.name.strip_prefix("cuda:") == Some(arch))
    }

    /// `sm_90`, or `sm_90a` for the architecture-specific target.
    pub fn arch(&self) -> String {
        let suffix = if self.arch_specific { "a" } else { "" };
        format!("sm_{}{}{suffix}", self.compute_capability[0], self.compute_capability[1])
    }

    /// `8.0`, as manifests and PTX headers write it.
    pub fn ptx(&self) -> String {
        format!("{}.{}", self.ptx_version[0], self.ptx_version[1])
    }
}

/// How kernel text spells what its lowering reads differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuFlavor {
    /// `spirv.entry_point_abi`; workgroup arrays as `memref.alloc` in memory space 3 and
    /// per-invocation arrays as `memref.alloca` in space 6 (SPIR-V's `Workgroup` and `Function`
    /// storage classes).
    Spirv,
    /// `known_block_size`; workgroup arrays as workgroup attributions of the `gpu.func` (PTX
    /// `.shared` variables) and per-invocation arrays as `memref.alloca` in the private address
    /// space (registers once LLVM promotes them).
    Nvvm,
}

/// The capabilities of a GPU target that kernel plans and code depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuCaps {
    /// The target's name in messages and manifests (`vulkan`, `cuda:sm_90`).
    pub name: &'static str,
    /// How kernels are lowered and serialized.
    pub lowering: GpuLowering,
    /// Most invocations in one workgroup.
    pub max_workgroup_invocations: u32,
    /// Most invocations along each workgroup axis.
    pub max_workgroup_size: [u32; 3],
    /// Most workgroups along each grid axis.
    pub max_workgroup_count: [u32; 3],
    /// Workgroup (shared) memory per workgroup, in bytes.
    pub max_shared_bytes: u32,
    /// The subgroup size, when the target fixes one; `None` when it differs between devices, so
    /// no plan may depend on it.
    pub subgroup_size: Option<u32>,
    /// Storage-buffer element types the target can load and store.
    pub f16: bool,
    pub bf16: bool,
    pub f64: bool,
    pub i64: bool,
    pub i8: bool,
    /// Alignment of every buffer binding's start, so each arena buffer is bound where it is.
    pub buffer_align: usize,
    /// Most buffers one kernel may bind.
    pub max_bindings: usize,
    /// Largest byte range one binding may cover.
    pub max_binding_bytes: u64,
    /// The tensor-core products the target has (`None`: no tensor cores).
    pub mma: Option<super::plan::MmaPrecision>,
    /// Whether f32 products may round their operands to the tensor cores' precision
    /// (`--precision tf32`). Products of f16 and bf16 tensors use tensor cores at their own
    /// precision without it.
    pub tensor_cores: Option<super::plan::MmaPrecision>,
    /// Most elements one buffer may hold: kernels compute indices in 32 bits (half the
    /// registers and none of the 64-bit division sequences of 64-bit indices).
    pub max_buffer_elements: u64,
    /// Workgroups the device runs at once, roughly (its multiprocessors or compute units):
    /// below that many, a product's plan prefers smaller tiles that keep every unit busy.
    pub parallel_units: u32,
    /// 32-bit registers one invocation may hold before the device spills them to memory or
    /// runs fewer invocations at once: a product's per-invocation accumulators take at most
    /// half of them (the rest hold operands and addresses).
    pub registers: u32,
    /// Whether a kernel can copy global memory to shared memory asynchronously (`cp.async`,
    /// NVIDIA sm_80 and later), so that several operand tiles are in flight while it computes
    /// without holding them in registers. Elsewhere such copies are emulated as plain reads
    /// and writes (for checking a kernel's stage bookkeeping on any Vulkan device).
    pub async_copies: bool,
    /// Shared memory a workgroup may have when it asks for more than `max_shared_bytes` at
    /// launch (CUDA's opt-in dynamic shared memory); no more than `max_shared_bytes` where
    /// there is no such thing. Only plans with async copies take it: their deeper pipelines
    /// are what needs the room.
    pub max_dynamic_shared_bytes: u32,
    /// The key tile attention on tensor cores must take (`kiln compile --attention-key-tile`,
    /// for comparing tiles on a GPU); `None`: the plan chooses (see
    /// `GpuPlan::attention_tensor_cores`).
    pub attention_key_tile: Option<u32>,
    /// Whether attention without tensor cores keeps one query per invocation (`kiln compile
    /// --attention-per-query`, for comparing plans on a GPU) instead of register tiles (see
    /// `GpuPlan::attention_tiled`).
    pub attention_per_query: bool,
    /// The tile (`[m, n]`, one of `plan::SIMT_TILES`) every SIMT product of at least 64 rows
    /// must take, or (one of `plan::WARPGROUP_TILES`) every warpgroup product, where it
    /// divides the product (`kiln compile --matmul-tile`, for comparing tiles on a GPU);
    /// `None`: the plan chooses (see `GpuPlan::matmul`, `GpuPlan::matmul_warpgroups`).
    pub matmul_tile: Option<[u32; 2]>,
    /// Whether 16-bit products may run as warpgroup products (`wgmma.mma_async`, NVIDIA
    /// `sm_90a`): four warps multiply operand tiles straight from shared memory, with no
    /// fragments in registers (see `GpuPlan::matmul_warpgroups`).
    pub warpgroup_mma: bool,
    /// Groups of warpgroup products that may still run when the next step's are issued
    /// (`kiln compile --products-in-flight`, for comparing on a GPU); `None`: one where the
    /// pipeline has 3 stages or more (see `GpuPlan::matmul_warpgroups`). Never more than
    /// the stages leave room for (`stages − 2`).
    pub products_in_flight: Option<u32>,
}

impl GpuCaps {
    /// Portable Vulkan 1.1 compute with the storage extensions every current desktop driver
    /// and Mesa's lavapipe have: 256-invocation workgroups, 32 KiB of shared memory (lavapipe
    /// and mobile GPUs have 32, NVIDIA 48, AMD and Intel 64), no fixed subgroup size (8 on
    /// lavapipe, 32 on NVIDIA, 32 or 64 on AMD), 256-byte binding alignment (the largest any
    /// driver asks for), 32 bindings per kernel (lavapipe's limit) and 128 MiB per binding (the
    /// Vulkan minimum, lavapipe's value).
    pub fn vulkan() -> GpuCaps {
        GpuCaps {
            name: "vulkan",
            lowering: GpuLowering::Spirv,
            max_workgroup_invocations: 256,
            max_workgroup_size: [256, 256, 64],
            max_workgroup_count: [65535, 65535, 65535],
            max_shared_bytes: 32 * 1024,
            subgroup_size: None,
            f16: true,
            bf16: false,
            f64: true,
            i64: true,
            i8: true,
            buffer_align: 256,
            max_bindings: 32,
            max_binding_bytes: 1 << 27,
            mma: None,
            tensor_cores: None,
            max_buffer_elements: i32::MAX as u64,
            parallel_units: 16,
            // What a portable kernel can count on (CPU implementations such as lavapipe keep
            // every invocation's live values in memory across a barrier, mobile GPUs have few).
            registers: 64,
            async_copies: false,
            max_dynamic_shared_bytes: 32 * 1024,
            attention_key_tile: None,
            attention_per_query: false,
            matmul_tile: None,
            warpgroup_mma: false,
            products_in_flight: None,
        }
    }

    /// An NVIDIA GPU of `target`'s architecture through CUDA: 1024 threads per block, 48 KiB of
    /// static shared memory (the most a kernel may declare without opting in to more), warps
    /// of 32, device allocations aligned to 256 bytes, and no binding limits worth the name
    /// (kernel parameters are plain pointers; 4 KiB of them is 512). bf16 tensors are stored as
    /// such and computed on in f32, as f16 ones are (sm_80 converts both in one instruction).
    /// `sm_90a` adds warpgroup products.
    pub fn cuda(target: NvvmTarget) -> GpuCaps {
        GpuCaps {
            name: target.name,
            lowering: GpuLowering::Nvvm(target),
            max_workgroup_invocations: 1024,
            max_workgroup_size: [1024, 1024, 64],
            max_workgroup_count: [i32::MAX as u32, 65535, 65535],
            max_shared_bytes: 48 * 1024,
            subgroup_size: Some(32),
            f16: true,
            bf16: true,
            f64: true,
            i64: true,
            i8: true,
            buffer_align: 256,
            max_bindings: 512,
            max_binding_bytes: u64::MAX,
            mma: Some(super::plan::MmaPrecision::Tf32),
            tensor_cores: None,
            max_buffer_elements: i32::MAX as u64,
            parallel_units: target.multiprocessors,
            registers: 255,
            async_copies: true,
            max_dynamic_shared_bytes: target.max_dynamic_shared_bytes,
            attention_key_tile: None,
            attention_per_query: false,
            matmul_tile: None,
            warpgroup_mma: target.arch_specific && target.compute_capability == [9, 0],
            products_in_flight: None,
        }
    }

    /// These caps with f32 products on tensor cores at TF32 precision, where the target has
    /// them (NVIDIA sm_80 and later); unchanged elsewhere.
    pub fn with_tf32(self) -> GpuCaps {
        self.with_tensor_cores(super::plan::MmaPrecision::Tf32)
    }

    /// How the weights products read as B are best stored for these caps: along k where f32
    /// products run as TF32 warpgroup products (which read TF32 operands only along k), else
    /// row-major.
    pub fn product_weights(&self) -> kiln_ir::ProductWeights {
        match self.tensor_cores {
            Some(super::plan::MmaPrecision::Tf32 | super::plan::MmaPrecision::Tf32x3)
                if self.warpgroup_mma =>
            {
                kiln_ir::ProductWeights::AlongK
            }
            Some(_) | None => kiln_ir::ProductWeights::RowMajor,
        }
    }

    /// These caps with f32 products (and attention) on tensor cores at `precision`, where the
    /// target's tensor cores run it; unchanged elsewhere.
    pub fn with_tensor_cores(mut self, precision: super::plan::MmaPrecision) -> GpuCaps {
        if self.mma.is_some_and(|hw| precision.runs_on(hw)) {
            self.tensor_cores = Some(precision);
        }
        self
    }

    /// How kernel text for this target is spelled.
    pub fn flavor(&self) -> GpuFlavor {
        match self.lowering {
            GpuLowering::Spirv => GpuFlavor::Spirv,
            GpuLowering::Nvvm(_) => GpuFlavor::Nvvm,
        }
    }

    /// Whether buffers of `dtype` can be read and written.
    pub fn stores(&self, dtype: DType) -> bool {
        match dtype {
            DType::F32 | DType::I32 => true,
            DType::F16 => self.f16,
            DType::BF16 => self.bf16,
            DType::F64 => self.f64,
            DType::I64 => self.i64,
            DType::Bool => self.i8,
        }
    }

    /// The SPIR-V capabilities and extensions kernels may use on this target, in the form
    /// MLIR's `spirv-attach-target` takes.
    pub fn spirv_env(&self) -> (Vec<&'static str>, Vec<&'static str>) {
        let mut caps = vec!["Shader", "Int16"];
        let mut exts = vec!["SPV_KHR_storage_buffer_storage_class"];
        if self.i64 {
            caps.push("Int64");
        }
        if self.f64 {
            caps.push("Float64");
        }
        if self.f16 {
            caps.extend(["Float16", "StorageBuffer16BitAccess"]);
            exts.push("SPV_KHR_16bit_storage");
        }
        if self.i8 {
            caps.extend(["Int8", "StorageBuffer8BitAccess"]);
            exts.push("SPV_KHR_8bit_storage");
        }
        (caps, exts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each row of the table is named after its own compute capability, in the order
    /// `--target cuda:ARCH` lists them, and caps for it take the row's numbers.
    #[test]
    fn architectures_are_one_consistent_table() {
        let names: Vec<String> = ARCHITECTURES.iter().map(|t| t.arch()).collect();
        assert_eq!(names, NvvmTarget::ARCHES);
        for t in ARCHITECTURES {
            assert_eq!(t.name, format!("cuda:{}", t.arch()));
            assert_eq!(NvvmTarget::by_arch(&t.arch()), Some(t));
            let caps = GpuCaps::cuda(t);
            assert_eq!(
                (caps.name, caps.parallel_units, caps.max_dynamic_shared_bytes),
                (t.name, t.multiprocessors, t.max_dynamic_shared_bytes)
            );
        }
        assert_eq!(NvvmTarget::by_arch("sm_100"), None);
        assert_eq!(GpuCaps::cuda(NvvmTarget::by_arch("sm_90").unwrap()).parallel_units, 132);
        assert!(GpuCaps::cuda(NvvmTarget::by_arch("sm_90a").unwrap()).warpgroup_mma);
    }
}
