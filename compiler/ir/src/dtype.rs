//! Element types and tensor types (dtype + shape, each extent a constant or a size over
//! the graph's symbols).

use crate::size::{Range, SizeError, SizeExpr, SymbolDecl};
use serde::Serialize;
use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F64,
    F16,
    BF16,
    I32,
    I64,
    Bool,
}

impl DType {
    /// Every dtype, in the order the language documents them.
    pub const ALL: [DType; 7] =
        [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64, DType::Bool];

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.name() == s)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }

    pub fn is_int(self) -> bool {
        matches!(self, DType::I32 | DType::I64)
    }

    /// Size of one element in bytes (bool is stored as one byte).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Bool => 1,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One extent: a constant, or a size over the graph's symbols (`docs/dynamic-shapes.md`).
/// **Invariant:** a `Sym` reads at least one symbol; a size that reads none is a `Const`
/// ([`Dim::from_expr`]), so equal extents are equal values of `Dim`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Const(usize),
    Sym(SizeExpr),
}

impl Dim {
    /// The extent a size gives: `Const` when it reads no symbol (an error if negative).
    pub fn from_expr(e: SizeExpr) -> Result<Dim, SizeError> {
        match e.as_constant() {
            Some(c) => usize::try_from(c).map(Dim::Const).map_err(|_| SizeError::Negative(c)),
            None => Ok(Dim::Sym(e)),
        }
    }

    /// The size this extent is.
    pub fn expr(&self) -> SizeExpr {
        match self {
            Dim::Const(c) => SizeExpr::constant(i64::try_from(*c).unwrap_or(i64::MAX)),
            Dim::Sym(e) => e.clone(),
        }
    }

    pub fn as_const(&self) -> Option<usize> {
        match self {
            Dim::Const(c) => Some(*c),
            Dim::Sym(_) => None,
        }
    }

    pub fn is_static(&self) -> bool {
        matches!(self, Dim::Const(_))
    }

    /// The value of a static extent, for the stages after the optimizer, which run on static
    /// graphs only (`Graph::require_static` at their entry); a symbol here is a broken
    /// invariant.
    pub fn fixed(&self) -> usize {
        match self {
            Dim::Const(c) => *c,
            Dim::Sym(e) => panic!("symbolic extent {e} reached a stage that needs static shapes"),
        }
    }

    /// `self · other`, `self + other`, `self - other`, `⌊self / k⌋` in normal form.
    pub fn mul(&self, other: &Dim) -> Result<Dim, SizeError> {
        match (self, other) {
            (Dim::Const(a), Dim::Const(b)) => Ok(Dim::Const(a.saturating_mul(*b))),
            _ => Dim::from_expr(self.expr().mul(&other.expr())?),
        }
    }

    pub fn add(&self, other: &Dim) -> Result<Dim, SizeError> {
        match (self, other) {
            (Dim::Const(a), Dim::Const(b)) => Ok(Dim::Const(a.saturating_add(*b))),
            _ => Dim::from_expr(self.expr().add(&other.expr())?),
        }
    }

    pub fn sub(&self, other: &Dim) -> Result<Dim, SizeError> {
        Dim::from_expr(self.expr().sub(&other.expr())?)
    }

    pub fn floor_div(&self, k: usize) -> Result<Dim, SizeError> {
        let k = i64::try_from(k).map_err(|_| SizeError::Overflow)?;
        Dim::from_expr(self.expr().floor_div(k)?)
    }

    /// The value at a binding of every symbol.
    pub fn eval(&self, values: &[i64]) -> Option<usize> {
        match self {
            Dim::Const(c) => Some(*c),
            Dim::Sym(e) => e.eval(values).and_then(|v| usize::try_from(v).ok()),
        }
    }

    /// The values this extent takes over the declared bounds.
    pub fn range(&self, symbols: &[SymbolDecl]) -> Range {
        self.expr().range(symbols)
    }
}

impl From<usize> for Dim {
    fn from(c: usize) -> Dim {
        Dim::Const(c)
    }
}

impl PartialEq<usize> for Dim {
    fn eq(&self, other: &usize) -> bool {
        *self == Dim::Const(*other)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Const(c) => write!(f, "{c}"),
            Dim::Sym(e) => write!(f, "{e}"),
        }
    }
}

/// A constant serializes as its number, a size as its printed expression.
impl Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Dim::Const(c) => s.serialize_u64(*c as u64),
            Dim::Sym(e) => s.serialize_str(&e.to_string()),
        }
    }
}

/// A shape: one extent per axis; `[]` is a scalar.
pub type Shape = Vec<Dim>;

/// The shape of static extents.
pub fn dims(shape: &[usize]) -> Shape {
    shape.iter().map(|&d| Dim::Const(d)).collect()
}

/// The static extents of a shape, `None` if one is symbolic.
pub fn static_dims(shape: &[Dim]) -> Option<Vec<usize>> {
    shape.iter().map(Dim::as_const).collect()
}

/// The element count of a shape, in normal form.
pub fn numel_dim(shape: &[Dim]) -> Result<Dim, SizeError> {
    shape.iter().try_fold(Dim::Const(1), |a, d| a.mul(d))
}

/// What a type's shape can be built from: static extents or dims.
pub trait IntoShape {
    fn into_shape(self) -> Shape;
}

impl IntoShape for Shape {
    fn into_shape(self) -> Shape {
        self
    }
}

impl IntoShape for Vec<usize> {
    fn into_shape(self) -> Shape {
        dims(&self)
    }
}

impl IntoShape for &[usize] {
    fn into_shape(self) -> Shape {
        dims(self)
    }
}

impl<const N: usize> IntoShape for [usize; N] {
    fn into_shape(self) -> Shape {
        dims(&self)
    }
}

/// Number of elements of a shape (saturating: [`infer`](crate::infer) rejects shapes past
/// [`MAX_ELEMENTS`] before anything allocates them).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().fold(1usize, |a, &d| a.saturating_mul(d))
}

/// The most elements one tensor may have (2⁴⁰, 4 TiB of f32).
pub const MAX_ELEMENTS: usize = 1 << 40;

/// Row-major strides of a shape, in elements.
pub fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The type of a value in the graph: element type and shape.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Shape,
}

impl TensorType {
    pub fn new(dtype: DType, shape: impl IntoShape) -> Self {
        TensorType { dtype, shape: shape.into_shape() }
    }

    /// The static extents. Every stage after the optimizer works on static graphs (the back
    /// end refuses a graph with symbols first, `Graph::require_static`), so a symbolic extent
    /// here is a broken invariant, not a user error.
    pub fn static_shape(&self) -> Vec<usize> {
        match static_dims(&self.shape) {
            Some(s) => s,
            None => panic!("symbolic type {self} reached a stage that needs static shapes"),
        }
    }

    /// The static type at one value of each symbol (`values[i]` for symbol `i`), as costs
    /// are estimated at the hints; an extent that does not evaluate is 0.
    pub fn at(&self, values: &[i64]) -> TensorType {
        let shape = self.shape.iter().map(|d| Dim::Const(d.eval(values).unwrap_or(0))).collect();
        TensorType { dtype: self.dtype, shape }
    }

    /// Whether the type holds exactly one element (every extent a static 1), symbolic or not.
    pub fn is_single(&self) -> bool {
        self.shape.iter().all(|d| *d == Dim::Const(1))
    }

    /// Whether every extent is a constant.
    pub fn is_static(&self) -> bool {
        self.shape.iter().all(Dim::is_static)
    }

    /// The element count of a static type (see [`TensorType::static_shape`]).
    pub fn numel(&self) -> usize {
        numel(&self.static_shape())
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn size_bytes(&self) -> usize {
        self.numel() * self.dtype.size_bytes()
    }
}

/// Formats a shape (or a list of axes) as `[2, 3]` or `[batch, seq, 384]`.
pub fn fmt_shape<T: fmt::Display>(shape: &[T]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

impl fmt::Display for TensorType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, fmt_shape(&self.shape))
    }
}
