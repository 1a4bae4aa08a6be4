//! The dataflow graph: a DAG of primitive ops with static types.
//!
//! **Invariant:** every node's `ty` is what [`infer`](crate::infer) computes from its op and
//! its operands' types; [`Graph::add`] enforces it and [`verify`](crate::verify) re-checks it.
//! Operand order is the edge weight, so `operands(n)[i]` is the op's `i`-th argument.

use crate::dtype::Dim;
use crate::dtype::TensorType;
use crate::infer::{infer_with, InferError};
use crate::op::Op;
use crate::size::SymbolDecl;
use crate::state::StateVar;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::sync::Arc;

/// A node handle.
pub type NodeId = NodeIndex<u32>;

/// Where a node came from in the model source: file, 1-based line and column.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Origin {
    pub file: Arc<str>,
    pub line: u32,
    pub col: u32,
    /// For a line of a library layer: where a file other than the library's called into it
    /// (the innermost such call, usually the model's line). Not part of `Display`.
    pub call_site: Option<Box<Origin>>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

/// One op application with its result type.
#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub ty: TensorType,
    /// The spec name bound to this value, when it had one (for printing and debugging).
    pub name: Option<String>,
    pub origin: Option<Origin>,
}

/// A model as a graph of primitive ops.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    g: StableDiGraph<Node, u32>,
    /// Graph inputs in declaration order.
    pub inputs: Vec<NodeId>,
    /// Named graph outputs in declaration order.
    pub outputs: Vec<(String, NodeId)>,
    /// Persistent state, read through parameters of the same names and updated at the end of
    /// a run (`state.rs`); empty for a plain function of its inputs.
    pub state: Vec<StateVar>,
    /// The symbols that size its dynamic extents (`Dim::Sym` reads symbol `i` as
    /// `symbols[i]`); empty for a static graph.
    pub symbols: Vec<SymbolDecl>,
}

/// Why a graph cannot be specialized to the values given for its symbols.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecializeError {
    #[error("the graph has {expected} symbol(s), but {got} value(s) were given")]
    Count { expected: usize, got: usize },
    #[error("`{name}` is {value}, but it takes {}", describe(.decl))]
    OutOfBounds { name: String, value: i64, decl: SymbolDecl },
    #[error("at {0}")]
    Size(String),
    #[error("the specialized graph is invalid: {0}")]
    Invalid(#[from] crate::verify::VerifyError),
}

/// `1..=512` or `8..=512, a multiple of 8`.
pub fn describe(d: &SymbolDecl) -> String {
    match d.multiple_of {
        1 => format!("{}..={}", d.min, d.max),
        m => format!("{}..={}, a multiple of {m}", d.min, d.max),
    }
}

/// A graph that still has symbols where a stage needs static shapes (the scheduler and the
/// code generators).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error(
    "{} not specialized: compiling needs static shapes; specialize with `--set NAME=VALUE` ({})",
    unspecialized_names(.0),
    .0.iter().map(|s| format!("--set {}={}", s.name, s.hint)).collect::<Vec<_>>().join(" ")
)]
pub struct Unspecialized(pub Vec<SymbolDecl>);

fn unspecialized_names(symbols: &[SymbolDecl]) -> String {
    let quoted: Vec<String> = symbols.iter().map(|s| format!("`{}`", s.name)).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("the dynamic sizes {} and {last} are", rest.join(", "))
        }
        Some((last, _)) => format!("the dynamic size {last} is"),
        None => "a symbolic extent is".to_string(),
    }
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    /// Adds `op` applied to `operands`, inferring and checking its type.
    pub fn add(&mut self, op: Op, operands: &[NodeId]) -> Result<NodeId, InferError> {
        let types: Vec<&TensorType> = operands.iter().map(|&o| &self.g[o].ty).collect();
        let ty = infer_with(&op, &types, &self.symbols)?;
        let is_input = matches!(op, Op::Input { .. });
        let id = self.g.add_node(Node { op, ty, name: None, origin: None });
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o, id, i as u32);
        }
        if is_input {
            self.inputs.push(id);
        }
        Ok(id)
    }

    /// Adds a node and sets its debug name and origin.
    pub fn add_at(
        &mut self,
        op: Op,
        operands: &[NodeId],
        origin: Option<Origin>,
    ) -> Result<NodeId, InferError> {
        let id = self.add(op, operands)?;
        self.g[id].origin = origin;
        Ok(id)
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id]
    }

    pub fn ty(&self, id: NodeId) -> &TensorType {
        &self.g[id].ty
    }

    pub fn node_count(&self) -> usize {
        self.g.node_count()
    }

    /// The node's operands in argument order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> =
            self.g.edges_directed(id, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        e.sort_unstable();
        e.into_iter().map(|(_, s)| s).collect()
    }

    /// The nodes that use `id`, each once, in index order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self.g.neighbors_directed(id, Direction::Outgoing).collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    pub fn add_output(&mut self, name: impl Into<String>, id: NodeId) {
        self.outputs.push((name.into(), id));
    }

    /// Every node id in index order.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices()
    }

    /// The parameters, in topological order.
    pub fn params(&self) -> Vec<NodeId> {
        self.topo_order().into_iter().filter(|&n| matches!(self.g[n].op, Op::Param { .. })).collect()
    }

    /// A deterministic topological order: among ready nodes the oldest comes first, so the
    /// order follows the spec's order of definition.
    pub fn topo_order(&self) -> Vec<NodeId> {
        let mut indeg: std::collections::HashMap<NodeId, usize> = self
            .g
            .node_indices()
            .map(|n| (n, self.g.edges_directed(n, Direction::Incoming).count()))
            .collect();
        let mut ready: BinaryHeap<Reverse<NodeId>> =
            indeg.iter().filter(|(_, &d)| d == 0).map(|(&n, _)| Reverse(n)).collect();
        let mut order = Vec::with_capacity(self.g.node_count());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.g.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target is a node");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        order
    }

    /// Whether the graph has a cycle (a valid graph never does; the verifier checks).
    pub fn has_cycle(&self) -> bool {
        self.topo_order().len() != self.g.node_count()
    }

    /// Removes every node that no output or state update depends on. Returns how many were
    /// removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = std::collections::HashSet::new();
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, n)| *n).collect();
        stack.extend(self.state.iter().filter_map(|s| s.update));
        stack.extend(self.inputs.iter().copied());
        while let Some(n) = stack.pop() {
            if live.insert(n) {
                stack.extend(self.g.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> = self.g.node_indices().filter(|n| !live.contains(n)).collect();
        for &n in &dead {
            self.g.remove_node(n);
        }
        dead.len()
    }

    /// Whether no extent reads a symbol (types, attributes and state).
    pub fn is_static(&self) -> bool {
        self.symbols.is_empty()
            && self.g.node_weights().all(|n| n.ty.is_static() && n.op.dims().iter().all(Dim::is_static))
            && self.state.iter().all(|s| s.ty.is_static())
    }

    /// The check before every stage that needs static shapes: an error naming the symbols
    /// (with the `--set` that specializes them) when the graph has any.
    pub fn require_static(&self) -> Result<(), Unspecialized> {
        if self.is_static() {
            Ok(())
        } else {
            Err(Unspecialized(self.symbols.clone()))
        }
    }

    /// The static graph for one value of each symbol (`values[i]` for `symbols[i]`, each
    /// inside its bounds): every extent evaluated, the types re-inferred and verified. It is
    /// the graph `--set` gives for the same values.
    pub fn specialize(&self, values: &[i64]) -> Result<Graph, SpecializeError> {
        if values.len() != self.symbols.len() {
            return Err(SpecializeError::Count { expected: self.symbols.len(), got: values.len() });
        }
        for (d, &v) in self.symbols.iter().zip(values) {
            if !d.admits(v) {
                return Err(SpecializeError::OutOfBounds { name: d.name.clone(), value: v, decl: d.clone() });
            }
        }
        let at: Vec<Option<i64>> = values.iter().map(|&v| Some(v)).collect();
        let subst = |d: &mut Dim| -> Result<(), SpecializeError> {
            if let Dim::Sym(e) = d {
                let e = e.substitute(&at).map_err(|err| SpecializeError::Size(err.to_string()))?;
                *d = Dim::from_expr(e).map_err(|err| SpecializeError::Size(err.to_string()))?;
            }
            Ok(())
        };
        let mut out = self.clone();
        out.symbols.clear();
        for n in out.g.node_weights_mut() {
            for d in n.op.dims_mut().into_iter().chain(n.ty.shape.iter_mut()) {
                subst(d)?;
            }
        }
        for s in &mut out.state {
            for d in &mut s.ty.shape {
                subst(d)?;
            }
        }
        crate::verify::verify(&out)?;
        Ok(out)
    }

    /// Direct access for passes that rewire edges; callers must re-run the verifier.
    pub fn raw(&self) -> &StableDiGraph<Node, u32> {
        &self.g
    }

    pub fn raw_mut(&mut self) -> &mut StableDiGraph<Node, u32> {
        &mut self.g
    }
}
