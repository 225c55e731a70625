"""Parallel layout: the typed config, its validation, and the one place that sets up megatron's
parallel state (TP, PP, virtual PP, CP, DP) and seeds.

`validate_layout` runs before anything heavy is built so that a bad layout is reported with the
numbers involved and the fix.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longpo import platform
from megatron_longpo.launch import free_port


class LayoutError(ValueError):
    """The parallel layout does not fit the world size or the model."""


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    context_parallel: int = 1
    sequence_parallel: bool = False

    def __post_init__(self):
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise LayoutError(f"{name}={getattr(self, name)} must be >= 1")
        if self.virtual_pipeline_parallel is not None and self.virtual_pipeline_parallel < 1:
            raise LayoutError("virtual_pipeline_parallel must be >= 1 or unset")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise LayoutError("sequence_parallel needs tensor_parallel > 1; set sequence_parallel=false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def pad_multiple(self) -> int:
        """Every packed sequence is padded to this many tokens (CP zig-zag split, SP split)."""
        m = 2 * self.context_parallel if self.context_parallel > 1 else 1
        return m * (self.tensor_parallel if self.sequence_parallel else 1)


def validate_layout(par: ParallelConfig, world_size: int, arch=None, seq_lengths=(), cpu_cp: bool = False) -> int:
    """Check the layout against the world size and (optionally) the model. Returns the DP size."""
    mp = par.model_parallel_size
    if world_size % mp:
        raise LayoutError(
            f"world size {world_size} is not divisible by TP*PP*CP = {par.tensor_parallel}*"
            f"{par.pipeline_parallel}*{par.context_parallel} = {mp}; launch a multiple of {mp} "
            f"processes or change the layout"
        )
    if arch is not None:
        tp = par.tensor_parallel
        if arch.num_attention_heads % tp:
            raise LayoutError(
                f"{arch.num_attention_heads} attention heads are not divisible by TP={tp}; "
                f"pick a TP that divides {arch.num_attention_heads}"
            )
        if arch.num_query_groups % tp:
            raise LayoutError(
                f"{arch.num_query_groups} KV heads (query groups) are not divisible by TP={tp}; "
                f"pick a TP that divides {arch.num_query_groups}"
            )
        chunks = par.pipeline_parallel * (par.virtual_pipeline_parallel or 1)
        if arch.num_layers % chunks:
            raise LayoutError(
                f"{arch.num_layers} layers are not divisible by PP*VPP = {chunks}; "
                f"pick pipeline sizes whose product divides {arch.num_layers}"
            )
        if par.virtual_pipeline_parallel and par.pipeline_parallel == 1:
            raise LayoutError("virtual_pipeline_parallel needs pipeline_parallel > 1")
        if arch.padded_vocab_size % tp:
            raise LayoutError(f"padded vocabulary {arch.padded_vocab_size} is not divisible by TP={tp}")
    m = par.pad_multiple()
    for s in seq_lengths:
        if s % m:
            raise LayoutError(
                f"sequence length {s} is not a multiple of {m} (2*CP{'*TP with sequence parallel' if par.sequence_parallel else ''}); "
                f"use a multiple of {m}"
            )
    if par.context_parallel > 1 and not platform.cuda_available() and not cpu_cp:
        raise LayoutError("context parallelism needs Transformer Engine on GPUs; set context_parallel=1 on the CPU "
                          "(or data.share_prefix=true, whose reference attention runs CP on the CPU)")
    return world_size // mp


def init_distributed(timeout_minutes: int = 10) -> tuple[int, int]:
    """Initialise torch.distributed from the torchrun environment (single process if absent).
    Returns (rank, world_size)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        if platform.cuda_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(
            backend=platform.dist_backend(), timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return dist.get_rank(), dist.get_world_size()


def setup(par: ParallelConfig, seed: int = 1234, arch=None, cpu_cp: bool = False) -> int:
    """Initialise distributed + megatron parallel state for `par`, seed RNGs. Returns the DP size.
    cpu_cp: allow CP without a GPU (prefix-shared attention's reference path supports it)."""
    platform.enable_cpu_fallback()
    from megatron.core import parallel_state as ps

    _, world = init_distributed()
    dp = validate_layout(par, world, arch, cpu_cp=cpu_cp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_parallel,
        context_parallel_size=par.context_parallel,
    )
    platform.seed_everything(seed)
    return dp


def teardown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
