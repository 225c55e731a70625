"""The memory keys of the configuration (optim.cpu_offload, offload_fraction, offload_overlap,
precision_aware, grad_dtype, exp_avg_dtype, exp_avg_sq_dtype; model.activation_offload_layers):
the combinations megatron-core 0.19 cannot run, refused with one message that names the key and
the fix (docs/training.md, "Will it fit").

What the keys become in megatron-core's config objects is models/megatron_config.py's (the one
translation; `precision_aware` resolves optim.precision_aware there); the engine calls `check`
before it."""

from __future__ import annotations

from megatron_longpo.models.megatron_config import precision_aware


class MemoryOptionError(ValueError):
    """A memory option cannot run in this setting (no GPU, no Transformer Engine, another option)."""


def check(optim, *, cuda: bool, use_te: bool, distributed_optimizer: bool, activation_offload_layers: int = 0,
          recompute: str | None = None, pipeline_parallel: int = 1, num_layers: int | None = None) -> None:
    """Refuse what megatron-core 0.19 cannot combine, before anything is built."""
    def no(msg):
        raise MemoryOptionError(msg)

    if not optim.cpu_offload:
        if optim.offload_fraction != 1.0:
            no(f"optim.offload_fraction={optim.offload_fraction:g} has no effect without optim.cpu_offload=true; set both or neither")
        if optim.offload_overlap:
            no("optim.offload_overlap=true has no effect without optim.cpu_offload=true; set both or neither")
    else:
        if not cuda:
            no("optim.cpu_offload=true needs a GPU (megatron's HybridDeviceOptimizer moves the optimizer between the GPU "
               "and the host); on the CPU the optimizer is on the CPU already: set optim.cpu_offload=false")
        if not distributed_optimizer:
            no("optim.cpu_offload=true needs megatron's distributed optimizer (optim.distributed_optimizer=true): the "
               "precision-aware optimizer that keeps the fp32 parameter copy off the GPU exists only there")
        if optim.precision_aware is False:
            no("optim.cpu_offload=true needs the precision-aware optimizer (Megatron-LM asserts it: the hybrid device "
               "optimizer reuses its code path; without it the distributed optimizer keeps an fp32 copy of every parameter "
               "on the GPU, 4 bytes each); leave optim.precision_aware unset or true")
    pa = precision_aware(optim)
    if optim.precision_aware:
        if optim.name != "adam":
            no(f"optim.precision_aware=true needs optim.name=adam (megatron-core supports it for Adam only), got {optim.name!r}")
        if not cuda or not distributed_optimizer:
            no("optim.precision_aware=true needs a GPU and optim.distributed_optimizer=true (megatron-core's precision-aware "
               "optimizer is part of its distributed optimizer); set optim.precision_aware=false")
        if not optim.cpu_offload and not use_te:
            no("optim.precision_aware=true without optim.cpu_offload needs Transformer Engine's FusedAdam (megatron-core "
               "0.19); install TE or set optim.precision_aware=false")
    for key in ("exp_avg_dtype", "exp_avg_sq_dtype"):
        if getattr(optim, key) != "fp32":
            if optim.cpu_offload:
                no(f"optim.{key}={getattr(optim, key)} is not honoured with optim.cpu_offload=true (the CPU Adam keeps fp32 "
                   f"moments); set optim.{key}=fp32, or optim.cpu_offload=false")
            if not pa:
                no(f"optim.{key}={getattr(optim, key)} needs optim.precision_aware=true (megatron-core keeps fp32 moments "
                   f"otherwise)")
    n = activation_offload_layers
    if n:
        if not cuda or not use_te:
            no("model.activation_offload_layers needs a GPU with Transformer Engine (megatron-core's CPU offloading is TE's); "
               "set it to 0")
        if recompute is not None:
            no(f"model.activation_offload_layers={n} cannot be combined with model.recompute={recompute} (megatron-core 0.19: "
               f"'CPU offloading does not work when activation recomputation is enabled'); choose one")
        if pipeline_parallel > 1:
            no(f"model.activation_offload_layers={n} does not support pipeline parallelism in megatron-core 0.19; set "
               f"parallel.pipeline_parallel=1 or model.activation_offload_layers=0")
        if num_layers is not None and n >= num_layers:
            no(f"model.activation_offload_layers={n} must be below the number of layers ({num_layers}; megatron-core keeps "
               f"the last one on the GPU)")

