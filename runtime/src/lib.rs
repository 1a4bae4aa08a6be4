//! kiln-runtime: loads a compiled Kiln artifact and runs it.
//!
//! **Architecture invariant:** this crate never depends on MLIR or LLVM; it shares only the
//! artifact format with the compiler. The loader and executor arrive with CPU code generation;
//! today the crate holds the artifact format version that both sides agree on.

/// The artifact format version this runtime reads and the compiler writes.
pub const ARTIFACT_FORMAT_VERSION: u32 = 1;
