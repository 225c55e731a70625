"""RULER-style synthetic long-context tasks, regenerated offline at chosen token lengths, and their scoring.

Pure: no model, no I/O beyond reading the offline haystack documents you pass in. Token lengths are
measured by a `count(prompt) -> int` function that the caller supplies; `chat_prompt_counter(tokenizer)`
builds the one used by `tools/eval_long.py`: the tokenizer's chat template applied to the single user
message `prompt` with the generation prompt added (the system prompt the template inserts included),
then tokenized without extra special tokens -- exactly the ids `TransformersBackend` feeds the model.

Tasks (after RULER, Hsieh et al. 2024, `scripts/data/synthetic`):

- `niah_single`     one needle "One of the special magic numbers for {key} is: {value}." in the haystack;
                    asked for that key's value.
- `niah_multikey`   four needles with different keys; asked for one key (the others are distractors).
- `niah_multivalue` four needles with the same key and different values; asked for all four.
- `niah_multiquery` four needles with different keys; asked for all four keys' values.
- `vt`              variable tracking: "VAR ABCDE = 12345." then four hops "VAR FGHIJ = VAR ABCDE." hidden
                    in a noise haystack; asked for every variable that holds the value (five names).
- `cwe`             common-word extraction: a numbered list of words; ten words appear `freq_cw` times,
                    the others at most `freq_ucw` times; asked for the ten most common.
- `fwe`             frequent-word extraction: "coded" pseudo-words drawn with Zipf (alpha 2) frequencies;
                    asked for the three most frequent.

Needle tasks take a value type suffix: `_number` (7 digits, the default), `_word` (a hyphenated pair of
words) or `_uuid` (a UUID4 drawn from the seeded RNG, not `uuid.uuid4()`), e.g. `niah_single_uuid`.
Keys are hyphenated adjective-noun pairs; neither keys nor values occur in the haystacks.

Scoring is RULER's: `all` (string_match_all) -- the fraction of gold strings found, case-insensitively,
as sub-strings of the output -- for every task here (for single-answer tasks it equals `part`); `part`
(string_match_part) -- 1 if any gold string is found -- is RULER's metric for QA and is used by the
retention QA set (eval/retention.py). Scores are reported x100.

Length control: each sample's prompt is built from a size knob (haystack words, list entries) and the
knob is binary-searched for the largest prompt with `count(prompt) <= length`; a sample is accepted
only if `count(prompt) >= (1 - tolerance) * length` (tolerance 2 %), so prompts never exceed the asked
length. Everything random comes from `random.Random(f"{seed}:{task}:{length}:{index}")`: the same seed
gives the same prompts and answers on every machine and Python version.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from random import Random
from typing import Callable, Sequence

from megatron_longpo.eval.haystack import (  # noqa: F401 - re-exported: the tasks' raw material
    DEFAULT_DOCUMENTS, NOISE, KEY_ADJECTIVES, KEY_NOUNS, VALUE_WORDS, SYLLABLES, _read_documents, essay_sentences,
    WordStream, _stream, insert_at_depths, _key, _value, pseudo_words, _document_vocabulary,
)

CountFn = Callable[[str], int]

VALUE_TYPES = ("number", "word", "uuid")
BASE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
DEFAULT_TASKS = BASE_TASKS
# RULER's generation budgets per task (tokens).
MAX_NEW_TOKENS = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}
METRIC = {"niah": "all", "vt": "all", "cwe": "all", "fwe": "all"}

NIAH_TEMPLATE = ("Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the {kind} afterwards.\n{context}\n"
                 "What {are} the special magic {kind} for {query} mentioned in the provided text? "
                 "Answer with the {kind} only.")
NEEDLE = "One of the special magic {kind} for {key} is: {value}."
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
               "{context}\nQuestion: Find all variables that are assigned the value {value} in the text above. "
               "Answer with the variable names only.")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than others. "
                "Memorize the ones that appear most often.\n{context}\n"
                "Question: What are the 10 most common words in the above list? Answer with the words only.")
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                "frequently appeared coded words.\n{context}\n"
                "Question: Do not provide any explanation. Please ignore the dots '....'. What are the three "
                "most frequently appeared words in the above coded text?")


class LengthError(ValueError):
    """The asked length cannot be reached within the tolerance (too short for the task's fixed text)."""


@dataclass
class Sample:
    task: str
    length: int  # asked token count
    index: int
    prompt: str  # the user message
    answers: list[str]
    metric: str  # "all" | "part"
    n_tokens: int  # measured by the counter
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- scoring


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_all: fraction of gold strings found (case-insensitive sub-string)."""
    if not answers:
        raise ValueError("no gold answers")
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """RULER's string_match_part: 1 if any gold string is found (case-insensitive sub-string)."""
    if not answers:
        raise ValueError("no gold answers")
    pred = prediction.lower()
    return float(any(a.lower() in pred for a in answers))


SCORERS = {"all": string_match_all, "part": string_match_part}


def score(prediction: str, answers: Sequence[str], metric: str) -> float:
    return SCORERS[metric](prediction.strip(), answers)


# ---------------------------------------------------------------- length fitting


def fit_length(build: Callable[[int], str], count: CountFn, length: int, tolerance: float = 0.02,
               start: int = 64) -> tuple[int, str, int]:
    """Largest knob k with count(build(k)) <= length (binary search; build is ~monotone in k).
    Returns (k, prompt, tokens); raises LengthError if the result is below (1 - tolerance) * length."""
    lo_prompt = build(0)
    lo_tokens = count(lo_prompt)
    if lo_tokens > length:
        raise LengthError(f"the task's fixed text alone is {lo_tokens} tokens, more than the asked {length}")
    lo, hi = 0, max(1, start)
    while True:  # grow hi until it overshoots
        n = count(build(hi))
        if n > length:
            break
        lo, lo_tokens = hi, n
        hi *= 2
    best = (lo, None, lo_tokens)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        n = count(build(mid))
        if n <= length:
            lo, best = mid, (mid, None, n)
        else:
            hi = mid
    k = best[0]
    prompt = build(k)
    tokens = count(prompt)
    # non-monotone builds (re-shuffled lists) may leave a gap: creep up while it still fits
    for step in range(1, 9):
        if tokens >= (1 - tolerance) * length:
            break
        cand = build(k + step)
        n = count(cand)
        if n <= length and n > tokens:
            prompt, tokens = cand, n
    if tokens < (1 - tolerance) * length or tokens > length:
        raise LengthError(f"could not fit a prompt within {tolerance:.0%} of {length} tokens (got {tokens})")
    return k, prompt, tokens


# ---------------------------------------------------------------- tasks


def parse_task(name: str) -> tuple[str, str | None]:
    """'niah_single_uuid' -> ('niah_single', 'uuid'); 'vt' -> ('vt', None)."""
    for vt in VALUE_TYPES:
        if name.endswith("_" + vt) and name[: -len(vt) - 1] in BASE_TASKS and name.startswith("niah"):
            return name[: -len(vt) - 1], vt
    if name not in BASE_TASKS:
        raise ValueError(f"unknown task {name!r}: choose from {', '.join(BASE_TASKS)} "
                         f"(niah_* also with a suffix _number, _word or _uuid)")
    return name, ("number" if name.startswith("niah") else None)


def _family(base: str) -> str:
    return "niah" if base.startswith("niah") else base


def _niah(base: str, value_type: str, rng: Random, documents: str):
    kinds = {"number": "numbers", "word": "words", "uuid": "uuids"}
    kind = kinds[value_type]
    keys_used: set[str] = set()
    vals_used: set[str] = set()
    if base == "niah_single":
        k = _key(rng, keys_used)
        needles = [(k, _value(rng, value_type, vals_used))]
        query_keys = [k]
    elif base == "niah_multikey":
        needles = [(_key(rng, keys_used), _value(rng, value_type, vals_used)) for _ in range(4)]
        query_keys = [needles[0][0]]
    elif base == "niah_multivalue":
        k = _key(rng, keys_used)
        needles = [(k, _value(rng, value_type, vals_used)) for _ in range(4)]
        query_keys = [k]
    elif base == "niah_multiquery":
        needles = [(_key(rng, keys_used), _value(rng, value_type, vals_used)) for _ in range(4)]
        query_keys = [k for k, _ in needles]
    else:
        raise ValueError(base)
    order = list(needles)
    rng.shuffle(order)
    depths = sorted(rng.random() for _ in order)
    items = [(d, NEEDLE.format(kind=kind, key=k, value=v)) for d, (k, v) in zip(depths, order)]
    answers = [v for k, v in needles if k in query_keys]
    query = query_keys[0] if len(query_keys) == 1 else ", ".join(query_keys[:-1]) + " and " + query_keys[-1]
    are = "is" if len(answers) == 1 else "are all"
    stream = _stream("essay", documents)

    def build(n: int) -> str:
        ctx = insert_at_depths(stream.take(n), items)
        return NIAH_TEMPLATE.format(kind=kind, context=ctx, query=query, are=are)

    meta = {"needles": [{"key": k, "value": v} for k, v in needles], "depths": depths, "value_type": value_type}
    return build, answers, meta


def _vt(rng: Random, documents: str, hops: int = 4):
    names: list[str] = []
    while len(names) < hops + 1:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    value = str(rng.randint(10000, 99999))
    stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in stmts)
    items = list(zip(depths, stmts))
    stream = _stream("noise", documents)

    def build(n: int) -> str:
        return VT_TEMPLATE.format(context=insert_at_depths(stream.take(n), items), value=value)

    return build, list(names), {"value": value, "chain": stmts, "depths": depths}


def cwe_frequencies(length: int) -> tuple[int, int]:
    """(freq_cw, freq_ucw): RULER uses 30 and 3 at long lengths; shorter prompts cannot hold 10 x 30
    entries, so both shrink with the length (always freq_ucw < freq_cw)."""
    freq_cw = min(30, max(2, length // 256))
    return freq_cw, min(3, max(1, freq_cw // 4))


def _cwe(rng: Random, length: int, documents: str, num_cw: int = 10):
    freq_cw, freq_ucw = cwe_frequencies(length)
    vocab = list(_document_vocabulary(documents))
    rng.shuffle(vocab)
    common, rest = vocab[:num_cw], vocab[num_cw:]
    list_seed = rng.getrandbits(64)
    cache: dict[int, list[str]] = {}

    def uncommon(n_words: int) -> list[str]:
        nonlocal rest
        if n_words > len(rest):
            rest = rest + pseudo_words(Random(list_seed + len(rest)), n_words - len(rest) + 64,
                                       exclude=set(rest) | set(common))
        return rest[:n_words]

    def entries(k: int) -> list[str]:
        if k not in cache:
            ucw = uncommon((k + freq_ucw - 1) // freq_ucw)
            items = common * freq_cw + [ucw[i // freq_ucw] for i in range(k)]
            Random(list_seed).shuffle(items)
            cache[k] = items
        return cache[k]

    def build(k: int) -> str:
        ctx = "\n".join(f"{i + 1}. {w}" for i, w in enumerate(entries(k)))
        return CWE_TEMPLATE.format(context=ctx)

    return build, list(common), {"freq_cw": freq_cw, "freq_ucw": freq_ucw, "entries": entries}


def zipf_counts(n_words: int, vocab_size: int, alpha: float = 2.0) -> list[int]:
    """Counts summing to n_words with count_r ~ n_words / r**alpha (largest remainders)."""
    weights = [1 / (r + 1) ** alpha for r in range(vocab_size)]
    total = sum(weights)
    raw = [n_words * w / total for w in weights]
    counts = [int(x) for x in raw]
    for r in sorted(range(vocab_size), key=lambda r: (counts[r] - raw[r], r))[: n_words - sum(counts)]:
        counts[r] += 1
    return counts


def _fwe(rng: Random, documents: str, alpha: float = 2.0, vocab_size: int = 800):
    vocab = pseudo_words(rng, vocab_size)
    seed = rng.getrandbits(64)
    top3 = vocab[:3]
    cache: dict[int, list[str]] = {}

    def words(k: int) -> list[str]:
        if k not in cache:
            counts = zipf_counts(k, min(vocab_size, max(4, k // 4)), alpha)
            items = [w for w, c in zip(vocab, counts) for _ in range(c)]
            Random(seed).shuffle(items)
            cache[k] = items
        return cache[k]

    def build(k: int) -> str:
        ws = words(k)
        ctx = " ".join(w + (" ...." if (i + 1) % 10 == 0 else "") for i, w in enumerate(ws))
        return FWE_TEMPLATE.format(context=ctx)

    return build, top3, {"alpha": alpha, "words": words}


def generate_sample(task: str, length: int, index: int, count: CountFn, seed: int = 0,
                    documents: str | Path = DEFAULT_DOCUMENTS, tolerance: float = 0.02) -> Sample:
    base, value_type = parse_task(task)
    rng = Random(f"{seed}:{task}:{length}:{index}")
    documents = str(documents)
    fam = _family(base)
    if fam == "niah":
        build, answers, meta = _niah(base, value_type or "number", rng, documents)
    elif base == "vt":
        build, answers, meta = _vt(rng, documents)
    elif base == "cwe":
        build, answers, meta = _cwe(rng, length, documents)
    else:
        build, answers, meta = _fwe(rng, documents)
    k, prompt, tokens = fit_length(build, count, length, tolerance)
    meta = {m: v for m, v in meta.items() if not callable(v)}
    meta["size"] = k
    if base == "fwe":  # require an unambiguous top 3 (checked, not assumed)
        c = Counter(w for w in re.findall(r"[a-z]+", prompt.split("\n", 1)[1].rsplit("\nQuestion:", 1)[0]))
        top = c.most_common(4)
        if len(top) < 4 or top[2][1] <= top[3][1]:
            raise LengthError(f"fwe at {length} tokens: the three most frequent words are not unique")
    return Sample(task, length, index, prompt, answers, METRIC[fam], tokens, MAX_NEW_TOKENS[fam], meta)


def generate_tasks(tasks: Sequence[str], lengths: Sequence[int], samples: int, count: CountFn, seed: int = 0,
                   documents: str | Path = DEFAULT_DOCUMENTS, tolerance: float = 0.02) -> list[Sample]:
    for t in tasks:
        parse_task(t)  # fail on a typo before any work
    return [generate_sample(t, n, i, count, seed, documents, tolerance)
            for t in tasks for n in lengths for i in range(samples)]


def chat_prompt_counter(tokenizer) -> CountFn:
    """Tokens of the full chat-formatted prompt: the template applied to [{"role": "user", "content":
    prompt}] with add_generation_prompt=True (system prompt of the template included), tokenized with
    add_special_tokens=False -- the ids `TransformersBackend` generates from."""

    def count(prompt: str) -> int:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return count
