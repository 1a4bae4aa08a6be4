//! From GPU kernels to PTX, in this process: each `gpu.module` gets an `#nvvm.target` for the
//! architecture, the kernels go through MLIR's NVVM conversion (math and arithmetic to LLVM
//! intrinsics first, so nothing calls NVIDIA's libdevice; memrefs passed as bare pointers, so
//! a kernel parameter is one device pointer), and `gpu-module-to-binary` runs LLVM's NVPTX
//! backend, leaving each module's PTX text in its `#gpu.object`.

use super::{GpuKernel, NvvmTarget};
use crate::context::{capture_diagnostics, context, run_pass_pipeline, verify};
use crate::CodegenError;
use melior::ir::Module;

/// One kernel as PTX.
#[derive(Clone, Debug, PartialEq)]
pub struct PtxModule {
    /// The kernel symbol: the `.entry` the module defines.
    pub symbol: String,
    /// The PTX text (no trailing NUL).
    pub ptx: String,
}

/// The conversion from `gpu.module`s (kernels as `gpu.func`) to NVVM/LLVM dialect modules.
/// `convert-math-to-llvm` runs before `convert-gpu-to-nvvm`, which would otherwise turn FMAs,
/// absolute values and sign copies into libdevice calls; square roots and roundings are
/// already LLVM intrinsic calls in the kernel text ([`crate::mlir_text::Body::exact`]).
pub fn lowering_pipeline() -> &'static str {
    "builtin.module(gpu.module(canonicalize,cse,convert-scf-to-cf,convert-math-to-llvm,\
convert-gpu-to-nvvm{index-bitwidth=32 use-bare-ptr-memref-call-conv=1},canonicalize,cse),reconcile-unrealized-casts)"
}

/// The `#nvvm.target` attribute for `target`.
fn target_attr(target: &NvvmTarget) -> String {
    format!(
        "#nvvm.target<O = 3, chip = \"{}\", features = \"+ptx{}{}\">",
        target.arch(),
        target.ptx_version[0],
        target.ptx_version[1]
    )
}

/// The lowered modules' text, before PTX is generated (`kiln inspect --stage nvvm`).
pub fn lower_text(kernels: &[GpuKernel], target: &NvvmTarget) -> Result<String, CodegenError> {
    let context = context();
    let module = lowered(&context, kernels, target)?;
    Ok(module.as_operation().to_string())
}

/// Parses `kernels` with the target attached and lowers them to the NVVM/LLVM dialects,
/// refusing any kernel that still calls a library function.
fn lowered<'c>(
    context: &'c melior::Context,
    kernels: &[GpuKernel],
    target: &NvvmTarget,
) -> Result<Module<'c>, CodegenError> {
    let attr = target_attr(target);
    let mut text = String::from("module attributes {gpu.container_module} {\n");
    for k in kernels {
        for line in k.mlir.lines() {
            match line.strip_prefix("gpu.module @").and_then(|rest| rest.strip_suffix(" {")) {
                Some(name) => text.push_str(&format!("gpu.module @{name} [{attr}] {{\n")),
                None => {
                    text.push_str(line);
                    text.push('\n');
                }
            }
        }
    }
    text.push_str("}\n");
    let (module, diagnostics) = capture_diagnostics(context, || Module::parse(context, &text));
    let mut module = module.ok_or(CodegenError::MlirParse { diagnostics })?;
    verify(context, &module)?;
    run_pass_pipeline(context, &mut module, lowering_pipeline())?;
    refuse_library_calls(&module.as_operation().to_string())?;
    Ok(module)
}

/// Refuses lowered kernels that call a function no module defines (a libdevice `__nv_*` math
/// function, `malloc` for an array that should have been workgroup memory): PTX generation
/// would succeed and the CUDA driver would refuse the module at load, far from the cause.
fn refuse_library_calls(lowered: &str) -> Result<(), CodegenError> {
    let mut current = "";
    for line in lowered.lines() {
        let t = line.trim_start();
        if let Some(rest) = t.strip_prefix("gpu.module @") {
            current = rest.split([' ', '[']).next().unwrap_or("");
        }
        if let Some(rest) = t.strip_prefix("llvm.func @") {
            if !line.trim_end().ends_with('{') {
                let name = rest.split('(').next().unwrap_or(rest);
                return Err(CodegenError::Unsupported(format!(
                    "kernel `{current}` calls `{name}`, which the CUDA target does not link (no libdevice, no allocator)"
                )));
            }
        }
    }
    Ok(())
}

/// Lowers `kernels` to PTX for `target`, one module per kernel, in order.
pub fn compile(kernels: &[GpuKernel], target: &NvvmTarget) -> Result<Vec<PtxModule>, CodegenError> {
    if kernels.is_empty() {
        return Ok(Vec::new());
    }
    let context = context();
    let mut module = lowered(&context, kernels, target)?;
    run_pass_pipeline(&context, &mut module, "builtin.module(gpu-module-to-binary{format=isa})")?;
    let objects = super::binary_objects(&module)?;
    let mut out = Vec::with_capacity(kernels.len());
    for k in kernels {
        let bytes =
            objects.iter().find(|(s, _)| *s == k.symbol).map(|(_, b)| b.clone()).ok_or_else(|| {
                CodegenError::Unsupported(format!("kernel `{}`: PTX generation produced no module", k.symbol))
            })?;
        let ptx = String::from_utf8(bytes).map_err(|_| {
            CodegenError::Unsupported(format!("kernel `{}`: the generated PTX is not text", k.symbol))
        })?;
        let ptx = ptx.trim_end_matches('\0').to_string();
        if !ptx.contains(&format!(".entry {}(", k.symbol)) {
            return Err(CodegenError::Unsupported(format!(
                "kernel `{}`: the generated PTX has no entry of that name",
                k.symbol
            )));
        }
        out.push(PtxModule { symbol: k.symbol.clone(), ptx });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::GpuFlavor;
    use crate::mlir_text::Body;

    /// The math functions' range reductions hold only if the operations written as exact
    /// ([`Body::fadd_exact`], [`Body::fmul_exact`], [`Body::fma_exact`]) reach the GPU rounded
    /// one by one. PTX's `add.f64` and `mul.f64` leave `ptxas` free to fuse a product into a
    /// later add; `add.rn` and `mul.rn` do not. So the exact operations must come out with the
    /// rounding written, while products flagged `contract` may become FMAs.
    #[test]
    fn exact_operations_keep_their_rounding_in_ptx() {
        for ty in ["f32", "f64"] {
            let mut b = Body::for_gpu(Vec::new(), GpuFlavor::Nvvm);
            let c = |b: &mut Body, i: usize| {
                let i = b.index(i);
                b.assign(format!("memref.load %p[{i}] : memref<8x{ty}>"))
            };
            let (x, y, z) = (c(&mut b, 0), c(&mut b, 1), c(&mut b, 2));
            let exact = b.fmul_exact(&x, &y, ty);
            let exact = b.fadd_exact(&exact, &z, ty);
            let fused = b.fma_exact(&x, &y, &z, ty);
            let free = b.fmul(&x, &z, ty);
            let free = b.fadd(&free, &y, ty);
            for (i, v) in [exact, fused, free].iter().enumerate() {
                let at = b.index(3 + i);
                b.line(format!("memref.store {v}, %p[{at}] : memref<8x{ty}>"));
            }
            let text = format!(
                "module attributes {{gpu.container_module}} {{
gpu.module @k [{attr}] {{
gpu.func @k(%p: memref<8x{ty}>) kernel {{
{body}  gpu.return
}}
}}
}}",
                attr = target_attr(&NvvmTarget::by_arch("sm_90").expect("sm_90")),
                body = b.finish()
            );
            let context = context();
            let mut module = Module::parse(&context, &text).expect("the kernel parses");
            run_pass_pipeline(&context, &mut module, lowering_pipeline()).expect("the kernel lowers");
            run_pass_pipeline(&context, &mut module, "builtin.module(gpu-module-to-binary{format=isa})")
                .expect("PTX is generated");
            let objects = crate::gpu::binary_objects(&module).expect("one object");
            let ptx = String::from_utf8_lossy(&objects[0].1).to_string();
            let count = |op: &str| ptx.matches(&format!("\t{op}.{ty} ")).count();
            assert_eq!(
                (count("mul.rn"), count("add.rn"), count("fma.rn"), count("mul"), count("add")),
                (1, 1, 2, 0, 0),
                "{ty}: the exact product and sum rounded as written, the exact FMA and the free pair \
                 as FMAs, no operation left for ptxas to fuse:\n{ptx}"
            );
        }
    }
}
