//! The GPU kernel layer, shared by every GPU target: per-kernel plans chosen from the target's
//! capabilities ([`GpuCaps`], data), rendered as `gpu.func` MLIR, lowered per target (SPIR-V
//! for Vulkan in [`spirv`]).
//!
//! The split mirrors the CPU side: kiln-sched's schedule is target-independent; [`program`]
//! shapes each scheduled kernel's operands (the same views the CPU emitters get) and picks a
//! [`GpuPlan`]; the emitters ([`elements`], [`rows`], [`matmul`], [`attention`], [`scatter`]) render it.
//! A GPU kernel's contract: one `gpu.module @kN` holding `gpu.func @kN(%a0: memref<…>, …)
//! kernel` whose arguments are its buffers in the step's argument order (inputs, then the
//! output), bound as storage buffers 0..n of descriptor set 0, with the plan's workgroup size
//! as its entry-point ABI; the dispatch is the plan's [`Launch`].

pub mod attention;
mod caps;
pub mod elements;
pub mod matmul;
pub mod nvvm;
pub mod plan;
pub mod program;
pub mod ptxas;
pub mod rows;
pub mod scatter;
mod skeleton;
pub mod spirv;
mod tiles;

use crate::mlir_text::{Body, Split};
use crate::CodegenError;
pub use caps::{GpuCaps, GpuFlavor, GpuLowering, NvvmTarget};
use melior::ir::attribute::{ArrayAttribute, AttributeLike, StringAttribute};
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
pub use nvvm::PtxModule;
pub use plan::{GpuPlan, Launch, MmaPrecision, Work};
pub use program::{kernels, GpuProgram};
pub use spirv::SpirvModule;

/// What an emitter needs beyond the kernel's operands: the target, and which arguments are
/// bound in pieces because they are larger than one binding may cover.
pub struct GpuCtx<'a> {
    pub caps: &'a GpuCaps,
    pub splits: Vec<(String, Split)>,
}

impl GpuCtx<'_> {
    /// A fresh body for the kernel's text, knowing the split arguments.
    pub fn body(&self) -> Body {
        Body::for_gpu(self.splits.clone(), self.caps.flavor())
    }
}

/// One generated GPU kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuKernel {
    /// Symbol of the `gpu.module` and of its kernel `gpu.func` (`k12`).
    pub symbol: String,
    /// The `gpu.module` text, preceded by its plan as a comment.
    pub mlir: String,
    /// How the work is divided, and the dispatch.
    pub plan: GpuPlan,
    /// Estimated floating-point operations of the whole kernel.
    pub flops: u64,
    /// Estimated bytes the whole kernel reads and writes.
    pub bytes: u64,
}

/// The serialized object of every `gpu.binary` in `module` (what `gpu-module-to-binary`
/// leaves), by symbol: SPIR-V words, or PTX text.
pub(crate) fn binary_objects(module: &Module) -> Result<Vec<(String, Vec<u8>)>, CodegenError> {
    let mut objects: Vec<(String, Vec<u8>)> = Vec::new();
    let mut op = module.body().first_operation();
    while let Some(o) = op {
        if o.name().as_string_ref().as_str() == Ok("gpu.binary") {
            let name = sym_name(&o);
            let object = o
                .attribute("objects")
                .ok()
                .and_then(|a| ArrayAttribute::try_from(a).ok())
                .and_then(|a| a.element(0).ok())
                .ok_or_else(|| CodegenError::Unsupported(format!("kernel `{name}`: no serialized object")))?;
            // SAFETY: `object` is a live attribute of `module`, which outlives this call, and
            // the returned string reference points into the attribute's storage.
            let bytes = unsafe {
                let raw = object.to_raw();
                if !mlir_sys::mlirAttributeIsAGPUObjectAttr(raw) {
                    return Err(CodegenError::Unsupported(format!("kernel `{name}`: not a GPU object")));
                }
                let s = mlir_sys::mlirGPUObjectAttrGetObject(raw);
                std::slice::from_raw_parts(s.data as *const u8, s.length).to_vec()
            };
            objects.push((name, bytes));
        }
        op = o.next_in_block();
    }
    Ok(objects)
}

/// An operation's `sym_name`, or `""`.
pub(crate) fn sym_name<'c: 'a, 'a>(op: &impl OperationLike<'c, 'a>) -> String {
    op.attribute("sym_name")
        .ok()
        .and_then(|a| StringAttribute::try_from(a).ok())
        .map(|s| s.value().to_string())
        .unwrap_or_default()
}
