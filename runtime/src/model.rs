//! `Model`: a loaded artifact, checked once at load so that a run only binds buffers and runs
//! kernels. It owns the weights and a device backend (`device/`): the host CPU for a CPU
//! artifact, a Vulkan device for a Vulkan one, a CUDA device for a CUDA one; all sit behind the
//! same calls.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use serde::Deserialize;

use crate::device::{
    self, cuda::CudaBackend, host::HostBackend, vulkan::VulkanBackend, Backend, DeviceInfo, Selection,
};
use crate::error::RuntimeError;
use crate::exec;
use crate::kernels::{KernelSource, SharedLibrary};
use crate::manifest::{
    is_kernel_entry, name_problem, shape_str, DType, EntryView, FileDigest, Manifest, StateInit, StateSpec,
    Target, TensorSpec, CONTRACT_SYMBOL, CUBIN_FILE, FORWARD_ENTRY, KERNELS_FILE, MANIFEST_FILE, PTX_FILE,
    SPIRV_FILE, WEIGHTS_FILE,
};
use crate::profile::Profile;
use crate::symbols::{self, dims_str, SymbolSpec};
use crate::target;
use crate::tensor::{Tensor, TensorRef};
use crate::weights::WeightStore;
use crate::ARTIFACT_FORMAT_VERSION;

/// How to load a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Worker threads of a CPU model; `None` reads `KILN_THREADS`, else uses every available
    /// core. A Vulkan or CUDA model runs on one host thread and ignores it.
    pub threads: Option<usize>,
    /// The device: `"cpu"`, `"vulkan"` (the first discrete or integrated GPU, else any Vulkan
    /// device), `"vulkan:N"` (the N-th Vulkan device of [`crate::devices`]), `"cuda"` (CUDA
    /// device 0) or `"cuda:N"` (the driver's device N); `None` takes the kind the artifact was
    /// compiled for. A device of another kind than the artifact's target is an error.
    pub device: Option<String>,
}

/// A compiled model ready to run.
///
/// Runs take `&mut self` because every run uses the model's one arena: a run can never race
/// another on the intermediates, and the borrow checker says so instead of a lock. To serve
/// requests in parallel, load one `Model` per worker (the weights file is mapped, so its pages
/// are shared between them); each run is already parallel inside. A GPU model (Vulkan or CUDA)
/// owns its device buffers the same way: one arena, the weights uploaded once, and buffers for
/// the inputs and outputs that each run copies in and out.
pub struct Model {
    manifest: Manifest,
    /// Declared before `weights`: host launches point into the weights.
    backend: Backend,
    weights: WeightStore,
}

/// Reads only the version, so that a manifest of another format is refused by version rather
/// than by whichever field changed.
#[derive(Deserialize)]
struct VersionProbe {
    format_version: u32,
}

impl Model {
    /// Loads the artifact directory `dir` (`NAME.kiln/`) with default [`Options`].
    pub fn load(dir: impl AsRef<Path>) -> Result<Model, RuntimeError> {
        Model::load_with(dir, &Options::default())
    }

    /// Loads the artifact directory `dir`, checking the manifest against the device and the
    /// files against their recorded sizes and crc32s before any code is loaded.
    pub fn load_with(dir: impl AsRef<Path>, options: &Options) -> Result<Model, RuntimeError> {
        let dir = dir.as_ref();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text = read_manifest(&manifest_path)?;
        // The digest line first, so nothing of a damaged manifest is believed; but a manifest
        // of another format version (which may predate the line) is refused by its version.
        let text = match Manifest::split_digest(&text) {
            Ok(body) => body,
            Err(e) => {
                if let Ok(probe) = ron::from_str::<VersionProbe>(&text) {
                    check_version(probe.format_version)?;
                }
                return Err(e);
            }
        };
        let probe: VersionProbe =
            ron::from_str(text).map_err(|e| RuntimeError::ManifestSyntax { message: e.to_string() })?;
        check_version(probe.format_version)?;
        let manifest = Manifest::from_ron(text)?;
        let selection = device::select(&manifest.target, options.device.as_deref())?;
        let kernels_file = match &manifest.target {
            Target::Cpu(_) => {
                target::check(&manifest.target)?;
                KERNELS_FILE
            }
            Target::Vulkan(_) => SPIRV_FILE,
            Target::Cuda(_) => PTX_FILE,
        };

        for required in [kernels_file, WEIGHTS_FILE] {
            if !manifest.files.iter().any(|f| f.name == required) {
                return Err(RuntimeError::NoDigest { file: required.to_string() });
            }
        }
        let mut weights_map = None;
        let mut spirv = None;
        let mut ptx = None;
        let mut cubin = None;
        let mut native = None;
        for digest in &manifest.files {
            let plain = Path::new(&digest.name).file_name().is_some_and(|n| n == digest.name.as_str());
            if !plain {
                return Err(RuntimeError::invalid(format!("{:?} in files is not a file name", digest.name)));
            }
            let path = dir.join(&digest.name);
            if digest.name == WEIGHTS_FILE {
                let file = File::open(&path).map_err(|e| RuntimeError::io(&path, e))?;
                // SAFETY: read-only map of a file we rely on nobody modifying while loaded (the
                // usual contract of mmap-based loaders); its contents are checked just below.
                let map = unsafe { Mmap::map(&file) }.map_err(|e| RuntimeError::io(&path, e))?;
                check_digest(digest, &map)?;
                weights_map = Some(map);
            } else {
                let bytes = std::fs::read(&path).map_err(|e| RuntimeError::io(&path, e))?;
                check_digest(digest, &bytes)?;
                match digest.name.as_str() {
                    SPIRV_FILE => spirv = Some(bytes),
                    PTX_FILE => ptx = Some(bytes),
                    CUBIN_FILE => cubin = Some(bytes),
                    KERNELS_FILE => native = Some(bytes),
                    _ => {}
                }
            }
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let map = weights_map.ok_or_else(|| RuntimeError::NoDigest { file: WEIGHTS_FILE.to_string() })?;
        let weights = WeightStore::from_map(map, weights_path.display().to_string())?;
        match selection {
            Selection::Cpu => {
                let bytes =
                    native.ok_or_else(|| RuntimeError::NoDigest { file: KERNELS_FILE.to_string() })?;
                // Everything the manifest alone can contradict is refused before any code loads.
                check_specs(&manifest)?;
                check_steps(&manifest)?;
                // SAFETY: the bytes are the artifact's kernels.so as read once and verified
                // against the manifest's size and crc32 (they are what loads: no second read of
                // the file); trusting an artifact's code is what loading a compiled model means.
                let kernels = unsafe { SharedLibrary::from_bytes(&bytes, &dir.join(KERNELS_FILE)) }?;
                let embedded = kernels.data_u64(CONTRACT_SYMBOL);
                // Structural checks (arena, weights, symbols) come first for their precise
                // messages; nothing runs before the contract is checked just below.
                let model = Model::from_parts(manifest, Box::new(kernels), weights, options)?;
                let absent = format!("kernels.so exports no {CONTRACT_SYMBOL}");
                model.manifest.check_contract(KERNELS_FILE, embedded, &absent)?;
                Ok(model)
            }
            Selection::Vulkan(index) => {
                let spirv = spirv.ok_or_else(|| RuntimeError::NoDigest { file: SPIRV_FILE.to_string() })?;
                check_specs(&manifest)?;
                check_steps(&manifest)?;
                check_state(&manifest, &weights)?;
                let backend = VulkanBackend::load(&manifest, &spirv, &weights, index)?;
                Ok(Model { manifest, backend: Backend::Vulkan(Box::new(backend)), weights })
            }
            Selection::Cuda(index) => {
                let ptx = ptx.ok_or_else(|| RuntimeError::NoDigest { file: PTX_FILE.to_string() })?;
                check_specs(&manifest)?;
                check_steps(&manifest)?;
                check_state(&manifest, &weights)?;
                let backend = CudaBackend::load(&manifest, &ptx, cubin.as_deref(), &weights, index)?;
                Ok(Model { manifest, backend: Backend::Cuda(Box::new(backend)), weights })
            }
        }
    }

    /// Builds a CPU model from parts held in memory, e.g. by a JIT compiler whose engine lives
    /// in `kernels`. The manifest's `files` are not checked (there are none); all else is.
    pub fn from_parts(
        manifest: Manifest,
        kernels: Box<dyn KernelSource>,
        weights: WeightStore,
        options: &Options,
    ) -> Result<Model, RuntimeError> {
        check_version(manifest.format_version)?;
        match device::select(&manifest.target, options.device.as_deref())? {
            Selection::Cpu => {}
            Selection::Vulkan(_) | Selection::Cuda(_) => {
                return Err(RuntimeError::WrongDevice {
                    artifact: format!("a GPU manifest ({})", manifest.target.describe()),
                    device: "cpu (in-memory native kernels)".into(),
                    fix: "write the artifact to a directory and load it with Model::load_with".into(),
                })
            }
        }
        target::check(&manifest.target)?;
        check_specs(&manifest)?;
        check_steps(&manifest)?;
        check_state(&manifest, &weights)?;
        let env = std::env::var_os("KILN_THREADS").map(|v| v.to_string_lossy().into_owned());
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = exec::resolve_threads(options.threads, env, available)?;
        let mut host = HostBackend::new(&manifest, kernels, &weights, threads)?;
        // The state starts from its recorded values (the arena is zeroed: `Zeros` is done).
        for s in &manifest.state {
            if let StateInit::Weight { name } = &s.init {
                let value = weights.get(name).ok_or_else(|| state_weight_missing(s, name))?;
                host.arena_mut()[slot_range(s)].copy_from_slice(value.bytes);
            }
        }
        Ok(Model { manifest, backend: Backend::Host(host), weights })
    }

    /// Runs the model on `inputs` (in manifest order) and returns the outputs in manifest order:
    /// the first entry point, `forward`.
    /// With symbols, the outputs come back at the shapes the inputs bind.
    pub fn run(&mut self, inputs: &[TensorRef]) -> Result<Vec<Tensor>, RuntimeError> {
        self.run_entry(FORWARD_ENTRY, inputs)
    }

    /// The entry points, `forward` first (a train-step artifact adds `train_step`).
    pub fn entries(&self) -> Vec<String> {
        self.manifest.entry_views().iter().map(|e| e.name.to_string()).collect()
    }

    /// Runs entry point `entry` on `inputs` (in the order [`Model::entry_inputs`] gives) and
    /// returns its outputs. Every entry point reads and updates the model's one state.
    pub fn run_entry(&mut self, entry: &str, inputs: &[TensorRef]) -> Result<Vec<Tensor>, RuntimeError> {
        let index = self.entry_index(entry)?;
        let values = self.bind(index, inputs)?;
        let mut outputs = self.new_outputs(index, &values)?;
        let mut bufs: Vec<&mut [u8]> = outputs.iter_mut().map(Tensor::bytes_mut).collect();
        self.execute(index, &values, inputs, &mut bufs, None)?;
        Ok(outputs)
    }

    /// The inputs of entry point `entry`, in the order [`Model::run_entry`] takes them.
    pub fn entry_inputs(&self, entry: &str) -> Result<&[TensorSpec], RuntimeError> {
        let index = self.entry_index(entry)?;
        Ok(self.manifest.entry_views()[index].inputs)
    }

    /// The outputs of entry point `entry`, in the order [`Model::run_entry`] returns them.
    pub fn entry_outputs(&self, entry: &str) -> Result<&[TensorSpec], RuntimeError> {
        let index = self.entry_index(entry)?;
        Ok(self.manifest.entry_views()[index].outputs)
    }

    /// The names of the persistent state, in the manifest's order.
    pub fn state_names(&self) -> Vec<String> {
        self.manifest.state.iter().map(|s| s.name.clone()).collect()
    }

    /// The persistent state's tensors as the manifest declares them.
    pub fn state(&self) -> &[StateSpec] {
        &self.manifest.state
    }

    /// A copy of state tensor `name`'s current value (to save a checkpoint). On a GPU this
    /// copies the state from the device, so it takes the model as a run does.
    pub fn read_state(&mut self, name: &str) -> Result<Tensor, RuntimeError> {
        let s = self.state_spec(name)?;
        let spec = TensorSpec::fixed(s.name.clone(), s.dtype, &s.shape);
        let range = slot_range(s);
        let mut t = Tensor::zeroed(&spec, s.shape.clone())?;
        self.backend.read_state(range, t.bytes_mut())?;
        Ok(t)
    }

    /// Sets state tensor `name` (to resume from a checkpoint); `value` must have its dtype and
    /// shape (its name is not compared).
    pub fn write_state(&mut self, name: &str, value: &TensorRef) -> Result<(), RuntimeError> {
        let s = self.state_spec(name)?.clone();
        let fits = value.dtype == s.dtype
            && value.shape == s.shape.as_slice()
            && Some(value.bytes.len() as u64) == s.byte_len();
        if !fits {
            return Err(RuntimeError::StateValue {
                name: s.name.clone(),
                expected: format!("{}{}", s.dtype, shape_str(&s.shape)),
                got: format!("{}{} ({} bytes)", value.dtype, shape_str(value.shape), value.bytes.len()),
            });
        }
        self.backend.write_state(slot_range(&s), value.bytes)
    }

    fn state_spec(&self, name: &str) -> Result<&StateSpec, RuntimeError> {
        self.manifest.state.iter().find(|s| s.name == name).ok_or_else(|| RuntimeError::UnknownState {
            name: name.to_string(),
            known: match self.state_names() {
                names if names.is_empty() => "it keeps none".to_string(),
                names => format!("it keeps {}", names.join(", ")),
            },
        })
    }

    fn entry_index(&self, entry: &str) -> Result<usize, RuntimeError> {
        self.manifest.entry_views().iter().position(|e| e.name == entry).ok_or_else(|| {
            RuntimeError::UnknownEntry { entry: entry.to_string(), known: self.entries().join(", ") }
        })
    }

    /// Runs the model writing into caller-provided output buffers (manifest order, each exactly
    /// the output's byte size at the shapes the inputs bind, [`Model::output_shapes`]).
    /// Misaligned buffers are written through an aligned copy.
    pub fn run_into(&mut self, inputs: &[TensorRef], outputs: &mut [&mut [u8]]) -> Result<(), RuntimeError> {
        self.run_entry_into(FORWARD_ENTRY, inputs, outputs)
    }

    /// Runs entry point `entry` writing into caller-provided output buffers (in the order
    /// [`Model::entry_outputs`] gives, each exactly the output's byte size), as
    /// [`Model::run_into`] does for `forward`.
    pub fn run_entry_into(
        &mut self,
        entry: &str,
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
    ) -> Result<(), RuntimeError> {
        let index = self.entry_index(entry)?;
        let values = self.bind(index, inputs)?;
        self.execute(index, &values, inputs, outputs, None)
    }

    /// Runs entry point `entry` checking and binding its inputs once: `outputs` is given the
    /// output shapes at the values the inputs bind and returns the buffers to write (each
    /// exactly its shape's byte size). Returns those shapes. For callers that size or place
    /// output buffers per run (the C ABI's `kiln_model_run_shaped`) without binding twice.
    pub fn run_entry_shaped<'o, E: From<RuntimeError>>(
        &mut self,
        entry: &str,
        inputs: &[TensorRef],
        outputs: impl FnOnce(&[Vec<u64>]) -> Result<Vec<&'o mut [u8]>, E>,
    ) -> Result<Vec<Vec<u64>>, E> {
        let index = self.entry_index(entry)?;
        let values = self.bind(index, inputs)?;
        let shapes = self.shapes_at(index, &values)?;
        let mut buffers = outputs(&shapes)?;
        self.execute(index, &values, inputs, &mut buffers, None)?;
        Ok(shapes)
    }

    /// The shapes entry point `entry` returns for `inputs`: its outputs' shapes at the symbol
    /// values the inputs bind (the inputs are checked as a run checks them).
    pub fn output_shapes(&self, entry: &str, inputs: &[TensorRef]) -> Result<Vec<Vec<u64>>, RuntimeError> {
        let index = self.entry_index(entry)?;
        let values = self.bind(index, inputs)?;
        self.shapes_at(index, &values)
    }

    /// The output shapes of entry point `entry` at symbol values `values`.
    fn shapes_at(&self, entry: usize, values: &[u64]) -> Result<Vec<Vec<u64>>, RuntimeError> {
        let view = self.manifest.entry_views()[entry];
        view.outputs.iter().map(|o| symbols::shape_at(o, values, &self.manifest.symbols)).collect()
    }

    /// Runs the model `repeats` times (at least once), timing every step, and returns the last
    /// run's outputs with the median times.
    pub fn run_profiled(
        &mut self,
        inputs: &[TensorRef],
        repeats: usize,
    ) -> Result<(Vec<Tensor>, Profile), RuntimeError> {
        self.run_entry_profiled(FORWARD_ENTRY, inputs, repeats)
    }

    /// [`Model::run_profiled`] for entry point `entry` (a training artifact's `train_step`:
    /// every run is one more step, so its state moves on).
    pub fn run_entry_profiled(
        &mut self,
        entry: &str,
        inputs: &[TensorRef],
        repeats: usize,
    ) -> Result<(Vec<Tensor>, Profile), RuntimeError> {
        let index = self.entry_index(entry)?;
        let view = self.manifest.entry_views()[index];
        let values = self.bind(index, inputs)?;
        let mut outputs = self.new_outputs(index, &values)?;
        // The manifest's costs are at the symbols' hints: a step over a run-time range is
        // costed in proportion to its range (a GPU step's, its grid) at this run's sizes.
        let hints: Vec<u64> = self.manifest.symbols.iter().map(|s| s.hint).collect();
        let labels: Vec<(String, u64, u64)> = view
            .steps
            .iter()
            .map(|s| {
                let work = |at: &[u64]| -> Option<u64> {
                    match &s.dispatch {
                        crate::manifest::Dispatch::Cpu { range, .. } => range.at(at),
                        crate::manifest::Dispatch::Gpu { grid, .. } => {
                            grid.iter().try_fold(1u64, |acc, d| d.at(at).map(|g| acc.saturating_mul(g)))
                        }
                    }
                };
                let ratio = match (work(&values), work(&hints)) {
                    (Some(run), Some(hint)) if hint > 0 && run != hint => Some((run, hint)),
                    _ => None,
                };
                let cost =
                    |x: u64| ratio.map_or(x, |(run, hint)| (x as u128 * run as u128 / hint as u128) as u64);
                (s.label.clone(), cost(s.flops), cost(s.bytes))
            })
            .collect();
        let mut step_times = Vec::new();
        let mut run_times = Vec::new();
        for _ in 0..repeats.max(1) {
            let mut times = Vec::with_capacity(labels.len());
            let start = Instant::now();
            let mut bufs: Vec<&mut [u8]> = outputs.iter_mut().map(Tensor::bytes_mut).collect();
            self.execute(index, &values, inputs, &mut bufs, Some(&mut times))?;
            run_times.push(start.elapsed());
            step_times.push(times);
        }
        let profile = Profile::from_times(
            labels.into_iter(),
            &step_times,
            run_times,
            self.manifest.arena_bytes,
            self.threads(),
        );
        Ok((outputs, profile))
    }

    /// The sizes each run binds from its inputs' shapes (empty when every shape is fixed).
    pub fn symbols(&self) -> &[SymbolSpec] {
        &self.manifest.symbols
    }

    /// The graph inputs, in the order `run` takes them.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.manifest.inputs
    }

    /// The graph outputs, in the order `run` returns them.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.manifest.outputs
    }

    /// The manifest the model was built from.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Host worker threads each run uses (1 for a Vulkan or CUDA model: the thread that submits).
    pub fn threads(&self) -> usize {
        self.backend.threads()
    }

    /// The device the model runs on.
    pub fn device(&self) -> DeviceInfo {
        self.backend.device()
    }

    /// Size of the model's scratch arena.
    pub fn arena_bytes(&self) -> u64 {
        self.manifest.arena_bytes
    }

    /// The weights the steps read.
    pub fn weights(&self) -> &WeightStore {
        &self.weights
    }

    /// Checks `inputs` against entry point `entry` and returns the symbol values they bind.
    fn bind(&self, entry: usize, inputs: &[TensorRef]) -> Result<Vec<u64>, RuntimeError> {
        check_inputs(&self.manifest.symbols, &self.manifest.entry_views()[entry], inputs)
    }

    /// Zeroed outputs of entry point `entry` at symbol values `values`.
    fn new_outputs(&self, entry: usize, values: &[u64]) -> Result<Vec<Tensor>, RuntimeError> {
        let view = self.manifest.entry_views()[entry];
        view.outputs
            .iter()
            .map(|o| Tensor::zeroed(o, symbols::shape_at(o, values, &self.manifest.symbols)?))
            .collect()
    }

    /// Runs entry point `entry` on inputs that bound symbol values `values`.
    fn execute(
        &mut self,
        entry: usize,
        values: &[u64],
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        let view = self.manifest.entry_views()[entry];
        check_count("output", view.outputs.len(), outputs.len())?;
        for (spec, buf) in view.outputs.iter().zip(outputs.iter()) {
            let expected = spec.byte_len_at(values).unwrap_or(u64::MAX);
            if buf.len() as u64 != expected {
                let name = spec.name.clone();
                return Err(RuntimeError::BufferSize {
                    kind: "output",
                    name,
                    expected,
                    got: buf.len() as u64,
                });
            }
        }
        self.backend.execute(entry, values, inputs, outputs, times)?;
        // A kernel that faulted (an integer division by zero) makes the run an error.
        crate::faults::check_run(&view, self.backend.fault_words())
    }
}

/// Checks the inputs against an entry point's (names, dtypes, shapes, sizes and index bounds)
/// and returns the symbol values their shapes bind.
fn check_inputs(
    symbols: &[SymbolSpec],
    view: &EntryView<'_>,
    inputs: &[TensorRef],
) -> Result<Vec<u64>, RuntimeError> {
    check_count("input", view.inputs.len(), inputs.len())?;
    for (index, (spec, input)) in view.inputs.iter().zip(inputs).enumerate() {
        if input.name != spec.name {
            return Err(RuntimeError::InputName {
                index,
                expected: spec.name.clone(),
                got: input.name.to_string(),
            });
        }
        if input.dtype != spec.dtype {
            return Err(RuntimeError::InputDtype {
                name: spec.name.clone(),
                expected: spec.dtype,
                got: input.dtype,
            });
        }
    }
    let shapes: Vec<&[u64]> = inputs.iter().map(|i| i.shape).collect();
    let values = symbols::bind(symbols, view.inputs, &shapes)?;
    for (index, (spec, input)) in view.inputs.iter().zip(inputs).enumerate() {
        let expected = spec.byte_len_at(&values).unwrap_or(u64::MAX);
        if input.bytes.len() as u64 != expected {
            let (name, got) = (spec.name.clone(), input.bytes.len() as u64);
            return Err(RuntimeError::BufferSize { kind: "input", name, expected, got });
        }
        if let Some(&Some(bound)) = view.index_bounds.get(index) {
            check_index_input(spec, input.shape, bound, input.bytes)?;
        }
    }
    Ok(values)
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model", &self.manifest.model)
            .field("steps", &self.manifest.steps.len())
            .field("device", &self.backend.device().id())
            .field("threads", &self.threads())
            .field("arena_bytes", &self.manifest.arena_bytes)
            .field("weights", &self.weights.len())
            .finish_non_exhaustive()
    }
}

/// The most bytes a manifest may have: the largest shipped model's is about 200 KiB; a file
/// far larger is not a manifest, and reading it whole would only exhaust memory.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Reads `manifest.ron`, refusing one over [`MAX_MANIFEST_BYTES`] before reading it.
fn read_manifest(path: &Path) -> Result<String, RuntimeError> {
    use std::io::Read;
    let file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut text = String::new();
    // One byte past the limit tells a file at the limit from a larger one (even a device or
    // a growing file, whose metadata would not say).
    file.take(MAX_MANIFEST_BYTES + 1).read_to_string(&mut text).map_err(|e| RuntimeError::io(path, e))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(RuntimeError::ManifestDigest {
            problem: format!("it is larger than {MAX_MANIFEST_BYTES} bytes, which no manifest is"),
        });
    }
    Ok(text)
}

fn check_version(found: u32) -> Result<(), RuntimeError> {
    if found == ARTIFACT_FORMAT_VERSION {
        Ok(())
    } else {
        Err(RuntimeError::FormatVersion { found, expected: ARTIFACT_FORMAT_VERSION })
    }
}

fn check_digest(digest: &FileDigest, contents: &[u8]) -> Result<(), RuntimeError> {
    let found = contents.len() as u64;
    if found != digest.bytes {
        return Err(RuntimeError::FileSize { file: digest.name.clone(), expected: digest.bytes, found });
    }
    let crc = crc32fast::hash(contents);
    if crc != digest.crc32 {
        return Err(RuntimeError::FileCrc { file: digest.name.clone(), expected: digest.crc32, found: crc });
    }
    Ok(())
}

/// Entry points must have distinct plain names; each entry's inputs and outputs distinct names
/// and sizes that fit in memory.
fn check_specs(manifest: &Manifest) -> Result<(), RuntimeError> {
    let views = manifest.entry_views();
    symbols::check(&manifest.symbols, &views)?;
    let maxima = manifest.max_values();
    for (i, view) in views.iter().enumerate() {
        if let Some(problem) = name_problem(view.name) {
            return Err(RuntimeError::invalid(format!("entry point name {:?} {problem}", view.name)));
        }
        if views[..i].iter().any(|v| v.name == view.name) {
            return Err(RuntimeError::invalid(format!("two entry points are named {:?}", view.name)));
        }
        check_entry_specs(view, &manifest.symbols, &maxima)?;
    }
    Ok(())
}

fn check_entry_specs(
    view: &EntryView<'_>,
    symbols: &[SymbolSpec],
    maxima: &[u64],
) -> Result<(), RuntimeError> {
    let bounds = view.index_bounds.len();
    if bounds != 0 && bounds != view.inputs.len() {
        return Err(RuntimeError::invalid(format!(
            "{bounds} index bounds for {} inputs (there must be one per input, or none)",
            view.inputs.len()
        )));
    }
    for (kind, specs) in [("input", view.inputs), ("output", view.outputs)] {
        for (i, spec) in specs.iter().enumerate() {
            // Names become files under `kiln run -o` and C strings: one plain path component.
            if let Some(problem) = name_problem(&spec.name) {
                return Err(RuntimeError::invalid(format!("{kind} name {:?} {problem}", spec.name)));
            }
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(RuntimeError::invalid(format!("two {kind}s are named {:?}", spec.name)));
            }
            if kind == "input" && view.index_bounds.get(i).is_some_and(Option::is_some) {
                match spec.dtype {
                    DType::I32 | DType::I64 => {}
                    DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::Bool => {
                        return Err(RuntimeError::invalid(format!(
                            "input {:?} has an index bound but dtype {} (gather indices are i32 or i64)",
                            spec.name, spec.dtype
                        )))
                    }
                }
            }
            // At the symbols' maxima: the largest buffer any run can need.
            if spec.byte_len_at(maxima).and_then(|n| usize::try_from(n).ok()).is_none() {
                return Err(RuntimeError::invalid(format!(
                    "{kind} {:?} of shape {} is too large for this machine",
                    spec.name,
                    dims_str(&spec.shape, symbols)
                )));
            }
        }
    }
    Ok(())
}

/// Steps must be in the compiler's order (step `i` is labelled `k{i} …`), so a reordered
/// manifest cannot make a step read an intermediate before the step that writes it; and a CPU
/// step must name a kernel entry of the form the compiler writes ([`is_kernel_entry`]), so a
/// manifest can never make the runtime call `abort`, `exit` or `free`. The fault table is
/// checked against the steps here too (`faults::check`).
fn check_steps(manifest: &Manifest) -> Result<(), RuntimeError> {
    for view in manifest.entry_views() {
        check_entry_steps(manifest, view.steps)?;
        crate::faults::check(&view, manifest.arena_bytes)?;
    }
    Ok(())
}

fn check_entry_steps(manifest: &Manifest, steps: &[crate::manifest::Step]) -> Result<(), RuntimeError> {
    for (i, step) in steps.iter().enumerate() {
        let numbered = step
            .label
            .strip_prefix(&format!("k{i}"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '));
        if !numbered {
            return Err(RuntimeError::invalid(format!(
                "step {i} is labelled {:?}, not \"k{i} …\": the steps are out of order or were edited",
                step.label
            )));
        }
        match manifest.target {
            Target::Cpu(_) => {
                if !is_kernel_entry(&step.symbol) {
                    return Err(RuntimeError::invalid(format!(
                        "step {:?} names symbol {:?}, which is not a kernel entry (kiln_k<N>)",
                        step.label, step.symbol
                    )));
                }
            }
            // GPU entry points are looked up in the step's own module, never in the process.
            Target::Vulkan(_) | Target::Cuda(_) => {}
        }
        // The symbol values as a buffer: for a GPU kernel of a model that has symbols.
        if step.args.contains(&crate::manifest::BufRef::Symbols) {
            let problem = match manifest.target {
                Target::Cpu(_) => Some("a CPU kernel takes them as its `syms` argument"),
                Target::Vulkan(_) | Target::Cuda(_) if manifest.symbols.is_empty() => {
                    Some("the manifest declares no symbols")
                }
                Target::Vulkan(_) | Target::Cuda(_) => None,
            };
            if let Some(problem) = problem {
                return Err(RuntimeError::invalid(format!(
                    "step {:?} passes the symbol values as a buffer, but {problem}",
                    step.label
                )));
            }
        }
    }
    Ok(())
}

/// The bytes of the arena that state `s` occupies (its range was checked at load).
fn slot_range(s: &StateSpec) -> std::ops::Range<usize> {
    let start = s.offset as usize;
    start..start + s.byte_len().unwrap_or(0) as usize
}

fn state_weight_missing(s: &StateSpec, name: &str) -> RuntimeError {
    RuntimeError::invalid(format!(
        "state {:?} starts from weight {name:?}, which the weights file lacks",
        s.name
    ))
}

/// The state table must fit the arena: plain distinct names, sizes that fit in memory, slots
/// 64-byte aligned inside the arena and apart from each other, initial weights of the slot's
/// dtype and size; and every step's arena range must lie inside one slot or outside them all,
/// so no scratch buffer ever shares a slot's bytes.
fn check_state(manifest: &Manifest, weights: &WeightStore) -> Result<(), RuntimeError> {
    let mut slots: Vec<(u64, u64, &str)> = Vec::with_capacity(manifest.state.len());
    for (i, s) in manifest.state.iter().enumerate() {
        let bad = |problem: String| RuntimeError::invalid(format!("state {:?} {problem}", s.name));
        if let Some(problem) = name_problem(&s.name) {
            return Err(bad(problem.to_string()));
        }
        if manifest.state[..i].iter().any(|o| o.name == s.name) {
            return Err(bad("is declared twice".into()));
        }
        let bytes = s
            .byte_len()
            .filter(|&b| usize::try_from(b).is_ok())
            .ok_or_else(|| bad(format!("of shape {} is too large for this machine", shape_str(&s.shape))))?;
        let end = s.offset.checked_add(bytes).filter(|&e| e <= manifest.arena_bytes).ok_or_else(|| {
            bad(format!(
                "at arena offset {} ({bytes} bytes) lies outside the arena of {} bytes",
                s.offset, manifest.arena_bytes
            ))
        })?;
        if !s.offset.is_multiple_of(crate::buffer::ALIGN as u64) {
            return Err(bad(format!("at arena offset {} is not 64-byte aligned", s.offset)));
        }
        if let StateInit::Weight { name } = &s.init {
            let w = weights.get(name).ok_or_else(|| state_weight_missing(s, name))?;
            if w.dtype != s.dtype || w.bytes.len() as u64 != bytes {
                return Err(bad(format!(
                    "is {}{} but starts from weight {name:?}, {}{}",
                    s.dtype,
                    shape_str(&s.shape),
                    w.dtype,
                    shape_str(w.shape)
                )));
            }
        }
        slots.push((s.offset, end, &s.name));
    }
    slots.sort_unstable();
    for pair in slots.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(RuntimeError::invalid(format!(
                "state {:?} and {:?} overlap in the arena",
                pair[0].2, pair[1].2
            )));
        }
    }
    for view in manifest.entry_views() {
        for step in view.steps {
            for arg in &step.args {
                let crate::manifest::BufRef::Arena { offset, bytes } = arg else { continue };
                let end = offset.saturating_add(*bytes);
                let inside = slots.iter().any(|&(s, e, _)| s <= *offset && end <= e);
                let apart = slots.iter().all(|&(s, e, _)| end <= s || e <= *offset);
                if !(inside || apart) {
                    return Err(RuntimeError::invalid(format!(
                        "step {:?} of entry point {:?} reads or writes arena bytes {offset}..{end}, which straddle a state slot",
                        step.label, view.name
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Every element of an index input must lie in `0..bound`, the smallest extent of the tables
/// it indexes (the manifest's `index_bounds`): the interpreter refuses anything else,
/// negative values included, and so does every compiled path, before any kernel runs. The
/// check is one pass over the index inputs (token ids: small next to the run).
fn check_index_input(spec: &TensorSpec, shape: &[u64], bound: u64, bytes: &[u8]) -> Result<(), RuntimeError> {
    let bad = |position: usize, index: i64| {
        let mut at = Vec::with_capacity(shape.len());
        let mut rest = position as u64;
        for &d in shape.iter().rev() {
            // A tensor with an element has no zero extent; `unwrap_or(0)` only keeps this total.
            at.push(rest.checked_rem(d).unwrap_or(0));
            rest = rest.checked_div(d).unwrap_or(0);
        }
        at.reverse();
        Err(RuntimeError::GatherIndex {
            input: spec.name.clone(),
            index,
            position: shape_str(&at),
            extent: bound,
        })
    };
    let in_range = |v: i64| u64::try_from(v).is_ok_and(|v| v < bound);
    match spec.dtype {
        DType::I32 => {
            for (i, chunk) in bytes.chunks_exact(4).enumerate() {
                let v = i64::from(i32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]));
                if !in_range(v) {
                    return bad(i, v);
                }
            }
        }
        DType::I64 => {
            for (i, chunk) in bytes.chunks_exact(8).enumerate() {
                let mut word = [0u8; 8];
                word.copy_from_slice(chunk);
                let v = i64::from_le_bytes(word);
                if !in_range(v) {
                    return bad(i, v);
                }
            }
        }
        // Gather takes integer indices only, so the compiler records no bound for these; a
        // manifest that does is refused at load (`check_specs`).
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 | DType::Bool => {}
    }
    Ok(())
}

pub(crate) fn check_index(
    step: &str,
    kind: &'static str,
    index: u32,
    count: usize,
) -> Result<usize, RuntimeError> {
    if (index as usize) < count {
        Ok(index as usize)
    } else {
        Err(RuntimeError::BufIndex { step: step.to_string(), kind, index, count })
    }
}

fn check_count(kind: &'static str, expected: usize, got: usize) -> Result<(), RuntimeError> {
    if expected == got {
        Ok(())
    } else {
        Err(RuntimeError::Count { kind, expected, got })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_can_move_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Model>();
    }

    #[test]
    fn future_manifests_are_refused_by_version() {
        let text = "(format_version: 8, some_new_field: [1, 2], model: \"m\")";
        let probe: VersionProbe = ron::from_str(text).unwrap();
        let err = check_version(probe.format_version).unwrap_err();
        assert_eq!(
            err.to_string(),
            "artifact format version 8, this runtime reads version 7: recompile the model"
        );
    }
}
