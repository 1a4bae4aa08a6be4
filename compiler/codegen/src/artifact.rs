//! Writing an artifact: `OUT.kiln/` with `manifest.ron`, `kernels.so` and
//! `weights.safetensors`, in the format kiln-runtime reads (its `manifest` module is the
//! contract; this is the only writer).
//!
//! A CPU artifact may hold several entry points over one arena and one persistent state
//! ([`build_entries`]: `forward` and `train_step`): their schedules share the state's slots,
//! their kernels are compiled into one `kernels.so` (each distinct kernel once), and the
//! state's initial values that come from the weights are stored with them.

use crate::gpu::ptxas::{Assembled, Ptxas};
use crate::gpu::{
    self, GpuCaps, GpuFlavor, GpuKernel, GpuLowering, GpuProgram, PtxModule, SpirvModule, Work,
};
use crate::{build, program, CodegenError, Compiled, Target};
use kiln_ir::{fmt_shape, DType, Tensor};
use kiln_runtime::{
    BufRef, CudaTarget, Dim, Dispatch, Entry, FileDigest, Manifest, ModuleRange, StateSpec, Step, TargetInfo,
    TensorSpec, VulkanTarget, ARTIFACT_FORMAT_VERSION, CUBIN_FILE, KERNELS_FILE, MANIFEST_FILE, PTX_FILE,
    SPIRV_FILE, WEIGHTS_FILE,
};
use kiln_sched::{Schedule, StateSlot, Storage};
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// What building an artifact produced, and how long each part took.
pub struct Built {
    pub manifest: Manifest,
    pub compiled: Compiled,
    /// Emitting the kernels' MLIR.
    pub emit_time: Duration,
    /// MLIR lowering, LLVM O3 and object emission.
    pub compile_time: Duration,
    /// Linking and writing the files.
    pub write_time: Duration,
}

/// The runtime's name for an IR dtype.
pub fn runtime_dtype(d: DType) -> kiln_runtime::DType {
    match d {
        DType::F32 => kiln_runtime::DType::F32,
        DType::F64 => kiln_runtime::DType::F64,
        DType::F16 => kiln_runtime::DType::F16,
        DType::BF16 => kiln_runtime::DType::BF16,
        DType::I32 => kiln_runtime::DType::I32,
        DType::I64 => kiln_runtime::DType::I64,
        DType::Bool => kiln_runtime::DType::Bool,
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> CodegenError {
    CodegenError::Artifact(format!("{}: {e}", path.display()))
}

/// The value of a `Weight` or `Const` buffer.
fn constant<'a>(
    b: &'a kiln_sched::Buffer,
    params: &'a HashMap<String, Tensor>,
) -> Result<&'a Tensor, CodegenError> {
    match &b.storage {
        Storage::Weight { name } => params.get(name).ok_or_else(|| {
            CodegenError::Artifact(format!("no value for parameter `{name}` to store in the artifact"))
        }),
        Storage::Const { value, .. } => Ok(value),
        _ => Err(CodegenError::Artifact("a run-time buffer has no stored value".into())),
    }
}

/// The weights an artifact stores, each once, in the order the steps first name them.
#[derive(Default)]
struct Stored {
    weights: Vec<(String, Tensor)>,
    names: std::collections::HashSet<String>,
}

impl Stored {
    /// Stores `name` (computed by `value`) unless it already is.
    fn add(
        &mut self,
        name: &str,
        value: impl FnOnce() -> Result<Tensor, CodegenError>,
    ) -> Result<(), CodegenError> {
        if self.names.insert(name.to_string()) {
            self.weights.push((name.to_string(), value()?));
        }
        Ok(())
    }

    /// The argument for buffer `b` as the kernel reads it: the caller's input or output, a
    /// range of the arena (scratch, or a slot of `state`), or a weight stored as written.
    fn arg(
        &mut self,
        b: &kiln_sched::Buffer,
        params: &HashMap<String, Tensor>,
        state: &[StateSlot],
    ) -> Result<BufRef, CodegenError> {
        let bytes = b.bytes() as u64;
        Ok(match &b.storage {
            Storage::Input { index } => BufRef::Input { index: *index as u32 },
            Storage::Output { index } => BufRef::Output { index: *index as u32 },
            Storage::Weight { name } | Storage::Const { name, .. } => {
                self.add(name, || Ok(constant(b, params)?.clone()))?;
                BufRef::Weight { name: name.clone(), bytes }
            }
            Storage::Arena { offset } => BufRef::Arena { offset: *offset as u64, bytes },
            Storage::State { index } => {
                let slot = state.get(*index).ok_or_else(|| {
                    CodegenError::Artifact(format!(
                        "a buffer names state slot {index}, which is not in the layout"
                    ))
                })?;
                BufRef::Arena { offset: slot.offset as u64, bytes }
            }
        })
    }
}

/// Compiles `s` for `target` and writes the artifact into `dir` (created if missing).
/// `params` holds every parameter by checkpoint name.
pub fn build_artifact(
    model: &str,
    s: &Schedule,
    params: &HashMap<String, Tensor>,
    target: &dyn Target,
    dir: &Path,
) -> Result<Built, CodegenError> {
    build_entries(model, &[(kiln_runtime::FORWARD_ENTRY, s)], params, target, dir)
}

/// Compiles the entry points `entries` (name and schedule, `forward` first) for `target` into
/// one artifact in `dir`. Their schedules must share one state layout
/// (`kiln_sched::schedule_with_state`); `params` holds every parameter, including the initial
/// value of each state variable that starts from the weights.
pub fn build_entries(
    model: &str,
    entries: &[(&str, &Schedule)],
    params: &HashMap<String, Tensor>,
    target: &dyn Target,
    dir: &Path,
) -> Result<Built, CodegenError> {
    let t0 = Instant::now();
    let first = first_entry(entries)?;
    let merged = merge(entries);
    // Each entry point reports into its own fault slot (placed after its own scratch).
    let words: Vec<Option<usize>> = entries
        .iter()
        .flat_map(|(_, e)| {
            let words = e.faults.as_ref().map(|f| e.buffers[f.slot].len);
            std::iter::repeat_n(words, e.kernels.len())
        })
        .collect();
    let owner: Vec<&Schedule> =
        entries.iter().flat_map(|(_, e)| std::iter::repeat_n(*e, e.kernels.len())).collect();
    let program = program::kernels_with_faults(&merged, target, &words)?;
    let t1 = Instant::now();

    // Every step's arguments; the weights they name are the ones stored. A weight that only
    // feeds matmuls as B is stored packed, and not as written.
    let mut stored = Stored::default();
    let mut all_steps = Vec::with_capacity(merged.kernels.len());
    for (i, (&ki, sk)) in program.step_kernel.iter().zip(&merged.kernels).enumerate() {
        let k = &program.kernels[ki];
        let mut args = Vec::with_capacity(sk.inputs.len() + 1);
        for (j, o) in sk.operands().enumerate() {
            let b = &merged.buffers[o.buffer];
            let packed = program.step_packed_b[i].filter(|_| j == 1);
            let arg = match (&b.storage, packed) {
                (Storage::Weight { .. } | Storage::Const { .. }, Some(w)) => {
                    let w = &program.packed[w];
                    stored.add(&w.name, || w.pack(constant(b, params)?))?;
                    BufRef::Weight { name: w.name.clone(), bytes: (w.panels.len() * 4) as u64 }
                }
                _ => stored.arg(b, params, &merged.state)?,
            };
            args.push(arg);
        }
        args.extend(fault_arg(owner[i], sk, &mut stored, params)?);
        all_steps.push(Step {
            symbol: crate::Kernel::entry(&k.symbol),
            label: String::new(),
            args,
            dispatch: Dispatch::Cpu {
                range: match &program.step_range[i] {
                    Some(range) => runtime_dim(range)?,
                    None => Dim::Fixed(k.range as u64),
                },
                grain: k.grain.max(1) as u64,
            },
            flops: k.flops,
            bytes: k.bytes,
        });
    }
    // Each entry's steps, labelled from its own first step.
    let mut rest = all_steps.into_iter();
    let mut per_entry: Vec<Vec<Step>> = Vec::with_capacity(entries.len());
    for (_, e) in entries {
        let steps: Vec<Step> = rest
            .by_ref()
            .take(e.kernels.len())
            .zip(&e.kernels)
            .enumerate()
            .map(|(i, (step, sk))| Step {
                label: format!("k{i} {} {}", sk.name(), fmt_shape(&sk.output.view.shape)),
                ..step
            })
            .collect();
        per_entry.push(steps);
    }
    let state = state_table(&first.state, params, &mut stored)?;
    let mut per_entry = per_entry.into_iter();
    let steps = per_entry.next().unwrap_or_default();
    let s = first;
    let mut manifest = Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        model: model.to_string(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        symbols: s.symbols.iter().map(symbol_spec).collect::<Result<_, _>>()?,
        target: kiln_runtime::Target::Cpu(TargetInfo {
            triple: target.triple().to_string(),
            cpu: target.cpu().to_string(),
            features: target.features().to_string(),
        }),
        inputs: s.inputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
        index_bounds: s.index_bounds.iter().map(|b| b.map(|b| b as u64)).collect(),
        outputs: s.outputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
        arena_bytes: entries.iter().map(|(_, e)| e.arena_bytes).max().unwrap_or(0) as u64,
        // Filled in below, once the files exist (the contract digest leaves them out).
        files: Vec::new(),
        modules: Vec::new(),
        steps,
        state,
        entries: entries[1..]
            .iter()
            .zip(per_entry)
            .map(|((name, e), steps)| {
                Ok(Entry {
                    name: name.to_string(),
                    inputs: e.inputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
                    index_bounds: e.index_bounds.iter().map(|b| b.map(|b| b as u64)).collect(),
                    outputs: e.outputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
                    steps,
                    faults: fault_table(e)?,
                })
            })
            .collect::<Result<_, CodegenError>>()?,
        faults: fault_table(s)?,
    };
    // The kernels carry the digest of the manifest they were compiled for, so the runtime
    // refuses any other manifest (an edited shape, offset or symbol) before running them.
    let compiled = build::compile_with_contract(&program.kernels, target, Some(manifest.contract()))?;
    let t2 = Instant::now();

    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let so = dir.join(KERNELS_FILE);
    build::link_shared(&compiled.object, target, &so)?;
    let wpath = dir.join(WEIGHTS_FILE);
    kiln_ir::tensor_io::write_safetensors(&wpath, &stored.weights).map_err(|e| io_err(&wpath, e))?;
    let digest = |name: &str| -> Result<FileDigest, CodegenError> {
        let path = dir.join(name);
        let data = std::fs::read(&path).map_err(|e| io_err(&path, e))?;
        Ok(FileDigest::of(name, &data))
    };
    manifest.files = vec![digest(KERNELS_FILE)?, digest(WEIGHTS_FILE)?];
    let text = manifest.to_ron().map_err(|e| CodegenError::Artifact(e.to_string()))?;
    let mpath = dir.join(MANIFEST_FILE);
    std::fs::write(&mpath, text).map_err(|e| io_err(&mpath, e))?;
    let t3 = Instant::now();
    Ok(Built { manifest, compiled, emit_time: t1 - t0, compile_time: t2 - t1, write_time: t3 - t2 })
}

/// The first entry point's schedule, once the entry points are checked: `forward` first, and
/// every one over the same state layout and arena alignment.
fn first_entry<'a>(entries: &[(&str, &'a Schedule)]) -> Result<&'a Schedule, CodegenError> {
    let (first_name, first) =
        *entries.first().ok_or_else(|| CodegenError::Artifact("no entry point to build".into()))?;
    if first_name != kiln_runtime::FORWARD_ENTRY {
        return Err(CodegenError::Artifact(format!(
            "the first entry point is `{first_name}`, not `{}`",
            kiln_runtime::FORWARD_ENTRY
        )));
    }
    if let Some((name, _)) =
        entries.iter().find(|(_, e)| e.state != first.state || e.arena_align != first.arena_align)
    {
        return Err(CodegenError::Artifact(format!(
            "entry point `{name}` has another state layout than `{first_name}`"
        )));
    }
    Ok(first)
}

/// The entries' schedules as one, for compiling their kernels together: buffers and kernels
/// one entry's after another's (operands renumbered), the first entry's interface. Arena
/// offsets stay as planned: entry points never run at once, so their scratch may overlap.
fn merge(entries: &[(&str, &Schedule)]) -> Schedule {
    let mut merged = entries[0].1.clone();
    for (_, e) in &entries[1..] {
        let base = merged.buffers.len();
        merged.buffers.extend(e.buffers.iter().cloned());
        merged.kernels.extend(e.kernels.iter().map(|k| {
            let mut k = k.clone();
            for o in k.operands_mut() {
                o.buffer += base;
            }
            k
        }));
    }
    merged
}

/// The manifest's state table; each slot that starts from the weights has its value stored
/// under its own name.
fn state_table(
    slots: &[StateSlot],
    params: &HashMap<String, Tensor>,
    stored: &mut Stored,
) -> Result<Vec<StateSpec>, CodegenError> {
    slots
        .iter()
        .map(|slot| {
            let init = match slot.init {
                kiln_ir::StateInit::Zeros => kiln_runtime::StateInit::Zeros,
                kiln_ir::StateInit::Weights => {
                    let value = params.get(&slot.name).ok_or_else(|| {
                        CodegenError::Artifact(format!("no value for state `{}` to start from", slot.name))
                    })?;
                    if value.dtype() != slot.dtype || value.shape != slot.shape {
                        return Err(CodegenError::Artifact(format!(
                            "state `{}` is {}{} but its value is {}{}",
                            slot.name,
                            slot.dtype,
                            fmt_shape(&slot.shape),
                            value.dtype(),
                            fmt_shape(&value.shape)
                        )));
                    }
                    stored.add(&slot.name, || Ok(value.clone()))?;
                    kiln_runtime::StateInit::Weight { name: slot.name.clone() }
                }
            };
            Ok(StateSpec {
                name: slot.name.clone(),
                dtype: runtime_dtype(slot.dtype),
                shape: slot.shape.iter().map(|&d| d as u64).collect(),
                offset: slot.offset as u64,
                init,
            })
        })
        .collect()
}

/// What building a Vulkan artifact produced, and how long each part took.
pub struct BuiltGpu {
    pub manifest: Manifest,
    pub program: GpuProgram,
    pub modules: Vec<SpirvModule>,
    /// Emitting the kernels' MLIR.
    pub emit_time: Duration,
    /// The SPIR-V conversion and serialization.
    pub compile_time: Duration,
    /// Writing the files.
    pub write_time: Duration,
}

/// Capabilities that need no device feature of their own (`Matrix` comes with `Shader`).
const IMPLIED_CAPABILITIES: [&str; 1] = ["Matrix"];

/// Compiles `s` (scheduled with [`kiln_sched::schedule_aligned`] at `caps.buffer_align`) to
/// SPIR-V for the Vulkan target `caps` and writes the artifact into `dir`: `manifest.ron`,
/// `kernels.spv` (the modules one after another) and `weights.safetensors`.
pub fn build_vulkan_artifact(
    model: &str,
    s: &Schedule,
    params: &HashMap<String, Tensor>,
    caps: &GpuCaps,
    dir: &Path,
) -> Result<BuiltGpu, CodegenError> {
    build_vulkan_entries(model, &[(kiln_runtime::FORWARD_ENTRY, s)], params, caps, dir)
}

/// [`build_vulkan_artifact`] for several entry points over one state (`forward` first,
/// scheduled with `kiln_sched::schedule_with_state` at `caps.buffer_align` over one layout), as
/// [`build_entries`] does for the CPU. Each entry point's kernels are numbered after the ones
/// before it, so every module's symbol is distinct.
pub fn build_vulkan_entries(
    model: &str,
    entries: &[(&str, &Schedule)],
    params: &HashMap<String, Tensor>,
    caps: &GpuCaps,
    dir: &Path,
) -> Result<BuiltGpu, CodegenError> {
    let t0 = Instant::now();
    let first = first_entry(entries)?;
    let (program, parts) = gpu_entries(entries, caps)?;
    let t1 = Instant::now();
    let modules = gpu::spirv::compile(&program.kernels, caps)?;
    let t2 = Instant::now();

    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let mut blob = Vec::new();
    let mut ranges = Vec::with_capacity(modules.len());
    let mut capabilities: Vec<String> = Vec::new();
    for m in &modules {
        ranges.push(ModuleRange { offset: blob.len() as u64, bytes: m.words.len() as u64 });
        blob.extend_from_slice(&m.words);
        for c in &m.capabilities {
            if !capabilities.contains(c) && !IMPLIED_CAPABILITIES.contains(&c.as_str()) {
                capabilities.push(c.clone());
            }
        }
    }
    let mut stored = Stored::default();
    let mut per_entry = Vec::with_capacity(entries.len());
    for ((_, e), (base, part)) in entries.iter().zip(&parts) {
        per_entry.push(gpu_steps(e, params, part, *base, caps.flavor(), &mut stored)?);
    }
    let state = state_table(&first.state, params, &mut stored)?;
    let wpath = dir.join(WEIGHTS_FILE);
    kiln_ir::tensor_io::write_safetensors(&wpath, &stored.weights).map_err(|e| io_err(&wpath, e))?;
    let wdata = std::fs::read(&wpath).map_err(|e| io_err(&wpath, e))?;
    let kernels = &program.kernels;
    let mut per_entry = per_entry.into_iter();
    let steps = per_entry.next().unwrap_or_default();
    let s = first;
    let mut manifest = Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        model: model.to_string(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        symbols: s.symbols.iter().map(symbol_spec).collect::<Result<_, _>>()?,
        target: kiln_runtime::Target::Vulkan(VulkanTarget {
            spirv_version: gpu::spirv::SPIRV_VERSION.to_string(),
            capabilities,
            buffer_align: s.arena_align as u64,
            max_workgroup_invocations: kernels.iter().map(|k| k.plan.launch.invocations()).max().unwrap_or(1),
            max_shared_bytes: kernels.iter().map(|k| k.plan.shared_bytes).max().unwrap_or(0),
            subgroup_size: None,
        }),
        inputs: s.inputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
        index_bounds: s.index_bounds.iter().map(|b| b.map(|b| b as u64)).collect(),
        outputs: s.outputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
        arena_bytes: entries.iter().map(|(_, e)| e.arena_bytes).max().unwrap_or(0) as u64,
        // Filled in below, once kernels.spv exists (the contract digest leaves them out).
        files: Vec::new(),
        modules: ranges,
        steps,
        state,
        entries: entry_table(entries, per_entry)?,
        faults: fault_table(s)?,
    };
    // kernels.spv ends, after its last module, with the digest of the manifest its modules were
    // compiled for, so the runtime refuses any other step order or buffer assignment.
    blob.extend_from_slice(&kiln_runtime::spirv_contract_trailer(manifest.contract()));
    let spv = dir.join(SPIRV_FILE);
    std::fs::write(&spv, &blob).map_err(|e| io_err(&spv, e))?;
    manifest.files = vec![FileDigest::of(SPIRV_FILE, &blob), FileDigest::of(WEIGHTS_FILE, &wdata)];
    let text = manifest.to_ron().map_err(|e| CodegenError::Artifact(e.to_string()))?;
    let mpath = dir.join(MANIFEST_FILE);
    std::fs::write(&mpath, text).map_err(|e| io_err(&mpath, e))?;
    let t3 = Instant::now();
    Ok(BuiltGpu {
        manifest,
        program,
        modules,
        emit_time: t1 - t0,
        compile_time: t2 - t1,
        write_time: t3 - t2,
    })
}

/// What building a CUDA artifact produced, and how long each part took.
pub struct BuiltCuda {
    pub manifest: Manifest,
    pub program: GpuProgram,
    pub modules: Vec<PtxModule>,
    /// Each module assembled for the target's architecture, when `ptxas` was given.
    pub assembled: Option<Vec<Assembled>>,
    /// Emitting the kernels' MLIR.
    pub emit_time: Duration,
    /// The NVVM lowering, PTX generation and, with `ptxas`, assembly.
    pub compile_time: Duration,
    /// Writing the files.
    pub write_time: Duration,
}

/// Compiles `s` (scheduled with [`kiln_sched::schedule_aligned`] at `caps.buffer_align`) to
/// PTX for the CUDA target `caps` and writes the artifact into `dir`: `manifest.ron`,
/// `kernels.ptx` (the modules one after another), `weights.safetensors`, and with `ptxas`
/// `kernels.cubin` (each module assembled for the target's architecture).
pub fn build_cuda_artifact(
    model: &str,
    s: &Schedule,
    params: &HashMap<String, Tensor>,
    caps: &GpuCaps,
    ptxas: Option<&Ptxas>,
    dir: &Path,
) -> Result<BuiltCuda, CodegenError> {
    build_cuda_entries(model, &[(kiln_runtime::FORWARD_ENTRY, s)], params, caps, ptxas, dir)
}

/// [`build_cuda_artifact`] for several entry points over one state (`forward` first,
/// scheduled with `kiln_sched::schedule_with_state` at `caps.buffer_align` over one layout), as
/// [`build_vulkan_entries`] does: each entry point's kernels are numbered after the ones before
/// it, and their modules follow one another in `kernels.ptx`.
pub fn build_cuda_entries(
    model: &str,
    entries: &[(&str, &Schedule)],
    params: &HashMap<String, Tensor>,
    caps: &GpuCaps,
    ptxas: Option<&Ptxas>,
    dir: &Path,
) -> Result<BuiltCuda, CodegenError> {
    let target = match caps.lowering {
        GpuLowering::Nvvm(target) => target,
        GpuLowering::Spirv => {
            return Err(CodegenError::Unsupported(format!("a CUDA artifact for the {} target", caps.name)))
        }
    };
    let t0 = Instant::now();
    let first = first_entry(entries)?;
    let (program, parts) = gpu_entries(entries, caps)?;
    let t1 = Instant::now();
    let modules = gpu::nvvm::compile(&program.kernels, &target)?;
    let assembled = match ptxas {
        Some(p) => {
            Some(modules.iter().map(|m| p.assemble(&m.ptx, &target.arch())).collect::<Result<Vec<_>, _>>()?)
        }
        None => None,
    };
    let t2 = Instant::now();

    std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let (mut ptx, ranges) = concatenate(modules.iter().map(|m| m.ptx.as_bytes()));
    let mut cubins = Vec::new();
    let mut cubin_blob = None;
    if let Some(assembled) = &assembled {
        let (blob, r) = concatenate(assembled.iter().map(|a| a.cubin.as_slice()));
        cubins = r;
        cubin_blob = Some(blob);
    }
    let mut stored = Stored::default();
    let mut per_entry = Vec::with_capacity(entries.len());
    for ((_, e), (base, part)) in entries.iter().zip(&parts) {
        per_entry.push(gpu_steps(e, params, part, *base, caps.flavor(), &mut stored)?);
    }
    let state = state_table(&first.state, params, &mut stored)?;
    let mut per_entry = per_entry.into_iter();
    let steps = per_entry.next().unwrap_or_default();
    let s = first;
    let kernels = &program.kernels;
    let mut manifest = Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        model: model.to_string(),
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        symbols: s.symbols.iter().map(symbol_spec).collect::<Result<_, _>>()?,
        target: kiln_runtime::Target::Cuda(CudaTarget {
            compute_capability: target.compute_capability,
            ptx_version: target.ptx(),
            buffer_align: s.arena_align as u64,
            max_workgroup_invocations: kernels.iter().map(|k| k.plan.launch.invocations()).max().unwrap_or(1),
            max_shared_bytes: kernels.iter().map(|k| k.plan.shared_bytes).max().unwrap_or(0),
            cubins,
            precision: caps.tensor_cores.map_or("f32", |p| p.name()).to_string(),
            tensor_cores: tensor_core_precisions(kernels),
            arch_specific: target.arch_specific,
        }),
        inputs: s.inputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
        index_bounds: s.index_bounds.iter().map(|b| b.map(|b| b as u64)).collect(),
        outputs: s.outputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
        arena_bytes: entries.iter().map(|(_, e)| e.arena_bytes).max().unwrap_or(0) as u64,
        // Filled in below, once the files exist (the contract digest leaves them out).
        files: Vec::new(),
        modules: ranges,
        steps,
        state,
        entries: entry_table(entries, per_entry)?,
        faults: fault_table(s)?,
    };
    // kernels.ptx ends, after its last module, with the digest of the manifest its modules
    // were compiled for: their bare-pointer parameters say nothing of buffer sizes, so the
    // runtime refuses any other manifest.
    ptx.extend_from_slice(kiln_runtime::ptx_contract_line(manifest.contract()).as_bytes());
    let ptx_path = dir.join(PTX_FILE);
    std::fs::write(&ptx_path, &ptx).map_err(|e| io_err(&ptx_path, e))?;
    let mut files = vec![FileDigest::of(PTX_FILE, &ptx)];
    if let Some(blob) = &cubin_blob {
        let path = dir.join(CUBIN_FILE);
        std::fs::write(&path, blob).map_err(|e| io_err(&path, e))?;
        files.push(FileDigest::of(CUBIN_FILE, blob));
    }
    let wpath = dir.join(WEIGHTS_FILE);
    kiln_ir::tensor_io::write_safetensors(&wpath, &stored.weights).map_err(|e| io_err(&wpath, e))?;
    let wdata = std::fs::read(&wpath).map_err(|e| io_err(&wpath, e))?;
    files.push(FileDigest::of(WEIGHTS_FILE, &wdata));
    manifest.files = files;
    let text = manifest.to_ron().map_err(|e| CodegenError::Artifact(e.to_string()))?;
    let mpath = dir.join(MANIFEST_FILE);
    std::fs::write(&mpath, text).map_err(|e| io_err(&mpath, e))?;
    let t3 = Instant::now();
    Ok(BuiltCuda {
        manifest,
        program,
        modules,
        assembled,
        emit_time: t1 - t0,
        compile_time: t2 - t1,
        write_time: t3 - t2,
    })
}

/// The GPU kernels of every entry point as one program (each entry point's kernels numbered
/// after the ones before it, so every module's symbol is distinct), and each entry point's own
/// program with the index of its first kernel in the whole.
fn gpu_entries(
    entries: &[(&str, &Schedule)],
    caps: &GpuCaps,
) -> Result<(GpuProgram, Vec<(usize, GpuProgram)>), CodegenError> {
    let mut program = GpuProgram { kernels: Vec::new(), step_kernel: Vec::new(), step_splits: Vec::new() };
    let mut parts = Vec::with_capacity(entries.len());
    for (_, e) in entries {
        let part = gpu::program::kernels_numbered(e, caps, program.step_kernel.len())?;
        let base = program.kernels.len();
        program.step_kernel.extend(part.step_kernel.iter().map(|k| k + base));
        program.step_splits.extend(part.step_splits.iter().cloned());
        program.kernels.extend(part.kernels.iter().cloned());
        parts.push((base, part));
    }
    Ok((program, parts))
}

/// The manifest's `entries`: every entry point after the first, with its steps.
/// The operand precisions of the kernels on tensor cores, each once, in kernel order.
fn tensor_core_precisions(kernels: &[GpuKernel]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for k in kernels {
        let precision = match k.plan.work {
            Work::MatmulTensorCores { precision, .. } | Work::AttentionTensorCores { precision, .. } => {
                precision
            }
            Work::Elements { .. }
            | Work::Columns { .. }
            | Work::Rows { .. }
            | Work::RowsSideBySide { .. }
            | Work::Matmul { .. }
            | Work::Attention { .. }
            | Work::AttentionTiled { .. } => continue,
        };
        if !names.iter().any(|n| n == precision.name()) {
            names.push(precision.name().to_string());
        }
    }
    names
}

fn entry_table(
    entries: &[(&str, &Schedule)],
    steps: impl Iterator<Item = Vec<Step>>,
) -> Result<Vec<Entry>, CodegenError> {
    entries[1..]
        .iter()
        .zip(steps)
        .map(|((name, e), steps)| {
            Ok(Entry {
                name: name.to_string(),
                inputs: e.inputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
                index_bounds: e.index_bounds.iter().map(|b| b.map(|b| b as u64)).collect(),
                outputs: e.outputs.iter().map(tensor_spec).collect::<Result<_, _>>()?,
                steps,
                faults: fault_table(e)?,
            })
        })
        .collect()
}

/// The parts one after another, and where each lies.
fn concatenate<'a>(parts: impl Iterator<Item = &'a [u8]>) -> (Vec<u8>, Vec<ModuleRange>) {
    let mut blob = Vec::new();
    let mut ranges = Vec::new();
    for p in parts {
        ranges.push(ModuleRange { offset: blob.len() as u64, bytes: p.len() as u64 });
        blob.extend_from_slice(p);
    }
    (blob, ranges)
}

/// The steps of a GPU program (one per scheduled kernel, launching its kernel's module with its
/// plan's grid and, on CUDA (`flavor`), its dynamic shared memory) and the weights they bind; a
/// weight bound in pieces is stored as its pieces.
fn gpu_steps(
    s: &Schedule,
    params: &HashMap<String, Tensor>,
    program: &GpuProgram,
    first_module: usize,
    flavor: GpuFlavor,
    stored: &mut Stored,
) -> Result<Vec<Step>, CodegenError> {
    let mut steps = Vec::with_capacity(s.kernels.len());
    for (i, (&ki, sk)) in program.step_kernel.iter().zip(&s.kernels).enumerate() {
        let k = &program.kernels[ki];
        let mut args = Vec::with_capacity(sk.inputs.len() + 1);
        for (j, o) in sk.operands().enumerate() {
            let b = &s.buffers[o.buffer];
            // A weight larger than one binding is stored and bound as its pieces.
            if let (Some((_, split)), Storage::Weight { name } | Storage::Const { name, .. }) =
                (program.step_splits[i].iter().find(|(a, _)| *a == j), &b.storage)
            {
                let value = constant(b, params)?;
                for p in 0..split.pieces() {
                    let piece = format!("{name}@part{p}");
                    let len = split.len_of(p);
                    stored.add(&piece, || flat_range(value, p * split.piece_len, len))?;
                    args.push(BufRef::Weight { name: piece, bytes: (len * o.dtype.size_bytes()) as u64 });
                }
                continue;
            }
            args.push(stored.arg(b, params, &s.state)?);
        }
        args.extend(fault_arg(s, sk, stored, params)?);
        let module = (first_module + ki) as u32;
        let grid = match &k.run_grid {
            // A kernel over run-time sizes reads them last, and launches the run's grid.
            Some(grid) => {
                args.push(BufRef::Symbols);
                let [x, y, z] = grid;
                [runtime_dim(x)?, runtime_dim(y)?, runtime_dim(z)?]
            }
            None => k.plan.launch.grid.map(|g| Dim::Fixed(u64::from(g))),
        };
        // Only a CUDA kernel takes shared memory past the static limit as dynamic shared
        // memory; SPIR-V declares every workgroup array in the module.
        let dynamic_shared_bytes = match flavor {
            GpuFlavor::Nvvm => k.plan.dynamic_shared_bytes(),
            GpuFlavor::Spirv => 0,
        };
        let dispatch =
            Dispatch::Gpu { module, grid, workgroup: k.plan.launch.workgroup, dynamic_shared_bytes };
        steps.push(Step {
            symbol: k.symbol.clone(),
            label: format!("k{i} {} {}", sk.name(), fmt_shape(&sk.output.view.shape)),
            args,
            dispatch,
            flops: k.flops,
            bytes: k.bytes,
        });
    }
    Ok(steps)
}

/// The fault words as the last argument of a step whose kernel holds a fault site.
fn fault_arg(
    s: &Schedule,
    sk: &kiln_sched::Kernel,
    stored: &mut Stored,
    params: &HashMap<String, Tensor>,
) -> Result<Option<BufRef>, CodegenError> {
    match (&s.faults, sk.can_fault()) {
        (Some(f), true) => Ok(Some(stored.arg(&s.buffers[f.slot], params, &s.state)?)),
        (None, true) => Err(CodegenError::Artifact(
            "a kernel with a fault site in a schedule without a fault slot".into(),
        )),
        (_, false) => Ok(None),
    }
}

/// The manifest's fault table: where the fault words lie and what each site is.
fn fault_table(s: &Schedule) -> Result<Option<kiln_runtime::Faults>, CodegenError> {
    let Some(f) = &s.faults else { return Ok(None) };
    let offset = match s.buffers[f.slot].storage {
        Storage::Arena { offset } => offset as u64,
        Storage::Input { .. }
        | Storage::Output { .. }
        | Storage::Weight { .. }
        | Storage::Const { .. }
        | Storage::State { .. } => {
            return Err(CodegenError::Artifact("the fault slot is not in the arena".into()))
        }
    };
    let dims = |shape: &[usize]| shape.iter().map(|&d| d as u64).collect::<Vec<u64>>();
    let sites = f
        .sites
        .iter()
        .map(|site| kiln_runtime::FaultSite {
            kind: match site.kind {
                kiln_sched::FaultKind::IntDivByZero => kiln_runtime::FaultKind::IntDivByZero,
            },
            step: site.kernel as u32,
            op: site.op.clone(),
            name: site.name.clone(),
            origin: site.origin.clone(),
            shape: dims(&site.shape),
            divisor: dims(&site.divisor),
        })
        .collect();
    Ok(Some(kiln_runtime::Faults { offset, sites }))
}

/// The manifest's description of a graph input or output.
fn tensor_spec((name, d, shape): &(String, DType, kiln_ir::Shape)) -> Result<TensorSpec, CodegenError> {
    Ok(TensorSpec {
        name: name.clone(),
        dtype: runtime_dtype(*d),
        shape: shape.iter().map(runtime_dim).collect::<Result<_, _>>()?,
    })
}

/// An extent as the manifest writes it: fixed, or the normal form's terms.
fn runtime_dim(d: &kiln_ir::Dim) -> Result<Dim, CodegenError> {
    Ok(match d {
        kiln_ir::Dim::Const(c) => Dim::Fixed(*c as u64),
        kiln_ir::Dim::Sym(e) => Dim::Size(runtime_size(e)?),
    })
}

fn runtime_size(e: &kiln_ir::SizeExpr) -> Result<kiln_runtime::Size, CodegenError> {
    e.terms()
        .into_iter()
        .map(|(coeff, factors)| {
            let factors = factors
                .into_iter()
                .map(|f| {
                    Ok(match f {
                        kiln_ir::TermFactor::Sym(s) => kiln_runtime::SizeFactor::Sym(s.index),
                        kiln_ir::TermFactor::FloorDiv(inner, k) => kiln_runtime::SizeFactor::FloorDiv(
                            runtime_size(inner)?,
                            u64::try_from(k).map_err(|_| {
                                CodegenError::Artifact(format!("the size {e} divides by {k}"))
                            })?,
                        ),
                    })
                })
                .collect::<Result<_, CodegenError>>()?;
            Ok(kiln_runtime::SizeTerm { coeff, factors })
        })
        .collect()
}

/// A symbol's bounds as the manifest writes them.
fn symbol_spec(d: &kiln_ir::SymbolDecl) -> Result<kiln_runtime::SymbolSpec, CodegenError> {
    let u = |v: i64| {
        u64::try_from(v)
            .map_err(|_| CodegenError::Artifact(format!("symbol `{}` has a negative bound {v}", d.name)))
    };
    Ok(kiln_runtime::SymbolSpec {
        name: d.name.clone(),
        min: u(d.min)?,
        max: u(d.max)?,
        hint: u(d.hint)?,
        multiple_of: u(d.multiple_of)?,
    })
}

/// Elements `start..start + len` of `t`, as a 1-D tensor.
fn flat_range(t: &Tensor, start: usize, len: usize) -> Result<Tensor, CodegenError> {
    use kiln_ir::Buffer;
    let r = start..start + len;
    let data = match &t.data {
        Buffer::F32(v) => Buffer::F32(v[r].to_vec()),
        Buffer::F64(v) => Buffer::F64(v[r].to_vec()),
        Buffer::F16(v) => Buffer::F16(v[r].to_vec()),
        Buffer::BF16(v) => Buffer::BF16(v[r].to_vec()),
        Buffer::I32(v) => Buffer::I32(v[r].to_vec()),
        Buffer::I64(v) => Buffer::I64(v[r].to_vec()),
        Buffer::Bool(v) => Buffer::Bool(v[r].to_vec()),
    };
    Tensor::new(vec![len], data).map_err(|e| CodegenError::Artifact(e.to_string()))
}
