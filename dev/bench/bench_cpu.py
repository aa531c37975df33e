#!/usr/bin/python3
"""PyTorch side of dev/bench/bench_cpu: the reference model (dev/reference/gpt2.py) trained on CPU in float32.

Same model (the config's model section via gpt2.resolve_config), same micro_batch x seq_len, same thread count
(OMP_NUM_THREADS, else nproc). One training step = gpt2.loss_and_grads (forward + loss + autograd backward)
+ gpt2.clip_grad_norm + gpt2.adamw_update, exactly what gpt2.train_steps runs. Random parameters (normal 0.02
for matrices, LayerNorm weights 1, biases 0) and random tokens: the speed does not depend on the values.
Also times torch's matmul on the model's largest shape, the tied LM head (B*T, C) x (C, Vp): the same three GEMMs
as dev/bench/bench_matmul.c (forward, dinp, dW).

Usage: /usr/bin/python3 dev/bench/bench_cpu.py [--config configs/default.json] [--steps 15] [--warmup 2]
Prints human-readable lines, then one line "RESULT key=value ..." for the shell script.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
import gpt2  # noqa: E402


def blas_line():
    for part in torch.__config__.show().replace(",", "\n").splitlines():
        if "BLAS_INFO" in part:
            return "BLAS_INFO=" + part.split("BLAS_INFO=", 1)[1].strip()
    return "BLAS_INFO=?"


def loaded_blas_libs():
    """Shared libraries with blas/mkl in their name mapped into this process (what BLAS_INFO=generic resolves to)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                p = line.split()[-1]
                name = os.path.basename(p).lower()
                if p.startswith("/") and ("blas" in name or "mkl" in name):
                    libs.add(os.path.realpath(p))
    except OSError:
        pass
    return sorted(libs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "default.json"))
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--matmul-reps", type=int, default=5)
    args = ap.parse_args()

    threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count())
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    with open(args.config) as f:
        cfg = gpt2.resolve_config(json.load(f))
    m, tr = cfg["model"], cfg["train"]
    B, T = tr["micro_batch"], tr["seq_len"]

    params = {}
    for name, shape in gpt2.param_shapes(cfg).items():
        if len(shape) >= 2:
            params[name] = torch.randn(shape, dtype=torch.float32) * 0.02
        elif name.endswith(".w"):
            params[name] = torch.ones(shape, dtype=torch.float32)
        else:
            params[name] = torch.zeros(shape, dtype=torch.float32)
    nparams = sum(p.numel() for p in params.values())
    mom = {k: torch.zeros_like(p) for k, p in params.items()}
    vel = {k: torch.zeros_like(p) for k, p in params.items()}
    inputs = torch.randint(0, m["vocab_size"], (B, T))
    targets = torch.randint(0, m["vocab_size"], (B, T))

    print(f"torch {torch.__version__}, {threads} threads, {blas_line()}")
    total, t_grad, t_clip, t_adam = [], [], [], []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        loss, grads = gpt2.loss_and_grads(params, cfg, inputs, targets)
        t1 = time.perf_counter()
        gpt2.clip_grad_norm(grads, cfg["optim"]["grad_clip"])
        t2 = time.perf_counter()
        gpt2.adamw_update(params, grads, mom, vel, step, gpt2.lr_at_step(cfg, step), cfg["optim"])
        t3 = time.perf_counter()
        if step >= args.warmup:
            total.append(t3 - t0); t_grad.append(t1 - t0); t_clip.append(t2 - t1); t_adam.append(t3 - t2)
    med = statistics.median(total)
    tok_s = B * T / med
    print(f"model: {m['n_layer']} layers, C {m['n_embd']}, Vp {m['padded_vocab_size']}, {nparams} params; "
          f"batch {B} x {T}; loss {float(loss):.4f}")
    print(f"step (median of {args.steps}): {med * 1e3:.1f} ms = loss_and_grads {statistics.median(t_grad) * 1e3:.1f}"
          f" + clip {statistics.median(t_clip) * 1e3:.1f} + adamw {statistics.median(t_adam) * 1e3:.1f} ms; "
          f"{tok_s:.0f} tok/s")

    # torch matmul on the LM head: out = x W^T, dinp = dout W, dW += dout^T x (the three GEMMs of bench_matmul.c)
    N, C, Vp = B * T, m["n_embd"], m["padded_vocab_size"]
    x = torch.randn(N, C) * 0.02
    W = torch.randn(Vp, C) * 0.02
    dout = torch.randn(N, Vp) * 0.02
    out, dinp, dW = torch.empty(N, Vp), torch.empty(N, C), torch.zeros(Vp, C)
    times = []
    for r in range(2 + args.matmul_reps):
        t0 = time.perf_counter()
        torch.matmul(x, W.t(), out=out)
        torch.matmul(dout, W, out=dinp)
        dW.addmm_(dout.t(), x)
        t1 = time.perf_counter()
        if r >= 2:
            times.append(t1 - t0)
    mm_s = statistics.median(times)
    gflops = 3 * 2 * N * C * Vp / mm_s / 1e9
    print(f"torch matmul LM head ({N}x{C}) x ({C}x{Vp}), fwd + 2 bwd GEMMs: {mm_s * 1e3:.1f} ms, {gflops:.1f} GFLOP/s")
    libs = loaded_blas_libs()
    print("torch BLAS libraries loaded: " + (", ".join(libs) if libs else "(none found in /proc/self/maps)"))
    print(f"RESULT threads={threads} tok_s={tok_s:.1f} step_ms={med * 1e3:.3f} "
          f"grad_ms={statistics.median(t_grad) * 1e3:.3f} clip_ms={statistics.median(t_clip) * 1e3:.3f} "
          f"adamw_ms={statistics.median(t_adam) * 1e3:.3f} matmul_gflops={gflops:.2f} matmul_ms={mm_s * 1e3:.3f}")


if __name__ == "__main__":
    main()
