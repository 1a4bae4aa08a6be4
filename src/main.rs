//! `kiln`: the command-line interface. Thin: parses arguments, calls the stages, prints.

mod commands;
mod native;
mod train;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "kiln", version, about = "Kiln: a declarative model compiler", long_about = None)]
#[command(after_help = "Run `kiln help COMMAND` or `kiln COMMAND --help` for a command's options.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and validate a model; summarize its inputs, outputs, parameters and ops.
    Check {
        /// The model spec (.ron).
        model: PathBuf,
        /// Override a config value, e.g. `--set layers=2` (repeatable); a size may be made
        /// dynamic: `--set 'seq=Dyn(min: 1, max: 512, hint: 128)'`.
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Print a stage of the pipeline: the spec or the graph IR.
    Inspect {
        model: PathBuf,
        /// Which stage to print.
        #[arg(long, value_enum, default_value_t = Stage::Ir)]
        stage: Stage,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Show each node's source position (file:line:col) in the text form.
        #[arg(long)]
        origins: bool,
        /// Explain how each fused node came to be (needs the optimizer stage).
        #[arg(long)]
        explain: bool,
        /// The GPU target of `--stage gpu|nvvm|ptx`: `vulkan`, `cuda` or `cuda:ARCH` (`sm_80`,
        /// `sm_86`, `sm_89`, `sm_90`). Default: `vulkan` for `gpu`, `cuda` for `nvvm` and `ptx`.
        #[arg(long)]
        target: Option<String>,
        /// With a GPU stage: the precision of f32 products, `f32`, `tf32` or `tf32x3` (as `kiln
        /// compile`).
        #[arg(long, value_name = "f32|tf32|tf32x3")]
        precision: Option<String>,
    },
    /// Run a model with the reference interpreter.
    Eval {
        model: PathBuf,
        /// Bind an input: `NAME=FILE` (.npy), or a .safetensors file holding inputs by name.
        #[arg(long = "input", value_name = "NAME=FILE|FILE.safetensors")]
        inputs: Vec<String>,
        /// Parameters by checkpoint name (.safetensors); without it, parameters are initialized.
        #[arg(long, value_name = "FILE")]
        weights: Option<PathBuf>,
        /// With --weights: initialize parameters the file lacks instead of failing.
        #[arg(long)]
        init_missing: bool,
        /// Seed for parameter initialization and for inputs that are not given.
        // At most i64::MAX: the seed is also the model's config `seed`, a config integer.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
        seed: u64,
        /// Write outputs: a .safetensors file, a .npy file (one output), or a folder (one .npy each).
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
        /// Also write the parameters used (initialized or loaded) to a .safetensors file.
        #[arg(long, value_name = "FILE")]
        save_params: Option<PathBuf>,
        /// Also write the inputs used (given or filled in from the seed) to a .safetensors
        /// file, which `--input` takes back (`kiln run ART --input FILE`).
        #[arg(long, value_name = "FILE")]
        save_inputs: Option<PathBuf>,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Compile a model to a native artifact directory (manifest, kernels, weights).
    Compile {
        model: PathBuf,
        /// The artifact directory to write, e.g. `bert.kiln`.
        #[arg(short, long, value_name = "OUT.kiln")]
        output: PathBuf,
        /// What to compile for: `host` (this CPU and its features), `x86_64` (any x86-64),
        /// `aarch64` (cross-compiled), `vulkan` (SPIR-V for any Vulkan 1.1 GPU), `cuda` or
        /// `cuda:ARCH` (PTX for NVIDIA `sm_80`, `sm_86`, `sm_89` or `sm_90`; `cuda` is `sm_80`,
        /// which every newer GPU runs; `sm_90a` runs on H100/H200 only, with 16-bit products
        /// and attention, TF32 products of operands along k and TF32 attention, as warpgroup
        /// products; a
        /// cubin too when `ptxas` is found).
        #[arg(long, default_value = "host")]
        target: String,
        /// The precision of f32 matrix products and attention: `f32` (default; every product
        /// in f32), `tf32` (CUDA: on tensor cores, operands rounded to TF32's 10 mantissa bits)
        /// or `tf32x3` (CUDA: on tensor cores, operands split into two TF32 parts, three
        /// products each; close to f32 accuracy).
        #[arg(long, value_name = "f32|tf32|tf32x3")]
        precision: Option<String>,
        /// CUDA: copy every operand tile through registers, one tile ahead, instead of
        /// `cp.async` pipelines of up to 4 stages (for comparing the two on a GPU).
        #[arg(long)]
        no_async_copies: bool,
        /// CUDA: the key tile of attention on tensor cores (f16 and bf16 tensors, or f32 with
        /// `--precision tf32|tf32x3`), a multiple of the products' k (8, or 16 in 16 bits);
        /// by default the plan's (at most 32; 128 as warpgroup products on sm_90a). For
        /// comparing tiles on a GPU.
        #[arg(long, value_name = "N")]
        attention_key_tile: Option<u32>,
        /// CUDA sm_90a: how many groups of warpgroup products may still run when the next
        /// step's are issued (0: each step waits for its own; in attention 1 runs a key
        /// tile's value products beside the next tile's scores and softmax), as far as the
        /// pipeline's stages leave room; by default 1 where there are 3 stages or more. For
        /// comparing on a GPU.
        #[arg(long, value_name = "N")]
        products_in_flight: Option<u32>,
        /// GPU: attention without tensor cores keeps one query per invocation instead of
        /// register tiles of several queries and keys (for comparing the two on a GPU).
        #[arg(long)]
        attention_per_query: bool,
        /// GPU: the tile every f32 product of at least 64 rows takes without tensor cores
        /// (128x128, 128x96, 64x64, 32x32 or 16x16), or on cuda:sm_90a every warpgroup product
        /// it divides (128x256, 128x128, 128x64 or 64x64); by default the plan's estimate
        /// chooses. For comparing tiles on a GPU.
        #[arg(long, value_name = "MxN")]
        matmul_tile: Option<String>,
        /// Print each GPU kernel's plan (tiles, tensor cores or not, launch) and why.
        #[arg(long)]
        explain: bool,
        /// Build a training artifact (CPU targets): entry points `forward` and `train_step`
        /// over persistent parameters and optimizer state, from the spec's training section.
        #[arg(long)]
        train: bool,
        /// Parameters by checkpoint name (.safetensors); without it, parameters are initialized.
        #[arg(long, value_name = "FILE")]
        weights: Option<PathBuf>,
        /// With --weights: initialize parameters the file lacks instead of failing.
        #[arg(long)]
        init_missing: bool,
        /// Seed for parameter initialization.
        // At most i64::MAX: the seed is also the model's config `seed`, a config integer.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
        seed: u64,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
    },
    /// Run a compiled artifact, or compile a model spec in memory and run it natively.
    Run {
        /// An artifact directory (`OUT.kiln`) or a model spec (`.ron`, compiled first); not
        /// needed with `--device list`.
        #[arg(required_unless_present = "device")]
        model: Option<PathBuf>,
        /// Bind an input: `NAME=FILE` (.npy), or a .safetensors file holding inputs by name.
        #[arg(long = "input", value_name = "NAME=FILE|FILE.safetensors")]
        inputs: Vec<String>,
        /// For a spec: parameters by checkpoint name (.safetensors).
        #[arg(long, value_name = "FILE")]
        weights: Option<PathBuf>,
        /// With --weights: initialize parameters the file lacks instead of failing.
        #[arg(long)]
        init_missing: bool,
        /// Seed for parameters of a spec and for inputs that are not given.
        // At most i64::MAX: the seed is also the model's config `seed`, a config integer.
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
        seed: u64,
        #[arg(long = "set", value_name = "NAME=VALUE")]
        set: Vec<String>,
        /// Worker threads (default: `KILN_THREADS`, else every core).
        #[arg(long)]
        threads: Option<usize>,
        /// The device to run on: `cpu`, `vulkan`, `vulkan:N`, `cuda`, `cuda:N`; `list` prints this machine's
        /// devices. An artifact runs on its own kind of device by default; a spec compiles for
        /// the device named (the CPU by default).
        #[arg(long, value_name = "DEVICE|list")]
        device: Option<String>,
        /// Print per-kernel time, share, GFLOP/s and GB/s, and the arena size.
        #[arg(long)]
        profile: bool,
        /// Runs to time (the median is reported).
        #[arg(long, default_value_t = 10)]
        repeats: usize,
        /// Time another artifact on the same inputs, one run of each in turn, and report both
        /// medians and their ratio (both see the same machine, run by run).
        #[arg(long, value_name = "OTHER.kiln", conflicts_with = "profile")]
        against: Option<PathBuf>,
        /// The artifact's entry point to run (`forward` by default; `train_step` in an artifact
        /// built with `kiln compile --train`, each run one optimizer step).
        #[arg(long, value_name = "NAME")]
        entry: Option<String>,
        /// Write outputs: a .safetensors file, a .npy file (one output), or a folder.
        #[arg(short, long, value_name = "OUT")]
        output: Option<PathBuf>,
    },
    /// Train a model through its training section on data, with the compiled train step.
    Train(train::TrainArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Stage {
    Spec,
    Ir,
    Opt,
    Kernels,
    Mlir,
    Llvm,
    /// A GPU target's kernels as GPU MLIR (`gpu.module`s), each with its plan (`--target`:
    /// `vulkan` by default, or `cuda[:ARCH]`).
    Gpu,
    /// The Vulkan target's kernels as SPIR-V, disassembled.
    Spirv,
    /// The CUDA target's kernels lowered to the NVVM and LLVM dialects.
    Nvvm,
    /// The CUDA target's kernels as PTX (with registers and spills when `ptxas` is found).
    Ptx,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Format {
    Text,
    Dot,
    Json,
}

fn main() -> ExitCode {
    // Like other command-line tools, stop quietly when the reader of stdout goes away
    // (`kiln inspect … | head`) instead of panicking on a broken pipe.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { model, set } => commands::check(&model, &set),
        Command::Inspect { model, stage, format, set, origins, explain, target, precision } => {
            let gpu = commands::GpuChoice { target: target.as_deref(), precision: precision.as_deref() };
            commands::inspect(&model, stage, format, &set, origins, explain, gpu)
        }
        Command::Eval {
            model,
            inputs,
            weights,
            init_missing,
            seed,
            output,
            save_params,
            save_inputs,
            set,
        } => commands::eval(&commands::EvalArgs {
            model,
            inputs,
            weights,
            init_missing,
            seed,
            output,
            save_params,
            save_inputs,
            set,
        }),
        Command::Compile {
            model,
            output,
            target,
            precision,
            no_async_copies,
            attention_key_tile,
            products_in_flight,
            attention_per_query,
            matmul_tile,
            explain,
            train,
            weights,
            init_missing,
            seed,
            set,
        } => native::compile(&native::CompileArgs {
            model,
            output,
            target,
            precision,
            no_async_copies,
            attention_key_tile,
            products_in_flight,
            attention_per_query,
            matmul_tile,
            explain,
            train,
            weights,
            init_missing,
            seed,
            set,
        }),
        Command::Run {
            model,
            inputs,
            weights,
            init_missing,
            seed,
            set,
            threads,
            device,
            profile,
            repeats,
            against,
            entry,
            output,
        } => native::run(&native::RunArgs {
            model: model.unwrap_or_default(),
            inputs,
            weights,
            init_missing,
            seed,
            set,
            threads,
            device,
            profile,
            repeats,
            against,
            entry,
            output,
        }),
        Command::Train(args) => match train::train(&args) {
            Ok(train::Outcome::Finished) => Ok(()),
            // 128 + SIGINT, as a shell reports a process that Ctrl-C stopped.
            Ok(train::Outcome::Interrupted) => return ExitCode::from(130),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(commands::Failure::User(msg)) => {
            eprint!("{msg}");
            if !msg.ends_with('\n') {
                eprintln!();
            }
            ExitCode::from(1)
        }
        Err(commands::Failure::Usage(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(2)
        }
    }
}
