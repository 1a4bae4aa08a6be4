#!/usr/bin/env python3
"""Runs the MiniLM-L6 peer comparison (called by bench/run, inside bench/.venv) and writes
bench/out/results.json.

For each batch size: `systems.py prepare B` (inputs, PyTorch eager reference, ONNX export), then
one process per system (`systems.py SYSTEM B`). Machine facts and versions are recorded too.
Optional micro-benchmarks (sgemm, attention, LayerNorm) are merged in from bench/out/micro.json when
bench/micro.py has written it.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BATCHES, OUT, REPEATS, REPO, ROUNDS, SEQ, THREADS, TOLERANCE, WARMUP  # noqa: E402

SYSTEMS = ["torch_eager", "torch_compile", "onnxruntime", "openvino", "iree", "kiln"]
PYPI = [
    "torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino",
    "iree-base-compiler", "iree-base-runtime", "numpy", "safetensors", "matplotlib",
]


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


def sh(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def machine():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in cpuinfo.splitlines() if l.startswith("flags")), [])
    mem = next(l.split()[1] for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / (1 << 20), 1),
        "simd": [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def versions():
    v = {}
    for p in PYPI:
        try:
            v[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            v[p] = None
    kiln = os.environ.get("KILN_BIN", str(REPO / "target" / "release" / "kiln"))
    v["kiln"] = {
        "commit": sh(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "work_tree_modified": bool(sh(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])),
        "binary": os.path.relpath(kiln, REPO) if kiln.startswith(str(REPO)) else kiln,
        "rustc": sh(["rustc", "--version"]),
        "llvm": sh(["/usr/lib/llvm-22/bin/llvm-config", "--version"]),
    }
    return v


def worker(system, batch):
    t = time.perf_counter()
    p = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("systems.py")), system, str(batch)],
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - t
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("RESULT ")), None)
    if line is None:
        res = {"system": system, "batch": batch, "status": "crashed", "returncode": p.returncode,
               "error": (p.stderr or p.stdout)[-4000:]}
    else:
        res = json.loads(line[len("RESULT "):])
    res["process_wall_s"] = round(wall, 2)
    return res


def summary(res):
    lat = res.get("latency") or {}
    med = lat.get("median_ms")
    s = f"{res['system']:14s} b{res['batch']}  {res['status']:12s}"
    if med is not None:
        s += f" median {med:8.2f} ms  min {lat['min_ms']:8.2f} ms  others {lat.get('others_cores', 0):.2f} cores"
    if "compile_s" in res:
        s += f"  compile {res['compile_s']:.2f} s"
    if res.get("check"):
        s += f"  max|Δ| {res['check']['max_abs_diff']:.2e}"
    if res["status"] != "ok":
        s += "\n    " + str(res.get("error", "")).strip().splitlines()[-1][:300] if res.get("error") else ""
    return s


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": loadavg(),
        "machine": machine(),
        "versions": versions(),
        "settings": {"threads": THREADS, "warmup": WARMUP, "repeats": REPEATS, "seq": SEQ,
                     "tolerance": TOLERANCE, "dtype": "f32", "rounds": ROUNDS},
        "cases": {},
    }
    for batch in BATCHES:
        case = {"batch": batch, "seq": SEQ}
        prep = worker("prepare", batch)
        print(summary(prep), flush=True)
        case["prepare"] = prep
        case["systems"] = {}
        if prep["status"] != "ok":
            results["cases"][f"b{batch}"] = case
            continue
        # ROUNDS rounds, the order reversed every other round; each system keeps its round with the
        # lowest median (the others' medians are kept in "rounds"), so that a burst of load from
        # other processes during one round does not decide the comparison.
        for rnd in range(ROUNDS):
            for system in SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]:
                res = worker(system, batch)
                res["round"] = rnd + 1
                print(f"[round {rnd + 1}] " + summary(res), flush=True)
                case["systems"].setdefault(system, []).append(res)
        for system in SYSTEMS:
            runs = case["systems"][system]
            timed = [r for r in runs if r.get("status") == "ok" and (r.get("latency") or {}).get("median_ms") is not None]
            keep = min(timed, key=lambda r: r["latency"]["median_ms"]) if timed else runs[-1]
            keep = dict(keep)
            keep["rounds"] = [
                {"round": r["round"], "status": r.get("status"),
                 "median_ms": (r.get("latency") or {}).get("median_ms"),
                 "min_ms": (r.get("latency") or {}).get("min_ms"),
                 "others_cores": (r.get("latency") or {}).get("others_cores"),
                 "compile_s": r.get("compile_s")}
                for r in runs
            ]
            case["systems"][system] = keep
        results["cases"][f"b{batch}"] = case
    kiln = [c["systems"].get("kiln", {}) for c in results["cases"].values()]
    results["machine"]["llvm_cpu"] = next((k.get("llvm_cpu") for k in kiln if k.get("llvm_cpu")), None)
    micro = OUT / "micro.json"
    if micro.exists():
        results["micro"] = json.loads(micro.read_text())
    results["loadavg_end"] = loadavg()
    results["wall_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT / 'results.json'}")


if __name__ == "__main__":
    main()
