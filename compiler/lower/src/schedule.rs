//! Learning-rate schedules as graph ops: the learning rate of a step is computed in the graph
//! from the step count, so a train step compiles once for the whole run.
//!
//! With `s` the number of steps taken before this one (PyTorch's scheduler after `s` calls of
//! `scheduler.step()`, Hugging Face's `lr_lambda(s)`) and `lr` the optimizer's rate:
//!
//! * `Constant`: `lr`.
//! * `Linear(warmup, total)`: `lr · s / warmup` while `s < warmup`, then
//!   `lr · max(0, (total − s) / (total − warmup))` (`get_linear_schedule_with_warmup`).
//! * `Cosine(warmup, total, min_lr)`: the same warm-up, then
//!   `min_lr + (lr − min_lr) · ½(1 + cos(π · min(1, (s − warmup) / (total − warmup))))`
//!   (`get_cosine_with_min_lr_schedule_with_warmup`; `min_lr` 0 is the plain cosine),
//!   computed as `min_lr + (lr − min_lr) · sin²(π/2 · max(0, (total − s) / (total − warmup)))`,
//!   the same number without the cancellation of `1 + cos` near the end, where f32 lost
//!   up to 16 ulps.
//! * `Step(step_size, gamma)`: `lr · gamma^⌊s / step_size⌋` (`torch.optim.lr_scheduler.StepLR`).
//!
//! A warm-up starts at 0: the first step does not move the parameters, as in those
//! libraries. Divisors `warmup` and `total − warmup` count as at least 1.

use crate::training::{TrainingError, TrainingPlan};
use kiln_ir::{BinaryOp, CompareOp, DType, Graph, InferError, NodeId, Op, UnaryOp};

/// A schedule with every argument resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    Linear { warmup: f64, total: f64 },
    Cosine { warmup: f64, total: f64, min_lr: f64 },
    Step { step_size: f64, gamma: f64 },
}

impl Schedule {
    /// The schedule of a checked training section (`Constant` when it has none).
    pub fn from_plan(plan: &TrainingPlan) -> Result<Schedule, TrainingError> {
        let Some((kind, args)) = &plan.schedule else { return Ok(Schedule::Constant) };
        let a = |k: &str| args.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap_or(0.0);
        match kind.as_str() {
            "Constant" => Ok(Schedule::Constant),
            "Linear" => Ok(Schedule::Linear { warmup: a("warmup"), total: a("total") }),
            "Cosine" => Ok(Schedule::Cosine { warmup: a("warmup"), total: a("total"), min_lr: a("min_lr") }),
            "Step" => Ok(Schedule::Step { step_size: a("step_size"), gamma: a("gamma") }),
            other => Err(TrainingError::Optimizer(format!("the {other} schedule is not in the graph yet"))),
        }
    }
}

/// Appends the learning rate of the step after `step` steps (a float scalar) under
/// `schedule`, computed in (and returned as a scalar of) the float `dtype`: f64 for f64
/// parameters, f32 otherwise, which every target computes (GPU targets have no 64-bit cos or
/// pow), within two ulps of f32 of PyTorch's double-precision schedule (1.5e-7 relative at
/// worst in `tests/pytorch.rs`).
pub fn learning_rate(
    g: &mut Graph,
    lr: f64,
    schedule: &Schedule,
    step: NodeId,
    dtype: DType,
) -> Result<NodeId, InferError> {
    let mut b = Scalars { g, dtype };
    let s = b.g.add(Op::Cast { to: dtype }, &[step])?;
    let rate = match *schedule {
        Schedule::Constant => b.c(lr)?,
        Schedule::Linear { warmup, total } => {
            let total_n = b.c(total)?;
            let left = b.bin(BinaryOp::Sub, total_n, s)?;
            let frac = b.scale(left, 1.0 / (total - warmup).max(1.0))?;
            let zero = b.c(0.0)?;
            let frac = b.bin(BinaryOp::Max, frac, zero)?;
            let after = b.scale(frac, lr)?;
            b.warmup(lr, warmup, s, after)?
        }
        Schedule::Cosine { warmup, total, min_lr } => {
            // ½(1 + cos(π·p)) = sin²(π·q/2) with q = 1 − p = (total − s) / (total − warmup):
            // near the end of the schedule 1 + cos(π·p) cancels and loses f32 bits, while q
            // comes from integers and the sine of a small angle keeps them.
            let total_n = b.c(total)?;
            let left = b.bin(BinaryOp::Sub, total_n, s)?;
            let q = b.scale(left, 1.0 / (total - warmup).max(1.0))?;
            let zero = b.c(0.0)?;
            let q = b.bin(BinaryOp::Max, q, zero)?;
            let one = b.c(1.0)?;
            let q = b.bin(BinaryOp::Min, q, one)?;
            let angle = b.scale(q, std::f64::consts::FRAC_PI_2)?;
            let sin = b.g.add(Op::Unary(UnaryOp::Sin), &[angle])?;
            let shape = b.bin(BinaryOp::Mul, sin, sin)?;
            let span = b.scale(shape, lr - min_lr)?;
            let floor = b.c(min_lr)?;
            let after = b.bin(BinaryOp::Add, floor, span)?;
            b.warmup(lr, warmup, s, after)?
        }
        Schedule::Step { step_size, gamma } => {
            // ⌊s / step_size⌋ in integers (s ≥ 0, so truncation is the floor).
            let si = b.g.add(Op::Cast { to: DType::I64 }, &[step])?;
            let size = b
                .g
                .add(Op::Full { value: step_size.round().max(1.0), dtype: DType::I64, shape: vec![] }, &[])?;
            let k = b.bin(BinaryOp::Div, si, size)?;
            let k = b.g.add(Op::Cast { to: dtype }, &[k])?;
            let gamma_n = b.c(gamma)?;
            let decay = b.bin(BinaryOp::Pow, gamma_n, k)?;
            b.scale(decay, lr)?
        }
    };
    Ok(rate)
}

/// Appends scalar arithmetic in one float dtype.
struct Scalars<'g> {
    g: &'g mut Graph,
    dtype: DType,
}

impl Scalars<'_> {
    fn c(&mut self, value: f64) -> Result<NodeId, InferError> {
        self.g.add(Op::Full { value, dtype: self.dtype, shape: vec![] }, &[])
    }

    fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId, InferError> {
        self.g.add(Op::Binary(op), &[a, b])
    }

    fn scale(&mut self, x: NodeId, c: f64) -> Result<NodeId, InferError> {
        let n = self.c(c)?;
        self.bin(BinaryOp::Mul, x, n)
    }

    /// `lr · s / warmup` while `s < warmup`, else `after`.
    fn warmup(&mut self, lr: f64, warmup: f64, s: NodeId, after: NodeId) -> Result<NodeId, InferError> {
        if warmup <= 0.0 {
            return Ok(after);
        }
        let ramp = self.scale(s, lr / warmup.max(1.0))?;
        let w = self.c(warmup)?;
        let warming = self.g.add(Op::Compare(CompareOp::Lt), &[s, w])?;
        self.g.add(Op::Where, &[warming, ramp, after])
    }
}
