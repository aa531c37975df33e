"""Plain-Python safetensors and llm.c model-file I/O for the PyTorch reference (no safetensors package:
Debian ships none, and writing the format by hand keeps it visible next to the C reader in llmc/checkpoint.h).

safetensors layout (DESIGN section 5):
    u64 little-endian N | N bytes of JSON header, space-padded so the data starts 8-byte aligned | data
    header: {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}
    offsets are relative to the start of the data; tensors are little-endian and row-major.
Our writer adds metadata "crc32" = a JSON string {name: 8 lowercase hex digits of zlib.crc32 of the tensor's bytes},
and the reader verifies it when present.
"""
import json
import struct
import sys
import zlib

import numpy as np
import torch

# dtype tag -> (torch dtype as stored, bytes per element)
_DTYPES = {"F32": (torch.float32, 4), "I32": (torch.int32, 4), "BF16": (torch.bfloat16, 2)}
_TAG_OF = {torch.float32: "F32", torch.int32: "I32", torch.bfloat16: "BF16"}
# Tensors are written from and read into native memory; the format is little-endian.
assert sys.byteorder == "little", "safetensors_io assumes a little-endian machine"


def _raw_bytes(t):
    """The tensor's little-endian bytes (numpy has no bfloat16, so bf16 goes through its int16 bit pattern)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def write_safetensors(path, tensors, metadata=None):
    """Write tensors (dict name -> F32/I32/BF16 torch tensor, kept in the dict's order) and string metadata.
    Deterministic: the same tensors and metadata always give the same bytes."""
    metadata = dict(metadata or {})
    header, blobs, crcs, offset = {}, [], {}, 0
    for name, t in tensors.items():
        if t.dtype not in _TAG_OF:
            raise ValueError(f"{path}: tensor {name}: dtype {t.dtype} not supported (F32, I32, BF16)")
        raw = _raw_bytes(t)
        header[name] = {"dtype": _TAG_OF[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        crcs[name] = "%08x" % (zlib.crc32(raw) & 0xFFFFFFFF)
        blobs.append(raw)
        offset += len(raw)
    metadata["crc32"] = json.dumps(crcs, separators=(",", ":"))
    for k, v in metadata.items():
        if not isinstance(v, str):
            raise ValueError(f"{path}: metadata {k}: safetensors metadata values must be strings")
    text = json.dumps({"__metadata__": metadata, **header}, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # 8 + len(text) is then a multiple of 8: the data is aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def read_safetensors(path):
    """Read a safetensors file -> (dict name -> tensor, metadata dict). F32 and I32 come back as stored,
    BF16 is widened to float32 (exactly: a bf16 is the top half of an fp32). Raises ValueError naming the file
    and tensor for a truncated file, bad offsets, an unsupported dtype or a CRC mismatch."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, too short for the header length")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} runs past the end of the file ({len(data)} bytes)")
    header = json.loads(data[8:8 + n].decode("utf-8"))
    metadata = header.pop("__metadata__", {}) or {}
    crcs = json.loads(metadata["crc32"]) if "crc32" in metadata else {}
    body = memoryview(data)[8 + n:]
    tensors = {}
    for name, info in header.items():
        tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if tag not in _DTYPES:
            raise ValueError(f"{path}: tensor {name}: dtype {tag} not supported (F32, I32, BF16)")
        dtype, size = _DTYPES[tag]
        count = 1
        for d in shape:
            count *= d
        if not (0 <= begin <= end <= len(body)) or end - begin != count * size:
            raise ValueError(f"{path}: tensor {name}: data_offsets [{begin}, {end}] do not hold shape {shape} "
                             f"of {tag} within {len(body)} data bytes")
        raw = bytes(body[begin:end])
        if name in crcs and "%08x" % (zlib.crc32(raw) & 0xFFFFFFFF) != crcs[name]:
            raise ValueError(f"{path}: tensor {name}: CRC-32 mismatch (stored {crcs[name]})")
        np_dtype = {"F32": "<f4", "I32": "<i4", "BF16": "<i2"}[tag]
        t = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).copy()).reshape(shape)
        if tag == "BF16":
            t = t.view(torch.bfloat16).float()
        tensors[name] = t
    return tensors, metadata


def bf16_round(x):
    """float32 -> bfloat16 bit patterns (int32 tensor holding uint16 values) by round-to-nearest-even:
    add 0x7FFF plus the lowest kept bit, then drop the low 16 bits (finite inputs; the model has no inf/NaN)."""
    bits = x.detach().float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(torch.int32)


def bf16_to_float(b16):
    """bfloat16 bit patterns (any integer tensor of uint16 values) -> float32, exactly."""
    return (b16.to(torch.int64) << 16).to(torch.int32).view(torch.float32)


LLMC_MAGIC = 20240326
LLMC_VERSION = {"fp32": 3, "bf16": 5}


def llmc_param_order(cfg):
    """[(llm.c tensor, [our parameter names concatenated in it])] in llm.c's file order (dense model only)."""
    L = cfg["model"]["n_layer"]
    per_layer = lambda key: [f"h.{i}.{key}" for i in range(L)]
    return [("wte", ["wte"]), ("wpe", ["wpe"]),
            ("ln1w", per_layer("ln1.w")), ("ln1b", per_layer("ln1.b")),
            ("qkvw", per_layer("attn_qkv.W")), ("qkvb", per_layer("attn_qkv.b")),
            ("attprojw", per_layer("attn_proj.W")), ("attprojb", per_layer("attn_proj.b")),
            ("ln2w", per_layer("ln2.w")), ("ln2b", per_layer("ln2.b")),
            ("fcw", per_layer("mlp_fc.W")), ("fcb", per_layer("mlp_fc.b")),
            ("fcprojw", per_layer("mlp_proj.W")), ("fcprojb", per_layer("mlp_proj.b")),
            ("lnfw", ["lnf.w"]), ("lnfb", ["lnf.b"])]


def write_llmc_model(path, params, cfg, dtype="fp32"):
    """Write llm.c's model file (gpt2_124M.bin layout): 256 int32 header
    {20240326, 3 (fp32) | 5 (bf16), maxT, V, L, NH, C, Vp, 0...}, then every parameter flattened row-major in
    llm.c order, each kind concatenated over the layers; bf16 values by round-to-nearest-even."""
    if dtype not in LLMC_VERSION:
        raise ValueError(f"{path}: dtype {dtype!r}: expected 'fp32' or 'bf16'")
    m = cfg["model"]
    header = [LLMC_MAGIC, LLMC_VERSION[dtype], m["block_size"], m["vocab_size"], m["n_layer"], m["n_head"],
              m["n_embd"], m["padded_vocab_size"]]
    header += [0] * (256 - len(header))
    flat = torch.cat([params[name].detach().float().reshape(-1)
                      for _, names in llmc_param_order(cfg) for name in names])
    payload = _raw_bytes(flat) if dtype == "fp32" else bf16_round(flat).numpy().astype("<u2").tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(payload)
