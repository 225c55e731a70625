"""Starting torchrun from Python (reshard, tests): a free local port, and a launch in its own
process session with a hard timeout that kills the whole group when anything goes wrong — a
failed rank otherwise leaves the others blocked in a collective."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(nproc: int, target: list[str], *, timeout: float, env: dict | None = None) -> tuple[int, str, bool]:
    """`python -m torch.distributed.run --nproc-per-node NPROC ... TARGET` on this host.
    `target` is a script path or `-m module` followed by its arguments. Returns (exit code, the
    combined output, whether it timed out); on a timeout or a failure the process group is killed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *map(str, target)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return -9, out, True
    if proc.returncode != 0:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any rank left waiting in a collective
        except ProcessLookupError:
            pass
    return proc.returncode, out, False
