"""Synthetic pair records (offline, seeded) for smoke tests and benchmarks: word-salad documents of
a chosen length with questions about their parts. Not training data: the point is shape and scale."""

from __future__ import annotations

import json
import random
from pathlib import Path

from megatron_longpo.io import atomic_write

WORDS = ("harbour ledger volume archive wool ship manifest fire chairman trade city river bridge mill "
         "engine railway council school market tower clock winter summer north south letter record").split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12))).capitalize() + "."


def paragraph(rng: random.Random, words: int) -> str:
    out, n = [], 0
    while n < words:
        s = sentence(rng)
        out.append(s)
        n += s.count(" ") + 1
    return " ".join(out)


def longpo_records(n: int, seed: int = 0, turns: int = 2, context_words: int = 120):
    rng = random.Random(seed)
    for _ in range(n):
        parts = max(turns, 4)
        paras = [paragraph(rng, context_words // parts) for _ in range(parts)]
        t = [{"short_context": paras[k], "instruction": f"What does part {k + 1} say about the {rng.choice(WORDS)}?",
              "chosen": sentence(rng), "rejected": sentence(rng)} for k in range(turns)]
        yield {"long_context": "\n\n".join(paras), "turns": t}


def pair_records(n: int, seed: int = 0, context_words: int = 20):
    rng = random.Random(seed)
    for _ in range(n):
        yield {"prompt": paragraph(rng, context_words) + " Explain.", "chosen": sentence(rng), "rejected": sentence(rng)}


def solopo_records(n: int, seed: int = 0, context_words: int = 120):
    rng = random.Random(seed)
    for _ in range(n):
        short = paragraph(rng, max(context_words // 6, 10))
        side = max((context_words - len(short.split())) // 2, 10)
        yield {"short_context": short, "long_context": paragraph(rng, side) + " " + short + " " + paragraph(rng, side),
               "instruction": "Which word comes first?", "chosen": sentence(rng), "rejected": sentence(rng)}


RECORDS = {"longpo": longpo_records, "pair": pair_records, "solopo": solopo_records}


def write_jsonl(path: str | Path, kind: str, n: int, seed: int = 0, **kw) -> Path:
    path = Path(path)
    with atomic_write(path) as f:
        for r in RECORDS[kind](n, seed, **kw):
            f.write(json.dumps(r) + "\n")
    return path
