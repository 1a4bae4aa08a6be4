//! Runs a compiled artifact from the command line, with nothing but kiln-runtime:
//!
//! ```text
//! cargo run -p kiln-runtime --example run_artifact -- DIR [--threads N] [--device D] [--profile]
//!     [--repeats N] [--input NAME=FILE.bin]…
//! cargo run -p kiln-runtime --example run_artifact -- --device list
//! ```
//!
//! Inputs not given as raw little-endian files are filled deterministically: f32 with the ramp
//! `(i % 32) / 16 - 1` (as `examples/c/run_model.c` does), other dtypes with zeros. Prints each
//! output's name, dtype, shape and first values, and with `--profile` the per-step table.
//! `--device` picks `cpu`, `vulkan`, `vulkan:N`, `cuda` or `cuda:N`; `--device list` prints this
//! machine's devices.
//! Exit status: 0, 1 on a runtime error, 2 on bad usage.

use std::collections::HashMap;
use std::process::ExitCode;

use kiln_runtime::{DType, Model, Options, TensorRef};

const USAGE: &str = "usage: run_artifact DIR [--threads N] [--device cpu|vulkan|vulkan:N] [--profile] \
                     [--repeats N] [--input NAME=FILE.bin]...\n       run_artifact --device list";

struct Args {
    dir: String,
    threads: Option<usize>,
    device: Option<String>,
    profile: bool,
    repeats: usize,
    files: HashMap<String, String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed = Args {
        dir: String::new(),
        threads: None,
        device: None,
        profile: false,
        repeats: 10,
        files: HashMap::new(),
    };
    let number = |flag: &str, value: Option<String>| -> Result<usize, String> {
        let value = value.ok_or_else(|| format!("{flag} needs a value"))?;
        value.parse().map_err(|_| format!("{flag} {value:?} is not a number"))
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--threads" => parsed.threads = Some(number("--threads", args.next())?),
            "--repeats" => parsed.repeats = number("--repeats", args.next())?,
            "--profile" => parsed.profile = true,
            "--device" => parsed.device = Some(args.next().ok_or("--device needs a value")?),
            "--input" => {
                let spec = args.next().ok_or("--input needs NAME=FILE")?;
                let (name, file) =
                    spec.split_once('=').ok_or_else(|| format!("--input {spec:?} is not NAME=FILE"))?;
                parsed.files.insert(name.to_string(), file.to_string());
            }
            "-h" | "--help" => return Err(String::new()),
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            _ if parsed.dir.is_empty() => parsed.dir = arg,
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    if parsed.dir.is_empty() && parsed.device.as_deref() != Some("list") {
        return Err("no artifact directory given".into());
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.device.as_deref() == Some("list") {
        let listed = kiln_runtime::devices();
        for device in &listed.devices {
            println!("{device}");
        }
        if let Some(reason) = listed.vulkan_unavailable {
            println!("(no Vulkan device: {reason})");
        }
        if let Some(reason) = listed.cuda_unavailable {
            println!("(no CUDA device: {reason})");
        }
        return Ok(());
    }
    let options = Options { threads: args.threads, device: args.device.clone() };
    let mut model = Model::load_with(&args.dir, &options).map_err(|e| e.to_string())?;
    let manifest = model.manifest();
    println!(
        "model {} (kiln {}, {}): {} steps, {} threads, arena {} bytes, device {}",
        manifest.model,
        manifest.kiln_version,
        manifest.target.describe(),
        manifest.steps.len(),
        model.threads(),
        model.arena_bytes(),
        model.device().id()
    );
    if let Some(unknown) = args.files.keys().find(|name| !model.inputs().iter().any(|s| &s.name == *name)) {
        return Err(format!("--input {unknown:?}: the model has no such input"));
    }

    // Extents set at run time take the symbols' hints (raw byte files carry no shape).
    let hints = model.manifest().hint_values();
    let mut data = Vec::new();
    let mut shapes = Vec::new();
    for spec in model.inputs() {
        let shape: Vec<u64> = spec
            .shape
            .iter()
            .map(|d| d.at(&hints))
            .collect::<Option<_>>()
            .ok_or_else(|| format!("input {:?} has no shape at the hints", spec.name))?;
        let bytes =
            spec.byte_len_at(&hints).ok_or_else(|| format!("input {:?} is too large", spec.name))? as usize;
        let (buffer, source) = match args.files.get(&spec.name) {
            Some(path) => {
                let buffer = std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))?;
                (buffer, path.clone())
            }
            None if spec.dtype == DType::F32 => {
                let ramp = (0..bytes / 4).flat_map(|i| ((i % 32) as f32 / 16.0 - 1.0).to_le_bytes());
                (ramp.collect(), "ramp".to_string())
            }
            None => (vec![0; bytes], "zeros".to_string()),
        };
        println!("input {} {} {shape:?} ({source})", spec.name, spec.dtype);
        data.push(buffer);
        shapes.push(shape);
    }
    let specs = model.inputs().to_vec();
    let inputs: Vec<TensorRef> = specs
        .iter()
        .zip(&data)
        .zip(&shapes)
        .map(|((s, bytes), shape)| TensorRef::new(&s.name, s.dtype, shape, bytes))
        .collect();

    let (outputs, profile) = if args.profile {
        let (outputs, profile) = model.run_profiled(&inputs, args.repeats).map_err(|e| e.to_string())?;
        (outputs, Some(profile))
    } else {
        (model.run(&inputs).map_err(|e| e.to_string())?, None)
    };
    for output in &outputs {
        let values = output.to_f32_vec();
        let shown: Vec<String> = values.iter().take(8).map(|v| format!("{v}")).collect();
        let more = if values.len() > 8 { format!(" ... ({} values)", values.len()) } else { String::new() };
        println!("output {output}: {}{more}", shown.join(" "));
    }
    if let Some(profile) = profile {
        println!("\n{profile}");
    }
    Ok(())
}
