//! Why each fused node exists: the rules that built it (and the fused forms it was built
//! from), the primitive ops it replaces, and the spec lines those ops came from: the line of
//! each op and, for a library layer's line, the model line that called the layer.

use crate::analysis::KGraph;
use egg::Id;
use kiln_ir::{Activation, Graph, NodeId, NormKind, Op};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A spec position: file, line, column.
type Place = (String, u32, u32);

/// The story of one fused node of the optimized graph.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The node's number in the printed optimized graph (`%N`).
    pub node: usize,
    pub op: String,
    pub attrs: Vec<(String, String)>,
    /// Rules in the order the e-graph applied them: first the ones that built the fused forms
    /// this node was matched over, last the one that built this node.
    pub rules: Vec<String>,
    /// The original ops it replaces, by name.
    pub replaces: BTreeMap<String, usize>,
    /// Where those ops were written (file:line:col), in source order; a library line is
    /// followed by the call that entered the library from the model,
    /// `models/std.ron:85:26 (called at models/gpt2.ron:41:30)`.
    pub origins: Vec<String>,
}

/// Explains every fused node of `out`. `class_of_out` maps its nodes to e-classes; the
/// original graph's nodes map to classes through `class_of_before`.
pub fn explain(
    egraph: &KGraph,
    before: &Graph,
    class_of_before: &HashMap<NodeId, Id>,
    out: &Graph,
    class_of_out: &HashMap<NodeId, Id>,
) -> Vec<Explanation> {
    let number: HashMap<NodeId, usize> =
        out.topo_order().into_iter().enumerate().map(|(i, n)| (n, i)).collect();
    let canon = |id: Id| egraph.find(id);
    // Original nodes by class.
    let mut originals: HashMap<Id, Vec<NodeId>> = HashMap::new();
    for (n, c) in class_of_before {
        originals.entry(canon(*c)).or_default().push(*n);
    }
    // Classes the optimized graph computes: what lies below them is not replaced.
    let kept: HashSet<Id> = class_of_out.values().map(|c| canon(*c)).collect();
    let mut users: HashMap<NodeId, Vec<NodeId>> = HashMap::new();
    for n in out.node_ids() {
        for o in out.operands(n) {
            users.entry(o).or_default().push(n);
        }
    }
    let mut list = vec![];
    for n in out.topo_order() {
        let node = out.node(n);
        if !node.op.is_fused() {
            continue;
        }
        // A fused node a rule wrapped in a view (a norm over another axis, transposed back;
        // attention over split heads, reshaped back) stands for what the view's class was
        // written as: follow single view users up to a class the original graph computes.
        let mut chain = vec![canon(class_of_out[&n])];
        let mut top = n;
        while !originals.contains_key(&chain[chain.len() - 1]) {
            match users.get(&top).map(Vec::as_slice) {
                Some([u]) if matches!(out.node(*u).op, Op::Transpose { .. } | Op::Reshape { .. }) => {
                    top = *u;
                    chain.push(canon(class_of_out[u]));
                }
                _ => break,
            }
        }
        let class = chain[chain.len() - 1];
        let stops: HashSet<Id> = kept.iter().copied().filter(|c| !chain.contains(c)).collect();
        // Walk the original graph down from this class to the fused node's operands.
        let mut seen: HashSet<NodeId> = HashSet::new();
        let mut stack: Vec<NodeId> = originals.get(&class).cloned().unwrap_or_default();
        while let Some(o) = stack.pop() {
            if !seen.insert(o) {
                continue;
            }
            for operand in before.operands(o) {
                let c = canon(class_of_before[&operand]);
                if !stops.contains(&c) && !before.node(operand).op.is_leaf() {
                    stack.push(operand);
                }
            }
        }
        let mut replaces = BTreeMap::new();
        let mut origins: BTreeSet<(Place, Option<Place>)> = BTreeSet::new();
        let mut classes: HashSet<Id> = HashSet::new();
        for &o in &seen {
            *replaces.entry(before.node(o).op.name().to_string()).or_insert(0) += 1;
            if let Some(org) = &before.node(o).origin {
                let call = org.call_site.as_ref().map(|c| (c.file.to_string(), c.line, c.col));
                origins.insert(((org.file.to_string(), org.line, org.col), call));
            }
            classes.insert(canon(class_of_before[&o]));
        }
        classes.extend(chain.iter().copied());
        // Rules that built this op, or the fused forms its rule matches over, in the classes
        // this node covers, in order of creation.
        let mut kinds = precursors(&node.op);
        kinds.push(node.op.name());
        let mut rules: Vec<String> = vec![];
        for (k, rule, joined) in &egraph.analysis.created {
            let covered = egraph.lookup(k.clone()).is_some_and(|c| classes.contains(&canon(c)))
                || classes.contains(&canon(*joined));
            if kinds.contains(&k.ir().name()) && covered {
                let r = rule.to_string();
                if !rules.contains(&r) {
                    rules.push(r);
                }
            }
        }
        list.push(Explanation {
            node: number[&n],
            op: node.op.name().to_string(),
            attrs: node.op.attrs().into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            rules,
            replaces,
            origins: origins
                .into_iter()
                .map(|((f, l, c), call)| match call {
                    Some((cf, cl, cc)) => format!("{f}:{l}:{c} (called at {cf}:{cl}:{cc})"),
                    None => format!("{f}:{l}:{c}"),
                })
                .collect(),
        });
    }
    list
}

/// The fused forms the rule for `op` matches over (attention is found around a softmax, the
/// affine and residual norms around the plain norm, activations around a biased matmul).
fn precursors(op: &Op) -> Vec<&'static str> {
    match op {
        Op::Attention { .. } => vec!["softmax"],
        Op::LayerNorm { .. } => vec![],
        Op::RmsNorm { .. } => vec![],
        Op::AddNorm { kind: NormKind::Layer, .. } => vec!["layer_norm"],
        Op::AddNorm { kind: NormKind::Rms, .. } => vec!["rms_norm"],
        Op::MatMulEpilogue { activation: Activation::Gelu(_), .. } => vec!["gelu"],
        _ => vec![],
    }
}

/// The explanations as text, one block per fused node.
pub fn to_text(list: &[Explanation]) -> String {
    let mut s = String::new();
    for e in list {
        let attrs: Vec<String> = e.attrs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
        s.push_str(&format!("%{} = {} {{{}}}\n", e.node, e.op, attrs.join(", ")));
        s.push_str(&format!("  rules: {}\n", e.rules.join(" → ")));
        let rep: Vec<String> = e.replaces.iter().map(|(k, v)| format!("{k} ×{v}")).collect();
        s.push_str(&format!("  replaces: {}\n", rep.join(", ")));
        s.push_str(&format!("  from: {}\n", e.origins.join(", ")));
    }
    s
}
