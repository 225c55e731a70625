"""Fitting a RULER sample to a token length: the largest haystack size (lines, words, documents) whose
model input plus generation budget fits the length, as RULER's binary search finds it."""

from __future__ import annotations

import math
from collections.abc import Callable

CountFn = Callable[[str, str], int]


class LengthError(ValueError):
    """The asked length cannot be reached within the tolerance."""


# first guesses of the knob per token (corrected from the first sample of a task and length)
PER_TOKEN = {"essay": 0.75, "noise": 1 / 21, "needle": 1 / 22, "variable_tracking": 1 / 21,
             "common_words_extraction": 1 / 14, "freq_words_extraction": 0.3, "qa": 1 / 160}


class Fitter:
    """Finds, per sample, the largest knob whose input fits the length, starting from the last sample's
    knob for that task and length (RULER searches once per task too), so most samples cost one or two
    token counts."""

    def __init__(self) -> None:
        self.hint: dict[tuple[str, int], int] = {}

    def fit(self, key: tuple[str, int], build, count: CountFn, budget: int, length: int, tolerance: float,
            first_guess: float):
        target = length - budget
        low = math.ceil((1 - tolerance) * length) - budget

        def measure(k: int):
            user, prefix, meta = build(k)
            return count(user, prefix), user, prefix, meta

        k = self.hint.get(key) or max(1, int(first_guess * target))
        fits: tuple | None = None  # best (k, n, user, prefix, meta) with n <= target
        over: int | None = None  # smallest k known to be too long
        for _ in range(40):
            n, user, prefix, meta = measure(k)
            if n <= target:
                if fits is None or k > fits[0]:
                    fits = (k, n, user, prefix, meta)
                if n >= low:
                    break
                nxt = max(k + 1, int(k * target / max(n, 1)))
            else:
                over = k if over is None else min(over, k)
                nxt = min(k - 1, int(k * target / n))
            if over is not None:
                nxt = min(nxt, over - 1)
            if fits is not None:
                nxt = max(nxt, fits[0] + 1)
            if nxt < 0 or (over is not None and fits is not None and over - fits[0] <= 1):
                break
            if nxt == k:
                break
            k = nxt
        if fits is None:
            raise LengthError(f"{key[0]} at {length} tokens: the task's fixed text and its {budget}-token answer "
                              f"budget do not fit; ask a longer length")
        k, n, user, prefix, meta = fits
        if n < low and over != k + 1:  # short, and not because one more unit (a line, a document) overshoots
            raise LengthError(f"{key[0]} at {length} tokens: could not reach {1 - tolerance:.0%} of the length "
                              f"(got {n + budget})")
        self.hint[key] = k
        return k, n, user, prefix, meta
