"""The whole training state on disk: model, optimizer, scheduler, data position and counters in a
dist_checkpointing iteration (checkpoint/dist.py), plus the run directory's model.json and
tokenizer; and resuming from it (the newest intact iteration, the saved configuration compared
with this one: training/resume.py).

`t` below is a training.engine.Trainer."""

from __future__ import annotations

from pathlib import Path

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.config import to_dict
from megatron_longpo.training.metrics import log, rank0



def training_state_dict(t, loading: bool = False) -> dict:
    sd = ckpt.model_sharded_state_dict(t.chunks)
    if t.cfg.optim.name != "sgd":  # plain SGD (no momentum) keeps no optimizer state
        sd["optimizer"] = t.optimizer.sharded_state_dict(sd, is_loading=loading, metadata={"distrib_optim_sharding_type": "dp_reshardable"})
    sd["scheduler"] = t.scheduler.state_dict()
    sd["train_state"] = {
        "iteration": t.iteration, "data": t.data.state_dict(), "nonfinite_total": t.nonfinite_total,
        "nonfinite_in_a_row": t.nonfinite_in_a_row, "config": to_dict(t.cfg), "dataset_hash": t.data.ds.dataset_hash,
    }
    return sd


def save_training_state(t) -> Path:
    d = Path(t.cfg.train.save_dir)
    it = ckpt.save(training_state_dict(t), d, t.iteration, keep_last=t.cfg.train.keep_last)
    if rank0():
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


def resume_iteration(cfg, d: Path) -> tuple[Path, bool]:
    """The iteration to resume from and whether its checksums were verified (collective). A damaged
    newest iteration is an error naming the file, unless train.resume_fallback=true: then the newest
    intact older one is used, and the log says so."""
    latest = ckpt.latest_iteration_dir(d)
    older = [p for p in reversed(ckpt.list_iterations(d)) if p.name < latest.name]
    try:
        return latest, ckpt.verify_checksums(latest)
    except ckpt.CheckpointDamaged as e:
        if not cfg.train.resume_fallback:
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


def check_resume_config(cfg, dataset_hash: str, d: Path, it: Path) -> dict:
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
    same_dataset = None if saved_hash is None else saved_hash == dataset_hash
    try:
        trained_from = json.loads((d / ckpt.MODEL_JSON).read_text()).get("trained_from")
    except (OSError, ValueError):
        trained_from = None
    return resume.compare(saved, to_dict(cfg), save_dir=str(d), same_dataset=same_dataset,
                          same_base_model=resume.same_path(trained_from, cfg.model.checkpoint))


def prepare_resume(cfg, d: Path) -> tuple[Path, bool, dict]:
    """Before anything is built (collective): the iteration to resume from, whether it was verified,
    and the configuration changes by kind; a refused change or a damaged checkpoint raises here."""
    from megatron_longpo.data.format import read_manifest

    it, verified = resume_iteration(cfg, d)
    return it, verified, check_resume_config(cfg, read_manifest(cfg.data.path)["dataset_hash"], d, it)


def _schedule_keys_of_this_run(opt_state, optim) -> None:
    """Put this run's optim.lr / optim.min_lr into the saved param groups' max_lr / min_lr.
    megatron matches saved and current param groups by a key that includes both (a changed lr was
    'Could not find parameter group with key ...'), and its scheduler reads the rate from the
    group, so the saved values would also win over the new ones (resume.SCHEDULE)."""
    if isinstance(opt_state, dict):
        for k, v in opt_state.items():
            if k == "param_groups" and isinstance(v, list):
                for g in v:
                    if isinstance(g, dict):
                        if "max_lr" in g:
                            g["max_lr"] = optim.lr
                        if "min_lr" in g:
                            g["min_lr"] = optim.min_lr
            else:
                _schedule_keys_of_this_run(v, optim)
    elif isinstance(opt_state, list):
        for v in opt_state:
            _schedule_keys_of_this_run(v, optim)


def load_training_state(t, d: Path, prepared: tuple[Path, bool, dict] | None = None) -> None:
    from megatron_longpo.training import resume

    it, verified, changes = prepared or prepare_resume(t.cfg, d)
    state = ckpt.load(training_state_dict(t, loading=True), d, it, verified=verified)
    ckpt.apply_model_state(t.chunks, state)
    if "optimizer" in state:
        _schedule_keys_of_this_run(state["optimizer"], t.cfg.optim)
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
