//! Reading and writing tensors: `.npy` (one tensor) and `.safetensors` (named tensors).
//!
//! * `.npy`: f32, f64, f16, i32, i64 and bool arrays in C order. Files are written
//!   little-endian; big-endian files are read too (npyz swaps bytes). Fortran-order arrays are
//!   rejected. numpy has no bf16, so a bf16 tensor cannot be written to `.npy`.
//! * `.safetensors`: F32, F64, F16, BF16, I32, I64 and BOOL. Reading keeps the tensors in
//!   file order (by data offset). Writing lets the `safetensors` crate choose the layout (it
//!   orders tensors by dtype alignment, then name).

use crate::dtype::{fmt_shape, numel, DType};
use crate::tensor::{Buffer, Tensor};
use half::{bf16, f16};
use npyz::WriterBuilder;
use std::borrow::Cow;
use std::fs::File;
use std::io::{self, BufReader, BufWriter};
use std::path::{Path, PathBuf};

/// Why a tensor file could not be read or written; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TensorIoError {
    #[error("cannot read `{}`: {msg}", .path.display())]
    Read {
        path: PathBuf,
        msg: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write `{}`: {msg}", .path.display())]
    Write {
        path: PathBuf,
        msg: String,
        #[source]
        source: io::Error,
    },
    /// The file exists but its contents are not a tensor this module supports.
    #[error("`{}`: {msg}", .path.display())]
    Format { path: PathBuf, msg: String },
    /// A tensor that cannot be stored in the requested format.
    #[error("cannot write `{}`: {msg}", .path.display())]
    Unsupported { path: PathBuf, msg: String },
    #[error("`{}`: unknown tensor file type (expected a `.npy` or `.safetensors` file)", .path.display())]
    Extension { path: PathBuf },
}

/// An io::Error's message without the trailing " (os error N)".
fn io_msg(e: &io::Error) -> String {
    let s = e.to_string();
    match s.rfind(" (os error ") {
        Some(i) if s.ends_with(')') => s[..i].to_string(),
        _ => s,
    }
}

fn read_err(path: &Path, source: io::Error) -> TensorIoError {
    TensorIoError::Read { path: path.to_path_buf(), msg: io_msg(&source), source }
}

fn write_err(path: &Path, source: io::Error) -> TensorIoError {
    TensorIoError::Write { path: path.to_path_buf(), msg: io_msg(&source), source }
}

fn format_err(path: &Path, msg: impl Into<String>) -> TensorIoError {
    TensorIoError::Format { path: path.to_path_buf(), msg: msg.into() }
}

/// Reads a `.npy` file.
pub fn read_npy(path: impl AsRef<Path>) -> Result<Tensor, TensorIoError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| read_err(path, e))?;
    let npy = npyz::NpyFile::new(BufReader::new(file))
        .map_err(|e| format_err(path, format!("not a valid .npy file: {}", io_msg(&e))))?;
    if npy.order() == npyz::Order::Fortran {
        return Err(format_err(
            path,
            "Fortran-order arrays are not supported (save a C-order array, e.g. with np.ascontiguousarray)",
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let dtype = npy.dtype();
    let npyz::DType::Plain(ts) = &dtype else {
        return Err(format_err(path, format!("unsupported dtype {}", dtype.descr())));
    };
    use npyz::TypeChar;
    let kind = match (ts.type_char(), ts.size_field()) {
        (TypeChar::Float, 4) => DType::F32,
        (TypeChar::Float, 8) => DType::F64,
        (TypeChar::Float, 2) => DType::F16,
        (TypeChar::Int, 4) => DType::I32,
        (TypeChar::Int, 8) => DType::I64,
        (TypeChar::Bool, 1) => DType::Bool,
        _ => {
            return Err(format_err(
                path,
                format!("unsupported dtype `{ts}` (supported: f2, f4, f8, i4, i8, b1)"),
            ))
        }
    };
    let bad = |e: io::Error| format_err(path, format!("cannot read the array data: {}", io_msg(&e)));
    let data = match kind {
        DType::F32 => Buffer::F32(npy.into_vec().map_err(bad)?),
        DType::F64 => Buffer::F64(npy.into_vec().map_err(bad)?),
        DType::F16 => Buffer::F16(npy.into_vec().map_err(bad)?),
        DType::I32 => Buffer::I32(npy.into_vec().map_err(bad)?),
        DType::I64 => Buffer::I64(npy.into_vec().map_err(bad)?),
        DType::Bool => Buffer::Bool(npy.into_vec().map_err(bad)?),
        DType::BF16 => unreachable!("npy has no bf16"),
    };
    Tensor::new(shape, data).map_err(|e| format_err(path, e.to_string()))
}

fn write_npy_typed<T: npyz::Serialize + Copy>(
    path: &Path,
    descr: &str,
    shape: &[usize],
    v: &[T],
) -> Result<(), TensorIoError> {
    let ts: npyz::TypeStr = descr.parse().expect("valid type string");
    let shape: Vec<u64> = shape.iter().map(|&d| d as u64).collect();
    let file = File::create(path).map_err(|e| write_err(path, e))?;
    let mut w = npyz::WriteOptions::<T>::new()
        .dtype(npyz::DType::Plain(ts))
        .shape(&shape)
        .writer(BufWriter::new(file))
        .begin_nd()
        .map_err(|e| write_err(path, e))?;
    w.extend(v.iter().copied()).map_err(|e| write_err(path, e))?;
    w.finish().map_err(|e| write_err(path, e))
}

/// Writes a tensor as a little-endian, C-order `.npy` file. bf16 is not supported (numpy
/// has no such dtype).
pub fn write_npy(path: impl AsRef<Path>, t: &Tensor) -> Result<(), TensorIoError> {
    let path = path.as_ref();
    check_len(path, "the tensor", t)?;
    match &t.data {
        Buffer::F32(v) => write_npy_typed(path, "<f4", &t.shape, v),
        Buffer::F64(v) => write_npy_typed(path, "<f8", &t.shape, v),
        Buffer::F16(v) => write_npy_typed(path, "<f2", &t.shape, v),
        Buffer::I32(v) => write_npy_typed(path, "<i4", &t.shape, v),
        Buffer::I64(v) => write_npy_typed(path, "<i8", &t.shape, v),
        Buffer::Bool(v) => write_npy_typed(path, "|b1", &t.shape, v),
        Buffer::BF16(_) => Err(TensorIoError::Unsupported {
            path: path.to_path_buf(),
            msg: "numpy has no bf16 dtype; cast to f32 or write a .safetensors file".into(),
        }),
    }
}

fn check_len(path: &Path, what: &str, t: &Tensor) -> Result<(), TensorIoError> {
    if t.data.len() != numel(&t.shape) {
        return Err(TensorIoError::Unsupported {
            path: path.to_path_buf(),
            msg: format!("{what} has {} elements but shape {}", t.data.len(), fmt_shape(&t.shape)),
        });
    }
    Ok(())
}

fn from_le<const N: usize, T>(bytes: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
    bytes.chunks_exact(N).map(|c| f(c.try_into().expect("chunk of N bytes"))).collect()
}

/// Reads every tensor of a `.safetensors` file, in file order.
pub fn read_safetensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>, TensorIoError> {
    use safetensors::{Dtype, SafeTensors};
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| read_err(path, e))?;
    let bad =
        |e: safetensors::SafeTensorError| format_err(path, format!("not a valid .safetensors file: {e}"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(bad)?;
    let st = SafeTensors::deserialize(&bytes).map_err(bad)?;
    let mut out = Vec::with_capacity(st.len());
    for name in meta.offset_keys() {
        let view = st.tensor(&name).map_err(bad)?;
        let b = view.data();
        let data = match view.dtype() {
            Dtype::F32 => Buffer::F32(from_le(b, f32::from_le_bytes)),
            Dtype::F64 => Buffer::F64(from_le(b, f64::from_le_bytes)),
            Dtype::F16 => Buffer::F16(from_le(b, f16::from_le_bytes)),
            Dtype::BF16 => Buffer::BF16(from_le(b, bf16::from_le_bytes)),
            Dtype::I32 => Buffer::I32(from_le(b, i32::from_le_bytes)),
            Dtype::I64 => Buffer::I64(from_le(b, i64::from_le_bytes)),
            Dtype::BOOL => Buffer::Bool(b.iter().map(|&x| x != 0).collect()),
            other => {
                return Err(format_err(
                    path,
                    format!("tensor `{name}` has dtype {other}, which is not supported (F32, F64, F16, BF16, I32, I64, BOOL)"),
                ))
            }
        };
        let t = Tensor::new(view.shape().to_vec(), data)
            .map_err(|e| format_err(path, format!("tensor `{name}`: {e}")))?;
        out.push((name, t));
    }
    Ok(out)
}

/// A tensor as raw little-endian bytes, for the `safetensors` writer.
struct Raw {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl safetensors::View for Raw {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn raw(t: &Tensor) -> Raw {
    use safetensors::Dtype;
    let dtype = match t.dtype() {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I32 => Dtype::I32,
        DType::I64 => Dtype::I64,
        DType::Bool => Dtype::BOOL,
    };
    Raw { dtype, shape: t.shape.clone(), bytes: t.data.to_le_bytes() }
}

/// Writes named tensors to a `.safetensors` file. Names must be unique.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(String, Tensor)]) -> Result<(), TensorIoError> {
    let path = path.as_ref();
    let mut seen = std::collections::HashSet::new();
    for (name, t) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(TensorIoError::Unsupported {
                path: path.to_path_buf(),
                msg: format!("two tensors are named `{name}`"),
            });
        }
        check_len(path, &format!("tensor `{name}`"), t)?;
    }
    let items: Vec<(String, Raw)> = tensors.iter().map(|(n, t)| (n.clone(), raw(t))).collect();
    safetensors::serialize_to_file(items, None, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => write_err(path, io),
        other => TensorIoError::Unsupported { path: path.to_path_buf(), msg: other.to_string() },
    })
}

/// Reads a tensor file by extension: a `.safetensors` file gives all its tensors in file
/// order; a `.npy` file gives one tensor named by the file stem (`emb.npy` → `emb`).
pub fn read_tensors(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>, TensorIoError> {
    let path = path.as_ref();
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_safetensors(path),
        Some("npy") => {
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            Ok(vec![(name, read_npy(path)?)])
        }
        _ => Err(TensorIoError::Extension { path: path.to_path_buf() }),
    }
}
