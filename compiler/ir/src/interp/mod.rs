//! The reference interpreter: evaluates a [`Graph`] on concrete tensors.
//!
//! Every later stage (lowering passes, code generators, runtimes) is tested against it, so it
//! favours clear, fixed semantics over speed, while being fast enough to run a small BERT
//! encoder inside a debug test build (its kernels are typed loops, parallel with rayon where
//! the work is large, and the crate is compiled at `opt-level = 3` in dev builds).
//!
//! # Semantics
//!
//! The typing rules are those of [`infer`](mod@crate::infer); values follow numpy / PyTorch:
//!
//! * **Broadcasting**: binary ops, comparisons and `where` broadcast like numpy.
//! * **Floats** are IEEE: f32 computes in f32 and f64 in f64. **f16 and bf16** have no
//!   arithmetic of their own here: each operand is widened (exactly) to f32, the op is
//!   computed in f32, and the result is rounded back to nearest even.
//! * **Integers** wrap around on overflow (two's complement). Integer `div` truncates toward
//!   zero like C (`-7 / 2 == -3`, `7 / -2 == -3`); a zero divisor is an
//!   [`EvalError::IntDivByZero`], never a panic. `pow` is float only.
//! * Binary `max` / `min` propagate NaN like numpy `maximum` / `minimum`.
//! * `erf` uses `libm::erf` (f32 is evaluated in f64 and rounded); `sigmoid(x)` is
//!   `1 / (1 + exp(-x))`; `relu(x)` is `max(x, 0)` keeping NaN; `rsqrt(x)` is `1 / sqrt(x)`.
//! * `cast`: float → int truncates toward zero (saturating, NaN → 0), int → int wraps,
//!   anything → bool is `x != 0`, bool → number is 0 or 1.
//! * **Reductions** over sorted axes, with or without `keepdims`: float `sum`/`mean`
//!   accumulate in f64 (whatever the element type: f32, f16 and bf16 are widened) in
//!   row-major order and round once; a mean over zero elements is NaN. Integer sums wrap.
//!   `max`/`min` propagate NaN and are an [`EvalError::EmptyReduction`] over zero elements.
//! * **matmul**: numpy rules including 1-D promotion and batch broadcasting; f32
//!   accumulates in f32 (as PyTorch does on CPU), f64 in f64, integers wrap, f16/bf16
//!   accumulate in f32 and round once. Each output element sums over `k` in increasing order.
//! * **conv2d**: NCHW / OIHW, zero padding, stride, dilation, groups.
//!   **pool2d**: max pooling pads with -inf; average pooling excludes padding from the
//!   divisor (`count_include_pad=False`).
//! * **gather**: an index outside `0..extent` (negative ones included) is an
//!   [`EvalError::GatherIndex`].
//! * **scatter_add** (gather's adjoint): the result starts at zero and each update is added
//!   to the row its index names, position by position in row-major order, so every element
//!   sums in a fixed order; each addition rounds to the dtype (f16/bf16 add in f32 and round
//!   back, integers wrap). An index outside `0..extent` is an [`EvalError::ScatterIndex`].
//! * **random_uniform**: element `i` is [`rng::uniform`](crate::rng::uniform)`(seed, 0,
//!   offset + base + i)` rounded to nearest in the dtype (`base`: the i64 scalar operand
//!   taken as u64 when the op has one, else 0; the counter wraps); a value that rounds up to
//!   exactly 1.0 is replaced by the largest number below 1 of that dtype, so the range stays
//!   [0, 1).
//! * **iota**: the index along `axis`; **full** and **pad** convert their value like a cast
//!   from f64.
//! * **Fused ops** (softmax, log_softmax, layer_norm, rms_norm, gelu, attention, add_norm,
//!   matmul_epilogue) compute exactly their primitive form, step by step: f16/bf16 run in f32
//!   and round once, sums accumulate in f64 like the reductions, products in the compute type
//!   like matmul; an attention row whose scores are all −inf is NaN. See `fused.rs`.
//!
//! [`eval`] walks the graph in [`Graph::topo_order`], skips nodes that no output depends on,
//! and frees each intermediate as soon as its last user has run. Results are deterministic:
//! every output element is computed in a fixed order whatever the number of threads.

mod bind;
mod elem;
mod elementwise;
mod fused;
mod layout;
mod linalg;
mod reduce;
mod source;

use crate::dtype::{fmt_shape, numel, TensorType};
use crate::graph::{Graph, NodeId, Origin};
use crate::op::{NormKind, Op};
use crate::tensor::Tensor;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt::Write as _;

/// Values bound to a graph's inputs and parameters, by name.
#[derive(Clone, Debug, Default)]
pub struct Bindings {
    pub inputs: HashMap<String, Tensor>,
    pub params: HashMap<String, Tensor>,
}

/// Why a graph or an op could not be evaluated.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EvalError {
    /// Inputs or parameters of the graph that the bindings do not provide (all of them).
    #[error("missing {}: {}", plural(.kind, .missing.len()), list_missing(.missing))]
    Missing { kind: &'static str, missing: Vec<(String, TensorType)> },
    /// A bound tensor whose dtype or shape differs from the graph's declaration.
    #[error("{kind} `{name}`: expected {expected}, got {got}")]
    BindingType { kind: &'static str, name: String, expected: TensorType, got: TensorType },
    /// A bound or operand tensor whose buffer length does not match its shape.
    #[error("{what}: {len} elements do not fill shape {}", fmt_shape(.shape))]
    BadTensor { what: String, shape: Vec<usize>, len: usize },
    /// `input` and `param` read the bindings and cannot be evaluated by [`eval_op`].
    #[error("{kind} `{name}` is read from the bindings; evaluate the graph with `eval`")]
    Unbound { kind: &'static str, name: String },
    /// Operands that the typing rules reject (wrong count, dtype or shape).
    #[error(transparent)]
    Infer(#[from] crate::infer::InferError),
    /// Operands that do not fit the op, or a result type that is not the one inference gives.
    #[error("`{op}`: {msg}")]
    Operands { op: &'static str, msg: String },
    #[error("integer division by zero (divisor element {})", fmt_shape(.index))]
    IntDivByZero { index: Vec<usize> },
    #[error("gather index {index} at position {} of the indices is out of range for axis {axis} of extent {extent}", fmt_shape(.position))]
    GatherIndex { index: i64, position: Vec<usize>, axis: usize, extent: usize },
    #[error("scatter_add index {index} at position {} of the indices is out of range for axis {axis} of extent {extent}", fmt_shape(.position))]
    ScatterIndex { index: i64, position: Vec<usize>, axis: usize, extent: usize },
    #[error("`{op}` over zero elements of {} has no identity", fmt_shape(.shape))]
    EmptyReduction { op: &'static str, shape: Vec<usize> },
    /// Inputs whose extents do not bind the graph's symbols (`bind.rs`).
    #[error("{0}")]
    Symbol(String),
    #[error(transparent)]
    Specialize(#[from] crate::graph::SpecializeError),
    /// A result the system would not give memory for (a shape sized by a huge `--set`).
    #[error(transparent)]
    OutOfMemory(#[from] crate::alloc::AllocError),
    /// An error while evaluating one node of a graph.
    #[error("node %{node} ({op}{}): {source}", describe(.name, .origin))]
    AtNode {
        node: usize,
        op: &'static str,
        name: Option<String>,
        origin: Option<Origin>,
        source: Box<EvalError>,
    },
}

impl EvalError {
    /// The underlying error, without the [`EvalError::AtNode`] context.
    pub fn root(&self) -> &EvalError {
        match self {
            EvalError::AtNode { source, .. } => source.root(),
            e => e,
        }
    }
}

fn plural(kind: &str, n: usize) -> String {
    if n == 1 {
        kind.to_string()
    } else {
        format!("{n} {kind}s")
    }
}

fn list_missing(m: &[(String, TensorType)]) -> String {
    m.iter().map(|(n, t)| format!("`{n}` ({t})")).collect::<Vec<_>>().join(", ")
}

fn describe(name: &Option<String>, origin: &Option<Origin>) -> String {
    let mut s = String::new();
    if let Some(n) = name {
        let _ = write!(s, " `{n}`");
    }
    if let Some(o) = origin {
        let _ = write!(s, " at {o}");
    }
    s
}

/// The multi-index of flat position `pos` in a row-major `shape`.
pub(crate) fn unravel(mut pos: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = pos % shape[d];
            pos /= shape[d];
        }
    }
    idx
}

/// A node's result type with the static extents the kernels read (the interpreter runs
/// specialized graphs only).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StaticType {
    pub dtype: crate::dtype::DType,
    pub shape: Vec<usize>,
}

impl StaticType {
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

fn type_of(t: &Tensor) -> TensorType {
    TensorType::new(t.dtype(), t.shape.clone())
}

/// Evaluates one op on concrete operands. `ty` is the node's result type as inferred from
/// the operands' types; the operands are re-checked against the typing rules first, so a
/// mismatch is an error rather than a panic. `input` and `param` cannot be evaluated here
/// (they read [`Bindings`]); use [`eval`].
pub fn eval_op(op: &Op, args: &[&Tensor], ty: &TensorType) -> Result<Tensor, EvalError> {
    for (i, a) in args.iter().enumerate() {
        if a.data.len() != numel(&a.shape) {
            return Err(EvalError::BadTensor {
                what: format!("operand {i} of `{}`", op.name()),
                shape: a.shape.clone(),
                len: a.data.len(),
            });
        }
    }
    let types: Vec<TensorType> = args.iter().map(|a| type_of(a)).collect();
    let refs: Vec<&TensorType> = types.iter().collect();
    let inferred = crate::infer::infer(op, &refs)?;
    if &inferred != ty {
        return Err(EvalError::Operands {
            op: op.name(),
            msg: format!("the operands give a result of type {inferred}, not {ty}"),
        });
    }
    // The result's memory is asked for before the kernel runs, so a size the system refuses
    // is an error naming it rather than an abort inside the kernel.
    crate::alloc::check(&inferred, || {
        crate::alloc::describe(&format!("the result of `{}`,", op.name()), ty.dtype, &inferred.static_shape())
    })?;
    // The operands are tensors, so the inferred type, which equals `ty`, is static.
    let ty = &StaticType { dtype: inferred.dtype, shape: inferred.static_shape() };
    let a = |i: usize| args[i];
    match op {
        Op::Input { name, .. } => Err(EvalError::Unbound { kind: "input", name: name.clone() }),
        Op::Param { name, .. } => Err(EvalError::Unbound { kind: "param", name: name.clone() }),
        Op::Const { value } => {
            if value.data.len() != numel(&value.shape) {
                return Err(EvalError::BadTensor {
                    what: "const".into(),
                    shape: value.shape.clone(),
                    len: value.data.len(),
                });
            }
            Ok(value.clone())
        }
        Op::Full { value, dtype, .. } => Ok(source::full(*value, *dtype, &ty.shape)),
        Op::Iota { dtype, axis, .. } => Ok(source::iota(*dtype, &ty.shape, *axis)),
        Op::RandomUniform { dtype, seed, offset, base, .. } => {
            // The base (an i64 scalar, `infer` checked) is taken as u64: counters wrap, never
            // fail.
            let base = match args.first().map(|t| &t.data) {
                Some(crate::tensor::Buffer::I64(v)) if *base => v.first().copied().unwrap_or(0) as u64,
                _ => 0,
            };
            Ok(source::random_uniform(*dtype, &ty.shape, *seed, offset.wrapping_add(base)))
        }
        Op::Unary(u) => elementwise::unary(*u, a(0)),
        Op::Binary(b) => elementwise::binary(*b, a(0), a(1), ty),
        Op::Compare(c) => elementwise::compare(*c, a(0), a(1), ty),
        Op::Where => elementwise::select(a(0), a(1), a(2), ty),
        Op::Cast { to } => Ok(elementwise::cast(a(0), *to)),
        Op::Reduce { op: r, axes, .. } => reduce::reduce(*r, axes, a(0), ty),
        Op::Reshape { .. } => Ok(layout::reshape(a(0), ty)),
        Op::Transpose { perm } => Ok(layout::transpose(a(0), perm, ty)),
        Op::BroadcastTo { .. } => Ok(layout::broadcast_to(a(0), ty)),
        Op::Slice { axis, start, step, .. } => match start.as_const() {
            Some(start) => Ok(layout::slice(a(0), *axis, start, *step, ty)),
            None => Err(EvalError::Operands {
                op: op.name(),
                msg: format!("the slice starts at the symbolic {start}"),
            }),
        },
        Op::Concat { axis } => layout::concat(args, *axis, ty),
        Op::Pad { pads, value } => Ok(layout::pad(a(0), pads, *value, ty)),
        Op::Gather { axis } => layout::gather(a(0), a(1), *axis, ty),
        Op::ScatterAdd { axis, extent } => layout::scatter_add(a(0), a(1), *axis, *extent, ty),
        Op::MatMul => linalg::matmul(a(0), a(1), ty),
        Op::Conv2d { stride, padding, dilation, groups } => {
            linalg::conv2d(a(0), a(1), *stride, *padding, *dilation, *groups, ty)
        }
        Op::Pool2d { kind, kernel, stride, padding } => {
            linalg::pool2d(a(0), *kind, *kernel, *stride, *padding, ty)
        }
        Op::Softmax { axis } => fused::softmax(a(0), *axis, false, ty),
        Op::LogSoftmax { axis } => fused::softmax(a(0), *axis, true, ty),
        Op::LayerNorm { eps, .. } => fused::norm(args, NormKind::Layer, *eps, false, ty),
        Op::RmsNorm { eps, .. } => fused::norm(args, NormKind::Rms, *eps, false, ty),
        Op::AddNorm { eps, kind, .. } => fused::norm(args, *kind, *eps, true, ty),
        Op::Gelu { approx } => fused::gelu(a(0), *approx, ty),
        Op::Attention { scale, causal, .. } => fused::attention(args, *scale, *causal, ty),
        Op::AttentionLse { scale, causal, .. } => fused::attention_lse(args, *scale, *causal, ty),
        Op::MatMulEpilogue { activation, .. } => fused::matmul_epilogue(args, *activation, ty),
    }
}

/// Checks every `input` and `param` of the graph against the bindings: all missing names
/// are reported at once; a bound tensor must have exactly the declared dtype and shape.
fn check_bindings(g: &Graph, b: &Bindings) -> Result<(), EvalError> {
    let mut missing_inputs = Vec::new();
    let mut missing_params = Vec::new();
    for id in g.topo_order() {
        let node = g.node(id);
        let (kind, name, map, missing) = match &node.op {
            Op::Input { name, .. } => ("input", name, &b.inputs, &mut missing_inputs),
            Op::Param { name, .. } => ("param", name, &b.params, &mut missing_params),
            _ => continue,
        };
        match map.get(name) {
            None => missing.push((name.clone(), node.ty.clone())),
            Some(t) => {
                if t.data.len() != numel(&t.shape) {
                    return Err(EvalError::BadTensor {
                        what: format!("{kind} `{name}`"),
                        shape: t.shape.clone(),
                        len: t.data.len(),
                    });
                }
                let got = type_of(t);
                if got != node.ty {
                    return Err(EvalError::BindingType {
                        kind,
                        name: name.clone(),
                        expected: node.ty.clone(),
                        got,
                    });
                }
            }
        }
    }
    if !missing_inputs.is_empty() {
        return Err(EvalError::Missing { kind: "input", missing: missing_inputs });
    }
    if !missing_params.is_empty() {
        return Err(EvalError::Missing { kind: "param", missing: missing_params });
    }
    Ok(())
}

/// Evaluates the graph's outputs, in `g.outputs` order.
///
/// Every `input` is looked up in `b.inputs` by the op's name and every `param` in `b.params`
/// by its checkpoint name; missing names and wrong dtypes or shapes are reported before any
/// computation. Bound tensors are borrowed, not copied. Nodes that no output depends on are
/// skipped, and each intermediate is dropped as soon as its last user has run, so peak memory
/// is the live working set rather than the whole graph.
///
/// A graph with symbols is first specialized to the values its inputs' extents give
/// (`bind.rs`).
pub fn eval(g: &Graph, b: &Bindings) -> Result<Vec<(String, Tensor)>, EvalError> {
    if g.symbols.is_empty() {
        return eval_static(g, b);
    }
    let values = bind::symbols(g, b)?;
    eval_static(&g.specialize(&values)?, b)
}

fn eval_static(g: &Graph, b: &Bindings) -> Result<Vec<(String, Tensor)>, EvalError> {
    check_bindings(g, b)?;
    let order = g.topo_order();
    // Nodes some output depends on.
    let mut live: HashMap<NodeId, usize> = HashMap::new();
    let mut stack: Vec<NodeId> = g.outputs.iter().map(|(_, n)| *n).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(n) = stack.pop() {
        if seen.insert(n) {
            stack.extend(g.operands(n));
        }
    }
    // Remaining live users of each live node; outputs are pinned until the end.
    for &n in &order {
        if seen.contains(&n) {
            live.insert(n, g.users(n).into_iter().filter(|u| seen.contains(u)).count());
        }
    }
    let pinned: std::collections::HashSet<NodeId> = g.outputs.iter().map(|(_, n)| *n).collect();
    let mut values: HashMap<NodeId, Cow<'_, Tensor>> = HashMap::new();

    for &id in &order {
        if !seen.contains(&id) {
            continue;
        }
        let node = g.node(id);
        let value: Cow<'_, Tensor> = match &node.op {
            Op::Input { name, .. } => Cow::Borrowed(&b.inputs[name]),
            Op::Param { name, .. } => Cow::Borrowed(&b.params[name]),
            op => {
                let operands = g.operands(id);
                let args: Vec<&Tensor> = operands.iter().map(|o| values[o].as_ref()).collect();
                let out = eval_op(op, &args, &node.ty).map_err(|e| EvalError::AtNode {
                    node: id.index(),
                    op: op.name(),
                    name: node.name.clone(),
                    origin: node.origin.clone(),
                    source: Box::new(e),
                })?;
                // Free operands whose last user this was.
                let mut distinct = operands;
                distinct.sort_unstable();
                distinct.dedup();
                for o in distinct {
                    let left = live.get_mut(&o).expect("operand of a live node is live");
                    *left -= 1;
                    if *left == 0 && !pinned.contains(&o) {
                        values.remove(&o);
                    }
                }
                Cow::Owned(out)
            }
        };
        values.insert(id, value);
    }
    // Move each output out at its last mention (an output may be listed under two names).
    let mut results = Vec::with_capacity(g.outputs.len());
    for (i, (name, id)) in g.outputs.iter().enumerate() {
        let again = g.outputs[i + 1..].iter().any(|(_, later)| later == id);
        let t = if again {
            values[id].as_ref().clone()
        } else {
            values.remove(id).expect("output evaluated").into_owned()
        };
        results.push((name.clone(), t));
    }
    Ok(results)
}
