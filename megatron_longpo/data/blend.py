"""Weighted blends of datasets, as Megatron's `--data-path 0.3 A 0.7 B`.

`parse_blend("0.3 A 0.7 B")` -> [(0.3, "A"), (0.7, "B")] (weights normalised; a lone prefix has
weight 1). `Blend` lays out one blend epoch of `size` draws (default: the datasets' total
size): draw i goes to the dataset whose share is furthest behind its weight (Megatron's greedy
rule: argmax of weight·(i+1) − drawn so far, lowest index on ties), so after any n draws each
dataset has its weight's share within one sample. Within a dataset, its k-th draw (counted
over all blend epochs) is sample `perm_p[k mod n]` of that dataset's permutation for pass p = k // n
(`SeedSequence([seed, d, p])`): a dataset with more weight than samples is repeated pass after
pass, one with less is subsampled, and the next blend epoch goes on where this one stopped.
Everything follows from (sizes, weights, size, seed): the mapping is rebuilt identically on
resume, and the sampler (data/sampler.py) shuffles and shards the draws like any dataset.
"""

from __future__ import annotations

import numpy as np


class BlendError(ValueError):
    """data.path is not a prefix or a weighted list of prefixes."""


def parse_blend(spec: str) -> list[tuple[float, str]]:
    parts = str(spec).split()
    if not parts:
        raise BlendError("data.path is empty: give a dataset prefix or a blend \"0.3 PREFIX_A 0.7 PREFIX_B\"")
    if len(parts) == 1:
        return [(1.0, parts[0])]

    def weight(text: str) -> float | None:
        try:
            return float(text)
        except ValueError:
            return None

    if len(parts) % 2 or any(weight(w) is None for w in parts[0::2]):
        raise BlendError(f"data.path {spec!r} must be one prefix or weight/prefix pairs, e.g. \"0.3 A 0.7 B\"")
    pairs = [(float(w), p) for w, p in zip(parts[0::2], parts[1::2])]
    if any(w <= 0 for w, _ in pairs):
        raise BlendError(f"data.path {spec!r}: every weight must be > 0")
    prefixes = [p for _, p in pairs]
    if len(set(prefixes)) != len(prefixes):
        raise BlendError(f"data.path {spec!r} names a prefix twice; give it one weight")
    total = sum(w for w, _ in pairs)
    return [(w / total, p) for w, p in pairs]


def greedy_assignment(weights: np.ndarray, size: int) -> np.ndarray:
    """Dataset of each of `size` draws: argmax_d weight_d·(i+1) − count_d (ties: lowest d)."""
    w = np.asarray(weights, dtype=np.float64)
    counts = np.zeros(len(w), dtype=np.int64)
    out = np.empty(size, dtype=np.int32)
    for i in range(size):
        d = int(np.argmax(w * (i + 1) - counts))
        out[i] = d
        counts[d] += 1
    return out


class Blend:
    """Draw i of blend epoch e -> (dataset index, sample index within that dataset).

    `pools[d]`: the samples dataset d may draw (default: all of `range(sizes[d])`; a held-out
    evaluation split removes some)."""

    def __init__(self, sizes: list[int], weights: list[float], seed: int, size: int | None = None,
                 pools: list[np.ndarray] | None = None):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("one weight per dataset")
        self.pools = [np.arange(n) for n in sizes] if pools is None else [np.asarray(p, dtype=np.int64) for p in pools]
        for d, p in enumerate(self.pools):
            if len(p) == 0:
                raise BlendError(f"dataset {d} of the blend has no samples")
        self.weights = np.asarray(weights, dtype=np.float64)
        self.size = int(size if size is not None else sum(len(p) for p in self.pools))
        self.seed = int(seed)
        self.dataset = greedy_assignment(self.weights, self.size)
        self.per_epoch = np.bincount(self.dataset, minlength=len(self.weights))
        self.rank = np.empty(self.size, dtype=np.int64)  # draw i is the rank[i]-th draw of its dataset in an epoch
        for d in range(len(self.weights)):
            where = np.nonzero(self.dataset == d)[0]
            self.rank[where] = np.arange(len(where))
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    def _perm(self, d: int, p: int) -> np.ndarray:
        key = (d, p)
        if key not in self._perms:
            if len(self._perms) > 64:
                self._perms.clear()
            pool = self.pools[d]
            self._perms[key] = pool[np.random.default_rng(np.random.SeedSequence([self.seed, d, p])).permutation(len(pool))]
        return self._perms[key]

    def __len__(self) -> int:
        return self.size

    def draw(self, i: int, epoch: int = 0) -> tuple[int, int]:
        """Dataset d's k-th draw overall (k = epoch·per_epoch[d] + rank[i]) is sample
        perm_{d,p}[k mod n] of its pass p = k // n: every sample once per pass, the passes
        continuing across blend epochs."""
        d = int(self.dataset[i])
        k = epoch * int(self.per_epoch[d]) + int(self.rank[i])
        n = len(self.pools[d])
        return d, int(self._perm(d, k // n)[k % n])

    def __getitem__(self, i: int) -> tuple[int, int]:
        return self.draw(i, 0)

    def counts(self) -> np.ndarray:
        return self.per_epoch.copy()
