"""RULER samples built by several processes. One job is one (task, length) group with its own Fitter,
so the samples equal the sequential ones: a sample's randomness is its own (seed, task, length, index),
and the fitter's starting hint is kept per task and length (length_fit.Fitter)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from megatron_longpo.eval import ruler_tasks

MIN_PARALLEL_SAMPLES = 64  # fewer samples than this are built in this process (a worker's start costs seconds)
MAX_WORKERS = 16

_STATE: dict = {}


def _init(tokenizer, haystack, qa_sets, seed: int, tolerance: float) -> None:
    count, _ = ruler_tasks.chat_counter(tokenizer)
    _STATE.update(count=count, haystack=haystack, qa_sets=qa_sets, seed=seed, tolerance=tolerance)


def _group(task: str, length: int, samples: int) -> list:
    s = _STATE
    return ruler_tasks.generate([task], [length], samples, s["count"], s["haystack"], s["qa_sets"], s["seed"],
                                s["tolerance"])


def auto_workers(groups: int, samples: int) -> int:
    """Processes for `groups` (task, length) groups of `samples` samples in all: 1 below
    MIN_PARALLEL_SAMPLES, else one a CPU core, at most one a group and MAX_WORKERS."""
    if samples < MIN_PARALLEL_SAMPLES:
        return 1
    return max(1, min(os.cpu_count() or 1, groups, MAX_WORKERS))


def generate(tokenizer, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int, haystack,
             qa_sets: dict, tolerance: float = 0.02, progress: Callable[[int], None] | None = None,
             workers: int | None = None) -> list:
    """ruler_tasks.generate counted with `tokenizer`'s chat template, in `workers` processes (None: auto_workers;
    1: this process), in the sequential order (lengths, then tasks, then indices)."""
    groups = [(t, n) for n in lengths for t in tasks]
    workers = auto_workers(len(groups), len(groups) * samples) if workers is None else min(workers, len(groups))
    if workers <= 1:
        count, _ = ruler_tasks.chat_counter(tokenizer)
        return ruler_tasks.generate(tasks, lengths, samples, count, haystack, qa_sets, seed, tolerance, progress)
    for t in tasks:  # the one-line error here, not from a worker
        if t not in ruler_tasks.TASKS:
            raise ValueError(f"unknown RULER task {t!r}: choose from {', '.join(ruler_tasks.RULER_TASKS)}")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: dict[tuple[str, int], list] = {}
    # spawn: the parent may hold a CUDA context and the tokenizers library's threads, which fork does not copy safely
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init,
                             initargs=(tokenizer, haystack, qa_sets, seed, tolerance)) as pool:
        jobs = {pool.submit(_group, t, n, samples): (t, n) for t, n in groups}
        for job in as_completed(jobs):
            done[jobs[job]] = job.result()
            if progress:
                progress(samples)
    return [s for g in groups for s in done[g]]
