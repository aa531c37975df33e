#!/usr/bin/python3
"""Write the fixtures the C tests compare against (contract D), all from the PyTorch reference (gpt2.py).

    dev/reference/make_fixtures.py [OUT_DIR]        (default test/fixtures)

Model fixtures, tiny model (L=2, NH=4, C=64, maxT=32, V=500 padded to 512), one batch B=4, T=32:
gpt2_<tag>.safetensors          every parameter by its DESIGN name, inputs/targets I32 (4,32), logits (4,32,500),
                                loss (1,) (the cross-entropy), grad.<name> (of the training objective: the
                                cross-entropy plus, with MoE layers, aux_weight * mean aux), steps.loss (10,) the
                                cross-entropy before each of 10 AdamW steps, final.<name> after them;
                                __metadata__ "config" = the JSON config used.
    tags: dense, blockdiag, lowrank, monarch, btt, mixed_mup, btt_moe (MODEL_TAGS below). btt_moe adds
    loss_ce (1,) (= loss), loss_total (1,) (the objective, what grad.* is the gradient of),
    aux.<block>.<projection> (1,) each MoE layer's aux loss, steps.loss_total (10,), and metadata
    "min_route_margin". mixed_mup adds metadata "rms_cap": {core: "above" | "below"} (its cap binds or not)
    and "zero_true_grad": [names] (qk_norm.k.b: its grad.* is rounding noise (~1e-9) and its final.* moved by
    Adam steps driven by that noise (~2e-4 here); check those only as |grad| < 1e-6 and |final - initial| <= the
    10 steps' summed lr, 6.4e-3, the size Adam's normalized steps stay within).
gpt2_dense_llmc_fp32.bin        the dense initial weights as an llm.c model file, version 3 (fp32)
gpt2_dense_llmc_bf16.bin        ... version 5 (bf16, round-to-nearest-even)
gpt2_dense_bf16_logits.safetensors  inputs, targets, logits (4,32,500) and loss of the bf16-rounded weights

Layer fixtures linear_<tag>.safetensors (LAYER_CASES below), one layer on N=16 tokens:
    x (N, d_in), the layer's parameters by suffix (W | W0, W1, G, gamma0, gamma1, b), y (N, d_out), dy (N, d_out),
    dx (N, d_in), grad.<suffix>: the gradients of L = sum(y * dy) (+ aux_weight * aux for btt_moe);
    btt_moe adds aux (1,) (E sum_e P_e f_e + z_weight mean_n lse(logits_n)^2), logits (N, E) = x G^T,
    gates (N, E) (0 where not selected), selected I32 (N, k) (highest logit first).
    metadata "config" = {"which", "n_embd", "n_layer", "base_width", "parametrization", "spec", "d_in", "d_out",
    "aux_weight", "z_weight"}, "structure" = the reference's resolved structure (JSON), and for rms_cap layers
    "rms_cap" = {core: "above" | "below"}.
structure_table.json           shapes, counts, init std and lr multipliers of every type for a table of layers.

Deterministic: a fixed generator, one thread and deterministic algorithms give the same bytes on every run.
"""
import copy
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt2  # noqa: E402
from safetensors_io import bf16_round, bf16_to_float, write_llmc_model, write_safetensors  # noqa: E402

SEED = 1337
STEPS = 10

# Same key structure as DESIGN section 4; the C tests build their model and optimizer from it.
CONFIG = {
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 64, "block_size": 32,
              "vocab_size": 500, "padded_vocab_size": 512,
              "qk_norm": False, "attn_scale": "standard", "parametrization": "standard", "base_width": 768,
              "linear": {"default": {"type": "dense"}},
              "moe": {"aux_weight": 0.01, "z_weight": 0.1}},
    "optim": {"lr": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1, "grad_clip": 1.0},
    "schedule": {"type": "cosine", "warmup_steps": 2, "final_lr_frac": 0.1},
    "train": {"micro_batch": 4, "seq_len": 32, "batch_tokens": 128, "max_steps": STEPS},
}


def tag_config(model_changes):
    """CONFIG with the given model keys replaced (model.linear whole)."""
    cfg = copy.deepcopy(CONFIG)
    cfg["model"].update(copy.deepcopy(model_changes))
    return cfg


# The structured model fixtures (contract D). btt: mlp_fc factored 64 = 4*16 and 256 = 8*32 instead of the
# default 8*8 and 16*16 (and m0 > m1, which the default never gives). mixed_mup: a different structure per
# projection under mup (base_width 256: lr multipliers 4x the width ratio of 1), attn_proj's btt takes rms_cap
# by default, mlp_proj's blockdiag by request. btt_moe: aux_weight and z_weight not at their defaults, so a
# reader that ignores the config's values, or swaps them, fails.
MODEL_TAGS = {
    "blockdiag": tag_config({"linear": {"default": {"type": "blockdiag", "blocks": 4}}}),
    "lowrank": tag_config({"linear": {"default": {"type": "lowrank"}}}),
    "monarch": tag_config({"linear": {"default": {"type": "monarch", "blocks": 4}}}),
    "btt": tag_config({"linear": {"default": {"type": "btt", "rank": 2},
                                  "mlp_fc": {"type": "btt", "rank": 2, "in_blocks": 4, "out_blocks": 8}}}),
    "mixed_mup": tag_config({"parametrization": "mup", "base_width": 128, "qk_norm": True, "attn_scale": "mup",
                             "linear": {"default": {"type": "dense"},
                                        "attn_qkv": {"type": "monarch", "blocks": 4},
                                        "attn_proj": {"type": "btt"},
                                        "mlp_fc": {"type": "lowrank"},
                                        "mlp_proj": {"type": "blockdiag", "blocks": 4, "weight_norm": "rms_cap"}}}),
    "btt_moe": tag_config({"linear": {"default": {"type": "btt_moe", "experts": 4, "top_k": 2}},
                           "moe": {"aux_weight": 0.05, "z_weight": 0.02}}),
}

DENSE_FILES = ("gpt2_dense.safetensors", "gpt2_dense_llmc_fp32.bin", "gpt2_dense_llmc_bf16.bin",
               "gpt2_dense_bf16_logits.safetensors")

# rms_cap cores are drawn this many mup sigmas wide, alternately (in parameter order), so that at the fixture's
# weights the cap binds on some cores (RMS/sigma ~ 1.6: gradients through RMS) and not on others (~0.6); at
# RMS/sigma = 1 exactly the two sides of the kink would disagree. RMS_MARGIN is how far from 1 every capped
# core must stay at every step of the fixture (checked).
RMS_WIDTH = (1.6, 0.6)
RMS_MARGIN = 0.05
# Router std per projection: the inputs of attn_qkv and mlp_fc are LayerNorm outputs (RMS ~1), those of
# attn_proj and mlp_proj ~0.05 in the fixture model; these give router logits of std ~4 in every layer.
# ROUTE_MARGIN: the least gap between the k-th and (k+1)-th logit of any token, relative to the RMS of its
# layer's logits, at every step (checked). fp32 implementations differ by ~1e-6 of the logits at the fixture's
# weights and ~1e-5 after 10 steps, so 1e-4 keeps every routing decision the same. Random routers put some
# of the 8 layers x 128 tokens x 10 steps near a tie (the least gap is ~1e-5..1e-4 for most seeds): the seed
# of the btt_moe fixture was chosen among 50 for its margin (2.4e-4).
ROUTER_STD = {"attn_qkv": 0.5, "attn_proj": 8.0, "mlp_fc": 0.5, "mlp_proj": 4.0}
ROUTE_MARGIN = 1e-4
MODEL_SEEDS = {"blockdiag": 1338, "lowrank": 1339, "monarch": 1340, "btt": 1341, "mixed_mup": 1342, "btt_moe": 1386}


def fixture_params(cfg, gen, dtype=torch.float32):
    """Random parameters of the dense fixture, in which every entry matters: matrices N(0, 0.02) (all rows of
    wte, the padded ones too, so weight decay on them shows), LayerNorm weights 1 + N(0, 0.1) (not all ones, so
    a swapped or dropped weight shows), biases N(0, 0.02) (not zero, for the same reason)."""
    params = {}
    for name, shape in gpt2.param_shapes(cfg).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        is_ln_weight = len(shape) == 1 and name.endswith(".w")
        params[name] = (1.0 + 0.1 * z if is_ln_weight else 0.02 * z).to(dtype)
    return params


def layer_param(st, rule, suffix, z, rms_width=None, router_std=1.0):
    """A standard-normal draw z scaled for one linear-layer parameter: cores by their init std (the mup sigma
    where the init is zero, so a residual core still matters), rms_cap cores rms_width mup sigmas instead;
    gamma 1 + 0.1 z; bias 0.02 z; router router_std z."""
    if suffix in ("W", "W0", "W1"):
        c = 1 if suffix == "W1" else 0
        if rms_width is not None:
            return rms_width * st["mup_sigma"][c] * z
        return (rule["init_std"][c] or st["mup_sigma"][c]) * z
    if suffix.startswith("gamma"):
        return 1.0 + 0.1 * z
    if suffix == "G":
        return router_std * z
    return 0.02 * z


def structured_params(cfg, gen, dtype=torch.float32):
    """Random parameters of a structured fixture: as fixture_params for embeddings, LayerNorm (qk_norm too) and
    biases; linear layers by layer_param. Returns (params, {capped core: RMS width})."""
    m = cfg["model"]
    rules = {name: (gpt2.model_structure(cfg, name),) for name in gpt2.LINEARS}
    rules = {name: (st, gpt2.init_and_lr(st, name, m["n_layer"], m["n_embd"], m["base_width"],
                                         m["parametrization"])) for name, (st,) in rules.items()}
    params, widths = {}, {}
    for name, shape in gpt2.param_shapes(cfg).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        parts = name.split(".")
        if len(parts) == 4 and parts[2] in gpt2.LINEARS:
            st, rule = rules[parts[2]]
            width = None
            if st["rms_cap"] and parts[3] in ("W", "W0", "W1"):
                width = widths[name] = RMS_WIDTH[len(widths) % 2]
            params[name] = layer_param(st, rule, parts[3], z, width, ROUTER_STD.get(parts[2], 1.0)).to(dtype)
        elif len(shape) == 1 and name.endswith(".w"):
            params[name] = (1.0 + 0.1 * z).to(dtype)
        else:
            params[name] = (0.02 * z).to(dtype)
    return params, widths


def fixture_batch(cfg, gen, B, T):
    """inputs, targets (B, T) int64: windows of T+1 random ids < vocab_size, targets the inputs shifted by one."""
    tokens = torch.randint(0, cfg["model"]["vocab_size"], (B, T + 1), generator=gen)
    return tokens[:, :T].contiguous(), tokens[:, 1:].contiguous()


def route_margin(logits, k):
    """Least gap over tokens between the k-th and (k+1)-th largest logit, relative to the RMS of the logits
    (inf when k = E: nothing to tie with)."""
    if k >= logits.shape[-1]:
        return math.inf
    top = torch.sort(logits, dim=-1, descending=True).values
    return (top[:, k - 1] - top[:, k]).min().item() / logits.double().pow(2).mean().sqrt().item()


def rms_ratio(W, sigma):
    return math.sqrt((W.double() ** 2).mean().item() + gpt2.RMS_EPS) / sigma


# ----------------------------------------------------------------------------------------------------------------
# model fixtures

def write_dense(out_dir):
    """The dense fixtures (unchanged since they were first committed: the C tests of the dense trainer)."""
    cfg = gpt2.resolve_config(CONFIG)
    V = cfg["model"]["vocab_size"]
    gen = torch.Generator().manual_seed(SEED)
    params = fixture_params(cfg, gen)
    inputs, targets = fixture_batch(cfg, gen, cfg["train"]["micro_batch"], cfg["train"]["seq_len"])

    with torch.no_grad():
        logits = gpt2.forward(params, cfg, inputs)[..., :V].contiguous()
    loss, grads = gpt2.loss_and_grads(params, cfg, inputs, targets)
    final = {k: p.clone() for k, p in params.items()}
    step_losses = gpt2.train_steps(final, (inputs, targets), cfg, STEPS)

    meta = {"config": json.dumps(CONFIG)}
    tensors = dict(params)
    tensors.update({"inputs": inputs.int(), "targets": targets.int(), "logits": logits, "loss": loss.reshape(1)})
    tensors.update({"grad." + k: g for k, g in grads.items()})
    tensors["steps.loss"] = step_losses
    tensors.update({"final." + k: p for k, p in final.items()})
    write_safetensors(os.path.join(out_dir, DENSE_FILES[0]), tensors, meta)

    write_llmc_model(os.path.join(out_dir, DENSE_FILES[1]), params, cfg, "fp32")
    write_llmc_model(os.path.join(out_dir, DENSE_FILES[2]), params, cfg, "bf16")

    # what a reader of the bf16 file holds: every weight rounded to bf16, computed in fp32
    params16 = {k: bf16_to_float(bf16_round(p)).reshape(p.shape) for k, p in params.items()}
    with torch.no_grad():
        logits16 = gpt2.forward(params16, cfg, inputs)
    loss16 = gpt2.cross_entropy(logits16, targets, V).reshape(1)
    write_safetensors(os.path.join(out_dir, DENSE_FILES[3]),
                      {"inputs": inputs.int(), "targets": targets.int(),
                       "logits": logits16[..., :V].contiguous(), "loss": loss16}, meta)
    return [os.path.join(out_dir, f) for f in DENSE_FILES]


def write_model(out_dir, tag, config):
    """gpt2_<tag>.safetensors: the dense fixture's layout for a structured config, its own seed per tag."""
    cfg = gpt2.resolve_config(config)
    m = cfg["model"]
    V = m["vocab_size"]
    gen = torch.Generator().manual_seed(MODEL_SEEDS[tag])
    params, widths = structured_params(cfg, gen)
    inputs, targets = fixture_batch(cfg, gen, cfg["train"]["micro_batch"], cfg["train"]["seq_len"])

    moe = {"aux": []}
    with torch.no_grad():
        total, ce, aux = gpt2.model_loss(params, cfg, inputs, targets, moe)
        logits = gpt2.forward(params, cfg, inputs)[..., :V].contiguous()
    _, grads = gpt2.loss_and_grads(params, cfg, inputs, targets)
    final = {k: p.clone() for k, p in params.items()}
    record = {}
    step_losses = gpt2.train_steps(final, (inputs, targets), cfg, STEPS, record)

    meta = {"config": json.dumps(config)}
    # Every step's forward (the first is the fixture's own) must be away from the kinks: routing ties and
    # RMS = sigma; otherwise a correct implementation could legitimately take the other branch.
    if widths:
        sigma = {name: gpt2.model_structure(cfg, name.split(".")[2])["mup_sigma"][1 if name.endswith("W1") else 0]
                 for name in widths}
        worst = min(abs(rms_ratio(p[name], sigma[name]) - 1) for p in record["params"] for name in widths)
        assert worst > RMS_MARGIN, f"{tag}: an rms_cap core comes within {worst:.3g} of its cap"
        meta["rms_cap"] = json.dumps({name: "above" if w > 1 else "below" for name, w in widths.items()})
    if m["qk_norm"]:
        # a bias shared by all keys shifts each query's scores by a constant, which softmax ignores: the true
        # gradient of qk_norm.k.b is 0, the computed one rounding noise (~1e-9 here) that Adam (eps 1e-8) turns
        # into implementation-dependent steps of up to ~2e-4 over the 10 steps
        meta["zero_true_grad"] = json.dumps([f"h.{i}.qk_norm.k.b" for i in range(m["n_layer"])])
    tensors = dict(params)
    tensors.update({"inputs": inputs.int(), "targets": targets.int(), "logits": logits, "loss": ce.reshape(1)})
    if aux:
        margin = min(route_margin(logits_, sel.shape[1]) for step in record["routes"] for logits_, sel, _ in step)
        assert margin > ROUTE_MARGIN, f"{tag}: a routing decision is within {margin:.3g} (relative) of a tie"
        meta["min_route_margin"] = f"{margin:.6g}"
        tensors.update({"loss_ce": ce.reshape(1), "loss_total": total.reshape(1)})
        tensors.update({f"aux.{name}": a.reshape(1) for name, a in zip(gpt2.moe_layer_names(cfg), aux)})
    tensors.update({"grad." + k: g for k, g in grads.items()})
    tensors["steps.loss"] = step_losses
    if aux:
        tensors["steps.loss_total"] = torch.stack(record["total"])
    tensors.update({"final." + k: p for k, p in final.items()})
    path = os.path.join(out_dir, f"gpt2_{tag}.safetensors")
    write_safetensors(path, tensors, meta)
    return path


# ----------------------------------------------------------------------------------------------------------------
# layer fixtures

LAYER_N = 16
LAYER_AUX_WEIGHT, LAYER_Z_WEIGHT = 0.5, 0.1     # large, so the aux term's share of grad.G and dx is visible


def layer_case(which, n_embd, spec, parametrization="standard", n_layer=2, base_width=64, widths=None):
    return {"which": which, "n_embd": n_embd, "n_layer": n_layer, "base_width": base_width,
            "parametrization": parametrization, "spec": spec, "widths": widths}


# Each case names a projection and n_embd, so (d_in, d_out) follow from DESIGN 2's table as they would in a
# model config. widths: the rms_cap cores' RMS in mup sigmas (above and below the cap).
LAYER_CASES = {
    "dense": layer_case("attn_qkv", 32, {"type": "dense"}),
    "blockdiag": layer_case("mlp_fc", 32, {"type": "blockdiag", "blocks": 4}),
    "blockdiag_rms_cap": layer_case("mlp_proj", 32, {"type": "blockdiag", "blocks": 2, "weight_norm": "rms_cap"},
                                    widths=(1.6,)),
    "lowrank": layer_case("mlp_proj", 32, {"type": "lowrank"}),
    "monarch_square": layer_case("attn_proj", 64, {"type": "monarch", "blocks": 8}),
    "monarch_up": layer_case("attn_qkv", 32, {"type": "monarch", "blocks": 4}),
    "monarch_down": layer_case("mlp_proj", 32, {"type": "monarch", "blocks": 4}),
    "btt": layer_case("attn_proj", 64, {"type": "btt"}),
    "btt_rank3": layer_case("attn_qkv", 48, {"type": "btt", "rank": 3, "in_blocks": 4, "out_blocks": 8}),
    "btt_rms_cap": layer_case("mlp_fc", 32, {"type": "btt", "rank": 2}, "mup", widths=(1.6, 0.6)),
    "btt_moe": layer_case("mlp_fc", 32, {"type": "btt_moe", "experts": 4, "top_k": 2}),
    "btt_moe_e1": layer_case("attn_proj", 32, {"type": "btt_moe", "experts": 1}),
    "btt_moe_k_eq_e": layer_case("attn_qkv", 32, {"type": "btt_moe", "experts": 4, "top_k": 4}),
    "btt_moe_mup": layer_case("mlp_proj", 32, {"type": "btt_moe", "experts": 4, "top_k": 1}, "mup",
                              widths=(0.6, 1.6)),
}


def layer_dims(which, n_embd):
    return gpt2.linear_dims({"model": {"n_embd": n_embd}}, which)


def layer_structure(case):
    return gpt2.resolve_linear(case["spec"], *layer_dims(case["which"], case["n_embd"]), case["parametrization"])


def layer_inputs(case, gen, dtype=torch.float32):
    """(structure, rule, params {suffix: tensor}, x (N, d_in), dy (N, d_out)) of a layer case: x and dy N(0, 1),
    parameters by layer_param (router std 2/sqrt(d_in): logits of std ~2)."""
    st = layer_structure(case)
    rule = gpt2.init_and_lr(st, case["which"], case["n_layer"], case["n_embd"], case["base_width"],
                            case["parametrization"])
    params = {}
    for suffix, shape in gpt2.structure_shapes(st).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        width = None
        if case["widths"] and suffix in ("W", "W0", "W1"):
            width = case["widths"][1 if suffix == "W1" else 0]
        params[suffix] = layer_param(st, rule, suffix, z, width, 2.0 / math.sqrt(st["d_in"])).to(dtype)
    x = torch.randn(LAYER_N, st["d_in"], generator=gen, dtype=torch.float64).to(dtype)
    dy = torch.randn(LAYER_N, st["d_out"], generator=gen, dtype=torch.float64).to(dtype)
    return st, rule, params, x, dy


def layer_objective(st, params, x, dy, aux_weight=LAYER_AUX_WEIGHT, z_weight=LAYER_Z_WEIGHT):
    """(L = sum(y * dy) + aux_weight * aux, y, moe record): the scalar whose gradients the layer fixtures hold
    (aux only for btt_moe)."""
    moe = {"aux": [], "routes": [], "z_weight": z_weight}
    y = gpt2.structure_apply(st, params, x, moe)
    L = (y * dy).sum()
    if moe["aux"]:
        L = L + aux_weight * moe["aux"][0]
    return L, y, moe


def write_layer(out_dir, tag, case):
    gen = torch.Generator().manual_seed(SEED + 100 + list(LAYER_CASES).index(tag))
    st, _, params, x, dy = layer_inputs(case, gen)
    leaves = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    xl = x.clone().requires_grad_(True)
    L, y, moe = layer_objective(st, leaves, xl, dy)
    grads = torch.autograd.grad(L, [xl] + list(leaves.values()))
    tensors = {"x": x, **params, "y": y.detach(), "dy": dy, "dx": grads[0]}
    tensors.update({"grad." + k: g for k, g in zip(leaves, grads[1:])})
    d_in, d_out = layer_dims(case["which"], case["n_embd"])
    config = {k: case[k] for k in ("which", "n_embd", "n_layer", "base_width", "parametrization", "spec")}
    config.update({"d_in": d_in, "d_out": d_out, "aux_weight": LAYER_AUX_WEIGHT if moe["aux"] else 0.0,
                   "z_weight": LAYER_Z_WEIGHT if moe["aux"] else 0.0})
    meta = {"config": json.dumps(config), "structure": json.dumps(st)}
    if moe["aux"]:
        logits, selected, gates = moe["routes"][0]
        margin = route_margin(logits.detach(), st["top_k"])
        assert margin > ROUTE_MARGIN, f"linear_{tag}: a routing decision is within {margin:.3g} of a tie"
        tensors.update({"aux": moe["aux"][0].detach().reshape(1), "logits": logits.detach(),
                        "gates": gates.detach(), "selected": selected.int()})
    if st["rms_cap"]:
        ratios = {nm: rms_ratio(params[nm], st["mup_sigma"][c]) for c, nm in enumerate(gpt2.core_names(st))}
        assert all(abs(r - 1) > RMS_MARGIN for r in ratios.values()), f"linear_{tag}: a core sits at its cap"
        meta["rms_cap"] = json.dumps({nm: "above" if r > 1 else "below" for nm, r in ratios.items()})
    path = os.path.join(out_dir, f"linear_{tag}.safetensors")
    write_safetensors(path, tensors, meta)
    return path


# ----------------------------------------------------------------------------------------------------------------
# structure table

def table_entry(which, n_embd, n_layer, base_width, parametrization, spec):
    d_in, d_out = layer_dims(which, n_embd)
    st = gpt2.resolve_linear(spec, d_in, d_out, parametrization)
    rule = gpt2.init_and_lr(st, which, n_layer, n_embd, base_width, parametrization)
    core_params = sum(nb * q * p for nb, q, p in st["cores"])
    router = st["experts"] * d_in if st["type"] == "btt_moe" else 0
    active = st["top_k"] / st["experts"] if st["type"] == "btt_moe" else 1
    resolved = {k: st[k] for k in ("blocks", "rank", "m1", "m0", "n0", "n1", "experts", "top_k") if k in st}
    return {"which": which, "n_embd": n_embd, "n_layer": n_layer, "base_width": base_width,
            "parametrization": parametrization, "spec": spec, "d_in": d_in, "d_out": d_out,
            "cores": [list(c) for c in st["cores"]], "params": core_params + router,
            "macs": core_params * active + router, "dense_macs": d_in * d_out,
            "init_std": rule["init_std"], "mup_sigma": st["mup_sigma"], "lr_mult": rule["lr_mult"],
            "router_lr_mult": rule["router_lr_mult"], "rms_cap": st["rms_cap"], "resolved": resolved}


# Specs of the table: every type with its defaults, then explicit keys (every key of every type at least once)
TABLE_SPECS = [
    {"type": "dense"}, {"type": "blockdiag"}, {"type": "lowrank"}, {"type": "monarch"}, {"type": "btt"},
    {"type": "btt_moe"},
    {"type": "blockdiag", "blocks": 8, "weight_norm": "rms_cap"}, {"type": "lowrank", "rank": 32},
    {"type": "monarch", "blocks": 16}, {"type": "btt", "rank": 2}, {"type": "btt", "weight_norm": "none"},
    {"type": "btt", "rank": 4, "in_blocks": 16, "out_blocks": 16},
    {"type": "btt_moe", "experts": 16, "top_k": 1, "in_blocks": 16, "out_blocks": 16},
    {"type": "btt_moe", "experts": 4, "top_k": 4, "weight_norm": "none"},
    {"type": "dense", "weight_norm": "rms_cap"},
]
# (n_embd, n_layer, base_width): GPT-2 124M, the fixture model, and a width whose factorizations are uneven
TABLE_MODELS = [(768, 12, 768), (64, 2, 256), (48, 3, 768)]


def structure_table():
    cases = []
    for n_embd, n_layer, base_width in TABLE_MODELS:
        for spec in TABLE_SPECS:
            for which in gpt2.LINEARS:
                d_in, d_out = layer_dims(which, n_embd)
                try:
                    gpt2.resolve_linear(spec, d_in, d_out)
                except ValueError:
                    continue                       # e.g. 16 blocks of a 48-wide layer: refused, not tabled
                for parametrization in ("standard", "mup"):
                    cases.append(table_entry(which, n_embd, n_layer, base_width, parametrization, spec))
    return cases


def write_table(out_dir):
    path = os.path.join(out_dir, "structure_table.json")
    with open(path, "w") as f:
        f.write("[\n" + ",\n".join(json.dumps(c) for c in structure_table()) + "\n]\n")
    return path


# ----------------------------------------------------------------------------------------------------------------

def make_fixtures(out_dir, only=None):
    """Write every fixture (only: a set of file names to restrict to) and return their paths."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    os.makedirs(out_dir, exist_ok=True)
    want = lambda name: only is None or name in only  # noqa: E731
    paths = write_dense(out_dir) if any(want(f) for f in DENSE_FILES) else []
    paths += [write_model(out_dir, tag, cfg) for tag, cfg in MODEL_TAGS.items() if want(f"gpt2_{tag}.safetensors")]
    paths += [write_layer(out_dir, tag, case) for tag, case in LAYER_CASES.items()
              if want(f"linear_{tag}.safetensors")]
    if want("structure_table.json"):
        paths.append(write_table(out_dir))
    return paths


FILES = (list(DENSE_FILES) + [f"gpt2_{tag}.safetensors" for tag in MODEL_TAGS]
         + [f"linear_{tag}.safetensors" for tag in LAYER_CASES] + ["structure_table.json"])


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "test", "fixtures")
    for path in make_fixtures(out):
        print(f"{os.path.normpath(path)}: {os.path.getsize(path)} bytes")
