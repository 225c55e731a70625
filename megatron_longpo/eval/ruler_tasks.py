"""RULER's 13 tasks as RULER defines them (Hsieh et al. 2024; NVIDIA/RULER `scripts/synthetic.yaml`,
`scripts/data/synthetic/constants.py` and the generators beside it), regenerated offline.

Same as RULER: the task set and arguments (haystack kind, key/value kinds, needle counts), the
templates and answer prefixes, the generation budgets (`tokens_to_generate`), the metrics
(string_match_all; string_match_part for QA), the depths (40 levels 0-100 % for the essay haystack),
the key words (wonderwords' adjective-noun pairs), vt's one-shot example, cwe's one-shot example and
its frequencies (30/3, or 6/1 below 4K), fwe's Zipf counts, qa's "Document i:" layout, and the
length rule: prompt tokens + the generation budget <= the asked length, counted with the evaluated
model's tokenizer.

Where this departs from RULER (docs/evaluation.md):
- the prompt is the model's chat template around the task text, and the answer prefix starts the
  assistant turn (RULER appends it to its own model template the same way), leading space dropped;
- randomness is per sample (`Random(f"{seed}:{task}:{length}:{index}")`), so sample i is the same
  whatever the number of samples;
- a sample must also be at least (1 - tolerance) x the length (2 %; 15 % for qa, whose documents
  are whole paragraphs), unless one more unit of its haystack (a line, a document) would overshoot;
- the haystack and QA sets are RULER's files when given, else the offline ones of eval/corpus.py.
"""

from __future__ import annotations

import re
import string
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from random import Random

from megatron_longpo.eval.corpus import Haystack, QASet
from megatron_longpo.eval.length_fit import PER_TOKEN, Fitter, LengthError  # noqa: F401 - LengthError re-exported

# count(user_text, answer_prefix) -> tokens of the whole model input
CountFn = Callable[[str, str], int]

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = [round(100 * i / 39) for i in range(40)]  # np.round(np.linspace(0, 100, 40)).astype(int)

TEMPLATES = {
    "niah": {
        "tokens_to_generate": 128, "metric": "all",
        "template": "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
                    "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
                    "magic {type_needle_v} for {query} mentioned in the provided text?",
        "answer_prefix": " The special magic {type_needle_v} for {query} mentioned in the provided text are"},
    "variable_tracking": {
        "tokens_to_generate": 30, "metric": "all",
        "template": "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
                    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        "answer_prefix": " Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
                         "variables are assigned the value {query}, they are: "},
    "common_words_extraction": {
        "tokens_to_generate": 120, "metric": "all",
        "template": "Below is a numbered list of words. In these words, some appear more often than others. "
                    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the 10 most common "
                    "words in the above list?",
        "answer_prefix": " Answer: The top 10 words that appear most often in the list are:"},
    "freq_words_extraction": {
        "tokens_to_generate": 50, "metric": "all",
        "template": "Read the following coded text and track the frequency of each coded word. Find the three most "
                    "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
                    "ignore the dots '....'. What are the three most frequently appeared words in the above coded "
                    "text?",
        "answer_prefix": " Answer: According to the coded text above, the three most frequently appeared words are:"},
    "qa": {
        "tokens_to_generate": 32, "metric": "part",
        "template": "Answer the question based on the given documents. Only give me the answer and do not output any "
                    "other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the question based on "
                    "the given documents. Only give me the answer and do not output any other words.\n\nQuestion: "
                    "{query}",
        "answer_prefix": " Answer:"},
}


def _niah(haystack, k, v, nk=1, nv=1, nq=1):
    return ("niah", {"type_haystack": haystack, "type_needle_k": k, "type_needle_v": v, "num_needle_k": nk,
                     "num_needle_v": nv, "num_needle_q": nq})


# scripts/synthetic.yaml
TASKS: dict[str, tuple[str, dict]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", nk=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", nv=4),
    "niah_multiquery": _niah("essay", "words", "numbers", nq=4),
    "vt": ("variable_tracking", {"num_chains": 1, "num_hops": 4}),
    "cwe": ("common_words_extraction", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}),
    "fwe": ("freq_words_extraction", {"alpha": 2.0}),
    "qa_1": ("qa", {"dataset": "squad"}),
    "qa_2": ("qa", {"dataset": "hotpotqa"}),
}
RULER_TASKS = tuple(TASKS)
TOLERANCE = {"qa": 0.15}


@dataclass
class Sample:
    task: str
    length: int
    index: int
    prompt: str  # the user message
    answer_prefix: str  # the start of the assistant turn
    answers: list[str]
    metric: str  # "all" | "part"
    n_tokens: int  # the whole model input, counted by the evaluated model's tokenizer
    max_new_tokens: int
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- words


WORDS = Path(__file__).resolve().parent / "data" / "wonderwords"


@lru_cache(maxsize=1)
def _wonderwords() -> tuple[list[str], list[str], list[str]]:
    """RULER's own source of words: wonderwords' noun, adjective and verb lists (MIT; copied unchanged
    into data/wonderwords, read as wonderwords reads them: one word a line, trailing space stripped)."""
    def read(name: str) -> list[str]:
        return [w.rstrip() for w in (WORDS / name).read_text(encoding="utf-8").splitlines(keepends=True)]

    return read("nounlist.txt"), read("adjectivelist.txt"), read("verblist.txt")


def key_word(rng: Random) -> str:
    """An adjective-noun pair, as RULER's keys (it lists all 6.2M pairs first; drawing the two halves is
    the same distribution without the 20-second list)."""
    nouns, adjs, _ = _wonderwords()
    return f"{rng.choice(adjs)}-{rng.choice(nouns)}"


@lru_cache(maxsize=1)
def cwe_words() -> list[str]:
    nouns, adjs, verbs = _wonderwords()
    return sorted(set(nouns + adjs + verbs))


def _random(rng: Random, kind: str) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return key_word(rng)
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(kind)


def sentences(text: str) -> list[str]:
    """A plain sentence split (RULER uses nltk's punkt; its data is not fetched here)."""
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", text.strip()) if s]


# ---------------------------------------------------------------- task builders: each returns
# build(k) -> (user text, answer prefix, meta) for a size knob k, and the gold answers


def _niah(args: dict, rng: Random, hay: Haystack):
    nk, nv, nq = max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], args["num_needle_q"]
    tk, tv, th = args["type_needle_k"], args["type_needle_v"], args["type_haystack"]
    keys, values, needles = [], [], []
    for _ in range(nk):
        keys.append(_random(rng, tk))
        vals = [_random(rng, tv) for _ in range(nv)]
        values.append(vals)
        needles += [NEEDLE.format(type_needle_v=tv, key=keys[-1], value=v) for v in vals]
    rng.shuffle(needles)
    depths = sorted(rng.sample(DEPTHS, len(needles)))  # essay: sentence fraction; others: line fraction
    fractions = sorted(rng.random() for _ in needles)
    queried = rng.sample(range(nk), nq)
    queries = [keys[i] for i in queried]
    answers = [a for i in queried for a in values[i]]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix_t = TEMPLATES["niah"]["template"], TEMPLATES["niah"]["answer_prefix"]
    type_v = tv
    if nq * nv == 1:  # RULER's singular wording (its replacements, on template + answer prefix)
        for a, b in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix_t = template.replace(a, b), prefix_t.replace(a, b)
        type_v = tv[:-1]
    prefix = prefix_t.format(type_needle_v=type_v, query=query)
    distractor_rng = Random(rng.getrandbits(64))
    distractors: list[str] = []

    def build(k: int):
        if th == "essay":
            words = hay.words
            text = " ".join((words * (k // len(words) + 1))[:k])
            sents = sentences(text)
            pos = [int(len(sents) * d / 100) for d in depths]
            parts, last = [], 0
            for p, needle in zip(pos, needles):
                parts.append(" ".join(sents[last:p]))
                parts.append(needle)
                last = p
            parts.append(" ".join(sents[last:]))
            context = " ".join(x for x in parts if x)
            where = depths
        else:
            if th == "noise":
                lines = [NOISE] * k
            else:
                while len(distractors) < k:
                    distractors.append(NEEDLE.format(type_needle_v=tv, key=_random(distractor_rng, tk),
                                                     value=_random(distractor_rng, tv)))
                lines = distractors[:k]
            idx = [int(f * k) for f in fractions]
            lines = list(lines)
            for i, needle in sorted(zip(idx, needles), key=lambda t: -t[0]):
                lines.insert(i, needle)
            context = "\n".join(lines)
            where = [round(100 * f) for f in fractions]
        return template.format(type_needle_v=type_v, context=context, query=query), prefix, {"depths": where}

    return build, answers, {"keys": keys, "values": values, "queries": queries}


_VT_ICL_NOISE = 20  # RULER's one-shot example is built at 500 tokens: about 20 noise lines


def _vt_instance(rng: Random, k: int, hops: int, icl: bool):
    n = 3 if icl else 5
    names: list[str] = []
    while len(names) < hops + 1:
        v = "".join(rng.choices(string.ascii_uppercase, k=n))
        if v not in names:
            names.append(v)
    value = "12345" if icl else str(rng.randint(10000, 99998))
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    return names, value, chain


def _vt(args: dict, rng: Random, hay: Haystack):
    hops = args["num_hops"]
    t = TEMPLATES["variable_tracking"]
    template = t["template"] + t["answer_prefix"]
    # the one-shot example: an ICL instance with 3-letter names and value 12345, then renamed (randomize_icl)
    icl_names, _, icl_chain = _vt_instance(rng, _VT_ICL_NOISE, hops, icl=True)
    icl_pos = sorted(rng.sample(range(_VT_ICL_NOISE), len(icl_chain)))
    icl_lines = [NOISE] * _VT_ICL_NOISE
    for j, p in enumerate(icl_pos):
        icl_lines.insert(p + j, icl_chain[j])
    icl = template.format(context="\n".join(icl_lines).replace(". \n", ".\n"), query="12345", num_v=hops + 1)
    icl += " " + " ".join(icl_names) + "\n"
    for name in icl_names:
        icl = icl.replace(name, "".join(rng.choices(string.ascii_uppercase, k=len(name))))
    icl = icl.replace("12345", str(rng.randint(10000, 99998)))
    names, value, chain = _vt_instance(rng, 0, hops, icl=False)
    fractions = sorted(rng.random() for _ in chain)

    def build(k: int):
        lines = [NOISE] * k
        pos = sorted(min(k - 1, int(f * k)) if k else 0 for f in fractions)
        for j, p in enumerate(pos):
            lines.insert(p + j, chain[j])
        context = "\n".join(lines).replace(". \n", ".\n")
        return (icl + t["template"].format(context=context, query=value),
                t["answer_prefix"].format(query=value, num_v=hops + 1), {"depths": [round(100 * f) for f in fractions]})

    return build, names, {"value": value, "chain": [c.strip() for c in chain]}


def _cwe_example(rng: Random, words: list[str], num_words: int, cr: int, ur: int, cn: int):
    chosen = rng.sample(words, num_words)
    common, uncommon = chosen[:cn], chosen[cn:]
    word_list = common * cr + uncommon * ur
    rng.shuffle(word_list)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(word_list)), common


def _cwe(args: dict, rng: Random, hay: Haystack, length: int):
    t = TEMPLATES["common_words_extraction"]
    template = t["template"] + t["answer_prefix"]
    words = list(cwe_words())
    rng.shuffle(words)
    cn = args["num_cw"]
    if length < 4096:
        shot, (cr, ur) = (20, 3, 1), (6, 1)
    else:
        shot, (cr, ur) = (40, 10, 3), (args["freq_cw"], args["freq_ucw"])
    ex_ctx, ex_ans = _cwe_example(rng, words, shot[0], shot[1], shot[2], cn)
    example = template.format(context=ex_ctx) + " " + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans))
    seed = rng.getrandbits(64)
    common = Random(seed).sample(words, cn)

    def build(k: int):
        r = Random(seed)
        n = max(cn + 1, k)
        chosen = r.sample(words, min(n, len(words)))  # first cn are `common` for every k
        ctx_words = chosen[:cn] * cr + chosen[cn:] * ur
        Random(seed + 1).shuffle(ctx_words)
        ctx = " ".join(f"{i + 1}. {w}" for i, w in enumerate(ctx_words))
        return example + "\n" + t["template"].format(context=ctx), t["answer_prefix"], {}

    return build, common, {"freq_cw": cr, "freq_ucw": ur}


def _fwe(args: dict, rng: Random, hay: Haystack, length: int, coded_wordlen: int = 6):
    t = TEMPLATES["freq_words_extraction"]
    alpha = args["alpha"]
    vocab_size = max(10, (length - t["tokens_to_generate"]) // 50)
    vocab: list[str] = []
    seen: set[str] = set()
    while len(vocab) < vocab_size:
        w = "".join(rng.choices(string.ascii_lowercase, k=coded_wordlen))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab.sort()
    rng.shuffle(vocab)
    vocab[0] = "..."  # RULER: the top-ranked word is noise
    zeta = sum(k ** -alpha for k in range(1, 100000)) + 100000 ** (1 - alpha) / (alpha - 1)
    seed = rng.getrandbits(64)

    def build(k: int):
        counts = [int(k * (r + 1) ** -alpha / zeta) for r in range(len(vocab))]
        items = [w for w, c in zip(vocab, counts) for _ in range(c)]
        Random(seed).shuffle(items)
        return t["template"].format(context=" ".join(items)), t["answer_prefix"], {}

    return build, vocab[1:4], {"alpha": alpha, "vocab_size": vocab_size}


def _qa(args: dict, rng: Random, qa: QASet, index: int):
    t = TEMPLATES["qa"]
    # RULER takes question `index` of the set; the stand-in serves qa_1 and qa_2, so qa_2 starts half-way
    offset = len(qa.qas) // 2 if qa.standin and args["dataset"] == "hotpotqa" else 0
    q = qa.qas[(index + offset) % len(qa.qas)]
    gold, more = list(q["context"]), list(q.get("more_context", []))
    rng.shuffle(more)
    others = [i for i in range(len(qa.docs)) if i not in set(gold) | set(more)]
    rng.shuffle(others)
    order_seed = rng.getrandbits(64)

    def build(k: int):
        k = max(k, len(gold))
        chosen = (gold + more + others)[:k]
        if k > len(qa.docs):
            chosen = (list(range(len(qa.docs))) * (k // len(qa.docs) + 1))[:k]
        Random(order_seed).shuffle(chosen)
        context = "\n\n".join(f"Document {i + 1}:\n{qa.docs[d]}" for i, d in enumerate(chosen))
        gold_at = [chosen.index(g) for g in gold if g in chosen]
        return (t["template"].format(context=context, query=q["query"]), t["answer_prefix"],
                {"depths": [round(100 * (p + 0.5) / len(chosen)) for p in gold_at]})

    return build, list(q["outputs"]), {"question": q["query"], "dataset": qa.name, "stand_in": qa.standin}


# ---------------------------------------------------------------- samples


def generate_sample(task: str, length: int, index: int, count: CountFn, haystack: Haystack,
                    qa_sets: dict[str, QASet] | None = None, seed: int = 0, tolerance: float = 0.02,
                    fitter: Fitter | None = None) -> Sample:
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}: choose from {', '.join(RULER_TASKS)}")
    family, args = TASKS[task]
    rng = Random(f"{seed}:{task}:{length}:{index}")
    t = TEMPLATES[family]
    if family == "niah":
        build, answers, meta = _niah(args, rng, haystack)
        kind = args["type_haystack"]
    elif family == "variable_tracking":
        build, answers, meta = _vt(args, rng, haystack)
        kind = family
    elif family == "common_words_extraction":
        build, answers, meta = _cwe(args, rng, haystack, length)
        kind = family
    elif family == "freq_words_extraction":
        build, answers, meta = _fwe(args, rng, haystack, length)
        kind = family
    else:
        if not qa_sets or args["dataset"] not in qa_sets:
            raise ValueError(f"{task} needs a {args['dataset']} QA set")
        build, answers, meta = _qa(args, rng, qa_sets[args["dataset"]], index)
        kind = family
    tol = max(tolerance, TOLERANCE.get(family, 0.0))
    fitter = fitter or Fitter()
    k, n, user, prefix, extra = fitter.fit((task, length), build, count, t["tokens_to_generate"], length, tol,
                                           PER_TOKEN[kind])
    meta = {**meta, **extra, "size": k}
    return Sample(task, length, index, user, prefix.lstrip(), answers, t["metric"], n, t["tokens_to_generate"],
                  meta)


def generate(tasks: Sequence[str], lengths: Sequence[int], samples: int, count: CountFn, haystack: Haystack,
             qa_sets: dict[str, QASet] | None = None, seed: int = 0, tolerance: float = 0.02,
             progress: Callable[[int], None] | None = None) -> list[Sample]:
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown RULER task {t!r}: choose from {', '.join(RULER_TASKS)}")
    fitter = Fitter()
    out = []
    for n in lengths:
        for t in tasks:
            for i in range(samples):
                out.append(generate_sample(t, n, i, count, haystack, qa_sets, seed, tolerance, fitter))
                if progress:
                    progress(1)
    return out


def chat_counter(tokenizer) -> tuple[CountFn, Callable[[str, str], list[int]]]:
    """(count, ids): the model input is the chat template around the user text with the generation
    prompt (the template's system prompt included), then the answer prefix; tokenized without extra
    special tokens -- exactly what the evaluation feeds the model."""

    def ids(user: str, prefix: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text + prefix.lstrip(), add_special_tokens=False)["input_ids"]

    return (lambda user, prefix: len(ids(user, prefix))), ids
