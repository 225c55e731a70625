"""The raw material of the RULER-style tasks (eval/ruler.py): haystacks (offline essay sentences, a
word stream, needles inserted at depths) and random keys, values and pseudo-words. Pure: no model,
no I/O beyond reading the offline documents. Everything random comes from the caller's `Random`."""

from __future__ import annotations

import re
import uuid
from functools import lru_cache
from pathlib import Path
from random import Random
from typing import Iterable, Sequence

from megatron_longpo import resources

DEFAULT_DOCUMENTS = resources.DOCUMENTS
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Keys: adjective-noun pairs; word values: noun pairs from another pool (none of them hyphenated in the
# haystacks, so a hyphenated pair never occurs there by chance).
KEY_ADJECTIVES = ("amber ancient bitter brave calm clever crimson curious dusty eager electric fancy fierce "
                  "gentle golden hollow humble icy jolly lively lucky misty noble odd pale quiet rapid "
                  "rusty silent silver sleepy smooth sticky stormy sunny swift tame tidy velvet witty zesty").split()
KEY_NOUNS = ("otter falcon lantern meadow pebble walrus harbor violin comet badger cactus dolphin ember "
             "glacier hammock igloo jaguar kettle lobster magnet nectar orchid parrot quartz raven saddle "
             "thimble tulip umbrella vulture wagon yak zebra anchor biscuit canyon donkey feather goblet").split()
VALUE_WORDS = ("apple banjo candle dragon engine forest garlic helmet island jacket kitten ladder marble "
               "napkin oyster pepper rocket spoon tiger trumpet unicorn vessel window yogurt acorn button "
               "castle drum eagle fountain giraffe honey insect jelly koala lemon mirror noodle olive "
               "piano quilt robot sandal tomato turtle violet walnut").split()
SYLLABLES = [c + v for c in "bdfghklmnprstvz" for v in "aeiou"]


# ---------------------------------------------------------------- haystacks


def _read_documents(paths: Iterable[Path]) -> list[str]:
    """Sentences of the offline prose: markdown headings dropped, split after . ! ? before a capital."""
    sentences: list[str] = []
    for p in paths:
        text = Path(p).read_text(encoding="utf-8")
        paras = [ln.strip() for ln in text.split("\n\n")]
        body = " ".join(" ".join(para.split()) for para in paras if para and not para.startswith("#"))
        sentences += [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", body) if s]
    if not sentences:
        raise ValueError("no haystack sentences found in the documents")
    return sentences


@lru_cache(maxsize=8)
def essay_sentences(directory: str = str(DEFAULT_DOCUMENTS)) -> tuple[str, ...]:
    d = Path(directory)
    paths = sorted(d.glob("*.md")) + sorted(d.glob("*.txt")) if d.is_dir() else [d]
    return tuple(_read_documents(paths))


class WordStream:
    """Words of sentences repeated without end; repetition r > 0 shuffles the sentence order with a
    fixed RNG (`Random(r)`), so a haystack longer than the documents is not a verbatim loop."""

    def __init__(self, sentences: Sequence[str]) -> None:
        self.sentences = list(sentences)
        self.words: list[str] = []
        self._rep = 0

    def take(self, n: int) -> list[str]:
        while len(self.words) < n:
            order = list(self.sentences)
            if self._rep:
                Random(self._rep).shuffle(order)
            self.words += " ".join(order).split()
            self._rep += 1
        return self.words[:n]


@lru_cache(maxsize=8)
def _stream(kind: str, documents: str) -> WordStream:
    if kind == "noise":
        return WordStream([NOISE])
    return WordStream(essay_sentences(documents))


def insert_at_depths(words: list[str], items: Sequence[tuple[float, str]]) -> str:
    """Join `words` with each (depth in [0, 1], text) inserted after the sentence end nearest that depth
    (at the start for depth 0 or a haystack without sentence ends)."""
    ends = [i + 1 for i, w in enumerate(words) if w.endswith((".", "!", "?"))]
    out = list(words)
    placed = []
    for depth, text in items:
        target = depth * len(words)
        pos = min(ends, key=lambda e: abs(e - target)) if ends and depth > 0 else 0
        placed.append((pos, text))
    # insert from the back so earlier positions stay valid; stable for equal positions (keeps order)
    for pos, text in sorted(placed, key=lambda t: t[0], reverse=True):
        out.insert(pos, text)
    return " ".join(out)


# ---------------------------------------------------------------- random values


def _key(rng: Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"
        if k not in used:
            used.add(k)
            return k


def _value(rng: Random, kind: str, used: set[str]) -> str:
    while True:
        if kind == "number":
            v = str(rng.randint(1_000_000, 9_999_999))
        elif kind == "word":
            a, b = rng.sample(VALUE_WORDS, 2)
            v = f"{a}-{b}"
        elif kind == "uuid":
            v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        else:
            raise ValueError(f"needle value type {kind}: choose {'number, word, uuid'}")
        if v not in used:
            used.add(v)
            return v


def pseudo_words(rng: Random, n: int, exclude: Iterable[str] = ()) -> list[str]:
    """`n` distinct pronounceable non-words of 2-3 syllables."""
    seen = set(exclude)
    out: list[str] = []
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3))))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@lru_cache(maxsize=8)
def _document_vocabulary(documents: str) -> tuple[str, ...]:
    words = {w.lower() for s in essay_sentences(documents) for w in re.findall(r"[A-Za-z]+", s)}
    return tuple(sorted(w for w in words if len(w) >= 4))
