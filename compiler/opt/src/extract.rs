//! Extraction: the cheapest e-node of every class reachable from the outputs.
//!
//! Greedy bottom-up. A node costs its own time plus the larger of (a) the costs of the
//! children only it uses and (b) its costliest child. Plain tree costs count a shared
//! subexpression once per use, which doubles at every residual connection: after a few dozen
//! layers the fused and unfused forms of a layer differ by less than the rounding of the
//! running sum and the choice becomes arbitrary. Here shared classes are paid once, wherever
//! they sit, so costs grow linearly with depth and two alternatives over the same operands
//! differ by exactly their own work. The choice is then rebuilt as a DAG, so the graph never
//! duplicates a class.
use crate::analysis::KGraph;
use crate::cost::TargetCost;
use crate::lang::KNode;
use egg::{CostFunction, Extractor, Id};
use kiln_ir::{BinaryOp, Op, TensorType};
use std::collections::HashMap;

struct TimeCost<'a> {
    egraph: &'a KGraph,
    target: &'a TargetCost,
    /// How many e-nodes use each class.
    uses: HashMap<Id, f64>,
    /// Each e-node's own time: the extractor asks for it on every pass until costs settle.
    own: HashMap<KNode, f64>,
}

impl CostFunction<KNode> for TimeCost<'_> {
    type Cost = f64;

    fn cost<C: FnMut(Id) -> f64>(&mut self, enode: &KNode, mut costs: C) -> f64 {
        let own = match self.own.get(enode) {
            Some(t) => *t,
            None => {
                let types: Vec<&TensorType> =
                    enode.children.iter().map(|c| &self.egraph[*c].data.ty).collect();
                let out =
                    kiln_ir::infer(enode.ir(), &types).map(|t| self.target.node_time(enode.ir(), &types, &t));
                // A tiny per-node term breaks ties toward fewer nodes (views and leaves cost 0).
                let t = out.unwrap_or(f64::INFINITY) + 1e-12;
                self.own.insert(enode.clone(), t);
                t
            }
        };
        // Children only this node uses are paid for here; shared children are paid once,
        // wherever they are, so they only count through the longest path below.
        let (mut private, mut deepest) = (0.0f64, 0.0f64);
        for &c in &enode.children {
            let cost = costs(c);
            if self.uses.get(&self.egraph.find(c)).copied().unwrap_or(1.0) <= 1.0 {
                private += cost;
            }
            deepest = deepest.max(cost);
        }
        // At least the costliest child plus its own: costs grow strictly along every path,
        // so the chosen nodes can never form a cycle (x = x · 1 never picks itself).
        own + private.max(deepest)
    }
}

/// The chosen node of every class reachable from `roots` (keys are canonical ids).
pub fn choose(egraph: &KGraph, roots: &[Id], target: &TargetCost) -> HashMap<Id, KNode> {
    let mut uses: HashMap<Id, f64> = HashMap::new();
    for class in egraph.classes() {
        for node in &class.nodes {
            for c in &node.children {
                *uses.entry(egraph.find(*c)).or_insert(0.0) += 1.0;
            }
        }
    }
    let extractor = Extractor::new(egraph, TimeCost { egraph, target, uses, own: HashMap::new() });
    let mut choice = HashMap::new();
    let mut stack: Vec<Id> = roots.iter().map(|r| egraph.find(*r)).collect();
    while let Some(id) = stack.pop() {
        if choice.contains_key(&id) {
            continue;
        }
        let node = extractor.find_best_node(id).clone();
        stack.extend(node.children.iter().map(|c| egraph.find(*c)));
        choice.insert(id, node);
    }
    choice
}

/// A global touch-up the per-class choice cannot see: `add_norm(a, b)` reads both addends,
/// which only pays when the sum `a + b` is not computed anyway. Where the chosen graph also
/// computes the sum (a pre-norm residual stream), normalize that sum instead.
pub fn prefer_computed_sums(egraph: &KGraph, choice: &mut HashMap<Id, KNode>) {
    let mut swaps = vec![];
    for (class, node) in choice.iter() {
        if !matches!(node.ir(), Op::AddNorm { .. }) {
            continue;
        }
        let (a, b) = (egraph.find(node.children[0]), egraph.find(node.children[1]));
        let sum = [(a, b), (b, a)].into_iter().find_map(|(x, y)| {
            let add = egraph.lookup(KNode::new(Op::Binary(BinaryOp::Add), vec![x, y]))?;
            let add = egraph.find(add);
            choice.contains_key(&add).then_some(add)
        });
        let Some(sum) = sum else { continue };
        let norm = egraph[*class].nodes.iter().find(|n| {
            matches!(n.ir(), Op::LayerNorm { .. } | Op::RmsNorm { .. })
                && egraph.find(n.children[0]) == sum
                && n.children[1..]
                    .iter()
                    .zip(&node.children[2..])
                    .all(|(p, q)| egraph.find(*p) == egraph.find(*q))
        });
        if let Some(norm) = norm {
            swaps.push((*class, norm.clone()));
        }
    }
    for (class, node) in swaps {
        choice.insert(class, node);
    }
}
