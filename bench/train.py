#!/usr/bin/env python3
"""Train-step benchmark (called by bench/run unless BENCH_TRAIN=0, inside bench/.venv): one full
optimizer step (forward, loss, backward, update) of Kiln's compiled `train_step` against PyTorch
eager and torch.compile, f32 on 2 threads, with each system's peak RSS. Writes
bench/out/train.json and the section of docs/benchmarks.md between the train markers.

Cases: models/mlp.ron (784 → 256 → 128 → 10, cross-entropy, Adam under its cosine schedule) at
batch 8 and 128, and bench/train/bert2_tokcls.ron (2 BERT layers at MiniLM width, a
token-classification head, AdamW) at batch 8 × seq 128.

Per case, before any timing: PyTorch builds the model from a fixed seed and writes its
parameters and the inputs (bench/out/train/); Kiln compiles the spec with `--train --weights`
from that file, so all three start from the same parameters; the losses of the first CHECK_STEPS
steps (each step's loss is computed before its update) of Kiln and of torch.compile must equal
eager PyTorch's within TOLERANCE. Then ROUNDS rounds, the systems' order reversed every other
round, each system timed in a fresh process (warm-up steps, then timed steps; the median), each
keeping its round with the lowest median. Peak RSS is the process's `ru_maxrss` as `wait4`
reports it, the same for every system: for PyTorch it includes Python, torch and (compiled)
its compilation; for Kiln the `kiln run` process that loads the artifact and runs the steps.

    bench/.venv/bin/python bench/train.py              # everything
    bench/.venv/bin/python bench/train.py --doc-only   # rewrite the doc section from train.json
Environment: BENCH_TRAIN_ROUNDS (default 3), KILN_BIN (default target/release/kiln).
"""

import datetime
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# A train step is slow next to a forward pass: no long waits for a quiet machine by default
# (the contention of every run is recorded instead).
os.environ.setdefault("BENCH_ATTEMPTS", "1")
os.environ.setdefault("BENCH_QUIET_WAIT_S", "10")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, REPO, THREADS, Contention, make_inputs, wait_quiet, write_section  # noqa: E402

WORK = OUT / "train"
BEGIN, END = "<!-- train:begin (written by bench/train.py) -->", "<!-- train:end -->"
ROUNDS = int(os.environ.get("BENCH_TRAIN_ROUNDS", "3"))
CHECK_STEPS = 3
TOLERANCE = 1e-4  # max |loss - eager PyTorch's loss| / max(1, |loss|) over the checked steps
SEED = 20251204
SYSTEMS = ["torch_eager", "torch_compile", "kiln"]

CASES = {
    "mlp_b8": {"kind": "mlp", "batch": 8, "warmup": 20, "repeats": 200},
    "mlp_b128": {"kind": "mlp", "batch": 128, "warmup": 10, "repeats": 100},
    "bert2_b8": {"kind": "bert", "batch": 8, "seq": 128, "warmup": 3, "repeats": 10},
}
SPECS = {"mlp": REPO / "models" / "mlp.ron", "bert": REPO / "bench" / "train" / "bert2_tokcls.ron"}


def kiln_bin():
    return os.environ.get("KILN_BIN") or str(REPO / "target" / "release" / "kiln")


def loadavg():
    return Path("/proc/loadavg").read_text().split()[:3]


# --- the models in PyTorch -----------------------------------------------------------------


def lr_factor(s, warmup=100, total=10000, min_ratio=1e-5 / 1e-3):
    """models/mlp.ron's schedule as a LambdaLR factor after s steps: warm-up from 0, then cosine
    down to min_lr (compiler/lower/src/schedule.rs, Hugging Face's
    get_cosine_with_min_lr_schedule_with_warmup)."""
    if s < warmup:
        return s / max(1, warmup)
    p = min(1.0, (s - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))


def build(case):
    """(model returning the loss from the inputs, optimizer, scheduler or None, input names)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    c = CASES[case]
    if c["kind"] == "mlp":

        class Mlp(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = torch.nn.Linear(784, 256)
                self.fc2 = torch.nn.Linear(256, 128)
                self.fc3 = torch.nn.Linear(128, 10)

            def forward(self, image, label):
                h = F.relu(self.fc1(image))
                h = F.relu(self.fc2(h))
                return F.cross_entropy(self.fc3(h), label)

        model = Mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return model, opt, sched, ("image", "label")

    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
        intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        hidden_act="gelu",
    )

    class TokCls(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = BertModel(config, add_pooling_layer=False)
            self.head = torch.nn.Linear(384, 9)

        def forward(self, input_ids, token_type_ids, attention_mask, labels):
            x = self.bert(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask).last_hidden_state
            return F.cross_entropy(self.head(x).reshape(-1, 9), labels.reshape(-1), ignore_index=-100)

    model = TokCls().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    return model, opt, None, ("input_ids", "token_type_ids", "attention_mask", "labels")


def kiln_name(name):
    """A PyTorch parameter name as the spec's checkpoint name (the BERT's `bert.` prefix off)."""
    return name[len("bert."):] if name.startswith("bert.") else name


def make_case_inputs(case):
    import numpy as np

    c = CASES[case]
    rng = np.random.default_rng(SEED + c["batch"])
    if c["kind"] == "mlp":
        return {
            "image": rng.random((c["batch"], 784), dtype=np.float32),
            "label": rng.integers(0, 10, size=(c["batch"],), dtype=np.int64),
        }
    x = make_inputs(c["batch"])  # token ids with padding, as the MiniLM benchmark's
    labels = rng.integers(0, 9, size=x["input_ids"].shape, dtype=np.int64)
    labels[x["attention_mask"] == 0] = -100
    return {**x, "labels": labels}


def prepare(case):
    """Writes the case's parameters (checkpoint names) and inputs, and eager PyTorch's losses of
    the first CHECK_STEPS steps."""
    from safetensors.numpy import save_file

    model, _, _, _ = build(case)
    params = {kiln_name(n): p.detach().numpy().copy() for n, p in model.named_parameters()}
    save_file(params, str(WORK / f"{case}_params.safetensors"))
    save_file(make_case_inputs(case), str(WORK / f"{case}_inputs.safetensors"))
    return {"parameters": int(sum(v.size for v in params.values()))}


def torch_worker(system, case, mode):
    """mode `check`: the losses of the first CHECK_STEPS steps; `time`: warm-up, then the median
    of timed steps (each: zero_grad(set_to_none=True), loss, backward, step)."""
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(THREADS)
    model, opt, sched, names = build(case)
    data = load_file(str(WORK / f"{case}_inputs.safetensors"))
    inputs = [torch.from_numpy(data[n]) for n in names]
    run = torch.compile(model) if system == "torch_compile" else model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = run(*inputs)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        return loss

    if mode == "check":
        return {"losses": [float(step().detach()) for _ in range(CHECK_STEPS)]}
    c = CASES[case]
    t = time.perf_counter()
    for _ in range(c["warmup"]):
        step()
    warmup_s = time.perf_counter() - t
    times = []
    for _ in range(c["repeats"]):
        t = time.perf_counter()
        step()
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "repeats": len(times),
            "warmup": c["warmup"], "warmup_s": round(warmup_s, 2)}


# --- processes, each measured the same way ---------------------------------------------------


def measured(cmd):
    """Runs cmd; (returncode, stdout+stderr, peak RSS in MiB from wait4, CPU cores others used)."""
    with Contention(children=True) as c:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out = p.stdout.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, out, round(usage.ru_maxrss / 1024, 1), round(c.others_cores, 3)


def torch_run(system, case, mode):
    rc, out, rss, others = measured([sys.executable, __file__, "worker", system, case, mode])
    line = next((l for l in reversed(out.splitlines()) if l.startswith("RESULT ")), None)
    if rc != 0 or line is None:
        return {"status": "failed", "error": out[-3000:]}
    return {"status": "ok", **json.loads(line[len("RESULT "):]), "peak_rss_mib": rss, "others_cores": others}


def kiln_run(case, art, extra):
    cmd = [kiln_bin(), "run", str(art), "--entry", "train_step", "--threads", str(THREADS),
           "--input", str(WORK / f"{case}_inputs.safetensors"), *extra]
    return measured(cmd)


def kiln_compile(case):
    c = CASES[case]
    art = WORK / f"{case}.kiln"
    shutil.rmtree(art, ignore_errors=True)
    cmd = [kiln_bin(), "compile", str(SPECS[c["kind"]]), "--train", "-o", str(art),
           "--weights", str(WORK / f"{case}_params.safetensors"), "--set", f"batch={c['batch']}"]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    res = {"compile_s": round(time.perf_counter() - t, 2), "compile_output": (p.stdout + p.stderr).strip().splitlines()[-6:]}
    if p.returncode != 0:
        res["status"] = "compile failed"
    return art, res


def kiln_check(case, art):
    from safetensors.numpy import load_file

    losses = []
    for n in range(1, CHECK_STEPS + 1):
        out = WORK / f"{case}_kiln_step{n}.safetensors"
        rc, text, _, _ = kiln_run(case, art, ["--repeats", str(n), "-o", str(out)])
        if rc != 0:
            return {"status": "failed", "error": text[-3000:]}
        losses.append(float(load_file(str(out))["loss"]))
    return {"status": "ok", "losses": losses}


def kiln_time(case, art):
    c = CASES[case]
    # `kiln run --repeats N` runs N optimizer steps in one process and prints the median and min
    # of their wall times; the warm-up steps are timed too, so they are added to N.
    n = c["repeats"] + c["warmup"]
    rc, out, rss, others = kiln_run(case, art, ["--repeats", str(n)])
    m = re.search(r"latency: median ([\d.]+) ms, min ([\d.]+) ms over (\d+) runs \((\d+) threads\)", out)
    if rc != 0 or not m:
        return {"status": "failed", "error": out[-3000:]}
    return {"status": "ok", "median_ms": float(m.group(1)), "min_ms": float(m.group(2)), "repeats": int(m.group(3)),
            "warmup": 0, "note": f"`kiln run --entry train_step --repeats {n}` (median over all {n} steps)",
            "peak_rss_mib": rss, "others_cores": others}


def agree(losses, reference):
    if not losses or len(losses) != len(reference) or not all(math.isfinite(x) for x in losses):
        return {"ok": False, "losses": losses, "reference": reference}
    worst = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, reference))
    return {"ok": worst <= TOLERANCE, "max_rel_diff": worst, "tolerance": TOLERANCE, "losses": losses, "reference": reference}


# --- the comparison ------------------------------------------------------------------------------


def run_case(case):
    res = {"case": case, **CASES[case], "spec": os.path.relpath(SPECS[CASES[case]["kind"]], REPO)}
    rc, out, _, _ = measured([sys.executable, __file__, "worker", "prepare", case, "check"])
    line = next((l for l in reversed(out.splitlines()) if l.startswith("RESULT ")), None)
    if rc != 0 or line is None:
        res["status"] = "prepare failed"
        res["error"] = out[-3000:]
        return res
    res.update(json.loads(line[len("RESULT "):]))

    art, comp = kiln_compile(case)
    res["kiln_compile"] = comp
    eager = torch_run("torch_eager", case, "check")
    if eager["status"] != "ok":
        res["status"] = "eager check failed"
        res["error"] = eager.get("error")
        return res
    ref = eager["losses"]
    res["check"] = {"torch_eager": {"losses": ref}}
    ok = {"torch_eager": True}
    compiled = torch_run("torch_compile", case, "check")
    res["check"]["torch_compile"] = agree(compiled.get("losses", []), ref) if compiled["status"] == "ok" else compiled
    ok["torch_compile"] = res["check"]["torch_compile"].get("ok", False)
    if comp.get("status"):
        res["check"]["kiln"] = {"ok": False, "error": "\n".join(comp["compile_output"])}
    else:
        k = kiln_check(case, art)
        res["check"]["kiln"] = agree(k["losses"], ref) if k["status"] == "ok" else {"ok": False, **k}
    ok["kiln"] = res["check"]["kiln"].get("ok", False)
    for s in SYSTEMS:
        print(f"  check {s:14s} {'ok' if ok[s] else 'FAILED'}  {res['check'][s].get('losses')}", flush=True)

    runs = {s: [] for s in SYSTEMS}
    for rnd in range(ROUNDS):
        for s in SYSTEMS if rnd % 2 == 0 else SYSTEMS[::-1]:
            if not ok[s]:
                continue
            quiet = wait_quiet()
            r = kiln_time(case, art) if s == "kiln" else torch_run(s, case, "time")
            r["round"], r["quiet_wait"] = rnd + 1, quiet
            runs[s].append(r)
            med = f"{r['median_ms']:9.2f} ms" if r.get("median_ms") is not None else r.get("status")
            print(f"  [round {rnd + 1}] {s:14s} {med}  peak RSS {r.get('peak_rss_mib')} MiB  others {r.get('others_cores')} cores", flush=True)
    res["systems"] = {}
    for s in SYSTEMS:
        timed = [r for r in runs[s] if r.get("status") == "ok"]
        if not timed:
            res["systems"][s] = {"status": "not timed" if not ok[s] else "failed", "runs": runs[s]}
            continue
        keep = dict(min(timed, key=lambda r: r["median_ms"]))
        keep["rounds"] = [{k: r.get(k) for k in ("round", "median_ms", "min_ms", "peak_rss_mib", "others_cores")} for r in runs[s]]
        res["systems"][s] = keep
    peers = [res["systems"][s]["median_ms"] for s in ("torch_eager", "torch_compile") if "median_ms" in res["systems"][s]]
    kiln = res["systems"]["kiln"].get("median_ms")
    if peers and kiln is not None:
        res["kiln_vs_faster_peer"] = round(kiln / min(peers), 3)
    res["status"] = "ok"
    return res


def versions():
    from importlib import metadata

    v = {p: metadata.version(p) for p in ("torch", "transformers", "numpy")}
    v["kiln_commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return v


# --- the doc section -----------------------------------------------------------------------------


def section(results):
    def ms(x):
        return "—" if x is None else (f"{x:.2f}" if x < 100 else f"{x:.0f}")

    names = {"mlp_b8": "MLP 784-256-128-10, batch 8", "mlp_b128": "MLP 784-256-128-10, batch 128",
             "bert2_b8": "BERT 2 layers (MiniLM width) + token head, 8 × 128"}
    lines = [
        BEGIN,
        "",
        f"Last run {results['date']} by `bench/train.py` (raw numbers: `bench/out/train.json`), "
        f"load average {' '.join(results['loadavg_start'])} at the start and "
        f"{' '.join(results['loadavg_end'])} at the end; torch {results['versions']['torch']}, "
        f"Kiln {results['versions']['kiln_commit']}. Do not edit between the markers.",
        "",
        "| case | PyTorch eager ms | torch.compile ms | Kiln ms | Kiln / faster peer | peak RSS MiB: eager / compile / Kiln | others' load, cores: eager / compile / Kiln | loss check (3 steps, rel. Δ vs eager) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rounds = []
    for case, r in results["cases"].items():
        sy = r.get("systems", {})
        med = [sy.get(s, {}).get("median_ms") for s in SYSTEMS]
        rss = [sy.get(s, {}).get("peak_rss_mib") for s in SYSTEMS]
        others = [sy.get(s, {}).get("others_cores") for s in SYSTEMS]
        rounds.append(f"- {names.get(case, case)} (run started {r.get('measured', results['date'])}): " + "; ".join(
            f"{s} " + ", ".join(ms(x.get("median_ms")) for x in sy.get(s, {}).get("rounds", [])) for s in SYSTEMS))
        ratio = r.get("kiln_vs_faster_peer")
        chk = r.get("check", {})
        checks = []
        for s in ("torch_compile", "kiln"):
            c = chk.get(s, {})
            checks.append(f"{'compile' if s == 'torch_compile' else 'Kiln'} "
                          + (f"{c['max_rel_diff']:.1e}" if "max_rel_diff" in c else "—") + ("" if c.get("ok") else " **failed**"))
        lines.append(
            f"| {names.get(case, case)} | {ms(med[0])} | {ms(med[1])} | {ms(med[2])} | "
            f"{'—' if ratio is None else f'{ratio:.2f}×'} | {' / '.join('—' if x is None else f'{x:.0f}' for x in rss)} | "
            f"{' / '.join('—' if x is None else f'{x:.2f}' for x in others)} | {'; '.join(checks)} |"
        )
    lines += ["", "Each round's median (ms), in round order; the table keeps each system's lowest:", "", *rounds, "", END]
    return "\n".join(lines)


def write_doc(results):
    write_section(section(results), BEGIN, END, "train")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        system, case, mode = sys.argv[2:5]
        res = prepare(case) if system == "prepare" else torch_worker(system, case, mode)
        print("RESULT " + json.dumps(res), flush=True)
        return
    out = OUT / "train.json"
    if "--doc-only" in sys.argv:
        write_doc(json.loads(out.read_text()))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    results = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": loadavg(), "versions": versions(),
               "settings": {"threads": THREADS, "rounds": ROUNDS, "dtype": "f32", "check_steps": CHECK_STEPS,
                            "tolerance": TOLERANCE, "seed": SEED},
               "cases": {}}
    only = [a for a in sys.argv[1:] if a in CASES]
    if only and out.exists():  # rerunning some cases keeps the others' last results
        results["cases"] = json.loads(out.read_text())["cases"]
    for case in only or CASES:
        print(f"== {case}", flush=True)
        results["cases"][case] = run_case(case)
        results["cases"][case]["measured"] = f"{started.strftime('%Y-%m-%d %H:%M UTC')}, load average {' '.join(results['loadavg_start'])}"
        r = results["cases"][case]
        if r.get("status") != "ok":
            print(f"  {r.get('status')}: {str(r.get('error', ''))[-600:]}", flush=True)
    results["loadavg_end"] = loadavg()
    results["wall_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {os.path.relpath(out, REPO)}")
    if os.environ.get("BENCH_REPORT", "1") != "0":
        write_doc(results)


if __name__ == "__main__":
    main()
