#!/usr/bin/python3
"""PyTorch reads the C trainer's checkpoint and reproduces the C logits.

test_gpt2.c (run before this by test/run) trains the fixture model 10 steps, saves
build/test/gpt2_c/ckpt_00000010/ and the logits of that model in build/test/gpt2_c/logits.safetensors.
Here the reference (dev/reference/gpt2.py, written from DESIGN) loads the checkpoint by tensor name with
its own plain-Python safetensors reader and computes the logits again.
Tolerance 1e-5 of the logits' scale: both sides fp32, different summation orders (see test_gpt2.c).
"""
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "dev", "reference"))
sys.path.insert(0, os.path.join(ROOT, "test"))
import gpt2  # noqa: E402
from safetensors_io import read_safetensors  # noqa: E402
from checks import check  # noqa: E402


def main():
    ckpt = os.path.join(ROOT, "build/test/gpt2_c/ckpt_00000010")
    logits_path = os.path.join(ROOT, "build/test/gpt2_c/logits.safetensors")
    if not check(os.path.isdir(ckpt) and os.path.exists(logits_path), "C checkpoint present",
                 f"{ckpt} missing: test_gpt2.c must run first"):
        return
    params, cfg = gpt2.load_model(ckpt)
    _, meta = read_safetensors(os.path.join(ckpt, "model.safetensors"))
    check(meta.get("format") == "structured-gpt2/1" and meta.get("step") == "10",
          "checkpoint metadata format and step", str({k: meta.get(k) for k in ("format", "step")}))
    check(all(isinstance(v, str) for v in meta.values()), "metadata values are all strings")
    crcs = json.loads(meta["crc32"])
    check(set(crcs) == set(params), "crc32 metadata names every tensor")
    state, smeta = read_safetensors(os.path.join(ckpt, "state.safetensors"))
    check(set(state) == {f"{p}.{n}" for p in ("m", "v") for n in params}, "state holds m. and v. of every tensor")
    check("dataloader" in smeta and "config" in smeta, "state metadata has dataloader and config")

    c_out, _ = read_safetensors(logits_path)
    inputs = c_out["inputs"].long()
    V = cfg["model"]["vocab_size"]
    torch.set_num_threads(1)
    with torch.no_grad():
        ref = gpt2.forward(params, cfg, inputs)[..., :V]
    err = ((ref - c_out["logits"]).abs().max() / ref.abs().max()).item()
    check(err < 1e-5, "PyTorch reproduces the C logits from our model.safetensors", f"rel err {err:.3g}")


if __name__ == "__main__":
    main()
