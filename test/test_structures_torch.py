#!/usr/bin/python3
"""Tests of the reference's structured linear layers (dev/reference/gpt2.py, DESIGN section 3) on their own:
  - monarch equals fly's MonarchLinear (HazyResearch): blockdiag_butterfly_multiply rewritten here from the
    Monarch paper's M = P L P^T R, both as block loops and as explicit permutation and block-diagonal matrices;
  - each structure equals its dense form: lowrank U V, blockdiag b=1, rank-r BTT = sum of rank-1 BTTs,
    square rank-1 BTT = Monarch up to a fixed output permutation;
  - autograd gradients equal finite differences (torch.autograd.gradcheck, float64) for every layer fixture's
    structure, rms_cap above and below the cap, btt_moe away from routing ties;
  - btt_moe: E=1 is the BTT, k=E the softmax-weighted mixture of all experts, routing ties go to the lower
    index, all tokens to one expert, an expert without tokens, the aux loss against a loop;
  - init std and lr multipliers: empirical std of a GPT-2-124M-sized init, output variance of the standard
    init equal to the dense layer's, the table against second statements of DESIGN's formulas.
Prints "ok - name" / "FAIL - name: detail" per check (test/run counts them).
"""
import json
import math
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))
import checks  # noqa: E402
from checks import check  # noqa: E402
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
import gpt2  # noqa: E402
import make_fixtures as mf  # noqa: E402

F64 = torch.float64


def rel_err(a, b):
    """max |a-b| / max |b|: the error relative to the tensor's scale."""
    a, b = a.double(), b.double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def randn(*shape, gen, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=F64)


def dense_of(st, p):
    """The (d_out, d_in) matrix of a layer without its bias: the reference applied to the identity, so row i of
    the output is S(e_i) and the matrix is its transpose."""
    p = dict(p, b=torch.zeros(st["d_out"], dtype=F64))
    return gpt2.structure_apply(st, p, torch.eye(st["d_in"], dtype=F64)).T


def random_cores(st, gen):
    return {nm: randn(*shape, gen=gen) for nm, shape in zip(gpt2.core_names(st), st["cores"])}


# ----------------------------------------------------------------------------------------------------------------
# monarch against fly

def fly_butterfly_multiply(x, w1, w2):
    """fly's blockdiag_butterfly_multiply (the Monarch paper's M x = P L P^T R x), written from the paper:
    x (batch, n); w1 (k, q, p) the k blocks of R, each p -> q; w2 (l, s, r) the l blocks of L, each r -> s,
    with k p = n and l r = k q. R's output, a vector of k q, is read as an (r, l) grid and transposed to (l, r)
    (P^T: "reshape-transpose"), L acts blockwise, and its output (l, s) is transposed to (s, l) (P)."""
    batch, n = x.shape
    k, q, p = w1.shape
    l, s, r = w2.shape
    assert k * p == n and l * r == k * q
    out1 = torch.zeros(batch, k * q, dtype=x.dtype)
    for blk in range(k):
        out1[:, blk * q:(blk + 1) * q] = x[:, blk * p:(blk + 1) * p] @ w1[blk].T
    mid = torch.zeros(batch, l * r, dtype=x.dtype)
    for a in range(r):                                   # (r, l) -> (l, r)
        for c in range(l):
            mid[:, c * r + a] = out1[:, a * l + c]
    out2 = torch.zeros(batch, l * s, dtype=x.dtype)
    for blk in range(l):
        out2[:, blk * s:(blk + 1) * s] = mid[:, blk * r:(blk + 1) * r] @ w2[blk].T
    y = torch.zeros(batch, s * l, dtype=x.dtype)
    for c in range(l):                                   # (l, s) -> (s, l)
        for j in range(s):
            y[:, j * l + c] = out2[:, c * s + j]
    return y


def transpose_permutation(rows, cols):
    """The permutation matrix P with (P v)[(j i)] = v[(i j)] for v read as a (rows, cols) grid."""
    P = torch.zeros(rows * cols, rows * cols, dtype=F64)
    for i in range(rows):
        for j in range(cols):
            P[j * rows + i, i * cols + j] = 1.0
    return P


def test_monarch_is_fly():
    """Monarch (our W0 = fly's blkdiag1 (b, q, d_in/b), W1 = blkdiag2 (b, d_out/b, q)) against fly's algorithm
    on square and both non-square shapes, and against M = P_out L P_mid R built from matrices; float64, so
    1e-12 is rounding. For a square layer the two permutations are each other's transpose: M = P L P^T R."""
    gen = torch.Generator().manual_seed(1)
    for d_in, d_out, b in ((64, 64, 4), (64, 64, 8), (32, 96, 4), (128, 32, 4), (48, 80, 8)):
        st = gpt2.resolve_linear({"type": "monarch", "blocks": b}, d_in, d_out)
        p = random_cores(st, gen)
        ours = dense_of(st, p)
        fly = fly_butterfly_multiply(torch.eye(d_in, dtype=F64), p["W0"], p["W1"]).T
        check(rel_err(ours, fly) < 1e-12, f"monarch {d_in}->{d_out} b={b} equals fly's butterfly multiply",
              f"rel err {rel_err(ours, fly):.2e}")
        q, s = st["cores"][0][1], d_out // b
        R, L = torch.block_diag(*p["W0"]), torch.block_diag(*p["W1"])
        P_mid, P_out = transpose_permutation(q, b), transpose_permutation(b, s)
        M = P_out @ L @ P_mid @ R
        square_form = d_in != d_out or torch.equal(P_mid, P_out.T)
        check(rel_err(ours, M) < 1e-12 and square_form,
              f"monarch {d_in}->{d_out} b={b} equals P_out L P_mid R (P_mid = P_out^T when square)",
              f"rel err {rel_err(ours, M):.2e}")


# ----------------------------------------------------------------------------------------------------------------
# structures against their dense forms

def test_dense_forms():
    gen = torch.Generator().manual_seed(2)
    st = gpt2.resolve_linear({"type": "lowrank", "rank": 5}, 24, 40)
    p = random_cores(st, gen)
    UV = p["W1"][0] @ p["W0"][0]                           # U (d_out, r) V (r, d_in)
    check(rel_err(dense_of(st, p), UV) < 1e-12 and torch.linalg.matrix_rank(dense_of(st, p)).item() == 5,
          "lowrank equals the dense U V (rank 5)")

    st = gpt2.resolve_linear({"type": "blockdiag", "blocks": 1}, 24, 40)
    W = randn(1, 40, 24, gen=gen)
    check(rel_err(dense_of(st, {"W": W}), W[0]) < 1e-12, "blockdiag b=1 equals dense")
    dense = gpt2.resolve_linear({"type": "dense"}, 24, 40)
    x = randn(7, 24, gen=gen)
    b = randn(40, gen=gen)
    check(rel_err(gpt2.structure_apply(dense, {"W": W[0], "b": b}, x), x @ W[0].T + b) < 1e-12,
          "dense is x W^T + b with W (d_out, d_in)")
    st = gpt2.resolve_linear({"type": "blockdiag", "blocks": 4}, 24, 40)
    W = randn(4, 10, 6, gen=gen)
    check(rel_err(dense_of(st, {"W": W}), torch.block_diag(*W)) < 1e-12,
          "blockdiag b=4 equals the block-diagonal matrix of its blocks")

    # rank-r BTT = sum of r rank-1 BTTs: slice a of W0 (m1, (j0 a), m0) and of W1 (n0, n1, (i1 a))
    st = gpt2.resolve_linear({"type": "btt", "rank": 3, "in_blocks": 4, "out_blocks": 5}, 24, 40)
    p = random_cores(st, gen)
    r, (m1, m0, n0, n1) = 3, (st["m1"], st["m0"], st["n0"], st["n1"])
    st1 = gpt2.resolve_linear({"type": "btt", "rank": 1, "in_blocks": 4, "out_blocks": 5}, 24, 40)
    total = sum(dense_of(st1, {"W0": p["W0"].reshape(m1, n0, r, m0)[:, :, a],
                               "W1": p["W1"].reshape(n0, n1, m1, r)[..., a]}) for a in range(r))
    check(rel_err(dense_of(st, p), total) < 1e-12, "rank-3 BTT equals the sum of its 3 rank-1 BTTs")

    # BTT index formula, entry by entry: W[(j0 j1), (i1 i0)] = sum_a W1[j0, j1, (i1 a)] W0[i1, (j0 a), i0]
    M = torch.zeros(40, 24, dtype=F64)
    for j0 in range(n0):
        for j1 in range(n1):
            for i1 in range(m1):
                for i0 in range(m0):
                    M[j0 * n1 + j1, i1 * m0 + i0] = sum(p["W1"][j0, j1, i1 * r + a] * p["W0"][i1, j0 * r + a, i0]
                                                        for a in range(r))
    check(rel_err(dense_of(st, p), M) < 1e-12, "BTT equals DESIGN 3.3's index formula entry by entry")

    # square rank-1 BTT with m1 = m0 = n0 = n1 = 8 (d = 64) vs Monarch b = 8 on the same cores: their outputs are
    # one permutation apart. Found from the matrices (random rows are distinct), and it is the transpose of the
    # output grid: monarch y[(j1 j0)] = btt y[(j0 j1)].
    btt = gpt2.resolve_linear({"type": "btt"}, 64, 64)
    mon = gpt2.resolve_linear({"type": "monarch", "blocks": 8}, 64, 64)
    p = random_cores(btt, gen)
    Mb, Mm = dense_of(btt, p), dense_of(mon, p)
    found = [int(torch.cdist(Mm[i:i + 1], Mb).argmin()) for i in range(64)]
    stated = [(i % 8) * 8 + i // 8 for i in range(64)]     # monarch row (j1 j0) is BTT row (j0 j1)
    check(btt["m1"] == btt["m0"] == btt["n0"] == btt["n1"] == 8 and found == stated
          and rel_err(Mm, Mb[stated]) < 1e-12,
          "square rank-1 BTT equals Monarch up to the output permutation (j0 j1) -> (j1 j0)", f"found {found[:10]}")


# ----------------------------------------------------------------------------------------------------------------
# gradients

def test_gradcheck():
    """torch.autograd.gradcheck (float64 central differences, eps 1e-6, atol 1e-5, rtol 1e-3: gradcheck's
    defaults, far above the ~1e-9 round-off and far below any wrong formula) of the full Jacobians in x and
    every parameter, on each layer fixture's spec at n_embd 16 (so that the Jacobians stay small; N = 4 tokens),
    the btt_moe ones with their aux loss as a second output. (gradcheck's fast_mode, a random projection of the
    Jacobian, passes a detached RMS in rms_cap: not used.) Routing is piecewise constant: a step of 1e-6 in one
    entry moves a logit by < 1e-5, so a margin of 1e-4 of the logits' RMS (~2) keeps every decision fixed."""
    for tag, case in mf.LAYER_CASES.items():
        case = dict(case, n_embd=16)
        st, _, params, x, _ = mf.layer_inputs(case, torch.Generator().manual_seed(3), F64)
        x = x[:4]
        names = list(params)
        moe = st["type"] == "btt_moe"
        if moe:
            margin = mf.route_margin(torch.einsum("ni,ei->ne", x, params["G"]), st["top_k"])
            if not check(margin > 1e-4, f"gradcheck {tag}: routing margin {margin:.2e} (relative) >> eps"):
                continue
        if st["rms_cap"]:
            ratios = [mf.rms_ratio(params[nm], st["mup_sigma"][c]) for c, nm in enumerate(gpt2.core_names(st))]
            check(min(ratios) < 0.95 or max(ratios) > 1.05, f"gradcheck {tag}: rms_cap cores away from the cap "
                  f"({', '.join(f'{r:.2f}' for r in ratios)})")

        def f(x, *ps):
            out = {"aux": [], "z_weight": 0.1}
            y = gpt2.structure_apply(st, dict(zip(names, ps)), x, out)
            return (y, out["aux"][0]) if moe else y

        inputs = [x.clone().requires_grad_(True)] + [params[k].clone().requires_grad_(True) for k in names]
        ok = torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, raise_exception=False)
        check(ok, f"gradcheck {tag} ({st['type']} {st['d_in']}->{st['d_out']}, params {', '.join(names)})")


def test_rms_cap():
    """rms_cap's value: below the cap W_eff = gamma W, above it gamma W sigma / RMS(W) (so RMS(W_eff) =
    gamma sigma); and its gradient flows through RMS above the cap: d/dW of sum(W_eff * G) has a component
    along W, which gamma G alone lacks (float64)."""
    gen = torch.Generator().manual_seed(4)
    sigma, gamma = 0.1, torch.tensor([1.3], dtype=F64)
    below, above = randn(8, 8, gen=gen, scale=0.05), randn(8, 8, gen=gen, scale=0.3)
    rms = lambda W: math.sqrt((W ** 2).mean().item() + 1e-8)  # noqa: E731
    check(rel_err(gpt2.capped(below, gamma, sigma), 1.3 * below) < 1e-15, "rms_cap below the cap: gamma W")
    eff = gpt2.capped(above, gamma, sigma)
    check(rel_err(eff, 1.3 * above * sigma / rms(above)) < 1e-14 and abs(rms(eff) - 1.3 * sigma) < 1e-6,
          "rms_cap above the cap: gamma W sigma / RMS(W), RMS(W_eff) = gamma sigma (up to the 1e-8 in RMS)")
    G = randn(8, 8, gen=gen)
    W = above.clone().requires_grad_(True)
    (gpt2.capped(W, gamma, sigma) * G).sum().backward()
    r = rms(above)
    # d/dW [gamma sigma/r sum(W G)] = gamma sigma/r (G - W sum(W G) / (n r^2))
    want = 1.3 * sigma / r * (G - above * (above * G).sum() / (64 * r * r))
    check(rel_err(W.grad, want) < 1e-7, "rms_cap gradient above the cap includes the RMS term",
          f"rel err {rel_err(W.grad, want):.2e} (the 1e-8 in RMS makes 1e-7)")


# ----------------------------------------------------------------------------------------------------------------
# btt_moe

def moe_setup(E, k, gen, d_in=24, d_out=40, N=12):
    st = gpt2.resolve_linear({"type": "btt_moe", "experts": E, "top_k": k, "in_blocks": 4, "out_blocks": 5},
                             d_in, d_out)
    p = random_cores(st, gen)
    p["G"] = randn(E, d_in, gen=gen, scale=0.5)
    p["b"] = randn(d_out, gen=gen)
    return st, p, randn(N, d_in, gen=gen)


def expert(st, p, e):
    """(structure, params) of expert e alone: the rank-1 BTT of rank slice e (DESIGN 3.6), bias 0."""
    m1, m0, n0, n1, E = st["m1"], st["m0"], st["n0"], st["n1"], st["experts"]
    st1 = gpt2.resolve_linear({"type": "btt", "in_blocks": m1, "out_blocks": n0}, st["d_in"], st["d_out"])
    return st1, {"W0": p["W0"].reshape(m1, n0, E, m0)[:, :, e], "W1": p["W1"].reshape(n0, n1, m1, E)[..., e],
                 "b": torch.zeros(st["d_out"], dtype=F64)}


def test_moe():
    gen = torch.Generator().manual_seed(5)
    # E = 1: the gate is 1 for every token, the layer is its one expert, the rank-1 BTT
    st, p, x = moe_setup(1, 1, gen)
    st1, p1 = expert(st, p, 0)
    y1 = gpt2.structure_apply(st1, p1, x) + p["b"]
    check(rel_err(gpt2.structure_apply(st, p, x), y1) < 1e-12, "btt_moe E=1 equals the rank-1 BTT")

    # k = E: every expert, weighted by the full softmax of the logits
    st, p, x = moe_setup(4, 4, gen)
    w = torch.softmax(x @ p["G"].T, dim=-1)
    mix = sum(w[:, e:e + 1] * gpt2.structure_apply(*expert(st, p, e), x) for e in range(4)) + p["b"]
    check(rel_err(gpt2.structure_apply(st, p, x), mix) < 1e-12, "btt_moe k=E equals the softmax-weighted mixture")

    # k = 2 of 4, against a loop over tokens: top-2 by value, softmax over the two
    st, p, x = moe_setup(4, 2, gen)
    y = gpt2.structure_apply(st, p, x)
    logits = x @ p["G"].T
    loop = []
    for n in range(x.shape[0]):
        order = sorted(range(4), key=lambda e: -logits[n, e].item())[:2]
        g = torch.softmax(logits[n, order], dim=0)
        loop.append(sum(g[i] * gpt2.structure_apply(*expert(st, p, e), x[n:n + 1])[0] for i, e in enumerate(order)))
    check(rel_err(y, torch.stack(loop) + p["b"]) < 1e-12, "btt_moe k=2 equals a per-token loop over the top 2")

    # ties go to the lower expert index: experts 1 and 2 with identical router rows tie on every token
    G = randn(4, 24, gen=gen)
    G[2] = G[1]
    G[0], G[3] = -10 * G[1], -10 * G[1]                    # 1 and 2 clearly above 0 and 3 where G[1] x > 0
    xs = randn(50, 24, gen=gen)
    xs = xs * torch.sign(xs @ G[1]).unsqueeze(1)           # make G[1] x > 0 for every token
    sel, gates = gpt2.route(xs @ G.T, 1)
    check(bool((sel[:, 0] == 1).all()) and bool((gates[:, 1] == 1).all()), "routing ties go to the lower index")
    sel, gates = gpt2.route(xs @ G.T, 2)
    check(bool((sel == torch.tensor([1, 2])).all()) and rel_err(gates[:, 1:3], torch.full((50, 2), 0.5)) == 0,
          "routing: a tie inside the top-k splits the gate evenly, selected in index order")

    # all tokens to one expert (k = 1): a router that prefers expert 2 for every token
    st, p, x = moe_setup(4, 1, gen)
    x = x.abs() + 0.1
    p["G"] = randn(4, 24, gen=gen, scale=0.01)
    p["G"][2] += 1.0
    out = {"aux": [], "routes": [], "z_weight": 0.3}
    y = gpt2.structure_apply(st, p, x, out)
    logits, selected, gates = out["routes"][0]
    y2 = gpt2.structure_apply(*expert(st, p, 2), x) + p["b"]
    check(bool((selected == 2).all()) and rel_err(y, y2) < 1e-12, "btt_moe: all tokens to one expert is that expert")
    P = torch.softmax(logits, dim=-1).mean(0)
    aux = 4 * P[2] + 0.3 * (torch.logsumexp(logits, dim=-1) ** 2).mean()   # f = (0, 0, 1, 0)
    check(abs(out["aux"][0].item() - aux.item()) < 1e-12, "btt_moe aux with all tokens on one expert: E P_e + z term")

    # an expert that gets no token: its cores get exactly zero gradient and do not change the output
    st, p, x = moe_setup(4, 2, gen)
    p["G"][3] = -50 * p["G"][3].abs()
    x = x.abs()
    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items()}
    out = {"aux": [], "routes": [], "z_weight": 0.1}
    y = gpt2.structure_apply(st, leaves, x, out)
    (y * randn(*y.shape, gen=gen)).sum().backward()
    m1, m0, n0, n1 = st["m1"], st["m0"], st["n0"], st["n1"]
    g0, g1 = leaves["W0"].grad.reshape(m1, n0, 4, m0), leaves["W1"].grad.reshape(n0, n1, m1, 4)
    unused = not bool((out["routes"][0][1] == 3).any())
    check(unused and g0[:, :, 3].abs().max() == 0 and g1[..., 3].abs().max() == 0
          and g0[:, :, :3].abs().max() > 0 and g1[..., :3].abs().max() > 0,
          "btt_moe: an expert with no tokens gets zero gradient, the others do not")

    # the aux loss against a loop: P_e mean softmax, f_e routed-slot fractions, z = mean lse^2
    st, p, x = moe_setup(5, 2, gen, N=30)
    out = {"aux": [], "routes": [], "z_weight": 0.25}
    gpt2.structure_apply(st, p, x, out)
    logits, selected, _ = out["routes"][0]
    counts = [0] * 5
    for n in range(30):
        for e in selected[n].tolist():
            counts[e] += 1
    probs = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits.tolist()]
    balance = 5 * sum(sum(pr[e] for pr in probs) / 30 * counts[e] / 60 for e in range(5))
    zloss = sum(math.log(sum(math.exp(u) for u in row)) ** 2 for row in logits.tolist()) / 30
    check(abs(out["aux"][0].item() - (balance + 0.25 * zloss)) < 1e-12, "btt_moe aux loss equals a loop over tokens")
    # f is a count: the aux gradient to G is that of E sum_e P_e f_e (f held) + z term, nothing from f
    Gl = p["G"].clone().requires_grad_(True)
    lg = x @ Gl.T
    f = torch.tensor(counts, dtype=F64) / 60
    want = torch.autograd.grad(5 * (torch.softmax(lg, -1).mean(0) * f).sum()
                               + 0.25 * (torch.logsumexp(lg, -1) ** 2).mean(), Gl)[0]
    Gl2 = p["G"].clone().requires_grad_(True)
    got = torch.autograd.grad(gpt2.moe_aux_loss(x @ Gl2.T, selected, 0.25), Gl2)[0]
    check(rel_err(got, want) < 1e-12, "btt_moe aux gradient: f_e is not differentiated")


# ----------------------------------------------------------------------------------------------------------------
# init and learning rates

def test_init_std():
    """Empirical std of GPT-2-124M-sized layers initialized by init_linear against the table's init_std: each
    core has >= 147k entries, so the sample std is within 0.4% (3 sigma of a std estimate: 3/sqrt(2n)) and 1%
    is safe. Then the standard init's purpose: output variance of the structured layer equal to the dense
    layer's (d_in s_d^2 for unit inputs), over 256 tokens: within 10% (the mean of >= 2e5 squared outputs, each
    a sum of >= 768 products: a spread of a few %), where a wrong exponent in the formula is off by >= 2x."""
    gen = torch.Generator().manual_seed(6)
    table = json.load(open(os.path.join(ROOT, "test", "fixtures", "structure_table.json")))
    picks = [e for e in table if e["n_embd"] == 768 and e["which"] in ("mlp_fc", "attn_proj")
             and len(e["spec"]) == 1 and e["spec"]["type"] != "dense"]
    bad = []
    for e in picks:
        st = gpt2.resolve_linear(e["spec"], e["d_in"], e["d_out"], e["parametrization"])
        rule = gpt2.init_and_lr(st, e["which"], 12, 768, 768, e["parametrization"])
        params = gpt2.init_linear(st, rule, gen, F64)
        for c, nm in enumerate(gpt2.core_names(st)):
            got, want = params[nm].std().item(), e["init_std"][c]
            if (want == 0 and got != 0) or (want > 0 and abs(got / want - 1) > 0.01):
                bad.append(f"{e['which']} {e['spec']} {e['parametrization']} {nm}: {got:.5f} vs {want:.5f}")
        if "G" in params and params["G"].abs().max() != 0:
            bad.append(f"{e['spec']}: router not zero-initialized")
    check(not bad and len(picks) == 20, f"init std of {len(picks)} GPT-2 124M layers matches the table",
          "; ".join(bad[:4]))

    bad = []
    for spec in ({"type": "blockdiag"}, {"type": "lowrank"}, {"type": "monarch"}, {"type": "btt"},
                 {"type": "btt", "rank": 4}):
        for which in ("mlp_fc", "mlp_proj"):
            st = gpt2.resolve_linear(spec, *mf.layer_dims(which, 768))
            rule = gpt2.init_and_lr(st, which, 12, 768)
            params = gpt2.init_linear(st, rule, gen, F64)
            x = randn(256, st["d_in"], gen=gen)
            var = gpt2.structure_apply(st, params, x).var().item()
            s_d = 0.02 / math.sqrt(24) if which == "mlp_proj" else 0.02
            if abs(var / (st["d_in"] * s_d ** 2) - 1) > 0.1:
                bad.append(f"{which} {spec}: var {var:.3e} vs dense {st['d_in'] * s_d ** 2:.3e}")
    check(not bad, "standard init: each structure's output variance is the dense layer's", "; ".join(bad))


def test_table_formulas():
    """structure_table.json against second statements of DESIGN's formulas, exact up to double rounding (1e-12):
      params: btt r (d_in n0 + d_out m1), monarch m (d_in + d_out) / b, lowrank r (d_in + d_out),
        blockdiag d_in d_out / b, btt_moe E (d_in n0 + d_out m1) + E d_in; macs: the same, btt_moe's cores k/E;
      standard init: one core s_d sqrt(b) (blockdiag), two cores s0 s1 p0 p1 = s_d^2 d_in... as variances:
        std0^2 std1^2 p0 p1 = s_d^2 d_in; mup: sigma = 1/sqrt(fan_in) when fan_out >= fan_in, else
        sqrt(fan_out)/fan_in; lr_mult_c fan_in_c ncores n_embd = base_width d_in;
      the DESIGN 3.3 default factorizations 768 = 32*24, 3072 = 64*48, 2304 = 48*48 (m1*m0, n0*n1)."""
    table = json.load(open(os.path.join(ROOT, "test", "fixtures", "structure_table.json")))
    bad = []
    close = lambda a, b: abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1e-300)  # noqa: E731
    for e in table:
        t, d_in, d_out, r = e["spec"]["type"], e["d_in"], e["d_out"], e["resolved"]
        where = f"{e['which']} {e['n_embd']} {e['spec']} {e['parametrization']}"
        params = {"dense": d_in * d_out}.get(t)
        if t == "blockdiag":
            params = d_in * d_out // r["blocks"]
        elif t == "monarch":
            params = min(d_in, d_out) * (d_in + d_out) // r["blocks"]
        elif t == "lowrank":
            params = r["rank"] * (d_in + d_out)
        elif t == "btt":
            params = r["rank"] * (d_in * r["n0"] + d_out * r["m1"])
        macs = params
        if t == "btt_moe":
            cores = r["experts"] * (d_in * r["n0"] + d_out * r["m1"])
            params, macs = cores + r["experts"] * d_in, cores * r["top_k"] / r["experts"] + r["experts"] * d_in
        if e["params"] != params or not close(e["macs"], macs):
            bad.append(f"{where}: params/macs {e['params']}/{e['macs']} vs {params}/{macs}")
        fans = [(p, q) for _, q, p in e["cores"]]
        if t == "btt_moe":
            fans = [(r["m0"], r["n0"]), (r["m1"], r["n1"])]
        for c, (fi, fo) in enumerate(fans):
            sigma = 1 / math.sqrt(fi) if fo >= fi else math.sqrt(fo) / fi
            if not close(e["mup_sigma"][c], sigma):
                bad.append(f"{where}: mup_sigma[{c}] {e['mup_sigma'][c]} vs {sigma}")
        nc = len(fans)
        s_d = 0.02 / math.sqrt(2 * e["n_layer"]) if e["which"] in ("attn_proj", "mlp_proj") else 0.02
        if e["parametrization"] == "standard":
            prod_var = math.prod(s ** 2 * fi for s, (fi, _) in zip(e["init_std"], fans))
            equal = nc == 1 or close(e["init_std"][0], e["init_std"][1])
            if not close(prod_var, s_d ** 2 * d_in) or not equal or e["lr_mult"] != [1.0] * nc:
                bad.append(f"{where}: standard init {e['init_std']} lr {e['lr_mult']}")
        else:
            zero_last = e["which"] in ("attn_proj", "mlp_proj")
            want = [0.0 if zero_last and c == nc - 1 else e["mup_sigma"][c] for c in range(nc)]
            lr_ok = all(close(m * fi * nc * e["n_embd"], e["base_width"] * d_in)
                        for m, (fi, _) in zip(e["lr_mult"], fans))
            if e["init_std"] != want or not lr_ok:
                bad.append(f"{where}: mup init {e['init_std']} lr {e['lr_mult']}")
        router = (1.0 if e["parametrization"] == "standard" else e["base_width"] / e["n_embd"]) if t == "btt_moe" else 0
        if not close(e["router_lr_mult"], router) and e["router_lr_mult"] != router:
            bad.append(f"{where}: router_lr_mult {e['router_lr_mult']}")
        default_cap = e["parametrization"] == "mup" and t in ("btt", "btt_moe")
        if e["rms_cap"] != (e["spec"].get("weight_norm", "rms_cap" if default_cap else "none") == "rms_cap"):
            bad.append(f"{where}: rms_cap {e['rms_cap']}")
        if t in ("btt", "btt_moe") and "in_blocks" not in e["spec"] and e["n_embd"] == 768:
            want = {768: (32, 24), 3072: (64, 48), 2304: (48, 48)}
            if (r["m1"], r["m0"]) != want[d_in] or (r["n0"], r["n1"]) != tuple(reversed(want[d_out])):
                bad.append(f"{where}: factorization m1={r['m1']} m0={r['m0']} n0={r['n0']} n1={r['n1']}")
    types = {e["spec"]["type"] for e in table}
    check(not bad and len(types) == 6 and len(table) > 300,
          f"structure_table.json ({len(table)} cases, every type) against second statements of the formulas",
          "; ".join(bad[:4]))


def main():
    torch.set_num_threads(1)
    for test in (test_monarch_is_fly, test_dense_forms, test_gradcheck, test_rms_cap, test_moe, test_init_std,
                 test_table_formulas):
        try:
            test()
        except Exception as e:  # a crash in one group is reported as its failure, the others still run
            check(False, test.__name__, f"{type(e).__name__}: {e}")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
