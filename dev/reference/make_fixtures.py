#!/usr/bin/python3
"""Write the dense GPT-2 fixtures the C tests compare against (contracts: "Reference fixture").

    dev/reference/make_fixtures.py [OUT_DIR]        (default test/fixtures)

gpt2_dense.safetensors          tiny model (L=2, NH=4, C=64, maxT=32, V=500 padded to 512), one batch B=4, T=32:
                                every parameter by its DESIGN name, inputs/targets I32 (4,32), logits (4,32,500),
                                loss (1,), grad.<name>, steps.loss (10,) of 10 AdamW steps, final.<name> after them;
                                __metadata__ "config" = the JSON config used
gpt2_dense_llmc_fp32.bin        the same initial weights as an llm.c model file, version 3 (fp32)
gpt2_dense_llmc_bf16.bin        ... version 5 (bf16, round-to-nearest-even)
gpt2_dense_bf16_logits.safetensors  inputs, targets, logits (4,32,500) and loss of the bf16-rounded weights

Deterministic: a fixed generator, one thread and deterministic algorithms give the same bytes on every run.
"""
import json
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

FILES = ("gpt2_dense.safetensors", "gpt2_dense_llmc_fp32.bin", "gpt2_dense_llmc_bf16.bin",
         "gpt2_dense_bf16_logits.safetensors")


def fixture_params(cfg, gen, dtype=torch.float32):
    """Random parameters in which every entry matters: matrices N(0, 0.02) (all rows of wte, the padded ones
    too, so weight decay on them shows), LayerNorm weights 1 + N(0, 0.1) (not all ones, so a swapped or
    dropped weight shows), biases N(0, 0.02) (not zero, for the same reason)."""
    params = {}
    for name, shape in gpt2.param_shapes(cfg).items():
        z = torch.randn(shape, generator=gen, dtype=torch.float64)
        is_ln_weight = len(shape) == 1 and name.endswith(".w")
        params[name] = (1.0 + 0.1 * z if is_ln_weight else 0.02 * z).to(dtype)
    return params


def fixture_batch(cfg, gen, B, T):
    """inputs, targets (B, T) int64: windows of T+1 random ids < vocab_size, targets the inputs shifted by one."""
    tokens = torch.randint(0, cfg["model"]["vocab_size"], (B, T + 1), generator=gen)
    return tokens[:, :T].contiguous(), tokens[:, 1:].contiguous()


def make_fixtures(out_dir):
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
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
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(os.path.join(out_dir, FILES[0]), tensors, meta)

    write_llmc_model(os.path.join(out_dir, FILES[1]), params, cfg, "fp32")
    write_llmc_model(os.path.join(out_dir, FILES[2]), params, cfg, "bf16")

    # what a reader of the bf16 file holds: every weight rounded to bf16, computed in fp32
    params16 = {k: bf16_to_float(bf16_round(p)).reshape(p.shape) for k, p in params.items()}
    with torch.no_grad():
        logits16 = gpt2.forward(params16, cfg, inputs)
    loss16 = gpt2.cross_entropy(logits16, targets, V).reshape(1)
    write_safetensors(os.path.join(out_dir, FILES[3]),
                      {"inputs": inputs.int(), "targets": targets.int(),
                       "logits": logits16[..., :V].contiguous(), "loss": loss16}, meta)
    return [os.path.join(out_dir, f) for f in FILES]


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "test", "fixtures")
    for path in make_fixtures(out):
        print(f"{os.path.normpath(path)}: {os.path.getsize(path)} bytes")
