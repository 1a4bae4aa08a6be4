//! What a GPU target offers, as data. Plans are chosen from these numbers, never from a
//! target's name, so a new device class is a new value here, not new branches in emitters.

use kiln_ir::DType;

/// The capabilities of a GPU target that kernel plans and code depend on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuCaps {
    /// The target's name in messages and manifests (`vulkan`).
    pub name: &'static str,
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
    /// Whether exp, log, tanh, erf, sin, cos and pow exist for f64 (GLSL.std.450 has them only
    /// for 16- and 32-bit floats).
    pub f64_transcendentals: bool,
    /// Alignment of every buffer binding's start, so each arena buffer is bound where it is.
    pub buffer_align: usize,
    /// Most buffers one kernel may bind.
    pub max_bindings: usize,
    /// Largest byte range one binding may cover.
    pub max_binding_bytes: u64,
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
            f64_transcendentals: false,
            buffer_align: 256,
            max_bindings: 32,
            max_binding_bytes: 1 << 27,
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
