//! From GPU kernels to SPIR-V, in this process: the `gpu.module`s go through MLIR's SPIR-V
//! conversion (storage classes, the `gpu` → `spirv` lowering, the ABI of each entry point),
//! then each resulting `spirv.module` is serialized by `gpu-module-to-binary`, whose
//! `#gpu.object` attribute holds the module's words.

use super::{GpuCaps, GpuKernel};
use crate::context::{capture_diagnostics, context, run_pass_pipeline, verify};
use crate::CodegenError;
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::Module;

/// The SPIR-V version the modules are written for (Vulkan 1.1 consumes it).
pub const SPIRV_VERSION: &str = "1.3";

/// One kernel as SPIR-V.
#[derive(Clone, Debug, PartialEq)]
pub struct SpirvModule {
    /// The kernel symbol, which is also the module's entry point name.
    pub symbol: String,
    /// The binary module (little-endian words).
    pub words: Vec<u8>,
    /// The capabilities the module declares (`Shader`, `Int64`, …).
    pub capabilities: Vec<String>,
    /// The module in MLIR's `spirv` dialect, as serialized.
    pub text: String,
}

/// The MLIR text of a module holding every kernel.
pub fn module_text(kernels: &[GpuKernel]) -> String {
    let mut text = String::from("module attributes {gpu.container_module} {\n");
    for k in kernels {
        text.push_str(&k.mlir);
    }
    text.push_str("}\n");
    text
}

/// The `#spirv.target_env` attribute for `caps`: what the conversion may use. Each module then
/// declares only what it does use (`spirv-update-vce`).
fn target_env(caps: &GpuCaps) -> String {
    let (c, e) = caps.spirv_env();
    format!(
        "#spirv.target_env<#spirv.vce<v{SPIRV_VERSION}, [{}], [{}]>, api=Vulkan, #spirv.resource_limits<>>",
        c.join(", "),
        e.join(", "),
    )
}

/// The conversion from `gpu.module`s (kernels as `gpu.func`) to `spirv.module`s.
///
/// Every `scf.for` becomes an `scf.while` first. MLIR's SCF → SPIR-V conversion passes a
/// loop's results out through function variables: an `scf.for`'s are stored only at the end
/// of a step, so a loop that runs no step at run time leaves them undefined, while an
/// `scf.while`'s are stored in its header, which runs at least once. With the loops rewritten
/// here, no kernel has to guard its loops against running no step.
pub fn lowering_pipeline() -> &'static str {
    "builtin.module(gpu.module(canonicalize,cse,scf-for-to-while),\
map-memref-spirv-storage-class{client-api=vulkan},\
gpu.module(convert-math-to-spirv),convert-gpu-to-spirv,\
spirv.module(spirv-lower-abi-attrs,spirv-update-vce,canonicalize))"
}

/// Lowers `kernels` to SPIR-V for `caps`, one module per kernel, in order.
pub fn compile(kernels: &[GpuKernel], caps: &GpuCaps) -> Result<Vec<SpirvModule>, CodegenError> {
    if kernels.is_empty() {
        return Ok(Vec::new());
    }
    let env = target_env(caps);
    // Each gpu.module carries the target environment twice: as its target, which
    // `convert-gpu-to-spirv` reads, and as the `spirv.target_env` attribute, which
    // `convert-math-to-spirv` reads (without it, that pass assumes a default environment with
    // no Float64, and leaves every f64 `math` op unconverted).
    let text = module_text(kernels);
    let mut with_env = String::with_capacity(text.len() + kernels.len() * env.len());
    for line in text.lines() {
        match line.strip_prefix("gpu.module @").and_then(|rest| rest.strip_suffix(" {")) {
            Some(name) => with_env.push_str(&format!(
                "gpu.module @{name} [{env}] attributes {{spirv.target_env = {env}}} {{\n"
            )),
            None => {
                with_env.push_str(line);
                with_env.push('\n');
            }
        }
    }
    let context = context();
    let (module, diagnostics) = capture_diagnostics(&context, || Module::parse(&context, &with_env));
    let mut module = module.ok_or(CodegenError::MlirParse { diagnostics })?;
    verify(&context, &module)?;
    run_pass_pipeline(&context, &mut module, lowering_pipeline())?;

    // The converted modules, by kernel symbol.
    let mut converted: Vec<(String, String)> = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        if o.name().as_string_ref().as_str() == Ok("spirv.module") {
            let name = super::sym_name(&o);
            let symbol = name.strip_prefix("__spv__").unwrap_or(&name).to_string();
            converted.push((symbol, o.to_string()));
        }
        op = o.next_in_block();
    }
    let mut out = Vec::with_capacity(kernels.len());
    let mut wrapped = String::from("module attributes {gpu.container_module} {\n");
    let mut texts = Vec::with_capacity(kernels.len());
    for k in kernels {
        let (_, spv) = converted.iter().find(|(s, _)| *s == k.symbol).ok_or_else(|| {
            CodegenError::Unsupported(format!(
                "kernel `{}`: the SPIR-V conversion produced no module",
                k.symbol
            ))
        })?;
        wrapped.push_str(&format!("gpu.module @{} [{env}] {{\n{spv}\n}}\n", k.symbol));
        texts.push(spv.clone());
    }
    wrapped.push_str("}\n");
    let (binary, diagnostics) = capture_diagnostics(&context, || Module::parse(&context, &wrapped));
    let mut binary = binary.ok_or(CodegenError::MlirParse { diagnostics })?;
    run_pass_pipeline(&context, &mut binary, "builtin.module(gpu-module-to-binary)")?;
    let words = super::binary_objects(&binary)?;
    for (k, text) in kernels.iter().zip(texts) {
        let bytes = words.iter().find(|(s, _)| *s == k.symbol).map(|(_, w)| w.clone()).ok_or_else(|| {
            CodegenError::Unsupported(format!("kernel `{}`: serialization produced no binary", k.symbol))
        })?;
        if bytes.len() < 20 || bytes.len() % 4 != 0 || bytes[..4] != 0x0723_0203u32.to_le_bytes() {
            return Err(CodegenError::Unsupported(format!(
                "kernel `{}`: the serialized SPIR-V is malformed",
                k.symbol
            )));
        }
        out.push(SpirvModule {
            symbol: k.symbol.clone(),
            words: bytes,
            capabilities: declared_capabilities(&text),
            text,
        });
    }
    Ok(out)
}

/// The capabilities in a `spirv.module ... requires #spirv.vce<v1.3, [A, B], [..]>` header.
fn declared_capabilities(text: &str) -> Vec<String> {
    let Some(start) = text.find("#spirv.vce<") else { return Vec::new() };
    let rest = &text[start..];
    let (Some(open), Some(close)) = (rest.find('['), rest.find(']')) else { return Vec::new() };
    rest[open + 1..close].split(',').map(|c| c.trim().to_string()).filter(|c| !c.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A loop over a run-time count carrying a sum: its result must be stored where the loop
    /// decides whether to run a step, so that a count of 0 leaves the initial value, not an
    /// undefined one.
    #[test]
    fn loop_results_are_stored_before_the_loop_may_exit() {
        let env = target_env(&GpuCaps::vulkan());
        let buffer = "memref<4xf32, #spirv.storage_class<StorageBuffer>>";
        let text = format!(
            "module attributes {{gpu.container_module}} {{
gpu.module @k [{env}] {{
gpu.func @k(%a: {buffer}, %n: index) kernel attributes {{spirv.entry_point_abi = #spirv.entry_point_abi<workgroup_size = [1, 1, 1]>}} {{
  %c0 = arith.constant 0 : index
  %c1 = arith.constant 1 : index
  %init = arith.constant 7.0 : f32
  %sum = scf.for %i = %c0 to %n step %c1 iter_args(%acc = %init) -> (f32) {{
    %x = memref.load %a[%i] : {buffer}
    %s = arith.addf %acc, %x : f32
    scf.yield %s : f32
  }}
  memref.store %sum, %a[%c0] : {buffer}
  gpu.return
}}
}}
}}"
        );
        let context = context();
        let mut module = Module::parse(&context, &text).expect("the kernel parses");
        run_pass_pipeline(&context, &mut module, lowering_pipeline()).expect("the kernel lowers");
        let lowered = module.as_operation().to_string();
        let from_loop = &lowered[lowered.find("spirv.mlir.loop").expect("a loop")..];
        let stored = from_loop.find("spirv.Store \"Function\"").expect("the sum is stored");
        let exit = from_loop.find("spirv.BranchConditional").expect("the loop's exit");
        assert!(stored < exit, "the sum is stored only after a step has run:\n{from_loop}");
    }

    #[test]
    fn capabilities_are_read_from_the_module_header() {
        let text = "spirv.module @__spv__k0 Logical GLSL450 requires #spirv.vce<v1.3, [Shader, Int64], [SPV_KHR_storage_buffer_storage_class]> {";
        assert_eq!(super::declared_capabilities(text), vec!["Shader".to_string(), "Int64".to_string()]);
    }
}
