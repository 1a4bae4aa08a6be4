//! Seeded stand-ins for model inputs: what `kiln eval` and `kiln run` feed an input they are
//! not given, and what the test suites feed the graphs they check.
//!
//! The values are a pure function of the input's name, dtype, shape, the graph around it and
//! the seed (one [`rng`](crate::rng) stream per input name), so a run can be repeated exactly
//! and two paths (interpreter, compiled code) can be fed the same numbers. They are chosen so
//! that the model computes something meaningful rather than merely something: indices stay
//! inside the table they index, and masks keep most positions, so no attention row is
//! entirely masked out.

use crate::rng;
use crate::{AllocError, Buffer, DType, Graph, NodeId, Op, Tensor};
use std::collections::HashMap;
use std::fmt;

/// The share of positions a generated mask keeps.
const MASK_KEEP: f64 = 0.8;

/// How a generated input was filled, for a note to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputFill {
    /// Floats: standard normal values.
    Normal,
    /// Integers that index a `Gather`: uniform in `[0, bound)`, `bound` the smallest table
    /// they index along the gathered axis.
    Indices { bound: usize },
    /// An integer or bool input whose name says it is a mask (`mask`, `keep`): 1 (true) with
    /// probability 0.8, so attention over it keeps most positions.
    Mask,
    /// Any other integer input: 0 or 1 with equal probability.
    ZeroOne,
    /// Any other bool input: true or false with equal probability.
    TrueFalse,
}

impl fmt::Display for InputFill {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputFill::Normal => f.write_str("standard normal values"),
            InputFill::Indices { bound } => write!(f, "random indices in [0, {bound})"),
            InputFill::Mask => write!(f, "a random mask keeping {:.0} % of positions", MASK_KEEP * 100.0),
            InputFill::ZeroOne => f.write_str("random 0/1 values"),
            InputFill::TrueFalse => f.write_str("random true/false"),
        }
    }
}

/// A generated input and how it was filled.
#[derive(Clone, Debug, PartialEq)]
pub struct SeededInput {
    pub tensor: Tensor,
    pub fill: InputFill,
}

/// A deterministic stand-in for the input `name` of `dtype` and `shape`.
///
/// `graph`, when there is one, is searched for the input named `name` so that integers it
/// feeds as `Gather` indices stay inside the table they index; without it (an artifact run
/// on its own) integers are 0/1 or a mask. The dtype and shape are taken as given rather than
/// read from the graph, because the caller's source of truth may be an artifact's manifest.
///
/// The tensor's memory is reserved first: a shape the system cannot hold (`--set
/// batch=100000000`) is an [`AllocError`] saying how much was asked, not an abort.
pub fn seeded_input(
    graph: Option<&Graph>,
    name: &str,
    dtype: DType,
    shape: &[usize],
    seed: u64,
) -> Result<SeededInput, AllocError> {
    let bound = graph.and_then(|g| index_bound(g, name));
    seeded_input_bounded(name, dtype, shape, bound, seed)
}

/// [`seeded_input`] for a caller that knows the input's index bound without the graph (an
/// artifact records it: `kiln run` then draws what `kiln eval` draws).
pub fn seeded_input_bounded(
    name: &str,
    dtype: DType,
    shape: &[usize],
    index_bound: Option<usize>,
    seed: u64,
) -> Result<SeededInput, AllocError> {
    fill(name, dtype, shape, index_bound, seed)
}

/// The bound generated values of input `name` must stay below: the smallest extent along the
/// gathered axis of the tables it indexes, if it is the index operand of any `Gather`.
pub fn index_bound(g: &Graph, name: &str) -> Option<usize> {
    let id = g
        .inputs
        .iter()
        .copied()
        .find(|&i| matches!(&g.node(i).op, Op::Input { name: n, .. } if n == name))?;
    gather_index_bound(g, id)
}

/// [`seeded_input`] for every input of `g`, by name: the test suites' helper, for graphs
/// they build themselves.
///
/// # Panics
/// When an input cannot be allocated; user-sized inputs go through [`seeded_input`], which
/// returns that as an error.
pub fn seeded_inputs(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    g.inputs
        .iter()
        .filter_map(|&i| match &g.node(i).op {
            Op::Input { name, dtype, .. } => Some(
                fill(name, *dtype, &g.ty(i).static_shape(), gather_index_bound(g, i), seed)
                    .map(|s| (name.clone(), s.tensor))
                    .unwrap_or_else(|e| panic!("seeded_inputs: {e}")),
            ),
            _ => None,
        })
        .collect()
}

/// The smallest extent along the gathered axis of the tables that `input` indexes, if it is
/// the index operand of any `Gather` (or of a `ScatterAdd`, a gather's gradient).
fn gather_index_bound(g: &Graph, input: NodeId) -> Option<usize> {
    g.users(input)
        .into_iter()
        .filter_map(|u| match g.node(u).op {
            Op::Gather { axis } => {
                let operands = g.operands(u);
                (operands.get(1) == Some(&input)).then(|| g.ty(operands[0]).shape[axis].as_const()).flatten()
            }
            Op::ScatterAdd { extent, .. } => (g.operands(u).get(1) == Some(&input)).then_some(extent),
            _ => None,
        })
        .min()
}

fn fill(
    name: &str,
    dtype: DType,
    shape: &[usize],
    index_bound: Option<usize>,
    seed: u64,
) -> Result<SeededInput, AllocError> {
    let fill = if dtype.is_float() {
        InputFill::Normal
    } else if let Some(bound) = index_bound {
        InputFill::Indices { bound }
    } else if name.contains("mask") || name.contains("keep") {
        InputFill::Mask
    } else if dtype == DType::Bool {
        InputFill::TrueFalse
    } else {
        InputFill::ZeroOne
    };
    let stream = rng::stream_of(name);
    let value = |i: usize| {
        let i = i as u64;
        match fill {
            InputFill::Normal => rng::normal(seed, stream, i),
            // `uniform` is below 1, and so is the rounded product's floor below `bound`; the
            // `min` keeps that true whatever the rounding.
            // (An empty table, `bound` 0, has no valid index; 0 makes the gather's error
            // name index 0 rather than -1.)
            InputFill::Indices { bound } => {
                (rng::uniform(seed, stream, i) * bound as f64).floor().min(bound.saturating_sub(1) as f64)
            }
            InputFill::Mask => f64::from(u8::from(rng::uniform(seed, stream, i) < MASK_KEEP)),
            InputFill::ZeroOne | InputFill::TrueFalse => (rng::uniform(seed, stream, i) * 2.0).floor(),
        }
    };
    let n = crate::numel(shape);
    let data = Buffer::try_from_f64(dtype, n, (0..n).map(value), || {
        crate::alloc::describe(&format!("input `{name}`"), dtype, shape)
    })?;
    Ok(SeededInput { tensor: Tensor { shape: shape.to_vec(), data }, fill })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ids` (i64 [2, 3]) gathers rows of `table` (f32 [5, 4]); `mask` (i64 [2, 3]) and
    /// `flags` (bool [7]) are read by nothing that bounds them.
    fn graph() -> Graph {
        let mut g = Graph::new("seeded");
        let mut input = |name: &str, dtype: DType, shape: &[usize]| {
            g.add(Op::Input { name: name.into(), dtype, shape: crate::dtype::dims(shape) }, &[])
                .expect("an input")
        };
        let table = input("table", DType::F32, &[5, 4]);
        let ids = input("ids", DType::I64, &[2, 3]);
        input("attention_mask", DType::I64, &[2, 3]);
        input("flags", DType::Bool, &[7]);
        let gathered = g.add(Op::Gather { axis: 0 }, &[table, ids]).expect("gather types");
        g.add_output("gathered", gathered);
        g
    }

    #[test]
    fn each_kind_of_input_gets_its_fill() {
        let g = graph();
        let fill = |name: &str, dtype, shape: &[usize]| {
            seeded_input(Some(&g), name, dtype, shape, 3).expect("small").fill
        };
        assert_eq!(fill("table", DType::F32, &[5, 4]), InputFill::Normal);
        assert_eq!(fill("ids", DType::I64, &[2, 3]), InputFill::Indices { bound: 5 });
        assert_eq!(fill("attention_mask", DType::I64, &[2, 3]), InputFill::Mask);
        assert_eq!(fill("flags", DType::Bool, &[7]), InputFill::TrueFalse);
        // Without the graph nothing is known to be an index.
        assert_eq!(
            seeded_input(None, "ids", DType::I64, &[2, 3], 3).expect("small").fill,
            InputFill::ZeroOne
        );
    }

    #[test]
    fn values_are_deterministic_and_in_range() {
        let g = graph();
        let a = seeded_inputs(&g, 11);
        assert_eq!(a, seeded_inputs(&g, 11));
        assert_ne!(a["table"], seeded_inputs(&g, 12)["table"]);
        assert!(a["ids"].data.to_f64_vec().iter().all(|&x| (0.0..5.0).contains(&x) && x.fract() == 0.0));
        let big =
            seeded_input(None, "keep", DType::I32, &[10_000], 1).expect("small").tensor.data.to_f64_vec();
        let kept = big.iter().filter(|&&x| x == 1.0).count() as f64 / big.len() as f64;
        assert!(big.iter().all(|&x| x == 0.0 || x == 1.0));
        assert!((kept - MASK_KEEP).abs() < 0.02, "kept {kept}");
        // The same name, dtype and shape give the same values with or without a graph.
        assert_eq!(
            seeded_input(Some(&g), "table", DType::F32, &[5, 4], 11).expect("small").tensor,
            a["table"]
        );
    }

    #[test]
    fn an_input_too_large_to_hold_is_an_error() {
        let e = seeded_input(None, "image", DType::F32, &[1 << 40, 1 << 20], 0).expect_err("2^62 f32");
        assert_eq!(e.bytes, 1u128 << 62);
        assert!(e.to_string().contains("for input `image` f32[1099511627776, 1048576]"), "{e}");
    }
}
