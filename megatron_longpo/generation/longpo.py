"""LongPO self-generated pairs (docs/methods.md §2): chunk -> questions -> short/long answers -> filters -> turns.

The defaults follow the LongPO reference code (DAMO-NLP-SG/LongPO, `data_prepare/`); docs/generation.md
lists each choice with its source. For each document `C_L` (the whole text):

1. it is split on paragraph / section boundaries into chunks of at most `max_chunk_tokens`
   tokens (`text.chunk_document`); chunks under `min_chunk_tokens` are dropped (the reference:
   16,384-30,000 tokens for a 32K generator, `text.chunk_bounds` scales that to another window)
   and up to `max_chunks` (4) of the others, spread over the document, are used;
2. for each chunk `C_S` the generator is asked for `questions_asked` (N = 4) questions
   (`question_prompt`, sampled at T 0.7 / top-p 0.9); a chunk is kept only when exactly N parse
   (`exact_question_count`), then `questions_per_chunk` (1) of them are drawn at random and a lead
   phrase drawn from `lead_phrases` ("As described in the preceding text,", ...) is prefixed; both
   draws are seeded by the run seed, the document id and the chunk index, so a resumed run draws
   the same. That is the instruction `I`;
3. chosen  `y_S ~ π(·|[C_S; I])`: one user message `"{C_S}\\n\\n{I}"`, greedy by default (the paper);
4. rejected `y_L ~ π(·|[C_L; I])`: with `rejected_conditioning="independent"` (default, as the
   reference) every turn is generated single-turn from `"{C_L}\\n\\n{I_i}"` (T 1.0, up to 1,024
   tokens), all turns of a batch in one call. With `"history"` turn i is generated in the same
   conversation as the trainer's rejected sequence: `user: "{C_L}\\n\\n{I_1}"`, `assistant: y_L1`,
   `user: I_2`, ... `user: I_i` (earlier *kept* rejected turns only);
5. a turn is dropped when the chosen answer fails `chosen_filter` (empty, refusal, repeated-word
   share > 0.9, fewer than 2 words of >= 3 characters), the rejected answer fails
   `rejected_filter` (empty, share > 0.95, too short; refusals such as "the text does not
   mention ..." are kept), both answers are the same, or adding it would make either side's long
   sequence (`C_L` + all kept instructions and that side's answers) exceed `max_pair_tokens`;
6. the kept turns of a document make one JSONL line:
   `{"long_context", "turns": [{"short_context", "instruction", "chosen", "rejected"}], "meta"}`.

Every document, chunk and turn that is not used is counted by reason in `RunStats.dropped`.
Documents are processed `docs_per_batch` at a time so each stage is one batched `chat` call.
A document whose requests fail is counted and left unsettled (a rerun retries it); results are
appended as they are made, so a restart skips finished documents (`output.ResumableJsonl`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .backends import Conversation, GenerationBackend, GenerationError, SamplingParams
from .documents import Document
from .filters import (
    LEAD_PHRASES, LONGPO_CHOSEN_FILTER, LONGPO_REJECTED_FILTER, AnswerFilter, parse_questions, with_lead_phrase)
from .output import FailureStreak, ResumableJsonl, RunStats, meta_id
from .text import (
    REFERENCE_MAX_CHUNK, REFERENCE_MIN_CHUNK, Chunk, TokenCounter, chunk_document, select_chunks)

# Our wording of the reference's question-synthesis request (data_prepare/generate_qa.py): N
# comprehensive questions on comprehension, analysis and the links between the key themes,
# numbered "1:" to "N:" (the format its parser expects).
DEFAULT_QUESTION_PROMPT = (
    "Context:\n{context}\n\n"
    "Based on the text above, write {n} comprehensive questions in English that test a reader's "
    "comprehension, analytical skills and ability to connect the key themes and ideas of the whole text.\n\n"
    "Each question should:\n"
    "- ask the reader to connect different sections or concepts of the text;\n"
    "- call for synthesising and summarising the material, not only recalling it;\n"
    "- cover a different part of the text from the other questions;\n"
    "- where relevant, ask the reader to apply or evaluate the text's information;\n"
    "- be clear and unambiguous.\n\n"
    "Give the questions directly, without explanations, numbered from \"1:\" to \"{n}:\"."
)
TEMPLATE_OVERHEAD_TOKENS = 8  # chat-template tokens around one message (role tags, newlines)


@dataclass(frozen=True)
class LongPOConfig:
    min_chunk_tokens: int = REFERENCE_MIN_CHUNK
    max_chunk_tokens: int = REFERENCE_MAX_CHUNK
    max_chunks: int = 4
    questions_asked: int = 4
    questions_per_chunk: int = 1
    exact_question_count: bool = True  # False: keep a chunk with 1..N parsed questions (first N of more)
    question_prompt: str = DEFAULT_QUESTION_PROMPT
    lead_phrases: tuple[str, ...] = LEAD_PHRASES  # () = no lead phrase
    max_pair_tokens: int = 131072
    min_doc_tokens: int = 0
    max_doc_tokens: int | None = None
    rejected_conditioning: str = "independent"  # "independent" (single-turn) | "history"
    seed: int = 0
    docs_per_batch: int = 8
    max_consecutive_failures: int = 8
    question_params: SamplingParams = SamplingParams(max_new_tokens=1024, temperature=0.7, top_p=0.9)
    chosen_params: SamplingParams = SamplingParams(max_new_tokens=1024, temperature=0.0)
    rejected_params: SamplingParams = SamplingParams(max_new_tokens=1024, temperature=1.0, top_p=1.0)
    chosen_filter: AnswerFilter = LONGPO_CHOSEN_FILTER
    rejected_filter: AnswerFilter = LONGPO_REJECTED_FILTER

    def __post_init__(self) -> None:
        if "{context}" not in self.question_prompt:
            raise ValueError("the question prompt must contain {context} (where the chunk goes); {n} is optional")
        if self.rejected_conditioning not in ("history", "independent"):
            raise ValueError(f"rejected conditioning {self.rejected_conditioning!r}: choose history or independent")
        if self.questions_per_chunk < 1 or self.questions_asked < self.questions_per_chunk:
            raise ValueError("need 1 <= questions per chunk <= questions asked")
        if self.max_chunk_tokens < 1 or self.max_pair_tokens < 1:
            raise ValueError("chunk and pair token budgets must be positive")
        if not 0 <= self.min_chunk_tokens <= self.max_chunk_tokens:
            raise ValueError(f"need 0 <= --min-chunk-tokens ({self.min_chunk_tokens}) <= --max-chunk-tokens "
                             f"({self.max_chunk_tokens})")
        if any(not p.strip() for p in self.lead_phrases):
            raise ValueError("a lead phrase is empty; pass --no-lead-phrase for none")


# ---------------------------------------------------------------- the pipeline


def user_message(context: str, instruction: str) -> str:
    """The trainer's user message: `"{context}\\n\\n{instruction}"`."""
    return f"{context}\n\n{instruction}"


def question_prompt(template: str, chunk_text: str, n: int) -> str:
    return template.replace("{n}", str(n)).replace("{context}", chunk_text)


@dataclass
class _Turn:
    chunk: Chunk
    instruction: str
    chosen: str = ""
    rejected: str = ""


@dataclass
class _DocWork:
    doc: Document
    doc_tokens: int
    chunks: list[Chunk]
    turns: list[_Turn] = field(default_factory=list)
    kept: list[_Turn] = field(default_factory=list)
    chosen_len: int = 0  # running token lengths of the two long sequences
    rejected_len: int = 0
    failed: bool = False


class LongPOBuilder:
    """Runs the LongPO data pipeline over documents and appends one JSONL line per document."""

    def __init__(self, backend: GenerationBackend, counter: TokenCounter, config: LongPOConfig,
                 stats: RunStats | None = None) -> None:
        self.backend = backend
        self.counter = counter
        self.cfg = config
        self.stats = stats or RunStats()
        self._failures = FailureStreak(config.max_consecutive_failures, "documents")

    # -- one stage = one batched chat call; returns outputs with None for failed conversations
    def _chat(self, convs: list[Conversation], params: SamplingParams, owners: list[_DocWork],
              stage: str) -> list[list[str] | None]:
        if not convs:
            return []
        try:
            return list(self.backend.chat(convs, params))
        except GenerationError as e:
            errors, partial = e.errors, e.partial
        except Exception as e:  # a backend error without per-conversation detail fails the whole call
            errors, partial = {i: e for i in range(len(convs))}, [None] * len(convs)
        for i, err in errors.items():
            if not owners[i].failed:
                owners[i].failed = True
                self.stats.fail(f"{stage}_request", owners[i].doc.id, f"{type(err).__name__}: {err}")
        return partial

    def _prepare(self, doc: Document, out: ResumableJsonl) -> _DocWork | None:
        cfg, st = self.cfg, self.stats
        n = self.counter.count(doc.text)
        reason = None
        chunks: list[Chunk] = []
        if n < cfg.min_doc_tokens:
            reason = "doc_too_short"
        elif cfg.max_doc_tokens is not None and n > cfg.max_doc_tokens:
            reason = "doc_too_long"
        elif n + cfg.rejected_params.max_new_tokens + TEMPLATE_OVERHEAD_TOKENS > cfg.max_pair_tokens:
            reason = "doc_over_max_pair_tokens"
        if reason is None:
            chunks = chunk_document(doc.text, self.counter, cfg.max_chunk_tokens, min_tokens=cfg.min_chunk_tokens)
            st.count("chunks_total", len(chunks))
            if len(chunks) < 2:
                reason = "doc_single_chunk"  # the short context would be the whole document
        if reason is None:
            small = sum(c.n_tokens < cfg.min_chunk_tokens for c in chunks)
            if small:
                st.drop("chunk_under_min_tokens", small)
            used = select_chunks(chunks, cfg.max_chunks, cfg.min_chunk_tokens)
            if len(chunks) - small > len(used):
                st.drop("chunk_over_max_chunks", len(chunks) - small - len(used))
            if not used:
                reason = "doc_no_chunk_in_range"
        if reason is not None:
            st.drop(reason)
            out.settle(doc.id, reason)
            return None
        return _DocWork(doc, n, used)

    def _parsed(self, qs: list[str]) -> tuple[list[str], str | None]:
        """The questions a chunk may use, or the reason it is dropped (exactly N must parse)."""
        n = self.cfg.questions_asked
        if not qs:
            return [], "chunk_no_question_parsed"
        if self.cfg.exact_question_count and len(qs) != n:
            return [], "chunk_too_few_questions" if len(qs) < n else "chunk_too_many_questions"
        return qs[:n], None

    def _questions(self, work: list[_DocWork]) -> None:
        cfg, st = self.cfg, self.stats
        convs, owners, chunks = [], [], []
        for w in work:
            for c in w.chunks:
                convs.append([{"role": "user", "content": question_prompt(cfg.question_prompt, c.text, cfg.questions_asked)}])
                owners.append(w)
                chunks.append(c)
        st.count("chunks_used", len(chunks))
        outs = self._chat(convs, cfg.question_params, owners, "question")
        for w, c, o in zip(owners, chunks, outs):
            if o is None or w.failed:
                continue
            parsed = parse_questions(o[0])
            st.count("questions_parsed", len(parsed))
            qs, reason = self._parsed(parsed)
            if reason:
                st.drop(reason)
                continue
            rng = random.Random(f"{cfg.seed}:{w.doc.id}:{c.index}")
            for q in rng.sample(qs, min(cfg.questions_per_chunk, len(qs))):
                lead = rng.choice(cfg.lead_phrases) if cfg.lead_phrases else ""
                w.turns.append(_Turn(c, with_lead_phrase(q, lead)))
        st.count("questions_used", sum(len(w.turns) for w in work if not w.failed))

    def _chosen(self, work: list[_DocWork]) -> None:
        turns = [(w, t) for w in work if not w.failed for t in w.turns]
        convs = [[{"role": "user", "content": user_message(t.chunk.text, t.instruction)}] for _, t in turns]
        outs = self._chat(convs, self.cfg.chosen_params, [w for w, _ in turns], "chosen")
        for (w, t), o in zip(turns, outs):
            if o is not None:
                t.chosen = o[0].strip()

    def _rejected_conversation(self, w: _DocWork, t: _Turn) -> Conversation:
        if self.cfg.rejected_conditioning == "independent" or not w.kept:
            return [{"role": "user", "content": user_message(w.doc.text, t.instruction)}]
        conv: Conversation = []
        for i, k in enumerate(w.kept):
            conv.append({"role": "user", "content": user_message(w.doc.text, k.instruction) if i == 0 else k.instruction})
            conv.append({"role": "assistant", "content": k.rejected})
        conv.append({"role": "user", "content": t.instruction})
        return conv

    def _judge(self, w: _DocWork, t: _Turn) -> None:
        """Filter one finished turn (its chosen answer already passed) and keep it when it passes."""
        st = self.stats
        reason = None
        r = self.cfg.rejected_filter.reason(t.rejected)
        if r:
            reason = f"rejected_{r}"
        if reason is None and " ".join(t.chosen.split()).lower() == " ".join(t.rejected.split()).lower():
            reason = "identical_answers"
        if reason is None:
            ins = self.counter.count(t.instruction) + TEMPLATE_OVERHEAD_TOKENS
            first = 0 if w.kept else w.doc_tokens
            c_len = (w.chosen_len or 0) + first + ins + self.counter.count(t.chosen) + TEMPLATE_OVERHEAD_TOKENS
            r_len = (w.rejected_len or 0) + first + ins + self.counter.count(t.rejected) + TEMPLATE_OVERHEAD_TOKENS
            if max(c_len, r_len) > self.cfg.max_pair_tokens:
                reason = "over_length"
            else:
                w.chosen_len, w.rejected_len = c_len, r_len
        if reason:
            st.drop(reason)
        else:
            w.kept.append(t)

    def _fits(self, w: _DocWork, t: _Turn) -> bool:
        """Whether the rejected request for `t` (history mode) fits `max_pair_tokens` with a full
        `max_new_tokens` answer; a turn that cannot fit is dropped before it is requested."""
        if self.cfg.rejected_conditioning == "independent" or not w.kept:
            return True
        need = (w.rejected_len + self.counter.count(t.instruction) + self.cfg.rejected_params.max_new_tokens
                + 2 * TEMPLATE_OVERHEAD_TOKENS)
        if need > self.cfg.max_pair_tokens:
            self.stats.drop("over_length")
            return False
        return True

    def _rejected_and_filter(self, work: list[_DocWork]) -> None:
        st, f = self.stats, self.cfg.chosen_filter
        # chosen answers that fail the filters need no rejected answer
        pending: dict[int, list[_Turn]] = {}
        for wi, w in enumerate(work):
            if w.failed:
                continue
            for t in w.turns:
                r = f.reason(t.chosen)
                if r:
                    st.drop(f"chosen_{r}")
                else:
                    pending.setdefault(wi, []).append(t)
        if self.cfg.rejected_conditioning == "independent":
            rounds = [[(work[wi], t) for wi, ts in pending.items() for t in ts]]
        else:  # turn i waits for the kept turns before it
            depth = max((len(ts) for ts in pending.values()), default=0)
            rounds = [[(work[wi], ts[i]) for wi, ts in pending.items() if i < len(ts)] for i in range(depth)]
        for rnd in rounds:
            rnd = [(w, t) for w, t in rnd if not w.failed and self._fits(w, t)]
            convs = [self._rejected_conversation(w, t) for w, t in rnd]
            outs = self._chat(convs, self.cfg.rejected_params, [w for w, _ in rnd], "rejected")
            for (w, t), o in zip(rnd, outs):
                if o is None or w.failed:
                    continue
                t.rejected = o[0].strip()
                self._judge(w, t)

    def _finish(self, w: _DocWork, out: ResumableJsonl) -> None:
        st = self.stats
        self._failures.record(w.failed)
        if w.failed:
            st.count("documents_failed")
            return
        if not w.kept:
            st.drop("doc_no_turn_kept")
            out.settle(w.doc.id, "no_turn_kept")
            return
        record = {
            "long_context": w.doc.text,
            "turns": [
                {"short_context": t.chunk.text, "instruction": t.instruction, "chosen": t.chosen, "rejected": t.rejected}
                for t in w.kept
            ],
            "meta": {
                "id": w.doc.id,
                "source": w.doc.source,
                "chunk_ids": [t.chunk.index for t in w.kept],
                "chunk_spans": [[t.chunk.start, t.chunk.end] for t in w.kept],
                "long_tokens": w.doc_tokens,
                "generator": getattr(self.backend, "name", type(self.backend).__name__),
                "rejected_conditioning": self.cfg.rejected_conditioning,
                "chunk_bounds": [self.cfg.min_chunk_tokens, self.cfg.max_chunk_tokens],
                "seed": self.cfg.seed,
            },
        }
        out.write(w.doc.id, record)
        st.count("documents_written")
        st.count("turns_kept", len(w.kept))

    def run_batch(self, docs: list[Document], out: ResumableJsonl) -> None:
        work = [w for w in (self._prepare(d, out) for d in docs) if w is not None]
        if not work:
            return
        self._questions(work)
        self._chosen(work)
        self._rejected_and_filter(work)
        for w in work:
            self._finish(w, out)
        self._failures.check(self.stats)

    def run(self, documents: Iterable[Document], output: str | Path, progress: bool = True) -> RunStats:
        from tqdm import tqdm

        st = self.stats
        with ResumableJsonl(output, meta_id) as out:
            if out.torn_lines:
                st.count("torn_lines_repaired", out.torn_lines)
            done = out.done_ids
            bar = tqdm(desc="documents", unit="doc", disable=not progress)
            batch: list[Document] = []
            seen: set[str] = set()
            try:
                for doc in documents:
                    st.count("documents_seen")
                    bar.update(1)
                    if doc.id in done:
                        st.count("documents_already_done")
                        continue
                    if doc.id in seen:
                        st.drop("doc_duplicate_id")
                        continue
                    seen.add(doc.id)
                    batch.append(doc)
                    if len(batch) >= self.cfg.docs_per_batch:
                        self.run_batch(batch, out)
                        batch = []
                        bar.set_postfix(written=st.counts["documents_written"], failed=sum(st.failures.values()))
                if batch:
                    self.run_batch(batch, out)
            finally:
                bar.close()
        return st


def validate_longpo_line(row: dict) -> None:
    """Raise ValueError unless `row` follows the LongPO JSONL schema."""
    if not isinstance(row.get("long_context"), str) or not row["long_context"]:
        raise ValueError("long_context must be a non-empty string")
    turns = row.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError("turns must be a non-empty list")
    for i, t in enumerate(turns):
        if set(t) != {"short_context", "instruction", "chosen", "rejected"}:
            raise ValueError(f"turn {i} has keys {sorted(t)}")
        for k, v in t.items():
            if not isinstance(v, str) or not v:
                raise ValueError(f"turn {i}: {k} must be a non-empty string")
    extra = set(row) - {"long_context", "turns", "meta"}
    if extra:
        raise ValueError(f"unexpected top-level keys {sorted(extra)}")
    if "meta" in row and not isinstance(row["meta"], dict):
        raise ValueError("meta must be an object")
