//! Merging matmuls that share their left operand (TASO's merge of the q/k/v projections).
//!
//! `x @ W₁, x @ W₂, …, x @ Wₙ` are the column slices of one wider product
//! `x @ concat(W₁, …, Wₙ)`, and with biases `matmul_epilogue(x, Wᵢ, bᵢ; act)` are the slices of
//! `matmul_epilogue(x, concat(Wᵢ), concat(bᵢ); act)` (the activation is elementwise, so it
//! commutes with slicing). This is a rewrite of several classes at once, which a rule that
//! looks at one class cannot state, so it runs once after the rule stages, over the saturated
//! e-graph: each class of a group gains a `slice` of the shared wide product. Extraction then
//! decides whether the merge pays; it only does when every member reads its slice (which is
//! what the DAG refinement's followers try) and the concatenated weights cost less than the
//! kernels saved (see `cost.rs`: a `concat` of parameters is a kernel on every run unless the
//! target folds weight-only subgraphs).

use super::{ty, New};
use crate::analysis::KGraph;
use crate::lang::KNode;
use egg::Id;
use kiln_ir::Op;
use std::collections::BTreeMap;

/// The name the report and the explanations give this rewrite.
pub const RULE: &str = "merge-shared-input";

/// One product over the shared operand: its class, weight and bias (if the op has one).
struct Member {
    class: Id,
    weight: Id,
    bias: Option<Id>,
}

/// For every group of two or more classes computing `x @ Wᵢ` (or the same epilogue over `x`,
/// `Wᵢ` and `bᵢ`) with one `x`, adds the wide product and makes each class equal to its slice
/// of it. Returns how many classes gained a slice. The e-graph is rebuilt afterwards.
pub fn merge_shared_inputs(egraph: &mut KGraph) -> usize {
    // Groups keyed by the shared operand and the op (with its attributes), in id order.
    let mut groups: BTreeMap<(Id, String), (Op, Vec<Member>)> = BTreeMap::new();
    let mut classes: Vec<Id> = egraph.classes().map(|c| c.id).collect();
    classes.sort();
    for class in classes {
        for node in &egraph[class].nodes {
            let bias = match node.ir() {
                Op::MatMul => None,
                Op::MatMulEpilogue { bias: false, .. } => None,
                Op::MatMulEpilogue { bias: true, .. } => Some(egraph.find(node.children[2])),
                _ => continue,
            };
            let (x, weight) = (egraph.find(node.children[0]), egraph.find(node.children[1]));
            let w = ty(egraph, weight);
            // Rank-1 operands are vector products, whose result has no column axis to slice.
            if w.rank() < 2 || ty(egraph, x).rank() < 2 {
                continue;
            }
            let key = (x, format!("{:?}", node.op));
            let entry = groups.entry(key).or_insert_with(|| (node.ir().clone(), vec![]));
            // One member per class: several nodes of a class compute the same product.
            if entry.1.iter().all(|m| m.class != class) {
                entry.1.push(Member { class, weight, bias });
            }
        }
    }
    let mut merged = 0;
    let rule = egg::Symbol::from(RULE);
    for ((x, _), (op, members)) in groups {
        // Weights must agree on every axis but the last (dtype included) to concatenate.
        let first = ty(egraph, members[0].weight).clone();
        let members: Vec<Member> = members
            .into_iter()
            .filter(|m| {
                let t = ty(egraph, m.weight);
                t.dtype == first.dtype
                    && t.rank() == first.rank()
                    && t.shape[..t.rank() - 1] == first.shape[..first.rank() - 1]
            })
            .collect();
        if members.len() < 2 {
            continue;
        }
        let axis = first.rank() - 1;
        let weights = New::over(Op::Concat { axis }, &members.iter().map(|m| m.weight).collect::<Vec<_>>());
        let mut operands = vec![New::Class(x), weights];
        if members[0].bias.is_some() {
            let biases: Vec<Id> = members.iter().filter_map(|m| m.bias).collect();
            operands.push(New::over(Op::Concat { axis: 0 }, &biases));
        }
        let wide_tree = New::node(op, operands);
        let Some(wide) = wide_tree.build(egraph) else { continue };
        wide_tree.record(egraph, rule, wide);
        let out_axis = ty(egraph, wide).rank() - 1;
        let mut start = kiln_ir::Dim::Const(0);
        for m in &members {
            let width = &ty(egraph, m.class).shape[out_axis];
            let Ok(end) = start.add(width) else { break };
            let slice = Op::Slice { axis: out_axis, start: start.clone(), end: end.clone(), step: 1 };
            start = end;
            let Some(id) = New::over(slice.clone(), &[wide]).build(egraph) else { continue };
            if ty(egraph, id) != ty(egraph, m.class) {
                continue;
            }
            if egraph.union(id, m.class) {
                merged += 1;
                egraph.analysis.created.push((KNode::new(slice, vec![wide]), rule, m.class));
            }
        }
    }
    egraph.rebuild();
    merged
}
