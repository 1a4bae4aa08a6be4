//! Generated matrix products (`kernels::matmul`) against an f64 reference computed here.
//!
//! Every case runs its kernel's range in three chunks (as threads would), checks each output
//! element of the view, and checks that the buffer around a strided output is left untouched.

use kiln_codegen::{kernels::matmul, kernels::View, CpuTarget, Kernel, KernelLibrary};
use kiln_ir::{Activation, DType, GeluApprox};
use proptest::prelude::*;

/// How one operand's matrix sits in its buffer.
#[derive(Clone, Copy, Debug, Default)]
struct Layout {
    /// Stored as the transposed matrix (`[cols, rows]` row-major), like a Linear weight.
    transposed: bool,
    /// Extra elements after each stored row (a row of a larger buffer).
    pad: usize,
    /// Elements before the view in its buffer.
    offset: usize,
    /// Every batch shares one matrix (stride 0 batch axes).
    broadcast: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Bias {
    None,
    /// One value per column (stride 0 along batch and M), the Linear bias.
    Column,
    /// A full `[B…, M, N]` tensor.
    Full,
}

#[derive(Clone, Debug)]
struct Case {
    batch: Vec<usize>,
    m: usize,
    k: usize,
    n: usize,
    dtype: DType,
    a: Layout,
    b: Layout,
    out: Layout,
    bias: Bias,
    act: Activation,
    /// B is a constant stored ahead of time in the micro-kernel's panel layout.
    prepacked: bool,
    /// M is the largest row count; the kernel is told this many at run time
    /// (`matmul::emit_run_rows`), and only these rows are computed.
    run_rows: Option<usize>,
}

impl Case {
    fn new(m: usize, k: usize, n: usize) -> Case {
        Case {
            batch: vec![],
            m,
            k,
            n,
            dtype: DType::F32,
            a: Layout::default(),
            b: Layout::default(),
            out: Layout::default(),
            bias: Bias::None,
            act: Activation::None,
            prepacked: false,
            run_rows: None,
        }
    }
    /// The kernel is compiled for `self.m` rows and run with `rows` of them.
    fn run_rows(mut self, rows: usize) -> Case {
        self.run_rows = Some(rows);
        self
    }
    /// B packed at compile time (a weight shared by every batch index).
    fn prepacked(mut self) -> Case {
        self.prepacked = true;
        self.b.broadcast = true;
        self
    }
    fn batch(mut self, batch: &[usize]) -> Case {
        self.batch = batch.to_vec();
        self
    }
    fn dtype(mut self, d: DType) -> Case {
        self.dtype = d;
        self
    }
    fn bt(mut self) -> Case {
        self.b.transposed = true;
        self
    }
    fn bias(mut self, bias: Bias) -> Case {
        self.bias = bias;
        self
    }
    fn act(mut self, act: Activation) -> Case {
        self.act = act;
        self
    }
}

/// A view of `rows × cols` matrices per batch, laid out as `l` says.
fn view(batch: &[usize], rows: usize, cols: usize, dtype: DType, l: Layout) -> View {
    let (srows, scols) = if l.transposed { (cols, rows) } else { (rows, cols) };
    let ld = scols + l.pad;
    let mat = srows * ld;
    let nb: usize = if l.broadcast { 1 } else { batch.iter().product() };
    let mut strides = vec![0; batch.len()];
    if !l.broadcast {
        let mut s = mat;
        for (k, &d) in batch.iter().enumerate().rev() {
            strides[k] = s;
            s *= d;
        }
    }
    strides.extend(if l.transposed { [1, ld] } else { [ld, 1] });
    let mut shape = batch.to_vec();
    shape.extend([rows, cols]);
    View { shape, strides, offset: l.offset, dtype, buffer_len: (l.offset + nb * mat + 3).max(1) }
}

/// A bias view of the output's shape.
fn bias_view(c: &Case) -> Option<View> {
    let mut shape = c.batch.clone();
    shape.extend([c.m, c.n]);
    match c.bias {
        Bias::None => None,
        Bias::Column => {
            let mut strides = vec![0; shape.len()];
            *strides.last_mut().unwrap() = 1;
            Some(View { shape, strides, offset: 1, dtype: c.dtype, buffer_len: c.n + 2 })
        }
        Bias::Full => Some(View::contiguous(&shape, c.dtype)),
    }
}

/// Element values of a buffer, kept as f64 (every test value is exact in every dtype).
struct Buf {
    dtype: DType,
    words: Vec<u64>,
}

impl Buf {
    fn new(dtype: DType, len: usize) -> Buf {
        let bytes = len * dtype.size_bytes();
        Buf { dtype, words: vec![0; bytes.div_ceil(8) + 1] }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.words.as_mut_ptr().cast()
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: u64 → u8 reinterpretation of an owned, initialized buffer.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.words.len() * 8) }
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.words.len() * 8) }
    }
    fn set(&mut self, i: usize, v: f64) {
        let d = self.dtype;
        let s = d.size_bytes();
        let raw = &mut self.bytes_mut()[i * s..(i + 1) * s];
        match d {
            DType::F32 => raw.copy_from_slice(&(v as f32).to_ne_bytes()),
            DType::F64 => raw.copy_from_slice(&v.to_ne_bytes()),
            DType::I32 => raw.copy_from_slice(&(v as i32).to_ne_bytes()),
            DType::I64 => raw.copy_from_slice(&(v as i64).to_ne_bytes()),
            DType::F16 => raw.copy_from_slice(&half::f16::from_f64(v).to_ne_bytes()),
            DType::BF16 => raw.copy_from_slice(&half::bf16::from_f64(v).to_ne_bytes()),
            DType::Bool => raw[0] = (v != 0.0) as u8,
        }
    }
    fn get(&self, i: usize) -> f64 {
        let s = self.dtype.size_bytes();
        let raw = &self.bytes()[i * s..(i + 1) * s];
        match self.dtype {
            DType::F32 => f32::from_ne_bytes(raw.try_into().unwrap()) as f64,
            DType::F64 => f64::from_ne_bytes(raw.try_into().unwrap()),
            DType::I32 => i32::from_ne_bytes(raw.try_into().unwrap()) as f64,
            DType::I64 => i64::from_ne_bytes(raw.try_into().unwrap()) as f64,
            DType::F16 => half::f16::from_ne_bytes(raw.try_into().unwrap()).to_f64(),
            DType::BF16 => half::bf16::from_ne_bytes(raw.try_into().unwrap()).to_f64(),
            DType::Bool => raw[0] as f64,
        }
    }
}

/// A deterministic fill: small integers for integer dtypes, multiples of 1/64 in [-1, 1]
/// otherwise (exact in every float type, so the reference sees the kernel's inputs).
fn fill(buf: &mut Buf, len: usize, seed: u64) {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    for i in 0..len {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let r = (s >> 33) as i64;
        let v = if buf.dtype.is_float() { (r % 129 - 64) as f64 / 64.0 } else { (r % 7 - 3) as f64 };
        buf.set(i, v);
    }
}

/// Buffer index of element `idx` of `v`.
fn at(v: &View, idx: &[usize]) -> usize {
    v.offset + idx.iter().zip(&v.strides).map(|(i, s)| i * s).sum::<usize>()
}

fn activation(act: Activation, x: f64) -> f64 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::Gelu(GeluApprox::Erf) => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        Activation::Gelu(GeluApprox::Tanh) => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Activation::Tanh => x.tanh(),
        Activation::Silu => x / (1.0 + (-x).exp()),
    }
}

/// All row-major indices of `shape`.
fn indices(shape: &[usize]) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    for &d in shape {
        all = all.into_iter().flat_map(|p| (0..d).map(move |i| [p.clone(), vec![i]].concat())).collect();
    }
    all
}

struct Prepared {
    case: Case,
    kernel: Kernel,
    /// The operands as the reference reads them (B as written, even when the kernel reads
    /// it packed).
    views: Vec<View>,
    panels: Option<matmul::Panels>,
}

fn prepare(symbol: &str, case: &Case, target: &CpuTarget) -> Prepared {
    let d = case.dtype;
    let a = view(&case.batch, case.m, case.k, d, case.a);
    let b = view(&case.batch, case.k, case.n, d, case.b);
    let out = view(&case.batch, case.m, case.n, d, case.out);
    let bias = bias_view(case);
    let panels = case.prepacked.then(|| matmul::Panels::for_target(case.k, case.n, target));
    let made = match (panels, case.run_rows) {
        (_, Some(rows)) => {
            // The run's row count from the first of the run's sizes, as the compiler's kernels read it.
            let value = |b: &mut kiln_codegen::mlir_text::Body| {
                let c0 = b.index(0);
                let raw = b.assign(format!("memref.load %syms[{c0}] : memref<1xi64>"));
                b.assign(format!("arith.index_cast {raw} : i64 to index"))
            };
            let run =
                matmul::RunRows { value: &value, param: "%syms: memref<1xi64>".into(), plan: case.m / 2 };
            matmul::emit_run_rows(symbol, &a, &b, panels, bias.as_ref(), case.act, &out, target, &run).map(
                |(mut k, tiling)| {
                    // The range at the run's rows.
                    k.range = tiling.column_blocks * rows.div_ceil(tiling.row_tile);
                    k
                },
            )
        }
        (Some(pn), None) => matmul::emit_prepacked(symbol, &a, pn, bias.as_ref(), case.act, &out, target),
        (None, None) => matmul::emit(symbol, &a, &b, bias.as_ref(), case.act, &out, target),
    };
    let kernel = made.unwrap_or_else(|e| panic!("{case:?}: {e}"));
    let views = [Some(a), Some(b), bias, Some(out)].into_iter().flatten().collect();
    Prepared { case: case.clone(), kernel, views, panels }
}

/// Runs a prepared case in `lib` and checks it.
fn check(lib: &KernelLibrary, p: &Prepared) {
    let case = &p.case;
    let d = case.dtype;
    let mut bufs: Vec<Buf> = p.views.iter().map(|v| Buf::new(d, v.buffer_len)).collect();
    let n_in = bufs.len() - 1;
    for (i, (buf, v)) in bufs.iter_mut().zip(&p.views).enumerate() {
        if i < n_in {
            fill(buf, v.buffer_len, i as u64 + 7);
        } else {
            for j in 0..v.buffer_len {
                buf.set(j, 77.0);
            }
        }
    }
    let mut ptrs: Vec<*mut u8> = bufs.iter_mut().map(|b| b.ptr()).collect();
    // A prepacked kernel reads B from its panel copy, made here as the compiler makes it.
    let mut packed = p.panels.map(|pn| {
        let bv = &p.views[1];
        let r = bv.rank();
        let src: Vec<f32> = (0..bv.buffer_len).map(|i| bufs[1].get(i) as f32).collect();
        let values =
            pn.pack(&src, bv.offset, bv.strides[r - 2], bv.strides[r - 1]).expect("B fits its buffer");
        let mut buf = Buf::new(DType::F32, values.len());
        for (i, &x) in values.iter().enumerate() {
            buf.set(i, x as f64);
        }
        buf
    });
    if let Some(buf) = &mut packed {
        ptrs[1] = buf.ptr();
    }
    let syms: Vec<i64> = case.run_rows.iter().map(|&rows| rows as i64).collect();
    let r = p.kernel.range;
    // Over run-time rows, the whole range in one call too (every column block joined).
    let whole = case.run_rows.map(|_| (0, r));
    for (lo, hi) in whole.into_iter().chain([(0, r / 3), (r / 3, 2 * r / 3), (2 * r / 3, r)]) {
        unsafe { lib.call_with_symbols(&p.kernel.symbol, &ptrs, &syms, lo, hi).unwrap() };
    }
    let (av, bv, ov) = (&p.views[0], &p.views[1], &p.views[n_in]);
    let cv = (case.bias != Bias::None).then(|| &p.views[2]);
    let lead = case.batch.len();
    let mut written = vec![false; ov.buffer_len];
    let tol = match d {
        DType::F16 => 2e-2,
        DType::BF16 => 8e-2,
        DType::F32 => 1e-4,
        _ => 1e-9,
    };
    let mut shape = case.batch.clone();
    shape.extend([case.run_rows.unwrap_or(case.m), case.n]);
    for idx in indices(&shape) {
        let mut first = idx.clone();
        first[lead + 1] = 0;
        let a0 = at(av, &first);
        first[lead + 1] = idx[lead + 1];
        first[lead] = 0;
        let b0 = at(bv, &first);
        let (sa, sb) = (av.strides[lead + 1], bv.strides[lead]);
        let mut s: f64 = (0..case.k).map(|kk| bufs[0].get(a0 + kk * sa) * bufs[1].get(b0 + kk * sb)).sum();
        if let Some(cv) = cv {
            s += bufs[2].get(at(cv, &idx));
        }
        let want = activation(case.act, s);
        let o = at(ov, &idx);
        written[o] = true;
        let got = bufs[n_in].get(o);
        assert!(
            (got - want).abs() <= tol * (1.0 + want.abs()),
            "{case:?}\nat {idx:?}: got {got}, want {want}"
        );
    }
    for (o, w) in written.iter().enumerate() {
        if !w {
            assert_eq!(bufs[n_in].get(o), 77.0, "{case:?}: element {o} outside the output view was written");
        }
    }
}

/// Compiles all cases for the host into one library and checks each.
fn run(cases: &[Case]) {
    run_on(&CpuTarget::host(), cases);
}

fn run_on(target: &CpuTarget, cases: &[Case]) {
    let prepared: Vec<Prepared> =
        cases.iter().enumerate().map(|(i, c)| prepare(&format!("mm{i}"), c, target)).collect();
    let kernels: Vec<Kernel> = prepared.iter().map(|p| p.kernel.clone()).collect();
    let lib = KernelLibrary::build(&kernels, target).unwrap();
    for p in &prepared {
        check(&lib, p);
    }
}

#[test]
fn f32_shapes() {
    let shapes = [
        (1, 1, 1),
        (7, 13, 5),
        (1, 64, 37),
        (1, 300, 1),
        (6, 16, 16),
        (12, 32, 32),
        (13, 17, 19),
        (5, 3, 40),
        (31, 257, 33),
        (50, 520, 70),
        (97, 9, 300),
        (64, 600, 48),
    ];
    let mut cases: Vec<Case> = shapes.iter().map(|&(m, k, n)| Case::new(m, k, n)).collect();
    // Empty products: K = 0 leaves activation(bias); M = 0 has nothing to do.
    cases.push(Case::new(3, 0, 5).bias(Bias::Column).act(Activation::Sigmoid));
    cases.push(Case::new(0, 4, 5));
    run(&cases);
}

#[test]
fn f32_transposed_weight_bias_activations() {
    let mut cases = vec![];
    for (i, act) in Activation::ALL.into_iter().enumerate() {
        let bias = [Bias::Column, Bias::None, Bias::Full][i % 3];
        cases.push(Case::new(20, 24, 35).bt().bias(bias).act(act));
        cases.push(Case::new(9, 70, 17).bias(Bias::Column).act(act));
    }
    cases.push(Case::new(1, 384, 384).bt().bias(Bias::Column).act(Activation::Gelu(GeluApprox::Erf)));
    cases.push(Case::new(33, 300, 100).bt().bias(Bias::Full).act(Activation::Gelu(GeluApprox::Tanh)));
    run(&cases);
}

/// Large enough to take the paths for many rows: a packed into contiguous blocks (rows ≥ 256,
/// row stride ≥ 1024) and wide column blocks (≥ 512 rows in all).
#[test]
fn f32_large_paths() {
    run(&[
        Case::new(300, 1030, 70).bias(Bias::Column).act(Activation::Relu),
        Case::new(130, 40, 1050).batch(&[4]).bt().bias(Bias::Column),
        Case::new(257, 1024, 33).bt().act(Activation::Gelu(GeluApprox::Tanh)),
    ]);
}

/// Products over a run-time row count: views for the largest M, the run's M read on entry;
/// whole row tiles, the rows left over in a tile of their own count (at least 4), one to
/// several column blocks, a prepacked and a per-call packed B, K blocks, and rows past the run
/// untouched.
#[test]
fn f32_run_time_rows() {
    let mut cases = vec![];
    for rows in [1, 9, 12, 23, 37, 60] {
        cases.push(Case::new(60, 40, 70).prepacked().bias(Bias::Column).act(Activation::Relu).run_rows(rows));
        cases.push(Case::new(60, 300, 900).prepacked().bt().bias(Bias::Column).run_rows(rows));
        cases.push(Case::new(60, 20, 33).bias(Bias::Full).act(Activation::Tanh).run_rows(rows));
    }
    cases.push(Case::new(600, 64, 48).prepacked().run_rows(517));
    run(&cases);
}

/// Baseline x86-64 (SSE2, 4 lanes): other tile sizes and the generic in-register transpose.
#[test]
#[cfg(target_arch = "x86_64")]
fn f32_four_lanes() {
    run_on(
        &CpuTarget::x86_64(),
        &[
            Case::new(13, 37, 29).bt().bias(Bias::Column).act(Activation::Gelu(GeluApprox::Erf)),
            Case::new(7, 300, 9).bias(Bias::Full),
            Case::new(1, 64, 20).bt(),
        ],
    );
}

#[test]
fn f32_batches_and_strided_views() {
    let mut cases = vec![
        Case::new(5, 7, 9).batch(&[3]),
        Case::new(8, 20, 24).batch(&[2, 3]).bt().bias(Bias::Column).act(Activation::Relu),
        Case::new(3, 5, 30).batch(&[4]).bias(Bias::Full),
    ];
    let mut c = Case::new(11, 19, 23).batch(&[3]);
    c.b.broadcast = true;
    c.b.transposed = true;
    cases.push(c);
    let mut c = Case::new(11, 19, 23).batch(&[2, 2]);
    c.a.broadcast = true;
    cases.push(c.bias(Bias::Column));
    let mut c = Case::new(17, 40, 21).batch(&[2]).act(Activation::Tanh).bias(Bias::Column);
    c.a = Layout { pad: 5, offset: 3, ..Layout::default() };
    c.out = Layout { pad: 4, offset: 2, ..Layout::default() };
    c.b = Layout { transposed: true, pad: 2, offset: 1, ..Layout::default() };
    cases.push(c);
    // a transposed (x^T·W) and an output written column-major.
    let mut c = Case::new(14, 10, 18).bias(Bias::Full).act(Activation::Sigmoid);
    c.a.transposed = true;
    c.out.transposed = true;
    cases.push(c);
    run(&cases);
}

/// a transposed (`xᵀ·dy`, a weight gradient): a is copied in whole `lanes × lanes` squares by
/// in-register transposes, the rows and K columns past the last square one by one; over several
/// K blocks (the last one shorter) and row blocks, with the 4-lane transpose on x86-64.
#[test]
fn f32_transposed_a() {
    let a_transposed = |m, k, n| {
        let mut c = Case::new(m, k, n);
        c.a.transposed = true;
        c
    };
    let mut cases = vec![
        a_transposed(70, 600, 50),
        a_transposed(200, 1030, 33),
        a_transposed(16, 16, 16),
        a_transposed(15, 40, 9),
        a_transposed(33, 17, 100).bias(Bias::Column).act(Activation::Relu),
        a_transposed(40, 70, 30).batch(&[2]),
    ];
    let mut c = a_transposed(37, 90, 21);
    c.a = Layout { transposed: true, pad: 3, offset: 2, ..Layout::default() };
    cases.push(c);
    run(&cases);
    #[cfg(target_arch = "x86_64")]
    run_on(&CpuTarget::x86_64(), &cases);
}

#[test]
fn other_dtypes() {
    let mut cases = vec![];
    for d in [DType::F64, DType::I32, DType::I64, DType::F16, DType::BF16] {
        let act = if d.is_float() { Activation::Gelu(GeluApprox::Erf) } else { Activation::Relu };
        cases.push(Case::new(7, 13, 5).dtype(d));
        cases.push(Case::new(9, 33, 12).batch(&[2]).bt().bias(Bias::Column).act(act).dtype(d));
        let mut c = Case::new(4, 6, 8).batch(&[3]).bias(Bias::Full).dtype(d);
        c.a.broadcast = true;
        c.out = Layout { pad: 3, offset: 5, ..Layout::default() };
        cases.push(c);
    }
    run(&cases);
}

#[test]
fn rejects_what_it_cannot_do() {
    let t = CpuTarget::host();
    let v = |shape: &[usize], d| View::contiguous(shape, d);
    let bool_case = matmul::emit(
        "x",
        &v(&[2, 2], DType::Bool),
        &v(&[2, 2], DType::Bool),
        None,
        Activation::None,
        &v(&[2, 2], DType::Bool),
        &t,
    );
    assert!(bool_case.is_err());
    let mixed = matmul::emit(
        "x",
        &v(&[2, 2], DType::F32),
        &v(&[2, 2], DType::F64),
        None,
        Activation::None,
        &v(&[2, 2], DType::F32),
        &t,
    );
    assert!(mixed.is_err());
    let int_gelu = matmul::emit(
        "x",
        &v(&[2, 2], DType::I32),
        &v(&[2, 2], DType::I32),
        None,
        Activation::Gelu(GeluApprox::Erf),
        &v(&[2, 2], DType::I32),
        &t,
    );
    assert!(int_gelu.is_err());
    let mut short = v(&[4, 4], DType::F32);
    short.buffer_len = 10;
    let oob = matmul::emit(
        "x",
        &short,
        &v(&[4, 4], DType::F32),
        None,
        Activation::None,
        &v(&[4, 4], DType::F32),
        &t,
    );
    assert!(oob.is_err());
    // A size-1 contracted axis is a shape error, not a broadcast.
    let k1 = matmul::emit(
        "x",
        &v(&[2, 3], DType::F32),
        &v(&[1, 4], DType::F32),
        None,
        Activation::None,
        &v(&[2, 4], DType::F32),
        &t,
    );
    assert!(k1.is_err());
}

/// Operands of lower rank than the output broadcast over its batch axes.
#[test]
fn lower_rank_operands_broadcast() {
    let t = CpuTarget::host();
    let a = View::contiguous(&[2, 3, 5], DType::F32);
    let w = View::contiguous(&[5, 4], DType::F32);
    let bias = View::contiguous(&[4], DType::F32);
    let out = View::contiguous(&[2, 3, 4], DType::F32);
    let k = matmul::emit("lr", &a, &w, Some(&bias), Activation::None, &out, &t).unwrap();
    let lib = KernelLibrary::build(std::slice::from_ref(&k), &t).unwrap();
    let mut av: Vec<f32> = (0..30).map(|i| i as f32 * 0.5 - 3.0).collect();
    let mut wv: Vec<f32> = (0..20).map(|i| (i % 7) as f32 - 2.0).collect();
    let mut cv: Vec<f32> = vec![0.25, -1.0, 2.0, 0.5];
    let mut ov = vec![0f32; 24];
    let ptrs = [
        av.as_mut_ptr().cast(),
        wv.as_mut_ptr().cast(),
        cv.as_mut_ptr().cast(),
        ov.as_mut_ptr().cast::<u8>(),
    ];
    unsafe { lib.call("lr", &ptrs, 0, k.range).unwrap() };
    for (r, row) in ov.chunks(4).enumerate() {
        for (j, &got) in row.iter().enumerate() {
            let want: f32 = (0..5).map(|kk| av[r * 5 + kk] * wv[kk * 4 + j]).sum::<f32>() + cv[j];
            assert!((got - want).abs() <= 1e-4 * (1.0 + want.abs()), "row {r} col {j}: {got} vs {want}");
        }
    }
}

/// B packed at compile time: edge panels (N not a multiple of the panel width), several K
/// blocks, transposed weights, batch broadcast, bias and activations.
#[test]
fn f32_prepacked_weights() {
    run(&[
        Case::new(128, 384, 384).bt().bias(Bias::Column).prepacked(),
        Case::new(37, 1536, 70).bt().bias(Bias::Column).act(Activation::Gelu(GeluApprox::Erf)).prepacked(),
        Case::new(13, 17, 19).prepacked(),
        Case::new(1, 5, 3).bt().prepacked(),
        Case::new(9, 600, 33).batch(&[3]).bias(Bias::Full).act(Activation::Relu).prepacked(),
        Case::new(20, 260, 1030).batch(&[2]).bt().prepacked(),
        Case::new(600, 64, 48).bt().bias(Bias::Column).prepacked(),
    ]);
}

/// A batch whose rows follow one another, times one shared weight, runs as one tall product:
/// its row tiles cross batch elements, so a `[8, 128, K]` input has ⌈1024 / mr⌉ row tiles, not
/// 8 · ⌈128 / mr⌉ (each with a short edge tile). With a B per batch element it stays batched.
#[test]
fn contiguous_batches_over_a_shared_weight_are_one_product() {
    let target = CpuTarget::host();
    let shared = Case::new(128, 64, 48).batch(&[2, 4]).bt().bias(Bias::Column).prepacked();
    let tall = prepare("mm_tall", &Case::new(1024, 64, 48).bt().bias(Bias::Column).prepacked(), &target);
    let batched = prepare("mm_batched", &shared, &target);
    assert_eq!(batched.kernel.range, tall.kernel.range, "the batch did not fold into rows");
    let per_batch = prepare("mm_per_batch", &Case::new(128, 64, 48).batch(&[2, 4]), &target);
    assert_eq!(per_batch.kernel.range, 8 * prepare("mm_one", &Case::new(128, 64, 48), &target).kernel.range);
    run(&[shared, Case::new(128, 64, 48).batch(&[2, 4]).bias(Bias::Full)]);
}

/// Prepacked on baseline x86-64: panels 8 wide.
#[test]
#[cfg(target_arch = "x86_64")]
fn f32_prepacked_four_lanes() {
    run_on(&CpuTarget::x86_64(), &[Case::new(13, 37, 29).bt().bias(Bias::Column).prepacked()]);
}

fn act_strategy() -> impl Strategy<Value = Activation> {
    (0..Activation::ALL.len()).prop_map(|i| Activation::ALL[i])
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn random_small_f32(
        m in 1usize..30, k in 1usize..40, n in 1usize..45,
        nbatch in 0usize..3, bt in any::<bool>(), bias in 0usize..3, act in act_strategy(),
        pad in 0usize..3, prepacked in any::<bool>(),
    ) {
        let mut c = Case::new(m, k, n).bias([Bias::None, Bias::Column, Bias::Full][bias]).act(act);
        c.batch = vec![2; nbatch];
        c.b.transposed = bt;
        c.a.pad = pad;
        c.out.pad = pad;
        c.out.offset = pad;
        if prepacked {
            c = c.prepacked();
        }
        run(&[c]);
    }
}
