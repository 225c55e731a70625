"""Chunking long documents on paragraph / section boundaries, with an offline sentence splitter.

A chunk is always an exact slice of the document (`text[start:end]`), so its formatting is kept
and its place in the document is known. Chunking works on *units*:

1. paragraphs (separated by blank lines); a section heading (a Markdown `#` line, or a short line
   such as "Chapter 3" / "Section 2.1" / "III. RESULTS") is glued to the paragraph that follows it,
   so a chunk never ends on a heading;
2. a paragraph longer than the budget is split into sentences by NLTK's Punkt algorithm, *trained
   on the document itself* (`PunktTrainer`): no `punkt` data package is needed, nothing is
   downloaded (learned abbreviations are limited to initials and dotted forms, plus a fixed list
   of common ones: Dr., Mr., e.g., ...);
3. a sentence still longer than the budget is cut by tokens (the longest prefix that fits,
   ending on whitespace where possible) as the last resort.

Units are packed greedily into chunks of at most `max_tokens` tokens; when the current chunk is at
least `section_break_fill` full (and at least `min_tokens` long) and the next unit opens a new
section, the chunk is closed there. Every chunk's token count is measured on the final slice, so
the budget always holds. `select_chunks` keeps the chunks of at least `min_tokens` tokens (the
LongPO reference drops paragraph groups outside its 16,384-30,000-token range, a short last group
included); `chunk_bounds` derives that range from the generator's context window.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass
from typing import Protocol, Sequence

from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer


class TokenCounter(Protocol):
    """Anything that counts the tokens of a text (see `HFTokenCounter`, `WhitespaceTokenCounter`)."""

    def count(self, text: str) -> int: ...


class HFTokenCounter:
    """Token counts from a Hugging Face tokenizer (no special tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, path: str) -> "HFTokenCounter":
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(path))

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


class WhitespaceTokenCounter:
    """Counts whitespace-separated words: a tokenizer-free stand-in (tests, quick estimates)."""

    def count(self, text: str) -> int:
        return len(text.split())


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    kind: str  # "paragraph" | "sentence" | "tokens"
    opens_section: bool = False


@dataclass(frozen=True)
class Chunk:
    index: int  # position among all the chunks of its document
    start: int  # character offsets into the document
    end: int
    text: str
    n_tokens: int
    kinds: tuple[str, ...]  # the unit kinds it was packed from (tells when a fallback was used)


_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_HEADING = re.compile(
    r"""^\s*(
        \#{1,6}\s+\S.*                                    # Markdown heading
      | (chapter|section|part|appendix|book)\s+[\w.\-]+.* # Chapter 3, Section 2.1: ...
      | ([IVXLC]+|\d+(\.\d+)*)\.?\s+[A-Z][^.!?]{0,80}     # 3. Results / III. RESULTS
    )\s*$""",
    re.IGNORECASE | re.VERBOSE,
)
# Abbreviations the untrained splitter should not end a sentence on.
_ABBREVIATIONS = {"dr", "mr", "mrs", "ms", "prof", "st", "e.g", "i.e", "etc", "vs", "fig", "no", "vol", "al", "jr", "sr"}


def is_heading(paragraph: str) -> bool:
    """A one-line paragraph that looks like a section heading."""
    text = paragraph.strip()
    return "\n" not in text and len(text) <= 120 and bool(_HEADING.match(text))


def paragraph_spans(text: str) -> list[Span]:
    """Non-blank paragraphs as spans, whitespace trimmed; a heading is merged into the paragraph after it."""
    raw: list[tuple[int, int]] = []
    pos = 0
    for m in _BLANK_LINES.finditer(text):
        raw.append((pos, m.start()))
        pos = m.end()
    raw.append((pos, len(text)))
    spans: list[Span] = []
    pending_heading: int | None = None  # start of a heading waiting for its paragraph
    for s, e in raw:
        piece = text[s:e]
        if not piece.strip():
            continue
        s += len(piece) - len(piece.lstrip())
        e -= len(piece) - len(piece.rstrip())
        if is_heading(text[s:e]):
            if pending_heading is None:
                pending_heading = s
            continue  # consecutive headings stay pending together
        if pending_heading is not None:
            spans.append(Span(pending_heading, e, "paragraph", opens_section=True))
            pending_heading = None
        else:
            spans.append(Span(s, e, "paragraph"))
    if pending_heading is not None:  # a document that ends on a heading
        spans.append(Span(pending_heading, len(text.rstrip()), "paragraph", opens_section=True))
    return spans


def offline_sentence_splitter(text: str) -> PunktSentenceTokenizer:
    """A Punkt splitter trained on `text` itself (unsupervised; needs no downloaded model)."""
    trainer = PunktTrainer()
    trainer.train(text, finalize=True)
    params = trainer.get_params()
    # On a few thousand words Punkt also "learns" ordinary words that happen to end sentences often
    # ("act.", "own.") as abbreviations. Keep only the learned ones that look like abbreviations
    # (with an inner period, or a single letter: initials) and add the common English ones.
    learned = {a for a in params.abbrev_types if "." in a or len(a) == 1}
    params.abbrev_types.clear()
    params.abbrev_types.update(learned | _ABBREVIATIONS)
    return PunktSentenceTokenizer(params)


def sentence_spans(text: str, start: int, end: int, splitter: PunktSentenceTokenizer) -> list[Span]:
    return [Span(start + s, start + e, "sentence") for s, e in splitter.span_tokenize(text[start:end])]


def token_spans(text: str, start: int, end: int, counter: TokenCounter, max_tokens: int) -> list[Span]:
    """Cut text[start:end] into pieces of at most `max_tokens` tokens: the longest prefix that fits
    (binary search on characters), moved back to the last whitespace when there is one."""
    spans: list[Span] = []
    pos = start
    while pos < end:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            break
        if counter.count(text[pos:end]) <= max_tokens:
            spans.append(Span(pos, end, "tokens"))
            break
        lo, hi = pos + 1, end  # largest cut in [lo, hi] with count(text[pos:cut]) <= max_tokens
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if counter.count(text[pos:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        cut = lo
        ws = max(text.rfind(" ", pos, cut), text.rfind("\n", pos, cut))
        if ws > pos and ws >= pos + (cut - pos) // 2:
            cut = ws
        spans.append(Span(pos, cut, "tokens"))
        pos = cut
    return spans


def split_units(text: str, counter: TokenCounter, max_tokens: int) -> list[Span]:
    """Paragraphs, or sentences / token pieces for the paragraphs that exceed the budget."""
    units: list[Span] = []
    splitter: PunktSentenceTokenizer | None = None
    for para in paragraph_spans(text):
        if counter.count(text[para.start : para.end]) <= max_tokens:
            units.append(para)
            continue
        if splitter is None:
            splitter = offline_sentence_splitter(text)
        first = True
        for sent in sentence_spans(text, para.start, para.end, splitter):
            pieces = (
                [sent]
                if counter.count(text[sent.start : sent.end]) <= max_tokens
                else token_spans(text, sent.start, sent.end, counter, max_tokens)
            )
            for piece in pieces:
                units.append(Span(piece.start, piece.end, piece.kind, para.opens_section and first))
                first = False
    return units


# The LongPO reference (DAMO-NLP-SG/LongPO, data_prepare/generate_qa.py) groups paragraphs into
# chunks of 16,384-30,000 tokens for a 32K-token generator (Mistral-7B-Instruct-v0.2): the
# maximum leaves ~2.7K tokens of the window for the instruction, the template and the answer, and
# the minimum is half the window. `chunk_bounds` scales both to another window.
REFERENCE_WINDOW = 32768
REFERENCE_MIN_CHUNK = 16384
REFERENCE_MAX_CHUNK = 30000
PROMPT_RESERVE_TOKENS = 256  # question / instruction text and chat template around a chunk


def chunk_bounds(window: int, answer_tokens: int) -> tuple[int, int]:
    """(min, max) chunk tokens for a generator with a `window`-token context that must also fit
    `answer_tokens` new tokens: max = min(window x 30000/32768, window - answer_tokens - 256),
    min = max x 16384/30000. A 32K window with 1,024-token answers gives the reference's
    (16384, 30000); 8K gives (3774, 6912); 128K gives (65536, 120000)."""
    hi = min(window * REFERENCE_MAX_CHUNK // REFERENCE_WINDOW, window - answer_tokens - PROMPT_RESERVE_TOKENS)
    if hi < 1:
        raise ValueError(f"a {window}-token generator window leaves no room for a chunk with {answer_tokens}-token "
                         "answers: raise --generator-window or lower --max-new-tokens / --question-max-new-tokens")
    return hi * REFERENCE_MIN_CHUNK // REFERENCE_MAX_CHUNK, hi


def chunk_document(
    text: str, counter: TokenCounter, max_tokens: int, section_break_fill: float = 0.5, min_tokens: int = 0
) -> list[Chunk]:
    """Split `text` into chunks of at most `max_tokens` tokens on paragraph / section boundaries.
    A chunk is closed at a section boundary only once it holds `min_tokens` tokens; chunks shorter
    than `min_tokens` (the last one, typically) are still returned: `select_chunks` drops them.

    Packing adds unit token counts (cheap) while far from the budget and re-counts the whole slice
    near it; every closed chunk is counted exactly and trimmed back a unit if it overshoots."""
    if max_tokens < 1:
        raise ValueError(f"chunk token budget must be at least 1, got {max_tokens}")
    if not 0 <= min_tokens <= max_tokens:
        raise ValueError(f"need 0 <= minimum chunk tokens ({min_tokens}) <= maximum ({max_tokens})")
    break_at = max(section_break_fill * max_tokens, min_tokens)
    queue = deque(split_units(text, counter, max_tokens))
    chunks: list[Chunk] = []
    group: list[Span] = []
    estimate = 0

    def close() -> None:
        nonlocal group, estimate
        while group:
            s, e = group[0].start, group[-1].end
            n = counter.count(text[s:e])
            if n <= max_tokens or len(group) == 1:
                kinds = tuple(dict.fromkeys(u.kind for u in group))
                chunks.append(Chunk(len(chunks), s, e, text[s:e], n, kinds))
                break
            queue.appendleft(group.pop())  # overshoot from token merges: give the last unit back
        group, estimate = [], 0

    while queue:
        unit = queue.popleft()
        unit_tokens = counter.count(text[unit.start : unit.end])
        if group and unit.opens_section and estimate >= break_at:
            close()
        if group:
            guess = estimate + unit_tokens + 2  # + the blank line between them
            if guess > 0.9 * max_tokens:
                guess = counter.count(text[group[0].start : unit.end])
            if guess <= max_tokens:
                group.append(unit)
                estimate = guess
                continue
            close()
        group, estimate = [unit], unit_tokens
    close()
    return chunks


def select_chunks(chunks: Sequence[Chunk], max_chunks: int, min_tokens: int = 0) -> list[Chunk]:
    """Up to `max_chunks` of the chunks of at least `min_tokens` tokens, spread evenly over the
    document (first and last of them included)."""
    chunks = [c for c in chunks if c.n_tokens >= min_tokens]
    n = len(chunks)
    if max_chunks <= 0 or n <= max_chunks:
        return list(chunks)
    if max_chunks == 1:
        return [chunks[0]]
    picks = sorted({round(i * (n - 1) / (max_chunks - 1)) for i in range(max_chunks)})
    return [chunks[i] for i in picks]
