//! Kiln code generation: the MLIR (melior) and LLVM (inkwell) toolchain.
//!
//! For now this crate holds the shared toolchain plumbing and a smoke test that exercises all
//! of it end to end:
//!
//! - [`context`]: an MLIR context with every dialect, pass and LLVM translation registered;
//! - [`run_pass_pipeline`], [`verify`]: MLIR steps whose diagnostics come back in the error;
//! - [`translate_to_llvm`], [`llvm_ir`]: the MLIR → LLVM hand-off (one LLVM copy, no text
//!   round trip) and the host's LLVM IR text;
//! - [`host_cpu`]: the triple, CPU name and features LLVM detects on this machine;
//! - [`jit_smoke`], [`fma_llvm_ir`]: `@fma(a, b, c) = a * b + c` built op by op, lowered,
//!   then JIT-compiled and called, or printed as LLVM IR.
//!
//! MLIR and LLVM are linked statically (test binaries are ~200 MB), which is why no other Kiln
//! crate depends on this one for its tests, and why this crate's docs carry no doc-tests.

mod context;
mod error;
mod llvm;
mod smoke;

pub use context::{context, run_pass_pipeline, verify};
pub use error::CodegenError;
pub use llvm::{host_cpu, llvm_ir, translate_to_llvm, HostCpu};
pub use smoke::{fma_llvm_ir, fma_module, jit_smoke, lowered_fma_module, FMA_SYMBOL, LOWER_TO_LLVM};

/// The exact melior and inkwell this crate is built against, for callers that need their types.
pub use {inkwell, melior};
