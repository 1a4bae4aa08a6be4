//! A CUDA device running the artifact's PTX (or cubin) kernels through the NVIDIA driver API.
//!
//! Load checks every manifest number first, before the driver is touched (`plan.rs`), then the
//! target against the device (`check.rs`), and creates everything once: the device's primary
//! context and a stream, one arena, one buffer holding every weight a step uses (uploaded
//! once), a buffer per input and output, each module loaded once (its cubin when the device's
//! compute capability is exactly the target's, else its PTX through the driver's JIT), each
//! step's function (opted in to the dynamic shared memory its launches pass) and parameter
//! array, one event per step boundary, and each entry point's launch sequence captured into a
//! CUDA graph of its own. A run copies the inputs in, replays that entry point's graph, copies
//! the outputs out and waits; a profiled run launches step by step between events instead.
//! Persistent state lives in the arena's first bytes: its slots are filled at load and copied
//! to and from the host on the stream for `read_state`/`write_state`.
//!
//! The graph is captured at load because a model is hundreds of small launches: replaying one
//! graph costs one driver call per run instead of one per step, and it changes nothing else
//! (same kernels, pointers and order). Profiled runs do not use it, so that events can sit
//! between the steps.

mod check;
mod driver;
mod plan;

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void, OsStr};
use std::ptr;
use std::time::Duration;

use cudarc::driver::sys;

use self::check::DeviceCaps;
use self::driver::check as cu;
use self::plan::{Plan, Region};
use crate::device::CudaDeviceInfo;
use crate::error::RuntimeError;
use crate::manifest::{CudaTarget, Manifest, StateInit, Target, CUBIN_FILE, PTX_FILE};
use crate::symbols::{Dim, SymbolSpec};
use crate::tensor::TensorRef;
use crate::weights::WeightStore;

/// Bytes of the JIT's error log kept for a refused module.
const LOG_BYTES: usize = 16 * 1024;

/// The CUDA devices of this machine. `library` replaces `libcuda.so.1` for the probe only
/// (tests point it at a missing file); the driver itself is always cudarc's.
pub(crate) fn list(library: Option<&OsStr>) -> Result<Vec<CudaDeviceInfo>, RuntimeError> {
    if let Some(library) = library {
        driver::probe(Some(library)).map_err(|reason| RuntimeError::CudaUnavailable { reason })?;
    }
    driver::init()?;
    (0..driver::device_count()?).map(|i| driver::read_caps(i).map(|(_, caps)| caps.info)).collect()
}

/// Picks device `index` (the first when `None`) and reads its limits.
fn choose(index: Option<usize>) -> Result<(sys::CUdevice, DeviceCaps), RuntimeError> {
    let count = driver::device_count()?;
    if count == 0 {
        return Err(RuntimeError::CudaUnavailable { reason: "the CUDA driver reports no device".into() });
    }
    let index = index.unwrap_or(0);
    if index >= count {
        let listed: Vec<String> =
            (0..count).map(|i| driver::read_caps(i).map(|(_, caps)| caps.label)).collect::<Result<_, _>>()?;
        return Err(RuntimeError::NoDevice {
            selector: format!("cuda:{index}"),
            problem: format!("this machine has {}", listed.join(", ")),
        });
    }
    driver::read_caps(index)
}

/// Every driver object a model owns, released together (in dependency order) when a load fails
/// half-way or the model is dropped.
struct Owned {
    device: sys::CUdevice,
    /// The device's primary context, retained once.
    context: sys::CUcontext,
    stream: sys::CUstream,
    memory: Vec<sys::CUdeviceptr>,
    modules: Vec<sys::CUmodule>,
    events: Vec<sys::CUevent>,
    /// The instantiated graphs: one per entry point that has steps, or, for a model with
    /// symbols, one per binding in each entry point's cache.
    execs: Vec<sys::CUgraphExec>,
}

impl Owned {
    /// Retains `device`'s primary context and makes it current on this thread.
    fn new(device: sys::CUdevice, label: &str) -> Result<Owned, RuntimeError> {
        let mut context = ptr::null_mut();
        // SAFETY: writes one handle for a device the driver listed.
        cu("cuDevicePrimaryCtxRetain", label, unsafe {
            sys::cuDevicePrimaryCtxRetain(&mut context, device)
        })?;
        let owned = Owned {
            device,
            context,
            stream: ptr::null_mut(),
            memory: Vec::new(),
            modules: Vec::new(),
            events: Vec::new(),
            execs: Vec::new(),
        };
        owned.make_current(label)?;
        Ok(owned)
    }

    /// Makes the model's context current on the calling thread (a model may move between
    /// threads; every driver call below needs its context current).
    fn make_current(&self, label: &str) -> Result<(), RuntimeError> {
        // SAFETY: the context is retained for as long as `self` lives.
        cu("cuCtxSetCurrent", label, unsafe { sys::cuCtxSetCurrent(self.context) })
    }

    /// Allocates `bytes` of device memory for `what`; running out is `RuntimeError::Alloc`.
    fn alloc(&mut self, bytes: u64, what: &str, label: &str) -> Result<sys::CUdeviceptr, RuntimeError> {
        let size = usize::try_from(bytes)
            .map_err(|_| RuntimeError::Alloc { what: format!("{what} on {label}"), bytes })?;
        let mut pointer: sys::CUdeviceptr = 0;
        // SAFETY: writes one device pointer; the context is current.
        match unsafe { sys::cuMemAlloc_v2(&mut pointer, size) } {
            sys::CUresult::CUDA_SUCCESS => {
                self.memory.push(pointer);
                Ok(pointer)
            }
            sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                Err(RuntimeError::Alloc { what: format!("{what} on {label}"), bytes })
            }
            other => cu("cuMemAlloc", label, other).map(|()| 0),
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        // SAFETY: every handle was created in this context and is destroyed once, here. Waiting
        // for the stream first means no queued work still uses them; the graph goes before the
        // modules its kernels live in, memory before the stream, the context last. Failures
        // (e.g. after a sticky launch error) cannot be acted on and are ignored.
        unsafe {
            let _ = sys::cuCtxSetCurrent(self.context);
            if !self.stream.is_null() {
                let _ = sys::cuStreamSynchronize(self.stream);
            }
            self.execs.drain(..).for_each(|e| {
                let _ = sys::cuGraphExecDestroy(e);
            });
            self.events.drain(..).for_each(|e| {
                let _ = sys::cuEventDestroy_v2(e);
            });
            self.modules.drain(..).for_each(|m| {
                let _ = sys::cuModuleUnload(m);
            });
            self.memory.drain(..).for_each(|p| {
                let _ = sys::cuMemFree_v2(p);
            });
            if !self.stream.is_null() {
                let _ = sys::cuStreamDestroy_v2(self.stream);
            }
            let _ = sys::cuCtxSetCurrent(ptr::null_mut());
            let _ = sys::cuDevicePrimaryCtxRelease_v2(self.device);
        }
    }
}

/// One step, ready to launch: its function, shape and parameter array, all fixed at load (the
/// grid as sizes over the symbols, evaluated per run).
struct Launch {
    label: String,
    function: sys::CUfunction,
    grid: [Dim; 3],
    block: [u32; 3],
    /// `sharedMemBytes`: the dynamic shared memory the kernel takes (0 when all of its shared
    /// memory is static), which the function was opted in to at load.
    dynamic_shared_bytes: u32,
    /// The device pointers, one per argument (the bare-pointer calling convention).
    _values: Box<[sys::CUdeviceptr]>,
    /// `kernelParams`: pointers to each of `_values` (a boxed slice never moves its elements).
    params: Box<[*mut c_void]>,
}

impl Launch {
    /// Queues the kernel on `stream` over `grid` (its grid at the run's symbol values).
    fn launch(&self, grid: [u32; 3], stream: sys::CUstream, device: &str) -> Result<(), RuntimeError> {
        let params = if self.params.is_empty() { ptr::null_mut() } else { self.params.as_ptr().cast_mut() };
        let [gx, gy, gz] = grid;
        let [bx, by, bz] = self.block;
        // SAFETY: the function lives in a module the model owns; `params` holds one pointer per
        // kernel parameter, each to an 8-byte device pointer into a buffer the model owns and
        // that the plan checked covers the argument; the driver copies the values at launch.
        // The dynamic shared memory is at most what the function was opted in to at load (a
        // captured graph records it with the launch).
        let (function, shared) = (self.function, self.dynamic_shared_bytes);
        let result = unsafe {
            sys::cuLaunchKernel(function, gx, gy, gz, bx, by, bz, shared, stream, params, ptr::null_mut())
        };
        cu("cuLaunchKernel", device, result).map_err(|e| match e {
            RuntimeError::CudaCall { call, device, result } => {
                RuntimeError::CudaCall { call, device, result: format!("{result} in step {:?}", self.label) }
            }
            other => other,
        })
    }
}

/// One entry point, ready to run.
struct EntryRun {
    /// Device copies of its inputs and outputs, with their sizes.
    inputs: Vec<(sys::CUdeviceptr, usize)>,
    outputs: Vec<(sys::CUdeviceptr, usize)>,
    launches: Vec<Launch>,
    /// Its fault words in the arena and their size, when one of its kernels can fault.
    faults: Option<(sys::CUdeviceptr, usize)>,
    /// The graph plain runs replay (`None` when it has no step, and for a model with
    /// symbols, whose graphs are `by_binding`).
    exec: Option<sys::CUgraphExec>,
    /// A model with symbols: the graphs of the latest bindings, most recent last, at most
    /// [`GRAPHS_PER_ENTRY`].
    by_binding: Vec<(Vec<u64>, sys::CUgraphExec)>,
}

/// The bindings whose graphs an entry point of a model with symbols keeps (a workload of mixed
/// lengths cycles through a few padded sizes; a graph costs an instantiation to make).
const GRAPHS_PER_ENTRY: usize = 16;

/// A CUDA artifact loaded on one device.
pub(crate) struct CudaBackend {
    /// Declared first so it drops first: nothing else holds a driver object.
    owned: Owned,
    info: CudaDeviceInfo,
    label: String,
    /// Each entry point of the manifest, `forward` first.
    entries: Vec<EntryRun>,
    /// The arena's device address (the state's slots are its first bytes).
    arena: sys::CUdeviceptr,
    /// The fault words as the last run left them.
    fault_words: Vec<u32>,
    /// Set when a run failed half-way (e.g. an illegal address, which poisons the context):
    /// later runs refuse.
    broken: Option<String>,
    /// The manifest's symbols, to name them in errors.
    symbols: Vec<SymbolSpec>,
    /// Where kernels read the run's symbol values ([`crate::BufRef::Symbols`]), when the model
    /// has symbols.
    symbol_words: Option<sys::CUdeviceptr>,
    /// `MAX_GRID_DIM_X/Y/Z`, which a run's grids are checked against.
    max_grid: [u32; 3],
}

// SAFETY: the driver handles and device pointers are plain values usable from any thread once
// the model's context is current there, which every entry point (`execute`, drop) makes sure
// of; runs take `&mut self`, so no two threads drive the stream at once, and `&self` methods
// only read host data (`info`).
unsafe impl Send for CudaBackend {}
// SAFETY: see `Send`: shared references never reach a driver handle.
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    /// Loads a CUDA manifest: `ptx` is `kernels.ptx` and `cubin` `kernels.cubin` when the
    /// artifact lists it (digests checked), `index` the selected device (`None`: the first).
    pub fn load(
        manifest: &Manifest,
        ptx: &[u8],
        cubin: Option<&[u8]>,
        weights: &WeightStore,
        index: Option<usize>,
    ) -> Result<CudaBackend, RuntimeError> {
        let Target::Cuda(target) = &manifest.target else {
            return Err(super::wrong_backend(&manifest.target, "cuda"));
        };
        // Everything the files and the manifest alone decide, before the driver is touched:
        // the structure first (for its precise messages), then that the modules were compiled
        // for exactly this manifest (their bare-pointer parameters carry no sizes to check).
        let plan = plan::plan(manifest, target, ptx, cubin, weights)?;
        let absent = "kernels.ptx does not end with a kiln_contract line";
        manifest.check_contract(PTX_FILE, crate::manifest::ptx_contract(ptx), absent)?;

        driver::init()?;
        let (device, caps) = choose(index)?;
        check::check_target(target, &caps)?;
        for step in plan.entries.iter().flat_map(|e| &e.steps) {
            check::check_launch(step, &caps)?;
        }
        let label = caps.label.clone();
        let mut owned = Owned::new(device, &label)?;
        let mut stream = ptr::null_mut();
        let flags = sys::CUstream_flags::CU_STREAM_NON_BLOCKING as c_uint;
        // SAFETY: writes one handle; the context is current.
        cu("cuStreamCreate", &label, unsafe { sys::cuStreamCreate(&mut stream, flags) })?;
        owned.stream = stream;

        // Every load-time transfer goes on the model's stream: it is non-blocking, so work on
        // the legacy default stream (where the synchronous cuMemset/cuMemcpy run) would not be
        // ordered before its kernels.
        let arena = owned.alloc(plan.arena_bytes, "arena", &label)?;
        let arena_len = plan.arena_bytes as usize;
        // SAFETY: the arena holds `arena_bytes` bytes. Zeroed so that a run never reads what
        // another process left in the memory.
        cu("cuMemsetD8Async", &label, unsafe { sys::cuMemsetD8Async(arena, 0, arena_len, stream) })?;
        let weight_buf = owned.alloc(plan.weights_bytes, "weights", &label)?;
        let symbol_words = match plan.symbol_bytes {
            0 => None,
            bytes => Some(owned.alloc(bytes, "symbol values", &label)?),
        };
        upload_weights(&plan, weights, weight_buf, stream, &label)?;
        upload_state(manifest, weights, arena, stream, &label)?;

        let exact = caps.info.compute_capability == target.compute_capability;
        for (i, module) in plan.modules.iter().enumerate() {
            let handle = load_module(i, module, exact, target, &label)?;
            owned.modules.push(handle);
        }

        // The dynamic shared memory each function is opted in to so far: the most any of its
        // steps passes (entry points share kernels).
        let mut opted: HashMap<sys::CUfunction, u32> = HashMap::new();
        let mut entries = Vec::with_capacity(plan.entries.len());
        for (entry, view) in plan.entries.iter().zip(manifest.entry_views()) {
            let io = |specs: &[crate::manifest::TensorSpec], sizes: &[u64], kind: &str, owned: &mut Owned| {
                let mut buffers = Vec::with_capacity(sizes.len());
                for (spec, &bytes) in specs.iter().zip(sizes) {
                    let what = format!("{kind} {:?} of entry point {:?}", spec.name, view.name);
                    buffers.push((owned.alloc(bytes.max(1), &what, &label)?, bytes as usize));
                }
                Ok::<_, RuntimeError>(buffers)
            };
            let inputs = io(view.inputs, &entry.inputs, "input", &mut owned)?;
            let outputs = io(view.outputs, &entry.outputs, "output", &mut owned)?;
            let pointer = |region: Region, offset: u64| match region {
                Region::Arena => arena + offset,
                Region::Weights => weight_buf + offset,
                Region::Input(i) => inputs[i].0 + offset,
                Region::Output(i) => outputs[i].0 + offset,
                // `plan` made a Symbols argument only in a model with symbols.
                Region::Symbols => symbol_words.unwrap_or(0) + offset,
            };
            let mut launches = Vec::with_capacity(entry.steps.len());
            for step in &entry.steps {
                let module = owned.modules.get(step.module).copied().ok_or_else(|| {
                    RuntimeError::invalid(format!(
                        "step {:?} uses module {}, which is not loaded",
                        step.label, step.module
                    ))
                })?;
                let function = function(module, step, target, &caps)?;
                let bytes = step.dynamic_shared_bytes;
                if bytes > 0 && opted.get(&function).is_none_or(|&had| had < bytes) {
                    opt_in(function, step, &caps.label)?;
                    opted.insert(function, bytes);
                }
                let values: Box<[sys::CUdeviceptr]> =
                    step.args.iter().map(|a| pointer(a.region, a.offset)).collect();
                let params = values.iter().map(|v| ptr::from_ref(v).cast_mut().cast::<c_void>()).collect();
                launches.push(Launch {
                    label: step.label.clone(),
                    function,
                    grid: step.grid.clone(),
                    block: step.block,
                    dynamic_shared_bytes: step.dynamic_shared_bytes,
                    _values: values,
                    params,
                });
            }
            // `faults::check` placed each entry point's words inside the arena.
            let faults = view.faults.map(|f| (arena + f.offset, f.bytes() as usize));
            entries.push(EntryRun { inputs, outputs, launches, faults, exec: None, by_binding: Vec::new() });
        }

        let most_steps = entries.iter().map(|e| e.launches.len()).max().unwrap_or(0);
        for _ in 0..=most_steps {
            let mut event = ptr::null_mut();
            let flags = sys::CUevent_flags::CU_EVENT_DEFAULT as c_uint;
            // SAFETY: writes one handle; the context is current.
            cu("cuEventCreate", &label, unsafe { sys::cuEventCreate(&mut event, flags) })?;
            owned.events.push(event);
        }
        // SAFETY: the stream is the model's own; the uploads finish before capture begins.
        cu("cuStreamSynchronize", &label, unsafe { sys::cuStreamSynchronize(stream) })?;
        // A model with symbols captures a graph per binding, at its first run.
        if manifest.symbols.is_empty() {
            for entry in &mut entries {
                let grids: Vec<[u32; 3]> = entry.launches.iter().map(|l| fixed_grid(&l.grid)).collect();
                entry.exec = capture(&mut owned, &entry.launches, &grids, &label)?;
            }
        }

        Ok(CudaBackend {
            owned,
            info: caps.info,
            label,
            entries,
            arena,
            fault_words: Vec::new(),
            broken: None,
            symbols: manifest.symbols.clone(),
            symbol_words,
            max_grid: caps.max_grid,
        })
    }

    /// The device.
    pub fn info(&self) -> &CudaDeviceInfo {
        &self.info
    }

    /// The fault words as the last run left them (empty when no kernel can fault).
    pub fn fault_words(&self) -> &[u32] {
        &self.fault_words
    }

    /// Refuses to touch the device after a run failed half-way, and makes the model's context
    /// current on this thread.
    fn check_usable(&self) -> Result<(), RuntimeError> {
        if let Some(reason) = &self.broken {
            return Err(RuntimeError::CudaCall {
                call: "cuLaunchKernel",
                device: self.label.clone(),
                result: format!("an earlier run failed ({reason}); load the model again"),
            });
        }
        self.owned.make_current(&self.label)
    }

    /// Waits for the stream; a failure now, or `queued`'s, marks the model broken (copies to
    /// host buffers may have been in flight, and the context may be poisoned).
    fn finish(&mut self, queued: Result<(), RuntimeError>) -> Result<(), RuntimeError> {
        // SAFETY: the stream is the model's own.
        let waited =
            cu("cuStreamSynchronize", &self.label, unsafe { sys::cuStreamSynchronize(self.owned.stream) });
        queued.and(waited).inspect_err(|e| self.broken = Some(e.to_string()))
    }

    /// Copies the inputs in, replays entry point `entry`'s graph (or, with `times`, launches
    /// each step between two events and pushes each step's time), copies the outputs out and
    /// waits.
    pub fn execute(
        &mut self,
        entry: usize,
        values: &[u64],
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        self.check_usable()?;
        if entry >= self.entries.len() {
            return Err(RuntimeError::invalid(format!("entry point {entry} does not exist")));
        }
        let timed = times.is_some();
        let (grids, exec) = self.launch_plan(entry, values, timed)?;
        let run = &self.entries[entry];
        let steps = run.launches.len();
        let mut words = std::mem::take(&mut self.fault_words);
        words.clear();
        words.resize(run.faults.map_or(0, |(_, bytes)| bytes / 4), crate::faults::NONE);
        let symbols = self.symbol_words.map(|at| (at, crate::device::symbol_words(values)));
        let queued = self.queue(run, (&grids, exec, symbols), inputs, outputs, &mut words, timed);
        self.fault_words = words;
        // Wait even when queueing failed half-way: copies into `outputs` may be in flight.
        self.finish(queued)?;
        if let Some(times) = times {
            for pair in self.owned.events[..=steps].windows(2) {
                let mut ms: f32 = 0.0;
                // SAFETY: both events were recorded on the stream just synchronized.
                let result = unsafe { sys::cuEventElapsedTime(&mut ms, pair[0], pair[1]) };
                cu("cuEventElapsedTime", &self.label, result)?;
                // A NaN or infinite reading (never expected) becomes zero rather than a panic.
                times.push(Duration::try_from_secs_f64(f64::from(ms) / 1e3).unwrap_or_default());
            }
        }
        Ok(())
    }

    /// Each step's grid at symbol values `values`, and the graph a plain run of entry point
    /// `entry` replays there: the entry point's one graph, or for a model with symbols the
    /// graph of this binding, captured now when it is not among the latest
    /// [`GRAPHS_PER_ENTRY`] (the oldest is destroyed to make room). A timed run launches step
    /// by step and needs none.
    fn launch_plan(
        &mut self,
        entry: usize,
        values: &[u64],
        timed: bool,
    ) -> Result<(Vec<[u32; 3]>, Option<sys::CUgraphExec>), RuntimeError> {
        let run = &self.entries[entry];
        let mut grids = Vec::with_capacity(run.launches.len());
        for launch in &run.launches {
            let grid = crate::device::grid_at(&launch.label, &launch.grid, values, &self.symbols)?;
            if let Some(axis) = (0..3).find(|&a| grid[a] > self.max_grid[a]) {
                return Err(RuntimeError::DeviceLacks {
                    need: format!(
                        "step {:?} to launch grid {grid:?} at {}",
                        launch.label,
                        crate::symbols::binding_str(&self.symbols, values)
                    ),
                    device: self.label.clone(),
                    has: format!(
                        "allows at most {} blocks along axis {axis} (MAX_GRID_DIM_X/Y/Z)",
                        self.max_grid[axis]
                    ),
                });
            }
            grids.push(grid);
        }
        if timed || self.symbols.is_empty() {
            return Ok((grids, run.exec));
        }
        let run = &mut self.entries[entry];
        if let Some(at) = run.by_binding.iter().position(|(v, _)| v == values) {
            let hit = run.by_binding.remove(at);
            let exec = hit.1;
            run.by_binding.push(hit);
            return Ok((grids, Some(exec)));
        }
        if run.by_binding.len() == GRAPHS_PER_ENTRY {
            let (_, oldest) = run.by_binding.remove(0);
            self.owned.execs.retain(|&e| e != oldest);
            // SAFETY: the graph was instantiated in this context; the stream is idle (every run
            // synchronizes before it returns), so no launch of it is pending.
            let result = unsafe { sys::cuGraphExecDestroy(oldest) };
            cu("cuGraphExecDestroy", &self.label, result)?;
        }
        let exec = capture(&mut self.owned, &run.launches, &grids, &self.label)?;
        if let Some(exec) = exec {
            run.by_binding.push((values.to_vec(), exec));
        }
        Ok((grids, exec))
    }

    /// Queues entry point `run`'s input copies, symbol words, fault words' fill, steps (over
    /// `grids`, or as graph `exec`), and the copies of its outputs and of its fault words
    /// (into `fault_words`) on the stream.
    #[allow(clippy::type_complexity)]
    fn queue(
        &self,
        run: &EntryRun,
        (grids, exec, symbols): (&[[u32; 3]], Option<sys::CUgraphExec>, Option<(sys::CUdeviceptr, Vec<u8>)>),
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        fault_words: &mut [u32],
        timed: bool,
    ) -> Result<(), RuntimeError> {
        let (stream, label) = (self.owned.stream, self.label.as_str());
        if let Some((pointer, words)) = &symbols {
            // SAFETY: the model's buffer of 4 bytes per symbol, `words` one u32 per symbol; the
            // driver has consumed the host bytes when this returns (pageable memory is staged).
            let result =
                unsafe { sys::cuMemcpyHtoDAsync_v2(*pointer, words.as_ptr().cast(), words.len(), stream) };
            cu("cuMemcpyHtoDAsync", label, result)?;
        }
        if let Some((pointer, bytes)) = run.faults {
            // SAFETY: the words lie inside the model's arena; every byte 0xFF is `u32::MAX`,
            // "no fault", in every word.
            let result = unsafe { sys::cuMemsetD8Async(pointer, 0xFF, bytes, stream) };
            cu("cuMemsetD8Async", label, result)?;
        }
        for (input, &(pointer, room)) in inputs.iter().zip(&run.inputs) {
            let bytes = input.bytes.len();
            debug_assert!(bytes <= room);
            if bytes > 0 {
                // SAFETY: the model checked each input's length against its spec at the run's
                // symbol values, and the device buffer holds its largest size; the driver has
                // consumed the host bytes when this returns (pageable memory is staged).
                let result =
                    unsafe { sys::cuMemcpyHtoDAsync_v2(pointer, input.bytes.as_ptr().cast(), bytes, stream) };
                cu("cuMemcpyHtoDAsync", label, result)?;
            }
        }
        if timed {
            let events = &self.owned.events;
            // SAFETY: events and stream belong to this context.
            cu("cuEventRecord", label, unsafe { sys::cuEventRecord(events[0], stream) })?;
            for ((launch, &grid), &after) in run.launches.iter().zip(grids).zip(&events[1..]) {
                launch.launch(grid, stream, label)?;
                // SAFETY: as above.
                cu("cuEventRecord", label, unsafe { sys::cuEventRecord(after, stream) })?;
            }
        } else if let Some(exec) = exec {
            // SAFETY: the executable graph was instantiated in this context from launches whose
            // buffers the model still owns.
            cu("cuGraphLaunch", label, unsafe { sys::cuGraphLaunch(exec, stream) })?;
        }
        for (output, &(pointer, room)) in outputs.iter_mut().zip(&run.outputs) {
            let bytes = output.len();
            debug_assert!(bytes <= room);
            if bytes > 0 {
                // SAFETY: the model checked each output's length against its spec at the run's
                // symbol values (the device buffer holds its largest size); the caller's buffer
                // stays borrowed until `execute` has synchronized the stream.
                let result =
                    unsafe { sys::cuMemcpyDtoHAsync_v2(output.as_mut_ptr().cast(), pointer, bytes, stream) };
                cu("cuMemcpyDtoHAsync", label, result)?;
            }
        }
        if let Some((pointer, bytes)) = run.faults {
            debug_assert_eq!(fault_words.len() * 4, bytes);
            // SAFETY: `fault_words` holds `bytes` bytes and stays borrowed until `execute` has
            // synchronized the stream; the words lie inside the arena.
            let result =
                unsafe { sys::cuMemcpyDtoHAsync_v2(fault_words.as_mut_ptr().cast(), pointer, bytes, stream) };
            cu("cuMemcpyDtoHAsync", label, result)?;
        }
        Ok(())
    }

    /// Copies the arena bytes `range` (inside the state's slots, checked at load) into `out`.
    pub fn read_state(&mut self, range: std::ops::Range<usize>, out: &mut [u8]) -> Result<(), RuntimeError> {
        self.check_usable()?;
        debug_assert_eq!(range.len(), out.len());
        // SAFETY: the range lies in a slot inside the arena (`model::check_state`) and `out`
        // holds its bytes; `out` stays borrowed until `finish` has synchronized the stream.
        let result = unsafe {
            sys::cuMemcpyDtoHAsync_v2(
                out.as_mut_ptr().cast(),
                self.arena + range.start as u64,
                out.len(),
                self.owned.stream,
            )
        };
        let queued = cu("cuMemcpyDtoHAsync", &self.label, result);
        self.finish(queued)
    }

    /// Writes `value` into the arena bytes `range` (inside the state's slots, checked at load).
    pub fn write_state(&mut self, range: std::ops::Range<usize>, value: &[u8]) -> Result<(), RuntimeError> {
        self.check_usable()?;
        debug_assert_eq!(range.len(), value.len());
        // SAFETY: as in `read_state`; the driver has consumed the host bytes when the stream
        // is synchronized.
        let result = unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                self.arena + range.start as u64,
                value.as_ptr().cast(),
                value.len(),
                self.owned.stream,
            )
        };
        let queued = cu("cuMemcpyHtoDAsync", &self.label, result);
        self.finish(queued)
    }
}

/// Queues a copy of each state slot's initial weight into its slot of the zeroed arena on
/// `stream` (once, at load; the caller synchronizes before anything runs).
fn upload_state(
    manifest: &Manifest,
    weights: &WeightStore,
    arena: sys::CUdeviceptr,
    stream: sys::CUstream,
    label: &str,
) -> Result<(), RuntimeError> {
    for s in &manifest.state {
        let name = match &s.init {
            StateInit::Zeros => continue,
            StateInit::Weight { name } => name,
        };
        let value = weights.get(name).ok_or_else(|| {
            RuntimeError::invalid(format!(
                "state {:?} starts from weight {name:?}, which the weights file lacks",
                s.name
            ))
        })?;
        if value.bytes.is_empty() {
            continue;
        }
        // SAFETY: the slot lies inside the arena and the value has its size
        // (`model::check_state`); the host bytes are the mapped weights file, which the model
        // keeps.
        let result = unsafe {
            sys::cuMemcpyHtoDAsync_v2(
                arena + s.offset,
                value.bytes.as_ptr().cast(),
                value.bytes.len(),
                stream,
            )
        };
        cu("cuMemcpyHtoDAsync", label, result)?;
    }
    Ok(())
}

/// Queues a copy of each planned weight into the weights buffer on `stream` (once, at load; the
/// caller synchronizes before anything runs).
fn upload_weights(
    plan: &Plan,
    weights: &WeightStore,
    buffer: sys::CUdeviceptr,
    stream: sys::CUstream,
    label: &str,
) -> Result<(), RuntimeError> {
    for (name, offset) in &plan.weights {
        let view = weights
            .get(name)
            .ok_or_else(|| RuntimeError::MissingWeight { step: "(upload)".into(), name: name.clone() })?;
        if view.bytes.is_empty() {
            continue;
        }
        let (dst, src, len) = (buffer + offset, view.bytes.as_ptr().cast(), view.bytes.len());
        // SAFETY: the plan placed the weight's bytes at `offset` inside `weights_bytes`, the
        // buffer's size; the host bytes are the mapped weights file, which the model keeps
        // (and pageable sources are staged before the call returns anyway).
        let result = unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src, len, stream) };
        cu("cuMemcpyHtoDAsync", label, result)?;
    }
    Ok(())
}

/// Loads module `i`: its cubin when there is one and the device is exactly the target's
/// architecture (a cubin runs only there), else its PTX, which the driver JIT-compiles for the
/// device. A refusal carries the JIT's error log.
fn load_module(
    i: usize,
    module: &plan::ModulePlan,
    exact: bool,
    target: &CudaTarget,
    label: &str,
) -> Result<sys::CUmodule, RuntimeError> {
    // A cubin is copied into 8-byte words: the driver reads ELF headers in place, and an
    // artifact's byte range promises no alignment.
    let words: Vec<u64>;
    let (file, image): (&'static str, *const c_void) = match (&module.cubin, exact) {
        (Some(cubin), true) => {
            words = cubin
                .chunks(8)
                .map(|chunk| {
                    let mut word = [0u8; 8];
                    word[..chunk.len()].copy_from_slice(chunk);
                    u64::from_ne_bytes(word)
                })
                .collect();
            (CUBIN_FILE, words.as_ptr().cast())
        }
        (Some(_) | None, _) => (PTX_FILE, module.ptx.as_ptr().cast()),
    };
    let mut log = vec![0u8; LOG_BYTES];
    let mut options =
        [sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER, sys::CUjit_option::CU_JIT_ERROR_LOG_BUFFER_SIZE_BYTES];
    // Option values are pointer-sized words: the buffer's address, then its size as an integer.
    let mut values = [log.as_mut_ptr().cast::<c_void>(), ptr::without_provenance_mut::<c_void>(LOG_BYTES)];
    let mut handle = ptr::null_mut();
    // SAFETY: `image` is a NUL-terminated PTX text or a cubin ELF image (checked by the plan),
    // alive for the call; the two options name a writable buffer of LOG_BYTES bytes that
    // outlives the call.
    let result = unsafe {
        sys::cuModuleLoadDataEx(
            &mut handle,
            image,
            options.len() as c_uint,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    if result == sys::CUresult::CUDA_SUCCESS {
        return Ok(handle);
    }
    let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
    let log = String::from_utf8_lossy(&log[..end]).trim().to_string();
    let mut message = match result {
        sys::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            let driver = driver::driver_version().map_or("this driver".to_string(), |(major, minor)| {
                format!("this driver (CUDA {major}.{minor})")
            });
            format!(
                "{driver} does not accept PTX ISA {} ({}): update the NVIDIA driver",
                target.ptx_version,
                driver::describe(result)
            )
        }
        other => format!("the driver refused it on {label}: {}", driver::describe(other)),
    };
    if !log.is_empty() {
        message = format!("{message}; JIT log:\n{log}");
    }
    Err(RuntimeError::CudaModule { file, module: i, message })
}

/// Step `step`'s kernel in `module`, checked against what the step launches: a kernel whose
/// register use caps its block size below the step's block would fail at every run, and one
/// using more static shared memory than the target declares contradicts the manifest.
fn function(
    module: sys::CUmodule,
    step: &plan::StepPlan,
    target: &CudaTarget,
    caps: &DeviceCaps,
) -> Result<sys::CUfunction, RuntimeError> {
    let mut function = ptr::null_mut();
    // SAFETY: writes one handle; the module is loaded and the name NUL-terminated.
    let result = unsafe { sys::cuModuleGetFunction(&mut function, module, step.symbol.as_ptr()) };
    match result {
        sys::CUresult::CUDA_SUCCESS => {}
        sys::CUresult::CUDA_ERROR_NOT_FOUND => {
            return Err(RuntimeError::CudaModule {
                file: PTX_FILE,
                module: step.module,
                message: format!(
                    "step {:?} uses kernel {:?}, which the module does not define",
                    step.label, step.symbol
                ),
            })
        }
        other => cu("cuModuleGetFunction", &caps.label, other)?,
    }
    let attribute = |attribute: sys::CUfunction_attribute| -> Result<u64, RuntimeError> {
        let mut value: c_int = 0;
        // SAFETY: writes one int for a valid function and attribute.
        let result = unsafe { sys::cuFuncGetAttribute(&mut value, attribute, function) };
        cu("cuFuncGetAttribute", &caps.label, result)?;
        Ok(u64::try_from(value).unwrap_or(0))
    };
    let name = step.symbol.to_string_lossy();
    let max_threads = attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?;
    let threads = step.block.iter().map(|&n| u64::from(n)).product::<u64>();
    if threads > max_threads {
        return Err(RuntimeError::DeviceLacks {
            need: format!("step {:?} to run {threads} threads per block", step.label),
            device: caps.label.clone(),
            has: format!("runs kernel {name:?} with at most {max_threads} (its register use)"),
        });
    }
    let shared = attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)?;
    if shared > u64::from(target.max_shared_bytes) {
        return Err(RuntimeError::CudaModule {
            file: PTX_FILE,
            module: step.module,
            message: format!(
                "kernel {name:?} uses {shared} bytes of static shared memory, more than the target's \
                 max_shared_bytes {}",
                target.max_shared_bytes
            ),
        });
    }
    Ok(function)
}

/// Opts step `step`'s kernel in to the dynamic shared memory its launches pass: past 48 KiB
/// a launch is refused unless the function's `MAX_DYNAMIC_SHARED_SIZE_BYTES` allows it. The
/// driver refuses more than the device's opt-in limit less the kernel's static shared memory.
fn opt_in(function: sys::CUfunction, step: &plan::StepPlan, device: &str) -> Result<(), RuntimeError> {
    let bytes = step.dynamic_shared_bytes;
    let attribute = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
    let value = c_int::try_from(bytes).map_err(|_| {
        RuntimeError::invalid(format!(
            "step {:?} passes {bytes} bytes of dynamic shared memory, more than a launch can",
            step.label
        ))
    })?;
    // SAFETY: sets one attribute of a function of a module the model owns; the context is
    // current.
    let result = unsafe { sys::cuFuncSetAttribute(function, attribute, value) };
    cu("cuFuncSetAttribute", device, result).map_err(|e| match e {
        RuntimeError::CudaCall { call, device, result } => RuntimeError::CudaCall {
            call,
            device,
            result: format!(
                "{result} opting kernel {:?} of step {:?} in to {bytes} bytes of dynamic shared memory \
                 (MAX_DYNAMIC_SHARED_SIZE_BYTES)",
                step.symbol, step.label
            ),
        },
        other => other,
    })
}

/// Captures the launch sequence into a graph and instantiates it; `None` when there is nothing
/// to capture.
fn capture(
    owned: &mut Owned,
    launches: &[Launch],
    grids: &[[u32; 3]],
    label: &str,
) -> Result<Option<sys::CUgraphExec>, RuntimeError> {
    if launches.is_empty() {
        return Ok(None);
    }
    let stream = owned.stream;
    let mode = sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL;
    // SAFETY: the stream is the model's own and idle apart from the synchronous uploads.
    cu("cuStreamBeginCapture", label, unsafe { sys::cuStreamBeginCapture_v2(stream, mode) })?;
    let launched =
        launches.iter().zip(grids).try_for_each(|(launch, &grid)| launch.launch(grid, stream, label));
    let mut graph = ptr::null_mut();
    // SAFETY: ends the capture begun above (also after a failed launch, so the stream leaves
    // capture mode); writes one handle.
    let ended = cu("cuStreamEndCapture", label, unsafe { sys::cuStreamEndCapture(stream, &mut graph) });
    let instantiated = launched.and(ended).and_then(|()| {
        let mut exec = ptr::null_mut();
        // SAFETY: `graph` is the captured graph; writes one handle.
        cu("cuGraphInstantiate", label, unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) })?;
        owned.execs.push(exec);
        Ok(Some(exec))
    });
    if !graph.is_null() {
        // SAFETY: the graph was captured here and is used by nothing but its instantiation,
        // which is independent of it.
        let _ = unsafe { sys::cuGraphDestroy(graph) };
    }
    instantiated
}

/// A grid that is the same in every run (the model has no symbols: `plan` evaluated it).
fn fixed_grid(grid: &[Dim; 3]) -> [u32; 3] {
    grid.clone().map(|d| d.fixed().and_then(|n| u32::try_from(n).ok()).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CudaBackend>();
    }

    #[test]
    fn listing_without_a_driver_says_why() {
        let e = list(Some(OsStr::new("/nonexistent/libcuda.so.1"))).unwrap_err();
        assert!(
            matches!(&e, RuntimeError::CudaUnavailable { reason } if reason.starts_with("cannot load /nonexistent/libcuda.so.1: ")),
            "{e}"
        );
    }
}
