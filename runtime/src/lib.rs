//! kiln-runtime: loads a compiled Kiln artifact and runs it.
//!
//! An artifact is a directory `NAME.kiln/` holding `manifest.ron` ([`Manifest`]), the kernels
//! and `weights.safetensors`. A CPU artifact's kernels are `kernels.so` (one entry symbol per
//! step); a Vulkan artifact's are SPIR-V compute shaders in `kernels.spv`; a CUDA artifact's
//! are PTX modules in `kernels.ptx` (and, optionally, cubins in `kernels.cubin`).
//! [`Model::load`] checks it all once — format version, target machine or device, file sizes
//! and crc32s, weights, arena ranges, symbols or entry points — so [`Model::run`] only binds
//! buffers and runs kernels: on the CPU, splitting each step's outer loop across the model's
//! threads; on Vulkan, replaying a command buffer recorded at load; on CUDA, replaying a CUDA
//! graph captured at load (the NVIDIA driver is opened at run time, so this crate builds and
//! runs without CUDA). A CPU artifact may keep persistent state in its arena and have entry
//! points besides `forward` ([`Model::run_entry`], [`Model::read_state`],
//! [`Model::write_state`]: a training artifact's `train_step`). [`Options::device`] and
//! [`devices`] select and list devices. [`Model::from_parts`] does the same for a JIT's in-memory CPU
//! kernels. The C ABI (`capi`, header `include/kiln.h`) wraps the same calls.
//!
//! A manifest may declare symbols ([`SymbolSpec`]: a batch size, a sequence length, with
//! bounds): extents of its inputs, outputs and CPU step ranges are then sizes over them
//! ([`Dim`]). Each run binds the symbols from its inputs' shapes and refuses a shape outside
//! the bounds or inconsistent between inputs, naming the input and the axis; outputs come back
//! at the bound shapes.
//!
//! ```no_run
//! use kiln_runtime::{Model, TensorRef};
//!
//! let mut model = Model::load("mlp.kiln")?;
//! let x = vec![0.5f32; 4 * 16];
//! let outputs = model.run(&[TensorRef::f32("x", &[4, 16], &x)])?;
//! println!("{} = {:?}", outputs[0], outputs[0].as_f32());
//! # Ok::<(), kiln_runtime::RuntimeError>(())
//! ```
//!
//! **Architecture invariant:** this crate never depends on MLIR or LLVM, nor on any other Kiln
//! crate; it shares only the artifact format with the compiler (`tests/deps.rs` checks it).

#![warn(missing_docs)]

pub mod batching;
mod buffer;
pub mod capi;
mod device;
mod error;
mod exec;
mod faults;
mod kernels;
mod manifest;
mod model;
pub mod pooling;
mod profile;
mod symbols;
mod target;
mod tensor;
mod weights;

pub use device::{devices, CudaDeviceInfo, DeviceInfo, Devices, VulkanDeviceInfo};
pub use error::RuntimeError;
pub use kernels::{KernelFn, KernelSource, SharedLibrary};
pub use manifest::{
    is_bidi_control, is_kernel_entry, name_problem, ptx_contract, ptx_contract_line, spirv_contract,
    spirv_contract_trailer, BufRef, CudaTarget, DType, Dispatch, Entry, EntryView, FaultKind, FaultSite,
    Faults, FileDigest, Manifest, ModuleRange, StateInit, StateSpec, Step, Target, TargetInfo, TensorSpec,
    VulkanTarget, CONTRACT_SYMBOL, CUBIN_FILE, FORWARD_ENTRY, KERNELS_FILE, MANIFEST_FILE,
    PTX_CONTRACT_PREFIX, PTX_FILE, SPIRV_FILE, WEIGHTS_FILE,
};
pub use model::{Model, Options};
pub use profile::{KindProfile, Profile, StepProfile};
pub use symbols::{binding_str, dims_str, Dim, Size, SizeFactor, SizeTerm, SymbolSpec};
pub use tensor::{Tensor, TensorRef};
pub use weights::{WeightStore, WeightView};

/// The artifact format version this runtime reads and the compiler writes.
pub const ARTIFACT_FORMAT_VERSION: u32 = 7;
