//! CUDA artifacts: what a machine without CUDA reports (anywhere), every manifest refusal that
//! comes before the driver is touched (anywhere, with exact messages), and, on a machine with an
//! NVIDIA GPU, exact results of hand-written PTX kernels, replays, event-timed profiles and the
//! device refusals. Tests that run kernels print `skipped: no CUDA device (…)` and return when
//! there is none; on such a machine `device_tests_pass_on_a_fake_driver` runs them again in a
//! child process whose `libcuda.so.1` is `tests/data/fake_cuda.c` (host memory, the PTX
//! kernels of `binop.ptx` and `divide.ptx` computed on the CPU), so the backend's driver calls,
//! the fault words' fill and read-back included, are exercised everywhere.

mod common;

use std::path::Path;
use std::process::Command;

use common::cuda::*;
use common::{run_sized, sized_expected, x_data, N};
use kiln_runtime::{
    BufRef, DType, DeviceInfo, Dispatch, Model, ModuleRange, Options, RuntimeError, TensorRef, CUBIN_FILE,
    PTX_FILE,
};

const SHAPE: [u64; 1] = [N as u64];

fn load(artifact: &CudaArtifact, device: Option<&str>) -> Result<Model, RuntimeError> {
    Model::load_with(artifact.path(), &Options { threads: None, device: device.map(str::to_string) })
}

fn load_err(artifact: &CudaArtifact) -> String {
    match load(artifact, Some("cuda")) {
        Ok(_) => panic!("the artifact was accepted"),
        Err(e) => e.to_string(),
    }
}

fn run(model: &mut Model, x: &[f32]) -> Vec<f32> {
    let out = model.run(&[TensorRef::f32("x", &SHAPE, x)]).unwrap();
    assert_eq!((out[0].name(), out[0].shape()), ("y", &SHAPE[..]));
    out[0].as_f32().unwrap().to_vec()
}

#[test]
fn without_a_driver_loading_says_why() {
    let Some(reason) = kiln_runtime::devices().cuda_unavailable else {
        return eprintln!("skipped: this machine has a CUDA device");
    };
    let artifact = CudaArtifact::chain();
    for device in [None, Some("cuda"), Some("cuda:1")] {
        match load(&artifact, device) {
            Err(RuntimeError::CudaUnavailable { reason: got }) => assert_eq!(got, reason),
            Err(other) => panic!("expected CudaUnavailable, got {other}"),
            Ok(_) => panic!("a CUDA artifact loaded without CUDA"),
        }
    }
    let message = load_err(&artifact);
    assert_eq!(message, format!("CUDA is not available: {reason}"));
    if !std::path::Path::new("/dev/nvidiactl").exists() && reason.starts_with("cannot load ") {
        assert!(reason.starts_with("cannot load libcuda.so.1: "), "{reason}");
    }
}

#[test]
fn devices_list_cuda_after_vulkan_or_say_why() {
    let listed = kiln_runtime::devices();
    assert!(matches!(listed.devices[0], DeviceInfo::Cpu { .. }), "{listed:?}");
    let kinds: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| match d {
            DeviceInfo::Cpu { .. } => "cpu",
            DeviceInfo::Vulkan(_) => "vulkan",
            DeviceInfo::Cuda(_) => "cuda",
        })
        .collect();
    let mut sorted = kinds.clone();
    sorted.sort_by_key(|k| ["cpu", "vulkan", "cuda"].iter().position(|o| o == k));
    assert_eq!(kinds, sorted, "CUDA devices come after the Vulkan ones");
    let cuda: Vec<_> = listed
        .devices
        .iter()
        .filter_map(|d| match d {
            DeviceInfo::Cuda(c) => Some(c),
            DeviceInfo::Cpu { .. } | DeviceInfo::Vulkan(_) => None,
        })
        .collect();
    match &listed.cuda_unavailable {
        Some(reason) => {
            assert!(cuda.is_empty(), "{listed:?}");
            assert!(!reason.is_empty());
        }
        None => {
            assert!(!cuda.is_empty(), "{listed:?}");
            for (i, info) in cuda.iter().enumerate() {
                assert_eq!(info.index, i);
                assert!(info.compute_capability[0] >= 3 && info.max_threads_per_block >= 256, "{info:?}");
                assert!(info.memory_bytes > 0 && info.multiprocessors > 0, "{info:?}");
                let line = DeviceInfo::Cuda((*info).clone()).to_string();
                assert!(line.starts_with(&format!("cuda:{i}  {}  {}, ", info.name, info.arch())), "{line}");
            }
        }
    }
}

/// Every refusal the manifest alone decides is the same with or without a GPU: the plan runs
/// before the driver is opened.
#[test]
fn manifest_errors_come_before_the_driver() {
    type Edit = Box<dyn Fn(&mut kiln_runtime::Manifest)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|m| m.steps[1].dispatch = Dispatch::gpu_fixed(2, [4, 1, 1], [256, 1, 1])),
            "invalid manifest: step \"k1 add [1024]\" uses module 2, but the manifest has 2 modules",
        ),
        (
            Box::new(|m| m.steps[0].dispatch = Dispatch::Cpu { range: kiln_runtime::Dim::Fixed(1024), grain: 64 }),
            "invalid manifest: step \"k0 mul [1024]\" is a CPU dispatch in a CUDA artifact",
        ),
        (
            Box::new(|m| cuda_target(m).cubins = vec![ModuleRange { offset: 0, bytes: 8 }]),
            "invalid manifest: the target lists 1 cubins for 2 modules (there must be one per module, or none)",
        ),
        (
            Box::new(|m| {
                cuda_target(m).cubins =
                    vec![ModuleRange { offset: 0, bytes: 8 }, ModuleRange { offset: 8, bytes: 8 }]
            }),
            "the manifest records no size and crc32 for kernels.cubin: recompile the model",
        ),
        (
            Box::new(|m| m.steps[0].args[2] = BufRef::Arena { offset: T_OFFSET * 2, bytes: PLANE }),
            "step \"k0 mul [1024]\" uses arena bytes 512..4608, outside the arena (arena of 4352 bytes)",
        ),
        (
            Box::new(|m| m.steps[0].args[2] = BufRef::Arena { offset: 64, bytes: 64 }),
            "step \"k0 mul [1024]\" uses arena bytes 64..128, not a multiple of the target's buffer_align \
             (arena of 4352 bytes)",
        ),
        (
            Box::new(|m| m.steps[1].args[1] = BufRef::Weight { name: "c".into(), bytes: 16 }),
            "step \"k1 add [1024]\" expects weight \"c\" of 16 bytes, the weights file holds 4096 bytes",
        ),
        (
            Box::new(|m| m.steps[1].args[2] = BufRef::Output { index: 3 }),
            "step \"k1 add [1024]\" uses output 3, but the model has 1 outputs",
        ),
        (
            Box::new(|m| {
                let Dispatch::Gpu { dynamic_shared_bytes, .. } = &mut m.steps[1].dispatch else { unreachable!() };
                *dynamic_shared_bytes = 1;
            }),
            "invalid manifest: step \"k1 add [1024]\" passes 1 bytes of dynamic shared memory, more than the \
             target's max_shared_bytes 0",
        ),
        (
            Box::new(|m| m.steps[0].dispatch = Dispatch::gpu_fixed(1, [2, 1, 1], [512, 1, 1])),
            "invalid manifest: step \"k0 mul [1024]\" has workgroup [512, 1, 1] (512 threads), more than the \
             target's max_workgroup_invocations 256",
        ),
    ];
    for (edit, expected) in cases {
        let mut artifact = CudaArtifact::chain();
        artifact.edit(|m| edit(m));
        assert_eq!(load_err(&artifact), expected);
    }

    // A module range past the end of kernels.ptx.
    let mut artifact = CudaArtifact::chain();
    artifact.edit(|m| m.modules[1].bytes += 1000);
    let (start, len) = (artifact.manifest.modules[1].offset, artifact.manifest.modules[1].bytes);
    let file_len = std::fs::metadata(artifact.file(PTX_FILE)).unwrap().len();
    assert_eq!(
        load_err(&artifact),
        format!(
            "module 1 of kernels.ptx: bytes {start}..{} lie outside kernels.ptx ({file_len} bytes)",
            start + len
        )
    );

    // A hand-edited manifest (here an arena range) that the modules were not compiled for, or
    // PTX without its contract line, is refused before the driver: the kernels' pointer
    // parameters carry no sizes the runtime could check instead.
    let mut artifact = CudaArtifact::chain();
    artifact.edit_by_hand(|m| m.arena_bytes += 256);
    let err = load_err(&artifact);
    assert!(
        err.starts_with("manifest.ron does not describe the kernels in kernels.ptx (contract digest "),
        "{err}"
    );
    let mut artifact = CudaArtifact::chain();
    let ptx = std::fs::read_to_string(artifact.file(PTX_FILE)).unwrap();
    let cut = ptx.trim_end().rfind('\n').unwrap() + 1;
    std::fs::write(artifact.file(PTX_FILE), &ptx[..cut]).unwrap();
    artifact.refresh_digests();
    assert_eq!(
        load_err(&artifact),
        "manifest.ron does not describe the kernels in kernels.ptx (kernels.ptx does not end with a kiln_contract \
         line): the manifest was edited or belongs to another build; recompile the model"
    );

    // Cubins must be ELF images (the driver would read anything else as text past its end).
    let mut artifact = CudaArtifact::chain();
    std::fs::write(artifact.file(CUBIN_FILE), [0u8; 16]).unwrap();
    artifact.refresh_digests();
    artifact.edit(|m| {
        cuda_target(m).cubins = vec![ModuleRange { offset: 0, bytes: 8 }, ModuleRange { offset: 8, bytes: 8 }]
    });
    assert_eq!(
        load_err(&artifact),
        "module 0 of kernels.cubin: it is not an ELF image (a cubin starts with \\x7fELF)"
    );

    // The PTX file is required, and checked against its digest.
    let mut artifact = CudaArtifact::chain();
    artifact.edit(|m| m.files.retain(|f| f.name != PTX_FILE));
    assert_eq!(
        load_err(&artifact),
        "the manifest records no size and crc32 for kernels.ptx: recompile the model"
    );
    let artifact = CudaArtifact::chain();
    std::fs::write(artifact.file(PTX_FILE), b"// truncated").unwrap();
    assert!(load_err(&artifact).starts_with("kernels.ptx is 12 bytes, the manifest says "));
    // A CUDA artifact on another kind of device.
    let e = load(&artifact, Some("cpu")).unwrap_err().to_string();
    assert!(e.starts_with("a CUDA artifact (compiled for sm_80) cannot run on device cpu: "), "{e}");
}

#[test]
fn faults_fail_the_run_and_the_next_run_is_clean() {
    if !ready() {
        return;
    }
    let artifact = divide_artifact();
    let mut model = load(&artifact, None).unwrap();
    let a: Vec<i32> = (0..N as i32).map(|i| 1000 - 7 * i).collect();
    let good: Vec<i32> = (0..N as i32).map(|i| if i % 2 == 0 { 3 } else { -5 }).collect();
    let mut bad = good.clone();
    bad[700] = 0;
    bad[300] = 0;
    let want: Vec<i32> = a.iter().zip(&good).map(|(x, y)| x / y).collect();
    let mut divide = |b: &[i32], profiled: bool| {
        let inputs = [TensorRef::i32("a", &SHAPE, &a), TensorRef::i32("b", &SHAPE, b)];
        let out = if profiled { model.run_profiled(&inputs, 1).map(|(o, _)| o) } else { model.run(&inputs) };
        out.map(|o| o[0].as_i32().unwrap().to_vec())
    };
    assert_eq!(divide(&good, false).unwrap(), want);
    for profiled in [false, true, false] {
        let err = divide(&bad, profiled).unwrap_err().to_string();
        assert_eq!(
            err,
            "step \"k0 div [1024]\" (div `q` at m.ron:3:17): integer division by zero (divisor element [300])"
        );
        assert_eq!(divide(&good, profiled).unwrap(), want);
    }
}

#[test]
fn chain_runs_exactly_and_replays() {
    if !ready() {
        return;
    }
    let artifact = CudaArtifact::chain();
    let mut model = load(&artifact, None).unwrap();
    assert!(matches!(model.device(), DeviceInfo::Cuda(ref c) if c.index == 0), "{:?}", model.device());
    assert_eq!(model.threads(), 1);
    let x = x_data();
    let expected = chain_expected(&x);
    assert_eq!(run(&mut model, &x), expected);
    // Replays of the one captured graph, with other inputs and then the first again.
    let x2: Vec<f32> = x.iter().map(|v| v * -0.5 + 1.0).collect();
    assert_eq!(run(&mut model, &x2), chain_expected(&x2));
    for _ in 0..3 {
        assert_eq!(run(&mut model, &x), expected);
    }
    // run_into writes caller buffers, misaligned ones included.
    let x_bytes = common::f32_bytes(&x);
    let mut y_store = vec![0u8; N * 4 + 1];
    let inputs = [TensorRef::new("x", DType::F32, &SHAPE, &x_bytes)];
    model.run_into(&inputs, &mut [&mut y_store[1..]]).unwrap();
    assert_eq!(y_store[1..], common::f32_bytes(&expected));
    // The model moves to another thread and runs there (its context is made current there).
    let got = std::thread::spawn(move || run(&mut model, &x)).join().unwrap();
    assert_eq!(got, expected);
    // Two models of one device share its primary context; dropping one leaves the other working.
    let mut a = load(&artifact, Some("cuda:0")).unwrap();
    let b = load(&artifact, Some("cuda")).unwrap();
    drop(b);
    assert_eq!(run(&mut a, &x2), chain_expected(&x2));
}

/// A CUDA model keeps its persistent state in the device arena, as a training artifact's
/// `forward` and `train_step` do: `forward` computes `y = x·acc` from the slot `acc` (starting
/// from the weight `w`), `step` computes `y = x + acc` and then adds `c` into the slot in place;
/// each entry point replays its own graph, and `read_state`/`write_state` copy the slot out and
/// in.
#[test]
fn state_stays_in_the_device_arena_across_entry_points() {
    if !ready() {
        return;
    }
    let spec = |name: &str| kiln_runtime::TensorSpec::fixed(name, DType::F32, &SHAPE);
    let acc = || BufRef::Arena { offset: 0, bytes: PLANE };
    let (x, y) = (|| BufRef::Input { index: 0 }, || BufRef::Output { index: 0 });
    let mut m = chain_manifest();
    m.arena_bytes = PLANE;
    m.state = vec![kiln_runtime::StateSpec {
        name: "acc".into(),
        dtype: DType::F32,
        shape: SHAPE.to_vec(),
        offset: 0,
        init: kiln_runtime::StateInit::Weight { name: "w".into() },
    }];
    m.steps = vec![step("mul", "k0 mul [1024]", 1, vec![x(), acc(), y()])];
    m.entries = vec![kiln_runtime::Entry {
        name: "step".into(),
        inputs: vec![spec("x")],
        index_bounds: Vec::new(),
        outputs: vec![spec("sum")],
        steps: vec![
            step("add", "k0 add [1024]", 0, vec![x(), acc(), y()]),
            step(
                "add",
                "k1 add [1024]",
                0,
                vec![acc(), BufRef::Weight { name: "c".into(), bytes: PLANE }, acc()],
            ),
        ],
        faults: None,
    }];
    let artifact = CudaArtifact::new(m, &[module("add", "add.rn.f32"), module("mul", "mul.rn.f32")]);
    let mut model = load(&artifact, None).unwrap();
    assert_eq!(model.entries(), ["forward", "step"]);
    assert_eq!(model.state_names(), ["acc"]);
    let xs = x_data();
    let plus = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(a, b)| a + b).collect() };
    let times = |a: &[f32], b: &[f32]| -> Vec<f32> { a.iter().zip(b).map(|(a, b)| a * b).collect() };
    let read = |model: &mut Model| model.read_state("acc").unwrap().as_f32().unwrap().to_vec();
    let mut want = common::w_data();
    assert_eq!(read(&mut model), want);
    assert_eq!(run(&mut model, &xs), times(&xs, &want));
    let input = [TensorRef::f32("x", &SHAPE, &xs)];
    for _ in 0..3 {
        let out = model.run_entry("step", &input).unwrap();
        assert_eq!(out[0].name(), "sum");
        assert_eq!(out[0].as_f32().unwrap(), plus(&xs, &want));
        want = plus(&want, &common::c_data());
    }
    assert_eq!(read(&mut model), want);
    assert_eq!(run(&mut model, &xs), times(&xs, &want));
    // A value written in is what the next runs read, and what reading gives back, bit for bit.
    let written: Vec<f32> = (0..N).map(|i| (i as f32 - 500.0) * 0.125).collect();
    model.write_state("acc", &TensorRef::f32("acc", &SHAPE, &written)).unwrap();
    let bytes = model.read_state("acc").unwrap();
    assert_eq!(bytes.bytes(), common::f32_bytes(&written));
    assert_eq!(run(&mut model, &xs), times(&xs, &written));
    assert_eq!(model.run_entry("step", &input).unwrap()[0].as_f32().unwrap(), plus(&xs, &written));
    assert_eq!(read(&mut model), plus(&written, &common::c_data()));
    assert_eq!(
        model.write_state("acc", &TensorRef::f32("acc", &[N as u64, 1], &written)).unwrap_err().to_string(),
        "state \"acc\" is f32[1024], the value given is f32[1024, 1] (4096 bytes)"
    );
    // A profiled run times `forward`'s own steps.
    let (_, profile) = model.run_profiled(&input, 1).unwrap();
    assert_eq!(profile.steps.len(), 1);
    // A fresh load starts again from the artifact's initial values.
    let mut again = load(&artifact, None).unwrap();
    assert_eq!(read(&mut again), common::w_data());
}

#[test]
fn profile_times_each_step_with_events() {
    if !ready() {
        return;
    }
    let artifact = CudaArtifact::chain();
    let mut model = load(&artifact, None).unwrap();
    let x = x_data();
    let (outputs, profile) = model.run_profiled(&[TensorRef::f32("x", &SHAPE, &x)], 3).unwrap();
    // Profiled runs launch step by step, not through the graph: same results.
    assert_eq!(outputs[0].as_f32().unwrap(), &chain_expected(&x)[..]);
    let labels: Vec<&str> = profile.steps.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["k0 mul [1024]", "k1 add [1024]"]);
    assert_eq!((profile.repeats, profile.threads), (3, 1));
    for step in &profile.steps {
        assert!(step.time.as_nanos() > 0, "step {} has no time: {profile}", step.label);
        assert!(step.time.as_secs_f64() < 1.0, "step {} took {:?}", step.label, step.time);
    }
    // A plain run after profiled ones replays the graph again.
    assert_eq!(run(&mut model, &x), chain_expected(&x));
}

#[test]
fn device_refusals_name_the_device() {
    if !ready() {
        return;
    }
    let listed = kiln_runtime::devices();
    let Some(DeviceInfo::Cuda(first)) =
        listed.devices.iter().find(|d| matches!(d, DeviceInfo::Cuda(_))).cloned()
    else {
        unreachable!("ready() found a CUDA device")
    };
    let count = listed.devices.iter().filter(|d| matches!(d, DeviceInfo::Cuda(_))).count();

    // A newer architecture than the device's.
    let mut artifact = CudaArtifact::chain();
    let newer = [first.compute_capability[0] + 1, 0];
    artifact.edit(|m| cuda_target(m).compute_capability = newer);
    assert_eq!(
        load_err(&artifact),
        format!(
            "this artifact was compiled for sm_{}0; CUDA device 0 ({}) is {}: recompile with --target cuda:{}",
            newer[0],
            first.name,
            first.arch(),
            first.arch()
        )
    );

    // A device that does not exist.
    let artifact = CudaArtifact::chain();
    let e = load(&artifact, Some(&format!("cuda:{count}"))).unwrap_err().to_string();
    assert!(e.starts_with(&format!("no device matches \"cuda:{count}\": this machine has cuda:0 (")), "{e}");

    // More shared memory than the device offers per block, even opted in.
    let mut artifact = CudaArtifact::chain();
    let most = first.max_shared_bytes_per_block.max(first.max_shared_bytes_per_block_optin);
    artifact.edit(|m| cuda_target(m).max_shared_bytes = most + 1);
    let e = load_err(&artifact);
    assert!(e.contains("bytes of shared memory per block, but device cuda:0 ("), "{e}");
    assert!(e.ends_with("(MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)"), "{e}");
}

/// A step past the static 48 KiB of shared memory passes the rest as dynamic shared memory:
/// its function is opted in at load (once, though two steps launch it), and the bytes go with
/// every launch, captured into the graph and launched step by step when profiled. The
/// kernels ignore the memory; the driver (a real one, or the fake, which refuses a launch
/// past what its function was opted in to) checks it.
#[test]
fn dynamic_shared_memory_is_opted_in_and_passed() {
    if !ready() {
        return;
    }
    const BYTES: u32 = 64 * 1024;
    let first = first_device().unwrap();
    if first.max_shared_bytes_per_block_optin < BYTES {
        return eprintln!(
            "skipped: cuda:0 opts blocks in to {} bytes only",
            first.max_shared_bytes_per_block_optin
        );
    }
    let dynamic = |module: u32, bytes: u32| Dispatch::Gpu {
        module,
        grid: [4, 1, 1].map(kiln_runtime::Dim::Fixed),
        workgroup: [256, 1, 1],
        dynamic_shared_bytes: bytes,
    };
    let mut artifact = CudaArtifact::chain();
    artifact.edit(|m| {
        cuda_target(m).max_shared_bytes = BYTES;
        m.steps[0].dispatch = dynamic(1, BYTES);
        // `mul` again, over its own output, with less dynamic shared memory: y = x·w·w + c.
        let mut again = m.steps[0].clone();
        again.args[0] = again.args[2].clone();
        again.dispatch = dynamic(1, BYTES / 2);
        m.steps.insert(1, again);
        for (i, step) in m.steps.iter_mut().enumerate() {
            step.label = format!("k{i} {}", step.label.split_once(' ').unwrap().1);
        }
    });
    let mut model = load(&artifact, None).unwrap();
    let (x, w, c) = (x_data(), common::w_data(), common::c_data());
    let expected: Vec<f32> = x.iter().zip(&w).zip(&c).map(|((x, w), c)| x * w * w + c).collect();
    for _ in 0..2 {
        assert_eq!(run(&mut model, &x), expected);
    }
    let (out, profile) = model.run_profiled(&[TensorRef::f32("x", &SHAPE, &x)], 1).unwrap();
    assert_eq!(profile.steps.len(), 3);
    assert_eq!(out[0].as_f32().unwrap(), &expected[..]);
}

#[test]
fn modules_and_kernels_are_checked_by_the_driver() {
    if !ready() {
        return;
    }
    // A kernel the module does not define.
    let mut artifact = CudaArtifact::chain();
    artifact.edit(|m| m.steps[1].symbol = "nope".into());
    assert_eq!(
        load_err(&artifact),
        "module 0 of kernels.ptx: step \"k1 add [1024]\" uses kernel \"nope\", which the module does not define"
    );

    // PTX the JIT refuses: the message carries its log.
    let broken = module("add", "add.rn.f32").replace("st.global.f32", "st.global.nonsense");
    let mut artifact = CudaArtifact::new(chain_manifest(), &[broken, module("mul", "mul.rn.f32")]);
    artifact.refresh_digests();
    let e = load_err(&artifact);
    assert!(e.starts_with("module 0 of kernels.ptx: the driver refused it on cuda:0 ("), "{e}");
    assert!(e.contains("JIT log:"), "{e}");
}

#[test]
fn cubins_are_used_only_on_their_exact_architecture() {
    if !ready() {
        return;
    }
    let Some(first) = first_device() else { unreachable!("ready() found a CUDA device") };
    // kernels.cubin holds two bare ELF headers, no valid cubin: when the device is not exactly
    // the target's architecture the loader must take the PTX (and run), when it is, the cubin
    // (and be refused by the driver).
    let mut artifact = CudaArtifact::chain();
    let mut header = vec![0u8; 64];
    header[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(artifact.file(CUBIN_FILE), [header.clone(), header].concat()).unwrap();
    artifact.edit(|m| {
        let target = cuda_target(m);
        target.cubins = vec![ModuleRange { offset: 0, bytes: 64 }, ModuleRange { offset: 64, bytes: 64 }];
        target.compute_capability = [5, 0];
    });
    artifact.refresh_digests();
    let mut model = load(&artifact, None).unwrap();
    let x = x_data();
    assert_eq!(run(&mut model, &x), chain_expected(&x));

    artifact.edit(|m| cuda_target(m).compute_capability = first.compute_capability);
    let e = load_err(&artifact);
    assert!(e.starts_with("module 0 of kernels.cubin: the driver refused it on cuda:0 ("), "{e}");
}

/// On an sm_90 device (an H100 or H200), the committed cubins run and the PTX is not even
/// compiled: the artifact's PTX is broken on purpose.
#[test]
fn sm90_cubins_run_instead_of_the_ptx() {
    if !ready() {
        return;
    }
    let Some(first) = first_device() else { unreachable!("ready() found a CUDA device") };
    if first.compute_capability != [9, 0] {
        return eprintln!("skipped: the committed cubins are for sm_90, cuda:0 is {}", first.arch());
    }
    let broken = |name: &str, op: &str| module(name, op).replace("st.global.f32", "st.global.nonsense");
    let mut artifact =
        CudaArtifact::new(chain_manifest(), &[broken("add", "add.rn.f32"), broken("mul", "mul.rn.f32")]);
    std::fs::write(artifact.file(CUBIN_FILE), SM90_CUBINS.concat()).unwrap();
    let add = SM90_CUBINS[0].len() as u64;
    artifact.edit(|m| {
        let target = cuda_target(m);
        target.compute_capability = [9, 0];
        target.cubins = vec![
            ModuleRange { offset: 0, bytes: add },
            ModuleRange { offset: add, bytes: SM90_CUBINS[1].len() as u64 },
        ];
    });
    artifact.refresh_digests();
    let mut model = load(&artifact, None).unwrap();
    let x = x_data();
    assert_eq!(run(&mut model, &x), chain_expected(&x));
    // The same artifact for another architecture takes the (broken) PTX and is refused.
    artifact.edit(|m| cuda_target(m).compute_capability = [8, 0]);
    assert!(load_err(&artifact).starts_with("module 0 of kernels.ptx: the driver refused it"));
}

/// The tests that need a CUDA device.
const DEVICE_TESTS: [&str; 11] = [
    "devices_list_cuda_after_vulkan_or_say_why",
    "a_model_with_symbols_runs_at_each_size_with_the_grid_of_that_size",
    "state_stays_in_the_device_arena_across_entry_points",
    "chain_runs_exactly_and_replays",
    "faults_fail_the_run_and_the_next_run_is_clean",
    "profile_times_each_step_with_events",
    "device_refusals_name_the_device",
    "modules_and_kernels_are_checked_by_the_driver",
    "cubins_are_used_only_on_their_exact_architecture",
    "sm90_cubins_run_instead_of_the_ptx",
    "dynamic_shared_memory_is_opted_in_and_passed",
];

/// Set in the child process that runs the device tests on the fake driver.
const FAKE_ENV: &str = "KILN_TEST_FAKE_CUDA";

#[test]
fn a_model_with_symbols_runs_at_each_size_with_the_grid_of_that_size() {
    if !ready() {
        return;
    }
    let mut model = load(&sized_artifact(), Some("cuda")).unwrap();
    assert_eq!(model.symbols()[0].name, "rows");
    // A graph per binding, captured at its first run: sizes repeated (replays) and more
    // distinct sizes than an entry point keeps graphs of (the oldest make room).
    let sizes: Vec<usize> =
        [1, 3, 4, 5, 8, 33, 64, 2, 1, 64].into_iter().chain(9..=30).chain([1, 3, 64]).collect();
    for rows in sizes {
        assert_eq!(run_sized(&mut model, rows), sized_expected(rows), "{rows} rows");
    }
    // A timed run launches each step at the run's grid.
    let x = &x_data()[..7 * 16];
    let (out, profile) = model.run_profiled(&[TensorRef::f32("x", &[7, 16], x)], 2).unwrap();
    assert_eq!(profile.steps.len(), 2);
    assert_eq!((out[0].as_f32().unwrap().to_vec(), out[1].as_i32().unwrap()[0]), sized_expected(7));
    // Out of bounds: refused before the device, by input and axis; the model is unharmed.
    let long = vec![0.5f32; 65 * 16];
    let err = model.run(&[TensorRef::f32("x", &[65, 16], &long)]).unwrap_err();
    assert_eq!(err.to_string(), "input `x` axis 0 is 65, but `rows` is at most 64");
    assert_eq!(run_sized(&mut model, 9), sized_expected(9));
}

/// Without a CUDA device, runs the device tests again in a child process whose `libcuda.so.1`
/// is the fake driver of `tests/data/fake_cuda.c`: every driver call the backend makes, its
/// pointers, parameter arrays, graph capture and replay, events and error paths then run here,
/// and the fake refuses what a real driver would (no current context, a copy during capture,
/// a pointer outside its allocation). It proves the calls are made right, not that real PTX
/// runs: the device tests do that on a real GPU.
#[test]
fn device_tests_pass_on_a_fake_driver() {
    if std::env::var_os(FAKE_ENV).is_some() {
        return; // the child itself
    }
    if unavailable().is_none() {
        return eprintln!("skipped: a real CUDA device runs the device tests");
    }
    let dir = tempfile::tempdir().unwrap();
    let lib = dir.path().join("libcuda.so.1");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/fake_cuda.c");
    let status = match Command::new("cc")
        .args(["-std=c11", "-shared", "-fPIC", "-O1", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(&lib)
        .arg(&source)
        .status()
    {
        Ok(status) => status,
        Err(e) => return eprintln!("skipped: cc not found ({e})"),
    };
    assert!(status.success(), "cc failed on {}", source.display());
    // cudarc tries libcuda.so before libcuda.so.1: both names lead to the fake.
    std::fs::copy(&lib, dir.path().join("libcuda.so")).unwrap();
    let mut paths = vec![dir.path().to_path_buf()];
    paths.extend(std::env::var_os("LD_LIBRARY_PATH").iter().flat_map(std::env::split_paths));
    let library_path = std::env::join_paths(paths).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "--nocapture", "--test-threads", "1"])
        .args(DEVICE_TESTS)
        .env("LD_LIBRARY_PATH", library_path)
        .env(FAKE_ENV, "1")
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the device tests failed on the fake driver:\n{text}");
    assert!(!text.contains("skipped"), "a device test skipped on the fake driver:\n{text}");
    assert!(text.contains(&format!("test result: ok. {} passed", DEVICE_TESTS.len())), "{text}");
}
