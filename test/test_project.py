#!/usr/bin/python3
"""dev/tools/project: the structure <-> dense conversions and whole-checkpoint projection.

Layer-level checks run in float64 on random matrices (small shapes, including a Monarch whose blocks do not
divide its middle width q, so that its (block, block) pairs have unequal ranks). Checkpoint-level checks run the
tool on a tiny model written here into a temporary directory, read the result back with the reference
(dev/reference/gpt2.py) and with the C trainer (./train_gpt2 --init-from --eval, built by `make`).
"""
import contextlib
import importlib.machinery
import importlib.util
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
sys.path.insert(0, os.path.join(ROOT, "test"))
import gpt2  # noqa: E402
from checks import check  # noqa: E402
from safetensors_io import read_safetensors, write_llmc_model, write_safetensors  # noqa: E402

TOOL = os.path.join(ROOT, "dev", "tools", "project")
_loader = importlib.machinery.SourceFileLoader("project", TOOL)
P = importlib.util.module_from_spec(importlib.util.spec_from_loader("project", _loader))
_loader.exec_module(P)

# (spec, d_in, d_out): every projectable structure, square and rectangular, default and explicit shapes
CASES = [({"type": "dense"}, 24, 40), ({"type": "blockdiag", "blocks": 4}, 32, 96),
         ({"type": "lowrank", "rank": 5}, 24, 40), ({"type": "monarch", "blocks": 4}, 32, 96),
         ({"type": "monarch", "blocks": 4}, 128, 32), ({"type": "monarch", "blocks": 8}, 48, 96),
         ({"type": "btt", "rank": 2}, 32, 96), ({"type": "btt", "rank": 3, "in_blocks": 4, "out_blocks": 8}, 32, 64),
         ({"type": "btt", "rank": 2, "weight_norm": "rms_cap"}, 32, 96)]


def rel(a, b):
    return (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()


def random_layer(st, gen, dtype=torch.float64):
    t = {s: torch.randn(shape, generator=gen, dtype=dtype) for s, shape in P.layer_shapes(st).items()}
    for c in range(len(st["cores"])):
        if st["rms_cap"]:
            t[f"gamma{c}"] = torch.tensor([0.7 + c], dtype=dtype)   # cap binds: randn cores have RMS ~1 > sigma
    return t


def run_tool(*args):
    """The tool in-process (one torch import for the whole test): (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = P.main([str(a) for a in args])
        except SystemExit as e:                            # argparse's usage errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def layer_checks():
    gen = torch.Generator().manual_seed(0)
    for spec, d_in, d_out in CASES:
        st = P.structure(spec, d_in, d_out, "standard", "test")
        name = f"{st['desc']} {d_in}->{d_out}"
        t = random_layer(st, gen)
        W = P.to_dense(st, t)
        # the reference layer (written independently from DESIGN 3) on the identity: rows are W^T + b
        t["b"] = torch.randn(d_out, generator=gen, dtype=torch.float64)
        try:
            y = gpt2.linear(spec, {f"p.{s}": v for s, v in t.items()}, "p", torch.eye(d_in, dtype=torch.float64))
            # float64, the same products summed in different orders: 1e-12 is ~1e4 ulps of slack
            check(rel((y - t["b"]).T, W) < 1e-12, f"multiplied-out {name} equals the reference layer on the identity",
                  f"rel err {rel((y - t['b']).T, W):.3g}")
        except (NotImplementedError, KeyError, TypeError) as e:
            check(False, f"multiplied-out {name} equals the reference layer on the identity",
                  f"reference cannot run it yet: {e!r}")
        # W has exactly the structure, so its projection is W itself: only SVD rounding remains (float64,
        # ~1e-15; 1e-10 leaves room for the conditioning of random blocks)
        back = P.to_dense(st, P.project(st, W))
        check(rel(back, W) < 1e-10, f"projecting the dense form of a {name} recovers it", f"rel err {rel(back, W):.3g}")


def optimality_checks():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    for kind, specs in (("btt", [{"type": "btt", "rank": r, "in_blocks": 4, "out_blocks": 4} for r in range(1, 14)]),
                        ("lowrank", [{"type": "lowrank", "rank": r} for r in range(1, 49, 4)])):
        errs = []
        for spec in specs:
            st = P.structure(spec, 48, 64, "standard", "test")
            errs.append(rel(P.to_dense(st, P.project(st, A)), A))
        # each rank's set of matrices contains the lower ranks' (a zero term), so an optimal projection cannot
        # do worse with more rank; 1e-12 absorbs float64 rounding of equal errors
        check(all(b <= a + 1e-12 for a, b in zip(errs, errs[1:])), f"{kind} projection error never increases with rank",
              " ".join(f"{e:.4f}" for e in errs))
        # btt with 4x4 blocks of (16, 12): rank 12 is full per block; lowrank: Eckart-Young's exact error
        if kind == "btt":
            check(errs[11] < 1e-12 and errs[12] < 1e-12, "btt of full block rank reproduces the matrix",
                  f"{errs[11]:.3g} {errs[12]:.3g}")
        else:
            s = torch.linalg.svdvals(A)
            want = [(s[r:].norm() / s.norm()).item() for r in range(1, 49, 4)]
            check(max(abs(a - b) for a, b in zip(errs, want)) < 1e-12, "lowrank error is Eckart-Young's",
                  f"{errs[:3]} vs {want[:3]}")
    # optimality of the (block, block) SVDs: no small move of the cores brings a Monarch closer to A
    st = P.structure({"type": "monarch", "blocks": 4}, 48, 64, "standard", "test")
    best = P.project(st, A)
    e0 = rel(P.to_dense(st, best), A)
    worse = 0
    for _ in range(20):
        moved = {s: v + 1e-3 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for s, v in best.items()}
        worse += rel(P.to_dense(st, moved), A) >= e0
    check(worse == 20, "monarch projection is a local optimum (20 random moves of the cores all do worse)",
          f"{20 - worse} moves improved on {e0:.6f}")


def tiny_model(tmp, gen):
    """A dense 2-layer model written like a checkpoint of ours (vocab 64 so a shard of ids < 64 evaluates it)."""
    cfg = {"model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "vocab_size": 64,
                     "padded_vocab_size": 64, "linear": {"default": {"type": "dense"}}},
           "train": {"micro_batch": 2, "seq_len": 16, "batch_tokens": 32},
           "data": {"train": "x.bin", "val": "x.bin"}, "run": {"dir": os.path.join(tmp, "run")}}
    shapes = gpt2.param_shapes(gpt2.resolve_config(cfg))
    params = {n: 0.1 * torch.randn(s, generator=gen) for n, s in shapes.items()}
    path = os.path.join(tmp, "dense.safetensors")
    write_safetensors(path, params, {"config": json.dumps(cfg)})
    return path, params, cfg


def dense_forms(path):
    """{layer prefix: dense matrix (float64)} of every linear layer of a model file, and its tensors and config."""
    tensors, meta = read_safetensors(path)
    model = P.resolve_model(json.loads(meta["config"]))
    structs = P.structures(model, path)
    forms = {}
    for i in range(model["n_layer"]):
        for proj in P.LINEARS:
            prefix = f"h.{i}.{proj}"
            st = structs[proj]
            forms[prefix] = P.to_dense(st, {s: tensors[f"{prefix}.{s}"].double() for s in P.layer_shapes(st)})
    return forms, tensors, meta


def c_eval(model_file, cfg_file, shard):
    """Mean loss of the C trainer on the shard for a model file, or None (with the output) if it failed."""
    trainer = os.path.join(ROOT, "train_gpt2")
    r = subprocess.run([trainer, cfg_file, "--init-from", model_file, "--eval", shard], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    for line in r.stdout.splitlines():
        if line.startswith("eval ") and ": loss " in line:
            return float(line.split(": loss ")[1].split()[0]), ""
    return None, r.stdout[-400:] + r.stderr[-400:]


def ref_eval(model_file, tokens, B, T):
    """The reference's mean loss over the shard's consecutive windows, as the trainer's --eval computes it."""
    params, cfg = gpt2.load_model(model_file)
    n = (len(tokens) - 1) // (B * T)
    losses = []
    with torch.no_grad():
        for k in range(n):
            chunk = torch.tensor(tokens[k * B * T:(k + 1) * B * T + 1].astype(np.int64))
            x, y = chunk[:-1].reshape(B, T), chunk[1:].reshape(B, T)
            losses.append(gpt2.cross_entropy(gpt2.forward(params, cfg, x), y, cfg["model"]["vocab_size"]).item())
    return sum(losses) / len(losses)


def checkpoint_checks(tmp):
    gen = torch.Generator().manual_seed(2)
    src, params, cfg = tiny_model(tmp, gen)
    src_bytes = open(src, "rb").read()
    j = lambda name: os.path.join(tmp, name)

    rc, out, err = run_tool(src, j("monarch.safetensors"), "--to", "monarch", "--config-out", j("monarch.json"))
    if not check(rc == 0, "dense -> monarch checkpoint", err):
        return
    lines = [ln for ln in out.splitlines() if ln.startswith("h.") and "relative error" in ln]
    check(len(lines) == 8, "one error line per layer (2 layers x 4)", out)
    mon, mt, meta = dense_forms(j("monarch.safetensors"))
    dense0 = {p: params[p + ".W"].double() for p in mon}
    printed = {ln.split()[0]: float(ln.split()[-1]) for ln in lines}
    check(all(abs(printed[p] - rel(mon[p], dense0[p])) < 1e-5 for p in mon), "printed errors are the files' errors",
          str(printed))   # printed with 6 decimals, recomputed from the fp32-rounded cores
    carried = [n for n in params if n.split(".")[-1] not in ("W",)]
    check(all(torch.equal(mt[n], params[n]) for n in carried), "embeddings, LayerNorms and biases carried over exactly")
    new_cfg = json.loads(meta["config"])
    check(meta.get("format") == "structured-gpt2/1" and meta.get("step") == "0" and "header_crc32" in meta,
          "metadata: format, step 0, header_crc32", str({k: meta.get(k) for k in ("format", "step")}))
    check(new_cfg["model"]["linear"]["mlp_fc"] == {"type": "monarch", "blocks": 4, "weight_norm": "none"}
          and json.load(open(j("monarch.json"))) == new_cfg, "config in metadata and --config-out: structures written out",
          json.dumps(new_cfg["model"]["linear"]))

    # structure -> dense -> the same structure: the dense matrices are the Monarch's, so projecting them back
    # returns them; fp32 storage of the factors in between: 1e-6 relative is ~10x float32's epsilon
    rc1, _, e1 = run_tool(j("monarch.safetensors"), j("dense.back.safetensors"), "--to", "dense")
    rc2, _, e2 = run_tool(j("dense.back.safetensors"), j("monarch2.safetensors"), "--to", "monarch")
    if check(rc1 == 0 and rc2 == 0, "monarch -> dense -> monarch runs", e1 + e2):
        back, _, _ = dense_forms(j("dense.back.safetensors"))
        mon2, _, _ = dense_forms(j("monarch2.safetensors"))
        e_dense = max(rel(back[p], mon[p]) for p in mon)
        e_again = max(rel(mon2[p], mon[p]) for p in mon)
        check(e_dense < 1e-6, "monarch -> dense multiplies out exactly", f"{e_dense:.3g}")
        check(e_again < 1e-6, "monarch -> dense -> monarch is the same model", f"{e_again:.3g}")

    # rms_cap target: gamma absorbs the cap, the model computes the plain projection
    rc1, _, e1 = run_tool(src, j("btt.safetensors"), "--to", "btt", "--set", "model.linear.default.rank=2",
                          "--config-out", j("btt.json"))
    rc2, _, e2 = run_tool(src, j("btt_mup.safetensors"), "--to", "btt", "--set", "model.linear.default.rank=2",
                          "--set", "model.parametrization=mup", "--config-out", j("btt_mup.json"))
    if check(rc1 == 0 and rc2 == 0, "dense -> btt, with and without rms_cap", e1 + e2):
        plain, _, _ = dense_forms(j("btt.safetensors"))
        capped, ct, _ = dense_forms(j("btt_mup.safetensors"))
        e = max(rel(capped[p], plain[p]) for p in plain)
        gammas = [ct[n].item() for n in ct if "gamma" in n]
        check(len(gammas) == 16 and e < 1e-6, "rms_cap projection: gamma makes the capped cores the projection",
              f"{len(gammas)} gammas, rel err {e:.3g}")

    # llm.c model files (fp32 and bf16) read as the dense model they hold
    for dtype, tol in (("fp32", 0.0), ("bf16", 2 ** -8)):     # bf16 keeps 8 significant bits
        binf = j(f"model_{dtype}.bin")
        write_llmc_model(binf, params, gpt2.resolve_config(cfg), dtype)
        rc, _, e = run_tool(binf, j(f"from_{dtype}.safetensors"), "--to", "dense")
        if check(rc == 0, f"llm.c {dtype} model file read", e):
            got, _ = read_safetensors(j(f"from_{dtype}.safetensors"))
            worst = max(((got[n] - params[n]).abs() / params[n].abs().clamp(min=1e-30)).max().item() for n in params)
            check(set(got) == set(params) and worst <= tol, f"llm.c {dtype} tensors carried into ours",
                  f"max rel diff {worst:.3g}")

    # the C trainer loads the projected checkpoints and computes the reference's loss on them
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 64, size=2 * 2 * 16 + 1).astype("<u2")
    shard = j("shard.bin")
    header = np.zeros(256, "<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(shard, "wb") as f:
        f.write(header.tobytes() + tokens.tobytes())
    for name in ("monarch", "btt_mup"):
        c_loss, log = c_eval(j(f"{name}.safetensors"), j(f"{name}.json"), shard)
        if check(c_loss is not None, f"C trainer loads the projected {name} checkpoint", log):
            r_loss = ref_eval(j(f"{name}.safetensors"), tokens, 2, 16)
            # fp32 on both sides, different summation orders; the printed loss has 6 decimals
            check(abs(c_loss - r_loss) < 1e-4 * abs(r_loss), f"C and reference agree on the projected {name}",
                  f"C {c_loss:.6f} reference {r_loss:.6f}")

    # refusals: a message naming the file / key / value, non-zero exit, nothing written over
    bad = [(("--to", "monarch"), j("nothere.safetensors"), j("x1.safetensors"), "nothere.safetensors: no such"),
           (("--to", "monarch"), src, src, "is the input"),
           (("--to", "monarch"), src, j("monarch.safetensors"), "exists (use --force"),
           (("--to", "monarch", "--set", "model.linear.default.blocks=5"), src, j("x2.safetensors"),
            "model.linear.default.blocks: 5: must divide"),
           (("--to", "monarch", "--set", "model.linear.mlp_fc.rank=2"), src, j("x3.safetensors"),
            "model.linear.mlp_fc.rank: 2: not a key of type \"monarch\""),
           (("--set", "model.linear.default.type=btt_moe"), src, j("x4.safetensors"), "btt_moe"),
           (("--to", "btt", "--set", "optim.lr=1"), src, j("x5.safetensors"), "--set: optim.lr: not a key"),
           (("--config", j("monarch.json"), "--set", 'model.linear.attn_qkv={"type": "dense"}'), j("model_fp32.bin"),
            j("x6.safetensors"), None)]
    with open(j("wide.json"), "w") as f:
        json.dump({"model": dict(cfg["model"], n_embd=64)}, f)
    bad.append((("--config", j("wide.json")), src, j("x7.safetensors"), "model.n_embd: 64: the input"))
    with open(j("truncated.safetensors"), "wb") as f:
        f.write(src_bytes[:len(src_bytes) // 2])
    bad.append((("--to", "dense"), j("truncated.safetensors"), j("x8.safetensors"), "truncated.safetensors: "))
    for opts, inp, outp, want in bad:
        rc, _, e = run_tool(inp, outp, *opts)
        if want is None:     # a good run among the refusals: --config from a .bin with --set on top
            check(rc == 0, "--config TARGET.json with --set on an llm.c file", e)
            continue
        check(rc == 1 and want in e and not os.path.exists(outp + ".tmp") and
              (outp == src or outp.endswith("monarch.safetensors") or not os.path.exists(outp)),
              f"refused: {want}", f"rc {rc}: {e.strip()}")
    check(open(src, "rb").read() == src_bytes, "the input file is never modified")
    r = subprocess.run([TOOL, src], capture_output=True, text=True)
    check(r.returncode == 2 and "usage" in r.stderr, "missing OUT: usage error from the executable", r.stderr[-200:])


def main():
    torch.set_num_threads(1)
    layer_checks()
    optimality_checks()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_checks(tmp)


if __name__ == "__main__":
    main()
