"""The one adapter over megatron's parallel state: `setup` initialises it (TP, PP, virtual PP, CP,
DP) and seeds, and returns a `Layout` (ranks, groups, stage flags, pad multiple) that callers pass
on; nothing else in the package reads megatron.core.parallel_state.

The layout's config (`ParallelConfig`) and its rules (`validate_layout`, run before anything heavy
is built so that a bad layout is reported with the numbers involved and the fix) live with the
run configuration (config.py, the ground floor) and are re-exported here.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_longpo import platform
from megatron_longpo.config import LayoutError, ParallelConfig, validate_layout
from megatron_longpo.launch import free_port

__all__ = ["Layout", "LayoutError", "ParallelConfig", "current_layout", "init_distributed", "setup", "teardown",
           "validate_layout"]


@dataclass(frozen=True)
class Layout:
    """This rank's place in the parallel layout: ranks, process groups and stage flags, read once
    from megatron's parallel state after `setup` and handed to whoever needs them. A group is None
    where its dimension is 1 (nothing to communicate)."""

    config: ParallelConfig
    world_size: int
    rank: int
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    dp_size: int
    tp_group: object = None
    pp_group: object = None
    cp_group: object = None
    dp_group: object = None
    pp_last_rank: int = 0  # global rank of this rank's last pipeline stage (metrics are broadcast from it)

    @property
    def tp_size(self) -> int:
        return self.config.tensor_parallel

    @property
    def pp_size(self) -> int:
        return self.config.pipeline_parallel

    @property
    def cp_size(self) -> int:
        return self.config.context_parallel

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pad_multiple(self) -> int:
        return self.config.pad_multiple()


_LAYOUT: list = []  # the Layout `setup` made, for current_layout()


def current_layout() -> Layout:
    """The Layout `setup` returned, for code that reaches a model through a helper that set the
    parallel state up itself (checkpoint.dist.open_model, the export and reshard tools)."""
    if not _LAYOUT:
        raise RuntimeError("the parallel state is not set up: call megatron_longpo.parallel.setup first")
    return _LAYOUT[0]


def _read_layout(par: ParallelConfig) -> Layout:
    """This rank's Layout from megatron's parallel state (just initialised for `par`)."""
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    return Layout(
        config=par, world_size=dist.get_world_size(), rank=dist.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
        cp_rank=ps.get_context_parallel_rank(), dp_rank=ps.get_data_parallel_rank(), dp_size=dp,
        tp_group=ps.get_tensor_model_parallel_group() if par.tensor_parallel > 1 else None,
        pp_group=ps.get_pipeline_model_parallel_group() if par.pipeline_parallel > 1 else None,
        cp_group=ps.get_context_parallel_group() if par.context_parallel > 1 else None,
        dp_group=ps.get_data_parallel_group() if dp > 1 else None,
        pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
    )


def init_distributed(timeout_minutes: int = 10) -> tuple[int, int]:
    """Initialise torch.distributed from the torchrun environment (single process if absent).
    Returns (rank, world_size)."""
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        device = None
        if platform.cuda_available():
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # device_id binds the process group to this rank's GPU: NCCL's barrier() then knows the device
        # instead of guessing it ("barrier(): using the device under current context" on every run)
        dist.init_process_group(
            backend=platform.dist_backend(), timeout=datetime.timedelta(minutes=timeout_minutes),
            **({"device_id": device} if device is not None else {}),
        )
    return dist.get_rank(), dist.get_world_size()


def setup(par: ParallelConfig, seed: int = 1234, arch=None, cpu_cp: bool = False) -> Layout:
    """Initialise distributed + megatron parallel state for `par` (validated first), seed RNGs.
    Returns this rank's Layout. cpu_cp: allow CP without a GPU (prefix-shared attention's
    reference path supports it)."""
    platform.enable_cpu_fallback()
    from megatron.core import parallel_state as ps

    _, world = init_distributed()
    validate_layout(par, world, arch, cpu_cp=cpu_cp)
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_parallel,
        context_parallel_size=par.context_parallel,
    )
    layout = _read_layout(par)
    _LAYOUT[:] = [layout]
    platform.seed_everything(seed)
    return layout


def teardown() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _LAYOUT.clear()
    if dist.is_initialized():
        dist.destroy_process_group()
