//! The e-graph language: one e-node per IR op application.
//!
//! An e-node carries the full IR [`Op`] (attributes included) and its children. Equality and
//! hashing use a canonical key of the op, so the e-graph hash-conses exactly. Patterns parsed
//! from text (`"(mul ?a ?b)"`) name an op without attributes, which matches the op with any
//! attributes; rules that care about attributes check them in Rust.

use egg::{Id, Language};
use kiln_ir::Op;
use std::fmt;
use std::sync::Arc;

/// An op with its canonical key (name and every attribute, exactly).
#[derive(Clone)]
pub struct OpKey {
    key: Arc<str>,
    name: &'static str,
    /// `None` only in patterns: "this op name, any attributes".
    op: Option<Arc<Op>>,
}

impl OpKey {
    pub fn new(op: Op) -> OpKey {
        let key: Arc<str> = canonical_key(&op).into();
        OpKey { key, name: op.name(), op: Some(Arc::new(op)) }
    }

    /// The IR op (never `None` for e-nodes in an e-graph).
    pub fn op(&self) -> Option<&Op> {
        self.op.as_deref()
    }

    pub fn name(&self) -> &'static str {
        self.name
    }
}

/// The exact identity of an op: its name and attributes, with constants spelled out in full.
fn canonical_key(op: &Op) -> String {
    match op {
        Op::Const { value } => {
            let bits: Vec<String> = value.to_f64_vec().iter().map(|v| format!("{:x}", v.to_bits())).collect();
            format!("const:{}:{:?}:{}", value.dtype(), value.shape, bits.join(","))
        }
        Op::Full { value, dtype, shape } => format!("full:{dtype}:{shape:?}:{:x}", value.to_bits()),
        other => {
            let attrs: Vec<String> = other.attrs().into_iter().map(|(k, v)| format!("{k}={v}")).collect();
            let extra = match other {
                Op::Input { dtype, shape, .. } | Op::Param { dtype, shape, .. } => {
                    format!(":{dtype}:{shape:?}")
                }
                Op::Iota { dtype, shape, .. } | Op::RandomUniform { dtype, shape, .. } => {
                    format!(":{dtype}:{shape:?}")
                }
                Op::Cast { to } => format!(":{to}"),
                _ => String::new(),
            };
            format!("{}{{{}}}{extra}", other.name(), attrs.join(","))
        }
    }
}

impl PartialEq for OpKey {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl Eq for OpKey {}
impl std::hash::Hash for OpKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key.hash(state)
    }
}
impl PartialOrd for OpKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for OpKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key.cmp(&other.key)
    }
}
impl fmt::Debug for OpKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.key)
    }
}

/// An e-node: an op applied to e-classes.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KNode {
    pub op: OpKey,
    pub children: Vec<Id>,
}

impl KNode {
    pub fn new(op: Op, children: Vec<Id>) -> KNode {
        KNode { op: OpKey::new(op), children }
    }

    /// The IR op of an e-node in the e-graph.
    pub fn ir(&self) -> &Op {
        self.op.op().expect("e-nodes in the e-graph carry their op")
    }
}

impl Language for KNode {
    type Discriminant = &'static str;

    fn discriminant(&self) -> &'static str {
        self.op.name
    }

    fn matches(&self, other: &Self) -> bool {
        self.op.name == other.op.name
            && self.children.len() == other.children.len()
            && (self.op.op.is_none() || other.op.op.is_none() || self.op == other.op)
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for KNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.op.name)
    }
}

/// The ops patterns may name. Attribute-free ops carry their full IR op, so patterns can
/// build them on a rule's right-hand side; the others are wildcards (any attributes) and may
/// only appear on a left-hand side.
fn pattern_op(name: &str) -> Option<(&'static str, Option<Op>)> {
    use kiln_ir::{BinaryOp, CompareOp, UnaryOp};
    if let Some(u) = UnaryOp::ALL.iter().find(|u| u.name() == name) {
        return Some((u.name(), Some(Op::Unary(*u))));
    }
    if let Some(b) = BinaryOp::ALL.iter().find(|b| b.name() == name) {
        return Some((b.name(), Some(Op::Binary(*b))));
    }
    if let Some(c) = CompareOp::ALL.iter().find(|c| c.name() == name) {
        return Some((c.name(), Some(Op::Compare(*c))));
    }
    match name {
        "where" => Some(("where", Some(Op::Where))),
        "matmul" => Some(("matmul", Some(Op::MatMul))),
        _ => WILDCARD_OPS.iter().find(|o| **o == name).map(|o| (*o, None)),
    }
}

const WILDCARD_OPS: &[&str] = &[
    "full",
    "transpose",
    "reshape",
    "reduce_sum",
    "reduce_mean",
    "reduce_max",
    "reduce_min",
    "broadcast_to",
    "cast",
    "iota",
    "slice",
    "concat",
    "gather",
    "softmax",
    "log_softmax",
    "layer_norm",
    "rms_norm",
    "gelu",
    "attention",
    "add_norm",
    "matmul_epilogue",
];

impl egg::FromOp for KNode {
    type Error = egg::FromOpError;

    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, Self::Error> {
        match pattern_op(op) {
            Some((_, Some(full))) => Ok(KNode::new(full, children)),
            Some((name, None)) => Ok(KNode { op: OpKey { key: Arc::from(name), name, op: None }, children }),
            None => Err(egg::FromOpError::new(op, children)),
        }
    }
}
