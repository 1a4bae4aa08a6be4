//! The op catalog of the model language: every op's name, arguments and defaults, as data.
//!
//! The converter matches a call's positional or named arguments against these signatures, so
//! arity errors, unknown arguments and missing arguments are reported the same way for every
//! op, and `docs/spec-language.md` lists exactly this table (a test keeps them in step).

/// What an argument must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgKind {
    /// A tensor expression: a name, a literal number, or a nested op.
    Tensor,
    /// A list of tensor expressions.
    Tensors,
    /// A config expression giving an integer (`-1`, `"d / heads"`).
    Int,
    /// A config expression giving a number.
    Float,
    /// A config expression giving a bool.
    Bool,
    /// One integer or a list of integers (`axes: -1`, `axes: [1, 2]`).
    Ints,
    /// A list of extents, or a string expression such as `"shape(x)"`.
    Shape,
    /// An element type: `f32`, `i64`, …
    DType,
    /// A list of `[before, after]` pairs.
    Pairs,
    /// A nested list of numbers (a literal tensor).
    Values,
    /// One of a fixed set of names, written bare or quoted (`approx: tanh`).
    Name(&'static [&'static str]),
}

/// The value an argument takes when the call leaves it out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ArgDefault {
    Required,
    /// Left out means "not given"; the op decides (e.g. all axes, the whole extent).
    Absent,
    Int(i64),
    Float(f64),
    Bool(bool),
    DType(&'static str),
    /// One of the argument's names (`ArgKind::Name`).
    Name(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArgSig {
    pub name: &'static str,
    pub kind: ArgKind,
    pub default: ArgDefault,
}

/// An op family, for grouping in docs and errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    Unary,
    Binary,
    Compare,
    Select,
    Reduce,
    Layout,
    Source,
    LinAlg,
    Random,
    /// Fused ops: one op for a pattern of primitives that the optimizer also forms on its own.
    Fused,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpSig {
    pub name: &'static str,
    pub family: Family,
    pub args: &'static [ArgSig],
    /// One line: what the op computes.
    pub doc: &'static str,
    /// Whether the op returns several tensors (bound with `Let(["a", "b"], …)`).
    pub multi: bool,
}

const fn a(name: &'static str, kind: ArgKind, default: ArgDefault) -> ArgSig {
    ArgSig { name, kind, default }
}

use ArgDefault as D;
use ArgKind as K;

const X: &[ArgSig] = &[a("x", K::Tensor, D::Required)];
const AB: &[ArgSig] = &[a("a", K::Tensor, D::Required), a("b", K::Tensor, D::Required)];
const REDUCE: &[ArgSig] =
    &[a("x", K::Tensor, D::Required), a("axes", K::Ints, D::Absent), a("keepdims", K::Bool, D::Bool(false))];
const POOL: &[ArgSig] = &[
    a("x", K::Tensor, D::Required),
    a("kernel", K::Ints, D::Required),
    a("stride", K::Ints, D::Absent),
    a("padding", K::Ints, D::Int(0)),
];

/// The forms of GELU.
pub const GELU_APPROX: &[&str] = &["erf", "tanh"];
/// The activations of `MatMulEpilogue`.
pub const ACTIVATIONS: &[&str] = &["none", "relu", "gelu", "gelu_tanh", "sigmoid", "tanh", "silu"];

const fn op(name: &'static str, family: Family, args: &'static [ArgSig], doc: &'static str) -> OpSig {
    OpSig { name, family, args, doc, multi: false }
}

use Family as F;

/// Every op of the language.
pub const OPS: &[OpSig] = &[
    op("Neg", F::Unary, X, "−x"),
    op("Abs", F::Unary, X, "|x|"),
    op("Exp", F::Unary, X, "eˣ"),
    op("Log", F::Unary, X, "natural logarithm"),
    op("Sqrt", F::Unary, X, "√x"),
    op("Rsqrt", F::Unary, X, "1/√x"),
    op("Recip", F::Unary, X, "1/x"),
    op("Tanh", F::Unary, X, "hyperbolic tangent"),
    op("Erf", F::Unary, X, "the error function"),
    op("Sin", F::Unary, X, "sine"),
    op("Cos", F::Unary, X, "cosine"),
    op("Sigmoid", F::Unary, X, "1/(1+e⁻ˣ)"),
    op("Relu", F::Unary, X, "max(x, 0)"),
    op("Cast", F::Unary, &[a("x", K::Tensor, D::Required), a("to", K::DType, D::Required)], "convert to another dtype (float→int truncates toward zero)"),
    op("Add", F::Binary, AB, "a + b"),
    op("Sub", F::Binary, AB, "a − b"),
    op("Mul", F::Binary, AB, "a · b"),
    op("Div", F::Binary, AB, "a / b (integers truncate toward zero)"),
    op("Pow", F::Binary, AB, "aᵇ (floating-point)"),
    op("Max", F::Binary, AB, "elementwise maximum"),
    op("Min", F::Binary, AB, "elementwise minimum"),
    op("Lt", F::Compare, AB, "a < b"),
    op("Le", F::Compare, AB, "a ≤ b"),
    op("Gt", F::Compare, AB, "a > b"),
    op("Ge", F::Compare, AB, "a ≥ b"),
    op("Eq", F::Compare, AB, "a = b"),
    op("Ne", F::Compare, AB, "a ≠ b"),
    op("Where", F::Select, &[a("cond", K::Tensor, D::Required), a("a", K::Tensor, D::Required), a("b", K::Tensor, D::Required)], "a where cond is true, else b"),
    op("Sum", F::Reduce, REDUCE, "sum over axes (all when left out)"),
    op("Mean", F::Reduce, REDUCE, "mean over axes"),
    op("ReduceMax", F::Reduce, REDUCE, "maximum over axes"),
    op("ReduceMin", F::Reduce, REDUCE, "minimum over axes"),
    op("Reshape", F::Layout, &[a("x", K::Tensor, D::Required), a("shape", K::Shape, D::Required)], "same elements, new shape; one extent may be -1"),
    op("Transpose", F::Layout, &[a("x", K::Tensor, D::Required), a("perm", K::Ints, D::Absent)], "permute axes; without perm, swap the last two"),
    op("Unsqueeze", F::Layout, &[a("x", K::Tensor, D::Required), a("axis", K::Int, D::Required)], "insert an axis of extent 1"),
    op("Squeeze", F::Layout, &[a("x", K::Tensor, D::Required), a("axis", K::Int, D::Required)], "remove an axis of extent 1"),
    op("BroadcastTo", F::Layout, &[a("x", K::Tensor, D::Required), a("shape", K::Shape, D::Required)], "numpy broadcast to a shape"),
    op("Slice", F::Layout, &[a("x", K::Tensor, D::Required), a("axis", K::Int, D::Required), a("start", K::Int, D::Int(0)), a("end", K::Int, D::Absent), a("step", K::Int, D::Int(1))], "elements start..end by step along axis (negative indices count from the end)"),
    op("Concat", F::Layout, &[a("xs", K::Tensors, D::Required), a("axis", K::Int, D::Required)], "join tensors along an axis"),
    OpSig { name: "Split", family: F::Layout, args: &[a("x", K::Tensor, D::Required), a("axis", K::Int, D::Required), a("sizes", K::Ints, D::Required)], doc: "cut along an axis into parts of the given sizes (one integer n: n equal parts)", multi: true },
    op("Pad", F::Layout, &[a("x", K::Tensor, D::Required), a("pads", K::Pairs, D::Required), a("value", K::Float, D::Float(0.0))], "pad each axis with [before, after] copies of value"),
    op("Gather", F::Layout, &[a("table", K::Tensor, D::Required), a("indices", K::Tensor, D::Required), a("axis", K::Int, D::Int(0))], "pick slices of table by integer indices (embedding lookup)"),
    op("Iota", F::Source, &[a("shape", K::Shape, D::Required), a("axis", K::Int, D::Required), a("dtype", K::DType, D::DType("i64"))], "the index along axis"),
    op("Full", F::Source, &[a("shape", K::Shape, D::Required), a("value", K::Float, D::Required), a("dtype", K::DType, D::DType("f32"))], "a tensor filled with one value"),
    op("Const", F::Source, &[a("values", K::Values, D::Required), a("dtype", K::DType, D::DType("f32"))], "a literal tensor from nested lists"),
    op("MatMul", F::LinAlg, AB, "matrix product, batched with numpy rules"),
    op("Conv2d", F::LinAlg, &[a("x", K::Tensor, D::Required), a("w", K::Tensor, D::Required), a("stride", K::Ints, D::Int(1)), a("padding", K::Ints, D::Int(0)), a("dilation", K::Ints, D::Int(1)), a("groups", K::Int, D::Int(1))], "2-D convolution, NCHW input, OIHW weight"),
    op("MaxPool2d", F::LinAlg, POOL, "2-D max pooling, NCHW (stride defaults to kernel)"),
    op("AvgPool2d", F::LinAlg, POOL, "2-D average pooling, NCHW (padding not counted)"),
    op("RandomUniform", F::Random, &[a("shape", K::Shape, D::Required), a("seed", K::Int, D::Absent), a("offset", K::Int, D::Int(0)), a("dtype", K::DType, D::DType("f32"))], "counter-based uniform numbers in [0, 1): element i is a pure function of (seed, offset + i); the seed defaults to one derived from the model seed and the scope"),
    op("Softmax", F::Fused, &[a("x", K::Tensor, D::Required), a("axis", K::Int, D::Int(-1))], "exp(x − max) / Σ exp(x − max) along axis"),
    op("LogSoftmax", F::Fused, &[a("x", K::Tensor, D::Required), a("axis", K::Int, D::Int(-1))], "x − max − log Σ exp(x − max) along axis"),
    op("LayerNorm", F::Fused, &[a("x", K::Tensor, D::Required), a("gamma", K::Tensor, D::Absent), a("beta", K::Tensor, D::Absent), a("eps", K::Float, D::Float(1e-5))], "(x − mean) / √(var + eps) over the last axis, then · gamma + beta when both are given"),
    op("RmsNorm", F::Fused, &[a("x", K::Tensor, D::Required), a("gamma", K::Tensor, D::Absent), a("eps", K::Float, D::Float(1e-6))], "x / √(mean(x²) + eps) over the last axis, then · gamma when given"),
    op("Gelu", F::Fused, &[a("x", K::Tensor, D::Required), a("approx", K::Name(GELU_APPROX), D::Name("erf"))], "GELU: ½x(1 + erf(x/√2)), or its tanh approximation"),
    op("Attention", F::Fused, &[a("q", K::Tensor, D::Required), a("k", K::Tensor, D::Required), a("v", K::Tensor, D::Required), a("mask", K::Tensor, D::Absent), a("scale", K::Float, D::Absent), a("causal", K::Bool, D::Bool(false))], "softmax(q·kᵀ·scale + mask) · v, causal hiding j > i; scale defaults to 1/√d"),
    op("AddNorm", F::Fused, &[a("a", K::Tensor, D::Required), a("b", K::Tensor, D::Required), a("gamma", K::Tensor, D::Absent), a("beta", K::Tensor, D::Absent), a("eps", K::Float, D::Float(1e-5)), a("rms", K::Bool, D::Bool(false))], "layer norm (or RMS norm) of a + b over the last axis"),
    op("MatMulEpilogue", F::Fused, &[a("a", K::Tensor, D::Required), a("b", K::Tensor, D::Required), a("bias", K::Tensor, D::Absent), a("activation", K::Name(ACTIVATIONS), D::Name("none"))], "activation(matmul(a, b) + bias)"),
];

/// The special forms: not ops, but the language's own constructs.
pub const FORMS: &[&str] = &["Param", "Call", "Scalar", "If"];

pub fn lookup(name: &str) -> Option<&'static OpSig> {
    OPS.iter().find(|o| o.name == name)
}

/// The closest known op or form name, for "did you mean".
pub fn suggest_op(name: &str) -> Option<&'static str> {
    let candidates = OPS.iter().map(|o| o.name).chain(FORMS.iter().copied());
    crate::suggest::closest(name, candidates)
}

/// The standard-library module an op-like name refers to (`Linear` → `linear`,
/// `SelfAttention` → `self_attention`), when there is one. Names that are ops (`Softmax`,
/// `LayerNorm`) are found in the catalog first and never get here.
pub fn std_module_for(name: &str) -> Option<String> {
    let mut snake = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            snake.push('_');
        }
        snake.extend(c.to_lowercase());
    }
    crate::STD_LIBRARY.contains(&format!("\"{snake}\": Module(")).then_some(snake)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_arguments_default_to_one_of_their_names() {
        for op in OPS {
            for arg in op.args {
                match (arg.kind, arg.default) {
                    (ArgKind::Name(choices), ArgDefault::Name(d)) => {
                        assert!(
                            choices.contains(&d),
                            "{}.{}: default `{d}` is not a choice",
                            op.name,
                            arg.name
                        )
                    }
                    (ArgKind::Name(_), d) => assert_eq!(d, ArgDefault::Required, "{}.{}", op.name, arg.name),
                    (_, ArgDefault::Name(_)) => {
                        panic!("{}.{}: a name default on a non-name argument", op.name, arg.name)
                    }
                    _ => {}
                }
            }
        }
        let fused: Vec<&str> = OPS.iter().filter(|o| o.family == Family::Fused).map(|o| o.name).collect();
        assert_eq!(
            fused,
            [
                "Softmax",
                "LogSoftmax",
                "LayerNorm",
                "RmsNorm",
                "Gelu",
                "Attention",
                "AddNorm",
                "MatMulEpilogue"
            ]
        );
        // Op names are found before the std-module hint, which names real modules only.
        assert!(lookup("Softmax").is_some());
        assert_eq!(std_module_for("SelfAttention").as_deref(), Some("self_attention"));
    }
}
