//! The crate's error type.

use thiserror::Error;

/// Everything that can go wrong while building, lowering, translating or JIT-compiling code.
///
/// Variants that come from MLIR carry the diagnostics MLIR emitted while the failing step ran
/// (captured instead of being printed to stderr), one per line.
#[derive(Debug, Error)]
pub enum CodegenError {
    /// An operation could not be built (usually a missing operand, result or attribute).
    #[error("failed to build `{op}`: {source}")]
    Build {
        /// The operation name, e.g. `math.fma`.
        op: &'static str,
        /// melior's reason.
        #[source]
        source: melior::Error,
    },
    /// A type or attribute written as text did not parse.
    #[error("failed to parse {what} `{text}`")]
    Parse {
        /// `"type"` or `"attribute"`.
        what: &'static str,
        /// The text that failed to parse.
        text: String,
    },
    /// The MLIR verifier rejected a module.
    #[error("MLIR verification failed:\n{diagnostics}")]
    Verify {
        /// The verifier's diagnostics.
        diagnostics: String,
    },
    /// A pass pipeline string did not parse (unknown pass, bad option, unregistered passes).
    #[error("invalid pass pipeline `{pipeline}`: {source}")]
    PipelineParse {
        /// The pipeline as given.
        pipeline: String,
        /// melior's reason, including MLIR's message.
        #[source]
        source: melior::Error,
    },
    /// A pass pipeline ran and failed.
    #[error("pass pipeline `{pipeline}` failed:\n{diagnostics}")]
    Pass {
        /// The pipeline as given.
        pipeline: String,
        /// The diagnostics emitted by the failing pass.
        diagnostics: String,
    },
    /// `mlirTranslateModuleToLLVMIR` returned no module (the module still holds non-LLVM ops,
    /// or a dialect has no LLVM translation registered).
    #[error("translation of the MLIR module to LLVM IR failed:\n{diagnostics}")]
    Translate {
        /// The diagnostics emitted during translation.
        diagnostics: String,
    },
    /// LLVM's own verifier rejected the translated module.
    #[error("LLVM IR verification failed: {0}")]
    LlvmVerify(String),
    /// LLVM could not initialize or find the native target, or build a target machine for it.
    #[error("native LLVM target unavailable: {0}")]
    Target(String),
    /// A JIT-compiled module does not define the requested symbol.
    #[error("JIT symbol `{0}` not found")]
    SymbolNotFound(String),
    /// MLIR text (generated kernels) did not parse.
    #[error("generated MLIR did not parse:\n{diagnostics}")]
    MlirParse {
        /// MLIR's diagnostics, with line and column in the module text.
        diagnostics: String,
    },
    /// An LLVM step (pass pipeline, object emission, IR building) failed.
    #[error("LLVM: {0}")]
    Llvm(String),
    /// Linking the shared object failed.
    #[error("linking the kernels failed: {0}")]
    Link(String),
    /// A graph cannot be compiled (an op or dtype without a kernel).
    #[error("cannot compile {0}")]
    Unsupported(String),
    /// A kernel over symbolic extents that code generation cannot take at run time yet.
    #[error(
        "cannot compile `{kernel}` with run-time sizes for {target}: {why} (specialize the sizes with --set)"
    )]
    Symbolic {
        /// The kernel's name (`matmul`, `elementwise×3`).
        kernel: String,
        /// Where: `the CPU`, `the Vulkan target`.
        target: String,
        /// What needs a static extent.
        why: String,
    },
    /// Writing the artifact failed.
    #[error("cannot write the artifact: {0}")]
    Artifact(String),
}
