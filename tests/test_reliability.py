"""Faults, the whole class (docs/reliability.md): one exit-code convention for every entry point,
a run directory held by one trainer, damaged data named, and the resume table proven row by row.

Most tests call a tool's main() in this process; a real process is started only where the claim
needs one (the resume table runs every case in ONE trainer process; a file-size limit during a save)."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).parent / "workers"


def tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def one_error_line(err: str, match: str = "") -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines and "Traceback" not in err, err
    errs = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errs) == 1 and match in errs[0], err
    return errs[0]


# ---------------------------------------------------------------- one convention: every tool's argument errors


def _file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


#: (tool, argv, what the line must contain); every one must exit 2 with one `error:` line
ARGUMENT_ERRORS = [
    ("preprocess_pairs", ["--input", "{data}", "--kind", "pair", "--tokenizer", "{tok}", "--output", "{tmp}/o", "--workers", "0"],
     "--workers must be at least 1"),
    ("preprocess_pairs", ["--input", "{data}", "--kind", "pair", "--tokenizer", "{tok}", "--output", "{tmp}/o", "--chunk-size", "0"],
     "--chunk-size must be at least 1"),
    ("preprocess_pairs", ["--input", "{data}", "--kind", "pair", "--tokenizer", "{tok}", "--output", "{tmp}/o", "--max-length", "0"],
     "--max-length must be a positive number"),
    ("preprocess_pairs", ["--input", "{data}", "--kind", "pair", "--tokenizer", "{tok}", "--output", "{file}/pairs", "--workers", "1",
                          "--no-progress"], "{file}"),
    ("preprocess_pairs", ["--input", "{tmp}/missing.jsonl", "--kind", "pair", "--tokenizer", "{tok}", "--output", "{tmp}/o"],
     "missing.jsonl"),
    ("build_longpo_pairs", ["{tmp}/missing.jsonl", "--output", "{tmp}/o.jsonl", "--backend", "openai", "--base-url",
                            "http://127.0.0.1:9/v1", "--tokenizer", "{tok}"], "missing.jsonl"),
    ("build_solopo_pairs", ["{tmp}/missing.jsonl", "--output", "{tmp}/o.jsonl", "--backend", "openai", "--base-url",
                            "http://127.0.0.1:9/v1", "--tokenizer", "{tok}"], "missing.jsonl"),
    ("document_nll_data", ["{tmp}/missing.jsonl", "--out", "{tmp}/o"], "missing.jsonl"),
    ("eval_long", ["--model", "{tmp}/missing_model", "--samples", "0", "--out", "{tmp}/o.json"], "--samples"),
    ("make_long_documents", ["--n", "0", "--out", "{tmp}/o"], "--n must be >= 1"),
    ("pack_pairs", ["pack", "{tmp}/missing.jsonl", "--out", "{tmp}/o", "--docs-n", "1", "--docs-words", "100",
                    "--docs-seed", "0"], "missing.jsonl"),
    ("plan_longest", ["--hf-config", "{tmp}/missing.json"], "missing.json"),
    ("precompute_ref_logps", ["--data", "{tmp}/d", "--model", "{tmp}/m", "--chunk-size", "0"], "--chunk-size must be at least 1"),
    ("convert_checkpoint", ["hf-to-megatron", "--hf-dir", "{tmp}/missing_hf", "--out", "{tmp}/o"], "missing_hf"),
    ("convert_checkpoint", ["megatron-to-hf", "--megatron-dir", "{file}", "--out", "{tmp}/o"], "a_file"),
    ("convert_checkpoint", ["reshard", "--megatron-dir", "{tmp}/missing_ckpt", "--out", "{tmp}/o", "--tp", "2"], "missing_ckpt"),
    ("bench_checksums", ["--megatron-dir", "{tmp}/missing_ckpt"], "missing_ckpt"),
]


@pytest.mark.parametrize("name,argv,match", ARGUMENT_ERRORS, ids=[f"{c[0]}-{i}" for i, c in enumerate(ARGUMENT_ERRORS)])
def test_every_tool_argument_error_is_one_line_and_exit_2(name, argv, match, tmp_path, smollm2_dir, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    fill = {"tmp": str(tmp_path), "tok": str(smollm2_dir), "data": str(data), "file": str(_file(tmp_path))}
    argv = [a.format(**fill) for a in argv]
    try:
        rc = tool(name).main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, (rc, err)
    one_error_line(err, match.format(**fill))
    assert not list(tmp_path.glob("o*")), "something was written"


def test_os_errors_a_user_can_fix_are_one_line_naming_the_path():
    """A file-size limit inside megatron's checkpoint writer arrives as torch's CheckpointException
    (a BaseException) wrapping 'Worker failure: [Errno 27] File too large' (the probe: 43 lines)."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_longpo.errors import find_os_error, user_error_line

    try:
        raise RuntimeError("Worker failure: [Errno 27] File too large: '/runs/x/.iter_0000002.tmp/__0_0.distcp'")
    except RuntimeError as inner:
        wrapped = CheckpointException("save failed", {0: (inner, None)})
    line = user_error_line(wrapped)
    assert line.startswith("/runs/x/.iter_0000002.tmp/__0_0.distcp: a file grew beyond the file-size limit (`ulimit -f`)")
    assert "ulimit -f unlimited" in line
    for code, fix in ((errno.ENOSPC, "free space"), (errno.EACCES, "permissions"), (errno.EROFS, "writable"),
                      (errno.ENOTDIR, "a part of the path is a file")):
        e = OSError(code, os.strerror(code), "/some/path")
        assert find_os_error(e) is e and "/some/path" in user_error_line(e) and fix in user_error_line(e)
    assert user_error_line(RuntimeError("a bug")) is None and user_error_line(KeyError("x")) is None



def test_a_failed_write_without_errno_is_diagnosed(tmp_path):
    """torch's zip writer inside megatron's checkpoint writer loses the errno ("unexpected pos"):
    the limit and the free space tell a file-size limit and a full disk apart from a bug."""
    import errno
    import resource

    from megatron_longpo.errors import diagnose_write_failure, user_error_line

    free = shutil.disk_usage(tmp_path).free
    assert diagnose_write_failure(tmp_path / ".iter_0000001.tmp", 1 << 20) is None  # neither explains it: a bug
    e = diagnose_write_failure(tmp_path / ".iter_0000001.tmp", free + (1 << 30))
    assert e.errno == errno.ENOSPC and "may be deleted" in user_error_line(e)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, hard))
    try:
        e = diagnose_write_failure(tmp_path / ".iter_0000001.tmp", 2 << 30)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert e.errno == errno.EFBIG and "the file-size limit is 1,024.0 MiB, the checkpoint needs about 2,048.0 MiB" in str(e)


# ---------------------------------------------------------------- a run directory is held by one trainer

HOLDER = """
import sys, time
from megatron_longpo.training.run_lock import RunLock
RunLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


def _holder(run: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


def test_run_lock_refuses_a_second_trainer_and_takes_over_a_dead_ones(tmp_path, monkeypatch):
    from megatron_longpo.training.run_lock import LOCK_NAME, RunLock, RunLocked

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    run = tmp_path / "run"
    p = _holder(run)
    try:
        with pytest.raises(RunLocked, match=rf"is held by another trainer \(pid {p.pid} on host {re.escape(os.uname().nodename)}"):
            RunLock(run).acquire()
    finally:
        p.kill()
        p.wait()
    lock = RunLock(run).acquire()  # killed -9: its flock went with it, its pid is gone
    assert f"pid {p.pid}" in lock.note and json.loads((run / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK_NAME).exists()
    # a lock written on another node (that may still be running there): refused, with how to clear it
    (run / LOCK_NAME).write_text(json.dumps({"host": "node-7", "pid": 4242, "started": "then", "slurm_job_id": "100"}))
    with pytest.raises(RunLocked, match=rf"SLURM job 100.*if that trainer is gone \(its node died\), delete {re.escape(str(run / LOCK_NAME))}"):
        RunLock(run).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "100")  # the same job, requeued by SLURM on another node: taken over
    lock = RunLock(run).acquire()
    assert "the same SLURM job" in lock.note
    lock.release()


def test_trainer_refuses_a_run_directory_another_trainer_holds(tmp_path, monkeypatch, capsys):
    """The probe: a second trainer on the save_dir of a running one ran too, and both exited 0."""
    from megatron_longpo import train
    from megatron_longpo.launch import free_port

    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    ck = tmp_path / "ckpt"
    ck.mkdir()
    run = tmp_path / "run"
    p = _holder(run)
    try:
        rc = train.main([f"model.checkpoint={ck}", f"data.path={tmp_path}/d", f"train.save_dir={run}"])
    finally:
        p.kill()
        p.wait()
    assert rc == 2
    line = one_error_line(capsys.readouterr().err, f"train.save_dir {run} is held by another trainer (pid {p.pid}")
    assert "delete" in line and sorted(x.name for x in run.iterdir()) == ["trainer.lock"]


# ---------------------------------------------------------------- damaged or foreign data


def _copy_dataset(prefix: Path, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for p in prefix.parent.iterdir():
        if p.name.startswith(prefix.name + ".") and not p.name.endswith(".jsonl"):
            shutil.copy(p, out / p.name)
    return out / prefix.name


def test_token_ids_beyond_the_vocabulary_are_named(tiny_longpo_data, tmp_path):
    """The probe: 0xFF bytes in the middle of a .bin (same size) ended in `IndexError: index out of
    range in self` inside the embedding."""
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.schema import FormatError

    d = _copy_dataset(Path(tiny_longpo_data), tmp_path / "d")
    b = Path(f"{d}.bin")
    raw = bytearray(b.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 64] = b"\xff" * 64
    b.write_bytes(bytes(raw))
    ds = PairDataset(d)  # sizes agree with the manifest: opens
    ds.vocab_limit = 49152
    bad = []
    for i in range(len(ds)):
        try:
            ds.sample(i)
        except FormatError as e:
            bad.append((i, str(e)))
    assert len(bad) == 1, bad
    assert f"of the dataset {d} holds token id 65535, beyond the model's 49152 token embeddings" in bad[0][1]
    with pytest.raises(FormatError, match="do not match the hashes"):  # data.verify_hash=true: before training
        PairDataset(d, verify_hash=True)


def test_a_bin_shorter_than_its_idx_is_named(tiny_longpo_data, tmp_path):
    """A truncated .bin whose manifest was rewritten to match (so the size check alone passes)."""
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.schema import FormatError

    d = _copy_dataset(Path(tiny_longpo_data), tmp_path / "d")
    b = Path(f"{d}.bin")
    b.write_bytes(b.read_bytes()[:-100])
    m = json.loads(Path(f"{d}.json").read_text())
    m["files"]["bin_bytes"] -= 100
    Path(f"{d}.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match=rf"{re.escape(str(b))} is \d+ bytes but {re.escape(str(d))}.idx points to \d+: the .bin is truncated"):
        PairDataset(d)


def test_a_sidecar_whose_shape_disagrees_is_named(tiny_longpo_data, tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from megatron_longpo.data.reference import (
        RefLogpError,
        load_ref_logps,
        sidecar_path,
    )

    d = _copy_dataset(Path(tiny_longpo_data), tmp_path / "d")
    path = sidecar_path(d)
    with safe_open(path, framework="np") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    key = min(k for k in tensors if k.startswith("logp_sum/"))
    tensors[key] = tensors[key][:-3]
    save_file(tensors, path, metadata=meta)
    with pytest.raises(RefLogpError, match=rf"{re.escape(key)} has shape \(5,\), the dataset has 8 rows \(the sidecar is damaged\)"):
        load_ref_logps(d)
    raw = Path(path).read_bytes()  # a truncated sidecar (a copy cut short): named, with the fix
    Path(path).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(RefLogpError, match=rf"cannot read {re.escape(path)} .*recompute it with tools/precompute_ref_logps.py"):
        load_ref_logps(d)


# ---------------------------------------------------------------- the resume table, in one trainer process


def _cosine(step, total, lr, min_lr=0.0):
    import math

    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * step / total))


@pytest.mark.slow
def test_resume_table_row_by_row(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """docs/reliability.md's resume table: a 4-step run (lr 1e-4, weight decay 0.01) saved at step
    2, resumed with each key changed. The probe: optim.lr=1e-3 exited 2 with megatron's 'Could not
    find parameter group with key (None, 0.001, ...)'."""
    r = subprocess.run([sys.executable, WORKERS / "resume_table.py", tiny_llama_ckpt, tiny_longpo_data, tmp_path],
                       check=False, capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    res = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    assert r.returncode == 0 and res, r.stdout[-3000:] + r.stderr[-3000:]
    got = json.loads(res[0][7:])
    h, same = got["honoured"], got["honoured"]["same"]
    assert all(c["iteration"] == 2 for c in h.values())
    assert same["step_lr"] == pytest.approx(_cosine(2, 4, 1e-4))
    # optim.lr: the step runs at the new rate, and (Adam, same gradients and state) moves the weights 10x as far
    assert h["lr"]["step_lr"] == pytest.approx(_cosine(2, 4, 1e-3))
    assert h["lr"]["update_norm"] == pytest.approx(10 * same["update_norm"], rel=1e-3)
    # train.steps and optim.min_lr together: 5e-5 + (1e-4 - 5e-5) * 0.75 (either one ignored gives 7.5e-5)
    assert h["steps_min_lr"]["total_steps"] == 6
    assert h["steps_min_lr"]["step_lr"] == pytest.approx(_cosine(2, 6, 1e-4, 5e-5)) == pytest.approx(8.75e-5)
    assert h["warmup"]["step_lr"] == pytest.approx(1e-4)  # the end of a 2-step warm-up
    assert h["epochs"]["total_steps"] == 8 and h["epochs"]["step_lr"] == pytest.approx(_cosine(2, 8, 1e-4))
    # weight decay and the Adam hyperparameters are in the optimizer's groups, and the update changed
    assert h["adam"]["weight_decay"] == [0.0, 0.2] and same["weight_decay"] == [0.0, 0.01]
    assert h["adam"]["betas"] == [[0.5, 0.9]] and same["betas"] == [[0.9, 0.95]]
    assert h["adam"]["eps"] == [1e-3] and same["eps"] == [1e-8]
    assert h["adam"]["update_norm"] < 0.5 * same["update_norm"]  # eps 1e-3 damps Adam's step
    assert h["beta"]["loss"] != same["loss"]  # loss.beta: the new objective's value
    assert h["microbatch"]["loss"] == pytest.approx(same["loss"], rel=1e-5)  # 2 micro-batches of 1 -> 1 of 2
    assert h["moved_data"] == same  # data.path: the same dataset (hash) under another prefix
    for key, msg in got["refused"].items():
        assert msg is not None and f"{key} was " in msg and "Set them back" in msg, (key, msg)
    assert sorted(got["refused"]) == sorted(["model.checkpoint", "model.rope_theta", "model.max_position_embeddings",
                                             "optim.name", "data.seed", "data.global_batch_size", "loss.name"])
    dmg = got["damaged_data"]
    assert dmg["trained_steps"] < 4 and "holds token id 65535, beyond the model's 49152 token embeddings" in dmg["error"]
    # kill -9 during a save left .iter_0000003.tmp: the resume used `latest` (step 2), the next save replaced it
    assert got["killed_save"] == {"latest": "iter_0000003", "tmp_left": False, "verified": True}
    nan = got["nonfinite"]
    assert nan and "2 non-finite losses/gradients in a row (step 2); stopping" in nan["error"], nan
    assert not nan["saved"] and not nan["lock_left"]  # nothing saved from the diverged state; the lock released


# ---------------------------------------------------------------- a save that the disk cannot take


@pytest.mark.slow
def test_a_save_under_a_file_size_limit_is_one_line(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """The probe: under `ulimit -f` the save failed with a 43-line traceback starting 'Worker
    failure'. Now: one line naming the file and the limit, exit 2; `latest` is not moved."""
    import resource

    run = tmp_path / "run"
    args = [sys.executable, "-m", "megatron_longpo.train", f"model.checkpoint={tiny_llama_ckpt}",
            f"data.path={tiny_longpo_data}", f"train.save_dir={run}", "train.steps=1", "train.tensorboard=false",
            "data.global_batch_size=2", "optim.name=sgd", "loss.name=longpo", "train.stall_seconds=0"]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        # files, not pipes: a process the trainer left behind would hold a pipe open (checked below)
        p = subprocess.Popen(args, stdout=out, stderr=err, cwd=ROOT, preexec_fn=limit, start_new_session=True,  # noqa: PLW1509 - nothing threaded runs before exec
                             env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        try:
            rc = p.wait(timeout=300)
            for _ in range(30):  # what it started (megatron's writer Manager, the resource tracker) ends too
                left = subprocess.run(["pgrep", "-s", str(p.pid)], check=False, capture_output=True, text=True).stdout.split()
                if not left:
                    break
                time.sleep(0.5)
        finally:
            try:
                os.killpg(p.pid, 9)
            except ProcessLookupError:
                pass
    stderr = (tmp_path / "err.txt").read_text()
    assert rc == 2, (tmp_path / "out.txt").read_text()[-2000:] + stderr[-3000:]
    line = one_error_line(stderr, "a file grew beyond the file-size limit (`ulimit -f`)")
    assert f"{run}/.iter_0000001.tmp" in line and "the file-size limit is 4.0 MiB" in line, line
    assert not (run / "latest").exists() and not left, left


def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A full disk in the middle of `megatron-to-hf` (ENOSPC from a write): one line naming the path,
    exit 2, and no half-written output or temporary sibling left (was a traceback, exit 1)."""
    import errno

    from test_export import cli_main, synthetic

    from megatron_longpo.checkpoint import export

    d, _, _ = synthetic(tmp_path)

    def full(tmp, *a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / "model.safetensors"))

    monkeypatch.setattr(export, "mark_output", full)
    rc, _, err = cli_main(capsys, "megatron-to-hf", "--megatron-dir", d, "--out", tmp_path / "hf")
    assert rc == 2
    line = one_error_line(err, "model.safetensors: no space left on the device")
    assert "free space there or choose another place" in line
    assert not (tmp_path / "hf").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
