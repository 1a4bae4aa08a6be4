//! The artifact's needs against one CUDA device's limits, as plain data so every refusal is
//! unit-tested without a GPU: compute capability, block size, shared memory, and each step's
//! grid and block against the device's maximum dimensions.

use super::plan::StepPlan;
use crate::device::CudaDeviceInfo;
use crate::error::RuntimeError;
use crate::manifest::CudaTarget;

/// What a CUDA device offers, read once from the driver (see `driver.rs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceCaps {
    /// `cuda:N (name)`, for messages.
    pub label: String,
    pub info: CudaDeviceInfo,
    /// `MAX_BLOCK_DIM_{X,Y,Z}`.
    pub max_block: [u32; 3],
    /// `MAX_GRID_DIM_{X,Y,Z}`.
    pub max_grid: [u32; 3],
}

/// Checks the target against the device: a lower compute capability cannot run the PTX (the
/// driver JIT-compiles PTX only forward), and the target's largest block and shared memory must
/// fit the device's per-block limits. Shared memory past the static limit is dynamic shared
/// memory, which a function may be opted in to up to `MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
pub(crate) fn check_target(target: &CudaTarget, caps: &DeviceCaps) -> Result<(), RuntimeError> {
    let info = &caps.info;
    let other = target.arch_specific && info.compute_capability != target.compute_capability;
    if info.compute_capability < target.compute_capability || other {
        return Err(RuntimeError::CudaArch {
            compiled: target.arch(),
            device: format!("{} ({})", info.index, info.name),
            found: info.arch(),
        });
    }
    let lacks =
        |need: String, has: String| RuntimeError::DeviceLacks { need, device: caps.label.clone(), has };
    if target.max_workgroup_invocations > info.max_threads_per_block {
        return Err(lacks(
            format!("blocks of {} threads", target.max_workgroup_invocations),
            format!("allows at most {} (MAX_THREADS_PER_BLOCK)", info.max_threads_per_block),
        ));
    }
    if target.max_shared_bytes > info.max_shared_bytes_per_block {
        let need = format!("{} bytes of shared memory per block", target.max_shared_bytes);
        // A device whose opt-in limit is no more than the static one offers nothing past it.
        if info.max_shared_bytes_per_block_optin <= info.max_shared_bytes_per_block {
            return Err(lacks(
                need,
                format!("has {} (MAX_SHARED_MEMORY_PER_BLOCK)", info.max_shared_bytes_per_block),
            ));
        }
        if target.max_shared_bytes > info.max_shared_bytes_per_block_optin {
            return Err(lacks(
                need,
                format!(
                    "has {} even opted in (MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)",
                    info.max_shared_bytes_per_block_optin
                ),
            ));
        }
    }
    Ok(())
}

/// Checks one step's grid and block against the device's maximum dimensions (the plan already
/// checked them against the target).
pub(crate) fn check_launch(step: &StepPlan, caps: &DeviceCaps) -> Result<(), RuntimeError> {
    let at = &step.label;
    let lacks =
        |need: String, has: String| RuntimeError::DeviceLacks { need, device: caps.label.clone(), has };
    for axis in 0..3 {
        if step.largest[axis] > caps.max_grid[axis] {
            return Err(lacks(
                format!("step {at:?} to launch grid {:?}", step.largest),
                format!("allows at most {:?} blocks (MAX_GRID_DIM_X/Y/Z)", caps.max_grid),
            ));
        }
        if step.block[axis] > caps.max_block[axis] {
            return Err(lacks(
                format!("step {at:?} to use blocks of {:?}", step.block),
                format!("allows at most {:?} (MAX_BLOCK_DIM_X/Y/Z)", caps.max_block),
            ));
        }
    }
    let threads = step.block.iter().map(|&n| u64::from(n)).product::<u64>();
    if threads > u64::from(caps.info.max_threads_per_block) {
        return Err(lacks(
            format!("step {at:?} to run {threads} threads per block"),
            format!("allows at most {} (MAX_THREADS_PER_BLOCK)", caps.info.max_threads_per_block),
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A device like an A100: sm_80, 48 KiB of static shared memory per block, 163 KiB opted
    /// in.
    pub(crate) fn a100_like() -> DeviceCaps {
        DeviceCaps {
            label: "cuda:0 (NVIDIA A100-SXM4-80GB)".into(),
            info: CudaDeviceInfo {
                index: 0,
                name: "NVIDIA A100-SXM4-80GB".into(),
                compute_capability: [8, 0],
                memory_bytes: 80 << 30,
                multiprocessors: 108,
                max_shared_bytes_per_block: 49152,
                max_shared_bytes_per_block_optin: 166912,
                max_threads_per_block: 1024,
            },
            max_block: [1024, 1024, 64],
            max_grid: [2_147_483_647, 65535, 65535],
        }
    }

    pub(crate) fn target(major: u32, minor: u32) -> CudaTarget {
        CudaTarget {
            precision: "f32".into(),
            tensor_cores: Vec::new(),
            compute_capability: [major, minor],
            ptx_version: "7.0".into(),
            buffer_align: 256,
            max_workgroup_invocations: 256,
            max_shared_bytes: 1024,
            cubins: vec![],
            arch_specific: false,
        }
    }

    #[test]
    fn compute_capability_must_not_be_lower() {
        let caps = a100_like();
        check_target(&target(8, 0), &caps).unwrap();
        check_target(&target(7, 5), &caps).unwrap();
        assert_eq!(
            check_target(&target(9, 0), &caps).unwrap_err().to_string(),
            "this artifact was compiled for sm_90; CUDA device 0 (NVIDIA A100-SXM4-80GB) is sm_80: recompile \
             with --target cuda:sm_80"
        );
        // sm_86 is newer than sm_80 within the same major version.
        assert!(matches!(check_target(&target(8, 6), &caps), Err(RuntimeError::CudaArch { .. })));
    }

    #[test]
    fn architecture_specific_kernels_need_that_very_architecture() {
        let caps = a100_like();
        let own = CudaTarget { arch_specific: true, ..target(8, 0) };
        check_target(&own, &caps).unwrap();
        let older = CudaTarget { arch_specific: true, ..target(7, 5) };
        assert_eq!(
            check_target(&older, &caps).unwrap_err().to_string(),
            "this artifact was compiled for sm_75a; CUDA device 0 (NVIDIA A100-SXM4-80GB) is sm_80: recompile \
             with --target cuda:sm_80"
        );
    }

    #[test]
    fn blocks_fit_the_thread_limit() {
        let caps = a100_like();
        let mut big = target(8, 0);
        big.max_workgroup_invocations = 2048;
        assert_eq!(
            check_target(&big, &caps).unwrap_err().to_string(),
            "the artifact needs blocks of 2048 threads, but device cuda:0 (NVIDIA A100-SXM4-80GB) allows at \
             most 1024 (MAX_THREADS_PER_BLOCK)"
        );
    }

    #[test]
    fn shared_memory_past_the_static_limit_needs_the_opt_in_limit() {
        let mut caps = a100_like();
        let mut shared = target(8, 0);
        // Static shared memory up to the limit, and dynamic shared memory up to the opt-in one.
        for bytes in [49152, 49153, 65536, 166912] {
            shared.max_shared_bytes = bytes;
            check_target(&shared, &caps).unwrap();
        }
        shared.max_shared_bytes = 166913;
        assert_eq!(
            check_target(&shared, &caps).unwrap_err().to_string(),
            "the artifact needs 166913 bytes of shared memory per block, but device cuda:0 \
             (NVIDIA A100-SXM4-80GB) has 166912 even opted in (MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)"
        );
        // A device that offers nothing past the static limit refuses as before.
        caps.info.max_shared_bytes_per_block_optin = 49152;
        shared.max_shared_bytes = 65536;
        assert_eq!(
            check_target(&shared, &caps).unwrap_err().to_string(),
            "the artifact needs 65536 bytes of shared memory per block, but device cuda:0 \
             (NVIDIA A100-SXM4-80GB) has 49152 (MAX_SHARED_MEMORY_PER_BLOCK)"
        );
        shared.max_shared_bytes = 49152;
        check_target(&shared, &caps).unwrap();
    }

    #[test]
    fn launches_fit_the_device_dimensions() {
        let caps = a100_like();
        let step = |grid: [u32; 3], block: [u32; 3]| StepPlan {
            label: "k0 add".into(),
            module: 0,
            symbol: c"add".into(),
            grid: grid.map(|g| u64::from(g).into()),
            largest: grid,
            block,
            dynamic_shared_bytes: 0,
            args: vec![],
        };
        check_launch(&step([4, 1, 1], [256, 1, 1]), &caps).unwrap();
        assert_eq!(
            check_launch(&step([1, 70000, 1], [1, 1, 1]), &caps).unwrap_err().to_string(),
            "the artifact needs step \"k0 add\" to launch grid [1, 70000, 1], but device cuda:0 \
             (NVIDIA A100-SXM4-80GB) allows at most [2147483647, 65535, 65535] blocks (MAX_GRID_DIM_X/Y/Z)"
        );
        let e = check_launch(&step([1, 1, 1], [1, 1, 128]), &caps).unwrap_err().to_string();
        assert!(e.ends_with("allows at most [1024, 1024, 64] (MAX_BLOCK_DIM_X/Y/Z)"), "{e}");
        let e = check_launch(&step([1, 1, 1], [64, 32, 1]), &caps).unwrap_err().to_string();
        assert!(e.contains("to run 2048 threads per block"), "{e}");
    }
}
