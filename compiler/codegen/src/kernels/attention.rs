//! Fused attention. (Being written.)

use super::View;
use crate::{CodegenError, Kernel, Target};

/// `out = softmax(q·kᵀ·scale + mask, causal) · v` over views `q [B…, Sq, D]`, `k [B…, Sk, D]`,
/// `v [B…, Sk, Dv]`, `mask [B…, Sq, Sk]` (broadcast axes stride 0), `out [B…, Sq, Dv]`.
/// Arguments, in order: q, k, v, (mask), out.
#[allow(clippy::too_many_arguments)]
pub fn emit(
    symbol: &str,
    q: &View,
    k: &View,
    v: &View,
    mask: Option<&View>,
    scale: f64,
    causal: bool,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let _ = (symbol, q, k, v, mask, scale, causal, out, target);
    Err(CodegenError::Unsupported("attention (not yet generated)".into()))
}
