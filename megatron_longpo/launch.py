"""Starting torchrun from Python (reshard, tests): a free local port, and a launch in its own
process session with a hard timeout that kills the whole group when anything goes wrong — a
failed rank otherwise leaves the others blocked in a collective."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(nproc: int) -> list:
    """The start of a one-host torchrun command line (this Python, NPROC processes, a free port);
    the script or `-m module` and its arguments follow."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", nproc, f"--master-port={free_port()}"]


def run_torchrun(nproc: int, target: list[str], *, timeout: float, env: dict | None = None) -> tuple[int, str, bool]:
    """`python -m torch.distributed.run --nproc-per-node NPROC ... TARGET` on this host.
    `target` is a script path or `-m module` followed by its arguments. Returns (exit code, the
    combined output, whether it timed out); on a timeout or a failure the process group is killed,
    and so is anything the run started that outlived it (module doc of `_kill_leftovers`)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", *map(str, target)]
    mark = uuid.uuid4().hex
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {}), _MARK: mark})
    deadline, exited = time.monotonic() + timeout, None
    while True:
        try:
            out, _ = proc.communicate(timeout=2)
            break
        except subprocess.TimeoutExpired:
            now = time.monotonic()
            if proc.poll() is not None:  # torchrun is gone, yet something it started holds the output open
                exited = exited or now
                if now - exited > _GRACE:
                    _kill_leftovers(mark)
            elif now > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                _kill_leftovers(mark)
                out, _ = proc.communicate()
                return -9, out, True
    if proc.returncode != 0:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any rank left waiting in a collective
        except ProcessLookupError:
            pass
    _kill_leftovers(mark)
    return proc.returncode, out, False


_MARK = "MEGATRON_LONGPO_LAUNCH"  # an environment variable every process of one launch inherits
_GRACE = 10.0  # seconds the output may stay open after torchrun exits


def _kill_leftovers(mark: str) -> int:
    """SIGKILL every process whose environment holds _MARK=`mark`: torchrun starts each worker in a
    session of its own, so killing torchrun's group misses them and what they started (megatron's
    checkpoint writer starts a multiprocessing Manager). Such a leftover keeps the output pipe open
    and a reader waiting forever. Linux /proc; elsewhere nothing is killed. Returns the count."""
    needle, killed = f"{_MARK}={mark}".encode() + b"\0", 0
    for d in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/environ", "rb") as f:
                if needle not in f.read() + b"\0":
                    continue
            os.kill(int(d), signal.SIGKILL)
            killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed
