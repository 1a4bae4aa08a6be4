//! Folding weight-only subgraphs once the parameters are bound: a node that reads only
//! parameters and constants (a `concat` of the q, k and v weights, a scaled or transposed
//! weight) is computed here, once, and becomes a parameter of its own, so a compiled model
//! does not compute it on every run.
//!
//! A node is folded when it computes something (not a view: reshape, transpose, slice and
//! broadcast stay views of whatever they read), everything it reads is weight-only, something
//! that is not weight-only (or a graph output, or a view) reads it, and its result is no
//! larger than the parameters and constants it is computed from (folding must not turn a
//! broadcast into stored copies).
//!
//! One view is folded too: a weight that matrix products read only as their B operand through
//! a transpose of its last two axes (`x · Wᵀ`, as PyTorch stores `Linear` weights) is stored
//! transposed, so the products read it row-major, contiguous along their columns. A GPU
//! product's tiles then read it in 16-byte vectors and may copy it asynchronously; a CPU
//! product packs its constant B either way. The weight it came from is no longer read, so
//! nothing grows.
//!
//! A target whose products read B best along k ([`ProductWeights::AlongK`]: TF32 warpgroup
//! products, which read TF32 operands only that way) asks for the opposite: such a transpose
//! stays a view of the weight as it is stored, and a folded value that products read only as
//! their B operand (the q, k and v weights concatenated along n) is stored transposed and read
//! through a transpose, contiguous along k.
//!
//! Persistent state (`Graph::state`: parameters that train) is never folded: its value
//! changes from one run to the next.

use crate::graph::{Graph, Node, NodeId};
use crate::interp::{eval_op, EvalError};
use crate::op::{Init, Op};
use crate::tensor::Tensor;
use petgraph::visit::EdgeRef;
use std::collections::{BTreeSet, HashMap};

/// What [`fold_weights`] did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Folded {
    /// The new parameters, by name, with the op that computed each.
    pub params: Vec<(String, String)>,
}

/// How the weights that matrix products read as their B operand (`[…, k, n]`) are best
/// stored for a target: row-major, contiguous along n (the CPU's packing, SIMT and `mma.sync`
/// tiles), or contiguous along k (`[…, n, k]`, read through a transpose).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProductWeights {
    #[default]
    RowMajor,
    AlongK,
}

/// Folds the weight-only subgraphs of `g` whose parameters are all in `params` (see the module
/// documentation), products' weights stored as `layout` says. Each folded node becomes an
/// `Op::Param` named `folded.<op>(<sources>)#<n>`, its value added to `params` (the graph
/// alone no longer says what it holds: its initializer is a placeholder); nodes left without
/// users are removed.
pub fn fold_weights(
    g: &mut Graph,
    params: &mut HashMap<String, Tensor>,
    layout: ProductWeights,
) -> Result<Folded, EvalError> {
    // State changes from run to run: it is never a weight to fold.
    let folds = foldable(g, |name| params.contains_key(name) && g.state_var(name).is_none(), layout);
    let mut values: HashMap<NodeId, Tensor> = HashMap::new();
    let mut folded = Folded::default();
    let mut stored_along_k = Vec::new();
    for (n, sources) in folds {
        evaluate(g, n, params, &mut values)?;
        let name = make_param(g, n, &sources, &mut folded, |name| params.contains_key(name));
        // `n` reads as a parameter from now on, so its computed value moves there.
        if let Some(value) = values.remove(&n) {
            params.insert(name, value);
        }
        if layout == ProductWeights::AlongK {
            stored_along_k.push(n);
        }
    }
    // Once every fold is done (none reads another's value any more), the values products read
    // only as B are stored transposed.
    for n in stored_along_k {
        if read_only_as_b(g, n) {
            let Op::Param { name, .. } = &g.node(n).op else { continue };
            let name = name.clone();
            if let Some(value) = params.remove(&name) {
                params.insert(name, store_transposed(g, n, &value)?);
            }
        }
    }
    if !folded.params.is_empty() {
        g.remove_dead();
    }
    Ok(folded)
}

/// Stores parameter node `n` (holding `value`) with its last two axes swapped and makes its
/// readers read it through a transpose; returns the stored value.
fn store_transposed(g: &mut Graph, n: NodeId, value: &Tensor) -> Result<Tensor, EvalError> {
    let r = g.ty(n).shape.len();
    let mut perm: Vec<usize> = (0..r).collect();
    perm.swap(r - 2, r - 1);
    let read = g.ty(n).clone();
    let mut ty = read.clone();
    ty.shape.swap(r - 2, r - 1);
    let stored = eval_op(&Op::Transpose { perm: perm.clone() }, &[value], &ty)?;
    let readers: Vec<_> = g
        .raw()
        .edges_directed(n, petgraph::Direction::Outgoing)
        .map(|e| (e.id(), e.target(), *e.weight()))
        .collect();
    for &(e, _, _) in &readers {
        g.raw_mut().remove_edge(e);
    }
    if let Op::Param { shape, .. } = &mut g.node_mut(n).op {
        shape.swap(r - 2, r - 1);
    }
    g.node_mut(n).ty = ty;
    // The view reads as the parameter read before: its type is the one the readers checked.
    let view = g.raw_mut().add_node(Node { op: Op::Transpose { perm }, ty: read, name: None, origin: None });
    g.raw_mut().add_edge(n, view, 0);
    for (_, reader, operand) in readers {
        g.raw_mut().add_edge(view, reader, operand);
    }
    Ok(stored)
}

/// Whether every reader of `n` (of two axes or more, of a size fixed now) is a matrix product
/// that reads it as its B operand, once, and `n` is no graph output.
fn read_only_as_b(g: &Graph, n: NodeId) -> bool {
    let users = g.users(n);
    !users.is_empty()
        && g.ty(n).shape.len() >= 2
        && g.ty(n).is_static()
        && !g.outputs.iter().any(|(_, o)| *o == n)
        && users.into_iter().all(|u| reads_as_b(g, u, n))
}

/// Whether `u` is a matrix product that reads `n` as its B operand and nowhere else.
fn reads_as_b(g: &Graph, u: NodeId, n: NodeId) -> bool {
    let operands = g.operands(u);
    matches!(g.node(u).op, Op::MatMul | Op::MatMulEpilogue { .. })
        && operands.get(1) == Some(&n)
        && operands.iter().filter(|&&o| o == n).count() == 1
}

/// What [`fold_weights`] does to the graph, without the values: every parameter counts as
/// bound, and the folded nodes become parameters that nothing binds. For showing what a
/// compile builds when the weights are not at hand (`kiln inspect`); the graph cannot run.
pub fn fold_weights_without_values(g: &mut Graph) -> Folded {
    let params: BTreeSet<String> = g.params().into_iter().map(|n| leaf_name(&g.node(n).op)).collect();
    let mut folded = Folded::default();
    for (n, sources) in foldable(g, |name| g.state_var(name).is_none(), ProductWeights::RowMajor) {
        make_param(g, n, &sources, &mut folded, |name| params.contains(name));
    }
    if !folded.params.is_empty() {
        g.remove_dead();
    }
    folded
}

/// The nodes to fold, in topological order, each with the leaves (parameters for which
/// `bound` holds, and constants) it is computed from. A value whose size is set at run time
/// (a `Full` of `[batch, hidden]`) is no leaf and is never folded: a parameter has one size.
fn foldable(
    g: &Graph,
    bound: impl Fn(&str) -> bool,
    layout: ProductWeights,
) -> Vec<(NodeId, BTreeSet<NodeId>)> {
    let order = g.topo_order();
    let mut sources: HashMap<NodeId, BTreeSet<NodeId>> = HashMap::new();
    for &n in &order {
        let leaf = match &g.node(n).op {
            Op::Param { name, .. } => bound(name),
            Op::Const { .. } | Op::Full { .. } | Op::Iota { .. } => g.ty(n).is_static(),
            Op::Input { .. } | Op::RandomUniform { .. } => false,
            _ => {
                let operands = g.operands(n);
                if !operands.is_empty() && operands.iter().all(|o| sources.contains_key(o)) {
                    let set = operands.iter().flat_map(|o| sources[o].iter().copied()).collect();
                    sources.insert(n, set);
                }
                continue;
            }
        };
        if leaf {
            sources.insert(n, BTreeSet::from([n]));
        }
    }
    let outputs: BTreeSet<NodeId> = g.outputs.iter().map(|(_, n)| *n).collect();
    let folds: Vec<NodeId> = order
        .into_iter()
        .filter(|n| {
            let op = &g.node(*n).op;
            let computes = (!op.is_leaf() && !is_view(op) && sources.contains_key(n) && g.ty(*n).is_static())
                || (layout == ProductWeights::RowMajor && product_weight_transposed(g, *n, &sources));
            let read_outside = outputs.contains(n)
                || g.users(*n).iter().any(|u| !sources.contains_key(u) || is_view(&g.node(*u).op));
            let source_elems: usize = sources.get(n).map_or(0, |s| s.iter().map(|l| g.ty(*l).numel()).sum());
            computes && read_outside && g.ty(*n).numel() <= source_elems
        })
        .collect();
    folds.into_iter().map(|n| (n, sources.remove(&n).unwrap_or_default())).collect()
}

/// Turns node `n` into a parameter (dropping its operand edges), names it and records it in
/// `folded`; `taken` says which names bound parameters already use. Returns the name.
fn make_param(
    g: &mut Graph,
    n: NodeId,
    sources: &BTreeSet<NodeId>,
    folded: &mut Folded,
    taken: impl Fn(&str) -> bool,
) -> String {
    let node = g.node(n);
    let names: Vec<String> = sources.iter().map(|l| leaf_name(&g.node(*l).op)).collect();
    let stem = format!("folded.{}({})", node.op.name(), names.join(","));
    // Numbered in order of folding; a number a bound parameter already uses is skipped.
    let name = (folded.params.len()..).map(|i| format!("{stem}#{i}")).find(|n| !taken(n)).unwrap_or(stem);
    folded.params.push((name.clone(), node.op.name().to_string()));
    let (dtype, shape) = (node.ty.dtype, node.ty.shape.clone());
    let incoming: Vec<_> = g.raw().edges_directed(n, petgraph::Direction::Incoming).map(|e| e.id()).collect();
    let raw = g.raw_mut();
    for e in incoming {
        raw.remove_edge(e);
    }
    g.node_mut(n).op = Op::Param { name: name.clone(), dtype, shape, init: Init::Zeros };
    name
}

/// Ops the scheduler turns into strided views of their operand rather than computing.
/// Whether `n` transposes the last two axes of a bound parameter that nothing else reads, for
/// matrix products that read it as their B operand and nothing else (see the module
/// documentation).
fn product_weight_transposed(g: &Graph, n: NodeId, sources: &HashMap<NodeId, BTreeSet<NodeId>>) -> bool {
    let Op::Transpose { perm } = &g.node(n).op else { return false };
    let r = perm.len();
    let last_two = r >= 2
        && perm[..r - 2].iter().enumerate().all(|(i, &p)| p == i)
        && perm[r - 2] == r - 1
        && perm[r - 1] == r - 2;
    let [w] = g.operands(n)[..] else { return false };
    let only_here = g.users(w) == [n] && !g.outputs.iter().any(|(_, o)| *o == w || *o == n);
    let weight = matches!(g.node(w).op, Op::Param { .. }) && sources.contains_key(&w) && g.ty(n).is_static();
    last_two && weight && only_here && g.users(n).into_iter().all(|u| reads_as_b(g, u, n))
}

fn is_view(op: &Op) -> bool {
    matches!(op, Op::Reshape { .. } | Op::Transpose { .. } | Op::Slice { .. } | Op::BroadcastTo { .. })
}

fn leaf_name(op: &Op) -> String {
    match op {
        Op::Param { name, .. } => name.clone(),
        other => other.name().to_string(),
    }
}

/// Computes weight-only node `n` into `values`, with whatever it reads that is not a
/// parameter (parameters are read from `params` where they are).
fn evaluate(
    g: &Graph,
    n: NodeId,
    params: &HashMap<String, Tensor>,
    values: &mut HashMap<NodeId, Tensor>,
) -> Result<(), EvalError> {
    if values.contains_key(&n) || matches!(g.node(n).op, Op::Param { .. }) {
        return Ok(());
    }
    let operands = g.operands(n);
    for &o in &operands {
        evaluate(g, o, params, values)?;
    }
    let value_of = |o: &NodeId| match &g.node(*o).op {
        Op::Param { name, .. } => &params[name],
        _ => &values[o],
    };
    let args: Vec<&Tensor> = operands.iter().map(value_of).collect();
    let node = g.node(n);
    let value = eval_op(&node.op, &args, &node.ty)?;
    values.insert(n, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interp::{eval, Bindings};
    use crate::op::BinaryOp;
    use crate::DType;

    fn input(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
        g.add(Op::Input { name: name.into(), dtype: DType::F32, shape: crate::dtype::dims(shape) }, &[])
            .unwrap()
    }

    fn param(g: &mut Graph, name: &str, shape: &[usize]) -> NodeId {
        let op = Op::Param {
            name: name.into(),
            dtype: DType::F32,
            shape: crate::dtype::dims(shape),
            init: Init::Zeros,
        };
        g.add(op, &[]).unwrap()
    }

    fn values(shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::from_f32(shape.to_vec(), (0..n).map(|i| (i as f32 * 0.37 + seed).sin()).collect()).unwrap()
    }

    fn params(list: &[(&str, &[usize])]) -> HashMap<String, Tensor> {
        list.iter().enumerate().map(|(i, (n, s))| (n.to_string(), values(s, i as f32))).collect()
    }

    /// Evaluates `g` on fixed inputs and `p`.
    fn run(g: &Graph, p: &HashMap<String, Tensor>, inputs: &[(&str, &[usize])]) -> Vec<(String, Tensor)> {
        let inputs = inputs.iter().map(|(n, s)| (n.to_string(), values(s, 9.0))).collect();
        eval(g, &Bindings { inputs, params: p.clone() }).unwrap()
    }

    fn ops(g: &Graph) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = g.topo_order().into_iter().map(|n| g.node(n).op.name()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn a_concat_of_weights_becomes_one_parameter() {
        let mut g = Graph::new("qkv");
        let x = input(&mut g, "x", &[3, 4]);
        let (wq, wk) = (param(&mut g, "wq", &[4, 5]), param(&mut g, "wk", &[4, 6]));
        let w = g.add(Op::Concat { axis: 1 }, &[wq, wk]).unwrap();
        let w2 = g.add(Op::Binary(BinaryOp::Mul), &[w, w]).unwrap();
        let y = g.add(Op::MatMul, &[x, w2]).unwrap();
        g.add_output("y", y);
        let mut p = params(&[("wq", &[4, 5]), ("wk", &[4, 6])]);
        let before = run(&g, &p, &[("x", &[3, 4])]);
        let folded = fold_weights(&mut g, &mut p, ProductWeights::RowMajor).unwrap();
        assert_eq!(folded.params.len(), 1, "{folded:?}");
        assert_eq!(folded.params[0].0, "folded.mul(wq,wk)#0");
        assert_eq!(ops(&g), ["input", "matmul", "param"]);
        assert_eq!(run(&g, &p, &[("x", &[3, 4])]), before);
    }

    /// A value sized at run time (an LSTM's zero state `[batch, 4]`) is neither folded nor a
    /// leaf of a fold: a parameter has one size. A static one beside it still folds.
    #[test]
    fn values_sized_at_run_time_are_not_folded() {
        use crate::dtype::Dim;
        let mut g = Graph::new("state");
        g.symbols = vec![crate::SymbolDecl { name: "batch".into(), min: 1, max: 8, hint: 2, multiple_of: 1 }];
        let batch = Dim::Sym(crate::SizeExpr::symbol(0, "batch"));
        let x = g
            .add(
                Op::Input { name: "x".into(), dtype: DType::F32, shape: vec![batch.clone(), Dim::Const(4)] },
                &[],
            )
            .unwrap();
        let zeros = Op::Full { dtype: DType::F32, shape: vec![batch, Dim::Const(4)], value: 0.0 };
        let h = g.add(zeros, &[]).unwrap();
        let w = param(&mut g, "w", &[4, 4]);
        let hw = g.add(Op::MatMul, &[h, w]).unwrap();
        let w2 = g.add(Op::Binary(BinaryOp::Mul), &[w, w]).unwrap();
        let xw = g.add(Op::MatMul, &[x, w2]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[hw, xw]).unwrap();
        g.add_output("y", y);
        let mut p = params(&[("w", &[4, 4])]);
        let folded = fold_weights(&mut g, &mut p, ProductWeights::RowMajor).unwrap();
        assert_eq!(folded.params, [("folded.mul(w)#0".to_string(), "mul".to_string())]);
        assert_eq!(ops(&g), ["add", "full", "input", "matmul", "matmul", "param", "param"]);
    }

    #[test]
    fn folding_without_values_gives_the_same_graph() {
        let build = || {
            let mut g = Graph::new("qkv");
            let x = input(&mut g, "x", &[3, 4]);
            let (wq, wk) = (param(&mut g, "wq", &[4, 5]), param(&mut g, "wk", &[4, 6]));
            let w = g.add(Op::Concat { axis: 1 }, &[wq, wk]).unwrap();
            let y = g.add(Op::MatMul, &[x, w]).unwrap();
            g.add_output("y", y);
            g
        };
        let (mut with, mut without) = (build(), build());
        let mut p = params(&[("wq", &[4, 5]), ("wk", &[4, 6])]);
        let folded = fold_weights(&mut with, &mut p, ProductWeights::RowMajor).unwrap();
        assert_eq!(fold_weights_without_values(&mut without), folded);
        assert_eq!(
            crate::print::to_text(&with, Default::default()),
            crate::print::to_text(&without, Default::default())
        );
    }

    #[test]
    fn views_inputs_randomness_and_growth_are_not_folded() {
        let mut g = Graph::new("kept");
        let x = input(&mut g, "x", &[3, 4]);
        let w = param(&mut g, "w", &[5, 4]);
        // A transposed weight that something besides a product's B reads stays a view of the
        // stored one.
        let wt = g.add(Op::Transpose { perm: vec![1, 0] }, &[w]).unwrap();
        let y = g.add(Op::MatMul, &[x, wt]).unwrap();
        let y = g.add(Op::MatMul, &[y, w]).unwrap();
        let y = g.add(Op::MatMul, &[y, wt]).unwrap();
        // A bias broadcast and then negated would be stored 3 times larger: kept.
        let b = param(&mut g, "b", &[5]);
        let bb = g.add(Op::BroadcastTo { shape: crate::dtype::dims(&[3, 5]) }, &[b]).unwrap();
        let nb = g.add(Op::Unary(crate::UnaryOp::Neg), &[bb]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[y, nb]).unwrap();
        // Random numbers are not weights; nor is a parameter the bindings lack.
        let r = g.add(
            Op::RandomUniform {
                dtype: DType::F32,
                shape: crate::dtype::dims(&[3, 5]),
                seed: 1,
                offset: 0,
                base: false,
            },
            &[],
        );
        let r = g.add(Op::Unary(crate::UnaryOp::Exp), &[r.unwrap()]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[y, r]).unwrap();
        let unbound = param(&mut g, "unbound", &[3, 5]);
        let u = g.add(Op::Unary(crate::UnaryOp::Exp), &[unbound]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[y, u]).unwrap();
        g.add_output("y", y);
        let mut p = params(&[("w", &[5, 4]), ("b", &[5])]);
        let count = g.node_count();
        assert_eq!(fold_weights(&mut g, &mut p, ProductWeights::RowMajor).unwrap(), Folded::default());
        assert_eq!(g.node_count(), count);
        assert_eq!(p.len(), 2);
    }

    /// `x · Wᵀ` with W read nowhere else: W is stored transposed (row-major for the
    /// product), the same values come out, and the graph no longer holds W or the transpose.
    /// A transpose that is not of the last two axes, or that is also read as an A operand,
    /// stays a view.
    #[test]
    fn a_weight_read_transposed_by_products_is_stored_as_they_read_it() {
        let mut g = Graph::new("linear");
        let x = input(&mut g, "x", &[3, 4]);
        let w = param(&mut g, "w", &[5, 4]);
        let wt = g.add(Op::Transpose { perm: vec![1, 0] }, &[w]).unwrap();
        let y = g.add(Op::MatMul, &[x, wt]).unwrap();
        let z = g.add(Op::MatMul, &[x, wt]).unwrap();
        let v = param(&mut g, "v", &[3, 4]);
        let vt = g.add(Op::Transpose { perm: vec![1, 0] }, &[v]).unwrap();
        let a = g.add(Op::MatMul, &[vt, x]).unwrap();
        let u = param(&mut g, "u", &[2, 4, 5]);
        let ut = g.add(Op::Transpose { perm: vec![2, 1, 0] }, &[u]).unwrap();
        let ur = g.add(Op::Reshape { shape: crate::dtype::dims(&[4, 10]) }, &[ut]).unwrap();
        let b = g.add(Op::MatMul, &[x, ur]);
        g.add_output("y", y);
        g.add_output("z", z);
        g.add_output("a", a);
        g.add_output("b", b.unwrap());
        let mut p = params(&[("w", &[5, 4]), ("v", &[3, 4]), ("u", &[2, 4, 5])]);
        let before = run(&g, &p, &[("x", &[3, 4])]);
        let folded = fold_weights(&mut g, &mut p, ProductWeights::RowMajor).unwrap();
        assert_eq!(folded.params, [("folded.transpose(w)#0".to_string(), "transpose".to_string())]);
        assert_eq!(p["folded.transpose(w)#0"].shape, [4, 5]);
        assert_eq!(
            ops(&g),
            [
                "input",
                "matmul",
                "matmul",
                "matmul",
                "matmul",
                "param",
                "param",
                "param",
                "reshape",
                "transpose",
                "transpose"
            ]
        );
        assert_eq!(run(&g, &p, &[("x", &[3, 4])]), before);
    }

    /// For a target whose products read B along k: `x · Wᵀ` keeps W as it is stored (`[n, k]`,
    /// read through the transpose), and the q and k weights concatenated along n are stored
    /// transposed (`[11, 4]`) and read through a transpose. A folded value that something
    /// besides a product's B reads (`u`, also an output) keeps its layout. The same values
    /// come out.
    #[test]
    fn products_that_read_b_along_k_get_their_weights_stored_so() {
        let mut g = Graph::new("along_k");
        let x = input(&mut g, "x", &[3, 4]);
        let w = param(&mut g, "w", &[5, 4]);
        let wt = g.add(Op::Transpose { perm: vec![1, 0] }, &[w]).unwrap();
        let y = g.add(Op::MatMul, &[x, wt]).unwrap();
        let (wq, wk) = (param(&mut g, "wq", &[5, 4]), param(&mut g, "wk", &[6, 4]));
        let tq = g.add(Op::Transpose { perm: vec![1, 0] }, &[wq]).unwrap();
        let tk = g.add(Op::Transpose { perm: vec![1, 0] }, &[wk]).unwrap();
        let qk = g.add(Op::Concat { axis: 1 }, &[tq, tk]).unwrap();
        let z = g.add(Op::MatMul, &[x, qk]).unwrap();
        let z = g.add(Op::MatMul, &[x, qk]).map(|z2| (z, z2)).unwrap();
        let (u1, u2) = (param(&mut g, "u1", &[4, 4]), param(&mut g, "u2", &[4, 4]));
        let u = g.add(Op::Binary(BinaryOp::Mul), &[u1, u2]).unwrap();
        let v = g.add(Op::MatMul, &[x, u]).unwrap();
        let v = g.add(Op::Binary(BinaryOp::Add), &[v, x]).unwrap();
        g.add_output("y", y);
        g.add_output("z", z.0);
        g.add_output("z2", z.1);
        g.add_output("v", v);
        g.add_output("u", u);
        let mut p =
            params(&[("w", &[5, 4]), ("wq", &[5, 4]), ("wk", &[6, 4]), ("u1", &[4, 4]), ("u2", &[4, 4])]);
        let before = run(&g, &p, &[("x", &[3, 4])]);
        let folded = fold_weights(&mut g, &mut p, ProductWeights::AlongK).unwrap();
        let names: Vec<&str> = folded.params.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["folded.concat(wq,wk)#0", "folded.mul(u1,u2)#1"]);
        assert_eq!(p["folded.concat(wq,wk)#0"].shape, [11, 4]);
        assert_eq!(p["folded.mul(u1,u2)#1"].shape, [4, 4]);
        assert_eq!(p["w"].shape, [5, 4]);
        assert_eq!(
            ops(&g),
            [
                "add",
                "input",
                "matmul",
                "matmul",
                "matmul",
                "matmul",
                "param",
                "param",
                "param",
                "transpose",
                "transpose"
            ]
        );
        assert_eq!(run(&g, &p, &[("x", &[3, 4])]), before);
    }

    #[test]
    fn trained_weights_are_not_folded_and_frozen_ones_still_are() {
        let build = || {
            let mut g = Graph::new("mixed");
            let x = input(&mut g, "x", &[3, 4]);
            let (frozen, trained) = (param(&mut g, "frozen", &[4, 5]), param(&mut g, "trained", &[4, 5]));
            let (f2, t2) = (
                g.add(Op::Binary(BinaryOp::Mul), &[frozen, frozen]).unwrap(),
                g.add(Op::Binary(BinaryOp::Mul), &[trained, trained]).unwrap(),
            );
            let w = g.add(Op::Binary(BinaryOp::Add), &[f2, t2]).unwrap();
            let y = g.add(Op::MatMul, &[x, w]).unwrap();
            g.add_output("y", y);
            g.declare_state("trained", crate::StateInit::Weights, None).unwrap();
            g
        };
        let mut g = build();
        let mut p = params(&[("frozen", &[4, 5]), ("trained", &[4, 5])]);
        let folded = fold_weights(&mut g, &mut p, ProductWeights::RowMajor).unwrap();
        assert_eq!(folded.params, [("folded.mul(frozen)#0".to_string(), "mul".to_string())]);
        assert_eq!(ops(&g), ["add", "input", "matmul", "mul", "param", "param"]);
        let mut without = build();
        assert_eq!(fold_weights_without_values(&mut without), folded);
    }

    #[test]
    fn a_weight_only_output_and_a_shared_subexpression_fold_once_each() {
        let mut g = Graph::new("shared");
        let x = input(&mut g, "x", &[2, 3]);
        let w = param(&mut g, "w", &[2, 3]);
        let c = g
            .add(Op::Full { value: 2.0, dtype: DType::F32, shape: crate::dtype::dims(&[2, 3]) }, &[])
            .unwrap();
        let s = g.add(Op::Binary(BinaryOp::Mul), &[w, c]).unwrap();
        let y = g.add(Op::Binary(BinaryOp::Add), &[x, s]).unwrap();
        g.add_output("y", y);
        g.add_output("scaled_weight", s);
        let mut p = params(&[("w", &[2, 3])]);
        let before = run(&g, &p, &[("x", &[2, 3])]);
        let folded = fold_weights(&mut g, &mut p, ProductWeights::RowMajor).unwrap();
        assert_eq!(folded.params, [("folded.mul(w,full)#0".to_string(), "mul".to_string())]);
        assert_eq!(run(&g, &p, &[("x", &[2, 3])]), before);
    }
}
