//! Small Vulkan artifacts for the tests: SPIR-V assembled with `spirv-as` from the committed
//! text under `tests/data/`, weights written with the safetensors crate, and a manifest with
//! true digests. When `spirv-as` or a Vulkan device is missing, `ready()` says why and the test
//! prints `skipped: …` and returns.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use kiln_runtime::{
    BufRef, DType, Dispatch, Manifest, ModuleRange, Step, Target, TensorSpec, VulkanTarget,
    ARTIFACT_FORMAT_VERSION, SPIRV_FILE,
};

use super::{c_data, f32_bytes, w_data, Kernels, TestArtifact, N};

/// The committed kernels, by file stem.
pub const KERNELS: [&str; 6] = ["muladd", "out", "reduce", "types", "subgroup", "sized"];

/// Assembles `tests/data/NAME.spvasm` for Vulkan 1.1 (SPIR-V 1.3) and validates it.
fn assemble(name: &str, work: &Path) -> Result<Vec<u8>, String> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(format!("{name}.spvasm"));
    let out = work.join(format!("{name}.spv"));
    let status = Command::new("spirv-as")
        .args(["--target-env", "vulkan1.1"])
        .arg(&source)
        .arg("-o")
        .arg(&out)
        .status()
        .map_err(|e| format!("spirv-as not found ({e}); `make deps` installs spirv-tools"))?;
    assert!(status.success(), "spirv-as failed on {}", source.display());
    let status = Command::new("spirv-val").args(["--target-env", "vulkan1.1"]).arg(&out).status();
    if let Ok(status) = status {
        assert!(status.success(), "spirv-val refused {name}");
    }
    std::fs::read(&out).map_err(|e| format!("cannot read {}: {e}", out.display()))
}

/// Every committed kernel, assembled once per test binary, or why they cannot be.
pub fn kernels() -> Result<&'static HashMap<&'static str, Vec<u8>>, String> {
    static KERNELS_SPV: OnceLock<Result<HashMap<&'static str, Vec<u8>>, String>> = OnceLock::new();
    KERNELS_SPV
        .get_or_init(|| {
            let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
            KERNELS.iter().map(|&k| Ok((k, assemble(k, dir.path())?))).collect()
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Why the Vulkan tests cannot run here, if they cannot: no `spirv-as`, or no Vulkan device.
pub fn unavailable() -> Option<String> {
    if let Err(reason) = kernels() {
        return Some(reason);
    }
    let listed = kiln_runtime::devices();
    if let Some(reason) = listed.vulkan_unavailable {
        return Some(format!("no Vulkan device ({reason})"));
    }
    let usable = listed.devices.iter().any(|d| matches!(d, kiln_runtime::DeviceInfo::Vulkan(v) if v.compute));
    (!usable).then(|| "no Vulkan device (none has a compute queue)".to_string())
}

/// True when the test can run; otherwise prints why it is skipped.
pub fn ready() -> bool {
    match unavailable() {
        None => true,
        Some(reason) => {
            eprintln!("skipped: {reason}");
            false
        }
    }
}

pub fn target(capabilities: &[&str]) -> VulkanTarget {
    VulkanTarget {
        spirv_version: "1.3".into(),
        capabilities: capabilities.iter().map(|c| c.to_string()).collect(),
        buffer_align: 256,
        max_workgroup_invocations: 64,
        max_shared_bytes: 256,
        subgroup_size: None,
    }
}

pub fn gpu_step(
    symbol: &str,
    label: &str,
    module: u32,
    grid: u32,
    workgroup: u32,
    args: Vec<BufRef>,
) -> Step {
    Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: Dispatch::gpu_fixed(module, [grid, 1, 1], [workgroup, 1, 1]),
        flops: 1024,
        bytes: 12288,
    }
}

/// The arena offsets of the chain model's intermediates: nonzero multiples of 256.
pub const T_OFFSET: u64 = 256;
pub const U_OFFSET: u64 = 4352;
pub const PLANE: u64 = (N * 4) as u64;

/// The chain model: t = x·w, u = t + c (both in the arena), y = 2u + x, and s = Σ r through
/// workgroup-shared memory. Modules: 0 = muladd (two entry points), 1 = out, 2 = reduce.
pub fn chain_manifest() -> Manifest {
    let w = || BufRef::Weight { name: "w".into(), bytes: PLANE };
    let c = || BufRef::Weight { name: "c".into(), bytes: PLANE };
    let t = || BufRef::Arena { offset: T_OFFSET, bytes: PLANE };
    let u = || BufRef::Arena { offset: U_OFFSET, bytes: PLANE };
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: Vec::new(),
        model: "chain".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Vulkan(target(&["Shader"])),
        inputs: vec![
            TensorSpec::fixed("x", DType::F32, &[64, 16]),
            TensorSpec::fixed("r", DType::F32, &[256]),
        ],
        outputs: vec![TensorSpec::fixed("y", DType::F32, &[64, 16]), TensorSpec::fixed("s", DType::F32, &[])],
        arena_bytes: U_OFFSET + PLANE,
        index_bounds: Vec::new(),
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![
            gpu_step("mul", "k0 mul [64,16]", 0, 16, 64, vec![BufRef::Input { index: 0 }, w(), t()]),
            gpu_step("add", "k1 add [64,16]", 0, 16, 64, vec![t(), c(), u()]),
            gpu_step(
                "out",
                "k2 out [64,16]",
                1,
                16,
                64,
                vec![u(), BufRef::Input { index: 0 }, BufRef::Output { index: 0 }],
            ),
            gpu_step(
                "reduce",
                "k3 reduce [256]",
                2,
                1,
                64,
                vec![BufRef::Input { index: 1 }, BufRef::Output { index: 1 }],
            ),
        ],
    }
}

/// The sized model, over symbol `rows` (1..=64): t = x·w into the arena (planned at 64 rows),
/// y = t + rows, and g = the workgroups the second step launched. Both steps read `rows` from
/// the symbol words and launch `ceil(16·rows / 64)` workgroups of 64 (module `sized`).
pub fn sized_manifest() -> Manifest {
    use kiln_runtime::{Dim, SymbolSpec};
    let rows = super::rows_dim();
    let groups = super::sized_grid();
    let dispatch = || Dispatch::Gpu {
        module: 0,
        grid: [groups.clone(), 1.into(), 1.into()],
        workgroup: [64, 1, 1],
        dynamic_shared_bytes: 0,
    };
    let t = || BufRef::Arena { offset: 0, bytes: PLANE };
    let spec = |name: &str| TensorSpec {
        name: name.into(),
        dtype: DType::F32,
        shape: vec![rows.clone(), Dim::Fixed(16)],
    };
    let step = |symbol: &str, label: &str, args| Step {
        symbol: symbol.into(),
        label: label.into(),
        args,
        dispatch: dispatch(),
        flops: 1024,
        bytes: 12288,
    };
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: vec![SymbolSpec { name: "rows".into(), min: 1, max: 64, hint: 8, multiple_of: 1 }],
        model: "sized".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Vulkan(target(&["Shader"])),
        inputs: vec![spec("x")],
        outputs: vec![spec("y"), TensorSpec::fixed("g", DType::I32, &[1])],
        arena_bytes: PLANE,
        index_bounds: Vec::new(),
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![
            step(
                "scale",
                "k0 scale [rows,16]",
                vec![
                    BufRef::Input { index: 0 },
                    BufRef::Weight { name: "w".into(), bytes: PLANE },
                    t(),
                    BufRef::Symbols,
                ],
            ),
            step(
                "shift",
                "k1 shift [rows,16]",
                vec![t(), BufRef::Symbols, BufRef::Output { index: 0 }, BufRef::Output { index: 1 }],
            ),
        ],
    }
}

/// The types model: ao = 3a + k (i64), bo = b² + 0.5 (f64), flags = b > 1 (bool).
pub fn types_manifest() -> Manifest {
    let spec = |name: &str, dtype| TensorSpec::fixed(name, dtype, &[8]);
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: Vec::new(),
        model: "types".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Vulkan(target(&["Shader", "Int64", "Float64", "Int8", "StorageBuffer8BitAccess"])),
        inputs: vec![spec("a", DType::I64), spec("b", DType::F64)],
        outputs: vec![spec("ao", DType::I64), spec("bo", DType::F64), spec("flags", DType::Bool)],
        arena_bytes: 0,
        index_bounds: Vec::new(),
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![gpu_step(
            "types",
            "k0 types [8]",
            0,
            1,
            8,
            vec![
                BufRef::Input { index: 0 },
                BufRef::Weight { name: "k".into(), bytes: 64 },
                BufRef::Input { index: 1 },
                BufRef::Output { index: 0 },
                BufRef::Output { index: 1 },
                BufRef::Output { index: 2 },
            ],
        )],
    }
}

/// The subgroup model: y[i] = the sum of x over i's subgroup (subgroupAdd), for a target that
/// relies on subgroups of `subgroup_size`.
pub fn subgroup_manifest(subgroup_size: u32) -> Manifest {
    let spec = |name: &str| TensorSpec::fixed(name, DType::F32, &[64]);
    let mut target = target(&["Shader", "GroupNonUniform", "GroupNonUniformArithmetic"]);
    target.subgroup_size = Some(subgroup_size);
    Manifest {
        format_version: ARTIFACT_FORMAT_VERSION,
        symbols: Vec::new(),
        model: "subgroup".into(),
        kiln_version: "0.1.0".into(),
        target: Target::Vulkan(target),
        inputs: vec![spec("x")],
        outputs: vec![spec("y")],
        arena_bytes: 0,
        index_bounds: Vec::new(),
        files: Vec::new(),
        modules: Vec::new(),
        state: Vec::new(),
        entries: Vec::new(),
        faults: None,
        steps: vec![gpu_step(
            "subgroup",
            "k0 subgroup_sum [64]",
            0,
            1,
            64,
            vec![BufRef::Input { index: 0 }, BufRef::Output { index: 0 }],
        )],
    }
}

pub fn k_data() -> Vec<i64> {
    (0..8).map(|i| (i - 3) * 1_000_000_007_i64 * 1_000).collect()
}

/// w and c (f32 [64, 16], the CPU toy's values) and k (i64 [8]).
pub fn gpu_weights() -> Vec<u8> {
    let (w, c) = (f32_bytes(&w_data()), f32_bytes(&c_data()));
    let k: Vec<u8> = k_data().iter().flat_map(|v| v.to_le_bytes()).collect();
    let view = |dtype, shape: Vec<usize>, bytes| {
        safetensors::tensor::TensorView::new(dtype, shape, bytes).expect("view")
    };
    let tensors = vec![
        ("w", view(safetensors::Dtype::F32, vec![64, 16], &w)),
        ("c", view(safetensors::Dtype::F32, vec![64, 16], &c)),
        ("k", view(safetensors::Dtype::I64, vec![8], &k)),
    ];
    safetensors::serialize(tensors, None).expect("serialize")
}

/// SPIR-V kernels, their contract in a 16-byte trailer.
pub struct Spirv;

impl Kernels for Spirv {
    const FILE: &'static str = SPIRV_FILE;
    const EXTRA: &'static [&'static str] = &[];
    fn stamped(mut spv: Vec<u8>, contract: u64) -> Option<Vec<u8>> {
        if kiln_runtime::spirv_contract(&spv).is_some() {
            spv.truncate(spv.len() - 16);
        }
        spv.extend_from_slice(&kiln_runtime::spirv_contract_trailer(contract));
        Some(spv)
    }
}

/// A Vulkan artifact in a temporary directory.
pub type GpuArtifact = TestArtifact<Spirv>;

impl GpuArtifact {
    /// Writes `kernels.spv` from the named modules (one after another), the weights and the
    /// manifest with its module ranges and true digests.
    pub fn new(mut manifest: Manifest, modules: &[&str]) -> GpuArtifact {
        let kernels = kernels().expect("kernels (call ready() first)");
        let mut spv = Vec::new();
        manifest.modules = modules
            .iter()
            .map(|name| {
                let bytes = &kernels[name];
                let range = ModuleRange { offset: spv.len() as u64, bytes: bytes.len() as u64 };
                spv.extend_from_slice(bytes);
                range
            })
            .collect();
        GpuArtifact::write(manifest, &gpu_weights(), |path| {
            std::fs::write(path, &spv).expect("write kernels.spv")
        })
    }

    pub fn chain() -> GpuArtifact {
        GpuArtifact::new(chain_manifest(), &["muladd", "out", "reduce"])
    }

    pub fn types() -> GpuArtifact {
        GpuArtifact::new(types_manifest(), &["types"])
    }
}

/// The target of a Vulkan manifest.
pub fn vulkan_target(m: &mut Manifest) -> &mut VulkanTarget {
    match &mut m.target {
        Target::Vulkan(v) => v,
        Target::Cpu(cpu) => panic!("a Vulkan artifact, not a CPU one for {}", cpu.triple),
        Target::Cuda(c) => panic!("a Vulkan artifact, not a CUDA one for {}", c.arch()),
    }
}

/// r: small integers, so every summation order gives the same exact sum.
pub fn r_data() -> Vec<f32> {
    (0..256).map(|i| ((i * 13) % 17) as f32 - 8.0).collect()
}

/// The chain model's outputs: y as the CPU toy computes it, and Σ r.
pub fn chain_expected(x: &[f32], r: &[f32]) -> (Vec<f32>, f32) {
    let (w, c) = (w_data(), c_data());
    let y = x.iter().zip(&w).zip(&c).map(|((x, w), c)| (x * w + c) * 2.0 + x).collect();
    (y, r.iter().sum())
}
