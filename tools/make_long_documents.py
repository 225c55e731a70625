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
import json
import random
import sys

from megatron_longpo.io import atomic_write

SYL = ["ar", "bel", "cor", "dan", "el", "fen", "gar", "hol", "is", "jor", "kel", "lin", "mor", "nes", "or",
       "pel", "quin", "ros", "sal", "tor", "ul", "ven", "wyn", "yar", "zel", "bra", "cal", "dor", "mir", "tal"]
FIRST = ["Ada", "Bram", "Cora", "Dov", "Edda", "Finn", "Greta", "Hal", "Ines", "Joss", "Kira", "Lev", "Mara",
         "Nils", "Odile", "Per", "Rhea", "Sten", "Tova", "Ulf", "Vera", "Wim", "Yara", "Zeno"]
TRADES = ["salt panning", "rope making", "glass blowing", "bee keeping", "slate quarrying", "cheese making",
          "boat building", "wool dyeing", "clock making", "paper milling", "peat cutting", "barrel making"]
CROPS = ["barley", "rye", "flax", "turnips", "hops", "apples", "pears", "oats", "buckwheat", "cherries"]
FEATURES = ["a stone bridge of {n} arches", "a lighthouse {n} metres tall", "a market hall with {n} stalls",
            "a library of {n} volumes", "a mill with {n} millstones", "a harbour wall {n} metres long",
            "a bell tower holding {n} bells", "a covered well {n} metres deep"]
EVENTS = ["a great flood", "a fire in the tannery quarter", "a drought", "the opening of the canal",
          "a hard winter", "the founding of the guild", "a visit by the royal surveyor", "an eclipse fair"]
ROLES = ["mayor", "harbour master", "schoolteacher", "midwife", "brewer", "archivist", "ferry keeper", "surveyor"]


def name(rng: random.Random, parts: int = 2) -> str:
    return "".join(rng.choice(SYL) for _ in range(parts)).capitalize()


def settlement(rng: random.Random, region: str, river: str) -> str:
    town, founder = name(rng, rng.choice([2, 3])), f"{rng.choice(FIRST)} {name(rng)}"
    year, pop = rng.randint(1100, 1890), rng.randint(120, 48000)
    trade, crop = rng.choice(TRADES), rng.choice(CROPS)
    feature = rng.choice(FEATURES).format(n=rng.randint(3, 900))
    event, eyear = rng.choice(EVENTS), year + rng.randint(5, 120)
    role, person = rng.choice(ROLES), f"{rng.choice(FIRST)} {name(rng)}"
    km = rng.randint(2, 140)
    return (
        f"## {town}\n\n"
        f"{town} lies on the {river}, {km} kilometres from the regional seat of {region}. It was founded in "
        f"{year} by {founder}, and its people number about {pop:,} today. The town is known for {trade}, and "
        f"the fields around it grow mostly {crop}. Visitors come to see {feature}.\n\n"
        f"In {eyear} the town lived through {event}; the records kept by its {role}, {person}, say that the "
        f"townsfolk rebuilt within {rng.randint(2, 30)} months. The {role} also noted that {town} sends "
        f"{rng.randint(2, 90)} carts of goods to {region} every week."
    )


def document(rng: random.Random, words: int) -> tuple[str, str]:
    region = name(rng, 3)
    rivers = [name(rng) + " River" for _ in range(rng.randint(2, 5))]
    parts = [f"# A gazetteer of {region}\n\n{region} is a fictional region described for reading practice. "
             f"Its main rivers are {', '.join(rivers)}. Every place, person and number below is invented."]
    n = len(parts[0].split())
    while n < words:
        s = settlement(rng, region, rng.choice(rivers))
        parts.append(s)
        n += len(s.split())
    return region, "\n\n".join(parts) + "\n"


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
    with atomic_write(a.out) as f:
        for i in range(a.n):
            region, text = document(random.Random(f"{a.seed}:{i}"), a.words)
            f.write(json.dumps({"id": f"gazetteer-{a.seed}-{i}-{region}", "text": text}) + "\n")
    print(f"wrote {a.n} documents of ~{a.words} words to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
