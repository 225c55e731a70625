"""Megatron -> Hugging Face export (`tools/convert_checkpoint.py megatron-to-hf`).

Streams tensor by tensor: peak memory is about the largest single weight (the embedding, usually),
never the model. `checkpoint/dist_reader.py` reads one Megatron tensor (or layer slice) at a time and
maps it to its Hugging Face tensors; `checkpoint/safetensors_writer.py` plans every shard up front
(names and shapes from the same mapping run on `meta` tensors), writes each shard's header first and
then each tensor at its planned offset as soon as it exists, so no shard is ever held in memory.

The result is written into a temporary directory next to `--out` and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.checkpoint.dist_reader import DistCheckpointReader, check_weights, hf_plan, open_checkpoint, stream_hf_tensors
from megatron_longpo.checkpoint.safetensors_writer import StreamingSafetensorsWriter
from megatron_longpo.io import atomic_dir, check_out_dir, mark_output
from megatron_longpo.models.hf_config import to_hf_config

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def resolve_dtype(dtype: str, hf_config: dict, reader: DistCheckpointReader) -> torch.dtype:
    """'auto': the dtype of the Hugging Face model the checkpoint was imported from (its
    config.json `dtype` / `torch_dtype`), else the dtype the checkpoint stores."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    src = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(src, str) and src in DTYPES:
        return DTYPES[src]
    return reader.dtype("embedding.word_embeddings.weight")


def megatron_to_hf_checkpoint(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    iteration: int | None = None,
    max_shard_bytes: int = 2 * 10**9,
    dtype: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Export one iteration of a megatron-longpo checkpoint (any TP/PP it was saved at, with or
    without optimizer state) as a Hugging Face model directory. Single process, no GPU."""
    arch, meta, it = open_checkpoint(megatron_dir, iteration)
    out = Path(out_dir).resolve()
    src = Path(megatron_dir).resolve()
    check_out_dir(out, src, overwrite, tool="megatron-to-hf")
    ckpt.verify_checksums(it)  # a damaged file is named here, not exported as garbage
    reader = DistCheckpointReader(it)
    check_weights(arch, reader)
    hf_config = meta.get("hf_config") or {}
    out_dtype = resolve_dtype(dtype, hf_config, reader)

    with atomic_dir(out) as tmp:
        writer = StreamingSafetensorsWriter(tmp, hf_plan(arch), out_dtype, max_shard_bytes)
        n_params = 0
        for name, tensor in stream_hf_tensors(arch, reader):
            writer.add(name, tensor)
            n_params += tensor.numel()
            del tensor
        writer.close()
        cfg = to_hf_config(arch, base=hf_config)
        cfg["dtype"] = _DTYPE_NAME.get(out_dtype, str(out_dtype).removeprefix("torch."))
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        copied = ckpt.copy_tokenizer(src / "tokenizer", tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        mark_output(tmp, "megatron-to-hf", src)
    return {
        "arch": arch,
        "iteration_dir": str(it),
        "out": str(out),
        "dtype": out_dtype,
        "parameters": n_params,
        "shards": len(writer.files),
        "bytes": writer.total_bytes,
        "tokenizer_files": copied,
    }
