//! A training data set: one tensor per model input, examples along the first axis, kept as
//! little-endian bytes (the runtime's layout) so a batch is a copy of rows. Also the seeded
//! orders: the held-out split and each epoch's shuffle are pure functions of the seed, so a
//! resumed run draws exactly what an uninterrupted one would have.

use crate::commands::{user, Failure};
use kiln_ir::{fmt_shape, DType, Tensor};
use std::path::Path;

/// One model input's column of examples.
pub struct Column {
    pub name: String,
    pub dtype: DType,
    /// The shape of one example (the input's shape without its batch axis).
    pub example_shape: Vec<usize>,
    bytes: Vec<u8>,
    example_bytes: usize,
}

/// What the model wants for one input: its name, dtype and the shape of one example.
pub struct InputSpec {
    pub name: String,
    pub dtype: DType,
    pub example_shape: Vec<usize>,
    /// For an integer input used as indices or class labels: every value must be in
    /// `0..bound` (or equal to `ignore`).
    pub bound: Option<(usize, Option<i64>)>,
}

pub struct Dataset {
    pub columns: Vec<Column>,
    examples: usize,
}

/// Reads tensors from a `.safetensors` file (by name), a `.npy` file (named by its stem) or a
/// folder of `NAME.npy` files.
pub fn read(path: &Path) -> Result<Vec<(String, Tensor)>, Failure> {
    if path.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| user(format!("cannot read {}: {e}", path.display())))?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "npy"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(user(format!("the folder {} holds no .npy file", path.display())));
        }
        files
            .iter()
            .map(|f| {
                let name = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                kiln_ir::tensor_io::read_npy(f).map(|t| (name, t)).map_err(|e| user(e.to_string()))
            })
            .collect()
    } else {
        kiln_ir::tensor_io::read_tensors(path).map_err(|e| user(e.to_string()))
    }
}

impl Dataset {
    /// The columns `inputs` ask for, from `tensors` read from `from`. Every input must be
    /// there with its dtype and example shape, all with the same number of examples; tensors
    /// no input reads are named in a warning.
    pub fn new(
        tensors: Vec<(String, Tensor)>,
        inputs: &[InputSpec],
        from: &Path,
    ) -> Result<Dataset, Failure> {
        let file = from.display();
        let mut columns: Vec<Column> = Vec::with_capacity(inputs.len());
        let mut first: Option<(String, usize)> = None;
        for spec in inputs {
            let Some((_, t)) = tensors.iter().find(|(n, _)| *n == spec.name) else {
                let held: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
                return Err(user(format!(
                    "{file} has no tensor `{}` for the model's input `{}` (it holds: {})",
                    spec.name,
                    spec.name,
                    held.join(", ")
                )));
            };
            let want = format!("{}{} per example", spec.dtype, fmt_shape(&spec.example_shape));
            if t.dtype() != spec.dtype
                || t.shape.len() != spec.example_shape.len() + 1
                || t.shape[1..] != spec.example_shape
            {
                return Err(user(format!(
                    "tensor `{}` of {file} is {}{}: the model's input `{}` takes {want}, so the tensor must be {}[examples{}]",
                    spec.name,
                    t.dtype(),
                    fmt_shape(&t.shape),
                    spec.name,
                    spec.dtype,
                    spec.example_shape.iter().map(|d| format!(", {d}")).collect::<String>()
                )));
            }
            let n = t.shape[0];
            match &first {
                None => first = Some((spec.name.clone(), n)),
                Some((other, m)) if *m != n => {
                    return Err(user(format!(
                        "tensor `{}` of {file} has {n} examples but `{other}` has {m}: every input needs one entry per example",
                        spec.name
                    )))
                }
                Some(_) => {}
            }
            if let Some((bound, ignore)) = spec.bound {
                check_indices(&spec.name, t, bound, ignore, from)?;
            }
            let bytes = t.data.to_le_bytes();
            let example_bytes = bytes.len().checked_div(n).unwrap_or(0);
            columns.push(Column {
                name: spec.name.clone(),
                dtype: spec.dtype,
                example_shape: spec.example_shape.clone(),
                bytes,
                example_bytes,
            });
        }
        let unused: Vec<&str> = tensors
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !inputs.iter().any(|s| s.name == *n))
            .collect();
        if !unused.is_empty() {
            eprintln!(
                "warning: {file}: no input reads {}",
                unused.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ")
            );
        }
        let examples = first.map_or(0, |(_, n)| n);
        Ok(Dataset { columns, examples })
    }

    pub fn len(&self) -> usize {
        self.examples
    }

    /// A data set of the examples `rows`, in that order.
    pub fn subset(&self, rows: &[usize]) -> Dataset {
        let columns = self
            .columns
            .iter()
            .map(|c| Column {
                name: c.name.clone(),
                dtype: c.dtype,
                example_shape: c.example_shape.clone(),
                bytes: c.rows(rows),
                example_bytes: c.example_bytes,
            })
            .collect();
        Dataset { columns, examples: rows.len() }
    }

    /// The bytes of each column for the examples `rows`, one after the other: a batch.
    pub fn batch(&self, rows: &[usize]) -> Vec<Vec<u8>> {
        self.columns.iter().map(|c| c.rows(rows)).collect()
    }
}

impl Column {
    fn rows(&self, rows: &[usize]) -> Vec<u8> {
        let mut out = Vec::with_capacity(rows.len() * self.example_bytes);
        for &r in rows {
            out.extend_from_slice(&self.bytes[r * self.example_bytes..(r + 1) * self.example_bytes]);
        }
        out
    }
}

/// Indices and labels out of their range would make the compiled code read outside a table:
/// they are refused when the data is read.
fn check_indices(
    name: &str,
    t: &Tensor,
    bound: usize,
    ignore: Option<i64>,
    from: &Path,
) -> Result<(), Failure> {
    let values = t.to_f64_vec();
    let bad = values.iter().position(|&v| !(v >= 0.0 && v < bound as f64) && Some(v as i64) != ignore);
    match bad {
        None => Ok(()),
        Some(i) => {
            let allowed = match ignore {
                Some(ig) => format!("0..{bound} (or {ig}, left out of the loss)"),
                None => format!("0..{bound}"),
            };
            Err(user(format!(
                "tensor `{name}` of {} holds {} at element {i}: its values must be in {allowed}",
                from.display(),
                values[i]
            )))
        }
    }
}

/// A seeded permutation of `0..n` (Fisher–Yates over Kiln's counter-based generator): the
/// stream keeps the held-out split and each epoch's order independent of each other.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = (kiln_ir::rng::bits(seed, stream, i as u64) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

/// The stream of the held-out split; epoch `e`'s order is stream `e + 1`.
const SPLIT_STREAM: u64 = u64::MAX;

/// The examples to train on and those held out: a seeded `fraction` of `0..n` held out.
pub fn split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let order = permutation(n, seed, SPLIT_STREAM);
    let held = ((n as f64) * fraction).round() as usize;
    let (train, eval) = order.split_at(n - held.min(n));
    (train.to_vec(), eval.to_vec())
}

/// The order of the training examples in epoch `epoch` (0-based).
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    permutation(n, seed, epoch as u64 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_seeded_permutations() {
        let a = permutation(50, 7, 1);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, permutation(50, 7, 1));
        assert_ne!(a, permutation(50, 7, 2));
        assert_ne!(a, permutation(50, 8, 1));
        let (train, eval) = split(10, 0.2, 7);
        assert_eq!((train.len(), eval.len()), (8, 2));
        assert!(eval.iter().all(|e| !train.contains(e)));
    }
}
