//! The commands behind the CLI: each loads the model through the stages and prints a result.

use crate::{Format, Stage};
use kiln_ir::{fmt_shape, DType, Graph, Op, Tensor};
use kiln_lower::{Lowered, Override};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// Why a command failed: a user error (exit 1, message already rendered) or bad usage (exit 2).
pub enum Failure {
    User(String),
    Usage(String),
}

pub(crate) fn user(msg: impl Into<String>) -> Failure {
    let mut m = msg.into();
    if !m.starts_with("error") {
        m = format!("error: {m}");
    }
    Failure::User(m)
}

fn overrides(set: &[String]) -> Result<Vec<Override>, Failure> {
    set.iter().map(|s| Override::parse(s).map_err(|e| Failure::Usage(format!("--set: {e}")))).collect()
}

/// Loads and lowers a model, printing warnings to stderr; errors come back rendered.
pub(crate) fn load(model: &Path, set: &[String]) -> Result<Lowered, Failure> {
    let ov = overrides(set)?;
    let (sources, result) = kiln_lower::load(model, &ov);
    match result {
        Ok(lowered) => {
            if !lowered.warnings.is_empty() {
                eprint!("{}", kiln_spec::Diagnostics(lowered.warnings.clone()).render(&sources));
            }
            Ok(lowered)
        }
        Err(d) => Err(Failure::User(d.render(&sources))),
    }
}

// ------------------------------------------------------------------ check

pub fn check(model: &Path, set: &[String]) -> Result<(), Failure> {
    let l = load(model, set)?;
    print!("{}", summary(&l));
    Ok(())
}

/// Counts of each op kind in the graph, sorted by name.
fn op_counts(g: &Graph) -> BTreeMap<&'static str, usize> {
    let mut counts = BTreeMap::new();
    for id in g.node_ids() {
        *counts.entry(g.node(id).op.name()).or_insert(0) += 1;
    }
    counts
}

fn human(n: usize) -> String {
    match n {
        0..=9_999 => n.to_string(),
        10_000..=9_999_999 => format!("{:.1}K", n as f64 / 1e3),
        _ => format!("{:.2}M", n as f64 / 1e6),
    }
}

/// The `config:` line (static entries) and, for a model with symbols, each symbol with its
/// range and hint and each entry computed from them with its size and range. A dynamic
/// entry's value in `Lowered::config` is its hint, so it is listed with its range instead.
fn config_lines(l: &Lowered) -> String {
    let g = &l.graph;
    let mut s = String::new();
    let dynamic =
        |k: &String| g.symbols.iter().any(|d| d.name == *k) || l.derived.iter().any(|d| d.name == *k);
    let cfg: Vec<String> =
        l.config.iter().filter(|(k, _)| !dynamic(k)).map(|(k, v)| format!("{k}={v}")).collect();
    let _ = writeln!(s, "config: {}", cfg.join(" "));
    if !g.symbols.is_empty() {
        let _ = writeln!(s, "dynamic sizes:");
        let within = |min: i64, max: i64, multiple: i64| match multiple {
            0 | 1 => format!("{min}..={max}"),
            m => format!("{min}..={max}, a multiple of {m}"),
        };
        for d in &g.symbols {
            let _ = writeln!(s, "  {}: {}, hint {}", d.name, within(d.min, d.max, d.multiple_of), d.hint);
        }
        for d in &l.derived {
            let range = within(d.min, d.max, d.multiple);
            let _ = match &d.size {
                Ok(e) => writeln!(s, "  {} = {e}: {range}", d.name),
                Err(_) => writeln!(s, "  {}: {range} (not an extent the graph can hold)", d.name),
            };
        }
    }
    s
}

fn summary(l: &Lowered) -> String {
    let g = &l.graph;
    let mut s = String::new();
    let _ = writeln!(s, "model {}: ok", g.name);
    s.push_str(&config_lines(l));
    let _ = writeln!(s, "inputs:");
    for &i in &g.inputs {
        if let Op::Input { name, .. } = &g.node(i).op {
            let _ = writeln!(s, "  {name}: {}", g.ty(i));
        }
    }
    let _ = writeln!(s, "outputs:");
    for (name, id) in &g.outputs {
        let _ = writeln!(s, "  {name}: {}", g.ty(*id));
    }
    let params = g.params();
    let total: usize = params.iter().map(|&p| g.ty(p).numel()).sum();
    let bytes: usize = params.iter().map(|&p| g.ty(p).size_bytes()).sum();
    let _ = writeln!(
        s,
        "parameters: {} tensors, {} values ({:.1} MiB)",
        params.len(),
        human(total),
        bytes as f64 / (1 << 20) as f64
    );
    let ops: Vec<String> = op_counts(g)
        .into_iter()
        .filter(|(k, _)| !matches!(*k, "input" | "param"))
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let _ = writeln!(s, "ops ({} nodes): {}", g.node_count(), ops.join(", "));
    if let Some(t) = &l.training {
        let hyper: Vec<String> = t.hyper.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let schedule = match &t.schedule {
            Some((kind, args)) => {
                let a: Vec<String> = args.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(", schedule {kind} ({})", a.join(", "))
            }
            None => String::new(),
        };
        let clip =
            t.clip_grad_norm.map(|m| format!(", gradients clipped to global norm {m}")).unwrap_or_default();
        let accumulate = if t.accumulate > 1 {
            format!(", {} micro-batches per step", t.accumulate)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "training: {:?}, optimizer {} ({}){schedule}{clip}{accumulate}",
            t.loss,
            t.optimizer,
            hyper.join(", ")
        );
    }
    s
}

// ------------------------------------------------------------------ inspect

/// The GPU target and product precision of `inspect --stage gpu|spirv|nvvm|ptx`.
#[derive(Clone, Copy, Default)]
pub struct GpuChoice<'a> {
    pub target: Option<&'a str>,
    pub precision: Option<&'a str>,
}

pub fn inspect(
    model: &Path,
    stage: Stage,
    format: Format,
    set: &[String],
    origins: bool,
    explain: bool,
    gpu: GpuChoice,
) -> Result<(), Failure> {
    let GpuChoice { target, precision } = gpu;
    if model.is_dir() || model.extension().is_some_and(|e| e == "kiln") {
        // An artifact is shown as a whole: its target, entry points and state.
        if stage != Stage::Ir || format != Format::Text || !set.is_empty() || target.is_some() {
            return Err(Failure::Usage(
                "an artifact is inspected as a whole: --stage, --format, --set and --target apply to a spec"
                    .into(),
            ));
        }
        return crate::native::inspect_artifact(model);
    }
    let gpu_stage = matches!(stage, Stage::Gpu | Stage::Spirv | Stage::Nvvm | Stage::Ptx);
    if (target.is_some() || precision.is_some()) && !gpu_stage {
        return Err(Failure::Usage(
            "--target and --precision choose the GPU target of `--stage gpu`, `spirv`, `nvvm` or `ptx`"
                .into(),
        ));
    }
    if explain && stage != Stage::Opt {
        return Err(Failure::Usage(
            "--explain describes the fused nodes of the optimizer: use it with `--stage opt`".into(),
        ));
    }
    match stage {
        Stage::Spec => {
            let l = load(model, set)?;
            print!("{}", spec_view(&l, format)?);
        }
        Stage::Ir => {
            let l = load(model, set)?;
            match format {
                Format::Text => {
                    print!("{}", kiln_ir::print::to_text(&l.graph, kiln_ir::print::TextOptions { origins }))
                }
                Format::Dot => print!("{}", kiln_ir::print::to_dot(&l.graph)),
                Format::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&kiln_ir::print::to_json(&l.graph)).unwrap_or_default()
                ),
            }
        }
        Stage::Opt => {
            let l = load(model, set)?;
            let opts = kiln_opt::Options { explain, ..folding_options() };
            let (g, report) = kiln_opt::optimize(&l.graph, &opts).map_err(|e| user(e.to_string()))?;
            match format {
                Format::Text => {
                    for line in report.summary().lines() {
                        println!("# {line}");
                    }
                    print!("{}", kiln_ir::print::to_text(&g, kiln_ir::print::TextOptions { origins }));
                    if explain {
                        println!("\n# why each fused node exists");
                        print!("{}", kiln_opt::explanations_to_text(&report.explanations));
                    }
                }
                Format::Dot => print!("{}", kiln_ir::print::to_dot(&g)),
                Format::Json => {
                    let mut v = serde_json::to_value(&report).unwrap_or_default();
                    v["graph"] = kiln_ir::print::to_json(&g);
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                }
            }
        }
        Stage::Kernels | Stage::Mlir | Stage::Llvm | Stage::Gpu | Stage::Spirv | Stage::Nvvm | Stage::Ptx => {
            let l = load(model, set)?;
            if stage != Stage::Kernels {
                crate::native::refuse_empty_tensors(&l.graph)?;
            }
            let (mut g, _) =
                kiln_opt::optimize(&l.graph, &folding_options()).map_err(|e| user(e.to_string()))?;
            // What `kiln compile` builds: its weight-only nodes become stored parameters.
            kiln_ir::fold_weights_without_values(&mut g);
            if gpu_stage {
                return print_gpu(&g, stage, target, precision);
            }
            let sched = kiln_sched::schedule(&g).map_err(|e| user(e.to_string()))?;
            if stage == Stage::Kernels {
                match format {
                    Format::Json => {
                        println!("{}", serde_json::to_string_pretty(&sched).unwrap_or_default())
                    }
                    _ => print!("{}", kiln_sched::print::to_text(&sched)),
                }
                return Ok(());
            }
            let target = kiln_codegen::CpuTarget::host();
            let program = kiln_codegen::program::kernels(&sched, &target).map_err(|e| user(e.to_string()))?;
            if stage == Stage::Mlir {
                print!("{}", kiln_codegen::build::module_text(&program.kernels));
            } else {
                let compiled =
                    kiln_codegen::compile(&program.kernels, &target).map_err(|e| user(e.to_string()))?;
                print!("{}", compiled.llvm_ir);
            }
        }
    }
    Ok(())
}

/// `--stage gpu` (a GPU target's kernels as `gpu.module`s, each with its plan), `--stage
/// spirv` (each Vulkan kernel's SPIR-V, disassembled by `spirv-dis` when it is installed, else
/// in MLIR's `spirv` dialect, the form it was serialized from), `--stage nvvm` (the CUDA
/// kernels in the NVVM/LLVM dialects) or `--stage ptx` (their PTX, each module headed by what
/// `ptxas` reports when it is found).
fn print_gpu(
    g: &kiln_ir::Graph,
    stage: Stage,
    target: Option<&str>,
    precision: Option<&str>,
) -> Result<(), Failure> {
    let default = match stage {
        Stage::Nvvm | Stage::Ptx => "cuda",
        _ => "vulkan",
    };
    let chosen = crate::native::target_by_name(target.unwrap_or(default))?;
    let caps = match crate::native::with_precision(chosen, precision)? {
        crate::native::CompileTarget::Vulkan(caps) | crate::native::CompileTarget::Cuda(caps) => caps,
        crate::native::CompileTarget::Cpu(_) => {
            return Err(Failure::Usage(
                "--target of a GPU stage names a GPU target: `vulkan` or `cuda[:ARCH]`".into(),
            ))
        }
    };
    let nvvm = match caps.lowering {
        kiln_codegen::gpu::GpuLowering::Nvvm(t) => Some(t),
        kiln_codegen::gpu::GpuLowering::Spirv => None,
    };
    match (stage, nvvm) {
        (Stage::Spirv, Some(_)) => {
            return Err(Failure::Usage(
                "`--stage spirv` is the Vulkan target's: use `--stage ptx` for CUDA".into(),
            ))
        }
        (Stage::Nvvm | Stage::Ptx, None) => {
            return Err(Failure::Usage(
                "`--stage nvvm` and `--stage ptx` are the CUDA target's: use `--target cuda[:ARCH]`".into(),
            ))
        }
        _ => {}
    }
    let sched = kiln_sched::schedule_aligned(g, caps.buffer_align).map_err(|e| user(e.to_string()))?;
    let program = kiln_codegen::gpu::kernels(&sched, &caps).map_err(|e| user(e.to_string()))?;
    match (stage, nvvm) {
        (Stage::Nvvm, Some(t)) => {
            let text =
                kiln_codegen::gpu::nvvm::lower_text(&program.kernels, &t).map_err(|e| user(e.to_string()))?;
            println!("{text}");
            return Ok(());
        }
        (Stage::Ptx, Some(t)) => {
            let modules =
                kiln_codegen::gpu::nvvm::compile(&program.kernels, &t).map_err(|e| user(e.to_string()))?;
            let ptxas = kiln_codegen::gpu::ptxas::Ptxas::find();
            for m in &modules {
                let usage = match &ptxas {
                    Some(p) => match p.assemble(&m.ptx, &t.arch()) {
                        Ok(a) => a
                            .usage
                            .iter()
                            .map(|u| {
                                format!(
                                    "{} registers, spills {} B stored / {} B loaded",
                                    u.registers, u.spill_stores, u.spill_loads
                                )
                            })
                            .collect::<Vec<_>>()
                            .join("; "),
                        Err(e) => format!("ptxas: {e}"),
                    },
                    None => "no ptxas found (set KILN_PTXAS)".to_string(),
                };
                println!("// kernel {} ({} bytes of PTX; {usage})", m.symbol, m.ptx.len());
                println!("{}", m.ptx);
            }
            return Ok(());
        }
        _ => {}
    }
    if stage == Stage::Gpu {
        print!("{}", kiln_codegen::gpu::spirv::module_text(&program.kernels));
        return Ok(());
    }
    let modules =
        kiln_codegen::gpu::spirv::compile(&program.kernels, &caps).map_err(|e| user(e.to_string()))?;
    for m in &modules {
        println!(
            "; kernel {} ({} bytes; capabilities: {})",
            m.symbol,
            m.words.len(),
            m.capabilities.join(", ")
        );
        match disassemble(&m.words) {
            Some(text) => print!("{text}"),
            None => println!("{}", m.text),
        }
    }
    Ok(())
}

/// SPIR-V words as `spirv-dis` prints them; `None` when the tool is not installed or fails.
fn disassemble(words: &[u8]) -> Option<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("spirv-dis")
        .args(["--raw-id", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(words).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Optimizer options for the pipeline `kiln compile` and `kiln run` use: it folds weight-only
/// subgraphs once the weights are bound (`kiln_ir::fold_weights`), so the optimizer may count on
/// it. `kiln inspect` shows the same pipeline.
pub(crate) fn folding_options() -> kiln_opt::Options {
    let mut opts = kiln_opt::Options::default();
    opts.target.folds_weights = true;
    opts
}

/// The spec stage: the resolved config, the declared interface and the modules each call uses.
fn spec_view(l: &Lowered, format: Format) -> Result<String, Failure> {
    let spec = &l.spec;
    let modules: Vec<(String, Vec<String>)> = spec
        .modules
        .iter()
        .map(|m| {
            let mut calls = Vec::new();
            collect_calls(&m.body, &mut calls);
            (m.name.name.clone(), calls)
        })
        .collect();
    let mut body_calls = Vec::new();
    collect_calls(&spec.body, &mut body_calls);
    let g = &l.graph;
    Ok(match format {
        Format::Json => {
            let v = serde_json::json!({
                "name": spec.name.name,
                "config": l.config.iter().map(|(k, v)| (k.clone(), v.to_string())).collect::<BTreeMap<_, _>>(),
                "inputs": g.inputs.iter().filter_map(|&i| match &g.node(i).op {
                    Op::Input { name, .. } => Some(serde_json::json!({"name": name, "type": g.ty(i).to_string()})),
                    _ => None,
                }).collect::<Vec<_>>(),
                "outputs": g.outputs.iter().map(|(n, i)| serde_json::json!({"name": n, "type": g.ty(*i).to_string()})).collect::<Vec<_>>(),
                "uses": spec.uses.iter().map(|u| u.name.clone()).collect::<Vec<_>>(),
                "modules": modules.iter().map(|(m, c)| serde_json::json!({"name": m, "calls": c})).collect::<Vec<_>>(),
                "body_calls": body_calls,
                "training": l.training.as_ref().map(|t| format!("{t:?}")),
            });
            format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_default())
        }
        Format::Dot => {
            let mut s =
                format!("digraph \"{}\" {{\n  node [shape=box, fontname=\"monospace\"];\n", spec.name.name);
            for c in &body_calls {
                let _ = writeln!(s, "  \"{}\" -> \"{c}\";", spec.name.name);
            }
            for (m, calls) in &modules {
                for c in calls {
                    let _ = writeln!(s, "  \"{m}\" -> \"{c}\";");
                }
            }
            s.push_str("}\n");
            s
        }
        Format::Text => {
            let mut s = format!("model {}\n", spec.name.name);
            s.push_str(&config_lines(l));
            let uses: Vec<&str> = spec.uses.iter().map(|u| u.name.as_str()).collect();
            let _ = writeln!(s, "uses: {}", if uses.is_empty() { "-".into() } else { uses.join(", ") });
            for &i in &g.inputs {
                if let Op::Input { name, .. } = &g.node(i).op {
                    let _ = writeln!(s, "input {name}: {}", g.ty(i));
                }
            }
            for (m, calls) in &modules {
                let _ = writeln!(
                    s,
                    "module {m} calls: {}",
                    if calls.is_empty() { "-".into() } else { calls.join(", ") }
                );
            }
            let _ = writeln!(
                s,
                "body calls: {}",
                if body_calls.is_empty() { "-".into() } else { body_calls.join(", ") }
            );
            for (n, i) in &g.outputs {
                let _ = writeln!(s, "output {n}: {}", g.ty(*i));
            }
            s
        }
    })
}

fn collect_calls(stmts: &[kiln_spec::Stmt], out: &mut Vec<String>) {
    fn expr(e: &kiln_spec::Expr, out: &mut Vec<String>) {
        use kiln_spec::{Arg, Expr};
        match e {
            Expr::Call(c) => {
                if !out.contains(&c.func.name) {
                    out.push(c.func.name.clone());
                }
                c.args.iter().for_each(|a| expr(a, out));
            }
            Expr::Op(o) => {
                for a in o.args.iter().flatten() {
                    match a {
                        Arg::Tensor(t) => expr(t, out),
                        Arg::Tensors(ts, _) => ts.iter().for_each(|t| expr(t, out)),
                        _ => {}
                    }
                }
            }
            Expr::If { then, otherwise, .. } => {
                expr(then, out);
                expr(otherwise, out);
            }
            _ => {}
        }
    }
    for s in stmts {
        match s {
            kiln_spec::Stmt::Let { value, .. } => expr(value, out),
            kiln_spec::Stmt::Repeat { body, .. } => collect_calls(body, out),
        }
    }
}

// ------------------------------------------------------------------ eval

pub struct EvalArgs {
    pub model: PathBuf,
    pub inputs: Vec<String>,
    pub weights: Option<PathBuf>,
    pub init_missing: bool,
    pub seed: u64,
    pub output: Option<PathBuf>,
    pub save_params: Option<PathBuf>,
    pub save_inputs: Option<PathBuf>,
    pub set: Vec<String>,
}

pub fn eval(a: &EvalArgs) -> Result<(), Failure> {
    // One seed for everything random in a run: parameters, filled-in inputs and the model's
    // own random ops (dropout), unless the model's `seed` is set explicitly.
    let mut set = a.set.clone();
    if !set.iter().any(|s| s.trim_start().starts_with("seed=")) {
        set.push(format!("seed={}", a.seed));
    }
    let l = load(&a.model, &set)?;
    let g = &l.graph;
    // Inputs not given are filled at the symbols' hints.
    let hints: Vec<i64> = g.symbols.iter().map(|s| s.hint).collect();
    let specs: Vec<(String, DType, Vec<usize>)> = g
        .inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input { name, dtype, .. } => Some((name.clone(), *dtype, g.ty(i).at(&hints).static_shape())),
            _ => None,
        })
        .collect();
    let bounds: Vec<Option<usize>> = specs.iter().map(|(name, _, _)| kiln_ir::index_bound(g, name)).collect();
    let inputs = fill_inputs(&bounds, &specs, &a.inputs, a.seed)?;
    let params = bind_params(g, a.weights.as_deref(), a.seed, a.init_missing)?;
    if let Some(p) = &a.save_params {
        let mut list: Vec<(String, Tensor)> = params.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        list.sort_by(|x, y| x.0.cmp(&y.0));
        kiln_ir::tensor_io::write_safetensors(p, &list).map_err(|e| user(e.to_string()))?;
    }
    if let Some(p) = &a.save_inputs {
        let list: Vec<(String, Tensor)> = specs
            .iter()
            .filter_map(|(name, _, _)| inputs.get(name).map(|t| (name.clone(), t.clone())))
            .collect();
        kiln_ir::tensor_io::write_safetensors(p, &list).map_err(|e| user(e.to_string()))?;
    }
    let bindings = kiln_ir::Bindings { inputs, params };
    let start = std::time::Instant::now();
    let outputs = kiln_ir::eval(g, &bindings).map_err(|e| user(format!("evaluation failed: {e}")))?;
    let elapsed = start.elapsed();
    print_outputs(&outputs);
    println!(
        "evaluated {} nodes in {:.1} ms (reference interpreter)",
        g.node_count(),
        elapsed.as_secs_f64() * 1e3
    );
    if let Some(out) = &a.output {
        write_outputs(out, &outputs)?;
    }
    Ok(())
}

/// The parameters of `g`: from the `.safetensors` weights file by name and/or from their
/// initializers (see [`kiln_ir::bind_params_with_warnings`]). Tensors of the file that the model
/// does not use are a warning on stderr; missing or mistyped ones are errors.
pub(crate) fn bind_params(
    g: &Graph,
    weights: Option<&Path>,
    seed: u64,
    init_missing: bool,
) -> Result<HashMap<String, Tensor>, Failure> {
    let weights = match weights {
        Some(p) => Some(kiln_ir::tensor_io::read_safetensors(p).map_err(|e| user(e.to_string()))?),
        None => None,
    };
    let (params, warning) = kiln_ir::bind_params_with_warnings(g, weights.as_deref(), seed, init_missing)
        .map_err(|e| user(e.to_string()))?;
    if !warning.is_empty() {
        eprintln!("warning: {warning}");
    }
    Ok(params)
}

/// Prints each output: dtype, shape, first values, mean and standard deviation.
pub(crate) fn print_outputs(outputs: &[(String, Tensor)]) {
    for (name, t) in outputs {
        let (mean, std) = t.mean_std();
        println!(
            "{name}: {}{} {}  mean {mean:.6} std {std:.6}",
            t.dtype(),
            fmt_shape(&t.shape),
            t.summary(6)
        );
    }
}

/// The inputs of a run: those given on the command line (`NAME=FILE.npy` or a .safetensors
/// of several), the rest filled deterministically from `seed` by
/// [`kiln_ir::seeded_input_bounded`], with `index_bounds` (one per spec: from the graph, or
/// from an artifact's manifest) keeping indices inside their tables, so `eval` and `run`
/// draw the same values. Unknown names are an error.
pub(crate) fn fill_inputs(
    index_bounds: &[Option<usize>],
    specs: &[(String, DType, Vec<usize>)],
    given_specs: &[String],
    seed: u64,
) -> Result<HashMap<String, Tensor>, Failure> {
    let given = read_given_inputs(given_specs)?;
    complete_inputs(index_bounds, specs, given, seed)
}

/// The inputs given on the command line, by name (`NAME=FILE.npy`, or every tensor of a
/// .safetensors file); a name given twice is an error.
pub(crate) fn read_given_inputs(given_specs: &[String]) -> Result<HashMap<String, Tensor>, Failure> {
    let mut given: HashMap<String, Tensor> = HashMap::new();
    // Where each input came from: the same name bound twice (`--input x=a.npy --input
    // x=b.npy`, or a name that a .safetensors file also holds) is an error, not last-wins.
    let mut source: HashMap<String, String> = HashMap::new();
    let mut bind = |name: String, t: Tensor, from: &str| -> Result<(), Failure> {
        if let Some(first) = source.insert(name.clone(), from.to_string()) {
            return Err(Failure::Usage(format!(
                "input `{name}` is given twice: by `--input {first}` and `--input {from}`"
            )));
        }
        given.insert(name, t);
        Ok(())
    };
    for spec in given_specs {
        match spec.split_once('=') {
            Some((name, file)) => {
                let t = kiln_ir::tensor_io::read_npy(file).map_err(|e| user(e.to_string()))?;
                bind(name.to_string(), t, spec)?;
            }
            None => {
                let all = kiln_ir::tensor_io::read_tensors(spec).map_err(|e| user(e.to_string()))?;
                for (name, t) in all {
                    bind(name, t, spec)?;
                }
            }
        }
    }
    Ok(given)
}

/// `given` checked against `specs` (dtype and shape), the missing inputs filled as
/// [`fill_inputs`] says.
pub(crate) fn complete_inputs(
    index_bounds: &[Option<usize>],
    specs: &[(String, DType, Vec<usize>)],
    mut given: HashMap<String, Tensor>,
    seed: u64,
) -> Result<HashMap<String, Tensor>, Failure> {
    let mut inputs = HashMap::new();
    for (i, (name, dtype, shape)) in specs.iter().enumerate() {
        match given.remove(name) {
            Some(t) => {
                if t.dtype() != *dtype || t.shape != *shape {
                    return Err(user(format!(
                        "input `{name}` must be {dtype}{}, the file holds {}{}",
                        fmt_shape(shape),
                        t.dtype(),
                        fmt_shape(&t.shape)
                    )));
                }
                inputs.insert(name.clone(), t);
            }
            None => {
                let bound = index_bounds.get(i).copied().flatten();
                let made = kiln_ir::seeded_input_bounded(name, *dtype, shape, bound, seed)
                    .map_err(|e| user(e.to_string()))?;
                eprintln!("note: input `{name}` not given: filled with {} (seed {seed})", made.fill);
                inputs.insert(name.clone(), made.tensor);
            }
        }
    }
    if !given.is_empty() {
        let mut names: Vec<&String> = given.keys().collect();
        names.sort();
        let known: Vec<&str> = specs.iter().map(|(n, _, _)| n.as_str()).collect();
        return Err(user(format!(
            "the model has no input named {} (its inputs: {})",
            names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
            known.join(", ")
        )));
    }
    Ok(inputs)
}

pub(crate) fn write_outputs(out: &Path, outputs: &[(String, Tensor)]) -> Result<(), Failure> {
    let ext = out.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => write_atomically(out, |tmp| {
            kiln_ir::tensor_io::write_safetensors(tmp, outputs).map_err(|e| user(e.to_string()))
        })?,
        "npy" => {
            if outputs.len() != 1 {
                return Err(user(format!("`{}` is one .npy file but the model has {} outputs: give a folder or a .safetensors file", out.display(), outputs.len())));
            }
            write_atomically(out, |tmp| {
                kiln_ir::tensor_io::write_npy(tmp, &outputs[0].1).map_err(|e| user(e.to_string()))
            })?
        }
        _ => {
            // Each output becomes `NAME.npy` in the folder: a name that is not one plain file
            // name (`../x`, `/abs`, NUL, control or bidi characters), or two outputs of one name,
            // would write elsewhere or overwrite. `kiln check` and the runtime refuse such names
            // already; this is the last line, before anything is written.
            for (i, (name, _)) in outputs.iter().enumerate() {
                if let Some(problem) = kiln_runtime::name_problem(name) {
                    return Err(user(format!(
                        "output name {name:?} {problem}: it cannot be written as a file in `{}`",
                        out.display()
                    )));
                }
                if outputs[..i].iter().any(|(other, _)| other == name) {
                    return Err(user(format!(
                        "two outputs are named {name:?}: they cannot both be written to `{}`",
                        out.display()
                    )));
                }
            }
            std::fs::create_dir_all(out)
                .map_err(|e| user(format!("cannot create `{}`: {e}", out.display())))?;
            for (name, t) in outputs {
                write_atomically(&out.join(format!("{name}.npy")), |tmp| {
                    kiln_ir::tensor_io::write_npy(tmp, t).map_err(|e| user(e.to_string()))
                })?;
            }
        }
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}

/// Writes the file `path` through `write` into a temporary file beside it, then renames it
/// into place: a failed or interrupted write leaves no half-written file, and an existing
/// one stays as it was until the new one is complete. The folder must exist.
pub(crate) fn write_atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(user(format!(
            "cannot write `{}`: the folder `{}` does not exist",
            path.display(),
            parent.display()
        )));
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix);
    // The mode an ordinary new file gets (0666 less the umask), not a temporary file's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder
        .tempfile_in(&parent)
        .map_err(|e| user(format!("cannot write beside `{}`: {e}", path.display())))?;
    write(tmp.path())?;
    tmp.persist(path).map_err(|e| user(format!("cannot write `{}`: {}", path.display(), e.error)))?;
    Ok(())
}
