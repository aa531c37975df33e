#!/usr/bin/env python3
"""The PyTorch reference for make bench-cuda: GPT-2 124M (the same model as ours: learned
embeddings, pre-LayerNorm blocks, causal attention, tanh-GELU MLP, tied LM head, vocab padded to
50304) trained with bf16 autocast, torch.compile, SDPA (flash) attention and fused AdamW on random
tokens, at the given micro-batch and T. Prints one line
    torch: tok/s X mfu Y ms Z
or, when PyTorch with CUDA is not there, one line starting "torch: unavailable" (exit 0), so the
benchmark still reports our numbers. MFU uses our FLOP count: 6 * (MACs of every matmul + causal
attention) per token, over the 989 TFLOP/s bf16 peak of an H100."""
import argparse
import sys
import time

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=16)
p.add_argument("--seq", type=int, default=1024)
p.add_argument("--steps", type=int, default=30)
p.add_argument("--warmup", type=int, default=10)
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

L, NH, C, V, Vp, T, B = 12, 12, 768, 50257, 50304, a.seq, a.batch


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(C), nn.LayerNorm(C)
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.fc, self.mproj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(C, dim=2)
        q, k, v = (z.view(b, t, NH, C // NH).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, C))
        return x + self.mproj(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(Vp, C), nn.Embedding(T, C)
        self.blocks = nn.ModuleList(Block() for _ in range(L))
        self.lnf = nn.LayerNorm(C)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        logits = F.linear(self.lnf(x), self.wte.weight)[..., :V]
        return F.cross_entropy(logits.float().view(-1, V), targets.view(-1))


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
flops = 6.0 * (Vp * C + 12.0 * C * C * L + L * T * C)
print(f"torch: tok/s {tps:.0f} mfu {flops * tps / 989e12:.4f} ms {ms:.2f} ({torch.__version__}, {torch.cuda.get_device_name()})")
