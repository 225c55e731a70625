"""Writing safetensors shards without holding them in memory (transformers' file layout)."""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from megatron_longpo.checkpoint.hf import CheckpointMismatchError

_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, '123' -> 123 bytes (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r}; write it like 2GB, 500MB or 5GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return n


class StreamingSafetensorsWriter:
    """Writes a planned set of tensors into model.safetensors, or model-0000i-of-0000N.safetensors
    shards of at most `max_shard_bytes` plus model.safetensors.index.json (transformers' layout),
    each tensor written at its offset the moment it is added,
    in any order: memory is the tensor being written."""

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 10**9):
        if dtype not in _SAFETENSORS_DTYPE:
            raise ValueError(f"cannot write dtype {dtype} to safetensors")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        size = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = []
        cur_bytes = 0
        for name, shape in plan:
            n = size * int(torch.Size(shape).numel())
            if not shards or (shards[-1] and cur_bytes + n > max_shard_bytes):
                shards.append([])
                cur_bytes = 0
            shards[-1].append((name, tuple(shape), n))
            cur_bytes += n
        count = len(shards)
        self.total_bytes = 0
        self._where: dict[str, tuple[Path, int, tuple[int, ...]]] = {}
        self.files: list[Path] = []
        for s, items in enumerate(shards):
            path = self.dir / ("model.safetensors" if count == 1 else f"model-{s + 1:05d}-of-{count:05d}.safetensors")
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            off = 0
            for name, shape, n in items:
                header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
                off += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + off)
            start = 8 + len(raw)
            for name, shape, n in items:
                self._where[name] = (path, start + header[name]["data_offsets"][0], shape)
            self.files.append(path)
            self.total_bytes += off
        self._written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise CheckpointMismatchError(f"tensor {name!r} was not planned for export")
        if name in self._written:
            raise CheckpointMismatchError(f"tensor {name!r} was produced twice")
        path, offset, shape = self._where[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointMismatchError(f"{name} has shape {tuple(tensor.shape)}, planned {shape}")
        t = tensor.detach().to(self.dtype).contiguous().reshape(-1)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise CheckpointMismatchError(f"export incomplete: {len(missing)} tensors never produced ({missing[:3]})")
        for path in self.files:
            with open(path, "r+b") as f:
                os.fsync(f.fileno())
        if len(self.files) > 1:
            weight_map = {n: w[0].name for n, w in self._where.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
