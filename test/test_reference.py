#!/usr/bin/python3
"""Tests of the PyTorch reference (dev/reference/) on its own, independent of the C code:
  - the committed fixtures are what make_fixtures.py writes today, and hold what the contract lists;
  - the reference's gradients equal central finite differences in float64 (dense, structured, MoE models);
  - under mup every core, router and vector gets its learning rate (against torch.optim.AdamW param groups);
  - its forward equals a position-by-position recomputation built from torch.nn.functional, it is causal,
    and its LayerNorm / GELU / cross-entropy equal torch's;
  - AdamW equals torch.optim.AdamW, clipping and the schedule follow their formulas;
  - safetensors_io round-trips, detects corruption, and the llm.c writer lays its file out as llm.c reads it.
Prints "ok - name" / "FAIL - name: detail" per check (test/run counts them).
"""
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import zlib

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))
import checks  # noqa: E402
from checks import check  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
import gpt2  # noqa: E402
import make_fixtures as mf  # noqa: E402
from safetensors_io import (bf16_round, bf16_to_float, read_safetensors, write_llmc_model,  # noqa: E402
                            write_safetensors)

FIXTURES = os.path.join(ROOT, "test", "fixtures")




def rel_err(a, b):
    """max |a-b| / max |b| over a tensor: the error relative to the tensor's scale, so entries near zero
    (the zero gradients of unused wte rows, say) do not turn round-off into a large ratio."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def fixture_setup(dtype):
    """(config, params, inputs, targets) of the dense fixture, the parameters in dtype."""
    cfg = gpt2.resolve_config(mf.CONFIG)
    gen = torch.Generator().manual_seed(mf.SEED)
    params = {k: p.to(dtype) for k, p in mf.fixture_params(cfg, gen).items()}
    inputs, targets = mf.fixture_batch(cfg, gen, cfg["train"]["micro_batch"], cfg["train"]["seq_len"])
    return cfg, params, inputs, targets


# ----------------------------------------------------------------------------------------------------------------

def test_fixture_contents():
    """The committed gpt2_dense.safetensors holds exactly the contract's tensors with their dtypes and shapes."""
    t, meta = read_safetensors(os.path.join(FIXTURES, "gpt2_dense.safetensors"))
    C, L = 64, 2
    expect = {"wte": (512, C), "wpe": (32, C), "lnf.w": (C,), "lnf.b": (C,)}
    for i in range(L):
        for ln in ("ln1", "ln2"):
            expect[f"h.{i}.{ln}.w"] = expect[f"h.{i}.{ln}.b"] = (C,)
        for name, (d_out, d_in) in {"attn_qkv": (3 * C, C), "attn_proj": (C, C),
                                    "mlp_fc": (4 * C, C), "mlp_proj": (C, 4 * C)}.items():
            expect[f"h.{i}.{name}.W"], expect[f"h.{i}.{name}.b"] = (d_out, d_in), (d_out,)
    param_names = list(expect)
    expect.update({"grad." + k: expect[k] for k in param_names})
    expect.update({"final." + k: expect[k] for k in param_names})
    expect.update({"inputs": (4, 32), "targets": (4, 32), "logits": (4, 32, 500), "loss": (1,), "steps.loss": (10,)})
    got = {k: tuple(v.shape) for k, v in t.items()}
    check(got == expect, "fixture: tensor names and shapes as in the contract",
          f"missing {sorted(set(expect) - set(got))}, extra {sorted(set(got) - set(expect))}, "
          f"wrong shape {[k for k in expect if k in got and got[k] != expect[k]]}")
    ints = {k for k, v in t.items() if v.dtype == torch.int32}
    check(ints == {"inputs", "targets"} and all(v.dtype == torch.float32 for k, v in t.items() if k not in ints),
          "fixture: inputs/targets I32, everything else F32", f"I32 tensors: {sorted(ints)}")
    ids_ok = bool(((t["inputs"] >= 0) & (t["inputs"] < 500)).all())
    check(ids_ok and torch.equal(t["inputs"][:, 1:], t["targets"][:, :-1]),
          "fixture: ids < vocab_size and targets are the inputs shifted by one")
    check(torch.equal(t["loss"], t["steps.loss"][:1]), "fixture: loss equals the first of steps.loss",
          f"{t['loss'].item()} vs {t['steps.loss'][0].item()}")
    check(t["grad.wte"][500:].abs().max().item() == 0.0, "fixture: padded wte rows get no gradient")
    cfg = json.loads(meta.get("config", "null") or "null")
    check(cfg == mf.CONFIG, "fixture: __metadata__ config is the config used", f"{meta.get('config')}")


def test_structured_fixture_contents():
    """Each gpt2_<tag>.safetensors holds the dense fixture's layout for its config: every parameter of
    param_shapes (and no other), its grad. and final., the batch, logits, losses; btt_moe its per-layer aux losses
    and a total that is the cross-entropy plus aux_weight times their mean; mixed_mup capped cores on both sides
    of the cap."""
    for tag, config in mf.MODEL_TAGS.items():
        t, meta = read_safetensors(os.path.join(FIXTURES, f"gpt2_{tag}.safetensors"))
        cfg = gpt2.resolve_config(config)
        expect = dict(gpt2.param_shapes(cfg))
        names = list(expect)
        expect.update({"grad." + k: expect[k] for k in names})
        expect.update({"final." + k: expect[k] for k in names})
        expect.update({"inputs": (4, 32), "targets": (4, 32), "logits": (4, 32, 500), "loss": (1,),
                       "steps.loss": (10,)})
        moe = gpt2.moe_layer_names(cfg)
        if moe:
            expect.update({"loss_ce": (1,), "loss_total": (1,), "steps.loss_total": (10,)})
            expect.update({f"aux.{n}": (1,) for n in moe})
        got = {k: tuple(v.shape) for k, v in t.items()}
        check(got == expect, f"gpt2_{tag}: tensor names and shapes",
              f"missing {sorted(set(expect) - set(got))[:6]}, extra {sorted(set(got) - set(expect))[:6]}, "
              f"wrong shape {[k for k in expect if k in got and got[k] != expect[k]][:6]}")
        check(json.loads(meta["config"]) == config and torch.equal(t["loss"], t["steps.loss"][:1]),
              f"gpt2_{tag}: config metadata, loss = steps.loss[0]")
        if moe:
            aux = torch.cat([t[f"aux.{n}"] for n in moe]).double().mean().item()
            total = t["loss_ce"].item() + cfg["model"]["moe"]["aux_weight"] * aux
            # float32 sums of a ~6.3 loss: 1e-6 relative is ~10 ulp
            check(len(moe) == 8 and torch.equal(t["loss"], t["loss_ce"]) and abs(total - t["loss_total"].item()) < 1e-6 * total
                  and torch.equal(t["loss_total"], t["steps.loss_total"][:1]),
                  f"gpt2_{tag}: loss_total = loss_ce + aux_weight * mean of the 8 layers' aux", f"{total} vs {t['loss_total']}")
        if "rms_cap" in meta:
            sides = json.loads(meta["rms_cap"])
            ok = True
            for name, side in sides.items():
                st = gpt2.model_structure(cfg, name.split(".")[2])
                ratio = mf.rms_ratio(t[name], st["mup_sigma"][1 if name.endswith("W1") else 0])
                ok &= (ratio > 1) == (side == "above")
            check(ok and set(sides.values()) == {"above", "below"} and len(sides) == 6,
                  f"gpt2_{tag}: rms_cap cores above and below their cap, as the metadata says", str(sides))


def test_layer_fixture_contents():
    """linear_<tag>.safetensors: x, the layer's parameters, y, dy, dx, grad.<param> with the shapes of the
    structure its metadata names; btt_moe its routing and aux loss; y equals the reference applied to x
    (float32, same code: 1e-6)."""
    for tag, case in mf.LAYER_CASES.items():
        t, meta = read_safetensors(os.path.join(FIXTURES, f"linear_{tag}.safetensors"))
        config = json.loads(meta["config"])
        st = gpt2.resolve_linear(config["spec"], config["d_in"], config["d_out"], config["parametrization"])
        shapes = gpt2.structure_shapes(st)
        N = mf.LAYER_N
        expect = {"x": (N, st["d_in"]), **shapes, "y": (N, st["d_out"]), "dy": (N, st["d_out"]),
                  "dx": (N, st["d_in"]), **{"grad." + k: v for k, v in shapes.items()}}
        if st["type"] == "btt_moe":
            expect.update({"aux": (1,), "logits": (N, st["experts"]), "gates": (N, st["experts"]),
                           "selected": (N, st["top_k"])})
        got = {k: tuple(v.shape) for k, v in t.items()}
        same_case = all(config[k] == case[k] for k in ("which", "n_embd", "parametrization", "spec"))
        check(got == expect and same_case and json.loads(meta["structure"]) == json.loads(json.dumps(st)),
              f"linear_{tag}: tensors {sorted(shapes)} and metadata", f"got {got}, expected {expect}")
        y = gpt2.structure_apply(st, {k: t[k] for k in shapes}, t["x"])
        check(rel_err(y, t["y"]) < 1e-6, f"linear_{tag}: y is the reference layer at x", f"{rel_err(y, t['y']):.2e}")


def test_fixtures_regenerate():
    """make_fixtures.py today reproduces the committed fixtures, so neither the reference nor the fixtures can
    drift without this failing. Integers must be bitwise equal; floats within 1e-6 of each tensor's scale: it is
    the same code on the same torch, so only a different BLAS/thread blocking of the sums could change the
    last bits (with one thread they are in fact bitwise equal). The llm.c files must be byte-identical: they
    hold the random draws themselves and their integer bf16 rounding, with no summation."""
    with tempfile.TemporaryDirectory() as tmp:
        mf.make_fixtures(tmp)
        for fname in mf.FILES:
            new_path, old_path = os.path.join(tmp, fname), os.path.join(FIXTURES, fname)
            if not os.path.exists(old_path):
                check(False, f"regenerate: {fname}", "committed fixture missing")
                continue
            if fname.endswith(".bin") or fname.endswith(".json"):
                # the table is formulas in double precision on integers: no summation order to differ
                with open(new_path, "rb") as a, open(old_path, "rb") as b:
                    check(a.read() == b.read(), f"regenerate: {fname} byte-identical")
                continue
            new, new_meta = read_safetensors(new_path)
            old, old_meta = read_safetensors(old_path)
            bad = []
            for k in sorted(set(new) | set(old)):
                if k not in new or k not in old or new[k].dtype != old[k].dtype or new[k].shape != old[k].shape:
                    bad.append(f"{k} (presence/dtype/shape)")
                elif new[k].dtype == torch.int32:
                    if not torch.equal(new[k], old[k]):
                        bad.append(f"{k} (ids differ)")
                elif rel_err(new[k], old[k]) > 1e-6:
                    bad.append(f"{k} (rel err {rel_err(new[k], old[k]):.2e})")
            check(not bad, f"regenerate: {fname} tensors match", ", ".join(bad[:8]))
            check(new_meta.keys() == old_meta.keys() and all(new_meta[k] == old_meta[k] for k in new_meta
                                                              if k not in ("crc32", "min_route_margin")),
                  f"regenerate: {fname} metadata matches")


# ----------------------------------------------------------------------------------------------------------------

def fd_check(cfg, params, inputs, targets, label, per_tensor=4):
    """Central differences in float64 against autograd on per_tensor entries of every parameter: the entry of
    largest |gradient| plus distinct random ones. With h = 1e-6 the truncation error (h^2 f'''/6) is ~1e-12 and
    the round-off error ~ eps |loss| / h ~ 1e-16 * 6 / 1e-6 ~ 1e-9 (observed up to 6e-10); the criterion
    |fd - ad| / max(|ad|, 1e-2) < 1e-6 is thus relative for gradients above 1e-2 and an absolute 1e-8 below,
    10x above the round-off while any error in the formulas (of the order of the gradient itself) fails it."""
    h, floor, tol = 1e-6, 1e-2, 1e-6
    _, grads = gpt2.loss_and_grads(params, cfg, inputs, targets)
    gen = torch.Generator().manual_seed(7)

    def loss_at():
        return gpt2.model_loss(params, cfg, inputs, targets)[0].item()

    worst, worst_at = 0.0, ""
    for name, p in params.items():
        flat, g = p.view(-1), grads[name].reshape(-1)
        idx = [int(g.abs().argmax())]
        idx += [i for i in torch.randperm(flat.numel(), generator=gen).tolist() if i != idx[0]][:per_tensor - 1]
        for i in idx:
            old = flat[i].item()
            flat[i] = old + h
            lp = loss_at()
            flat[i] = old - h
            lm = loss_at()
            flat[i] = old
            fd, ad = (lp - lm) / (2 * h), g[i].item()
            err = abs(fd - ad) / max(abs(ad), floor)
            if not err <= worst:
                worst, worst_at = err, f"{name}[{i}]: autograd {ad:.10e}, finite difference {fd:.10e}"
    check(worst < tol, f"gradients vs finite differences ({label})", f"worst {worst:.2e} at {worst_at}")


def test_gradients():
    cfg, params, inputs, targets = fixture_setup(torch.float64)
    fd_check(cfg, params, inputs, targets, "fixture model, every tensor")
    # the off-by-default attention options of DESIGN section 2, on a shorter batch
    cfg = json.loads(json.dumps(mf.CONFIG))
    cfg["model"].update({"qk_norm": True, "attn_scale": "mup"})
    cfg = gpt2.resolve_config(cfg)
    gen = torch.Generator().manual_seed(3)
    params = mf.fixture_params(cfg, gen, torch.float64)
    inputs, targets = mf.fixture_batch(cfg, gen, 2, 16)
    check(params["h.1.qk_norm.k.b"].shape == (16,), "qk_norm parameters sized head_dim")
    fd_check(cfg, params, inputs, targets, "qk_norm + mup attention scale", per_tensor=2)
    # every structure in a model, rms_cap both above and below the cap, and the MoE objective (routing is
    # piecewise constant: the fixtures' margins (>1e-4 of the logits) are far beyond h = 1e-6)
    for tag in ("monarch", "btt", "mixed_mup", "btt_moe"):
        cfg = gpt2.resolve_config(mf.MODEL_TAGS[tag])
        params, _ = mf.structured_params(cfg, torch.Generator().manual_seed(mf.MODEL_SEEDS[tag]), torch.float64)
        inputs, targets = mf.fixture_batch(cfg, torch.Generator().manual_seed(9), 2, 16)
        fd_check(cfg, params, inputs, targets, f"{tag} model", per_tensor=2)


def loop_logits(params, cfg, ids):
    """Logits (T, V_padded) of one sequence, position by position and head by head, from torch.nn.functional
    and scalar softmax arithmetic: an implementation sharing nothing with gpt2.forward but the formulas."""
    m = cfg["model"]
    C, NH = m["n_embd"], m["n_head"]
    hs = C // NH
    T = len(ids)
    xs = [params["wte"][ids[s]] + params["wpe"][s] for s in range(T)]
    for i in range(m["n_layer"]):
        P = lambda k: params[f"h.{i}.{k}"]
        qkv = [F.linear(F.layer_norm(x, (C,), P("ln1.w"), P("ln1.b"), 1e-5), P("attn_qkv.W"), P("attn_qkv.b"))
               for x in xs]
        outs = []
        for s in range(T):
            heads = []
            for hd in range(NH):
                q = qkv[s][hd * hs:(hd + 1) * hs]
                scores = [float(q @ qkv[r][C + hd * hs:C + (hd + 1) * hs]) / math.sqrt(hs) for r in range(s + 1)]
                top = max(scores)
                w = [math.exp(a - top) for a in scores]
                heads.append(sum(w[r] / sum(w) * qkv[r][2 * C + hd * hs:2 * C + (hd + 1) * hs] for r in range(s + 1)))
            outs.append(torch.cat(heads))
        xs = [x + F.linear(a, P("attn_proj.W"), P("attn_proj.b")) for x, a in zip(xs, outs)]
        xs = [x + F.linear(F.gelu(F.linear(F.layer_norm(x, (C,), P("ln2.w"), P("ln2.b"), 1e-5),
                                           P("mlp_fc.W"), P("mlp_fc.b")), approximate="tanh"),
                           P("mlp_proj.W"), P("mlp_proj.b")) for x in xs]
    return torch.stack([F.linear(F.layer_norm(x, (C,), params["lnf.w"], params["lnf.b"], 1e-5), params["wte"])
                        for x in xs])


def test_forward():
    """float64, so any difference beyond ~1e-12 is a formula difference, not rounding."""
    cfg, params, inputs, targets = fixture_setup(torch.float64)
    V = cfg["model"]["vocab_size"]
    logits = gpt2.forward(params, cfg, inputs)
    loop = torch.stack([loop_logits(params, cfg, inputs[b].tolist()) for b in range(inputs.shape[0])])
    check(rel_err(logits, loop) < 1e-12, "forward equals a position-by-position recomputation (float64)",
          f"rel err {rel_err(logits, loop):.2e}")
    loss = gpt2.cross_entropy(logits, targets, V).item()
    ref = F.cross_entropy(loop[..., :V].reshape(-1, V), targets.reshape(-1)).item()
    check(abs(loss - ref) < 1e-12 * ref, "loss equals F.cross_entropy over the first vocab_size logits",
          f"{loss!r} vs {ref!r}")

    x = torch.randn(3, 5, 64, dtype=torch.float64) * 3 + 1
    w, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    check(rel_err(gpt2.layernorm(x, w, b), F.layer_norm(x, (64,), w, b, 1e-5)) < 1e-12,
          "layernorm equals F.layer_norm (eps 1e-5)")
    check(rel_err(gpt2.gelu(x), F.gelu(x, approximate="tanh")) < 1e-12, "gelu equals F.gelu(approximate='tanh')")

    # causal: a changed token at position 20 leaves every earlier logit bit-identical (masked scores give
    # exp(-inf) = 0 exactly and each row's sums see only its own row), and changes the later ones
    cfg, params, inputs, targets = fixture_setup(torch.float32)
    changed = inputs.clone()
    changed[:, 20] = (changed[:, 20] + 1) % V
    a, b = gpt2.forward(params, cfg, inputs), gpt2.forward(params, cfg, changed)
    check(torch.equal(a[:, :20], b[:, :20]), "causal: a future token does not change earlier logits",
          f"max diff {(a[:, :20] - b[:, :20]).abs().max().item():.2e}")
    check(bool(((a[:, 20:] - b[:, 20:]).abs().amax(dim=(0, 2)) > 0).all()),
          "causal: it changes the logits of its own and every later position")


# ----------------------------------------------------------------------------------------------------------------

def test_optimizer():
    def lr(step, **schedule):
        cfg = gpt2.resolve_config({**mf.CONFIG, "schedule": {**mf.CONFIG["schedule"], **schedule}})
        return gpt2.lr_at_step(cfg, step)

    # lr 1e-3, warmup 2, max_steps 10, final 1e-4; hand-computed from the contract's formula
    cases = [(0, "cosine", 5e-4), (1, "cosine", 1e-3), (2, "cosine", 1e-3),
             (4, "cosine", 1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4), (6, "cosine", 5.5e-4),
             (10, "cosine", 1e-4), (25, "cosine", 1e-4), (4, "linear", 1e-3 - 9e-4 * 0.25), (10, "linear", 1e-4),
             (0, "constant", 5e-4), (7, "constant", 1e-3)]
    bad = [f"{kind} step {step}: {lr(step, type=kind)} != {want}" for step, kind, want in cases
           if abs(lr(step, type=kind) - want) > 1e-15]
    check(not bad, "lr schedule: warmup, cosine, linear, constant, clamped after max_steps", "; ".join(bad))

    gen = torch.Generator().manual_seed(5)
    grads = {"a": torch.randn(7, 3, generator=gen, dtype=torch.float64),
             "b": torch.randn(5, generator=gen, dtype=torch.float64)}
    before = {k: g.clone() for k, g in grads.items()}
    total = math.sqrt(sum(float((g ** 2).sum()) for g in before.values()))
    norm = gpt2.clip_grad_norm(grads, 1.0)
    after = math.sqrt(sum(float((g ** 2).sum()) for g in grads.values()))
    same_dir = all(rel_err(grads[k] * total, before[k]) < 1e-14 for k in grads)
    check(abs(norm - total) < 1e-12 and abs(after - 1.0) < 1e-14 and same_dir,
          "clip: a norm above clip is scaled to clip, direction kept", f"norm {norm} total {total} after {after}")
    kept = {k: g.clone() for k, g in before.items()}
    gpt2.clip_grad_norm(kept, 2 * total)
    check(all(torch.equal(kept[k], before[k]) for k in kept), "clip: a norm below clip leaves gradients alone")

    # AdamW against torch.optim.AdamW (decoupled decay p *= 1 - lr wd, then the Adam step: the same formula),
    # decay only on 2-D tensors, 3 steps of the fixture schedule, clipping off; float64, so 1e-12.
    cfg, params, inputs, targets = fixture_setup(torch.float64)
    cfg["optim"]["grad_clip"] = 1e9
    o = cfg["optim"]
    ours = {k: p.clone() for k, p in params.items()}
    gpt2.train_steps(ours, (inputs, targets), cfg, 3)
    theirs = {k: p.clone().requires_grad_(True) for k, p in params.items()}
    matrices = [p for p in theirs.values() if p.dim() >= 2]
    vectors = [p for p in theirs.values() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": o["weight_decay"]},
                             {"params": vectors, "weight_decay": 0.0}],
                            lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
    for step in range(3):
        for group in opt.param_groups:
            group["lr"] = gpt2.lr_at_step(cfg, step)
        opt.zero_grad()
        gpt2.cross_entropy(gpt2.forward(theirs, cfg, inputs), targets, cfg["model"]["vocab_size"]).backward()
        opt.step()
    worst = max(rel_err(ours[k], theirs[k].detach()) for k in ours)
    check(worst < 1e-12, "AdamW equals torch.optim.AdamW over 3 scheduled steps (float64)", f"rel err {worst:.2e}")
    pad = rel_err(ours["wte"][500:], params["wte"][500:] * math.prod(1 - gpt2.lr_at_step(cfg, s) * o["weight_decay"]
                                                                     for s in range(3)))
    check(pad < 1e-12, "AdamW: padded wte rows only decay", f"rel err {pad:.2e}")
    test_mup_learning_rates()


def test_mup_learning_rates():
    """Under mup, 3 steps of train_steps equal torch.optim.AdamW with one param group per (lr multiplier,
    decay) built here from DESIGN 3.7's text: cores lr * (base_width/n_embd) (d_in/fan_in)/ncores, routers
    lr * base_width/n_embd, the rest lr; decay on W, W0, W1, G, wte, wpe only (float64: 1e-12). The multipliers
    are written out for the mixed_mup model (base_width 128, n_embd 64: width ratio 2) so that a wrong formula in
    init_and_lr shows; btt_moe under mup adds routers and gamma."""
    expected = {  # projection: multipliers of W / W0, W1 (mixed_mup: d_in / fan_in / ncores * 2)
        "attn_qkv": (2 * 64 / 16 / 2, 2 * 64 / 16 / 2),          # monarch b=4: fan-ins 16 and q=16
        "attn_proj": (2 * 64 / 8 / 2, 2 * 64 / 8 / 2),            # btt 64 = 8*8: fan-ins m0=8, m1*r=8
        "mlp_fc": (2 * 64 / 64 / 2, 2 * 64 / 16 / 2),             # lowrank r=16: fan-ins 64 and 16
        "mlp_proj": (2 * 256 / 64,),                              # blockdiag b=4: fan-in 64
    }
    cfg = gpt2.resolve_config(mf.MODEL_TAGS["mixed_mup"])
    mults = gpt2.lr_multipliers(cfg)
    want = {f"h.{i}.{p}.{s}": v for i in range(2) for p, vs in expected.items()
            for s, v in zip(("W",) if len(vs) == 1 else ("W0", "W1"), vs)}
    check(mults == want, "mup lr multipliers of the mixed_mup model (monarch, btt, lowrank, blockdiag)",
          f"{mults} vs {want}")

    moe_cfg = json.loads(json.dumps(mf.MODEL_TAGS["btt_moe"]))
    moe_cfg["model"].update({"parametrization": "mup", "base_width": 128})
    for tag, config in (("mixed_mup", mf.MODEL_TAGS["mixed_mup"]), ("btt_moe under mup", moe_cfg)):
        cfg = gpt2.resolve_config(config)
        cfg["optim"]["grad_clip"] = 1e9
        params, _ = mf.structured_params(cfg, torch.Generator().manual_seed(21), torch.float64)
        inputs, targets = mf.fixture_batch(cfg, torch.Generator().manual_seed(22), 2, 16)
        ours = {k: p.clone() for k, p in params.items()}
        gpt2.train_steps(ours, (inputs, targets), cfg, 3)
        m = cfg["model"]
        width = m["base_width"] / m["n_embd"]
        theirs = {k: p.clone().requires_grad_(True) for k, p in params.items()}
        groups = {}
        for name, p in theirs.items():
            parts = name.split(".")
            mult = 1.0
            if len(parts) == 4 and parts[2] in gpt2.LINEARS and parts[3] in ("W", "W0", "W1", "G"):
                st = gpt2.model_structure(cfg, parts[2])
                if parts[3] == "G":
                    mult = width
                else:
                    fan_in = st["fans"][1 if parts[3] == "W1" else 0][0]
                    mult = width * st["d_in"] / fan_in / len(st["cores"])
            decay = name in ("wte", "wpe") or parts[-1] in ("W", "W0", "W1", "G")
            groups.setdefault((mult, decay), []).append(p)
        o = cfg["optim"]
        opt = torch.optim.AdamW([{"params": ps, "mult": mult, "weight_decay": o["weight_decay"] if decay else 0.0}
                                 for (mult, decay), ps in groups.items()],
                                lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"])
        for step in range(3):
            for group in opt.param_groups:
                group["lr"] = gpt2.lr_at_step(cfg, step) * group["mult"]
            opt.zero_grad()
            gpt2.model_loss(theirs, cfg, inputs, targets)[0].backward()
            opt.step()
        # 1e-9, not the dense test's 1e-12: qk_norm.k.b's true gradient is 0 (a bias shared by all keys
        # shifts a query's scores by a constant, which softmax ignores), so its computed gradient is rounding
        # noise that Adam normalizes into lr-sized steps: a 1e-15 change of the parameters moves it by ~1e-11
        # of its size (measured), and so does the order of operations here; a wrong multiplier is off by >1e-3.
        worst = max(rel_err(ours[k], theirs[k].detach()) for k in ours)
        check(worst < 1e-9, f"AdamW with mup lr multipliers equals torch param groups ({tag})",
              f"rel err {worst:.2e}, {len(groups)} groups")


# ----------------------------------------------------------------------------------------------------------------

def test_safetensors_io():
    gen = torch.Generator().manual_seed(11)
    tensors = {"a.W": torch.randn(3, 5, generator=gen), "ids": torch.arange(-4, 7, dtype=torch.int32),
               "half": torch.randn(6, generator=gen).to(torch.bfloat16), "scalar": torch.tensor([2.5])}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.safetensors")
        write_safetensors(path, tensors, {"step": "12", "note": "hi"})
        back, meta = read_safetensors(path)
        same = (list(back) == list(tensors) and torch.equal(back["a.W"], tensors["a.W"])
                and torch.equal(back["ids"], tensors["ids"]) and back["half"].dtype == torch.float32
                and torch.equal(back["half"], tensors["half"].float())
                and torch.equal(back["scalar"], tensors["scalar"]))
        check(same and meta["step"] == "12" and meta["note"] == "hi",
              "safetensors: F32/I32/BF16 and metadata round-trip (BF16 read as float32)")

        with open(path, "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        offsets = [header[k]["data_offsets"] for k in tensors]
        contiguous = offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:]))
        check((8 + n) % 8 == 0 and contiguous and 8 + n + offsets[-1][1] == len(data)
              and [header[k]["dtype"] for k in tensors] == ["F32", "I32", "BF16", "F32"],
              "safetensors: header 8-byte aligned, dtypes tagged, offsets contiguous to the end of file")
        crcs = json.loads(header["__metadata__"]["crc32"])
        body = data[8 + n:]
        check(all(crcs[k] == "%08x" % zlib.crc32(body[b:e]) for k, (b, e) in zip(tensors, offsets))
              and all(len(c) == 8 and c == c.lower() for c in crcs.values()),
              "safetensors: crc32 metadata is 8 lowercase hex digits of zlib.crc32 per tensor")

        corrupt = bytearray(data)
        corrupt[8 + n + offsets[1][0]] ^= 1
        with open(path, "wb") as f:
            f.write(corrupt)
        try:
            read_safetensors(path)
            check(False, "safetensors: a flipped bit is refused, naming the tensor", "no error")
        except ValueError as e:
            check("ids" in str(e) and "CRC" in str(e), "safetensors: a flipped bit is refused, naming the tensor", e)
        with open(path, "wb") as f:
            f.write(data[:-3])
        try:
            read_safetensors(path)
            check(False, "safetensors: a truncated file is refused, naming the tensor", "no error")
        except ValueError as e:
            check("scalar" in str(e), "safetensors: a truncated file is refused, naming the tensor", e)


def test_llmc_writer():
    cfg, params, _, _ = fixture_setup(torch.float32)
    C, L, Vp, maxT = 64, 2, 512, 32
    n = Vp * C + maxT * C + L * (12 * C * C + 13 * C) + 2 * C      # llm.c's parameter count
    # llm.c's order, restated here from llm.c's ParameterTensors rather than taken from safetensors_io
    kinds = ["ln1.w", "ln1.b", "attn_qkv.W", "attn_qkv.b", "attn_proj.W", "attn_proj.b", "ln2.w", "ln2.b",
             "mlp_fc.W", "mlp_fc.b", "mlp_proj.W", "mlp_proj.b"]
    order = ["wte", "wpe"] + [f"h.{i}.{k}" for k in kinds for i in range(L)] + ["lnf.w", "lnf.b"]
    expect = torch.cat([params[k].reshape(-1) for k in order])
    with tempfile.TemporaryDirectory() as tmp:
        for dtype, version, width in (("fp32", 3, 4), ("bf16", 5, 2)):
            path = os.path.join(tmp, f"m_{dtype}.bin")
            write_llmc_model(path, params, cfg, dtype)
            with open(path, "rb") as f:
                data = f.read()
            header = struct.unpack("<256i", data[:1024])
            check(list(header[:8]) == [20240326, version, maxT, 500, L, 4, C, Vp] and not any(header[8:])
                  and len(data) == 1024 + n * width, f"llm.c {dtype}: header and size ({n} parameters)",
                  f"header {header[:8]}, {len(data)} bytes")
            if dtype == "fp32":
                got = torch.frombuffer(bytearray(data[1024:]), dtype=torch.float32)
                check(torch.equal(got, expect), "llm.c fp32: parameters in llm.c order, exact")
            else:
                got = torch.frombuffer(bytearray(data[1024:]), dtype=torch.int16)
                check(torch.equal(got, expect.to(torch.bfloat16).view(torch.int16)),
                      "llm.c bf16: parameters in llm.c order, rounded as torch rounds to bfloat16")
    # round-to-nearest-even at the ties: 1 + 2^-8 is halfway between 1 (0x3F80, even) and 1 + 2^-7;
    # 1 + 3*2^-8 is halfway between 0x3F81 (odd) and 0x3F82 (even); just above a tie rounds up
    x = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20, -2.0, 0.0])
    got = bf16_round(x).tolist()
    check(got == [0x3F80, 0x3F82, 0x3F81, 0xC000, 0x0000] and torch.equal(bf16_to_float(bf16_round(x)),
                                                                       x.to(torch.bfloat16).float()),
          "bf16 rounding: nearest, ties to even", f"{[hex(v) for v in got]}")


def test_cli_logits():
    """gpt2.py --logits on committed fixtures (each is a model file: parameters plus config) reproduces their
    logits and loss (the cross-entropy) (same code, same float32 arithmetic: 1e-6 as for regeneration)."""
    for tag in ("dense", "mixed_mup", "btt_moe"):
        fixture = os.path.join(FIXTURES, f"gpt2_{tag}.safetensors")
        t, _ = read_safetensors(fixture)
        name = f"cli --logits reproduces the {tag} fixture's logits and loss"
        with tempfile.TemporaryDirectory() as tmp:
            inp, out = os.path.join(tmp, "in.safetensors"), os.path.join(tmp, "out.safetensors")
            write_safetensors(inp, {"inputs": t["inputs"], "targets": t["targets"]})
            r = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "reference", "gpt2.py"),
                                "--logits", fixture, inp, out], capture_output=True, text=True)
            if r.returncode != 0:
                check(False, name, r.stderr.strip()[-300:])
                continue
            got, _ = read_safetensors(out)
            err = max(rel_err(got["logits"], t["logits"]), rel_err(got["loss"], t["loss"]))
            check(err < 1e-6, name, f"rel err {err:.2e}")


def main():
    torch.set_num_threads(1)
    for test in (test_fixture_contents, test_structured_fixture_contents, test_layer_fixture_contents,
                 test_fixtures_regenerate, test_gradients, test_forward,
                 test_optimizer, test_safetensors_io, test_llmc_writer, test_cli_logits):
        try:
            test()
        except Exception as e:  # a crash in one group is reported as its failure, the others still run
            check(False, test.__name__, f"{type(e).__name__}: {e}")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
