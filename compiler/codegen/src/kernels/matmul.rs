//! Matrix products with an optional fused epilogue (bias, activation).
//! (Being written; see the module docs once it lands.)

use super::View;
use crate::{CodegenError, Kernel, Target};
use kiln_ir::Activation;

/// `out = activation(a · b + bias)` over views `a [B…, M, K]`, `b [B…, K, N]`, `bias [B…, M, N]`
/// (broadcast axes have stride 0) and `out [B…, M, N]`. Arguments, in order: a, b, (bias), out.
pub fn emit(
    symbol: &str,
    a: &View,
    b: &View,
    bias: Option<&View>,
    activation: Activation,
    out: &View,
    target: &dyn Target,
) -> Result<Kernel, CodegenError> {
    let _ = (symbol, a, b, bias, activation, out, target);
    Err(CodegenError::Unsupported("matmul (not yet generated)".into()))
}
