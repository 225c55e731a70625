"""Resuming a run whose configuration changed: each key's change is honoured, or refused with a
message naming the keys (docs/reliability.md has the table, docs/training.md the user's view).

  refuse    the saved state cannot mean the same thing under the new value (another base model,
            optimizer, dataset, sample order or loss); the fix is a new train.save_dir
  schedule  the learning-rate / weight-decay schedule is rebuilt for the new value from the saved
            step on (said in the log)
  reapply   the optimizer's saved hyperparameter is replaced by the new value after loading (logged)
  free      anything else: read from the new configuration, no state depends on it (logged)
"""

from __future__ import annotations

from pathlib import Path

REFUSE = {
    "model.checkpoint": "the run continues from the weights in train.save_dir, which were trained from the old base model",
    "model.rope_theta": "the run's architecture (saved with it) would change in the middle of the run",
    "model.max_position_embeddings": "the run's architecture (saved with it) would change in the middle of the run",
    "optim.name": "the saved optimizer state belongs to the other optimizer",
    "data.path": "the saved position in the data belongs to the other dataset",
    "data.seed": "the saved position indexes the sample order of the old seed",
    "data.global_batch_size": "the saved position counts steps of the old batch size",
    "loss.name": "the run would switch to another objective in the middle",
}
SCHEDULE = ("train.steps", "train.epochs", "optim.lr", "optim.min_lr", "optim.warmup_fraction", "optim.weight_decay")
REAPPLY = ("optim.adam_beta1", "optim.adam_beta2", "optim.adam_eps")


class ResumeConfigError(ValueError):
    """The configuration changed in a way the saved run cannot follow."""


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compare(saved: dict, now: dict, *, save_dir: str, same_dataset: bool | None = None,
            same_base_model: bool | None = None) -> dict[str, list[tuple[str, object, object]]]:
    """The changed keys of two configs (to_dict form) by kind: {"schedule": [(key, old, new)], ...}.
    Raises ResumeConfigError naming every refused key. `same_dataset` / `same_base_model`: identity
    checks that beat a path comparison (a moved dataset with the same hash is the same dataset)."""
    old, new = flatten(saved), flatten(now)
    by_kind: dict[str, list] = {"refuse": [], "schedule": [], "reapply": [], "free": []}
    for key in sorted(set(old) | set(new)):
        if key not in old or key not in new or old[key] == new[key]:
            continue  # keys added since the save take their (new) values
        a, b = old[key], new[key]
        if key == "data.path" and same_dataset is not None:
            if same_dataset:
                by_kind["free"].append((key, a, b))
                continue
        if key == "model.checkpoint" and same_base_model:
            by_kind["free"].append((key, a, b))
            continue
        kind = "refuse" if key in REFUSE else "schedule" if key in SCHEDULE else "reapply" if key in REAPPLY else "free"
        by_kind[kind].append((key, a, b))
    if by_kind["refuse"]:
        lines = "; ".join(f"{k} was {a!r}, now {b!r} ({REFUSE[k]})" for k, a, b in by_kind["refuse"])
        keys = " ".join(f"{k}={a}" for k, a, _ in by_kind["refuse"])
        raise ResumeConfigError(
            f"cannot resume {save_dir}: {lines}. Set them back ({keys}) to continue that run, or start a new run "
            f"with another train.save_dir (model.checkpoint={save_dir} starts it from this run's weights)"
        )
    return by_kind


def describe(changes: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"{k} {a} -> {b}" for k, a, b in changes)


def same_path(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def check_save_dir(save_dir: str, model_checkpoint: str) -> None:
    """Refuse a train.save_dir that cannot hold the run: a file, the base model's own directory
    (the run's checkpoints would be written over it), or a place that cannot be written."""
    import os

    d = Path(save_dir)
    if d.exists() and not d.is_dir():
        raise ResumeConfigError(f"train.save_dir {d} is a file, not a directory; choose another train.save_dir")
    if model_checkpoint and same_path(save_dir, model_checkpoint):
        raise ResumeConfigError(
            f"train.save_dir {d} is model.checkpoint: the run would write its checkpoints (and `latest`) into the base "
            f"model's directory; choose a new train.save_dir"
        )
    p = d
    while not p.exists():
        p = p.parent
    if not os.access(p, os.W_OK | os.X_OK):
        raise ResumeConfigError(f"train.save_dir {d} cannot be written ({p} is not writable); choose another train.save_dir")
