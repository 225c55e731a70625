"""Run a worker script under torchrun in its own process group, with a hard timeout
(megatron_longpo.launch): a failed rank otherwise leaves the others waiting."""
from pathlib import Path

from megatron_longpo.launch import run_torchrun

WORKERS = Path(__file__).parent / "workers"


def torchrun(nproc: int, script: str, *args: str, timeout: int = 300, extra_env: dict | None = None) -> str:
    env = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(extra_env or {})}
    code, out, timed_out = run_torchrun(nproc, [WORKERS / script, *args], timeout=timeout, env=env)
    if timed_out:
        raise AssertionError(f"{script} timed out after {timeout} s:\n{out[-4000:]}")
    if code != 0:
        raise AssertionError(f"{script} failed (exit {code}):\n{out[-6000:]}")
    return out
