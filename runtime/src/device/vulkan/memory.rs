//! Vulkan objects a model owns, destroyed together in dependency order (`Owned`), and buffers
//! with their memory: device-local for the arena and weights, host-visible and persistently
//! mapped for inputs and outputs.

use std::ptr::NonNull;

use ash::vk;

use super::vk_err;
use crate::error::RuntimeError;

/// Every object created from the device, so that a load failing half-way and a dropped model
/// free the same way.
pub(crate) struct Owned {
    device: ash::Device,
    pub fences: Vec<vk::Fence>,
    pub command_pools: Vec<vk::CommandPool>,
    pub query_pools: Vec<vk::QueryPool>,
    pub descriptor_pools: Vec<vk::DescriptorPool>,
    pub pipelines: Vec<vk::Pipeline>,
    pub pipeline_layouts: Vec<vk::PipelineLayout>,
    pub set_layouts: Vec<vk::DescriptorSetLayout>,
    pub shader_modules: Vec<vk::ShaderModule>,
    pub buffers: Vec<vk::Buffer>,
    pub memories: Vec<vk::DeviceMemory>,
}

impl Owned {
    pub fn new(device: &ash::Device) -> Owned {
        Owned {
            device: device.clone(),
            fences: Vec::new(),
            command_pools: Vec::new(),
            query_pools: Vec::new(),
            descriptor_pools: Vec::new(),
            pipelines: Vec::new(),
            pipeline_layouts: Vec::new(),
            set_layouts: Vec::new(),
            shader_modules: Vec::new(),
            buffers: Vec::new(),
            memories: Vec::new(),
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let d = &self.device;
        // SAFETY: each handle was created from `d` and is destroyed once, here. Waiting for the
        // device first means no submitted work still uses them; users (command buffers) go
        // before what they use (pipelines, sets, buffers), and memory last (freeing it unmaps).
        unsafe {
            // A lost device cannot be waited on; everything is destroyed all the same.
            let _ = d.device_wait_idle();
            self.fences.drain(..).for_each(|h| d.destroy_fence(h, None));
            self.command_pools.drain(..).for_each(|h| d.destroy_command_pool(h, None));
            self.query_pools.drain(..).for_each(|h| d.destroy_query_pool(h, None));
            self.descriptor_pools.drain(..).for_each(|h| d.destroy_descriptor_pool(h, None));
            self.pipelines.drain(..).for_each(|h| d.destroy_pipeline(h, None));
            self.pipeline_layouts.drain(..).for_each(|h| d.destroy_pipeline_layout(h, None));
            self.set_layouts.drain(..).for_each(|h| d.destroy_descriptor_set_layout(h, None));
            self.shader_modules.drain(..).for_each(|h| d.destroy_shader_module(h, None));
            self.buffers.drain(..).for_each(|h| d.destroy_buffer(h, None));
            self.memories.drain(..).for_each(|h| d.free_memory(h, None));
        }
    }
}

/// A pointer to persistently mapped, host-coherent memory.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mapped(NonNull<u8>);

// SAFETY: the mapping belongs to memory the model owns and is only touched through `&mut` model
// methods, between submissions that the model waits for; the pointer itself is thread-agnostic.
unsafe impl Send for Mapped {}
// SAFETY: shared access never writes through it (see `Send`).
unsafe impl Sync for Mapped {}

impl Mapped {
    pub fn as_ptr(self) -> *mut u8 {
        self.0.as_ptr()
    }
}

impl Owned {
    /// Destroys `buffer` and frees its memory now (the staging buffer, once the upload it
    /// served has completed) instead of with the model.
    pub fn free(&mut self, buffer: Buffer) {
        self.buffers.retain(|&b| b != buffer.buffer);
        self.memories.retain(|&m| m != buffer.memory);
        // SAFETY: both were created from this device by `buffer()` and are no longer in
        // `self`, so they are destroyed once; the caller waited for the work that used them.
        unsafe {
            self.device.destroy_buffer(buffer.buffer, None);
            self.device.free_memory(buffer.memory, None);
        }
    }
}

/// Where a buffer's memory should live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Fastest for the device, never mapped (the arena).
    Device,
    /// Device-local, and mapped when such memory can also be host-visible and coherent
    /// (lavapipe, resizable-BAR GPUs), so the weights need no staging copy.
    DeviceMappable,
    /// Host-visible and coherent, mapped (inputs, outputs, staging).
    Host,
}

/// A buffer, its memory, and the mapping when the memory is host-visible.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buffer {
    pub buffer: vk::Buffer,
    memory: vk::DeviceMemory,
    pub size: u64,
    pub mapped: Option<Mapped>,
}

/// Creates a buffer of `size` bytes bound to fresh memory per `placement`, recording both in
/// `owned`.
pub(crate) fn buffer(
    owned: &mut Owned,
    props: &vk::PhysicalDeviceMemoryProperties,
    label: &str,
    size: u64,
    usage: vk::BufferUsageFlags,
    placement: Placement,
) -> Result<Buffer, RuntimeError> {
    let d = owned.device.clone();
    let info =
        vk::BufferCreateInfo::default().size(size).usage(usage).sharing_mode(vk::SharingMode::EXCLUSIVE);
    // SAFETY: a valid create info for a live device.
    let buffer = unsafe { d.create_buffer(&info, None) }.map_err(|e| vk_err("vkCreateBuffer", label, e))?;
    owned.buffers.push(buffer);
    // SAFETY: a buffer of this device.
    let needs = unsafe { d.get_buffer_memory_requirements(buffer) };
    let host = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
    let wanted: Vec<vk::MemoryPropertyFlags> = match placement {
        Placement::Device => vec![vk::MemoryPropertyFlags::DEVICE_LOCAL, vk::MemoryPropertyFlags::empty()],
        Placement::DeviceMappable => vec![
            vk::MemoryPropertyFlags::DEVICE_LOCAL | host,
            vk::MemoryPropertyFlags::DEVICE_LOCAL,
            vk::MemoryPropertyFlags::empty(),
        ],
        Placement::Host => vec![host],
    };
    let (type_index, flags) = wanted
        .iter()
        .find_map(|&want| memory_type(props, needs.memory_type_bits, want))
        .ok_or_else(|| RuntimeError::DeviceLacks {
            need: format!("memory of kind {wanted:?} for a buffer of {size} bytes"),
            device: label.to_string(),
            has: "offers none".to_string(),
        })?;
    let alloc = vk::MemoryAllocateInfo::default().allocation_size(needs.size).memory_type_index(type_index);
    // SAFETY: a valid allocate info for a live device.
    let memory =
        unsafe { d.allocate_memory(&alloc, None) }.map_err(|e| vk_err("vkAllocateMemory", label, e))?;
    owned.memories.push(memory);
    // SAFETY: the memory was allocated for this buffer's requirements and is unbound.
    unsafe { d.bind_buffer_memory(buffer, memory, 0) }.map_err(|e| vk_err("vkBindBufferMemory", label, e))?;
    let mapped = if placement != Placement::Device && flags.contains(host) {
        // SAFETY: host-visible memory, mapped once for its whole life (freed memory is unmapped).
        let ptr = unsafe { d.map_memory(memory, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty()) }
            .map_err(|e| vk_err("vkMapMemory", label, e))?;
        NonNull::new(ptr.cast::<u8>()).map(Mapped)
    } else {
        None
    };
    Ok(Buffer { buffer, memory, size, mapped })
}

/// The first memory type allowed by `bits` whose flags include `want`, with its flags.
fn memory_type(
    props: &vk::PhysicalDeviceMemoryProperties,
    bits: u32,
    want: vk::MemoryPropertyFlags,
) -> Option<(u32, vk::MemoryPropertyFlags)> {
    let count = (props.memory_type_count as usize).min(props.memory_types.len());
    props.memory_types[..count]
        .iter()
        .enumerate()
        .find(|(i, t)| bits & (1 << i) != 0 && t.property_flags.contains(want))
        .map(|(i, t)| (i as u32, t.property_flags))
}

/// Copies `bytes` into a mapped buffer at `offset`.
///
/// # Safety
///
/// `mapped` must map at least `offset + bytes.len()` bytes that no submitted work is using.
pub(crate) unsafe fn write(mapped: Mapped, offset: u64, bytes: &[u8]) {
    // SAFETY: per the contract; the source is a borrowed slice, disjoint from device memory.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), mapped.as_ptr().add(offset as usize), bytes.len())
    }
}

/// Copies mapped bytes at `offset` into `out`.
///
/// # Safety
///
/// `mapped` must map at least `offset + out.len()` bytes that no submitted work is writing.
pub(crate) unsafe fn read(mapped: Mapped, offset: u64, out: &mut [u8]) {
    // SAFETY: per the contract.
    unsafe {
        std::ptr::copy_nonoverlapping(mapped.as_ptr().add(offset as usize), out.as_mut_ptr(), out.len())
    }
}
