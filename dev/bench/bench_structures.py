#!/usr/bin/python3
"""PyTorch side of dev/bench/bench_structures: the structured layers of DESIGN section 3 written with
torch.bmm / matmul (the way their authors' code runs them), forward + autograd backward (dx and the
weight gradients, accumulated into .grad), no bias, float32 on the CPU with the same thread count as the C
side (OMP_NUM_THREADS, else nproc).

Structures and shapes as dev/bench/bench_structures.c: dense, blockdiag b=4, lowrank r=min/4, monarch b=4,
btt (closest-to-square factorization, rank 1) at the GPT-2 124M projections 768->2304, 768->768,
768->3072, 3072->768, N tokens. Each repetition times every case once (interleaved); each case reports
the median over reps after 1 warm-up repetition.

Usage: /usr/bin/python3 dev/bench/bench_structures.py [--tokens 4096] [--reps 5]
Prints one line per case: "RESULT struct=btt d_in=768 d_out=2304 ms=..."
"""
import argparse
import math
import os
import statistics
import time

import torch

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
TYPES = ["dense", "blockdiag", "lowrank", "monarch", "btt"]


def square_divisor(n):
    """The largest f <= sqrt(n) dividing n (DESIGN 3.3: n = (n/f) * f, f <= n/f)."""
    return max(f for f in range(1, math.isqrt(n) + 1) if n % f == 0)


def make_case(t, d_in, d_out, gen):
    """(weights, forward function x -> y) of structure t; weights stored (blocks, out, in) as in DESIGN 3."""
    def w(*shape):
        return (0.02 * torch.randn(*shape, generator=gen)).requires_grad_()
    if t == "dense":
        W = w(d_out, d_in)
        return [W], lambda x: x @ W.t()
    if t == "blockdiag":
        b = 4
        W = w(b, d_out // b, d_in // b)
        # (b, N, p) @ (b, p, q) -> (b, N, q) -> (N, b*q)
        return [W], lambda x: torch.bmm(x.reshape(-1, b, d_in // b).transpose(0, 1), W.transpose(1, 2)) \
            .transpose(0, 1).reshape(-1, d_out)
    if t == "lowrank":
        r = min(d_in, d_out) // 4
        V, U = w(r, d_in), w(d_out, r)
        return [V, U], lambda x: (x @ V.t()) @ U.t()
    if t == "monarch":
        b = 4
        m = min(d_in, d_out)
        q, p, s = m // b, d_in // b, d_out // b
        W0, W1 = w(b, q, p), w(b, s, q)

        def monarch(x):
            N = x.shape[0]
            u = torch.bmm(x.reshape(N, b, p).transpose(0, 1), W0.transpose(1, 2))  # (b, N, q): u[n, (i c)]
            u = u.transpose(0, 1).reshape(N, q, b).permute(2, 0, 1)                 # (b, N, q): u'[n, (l c)] = u[n, (c l)]
            v = torch.bmm(u, W1.transpose(1, 2))                                    # (b, N, s)
            return v.permute(1, 2, 0).reshape(N, d_out)                             # y[n, (s l)] = v[n, (l s)]
        return [W0, W1], monarch
    m0 = square_divisor(d_in)
    m1, n0 = d_in // m0, square_divisor(d_out)
    n1, r = d_out // n0, 1
    W0, W1 = w(m1, n0 * r, m0), w(n0, n1, m1 * r)

    def btt(x):
        N = x.shape[0]
        z = torch.bmm(x.reshape(N, m1, m0).transpose(0, 1), W0.transpose(1, 2))   # (m1, N, n0*r): z[n, i1, (j0 a)]
        z = z.reshape(m1, N, n0, r).permute(2, 1, 0, 3).reshape(n0, N, m1 * r)     # z'[n, j0, (i1 a)]
        y = torch.bmm(z, W1.transpose(1, 2))                                        # (n0, N, n1)
        return y.transpose(0, 1).reshape(N, d_out)                                  # y[n, (j0 j1)]
    return [W0, W1], btt


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", os.cpu_count()))
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1337)
    N = args.tokens
    cases = []
    for t in TYPES:
        for d_in, d_out in SHAPES:
            weights, fn = make_case(t, d_in, d_out, gen)
            x = torch.randn(N, d_in, generator=gen).requires_grad_()
            dy = torch.randn(N, d_out, generator=gen)
            cases.append((t, d_in, d_out, weights, fn, x, dy, []))
    for rep in range(-1, args.reps):
        for t, d_in, d_out, weights, fn, x, dy, ms in cases:
            x.grad = None  # dx is overwritten on our side; weight grads accumulate on both
            t0 = time.perf_counter()
            fn(x).backward(dy)
            t1 = time.perf_counter()
            if rep >= 0:
                ms.append((t1 - t0) * 1e3)
    for t, d_in, d_out, _, _, _, _, ms in cases:
        print(f"RESULT struct={t} d_in={d_in} d_out={d_out} ms={statistics.median(ms):.4f}")


if __name__ == "__main__":
    main()
