#!/usr/bin/env python
"""Long documents for self-generated LongPO data, made offline: fictional gazetteers.

Each document describes one invented region section by section (settlements, rivers, people,
trades, events), every fact drawn from a seeded RNG: numbers, names and relations a model can be
asked about, and nothing it can know from pre-training. The sections are Markdown headings with
paragraphs, so tools/build_longpo_pairs.py chunks them on section boundaries.

    python tools/make_long_documents.py --n 64 --words 12000 --seed 0 --out docs.jsonl

Writes JSONL lines {"id": ..., "text": ...} (atomically). Deterministic for a seed.
"""

from __future__ import annotations

import argparse
import sys

from megatron_longpo.generation.gazetteer import write_gazetteers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, required=True, help="number of documents")
    p.add_argument("--words", type=int, default=12000, help="words per document (about 1.3 tokens each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.n < 1 or a.words < 50:
        print("error: --n must be >= 1 and --words >= 50", file=sys.stderr)
        return 2
    write_gazetteers(a.out, a.n, a.words, a.seed)
    print(f"wrote {a.n} documents of ~{a.words} words to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
