"""A preprocessing run interrupted midway and restarted with the same arguments resumes from its
finished shards and writes byte-identical files to an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_longpo.data import preprocess, preprocess_worker
from megatron_longpo.data.preprocess import EXIT_OK, PreprocessConfig, run_preprocess
from megatron_longpo.data.tokenizer import TokenizerSpec

REPO = Path(__file__).resolve().parents[1]


def _rows(n):
    return [
        {"prompt": f"Item {i}: name a colour that starts with the letter {chr(65 + i % 26)}.",
         "chosen": f"Answer {i}: a fitting colour.", "rejected": f"I do not know ({i}).",
         **({"system": "Answer in one line."} if i % 4 == 0 else {})}
        for i in range(n)
    ]


def _outputs(prefix):
    manifest = json.loads(Path(f"{prefix}.json").read_text())
    del manifest["files"]["bin"], manifest["files"]["idx"]  # only the file names may differ
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes(), manifest


def test_interrupted_run_resumes_identically(tmp_path, smollm2_dir, monkeypatch):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(20)))

    def cfg(name):
        return PreprocessConfig([str(src)], "pair", str(tmp_path / name), TokenizerSpec(hf_dir=str(smollm2_dir)),
                                chunk_size=3, progress=False)

    straight = run_preprocess(cfg("straight"))
    assert straight.exit_code == EXIT_OK and straight.chunks == 7

    real_write = preprocess._write_shard
    calls = {"n": 0}

    def dying_write(*args, **kwargs):
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if Ctrl-C arrived while the 4th shard was written
        calls["n"] += 1
        return real_write(*args, **kwargs)

    monkeypatch.setattr(preprocess, "_write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        run_preprocess(cfg("resumed"))
    work = tmp_path / "resumed.work"
    assert len(list(work.glob("shard-*.json"))) == 3 and not (tmp_path / "resumed.json").exists()

    monkeypatch.setattr(preprocess, "_write_shard", real_write)
    res = run_preprocess(cfg("resumed"))
    assert res.exit_code == EXIT_OK and res.chunks_resumed == 3 and res.chunks == 7
    assert _outputs(tmp_path / "resumed") == _outputs(tmp_path / "straight")
    assert not work.exists()


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_identical_bytes(tmp_path, smollm2_dir):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _rows(24)))
    args = [sys.executable, str(REPO / "tools" / "preprocess_pairs.py"), "--input", str(src), "--kind", "pair",
            "--tokenizer", str(smollm2_dir), "--output", str(tmp_path / "killed"), "--workers", "2",
            "--chunk-size", "2", "--no-progress"]
    work = tmp_path / "killed.work"
    with open(tmp_path / "log1.txt", "w") as log:
        # a new session: the worker pool is in our process group, and killpg reaches all of it
        proc = subprocess.Popen(args + ["--debug-chunk-delay", "0.5"], stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 110
        try:
            while len(list(work.glob("shard-*.json"))) < 3:
                assert proc.poll() is None, (tmp_path / "log1.txt").read_text()
                assert time.monotonic() < deadline, "the run never got going"
                time.sleep(0.05)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(list(work.glob("shard-*.json")))
    assert 3 <= done < 12 and not (tmp_path / "killed.json").exists()

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=110)
    assert rerun.returncode == EXIT_OK, rerun.stderr
    assert "were already done" in rerun.stderr

    straight = run_preprocess(PreprocessConfig([str(src)], "pair", str(tmp_path / "straight"),
                                               TokenizerSpec(hf_dir=str(smollm2_dir)), chunk_size=2, progress=False))
    assert straight.exit_code == EXIT_OK
    assert _outputs(tmp_path / "killed") == _outputs(tmp_path / "straight")


def _signal_dispositions():
    return signal.getsignal(signal.SIGTERM) == signal.SIG_DFL, signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def _raise(signum, frame):
    raise KeyboardInterrupt


def test_workers_do_not_inherit_the_cli_sigterm_handler():
    """The CLI turns SIGTERM into KeyboardInterrupt; a forked worker that kept that Python handler
    could miss pool.terminate()'s SIGTERM (it arrives between bytecodes, just before the worker
    blocks on the task queue) and hang the run at its end. Workers take the kernel's default."""
    import multiprocessing as mp

    if "fork" not in mp.get_all_start_methods():
        pytest.skip("fork start method only")
    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        with mp.get_context("fork").Pool(1, initializer=preprocess_worker.worker_init) as pool:
            assert pool.apply(_signal_dispositions) == (True, True)
    finally:
        signal.signal(signal.SIGTERM, previous)
