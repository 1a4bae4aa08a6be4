//! The rewrite rules, by topic. Each rule is named; the name shows up in the report.
//!
//! Every rule is an [`FnRule`]: a Rust function that looks at one e-class and returns what is
//! equal to it, reading attributes (an axis, an epsilon) and analysis facts (a constant, a
//! shape) directly. The e-graph language also parses text patterns, for rules that need none.

pub mod algebra;
pub mod fusion;
pub mod merge;

use crate::analysis::{Facts, KGraph};
use crate::lang::KNode;
use egg::{Applier, Id, Rewrite, SearchMatches, Searcher, Subst, Symbol, Var};
use kiln_ir::{DType, Op, TensorType};

pub type Rule = Rewrite<KNode, Facts>;

/// Something a rule found equal to the e-class it was looking at: an existing class, or a
/// new node over existing classes and further new nodes.
#[derive(Clone, Debug)]
pub enum New {
    Class(Id),
    Node(Op, Vec<New>),
}

impl New {
    pub fn node(op: Op, children: Vec<New>) -> New {
        New::Node(op, children)
    }

    /// A new node over existing classes.
    pub fn over(op: Op, children: &[Id]) -> New {
        New::Node(op, children.iter().map(|c| New::Class(*c)).collect())
    }

    /// A splat constant of the given type.
    pub fn constant(value: f64, ty: &TensorType) -> New {
        New::Node(Op::Full { value, dtype: ty.dtype, shape: ty.shape.clone() }, vec![])
    }

    /// Adds the tree to the e-graph if every node type-checks; returns its class.
    fn build(&self, egraph: &mut KGraph) -> Option<Id> {
        match self {
            New::Class(id) => Some(egraph.find(*id)),
            New::Node(op, children) => {
                let ids: Vec<Id> = children.iter().map(|c| c.build(egraph)).collect::<Option<_>>()?;
                let types: Vec<&TensorType> = ids.iter().map(|c| &egraph[*c].data.ty).collect();
                kiln_ir::infer_with(op, &types, &egraph.analysis.symbols).ok()?;
                Some(egraph.add(KNode::new(op.clone(), ids)))
            }
        }
    }

    /// Records every node of the tree as built by `rule`, for the explanations: the fused
    /// node a rule wraps in a view (a norm over another axis, transposed back) too.
    pub(super) fn record(&self, egraph: &mut KGraph, rule: Symbol, joined: Id) {
        let New::Node(op, children) = self else { return };
        for c in children {
            c.record(egraph, rule, joined);
        }
        let ids: Option<Vec<Id>> = children.iter().map(|c| c.lookup(egraph)).collect();
        if let Some(ids) = ids {
            egraph.analysis.created.push((KNode::new(op.clone(), ids), rule, joined));
        }
    }

    /// The class the tree already is in the e-graph, if all of it exists.
    fn lookup(&self, egraph: &KGraph) -> Option<Id> {
        match self {
            New::Class(id) => Some(egraph.find(*id)),
            New::Node(op, children) => {
                let ids: Vec<Id> = children.iter().map(|c| c.lookup(egraph)).collect::<Option<_>>()?;
                egraph.lookup(KNode::new(op.clone(), ids)).map(|id| egraph.find(id))
            }
        }
    }
}

/// A rule written as a function: `find(egraph, class)` lists what is equal to `class`.
#[derive(Clone)]
pub struct FnRule {
    find: fn(&KGraph, Id) -> Vec<New>,
}

impl FnRule {
    pub fn rule(name: &str, find: fn(&KGraph, Id) -> Vec<New>) -> Rule {
        let r = FnRule { find };
        Rewrite::new(name, r.clone(), r).expect("function rules have no pattern variables")
    }
}

impl Searcher<KNode, Facts> for FnRule {
    fn search_eclass_with_limit(
        &self,
        egraph: &KGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, KNode>> {
        if limit == 0 {
            return None;
        }
        // Report a match only when it would add something new to the class.
        let class = egraph.find(eclass);
        let new = (self.find)(egraph, eclass).iter().any(|e| e.lookup(egraph) != Some(class));
        new.then(|| SearchMatches { eclass, substs: vec![Subst::default()], ast: None })
    }

    fn vars(&self) -> Vec<Var> {
        vec![]
    }
}

impl Applier<KNode, Facts> for FnRule {
    fn apply_one(
        &self,
        egraph: &mut KGraph,
        eclass: Id,
        _: &Subst,
        _: Option<&egg::PatternAst<KNode>>,
        rule: Symbol,
    ) -> Vec<Id> {
        let mut changed = vec![];
        for e in (self.find)(egraph, eclass) {
            // Only what is well typed and of the class's own type may join it.
            let Some(id) = e.build(egraph) else { continue };
            if egraph[id].data.ty != egraph[eclass].data.ty {
                continue;
            }
            if egraph.union(id, eclass) {
                changed.push(eclass);
                e.record(egraph, rule, eclass);
            }
        }
        changed
    }
}

// ------------------------------------------------------------------ matching helpers

/// The e-nodes of a class.
pub fn nodes(g: &KGraph, id: Id) -> &[KNode] {
    &g[id].nodes
}

/// The nodes of a class whose op satisfies `pred`.
pub fn with_op<'a>(
    g: &'a KGraph,
    id: Id,
    pred: impl Fn(&Op) -> bool + 'a,
) -> impl Iterator<Item = &'a KNode> + 'a {
    g[id].nodes.iter().filter(move |n| pred(n.ir()))
}

/// The splat constant a class holds, if any.
pub fn konst(g: &KGraph, id: Id) -> Option<f64> {
    g[id].data.konst
}

pub fn ty(g: &KGraph, id: Id) -> &TensorType {
    &g[id].data.ty
}

/// Whether two ids are the same class.
pub fn same(g: &KGraph, a: Id, b: Id) -> bool {
    g.find(a) == g.find(b)
}

/// Whether the constant `a`, folded in a graph of dtype `d`, is the exact constant `b` (1/√2,
/// √(2/π), 0.044715 …) as that dtype writes it: within 4 machine epsilons of `d`, relative,
/// which covers the few roundings a constant goes through on the way (the literal, a
/// reciprocal `1/c`, a product of two or three constants), and nothing more. A constant
/// further off makes another function, however close to the fused op's (GELU with 0.7071 for
/// 1/√2 is 1e-5 off in f32, where a rounded 1/√2 is 6e-8 off), and must not fuse. Integer and
/// bool dtypes hold none of these constants.
pub fn close(a: f64, b: f64, d: DType) -> bool {
    let eps = match d {
        DType::F64 => f64::EPSILON,
        DType::F32 => f32::EPSILON as f64,
        DType::F16 => half::f16::EPSILON.to_f64(),
        DType::BF16 => half::bf16::EPSILON.to_f64(),
        DType::I32 | DType::I64 | DType::Bool => return false,
    };
    (a - b).abs() <= 4.0 * eps * b.abs()
}
