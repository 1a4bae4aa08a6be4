#!/usr/bin/env python3
"""Regenerate the PyTorch golden outputs for models/bert_encoder.ron (tests/golden/bert_minilm/).

The check: Kiln initializes the BERT encoder (all-MiniLM-L6-v2 sizes) from `--seed 0`, except
the LayerNorm parameters: Kiln would set every LayerNorm weight to 1 and bias to 0, which would
leave the affine part of LayerNorm untested, so this script draws random values for them
(seeded numpy, weight = 1 + 0.1·N(0,1), bias = 0.1·N(0,1)), writes them to
`layernorm.safetensors`, and Kiln loads them by name (`--weights … --init-missing`). The exact
parameter values Kiln used (`kiln eval --save-params`) are loaded *by name* into a Hugging Face
`transformers.BertModel` with `load_state_dict(strict=True)`, and the model runs on fixed inputs
in float32 eager mode. Its `last_hidden_state` is the golden output that `tests/golden.rs`
compares Kiln against (max |Δ| ≤ 1e-5).

Usage (from anywhere):

    python3 tests/golden/make_bert_golden.py

Python environment: by default this creates `tests/golden/.venv` (git-ignored) and installs the
exact versions pinned in `tests/golden/requirements.txt`, then re-runs itself inside it. Set
`KILN_GOLDEN_PYTHON=/path/to/python` to use an existing interpreter that already has exactly
those versions instead (the script refuses other versions unless KILN_GOLDEN_ALLOW_VERSIONS=1).

Outputs (committed, small):
    tests/golden/bert_minilm/inputs.safetensors    input_ids, token_type_ids, attention_mask (i64 [2, 128])
    tests/golden/bert_minilm/layernorm.safetensors the 26 LayerNorm weights and biases (f32 [384])
    tests/golden/bert_minilm/expected.safetensors  last_hidden_state (f32 [2, 128, 384])
    tests/golden/bert_minilm/meta.json             versions, kiln command, seed, parameter fingerprint
The parameters themselves (~86 MiB) are written to a temporary folder and not kept.

Only the standard library is imported at the top level, so the bootstrap runs under any python3.
"""

import copy
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from golden_env import check_versions, run_pinned

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT_DIR = HERE / "bert_minilm"
REQUIREMENTS = HERE / "requirements.txt"
MODEL = "models/bert_encoder.ron"

SEED = 0  # Kiln's parameter seed (`kiln eval --seed`)
INPUT_SEED = 20240611  # numpy seed for the token ids
BATCH, SEQ = 2, 128
VALID_ROW1 = 77  # row 1 attends to its first 77 tokens; the rest is padding
VOCAB = 30522
HIDDEN = 384
LAYERNORM_SEED = 20240612  # numpy seed for the LayerNorm weights and biases
LAYERNORM_PAIRS = 13  # embeddings + 2 per encoder layer
TOLERANCE = 1e-5  # max |kiln - pytorch| allowed by tests/golden.rs (TOLERANCE there)



def run(cmd, **kw):
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, check=True, **kw)


def param_fingerprint(name, a):
    """What tests/golden.rs recomputes from Kiln's own parameters.

    `checksum` is exact and independent of summation order: with b_i the little-endian u32 bit
    pattern of element i (row-major), it is  Σ b_i · (2i + 1)  mod 2^64, as 16 hex digits.
    `sum` and `sum_sq` (float64) are there for humans; they depend on summation order in the
    last bits, so the test compares them with a tolerance only.
    """
    import numpy as np

    assert a.dtype == np.float32, f"{name}: expected float32, got {a.dtype}"
    flat = np.ascontiguousarray(a).reshape(-1)
    bits = flat.view("<u4").astype(np.uint64)
    weights = np.arange(flat.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    with np.errstate(over="ignore"):
        checksum = int(np.sum(bits * weights, dtype=np.uint64))  # uint64 arithmetic wraps mod 2^64
    f = flat.astype(np.float64)
    return {
        "dtype": "f32",
        "shape": list(a.shape),
        "checksum": f"{checksum:016x}",
        "sum": float(np.sum(f)),
        "sum_sq": float(np.sum(f * f)),
    }


def make_inputs():
    import numpy as np

    rng = np.random.default_rng(INPUT_SEED)
    input_ids = rng.integers(0, VOCAB, size=(BATCH, SEQ), dtype=np.int64)
    token_type_ids = np.zeros((BATCH, SEQ), dtype=np.int64)
    token_type_ids[:, SEQ // 2 :] = 1
    attention_mask = np.ones((BATCH, SEQ), dtype=np.int64)
    attention_mask[1, VALID_ROW1:] = 0
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def make_layernorm(names):
    """Random LayerNorm parameters, so that the golden output depends on LayerNorm's affine part.

    `names` are the model's parameter names ending in `LayerNorm.weight` / `LayerNorm.bias`.
    One numpy generator seeded with LAYERNORM_SEED; in sorted name order, each tensor takes
    HIDDEN standard normals z (float64), then weight = 1 + 0.1·z, bias = 0.1·z, cast to float32.
    """
    import numpy as np

    rng = np.random.default_rng(LAYERNORM_SEED)
    out = {}
    for name in sorted(names):
        z = rng.standard_normal(HIDDEN)
        if name.endswith("LayerNorm.weight"):
            v = 1.0 + 0.1 * z
        elif name.endswith("LayerNorm.bias"):
            v = 0.1 * z
        else:
            raise AssertionError(f"not a LayerNorm parameter: {name}")
        out[name] = v.astype(np.float32)
    return out


def git_state():
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "compiler", "src", "models", "Cargo.toml", "Cargo.lock"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return None, None


def to_json(meta):
    """meta.json text: indented, but one line per parameter tensor."""
    tensors = meta["params"]["tensors"]
    meta = dict(meta, params=dict(meta["params"], tensors="@TENSORS@"))
    lines = [f"   {json.dumps(k)}: {json.dumps(v)}" for k, v in tensors.items()]
    text = json.dumps(meta, indent=1).replace('"@TENSORS@"', "{\n" + ",\n".join(lines) + "\n  }")
    json.loads(text)  # still valid JSON
    return text + "\n"


def main():
    import numpy as np
    import safetensors
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    check_versions(versions, REQUIREMENTS)

    # 1. Kiln, release build.
    run(["cargo", "build", "--release", "--bin", "kiln"])
    kiln = REPO / "target" / "release" / "kiln"

    # 2. Fixed inputs.
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    inputs = make_inputs()
    inputs_path = OUT_DIR / "inputs.safetensors"
    save_file(inputs, str(inputs_path))

    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        hidden_act="gelu",  # exact (erf) GELU, as std.gelu
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)  # HF's own init is overwritten below; seeded only for reproducibility
    model = transformers.BertModel(config, add_pooling_layer=False)
    model.config._attn_implementation = "eager"
    assert model.config._attn_implementation == "eager", model.config._attn_implementation

    # 3. Random LayerNorm parameters, by the names HF BertModel (and, checked below, Kiln) uses.
    hf_state = model.state_dict()
    ln_names = [n for n in hf_state if n.endswith("LayerNorm.weight") or n.endswith("LayerNorm.bias")]
    assert len(ln_names) == 2 * LAYERNORM_PAIRS, ln_names
    for n in ln_names:
        assert tuple(hf_state[n].shape) == (HIDDEN,), (n, hf_state[n].shape)
    layernorm = make_layernorm(ln_names)
    layernorm_path = OUT_DIR / "layernorm.safetensors"
    save_file(layernorm, str(layernorm_path))
    layernorm_sha256 = hashlib.sha256(layernorm_path.read_bytes()).hexdigest()

    # 4. Kiln: LayerNorm parameters from the file, the rest initialized from the seed.
    with tempfile.TemporaryDirectory(prefix="kiln-golden-") as tmp:
        tmp = Path(tmp)
        params_path = tmp / "params.safetensors"
        kiln_out = tmp / "kiln_out.safetensors"
        # The command as recorded in meta.json (paths relative to the repository root).
        recorded = [
            "kiln", "eval", MODEL, "--set", "batch=2", "--seed", str(SEED),
            "--input", str(inputs_path.relative_to(REPO)),
            "--weights", str(layernorm_path.relative_to(REPO)), "--init-missing",
            "--save-params", "<tmp>/params.safetensors",
        ]
        run([str(kiln)] + recorded[1:-1] + [str(params_path), "-o", str(kiln_out)])

        # 5. Kiln's parameters, by name, into Hugging Face BertModel.
        params = load_file(str(params_path))
        params_sha256 = hashlib.sha256(params_path.read_bytes()).hexdigest()
        params_bytes = params_path.stat().st_size
        kiln_last = load_file(str(kiln_out))["last_hidden_state"]

    # Kiln must have used the LayerNorm values from the file, bit for bit.
    for n, v in layernorm.items():
        assert n in params, f"{n}: not among Kiln's parameters"
        assert params[n].dtype == np.float32 and params[n].shape == v.shape, (n, params[n].dtype, params[n].shape)
        assert np.array_equal(params[n].view("<u4"), v.view("<u4")), f"{n}: Kiln did not use the file's values"

    # BertEmbeddings has two buffers, `embeddings.position_ids` (arange) and
    # `embeddings.token_type_ids` (zeros). In this transformers version both are registered with
    # persistent=False, so they are not part of state_dict() and strict loading neither expects
    # nor accepts them. We assert that here rather than silently dropping names.
    hf_names = set(model.state_dict().keys())
    for buf in ("embeddings.position_ids", "embeddings.token_type_ids"):
        assert buf not in hf_names, f"{buf} is in HF's state_dict: handle it explicitly"
    kiln_names = set(params.keys())
    if kiln_names != hf_names:
        print("error: Kiln's parameter names differ from HF BertModel's state_dict:", file=sys.stderr)
        for n in sorted(kiln_names - hf_names):
            print(f"  only in Kiln: {n} {params[n].shape}", file=sys.stderr)
        for n in sorted(hf_names - kiln_names):
            print(f"  only in HF:   {n} {tuple(model.state_dict()[n].shape)}", file=sys.stderr)
        sys.exit(1)
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}
    result = model.load_state_dict(state, strict=True)  # raises on missing/unexpected/shape mismatch
    assert not result.missing_keys and not result.unexpected_keys, result
    model.eval()
    model.float()

    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        out = model(
            input_ids=t["input_ids"], token_type_ids=t["token_type_ids"], attention_mask=t["attention_mask"]
        ).last_hidden_state
    assert out.dtype == torch.float32 and tuple(out.shape) == (BATCH, SEQ, 384), (out.dtype, out.shape)
    expected = out.numpy().astype(np.float32)

    # Diagnostics (recorded, not tested): float32 noise of PyTorch itself (vs a float64 run of
    # the same model), how far Kiln's own output was at generation time, and how far the
    # reference moves under plausible implementation mistakes (each should exceed TOLERANCE).
    def reference(config_changes=None, state_changes=None, mask=True, double=False):
        cfg = copy.deepcopy(config)
        for k, v in (config_changes or {}).items():
            setattr(cfg, k, v)
        m = transformers.BertModel(cfg, add_pooling_layer=False)
        m.config._attn_implementation = "eager"
        m.load_state_dict({**state, **(state_changes or {})}, strict=True)
        m.eval()
        if double:
            m.double()
        else:
            m.float()
        with torch.no_grad():
            return m(
                input_ids=t["input_ids"],
                token_type_ids=t["token_type_ids"],
                attention_mask=t["attention_mask"] if mask else None,
            ).last_hidden_state.numpy().astype(np.float64)

    def max_abs(a, b):
        return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))

    out64 = reference(double=True)
    torch_f32_vs_f64 = max_abs(expected, out64)
    kiln_vs_torch = max_abs(kiln_last, expected)
    kiln_vs_torch64 = max_abs(kiln_last, out64)
    print(f"max |torch f32 - torch f64| = {torch_f32_vs_f64:.3e}")
    print(f"max |kiln - torch f32|      = {kiln_vs_torch:.3e}  (tolerance {TOLERANCE:.0e})")
    print(f"max |kiln - torch f64|      = {kiln_vs_torch64:.3e}")
    if kiln_vs_torch > TOLERANCE:
        print(f"WARNING: Kiln is outside the tolerance ({kiln_vs_torch:.3e} > {TOLERANCE:.0e}): "
              "tests/golden.rs will fail", flush=True)
    identity_ln = {
        n: torch.ones(HIDDEN) if n.endswith(".weight") else torch.zeros(HIDDEN) for n in layernorm
    }
    variants = {
        "layer_norm_eps_1e-5": reference(config_changes={"layer_norm_eps": 1e-5}),
        "gelu_tanh_approximation": reference(config_changes={"hidden_act": "gelu_pytorch_tanh"}),
        "layernorm_weight_1_bias_0": reference(state_changes=identity_ln),
        "no_attention_mask": reference(mask=False),
    }
    variant_errors = {k: max_abs(v, expected) for k, v in variants.items()}
    for k, e in variant_errors.items():
        caught = "caught" if e > TOLERANCE else "NOT CAUGHT"
        print(f"max |{k} - torch f32| = {e:.3e} ({caught} at {TOLERANCE:.0e})")

    expected_path = OUT_DIR / "expected.safetensors"
    save_file({"last_hidden_state": expected}, str(expected_path))

    commit, dirty = git_state()
    meta = {
        "description": "Hugging Face BertModel (float32, eager attention, eval) with Kiln's seeded "
        "parameters (LayerNorm parameters random, from layernorm.safetensors) for "
        "models/bert_encoder.ron; see tests/golden/README.md",
        "model": MODEL,
        "seed": SEED,
        "kiln_command": " ".join(recorded),
        "kiln_git_commit": commit,
        "kiln_worktree_dirty": dirty,
        "inputs": {
            "file": "inputs.safetensors",
            "batch": BATCH,
            "seq": SEQ,
            "input_ids": f"numpy.random.default_rng({INPUT_SEED}).integers(0, {VOCAB}, size=({BATCH}, {SEQ}))",
            "token_type_ids": f"0 for positions < {SEQ // 2}, 1 after",
            "attention_mask": f"row 0 all ones; row 1 ones for the first {VALID_ROW1} tokens, then zeros",
        },
        "layernorm": {
            "file": "layernorm.safetensors",
            "kiln_args": "--weights tests/golden/bert_minilm/layernorm.safetensors --init-missing",
            "seed": LAYERNORM_SEED,
            "generation": f"numpy.random.default_rng({LAYERNORM_SEED}); for each name in sorted order, "
            f"z = standard_normal({HIDDEN}) (float64); weight = 1 + 0.1*z, bias = 0.1*z; cast to float32",
            "tensors": len(layernorm),
            "file_sha256": layernorm_sha256,
            "file_bytes": layernorm_path.stat().st_size,
        },
        "expected": {"file": "expected.safetensors", "output": "last_hidden_state", "tolerance_max_abs": TOLERANCE},
        "reference": {
            "class": "transformers.BertModel(add_pooling_layer=False)",
            "attn_implementation": model.config._attn_implementation,
            "dtype": "float32",
            "torch_num_threads": torch.get_num_threads(),
        },
        "versions": versions,
        "platform": platform.platform(),
        "diagnostics": {
            "max_abs_torch_f32_vs_torch_f64": torch_f32_vs_f64,
            "max_abs_kiln_vs_torch_f32": kiln_vs_torch,
            "max_abs_kiln_vs_torch_f64": kiln_vs_torch64,
            "max_abs_reference_variant_vs_torch_f32": variant_errors,
        },
        "params": {
            "count": len(params),
            "values": int(sum(v.size for v in params.values())),
            "file_sha256": params_sha256,
            "file_bytes": params_bytes,
            "fingerprint_doc": "per tensor: checksum = sum_i u32bits(x_i) * (2i+1) mod 2^64 "
            "(row-major, hex), sum and sum_sq in float64",
            "tensors": {k: param_fingerprint(k, params[k]) for k in sorted(params)},
        },
    }
    (OUT_DIR / "meta.json").write_text(to_json(meta))
    for p in (inputs_path, layernorm_path, expected_path, OUT_DIR / "meta.json"):
        print(f"wrote {p.relative_to(REPO)} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    run_pinned(main, __file__, REQUIREMENTS)
