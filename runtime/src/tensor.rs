//! Tensors at the runtime's boundary: `TensorRef` borrows a caller's input, `Tensor` owns a
//! returned output in 64-byte aligned memory, so it can be viewed as `&[f32]` without a copy.

use crate::buffer::AlignedBuf;
use crate::error::RuntimeError;
use crate::manifest::{shape_str, DType, TensorSpec};

/// A borrowed input: name, dtype, shape and little-endian bytes.
#[derive(Debug, Clone, Copy)]
pub struct TensorRef<'a> {
    /// Must match the manifest's input name at this position.
    pub name: &'a str,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first.
    pub shape: &'a [u64],
    /// Little-endian element bytes; copied if misaligned for the dtype.
    pub bytes: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// A tensor of any dtype from its raw bytes.
    pub fn new(name: &'a str, dtype: DType, shape: &'a [u64], bytes: &'a [u8]) -> TensorRef<'a> {
        TensorRef { name, dtype, shape, bytes }
    }

    /// An f32 tensor.
    pub fn f32(name: &'a str, shape: &'a [u64], data: &'a [f32]) -> TensorRef<'a> {
        TensorRef { name, dtype: DType::F32, shape, bytes: as_bytes(data) }
    }

    /// An i32 tensor.
    pub fn i32(name: &'a str, shape: &'a [u64], data: &'a [i32]) -> TensorRef<'a> {
        TensorRef { name, dtype: DType::I32, shape, bytes: as_bytes(data) }
    }

    /// An i64 tensor.
    pub fn i64(name: &'a str, shape: &'a [u64], data: &'a [i64]) -> TensorRef<'a> {
        TensorRef { name, dtype: DType::I64, shape, bytes: as_bytes(data) }
    }
}

fn as_bytes<T: Copy>(data: &[T]) -> &[u8] {
    // SAFETY: only called with f32/i32/i64, plain numbers without padding or invalid bit patterns;
    // the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<u8>(), std::mem::size_of_val(data)) }
}

/// An owned output tensor.
#[derive(Debug, Clone)]
pub struct Tensor {
    name: String,
    dtype: DType,
    shape: Vec<u64>,
    data: AlignedBuf,
}

impl Tensor {
    /// A zeroed tensor named as `spec`, of its dtype and of shape `shape` (the spec's shape at
    /// the run's symbol values).
    pub(crate) fn zeroed(spec: &TensorSpec, shape: Vec<u64>) -> Result<Tensor, RuntimeError> {
        let bytes = crate::manifest::shape_bytes(spec.dtype, &shape)
            .ok_or_else(|| RuntimeError::invalid(format!("output {:?} is too large", spec.name)))?;
        let data = AlignedBuf::zeroed(bytes, &format!("output {:?}", spec.name))?;
        Ok(Tensor { name: spec.name.clone(), dtype: spec.dtype, shape, data })
    }

    /// The output's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape, outermost first.
    pub fn shape(&self) -> &[u64] {
        &self.shape
    }

    /// Little-endian element bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        self.data.as_mut_slice()
    }

    /// The elements, if the tensor is f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        self.typed(DType::F32)
    }

    /// The elements, if the tensor is i32.
    pub fn as_i32(&self) -> Option<&[i32]> {
        self.typed(DType::I32)
    }

    /// The elements, if the tensor is i64.
    pub fn as_i64(&self) -> Option<&[i64]> {
        self.typed(DType::I64)
    }

    /// The elements, if the tensor is f64.
    pub fn as_f64(&self) -> Option<&[f64]> {
        self.typed(DType::F64)
    }

    /// The elements converted to f32 (f16 and bf16 widened, integers and bools cast).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let bytes = self.bytes();
        let n = self.dtype.size_bytes();
        let chunks = bytes.chunks_exact(n);
        match self.dtype {
            DType::F32 => chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::F64 => chunks.map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
            DType::I32 => chunks.map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
            DType::I64 => chunks.map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32).collect(),
            DType::F16 => chunks.map(|c| f16_to_f32(u16::from_le_bytes([c[0], c[1]]))).collect(),
            DType::BF16 => {
                chunks.map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16)).collect()
            }
            DType::Bool => chunks.map(|c| if c[0] != 0 { 1.0 } else { 0.0 }).collect(),
        }
    }

    /// Consumes the tensor, returning its bytes.
    pub fn into_bytes(self) -> Vec<u8> {
        self.data.as_slice().to_vec()
    }

    fn typed<T: Copy>(&self, dtype: DType) -> Option<&[T]> {
        if self.dtype != dtype {
            return None;
        }
        let bytes = self.data.as_slice();
        // SAFETY: the buffer is 64-byte aligned, its length is a multiple of the dtype's size
        // (it was sized from the shape), and T is the plain number type of `dtype`.
        Some(unsafe {
            std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / std::mem::size_of::<T>())
        })
    }
}

impl std::fmt::Display for Tensor {
    /// `name f32 [2, 3]`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} {}", self.name, self.dtype, shape_str(&self.shape))
    }
}

/// IEEE binary16 to binary32, exact (subnormals, infinities and NaN included).
fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    let bits = match (exp, frac) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: value = frac × 2^-24.
            let value = frac as f32 * f32::from_bits(0x3380_0000);
            return if sign != 0 { -value } else { value };
        }
        (0x1f, _) => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(dtype: DType, bytes: &[u8]) -> Tensor {
        let n = (bytes.len() / dtype.size_bytes()) as u64;
        let mut t = Tensor::zeroed(&TensorSpec::fixed("t", dtype, &[n]), vec![n]).unwrap();
        t.bytes_mut().copy_from_slice(bytes);
        t
    }

    #[test]
    fn typed_views_and_conversion() {
        let t = tensor(DType::F32, &[1.5f32.to_le_bytes(), (-3.0f32).to_le_bytes()].concat());
        assert_eq!(t.as_f32(), Some(&[1.5, -3.0][..]));
        assert_eq!(t.as_i32(), None);
        assert_eq!(t.to_f32_vec(), vec![1.5, -3.0]);
        assert_eq!(t.to_string(), "t f32 [2]");

        let i = tensor(DType::I64, &[7i64.to_le_bytes(), (-1i64).to_le_bytes()].concat());
        assert_eq!(i.as_i64(), Some(&[7, -1][..]));
        assert_eq!(i.to_f32_vec(), vec![7.0, -1.0]);

        // 1.0, -2.0, 2^-24 (smallest subnormal), +inf in f16.
        let h = tensor(DType::F16, &[0x00, 0x3c, 0x00, 0xc0, 0x01, 0x00, 0x00, 0x7c]);
        assert_eq!(h.to_f32_vec(), vec![1.0, -2.0, f32::from_bits(0x3380_0000), f32::INFINITY]);
        let b = tensor(DType::BF16, &[0x80, 0x3f]);
        assert_eq!(b.to_f32_vec(), vec![1.0]);
        assert_eq!(tensor(DType::Bool, &[0, 1]).to_f32_vec(), vec![0.0, 1.0]);
        assert_eq!(tensor(DType::F64, &2.5f64.to_le_bytes()).as_f64(), Some(&[2.5][..]));
    }
}
