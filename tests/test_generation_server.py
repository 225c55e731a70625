"""The HTTP backend and the builders against a REAL OpenAI-compatible server on 127.0.0.1 serving
the embedded SmolLM2: `transformers serve` (transformers' `serving` extra, installed from wheels by
`make test`), and llama-cpp-python's server with the GGUF file where it is installed (an optional
backend; docs/generation.md says how to install it). Includes killing the server in the middle of a
run (restarted while the client retries; or left down until the run stops and then rerun): the
output ends complete, with no duplicate."""
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from megatron_longpo.generation.backends import OpenAIChatBackend, SamplingParams
from megatron_longpo.launch import free_port
from megatron_longpo.models.embedded import gguf_path

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
QA = ROOT / "examples" / "generation" / "qa.jsonl"
QA_IDS = {json.loads(l)["id"] for l in QA.read_text().splitlines() if l.strip()}


def _installed(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


def transformers_serve_cmd(port: int, model_dir: Path) -> list[str]:
    """`transformers serve` with the model preloaded, on the CPU, one thread (OMP_NUM_THREADS)."""
    return [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(model_dir),
            "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--log-level", "warning"]


def llama_cpp_cmd(port: int, model_dir: Path) -> list[str]:
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path()), "--host", "127.0.0.1",
            "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "False"]


SERVERS = {
    "transformers": (transformers_serve_cmd, ("fastapi", "uvicorn", "openai"),
                     "transformers' serving extra is missing: pip install 'transformers[serving]'"),
    "llama_cpp": (llama_cpp_cmd, ("llama_cpp", "uvicorn"),
                  "llama-cpp-python is not installed (optional): pip install 'llama-cpp-python[server]'"),
}


class Server:
    """An OpenAI-compatible server process on 127.0.0.1:port; start() waits until /v1/models answers
    (polling is the only readiness signal these servers give)."""

    def __init__(self, cmd: list[str], port: int, log: Path) -> None:
        self.cmd, self.port, self.log, self.proc = cmd, port, log, None
        self.url = f"http://127.0.0.1:{port}/v1"

    def start(self, timeout: float = 180.0) -> "Server":
        env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", HF_HUB_OFFLINE="1")
        self.proc = subprocess.Popen(self.cmd, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.url + "/models", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout} s: {self.log.read_text()[-2000:]}")

    def ensure(self) -> "Server":
        """Started, if it is not running."""
        return self if self.proc and self.proc.poll() is None else self.start()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module", params=list(SERVERS))
def running_server(request, smollm2_dir, tmp_path_factory):
    """One server of a kind for the whole module: the tests that kill it start it again on the same
    port (`ensure` starts it where an earlier test left it down)."""
    cmd, modules, why = SERVERS[request.param]
    if not _installed(*modules):
        pytest.skip(why)
    port = free_port()
    srv = Server(cmd(port, smollm2_dir), port, tmp_path_factory.mktemp("server") / "server.log")
    srv.kind = request.param
    try:
        yield srv.start()
    finally:
        srv.stop()


def test_chat_against_a_real_server(running_server):
    srv = running_server.ensure()
    be = OpenAIChatBackend(srv.url, concurrency=2, timeout=120, max_retries=2)
    convs = [[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
             [{"role": "user", "content": "Name a colour of the sky."}]]
    out = be.chat(convs, SamplingParams(max_new_tokens=24, temperature=0.0))
    assert "Paris" in out[0][0]
    assert be.model and be.model.endswith(".gguf" if srv.kind == "llama_cpp" else "SmolLM2-135M-Instruct")  # /v1/models
    sampled = be.chat(convs[:1], SamplingParams(max_new_tokens=16, temperature=1.0, n=3, seed=5))
    assert len(sampled[0]) == 3 and all(isinstance(s, str) and s for s in sampled[0])
    # requests / s on this machine: 8 short requests, 2 in flight (printed for docs/generation.md)
    be2 = OpenAIChatBackend(srv.url, concurrency=2, timeout=120)
    t0 = time.monotonic()
    be2.chat([[{"role": "user", "content": f"Write a word about the number {i}."}] for i in range(8)],
             SamplingParams(max_new_tokens=16, temperature=0.0))
    dt = time.monotonic() - t0
    assert be2.stats.failed == 0 and be2.stats.completion_tokens <= 8 * 16
    print(f"\n{srv.kind} server: 8 requests (<=16 new tokens) in {dt:.1f} s = {8 / dt:.2f} req/s, "
          f"{be2.stats.completion_tokens / dt:.1f} generated tok/s")


def run_tool(tool: str, args: list[str], **kw) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "tools" / tool), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def solopo_args(url: str, out: Path, tokenizer: Path, retries: int) -> list[str]:
    return [str(QA), "-o", str(out), "--backend", "openai", "--base-url", url, "--tokenizer", str(tokenizer),
            "--samples", "2", "--max-new-tokens", "10", "--target-long-tokens", "300", "--records-per-batch", "1",
            "--concurrency", "2", "--timeout", "60", "--max-retries", str(retries), "--max-consecutive-failures", "2",
            "--score-whole-response", "--no-progress"]


def settled_ids(out: Path) -> tuple[list[str], set[str]]:
    """(ids of the output lines, in order; ids in the ledger)."""
    written = [json.loads(l)["meta"]["id"] for l in out.read_text().splitlines() if l.strip()] if out.exists() else []
    ledger = out.with_name(out.name + ".done.jsonl")
    done = {json.loads(l)["id"] for l in ledger.read_text().splitlines() if l.strip()} if ledger.exists() else set()
    return written, done


def wait_settled(out: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while len(settled_ids(out)[1]) < n:
        assert proc.poll() is None, f"the tool ended early: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"fewer than {n} records settled in {timeout} s"
        time.sleep(0.2)


def assert_complete(out: Path) -> None:
    written, done = settled_ids(out)
    assert len(written) == len(set(written)), f"duplicate lines: {written}"
    assert done == QA_IDS and set(written) <= done  # every record settled, each once
    for line in out.read_text().splitlines():
        row = json.loads(line)
        assert set(row) == {"short_context", "long_context", "instruction", "chosen", "rejected", "meta"}


def test_server_killed_and_restarted_mid_run(running_server, smollm2_dir, tmp_path):
    srv = running_server.ensure()
    out = tmp_path / "solopo.jsonl"
    proc = run_tool("build_solopo_pairs.py", solopo_args(srv.url, out, smollm2_dir, retries=10))
    try:
        wait_settled(out, 3, proc)
        srv.kill()  # a crash in the middle of the run
        time.sleep(1.0)
        srv.start()  # the same port: the client's retries reach the new server
        log, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert_complete(out)
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["http"]["retries"] >= 1 and summary["http"]["failed"] == 0
    assert summary["counts"]["records_seen"] == 10


def test_server_down_then_rerun_resumes(running_server, smollm2_dir, tmp_path):
    srv = running_server.ensure()
    out = tmp_path / "solopo.jsonl"
    args = solopo_args(srv.url, out, smollm2_dir, retries=1)
    proc = run_tool("build_solopo_pairs.py", args)
    try:
        wait_settled(out, 3, proc)
        srv.kill()
        log, _ = proc.communicate(timeout=300)  # the run stops: two records in a row failed
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, log
    assert "rerun the same command" in log
    first_text = out.read_text()
    written, done = settled_ids(out)
    assert 3 <= len(done) < 10
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["failures"]["sample_request"] == 2 and summary["counts"]["records_failed"] == 2

    srv.start()
    rerun = run_tool("build_solopo_pairs.py", args)
    log2, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, log2
    assert out.read_text().startswith(first_text)  # the first run's lines are kept, not redone
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["records_already_done"] == len(done)
    assert_complete(out)


def test_longpo_through_a_server(running_server, smollm2_dir, tmp_path):
    """The LongPO tool over HTTP, with multi-turn rejected conversations (assistant turns)."""
    srv = running_server.ensure()
    doc = (ROOT / "megatron_longpo" / "resources" / "documents" / "sourdough.md").read_text()
    src = tmp_path / "docs.jsonl"
    src.write_text(json.dumps({"id": "sourdough", "text": doc}) + "\n")
    out = tmp_path / "longpo.jsonl"
    proc = run_tool("build_longpo_pairs.py", [
        str(src), "-o", str(out), "--backend", "openai", "--base-url", srv.url, "--tokenizer", str(smollm2_dir),
        "--chunk-tokens", "260", "--max-chunks", "2", "--questions-asked", "3", "--question-max-new-tokens", "80",
        "--max-new-tokens", "40", "--max-pair-tokens", "2000", "--concurrency", "2", "--timeout", "120",
        "--min-answer-words", "2", "--rejected-conditioning", "history", "--no-progress"])
    log, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, log
    written, done = settled_ids(out)
    assert done == {"sourdough"}
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["chunks_used"] == 2 and summary["http"]["failed"] == 0
    if written:  # the tiny model's answers may all be filtered; then the ledger says why
        row = json.loads(out.read_text())
        assert row["long_context"] == doc and 1 <= len(row["turns"]) <= 2
        for t in row["turns"]:
            assert t["short_context"] in doc and len(t["short_context"]) < len(doc)
    print("\n" + log)
