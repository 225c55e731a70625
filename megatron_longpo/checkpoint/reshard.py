"""`tools/convert_checkpoint.py reshard`: load a checkpoint at a TP/PP layout and write it again.

A dist_checkpointing checkpoint already loads at any TP/PP, so there is nothing to convert for
our own tools. Resharding is for two other needs:

* `--format dist` (default): build the model at TP=N, PP=M in N*M gloo processes on the CPU, load
  the checkpoint into it and save it again in the dist format. This proves the layout works for
  the model (heads, KV groups, layers and vocabulary divide) before a cluster job finds out, and
  strips optimizer state (only the model is saved). Same iteration number; model.json and the
  tokenizer travel along.
* `--format legacy`: write Megatron-LM's per-rank layout, for tools that need it:
  `OUT/iter_NNNNNNN/mp_rank_TT[_PPP]/model_optim_rng.pt` (the `_PPP` suffix only when PP > 1)
  plus `OUT/latest_checkpointed_iteration.txt`. Each file holds `{"model": <that rank's model
  state dict>, "checkpoint_version": 3.0, "iteration": N, "megatron_longpo": {...}}`: layers
  numbered from 0 on every pipeline stage, tensors sliced as that rank holds them (vocabulary
  rows, q/k/v rows by KV group, `[gate_r; up_r]`, linear_proj/linear_fc2 columns). With
  `--names te` (default) the names are Transformer Engine's (Megatron-LM's default
  `--transformer-impl transformer_engine`), with `--names local` the local spec's. There is no
  optimizer or RNG state: load it in Megatron-LM with `--no-load-optim --no-load-rng` (or
  `--finetune`).

The processes run on the CPU (CUDA hidden) whatever the machine, so any layout fits in RAM.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.checkpoint.dist_reader import DistCheckpointReader, open_checkpoint
from megatron_longpo.io import atomic_dir, check_out_dir, mark_output
from megatron_longpo.launch import run_torchrun

LEGACY_TRACKER = "latest_checkpointed_iteration.txt"
LEGACY_FILE = "model_optim_rng.pt"


class ReshardFailed(RuntimeError):
    """A worker process failed or timed out (its output is in the message)."""


def legacy_rank_dir(iteration: int, tp_rank: int, pp_rank: int, pp: int) -> str:
    """Megatron-LM's per-rank directory name (no expert-parallel suffix: dense models only)."""
    rank = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    return f"{ckpt.iter_name(iteration)}/{rank}"


def reshard_checkpoint(megatron_dir, out_dir, tp: int, pp: int, fmt: str = "dist", iteration: int | None = None,
                       names: str = "te", overwrite: bool = False, timeout: int = 3600) -> dict:
    from megatron_longpo import parallel

    if fmt not in ("dist", "legacy"):
        raise ValueError(f"--format {fmt!r} is not one of dist, legacy")
    if names not in ("te", "local"):
        raise ValueError(f"--names {names!r} is not one of te, local")
    arch, meta, it = open_checkpoint(megatron_dir, iteration)
    parallel.validate_layout(parallel.ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), tp * pp, arch)
    src, out = Path(megatron_dir).resolve(), Path(out_dir).resolve()
    check_out_dir(out, src, overwrite, tool="reshard")
    stored = DistCheckpointReader(it).dtype("embedding.word_embeddings.weight")
    n = int(it.name.removeprefix("iter_"))

    with atomic_dir(out) as tmp:
        target = [
            "-m", "megatron_longpo.checkpoint.reshard",
            "--ckpt", str(src), "--iter-dir", str(it), "--out", str(tmp), "--tp", str(tp), "--pp", str(pp),
            "--format", fmt, "--names", names, "--iteration", str(n), "--dtype", str(stored).removeprefix("torch."),
        ]
        env = {"CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        code, log, timed_out = run_torchrun(tp * pp, target, timeout=timeout, env=env)
        if timed_out:
            raise ReshardFailed(f"reshard workers timed out after {timeout} s (raise --timeout); last output:\n{log[-3000:]}")
        if code != 0:
            raise ReshardFailed(f"reshard workers failed (exit {code}); last output:\n{log[-3000:]}")
        extra = {"intended_layout": {"tensor_parallel": tp, "pipeline_parallel": pp}, "resharded_from": str(it)}
        if fmt == "legacy":
            extra["format"] = "legacy"
            extra["legacy"] = {"iteration": n, "names": names, "tensor_parallel": tp, "pipeline_parallel": pp}
        keep = {k: v for k, v in meta.items() if k not in ("arch", "hf_config", "format_version")}
        ckpt.write_model_json(tmp, arch, meta.get("hf_config") or {}, extra={**keep, **extra})
        ckpt.copy_tokenizer(src / "tokenizer", tmp / "tokenizer")
        mark_output(tmp, "reshard", src)
    return {"arch": arch, "iteration_dir": str(it), "out": str(out), "iteration": n}


# ----------------------------------------------------------------------------------------------
# Worker (one per rank, started by reshard_checkpoint under torchrun)
# ----------------------------------------------------------------------------------------------


def _worker(a: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from megatron_longpo import parallel
    from megatron_longpo.checkpoint.hf import to_canonical_names
    from megatron_longpo.models.build import ModelOptions, build_model, unwrap

    arch, _ = ckpt.read_model_json(a.ckpt)
    par = parallel.ParallelConfig(tensor_parallel=a.tp, pipeline_parallel=a.pp)
    layout = parallel.setup(par, arch=arch)
    chunks = build_model(arch, par, ModelOptions(use_te=False, bf16=a.dtype == "bfloat16"))
    ckpt.load_model(chunks, a.ckpt, iteration_dir=a.iter_dir)
    if a.format == "dist":
        ckpt.save(ckpt.model_sharded_state_dict(chunks), a.out, iteration=a.iteration)
    elif layout.dp_rank == 0:
        tp_rank, pp_rank = layout.tp_rank, layout.pp_rank
        state = {}
        for i, c in enumerate(chunks):
            sd = unwrap(c).state_dict()
            if a.names == "te":
                sd = to_canonical_names(sd)
            state["model" if len(chunks) == 1 else f"model{i}"] = sd
        state.update(checkpoint_version=3.0, iteration=a.iteration, megatron_longpo={
            "arch": arch.to_dict(), "names": a.names, "tensor_parallel": a.tp, "pipeline_parallel": a.pp,
            "tp_rank": tp_rank, "pp_rank": pp_rank, "source": a.iter_dir,
        })
        path = Path(a.out) / legacy_rank_dir(a.iteration, tp_rank, pp_rank, a.pp) / LEGACY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    if a.format == "legacy":
        dist.barrier()
        if dist.get_rank() == 0:
            ckpt.atomic_write_text(Path(a.out) / LEGACY_TRACKER, f"{a.iteration}\n")
    parallel.teardown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="reshard worker (started by tools/convert_checkpoint.py reshard)")
    for flag in ("--ckpt", "--iter-dir", "--out", "--format", "--names", "--dtype"):
        p.add_argument(flag, required=True)
    for flag in ("--tp", "--pp", "--iteration"):
        p.add_argument(flag, type=int, required=True)
    _worker(p.parse_args())
