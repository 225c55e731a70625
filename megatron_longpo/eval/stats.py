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
