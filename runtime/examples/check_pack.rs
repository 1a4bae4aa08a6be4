//! Runs a GPU check pack with nothing but kiln-runtime: the half of `scripts/gpu_check.sh` that
//! runs on the GPU machine, which needs no compiler, no LLVM and no network.
//!
//! ```text
//! cargo run -p kiln-runtime --release --example check_pack -- PACK [--device D] [--repeats N]
//!     [--tolerance T] [--json FILE]
//! ```
//!
//! `PACK` holds artifact directories (`NAME.kiln/`), each possibly with:
//! * `inputs.safetensors`: the inputs to run it on (`kiln eval --save-inputs`); without it,
//!   f32 inputs are a ramp and integer inputs zeros;
//! * `expected.safetensors`: the reference interpreter's outputs on those inputs (`kiln eval
//!   -o`), compared within `T·(1 + |ref|)` (default 1e-4);
//! * `tolerance.txt`: the artifact's own `T`, in place of `--tolerance` (the math functions'
//!   check states a few ulp of its dtype);
//! * `pooled.txt`: `OUTPUT MASK NAME`: besides the outputs, output `OUTPUT` ([batch, seq,
//!   width]) pooled into sentence embeddings is compared as `NAME`: its mean over the positions
//!   where input `MASK` ([batch, seq]) is not zero, L2-normalized, as sentence-transformers'
//!   mean pooling and normalization (the MiniLM golden check: `expected.safetensors` then holds
//!   sentence-transformers' own embeddings of the inputs);
//! * `expected_error.txt`: instead of outputs, the words the run must fail with (a fault such
//!   as an integer division by zero); the run is tried twice, and both must fail with them;
//! * `train_steps.txt`: a training artifact: its `train_step` entry point runs that many
//!   times on `inputs.safetensors` (its inputs, one batch for every step), and the last step's
//!   outputs and then every state tensor (named `state:NAME` in `expected.safetensors`) are
//!   compared; with `--record`, this run writes `expected.safetensors` instead (the pack
//!   records it from the same spec compiled for the host CPU, whose training artifacts match
//!   the interpreter's train step to 1e-5 in `tests/compiled.rs`). The time is a train step's;
//! * `weights.header` instead of `weights.safetensors`: only the weights file's safetensors
//!   header; the data is synthesized here (f32 uniform in ±0.05 from a fixed generator, other
//!   dtypes zero) and the manifest's digest of the weights file rewritten to match. For speed
//!   checks of large models, whose values do not change the time, at a fraction of the bytes.
//!
//! * `runs/RUN/`: further runs of an artifact with sizes set at run time, each with its own
//!   `inputs.safetensors` and `expected.safetensors` (the interpreter's outputs at that static
//!   shape, for the same parameters), compared as the first run is; a fault names the run.
//!
//! Every tensor of `expected.safetensors` must be compared: one that no output (or pooled
//! output) has fails the artifact.
//!
//! Every artifact is loaded on `--device` (default: its own kind), run once and compared, then
//! timed: three warm-up runs, then `--repeats` runs (default 50) with the median reported, and
//! the per-kind profile. One line per artifact on stdout, a JSON record per artifact to `--json`
//! (with every step's median time besides the kinds'), each written as soon as the artifact is
//! checked.
//! Exit status: 0 when every comparison holds, 1 when one fails or an artifact cannot run, 2 on
//! bad usage.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kiln_runtime::pooling::mean_pool_normalize;
use kiln_runtime::{DType, FileDigest, Manifest, Model, Options, TensorRef, WEIGHTS_FILE};

const USAGE: &str =
    "usage: check_pack PACK [--device D] [--repeats N] [--tolerance T] [--json FILE] [--record]";

struct Args {
    pack: PathBuf,
    device: Option<String>,
    repeats: usize,
    tolerance: f64,
    json: Option<PathBuf>,
    /// Write training artifacts' `expected.safetensors` from this run instead of comparing.
    record: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let mut parsed =
        Args { pack: PathBuf::new(), device: None, repeats: 50, tolerance: 1e-4, json: None, record: false };
    while let Some(arg) = args.next() {
        let mut value = |flag: &str| args.next().ok_or_else(|| format!("{flag} needs a value"));
        match arg.as_str() {
            "--device" => parsed.device = Some(value("--device")?),
            "--repeats" => {
                parsed.repeats = value("--repeats")?.parse().map_err(|_| "--repeats takes a number")?
            }
            "--tolerance" => {
                parsed.tolerance = value("--tolerance")?.parse().map_err(|_| "--tolerance takes a number")?
            }
            "--json" => parsed.json = Some(PathBuf::from(value("--json")?)),
            "--record" => parsed.record = true,
            flag if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            pack if parsed.pack.as_os_str().is_empty() => parsed.pack = PathBuf::from(pack),
            extra => return Err(format!("unexpected argument {extra:?}")),
        }
    }
    if parsed.pack.as_os_str().is_empty() {
        return Err("no pack given".into());
    }
    Ok(parsed)
}

/// A named tensor as a safetensors file holds it: name, dtype, shape, little-endian bytes.
type Named = (String, DType, Vec<u64>, Vec<u8>);

/// What checking one artifact found.
struct Outcome {
    name: String,
    /// `None` when there was nothing to compare with.
    max_error: Option<f64>,
    passed: bool,
    median: Duration,
    kinds: Vec<(String, Duration)>,
    /// Each step's label and median time (JSON only: where a kind's time goes).
    steps: Vec<(String, Duration)>,
    problem: Option<String>,
    /// The run failed with the words its `expected_error.txt` gives.
    failed_as_expected: bool,
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("check_pack: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut dirs: Vec<PathBuf> = match std::fs::read_dir(&args.pack) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir() && p.extension().is_some_and(|x| x == "kiln"))
            .collect(),
        Err(e) => {
            eprintln!("check_pack: {}: {e}", args.pack.display());
            return ExitCode::from(2);
        }
    };
    dirs.sort();
    // One JSON line per artifact as soon as it is checked, so a run stopped half-way keeps
    // what it found.
    let mut json_file = match &args.json {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some((path, f)),
            Err(e) => {
                eprintln!("check_pack: {}: {e}", path.display());
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let mut all_passed = true;
    for dir in &dirs {
        let name = dir.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let outcome = check(dir, &name, &args).unwrap_or_else(|problem| Outcome {
            name: name.clone(),
            max_error: None,
            passed: false,
            median: Duration::ZERO,
            kinds: Vec::new(),
            steps: Vec::new(),
            problem: Some(problem),
            failed_as_expected: false,
        });
        print_line(&outcome);
        if let Some((path, file)) = &mut json_file {
            use std::io::Write;
            if let Err(e) = writeln!(file, "{}", json(&outcome)).and_then(|()| file.flush()) {
                eprintln!("check_pack: {}: {e}", path.display());
                return ExitCode::from(1);
            }
        }
        all_passed &= outcome.passed;
    }
    if all_passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_line(o: &Outcome) {
    let verdict = match (&o.problem, o.passed, o.max_error) {
        (Some(p), _, _) => format!("FAIL  {p}"),
        (None, true, Some(e)) => format!("ok    max error {e:.2e}"),
        (None, true, None) if o.failed_as_expected => "ok    (failed as expected)".to_string(),
        (None, true, None) => "ok    (timing only)".to_string(),
        (None, false, e) => format!("FAIL  max error {:.2e}", e.unwrap_or(f64::NAN)),
    };
    println!("{:<28} {:>10.3} ms  {verdict}", o.name, o.median.as_secs_f64() * 1e3);
    for (kind, t) in &o.kinds {
        println!("    {kind:<24} {:>10.3} ms", t.as_secs_f64() * 1e3);
    }
}

fn json(o: &Outcome) -> String {
    let kinds: Vec<String> = o
        .kinds
        .iter()
        .map(|(k, t)| format!("{{\"kind\": {k:?}, \"ms\": {:.6}}}", t.as_secs_f64() * 1e3))
        .collect();
    let steps: Vec<String> = o
        .steps
        .iter()
        .map(|(label, t)| format!("{{\"step\": {label:?}, \"ms\": {:.6}}}", t.as_secs_f64() * 1e3))
        .collect();
    format!(
        "{{\"name\": {:?}, \"passed\": {}, \"max_error\": {}, \"median_ms\": {:.6}, \"kinds\": [{}], \"steps\": [{}], \"problem\": {}}}",
        o.name,
        o.passed,
        o.max_error.map_or("null".to_string(), |e| if e.is_finite() { format!("{e:e}") } else { "null".into() }),
        o.median.as_secs_f64() * 1e3,
        kinds.join(", "),
        steps.join(", "),
        o.problem.as_ref().map_or("null".to_string(), |p| format!("{p:?}"))
    )
}

/// Loads, compares and times one artifact.
fn check(dir: &Path, name: &str, args: &Args) -> Result<Outcome, String> {
    synthesize_weights(dir)?;
    let options = Options { threads: None, device: args.device.clone() };
    let mut model = Model::load_with(dir, &options).map_err(|e| e.to_string())?;
    let given = read_tensors(&dir.join("inputs.safetensors"))?;
    let training = std::fs::read_to_string(dir.join("train_steps.txt")).ok();
    let entry = if training.is_some() { "train_step" } else { kiln_runtime::FORWARD_ENTRY };
    let mut owned: Vec<Named> = Vec::new();
    // Sizes set at run time are bound from the inputs given (`kiln eval --save-inputs` wrote
    // them at the sizes it evaluated); an input not given is a stand-in at the hints.
    let hints: Vec<u64> = model.symbols().iter().map(|s| s.hint).collect();
    for spec in model.entry_inputs(entry).map_err(|e| e.to_string())? {
        let (shape, bytes) = match given.iter().find(|(n, ..)| *n == spec.name) {
            Some((_, _, shape, b)) => (shape.clone(), b.clone()),
            None => {
                let shape: Option<Vec<u64>> = spec.shape.iter().map(|d| d.at(&hints)).collect();
                let shape =
                    shape.ok_or_else(|| format!("input {:?} has no shape at the hints", spec.name))?;
                (shape, stand_in(spec.dtype, spec.elements_at(&hints).unwrap_or(0) as usize))
            }
        };
        owned.push((spec.name.clone(), spec.dtype, shape, bytes));
    }
    let refs: Vec<TensorRef> = owned.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
    if let Some(steps) = training {
        let steps: usize = steps
            .trim()
            .parse()
            .map_err(|_| format!("train_steps.txt holds {:?}, not a count", steps.trim()))?;
        return check_training(&mut model, dir, name, args, &refs, steps);
    }
    if let Ok(words) = std::fs::read_to_string(dir.join("expected_error.txt")) {
        let words = words.trim();
        for attempt in ["first", "second"] {
            match model.run(&refs) {
                Ok(_) => {
                    return Err(format!("the {attempt} run succeeded; expected it to fail with `{words}`"))
                }
                Err(e) if e.to_string().contains(words) => {}
                Err(e) => return Err(format!("the {attempt} run failed with `{e}`, expected `{words}`")),
            }
        }
        return Ok(Outcome {
            name: name.to_string(),
            max_error: None,
            passed: true,
            median: Duration::ZERO,
            kinds: Vec::new(),
            steps: Vec::new(),
            problem: None,
            failed_as_expected: true,
        });
    }
    let tolerance = match std::fs::read_to_string(dir.join("tolerance.txt")) {
        Ok(t) => t.trim().parse().map_err(|_| format!("tolerance.txt holds {:?}, not a number", t.trim()))?,
        Err(_) => args.tolerance,
    };
    let (mut max_error, mut problem) = compare_run(&mut model, dir, dir, &owned, tolerance)?;
    for run in further_runs(dir)? {
        let tag = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let at = |e: String| format!("run {tag}: {e}");
        let given = read_tensors(&run.join("inputs.safetensors")).map_err(at)?;
        let mut inputs = Vec::new();
        for spec in model.entry_inputs(entry).map_err(|e| at(e.to_string()))? {
            let found = given.iter().find(|(n, ..)| *n == spec.name);
            inputs
                .push(found.cloned().ok_or_else(|| at(format!("inputs.safetensors lacks `{}`", spec.name)))?);
        }
        let (error, fault) = compare_run(&mut model, dir, &run, &inputs, tolerance).map_err(at)?;
        max_error = match (max_error, error) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        problem = problem.or(fault.map(at));
    }
    let passed = problem.is_none();
    for _ in 0..3 {
        model.run(&refs).map_err(|e| e.to_string())?;
    }
    let mut times = Vec::with_capacity(args.repeats.max(1));
    for _ in 0..args.repeats.max(1) {
        let start = Instant::now();
        model.run(&refs).map_err(|e| e.to_string())?;
        times.push(start.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    let (_, profile) = model.run_profiled(&refs, args.repeats.clamp(1, 20)).map_err(|e| e.to_string())?;
    let kinds = profile.by_kind().into_iter().map(|k| (k.kind, k.time)).collect();
    let steps = profile.steps.iter().map(|s| (s.label.clone(), s.time)).collect();
    Ok(Outcome {
        name: name.to_string(),
        max_error,
        passed,
        median,
        kinds,
        steps,
        problem,
        failed_as_expected: false,
    })
}

/// Runs a training artifact's `train_step` `steps` times, then compares (or with `--record`
/// writes) the last step's outputs and the state, and times further steps.
fn check_training(
    model: &mut Model,
    dir: &Path,
    name: &str,
    args: &Args,
    refs: &[TensorRef],
    steps: usize,
) -> Result<Outcome, String> {
    let mut last = Vec::new();
    for _ in 0..steps.max(1) {
        last = model.run_entry("train_step", refs).map_err(|e| e.to_string())?;
    }
    let mut got: Vec<Named> = last
        .iter()
        .map(|o| (o.name().to_string(), o.dtype(), o.shape().to_vec(), o.bytes().to_vec()))
        .collect();
    for state in model.state_names() {
        let t = model.read_state(&state).map_err(|e| e.to_string())?;
        got.push((format!("state:{state}"), t.dtype(), t.shape().to_vec(), t.bytes().to_vec()));
    }
    let expected_path = dir.join("expected.safetensors");
    let (max_error, problem) = if args.record {
        write_tensors(&expected_path, &got)?;
        (None, None)
    } else {
        let expected = read_tensors(&expected_path)?;
        if expected.is_empty() {
            return Err("a training artifact without expected.safetensors: nothing to compare".into());
        }
        let missing: Vec<&str> =
            got.iter().map(|(n, ..)| n.as_str()).filter(|n| !expected.iter().any(|(e, ..)| e == n)).collect();
        if !missing.is_empty() {
            return Err(format!("expected.safetensors lacks {}", missing.join(", ")));
        }
        compare(&got, &expected, args.tolerance)?
    };
    let passed = problem.is_none();
    let mut times = Vec::with_capacity(args.repeats.max(1));
    for _ in 0..args.repeats.max(1) {
        let start = Instant::now();
        model.run_entry("train_step", refs).map_err(|e| e.to_string())?;
        times.push(start.elapsed());
    }
    times.sort();
    Ok(Outcome {
        name: name.to_string(),
        max_error,
        passed,
        median: times[times.len() / 2],
        kinds: Vec::new(),
        steps: Vec::new(),
        problem,
        failed_as_expected: false,
    })
}

/// Runs `model` on `inputs` and compares its outputs (pooled as the artifact `dir`'s
/// `pooled.txt` says) with `expected.safetensors` in `run` (the artifact itself or one of its
/// `runs/`).
fn compare_run(
    model: &mut Model,
    dir: &Path,
    run: &Path,
    inputs: &[Named],
    tolerance: f64,
) -> Result<(Option<f64>, Option<String>), String> {
    let refs: Vec<TensorRef> = inputs.iter().map(|(n, d, s, b)| TensorRef::new(n, *d, s, b)).collect();
    let outputs = model.run(&refs).map_err(|e| e.to_string())?;
    let expected = read_tensors(&run.join("expected.safetensors"))?;
    let mut got: Vec<Named> = outputs
        .iter()
        .map(|o| (o.name().to_string(), o.dtype(), o.shape().to_vec(), o.bytes().to_vec()))
        .collect();
    if let Ok(line) = std::fs::read_to_string(dir.join("pooled.txt")) {
        let pooled = pooled(line.trim(), &got, inputs)?;
        got.push(pooled);
    }
    compare(&got, &expected, tolerance)
}

/// The artifact `dir`'s further runs (`runs/*/`), in name order.
fn further_runs(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let runs = dir.join("runs");
    if !runs.is_dir() {
        return Ok(Vec::new());
    }
    let entries = std::fs::read_dir(&runs).map_err(|e| format!("{}: {e}", runs.display()))?;
    let mut found: Vec<PathBuf> =
        entries.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
    found.sort();
    Ok(found)
}

/// `pooled.txt`'s `OUTPUT MASK NAME`: output `OUTPUT` of `got` ([batch, seq, width]) pooled into
/// sentence embeddings (`kiln_runtime::pooling`: the mean over the positions where input `MASK`
/// of `inputs` ([batch, seq]) is not zero, then L2-normalized), as f64 tensor `NAME` [batch, width].
fn pooled(line: &str, got: &[Named], inputs: &[Named]) -> Result<Named, String> {
    let [output, mask, name] = line.split_whitespace().collect::<Vec<_>>()[..] else {
        return Err(format!("pooled.txt holds {line:?}, not `OUTPUT MASK NAME`"));
    };
    let find = |tensors: &[Named], what: &str, n: &str| {
        tensors.iter().find(|(t, ..)| t == n).cloned().ok_or_else(|| format!("pooled.txt: no {what} `{n}`"))
    };
    let (_, dtype, shape, bytes) = find(got, "output", output)?;
    let (_, mask_dtype, mask_shape, mask_bytes) = find(inputs, "input", mask)?;
    let [batch, seq, width] = shape[..] else {
        return Err(format!("pooled.txt: output `{output}` is {shape:?}, not [batch, seq, width]"));
    };
    if mask_shape[..] != [batch, seq] {
        return Err(format!("pooled.txt: input `{mask}` is {mask_shape:?}, not [{batch}, {seq}]"));
    }
    let keep: Vec<bool> = as_f64(mask_dtype, &mask_bytes).iter().map(|&k| k != 0.0).collect();
    let embeddings = mean_pool_normalize(&as_f64(dtype, &bytes), &keep, seq as usize, width as usize)
        .map_err(|e| format!("pooled.txt: {e}"))?;
    let out = embeddings.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
    Ok((name.to_string(), DType::F64, vec![batch, width], out))
}

/// The largest error of `got` against the tensors of `expected` of the same names, relative as
/// `|g − w| / (1 + |w|)`, and where a value is past `tolerance` what says most about the fault
/// in one line: each output's count of values past it, and the worst value with its
/// coordinates. An expected tensor that no output has is an error: it would pass unread.
fn compare(
    got: &[Named],
    expected: &[Named],
    tolerance: f64,
) -> Result<(Option<f64>, Option<String>), String> {
    let unmatched: Vec<&str> =
        expected.iter().map(|(n, ..)| n.as_str()).filter(|n| !got.iter().any(|(g, ..)| g == n)).collect();
    if !unmatched.is_empty() {
        return Err(format!("expected.safetensors holds {}, which no output has", unmatched.join(", ")));
    }
    let mut max_error: Option<f64> = None;
    let mut worst: Option<(f64, String)> = None;
    let mut past_counts: Vec<String> = Vec::new();
    for (name, dtype, shape, bytes) in got {
        let Some((_, want_dtype, _, want)) = expected.iter().find(|(n, ..)| n == name) else { continue };
        let (got, want) = (as_f64(*dtype, bytes), as_f64(*want_dtype, want));
        if got.len() != want.len() {
            return Err(format!("`{name}` has {} values, the reference {}", got.len(), want.len()));
        }
        let mut past = 0usize;
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let same_special = (g.is_nan() && w.is_nan()) || g == w;
            let e = if same_special { 0.0 } else { (g - w).abs() / (1.0 + w.abs()) };
            let e = if e.is_nan() { f64::INFINITY } else { e };
            max_error = Some(max_error.map_or(e, |m| m.max(e)));
            if e > tolerance {
                past += 1;
                if worst.as_ref().is_none_or(|(m, _)| e > *m) {
                    worst = Some((
                        e,
                        format!(
                            "`{name}`{:?} (got {}, want {})",
                            coordinates(i, shape),
                            *g as f32,
                            *w as f32
                        ),
                    ));
                }
            }
        }
        if past > 0 {
            past_counts.push(format!("`{name}` {past} of {}", got.len()));
        }
    }
    let problem = worst
        .map(|(e, at)| format!("max error {e:.2e} at {at}; past {tolerance:e}: {}", past_counts.join(", ")));
    Ok((max_error, problem))
}

/// The coordinates of flat index `i` in a row-major tensor of `shape`.
fn coordinates(i: usize, shape: &[u64]) -> Vec<u64> {
    let mut rest = i as u64;
    let mut at = vec![0; shape.len()];
    for (a, &n) in at.iter_mut().zip(shape).rev() {
        *a = rest % n.max(1);
        rest /= n.max(1);
    }
    at
}

/// Writes tensors as a safetensors file.
fn write_tensors(path: &Path, tensors: &[Named]) -> Result<(), String> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            let dtype = match dtype {
                DType::F32 => safetensors::Dtype::F32,
                DType::F64 => safetensors::Dtype::F64,
                DType::F16 => safetensors::Dtype::F16,
                DType::BF16 => safetensors::Dtype::BF16,
                DType::I32 => safetensors::Dtype::I32,
                DType::I64 => safetensors::Dtype::I64,
                DType::Bool => safetensors::Dtype::BOOL,
            };
            let shape = shape.iter().map(|&d| d as usize).collect();
            safetensors::tensor::TensorView::new(dtype, shape, bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| format!("`{name}`: {e}"))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| e.to_string())?;
    std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
}

/// An input nobody gave: a ramp for floats, zeros (valid indices) for integers and booleans.
fn stand_in(dtype: DType, n: usize) -> Vec<u8> {
    let ramp = (0..n).map(|i| (i % 32) as f32 / 16.0 - 1.0);
    match dtype {
        DType::F32 => ramp.flat_map(f32::to_le_bytes).collect(),
        DType::F64 => ramp.flat_map(|v| f64::from(v).to_le_bytes()).collect(),
        DType::F16 => ramp.flat_map(|v| f16_bits(v).to_le_bytes()).collect(),
        // The ramp's values have few significant bits: bf16 is the f32's high half, exactly.
        DType::BF16 => ramp.flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect(),
        DType::I32 | DType::I64 | DType::Bool => vec![0; n * dtype.size_bytes()],
    }
}

/// The f16 bits of `v`, which f16 holds exactly: zero, or a normal number with at most 11
/// significant bits and an exponent f16 has (the ramp's values).
fn f16_bits(v: f32) -> u16 {
    if v == 0.0 {
        return 0;
    }
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exponent = (((b >> 23) & 0xff) as i32 - 127 + 15) as u16;
    sign | (exponent << 10) | ((b >> 13) & 0x3ff) as u16
}

/// The tensors of a safetensors file as (name, dtype, shape, bytes); none when it is missing.
fn read_tensors(path: &Path) -> Result<Vec<Named>, String> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file =
        safetensors::SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    for (name, view) in file.tensors() {
        let dtype = dtype_of(view.dtype())
            .ok_or_else(|| format!("{}: `{name}` has an unsupported dtype", path.display()))?;
        out.push((name, dtype, view.shape().iter().map(|&d| d as u64).collect(), view.data().to_vec()));
    }
    Ok(out)
}

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::I32 => DType::I32,
        safetensors::Dtype::I64 => DType::I64,
        safetensors::Dtype::BOOL | safetensors::Dtype::U8 => DType::Bool,
        _ => return None,
    })
}

/// Values as f64 for comparison.
fn as_f64(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => {
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        DType::F64 => {
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
        }
        DType::I32 => {
            bytes.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        DType::I64 => {
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f64).collect()
        }
        DType::Bool => bytes.iter().map(|&b| b as f64).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
            .collect(),
    }
}

fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = (h >> 10) & 0x1f;
    let frac = (h & 0x3ff) as f64;
    sign * match exp {
        0 => frac * 2f64.powi(-24),
        31 if frac == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + frac / 1024.0) * 2f64.powi(e as i32 - 15),
    }
}

/// Writes `weights.safetensors` from `weights.header` (its safetensors header alone), with
/// synthesized values, and rewrites the manifest's digest of it. Nothing to do without a header
/// or when the weights are already there.
fn synthesize_weights(dir: &Path) -> Result<(), String> {
    let header_path = dir.join("weights.header");
    let weights_path = dir.join(WEIGHTS_FILE);
    if !header_path.exists() || weights_path.exists() {
        return Ok(());
    }
    let header = std::fs::read(&header_path).map_err(|e| format!("{}: {e}", header_path.display()))?;
    let manifest_path = dir.join(kiln_runtime::MANIFEST_FILE);
    let text =
        std::fs::read_to_string(&manifest_path).map_err(|e| format!("{}: {e}", manifest_path.display()))?;
    let mut manifest = Manifest::from_ron(&text).map_err(|e| e.to_string())?;
    // The manifest still records the whole file's size: header and data.
    let size = manifest
        .files
        .iter()
        .find(|f| f.name == WEIGHTS_FILE)
        .map(|f| f.bytes as usize)
        .ok_or_else(|| format!("{}: no digest of {WEIGHTS_FILE}", manifest_path.display()))?;
    let mut file = header;
    file.resize(size.max(file.len()), 0);
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&file)
        .map_err(|e| format!("{}: {e}", header_path.display()))?;
    let start = file.len() - metadata.tensors().values().map(|i| i.data_offsets.1).max().unwrap_or(0);
    let mut tensors: Vec<(String, &safetensors::tensor::TensorInfo)> =
        metadata.tensors().into_iter().collect();
    tensors.sort_by_key(|(_, info)| info.data_offsets.0);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for (_, info) in &tensors {
        if info.dtype != safetensors::Dtype::F32 {
            continue;
        }
        for chunk in file[start + info.data_offsets.0..start + info.data_offsets.1].chunks_exact_mut(4) {
            // xorshift64*: a fixed, cheap stream of values uniform in ±0.05.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
            let v = (r as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
    }
    for f in &mut manifest.files {
        if f.name == WEIGHTS_FILE {
            *f = FileDigest::of(WEIGHTS_FILE, &file);
        }
    }
    std::fs::write(&weights_path, &file).map_err(|e| format!("{}: {e}", weights_path.display()))?;
    let text = manifest.to_ron().map_err(|e| e.to_string())?;
    std::fs::write(&manifest_path, text).map_err(|e| format!("{}: {e}", manifest_path.display()))
}
