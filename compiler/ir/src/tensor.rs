//! Dense, row-major tensors: the values the interpreter computes and that weights files hold.

use crate::alloc::{try_vec, AllocError};
use crate::dtype::{fmt_shape, numel, DType};

/// A tensor's static extents.
type Shape = Vec<usize>;
use half::{bf16, f16};
use serde::Serialize;
use std::fmt;

/// The elements of a tensor, one vector per dtype.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Buffer {
    F32(Vec<f32>),
    F64(Vec<f64>),
    #[serde(serialize_with = "ser_f16")]
    F16(Vec<f16>),
    #[serde(serialize_with = "ser_bf16")]
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

fn ser_f16<S: serde::Serializer>(v: &[f16], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_f32()))
}

fn ser_bf16<S: serde::Serializer>(v: &[bf16], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_f32()))
}

impl Buffer {
    pub fn dtype(&self) -> DType {
        match self {
            Buffer::F32(_) => DType::F32,
            Buffer::F64(_) => DType::F64,
            Buffer::F16(_) => DType::F16,
            Buffer::BF16(_) => DType::BF16,
            Buffer::I32(_) => DType::I32,
            Buffer::I64(_) => DType::I64,
            Buffer::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Buffer::F32(v) => v.len(),
            Buffer::F64(v) => v.len(),
            Buffer::F16(v) => v.len(),
            Buffer::BF16(v) => v.len(),
            Buffer::I32(v) => v.len(),
            Buffer::I64(v) => v.len(),
            Buffer::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Element `i` as f64 (bool is 0 or 1; i64 beyond 2^53 loses precision).
    pub fn get_f64(&self, i: usize) -> f64 {
        match self {
            Buffer::F32(v) => v[i] as f64,
            Buffer::F64(v) => v[i],
            Buffer::F16(v) => v[i].to_f64(),
            Buffer::BF16(v) => v[i].to_f64(),
            Buffer::I32(v) => v[i] as f64,
            Buffer::I64(v) => v[i] as f64,
            Buffer::Bool(v) => v[i] as u8 as f64,
        }
    }

    /// A buffer of `dtype` made from f64 values (rounded to nearest; ints truncate toward zero
    /// like a cast; bool is `v != 0`).
    pub fn from_f64(dtype: DType, values: impl Iterator<Item = f64>) -> Buffer {
        match dtype {
            DType::F32 => Buffer::F32(values.map(|v| v as f32).collect()),
            DType::F64 => Buffer::F64(values.collect()),
            DType::F16 => Buffer::F16(values.map(f16::from_f64).collect()),
            DType::BF16 => Buffer::BF16(values.map(bf16::from_f64).collect()),
            DType::I32 => Buffer::I32(values.map(|v| v as i32).collect()),
            DType::I64 => Buffer::I64(values.map(|v| v as i64).collect()),
            DType::Bool => Buffer::Bool(values.map(|v| v != 0.0).collect()),
        }
    }

    /// [`Buffer::from_f64`] for exactly `n` values, with the memory reserved first: a size the
    /// system refuses is an [`AllocError`] for `what` instead of an abort.
    pub fn try_from_f64(
        dtype: DType,
        n: usize,
        values: impl Iterator<Item = f64>,
        what: impl FnOnce() -> String,
    ) -> Result<Buffer, AllocError> {
        let bytes = crate::alloc::bytes_of(dtype, &[n]);
        fn fill<T>(
            n: usize,
            bytes: u128,
            what: impl FnOnce() -> String,
            values: impl Iterator<Item = T>,
        ) -> Result<Vec<T>, AllocError> {
            let mut v = try_vec(n, bytes, what)?;
            v.extend(values.take(n));
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => Buffer::F32(fill(n, bytes, what, values.map(|v| v as f32))?),
            DType::F64 => Buffer::F64(fill(n, bytes, what, values)?),
            DType::F16 => Buffer::F16(fill(n, bytes, what, values.map(f16::from_f64))?),
            DType::BF16 => Buffer::BF16(fill(n, bytes, what, values.map(bf16::from_f64))?),
            DType::I32 => Buffer::I32(fill(n, bytes, what, values.map(|v| v as i32))?),
            DType::I64 => Buffer::I64(fill(n, bytes, what, values.map(|v| v as i64))?),
            DType::Bool => Buffer::Bool(fill(n, bytes, what, values.map(|v| v != 0.0))?),
        })
    }

    /// [`Buffer::to_le_bytes`] with the bytes reserved first: a size the system refuses is an
    /// [`AllocError`] for `what` (a run's input copied for the runtime) instead of an abort.
    pub fn try_to_le_bytes(&self, what: impl FnOnce() -> String) -> Result<Vec<u8>, AllocError> {
        let bytes = crate::alloc::bytes_of(self.dtype(), &[self.len()]);
        let n = usize::try_from(bytes).unwrap_or(usize::MAX);
        let mut out = try_vec(n, bytes, what)?;
        match self {
            Buffer::F32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Buffer::F64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Buffer::F16(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Buffer::BF16(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Buffer::I32(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Buffer::I64(v) => v.iter().for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Buffer::Bool(v) => out.extend(v.iter().map(|&b| u8::from(b))),
        }
        Ok(out)
    }

    /// All elements as f64.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        (0..self.len()).map(|i| self.get_f64(i)).collect()
    }

    /// The elements as little-endian bytes, one byte (0 or 1) per bool: the layout the
    /// runtime's tensors, `.npy` and `.safetensors` files and generated kernels all share.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn le<T: Copy, const N: usize>(v: &[T], bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|&x| bytes(x)).collect()
        }
        match self {
            Buffer::F32(v) => le(v, f32::to_le_bytes),
            Buffer::F64(v) => le(v, f64::to_le_bytes),
            Buffer::F16(v) => le(v, f16::to_le_bytes),
            Buffer::BF16(v) => le(v, bf16::to_le_bytes),
            Buffer::I32(v) => le(v, i32::to_le_bytes),
            Buffer::I64(v) => le(v, i64::to_le_bytes),
            Buffer::Bool(v) => v.iter().map(|&b| u8::from(b)).collect(),
        }
    }
}

/// A dense row-major tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Tensor {
    pub shape: Shape,
    pub data: Buffer,
}

/// A tensor whose element count does not match its shape.
#[derive(Debug, thiserror::Error)]
#[error("{len} elements do not fill shape {}", fmt_shape(.shape))]
pub struct ShapeMismatch {
    pub shape: Shape,
    pub len: usize,
}

impl Tensor {
    pub fn new(shape: impl Into<Shape>, data: Buffer) -> Result<Tensor, ShapeMismatch> {
        let shape = shape.into();
        if numel(&shape) != data.len() {
            return Err(ShapeMismatch { len: data.len(), shape });
        }
        Ok(Tensor { shape, data })
    }

    /// A tensor of `dtype` and `shape` with every element `value`.
    pub fn full(dtype: DType, shape: impl Into<Shape>, value: f64) -> Tensor {
        let shape = shape.into();
        let n = numel(&shape);
        Tensor { data: Buffer::from_f64(dtype, std::iter::repeat_n(value, n)), shape }
    }

    pub fn from_f32(shape: impl Into<Shape>, v: Vec<f32>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Buffer::F32(v))
    }

    pub fn from_f64(shape: impl Into<Shape>, v: Vec<f64>) -> Result<Tensor, ShapeMismatch> {
        Tensor::new(shape, Buffer::F64(v))
    }

    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data.to_f64_vec()
    }

    /// The same values converted to `dtype` (float → int truncates toward zero).
    pub fn cast(&self, dtype: DType) -> Tensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = match (&self.data, dtype) {
            (Buffer::I64(v), DType::I32) => Buffer::I32(v.iter().map(|&x| x as i32).collect()),
            (Buffer::I32(v), DType::I64) => Buffer::I64(v.iter().map(|&x| x as i64).collect()),
            (Buffer::F32(v), DType::F16) => Buffer::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            (Buffer::F32(v), DType::BF16) => Buffer::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            (src, _) => Buffer::from_f64(dtype, (0..src.len()).map(|i| src.get_f64(i))),
        };
        Tensor { shape: self.shape.clone(), data }
    }

    /// Mean and population standard deviation of the elements, in f64.
    pub fn mean_std(&self) -> (f64, f64) {
        let n = self.numel().max(1) as f64;
        let v = self.to_f64_vec();
        let mean = v.iter().sum::<f64>() / n;
        let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
        (mean, var.sqrt())
    }

    /// The first `max` elements as text, with `…` when there are more.
    pub fn summary(&self, max: usize) -> String {
        let n = self.numel();
        let mut parts: Vec<String> = (0..n.min(max))
            .map(|i| match self.dtype() {
                DType::Bool => (self.data.get_f64(i) != 0.0).to_string(),
                DType::I32 | DType::I64 => format!("{}", self.data.get_f64(i) as i64),
                _ => format!("{:.6}", self.data.get_f64(i)),
            })
            .collect();
        if n > max {
            parts.push("…".into());
        }
        format!("[{}]", parts.join(", "))
    }

    /// Largest `|a - b|` over all elements, in f64; NaN when either side has a NaN where the
    /// other does not; `None` when shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f64> {
        if self.shape != other.shape {
            return None;
        }
        let mut worst = 0.0f64;
        for i in 0..self.numel() {
            let (a, b) = (self.data.get_f64(i), other.data.get_f64(i));
            if a == b || (a.is_nan() && b.is_nan()) {
                continue;
            }
            let d = (a - b).abs();
            if d.is_nan() || d > worst {
                worst = d;
                if d.is_nan() {
                    break;
                }
            }
        }
        Some(worst)
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{} {}", self.dtype(), fmt_shape(&self.shape), self.summary(8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn little_endian_bytes_follow_the_dtype_width() {
        assert_eq!(Buffer::F32(vec![1.0, -2.0]).to_le_bytes(), [0, 0, 0x80, 0x3f, 0, 0, 0, 0xc0]);
        assert_eq!(Buffer::I64(vec![258]).to_le_bytes(), [2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Buffer::BF16(vec![bf16::ONE]).to_le_bytes(), [0x80, 0x3f]);
        assert_eq!(Buffer::Bool(vec![true, false]).to_le_bytes(), [1, 0]);
        for b in [
            Buffer::F32(vec![1.0, -2.0]),
            Buffer::I64(vec![258]),
            Buffer::BF16(vec![bf16::ONE]),
            Buffer::Bool(vec![true, false]),
        ] {
            assert_eq!(b.try_to_le_bytes(|| "a test buffer".into()).expect("small"), b.to_le_bytes());
        }
    }
}
