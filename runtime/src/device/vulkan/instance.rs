//! Finding a Vulkan device: the loader (`libvulkan.so.1`, opened at run time so the crate links
//! without Vulkan), one instance, each physical device's capabilities, and the logical device
//! with exactly the features a model needs.

use std::ffi::{CStr, OsStr};

use ash::vk;

use super::check::{DeviceCaps, Enabled, Features};
use super::vk_err;
use crate::device::VulkanDeviceInfo;
use crate::error::RuntimeError;

/// The highest Vulkan version the runtime asks for; it uses nothing newer.
const API_VERSION: u32 = vk::API_VERSION_1_3;

/// The loader and a Vulkan instance; destroyed on drop.
pub(crate) struct Instance {
    pub instance: ash::Instance,
    /// The Vulkan version the instance was created for: device features beyond it may not be
    /// used, whatever the device supports.
    api_version: u32,
    /// Keeps `libvulkan.so.1` loaded while the instance's function pointers are used.
    _entry: ash::Entry,
}

impl Instance {
    /// Opens the system's Vulkan loader (`library` overrides its path, for tests) and creates an
    /// instance of Vulkan 1.1 or newer.
    pub fn new(library: Option<&OsStr>) -> Result<Instance, RuntimeError> {
        let unavailable = |reason: String| RuntimeError::VulkanUnavailable { reason };
        // SAFETY: loading the Vulkan loader runs its initialisers; it is the system's Khronos
        // loader (or the library a test names), which is what a Vulkan program trusts.
        let entry = match library {
            Some(path) => unsafe { ash::Entry::load_from(path) },
            None => unsafe { ash::Entry::load() },
        }
        .map_err(|e| unavailable(format!("cannot load the Vulkan loader (libvulkan.so.1): {e}")))?;
        // SAFETY: the entry was just loaded; this is a plain query.
        let loader = unsafe { entry.try_enumerate_instance_version() }
            .map_err(|e| unavailable(format!("vkEnumerateInstanceVersion failed: {e}")))?
            .unwrap_or(vk::API_VERSION_1_0);
        if loader < vk::API_VERSION_1_1 {
            return Err(unavailable(format!(
                "the Vulkan loader supports Vulkan {}.{}, the runtime needs 1.1",
                vk::api_version_major(loader),
                vk::api_version_minor(loader)
            )));
        }
        let app = vk::ApplicationInfo::default()
            .application_name(c"kiln-runtime")
            .engine_name(c"kiln")
            .api_version(loader.min(API_VERSION));
        let api_version = loader.min(API_VERSION);
        let info = vk::InstanceCreateInfo::default().application_info(&app);
        // SAFETY: `info` and what it points to live across the call.
        let instance = unsafe { entry.create_instance(&info, None) }
            .map_err(|e| unavailable(format!("vkCreateInstance failed: {e}")))?;
        Ok(Instance { instance, api_version, _entry: entry })
    }

    /// Every physical device, in the driver's order (`vulkan:N` is the N-th).
    pub fn physical_devices(&self) -> Result<Vec<Physical>, RuntimeError> {
        // SAFETY: a query on a live instance.
        let handles = unsafe { self.instance.enumerate_physical_devices() }.map_err(|e| {
            RuntimeError::VulkanUnavailable { reason: format!("vkEnumeratePhysicalDevices failed: {e}") }
        })?;
        handles.into_iter().enumerate().map(|(index, handle)| self.physical(index, handle)).collect()
    }

    fn physical(&self, index: usize, handle: vk::PhysicalDevice) -> Result<Physical, RuntimeError> {
        let instance = &self.instance;
        // SAFETY: queries on a physical device of this live instance.
        let props = unsafe { instance.get_physical_device_properties(handle) };
        let name = props
            .device_name_as_c_str()
            .map_or("unnamed device".into(), |n| n.to_string_lossy().into_owned());
        // What the runtime may use of the device: its version, capped by the instance's.
        let api_version = props.api_version.min(self.api_version);
        let at_least = |minor: u32| api_version >= vk::make_api_version(0, 1, minor, 0);
        // SAFETY: as above.
        let extensions =
            unsafe { instance.enumerate_device_extension_properties(handle) }.unwrap_or_default();
        let has_ext = |wanted: &CStr| extensions.iter().any(|e| e.extension_name_as_c_str() == Ok(wanted));
        let has_8bit_storage_ext =
            has_ext(ash::khr::_8bit_storage::NAME) && has_ext(ash::khr::storage_buffer_storage_class::NAME);
        let has_float16_int8_ext = has_ext(ash::khr::shader_float16_int8::NAME);

        let mut subgroup = vk::PhysicalDeviceSubgroupProperties::default();
        let mut size_control = vk::PhysicalDeviceSubgroupSizeControlProperties::default();
        let mut f16_8 = vk::PhysicalDeviceShaderFloat16Int8Features::default();
        let mut storage8 = vk::PhysicalDevice8BitStorageFeatures::default();
        let mut storage16 = vk::PhysicalDevice16BitStorageFeatures::default();
        let mut size_control_features = vk::PhysicalDeviceSubgroupSizeControlFeatures::default();
        let mut features = vk::PhysicalDeviceFeatures2::default();
        if at_least(1) {
            let mut props2 = vk::PhysicalDeviceProperties2::default().push_next(&mut subgroup);
            if at_least(3) {
                props2 = props2.push_next(&mut size_control);
            }
            features = features.push_next(&mut storage16);
            if at_least(2) || has_8bit_storage_ext {
                features = features.push_next(&mut storage8);
            }
            if at_least(2) || has_float16_int8_ext {
                features = features.push_next(&mut f16_8);
            }
            if at_least(3) {
                features = features.push_next(&mut size_control_features);
            }
            // SAFETY: the chained structs are core in the device's version or backed by the
            // extensions it reports, and live across the calls.
            unsafe {
                instance.get_physical_device_properties2(handle, &mut props2);
                instance.get_physical_device_features2(handle, &mut features);
            }
        } else {
            // SAFETY: a core 1.0 query.
            features.features = unsafe { instance.get_physical_device_features(handle) };
        }
        let core = features.features;
        let limits = props.limits;
        // SAFETY: a query on a physical device of this live instance.
        let families = unsafe { instance.get_physical_device_queue_family_properties(handle) };
        let compute_queue = families
            .iter()
            .position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE) && f.queue_count > 0)
            .map(|i| (i as u32, families[i].timestamp_valid_bits));
        let size_control_compute = size_control_features.subgroup_size_control == vk::TRUE
            && size_control.required_subgroup_size_stages.contains(vk::ShaderStageFlags::COMPUTE);
        let label = format!("vulkan:{index} ({name})");
        let caps = DeviceCaps {
            label,
            api_version,
            min_storage_buffer_offset_alignment: limits.min_storage_buffer_offset_alignment,
            max_storage_buffer_range: limits.max_storage_buffer_range,
            max_per_stage_storage_buffers: limits.max_per_stage_descriptor_storage_buffers,
            max_compute_shared_memory: limits.max_compute_shared_memory_size,
            max_workgroup_invocations: limits.max_compute_work_group_invocations,
            max_workgroup_size: limits.max_compute_work_group_size,
            max_workgroup_count: limits.max_compute_work_group_count,
            timestamp_period: limits.timestamp_period,
            features: Features {
                int64: core.shader_int64 == vk::TRUE,
                float64: core.shader_float64 == vk::TRUE,
                int16: core.shader_int16 == vk::TRUE,
                int8: f16_8.shader_int8 == vk::TRUE,
                float16: f16_8.shader_float16 == vk::TRUE,
                storage_buffer_8bit: storage8.storage_buffer8_bit_access == vk::TRUE,
                storage_buffer_16bit: storage16.storage_buffer16_bit_access == vk::TRUE,
                subgroup_size_control: size_control_compute,
            },
            subgroup_size: subgroup.subgroup_size,
            subgroup_compute: subgroup.supported_stages.contains(vk::ShaderStageFlags::COMPUTE),
            subgroup_ops: subgroup.supported_operations,
            subgroup_size_range: size_control_compute
                .then_some((size_control.min_subgroup_size, size_control.max_subgroup_size)),
            max_compute_workgroup_subgroups: size_control.max_compute_workgroup_subgroups,
            compute_queue,
        };
        let info = VulkanDeviceInfo {
            index,
            name,
            device_type: type_name(props.device_type).to_string(),
            api_version: format!(
                "{}.{}.{}",
                vk::api_version_major(props.api_version),
                vk::api_version_minor(props.api_version),
                vk::api_version_patch(props.api_version)
            ),
            subgroup_size: subgroup.subgroup_size,
            max_shared_bytes: limits.max_compute_shared_memory_size,
            max_workgroup_invocations: limits.max_compute_work_group_invocations,
            compute: compute_queue.is_some(),
        };
        let preferred = matches!(
            props.device_type,
            vk::PhysicalDeviceType::DISCRETE_GPU | vk::PhysicalDeviceType::INTEGRATED_GPU
        );
        Ok(Physical { handle, caps, info, preferred })
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every object made from the instance (the `Gpu`) is dropped before it: the
        // backend declares its `Gpu` before its `Instance`, and fields drop in order.
        unsafe { self.instance.destroy_instance(None) };
    }
}

/// One physical device and what it offers.
pub(crate) struct Physical {
    pub handle: vk::PhysicalDevice,
    pub caps: DeviceCaps,
    pub info: VulkanDeviceInfo,
    /// A discrete or integrated GPU, chosen before software and virtual devices.
    pub preferred: bool,
}

/// `VkPhysicalDeviceType` in words.
fn type_name(kind: vk::PhysicalDeviceType) -> &'static str {
    match kind {
        vk::PhysicalDeviceType::DISCRETE_GPU => "discrete GPU",
        vk::PhysicalDeviceType::INTEGRATED_GPU => "integrated GPU",
        vk::PhysicalDeviceType::VIRTUAL_GPU => "virtual GPU",
        vk::PhysicalDeviceType::CPU => "CPU (software)",
        _ => "other",
    }
}

/// A logical device with one compute queue; destroyed on drop.
pub(crate) struct Gpu {
    pub device: ash::Device,
    pub queue: vk::Queue,
    pub queue_family: u32,
}

impl Gpu {
    /// Creates the device with the compute queue and exactly the `enabled` features.
    pub fn new(instance: &Instance, physical: &Physical, enabled: &Enabled) -> Result<Gpu, RuntimeError> {
        let caps = &physical.caps;
        let (queue_family, _) = caps.compute_queue.ok_or_else(|| RuntimeError::DeviceLacks {
            need: "a compute queue".into(),
            device: caps.label.clone(),
            has: "has none".into(),
        })?;
        let api_1_2 = caps.api_version >= vk::API_VERSION_1_2;
        let want = enabled.features;
        let mut extensions: Vec<*const std::ffi::c_char> = Vec::new();
        if !api_1_2 && want.storage_buffer_8bit {
            extensions.push(ash::khr::_8bit_storage::NAME.as_ptr());
            extensions.push(ash::khr::storage_buffer_storage_class::NAME.as_ptr());
        }
        if !api_1_2 && (want.int8 || want.float16) {
            extensions.push(ash::khr::shader_float16_int8::NAME.as_ptr());
        }
        let flag = |on: bool| if on { vk::TRUE } else { vk::FALSE };
        let core = vk::PhysicalDeviceFeatures::default()
            .shader_int64(want.int64)
            .shader_float64(want.float64)
            .shader_int16(want.int16);
        let mut storage16 = vk::PhysicalDevice16BitStorageFeatures {
            storage_buffer16_bit_access: flag(want.storage_buffer_16bit),
            ..Default::default()
        };
        let mut storage8 = vk::PhysicalDevice8BitStorageFeatures {
            storage_buffer8_bit_access: flag(want.storage_buffer_8bit),
            ..Default::default()
        };
        let mut f16_8 = vk::PhysicalDeviceShaderFloat16Int8Features {
            shader_int8: flag(want.int8),
            shader_float16: flag(want.float16),
            ..Default::default()
        };
        let mut size_control = vk::PhysicalDeviceSubgroupSizeControlFeatures {
            subgroup_size_control: flag(want.subgroup_size_control),
            ..Default::default()
        };
        let mut features = vk::PhysicalDeviceFeatures2::default().features(core);
        if want.storage_buffer_16bit {
            features = features.push_next(&mut storage16);
        }
        if want.storage_buffer_8bit {
            features = features.push_next(&mut storage8);
        }
        if want.int8 || want.float16 {
            features = features.push_next(&mut f16_8);
        }
        if want.subgroup_size_control {
            features = features.push_next(&mut size_control);
        }
        let priorities = [1.0f32];
        let queues = [vk::DeviceQueueCreateInfo::default()
            .queue_family_index(queue_family)
            .queue_priorities(&priorities)];
        let info = vk::DeviceCreateInfo::default()
            .queue_create_infos(&queues)
            .enabled_extension_names(&extensions)
            .push_next(&mut features);
        // SAFETY: `info` and its chain live across the call; every enabled feature and extension
        // was found on this device by `check_target`/`physical`.
        let device = unsafe { instance.instance.create_device(physical.handle, &info, None) }
            .map_err(|e| vk_err("vkCreateDevice", &caps.label, e))?;
        // SAFETY: queue 0 of a family the device was created with.
        let queue = unsafe { device.get_device_queue(queue_family, 0) };
        Ok(Gpu { device, queue, queue_family })
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        // SAFETY: the backend's `Owned` objects, made from this device, are dropped before it
        // (declared first), and they wait for the device to be idle.
        unsafe { self.device.destroy_device(None) };
    }
}
