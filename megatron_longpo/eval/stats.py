"""Scores and their uncertainty: RULER's metrics beside a strict word-boundary score, percentile
bootstrap confidence intervals (stratified by task), paired differences between two models that saw
the same prompts, and the per-task, per-length and needle-depth tables. Pure: numpy only.

How to read a CI here: a 95 % interval from 2,000 bootstrap resamples of the samples (within each
task, so the task mix stays fixed). A difference between two models is resolved only when its paired
interval excludes 0; otherwise it is reported as unresolved, whatever its sign.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

N_BOOT = 2000
LEVEL = 0.95


# ---------------------------------------------------------------- scoring


def postprocess(prediction: str) -> str:
    """RULER's postprocess_pred: strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def _found(answer: str, prediction: str, words: bool) -> bool:
    a, p = answer.lower(), prediction.lower()
    if not words:
        return a in p
    return re.search(rf"(?<![0-9a-z]){re.escape(a)}(?![0-9a-z])", p) is not None


def match_all(prediction: str, answers: Sequence[str], words: bool = False) -> float:
    """RULER's string_match_all (words=False): the fraction of gold strings found as case-insensitive
    sub-strings; words=True: only where the gold string is not part of a longer word or number."""
    if not answers:
        raise ValueError("no gold answers")
    return sum(_found(a, prediction, words) for a in answers) / len(answers)


def match_part(prediction: str, answers: Sequence[str], words: bool = False) -> float:
    """RULER's string_match_part (words=False): 1 if any gold string is found; words=True as above."""
    if not answers:
        raise ValueError("no gold answers")
    return float(any(_found(a, prediction, words) for a in answers))


def score(prediction: str, answers: Sequence[str], metric: str, words: bool = False) -> float:
    fn = {"all": match_all, "part": match_part}[metric]
    return fn(postprocess(prediction), answers, words)


def prompt_hash(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------- bootstrap


def _resample_means(values: np.ndarray, strata: np.ndarray | None, n_boot: int, rng) -> np.ndarray:
    """Bootstrap means; with strata, each stratum is resampled on its own and the mean is the mean of
    the strata means (each task weighs the same, as in RULER's average)."""
    if strata is None:
        idx = rng.integers(0, len(values), size=(n_boot, len(values)))
        return values[idx].mean(axis=1)
    means = []
    for s in np.unique(strata):
        v = values[strata == s]
        idx = rng.integers(0, len(v), size=(n_boot, len(v)))
        means.append(v[idx].mean(axis=1))
    return np.mean(means, axis=0)


def point(values: Sequence[float], strata: Sequence | None = None) -> float:
    v = np.asarray(values, dtype=float)
    if strata is None:
        return float(v.mean())
    s = np.asarray(strata)
    return float(np.mean([v[s == k].mean() for k in np.unique(s)]))


def bootstrap_ci(values: Sequence[float], strata: Sequence | None = None, n_boot: int = N_BOOT,
                 level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap interval of the mean (of the strata means)."""
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = _resample_means(v, None if strata is None else np.asarray(strata), n_boot, rng)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return point(v, strata), float(lo), float(hi)


def paired_ci(a: Sequence[float], b: Sequence[float], strata: Sequence | None = None, n_boot: int = N_BOOT,
              level: float = LEVEL, seed: int = 0) -> tuple[float, float, float]:
    """(mean of b - a, low, high) over aligned samples: the same prompts scored for two models."""
    if len(a) != len(b):
        raise ValueError("paired samples must align")
    return bootstrap_ci(np.asarray(b, float) - np.asarray(a, float), strata, n_boot, level, seed)


def resolved(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0


def fmt_ci(mean: float | None, lo: float | None = None, hi: float | None = None, scale: float = 100.0) -> str:
    if mean is None:
        return "-"
    if lo is None:
        return f"{scale * mean:.1f}"
    return f"{scale * mean:.1f} [{scale * lo:.1f}, {scale * hi:.1f}]"


def length_label(n) -> str:
    """A context length as a table's column: 16384 -> 16K; one not a multiple of 1024 as it is."""
    return f"{int(n) // 1024}K" if int(n) % 1024 == 0 else str(n)


# ---------------------------------------------------------------- tables over records

DEPTH_BINS = (0, 20, 40, 60, 80, 101)


def _scored(records: Iterable[dict], key: str = "score") -> list[dict]:
    return [r for r in records if r.get(key) is not None]


def cell_table(records: Sequence[dict], key: str = "score", seed: int = 0) -> dict:
    """{task: {length: {mean, lo, hi, n}}} and {"average": {length: ...}} (tasks weigh the same)."""
    by: dict[tuple[str, int], list[float]] = defaultdict(list)
    for r in _scored(records, key):
        by[(r["task"], int(r["length"]))].append(r[key])
    out: dict[str, dict] = defaultdict(dict)
    for (task, length), v in sorted(by.items()):
        m, lo, hi = bootstrap_ci(v, seed=seed)
        out[task][str(length)] = {"mean": m, "lo": lo, "hi": hi, "n": len(v)}
    lengths = sorted({n for _, n in by})
    avg = {}
    for n in lengths:
        rs = [r for r in _scored(records, key) if int(r["length"]) == n]
        m, lo, hi = bootstrap_ci([r[key] for r in rs], [r["task"] for r in rs], seed=seed)
        avg[str(n)] = {"mean": m, "lo": lo, "hi": hi, "n": len(rs), "tasks": len({r["task"] for r in rs})}
    return {"tasks": dict(out), "average": avg}


def depth_table(records: Sequence[dict], key: str = "score", seed: int = 0) -> dict:
    """{length: {"0-20": {...}, ...}} over samples with one gold position (`depth`, % of the context)."""
    by: dict[tuple[int, str], list[float]] = defaultdict(list)
    for r in _scored(records, key):
        d = r.get("depth")
        if d is None:
            continue
        for lo, hi in itertools.pairwise(DEPTH_BINS):
            if lo <= d < hi:
                by[(int(r["length"]), f"{lo}-{min(hi, 100)}")].append(r[key])
    out: dict[str, dict] = defaultdict(dict)
    for (n, b), v in sorted(by.items()):
        m, lo, hi = bootstrap_ci(v, seed=seed)
        out[str(n)][b] = {"mean": m, "lo": lo, "hi": hi, "n": len(v)}
    return dict(out)


def paired_table(base: Sequence[dict], other: Sequence[dict], key: str = "score", seed: int = 0) -> dict:
    """Paired differences other - base per (task, length) and per length (tasks weigh the same), over the
    samples both scored with identical prompts (matched on task, length, index and the prompt hash)."""
    def index(rs):
        return {(r["task"], int(r["length"]), r["index"]): r for r in _scored(rs, key)}

    ia, ib = index(base), index(other)
    common = sorted(k for k in ia.keys() & ib.keys() if ia[k].get("prompt_sha") == ib[k].get("prompt_sha"))
    mismatched = sum(1 for k in ia.keys() & ib.keys() if ia[k].get("prompt_sha") != ib[k].get("prompt_sha"))
    cells: dict[str, dict] = defaultdict(dict)
    by: dict[tuple[str, int], list] = defaultdict(list)
    for k in common:
        by[(k[0], k[1])].append(k)
    for (task, n), ks in sorted(by.items()):
        m, lo, hi = paired_ci([ia[k][key] for k in ks], [ib[k][key] for k in ks], seed=seed)
        cells[task][str(n)] = {"diff": m, "lo": lo, "hi": hi, "n": len(ks), "resolved": resolved(lo, hi)}
    avg = {}
    for n in sorted({k[1] for k in common}):
        ks = [k for k in common if k[1] == n]
        m, lo, hi = paired_ci([ia[k][key] for k in ks], [ib[k][key] for k in ks], [k[0] for k in ks], seed=seed)
        avg[str(n)] = {"diff": m, "lo": lo, "hi": hi, "n": len(ks), "resolved": resolved(lo, hi)}
    return {"tasks": dict(cells), "average": avg, "matched": len(common), "prompt_mismatch": mismatched}


# ---------------------------------------------------------------- several runs (seeds) of a model


def grouped_ci(b, a=None, strata: Sequence | None = None, n_boot: int = N_BOOT, level: float = LEVEL,
               seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of a model's mean over its runs (b: runs x prompts, one row per training
    seed, every row on the same prompts), minus another model's (a, same prompts) when given: a
    two-level bootstrap. Each resample draws the prompts (within each stratum, paired across every
    run of both models) and, on their own, each model's runs with replacement; its value is the mean
    over the drawn prompts (of the strata means) of b's mean over its drawn runs minus a's.

    The prompts are drawn first, from the stream bootstrap_ci draws them from: with one run each, the
    interval is paired_ci(a[0], b[0]) (bootstrap_ci(b[0]) without a), exactly."""
    B = np.atleast_2d(np.asarray(b, dtype=float))
    A = None if a is None else np.atleast_2d(np.asarray(a, dtype=float))
    if A is not None and A.shape[1] != B.shape[1]:
        raise ValueError("paired samples must align")
    n = B.shape[1]
    if n == 0 or len(B) == 0 or (A is not None and len(A) == 0):
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    s = None if strata is None else np.asarray(strata)
    if s is not None and len(s) != n:
        raise ValueError("one stratum per prompt")
    parts = [(np.arange(n), rng.integers(0, n, size=(n_boot, n)))] if s is None else \
        [(np.flatnonzero(s == k), rng.integers(0, int((s == k).sum()), size=(n_boot, int((s == k).sum()))))
         for k in np.unique(s)]

    def run_means(X):  # (n_boot, prompts): each resample's mean over its drawn runs
        if len(X) == 1:
            return np.broadcast_to(X, (n_boot, n))
        draws = rng.integers(0, len(X), size=(n_boot, len(X)))
        weights = np.zeros((n_boot, len(X)))
        np.add.at(weights, (np.arange(n_boot)[:, None], draws), 1.0 / len(X))
        return weights @ X

    D = run_means(B) if A is None else run_means(B) - run_means(A)
    means = [np.take_along_axis(D[:, idx], draw, axis=1).mean(axis=1) for idx, draw in parts]
    boot = means[0] if s is None else np.mean(means, axis=0)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    diff = B.mean(axis=0) if A is None else B.mean(axis=0) - A.mean(axis=0)
    return point(diff, strata), float(lo), float(hi)


def grouped_paired_ci(a, b, strata: Sequence | None = None, n_boot: int = N_BOOT, level: float = LEVEL,
                      seed: int = 0) -> tuple[float, float, float]:
    """(mean over b's runs - mean over a's runs, low, high): runs x prompts each, on the same prompts
    (grouped_ci). With one run each it is paired_ci(a[0], b[0])."""
    return grouped_ci(b, a, strata, n_boot, level, seed)


def aligned_runs(groups: Sequence[Sequence[Sequence[dict]]], key: str = "score"):
    """The prompts that every run of every group scored, identical in all of them (matched on task,
    length, index and the prompt hash): (keys sorted, [runs x prompts array per group], the number of
    prompts left out because their hashes differ)."""
    maps = [[{(r["task"], int(r["length"]), r["index"]): r for r in _scored(run, key)} for run in runs]
            for runs in groups]
    flat = [m for runs in maps for m in runs]
    common = set(flat[0]).intersection(*flat[1:]) if flat else set()
    keys = sorted(k for k in common if len({m[k].get("prompt_sha") for m in flat}) == 1)
    arrays = [np.array([[m[k][key] for k in keys] for m in runs], dtype=float).reshape(len(runs), len(keys))
              for runs in maps]
    return keys, arrays, len(common) - len(keys)


def grouped_average(runs: Sequence[Sequence[dict]], key: str = "score", seed: int = 0) -> dict:
    """{length: {mean, lo, hi, n, tasks, runs}}: a model's task average (tasks weigh the same) at each
    length, its mean over runs (seeds) on the prompts all of them scored, with grouped_ci's interval."""
    keys, (X,), _ = aligned_runs([runs], key)
    out = {}
    for n in sorted({k[1] for k in keys}):
        cols = [i for i, k in enumerate(keys) if k[1] == n]
        tasks = [keys[i][0] for i in cols]
        m, lo, hi = grouped_ci(X[:, cols], strata=tasks, seed=seed)
        out[str(n)] = {"mean": m, "lo": lo, "hi": hi, "n": len(cols), "tasks": len(set(tasks)), "runs": len(runs)}
    return out


def grouped_paired_table(base: Sequence[Sequence[dict]], other: Sequence[Sequence[dict]], key: str = "score",
                         seed: int = 0) -> dict:
    """paired_table over several runs (seeds) of each model: other's mean over its runs minus base's,
    per (task, length) and per length, with grouped_paired_ci's two-level interval; with one run each,
    paired_table(base[0], other[0]) (and `runs`)."""
    keys, (A, B), mismatched = aligned_runs([base, other], key)
    cells: dict[str, dict] = defaultdict(dict)
    by: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        by[(k[0], k[1])].append(i)
    for (task, n), cols in sorted(by.items()):
        m, lo, hi = grouped_paired_ci(A[:, cols], B[:, cols], seed=seed)
        cells[task][str(n)] = {"diff": m, "lo": lo, "hi": hi, "n": len(cols), "resolved": resolved(lo, hi)}
    avg = {}
    for n in sorted({k[1] for k in keys}):
        cols = [i for i, k in enumerate(keys) if k[1] == n]
        m, lo, hi = grouped_paired_ci(A[:, cols], B[:, cols], [keys[i][0] for i in cols], seed=seed)
        avg[str(n)] = {"diff": m, "lo": lo, "hi": hi, "n": len(cols), "resolved": resolved(lo, hi)}
    return {"tasks": dict(cells), "average": avg, "matched": len(keys), "prompt_mismatch": mismatched,
            "runs": [len(base), len(other)]}
