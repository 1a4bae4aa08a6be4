//! Launching one step: split its iteration range into chunks and call the kernel on each, on
//! the calling thread or across the model's thread pool, and wait for all of them.

use rayon::prelude::*;
use rayon::ThreadPool;

use crate::error::RuntimeError;
use crate::kernels::KernelFn;

/// A raw pointer that may cross threads. Transparent, so a `[SendPtr]` is the kernel's `bufs`.
#[derive(Debug, Clone, Copy)]
#[repr(transparent)]
pub(crate) struct SendPtr(pub *mut u8);

// SAFETY: the pointers point into the arena, the weights, and the caller's inputs and outputs,
// all of which outlive the run that uses them (`Model::run` borrows them for the whole call and
// waits for every chunk before returning). Concurrent chunks of one step write disjoint ranges
// of their outputs by the artifact's contract, and steps run one after another, so no two
// threads write the same bytes and no thread reads bytes another is writing.
unsafe impl Send for SendPtr {}
// SAFETY: see `Send` above.
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// The pointer. A method, so closures capture the whole `SendPtr` rather than its field.
    fn get(self) -> *mut u8 {
        self.0
    }
}

/// The chunks `[begin, end)` that `[0, range)` is split into: up to `threads × 4` near-equal
/// chunks (more than threads, so uneven chunks balance out), each of at least `grain` iterations,
/// or one chunk when splitting cannot help.
pub(crate) fn chunks(range: u64, grain: u64, threads: usize) -> Vec<(u64, u64)> {
    if range == 0 {
        return Vec::new();
    }
    let grain = grain.max(1);
    if range <= grain || threads <= 1 {
        return vec![(0, range)];
    }
    let n = (threads as u64).saturating_mul(4).min(range / grain).max(1);
    let bound = |i: u64| (i as u128 * range as u128 / n as u128) as u64;
    (0..n).map(|i| (bound(i), bound(i + 1))).collect()
}

/// Calls `kernel` over `[0, range)` with the argument array `args`, using `pool` when the step is
/// worth splitting, and returns when every chunk is done.
///
/// # Safety
///
/// `args` must hold the pointers the kernel expects, valid for the whole call, and `kernel` must
/// honour the chunk contract (iterations of disjoint chunks touch disjoint output bytes).
pub(crate) unsafe fn launch(
    kernel: KernelFn,
    args: &[SendPtr],
    syms: &[i64],
    range: u64,
    grain: u64,
    pool: Option<&ThreadPool>,
    threads: usize,
) {
    // SendPtr is repr(transparent) over `*mut u8`, so the slice is the kernel's pointer array.
    let bufs = SendPtr(args.as_ptr() as *mut u8);
    let syms = SendPtr(syms.as_ptr() as *mut u8);
    let call = |(begin, end): (u64, u64)| {
        // SAFETY: guaranteed by the caller; begin and end fit i64 (the caller checked range).
        unsafe { kernel(bufs.get() as *const *mut u8, syms.get() as *const i64, begin as i64, end as i64) }
    };
    let parts = chunks(range, grain, threads);
    match pool {
        Some(pool) if parts.len() > 1 && pool.current_thread_index().is_some() => {
            parts.into_par_iter().for_each(call)
        }
        Some(pool) if parts.len() > 1 => pool.install(|| parts.into_par_iter().for_each(call)),
        _ => parts.into_iter().for_each(call),
    }
}

/// Subnormal floats flushed to zero on the current thread (x86-64: MXCSR's flush-to-zero and
/// denormals-are-zero bits; AArch64: FPCR.FZ) until the guard drops, which restores the
/// thread's mode. A kernel whose operands or results fall below f32's normal range (gradients
/// of a deep train step do) otherwise takes a microcode assist per operation: a product of
/// such values ran 127× slower here (0.80 against 102 GFLOP/s). What a run gives up is values
/// below 1.2e-38 (2.2e-308 in f64), which become ±0; the host's own code keeps its mode.
pub(crate) struct FlushDenormals {
    saved: Option<mode::Bits>,
}

impl FlushDenormals {
    pub(crate) fn new() -> FlushDenormals {
        let saved = mode::read();
        if let Some(bits) = saved {
            mode::write(bits | mode::FLUSH);
        }
        FlushDenormals { saved }
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        if let Some(bits) = self.saved {
            mode::write(bits);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod mode {
    pub type Bits = u32;
    /// MXCSR's FTZ (bit 15) and DAZ (bit 6).
    pub const FLUSH: Bits = (1 << 15) | (1 << 6);
    pub fn read() -> Option<Bits> {
        let mut csr: Bits = 0;
        // SAFETY: stores the MXCSR register into a local.
        unsafe { std::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags)) };
        Some(csr)
    }
    pub fn write(csr: Bits) {
        // SAFETY: loads a value read from MXCSR with only the FTZ/DAZ bits changed.
        unsafe { std::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags)) };
    }
}

#[cfg(target_arch = "aarch64")]
mod mode {
    pub type Bits = u64;
    /// FPCR's FZ (bit 24).
    pub const FLUSH: Bits = 1 << 24;
    pub fn read() -> Option<Bits> {
        let v: Bits;
        // SAFETY: reads the FPCR register.
        unsafe { std::arch::asm!("mrs {}, fpcr", out(reg) v, options(nomem, nostack, preserves_flags)) };
        Some(v)
    }
    pub fn write(v: Bits) {
        // SAFETY: writes a value read from FPCR with only the FZ bit changed.
        unsafe { std::arch::asm!("msr fpcr, {}", in(reg) v, options(nomem, nostack, preserves_flags)) };
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod mode {
    pub type Bits = u32;
    pub const FLUSH: Bits = 0;
    pub fn read() -> Option<Bits> {
        None
    }
    pub fn write(_: Bits) {}
}

/// The thread count: `requested`, else `KILN_THREADS` (given as `env`), else `available`.
pub(crate) fn resolve_threads(
    requested: Option<usize>,
    env: Option<String>,
    available: usize,
) -> Result<usize, RuntimeError> {
    match (requested, env) {
        (Some(0), _) => Err(RuntimeError::Threads { message: "Options::threads must be at least 1".into() }),
        (Some(n), _) => Ok(n),
        (None, Some(text)) => match text.trim().parse::<usize>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(RuntimeError::Threads {
                message: format!(
                    "KILN_THREADS={text:?} is not a positive integer (unset it to use every core)"
                ),
            }),
        },
        (None, None) => Ok(available.max(1)),
    }
}

/// A pool of `threads` workers, or `None` for one thread (steps then run on the caller).
pub(crate) fn pool(threads: usize) -> Result<Option<ThreadPool>, RuntimeError> {
    if threads <= 1 {
        return Ok(None);
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kiln-{i}"))
        // The pool's threads are Kiln's own: they flush subnormals for good.
        .start_handler(|_| std::mem::forget(FlushDenormals::new()))
        .build()
        .map(Some)
        .map_err(|e| RuntimeError::Threads { message: format!("cannot start {threads} threads: {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn covers(parts: &[(u64, u64)], range: u64) -> bool {
        parts.first().map_or(range == 0, |p| p.0 == 0)
            && parts.windows(2).all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1)
            && parts.last().is_none_or(|p| p.1 == range)
    }

    #[test]
    fn chunking() {
        assert_eq!(chunks(0, 1, 4), vec![]);
        assert_eq!(chunks(10, 10, 4), vec![(0, 10)]);
        assert_eq!(chunks(100, 1, 1), vec![(0, 100)]);
        assert_eq!(chunks(64, 4, 2), (0..8).map(|i| (i * 8, i * 8 + 8)).collect::<Vec<_>>());
        assert_eq!(chunks(10, 4, 8), vec![(0, 5), (5, 10)]);
        assert_eq!(chunks(5, 0, 2), vec![(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]);
        assert_eq!(chunks(99, 98, 2), vec![(0, 99)]);
        for (range, grain, threads) in [(1000, 7, 3), (17, 1, 16), (1 << 40, 1, 64), (99, 98, 2)] {
            let parts = chunks(range, grain, threads);
            assert!(covers(&parts, range), "{range} {grain} {threads}: {parts:?}");
            assert!(parts.iter().all(|p| p.1 - p.0 >= grain));
            assert!(parts.len() as u64 <= threads as u64 * 4);
        }
    }

    #[test]
    fn subnormals_flush_inside_the_guard_and_the_mode_comes_back() {
        let tiny = std::hint::black_box(1e-20f32);
        let product = |x: f32| std::hint::black_box(x) * std::hint::black_box(x);
        assert!(product(tiny) > 0.0, "the test harness already flushes subnormals");
        {
            let _flush = FlushDenormals::new();
            if cfg!(any(target_arch = "x86_64", target_arch = "aarch64")) {
                assert_eq!(product(tiny), 0.0);
                // DAZ: a subnormal operand counts as zero.
                assert_eq!(std::hint::black_box(f32::from_bits(1)) * 2.0, 0.0);
            }
        }
        assert!(product(tiny) > 0.0, "the thread's mode was not restored");
    }

    #[test]
    fn thread_count() {
        assert_eq!(resolve_threads(Some(3), Some("8".into()), 2).unwrap(), 3);
        assert_eq!(resolve_threads(None, Some(" 8 ".into()), 2).unwrap(), 8);
        assert_eq!(resolve_threads(None, None, 2).unwrap(), 2);
        assert!(resolve_threads(Some(0), None, 2).unwrap_err().to_string().contains("at least 1"));
        let err = resolve_threads(None, Some("lots".into()), 2).unwrap_err();
        assert!(err.to_string().contains("KILN_THREADS=\"lots\""), "{err}");
        assert!(resolve_threads(None, Some("0".into()), 2).is_err());
    }
}
