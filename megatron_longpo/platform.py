"""Megatron-Core on a machine without CUDA: a small compatibility layer (gloo, CPU tensors).

megatron-core 0.19 assumes CUDA in a handful of places (see docs/cpu.md for the list and why
each patch is needed). `enable_cpu_fallback()` patches exactly those entry points so that the same
model, schedule, optimizer and checkpoint code runs on the CPU, which is how the test suite and
the README's demo run on a laptop or CI. When CUDA is available it does nothing and returns False.

What it does, all of it undone by nothing (call it once per process, before building a model):
  * `torch.cuda.current_device()` returns the CPU device, `synchronize()` and `current_stream()`
    become no-ops (optimizer, DDP buffers, pipeline p2p, checkpoint writers call them);
  * a `TorchFunctionMode` rewrites `device="cuda"` / `.cuda()` / `.to("cuda")` to the CPU
    (hard-coded in schedules, clip_grads, the distributed optimizer, the default causal mask);
  * the tensor-parallel RNG tracker keeps CPU generator states instead of CUDA ones, and activation
    recompute's save/restore of "the CUDA RNG state" has nothing to save (the CPU state is restored
    next to it).
It is NOT a general CUDA emulator: fused CUDA kernels, Transformer Engine, context parallelism and
packed (THD) attention still need a GPU, and the caller must pick the local layer spec.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch.overrides import TorchFunctionMode

_ENABLED = False


def cuda_available() -> bool:
    return torch.cuda.is_available()


def limit_gpu_memory(fraction: float | None) -> bool:
    """Cap this process's CUDA caching allocator at `fraction` of the current GPU (jobs sharing one
    GPU): past the cap it releases its cached blocks and retries before it reports out of memory.
    True when a cap was set (a GPU and a fraction)."""
    if not fraction or not cuda_available():
        return False
    torch.cuda.set_per_process_memory_fraction(float(fraction))
    return True


def resolve_bf16(asked: bool) -> bool:
    """bf16 only where it is asked for and a GPU is present: megatron's bf16 path (Float16Module,
    its optimizer) and TE's fused attention need CUDA; on the CPU everything runs in fp32."""
    return bool(asked) and cuda_available()


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if cuda_available() else torch.device("cpu")


def dist_backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Rewrites CUDA device arguments to the CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda,):
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = "cpu"
        if func in (torch.Tensor.to,) and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream (a class: libraries write `torch.cuda.Stream | None`)."""

    def __init__(self, *_a, **_k):
        pass

    def wait_stream(self, *_a, **_k):
        pass

    def synchronize(self):
        pass

    def record_event(self, *_a, **_k):
        return None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cpu_rng_tracker_class():
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Tracker with the same contract as megatron's CUDA tracker, over CPU generator states."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    return CpuRNGStatesTracker


def enable_cpu_fallback() -> bool:
    """Patch megatron-core's CUDA assumptions when there is no GPU. Returns True if it patched."""
    global _ENABLED
    if cuda_available():
        return False
    if _ENABLED:
        return True
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NullStream()
    torch.cuda.default_stream = lambda *a, **k: _NullStream()
    torch.cuda.Stream = _NullStream
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.manual_seed = lambda seed: None
    torch.cuda.manual_seed_all = lambda seed: None

    from megatron.core.tensor_parallel import random as mrandom

    mrandom.initialize_rng_tracker(force_reset=True)
    mrandom._CUDA_RNG_STATE_TRACKER = _cpu_rng_tracker_class()()
    # activation recompute saves and restores "the CUDA RNG state" around each recomputed chunk:
    # on the CPU the CPU generator is the only one (restored next to it), so no second state
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda *a, **k: None
    # the mode below is off inside the backward pass (it runs within the handler of .backward()),
    # where recompute re-runs the forward: the one CUDA tensor that forward makes is this mask
    import functools

    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils as tutils

    @functools.lru_cache(maxsize=None)
    def cpu_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, device="cpu"), diagonal=1).bool()

    tutils.get_default_causal_mask = fused_softmax.get_default_causal_mask = cpu_causal_mask

    mode = _CudaToCpu()
    mode.__enter__()  # process-wide for the main thread; stays on for the life of the process
    os.environ.setdefault("MEGATRON_LONGPO_CPU", "1")
    _ENABLED = True
    return True


def seed_everything(seed: int) -> None:
    """Seed Python, numpy, torch and megatron's model-parallel RNG tracker identically on every rank
    (the tracker offsets the tensor-parallel stream by the TP rank itself). Call after
    parallel state is initialised. On the CPU the tracker is the CPU one installed above."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
