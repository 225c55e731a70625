"""Worker: every row of the resume table (docs/reliability.md) in ONE process (a world of one, no
torchrun): a 4-step run saved at step 2, then for each key a copy of its directory resumed with the
key changed. Prints one JSON line: per case what was in use after the resume and after one step,
or the refusal's message.

    python resume_table.py CKPT DATA TMPDIR
"""
import json
import shutil
import sys
from pathlib import Path

BASE = ["train.tensorboard=false", "data.global_batch_size=2", "data.samples_per_microbatch=1", "optim.name=adam",
        "optim.lr=1e-4", "optim.warmup_fraction=0", "optim.weight_decay=0.01", "loss.name=longpo",
        "loss.longpo_lambda=1.0", "loss.beta=0.5", "train.steps=4", "train.stall_seconds=0"]

HONOURED = {
    "same": [],
    "lr": ["optim.lr=1e-3"],
    # min_lr alone (at 2/4) and steps alone (at 2/6) would both give 7.5e-5: together 8.75e-5 needs both
    "steps_min_lr": ["train.steps=6", "optim.min_lr=5e-5"],
    "warmup": ["optim.warmup_fraction=0.5"],
    "epochs": ["train.steps=null", "train.epochs=2"],
    "adam": ["optim.weight_decay=0.2", "optim.adam_beta1=0.5", "optim.adam_beta2=0.9", "optim.adam_eps=1e-3"],
    "beta": ["loss.beta=0.05"],
    "microbatch": ["data.samples_per_microbatch=2"],
    "moved_data": [],  # data.path: the same dataset (hash) under another prefix
}


def refused_cases(ckpt: str, tmp: Path) -> dict:
    other_base = tmp / "same_model_elsewhere"
    shutil.copytree(ckpt, other_base)
    return {
        "model.checkpoint": [f"model.checkpoint={other_base}"],
        "model.rope_theta": ["model.rope_theta=20000"],
        "model.max_position_embeddings": ["model.max_position_embeddings=100000"],
        "optim.name": ["optim.name=sgd"],
        "data.seed": ["data.seed=9"],
        "data.global_batch_size": ["data.global_batch_size=4"],
        "loss.name": ["loss.name=dpo"],
    }


def params(t) -> list:
    from megatron_longpo.models.build import unwrap

    return [p.detach().clone() for c in t.chunks for p in unwrap(c).parameters()]


def main(ckpt: str, data: str, tmp: str) -> None:
    import torch

    from megatron_longpo.config import load_config
    from megatron_longpo.training.engine import build_trainer
    from megatron_longpo.training.loop import train, train_step
    from megatron_longpo.training.resume import ResumeConfigError

    tmp = Path(tmp)
    base = tmp / "base"
    common = BASE + [f"model.checkpoint={ckpt}"]
    train(load_config(None, common + [f"data.path={data}", f"train.save_dir={base}", "train.exit_after=2"]))
    moved = tmp / "moved" / "data"
    moved.parent.mkdir()
    for p in Path(data).parent.iterdir():
        if p.name.startswith(Path(data).name + "."):
            shutil.copy(p, moved.parent / (moved.name + p.name[len(Path(data).name):]))
    out = {"honoured": {}, "refused": {}}
    for name, over in HONOURED.items():
        d = tmp / name
        shutil.copytree(base, d)
        if name == "same":  # what kill -9 in the middle of the save of step 3 leaves behind
            (d / ".iter_0000003.tmp").mkdir()
            (d / ".iter_0000003.tmp" / "__0_0.distcp").write_bytes(b"half a file")
        path = moved if name == "moved_data" else data
        t = build_trainer(load_config(None, common + [f"data.path={path}", f"train.save_dir={d}", *over]))
        groups = t.optimizer.param_groups
        before = params(t)
        rec = train_step(t)
        after = params(t)
        out["honoured"][name] = {
            "iteration": t.iteration - 1, "total_steps": t.total_steps, "step_lr": rec.lr, "loss": rec.metrics["loss"],
            "lr": sorted({g["lr"] for g in groups}), "weight_decay": sorted({g["weight_decay"] for g in groups}),
            "betas": sorted({tuple(g["betas"]) for g in groups}), "eps": sorted({g["eps"] for g in groups}),
            "update_norm": float(torch.sqrt(sum(((a - b).double() ** 2).sum() for a, b in zip(after, before)))),
        }
        if name == "same":  # the next save replaces the leftover and is intact
            from megatron_longpo.checkpoint import dist as ckpt_dist
            from megatron_longpo.training.train_state import save_training_state

            save_training_state(t)
            out["killed_save"] = {"latest": (d / "latest").read_text().strip(), "tmp_left": (d / ".iter_0000003.tmp").exists(),
                                  "verified": ckpt_dist.verify_checksums(d / "iter_0000003")}
    for key, over in refused_cases(ckpt, tmp).items():
        d = tmp / ("refused_" + key)
        shutil.copytree(base, d)
        try:
            build_trainer(load_config(None, common + [f"data.path={data}", f"train.save_dir={d}", *over]))
            out["refused"][key] = None
        except ResumeConfigError as e:
            out["refused"][key] = str(e)
    # a .bin whose middle holds 0xFF bytes (ids beyond the vocabulary, same size): named by the trainer
    damaged = tmp / "damaged" / "data"
    damaged.parent.mkdir()
    for p in moved.parent.iterdir():
        shutil.copy(p, damaged.parent / p.name)
    b = Path(f"{damaged}.bin")
    raw = bytearray(b.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    b.write_bytes(bytes(raw))
    t = build_trainer(load_config(None, common + [f"data.path={damaged}", f"train.save_dir={tmp / 'damaged_run'}"]))
    out["damaged_data"] = {"trained_steps": 0, "error": None}
    try:
        while t.iteration < t.total_steps:
            train_step(t)
            out["damaged_data"]["trained_steps"] += 1
    except ValueError as e:
        out["damaged_data"]["error"] = str(e)
    # non-finite losses in a row: the trainer stops itself (train.py maps TrainingStopped to exit 3), saving nothing
    from megatron_longpo.training import loop
    from megatron_longpo.training.engine import TrainingStopped

    real = loop.forward_backward
    loop.forward_backward = lambda t, batches: {**real(t, batches), "loss": float("nan")}
    nan_run = tmp / "nan_run"
    try:
        train(load_config(None, common + [f"data.path={data}", f"train.save_dir={nan_run}", "train.max_nonfinite_in_a_row=2"]))
        out["nonfinite"] = None
    except TrainingStopped as e:
        out["nonfinite"] = {"error": str(e), "saved": (nan_run / "latest").exists(), "lock_left": (nan_run / "trainer.lock").exists()}
    finally:
        loop.forward_backward = real
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(*sys.argv[1:4])
    sys.stdout.flush()
