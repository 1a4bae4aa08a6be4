//! Small CUDA artifacts for the tests: hand-written PTX (`tests/data/binop.ptx`, instantiated
//! as an `add` and a `mul` module), the toy weights, and a manifest with true digests. Nothing
//! here needs a GPU; `ready()` says whether the tests that run kernels can, and prints
//! `skipped: no CUDA device (…)` when they cannot.

use kiln_runtime::{
    BufRef, CudaTarget, DType, Dispatch, Manifest, ModuleRange, Step, Target, TensorSpec,
    ARTIFACT_FORMAT_VERSION, CUBIN_FILE, PTX_FILE,
};

use super::{c_data, w_data, weights_file, Kernels, TestArtifact, N};

/// `binop.ptx` with kernel `name` computing `op` (`add.rn.f32`, `mul.rn.f32`).
pub fn module(name: &str, op: &str) -> String {
    let text = include_str!("../data/binop.ptx");
    text.replace("NAME", name).replace("OP", op)
}

/// `tests/data/{add,mul}_sm90.cubin`: `binop.ptx` instantiated as in [`CudaArtifact::chain`] and
/// assembled by `ptxas -arch=sm_90` (CUDA 12.9), for the test that runs cubins on sm_90.
pub const SM90_CUBINS: [&[u8]; 2] =
    [include_bytes!("../data/add_sm90.cubin"), include_bytes!("../data/mul_sm90.cubin")];

/// The first CUDA device, when there is one.
pub fn first_device() -> Option<kiln_runtime::CudaDeviceInfo> {
    kiln_runtime::devices().devices.into_iter().find_map(|d| match d {
        kiln_runtime::DeviceInfo::Cuda(c) => Some(c),
        kiln_runtime::DeviceInfo::Cpu { .. } | kiln_runtime::DeviceInfo::Vulkan(_) => None,
    })
}

/// Why the tests that run kernels cannot run here, if they cannot.
pub fn unavailable() -> Option<String> {
    let listed = kiln_runtime::devices();
    if let Some(reason) = listed.cuda_unavailable {
        return Some(reason);
    }
    let any = listed.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Cuda(_)));
    (!any).then(|| "none is listed".to_string())
}

/// True when a CUDA device can run the test; otherwise prints why it is skipped.
pub fn ready() -> bool {
    match unavailable() {
        None => true,
        Some(reason) => {
            eprintln!("skipped: no CUDA device ({reason})");
            false
        }
    }
}

pub fn target() -> CudaTarget {
    CudaTarget {
        precision: "f32".into(),
        tensor_cores: Vec::new(),
        arch_specific: false,
        compute_capability: [8, 0],
        ptx_version: "7.0".into(),
        buffer_align: 256,
        max_workgroup_invocations: 256,
        max_shared_bytes: 0,
        cubins: vec![],
    }
}

pub fn step(symbol: &str, label: &str, module: u32, args: Vec<BufRef>) -> Step {
    Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: Dispatch::gpu_fixed(module, [4, 1, 1], [256, 1, 1]),
        flops: N as u64,
        bytes: 3 * 4 * N as u64,
    }
}

/// The arena offset of t: a nonzero multiple of 256.
pub const T_OFFSET: u64 = 256;
pub const PLANE: u64 = (N * 4) as u64;

/// The chain model, x f32 [1024] → y: t = x·w (module 1, `mul`, into the arena), y = t + c
/// (module 0, `add`).
pub fn chain_manifest() -> Manifest {
    let spec = |name: &str| TensorSpec::fixed(name, DType::F32, &[N as u64]);
    let t = || BufRef::Arena { offset: T_OFFSET, bytes: PLANE };
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: Vec::new(),
        model: "cuda-chain".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Cuda(target()),
        inputs: vec![spec("x")],
        index_bounds: Vec::new(),
        outputs: vec![spec("y")],
        arena_bytes: T_OFFSET + PLANE,
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![
            step(
                "mul",
                "k0 mul [1024]",
                1,
                vec![BufRef::Input { index: 0 }, BufRef::Weight { name: "w".into(), bytes: PLANE }, t()],
            ),
            step(
                "add",
                "k1 add [1024]",
                0,
                vec![t(), BufRef::Weight { name: "c".into(), bytes: PLANE }, BufRef::Output { index: 0 }],
            ),
        ],
    }
}

/// The division model, a i32 [1024] / b i32 [1024] → q (`tests/data/divide.ptx`), whose one
/// step records zero divisors in the fault words at arena offset 0.
pub fn divide_artifact() -> CudaArtifact {
    let spec = |name: &str| TensorSpec::fixed(name, DType::I32, &[N as u64]);
    let words = BufRef::Arena { offset: 0, bytes: 8 };
    let manifest = Manifest {
        model: "cuda-divide".into(),
        inputs: vec![spec("a"), spec("b")],
        outputs: vec![spec("q")],
        arena_bytes: 8,
        faults: Some(kiln_runtime::Faults {
            offset: 0,
            sites: vec![kiln_runtime::FaultSite {
                kind: kiln_runtime::FaultKind::IntDivByZero,
                step: 0,
                op: "div".into(),
                name: Some("q".into()),
                origin: Some("m.ron:3:17".into()),
                shape: vec![N as u64],
                divisor: vec![N as u64],
            }],
        }),
        steps: vec![step(
            "div",
            "k0 div [1024]",
            0,
            vec![BufRef::Input { index: 0 }, BufRef::Input { index: 1 }, BufRef::Output { index: 0 }, words],
        )],
        ..chain_manifest()
    };
    CudaArtifact::new(manifest, &[include_str!("../data/divide.ptx").to_string()])
}

/// The sized model over symbol `rows` (1..=64, `tests/data/sized.ptx`): t = x·w into the
/// arena (planned at 64 rows), y = t + rows, and g = the blocks the second step launched. Both
/// steps read `rows` from the symbol words and launch `ceil(16·rows / 64)` blocks of 64.
pub fn sized_artifact() -> CudaArtifact {
    use kiln_runtime::{Dim, SymbolSpec};
    let rows = super::rows_dim();
    let blocks = super::sized_grid();
    let t = || BufRef::Arena { offset: T_OFFSET, bytes: PLANE };
    let sized_step = |symbol: &str, label: &str, args| Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: Dispatch::Gpu {
            module: 0,
            grid: [blocks.clone(), 1.into(), 1.into()],
            workgroup: [64, 1, 1],
            dynamic_shared_bytes: 0,
        },
        flops: N as u64,
        bytes: 3 * 4 * N as u64,
    };
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        dtype: DType::F32,
        shape: vec![rows.clone(), Dim::Fixed(16)],
    };
    let manifest = Manifest {
        symbols: vec![SymbolSpec { name: "rows".into(), min: 1, max: 64, hint: 8, multiple_of: 1 }],
        model: "cuda-sized".into(),
        inputs: vec![spec("x")],
        outputs: vec![spec("y"), TensorSpec::fixed("g", DType::I32, &[1])],
        steps: vec![
            sized_step(
                "scale",
                "k0 scale [rows,16]",
                vec![
                    BufRef::Input { index: 0 },
                    BufRef::Weight { name: "w".into(), bytes: PLANE },
                    t(),
                    BufRef::Symbols,
                ],
            ),
            sized_step(
                "shift",
                "k1 shift [rows,16]",
                vec![t(), BufRef::Symbols, BufRef::Output { index: 0 }, BufRef::Output { index: 1 }],
            ),
        ],
        ..chain_manifest()
    };
    CudaArtifact::new(manifest, &[include_str!("../data/sized.ptx").to_string()])
}

/// y as the chain model computes it (separate IEEE multiply and add, as on the GPU).
pub fn chain_expected(x: &[f32]) -> Vec<f32> {
    let (w, c) = (w_data(), c_data());
    x.iter().zip(&w).zip(&c).map(|((x, w), c)| x * w + c).collect()
}

/// PTX kernels, their contract in a last comment line; a cubin may stand beside them.
pub struct Ptx;

impl Kernels for Ptx {
    const FILE: &'static str = PTX_FILE;
    const EXTRA: &'static [&'static str] = &[CUBIN_FILE];
    fn stamped(ptx: Vec<u8>, contract: u64) -> Option<Vec<u8>> {
        let mut text = String::from_utf8(ptx).expect("PTX text");
        if kiln_runtime::ptx_contract(text.as_bytes()).is_some() {
            let cut = text.trim_end_matches('\n').rfind('\n').map_or(0, |i| i + 1);
            text.truncate(cut);
        }
        text.push_str(&kiln_runtime::ptx_contract_line(contract));
        Some(text.into_bytes())
    }
}

/// A CUDA artifact in a temporary directory.
pub type CudaArtifact = TestArtifact<Ptx>;

impl CudaArtifact {
    /// Writes `kernels.ptx` from `modules` (one after another), the toy weights and the
    /// manifest with its module ranges and true digests.
    pub fn new(mut manifest: Manifest, modules: &[String]) -> CudaArtifact {
        let mut ptx = Vec::new();
        manifest.modules = modules
            .iter()
            .map(|text| {
                let range = ModuleRange { offset: ptx.len() as u64, bytes: text.len() as u64 };
                ptx.extend_from_slice(text.as_bytes());
                range
            })
            .collect();
        CudaArtifact::write(manifest, &weights_file(), |path| {
            std::fs::write(path, &ptx).expect("write kernels.ptx")
        })
    }

    /// The chain model with modules 0 = add, 1 = mul.
    pub fn chain() -> CudaArtifact {
        CudaArtifact::new(chain_manifest(), &[module("add", "add.rn.f32"), module("mul", "mul.rn.f32")])
    }
}

/// The target of a CUDA manifest.
pub fn cuda_target(m: &mut Manifest) -> &mut CudaTarget {
    match &mut m.target {
        Target::Cuda(c) => c,
        Target::Cpu(cpu) => panic!("a CUDA artifact, not a CPU one for {}", cpu.triple),
        Target::Vulkan(v) => panic!("a CUDA artifact, not a Vulkan one (SPIR-V {})", v.spirv_version),
    }
}
