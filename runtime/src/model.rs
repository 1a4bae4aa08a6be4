//! `Model`: a loaded artifact, checked once at load so that a run only binds buffers and calls
//! kernels. It owns the arena, the weights, the kernels and the thread pool.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use memmap2::Mmap;
use rayon::ThreadPool;
use serde::Deserialize;

use crate::buffer::AlignedBuf;
use crate::error::RuntimeError;
use crate::exec::{self, SendPtr};
use crate::kernels::{KernelFn, KernelSource, SharedLibrary};
use crate::manifest::{
    shape_str, BufRef, Dispatch, FileDigest, Manifest, TensorSpec, KERNELS_FILE, MANIFEST_FILE, WEIGHTS_FILE,
};
use crate::profile::Profile;
use crate::target;
use crate::tensor::{Tensor, TensorRef};
use crate::weights::WeightStore;
use crate::ARTIFACT_FORMAT_VERSION;

/// How to load a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Worker threads; `None` reads `KILN_THREADS`, else uses every available core.
    pub threads: Option<usize>,
}

/// A compiled model ready to run.
///
/// Runs take `&mut self` because every run uses the model's one arena: a run can never race
/// another on the intermediates, and the borrow checker says so instead of a lock. To serve
/// requests in parallel, load one `Model` per worker (the weights file is mapped, so its pages
/// are shared between them); each run is already parallel inside.
pub struct Model {
    manifest: Manifest,
    launches: Vec<Launch>,
    threads: usize,
    pool: Option<ThreadPool>,
    /// Owns the memory the launches' arena pointers point into.
    _arena: AlignedBuf,
    weights: WeightStore,
    /// Keeps the code of every `Launch::kernel` alive: the pointers are private and used only
    /// through `&mut self`, so no kernel can be called after this is dropped with the model.
    _kernels: Box<dyn KernelSource>,
}

/// A step resolved at load: its kernel, its argument array with the fixed pointers (arena,
/// weights) filled in, and the slots to fill with the caller's buffers on each run.
struct Launch {
    kernel: KernelFn,
    args: Vec<SendPtr>,
    slots: Vec<(usize, Slot)>,
    range: u64,
    grain: u64,
}

#[derive(Clone, Copy)]
enum Slot {
    Input(usize),
    Output(usize),
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

    /// Loads the artifact directory `dir`, checking the manifest against the machine and the
    /// files against their recorded sizes and crc32s before any code is loaded.
    pub fn load_with(dir: impl AsRef<Path>, options: &Options) -> Result<Model, RuntimeError> {
        let dir = dir.as_ref();
        let manifest_path = dir.join(MANIFEST_FILE);
        let text =
            std::fs::read_to_string(&manifest_path).map_err(|e| RuntimeError::io(&manifest_path, e))?;
        let probe: VersionProbe =
            ron::from_str(&text).map_err(|e| RuntimeError::ManifestSyntax { message: e.to_string() })?;
        check_version(probe.format_version)?;
        let manifest = Manifest::from_ron(&text)?;
        target::check(&manifest.target)?;

        for required in [KERNELS_FILE, WEIGHTS_FILE] {
            if !manifest.files.iter().any(|f| f.name == required) {
                return Err(RuntimeError::NoDigest { file: required.to_string() });
            }
        }
        let mut weights_map = None;
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
            }
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let map = weights_map.ok_or_else(|| RuntimeError::NoDigest { file: WEIGHTS_FILE.to_string() })?;
        let weights = WeightStore::from_map(map, weights_path.display().to_string())?;
        // SAFETY: the file is the artifact's kernels.so, verified against the manifest's crc32;
        // trusting an artifact's code is what loading a compiled model means.
        let kernels = unsafe { SharedLibrary::open(dir.join(KERNELS_FILE)) }?;
        Model::from_parts(manifest, Box::new(kernels), weights, options)
    }

    /// Builds a model from parts held in memory, e.g. by a JIT compiler whose engine lives in
    /// `kernels`. The manifest's `files` are not checked (there are none); all else is.
    pub fn from_parts(
        manifest: Manifest,
        kernels: Box<dyn KernelSource>,
        weights: WeightStore,
        options: &Options,
    ) -> Result<Model, RuntimeError> {
        check_version(manifest.format_version)?;
        target::check(&manifest.target)?;
        check_specs(&manifest)?;
        let env = std::env::var_os("KILN_THREADS").map(|v| v.to_string_lossy().into_owned());
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = exec::resolve_threads(options.threads, env, available)?;
        let pool = exec::pool(threads)?;
        let mut arena = AlignedBuf::zeroed(manifest.arena_bytes, "arena")?;
        let arena_base = arena.as_mut_ptr();

        let mut launches = Vec::with_capacity(manifest.steps.len());
        for step in &manifest.steps {
            let at = &step.label;
            let Dispatch::Cpu { range, grain } = step.dispatch else {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} is a GPU dispatch in a CPU artifact"
                )));
            };
            if grain == 0 {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} has grain 0 (it must be at least 1)"
                )));
            }
            if i64::try_from(range).is_err() {
                return Err(RuntimeError::invalid(format!("step {at:?} has range {range} (over i64::MAX)")));
            }
            let mut args = Vec::with_capacity(step.args.len());
            let mut slots = Vec::new();
            for arg in &step.args {
                let ptr = match arg {
                    BufRef::Arena { offset, bytes } => {
                        let end = offset.saturating_add(*bytes);
                        let problem = if end > manifest.arena_bytes {
                            Some("outside the arena")
                        } else if !offset.is_multiple_of(crate::buffer::ALIGN as u64) {
                            Some("not 64-byte aligned")
                        } else {
                            None
                        };
                        if let Some(problem) = problem {
                            return Err(RuntimeError::ArenaRange {
                                step: at.clone(),
                                offset: *offset,
                                end,
                                arena_bytes: manifest.arena_bytes,
                                problem,
                            });
                        }
                        // SAFETY: offset <= arena_bytes, checked above, so the result stays
                        // inside the allocation (or one past its end for an empty range).
                        unsafe { arena_base.add(*offset as usize) }
                    }
                    BufRef::Weight { name, bytes } => {
                        let view = weights.get(name).ok_or_else(|| RuntimeError::MissingWeight {
                            step: at.clone(),
                            name: name.clone(),
                        })?;
                        if view.bytes.len() as u64 != *bytes {
                            return Err(RuntimeError::WeightSize {
                                step: at.clone(),
                                name: name.clone(),
                                expected: *bytes,
                                found: view.bytes.len() as u64,
                            });
                        }
                        // Kernels only read weights (the mapped file is read-only).
                        view.bytes.as_ptr().cast_mut()
                    }
                    BufRef::Input { index } => {
                        let i = check_index(at, "input", *index, manifest.inputs.len())?;
                        slots.push((args.len(), Slot::Input(i)));
                        std::ptr::null_mut()
                    }
                    BufRef::Output { index } => {
                        let i = check_index(at, "output", *index, manifest.outputs.len())?;
                        slots.push((args.len(), Slot::Output(i)));
                        std::ptr::null_mut()
                    }
                };
                args.push(SendPtr(ptr));
            }
            let kernel = kernels.lookup(&step.symbol).ok_or_else(|| RuntimeError::MissingSymbol {
                step: at.clone(),
                symbol: step.symbol.clone(),
            })?;
            launches.push(Launch { kernel, args, slots, range, grain });
        }
        Ok(Model { manifest, launches, threads, pool, _arena: arena, weights, _kernels: kernels })
    }

    /// Runs the model on `inputs` (in manifest order) and returns the outputs in manifest order.
    pub fn run(&mut self, inputs: &[TensorRef]) -> Result<Vec<Tensor>, RuntimeError> {
        let mut outputs = self.new_outputs()?;
        self.run_outputs(inputs, &mut outputs, None)?;
        Ok(outputs)
    }

    /// Runs the model writing into caller-provided output buffers (manifest order, each exactly
    /// the output's byte size). Misaligned buffers are written through an aligned copy.
    pub fn run_into(&mut self, inputs: &[TensorRef], outputs: &mut [&mut [u8]]) -> Result<(), RuntimeError> {
        self.execute(inputs, outputs, None)
    }

    /// Runs the model `repeats` times (at least once), timing every step, and returns the last
    /// run's outputs with the median times.
    pub fn run_profiled(
        &mut self,
        inputs: &[TensorRef],
        repeats: usize,
    ) -> Result<(Vec<Tensor>, Profile), RuntimeError> {
        let mut outputs = self.new_outputs()?;
        let mut step_times = Vec::new();
        let mut run_times = Vec::new();
        for _ in 0..repeats.max(1) {
            let mut times = Vec::with_capacity(self.launches.len());
            let start = Instant::now();
            self.run_outputs(inputs, &mut outputs, Some(&mut times))?;
            run_times.push(start.elapsed());
            step_times.push(times);
        }
        let labels = self.manifest.steps.iter().map(|s| (s.label.clone(), s.flops, s.bytes));
        let profile =
            Profile::from_times(labels, &step_times, run_times, self.manifest.arena_bytes, self.threads);
        Ok((outputs, profile))
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

    /// Worker threads each run uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Size of the model's scratch arena.
    pub fn arena_bytes(&self) -> u64 {
        self.manifest.arena_bytes
    }

    /// The weights the steps read.
    pub fn weights(&self) -> &WeightStore {
        &self.weights
    }

    fn new_outputs(&self) -> Result<Vec<Tensor>, RuntimeError> {
        self.manifest.outputs.iter().map(Tensor::zeroed).collect()
    }

    fn run_outputs(
        &mut self,
        inputs: &[TensorRef],
        outputs: &mut [Tensor],
        times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        let mut bufs: Vec<&mut [u8]> = outputs.iter_mut().map(Tensor::bytes_mut).collect();
        self.execute(inputs, &mut bufs, times)
    }

    fn execute(
        &mut self,
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        mut times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        let realigned_inputs = self.check_inputs(inputs)?;
        let input_ptrs: Vec<SendPtr> = inputs
            .iter()
            .zip(&realigned_inputs)
            .map(|(input, copy)| {
                SendPtr(copy.as_ref().map_or(input.bytes.as_ptr(), |c| c.as_slice().as_ptr()).cast_mut())
            })
            .collect();

        check_count("output", self.manifest.outputs.len(), outputs.len())?;
        let mut realigned_outputs = Vec::with_capacity(outputs.len());
        for (spec, buf) in self.manifest.outputs.iter().zip(outputs.iter()) {
            let expected = spec.byte_len().unwrap_or(u64::MAX);
            if buf.len() as u64 != expected {
                let name = spec.name.clone();
                return Err(RuntimeError::BufferSize {
                    kind: "output",
                    name,
                    expected,
                    got: buf.len() as u64,
                });
            }
            let aligned = (buf.as_ptr() as usize).is_multiple_of(spec.dtype.size_bytes());
            realigned_outputs.push(if aligned {
                None
            } else {
                Some(AlignedBuf::zeroed(expected, "output copy")?)
            });
        }
        let output_ptrs: Vec<SendPtr> = outputs
            .iter_mut()
            .zip(realigned_outputs.iter_mut())
            .map(|(buf, copy)| SendPtr(copy.as_mut().map_or(buf.as_mut_ptr(), AlignedBuf::as_mut_ptr)))
            .collect();

        let (pool, threads) = (self.pool.as_ref(), self.threads);
        let launches = &mut self.launches;
        let mut steps = move || {
            for launch in launches.iter_mut() {
                for &(arg, slot) in &launch.slots {
                    launch.args[arg] = match slot {
                        Slot::Input(i) => input_ptrs[i],
                        Slot::Output(i) => output_ptrs[i],
                    };
                }
                let start = Instant::now();
                // SAFETY: every pointer is live for this call: the arena and weights are owned
                // by `self`, the inputs and outputs are borrowed by this call, and all were
                // checked to have the sizes the manifest gives. `self.kernels` keeps the code
                // loaded. The kernel's contract (ranges, disjoint writes) is the artifact's,
                // checked at compile.
                unsafe {
                    exec::launch(launch.kernel, &launch.args, launch.range, launch.grain, pool, threads)
                };
                if let Some(times) = times.as_deref_mut() {
                    times.push(start.elapsed());
                }
            }
        };
        // The whole run is one job on the pool: each step then splits from inside it, which
        // costs a work-stealing join instead of waking the pool from outside and putting the
        // caller to sleep once per step.
        match pool {
            Some(pool) => pool.install(steps),
            None => steps(),
        }

        for (buf, copy) in outputs.iter_mut().zip(&realigned_outputs) {
            if let Some(copy) = copy {
                buf.copy_from_slice(copy.as_slice());
            }
        }
        Ok(())
    }

    /// Checks the inputs against the manifest; returns aligned copies of misaligned ones.
    fn check_inputs(&self, inputs: &[TensorRef]) -> Result<Vec<Option<AlignedBuf>>, RuntimeError> {
        check_count("input", self.manifest.inputs.len(), inputs.len())?;
        let mut copies = Vec::with_capacity(inputs.len());
        for (index, (spec, input)) in self.manifest.inputs.iter().zip(inputs).enumerate() {
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
            if input.shape != spec.shape.as_slice() {
                return Err(RuntimeError::InputShape {
                    name: spec.name.clone(),
                    expected: shape_str(&spec.shape),
                    got: shape_str(input.shape),
                });
            }
            let expected = spec.byte_len().unwrap_or(u64::MAX);
            if input.bytes.len() as u64 != expected {
                let (name, got) = (spec.name.clone(), input.bytes.len() as u64);
                return Err(RuntimeError::BufferSize { kind: "input", name, expected, got });
            }
            let aligned = (input.bytes.as_ptr() as usize).is_multiple_of(spec.dtype.size_bytes());
            copies.push(if aligned { None } else { Some(AlignedBuf::copy_of(input.bytes, "input copy")?) });
        }
        Ok(copies)
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("model", &self.manifest.model)
            .field("steps", &self.launches.len())
            .field("threads", &self.threads)
            .field("arena_bytes", &self.manifest.arena_bytes)
            .field("weights", &self.weights.len())
            .finish_non_exhaustive()
    }
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

/// Inputs and outputs must have distinct names and sizes that fit in memory.
fn check_specs(manifest: &Manifest) -> Result<(), RuntimeError> {
    for (kind, specs) in [("input", &manifest.inputs), ("output", &manifest.outputs)] {
        for (i, spec) in specs.iter().enumerate() {
            if specs[..i].iter().any(|s| s.name == spec.name) {
                return Err(RuntimeError::invalid(format!("two {kind}s are named {:?}", spec.name)));
            }
            if spec.byte_len().and_then(|n| usize::try_from(n).ok()).is_none() {
                return Err(RuntimeError::invalid(format!(
                    "{kind} {:?} of shape {} is too large for this machine",
                    spec.name,
                    shape_str(&spec.shape)
                )));
            }
        }
    }
    Ok(())
}

fn check_index(step: &str, kind: &'static str, index: u32, count: usize) -> Result<usize, RuntimeError> {
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
        let text = "(format_version: 7, some_new_field: [1, 2], model: \"m\")";
        let probe: VersionProbe = ron::from_str(text).unwrap();
        let err = check_version(probe.format_version).unwrap_err();
        assert_eq!(
            err.to_string(),
            "artifact format version 7, this runtime reads version 2: recompile the model"
        );
    }
}
