"""Reading Hugging Face weight files (safetensors, single or sharded with an index), lazily: one
tensor at a time, memory-mapped. (Writing is checkpoint/safetensors_writer.py's StreamingSafetensorsWriter.)
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
