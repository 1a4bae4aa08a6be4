#!/usr/bin/env python3
"""PyTorch on the same NVIDIA GPU, for scripts/gpu_check.sh: the shapes Kiln's CUDA check pack
times, through torch.matmul (cuBLAS), scaled_dot_product_attention, and a MiniLM-L6-sized
BertModel (random weights; the time does not depend on them) in eager mode and under
torch.compile. Every time is the median of CUDA-event timings after warm-up.

Usage: peers.py --json OUT.json [--repeats N] [--skip-compile]
Needs torch with CUDA, and transformers for the BERT rows (skipped, saying so, without it).
"""

import argparse
import json
import statistics
import sys
import time


# MiniLM-L6's products at batch 64 × seq 128, as m × k × n, each once per layer (six layers);
# report.py reads these too.
MINILM_B64_PRODUCTS = ((8192, 384, 1152), (8192, 384, 384), (8192, 384, 1536), (8192, 1536, 384))
MINILM_LAYERS = 6


def product_key(m, k, n):
    """The JSON key of cuBLAS's time for an m × k × n product of MiniLM's."""
    return f"minilm_product_{m}x{k}x{n}_ms"


def timed(fn, repeats, warmup=5):
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def guarded(rows, key, fn):
    """Runs one measurement; a failure is recorded as `KEY_error` and the others still run."""
    try:
        rows[key] = fn()
    except Exception as e:  # noqa: BLE001
        rows[key + "_error"] = f"{type(e).__name__}: {e}"
        print(f"peers: {key}: {type(e).__name__}: {e}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--json", required=True)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--skip-compile", action="store_true")
    a = p.parse_args()

    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("peers: torch sees no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    rows = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    g = torch.Generator(device=dev).manual_seed(0)

    # matmul 4096³ in f32 (TF32 off: the same precision as Kiln's f32 product), and with TF32.
    n = 4096
    x = torch.randn(n, n, device=dev, generator=g)
    y = torch.randn(n, n, device=dev, generator=g)
    torch.backends.cuda.matmul.allow_tf32 = False
    guarded(rows, "matmul_f32_ms", lambda: timed(lambda: torch.matmul(x, y), a.repeats))
    torch.backends.cuda.matmul.allow_tf32 = True
    guarded(rows, "matmul_tf32_ms", lambda: timed(lambda: torch.matmul(x, y), a.repeats))
    torch.backends.cuda.matmul.allow_tf32 = False
    # and in f16 and bf16 (cuBLAS on tensor cores, f32 accumulation).
    for name, dtype in (("f16", torch.float16), ("bf16", torch.bfloat16)):
        xh, yh = x.to(dtype), y.to(dtype)
        guarded(rows, f"matmul_{name}_ms", lambda: timed(lambda: torch.matmul(xh, yh), a.repeats))
        del xh, yh
    del x, y

    # MiniLM-L6's products at batch 64 × seq 128 (8192 rows), f32 with TF32 off: what each of
    # the encoder's six layers multiplies (query, key and value as one product, the attention's
    # output, the feed-forward pair), beside Kiln's products inside the model (report.py).
    for m, kk, nn in MINILM_B64_PRODUCTS:
        xa = torch.randn(m, kk, device=dev, generator=g)
        wb = torch.randn(kk, nn, device=dev, generator=g)
        guarded(rows, product_key(m, kk, nn), lambda: timed(lambda: torch.matmul(xa, wb), a.repeats))
        del xa, wb

    # attention [4, 12, 2048, 64]: f32 (the kernel torch picks for f32), bf16 and f16 (flash).
    q, k, v = (torch.randn(4, 12, 2048, 64, device=dev, generator=g) for _ in range(3))
    guarded(rows, "attention_f32_ms", lambda: timed(lambda: F.scaled_dot_product_attention(q, k, v, scale=0.125), a.repeats))
    for name, dtype in (("bf16", torch.bfloat16), ("f16", torch.float16)):
        qh, kh, vh = (t.to(dtype) for t in (q, k, v))
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                rows[f"attention_{name}_flash_ms"] = timed(
                    lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=0.125), a.repeats
                )
        except Exception as e:  # noqa: BLE001
            rows[f"attention_{name}_flash_error"] = str(e)
        del qh, kh, vh
    del q, k, v

    # A MiniLM-L6-sized BERT encoder, f32, seq 128.
    try:
        from transformers import BertConfig, BertModel
    except ImportError:
        rows["bert_error"] = "transformers is not installed"
        BertModel = None
    if BertModel is not None:
        config = BertConfig(
            vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
            intermediate_size=1536, max_position_embeddings=512, type_vocab_size=2,
        )
        model = BertModel(config).to(dev).eval()
        compiled = None if a.skip_compile else torch.compile(model)
        for b in (1, 8, 64):
            ids = torch.randint(0, 30522, (b, 128), device=dev, generator=g)
            mask = torch.ones(b, 128, dtype=torch.long, device=dev)
            with torch.no_grad():
                guarded(rows, f"bert_b{b}_eager_ms",
                        lambda: timed(lambda: model(input_ids=ids, attention_mask=mask), a.repeats))
                if compiled is not None:
                    def compile_and_time():
                        start = time.time()
                        compiled(input_ids=ids, attention_mask=mask)
                        rows[f"bert_b{b}_compile_seconds"] = time.time() - start
                        return timed(lambda: compiled(input_ids=ids, attention_mask=mask), a.repeats)
                    guarded(rows, f"bert_b{b}_compile_ms", compile_and_time)
    with open(a.json, "w") as f:
        json.dump(rows, f, indent=1)
    for key, value in rows.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
