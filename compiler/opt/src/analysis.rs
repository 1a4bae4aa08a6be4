//! What the e-graph knows about each e-class: its type and, when it is one, its constant.
//!
//! Rules use the type to check their conditions (same shapes, reduction over the last axis;
//! extents compare by their normal forms, so a rule whose condition is unproven for a
//! symbolic extent does not fire)
//! and the constant to recognize scales and epsilons; constant folding adds the folded value
//! to the class so every rule sees literals however the spec computed them.

use crate::lang::KNode;
use egg::{DidMerge, EGraph, Id};
use kiln_ir::{BinaryOp, DType, Op, TensorType, UnaryOp};

/// Facts about an e-class.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub ty: TensorType,
    /// The value of every element, when the class is a splat constant.
    pub konst: Option<f64>,
}

/// A node a rule added: the node, the rule, and the class the rule's whole result joined.
pub type Created = (KNode, egg::Symbol, egg::Id);

/// The analysis: type inference and splat-constant folding. It also keeps the provenance of
/// the nodes rules add (which rule added which node), for `--explain`.
#[derive(Default)]
pub struct Facts {
    /// Each node a rule added, the rule, and the class the rule found it equal to (the node's
    /// own, or, for a node nested in what the rule built, the class of that whole: a fused
    /// norm inside the transpose back of a norm over another axis).
    pub created: Vec<Created>,
    /// The graph's symbols: their bounds prove symbolic slice bounds, their hints are where
    /// costs are estimated.
    pub symbols: Vec<kiln_ir::SymbolDecl>,
}

impl Facts {
    /// The analysis of a graph with `symbols`.
    pub fn new(symbols: &[kiln_ir::SymbolDecl]) -> Facts {
        Facts { created: vec![], symbols: symbols.to_vec() }
    }

    /// Each symbol's hint, in order.
    pub fn hints(&self) -> Vec<i64> {
        self.symbols.iter().map(|s| s.hint).collect()
    }
}

pub type KGraph = EGraph<KNode, Facts>;

impl Facts {
    fn constant(egraph: &KGraph, enode: &KNode, ty: &TensorType) -> Option<f64> {
        let c = |i: usize| egraph[enode.children[i]].data.konst;
        let v = match enode.ir() {
            Op::Full { value, .. } => *value,
            Op::Const { value } => {
                let v = value.to_f64_vec();
                let first = *v.first()?;
                v.iter().all(|x| x.to_bits() == first.to_bits()).then_some(first)?
            }
            Op::Unary(u) => {
                let x = c(0)?;
                match u {
                    UnaryOp::Neg => -x,
                    UnaryOp::Abs => x.abs(),
                    UnaryOp::Exp => x.exp(),
                    UnaryOp::Log => x.ln(),
                    UnaryOp::Sqrt => x.sqrt(),
                    UnaryOp::Rsqrt => 1.0 / x.sqrt(),
                    UnaryOp::Recip => 1.0 / x,
                    UnaryOp::Tanh => x.tanh(),
                    UnaryOp::Sin => x.sin(),
                    UnaryOp::Cos => x.cos(),
                    UnaryOp::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                    UnaryOp::Relu => x.max(0.0),
                    UnaryOp::Erf => return None,
                }
            }
            Op::Binary(b) if ty.dtype.is_float() => {
                let (x, y) = (c(0)?, c(1)?);
                match b {
                    BinaryOp::Add => x + y,
                    BinaryOp::Sub => x - y,
                    BinaryOp::Mul => x * y,
                    BinaryOp::Div => x / y,
                    BinaryOp::Pow => x.powf(y),
                    BinaryOp::Max => x.max(y),
                    BinaryOp::Min => x.min(y),
                }
            }
            Op::Reshape { .. } | Op::BroadcastTo { .. } | Op::Transpose { .. } => c(0)?,
            Op::Cast { to } if to.is_float() => c(0)?,
            _ => return None,
        };
        // Fold in the class's own precision, so a folded constant equals what the unfused
        // graph computes (f32 rounding included).
        Some(match ty.dtype {
            DType::F32 => v as f32 as f64,
            DType::F16 => half::f16::from_f64(v).to_f64(),
            DType::BF16 => half::bf16::from_f64(v).to_f64(),
            _ => v,
        })
    }
}

impl egg::Analysis<KNode> for Facts {
    type Data = Meta;

    fn make(egraph: &mut KGraph, enode: &KNode, _id: Id) -> Meta {
        let types: Vec<&TensorType> = enode.children.iter().map(|c| &egraph[*c].data.ty).collect();
        // Rules only add nodes they have type-checked, so inference cannot fail here.
        let ty = kiln_ir::infer_with(enode.ir(), &types, &egraph.analysis.symbols)
            .unwrap_or_else(|e| panic!("a rule built an ill-typed `{}`: {e}", enode.ir().name()));
        let konst = Facts::constant(egraph, enode, &ty);
        Meta { ty, konst }
    }

    fn merge(&mut self, a: &mut Meta, b: Meta) -> DidMerge {
        debug_assert_eq!(a.ty, b.ty, "merged e-classes must have the same type");
        match (a.konst, b.konst) {
            (None, Some(v)) => {
                a.konst = Some(v);
                DidMerge(true, false)
            }
            (Some(_), None) => DidMerge(false, true),
            _ => DidMerge(false, false),
        }
    }

    fn modify(egraph: &mut KGraph, id: Id) {
        // Give every constant class a plain `full` node, so patterns and the extractor see it.
        let Meta { ty, konst: Some(v) } = egraph[id].data.clone() else { return };
        if v.is_nan() {
            return;
        }
        let full = KNode::new(Op::Full { value: v, dtype: ty.dtype, shape: ty.shape.clone() }, vec![]);
        let f = egraph.add(full);
        egraph.union(id, f);
    }
}
