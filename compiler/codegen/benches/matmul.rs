//! Matrix-product throughput: Kiln's generated f32 kernel against numpy's sgemm (OpenBLAS).
//!
//! `cargo bench -p kiln-codegen --bench matmul [-- FILTER]` compiles one kernel per shape for the
//! host, runs it on 1 and 2 threads (the range split into contiguous chunks, as the runtime
//! does), and prints the median GFLOP/s after warm-up next to numpy's on the same shapes and
//! thread counts, and the fraction of the FMA peak measured by a generated FMA loop.
//! numpy comes from `KILN_BENCH_PYTHON` (default `/opt/kiln-golden-venv/bin/python`), with
//! `OPENBLAS_NUM_THREADS` set to the thread count; without it, numpy is skipped.
//! `KILN_BENCH_DUMP=dir` writes the compiled kernels (MLIR, LLVM IR, object) there;
//! `KILN_BENCH_THREADS=1,2` picks the thread counts, `KILN_BENCH_NUMPY=0` skips numpy,
//! `KILN_BENCH_CPUTIME=1` times thread CPU time, `KILN_BENCH_COLD=1` evicts the caches before
//! every timed call (as a model run finds them), `KILN_BENCH_SMALL_PAGES=1` keeps large buffers
//! off huge pages (as the runtime's arena is).
//! Shapes marked `packed` take B as a compile-time constant, stored in the micro-kernel's panel
//! layout ([`matmul::Panels`]), as the compiler does for weights; numpy gets the same product
//! with B as it is.

mod common;

use common::Pool;
use kiln_codegen::{
    kernels::matmul, kernels::View, mlir_text::Body, CpuTarget, Kernel, KernelLibrary, Target,
};
use kiln_ir::{Activation, DType};
use std::process::Command;
use std::time::{Duration, Instant};

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

/// One benchmarked product: `[batch, m, k] · [k, n]` (B shared across the batch), b stored
/// `[n, k]` when `bt` (a Linear weight), packed ahead of time when `packed`, with `act` applied.
struct Shape {
    name: &'static str,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    bt: bool,
    packed: bool,
    act: Activation,
}

impl Shape {
    const fn plain(name: &'static str, m: usize, k: usize, n: usize, bt: bool) -> Shape {
        Shape { name, batch: 1, m, k, n, bt, packed: false, act: Activation::None }
    }
    /// A MiniLM Linear layer as the compiler emits it: batch × 128 rows, weight packed.
    const fn layer(name: &'static str, batch: usize, k: usize, n: usize, act: Activation) -> Shape {
        Shape { name, batch, m: 128, k, n, bt: true, packed: true, act }
    }
    fn rows(&self) -> usize {
        self.batch * self.m
    }
}

const GELU: Activation = Activation::Gelu(kiln_ir::GeluApprox::Erf);

const SHAPES: &[Shape] = &[
    Shape::plain("1024^3", 1024, 1024, 1024, false),
    Shape::plain("4096^3", 4096, 4096, 4096, false),
    Shape::plain("minilm qkv/o 128x384x384 bT", 128, 384, 384, true),
    Shape::plain("minilm ffn1 128x384x1536 bT", 128, 384, 1536, true),
    Shape::plain("minilm ffn2 128x1536x384 bT", 128, 1536, 384, true),
    Shape::plain("batch8 ffn1 1024x384x1536 bT", 1024, 384, 1536, true),
    Shape::layer("packed b1 qkv/o 128x384x384", 1, 384, 384, Activation::None),
    Shape::layer("packed b1 ffn1 128x384x1536 gelu", 1, 384, 1536, GELU),
    Shape::layer("packed b1 ffn2 128x1536x384", 1, 1536, 384, Activation::None),
    Shape::layer("packed b8 qkv/o 8x128x384x384", 8, 384, 384, Activation::None),
    Shape::layer("packed b8 ffn1 8x128x384x1536 gelu", 8, 384, 1536, GELU),
    Shape::layer("packed b8 ffn2 8x128x1536x384", 8, 1536, 384, Activation::None),
    Shape::layer("packed b8 ffn1 8x128x384x1536 no act", 8, 384, 1536, Activation::None),
];

/// A 64-byte aligned f32 buffer; large ones on transparent huge pages, as numpy does for its
/// arrays (`madvise(MADV_HUGEPAGE)`), so that both sides see the same TLB reach.
struct Aligned {
    raw: Vec<f32>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize, seed: u32) -> Aligned {
        const HUGE: usize = 2 << 20;
        let huge = len * 4 >= 4 << 20 && std::env::var("KILN_BENCH_SMALL_PAGES").is_err();
        let align = if huge { HUGE } else { 64 };
        let mut raw = vec![0f32; len + align / 4];
        let start = (align - (raw.as_ptr() as usize % align)) % align / 4;
        if huge {
            // SAFETY: advice on pages this Vec owns; it changes no contents.
            unsafe { libc::madvise(raw[start..].as_mut_ptr().cast(), len * 4, libc::MADV_HUGEPAGE) };
        }
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        for x in &mut raw[start..start + len] {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *x = (s % 2001) as f32 / 1000.0 - 1.0;
        }
        Aligned { raw, start, len }
    }
    fn ptr(&mut self) -> *mut u8 {
        self.raw[self.start..self.start + self.len].as_mut_ptr().cast()
    }
}

/// Median and best seconds of `f` over repeats after one warm-up, repeating for about
/// `budget`. The best is the figure to trust on a busy machine: interference only adds time.
/// With `KILN_BENCH_CPUTIME=1` it times this thread's CPU time instead (steadier on a shared
/// machine; meaningful for one thread only).
fn time(mut f: impl FnMut(), budget: Duration) -> (f64, f64) {
    let cputime = std::env::var("KILN_BENCH_CPUTIME").is_ok_and(|v| v == "1");
    let now = || {
        if cputime {
            let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
            // SAFETY: clock_gettime writes the timespec it is given.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
        } else {
            EPOCH.elapsed().as_secs_f64()
        }
    };
    // With KILN_BENCH_COLD=1 every timed call starts with the caches holding other data, as
    // in a model, where each weight is read once per run and comes from memory.
    let cold = std::env::var("KILN_BENCH_COLD").is_ok_and(|v| v == "1");
    let mut evict = if cold { vec![0u8; 96 << 20] } else { Vec::new() };
    let mut round = 0u8;
    f();
    let mut times = vec![];
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 50) {
        round = round.wrapping_add(1);
        for line in evict.chunks_mut(64) {
            line[0] = round;
        }
        let t = now();
        f();
        times.push(now() - t);
    }
    times.sort_by(f64::total_cmp);
    (times[times.len() / 2], times[0])
}

/// Median seconds of running `[0, range)` of `kernel` split into `threads` contiguous chunks:
/// chunk 0 on this thread, the others on spinning helpers that live for the whole measurement
/// ([`Pool`], like the runtime's pool, so thread start-up is not timed).
fn measure(
    lib: &KernelLibrary,
    kernel: &Kernel,
    bufs: &[usize],
    threads: usize,
    budget: Duration,
) -> (f64, f64) {
    let entry = lib.entry(&kernel.symbol).expect("kernel entry");
    Pool::with(threads, |pool| time(|| pool.run(entry, bufs, kernel.range), budget))
}

/// GFLOP/s of 12 independent FMA chains on full vectors on each of `threads` threads at once
/// (the FMA peak: on a machine whose threads share cores it is below `threads` × one thread's).
fn fma_peak(target: &CpuTarget, threads: usize) -> f64 {
    let lanes = target.f32_lanes();
    let vty = format!("vector<{lanes}xf32>");
    let chains = 12;
    let iters = 20_000_000usize;
    let mut b = Body::new();
    let (zero, one, n) = (b.index(0), b.index(1), b.index(iters));
    let x = b.float(1.000_001, &vty);
    let y = b.float(0.999_999, &vty);
    let inits: Vec<String> = (0..chains).map(|c| format!("%c{c} = {x}")).collect();
    let types = vec![vty.as_str(); chains].join(", ");
    b.open(format!(
        "%r:{chains} = scf.for %i = {zero} to {n} step {one} iter_args({}) -> ({types})",
        inits.join(", ")
    ));
    let next: Vec<String> = (0..chains).map(|c| b.fma(&format!("%c{c}"), &y, &x, &vty)).collect();
    b.line(format!("scf.yield {} : {types}", next.join(", ")));
    b.close("");
    let mut sum = "%r#0".to_string();
    for c in 1..chains {
        sum = b.fadd(&sum, &format!("%r#{c}"), &vty);
    }
    b.line(format!("vector.store {sum}, %out[{zero}] : memref<{lanes}xf32>, {vty}"));
    b.line("return");
    let mlir = format!(
        "func.func @peak(%out: memref<{lanes}xf32>, %begin: index, %end: index) {{\n{}}}\n",
        b.finish()
    );
    let k = Kernel { symbol: "peak".into(), mlir, range: 1, grain: 1, flops: 0, bytes: 0 };
    let lib = KernelLibrary::build(std::slice::from_ref(&k), target).expect("peak kernel");
    let mut out = Aligned::new(lanes, 1);
    let bufs = [out.ptr() as usize];
    let flops = (iters * chains * lanes * 2 * threads) as f64;
    // The kernel ignores its range: every thread runs the whole loop.
    let (_, best) = measure(&lib, &k, &bufs, threads, Duration::from_millis(500));
    flops / best / 1e9
}

/// numpy's (median, best) GFLOP/s per shape on `threads` threads, or `None` without numpy.
fn numpy(shapes: &[&Shape], threads: usize) -> Option<Vec<(f64, f64)>> {
    let python =
        std::env::var("KILN_BENCH_PYTHON").unwrap_or_else(|_| "/opt/kiln-golden-venv/bin/python".into());
    let spec: Vec<String> =
        shapes.iter().map(|s| format!("({},{},{},{})", s.rows(), s.k, s.n, s.bt as u8)).collect();
    let script = format!(
        r#"
import os, time, numpy as np
clock = time.thread_time if os.environ.get("KILN_BENCH_CPUTIME") == "1" else time.perf_counter
for m, k, n, bt in [{}]:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k) if bt else (k, n), dtype=np.float32)
    b = w.T if bt else w
    c = np.empty((m, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    ts = []
    t0 = time.perf_counter()
    while len(ts) < 3 or (time.perf_counter() - t0 < 2.0 and len(ts) < 50):
        t = clock(); np.matmul(a, b, out=c); ts.append(clock() - t)
    ts.sort()
    print(2.0 * m * n * k / ts[len(ts) // 2] / 1e9, 2.0 * m * n * k / ts[0] / 1e9)
"#,
        spec.join(",")
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .env("OMP_NUM_THREADS", threads.to_string())
        .output()
        .ok()?;
    if !out.status.success() {
        eprintln!("numpy skipped: {}", String::from_utf8_lossy(&out.stderr).trim());
        return None;
    }
    let pair = |l: &str| {
        let mut it = l.split_whitespace().map(|x| x.parse::<f64>().ok());
        Some((it.next()??, it.next()??))
    };
    String::from_utf8_lossy(&out.stdout).lines().map(pair).collect()
}

fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let shapes: Vec<&Shape> = SHAPES
        .iter()
        .filter(|s| filter.is_empty() || filter.iter().any(|f| s.name.contains(f.as_str())))
        .collect();
    let target = CpuTarget::host();
    println!(
        "target: {} ({} f32 lanes, {} vector registers)",
        target.cpu(),
        target.f32_lanes(),
        target.vector_registers()
    );

    let mut kernels = vec![];
    let mut views = vec![];
    for (i, s) in shapes.iter().enumerate() {
        let a = View::contiguous(&[s.batch, s.m, s.k], DType::F32);
        let b = if s.bt {
            View {
                shape: vec![s.k, s.n],
                strides: vec![1, s.k],
                offset: 0,
                dtype: DType::F32,
                buffer_len: s.k * s.n,
            }
        } else {
            View::contiguous(&[s.k, s.n], DType::F32)
        };
        let out = View::contiguous(&[s.batch, s.m, s.n], DType::F32);
        let symbol = format!("mm{i}");
        let kernel = if s.packed {
            let panels = matmul::Panels::for_target(s.k, s.n, &target);
            matmul::emit_prepacked(&symbol, &a, panels, None, s.act, &out, &target)
        } else {
            matmul::emit(&symbol, &a, &b, None, s.act, &out, &target)
        };
        kernels.push(kernel.expect("emit"));
        views.push((s.rows() * s.k, b, s.rows() * s.n));
    }
    let t = Instant::now();
    let lib = KernelLibrary::build(&kernels, &target).expect("compile");
    println!("compiled {} kernels in {:.2} s", kernels.len(), t.elapsed().as_secs_f64());
    if let Ok(dir) = std::env::var("KILN_BENCH_DUMP") {
        let dir = std::path::Path::new(&dir);
        std::fs::create_dir_all(dir).expect("dump directory");
        std::fs::write(dir.join("matmul.mlir"), &lib.compiled.mlir).expect("write mlir");
        std::fs::write(dir.join("matmul.ll"), &lib.compiled.llvm_ir).expect("write llvm ir");
        std::fs::write(dir.join("matmul.o"), &lib.compiled.object).expect("write object");
        println!("wrote matmul.{{mlir,ll,o}} to {}", dir.display());
    }

    let thread_counts: Vec<usize> = std::env::var("KILN_BENCH_THREADS")
        .ok()
        .map(|v| v.split(',').filter_map(|t| t.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let with_numpy = std::env::var("KILN_BENCH_NUMPY").map_or(true, |v| v != "0");
    for threads in thread_counts {
        let peak = fma_peak(&target, threads);
        println!("\nmeasured FMA peak on {threads} thread(s): {peak:.1} GFLOP/s");
        let np = if with_numpy { numpy(&shapes, threads) } else { None };
        if np.is_none() {
            println!("numpy skipped (no python with numpy)");
        }
        println!(
            "\n{threads} thread(s), GFLOP/s median (best)  {:>14} {:>16} {:>14} {:>8}",
            "kiln", "numpy", "kiln/numpy", "% peak"
        );
        for (i, s) in shapes.iter().enumerate() {
            let (la, bv, lc) = &views[i];
            let (mut a, mut b, mut c) =
                (Aligned::new(*la, 1), Aligned::new(bv.buffer_len, 2), Aligned::new(*lc, 3));
            if s.packed {
                let panels = matmul::Panels::for_target(s.k, s.n, &target);
                let src = b.raw[b.start..b.start + b.len].to_vec();
                let packed = panels.pack(&src, 0, bv.strides[0], bv.strides[1]).expect("B fits");
                b = Aligned::new(packed.len(), 2);
                b.raw[b.start..b.start + b.len].copy_from_slice(&packed);
            }
            let bufs = [a.ptr() as usize, b.ptr() as usize, c.ptr() as usize];
            let budget = Duration::from_millis(if s.m * s.n * s.k > 1 << 32 { 6000 } else { 1500 });
            let (med, best) = measure(&lib, &kernels[i], &bufs, threads, budget);
            let g = |secs: f64| kernels[i].flops as f64 / secs / 1e9;
            let (gm, gb) = (g(med), g(best));
            let np_g = np.as_ref().and_then(|v| v.get(i).copied());
            let np_text = np_g.map_or("-".to_string(), |(m, b)| format!("{m:.1} ({b:.1})"));
            let ratio = np_g.map_or("-".to_string(), |(m, b)| format!("{:.2}x ({:.2}x)", gm / m, gb / b));
            println!(
                "  {:<30} {:>14} {:>16} {:>14} {:>7.0}%",
                s.name,
                format!("{gm:.1} ({gb:.1})"),
                np_text,
                ratio,
                100.0 * gb / peak
            );
        }
    }
}
