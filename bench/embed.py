#!/usr/bin/env python3
"""The embedding workload (bench/run, inside bench/.venv): all-MiniLM-L6-v2 embeds the 512
sentences of bench/embed_corpus.txt (half short queries, half passages, at most 256 tokens), each
system run the way its users run it, and writes bench/out/embed.json and the section of
docs/benchmarks.md between the `embed` markers.

Two modes, each a loop over all 512 sentences that returns unit-length embeddings in input order:

* online: one sentence at a time (batch 1, no padding): tokenize it, run it, pool it;
* offline: batches of 32, sentence-transformers' way: sorted by length, each batch padded to
  its own longest sentence, results put back in input order.

Systems: PyTorch eager (transformers' BertModel, the loop sentence-transformers' `encode` runs),
ONNX Runtime and OpenVINO on one ONNX export with dynamic batch and sequence axes, the same loop;
Kiln through `examples/sentence_embeddings.rs` (its `embed` path: token-sorted batches, each
sentence alone online, each batch padded to its longest sentence offline, through the one
artifact compiled for every batch and length; compile and load are outside the timed loop and
reported apart), and, as `kiln-per-shape`, with one artifact compiled per (batch, padded
length) (`--per-shape`, lengths padded to a multiple of 8 in both modes, which keeps the
artifacts to 26 here). Every loop
includes tokenization (the same tokenizer.json through the `tokenizers` library everywhere,
TOKENIZERS_PARALLELISM=false) and pooling. All run on THREADS threads, each system in its own
process; every system's embeddings are checked against PyTorch's, one sentence at a time and
unpadded (min cosine ≥ MIN_COSINE), before its loops are timed.

    bench/.venv/bin/python bench/embed.py            # everything, then the doc section
    bench/.venv/bin/python bench/embed.py --no-doc   # embed.json only
    bench/.venv/bin/python bench/embed.py --doc-only # the doc section again from embed.json
    bench/.venv/bin/python bench/embed.py worker SYSTEM MODE   # one system (prints RESULT {json})

Environment: BENCH_EMBED_REPEATS (timed loops per run, 3), BENCH_EMBED_ROUNDS (rounds, each
system's order reversed every other one, the best median kept; 2), KILN_EMBED_BIN (the example
binary; default target/release/examples/sentence_embeddings).
"""

import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CACHE, OUT, REPO, THREADS, Contention, bert_model, emit, write_section  # noqa: E402

CORPUS = Path(__file__).resolve().with_name("embed_corpus.txt")
MAX_TOKENS = 256
MODES = {"online": 1, "offline": 32}
PEERS = ["torch", "onnxruntime", "openvino"]
# Kiln through one artifact for every size (its default), and with an artifact per shape.
KILNS = ["kiln", "kiln-per-shape"]
SYSTEMS = PEERS + KILNS
NAMES = {"torch": "PyTorch eager", "onnxruntime": "ONNX Runtime", "openvino": "OpenVINO", "kiln": "**Kiln**",
         "kiln-per-shape": "Kiln, an artifact per shape"}
MIN_COSINE = 0.9999
REPEATS = int(os.environ.get("BENCH_EMBED_REPEATS", "3"))
ROUNDS = int(os.environ.get("BENCH_EMBED_ROUNDS", "2"))
OPSET = 18
ONNX = OUT / "minilm_dynamic.onnx"
REFERENCE = OUT / "embed_reference.npy"
RESULTS = OUT / "embed.json"
BEGIN, END = "<!-- embed:begin (written by bench/embed.py) -->", "<!-- embed:end -->"
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def loadavg():
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def sentences():
    return [line for line in CORPUS.read_text().splitlines() if line]


def tokenizer():
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(CACHE / "tokenizer.json"))
    t.enable_truncation(MAX_TOKENS)
    t.no_padding()
    return t


# --- the users' loop (sentence-transformers' encode) --------------------------------------------


def pool(hidden, mask):
    """Mean over the tokens the mask keeps, then unit length (all-MiniLM-L6-v2's pooling)."""
    import numpy as np

    m = mask[..., None].astype(np.float32)
    mean = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def arrays(encodings):
    """input_ids, token_type_ids, attention_mask as int64 [batch, longest], padded with 0 ([PAD])."""
    import numpy as np

    longest = max(len(e.ids) for e in encodings)
    ids = np.zeros((len(encodings), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for r, e in enumerate(encodings):
        ids[r, : len(e.ids)] = e.ids
        mask[r, : len(e.ids)] = 1
    return ids, np.zeros_like(ids), mask


def embed_loop(run, tok, texts, batch):
    """Embeddings of `texts` in input order. Batch 1: each sentence alone, unpadded. Otherwise
    sentence-transformers' encode: sorted by text length, longest first, batches of `batch`
    padded to their longest, the order restored."""
    import numpy as np

    out = np.empty((len(texts), 384), dtype=np.float32)
    if batch == 1:
        for i, s in enumerate(texts):
            ids, types, mask = arrays([tok.encode(s)])
            out[i] = pool(run(ids, types, mask), mask)[0]
        return out
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        ids, types, mask = arrays(tok.encode_batch([texts[i] for i in idx]))
        out[idx] = pool(run(ids, types, mask), mask)
    return out


def padded_tokens(tok, texts, batch):
    """Tokens `embed_loop` runs, padding included (batch × longest, summed over its batches)."""
    lengths = [len(e.ids) for e in tok.encode_batch(texts)]
    if batch == 1:
        return sum(lengths)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    chunks = [order[i : i + batch] for i in range(0, len(order), batch)]
    return sum(len(c) * max(lengths[i] for i in c) for c in chunks)


def cosine_check(got):
    import numpy as np

    ref = np.load(REFERENCE)
    cos = (got.astype(np.float64) * ref).sum(axis=1) / (
        np.linalg.norm(got.astype(np.float64), axis=1) * np.linalg.norm(ref, axis=1)
    )
    worst = int(np.argmin(cos))
    return {"min_cosine": float(cos[worst]), "worst_sentence": worst, "threshold": MIN_COSINE,
            "ok": bool(cos[worst] >= MIN_COSINE)}


def timed_loops(loop):
    """One warm-up loop, then REPEATS timed ones, each with the CPU other processes used."""
    loop()
    times, others = [], []
    for _ in range(REPEATS):
        with Contention() as c:
            t = time.perf_counter()
            loop()
            times.append(time.perf_counter() - t)
        others.append(round(c.others_cores, 3))
    return {"loops_s": times, "median_s": statistics.median(times), "min_s": min(times), "others_cores": others}


# --- workers --------------------------------------------------------------------------------------


def torch_setup():
    import torch

    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


def prepare():
    """The reference (PyTorch eager, each sentence alone and unpadded) and the dynamic ONNX export."""
    import numpy as np

    torch = torch_setup()
    OUT.mkdir(parents=True, exist_ok=True)
    p = subprocess.run([sys.executable, str(REPO / "bench" / "embed_corpus.py"), "--check"], capture_output=True, text=True)
    if p.returncode != 0:
        return {"status": "corpus out of date", "error": (p.stderr or p.stdout)[-2000:]}
    model, tok, texts = bert_model(), tokenizer(), sentences()

    def run(ids, types, mask):
        with torch.inference_mode():
            return model(torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask)).numpy()

    lengths = [len(tok.encode(s).ids) for s in texts]
    np.save(REFERENCE, embed_loop(run, tok, texts, 1).astype(np.float64))
    ids, types, mask = arrays(tok.encode_batch(texts[:2]))
    t = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(a) for a in (ids, types, mask)),
            str(ONNX),
            input_names=list(INPUTS),
            output_names=["last_hidden_state"],
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            dynamic_shapes={k: {0: "batch", 1: "seq"} for k in INPUTS},
        )
    return {
        "status": "ok",
        "onnx_export_s": time.perf_counter() - t,
        "sentences": len(texts),
        "tokens": {"total": sum(lengths), "min": min(lengths), "max": max(lengths),
                   "median": statistics.median(lengths), "distinct": len(set(lengths))},
        "short_half_max_tokens": sorted(lengths)[len(lengths) // 2 - 1],
    }


def peer(system, mode):
    """PyTorch, ONNX Runtime or OpenVINO in the users' loop."""
    batch, tok, texts = MODES[mode], tokenizer(), sentences()
    res = {}
    if system == "torch":
        torch = torch_setup()
        model = bert_model()

        def run(ids, types, mask):
            with torch.inference_mode():
                return model(torch.from_numpy(ids), torch.from_numpy(types), torch.from_numpy(mask)).numpy()

        res["setup"] = "none"
    elif system == "onnxruntime":
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        t = time.perf_counter()
        sess = ort.InferenceSession(str(ONNX), so, providers=["CPUExecutionProvider"])
        res["setup_s"] = time.perf_counter() - t
        res["setup"] = f"{res['setup_s']:.2f} s session"
        res["input_shapes"] = {i.name: list(i.shape) for i in sess.get_inputs()}

        def run(ids, types, mask):
            return sess.run(None, {"input_ids": ids, "token_type_ids": types, "attention_mask": mask})[0]

    elif system == "openvino":
        import openvino as ov

        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        t = time.perf_counter()
        compiled = core.compile_model(core.read_model(str(ONNX)), "CPU", config)
        res["setup_s"] = time.perf_counter() - t
        res["setup"] = f"{res['setup_s']:.2f} s read + compile_model"
        res["input_shapes"] = {p.get_any_name(): str(p.get_partial_shape()) for p in compiled.inputs}
        req, out = compiled.create_infer_request(), compiled.output(0)

        def run(ids, types, mask):
            return req.infer({"input_ids": ids, "token_type_ids": types, "attention_mask": mask})[out]

    else:
        raise ValueError(f"unknown system {system}")

    def loop():
        return embed_loop(run, tok, texts, batch)

    res["padded_tokens"] = padded_tokens(tok, texts, batch)

    res["check"] = cosine_check(loop())
    if not res["check"]["ok"]:
        return {**res, "status": "wrong output"}
    return {**res, "status": "ok", "timing": timed_loops(loop)}


def kiln_bin():
    return os.environ.get("KILN_EMBED_BIN") or str(REPO / "target" / "release" / "examples" / "sentence_embeddings")


def kiln(system, mode):
    """examples/sentence_embeddings.rs's `embed`: its first pass compiles (or loads from the
    cache) what the plan needs; the REPEATS loops after it are timed by the example. `kiln` runs
    its defaults (one artifact; batches padded to their longest sentence);
    `kiln-per-shape` rounds lengths up to a multiple of 8 at batch 1 too (an artifact per exact
    length would be 137 of them here; rounded, 26)."""
    import numpy as np

    batch = MODES[mode]
    cmd = [kiln_bin(), "--json", "--seq", str(MAX_TOKENS), "--batch", str(batch),
           "--threads", str(THREADS), "--repeats", str(REPEATS)]
    if system == "kiln-per-shape":
        cmd += ["--per-shape", "--multiple-of", "8"]
    t = time.perf_counter()
    with Contention(children=True) as c:
        p = subprocess.run(cmd, input=CORPUS.read_text(), capture_output=True, text=True)
    wall = time.perf_counter() - t
    res = {"command": " ".join([os.path.relpath(cmd[0], REPO), *cmd[1:]]) + " < bench/embed_corpus.txt",
           "process_wall_s": wall, "stderr_tail": p.stderr.strip().splitlines()[-3:]}
    if p.returncode != 0:
        return {**res, "status": "failed", "error": (p.stderr or p.stdout)[-4000:]}
    out = json.loads(p.stdout)
    timing = out["timing"]
    res["check"] = cosine_check(np.asarray(out["embeddings"], dtype=np.float32))
    res["shapes"] = len(timing["shapes"])
    res["padded_tokens"] = timing.get("padded_tokens")
    res["setup_s"] = timing["prepare_s"]
    artifacts = len(timing.get("artifacts", timing["shapes"]))
    res["setup"] = (f"{timing['prepare_s']:.1f} s for {artifacts} artifact(s) ({timing['compiled']} compiled, "
                    f"{timing['loaded']} from the cache), {len(timing['shapes'])} shapes")
    if not res["check"]["ok"]:
        return {**res, "status": "wrong output"}
    loops = timing["loops_s"]
    res["timing"] = {"loops_s": loops, "median_s": statistics.median(loops), "min_s": min(loops),
                     "others_cores": [round(c.others_cores, 3)], "threads_reported": timing["threads"]}
    return {**res, "status": "ok"}


def worker(system, mode):
    res = {"system": system, "mode": mode, "loadavg_before": loadavg()}
    try:
        res.update(prepare() if system == "prepare" else kiln(system, mode) if system.startswith("kiln")
                   else peer(system, mode))
    except Exception as e:  # noqa: BLE001
        res.update(status="error", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
    res["loadavg_after"] = loadavg()
    emit(res)


# --- the orchestrator -----------------------------------------------------------------------------


def spawn(system, mode):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    p = subprocess.run([sys.executable, __file__, "worker", system, mode], capture_output=True, text=True, env=env)
    line = next((l for l in reversed(p.stdout.splitlines()) if l.startswith("RESULT ")), None)
    if line is None:
        return {"system": system, "mode": mode, "status": "crashed", "error": (p.stderr or p.stdout)[-4000:]}
    return json.loads(line[len("RESULT "):])


def summary(r):
    s = f"{r['system']:12s} {r['mode']:8s} {r['status']:12s}"
    if r.get("timing"):
        s += f" median {r['timing']['median_s']:7.2f} s  min {r['timing']['min_s']:7.2f} s"
    if r.get("check"):
        s += f"  min cos {r['check']['min_cosine']:.6f}"
    if r.get("setup"):
        s += f"  set-up {r['setup']}"
    if r["status"] != "ok" and r.get("error"):
        s += "\n    " + str(r["error"]).strip().splitlines()[-1][:300]
    return s


def main():
    from minilm import machine, versions

    started = datetime.datetime.now(datetime.timezone.utc)
    res = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "loadavg_start": loadavg(), "machine": machine(),
           "versions": versions(), "settings": {"threads": THREADS, "repeats": REPEATS, "rounds": ROUNDS,
                                                "max_tokens": MAX_TOKENS, "min_cosine": MIN_COSINE, "modes": MODES},
           "modes": {}}
    prep = spawn("prepare", "-")
    print(summary(prep), flush=True)
    res["prepare"] = prep
    if prep["status"] == "ok":
        for mode in MODES:
            systems = SYSTEMS
            runs = {s: [] for s in systems}
            for rnd in range(ROUNDS):
                for system in systems if rnd % 2 == 0 else systems[::-1]:
                    r = spawn(system, mode)
                    r["round"] = rnd + 1
                    print(f"[round {rnd + 1}] {summary(r)}", flush=True)
                    runs[system].append(r)
            kept = {}
            for system, rs in runs.items():
                ok = [r for r in rs if r["status"] == "ok"]
                best = dict(min(ok, key=lambda r: r["timing"]["median_s"]) if ok else rs[-1])
                best["round_medians_s"] = [r.get("timing", {}).get("median_s") for r in rs]
                kept[system] = best
            res["modes"][mode] = kept
    res["loadavg_end"] = loadavg()
    res["wall_s"] = round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if "--no-doc" not in sys.argv:
        write_doc(res)


# --- the doc section ------------------------------------------------------------------------------


def section(res):
    prep = res.get("prepare", {})
    tokens = prep.get("tokens", {})
    m = res["machine"]
    lines = [
        BEGIN,
        f"Generated by `bench/embed.py` (`bench/run`) on {res['date']} in {res['wall_s'] / 60:.0f} min; rerun it to "
        "refresh (raw numbers: `bench/out/embed.json`). Do not edit between the markers.",
        "",
        f"**Machine:** {m['cpu_model']}, {m['cores']} cores, {THREADS} threads for every system. "
        f"**Load average** (1/5/15 min) at the start {' / '.join(f'{x:.2f}' for x in res['loadavg_start'])}, "
        f"at the end {' / '.join(f'{x:.2f}' for x in res['loadavg_end'])}: the machine was shared, so the times "
        "are this run's, to be compared within a table only.",
        "",
        f"**Workload:** the {prep.get('sentences', '?')} sentences of `bench/embed_corpus.txt` "
        f"({tokens.get('total', '?')} tokens, {tokens.get('min', '?')}–{tokens.get('max', '?')} per sentence, "
        f"median {tokens.get('median', '?')}). Each time is one loop over all of them: tokenize, run, mean-pool, "
        f"normalize, input order; the median of {res['settings']['repeats']} loops after a warm-up, the best of "
        f"{res['settings']['rounds']} round(s). Every system's embeddings matched PyTorch's (each sentence alone, "
        f"unpadded) to a cosine ≥ {MIN_COSINE} before it was timed.",
        "",
    ]
    for mode, batch in MODES.items():
        kept = res["modes"].get(mode)
        if not kept:
            continue
        peers = [(r["timing"]["median_s"], s) for s, r in kept.items() if s in PEERS and r["status"] == "ok"]
        best = min(peers)[0] if peers else None
        what = "one sentence at a time (batch 1)" if batch == 1 else f"batches of {batch}, sorted by length"
        lines += [f"#### {mode}: {what}", "",
                  "| system | median s | min s | sentences/s | vs best peer | medians per round | tokens run "
                  "(padding included) | set-up | 1 − min cosine | others' CPU |",
                  "|---|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        for s in SYSTEMS:
            r = kept.get(s, {})
            t = r.get("timing")
            if r.get("status") != "ok" or not t:
                lines.append(f"| {NAMES[s]} | {r.get('status', 'missing')} | | | | | | | | |")
                continue
            ratio = f"{t['median_s'] / best:.2f}×" if best else "–"
            rounds = " / ".join("–" if x is None else f"{x:.2f}" for x in r.get("round_medians_s", []))
            lines.append(
                f"| {NAMES[s]} | {t['median_s']:.2f} | {t['min_s']:.2f} | {prep.get('sentences', 512) / t['median_s']:.0f} "
                f"| {ratio} | {rounds} | {r.get('padded_tokens') or '–'} | {r.get('setup', '')} "
                f"| {1 - r['check']['min_cosine']:.1e} | {max(t.get('others_cores') or [0]):.2f} |"
            )
        lines.append("")
        # Sizes set at run time against artifacts compiled per shape: the same shapes offline.
        dynamic, static = kept.get("kiln", {}), kept.get("kiln-per-shape", {})
        if mode == "offline" and dynamic.get("status") == "ok" and static.get("status") == "ok":
            ratio = dynamic["timing"]["median_s"] / static["timing"]["median_s"]
            lines += [f"One artifact for every size ÷ one artifact per shape, the same batches of sentences (padded to "
                      f"their longest sentence, and to a multiple of 8 per shape): **{ratio:.3f}×** "
                      "(`bench/dynamic.py` compares the two at the same shapes).", ""]
    lines.append(END)
    return "\n".join(lines)


def write_doc(res):
    write_section(section(res), BEGIN, END, "embed")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "worker":
        worker(sys.argv[2], sys.argv[3])
    elif "--doc-only" in sys.argv:
        write_doc(json.loads(RESULTS.read_text()))
    else:
        main()
