"""Worker: tools/precompute_ref_logps.py under torchrun."""
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.argv = ["precompute_ref_logps.py", *sys.argv[1:]]
    runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools/precompute_ref_logps.py"), run_name="__main__")
