//! Allocation that fails with an error instead of aborting the process.
//!
//! Every tensor the interpreter, the parameter initializers and the input generator create is
//! sized by the user (a `--set batch=100000000`, a shape in the spec), so asking the system
//! for it may fail. Rust's ordinary allocation aborts the process when it does; here the
//! memory is requested with `try_reserve_exact` first, and a refusal becomes an
//! [`AllocError`] that says how much was asked and for what. Sizes are computed in `u128`,
//! so no element count times element size can overflow on the way.
//!
//! What this catches is a request the system refuses outright (more than it can map). A
//! request it grants and cannot back later is the kernel's business (the OOM killer), as for
//! any program.

use crate::dtype::{fmt_shape, DType, TensorType};

/// A tensor the system would not give memory for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot allocate {} ({bytes} bytes) for {what}: {reason}", human_bytes(*.bytes))]
pub struct AllocError {
    /// The bytes asked for.
    pub bytes: u128,
    /// What they were for: a tensor's role and type (`input `image` f32[100000000, 784]`).
    pub what: String,
    /// The allocator's answer (out of memory, or more than the address space).
    pub reason: String,
}

/// `n` bytes in the largest binary unit that keeps the number at least 1 (`292.1 GiB`).
pub fn human_bytes(n: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The bytes of `numel` elements of `dtype`, exact (no saturation, no overflow).
pub fn bytes_of(dtype: DType, shape: &[usize]) -> u128 {
    shape.iter().fold(dtype.size_bytes() as u128, |a, &d| a.saturating_mul(d as u128))
}

/// A vector with room for exactly `n` elements, or the error for `what` (called only on
/// failure, to describe the tensor).
pub fn try_vec<T>(n: usize, bytes: u128, what: impl FnOnce() -> String) -> Result<Vec<T>, AllocError> {
    let mut v = Vec::new();
    match v.try_reserve_exact(n) {
        Ok(()) => Ok(v),
        Err(e) => Err(AllocError { bytes, what: what(), reason: e.to_string() }),
    }
}

/// Checks that a tensor of type `ty` can be allocated now: its bytes are reserved and given
/// back at once. The interpreter asks this before each node's kernel, whose own buffers are
/// then of that size (kernels allocate with the ordinary, aborting allocator; this check is
/// what turns an impossible size into an error first).
pub fn check(ty: &TensorType, what: impl FnOnce() -> String) -> Result<(), AllocError> {
    let bytes = bytes_of(ty.dtype, &ty.static_shape());
    let Ok(n) = usize::try_from(bytes) else {
        return Err(AllocError { bytes, what: what(), reason: "more than the address space".into() });
    };
    try_vec::<u8>(n, bytes, what).map(drop)
}

/// `what` for a tensor: its role and type, as the messages show it.
pub fn describe(role: &str, dtype: DType, shape: &[usize]) -> String {
    format!("{role} {dtype}{}", fmt_shape(shape))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn impossible_sizes_are_errors_not_aborts() {
        let ty = TensorType::new(DType::F32, vec![1 << 40, 1 << 20]);
        let e = check(&ty, || "a test tensor".into()).expect_err("2^62 f32 cannot be allocated");
        assert_eq!(e.bytes, 1u128 << 62);
        assert!(
            e.to_string()
                .starts_with("cannot allocate 4.0 EiB (4611686018427387904 bytes) for a test tensor"),
            "{e}"
        );
        assert!(check(&TensorType::new(DType::F32, vec![4, 4]), || unreachable!()).is_ok());
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(313_600_000_000), "292.1 GiB");
    }
}
