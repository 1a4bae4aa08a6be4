//! A Vulkan device running SPIR-V compute kernels. Load checks the artifact against the device
//! (`check.rs`) and every manifest number against the files (`plan.rs`), then creates all the
//! objects once: one device-local arena, the weights uploaded once, a mapped buffer for inputs
//! and outputs, a pipeline per shader entry point, a descriptor set per step, and command
//! buffers recorded once (`record.rs`), a run's per entry point of the artifact. A run copies
//! the inputs in, submits, waits, copies the outputs out. Persistent state lives in the
//! arena's first bytes; a mapped state buffer and two recorded copies move it to and from the
//! host (at load, and for `read_state`/`write_state`).

mod check;
mod instance;
mod memory;
mod pipelines;
mod plan;
mod record;
mod spirv;

use std::time::Duration;

use ash::vk;

use self::instance::{Gpu, Instance, Physical};
use self::memory::{Buffer, Mapped, Owned, Placement};
use self::plan::Region;
use crate::device::VulkanDeviceInfo;
use crate::error::RuntimeError;
use crate::manifest::{Manifest, Target};
use crate::symbols::{Dim, SymbolSpec};
use crate::tensor::TensorRef;
use crate::weights::WeightStore;

/// A failed Vulkan call as a `RuntimeError`.
pub(crate) fn vk_err(call: &'static str, device: &str, result: vk::Result) -> RuntimeError {
    RuntimeError::VulkanCall { call, device: device.to_string(), result: format!("{result}") }
}

/// The Vulkan devices of this machine (`library` overrides the loader's path, for tests).
pub(crate) fn list(library: Option<&std::ffi::OsStr>) -> Result<Vec<VulkanDeviceInfo>, RuntimeError> {
    let instance = Instance::new(library)?;
    Ok(instance.physical_devices()?.into_iter().map(|p| p.info).collect())
}

/// Picks the `index`-th device, else the first GPU with a compute queue, else any device with
/// one (a software rasterizer such as lavapipe).
fn choose(mut physicals: Vec<Physical>, index: Option<usize>) -> Result<Physical, RuntimeError> {
    let names = |all: &[Physical]| {
        let listed: Vec<String> = all.iter().map(|p| p.caps.label.clone()).collect();
        if listed.is_empty() {
            "this machine has no Vulkan device".to_string()
        } else {
            format!("this machine has {}", listed.join(", "))
        }
    };
    let position = match index {
        Some(i) if i < physicals.len() => Some(i),
        Some(i) => {
            return Err(RuntimeError::NoDevice {
                selector: format!("vulkan:{i}"),
                problem: names(&physicals),
            })
        }
        None => physicals
            .iter()
            .position(|p| p.preferred && p.caps.compute_queue.is_some())
            .or_else(|| physicals.iter().position(|p| p.caps.compute_queue.is_some())),
    };
    match position {
        Some(i) => Ok(physicals.swap_remove(i)),
        None => Err(RuntimeError::NoDevice {
            selector: "vulkan".to_string(),
            problem: format!("no Vulkan device has a compute queue; {}", names(&physicals)),
        }),
    }
}

/// Writes the plan's weights into the weights buffer when it is mapped, else into a new staging
/// buffer that is returned (the upload command buffer then copies it).
fn write_weights(
    owned: &mut Owned,
    props: &vk::PhysicalDeviceMemoryProperties,
    label: &str,
    plan: &plan::Plan,
    weights: &WeightStore,
    weight_buf: &Buffer,
) -> Result<Option<Buffer>, RuntimeError> {
    let staging = match weight_buf.mapped {
        Some(_) => None,
        None => {
            let src = vk::BufferUsageFlags::TRANSFER_SRC;
            Some(memory::buffer(owned, props, label, plan.weights_size, src, Placement::Host)?)
        }
    };
    let map = match (weight_buf.mapped, &staging) {
        (Some(map), _) => map,
        (None, Some(Buffer { mapped: Some(map), .. })) => *map,
        (None, _) => return Err(vk_err("vkMapMemory", label, vk::Result::ERROR_MEMORY_MAP_FAILED)),
    };
    for (name, offset) in &plan.weights {
        let view = weights
            .get(name)
            .ok_or_else(|| RuntimeError::MissingWeight { step: "(upload)".into(), name: name.clone() })?;
        // SAFETY: `plan` placed each weight inside `weights_size` bytes of the mapped buffer, and
        // nothing has been submitted yet.
        unsafe { memory::write(map, *offset, view.bytes) };
    }
    Ok(staging)
}

/// Per-step GPU timing: a query pool and the command buffer that writes it.
struct Timing {
    cb: vk::CommandBuffer,
    pool: vk::QueryPool,
    /// Nanoseconds per tick.
    period: f64,
    /// The queue's valid timestamp bits, as a mask.
    mask: u64,
}

/// One entry point, recorded.
struct EntryRun {
    inputs: Vec<(u64, u64)>,
    outputs: Vec<(u64, u64)>,
    run_cb: vk::CommandBuffer,
    timing: Result<Timing, String>,
    steps: usize,
    /// Where the run's copy of the fault words lies in the io buffer, when a kernel can fault,
    /// and how many bytes they take.
    faults: Option<(u64, u64)>,
    /// With symbols: where a run writes their values and its grids, and each step's grid.
    sized: Option<(plan::SizedRun, Vec<[Dim; 3]>)>,
}

/// The persistent state's way to the host: a mapped buffer of the slots' bytes and the two
/// recorded copies between it and the arena.
struct StateBuffer {
    map: Mapped,
    down: vk::CommandBuffer,
    up: vk::CommandBuffer,
}

/// A Vulkan artifact loaded on one device.
pub(crate) struct VulkanBackend {
    /// Declared first so it drops first: it waits for the device, then destroys every object
    /// before `gpu` destroys the device and `instance` the instance.
    _owned: Owned,
    gpu: Gpu,
    _instance: Instance,
    info: VulkanDeviceInfo,
    label: String,
    io: Mapped,
    entries: Vec<EntryRun>,
    state: Option<StateBuffer>,
    fence: vk::Fence,
    /// The fault words as the last run left them.
    fault_words: Vec<u32>,
    /// Whether the weights went through a staging buffer.
    #[cfg(test)]
    staged: bool,
    /// Set when a submission failed half-way (e.g. the device was lost): later runs refuse.
    broken: Option<String>,
    /// The manifest's symbols, to name them in errors.
    symbols: Vec<SymbolSpec>,
    /// `maxComputeWorkGroupCount`, which a run's grids are checked against.
    max_grid: [u32; 3],
}

impl VulkanBackend {
    /// Loads a checked manifest's Vulkan side: `spirv` is `kernels.spv` (its digest checked),
    /// `index` the selected device (`None`: the default choice). The state starts from its
    /// recorded values (its table checked by the model).
    pub fn load(
        manifest: &Manifest,
        spirv: &[u8],
        weights: &WeightStore,
        index: Option<usize>,
    ) -> Result<VulkanBackend, RuntimeError> {
        VulkanBackend::load_staged(manifest, spirv, weights, index, false)
    }

    /// [`VulkanBackend::load`]; `force_staging` uploads the weights through a staging buffer
    /// even when device memory is mappable, so tests on lavapipe cover the path real GPUs take.
    fn load_staged(
        manifest: &Manifest,
        spirv: &[u8],
        weights: &WeightStore,
        index: Option<usize>,
        force_staging: bool,
    ) -> Result<VulkanBackend, RuntimeError> {
        let Target::Vulkan(target) = &manifest.target else {
            return Err(super::wrong_backend(&manifest.target, "vulkan"));
        };
        let instance = Instance::new(None)?;
        let physical = choose(instance.physical_devices()?, index)?;
        let caps = &physical.caps;
        let label = caps.label.clone();
        let enabled = check::check_target(target, caps)?;
        let plan = plan::plan(manifest, target, spirv, weights, caps)?;
        // The structure is sound (precise messages above); now that the modules were compiled
        // for exactly this manifest (its step order and buffer assignments are its word alone).
        let absent = "kernels.spv does not end with a contract trailer";
        manifest.check_contract(
            crate::manifest::SPIRV_FILE,
            crate::manifest::spirv_contract(spirv),
            absent,
        )?;

        let gpu = Gpu::new(&instance, &physical, &enabled)?;
        let device = gpu.device.clone();
        let mut owned = Owned::new(&device);
        // SAFETY: a query on a physical device of the live instance.
        let props = unsafe { instance.instance.get_physical_device_memory_properties(physical.handle) };

        let storage = vk::BufferUsageFlags::STORAGE_BUFFER;
        let dst = vk::BufferUsageFlags::TRANSFER_DST;
        let src = vk::BufferUsageFlags::TRANSFER_SRC;
        let arena = memory::buffer(
            &mut owned,
            &props,
            &label,
            plan.arena_size,
            storage | dst | src,
            Placement::Device,
        )?;
        let weights_placement = if force_staging { Placement::Device } else { Placement::DeviceMappable };
        let weight_buf =
            memory::buffer(&mut owned, &props, &label, plan.weights_size, storage | dst, weights_placement)?;
        // The io buffer also holds a sized run's grids, which the dispatches read.
        let indirect = vk::BufferUsageFlags::INDIRECT_BUFFER;
        let io = memory::buffer(
            &mut owned,
            &props,
            &label,
            plan.io_size,
            storage | dst | indirect,
            Placement::Host,
        )?;
        let io_map =
            io.mapped.ok_or_else(|| vk_err("vkMapMemory", &label, vk::Result::ERROR_MEMORY_MAP_FAILED))?;

        let staging = write_weights(&mut owned, &props, &label, &plan, weights, &weight_buf)?;
        let pipelines =
            pipelines::pipelines(&device, &mut owned, &plan, enabled.required_subgroup_size, &label)?;
        let buffer_of = |region: Region| match region {
            Region::Arena => arena.buffer,
            Region::Weights => weight_buf.buffer,
            Region::Io => io.buffer,
        };

        // The upload, then per entry point a run and a timed run, then the state's two copies.
        let count = 1 + 2 * plan.entries.len() as u32 + 2;
        let cbs = record::command_buffers(&device, &mut owned, gpu.queue_family, count, &label)?;
        let fence_info = vk::FenceCreateInfo::default();
        // SAFETY: a valid create info for a live device.
        let fence = unsafe { device.create_fence(&fence_info, None) }
            .map_err(|e| vk_err("vkCreateFence", &label, e))?;
        owned.fences.push(fence);
        let copy = staging.map(|s| (s.buffer, weight_buf.buffer, plan.weights_size));
        record::record_upload(&device, cbs[0], copy, (arena.buffer, arena.size), &label)?;
        record::submit_and_wait(&device, gpu.queue, cbs[0], fence, &label)?;
        #[cfg(test)]
        let staged = staging.is_some();
        if let Some(staging) = staging {
            owned.free(staging);
        }

        let moved = (arena.buffer, io.buffer);
        let mut entries = Vec::with_capacity(plan.entries.len());
        for (e, entry) in plan.entries.iter().enumerate() {
            let (run_cb, profile_cb) = (cbs[1 + 2 * e], cbs[2 + 2 * e]);
            let sets =
                pipelines::descriptor_sets(&device, &mut owned, &entry.steps, &pipelines, buffer_of, &label)?;
            record::record_run(&device, run_cb, entry, &pipelines, &sets, None, moved, &label)?;
            let timing = match caps.compute_queue {
                Some((_, bits)) if bits > 0 && caps.timestamp_period > 0.0 => {
                    let info = vk::QueryPoolCreateInfo::default()
                        .query_type(vk::QueryType::TIMESTAMP)
                        .query_count(entry.steps.len() as u32 + 1);
                    // SAFETY: a valid create info for a live device.
                    let pool = unsafe { device.create_query_pool(&info, None) }
                        .map_err(|e| vk_err("vkCreateQueryPool", &label, e))?;
                    owned.query_pools.push(pool);
                    record::record_run(
                        &device,
                        profile_cb,
                        entry,
                        &pipelines,
                        &sets,
                        Some(pool),
                        moved,
                        &label,
                    )?;
                    let mask = if bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
                    Ok(Timing { cb: profile_cb, pool, period: f64::from(caps.timestamp_period), mask })
                }
                Some((_, 0)) => {
                    Err("its compute queue has no timestamps (timestampValidBits is 0)".to_string())
                }
                _ => Err("it reports no timestamp period".to_string()),
            };
            entries.push(EntryRun {
                inputs: entry.inputs.clone(),
                outputs: entry.outputs.clone(),
                run_cb,
                timing,
                steps: entry.steps.len(),
                faults: entry.faults.map(|f| (f.io, f.bytes)),
                sized: entry.sized.map(|run| (run, entry.steps.iter().map(|s| s.grid.clone()).collect())),
            });
        }

        let state = match plan.state_bytes {
            0 => None,
            bytes => {
                let buf = memory::buffer(&mut owned, &props, &label, bytes, src | dst, Placement::Host)?;
                let map = buf
                    .mapped
                    .ok_or_else(|| vk_err("vkMapMemory", &label, vk::Result::ERROR_MEMORY_MAP_FAILED))?;
                let (down, up) = (cbs[cbs.len() - 2], cbs[cbs.len() - 1]);
                let both = (arena.buffer, buf.buffer);
                record::record_state_copy(&device, down, record::StateCopy::Down, both, bytes, &label)?;
                record::record_state_copy(&device, up, record::StateCopy::Up, both, bytes, &label)?;
                // The slots' first values: zeros, and the weights the table names.
                // SAFETY: the buffer holds `bytes` mapped bytes; nothing uses it yet.
                unsafe { memory::write(map, 0, &vec![0u8; bytes as usize]) };
                for s in &manifest.state {
                    if let crate::manifest::StateInit::Weight { name } = &s.init {
                        let value = weights.get(name).ok_or_else(|| {
                            RuntimeError::invalid(format!(
                                "state {:?} starts from weight {name:?}, which the weights file lacks",
                                s.name
                            ))
                        })?;
                        // SAFETY: the slot lies inside the first `bytes` bytes (plan) and the
                        // value has its size (`model::check_state`).
                        unsafe { memory::write(map, s.offset, value.bytes) };
                    }
                }
                record::submit_and_wait(&device, gpu.queue, up, fence, &label)?;
                Some(StateBuffer { map, down, up })
            }
        };

        Ok(VulkanBackend {
            #[cfg(test)]
            staged,
            _owned: owned,
            gpu,
            _instance: instance,
            info: physical.info.clone(),
            label,
            io: io_map,
            entries,
            state,
            fence,
            fault_words: Vec::new(),
            broken: None,
            symbols: manifest.symbols.clone(),
            max_grid: caps.max_workgroup_count,
        })
    }

    /// The device.
    pub fn info(&self) -> &VulkanDeviceInfo {
        &self.info
    }

    /// The fault words as the last run left them (empty when no kernel can fault).
    pub fn fault_words(&self) -> &[u32] {
        &self.fault_words
    }

    /// Refuses to submit once a submission failed half-way.
    fn check_usable(&self) -> Result<(), RuntimeError> {
        match &self.broken {
            Some(reason) => Err(RuntimeError::VulkanCall {
                call: "vkQueueSubmit",
                device: self.label.clone(),
                result: format!("an earlier run failed ({reason}); load the model again"),
            }),
            None => Ok(()),
        }
    }

    /// Submits `cb` and waits; a failure marks the model unusable.
    fn submit(&mut self, cb: vk::CommandBuffer) -> Result<(), RuntimeError> {
        let device = &self.gpu.device;
        if let Err(e) = record::submit_and_wait(device, self.gpu.queue, cb, self.fence, &self.label) {
            self.broken = Some(e.to_string());
            return Err(e);
        }
        Ok(())
    }

    /// Copies the inputs in (and, with symbols, their values `values` and the grids at them),
    /// replays entry point `entry`'s recorded command buffer, copies the outputs out. With
    /// `times`, replays the timestamped one and pushes each step's GPU time.
    pub fn execute(
        &mut self,
        entry: usize,
        values: &[u64],
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        self.check_usable()?;
        let run = self
            .entries
            .get(entry)
            .ok_or_else(|| RuntimeError::invalid(format!("entry point {entry} does not exist")))?;
        let cb = match (&times, &run.timing) {
            (None, _) => run.run_cb,
            (Some(_), Ok(timing)) => timing.cb,
            (Some(_), Err(reason)) => {
                return Err(RuntimeError::NoTimestamps { device: self.label.clone(), reason: reason.clone() })
            }
        };
        if let Some((sized, grids)) = &run.sized {
            let mut words = crate::device::symbol_words(values);
            debug_assert_eq!(words.len() as u64, sized.bytes);
            // SAFETY: `plan` placed the symbol words at `sized.symbols`, `sized.bytes` long,
            // inside the mapped io buffer; no submission is pending.
            unsafe { memory::write(self.io, sized.symbols, &words) };
            words.clear();
            for (i, grid) in grids.iter().enumerate() {
                let at = format!("k{i}");
                let g = crate::device::grid_at(&at, grid, values, &self.symbols)?;
                if let Some(axis) = (0..3).find(|&a| g[a] > self.max_grid[a]) {
                    return Err(RuntimeError::DeviceLacks {
                        need: format!(
                            "step k{i} to launch grid {g:?} at {}",
                            crate::symbols::binding_str(&self.symbols, values)
                        ),
                        device: self.label.clone(),
                        has: format!(
                            "allows at most {} workgroups along axis {axis} (maxComputeWorkGroupCount)",
                            self.max_grid[axis]
                        ),
                    });
                }
                words.extend(g.iter().flat_map(|n| n.to_le_bytes()));
            }
            // SAFETY: `plan` placed one 12-byte command per step at `sized.grids` inside the
            // mapped io buffer.
            unsafe { memory::write(self.io, sized.grids, &words) };
        }
        for (input, &(offset, bytes)) in inputs.iter().zip(&run.inputs) {
            // SAFETY: the model checked each input's length against its spec at the bound
            // values; `plan` placed at `offset` inside the mapped io buffer room for its largest
            // size; no submission is pending.
            debug_assert!(input.bytes.len() as u64 <= bytes);
            unsafe { memory::write(self.io, offset, input.bytes) };
        }
        self.submit(cb)?;
        let run = &self.entries[entry];
        for (output, &(offset, bytes)) in outputs.iter_mut().zip(&run.outputs) {
            debug_assert!(output.len() as u64 <= bytes);
            // SAFETY: as for the inputs; the run's fence has signaled and its last barrier made
            // the shader writes visible to the host.
            unsafe { memory::read(self.io, offset, output) };
        }
        self.fault_words.clear();
        if let Some((offset, len)) = run.faults {
            let mut bytes = vec![0u8; len as usize];
            // SAFETY: `plan` placed the words' copy at `offset` of the io buffer; the run's last
            // barrier made the copy visible to the host.
            unsafe { memory::read(self.io, offset, &mut bytes) };
            self.fault_words
                .extend(bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])));
        }
        if let (Some(times), Ok(timing)) = (times, &run.timing) {
            let mut ticks = vec![0u64; run.steps + 1];
            // SAFETY: the pool has steps + 1 queries, all written by the submission just waited
            // for.
            unsafe {
                self.gpu.device.get_query_pool_results(
                    timing.pool,
                    0,
                    &mut ticks,
                    vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
                )
            }
            .map_err(|e| vk_err("vkGetQueryPoolResults", &self.label, e))?;
            for pair in ticks.windows(2) {
                let delta = pair[1].wrapping_sub(pair[0]) & timing.mask;
                times.push(Duration::from_nanos((delta as f64 * timing.period).round() as u64));
            }
        }
        Ok(())
    }

    /// Copies the arena bytes `range` (inside the state's slots) into `out`.
    pub fn read_state(&mut self, range: std::ops::Range<usize>, out: &mut [u8]) -> Result<(), RuntimeError> {
        self.check_usable()?;
        let state = self.state.as_ref().ok_or_else(|| RuntimeError::invalid("the model keeps no state"))?;
        let (map, down) = (state.map, state.down);
        self.submit(down)?;
        // SAFETY: the range lies in a slot, inside the mapped state buffer (plan); the copy's
        // fence has signaled and its barrier made it visible to the host.
        unsafe { memory::read(map, range.start as u64, out) };
        Ok(())
    }

    /// Writes `value` into the arena bytes `range` (inside the state's slots), leaving the
    /// other slots as they are.
    pub fn write_state(&mut self, range: std::ops::Range<usize>, value: &[u8]) -> Result<(), RuntimeError> {
        self.check_usable()?;
        let state = self.state.as_ref().ok_or_else(|| RuntimeError::invalid("the model keeps no state"))?;
        let (map, down, up) = (state.map, state.down, state.up);
        // The other slots' current values first, so the copy up writes them back unchanged.
        self.submit(down)?;
        // SAFETY: as in `read_state`; no submission is pending.
        unsafe { memory::write(map, range.start as u64, value) };
        self.submit(up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{BufRef, DType, Dispatch, ModuleRange, Step, TensorSpec, VulkanTarget};

    #[test]
    fn backend_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<VulkanBackend>();
    }

    /// `tests/data/muladd.spvasm` assembled, or why it cannot be.
    fn muladd() -> Result<Vec<u8>, String> {
        let dir = std::env::temp_dir().join(format!("kiln-staging-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let out = dir.join("muladd.spv");
        let source = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/muladd.spvasm");
        let status = std::process::Command::new("spirv-as")
            .args(["--target-env", "vulkan1.1", source, "-o"])
            .arg(&out)
            .status()
            .map_err(|e| format!("spirv-as not found ({e})"))?;
        assert!(status.success(), "spirv-as failed");
        let bytes = std::fs::read(&out).map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    }

    #[test]
    fn weights_uploaded_through_staging_match() {
        let spirv = match muladd() {
            Ok(bytes) => bytes,
            Err(reason) => return eprintln!("skipped: {reason}"),
        };
        let spec = |name: &str| TensorSpec::fixed(name, DType::F32, &[1024]);
        let manifest = Manifest {
            format_version: crate::ARTIFACT_FORMAT_VERSION,
            symbols: Vec::new(),
            model: "staged".into(),
            kiln_version: "0.1.0".into(),
            target: Target::Vulkan(VulkanTarget {
                spirv_version: "1.3".into(),
                capabilities: vec!["Shader".into()],
                buffer_align: 256,
                max_workgroup_invocations: 64,
                max_shared_bytes: 0,
                subgroup_size: None,
            }),
            inputs: vec![spec("x")],
            outputs: vec![spec("t")],
            arena_bytes: 0,
            index_bounds: Vec::new(),
            files: Vec::new(),
            modules: vec![ModuleRange { offset: 0, bytes: spirv.len() as u64 }],
            state: Vec::new(),
            entries: Vec::new(),
            faults: None,
            steps: vec![Step {
                symbol: "mul".into(),
                label: "k0 mul".into(),
                args: vec![
                    BufRef::Input { index: 0 },
                    BufRef::Weight { name: "w".into(), bytes: 4096 },
                    BufRef::Output { index: 0 },
                ],
                dispatch: Dispatch::gpu_fixed(0, [16, 1, 1], [64, 1, 1]),
                flops: 1024,
                bytes: 12288,
            }],
        };
        let w: Vec<f32> = (0..1024).map(|i| i as f32 * 0.5 - 7.0).collect();
        let w_bytes: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        let weights = WeightStore::from_owned(vec![("w".into(), DType::F32, vec![1024], w_bytes)]).unwrap();
        let mut spirv = spirv;
        spirv.extend_from_slice(&crate::manifest::spirv_contract_trailer(manifest.contract()));
        let mut backend = match VulkanBackend::load_staged(&manifest, &spirv, &weights, None, true) {
            Ok(backend) => backend,
            Err(RuntimeError::VulkanUnavailable { reason }) => {
                return eprintln!("skipped: no Vulkan device ({reason})")
            }
            Err(e) => panic!("{e}"),
        };
        assert!(backend.staged);
        let x: Vec<f32> = (0..1024).map(|i| (i % 9) as f32 - 4.0).collect();
        let x_bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut t = vec![0u8; 4096];
        let inputs = [crate::TensorRef::new("x", DType::F32, &[1024], &x_bytes)];
        backend.execute(0, &[], &inputs, &mut [&mut t], None).unwrap();
        let expected: Vec<u8> = x.iter().zip(&w).flat_map(|(x, w)| (x * w).to_le_bytes()).collect();
        assert_eq!(t, expected);
        // lavapipe's device memory is mappable: without forcing, the weights are written in place.
        let direct = VulkanBackend::load(&manifest, &spirv, &weights, None).unwrap();
        if direct.info().device_type == "CPU (software)" {
            assert!(!direct.staged);
        }
    }
}
