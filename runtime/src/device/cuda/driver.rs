//! The NVIDIA driver, reached through cudarc's raw bindings (`cudarc::driver::sys`).
//!
//! cudarc was chosen for its `dynamic-loading` mode: the bindings open `libcuda` at the first
//! call instead of linking it, so this crate builds, links and runs its CPU and Vulkan paths on
//! machines without CUDA (and without a CUDA toolkit: the `cuda-12080` bindings are
//! pregenerated). Its raw layer is used rather than its safe `CudaContext` API because the
//! backend needs what that API hides: `cuModuleLoadDataEx` with the JIT's error log, one arena
//! with pointers into it, and stream capture into a graph.
//!
//! In that mode cudarc *panics* when the library or a symbol is missing. So before the first
//! call, [`probe`] opens `libcuda.so.1` itself and looks up every symbol the backend uses,
//! turning a missing driver into `RuntimeError::CudaUnavailable` with the loader's message.

use std::ffi::{c_char, c_int, CStr, OsStr};
use std::sync::OnceLock;

use cudarc::driver::sys;

use super::check::DeviceCaps;
use crate::device::CudaDeviceInfo;
use crate::error::RuntimeError;

/// The driver library as the NVIDIA driver installs it (cudarc looks for the same names).
#[cfg(not(windows))]
pub(crate) const LIBRARY: &str = "libcuda.so.1";
/// The driver library as the NVIDIA driver installs it (cudarc looks for the same names).
#[cfg(windows)]
pub(crate) const LIBRARY: &str = "nvcuda.dll";

/// Every driver entry point the backend calls, so that [`probe`] can refuse a driver lacking
/// one before cudarc's loader would panic on it.
const SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDriverGetVersion",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetName",
    "cuDeviceTotalMem_v2",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxSetCurrent",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphInstantiateWithFlags",
    "cuGraphLaunch",
    "cuGraphExecDestroy",
    "cuGraphDestroy",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemsetD8Async",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuModuleLoadDataEx",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuFuncGetAttribute",
    "cuFuncSetAttribute",
    "cuLaunchKernel",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventElapsedTime",
    "cuEventDestroy_v2",
];

/// Opens the driver library (`library`, else [`LIBRARY`]) and checks that it has every symbol
/// in [`SYMBOLS`]; the error is the reason CUDA is unavailable.
pub(crate) fn probe(library: Option<&OsStr>) -> Result<(), String> {
    let name = library.unwrap_or(OsStr::new(LIBRARY));
    let shown = name.to_string_lossy();
    // SAFETY: opening the NVIDIA driver runs its initializers; loading it is what using CUDA
    // means, and cudarc opens the same library right after.
    let lib = unsafe { libloading::Library::new(name) }.map_err(|e| format!("cannot load {shown}: {e}"))?;
    let missing: Vec<&str> = SYMBOLS
        .iter()
        .copied()
        // SAFETY: only the symbol's presence is checked; the pointer is never called or read.
        .filter(|symbol| unsafe { lib.get::<*const ()>(symbol.as_bytes()) }.is_err())
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("{shown} lacks {}: the NVIDIA driver is too old, update it", missing.join(", ")))
    }
}

/// Probes the driver and runs `cuInit` once per process; the error is `CudaUnavailable`.
pub(crate) fn init() -> Result<(), RuntimeError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| {
        probe(None)?;
        // SAFETY: `probe` found the library and every symbol, so cudarc's loader will not panic;
        // cuInit has no other precondition and may be called from any thread.
        let result = unsafe { sys::cuInit(0) };
        match result {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            other => Err(format!("cuInit failed: {}", describe(other))),
        }
    })
    .clone()
    .map_err(|reason| RuntimeError::CudaUnavailable { reason })
}

/// `CUDA_ERROR_OUT_OF_MEMORY (out of memory)`: the result's name and the driver's words for it.
pub(crate) fn describe(result: sys::CUresult) -> String {
    let mut name: *const c_char = std::ptr::null();
    let mut text: *const c_char = std::ptr::null();
    // SAFETY: both calls only write a pointer to a static string (or fail, leaving it NULL).
    let (named, described) =
        unsafe { (sys::cuGetErrorName(result, &mut name), sys::cuGetErrorString(result, &mut text)) };
    let read = |ok: sys::CUresult, p: *const c_char| {
        // SAFETY: on success the driver returned a NUL-terminated static string.
        (ok == sys::CUresult::CUDA_SUCCESS && !p.is_null())
            .then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
    };
    match (read(named, name), read(described, text)) {
        (Some(name), Some(text)) => format!("{name} ({text})"),
        (Some(name), None) => name,
        (None, _) => format!("{result:?}"),
    }
}

/// A driver result as a `RuntimeError::CudaCall` naming the call and the device.
pub(crate) fn check(call: &'static str, device: &str, result: sys::CUresult) -> Result<(), RuntimeError> {
    match result {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        other => Err(RuntimeError::CudaCall { call, device: device.to_string(), result: describe(other) }),
    }
}

/// The driver's CUDA version, e.g. `(12, 8)`, for messages; `None` if it does not say.
pub(crate) fn driver_version() -> Option<(i32, i32)> {
    let mut version: c_int = 0;
    // SAFETY: writes one int; the driver is initialized by the time this is called.
    let result = unsafe { sys::cuDriverGetVersion(&mut version) };
    (result == sys::CUresult::CUDA_SUCCESS).then_some((version / 1000, (version % 1000) / 10))
}

/// Number of CUDA devices (the driver is initialized).
pub(crate) fn device_count() -> Result<usize, RuntimeError> {
    let mut count: c_int = 0;
    // SAFETY: writes one int; `init` succeeded.
    check("cuDeviceGetCount", "the CUDA driver", unsafe { sys::cuDeviceGetCount(&mut count) })?;
    Ok(usize::try_from(count).unwrap_or(0))
}

/// Reads device `index`'s identity and limits (the driver is initialized, `index` is below
/// [`device_count`]).
pub(crate) fn read_caps(index: usize) -> Result<(sys::CUdevice, DeviceCaps), RuntimeError> {
    use sys::CUdevice_attribute as A;
    let at = format!("cuda:{index}");
    let ordinal = c_int::try_from(index).map_err(|_| RuntimeError::NoDevice {
        selector: at.clone(),
        problem: "the index is too large".into(),
    })?;
    let mut device: sys::CUdevice = 0;
    // SAFETY: writes one handle; the ordinal is checked by the driver.
    check("cuDeviceGet", &at, unsafe { sys::cuDeviceGet(&mut device, ordinal) })?;
    let mut name = [0 as c_char; 256];
    // SAFETY: the buffer holds 256 chars and the driver writes at most `len` of them, NUL
    // included.
    check("cuDeviceGetName", &at, unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), 256, device) })?;
    // SAFETY: the driver NUL-terminated the name inside the buffer (it was zeroed as well).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }.to_string_lossy().trim().to_string();
    let mut memory: usize = 0;
    // SAFETY: writes one size.
    check("cuDeviceTotalMem", &at, unsafe { sys::cuDeviceTotalMem_v2(&mut memory, device) })?;
    let attribute = |attribute: A| -> Result<u32, RuntimeError> {
        let mut value: c_int = 0;
        // SAFETY: writes one int for a valid device and attribute.
        check("cuDeviceGetAttribute", &at, unsafe {
            sys::cuDeviceGetAttribute(&mut value, attribute, device)
        })?;
        Ok(u32::try_from(value).unwrap_or(0))
    };
    let info = CudaDeviceInfo {
        index,
        name,
        compute_capability: [
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ],
        memory_bytes: memory as u64,
        multiprocessors: attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        max_shared_bytes_per_block: attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
        max_shared_bytes_per_block_optin: attribute(
            A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
        )?,
        max_threads_per_block: attribute(A::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
    };
    let caps = DeviceCaps {
        label: format!("cuda:{index} ({})", info.name),
        max_block: [
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)?,
        ],
        max_grid: [
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
            attribute(A::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?,
        ],
        info,
    };
    Ok((device, caps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_a_reason() {
        let reason = probe(Some(OsStr::new("/nonexistent/libcuda.so.1"))).unwrap_err();
        assert!(reason.starts_with("cannot load /nonexistent/libcuda.so.1: "), "{reason}");
    }

    #[test]
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    fn a_library_without_the_driver_symbols_is_refused_by_name() {
        // glibc exists wherever this runs and has none of the driver's symbols.
        let reason = probe(Some(OsStr::new("libc.so.6"))).unwrap_err();
        assert!(reason.starts_with("libc.so.6 lacks cuInit, cuDriverGetVersion, "), "{reason}");
        assert!(reason.ends_with(": the NVIDIA driver is too old, update it"), "{reason}");
    }
}
