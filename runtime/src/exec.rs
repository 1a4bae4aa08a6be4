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
    range: u64,
    grain: u64,
    pool: Option<&ThreadPool>,
    threads: usize,
) {
    // SendPtr is repr(transparent) over `*mut u8`, so the slice is the kernel's pointer array.
    let bufs = SendPtr(args.as_ptr() as *mut u8);
    let call = |(begin, end): (u64, u64)| {
        // SAFETY: guaranteed by the caller; begin and end fit i64 (range was checked at load).
        unsafe { kernel(bufs.get() as *const *mut u8, begin as i64, end as i64) }
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
