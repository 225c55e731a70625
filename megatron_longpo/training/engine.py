"""The engine: model chunks wrapped for training (Float16Module, megatron DDP), the optimizer and
the learning-rate schedule, assembled from a RunConfig; one step's forward and backward over the
pipeline schedule and the reduction of its metrics.

Gradient scaling (why the numbers below are what they are):
  * the loss function returns (sum of per-sample losses, number of samples, metrics) and the
    TransformerConfig has calculate_per_token_loss=True, so the schedule does not divide and
    `finalize_model_grads` divides every gradient by the number of samples summed over DP x CP;
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
from megatron_longpo.data.format import longest_sequence, read_manifest
from megatron_longpo.losses import policy_roles, reference_roles, sequence_roles
from megatron_longpo.models.build import ModelOptions, build_model, unwrap
from megatron_longpo.models.forward import run_schedule
from megatron_longpo.training import memory
from megatron_longpo.training.data import StepData
from megatron_longpo.training.metrics import log
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


def build_engine(arch, par: parallel.ParallelConfig, opts: ModelOptions, optim, load_from: str | None,
                 with_optimizer: bool = True):
    """Model chunks (bf16 via Float16Module when opts.bf16) wrapped in megatron DDP, and the
    megatron optimizer (distributed when asked and on CUDA). Parallel state must be set up.
    `load_from`: a checkpoint to load the weights from (None: random init / resume later).
    with_optimizer=False: (chunks, None), for gradient checks (megatron's bf16 optimizer needs CUDA)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    memory.check(optim, cuda=platform.cuda_available(), use_te=opts.resolved_use_te(), distributed_optimizer=optim.distributed_optimizer,
                 activation_offload_layers=dict(opts.transformer_overrides).get("cpu_offloading_num_layers", 0),
                 recompute=opts.recompute, pipeline_parallel=par.pipeline_parallel, num_layers=arch.num_layers)
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
        **memory.ddp_kwargs(optim), overlap_grad_reduce=optim.overlap_grad_reduce,
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
        use_distributed_optimizer=dist_opt, **memory.optimizer_kwargs(optim),
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
    from megatron_longpo.data.blend import parse_blend
    from megatron_longpo.data.format import PairDataset

    try:
        return [PairDataset(prefix, verify_hash=verify_hash) for _, prefix in parse_blend(path)]
    except Exception:  # noqa: BLE001
        return None


def build_trainer(cfg: RunConfig) -> Trainer:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_longpo.training.resume import check_save_dir

    par = cfg.parallel
    platform.enable_cpu_fallback()
    parallel.init_distributed()
    arch = policy_arch(ckpt.read_model_json(cfg.model.checkpoint)[0], cfg.model)
    # the layout is checked (parallel.validate_layout, inside setup) before anything heavy is built
    layout = parallel.setup(par, seed=cfg.train.seed, arch=arch, cpu_cp=cfg.data.share_prefix)
    from megatron_longpo.training.memory_plan import check_run

    # once: the plan, the length check and the step data read them
    datasets = _open_datasets(cfg.data.path, verify_hash=cfg.data.verify_hash)
    check_run(cfg, arch, layout.world_size, log, datasets)  # printed before the build; a run that cannot fit stops here (train.memory_check)
    check_save_dir(cfg.train.save_dir, cfg.model.checkpoint)
    from megatron_longpo.data.blend import parse_blend

    prefixes = [prefix for _, prefix in parse_blend(cfg.data.path)] if cfg.data.path.strip() else []
    for i, prefix in enumerate(prefixes):  # each prefix of a blend
        manifest = datasets[i].manifest if datasets is not None else read_manifest(prefix)
        arch.check_sequence_length(longest_sequence(manifest, policy_roles(cfg.loss)),
                                   f"the longest sequence of {prefix} (data.path)")
    resume_dir = Path(cfg.train.save_dir)
    resuming = (resume_dir / ckpt.LATEST).is_file()
    # a refused configuration change or a damaged checkpoint is named before the model is built
    prepared = prepare_resume(cfg, resume_dir) if resuming else None

    bf16 = platform.resolve_bf16(cfg.model.bf16)
    if cfg.model.bf16 and not bf16:
        log("note: bf16 needs a GPU; training in fp32 on the CPU")
    opts = ModelOptions(bf16=bf16, use_te=cfg.model.transformer_engine, recompute=cfg.model.recompute,
                        recompute_num_layers=cfg.model.recompute_num_layers, prefix_sharing=cfg.data.share_prefix,
                        transformer_overrides=memory.transformer_overrides(cfg.model))
    chunks, optimizer = build_engine(arch, par, opts, cfg.optim, None if resuming else cfg.model.checkpoint)

    data = StepData(cfg.data, roles=policy_roles(cfg.loss), ref_roles=reference_roles(cfg.loss), layout=layout,
                    thd=opts.resolved_use_te(), device=platform.default_device(), share_prefix=cfg.data.share_prefix,
                    sequence_roles=sequence_roles(cfg.loss), vocab_size=arch.vocab_size, datasets=datasets)
    if cfg.data.check_tokenizer:
        from megatron_longpo.data.tokenizer import check_dataset_tokenizer

        evals = data.eval.src if data.eval is not None and data.eval.src is not data.src else None
        for prefix, ds in [*zip(data.src.prefixes, data.src.datasets), *(zip(evals.prefixes, evals.datasets) if evals else [])]:
            for note in check_dataset_tokenizer(ds.manifest, prefix, arch.vocab_size, cfg.model.checkpoint,
                                                Path(cfg.model.checkpoint) / "tokenizer", skip_key="data.check_tokenizer=false"):
                log(f"note: {note}")
    total = data.total_steps(cfg.train.steps, cfg.train.epochs)
    warmup = int(round(cfg.optim.warmup_fraction * total))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else cfg.optim.lr, max_lr=cfg.optim.lr, min_lr=cfg.optim.min_lr,
        lr_warmup_steps=warmup, lr_decay_steps=max(total, 1), lr_decay_style="cosine",
        start_wd=cfg.optim.weight_decay, end_wd=cfg.optim.weight_decay, wd_incr_steps=max(total, 1), wd_incr_style="constant",
    )
    t = Trainer(cfg, chunks, optimizer, scheduler, data, arch, layout, total)
    if resuming:
        load_training_state(t, resume_dir, prepared)
    return t
