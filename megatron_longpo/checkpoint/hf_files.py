"""Reading and writing Hugging Face weight files (safetensors, single or sharded with an index).

Reading is lazy (one tensor at a time, memory-mapped), writing is streamed shard by shard into a
temporary directory that the caller renames into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_longpo.checkpoint.hf import CheckpointMismatchError


class HFWeights:
    """Lazy access to the tensors of a Hugging Face model directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"Hugging Face model directory {self.dir} does not exist")
        index = self.dir / "model.safetensors.index.json"
        single = self.dir / "model.safetensors"
        self._where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointMismatchError(f"{index} is not a valid safetensors index ({e}); re-download the model") from e
            for name, fname in weight_map.items():
                self._where[name] = self.dir / fname
            missing = sorted({str(p) for p in self._where.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"weight files listed in {index.name} are missing: {', '.join(missing)}; re-download the model")
        elif single.is_file():
            for name in self._open(single).keys():
                self._where[name] = single
        else:
            bins = sorted(self.dir.glob("pytorch_model*.bin"))
            hint = " (only PyTorch .bin files found: convert them to safetensors first)" if bins else ""
            raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {self.dir}{hint}")

    def _open(self, path: Path):
        from safetensors import safe_open

        if path not in self._handles:
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
                raise CheckpointMismatchError(f"cannot read {path}: {e}; the file is corrupt or truncated, re-download it") from e
        return self._handles[path]

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointMismatchError(
                f"tensor {name!r} is missing from {self.dir}; the weights do not match config.json's architecture"
            )
        try:
            return self._open(self._where[name]).get_tensor(name)
        except CheckpointMismatchError:
            raise
        except Exception as e:
            raise CheckpointMismatchError(f"cannot read tensor {name!r} from {self._where[name]}: {e}; the file is corrupt") from e


class ShardedSafetensorsWriter:
    """Writes tensors into model-0000i-of-0000N.safetensors shards of at most `max_shard_bytes`
    plus model.safetensors.index.json. Tensors are flushed as soon as a shard is full, so peak
    memory is one shard (plus the tensor being added)."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + n > self.max:
            self._flush()
        self._buf[name] = tensor.detach().contiguous().cpu()
        self._buf_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        idx = len(self._shards)
        save_file(self._buf, str(self.dir / f"shard-{idx:05d}.tmp"), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> None:
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
            weight_map.update({name: final for name in names})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
