"""A run directory (train.save_dir) is held by one trainer at a time.

Rank 0 creates `SAVE_DIR/trainer.lock` holding the host, pid, process start time and SLURM job id
of the trainer, and keeps an exclusive `flock` on it for the whole run; the lock is removed when
the run ends (also after an error). A second trainer on the same directory is refused with one
line naming the holder. A lock left behind by a trainer that died:

  * same host: the holder's flock went with its process (and its pid is gone, or is another
    process now), so the lock is stale: taken over, with a note;
  * same SLURM job (a requeued job keeps its SLURM_JOB_ID; SLURM ends the old incarnation before
    it starts the new one): taken over, with a note;
  * another host, another job: whether that trainer still runs cannot be seen from here, so the
    run is refused, and the line says how to clear the lock (delete the file) once that trainer is
    known to be gone (a dead node).

docs/reliability.md. Training floor: imports the standard library and torch.distributed only.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "trainer.lock"


class RunLocked(ValueError):
    """Another trainer holds the run directory."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    now = _start_time(pid)
    return start is None or now is None or now == start


def me() -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "proc_start": _start_time(pid),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


class RunLock:
    """The lock of one run directory, held by this process (rank 0) until release()."""

    def __init__(self, save_dir: str | os.PathLike):
        self.path = Path(save_dir) / LOCK_NAME
        self._fd: int | None = None
        self.note: str | None = None  # what was taken over, for the log

    def acquire(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            held_by = self._read(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunLocked(self._refusal(held_by, "it is running")) from None
            mine = me()
            if held_by:
                same_host = held_by.get("host") == mine["host"]
                same_job = held_by.get("slurm_job_id") and held_by.get("slurm_job_id") == mine["slurm_job_id"]
                if same_host and _alive(int(held_by.get("pid", -1)), held_by.get("proc_start")) and not same_job:
                    # alive, yet its flock is not held: a file system without flock between processes
                    raise RunLocked(self._refusal(held_by, "it is running"))
                if not same_host and not same_job:
                    raise RunLocked(self._refusal(held_by, "it may still be running on that host"))
                self.note = (f"took over the lock {self.path} of a trainer that is gone (pid {held_by.get('pid')} on "
                             f"{held_by.get('host')}{', the same SLURM job' if same_job else ''})")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _read(self, fd: int) -> dict:
        try:
            data = os.pread(fd, 4096, 0).decode()
            return json.loads(data) if data.strip() else {}
        except (ValueError, OSError):
            return {"host": "?", "pid": "?"}

    def _refusal(self, h: dict, state: str) -> str:
        job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
        return (f"train.save_dir {self.path.parent} is held by another trainer (pid {h.get('pid')} on host {h.get('host')}"
                f"{job}, started {h.get('started', '?')}) and {state}: two trainers would write the same checkpoints. "
                f"Wait for it, or choose another train.save_dir; if that trainer is gone (its node died), delete {self.path}")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def hold(save_dir: str | os.PathLike) -> RunLock | None:
    """Collective: rank 0 acquires the lock; every rank raises RunLocked if it could not.
    Returns the lock on rank 0 (None elsewhere)."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    lock, msg = None, None
    if rank == 0:
        try:
            lock = RunLock(save_dir).acquire()
        except RunLocked as e:
            msg = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [msg]
        dist.broadcast_object_list(box, src=0)
        msg = box[0]
    if msg:
        raise RunLocked(msg)
    return lock
