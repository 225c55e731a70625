"""Worker: tools/precompute_ref_logps.py under torchrun.

    precompute.py ARGS...            the tool with these arguments
    precompute.py --many JOBS.json   the scoring of several layouts in ONE process group: a list of
                                     {"data", "model", "out", "tp", "pp"}
"""
import json
import runpy
import sys
from pathlib import Path

if __name__ == "__main__":
    if sys.argv[1] == "--many":
        from megatron_longpo import parallel
        from megatron_longpo.training.reference import precompute

        for job in json.loads(Path(sys.argv[2]).read_text()):
            precompute(job["data"], job["model"], parallel.ParallelConfig(job["tp"], job["pp"], None, 1),
                       out_path=job["out"])
        parallel.teardown()
    else:
        sys.argv = ["precompute_ref_logps.py", *sys.argv[1:]]
        runpy.run_path(str(Path(__file__).resolve().parents[2] / "tools/precompute_ref_logps.py"), run_name="__main__")
