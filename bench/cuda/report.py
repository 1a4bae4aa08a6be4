#!/usr/bin/env python3
"""Joins the CUDA check's results into one Markdown table (scripts/gpu_check.sh calls it):
Kiln's times from check_pack's JSON lines, PyTorch's from peers.py's JSON, and the goals of the
CUDA target (matmul ≥ 0.8× cuBLAS in the same precision, attention ≥ 1.0× SDPA, MiniLM b64 ≤ 0.9×
torch.compile; a ratio is Kiln's speed over the peer's, above 1 is faster).

PyTorch's times are of tensors that stay on the GPU, so the ratio uses Kiln's GPU time: the sum
of its kernels' times (CUDA events of a profiled run). Kiln's end-to-end time of a run (inputs
copied from host memory, outputs copied back) is shown beside it; for the 4096² matrices the
copies (3 × 64 MiB through pageable memory) take most of it.

A second table takes each goal in turn: whether it holds with Kiln's default plan, and which
of the benchmarked variants that keep the goal's precision is fastest (what the default should
become where it is faster).

Usage: report.py KILN_BENCH.jsonl TORCH.json [CONFORMANCE.jsonl…]
       report.py --names    (every benchmark it reads, one per line)
"""

import json
import sys

from peers import MINILM_B64_PRODUCTS, MINILM_LAYERS, product_key


def cell(ms):
    """A time in ms, or a dash where there is none."""
    return "–" if ms is None else f"{ms:.3f}"


def speed(r):
    """A speed ratio (above 1 is faster), or a dash where there is none."""
    return "–" if r is None else f"{r:.2f}×"


def ratio(kiln_ms, peer_ms):
    """Kiln's speed over the peer's, shown."""
    return speed(None if kiln_ms is None or peer_ms is None else peer_ms / kiln_ms)


# The first table's rows: label, benchmark, peer, the peer's key in TORCH.json, goal.
ROWS = [
    ("matmul 4096³ f32", "matmul", "torch.matmul, TF32 off (cuBLAS f32)", "matmul_f32_ms", "≥ 0.8×"),
    ("matmul 4096³ f32, tiles through registers", "matmul_registers", "torch.matmul, TF32 off (cuBLAS f32)", "matmul_f32_ms", ""),
    ("matmul 4096³ TF32", "matmul_tf32", "torch.matmul, TF32 on", "matmul_tf32_ms", ""),
    ("attention 4×12×2048×64 f32", "attention", "SDPA f32", "attention_f32_ms", "≥ 1.0×"),
    ("attention 4×12×2048×64 f32", "attention", "SDPA bf16 flash", "attention_bf16_flash_ms", ""),
    ("attention 4×12×2048×64 f32, one query per invocation", "attention_per_query", "SDPA f32", "attention_f32_ms", ""),
    ("attention 4×12×2048×64 TF32", "attention_tf32", "SDPA f32", "attention_f32_ms", ""),
    ("attention 4×12×2048×64 TF32", "attention_tf32", "SDPA bf16 flash", "attention_bf16_flash_ms", ""),
    ("MiniLM-L6 b64×128 TF32", "minilm_b64_tf32", "BertModel torch.compile (f32)", "bert_b64_compile_ms", ""),
    ("matmul 4096³ TF32×3", "matmul_tf32x3", "torch.matmul, TF32 off (cuBLAS f32)", "matmul_f32_ms", ""),
    ("attention 4×12×2048×64 TF32×3", "attention_tf32x3", "SDPA f32", "attention_f32_ms", ""),
    ("attention 4×12×2048×64 TF32, warpgroup products (sm_90a)", "attention_wgmma_tf32", "SDPA f32", "attention_f32_ms", ""),
    ("attention 4×12×2048×64 TF32×3, warpgroup products (sm_90a)", "attention_wgmma_tf32x3", "SDPA f32", "attention_f32_ms", ""),
    ("attention 4×12×2048×64 TF32×3, warpgroup products, each step awaited", "attention_wgmma_awaited_tf32x3", "SDPA f32", "attention_f32_ms", ""),
    ("MiniLM-L6 b64×128 TF32×3", "minilm_b64_tf32x3", "BertModel torch.compile (f32)", "bert_b64_compile_ms", ""),
    ("MiniLM-L6 b64×128 TF32, warpgroup products (sm_90a)", "minilm_b64_wgmma_tf32", "BertModel torch.compile (f32)", "bert_b64_compile_ms", ""),
    ("MiniLM-L6 b64×128 TF32×3, warpgroup products (sm_90a)", "minilm_b64_wgmma_tf32x3", "BertModel torch.compile (f32)", "bert_b64_compile_ms", ""),
    ("matmul 4096³ a·bᵀ TF32×3", "matmul_nt_tf32x3", "torch.matmul, TF32 off (cuBLAS f32)", "matmul_f32_ms", ""),
    ("matmul 4096³ a·bᵀ TF32, warpgroup products (sm_90a)", "matmul_nt_wgmma_tf32", "torch.matmul, TF32 on", "matmul_tf32_ms", ""),
    ("matmul 4096³ a·bᵀ TF32×3, warpgroup products (sm_90a)", "matmul_nt_wgmma_tf32x3", "torch.matmul, TF32 off (cuBLAS f32)", "matmul_f32_ms", ""),
    ("matmul 4096³ a·bᵀ TF32×3, warpgroup products in 128×128 tiles", "matmul_nt_wgmma_t128_tf32x3", "torch.matmul, TF32 off (cuBLAS f32)", "matmul_f32_ms", ""),
    ("MiniLM-L6 b64×128 TF32×3, warpgroup products in 128×128 tiles", "minilm_b64_wgmma_t128_tf32x3", "BertModel torch.compile (f32)", "bert_b64_compile_ms", ""),
    ("matmul 4096³ f16", "matmul_f16", "torch.matmul f16 (cuBLAS)", "matmul_f16_ms", "≥ 0.8×"),
    ("matmul 4096³ bf16", "matmul_bf16", "torch.matmul bf16 (cuBLAS)", "matmul_bf16_ms", "≥ 0.8×"),
    ("matmul 4096³ f16, warpgroup products (sm_90a)", "matmul_wgmma_f16", "torch.matmul f16 (cuBLAS)", "matmul_f16_ms", ""),
    ("matmul 4096³ bf16, warpgroup products (sm_90a)", "matmul_wgmma_bf16", "torch.matmul bf16 (cuBLAS)", "matmul_bf16_ms", ""),
    ("matmul 4096³ f16, warpgroup products in 128×128 tiles", "matmul_wgmma_t128_f16", "torch.matmul f16 (cuBLAS)", "matmul_f16_ms", ""),
    ("matmul 4096³ f16, warpgroup products, each step awaited", "matmul_wgmma_awaited_f16", "torch.matmul f16 (cuBLAS)", "matmul_f16_ms", ""),
    ("attention 4×12×2048×64 f16", "attention_f16", "SDPA f16 flash", "attention_f16_flash_ms", "≥ 1.0×"),
    ("attention 4×12×2048×64 bf16", "attention_bf16", "SDPA bf16 flash", "attention_bf16_flash_ms", "≥ 1.0×"),
    ("attention 4×12×2048×64 f16, key tiles of 64", "attention_k64_f16", "SDPA f16 flash", "attention_f16_flash_ms", ""),
    ("attention 4×12×2048×64 f16, warpgroup products (sm_90a)", "attention_wgmma_f16", "SDPA f16 flash", "attention_f16_flash_ms", ""),
    ("attention 4×12×2048×64 bf16, warpgroup products (sm_90a)", "attention_wgmma_bf16", "SDPA bf16 flash", "attention_bf16_flash_ms", ""),
    ("attention 4×12×2048×64 f16, warpgroup products, key tiles of 64", "attention_wgmma_k64_f16", "SDPA f16 flash", "attention_f16_flash_ms", ""),
    ("attention 4×12×2048×64 f16, warpgroup products, each step awaited", "attention_wgmma_awaited_f16", "SDPA f16 flash", "attention_f16_flash_ms", ""),
]
for b in (1, 8, 64):
    goal = "≥ 1.11× (≤ 0.9× time)" if b == 64 else ""
    ROWS.append((f"MiniLM-L6 b{b}×128 f32", f"minilm_b{b}", "BertModel eager", f"bert_b{b}_eager_ms", ""))
    ROWS.append((f"MiniLM-L6 b{b}×128 f32", f"minilm_b{b}", "BertModel torch.compile", f"bert_b{b}_compile_ms", goal))
ROWS.append(("MiniLM-L6 b64×128 f32, tiles through registers", "minilm_b64_registers", "BertModel torch.compile", "bert_b64_compile_ms", ""))
ROWS.append(("MiniLM-L6 b64×128 f32, attention one query per invocation", "minilm_b64_per_query", "BertModel torch.compile", "bert_b64_compile_ms", ""))
ROWS.append(("MiniLM-L6 b64×128 f32, products in 128×128 tiles only", "minilm_b64_square", "BertModel torch.compile", "bert_b64_compile_ms", ""))


def names():
    """Every benchmark the tables read: what the check pack must hold."""
    found = {name for _, name, _, _, _ in ROWS}
    for _, _, _, default, variants in GOALS:
        found.update([default, *variants])
    for _, dynamic, static in DYNAMIC:
        found.update([dynamic, static])
    found.update(MINILM_B64_VARIANTS)
    return sorted(found)


def main():
    if sys.argv[1:] == ["--names"]:
        print("\n".join(names()))
        return
    kiln = {}
    with open(sys.argv[1]) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                kiln[r["name"]] = r
    with open(sys.argv[2]) as f:
        torch = json.load(f)

    def k(name):
        """Kiln's GPU time: the sum of its kernels' times."""
        r = kiln.get(name)
        if not r or r.get("problem") is not None or not r.get("kinds"):
            return None
        return sum(kind["ms"] for kind in r["kinds"])

    def end_to_end(name):
        r = kiln.get(name)
        return r["median_ms"] if r and r.get("problem") is None else None

    print(f"GPU: {torch.get('device', '?')}, torch {torch.get('torch', '?')}\n")
    print("| workload | Kiln GPU (ms) | Kiln end to end (ms) | peer | peer (ms) | Kiln speed / peer | goal |")
    print("|---|---|---|---|---|---|---|")
    for label, name, peer, key, goal in ROWS:
        kiln_ms, peer_ms = k(name), torch.get(key)
        print(
            f"| {label} | {cell(kiln_ms)} | {cell(end_to_end(name))} | {peer} | {cell(peer_ms)} "
            f"| {ratio(kiln_ms, peer_ms)} | {goal} |"
        )
    print_goals(k, torch)
    print_products(kiln, torch)
    print_dynamic(k, end_to_end)
    for path in sys.argv[3:]:
        print(f"\n| model ({path.rsplit('/', 1)[-1].split('.')[0]}) | result | max error |")
        print("|---|---|---|")
        with open(path) as f:
            for line in f:
                if line.strip():
                    r = json.loads(line)
                    verdict = "ok" if r["passed"] else f"FAIL {r.get('problem') or ''}"
                    err = "–" if r["max_error"] is None else f"{r['max_error']:.1e}"
                    print(f"| {r['name']} | {verdict} | {err} |")


# Each goal of the CUDA target: the peer's key, the ratio it asks for, the benchmark of Kiln's
# default plan, and the variants that may replace the default (flags of `kiln compile` that
# keep the goal's precision: TF32×3 products stand for f32 ones, as `--precision tf32x3`
# keeps f32's tolerance).
GOALS = [
    ("matmul 4096³ f32", "matmul_f32_ms", 0.8, "matmul",
     ["matmul_registers", "matmul_tf32x3", "matmul_nt_tf32x3", "matmul_nt_wgmma_tf32x3",
      "matmul_nt_wgmma_t128_tf32x3"]),
    ("matmul 4096³ f16", "matmul_f16_ms", 0.8, "matmul_f16",
     ["matmul_wgmma_f16", "matmul_wgmma_t128_f16", "matmul_wgmma_awaited_f16"]),
    ("matmul 4096³ bf16", "matmul_bf16_ms", 0.8, "matmul_bf16", ["matmul_wgmma_bf16"]),
    ("attention 4×12×2048×64 f32", "attention_f32_ms", 1.0, "attention",
     ["attention_per_query", "attention_tf32x3", "attention_wgmma_tf32x3",
      "attention_wgmma_awaited_tf32x3"]),
    ("attention 4×12×2048×64 f16", "attention_f16_flash_ms", 1.0, "attention_f16",
     ["attention_k64_f16", "attention_wgmma_f16", "attention_wgmma_k64_f16",
      "attention_wgmma_awaited_f16"]),
    ("attention 4×12×2048×64 bf16", "attention_bf16_flash_ms", 1.0, "attention_bf16",
     ["attention_wgmma_bf16"]),
    ("MiniLM-L6 b64×128 f32", "bert_b64_compile_ms", 1.0 / 0.9, "minilm_b64",
     ["minilm_b64_registers", "minilm_b64_per_query", "minilm_b64_square", "minilm_b64_tf32x3",
      "minilm_b64_wgmma_tf32x3", "minilm_b64_wgmma_t128_tf32x3"]),
]


def print_goals(kiln_ms, torch):
    """One line per goal: whether it holds with the default plan, and the fastest variant of
    those that keep the goal's precision (the default itself where none is faster), which is
    what a default should become."""
    print("\n| goal | needs | default | default / peer | fastest variant | fastest / peer | holds |")
    print("|---|---|---|---|---|---|---|")
    for label, key, needs, default, variants in GOALS:
        peer = torch.get(key)
        found = [(kiln_ms(n), n) for n in [default, *variants]]
        timed = [(ms, n) for ms, n in found if ms is not None]
        best_ms, best = min(timed) if timed else (None, None)
        r_default, r_best = (None if ms is None or peer is None else peer / ms for ms in (found[0][0], best_ms))
        if r_default is not None and r_default >= needs:
            holds = "yes"
        elif r_best is not None and r_best >= needs:
            holds = f"with {best}"
        elif r_best is None:
            holds = "not measured"
        else:
            holds = "no"
        print(
            f"| {label} | ≥ {needs:.2f}× | {default} | {speed(r_default)} | {best or '–'} "
            f"| {speed(r_best)} | {holds} |"
        )


# The MiniLM b64 benchmarks whose products are set beside cuBLAS's (peers.py times each of
# MINILM_B64_PRODUCTS, which every one of the six layers multiplies).
MINILM_B64_VARIANTS = ["minilm_b64", "minilm_b64_square", "minilm_b64_tf32x3", "minilm_b64_wgmma_tf32x3",
                       "minilm_b64_wgmma_t128_tf32x3"]


def print_products(kiln, torch):
    """MiniLM b64's products inside each variant (the kinds whose name starts with `matmul`,
    epilogues included) beside cuBLAS's f32 products of the same shapes, six layers of them:
    where the model's time against torch.compile goes."""
    times = [torch.get(product_key(m, k, n)) for m, k, n in MINILM_B64_PRODUCTS]
    cublas = None if None in times else MINILM_LAYERS * sum(times)
    print("\n| MiniLM-L6 b64×128 products | Kiln products (ms) | cuBLAS f32, the same products (ms) "
          "| Kiln speed / cuBLAS |")
    print("|---|---|---|---|")
    for name in MINILM_B64_VARIANTS:
        r = kiln.get(name)
        ms = None
        if r and r.get("problem") is None and r.get("kinds"):
            ms = sum(kind["ms"] for kind in r["kinds"] if kind["kind"].startswith("matmul")) or None
        print(f"| {name} | {cell(ms)} | {cell(cublas)} | {ratio(ms, cublas)} |")


# Artifacts with dynamic sizes, run at their hints, and their static twins compiled for that
# shape (the goal of one artifact for every size: within 3 % of the static one's time).
DYNAMIC = [
    ("MiniLM-L6 b64×128 f32, batch ≤ 64 and seq ≤ 128", "minilm_b64_dynamic", "minilm_b64"),
    ("MiniLM-L6 b1×128 f32, seq ≤ 256", "minilm_b1_dynamic", "minilm_b1"),
]


def print_dynamic(kiln_ms, end_to_end):
    """Each dynamic artifact's times beside its static twin's, GPU and end to end."""
    print("\n| workload (dynamic, at the static shape) | static GPU (ms) | dynamic GPU (ms) "
          "| dynamic / static, GPU | static end to end (ms) | dynamic end to end (ms) "
          "| dynamic / static, end to end | goal |")
    print("|---|---|---|---|---|---|---|---|")

    def over(a, b):
        return "–" if a is None or b is None else f"{a / b:.3f}"

    for label, dynamic, static in DYNAMIC:
        gs, gd = kiln_ms(static), kiln_ms(dynamic)
        es, ed = end_to_end(static), end_to_end(dynamic)
        print(f"| {label} | {cell(gs)} | {cell(gd)} | {over(gd, gs)} | {cell(es)} | {cell(ed)} "
              f"| {over(ed, es)} | ≤ 1.03 |")


if __name__ == "__main__":
    main()
