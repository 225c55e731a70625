"""`make demo` (= `python -m megatron_longpo.demo`) as a new user sees it: five stages, each with the
one line of what it did, the summary and the next steps; and none of the known non-actionable
warnings of megatron-core / torch / transformers (megatron_longpo/quiet.py), nor any other Python
warning, nor progress-bar frames, in its output."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_longpo import quiet

ROOT = Path(__file__).resolve().parents[1]

# what main printed before the filters (a fresh clone, 2-core CPU dev machine): each line must be
# recognised by quiet.matches, so the demo test below would catch it if it came back
SEEN_BEFORE = [
    "/x/megatron/core/optimizer/__init__.py:25: UserWarning: Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "/x/megatron/core/optimizer/clip_grads.py:32: UserWarning: Transformer Engine and Apex are not installed. Falling back to local implementations of multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
    "/x/megatron/core/models/backends.py:34: UserWarning: Apex is not installed. Falling back to Torch Norm",
    "/x/megatron/core/transformer/transformer_config.py:2415: UserWarning: full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.",
    "MCore's async save is deprecated and will be removed in the future releases. Please, use NVRx async solution by setting `async_strategy` to `nvrx`.",
    "/x/torch/distributed/checkpoint/utils.py:488: UserWarning: torch.distributed is disabled, unavailable or uninitialized, assuming the intent is to load in a single process.",
    "/x/torch/distributed/checkpoint/logger.py:90: UserWarning: The argument order of load has been changed. Please check the document to avoid future breakages.",
    "/x/megatron_longpo/platform.py:60: FutureWarning: Please use DTensor instead and we are deprecating ShardedTensor.",
    "/x/megatron/core/models/mimo/config/base_configs.py:12: UserWarning: MimoModelConfig is experimental and still under active development. The API may change without notice in future releases.",
    "W1129 04:28:38.574000 12198 /x/torch/utils/cpp_extension.py:183] No CUDA runtime is found, using CUDA_HOME='/usr/local'",
    # on a GPU (one H200, 2026-11-29): DDP for the distributed optimizer
    "DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True. Auto-computing layout inside DDP. Callers should pre-compute layouts via DistributedOptimizer.compute_full_param_layout() and pass them in.",
    # tools/preprocess_pairs.py merging its shards (one process, no RANK; 2-core CPU dev machine, 2026-11-29)
    "/x/megatron/core/_rank_utils.py:39: UserWarning: Could not determine rank from torch.distributed, RANK, or SLURM_PROCID. Defaulting to rank 0.",
    # after `pip install --no-compile`: Python compiles megatron on first import
    "/x/megatron/core/inference/contexts/kv_block_allocator.py:426: SyntaxWarning: invalid escape sequence '\\-'",
]
PY_WARNING = re.compile(r"\b[A-Z]\w*Warning: ")  # how `warnings` prints one: "file:line: Category: message"
TORCH_LOG_WARNING = re.compile(r"^W\d{4} \d\d:\d\d:\d\d")  # torch's logging format for a warning
TRANSFORMERS_LOG = re.compile(r"^\[transformers\] ")  # transformers 5's logging format (warnings and above by default)


def test_every_line_seen_before_is_a_known_entry():
    for line in SEEN_BEFORE:
        assert quiet.matches(line) is not None, line
    assert {quiet.matches(line) for line in SEEN_BEFORE} == set(quiet.KNOWN)  # and no entry is unused


def test_only_the_known_messages_are_filtered():
    """The filters drop the known message at its category / logger and level, and nothing else:
    another warning, the same text as another category, and the same logger at ERROR still show."""
    code = (
        "import logging, warnings\n"
        "from megatron_longpo import quiet\n"
        "quiet.install()\n"
        "warnings.warn('Apex is not installed. Falling back to Torch Norm', UserWarning)\n"
        "warnings.warn('Apex is not installed. Falling back to Torch Norm', RuntimeWarning)\n"
        "warnings.warn('a warning nobody listed', UserWarning)\n"
        "log = logging.getLogger('megatron.core.dist_checkpointing.strategies.torch')\n"
        "log.warning(\"MCore's async save is deprecated and will be removed in the future releases.\")\n"
        "log.error(\"MCore's async save is deprecated and will be removed (as an error)\")\n"
        "log.warning('another megatron warning')\n"
        "logging.getLogger('megatron.core.other').warning(\"MCore's async save is deprecated (other logger)\")\n"
        "logging.getLogger('megatron.core.distributed.distributed_data_parallel').warning("
        "'DistributedDataParallel: full_param_layout not provided with use_distributed_optimizer=True. (ddp)')\n"
        "compile(\"'in megatron \\\\-'\", '/x/site-packages/megatron/core/y.py', 'exec')\n"
        "compile(\"'in user code \\\\-'\", '/x/my_code.py', 'exec')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "UserWarning: Apex is not installed" not in err
    assert "RuntimeWarning: Apex is not installed" in err
    assert "a warning nobody listed" in err
    assert "will be removed in the future releases" not in err and "(ddp)" not in err
    assert "(as an error)" in err and "another megatron warning" in err and "(other logger)" in err
    assert "my_code.py:1: SyntaxWarning: invalid escape sequence" in err and "megatron/core/y.py" not in err


@pytest.mark.slow
def test_demo_prints_its_stages_summary_and_no_known_warning(smollm2_dir, tmp_path):
    """README's first command end to end (one training step): every stage says what it did, the
    summary and the next steps are there, and no warning a user cannot act on is printed."""
    from fixtures import run_captured

    r = run_captured([sys.executable, "-m", "megatron_longpo.demo", "--work-dir", str(tmp_path / "demo"), "--steps", "1"],
                     cwd=ROOT, timeout=1200)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    out = r.stdout.splitlines()
    for n in range(1, 6):
        i = next((k for k, line in enumerate(out) if line.startswith(f"[{n}/5] ")), None)
        assert i is not None, f"stage {n} missing:\n{r.stdout}"
        done = [line for line in out[i + 1:] if line.startswith("      -> ") or line.startswith(f"[{n + 1}/5] ")]
        assert done and done[0].startswith("      -> "), f"stage {n} printed no line of what it did:\n{r.stdout}"
    assert "identical greedy tokens" in r.stdout  # the CPU: fp32, token for token
    summary = out.index("summary")
    assert any(line.startswith("  LongPO loss ") for line in out[summary:])
    nxt = out.index("next:")
    assert nxt > summary and any("docs/quickstart.md" in line for line in out[nxt:])

    lines = (r.stdout + "\n" + r.stderr).splitlines()
    known = [(line, quiet.matches(line)) for line in lines if quiet.matches(line)]
    assert not known, "known non-actionable warnings printed:\n" + "\n".join(f"{k.origin}: {line}" for line, k in known)
    other = [line for line in lines if PY_WARNING.search(line) or TORCH_LOG_WARNING.match(line)
             or TRANSFORMERS_LOG.match(line)]
    assert not other, ("warnings printed (act on them, or, if a user cannot, list them in "
                       "megatron_longpo/quiet.py with where they come from and why):\n" + "\n".join(other))
    assert "\r" not in r.stderr and "%|" not in r.stderr, "progress-bar frames in a non-terminal run"
