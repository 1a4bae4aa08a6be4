//! The typed spec: what a model file says, with a span on everything a diagnostic may name.
//!
//! Nothing here is evaluated yet: config expressions, shapes and module calls are resolved
//! when the spec is lowered to a graph.

use crate::cexpr::SpannedCExpr;
use crate::ops::OpSig;
use crate::source::Span;
use crate::syntax::Ident;

/// A model file.
#[derive(Clone, Debug)]
pub struct Model {
    pub name: Ident,
    pub config: Vec<ConfigEntry>,
    pub inputs: Vec<InputDecl>,
    /// Libraries whose modules this model calls as `lib.module`.
    pub uses: Vec<Ident>,
    pub modules: Vec<ModuleDef>,
    pub body: Vec<Stmt>,
    pub outputs: Vec<OutputDecl>,
    pub training: Option<Training>,
    pub span: Span,
}

/// A library file: modules (and defaults for the config they read) for models to `use`.
#[derive(Clone, Debug)]
pub struct Library {
    pub name: Ident,
    pub config: Vec<ConfigEntry>,
    pub modules: Vec<ModuleDef>,
}

/// `"name": value` in a config map: a number, a bool, an expression string, or a dynamic
/// size `Dyn(min: …, max: …, hint: …)`.
#[derive(Clone, Debug)]
pub struct ConfigEntry {
    pub name: Ident,
    pub value: ConfigValue,
}

#[derive(Clone, Debug)]
pub enum ConfigValue {
    /// A value or an expression over other entries.
    Expr(SpannedCExpr),
    /// A size that varies from run to run within bounds (batch, sequence length).
    Dyn(Box<DynDecl>),
}

impl ConfigValue {
    /// The config names the value reads: an expression's names, or a `Dyn`'s bounds' names.
    pub fn names(&self, out: &mut Vec<String>) {
        match self {
            ConfigValue::Expr(e) => e.expr.names(out),
            ConfigValue::Dyn(d) => {
                for e in d.fields() {
                    e.expr.names(out);
                }
            }
        }
    }

    pub fn span(&self) -> Span {
        match self {
            ConfigValue::Expr(e) => e.span,
            ConfigValue::Dyn(d) => d.span,
        }
    }
}

/// `Dyn(min: 1, max: 512, hint: 128, multiple_of: 8)`: a bounded size symbol. The bounds are
/// config expressions over static entries; the lowering checks and evaluates them.
#[derive(Clone, Debug)]
pub struct DynDecl {
    pub min: SpannedCExpr,
    pub max: SpannedCExpr,
    /// The typical value: what the cost model plans for.
    pub hint: SpannedCExpr,
    /// Every value is a multiple of this (none: any integer).
    pub multiple_of: Option<SpannedCExpr>,
    pub span: Span,
}

impl DynDecl {
    /// The bound expressions, in the order they are written in the docs.
    pub fn fields(&self) -> impl Iterator<Item = &SpannedCExpr> {
        [&self.min, &self.max, &self.hint].into_iter().chain(self.multiple_of.as_ref())
    }
}

#[derive(Clone, Debug)]
pub struct InputDecl {
    pub name: Ident,
    pub dtype: (ir_dtype::DTypeName, Span),
    pub shape: ShapeExpr,
}

/// Element type names as written; the IR's dtype is chosen during lowering.
pub mod ir_dtype {
    /// One of `f32 f64 f16 bf16 i32 i64 bool`.
    pub type DTypeName = String;
    pub const NAMES: [&str; 7] = ["f32", "f64", "f16", "bf16", "i32", "i64", "bool"];
}

/// A shape: a list of extent expressions, or one expression such as `"shape(x)"`.
#[derive(Clone, Debug)]
pub enum ShapeExpr {
    Dims(Vec<SpannedCExpr>, Span),
    Of(Ident, Span),
}

impl ShapeExpr {
    pub fn span(&self) -> Span {
        match self {
            ShapeExpr::Dims(_, s) | ShapeExpr::Of(_, s) => *s,
        }
    }
}

#[derive(Clone, Debug)]
pub struct OutputDecl {
    pub name: Ident,
    pub value: Ident,
}

/// A reusable function with its own parameters and scope.
#[derive(Clone, Debug)]
pub struct ModuleDef {
    pub name: Ident,
    pub args: Vec<Ident>,
    /// Config arguments with their defaults (`None`: the caller must give it).
    pub config: Vec<(Ident, Option<SpannedCExpr>)>,
    pub body: Vec<Stmt>,
    pub ret: Vec<Ident>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Stmt {
    /// `Let("x", expr)` or `Let(["a", "b"], expr)`.
    Let { names: Vec<Ident>, value: Expr, span: Span },
    /// `Repeat(n: "layers", index: "i", body: [...])`.
    Repeat { n: SpannedCExpr, index: Ident, body: Vec<Stmt>, span: Span },
}

#[derive(Clone, Debug)]
pub enum Expr {
    /// A tensor bound earlier.
    Name(Ident),
    /// A literal number; its dtype follows the other operand (numpy's weak scalars).
    Number(f64, Span),
    Bool(bool, Span),
    /// `Scalar("1 / sqrt(d)")`: a config expression as a scalar tensor.
    Scalar(SpannedCExpr, Option<(String, Span)>, Span),
    Op(OpCall),
    Param(ParamDecl),
    Call(CallExpr),
    /// `If(cond: "training", then: a, else: b)`: only the chosen branch is lowered.
    If {
        cond: SpannedCExpr,
        then: Box<Expr>,
        otherwise: Box<Expr>,
        span: Span,
    },
    /// An expression that failed to convert (already reported): lowering binds its names to
    /// nothing, so later uses do not report the same mistake again.
    Error(Span),
}

impl Expr {
    pub fn span(&self) -> Span {
        match self {
            Expr::Name(i) => i.span,
            Expr::Number(_, s) | Expr::Bool(_, s) | Expr::Scalar(_, _, s) => *s,
            Expr::Op(o) => o.span,
            Expr::Param(p) => p.span,
            Expr::Call(c) => c.span,
            Expr::If { span, .. } => *span,
            Expr::Error(s) => *s,
        }
    }
}

/// An op applied to arguments matched against its signature (`args[i]` is the signature's
/// `i`-th argument; `None` when left out).
#[derive(Clone, Debug)]
pub struct OpCall {
    pub sig: &'static OpSig,
    pub name_span: Span,
    pub args: Vec<Option<Arg>>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Arg {
    Tensor(Expr),
    Tensors(Vec<Expr>, Span),
    Config(SpannedCExpr),
    List(Vec<SpannedCExpr>, Span),
    Shape(ShapeExpr),
    DType(String, Span),
    Pairs(Vec<(SpannedCExpr, SpannedCExpr)>, Span),
    /// A literal tensor: its shape and values in row-major order.
    Values(Vec<usize>, Vec<f64>, Span),
    /// One of the names an `ArgKind::Name` argument allows.
    Name(String, Span),
}

#[derive(Clone, Debug)]
pub struct ParamDecl {
    /// The last segment of the checkpoint name; defaults to the `Let` name.
    pub name: Option<Ident>,
    pub shape: ShapeExpr,
    pub dtype: Option<(String, Span)>,
    pub init: InitExpr,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum InitKind {
    Zeros,
    Ones,
    Constant,
    Normal,
    Uniform,
    XavierUniform,
    XavierNormal,
    KaimingUniform,
    KaimingNormal,
}

/// An initializer with its arguments (config expressions), e.g. `Normal(std: 0.02)`.
#[derive(Clone, Debug)]
pub struct InitExpr {
    pub kind: InitKind,
    pub args: Vec<(String, SpannedCExpr)>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct CallExpr {
    /// `module` or `library.module`.
    pub func: Ident,
    pub args: Vec<Expr>,
    /// A scope segment for parameter names; may contain `{expr}` holes (`"layer.{i}"`).
    pub scope: Option<Ident>,
    pub with: Vec<(Ident, SpannedCExpr)>,
    pub span: Span,
}

/// The optional training section: parsed here, checked by `kiln-lower`, which builds the
/// train step graph from it.
#[derive(Clone, Debug)]
pub struct Training {
    pub loss: Loss,
    pub optimizer: Optimizer,
    pub schedule: Option<Schedule>,
    /// `clip_grad_norm: max_norm`: clip the gradients' global 2-norm before the update.
    pub clip_grad_norm: Option<SpannedCExpr>,
    /// `accumulate: K`: average the gradients of K micro-batches before the update.
    pub accumulate: Option<SpannedCExpr>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub enum Loss {
    /// Cross-entropy of `logits` (classes on the last axis) against integer `labels`.
    CrossEntropy {
        logits: Ident,
        labels: Ident,
        label_smoothing: Option<SpannedCExpr>,
        ignore_index: Option<SpannedCExpr>,
        span: Span,
    },
    /// Mean squared error between `pred` and `target`.
    Mse { pred: Ident, target: Ident, span: Span },
}

#[derive(Clone, Debug)]
pub struct Optimizer {
    /// `Sgd`, `Adam`, `AdamW` or `RmsProp`.
    pub kind: String,
    pub hyper: Vec<(Ident, SpannedCExpr)>,
    pub span: Span,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    /// `Constant`, `Linear`, `Cosine` or `Step`.
    pub kind: String,
    pub args: Vec<(Ident, SpannedCExpr)>,
    pub span: Span,
}
