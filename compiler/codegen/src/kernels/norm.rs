//! Row-wise fused ops: softmax, log-softmax, layer norm, RMS norm, residual add + norm.
//! (Being written.)

use super::View;
use crate::{CodegenError, Kernel, Target};
use kiln_ir::NormKind;

/// Softmax (or log-softmax when `log`) of `x` along `axis` into `out` (same shape).
/// Arguments: x, out.
pub fn emit_softmax(
    symbol: &str,
    x: &View,
    axis: usize,
    log: bool,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let _ = (symbol, x, axis, log, out, target);
    Err(CodegenError::Unsupported("softmax (not yet generated)".into()))
}

/// `norm(a + b)` over the last axis, then `· gamma + beta` (layer) or `· gamma` (rms) when
/// given; `b` is `None` for a plain LayerNorm/RMSNorm. a, b, out share the shape `[…, N]`
/// (broadcast axes stride 0); gamma and beta are `[N]`. Arguments: a, (b), (gamma), (beta), out.
#[allow(clippy::too_many_arguments)]
pub fn emit_norm(
    symbol: &str,
    kind: NormKind,
    eps: f64,
    a: &View,
    b: Option<&View>,
    gamma: Option<&View>,
    beta: Option<&View>,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let _ = (symbol, kind, eps, a, b, gamma, beta, out, target);
    Err(CodegenError::Unsupported("norm (not yet generated)".into()))
}
