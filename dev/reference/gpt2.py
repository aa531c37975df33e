#!/usr/bin/python3
"""PyTorch reference GPT-2 (DESIGN section 2), the model every C result is tested against.

Written from the formulas, not from the C code: learned token and position embeddings, pre-LayerNorm blocks,
causal multi-head attention, GELU (tanh) MLP of ratio 4, final LayerNorm, LM head tied to the (padded) token
embedding; loss = mean cross-entropy over the first vocab_size logits. Parameters live in a plain dict keyed by
DESIGN's tensor names (`wte`, `h.0.attn_qkv.W`, ...), so checkpoints load and save as they are. Every tensor op
follows the parameters' dtype: float32 for fixtures, float64 for finite-difference checks.

AdamW, the learning-rate schedule and gradient clipping are written out (not torch.optim) so the formulas that
the C trainer must match are on the page.

CLI:  gpt2.py --logits MODEL INPUTS OUT
    MODEL   a model.safetensors (or a checkpoint directory holding one), config from its "config" metadata
    INPUTS  a safetensors file with "inputs" I32 (B, T) and optionally "targets" I32 (B, T)
    OUT     written: "logits" F32 (B, T, vocab_size) and, with targets, "loss" F32 (1,)
"""
import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from safetensors_io import read_safetensors, write_safetensors  # noqa: E402

LINEARS = ("attn_qkv", "attn_proj", "mlp_fc", "mlp_proj")
LN_EPS = 1e-5

# DESIGN section 4 defaults for the keys the reference reads; a given config overrides them key by key
# within each section (model.linear is replaced whole, like every other value).
DEFAULT_CONFIG = {
    "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024,
              "vocab_size": 50257, "padded_vocab_size": 50304,
              "qk_norm": False, "attn_scale": "standard", "parametrization": "standard", "base_width": 768,
              "linear": {"default": {"type": "dense"}},
              "moe": {"aux_weight": 0.01, "z_weight": 0.1}},
    "optim": {"lr": 6e-4, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0},
    "schedule": {"type": "cosine", "warmup_steps": 700, "final_lr_frac": 0.0},
    "train": {"micro_batch": 16, "seq_len": 1024, "batch_tokens": 524288, "max_steps": 18865, "seed": 1337},
}


def resolve_config(cfg):
    """The config with DESIGN defaults filled in for absent keys (sections other than the four above pass as given)."""
    out = {k: dict(v) for k, v in DEFAULT_CONFIG.items()}
    for section, values in cfg.items():
        out[section] = {**out.get(section, {}), **values}
    return out


# ----------------------------------------------------------------------------------------------------------------
# linear layers

def linear_spec(cfg, name):
    """The spec of projection `name`: its own entry under model.linear, else model.linear.default."""
    lin = cfg["model"]["linear"]
    return lin.get(name, lin.get("default", {"type": "dense"}))


def linear_dims(cfg, name):
    """(d_in, d_out) of a block's projection (DESIGN section 2 table)."""
    C = cfg["model"]["n_embd"]
    return {"attn_qkv": (C, 3 * C), "attn_proj": (C, C), "mlp_fc": (C, 4 * C), "mlp_proj": (4 * C, C)}[name]


def linear_shapes(spec, d_in, d_out):
    """{suffix: shape} of one linear layer's parameters."""
    if spec["type"] == "dense":
        return {"W": (d_out, d_in), "b": (d_out,)}
    raise NotImplementedError(f"linear type {spec['type']!r} is not in the reference yet")


def linear(spec, params, prefix, x):
    """y = W x + b over the last axis of x (..., d_in) -> (..., d_out); weights named prefix.W, prefix.b."""
    if spec["type"] == "dense":
        # W: (d_out, d_in), as llm.c
        return torch.einsum("...i,oi->...o", x, params[prefix + ".W"]) + params[prefix + ".b"]
    raise NotImplementedError(f"{prefix}: linear type {spec['type']!r} is not in the reference yet")


# ----------------------------------------------------------------------------------------------------------------
# the model

def param_shapes(cfg):
    """{name: shape} of every parameter, in checkpoint order."""
    m = cfg["model"]
    C, hs = m["n_embd"], m["n_embd"] // m["n_head"]
    shapes = {"wte": (m["padded_vocab_size"], C), "wpe": (m["block_size"], C)}
    for i in range(m["n_layer"]):
        p = f"h.{i}."
        shapes.update({p + "ln1.w": (C,), p + "ln1.b": (C,)})
        if m["qk_norm"]:
            # one LayerNorm over the head dimension for q and one for k, shared by all heads
            shapes.update({p + "qk_norm.q.w": (hs,), p + "qk_norm.q.b": (hs,),
                           p + "qk_norm.k.w": (hs,), p + "qk_norm.k.b": (hs,)})
        for name in ("attn_qkv", "attn_proj"):
            for suffix, shape in linear_shapes(linear_spec(cfg, name), *linear_dims(cfg, name)).items():
                shapes[f"{p}{name}.{suffix}"] = shape
        shapes.update({p + "ln2.w": (C,), p + "ln2.b": (C,)})
        for name in ("mlp_fc", "mlp_proj"):
            for suffix, shape in linear_shapes(linear_spec(cfg, name), *linear_dims(cfg, name)).items():
                shapes[f"{p}{name}.{suffix}"] = shape
    shapes.update({"lnf.w": (C,), "lnf.b": (C,)})
    return shapes


def layernorm(x, w, b):
    """LayerNorm over the last axis with the biased variance, as GPT-2: (x - mean) / sqrt(var + 1e-5) * w + b."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + LN_EPS) * w + b


def gelu(x):
    """GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def attention(qkv, params, prefix, cfg):
    """Causal multi-head attention. qkv (B, T, 3C) holds [q | k | v], head h at columns h*hs..(h+1)*hs of
    each; returns (B, T, C) with the heads concatenated the same way."""
    m = cfg["model"]
    B, T, C3 = qkv.shape
    C, NH = C3 // 3, m["n_head"]
    hs = C // NH
    q, k, v = (t.reshape(B, T, NH, hs) for t in qkv.split(C, dim=-1))
    if m["qk_norm"]:
        q = layernorm(q, params[prefix + ".qk_norm.q.w"], params[prefix + ".qk_norm.q.b"])
        k = layernorm(k, params[prefix + ".qk_norm.k.w"], params[prefix + ".qk_norm.k.b"])
    scale = 8.0 / hs if m["attn_scale"] == "mup" else 1.0 / math.sqrt(hs)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale           # (B, NH, T, T): query t, key s
    future = torch.ones(T, T, dtype=torch.bool).triu(1)               # s > t
    att = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, C)


def forward(params, cfg, inputs):
    """inputs (B, T) token ids -> logits (B, T, padded_vocab_size)."""
    m = cfg["model"]
    T = inputs.shape[1]
    x = params["wte"][inputs] + params["wpe"][:T]                     # (B, T, C)
    for i in range(m["n_layer"]):
        p = f"h.{i}"
        h = layernorm(x, params[p + ".ln1.w"], params[p + ".ln1.b"])
        qkv = linear(linear_spec(cfg, "attn_qkv"), params, p + ".attn_qkv", h)
        x = x + linear(linear_spec(cfg, "attn_proj"), params, p + ".attn_proj", attention(qkv, params, p, cfg))
        h = layernorm(x, params[p + ".ln2.w"], params[p + ".ln2.b"])
        h = gelu(linear(linear_spec(cfg, "mlp_fc"), params, p + ".mlp_fc", h))   # (B, T, 4C)
        x = x + linear(linear_spec(cfg, "mlp_proj"), params, p + ".mlp_proj", h)
    x = layernorm(x, params["lnf.w"], params["lnf.b"])
    return torch.einsum("btc,vc->btv", x, params["wte"])             # tied LM head over the padded vocab


def cross_entropy(logits, targets, vocab_size):
    """Mean over B*T of logsumexp(logits[:V]) - logits[target]; the padded columns take no part."""
    z = logits[..., :vocab_size]
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(z, dim=-1) - picked).mean()


def loss_and_grads(params, cfg, inputs, targets):
    """(loss scalar, {name: gradient}) at the given parameters; params itself is left untouched."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    loss = cross_entropy(forward(leaves, cfg, inputs), targets, cfg["model"]["vocab_size"])
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss.detach(), dict(zip(leaves.keys(), grads))


# ----------------------------------------------------------------------------------------------------------------
# optimization

def lr_at_step(cfg, step):
    """Learning rate of 0-based step: linear warmup to lr over warmup_steps, then cosine / linear / constant
    from lr to lr*final_lr_frac over the remaining max_steps - warmup_steps."""
    L, s = cfg["optim"]["lr"], cfg["schedule"]
    W, S = s["warmup_steps"], cfg["train"]["max_steps"]
    if step < W:
        return L * (step + 1) / W
    Lmin = L * s["final_lr_frac"]
    r = min(1.0, max(0.0, (step - W) / max(1, S - W)))
    if s["type"] == "cosine":
        return Lmin + 0.5 * (1.0 + math.cos(math.pi * r)) * (L - Lmin)
    if s["type"] == "linear":
        return L - (L - Lmin) * r
    if s["type"] == "constant":
        return L
    raise ValueError(f"schedule.type {s['type']!r}: expected cosine, linear or constant")


def clip_grad_norm(grads, clip):
    """Scale all gradients in place by clip/norm when the global norm sqrt(sum of all g^2) exceeds clip;
    returns the norm before clipping."""
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads.values()))
    if norm > clip:
        for g in grads.values():
            g.mul_(clip / norm)
    return norm


def decays(p):
    """Weight decay applies to matrices and cores (2-D and up: wte, wpe, every W), never to biases or LayerNorm."""
    return p.dim() >= 2


def adamw_update(params, grads, m, v, step, lr, optim):
    """One AdamW step in place, t = step + 1:
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  mhat = m/(1-b1^t);  vhat = v/(1-b2^t)
    p -= lr * (mhat / (sqrt(vhat) + eps) + wd p)"""
    b1, b2, eps, t = optim["beta1"], optim["beta2"], optim["eps"], step + 1
    with torch.no_grad():
        for name, p in params.items():
            g = grads[name]
            m[name] = b1 * m[name] + (1.0 - b1) * g
            v[name] = b2 * v[name] + (1.0 - b2) * g * g
            mhat = m[name] / (1.0 - b1 ** t)
            vhat = v[name] / (1.0 - b2 ** t)
            wd = optim["weight_decay"] if decays(p) else 0.0
            p -= lr * (mhat / (torch.sqrt(vhat) + eps) + wd * p)


def train_steps(params, batch, cfg, n):
    """n AdamW steps (fresh moments, steps 0..n-1 of the schedule) on one batch (inputs, targets), updating
    params in place; returns the losses, each measured before its update, as a (n,) tensor."""
    if cfg["model"]["parametrization"] != "standard":
        raise NotImplementedError("mup learning-rate multipliers are not in the reference yet")
    inputs, targets = batch
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    losses = []
    for step in range(n):
        loss, grads = loss_and_grads(params, cfg, inputs, targets)
        losses.append(loss)
        clip_grad_norm(grads, cfg["optim"]["grad_clip"])
        adamw_update(params, grads, m, v, step, lr_at_step(cfg, step), cfg["optim"])
    return torch.stack(losses)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints and the CLI

def load_model(path):
    """A model.safetensors (or a checkpoint directory holding one) -> (params, resolved config).
    Every parameter the config implies must be present with its shape."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    tensors, meta = read_safetensors(path)
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in __metadata__")
    cfg = resolve_config(json.loads(meta["config"]))
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name not in tensors:
            raise ValueError(f"{path}: tensor {name} missing")
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != torch.float32:
            raise ValueError(f"{path}: tensor {name}: {tensors[name].dtype} {tuple(tensors[name].shape)}, "
                             f"expected float32 {shape}")
        params[name] = tensors[name]
    return params, cfg


def main():
    ap = argparse.ArgumentParser(description="PyTorch reference GPT-2")
    ap.add_argument("--logits", nargs=3, metavar=("MODEL", "INPUTS", "OUT"), required=True,
                    help="write the logits (and loss, given targets) of MODEL on INPUTS to OUT")
    args = ap.parse_args()
    model_path, inputs_path, out_path = args.logits
    torch.set_num_threads(1)
    params, cfg = load_model(model_path)
    batch, _ = read_safetensors(inputs_path)
    if "inputs" not in batch:
        sys.exit(f"{inputs_path}: no tensor 'inputs'")
    inputs = batch["inputs"].long()
    V = cfg["model"]["vocab_size"]
    with torch.no_grad():
        logits = forward(params, cfg, inputs)
    out = {"logits": logits[..., :V].contiguous()}
    if "targets" in batch:
        out["loss"] = cross_entropy(logits, batch["targets"].long(), V).reshape(1)
    write_safetensors(out_path, out, {"config": json.dumps(cfg)})
    print(f"{out_path}: logits {tuple(out['logits'].shape)}" +
          (f", loss {out['loss'].item():.6f}" if "loss" in out else ""))


if __name__ == "__main__":
    main()
