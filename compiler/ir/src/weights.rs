//! Binding a graph's parameters to values: from a weights file, from their initializers, or
//! both.

use crate::dtype::{fmt_shape, TensorType};
use crate::graph::Graph;
use crate::init::init_param;
use crate::op::Op;
use crate::tensor::Tensor;
use std::collections::{HashMap, HashSet};
use std::fmt;

/// How many names each list in a [`WeightsError`] message shows before "… and N more".
const SHOWN: usize = 10;

/// A parameter the weights file does not provide.
#[derive(Debug, Clone, PartialEq)]
pub struct MissingWeight {
    pub name: String,
    /// An unused file tensor whose name is a few edits away, if any.
    pub did_you_mean: Option<String>,
}

/// A file tensor whose type does not fit its parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightMismatch {
    pub name: String,
    pub file: TensorType,
    pub model: TensorType,
}

/// A file tensor that no parameter uses.
#[derive(Debug, Clone, PartialEq)]
pub struct UnusedWeight {
    pub name: String,
    /// A parameter the file does not provide (so it was initialized) whose name is a few edits
    /// away, if any: the likely intended target of a misspelt name.
    pub did_you_mean: Option<String>,
}

/// What [`bind_params_with_warnings`] binds despite: file tensors that no parameter uses.
///
/// Not an error: checkpoints routinely carry tensors a model does not need (BERT's
/// `embeddings.position_ids` buffer and its `pooler.*` head when only the encoder is used).
/// The CLI prints it on stderr; a name that is a near miss of an initialized parameter says so.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WeightsWarning {
    /// File tensors that no parameter uses, in file order.
    pub unused: Vec<UnusedWeight>,
}

impl WeightsWarning {
    /// True when there is nothing to report.
    pub fn is_empty(&self) -> bool {
        self.unused.is_empty()
    }
}

impl fmt::Display for WeightsWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.unused.is_empty() {
            return Ok(());
        }
        write!(
            f,
            "ignoring {} in the weights file that the model does not use: {}",
            count(self.unused.len(), "tensor"),
            list(&self.unused, |u| match &u.did_you_mean {
                Some(p) => format!("{} (did you mean parameter `{p}`? it was initialized instead)", u.name),
                None => u.name.clone(),
            })
        )
    }
}

/// Everything wrong between a graph's parameters and a weights file, reported at once.
#[derive(Debug, Clone, PartialEq, Default, thiserror::Error)]
pub struct WeightsError {
    /// Parameters with no tensor in the file (only when `init_missing` is false).
    pub missing: Vec<MissingWeight>,
    /// File tensors that no parameter uses. Not an error by itself (see [`WeightsWarning`]),
    /// but listed along with the errors, since a naming mismatch (a prefix, a different
    /// scope) shows up on both sides.
    pub unused: Vec<String>,
    /// Tensors whose shape differs, or whose dtype differs and cannot be converted.
    pub mismatched: Vec<WeightMismatch>,
    /// Names that appear more than once in the file.
    pub duplicates: Vec<String>,
    /// Parameter names declared twice in the graph with different types.
    pub conflicting: Vec<String>,
    /// The first parameter to initialize that the system would not give memory for (the
    /// rest are not tried: what does not fit once will not fit again).
    pub unallocated: Option<crate::AllocError>,
}

impl WeightsError {
    /// True when nothing is wrong (`unused` alone is not an error).
    fn is_empty(&self) -> bool {
        self.missing.is_empty()
            && self.mismatched.is_empty()
            && self.duplicates.is_empty()
            && self.conflicting.is_empty()
            && self.unallocated.is_none()
    }
}

/// `a, b, c` with at most [`SHOWN`] items and "… and N more".
fn list<T>(items: &[T], show: impl Fn(&T) -> String) -> String {
    let mut parts: Vec<String> = items.iter().take(SHOWN).map(show).collect();
    if items.len() > SHOWN {
        parts.push(format!("… and {} more", items.len() - SHOWN));
    }
    parts.join(", ")
}

fn count(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

/// The types as the message shows them: shapes alone when the dtypes agree.
fn types(m: &WeightMismatch) -> (String, String) {
    if m.file.dtype == m.model.dtype {
        (fmt_shape(&m.file.shape), fmt_shape(&m.model.shape))
    } else if m.file.shape == m.model.shape {
        (m.file.dtype.to_string(), m.model.dtype.to_string())
    } else {
        (m.file.to_string(), m.model.to_string())
    }
}

impl fmt::Display for WeightsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut lines = Vec::new();
        if !self.missing.is_empty() {
            lines.push(format!(
                "missing weights for {}: {}",
                count(self.missing.len(), "parameter"),
                list(&self.missing, |m| match &m.did_you_mean {
                    Some(s) => format!("{} (did you mean `{s}`?)", m.name),
                    None => m.name.clone(),
                })
            ));
        }
        for m in self.mismatched.iter().take(SHOWN) {
            let (file, model) = types(m);
            lines.push(format!("`{}`: file has {file}, the model expects {model}", m.name));
        }
        if self.mismatched.len() > SHOWN {
            lines.push(format!("… and {} more tensors of the wrong type", self.mismatched.len() - SHOWN));
        }
        if !self.duplicates.is_empty() {
            lines.push(format!(
                "duplicate tensor names in weights file: {}",
                list(&self.duplicates, |n| n.clone())
            ));
        }
        if !self.conflicting.is_empty() {
            lines.push(format!(
                "parameters declared twice with different types: {}",
                list(&self.conflicting, |n| n.clone())
            ));
        }
        if let Some(e) = &self.unallocated {
            lines.push(e.to_string());
        }
        if !self.unused.is_empty() {
            lines.push(format!(
                "also, tensors in the weights file that the model does not use: {} (the model has \
                 no parameters with these names)",
                list(&self.unused, |n| n.clone())
            ));
        }
        f.write_str(&lines.join("\n"))
    }
}

/// The closest of `candidates` to `name`, when it is a small edit away (transpositions
/// count as one edit) and the names share more than they differ.
fn suggest(name: &str, candidates: &[&str]) -> Option<String> {
    let limit = (name.chars().count() / 3).clamp(1, 3);
    candidates
        .iter()
        .map(|u| (strsim::damerau_levenshtein(name, u), *u))
        .filter(|&(d, u)| d <= limit && 2 * d < name.chars().count().max(u.chars().count()))
        .min()
        .map(|(_, u)| u.to_string())
}

/// A value for every `param` of the graph, by checkpoint name, as
/// [`bind_params_with_warnings`] binds it, without the warning. For a user's weights file, use
/// that function and show the warning.
pub fn bind_params(
    g: &Graph,
    weights: Option<&[(String, Tensor)]>,
    seed: u64,
    init_missing: bool,
) -> Result<HashMap<String, Tensor>, Box<WeightsError>> {
    bind_params_with_warnings(g, weights, seed, init_missing).map(|(params, _)| params)
}

/// A value for every `param` of the graph, by checkpoint name, and what to warn about.
///
/// * With `weights`, each parameter takes the tensor of exactly its name. The shape must
///   match exactly. The dtype must match, except that a float tensor is converted to a
///   parameter of another float dtype (rounding to nearest even, e.g. f32 → bf16); integer
///   or bool mismatches are errors.
/// * A parameter the file lacks is initialized from its [`Init`](crate::Init) with
///   [`init_param`]`(name, init, dtype, shape, seed)` when `weights` is `None` or
///   `init_missing` is true, and is an error otherwise (with a did-you-mean hint when an
///   unused file name is a near miss).
/// * A file tensor that no parameter uses is ignored and reported in the [`WeightsWarning`]
///   (with a did-you-mean hint when it is a near miss of a parameter that was initialized),
///   so a real checkpoint loads as it is, extra buffers and heads included.
///
/// * A parameter whose memory the system refuses (a config asking for terabytes of weights)
///   is reported in [`WeightsError::unallocated`], not an abort.
///
/// All errors are collected into one [`WeightsError`] (boxed: it holds six lists).
pub fn bind_params_with_warnings(
    g: &Graph,
    weights: Option<&[(String, Tensor)]>,
    seed: u64,
    init_missing: bool,
) -> Result<(HashMap<String, Tensor>, WeightsWarning), Box<WeightsError>> {
    let mut err = WeightsError::default();
    let mut file: HashMap<&str, &Tensor> = HashMap::new();
    for (name, t) in weights.unwrap_or_default() {
        if file.insert(name.as_str(), t).is_some() && !err.duplicates.contains(name) {
            err.duplicates.push(name.clone());
        }
    }
    // The graph's parameters, once per name, in topological order.
    let mut params: Vec<(&str, &crate::Init, &TensorType)> = Vec::new();
    let mut declared: HashMap<&str, &TensorType> = HashMap::new();
    for id in g.params() {
        let node = g.node(id);
        let Op::Param { name, init, .. } = &node.op else { continue };
        match declared.get(name.as_str()) {
            Some(ty) if **ty != node.ty => {
                if !err.conflicting.contains(name) {
                    err.conflicting.push(name.clone());
                }
            }
            Some(_) => {}
            None => {
                declared.insert(name, &node.ty);
                params.push((name, init, &node.ty));
            }
        }
    }

    let mut out = HashMap::with_capacity(params.len());
    let mut missing = Vec::new();
    let mut initialized = Vec::new();
    for &(name, init, ty) in &params {
        match file.get(name) {
            Some(t) => {
                let got = TensorType::new(t.dtype(), t.shape.clone());
                let convertible = got.dtype.is_float() && ty.dtype.is_float();
                if got.shape != ty.shape || (got.dtype != ty.dtype && !convertible) {
                    err.mismatched.push(WeightMismatch {
                        name: name.to_string(),
                        file: got,
                        model: ty.clone(),
                    });
                } else {
                    out.insert(name.to_string(), t.cast(ty.dtype));
                }
            }
            None if err.unallocated.is_some() => {}
            None if weights.is_none() || init_missing => {
                match init_param(name, init, ty.dtype, &ty.static_shape(), seed) {
                    Ok(t) => {
                        out.insert(name.to_string(), t);
                        initialized.push(name);
                    }
                    Err(e) => err.unallocated = Some(e),
                }
            }
            None => missing.push(name),
        }
    }
    // Unused names in file order (first occurrence).
    let mut seen = HashSet::new();
    for (name, _) in weights.unwrap_or_default() {
        if !declared.contains_key(name.as_str()) && seen.insert(name.as_str()) {
            err.unused.push(name.clone());
        }
    }
    let unused: Vec<&str> = err.unused.iter().map(String::as_str).collect();
    err.missing = missing
        .into_iter()
        .map(|name| MissingWeight { name: name.to_string(), did_you_mean: suggest(name, &unused) })
        .collect();
    if !err.is_empty() {
        return Err(Box::new(err));
    }
    let warning = WeightsWarning {
        unused: err
            .unused
            .into_iter()
            .map(|name| {
                let did_you_mean = suggest(&name, &initialized);
                UnusedWeight { name, did_you_mean }
            })
            .collect(),
    };
    Ok((out, warning))
}
