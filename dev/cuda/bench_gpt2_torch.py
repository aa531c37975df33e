#!/usr/bin/env python3
"""The PyTorch reference for make bench-cuda: the same GPT-2 as ours (learned embeddings, pre-LayerNorm
blocks, causal attention, tanh-GELU MLP, tied LM head, vocab padded to 50304), trained with bf16
autocast, torch.compile, SDPA (flash) attention and fused AdamW on random tokens, at the given
micro-batch and T. With --config (a model config, e.g. configs/gpt2_124M_monarch.json) each of the four
projections is the structure the config gives it, computed by the PyTorch reference's einsum forward
(dev/reference/gpt2.py structure_apply: rms_cap included; btt_moe computes every expert and masks them,
as the BTT-MoE papers' code does, and adds aux_weight * the mean aux loss to the objective); qk_norm
and attn_scale "mup" as the config says. Dense projections are nn.Linear (cuBLAS), as before.
(The mup lr multipliers are left out: they change no work.) Prints one line
    torch: tok/s X mfu Y ms Z
or, when PyTorch with CUDA is not there, one line starting "torch: unavailable" (exit 0), so the
benchmark still reports our numbers. MFU uses our FLOP count: 6 * (MACs of every matmul, structured
layers by their real MACs (llmc/structure.h; btt_moe k/E of its cores, though this reference computes
all E) + causal attention) per token, over the 989 TFLOP/s bf16 peak of an H100."""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=1024)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=10)
p.add_argument("--config", help="model config JSON (default: GPT-2 124M, dense)")
p.add_argument("--no-compile", action="store_true")
a = p.parse_args()

try:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
except Exception as e:  # noqa: BLE001 - any import failure means "no reference here"
    print(f"torch: unavailable (cannot import torch: {e})")
    sys.exit(0)
if not torch.cuda.is_available():
    print(f"torch: unavailable (torch {torch.__version__} sees no CUDA GPU)")
    sys.exit(0)
if not hasattr(F, "scaled_dot_product_attention") or not hasattr(torch, "compile"):
    print(f"torch: unavailable (torch {torch.__version__} lacks SDPA or torch.compile; needs 2.0 or later)")
    sys.exit(0)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import gpt2 as ref  # noqa: E402  (dev/reference/gpt2.py)

cfg = ref.resolve_config(json.load(open(a.config)) if a.config else {})
m = cfg["model"]
L, NH, C, V, Vp, T, B = m["n_layer"], m["n_head"], m["n_embd"], m["vocab_size"], m["padded_vocab_size"], a.seq, a.batch
hs = C // NH
scale = 8.0 / hs if m["attn_scale"] == "mup" else hs ** -0.5
gen = torch.Generator().manual_seed(0)


def linear_macs(st):
    """Forward MACs per token of a resolved layer (llmc/structure.h's count)."""
    core = sum(nb * q * p for nb, q, p in st["cores"])
    if st["type"] == "btt_moe":
        return core * st["top_k"] / st["experts"] + st["experts"] * st["d_in"]
    return core


class Structured(nn.Module):
    """One projection as the reference computes it: parameters named by DESIGN's suffixes (W | W0, W1, G,
    gamma0, gamma1, b), forward = structure_apply (einsum), initialized as the reference initializes."""

    def __init__(self, name):
        super().__init__()
        self.st = ref.model_structure(cfg, name)
        rule = ref.init_and_lr(self.st, name, L, C, m["base_width"], m["parametrization"])
        self.params = nn.ParameterDict({k: nn.Parameter(v) for k, v in ref.init_linear(self.st, rule, gen).items()})

    def forward(self, x, moe):
        y = ref.structure_apply(self.st, dict(self.params.items()), x.reshape(-1, x.shape[-1]), moe)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def projection(name):
    if ref.linear_spec(cfg, name).get("type", "dense") == "dense":
        d_in, d_out = ref.linear_dims(cfg, name)
        lin = nn.Linear(d_in, d_out)
        return lambda x, moe: lin(x), lin
    s = Structured(name)
    return s, s


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.m_qkv = projection("attn_qkv")
        self.proj, self.m_proj = projection("attn_proj")
        self.fc, self.m_fc = projection("mlp_fc")
        self.mproj, self.m_mproj = projection("mlp_proj")
        if m["qk_norm"]:
            self.qn, self.kn = nn.LayerNorm(hs), nn.LayerNorm(hs)

    def forward(self, x, moe):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x), moe).split(C, dim=2)
        q, k, v = (z.view(b, t, NH, hs) for z in (q, k, v))
        if m["qk_norm"]:
            q, k = self.qn(q), self.kn(k)
        q = q * (scale * hs ** 0.5)   # SDPA scales by 1/sqrt(hs); this makes it `scale`
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, C), moe)
        return x + self.mproj(F.gelu(self.fc(self.ln2(x), moe), approximate="tanh"), moe)


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(Vp, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.lnf = nn.LayerNorm(C)

    def forward(self, idx, targets):
        moe = {"aux": [], "z_weight": m["moe"]["z_weight"]}
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x, moe)
        logits = F.linear(self.lnf(x), self.wte.weight)[..., :V]
        loss = F.cross_entropy(logits.float().view(-1, V), targets.view(-1))
        if moe["aux"]:
            loss = loss + m["moe"]["aux_weight"] * torch.stack(moe["aux"]).mean()
        return loss


torch.manual_seed(0)
torch.backends.cuda.matmul.allow_tf32 = True
model = GPT().cuda()
opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
step_fn = model if a.no_compile else torch.compile(model)
x = torch.randint(0, V, (B, T), device="cuda")
y = torch.randint(0, V, (B, T), device="cuda")


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = step_fn(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


try:
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.time()
    for _ in range(a.steps):
        step()
    torch.cuda.synchronize()
except RuntimeError as e:  # torch.cuda.OutOfMemoryError is one
    if "out of memory" not in str(e):
        raise
    print(f"torch: unavailable (out of memory at micro-batch {B})")
    sys.exit(0)
ms = (time.time() - t0) * 1e3 / a.steps
tps = B * T / (ms / 1e3)
macs = Vp * C + L * sum(linear_macs(ref.model_structure(cfg, n)) for n in ref.LINEARS) + L * T * C
print(f"torch: tok/s {tps:.0f} mfu {6.0 * macs * tps / 989e12:.4f} ms {ms:.2f} ({torch.__version__}, {torch.cuda.get_device_name()})")
