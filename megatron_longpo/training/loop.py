"""The training loop: model + DDP + distributed optimizer + scheduler, megatron's pipeline
schedules, checkpoint cadence, resume, SIGTERM, non-finite steps, logging."""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longpo import parallel, platform
from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.config import RunConfig, to_dict
from megatron_longpo.data.format import longest_sequence, read_manifest
from megatron_longpo.losses import policy_roles, reference_roles, sequence_roles
from megatron_longpo.models.build import ModelOptions, build_model, unwrap
from megatron_longpo.models.forward import run_schedule
from megatron_longpo.training import metrics as M
from megatron_longpo.training.data import StepData
from megatron_longpo.training.step import make_forward_step


class TrainingStopped(RuntimeError):
    """Training cannot go on (too many non-finite steps in a row, ...)."""


@dataclass
class Trainer:
    cfg: RunConfig
    chunks: list
    optimizer: object
    scheduler: object
    data: StepData
    arch: object
    par: parallel.ParallelConfig
    dp: int
    total_steps: int
    iteration: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0


def _parallel_config(cfg: RunConfig) -> parallel.ParallelConfig:
    p = cfg.parallel
    return parallel.ParallelConfig(p.tensor_parallel, p.pipeline_parallel, p.virtual_pipeline_parallel,
                                   p.context_parallel, p.sequence_parallel)


def _rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if _rank0():
        print(msg, flush=True)


def build_engine(arch, par: parallel.ParallelConfig, opts: ModelOptions, optim, load_from: str | None,
                 with_optimizer: bool = True):
    """Model chunks (bf16 via Float16Module when opts.bf16) wrapped in megatron DDP, and the
    megatron optimizer (distributed when asked and on CUDA). Parallel state must be set up.
    `load_from`: a checkpoint to load the weights from (None: random init / resume later).
    with_optimizer=False: (chunks, None), for gradient checks (megatron's bf16 optimizer needs CUDA)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    chunks = build_model(arch, par, opts)
    tcfg = unwrap(chunks[0]).config
    tcfg.calculate_per_token_loss = True  # see training/step.py: divide by the global sample count
    if load_from:
        ckpt.load_model(chunks, load_from)
    if opts.bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    dist_opt = optim.distributed_optimizer
    if dist_opt and not platform.cuda_available():
        log("note: megatron's distributed optimizer needs CUDA tensors; using the plain optimizer on the CPU")
        dist_opt = False
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=optim.overlap_grad_reduce,
        use_distributed_optimizer=dist_opt, average_in_collective=False,
    )
    chunks = [DistributedDataParallel(tcfg, ddp_cfg, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    tcfg.finalize_model_grads_func = finalize_model_grads
    if not with_optimizer:
        return chunks, None
    clip = optim.clip_grad
    if clip and not platform.cuda_available():
        log("note: megatron's gradient clipping needs CUDA tensors; clipping is off on the CPU")
        clip = 0.0
    ocfg = OptimizerConfig(
        optimizer=optim.name, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        bf16=opts.bf16, params_dtype=torch.bfloat16 if opts.bf16 else torch.float32, clip_grad=clip,
        use_distributed_optimizer=dist_opt,
    )
    optimizer = get_megatron_optimizer(ocfg, chunks)
    tcfg.grad_scale_func = optimizer.scale_loss
    if optim.overlap_grad_reduce:
        tcfg.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return chunks, optimizer


def policy_arch(arch, model) -> object:
    """The checkpoint's architecture with the run's overrides (config.ModelSection): the RoPE base
    and the context length the run trains for; both are saved with the checkpoints and exported."""
    if model.rope_theta:
        arch = arch.with_rope_theta(model.rope_theta)
    if model.max_position_embeddings:
        arch = arch.with_max_position_embeddings(model.max_position_embeddings)
    return arch


def build_trainer(cfg: RunConfig) -> Trainer:
    from megatron.core import parallel_state as ps
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    par = _parallel_config(cfg)
    platform.enable_cpu_fallback()
    _, world = parallel.init_distributed()
    arch = policy_arch(ckpt.read_model_json(cfg.model.checkpoint)[0], cfg.model)
    # the layout is checked before anything heavy is built
    parallel.validate_layout(par, world, arch, cpu_cp=cfg.data.share_prefix)
    from megatron_longpo.training.resume import check_save_dir

    check_save_dir(cfg.train.save_dir, cfg.model.checkpoint)
    arch.check_sequence_length(longest_sequence(read_manifest(cfg.data.path), policy_roles(cfg.loss)),
                               f"the longest sequence of data.path={cfg.data.path}")
    resume_dir = Path(cfg.train.save_dir)
    resuming = (resume_dir / ckpt.LATEST).is_file()
    dp = parallel.setup(par, seed=cfg.train.seed, arch=arch, cpu_cp=cfg.data.share_prefix)

    bf16 = cfg.model.bf16 and platform.cuda_available()
    if cfg.model.bf16 and not bf16:
        log("note: bf16 needs a GPU; training in fp32 on the CPU")
    opts = ModelOptions(bf16=bf16, use_te=cfg.model.transformer_engine, recompute=cfg.model.recompute,
                        recompute_num_layers=cfg.model.recompute_num_layers, prefix_sharing=cfg.data.share_prefix)
    chunks, optimizer = build_engine(arch, par, opts, cfg.optim, None if resuming else cfg.model.checkpoint)

    cp_rank = ps.get_context_parallel_rank()
    data = StepData(
        cfg.data, roles=policy_roles(cfg.loss), ref_roles=reference_roles(cfg.loss), dp_rank=ps.get_data_parallel_rank(),
        dp_size=dp, pad_multiple=par.pad_multiple(), thd=opts.resolved_use_te(), cp_size=par.context_parallel,
        cp_rank=cp_rank, device=platform.default_device(), share_prefix=cfg.data.share_prefix,
        sequence_roles=sequence_roles(cfg.loss),
    )
    if cfg.data.check_tokenizer:
        from megatron_longpo.data.tokenizer import check_dataset_tokenizer

        for note in check_dataset_tokenizer(data.ds.manifest, cfg.data.path, arch.vocab_size, cfg.model.checkpoint,
                                            Path(cfg.model.checkpoint) / "tokenizer", skip_key="data.check_tokenizer=false"):
            log(f"note: {note}")
    total = data.total_steps(cfg.train.steps, cfg.train.epochs)
    warmup = int(round(cfg.optim.warmup_fraction * total))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else cfg.optim.lr, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total, 1), lr_decay_style="cosine",
        start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=max(total, 1), wd_incr_style="constant",
    )
    t = Trainer(cfg, chunks, optimizer, scheduler, data, arch, par, dp, total)
    if resuming:
        load_training_state(t, resume_dir)
    return t


# ---------------------------------------------------------------- checkpoints


def training_state_dict(t: Trainer, loading: bool = False) -> dict:
    sd = ckpt.model_sharded_state_dict(t.chunks)
    if t.cfg.optim.name != "sgd":  # plain SGD (no momentum) keeps no optimizer state
        sd["optimizer"] = t.optimizer.sharded_state_dict(sd, is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    sd["scheduler"] = t.scheduler.state_dict()
    sd["train_state"] = {
        "iteration": t.iteration, "data": t.data.state_dict(), "nonfinite_total": t.nonfinite_total,
        "nonfinite_in_a_row": t.nonfinite_in_a_row, "config": to_dict(t.cfg), "dataset_hash": t.data.ds.dataset_hash,
    }
    return sd


def save_training_state(t: Trainer) -> Path:
    d = Path(t.cfg.train.save_dir)
    it = ckpt.save(training_state_dict(t), d, t.iteration, keep_last=t.cfg.train.keep_last)
    if _rank0():
        # a training run's directory is itself a checkpoint directory: model.json and tokenizer travel
        import json

        src = Path(t.cfg.model.checkpoint)
        meta = json.loads((src / ckpt.MODEL_JSON).read_text())
        meta["arch"] = t.arch.to_dict()
        meta["trained_from"] = str(src.resolve())
        ckpt.atomic_write_text(d / ckpt.MODEL_JSON, json.dumps(meta, indent=2, sort_keys=True))
        if not (d / "tokenizer").is_dir():
            ckpt.copy_tokenizer(src / "tokenizer", d / "tokenizer")
    return it


def resume_iteration(t: Trainer, d: Path) -> tuple[Path, bool]:
    """The iteration to resume from and whether its checksums were verified (collective). A damaged
    newest iteration is an error naming the file, unless train.resume_fallback=true: then the newest
    intact older one is used, and the log says so."""
    latest = ckpt.latest_iteration_dir(d)
    older = [p for p in reversed(ckpt.list_iterations(d)) if p.name < latest.name]
    try:
        return latest, ckpt.verify_checksums(latest)
    except ckpt.CheckpointDamaged as e:
        if not t.cfg.train.resume_fallback:
            hint = (f"restore it, or set train.resume_fallback=true to resume from the newest intact older iteration "
                    f"(kept: {', '.join(p.name for p in older)})" if older else
                    "restore it; no older iteration is kept to fall back to")
            raise ckpt.CheckpointDamaged(e.iteration_dir, e.problems, hint) from None
        log(f"WARNING: {e}")
        for it in older:
            try:
                verified = ckpt.verify_checksums(it)
            except ckpt.CheckpointDamaged as e2:
                log(f"WARNING: {e2}")
                continue
            log(f"WARNING: train.resume_fallback=true: resuming from {it.name} instead of the damaged {latest.name}; "
                f"the steps after {it.name} are trained again")
            return it, verified
        raise ckpt.CheckpointError(f"{d}: no intact iteration to resume from (damaged: {latest.name}"
                                   f"{''.join(', ' + p.name for p in older)}); start a new run") from None


def check_resume_config(t: Trainer, d: Path, it: Path) -> dict:
    """Compare the configuration saved with the run with this one (training/resume.py)."""
    import json

    from megatron.core import dist_checkpointing

    from megatron_longpo.training import resume

    common = dist_checkpointing.load_common_state_dict(str(it))
    ts = common.get("train_state", {}) if isinstance(common, dict) else {}
    saved = ts.get("config")
    if not isinstance(saved, dict):
        raise resume.ResumeConfigError(
            f"train.save_dir {d} holds a checkpoint without training state ({it.name}: a model, e.g. an import or a "
            f"reshard, not a training run), so there is nothing to resume; choose a new train.save_dir "
            f"(model.checkpoint={d} starts a run from its weights)"
        )
    saved_hash = ts.get("dataset_hash")
    same_dataset = None if saved_hash is None else saved_hash == t.data.ds.dataset_hash
    try:
        trained_from = json.loads((d / ckpt.MODEL_JSON).read_text()).get("trained_from")
    except (OSError, ValueError):
        trained_from = None
    return resume.compare(saved, to_dict(t.cfg), save_dir=str(d), same_dataset=same_dataset,
                          same_base_model=resume.same_path(trained_from, t.cfg.model.checkpoint))


def load_training_state(t: Trainer, d: Path) -> None:
    from megatron_longpo.training import resume

    it, verified = resume_iteration(t, d)
    changes = check_resume_config(t, d, it)
    state = ckpt.load(training_state_dict(t, loading=True), d, it, verified=verified)
    ckpt.apply_model_state(t.chunks, state)
    if "optimizer" in state:
        t.optimizer.load_state_dict(state["optimizer"])
        o = t.cfg.optim
        for g in t.optimizer.param_groups:  # the run's values, not the saved ones (resume.REAPPLY)
            if "betas" in g:
                g["betas"] = (o.adam_beta1, o.adam_beta2)
            if "eps" in g:
                g["eps"] = o.adam_eps
    # the schedule is this run's (train.steps, optim.lr, ...), continued from the saved step: resume.SCHEDULE
    t.scheduler.num_steps = int(state["scheduler"]["num_steps"])
    t.scheduler.step(increment=0)
    ts = state["train_state"]
    t.iteration = ts["iteration"]
    t.data.load_state_dict(ts["data"])
    t.nonfinite_total, t.nonfinite_in_a_row = ts["nonfinite_total"], ts["nonfinite_in_a_row"]
    if t.iteration > t.total_steps:
        raise resume.ResumeConfigError(
            f"the run in {d} is already at step {t.iteration}, beyond the {t.total_steps} steps this configuration "
            f"asks for (train.steps / train.epochs); raise train.steps, or use another train.save_dir for a new run"
        )
    log(f"resumed from {it} at step {t.iteration}")
    if changes.get("schedule"):
        log(f"resume: {resume.describe(changes['schedule'])}: the learning-rate schedule is rebuilt for "
            f"{t.total_steps} steps and continues at step {t.iteration} with lr {t.optimizer.param_groups[0]['lr']:.3e}")
    if changes.get("reapply"):
        log(f"resume: {resume.describe(changes['reapply'])}: the new values replace the saved optimizer's")
    if changes.get("free"):
        log(f"resume: changed since the save (nothing saved depends on them): {resume.describe(changes['free'])}")


# ---------------------------------------------------------------- one step


def _reduce_metrics(collected: list[dict], t: Trainer) -> dict[str, float]:
    """Sum the micro-batch metric sums over micro-batches and DP ranks; broadcast from the last
    pipeline stage; divide sample-level metrics by the number of samples."""
    from megatron.core import parallel_state as ps

    names = sorted(collected[0]) if collected else []
    n_names = torch.tensor([len(names)], device=platform.default_device())
    vec = torch.stack([sum(c[k] for c in collected) for k in names]) if names else torch.zeros(0)
    vec = vec.to(platform.default_device()).double()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        # metric names are the same on every step; only the last stage has them
        last = ps.get_pipeline_model_parallel_last_rank()
        dist.broadcast(n_names, src=last, group=ps.get_pipeline_model_parallel_group())
        if not ps.is_pipeline_last_stage():
            vec = torch.zeros(int(n_names), dtype=torch.float64, device=platform.default_device())
        dist.broadcast(vec, src=last, group=ps.get_pipeline_model_parallel_group())
        obj = [names]
        dist.broadcast_object_list(obj, src=last, group=ps.get_pipeline_model_parallel_group())
        names = obj[0]
    if t.dp > 1:
        dist.all_reduce(vec, group=ps.get_data_parallel_group())
    out = dict(zip(names, vec.tolist()))
    n = out.pop("samples", 1.0) or 1.0
    tokens = out.pop("tokens", 0.0)
    res = {k: v / n for k, v in out.items()}
    res["samples"], res["tokens"] = n, tokens
    return res


def engine_forward_backward(chunks, optimizer, batches, loss_cfg, chunk_size: int, cp_group) -> list[dict]:
    """Forward and backward over this rank's micro-batches of one step; gradients end up in the
    DDP buffers, reduced over DP x CP and divided by the global sample count. Returns the
    per-micro-batch metrics (last pipeline stage)."""
    for c in chunks:
        c.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    return run_schedule(chunks, batches, make_forward_step(loss_cfg, chunk_size, cp_group), forward_only=False)


def forward_backward(t: Trainer, batches) -> dict[str, float]:
    collected = engine_forward_backward(t.chunks, t.optimizer, batches, t.cfg.loss, t.cfg.model.logprob_chunk_size,
                                        t.data.cp_group())
    return _reduce_metrics(collected, t)


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
    flops = M.batch_model_flops(t.arch, t.data.last_step_spans(), t.data.last_step_scored_tokens())
    if t.dp > 1:  # every DP replica processed other samples; TP/CP/PP ranks of a replica the same
        from megatron.core import parallel_state as ps

        f = torch.tensor([flops], dtype=torch.float64, device=platform.default_device())
        dist.all_reduce(f, group=ps.get_data_parallel_group())
        flops = float(f.item())
    return M.StepRecord(t.iteration, m, lr, grad_norm, timer.seconds, int(m["tokens"]), flops, M.peak_memory_gib(), skipped=not finite)


# ---------------------------------------------------------------- the run


class _Stop:
    requested = False


def _on_sigterm(signum, frame):
    _Stop.requested = True


def _stop_everywhere() -> bool:
    flag = torch.tensor([1 if _Stop.requested else 0], device=platform.default_device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train(cfg: RunConfig) -> dict:
    from tqdm import tqdm

    signal.signal(signal.SIGTERM, _on_sigterm)
    t0 = time.time()
    t = build_trainer(cfg)
    world = dist.get_world_size()
    peak = M.peak_tflops(cfg.train.peak_tflops)
    tb = M.TensorBoard(os.path.join(cfg.train.save_dir, "tensorboard") if cfg.train.tensorboard and _rank0() else None)
    log(f"training {cfg.loss.name} on {t.data.describe()} | {t.arch.architecture} {t.arch.num_layers} layers, RoPE base "
        f"{t.arch.rope_theta:g} | TP={t.par.tensor_parallel} PP={t.par.pipeline_parallel} CP={t.par.context_parallel} "
        f"DP={t.dp} | {t.total_steps} steps of {cfg.data.global_batch_size} samples")
    # disable=None: no bar where stderr is not a terminal (logs, CI), whose frames would pile up between the step lines
    bar = tqdm(total=t.total_steps, initial=t.iteration, disable=None if _rank0() else True, desc="train", dynamic_ncols=True, file=sys.stderr)
    records = []
    stopped_by_signal = False
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
                if _rank0():
                    bar.write(rec.line(t.total_steps, world, peak))
                    sys.stdout.flush()
                tb.log(rec, world)
            if t.nonfinite_in_a_row >= cfg.train.max_nonfinite_in_a_row:
                raise TrainingStopped(
                    f"{t.nonfinite_in_a_row} non-finite losses/gradients in a row (step {t.iteration}); stopping. "
                    f"Lower optim.lr, check the data (tools/preprocess_pairs.py summary) and the reference "
                    f"log-probs, or raise train.max_nonfinite_in_a_row"
                )
            if cfg.train.exit_after and len(records) >= cfg.train.exit_after and t.iteration < t.total_steps:
                log(f"train.exit_after={cfg.train.exit_after}: saving at step {t.iteration} and exiting")
                break
            if _stop_everywhere():
                stopped_by_signal = True
                log(f"SIGTERM received: saving at step {t.iteration} and exiting")
                break
            if cfg.train.save_interval and t.iteration % cfg.train.save_interval == 0 and t.iteration < t.total_steps:
                watch()
                save_training_state(t)
        watch()
        path = save_training_state(t)
    finally:
        faulthandler.cancel_dump_traceback_later()
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
        "steps": [{"step": r.step, "lr": r.lr, "grad_norm": r.grad_norm, "seconds": r.seconds, "skipped": r.skipped,
                   "peak_mem_gib": r.peak_mem_gib, **r.metrics} for r in records],
    }
    if _rank0():
        import json

        ckpt.atomic_write_text(Path(cfg.train.save_dir) / "summary.json", json.dumps(summary, indent=2))
    log(f"done: {summary['steps_run']} steps (now at {t.iteration}/{t.total_steps}), loss {summary['first_loss']} -> "
        f"{summary['last_loss']}, {summary['skipped_nonfinite']} skipped, {summary['tokens_per_s']:,.0f} tokens/s, "
        f"checkpoint {path}, {summary['seconds']:.0f} s")
    return summary
