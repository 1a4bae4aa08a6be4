//! The host CPU: each step resolved once into a launch (kernel pointer, argument array with the
//! arena and weight pointers filled in, slots for the caller's buffers), run on the model's
//! thread pool. Moved from `model.rs` when Vulkan arrived; the launch code is unchanged. The
//! fault words (when a kernel can fault) are filled with "none" before each run and copied out
//! after it.

use std::time::{Duration, Instant};

use rayon::ThreadPool;

use crate::buffer::AlignedBuf;
use crate::error::RuntimeError;
use crate::exec::{self, SendPtr};
use crate::kernels::{KernelFn, KernelSource};
use crate::manifest::{BufRef, Dispatch, Manifest};
use crate::model::check_index;
use crate::symbols::{Dim, SymbolSpec};
use crate::tensor::TensorRef;
use crate::weights::WeightStore;

/// A CPU artifact's steps, ready to call.
pub(crate) struct HostBackend {
    /// Each entry point's launches (`forward` first), all over the one arena.
    launches: Vec<Vec<Launch>>,
    threads: usize,
    pool: Option<ThreadPool>,
    /// The manifest's symbols, to name them in errors.
    symbols: Vec<SymbolSpec>,
    /// For each entry point, each output's element size: the alignment its buffer needs to
    /// be written in place.
    output_align: Vec<Vec<usize>>,
    /// Owns the memory the launches' arena pointers point into; the persistent state lives in
    /// its slots between runs.
    arena: AlignedBuf,
    /// For each entry point, the byte offset and number of its fault words in the arena, when
    /// one of its kernels can fault.
    fault_slots: Vec<Option<(usize, usize)>>,
    /// The fault words as the last run left them.
    fault_words: Vec<u32>,
    /// Keeps the code of every `Launch::kernel` alive: the pointers are private and used only
    /// through `&mut self`, so no kernel can be called after this is dropped with the model.
    _kernels: Box<dyn KernelSource>,
}

/// A step resolved at load: its kernel, its argument array with the fixed pointers (arena,
/// weights) filled in, and the slots to fill with the caller's buffers on each run.
struct Launch {
    kernel: KernelFn,
    args: Vec<SendPtr>,
    slots: Vec<(usize, Slot)>,
    /// Iterations of the outer loop, at the run's symbol values.
    range: Dim,
    grain: u64,
    /// The step's label, for the error of a range with no value at a run's symbols.
    label: String,
}

#[derive(Clone, Copy)]
enum Slot {
    Input(usize),
    Output(usize),
}

impl HostBackend {
    /// Resolves every step of a CPU manifest. `weights` must outlive the backend (the `Model`
    /// owns both): launches hold pointers into it.
    pub fn new(
        manifest: &Manifest,
        kernels: Box<dyn KernelSource>,
        weights: &WeightStore,
        threads: usize,
    ) -> Result<HostBackend, RuntimeError> {
        let pool = exec::pool(threads)?;
        let (maxima, hints) = (manifest.max_values(), manifest.hint_values());
        let mut arena = AlignedBuf::zeroed(manifest.arena_bytes, "arena")?;
        let arena_base = arena.as_mut_ptr();

        let mut all = Vec::new();
        for entry in manifest.entry_views() {
            let mut launches = Vec::with_capacity(entry.steps.len());
            for step in entry.steps {
                let at = &step.label;
                let (range, grain) = match &step.dispatch {
                    Dispatch::Cpu { range, grain } => (range.clone(), *grain),
                    Dispatch::Gpu { .. } => {
                        return Err(RuntimeError::invalid(format!(
                            "step {at:?} is a GPU dispatch in a CPU artifact"
                        )))
                    }
                };
                if grain == 0 {
                    return Err(RuntimeError::invalid(format!(
                        "step {at:?} has grain 0 (it must be at least 1)"
                    )));
                }
                for (values, which) in [(&maxima, "maxima"), (&hints, "hints")] {
                    if range_at(&range, values).is_none() {
                        return Err(RuntimeError::invalid(format!(
                            "step {at:?} has range {} at the symbols' {which}: negative or over i64::MAX",
                            range.display(&manifest.symbols)
                        )));
                    }
                }
                let mut args = Vec::with_capacity(step.args.len());
                let mut slots = Vec::new();
                for arg in &step.args {
                    let ptr = match arg {
                        BufRef::Arena { offset, bytes } => {
                            super::check_arena_range(
                                at,
                                *offset,
                                *bytes,
                                manifest.arena_bytes,
                                crate::buffer::ALIGN as u64,
                                "not 64-byte aligned",
                            )?;
                            // SAFETY: offset <= arena_bytes, checked above, so the result stays
                            // inside the allocation (or one past its end for an empty range).
                            unsafe { arena_base.add(*offset as usize) }
                        }
                        BufRef::Weight { name, bytes } => {
                            let view = weights.get(name).ok_or_else(|| RuntimeError::MissingWeight {
                                step: at.clone(),
                                name: name.clone(),
                            })?;
                            if view.bytes.len() as u64 != *bytes {
                                return Err(RuntimeError::WeightSize {
                                    step: at.clone(),
                                    name: name.clone(),
                                    expected: *bytes,
                                    found: view.bytes.len() as u64,
                                });
                            }
                            // Kernels only read weights (the mapped file is read-only).
                            view.bytes.as_ptr().cast_mut()
                        }
                        BufRef::Input { index } => {
                            let i = check_index(at, "input", *index, entry.inputs.len())?;
                            slots.push((args.len(), Slot::Input(i)));
                            std::ptr::null_mut()
                        }
                        BufRef::Output { index } => {
                            let i = check_index(at, "output", *index, entry.outputs.len())?;
                            slots.push((args.len(), Slot::Output(i)));
                            std::ptr::null_mut()
                        }
                        // `check_steps` refused it: a CPU kernel reads `syms` instead.
                        BufRef::Symbols => {
                            return Err(RuntimeError::invalid(format!(
                                "step {at:?} passes the symbol values as a buffer, but a CPU kernel takes them as its `syms` argument"
                            )))
                        }
                    };
                    args.push(SendPtr(ptr));
                }
                let kernel = kernels.lookup(&step.symbol).ok_or_else(|| RuntimeError::MissingSymbol {
                    step: at.clone(),
                    symbol: step.symbol.clone(),
                })?;
                launches.push(Launch { kernel, args, slots, range, grain, label: at.clone() });
            }
            all.push(launches);
        }
        let views = manifest.entry_views();
        let output_align =
            views.iter().map(|e| e.outputs.iter().map(|o| o.dtype.size_bytes()).collect()).collect();
        // `faults::check` put each entry point's words 4-byte aligned inside the arena.
        let fault_slots = views.iter().map(|e| e.faults.map(|f| (f.offset as usize, f.words()))).collect();
        Ok(HostBackend {
            launches: all,
            threads,
            pool,
            symbols: manifest.symbols.clone(),
            output_align,
            arena,
            fault_slots,
            fault_words: Vec::new(),
            _kernels: kernels,
        })
    }

    /// The fault words as the last run left them (empty when none of its kernels can fault).
    pub fn fault_words(&self) -> &[u32] {
        &self.fault_words
    }

    /// Entry point `entry`'s fault words in the arena.
    fn arena_fault_words(&mut self, entry: usize) -> Option<&mut [u32]> {
        let (offset, words) = self.fault_slots.get(entry).copied().flatten()?;
        // SAFETY: the manifest check placed `words` u32s at the 4-byte aligned `offset` inside
        // the arena this backend owns; no kernel runs while the slice lives (`&mut self`).
        Some(unsafe {
            std::slice::from_raw_parts_mut(self.arena.as_mut_ptr().add(offset).cast::<u32>(), words)
        })
    }

    /// Worker threads each run uses.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// The arena, whose state slots hold the persistent state between runs.
    pub fn arena(&self) -> &[u8] {
        self.arena.as_slice()
    }

    /// The arena, to write state into between runs.
    pub fn arena_mut(&mut self) -> &mut [u8] {
        self.arena.as_mut_slice()
    }

    /// Runs entry point `entry`'s steps on checked inputs and outputs, copying misaligned ones
    /// through aligned buffers.
    pub fn execute(
        &mut self,
        entry: usize,
        values: &[u64],
        inputs: &[TensorRef],
        outputs: &mut [&mut [u8]],
        mut times: Option<&mut Vec<Duration>>,
    ) -> Result<(), RuntimeError> {
        let mut realigned_inputs = Vec::with_capacity(inputs.len());
        for input in inputs {
            let aligned = (input.bytes.as_ptr() as usize).is_multiple_of(input.dtype.size_bytes());
            realigned_inputs.push(if aligned {
                None
            } else {
                Some(AlignedBuf::copy_of(input.bytes, "input copy")?)
            });
        }
        let input_ptrs: Vec<SendPtr> = inputs
            .iter()
            .zip(&realigned_inputs)
            .map(|(input, copy)| {
                SendPtr(copy.as_ref().map_or(input.bytes.as_ptr(), |c| c.as_slice().as_ptr()).cast_mut())
            })
            .collect();
        let mut realigned_outputs = Vec::with_capacity(outputs.len());
        for (buf, &align) in outputs.iter().zip(&self.output_align[entry]) {
            let aligned = (buf.as_ptr() as usize).is_multiple_of(align);
            realigned_outputs.push(if aligned {
                None
            } else {
                Some(AlignedBuf::zeroed(buf.len() as u64, "output copy")?)
            });
        }
        let output_ptrs: Vec<SendPtr> = outputs
            .iter_mut()
            .zip(realigned_outputs.iter_mut())
            .map(|(buf, copy)| SendPtr(copy.as_mut().map_or(buf.as_mut_ptr(), AlignedBuf::as_mut_ptr)))
            .collect();

        let ranges = self.launches[entry]
            .iter()
            .map(|l| {
                range_at(&l.range, values).ok_or_else(|| {
                    RuntimeError::invalid(format!(
                        "step {:?} has no range at {}",
                        l.label,
                        crate::symbols::binding_str(&self.symbols, values)
                    ))
                })
            })
            .collect::<Result<Vec<u64>, _>>()?;
        // The binding checked every value against the symbols' maxima, which fit i64.
        let syms: Vec<i64> = values.iter().map(|&v| v as i64).collect();
        if let Some(words) = self.arena_fault_words(entry) {
            words.fill(crate::faults::NONE);
        }
        let (pool, threads) = (self.pool.as_ref(), self.threads);
        let launches = &mut self.launches[entry];
        let mut steps = move || {
            let _flush = exec::FlushDenormals::new();
            for (launch, &range) in launches.iter_mut().zip(&ranges) {
                for &(arg, slot) in &launch.slots {
                    launch.args[arg] = match slot {
                        Slot::Input(i) => input_ptrs[i],
                        Slot::Output(i) => output_ptrs[i],
                    };
                }
                let start = Instant::now();
                // SAFETY: every pointer is live for this call: the arena is owned by `self`, the
                // weights by the `Model` that owns `self`, the inputs and outputs are borrowed by
                // this call, and all were checked to have the sizes the manifest gives.
                // `self._kernels` keeps the code loaded. The kernel's contract (ranges, disjoint
                // writes) is the artifact's, checked at compile.
                unsafe {
                    exec::launch(launch.kernel, &launch.args, &syms, range, launch.grain, pool, threads)
                };
                if let Some(times) = times.as_deref_mut() {
                    times.push(start.elapsed());
                }
            }
        };
        // The whole run is one job on the pool: each step then splits from inside it, which
        // costs a work-stealing join instead of waking the pool from outside and putting the
        // caller to sleep once per step.
        match pool {
            Some(pool) => pool.install(steps),
            None => steps(),
        }

        for (buf, copy) in outputs.iter_mut().zip(&realigned_outputs) {
            if let Some(copy) = copy {
                buf.copy_from_slice(copy.as_slice());
            }
        }
        // Every step has returned (the pool joined its tasks): the kernels' atomics are done.
        let mut words = std::mem::take(&mut self.fault_words);
        words.clear();
        if let Some(recorded) = self.arena_fault_words(entry) {
            words.extend_from_slice(recorded);
        }
        self.fault_words = words;
        Ok(())
    }
}

/// A range at symbol values `values`, when it has one that a kernel's `i64` can hold.
fn range_at(range: &Dim, values: &[u64]) -> Option<u64> {
    range.at(values).filter(|&r| i64::try_from(r).is_ok())
}
