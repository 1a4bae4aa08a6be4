//! Vulkan artifacts on a real device (lavapipe on a machine without a GPU): exact results,
//! replay, GPU-timestamp profiles, and every refusal the Vulkan loader promises. Each test
//! prints `skipped: …` and returns when `spirv-as` or a Vulkan device is missing.

mod common;

use common::gpu::*;
use common::{run_sized, sized_expected, x_data, Toy, N};
use kiln_runtime::{
    BufRef, DType, DeviceInfo, Dispatch, Model, Options, RuntimeError, Tensor, TensorRef, SPIRV_FILE,
    WEIGHTS_FILE,
};

const X_SHAPE: [u64; 2] = [64, 16];
const R_SHAPE: [u64; 1] = [256];

fn load(artifact: &GpuArtifact, device: Option<&str>) -> Result<Model, RuntimeError> {
    Model::load_with(artifact.path(), &Options { threads: None, device: device.map(str::to_string) })
}

fn load_err(artifact: &GpuArtifact) -> String {
    match load(artifact, None) {
        Ok(_) => panic!("the artifact was accepted"),
        Err(e) => e.to_string(),
    }
}

fn run_chain(model: &mut Model, x: &[f32], r: &[f32]) -> (Vec<f32>, f32) {
    let out = model.run(&[TensorRef::f32("x", &X_SHAPE, x), TensorRef::f32("r", &R_SHAPE, r)]).unwrap();
    assert_eq!((out[0].name(), out[0].shape()), ("y", &X_SHAPE[..]));
    assert_eq!((out[1].name(), out[1].shape()), ("s", &[][..]));
    (out[0].as_f32().unwrap().to_vec(), out[1].as_f32().unwrap()[0])
}

#[test]
fn chain_runs_exactly_and_replays() {
    if !ready() {
        return;
    }
    let artifact = GpuArtifact::chain();
    let mut model = load(&artifact, None).unwrap();
    assert!(matches!(model.device(), DeviceInfo::Vulkan(_)), "{:?}", model.device());
    assert_eq!(model.threads(), 1);
    assert_eq!(model.arena_bytes(), U_OFFSET + PLANE);
    let (x, r) = (x_data(), r_data());
    let expected = chain_expected(&x, &r);
    let first = run_chain(&mut model, &x, &r);
    assert_eq!(first, expected);
    // Replays of the one recorded command buffer, with other inputs and then the first again.
    let x2: Vec<f32> = x.iter().map(|v| v * -0.5 + 1.0).collect();
    let r2: Vec<f32> = r.iter().map(|v| v * 3.0).collect();
    assert_eq!(run_chain(&mut model, &x2, &r2), chain_expected(&x2, &r2));
    for _ in 0..3 {
        assert_eq!(run_chain(&mut model, &x, &r), expected);
    }
    // run_into writes caller buffers, misaligned ones included.
    let x_bytes = common::f32_bytes(&x);
    let r_bytes = common::f32_bytes(&r);
    let mut y_store = vec![0u8; N * 4 + 1];
    let mut s = [0u8; 4];
    let inputs = [
        TensorRef::new("x", DType::F32, &X_SHAPE, &x_bytes),
        TensorRef::new("r", DType::F32, &R_SHAPE, &r_bytes),
    ];
    model.run_into(&inputs, &mut [&mut y_store[1..], &mut s]).unwrap();
    assert_eq!(y_store[1..], common::f32_bytes(&expected.0));
    assert_eq!(f32::from_le_bytes(s), expected.1);
    let err = model.run_into(&inputs, &mut [&mut y_store[..8], &mut s]).unwrap_err();
    assert_eq!(err.to_string(), "output \"y\" needs 4096 bytes, got 8");

    // The model moves to another thread and runs there.
    let got = std::thread::spawn(move || run_chain(&mut model, &x, &r)).join().unwrap();
    assert_eq!(got, expected);
}

#[test]
fn i64_f64_and_bool_buffers() {
    if !ready() {
        return;
    }
    let mut model = load(&GpuArtifact::types(), Some("vulkan")).unwrap();
    let a: Vec<i64> = (0..8).map(|i| i64::MAX / 4 - i * 0x1_0000_0001).collect();
    let b: Vec<f64> = (0..8).map(|i| 0.3 * i as f64 - 0.7).collect();
    let b_bytes: Vec<u8> = b.iter().flat_map(|v| v.to_le_bytes()).collect();
    let out =
        model.run(&[TensorRef::i64("a", &[8], &a), TensorRef::new("b", DType::F64, &[8], &b_bytes)]).unwrap();
    let k = k_data();
    let ao: Vec<i64> = a.iter().zip(&k).map(|(a, k)| a.wrapping_mul(3).wrapping_add(*k)).collect();
    assert_eq!(out[0].as_i64().unwrap(), ao);
    let bo: Vec<f64> = b.iter().map(|b| b * b + 0.5).collect();
    assert_eq!(out[1].as_f64().unwrap(), bo);
    let flags: Vec<u8> = b.iter().map(|&b| u8::from(b > 1.0)).collect();
    assert_eq!((out[2].dtype(), out[2].bytes()), (DType::Bool, &flags[..]));
    assert!(flags.contains(&0) && flags.contains(&1));
}

#[test]
fn subgroup_arithmetic_with_the_devices_subgroup_size() {
    if !ready() {
        return;
    }
    let size = match kiln_runtime::devices().devices.iter().find_map(|d| match d {
        DeviceInfo::Vulkan(v) if v.index == 0 => Some(v.subgroup_size),
        _ => None,
    }) {
        Some(size) => size,
        None => panic!("ready() found a Vulkan device"),
    };
    let mut model =
        load(&GpuArtifact::new(subgroup_manifest(size), &["subgroup"]), Some("vulkan:0")).unwrap();
    let x: Vec<f32> = (0..64).map(|i| (i % 7) as f32 - 3.0).collect();
    let out = model.run(&[TensorRef::f32("x", &[64], &x)]).unwrap();
    let expected: Vec<f32> = (0..64)
        .map(|i| {
            let first = i / size as usize * size as usize;
            x[first..first + size as usize].iter().sum()
        })
        .collect();
    assert_eq!(out[0].as_f32().unwrap(), expected, "subgroups of {size}");

    // A subgroup size the device neither runs nor can be made to run.
    let err = load(&GpuArtifact::new(subgroup_manifest(size * 64), &["subgroup"]), Some("vulkan:0"))
        .unwrap_err()
        .to_string();
    let expected = format!("the artifact needs subgroup size {}, but device vulkan:0 (", size * 64);
    assert!(err.starts_with(&expected) && err.contains(&format!("runs subgroups of {size}")), "{err}");
}

#[test]
fn profile_times_each_step_on_the_gpu() {
    if !ready() {
        return;
    }
    let mut model = load(&GpuArtifact::chain(), None).unwrap();
    let (x, r) = (x_data(), r_data());
    let inputs = [TensorRef::f32("x", &X_SHAPE, &x), TensorRef::f32("r", &R_SHAPE, &r)];
    let (outputs, profile) = model.run_profiled(&inputs, 3).unwrap();
    let y: Vec<f32> = outputs[0].as_f32().unwrap().to_vec();
    assert_eq!((y, outputs[1].as_f32().unwrap()[0]), chain_expected(&x, &r));
    let labels: Vec<&str> = profile.steps.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["k0 mul [64,16]", "k1 add [64,16]", "k2 out [64,16]", "k3 reduce [256]"]);
    assert_eq!((profile.repeats, profile.threads, profile.arena_bytes), (3, 1, U_OFFSET + PLANE));
    for step in &profile.steps {
        assert!(step.time.as_nanos() > 0, "step {} has no time: {profile}", step.label);
    }
    // (No comparison of the steps' sum with the whole run: each is a median over the repeats,
    // and a sum of medians may exceed the median of the sums on a busy machine.)
    assert!(profile.to_string().contains("k3 reduce [256]"));
    // The plain run is the other recorded command buffer; it agrees.
    assert_eq!(run_chain(&mut model, &x, &r), chain_expected(&x, &r));
}

#[test]
fn devices_are_listed_and_selected() {
    if !ready() {
        return;
    }
    let listed = kiln_runtime::devices();
    assert_eq!(listed.devices[0].id(), "cpu");
    let vulkan: Vec<_> = listed
        .devices
        .iter()
        .filter_map(|d| match d {
            DeviceInfo::Vulkan(v) => Some(v),
            DeviceInfo::Cpu { .. } | DeviceInfo::Cuda(_) => None,
        })
        .collect();
    assert!(!vulkan.is_empty() && listed.vulkan_unavailable.is_none(), "{listed:?}");
    let first = vulkan[0];
    assert_eq!(first.index, 0);
    assert!(first.subgroup_size > 0 && first.max_workgroup_invocations >= 128, "{first:?}");
    let line = DeviceInfo::Vulkan(first.clone()).to_string();
    assert!(line.starts_with(&format!("vulkan:0  {}  ", first.name)), "{line}");

    let artifact = GpuArtifact::chain();
    let model = load(&artifact, Some("vulkan:0")).unwrap();
    assert_eq!(model.device().id(), "vulkan:0");
    let err = load(&artifact, Some(&format!("vulkan:{}", vulkan.len()))).unwrap_err().to_string();
    assert!(
        err.starts_with(&format!(
            "no device matches \"vulkan:{}\": this machine has vulkan:0 (",
            vulkan.len()
        )),
        "{err}"
    );
    let err = load(&artifact, Some("cpu")).unwrap_err().to_string();
    assert!(err.starts_with("a Vulkan artifact (SPIR-V 1.3) cannot run on device cpu: "), "{err}");
    let err = load(&artifact, Some("tpu")).unwrap_err().to_string();
    assert!(err.starts_with("no device matches \"tpu\""), "{err}");
}

/// CPU artifacts on Vulkan and GPU dispatches in CPU artifacts: refused without any device.
#[test]
fn cpu_artifacts_are_refused_on_vulkan() {
    let toy = Toy::new();
    let err =
        Model::load_with(toy.path(), &Options { device: Some("vulkan:0".into()), ..Options::default() })
            .unwrap_err()
            .to_string();
    assert!(
        err.contains("a CPU artifact (compiled for ") && err.contains("cannot run on device vulkan:0"),
        "{err}"
    );
    let mut toy = toy;
    toy.edit(|m| m.steps[1].dispatch = Dispatch::gpu_fixed(0, [1, 1, 1], [1, 1, 1]));
    let err = Model::load_with(toy.path(), &Options::default()).unwrap_err().to_string();
    assert_eq!(err, "invalid manifest: step \"k1 add [64,16]\" is a GPU dispatch in a CPU artifact");
}

#[test]
fn refuses_bad_modules() {
    if !ready() {
        return;
    }
    let spv_len = std::fs::metadata(GpuArtifact::chain().file(SPIRV_FILE)).unwrap().len();
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.modules[2].bytes += 64);
    assert_eq!(
        load_err(&a),
        format!(
            "SPIR-V module 2 of kernels.spv: bytes {}..{} lie outside kernels.spv ({spv_len} bytes)",
            a.manifest.modules[2].offset,
            a.manifest.modules[2].offset + a.manifest.modules[2].bytes
        )
    );
    // Two steps swapped and relabelled in order: structurally sound, but not what the modules
    // were compiled for.
    let mut a = GpuArtifact::chain();
    a.edit_by_hand(|m| {
        m.steps.swap(0, 1);
        let (l0, l1) = (m.steps[0].label.clone(), m.steps[1].label.clone());
        m.steps[0].label = l1;
        m.steps[1].label = l0;
    });
    let err = load_err(&a);
    assert!(
        err.starts_with("manifest.ron does not describe the kernels in kernels.spv (contract digest "),
        "{err}"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.modules[1].offset += 2);
    assert!(load_err(&a).contains("are not 4-byte aligned"), "{}", load_err(&a));
    // A module range that starts inside another module: no magic number there.
    let mut a = GpuArtifact::chain();
    a.edit(|m| {
        m.modules[1].offset += 8;
        m.modules[1].bytes -= 8;
    });
    let err = load_err(&a);
    assert!(
        err.starts_with("SPIR-V module 1 of kernels.spv: it starts with 0x") && err.contains("magic"),
        "{err}"
    );
    // A corrupted magic number, with digests that match the corrupt file.
    let mut a = GpuArtifact::chain();
    let mut bytes = std::fs::read(a.file(SPIRV_FILE)).unwrap();
    bytes[0] ^= 0xff;
    std::fs::write(a.file(SPIRV_FILE), &bytes).unwrap();
    a.refresh_digests();
    assert!(
        load_err(&a).starts_with("SPIR-V module 0 of kernels.spv: it starts with 0x072302fc"),
        "{}",
        load_err(&a)
    );
    // A step naming a module that does not exist.
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[2].dispatch = Dispatch::gpu_fixed(3, [16, 1, 1], [64, 1, 1]));
    assert_eq!(
        load_err(&a),
        "invalid manifest: step \"k2 out [64,16]\" uses module 3, but the manifest has 3 modules"
    );
    // kernels.spv changed under the manifest.
    let a = GpuArtifact::chain();
    std::fs::write(a.file(SPIRV_FILE), b"\x03\x02\x23\x07").unwrap();
    assert!(load_err(&a).starts_with("kernels.spv is 4 bytes, the manifest says"), "{}", load_err(&a));
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.files.retain(|f| f.name != SPIRV_FILE));
    assert_eq!(load_err(&a), "the manifest records no size and crc32 for kernels.spv: recompile the model");
}

#[test]
fn refuses_bad_entry_points_and_capabilities() {
    if !ready() {
        return;
    }
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[0].symbol = "mull".into());
    assert_eq!(
        load_err(&a),
        "SPIR-V module 0 of kernels.spv: step \"k0 mul [64,16]\" uses entry point \"mull\", which it does not \
         have (its GLCompute entry points: add, mul)"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[1].dispatch = Dispatch::gpu_fixed(0, [8, 1, 1], [128, 1, 1]));
    assert_eq!(
        load_err(&a),
        "SPIR-V module 0 of kernels.spv: entry point \"add\" has LocalSize [64, 1, 1], but step \"k1 add [64,16]\" \
         says workgroup [128, 1, 1]"
    );
    // One entry point bound with two argument counts.
    let mut a = GpuArtifact::chain();
    a.edit(|m| {
        let mut extra = m.steps[0].clone();
        extra.args.push(BufRef::Output { index: 1 });
        extra.label = format!("k{} mul again", m.steps.len());
        m.steps.push(extra);
    });
    assert!(load_err(&a).contains("passes 4 buffers to entry point \"mul\" of module 0, another step 3"));

    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).capabilities.push("Int128".into()));
    assert!(load_err(&a).starts_with("invalid manifest: capability \"Int128\" is unknown to this runtime"));
    // A module declaring a capability the target does not list never reaches the driver.
    let mut a = GpuArtifact::types();
    a.edit(|m| vulkan_target(m).capabilities.retain(|c| c != "Int64"));
    assert_eq!(
        load_err(&a),
        "SPIR-V module 0 of kernels.spv: it declares capability Int64, which the manifest's target does not list"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).spirv_version = "1.0".into());
    assert!(load_err(&a).contains("it is SPIR-V 1.3, newer than the target's 1.0"), "{}", load_err(&a));
}

#[test]
fn refuses_launches_the_device_cannot_run() {
    if !ready() {
        return;
    }
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[3].dispatch = Dispatch::gpu_fixed(2, [0, 1, 1], [64, 1, 1]));
    assert_eq!(
        load_err(&a),
        "invalid manifest: step \"k3 reduce [256]\" has grid [0, 1, 1] and workgroup [64, 1, 1]: every extent \
         must be at least 1"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[3].dispatch = Dispatch::gpu_fixed(2, [1, 1, u32::MAX], [64, 1, 1]));
    assert!(load_err(&a).contains("(maxComputeWorkGroupCount)"), "{}", load_err(&a));
    // More invocations per workgroup than any device allows.
    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).max_workgroup_invocations = 1 << 20);
    let err = load_err(&a);
    assert!(
        err.starts_with("the artifact needs workgroups of 1048576 invocations, but device vulkan:"),
        "{err}"
    );
    assert!(err.ends_with("(maxComputeWorkGroupInvocations)"), "{err}");
    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).max_shared_bytes = u32::MAX);
    assert!(load_err(&a).contains("(maxComputeSharedMemorySize)"), "{}", load_err(&a));
    // The reduction's workgroup array is 64 floats: more than the target says it may use.
    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).max_shared_bytes = 255);
    assert_eq!(
        load_err(&a),
        "SPIR-V module 2 of kernels.spv: entry point \"reduce\" uses 256 bytes of workgroup memory, more than the \
         target's max_shared_bytes 255"
    );
    // Dynamic shared memory is a CUDA launch's: a Vulkan dispatch has none to pass.
    let mut a = GpuArtifact::chain();
    a.edit(|m| {
        let Dispatch::Gpu { dynamic_shared_bytes, .. } = &mut m.steps[3].dispatch else { unreachable!() };
        *dynamic_shared_bytes = 256;
    });
    assert_eq!(
        load_err(&a),
        "invalid manifest: step \"k3 reduce [256]\" passes 256 bytes of dynamic shared memory, which Vulkan does \
         not have (a CUDA artifact's field)"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).buffer_align = 1);
    assert!(load_err(&a).contains("needs storage-buffer offsets aligned to"), "{}", load_err(&a));
    let mut a = GpuArtifact::chain();
    a.edit(|m| vulkan_target(m).subgroup_size = Some(3));
    assert!(
        load_err(&a).starts_with("the artifact needs subgroup size 3, but device vulkan:"),
        "{}",
        load_err(&a)
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[0].dispatch = Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(64), grain: 1 });
    assert_eq!(
        load_err(&a),
        "invalid manifest: step \"k0 mul [64,16]\" is a CPU dispatch in a Vulkan artifact"
    );
}

#[test]
fn refuses_bad_buffer_references() {
    if !ready() {
        return;
    }
    // The state table is checked as on the CPU: a slot inside a step's scratch range is refused.
    let mut a = GpuArtifact::chain();
    a.edit(|m| {
        m.state.push(kiln_runtime::StateSpec {
            name: "w".into(),
            dtype: DType::F32,
            shape: vec![4],
            offset: T_OFFSET,
            init: kiln_runtime::StateInit::Zeros,
        })
    });
    assert_eq!(
        load_err(&a),
        "invalid manifest: step \"k0 mul [64,16]\" of entry point \"forward\" reads or writes arena bytes 256..4352, which straddle a state slot"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[1].args[2] = BufRef::Arena { offset: U_OFFSET, bytes: PLANE + 4 });
    assert_eq!(
        load_err(&a),
        "step \"k1 add [64,16]\" uses arena bytes 4352..8452, outside the arena (arena of 8448 bytes)"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[1].args[2] = BufRef::Arena { offset: 128, bytes: 64 });
    assert_eq!(
        load_err(&a),
        "step \"k1 add [64,16]\" uses arena bytes 128..192, not a multiple of the target's buffer_align (arena of \
         8448 bytes)"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[1].args[1] = BufRef::Weight { name: "bias".into(), bytes: PLANE });
    assert_eq!(
        load_err(&a),
        "step \"k1 add [64,16]\" uses weight \"bias\", which the weights file does not hold"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[0].args[1] = BufRef::Weight { name: "w".into(), bytes: 2 * PLANE });
    assert_eq!(
        load_err(&a),
        "step \"k0 mul [64,16]\" expects weight \"w\" of 8192 bytes, the weights file holds 4096 bytes"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[3].args[0] = BufRef::Input { index: 2 });
    assert_eq!(load_err(&a), "step \"k3 reduce [256]\" uses input 2, but the model has 2 inputs");
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[3].args[1] = BufRef::Output { index: 7 });
    assert_eq!(load_err(&a), "step \"k3 reduce [256]\" uses output 7, but the model has 2 outputs");
    // Bindings smaller than the shader declares, or missing: refused before the driver runs it.
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[1].args[2] = BufRef::Arena { offset: U_OFFSET, bytes: PLANE - 4 });
    assert_eq!(
        load_err(&a),
        "SPIR-V module 0 of kernels.spv: entry point \"add\" declares binding 2 of 4096 bytes, but step \"k1 add \
         [64,16]\" binds 4092 bytes there"
    );
    let mut a = GpuArtifact::chain();
    a.edit(|m| {
        m.steps[3].args.pop();
    });
    assert_eq!(
        load_err(&a),
        "SPIR-V module 2 of kernels.spv: entry point \"reduce\" uses binding 1, but step \"k3 reduce [256]\" passes 1 \
         buffers"
    );
    let mut a = GpuArtifact::types();
    a.edit(|m| m.outputs[2].shape = vec![kiln_runtime::Dim::Fixed(7)]);
    assert_eq!(
        load_err(&a),
        "SPIR-V module 0 of kernels.spv: entry point \"types\" declares binding 5 of 8 bytes, but step \"k0 types [8]\" \
         binds 7 bytes there"
    );
    // Kernels read sizes as 32-bit words: a symbol that may not fit one is refused.
    let mut a = GpuArtifact::chain();
    a.edit(|m| {
        m.symbols.push(kiln_runtime::SymbolSpec {
            name: "batch".into(),
            min: 1,
            max: 1 << 32,
            hint: 4,
            multiple_of: 1,
        })
    });
    assert_eq!(
        load_err(&a),
        "invalid manifest: symbol `batch` may reach 4294967296, but Vulkan kernels read sizes as 32-bit words \
         (at most 4294967295)"
    );
    // A weights file that lost a tensor, with matching digests.
    let mut a = GpuArtifact::chain();
    let w = common::f32_bytes(&common::w_data());
    let only_w =
        vec![("w", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1024], &w).unwrap())];
    std::fs::write(a.file(WEIGHTS_FILE), safetensors::serialize(only_w, None).unwrap()).unwrap();
    a.refresh_digests();
    assert_eq!(
        load_err(&a),
        "step \"k1 add [64,16]\" uses weight \"c\", which the weights file does not hold"
    );
}

/// A Vulkan model keeps its persistent state in the device arena: `forward` computes
/// `y = x + acc` from the slot `acc` (starting from the weight `c`), `accumulate` adds `x` into
/// it in place and computes the same; `read_state` and `write_state` copy a slot out and in.
#[test]
fn state_stays_in_the_device_arena_across_entry_points() {
    if !ready() {
        return;
    }
    let spec = |name: &str| kiln_runtime::TensorSpec::fixed(name, DType::F32, &X_SHAPE);
    let acc = || BufRef::Arena { offset: 0, bytes: PLANE };
    let (x, y) = (|| BufRef::Input { index: 0 }, || BufRef::Output { index: 0 });
    let mut m = chain_manifest();
    m.inputs = vec![spec("x")];
    m.outputs = vec![spec("y")];
    m.arena_bytes = PLANE;
    m.state = vec![kiln_runtime::StateSpec {
        name: "acc".into(),
        dtype: DType::F32,
        shape: X_SHAPE.to_vec(),
        offset: 0,
        init: kiln_runtime::StateInit::Weight { name: "c".into() },
    }];
    m.steps = vec![gpu_step("add", "k0 sum [64,16]", 0, 16, 64, vec![x(), acc(), y()])];
    m.entries = vec![kiln_runtime::Entry {
        name: "accumulate".into(),
        inputs: m.inputs.clone(),
        index_bounds: Vec::new(),
        outputs: m.outputs.clone(),
        steps: vec![
            gpu_step("add", "k0 accumulate [64,16]", 0, 16, 64, vec![x(), acc(), acc()]),
            gpu_step("add", "k1 sum [64,16]", 0, 16, 64, vec![x(), acc(), y()]),
        ],
        faults: None,
    }];
    let a = GpuArtifact::new(m, &["muladd"]);
    let mut model = load(&a, Some("vulkan")).unwrap();
    assert_eq!(model.entries(), ["forward", "accumulate"]);
    let xs = x_data();
    let plus = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(a, b)| a + b).collect() };
    let read = |model: &mut Model| model.read_state("acc").unwrap().as_f32().unwrap().to_vec();
    let mut want = common::c_data();
    assert_eq!(read(&mut model), want);
    let input = [TensorRef::f32("x", &X_SHAPE, &xs)];
    for _ in 0..3 {
        let out = model.run_entry("accumulate", &input).unwrap();
        want = plus(&want, &xs);
        assert_eq!(out[0].as_f32().unwrap(), plus(&want, &xs));
    }
    assert_eq!(read(&mut model), want);
    assert_eq!(model.run(&input).unwrap()[0].as_f32().unwrap(), plus(&want, &xs));
    let zeros = vec![0f32; N];
    model.write_state("acc", &TensorRef::f32("acc", &X_SHAPE, &zeros)).unwrap();
    assert_eq!(read(&mut model), zeros);
    assert_eq!(model.run(&input).unwrap()[0].as_f32().unwrap(), xs);
    assert_eq!(
        model.write_state("acc", &TensorRef::f32("acc", &[1024], &zeros)).unwrap_err().to_string(),
        "state \"acc\" is f32[64, 16], the value given is f32[1024] (4096 bytes)"
    );
    assert_eq!(model.run_entry("accumulate", &input).unwrap()[0].as_f32().unwrap(), plus(&xs, &xs));
    // The timed run of an entry point times its own steps.
    let (_, profile) = model.run_profiled(&input, 1).unwrap();
    assert_eq!(profile.steps.len(), 1);
}

#[test]
fn wrong_inputs_are_refused_before_the_device() {
    if !ready() {
        return;
    }
    let mut model = load(&GpuArtifact::chain(), None).unwrap();
    let (x, r) = (x_data(), r_data());
    let err = model.run(&[TensorRef::f32("x", &X_SHAPE, &x)]).unwrap_err();
    assert_eq!(err.to_string(), "the model takes 2 inputs, got 1");
    let err =
        model.run(&[TensorRef::f32("x", &X_SHAPE, &x), TensorRef::f32("r", &R_SHAPE, &r[..10])]).unwrap_err();
    assert_eq!(err.to_string(), "input \"r\" needs 1024 bytes, got 40");
    // The model is unharmed.
    assert_eq!(run_chain(&mut model, &x, &r), chain_expected(&x, &r));
    let _: Vec<Tensor> =
        model.run(&[TensorRef::f32("x", &X_SHAPE, &x), TensorRef::f32("r", &R_SHAPE, &r)]).unwrap();
}

#[test]
fn a_model_with_symbols_runs_at_each_size_with_the_grid_of_that_size() {
    if !ready() {
        return;
    }
    let artifact = GpuArtifact::new(sized_manifest(), &["sized"]);
    let mut model = load(&artifact, None).unwrap();
    assert_eq!(model.symbols()[0].name, "rows");
    // One recorded command buffer: each run writes its symbol words and grids, and the
    // kernels see both (NumWorkgroups is the run's grid, not the largest).
    for rows in [1, 3, 4, 5, 8, 33, 64, 2, 1] {
        assert_eq!(run_sized(&mut model, rows), sized_expected(rows), "{rows} rows");
    }
    // The timed command buffer reads them too.
    let x = &x_data()[..7 * 16];
    let (out, profile) = model.run_profiled(&[TensorRef::f32("x", &[7, 16], x)], 2).unwrap();
    assert_eq!(profile.steps.len(), 2);
    let expected = sized_expected(7);
    assert_eq!((out[0].as_f32().unwrap().to_vec(), out[1].as_i32().unwrap()[0]), expected);
    // Out of bounds: refused before the device, by input and axis; the model is unharmed.
    let long = vec![0.5f32; 65 * 16];
    let err = model.run(&[TensorRef::f32("x", &[65, 16], &long)]).unwrap_err();
    assert_eq!(err.to_string(), "input `x` axis 0 is 65, but `rows` is at most 64");
    assert_eq!(run_sized(&mut model, 9), sized_expected(9));
}

#[test]
fn symbol_words_and_run_time_grids_are_checked_at_load() {
    if !ready() {
        return;
    }
    // A grid over the device's limit at the symbols' maxima.
    let mut a = GpuArtifact::new(sized_manifest(), &["sized"]);
    a.edit(|m| {
        let Dispatch::Gpu { grid, .. } = &mut m.steps[1].dispatch else { unreachable!() };
        grid[0] = kiln_runtime::Dim::Size(vec![kiln_runtime::SizeTerm {
            coeff: 1 << 20,
            factors: vec![kiln_runtime::SizeFactor::Sym(0)],
        }]);
    });
    let err = load_err(&a);
    assert!(
        err.starts_with(
            "the artifact needs step \"k1 shift [rows,16]\" to launch grid [67108864, 1, 1], but device"
        ),
        "{err}"
    );
    // The symbol words passed where the manifest declares no symbols.
    let mut a = GpuArtifact::chain();
    a.edit(|m| m.steps[0].args.push(BufRef::Symbols));
    assert_eq!(
        load_err(&a),
        "invalid manifest: step \"k0 mul [64,16]\" passes the symbol values as a buffer, but the manifest declares no symbols"
    );
}
