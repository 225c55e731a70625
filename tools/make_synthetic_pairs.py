#!/usr/bin/env python
"""Write synthetic (word-salad) pair records for smoke tests and benchmarks, offline and seeded.

    python tools/make_synthetic_pairs.py --kind longpo --n 8 --context-words 12000 --out long.jsonl
(about 1.3 SmolLM2 tokens per word)"""
import argparse

from megatron_longpo.data.synthetic import RECORDS, write_jsonl

p = argparse.ArgumentParser(description=__doc__)
p.add_argument("--kind", choices=sorted(RECORDS), required=True)
p.add_argument("--n", type=int, required=True)
p.add_argument("--context-words", type=int, default=120)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", required=True)
a = p.parse_args()
print(write_jsonl(a.out, a.kind, a.n, a.seed, context_words=a.context_words))
