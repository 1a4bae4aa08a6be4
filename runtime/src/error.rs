//! `RuntimeError`: every way loading or running an artifact can fail, each message naming the
//! file, step, tensor or setting at fault and, where one exists, the fix.

use std::path::PathBuf;

use thiserror::Error;

use crate::manifest::DType;

/// An artifact that cannot be loaded, or inputs that do not fit it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An artifact file is absent.
    #[error("{} is missing: the artifact is incomplete, recompile the model", path.display())]
    MissingFile {
        /// The file that should exist.
        path: PathBuf,
    },
    /// `manifest.ron` is not valid RON or does not have the manifest's form.
    #[error("manifest.ron is not a valid manifest: {message}")]
    ManifestSyntax {
        /// The parser's message, with its position.
        message: String,
    },
    /// `manifest.ron` lacks its digest line or does not match it.
    #[error("manifest.ron is damaged: {problem}; recompile or copy the artifact again")]
    ManifestDigest {
        /// What is wrong with the digest line.
        problem: String,
    },
    /// The manifest is not the one the kernels were compiled with (its contract digest, see
    /// [`crate::Manifest::contract`], differs from the one `kernels.so` or `kernels.ptx`
    /// carries).
    #[error("manifest.ron does not describe the kernels in {file} ({problem}): the manifest was edited or belongs to another build; recompile the model")]
    Contract {
        /// The kernels file.
        file: &'static str,
        /// What differs.
        problem: String,
    },
    /// The artifact was written for another format version.
    #[error("artifact format version {found}, this runtime reads version {expected}: recompile the model")]
    FormatVersion {
        /// The manifest's version.
        found: u32,
        /// [`crate::ARTIFACT_FORMAT_VERSION`].
        expected: u32,
    },
    /// The kernels were compiled for another architecture.
    #[error("the artifact was compiled for {triple} (architecture {artifact_arch}), but this machine is {host_arch}: recompile the model for this machine")]
    TargetArch {
        /// The manifest's triple.
        triple: String,
        /// The architecture named by the triple.
        artifact_arch: String,
        /// `std::env::consts::ARCH`.
        host_arch: String,
    },
    /// The kernels use CPU features this machine lacks.
    #[error("the artifact was compiled for CPU {cpu} with features this CPU lacks: {}; recompile the model for this machine", missing.join(", "))]
    MissingCpuFeatures {
        /// The manifest's CPU name.
        cpu: String,
        /// The features absent here, e.g. `avx512f`.
        missing: Vec<String>,
    },
    /// The manifest records no size and crc32 for a file the artifact needs.
    #[error("the manifest records no size and crc32 for {file}: recompile the model")]
    NoDigest {
        /// The file name.
        file: String,
    },
    /// A file's size differs from the manifest's.
    #[error("{file} is {found} bytes, the manifest says {expected}: the file is truncated or corrupt, recompile or copy the artifact again")]
    FileSize {
        /// The file name.
        file: String,
        /// The manifest's size.
        expected: u64,
        /// The size on disk.
        found: u64,
    },
    /// A file's crc32 differs from the manifest's.
    #[error("{file} has crc32 {found:#010x}, the manifest says {expected:#010x}: the file is corrupt, recompile or copy the artifact again")]
    FileCrc {
        /// The file name.
        file: String,
        /// The manifest's crc32.
        expected: u32,
        /// The crc32 of the file on disk.
        found: u32,
    },
    /// The weights are not a valid safetensors file, or hold a dtype Kiln does not use.
    #[error("invalid weights ({origin}): {message}")]
    Weights {
        /// Where the weights came from (a path, or "in memory").
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// A step refers to a weight the weights file does not hold.
    #[error("step {step:?} uses weight {name:?}, which the weights file does not hold")]
    MissingWeight {
        /// The step's label.
        step: String,
        /// The weight's name.
        name: String,
    },
    /// A weight's size differs from what the step expects.
    #[error(
        "step {step:?} expects weight {name:?} of {expected} bytes, the weights file holds {found} bytes"
    )]
    WeightSize {
        /// The step's label.
        step: String,
        /// The weight's name.
        name: String,
        /// The manifest's size.
        expected: u64,
        /// The size in the weights file.
        found: u64,
    },
    /// An arena argument lies outside the arena or is misaligned.
    #[error("step {step:?} uses arena bytes {offset}..{end}, {problem} (arena of {arena_bytes} bytes)")]
    ArenaRange {
        /// The step's label.
        step: String,
        /// The argument's offset.
        offset: u64,
        /// Its end (saturated on overflow).
        end: u64,
        /// The arena's size.
        arena_bytes: u64,
        /// "outside the arena", "not 64-byte aligned" or (Vulkan) "not a multiple of the
        /// target's buffer_align".
        problem: &'static str,
    },
    /// A step names an input or output that does not exist.
    #[error("step {step:?} uses {kind} {index}, but the model has {count} {kind}s")]
    BufIndex {
        /// The step's label.
        step: String,
        /// "input" or "output".
        kind: &'static str,
        /// The index named.
        index: u32,
        /// How many exist.
        count: usize,
    },
    /// `kernels.so` could not be loaded.
    #[error("cannot load {}: {message}", path.display())]
    LoadKernels {
        /// The shared object.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// A step's entry symbol is not in the kernels.
    #[error("step {step:?}: symbol {symbol:?} is not in the kernels")]
    MissingSymbol {
        /// The step's label.
        step: String,
        /// The symbol.
        symbol: String,
    },
    /// The manifest is well-formed RON but contradicts itself.
    #[error("invalid manifest: {message}")]
    InvalidManifest {
        /// What is wrong.
        message: String,
    },
    /// The requested thread count is unusable.
    #[error("{message}")]
    Threads {
        /// What is wrong.
        message: String,
    },
    /// Memory for the arena or a buffer could not be allocated.
    #[error("cannot allocate {bytes} bytes for the {what}")]
    Alloc {
        /// "arena", or the buffer's role.
        what: String,
        /// The size asked for.
        bytes: u64,
    },
    /// The caller passed the wrong number of inputs or outputs.
    #[error("the model takes {expected} {kind}s, got {got}")]
    Count {
        /// "input" or "output".
        kind: &'static str,
        /// The manifest's count.
        expected: usize,
        /// The caller's count.
        got: usize,
    },
    /// An input has another name than the manifest's at its position.
    #[error("input {index} must be {expected:?}, got {got:?}")]
    InputName {
        /// Position of the input.
        index: usize,
        /// The manifest's name.
        expected: String,
        /// The caller's name.
        got: String,
    },
    /// `run_entry` named an entry point the model does not have.
    #[error("the model has no entry point {entry:?} (it has {known})")]
    UnknownEntry {
        /// The name asked for.
        entry: String,
        /// The entry points it has.
        known: String,
    },
    /// `read_state` or `write_state` named a state tensor the model does not keep.
    #[error("the model keeps no state {name:?} ({known})")]
    UnknownState {
        /// The name asked for.
        name: String,
        /// The state it keeps.
        known: String,
    },
    /// `write_state` was given a tensor that does not fit the state's slot.
    #[error("state {name:?} is {expected}, the value given is {got}")]
    StateValue {
        /// The state's name.
        name: String,
        /// Its dtype and shape.
        expected: String,
        /// The value's dtype and shape (or size).
        got: String,
    },
    /// An input has another dtype than the manifest's.
    #[error("input {name:?} must be {expected}, got {got}")]
    InputDtype {
        /// The input's name.
        name: String,
        /// The manifest's dtype.
        expected: DType,
        /// The caller's dtype.
        got: DType,
    },
    /// An input has another shape than the manifest's.
    #[error("input {name:?} must have shape {expected}, got {got}")]
    InputShape {
        /// The input's name.
        name: String,
        /// The manifest's shape.
        expected: String,
        /// The caller's shape.
        got: String,
    },
    /// An input's extent along one axis contradicts a symbol's bounds or the value another
    /// input bound it to.
    #[error("input `{input}` axis {axis} is {got}, but {problem}")]
    InputExtent {
        /// The input's name.
        input: String,
        /// The axis, outermost first.
        axis: usize,
        /// The caller's extent.
        got: u64,
        /// What it should be and why (`` `seq` is at most 512 ``).
        problem: String,
    },
    /// An index input holds a value outside the table it indexes; the interpreter's
    /// `gather` refuses the same value with the same words.
    #[error("input {input:?}: gather index {index} at position {position} of the indices is out of range for a table of extent {extent}")]
    GatherIndex {
        /// The input's name.
        input: String,
        /// The value found.
        index: i64,
        /// Its position in the input, e.g. `[0, 3]`.
        position: String,
        /// The smallest extent of the tables it indexes (the manifest's `index_bounds`).
        extent: u64,
    },
    /// A kernel recorded a fault (an integer division by zero): the outputs are not the
    /// model's. The interpreter refuses the same inputs with the same words; the model stays
    /// usable for the next run.
    #[error("step {step:?} ({op}): {fault}")]
    Fault {
        /// The step whose kernel faulted (`k3 div [2,3]`).
        step: String,
        /// The op as the interpreter names a node: `div \`q\` at model.ron:4:9`.
        op: String,
        /// What happened: `integer division by zero (divisor element [1, 2])`.
        fault: String,
    },
    /// The fault words name a site the manifest does not list (damaged kernels or memory).
    #[error("the kernels recorded fault site {word}, which the manifest does not list")]
    FaultWord {
        /// The first-fault word.
        word: u32,
    },
    /// A buffer's length does not match its tensor's shape and dtype.
    #[error("{kind} {name:?} needs {expected} bytes, got {got}")]
    BufferSize {
        /// "input" or "output".
        kind: &'static str,
        /// The tensor's name.
        name: String,
        /// Elements times the dtype's size.
        expected: u64,
        /// The buffer's length.
        got: u64,
    },
    /// Vulkan cannot be used on this machine (no loader, no instance, no device).
    #[error("Vulkan is not available: {reason}")]
    VulkanUnavailable {
        /// Why, e.g. the loader's message.
        reason: String,
    },
    /// CUDA cannot be used on this machine (no `libcuda`, no device, or no backend for it).
    #[error("CUDA is not available: {reason}")]
    CudaUnavailable {
        /// Why, e.g. the driver library's loading error.
        reason: String,
    },
    /// A Vulkan call failed while loading or running a model.
    #[error("Vulkan call {call} failed on {device}: {result}")]
    VulkanCall {
        /// The Vulkan function.
        call: &'static str,
        /// The device, e.g. `vulkan:0 (llvmpipe)`.
        device: String,
        /// The `VkResult`.
        result: String,
    },
    /// A CUDA driver call failed while loading or running a model.
    #[error("CUDA call {call} failed on {device}: {result}")]
    CudaCall {
        /// The driver function, e.g. `cuLaunchKernel`.
        call: &'static str,
        /// The device, e.g. `cuda:0 (NVIDIA H200)`.
        device: String,
        /// The `CUresult`'s name and the driver's description of it.
        result: String,
    },
    /// The CUDA device's compute capability is lower than the one the artifact was compiled
    /// for, so its PTX (and cubins) cannot run there.
    #[error("this artifact was compiled for {compiled}; CUDA device {device} is {found}: recompile with --target cuda:{found}")]
    CudaArch {
        /// The target's architecture, e.g. `sm_90`.
        compiled: String,
        /// The device's ordinal and name, e.g. `0 (NVIDIA A100-SXM4-80GB)`.
        device: String,
        /// The device's architecture, e.g. `sm_80`.
        found: String,
    },
    /// A module of `kernels.ptx` or `kernels.cubin` is malformed, contradicts the manifest, or
    /// was refused by the driver (the message then holds the JIT's error log).
    #[error("module {module} of {file}: {message}")]
    CudaModule {
        /// `kernels.ptx` or `kernels.cubin`.
        file: &'static str,
        /// Index in `Manifest::modules`.
        module: usize,
        /// What is wrong.
        message: String,
    },
    /// The device selector is malformed or matches no device of this machine.
    #[error("no device matches {selector:?}: {problem}")]
    NoDevice {
        /// The selector given (`"vulkan:3"`).
        selector: String,
        /// What is wrong, with the devices there are.
        problem: String,
    },
    /// The artifact's target cannot run on the selected device.
    #[error("{artifact} cannot run on device {device}: {fix}")]
    WrongDevice {
        /// The artifact's target, e.g. `a Vulkan artifact`.
        artifact: String,
        /// The selected device.
        device: String,
        /// What to do instead.
        fix: String,
    },
    /// The artifact needs more than the device offers.
    #[error("the artifact needs {need}, but device {device} {has}")]
    DeviceLacks {
        /// The artifact's requirement.
        need: String,
        /// The device.
        device: String,
        /// The device's limit or missing feature.
        has: String,
    },
    /// A SPIR-V module in `kernels.spv` is malformed or contradicts the manifest.
    #[error("SPIR-V module {module} of kernels.spv: {message}")]
    Spirv {
        /// Index in `Manifest::modules`.
        module: usize,
        /// What is wrong.
        message: String,
    },
    /// The device cannot time the steps (its compute queue has no timestamps).
    #[error("cannot profile on device {device}: {reason}")]
    NoTimestamps {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
}

impl RuntimeError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> RuntimeError {
        let path = path.into();
        if source.kind() == std::io::ErrorKind::NotFound {
            RuntimeError::MissingFile { path }
        } else {
            RuntimeError::Io { path, source }
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> RuntimeError {
        RuntimeError::InvalidManifest { message: message.into() }
    }
}
