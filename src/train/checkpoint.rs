//! Checkpoints: one `.safetensors` file with the parameters by checkpoint name (so
//! `kiln compile --weights` and `kiln eval --weights` read it), the optimizer state
//! (`optim.KIND.NAME`, `optim.step`), and in its metadata where training stands. The file's
//! bytes depend only on those values: a resumed run that reaches the same point writes the
//! same file.

use super::stepper::Raw;
use crate::commands::{user, write_atomically, Failure};
use kiln_ir::DType;
use std::collections::HashMap;
use std::path::Path;

/// The metadata key under which [`Position`] is stored, as one JSON object (one key, so the
/// header's bytes do not depend on a map's iteration order).
const KEY: &str = "kiln.train";

/// Where training stands: everything besides the tensors that a resume needs to continue
/// exactly as the uninterrupted run would have.
#[derive(Clone, Debug, PartialEq)]
pub struct Position {
    /// The model's name, to refuse another model's checkpoint.
    pub model: String,
    /// Epochs completed.
    pub epoch: usize,
    /// Batches of epoch `epoch` already taken (0 at an epoch's end).
    pub batch: usize,
    /// The seed of the held-out split and of every epoch's order.
    pub seed: u64,
    /// The number of training examples (after the split): a resume on other data is refused.
    pub examples: usize,
    /// The sum of this epoch's step losses so far, so its mean comes out the same.
    pub loss_sum: f64,
}

impl Position {
    fn to_json(&self) -> String {
        // Keys in a fixed order, the sum as its bits: the text is a function of the values.
        format!(
            "{{\"format\":1,\"model\":{},\"epoch\":{},\"batch\":{},\"seed\":{},\"examples\":{},\"loss_sum_bits\":{}}}",
            serde_json::Value::String(self.model.clone()),
            self.epoch,
            self.batch,
            self.seed,
            self.examples,
            self.loss_sum.to_bits()
        )
    }

    fn from_json(text: &str) -> Option<Position> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        if v.get("format")?.as_u64()? != 1 {
            return None;
        }
        Some(Position {
            model: v.get("model")?.as_str()?.to_string(),
            epoch: usize::try_from(v.get("epoch")?.as_u64()?).ok()?,
            batch: usize::try_from(v.get("batch")?.as_u64()?).ok()?,
            seed: v.get("seed")?.as_u64()?,
            examples: usize::try_from(v.get("examples")?.as_u64()?).ok()?,
            loss_sum: f64::from_bits(v.get("loss_sum_bits")?.as_u64()?),
        })
    }
}

/// A tensor of the checkpoint, for the safetensors writer.
struct View<'a> {
    raw: &'a Raw,
    shape: Vec<usize>,
}

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        match self.raw.dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::F64 => safetensors::Dtype::F64,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::I32 => safetensors::Dtype::I32,
            DType::I64 => safetensors::Dtype::I64,
            DType::Bool => safetensors::Dtype::BOOL,
        }
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.raw.bytes)
    }
    fn data_len(&self) -> usize {
        self.raw.bytes.len()
    }
}

/// Writes the checkpoint `path` atomically (a temporary file beside it, then a rename), so
/// an interrupted write leaves the previous checkpoint whole.
pub fn write(path: &Path, tensors: &[Raw], at: &Position) -> Result<(), Failure> {
    let views: Vec<(String, View)> = tensors
        .iter()
        .map(|t| (t.name.clone(), View { raw: t, shape: t.shape.iter().map(|&d| d as usize).collect() }))
        .collect();
    let meta = HashMap::from([(KEY.to_string(), at.to_json())]);
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| user(format!("cannot write the checkpoint {}: {e}", path.display())))?;
    write_atomically(path, |tmp| {
        std::fs::write(tmp, &bytes).map_err(|e| user(format!("cannot write {}: {e}", path.display())))
    })
}

/// Reads a checkpoint that [`write`] wrote.
pub fn read(path: &Path) -> Result<(Vec<Raw>, Position), Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| user(format!("cannot read the checkpoint {}: {e}", path.display())))?;
    let bad = |why: String| user(format!("{} is not a `kiln train` checkpoint: {why}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let at = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(KEY))
        .and_then(|text| Position::from_json(text))
        .ok_or_else(|| bad(format!("its metadata has no valid `{KEY}` entry")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F64 => DType::F64,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::I32 => DType::I32,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::BOOL => DType::Bool,
            other => return Err(bad(format!("tensor `{name}` has dtype {other}"))),
        };
        let shape = view.shape().iter().map(|&d| d as u64).collect();
        tensors.push(Raw { name, dtype, shape, bytes: view.data().to_vec() });
    }
    Ok((tensors, at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_through_their_text() {
        let at = Position {
            model: "m\"x".into(),
            epoch: 3,
            batch: 17,
            seed: u64::MAX,
            examples: 1437,
            loss_sum: 0.1 + 0.2,
        };
        let text = at.to_json();
        assert_eq!(Position::from_json(&text), Some(at));
        assert!(text.starts_with("{\"format\":1,\"model\":\"m\\\"x\",\"epoch\":3,\"batch\":17,"), "{text}");
    }
}
