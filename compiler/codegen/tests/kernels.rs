//! Generated kernels compile, link, load and compute the right numbers.
//!
//! One test binary for all kernel tests: MLIR and LLVM link statically (~200 MB per binary).

use kiln_codegen::{mlir_text::Body, CpuTarget, Kernel, KernelLibrary};

/// `out[i] = f(x[i])` over 1-D f32 buffers of `n` elements, vectorized by `lanes`, one
/// iteration of the range per vector.
fn unary_kernel(symbol: &str, n: usize, lanes: usize, f: impl Fn(&mut Body, &str, &str) -> String) -> Kernel {
    let ty = format!("vector<{lanes}xf32>");
    let mem = format!("memref<{n}xf32>");
    let mut b = Body::new();
    let one = b.index(1);
    let step = b.index(lanes);
    b.open(format!("scf.for %i = %begin to %end step {one}"));
    let off = b.assign(format!("arith.muli %i, {step} : index"));
    let x = b.assign(format!("vector.load %x[{off}] : {mem}, {ty}"));
    let y = f(&mut b, &x, &ty);
    b.line(format!("vector.store {y}, %y[{off}] : {mem}, {ty}"));
    b.close("");
    b.line("return");
    let mlir = format!(
        "func.func @{symbol}(%x: {mem}, %y: {mem}, %begin: index, %end: index) {{\n{}}}\n",
        b.finish()
    );
    Kernel { symbol: symbol.into(), mlir, range: n / lanes, grain: 1, flops: n as u64, bytes: 8 * n as u64 }
}

fn run_unary(lib: &KernelLibrary, symbol: &str, x: &[f32]) -> Vec<f32> {
    let mut x = x.to_vec();
    let mut y = vec![0f32; x.len()];
    let bufs = [x.as_mut_ptr().cast::<u8>(), y.as_mut_ptr().cast::<u8>()];
    unsafe { lib.call(symbol, &bufs, 0, x.len() / 8).unwrap() };
    y
}

#[test]
fn math_approximations_match_libm() {
    let n = 4096;
    let kernels = vec![
        unary_kernel("k_exp", n, 8, |b, x, ty| b.exp(x, ty)),
        unary_kernel("k_exp2n", n, 8, |b, x, ty| b.exp2_nonpositive(x, ty)),
        unary_kernel("k_exp2n8", 8, 8, |b, x, ty| b.exp2_nonpositive(x, ty)),
        unary_kernel("k_erf", n, 8, |b, x, ty| b.erf(x, ty)),
        unary_kernel("k_tanh", n, 8, |b, x, ty| b.tanh(x, ty)),
        unary_kernel("k_sigmoid", n, 8, |b, x, ty| b.sigmoid(x, ty)),
        unary_kernel("k_gelu", n, 8, |b, x, ty| b.gelu(x, false, ty)),
        unary_kernel("k_erf8", 8, 8, |b, x, ty| b.erf(x, ty)),
        unary_kernel("k_gelu8", 8, 8, |b, x, ty| b.gelu(x, false, ty)),
    ];
    let lib = KernelLibrary::build(&kernels, &CpuTarget::host()).unwrap();
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - n as f32 / 2.0) * 0.02).collect();
    let exp = run_unary(&lib, "k_exp", &x);
    for (a, g) in x.iter().zip(&exp) {
        let want = (*a as f64).exp();
        assert!(((*g as f64) - want).abs() <= 3e-7 * want, "exp({a}) = {g}, want {want}");
    }
    // 2ˣ for x ≤ 0 (softmax in log₂ units): [−130, 0] densely, past the last normal power.
    let xn: Vec<f32> = (0..n).map(|i| -130.0 * i as f32 / (n - 1) as f32).collect();
    let exp2 = run_unary(&lib, "k_exp2n", &xn);
    for (a, g) in xn.iter().zip(&exp2) {
        let want = (*a as f64).exp2();
        if *a >= -126.0 {
            assert!(((*g as f64) - want).abs() <= 2e-7 * want, "exp2({a}) = {g}, want {want}");
        } else if *a < -127.0 {
            assert_eq!(*g, 0.0, "exp2({a})");
        }
    }
    // The row maximum's own p is exactly 1; hidden scores (−inf) and far-out ones are exactly 0.
    let edge2 = [0.0, -0.0, f32::NEG_INFINITY, -1e30, f32::NAN, -0.5, -1.0, -126.0];
    let exp2 = run_unary(&lib, "k_exp2n8", &edge2);
    assert_eq!(&exp2[..4], &[1.0, 1.0, 0.0, 0.0]);
    assert!(exp2[4].is_nan(), "exp2(NaN) = {}", exp2[4]);
    assert_eq!(exp2[6], 0.5);
    assert_eq!(exp2[7], 2f32.powi(-126));
    assert!((exp2[5] as f64 - (-0.5f64).exp2()).abs() <= 1.2e-7, "exp2(-0.5) = {}", exp2[5]);
    let erf = run_unary(&lib, "k_erf", &x);
    for (a, g) in x.iter().zip(&erf) {
        let want = libm::erf(*a as f64);
        assert!(((*g as f64) - want).abs() <= 3e-7, "erf({a}) = {g}, want {want}");
    }
    let tanh = run_unary(&lib, "k_tanh", &x);
    for (a, g) in x.iter().zip(&tanh) {
        let want = (*a as f64).tanh();
        assert!(((*g as f64) - want).abs() <= 3e-7, "tanh({a}) = {g}, want {want}");
    }
    let sig = run_unary(&lib, "k_sigmoid", &x);
    for (a, g) in x.iter().zip(&sig) {
        let want = 1.0 / (1.0 + (-*a as f64).exp());
        assert!(((*g as f64) - want).abs() <= 3e-7, "sigmoid({a}) = {g}, want {want}");
    }
    let gelu = run_unary(&lib, "k_gelu", &x);
    for (a, g) in x.iter().zip(&gelu) {
        let a = *a as f64;
        let want = 0.5 * a * (1.0 + libm::erf(a / std::f64::consts::SQRT_2));
        assert!(((*g as f64) - want).abs() <= 1e-6 * a.abs().max(1.0), "gelu({a}) = {g}, want {want}");
    }
    // Far out the erf saturates exactly, so GELU of a very negative x is exactly 0; NaN stays NaN.
    let edge = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -1e4, 1e4, -0.0, 3.9, -3.9];
    let erf = run_unary(&lib, "k_erf8", &edge);
    assert!(erf[0].is_nan(), "erf(NaN) = {}", erf[0]);
    assert_eq!(&erf[1..6], &[1.0, -1.0, -1.0, 1.0, 0.0]);
    let gelu = run_unary(&lib, "k_gelu8", &edge);
    assert!(gelu[0].is_nan(), "gelu(NaN) = {}", gelu[0]);
    assert_eq!(&gelu[3..6], &[0.0, 1e4, 0.0], "gelu(-1e4), gelu(1e4), gelu(-0)");
}
