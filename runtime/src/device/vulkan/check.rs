//! The artifact's needs against one device's capabilities, as plain data so every refusal is
//! unit-tested without a GPU. `check_target` also decides which features device creation
//! enables: exactly those the manifest's capabilities need.

use ash::vk;

use crate::error::RuntimeError;
use crate::manifest::{Step, VulkanTarget};

/// What a physical device offers, read once from Vulkan (see `instance.rs`).
#[derive(Debug, Clone, Default)]
pub(crate) struct DeviceCaps {
    /// `vulkan:N (name)`, for messages.
    pub label: String,
    /// `VkPhysicalDeviceProperties::apiVersion`.
    pub api_version: u32,
    pub min_storage_buffer_offset_alignment: u64,
    pub max_storage_buffer_range: u32,
    pub max_per_stage_storage_buffers: u32,
    pub max_compute_shared_memory: u32,
    pub max_workgroup_invocations: u32,
    pub max_workgroup_size: [u32; 3],
    pub max_workgroup_count: [u32; 3],
    /// Nanoseconds per timestamp tick.
    pub timestamp_period: f32,
    pub features: Features,
    pub subgroup_size: u32,
    pub subgroup_compute: bool,
    pub subgroup_ops: vk::SubgroupFeatureFlags,
    /// `(min, max)` subgroup sizes a compute pipeline may require, when the device supports
    /// subgroup size control for compute shaders.
    pub subgroup_size_range: Option<(u32, u32)>,
    pub max_compute_workgroup_subgroups: u32,
    /// The first queue family with compute, and its `timestampValidBits`.
    pub compute_queue: Option<(u32, u32)>,
}

/// Shader features, as the device reports them or as device creation enables them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Features {
    pub int64: bool,
    pub float64: bool,
    pub int16: bool,
    pub int8: bool,
    pub float16: bool,
    pub storage_buffer_8bit: bool,
    pub storage_buffer_16bit: bool,
    pub subgroup_size_control: bool,
}

/// What device creation enables and pipeline creation asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Enabled {
    pub features: Features,
    /// A subgroup size pipelines must require (the target's, when it is not the default).
    pub required_subgroup_size: Option<u32>,
}

/// The device feature a SPIR-V capability needs.
enum Need {
    Nothing,
    Feature(&'static str, fn(&mut Features) -> &mut bool),
    Subgroup(vk::SubgroupFeatureFlags, &'static str),
}

fn need_of(capability: &str) -> Option<Need> {
    use vk::SubgroupFeatureFlags as S;
    Some(match capability {
        "Shader" | "Matrix" => Need::Nothing,
        "Int64" => Need::Feature("shaderInt64", |f| &mut f.int64),
        "Float64" => Need::Feature("shaderFloat64", |f| &mut f.float64),
        "Int16" => Need::Feature("shaderInt16", |f| &mut f.int16),
        "Int8" => Need::Feature("shaderInt8", |f| &mut f.int8),
        "Float16" => Need::Feature("shaderFloat16", |f| &mut f.float16),
        "StorageBuffer8BitAccess" => Need::Feature("storageBuffer8BitAccess", |f| &mut f.storage_buffer_8bit),
        "StorageBuffer16BitAccess" => {
            Need::Feature("storageBuffer16BitAccess", |f| &mut f.storage_buffer_16bit)
        }
        "GroupNonUniform" => Need::Subgroup(S::BASIC, "basic"),
        "GroupNonUniformArithmetic" => Need::Subgroup(S::ARITHMETIC, "arithmetic"),
        "GroupNonUniformShuffle" => Need::Subgroup(S::SHUFFLE, "shuffle"),
        "GroupNonUniformBallot" => Need::Subgroup(S::BALLOT, "ballot"),
        "GroupNonUniformVote" => Need::Subgroup(S::VOTE, "vote"),
        _ => return None,
    })
}

/// The Vulkan version a SPIR-V version needs (`"1.3"` → 1.1).
fn vulkan_for_spirv(spirv: &str) -> Option<(u32, u32)> {
    Some(match spirv.trim() {
        "1.0" | "1.1" | "1.2" | "1.3" => (1, 1),
        "1.4" | "1.5" => (1, 2),
        "1.6" => (1, 3),
        _ => return None,
    })
}

/// `"1.3"` as the SPIR-V header's `(major, minor)`.
pub(crate) fn spirv_version(target: &VulkanTarget) -> Option<(u32, u32)> {
    let (major, minor) = target.spirv_version.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn api(version: u32) -> (u32, u32) {
    (vk::api_version_major(version), vk::api_version_minor(version))
}

/// Checks the target against the device and returns what to enable.
pub(crate) fn check_target(target: &VulkanTarget, caps: &DeviceCaps) -> Result<Enabled, RuntimeError> {
    let lacks =
        |need: String, has: String| RuntimeError::DeviceLacks { need, device: caps.label.clone(), has };
    let device_api = api(caps.api_version);
    if device_api < (1, 1) {
        return Err(lacks("Vulkan 1.1".into(), format!("supports Vulkan {}.{}", device_api.0, device_api.1)));
    }
    let needed_api = vulkan_for_spirv(&target.spirv_version).ok_or_else(|| {
        RuntimeError::invalid(format!("unknown SPIR-V version {:?} (1.0 to 1.6)", target.spirv_version))
    })?;
    if device_api < needed_api {
        return Err(lacks(
            format!("SPIR-V {} (Vulkan {}.{})", target.spirv_version, needed_api.0, needed_api.1),
            format!("supports Vulkan {}.{}", device_api.0, device_api.1),
        ));
    }
    if caps.compute_queue.is_none() {
        return Err(lacks("a compute queue".into(), "has none".into()));
    }

    let mut enabled = Enabled::default();
    for capability in &target.capabilities {
        let need = need_of(capability).ok_or_else(|| {
            RuntimeError::invalid(format!(
                "capability {capability:?} is unknown to this runtime (it knows Shader, Int8, Int16, Int64, \
                 Float16, Float64, StorageBuffer8BitAccess, StorageBuffer16BitAccess and GroupNonUniform*)"
            ))
        })?;
        match need {
            Need::Nothing => {}
            Need::Feature(feature, field) => {
                let mut offered = caps.features;
                if !*field(&mut offered) {
                    return Err(lacks(
                        format!("SPIR-V capability {capability} (feature {feature})"),
                        format!("does not support {feature}"),
                    ));
                }
                *field(&mut enabled.features) = true;
            }
            Need::Subgroup(op, name) => {
                if !caps.subgroup_compute {
                    return Err(lacks(
                        format!("SPIR-V capability {capability}"),
                        "has no subgroup operations in compute shaders".into(),
                    ));
                }
                if !caps.subgroup_ops.contains(op) {
                    return Err(lacks(
                        format!("SPIR-V capability {capability}"),
                        format!("does not support {name} subgroup operations"),
                    ));
                }
            }
        }
    }

    let align = caps.min_storage_buffer_offset_alignment.max(1);
    if target.buffer_align == 0 || !target.buffer_align.is_multiple_of(align) {
        return Err(lacks(
            format!("buffer_align {}", target.buffer_align),
            format!("needs storage-buffer offsets aligned to {align}, which must divide it"),
        ));
    }
    if target.max_workgroup_invocations > caps.max_workgroup_invocations {
        return Err(lacks(
            format!("workgroups of {} invocations", target.max_workgroup_invocations),
            format!("allows at most {} (maxComputeWorkGroupInvocations)", caps.max_workgroup_invocations),
        ));
    }
    if target.max_shared_bytes > caps.max_compute_shared_memory {
        return Err(lacks(
            format!("{} bytes of workgroup memory", target.max_shared_bytes),
            format!("has {} (maxComputeSharedMemorySize)", caps.max_compute_shared_memory),
        ));
    }
    if let Some(size) = target.subgroup_size {
        if size != caps.subgroup_size {
            match caps.subgroup_size_range {
                Some((min, max)) if size.is_power_of_two() && (min..=max).contains(&size) => {
                    if target.max_workgroup_invocations
                        > size.saturating_mul(caps.max_compute_workgroup_subgroups)
                    {
                        return Err(lacks(
                            format!(
                                "subgroups of {size} in workgroups of {} invocations",
                                target.max_workgroup_invocations
                            ),
                            format!(
                                "allows at most {} subgroups per workgroup",
                                caps.max_compute_workgroup_subgroups
                            ),
                        ));
                    }
                    enabled.features.subgroup_size_control = true;
                    enabled.required_subgroup_size = Some(size);
                }
                Some((min, max)) => {
                    return Err(lacks(
                        format!("subgroup size {size}"),
                        format!("runs subgroups of {} and can require {min} to {max}", caps.subgroup_size),
                    ))
                }
                None => {
                    return Err(lacks(
                        format!("subgroup size {size}"),
                        format!("runs subgroups of {} (without subgroup size control)", caps.subgroup_size),
                    ))
                }
            }
        }
    }
    Ok(enabled)
}

/// Checks one GPU step's launch shape and argument count against the device and the target.
pub(crate) fn check_launch(
    step: &Step,
    grid: [u32; 3],
    workgroup: [u32; 3],
    target: &VulkanTarget,
    caps: &DeviceCaps,
) -> Result<(), RuntimeError> {
    let at = &step.label;
    let lacks =
        |need: String, has: String| RuntimeError::DeviceLacks { need, device: caps.label.clone(), has };
    if grid.contains(&0) || workgroup.contains(&0) {
        return Err(RuntimeError::invalid(format!(
            "step {at:?} has grid {grid:?} and workgroup {workgroup:?}: every extent must be at least 1"
        )));
    }
    for axis in 0..3 {
        if grid[axis] > caps.max_workgroup_count[axis] {
            return Err(lacks(
                format!("step {at:?} to launch grid {grid:?}"),
                format!(
                    "allows at most {:?} workgroups (maxComputeWorkGroupCount)",
                    caps.max_workgroup_count
                ),
            ));
        }
        if workgroup[axis] > caps.max_workgroup_size[axis] {
            return Err(lacks(
                format!("step {at:?} to use workgroup {workgroup:?}"),
                format!("allows at most {:?} (maxComputeWorkGroupSize)", caps.max_workgroup_size),
            ));
        }
    }
    let invocations = workgroup.iter().map(|&n| u64::from(n)).product::<u64>();
    if invocations > u64::from(target.max_workgroup_invocations) {
        return Err(RuntimeError::invalid(format!(
            "step {at:?} has workgroup {workgroup:?} ({invocations} invocations), more than the target's \
             max_workgroup_invocations {}",
            target.max_workgroup_invocations
        )));
    }
    if invocations > u64::from(caps.max_workgroup_invocations) {
        return Err(lacks(
            format!("step {at:?} to run {invocations} invocations per workgroup"),
            format!("allows at most {} (maxComputeWorkGroupInvocations)", caps.max_workgroup_invocations),
        ));
    }
    if step.args.len() > caps.max_per_stage_storage_buffers as usize {
        return Err(lacks(
            format!("step {at:?} to bind {} storage buffers", step.args.len()),
            format!(
                "allows at most {} (maxPerStageDescriptorStorageBuffers)",
                caps.max_per_stage_storage_buffers
            ),
        ));
    }
    Ok(())
}

/// Checks that one binding's range fits the device's storage-buffer range.
pub(crate) fn check_range(
    step: &Step,
    arg: usize,
    range: u64,
    caps: &DeviceCaps,
) -> Result<(), RuntimeError> {
    if range > u64::from(caps.max_storage_buffer_range) {
        return Err(RuntimeError::DeviceLacks {
            need: format!("step {:?} to bind {range} bytes at binding {arg}", step.label),
            device: caps.label.clone(),
            has: format!("allows at most {} (maxStorageBufferRange)", caps.max_storage_buffer_range),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BufRef, Dispatch};

    /// A device like lavapipe: Vulkan 1.3, no 16-bit integers, subgroups of 8.
    pub(crate) fn lavapipe_like() -> DeviceCaps {
        DeviceCaps {
            label: "vulkan:0 (test device)".into(),
            api_version: vk::make_api_version(0, 1, 3, 230),
            min_storage_buffer_offset_alignment: 16,
            max_storage_buffer_range: 1 << 27,
            max_per_stage_storage_buffers: 8,
            max_compute_shared_memory: 32768,
            max_workgroup_invocations: 1024,
            max_workgroup_size: [1024, 1024, 64],
            max_workgroup_count: [65535, 65535, 65535],
            timestamp_period: 1.0,
            features: Features {
                int64: true,
                float64: true,
                int16: false,
                int8: true,
                float16: true,
                storage_buffer_8bit: true,
                storage_buffer_16bit: true,
                subgroup_size_control: true,
            },
            subgroup_size: 8,
            subgroup_compute: true,
            subgroup_ops: vk::SubgroupFeatureFlags::BASIC | vk::SubgroupFeatureFlags::ARITHMETIC,
            subgroup_size_range: Some((4, 16)),
            max_compute_workgroup_subgroups: 32,
            compute_queue: Some((0, 64)),
        }
    }

    fn target(capabilities: &[&str]) -> VulkanTarget {
        VulkanTarget {
            spirv_version: "1.3".into(),
            capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
            buffer_align: 256,
            max_workgroup_invocations: 256,
            max_shared_bytes: 4096,
            subgroup_size: None,
        }
    }

    fn err(target: &VulkanTarget, caps: &DeviceCaps) -> String {
        check_target(target, caps).unwrap_err().to_string()
    }

    #[test]
    fn enables_exactly_the_needed_features() {
        let caps = lavapipe_like();
        let enabled = check_target(
            &target(&["Shader", "Int64", "StorageBuffer8BitAccess", "GroupNonUniformArithmetic"]),
            &caps,
        )
        .unwrap();
        let expected = Features { int64: true, storage_buffer_8bit: true, ..Features::default() };
        assert_eq!(enabled, Enabled { features: expected, required_subgroup_size: None });
    }

    #[test]
    fn refuses_what_the_device_lacks() {
        let caps = lavapipe_like();
        assert_eq!(
            err(&target(&["Int16"]), &caps),
            "the artifact needs SPIR-V capability Int16 (feature shaderInt16), but device vulkan:0 (test device) \
             does not support shaderInt16"
        );
        assert!(err(&target(&["GroupNonUniformShuffle"]), &caps)
            .ends_with("does not support shuffle subgroup operations"));
        let e = err(&target(&["Int128"]), &caps);
        assert!(e.starts_with("invalid manifest: capability \"Int128\" is unknown to this runtime"), "{e}");

        let mut t = target(&[]);
        t.buffer_align = 24;
        assert!(err(&t, &caps).contains(
            "buffer_align 24, but device vulkan:0 (test device) needs storage-buffer offsets aligned to 16"
        ));
        t.buffer_align = 0;
        assert!(err(&t, &caps).contains("buffer_align 0"));
        let mut t = target(&[]);
        t.max_workgroup_invocations = 2048;
        assert!(err(&t, &caps).contains("allows at most 1024 (maxComputeWorkGroupInvocations)"));
        let mut t = target(&[]);
        t.max_shared_bytes = 65536;
        assert!(err(&t, &caps)
            .contains("65536 bytes of workgroup memory, but device vulkan:0 (test device) has 32768"));
        let mut t = target(&[]);
        t.spirv_version = "1.6".into();
        let mut old = caps.clone();
        old.api_version = vk::make_api_version(0, 1, 2, 0);
        assert!(err(&t, &old)
            .contains("SPIR-V 1.6 (Vulkan 1.3), but device vulkan:0 (test device) supports Vulkan 1.2"));
        t.spirv_version = "2.0".into();
        assert!(err(&t, &caps).contains("unknown SPIR-V version \"2.0\""));
        let mut none = caps.clone();
        none.compute_queue = None;
        assert!(err(&target(&[]), &none).contains("a compute queue"));
    }

    #[test]
    fn subgroup_sizes_are_matched_or_required() {
        let mut caps = lavapipe_like();
        let mut t = target(&[]);
        t.subgroup_size = Some(8);
        assert_eq!(check_target(&t, &caps).unwrap().required_subgroup_size, None);
        t.subgroup_size = Some(16);
        let enabled = check_target(&t, &caps).unwrap();
        assert_eq!(enabled.required_subgroup_size, Some(16));
        assert!(enabled.features.subgroup_size_control);
        t.subgroup_size = Some(32);
        assert!(err(&t, &caps).contains("runs subgroups of 8 and can require 4 to 16"));
        caps.subgroup_size_range = None;
        assert!(err(&t, &caps).contains("subgroup size 32, but device vulkan:0 (test device) runs subgroups of 8 (without subgroup size control)"));
    }

    #[test]
    fn launches_are_checked() {
        let caps = lavapipe_like();
        let t = target(&[]);
        let mut step = Step {
            symbol: "main".into(),
            label: "k0".into(),
            args: vec![BufRef::Arena { offset: 0, bytes: 4 }; 3],
            dispatch: Dispatch::gpu_fixed(0, [1, 1, 1], [64, 1, 1]),
            flops: 0,
            bytes: 0,
        };
        assert!(check_launch(&step, [4, 1, 1], [64, 1, 1], &t, &caps).is_ok());
        let e = check_launch(&step, [0, 1, 1], [64, 1, 1], &t, &caps).unwrap_err().to_string();
        assert!(e.contains("every extent must be at least 1"), "{e}");
        let e = check_launch(&step, [70000, 1, 1], [64, 1, 1], &t, &caps).unwrap_err().to_string();
        assert!(e.contains("maxComputeWorkGroupCount"), "{e}");
        let e = check_launch(&step, [1, 1, 1], [1, 1, 128], &t, &caps).unwrap_err().to_string();
        assert!(e.contains("maxComputeWorkGroupSize"), "{e}");
        let e = check_launch(&step, [1, 1, 1], [512, 1, 1], &t, &caps).unwrap_err().to_string();
        assert!(e.contains("more than the target's max_workgroup_invocations 256"), "{e}");
        step.args = vec![BufRef::Arena { offset: 0, bytes: 4 }; 9];
        let e = check_launch(&step, [1, 1, 1], [64, 1, 1], &t, &caps).unwrap_err().to_string();
        assert!(e.contains("bind 9 storage buffers") && e.contains("at most 8"), "{e}");
        let e = check_range(&step, 2, 1 << 28, &caps).unwrap_err().to_string();
        assert!(e.contains("maxStorageBufferRange"), "{e}");
    }
}
