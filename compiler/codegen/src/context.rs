//! The MLIR context with every dialect, pass and LLVM translation registered, and helpers that
//! run MLIR steps while capturing their diagnostics.

use crate::CodegenError;
use melior::{
    dialect::DialectRegistry,
    ir::{operation::OperationLike, Module},
    pass::PassManager,
    utility::{
        parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes,
    },
    Context,
};
use std::{cell::RefCell, fmt::Write, rc::Rc};

/// Creates an MLIR context with all upstream dialects loaded, all passes registered (needed by
/// [`run_pass_pipeline`]) and all LLVM translations registered (needed by the JIT and by
/// [`translate_to_llvm`](crate::translate_to_llvm)).
///
/// Pass registration is global and guarded by melior with a `Once`, so calling this from many
/// threads is fine. A context is not `Send`: make one per thread.
pub fn context() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    register_all_passes();
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    context
}

/// Runs `step` with a diagnostic handler attached to `context` and returns its result together
/// with the diagnostics emitted meanwhile (one per line, notes indented). Captured diagnostics
/// are not printed to stderr.
pub(crate) fn capture_diagnostics<T>(context: &Context, step: impl FnOnce() -> T) -> (T, String) {
    let log = Rc::new(RefCell::new(String::new()));
    let sink = Rc::clone(&log);
    let id = context.attach_diagnostic_handler(move |diagnostic| {
        let mut text = sink.borrow_mut();
        let _ = writeln!(text, "{diagnostic}");
        for note in (0..diagnostic.note_count()).filter_map(|i| diagnostic.note(i).ok()) {
            let _ = writeln!(text, "  note: {note}");
        }
        true
    });
    let result = step();
    context.detach_diagnostic_handler(id);
    let text = log.borrow().trim_end().to_owned();
    (result, text)
}

/// Runs the MLIR verifier on `module`.
pub fn verify(context: &Context, module: &Module) -> Result<(), CodegenError> {
    let (ok, diagnostics) = capture_diagnostics(context, || module.as_operation().verify());
    if ok {
        Ok(())
    } else {
        Err(CodegenError::Verify { diagnostics })
    }
}

/// Parses `pipeline` (textual pass-pipeline syntax, anchored on the module, e.g.
/// `builtin.module(canonicalize,func.func(cse))`) and runs it on `module`.
pub fn run_pass_pipeline(context: &Context, module: &mut Module, pipeline: &str) -> Result<(), CodegenError> {
    let manager = PassManager::new(context);
    parse_pass_pipeline(manager.as_operation_pass_manager(), pipeline)
        .map_err(|source| CodegenError::PipelineParse { pipeline: pipeline.to_owned(), source })?;
    let (result, diagnostics) = capture_diagnostics(context, || manager.run(module));
    result.map_err(|_| CodegenError::Pass { pipeline: pipeline.to_owned(), diagnostics })
}
