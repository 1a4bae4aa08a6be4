//! The GPU kernel layer, shared by every GPU target: per-kernel plans chosen from the target's
//! capabilities ([`GpuCaps`], data), rendered as `gpu.func` MLIR, lowered per target (SPIR-V
//! for Vulkan in [`spirv`]).
//!
//! The split mirrors the CPU side: kiln-sched's schedule is target-independent; [`program`]
//! shapes each scheduled kernel's operands (the same views the CPU emitters get) and picks a
//! [`GpuPlan`]; the emitters ([`elements`], [`rows`], [`matmul`], [`attention`]) render it.
//! A GPU kernel's contract: one `gpu.module @kN` holding `gpu.func @kN(%a0: memref<…>, …)
//! kernel` whose arguments are its buffers in the step's argument order (inputs, then the
//! output), bound as storage buffers 0..n of descriptor set 0, with the plan's workgroup size
//! as its entry-point ABI; the dispatch is the plan's [`Launch`].

pub mod attention;
mod caps;
pub mod elements;
pub mod matmul;
pub mod plan;
pub mod program;
pub mod rows;
mod skeleton;
pub mod spirv;

use crate::mlir_text::{Body, Split};
pub use caps::GpuCaps;
pub use plan::{GpuPlan, Launch, Work};
pub use program::{kernels, GpuProgram};
pub use spirv::SpirvModule;

/// What an emitter needs beyond the kernel's operands: the target, and which arguments are
/// bound in pieces because they are larger than one binding may cover.
pub struct GpuCtx<'a> {
    pub caps: &'a GpuCaps,
    pub splits: Vec<(String, Split)>,
}

impl GpuCtx<'_> {
    /// A fresh body for the kernel's text, knowing the split arguments.
    pub fn body(&self) -> Body {
        Body::with_splits(self.splits.clone())
    }
}

/// One generated GPU kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuKernel {
    /// Symbol of the `gpu.module` and of its kernel `gpu.func` (`k12`).
    pub symbol: String,
    /// The `gpu.module` text, preceded by its plan as a comment.
    pub mlir: String,
    /// How the work is divided, and the dispatch.
    pub plan: GpuPlan,
    /// Estimated floating-point operations of the whole kernel.
    pub flops: u64,
    /// Estimated bytes the whole kernel reads and writes.
    pub bytes: u64,
}
