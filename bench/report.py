#!/usr/bin/env python3
"""Turns bench/out/results.json into the section of docs/benchmarks.md between
`<!-- peers:begin … -->` and `<!-- peers:end -->` and the chart docs/benchmarks-minilm.png.
Everything outside the markers is left as it is. Called by bench/run; can be rerun alone:
`bench/.venv/bin/python bench/report.py`.

To look at a report without touching docs/: `--doc /tmp/b/benchmarks.md` writes there (starting
from that file if it exists, else from a copy of docs/benchmarks.md) and puts the chart beside
it; `--micro bench/out/micro.json` takes the kernel micro-benchmarks from that file instead of
the copy results.json holds, for after rerunning `bench/micro.py` alone.
"""

import argparse
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import OUT, REPO  # noqa: E402

DOC = REPO / "docs" / "benchmarks.md"
PNG = REPO / "docs" / "benchmarks-minilm.png"
BEGIN = re.compile(r"<!-- peers:begin[^>]*-->")
END = "<!-- peers:end -->"

NAMES = {
    "torch_eager": "PyTorch eager",
    "torch_compile": "torch.compile (inductor)",
    "onnxruntime": "ONNX Runtime",
    "openvino": "OpenVINO",
    "iree": "IREE (llvm-cpu)",
    "kiln": "**Kiln**",
}


def ms(x):
    return "–" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")


def best_peer(case):
    peers = [
        (r["latency"]["median_ms"], s)
        for s, r in case["systems"].items()
        if s != "kiln" and r.get("status") == "ok" and r.get("latency", {}).get("median_ms") is not None
    ]
    return min(peers) if peers else (None, None)


def setup_text(system, r):
    if system == "iree" and "import_s" in r:
        return f"{r['import_s']:.1f} s import + {r.get('compile_s', 0):.1f} s iree-compile" if "compile_s" in r else f"{r['import_s']:.1f} s import"
    if system == "openvino" and "compile_s" in r:
        return f"{r['read_model_s']:.2f} s read + {r['compile_s']:.2f} s compile_model"
    if system == "onnxruntime" and "compile_s" in r:
        return f"{r['compile_s']:.2f} s session"
    if system == "torch_compile" and "compile_s" in r:
        return f"{r['compile_s']:.1f} s first call"
    if system == "kiln" and "compile_s" in r:
        return f"{r['compile_s']:.1f} s `kiln compile`"
    if system == "torch_eager":
        return "none"
    return "–"


def rounds_text(r):
    return " / ".join(ms(x.get("median_ms")) for x in r.get("rounds", [])) or "–"


def case_table(name, case):
    best, best_sys = best_peer(case)
    lines = [
        "| system | median ms | min ms | max ms | vs best peer | median per round | compile / set-up | max \\|Δ\\| vs eager | others' CPU |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for system, r in case["systems"].items():
        lat = r.get("latency") or {}
        med = lat.get("median_ms")
        if r.get("status") != "ok":
            status = r.get("status", "?")
            chk = r.get("check")
            delta = f"{chk['max_abs_diff']:.1e} ✗" if chk else "–"
            lines.append(f"| {NAMES[system]} | {status} | | | | | {setup_text(system, r)} | {delta} | |")
            continue
        ratio = "–" if best is None or med is None else f"{med / best:.2f}×"
        if system == best_sys:
            ratio = "1.00× (best peer)"
        lines.append(
            f"| {NAMES[system]} | {ms(med)} | {ms(lat.get('min_ms'))} | {ms(lat.get('max_ms'))} | {ratio} "
            f"| {rounds_text(r)} | {setup_text(system, r)} | {r['check']['max_abs_diff']:.1e} | {lat.get('others_cores', 0):.2f} |"
        )
    return "\n".join(lines)


def failures(results):
    out = []
    for cname, case in results["cases"].items():
        for system, r in case["systems"].items():
            if r.get("status") != "ok":
                err = str(r.get("error", "")).strip().splitlines()
                out.append(f"- {NAMES[system]} at {cname}: {r.get('status')}: `{err[-1][:300] if err else '?'}`")
        if case["prepare"].get("status") != "ok":
            out.append(f"- preparing {cname} failed: `{str(case['prepare'].get('error'))[:300]}`")
    return out


def chart(results, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = list(NAMES)
    cases = list(results["cases"])
    fig, axes = plt.subplots(1, len(cases), figsize=(5.2 * len(cases), 3.6))
    if len(cases) == 1:
        axes = [axes]
    for ax, cname in zip(axes, cases):
        case = results["cases"][cname]
        labels, vals, errs, colors = [], [], [[], []], []
        for s in systems:
            r = case["systems"].get(s, {})
            lat = r.get("latency") or {}
            if r.get("status") != "ok" or lat.get("median_ms") is None:
                continue
            labels.append(NAMES[s].replace("**", "").replace(" (inductor)", "\n(inductor)").replace(" (llvm-cpu)", ""))
            vals.append(lat["median_ms"])
            errs[0].append(lat["median_ms"] - lat["min_ms"])
            errs[1].append((lat["max_ms"] - lat["median_ms"]) if lat.get("max_ms") is not None else 0)
            colors.append("#d62728" if s == "kiln" else "#7f7f7f")
        bars = ax.bar(range(len(vals)), vals, color=colors, yerr=errs, capsize=3, ecolor="#333333")
        for b, v, up in zip(bars, vals, errs[1]):
            ax.text(b.get_x() + b.get_width() / 2, v + up, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
        ax.margins(y=0.12)
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("median latency, ms (bars: min–max)")
        ax.set_title(f"MiniLM-L6, batch {case['batch']} × seq {case['seq']}, f32, 2 threads", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, "Kiln: bar from min to median only (kiln run prints no max)", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png, dpi=110)
    plt.close(fig)


def layer_norm_table(ln):
    """Kiln's `layer_norm` kernel next to each peer: time, GB/s and Kiln's GB/s over the peer's
    (above 1: Kiln is faster), as the sgemm table's Kiln / numpy."""
    rows, cols = ln["shape"]
    kiln_ms = ln.get("kiln_ms")
    eps = f"{ln['eps']:.0e}".replace("e-0", "e-")
    lines = [
        f"| LayerNorm {rows}×{cols} f32, affine, eps {eps} | median ms | min ms | max ms | GB/s | Kiln / peer (GB/s) | max \\|Δ\\| vs numpy |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| **Kiln** `layer_norm` (fused bench) | {ms(kiln_ms)} | – | – | {gbs(ln.get('kiln_gb_s'))} | – | – |",
    ]
    for key, r in ln.get("peers", {}).items():
        name = r.get("system", key)
        delta = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "–"
        lat = r.get("latency") or {}
        if r.get("status") != "ok" or lat.get("median_ms") is None:
            lines.append(f"| {name} | {r.get('status', '?')} | | | | | {delta}{' ✗' if r.get('status') == 'wrong output' else ''} |")
            continue
        ratio = "–" if kiln_ms is None else f"{lat['median_ms'] / kiln_ms:.2f}×"
        lines.append(
            f"| {name} | {ms(lat['median_ms'])} | {ms(lat.get('min_ms'))} | {ms(lat.get('max_ms'))} "
            f"| {gbs(lat.get('gb_s'))} | {ratio} | {delta} |"
        )
    return lines


def gbs(x):
    return "–" if x is None else f"{x:.1f}"


def micro_section(micro):
    lines = ["### Kernels alone (2 threads)", ""]
    if micro.get("sgemm"):
        lines += ["| sgemm f32 | Kiln GFLOP/s median (best) | numpy (OpenBLAS) GFLOP/s | Kiln / numpy |", "|---|---:|---:|---:|"]
        for row in micro["sgemm"]:
            lines.append(f"| {row['shape']} | {row['kiln']} | {row['numpy']} | {row['ratio']} |")
        lines.append("")
    if micro.get("attention"):
        lines += [
            "| attention 12 heads × 64, f32 | Kiln fused ms | torch SDPA ms | ORT MultiHeadAttention ms | Kiln / ORT "
            "| medians per round (Kiln; SDPA; ORT) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for row in micro["attention"]:
            kiln, ort = row.get("kiln_ms"), row.get("ort_mha_ms")
            ratio = f"{kiln / ort:.2f}×" if kiln and ort else "–"
            per = row.get("rounds") or {}
            rounds = "; ".join(
                " / ".join(ms(x) for x in per.get(key, [])) or "–" for key in ("kiln_ms", "torch_sdpa_ms", "ort_mha_ms")
            )
            lines.append(
                f"| seq {row['seq']} | {ms(kiln)} | {ms(row.get('torch_sdpa_ms'))} | {ms(ort)} | {ratio} | {rounds} |"
            )
        lines.append("")
    if micro.get("layer_norm"):
        lines += layer_norm_table(micro["layer_norm"]) + [""]
    for note in micro.get("notes", []):
        lines.append(f"- {note}")
    return lines


def spread_text(results):
    """The largest round-to-round change of one system's median in this run."""
    worst = None
    for cname, case in results["cases"].items():
        for system, r in case["systems"].items():
            meds = [x["median_ms"] for x in r.get("rounds", []) if x.get("median_ms")]
            if len(meds) > 1:
                d = max(meds) / min(meds) - 1
                if worst is None or d > worst[0]:
                    worst = (d, system, cname)
    if worst is None:
        return ""
    return (f"; the largest change between rounds was {worst[0] * 100:.0f} % ({NAMES[worst[1]].strip('*')} at "
            f"{worst[2]}), so differences smaller than that are within this machine's noise")


def section(results):
    m, v, st = results["machine"], results["versions"], results["settings"]
    la0, la1 = " / ".join(results["loadavg_start"]), " / ".join(results["loadavg_end"])
    k = v["kiln"]
    lines = [
        f"Generated by `bench/run` on {results['date']} (the model comparison took {results['wall_s'] / 60:.0f} min); rerun it to refresh "
        "(raw numbers: `bench/out/results.json`). Do not edit between the markers.",
        "",
        f"**Machine:** {m['cpu_model']} (LLVM CPU `{m.get('llvm_cpu') or '?'}`), {m['cores']} cores, "
        f"{m['memory_gib']} GiB, {'+'.join(x.upper() for x in m['simd'])}, Linux {m['kernel']}. "
        f"Load average (1/5/15 min) at the start {la0}, at the end {la1}. Other builds may share the machine: "
        "each system was timed after a quiet second and timed again (up to 3 tries, the least disturbed "
        "kept) when other processes used more than 0.3 cores meanwhile; the last column is what they used. "
        f"The whole comparison ran {st.get('rounds', 1)} times (order reversed every other round); each system's "
        "table row is its round with the lowest median, every round's median is shown next to it"
        f"{spread_text(results)}.",
        "",
        f"**Method:** {st['dtype']}, {st['threads']} threads for every system (torch `set_num_threads(2)`; "
        "ORT intra-op 2, inter-op 1; OpenVINO `INFERENCE_NUM_THREADS=2`, hint LATENCY; IREE "
        "`--task_topology_max_group_count=2`; Kiln `--threads 2`), each system in its own process, "
        f"{st['warmup']} warm-up runs, then median, min and max of {st['repeats']} runs (Kiln: median and min "
        f"printed by `kiln run --repeats {st['repeats'] + st['warmup']}`, which prints no max). Inputs: token ids "
        "from a fixed seed, [CLS] … [SEP] then padding, the same `bench/out/inputs_b*.safetensors` for every "
        "system. Model: all-MiniLM-L6-v2 as transformers' `BertModel` (SDPA attention) from the cached "
        "`config.json` + `model.safetensors`; ONNX exported from it with `torch.onnx.export` (dynamo, "
        "opset 18, static shapes); OpenVINO and IREE (`iree-import-onnx`, `iree-compile "
        "--iree-hal-local-target-device-backends=llvm-cpu --iree-llvmcpu-target-cpu=host`) start from "
        "that ONNX file. Every output was checked against PyTorch eager (max |Δ| on `last_hidden_state` "
        f"≤ {st['tolerance']:g}) before it was timed.",
        "",
        f"**Versions:** torch {v['torch']}, transformers {v['transformers']}, onnx {v['onnx']}, "
        f"onnxscript {v['onnxscript']}, onnxruntime {v['onnxruntime']}, openvino {v['openvino']}, "
        f"iree-base-compiler {v['iree-base-compiler']} / runtime {v['iree-base-runtime']}, numpy {v['numpy']}; "
        f"Kiln {k['commit']}{' + local changes' if k['work_tree_modified'] else ''} ({k['rustc']}, LLVM {k['llvm']}).",
        "",
        "![median latency per system, MiniLM-L6 at batch 1 and 8](benchmarks-minilm.png)",
        "",
    ]
    for cname, case in results["cases"].items():
        lines += [f"### MiniLM-L6 encoder, batch {case['batch']} × seq {case['seq']}", ""]
        if case["prepare"].get("status") != "ok":
            lines += [f"Not run: preparing the inputs failed (`{case['prepare'].get('error')}`).", ""]
            continue
        lines += [case_table(cname, case), ""]
    prof = [(c, r["systems"]["kiln"]) for c, r in results["cases"].items() if r["systems"].get("kiln", {}).get("profile")]
    if prof:
        lines += ["### Where Kiln's time goes (`kiln run --profile`, 2 threads)", "", "```"]
        for cname, r in prof:
            p = r["profile"]
            lines += [p[0]] + p[1:7] + [l for l in p if l.startswith("total")]
        lines += ["```", ""]
        kinds = sorted({k for _, r in prof for k in r.get("profile_by_kind", {})},
                       key=lambda k: -max(r.get("profile_by_kind", {}).get(k, {}).get("time_ms", 0) for _, r in prof))
        if kinds:
            head = " | ".join(f"{c} ms (share, GFLOP/s)" for c, _ in prof)
            lines += [f"| kernel kind (all steps) | steps | {head} |", "|---|---:|" + "---:|" * len(prof)]
            for k in kinds:
                cells = []
                for _, r in prof:
                    d = r.get("profile_by_kind", {}).get(k)
                    cells.append(f"{ms(d['time_ms'])} ({d['share_pct']:.1f} %, {d['gflop_s']:.0f})" if d else "–")
                steps = next(r["profile_by_kind"][k]["steps"] for _, r in prof if k in r.get("profile_by_kind", {}))
                lines.append(f"| {k} | {steps} | " + " | ".join(cells) + " |")
            lines.append("")
    if results.get("micro"):
        lines += micro_section(results["micro"])
        lines.append("")
    fail = failures(results)
    if fail:
        lines += ["**Failures:**", ""] + fail + [""]
    return "\n".join(lines).rstrip() + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--doc", type=Path, default=DOC, help="the markdown file to write (default: docs/benchmarks.md)")
    ap.add_argument("--micro", type=Path, help="micro-benchmarks from this micro.json instead of results.json's copy")
    args = ap.parse_args()
    results = json.loads((OUT / "results.json").read_text())
    if args.micro:
        results["micro"] = json.loads(args.micro.read_text())
    doc = args.doc.resolve()
    png = doc.parent / PNG.name
    text = (doc if doc.exists() else DOC).read_text()
    m = BEGIN.search(text)
    end = text.find(END, m.end() if m else 0)
    if not m or end < 0:
        raise SystemExit(f"{doc}: markers `<!-- peers:begin … -->` / `{END}` not found")
    doc.parent.mkdir(parents=True, exist_ok=True)
    chart(results, png)
    new = text[: m.end()] + "\n" + section(results) + text[end:]
    doc.write_text(new)
    print(f"wrote {shown(doc)} (between the markers) and {shown(png)}")


def shown(path):
    """`path` relative to the repository when it is inside it."""
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


if __name__ == "__main__":
    main()
