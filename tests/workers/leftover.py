"""Worker for tests/test_launch.py: starts a process in a session of its own that inherits the
output and outlives this one (as megatron's checkpoint writer's Manager can), prints its pid, exits 0."""
import subprocess
import sys

if __name__ == "__main__":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    print(f"leftover pid {child.pid}", flush=True)
