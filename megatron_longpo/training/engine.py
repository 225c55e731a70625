"""The engine: model chunks wrapped for training (Float16Module, megatron DDP), the optimizer and
the learning-rate schedule, assembled from a RunConfig; one step's forward and backward over the
pipeline schedule and the reduction of its metrics.

Gradient scaling (why the numbers below are what they are):
  * the loss function returns (sum of per-sample losses, number of samples, metrics) and the
    TransformerConfig has calculate_per_token_loss=True (models/megatron_config.megatron_configs),
    so the schedule does not divide and `finalize_model_grads` divides every gradient by the
    number of samples summed over DP x CP;
  * every context-parallel rank computes the same loss from sequence sums reduced with an
    autograd-aware all-reduce, whose backward sums dL/dsum over the CP ranks: each rank's local
    gradients are CP times the single-device ones; each CP rank also reports the sample count,
    so the divisor is CP times the global sample count and the factors cancel.
  The resulting gradients equal those of one device processing the whole global batch (tested
  for TP=2, DP=2 with 2 micro-batches, and the CP reduction over 2 ranks).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_longpo import parallel, platform
from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.config import RunConfig
from megatron_longpo.data.blend import parse_blend
from megatron_longpo.data.format import PairDataset, longest_sequence, read_manifest
from megatron_longpo.data.tokenizer import check_dataset_tokenizer
from megatron_longpo.losses import policy_roles, reference_roles, sequence_roles
from megatron_longpo.models.build import ModelOptions, build_model
from megatron_longpo.models.forward import run_schedule
from megatron_longpo.models.megatron_config import MegatronConfigs, megatron_configs
from megatron_longpo.training import memory
from megatron_longpo.training.data import StepData
from megatron_longpo.training.memory_check import check_run, chosen_recompute
from megatron_longpo.training.metrics import log
from megatron_longpo.training.resume import check_save_dir
from megatron_longpo.training.step import make_forward_step
from megatron_longpo.training.train_state import load_training_state, prepare_resume


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
    layout: parallel.Layout
    total_steps: int
    iteration: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0

    @property
    def par(self) -> parallel.ParallelConfig:
        return self.layout.config

    @property
    def dp(self) -> int:
        return self.layout.dp_size


def engine_configs(arch, par: parallel.ParallelConfig, opts: ModelOptions, optim) -> MegatronConfigs:
    """The memory options checked (training/memory.py: what megatron-core cannot combine is refused
    with its own message), then the one translation into megatron-core's config objects."""
    cuda = platform.cuda_available()
    memory.check(optim, cuda=cuda, use_te=opts.resolved_use_te(), distributed_optimizer=optim.distributed_optimizer,
                 activation_offload_layers=opts.activation_offload_layers, recompute=opts.recompute,
                 pipeline_parallel=par.pipeline_parallel, num_layers=arch.num_layers)
    return megatron_configs(arch, par, opts, optim, cuda=cuda)


def build_chunks(arch, par: parallel.ParallelConfig, opts: ModelOptions, configs: MegatronConfigs, optim,
                 load_from: str | None) -> list:
    """Model chunks (bf16 via Float16Module when opts.bf16) wrapped in megatron DDP. Parallel state
    must be set up. `load_from`: a checkpoint to load the weights from (None: random init / resume later)."""
    from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    tcfg = configs.transformer
    chunks = build_model(arch, par, opts, config=tcfg)
    if load_from:
        ckpt.load_model(chunks, load_from)
    if opts.bf16:
        chunks = [Float16Module(tcfg, c) for c in chunks]
    if optim.distributed_optimizer and not configs.ddp.use_distributed_optimizer:
        log("note: megatron's distributed optimizer needs CUDA tensors; using the plain optimizer on the CPU")
    chunks = [DistributedDataParallel(tcfg, configs.ddp, c, disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    tcfg.finalize_model_grads_func = finalize_model_grads
    return chunks


def build_optimizer(chunks: list, configs: MegatronConfigs, optim):
    """The megatron optimizer over the DDP chunks (distributed when asked and on CUDA); the
    TransformerConfig gets its loss scaling and, with overlapped reduction, its no_sync hook."""
    from megatron.core.optimizer import get_megatron_optimizer

    if optim.clip_grad and not configs.optimizer.clip_grad:
        log("note: megatron's gradient clipping needs CUDA tensors; clipping is off on the CPU")
    optimizer = get_megatron_optimizer(configs.optimizer, chunks)
    tcfg = configs.transformer
    tcfg.grad_scale_func = optimizer.scale_loss
    if configs.ddp.overlap_grad_reduce:
        tcfg.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    return optimizer


def build_scheduler(optimizer, optim, total_steps: int):
    """Linear warm-up over optim.warmup_fraction of the steps, then cosine decay to optim.min_lr."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    warmup = int(round(optim.warmup_fraction * total_steps))
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else optim.lr, max_lr=optim.lr, min_lr=optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total_steps, 1), lr_decay_style="cosine",
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant",
    )


def build_engine(arch, par: parallel.ParallelConfig, opts: ModelOptions, optim, load_from: str | None,
                 with_optimizer: bool = True):
    """(chunks, optimizer) exactly as build_trainer makes them, for tools and checks that need no
    data: engine_configs, build_chunks, build_optimizer. Parallel state must be set up.
    with_optimizer=False: (chunks, None), for gradient checks (megatron's bf16 optimizer needs CUDA)."""
    configs = engine_configs(arch, par, opts, optim)
    chunks = build_chunks(arch, par, opts, configs, optim, load_from)
    return chunks, build_optimizer(chunks, configs, optim) if with_optimizer else None


def policy_arch(arch, model) -> object:
    """The checkpoint's architecture with the run's overrides (config.ModelSection): the RoPE base
    and the context length the run trains for; both are saved with the checkpoints and exported."""
    if model.rope_theta:
        arch = arch.with_rope_theta(model.rope_theta)
    if model.max_position_embeddings:
        arch = arch.with_max_position_embeddings(model.max_position_embeddings)
    return arch


def _reduce_metrics(collected: list[dict], t: Trainer) -> dict[str, float]:
    """Sum the micro-batch metric sums over micro-batches and DP ranks; broadcast from the last
    pipeline stage; divide sample-level metrics by the number of samples."""
    lay = t.layout
    names = sorted(collected[0]) if collected else []
    n_names = torch.tensor([len(names)], device=platform.default_device())
    vec = torch.stack([sum(c[k] for c in collected) for k in names]) if names else torch.zeros(0)
    vec = vec.to(platform.default_device()).double()
    if lay.pp_size > 1:
        # metric names are the same on every step; only the last stage has them
        last = lay.pp_last_rank
        dist.broadcast(n_names, src=last, group=lay.pp_group)
        if not lay.is_last_stage:
            vec = torch.zeros(int(n_names), dtype=torch.float64, device=platform.default_device())
        dist.broadcast(vec, src=last, group=lay.pp_group)
        obj = [names]
        dist.broadcast_object_list(obj, src=last, group=lay.pp_group)
        names = obj[0]
    if lay.dp_size > 1:
        dist.all_reduce(vec, group=lay.dp_group)
    out = dict(zip(names, vec.tolist()))
    n = out.pop("samples", 1.0) or 1.0
    tokens = out.pop("tokens", 0.0)
    res = {k: v / n for k, v in out.items()}
    res["samples"], res["tokens"] = n, tokens
    return res


def engine_forward_backward(chunks, optimizer, batches, loss_cfg, chunk_size: int, layout) -> list[dict]:
    """Forward and backward over this rank's micro-batches of one step; gradients end up in the
    DDP buffers, reduced over DP x CP and divided by the global sample count. Returns the
    per-micro-batch metrics (last pipeline stage)."""
    for c in chunks:
        c.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    return run_schedule(chunks, batches, make_forward_step(loss_cfg, chunk_size, layout), forward_only=False)


def forward_backward(t: Trainer, batches) -> dict[str, float]:
    collected = engine_forward_backward(t.chunks, t.optimizer, batches, t.cfg.loss, t.cfg.model.logprob_chunk_size,
                                        t.layout)
    return _reduce_metrics(collected, t)


def evaluate(t: Trainer) -> dict[str, float] | None:
    """Forward-only pass over the evaluation split (training/data.EvalData): the loss and its
    metrics averaged over all its samples, reduced over DP like the training metrics (the same
    number whatever the DP size). None without an evaluation split."""
    ev = t.data.eval
    if ev is None:
        return None
    for c in t.chunks:
        c.eval()
    collected: list[dict] = []
    try:
        with torch.no_grad():
            for batches in ev.steps():
                collected += run_schedule(t.chunks, batches, make_forward_step(t.cfg.loss, t.cfg.model.logprob_chunk_size,
                                                                               t.layout), forward_only=True)
    finally:
        for c in t.chunks:
            c.train()
    return _reduce_metrics(collected, t)


def _open_datasets(path: str | None, verify_hash: bool = False):
    """The datasets of every prefix of data.path (one, or a blend's), opened once for the whole
    setup; None where one cannot be opened: the error then comes, with its own message, from where
    it always came (the length check or StepData)."""
    if not path or not path.strip():
        return None
    try:
        return [PairDataset(prefix, verify_hash=verify_hash) for _, prefix in parse_blend(path)]
    except Exception:  # noqa: BLE001
        return None


def _check_sequence_lengths(cfg: RunConfig, arch, datasets) -> None:
    """A sliding-window model refused past its window, for each prefix of a blend (its manifest)."""
    prefixes = [prefix for _, prefix in parse_blend(cfg.data.path)] if cfg.data.path.strip() else []
    for i, prefix in enumerate(prefixes):
        manifest = datasets[i].manifest if datasets is not None else read_manifest(prefix)
        arch.check_sequence_length(longest_sequence(manifest, policy_roles(cfg.loss)),
                                   f"the longest sequence of {prefix} (data.path)")


def _prepare_resume(cfg: RunConfig) -> tuple[Path, tuple] | None:
    """(the run directory, prepare_resume's answer) when train.save_dir holds a checkpoint to resume
    from, else None; a refused configuration change or a damaged checkpoint is named here, before
    the model is built."""
    resume_dir = Path(cfg.train.save_dir)
    if not (resume_dir / ckpt.LATEST).is_file():
        return None
    return resume_dir, prepare_resume(cfg, resume_dir)


def model_options(cfg: RunConfig) -> ModelOptions:
    """How the run's model is built (config.ModelSection; bf16 only where a GPU is)."""
    bf16 = platform.resolve_bf16(cfg.model.bf16)
    if cfg.model.bf16 and not bf16:
        log("note: bf16 needs a GPU; training in fp32 on the CPU")
    return ModelOptions(bf16=bf16, use_te=cfg.model.transformer_engine, recompute=cfg.model.recompute,
                        recompute_method=cfg.model.recompute_method, recompute_num_layers=cfg.model.recompute_num_layers,
                        recompute_modules=cfg.model.recompute_modules, prefix_sharing=cfg.data.share_prefix,
                        activation_offload_layers=cfg.model.activation_offload_layers)


def _step_data(cfg: RunConfig, arch, layout: parallel.Layout, opts: ModelOptions, datasets) -> StepData:
    return StepData(cfg.data, roles=policy_roles(cfg.loss), ref_roles=reference_roles(cfg.loss), layout=layout,
                    thd=opts.resolved_use_te(), device=platform.default_device(), share_prefix=cfg.data.share_prefix,
                    sequence_roles=sequence_roles(cfg.loss), vocab_size=arch.vocab_size, datasets=datasets)


def _check_tokenizers(cfg: RunConfig, arch, data: StepData) -> None:
    """Each dataset (training and evaluation) tokenized with the model's tokenizer (data.check_tokenizer)."""
    if not cfg.data.check_tokenizer:
        return
    evals = data.eval.src if data.eval is not None and data.eval.src is not data.src else None
    for prefix, ds in [*zip(data.src.prefixes, data.src.datasets), *(zip(evals.prefixes, evals.datasets) if evals else [])]:
        for note in check_dataset_tokenizer(ds.manifest, prefix, arch.vocab_size, cfg.model.checkpoint,
                                            Path(cfg.model.checkpoint) / "tokenizer", skip_key="data.check_tokenizer=false"):
            log(f"note: {note}")


def build_trainer(cfg: RunConfig) -> Trainer:
    """The run, built in order; each step refuses what it can before the next, heavier one."""
    platform.enable_cpu_fallback()
    parallel.init_distributed()
    platform.limit_gpu_memory(cfg.train.memory_fraction)  # before the first allocation of this run
    arch = policy_arch(ckpt.read_model_json(cfg.model.checkpoint)[0], cfg.model)
    # the layout is checked (parallel.validate_layout, inside setup) before anything heavy is built
    layout = parallel.setup(cfg.parallel, seed=cfg.train.seed, arch=arch, cpu_cp=cfg.data.share_prefix)
    # once: the plan, the length check and the step data read them
    datasets = _open_datasets(cfg.data.path, verify_hash=cfg.data.verify_hash)
    plan = check_run(cfg, arch, layout.world_size, log, datasets)  # printed before the build; a run that cannot fit stops here (train.memory_check)
    cfg = chosen_recompute(cfg, plan)  # model.recompute=auto: the recompute the plan chose, for the build and the saved config
    check_save_dir(cfg.train.save_dir, cfg.model.checkpoint)
    _check_sequence_lengths(cfg, arch, datasets)
    resume = _prepare_resume(cfg)
    opts = model_options(cfg)
    configs = engine_configs(arch, cfg.parallel, opts, cfg.optim)
    chunks = build_chunks(arch, cfg.parallel, opts, configs, cfg.optim, None if resume else cfg.model.checkpoint)
    optimizer = build_optimizer(chunks, configs, cfg.optim)
    data = _step_data(cfg, arch, layout, opts, datasets)
    _check_tokenizers(cfg, arch, data)
    total = data.total_steps(cfg.train.steps, cfg.train.epochs)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    t = Trainer(cfg, chunks, optimizer, scheduler, data, arch, layout, total)
    if resume is not None:
        load_training_state(t, *resume)
    return t
