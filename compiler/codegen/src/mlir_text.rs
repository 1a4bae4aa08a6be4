//! A small builder for MLIR text: fresh SSA names, nested regions, constants, and the math
//! functions kernels need, written as arith ops so that LLVM can vectorize them.
//!
//! Kernels are emitted as text and parsed by MLIR: the text is what `kiln inspect --stage mlir`
//! shows, reads like hand-written MLIR, and keeps emitters short. Every value is typed by a
//! type string (`f32`, `vector<8xf32>`, `index`, …); the helpers below work on scalars and
//! vectors alike.

use std::fmt::Write;

use crate::gpu::GpuFlavor;

mod f64_math;

/// `eʳ = 1 + r + r²·P(r)` on f32 for `|r| ≤ ln2/2`: `P`'s coefficients, highest degree first.
const EXP_F32: [f64; 6] =
    [1.987_569_15e-4, 1.398_199_95e-3, 8.333_451_9e-3, 4.166_579_6e-2, 1.666_666_55e-1, 5.000_000_1e-1];

/// MLIR text under construction, with indentation and an SSA name counter.
#[derive(Debug, Default)]
pub struct Body {
    out: String,
    indent: usize,
    next: u32,
    /// Kernel arguments bound in pieces (see [`Split`]), by argument name.
    splits: Vec<(String, Split)>,
    /// The GPU lowering a kernel body is written for; `None` for CPU kernels.
    gpu: Option<GpuFlavor>,
    /// Workgroup arrays declared as attributions of the kernel function.
    attributions: Vec<Attribution>,
    /// How many symbol values a GPU kernel reads from its `%syms` argument, once it reads any.
    symbols: Option<usize>,
}

/// A read-only buffer larger than one binding may cover, bound as consecutive pieces of
/// `piece_len` elements (the last may be shorter): argument `%aN` becomes `%aN_0`, `%aN_1`, …,
/// and a load of element `i` reads piece `i / piece_len` at `i % piece_len`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Split {
    pub piece_len: usize,
    pub buffer_len: usize,
}

impl Split {
    /// The number of pieces.
    pub fn pieces(&self) -> usize {
        self.buffer_len.div_ceil(self.piece_len.max(1)).max(1)
    }

    /// The length of piece `k`.
    pub fn len_of(&self, k: usize) -> usize {
        (self.buffer_len - k * self.piece_len).min(self.piece_len)
    }
}

/// A workgroup array of a GPU kernel: its name, memref type and size in bytes.
#[derive(Clone, Debug)]
pub struct Attribution {
    pub name: String,
    pub ty: String,
    pub bytes: usize,
}

impl Body {
    pub fn new() -> Body {
        Body {
            out: String::new(),
            indent: 1,
            next: 0,
            splits: Vec::new(),
            gpu: None,
            attributions: Vec::new(),
            symbols: None,
        }
    }

    /// A body whose kernel binds the arguments in `splits` in pieces.
    pub fn with_splits(splits: Vec<(String, Split)>) -> Body {
        Body { splits, ..Body::new() }
    }

    /// A GPU kernel's body for the lowering `flavor`, binding the arguments in `splits` in
    /// pieces. Its math functions are the polynomial ones on f32 ([`Body::log`] …): every GPU
    /// target computes them the same way, to the same accuracy, and no target needs a math
    /// library (NVVM would call NVIDIA's libdevice; Vulkan's built-ins are only as accurate as
    /// each driver).
    pub fn for_gpu(splits: Vec<(String, Split)>, flavor: GpuFlavor) -> Body {
        Body { splits, gpu: Some(flavor), ..Body::new() }
    }

    /// The GPU lowering this body is written for, if it is a GPU kernel's.
    pub fn gpu(&self) -> Option<GpuFlavor> {
        self.gpu
    }

    /// Records that the kernel reads the run's `n` symbol values (a GPU kernel then takes them
    /// as its last argument, `%syms`).
    pub fn read_symbols(&mut self, n: usize) {
        self.symbols = Some(n);
    }

    /// The number of symbol values the kernel reads, when it reads any.
    pub fn symbols(&self) -> Option<usize> {
        self.symbols
    }

    /// Declares a workgroup array of type `ty` (`bytes` long) as an attribution of the kernel
    /// function and returns its name.
    pub fn attribution(&mut self, ty: String, bytes: usize) -> String {
        let name = self.fresh("wg");
        self.attributions.push(Attribution { name: name.clone(), ty, bytes });
        name
    }

    /// The workgroup attributions declared so far.
    pub fn attributions(&self) -> &[Attribution] {
        &self.attributions
    }

    /// How argument `arg` is split, if it is.
    pub fn split_of(&self, arg: &str) -> Option<&Split> {
        self.splits.iter().find(|(a, _)| a == arg).map(|(_, s)| s)
    }

    /// A fresh SSA name, `%{hint}{n}`.
    pub fn fresh(&mut self, hint: &str) -> String {
        self.next += 1;
        format!("%{hint}{}", self.next)
    }

    /// Writes one line at the current indentation.
    pub fn line(&mut self, text: impl AsRef<str>) {
        for _ in 0..self.indent {
            self.out.push_str("  ");
        }
        self.out.push_str(text.as_ref());
        self.out.push('\n');
    }

    /// Writes `%vN = rhs` and returns `%vN`.
    pub fn assign(&mut self, rhs: impl AsRef<str>) -> String {
        let name = self.fresh("v");
        self.line(format!("{name} = {}", rhs.as_ref()));
        name
    }

    /// Writes `header {` and indents the lines that follow.
    pub fn open(&mut self, header: impl AsRef<str>) {
        self.line(format!("{} {{", header.as_ref()));
        self.indent += 1;
    }

    /// Closes the innermost region: `}` followed by `tail` (e.g. ` : (f32) -> f32`).
    pub fn close(&mut self, tail: &str) {
        self.indent = self.indent.saturating_sub(1);
        self.line(format!("}}{tail}"));
    }

    /// The text written so far.
    pub fn finish(self) -> String {
        self.out
    }

    /// An `index` constant.
    pub fn index(&mut self, v: usize) -> String {
        self.assign(format!("arith.constant {v} : index"))
    }

    /// An integer constant of scalar type `ty` (`i32`, `i64`, `i8`, `i1`).
    pub fn int(&mut self, v: i64, ty: &str) -> String {
        self.assign(format!("arith.constant {v} : {ty}"))
    }

    /// A float constant of type `ty` (scalar or vector, splatted), exact to the bit.
    pub fn float(&mut self, v: f64, ty: &str) -> String {
        let bits = float_bits(v, elem_type(ty));
        if is_vector(ty) {
            self.assign(format!("arith.constant dense<{bits}> : {ty}"))
        } else {
            self.assign(format!("arith.constant {bits} : {ty}"))
        }
    }

    /// `arith.{op} a, b` on floats, allowing contraction into FMAs.
    pub fn fbin(&mut self, op: &str, a: &str, b: &str, ty: &str) -> String {
        self.assign(format!("arith.{op} {a}, {b} fastmath<contract> : {ty}"))
    }

    pub fn fadd(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.fbin("addf", a, b, ty)
    }
    pub fn fsub(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.fbin("subf", a, b, ty)
    }
    pub fn fmul(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.fbin("mulf", a, b, ty)
    }
    pub fn fdiv(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.fbin("divf", a, b, ty)
    }
    /// `a * b + c` with one rounding.
    pub fn fma(&mut self, a: &str, b: &str, c: &str, ty: &str) -> String {
        self.assign(format!("math.fma {a}, {b}, {c} : {ty}"))
    }
    /// `a * b + c`, which no later compiler may merge with other operations or reorder: the
    /// range reductions of the math functions depend on it. SPIR-V promises that only for
    /// instructions decorated `NoContraction` (without it Mesa lowered `Fma` to a multiply and
    /// an add and reassociated them: `x − n·hi − n·lo` became `x − n·(hi + lo)` on lavapipe),
    /// so SPIR-V kernels write `spirv.GL.Fma` with that decoration; LLVM (the CPU and NVVM)
    /// keeps `math.fma` as written. Vulkan may still round the product before the add, so
    /// the reductions split their constants so that those products are exact.
    pub fn fma_exact(&mut self, a: &str, b: &str, c: &str, ty: &str) -> String {
        match self.gpu {
            Some(GpuFlavor::Spirv) => {
                self.assign(format!("spirv.GL.Fma {a}, {b}, {c} {{no_contraction}} : {ty}"))
            }
            Some(GpuFlavor::Nvvm) | None => self.fma(a, b, c, ty),
        }
    }
    /// `a + b`, rounded once and kept as written, as [`Body::fma_exact`] keeps FMAs.
    pub fn fadd_exact(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.exact_binary(("FAdd", "addf"), a, b, ty)
    }
    /// `a * b`, rounded once and kept as written, as [`Body::fma_exact`] keeps FMAs.
    pub fn fmul_exact(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.exact_binary(("FMul", "mulf"), a, b, ty)
    }
    /// The SPIR-V op `spirv` decorated `NoContraction` in SPIR-V kernels, else `arith.{arith}`
    /// without fast-math flags.
    fn exact_binary(&mut self, (spirv, arith): (&str, &str), a: &str, b: &str, ty: &str) -> String {
        match self.gpu {
            Some(GpuFlavor::Spirv) => {
                self.assign(format!("spirv.{spirv} {a}, {b} {{no_contraction}} : {ty}"))
            }
            Some(GpuFlavor::Nvvm) | None => self.assign(format!("arith.{arith} {a}, {b} : {ty}")),
        }
    }
    /// Maximum that propagates NaN.
    pub fn fmax(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.assign(format!("arith.maximumf {a}, {b} : {ty}"))
    }
    /// Minimum that propagates NaN.
    pub fn fmin(&mut self, a: &str, b: &str, ty: &str) -> String {
        self.assign(format!("arith.minimumf {a}, {b} : {ty}"))
    }
    pub fn fneg(&mut self, a: &str, ty: &str) -> String {
        self.assign(format!("arith.negf {a} : {ty}"))
    }
    pub fn fabs(&mut self, a: &str, ty: &str) -> String {
        self.exact("absf", a, ty)
    }
    pub fn sqrt(&mut self, a: &str, ty: &str) -> String {
        self.exact("sqrt", a, ty)
    }
    /// `1 / √a`, exact to the division (no fast reciprocal estimate).
    pub fn rsqrt(&mut self, a: &str, ty: &str) -> String {
        let one = self.float(1.0, ty);
        let s = self.sqrt(a, ty);
        self.fdiv(&one, &s, ty)
    }
    /// `a > b ? a : b`-style select on a comparison `pred` (`ogt`, `olt`, …).
    pub fn fcmp(&mut self, pred: &str, a: &str, b: &str, ty: &str) -> String {
        self.assign(format!("arith.cmpf {pred}, {a}, {b} : {ty}"))
    }
    pub fn select(&mut self, cond: &str, a: &str, b: &str, ty: &str) -> String {
        self.assign(format!("arith.select {cond}, {a}, {b} : {}, {ty}", bool_type_like(ty)))
    }
    /// Broadcasts scalar `a` (of `ty`'s element type) to vector type `ty`.
    pub fn splat(&mut self, a: &str, ty: &str) -> String {
        self.assign(format!("vector.broadcast {a} : {} to {ty}", elem_type(ty)))
    }

    /// `eˣ` over f32's whole range (scalar or vector): range reduction to `r ∈ [−ln2/2, ln2/2]`,
    /// a degree-6 polynomial ([`Body::exp_reduced`]), and `2ⁿ` put in as two factors of
    /// exponent bits ([`Body::two_to_f32_halves`]), so that results near f32's largest and in
    /// the subnormals are rounded once. Relative error < 2e-7 on normal results; inf above
    /// 88.72 (and for +inf), 0 below −103.9 (and for −inf), NaN stays NaN. f64 in a GPU kernel:
    /// [`Body::exp_f64`]. Else `math.exp`.
    pub fn exp(&mut self, x: &str, ty: &str) -> String {
        if self.gpu_f64(ty) {
            return self.exp_f64(x, ty);
        }
        if elem_type(ty) != "f32" {
            return self.assign(format!("math.exp {x} : {ty}"));
        }
        // Past these every result is inf or 0 already, and 2ⁿ's halves stay normal.
        let hi = self.float(89.0, ty);
        let lo = self.float(-104.0, ty);
        let x = self.fmin(x, &hi, ty);
        let x = self.fmax(&x, &lo, ty);
        let (n, y) = self.exp_reduced(&x, ty);
        let (half, rest) = self.two_to_f32_halves(&n, ty);
        let y = self.fmul(&y, &half, ty);
        self.fmul(&y, &rest, ty)
    }

    /// `eˣ` for `x ≤ 0`, or NaN: a value less its row's maximum, as softmax and attention
    /// take their exponentials. f32: [`Body::exp`]'s polynomial with `2ⁿ` as one factor, `x`
    /// raised to −87.3 first, so arguments below that give about 1.2e-38 instead of a
    /// subnormal or 0 (weighed against a sum of at least 1, the largest weight's). A multiply, a
    /// clamp and five integer operations fewer than [`Body::exp`] in the kernels' innermost
    /// loops. f64 in a GPU kernel: [`Body::exp_f64`]. Else `math.exp`.
    pub fn exp_nonpositive(&mut self, x: &str, ty: &str) -> String {
        if self.gpu_f64(ty) {
            return self.exp_f64(x, ty);
        }
        if elem_type(ty) != "f32" {
            return self.assign(format!("math.exp {x} : {ty}"));
        }
        let lo = self.float(-87.3, ty);
        let x = self.fmax(x, &lo, ty);
        let (n, y) = self.exp_reduced(&x, ty);
        let scale = self.two_to_f32(&n, ty);
        self.fmul(&y, &scale, ty)
    }

    /// `x = n·ln2 + r` and `eʳ = 1 + r + r²·P(r)` on f32: `(n, eʳ)`.
    fn exp_reduced(&mut self, x: &str, ty: &str) -> (String, String) {
        let (n, r) = self.reduce_by_ln2(x, ty);
        let p = self.horner(&EXP_F32, &r, ty);
        let r2 = self.fmul(&r, &r, ty);
        let one = self.float(1.0, ty);
        let r1 = self.fadd(&r, &one, ty);
        let y = self.fma(&p, &r2, &r1, ty);
        (n, y)
    }

    /// `2ⁿ` for an integral f32 `n` in [−126, 127], from its exponent bits.
    fn two_to_f32(&mut self, n: &str, ty: &str) -> String {
        let ity = with_elem(ty, "i32");
        let ni = self.assign(format!("arith.fptosi {n} : {ty} to {ity}"));
        self.two_to_i32(&ni, ty)
    }

    /// `2ⁿ` as two factors, `2^⌊n/2⌋` and `2^(n − ⌊n/2⌋)`, for an integral f32 `n` in
    /// [−252, 254]: each stays normal, so `y·2^⌊n/2⌋` is exact for `y` near 1 and only the
    /// second product rounds, into the subnormals or to inf where `y·2ⁿ` lies there.
    fn two_to_f32_halves(&mut self, n: &str, ty: &str) -> (String, String) {
        let ity = with_elem(ty, "i32");
        let ni = self.assign(format!("arith.fptosi {n} : {ty} to {ity}"));
        let one = self.int_like(1, &ity);
        let half = self.assign(format!("arith.shrsi {ni}, {one} : {ity}"));
        let rest = self.assign(format!("arith.subi {ni}, {half} : {ity}"));
        (self.two_to_i32(&half, ty), self.two_to_i32(&rest, ty))
    }

    /// `2ⁿ` as f32 `ty` for `n` (i32 of the same shape) in [−126, 127], from exponent bits.
    fn two_to_i32(&mut self, ni: &str, ty: &str) -> String {
        let ity = with_elem(ty, "i32");
        let bias = self.int_like(127, &ity);
        let e = self.assign(format!("arith.addi {ni}, {bias} : {ity}"));
        let shift = self.int_like(23, &ity);
        let e = self.assign(format!("arith.shli {e}, {shift} : {ity}"));
        self.assign(format!("arith.bitcast {e} : {ity} to {ty}"))
    }

    /// `2ˣ` for `x ≤ 0` (or −inf, or NaN): softmax's exponential once its arguments are in
    /// log₂ units (scaled by log₂e ahead, as the attention kernel folds into its q scale). f32:
    /// `x` is raised to −127 (NaN passes); `t = x + (1.5·2²³ + 127)` rounds `x` to an integer `n`
    /// and leaves `n + 127` in the low mantissa bits, which shifted into the exponent field are
    /// `2ⁿ` (exactly 0 for `n = −127`, so the result is 0 below about 2⁻¹²⁶·⁵ and for −inf);
    /// `r = x − n ∈ [−½, ½]` is exact, and `2ʳ = 1 + r·P(r)` with `P` of degree 4 fitted for
    /// relative error. Relative error < 1.7e-7 (two f32 roundings) against the exact value, in
    /// 11 vector ops, 6 of them multiplies or FMAs (`eˣ` with its range reduction takes 10 of
    /// those). f64 in a GPU kernel: [`Body::exp2_f64`]; else `math.exp2`.
    pub fn exp2_nonpositive(&mut self, x: &str, vty: &str) -> String {
        if self.gpu_f64(vty) {
            return self.exp2_f64(x, vty);
        }
        if elem_type(vty) != "f32" {
            return self.assign(format!("math.exp2 {x} : {vty}"));
        }
        let lo = self.float(-127.0, vty);
        let below = self.fcmp("olt", x, &lo, vty);
        let x = self.select(&below, &lo, x, vty);
        let magic = self.float(12_582_912.0 + 127.0, vty);
        let t = self.fadd_exact(&x, &magic, vty);
        let minus_magic = self.float(-(12_582_912.0 + 127.0), vty);
        let n = self.fadd_exact(&t, &minus_magic, vty);
        let minus_n = self.fneg(&n, vty);
        let r = self.fadd_exact(&x, &minus_n, vty);
        // 2ʳ ≈ 1 + c₁r + … + c₅r⁵ on [−½, ½], highest degree first.
        let coeffs = [1.326_469_8e-3, 9.671_509_3e-3, 5.550_733_95e-2, 2.402_224_2e-1, 6.931_470_04e-1];
        let p = self.horner(&coeffs, &r, vty);
        let one = self.float(1.0, vty);
        let y = self.fma(&p, &r, &one, vty);
        let ity = with_elem(vty, "i32");
        let bits = self.assign(format!("arith.bitcast {t} : {vty} to {ity}"));
        let shift = self.int_like(23, &ity);
        let e = self.assign(format!("arith.shli {bits}, {shift} : {ity}"));
        let scale = self.assign(format!("arith.bitcast {e} : {ity} to {vty}"));
        self.fmul(&y, &scale, vty)
    }

    /// `x = n·ln2 + r` for `n = round(x·log₂e)`, f32 or f64: `(n, r)`, `|r| ≤ ln2/2`. ln2 is in
    /// two parts, the first short enough that `n` times it is exact, so `r` is exact to one
    /// rounding.
    fn reduce_by_ln2(&mut self, x: &str, ty: &str) -> (String, String) {
        let log2e = self.float(std::f64::consts::LOG2_E, ty);
        let t = self.fmul(x, &log2e, ty);
        let n = self.exact("roundeven", &t, ty);
        let (hi, lo) = if elem_type(ty) == "f64" {
            (-f64_math::LN2_HI, -f64_math::LN2_LO)
        } else {
            (-0.693_359_375, 2.121_944_4e-4)
        };
        let hi = self.float(hi, ty);
        let lo = self.float(lo, ty);
        let r = self.fma_exact(&n, &hi, x, ty);
        let r = self.fma_exact(&n, &lo, &r, ty);
        (n, r)
    }

    /// The polynomial with `coeffs` (highest degree first) at `x`, by Horner's rule in FMAs.
    fn horner(&mut self, coeffs: &[f64], x: &str, ty: &str) -> String {
        let mut p = self.float(coeffs[0], ty);
        for &c in &coeffs[1..] {
            let c = self.float(c, ty);
            p = self.fma(&p, x, &c, ty);
        }
        p
    }

    /// Transposes `rows.len()` (a power of two, the lane count) vectors: element `t` of result `i`
    /// is element `i` of input `t`. Eight lanes use the in-128-bit-lane unpack/shuffle network
    /// (24 shuffles); other widths repeat a perfect-shuffle interleave `log2(lanes)` times.
    pub fn transpose(&mut self, rows: &[String], vty: &str) -> Vec<String> {
        let l = rows.len();
        let shuffle = |b: &mut Body, x: &str, y: &str, mask: &[usize]| {
            let m: Vec<String> = mask.iter().map(|i| i.to_string()).collect();
            b.assign(format!("vector.shuffle {x}, {y} [{}] : {vty}, {vty}", m.join(", ")))
        };
        if l == 8 {
            let lo = [0, 8, 1, 9, 4, 12, 5, 13];
            let hi = [2, 10, 3, 11, 6, 14, 7, 15];
            let mut t = Vec::with_capacity(8);
            for pair in rows.chunks(2) {
                t.push(shuffle(self, &pair[0], &pair[1], &lo));
                t.push(shuffle(self, &pair[0], &pair[1], &hi));
            }
            let lo2 = [0, 1, 8, 9, 4, 5, 12, 13];
            let hi2 = [2, 3, 10, 11, 6, 7, 14, 15];
            // s[0..4] from rows 0–3 (k = 0,1,2,3 | 4,5,6,7 in the two halves), s[4..8] from 4–7.
            let mut s = Vec::with_capacity(8);
            for base in [0, 4] {
                s.push(shuffle(self, &t[base], &t[base + 2], &lo2));
                s.push(shuffle(self, &t[base], &t[base + 2], &hi2));
                s.push(shuffle(self, &t[base + 1], &t[base + 3], &lo2));
                s.push(shuffle(self, &t[base + 1], &t[base + 3], &hi2));
            }
            let low = [0, 1, 2, 3, 8, 9, 10, 11];
            let high = [4, 5, 6, 7, 12, 13, 14, 15];
            let mut out = vec![String::new(); 8];
            for i in 0..4 {
                out[i] = shuffle(self, &s[i], &s[i + 4], &low);
                out[i + 4] = shuffle(self, &s[i], &s[i + 4], &high);
            }
            return out;
        }
        let lo: Vec<usize> = (0..l / 2).flat_map(|i| [i, i + l]).collect();
        let hi: Vec<usize> = (l / 2..l).flat_map(|i| [i, i + l]).collect();
        let mut x = rows.to_vec();
        let mut width = 1;
        while width < l {
            let mut next = Vec::with_capacity(l);
            for i in 0..l / 2 {
                next.push(shuffle(self, &x[i], &x[i + l / 2], &lo));
                next.push(shuffle(self, &x[i], &x[i + l / 2], &hi));
            }
            x = next;
            width *= 2;
        }
        x
    }

    /// An integer constant of scalar or vector integer type `ty`.
    pub fn int_like(&mut self, v: i64, ty: &str) -> String {
        if is_vector(ty) {
            self.assign(format!("arith.constant dense<{v}> : {ty}"))
        } else {
            self.int(v, ty)
        }
    }

    /// `tanh x = sign(x)·m/(m + 2)` on f32, and on f64 in a GPU kernel, for `m = e^{2|x|} − 1`
    /// computed without subtracting 1 near 0 ([`Body::expm1_f32`], [`Body::expm1_f64`]), so
    /// small arguments keep their relative precision (within 3 ulp); `|x|` is held to 9 (f32)
    /// or 20 (f64), where tanh rounds to 1. `math.tanh` otherwise.
    pub fn tanh(&mut self, x: &str, ty: &str) -> String {
        let f64_here = self.gpu_f64(ty);
        if elem_type(ty) != "f32" && !f64_here {
            return self.assign(format!("math.tanh {x} : {ty}"));
        }
        let ax = self.fabs(x, ty);
        let cap = self.float(if f64_here { 20.0 } else { 9.0 }, ty);
        let ax = self.fmin(&ax, &cap, ty);
        let u = self.fadd(&ax, &ax, ty);
        let m = if f64_here { self.expm1_f64(&u, ty) } else { self.expm1_f32(&u, ty) };
        let two = self.float(2.0, ty);
        let d = self.fadd(&m, &two, ty);
        let t = self.fdiv(&m, &d, ty);
        self.copysign(&t, x, ty)
    }

    /// `eˣ − 1` on f32 for `0 ≤ x ≤ 18`: with `x = n·ln2 + r`, `2ⁿ·(eʳ − 1) + (2ⁿ − 1)` in one
    /// FMA, `eʳ − 1 = r + r²·P(r)` with [`Body::exp`]'s polynomial.
    fn expm1_f32(&mut self, x: &str, ty: &str) -> String {
        let (n, r) = self.reduce_by_ln2(x, ty);
        let p = self.horner(&EXP_F32, &r, ty);
        let r2 = self.fmul(&r, &r, ty);
        let s = self.fma(&p, &r2, &r, ty);
        let scale = self.two_to_f32(&n, ty);
        let one = self.float(1.0, ty);
        let scale_1 = self.fsub(&scale, &one, ty);
        self.fma_exact(&scale, &s, &scale_1, ty)
    }

    /// `erf x` on f32 as a rational function (see [`Body::erf_of_scaled`]); f64 in a GPU
    /// kernel: [`Body::erf_f64`]; `math.erf` otherwise. NaN stays NaN.
    pub fn erf(&mut self, x: &str, ty: &str) -> String {
        if self.gpu_f64(ty) {
            return self.erf_f64(x, ty);
        }
        if elem_type(ty) != "f32" {
            return self.assign(format!("math.erf {x} : {ty}"));
        }
        let y = self.erf_of_scaled(x, 1.0, ty);
        let nan = self.fcmp("uno", x, x, ty);
        self.select(&nan, x, &y, ty)
    }

    /// `erf(c·x)` on f32: `u·P(u²)/Q(u²)` with `u = c·x` clamped to ±4 (where erf rounds to ±1),
    /// `P` and `Q` of degree 5 in `u²`, fitted by `scripts/fit_erf.py` for minimax absolute
    /// error on [0, 4] (5e-8 in exact arithmetic, 3e-7 evaluated in f32). `c` is folded into
    /// the coefficients. Ten FMAs and one division, no exp: this is what GELU costs in a matmul
    /// epilogue. A NaN `x` gives a finite value (the clamp drops it): callers that must keep
    /// NaN, like [`Body::erf`], check for it.
    pub fn erf_of_scaled(&mut self, x: &str, c: f64, ty: &str) -> String {
        const P: [f64; 6] = [
            1.128_378_987_312_317,
            0.197_916_433_215_141_3,
            0.053_689_271_211_624_146,
            0.004_075_869_452_208_280_6,
            2.897_660_015_150_904_7e-4,
            1.963_177_965_080_831e-6,
        ];
        const Q: [f64; 6] = [
            1.0,
            0.508_729_755_878_448_5,
            0.117_166_854_441_165_92,
            0.015_588_499_605_655_67,
            0.001_234_084_600_582_718_8,
            3.745_055_801_118_724e-5,
        ];
        let bound = 4.0 / c;
        let hi = self.float(bound, ty);
        let lo = self.float(-bound, ty);
        let x = self.hardware("arith.minnumf", "minnum", &[x, &hi], ty);
        let x = self.hardware("arith.maxnumf", "maxnum", &[&x, &lo], ty);
        let s = self.fmul(&x, &x, ty);
        // In x² the coefficient of u^(2i) is multiplied by c^(2i) (and P's by c once more).
        let in_x = |coeffs: &[f64], scale: f64| -> Vec<f64> {
            (0..coeffs.len()).rev().map(|i| coeffs[i] * (c * c).powi(i as i32) * scale).collect()
        };
        let p = self.horner(&in_x(&P, c), &s, ty);
        let q = self.horner(&in_x(&Q, 1.0), &s, ty);
        let xp = self.fmul(&x, &p, ty);
        self.fdiv(&xp, &q, ty)
    }

    /// `math.{op} x` for `op` one of `sqrt`, `roundeven`, `floor`, `absf`: exact operations
    /// every target has in hardware. See [`Body::hardware`].
    pub fn exact(&mut self, op: &str, x: &str, ty: &str) -> String {
        let intrinsic = if op == "absf" { "fabs" } else { op };
        self.hardware(&format!("math.{op}"), intrinsic, &[x], ty)
    }

    /// `{op} args : ty` (e.g. `math.copysign`, `arith.minnumf`), an operation with an LLVM
    /// intrinsic of the same meaning (`copysign`, `minnum`). On NVVM it is written as a call of
    /// that intrinsic: `convert-gpu-to-nvvm` turns these `math`/`arith` ops into libdevice calls
    /// and refuses the `llvm.intr.*` ops the LLVM conversions would make, while NVPTX selects
    /// the intrinsics directly (`sqrt.rn`, `cvt.rni`, `abs`, `min`, …).
    fn hardware(&mut self, op: &str, intrinsic: &str, args: &[&str], ty: &str) -> String {
        let list = args.join(", ");
        match (self.gpu, is_vector(ty)) {
            (Some(GpuFlavor::Nvvm), false) => {
                let types = vec![ty; args.len()].join(", ");
                self.assign(format!(
                    "llvm.call_intrinsic \"llvm.{intrinsic}.{ty}\"({list}) : ({types}) -> {ty}"
                ))
            }
            _ => self.assign(format!("{op} {list} : {ty}")),
        }
    }

    /// The magnitude of `mag` with the sign of `sign`.
    pub fn copysign(&mut self, mag: &str, sign: &str, ty: &str) -> String {
        self.hardware("math.copysign", "copysign", &[mag, sign], ty)
    }

    /// Whether math functions are written out as polynomials here: f32 values of a GPU kernel
    /// (see [`Body::for_gpu`]). CPU kernels call the math library through `math.*`.
    fn portable(&self, ty: &str) -> bool {
        self.gpu.is_some() && elem_type(ty) == "f32"
    }

    /// Whether `ty`'s values are f64 in a GPU kernel, whose math functions are the ones of
    /// `f64_math` (no GPU target has them at 64 bits).
    fn gpu_f64(&self, ty: &str) -> bool {
        self.gpu.is_some() && elem_type(ty) == "f64"
    }

    /// `ln x`. Portable f32: `x = m·2ᵉ` with `m ∈ [√½, √2)` (subnormals scaled by 2²³ first),
    /// `ln m = f − f²/2 + f³·P(f)` for `f = m − 1` (`P` of degree 8, the Cephes `logf`
    /// coefficients), and `e·ln2` added in two parts; 0 gives −inf, +inf gives +inf, negatives
    /// and NaN give NaN. Relative error about 1e-7. f64 in a GPU kernel: [`Body::log_f64`].
    /// Else `math.log`.
    pub fn log(&mut self, x: &str, ty: &str) -> String {
        if self.gpu_f64(ty) {
            return self.log_f64(x, ty);
        }
        if !self.portable(ty) {
            return self.assign(format!("math.log {x} : {ty}"));
        }
        let (m, fe) = self.split_exponent(x, ty);
        let one = self.float(1.0, ty);
        let f = self.fsub(&m, &one, ty);
        let coeffs = [
            7.037_683_629_2e-2,
            -1.151_461_031_0e-1,
            1.167_699_874_0e-1,
            -1.242_014_084_6e-1,
            1.424_932_278_7e-1,
            -1.666_805_766_5e-1,
            2.000_071_476_5e-1,
            -2.499_999_399_3e-1,
            3.333_333_117_4e-1,
        ];
        let p = self.horner(&coeffs, &f, ty);
        let z = self.fmul(&f, &f, ty);
        let fz = self.fmul(&f, &z, ty);
        let y = self.fmul(&fz, &p, ty);
        let ln2_lo = self.float(-2.121_944_40e-4, ty);
        let y = self.fma_exact(&fe, &ln2_lo, &y, ty);
        let minus_half = self.float(-0.5, ty);
        let y = self.fma(&z, &minus_half, &y, ty);
        let r = self.fadd_exact(&f, &y, ty);
        let ln2_hi = self.float(0.693_359_375, ty);
        let r = self.fma_exact(&fe, &ln2_hi, &r, ty);
        self.log_special_cases(x, &r, ty)
    }

    /// `x = m·2ᵉ` with `m ∈ [√½, √2)`, for positive finite `x` of f32 or f64 (scalar or
    /// vector), subnormals scaled into the normal range first: `(m, e)`, with `e` a float of
    /// `x`'s type. Other `x` give values that [`Body::log_special_cases`] replaces.
    fn split_exponent(&mut self, x: &str, ty: &str) -> (String, String) {
        // Integer type, mantissa bits, the exponent bias less one (the mantissa is taken in
        // [½, 1) below), the smallest normal, how far subnormals are scaled up, the mantissa
        // mask, and the bits of ½.
        let (int, bits, bias, tiny, up, mask, half): (&str, i64, i64, f64, i32, i64, i64) =
            if elem_type(ty) == "f64" {
                ("i64", 52, 1022, f64::MIN_POSITIVE, 54, 0x000f_ffff_ffff_ffff, 0x3fe0_0000_0000_0000)
            } else {
                ("i32", 23, 126, f32::MIN_POSITIVE as f64, 23, 0x007f_ffff, 0x3f00_0000)
            };
        let ity = with_elem(ty, int);
        let tiny = self.float(tiny, ty);
        let small = self.fcmp("olt", x, &tiny, ty);
        let scale = self.float(2f64.powi(up), ty);
        let scaled = self.fmul_exact(x, &scale, ty);
        let xs = self.select(&small, &scaled, x, ty);
        let xbits = self.assign(format!("arith.bitcast {xs} : {ty} to {ity}"));
        let shift = self.int_like(bits, &ity);
        let biased = self.assign(format!("arith.shrui {xbits}, {shift} : {ity}"));
        let bias = self.int_like(bias, &ity);
        let e = self.assign(format!("arith.subi {biased}, {bias} : {ity}"));
        let mask = self.int_like(mask, &ity);
        let half = self.int_like(half, &ity);
        let mbits = self.assign(format!("arith.andi {xbits}, {mask} : {ity}"));
        let mbits = self.assign(format!("arith.ori {mbits}, {half} : {ity}"));
        // m ∈ [½, 1), x = m·2ᵉ.
        let m = self.assign(format!("arith.bitcast {mbits} : {ity} to {ty}"));
        let sqrt_half = self.float(std::f64::consts::FRAC_1_SQRT_2, ty);
        let low = self.fcmp("olt", &m, &sqrt_half, ty);
        let fe = self.assign(format!("arith.sitofp {e} : {ity} to {ty}"));
        let one = self.float(1.0, ty);
        let fe_low = self.fsub(&fe, &one, ty);
        let fe = self.select(&low, &fe_low, &fe, ty);
        let down = self.float(-f64::from(up), ty);
        let zero = self.float(0.0, ty);
        let shift = self.select(&small, &down, &zero, ty);
        let fe = self.fadd(&fe, &shift, ty);
        let m2 = self.fadd(&m, &m, ty);
        let m = self.select(&low, &m2, &m, ty);
        (m, fe)
    }

    /// `ln x` as computed (`r`) where `x` is positive and finite; −inf at 0, +inf at +inf, NaN
    /// for negatives and NaN.
    fn log_special_cases(&mut self, x: &str, r: &str, ty: &str) -> String {
        let zero = self.float(0.0, ty);
        let inf = self.float(f64::INFINITY, ty);
        let is_inf = self.fcmp("oeq", x, &inf, ty);
        let r = self.select(&is_inf, &inf, r, ty);
        let ninf = self.float(f64::NEG_INFINITY, ty);
        let is_zero = self.fcmp("oeq", x, &zero, ty);
        let r = self.select(&is_zero, &ninf, &r, ty);
        let nan = self.float(f64::NAN, ty);
        let bad = self.fcmp("ult", x, &zero, ty);
        self.select(&bad, &nan, &r, ty)
    }

    /// `sin x` (portable f32: [`Body::sin_cos`] in quadrant 0; f64 in a GPU kernel:
    /// [`Body::sin_cos_f64`]), else `math.sin`.
    pub fn sin(&mut self, x: &str, ty: &str) -> String {
        if self.gpu_f64(ty) {
            return self.sin_cos_f64(x, 0.0, ty);
        }
        if !self.portable(ty) {
            return self.assign(format!("math.sin {x} : {ty}"));
        }
        self.sin_cos(x, 0.0, ty)
    }

    /// `cos x` (portable f32: [`Body::sin_cos`] one quadrant on; f64 in a GPU kernel:
    /// [`Body::sin_cos_f64`]), else `math.cos`.
    pub fn cos(&mut self, x: &str, ty: &str) -> String {
        if self.gpu_f64(ty) {
            return self.sin_cos_f64(x, 1.0, ty);
        }
        if !self.portable(ty) {
            return self.assign(format!("math.cos {x} : {ty}"));
        }
        self.sin_cos(x, 1.0, ty)
    }

    /// `sin(x + shift·π/2)` on f32: `x = j·π/2 + r` with `j = round(x·2/π)` and π/2 in three
    /// parts (Cody–Waite: the first two of 8 and 9 significant bits, so `j` times either is
    /// exact for `|j| < 2¹⁵` even where an FMA is computed as a multiply and an add, as Vulkan
    /// allows; `r ∈ [−π/4, π/4]` is then accurate for `|x|` up to about 5·10⁴), then `sin r`
    /// or `cos r` by Cephes' `sinf`/`cosf` polynomials and the sign of the quadrant
    /// `(j + shift) mod 4`. Absolute error about 1e-7 in that range; ±inf and NaN give NaN.
    fn sin_cos(&mut self, x: &str, shift: f64, ty: &str) -> String {
        let two_over_pi = self.float(std::f64::consts::FRAC_2_PI, ty);
        let t = self.fmul(x, &two_over_pi, ty);
        let j = self.exact("roundeven", &t, ty);
        let mut r = x.to_string();
        for part in [-1.570_312_5, -4.835_128_784_179_687_5e-4, -3.139_164_732_601_784_6e-7] {
            let c = self.float(part, ty);
            r = self.fma_exact(&j, &c, &r, ty);
        }
        let r2 = self.fmul(&r, &r, ty);
        // sin r = r + r³·S(r²)
        let sp = self.horner(&[-1.951_529_589_1e-4, 8.332_160_873_6e-3, -1.666_665_461_1e-1], &r2, ty);
        let r3 = self.fmul(&r2, &r, ty);
        let sin_r = self.fma(&r3, &sp, &r, ty);
        // cos r = 1 − r²/2 + r⁴·C(r²)
        let cp = self.horner(
            &[2.443_315_711_809_948e-5, -1.388_731_625_493_765e-3, 4.166_664_568_298_827e-2],
            &r2,
            ty,
        );
        let r4 = self.fmul(&r2, &r2, ty);
        let one = self.float(1.0, ty);
        let minus_half = self.float(-0.5, ty);
        let c0 = self.fma(&r2, &minus_half, &one, ty);
        let cos_r = self.fma(&r4, &cp, &c0, ty);
        self.by_quadrant(&j, shift, &sin_r, &cos_r, ty)
    }

    /// `sin(j·π/2 + r + shift·π/2)` from `sin r` and `cos r`: the quadrant `q = (j + shift) mod
    /// 4`, worked out exactly in floats, picks one of them and its sign.
    fn by_quadrant(&mut self, j: &str, shift: f64, sin_r: &str, cos_r: &str, ty: &str) -> String {
        let one = self.float(1.0, ty);
        let sh = self.float(shift, ty);
        let q = self.fadd(j, &sh, ty);
        let quarter = self.float(0.25, ty);
        let qf = self.fmul(&q, &quarter, ty);
        let qf = self.exact("floor", &qf, ty);
        let neg_four = self.float(-4.0, ty);
        let q = self.fma(&qf, &neg_four, &q, ty);
        let half = self.float(0.5, ty);
        let qh = self.fmul(&q, &half, ty);
        let qh = self.exact("floor", &qh, ty);
        let neg_two = self.float(-2.0, ty);
        let odd = self.fma(&qh, &neg_two, &q, ty);
        let is_odd = self.fcmp("oeq", &odd, &one, ty);
        let v = self.select(&is_odd, cos_r, sin_r, ty);
        let two = self.float(2.0, ty);
        let upper = self.fcmp("oge", &q, &two, ty);
        let nv = self.fneg(&v, ty);
        self.select(&upper, &nv, &v, ty)
    }

    /// `xʸ`. Portable f32, and f64 in a GPU kernel: `|x|ʸ = e^{y·ln|x|}` (overflowing to inf,
    /// underflowing to 0), the sign of `x` kept for odd integer `y`, NaN for negative `x` and
    /// non-integer `y`; `x⁰ = 1` and `1ʸ = 1` even for NaN, as C's `pow`. Relative error about
    /// `|y·ln x|` times the type's epsilon (under 1e-5 on f32, 2e-13 on f64). Else `math.powf`.
    pub fn powf(&mut self, x: &str, y: &str, ty: &str) -> String {
        if !self.portable(ty) && !self.gpu_f64(ty) {
            return self.assign(format!("math.powf {x}, {y} : {ty}"));
        }
        let ax = self.fabs(x, ty);
        let l = self.log(&ax, ty);
        let t = self.fmul(y, &l, ty);
        let zero = self.float(0.0, ty);
        let one = self.float(1.0, ty);
        // [`Body::exp`] covers the whole range, overflow and subnormals included.
        let mag = self.exp(&t, ty);
        // y an integer, and odd (exact in floats: every f32 of magnitude ≥ 2²⁴, and every f64 ≥ 2⁵³, is even).
        let ry = self.exact("roundeven", y, ty);
        let integral = self.fcmp("oeq", &ry, y, ty);
        let half = self.float(0.5, ty);
        let hy = self.fmul(y, &half, ty);
        let fh = self.exact("floor", &hy, ty);
        let neg_two = self.float(-2.0, ty);
        let rem = self.fma(&fh, &neg_two, y, ty);
        let odd_rem = self.fcmp("oeq", &rem, &one, ty);
        let odd = self.assign(format!("arith.andi {integral}, {odd_rem} : {}", bool_type_like(ty)));
        let signed = self.copysign(&mag, x, ty);
        let r = self.select(&odd, &signed, &mag, ty);
        let nan = self.float(f64::NAN, ty);
        let negative = self.fcmp("olt", x, &zero, ty);
        let not_integral = self.fcmp("une", &ry, y, ty);
        let bad = self.assign(format!("arith.andi {negative}, {not_integral} : {}", bool_type_like(ty)));
        let r = self.select(&bad, &nan, &r, ty);
        let either_nan = self.fcmp("uno", x, y, ty);
        let r = self.select(&either_nan, &nan, &r, ty);
        let y_zero = self.fcmp("oeq", y, &zero, ty);
        let x_one = self.fcmp("oeq", x, &one, ty);
        let trivial = self.assign(format!("arith.ori {y_zero}, {x_one} : {}", bool_type_like(ty)));
        self.select(&trivial, &one, &r, ty)
    }

    /// `1 / (1 + e^{−x})`.
    pub fn sigmoid(&mut self, x: &str, ty: &str) -> String {
        let (one, d) = self.one_plus_exp_neg(x, ty);
        self.fdiv(&one, &d, ty)
    }

    /// SiLU, `x / (1 + e^{−x})`: `x·sigmoid(x)` with one division (−0 far below zero, `x`
    /// far above it).
    pub fn silu(&mut self, x: &str, ty: &str) -> String {
        let (_, d) = self.one_plus_exp_neg(x, ty);
        self.fdiv(x, &d, ty)
    }

    /// The logistic denominator `1 + e^{−x}` that sigmoid and SiLU share: `(1, 1 + e^{−x})`.
    fn one_plus_exp_neg(&mut self, x: &str, ty: &str) -> (String, String) {
        let nx = self.fneg(x, ty);
        let e = self.exp(&nx, ty);
        let one = self.float(1.0, ty);
        let d = self.fadd(&one, &e, ty);
        (one, d)
    }

    /// GELU in either form (see `kiln_ir::GeluApprox`).
    pub fn gelu(&mut self, x: &str, tanh_form: bool, ty: &str) -> String {
        let half = self.float(0.5, ty);
        let inner = if tanh_form {
            let c = self.float(0.044_715, ty);
            let k = self.float((2.0 / std::f64::consts::PI).sqrt(), ty);
            let x2 = self.fmul(x, x, ty);
            let x3 = self.fmul(&x2, x, ty);
            let u = self.fma(&c, &x3, x, ty);
            let u = self.fmul(&k, &u, ty);
            self.tanh(&u, ty)
        } else if elem_type(ty) == "f32" {
            // x·erf(·) below carries a NaN x through, so the clamp inside may drop it.
            self.erf_of_scaled(x, std::f64::consts::FRAC_1_SQRT_2, ty)
        } else {
            let r = self.float(std::f64::consts::FRAC_1_SQRT_2, ty);
            let u = self.fmul(x, &r, ty);
            self.erf(&u, ty)
        };
        // x/2 · (1 + inner) as one FMA.
        let hx = self.fmul(&half, x, ty);
        self.fma(&hx, &inner, &hx, ty)
    }

    /// `max(x, 0)` (NaN stays NaN).
    pub fn relu(&mut self, x: &str, ty: &str) -> String {
        let zero = self.float(0.0, ty);
        self.fmax(x, &zero, ty)
    }
}

/// The element type of a scalar or vector type string: `vector<8xf32>` → `f32`.
pub fn elem_type(ty: &str) -> &str {
    match ty.strip_prefix("vector<").and_then(|s| s.strip_suffix('>')) {
        Some(inner) => inner.rsplit('x').next().unwrap_or(inner),
        None => ty,
    }
}

/// Whether `ty` is a vector type string.
pub fn is_vector(ty: &str) -> bool {
    ty.starts_with("vector<")
}

/// `ty` with its element type replaced: `vector<8xf32>`, `i32` → `vector<8xi32>`.
pub fn with_elem(ty: &str, elem: &str) -> String {
    match ty.strip_prefix("vector<").and_then(|s| s.strip_suffix('>')) {
        Some(inner) => {
            let dims = inner.rsplit_once('x').map(|(d, _)| d).unwrap_or("");
            format!("vector<{dims}x{elem}>")
        }
        None => elem.to_string(),
    }
}

/// The `i1` type of the same shape as `ty` (what comparisons return).
pub fn bool_type_like(ty: &str) -> String {
    with_elem(ty, "i1")
}

/// A float as MLIR hex literal bits of element type `elem` (exact, and fine for inf/NaN).
pub fn float_bits(v: f64, elem: &str) -> String {
    match elem {
        "f64" => format!("0x{:016X}", v.to_bits()),
        "f16" => format!("0x{:04X}", half::f16::from_f64(v).to_bits()),
        "bf16" => format!("0x{:04X}", half::bf16::from_f64(v).to_bits()),
        _ => format!("0x{:08X}", (v as f32).to_bits()),
    }
}

/// `memref<2x3xf32>` for a shape and element type (`memref<f32>` for a scalar).
pub fn memref_type(shape: &[usize], elem: &str) -> String {
    let mut s = String::from("memref<");
    for d in shape {
        let _ = write!(s, "{d}x");
    }
    s.push_str(elem);
    s.push('>');
    s
}
