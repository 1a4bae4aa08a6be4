//! Optimizer updates as graph ops, with PyTorch's semantics: SGD (momentum, dampening,
//! Nesterov, weight decay), Adam, AdamW and RMSprop (momentum, centered, weight decay), and
//! global-norm gradient clipping (`torch.nn.utils.clip_grad_norm_`).
//!
//! A train step takes the optimizer's state as graph inputs and returns the new state as
//! outputs, under the checkpoint names a training run saves (`optim.step`, `optim.m.NAME`,
//! `optim.v.NAME`, `optim.momentum.NAME`, `optim.square_avg.NAME`, `optim.grad_avg.NAME`);
//! the step count lives in the graph, so bias corrections and the learning rate of a schedule
//! (`schedule.rs`) need no recompilation. [`declare_train_state`] turns those inputs and
//! outputs, and the parameters with their `param.NAME` outputs, into the graph's persistent
//! state (`kiln_ir::StateVar`), updated in place by a compiled train step.

use crate::schedule::{learning_rate, Schedule};
use crate::training::{training_graph, TrainingError, TrainingPlan};
use crate::Lowered;
use kiln_ir::{
    BinaryOp, CompareOp, DType, Graph, InferError, NodeId, Op, ReduceOp, StateError, StateInit, UnaryOp,
};
use std::collections::HashMap;

/// An optimizer with every hyper-parameter resolved.
#[derive(Clone, Debug, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.SGD`.
    Sgd { lr: f64, momentum: f64, dampening: f64, nesterov: bool, weight_decay: f64 },
    /// `torch.optim.Adam` (weight decay added to the gradient) or, when `decoupled`,
    /// `torch.optim.AdamW` (weight decay applied to the parameter).
    Adam { lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, decoupled: bool },
    /// `torch.optim.RMSprop`.
    RmsProp { lr: f64, alpha: f64, eps: f64, weight_decay: f64, momentum: f64, centered: bool },
}

impl Optimizer {
    /// The optimizer of a checked training section.
    pub fn from_plan(plan: &TrainingPlan) -> Result<Optimizer, TrainingError> {
        let h = |k: &str| plan.hyper.iter().find(|(n, _)| n == k).map(|(_, v)| *v).unwrap_or(0.0);
        let adam = |decoupled| Optimizer::Adam {
            lr: h("lr"),
            beta1: h("beta1"),
            beta2: h("beta2"),
            eps: h("eps"),
            weight_decay: h("weight_decay"),
            decoupled,
        };
        match plan.optimizer.as_str() {
            "Sgd" => {
                let (momentum, dampening, nesterov) = (h("momentum"), h("dampening"), h("nesterov") != 0.0);
                if nesterov && (momentum <= 0.0 || dampening != 0.0) {
                    return Err(TrainingError::Optimizer(
                        "Nesterov momentum needs a momentum above 0 and no dampening (as in PyTorch)".into(),
                    ));
                }
                Ok(Optimizer::Sgd {
                    lr: h("lr"),
                    momentum,
                    dampening,
                    nesterov,
                    weight_decay: h("weight_decay"),
                })
            }
            "Adam" => Ok(adam(false)),
            "AdamW" => Ok(adam(true)),
            "RmsProp" => Ok(Optimizer::RmsProp {
                lr: h("lr"),
                alpha: h("alpha"),
                eps: h("eps"),
                weight_decay: h("weight_decay"),
                momentum: h("momentum"),
                centered: h("centered") != 0.0,
            }),
            other => Err(TrainingError::Optimizer(format!(
                "{other} is not in the graph yet (Sgd, Adam, AdamW and RmsProp are)"
            ))),
        }
    }

    /// The base learning rate (what a schedule scales).
    pub fn lr(&self) -> f64 {
        match self {
            Optimizer::Sgd { lr, .. } | Optimizer::Adam { lr, .. } | Optimizer::RmsProp { lr, .. } => *lr,
        }
    }

    /// The names of each parameter's state, in the order [`update`] takes and returns it.
    pub fn state_names(&self) -> &'static [&'static str] {
        match self {
            Optimizer::Sgd { momentum, .. } if *momentum == 0.0 => &[],
            Optimizer::Sgd { .. } => &["momentum"],
            Optimizer::Adam { .. } => &["m", "v"],
            Optimizer::RmsProp { momentum, centered, .. } => match (centered, *momentum != 0.0) {
                (false, false) => &["square_avg"],
                (true, false) => &["square_avg", "grad_avg"],
                (false, true) => &["square_avg", "momentum"],
                (true, true) => &["square_avg", "grad_avg", "momentum"],
            },
        }
    }
}

/// Appends one step of `opt` for one parameter: its new value and new state, from the
/// parameter `p`, its gradient, its state (in [`Optimizer::state_names`] order, zeros before
/// the first step), `step`, the number of steps taken before this one, and `lr`, this step's
/// learning rate (both scalars of `p`'s dtype; `opt`'s own `lr` is not read).
pub fn update(
    g: &mut Graph,
    opt: &Optimizer,
    p: NodeId,
    grad: NodeId,
    state: &[NodeId],
    step: NodeId,
    lr: NodeId,
) -> Result<(NodeId, Vec<NodeId>), InferError> {
    let mut b = Build { g, like: p };
    match *opt {
        Optimizer::Sgd { momentum, dampening, nesterov, weight_decay, .. } => {
            let mut d = grad;
            if weight_decay != 0.0 {
                let wd = b.scale(p, weight_decay)?;
                d = b.bin(BinaryOp::Add, d, wd)?;
            }
            let mut new_state = Vec::new();
            if momentum != 0.0 {
                // PyTorch starts the buffer at the first gradient itself, undamped.
                let decayed = b.scale(state[0], momentum)?;
                let damped = b.scale(d, 1.0 - dampening)?;
                let later = b.bin(BinaryOp::Add, decayed, damped)?;
                let zero = b.scalar(0.0)?;
                let first = b.g.add(Op::Compare(CompareOp::Eq), &[step, zero])?;
                let buf = b.g.add(Op::Where, &[first, d, later])?;
                new_state.push(buf);
                d = if nesterov {
                    let mb = b.scale(buf, momentum)?;
                    b.bin(BinaryOp::Add, d, mb)?
                } else {
                    buf
                };
            }
            let delta = b.bin(BinaryOp::Mul, d, lr)?;
            Ok((b.bin(BinaryOp::Sub, p, delta)?, new_state))
        }
        Optimizer::Adam { beta1, beta2, eps, weight_decay, decoupled, .. } => {
            let (mut p0, mut d) = (p, grad);
            if weight_decay != 0.0 {
                if decoupled {
                    // p · (1 − lr · wd)
                    let lw = b.scale(lr, weight_decay)?;
                    let one = b.scalar(1.0)?;
                    let keep = b.bin(BinaryOp::Sub, one, lw)?;
                    p0 = b.bin(BinaryOp::Mul, p, keep)?;
                } else {
                    let wd = b.scale(p, weight_decay)?;
                    d = b.bin(BinaryOp::Add, d, wd)?;
                }
            }
            let m0 = b.scale(state[0], beta1)?;
            let m1 = b.scale(d, 1.0 - beta1)?;
            let m = b.bin(BinaryOp::Add, m0, m1)?;
            let v0 = b.scale(state[1], beta2)?;
            let d2 = b.bin(BinaryOp::Mul, d, d)?;
            let v1 = b.scale(d2, 1.0 - beta2)?;
            let v = b.bin(BinaryOp::Add, v0, v1)?;
            // t = step + 1; step size lr / (1 − β₁ᵗ); denominator √v / √(1 − β₂ᵗ) + eps.
            let one = b.scalar(1.0)?;
            let t = b.bin(BinaryOp::Add, step, one)?;
            let bc1 = b.one_minus_pow(beta1, t)?;
            let bc2 = b.one_minus_pow(beta2, t)?;
            let step_size = b.bin(BinaryOp::Div, lr, bc1)?;
            let sv = b.g.add(Op::Unary(UnaryOp::Sqrt), &[v])?;
            let sbc2 = b.g.add(Op::Unary(UnaryOp::Sqrt), &[bc2])?;
            let denom = b.bin(BinaryOp::Div, sv, sbc2)?;
            let eps_n = b.scalar(eps)?;
            let denom = b.bin(BinaryOp::Add, denom, eps_n)?;
            let ratio = b.bin(BinaryOp::Div, m, denom)?;
            let delta = b.bin(BinaryOp::Mul, ratio, step_size)?;
            Ok((b.bin(BinaryOp::Sub, p0, delta)?, vec![m, v]))
        }
        Optimizer::RmsProp { alpha, eps, weight_decay, momentum, centered, .. } => {
            let mut d = grad;
            if weight_decay != 0.0 {
                let wd = b.scale(p, weight_decay)?;
                d = b.bin(BinaryOp::Add, d, wd)?;
            }
            // square_avg = α·square_avg + (1 − α)·d²
            let s0 = b.scale(state[0], alpha)?;
            let d2 = b.bin(BinaryOp::Mul, d, d)?;
            let s1 = b.scale(d2, 1.0 - alpha)?;
            let square_avg = b.bin(BinaryOp::Add, s0, s1)?;
            let mut new_state = vec![square_avg];
            let avg = if centered {
                // The variance estimate: square_avg − grad_avg², grad_avg the mean gradient.
                let a0 = b.scale(state[1], alpha)?;
                let a1 = b.scale(d, 1.0 - alpha)?;
                let grad_avg = b.bin(BinaryOp::Add, a0, a1)?;
                new_state.push(grad_avg);
                let ga2 = b.bin(BinaryOp::Mul, grad_avg, grad_avg)?;
                let var = b.bin(BinaryOp::Sub, square_avg, ga2)?;
                b.g.add(Op::Unary(UnaryOp::Sqrt), &[var])?
            } else {
                b.g.add(Op::Unary(UnaryOp::Sqrt), &[square_avg])?
            };
            let eps_n = b.scalar(eps)?;
            let avg = b.bin(BinaryOp::Add, avg, eps_n)?;
            let mut ratio = b.bin(BinaryOp::Div, d, avg)?;
            if momentum != 0.0 {
                // Unlike SGD's, this buffer starts at zero: the first step is lr·d/avg.
                let kept = b.scale(state[new_state.len()], momentum)?;
                ratio = b.bin(BinaryOp::Add, kept, ratio)?;
                new_state.push(ratio);
            }
            let delta = b.bin(BinaryOp::Mul, ratio, lr)?;
            Ok((b.bin(BinaryOp::Sub, p, delta)?, new_state))
        }
    }
}

/// Appends global-norm gradient clipping, `torch.nn.utils.clip_grad_norm_(params, max_norm)`
/// with its defaults (2-norm, non-finite norms not an error): the norm of all `grads` taken
/// as one vector, and each gradient times `min(1, max_norm / (norm + 1e-6))`. Returns the
/// norm (an f64 scalar) and the clipped gradients.
///
/// PyTorch takes each gradient's norm in its dtype, then the norm of those norms; here each
/// gradient's sum of squares, in its dtype, is summed in f64 and the root taken once: the
/// same value without rounding a root and squaring it again. Like PyTorch, the coefficient
/// multiplies even when it is 1 (a no-op) and a NaN or infinite norm spreads to every
/// gradient.
pub fn clip_grad_norm(
    g: &mut Graph,
    grads: &[NodeId],
    max_norm: f64,
) -> Result<(NodeId, Vec<NodeId>), InferError> {
    let f64_scalar =
        |g: &mut Graph, value: f64| g.add(Op::Full { value, dtype: DType::F64, shape: vec![] }, &[]);
    let mut total = f64_scalar(g, 0.0)?;
    for &d in grads {
        let sq = g.add(Op::Binary(BinaryOp::Mul), &[d, d])?;
        let axes: Vec<usize> = (0..g.ty(d).rank()).collect();
        let mut s = if axes.is_empty() {
            sq
        } else {
            g.add(Op::Reduce { op: ReduceOp::Sum, axes, keepdims: false }, &[sq])?
        };
        if g.ty(s).dtype != DType::F64 {
            s = g.add(Op::Cast { to: DType::F64 }, &[s])?;
        }
        total = g.add(Op::Binary(BinaryOp::Add), &[total, s])?;
    }
    let norm = g.add(Op::Unary(UnaryOp::Sqrt), &[total])?;
    let eps = f64_scalar(g, 1e-6)?;
    let denom = g.add(Op::Binary(BinaryOp::Add), &[norm, eps])?;
    let max = f64_scalar(g, max_norm)?;
    let coef = g.add(Op::Binary(BinaryOp::Div), &[max, denom])?;
    let one = f64_scalar(g, 1.0)?;
    let coef = g.add(Op::Binary(BinaryOp::Min), &[coef, one])?;
    let mut in_dtype: HashMap<DType, NodeId> = HashMap::from([(DType::F64, coef)]);
    let mut clipped = Vec::with_capacity(grads.len());
    for &d in grads {
        let dtype = g.ty(d).dtype;
        let c = match in_dtype.get(&dtype) {
            Some(&c) => c,
            None => {
                let c = g.add(Op::Cast { to: dtype }, &[coef])?;
                in_dtype.insert(dtype, c);
                c
            }
        };
        clipped.push(g.add(Op::Binary(BinaryOp::Mul), &[d, c])?);
    }
    Ok((norm, clipped))
}

/// Appends ops in the dtype of one parameter.
struct Build<'g> {
    g: &'g mut Graph,
    like: NodeId,
}

impl Build<'_> {
    fn scalar(&mut self, value: f64) -> Result<NodeId, InferError> {
        let dtype = self.g.ty(self.like).dtype;
        self.g.add(Op::Full { value, dtype, shape: vec![] }, &[])
    }

    fn bin(&mut self, op: BinaryOp, a: NodeId, b: NodeId) -> Result<NodeId, InferError> {
        self.g.add(Op::Binary(op), &[a, b])
    }

    fn scale(&mut self, x: NodeId, c: f64) -> Result<NodeId, InferError> {
        let s = self.scalar(c)?;
        self.bin(BinaryOp::Mul, x, s)
    }

    /// `1 − beta^t`.
    fn one_minus_pow(&mut self, beta: f64, t: NodeId) -> Result<NodeId, InferError> {
        let (one, b) = (self.scalar(1.0)?, self.scalar(beta)?);
        let p = self.bin(BinaryOp::Pow, b, t)?;
        self.bin(BinaryOp::Sub, one, p)
    }
}

/// A train step as one graph.
///
/// Inputs: the model's (each with a leading axis of K micro-batches under `accumulate: K`,
/// see [`training_graph`]), then `optim.step` (an f32 scalar: the optimizer steps taken so
/// far) and each parameter's state `optim.KIND.NAME` (zeros at the start). Outputs: `loss`,
/// `optim.lr` (this step's learning rate under the schedule, f64 when a parameter is f64,
/// else f32), `optim.grad_norm` (the
/// gradients' global 2-norm before clipping, f64, only under `clip_grad_norm`), each
/// parameter's new value `param.NAME`, its new state under its input's name, and
/// `optim.step` plus one. Feeding the outputs back as the next step's parameters and state
/// is one optimizer step per call. The order is PyTorch's: gradients (averaged over the
/// micro-batches), clipping, then the update.
#[derive(Clone, Debug)]
pub struct TrainStep {
    pub graph: Graph,
    pub optimizer: Optimizer,
    pub schedule: Schedule,
}

pub fn train_step(lowered: &Lowered) -> Result<TrainStep, TrainingError> {
    let plan = lowered.training.as_ref().ok_or(TrainingError::NoTraining)?;
    let opt = Optimizer::from_plan(plan)?;
    let schedule = Schedule::from_plan(plan)?;
    let t = training_graph(lowered)?;
    let mut g = t.graph;
    g.outputs = vec![("loss".into(), t.loss)];
    let step = g.add(Op::Input { name: "optim.step".into(), dtype: DType::F32, shape: vec![] }, &[])?;
    draw_anew_each_step(&mut g, step)?;
    // The schedule in f64 when a parameter is f64, else in f32 (see `learning_rate`).
    let wide = if g.params().iter().any(|&p| g.ty(p).dtype == DType::F64) { DType::F64 } else { DType::F32 };
    let lr64 = learning_rate(&mut g, opt.lr(), &schedule, step, wide)?;
    g.add_output("optim.lr", lr64);
    let params: Vec<NodeId> = g.params();
    let mut grads: Vec<NodeId> = t.gradients.iter().map(|(_, d)| *d).collect();
    if let Some(max_norm) = plan.clip_grad_norm {
        let (norm, clipped) = clip_grad_norm(&mut g, &grads, max_norm)?;
        g.add_output("optim.grad_norm", norm);
        grads = clipped;
    }
    let mut outputs = Vec::new();
    // The step count and the learning rate in each parameter dtype, made once.
    let mut scalars: HashMap<DType, (NodeId, NodeId)> = HashMap::new();
    for ((p, (name, _)), grad) in params.into_iter().zip(&t.gradients).zip(grads) {
        let ty = g.ty(p).clone();
        let mut state = Vec::new();
        for kind in opt.state_names() {
            let op =
                Op::Input { name: format!("optim.{kind}.{name}"), dtype: ty.dtype, shape: ty.shape.clone() };
            state.push(g.add(op, &[])?);
        }
        let (step_p, lr_p) = match scalars.get(&ty.dtype) {
            Some(&pair) => pair,
            None => {
                let step_p =
                    if ty.dtype == DType::F32 { step } else { g.add(Op::Cast { to: ty.dtype }, &[step])? };
                let lr_p = if ty.dtype == wide { lr64 } else { g.add(Op::Cast { to: ty.dtype }, &[lr64])? };
                scalars.insert(ty.dtype, (step_p, lr_p));
                (step_p, lr_p)
            }
        };
        let (np, ns) = update(&mut g, &opt, p, grad, &state, step_p, lr_p)?;
        outputs.push((format!("param.{name}"), np));
        for (kind, s) in opt.state_names().iter().zip(ns) {
            outputs.push((format!("optim.{kind}.{name}"), s));
        }
    }
    let one = g.add(Op::Full { value: 1.0, dtype: DType::F32, shape: vec![] }, &[])?;
    let next = g.add(Op::Binary(BinaryOp::Add), &[step, one])?;
    g.outputs.extend(outputs);
    g.add_output("optim.step", next);
    Ok(TrainStep { graph: g, optimizer: opt, schedule })
}

/// Makes every `random_uniform` of a train step (dropout masks) draw from counter
/// `optim.step × span` on, its own offset added, where `span` (the largest `offset + numel`
/// of them) covers every op's counters: two steps never draw the same numbers, and step `t`
/// draws the same ones wherever it runs, a resumed run included, since the step count is
/// state that checkpoints save. Without this, a dropout mask fixed at lowering would be the
/// same at every step.
fn draw_anew_each_step(g: &mut Graph, step: NodeId) -> Result<(), TrainingError> {
    let mut draws = Vec::new();
    for n in g.node_ids() {
        if let Op::RandomUniform { offset, base: false, .. } = &g.node(n).op {
            let shape = g.ty(n).static_shape();
            draws.push((n, offset.saturating_add(shape.iter().product::<usize>() as u64)));
        }
    }
    let Some(span) = draws.iter().map(|&(_, end)| end).max() else { return Ok(()) };
    let count = g.add(Op::Cast { to: DType::I64 }, &[step])?;
    let span = g.add(Op::Full { value: span as f64, dtype: DType::I64, shape: vec![] }, &[])?;
    let base = g.add(Op::Binary(BinaryOp::Mul), &[count, span])?;
    for (n, _) in draws {
        if let Op::RandomUniform { base: reads_base, .. } = &mut g.node_mut(n).op {
            *reads_base = true;
        }
        // Operand 0 (the edge weight is the operand's position).
        g.raw_mut().add_edge(base, n, 0);
    }
    Ok(())
}

/// The parameters' names in `g`, in topological order, each once.
fn param_names(g: &Graph) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for p in g.params() {
        if let Op::Param { name, .. } = &g.node(p).op {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
    }
    names
}

/// Declares the persistent state of a train step's graph (as [`train_step`] built it, or its
/// optimized form, which keeps the names): each parameter, starting from the weights and
/// updated by its output `param.NAME`; then `optim.step` and each parameter's optimizer state
/// `optim.KIND.NAME`, starting from zeros and updated by the output of the same name. Those
/// inputs and outputs leave the interface; `loss`, `optim.lr` and `optim.grad_norm` remain.
pub fn declare_train_state(g: &mut Graph, opt: &Optimizer) -> Result<(), StateError> {
    let names = param_names(g);
    for name in &names {
        g.declare_state(name, StateInit::Weights, Some(&format!("param.{name}")))?;
    }
    g.declare_state("optim.step", StateInit::Zeros, Some("optim.step"))?;
    for name in &names {
        for kind in opt.state_names() {
            let state = format!("optim.{kind}.{name}");
            g.declare_state(&state, StateInit::Zeros, Some(&state))?;
        }
    }
    Ok(())
}

/// Declares the parameters of a model's forward graph persistent state that it only reads, so
/// a forward entry point beside a train step computes with the trained values.
pub fn declare_forward_state(g: &mut Graph) -> Result<(), StateError> {
    for name in param_names(g) {
        g.declare_state(&name, StateInit::Weights, None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::verify;

    const LINEAR: &str = r#"Model(
        name: "lin",
        config: { "batch": 2 },
        inputs: { "x": (f32, ["batch", 3]), "y": (f32, ["batch", 2]) },
        use: ["std"],
        body: [Let("p", Call(fn: "std.linear", args: ["x"], scope: "fc", with: { "out": 2 }))],
        outputs: ["p"],
        training: Training(loss: Mse(pred: "p", target: "y"), optimizer: Sgd(lr: 0.5)),
    )"#;

    #[test]
    fn a_train_steps_state_is_its_parameters_then_the_step_count_then_the_moments() {
        let (sources, lowered) = crate::load_str("lin.ron", LINEAR, &[]);
        let lowered = lowered.unwrap_or_else(|d| panic!("{}", d.render(&sources)));
        let step = train_step(&lowered).expect("a train step");
        let mut g = step.graph.clone();
        declare_train_state(&mut g, &step.optimizer).expect("the state declared");
        verify(&g).expect("a valid graph");
        let names: Vec<&str> = g.state.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["fc.weight", "fc.bias", "optim.step"]);
        let outputs: Vec<&str> = g.outputs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(outputs, ["loss", "optim.lr"]);
        let inputs: Vec<&str> = g
            .inputs
            .iter()
            .map(|&i| match &g.node(i).op {
                Op::Input { name, .. } => name.as_str(),
                other => panic!("input {other:?}"),
            })
            .collect();
        assert_eq!(inputs, ["x", "y"]);
    }
}
