#!/usr/bin/env python3
"""One system, one batch size, in its own process: `systems.py SYSTEM BATCH` prints one line
`RESULT {json}` (see common.emit). Each system runs alone in a fresh process so that no other
runtime's thread pool is alive (and spinning) while it is timed.

SYSTEM is one of: prepare (inputs, PyTorch eager reference, ONNX export), torch_eager,
torch_compile, onnxruntime, openvino, iree, kiln.

The output of every system is checked against PyTorch eager (common.check) before it is timed;
one that fails is reported as wrong output and not timed.
"""

import os
import re
import shutil
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    INPUT_NAMES,
    OUT,
    REPEATS,
    REPO,
    THREADS,
    WARMUP,
    check,
    emit,
    inputs_path,
    load_inputs,
    load_reference,
    make_inputs,
    onnx_path,
    reference_path,
    time_calls,
    timed_attempts,
)

OPSET = 18


def loadavg():
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def torch_setup():
    import torch

    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def torch_inputs(batch):
    import torch

    x = load_inputs(batch)
    return tuple(torch.from_numpy(x[k]) for k in INPUT_NAMES)


# --- prepare -----------------------------------------------------------------------------


def prepare(batch):
    """Inputs (saved once), the PyTorch eager reference output, and the ONNX export."""
    torch = torch_setup()
    from safetensors.numpy import save_file

    from common import bert_model

    OUT.mkdir(parents=True, exist_ok=True)
    save_file(make_inputs(batch), str(inputs_path(batch)))
    model = bert_model()
    args = torch_inputs(batch)
    with torch.inference_mode():
        ref = model(*args).numpy()
    save_file({"last_hidden_state": ref}, str(reference_path(batch)))
    t = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            model,
            args,
            str(onnx_path(batch)),
            input_names=list(INPUT_NAMES),
            output_names=["last_hidden_state"],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes=None,
        )
    export_s = time.perf_counter() - t
    import onnx

    m = onnx.load(str(onnx_path(batch)))
    ops = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {
        "attn_implementation": model.attn_implementation,
        "onnx_export_s": export_s,
        "onnx_opset": [{"domain": o.domain, "version": o.version} for o in m.opset_import],
        "onnx_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
        "reference_shape": list(ref.shape),
        "padding_fraction": float(1.0 - load_inputs(batch)["attention_mask"].mean()),
    }


# --- peers ---------------------------------------------------------------------------------


def checked_timing(run, batch, extra):
    """Check `run()`'s output against the reference, then time it if it matches."""
    out = run()
    extra["check"] = check(out, load_reference(batch))
    if not extra["check"]["ok"]:
        extra["status"] = "wrong output"
        return extra
    extra["status"] = "ok"
    extra["latency"] = time_calls(run)
    return extra


def torch_eager(batch):
    torch = torch_setup()
    from common import bert_model

    model = bert_model()
    args = torch_inputs(batch)

    def run():
        with torch.inference_mode():
            return model(*args).numpy()

    return checked_timing(run, batch, {"attn_implementation": model.attn_implementation})


def torch_compile(batch):
    # A fresh Inductor cache every time, so the compile time is a user's first compile.
    cache = OUT / "inductor-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    torch = torch_setup()
    from common import bert_model

    model = bert_model()
    args = torch_inputs(batch)
    compiled = torch.compile(model)  # default backend (inductor), default mode
    t = time.perf_counter()
    with torch.inference_mode():
        compiled(*args)
    compile_s = time.perf_counter() - t

    def run():
        with torch.inference_mode():
            return compiled(*args).numpy()

    return checked_timing(
        run, batch, {"compile_s": compile_s, "compile_what": "first call of torch.compile(model), cold Inductor cache"}
    )


def onnxruntime(batch):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t = time.perf_counter()
    sess = ort.InferenceSession(str(onnx_path(batch)), so, providers=["CPUExecutionProvider"])
    compile_s = time.perf_counter() - t
    x = load_inputs(batch)
    feed = {i.name: x[i.name] for i in sess.get_inputs()}

    def run():
        return sess.run(None, feed)[0]

    return checked_timing(
        run,
        batch,
        {
            "compile_s": compile_s,
            "compile_what": "InferenceSession creation (graph optimization level: default, ORT_ENABLE_ALL)",
        },
    )


def openvino(batch):
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    t = time.perf_counter()
    model = core.read_model(str(onnx_path(batch)))
    read_s = time.perf_counter() - t
    t = time.perf_counter()
    compiled = core.compile_model(model, "CPU", config)
    compile_s = time.perf_counter() - t
    req = compiled.create_infer_request()
    x = load_inputs(batch)
    feed = {p.get_any_name(): x[p.get_any_name()] for p in compiled.inputs}
    out = compiled.output(0)

    def run():
        return req.infer(feed)[out]

    props = {}
    for k in ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS"):
        try:
            props[k] = str(compiled.get_property(k))
        except Exception as e:  # noqa: BLE001
            props[k] = f"? ({e})"
    return checked_timing(
        run,
        batch,
        {
            "read_model_s": read_s,
            "compile_s": compile_s,
            "compile_what": "core.compile_model on the ONNX model (read_model separately)",
            "properties": props,
        },
    )


def iree(batch):
    """ONNX → MLIR (iree-import-onnx) → vmfb (iree-compile, llvm-cpu, target CPU host) → runtime."""
    import numpy as np

    bindir = os.path.dirname(sys.executable)
    mlir = OUT / f"minilm_b{batch}.mlir"
    vmfb = OUT / f"minilm_b{batch}.vmfb"
    steps = [
        ("import", [os.path.join(bindir, "iree-import-onnx"), str(onnx_path(batch)), "-o", str(mlir)]),
        (
            "compile",
            [
                os.path.join(bindir, "iree-compile"),
                str(mlir),
                "--iree-hal-target-device=local",
                "--iree-hal-local-target-device-backends=llvm-cpu",
                "--iree-llvmcpu-target-cpu=host",
                "-o",
                str(vmfb),
            ],
        ),
    ]
    res = {"commands": [" ".join(os.path.relpath(a, REPO) if a.startswith("/") else a for a in c) for _, c in steps]}
    for name, cmd in steps:
        t = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        res[f"{name}_s"] = time.perf_counter() - t
        if p.returncode != 0:
            res["status"] = f"{name} failed"
            res["error"] = (p.stderr or p.stdout)[-4000:]
            return res
    res["compile_what"] = "iree-compile of the imported MLIR (import from ONNX separately)"
    mlir.unlink(missing_ok=True)  # 180 MB of text, not needed once compiled

    import iree.runtime as rt

    rt.flags.parse_flags(f"--task_topology_max_group_count={THREADS}")
    ctx = rt.SystemContext(config=rt.Config("local-task"))
    ctx.add_vm_module(rt.VmModule.copy_buffer(ctx.instance, vmfb.read_bytes()))
    fn = ctx.modules.module["main_graph"]
    x = load_inputs(batch)
    args = [x[k] for k in INPUT_NAMES]

    def run():
        return np.asarray(fn(*args).to_host())

    return checked_timing(run, batch, res)


# --- Kiln ----------------------------------------------------------------------------------


def kiln_bin():
    return os.environ.get("KILN_BIN") or str(REPO / "target" / "release" / "kiln")


def kiln(batch):
    from safetensors.numpy import load_file

    from common import CACHE

    k = kiln_bin()
    art = OUT / f"minilm_b{batch}.kiln"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [k, "compile", str(REPO / "models" / "bert_encoder.ron"), "--weights", str(CACHE / "model.safetensors")]
    cmd += ["--set", f"batch={batch}", "-o", str(art)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    compile_s = time.perf_counter() - t
    res = {"compile_s": compile_s, "compile_what": "wall time of `kiln compile` (process start to exit)"}
    text = p.stdout + p.stderr
    res["compile_output"] = text.strip().splitlines()
    if p.returncode != 0:
        res["status"] = "compile failed"
        res["error"] = text[-4000:]
        return res
    m = re.search(r"for \S+ \(([^)]+)\)", text)
    res["llvm_cpu"] = m.group(1) if m else None

    common = ["--input", str(inputs_path(batch)), "--threads", str(THREADS)]
    outfile = OUT / f"kiln_out_b{batch}.safetensors"
    p = subprocess.run([k, "run", str(art), *common, "-o", str(outfile)], capture_output=True, text=True)
    if p.returncode != 0:
        res["status"] = "run failed"
        res["error"] = (p.stdout + p.stderr)[-4000:]
        return res
    res["check"] = check(load_file(str(outfile))["last_hidden_state"], load_reference(batch))
    if not res["check"]["ok"]:
        res["status"] = "wrong output"
        return res

    # `kiln run --repeats N` times N runs after loading; its first run is the only cold one, so
    # WARMUP extra runs are added and the median and min it prints are used (it prints no max).
    n = REPEATS + WARMUP
    failure = {}

    def measure():
        p = subprocess.run([k, "run", str(art), *common, "--repeats", str(n)], capture_output=True, text=True)
        m = re.search(r"latency: median ([\d.]+) ms, min ([\d.]+) ms over (\d+) runs \((\d+) threads\)", p.stdout)
        if p.returncode != 0 or not m:
            failure["error"] = (p.stdout + p.stderr)[-4000:]
            return {"median_ms": None, "min_ms": None}
        return {
            "median_ms": float(m.group(1)),
            "min_ms": float(m.group(2)),
            "max_ms": None,
            "repeats": int(m.group(3)),
            "warmup": 0,
            "threads_reported": int(m.group(4)),
            "note": f"from `kiln run --repeats {n}` (median and min as printed; it prints no max; its first run is the cold one)",
        }

    res["latency"] = timed_attempts(measure, children=True)
    if failure:
        res["status"] = "run failed"
        res["error"] = failure["error"]
        return res
    res["status"] = "ok"

    p = subprocess.run([k, "run", str(art), *common, "--repeats", "10", "--profile"], capture_output=True, text=True)
    lines = p.stdout.splitlines()
    prof = [l for l in lines if l.startswith("profile:") or re.match(r"^(k\d+ |\(\d+ more|total)", l)]
    res["profile"] = prof
    res["profile_by_kind"] = kiln_profile_by_kind(lines)
    return res


def kiln_profile_by_kind(lines):
    """The profile's own `by kind` table (every step, summed per kernel kind), as
    {kind: {steps, time_ms, share_pct, gflop_s, gb_s}}."""
    # "matmul_epilogue     36   149.70 ms   89.0%     145.24      1.42"
    row = re.compile(r"^(\S+)\s+(\d+)\s+([\d.]+) (ms|µs|us|ns|s)\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)$")
    scale = {"s": 1e3, "ms": 1.0, "µs": 1e-3, "us": 1e-3, "ns": 1e-6}
    rest = iter(lines)
    for line in rest:
        if line.startswith("by kind"):
            break
    kinds = {}
    for line in rest:
        m = row.match(line.strip())
        if not m:
            break
        kinds[m.group(1)] = {
            "steps": int(m.group(2)),
            "time_ms": float(m.group(3)) * scale[m.group(4)],
            "share_pct": float(m.group(5)),
            "gflop_s": float(m.group(6)),
            "gb_s": float(m.group(7)),
        }
    return kinds


SYSTEMS = {
    "prepare": prepare,
    "torch_eager": torch_eager,
    "torch_compile": torch_compile,
    "onnxruntime": onnxruntime,
    "openvino": openvino,
    "iree": iree,
    "kiln": kiln,
}


def main():
    system, batch = sys.argv[1], int(sys.argv[2])
    res = {"system": system, "batch": batch, "loadavg_before": loadavg()}
    try:
        res.update(SYSTEMS[system](batch))
    except Exception as e:  # noqa: BLE001
        res["status"] = "error"
        res["error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
    res["loadavg_after"] = loadavg()
    res.setdefault("status", "ok")
    emit(res)


if __name__ == "__main__":
    main()
