//! Sizes known only at run time: a manifest's symbols (a batch size, a sequence length), the
//! extents written over them, and the binding of their values from a run's input shapes.
//!
//! A symbol is declared with bounds (`min..=max`, a `multiple_of`, and the `hint` the compiler
//! optimized for). An extent is either fixed or a [`Size`] over the symbols in the compiler's
//! normal form (a sum of integer multiples of products of symbols and floor quotients). A run
//! binds every symbol from the first input axis whose extent is exactly that symbol, checks it
//! against its bounds, then checks every other input axis against the value its extent takes:
//! all before any kernel runs, with an error that names the input and the axis.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::manifest::{name_problem, EntryView, TensorSpec};

/// A size the caller chooses per run, within bounds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SymbolSpec {
    /// The name errors and `kiln inspect` use (`batch`, `seq`).
    pub name: String,
    /// The smallest value a run may bind.
    pub min: u64,
    /// The largest value a run may bind; the arena is planned for it.
    pub max: u64,
    /// The value the compiler chose kernels and costs for.
    pub hint: u64,
    /// Every bound value is a multiple of this (1: any).
    pub multiple_of: u64,
}

/// One extent of an input or output: fixed, or a size over the manifest's symbols.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dim {
    /// The same in every run.
    Fixed(u64),
    /// The sum of these terms at the run's symbol values.
    Size(Size),
}

/// A size over symbols in normal form: the sum of its terms.
pub type Size = Vec<SizeTerm>;

/// `coeff` times the product of `factors` (a constant when there are none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeTerm {
    /// The integer multiple.
    pub coeff: i64,
    /// The factors multiplied together.
    pub factors: Vec<SizeFactor>,
}

/// A factor of a [`SizeTerm`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SizeFactor {
    /// The value of symbol `i` of [`crate::Manifest::symbols`].
    Sym(u32),
    /// The floor of a size divided by a positive constant.
    FloorDiv(Size, u64),
}

impl Dim {
    /// The plain symbol this extent is, if it is exactly one (`seq`, not `2*seq`).
    pub fn symbol(&self) -> Option<u32> {
        match self {
            Dim::Fixed(_) => None,
            Dim::Size(terms) => match terms.as_slice() {
                [SizeTerm { coeff: 1, factors }] => match factors.as_slice() {
                    [SizeFactor::Sym(i)] => Some(*i),
                    _ => None,
                },
                _ => None,
            },
        }
    }

    /// The extent at symbol values `values` (indexed as the manifest's symbols), or `None` if
    /// it is negative, overflows or reads a symbol past `values`.
    pub fn at(&self, values: &[u64]) -> Option<u64> {
        match self {
            Dim::Fixed(d) => Some(*d),
            Dim::Size(terms) => u64::try_from(eval(terms, values)?).ok(),
        }
    }

    /// The extent when it is fixed.
    pub fn fixed(&self) -> Option<u64> {
        match self {
            Dim::Fixed(d) => Some(*d),
            Dim::Size(_) => None,
        }
    }

    /// Every symbol index the extent reads.
    fn symbols(&self, into: &mut Vec<u32>) {
        fn walk(terms: &Size, into: &mut Vec<u32>) {
            for t in terms {
                for f in &t.factors {
                    match f {
                        SizeFactor::Sym(i) => into.push(*i),
                        SizeFactor::FloorDiv(inner, _) => walk(inner, into),
                    }
                }
            }
        }
        match self {
            Dim::Fixed(_) => {}
            Dim::Size(terms) => walk(terms, into),
        }
    }

    /// The extent written over symbol names: `seq`, `batch*seq`, `2*seq + 1`, `(seq + 1)//2`.
    pub fn display<'a>(&'a self, symbols: &'a [SymbolSpec]) -> impl fmt::Display + 'a {
        DimText { dim: self, symbols }
    }
}

impl From<u64> for Dim {
    fn from(d: u64) -> Dim {
        Dim::Fixed(d)
    }
}

/// Evaluates a normal form in i128, so that only the result's range needs checking.
fn eval(terms: &Size, values: &[u64]) -> Option<i128> {
    let mut sum: i128 = 0;
    for t in terms {
        let mut product = i128::from(t.coeff);
        for f in &t.factors {
            let v = match f {
                SizeFactor::Sym(i) => i128::from(*values.get(*i as usize)?),
                SizeFactor::FloorDiv(inner, d) => {
                    let d = i128::from(*d);
                    (d > 0).then_some(())?;
                    eval(inner, values)?.div_euclid(d)
                }
            };
            product = product.checked_mul(v)?;
        }
        sum = sum.checked_add(product)?;
    }
    (sum <= i128::from(u64::MAX)).then_some(sum)
}

struct DimText<'a> {
    dim: &'a Dim,
    symbols: &'a [SymbolSpec],
}

impl fmt::Display for DimText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.dim {
            Dim::Fixed(d) => write!(f, "{d}"),
            Dim::Size(terms) => write_size(f, terms, self.symbols),
        }
    }
}

fn write_size(f: &mut fmt::Formatter<'_>, terms: &Size, symbols: &[SymbolSpec]) -> fmt::Result {
    if terms.is_empty() {
        return f.write_str("0");
    }
    for (i, t) in terms.iter().enumerate() {
        let magnitude = t.coeff.unsigned_abs();
        match (i, t.coeff < 0) {
            (0, true) => f.write_str("-")?,
            (0, false) => {}
            (_, true) => f.write_str(" - ")?,
            (_, false) => f.write_str(" + ")?,
        }
        let mut first = true;
        if magnitude != 1 || t.factors.is_empty() {
            write!(f, "{magnitude}")?;
            first = false;
        }
        for factor in &t.factors {
            if !first {
                f.write_str("*")?;
            }
            first = false;
            match factor {
                SizeFactor::Sym(s) => match symbols.get(*s as usize) {
                    Some(sym) => f.write_str(&sym.name)?,
                    None => write!(f, "?{s}")?,
                },
                SizeFactor::FloorDiv(inner, d) => {
                    f.write_str("(")?;
                    write_size(f, inner, symbols)?;
                    write!(f, ")//{d}")?;
                }
            }
        }
    }
    Ok(())
}

/// `"[batch, seq, 384]"`: a shape as errors print it.
pub fn dims_str(shape: &[Dim], symbols: &[SymbolSpec]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.display(symbols).to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// Symbols must have plain distinct names and consistent bounds, and every extent of an
/// entry point must read only symbols that its own inputs bind (an axis whose extent is
/// exactly the symbol), so that each run can learn every value it needs.
pub(crate) fn check(symbols: &[SymbolSpec], views: &[EntryView<'_>]) -> Result<(), RuntimeError> {
    for (i, s) in symbols.iter().enumerate() {
        let bad = |problem: String| RuntimeError::invalid(format!("symbol {:?} {problem}", s.name));
        if let Some(problem) = name_problem(&s.name) {
            return Err(bad(problem.to_string()));
        }
        if symbols[..i].iter().any(|o| o.name == s.name) {
            return Err(bad("is declared twice".into()));
        }
        if s.multiple_of == 0 {
            return Err(bad("is a multiple of 0".into()));
        }
        let ordered = 1 <= s.min && s.min <= s.hint && s.hint <= s.max;
        if !ordered || !s.hint.is_multiple_of(s.multiple_of) || i64::try_from(s.max).is_err() {
            return Err(bad(format!(
                "has bounds min {} ≤ hint {} ≤ max {} (multiple of {}) that do not hold or do not fit i64",
                s.min, s.hint, s.max, s.multiple_of
            )));
        }
    }
    for view in views {
        let bound: Vec<u32> =
            view.inputs.iter().flat_map(|spec| spec.shape.iter().filter_map(Dim::symbol)).collect();
        let mut read = Vec::new();
        for spec in view.inputs.iter().chain(view.outputs) {
            spec.shape.iter().for_each(|d| d.symbols(&mut read));
        }
        for step in view.steps {
            step.dispatch.range_dim().into_iter().for_each(|d| d.symbols(&mut read));
        }
        for s in read {
            let Some(sym) = symbols.get(s as usize) else {
                return Err(RuntimeError::invalid(format!(
                    "entry point {:?} reads symbol {s}, but the manifest declares {}",
                    view.name,
                    symbols.len()
                )));
            };
            if !bound.contains(&s) {
                return Err(RuntimeError::invalid(format!(
                    "entry point {:?} reads symbol {:?}, but no axis of its inputs is exactly it, so no run could bind it",
                    view.name, sym.name
                )));
            }
        }
    }
    Ok(())
}

/// The symbol values of one run: each bound from the first input axis that is exactly the
/// symbol, checked against its bounds; a symbol the entry point does not read keeps its hint.
/// Every other input axis must then equal its extent at these values.
pub(crate) fn bind(
    symbols: &[SymbolSpec],
    specs: &[TensorSpec],
    shapes: &[&[u64]],
) -> Result<Vec<u64>, RuntimeError> {
    let mut values: Vec<u64> = symbols.iter().map(|s| s.hint).collect();
    // For each symbol, the input and axis it was bound from.
    let mut from: Vec<Option<(usize, usize)>> = vec![None; symbols.len()];
    for (i, (spec, shape)) in specs.iter().zip(shapes).enumerate() {
        if spec.shape.len() != shape.len() {
            return Err(RuntimeError::InputShape {
                name: spec.name.clone(),
                expected: dims_str(&spec.shape, symbols),
                got: crate::manifest::shape_str(shape),
            });
        }
        for (axis, (dim, &got)) in spec.shape.iter().zip(shape.iter()).enumerate() {
            let Some(s) = dim.symbol() else { continue };
            let (Some(sym), Some(slot)) = (symbols.get(s as usize), from.get_mut(s as usize)) else {
                continue;
            };
            if slot.is_some() {
                continue;
            }
            let problem = if got < sym.min {
                Some(format!("`{}` is at least {}", sym.name, sym.min))
            } else if got > sym.max {
                Some(format!("`{}` is at most {}", sym.name, sym.max))
            } else if !got.is_multiple_of(sym.multiple_of) {
                Some(format!("`{}` is a multiple of {}", sym.name, sym.multiple_of))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(RuntimeError::InputExtent { input: spec.name.clone(), axis, got, problem });
            }
            values[s as usize] = got;
            *slot = Some((i, axis));
        }
    }
    for (spec, shape) in specs.iter().zip(shapes) {
        // A shape with no symbol is refused whole, as it always was.
        if let Some(fixed) = spec.fixed_shape() {
            if fixed.as_slice() != *shape {
                return Err(RuntimeError::InputShape {
                    name: spec.name.clone(),
                    expected: crate::manifest::shape_str(&fixed),
                    got: crate::manifest::shape_str(shape),
                });
            }
            continue;
        }
        for (axis, (dim, &got)) in spec.shape.iter().zip(shape.iter()).enumerate() {
            let expected = dim.at(&values);
            if expected == Some(got) {
                continue;
            }
            let value = expected.map_or_else(|| "out of range".to_string(), |v| v.to_string());
            let problem = match (dim, dim.symbol()) {
                (Dim::Fixed(d), _) => format!("it is fixed at {d}"),
                (Dim::Size(_), Some(s)) => {
                    let origin = match from.get(s as usize).copied().flatten() {
                        Some((i, a)) => format!(" (from input `{}` axis {a})", specs[i].name),
                        None => String::new(),
                    };
                    format!("`{}` is {value}{origin}", dim.display(symbols))
                }
                (Dim::Size(_), None) => format!("`{}` is {value}", dim.display(symbols)),
            };
            return Err(RuntimeError::InputExtent { input: spec.name.clone(), axis, got, problem });
        }
    }
    Ok(values)
}

/// A spec's shape at symbol values `values`, or an error naming the tensor when an extent is
/// out of range.
pub(crate) fn shape_at(
    spec: &TensorSpec,
    values: &[u64],
    symbols: &[SymbolSpec],
) -> Result<Vec<u64>, RuntimeError> {
    spec.shape.iter().map(|d| d.at(values)).collect::<Option<Vec<u64>>>().ok_or_else(|| {
        RuntimeError::invalid(format!(
            "{:?} of shape {} has no size at {}",
            spec.name,
            dims_str(&spec.shape, symbols),
            binding_str(symbols, values)
        ))
    })
}

/// `"batch = 2, seq = 17"`.
pub fn binding_str(symbols: &[SymbolSpec], values: &[u64]) -> String {
    let parts: Vec<String> = symbols.iter().zip(values).map(|(s, v)| format!("{} = {v}", s.name)).collect();
    parts.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DType;

    fn sym(name: &str, min: u64, max: u64, hint: u64, multiple_of: u64) -> SymbolSpec {
        SymbolSpec { name: name.into(), min, max, hint, multiple_of }
    }

    fn s(i: u32) -> Dim {
        Dim::Size(vec![SizeTerm { coeff: 1, factors: vec![SizeFactor::Sym(i)] }])
    }

    fn spec(name: &str, shape: Vec<Dim>) -> TensorSpec {
        TensorSpec { name: name.into(), dtype: DType::I64, shape }
    }

    fn symbols() -> Vec<SymbolSpec> {
        vec![sym("batch", 1, 64, 8, 1), sym("seq", 8, 512, 128, 8)]
    }

    fn bert_inputs() -> Vec<TensorSpec> {
        vec![spec("input_ids", vec![s(0), s(1)]), spec("attention_mask", vec![s(0), s(1)])]
    }

    fn bind_err(shapes: &[&[u64]]) -> String {
        bind(&symbols(), &bert_inputs(), shapes).unwrap_err().to_string()
    }

    #[test]
    fn binds_from_the_first_axis_that_is_the_symbol() {
        let values = bind(&symbols(), &bert_inputs(), &[&[3, 16], &[3, 16]]).unwrap();
        assert_eq!(values, [3, 16]);
        assert_eq!(binding_str(&symbols(), &values), "batch = 3, seq = 16");
    }

    #[test]
    fn refusals_name_the_input_and_the_axis() {
        assert_eq!(
            bind_err(&[&[2, 600], &[2, 600]]),
            "input `input_ids` axis 1 is 600, but `seq` is at most 512"
        );
        assert_eq!(
            bind_err(&[&[2, 100], &[2, 100]]),
            "input `input_ids` axis 1 is 100, but `seq` is a multiple of 8"
        );
        assert_eq!(bind_err(&[&[0, 8], &[0, 8]]), "input `input_ids` axis 0 is 0, but `batch` is at least 1");
        assert_eq!(
            bind_err(&[&[2, 128], &[2, 64]]),
            "input `attention_mask` axis 1 is 64, but `seq` is 128 (from input `input_ids` axis 1)"
        );
        assert_eq!(
            bind_err(&[&[2, 128, 1], &[2, 128]]),
            "input \"input_ids\" must have shape [batch, seq], got [2, 128, 1]"
        );
    }

    #[test]
    fn compound_and_fixed_extents_are_checked_at_the_binding() {
        let both =
            Dim::Size(vec![SizeTerm { coeff: 1, factors: vec![SizeFactor::Sym(0), SizeFactor::Sym(1)] }]);
        let specs = vec![spec("ids", vec![s(0), s(1)]), spec("flat", vec![both, Dim::Fixed(4)])];
        assert_eq!(bind(&symbols(), &specs, &[&[2, 8], &[16, 4]]).unwrap(), [2, 8]);
        let err = bind(&symbols(), &specs, &[&[2, 8], &[15, 4]]).unwrap_err().to_string();
        assert_eq!(err, "input `flat` axis 0 is 15, but `batch*seq` is 16");
        let err = bind(&symbols(), &specs, &[&[2, 8], &[16, 5]]).unwrap_err().to_string();
        assert_eq!(err, "input `flat` axis 1 is 5, but it is fixed at 4");
    }

    #[test]
    fn sizes_evaluate_and_print_in_normal_form() {
        let half = Dim::Size(vec![
            SizeTerm { coeff: 2, factors: vec![SizeFactor::Sym(1)] },
            SizeTerm {
                coeff: -1,
                factors: vec![SizeFactor::FloorDiv(
                    vec![
                        SizeTerm { coeff: 1, factors: vec![SizeFactor::Sym(1)] },
                        SizeTerm { coeff: 1, factors: vec![] },
                    ],
                    2,
                )],
            },
            SizeTerm { coeff: 3, factors: vec![] },
        ]);
        assert_eq!(half.display(&symbols()).to_string(), "2*seq - (seq + 1)//2 + 3");
        assert_eq!(half.at(&[1, 9]), Some(18 - 5 + 3));
        assert_eq!(half.at(&[1]), None, "a symbol past the values");
        let negative = Dim::Size(vec![SizeTerm { coeff: -1, factors: vec![SizeFactor::Sym(0)] }]);
        assert_eq!(negative.at(&[1, 8]), None);
        assert_eq!(s(1).symbol(), Some(1));
        assert_eq!(half.symbol(), None);
        assert_eq!(dims_str(&[s(0), s(1), Dim::Fixed(384)], &symbols()), "[batch, seq, 384]");
    }

    #[test]
    fn dims_round_trip_through_ron() {
        let dims = vec![Dim::Fixed(3), s(1)];
        let text = ron::to_string(&dims).unwrap();
        assert_eq!(text, "[Fixed(3),Size([(coeff:1,factors:[Sym(1)])])]");
        assert_eq!(ron::from_str::<Vec<Dim>>(&text).unwrap(), dims);
    }
}
