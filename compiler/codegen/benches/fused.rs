//! Fused-kernel throughput: flash attention against an unfused attention from the same
//! toolchain, and the row norms against a copy kernel.
//!
//! `cargo bench -p kiln-codegen --bench fused [-- FILTER]` compiles the kernels for the host,
//! runs each on 1 and 2 threads (the range split into contiguous chunks, all but the first run
//! by helper threads that spin between calls, as the runtime's pool does between steps:
//! `common::Pool`) and prints the median after warm-up:
//! - attention, 12 heads × 64, batch 1, seq 512 and 2048, q/k/v head-split views of
//!   `[1, S, 768]` buffers: GFLOP/s counted as `4·S²·D·heads`, for the fused kernel and for
//!   scores (generated loop kernel, `S×S` materialized) + softmax kernel + `p·v` loop kernel;
//! - attention at MiniLM's shape (`minilm`), 12 heads × 32, seq 128, head-split views and an
//!   additive padding mask `[B, 1, 1, S]` broadcast over heads and query rows, batch 1 and 8:
//!   µs per call;
//! - LayerNorm and AddNorm over 4096×4096 f32: GB/s (bytes read + written), next to a
//!   generated copy kernel's GB/s on the same buffers.
//!
//! `KILN_BENCH_FUSED_ONLY=1` skips the unfused attention (quicker A/B runs);
//! `KILN_BENCH_OBJECT=DIR` writes each attention library's object file into `DIR`, for
//! reading the generated code with `objdump -d`.

mod common;

use common::Pool;
use kiln_codegen::kernels::{attention, norm, View};
use kiln_codegen::loader::EntryFn;
use kiln_codegen::{mlir_text::Body, CpuTarget, Kernel, KernelLibrary, Target};
use kiln_ir::{DType, NormKind};
use std::time::{Duration, Instant};

/// A 64-byte aligned f32 buffer of values in [-1, 1).
struct Buf {
    raw: Vec<f32>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, seed: u32) -> Buf {
        let mut raw = vec![0f32; len + 16];
        let start = (64 - (raw.as_ptr() as usize % 64)) % 64 / 4;
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        for x in &mut raw[start..start + len] {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *x = (s % 2001) as f32 / 1000.0 - 1.0;
        }
        Buf { raw, start, len }
    }
    fn addr(&mut self) -> usize {
        self.raw[self.start..self.start + self.len].as_mut_ptr() as usize
    }
}

/// A kernel's entry point and range, looked up once, outside the timed calls.
#[derive(Clone, Copy)]
struct Bound {
    entry: EntryFn,
    range: usize,
}

fn bind(lib: &KernelLibrary, kernel: &Kernel) -> Bound {
    Bound { entry: lib.entry(&kernel.symbol).expect("entry"), range: kernel.range }
}

/// Runs `[0, range)` of `kernel` on `pool`'s threads, one contiguous chunk each.
fn run(pool: &Pool, kernel: Bound, bufs: &[usize]) {
    pool.run(kernel.entry, bufs, kernel.range);
}

/// Seconds of CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`).
fn thread_cpu_seconds() -> f64 {
    #[repr(C)]
    struct Timespec {
        sec: i64,
        nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill in.
    unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Median seconds of `f` over repeats after a warm-up, repeating for about `budget`. With
/// `KILN_BENCH_CLOCK=thread`, the calling thread's CPU time instead of wall time: steadier on a
/// loaded machine, but only meaningful for the 1-thread rows; with `KILN_BENCH_MIN=1`, the
/// fastest repeat instead of the median (for A/B runs beside other work).
fn time(mut f: impl FnMut(), budget: Duration) -> f64 {
    let thread_clock = std::env::var("KILN_BENCH_CLOCK").is_ok_and(|c| c == "thread");
    let epoch = Instant::now();
    let clock = || if thread_clock { thread_cpu_seconds() } else { epoch.elapsed().as_secs_f64() };
    f();
    let mut times = vec![];
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 400) {
        let t = clock();
        f();
        times.push(clock() - t);
    }
    times.sort_by(f64::total_cmp);
    if std::env::var_os("KILN_BENCH_MIN").is_some() {
        times[0]
    } else {
        times[times.len() / 2]
    }
}

const HEADS: usize = 12;
const D: usize = 64;

/// `[B, H, S, d]` head-split out of a `[B, S, H·d]` buffer.
fn head_split(batch: usize, s: usize, d: usize) -> View {
    View {
        shape: vec![batch, HEADS, s, d],
        strides: vec![s * HEADS * d, d, HEADS * d, 1],
        offset: 0,
        dtype: DType::F32,
        buffer_len: batch * s * HEADS * d,
    }
}

/// Writes the library's object file into `$KILN_BENCH_OBJECT/name.o` when that is set.
fn save_object(lib: &KernelLibrary, name: &str) {
    if let Some(dir) = std::env::var_os("KILN_BENCH_OBJECT") {
        let path = std::path::Path::new(&dir).join(format!("{name}.o"));
        std::fs::write(&path, &lib.compiled.object).expect("write the object file");
        println!("  object: {}", path.display());
    }
}

/// `scores[h, i, j] = scale · q[h, i]·k[h, j]` over head-split q, k (vectors along D, one
/// reduction per score): one `(h, i)` row per iteration.
fn scores_kernel(sym: &str, s: usize, lanes: usize, scale: f64) -> Kernel {
    let qm = format!("memref<{}xf32>", s * HEADS * D);
    let sm = format!("memref<{}xf32>", HEADS * s * s);
    let vty = format!("vector<{lanes}xf32>");
    let mut b = Body::new();
    let (c0, c1, sc, dc) = (b.index(0), b.index(1), b.index(s), b.index(D));
    let (hd, lc) = (b.index(HEADS * D), b.index(lanes));
    let scale = b.float(scale, "f32");
    let zero = b.float(0.0, &vty);
    b.open(format!("scf.for %it = %begin to %end step {c1}"));
    let h = b.assign(format!("arith.divui %it, {sc} : index"));
    let i = b.assign(format!("arith.remui %it, {sc} : index"));
    let ho = b.assign(format!("arith.muli {h}, {dc} : index"));
    let qi = b.assign(format!("arith.muli {i}, {hd} : index"));
    let qrow = b.assign(format!("arith.addi {qi}, {ho} : index"));
    let srow = b.assign(format!("arith.muli %it, {sc} : index"));
    b.open(format!("scf.for %j = {c0} to {sc} step {c1}"));
    let kj = b.assign(format!("arith.muli %j, {hd} : index"));
    let krow = b.assign(format!("arith.addi {kj}, {ho} : index"));
    b.open(format!("%acc = scf.for %d = {c0} to {dc} step {lc} iter_args(%a = {zero}) -> ({vty})"));
    let qa = b.assign(format!("arith.addi {qrow}, %d : index"));
    let ka = b.assign(format!("arith.addi {krow}, %d : index"));
    let x = b.assign(format!("vector.load %q[{qa}] : {qm}, {vty}"));
    let y = b.assign(format!("vector.load %k[{ka}] : {qm}, {vty}"));
    let a = b.fma(&x, &y, "%a", &vty);
    b.line(format!("scf.yield {a} : {vty}"));
    b.close("");
    let dot = b.assign(format!("vector.reduction <add>, %acc fastmath<reassoc> : {vty} into f32"));
    let sv = b.fmul(&dot, &scale, "f32");
    let at = b.assign(format!("arith.addi {srow}, %j : index"));
    b.line(format!("memref.store {sv}, %s[{at}] : {sm}"));
    b.close("");
    b.close("");
    let mlir = format!(
        "func.func @{sym}(%q: {qm}, %k: {qm}, %s: {sm}, %begin: index, %end: index) {{\n{}  return\n}}\n",
        b.finish()
    );
    let range = HEADS * s;
    let flops = (2 * HEADS * s * s * D) as u64;
    Kernel { symbol: sym.into(), mlir, range, grain: 1, flops, bytes: (4 * HEADS * s * s) as u64 }
}

/// `out[i, h, :] = Σ_j p[h, i, j] · v[h, j, :]` (vectors along D): one `(h, i)` row per
/// iteration.
fn pv_kernel(sym: &str, s: usize, lanes: usize) -> Kernel {
    let vm = format!("memref<{}xf32>", s * HEADS * D);
    let pm = format!("memref<{}xf32>", HEADS * s * s);
    let vty = format!("vector<{lanes}xf32>");
    let nv = D / lanes;
    let mut b = Body::new();
    let (c0, c1, sc, dc, hd) = (b.index(0), b.index(1), b.index(s), b.index(D), b.index(HEADS * D));
    let zero = b.float(0.0, &vty);
    b.open(format!("scf.for %it = %begin to %end step {c1}"));
    let h = b.assign(format!("arith.divui %it, {sc} : index"));
    let i = b.assign(format!("arith.remui %it, {sc} : index"));
    let ho = b.assign(format!("arith.muli {h}, {dc} : index"));
    let oi = b.assign(format!("arith.muli {i}, {hd} : index"));
    let orow = b.assign(format!("arith.addi {oi}, {ho} : index"));
    let prow = b.assign(format!("arith.muli %it, {sc} : index"));
    let inits: Vec<String> = (0..nv).map(|c| format!("%a{c} = {zero}")).collect();
    let tys = vec![vty.as_str(); nv].join(", ");
    b.open(format!(
        "%acc:{nv} = scf.for %j = {c0} to {sc} step {c1} iter_args({}) -> ({tys})",
        inits.join(", ")
    ));
    let pa = b.assign(format!("arith.addi {prow}, %j : index"));
    let p = b.assign(format!("memref.load %p[{pa}] : {pm}"));
    let p = b.splat(&p, &vty);
    let vj = b.assign(format!("arith.muli %j, {hd} : index"));
    let vrow = b.assign(format!("arith.addi {vj}, {ho} : index"));
    let mut outs = vec![];
    for c in 0..nv {
        let off = b.index(c * lanes);
        let at = b.assign(format!("arith.addi {vrow}, {off} : index"));
        let x = b.assign(format!("vector.load %v[{at}] : {vm}, {vty}"));
        outs.push(b.fma(&p, &x, &format!("%a{c}"), &vty));
    }
    b.line(format!("scf.yield {} : {tys}", outs.join(", ")));
    b.close("");
    for c in 0..nv {
        let off = b.index(c * lanes);
        let at = b.assign(format!("arith.addi {orow}, {off} : index"));
        b.line(format!("vector.store %acc#{c}, %out[{at}] : {vm}, {vty}"));
    }
    b.close("");
    let mlir = format!(
        "func.func @{sym}(%p: {pm}, %v: {vm}, %out: {vm}, %begin: index, %end: index) {{\n{}  return\n}}\n",
        b.finish()
    );
    let flops = (2 * HEADS * s * s * D) as u64;
    Kernel { symbol: sym.into(), mlir, range: HEADS * s, grain: 1, flops, bytes: (4 * HEADS * s * s) as u64 }
}

/// `out = x` over `rows × n` f32, one row per iteration (vectors, `n` a multiple of lanes).
fn copy_kernel(sym: &str, rows: usize, n: usize, lanes: usize) -> Kernel {
    let m = format!("memref<{}xf32>", rows * n);
    let vty = format!("vector<{lanes}xf32>");
    let mut b = Body::new();
    let (c0, c1, nc, lc) = (b.index(0), b.index(1), b.index(n), b.index(lanes));
    b.open(format!("scf.for %it = %begin to %end step {c1}"));
    let row = b.assign(format!("arith.muli %it, {nc} : index"));
    b.open(format!("scf.for %j = {c0} to {nc} step {lc}"));
    let at = b.assign(format!("arith.addi {row}, %j : index"));
    let x = b.assign(format!("vector.load %x[{at}] : {m}, {vty}"));
    b.line(format!("vector.store {x}, %out[{at}] : {m}, {vty}"));
    b.close("");
    b.close("");
    let mlir = format!(
        "func.func @{sym}(%x: {m}, %out: {m}, %begin: index, %end: index) {{\n{}  return\n}}\n",
        b.finish()
    );
    Kernel { symbol: sym.into(), mlir, range: rows, grain: 1, flops: 0, bytes: (8 * rows * n) as u64 }
}

fn attention_bench(target: &CpuTarget, s: usize, budget: Duration) {
    let lanes = target.f32_lanes();
    let scale = 1.0 / (D as f64).sqrt();
    let qv = head_split(1, s, D);
    let fused =
        attention::emit(&format!("attn{s}"), &qv, &qv, Some((&qv, &qv)), None, scale, false, None, target)
            .expect("emit");
    let causal =
        attention::emit(&format!("attc{s}"), &qv, &qv, Some((&qv, &qv)), None, scale, true, None, target)
            .expect("emit causal");
    let sv = View::contiguous(&[HEADS, s, s], DType::F32);
    let kernels = vec![
        fused.clone(),
        causal.clone(),
        scores_kernel(&format!("sc{s}"), s, lanes, scale),
        norm::emit_softmax(&format!("sm{s}"), &sv, 2, false, &sv, target).expect("softmax"),
        pv_kernel(&format!("pv{s}"), s, lanes),
    ];
    let t0 = Instant::now();
    let lib = KernelLibrary::build(&kernels, target).expect("build");
    let compile = t0.elapsed().as_secs_f64();
    save_object(&lib, &format!("attention{s}"));
    let fused_only = std::env::var_os("KILN_BENCH_FUSED_ONLY").is_some();
    let n = s * HEADS * D;
    let (mut q, mut k, mut v, mut out) = (Buf::new(n, 1), Buf::new(n, 2), Buf::new(n, 3), Buf::new(n, 4));
    let mut scores = Buf::new(HEADS * s * s, 5);
    let flops = (4 * s * s * D * HEADS) as f64;
    let fb = [q.addr(), k.addr(), v.addr(), out.addr()];
    let (sb, pb) = ([q.addr(), k.addr(), scores.addr()], [scores.addr(), v.addr(), out.addr()]);
    let smb = [scores.addr(), scores.addr()];
    println!("attention 12x64 seq {s} (compile {compile:.2} s)");
    let (fused, causal) = (bind(&lib, &fused), bind(&lib, &causal));
    let (scores_k, softmax_k, pv_k) =
        (bind(&lib, &kernels[2]), bind(&lib, &kernels[3]), bind(&lib, &kernels[4]));
    for threads in [1, 2] {
        let (tf, tc, tu) = Pool::with(threads, |pool| {
            let tf = time(|| run(pool, fused, &fb), budget);
            let tc = time(|| run(pool, causal, &fb), budget);
            let unfused = || {
                run(pool, scores_k, &sb);
                run(pool, softmax_k, &smb);
                run(pool, pv_k, &pb);
            };
            (tf, tc, if fused_only { f64::NAN } else { time(unfused, budget) })
        });
        println!(
            "  {threads} thr: fused {:7.1} GFLOP/s ({:8.2} ms) | causal {:7.2} ms | unfused {:7.1} GFLOP/s ({:8.2} ms) | fused/unfused {:.2}x",
            flops / tf / 1e9,
            tf * 1e3,
            tc * 1e3,
            flops / tu / 1e9,
            tu * 1e3,
            tu / tf
        );
    }
}

/// MiniLM's attention: 12 heads × 32, seq 128, head-split q/k/v/out of `[B, S, 384]` and an
/// additive padding mask `[B, 1, 1, S]` broadcast over heads and query rows (its last quarter
/// hidden by −3.4e38, as BERT does).
fn minilm_bench(target: &CpuTarget, budget: Duration) {
    let (s, d) = (128, 32);
    let scale = 1.0 / (d as f64).sqrt();
    for batch in [1, 8] {
        let qv = head_split(batch, s, d);
        let mask = View {
            shape: vec![batch, HEADS, s, s],
            strides: vec![s, 0, 0, 1],
            offset: 0,
            dtype: DType::F32,
            buffer_len: batch * s,
        };
        let kernel = attention::emit(
            &format!("mini{batch}"),
            &qv,
            &qv,
            Some((&qv, &qv)),
            Some(&mask),
            scale,
            false,
            None,
            target,
        )
        .expect("emit");
        let lib = KernelLibrary::build(std::slice::from_ref(&kernel), target).expect("build");
        save_object(&lib, &format!("minilm{batch}"));
        let n = batch * s * HEADS * d;
        let (mut q, mut k, mut v, mut out) = (Buf::new(n, 1), Buf::new(n, 2), Buf::new(n, 3), Buf::new(n, 4));
        let mut m = Buf::new(batch * s, 5);
        for (i, x) in m.raw[m.start..m.start + m.len].iter_mut().enumerate() {
            *x = if i % s >= s * 3 / 4 { -3.4e38 } else { 0.0 };
        }
        let bufs = [q.addr(), k.addr(), v.addr(), m.addr(), out.addr()];
        let flops = (4 * batch * s * s * d * HEADS) as f64;
        let mut line = format!("attention minilm 12x32 seq {s} masked, batch {batch}:");
        for threads in [1, 2] {
            let kernel = bind(&lib, &kernel);
            let t = Pool::with(threads, |pool| time(|| run(pool, kernel, &bufs), budget));
            line += &format!(" | {threads} thr {:7.1} µs ({:5.1} GFLOP/s)", t * 1e6, flops / t / 1e9);
        }
        println!("{line}");
    }
}

fn norm_bench(target: &CpuTarget, budget: Duration) {
    let (rows, n) = (4096, 4096);
    let x = View::contiguous(&[rows, n], DType::F32);
    let g = View::contiguous(&[n], DType::F32);
    let ln = norm::emit_norm("ln", NormKind::Layer, 1e-5, (&x, None), Some(&g), Some(&g), (&x, None), target)
        .expect("ln");
    let an =
        norm::emit_norm("an", NormKind::Layer, 1e-5, (&x, Some(&x)), Some(&g), Some(&g), (&x, None), target)
            .expect("an");
    let rn = norm::emit_norm("rn", NormKind::Rms, 1e-6, (&x, None), Some(&g), None, (&x, None), target)
        .expect("rn");
    let sm = norm::emit_softmax("smx", &x, 1, false, &x, target).expect("softmax");
    let cp = copy_kernel("copy", rows, n, target.f32_lanes());
    let kernels = vec![ln.clone(), an.clone(), rn.clone(), sm.clone(), cp.clone()];
    let lib = KernelLibrary::build(&kernels, target).expect("build");
    let (mut a, mut b, mut o) = (Buf::new(rows * n, 1), Buf::new(rows * n, 2), Buf::new(rows * n, 3));
    let (mut gamma, mut beta) = (Buf::new(n, 4), Buf::new(n, 5));
    let mb = (rows * n * 4) as f64;
    let cases: Vec<(&str, &Kernel, Vec<usize>, f64)> = vec![
        ("copy      ", &cp, vec![a.addr(), o.addr()], 2.0 * mb),
        ("layer_norm", &ln, vec![a.addr(), gamma.addr(), beta.addr(), o.addr()], 2.0 * mb),
        ("add_norm  ", &an, vec![a.addr(), b.addr(), gamma.addr(), beta.addr(), o.addr()], 3.0 * mb),
        ("rms_norm  ", &rn, vec![a.addr(), gamma.addr(), o.addr()], 2.0 * mb),
        ("softmax   ", &sm, vec![a.addr(), o.addr()], 2.0 * mb),
    ];
    println!("row kernels 4096x4096 f32");
    for (name, k, bufs, bytes) in &cases {
        let mut line = format!("  {name}");
        for threads in [1, 2] {
            let k = bind(&lib, k);
            let t = Pool::with(threads, |pool| time(|| run(pool, k, bufs), budget));
            line += &format!(" | {threads} thr {:6.1} GB/s ({:6.2} ms)", bytes / t / 1e9, t * 1e3);
        }
        println!("{line}");
    }
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let want = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let target = CpuTarget::host();
    println!("target {} ({} f32 lanes)", target.cpu(), target.f32_lanes());
    let budget = Duration::from_secs(2);
    for s in [512, 2048] {
        if want(&format!("attention{s}")) {
            attention_bench(&target, s, budget);
        }
    }
    if want("attention_minilm") {
        minilm_bench(&target, budget);
    }
    if want("norm") {
        norm_bench(&target, budget);
    }
}
