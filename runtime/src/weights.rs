//! `WeightStore`: the named parameter and constant tensors a model's steps read. From an
//! artifact they stay in the memory-mapped safetensors file (no copy); a JIT can hand over owned
//! buffers instead.

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensors};

use crate::buffer::AlignedBuf;
use crate::error::RuntimeError;
use crate::manifest::DType;

/// Named tensors, immutable for the store's lifetime; kernels get read-only pointers into it.
#[derive(Debug)]
pub struct WeightStore {
    /// The mapped file, or `None` for owned weights.
    map: Option<Mmap>,
    /// Owned bytes: tensors given in memory and mapped tensors that were misaligned.
    owned: AlignedBuf,
    entries: HashMap<String, Entry>,
    origin: String,
}

#[derive(Debug)]
struct Entry {
    dtype: DType,
    shape: Vec<u64>,
    place: Place,
    start: usize,
    len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Place {
    Mapped,
    Owned,
}

/// One tensor of a [`WeightStore`].
#[derive(Debug, Clone, Copy)]
pub struct WeightView<'a> {
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: &'a [u64],
    /// Little-endian bytes, aligned to the dtype's size at least.
    pub bytes: &'a [u8],
}

impl WeightStore {
    /// Memory-maps a safetensors file. Tensors misaligned for their dtype (possible in files not
    /// written by Kiln) are copied to aligned memory; the others are used in place.
    pub fn open(path: impl AsRef<Path>) -> Result<WeightStore, RuntimeError> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| RuntimeError::io(path, e))?;
        // SAFETY: the map is read-only. Like every mmap-based loader we rely on the artifact not
        // being modified while it is loaded; the crc32 check at load catches earlier damage.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| RuntimeError::io(path, e))?;
        WeightStore::from_map(map, path.display().to_string())
    }

    /// Parses an already mapped safetensors file (the loader maps once to check its crc32 too).
    pub(crate) fn from_map(map: Mmap, origin: String) -> Result<WeightStore, RuntimeError> {
        let bad = |message: String| RuntimeError::Weights { origin: origin.clone(), message };
        let (header_len, metadata) = SafeTensors::read_metadata(&map[..]).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + header_len;
        let mut entries = HashMap::new();
        let mut misaligned = Vec::new();
        for (name, info) in metadata.tensors() {
            let dtype = dtype_of(info.dtype).ok_or_else(|| {
                bad(format!("tensor {name:?} has dtype {}, which Kiln does not use", info.dtype))
            })?;
            let (begin, end) = info.data_offsets;
            let start = data_start + begin;
            let len = end - begin;
            let shape = info.shape.iter().map(|&d| d as u64).collect();
            let aligned = (map.as_ptr() as usize + start).is_multiple_of(dtype.size_bytes());
            if !aligned {
                misaligned.push((name.clone(), start, len));
            }
            entries.insert(name, Entry { dtype, shape, place: Place::Mapped, start, len });
        }
        let mut owned = AlignedBuf::zeroed(packed_len(misaligned.iter().map(|m| m.2)), "realigned weights")?;
        let mut at = 0;
        for (name, start, len) in misaligned {
            owned.as_mut_slice()[at..at + len].copy_from_slice(&map[start..start + len]);
            if let Some(entry) = entries.get_mut(&name) {
                entry.place = Place::Owned;
                entry.start = at;
            }
            at = padded(at + len);
        }
        Ok(WeightStore { map: Some(map), owned, entries, origin })
    }

    /// Weights held in memory, e.g. by a JIT: `(name, dtype, shape, little-endian bytes)`.
    /// The bytes are packed into one 64-byte aligned block.
    pub fn from_owned(tensors: Vec<(String, DType, Vec<u64>, Vec<u8>)>) -> Result<WeightStore, RuntimeError> {
        let origin = "in memory".to_string();
        let bad = |message: String| RuntimeError::Weights { origin: origin.clone(), message };
        let mut owned = AlignedBuf::zeroed(packed_len(tensors.iter().map(|t| t.3.len())), "weights")?;
        let mut entries = HashMap::new();
        let mut at = 0;
        for (name, dtype, shape, bytes) in tensors {
            let expected = shape.iter().try_fold(dtype.size_bytes() as u64, |n, &d| n.checked_mul(d));
            if expected != Some(bytes.len() as u64) {
                return Err(bad(format!(
                    "tensor {name:?} ({dtype} {shape:?}) needs {} bytes, got {}",
                    expected.map_or("too many".to_string(), |n| n.to_string()),
                    bytes.len()
                )));
            }
            owned.as_mut_slice()[at..at + bytes.len()].copy_from_slice(&bytes);
            let entry = Entry { dtype, shape, place: Place::Owned, start: at, len: bytes.len() };
            at = padded(at + bytes.len());
            if entries.insert(name.clone(), entry).is_some() {
                return Err(bad(format!("tensor {name:?} is given twice")));
            }
        }
        Ok(WeightStore { map: None, owned, entries, origin })
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<WeightView<'_>> {
        let entry = self.entries.get(name)?;
        let bytes = match (entry.place, &self.map) {
            (Place::Mapped, Some(map)) => &map[entry.start..entry.start + entry.len],
            _ => &self.owned.as_slice()[entry.start..entry.start + entry.len],
        };
        Some(WeightView { dtype: entry.dtype, shape: &entry.shape, bytes })
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.entries.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the store holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Where the weights came from, for error messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

/// Rounds up to the next multiple of 64, so each packed tensor starts aligned.
fn padded(n: usize) -> usize {
    n.div_ceil(crate::buffer::ALIGN) * crate::buffer::ALIGN
}

fn packed_len(lens: impl Iterator<Item = usize>) -> u64 {
    lens.map(padded).sum::<usize>() as u64
}

fn dtype_of(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BOOL => DType::Bool,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A safetensors file whose data section starts at an odd offset, as a hand-made file may.
    fn odd_file(dir: &Path) -> std::path::PathBuf {
        let mut header = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#.to_vec();
        while (8 + header.len()) % 4 != 3 {
            header.push(b' ');
        }
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(&header);
        bytes.extend(1.5f32.to_le_bytes());
        bytes.extend((-2.0f32).to_le_bytes());
        let path = dir.join("odd.safetensors");
        File::create(&path).unwrap().write_all(&bytes).unwrap();
        path
    }

    #[test]
    fn misaligned_mapped_tensor_is_copied_aligned() {
        let dir = tempfile::tempdir().unwrap();
        let store = WeightStore::open(odd_file(dir.path())).unwrap();
        let a = store.get("a").unwrap();
        assert_eq!(a.bytes.as_ptr() as usize % 4, 0);
        assert_eq!(a.bytes, [1.5f32.to_le_bytes(), (-2.0f32).to_le_bytes()].concat());
        assert_eq!(a.shape, &[2]);
        assert_eq!(store.names(), vec!["a"]);
    }

    #[test]
    fn owned_weights_are_aligned_and_checked() {
        let store = WeightStore::from_owned(vec![
            ("b".into(), DType::Bool, vec![3], vec![1, 0, 1]),
            ("w".into(), DType::F64, vec![2], [1.0f64.to_le_bytes(), 2.0f64.to_le_bytes()].concat()),
        ])
        .unwrap();
        let w = store.get("w").unwrap();
        assert_eq!(w.bytes.as_ptr() as usize % 64, 0);
        assert_eq!(w.bytes.len(), 16);
        assert_eq!(store.get("b").unwrap().bytes, &[1, 0, 1]);
        assert!(store.get("nope").is_none());

        let err = WeightStore::from_owned(vec![("w".into(), DType::F32, vec![3], vec![0; 8])]).unwrap_err();
        assert!(err.to_string().contains("needs 12 bytes, got 8"), "{err}");
        let twice =
            vec![("w".into(), DType::Bool, vec![], vec![1]), ("w".into(), DType::Bool, vec![], vec![0])];
        assert!(WeightStore::from_owned(twice).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn unsupported_dtype_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let header = br#"{"q":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header);
        bytes.push(7);
        let path = dir.path().join("u8.safetensors");
        std::fs::write(&path, bytes).unwrap();
        let err = WeightStore::open(&path).unwrap_err();
        assert!(err.to_string().contains("\"q\" has dtype U8"), "{err}");
    }
}
