//! The verifier: re-checks the graph invariants after any stage that changed the graph.

use crate::dtype::Dim;
use crate::graph::{Graph, NodeId};
use crate::infer::infer_with;

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
    #[error("symbols: {0}")]
    Symbols(String),
}

/// Each symbol's declaration holds, names are unique, and every extent reads only declared
/// symbols, by their declared names.
fn check_symbols(g: &Graph) -> Result<(), String> {
    let mut names = std::collections::HashSet::new();
    for d in &g.symbols {
        d.check()?;
        if !names.insert(&d.name) {
            return Err(format!("`{}` is declared twice", d.name));
        }
    }
    let declared = |dim: &Dim| -> Result<(), String> {
        let Dim::Sym(e) = dim else { return Ok(()) };
        for s in e.symbols() {
            match g.symbols.get(s.index as usize) {
                Some(d) if *d.name == *s.name => {}
                _ => {
                    return Err(format!(
                        "the extent {e} reads symbol {} (`{}`), which is not declared",
                        s.index, s.name
                    ))
                }
            }
        }
        Ok(())
    };
    for id in g.node_ids() {
        let n = g.node(id);
        for d in n.op.dims().iter().chain(&n.ty.shape) {
            declared(d).map_err(|m| format!("node %{}: {m}", id.index()))?;
        }
    }
    g.state.iter().flat_map(|s| &s.ty.shape).try_for_each(declared)
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
    check_symbols(g).map_err(VerifyError::Symbols)?;
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
        match infer_with(&node.op, &types, &g.symbols) {
            Ok(ty) if ty == node.ty => {}
            Ok(ty) => return Err(fail(format!("recorded type {} but inference gives {ty}", node.ty))),
            Err(e) => return Err(fail(e.to_string())),
        }
    }
    Ok(())
}
