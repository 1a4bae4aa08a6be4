//! Devices a model runs on: the host CPU (`host.rs`, native kernels from `kernels.so`), Vulkan
//! devices (`vulkan/`, SPIR-V compute shaders) and CUDA devices (`cuda/`, PTX or cubin kernels
//! through the NVIDIA driver). The artifact's target decides which kind a model needs;
//! `Options::device` picks among the machine's devices of that kind.

use std::fmt;
use std::time::Duration;

use crate::error::RuntimeError;
use crate::manifest::Target;
use crate::symbols::{Dim, SymbolSpec};
use crate::tensor::TensorRef;

pub(crate) mod cuda;
pub(crate) mod host;
pub(crate) mod vulkan;

/// One device of this machine, as `devices()` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceInfo {
    /// The host CPU (native kernels on a thread pool).
    Cpu {
        /// Cores available to the process.
        threads: usize,
    },
    /// A Vulkan physical device.
    Vulkan(VulkanDeviceInfo),
    /// A CUDA device, driven through the NVIDIA driver API.
    Cuda(CudaDeviceInfo),
}

/// A CUDA device's identity and the limits artifacts are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaDeviceInfo {
    /// The driver's ordinal: selected with `"cuda:INDEX"`.
    pub index: usize,
    /// The driver's name for it, e.g. `NVIDIA H200`.
    pub name: String,
    /// `[major, minor]`, e.g. `[9, 0]` for `sm_90`.
    pub compute_capability: [u32; 2],
    /// Total device memory, in bytes.
    pub memory_bytes: u64,
    /// Streaming multiprocessors.
    pub multiprocessors: u32,
    /// Static shared memory a block may use, in bytes (`MAX_SHARED_MEMORY_PER_BLOCK`).
    pub max_shared_bytes_per_block: u32,
    /// Shared memory a block may use once its function opts in to dynamic shared memory, in
    /// bytes (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`; at least the static limit on any device
    /// this runs on, e.g. 227 KiB on sm_90).
    pub max_shared_bytes_per_block_optin: u32,
    /// Threads a block may have (`MAX_THREADS_PER_BLOCK`).
    pub max_threads_per_block: u32,
}

impl CudaDeviceInfo {
    /// The architecture's name, `sm_90`, as `CudaTarget::arch` writes it.
    pub fn arch(&self) -> String {
        format!("sm_{}{}", self.compute_capability[0], self.compute_capability[1])
    }
}

/// A Vulkan physical device's identity and the limits artifacts are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VulkanDeviceInfo {
    /// Position among the Vulkan devices: selected with `"vulkan:INDEX"`.
    pub index: usize,
    /// The driver's name for it, e.g. `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// `discrete GPU`, `integrated GPU`, `virtual GPU`, `CPU (software)` or `other`.
    pub device_type: String,
    /// Vulkan version the device supports, e.g. `1.3.230`.
    pub api_version: String,
    /// Invocations per subgroup.
    pub subgroup_size: u32,
    /// `maxComputeSharedMemorySize`, in bytes.
    pub max_shared_bytes: u32,
    /// `maxComputeWorkGroupInvocations`.
    pub max_workgroup_invocations: u32,
    /// Whether it has a compute queue (devices without one cannot run models).
    pub compute: bool,
}

impl DeviceInfo {
    /// The selector that picks this device: `"cpu"`, `"vulkan:N"` or `"cuda:N"`.
    pub fn id(&self) -> String {
        match self {
            DeviceInfo::Cpu { .. } => "cpu".to_string(),
            DeviceInfo::Vulkan(v) => format!("vulkan:{}", v.index),
            DeviceInfo::Cuda(c) => format!("cuda:{}", c.index),
        }
    }
}

impl fmt::Display for DeviceInfo {
    /// One line: `cpu  host CPU, 2 threads` or `vulkan:0  llvmpipe (…)  CPU (software), Vulkan
    /// 1.3.230, subgroup 8, shared memory 32768 B, 1024 invocations per workgroup` or
    /// `cuda:0  NVIDIA H200  sm_90, 132 multiprocessors, memory 143 GiB, shared memory 49152 B,
    /// 1024 threads per block`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceInfo::Cpu { threads } => write!(f, "cpu  host CPU, {threads} threads"),
            DeviceInfo::Vulkan(v) => write!(
                f,
                "vulkan:{}  {}  {}, Vulkan {}, subgroup {}, shared memory {} B, {} invocations per workgroup{}",
                v.index,
                v.name,
                v.device_type,
                v.api_version,
                v.subgroup_size,
                v.max_shared_bytes,
                v.max_workgroup_invocations,
                if v.compute { "" } else { " (no compute queue: unusable)" }
            ),
            DeviceInfo::Cuda(c) => write!(
                f,
                "cuda:{}  {}  {}, {} multiprocessors, memory {} GiB, shared memory {} B, {} threads per block",
                c.index,
                c.name,
                c.arch(),
                c.multiprocessors,
                c.memory_bytes >> 30,
                c.max_shared_bytes_per_block,
                c.max_threads_per_block
            ),
        }
    }
}

/// The devices of this machine: the CPU first, then each Vulkan device, then each CUDA device,
/// and why Vulkan or CUDA cannot be used when it cannot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Devices {
    /// Usable devices and their limits.
    pub devices: Vec<DeviceInfo>,
    /// Why no Vulkan device is listed (no loader, no instance, no device), if none is.
    pub vulkan_unavailable: Option<String>,
    /// Why no CUDA device is listed (no `libcuda.so.1`, a driver too old, no device), if none
    /// is.
    pub cuda_unavailable: Option<String>,
}

/// Lists this machine's devices. Never fails: a missing Vulkan is reported in
/// [`Devices::vulkan_unavailable`], a missing CUDA in [`Devices::cuda_unavailable`].
pub fn devices() -> Devices {
    devices_with(None, None)
}

/// Checks a step's arena argument: it lies inside the arena of `arena_bytes` and starts at a
/// multiple of `align`; `misaligned` says which alignment was missed (the CPU's 64 bytes, the
/// Vulkan target's `buffer_align`). Both devices rely on this before binding the range.
pub(crate) fn check_arena_range(
    step: &str,
    offset: u64,
    bytes: u64,
    arena_bytes: u64,
    align: u64,
    misaligned: &'static str,
) -> Result<(), RuntimeError> {
    let end = offset.saturating_add(bytes);
    let problem = if end > arena_bytes {
        "outside the arena"
    } else if !offset.is_multiple_of(align) {
        misaligned
    } else {
        return Ok(());
    };
    Err(RuntimeError::ArenaRange { step: step.to_string(), offset, end, arena_bytes, problem })
}

/// A GPU step's dispatch, its module index checked.
pub(crate) struct GpuDispatch<'s> {
    pub module: usize,
    pub grid: &'s [Dim; 3],
    pub workgroup: [u32; 3],
    /// Bytes of dynamic shared memory the launch passes (CUDA only).
    pub dynamic_shared_bytes: u32,
}

/// A GPU step's module index, grid, workgroup and dynamic shared memory, refusing a CPU
/// dispatch and a module the manifest does not have; `device` names the artifact's kind in the
/// error.
pub(crate) fn gpu_dispatch<'s>(
    step: &'s crate::manifest::Step,
    modules: usize,
    device: &str,
) -> Result<GpuDispatch<'s>, RuntimeError> {
    let at = &step.label;
    let (module, grid, workgroup, dynamic_shared_bytes) = match &step.dispatch {
        crate::manifest::Dispatch::Gpu { module, grid, workgroup, dynamic_shared_bytes } => {
            (*module as usize, grid, *workgroup, *dynamic_shared_bytes)
        }
        crate::manifest::Dispatch::Cpu { .. } => {
            return Err(RuntimeError::invalid(format!(
                "step {at:?} is a CPU dispatch in a {device} artifact"
            )))
        }
    };
    if module >= modules {
        return Err(RuntimeError::invalid(format!(
            "step {at:?} uses module {module}, but the manifest has {modules} modules"
        )));
    }
    Ok(GpuDispatch { module, grid, workgroup, dynamic_shared_bytes })
}

/// A GPU step's grid at symbol values `values` (the run's, or the maxima at load), each extent
/// a `u32` as launches take it.
pub(crate) fn grid_at(
    step: &str,
    grid: &[Dim; 3],
    values: &[u64],
    symbols: &[SymbolSpec],
) -> Result<[u32; 3], RuntimeError> {
    let mut out = [0u32; 3];
    for (o, d) in out.iter_mut().zip(grid) {
        *o = d.at(values).and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
            RuntimeError::invalid(format!(
                "step {step:?} has grid extent {} at {}: negative or over u32::MAX",
                d.display(symbols),
                crate::symbols::binding_str(symbols, values)
            ))
        })?;
    }
    Ok(out)
}

/// The run's symbol values as a GPU kernel reads them ([`crate::BufRef::Symbols`]): one
/// little-endian `u32` each (a GPU model's symbols are bounded by `u32::MAX`, checked at load).
pub(crate) fn symbol_words(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|&v| (v as u32).to_le_bytes()).collect()
}

/// Refuses a GPU model whose symbols a kernel could not read as `u32` (see [`symbol_words`]).
pub(crate) fn check_gpu_symbols(symbols: &[SymbolSpec], device: &str) -> Result<(), RuntimeError> {
    match symbols.iter().find(|s| s.max > u64::from(u32::MAX)) {
        Some(s) => Err(RuntimeError::invalid(format!(
            "symbol `{}` may reach {}, but {device} kernels read sizes as 32-bit words (at most {})",
            s.name,
            s.max,
            u32::MAX
        ))),
        None => Ok(()),
    }
}

/// Where a GPU backend puts the weights its steps read, in its one weights buffer: each
/// distinct weight once, in the order the steps first read it, at a multiple of `align`,
/// taking `padded(bytes)` bytes (Vulkan rounds a binding up to 4 bytes).
pub(crate) struct WeightLayout {
    align: u64,
    padded: fn(u64) -> u64,
    offsets: std::collections::HashMap<String, u64>,
    list: Vec<(String, u64)>,
    end: u64,
}

impl WeightLayout {
    pub(crate) fn new(align: u64, padded: fn(u64) -> u64) -> WeightLayout {
        WeightLayout { align, padded, offsets: Default::default(), list: Vec::new(), end: 0 }
    }

    /// The offset and size of weight `name`, which step `step` reads as `expected` bytes: it
    /// must be in `weights` at that size.
    pub(crate) fn place(
        &mut self,
        step: &str,
        name: &str,
        expected: u64,
        weights: &crate::weights::WeightStore,
    ) -> Result<(u64, u64), RuntimeError> {
        let view = weights
            .get(name)
            .ok_or_else(|| RuntimeError::MissingWeight { step: step.to_string(), name: name.to_string() })?;
        let found = view.bytes.len() as u64;
        if found != expected {
            return Err(RuntimeError::WeightSize {
                step: step.to_string(),
                name: name.to_string(),
                expected,
                found,
            });
        }
        if let Some(&offset) = self.offsets.get(name) {
            return Ok((offset, found));
        }
        let too_big = || RuntimeError::invalid("the weights do not fit in 64-bit offsets");
        let offset = self.end.checked_next_multiple_of(self.align).ok_or_else(too_big)?;
        self.end = offset.checked_add((self.padded)(found)).ok_or_else(too_big)?;
        self.offsets.insert(name.to_string(), offset);
        self.list.push((name.to_string(), offset));
        Ok((offset, found))
    }

    /// Each weight with its offset, in placement order, and the bytes they span.
    pub(crate) fn finish(self) -> (Vec<(String, u64)>, u64) {
        (self.list, self.end)
    }
}

/// A GPU step's buffer argument, checked against the manifest and placed: an arena range
/// inside the arena at a multiple of the target's `buffer_align`, a weight at its offset in
/// the one weights buffer (its size as found), an input or output the entry point has, or the
/// run's symbol values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GpuArg {
    Arena { offset: u64, bytes: u64 },
    Weight { offset: u64, bytes: u64 },
    Input(usize),
    Output(usize),
    Symbols,
}

impl WeightLayout {
    /// Resolves argument `buf` of step `step` of an entry point with `io.0` inputs and `io.1`
    /// outputs, placing a weight it reads; `arena` is the arena's bytes and its alignment.
    pub(crate) fn resolve(
        &mut self,
        step: &str,
        buf: &crate::manifest::BufRef,
        arena: (u64, u64),
        weights: &crate::weights::WeightStore,
        io: (usize, usize),
    ) -> Result<GpuArg, RuntimeError> {
        use crate::manifest::BufRef;
        use crate::model::check_index;
        Ok(match buf {
            BufRef::Arena { offset, bytes } => {
                let misaligned = "not a multiple of the target's buffer_align";
                check_arena_range(step, *offset, *bytes, arena.0, arena.1, misaligned)?;
                GpuArg::Arena { offset: *offset, bytes: *bytes }
            }
            BufRef::Weight { name, bytes } => {
                let (offset, found) = self.place(step, name, *bytes, weights)?;
                GpuArg::Weight { offset, bytes: found }
            }
            BufRef::Input { index } => GpuArg::Input(check_index(step, "input", *index, io.0)?),
            BufRef::Output { index } => GpuArg::Output(check_index(step, "output", *index, io.1)?),
            BufRef::Symbols => GpuArg::Symbols,
        })
    }
}

/// [`devices`] with another Vulkan loader and another CUDA driver library (tests point them at
/// missing files).
pub(crate) fn devices_with(
    vulkan_library: Option<&std::ffi::OsStr>,
    cuda_library: Option<&std::ffi::OsStr>,
) -> Devices {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut devices = vec![DeviceInfo::Cpu { threads }];
    let vulkan_unavailable = match vulkan::list(vulkan_library) {
        Ok(found) if found.is_empty() => Some("the Vulkan loader reports no physical device".to_string()),
        Ok(found) => {
            devices.extend(found.into_iter().map(DeviceInfo::Vulkan));
            None
        }
        Err(RuntimeError::VulkanUnavailable { reason }) => Some(reason),
        Err(other) => Some(other.to_string()),
    };
    let cuda_unavailable = match cuda::list(cuda_library) {
        Ok(found) if found.is_empty() => Some("the CUDA driver reports no device".to_string()),
        Ok(found) => {
            devices.extend(found.into_iter().map(DeviceInfo::Cuda));
            None
        }
        Err(RuntimeError::CudaUnavailable { reason }) => Some(reason),
        Err(other) => Some(other.to_string()),
    };
    Devices { devices, vulkan_unavailable, cuda_unavailable }
}

/// Which device a model runs on, from `Options::device` and the artifact's target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Selection {
    /// The host CPU.
    Cpu,
    /// A Vulkan device: the N-th, or the default choice.
    Vulkan(Option<usize>),
    /// A CUDA device: the N-th (CUDA's ordinal), or the first.
    Cuda(Option<usize>),
}

/// Parses a selector (`"cpu"`, `"vulkan"`, `"vulkan:N"`, `"cuda"`, `"cuda:N"`) and matches it
/// with the target:
/// `None` takes the target's kind of device.
pub(crate) fn select(target: &Target, selector: Option<&str>) -> Result<Selection, RuntimeError> {
    let wanted = match selector.map(str::trim) {
        None => None,
        Some("cpu") => Some(Selection::Cpu),
        Some("vulkan") => Some(Selection::Vulkan(None)),
        Some("cuda") => Some(Selection::Cuda(None)),
        Some(text) => {
            let vulkan = text.strip_prefix("vulkan:").map(|n| n.parse::<usize>());
            let cuda = text.strip_prefix("cuda:").map(|n| n.parse::<usize>());
            match (vulkan, cuda) {
                (Some(Ok(index)), _) => Some(Selection::Vulkan(Some(index))),
                (_, Some(Ok(index))) => Some(Selection::Cuda(Some(index))),
                _ => {
                    return Err(RuntimeError::NoDevice {
                        selector: text.to_string(),
                        problem: "devices are named \"cpu\", \"vulkan\" (the first suitable Vulkan device), \
                                  \"vulkan:N\", \"cuda\" (CUDA device 0) or \"cuda:N\" (`kiln run --device list` \
                                  lists them)"
                            .to_string(),
                    })
                }
            }
        }
    };
    let kind = |s: Selection| match s {
        Selection::Cpu => "cpu",
        Selection::Vulkan(_) => "Vulkan",
        Selection::Cuda(_) => "CUDA",
    };
    match (target, wanted) {
        (Target::Cpu(_), None | Some(Selection::Cpu)) => Ok(Selection::Cpu),
        (Target::Vulkan(_), None) => Ok(Selection::Vulkan(None)),
        (Target::Vulkan(_), Some(Selection::Vulkan(index))) => Ok(Selection::Vulkan(index)),
        (Target::Cuda(_), None) => Ok(Selection::Cuda(None)),
        (Target::Cuda(_), Some(Selection::Cuda(index))) => Ok(Selection::Cuda(index)),
        (Target::Cpu(_), Some(other)) => Err(RuntimeError::WrongDevice {
            artifact: target.artifact_name(),
            device: selector.unwrap_or(kind(other)).to_lowercase(),
            fix: format!("run it on \"cpu\", or recompile the model for {}", kind(other)),
        }),
        (Target::Vulkan(_), Some(other)) => Err(RuntimeError::WrongDevice {
            artifact: target.artifact_name(),
            device: selector.unwrap_or(kind(other)).to_lowercase(),
            fix: format!(
                "run it on a Vulkan device (\"vulkan\" or \"vulkan:N\"), or recompile the model for {}",
                if other == Selection::Cpu { "this CPU" } else { kind(other) }
            ),
        }),
        (Target::Cuda(_), Some(other)) => Err(RuntimeError::WrongDevice {
            artifact: target.artifact_name(),
            device: selector.unwrap_or(kind(other)).to_lowercase(),
            fix: format!(
                "run it on a CUDA device (\"cuda\" or \"cuda:N\"), or recompile the model for {}",
                if other == Selection::Cpu { "this CPU" } else { kind(other) }
            ),
        }),
    }
}

/// A backend's refusal of an artifact for another target, given directly to its `load`
/// (`select` routes every artifact to its own backend first).
fn wrong_backend(target: &Target, device: &str) -> RuntimeError {
    RuntimeError::WrongDevice {
        artifact: target.artifact_name(),
        device: device.into(),
        fix: format!("run it on \"{}\"", target.device_kind()),
    }
}

/// A loaded model's device side: what `Model::run` hands checked inputs and outputs to.
pub(crate) enum Backend {
    Host(host::HostBackend),
    Vulkan(Box<vulkan::VulkanBackend>),
    Cuda(Box<cuda::CudaBackend>),
}

impl Backend {
    /// Runs every step of entry point `entry` (an index into `Manifest::entry_views`) once.
    /// Inputs and outputs have been checked against the manifest; step times are pushed to
    /// `times` when given (wall times on the host, GPU timestamps on Vulkan, CUDA events on
    /// CUDA).
    pub fn execute(
        &mut self,
        entry: usize,
        values: &[u64],
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        match self {
            Backend::Host(host) => host.execute(entry, values, inputs, outputs, times),
            // A GPU model has no symbols (refused at load), so `values` is empty.
            Backend::Vulkan(gpu) => gpu.execute(entry, values, inputs, outputs, times),
            Backend::Cuda(gpu) => gpu.execute(entry, values, inputs, outputs, times),
        }
    }

    /// Copies the arena bytes `range` (a state slot, checked at load) into `out`.
    pub fn read_state(&mut self, range: std::ops::Range<usize>, out: &mut [u8]) -> Result<(), RuntimeError> {
        match self {
            Backend::Host(host) => {
                out.copy_from_slice(&host.arena()[range]);
                Ok(())
            }
            Backend::Vulkan(gpu) => gpu.read_state(range, out),
            Backend::Cuda(gpu) => gpu.read_state(range, out),
        }
    }

    /// Writes `value` into the arena bytes `range` (a state slot, checked at load).
    pub fn write_state(&mut self, range: std::ops::Range<usize>, value: &[u8]) -> Result<(), RuntimeError> {
        match self {
            Backend::Host(host) => {
                host.arena_mut()[range].copy_from_slice(value);
                Ok(())
            }
            Backend::Vulkan(gpu) => gpu.write_state(range, value),
            Backend::Cuda(gpu) => gpu.write_state(range, value),
        }
    }

    /// The fault words as the last run left them (empty when no kernel can fault).
    pub fn fault_words(&self) -> &[u32] {
        match self {
            Backend::Host(host) => host.fault_words(),
            Backend::Vulkan(gpu) => gpu.fault_words(),
            Backend::Cuda(gpu) => gpu.fault_words(),
        }
    }

    /// Host threads each run uses (1 on a GPU: the thread that submits and waits).
    pub fn threads(&self) -> usize {
        match self {
            Backend::Host(host) => host.threads(),
            Backend::Vulkan(_) | Backend::Cuda(_) => 1,
        }
    }

    /// The device the model runs on.
    pub fn device(&self) -> DeviceInfo {
        match self {
            Backend::Host(host) => DeviceInfo::Cpu { threads: host.threads() },
            Backend::Vulkan(gpu) => DeviceInfo::Vulkan(gpu.info().clone()),
            Backend::Cuda(gpu) => DeviceInfo::Cuda(gpu.info().clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{CudaTarget, TargetInfo, VulkanTarget};

    fn cpu() -> Target {
        Target::Cpu(TargetInfo {
            triple: "x86_64-unknown-linux-gnu".into(),
            cpu: "generic".into(),
            features: "".into(),
        })
    }

    fn gpu() -> Target {
        Target::Vulkan(VulkanTarget {
            spirv_version: "1.3".into(),
            capabilities: vec!["Shader".into()],
            buffer_align: 256,
            max_workgroup_invocations: 64,
            max_shared_bytes: 0,
            subgroup_size: None,
        })
    }

    fn cuda() -> Target {
        Target::Cuda(CudaTarget {
            precision: "f32".into(),
            tensor_cores: Vec::new(),
            arch_specific: false,
            compute_capability: [9, 0],
            ptx_version: "8.0".into(),
            buffer_align: 256,
            max_workgroup_invocations: 256,
            max_shared_bytes: 0,
            cubins: vec![],
        })
    }

    #[test]
    fn selectors_match_targets() {
        assert_eq!(select(&cpu(), None).unwrap(), Selection::Cpu);
        assert_eq!(select(&cpu(), Some("cpu")).unwrap(), Selection::Cpu);
        assert_eq!(select(&gpu(), None).unwrap(), Selection::Vulkan(None));
        assert_eq!(select(&gpu(), Some("vulkan")).unwrap(), Selection::Vulkan(None));
        assert_eq!(select(&gpu(), Some("vulkan:2")).unwrap(), Selection::Vulkan(Some(2)));
        assert_eq!(
            select(&cpu(), Some("vulkan:0")).unwrap_err().to_string(),
            "a CPU artifact (compiled for x86_64-unknown-linux-gnu) cannot run on device vulkan:0: run it on \
             \"cpu\", or recompile the model for Vulkan"
        );
        let e = select(&gpu(), Some("cpu")).unwrap_err().to_string();
        assert!(e.starts_with("a Vulkan artifact (SPIR-V 1.3) cannot run on device cpu: "), "{e}");
        let e = select(&gpu(), Some("gpu0")).unwrap_err().to_string();
        assert!(e.starts_with("no device matches \"gpu0\": devices are named"), "{e}");
        assert!(select(&gpu(), Some("vulkan:x")).is_err());
        assert_eq!(select(&cuda(), None).unwrap(), Selection::Cuda(None));
        assert_eq!(select(&cuda(), Some("cuda:1")).unwrap(), Selection::Cuda(Some(1)));
        let e = select(&cuda(), Some("vulkan")).unwrap_err().to_string();
        assert_eq!(
            e,
            "a CUDA artifact (compiled for sm_90) cannot run on device vulkan: run it on a CUDA device \
             (\"cuda\" or \"cuda:N\"), or recompile the model for Vulkan"
        );
        let e = select(&cpu(), Some("cuda")).unwrap_err().to_string();
        assert!(e.ends_with("or recompile the model for CUDA"), "{e}");
    }

    #[test]
    fn a_backend_given_another_targets_artifact_names_both() {
        assert_eq!(
            wrong_backend(&cpu(), "cuda").to_string(),
            "a CPU artifact (compiled for x86_64-unknown-linux-gnu) cannot run on device cuda: run it on \"cpu\""
        );
        assert_eq!(
            wrong_backend(&cuda(), "vulkan").to_string(),
            "a CUDA artifact (compiled for sm_90) cannot run on device vulkan: run it on \"cuda\""
        );
        assert_eq!(
            wrong_backend(&gpu(), "cuda").to_string(),
            "a Vulkan artifact (SPIR-V 1.3) cannot run on device cuda: run it on \"vulkan\""
        );
    }

    #[test]
    fn a_missing_loader_is_a_reason_not_a_failure() {
        let listed = devices_with(
            Some(std::ffi::OsStr::new("/nonexistent/libvulkan.so.1")),
            Some(std::ffi::OsStr::new("/nonexistent/libcuda.so.1")),
        );
        assert!(matches!(listed.devices[..], [DeviceInfo::Cpu { .. }]), "{listed:?}");
        let reason = listed.vulkan_unavailable.unwrap();
        assert!(reason.starts_with("cannot load the Vulkan loader (libvulkan.so.1): "), "{reason}");
        let reason = listed.cuda_unavailable.unwrap();
        assert!(reason.starts_with("cannot load /nonexistent/libcuda.so.1: "), "{reason}");
        assert_eq!(listed.devices[0].id(), "cpu");
    }

    #[test]
    fn cuda_devices_are_named_and_described() {
        let info = CudaDeviceInfo {
            index: 1,
            name: "NVIDIA H200".into(),
            compute_capability: [9, 0],
            memory_bytes: 150_000_000_000,
            multiprocessors: 132,
            max_shared_bytes_per_block: 49152,
            max_shared_bytes_per_block_optin: 232448,
            max_threads_per_block: 1024,
        };
        let device = DeviceInfo::Cuda(info);
        assert_eq!(device.id(), "cuda:1");
        assert_eq!(
            device.to_string(),
            "cuda:1  NVIDIA H200  sm_90, 132 multiprocessors, memory 139 GiB, shared memory 49152 B, \
             1024 threads per block"
        );
    }
}
