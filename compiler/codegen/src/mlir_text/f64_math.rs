//! The math functions of GPU kernels on f64, written out as arithmetic.
//!
//! No GPU target has them otherwise: GLSL.std.450's exp, log, sin, cos, tanh and pow are 16-
//! and 32-bit only, and NVVM would call NVIDIA's libdevice, which Kiln does not link. Each one
//! here is a range reduction and a series with enough terms for f64, evaluated in FMAs, so
//! every target computes the same values. The constants are the f64s nearest the exact ones,
//! printed by `scripts/f64_math_tables.py`. The errors quoted are those measured against
//! 300-bit references over each function's range (see `docs/backends.md`); the tests compare
//! lavapipe's results with the host's math library.
//!
//! Scalars and vectors of f64 alike: integer work happens in `i64` of the same shape.

use super::{with_elem, Body};

/// ln 2 in two parts: `LN2_HI` keeps 21 significant bits, so `n·LN2_HI` is exact for every
/// exponent `n`, and `LN2_LO` is the rest.
pub(super) const LN2_HI: f64 = 0.6931467056274414;
pub(super) const LN2_LO: f64 = 4.7493250390316726e-07;
/// π/2 in three parts, the first two of 33 significant bits (Cody–Waite reduction).
const HALF_PI: [f64; 3] = [1.5707963267341256, 6.077100506303966e-11, 2.0222662487959506e-21];
/// `eʳ − 1 = r + r²·Σ rᵏ/(k+2)!` for `k < 12`, highest degree first: |r| ≤ ln2/2 leaves a
/// remainder under 2e-17 of the result.
const EXPM1: [f64; 12] = [
    1.6059043836821613e-10,
    2.08767569878681e-09,
    2.505210838544172e-08,
    2.755731922398589e-07,
    2.7557319223985893e-06,
    2.48015873015873e-05,
    0.0001984126984126984,
    0.001388888888888889,
    0.008333333333333333,
    0.041666666666666664,
    0.16666666666666666,
    0.5,
];
/// `ln((1+s)/(1−s)) = 2s + s·z·Σ 2zᵏ/(2k+3)` for `z = s²` and `k < 10`: `|s| ≤ 0.1716`.
const LOG: [f64; 10] = [
    0.09523809523809523,
    0.10526315789473684,
    0.11764705882352941,
    0.13333333333333333,
    0.15384615384615385,
    0.18181818181818182,
    0.2222222222222222,
    0.2857142857142857,
    0.4,
    0.6666666666666666,
];
/// `sin r = r + r³·Σ (−1)ᵏ⁺¹ r²ᵏ/(2k+3)!` for `k < 8`: `|r| ≤ π/4`.
const SIN: [f64; 8] = [
    2.8114572543455206e-15,
    -7.647163731819816e-13,
    1.6059043836821613e-10,
    -2.505210838544172e-08,
    2.7557319223985893e-06,
    -0.0001984126984126984,
    0.008333333333333333,
    -0.16666666666666666,
];
/// `cos r = 1 − r²/2 + r⁴·Σ (−1)ᵏ r²ᵏ/(2k+4)!` for `k < 7`.
const COS: [f64; 7] = [
    4.779477332387385e-14,
    -1.1470745597729725e-11,
    2.08767569878681e-09,
    -2.755731922398589e-07,
    2.48015873015873e-05,
    -0.001388888888888889,
    0.041666666666666664,
];
/// `erf a = a·Σ (−1)ⁿ (2/√π)·a²ⁿ/(n!(2n+1))` for `n < 19`, used below `a = 1`.
const ERF_TAYLOR: [f64; 19] = [
    4.763348040515068e-18,
    -9.063970842808673e-17,
    1.6342614095367152e-15,
    -2.7835162072109215e-14,
    4.4632242632864775e-13,
    -6.7113668551641105e-12,
    9.422759064650411e-11,
    -1.2290555301717928e-09,
    1.4807192815879218e-08,
    -1.6365844691234924e-07,
    1.6462114365889248e-06,
    -1.492565035840625e-05,
    0.00012055332981789664,
    -0.0008548327023450853,
    0.005223977625442188,
    -0.026866170645131252,
    0.11283791670955126,
    -0.37612638903183754,
    std::f64::consts::FRAC_2_SQRT_PI,
];
/// `erf a = a·e^{−a²}·Σ (2/√π)·2ⁿa²ⁿ/(2n+1)!!` for `n < 40`: every term positive, so nothing
/// cancels; used for `1 ≤ a < 2.5`.
const ERF_SERIES: [f64; 40] = [
    7.775745942717823e-48,
    3.0714196473735403e-46,
    1.182496564238813e-44,
    4.434362115895549e-43,
    1.6185421723018752e-41,
    5.745824711671657e-40,
    1.9823095255267216e-38,
    6.640736910514518e-37,
    2.1582394959172183e-35,
    6.798454412139238e-34,
    2.0735285957024674e-32,
    6.116909357322279e-31,
    1.7433191668368497e-29,
    4.794127708801336e-28,
    1.2704438428323542e-26,
    3.239631799222503e-25,
    7.937097908095133e-24,
    1.8652180084023562e-22,
    4.196740518905301e-21,
    9.022992115646397e-20,
    1.8497133837075115e-18,
    3.606941098229647e-17,
    6.672841031724848e-16,
    1.1677471805518484e-14,
    1.9267828479105497e-13,
    2.986513414261352e-12,
    4.330444450678961e-11,
    5.846100008416597e-10,
    7.307625010520746e-09,
    8.403768762098858e-08,
    8.823957200203801e-07,
    8.38275934019361e-06,
    7.125345439164569e-05,
    0.0005344009079373427,
    0.0034736059015927274,
    0.01910483245876,
    0.08597174606442,
    0.30090111122547003,
    0.7522527780636751,
    std::f64::consts::FRAC_2_SQRT_PI,
];
const FRAC_1_SQRT_PI: f64 = 0.5641895835477563;
/// Levels of the continued fraction for `erfc` (used from `a = 2.5`, where 30 levels reach
/// f64's precision).
const ERFC_LEVELS: usize = 30;

impl Body {
    /// `eˣ`: `x = n·ln2 + r` with `|r| ≤ ln2/2`, `eʳ` from [`EXPM1`], and `2ⁿ` applied as two
    /// factors made from exponent bits, so results down into the subnormals and up to f64's
    /// largest need no special case. `x` is held to [−746, 710] first: beyond, the result
    /// rounds to 0 or overflows to inf anyway. Below 1 ulp.
    pub(super) fn exp_f64(&mut self, x: &str, ty: &str) -> String {
        let hi = self.float(710.0, ty);
        let lo = self.float(-746.0, ty);
        let x = self.fmin(x, &hi, ty);
        let x = self.fmax(&x, &lo, ty);
        let (n, r) = self.reduce_by_ln2(&x, ty);
        let s = self.expm1_reduced(&r, ty);
        let one = self.float(1.0, ty);
        let y = self.fadd(&s, &one, ty);
        self.times_two_to(&y, &n, ty)
    }

    /// `2ˣ`: `x = n + r` exactly, `2ʳ = e^{r·ln2}` as in [`Body::exp_f64`]. Below 1 ulp.
    pub(super) fn exp2_f64(&mut self, x: &str, ty: &str) -> String {
        let hi = self.float(1025.0, ty);
        let lo = self.float(-1076.0, ty);
        let x = self.fmin(x, &hi, ty);
        let x = self.fmax(&x, &lo, ty);
        let n = self.exact("roundeven", &x, ty);
        let neg_n = self.fneg(&n, ty);
        let r = self.fadd_exact(&x, &neg_n, ty);
        let ln2 = self.float(std::f64::consts::LN_2, ty);
        let r = self.fmul(&r, &ln2, ty);
        let s = self.expm1_reduced(&r, ty);
        let one = self.float(1.0, ty);
        let y = self.fadd(&s, &one, ty);
        self.times_two_to(&y, &n, ty)
    }

    /// `eˣ − 1` without the cancellation of subtracting 1 near 0: with `x = n·ln2 + r`,
    /// `2ⁿ·(eʳ − 1) + (2ⁿ − 1)` in one FMA, both exact for the `n ≤ 58` [`Body::tanh`]
    /// asks for.
    pub(super) fn expm1_f64(&mut self, x: &str, ty: &str) -> String {
        let (n, r) = self.reduce_by_ln2(x, ty);
        let s = self.expm1_reduced(&r, ty);
        let one = self.float(1.0, ty);
        let p = self.times_two_to(&one, &n, ty);
        let p1 = self.fsub(&p, &one, ty);
        self.fma_exact(&p, &s, &p1, ty)
    }

    /// `eʳ − 1` for `|r| ≤ ln2/2`: `r + r²·P(r)`.
    fn expm1_reduced(&mut self, r: &str, ty: &str) -> String {
        let p = self.poly(&EXPM1, r, ty);
        let r2 = self.fmul(r, r, ty);
        self.fma_exact(&p, &r2, r, ty)
    }

    /// The polynomial with `coeffs` (highest degree first) at `x`, by Horner's rule in FMAs
    /// kept as written.
    fn poly(&mut self, coeffs: &[f64], x: &str, ty: &str) -> String {
        let mut p = self.float(coeffs[0], ty);
        for &c in &coeffs[1..] {
            let c = self.float(c, ty);
            p = self.fma_exact(&p, x, &c, ty);
        }
        p
    }

    /// `y·2ⁿ` for an integral `n` in [−1076, 1025], as `y·2^⌊n/2⌋·2^⌈n/2⌉` (each factor a
    /// normal f64 built from its exponent bits).
    fn times_two_to(&mut self, y: &str, n: &str, ty: &str) -> String {
        let ity = with_elem(ty, "i64");
        let ni = self.assign(format!("arith.fptosi {n} : {ty} to {ity}"));
        let one = self.int_like(1, &ity);
        let h = self.assign(format!("arith.shrsi {ni}, {one} : {ity}"));
        let k = self.assign(format!("arith.subi {ni}, {h} : {ity}"));
        let mut y = y.to_string();
        for e in [h, k] {
            let bias = self.int_like(1023, &ity);
            let biased = self.assign(format!("arith.addi {e}, {bias} : {ity}"));
            let shift = self.int_like(52, &ity);
            let bits = self.assign(format!("arith.shli {biased}, {shift} : {ity}"));
            let factor = self.assign(format!("arith.bitcast {bits} : {ity} to {ty}"));
            y = self.fmul_exact(&y, &factor, ty);
        }
        y
    }

    /// `ln x`: `x = m·2ᵉ` with `m ∈ [√½, √2)` (subnormals scaled by 2⁵⁴ first), `f = m − 1`
    /// (exact) and `s = f/(2 + f)`, so `ln m = f − s·(f − s²·Q(s²))` with the correction
    /// small beside `f`; `e·ln2` added in two parts. 0 gives −inf, +inf gives +inf, negatives
    /// and NaN give NaN. Below 1 ulp.
    pub(super) fn log_f64(&mut self, x: &str, ty: &str) -> String {
        let (m, fe) = self.split_exponent(x, ty);
        let minus_one = self.float(-1.0, ty);
        let f = self.fadd_exact(&m, &minus_one, ty);
        let two = self.float(2.0, ty);
        let d = self.fadd(&f, &two, ty);
        let s = self.fdiv(&f, &d, ty);
        let z = self.fmul(&s, &s, ty);
        let q = self.poly(&LOG, &z, ty);
        let r = self.fmul(&z, &q, ty);
        let fr = self.fsub(&f, &r, ty);
        let corr = self.fmul(&s, &fr, ty);
        let ncorr = self.fneg(&corr, ty);
        let lo = self.float(LN2_LO, ty);
        let t = self.fma_exact(&fe, &lo, &ncorr, ty);
        let t = self.fadd_exact(&t, &f, ty);
        let hi = self.float(LN2_HI, ty);
        let r = self.fma_exact(&fe, &hi, &t, ty);
        self.log_special_cases(x, &r, ty)
    }

    /// `sin(x + shift·π/2)`: `x = j·π/2 + r` with `j = round(x·2/π)` and π/2 in three parts,
    /// `sin r` and `cos r` from [`SIN`] and [`COS`], and the quadrant `(j + shift) mod 4`
    /// picking one and its sign. About 2 ulp for `|x|` up to 10⁸; ±inf and NaN give NaN.
    pub(super) fn sin_cos_f64(&mut self, x: &str, shift: f64, ty: &str) -> String {
        let two_over_pi = self.float(std::f64::consts::FRAC_2_PI, ty);
        let t = self.fmul(x, &two_over_pi, ty);
        let j = self.exact("roundeven", &t, ty);
        let mut r = x.to_string();
        for part in HALF_PI {
            let c = self.float(-part, ty);
            r = self.fma_exact(&j, &c, &r, ty);
        }
        let r2 = self.fmul(&r, &r, ty);
        let sp = self.poly(&SIN, &r2, ty);
        let r3 = self.fmul(&r2, &r, ty);
        let sin_r = self.fma_exact(&r3, &sp, &r, ty);
        let cp = self.poly(&COS, &r2, ty);
        let r4 = self.fmul(&r2, &r2, ty);
        let one = self.float(1.0, ty);
        let minus_half = self.float(-0.5, ty);
        let c0 = self.fma_exact(&r2, &minus_half, &one, ty);
        let cos_r = self.fma_exact(&r4, &cp, &c0, ty);
        self.by_quadrant(&j, shift, &sin_r, &cos_r, ty)
    }

    /// `erf x`, on `a = |x|` in three pieces chosen by select (a GPU computes all three):
    /// the Taylor series below 1; `a·e^{−a²}` times the positive series [`ERF_SERIES`] below
    /// 2.5; `1 − erfc a` from erfc's continued fraction above (`a` held to 6, where erf rounds
    /// to 1). `e^{−a²}` takes `a²`'s rounding error back in (`a·a` is split by an FMA).
    /// NaN stays NaN. Up to 6 ulp, near `a = 2`.
    pub(super) fn erf_f64(&mut self, x: &str, ty: &str) -> String {
        let a = self.fabs(x, ty);
        let cap = self.float(6.0, ty);
        let a = self.fmin(&a, &cap, ty);
        let z = self.fmul_exact(&a, &a, ty);
        // Below 1.
        let taylor = self.poly(&ERF_TAYLOR, &z, ty);
        let taylor = self.fmul(&a, &taylor, ty);
        // e^{−a²}, with a² = z + z_lo exactly.
        let nz = self.fneg(&z, ty);
        let z_lo = self.fma_exact(&a, &a, &nz, ty);
        let e = self.exp_f64(&nz, ty);
        let ne = self.fneg(&e, ty);
        let e = self.fma_exact(&ne, &z_lo, &e, ty);
        // Below 2.5.
        let series = self.poly(&ERF_SERIES, &z, ty);
        let ae = self.fmul(&a, &e, ty);
        let middle = self.fmul(&ae, &series, ty);
        // Above: erfc a = e^{−a²}/√π · 1/(a + ½/(a + 1/(a + (3/2)/(a + …)))).
        let mut t = a.clone();
        for level in (1..=ERFC_LEVELS).rev() {
            let k = self.float(level as f64 / 2.0, ty);
            let q = self.fdiv(&k, &t, ty);
            t = self.fadd(&a, &q, ty);
        }
        let c = self.float(FRAC_1_SQRT_PI, ty);
        let ec = self.fmul(&e, &c, ty);
        let erfc = self.fdiv(&ec, &t, ty);
        let one = self.float(1.0, ty);
        let upper = self.fsub(&one, &erfc, ty);
        let mid_bound = self.float(2.5, ty);
        let in_middle = self.fcmp("olt", &a, &mid_bound, ty);
        let y = self.select(&in_middle, &middle, &upper, ty);
        let below_one = self.fcmp("olt", &a, &one, ty);
        let y = self.select(&below_one, &taylor, &y, ty);
        let y = self.copysign(&y, x, ty);
        let nan = self.fcmp("uno", x, x, ty);
        self.select(&nan, x, &y, ty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Significant bits of `v` (its mantissa without trailing zeros).
    fn significant_bits(v: f64) -> u32 {
        let mantissa = (v.to_bits() & ((1 << 52) - 1)) | (1 << 52);
        53 - mantissa.trailing_zeros()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 4.0 * f64::EPSILON * b.abs()
    }

    /// The tables are what their comments say, to f64 rounding, and the leading parts of the
    /// split constants are short enough that the reductions' products are exact without an
    /// FMA (|n| ≤ 1076 for ln2, |j| < 2²⁰ for π/2).
    #[test]
    fn tables_are_their_series_and_splits_are_exact() {
        let factorial = |k: u32| (1..=k).map(f64::from).product::<f64>();
        for (i, &c) in EXPM1.iter().rev().enumerate() {
            assert!(close(c, 1.0 / factorial(i as u32 + 2)), "EXPM1[{i}]");
        }
        for (k, &c) in LOG.iter().rev().enumerate() {
            assert!(close(c, 2.0 / (2 * k + 3) as f64), "LOG[{k}]");
        }
        for (k, &c) in SIN.iter().rev().enumerate() {
            let sign = if k % 2 == 0 { -1.0 } else { 1.0 };
            assert!(close(c, sign / factorial(2 * k as u32 + 3)), "SIN[{k}]");
        }
        for (k, &c) in COS.iter().rev().enumerate() {
            let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
            assert!(close(c, sign / factorial(2 * k as u32 + 4)), "COS[{k}]");
        }
        let two_over_sqrt_pi = std::f64::consts::FRAC_2_SQRT_PI;
        for (n, &c) in ERF_TAYLOR.iter().rev().enumerate() {
            let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
            let want = sign * two_over_sqrt_pi / (factorial(n as u32) * (2 * n + 1) as f64);
            assert!(close(c, want), "ERF_TAYLOR[{n}]");
        }
        let series: Vec<f64> = ERF_SERIES.iter().rev().copied().collect();
        assert!(close(series[0], two_over_sqrt_pi));
        for n in 1..series.len() {
            // Each term is the one before times 2/(2n + 1); a few roundings apart at most.
            let ratio = series[n] / series[n - 1];
            assert!((ratio - 2.0 / (2 * n + 1) as f64).abs() <= 1e-15, "ERF_SERIES[{n}]");
        }
        assert!(close(FRAC_1_SQRT_PI, two_over_sqrt_pi / 2.0));
        assert!(close(LN2_HI + LN2_LO, std::f64::consts::LN_2));
        assert!(significant_bits(LN2_HI) + 11 <= 53, "n·LN2_HI exact for |n| < 2¹¹");
        assert!(close(HALF_PI[0] + HALF_PI[1] + HALF_PI[2], std::f64::consts::FRAC_PI_2));
        for part in &HALF_PI[..2] {
            assert!(significant_bits(*part) + 20 <= 53, "j·{part} exact for |j| < 2²⁰");
        }
    }
}
