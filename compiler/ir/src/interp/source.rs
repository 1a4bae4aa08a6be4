//! Ops that create values from attributes alone: full, iota and random_uniform.
//! (`const` returns its literal; `input` and `param` read the bindings, see [`super::eval`].)

use crate::dtype::{numel, strides, DType};
use crate::rng;
use crate::tensor::{Buffer, Tensor};
use half::{bf16, f16};

/// Every element `value`, converted like a cast from f64 (ints truncate toward zero, bool is
/// `value != 0`).
pub(crate) fn full(value: f64, dtype: DType, shape: &[usize]) -> Tensor {
    Tensor::full(dtype, shape.to_vec(), value)
}

/// `out[..., i, ...] = i` along `axis` (exact for every index that the dtype represents;
/// f16/bf16 round large indices to nearest).
pub(crate) fn iota(dtype: DType, shape: &[usize], axis: usize) -> Tensor {
    let n = numel(shape);
    let (stride, extent) = (strides(shape)[axis], shape[axis]);
    let index = (0..n).map(|i| ((i / stride) % extent) as f64);
    Tensor { shape: shape.to_vec(), data: Buffer::from_f64(dtype, index) }
}

/// Element `i` is `rng::uniform(seed, 0, offset + i)` (53 random bits in [0, 1)) rounded to
/// nearest in `dtype`. Rounding can carry a value just below 1 up to exactly 1.0 (for f32 when
/// `u > 1 - 2^-25`, for f16/bf16 far more often); such values are replaced by the largest
/// representable number below 1, so every dtype keeps the documented range [0, 1).
pub(crate) fn random_uniform(dtype: DType, shape: &[usize], seed: u64, offset: u64) -> Tensor {
    let n = numel(shape) as u64;
    let u = |i: u64| rng::uniform(seed, 0, offset.wrapping_add(i));
    let data = match dtype {
        DType::F64 => Buffer::F64((0..n).map(u).collect()),
        DType::F32 => Buffer::F32((0..n).map(|i| (u(i) as f32).min(1.0 - f32::EPSILON / 2.0)).collect()),
        DType::F16 => {
            let below_one = f16::from_bits(f16::ONE.to_bits() - 1);
            Buffer::F16((0..n).map(|i| f16::from_f64(u(i)).min(below_one)).collect())
        }
        DType::BF16 => {
            let below_one = bf16::from_bits(bf16::ONE.to_bits() - 1);
            Buffer::BF16((0..n).map(|i| bf16::from_f64(u(i)).min(below_one)).collect())
        }
        // Inference rejects non-float dtypes; values truncate to 0 / false if ever asked.
        other => Buffer::from_f64(other, (0..n).map(u)),
    };
    Tensor { shape: shape.to_vec(), data }
}
