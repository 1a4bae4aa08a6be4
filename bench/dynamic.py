"""One artifact for every batch and length against an artifact compiled for one shape, at the
same shapes: the cost of sizes set at run time (the goal: within 3 %).

The MiniLM-L6 encoder (`models/bert_encoder.ron`: 6 layers, hidden 384, 12 heads; random
parameters from `--seed 0`, which do not change the time) is compiled with `batch` and `seq`
dynamic the way `examples/sentence_embeddings.rs` compiles it (one artifact for sentences one
at a time, `batch` 1 and `seq` in 1..=256 with hint 128; one for batches of up to 32, hint 32),
and once per shape below with `--set`. At each shape one `kiln run DYNAMIC --against STATIC
--repeats N` per round loads both and runs them on the same inputs one run each in turn, so a
slow or fast moment of the machine falls on both; a round gives each one's median and their
ratio, and the table keeps each one's best round and the median of the rounds' ratios. Uses
only the `kiln` binary and Python's standard library.

    python3 bench/dynamic.py            # everything, then the doc section
    python3 bench/dynamic.py --no-doc   # bench/out/dynamic.json only
    python3 bench/dynamic.py --doc-only # the doc section again from dynamic.json

Environment: KILN_BIN (default target/release/kiln), BENCH_DYNAMIC_REPEATS (runs per
measurement, 20), BENCH_DYNAMIC_ROUNDS (3), BENCH_DYNAMIC_TARGET (`--target` of every
compile: unset for this CPU; `vulkan` or `cuda:sm_90` time the GPU artifacts instead, into
`bench/out/dynamic-TARGET.json`, printed, not written into the docs).
"""

import datetime
import json
import os
import random
import re
import statistics
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, REPO, THREADS, write_section  # noqa: E402

WORK = OUT / "dynamic"
BEGIN, END = "<!-- dynamic:begin (written by bench/dynamic.py) -->", "<!-- dynamic:end -->"
SPEC = REPO / "models" / "bert_encoder.ron"
# The dynamic artifacts, as the embedding example compiles them: (name, batch and seq bounds as
# (min, max, hint)), and the shapes each is timed at.
ARTIFACTS = [
    ("online", {"batch": (1, 1, 1), "seq": (1, 256, 128)}, [(1, 9), (1, 40), (1, 128), (1, 256)]),
    ("offline", {"batch": (1, 32, 32), "seq": (1, 256, 128)}, [(32, 24), (32, 64), (32, 128), (8, 128), (32, 256)]),
]
REPEATS = int(os.environ.get("BENCH_DYNAMIC_REPEATS", "20"))
TARGET = os.environ.get("BENCH_DYNAMIC_TARGET", "")
ROUNDS = int(os.environ.get("BENCH_DYNAMIC_ROUNDS", "3"))
GOAL = 1.03
VOCAB = 30522


def kiln_bin():
    return os.environ.get("KILN_BIN") or str(REPO / "target" / "release" / "kiln")


def write_npy(path, shape, values):
    """An i64 array as a version 1.0 .npy file."""
    header = f"{{'descr': '<i8', 'fortran_order': False, 'shape': ({', '.join(map(str, shape))},), }}"
    pad = 64 - (10 + len(header) + 1) % 64
    header = header + " " * pad + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        f.write(struct.pack(f"<{len(values)}q", *values))


def inputs(batch, seq):
    """Token ids drawn with a fixed seed, one segment, no padding: `--input` arguments."""
    rng = random.Random(batch * 1000 + seq)
    n = batch * seq
    args = []
    for name, values in (("input_ids", [rng.randrange(VOCAB) for _ in range(n)]),
                         ("token_type_ids", [0] * n), ("attention_mask", [1] * n)):
        path = WORK / f"{name}_b{batch}_s{seq}.npy"
        write_npy(path, (batch, seq), values)
        args += ["--input", f"{name}={path}"]
    return args


def compile_artifact(out, sets):
    cmd = [kiln_bin(), "compile", str(SPEC), "--seed", "0", "-o", str(out)]
    if TARGET:
        cmd += ["--target", TARGET]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t


def medians_ms(dynamic, static, args):
    """One round: both artifacts in one process, a run of each in turn; their medians."""
    cmd = [kiln_bin(), "run", str(dynamic), "--against", str(static), "--threads", str(THREADS),
           "--repeats", str(REPEATS), *args]
    p = subprocess.run(cmd, capture_output=True, text=True)
    mine = re.search(r"latency: median ([0-9.]+) ms", p.stdout)
    other = re.search(r"against .*: median ([0-9.]+) ms", p.stdout)
    if p.returncode != 0 or not mine or not other:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return float(mine.group(1)), float(other.group(1))


def measure():
    WORK.mkdir(parents=True, exist_ok=True)
    start = os.getloadavg()
    t0 = time.perf_counter()
    compile_s, rows = {}, []
    for name, bounds, shapes in ARTIFACTS:
        dyn = WORK / f"{name}.kiln"
        sets = [f"{k}=Dyn(min: {lo}, max: {hi}, hint: {h})" for k, (lo, hi, h) in bounds.items()]
        compile_s[name] = compile_artifact(dyn, sets)
        for batch, seq in shapes:
            static = WORK / f"b{batch}-s{seq}.kiln"
            compile_s[f"{batch}x{seq}"] = compile_artifact(static, [f"batch={batch}", f"seq={seq}"])
            args = inputs(batch, seq)
            runs = {"static": [], "dynamic": []}
            for _ in range(ROUNDS):
                d, st = medians_ms(dyn, static, args)
                runs["dynamic"].append(d)
                runs["static"].append(st)
            best = {k: min(v) for k, v in runs.items()}
            ratio = statistics.median(d / st for d, st in zip(runs["dynamic"], runs["static"]))
            rows.append({"artifact": name, "bounds": bounds, "batch": batch, "seq": seq, "rounds_ms": runs,
                         "best_ms": best, "ratio": ratio})
            print(f"{name} {batch}x{seq}: static {best['static']:.2f} ms, dynamic {best['dynamic']:.2f} ms, "
                  f"{ratio:.3f}x", flush=True)
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "target": TARGET or "cpu", "wall_s": time.perf_counter() - t0,
            "loadavg_start": start, "loadavg_end": os.getloadavg(),
            "threads": THREADS, "repeats": REPEATS, "rounds": ROUNDS, "compile_s": compile_s, "rows": rows}


def section(res):
    lo = lambda x: " / ".join(f"{v:.2f}" for v in x)  # noqa: E731
    bounds = lambda b: ", ".join(f"`{k}` {lo_}..={hi} (hint {h})" for k, (lo_, hi, h) in b.items())  # noqa: E731
    lines = [
        BEGIN,
        f"Generated by `bench/dynamic.py` (`bench/run`) on {res['date']} in {res['wall_s'] / 60:.0f} min; rerun it "
        "to refresh (raw numbers: `bench/out/dynamic.json`). Do not edit between the markers.",
        "",
        f"MiniLM-L6 (`models/bert_encoder.ron`), {res['threads']} threads, the same inputs for both. Each round is "
        f"one `kiln run DYNAMIC --against STATIC --repeats {res['repeats']}`: both loaded in one process, one run of "
        f"each in turn, each one's median; {res['rounds']} rounds. The times are each one's best round, the ratio "
        "the median of the rounds' ratios. Load average at the start "
        f"{lo(res['loadavg_start'])}, at the end {lo(res['loadavg_end'])}.",
        "",
        f"| one artifact (bounds) | batch × seq | per shape ms | one artifact ms | ratio | goal ≤ {GOAL:.2f}× |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        ok = "holds" if r["ratio"] <= GOAL else "not yet"
        lines.append(f"| {r['artifact']} ({bounds(r['bounds'])}) | {r['batch']} × {r['seq']} "
                     f"| {r['best_ms']['static']:.2f} | {r['best_ms']['dynamic']:.2f} | {r['ratio']:.3f}× | {ok} |")
    lines += ["", END]
    return "\n".join(lines)


def write_doc(res):
    write_section(section(res), BEGIN, END, "dynamic")


def main():
    path = OUT / (f"dynamic-{TARGET.replace(':', '-')}.json" if TARGET else "dynamic.json")
    if "--doc-only" in sys.argv:
        write_doc(json.loads(path.read_text()))
        return
    res = measure()
    OUT.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1))
    print(f"wrote {path}")
    if TARGET:
        print(section(res))
    elif "--no-doc" not in sys.argv:
        write_doc(res)


if __name__ == "__main__":
    main()
