"""The memory plan (training/memory_plan.py's arithmetic) where a run meets it: the trainer's
check before the model is built (`check_run`, train.memory_check; `chosen_recompute`: the
configuration with model.recompute=auto's choice) and `python -m megatron_longpo.train --plan`
(`plan_command`), both for the dataset's longest sample (`row_tokens_of_dataset`). The GPU's size
is read through `memory_plan.device_bytes`."""

from __future__ import annotations

from dataclasses import replace

from megatron_longpo.training import memory_plan as P
from megatron_longpo.training.memory_plan import GIB, H200_GIB, MemoryPlan, PlanInputs, advice, describe, plan, resolve_recompute


def row_tokens_of_dataset(ds, *, share_prefix: bool, samples_per_microbatch: int, roles, sequence_roles=()) -> tuple[int, int]:
    """(row tokens, scored positions) of the dataset's longest sample times samples_per_microbatch:
    each sample's sequences of `roles` summed, less the chosen/rejected shared prefix with
    share_prefix (an upper bound for multi-turn samples)."""
    from megatron_longpo.data.prefix_sharing import shared_prefix_length

    best = (0, 0)
    for k in range(len(ds)):
        s = ds.sample(k)
        seqs = {r: s.sequences(r) for r in roles if r in s.roles}
        n = sum(len(q) for qs in seqs.values() for q in qs)
        if share_prefix and seqs.get("chosen") and seqs.get("rejected"):
            n -= shared_prefix_length(seqs["chosen"][0], seqs["rejected"][0])
        scored = sum(int(q.loss_mask.sum()) if hasattr(q, "loss_mask") else 0 for qs in seqs.values() for q in qs)
        scored += sum(len(q) for r in sequence_roles for q in seqs.get(r, ()))
        if n > best[0]:
            best = (n, scored)
    return best[0] * samples_per_microbatch, best[1] * samples_per_microbatch


class MemoryPlanError(ValueError):
    """The plan predicts that the run does not fit on the GPU (train.memory_check=refuse)."""


def check_run(cfg, arch, world: int, log=print, datasets=None) -> MemoryPlan | None:
    """The trainer's plan before the model is built: printed (rank 0 via `log`), and a run predicted
    not to fit by more than the plan's 10% refused (train.memory_check=refuse; warn: a warning).
    `datasets`: the run's datasets (every prefix of a blend) when the caller has opened them (the
    trainer: once for the whole setup).
    model.recompute=auto: the plan is of the recompute choose_recompute picks, said in one line
    (chosen_recompute(cfg, plan) is the configuration to build with)."""
    def no_plan():
        if cfg.model.recompute == "auto":
            log("model.recompute=auto: no recompute (no memory plan: data.path cannot be read here)")
        return None

    if cfg.train.memory_check == "off" or not cfg.data.path:
        return no_plan()
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.losses import policy_roles, sequence_roles
    from megatron_longpo import platform

    from megatron_longpo.data.blend import parse_blend

    if datasets is None:
        try:  # every prefix of a blend (data/blend.py); the longest row decides
            datasets = [PairDataset(prefix) for _, prefix in parse_blend(cfg.data.path)]
        except Exception:  # noqa: BLE001 - the data's own error comes from StepData, with its message
            return no_plan()
    rows, scored = max(row_tokens_of_dataset(ds, share_prefix=cfg.data.share_prefix,
                                             samples_per_microbatch=cfg.data.samples_per_microbatch,
                                             roles=policy_roles(cfg.loss), sequence_roles=sequence_roles(cfg.loss))
                       for ds in datasets)
    dev = P.device_bytes()
    if dev and cfg.train.memory_fraction:
        dev *= cfg.train.memory_fraction  # the allocator's cap (jobs sharing the GPU): what this run may use
    i, chose = resolve_recompute(PlanInputs.from_config(cfg, arch, world=world, row_tokens=rows, scored_tokens=scored,
                                                        cuda=platform.cuda_available()), dev)
    if chose:
        log(chose)
    p = plan(i, dev)
    log(describe(p))
    if p.verdict == "does not fit":
        msg = (f"the memory plan predicts {p.peak / GIB:.1f} GiB per GPU for rows of {rows:,} tokens, more than the GPU's "
               f"{p.device / GIB:.1f} GiB; {advice(p)}; train.memory_check=warn runs it anyway")
        if cfg.train.memory_check == "refuse":
            raise MemoryPlanError(msg)
        log(f"WARNING: {msg}")
    elif p.verdict.startswith("tight"):
        log(f"WARNING: the memory plan predicts {p.peak / GIB:.1f} of {p.device / GIB:.1f} GiB: it may run out of memory; "
            f"{advice(p) or 'model.recompute=full or optim.cpu_offload=true leave more room'}")
    return p


def chosen_recompute(cfg, p: MemoryPlan | None):
    """`cfg` (a RunConfig) with model.recompute=auto replaced by what the plan `p` (check_run's) chose:
    recompute, method and layers, for the engine to build with; no recompute without a plan. Any
    other model.recompute: `cfg` itself."""
    if cfg.model.recompute != "auto":
        return cfg
    if p is None:
        return replace(cfg, model=replace(cfg.model, recompute=None, recompute_method="uniform", recompute_modules=None))
    i = p.inputs
    return replace(cfg, model=replace(cfg.model, recompute=i.recompute, recompute_method=i.recompute_method,
                                      recompute_num_layers=i.recompute_num_layers, recompute_modules=i.recompute_modules))


def plan_command(cfg, *, length: int | None = None, response: int = 512, world: int | None = None,
                 device_gib: float | None = None, hf_config: str | None = None) -> str:
    """`python -m megatron_longpo.train --plan`: the plan of this configuration without a GPU and
    without building anything. The model from model.checkpoint (or a Hugging Face config.json); the
    row from `length` (a LongPO pair of two `length`-token sequences with `response`-token answers:
    one row of length + response tokens with data.share_prefix, two sequences otherwise), else the
    dataset's longest sample (data.path)."""
    import json
    from pathlib import Path

    from megatron_longpo.losses import sequence_roles

    if hf_config:
        from megatron_longpo.models.hf_config import arch_from_hf_config

        arch = arch_from_hf_config(json.loads(Path(hf_config).read_text()))
    else:
        from megatron_longpo.checkpoint.dist import read_model_json

        arch = read_model_json(cfg.model.checkpoint)[0]
    p = cfg.parallel
    world = world or p.tensor_parallel * p.pipeline_parallel * p.context_parallel
    whole = bool(sequence_roles(cfg.loss))
    if length:
        spm = cfg.data.samples_per_microbatch
        rows = spm * ((length + response) if cfg.data.share_prefix else 2 * length)
        scored = spm * (2 * response + ((length - response) if whole else 0))
        where = f"a pair of {length:,}-token sequences"
    else:
        from megatron_longpo.data.format import PairDataset
        from megatron_longpo.losses import policy_roles

        from megatron_longpo.data.blend import parse_blend

        rows, scored = max(row_tokens_of_dataset(PairDataset(prefix), share_prefix=cfg.data.share_prefix,
                                                 samples_per_microbatch=cfg.data.samples_per_microbatch,
                                                 roles=policy_roles(cfg.loss), sequence_roles=sequence_roles(cfg.loss))
                           for _, prefix in parse_blend(cfg.data.path))
        where = f"the longest sample of {cfg.data.path}"
    dev = device_gib * GIB if device_gib else P.device_bytes() or H200_GIB * GIB
    label = f"{dev / GIB:.1f} GiB" + ("" if device_gib or P.device_bytes() else " (an H200: --device-gib to change)")
    if cfg.train.memory_fraction:
        dev *= cfg.train.memory_fraction
        label += f", capped at {cfg.train.memory_fraction:g} of it ({dev / GIB:.1f} GiB)"
    i, chose = resolve_recompute(PlanInputs.from_config(cfg, arch, world=world, row_tokens=rows, scored_tokens=scored,
                                                        cuda=True), dev)
    pl = plan(i, dev)
    head = (f"{arch.architecture}, {arch.num_layers} layers; {where}: {rows:,} tokens per row"
            f"{' (prefix-shared)' if cfg.data.share_prefix else ''}; {world} GPU(s) of {label}")
    return head + "\n" + (chose + "\n" if chose else "") + describe(pl)
