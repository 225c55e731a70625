"""Fictional gazetteers: the long documents self-generated LongPO data is made from, offline.

Each document describes one invented region section by section (settlements, rivers, people,
trades, events), every fact drawn from a seeded RNG: numbers, names and relations a model can be
asked about, and nothing it can know from pre-training. The sections are Markdown headings with
paragraphs, so the LongPO chunker cuts them on section boundaries. Document i of seed s is a pure
function of (s, i, words): tools/make_long_documents.py writes them and the compact pairs form
(generation/compact.py) rebuilds them instead of storing them.
"""

from __future__ import annotations

import json
import random
import re
from typing import Iterator

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


def gazetteer_id(seed: int, index: int, region: str) -> str:
    return f"gazetteer-{seed}-{index}-{region}"


_ID = re.compile(r"gazetteer-(-?\d+)-(\d+)-([A-Za-z]+)")


def parse_gazetteer_id(doc_id: str) -> tuple[int, int] | None:
    """(seed, index) of a gazetteer document id, or None when `doc_id` is not one."""
    m = _ID.fullmatch(doc_id)
    return (int(m.group(1)), int(m.group(2))) if m else None


def gazetteer(seed: int, index: int, words: int) -> tuple[str, str]:
    """Document `index` of `seed`: (id, text). Deterministic."""
    region, text = document(random.Random(f"{seed}:{index}"), words)
    return gazetteer_id(seed, index, region), text


def gazetteers(n: int, words: int, seed: int) -> Iterator[tuple[str, str]]:
    """The `n` documents of `seed`, in order: (id, text)."""
    for i in range(n):
        yield gazetteer(seed, i, words)


def write_gazetteers(path: str, n: int, words: int, seed: int) -> None:
    """The documents JSONL ({"id", "text"} lines) tools/make_long_documents.py writes, atomically."""
    with atomic_write(path) as f:
        for doc_id, text in gazetteers(n, words, seed):
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
