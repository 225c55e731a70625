"""The training loop, and only the loop: steps, logging, the checkpoint cadence, non-finite steps,
a SIGTERM stop flag, the summary. The engine it drives is built by training/engine.py; the
training state is saved and resumed by training/train_state.py."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longpo import platform
from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.config import RunConfig, to_dict
from megatron_longpo.training import metrics as M
from megatron_longpo.training.engine import Trainer, TrainingStopped, build_trainer, evaluate, forward_backward
from megatron_longpo.training.metrics import log, rank0
from megatron_longpo.training.train_state import save_training_state

__all__ = ["StopFlag", "TrainingStopped", "train", "train_step"]


def train_step(t: Trainer) -> M.StepRecord:
    batches = t.data.next_step()
    lr = t.optimizer.param_groups[0]["lr"]  # the rate this step runs at (the scheduler moves on after it)
    with M.Timer() as timer:
        m = forward_backward(t, batches)
        finite = math.isfinite(m.get("loss", 0.0))
        grad_norm = None
        if finite:
            ok, grad_norm, _ = t.optimizer.step()
            grad_norm = None if grad_norm is None else float(grad_norm)  # a 0-dim CUDA tensor on GPUs
            finite = bool(ok) and (grad_norm is None or math.isfinite(grad_norm))
        if finite:
            t.scheduler.step(increment=1)
    t.iteration += 1
    if finite:
        t.nonfinite_in_a_row = 0
    else:
        t.nonfinite_total += 1
        t.nonfinite_in_a_row += 1
    flops = M.batch_model_flops(t.arch, [s for b in batches for s in b.flop_spans], sum(b.scored_tokens for b in batches))
    if t.dp > 1:  # every DP replica processed other samples; TP/CP/PP ranks of a replica the same
        f = torch.tensor([flops], dtype=torch.float64, device=platform.default_device())
        dist.all_reduce(f, group=t.layout.dp_group)
        flops = float(f.item())
    return M.StepRecord(t.iteration, m, lr, grad_norm, timer.seconds, int(m["tokens"]), flops, M.peak_memory_gib(),
                        skipped=not finite, consumed_samples=t.data.sampler.consumed_samples, epoch=t.data.epoch,
                        time=time.time(), reserved_mem_gib=M.reserved_memory_gib())


class StopFlag:
    """SIGTERM asks the run to stop; every rank sees it at the same step (a MAX all-reduce), saves
    and exits. Owned by one run (train()), installed for its duration."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> "StopFlag":
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _on_sigterm(self, signum, frame):
        self.requested = True

    def everywhere(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], device=platform.default_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def train(cfg: RunConfig) -> dict:
    """Train (or resume) the run in cfg.train.save_dir, held by this trainer alone (run_lock)."""
    from megatron_longpo import parallel
    from megatron_longpo.training import run_lock
    from megatron_longpo.training.resume import check_save_dir

    parallel.init_distributed()
    check_save_dir(cfg.train.save_dir, cfg.model.checkpoint)
    lock = run_lock.hold(cfg.train.save_dir)
    if lock is not None and lock.note:
        log(f"note: {lock.note}")
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig) -> dict:
    from tqdm import tqdm

    stop = StopFlag().install()
    t0 = time.time()
    t = build_trainer(cfg)
    cfg = t.cfg  # as built: model.recompute=auto is the plan's choice (saved in config.yaml and the checkpoints)
    world = dist.get_world_size()
    peak = M.peak_tflops(cfg.train.peak_tflops)
    if rank0():  # the effective configuration, defaults filled in (load_config reads it back)
        from megatron_longpo.config import to_yaml

        Path(cfg.train.save_dir).mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(Path(cfg.train.save_dir) / "config.yaml", to_yaml(cfg))
    tb = M.Writers(os.path.join(cfg.train.save_dir, "tensorboard") if cfg.train.tensorboard and rank0() else None,
                   cfg.train.wandb_project if rank0() else None, os.path.join(cfg.train.save_dir, "wandb"),
                   cfg.train.wandb_run_name, to_dict(cfg))
    log(f"training {cfg.loss.name} on {t.data.describe()} | {t.arch.architecture} {t.arch.num_layers} layers, RoPE base "
        f"{t.arch.rope_theta:g} | TP={t.par.tensor_parallel} PP={t.par.pipeline_parallel} CP={t.par.context_parallel} "
        f"DP={t.dp} | {t.total_steps} steps of {cfg.data.global_batch_size} samples")
    # disable=None: no bar where stderr is not a terminal (logs, CI), whose frames would pile up between the step lines
    bar = tqdm(total=t.total_steps, initial=t.iteration, disable=None if rank0() else True, desc="train", dynamic_ncols=True, file=sys.stderr)
    records = []
    evals = []
    stopped_by_signal = False

    def run_eval():
        m = evaluate(t)
        if m is None:
            return
        evals.append({"step": t.iteration, **m})
        if rank0():
            bar.write(M.eval_line(t.iteration, m))
            sys.stdout.flush()
        tb.log(M.eval_scalars(m), t.iteration)

    import faulthandler

    def watch():  # a step or a save stalled (a collective, say) for stall_seconds shows up as stacks, not silence
        if cfg.train.stall_seconds:
            faulthandler.dump_traceback_later(cfg.train.stall_seconds, repeat=True, file=sys.stderr)

    try:
        while t.iteration < t.total_steps:
            watch()
            rec = train_step(t)
            records.append(rec)
            bar.update(1)
            if rec.step % cfg.train.log_interval == 0 or rec.skipped:
                if rank0():
                    bar.write(rec.line(t.total_steps, world, peak))
                    sys.stdout.flush()
                tb.log(rec.scalars(world), rec.step)
            if cfg.train.eval_interval and rec.step % cfg.train.eval_interval == 0:
                watch()
                run_eval()
            if t.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise TrainingStopped(
                    f"{t.nonfinite_in_a_row} non-finite losses/gradients in a row (step {t.iteration}); stopping. "
                    f"Lower optim.lr, check the data (tools/preprocess_pairs.py summary) and the reference "
                    f"log-probs, or raise train.max_nonfinite_in_a_row"
                )
            if cfg.train.exit_after and len(records) >= cfg.train.exit_after and t.iteration < t.total_steps:
                log(f"train.exit_after={cfg.train.exit_after}: saving at step {t.iteration} and exiting")
                break
            if stop.everywhere():
                stopped_by_signal = True
                log(f"SIGTERM received: saving at step {t.iteration} and exiting")
                break
            if cfg.train.save_interval and t.iteration % cfg.train.save_interval == 0 and t.iteration < t.total_steps:
                watch()
                save_training_state(t)
        if cfg.train.eval_interval and records and t.iteration >= t.total_steps and t.iteration % cfg.train.eval_interval:
            watch()
            run_eval()  # the final model is always scored (not on a stop: that saves at once)
        watch()
        path = save_training_state(t)
    finally:
        faulthandler.cancel_dump_traceback_later()
        stop.uninstall()
        bar.close()
        tb.close()
    done = [r for r in records if not r.skipped]
    summary = {
        "steps_run": len(records), "iteration": t.iteration, "skipped_nonfinite": t.nonfinite_total,
        "first_loss": records[0].metrics.get("loss") if records else None,
        "last_loss": records[-1].metrics.get("loss") if records else None,
        "tokens_per_s": (sum(r.tokens for r in done) / max(sum(r.seconds for r in done), 1e-9)) if done else 0.0,
        "checkpoint": str(path), "seconds": time.time() - t0, "stopped_by_signal": stopped_by_signal,
        "losses": [r.metrics.get("loss") for r in records],
        "steps": [{"step": r.step, "lr": r.lr, "learning_rate": r.lr, "grad_norm": r.grad_norm, "seconds": r.seconds,
                   "skipped": r.skipped, "peak_mem_gib": r.peak_mem_gib, "reserved_mem_gib": r.reserved_mem_gib,
                   "consumed_samples": r.consumed_samples,
                   "epoch": r.epoch, **r.metrics} for r in records],
        "evals": evals,
    }
    if rank0():
        import json

        ckpt.atomic_write_text(Path(cfg.train.save_dir) / "summary.json", json.dumps(summary, indent=2))
    log(f"done: {summary['steps_run']} steps (now at {t.iteration}/{t.total_steps}), loss {summary['first_loss']} -> "
        f"{summary['last_loss']}, {summary['skipped_nonfinite']} skipped, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"checkpoint {path}, {summary['seconds']:.0f} s")
    return summary
