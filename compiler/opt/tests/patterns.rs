//! Text patterns over the e-graph language: attribute-free ops match exactly, ops with
//! attributes match any attributes (the extension point `docs/optimizer.md` describes).

use egg::{Pattern, Searcher};
use kiln_ir::{DType, Op, ReduceOp};
use kiln_opt::{KGraph, KNode};

#[test]
fn patterns_match_ops_and_attribute_wildcards() {
    let mut g = KGraph::default();
    let x = g.add(KNode::new(
        Op::Input { name: "x".into(), dtype: DType::F32, shape: kiln_ir::dims(&[2, 3]) },
        vec![],
    ));
    let sq = g.add(KNode::new(Op::Binary(kiln_ir::BinaryOp::Mul), vec![x, x]));
    let sum = g.add(KNode::new(Op::Reduce { op: ReduceOp::Sum, axes: vec![1], keepdims: true }, vec![sq]));
    g.rebuild();

    let square: Pattern<KNode> = "(mul ?a ?a)".parse().expect("parses");
    let found = square.search(&g);
    assert_eq!(found.len(), 1);
    assert_eq!(g.find(found[0].eclass), g.find(sq));

    let any_sum: Pattern<KNode> = "(reduce_sum (mul ?a ?b))".parse().expect("parses");
    let found = any_sum.search(&g);
    assert_eq!(found.len(), 1, "a wildcard op matches whatever its attributes");
    assert_eq!(g.find(found[0].eclass), g.find(sum));

    assert!("(no_such_op ?a)".parse::<Pattern<KNode>>().is_err());
    let none: Pattern<KNode> = "(add ?a ?b)".parse().expect("parses");
    assert!(none.search(&g).is_empty());
}
