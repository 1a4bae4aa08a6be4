//! Binding a graph's symbols from its inputs (`docs/dynamic-shapes.md`, step 4): each symbol
//! takes the extent of the first input axis (in declaration order) that is exactly that
//! symbol; every other symbolic input axis must then agree, and every value must lie inside
//! its declared bounds. The messages are the runtime's.

use super::{Bindings, EvalError};
use crate::dtype::Dim;
use crate::graph::Graph;
use crate::op::Op;

/// An input's name, its declared extents and the extents of the tensor bound to it.
type InputExtents<'a> = (&'a str, &'a [Dim], Option<&'a [usize]>);

/// The value of each symbol of `g` (in `g.symbols` order) that the bound inputs give.
pub(crate) fn symbols(g: &Graph, b: &Bindings) -> Result<Vec<i64>, EvalError> {
    let inputs: Vec<InputExtents> = g
        .inputs
        .iter()
        .filter_map(|&id| match &g.node(id).op {
            Op::Input { name, .. } => Some((
                name.as_str(),
                g.ty(id).shape.as_slice(),
                b.inputs.get(name).map(|t| t.shape.as_slice()),
            )),
            _ => None,
        })
        .collect();
    let missing: Vec<(String, crate::TensorType)> = g
        .inputs
        .iter()
        .filter_map(|&id| match &g.node(id).op {
            Op::Input { name, .. } if !b.inputs.contains_key(name) => Some((name.clone(), g.ty(id).clone())),
            _ => None,
        })
        .collect();
    if !missing.is_empty() {
        return Err(EvalError::Missing { kind: "input", missing });
    }
    // The first axis that is exactly each symbol gives its value.
    let mut bound: Vec<Option<(i64, &str, usize)>> = vec![None; g.symbols.len()];
    for &(name, dims, shape) in &inputs {
        let Some(shape) = shape else { continue };
        for (axis, (d, &got)) in dims.iter().zip(shape).enumerate() {
            let Some(sym) = (match d {
                Dim::Sym(e) => e.as_symbol(),
                Dim::Const(_) => None,
            }) else {
                continue;
            };
            let Some(slot) = bound.get_mut(sym.index as usize) else { continue };
            if slot.is_some() {
                continue;
            }
            let decl = &g.symbols[sym.index as usize];
            let v = i64::try_from(got).unwrap_or(i64::MAX);
            let fail = |why: String| {
                EvalError::Symbol(format!(
                    "input `{name}` axis {axis} is {got}, but `{}` is {why}",
                    decl.name
                ))
            };
            if v > decl.max {
                return Err(fail(format!("at most {}", decl.max)));
            }
            if v < decl.min {
                return Err(fail(format!("at least {}", decl.min)));
            }
            if v % decl.multiple_of != 0 {
                return Err(fail(format!("a multiple of {}", decl.multiple_of)));
            }
            *slot = Some((v, name, axis));
        }
    }
    let mut values = Vec::with_capacity(bound.len());
    for (decl, b) in g.symbols.iter().zip(&bound) {
        match b {
            Some((v, ..)) => values.push(*v),
            None => {
                return Err(EvalError::Symbol(format!(
                    "no input axis is exactly `{}`, so its value cannot be read from the inputs",
                    decl.name
                )))
            }
        }
    }
    // Every symbolic axis agrees with the values bound.
    for &(name, dims, shape) in &inputs {
        let Some(shape) = shape else { continue };
        for (axis, (d, &got)) in dims.iter().zip(shape).enumerate() {
            let Dim::Sym(e) = d else { continue };
            let want = e.eval(&values);
            if want == i64::try_from(got).ok() {
                continue;
            }
            let want = want.map_or_else(|| "out of range".to_string(), |w| w.to_string());
            let source = match e.as_symbol().and_then(|s| bound[s.index as usize]) {
                Some((_, from, from_axis)) => format!(" (from input `{from}` axis {from_axis})"),
                None => String::new(),
            };
            return Err(EvalError::Symbol(format!(
                "input `{name}` axis {axis} is {got}, but `{e}` is {want}{source}"
            )));
        }
    }
    Ok(values)
}
