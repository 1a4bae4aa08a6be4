//! Gradient checking: central differences through the reference interpreter, and an f64
//! copy of a graph to run them on (f32 rounding would swamp the differences).
//!
//! These are the tools the gradient tests of every crate use; they are slow by design
//! (two evaluations of the whole graph per parameter element).

use crate::dtype::DType;
use crate::graph::Graph;
use crate::infer::InferError;
use crate::interp::{eval, Bindings, EvalError};
use crate::op::Op;
use crate::tensor::{Buffer, Tensor};
use std::collections::HashMap;

/// A copy of `g` in which every floating-point value is f64: inputs, parameters, constants,
/// fills, random numbers and casts to a float type. Integer and bool values are unchanged.
/// Names, origins, inputs and outputs carry over.
pub fn widen_to_f64(g: &Graph) -> Result<Graph, InferError> {
    let wide = |d: DType| if d.is_float() { DType::F64 } else { d };
    let mut out = Graph::new(g.name.clone());
    let mut map = HashMap::new();
    for n in g.topo_order() {
        let node = g.node(n);
        let op = match node.op.clone() {
            Op::Input { name, dtype, shape } => Op::Input { name, dtype: wide(dtype), shape },
            Op::Param { name, dtype, shape, init } => Op::Param { name, dtype: wide(dtype), shape, init },
            Op::Const { value } => Op::Const { value: value.cast(wide(value.dtype())) },
            Op::Full { value, dtype, shape } => Op::Full { value, dtype: wide(dtype), shape },
            Op::Iota { dtype, shape, axis } => Op::Iota { dtype: wide(dtype), shape, axis },
            Op::RandomUniform { dtype, shape, seed, offset, base } => {
                Op::RandomUniform { dtype: wide(dtype), shape, seed, offset, base }
            }
            Op::Cast { to } => Op::Cast { to: wide(to) },
            op @ (Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Where
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Concat { .. }
            | Op::Pad { .. }
            | Op::Gather { .. }
            | Op::ScatterAdd { .. }
            | Op::MatMul
            | Op::Conv2d { .. }
            | Op::Pool2d { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::RmsNorm { .. }
            | Op::Gelu { .. }
            | Op::Attention { .. }
            | Op::AttentionLse { .. }
            | Op::AddNorm { .. }
            | Op::MatMulEpilogue { .. }) => op,
        };
        let args: Vec<_> = g.operands(n).iter().map(|o| map[o]).collect();
        let id = out.add_at(op, &args, node.origin.clone())?;
        out.node_mut(id).name = node.name.clone();
        map.insert(n, id);
    }
    out.inputs = g.inputs.iter().map(|i| map[i]).collect();
    out.outputs = g.outputs.iter().map(|(name, n)| (name.clone(), map[n])).collect();
    Ok(out)
}

/// The gradient of the graph's output `loss` (one element) with respect to parameter
/// `param`, by central differences `(f(p + h) − f(p − h)) / 2h` on each element in turn,
/// as f64 values in the parameter's shape.
pub fn numeric_gradient(
    g: &Graph,
    loss: &str,
    b: &Bindings,
    param: &str,
    h: f64,
) -> Result<Tensor, EvalError> {
    let mut g = g.clone();
    let Some(out) = g.outputs.iter().find(|(n, _)| n == loss).cloned() else {
        return Err(EvalError::Operands { op: "numeric_gradient", msg: format!("no output `{loss}`") });
    };
    g.outputs = vec![out];
    let Some(p) = b.params.get(param) else {
        return Err(EvalError::Operands { op: "numeric_gradient", msg: format!("no parameter `{param}`") });
    };
    let base = p.to_f64_vec();
    let mut b = b.clone();
    let mut at = |values: &[f64]| -> Result<f64, EvalError> {
        let t = Tensor::new(p.shape.clone(), Buffer::from_f64(p.dtype(), values.iter().copied()))
            .map_err(|e| EvalError::Operands { op: "numeric_gradient", msg: e.to_string() })?;
        b.params.insert(param.to_string(), t);
        let r = eval(&g, &b)?;
        Ok(r[0].1.to_f64_vec()[0])
    };
    let mut grad = Vec::with_capacity(base.len());
    let mut v = base.clone();
    for i in 0..base.len() {
        v[i] = base[i] + h;
        let up = at(&v)?;
        v[i] = base[i] - h;
        let down = at(&v)?;
        v[i] = base[i];
        grad.push((up - down) / (2.0 * h));
    }
    Tensor::from_f64(p.shape.clone(), grad)
        .map_err(|e| EvalError::Operands { op: "numeric_gradient", msg: e.to_string() })
}
