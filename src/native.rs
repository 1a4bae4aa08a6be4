//! `kiln compile` and `kiln run`: the native path (optimize → schedule → MLIR/LLVM → artifact →
//! runtime), and the conversions between the interpreter's tensors and the runtime's bytes.

use crate::commands::{
    bind_params, complete_inputs, folding_options, load, print_outputs, read_given_inputs, user,
    write_outputs, Failure,
};
use kiln_codegen::gpu::ptxas::Ptxas;
use kiln_codegen::gpu::{GpuCaps, MmaPrecision, NvvmTarget};
use kiln_codegen::{CpuTarget, Target};
use kiln_ir::{Buffer, DType, Graph, Tensor};
use kiln_runtime::{Model, Options, TensorRef, TensorSpec};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct CompileArgs {
    pub model: PathBuf,
    pub output: PathBuf,
    pub target: String,
    pub precision: Option<String>,
    /// CUDA: operand tiles through registers only, no `cp.async` pipelines.
    pub no_async_copies: bool,
    /// CUDA: the key tile of attention on tensor cores.
    pub attention_key_tile: Option<u32>,
    /// CUDA sm_90a: groups of warpgroup products left in flight across a step.
    pub products_in_flight: Option<u32>,
    /// GPU: attention without tensor cores keeps one query per invocation.
    pub attention_per_query: bool,
    /// GPU: the tile of f32 products without tensor cores, as `MxN`.
    pub matmul_tile: Option<String>,
    pub explain: bool,
    /// Build the two entry points `forward` and `train_step` over persistent state.
    pub train: bool,
    pub weights: Option<PathBuf>,
    pub init_missing: bool,
    pub seed: u64,
    pub set: Vec<String>,
}

/// What `--target` names: a CPU, a GPU through Vulkan, or an NVIDIA GPU through CUDA.
pub(crate) enum CompileTarget {
    Cpu(CpuTarget),
    Vulkan(GpuCaps),
    Cuda(GpuCaps),
}

impl CompileTarget {
    /// How the target's products read their weights best (`kiln_ir::fold_weights`).
    fn product_weights(&self) -> kiln_ir::ProductWeights {
        match self {
            CompileTarget::Cpu(_) => kiln_ir::ProductWeights::RowMajor,
            CompileTarget::Vulkan(caps) | CompileTarget::Cuda(caps) => caps.product_weights(),
        }
    }
}

/// The architecture `--target cuda` means: the oldest supported, whose PTX every newer GPU's
/// driver compiles.
const DEFAULT_CUDA_ARCH: &str = "sm_80";

pub(crate) fn target_by_name(name: &str) -> Result<CompileTarget, Failure> {
    if name == "vulkan" {
        return Ok(CompileTarget::Vulkan(GpuCaps::vulkan()));
    }
    if let Some(arch) = name.strip_prefix("cuda").map(|rest| rest.strip_prefix(':').unwrap_or(rest)) {
        let arch = if arch.is_empty() { DEFAULT_CUDA_ARCH } else { arch };
        return cuda_target(arch).map(CompileTarget::Cuda);
    }
    CpuTarget::by_name(name).map(CompileTarget::Cpu).ok_or_else(|| {
        Failure::Usage(format!(
            "unknown target `{name}` (known: {}, vulkan, cuda, cuda:{})",
            CpuTarget::NAMES.join(", "),
            NvvmTarget::ARCHES.join("|")
        ))
    })
}

/// `target` with f32 products at `precision` (`f32`, the default; `tf32` or `tf32x3`: tensor
/// cores on CUDA, refused elsewhere).
pub(crate) fn with_precision(
    target: CompileTarget,
    precision: Option<&str>,
) -> Result<CompileTarget, Failure> {
    match (precision, target) {
        (None | Some("f32"), t) => Ok(t),
        (Some(name @ ("tf32" | "tf32x3")), CompileTarget::Cuda(caps)) => {
            let precision = if name == "tf32" { MmaPrecision::Tf32 } else { MmaPrecision::Tf32x3 };
            Ok(CompileTarget::Cuda(caps.with_tensor_cores(precision)))
        }
        (Some(name @ ("tf32" | "tf32x3")), CompileTarget::Cpu(_) | CompileTarget::Vulkan(_)) => {
            Err(Failure::Usage(format!(
                "--precision {name} uses NVIDIA tensor cores: it needs --target cuda[:ARCH]"
            )))
        }
        (Some(other), _) => {
            Err(Failure::Usage(format!("unknown precision `{other}` (known: f32, tf32, tf32x3)")))
        }
    }
}

/// The newest architecture Kiln compiles for that the CUDA device `selector` (`cuda`,
/// `cuda:N`) runs, so a spec run on the device gets its own code rather than the JIT's
/// translation of older PTX; the default architecture when the device is not there (loading
/// then says why). Architecture-specific targets (`sm_90a`) are only ever asked for by name.
fn arch_for(selector: &str) -> String {
    let index = selector.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).unwrap_or(0);
    let found = kiln_runtime::devices();
    let cc = found.devices.iter().find_map(|d| match d {
        kiln_runtime::DeviceInfo::Cuda(c) if c.index == index => Some(c.compute_capability),
        _ => None,
    });
    let Some(cc) = cc else { return DEFAULT_CUDA_ARCH.to_string() };
    NvvmTarget::ARCHES
        .iter()
        .rev()
        .find(|arch| {
            NvvmTarget::by_arch(arch).is_some_and(|t| !t.arch_specific && t.compute_capability <= cc)
        })
        .map_or(DEFAULT_CUDA_ARCH, |a| *a)
        .to_string()
}

/// The CUDA target for architecture `arch` (`sm_90`).
pub(crate) fn cuda_target(arch: &str) -> Result<GpuCaps, Failure> {
    NvvmTarget::by_arch(arch).map(GpuCaps::cuda).ok_or_else(|| {
        Failure::Usage(format!(
            "unknown CUDA architecture `{arch}` (known: {})",
            NvvmTarget::ARCHES.join(", ")
        ))
    })
}

fn with_seed(set: &[String], seed: u64) -> Vec<String> {
    let mut set = set.to_vec();
    if !set.iter().any(|s| s.trim_start().starts_with("seed=")) {
        set.push(format!("seed={seed}"));
    }
    set
}

/// The optimized graph of a model and its parameters (loaded or initialized), with its
/// weight-only subgraphs computed once here (`kiln_ir::fold_weights`, products' weights laid
/// out as `layout` says); the optimizer is told so, and may then merge products that share an
/// input over concatenated weights.
fn prepare(
    model: &Path,
    set: &[String],
    weights: Option<&Path>,
    (seed, init_missing): (u64, bool),
    layout: kiln_ir::ProductWeights,
) -> Result<(Graph, HashMap<String, Tensor>), Failure> {
    let l = load(model, &with_seed(set, seed))?;
    refuse_empty_tensors(&l.graph)?;
    let (mut g, _) = kiln_opt::optimize(&l.graph, &folding_options()).map_err(|e| user(e.to_string()))?;
    let mut params = bind_params(&g, weights, seed, init_missing)?;
    kiln_ir::fold_weights(&mut g, &mut params, layout).map_err(|e| user(format!("folding weights: {e}")))?;
    Ok((g, params))
}

/// The graphs of a training artifact, optimized, with their parameters bound: `forward` (the
/// model, reading its parameters as state) and `train_step` (forward, loss, backward and the
/// optimizer's update, with the parameters, optimizer state and step count as persistent
/// state). Only weights that do not train are folded.
pub(crate) fn prepare_train(
    model: &Path,
    set: &[String],
    weights: Option<&Path>,
    seed: u64,
    init_missing: bool,
) -> Result<(Entries, HashMap<String, Tensor>), Failure> {
    let l = load(model, &with_seed(set, seed))?;
    if l.training.is_none() {
        return Err(user(format!(
            "`kiln compile --train` builds a train step from the spec's training section, and {} has none",
            model.display()
        )));
    }
    refuse_empty_tensors(&l.graph)?;
    train_entries(&l, &l.graph, |forward| bind_params(forward, weights, seed, init_missing))
}

/// The two entry points of a training artifact for the lowered model `l`: `forward` computes
/// the graph `forward` (the model's own, or another one over its parameters, as `kiln train`'s
/// evaluation), `train_step` the training section's step. Both are optimized, `bind` gives
/// the parameters' values from the optimized forward graph, the state is declared, and only
/// weights that do not train are folded.
pub(crate) fn train_entries(
    l: &kiln_lower::Lowered,
    forward: &Graph,
    bind: impl FnOnce(&Graph) -> Result<HashMap<String, Tensor>, Failure>,
) -> Result<(Entries, HashMap<String, Tensor>), Failure> {
    let step = kiln_lower::train_step(l).map_err(|e| user(e.to_string()))?;
    let (mut forward, _) =
        kiln_opt::optimize(forward, &folding_options()).map_err(|e| user(e.to_string()))?;
    let (mut train, _) =
        kiln_opt::optimize(&step.graph, &folding_options()).map_err(|e| user(e.to_string()))?;
    let mut params = bind(&forward)?;
    let state_err = |e: kiln_ir::StateError| user(format!("declaring the training state: {e}"));
    kiln_lower::declare_forward_state(&mut forward).map_err(state_err)?;
    kiln_lower::declare_train_state(&mut train, &step.optimizer).map_err(state_err)?;
    for g in [&mut forward, &mut train] {
        kiln_ir::fold_weights(g, &mut params, kiln_ir::ProductWeights::RowMajor)
            .map_err(|e| user(format!("folding weights: {e}")))?;
    }
    Ok((vec![(kiln_runtime::FORWARD_ENTRY, forward), (TRAIN_ENTRY, train)], params))
}

/// An artifact's entry points by name, one graph each, `forward` first.
pub(crate) type Entries = Vec<(&'static str, Graph)>;

/// The entry point of a training artifact that runs one optimizer step.
pub(crate) const TRAIN_ENTRY: &str = "train_step";

/// Refuses a graph with a tensor of zero elements (`--set batch=0`) before native code is
/// generated: the kernel emitters and the runtime do not handle empty tensors yet (a matmul
/// emitter asserts, a convolution kernel reads out of bounds). The interpreter does, so the
/// error points to `kiln eval`, which gives the empty result.
pub(crate) fn refuse_empty_tensors(g: &Graph) -> Result<(), Failure> {
    // A symbolic extent is at least its range's minimum; the scheduler refuses it by name.
    let empty = g.node_ids().find(|&id| g.ty(id).is_static() && g.ty(id).numel() == 0);
    match empty {
        None => Ok(()),
        Some(id) => {
            let node = g.node(id);
            let what = match &node.op {
                kiln_ir::Op::Input { name, .. } => format!("input `{name}`"),
                kiln_ir::Op::Param { name, .. } => format!("parameter `{name}`"),
                op => format!("`{}`", op.name()),
            };
            let at = node.origin.as_ref().map(|o| format!(" (at {o})")).unwrap_or_default();
            Err(user(format!(
                "{what}{at} has no elements ({}): native code is not generated for empty tensors; `kiln eval` computes the empty result",
                g.ty(id)
            )))
        }
    }
}

/// What building an artifact reports: its manifest, the time each part took, and for a GPU
/// target each distinct kernel's plan (`kiln compile --explain`).
pub(crate) struct BuildReport {
    manifest: kiln_runtime::Manifest,
    plans: Vec<(String, String)>,
    /// With dynamic sizes, the arena the same plan takes at their hints.
    arena_at_hints: Option<usize>,
    emit: std::time::Duration,
    compile: std::time::Duration,
    write: std::time::Duration,
}

impl BuildReport {
    fn new(
        manifest: kiln_runtime::Manifest,
        emit: std::time::Duration,
        compile: std::time::Duration,
        write: std::time::Duration,
    ) -> BuildReport {
        BuildReport { manifest, plans: Vec::new(), arena_at_hints: None, emit, compile, write }
    }
}

/// Schedules every entry point of `entries` at `align` over one state layout: the union of
/// their state, each variable once, in the order first declared.
fn schedule_entries<'a>(
    entries: &'a [(&str, Graph)],
    align: usize,
) -> Result<Vec<(&'a str, kiln_sched::Schedule)>, Failure> {
    let mut state: Vec<kiln_ir::StateVar> = Vec::new();
    for (_, e) in entries {
        for v in &e.state {
            if !state.iter().any(|s| s.name == v.name) {
                state.push(v.clone());
            }
        }
    }
    let layout = kiln_sched::state_layout(&state, align);
    entries
        .iter()
        .map(|(name, e)| {
            kiln_sched::schedule_with_state(e, align, &layout)
                .map(|s| (*name, s))
                .map_err(|e| user(e.to_string()))
        })
        .collect()
}

/// Schedules and compiles the entry points `entries` (`forward` first; one graph each) for
/// `target` into the artifact directory `out`. Several entry points share one arena and the
/// union of their state, on every target.
fn build(
    entries: &[(&str, Graph)],
    params: &HashMap<String, Tensor>,
    target: &CompileTarget,
    out: &Path,
) -> Result<BuildReport, Failure> {
    let g = &entries.first().ok_or_else(|| user("no entry point to build"))?.1;
    match target {
        CompileTarget::Cpu(cpu) => {
            let schedules = schedule_entries(entries, kiln_sched::ALIGN)?;
            let refs: Vec<(&str, &kiln_sched::Schedule)> = schedules.iter().map(|(n, s)| (*n, s)).collect();
            let b = kiln_codegen::build_entries(&g.name, &refs, params, cpu, out)
                .map_err(|e| user(e.to_string()))?;
            let mut report = BuildReport::new(b.manifest, b.emit_time, b.compile_time, b.write_time);
            report.arena_at_hints = schedules.iter().filter_map(|(_, s)| s.arena_bytes_at_hints).max();
            Ok(report)
        }
        CompileTarget::Vulkan(caps) => {
            let schedules = schedule_entries(entries, caps.buffer_align)?;
            let refs: Vec<(&str, &kiln_sched::Schedule)> = schedules.iter().map(|(n, s)| (*n, s)).collect();
            let b = kiln_codegen::build_vulkan_entries(&g.name, &refs, params, caps, out)
                .map_err(|e| user(e.to_string()))?;
            let mut report = BuildReport::new(b.manifest, b.emit_time, b.compile_time, b.write_time);
            report.arena_at_hints = schedules.iter().filter_map(|(_, s)| s.arena_bytes_at_hints).max();
            report.plans = b.program.kernels.iter().map(|k| (k.symbol.clone(), k.plan.describe())).collect();
            Ok(report)
        }
        CompileTarget::Cuda(caps) => {
            let schedules = schedule_entries(entries, caps.buffer_align)?;
            let refs: Vec<(&str, &kiln_sched::Schedule)> = schedules.iter().map(|(n, s)| (*n, s)).collect();
            let ptxas = Ptxas::find();
            let b = kiln_codegen::build_cuda_entries(&g.name, &refs, params, caps, ptxas.as_ref(), out)
                .map_err(|e| user(e.to_string()))?;
            let mut report = BuildReport::new(b.manifest, b.emit_time, b.compile_time, b.write_time);
            report.arena_at_hints = schedules.iter().filter_map(|(_, s)| s.arena_bytes_at_hints).max();
            report.plans = b.program.kernels.iter().map(|k| (k.symbol.clone(), k.plan.describe())).collect();
            Ok(report)
        }
    }
}

/// Builds the artifact `out` without ever exposing a half-written one: it is written into a
/// fresh sibling directory, then moved into place; an artifact already there is moved aside
/// first and deleted after. A process that has the old artifact loaded keeps running on it
/// (its mapped files are unlinked, not rewritten), and a failed build leaves it as it was.
pub(crate) fn build_in_place(
    entries: &[(&str, Graph)],
    params: &HashMap<String, Tensor>,
    target: &CompileTarget,
    out: &Path,
) -> Result<BuildReport, Failure> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(user(format!(
            "cannot write {}: the folder {} does not exist",
            out.display(),
            parent.display()
        )));
    }
    let name = out.file_name().ok_or_else(|| user(format!("-o {}: not a directory name", out.display())))?;
    // Only an artifact (or an empty folder) is replaced: `-o` naming some other folder or a
    // file is an error, never a deletion.
    if out.exists() {
        let artifact = out.join(kiln_runtime::MANIFEST_FILE).is_file();
        let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
        if !out.is_dir() || !(artifact || empty) {
            return Err(user(format!(
                "cannot write the artifact {}: it exists and is not a Kiln artifact (no {})",
                out.display(),
                kiln_runtime::MANIFEST_FILE
            )));
        }
    }
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}.", name.to_string_lossy()))
        .tempdir_in(&parent)
        .map_err(|e| user(format!("cannot create a directory beside {}: {e}", out.display())))?;
    let report = build(entries, params, target, staging.path())?;
    let old = parent.join(format!(".{}.old-{}", name.to_string_lossy(), std::process::id()));
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old)
            .map_err(|e| user(format!("cannot move the old {} aside: {e}", out.display())))?;
    }
    let staged = staging.keep();
    if let Err(e) = std::fs::rename(&staged, out) {
        // Put the previous artifact back; the new one stays where it was written.
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(user(format!(
            "cannot move the new artifact to {}: {e} (it is in {})",
            out.display(),
            staged.display()
        )));
    }
    if had_old {
        let _ = std::fs::remove_dir_all(&old);
    }
    Ok(report)
}

/// Which targets a plan option applies to.
#[derive(Clone, Copy)]
enum OptionFor {
    Cuda,
    AnyGpu,
}

/// `target` with its caps changed by a plan option (`flag` says what it does), where the option
/// applies to it; other targets refuse the option.
fn with_plan_option(
    target: CompileTarget,
    flag: &str,
    applies: OptionFor,
    change: impl FnOnce(GpuCaps) -> GpuCaps,
) -> Result<CompileTarget, Failure> {
    match (target, applies) {
        (CompileTarget::Cuda(caps), OptionFor::Cuda | OptionFor::AnyGpu) => {
            Ok(CompileTarget::Cuda(change(caps)))
        }
        (CompileTarget::Vulkan(caps), OptionFor::AnyGpu) => Ok(CompileTarget::Vulkan(change(caps))),
        (CompileTarget::Cpu(_) | CompileTarget::Vulkan(_), OptionFor::Cuda) => {
            Err(Failure::Usage(format!("{flag}: it needs --target cuda[:ARCH]")))
        }
        (CompileTarget::Cpu(_), OptionFor::AnyGpu) => {
            Err(Failure::Usage(format!("{flag}: it needs a GPU target (vulkan, cuda[:ARCH])")))
        }
    }
}

/// The tile `--matmul-tile` names (`MxN`), one of the SIMT products' tiles or of the
/// warpgroup products'.
fn matmul_tile(text: &str) -> Result<[u32; 2], Failure> {
    use kiln_codegen::gpu::plan::{SIMT_TILES, WARPGROUP_TILES};
    let simt: Vec<[u32; 2]> = SIMT_TILES.iter().map(|(t, ..)| [t[0], t[1]]).collect();
    let warpgroup: Vec<[u32; 2]> = WARPGROUP_TILES.iter().map(|(t, _)| [t[0], t[1]]).collect();
    let named = text.split_once('x').and_then(|(m, n)| Some([m.parse().ok()?, n.parse().ok()?]));
    match named {
        Some(tile) if simt.contains(&tile) || warpgroup.contains(&tile) => Ok(tile),
        Some(_) | None => {
            let names = |tiles: &[[u32; 2]]| {
                tiles.iter().map(|t| format!("{}x{}", t[0], t[1])).collect::<Vec<_>>().join(", ")
            };
            Err(Failure::Usage(format!(
                "--matmul-tile {text}: the tiles are {} (products without tensor cores) and {} (warpgroup products, cuda:sm_90a)",
                names(&simt),
                names(&warpgroup)
            )))
        }
    }
}

pub fn compile(a: &CompileArgs) -> Result<(), Failure> {
    let target = with_precision(target_by_name(&a.target)?, a.precision.as_deref())?;
    let target = match a.no_async_copies {
        false => target,
        true => with_plan_option(
            target,
            "--no-async-copies turns off CUDA's cp.async pipelines",
            OptionFor::Cuda,
            |caps| GpuCaps { async_copies: false, ..caps },
        )?,
    };
    let target = match a.attention_key_tile {
        None => target,
        Some(n) => with_plan_option(
            target,
            "--attention-key-tile sets the key tile of attention on NVIDIA tensor cores",
            OptionFor::Cuda,
            |caps| GpuCaps { attention_key_tile: Some(n), ..caps },
        )?,
    };
    let target = match a.products_in_flight {
        None => target,
        Some(n) => with_plan_option(
            target,
            "--products-in-flight sets how many groups of NVIDIA warpgroup products run across a step",
            OptionFor::Cuda,
            |caps| GpuCaps { products_in_flight: Some(n), ..caps },
        )?,
    };
    let target = match a.attention_per_query {
        false => target,
        true => with_plan_option(
            target,
            "--attention-per-query sets the plan of GPU attention without tensor cores",
            OptionFor::AnyGpu,
            |caps| GpuCaps { attention_per_query: true, ..caps },
        )?,
    };
    let target = match a.matmul_tile.as_deref() {
        None => target,
        Some(text) => {
            let tile = matmul_tile(text)?;
            with_plan_option(
                target,
                "--matmul-tile sets the tile of GPU products without tensor cores and of warpgroup products",
                OptionFor::AnyGpu,
                |caps| GpuCaps { matmul_tile: Some(tile), ..caps },
            )?
        }
    };
    let start = Instant::now();
    let (entries, params) = if a.train {
        prepare_train(&a.model, &a.set, a.weights.as_deref(), a.seed, a.init_missing)?
    } else {
        let (g, params) = prepare(
            &a.model,
            &a.set,
            a.weights.as_deref(),
            (a.seed, a.init_missing),
            target.product_weights(),
        )?;
        (vec![(kiln_runtime::FORWARD_ENTRY, g)], params)
    };
    let front = start.elapsed();
    let built = build_in_place(&entries, &params, &target, &a.output)?;
    let m = &built.manifest;
    let (name, lowering) = match &target {
        CompileTarget::Cpu(cpu) => (format!("{} ({})", cpu.name(), cpu.cpu()), "MLIR+LLVM"),
        CompileTarget::Vulkan(_) => (m.target.describe(), "MLIR→SPIR-V"),
        CompileTarget::Cuda(_) => match &m.target {
            kiln_runtime::Target::Cuda(c) if !c.cubins.is_empty() => (m.target.describe(), "MLIR→PTX→cubin"),
            _ => (m.target.describe(), "MLIR→PTX"),
        },
    };
    // With dynamic sizes the arena is planned once, at their maxima.
    let at = match m.symbols.as_slice() {
        [] => String::new(),
        syms => {
            let maxima: Vec<String> = syms.iter().map(|s| format!("{} = {}", s.name, s.max)).collect();
            let hints = match built.arena_at_hints {
                Some(b) => format!("; {} at the hints", bytes(b as u64)),
                None => String::new(),
            };
            format!(" (at {}{hints})", maxima.join(", "))
        }
    };
    println!(
        "compiled `{}` for {name} into {}: {} kernels, arena {}{at}",
        m.model,
        a.output.display(),
        m.steps.len() + m.entries.iter().map(|e| e.steps.len()).sum::<usize>(),
        bytes(m.arena_bytes)
    );
    if !m.entries.is_empty() || !m.state.is_empty() {
        let entries: Vec<String> =
            m.entry_views().iter().map(|e| format!("{} ({} kernels)", e.name, e.steps.len())).collect();
        let state_bytes: u64 = m.state.iter().filter_map(|s| s.byte_len()).sum();
        println!(
            "entry points: {}; state: {} tensors, {}",
            entries.join(", "),
            m.state.len(),
            bytes(state_bytes)
        );
    }
    if a.explain {
        explain(&target, &built);
    }
    println!(
        "time: {:.0} ms (front end + optimizer {:.0} ms, kernels {:.0} ms, {lowering} {:.0} ms, write {:.0} ms)",
        start.elapsed().as_secs_f64() * 1e3,
        front.as_secs_f64() * 1e3,
        built.emit.as_secs_f64() * 1e3,
        built.compile.as_secs_f64() * 1e3,
        built.write.as_secs_f64() * 1e3
    );
    Ok(())
}

/// `kiln compile --explain`: the precision chosen for f32 products and attention and why, then
/// each distinct GPU kernel's plan.
fn explain(target: &CompileTarget, built: &BuildReport) {
    let why = match target {
        CompileTarget::Cpu(_) => {
            "f32 products: f32 FMAs on the CPU's vector units (`kiln inspect --stage kernels` shows each kernel's loops)".to_string()
        }
        CompileTarget::Vulkan(_) => {
            "f32 products: f32 FMAs (portable Vulkan has no tensor-core products)".to_string()
        }
        CompileTarget::Cuda(caps) => {
            let f32_products = match caps.tensor_cores {
                Some(MmaPrecision::Tf32) => {
                    "f32 products: on tensor cores, operands rounded to TF32 (10 mantissa bits), f32 accumulators: --precision tf32 asked for it; attention likewise (queries, keys, weights and values rounded to TF32) where its heads are multiples of 8 up to 128".to_string()
                }
                Some(MmaPrecision::Tf32x3) => {
                    "f32 products: on tensor cores, each operand split into a TF32 high and low part, three products (close to f32 accuracy), f32 accumulators: --precision tf32x3 asked for it; attention likewise where its heads are multiples of 8 up to 128".to_string()
                }
                Some(p @ (MmaPrecision::F16 | MmaPrecision::Bf16)) => {
                    format!("f32 products: on tensor cores, operands rounded to {}, f32 accumulators", p.name())
                }
                None => "f32 products: f32 FMAs, f32 accuracy (--precision tf32 or tf32x3 puts them and attention on tensor cores)".to_string(),
            };
            let f32_products = match caps.tensor_cores {
                Some(MmaPrecision::Tf32 | MmaPrecision::Tf32x3) if caps.warpgroup_mma => format!(
                    "{f32_products}; products as warpgroup products (wgmma m64nNk8, operands read from shared memory) where both operands lie contiguous along k (x·Wᵀ) and the sizes are multiples of a 64×64×16 tile, else mma.sync m16n8k8; attention as warpgroup products too (wgmma m64nNk8, queries and weights from registers) where its heads are multiples of 8, its key and value rows lie contiguous and a key tile fits the registers (at TF32×3 heads below 96), else mma.sync m16n8k8"
                ),
                Some(_) | None => f32_products,
            };
            let instruction = if caps.warpgroup_mma {
                "as warpgroup products (wgmma m64nNk16, operands read from shared memory) where both operands lie contiguous along an axis and the sizes are multiples of a 64×64×32 tile, else mma.sync m16n8k16"
            } else {
                "mma.sync m16n8k16"
            };
            format!(
                "{f32_products}\nf16 and bf16 products: on tensor cores at the tensors' own precision ({instruction}), f32 accumulators; attention likewise (its weights rounded to that precision) where its heads are multiples of 16 up to 128"
            )
        }
    };
    println!("{why}");
    for (symbol, plan) in &built.plans {
        println!("  {symbol}: {plan}");
    }
}

/// `kiln inspect M.kiln`: the artifact's target, its entry points with their inputs, outputs
/// and kernel counts, and its persistent state, from the manifest alone (nothing is loaded).
pub(crate) fn inspect_artifact(dir: &Path) -> Result<(), Failure> {
    let path = dir.join(kiln_runtime::MANIFEST_FILE);
    let text =
        std::fs::read_to_string(&path).map_err(|e| user(format!("cannot read {}: {e}", path.display())))?;
    let body = kiln_runtime::Manifest::split_digest(&text).map_err(|e| user(e.to_string()))?;
    let m = kiln_runtime::Manifest::from_ron(body).map_err(|e| user(e.to_string()))?;
    let shape = |dtype: kiln_runtime::DType, shape: &[u64]| {
        let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
        format!("{dtype}[{}]", dims.join(", "))
    };
    println!(
        "artifact `{}` for {}, format {}, arena {}",
        m.model,
        m.target.describe(),
        m.format_version,
        bytes(m.arena_bytes)
    );
    for s in &m.symbols {
        let multiple = match s.multiple_of {
            1 => String::new(),
            n => format!(", a multiple of {n}"),
        };
        println!("symbol {}: {}..={}{multiple} (hint {})", s.name, s.min, s.max, s.hint);
    }
    for e in m.entry_views() {
        println!("entry {}: {} kernels", e.name, e.steps.len());
        for t in e.inputs {
            println!("  input {}: {}{}", t.name, t.dtype, kiln_runtime::dims_str(&t.shape, &m.symbols));
        }
        for t in e.outputs {
            println!("  output {}: {}{}", t.name, t.dtype, kiln_runtime::dims_str(&t.shape, &m.symbols));
        }
    }
    if !m.state.is_empty() {
        let total: u64 = m.state.iter().filter_map(|s| s.byte_len()).sum();
        println!("state: {} tensors, {}", m.state.len(), bytes(total));
        for s in &m.state {
            let init = match &s.init {
                kiln_runtime::StateInit::Zeros => "zeros".to_string(),
                kiln_runtime::StateInit::Weight { name } => format!("from weight {name}"),
            };
            println!("  {}: {} at arena offset {}, {init}", s.name, shape(s.dtype, &s.shape), s.offset);
        }
    }
    Ok(())
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub struct RunArgs {
    pub model: PathBuf,
    pub inputs: Vec<String>,
    pub weights: Option<PathBuf>,
    pub init_missing: bool,
    pub seed: u64,
    pub set: Vec<String>,
    pub threads: Option<usize>,
    pub device: Option<String>,
    pub profile: bool,
    pub repeats: usize,
    /// Another artifact to time on the same inputs, alternating with this one.
    pub against: Option<PathBuf>,
    /// The entry point to run (`forward` when `None`).
    pub entry: Option<String>,
    pub output: Option<PathBuf>,
}

/// `kiln run --device list`: this machine's devices, and why Vulkan or CUDA is missing if it is.
fn list_devices() {
    let found = kiln_runtime::devices();
    for d in &found.devices {
        println!("{d}");
    }
    if let Some(reason) = &found.vulkan_unavailable {
        println!("(no Vulkan device: {reason})");
    }
    if let Some(reason) = &found.cuda_unavailable {
        println!("(no CUDA device: {reason})");
    }
}

pub fn run(a: &RunArgs) -> Result<(), Failure> {
    if a.device.as_deref() == Some("list") {
        list_devices();
        return Ok(());
    }
    if a.model.as_os_str().is_empty() {
        return Err(Failure::Usage("kiln run needs a model (an artifact or a spec)".into()));
    }
    let options = Options { threads: threads(a.threads)?, device: a.device.clone() };
    let is_artifact = a.model.is_dir() || a.model.extension().is_some_and(|e| e == "kiln");
    if is_artifact {
        ignored_by_artifact(a)?;
    }
    let entry = a.entry.as_deref().unwrap_or(kiln_runtime::FORWARD_ENTRY);
    if !is_artifact && entry != kiln_runtime::FORWARD_ENTRY {
        return Err(Failure::Usage(format!(
            "--entry {entry} runs an entry point of an artifact: build one with `kiln compile --train -o M.kiln` first"
        )));
    }
    // A model spec is compiled for this machine into a private directory first.
    let _scratch;
    let (mut model, graph) = if is_artifact {
        let m = Model::load_with(&a.model, &options).map_err(|e| user(e.to_string()))?;
        (m, None)
    } else {
        // A spec compiles for the kind of device asked for (`vulkan`, `vulkan:N`, `cuda`,
        // `cuda:N`), else this CPU.
        let target = match a.device.as_deref() {
            Some(d) if d == "vulkan" || d.starts_with("vulkan:") => CompileTarget::Vulkan(GpuCaps::vulkan()),
            Some(d) if d == "cuda" || d.starts_with("cuda:") => {
                CompileTarget::Cuda(cuda_target(&arch_for(d))?)
            }
            _ => CompileTarget::Cpu(CpuTarget::host()),
        };
        let layout = target.product_weights();
        let (g, params) = prepare(&a.model, &a.set, a.weights.as_deref(), (a.seed, a.init_missing), layout)?;
        let dir = tempfile::tempdir().map_err(|e| user(format!("cannot create a scratch directory: {e}")))?;
        let start = Instant::now();
        let entries = [(kiln_runtime::FORWARD_ENTRY, g)];
        build(&entries, &params, &target, dir.path())?;
        let [(_, g)] = entries;
        eprintln!("compiled in {:.0} ms", start.elapsed().as_secs_f64() * 1e3);
        let m = Model::load_with(dir.path(), &options).map_err(|e| user(e.to_string()))?;
        _scratch = dir;
        (m, Some(g))
    };
    let entry_inputs = model.entry_inputs(entry).map_err(|e| user(e.to_string()))?.to_vec();
    let entry_bounds: Vec<Option<u64>> = model
        .manifest()
        .entry_views()
        .iter()
        .find(|e| e.name == entry)
        .map(|e| e.index_bounds.to_vec())
        .unwrap_or_default();
    let given = read_given_inputs(&a.inputs)?;
    // Extents set at run time take their values from the inputs given, else the hints.
    let values = given_symbol_values(model.symbols(), &entry_inputs, &given);
    let specs: Vec<(String, DType, Vec<usize>)> = entry_inputs
        .iter()
        .map(|t| {
            let shape = t
                .shape
                .iter()
                .map(|d| d.at(&values).and_then(|d| usize::try_from(d).ok()))
                .collect::<Option<Vec<usize>>>()
                .ok_or_else(|| {
                    user(format!(
                        "input `{}` of shape {} has no size at {}",
                        t.name,
                        kiln_runtime::dims_str(&t.shape, model.symbols()),
                        kiln_runtime::binding_str(model.symbols(), &values)
                    ))
                })?;
            Ok((t.name.clone(), ir_dtype(t.dtype), shape))
        })
        .collect::<Result<_, Failure>>()?;
    // Stand-ins for missing inputs: the artifact says which index a table, and how far.
    let bounds: Vec<Option<usize>> = match &graph {
        Some(g) => specs.iter().map(|(name, _, _)| kiln_ir::index_bound(g, name)).collect(),
        None => entry_bounds.iter().map(|b| b.and_then(|b| usize::try_from(b).ok())).collect(),
    };
    let inputs = complete_inputs(&bounds, &specs, given, a.seed)?;
    let owned: Vec<(String, kiln_runtime::DType, Vec<u64>, Vec<u8>)> = specs
        .iter()
        .map(|(name, d, shape)| {
            let t = &inputs[name];
            // The runtime takes bytes: a second copy of each input, asked for fallibly too.
            let bytes = t
                .data
                .try_to_le_bytes(|| kiln_ir::alloc::describe(&format!("input `{name}`"), *d, shape))
                .map_err(|e| user(e.to_string()))?;
            Ok((
                name.clone(),
                kiln_codegen::artifact::runtime_dtype(*d),
                shape.iter().map(|&x| x as u64).collect(),
                bytes,
            ))
        })
        .collect::<Result<_, Failure>>()?;
    let refs: Vec<TensorRef> = owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
    let repeats = a.repeats.max(1);
    if let Some(other) = &a.against {
        let outputs = time_against(&mut model, other, &options, entry, &refs, repeats)?;
        let outputs: Vec<(String, Tensor)> = outputs
            .iter()
            .map(|t| Ok((t.name().to_string(), ir_tensor(t)?)))
            .collect::<Result<_, Failure>>()?;
        print_outputs(&outputs);
        if let Some(out) = &a.output {
            write_outputs(out, &outputs)?;
        }
        return Ok(());
    }
    let outputs = if a.profile {
        let (outputs, profile) =
            model.run_entry_profiled(entry, &refs, repeats).map_err(|e| user(e.to_string()))?;
        println!("{profile}");
        outputs
    } else {
        let mut times = Vec::with_capacity(repeats);
        let mut outputs = Vec::new();
        for _ in 0..repeats {
            let start = Instant::now();
            outputs = model.run_entry(entry, &refs).map_err(|e| user(e.to_string()))?;
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let on = match model.device() {
            kiln_runtime::DeviceInfo::Cpu { .. } => format!("{} threads", model.threads()),
            other => other.to_string(),
        };
        println!(
            "latency: median {:.3} ms, min {:.3} ms over {repeats} runs ({on})",
            times[times.len() / 2],
            times[0]
        );
        outputs
    };
    let outputs: Vec<(String, Tensor)> =
        outputs.iter().map(|t| Ok((t.name().to_string(), ir_tensor(t)?))).collect::<Result<_, Failure>>()?;
    print_outputs(&outputs);
    if let Some(out) = &a.output {
        write_outputs(out, &outputs)?;
    }
    Ok(())
}

/// `kiln run A --against B`: B loaded beside A, both run on the same inputs one run each in
/// turn (B first every other time) after a warm-up run each, so slow and fast moments of the
/// machine fall on both alike; prints each one's median and min and B's median ÷ A's. Returns
/// A's outputs.
fn time_against(
    model: &mut Model,
    other: &Path,
    options: &Options,
    entry: &str,
    refs: &[TensorRef],
    repeats: usize,
) -> Result<Vec<kiln_runtime::Tensor>, Failure> {
    let mut b = Model::load_with(other, options).map_err(|e| user(format!("{}: {e}", other.display())))?;
    let same = |m: &Model| -> Result<Vec<(String, kiln_runtime::DType)>, Failure> {
        let inputs = m.entry_inputs(entry).map_err(|e| user(e.to_string()))?;
        Ok(inputs.iter().map(|t| (t.name.clone(), t.dtype)).collect())
    };
    if same(model)? != same(&b)? {
        return Err(user(format!(
            "--against {}: its `{entry}` takes other inputs than this model's",
            other.display()
        )));
    }
    let mut outputs = model.run_entry(entry, refs).map_err(|e| user(e.to_string()))?;
    b.run_entry(entry, refs).map_err(|e| user(format!("{}: {e}", other.display())))?;
    let (mut ta, mut tb) = (Vec::with_capacity(repeats), Vec::with_capacity(repeats));
    for i in 0..repeats {
        for first in [i % 2 == 0, i % 2 != 0] {
            let start = Instant::now();
            if first {
                outputs = model.run_entry(entry, refs).map_err(|e| user(e.to_string()))?;
                ta.push(start.elapsed().as_secs_f64() * 1e3);
            } else {
                b.run_entry(entry, refs).map_err(|e| user(format!("{}: {e}", other.display())))?;
                tb.push(start.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    ta.sort_by(f64::total_cmp);
    tb.sort_by(f64::total_cmp);
    let (ma, mb) = (ta[ta.len() / 2], tb[tb.len() / 2]);
    println!("latency: median {ma:.3} ms, min {:.3} ms over {repeats} runs", ta[0]);
    println!(
        "against {}: median {mb:.3} ms, min {:.3} ms over {repeats} runs, taking turns; median ratio {:.3}",
        other.display(),
        tb[0],
        mb / ma
    );
    Ok(outputs)
}

/// The most worker threads `kiln run` starts: 1024. More threads than cores only add
/// scheduling overhead, and a mistyped `--threads 1000000` would otherwise try to start a
/// million OS threads (each with its own stack) before failing.
pub(crate) const MAX_THREADS: usize = 1024;

/// The thread count for the runtime: `--threads N`, else `KILN_THREADS`, else `None` (every
/// core). Either one past [`MAX_THREADS`] is a usage error; 0 and text that is not a number
/// are left to the runtime, which refuses them with its own message.
fn threads(flag: Option<usize>) -> Result<Option<usize>, Failure> {
    if let Some(n) = flag {
        if n > MAX_THREADS {
            return Err(Failure::Usage(format!("--threads {n} is more than {MAX_THREADS}")));
        }
        return Ok(Some(n));
    }
    if let Ok(text) = std::env::var("KILN_THREADS") {
        if let Ok(n) = text.trim().parse::<u128>() {
            if n > MAX_THREADS as u128 {
                return Err(Failure::Usage(format!("KILN_THREADS={text} is more than {MAX_THREADS}")));
            }
        }
    }
    Ok(None)
}

/// An artifact is already compiled: its weights, config and parameter seed are built in, so
/// `--weights`, `--init-missing` and `--set` would be silently ignored. They are an error.
fn ignored_by_artifact(a: &RunArgs) -> Result<(), Failure> {
    let mut ignored = Vec::new();
    if a.weights.is_some() {
        ignored.push("--weights");
    }
    if a.init_missing {
        ignored.push("--init-missing");
    }
    if !a.set.is_empty() {
        ignored.push("--set");
    }
    if ignored.is_empty() {
        return Ok(());
    }
    Err(Failure::Usage(format!(
        "{} {} only when running a model spec: the artifact `{}` was compiled with its weights and config (pass them to `kiln compile`)",
        ignored.join(", "),
        if ignored.len() == 1 { "applies" } else { "apply" },
        a.model.display()
    )))
}

/// The interpreter's name for a runtime dtype.
pub(crate) fn ir_dtype(d: kiln_runtime::DType) -> DType {
    match d {
        kiln_runtime::DType::F32 => DType::F32,
        kiln_runtime::DType::F64 => DType::F64,
        kiln_runtime::DType::F16 => DType::F16,
        kiln_runtime::DType::BF16 => DType::BF16,
        kiln_runtime::DType::I32 => DType::I32,
        kiln_runtime::DType::I64 => DType::I64,
        kiln_runtime::DType::Bool => DType::Bool,
    }
}

/// A runtime output as an interpreter tensor.
fn ir_tensor(t: &kiln_runtime::Tensor) -> Result<Tensor, Failure> {
    let b = t.bytes();
    fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
        b.chunks_exact(N).map(|c| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            a
        })
    }
    let data = match t.dtype() {
        kiln_runtime::DType::F32 => Buffer::F32(chunks::<4>(b).map(f32::from_le_bytes).collect()),
        kiln_runtime::DType::F64 => Buffer::F64(chunks::<8>(b).map(f64::from_le_bytes).collect()),
        kiln_runtime::DType::F16 => Buffer::F16(chunks::<2>(b).map(half::f16::from_le_bytes).collect()),
        kiln_runtime::DType::BF16 => Buffer::BF16(chunks::<2>(b).map(half::bf16::from_le_bytes).collect()),
        kiln_runtime::DType::I32 => Buffer::I32(chunks::<4>(b).map(i32::from_le_bytes).collect()),
        kiln_runtime::DType::I64 => Buffer::I64(chunks::<8>(b).map(i64::from_le_bytes).collect()),
        kiln_runtime::DType::Bool => Buffer::Bool(b.iter().map(|&x| x != 0).collect()),
    };
    Tensor::new(t.shape().iter().map(|&d| d as usize).collect::<Vec<_>>(), data)
        .map_err(|e| user(format!("output `{}`: {e}", t.name())))
}

/// The target that runs on the kind of device `device` names as `kiln run --device` does
/// (`cpu` or none: this CPU; `vulkan[:N]`; `cuda[:N]`).
fn target_for_device(device: Option<&str>) -> Result<CompileTarget, Failure> {
    Ok(match device {
        Some(d) if d == "vulkan" || d.starts_with("vulkan:") => CompileTarget::Vulkan(GpuCaps::vulkan()),
        Some(d) if d == "cuda" || d.starts_with("cuda:") => CompileTarget::Cuda(cuda_target(&arch_for(d))?),
        _ => CompileTarget::Cpu(CpuTarget::host()),
    })
}

/// Compiles entry points prepared in memory (`kiln train`'s training artifact,
/// [`train_entries`]) with the values `params` into the artifact directory `out`, for the
/// kind of device `device` names.
pub(crate) fn compile_entries(
    entries: &[(&str, Graph)],
    params: &HashMap<String, Tensor>,
    device: Option<&str>,
    out: &Path,
) -> Result<(), Failure> {
    for (_, g) in entries {
        refuse_empty_tensors(g)?;
    }
    build(entries, params, &target_for_device(device)?, out)?;
    Ok(())
}

/// Each symbol's value from the first given input whose axis is exactly it (the runtime checks
/// it against the bounds), else its hint: the sizes `kiln run` fills missing inputs at.
fn given_symbol_values(
    symbols: &[kiln_runtime::SymbolSpec],
    specs: &[TensorSpec],
    given: &std::collections::HashMap<String, kiln_ir::Tensor>,
) -> Vec<u64> {
    let mut values: Vec<Option<u64>> = vec![None; symbols.len()];
    for spec in specs {
        let Some(t) = given.get(&spec.name) else { continue };
        if t.shape.len() != spec.shape.len() {
            continue;
        }
        for (dim, &extent) in spec.shape.iter().zip(&t.shape) {
            if let Some(slot) = dim.symbol().and_then(|s| values.get_mut(s as usize)) {
                slot.get_or_insert(extent as u64);
            }
        }
    }
    values.iter().zip(symbols).map(|(v, s)| v.unwrap_or(s.hint)).collect()
}
