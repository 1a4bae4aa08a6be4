//! The hand-off from MLIR to LLVM (inkwell), and what LLVM knows about the host.
//!
//! melior and inkwell link the same single copy of LLVM, so the `llvm::Module` that
//! `mlirTranslateModuleToLLVMIR` creates inside an inkwell context can be owned by inkwell
//! directly, with no text round trip.

use crate::{context::capture_diagnostics, CodegenError};
use inkwell::{
    context::Context as LlvmContext,
    module::Module as LlvmModule,
    targets::{CodeModel, InitializationConfig, RelocMode, Target, TargetMachine},
    OptimizationLevel,
};
use melior::{ir::Module, Context};
use std::sync::OnceLock;

/// The host as LLVM sees it: what code compiled for "this machine" targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostCpu {
    /// Target triple, e.g. `x86_64-unknown-linux-gnu`.
    pub triple: String,
    /// CPU name, e.g. `znver4`; never empty (LLVM answers `generic` when it cannot tell).
    pub name: String,
    /// Comma-separated feature list, e.g. `+avx2,+avx512f,-amx-tile,...`.
    pub features: String,
}

/// Asks LLVM for the host's triple, CPU name and CPU features.
pub fn host_cpu() -> HostCpu {
    HostCpu {
        triple: TargetMachine::get_default_triple().as_str().to_string_lossy().into_owned(),
        name: TargetMachine::get_host_cpu_name().to_string(),
        features: TargetMachine::get_host_cpu_features().to_string(),
    }
}

/// Initializes LLVM's native target (code generator, asm printer and parser) once per process.
///
/// MLIR's `ExecutionEngine` initializes the native target itself, but not under inkwell's lock;
/// doing it here first, once, keeps concurrent JITs and translations from racing on LLVM's
/// global target registry.
pub(crate) fn init_native_target() -> Result<(), CodegenError> {
    static INIT: OnceLock<Result<(), String>> = OnceLock::new();
    INIT.get_or_init(|| Target::initialize_native(&InitializationConfig::default()))
        .clone()
        .map_err(CodegenError::Target)
}

/// Translates `module`, which must hold only LLVM-dialect operations (after a pipeline such as
/// [`LOWER_TO_LLVM`](crate::LOWER_TO_LLVM)), into an LLVM module owned by `llvm`.
///
/// The result has no target triple or data layout; see [`llvm_ir`] for a module prepared for
/// the host.
pub fn translate_to_llvm<'l>(
    context: &Context,
    module: &Module,
    llvm: &'l LlvmContext,
) -> Result<LlvmModule<'l>, CodegenError> {
    let (raw, diagnostics) = capture_diagnostics(context, || unsafe {
        mlir_sys::mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), llvm.raw().cast())
    });
    if raw.is_null() {
        return Err(CodegenError::Translate { diagnostics });
    }
    // SAFETY: non-null, freshly created inside `llvm` (same LLVM copy as inkwell's), and owned by
    // nobody else; the returned module borrows `llvm`, so it cannot outlive its context.
    Ok(unsafe { LlvmModule::new(raw.cast()) })
}

/// Translates `module` (LLVM dialect only) to LLVM IR text for the host: the host triple and
/// the data layout of a host target machine are set, and LLVM's verifier has accepted it. No
/// LLVM optimization is run.
pub fn llvm_ir(context: &Context, module: &Module) -> Result<String, CodegenError> {
    init_native_target()?;
    let host = host_cpu();
    let llvm = LlvmContext::create();
    let llvm_module = translate_to_llvm(context, module, &llvm)?;
    let triple = TargetMachine::get_default_triple();
    let machine = Target::from_triple(&triple)
        .map_err(|e| CodegenError::Target(e.to_string()))?
        .create_target_machine(
            &triple,
            &host.name,
            &host.features,
            OptimizationLevel::Aggressive,
            RelocMode::Default,
            CodeModel::Default,
        )
        .ok_or_else(|| CodegenError::Target(format!("no target machine for {host:?}")))?;
    llvm_module.set_triple(&triple);
    llvm_module.set_data_layout(&machine.get_target_data().get_data_layout());
    llvm_module.verify().map_err(|e| CodegenError::LlvmVerify(e.to_string()))?;
    Ok(llvm_module.print_to_string().to_string())
}
