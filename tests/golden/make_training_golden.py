#!/usr/bin/env python3
"""Regenerate the PyTorch golden gradients and optimizer steps (tests/golden/training/).

What `compiler/lower/tests/pytorch.rs` checks Kiln's autodiff, losses, optimizers and schedules
against:

* Gradients. For models/mlp.ron, a 2-layer models/bert_encoder.ron, models/lstm.ron and
  models/resnet_block.ron at small sizes (`SIZES`, the `--set` overrides of `MODELS` in the
  Rust test), Kiln's own parameters (from `--seed 0`, written by the Rust test
  `write_kiln_parameters`) with the norm parameters drawn at random (`randomize_norms`), are
  loaded by name (`load_state_dict(strict=True)`) into an equivalent PyTorch module written
  here. On fixed inputs, the loss (the spec's training section for the MLP, else the one stated
  in `LOSSES`) runs `loss.backward()` in float32 and in float64. `MODEL.safetensors` holds the
  parameters (`param.NAME`), inputs (`input.NAME`), `loss`, `loss64`, and every parameter's
  gradient by Kiln's name (`grad.NAME` float32, `grad64.NAME` float64).
* Cross-entropy. The MLP's logits under `F.cross_entropy` with label smoothing and ignored
  positions (`CROSS_ENTROPY`), in `mlp.safetensors` under `CASE.`.
* Optimizers. The MLP trained for 10 steps on fixed batches under each `torch.optim`
  optimizer, learning-rate scheduler, gradient clipping and accumulation of `OPTIMIZERS`:
  `optimizers.safetensors` holds the initial parameters, the batches (`input.K.NAME`) and per
  case the learning rate, loss and gradient norm of each step and the parameters after steps 1
  and 10 (`CASE.after1.NAME`, `CASE.after10.NAME`), and the same from the loop in float64
  (`CASE.f64.`).

Usage (from anywhere):

    python3 tests/golden/make_training_golden.py

Python environment: by default this creates `tests/golden/.venv` (git-ignored), installs the
exact versions pinned in `tests/golden/training/requirements.txt` and re-runs itself inside it.
Set `KILN_GOLDEN_PYTHON=/path/to/python` to use an interpreter that already has exactly those
versions (the script refuses others unless KILN_GOLDEN_ALLOW_VERSIONS=1). It runs `cargo test`
for Kiln's parameters, so it needs the Rust toolchain (no MLIR link: kiln-lower only).

Only the standard library is imported at the top level, so the bootstrap runs under any python3.
"""

import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from golden_env import check_versions, run_pinned

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
OUT_DIR = HERE / "training"
REQUIREMENTS = OUT_DIR / "requirements.txt"

INPUT_SEED = 20261204  # numpy seed for every input
NORM_SEED = 20261205  # numpy seed for the LayerNorm and BatchNorm parameters
STEPS = 10

# The sizes of `MODELS` in compiler/lower/tests/pytorch.rs (keep the two the same).
SIZES = {
    "mlp": dict(batch=6, inp=6, hidden1=5, hidden2=4, classes=3),
    "bert_encoder": dict(vocab=40, hidden=16, layers=2, heads=2, ffn=32, max_positions=12,
                         type_vocab=2, eps=1e-12, batch=2, seq=8, valid_row1=5),
    "lstm": dict(batch=3, steps=5, features=4, hidden=6, classes=3),
    "resnet_block": dict(batch=2, size=8, width=4, blocks=2, classes=3, eps=1e-5),
}

# The loss of each model: its training section (mlp.ron: cross-entropy of `logits` against
# `label`), or the one the Rust test states for a model without one.
LOSSES = {
    "mlp": "F.cross_entropy(logits, label) (the spec's training section)",
    "bert_encoder": "F.mse_loss(last_hidden_state, target)",
    "lstm": "F.cross_entropy(logits, label)",
    "resnet_block": "F.cross_entropy(logits, label)",
}

# Cross-entropy variants on the MLP's logits: (label smoothing, ignore_index, labels).
# -100 is PyTorch's default ignore_index.
CROSS_ENTROPY = {
    "smoothing": (0.1, -100, [0, 2, -100, 1, 2, 0]),
    "ignore_index": (0.2, 1, [1, 2, 0, 1, 2, 0]),
}

# The optimizer cases of `OPTIMIZERS` in compiler/lower/tests/pytorch.rs: optimizer class and
# arguments, scheduler, clip_grad_norm's max_norm, micro-batches.
OPTIMIZERS = {
    "sgd": ("SGD", dict(lr=0.1), None, None, 1),
    "sgd_momentum": ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.1), None, None, 1),
    "sgd_nesterov": ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True), None, None, 1),
    "sgd_weight_decay": ("SGD", dict(lr=0.1, momentum=0.5, weight_decay=0.05), None, None, 1),
    "adam": ("Adam", dict(lr=0.01), None, None, 1),
    "adam_weight_decay": ("Adam", dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1), None, None, 1),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1), None, None, 1),
    "rmsprop": ("RMSprop", dict(lr=0.01), None, None, 1),
    "rmsprop_momentum": ("RMSprop", dict(lr=0.002, momentum=0.9, weight_decay=0.05), None, None, 1),
    "rmsprop_centered": ("RMSprop", dict(lr=0.01, alpha=0.9, centered=True), None, None, 1),
    "rmsprop_centered_momentum": ("RMSprop", dict(lr=0.002, momentum=0.5, eps=1e-6, centered=True), None, None, 1),
    "constant": ("Adam", dict(lr=0.01), ("constant",), None, 1),
    "linear": ("Adam", dict(lr=0.01), ("LinearLR", dict(start_factor=1.0, end_factor=0.0, total_iters=10)), None, 1),
    "linear_warmup": ("SGD", dict(lr=0.1, momentum=0.9), ("hf_linear", dict(warmup=3, total=8)), None, 1),
    "cosine": ("Adam", dict(lr=0.01), ("CosineAnnealingLR", dict(T_max=10, eta_min=1e-3)), None, 1),
    "cosine_warmup": ("Adam", dict(lr=0.01), ("hf_cosine", dict(warmup=3, total=10, min_lr=1e-3)), None, 1),
    "step": ("SGD", dict(lr=0.1, momentum=0.9), ("StepLR", dict(step_size=3, gamma=0.5)), None, 1),
    "clip": ("SGD", dict(lr=0.1, momentum=0.9), None, 0.3, 1),
    "clip_inactive": ("Adam", dict(lr=0.01), None, 100.0, 1),
    "accumulate": ("Adam", dict(lr=0.01), ("hf_cosine", dict(warmup=2, total=10, min_lr=0.0)), 0.5, 3),
}


def run(cmd, **kw):
    print("+ " + " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, check=True, **kw)


def kiln_parameters(tmp):
    """Kiln's parameters of each model at its golden sizes, by name, in graph order."""
    from safetensors.numpy import load_file

    env = dict(os.environ, KILN_GOLDEN_PARAMS=str(tmp))
    run(["cargo", "test", "-q", "-p", "kiln-lower", "--test", "pytorch", "--",
         "--ignored", "--exact", "write_kiln_parameters"], env=env)
    return {m: load_file(str(Path(tmp) / f"{m}.safetensors")) for m in SIZES}


def randomize_norms(params):
    """Kiln starts every norm at weight 1, bias 0, running mean 0, running variance 1, which
    would leave the norms' affine part (and a mix-up of its parameters) untested. One numpy
    generator seeded NORM_SEED; in sorted name order over all models, each LayerNorm or
    BatchNorm parameter takes z = standard normals (float64) of its size: weight = 1 + 0.1·z,
    bias and running_mean = 0.1·z, running_var = exp(0.3·z); cast to float32."""
    import numpy as np

    rng = np.random.default_rng(NORM_SEED)
    changed = []
    for model in sorted(params):
        for name in sorted(params[model]):
            is_norm = ".LayerNorm." in name or name.split(".")[-2].startswith("bn")
            if not is_norm:
                continue
            z = rng.standard_normal(params[model][name].shape)
            kind = name.split(".")[-1]
            v = {"weight": 1 + 0.1 * z, "bias": 0.1 * z, "running_mean": 0.1 * z,
                 "running_var": np.exp(0.3 * z)}[kind]
            params[model][name] = v.astype(np.float32)
            changed.append(f"{model}:{name}")
    return changed


def make_inputs():
    """Fixed inputs of each model, from one numpy generator seeded INPUT_SEED."""
    import numpy as np

    rng = np.random.default_rng(INPUT_SEED)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    labels = lambda n, c: rng.integers(0, c, size=(n,), dtype=np.int64)
    s = SIZES["mlp"]
    mlp = {"image": f32(s["batch"], s["inp"]), "label": labels(s["batch"], s["classes"])}
    s = SIZES["bert_encoder"]
    types = np.zeros((s["batch"], s["seq"]), dtype=np.int64)
    types[:, s["seq"] // 2:] = 1
    mask = np.ones((s["batch"], s["seq"]), dtype=np.int64)
    mask[1, s["valid_row1"]:] = 0
    bert = {
        "input_ids": rng.integers(0, s["vocab"], size=(s["batch"], s["seq"]), dtype=np.int64),
        "token_type_ids": types,
        "attention_mask": mask,
        "target": f32(s["batch"], s["seq"], s["hidden"]),
    }
    s = SIZES["lstm"]
    lstm = {"x": f32(s["batch"], s["steps"], s["features"]), "label": labels(s["batch"], s["classes"])}
    s = SIZES["resnet_block"]
    resnet = {"image": f32(s["batch"], 3, s["size"], s["size"]), "label": labels(s["batch"], s["classes"])}
    s = SIZES["mlp"]
    batches = [{"image": f32(s["batch"], s["inp"]), "label": labels(s["batch"], s["classes"])}
               for _ in range(STEPS)]
    return {"mlp": mlp, "bert_encoder": bert, "lstm": lstm, "resnet_block": resnet}, batches


def modules():
    """PyTorch modules equivalent to the four specs, with Kiln's parameter names."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    class Mlp(nn.Module):
        def __init__(self, inp, hidden1, hidden2, classes, **_):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(inp, hidden1), nn.Linear(hidden1, hidden2)
            self.fc3 = nn.Linear(hidden2, classes)

        def forward(self, image, **_):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(image)))))

    class SelfAttention(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.query, self.key, self.value = (nn.Linear(hidden, hidden) for _ in range(3))

    class Dense(nn.Module):
        def __init__(self, inp, out, eps=None):
            super().__init__()
            self.dense = nn.Linear(inp, out)
            if eps is not None:
                self.LayerNorm = nn.LayerNorm(out, eps=eps)

    class Attention(nn.Module):
        def __init__(self, hidden, eps):
            super().__init__()
            self.self = SelfAttention(hidden)
            self.output = Dense(hidden, hidden, eps)

    class Layer(nn.Module):
        def __init__(self, hidden, ffn, heads, eps):
            super().__init__()
            self.heads = heads
            self.attention = Attention(hidden, eps)
            self.intermediate = Dense(hidden, ffn)
            self.output = Dense(ffn, hidden, eps)

        def forward(self, x, mask):
            b, s, h = x.shape
            d = h // self.heads
            split = lambda t: t.view(b, s, self.heads, d).transpose(1, 2)
            sa = self.attention.self
            q, k, v = split(sa.query(x)), split(sa.key(x)), split(sa.value(x))
            p = F.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + mask, dim=-1)
            a = (p @ v).transpose(1, 2).reshape(b, s, h)
            out = self.attention.output
            x = out.LayerNorm(out.dense(a) + x)
            f = self.output.dense(F.gelu(self.intermediate.dense(x)))
            return self.output.LayerNorm(f + x)

    class Embeddings(nn.Module):
        def __init__(self, vocab, hidden, max_positions, type_vocab, eps):
            super().__init__()
            self.word_embeddings = nn.Embedding(vocab, hidden)
            self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
            self.position_embeddings = nn.Embedding(max_positions, hidden)
            self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    class Encoder(nn.Module):
        def __init__(self, layers, **kw):
            super().__init__()
            self.layer = nn.ModuleList(Layer(**kw) for _ in range(layers))

    class Bert(nn.Module):
        """Hugging Face's BertModel (post-norm, exact GELU, eager attention) without pooler."""

        def __init__(self, vocab, hidden, layers, heads, ffn, max_positions, type_vocab, eps, **_):
            super().__init__()
            self.embeddings = Embeddings(vocab, hidden, max_positions, type_vocab, eps)
            self.encoder = Encoder(layers, hidden=hidden, ffn=ffn, heads=heads, eps=eps)

        def forward(self, input_ids, token_type_ids, attention_mask, **_):
            e = self.embeddings
            seq = input_ids.shape[1]
            x = e.word_embeddings(input_ids) + e.token_type_embeddings(token_type_ids)
            x = e.LayerNorm(x + e.position_embeddings.weight[:seq])
            dtype = x.dtype
            mask = (1.0 - attention_mask.to(dtype))[:, None, None, :] * torch.finfo(dtype).min
            for layer in self.encoder.layer:
                x = layer(x, mask)
            return x

    class Lstm(nn.Module):
        def __init__(self, features, hidden, classes, **_):
            super().__init__()
            self.lstm = nn.LSTMCell(features, hidden)
            self.head = nn.Linear(hidden, classes)

        def forward(self, x, **_):
            h = x.new_zeros(x.shape[0], self.lstm.hidden_size)
            c = h
            for t in range(x.shape[1]):
                h, c = self.lstm(x[:, t], (h, c))
            return self.head(h)

    class EvalBatchNorm(nn.Module):
        """BatchNorm2d in eval mode, with its running statistics as parameters: Kiln's
        std.batch_norm reads them as parameters and so has their gradients, which PyTorch's
        kernel refuses to compute; `check_batch_norm` checks the formula is nn.BatchNorm2d's."""

        def __init__(self, c, eps):
            super().__init__()
            self.eps = eps
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
            self.running_mean = nn.Parameter(torch.zeros(c))
            self.running_var = nn.Parameter(torch.ones(c))

        def forward(self, x):
            col = lambda t: t[None, :, None, None]
            scale = self.weight * torch.rsqrt(self.running_var + self.eps)
            return (x - col(self.running_mean)) * col(scale) + col(self.bias)

    class Block(nn.Module):
        def __init__(self, width, eps):
            super().__init__()
            self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn1 = EvalBatchNorm(width, eps)
            self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
            self.bn2 = EvalBatchNorm(width, eps)

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            return F.relu(self.bn2(self.conv2(h)) + x)

    class ResNet(nn.Module):
        def __init__(self, width, blocks, classes, eps, **_):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
            self.bn1 = EvalBatchNorm(width, eps)
            self.layer1 = nn.ModuleList(Block(width, eps) for _ in range(blocks))
            self.fc = nn.Linear(width, classes)

        def forward(self, image, **_):
            x = F.max_pool2d(F.relu(self.bn1(self.conv1(image))), 2)
            for block in self.layer1:
                x = block(x)
            x = F.avg_pool2d(x, x.shape[-1]).flatten(1)
            return self.fc(x)

    return {"mlp": Mlp, "bert_encoder": Bert, "lstm": Lstm, "resnet_block": ResNet}


def check_batch_norm():
    """EvalBatchNorm is nn.BatchNorm2d in eval mode (up to float32 rounding)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(4, eps=1e-5).eval()
    with torch.no_grad():
        for t in (bn.weight, bn.bias, bn.running_mean):
            t.copy_(torch.randn(4, generator=g))
        bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    net = modules()["resnet_block"](width=4, blocks=0, classes=2, eps=1e-5)
    mine = net.bn1
    with torch.no_grad():
        for k in ("weight", "bias", "running_mean", "running_var"):
            getattr(mine, k).copy_(getattr(bn, k))
    x = torch.randn(2, 4, 3, 3, generator=g)
    err = (mine(x) - bn(x)).abs().max().item()
    assert err < 1e-5, f"EvalBatchNorm differs from nn.BatchNorm2d by {err}"
    return err


def loss_of(model, out, inputs):
    import torch.nn.functional as F

    if model == "bert_encoder":
        return F.mse_loss(out, inputs["target"])
    return F.cross_entropy(out, inputs["label"])


def gradients(model, cls, params, inputs, double):
    """The loss and every parameter's gradient, by Kiln's name, in float32 or float64."""
    import torch

    net = cls(**SIZES[model])
    state = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    net.load_state_dict(state, strict=True)
    net = net.double() if double else net.float()
    dtype = torch.float64 if double else torch.float32
    t = {k: torch.from_numpy(v.copy()) for k, v in inputs.items()}
    t = {k: v.to(dtype) if v.is_floating_point() else v for k, v in t.items()}
    loss = loss_of(model, net(**t), t)
    net.zero_grad()
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in net.named_parameters()}
    assert set(grads) == set(params), f"{model}: {set(grads) ^ set(params)}"
    return loss.detach(), grads


def scaled_error(got, want):
    """compiler/lower/tests/pytorch.rs's measure over the gradients {name: tensor} of one
    model: per tensor max |got − want| / max(max |want|, floor), the floor a hundredth of the
    largest |want| of any tensor; the worst over the tensors."""
    floor = 1e-2 * max(w.abs().max().item() for w in want.values())
    worst = 0.0
    for k, w in want.items():
        g, w = got[k].double(), w.double()
        worst = max(worst, ((g - w).abs().max() / max(w.abs().max().item(), floor)).item())
    return worst


def gradient_variants(classes, params, inputs, golden):
    """How far a plausible mistake moves the float32 gradients, in the test's measure: what
    the tolerance has to catch."""
    import numpy as np

    def variant(model, sizes=None, inputs_changed=None):
        cls = classes[model]
        if sizes is not None:
            cls = lambda **kw: classes[model](**dict(kw, **sizes))
        x = dict(inputs[model], **(inputs_changed or {}))
        return scaled_error(gradients(model, cls, params[model], x, double=False)[1], golden[model])

    s = SIZES["bert_encoder"]
    return {
        "bert_encoder: LayerNorm eps 1e-5 instead of 1e-12": variant("bert_encoder", sizes=dict(eps=1e-5)),
        "bert_encoder: no padding mask": variant(
            "bert_encoder", inputs_changed=dict(attention_mask=np.ones((s["batch"], s["seq"]), dtype=np.int64))),
        "resnet_block: batch norm eps 1e-4 instead of 1e-5": variant("resnet_block", sizes=dict(eps=1e-4)),
    }


def hf_linear(warmup, total):
    """Hugging Face's get_linear_schedule_with_warmup multiplier."""
    return lambda s: s / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup))


def hf_cosine(warmup, total, min_lr, lr):
    """Hugging Face's get_cosine_with_min_lr_schedule_with_warmup multiplier (one half-cycle)."""
    rate = min_lr / lr

    def f(s):
        if s < warmup:
            return s / max(1, warmup)
        progress = (s - warmup) / max(1, total - warmup)
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, factor * (1 - rate) + rate)

    return f


def train(case, params, batches, changed=None, double=False):
    """Ten steps of one OPTIMIZERS case on the MLP, float32 (or float64), as a PyTorch training
    loop (with the optimizer arguments `changed`, for a variant)."""
    import torch
    import torch.nn.functional as F

    opt_name, opt_args, sched, max_norm, micro = OPTIMIZERS[case]
    opt_args = dict(opt_args, **(changed or {}))
    net = modules()["mlp"](**SIZES["mlp"])
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()}, strict=True)
    dtype = torch.float64 if double else torch.float32
    net = net.to(dtype)
    opt = getattr(torch.optim, opt_name)(net.parameters(), **opt_args)
    scheduler = None
    if sched is not None:
        kind = sched[0]
        if kind == "constant":
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        elif kind == "hf_linear":
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, hf_linear(**sched[1]))
        elif kind == "hf_cosine":
            scheduler = torch.optim.lr_scheduler.LambdaLR(opt, hf_cosine(**sched[1], lr=opt_args["lr"]))
        else:
            scheduler = getattr(torch.optim.lr_scheduler, kind)(opt, **sched[1])
    record = {"lr": [], "loss": [], "grad_norm": []}
    after = {}
    for k, batch in enumerate(batches):
        x, y = torch.from_numpy(batch["image"].copy()).to(dtype), torch.from_numpy(batch["label"].copy())
        opt.zero_grad()
        total = 0.0
        for xc, yc in zip(x.chunk(micro), y.chunk(micro)):
            loss = F.cross_entropy(net(image=xc), yc) / micro
            loss.backward()
            total += loss.item()
        record["loss"].append(total)
        if max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
            record["grad_norm"].append(norm.item())
        record["lr"].append(opt.param_groups[0]["lr"])
        opt.step()
        if scheduler is not None:
            scheduler.step()
        if k + 1 in (1, STEPS):
            after[k + 1] = {n: p.detach().numpy().copy() for n, p in net.named_parameters()}
    return record, after


def optimizer_variants(params, batches, golden):
    """How far a plausible mistake moves the parameters after 10 steps, in the test's measure
    (per tensor max |Δ| / max |golden|, the worst)."""
    import numpy as np

    def variant(case, **changed):
        _, after = train(case, params, batches, changed)
        want = golden[case]
        return max(float(np.abs(after[STEPS][k] - w).max() / max(np.abs(w).max(), 1e-6))
                   for k, w in want.items())

    return {
        "adam: eps 1e-7 instead of 1e-8": variant("adam", eps=1e-7),
        "sgd_momentum: no dampening instead of 0.1": variant("sgd_momentum", dampening=0.0),
        "rmsprop_centered: not centered": variant("rmsprop_centered", centered=False),
    }


def git_state():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "compiler", "models", "Cargo.lock"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        return commit, bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        return None, None


def main():
    import numpy as np
    import safetensors
    import torch
    import torch.nn.functional as F
    from safetensors.numpy import save_file

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()), flush=True)
    check_versions(versions, REQUIREMENTS)
    # One thread and deterministic kernels: the float32 results do not depend on the machine's
    # core count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    with tempfile.TemporaryDirectory(prefix="kiln-golden-") as tmp:
        params = kiln_parameters(tmp)
    randomized = randomize_norms(params)
    inputs, batches = make_inputs()
    bn_err = check_batch_norm()
    classes = modules()
    OUT_DIR.mkdir(exist_ok=True)
    diagnostics = {"eval_batch_norm_vs_nn_batchnorm2d": bn_err}
    golden = {}
    written = []

    for model in SIZES:
        p, x = params[model], inputs[model]
        loss, grads = gradients(model, classes[model], p, x, double=False)
        loss64, grads64 = gradients(model, classes[model], p, x, double=True)
        out = {f"param.{k}": v for k, v in p.items()}
        out.update({f"input.{k}": v for k, v in x.items()})
        out["loss"] = loss.numpy().astype(np.float32).reshape(())
        out["loss64"] = loss64.numpy().astype(np.float64).reshape(())
        out.update({f"grad.{k}": g.numpy() for k, g in grads.items()})
        out.update({f"grad64.{k}": g.numpy() for k, g in grads64.items()})
        golden[model] = grads
        noise = scaled_error(grads, grads64)
        diagnostics[f"{model}.max_scaled_error_torch_f32_vs_f64"] = noise
        print(f"{model}: loss {loss.item():.6f}, torch f32 vs f64 gradients: {noise:.2e}", flush=True)
        if model == "mlp":
            for case, (eps, ignore, labels) in CROSS_ENTROPY.items():
                xc = dict(x, label=np.array(labels, dtype=np.int64))
                for double in (False, True):
                    net = classes[model](**SIZES[model])
                    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in p.items()}, strict=True)
                    dtype = torch.float64 if double else torch.float32
                    net = net.to(dtype)
                    logits = net(image=torch.from_numpy(xc["image"]).to(dtype))
                    loss = F.cross_entropy(logits, torch.from_numpy(xc["label"]), label_smoothing=eps,
                                           ignore_index=ignore)
                    loss.backward()
                    suffix = "64" if double else ""
                    out[f"{case}.loss{suffix}"] = loss.detach().numpy().reshape(())
                    out.update({f"{case}.grad{suffix}.{k}": q.grad.numpy() for k, q in net.named_parameters()})
                out.update({f"{case}.input.{k}": v for k, v in xc.items()})
        path = OUT_DIR / f"{model}.safetensors"
        save_file(out, str(path))
        written.append(path)

    diagnostics["gradients_variant_vs_golden"] = variants = gradient_variants(classes, params, inputs, golden)
    for k, e in variants.items():
        print(f"{k}: {e:.2e} from the golden gradients", flush=True)

    out = {f"param.{k}": v for k, v in params["mlp"].items()}
    for k, batch in enumerate(batches):
        out.update({f"input.{k}.{n}": v for n, v in batch.items()})
    trained = {}
    for case in OPTIMIZERS:
        record, after = train(case, params["mlp"], batches)
        trained[case] = after[STEPS]
        record64, after64 = train(case, params["mlp"], batches, double=True)
        out[f"{case}.f64.loss"] = np.array(record64["loss"], dtype=np.float64)
        if record64["grad_norm"]:
            out[f"{case}.f64.grad_norm"] = np.array(record64["grad_norm"], dtype=np.float64)
        for step, values in after64.items():
            out.update({f"{case}.f64.after{step}.{n}": v for n, v in values.items()})
        out[f"{case}.lr"] = np.array(record["lr"], dtype=np.float64)
        out[f"{case}.loss"] = np.array(record["loss"], dtype=np.float32)
        if record["grad_norm"]:
            out[f"{case}.grad_norm"] = np.array(record["grad_norm"], dtype=np.float64)
        for step, values in after.items():
            out.update({f"{case}.after{step}.{n}": v for n, v in values.items()})
        clipped = sum(n > OPTIMIZERS[case][3] for n in record["grad_norm"]) if record["grad_norm"] else None
        print(f"{case}: lr {['%.4g' % v for v in record['lr']]}, loss {record['loss'][0]:.4f} → "
              f"{record['loss'][-1]:.4f}" + (f", clipped {clipped}/{STEPS}" if clipped is not None else ""),
              flush=True)
    diagnostics["parameters_after_10_steps_variant_vs_golden"] = variants = optimizer_variants(
        params["mlp"], batches, trained)
    for k, e in variants.items():
        print(f"{k}: {e:.2e} from the golden parameters after {STEPS} steps", flush=True)
    path = OUT_DIR / "optimizers.safetensors"
    save_file(out, str(path))
    written.append(path)

    commit, dirty = git_state()
    meta = {
        "description": "PyTorch gradients and torch.optim steps for compiler/lower/tests/pytorch.rs; "
        "see tests/golden/README.md",
        "kiln_git_commit": commit,
        "kiln_worktree_dirty": dirty,
        "kiln_parameters": "cargo test -p kiln-lower --test pytorch -- --ignored --exact "
        "write_kiln_parameters (seed 0)",
        "sizes": SIZES,
        "losses": LOSSES,
        "cross_entropy": {k: dict(label_smoothing=e, ignore_index=i, labels=l)
                          for k, (e, i, l) in CROSS_ENTROPY.items()},
        "optimizers": {k: dict(optimizer=o, args=a, scheduler=s, clip_grad_norm=c, micro_batches=m)
                       for k, (o, a, s, c, m) in OPTIMIZERS.items()},
        "input_seed": INPUT_SEED,
        "norm_seed": NORM_SEED,
        "norm_parameters_randomized": randomized,
        "torch_num_threads": torch.get_num_threads(),
        "versions": versions,
        "platform": platform.platform(),
        "diagnostics": diagnostics,
        "files": {p.name: p.stat().st_size for p in written},
    }
    (OUT_DIR / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    for p in written + [OUT_DIR / "meta.json"]:
        print(f"wrote {p.relative_to(REPO)} ({p.stat().st_size} bytes)")


if __name__ == "__main__":
    run_pinned(main, __file__, REQUIREMENTS)
