"""The known warnings of megatron-core, torch and transformers that a user cannot act on, in ONE list,
filtered at their source by the package's entry points (`megatron_longpo.demo`, `.train`, tools/*.py).

Each entry names the exact message (a regular expression matched at the start of the message), how
it arrives (Python's `warnings` with its category, or a `logging` logger by its exact name and level),
where it comes from, and why there is nothing to do about it. Nothing else is filtered: other
warnings, every error, and these same messages at a higher logging level still show. Measured on
megatron-core 0.19.2, torch 2.14.1, transformers 5.24 (2-core CPU dev machine; docs/quickstart.md).

One more message is prevented rather than filtered: Transformer Engine warns "Detected a Jax
installation but could not find the shared object file for the Transformer Engine Jax extension"
on any machine that has jax installed next to TE's PyTorch build (the GPU images we ran on do).
`install()` sets `NVTE_FRAMEWORK=pytorch` when the variable is unset, TE's own switch for "only the
PyTorch extension is wanted": TE then skips the Jax probe (and still raises if its PyTorch extension
is missing). A user's own NVTE_FRAMEWORK is left alone.

None of them is printed straight to stderr (by a C extension or a bare `print` at import): each
one of the demo's was traced to Python's warnings machinery (`warnings.warn`, or the compiler's
SyntaxWarning) or to a `logging` call, so neither stream is wrapped.

    from megatron_longpo import quiet
    quiet.install()      # first line of an entry point's main(); idempotent

Progress bars: `install()` also makes tqdm's default `disable=None`, tqdm's own setting for "off
when the bar's stream is not a terminal" (a log file, CI, a pipe, where the carriage-return frames
pile up between the step lines); on a terminal bars stay. A bar created with an explicit `disable=`
still decides for itself. (tqdm reads its TQDM_DISABLE variable only when first imported, and torch
imports it, so the default is set on the class.)
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    pattern: str  # regular expression, matched at the start of the message
    via: str  # "warnings" or "logging"
    source: str  # warnings: the category's name; logging: the exact logger name
    origin: str  # which library and file emits it
    why: str  # why a user cannot act on it
    without_cuda_only: bool = False  # actionable on a GPU machine (there it still shows)
    module: str = ""  # warnings: regular expression for the emitting module (compile-time warnings: the file path)


KNOWN: tuple[Known, ...] = (
    Known(r"Transformer Engine and Apex are not installed\. Falling back to ", "warnings", "UserWarning",
          "megatron-core optimizer/__init__.py, optimizer/optimizer.py, optimizer/clip_grads.py, "
          "distributed/fsdp/.../mixed_precision.py, at import",
          "Transformer Engine needs CUDA; on a machine without a GPU the torch fallbacks are the only "
          "choice. On a GPU it still shows: there `make gpu` installs Transformer Engine.",
          without_cuda_only=True),
    Known(r"Apex is not installed\. Falling back to Torch Norm", "warnings", "UserWarning",
          "megatron-core models/backends.py and models/gpt/gpt_layer_specs.py, at import",
          "megatron-longpo uses no Apex kernel: the local spec's norm is torch's, the TE spec's is TE's."),
    Known(r"full scope is deprecated\. Use empty cuda_graph_modules", "warnings", "UserWarning",
          "megatron-core transformer/transformer_config.py (TransformerConfig.__post_init__)",
          "megatron's own default (cuda_graph_modules='full') trips megatron's own deprecation; "
          "megatron-longpo does not use CUDA graphs (cuda_graph_impl='none')."),
    Known(r"MimoModelConfig is experimental", "warnings", "UserWarning",
          "megatron-core models/mimo/config/base_configs.py, at import (pulled in by megatron's own imports)",
          "megatron-longpo does not use the MIMO model."),
    Known(r"torch\.distributed is disabled, unavailable or uninitialized, assuming the intent is to load "
          r"in a single process", "warnings", "UserWarning",
          "torch distributed/checkpoint/utils.py, when megatron's dist_checkpointing loads with no_dist=True",
          "a single-process load is what megatron asked for (a checkpoint's common state, or a one-process tool)."),
    Known(r"The argument order of load has been changed\. Please check the document", "warnings", "UserWarning",
          "torch distributed/checkpoint/utils.py (_api_bc_check), called by megatron-core "
          "dist_checkpointing/strategies/torch.py with the storage reader as a positional argument",
          "megatron's call, not ours; torch maps it to the new order itself."),
    Known(r"Please use DTensor instead and we are deprecating ShardedTensor\.", "warnings", "FutureWarning",
          "torch distributed/_shard (ShardedTensor), used by megatron-core's dist_checkpointing",
          "megatron-core's checkpoint format is built on ShardedTensor; nothing to change on our side."),
    Known(r"Could not determine rank from torch\.distributed, RANK, or SLURM_PROCID\. Defaulting to rank 0\.",
          "warnings", "UserWarning",
          "megatron-core _rank_utils.py (safe_get_rank), called by log_single_rank when a one-process tool "
          "opens an IndexedDataset (tools/preprocess_pairs.py merging its shards)",
          "the tool runs in one process, where rank 0 is right; under torchrun RANK is set and it never shows."),
    Known(r"invalid escape sequence ", "warnings", "SyntaxWarning",
          "megatron-core's own source (inference/contexts/kv_block_allocator.py: '\\-' in a docstring), when "
          "Python compiles it on first import (`make demo` installs with pip --no-compile)",
          "a string literal in megatron's code; printed once, when its .pyc is written. Only files under "
          "megatron/core/ are filtered: the same warning in any other file still shows.",
          module=r".*[\\/]megatron[\\/]core[\\/]"),
    Known(r"MCore's async save is deprecated and will be removed", "logging",
          "megatron.core.dist_checkpointing.strategies.torch",
          "megatron-core dist_checkpointing/strategies/torch.py: its synchronous save() calls "
          "async_save(async_strategy='mcore') itself",
          "megatron-longpo saves synchronously; the deprecated path is megatron's internal one."),
    Known(r"DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True",
          "logging", "megatron.core.distributed.distributed_data_parallel",
          "megatron-core distributed/distributed_data_parallel.py, when DDP is built for the distributed "
          "optimizer (GPU runs) without a precomputed parameter layout",
          "megatron then computes the same layout itself (DistributedOptimizer.compute_full_param_layout); "
          "nothing differs for the run."),
    Known(r"No CUDA runtime is found, using CUDA_HOME=", "logging", "torch.utils.cpp_extension",
          "torch utils/cpp_extension.py, at import (megatron imports it), when CUDA_HOME exists but no GPU does",
          "megatron-longpo compiles no extension; a CPU machine with a CUDA toolkit installed is fine."),
)

_CATEGORIES = {"UserWarning": UserWarning, "FutureWarning": FutureWarning, "SyntaxWarning": SyntaxWarning}
_installed = False


class _DropKnown(logging.Filter):
    """Drops WARNING-level records of one logger whose message matches one of `patterns`."""

    def __init__(self, patterns: list[str]):
        super().__init__()
        self.regexes = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        msg = record.getMessage()
        return not any(r.match(msg) for r in self.regexes)


def _cuda_present() -> bool:
    """torch's answer when torch is imported already; else whether an NVIDIA driver is loaded (an entry
    point that has not imported torch yet does not pay for its import here)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.cuda.is_available()
    return os.path.exists("/proc/driver/nvidia/version")


def active(cuda: bool | None = None) -> list[Known]:
    """The entries filtered on this machine (`cuda`: whether a GPU is present; None: ask torch)."""
    if cuda is None:
        cuda = _cuda_present()
    return [k for k in KNOWN if not (k.without_cuda_only and cuda)]


def matches(line: str, entries=KNOWN) -> Known | None:
    """The entry whose message appears in `line` (a printed line: warnings prefix it with
    `file:line: Category: `, torch's log format with `W... file:line] `), else None."""
    for k in entries:
        if re.search(k.pattern, line):
            return k
    return None


def install(progress_bars_on_terminal_only: bool = True) -> None:
    """Filter the KNOWN messages (those that apply on this machine) and, unless told otherwise,
    switch tqdm bars off when stderr is not a terminal. Call first thing in an entry point."""
    global _installed
    if _installed:
        return
    os.environ.setdefault("NVTE_FRAMEWORK", "pytorch")  # before TE's first import: see the module doc
    by_logger: dict[str, list[str]] = {}
    for k in active():
        if k.via == "warnings":
            warnings.filterwarnings("ignore", message=k.pattern, category=_CATEGORIES[k.source], module=k.module)
        else:
            by_logger.setdefault(k.source, []).append(k.pattern)
    for name, patterns in by_logger.items():
        logging.getLogger(name).addFilter(_DropKnown(patterns))
    if progress_bars_on_terminal_only:
        _tqdm_off_unless_terminal()
    _installed = True


def _tqdm_off_unless_terminal() -> None:
    from functools import partialmethod

    import tqdm.std

    tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=None)
