//! Every manifest number of a CUDA artifact checked, and turned into a plan before the driver
//! is touched: module byte ranges in `kernels.ptx` and `kernels.cubin`, dispatch kinds, module
//! indices, launch extents and dynamic shared memory against the target, argument counts, and
//! each argument's buffer and offset. A machine without CUDA therefore reports a malformed artifact exactly as one with a
//! GPU does, and a run only launches what this accepted.

use std::ffi::CString;

use crate::device::GpuArg;
use crate::error::RuntimeError;
use crate::manifest::{CudaTarget, Manifest, ModuleRange, CUBIN_FILE, PTX_FILE};
use crate::symbols::Dim;
use crate::weights::WeightStore;

/// The most pointer arguments a kernel takes: CUDA's classic 4 KiB of kernel parameters, 8 bytes
/// per pointer.
pub(crate) const MAX_ARGS: usize = 4096 / 8;

/// The first bytes of an ELF file, which a cubin is.
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Weights start at multiples of this (and of the target's `buffer_align`), as `cuMemAlloc`
/// aligns allocations, so a weight is as aligned as a buffer of its own would be.
const WEIGHT_ALIGN: u64 = 256;

/// The device buffer an argument points into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Region {
    /// The one arena of intermediates.
    Arena,
    /// The one buffer holding every weight a step uses.
    Weights,
    /// The device copy of the entry point's input `i`.
    Input(usize),
    /// The device copy of the entry point's output `i`.
    Output(usize),
    /// The run's symbol values, one `u32` each ([`crate::BufRef::Symbols`]).
    Symbols,
}

/// One kernel parameter: the device pointer `offset` bytes into `region`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arg {
    pub region: Region,
    pub offset: u64,
}

/// One launch: kernel `symbol` of module `module`, its grid and block, and its pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepPlan {
    pub label: String,
    pub module: usize,
    pub symbol: CString,
    /// The grid over the manifest's symbols (fixed when it has none).
    pub grid: [Dim; 3],
    /// The grid at the symbols' maxima (the grid itself when fixed): the largest launch,
    /// which the device's limits are checked against.
    pub largest: [u32; 3],
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory each launch passes (0: static shared memory only); the
    /// function is opted in to them at load.
    pub dynamic_shared_bytes: u32,
    pub args: Vec<Arg>,
}

/// One module's images: its PTX (NUL-terminated, as `cuModuleLoadDataEx` reads text) and its
/// cubin when the artifact has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModulePlan {
    pub ptx: Vec<u8>,
    pub cubin: Option<Vec<u8>>,
}

/// What to create on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    pub modules: Vec<ModulePlan>,
    /// Each entry point's launches and io sizes, `forward` first.
    pub entries: Vec<EntryPlan>,
    /// Bytes to allocate for the arena (the manifest's, at least 1).
    pub arena_bytes: u64,
    /// Each weight a step uses, once, and its offset in the weights buffer.
    pub weights: Vec<(String, u64)>,
    /// Bytes to allocate for the weights buffer (at least 1).
    pub weights_bytes: u64,
    /// Bytes of the run's symbol words (4 per symbol; 0 when the model has none).
    pub symbol_bytes: u64,
}

/// One entry point: its launches (captured into a graph of its own) and the byte size of each
/// of its inputs and outputs in the largest run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct EntryPlan {
    pub steps: Vec<StepPlan>,
    pub inputs: Vec<u64>,
    pub outputs: Vec<u64>,
}

/// The bytes `range` names in `file`, or why it cannot.
fn slice<'a>(
    file: &'a [u8],
    range: &ModuleRange,
    name: &'static str,
    module: usize,
) -> Result<&'a [u8], RuntimeError> {
    let bad = |message: String| RuntimeError::CudaModule { file: name, module, message };
    let end = range.offset.checked_add(range.bytes);
    let bytes = match end {
        Some(end) if end <= file.len() as u64 => &file[range.offset as usize..end as usize],
        _ => {
            return Err(bad(format!(
                "bytes {}..{} lie outside {name} ({} bytes)",
                range.offset,
                range.offset.saturating_add(range.bytes),
                file.len()
            )))
        }
    };
    if bytes.is_empty() {
        return Err(bad("it is empty".into()));
    }
    Ok(bytes)
}

/// Checks the manifest against `kernels.ptx`, `kernels.cubin` and the weights, and lays out
/// the device buffers.
pub(crate) fn plan(
    manifest: &Manifest,
    target: &CudaTarget,
    ptx_file: &[u8],
    cubin_file: Option<&[u8]>,
    weights: &WeightStore,
) -> Result<Plan, RuntimeError> {
    let align = target.buffer_align;
    if !align.is_power_of_two() {
        return Err(RuntimeError::invalid(format!(
            "the target's buffer_align {align} is not a power of two"
        )));
    }

    // Modules: PTX text ranges, and the cubins when there are any (one per module).
    let cubins = match (target.cubins.len(), cubin_file) {
        (0, _) => None,
        (n, _) if n != manifest.modules.len() => {
            return Err(RuntimeError::invalid(format!(
                "the target lists {n} cubins for {} modules (there must be one per module, or none)",
                manifest.modules.len()
            )))
        }
        (_, None) => return Err(RuntimeError::NoDigest { file: CUBIN_FILE.to_string() }),
        (_, Some(file)) => Some(file),
    };
    let mut modules = Vec::with_capacity(manifest.modules.len());
    for (i, range) in manifest.modules.iter().enumerate() {
        let text = slice(ptx_file, range, PTX_FILE, i)?;
        if let Some(at) = text.iter().position(|&b| b == 0) {
            return Err(RuntimeError::CudaModule {
                file: PTX_FILE,
                module: i,
                message: format!("it holds a NUL byte at offset {} (PTX is text)", range.offset + at as u64),
            });
        }
        let mut ptx = Vec::with_capacity(text.len() + 1);
        ptx.extend_from_slice(text);
        ptx.push(0);
        let cubin = match (cubins, target.cubins.get(i)) {
            (Some(file), Some(range)) => {
                let image = slice(file, range, CUBIN_FILE, i)?;
                // The driver takes an image without its length and reads anything that is not
                // ELF as NUL-terminated text, so only an ELF image may reach it.
                if !image.starts_with(ELF_MAGIC) {
                    return Err(RuntimeError::CudaModule {
                        file: CUBIN_FILE,
                        module: i,
                        message: "it is not an ELF image (a cubin starts with \\x7fELF)".into(),
                    });
                }
                Some(image.to_vec())
            }
            _ => None,
        };
        modules.push(ModulePlan { ptx, cubin });
    }

    // Buffers hold the largest run, every symbol at its maximum.
    crate::device::check_gpu_symbols(&manifest.symbols, "CUDA")?;
    let maxima = manifest.max_values();
    let sizes = |specs: &[crate::manifest::TensorSpec], kind: &str| -> Result<Vec<u64>, RuntimeError> {
        specs
            .iter()
            .map(|spec| {
                spec.byte_len_at(&maxima).ok_or_else(|| {
                    RuntimeError::invalid(format!("{kind} {:?} does not fit in 64-bit sizes", spec.name))
                })
            })
            .collect()
    };
    let mut weight_layout = crate::device::WeightLayout::new(align.max(WEIGHT_ALIGN), |bytes| bytes);

    let mut entries = Vec::new();
    for view in manifest.entry_views() {
        let inputs = sizes(view.inputs, "input")?;
        let outputs = sizes(view.outputs, "output")?;
        let mut steps = Vec::with_capacity(view.steps.len());
        for step in view.steps {
            let at = &step.label;
            let crate::device::GpuDispatch { module, grid, workgroup: block, dynamic_shared_bytes } =
                crate::device::gpu_dispatch(step, manifest.modules.len(), "CUDA")?;
            let largest = crate::device::grid_at(at, grid, &maxima, &manifest.symbols)?;
            if largest.contains(&0) || block.contains(&0) {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} has grid {largest:?} and workgroup {block:?}: every extent must be at least 1"
                )));
            }
            let threads = block.iter().map(|&n| u64::from(n)).product::<u64>();
            if threads > u64::from(target.max_workgroup_invocations) {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} has workgroup {block:?} ({threads} threads), more than the target's \
                 max_workgroup_invocations {}",
                    target.max_workgroup_invocations
                )));
            }
            // The target's figure is what the device is checked against, so no launch may ask
            // for more.
            if dynamic_shared_bytes > target.max_shared_bytes {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} passes {dynamic_shared_bytes} bytes of dynamic shared memory, more than the \
                 target's max_shared_bytes {}",
                    target.max_shared_bytes
                )));
            }
            if step.args.len() > MAX_ARGS {
                return Err(RuntimeError::invalid(format!(
                    "step {at:?} passes {} buffers, more than the {MAX_ARGS} pointers that fit in a CUDA \
                 kernel's 4 KiB of parameters",
                    step.args.len()
                )));
            }
            let symbol = CString::new(step.symbol.clone()).map_err(|_| {
                RuntimeError::invalid(format!("step {at:?}: kernel name {:?} contains NUL", step.symbol))
            })?;

            let mut args = Vec::with_capacity(step.args.len());
            for buf in &step.args {
                let io = (view.inputs.len(), view.outputs.len());
                let arg = match weight_layout.resolve(at, buf, (manifest.arena_bytes, align), weights, io)? {
                    GpuArg::Arena { offset, .. } => Arg { region: Region::Arena, offset },
                    GpuArg::Weight { offset, .. } => Arg { region: Region::Weights, offset },
                    GpuArg::Input(i) => Arg { region: Region::Input(i), offset: 0 },
                    GpuArg::Output(i) => Arg { region: Region::Output(i), offset: 0 },
                    // `check_steps` allowed it only in a model with symbols.
                    GpuArg::Symbols => Arg { region: Region::Symbols, offset: 0 },
                };
                args.push(arg);
            }
            steps.push(StepPlan {
                label: at.clone(),
                module,
                symbol,
                grid: grid.clone(),
                largest,
                block,
                dynamic_shared_bytes,
                args,
            });
        }
        entries.push(EntryPlan { steps, inputs, outputs });
    }
    let (weight_list, weights_end) = weight_layout.finish();
    Ok(Plan {
        modules,
        entries,
        arena_bytes: manifest.arena_bytes.max(1),
        weights: weight_list,
        weights_bytes: weights_end.max(1),
        symbol_bytes: 4 * manifest.symbols.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::cuda::check::tests::target;
    use crate::manifest::{BufRef, DType, Dispatch, Step, Target, TensorSpec};

    const PTX: &[u8] = b".version 7.0\n.target sm_80\n.address_size 64\n// module 0\n// module 1\n";

    fn weights() -> WeightStore {
        let w = vec![0u8; 4096];
        let c = vec![1u8; 4096];
        WeightStore::from_owned(vec![
            ("w".into(), DType::F32, vec![1024], w),
            ("c".into(), DType::F32, vec![1024], c),
        ])
        .unwrap()
    }

    fn step(label: &str, module: u32, args: Vec<BufRef>) -> Step {
        Step {
            symbol: "add".into(),
            label: label.into(),
            args,
            dispatch: Dispatch::gpu_fixed(module, [4, 1, 1], [256, 1, 1]),
            flops: 1024,
            bytes: 12288,
        }
    }

    /// Two modules, two steps: t = x·w in the arena, y = t + c.
    fn manifest() -> Manifest {
        let spec = |name: &str| TensorSpec::fixed(name, DType::F32, &[1024]);
        Manifest {
            format_version: crate::ARTIFACT_FORMAT_VERSION,
            symbols: Vec::new(),
            model: "chain".into(),
            kiln_version: "0.1.0".into(),
            target: Target::Cuda(target(8, 0)),
            inputs: vec![spec("x")],
            index_bounds: vec![],
            outputs: vec![spec("y")],
            arena_bytes: 256 + 4096,
            files: vec![],
            modules: vec![ModuleRange { offset: 0, bytes: 56 }, ModuleRange { offset: 56, bytes: 12 }],
            state: Vec::new(),
            entries: Vec::new(),
            faults: None,
            steps: vec![
                step(
                    "k0 mul",
                    1,
                    vec![
                        BufRef::Input { index: 0 },
                        BufRef::Weight { name: "w".into(), bytes: 4096 },
                        BufRef::Arena { offset: 256, bytes: 4096 },
                    ],
                ),
                step(
                    "k1 add",
                    0,
                    vec![
                        BufRef::Arena { offset: 256, bytes: 4096 },
                        BufRef::Weight { name: "c".into(), bytes: 4096 },
                        BufRef::Output { index: 0 },
                    ],
                ),
            ],
        }
    }

    fn plan_of(m: &Manifest, cubin: Option<&[u8]>) -> Result<Plan, RuntimeError> {
        let Target::Cuda(target) = &m.target else { panic!("a CUDA manifest") };
        plan(m, target, PTX, cubin, &weights())
    }

    fn err(m: &Manifest) -> String {
        plan_of(m, None).unwrap_err().to_string()
    }

    #[test]
    fn a_valid_manifest_is_laid_out() {
        let plan = plan_of(&manifest(), None).unwrap();
        assert_eq!(plan.modules.len(), 2);
        assert_eq!(plan.modules[1].ptx, b"// module 1\n\0");
        assert_eq!(plan.modules[0].cubin, None);
        assert_eq!(plan.weights, vec![("w".to_string(), 0), ("c".to_string(), 4096)]);
        assert_eq!((plan.weights_bytes, plan.arena_bytes), (8192, 4352));
        let forward = &plan.entries[0];
        assert_eq!((forward.inputs.clone(), forward.outputs.clone()), (vec![4096], vec![4096]));
        let first = &forward.steps[0];
        assert_eq!(
            (first.module, first.symbol.as_c_str(), first.largest, first.block, first.dynamic_shared_bytes),
            (1, c"add", [4, 1, 1], [256, 1, 1], 0)
        );
        assert_eq!(
            first.args,
            vec![
                Arg { region: Region::Input(0), offset: 0 },
                Arg { region: Region::Weights, offset: 0 },
                Arg { region: Region::Arena, offset: 256 },
            ]
        );
        assert_eq!(forward.steps[1].args[2], Arg { region: Region::Output(0), offset: 0 });
    }

    #[test]
    fn empty_buffers_still_allocate_a_byte() {
        let mut m = manifest();
        m.steps.clear();
        m.arena_bytes = 0;
        let plan = plan_of(&m, None).unwrap();
        assert_eq!((plan.arena_bytes, plan.weights_bytes), (1, 1));
    }

    #[test]
    fn module_indices_and_dispatch_kinds() {
        let mut m = manifest();
        m.steps[1].dispatch = Dispatch::gpu_fixed(2, [4, 1, 1], [256, 1, 1]);
        assert_eq!(
            err(&m),
            "invalid manifest: step \"k1 add\" uses module 2, but the manifest has 2 modules"
        );
        let mut m = manifest();
        m.steps[0].dispatch = Dispatch::Cpu { range: crate::Dim::Fixed(1024), grain: 64 };
        assert_eq!(err(&m), "invalid manifest: step \"k0 mul\" is a CPU dispatch in a CUDA artifact");
    }

    #[test]
    fn launch_extents_and_argument_counts() {
        let mut m = manifest();
        m.steps[0].dispatch = Dispatch::gpu_fixed(0, [0, 1, 1], [256, 1, 1]);
        assert!(err(&m).ends_with("every extent must be at least 1"));
        let mut m = manifest();
        m.steps[0].dispatch = Dispatch::gpu_fixed(0, [1, 1, 1], [512, 1, 1]);
        assert_eq!(
            err(&m),
            "invalid manifest: step \"k0 mul\" has workgroup [512, 1, 1] (512 threads), more than the target's \
             max_workgroup_invocations 256"
        );
        // Dynamic shared memory within the target's max_shared_bytes is carried to the launch.
        let mut m = manifest();
        let Target::Cuda(t) = &mut m.target else { unreachable!() };
        t.max_shared_bytes = 65536;
        let dynamic = |bytes| Dispatch::Gpu {
            module: 0,
            grid: [4, 1, 1].map(crate::Dim::Fixed),
            workgroup: [256, 1, 1],
            dynamic_shared_bytes: bytes,
        };
        m.steps[1].dispatch = dynamic(65536);
        let plan = plan_of(&m, None).unwrap();
        let steps = &plan.entries[0].steps;
        assert_eq!((steps[0].dynamic_shared_bytes, steps[1].dynamic_shared_bytes), (0, 65536));
        m.steps[1].dispatch = dynamic(65537);
        assert_eq!(
            err(&m),
            "invalid manifest: step \"k1 add\" passes 65537 bytes of dynamic shared memory, more than the \
             target's max_shared_bytes 65536"
        );
        let mut m = manifest();
        m.steps[0].args = vec![BufRef::Input { index: 0 }; MAX_ARGS + 1];
        assert_eq!(
            err(&m),
            "invalid manifest: step \"k0 mul\" passes 513 buffers, more than the 512 pointers that fit in a \
             CUDA kernel's 4 KiB of parameters"
        );
        m.steps[0].args.pop();
        plan_of(&m, None).unwrap();
        m.steps[0].symbol = "a\0b".into();
        assert!(err(&m).ends_with("kernel name \"a\\0b\" contains NUL"), "{}", err(&m));
    }

    #[test]
    fn arguments_are_checked() {
        let mut m = manifest();
        m.steps[0].args[2] = BufRef::Arena { offset: 512, bytes: 4096 };
        assert_eq!(
            err(&m),
            "step \"k0 mul\" uses arena bytes 512..4608, outside the arena (arena of 4352 bytes)"
        );
        m.steps[0].args[2] = BufRef::Arena { offset: 128, bytes: 64 };
        assert_eq!(
            err(&m),
            "step \"k0 mul\" uses arena bytes 128..192, not a multiple of the target's buffer_align (arena of \
             4352 bytes)"
        );
        let mut m = manifest();
        m.steps[1].args[1] = BufRef::Weight { name: "c".into(), bytes: 16 };
        assert_eq!(
            err(&m),
            "step \"k1 add\" expects weight \"c\" of 16 bytes, the weights file holds 4096 bytes"
        );
        m.steps[1].args[1] = BufRef::Weight { name: "nope".into(), bytes: 16 };
        assert_eq!(err(&m), "step \"k1 add\" uses weight \"nope\", which the weights file does not hold");
        let mut m = manifest();
        m.steps[1].args[2] = BufRef::Output { index: 1 };
        assert_eq!(err(&m), "step \"k1 add\" uses output 1, but the model has 1 outputs");
        let mut m = manifest();
        let Target::Cuda(t) = &mut m.target else { unreachable!() };
        t.buffer_align = 0;
        assert_eq!(err(&m), "invalid manifest: the target's buffer_align 0 is not a power of two");
    }

    #[test]
    fn module_ranges_and_cubins() {
        let mut m = manifest();
        m.modules[1] = ModuleRange { offset: 56, bytes: 100 };
        assert_eq!(err(&m), "module 1 of kernels.ptx: bytes 56..156 lie outside kernels.ptx (68 bytes)");
        m.modules[1] = ModuleRange { offset: 56, bytes: 0 };
        assert_eq!(err(&m), "module 1 of kernels.ptx: it is empty");

        let with_nul = [PTX, b"\0"].concat();
        let mut m = manifest();
        m.modules[1] = ModuleRange { offset: 56, bytes: 13 };
        let Target::Cuda(t) = &m.target else { unreachable!() };
        let e = plan(&m, t, &with_nul, None, &weights()).unwrap_err().to_string();
        assert_eq!(e, "module 1 of kernels.ptx: it holds a NUL byte at offset 68 (PTX is text)");

        let mut m = manifest();
        let Target::Cuda(t) = &mut m.target else { unreachable!() };
        t.cubins = vec![ModuleRange { offset: 0, bytes: 4 }];
        assert_eq!(
            err(&m),
            "invalid manifest: the target lists 1 cubins for 2 modules (there must be one per module, or none)"
        );
        let Target::Cuda(t) = &mut m.target else { unreachable!() };
        t.cubins.push(ModuleRange { offset: 4, bytes: 4 });
        assert_eq!(err(&m), "the manifest records no size and crc32 for kernels.cubin: recompile the model");
        let plan = plan_of(&m, Some(b"\x7fELF\x7fELF")).unwrap();
        assert_eq!(plan.modules[0].cubin.as_deref(), Some(&b"\x7fELF"[..]));
        assert_eq!(plan.modules[1].cubin.as_deref(), Some(&b"\x7fELF"[..]));
        let e = plan_of(&m, Some(b"\x7fELF")).unwrap_err().to_string();
        assert_eq!(e, "module 1 of kernels.cubin: bytes 4..8 lie outside kernels.cubin (4 bytes)");
        let e = plan_of(&m, Some(b"\x7fELFCUBN")).unwrap_err().to_string();
        assert_eq!(e, "module 1 of kernels.cubin: it is not an ELF image (a cubin starts with \\x7fELF)");
    }
}
