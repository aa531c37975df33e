#!/usr/bin/python3
"""PyTorch reference GPT-2 (DESIGN section 2), the model every C result is tested against.

Written from the formulas, not from the C code: learned token and position embeddings, pre-LayerNorm blocks,
causal multi-head attention, GELU (tanh) MLP of ratio 4, final LayerNorm, LM head tied to the (padded) token
embedding; loss = mean cross-entropy over the first vocab_size logits (plus the MoE aux losses, see model_loss).
Each of a block's four linear layers is one of DESIGN section 3's structures (dense, blockdiag, lowrank,
monarch, btt, btt_moe), each written with einsum from DESIGN's index formulas; btt_moe computes all experts and
masks them with the gates, as the papers' code does. Init standard deviations and AdamW lr multipliers
(standard and mup) are in init_and_lr, the per-parameter learning rates in lr_multipliers. Parameters live in a plain dict keyed by
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
# linear layers (DESIGN section 3): each y = S(x) + b with S one of the structures below

STRUCTURE_TYPES = ("dense", "blockdiag", "lowrank", "monarch", "btt", "btt_moe")
RESIDUAL = ("attn_proj", "mlp_proj")        # the projections GPT-2 scales at init (writes into the residual stream)
RMS_EPS = 1e-8


def linear_spec(cfg, name):
    """The spec of projection `name`: its own entry under model.linear, else model.linear.default."""
    lin = cfg["model"]["linear"]
    return lin.get(name, lin.get("default", {"type": "dense"}))


def linear_dims(cfg, name):
    """(d_in, d_out) of a block's projection (DESIGN section 2 table)."""
    C = cfg["model"]["n_embd"]
    return {"attn_qkv": (C, 3 * C), "attn_proj": (C, C), "mlp_fc": (C, 4 * C), "mlp_proj": (4 * C, C)}[name]


def square_split(n):
    """(small, large) with small * large = n, small <= large, small the largest divisor of n not above sqrt(n):
    the closest-to-square factorization of DESIGN 3.3 (768 -> 24*32, 3072 -> 48*64, 2304 -> 48*48)."""
    small = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return small, n // small


def resolve_linear(spec, d_in, d_out, parametrization="standard"):
    """The spec with every default filled in, and the shapes that follow from it (DESIGN 3, contract B):
    {"type", "d_in", "d_out", "cores": [(nb, q, p)] (core c: nb blocks each p -> q, stored (nb, q, p)),
     "fans": [(fan_in, fan_out)] per core (btt_moe: those of one expert), "mup_sigma": [..] per core,
     "rms_cap": bool, and per type "blocks" / "rank", "m1", "m0", "n0", "n1" / "experts", "top_k"}.
    Raises ValueError when the shapes do not factor."""
    t = spec.get("type", "dense")
    if t not in STRUCTURE_TYPES:
        raise ValueError(f"linear type {t!r}: expected one of {', '.join(STRUCTURE_TYPES)}")
    st = {"type": t, "d_in": d_in, "d_out": d_out}

    def need(cond, what):
        if not cond:
            raise ValueError(f"{t} {d_in} -> {d_out}: {what}")

    if t == "dense":
        st["cores"] = [(1, d_out, d_in)]
    elif t in ("blockdiag", "monarch"):
        b = spec.get("blocks", 4)
        need(d_in % b == 0 and d_out % b == 0, f"blocks {b} must divide d_in and d_out")
        st["blocks"] = b
        if t == "blockdiag":
            st["cores"] = [(b, d_out // b, d_in // b)]
        else:
            q = min(d_in, d_out) // b                                 # middle width m = min(d_in, d_out) = b*q
            st["cores"] = [(b, q, d_in // b), (b, d_out // b, q)]
    else:
        if t == "lowrank":
            r = spec.get("rank", min(d_in, d_out) // 4)
            need(1 <= r <= min(d_in, d_out), f"rank {r} must be in [1, min(d_in, d_out)]")
            m1, n0 = 1, 1
        else:
            m1 = spec.get("in_blocks", square_split(d_in)[1])
            n0 = spec.get("out_blocks", square_split(d_out)[0])
            need(d_in % m1 == 0 and d_out % n0 == 0, f"in_blocks {m1} | d_in and out_blocks {n0} | d_out")
            r = spec.get("rank", 1)
        if t == "btt_moe":
            E = spec.get("experts", 8)
            k = spec.get("top_k", min(2, E))
            need(1 <= k <= E, f"top_k {k} must be in [1, experts {E}]")
            st.update(experts=E, top_k=k)
            r = E                                                     # the experts are the rank slices
        m0, n1 = d_in // m1, d_out // n0
        st.update(rank=r, m1=m1, m0=m0, n0=n0, n1=n1)
        st["cores"] = [(m1, n0 * r, m0), (n0, n1, m1 * r)]
    if t == "btt_moe":
        st["fans"] = [(st["m0"], st["n0"]), (st["m1"], st["n1"])]    # one expert: the rank-1 BTT
    else:
        st["fans"] = [(p, q) for _, q, p in st["cores"]]
    st["mup_sigma"] = [min(1.0, math.sqrt(fo / fi)) / math.sqrt(fi) for fi, fo in st["fans"]]
    wn = spec.get("weight_norm")
    if wn is None:
        wn = "rms_cap" if parametrization == "mup" and t in ("btt", "btt_moe") else "none"
    if wn not in ("none", "rms_cap"):
        raise ValueError(f"weight_norm {wn!r}: expected none or rms_cap")
    st["rms_cap"] = wn == "rms_cap"
    return st


def core_names(st):
    """Tensor suffixes of the cores: W for the one-core types, W0 and W1 for the two-core ones."""
    return ["W"] if len(st["cores"]) == 1 else ["W0", "W1"]


def structure_shapes(st):
    """{suffix: shape} of a resolved layer, in checkpoint order W | W0, W1, G, gamma0, gamma1, b (DESIGN 5)."""
    if st["type"] == "dense":
        shapes = {"W": (st["d_out"], st["d_in"])}                   # llm.c's 2-D (d_out, d_in)
    else:
        shapes = dict(zip(core_names(st), st["cores"]))
    if st["type"] == "btt_moe":
        shapes["G"] = (st["experts"], st["d_in"])
    if st["rms_cap"]:
        shapes.update({f"gamma{c}": (1,) for c in range(len(st["cores"]))})
    shapes["b"] = (st["d_out"],)
    return shapes


def linear_shapes(spec, d_in, d_out, parametrization="standard"):
    """{suffix: shape} of one linear layer's parameters."""
    return structure_shapes(resolve_linear(spec, d_in, d_out, parametrization))


def init_and_lr(st, which, n_layer, n_embd, base_width=768, parametrization="standard"):
    """Initial standard deviation and AdamW lr multiplier of each core, and the router's lr multiplier
    (contract B): {"init_std": [..], "lr_mult": [..], "router_lr_mult": x}.
    standard: the dense std s_d = 0.02 (residual projections 0.02/sqrt(2 n_layer)); one core: s_d sqrt(d_in/p0),
      two cores: (s_d^2 d_in / (p0 p1))^(1/4) each, p_c the cores' fan-ins; so that the product's output variance
      is the dense layer's. Multipliers 1.
    mup: the core's mup sigma, the last core of a residual projection 0; lr multiplier
      (base_width / n_embd) (d_in / fan_in_c) / ncores, the router's base_width / n_embd.
    The router starts at 0 in both; router_lr_mult is 0 for the types without a router."""
    ncores, d_in = len(st["cores"]), st["d_in"]
    fan_in = [fi for fi, _ in st["fans"]]
    residual, has_router = which in RESIDUAL, st["type"] == "btt_moe"
    if parametrization == "standard":
        s_d = 0.02 / math.sqrt(2 * n_layer) if residual else 0.02
        if ncores == 1:
            std = [s_d * math.sqrt(d_in / fan_in[0])]
        else:
            std = [(s_d ** 2 * d_in / (fan_in[0] * fan_in[1])) ** 0.25] * 2
        return {"init_std": std, "lr_mult": [1.0] * ncores, "router_lr_mult": 1.0 if has_router else 0.0}
    if parametrization != "mup":
        raise ValueError(f"parametrization {parametrization!r}: expected standard or mup")
    width = base_width / n_embd
    std = list(st["mup_sigma"])
    if residual:
        std[-1] = 0.0
    return {"init_std": std, "lr_mult": [width * d_in / fi / ncores for fi in fan_in],
            "router_lr_mult": width if has_router else 0.0}


def init_linear(st, rule, gen, dtype=torch.float32):
    """Initial parameters of one layer {suffix: tensor}: cores N(0, init_std^2) (rule from init_and_lr), router 0,
    gamma 1, bias 0."""
    params = {}
    for suffix, shape in structure_shapes(st).items():
        if suffix in ("W", "W0", "W1"):
            std = rule["init_std"][1 if suffix == "W1" else 0]
            params[suffix] = (std * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)
        elif suffix.startswith("gamma"):
            params[suffix] = torch.ones(shape, dtype=dtype)
        else:
            params[suffix] = torch.zeros(shape, dtype=dtype)
    return params


def capped(W, gamma, sigma):
    """rms_cap (DESIGN 3.7): gamma W / max(1, RMS(W)/sigma), RMS over the whole core; autograd differentiates
    through RMS where the cap binds."""
    rms = torch.sqrt((W * W).mean() + RMS_EPS)
    return gamma * W / torch.clamp(rms / sigma, min=1.0)


def btt_apply(x, W0, W1, st, gates=None):
    """The BTT of DESIGN 3.3 on x (N, d_in) -> (N, d_out), index for index:
    z[n, i1, j0, a] = sum_i0 W0[i1, (j0 a), i0] x[n, (i1 i0)]; optionally z *= gates[n, a] (btt_moe);
    y[n, (j0 j1)] = sum_(i1 a) W1[j0, j1, (i1 a)] z'[n, j0, (i1 a)] with z'[n, j0, (i1 a)] = z[n, i1, (j0 a)]."""
    m1, m0, n0, n1, r = st["m1"], st["m0"], st["n0"], st["n1"], st["rank"]
    N = x.shape[0]
    z = torch.einsum("nim,ijam->nija", x.reshape(N, m1, m0), W0.reshape(m1, n0, r, m0))
    if gates is not None:
        z = z * gates[:, None, None, :]
    return torch.einsum("nija,jkia->njk", z, W1.reshape(n0, n1, m1, r)).reshape(N, n0 * n1)


def monarch_apply(x, W0, W1, st):
    """Monarch (DESIGN 3.4) on x (N, d_in): u = R x blockwise; u viewed (q, b) transposed to (b, q);
    v = L u' blockwise; y = v viewed (b, d_out/b) transposed to (d_out/b, b)."""
    b, (_, q, p), (_, s, _) = st["blocks"], st["cores"][0], st["cores"][1]
    N = x.shape[0]
    u = torch.einsum("nip,icp->nic", x.reshape(N, b, p), W0)           # (N, b, q): flat index (i c)
    u = u.reshape(N, q, b).transpose(1, 2)                             # u'[n, l, c] = u[n, (c l)]
    v = torch.einsum("nlc,lsc->nls", u, W1)                            # (N, b, s)
    return v.transpose(1, 2).reshape(N, s * b)                         # y[n, (s l)] = v[n, (l s)]


def route(logits, k):
    """Top-k routing (DESIGN 3.6) of logits (N, E): (selected (N, k) expert ids, highest first, ties to the lower
    index (a stable sort); gates (N, E), the softmax over the selected logits, 0 elsewhere)."""
    selected = torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices[:, :k]
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter(1, selected, True)
    gates = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return selected, gates


def moe_aux_loss(logits, selected, z_weight):
    """Auxiliary loss of one MoE layer: E sum_e P_e f_e + z_weight mean_n logsumexp(logits_n)^2, P_e the mean
    over tokens of the full softmax, f_e the fraction of routed (token, slot) pairs that go to e (a count,
    not differentiated)."""
    N, E = logits.shape
    P = torch.softmax(logits, dim=-1).mean(0)
    f = torch.zeros(E, dtype=logits.dtype).index_add_(
        0, selected.reshape(-1), torch.ones(selected.numel(), dtype=logits.dtype)) / selected.numel()
    return E * (P * f).sum() + z_weight * (torch.logsumexp(logits, dim=-1) ** 2).mean()


def structure_apply(st, p, x, moe=None):
    """S(x) + b for x (N, d_in); p maps suffixes (W, W0, W1, G, gamma0, gamma1, b) to tensors. For btt_moe, moe is
    a dict with "z_weight" and a list "aux" to which the layer's aux loss is appended (with "routes" present,
    (logits, selected, gates) too). All E experts are computed and masked by the gates: the papers' way."""
    names = core_names(st)
    cores = [p[nm] for nm in names]
    if st["rms_cap"]:
        cores = [capped(W, p[f"gamma{c}"], st["mup_sigma"][c]) for c, W in enumerate(cores)]
    t = st["type"]
    if t == "dense":
        y = torch.einsum("ni,oi->no", x, cores[0])
    elif t == "blockdiag":
        b, q, pp = st["cores"][0]
        y = torch.einsum("nbp,bqp->nbq", x.reshape(x.shape[0], b, pp), cores[0]).reshape(x.shape[0], b * q)
    elif t == "monarch":
        y = monarch_apply(x, cores[0], cores[1], st)
    elif t in ("lowrank", "btt"):
        y = btt_apply(x, cores[0], cores[1], st)
    else:
        logits = torch.einsum("ni,ei->ne", x, p["G"])                  # (N, E)
        selected, gates = route(logits, st["top_k"])
        y = btt_apply(x, cores[0], cores[1], st, gates)
        if moe is not None:
            moe["aux"].append(moe_aux_loss(logits, selected, moe["z_weight"]))
            if "routes" in moe:
                moe["routes"].append((logits, selected, gates))
    return y + p["b"]


def linear(spec, params, prefix, x, parametrization="standard", moe=None):
    """y = S(x) + b over the last axis of x (..., d_in) -> (..., d_out); weights named prefix.W (or .W0, .W1, .G,
    .gamma0, .gamma1) and prefix.b. moe: see structure_apply."""
    d_in, d_out = x.shape[-1], params[prefix + ".b"].shape[0]
    st = resolve_linear(spec, d_in, d_out, parametrization)
    p = {s: params[f"{prefix}.{s}"] for s in structure_shapes(st)}
    y = structure_apply(st, p, x.reshape(-1, d_in), moe)
    return y.reshape(*x.shape[:-1], d_out)


# ----------------------------------------------------------------------------------------------------------------
# the model

def model_structure(cfg, name):
    """The resolved structure (resolve_linear) of projection `name` of every block."""
    return resolve_linear(linear_spec(cfg, name), *linear_dims(cfg, name), cfg["model"]["parametrization"])


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
            for suffix, shape in structure_shapes(model_structure(cfg, name)).items():
                shapes[f"{p}{name}.{suffix}"] = shape
        shapes.update({p + "ln2.w": (C,), p + "ln2.b": (C,)})
        for name in ("mlp_fc", "mlp_proj"):
            for suffix, shape in structure_shapes(model_structure(cfg, name)).items():
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


def forward(params, cfg, inputs, moe=None):
    """inputs (B, T) token ids -> logits (B, T, padded_vocab_size). moe: None, or a dict {"aux": []} to which
    every btt_moe layer appends its aux loss, in order block by block, attn_qkv, attn_proj, mlp_fc, mlp_proj
    (z_weight is taken from the config)."""
    m = cfg["model"]
    T = inputs.shape[1]
    if moe is not None:
        moe["z_weight"] = m["moe"]["z_weight"]

    def proj(name, i, h):
        return linear(linear_spec(cfg, name), params, f"h.{i}.{name}", h, m["parametrization"], moe)

    x = params["wte"][inputs] + params["wpe"][:T]                     # (B, T, C)
    for i in range(m["n_layer"]):
        p = f"h.{i}"
        h = layernorm(x, params[p + ".ln1.w"], params[p + ".ln1.b"])
        x = x + proj("attn_proj", i, attention(proj("attn_qkv", i, h), params, p, cfg))
        h = layernorm(x, params[p + ".ln2.w"], params[p + ".ln2.b"])
        x = x + proj("mlp_proj", i, gelu(proj("mlp_fc", i, h)))       # MLP hidden (B, T, 4C)
    x = layernorm(x, params["lnf.w"], params["lnf.b"])
    return torch.einsum("btc,vc->btv", x, params["wte"])             # tied LM head over the padded vocab


def cross_entropy(logits, targets, vocab_size):
    """Mean over B*T of logsumexp(logits[:V]) - logits[target]; the padded columns take no part."""
    z = logits[..., :vocab_size]
    picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (torch.logsumexp(z, dim=-1) - picked).mean()


def model_loss(params, cfg, inputs, targets, moe=None):
    """The training objective: cross-entropy + aux_weight * (mean over the btt_moe layers of their aux losses),
    just the cross-entropy without MoE layers. Returns (total, cross-entropy, [aux loss of each MoE layer]);
    moe as in forward (a fresh dict when None)."""
    moe = {"aux": []} if moe is None else moe
    moe.setdefault("aux", [])
    ce = cross_entropy(forward(params, cfg, inputs, moe), targets, cfg["model"]["vocab_size"])
    total = ce
    if moe["aux"]:
        total = ce + cfg["model"]["moe"]["aux_weight"] * torch.stack(moe["aux"]).mean()
    return total, ce, moe["aux"]


def moe_layer_names(cfg):
    """Names "<block>.<projection>" of the btt_moe layers, in the order forward reports their aux losses."""
    return [f"{i}.{name}" for i in range(cfg["model"]["n_layer"]) for name in LINEARS
            if linear_spec(cfg, name).get("type") == "btt_moe"]


def loss_and_grads(params, cfg, inputs, targets, moe=None):
    """(objective scalar, {name: gradient of the objective}) at the given parameters (see model_loss; without
    MoE layers the objective is the cross-entropy); params itself is left untouched. moe as in forward."""
    leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
    total, _, _ = model_loss(leaves, cfg, inputs, targets, moe)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return total.detach(), dict(zip(leaves.keys(), grads))


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


def decays(name):
    """Weight decay applies to matrices, cores and routers (wte, wpe, every W, W0, W1, G), never to biases,
    LayerNorm parameters or rms_cap's gamma (DESIGN 3.7, contract C)."""
    return name in ("wte", "wpe") or name.rsplit(".", 1)[-1] in ("W", "W0", "W1", "G")


def lr_multipliers(cfg):
    """{name: multiplier of the scheduled lr} for the parameters whose multiplier is not 1: under mup every core
    (W, W0, W1) gets its structure's lr_mult and every router (G) the router_lr_mult; vectors, embeddings and
    everything under standard take the base lr."""
    m = cfg["model"]
    if m["parametrization"] != "mup":
        return {}
    mults = {}
    for name in LINEARS:
        st = model_structure(cfg, name)
        rule = init_and_lr(st, name, m["n_layer"], m["n_embd"], m["base_width"], "mup")
        for i in range(m["n_layer"]):
            for c, core in enumerate(core_names(st)):
                mults[f"h.{i}.{name}.{core}"] = rule["lr_mult"][c]
            if st["type"] == "btt_moe":
                mults[f"h.{i}.{name}.G"] = rule["router_lr_mult"]
    return mults


def adamw_update(params, grads, m, v, step, lr, optim, lr_mults=None):
    """One AdamW step in place, t = step + 1, lr_p = lr * lr_mults.get(name, 1):
    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  mhat = m/(1-b1^t);  vhat = v/(1-b2^t)
    p -= lr_p * (mhat / (sqrt(vhat) + eps) + wd p)      (wd only where decays(name); scaled by lr_p like torch)"""
    b1, b2, eps, t = optim["beta1"], optim["beta2"], optim["eps"], step + 1
    lr_mults = lr_mults or {}
    with torch.no_grad():
        for name, p in params.items():
            g = grads[name]
            m[name] = b1 * m[name] + (1.0 - b1) * g
            v[name] = b2 * v[name] + (1.0 - b2) * g * g
            mhat = m[name] / (1.0 - b1 ** t)
            vhat = v[name] / (1.0 - b2 ** t)
            wd = optim["weight_decay"] if decays(name) else 0.0
            p -= lr * lr_mults.get(name, 1.0) * (mhat / (torch.sqrt(vhat) + eps) + wd * p)


def train_steps(params, batch, cfg, n, record=None):
    """n AdamW steps (fresh moments, steps 0..n-1 of the schedule, mup lr multipliers) on one batch
    (inputs, targets), updating params in place; returns the cross-entropy losses, each measured before its
    update, as a (n,) tensor. record: None, or a dict that receives per step "total" (the objective, which
    differs from the cross-entropy by the MoE aux term), "params" (the parameters the step's forward saw) and
    "routes" (each MoE layer's (logits, selected, gates))."""
    inputs, targets = batch
    m = {k: torch.zeros_like(p) for k, p in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    mults = lr_multipliers(cfg)
    losses = []
    for step in range(n):
        moe = {"aux": [], "routes": []}
        leaves = {k: p.detach().clone().requires_grad_(True) for k, p in params.items()}
        total, ce, _ = model_loss(leaves, cfg, inputs, targets, moe)
        grads = dict(zip(leaves.keys(), torch.autograd.grad(total, list(leaves.values()))))
        losses.append(ce.detach())
        if record is not None:
            record.setdefault("total", []).append(total.detach())
            record.setdefault("params", []).append({k: p.detach() for k, p in leaves.items()})
            record.setdefault("routes", []).append([tuple(t.detach() for t in r) for r in moe["routes"]])
        clip_grad_norm(grads, cfg["optim"]["grad_clip"])
        adamw_update(params, grads, m, v, step, lr_at_step(cfg, step), cfg["optim"], mults)
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
