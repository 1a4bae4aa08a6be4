//! Parameter initialization from an [`Init`] and a seed.

use crate::alloc::AllocError;
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
///
/// The parameter's memory is reserved first, so a size the system refuses (a mistaken config
/// asking for a terabyte of weights) is an [`AllocError`], not an abort.
pub fn init_param(
    name: &str,
    init: &Init,
    dtype: DType,
    shape: &[usize],
    seed: u64,
) -> Result<Tensor, AllocError> {
    let n = numel(shape);
    let stream = rng::stream_of(name);
    let (fan_in, fan_out) = fans(shape);
    let uniform = |lo: f64, hi: f64| (lo, hi - lo, false);
    let normal = |mean: f64, std: f64| (mean, std, true);
    // Every initializer is `base + scale · draw`, the draw uniform in [0, 1) or standard
    // normal (a constant is a scale of 0).
    let (base, scale, is_normal) = match init {
        Init::Zeros => (0.0, 0.0, false),
        Init::Ones => (1.0, 0.0, false),
        Init::Constant(v) => (*v, 0.0, false),
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
    let constant = matches!(init, Init::Zeros | Init::Ones | Init::Constant(_));
    let value = |i: u64| {
        if constant {
            base
        } else if is_normal {
            base + scale * rng::normal(seed, stream, i)
        } else {
            base + scale * rng::uniform(seed, stream, i)
        }
    };
    let data = Buffer::try_from_f64(dtype, n, (0..n as u64).map(value), || {
        crate::alloc::describe(&format!("parameter `{name}`"), dtype, shape)
    })?;
    Ok(Tensor { shape: shape.to_vec(), data })
}
