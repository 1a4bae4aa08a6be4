//! Reverse-mode automatic differentiation on the graph.
//!
//! [`grad`] appends the backward of a scalar loss to the same graph, so the optimizer and
//! the scheduler later see forward and backward together (and may share, fuse and
//! reschedule across them). It runs on the primitive graph as lowered, before optimization;
//! the fused ops a spec may call directly have rules of their own.
//!
//! The sweep visits the nodes the loss depends on in reverse topological order, applies one
//! vector-Jacobian product per op (`rules.rs`, an exhaustive match over [`Op`]) and sums the
//! contributions of every use of a value. Only floating-point values carry gradients:
//! indices, comparisons, `iota`, and integer or bool values are not differentiable, and
//! nothing flows into them. [`check`] holds the tools the gradient tests are built from
//! (central differences through the interpreter, an f64 copy of a graph).
//! `docs/autodiff.md` lists every rule.

pub mod check;
mod emit;
mod fused;
mod rules;
mod window;

use crate::dtype::TensorType;
use crate::graph::{Graph, NodeId};
use crate::infer::InferError;
use crate::op::Op;
use emit::Emit;
use rules::{RuleError, Site};
use std::collections::{HashMap, HashSet};

/// Why the backward of a graph could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum GradError {
    #[error(transparent)]
    Symbolic(#[from] crate::graph::Unspecialized),
    #[error("the loss must be a floating-point value of one element, got {0}")]
    Loss(TensorType),
    #[error("node %{node} (`{op}`) is not a parameter; gradients are taken with respect to parameters")]
    NotAParam { node: usize, op: &'static str },
    #[error("node %{node} (`{op}`{}) has no gradient: {why}", name_suffix(.name))]
    NoRule { node: usize, op: &'static str, name: Option<String>, why: String },
    /// A rule built a node that does not type, or a gradient of the wrong type: a bug here.
    #[error("internal error in the gradient of node %{node} (`{op}`): {msg}")]
    Internal { node: usize, op: &'static str, msg: String },
}

fn name_suffix(name: &Option<String>) -> String {
    name.as_ref().map(|n| format!(" `{n}`")).unwrap_or_default()
}

/// Appends to `g` the gradient of the scalar `loss` with respect to each of `params` and
/// returns the gradient nodes by parameter (checkpoint) name, in the order of `params`.
///
/// A parameter the loss does not depend on gets a gradient of zeros. The graph's outputs
/// are left as they are: the caller decides which gradients become outputs.
pub fn grad(g: &mut Graph, loss: NodeId, params: &[NodeId]) -> Result<Vec<(String, NodeId)>, GradError> {
    g.require_static()?;
    let lt = g.ty(loss).clone();
    if !lt.dtype.is_float() || lt.numel() != 1 {
        return Err(GradError::Loss(lt));
    }
    let mut names = Vec::with_capacity(params.len());
    for &p in params {
        match &g.node(p).op {
            Op::Param { name, .. } => names.push(name.clone()),
            op => return Err(GradError::NotAParam { node: p.index(), op: op.name() }),
        }
    }
    let order = needs_gradient(g, loss, params);
    let needs: HashSet<NodeId> = order.iter().copied().collect();
    let mut adjoint: HashMap<NodeId, NodeId> = HashMap::new();
    let mut e = Emit { g };
    let seed = e.full(1.0, lt.dtype, &lt.static_shape()).map_err(|err| internal(loss, "loss", err))?;
    adjoint.insert(loss, seed);
    for &n in order.iter().rev() {
        let Some(&gy) = adjoint.get(&n) else { continue };
        let x = e.g.operands(n);
        if x.is_empty() {
            continue;
        }
        let op = e.g.node(n).op.clone();
        let wants: Vec<bool> = x.iter().map(|o| needs.contains(o)).collect();
        if !wants.iter().any(|&w| w) {
            continue;
        }
        let site = Site { op: &op, x: &x, y: n, gy, wants: &wants };
        let grads = rules::vjp(&mut e, &site).map_err(|err| match err {
            RuleError::Infer(err) => internal(n, op.name(), err),
            RuleError::Unsupported(why) => {
                GradError::NoRule { node: n.index(), op: op.name(), name: e.g.node(n).name.clone(), why }
            }
        })?;
        if grads.len() != x.len() {
            return Err(GradError::Internal {
                node: n.index(),
                op: op.name(),
                msg: format!("{} gradients for {} operands", grads.len(), x.len()),
            });
        }
        for ((&xi, gi), want) in x.iter().zip(grads).zip(&wants) {
            let Some(gi) = gi.filter(|_| *want) else { continue };
            if e.g.ty(gi) != e.g.ty(xi) {
                return Err(GradError::Internal {
                    node: n.index(),
                    op: op.name(),
                    msg: format!("a gradient of type {} for an operand of type {}", e.g.ty(gi), e.g.ty(xi)),
                });
            }
            let sum = match adjoint.get(&xi) {
                Some(&prev) => e.add(prev, gi).map_err(|err| internal(n, op.name(), err))?,
                None => gi,
            };
            adjoint.insert(xi, sum);
        }
    }
    let mut out = Vec::with_capacity(params.len());
    for (&p, name) in params.iter().zip(names) {
        let gp = match adjoint.get(&p) {
            Some(&a) => a,
            None => {
                let t = e.ty(p);
                e.full(0.0, t.dtype, &t.static_shape()).map_err(|err| internal(p, "param", err))?
            }
        };
        out.push((name, gp));
    }
    Ok(out)
}

fn internal(n: NodeId, op: &'static str, err: InferError) -> GradError {
    GradError::Internal { node: n.index(), op, msg: err.to_string() }
}

/// The nodes that lie on a path from a parameter to the loss through floating-point values,
/// in topological order: exactly the nodes whose gradient is needed.
fn needs_gradient(g: &Graph, loss: NodeId, params: &[NodeId]) -> Vec<NodeId> {
    let mut ancestors = HashSet::new();
    let mut stack = vec![loss];
    while let Some(n) = stack.pop() {
        if ancestors.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    let params: HashSet<NodeId> = params.iter().copied().collect();
    let mut needs = HashSet::new();
    let mut order = Vec::new();
    for n in g.topo_order() {
        if !ancestors.contains(&n) || !g.ty(n).dtype.is_float() {
            continue;
        }
        if params.contains(&n) || g.operands(n).iter().any(|o| needs.contains(o)) {
            needs.insert(n);
            order.push(n);
        }
    }
    order
}
