//! The verifier: re-checks the graph invariants after any stage that changed the graph.

use crate::graph::{Graph, NodeId};
use crate::infer::infer;

/// One broken invariant, naming the node.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("the graph has a cycle")]
    Cycle,
    #[error("node %{node} ({op}): {msg}")]
    Node { node: usize, op: &'static str, msg: String },
    #[error("output `{0}` names a node that is not in the graph")]
    DanglingOutput(String),
    #[error("two outputs are both named `{0}`")]
    DuplicateOutput(String),
    #[error("state: {0}")]
    State(String),
}

/// Checks that the graph is acyclic, every node's type matches inference, operand positions
/// are dense, outputs are unique and present, and the state table fits the graph (names
/// unique, reads and updates of the state's type). Reports the first problem.
pub fn verify(g: &Graph) -> Result<(), VerifyError> {
    if g.has_cycle() {
        return Err(VerifyError::Cycle);
    }
    let ids: std::collections::HashSet<NodeId> = g.node_ids().collect();
    let mut names = std::collections::HashSet::new();
    for (name, id) in &g.outputs {
        if !ids.contains(id) {
            return Err(VerifyError::DanglingOutput(name.clone()));
        }
        if !names.insert(name) {
            return Err(VerifyError::DuplicateOutput(name.clone()));
        }
    }
    crate::state::check(g).map_err(VerifyError::State)?;
    for id in g.node_ids() {
        let node = g.node(id);
        let fail = |msg: String| VerifyError::Node { node: id.index(), op: node.op.name(), msg };
        let operands = g.operands(id);
        let mut positions: Vec<u32> =
            g.raw().edges_directed(id, petgraph::Direction::Incoming).map(|e| *e.weight()).collect();
        positions.sort_unstable();
        if positions.iter().enumerate().any(|(i, &p)| p as usize != i) {
            return Err(fail(format!("operand positions {positions:?} are not 0..{}", positions.len())));
        }
        let types: Vec<_> = operands.iter().map(|&o| g.ty(o)).collect();
        match infer(&node.op, &types) {
            Ok(ty) if ty == node.ty => {}
            Ok(ty) => return Err(fail(format!("recorded type {} but inference gives {ty}", node.ty))),
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    Ok(())
}
