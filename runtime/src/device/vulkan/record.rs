//! Command buffers, recorded once at load: the run (per step: bind pipeline, bind set, dispatch,
//! barrier) and, when the queue has timestamps, the same run with a timestamp after each step.
//! A run only submits one of them; nothing is recorded per run. When a kernel can fault, the
//! run also fills the fault words before the first step and copies them into the io buffer
//! after the last, so the host reads them with the outputs.

use ash::vk;

use super::memory::Owned;
use super::pipelines::Pipeline;
use super::plan::{EntryPlan, FaultWords, INDIRECT_BYTES};
use super::vk_err;
use crate::error::RuntimeError;

/// Makes earlier writes (previous steps, the previous run, host input copies, the upload)
/// visible to the next step's reads and writes.
fn barrier_before_step(device: &ash::Device, cb: vk::CommandBuffer, first: bool) {
    let (src_stage, src_access) = if first {
        (
            vk::PipelineStageFlags::COMPUTE_SHADER
                | vk::PipelineStageFlags::HOST
                | vk::PipelineStageFlags::TRANSFER,
            vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::HOST_WRITE | vk::AccessFlags::TRANSFER_WRITE,
        )
    } else {
        (vk::PipelineStageFlags::COMPUTE_SHADER, vk::AccessFlags::SHADER_WRITE)
    };
    let barrier = vk::MemoryBarrier::default()
        .src_access_mask(src_access)
        .dst_access_mask(vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE);
    // SAFETY: `cb` is in the recording state; the barrier only names core stages and accesses.
    unsafe {
        device.cmd_pipeline_barrier(
            cb,
            src_stage,
            vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::DependencyFlags::empty(),
            &[barrier],
            &[],
            &[],
        )
    };
}

/// The command pool and `count` primary command buffers from it.
pub(crate) fn command_buffers(
    device: &ash::Device,
    owned: &mut Owned,
    queue_family: u32,
    count: u32,
    label: &str,
) -> Result<Vec<vk::CommandBuffer>, RuntimeError> {
    let info = vk::CommandPoolCreateInfo::default().queue_family_index(queue_family);
    // SAFETY: a valid create info for a live device.
    let pool = unsafe { device.create_command_pool(&info, None) }
        .map_err(|e| vk_err("vkCreateCommandPool", label, e))?;
    owned.command_pools.push(pool);
    let info = vk::CommandBufferAllocateInfo::default()
        .command_pool(pool)
        .level(vk::CommandBufferLevel::PRIMARY)
        .command_buffer_count(count);
    // SAFETY: the pool is live.
    unsafe { device.allocate_command_buffers(&info) }
        .map_err(|e| vk_err("vkAllocateCommandBuffers", label, e))
}

/// Records an entry point's steps into `cb`; with `timestamps`, query 0 is written before the first
/// step and query i + 1 after step i. `buffers` are the arena and the io buffer, between which
/// the fault words move.
#[allow(clippy::too_many_arguments)]
pub(crate) fn record_run(
    device: &ash::Device,
    cb: vk::CommandBuffer,
    plan: &EntryPlan,
    pipelines: &[Pipeline],
    sets: &[vk::DescriptorSet],
    timestamps: Option<vk::QueryPool>,
    buffers: (vk::Buffer, vk::Buffer),
    label: &str,
) -> Result<(), RuntimeError> {
    let begin = vk::CommandBufferBeginInfo::default();
    // SAFETY: a fresh command buffer of a live pool; every handle recorded below is owned by
    // the model and outlives the command buffer (see `Owned`).
    unsafe {
        device.begin_command_buffer(cb, &begin).map_err(|e| vk_err("vkBeginCommandBuffer", label, e))?;
        if let Some(pool) = timestamps {
            device.cmd_reset_query_pool(cb, pool, 0, plan.steps.len() as u32 + 1);
            device.cmd_write_timestamp(cb, vk::PipelineStageFlags::TOP_OF_PIPE, pool, 0);
        }
        if let Some(words) = plan.faults {
            clear_faults(device, cb, buffers.0, words);
        }
        for (i, (step, &set)) in plan.steps.iter().zip(sets).enumerate() {
            let pipeline = &pipelines[step.pipeline];
            barrier_before_step(device, cb, i == 0);
            device.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, pipeline.pipeline);
            device.cmd_bind_descriptor_sets(
                cb,
                vk::PipelineBindPoint::COMPUTE,
                pipeline.layout,
                0,
                &[set],
                &[],
            );
            match (plan.sized, step.grid.clone().map(|d| d.fixed().and_then(|n| u32::try_from(n).ok()))) {
                // Sizes set per run: the grid the run wrote into the io buffer.
                (Some(sized), _) => {
                    let at = sized.grids + INDIRECT_BYTES * i as u64;
                    device.cmd_dispatch_indirect(cb, buffers.1, at);
                }
                (None, [Some(x), Some(y), Some(z)]) => device.cmd_dispatch(cb, x, y, z),
                (None, grid) => {
                    return Err(RuntimeError::invalid(format!(
                        "step {i} has grid {grid:?} that no run sets (the manifest declares no symbols)"
                    )))
                }
            }
            if let Some(pool) = timestamps {
                // Written once every earlier command has finished: step i's end.
                device.cmd_write_timestamp(cb, vk::PipelineStageFlags::BOTTOM_OF_PIPE, pool, i as u32 + 1);
            }
        }
        if let Some(words) = plan.faults {
            copy_faults(device, cb, buffers, words);
        }
        // The outputs (and the fault words' copy) are read by the host once the run's fence
        // signals.
        let to_host = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(vk::AccessFlags::HOST_READ);
        device.cmd_pipeline_barrier(
            cb,
            vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
            vk::PipelineStageFlags::HOST,
            vk::DependencyFlags::empty(),
            &[to_host],
            &[],
            &[],
        );
        device.end_command_buffer(cb).map_err(|e| vk_err("vkEndCommandBuffer", label, e))
    }
}

/// Fills the fault words with "none" (`u32::MAX`) after the previous run's last reads and
/// writes of them; the first step's barrier orders the fill before the kernels.
///
/// # Safety
/// `cb` is recording and `arena` holds the words' range.
unsafe fn clear_faults(device: &ash::Device, cb: vk::CommandBuffer, arena: vk::Buffer, words: FaultWords) {
    let before = vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_READ)
        .dst_access_mask(vk::AccessFlags::TRANSFER_WRITE);
    device.cmd_pipeline_barrier(
        cb,
        vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
        vk::PipelineStageFlags::TRANSFER,
        vk::DependencyFlags::empty(),
        &[before],
        &[],
        &[],
    );
    device.cmd_fill_buffer(cb, arena, words.arena, words.bytes, crate::faults::NONE);
}

/// Copies the fault words from the arena into the io buffer once the last step has written
/// them.
///
/// # Safety
/// `cb` is recording; the arena and the io buffer hold the words' ranges.
unsafe fn copy_faults(
    device: &ash::Device,
    cb: vk::CommandBuffer,
    (arena, io): (vk::Buffer, vk::Buffer),
    words: FaultWords,
) {
    let written = vk::MemoryBarrier::default()
        .src_access_mask(vk::AccessFlags::SHADER_WRITE)
        .dst_access_mask(vk::AccessFlags::TRANSFER_READ);
    device.cmd_pipeline_barrier(
        cb,
        vk::PipelineStageFlags::COMPUTE_SHADER,
        vk::PipelineStageFlags::TRANSFER,
        vk::DependencyFlags::empty(),
        &[written],
        &[],
        &[],
    );
    let region = vk::BufferCopy::default().src_offset(words.arena).dst_offset(words.io).size(words.bytes);
    device.cmd_copy_buffer(cb, arena, io, &[region]);
}

/// Records the one-time upload: the weights from `staging` (when the weights' memory is not
/// mapped) and a zeroed arena, so a model starts from the same state on every device.
pub(crate) fn record_upload(
    device: &ash::Device,
    cb: vk::CommandBuffer,
    staging: Option<(vk::Buffer, vk::Buffer, u64)>,
    arena: (vk::Buffer, u64),
    label: &str,
) -> Result<(), RuntimeError> {
    let begin = vk::CommandBufferBeginInfo::default().flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT);
    // SAFETY: a fresh command buffer; the buffers are live, and the sizes are theirs (the fill
    // size is a multiple of 4, as vkCmdFillBuffer wants).
    unsafe {
        device.begin_command_buffer(cb, &begin).map_err(|e| vk_err("vkBeginCommandBuffer", label, e))?;
        if let Some((from, to, size)) = staging {
            device.cmd_copy_buffer(cb, from, to, &[vk::BufferCopy::default().size(size)]);
        }
        device.cmd_fill_buffer(cb, arena.0, 0, arena.1 / 4 * 4, 0);
        device.end_command_buffer(cb).map_err(|e| vk_err("vkEndCommandBuffer", label, e))
    }
}

/// Which way a state copy goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StateCopy {
    /// From the arena's state slots into the host-visible state buffer (to read state).
    Down,
    /// From the state buffer into the arena's slots (to write state, and at load).
    Up,
}

/// Records the copy of the arena's first `bytes` bytes (the state's slots) to or from the
/// host-visible `state` buffer, ordered after every earlier kernel, host write and copy, and
/// before every later kernel (whose first barrier waits on transfers) and host read.
pub(crate) fn record_state_copy(
    device: &ash::Device,
    cb: vk::CommandBuffer,
    way: StateCopy,
    (arena, state): (vk::Buffer, vk::Buffer),
    bytes: u64,
    label: &str,
) -> Result<(), RuntimeError> {
    let begin = vk::CommandBufferBeginInfo::default();
    let before = vk::MemoryBarrier::default()
        .src_access_mask(
            vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::HOST_WRITE | vk::AccessFlags::TRANSFER_WRITE,
        )
        .dst_access_mask(vk::AccessFlags::TRANSFER_READ | vk::AccessFlags::TRANSFER_WRITE);
    let after =
        vk::MemoryBarrier::default().src_access_mask(vk::AccessFlags::TRANSFER_WRITE).dst_access_mask(
            vk::AccessFlags::HOST_READ | vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE,
        );
    let (from, to) = match way {
        StateCopy::Down => (arena, state),
        StateCopy::Up => (state, arena),
    };
    // SAFETY: a fresh command buffer of a live pool; both buffers are live, owned by the model,
    // and hold at least `bytes` bytes (the plan checked the slots against the arena).
    unsafe {
        device.begin_command_buffer(cb, &begin).map_err(|e| vk_err("vkBeginCommandBuffer", label, e))?;
        device.cmd_pipeline_barrier(
            cb,
            vk::PipelineStageFlags::COMPUTE_SHADER
                | vk::PipelineStageFlags::HOST
                | vk::PipelineStageFlags::TRANSFER,
            vk::PipelineStageFlags::TRANSFER,
            vk::DependencyFlags::empty(),
            &[before],
            &[],
            &[],
        );
        device.cmd_copy_buffer(cb, from, to, &[vk::BufferCopy::default().size(bytes)]);
        device.cmd_pipeline_barrier(
            cb,
            vk::PipelineStageFlags::TRANSFER,
            vk::PipelineStageFlags::HOST | vk::PipelineStageFlags::COMPUTE_SHADER,
            vk::DependencyFlags::empty(),
            &[after],
            &[],
            &[],
        );
        device.end_command_buffer(cb).map_err(|e| vk_err("vkEndCommandBuffer", label, e))
    }
}

/// Submits `cb` with `fence`, waits for it and resets the fence.
pub(crate) fn submit_and_wait(
    device: &ash::Device,
    queue: vk::Queue,
    cb: vk::CommandBuffer,
    fence: vk::Fence,
    label: &str,
) -> Result<(), RuntimeError> {
    let cbs = [cb];
    let submit = [vk::SubmitInfo::default().command_buffers(&cbs)];
    // SAFETY: `cb` is fully recorded and not pending (every submission is waited for before
    // returning); the queue is used only through `&mut` model methods; the fence is unsignaled.
    unsafe {
        device.queue_submit(queue, &submit, fence).map_err(|e| vk_err("vkQueueSubmit", label, e))?;
        device.wait_for_fences(&[fence], true, u64::MAX).map_err(|e| vk_err("vkWaitForFences", label, e))?;
        device.reset_fences(&[fence]).map_err(|e| vk_err("vkResetFences", label, e))
    }
}
