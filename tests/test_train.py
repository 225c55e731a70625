"""The training engine on the CPU (gloo): one step is the same at TP=2, PP=2, DP=2 as on one
process; stop-and-resume equals an uninterrupted run; SIGTERM saves a loadable checkpoint; a bad
layout fails before any work; two torchrun 'nodes' train like one node with two ranks."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fixtures import ROOT, read_model_tensors
from megatron_longpo.launch import free_port
from mp import WORKERS, torchrun

pytestmark = pytest.mark.slow


def overrides(ckpt, data, save_dir, **kw):
    base = {
        "model.checkpoint": ckpt, "data.path": data, "train.save_dir": save_dir, "train.tensorboard": "false",
        "data.global_batch_size": 4, "data.samples_per_microbatch": 1, "train.steps": 1, "optim.name": "sgd",
        "optim.lr": 0.5, "optim.warmup_fraction": 0, "loss.name": "longpo", "loss.longpo_lambda": 1.0, "loss.beta": 0.5,
    }
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def train(nproc, ckpt, data, save_dir, timeout=300, **kw):
    torchrun(nproc, "train.py", *overrides(ckpt, data, save_dir, **kw), timeout=timeout)
    return json.loads((save_dir / "summary.json").read_text())


def train_many(nproc, runs: dict, tmp, timeout=600) -> dict:
    """{name: (ckpt, data, save_dir, overrides)} trained one after another in ONE torchrun launch of
    `nproc` ranks (tests/workers/train_many.py); {name: summary, or the error text}."""
    spec = tmp / "runs.json"
    spec.write_text(json.dumps([overrides(c, d, s, **kw) for c, d, s, kw in runs.values()]))
    torchrun(nproc, "train_many.py", spec, timeout=timeout)
    out = {}
    for name, (_, _, save, _) in runs.items():
        err = save / "error.txt"
        out[name] = err.read_text() if err.exists() else json.loads((save / "summary.json").read_text())
    return out


@pytest.fixture(scope="module")
def one_process_step(tiny_llama_ckpt, tiny_longpo_data, module_tmp):
    d = module_tmp
    s = train(1, tiny_llama_ckpt, tiny_longpo_data, d)
    return s, read_model_tensors(d / "iter_0000001"), d


LAYOUTS = ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2", "dp=2", "data.share_prefix=true",
           "data.share_prefix=true parallel.context_parallel=2", "data.share_prefix=true parallel.tensor_parallel=2",
           "data.share_prefix=true parallel.pipeline_parallel=2"]
BAD_LAYOUTS = {"pp3": {"parallel.pipeline_parallel": 3},
               "vpp_without_pp": {"parallel.tensor_parallel": 2, "parallel.virtual_pipeline_parallel": 2}}


@pytest.fixture(scope="module")
def two_rank_runs(tiny_llama_ckpt, tiny_longpo_data, module_tmp):
    """One step at every 2-rank layout, and the bad layouts, in one 2-rank process group:
    {name: (summary or error text, save dir)}."""
    runs = {name: (tiny_llama_ckpt, tiny_longpo_data, module_tmp / f"two_{i}",
                   {} if name == "dp=2" else dict(x.split("=") for x in name.split()))
            for i, name in enumerate(LAYOUTS)}
    runs.update({name: (tiny_llama_ckpt, tiny_longpo_data, module_tmp / name, kw) for name, kw in BAD_LAYOUTS.items()})
    out = train_many(2, runs, module_tmp)
    return {name: (out[name], runs[name][2]) for name in runs}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_step_same_loss_and_weights_as_one_process(layout, one_process_step, two_rank_runs, tiny_llama_ckpt):
    ref_summary, ref_weights, _ = one_process_step
    s, save = two_rank_runs[layout]
    assert isinstance(s, dict), s
    assert abs(s["first_loss"] - ref_summary["first_loss"]) <= 1e-5 * abs(ref_summary["first_loss"]), (s["first_loss"], ref_summary["first_loss"])
    w = read_model_tensors(save / "iter_0000001")
    before = read_model_tensors(tiny_llama_ckpt / "iter_0000000")
    assert w.keys() == ref_weights.keys()
    diff2 = ref2 = 0.0
    for k in w:
        assert not torch.equal(ref_weights[k], before[k]) or "norm" in k, f"{k} did not change: the step did nothing"
        if "share_prefix" in layout:  # another summation order: compare the updates, norm-wise
            upd, ref_upd = w[k] - before[k], ref_weights[k] - before[k]
            diff2 += (upd - ref_upd).double().pow(2).sum().item()
            ref2 += ref_upd.double().pow(2).sum().item()
            rel = ((upd - ref_upd).norm() / ref_upd.norm().clamp_min(1e-30)).item()
            assert rel <= 1e-4, f"{layout}: {k} update differs by {rel:.2e} (relative)"
        else:
            assert torch.allclose(w[k], ref_weights[k], atol=2e-6, rtol=1e-5), f"{layout}: {k} differs by {(w[k] - ref_weights[k]).abs().max()}"
    assert (diff2 / max(ref2, 1e-300)) ** 0.5 <= 1e-5, f"{layout}: the whole update differs by {(diff2 / ref2) ** 0.5:.2e}"


def test_stop_and_resume_equals_uninterrupted(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """The uninterrupted run and the first part in one process; the resume in a fresh one, as a
    requeued job would (nothing carried over in memory)."""
    kw = dict(**{"train.steps": 6, "data.global_batch_size": 2, "optim.name": "adam", "optim.lr": 1e-3,
                 "optim.warmup_fraction": 0.34, "train.save_interval": 2, "data.seed": 7})
    first = train_many(1, {"full": (tiny_llama_ckpt, tiny_longpo_data, tmp_path / "full", kw),
                           "part1": (tiny_llama_ckpt, tiny_longpo_data, tmp_path / "split", {**kw, "train.exit_after": 3})},
                       tmp_path)
    full, part1 = first["full"], first["part1"]
    part2 = train(1, tiny_llama_ckpt, tiny_longpo_data, tmp_path / "split", **kw)
    assert part1["iteration"] == 3 and part2["iteration"] == 6 and part2["steps_run"] == 3
    assert part1["losses"] + part2["losses"] == full["losses"], (part1["losses"], part2["losses"], full["losses"])
    a, b = read_model_tensors(tmp_path / "full/iter_0000006"), read_model_tensors(tmp_path / "split/iter_0000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (tmp_path / "split").glob("iter_*")) == ["iter_0000004", "iter_0000006"]  # keep_last=2


def test_sigterm_saves_a_loadable_checkpoint(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", f"--master-port={free_port()}",
           str(WORKERS / "train.py"), *overrides(tiny_llama_ckpt, tiny_longpo_data, save, **{"train.steps": 1000, "data.global_batch_size": 2})]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = []
    deadline = time.time() + 240
    try:
        for line in p.stdout:
            lines.append(line)
            if " step 2/1000 " in line or time.time() > deadline:  # lines start with a UTC timestamp
                break
        # what a scheduler's preemption does to the training processes (torchrun itself turns a
        # SIGTERM of its own into a non-zero exit, so the workers get it here)
        import psutil

        for child in psutil.Process(p.pid).children(recursive=True):
            child.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    text = "".join(lines) + out
    assert p.returncode == 0, text[-3000:]
    assert "SIGTERM received" in text
    it = (save / "latest").read_text().strip()
    assert 2 <= int(it.split("_")[1]) < 1000
    # loadable: resuming continues from there
    s = train(1, tiny_llama_ckpt, tiny_longpo_data, save, **{"train.steps": int(it.split("_")[1]) + 1, "data.global_batch_size": 2})
    assert s["steps_run"] == 1


def test_bad_layout_fails_before_any_work(two_rank_runs, tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    # in the shared 2-rank process group: the refusal, and nothing written
    err, save = two_rank_runs["pp3"]
    assert "world size 2 is not divisible by TP*PP*CP = 1*3*1 = 3" in err
    assert not (save / "latest").exists()
    err, save = two_rank_runs["vpp_without_pp"]
    assert "virtual_pipeline_parallel needs pipeline_parallel > 1" in err or "not divisible by PP*VPP" in err
    assert not (save / "latest").exists()
    # and as a user meets it: a torchrun launch that exits non-zero with the same line
    with pytest.raises(AssertionError) as e:
        torchrun(2, "train.py", *overrides(tiny_llama_ckpt, tiny_longpo_data, tmp_path, **{"parallel.pipeline_parallel": 3}), timeout=120)
    assert "world size 2 is not divisible by TP*PP*CP = 1*3*1 = 3" in str(e.value)
    assert not (tmp_path / "latest").exists()


def test_two_node_rendezvous_equals_one_node(two_rank_runs, tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """Two torchrun launchers (one rank each) joined by a c10d rendezvous = one launcher with two ranks."""
    port = free_port()
    save = tmp_path / "2nodes"
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=longpo-test", str(WORKERS / "train.py"),
               *overrides(tiny_llama_ckpt, tiny_longpo_data, save)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                      env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=300)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    one_node, one_node_dir = two_rank_runs["dp=2"]  # one launcher, two ranks, the same overrides
    two = json.loads((save / "summary.json").read_text())
    assert two["first_loss"] == one_node["first_loss"]
    a, b = read_model_tensors(save / "iter_0000001"), read_model_tensors(one_node_dir / "iter_0000001")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_step_at_tp2_pp2_exports_the_same_hf_weights_as_tp1(one_process_step, tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """One training step at TP=2 x PP=2 (4 gloo ranks, optimizer state in the checkpoint) exports
    to the same Hugging Face weights as the same step on one process."""
    from safetensors.torch import load_file

    from fixtures import run_tool

    _, _, tp1_dir = one_process_step
    train(4, tiny_llama_ckpt, tiny_longpo_data, tmp_path / "tp2pp2", timeout=420,
          **{"parallel.tensor_parallel": 2, "parallel.pipeline_parallel": 2})
    out = {}
    for name, d in (("tp1", tp1_dir), ("tp2pp2", tmp_path / "tp2pp2")):
        run_tool(ROOT / "tools/convert_checkpoint.py", "megatron-to-hf", "--megatron-dir", d, "--out", tmp_path / f"hf-{name}")
        out[name] = {}
        for f in sorted((tmp_path / f"hf-{name}").glob("*.safetensors")):
            out[name].update(load_file(str(f)))
    assert out["tp1"].keys() == out["tp2pp2"].keys() and len(out["tp1"]) > 0
    for k in out["tp1"]:
        assert torch.allclose(out["tp1"][k], out["tp2pp2"][k], atol=2e-6, rtol=1e-5), k


def test_a_stalled_step_prints_every_threads_stack(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """train.stall_seconds: a step that takes longer dumps the stacks. The stall is a sleep (the
    watchdog reads other threads' frames without the GIL: a 0.2 s limit that fired during busy
    Python code once crashed the worker in faulthandler); the save after it is watched anew."""
    out = torchrun(1, "train.py", *overrides(tiny_llama_ckpt, tiny_longpo_data, tmp_path, **{"train.stall_seconds": 5,
                   "data.global_batch_size": 2}), timeout=300, extra_env={"TEST_SLOW_STEP": "7"})
    assert out.count("Timeout (0:00:05)!") >= 1, out[-3000:]
    assert "Thread 0x" in out and "in stalled_step" in out and "done: 1 steps" in out
