"""launch.run_torchrun: a run whose workers leave a process behind still returns, and the
process is killed (it held the output pipe open: a CI run once hung here for good)."""
import re
import time

from mp import WORKERS

from megatron_longpo.launch import run_torchrun


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"  # a zombie is dead, only not yet reaped
    except FileNotFoundError:
        return False


def test_a_leftover_process_neither_blocks_the_launch_nor_survives_it():
    t0 = time.monotonic()
    code, out, timed_out = run_torchrun(1, [WORKERS / "leftover.py"], timeout=240, env={"OMP_NUM_THREADS": "1"})
    took = time.monotonic() - t0
    assert code == 0 and not timed_out, out[-2000:]
    pid = int(re.search(r"leftover pid (\d+)", out).group(1))
    assert took < 120  # torchrun's start plus the 10 s grace, far below the 240 s timeout
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    assert not _alive(pid)
