//! Parameter initialization from an [`Init`] and a seed.

use crate::dtype::{numel, DType};
use crate::op::Init;
use crate::rng;
use crate::tensor::{Buffer, Tensor};

/// PyTorch's fan-in and fan-out for a weight shape `[out, in, k…]`.
pub fn fans(shape: &[usize]) -> (f64, f64) {
    match shape.len() {
        0 => (1.0, 1.0),
        1 => (shape[0] as f64, shape[0] as f64),
        _ => {
            let rf: usize = shape[2..].iter().product();
            ((shape[1] * rf) as f64, (shape[0] * rf) as f64)
        }
    }
}

/// The initial value of parameter `name`: a pure function of (init, shape, seed, name).
pub fn init_param(name: &str, init: &Init, dtype: DType, shape: &[usize], seed: u64) -> Tensor {
    let n = numel(shape);
    let stream = rng::stream_of(name);
    let (fan_in, fan_out) = fans(shape);
    let uniform = |lo: f64, hi: f64| -> Vec<f64> {
        (0..n as u64).map(|i| lo + (hi - lo) * rng::uniform(seed, stream, i)).collect()
    };
    let normal = |mean: f64, std: f64| -> Vec<f64> {
        (0..n as u64).map(|i| mean + std * rng::normal(seed, stream, i)).collect()
    };
    let values = match init {
        Init::Zeros => vec![0.0; n],
        Init::Ones => vec![1.0; n],
        Init::Constant(v) => vec![*v; n],
        Init::Normal { mean, std } => normal(*mean, *std),
        Init::Uniform { low, high } => uniform(*low, *high),
        Init::XavierUniform { gain } => {
            let a = gain * (6.0 / (fan_in + fan_out)).sqrt();
            uniform(-a, a)
        }
        Init::XavierNormal { gain } => normal(0.0, gain * (2.0 / (fan_in + fan_out)).sqrt()),
        Init::KaimingUniform { gain } => {
            let a = gain * (3.0 / fan_in).sqrt();
            uniform(-a, a)
        }
        Init::KaimingNormal { gain } => normal(0.0, gain / fan_in.sqrt()),
    };
    Tensor { shape: shape.to_vec(), data: Buffer::from_f64(dtype, values.into_iter()) }
}
