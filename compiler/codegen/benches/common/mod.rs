//! Shared by the kernel benches: a kernel's range run in contiguous chunks, the first on the
//! calling thread and the others on helper threads that live for a whole measurement and spin
//! between calls, as the runtime's pool keeps its workers between steps. A call's time is then
//! its kernel's, not a thread start's.

use kiln_codegen::loader::EntryFn;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// One call, as the helpers see it.
#[derive(Clone, Copy)]
struct Call {
    /// Which call this is (1, 2, …): a helper runs its chunk of each call once.
    number: usize,
    entry: EntryFn,
    /// The argument array, alive until `Pool::run` returns.
    ptrs: usize,
    range: usize,
}

/// The calling thread and `threads − 1` spinning helpers (see [`Pool::with`]).
pub struct Pool {
    threads: usize,
    call: Mutex<Option<Call>>,
    /// The number of the latest call: what the helpers spin on.
    latest: AtomicUsize,
    done: AtomicUsize,
    stop: AtomicBool,
}

impl Pool {
    /// Runs `body` with a pool of `threads` threads; the helpers stop when it returns.
    pub fn with<R>(threads: usize, body: impl FnOnce(&Pool) -> R) -> R {
        let pool = Pool {
            threads: threads.max(1),
            call: Mutex::new(None),
            latest: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        };
        std::thread::scope(|s| {
            for t in 1..pool.threads {
                let pool = &pool;
                s.spawn(move || pool.serve(t));
            }
            let out = body(&pool);
            pool.stop.store(true, Ordering::Release);
            out
        })
    }

    /// Runs `[0, range)` of `entry` with the argument array `bufs` in one contiguous chunk per
    /// thread (every thread calls the kernel, even with an empty chunk) and returns when all
    /// chunks are done.
    pub fn run(&self, entry: EntryFn, bufs: &[usize], range: usize) {
        let ptrs: Vec<*mut u8> = bufs.iter().map(|&a| a as *mut u8).collect();
        let number = self.latest.load(Ordering::Acquire) + 1;
        // Every helper finished the previous call before the last `run` returned.
        self.done.store(0, Ordering::Release);
        *self.call.lock().expect("call") = Some(Call { number, entry, ptrs: ptrs.as_ptr() as usize, range });
        self.latest.store(number, Ordering::Release);
        self.chunk(entry, ptrs.as_ptr(), range, 0);
        while self.done.load(Ordering::Acquire) < self.threads - 1 {
            std::hint::spin_loop();
        }
    }

    fn chunk(&self, entry: EntryFn, ptrs: *const *mut u8, range: usize, t: usize) {
        let (b, e) = (t * range / self.threads, (t + 1) * range / self.threads);
        // SAFETY: the caller of `run` passes buffers as long as the kernel's arguments and keeps
        // them alive until every chunk is done; chunks write disjoint parts.
        unsafe { entry(ptrs, [0i64; 0].as_ptr(), b as i64, e as i64) };
    }

    fn serve(&self, t: usize) {
        let mut seen = 0;
        while !self.stop.load(Ordering::Acquire) {
            if self.latest.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                continue;
            }
            let Some(call) = *self.call.lock().expect("call") else { continue };
            if call.number == seen {
                continue;
            }
            seen = call.number;
            self.chunk(call.entry, call.ptrs as *const *mut u8, call.range, t);
            self.done.fetch_add(1, Ordering::AcqRel);
        }
    }
}
