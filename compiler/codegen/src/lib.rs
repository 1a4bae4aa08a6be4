//! Kiln code generation: kernels as MLIR, lowered through LLVM to machine code.
//!
//! - [`target`]: the [`Target`] trait (triple, CPU, vector width…) and the CPU targets;
//! - [`mlir_text`]: a builder for MLIR text with the math kernels need (exp, erf, tanh…);
//! - [`kernel`]: the [`Kernel`] contract between emitters, the build and the runtime;
//! - [`build`]: MLIR → LLVM dialect → LLVM IR (inkwell) → O3 → object → shared object;
//! - [`gpu`]: the GPU kernel layer (plans from target capabilities, `gpu.func` emitters, the
//!   SPIR-V and NVVM/PTX lowerings) and [`artifact::build_vulkan_artifact`],
//!   [`artifact::build_cuda_artifact`] (and `build_cuda_entries` for training artifacts);
//! - [`loader`]: compiled kernels loaded into this process, for tests and benchmarks;
//! - [`context`], [`run_pass_pipeline`], [`translate_to_llvm`], [`host_cpu`]: toolchain plumbing,
//!   and [`jit_smoke`], a check that all of it works in this build.
//!
//! MLIR and LLVM are linked statically (test binaries are ~200 MB), which is why no other Kiln
//! crate depends on this one for its tests, and why this crate's docs carry no doc-tests.

pub mod artifact;
pub mod build;
mod context;
mod dynamic;
mod error;
pub mod gpu;
pub mod kernel;
pub mod kernels;
mod llvm;
pub mod loader;
pub mod mlir_text;
pub mod program;
mod smoke;
pub mod target;

pub use artifact::{
    build_artifact, build_cuda_artifact, build_cuda_entries, build_entries, build_vulkan_artifact,
    build_vulkan_entries, Built, BuiltCuda, BuiltGpu,
};
pub use build::{compile, link_shared, Compiled};
pub use context::{context, run_pass_pipeline, verify};
pub use error::CodegenError;
pub use kernel::Kernel;
pub use llvm::{host_cpu, llvm_ir, translate_to_llvm, HostCpu};
pub use loader::KernelLibrary;
pub use smoke::{fma_llvm_ir, fma_module, jit_smoke, lowered_fma_module, FMA_SYMBOL, LOWER_TO_LLVM};
pub use target::{CpuTarget, Target};

/// The exact melior and inkwell this crate is built against, for callers that need their types.
pub use {inkwell, melior};
