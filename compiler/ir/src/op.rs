//! The op table: every primitive tensor op of the IR, with its attributes, and the fused ops
//! (softmax, layer norm, attention, …) that the optimizer forms from patterns of primitives.
//!
//! The set is closed (an enum) so that inference, the interpreter, the printers and later the
//! e-graph language all match on it exhaustively: adding an op makes rustc list every place
//! that has to learn about it.

use crate::dtype::{DType, Dim, Shape};
use crate::tensor::Tensor;
use serde::Serialize;
use std::fmt;

/// Elementwise ops of one operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Recip,
    Tanh,
    Erf,
    Sin,
    Cos,
    Sigmoid,
    Relu,
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 13] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Tanh,
        UnaryOp::Erf,
        UnaryOp::Sin,
        UnaryOp::Cos,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
    ];

    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Erf => "erf",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
        }
    }

    /// Whether the op is only defined on floating-point values (exp, log, …).
    pub fn float_only(self) -> bool {
        !matches!(self, UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Relu)
    }
}

/// Elementwise arithmetic ops of two operands, with numpy broadcasting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] = [
        BinaryOp::Add,
        BinaryOp::Sub,
        BinaryOp::Mul,
        BinaryOp::Div,
        BinaryOp::Pow,
        BinaryOp::Max,
        BinaryOp::Min,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
        }
    }
}

/// Elementwise comparisons; the result is `bool`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum CompareOp {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl CompareOp {
    pub const ALL: [CompareOp; 6] =
        [CompareOp::Lt, CompareOp::Le, CompareOp::Gt, CompareOp::Ge, CompareOp::Eq, CompareOp::Ne];

    pub fn name(self) -> &'static str {
        match self {
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
        }
    }
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
}

impl ReduceOp {
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
        }
    }
}

/// The two 2-D pooling kinds (NCHW).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum PoolKind {
    Max,
    Avg,
}

/// The two forms of GELU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum GeluApprox {
    /// `½x(1 + erf(x/√2))`, PyTorch's `GELU()`.
    Erf,
    /// `½x(1 + tanh(√(2/π)(x + 0.044715x³)))`, PyTorch's `GELU(approximate="tanh")`.
    Tanh,
}

impl GeluApprox {
    pub fn name(self) -> &'static str {
        match self {
            GeluApprox::Erf => "erf",
            GeluApprox::Tanh => "tanh",
        }
    }
}

/// The normalization an [`Op::AddNorm`] applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum NormKind {
    /// Layer normalization: `(x − mean) / √(var + eps)`.
    Layer,
    /// RMS normalization: `x / √(mean(x²) + eps)`.
    Rms,
}

impl NormKind {
    pub fn name(self) -> &'static str {
        match self {
            NormKind::Layer => "layer",
            NormKind::Rms => "rms",
        }
    }
}

/// The activation an [`Op::MatMulEpilogue`] applies after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum Activation {
    None,
    Relu,
    Gelu(GeluApprox),
    Sigmoid,
    Tanh,
    /// `x · sigmoid(x)` (SiLU, swish): the gate of a SwiGLU feed-forward.
    Silu,
}

impl Activation {
    pub const ALL: [Activation; 7] = [
        Activation::None,
        Activation::Relu,
        Activation::Gelu(GeluApprox::Erf),
        Activation::Gelu(GeluApprox::Tanh),
        Activation::Sigmoid,
        Activation::Tanh,
        Activation::Silu,
    ];

    /// The name as printed and as written in the model language.
    pub fn name(self) -> &'static str {
        match self {
            Activation::None => "none",
            Activation::Relu => "relu",
            Activation::Gelu(GeluApprox::Erf) => "gelu",
            Activation::Gelu(GeluApprox::Tanh) => "gelu_tanh",
            Activation::Sigmoid => "sigmoid",
            Activation::Tanh => "tanh",
            Activation::Silu => "silu",
        }
    }
}

/// How a parameter is initialized when no weights file provides it.
///
/// Fan-in and fan-out follow PyTorch's convention: for a shape `[o, i, k…]`,
/// fan_in = i·∏k and fan_out = o·∏k; a 1-D shape has fan_in = fan_out = its length.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    Normal { mean: f64, std: f64 },
    Uniform { low: f64, high: f64 },
    XavierUniform { gain: f64 },
    XavierNormal { gain: f64 },
    KaimingUniform { gain: f64 },
    KaimingNormal { gain: f64 },
}

impl fmt::Display for Init {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Init::Zeros => write!(f, "zeros"),
            Init::Ones => write!(f, "ones"),
            Init::Constant(v) => write!(f, "constant({v})"),
            Init::Normal { mean, std } => write!(f, "normal({mean}, {std})"),
            Init::Uniform { low, high } => write!(f, "uniform({low}, {high})"),
            Init::XavierUniform { gain } => write!(f, "xavier_uniform({gain})"),
            Init::XavierNormal { gain } => write!(f, "xavier_normal({gain})"),
            Init::KaimingUniform { gain } => write!(f, "kaiming_uniform({gain})"),
            Init::KaimingNormal { gain } => write!(f, "kaiming_normal({gain})"),
        }
    }
}

/// One op: a primitive, or a fused op that stands for a pattern of primitives. Attributes that decide the result type (a reshape's target shape, a
/// cast's dtype) live in the op, so an op and the types of its operands determine its result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Op {
    /// A graph input, bound by name at run time.
    Input {
        name: String,
        dtype: DType,
        shape: Shape,
    },
    /// A trainable parameter, bound by its checkpoint name.
    Param {
        name: String,
        dtype: DType,
        shape: Shape,
        init: Init,
    },
    /// A literal tensor.
    Const {
        value: Tensor,
    },
    /// A tensor filled with one value.
    Full {
        value: f64,
        dtype: DType,
        shape: Shape,
    },
    /// `out[..., i, ...] = i` along `axis`.
    Iota {
        dtype: DType,
        shape: Shape,
        axis: usize,
    },
    /// Counter-based uniform random numbers in [0, 1): element `i` is a pure function of
    /// (seed, offset + i), so a graph evaluates the same way every time. With `base`, operand
    /// 0 (an i64 scalar, taken as u64) is added to every counter: a train step passes a
    /// multiple of its step count, so each step draws new numbers and step `t` always draws
    /// the same ones.
    RandomUniform {
        dtype: DType,
        shape: Shape,
        seed: u64,
        offset: u64,
        base: bool,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    Compare(CompareOp),
    /// `where(cond, a, b)`, broadcasting all three.
    Where,
    Cast {
        to: DType,
    },
    /// Reduce over `axes` (sorted, unique); `keepdims` keeps them as extent 1.
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
        keepdims: bool,
    },
    /// Same elements in row-major order, new shape.
    Reshape {
        shape: Shape,
    },
    /// `out.shape[i] = in.shape[perm[i]]`.
    Transpose {
        perm: Vec<usize>,
    },
    BroadcastTo {
        shape: Shape,
    },
    /// Elements `start, start+step, … < end` along `axis`.
    Slice {
        axis: usize,
        start: Dim,
        end: Dim,
        step: usize,
    },
    Concat {
        axis: usize,
    },
    /// Pads each axis with `(before, after)` copies of `value`.
    Pad {
        pads: Vec<(usize, usize)>,
        value: f64,
    },
    /// `gather(table, indices)`: the result shape is `table.shape[..axis] ++ indices.shape ++
    /// table.shape[axis+1..]` (an embedding lookup is axis 0).
    Gather {
        axis: usize,
    },
    /// `scatter_add(updates, indices)`, the adjoint of `gather` along `axis` into a table of
    /// `extent` rows: operands `[updates, indices]`, updates shaped `pre ++ indices.shape ++
    /// post`; the result `pre ++ [extent] ++ post` is zero, then `out[.., indices[p], ..] +=
    /// updates[.., p, ..]` for each index position `p` in row-major order.
    ScatterAdd {
        axis: usize,
        extent: usize,
    },
    /// Batched matrix product with numpy rules (1-D operands are promoted and squeezed).
    MatMul,
    /// NCHW input, OIHW weight (`I = C / groups`).
    Conv2d {
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    },
    /// NCHW pooling; padding counts as -inf for max and is excluded from the average.
    Pool2d {
        kind: PoolKind,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
    },

    // Fused ops: each is one op for a pattern of primitives that the optimizer recognizes
    // (and the model language can call directly). Float dtypes only. The exact semantics,
    // and the primitive form each one equals, are in the header of `interp/fused.rs`.
    /// `exp(x − max) / Σ exp(x − max)` along `axis`; operands `[x]`.
    Softmax {
        axis: usize,
    },
    /// `x − max − log Σ exp(x − max)` along `axis`; operands `[x]`.
    LogSoftmax {
        axis: usize,
    },
    /// `(x − mean) / √(var + eps)` over the last axis (population variance), then `· gamma +
    /// beta` when `affine`; operands `[x]` or `[x, gamma, beta]`, gamma and beta `[x.shape[-1]]`.
    LayerNorm {
        eps: f64,
        affine: bool,
    },
    /// `x / √(mean(x²) + eps)` over the last axis, then `· gamma` when `affine`; operands `[x]`
    /// or `[x, gamma]`, gamma `[x.shape[-1]]`.
    RmsNorm {
        eps: f64,
        affine: bool,
    },
    /// GELU, elementwise; operands `[x]`.
    Gelu {
        approx: GeluApprox,
    },
    /// `softmax(q·kᵀ·scale + mask) · v` with `causal` hiding the entries `j > i`; operands
    /// `[q, k, v]` or `[q, k, v, mask]` (`masked`): q `[…, Sq, D]`, k `[…, Sk, D]`,
    /// v `[…, Sk, Dv]` with equal batch axes, an additive mask broadcasting to `[…, Sq, Sk]`;
    /// the result is `[…, Sq, Dv]`.
    Attention {
        scale: f64,
        causal: bool,
        masked: bool,
    },
    /// The log-sum-exp of attention's scores per query row, `log Σⱼ exp(s)` with
    /// `s = q·kᵀ·scale + mask` (causal entries `j > i` left out): the statistic the forward
    /// attention keeps anyway, from which its backward recomputes the probabilities as
    /// `exp(s − lse)`. Operands `[q, k]` or `[q, k, mask]` (`masked`) as for [`Op::Attention`];
    /// the result is `[…, Sq]`.
    AttentionLse {
        scale: f64,
        causal: bool,
        masked: bool,
    },
    /// `norm(a + b)` over the last axis, a and b broadcasting; operands `[a, b]`, plus
    /// `[gamma, beta]` (layer) or `[gamma]` (rms) when `affine`.
    AddNorm {
        eps: f64,
        kind: NormKind,
        affine: bool,
    },
    /// `activation(matmul(a, b) + bias)`; operands `[a, b]` or `[a, b, bias]` (`bias`), the bias
    /// broadcasting to the product's shape.
    MatMulEpilogue {
        bias: bool,
        activation: Activation,
    },
}

impl Op {
    /// The op's name as printed and as documented.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Param { .. } => "param",
            Op::Const { .. } => "const",
            Op::Full { .. } => "full",
            Op::Iota { .. } => "iota",
            Op::RandomUniform { .. } => "random_uniform",
            Op::Unary(u) => u.name(),
            Op::Binary(b) => b.name(),
            Op::Compare(c) => c.name(),
            Op::Where => "where",
            Op::Cast { .. } => "cast",
            Op::Reduce { op, .. } => match op {
                ReduceOp::Sum => "reduce_sum",
                ReduceOp::Mean => "reduce_mean",
                ReduceOp::Max => "reduce_max",
                ReduceOp::Min => "reduce_min",
            },
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::BroadcastTo { .. } => "broadcast_to",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Pad { .. } => "pad",
            Op::Gather { .. } => "gather",
            Op::ScatterAdd { .. } => "scatter_add",
            Op::MatMul => "matmul",
            Op::Conv2d { .. } => "conv2d",
            Op::Pool2d { kind, .. } => match kind {
                PoolKind::Max => "max_pool2d",
                PoolKind::Avg => "avg_pool2d",
            },
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Gelu { .. } => "gelu",
            Op::Attention { .. } => "attention",
            Op::AttentionLse { .. } => "attention_lse",
            Op::AddNorm { .. } => "add_norm",
            Op::MatMulEpilogue { .. } => "matmul_epilogue",
        }
    }

    /// Number of operands the op takes; `None` for variadic ops (concat). Fused ops whose
    /// optional operands are switched on by a flag (`affine`, `masked`, `bias`) give the count
    /// those flags imply.
    pub fn arity(&self) -> Option<usize> {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Full { .. } | Op::Iota { .. } => {
                Some(0)
            }
            Op::RandomUniform { base, .. } => Some(usize::from(*base)),
            Op::Unary(_)
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Reshape { .. }
            | Op::Transpose { .. }
            | Op::BroadcastTo { .. }
            | Op::Slice { .. }
            | Op::Pad { .. }
            | Op::Pool2d { .. } => Some(1),
            Op::Binary(_)
            | Op::Compare(_)
            | Op::Gather { .. }
            | Op::ScatterAdd { .. }
            | Op::MatMul
            | Op::Conv2d { .. } => Some(2),
            Op::Where => Some(3),
            Op::Concat { .. } => None,
            Op::Softmax { .. } | Op::LogSoftmax { .. } | Op::Gelu { .. } => Some(1),
            Op::LayerNorm { affine, .. } => Some(if *affine { 3 } else { 1 }),
            Op::RmsNorm { affine, .. } => Some(if *affine { 2 } else { 1 }),
            Op::Attention { masked, .. } => Some(if *masked { 4 } else { 3 }),
            Op::AttentionLse { masked, .. } => Some(if *masked { 3 } else { 2 }),
            Op::AddNorm { kind, affine, .. } => Some(
                2 + match (affine, kind) {
                    (false, _) => 0,
                    (true, NormKind::Layer) => 2,
                    (true, NormKind::Rms) => 1,
                },
            ),
            Op::MatMulEpilogue { bias, .. } => Some(if *bias { 3 } else { 2 }),
        }
    }

    /// Whether the op is one of the fused ops (softmax, log_softmax, layer_norm, rms_norm,
    /// gelu, attention, attention_lse, add_norm, matmul_epilogue) that stand for a pattern of primitives.
    pub fn is_fused(&self) -> bool {
        matches!(
            self,
            Op::Softmax { .. }
                | Op::LogSoftmax { .. }
                | Op::LayerNorm { .. }
                | Op::RmsNorm { .. }
                | Op::Gelu { .. }
                | Op::Attention { .. }
                | Op::AttentionLse { .. }
                | Op::AddNorm { .. }
                | Op::MatMulEpilogue { .. }
        )
    }

    /// Whether each element of the result depends only on the elements at the same
    /// (broadcast) position of the operands: unary, binary, compare, where, cast and gelu.
    /// Such ops can be fused into one loop by a scheduler.
    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::Cast { .. } | Op::Gelu { .. }
        )
    }

    /// Whether the op is a leaf that carries data rather than computing it.
    pub fn is_leaf(&self) -> bool {
        self.arity() == Some(0)
    }

    /// The extents among the attributes (shapes of sources, reshape and broadcast targets,
    /// slice bounds), the ones a symbol can size.
    pub fn dims(&self) -> Vec<Dim> {
        if let Op::Const { .. } = self {
            return vec![];
        }
        self.clone().dims_mut().into_iter().map(|d| d.clone()).collect()
    }

    /// The extents among the attributes, to substitute symbols in.
    pub fn dims_mut(&mut self) -> Vec<&mut Dim> {
        match self {
            Op::Input { shape, .. }
            | Op::Param { shape, .. }
            | Op::Full { shape, .. }
            | Op::Iota { shape, .. }
            | Op::RandomUniform { shape, .. }
            | Op::Reshape { shape }
            | Op::BroadcastTo { shape } => shape.iter_mut().collect(),
            Op::Slice { start, end, .. } => vec![start, end],
            Op::Const { .. }
            | Op::Unary(_)
            | Op::Binary(_)
            | Op::Compare(_)
            | Op::Where
            | Op::Cast { .. }
            | Op::Reduce { .. }
            | Op::Transpose { .. }
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
            | Op::MatMulEpilogue { .. } => vec![],
        }
    }

    /// The op's attributes as `key = value` pairs, for the printers.
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        use crate::dtype::fmt_shape;
        fn list<T: fmt::Display>(v: &[T]) -> String {
            fmt_shape(v)
        }
        match self {
            Op::Input { name, .. } => vec![("name", format!("{name:?}"))],
            Op::Param { name, init, .. } => {
                vec![("name", format!("{name:?}")), ("init", init.to_string())]
            }
            Op::Const { value } => vec![("value", value.summary(8))],
            Op::Full { value, .. } => vec![("value", fmt_f64(*value))],
            Op::Iota { axis, .. } => vec![("axis", axis.to_string())],
            Op::RandomUniform { seed, offset, base, .. } => {
                let mut attrs = vec![("seed", seed.to_string()), ("offset", offset.to_string())];
                if *base {
                    attrs.push(("base", "operand 0".to_string()));
                }
                attrs
            }
            Op::Unary(_) | Op::Binary(_) | Op::Compare(_) | Op::Where | Op::MatMul => vec![],
            Op::Cast { to } => vec![("to", to.to_string())],
            Op::Reduce { axes, keepdims, .. } => {
                vec![("axes", list(axes)), ("keepdims", keepdims.to_string())]
            }
            Op::Reshape { shape } => vec![("shape", list(shape))],
            Op::Transpose { perm } => vec![("perm", list(perm))],
            Op::BroadcastTo { shape } => vec![("shape", list(shape))],
            Op::Slice { axis, start, end, step } => vec![
                ("axis", axis.to_string()),
                ("start", start.to_string()),
                ("end", end.to_string()),
                ("step", step.to_string()),
            ],
            Op::Concat { axis } | Op::Gather { axis } => vec![("axis", axis.to_string())],
            Op::ScatterAdd { axis, extent } => {
                vec![("axis", axis.to_string()), ("extent", extent.to_string())]
            }
            Op::Pad { pads, value } => {
                let p: Vec<String> = pads.iter().map(|(a, b)| format!("({a}, {b})")).collect();
                vec![("pads", format!("[{}]", p.join(", "))), ("value", fmt_f64(*value))]
            }
            Op::Conv2d { stride, padding, dilation, groups } => vec![
                ("stride", list(stride)),
                ("padding", list(padding)),
                ("dilation", list(dilation)),
                ("groups", groups.to_string()),
            ],
            Op::Pool2d { kernel, stride, padding, .. } => {
                vec![("kernel", list(kernel)), ("stride", list(stride)), ("padding", list(padding))]
            }
            Op::Softmax { axis } | Op::LogSoftmax { axis } => vec![("axis", axis.to_string())],
            Op::LayerNorm { eps, affine } | Op::RmsNorm { eps, affine } => {
                vec![("eps", fmt_f64(*eps)), ("affine", affine.to_string())]
            }
            Op::Gelu { approx } => vec![("approx", approx.name().to_string())],
            Op::Attention { scale, causal, masked } | Op::AttentionLse { scale, causal, masked } => vec![
                ("scale", fmt_f64(*scale)),
                ("causal", causal.to_string()),
                ("masked", masked.to_string()),
            ],
            Op::AddNorm { eps, kind, affine } => vec![
                ("kind", kind.name().to_string()),
                ("eps", fmt_f64(*eps)),
                ("affine", affine.to_string()),
            ],
            Op::MatMulEpilogue { bias, activation } => {
                vec![("bias", bias.to_string()), ("activation", activation.name().to_string())]
            }
        }
    }
}

/// Formats a float so that it reads back exactly and prints integers without noise.
pub fn fmt_f64(v: f64) -> String {
    if v.is_infinite() {
        if v > 0.0 {
            "inf".into()
        } else {
            "-inf".into()
        }
    } else {
        format!("{v:?}")
    }
}
