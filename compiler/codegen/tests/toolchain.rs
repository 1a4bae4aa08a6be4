//! The MLIR/LLVM toolchain works end to end in this build: build, lower, JIT, translate.
//!
//! One test binary on purpose: MLIR and LLVM link statically, so each binary is ~200 MB.

use kiln_codegen::{fma_llvm_ir, host_cpu, jit_smoke, FMA_SYMBOL};

#[test]
fn jit_computes_fma() {
    assert_eq!(jit_smoke(2.0, 3.0, 4.0).unwrap(), 10.0);
}

#[test]
fn jit_matches_mul_add_exactly() {
    let one_plus = 1.0 + 2f32.powi(-12);
    let cases = [
        (0.0, 0.0, 0.0),
        (-1.5, 4.0, 0.25),
        (1e30, 1e10, -1e38),
        (0.1, 0.2, 0.3),
        // The product 1 + 2^-11 + 2^-24 is not an f32: unfused, the sum is 0; fused, 2^-24.
        (one_plus, one_plus, -(1.0 + 2f32.powi(-11))),
    ];
    for (a, b, c) in cases {
        let got = jit_smoke(a, b, c).unwrap();
        let want = a.mul_add(b, c);
        assert_eq!(got.to_bits(), want.to_bits(), "fma({a}, {b}, {c}) = {got}, want {want}");
    }
    let (a, c) = (one_plus, -(1.0 + 2f32.powi(-11)));
    assert_eq!(jit_smoke(a, a, c).unwrap(), 2f32.powi(-24), "math.fma must be fused");
}

#[test]
fn jit_propagates_nan_and_infinity() {
    assert!(jit_smoke(f32::NAN, 1.0, 1.0).unwrap().is_nan());
    assert_eq!(jit_smoke(f32::INFINITY, 2.0, 1.0).unwrap(), f32::INFINITY);
}

#[test]
fn llvm_ir_defines_the_function() {
    let ir = fma_llvm_ir().unwrap();
    assert!(ir.contains("define"), "{ir}");
    assert!(ir.contains(&format!("@{FMA_SYMBOL}(")), "{ir}");
    assert!(ir.contains("llvm.fma.f32"), "{ir}");
    assert!(ir.contains("target triple"), "{ir}");
    assert!(ir.contains("target datalayout"), "{ir}");
}

#[test]
fn host_cpu_is_known() {
    let host = host_cpu();
    assert!(!host.name.is_empty(), "{host:?}");
    assert!(!host.triple.is_empty(), "{host:?}");
}
