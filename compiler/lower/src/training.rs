//! The optional training section: [`check`] makes sure the loss reads tensors of fitting
//! shapes and the optimizer's hyper-parameters are in range; [`training_graph`] builds the
//! loss from primitives on the lowered graph and appends its gradients (`kiln_ir::autodiff`).
//! With `accumulate`, the graph is unrolled over micro-batches ([`training_graph`]). The
//! optimizer's update, gradient clipping and the train step are in `optim.rs`, the learning
//! rate schedules in `schedule.rs`.

use crate::lower::{Lowerer, Operand, MAX_NODES};
use crate::{CValue, Lowered};
use kiln_ir::{
    grad, BinaryOp, CompareOp, GradError, Graph, InferError, NodeId, Op, ReduceOp, TensorType, UnaryOp,
};
use kiln_spec::{Diagnostic, Ident, Loss, Training};
use std::collections::HashMap;

#[derive(Clone, Debug, PartialEq)]
pub enum LossKind {
    /// Positions whose label is `ignore_index` count neither in the sum nor in the mean.
    CrossEntropy {
        logits: String,
        labels: String,
        label_smoothing: f64,
        ignore_index: i64,
    },
    Mse {
        pred: String,
        target: String,
    },
}

/// The checked training section, with every hyper-parameter resolved to a number.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPlan {
    pub loss: LossKind,
    pub optimizer: String,
    pub hyper: Vec<(String, f64)>,
    pub schedule: Option<(String, Vec<(String, f64)>)>,
    /// `max_norm` of global-norm gradient clipping, when the section asks for it.
    pub clip_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step (1: no accumulation).
    pub accumulate: usize,
    /// The graph nodes the loss reads, in the order of the [`LossKind`]'s fields (logits
    /// and labels, or prediction and target), as bound when the body was lowered.
    pub reads: [NodeId; 2],
}

/// Names the training section reads (so an input used only as labels is not "unused").
pub fn names_used(t: &Training) -> Vec<String> {
    match &t.loss {
        Loss::CrossEntropy { logits, labels, .. } => vec![logits.name.clone(), labels.name.clone()],
        Loss::Mse { pred, target, .. } => vec![pred.name.clone(), target.name.clone()],
    }
}

fn tensor_type(l: &mut Lowerer, name: &Ident) -> Option<(NodeId, TensorType)> {
    match l.top_binding(&name.name) {
        Some((Some(Operand::Node(n)), _)) => Some((n, l.graph.ty(n).clone())),
        Some(_) => {
            l.diags.push(
                Diagnostic::error(format!("`{}` is not a tensor", name.name))
                    .at(name.span, "expected a tensor"),
            );
            None
        }
        None => {
            l.unknown_top_name(name);
            None
        }
    }
}

pub fn check(l: &mut Lowerer, t: &Training) -> Option<TrainingPlan> {
    let (loss, reads) = match &t.loss {
        Loss::CrossEntropy { logits, labels, label_smoothing, ignore_index, span } => {
            let (lt, yt) = (tensor_type(l, logits), tensor_type(l, labels));
            let ((ln, lt), (yn, yt)) = (lt?, yt?);
            let ok_shape = lt.rank() >= 1 && yt.shape.as_slice() == &lt.shape[..lt.rank() - 1];
            if !lt.dtype.is_float() || !yt.dtype.is_int() || !ok_shape {
                l.diags.push(
                    Diagnostic::error(format!("cross-entropy needs float logits [..., classes] and integer labels [...]: got logits {lt} and labels {yt}"))
                        .at(*span, "loss defined here")
                        .with_related(logits.span, format!("logits: {lt}"))
                        .with_related(labels.span, format!("labels: {yt}")),
                );
                return None;
            }
            let ls = match label_smoothing {
                Some(e) => l.cfloat(e, "`label_smoothing`")?,
                None => 0.0,
            };
            if !(0.0..1.0).contains(&ls) {
                l.diags.push(
                    Diagnostic::error(format!("`label_smoothing` must be in [0, 1), got {ls}"))
                        .at(*span, "out of range"),
                );
                return None;
            }
            // PyTorch's default: a label of -100 marks a position to leave out.
            let ignore_index = match ignore_index {
                Some(e) => l.cint(e, "`ignore_index`")?,
                None => -100,
            };
            let kind = LossKind::CrossEntropy {
                logits: logits.name.clone(),
                labels: labels.name.clone(),
                label_smoothing: ls,
                ignore_index,
            };
            (kind, [ln, yn])
        }
        Loss::Mse { pred, target, span } => {
            let (pt, tt) = (tensor_type(l, pred), tensor_type(l, target));
            let ((pn, pt), (tn, tt)) = (pt?, tt?);
            if pt != tt || !pt.dtype.is_float() {
                l.diags.push(
                    Diagnostic::error(format!(
                        "MSE needs prediction and target of the same float type: got {pt} and {tt}"
                    ))
                    .at(*span, "loss defined here")
                    .with_related(pred.span, format!("pred: {pt}"))
                    .with_related(target.span, format!("target: {tt}")),
                );
                return None;
            }
            (LossKind::Mse { pred: pred.name.clone(), target: target.name.clone() }, [pn, tn])
        }
    };
    let mut hyper = Vec::new();
    let mut hyper_errors = false;
    let defaults: &[(&str, f64)] = match t.optimizer.kind.as_str() {
        "Sgd" => {
            &[("lr", 0.01), ("momentum", 0.0), ("dampening", 0.0), ("nesterov", 0.0), ("weight_decay", 0.0)]
        }
        "Adam" => &[("lr", 1e-3), ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8), ("weight_decay", 0.0)],
        "AdamW" => &[("lr", 1e-3), ("beta1", 0.9), ("beta2", 0.999), ("eps", 1e-8), ("weight_decay", 0.01)],
        _ => &[
            ("lr", 0.01),
            ("alpha", 0.99),
            ("eps", 1e-8),
            ("momentum", 0.0),
            ("weight_decay", 0.0),
            ("centered", 0.0),
        ],
    };
    for (name, default) in defaults {
        let value = match t.optimizer.hyper.iter().find(|(k, _)| k.name == *name) {
            Some((k, e)) => {
                let v = match l.cvalue(e)? {
                    CValue::Bool(b) => b as u8 as f64,
                    v => v.as_f64()?,
                };
                let ok = match *name {
                    "lr" | "eps" => v > 0.0,
                    "beta1" | "beta2" | "momentum" | "alpha" | "dampening" => (0.0..1.0).contains(&v),
                    _ => v >= 0.0,
                };
                if !ok {
                    let range = match *name {
                        "lr" | "eps" => "> 0",
                        "beta1" | "beta2" | "momentum" | "alpha" | "dampening" => "in [0, 1)",
                        _ => "≥ 0",
                    };
                    l.diags.push(
                        Diagnostic::error(format!(
                            "`{name}` of {} must be {range}, got {v}",
                            t.optimizer.kind
                        ))
                        .at(k.span, "out of range"),
                    );
                    hyper_errors = true;
                }
                v
            }
            None => *default,
        };
        hyper.push((name.to_string(), value));
    }
    let schedule = match &t.schedule {
        Some(s) => Some(schedule(l, s)?),
        None => None,
    };
    let clip_grad_norm = match &t.clip_grad_norm {
        Some(e) => {
            let v = l.cfloat(e, "`clip_grad_norm`")?;
            if !(v > 0.0 && v.is_finite()) {
                l.diags.push(
                    Diagnostic::error(format!("`clip_grad_norm` must be a finite number > 0, got {v}"))
                        .at(e.span, "out of range"),
                );
                return None;
            }
            Some(v)
        }
        None => None,
    };
    let accumulate = match &t.accumulate {
        Some(e) => {
            let k = l.cint(e, "`accumulate`")?;
            if !(1..=MAX_ACCUMULATE as i64).contains(&k) {
                l.diags.push(
                    Diagnostic::error(format!(
                        "`accumulate` must be a number of micro-batches from 1 to {MAX_ACCUMULATE}, got {k}"
                    ))
                    .at(e.span, "out of range"),
                );
                return None;
            }
            k as usize
        }
        None => 1,
    };
    if hyper_errors {
        return None;
    }
    Some(TrainingPlan {
        loss,
        optimizer: t.optimizer.kind.clone(),
        hyper,
        schedule,
        clip_grad_norm,
        accumulate,
        reads,
    })
}

/// A schedule's arguments with their defaults; `total` and `step_size` are required.
fn schedule(l: &mut Lowerer, s: &kiln_spec::Schedule) -> Option<(String, Vec<(String, f64)>)> {
    let spec: &[(&str, Option<f64>)] = match s.kind.as_str() {
        "Constant" => &[],
        "Linear" => &[("warmup", Some(0.0)), ("total", None)],
        "Cosine" => &[("warmup", Some(0.0)), ("total", None), ("min_lr", Some(0.0))],
        _ => &[("step_size", None), ("gamma", Some(0.1))],
    };
    let mut args = Vec::new();
    for (name, default) in spec {
        let v = match (s.args.iter().find(|(k, _)| k.name == *name), default) {
            (Some((k, e)), _) => {
                let v = l.cfloat(e, &format!("`{name}`"))?;
                if v < 0.0 || (*name == "total" || *name == "step_size") && v <= 0.0 {
                    l.diags.push(
                        Diagnostic::error(format!(
                            "`{name}` of the {} schedule must be positive, got {v}",
                            s.kind
                        ))
                        .at(k.span, "out of range"),
                    );
                    return None;
                }
                v
            }
            (None, Some(d)) => *d,
            (None, None) => {
                l.diags.push(
                    Diagnostic::error(format!("the {} schedule needs `{name}`", s.kind))
                        .at(s.span, format!("add `{name}: …`")),
                );
                return None;
            }
        };
        args.push((name.to_string(), v));
    }
    let get = |n: &str| args.iter().find(|(k, _)| k == n).map(|(_, v)| *v);
    if let (Some(w), Some(total)) = (get("warmup"), get("total")) {
        if w > total {
            l.diags.push(
                Diagnostic::error(format!("warmup ({w}) is longer than the whole schedule ({total})"))
                    .at(s.span, "schedule defined here"),
            );
            return None;
        }
    }
    Some((s.kind.clone(), args))
}

/// Why a training graph could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrainingError {
    #[error("the model has no training section")]
    NoTraining,
    #[error(
        "the loss reads `{0}`, which no output of the model depends on, so the lowered graph \
         dropped it; list `{0}` among the outputs"
    )]
    Dropped(String),
    #[error(
        "accumulating {accumulate} micro-batches would unroll the model to {nodes} ops, more than \
         the limit of {limit}; accumulate fewer"
    )]
    TooLarge { accumulate: usize, nodes: usize, limit: usize },
    #[error("optimizer: {0}")]
    Optimizer(String),
    #[error(transparent)]
    Grad(#[from] GradError),
    /// The loss and autodiff build on static shapes: a model with symbols trains specialized.
    #[error(transparent)]
    Unspecialized(#[from] kiln_ir::Unspecialized),
    #[error("internal error while building the loss: {0}")]
    Infer(#[from] InferError),
}

/// A model's forward graph with its loss and the loss's gradients appended.
#[derive(Clone, Debug)]
pub struct TrainingGraph {
    /// Outputs: the model's own, then `loss`, then `grad.NAME` for every parameter.
    pub graph: Graph,
    pub loss: NodeId,
    /// The gradient of every parameter, by checkpoint name, in the graph's parameter order.
    pub gradients: Vec<(String, NodeId)>,
}

/// The most micro-batches one train step takes (`accumulate`): each is a copy of the
/// forward graph (and, through autodiff, of its backward graph), so a mistaken count fails
/// at once instead of building a graph that does not fit in memory.
pub const MAX_ACCUMULATE: usize = 1024;

/// Builds the training graph of a lowered model: the training section's loss from
/// primitives, on the forward graph, and the gradient of every parameter by reverse-mode
/// autodiff. Nothing is optimized: the result is the primitive graph the optimizer takes.
///
/// With `accumulate: K` above 1 the forward graph is unrolled over K micro-batches (see
/// `micro_batches`): every model input and output gains a leading axis of K, `loss` is the
/// mean of the micro-batches' losses and each gradient the mean of theirs, which for a loss
/// that is a mean (both losses here) is exactly the loss and gradient of one batch K times
/// larger.
pub fn training_graph(lowered: &Lowered) -> Result<TrainingGraph, TrainingError> {
    let plan = lowered.training.as_ref().ok_or(TrainingError::NoTraining)?;
    lowered.graph.require_static()?;
    let names = match &plan.loss {
        LossKind::CrossEntropy { logits, labels, .. } => [logits, labels],
        LossKind::Mse { pred, target } => [pred, target],
    };
    // A value no output depends on was removed after lowering (node ids are stable, and
    // nothing has been added since, so a missing id is exactly that).
    for (&n, name) in plan.reads.iter().zip(names) {
        if !lowered.graph.raw().contains_node(n) {
            return Err(TrainingError::Dropped(name.clone()));
        }
    }
    let (mut g, loss) = if plan.accumulate > 1 {
        micro_batches(&lowered.graph, plan)?
    } else {
        let mut g = lowered.graph.clone();
        let [a, b] = plan.reads;
        let loss = plan_loss(&mut g, &plan.loss, a, b)?;
        (g, loss)
    };
    let params = g.params();
    let gradients = grad(&mut g, loss, &params)?;
    g.add_output("loss", loss);
    for (name, n) in &gradients {
        g.add_output(format!("grad.{name}"), *n);
    }
    Ok(TrainingGraph { graph: g, loss, gradients })
}

/// The training section's loss of the values `a` and `b` (in [`LossKind`]'s field order).
fn plan_loss(g: &mut Graph, loss: &LossKind, a: NodeId, b: NodeId) -> Result<NodeId, InferError> {
    match loss {
        LossKind::CrossEntropy { label_smoothing, ignore_index, .. } => {
            cross_entropy(g, a, b, *label_smoothing, *ignore_index)
        }
        LossKind::Mse { .. } => mse(g, a, b),
    }
}

/// The forward graph `src` unrolled over `plan.accumulate` (K) micro-batches, with the mean
/// of their losses: gradient accumulation as one graph, so a train step over K micro-batches
/// is one call, exact, and needs no state between calls.
///
/// * Each model input `x` of type `[dims]` becomes `x` of type `[K, dims]`; micro-batch `k`
///   reads `x[k]`. Splitting a batch of `K·B` rows into `[K, B, …]` (a reshape) gives the
///   micro-batches PyTorch's loop over `batch.chunk(K)` sees.
/// * Parameters and constants are shared; every other node is copied once per micro-batch.
///   A random stream (dropout) is moved on by the elements the micro-batches before drew,
///   so micro-batches draw different numbers, and with the batch axis leading, micro-batch
///   `k` draws exactly what rows `k·B…` of the large batch would.
/// * Each model output `y` becomes `[K, dims]`, stacked the same way.
/// * The loss is `(1/K)·Σ lossₖ`, so each gradient is `(1/K)·Σ gradₖ`: PyTorch's
///   `(loss / K).backward()` per micro-batch. Both losses are means over positions, and the
///   micro-batches have equally many, so this is the loss of the large batch itself (up to
///   rounding). A model that mixes rows of a batch (batch statistics) would differ, as it does
///   in PyTorch.
fn micro_batches(src: &Graph, plan: &TrainingPlan) -> Result<(Graph, NodeId), TrainingError> {
    let k_count = plan.accumulate;
    let nodes = src.node_count().saturating_mul(k_count);
    if nodes > MAX_NODES {
        return Err(TrainingError::TooLarge { accumulate: k_count, nodes, limit: MAX_NODES });
    }
    let mut g = Graph::new(src.name.clone());
    let copy_meta = |g: &mut Graph, from: NodeId, to: NodeId| {
        let n = src.node(from);
        let (name, origin) = (n.name.clone(), n.origin.clone());
        let m = g.node_mut(to);
        m.name = name;
        m.origin = origin;
    };
    let order = src.topo_order();
    // Inputs first, in declaration order, then what every micro-batch shares.
    let mut stacked = Vec::new();
    for &i in &src.inputs {
        if let Op::Input { name, dtype, shape } = &src.node(i).op {
            let mut outer = vec![kiln_ir::Dim::Const(k_count)];
            outer.extend_from_slice(shape);
            let n = g.add(Op::Input { name: name.clone(), dtype: *dtype, shape: outer }, &[])?;
            copy_meta(&mut g, i, n);
            stacked.push((i, n, shape.clone()));
        }
    }
    let mut shared: HashMap<NodeId, NodeId> = HashMap::new();
    for &n in &order {
        if matches!(src.node(n).op, Op::Param { .. } | Op::Const { .. }) {
            let m = g.add(src.node(n).op.clone(), &[])?;
            copy_meta(&mut g, n, m);
            shared.insert(n, m);
        }
    }
    let mut losses = Vec::with_capacity(k_count);
    let mut outputs: Vec<Vec<NodeId>> = vec![Vec::with_capacity(k_count); src.outputs.len()];
    for k in 0..k_count {
        let mut map = shared.clone();
        for (i, n, shape) in &stacked {
            let row = g.add(Op::Slice { axis: 0, start: k.into(), end: (k + 1).into(), step: 1 }, &[*n])?;
            let row = g.add(Op::Reshape { shape: shape.clone() }, &[row])?;
            map.insert(*i, row);
        }
        for &n in &order {
            if map.contains_key(&n) {
                continue;
            }
            let mut op = src.node(n).op.clone();
            let drawn = src.ty(n).numel() as u64;
            if let Op::RandomUniform { offset, .. } = &mut op {
                // Counters: at most 2¹⁰ micro-batches of 2⁴⁰ elements each stay far below
                // 2⁶⁴; wrapping past it could only repeat numbers, never fail.
                *offset = offset.wrapping_add((k as u64).wrapping_mul(drawn));
            }
            // A topological order visits a node after its operands, so each is mapped.
            let operands: Vec<NodeId> = src.operands(n).iter().map(|o| map[o]).collect();
            let m = g.add(op, &operands)?;
            copy_meta(&mut g, n, m);
            map.insert(n, m);
        }
        let [a, b] = plan.reads;
        losses.push(plan_loss(&mut g, &plan.loss, map[&a], map[&b])?);
        for (slot, (_, n)) in outputs.iter_mut().zip(&src.outputs) {
            slot.push(map[n]);
        }
    }
    for ((name, _), parts) in src.outputs.iter().zip(outputs) {
        let mut rows = Vec::with_capacity(parts.len());
        for p in parts {
            let mut shape = vec![1];
            shape.extend_from_slice(&g.ty(p).static_shape());
            rows.push(g.add(Op::Reshape { shape: kiln_ir::dims(&shape) }, &[p])?);
        }
        let all = g.add(Op::Concat { axis: 0 }, &rows)?;
        g.add_output(name.clone(), all);
    }
    let mut total = losses[0];
    for &l in &losses[1..] {
        total = g.add(Op::Binary(BinaryOp::Add), &[total, l])?;
    }
    let count = scalar(&mut g, k_count as f64, total)?;
    let loss = g.add(Op::Binary(BinaryOp::Div), &[total, count])?;
    Ok((g, loss))
}

/// The mean over every axis (a scalar stays as it is).
fn mean_all(g: &mut Graph, x: NodeId) -> Result<NodeId, InferError> {
    let axes: Vec<usize> = (0..g.ty(x).rank()).collect();
    if axes.is_empty() {
        return Ok(x);
    }
    g.add(Op::Reduce { op: ReduceOp::Mean, axes, keepdims: false }, &[x])
}

fn scalar(g: &mut Graph, value: f64, like: NodeId) -> Result<NodeId, InferError> {
    let dtype = g.ty(like).dtype;
    g.add(Op::Full { value, dtype, shape: kiln_ir::dims(&[]) }, &[])
}

/// Cross-entropy of `logits` `[…, C]` against integer `labels` `[…]`, averaged over every
/// position whose label is not `ignore_index`, as PyTorch's `F.cross_entropy(…,
/// label_smoothing=ε, ignore_index=…)` with classes on the last
/// axis: each position's loss is `(1 − ε)·nll + ε·smooth` with `nll = −log p[label]` and
/// `smooth = −Σ log p / C`. The label's log-probability is selected (not multiplied by a
/// one-hot row), so a class at −inf that is not the label leaves the loss finite without
/// smoothing, as in PyTorch. Each kept position weighs 1 through a gather from a table of
/// `C` ones (PyTorch's class weights, all 1), so a label outside `0..C` that is not
/// `ignore_index` is an out-of-range gather, an evaluation error as PyTorch's, not a position
/// that silently selects nothing.
pub fn cross_entropy(
    g: &mut Graph,
    logits: NodeId,
    labels: NodeId,
    label_smoothing: f64,
    ignore_index: i64,
) -> Result<NodeId, InferError> {
    let (lt, yt) = (g.ty(logits).clone(), g.ty(labels).clone());
    let last = lt.rank().saturating_sub(1);
    let classes = lt.static_shape().last().copied().unwrap_or(1);
    let logp = g.add(Op::LogSoftmax { axis: last }, &[logits])?;
    let mut column = yt.static_shape();
    column.push(1);
    let column = g.add(Op::Reshape { shape: kiln_ir::dims(&column) }, &[labels])?;
    let iota = g.add(Op::Iota { dtype: yt.dtype, shape: kiln_ir::dims(&[classes]), axis: 0 }, &[])?;
    let hit = g.add(Op::Compare(CompareOp::Eq), &[column, iota])?;
    let zero = scalar(g, 0.0, logits)?;
    let picked = g.add(Op::Where, &[hit, logp, zero])?;
    let sum_last = |g: &mut Graph, x: NodeId| {
        g.add(Op::Reduce { op: ReduceOp::Sum, axes: vec![last], keepdims: false }, &[x])
    };
    let picked = sum_last(g, picked)?;
    let mut per = g.add(Op::Unary(UnaryOp::Neg), &[picked])?;
    if label_smoothing != 0.0 {
        let keep = scalar(g, 1.0 - label_smoothing, logits)?;
        let spread = scalar(g, -label_smoothing / classes as f64, logits)?;
        let nll = g.add(Op::Binary(BinaryOp::Mul), &[per, keep])?;
        let total = sum_last(g, logp)?;
        let smooth = g.add(Op::Binary(BinaryOp::Mul), &[total, spread])?;
        per = g.add(Op::Binary(BinaryOp::Add), &[nll, smooth])?;
    }
    // Positions labelled `ignore_index` drop out of the sum and of the count (all of them
    // ignored: 0/0, NaN, as in PyTorch).
    let ignored =
        g.add(Op::Full { value: ignore_index as f64, dtype: yt.dtype, shape: kiln_ir::dims(&[]) }, &[])?;
    let kept = g.add(Op::Compare(CompareOp::Ne), &[labels, ignored])?;
    // An ignored position reads class 0's weight and then weighs 0.
    let class_zero = g.add(Op::Full { value: 0.0, dtype: yt.dtype, shape: kiln_ir::dims(&[]) }, &[])?;
    let checked = g.add(Op::Where, &[kept, labels, class_zero])?;
    let ones = g.add(Op::Full { value: 1.0, dtype: lt.dtype, shape: kiln_ir::dims(&[classes]) }, &[])?;
    let class_weight = g.add(Op::Gather { axis: 0 }, &[ones, checked])?;
    let origin = g.node(labels).origin.clone();
    let node = g.node_mut(class_weight);
    node.name = Some("cross_entropy.labels".into());
    node.origin = origin;
    let kept = g.add(Op::Cast { to: lt.dtype }, &[kept])?;
    let weight = g.add(Op::Binary(BinaryOp::Mul), &[class_weight, kept])?;
    let per = g.add(Op::Binary(BinaryOp::Mul), &[per, weight])?;
    let all = |g: &mut Graph, x: NodeId| {
        let axes: Vec<usize> = (0..g.ty(x).rank()).collect();
        if axes.is_empty() {
            return Ok(x);
        }
        g.add(Op::Reduce { op: ReduceOp::Sum, axes, keepdims: false }, &[x])
    };
    let total = all(g, per)?;
    let count = all(g, weight)?;
    g.add(Op::Binary(BinaryOp::Div), &[total, count])
}

/// Mean squared error `mean((pred − target)²)` over every element, as PyTorch's
/// `F.mse_loss`.
pub fn mse(g: &mut Graph, pred: NodeId, target: NodeId) -> Result<NodeId, InferError> {
    let d = g.add(Op::Binary(BinaryOp::Sub), &[pred, target])?;
    let sq = g.add(Op::Binary(BinaryOp::Mul), &[d, d])?;
    mean_all(g, sq)
}
