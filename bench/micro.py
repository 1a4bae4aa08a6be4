#!/usr/bin/env python3
"""Kernel micro-benchmarks next to the MiniLM comparison (called by bench/run unless
BENCH_MICRO=0), written to bench/out/micro.json:

- sgemm 1024³ and 4096³: `cargo bench -p kiln-codegen --bench matmul` on 2 threads, which times
  Kiln's generated kernel and numpy's matmul (OpenBLAS, from this venv) itself;
- attention 12 heads × 64, seq 512 and 2048, f32, 2 threads: Kiln's fused kernel from
  `cargo bench -p kiln-codegen --bench fused`, PyTorch `scaled_dot_product_attention` and ONNX
  Runtime's com.microsoft MultiHeadAttention (a one-node graph), each peer in its own process and
  checked against the other before it is timed;
- LayerNorm 4096×4096, f32, affine (gamma, beta), eps 1e-5, over the last axis, 2 threads: Kiln's
  `layer_norm` kernel from the same fused bench (its `norm` part), PyTorch
  `torch.nn.functional.layer_norm`, ONNX Runtime and OpenVINO (CPU) on a one-node ONNX
  `LayerNormalization` graph (opset 17), each peer in its own process and checked against numpy's
  float64 reference (max |Δ| ≤ 1e-4) before it is timed. GB/s counts the input read and the output
  written (2 × 64 MiB), as Kiln's bench does.

`micro.py peer torch_sdpa|ort_mha SEQ` and `micro.py peer torch_layer_norm|ort_layer_norm|ov_layer_norm`
are the per-peer workers.
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, REPO, ROUNDS, THREADS, emit, time_calls  # noqa: E402

HEADS, D = 12, 64
SEQS = (512, 2048)
NORM_ROWS, NORM_COLS = 4096, 4096  # the shape of the fused bench's row kernels
NORM_EPS = 1e-5
NORM_TOLERANCE = 1e-4  # max |peer - numpy float64 reference|
NORM_BYTES = 2 * NORM_ROWS * NORM_COLS * 4  # input read + output written, as Kiln's bench counts


def qkv(seq):
    import numpy as np

    rng = np.random.default_rng(seq)
    return [rng.standard_normal((1, HEADS, seq, D), dtype=np.float32) for _ in range(3)]


def torch_sdpa(seq):
    import torch

    torch.set_num_threads(THREADS)
    q, k, v = (torch.from_numpy(a) for a in qkv(seq))

    def run():
        with torch.inference_mode():
            return torch.nn.functional.scaled_dot_product_attention(q, k, v).numpy()

    out = run()
    np_out = out.transpose(0, 2, 1, 3).reshape(1, seq, HEADS * D)
    ref = OUT / f"attn_ref_{seq}.npy"
    import numpy as np

    np.save(ref, np_out)
    return {"latency": time_calls(run, warmup=3, repeats=20)}


def ort_mha(seq):
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    hidden = HEADS * D
    node = helper.make_node("MultiHeadAttention", ["q", "k", "v"], ["out"], domain="com.microsoft", num_heads=HEADS)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, seq, hidden]) for n in ("q", "k", "v", "out")]
    graph = helper.make_graph([node], "mha", io[:3], io[3:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feed = {n: a.transpose(0, 2, 1, 3).reshape(1, seq, hidden).copy() for n, a in zip("qkv", qkv(seq))}

    def run():
        return sess.run(None, feed)[0]

    res = {}
    ref = OUT / f"attn_ref_{seq}.npy"
    if ref.exists():
        res["max_abs_diff_vs_torch"] = float(np.max(np.abs(run() - np.load(ref))))
        if res["max_abs_diff_vs_torch"] > 1e-3:
            res["status"] = "wrong output"
            return res
    res["latency"] = time_calls(run, warmup=3, repeats=20)
    return res


def norm_data():
    """The LayerNorm input, gamma and beta (f32, fixed seed); every peer draws the same."""
    import numpy as np

    rng = np.random.default_rng(NORM_ROWS)
    x = rng.standard_normal((NORM_ROWS, NORM_COLS), dtype=np.float32)
    gamma = rng.standard_normal(NORM_COLS, dtype=np.float32)
    beta = rng.standard_normal(NORM_COLS, dtype=np.float32)
    return x, gamma, beta


def norm_checked_timing(run, output):
    """Checks `output` (the peer's first result) against numpy's float64 LayerNorm, then times
    `run` if it is within NORM_TOLERANCE."""
    import numpy as np

    x, gamma, beta = (a.astype(np.float64) for a in norm_data())
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    ref = (x - mean) / np.sqrt(var + NORM_EPS) * gamma + beta
    del x, mean, var
    delta = float(np.max(np.abs(np.asarray(output, dtype=np.float64).reshape(ref.shape) - ref)))
    res = {"max_abs_diff": delta, "tolerance": NORM_TOLERANCE}
    if not delta <= NORM_TOLERANCE:
        res["status"] = "wrong output"
        return res
    del ref
    lat = time_calls(run, warmup=3, repeats=20)
    lat["gb_s"] = NORM_BYTES / (lat["median_ms"] * 1e-3) / 1e9
    res["latency"] = lat
    return res


def layer_norm_onnx():
    """A one-node ONNX graph: LayerNormalization over the last axis, gamma and beta as
    initializers (weights, as in a model)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    _, gamma, beta = norm_data()
    node = helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], axis=-1, epsilon=NORM_EPS)
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [NORM_ROWS, NORM_COLS]) for n in ("x", "y")]
    inits = [numpy_helper.from_array(gamma, "gamma"), numpy_helper.from_array(beta, "beta")]
    graph = helper.make_graph([node], "layer_norm", io[:1], io[1:], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def torch_layer_norm():
    """`F.layer_norm` as a user calls it: it allocates its output on every call (there is no
    `out=`), so the time includes that allocation."""
    import torch

    torch.set_num_threads(THREADS)
    x, gamma, beta = (torch.from_numpy(a) for a in norm_data())

    def run():
        with torch.inference_mode():
            return torch.nn.functional.layer_norm(x, (NORM_COLS,), gamma, beta, NORM_EPS)

    return norm_checked_timing(run, run().numpy())


def ort_layer_norm():
    """ONNX Runtime through I/O binding: the input bound in place and the output written into one
    preallocated array, like Kiln's bench (a plain `sess.run` would add a 64 MiB output copy)."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(layer_norm_onnx().SerializeToString(), so, providers=["CPUExecutionProvider"])
    x, _, _ = norm_data()
    y = np.empty_like(x)
    binding = sess.io_binding()
    binding.bind_cpu_input("x", x)
    binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)

    def run():
        sess.run_with_iobinding(binding)

    run()
    return norm_checked_timing(run, y)


def ov_layer_norm():
    """OpenVINO CPU on the same ONNX graph, f32 precision, the input tensor shared with numpy and
    the output left in the infer request's own tensor (no copies per call)."""
    import openvino as ov

    path = OUT / "layer_norm.onnx"
    path.write_bytes(layer_norm_onnx().SerializeToString())
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    req = compiled.create_infer_request()
    x, _, _ = norm_data()
    req.set_input_tensor(ov.Tensor(x, shared_memory=True))

    def run():
        req.infer()

    run()
    return norm_checked_timing(run, req.get_output_tensor().data)


PEERS = {
    "torch_sdpa": torch_sdpa,
    "ort_mha": ort_mha,
    "torch_layer_norm": torch_layer_norm,
    "ort_layer_norm": ort_layer_norm,
    "ov_layer_norm": ov_layer_norm,
}
# The LayerNorm peers, in table order, with the names the report shows.
NORM_PEERS = {
    "torch_layer_norm": "PyTorch `F.layer_norm`",
    "ort_layer_norm": "ONNX Runtime `LayerNormalization`",
    "ov_layer_norm": "OpenVINO `LayerNormalization`",
}


def peer(name, *args):
    try:
        res = PEERS[name](*args)
        res.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001
        res = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    emit(res)


def run_peer(name, *args):
    p = subprocess.run([sys.executable, __file__, "peer", name, *map(str, args)], capture_output=True, text=True)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"status": "crashed", "error": p.stderr[-2000:]}


def cargo_bench(name, args, env=None):
    cmd = ["cargo", "bench", "-q", "-p", "kiln-codegen", "--bench", name, "--", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr, " ".join(cmd)


def layer_norm_case():
    """Kiln's `layer_norm` line of the fused bench (its `norm` part) on THREADS threads, then each
    peer in its own process."""
    rc, out, err, cmd = cargo_bench("fused", ["norm"])
    case = {"shape": [NORM_ROWS, NORM_COLS], "eps": NORM_EPS, "bytes": NORM_BYTES, "kiln_ms": None, "kiln_gb_s": None}
    case["raw"] = {"command": cmd, "stdout": out, "rc": rc}
    if rc != 0:
        case["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit status {rc}"
    # "  layer_norm | 1 thr   12.3 GB/s ( 10.90 ms) | 2 thr   20.1 GB/s (  6.68 ms)"
    for line in out.splitlines():
        if line.strip().startswith("layer_norm"):
            m = re.search(rf"\|\s*{THREADS} thr\s+([\d.]+) GB/s \(\s*([\d.]+) ms\)", line)
            if m:
                case["kiln_gb_s"], case["kiln_ms"] = float(m.group(1)), float(m.group(2))
    case["peers"] = {key: {"system": name, **run_peer(key)} for key, name in NORM_PEERS.items()}
    return case


def main():
    micro = {"sgemm": [], "attention": [], "notes": [], "raw": {}}
    env = {"KILN_BENCH_PYTHON": sys.executable, "KILN_BENCH_THREADS": str(THREADS)}
    rc, out, err, cmd = cargo_bench("matmul", ["1024^3", "4096^3"], env)
    micro["raw"]["matmul"] = {"command": f"KILN_BENCH_THREADS={THREADS} " + cmd, "stdout": out, "rc": rc}
    if rc != 0:
        micro["notes"].append(f"sgemm: `{cmd}` failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
    for line in out.splitlines():
        m = re.match(r"^\s+(\d+\^3)\s+(\S+ \(\S+\))\s+(\S+ \(\S+\)|-)\s+(\S+ \(\S+\)|-)", line)
        if m:
            micro["sgemm"].append({"shape": m.group(1), "kiln": m.group(2), "numpy": m.group(3), "ratio": m.group(4)})
    # ROUNDS rounds of Kiln's fused bench and the two peers per sequence length (Kiln first in
    # even rounds, last in odd ones); each keeps its round with the lowest median, as the MiniLM
    # comparison does. Rounds after the first skip the unfused attention.
    rounds = {seq: {"kiln": [], "torch": [], "ort": []} for seq in SEQS}

    def kiln_round(rnd):
        env = {} if rnd == 0 else {"KILN_BENCH_FUSED_ONLY": "1"}
        rc, out, err, cmd = cargo_bench("fused", ["attention"], env)
        if rnd == 0:
            micro["raw"]["fused"] = {"command": cmd, "stdout": out, "rc": rc}
        if rc != 0:
            micro["notes"].append(f"attention: `{cmd}` failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
        seq = None
        for line in out.splitlines():
            m = re.match(r"^attention 12x64 seq (\d+)", line)
            if m:
                seq = int(m.group(1))
            m = re.match(rf"^\s+{THREADS} thr: fused\s+([\d.]+) GFLOP/s \(\s*([\d.]+) ms\)", line)
            if m and seq in rounds:
                rounds[seq]["kiln"].append(float(m.group(2)))

    def peer_round():
        for seq in SEQS:
            for key, name in (("torch", "torch_sdpa"), ("ort", "ort_mha")):
                rounds[seq][key].append(run_peer(name, seq))

    for rnd in range(ROUNDS):
        if rnd % 2 == 0:
            kiln_round(rnd)
            peer_round()
        else:
            peer_round()
            kiln_round(rnd)

    def median_of(r):
        return (r.get("latency") or {}).get("median_ms") if r.get("status") == "ok" else None

    def best(runs):
        timed = [r for r in runs if median_of(r) is not None]
        return dict(min(timed, key=median_of) if timed else runs[-1])

    for seq in SEQS:
        t, o = best(rounds[seq]["torch"]), best(rounds[seq]["ort"])
        kiln = rounds[seq]["kiln"]
        row = {"seq": seq, "kiln_ms": min(kiln) if kiln else None, "torch": t, "ort": o}
        row["torch_sdpa_ms"] = median_of(t)
        row["ort_mha_ms"] = median_of(o)
        row["rounds"] = {
            "kiln_ms": kiln,
            "torch_sdpa_ms": [median_of(r) for r in rounds[seq]["torch"]],
            "ort_mha_ms": [median_of(r) for r in rounds[seq]["ort"]],
        }
        for n, r in (("torch SDPA", t), ("ORT MultiHeadAttention", o)):
            if r.get("status") != "ok":
                micro["notes"].append(f"attention seq {seq}: {n}: {r.get('status')}: {str(r.get('error', ''))[:300]}")
        micro["attention"].append(row)
    ln = micro["layer_norm"] = layer_norm_case()
    micro["raw"]["fused_norm"] = ln.pop("raw")
    if ln["kiln_ms"] is None:
        why = ln.pop("error", "no 2-thread `layer_norm` line in its output")
        micro["notes"].append(f"LayerNorm: `{micro['raw']['fused_norm']['command']}`: {why}")
    for r in ln["peers"].values():
        if r.get("status") != "ok":
            micro["notes"].append(f"LayerNorm: {r['system']}: {r.get('status')}: {str(r.get('error', ''))[:300]}")
    micro["notes"].append(
        "sgemm: both columns from the matmul bench itself (median and best GFLOP/s over a 1.5–6 s budget); "
        f"attention: Kiln's median from the fused bench (2-s budget; its second thread lives for the whole measurement and spins between calls, as the runtime's pool does between steps), the peers' medians of 20 runs after 3 warm-up "
        f"runs, batch 1, no mask, the same shapes, each the best of {ROUNDS} alternating rounds; LayerNorm: Kiln's median from the fused bench (2-s budget, "
        "output into a preallocated buffer), the peers' medians of 20 runs after 3 warm-up runs, each checked "
        f"against numpy's float64 LayerNorm (max |Δ| ≤ {NORM_TOLERANCE:g}) first; GB/s = (input read + output "
        "written) / median, gamma and beta not counted, as Kiln's bench counts; ONNX Runtime (I/O binding) and "
        "OpenVINO write into preallocated outputs too, PyTorch allocates its output on every call."
    )
    (OUT / "micro.json").write_text(json.dumps(micro, indent=2) + "\n")
    print(f"wrote {OUT / 'micro.json'}")
    for r in micro["sgemm"]:
        print(f"sgemm {r['shape']}: kiln {r['kiln']} numpy {r['numpy']} ratio {r['ratio']}")
    for r in micro["attention"]:
        print(f"attention seq {r['seq']}: kiln {r['kiln_ms']} ms, torch sdpa {r['torch_sdpa_ms']} ms, ort mha {r['ort_mha_ms']} ms")
    ln = micro["layer_norm"]
    peers = ", ".join(f"{k} {(r.get('latency') or {}).get('median_ms')} ms" for k, r in ln["peers"].items())
    print(f"layer_norm {NORM_ROWS}x{NORM_COLS}: kiln {ln['kiln_ms']} ms ({ln['kiln_gb_s']} GB/s), {peers}")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "peer":
        peer(sys.argv[2], *map(int, sys.argv[3:]))
    else:
        main()
