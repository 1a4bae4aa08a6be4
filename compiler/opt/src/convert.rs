//! IR graph ⇄ e-graph.
//!
//! Into the e-graph, every node becomes an e-node (identical subgraphs hash-cons into one
//! class). Out of it, each e-class reached from an output becomes exactly one graph node, so
//! sharing survives extraction, and inputs, parameters and outputs keep their names.

use crate::analysis::KGraph;
use crate::lang::KNode;
use egg::Id;
use kiln_ir::{Graph, NodeId, Op, Origin};
use std::collections::HashMap;

/// A graph loaded into an e-graph: the class of each graph output, and what the graph knew
/// about each class (debug names and source positions, to carry over to the result).
pub struct Loaded {
    /// The class of every node of the original graph.
    pub classes: HashMap<NodeId, Id>,
    pub outputs: Vec<(String, Id)>,
    pub inputs: Vec<Id>,
    pub names: HashMap<Id, String>,
    pub origins: HashMap<Id, Origin>,
}

pub fn to_egraph(g: &Graph, egraph: &mut KGraph) -> Loaded {
    let mut ids: HashMap<NodeId, Id> = HashMap::new();
    let mut names = HashMap::new();
    let mut origins = HashMap::new();
    for n in g.topo_order() {
        let node = g.node(n);
        let children = g.operands(n).iter().map(|o| ids[o]).collect();
        let id = egraph.add(KNode::new(node.op.clone(), children));
        if let Some(name) = &node.name {
            names.entry(id).or_insert_with(|| name.clone());
        }
        if let Some(o) = &node.origin {
            origins.entry(id).or_insert_with(|| o.clone());
        }
        ids.insert(n, id);
    }
    Loaded {
        classes: ids.clone(),
        outputs: g.outputs.iter().map(|(name, n)| (name.clone(), ids[n])).collect(),
        inputs: g.inputs.iter().map(|n| ids[n]).collect(),
        names,
        origins,
    }
}

/// Builds a graph from the chosen e-node of each class (`choice`), one node per class;
/// returns it with the class of each of its nodes.
pub fn from_egraph(
    name: &str,
    egraph: &KGraph,
    loaded: &Loaded,
    choice: &HashMap<Id, KNode>,
) -> Result<(Graph, HashMap<NodeId, Id>), kiln_ir::InferError> {
    let mut g = Graph::new(name);
    g.symbols = egraph.analysis.symbols.clone();
    let mut built: HashMap<Id, NodeId> = HashMap::new();
    // Inputs first and in their original order, so the graph's interface is unchanged.
    let mut order: Vec<Id> = loaded.inputs.iter().map(|i| egraph.find(*i)).collect();
    for (_, id) in &loaded.outputs {
        post_order(egraph.find(*id), egraph, choice, &mut order);
    }
    // When rules merged several named nodes into one class, the one defined last in the
    // original graph names it (ids grow in topological order, so this is deterministic).
    let mut names: Vec<(&Id, &String)> = loaded.names.iter().collect();
    names.sort_by_key(|(k, _)| **k);
    let canonical_names: HashMap<Id, &String> =
        names.into_iter().map(|(k, v)| (egraph.find(*k), v)).collect();
    let mut origins: Vec<(&Id, &Origin)> = loaded.origins.iter().collect();
    origins.sort_by_key(|(k, _)| **k);
    let canonical_origins: HashMap<Id, &Origin> =
        origins.into_iter().map(|(k, v)| (egraph.find(*k), v)).collect();
    for id in order {
        if built.contains_key(&id) {
            continue;
        }
        let node = &choice[&id];
        let operands: Vec<NodeId> = node.children.iter().map(|c| built[&egraph.find(*c)]).collect();
        let n = g.add(node.ir().clone(), &operands)?;
        if !matches!(node.ir(), Op::Input { .. } | Op::Param { .. }) {
            g.node_mut(n).name = canonical_names.get(&id).map(|s| s.to_string());
        }
        g.node_mut(n).origin = canonical_origins.get(&id).map(|o| (*o).clone());
        built.insert(id, n);
    }
    for (name, id) in &loaded.outputs {
        g.add_output(name.clone(), built[&egraph.find(*id)]);
    }
    let classes = built.into_iter().map(|(c, n)| (n, c)).collect();
    Ok((g, classes))
}

/// Classes in dependency order (children first), each once, without recursion.
fn post_order(root: Id, egraph: &KGraph, choice: &HashMap<Id, KNode>, out: &mut Vec<Id>) {
    let mut seen: std::collections::HashSet<Id> = out.iter().copied().collect();
    let mut stack = vec![(root, false)];
    while let Some((id, expanded)) = stack.pop() {
        if expanded {
            out.push(id);
            continue;
        }
        if !seen.insert(id) {
            continue;
        }
        stack.push((id, true));
        for c in choice[&id].children.iter().rev() {
            let c = egraph.find(*c);
            if !seen.contains(&c) {
                stack.push((c, false));
            }
        }
    }
}
