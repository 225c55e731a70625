"""A run that can be watched: TRL-named scalars in TensorBoard and in an offline W&B run, step
lines with a timestamp and consumed samples, the effective config as YAML, an evaluation split
scored during training (the same numbers at DP=2 as at DP=1, gloo), on a weighted blend of two
datasets. Two torchrun launches in all (DP=1 and DP=2), every check reads their outputs."""
import glob
import json
import re
import shutil
import struct

import pytest
from mp import torchrun

pytestmark = pytest.mark.slow

TRL_TRAIN = {"train/loss", "train/learning_rate", "train/grad_norm", "train/epoch", "train/rewards/chosen",
             "train/rewards/rejected", "train/rewards/margins", "train/rewards/accuracies", "train/logps/chosen",
             "train/logps/rejected", "train/nll_loss", "train/consumed_samples"}
TRL_EVAL = {"eval/loss", "eval/rewards/margins", "eval/rewards/accuracies", "eval/rewards/chosen", "eval/nll_loss",
            "eval/logps/chosen"}


def _copy_prefix(src, dst):
    for f in glob.glob(f"{src}.*"):
        shutil.copy(f, str(dst) + f[len(str(src)):])
    return dst


def _run(nproc, ckpt, a, b, save_dir):
    args = {
        "model.checkpoint": ckpt, "data.path": f"0.25 {a} 0.75 {b}", "data.eval_path": a, "train.eval_interval": 2,
        "train.save_dir": save_dir, "train.tensorboard": "true", "train.wandb_project": "watch-test",
        "data.global_batch_size": 4, "data.samples_per_microbatch": 1, "train.steps": 3, "optim.name": "sgd",
        "optim.lr": 0.5, "optim.warmup_fraction": 0, "loss.name": "longpo", "loss.longpo_lambda": 1.0, "loss.beta": 0.5,
    }
    out = torchrun(nproc, "train.py", *[f"{k}={v}" for k, v in args.items()], timeout=300,
                   extra_env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    return out, json.loads((save_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_llama_ckpt, tiny_longpo_data, module_tmp):
    a = tiny_longpo_data
    b = _copy_prefix(a, module_tmp / "copy")  # the blend's second dataset (same samples, another prefix)
    return {n: (*_run(n, tiny_llama_ckpt, a, b, module_tmp / f"dp{n}"), module_tmp / f"dp{n}") for n in (1, 2)}


def _wandb_history(run_dir):
    """The scalars of an offline W&B run, read back from its run-*.wandb file (W&B's LevelDB-style
    log of protobuf records: 7-byte header, 32 KiB blocks, records of crc32/length/type + data)."""
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(str(run_dir / "wandb" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    with open(files[0], "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B"
    pos, block, recs, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, typ = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and typ == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if typ == 1:
            recs.append(chunk)
        elif typ == 2:
            buf = chunk
        elif typ == 3:
            buf += chunk
        elif typ == 4:
            recs.append(buf + chunk)
    rows = []
    for r in recs:
        rec = pb.Record()
        rec.ParseFromString(r)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def test_wandb_offline_run_holds_trl_named_scalars(runs):
    _, summary, d = runs[1]
    rows = _wandb_history(d)
    keys = set().union(*rows)
    assert TRL_TRAIN <= keys, TRL_TRAIN - keys
    assert TRL_EVAL <= keys, TRL_EVAL - keys
    by_step = {}
    for r in rows:
        by_step.setdefault(r["_step"], {}).update(r)
    for st in summary["steps"]:  # the logged values are the run's
        assert by_step[st["step"]]["train/rewards/margins"] == pytest.approx(st["rewards/margins"], rel=1e-6)
        assert by_step[st["step"]]["train/learning_rate"] == pytest.approx(st["lr"], rel=1e-9)
    assert by_step[2]["eval/loss"] == pytest.approx(summary["evals"][0]["loss"], rel=1e-6)


def test_tensorboard_has_trl_names(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, summary, d = runs[1]
    acc = EventAccumulator(str(d / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert TRL_TRAIN | TRL_EVAL <= tags, (TRL_TRAIN | TRL_EVAL) - tags
    acc_vals = [e.value for e in acc.Scalars("train/rewards/accuracies")]
    assert acc_vals == pytest.approx([s["rewards/accuracies"] for s in summary["steps"]])
    assert [e.step for e in acc.Scalars("eval/loss")] == [2, 3]  # every 2 steps, and at the end


def test_step_lines_config_yaml_and_consumed_samples(runs):
    from megatron_longpo.config import load_config

    out, summary, d = runs[1]
    lines = [ln for ln in out.splitlines() if re.search(r" step \d+/3 \|", ln)]
    assert len(lines) == 3, out[-3000:]
    for k, ln in enumerate(lines, start=1):
        assert re.match(rf"^\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d step {k}/3 \| samples {4 * k} \| loss ", ln), ln
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d eval at step 2 \| samples 8 \| loss ", out, re.MULTILINE), out[-3000:]
    assert [s["consumed_samples"] for s in summary["steps"]] == [4, 8, 12]
    cfg = load_config(str(d / "config.yaml"))
    assert cfg.data.path.split()[0] == "0.25" and cfg.train.eval_interval == 2 and cfg.optim.lr == 0.5
    assert cfg.train.stall_seconds == 1800.0  # defaults are written out too


def test_eval_metrics_at_dp2_equal_dp1(runs):
    _, s1, _ = runs[1]
    _, s2, _ = runs[2]
    assert [e["step"] for e in s1["evals"]] == [e["step"] for e in s2["evals"]] == [2, 3]
    for e1, e2 in zip(s1["evals"], s2["evals"]):
        assert e1["samples"] == e2["samples"] == 8
        for k in ("loss", "rewards/margins", "rewards/accuracies", "nll_loss", "logps/chosen"):
            assert e2[k] == pytest.approx(e1[k], rel=1e-5, abs=1e-7), (k, e1[k], e2[k])
    assert s2["first_loss"] == pytest.approx(s1["first_loss"], rel=1e-5)


def test_wandb_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """No API key and not offline: a ValueError (the trainer's exit 2) naming both fixes."""
    from megatron_longpo.training.metrics import Writers

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "cfg"))
    with pytest.raises(ValueError, match=r"train.wandb_project=p but W&B did not start \(.*\); run `wandb login`, "
                                         r"or set WANDB_MODE=offline"):
        Writers(None, "p", str(tmp_path / "w"))
