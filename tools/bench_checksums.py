#!/usr/bin/env python
"""What the checkpoint checksums cost: time to hash one iteration's files (what a save adds and
what every load verifies), in one process.

    python tools/bench_checksums.py --megatron-dir CKPT_DIR [--iteration N] [--repeat 3]

Prints the bytes hashed and seconds per GB (the files are read once first, so the numbers are
for files in the page cache: a cold read adds the disk's time). See docs/reliability.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", required=True)
    p.add_argument("--iteration", type=int, default=None)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args(argv)
    from megatron_longpo.checkpoint import dist as ckpt

    try:
        it = ckpt.latest_iteration_dir(a.megatron_dir) if a.iteration is None else Path(a.megatron_dir) / ckpt.iter_name(a.iteration)
        if not it.is_dir():
            raise ckpt.CheckpointError(f"{it} does not exist")
        size = sum(f.stat().st_size for f in it.rglob("*") if f.is_file() and f.name != ckpt.CHECKSUMS)
        had = (it / ckpt.CHECKSUMS).is_file()
        if not had:
            ckpt.write_checksums(it)  # an iteration from before checksums: add them (that is all this changes)
        ckpt.verify_checksums(it)  # warm the page cache
        times = []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            ckpt.verify_checksums(it)
            times.append(time.perf_counter() - t0)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = min(times)
    print(f"{it}: {size / 1e9:.3f} GB in {len(list(it.rglob('*')))} files; verify (= the save's hashing) "
          f"best of {a.repeat}: {best:.2f} s = {best / (size / 1e9):.2f} s/GB ({size / 1e9 / best:.2f} GB/s)"
          f"{'' if had else '; checksums.json was added'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
