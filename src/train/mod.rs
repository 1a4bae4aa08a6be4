//! `kiln train`: a model's training section run on data, through the compiled train step
//! (the same optimizer, scheduler and code generators as `kiln compile`).
//!
//! Each epoch takes the training examples in a seeded order, in batches of the model's batch
//! size (the last partial batch is left out), runs one optimizer step per batch, then
//! evaluates the held-out examples. `--out` gets `metrics.csv`, `metrics.png` and
//! `checkpoint.safetensors` after every epoch; `--resume` continues from a checkpoint exactly
//! as the uninterrupted run would have (the orders are functions of the seed and the epoch,
//! the state is restored bit for bit), and Ctrl-C stops after the current step with a
//! checkpoint.

mod checkpoint;
mod data;
mod metrics;
mod stepper;

use crate::commands::{bind_params, load, user, Failure};
use checkpoint::Position;
use data::{Dataset, InputSpec};
use indicatif::{ProgressBar, ProgressStyle};
use kiln_ir::Op;
use kiln_lower::{LossKind, TrainingPlan};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use stepper::{to_f64, Raw, Stepper, EVAL_PRED, EVAL_TARGET};

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The model spec (.ron), with a training section.
    model: PathBuf,
    /// Training data: a .safetensors file with one tensor per model input (by input name,
    /// examples along the first axis), or a folder of `NAME.npy` files.
    #[arg(long, value_name = "FILE|DIR")]
    data: PathBuf,
    /// Held-out data to evaluate after each epoch (same form as --data).
    #[arg(long, value_name = "FILE|DIR", conflicts_with = "holdout")]
    eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data (a seeded split) to evaluate after each epoch.
    #[arg(long, value_name = "FRACTION")]
    holdout: Option<f64>,
    /// Epochs to train (in all: a resumed run stops at the same epoch as a fresh one).
    #[arg(long, default_value_t = 1)]
    epochs: usize,
    /// The base learning rate, instead of the training section's.
    #[arg(long)]
    lr: Option<f64>,
    /// Seed of the initial parameters, the held-out split and every epoch's order (default
    /// 0; a resumed run takes its checkpoint's).
    // At most i64::MAX: the seed is also the model's config `seed`, a config integer.
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=i64::MAX as u64))]
    seed: Option<u64>,
    /// A folder for metrics.csv, metrics.png and checkpoint.safetensors (written each epoch).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Continue from a checkpoint that `kiln train` wrote.
    #[arg(long, value_name = "CKPT")]
    resume: Option<PathBuf>,
    /// Initial parameters by checkpoint name (.safetensors); without it they are initialized.
    #[arg(long, value_name = "FILE", conflicts_with = "resume")]
    weights: Option<PathBuf>,
    /// With --weights: initialize parameters the file lacks instead of failing.
    #[arg(long)]
    init_missing: bool,
    /// Where to train: `cpu` (default), `vulkan[:N]` or `cuda[:N]`.
    #[arg(long, value_name = "DEVICE")]
    device: Option<String>,
    /// Worker threads on the CPU (default: `KILN_THREADS`, else every core).
    #[arg(long)]
    threads: Option<usize>,
    /// Override a config value, e.g. `--set batch=32` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
}

/// How a training run ended.
pub enum Outcome {
    Finished,
    /// Stopped by Ctrl-C after saving what it could (exit status 130, as for SIGINT).
    Interrupted,
}

/// Set by the first Ctrl-C; the loop checks it after each step.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const CHECKPOINT: &str = "checkpoint.safetensors";

pub fn train(a: &TrainArgs) -> Result<Outcome, Failure> {
    check_usage(a)?;
    let resumed = a.resume.as_deref().map(checkpoint::read).transpose()?;
    let seed = match (&resumed, a.seed) {
        (Some((_, at)), Some(s)) if s != at.seed => {
            return Err(Failure::Usage(format!(
                "--seed {s} differs from the checkpoint's seed {}: a resumed run keeps its seed",
                at.seed
            )))
        }
        (Some((_, at)), _) => at.seed,
        (None, s) => s.unwrap_or(0),
    };
    let mut set = a.set.clone();
    if !set.iter().any(|s| s.trim_start().starts_with("seed=")) {
        set.push(format!("seed={seed}"));
    }
    let mut lowered = load(&a.model, &set)?;
    let Some(plan) = lowered.training.as_mut() else {
        return Err(user(format!(
            "{} has no training section: `kiln train` needs one (docs/spec-language.md, section 7)",
            a.model.display()
        )));
    };
    if let Some(lr) = a.lr {
        match plan.hyper.iter_mut().find(|(k, _)| k == "lr") {
            Some(entry) => entry.1 = lr,
            None => plan.hyper.push(("lr".into(), lr)),
        }
    }
    let plan = plan.clone();
    let specs = input_specs(&lowered.graph, &plan)?;

    // The data, and the held-out part.
    let all = Dataset::new(data::read(&a.data)?, &specs, &a.data)?;
    let (train_set, eval_set) = match (&a.eval_data, a.holdout) {
        (Some(path), _) => (all, Some(Dataset::new(data::read(path)?, &specs, path)?)),
        (None, Some(fraction)) => {
            let (train_rows, eval_rows) = data::split(all.len(), fraction, seed);
            (all.subset(&train_rows), Some(all.subset(&eval_rows)))
        }
        (None, None) => (all, None),
    };
    if eval_set.as_ref().is_some_and(|s| s.len() == 0) {
        return Err(user(
            "the held-out set is empty: hold out a larger fraction (--holdout) or give --eval-data with examples",
        ));
    }

    let per_step = examples_per_step(&lowered.graph, &plan);
    let batches = train_set.len() / per_step;
    if batches == 0 {
        return Err(user(format!(
            "{} training examples are fewer than one batch of {per_step}: give more data or a smaller batch (`--set batch=…`)",
            train_set.len()
        )));
    }
    let left_out = train_set.len() % per_step;
    if left_out > 0 {
        eprintln!(
            "note: {} training examples make {batches} batches of {per_step} an epoch; the last {left_out} of each epoch's order are left out",
            train_set.len()
        );
    }

    let params = bind_params(&lowered.graph, a.weights.as_deref(), seed, a.init_missing)?;
    let compile_start = Instant::now();
    let mut stepper = Stepper::new(&lowered, &params, a.device.as_deref(), a.threads)?;
    eprintln!(
        "compiled the train step and the forward pass in {:.1} s",
        compile_start.elapsed().as_secs_f64()
    );
    let eval_batch =
        stepper.eval_inputs().first().and_then(|(_, _, s)| s.first().copied()).unwrap_or(1) as usize;

    let mut at = Position {
        model: lowered.graph.name.clone(),
        epoch: 0,
        batch: 0,
        seed,
        examples: train_set.len(),
        loss_sum: 0.0,
    };
    let mut rows: Vec<metrics::Row> = Vec::new();
    if let (Some((tensors, saved)), Some(path)) = (&resumed, &a.resume) {
        if saved.model != at.model || saved.examples != at.examples {
            return Err(user(format!(
                "{} is a checkpoint of model `{}` on {} training examples; this run is `{}` on {}: resume with the same model and data",
                path.display(),
                saved.model,
                saved.examples,
                at.model,
                at.examples
            )));
        }
        stepper.set_state(tensors, &path.display().to_string())?;
        at = saved.clone();
        if let Some(out) = &a.out {
            rows = earlier_rows(out, at.epoch);
        }
        eprintln!("resuming at epoch {}, batch {} of {batches}", at.epoch + 1, at.batch);
    }
    if at.epoch >= a.epochs {
        println!("nothing to do: the checkpoint has {} epochs, --epochs is {}", at.epoch, a.epochs);
        return Ok(Outcome::Finished);
    }
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).map_err(|e| user(format!("cannot create {}: {e}", out.display())))?;
    }
    // Ctrl-C once: finish the step and save; twice: stop at once.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
    });

    let bar = if std::io::stderr().is_terminal() {
        ProgressBar::new(batches as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
            .map_err(|e| user(format!("internal error: progress template: {e}")))?
            .progress_chars("=> "),
    );
    let seconds_before = rows.last().map_or(0.0, |r| r.seconds);
    let start = Instant::now();
    let mut lr = f64::NAN;
    while at.epoch < a.epochs {
        let order = data::epoch_order(train_set.len(), seed, at.epoch);
        bar.set_prefix(format!("{}/{}", at.epoch + 1, a.epochs));
        bar.set_position(at.batch as u64);
        let epoch_start = Instant::now();
        let first_batch = at.batch;
        while at.batch < batches {
            let rows_of = &order[at.batch * per_step..(at.batch + 1) * per_step];
            let stats = stepper.step(&train_set.batch(rows_of))?;
            if !stats.loss.is_finite() {
                bar.abandon();
                return Err(user(format!(
                    "the loss is {} at epoch {}, batch {}: training diverged (try a smaller --lr)",
                    stats.loss,
                    at.epoch + 1,
                    at.batch + 1
                )));
            }
            lr = stats.lr;
            at.loss_sum += stats.loss;
            at.batch += 1;
            let rate =
                ((at.batch - first_batch) * per_step) as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9);
            bar.set_position(at.batch as u64);
            bar.set_message(format!("loss {:.4}  {rate:.0} examples/s", stats.loss));
            if INTERRUPTED.load(Ordering::SeqCst) {
                bar.abandon();
                return interrupted(a, &mut stepper, &at);
            }
        }
        let rate =
            ((batches - first_batch) * per_step) as f64 / epoch_start.elapsed().as_secs_f64().max(1e-9);
        let (eval_loss, eval_accuracy) = match &eval_set {
            Some(set) => {
                let (l, acc) = evaluate(&mut stepper, set, eval_batch, &plan, &specs)?;
                (Some(l), acc)
            }
            None => (None, None),
        };
        let row = metrics::Row {
            epoch: at.epoch + 1,
            step: ((at.epoch + 1) * batches) as u64,
            train_loss: at.loss_sum / batches as f64,
            eval_loss,
            eval_accuracy,
            lr,
            seconds: seconds_before + start.elapsed().as_secs_f64(),
        };
        bar.suspend(|| println!("{}", epoch_line(&row, a.epochs, rate)));
        rows.push(row);
        at.epoch += 1;
        at.batch = 0;
        at.loss_sum = 0.0;
        if let Some(out) = &a.out {
            metrics::write(out, &rows)?;
            checkpoint::write(&out.join(CHECKPOINT), &stepper.state()?, &at)?;
        }
    }
    bar.finish_and_clear();
    if let Some(out) = &a.out {
        println!("wrote {}, metrics.csv and metrics.png in {}", CHECKPOINT, out.display());
    }
    Ok(Outcome::Finished)
}

fn check_usage(a: &TrainArgs) -> Result<(), Failure> {
    if let Some(f) = a.holdout {
        if !(f > 0.0 && f < 1.0) {
            return Err(Failure::Usage(format!(
                "--holdout {f}: the held-out fraction must be above 0 and below 1"
            )));
        }
    }
    if let Some(lr) = a.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(Failure::Usage(format!("--lr {lr}: the learning rate must be a positive number")));
        }
    }
    if a.epochs == 0 {
        return Err(Failure::Usage("--epochs 0: train at least one epoch".into()));
    }
    if let Some(n) = a.threads {
        if n > crate::native::MAX_THREADS {
            return Err(Failure::Usage(format!("--threads {n} is more than {}", crate::native::MAX_THREADS)));
        }
    }
    if let Some(d) = &a.device {
        let gpu = |kind: &str| d == kind || d.strip_prefix(kind).is_some_and(|rest| rest.starts_with(':'));
        if !(d == "cpu" || gpu("vulkan") || gpu("cuda")) {
            return Err(Failure::Usage(format!(
                "--device {d}: `kiln train` runs on `cpu`, `vulkan[:N]` or `cuda[:N]`"
            )));
        }
    }
    Ok(())
}

/// What the data must hold for each model input. Integer inputs that index a table, and the
/// labels of a cross-entropy loss, must be in range.
fn input_specs(g: &kiln_ir::Graph, plan: &TrainingPlan) -> Result<Vec<InputSpec>, Failure> {
    let labels_input = match (&plan.loss, &g.node(plan.reads[1]).op) {
        (LossKind::CrossEntropy { ignore_index, .. }, Op::Input { name, .. }) => {
            let classes = g.ty(plan.reads[0]).static_shape().last().copied().unwrap_or(0);
            Some((name.clone(), classes, *ignore_index))
        }
        _ => None,
    };
    g.inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input { name, dtype, .. } => Some((name, dtype, g.ty(i).static_shape())),
            _ => None,
        })
        .map(|(name, dtype, shape)| {
            let Some((_, example)) = shape.split_first() else {
                return Err(user(format!(
                    "the model's input `{name}` is a scalar: `kiln train` needs examples along an input's first axis"
                )));
            };
            let bound = match &labels_input {
                Some((labels, classes, ignore)) if labels == name => Some((*classes, Some(*ignore))),
                _ => kiln_ir::index_bound(g, name).map(|b| (b, None)),
            };
            Ok(InputSpec { name: name.clone(), dtype: *dtype, example_shape: example.to_vec(), bound })
        })
        .collect()
}

/// The examples one train step takes: the batch (the first input's leading extent), times
/// the micro-batches under `accumulate`.
fn examples_per_step(g: &kiln_ir::Graph, plan: &TrainingPlan) -> usize {
    let batch = g.inputs.first().and_then(|&i| g.ty(i).static_shape().first().copied()).unwrap_or(1);
    (batch * plan.accumulate).max(1)
}

/// The held-out loss (as the training section defines it, over every example) and, for
/// cross-entropy, the accuracy: batches of the forward pass's size, the last one padded with
/// repeats of its first example, which are not counted.
fn evaluate(
    stepper: &mut Stepper,
    set: &Dataset,
    batch: usize,
    plan: &TrainingPlan,
    specs: &[InputSpec],
) -> Result<(f64, Option<f64>), Failure> {
    let mut sum = Sums::default();
    let all: Vec<usize> = (0..set.len()).collect();
    for chunk in all.chunks(batch) {
        let mut rows = chunk.to_vec();
        rows.resize(batch, chunk[0]);
        let bytes = set.batch(&rows);
        let outputs = stepper.evaluate(&bytes)?;
        let pred = outputs
            .iter()
            .find(|o| o.name == EVAL_PRED)
            .ok_or_else(|| user("internal error: no prediction"))?;
        let target = match outputs.iter().find(|o| o.name == EVAL_TARGET) {
            Some(t) => to_f64(t.dtype, &t.bytes),
            None => {
                let name = target_input(plan, specs);
                let column = set.columns.iter().position(|c| Some(c.name.as_str()) == name);
                let c = column.ok_or_else(|| user("internal error: the loss's target is not an input"))?;
                to_f64(set.columns[c].dtype, &bytes[c])
            }
        };
        sum.add(plan, pred, &target, batch, chunk.len());
    }
    let loss = sum.loss / sum.count.max(1) as f64;
    let accuracy = matches!(plan.loss, LossKind::CrossEntropy { .. })
        .then(|| sum.correct as f64 / sum.count.max(1) as f64);
    Ok((loss, accuracy))
}

/// The name of the model input that is the loss's second operand.
fn target_input<'a>(plan: &'a TrainingPlan, specs: &'a [InputSpec]) -> Option<&'a str> {
    let name = match &plan.loss {
        LossKind::CrossEntropy { labels, .. } => labels,
        LossKind::Mse { target, .. } => target,
    };
    specs.iter().find(|s| s.name == *name).map(|s| s.name.as_str())
}

#[derive(Default)]
struct Sums {
    loss: f64,
    /// Positions (cross-entropy, ignored labels excepted) or elements (MSE) counted.
    count: usize,
    correct: usize,
}

impl Sums {
    /// Adds the first `real` of the `batch` examples of one forward pass.
    fn add(&mut self, plan: &TrainingPlan, pred: &Raw, target: &[f64], batch: usize, real: usize) {
        let p = to_f64(pred.dtype, &pred.bytes);
        match &plan.loss {
            LossKind::CrossEntropy { label_smoothing, ignore_index, .. } => {
                let classes = pred.shape.last().copied().unwrap_or(1).max(1) as usize;
                let positions = p.len() / classes;
                let keep = positions / batch * real;
                for (row, &label) in p.chunks(classes).zip(target).take(keep) {
                    // A computed label outside the classes counts as left out, like `ignore_index`
                    // (labels read from the data were checked when it was read).
                    if label as i64 == *ignore_index || !(label >= 0.0 && label < classes as f64) {
                        continue;
                    }
                    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let lse = max + row.iter().map(|z| (z - max).exp()).sum::<f64>().ln();
                    let nll = lse - row[label as usize];
                    let mean = row.iter().sum::<f64>() / classes as f64;
                    self.loss += (1.0 - label_smoothing) * nll + label_smoothing * (lse - mean);
                    let best = row.iter().enumerate().fold(0, |m, (i, v)| if *v > row[m] { i } else { m });
                    self.correct += usize::from(best == label as usize);
                    self.count += 1;
                }
            }
            LossKind::Mse { .. } => {
                let keep = p.len() / batch * real;
                for (a, b) in p.iter().zip(target).take(keep) {
                    self.loss += (a - b) * (a - b);
                    self.count += 1;
                }
            }
        }
    }
}

fn epoch_line(r: &metrics::Row, epochs: usize, rate: f64) -> String {
    let mut line = format!("epoch {}/{epochs}: train loss {:.4}", r.epoch, r.train_loss);
    if let Some(l) = r.eval_loss {
        line += &format!(", eval loss {l:.4}");
    }
    if let Some(acc) = r.eval_accuracy {
        line += &format!(", eval accuracy {:.1} %", 100.0 * acc);
    }
    line + &format!(", lr {:.3e}, {rate:.0} examples/s", r.lr)
}

/// The rows of an earlier run's `metrics.csv` in `out`, up to the checkpoint's epoch.
fn earlier_rows(out: &Path, epoch: usize) -> Vec<metrics::Row> {
    let text = std::fs::read_to_string(out.join("metrics.csv")).unwrap_or_default();
    metrics::parse_csv(&text).unwrap_or_default().into_iter().filter(|r| r.epoch <= epoch).collect()
}

/// Ctrl-C: saves a checkpoint of where training stands (with `--out`) and says how to go on.
fn interrupted(a: &TrainArgs, stepper: &mut Stepper, at: &Position) -> Result<Outcome, Failure> {
    match &a.out {
        Some(out) => {
            let path = out.join(CHECKPOINT);
            checkpoint::write(&path, &stepper.state()?, at)?;
            eprintln!(
                "interrupted at epoch {}, batch {}: saved {} (continue with --resume {})",
                at.epoch + 1,
                at.batch,
                path.display(),
                path.display()
            );
        }
        None => {
            eprintln!("interrupted at epoch {}, batch {}: nothing saved (no --out)", at.epoch + 1, at.batch)
        }
    }
    Ok(Outcome::Interrupted)
}
