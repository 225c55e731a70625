"""SoLoPO pairs (docs/methods.md §3): supporting + distractor contexts, sampling on the short context, sub-EM.

Input: multi-hop QA records. The native schema, one JSON object per line:

    {"id": "q1",                                  # optional (else a hash of question + answers)
     "question": "Who ...?",
     "answers": ["gold", "alias", ...],           # or "answer": "gold" (+ "answer_aliases": [...])
     "paragraphs": [{"title": "...", "text": "...", "is_supporting": true}, ...]}

MuSiQue lines (`paragraph_text`, `answer`, `answer_aliases`) and HotpotQA lines (`_id`,
`context: [[title, [sentences]]]`, `supporting_facts: [[title, i]]`) are read as they are.

For each record:
- short context `x_S` = its supporting passages, in their order;
- long context `x_L` = the same passages shuffled among distractors up to `target_long_tokens`:
  the record's own non-supporting passages first, then passages of other records (never one
  whose title is a supporting title or whose text contains a gold answer); the seed, the record
  id and the passage order fix the draw;
- `n_samples` chain-of-thought responses are sampled on `x_S` only (paper: 32 at T 0.85): the
  instruction asks for the reasoning, then a last line "Answer: <answer>";
- the final answer of each response is extracted (`extract_final_answer`: the last "Answer:" /
  "Final answer:" line, "the answer is ...", or \\boxed{...}) and scored by sub-string exact
  match against the gold answers, both normalised as in SQuAD / MuSiQue (lower-case, punctuation
  and articles removed, whitespace collapsed). A response without a final answer is neither
  chosen nor rejected (counted: `samples_no_final_answer`). `final_answer=False` scores the whole
  response instead (short-answer prompts);
- chosen = a correct response, rejected = a wrong one (the whole response, reasoning included),
  each drawn at random among the distinct candidates. Records with no correct or no wrong
  response are counted and produce nothing.
Output line: `{"short_context", "long_context", "instruction", "chosen", "rejected", "meta"}`.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .answers import extract_final_answer, normalize_answer, sub_exact_match
from .backends import GenerationBackend, GenerationError, SamplingParams
from .filters import AnswerFilter
from .output import FailureStreak, ResumableJsonl, RunStats, iter_jsonl, meta_id
from .text import TokenCounter

# Chain-of-thought sampling (the SoLoPO paper samples reasoning, then the final answer): the last
# line carries the answer that `extract_final_answer` reads and sub-EM scores.
DEFAULT_INSTRUCTION = (
    "Answer the question based on the passages above. Think step by step: first work out which "
    "passages are relevant and how they connect, then give your final answer on the last line, "
    "in the form \"Answer: <answer>\", where <answer> is as short as possible (a name, a date, a "
    "number or a short phrase).\n\nQuestion: {question}"
)
# The short-answer prompt (the whole response is scored): `final_answer=False`.
SHORT_ANSWER_INSTRUCTION = "Answer the question based on the documents above. Give a short answer.\n\nQuestion: {question}"
TEMPLATE_OVERHEAD_TOKENS = 8
PASSAGE_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class Passage:
    title: str
    text: str
    supporting: bool = False


@dataclass(frozen=True)
class QARecord:
    id: str
    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]

    @property
    def supporting(self) -> list[Passage]:
        return [p for p in self.passages if p.supporting]


# ---------------------------------------------------------------- reading records


def _str_list(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(x) for x in v]


def qa_record_from_dict(row: dict, where: str = "") -> QARecord:
    """A record in the native, MuSiQue or HotpotQA schema (see the module doc)."""
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: no 'question' string")
    answers = _str_list(row.get("answers")) or (_str_list(row.get("answer")) + _str_list(row.get("answer_aliases")))
    answers = [a for a in dict.fromkeys(a.strip() for a in answers) if a]
    if not answers:
        raise ValueError(f"{where}: no gold answer ('answers' list or 'answer')")
    passages: list[Passage] = []
    if "paragraphs" in row:
        for p in row["paragraphs"]:
            text = p.get("text", p.get("paragraph_text"))
            if not isinstance(text, str):
                raise ValueError(f"{where}: a paragraph has no 'text' (or 'paragraph_text')")
            passages.append(Passage(str(p.get("title", "")), text, bool(p.get("is_supporting", False))))
    elif "context" in row:  # HotpotQA
        support = {str(t) for t, *_ in row.get("supporting_facts", [])}
        for title, sents in row["context"]:
            text = "".join(sents) if isinstance(sents, list) else str(sents)
            passages.append(Passage(str(title), text, str(title) in support))
    else:
        raise ValueError(f"{where}: no 'paragraphs' (native / MuSiQue) or 'context' (HotpotQA)")
    rid = row.get("id", row.get("_id"))
    if rid in (None, ""):
        rid = hashlib.sha1(f"{question}\x00{answers}".encode()).hexdigest()[:16]
    return QARecord(str(rid), question.strip(), tuple(answers), tuple(passages))


def read_qa_records(path: str | Path, stats: RunStats | None = None) -> list[QARecord]:
    """All records of a JSONL file (or every .jsonl in a directory); malformed records are counted
    as dropped ("record_malformed") when `stats` is given, else raise."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    files = sorted(path.rglob("*.jsonl")) if path.is_dir() else [path]
    out: list[QARecord] = []
    for f in files:
        for lineno, row in iter_jsonl(f):
            try:
                out.append(qa_record_from_dict(row, f"{f}:{lineno}"))
            except ValueError as e:
                if stats is None:
                    raise
                stats.drop("record_malformed")
                stats.fail("malformed", f"{f}:{lineno}", e)
    return out


# ---------------------------------------------------------------- contexts


def format_passage(i: int, p: Passage) -> str:
    return f"Passage {i} ({p.title})\n{p.text}" if p.title else f"Passage {i}\n{p.text}"


def join_passages(passages: Sequence[Passage]) -> str:
    return PASSAGE_SEPARATOR.join(format_passage(i + 1, p) for i, p in enumerate(passages))


def _random_indices(n: int, rng: random.Random):
    """A random order of range(n), drawn lazily (a large pool is never shuffled whole)."""
    if n <= 4096:
        order = list(range(n))
        rng.shuffle(order)
        yield from order
        return
    seen: set[int] = set()
    while len(seen) < n:
        i = rng.randrange(n)
        if i not in seen:
            seen.add(i)
            yield i


def build_long_context(
    record: QARecord, pool: Sequence[Passage], counter: TokenCounter, target_tokens: int, rng: random.Random,
    max_misses: int = 64,
) -> tuple[str, int, int]:
    """The supporting passages shuffled among distractors, as long as fits `target_tokens`.
    Distractors: the record's own non-supporting passages, then random passages of the pool that
    share no title with a supporting passage and contain no gold answer. Stops at the target, or
    after `max_misses` candidates in a row that do not fit. Returns (text, tokens, distractors)."""
    support = record.supporting
    titles = {p.title for p in support}
    own_keys = {(p.title, p.text) for p in record.passages}
    golds = [g for g in (normalize_answer(a) for a in record.answers) if g]
    own = [p for p in record.passages if not p.supporting]
    rng.shuffle(own)

    def candidates():
        yield from own
        for i in _random_indices(len(pool), rng):
            p = pool[i]
            if p.title in titles or (p.title, p.text) in own_keys:
                continue
            if any(g in normalize_answer(p.text) for g in golds):
                continue
            yield p

    chosen: list[Passage] = []
    total = counter.count(join_passages(support))
    sep = max(0, counter.count(f"x{PASSAGE_SEPARATOR}x") - 2 * counter.count("x"))
    misses = 0
    for p in candidates():
        cost = counter.count(format_passage(len(support) + len(chosen) + 1, p)) + sep
        if total + cost > target_tokens:
            misses += 1
            if misses >= max_misses:
                break
            continue
        misses = 0
        chosen.append(p)
        total += cost
        if total >= target_tokens * 0.98:
            break
    while True:
        order = support + chosen
        rng.shuffle(order)
        text = join_passages(order)
        n = counter.count(text)
        if n <= target_tokens or not chosen:
            return text, n, len(chosen)
        chosen.pop()  # the additive estimate overshot: drop a distractor and reshuffle


# ---------------------------------------------------------------- the pipeline


@dataclass(frozen=True)
class SoLoPOConfig:
    target_long_tokens: int = 7500
    n_samples: int = 32
    sampling: SamplingParams = SamplingParams(max_new_tokens=1024, temperature=0.85, top_p=1.0)
    instruction_template: str = DEFAULT_INSTRUCTION
    final_answer: bool = True  # score the extracted final answer (False: the whole response)
    max_pair_tokens: int = 32768
    seed: int = 0
    records_per_batch: int = 8
    max_consecutive_failures: int = 8
    # refusals and loops are not chosen; short answers are fine (min_long_words=0)
    chosen_filter: AnswerFilter = field(default_factory=lambda: AnswerFilter(max_repeated_word_share=0.9,
                                                                             min_long_words=0))

    def __post_init__(self) -> None:
        if "{question}" not in self.instruction_template:
            raise ValueError("the instruction template must contain {question}")
        if self.n_samples < 2:
            raise ValueError("need at least 2 samples per record to find a correct and a wrong answer")


class SoLoPOBuilder:
    def __init__(self, backend: GenerationBackend, counter: TokenCounter, config: SoLoPOConfig,
                 stats: RunStats | None = None) -> None:
        self.backend = backend
        self.counter = counter
        self.cfg = config
        self.stats = stats or RunStats()
        self._failures = FailureStreak(config.max_consecutive_failures, "records")

    def _contexts(self, rec: QARecord, pool: Sequence[Passage]) -> dict | None:
        cfg, st = self.cfg, self.stats
        if not rec.supporting:
            st.drop("record_no_supporting_passage")
            return None
        rng = random.Random(f"{cfg.seed}:{rec.id}")
        short = join_passages(rec.supporting)
        long_text, long_tokens, n_distract = build_long_context(rec, pool, self.counter, cfg.target_long_tokens, rng)
        if n_distract == 0:
            st.drop("record_no_distractor")
            return None
        if long_tokens < 0.5 * cfg.target_long_tokens:
            st.count("long_context_under_half_target")
        return {"short": short, "long": long_text, "long_tokens": long_tokens, "n_distractors": n_distract,
                "instruction": cfg.instruction_template.replace("{question}", rec.question), "rng": rng}

    def run_batch(self, records: list[QARecord], pool: Sequence[Passage], out: ResumableJsonl) -> None:
        cfg, st = self.cfg, self.stats
        ready = []
        for rec in records:
            ctx = self._contexts(rec, pool)
            if ctx is None:
                out.settle(rec.id, "no_context")
            else:
                ready.append((rec, ctx))
        if not ready:
            return
        convs = [[{"role": "user", "content": f"{ctx['short']}\n\n{ctx['instruction']}"}] for _, ctx in ready]
        params = SamplingParams(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p,
                                cfg.n_samples, cfg.seed if cfg.sampling.seed is None else cfg.sampling.seed,
                                cfg.sampling.stop)
        try:
            outs = list(self.backend.chat(convs, params))
        except GenerationError as e:
            for i, err in e.errors.items():
                st.fail("sample_request", ready[i][0].id, f"{type(err).__name__}: {err}")
            outs = e.partial
        except Exception as e:  # a backend error without per-conversation detail fails the whole call
            for rec, _ in ready:
                st.fail("sample_request", rec.id, f"{type(e).__name__}: {e}")
            outs = [None] * len(ready)
        for (rec, ctx), samples in zip(ready, outs):
            self._failures.record(samples is None)
            if samples is None:
                st.count("records_failed")
                continue
            self._pair(rec, ctx, samples, out)
        self._failures.check(st)

    def _answer(self, response: str) -> str | None:
        """What sub-EM scores: the final answer (None: the response states none), or the response."""
        return extract_final_answer(response) if self.cfg.final_answer else response

    def _pair(self, rec: QARecord, ctx: dict, samples: list[str], out: ResumableJsonl) -> None:
        cfg, st = self.cfg, self.stats
        st.count("samples", len(samples))
        answers = [(s.strip(), self._answer(s.strip())) for s in samples if s.strip()]
        st.count("samples_empty", len(samples) - len(answers))
        scored = [(s, a, sub_exact_match(a, rec.answers)) for s, a in answers if a is not None]
        st.count("samples_no_final_answer", len(answers) - len(scored))
        n_correct = sum(ok for _, _, ok in scored)
        st.count("samples_correct", n_correct)
        final = {s: a for s, a, _ in scored}
        correct = list(dict.fromkeys(s for s, _, ok in scored if ok))
        wrong = list(dict.fromkeys(s for s, _, ok in scored if not ok))
        good = [s for s in correct if cfg.chosen_filter.reason(s) is None]
        reason = None
        if not scored:
            reason = "record_no_final_answer"  # no response stated a final answer
        elif not correct:
            reason = "record_no_correct_answer"
        elif not wrong:
            reason = "record_no_wrong_answer"
        elif not good:
            reason = "record_correct_answers_filtered"  # every correct answer is a refusal / repetitive
        if reason:
            st.drop(reason)
            out.settle(rec.id, reason)
            return
        rng: random.Random = ctx["rng"]
        chosen, rejected = rng.choice(good), rng.choice(wrong)
        instr_tokens = self.counter.count(ctx["instruction"])
        longest = max(self.counter.count(chosen), self.counter.count(rejected))
        if ctx["long_tokens"] + instr_tokens + longest + 2 * TEMPLATE_OVERHEAD_TOKENS > cfg.max_pair_tokens:
            st.drop("over_length")
            out.settle(rec.id, "over_length")
            return
        out.write(rec.id, {
            "short_context": ctx["short"],
            "long_context": ctx["long"],
            "instruction": ctx["instruction"],
            "chosen": chosen,
            "rejected": rejected,
            "meta": {
                "id": rec.id,
                "answers": list(rec.answers),
                "n_samples": len(samples),
                "n_correct": n_correct,
                "n_no_final_answer": len(answers) - len(scored),
                "chosen_answer": final[chosen],
                "rejected_answer": final[rejected],
                "long_tokens": ctx["long_tokens"],
                "n_distractors": ctx["n_distractors"],
                "generator": getattr(self.backend, "name", type(self.backend).__name__),
                "seed": cfg.seed,
            },
        })
        st.count("pairs_written")

    def run(self, records: Sequence[QARecord], output: str | Path, progress: bool = True) -> RunStats:
        from tqdm import tqdm

        st = self.stats
        pool = [p for r in records for p in r.passages]
        with ResumableJsonl(output, meta_id) as out:
            if out.torn_lines:
                st.count("torn_lines_repaired", out.torn_lines)
            done = out.done_ids
            todo: list[QARecord] = []
            seen: set[str] = set()
            for r in records:
                st.count("records_seen")
                if r.id in done:
                    st.count("records_already_done")
                elif r.id in seen:
                    st.drop("record_duplicate_id")
                else:
                    seen.add(r.id)
                    todo.append(r)
            with tqdm(total=len(todo), desc="records", unit="rec", disable=not progress) as bar:
                for start in range(0, len(todo), cfg_batch := max(1, self.cfg.records_per_batch)):
                    batch = todo[start : start + cfg_batch]
                    self.run_batch(batch, pool, out)
                    bar.update(len(batch))
                    bar.set_postfix(pairs=st.counts["pairs_written"], failed=sum(st.failures.values()))
        return st


def validate_solopo_line(row: dict) -> None:
    """Raise ValueError unless `row` follows the SoLoPO JSONL schema."""
    keys = {"short_context", "long_context", "instruction", "chosen", "rejected"}
    missing = keys - set(row)
    if missing:
        raise ValueError(f"missing keys {sorted(missing)}")
    extra = set(row) - keys - {"meta"}
    if extra:
        raise ValueError(f"unexpected keys {sorted(extra)}")
    for k in keys:
        if not isinstance(row[k], str) or not row[k]:
            raise ValueError(f"{k} must be a non-empty string")
    if "meta" in row and not isinstance(row["meta"], dict):
        raise ValueError("meta must be an object")
