//! From kernels (MLIR text) to machine code: one MLIR module, lowered to the LLVM dialect,
//! translated into an LLVM module, given its C entry points, optimized at O3 for the target
//! machine, then emitted as an object file and linked into a shared object.

use crate::{
    context::{capture_diagnostics, context, run_pass_pipeline, verify},
    kernel::Kernel,
    llvm::translate_to_llvm,
    target::Target,
    CodegenError,
};
use inkwell::{
    context::Context as LlvmContext,
    module::{Linkage, Module as LlvmModule},
    passes::PassBuilderOptions,
    targets::{
        CodeModel, FileType, InitializationConfig, RelocMode, Target as LlvmTarget, TargetMachine,
        TargetTriple,
    },
    AddressSpace, OptimizationLevel,
};
use melior::ir::Module;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// Lowers the kernels' dialects (scf, vector, memref, math, arith) to the LLVM dialect. Memref
/// arguments become bare pointers: every buffer has a static shape and identity layout. Math
/// ops with an LLVM intrinsic become intrinsics; the rest (erf, tanh on f64) libm calls.
pub const LOWER_KERNELS: &str = "builtin.module(canonicalize,cse,convert-vector-to-scf,\
convert-linalg-to-loops,expand-strided-metadata,lower-affine,convert-scf-to-cf,\
func.func(convert-math-to-llvm),convert-math-to-libm,convert-vector-to-llvm,finalize-memref-to-llvm,\
convert-arith-to-llvm,convert-ub-to-llvm,convert-cf-to-llvm,convert-index-to-llvm,\
convert-func-to-llvm{use-bare-ptr-memref-call-conv=1},reconcile-unrealized-casts)";

/// The MLIR module text holding every kernel.
pub fn module_text(kernels: &[Kernel]) -> String {
    let mut text = String::from("module {\n");
    for k in kernels {
        text.push_str(&k.mlir);
        if !k.mlir.ends_with('\n') {
            text.push('\n');
        }
    }
    text.push_str("}\n");
    text
}

/// Parses `text` into `module` form, reporting MLIR's diagnostics on failure.
fn parse_module<'c>(context: &'c melior::Context, text: &str) -> Result<Module<'c>, CodegenError> {
    let (module, diagnostics) = capture_diagnostics(context, || Module::parse(context, text));
    module.ok_or(CodegenError::MlirParse { diagnostics })
}

/// Initializes every LLVM target once (cross-compilation needs more than the native one).
fn init_targets() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| LlvmTarget::initialize_all(&InitializationConfig::default()));
}

fn target_machine(target: &dyn Target) -> Result<TargetMachine, CodegenError> {
    init_targets();
    let triple = TargetTriple::create(target.triple());
    LlvmTarget::from_triple(&triple)
        .map_err(|e| CodegenError::Target(e.to_string()))?
        .create_target_machine(
            &triple,
            target.cpu(),
            target.features(),
            OptimizationLevel::Aggressive,
            RelocMode::PIC,
            CodeModel::Default,
        )
        .ok_or_else(|| CodegenError::Target(format!("LLVM has no target machine for {}", target.triple())))
}

/// Compiled kernels: the optimized LLVM IR and the object file for the target.
pub struct Compiled {
    /// The MLIR module text before lowering.
    pub mlir: String,
    /// LLVM IR after O3 (what `kiln inspect --stage llvm` shows).
    pub llvm_ir: String,
    /// The relocatable object (ELF for the target).
    pub object: Vec<u8>,
}

/// Lowers, translates, optimizes and emits `kernels` for `target`.
pub fn compile(kernels: &[Kernel], target: &dyn Target) -> Result<Compiled, CodegenError> {
    compile_with_contract(kernels, target, None)
}

/// [`compile`], and when `contract` is given, exports it as the constant `u64`
/// [`kiln_runtime::CONTRACT_SYMBOL`]: the digest of the manifest the kernels are compiled for
/// ([`kiln_runtime::Manifest::contract`]), which the runtime compares with the manifest it
/// loads, so an edited manifest never reaches this code.
pub fn compile_with_contract(
    kernels: &[Kernel],
    target: &dyn Target,
    contract: Option<u64>,
) -> Result<Compiled, CodegenError> {
    let mlir = module_text(kernels);
    let context = context();
    let mut module = parse_module(&context, &mlir)?;
    verify(&context, &module)?;
    run_pass_pipeline(&context, &mut module, LOWER_KERNELS)?;

    let machine = target_machine(target)?;
    let llvm = LlvmContext::create();
    let llvm_module = translate_to_llvm(&context, &module, &llvm)?;
    add_entries(&llvm, &llvm_module, kernels)?;
    if let Some(contract) = contract {
        let i64t = llvm.i64_type();
        let global = llvm_module.add_global(i64t, None, kiln_runtime::CONTRACT_SYMBOL);
        global.set_initializer(&i64t.const_int(contract, false));
        global.set_constant(true);
        global.set_linkage(Linkage::External);
    }
    let triple = TargetTriple::create(target.triple());
    llvm_module.set_triple(&triple);
    llvm_module.set_data_layout(&machine.get_target_data().get_data_layout());
    llvm_module.verify().map_err(|e| CodegenError::LlvmVerify(e.to_string()))?;
    llvm_module
        .run_passes("default<O3>", &machine, PassBuilderOptions::create())
        .map_err(|e| CodegenError::Llvm(e.to_string()))?;
    let llvm_ir = llvm_module.print_to_string().to_string();
    let object = machine
        .write_to_memory_buffer(&llvm_module, FileType::Object)
        .map_err(|e| CodegenError::Llvm(e.to_string()))?
        .as_slice()
        .to_vec();
    Ok(Compiled { mlir, llvm_ir, object })
}

/// Adds `void kiln_{symbol}(void **bufs, const i64 *syms, i64 begin, i64 end)` for every
/// kernel: it loads the buffer pointers and calls the kernel, which becomes internal (and is
/// inlined into it). `syms` holds the run's symbol values: a kernel over symbolic extents
/// takes it as its last argument before `begin` (`crate::dynamic::SYMS_ARG`); kernels of
/// static shapes ignore it.
fn add_entries<'l>(
    llvm: &'l LlvmContext,
    module: &LlvmModule<'l>,
    kernels: &[Kernel],
) -> Result<(), CodegenError> {
    let ptr = llvm.ptr_type(AddressSpace::default());
    let i64t = llvm.i64_type();
    let entry_type = llvm.void_type().fn_type(&[ptr.into(), ptr.into(), i64t.into(), i64t.into()], false);
    let builder = llvm.create_builder();
    let err = |e: inkwell::builder::BuilderError| CodegenError::Llvm(e.to_string());
    for k in kernels {
        let inner =
            module.get_function(&k.symbol).ok_or_else(|| CodegenError::SymbolNotFound(k.symbol.clone()))?;
        inner.set_linkage(Linkage::Internal);
        let n = inner.count_params() as usize;
        if n < 2 {
            return Err(CodegenError::Llvm(format!("kernel `{}` lacks its begin/end arguments", k.symbol)));
        }
        let entry = module.add_function(&Kernel::entry(&k.symbol), entry_type, None);
        let block = llvm.append_basic_block(entry, "entry");
        builder.position_at_end(block);
        let bufs = entry.get_nth_param(0).expect("entry has 4 params").into_pointer_value();
        let takes_syms = k.mlir.contains(&format!("{}: ", crate::dynamic::SYMS_ARG));
        if takes_syms && n < 3 {
            return Err(CodegenError::Llvm(format!("kernel `{}` lacks its syms argument", k.symbol)));
        }
        let buffers = n - 2 - usize::from(takes_syms);
        let mut args = Vec::with_capacity(n);
        for i in 0..buffers {
            // SAFETY (of the generated code): the runtime passes one pointer per buffer argument.
            let slot = unsafe { builder.build_gep(ptr, bufs, &[i64t.const_int(i as u64, false)], "slot") }
                .map_err(err)?;
            let p = builder.build_load(ptr, slot, "buf").map_err(err)?;
            args.push(p.into());
        }
        if takes_syms {
            args.push(entry.get_nth_param(1).expect("syms").into());
        }
        args.push(entry.get_nth_param(2).expect("begin").into());
        args.push(entry.get_nth_param(3).expect("end").into());
        builder.build_call(inner, &args, "").map_err(err)?;
        builder.build_return(None).map_err(err)?;
    }
    Ok(())
}

/// Links `object` into the shared object `out` for `target`: with the system C compiler when
/// the target is this machine's architecture (libm linked for the few calls left to it),
/// otherwise with `ld.lld-22` (cross; libm symbols stay for the target's loader to bind).
pub fn link_shared(object: &[u8], target: &dyn Target, out: &Path) -> Result<(), CodegenError> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let obj_path = dir.join(format!(
        ".{}.o",
        out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    ));
    std::fs::write(&obj_path, object)
        .map_err(|e| CodegenError::Link(format!("{}: {e}", obj_path.display())))?;
    let native = target.triple().split('-').next() == Some(std::env::consts::ARCH);
    let mut command = if native {
        let mut c = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".into()));
        c.arg("-shared").arg("-o").arg(out).arg(&obj_path).arg("-lm");
        c
    } else {
        let mut c = Command::new("ld.lld-22");
        c.arg("-shared").arg("-o").arg(out).arg(&obj_path);
        c
    };
    let result = command.output();
    let _ = std::fs::remove_file(&obj_path);
    let output = result.map_err(|e| CodegenError::Link(format!("cannot run the linker: {e}")))?;
    if !output.status.success() {
        return Err(CodegenError::Link(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    Ok(())
}
