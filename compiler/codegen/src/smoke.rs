//! The toolchain smoke test: one scalar function built with melior, lowered to the LLVM
//! dialect, then JIT-compiled (MLIR `ExecutionEngine`) or translated to LLVM IR (inkwell).
//! It proves that dialect registration, pass parsing, lowering, translation and the JIT all
//! work in this build, in a few milliseconds.

use crate::{
    context::{context, run_pass_pipeline, verify},
    llvm::{init_native_target, llvm_ir, translate_to_llvm},
    CodegenError,
};
use melior::{
    dialect::func,
    ir::{
        attribute::{StringAttribute, TypeAttribute},
        operation::OperationBuilder,
        r#type::FunctionType,
        Block, BlockLike, Location, Module, Region, RegionLike, Type, Value,
    },
    Context, ExecutionEngine,
};

/// Name of the function built by [`fma_module`].
pub const FMA_SYMBOL: &str = "fma";

/// Lowers func/math/arith on scalars to the LLVM dialect. `math.fma` becomes `llvm.intr.fma`,
/// which is always fused (one rounding), unlike `llvm.fmuladd`.
pub const LOWER_TO_LLVM: &str = "builtin.module(func.func(convert-math-to-llvm),\
convert-arith-to-llvm,convert-func-to-llvm,reconcile-unrealized-casts)";

/// The JIT's optimization level (LLVM `-O3`).
const JIT_OPT_LEVEL: usize = 3;

/// Builds `func.func @fma(%a: f32, %b: f32, %c: f32) -> f32 { return math.fma(%a, %b, %c) }`
/// op by op, and verifies it.
pub fn fma_module(context: &Context) -> Result<Module<'_>, CodegenError> {
    let location = Location::unknown(context);
    let f32_type = Type::float32(context);
    let block = Block::new(&[(f32_type, location); 3]);
    let arguments = (0..3)
        .map(|i| block.argument(i).map(Value::from))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CodegenError::Build { op: "func.func", source })?;
    let fma = block.append_operation(
        OperationBuilder::new("math.fma", location)
            .add_operands(&arguments)
            .add_results(&[f32_type])
            .build()
            .map_err(|source| CodegenError::Build { op: "math.fma", source })?,
    );
    let sum = fma.result(0).map_err(|source| CodegenError::Build { op: "math.fma", source })?;
    block.append_operation(func::r#return(&[sum.into()], location));

    let body = Region::new();
    body.append_block(block);
    let function_type = FunctionType::new(context, &[f32_type; 3], &[f32_type]);
    let module = Module::new(location);
    module.body().append_operation(func::func(
        context,
        StringAttribute::new(context, FMA_SYMBOL),
        TypeAttribute::new(function_type.into()),
        body,
        &[],
        location,
    ));
    verify(context, &module)?;
    Ok(module)
}

/// [`fma_module`] after [`LOWER_TO_LLVM`]: only LLVM-dialect operations remain.
pub fn lowered_fma_module(context: &Context) -> Result<Module<'_>, CodegenError> {
    let mut module = fma_module(context)?;
    run_pass_pipeline(context, &mut module, LOWER_TO_LLVM)?;
    verify(context, &module)?;
    Ok(module)
}

/// Builds `@fma`, lowers it, JIT-compiles it at O3 for the host CPU and returns `a * b + c`
/// computed by the compiled code with a single rounding (so it equals [`f32::mul_add`]).
///
/// Each call makes its own context and engine (tens of milliseconds); this is a toolchain
/// check, not a way to do arithmetic.
pub fn jit_smoke(a: f32, b: f32, c: f32) -> Result<f32, CodegenError> {
    let context = context();
    let module = lowered_fma_module(&context)?;

    // melior's `ExecutionEngine::new` cannot report failure: on a module that does not translate
    // it holds a null engine, and `lookup` on it crashes. Translating once first turns that case
    // into an error (the translation of this module costs microseconds).
    init_native_target()?;
    {
        let llvm = inkwell::context::Context::create();
        translate_to_llvm(&context, &module, &llvm)?;
    }

    let engine = ExecutionEngine::new(&module, JIT_OPT_LEVEL, &[], false, false);
    let symbol = engine.lookup(FMA_SYMBOL);
    if symbol.is_null() {
        return Err(CodegenError::SymbolNotFound(FMA_SYMBOL.to_owned()));
    }
    // SAFETY: `symbol` is the address of `@fma` in `engine`, lowered by convert-func-to-llvm to
    // `float fma(float, float, float)` with the C calling convention; `engine` outlives the call.
    let fma = unsafe { std::mem::transmute::<*mut (), unsafe extern "C" fn(f32, f32, f32) -> f32>(symbol) };
    Ok(unsafe { fma(a, b, c) })
}

/// The LLVM IR (text) of the lowered `@fma` for the host, translated through inkwell.
pub fn fma_llvm_ir() -> Result<String, CodegenError> {
    let context = context();
    let module = lowered_fma_module(&context)?;
    llvm_ir(&context, &module)
}
