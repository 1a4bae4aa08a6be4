#!/usr/bin/env python3
"""Prints the constants of the GPU kernels' f64 math functions
(compiler/codegen/src/mlir_text/f64_math.rs): series coefficients and constants split into
parts, each the f64 nearest the exact value, worked out at 300 bits with mpmath.

Usage: f64_math_tables.py   (needs mpmath)
"""

import mpmath as mp

mp.mp.prec = 300


def f64(v):
    """The nearest f64, written so Rust reads it back exactly."""
    return repr(float(v))


def truncated(v, bits):
    """`v` with only its leading `bits` significant bits kept."""
    m, e = mp.frexp(v)
    return mp.ldexp(mp.floor(m * 2**bits) / 2**bits, e)


def table(name, values):
    print(f"const {name}: [f64; {len(values)}] = [")
    for v in values:
        print(f"    {f64(v)},")
    print("];")


def main():
    ln2 = mp.log(2)
    ln2_hi = truncated(ln2, 21)  # n·LN2_HI is exact for |n| < 2^32
    print(f"const LN2_HI: f64 = {f64(ln2_hi)};")
    print(f"const LN2_LO: f64 = {f64(ln2 - ln2_hi)};")
    half_pi = mp.pi / 2
    p1 = truncated(half_pi, 33)
    p2 = truncated(half_pi - p1, 33)
    print(f"const HALF_PI: [f64; 3] = [{f64(p1)}, {f64(p2)}, {f64(half_pi - p1 - p2)}];")
    # eʳ − 1 = r + r²·Σ rᵏ/(k+2)!, k < 12, highest degree first.
    table("EXPM1", [1 / mp.factorial(k + 2) for k in range(11, -1, -1)])
    # ln((1+s)/(1−s)) = 2s + s·z·Σ 2zᵏ/(2k+3), z = s², k < 10.
    table("LOG", [mp.mpf(2) / (2 * k + 3) for k in range(9, -1, -1)])
    # sin r = r + r³·Σ (−1)ᵏ⁺¹ r²ᵏ/(2k+3)!, k < 8.
    table("SIN", [(-1) ** (k + 1) / mp.factorial(2 * k + 3) for k in range(7, -1, -1)])
    # cos r = 1 − r²/2 + r⁴·Σ (−1)ᵏ r²ᵏ/(2k+4)!, k < 7.
    table("COS", [(-1) ** k / mp.factorial(2 * k + 4) for k in range(6, -1, -1)])
    # erf a = a·Σ (−1)ⁿ (2/√π) a²ⁿ/(n!(2n+1)), n < 19 (a < 1).
    c = 2 / mp.sqrt(mp.pi)
    table("ERF_TAYLOR", [(-1) ** n * c / (mp.factorial(n) * (2 * n + 1)) for n in range(18, -1, -1)])
    # erf a = a·e^{−a²}·Σ (2/√π) 2ⁿ a²ⁿ/(2n+1)!!, n < 40 (1 ≤ a < 2.5).
    table("ERF_SERIES", [c * mp.mpf(2) ** n / mp.fac2(2 * n + 1) for n in range(39, -1, -1)])
    print(f"const FRAC_1_SQRT_PI: f64 = {f64(1 / mp.sqrt(mp.pi))};")


if __name__ == "__main__":
    main()
