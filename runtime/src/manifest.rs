//! The artifact manifest: the contract between the compiler, which writes `manifest.ron`, and
//! the runtime, which reads it. Every field is checked at load, so a run never meets a surprise.

use serde::{Deserialize, Serialize};

use crate::error::RuntimeError;
use crate::symbols::{Dim, SizeFactor, SizeTerm, SymbolSpec};

/// The manifest's file name inside an artifact directory.
pub const MANIFEST_FILE: &str = "manifest.ron";
/// The shared object holding one entry symbol per step (CPU targets).
pub const KERNELS_FILE: &str = "kernels.so";
/// The SPIR-V modules of a Vulkan artifact, one after another ([`Manifest::modules`] says
/// where each one lies).
pub const SPIRV_FILE: &str = "kernels.spv";
/// The PTX modules of a CUDA artifact, one after another as text ([`Manifest::modules`] says
/// where each one lies); the driver compiles them for the device at load.
pub const PTX_FILE: &str = "kernels.ptx";
/// The same modules assembled for the target's exact architecture, when the compiler had
/// `ptxas` ([`CudaTarget::cubins`] says where each lies); loaded instead of the PTX on a device
/// of that architecture.
pub const CUBIN_FILE: &str = "kernels.cubin";
/// The parameters and constants, memory-mapped at load.
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// Everything the runtime needs to bind and run a compiled model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Must equal [`crate::ARTIFACT_FORMAT_VERSION`].
    pub format_version: u32,
    /// The model's name.
    pub model: String,
    /// The compiler version that wrote the artifact.
    pub kiln_version: String,
    /// The machine the kernels were compiled for.
    pub target: Target,
    /// Sizes each run binds from its inputs' shapes (a batch size, a sequence length), which
    /// the extents of inputs, outputs and step ranges may be written over; empty for a model
    /// whose shapes are all fixed.
    pub symbols: Vec<SymbolSpec>,
    /// Graph inputs, in the order callers pass them.
    pub inputs: Vec<TensorSpec>,
    /// For each input (same order; empty when none is known), the bound stand-in values must
    /// stay below when the input indexes a table, so `kiln run` fills a missing input as
    /// `kiln eval` does; and every run refuses an input value outside `0..bound` (negative ones
    /// included) before any kernel runs, with the interpreter's gather error, on every device.
    pub index_bounds: Vec<Option<u64>>,
    /// Graph outputs, in the order they are returned.
    pub outputs: Vec<TensorSpec>,
    /// Size of the one scratch arena holding every intermediate (offsets aligned to 64 bytes
    /// on a CPU, to [`VulkanTarget::buffer_align`] on Vulkan).
    pub arena_bytes: u64,
    /// Size and crc32 of the kernels file ([`KERNELS_FILE`], [`SPIRV_FILE`] or [`PTX_FILE`] and
    /// [`CUBIN_FILE`]) and `weights.safetensors`.
    pub files: Vec<FileDigest>,
    /// Where each GPU module lies in [`SPIRV_FILE`] or [`PTX_FILE`]; empty for a CPU artifact.
    pub modules: Vec<ModuleRange>,
    /// Kernel launches, in execution order.
    pub steps: Vec<Step>,
    /// Persistent state: tensors kept in the arena from one run to the next (a train step's
    /// parameters and optimizer state), read and written by the steps in place; empty for a
    /// model that keeps nothing between runs.
    pub state: Vec<StateSpec>,
    /// Entry points besides the first, `forward` (whose inputs, outputs and steps are the
    /// fields above): each its own steps over the same arena and state (`train_step`).
    pub entries: Vec<Entry>,
    /// The fault words of `forward` and the ops that report into them; `None` when none of
    /// its kernels can fault.
    pub faults: Option<Faults>,
}

/// The name of the entry point the top-level inputs, outputs and steps of a manifest form.
pub const FORWARD_ENTRY: &str = "forward";

/// One persistent tensor: a slot of the arena that no scratch buffer shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSpec {
    /// The name `read_state` and `write_state` take (a checkpoint name).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Static shape, outermost first.
    pub shape: Vec<u64>,
    /// Byte offset of its slot in the arena (aligned as every arena offset).
    pub offset: u64,
    /// Its value when the model is loaded.
    pub init: StateInit,
}

/// Where a state slot's value comes from at load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateInit {
    /// Zeros (optimizer moments, the step count).
    Zeros,
    /// A tensor of `weights.safetensors` of the slot's size (a parameter's initial value).
    Weight {
        /// Its name in the weights file.
        name: String,
    },
}

/// An entry point besides `forward`: its own interface and steps, over the model's arena and
/// state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The name callers pass to `Model::run_entry`.
    pub name: String,
    /// Its inputs, in the order callers pass them.
    pub inputs: Vec<TensorSpec>,
    /// As [`Manifest::index_bounds`], for these inputs.
    pub index_bounds: Vec<Option<u64>>,
    /// Its outputs, in the order they are returned.
    pub outputs: Vec<TensorSpec>,
    /// Its kernel launches, in execution order (labelled `k0 …` from its own first step).
    pub steps: Vec<Step>,
    /// Its fault words and sites (numbered by its own steps), as [`Manifest::faults`].
    pub faults: Option<Faults>,
}

/// An entry point's interface and steps as a manifest holds them (the first, `forward`, in
/// the manifest's own fields; the others in [`Manifest::entries`]).
#[derive(Debug, Clone, Copy)]
pub struct EntryView<'a> {
    /// The entry point's name.
    pub name: &'a str,
    /// Its inputs.
    pub inputs: &'a [TensorSpec],
    /// The index bound of each input (or none at all).
    pub index_bounds: &'a [Option<u64>],
    /// Its outputs.
    pub outputs: &'a [TensorSpec],
    /// Its steps.
    pub steps: &'a [Step],
    /// Its fault words and sites.
    pub faults: Option<&'a Faults>,
}

impl Manifest {
    /// Every entry point, `forward` first.
    pub fn entry_views(&self) -> Vec<EntryView<'_>> {
        let forward = EntryView {
            name: FORWARD_ENTRY,
            inputs: &self.inputs,
            index_bounds: &self.index_bounds,
            outputs: &self.outputs,
            steps: &self.steps,
            faults: self.faults.as_ref(),
        };
        std::iter::once(forward)
            .chain(self.entries.iter().map(|e| EntryView {
                name: &e.name,
                inputs: &e.inputs,
                index_bounds: &e.index_bounds,
                outputs: &e.outputs,
                steps: &e.steps,
                faults: e.faults.as_ref(),
            }))
            .collect()
    }
}

impl StateSpec {
    /// Size of the slot's tensor in bytes, or `None` if it overflows `u64`.
    pub fn byte_len(&self) -> Option<u64> {
        shape_bytes(self.dtype, &self.shape)
    }
}

/// Where compiled kernels record the faults the interpreter reports as errors (an integer
/// division by zero), and what each recording site is, so a run that faulted fails with the
/// interpreter's words. The words are `1 + sites.len()` little-endian `u32`s in the arena:
/// word 0 the lowest site that faulted (sites are numbered in step order), word `1 + s` the
/// lowest element at which site `s` faulted; `u32::MAX` is "none". Every step that can fault
/// passes exactly this range as its last argument; the runtime fills it with `u32::MAX` before
/// each run and reads it after.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Faults {
    /// Byte offset of word 0 in the arena (aligned like every arena offset).
    pub offset: u64,
    /// The sites, in the order of their numbers.
    pub sites: Vec<FaultSite>,
}

/// One op whose compiled code records a fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSite {
    /// What faults there.
    pub kind: FaultKind,
    /// The step (index into its entry point's steps) whose kernel holds the op.
    pub step: u32,
    /// The op's name (`div`), and its spec name and position when it has them, which the
    /// error shows as the interpreter shows a node.
    pub op: String,
    /// The spec name bound to the op's value.
    pub name: Option<String>,
    /// `file:line:col` of the op in the spec.
    pub origin: Option<String>,
    /// The op's result shape: elements are recorded as row-major positions in it.
    pub shape: Vec<u64>,
    /// The divisor's shape, which broadcasts to `shape`; the error names the divisor element,
    /// as the interpreter does.
    pub divisor: Vec<u64>,
}

/// The kinds of fault compiled code records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FaultKind {
    /// An integer division whose divisor was zero (the quotient is 0, the run an error).
    IntDivByZero,
}

/// What runs the artifact's kernels, and what they need from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    /// Native code in [`KERNELS_FILE`] for a CPU.
    Cpu(TargetInfo),
    /// SPIR-V compute shaders in [`SPIRV_FILE`], run through Vulkan.
    Vulkan(VulkanTarget),
    /// PTX modules in [`PTX_FILE`] (and cubins in [`CUBIN_FILE`]), run through the CUDA driver.
    Cuda(CudaTarget),
}

impl Target {
    /// The artifact this target makes, as a refusal names it: `a CUDA artifact (compiled for
    /// sm_90)`.
    pub(crate) fn artifact_name(&self) -> String {
        match self {
            Target::Cpu(cpu) => format!("a CPU artifact (compiled for {})", cpu.triple),
            Target::Vulkan(v) => format!("a Vulkan artifact (SPIR-V {})", v.spirv_version),
            Target::Cuda(c) => format!("a CUDA artifact (compiled for {})", c.arch()),
        }
    }

    /// The device selector that runs this target's artifacts.
    pub(crate) fn device_kind(&self) -> &'static str {
        match self {
            Target::Cpu(_) => "cpu",
            Target::Vulkan(_) => "vulkan",
            Target::Cuda(_) => "cuda",
        }
    }

    /// One line naming the target, for logs and the CLI (`x86_64-unknown-linux-gnu (znver3)`,
    /// `vulkan (SPIR-V 1.3)`).
    pub fn describe(&self) -> String {
        match self {
            Target::Cpu(cpu) => format!("{} ({})", cpu.triple, cpu.cpu),
            Target::Vulkan(v) => format!("vulkan (SPIR-V {})", v.spirv_version),
            Target::Cuda(c) if c.tensor_cores.is_empty() => {
                format!("cuda ({}, PTX {})", c.arch(), c.ptx_version)
            }
            Target::Cuda(c) => format!(
                "cuda ({}, PTX {}, tensor cores: {})",
                c.arch(),
                c.ptx_version,
                c.tensor_cores.join(", ")
            ),
        }
    }
}

/// A CUDA target: the NVIDIA architecture the modules were compiled for and what they need of
/// the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CudaTarget {
    /// Compute capability the kernels were compiled for (`[9, 0]` for `sm_90`); a device of a
    /// lower one is refused.
    pub compute_capability: [u32; 2],
    /// PTX ISA version of the modules, e.g. `"8.0"`; the driver must accept it.
    pub ptx_version: String,
    /// Alignment in bytes of every arena offset (device allocations start at multiples of 256).
    pub buffer_align: u64,
    /// The most threads any kernel's block has.
    pub max_workgroup_invocations: u32,
    /// The most shared memory any kernel uses, static or dynamic (a step's
    /// `Dispatch::Gpu::dynamic_shared_bytes`), in bytes.
    pub max_shared_bytes: u32,
    /// Where each module's cubin lies in [`CUBIN_FILE`], in the order of
    /// [`Manifest::modules`]; empty when the artifact holds PTX only.
    pub cubins: Vec<ModuleRange>,
    /// The precision of f32 matrix products and attention: `"f32"` (every product in f32),
    /// `"tf32"` (on tensor cores with operands rounded to TF32) or `"tf32x3"` (on tensor cores
    /// with operands split into two TF32 parts, three products each). Informational: the
    /// kernels are what they are; this says what was chosen.
    pub precision: String,
    /// The operand precisions of the kernels that run on tensor cores, each once, in kernel
    /// order: `"tf32"` or `"tf32x3"` for f32 products as `precision` asked, `"f16"` and
    /// `"bf16"` for products and attention of 16-bit tensors. Empty when no kernel does.
    /// Informational, like `precision`.
    #[serde(default)]
    pub tensor_cores: Vec<String>,
    /// Whether the kernels use features of exactly this architecture (`sm_90a`'s warpgroup
    /// products): a device of any other compute capability, higher ones included, is refused.
    #[serde(default)]
    pub arch_specific: bool,
}

impl CudaTarget {
    /// The architecture's name, `sm_90` (`sm_90a` when architecture-specific).
    pub fn arch(&self) -> String {
        let suffix = if self.arch_specific { "a" } else { "" };
        format!("sm_{}{}{suffix}", self.compute_capability[0], self.compute_capability[1])
    }
}

/// A Vulkan target: what the SPIR-V modules require of the device that runs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VulkanTarget {
    /// SPIR-V version of the modules, e.g. `"1.3"`.
    pub spirv_version: String,
    /// SPIR-V capabilities the modules may declare (`Shader`, `Int64`, `Float64`, `Int8`,
    /// `StorageBuffer8BitAccess`, `GroupNonUniformArithmetic`, …). The runtime enables the
    /// device feature behind each and refuses a device that lacks one.
    pub capabilities: Vec<String>,
    /// Alignment in bytes of every arena offset, so each binding can start at its buffer; the
    /// device's `minStorageBufferOffsetAlignment` must divide it.
    pub buffer_align: u64,
    /// The most invocations any kernel's workgroup has.
    pub max_workgroup_invocations: u32,
    /// The most workgroup (shared) memory any kernel uses, in bytes.
    pub max_shared_bytes: u32,
    /// The subgroup size some kernel relies on (its shuffles assume it), if any.
    pub subgroup_size: Option<u32>,
}

/// One GPU module: a byte range of [`SPIRV_FILE`], [`PTX_FILE`] or [`CUBIN_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleRange {
    /// Byte offset in the file (a multiple of 4 for SPIR-V).
    pub offset: u64,
    /// Length in bytes (a multiple of 4 for SPIR-V).
    pub bytes: u64,
}

/// A CPU target the kernels were compiled for; checked against the running machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetInfo {
    /// LLVM target triple, e.g. `x86_64-unknown-linux-gnu`.
    pub triple: String,
    /// LLVM CPU name, e.g. `znver3` (informational).
    pub cpu: String,
    /// LLVM feature string, e.g. `+avx2,+fma`; `+` features must exist on the running CPU.
    pub features: String,
}

/// A graph input or output: its name, element type and shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The name callers use.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape, outermost first: each extent fixed or a size over [`Manifest::symbols`].
    pub shape: Vec<Dim>,
}

/// Element types a Kiln artifact can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary64.
    F64,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Signed 64-bit integer.
    I64,
    /// One byte per element, 0 or 1.
    Bool,
}

/// Size and crc32 of one artifact file, so a truncated or corrupt file is refused at load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// File name inside the artifact directory.
    pub name: String,
    /// Exact size in bytes.
    pub bytes: u64,
    /// crc32 (IEEE) of the whole file.
    pub crc32: u32,
}

/// One kernel launch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// Entry symbol in `kernels.so` (CPU), entry point name in its SPIR-V module (Vulkan), or
    /// kernel function name in its PTX module (CUDA).
    pub symbol: String,
    /// Human-readable name for profiles, e.g. `k7 matmul_epilogue(gelu) [128,1536]`.
    pub label: String,
    /// The kernel's buffers, in order: pointers in `bufs[]` on a CPU; storage-buffer bindings
    /// `0..n` of descriptor set 0 on Vulkan; kernel parameters (one device pointer each) on CUDA.
    pub args: Vec<BufRef>,
    /// How the kernel is launched.
    pub dispatch: Dispatch,
    /// Estimated floating-point operations of the whole step.
    pub flops: u64,
    /// Estimated bytes moved by the whole step.
    pub bytes: u64,
}

/// How one step is launched; it matches the artifact's [`Target`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dispatch {
    /// `kiln_{symbol}(bufs, syms, begin, end)` over `[0, range)`, split into tasks of at least
    /// `grain` iterations (`range <= grain` runs on one thread); `syms` points to the run's
    /// symbol values, in the order of [`Manifest::symbols`].
    Cpu {
        /// Iterations of the kernel's outer parallel loop (at the run's symbol values).
        range: Dim,
        /// Minimum iterations per task (at least 1).
        grain: u64,
    },
    /// A grid of workgroups (CUDA blocks) running entry point `symbol` of module `module`.
    Gpu {
        /// Index into [`Manifest::modules`].
        module: u32,
        /// Workgroups along x, y, z, at the run's symbol values (fixed when the model has no
        /// symbols; at most the device's limit at the symbols' maxima).
        grid: [Dim; 3],
        /// Invocations per workgroup along x, y, z (also fixed in the module).
        workgroup: [u32; 3],
        /// Bytes of dynamic shared memory the launch passes (the runtime first opts the
        /// function in to them): CUDA gives a block more than 48 KiB of shared memory only
        /// this way. 0: the kernel's shared memory is all static. CUDA only; a Vulkan
        /// artifact never has it (Vulkan has no dynamic shared memory). Written only when
        /// non-zero, so manifests from before the field read as 0 and keep their digest.
        #[serde(default, skip_serializing_if = "is_zero")]
        dynamic_shared_bytes: u32,
    },
}

/// `skip_serializing_if` for counts that are left out of the manifest at 0.
fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// Where a kernel argument points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BufRef {
    /// A range of the arena; `offset` is aligned (64 bytes on a CPU, the target's
    /// `buffer_align` on Vulkan).
    Arena {
        /// Byte offset from the arena's start.
        offset: u64,
        /// Length in bytes.
        bytes: u64,
    },
    /// A tensor of `weights.safetensors`, read-only.
    Weight {
        /// Tensor name in the weights file.
        name: String,
        /// Its expected size in bytes, so a weights file that does not fit is refused at load.
        bytes: u64,
    },
    /// The caller's input buffer (read-only), by position in [`Manifest::inputs`].
    Input {
        /// Position in [`Manifest::inputs`].
        index: u32,
    },
    /// The caller's output buffer, by position in [`Manifest::outputs`].
    Output {
        /// Position in [`Manifest::outputs`].
        index: u32,
    },
    /// The run's symbol values, one `u32` each in the order of [`Manifest::symbols`], for a
    /// GPU kernel that reads sizes set at run time (a CPU kernel takes them as its `syms`
    /// argument instead).
    Symbols,
}

impl DType {
    /// Every dtype, in declaration order.
    pub const ALL: [DType; 7] =
        [DType::F32, DType::F64, DType::F16, DType::BF16, DType::I32, DType::I64, DType::Bool];

    /// Bytes per element (`Bool` is one byte).
    pub fn size_bytes(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Bool => 1,
        }
    }

    /// The lowercase name used in manifests, errors and the C ABI (`"f32"`, `"bool"`…).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl TensorSpec {
    /// A spec whose every extent is fixed.
    pub fn fixed(name: impl Into<String>, dtype: DType, shape: &[u64]) -> TensorSpec {
        TensorSpec { name: name.into(), dtype, shape: shape.iter().map(|&d| Dim::Fixed(d)).collect() }
    }

    /// The shape when every extent is fixed.
    pub fn fixed_shape(&self) -> Option<Vec<u64>> {
        self.shape.iter().map(Dim::fixed).collect()
    }

    /// Number of elements at symbol values `values` (see [`Manifest::symbols`]), or `None` if
    /// an extent has no value there or the product overflows `u64`.
    pub fn elements_at(&self, values: &[u64]) -> Option<u64> {
        self.shape.iter().try_fold(1u64, |n, d| n.checked_mul(d.at(values)?))
    }

    /// Size of the tensor in bytes at symbol values `values`, as [`TensorSpec::elements_at`].
    pub fn byte_len_at(&self, values: &[u64]) -> Option<u64> {
        self.elements_at(values)?.checked_mul(self.dtype.size_bytes() as u64)
    }
}

impl Dispatch {
    /// A GPU dispatch whose grid is the same in every run, with static shared memory only.
    pub fn gpu_fixed(module: u32, grid: [u32; 3], workgroup: [u32; 3]) -> Dispatch {
        Dispatch::Gpu {
            module,
            grid: grid.map(|g| Dim::Fixed(u64::from(g))),
            workgroup,
            dynamic_shared_bytes: 0,
        }
    }

    /// A CPU step's range.
    pub fn range_dim(&self) -> Option<&Dim> {
        match self {
            Dispatch::Cpu { range, .. } => Some(range),
            Dispatch::Gpu { .. } => None,
        }
    }
}

impl FileDigest {
    /// The digest of a file's contents, as the compiler records it.
    pub fn of(name: impl Into<String>, contents: &[u8]) -> FileDigest {
        FileDigest { name: name.into(), bytes: contents.len() as u64, crc32: crc32fast::hash(contents) }
    }
}

impl Manifest {
    /// Every symbol at its largest value: the run whose buffers are the largest.
    pub fn max_values(&self) -> Vec<u64> {
        self.symbols.iter().map(|s| s.max).collect()
    }

    /// Every symbol at its hint.
    pub fn hint_values(&self) -> Vec<u64> {
        self.symbols.iter().map(|s| s.hint).collect()
    }

    /// Parses `manifest.ron` text. Only the syntax is checked here; [`crate::Model`] checks
    /// the content against the files and the machine.
    pub fn from_ron(text: &str) -> Result<Manifest, RuntimeError> {
        ron::from_str(text).map_err(|e| RuntimeError::ManifestSyntax { message: e.to_string() })
    }

    /// Writes the manifest as pretty RON, the form `manifest.ron` holds. Nesting stops at depth
    /// 3, so each shape and each step's argument list stays on one line. The last line is the
    /// digest comment [`Manifest::split_digest`] checks (`// crc32: 1a2b3c4d`), so the
    /// manifest is covered by a checksum like the files it lists.
    pub fn to_ron(&self) -> Result<String, RuntimeError> {
        let mut text = ron::ser::to_string_pretty(self, ron::ser::PrettyConfig::default().depth_limit(3))
            .map_err(|e| RuntimeError::ManifestSyntax { message: e.to_string() })?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        let crc = crc32fast::hash(text.as_bytes());
        text.push_str(&format!("{DIGEST_PREFIX}{crc:08x}\n"));
        Ok(text)
    }

    /// Checks the digest line that ends `manifest.ron` text and returns the text before it.
    /// The line is `// crc32: ` and eight lowercase hex digits (the crc32 of every byte before
    /// the line), then a newline; anything else after it is refused, so no byte of a manifest
    /// escapes the check.
    pub fn split_digest(text: &str) -> Result<&str, RuntimeError> {
        let no_line = || RuntimeError::ManifestDigest {
            problem: "its last line is not the digest `// crc32: xxxxxxxx` the compiler writes".into(),
        };
        let body_and_line = text.strip_suffix('\n').ok_or_else(no_line)?;
        let start = body_and_line.rfind('\n').map_or(0, |i| i + 1);
        let (body, line) = text.split_at(start);
        let hex = line.strip_prefix(DIGEST_PREFIX).and_then(|l| l.strip_suffix('\n')).ok_or_else(no_line)?;
        let well_formed =
            hex.len() == 8 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let expected = u32::from_str_radix(hex, 16).ok().filter(|_| well_formed).ok_or_else(no_line)?;
        let found = crc32fast::hash(body.as_bytes());
        if found != expected {
            return Err(RuntimeError::ManifestDigest {
                problem: format!(
                    "its text has crc32 {found:#010x}, its digest line says {expected:#010x}: it was edited or damaged"
                ),
            });
        }
        Ok(body)
    }

    /// A 64-bit digest of everything in the manifest that the kernels were compiled against:
    /// every field but [`Manifest::files`] (which records the kernels file itself and so cannot
    /// be known when it is built). The compiler embeds it in `kernels.so` as the data symbol
    /// [`CONTRACT_SYMBOL`]; the runtime recomputes it at load and refuses a manifest whose
    /// digest differs, so a shape, offset, size, range, symbol or step order that is not the
    /// one the native code was generated for can never reach that code.
    ///
    /// The encoding is written out field by field (FNV-1a 64 over little-endian numbers and
    /// length-prefixed strings and lists), so it does not depend on a serializer's formatting;
    /// the exhaustive destructuring makes a new manifest field a compile error here until it
    /// is covered.
    pub fn contract(&self) -> u64 {
        let Manifest {
            format_version,
            model,
            kiln_version,
            target,
            symbols,
            inputs,
            index_bounds,
            outputs,
            arena_bytes,
            files: _,
            modules,
            steps,
            state,
            entries,
            faults,
        } = self;
        let mut h = Fnv::new();
        h.u64(u64::from(*format_version));
        h.str(model);
        h.str(kiln_version);
        match target {
            Target::Cpu(TargetInfo { triple, cpu, features }) => {
                h.u64(0);
                h.str(triple);
                h.str(cpu);
                h.str(features);
            }
            Target::Vulkan(VulkanTarget {
                spirv_version,
                capabilities,
                buffer_align,
                max_workgroup_invocations,
                max_shared_bytes,
                subgroup_size,
            }) => {
                h.u64(1);
                h.str(spirv_version);
                h.u64(capabilities.len() as u64);
                capabilities.iter().for_each(|c| h.str(c));
                h.u64(*buffer_align);
                h.u64(u64::from(*max_workgroup_invocations));
                h.u64(u64::from(*max_shared_bytes));
                h.opt(subgroup_size.map(u64::from));
            }
            Target::Cuda(CudaTarget {
                compute_capability,
                ptx_version,
                buffer_align,
                max_workgroup_invocations,
                max_shared_bytes,
                cubins,
                precision,
                tensor_cores,
                arch_specific,
            }) => {
                h.u64(2);
                h.str(precision);
                // Only where set, so artifacts from before the field keep their digest.
                if *arch_specific {
                    h.str("arch-specific");
                }
                // Only where there are any, so artifacts from before the field keep their digest.
                if !tensor_cores.is_empty() {
                    h.u64(tensor_cores.len() as u64);
                    tensor_cores.iter().for_each(|t| h.str(t));
                }
                compute_capability.iter().for_each(|&c| h.u64(u64::from(c)));
                h.str(ptx_version);
                h.u64(*buffer_align);
                h.u64(u64::from(*max_workgroup_invocations));
                h.u64(u64::from(*max_shared_bytes));
                h.ranges(cubins);
            }
        }
        h.u64(symbols.len() as u64);
        for SymbolSpec { name, min, max, hint, multiple_of } in symbols {
            h.str(name);
            [min, max, hint, multiple_of].into_iter().for_each(|&v| h.u64(v));
        }
        h.interface(inputs, index_bounds, outputs);
        h.u64(*arena_bytes);
        h.ranges(modules);
        h.steps(steps);
        h.u64(state.len() as u64);
        for StateSpec { name, dtype, shape, offset, init } in state {
            h.str(name);
            h.str(dtype.name());
            h.u64(shape.len() as u64);
            shape.iter().for_each(|&d| h.u64(d));
            h.u64(*offset);
            match init {
                StateInit::Zeros => h.u64(0),
                StateInit::Weight { name } => {
                    h.u64(1);
                    h.str(name);
                }
            }
        }
        h.u64(entries.len() as u64);
        for Entry { name, inputs, index_bounds, outputs, steps, faults } in entries {
            h.str(name);
            h.interface(inputs, index_bounds, outputs);
            h.steps(steps);
            h.faults(faults);
        }
        h.faults(faults);
        h.0
    }
}

/// The start of the digest line that ends `manifest.ron`.
const DIGEST_PREFIX: &str = "// crc32: ";

/// The data symbol of `kernels.so` holding [`Manifest::contract`] of the manifest the kernels
/// were compiled with (a little-endian `u64` on the target).
pub const CONTRACT_SYMBOL: &str = "kiln_contract";

impl Manifest {
    /// Checks the contract digest the kernels in `file` carry (`None`: they carry none, and
    /// `absent` says how that shows) against this manifest's.
    pub(crate) fn check_contract(
        &self,
        file: &'static str,
        carried: Option<u64>,
        absent: &str,
    ) -> Result<(), RuntimeError> {
        let expected = self.contract();
        let problem = match carried {
            Some(found) if found == expected => return Ok(()),
            Some(found) => format!("contract digest {expected:016x}, the kernels carry {found:016x}"),
            None => absent.to_string(),
        };
        Err(RuntimeError::Contract { file, problem })
    }
}

/// The line that ends a CUDA artifact's `kernels.ptx`, after the last module (outside every
/// module's range): `// kiln_contract ` and [`Manifest::contract`] of the manifest the modules
/// were compiled with, as 16 hex digits. PTX kernels take bare pointers, so nothing in the
/// modules says how large a buffer is: without this, an edited arena range could send a
/// kernel past its buffer.
pub const PTX_CONTRACT_PREFIX: &str = "// kiln_contract ";

/// The contract line for `contract` (see [`PTX_CONTRACT_PREFIX`]).
pub fn ptx_contract_line(contract: u64) -> String {
    format!("{PTX_CONTRACT_PREFIX}{contract:016x}\n")
}

/// The contract digest a `kernels.ptx` ends with, if its last line is a contract line.
pub fn ptx_contract(ptx: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(ptx.strip_suffix(b"\n")?).ok()?;
    let last = text.rsplit('\n').next()?;
    let hex = last.strip_prefix(PTX_CONTRACT_PREFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// The 16 bytes that end a Vulkan artifact's `kernels.spv`, after its last module (outside
/// every module's range): `kilncntr` and [`Manifest::contract`] of the manifest the modules
/// were compiled with, little-endian. The bindings' sizes are checked against the SPIR-V, but
/// which step runs which kernel on which buffers is the manifest's word alone: this ties it
/// to the build.
pub fn spirv_contract_trailer(contract: u64) -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(SPIRV_CONTRACT_MAGIC);
    t[8..].copy_from_slice(&contract.to_le_bytes());
    t
}

/// The first half of [`spirv_contract_trailer`].
const SPIRV_CONTRACT_MAGIC: &[u8; 8] = b"kilncntr";

/// The contract digest a `kernels.spv` ends with, if it ends with a contract trailer.
pub fn spirv_contract(spirv: &[u8]) -> Option<u64> {
    let tail = spirv.len().checked_sub(16).map(|at| &spirv[at..])?;
    if &tail[..8] != SPIRV_CONTRACT_MAGIC {
        return None;
    }
    let mut digest = [0u8; 8];
    digest.copy_from_slice(&tail[8..]);
    Some(u64::from_le_bytes(digest))
}

/// Whether `symbol` has the form of a kernel entry the compiler writes: `kiln_k` and a decimal
/// kernel number (`kiln_k12`). A manifest naming anything else (`abort`, `free`, a libc
/// function reachable through the library's dependencies) is refused before any lookup.
pub fn is_kernel_entry(symbol: &str) -> bool {
    symbol
        .strip_prefix("kiln_k")
        .is_some_and(|n| !n.is_empty() && n.len() <= 10 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// FNV-1a, 64 bits: the contract digest's hash (a guard against damage and hand edits, not
/// an adversary: an artifact is native code, trusted like a shared library).
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }

    fn str(&mut self, s: &str) {
        self.u64(s.len() as u64);
        self.bytes(s.as_bytes());
    }

    fn opt(&mut self, v: Option<u64>) {
        match v {
            None => self.u64(0),
            Some(v) => {
                self.u64(1);
                self.u64(v);
            }
        }
    }

    fn interface(&mut self, inputs: &[TensorSpec], index_bounds: &[Option<u64>], outputs: &[TensorSpec]) {
        for specs in [inputs, outputs] {
            self.u64(specs.len() as u64);
            for TensorSpec { name, dtype, shape } in specs {
                self.str(name);
                self.str(dtype.name());
                self.u64(shape.len() as u64);
                shape.iter().for_each(|d| self.dim(d));
            }
        }
        self.u64(index_bounds.len() as u64);
        index_bounds.iter().for_each(|&b| self.opt(b));
    }

    fn steps(&mut self, steps: &[Step]) {
        self.u64(steps.len() as u64);
        for Step { symbol, label, args, dispatch, flops, bytes } in steps {
            self.str(symbol);
            self.str(label);
            self.u64(args.len() as u64);
            for arg in args {
                match arg {
                    BufRef::Arena { offset, bytes } => {
                        self.u64(0);
                        self.u64(*offset);
                        self.u64(*bytes);
                    }
                    BufRef::Weight { name, bytes } => {
                        self.u64(1);
                        self.str(name);
                        self.u64(*bytes);
                    }
                    BufRef::Input { index } => {
                        self.u64(2);
                        self.u64(u64::from(*index));
                    }
                    BufRef::Output { index } => {
                        self.u64(3);
                        self.u64(u64::from(*index));
                    }
                    BufRef::Symbols => self.u64(4),
                }
            }
            match dispatch {
                Dispatch::Cpu { range, grain } => {
                    self.u64(0);
                    self.dim(range);
                    self.u64(*grain);
                }
                Dispatch::Gpu { module, grid, workgroup, dynamic_shared_bytes } => {
                    self.u64(1);
                    self.u64(u64::from(*module));
                    grid.iter().for_each(|g| self.dim(g));
                    workgroup.iter().for_each(|&w| self.u64(u64::from(w)));
                    // Only where there are any, so artifacts from before the field keep their
                    // digest.
                    if *dynamic_shared_bytes != 0 {
                        self.u64(u64::from(*dynamic_shared_bytes));
                    }
                }
            }
            self.u64(*flops);
            self.u64(*bytes);
        }
    }

    fn dim(&mut self, dim: &Dim) {
        match dim {
            Dim::Fixed(d) => {
                self.u64(0);
                self.u64(*d);
            }
            Dim::Size(terms) => {
                self.u64(1);
                self.size(terms);
            }
        }
    }

    fn size(&mut self, terms: &[SizeTerm]) {
        self.u64(terms.len() as u64);
        for SizeTerm { coeff, factors } in terms {
            self.bytes(&coeff.to_le_bytes());
            self.u64(factors.len() as u64);
            for f in factors {
                match f {
                    SizeFactor::Sym(i) => {
                        self.u64(0);
                        self.u64(u64::from(*i));
                    }
                    SizeFactor::FloorDiv(inner, d) => {
                        self.u64(1);
                        self.size(inner);
                        self.u64(*d);
                    }
                }
            }
        }
    }

    fn faults(&mut self, faults: &Option<Faults>) {
        match faults {
            None => self.u64(0),
            Some(Faults { offset, sites }) => {
                self.u64(1);
                self.u64(*offset);
                self.u64(sites.len() as u64);
                for FaultSite { kind, step, op, name, origin, shape, divisor } in sites {
                    self.u64(match kind {
                        FaultKind::IntDivByZero => 0,
                    });
                    self.u64(u64::from(*step));
                    self.str(op);
                    for text in [name, origin] {
                        match text {
                            None => self.u64(0),
                            Some(t) => {
                                self.u64(1);
                                self.str(t);
                            }
                        }
                    }
                    for dims in [shape, divisor] {
                        self.u64(dims.len() as u64);
                        dims.iter().for_each(|&d| self.u64(d));
                    }
                }
            }
        }
    }

    fn ranges(&mut self, ranges: &[ModuleRange]) {
        self.u64(ranges.len() as u64);
        for ModuleRange { offset, bytes } in ranges {
            self.u64(*offset);
            self.u64(*bytes);
        }
    }
}

/// Why a tensor name cannot name a file inside an output folder, if it cannot: names become
/// `NAME.npy` files under `kiln eval -o`/`kiln run -o` and C strings in the C ABI, so a name
/// must be one plain path component that prints as itself.
pub fn name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("is empty");
    }
    if name == "." || name == ".." {
        return Some("is a relative directory");
    }
    if name.contains(['/', '\\']) {
        return Some("contains a path separator");
    }
    if name.contains('\0') {
        return Some("contains a NUL character");
    }
    if name.chars().any(char::is_control) {
        return Some("contains a control character");
    }
    if name.chars().any(is_bidi_control) {
        return Some("contains a bidirectional-text control character");
    }
    if name.len() > 200 {
        return Some("is longer than 200 bytes");
    }
    None
}

/// Unicode's explicit bidirectional formatting characters (which make a name display as
/// another: "Trojan Source").
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}')
}

/// Bytes of a `dtype` tensor of `shape`, or `None` if that overflows `u64`.
pub(crate) fn shape_bytes(dtype: DType, shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(dtype.size_bytes() as u64, |n, &d| n.checked_mul(d))
}

/// `"[2, 3]"`, the way errors and the profile print a shape.
pub(crate) fn shape_str(shape: &[u64]) -> String {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    format!("[{}]", dims.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_match_serde_names() {
        for dtype in DType::ALL {
            let text = ron::to_string(&dtype).unwrap();
            assert_eq!(text, dtype.name());
            assert_eq!(ron::from_str::<DType>(&text).unwrap(), dtype);
        }
    }

    #[test]
    fn manifest_round_trips_through_ron() {
        let manifest = Manifest {
            format_version: crate::ARTIFACT_FORMAT_VERSION,
            symbols: Vec::new(),
            model: "m".into(),
            kiln_version: "0.1.0".into(),
            target: Target::Cpu(TargetInfo {
                triple: "x86_64-unknown-linux-gnu".into(),
                cpu: "znver3".into(),
                features: "+avx2".into(),
            }),
            inputs: vec![TensorSpec::fixed("x", DType::BF16, &[2, 3])],
            index_bounds: vec![Some(7)],
            outputs: vec![TensorSpec::fixed("y", DType::Bool, &[])],
            arena_bytes: 128,
            files: vec![FileDigest::of(KERNELS_FILE, b"abc")],
            modules: vec![],
            state: Vec::new(),
            entries: Vec::new(),
            steps: vec![Step {
                symbol: "k0".into(),
                label: "k0 add [2,3]".into(),
                args: vec![
                    BufRef::Input { index: 0 },
                    BufRef::Weight { name: "w".into(), bytes: 12 },
                    BufRef::Arena { offset: 64, bytes: 64 },
                    BufRef::Output { index: 0 },
                ],
                dispatch: Dispatch::Cpu { range: Dim::Fixed(2), grain: 1 },
                flops: 6,
                bytes: 36,
            }],
            faults: Some(Faults {
                offset: 64,
                sites: vec![FaultSite {
                    kind: FaultKind::IntDivByZero,
                    step: 0,
                    op: "div".into(),
                    name: Some("q".into()),
                    origin: None,
                    shape: vec![2, 3],
                    divisor: vec![3],
                }],
            }),
        };
        let text = manifest.to_ron().unwrap();
        assert!(text.contains("dtype: bf16"), "{text}");
        assert_eq!(Manifest::from_ron(&text).unwrap(), manifest);
        assert_eq!(manifest.files[0].crc32, 0x352441c2);
    }

    /// A CUDA manifest of one GPU step, with static shared memory only.
    fn cuda_manifest() -> Manifest {
        Manifest {
            format_version: crate::ARTIFACT_FORMAT_VERSION,
            symbols: Vec::new(),
            model: "m".into(),
            kiln_version: "0.1.0".into(),
            target: Target::Cuda(CudaTarget {
                compute_capability: [9, 0],
                ptx_version: "8.0".into(),
                buffer_align: 256,
                max_workgroup_invocations: 256,
                max_shared_bytes: 1024,
                cubins: Vec::new(),
                precision: "f32".into(),
                tensor_cores: Vec::new(),
                arch_specific: false,
            }),
            inputs: vec![TensorSpec::fixed("x", DType::F32, &[1024])],
            index_bounds: vec![None],
            outputs: vec![TensorSpec::fixed("y", DType::F32, &[1024])],
            arena_bytes: 0,
            files: Vec::new(),
            modules: vec![ModuleRange { offset: 0, bytes: 64 }],
            state: Vec::new(),
            entries: Vec::new(),
            steps: vec![Step {
                symbol: "k0".into(),
                label: "k0 neg [1024]".into(),
                args: vec![BufRef::Input { index: 0 }, BufRef::Output { index: 0 }],
                dispatch: Dispatch::gpu_fixed(0, [4, 1, 1], [256, 1, 1]),
                flops: 1024,
                bytes: 8192,
            }],
            faults: None,
        }
    }

    #[test]
    fn dynamic_shared_memory_is_written_only_when_used() {
        let mut manifest = cuda_manifest();
        let text = manifest.to_ron().unwrap();
        assert!(!text.contains("dynamic_shared_bytes"), "{text}");
        assert_eq!(Manifest::from_ron(&text).unwrap(), manifest);
        // The digest of a step without dynamic shared memory is the one manifests written
        // before the field had, so the kernels compiled against them still load.
        let before = manifest.contract();
        assert_eq!(before, 0xd665_c0d5_5d71_6d5d, "{before:#x}");

        let Dispatch::Gpu { dynamic_shared_bytes, .. } = &mut manifest.steps[0].dispatch else {
            unreachable!()
        };
        *dynamic_shared_bytes = 81920;
        let text = manifest.to_ron().unwrap();
        assert!(text.contains("dynamic_shared_bytes: 81920"), "{text}");
        assert_eq!(Manifest::from_ron(&text).unwrap(), manifest);
        assert_ne!(manifest.contract(), before);
    }

    #[test]
    fn sizes() {
        let spec = TensorSpec::fixed("x", DType::F16, &[3, 5]);
        assert_eq!(spec.byte_len_at(&[]), Some(30));
        assert_eq!(spec.fixed_shape(), Some(vec![3, 5]));
        let scalar = TensorSpec::fixed("s", DType::I64, &[]);
        assert_eq!(scalar.byte_len_at(&[]), Some(8));
        let huge = TensorSpec::fixed("h", DType::F32, &[u64::MAX, 2]);
        assert_eq!(huge.byte_len_at(&[]), None);
        assert_eq!(shape_str(&[2, 3]), "[2, 3]");
    }
}
