//! Checks the optional training section: the loss reads tensors of fitting shapes and the
//! optimizer's hyper-parameters are in range. Training itself runs in a later stage.

use crate::lower::{Lowerer, Operand};
use crate::CValue;
use kiln_spec::{Diagnostic, Ident, Loss, Training};

#[derive(Clone, Debug, PartialEq)]
pub enum LossKind {
    CrossEntropy { logits: String, labels: String, label_smoothing: f64 },
    Mse { pred: String, target: String },
}

/// The checked training section, with every hyper-parameter resolved to a number.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPlan {
    pub loss: LossKind,
    pub optimizer: String,
    pub hyper: Vec<(String, f64)>,
    pub schedule: Option<(String, Vec<(String, f64)>)>,
}

/// Names the training section reads (so an input used only as labels is not "unused").
pub fn names_used(t: &Training) -> Vec<String> {
    match &t.loss {
        Loss::CrossEntropy { logits, labels, .. } => vec![logits.name.clone(), labels.name.clone()],
        Loss::Mse { pred, target, .. } => vec![pred.name.clone(), target.name.clone()],
    }
}

fn tensor_type(l: &mut Lowerer, name: &Ident) -> Option<kiln_ir::TensorType> {
    match l.top_binding(&name.name) {
        Some((Some(Operand::Node(n)), _)) => Some(l.graph.ty(n).clone()),
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
    let loss = match &t.loss {
        Loss::CrossEntropy { logits, labels, label_smoothing, span } => {
            let (lt, yt) = (tensor_type(l, logits), tensor_type(l, labels));
            let (lt, yt) = (lt?, yt?);
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
            LossKind::CrossEntropy {
                logits: logits.name.clone(),
                labels: labels.name.clone(),
                label_smoothing: ls,
            }
        }
        Loss::Mse { pred, target, span } => {
            let (pt, tt) = (tensor_type(l, pred), tensor_type(l, target));
            let (pt, tt) = (pt?, tt?);
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
            LossKind::Mse { pred: pred.name.clone(), target: target.name.clone() }
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
        _ => &[("lr", 0.01), ("alpha", 0.99), ("eps", 1e-8), ("momentum", 0.0), ("weight_decay", 0.0)],
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
    if hyper_errors {
        return None;
    }
    Some(TrainingPlan { loss, optimizer: t.optimizer.kind.clone(), hyper, schedule })
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
