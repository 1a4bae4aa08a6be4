//! The cost model: estimated time of each node on a target.
//!
//! time = max(flops / peak, bytes moved / bandwidth) + a fixed per-kernel overhead. Every
//! node but a leaf, a `reshape` or a `slice` is a kernel that reads its operands and writes its
//! result; a fused node moves only its own inputs and output, which is why fusion wins. The
//! per-kernel overhead is also what makes one wide matmul cheaper than several narrow ones
//! over the same input (and the wide one reads that input once).
//!
//! `reshape` and `slice` are free because the scheduler makes them strided views of their
//! operand's buffer (no kernel, no copy). A node that depends on parameters and constants only
//! is free when the pipeline folds such subgraphs once, ahead of the runs
//! ([`TargetCost::folds_weights`]): `kiln compile` and `kiln run` do (`kiln_ir::fold_weights`
//! after binding the weights); elsewhere it is charged per run.

use kiln_ir::{Op, TensorType};
use serde::Serialize;

/// A target's throughput numbers, filled in by each backend.
#[derive(Clone, Debug, Serialize)]
pub struct TargetCost {
    pub name: String,
    /// Peak arithmetic throughput, flop/s.
    pub peak_flops: f64,
    /// Sustained memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Fixed cost of launching one kernel, seconds.
    pub kernel_overhead: f64,
    /// Whether the pipeline computes weight-only subgraphs (nodes that read only parameters
    /// and constants, such as a `concat` of weight matrices) once when the weights are bound,
    /// rather than on every run. kiln-sched and kiln-codegen compute every node they are
    /// given on every run, so `cpu_default` says no; a pipeline that calls
    /// `kiln_ir::fold_weights` between binding the weights and scheduling (the `kiln` CLI's
    /// `compile` and `run`) says yes.
    pub folds_weights: bool,
}

impl TargetCost {
    /// A 2-core x86-64 server CPU: ~234 GFLOP/s f32 FMA peak, ~20 GB/s.
    pub fn cpu_default() -> TargetCost {
        TargetCost {
            name: "cpu".into(),
            peak_flops: 234e9,
            bandwidth: 20e9,
            kernel_overhead: 1e-6,
            folds_weights: false,
        }
    }

    /// Estimated seconds for `op` with operand types `inputs` and result `out`.
    pub fn node_time(&self, op: &Op, inputs: &[&TensorType], out: &TensorType) -> f64 {
        if op.is_leaf() || matches!(op, Op::Reshape { .. } | Op::Slice { .. }) {
            return 0.0;
        }
        let flops = flops(op, inputs, out);
        let bytes = inputs.iter().map(|t| t.size_bytes()).sum::<usize>() + out.size_bytes();
        (flops / self.peak_flops).max(bytes as f64 / self.bandwidth) + self.kernel_overhead
    }

    /// What a reshape costs beyond `node_time`'s nothing when it merges an axis its operand, a
    /// broadcast, repeats (`reshape_copies_broadcast`): the scheduler reads a broadcast through
    /// stride-0 views, and such a reshape has no strides, so it is a copy of `out`.
    pub fn reshape_of_broadcast_time(&self, out: &TensorType) -> f64 {
        2.0 * out.size_bytes() as f64 / self.bandwidth + self.kernel_overhead
    }
}

/// Whether reshaping the result of `op` (operand `input`, result `mid`) to `out` is a copy:
/// `op` is a `broadcast_to` and the reshape merges an axis it repeats (extent 1 in `input`,
/// more in `mid`, stride 0) with an axis it does not repeat, of extent > 1, which no strides
/// express. Splitting a repeated axis, merging repeated axes together, or merging one with
/// unit axes (one key head shared by all query heads) stays a view. Static shapes (at the
/// hints); the input is taken as contiguous, as the scheduler's views of a fresh result are
/// (`kiln-sched`'s tests hold this to `StridedView::reshape`).
pub fn reshape_copies_broadcast(op: &Op, input: &TensorType, mid: &TensorType, out: &TensorType) -> bool {
    let (Op::BroadcastTo { .. }, Some(i), Some(m), Some(o)) = (
        op,
        kiln_ir::static_dims(&input.shape),
        kiln_ir::static_dims(&mid.shape),
        kiln_ir::static_dims(&out.shape),
    ) else {
        return false;
    };
    let lead = m.len().saturating_sub(i.len());
    let repeated = |a: usize| m[a] > 1 && (a < lead || i[a - lead] == 1);
    // Walk the groups of `mid`'s axes whose extents multiply to a run of `out`'s.
    let (mut a, mut b) = (0, 0);
    while a < m.len() {
        let (mut pm, mut po) = (m[a], o.get(b).copied().unwrap_or(1));
        let start = a;
        b += 1;
        while pm != po {
            if pm < po {
                a += 1;
                match m.get(a) {
                    Some(e) => pm *= e,
                    None => return false,
                }
            } else {
                match o.get(b) {
                    Some(e) => po *= e,
                    None => return false,
                }
                b += 1;
            }
        }
        let mut group = start..=a;
        if group.clone().any(repeated) && group.any(|x| m[x] > 1 && !repeated(x)) {
            return true;
        }
        a += 1;
    }
    false
}

/// Floating-point work of one node, counting a transcendental as several flops.
///
/// The types are static: a symbolic graph is costed at its symbols' hints
/// ([`TensorType::at`]).
pub fn flops(op: &Op, inputs: &[&TensorType], out: &TensorType) -> f64 {
    let n = out.numel() as f64;
    let input_n = inputs.first().map(|t| t.numel() as f64).unwrap_or(0.0);
    // A product of k-long dot products: 2·k flops per output element.
    let matmul = |a: &TensorType| 2.0 * n * a.static_shape().last().copied().unwrap_or(1) as f64;
    use kiln_ir::UnaryOp as U;
    match op {
        Op::Unary(U::Exp | U::Log | U::Tanh | U::Erf | U::Sin | U::Cos | U::Sigmoid) => 10.0 * n,
        Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Cast { .. } => n,
        Op::Reduce { .. } => input_n,
        // One addition per update element.
        Op::ScatterAdd { .. } => input_n,
        Op::MatMul => matmul(inputs[0]),
        Op::Conv2d { .. } => {
            let w = &inputs[1].static_shape();
            2.0 * n * (w[1] * w[2] * w[3]) as f64
        }
        Op::Pool2d { kernel, .. } => n * (kernel[0] * kernel[1]) as f64,
        Op::Softmax { .. } | Op::LogSoftmax { .. } => 14.0 * n,
        Op::LayerNorm { .. } | Op::RmsNorm { .. } | Op::AddNorm { .. } => 8.0 * n,
        Op::Gelu { .. } => 20.0 * n,
        Op::Attention { .. } => {
            let (q, k, v) = (inputs[0], inputs[1], inputs[2]);
            let sk = k.static_shape()[k.rank() - 2] as f64;
            let d = q.static_shape()[q.rank() - 1] as f64;
            let dv = v.static_shape()[v.rank() - 1] as f64;
            let rows = (q.numel() as f64) / d;
            rows * sk * (2.0 * d + 2.0 * dv + 14.0)
        }
        Op::AttentionLse { .. } => {
            let (q, k) = (inputs[0], inputs[1]);
            let sk = k.static_shape()[k.rank() - 2] as f64;
            let d = q.static_shape()[q.rank() - 1] as f64;
            let rows = (q.numel() as f64) / d;
            rows * sk * (2.0 * d + 14.0)
        }
        Op::MatMulEpilogue { .. } => matmul(inputs[0]) + 10.0 * n,
        _ => 0.0,
    }
}

/// Whether an op computes the same value on every run when its operands do: everything but
/// the run's inputs and random draws.
pub fn is_run_invariant(op: &Op) -> bool {
    !matches!(op, Op::Input { .. } | Op::RandomUniform { .. })
}

/// The estimated time of a whole graph: the sum of its nodes (weight-only nodes free when the
/// target folds them), with every symbol at its hint.
pub fn graph_time(g: &kiln_ir::Graph, target: &TargetCost) -> f64 {
    let hints: Vec<i64> = g.symbols.iter().map(|s| s.hint).collect();
    let mut weight_only: std::collections::HashMap<kiln_ir::NodeId, bool> = Default::default();
    let mut total = 0.0;
    for id in g.topo_order() {
        let op = &g.node(id).op;
        let operands = g.operands(id);
        let folded = is_run_invariant(op) && operands.iter().all(|o| weight_only[o]);
        weight_only.insert(id, folded);
        if folded && target.folds_weights {
            continue;
        }
        let types: Vec<TensorType> = operands.iter().map(|o| g.ty(*o).at(&hints)).collect();
        let types: Vec<&TensorType> = types.iter().collect();
        let out = g.ty(id).at(&hints);
        total += target.node_time(op, &types, &out);
        if let (Op::Reshape { .. }, [x]) = (op, &operands[..]) {
            let x_operands = g.operands(*x);
            let x_in = x_operands.first().map(|o| g.ty(*o).at(&hints));
            if x_in.is_some_and(|t| reshape_copies_broadcast(&g.node(*x).op, &t, types[0], &out)) {
                total += target.reshape_of_broadcast_time(&out);
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::DType;

    fn t(shape: &[usize]) -> TensorType {
        TensorType::new(DType::F32, kiln_ir::dims(shape))
    }

    #[test]
    fn a_reshape_copies_a_broadcast_only_where_it_merges_a_repeated_axis() {
        let b = Op::BroadcastTo { shape: vec![] };
        // Grouped-query keys: 2 heads repeated 3 times, merged into 6 heads.
        assert!(reshape_copies_broadcast(&b, &t(&[2, 2, 1, 7, 8]), &t(&[2, 2, 3, 7, 8]), &t(&[2, 6, 7, 8])));
        // One key head shared by all: the merge is with a unit axis, a stride-0 view.
        assert!(!reshape_copies_broadcast(&b, &t(&[2, 1, 1, 7, 8]), &t(&[2, 1, 3, 7, 8]), &t(&[2, 3, 7, 8])));
        // Merging only axes that are not repeated, or splitting a repeated one.
        assert!(!reshape_copies_broadcast(
            &b,
            &t(&[2, 2, 1, 7, 8]),
            &t(&[2, 2, 3, 7, 8]),
            &t(&[2, 2, 3, 56])
        ));
        assert!(!reshape_copies_broadcast(&b, &t(&[1, 8]), &t(&[6, 8]), &t(&[2, 3, 8])));
        // Two repeated axes merged: still stride 0 throughout.
        assert!(!reshape_copies_broadcast(&b, &t(&[1, 1, 8]), &t(&[2, 3, 8]), &t(&[6, 8])));
        // A repeated leading axis (rank grows) merged with the next.
        assert!(reshape_copies_broadcast(&b, &t(&[5]), &t(&[4, 5]), &t(&[20])));
        // Not a broadcast, or shapes that do not line up: no charge.
        assert!(!reshape_copies_broadcast(
            &Op::Unary(kiln_ir::UnaryOp::Neg),
            &t(&[4, 5]),
            &t(&[4, 5]),
            &t(&[20])
        ));
        assert!(!reshape_copies_broadcast(&b, &t(&[1, 5]), &t(&[4, 5]), &t(&[7])));
    }
}
