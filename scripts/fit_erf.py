#!/usr/bin/env python3
"""Fits the rational erf the kernels use (`Body::erf_of_scaled` in
compiler/codegen/src/mlir_text.rs): erf(u) ≈ u·P(u²)/Q(u²) on [0, 4], Q(0) = 1, for minimax
absolute error, by differential correction (a linear program per step, each weighted by the
previous Q). Prints the f32 coefficients and the error evaluated in f32.

Usage: fit_erf.py [P_DEGREE Q_DEGREE]   (default 5 5; needs numpy and scipy)
"""

import sys

import numpy as np
from scipy.optimize import linprog
from scipy.special import erf

BOUND = 4.0  # erf(4) = 1 - 1.5e-8 rounds to 1 in f32


def fit(dp, dq, steps=12):
    u = np.unique(np.concatenate([np.linspace(0, BOUND, 4000), BOUND * np.sin(np.linspace(0, np.pi / 2, 2000))]))
    s, f = u * u, erf(u)
    num = np.stack([u * s**i for i in range(dp + 1)], 1)
    den = np.stack([s**j for j in range(1, dq + 1)], 1)  # Q(s) - 1
    weight = np.ones_like(u)
    n = dp + 1 + dq + 1  # p, q1.., delta
    for _ in range(steps):
        # minimize delta subject to |num·p − f·(1 + den·q)| ≤ delta·Q_previous
        m = np.hstack([num, -f[:, None] * den])
        a_ub = np.vstack([np.hstack([m, -weight[:, None]]), np.hstack([-m, -weight[:, None]])])
        b_ub = np.concatenate([f, -f])
        cost = np.zeros(n)
        cost[-1] = 1
        r = linprog(cost, A_ub=a_ub, b_ub=b_ub, bounds=[(None, None)] * (n - 1) + [(0, None)], method="highs")
        p, q = r.x[: dp + 1], r.x[dp + 1 : -1]
        weight = 1 + den @ q
    return p, np.concatenate([[1.0], q]), np.max(np.abs(num @ p / weight - f))


def f32_error(p, q):
    f = np.float32
    x = np.linspace(0, 6, 200001).astype(f)
    xc = np.minimum(x, f(BOUND))
    s = xc * xc

    def horner(c):
        acc = np.full_like(s, f(c[-1]))
        for k in c[-2::-1]:
            acc = (acc.astype(np.float64) * s + f(k)).astype(f)  # one rounding, as an FMA
        return acc

    y = xc * horner(p) / horner(q)
    return np.max(np.abs(y.astype(np.float64) - erf(x.astype(np.float64))))


def main():
    dp, dq = (int(a) for a in sys.argv[1:3]) if len(sys.argv) >= 3 else (5, 5)
    p, q, err = fit(dp, dq)
    p32, q32 = p.astype(np.float32), q.astype(np.float32)
    print(f"degree {dp}/{dq}: max |error| {err:.2e} exact, {f32_error(p32, q32):.2e} in f32")
    print("P =", [float(v) for v in p32])
    print("Q =", [float(v) for v in q32])


if __name__ == "__main__":
    main()
