//! Every manifest number of a Vulkan artifact checked, and turned into a plan before any
//! Vulkan object exists: module byte ranges, entry points and their workgroup sizes, launch
//! limits (and no dynamic shared memory), and each binding's buffer, offset and range. A run
//! only replays what this accepted.

use std::collections::HashMap;
use std::ffi::CString;

use super::check::{self, DeviceCaps};
use super::spirv;
use crate::device::GpuArg;
use crate::error::RuntimeError;
use crate::manifest::{BufRef, EntryView, Manifest, VulkanTarget};
use crate::symbols::Dim;
use crate::weights::WeightStore;

/// The one buffer a binding points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    /// The device-local arena of intermediates.
    Arena,
    /// The device-local copy of the weights.
    Weights,
    /// The host-visible buffer holding the inputs and outputs.
    Io,
}

/// One storage-buffer binding: `range` bytes of `region` from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Binding {
    pub region: Region,
    pub offset: u64,
    pub range: u64,
}

/// A compute pipeline: an entry point of a module, with the bindings its steps pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PipelineKey {
    pub module: usize,
    pub entry: CString,
    pub bindings: usize,
}

/// One step as recorded: its pipeline, its grid and its bindings (binding i = argument i).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepPlan {
    pub pipeline: usize,
    /// The grid over the manifest's symbols (fixed when it has none), checked against the
    /// device at the symbols' maxima.
    pub grid: [Dim; 3],
    pub bindings: Vec<Binding>,
}

/// What to create on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The words of each module of `kernels.spv`.
    pub modules: Vec<Vec<u32>>,
    pub pipelines: Vec<PipelineKey>,
    /// Each entry point's steps and io layout, `forward` first.
    pub entries: Vec<EntryPlan>,
    /// Bytes to allocate for the arena (the manifest's size plus slack for 4-byte ranges).
    pub arena_size: u64,
    /// Each referenced weight and its offset in the weights buffer.
    pub weights: Vec<(String, u64)>,
    pub weights_size: u64,
    /// The io buffer's size: the largest entry point's (entry points never run at once).
    pub io_size: u64,
    /// The bytes from the arena's start that hold the persistent state's slots (0: none).
    pub state_bytes: u64,
}

/// One entry point as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryPlan {
    pub steps: Vec<StepPlan>,
    /// `(offset, bytes)` of each input and output in the io buffer.
    pub inputs: Vec<(u64, u64)>,
    pub outputs: Vec<(u64, u64)>,
    /// The fault words, when a kernel can fault: filled at the start of each run, copied into
    /// the io buffer at its end.
    pub faults: Option<FaultWords>,
    /// When the model has symbols: where each run writes its values (one `u32` each, the
    /// [`BufRef::Symbols`] binding) and its steps' grids, which the steps are dispatched from.
    pub sized: Option<SizedRun>,
}

/// The io buffer's part of a run whose sizes are set at run time: the symbol words at
/// `symbols` (`bytes` long) and, at `grids`, one `VkDispatchIndirectCommand` (three `u32`)
/// per step, in step order. The recorded dispatches read them, so one command buffer serves
/// every binding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SizedRun {
    pub symbols: u64,
    pub bytes: u64,
    pub grids: u64,
}

/// Bytes of one `VkDispatchIndirectCommand`.
pub(crate) const INDIRECT_BYTES: u64 = 12;

/// Where the fault words lie in the arena and where a run's copy of them lands in the io
/// buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FaultWords {
    pub arena: u64,
    pub io: u64,
    pub bytes: u64,
}

/// Slack after every buffer's last byte, so a range rounded up to 4 bytes (and at least 4, as
/// Vulkan wants even for an empty tensor) stays inside it.
const SLACK: u64 = 8;

/// A binding's range: the bytes rounded up to a multiple of 4, at least 4.
fn range_of(bytes: u64) -> u64 {
    bytes.max(4).div_ceil(4) * 4
}

/// Where the next region starts: `at` rounded up to `align`.
fn align_up(at: u64, align: u64) -> Option<u64> {
    at.checked_next_multiple_of(align)
}

fn too_big(what: &str) -> RuntimeError {
    RuntimeError::invalid(format!("the {what} do not fit in 64-bit offsets"))
}

/// Checks the manifest against the SPIR-V, the weights and the device, and lays out buffers.
pub(crate) fn plan(
    manifest: &Manifest,
    target: &VulkanTarget,
    spirv_file: &[u8],
    weights: &WeightStore,
    caps: &DeviceCaps,
) -> Result<Plan, RuntimeError> {
    let align = target.buffer_align.max(1);
    let max_version = check::spirv_version(target)
        .ok_or_else(|| RuntimeError::invalid(format!("unknown SPIR-V version {:?}", target.spirv_version)))?;

    // Modules: byte ranges of kernels.spv, each a well-formed module the target allows.
    let mut modules = Vec::with_capacity(manifest.modules.len());
    let mut infos = Vec::with_capacity(manifest.modules.len());
    for (i, range) in manifest.modules.iter().enumerate() {
        let bad = |message: String| RuntimeError::Spirv { module: i, message };
        let end = range.offset.checked_add(range.bytes);
        if !range.offset.is_multiple_of(4) || !range.bytes.is_multiple_of(4) {
            return Err(bad(format!(
                "bytes {}..{} are not 4-byte aligned",
                range.offset,
                range.offset.saturating_add(range.bytes)
            )));
        }
        let bytes = match end {
            Some(end) if end <= spirv_file.len() as u64 => &spirv_file[range.offset as usize..end as usize],
            _ => {
                return Err(bad(format!(
                    "bytes {}..{} lie outside kernels.spv ({} bytes)",
                    range.offset,
                    range.offset.saturating_add(range.bytes),
                    spirv_file.len()
                )))
            }
        };
        let words = spirv::words(bytes);
        let info = spirv::parse(&words).map_err(bad)?;
        if info.version > max_version {
            return Err(bad(format!(
                "it is SPIR-V {}.{}, newer than the target's {}",
                info.version.0, info.version.1, target.spirv_version
            )));
        }
        for &number in &info.capabilities {
            let listed = spirv::capability_name(number).filter(|name| {
                matches!(*name, "Shader" | "Matrix") || target.capabilities.iter().any(|c| c == name)
            });
            if listed.is_none() {
                let name = spirv::capability_name(number).map_or(format!("number {number}"), str::to_string);
                return Err(bad(format!(
                    "it declares capability {name}, which the manifest's target does not list"
                )));
            }
        }
        modules.push(words);
        infos.push(info);
    }

    // Weights: each referenced once, at a buffer_align multiple of one buffer.
    let mut weight_layout = crate::device::WeightLayout::new(align, range_of);
    let mut io_size = 0u64;
    let mut pipelines: Vec<PipelineKey> = Vec::new();
    let mut pipeline_of: HashMap<(usize, String), usize> = HashMap::new();
    let mut entries = Vec::new();
    let place = |end: &mut u64, bytes: u64, what: &str| -> Result<u64, RuntimeError> {
        let at = align_up(*end, align).ok_or_else(|| too_big(what))?;
        *end = at.checked_add(range_of(bytes)).ok_or_else(|| too_big(what))?;
        Ok(at)
    };
    // Buffers are laid out for the largest run, every symbol at its maximum.
    let maxima = manifest.max_values();
    crate::device::check_gpu_symbols(&manifest.symbols, "Vulkan")?;
    for view in manifest.entry_views() {
        // Inputs and outputs: one after another in the io buffer.
        let mut io_end = 0u64;
        let mut inputs = Vec::with_capacity(view.inputs.len());
        for spec in view.inputs {
            let bytes = spec.byte_len_at(&maxima).ok_or_else(|| too_big("inputs"))?;
            inputs.push((place(&mut io_end, bytes, "inputs and outputs")?, bytes));
        }
        let mut outputs = Vec::with_capacity(view.outputs.len());
        for spec in view.outputs {
            let bytes = spec.byte_len_at(&maxima).ok_or_else(|| too_big("outputs"))?;
            outputs.push((place(&mut io_end, bytes, "inputs and outputs")?, bytes));
        }
        // The fault words' copy follows the outputs (`faults::check` placed them in the arena).
        let faults = match view.faults {
            Some(f) => {
                let bytes = f.bytes();
                Some(FaultWords {
                    arena: f.offset,
                    io: place(&mut io_end, bytes, "inputs and outputs")?,
                    bytes,
                })
            }
            None => None,
        };
        // The symbol words, then the grids (4-byte aligned, as indirect dispatches want).
        let sized = match manifest.symbols.len() {
            0 => None,
            n => {
                let bytes = 4 * n as u64;
                let symbols = place(&mut io_end, bytes, "inputs and outputs")?;
                let grids = align_up(io_end, 4).ok_or_else(|| too_big("inputs and outputs"))?;
                let grid_bytes = INDIRECT_BYTES
                    .checked_mul(view.steps.len() as u64)
                    .ok_or_else(|| too_big("inputs and outputs"))?;
                io_end = grids.checked_add(grid_bytes).ok_or_else(|| too_big("inputs and outputs"))?;
                Some(SizedRun { symbols, bytes, grids })
            }
        };

        let mut steps = Vec::with_capacity(view.steps.len());
        for step in view.steps {
            let at = &step.label;
            let crate::device::GpuDispatch { module, grid, workgroup, dynamic_shared_bytes } =
                crate::device::gpu_dispatch(step, infos.len(), "Vulkan")?;
            // Workgroup memory is declared in the module, sized once: there is nothing a
            // dispatch could pass.
            if dynamic_shared_bytes != 0 {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} passes {dynamic_shared_bytes} bytes of dynamic shared memory, which Vulkan \
                     does not have (a CUDA artifact's field)"
                )));
            }
            let info = &infos[module];
            let entry = info.entries.get(&step.symbol).ok_or_else(|| {
            let mut names: Vec<&str> = info.entries.keys().map(String::as_str).collect();
            names.sort_unstable();
            RuntimeError::Spirv {
                module,
                message: format!(
                    "step {at:?} uses entry point {:?}, which it does not have (its GLCompute entry points: {})",
                    step.symbol,
                    names.join(", ")
                ),
            }
        })?;
            match entry.local_size {
                Some(size) if size == workgroup => {}
                Some(size) => {
                    return Err(RuntimeError::Spirv {
                        module,
                        message: format!(
                    "entry point {:?} has LocalSize {size:?}, but step {at:?} says workgroup {workgroup:?}",
                    step.symbol
                ),
                    })
                }
                None => {
                    return Err(RuntimeError::Spirv {
                        module,
                        message: format!(
                        "entry point {:?} has no literal LocalSize execution mode nor WorkgroupSize built-in",
                        step.symbol
                    ),
                    })
                }
            }
            if let Some(shared) = entry.shared_bytes.filter(|&n| n > u64::from(target.max_shared_bytes)) {
                return Err(RuntimeError::Spirv {
                    module,
                    message: format!(
                        "entry point {:?} uses {shared} bytes of workgroup memory, more than the target's \
                     max_shared_bytes {}",
                        step.symbol, target.max_shared_bytes
                    ),
                });
            }
            // The largest run's grid (a grid grows with the sizes it is written over).
            let largest = crate::device::grid_at(at, grid, &maxima, &manifest.symbols)?;
            check::check_launch(step, largest, workgroup, target, caps)?;

            let key = (module, step.symbol.clone());
            let pipeline = match pipeline_of.get(&key) {
                Some(&p) if pipelines[p].bindings == step.args.len() => p,
                Some(&p) => {
                    return Err(RuntimeError::invalid(format!(
                    "step {at:?} passes {} buffers to entry point {:?} of module {module}, another step {}",
                    step.args.len(),
                    step.symbol,
                    pipelines[p].bindings
                )))
                }
                None => {
                    let entry = CString::new(step.symbol.clone()).map_err(|_| {
                        RuntimeError::invalid(format!(
                            "step {at:?}: entry point name {:?} contains NUL",
                            step.symbol
                        ))
                    })?;
                    pipelines.push(PipelineKey { module, entry, bindings: step.args.len() });
                    pipeline_of.insert(key, pipelines.len() - 1);
                    pipelines.len() - 1
                }
            };

            let mut bindings = Vec::with_capacity(step.args.len());
            let mut bound = Vec::with_capacity(step.args.len());
            for (arg, buf) in step.args.iter().enumerate() {
                let io = (view.inputs.len(), view.outputs.len());
                let binding =
                    match weight_layout.resolve(at, buf, (manifest.arena_bytes, align), weights, io)? {
                        GpuArg::Arena { offset, bytes } => {
                            Binding { region: Region::Arena, offset, range: range_of(bytes) }
                        }
                        GpuArg::Weight { offset, bytes } => {
                            Binding { region: Region::Weights, offset, range: range_of(bytes) }
                        }
                        GpuArg::Input(i) => {
                            Binding { region: Region::Io, offset: inputs[i].0, range: range_of(inputs[i].1) }
                        }
                        GpuArg::Output(i) => Binding {
                            region: Region::Io,
                            offset: outputs[i].0,
                            range: range_of(outputs[i].1),
                        },
                        // `check_steps` allowed it only in a model with symbols.
                        GpuArg::Symbols => match sized {
                            Some(run) => Binding {
                                region: Region::Io,
                                offset: run.symbols,
                                range: range_of(run.bytes),
                            },
                            None => {
                                return Err(RuntimeError::invalid(format!(
                                "step {at:?} passes the symbol values, but the manifest declares no symbols"
                            )))
                            }
                        },
                    };
                check::check_range(step, arg, binding.range, caps)?;
                bindings.push(binding);
                bound.push(bytes_of(buf, weights, &view, &maxima));
            }
            check_buffers(module, &step.symbol, at, &entry.buffers, &bound)?;
            steps.push(StepPlan { pipeline, grid: grid.clone(), bindings });
        }
        io_size = io_size.max(io_end);
        entries.push(EntryPlan { steps, inputs, outputs, faults, sized });
    }
    // The state's slots were checked against the arena (`model::check_state`).
    let state_bytes = manifest
        .state
        .iter()
        .map(|s| s.offset.saturating_add(s.byte_len().unwrap_or(u64::MAX)))
        .max()
        .unwrap_or(0);
    if state_bytes > manifest.arena_bytes {
        return Err(RuntimeError::invalid(format!(
            "the state's slots end at byte {state_bytes}, past the arena of {} bytes",
            manifest.arena_bytes
        )));
    }
    let slack = |end: u64, what: &str| end.checked_add(SLACK).ok_or_else(|| too_big(what));
    let (weight_list, weights_end) = weight_layout.finish();
    Ok(Plan {
        modules,
        pipelines,
        entries,
        arena_size: slack(manifest.arena_bytes, "arena bytes")?,
        weights: weight_list,
        weights_size: slack(weights_end, "weights")?,
        io_size: slack(io_size, "inputs and outputs")?,
        state_bytes,
    })
}

/// The bytes a checked argument holds (the manifest's, which the loop above checked) in the
/// largest run (`maxima`: every symbol at its maximum).
fn bytes_of(buf: &BufRef, weights: &WeightStore, view: &EntryView<'_>, maxima: &[u64]) -> u64 {
    let spec_bytes = |specs: &[crate::manifest::TensorSpec], index: u32| {
        specs.get(index as usize).and_then(|s| s.byte_len_at(maxima)).unwrap_or(0)
    };
    match buf {
        BufRef::Arena { bytes, .. } => *bytes,
        BufRef::Weight { name, .. } => weights.get(name).map_or(0, |w| w.bytes.len() as u64),
        BufRef::Input { index } => spec_bytes(view.inputs, *index),
        BufRef::Output { index } => spec_bytes(view.outputs, *index),
        BufRef::Symbols => 4 * maxima.len() as u64,
    }
}

/// Each buffer the entry point uses must be a storage buffer of set 0 that the step binds, and
/// no larger than what it binds: a shader indexing past its binding would read or write memory
/// that is not its own.
fn check_buffers(
    module: usize,
    entry: &str,
    step: &str,
    buffers: &[spirv::BufferVar],
    bound: &[u64],
) -> Result<(), RuntimeError> {
    let bad = |message: String| Err(RuntimeError::Spirv { module, message });
    for var in buffers {
        let (set, binding) = (var.set, var.binding);
        if set != 0 {
            return bad(format!("entry point {entry:?} uses descriptor set {set} (Kiln binds set 0 only)"));
        }
        if !var.storage {
            return bad(format!(
                "entry point {entry:?} declares binding {binding} as a uniform buffer, not a storage buffer"
            ));
        }
        let Some(&have) = bound.get(binding as usize) else {
            return bad(format!(
                "entry point {entry:?} uses binding {binding}, but step {step:?} passes {} buffers",
                bound.len()
            ));
        };
        if let Some(need) = var.bytes {
            if need > have {
                return bad(format!(
                    "entry point {entry:?} declares binding {binding} of {need} bytes, but step {step:?} binds {have} bytes there"
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_rounded_and_never_empty() {
        assert_eq!(range_of(0), 4);
        assert_eq!(range_of(3), 4);
        assert_eq!(range_of(5), 8);
        assert_eq!(range_of(256), 256);
        assert_eq!(align_up(1, 256), Some(256));
        assert_eq!(align_up(u64::MAX, 256), None);
    }
}
