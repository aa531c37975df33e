"""Interoperability of llmc/checkpoint.h's safetensors files with PyTorch.

test/test_checkpoint.c writes build/test/st_sample.safetensors (test/run runs the C tests before the
Python ones). This reads it with an independent minimal reader that enforces what the safetensors
library (safetensors.torch.load_file) enforces, turns each tensor into a torch tensor with
torch.frombuffer, and checks the values against the formulas in test_checkpoint.c's write_sample,
the "crc32" metadata against zlib.crc32, and "header_crc32" against the canonical form documented at
the top of llmc/checkpoint.h.
"""
import json
import os
import struct
import sys
import zlib

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "test"))
import checks  # noqa: E402
from checks import check  # noqa: E402
SAMPLE = os.path.join(ROOT, "build", "test", "st_sample.safetensors")


DTYPES = {"F32": (torch.float32, 4), "I32": (torch.int32, 4), "BF16": (torch.bfloat16, 2),
          "F16": (torch.float16, 2), "F64": (torch.float64, 8), "I64": (torch.int64, 8),
          "U8": (torch.uint8, 1), "I8": (torch.int8, 1), "I16": (torch.int16, 2), "BOOL": (torch.bool, 1)}


def no_duplicates(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate key in {keys}")
    return dict(pairs)


def load(path):
    """(tensors {name: torch.Tensor}, metadata {str: str}, header dict, header length) with the checks
    of the safetensors library: header size bounds, UTF-8 JSON object starting with '{', string-only
    metadata, known dtypes, offsets contiguous from 0 that match dtype*shape and cover the data exactly."""
    blob = open(path, "rb").read()
    assert len(blob) >= 8, "shorter than 8 bytes"
    (n,) = struct.unpack("<Q", blob[:8])
    assert n <= 100_000_000 and 8 + n <= len(blob), f"header length {n} out of range"
    text = blob[8:8 + n].decode("utf-8")  # strict: invalid UTF-8 raises
    assert text.startswith("{"), "header does not start with '{'"
    header = json.loads(text, object_pairs_hook=no_duplicates)
    meta = header.get("__metadata__", {})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()), "non-string metadata"
    data = blob[8 + n:]
    entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"])
    tensors, pos = {}, 0
    for name, info in entries:
        dtype, size = DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        numel = 1
        for d in info["shape"]:
            assert isinstance(d, int) and d >= 0
            numel *= d
        assert begin == pos and end - begin == numel * size, f"{name}: bad data_offsets"
        pos = end
        raw = bytearray(data[begin:end])  # a writable copy: frombuffer warns on read-only buffers
        t = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
        tensors[name] = t.reshape(info["shape"])
    assert pos == len(data), f"data area is {len(data)} bytes, tensors cover {pos}"
    return tensors, meta, header, n, data


def header_crc(header, meta):
    """CRC-32 of the canonical header form (llmc/checkpoint.h): tensors by name, then metadata by key."""
    parts = []
    for name in sorted(k for k in header if k != "__metadata__"):
        info = header[name]
        b, e = info["data_offsets"]
        parts.append(f"{name}\0{info['dtype']}\0{','.join(str(d) for d in info['shape'])}\0{b},{e}\0")
    for key in sorted(k for k in meta if k != "header_crc32"):
        parts.append(f"{key}\0{meta[key]}\0")
    return zlib.crc32("".join(parts).encode("utf-8"))


def expected():
    """The formulas of write_sample in test/test_checkpoint.c."""
    f32 = torch.float32
    return {
        "a.weight": torch.tensor([(i * 37 % 101) / 8 - 6 for i in range(15)], dtype=f32).reshape(3, 5),
        "b.ids": torch.tensor([i * i - 7 * i for i in range(24)], dtype=torch.int32).reshape(2, 3, 4),
        "c.scalar": torch.tensor(3.5, dtype=f32),
        "d.empty": torch.empty(0, 4, dtype=f32),
        "e.ramp": torch.tensor([(i - 500) / 1024 for i in range(1000)], dtype=f32),
        "h.0.mlp_fc.W": torch.tensor([1 / (i + 1) for i in range(16)], dtype=f32).reshape(2, 2, 2, 2),
    }


def main():
    if not os.path.exists(SAMPLE):
        check(False, "sample file exists", f"{SAMPLE} is missing: run build/test/test_checkpoint first")
        return
    try:
        tensors, meta, header, n, data = load(SAMPLE)
    except Exception as e:  # any refusal by the reader is the failure being tested for
        check(False, "sample parses under safetensors' rules", repr(e))
        return
    check(True, "sample parses under safetensors' rules (UTF-8 JSON, contiguous offsets, exact size)")
    check((8 + n) % 8 == 0, "data area starts 8-byte aligned", f"8+N = {8 + n}")
    check(all(isinstance(v, str) for v in meta.values()), "metadata values are all strings")

    want = expected()
    check(sorted(tensors) == sorted(want), "tensor names", f"{sorted(tensors)}")
    for name, w in want.items():
        t = tensors.get(name)
        same = (t is not None and t.dtype == w.dtype and tuple(t.shape) == tuple(w.shape)
                and torch.equal(t, w))
        check(same, f"{name}: dtype, shape {tuple(w.shape)} and values exact",
              f"got {None if t is None else (t.dtype, tuple(t.shape))}")

    crcs = json.loads(meta.get("crc32", "{}"))
    check(sorted(crcs) == sorted(want), "crc32 metadata has one entry per tensor", f"{sorted(crcs)}")
    for name in want:
        info = header[name]
        b, e = info["data_offsets"]
        z = f"{zlib.crc32(data[b:e]):08x}"
        check(crcs.get(name) == z, f"{name}: crc32 metadata equals zlib.crc32", f"stored {crcs.get(name)}, zlib {z}")
    check(meta.get("header_crc32") == f"{header_crc(header, meta):08x}",
          "header_crc32 equals the canonical-form CRC", f"stored {meta.get('header_crc32')}")

    check(meta.get("format") == "structured-gpt2/1" and meta.get("step") == "42", "format and step metadata")
    check(meta.get("note") == "quotes \" backslash \\ newline \n UTF-8 \u00e9 \u2713", "metadata string escapes",
          repr(meta.get("note")))
    check(json.loads(meta.get("config", "null")) == {"model": {"n_layer": 2, "n_embd": 64}},
          "config metadata is JSON text", repr(meta.get("config")))


if __name__ == "__main__":
    main()
    sys.exit(1 if checks.failures else 0)
