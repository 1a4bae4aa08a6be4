//! The contract between kernel emitters, the module builder and the runtime.
//!
//! A kernel is one MLIR `func.func @{symbol}` whose arguments are its buffers, as static-shape,
//! identity-layout memrefs in the order of [`Kernel::args`] (inputs first, the output last),
//! followed by `%begin: index, %end: index`. It computes iterations `[begin, end)` of its outer
//! parallel loop, of which there are [`Kernel::range`]; distinct iterations write disjoint parts
//! of the output, so the runtime may run chunks of the range on different threads. Private
//! helper functions the kernel calls are part of its text and named `{symbol}_…`.
//!
//! After lowering (bare-pointer calling convention) the build adds, for each kernel, an exported
//! entry `kiln_{symbol}(void **bufs, int64_t begin, int64_t end)` that the runtime calls.

use kiln_ir::DType;

/// One generated kernel and what the runtime needs to know to call it.
#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    /// MLIR symbol of the kernel function (`k12`); the exported entry is [`Kernel::entry`].
    pub symbol: String,
    /// The `func.func` text (and its private helpers).
    pub mlir: String,
    /// Iterations of the outer parallel loop.
    pub range: usize,
    /// Fewest iterations worth giving one thread (so tiny kernels run on one).
    pub grain: usize,
    /// Estimated floating-point operations of the whole kernel.
    pub flops: u64,
    /// Estimated bytes the whole kernel reads and writes.
    pub bytes: u64,
}

impl Kernel {
    /// The exported C entry symbol of a kernel symbol.
    pub fn entry(symbol: &str) -> String {
        format!("kiln_{symbol}")
    }

    /// A grain so that each task does at least ~128 Ki units of `work` (flops or bytes).
    pub fn grain_for(range: usize, work: u64) -> usize {
        const MIN_TASK_WORK: u64 = 1 << 17;
        let per_iteration = (work / range.max(1) as u64).max(1);
        (MIN_TASK_WORK.div_ceil(per_iteration) as usize).clamp(1, range.max(1))
    }
}

/// The MLIR element type that stores `dtype` in memory (`bool` is one byte, `i8`).
pub fn mlir_elem(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::Bool => "i8",
    }
}
