#!/usr/bin/env python3
"""Kernel micro-benchmarks next to the MiniLM comparison (called by bench/run unless
BENCH_MICRO=0), written to bench/out/micro.json:

- sgemm 1024³ and 4096³: `cargo bench -p kiln-codegen --bench matmul` on 2 threads, which times
  Kiln's generated kernel and numpy's matmul (OpenBLAS, from this venv) itself;
- attention 12 heads × 64, seq 512 and 2048, f32, 2 threads: Kiln's fused kernel from
  `cargo bench -p kiln-codegen --bench fused`, PyTorch `scaled_dot_product_attention` and ONNX
  Runtime's com.microsoft MultiHeadAttention (a one-node graph), each peer in its own process and
  checked against the other before it is timed.

`micro.py peer torch_sdpa|ort_mha SEQ` is the per-peer worker.
"""

import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, REPO, THREADS, emit, time_calls  # noqa: E402

HEADS, D = 12, 64
SEQS = (512, 2048)


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


def peer(name, seq):
    try:
        res = {"torch_sdpa": torch_sdpa, "ort_mha": ort_mha}[name](seq)
        res.setdefault("status", "ok")
    except Exception as e:  # noqa: BLE001
        res = {"status": "error", "error": f"{type(e).__name__}: {e}"}
    emit(res)


def run_peer(name, seq):
    p = subprocess.run([sys.executable, __file__, "peer", name, str(seq)], capture_output=True, text=True)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"status": "crashed", "error": p.stderr[-2000:]}


def cargo_bench(name, args, env=None):
    cmd = ["cargo", "bench", "-q", "-p", "kiln-codegen", "--bench", name, "--", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    return p.returncode, p.stdout, p.stderr, " ".join(cmd)


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
    rc, out, err, cmd = cargo_bench("fused", ["attention"])
    micro["raw"]["fused"] = {"command": cmd, "stdout": out, "rc": rc}
    if rc != 0:
        micro["notes"].append(f"attention: `{cmd}` failed: {err.strip().splitlines()[-1] if err.strip() else rc}")
    kiln_ms, seq = {}, None
    for line in out.splitlines():
        m = re.match(r"^attention 12x64 seq (\d+)", line)
        if m:
            seq = int(m.group(1))
        m = re.match(rf"^\s+{THREADS} thr: fused\s+([\d.]+) GFLOP/s \(\s*([\d.]+) ms\)", line)
        if m and seq:
            kiln_ms[seq] = float(m.group(2))
    for seq in SEQS:
        t = run_peer("torch_sdpa", seq)
        o = run_peer("ort_mha", seq)
        row = {"seq": seq, "kiln_ms": kiln_ms.get(seq), "torch": t, "ort": o}
        row["torch_sdpa_ms"] = (t.get("latency") or {}).get("median_ms")
        row["ort_mha_ms"] = (o.get("latency") or {}).get("median_ms")
        for n, r in (("torch SDPA", t), ("ORT MultiHeadAttention", o)):
            if r.get("status") != "ok":
                micro["notes"].append(f"attention seq {seq}: {n}: {r.get('status')}: {str(r.get('error', ''))[:300]}")
        micro["attention"].append(row)
    micro["notes"].append(
        "sgemm: both columns from the matmul bench itself (median and best GFLOP/s over a 1.5–6 s budget); "
        "attention: Kiln's median from the fused bench (2-s budget), the peers' medians of 20 runs after 3 warm-up "
        "runs, batch 1, no mask, the same shapes."
    )
    (OUT / "micro.json").write_text(json.dumps(micro, indent=2) + "\n")
    print(f"wrote {OUT / 'micro.json'}")
    for r in micro["sgemm"]:
        print(f"sgemm {r['shape']}: kiln {r['kiln']} numpy {r['numpy']} ratio {r['ratio']}")
    for r in micro["attention"]:
        print(f"attention seq {r['seq']}: kiln {r['kiln_ms']} ms, torch sdpa {r['torch_sdpa_ms']} ms, ort mha {r['ort_mha_ms']} ms")


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "peer":
        peer(sys.argv[2], int(sys.argv[3]))
    else:
        main()
