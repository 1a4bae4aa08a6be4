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
mod attention_mma;
mod attention_tiled;
mod caps;
mod dynamic;
pub mod elements;
pub mod matmul;
mod mma;
pub mod nvvm;
pub mod plan;
pub mod program;
pub mod ptxas;
pub mod rows;
pub mod scatter;
mod skeleton;
pub mod spirv;
mod tiles;
mod wgmma;

use crate::mlir_text::{Body, Split};
use crate::CodegenError;
pub use caps::{GpuCaps, GpuFlavor, GpuLowering, NvvmTarget};
use kiln_ir::Dim;
use melior::ir::attribute::{ArrayAttribute, AttributeLike, StringAttribute};
use melior::ir::block::BlockLike;
use melior::ir::operation::OperationLike;
use melior::ir::Module;
pub use nvvm::PtxModule;
pub use plan::{GpuPlan, Launch, MmaInstruction, MmaPrecision, Work};
pub use program::{kernels, GpuProgram};
pub use spirv::SpirvModule;

/// What an emitter needs beyond the kernel's operands: the target, which arguments are
/// bound in pieces because they are larger than one binding may cover, and, in a kernel over
/// run-time sizes put in row form, the run's rows.
pub struct GpuCtx<'a> {
    pub caps: &'a GpuCaps,
    pub splits: Vec<(String, Split)>,
    pub run: Option<RunRows>,
}

/// The rows of a kernel in *row form* (`docs/dynamic-shapes.md`, step 6): its operands' leading
/// axes merged into one of `count` rows, a size over the symbols, which the emitter sees at its
/// maximum `max`. Every count the emitter derives from the rows (elements, rows, the product's
/// m) is a multiple of `max`; at run time it is that many times `count`, read from the kernel's
/// `%syms` argument (`n_syms` values).
#[derive(Clone, Debug)]
pub struct RunRows {
    pub count: Dim,
    pub max: usize,
    pub n_syms: usize,
}

impl GpuCtx<'_> {
    /// A fresh body for the kernel's text, knowing the split arguments.
    pub fn body(&self) -> Body {
        Body::for_gpu(self.splits.clone(), self.caps.flavor())
    }

    /// `n`, a count derived from the rows at their maximum, at the run's rows: `None` outside
    /// row form.
    pub(crate) fn at_run(&self, n: usize) -> Result<Option<Dim>, CodegenError> {
        let Some(run) = &self.run else { return Ok(None) };
        if run.max == 0 || !n.is_multiple_of(run.max) {
            return Err(CodegenError::Unsupported(format!(
                "a count of {n} in a kernel over {} rows at most",
                run.max
            )));
        }
        let d =
            run.count.mul(&Dim::Const(n / run.max)).map_err(|e| CodegenError::Unsupported(e.to_string()))?;
        Ok(Some(d))
    }

    /// `n` as an `index` value in `b`: the constant, or (in row form) its size at the run's rows.
    pub(crate) fn count_value(&self, b: &mut Body, n: usize) -> Result<String, CodegenError> {
        match (self.at_run(n)?, &self.run) {
            (Some(d), Some(run)) => Ok(crate::dynamic::size_value(b, &d, run.n_syms)),
            _ => Ok(b.index(n)),
        }
    }

    /// The grid of a plan with `per_group` of `count` units (derived from the rows at their
    /// maximum) per workgroup, folded as [`GpuPlan`] does, at the run's rows; `None` outside
    /// row form.
    pub(crate) fn run_grid(
        &self,
        plan: &GpuPlan,
        count: usize,
        per_group: usize,
    ) -> Result<Option<[Dim; 3]>, CodegenError> {
        match self.at_run(count)? {
            Some(n) => Ok(Some(fold_run(&ceil_div(&n, per_group)?, plan.launch.grid)?)),
            None => Ok(None),
        }
    }
}

/// `⌈n / d⌉` as a size.
pub(crate) fn ceil_div(n: &Dim, d: usize) -> Result<Dim, CodegenError> {
    n.add(&Dim::Const(d.max(1) - 1))
        .and_then(|m| m.floor_div(d.max(1)))
        .map_err(|e| CodegenError::Unsupported(e.to_string()))
}

/// `n` workgroups (a size) in a grid folded at the maximum as `fixed` (`[x, y, 1]`): the same
/// x when the maximum needed a second axis (the kernel numbers workgroups `y·x + x` with that
/// x), else `[n, 1, 1]`.
pub(crate) fn fold_run(n: &Dim, fixed: [u32; 3]) -> Result<[Dim; 3], CodegenError> {
    if fixed[1] <= 1 {
        Ok([n.clone(), Dim::Const(1), Dim::Const(1)])
    } else {
        let x = fixed[0] as usize;
        Ok([Dim::Const(x), ceil_div(n, x)?, Dim::Const(1)])
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
    /// For a kernel over run-time sizes, its grid at the run's symbol values (the plan's is at
    /// their maxima); such a kernel takes the values as its last argument, `%syms`.
    pub run_grid: Option<[Dim; 3]>,
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
