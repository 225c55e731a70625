"""Answer filters for self-generated preference data (docs/methods.md §2 step 5), and question parsing.

Each filter returns the *reason* an answer is dropped (a short stable string that the run summary
counts) or None when the answer is kept. The defaults follow the LongPO reference code
(DAMO-NLP-SG/LongPO, `data_prepare/postprocess_longpo_pair.py`):

Repeated-word share (`repeated_word_share`)
    Lower-case the answer, delete punctuation, split on white space; the share is the number of
    words whose word occurs more than once in the answer, over all words. "a b c" scores 0,
    "a b a" 2/3, any text said twice 1. A pair is dropped when the rejected answer's share is
    > 0.95 or the chosen answer's share is > 0.9 (`LONGPO_REJECTED_FILTER`,
    `LONGPO_CHOSEN_FILTER`). Long prose repeats its function words, so this drops only answers
    made almost entirely of repeated words (loops).

Too short (`long_words`)
    Fewer than 2 words of at least 3 characters (after the same normalisation).

Refusals (`is_refusal`)
    Phrasings of a model declining to answer or to use the context. Dropped in CHOSEN answers
    only by default: a long-context failure in the REJECTED answer ("the text does not mention
    ...") is exactly what the DPO term pushes down (docs/methods.md §2 step 5).

An n-gram repetition ratio (`repetition_ratio`, `max_ngram_repetition`) is available as an extra
filter (off by default).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_WORD = re.compile(r"\w+", re.UNICODE)
_PUNCT = re.compile(r"[^\w\s]", re.UNICODE)

# Phrasings of a refusal or of a model declining to use the context. Matched case-insensitively
# after curly apostrophes are straightened. The reference's list of "censored phrases" (I can't
# assist, As an AI assistant, I am unable to, content is not available, beyond my scope, ...)
# is covered by these patterns.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI (?:can ?not|can't|am unable to|'m unable to|am not able to|'m not able to|won't|will not) "
    r"(?:assist|help|answer|provide|comply|fulfil|fulfill|do that|complete|process|access|discuss|engage|support|delve)",
    r"\bI'?m sorry,? (?:but )?(?:I|that|this)\b",
    r"\bsorry, I can'?t\b",
    r"\bI apologi[sz]e,? but\b",
    r"\bas an AI(?: language)? (?:model|assistant)\b",
    r"\bI do(?: not|n't) have (?:access|enough information|the (?:text|document|context)|the capability)\b",
    r"\bI am (?:restricted|not permitted|programmed not)\b|\bI'm (?:not permitted|programmed not)\b",
    r"\b(?:beyond|outside) (?:my|the scope of my) (?:scope|capabilities|capability|reach|purview|functionality|answer scope)\b",
    r"\b(?:content|information) is not (?:available|accessible)\b",
    r"\b(?:the|this) (?:text|document|context|passage) does(?: not|n't) (?:provide|contain|mention|say)\b",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def plain_words(text: str) -> list[str]:
    """Lower-cased words with punctuation deleted (not split on): "Don't stop." -> ["dont", "stop"]."""
    return _PUNCT.sub("", text.lower()).split()


def repeated_word_share(text: str) -> float:
    """Share of the words (`plain_words`) whose word occurs more than once (0 for no words)."""
    w = plain_words(text)
    if not w:
        return 0.0
    counts = Counter(w)
    return sum(c for c in counts.values() if c > 1) / len(w)


def long_words(text: str, min_chars: int = 3) -> int:
    """Number of words (`plain_words`) of at least `min_chars` characters."""
    return sum(len(x) >= min_chars for x in plain_words(text))


def repetition_ratio(text: str, n: int = 4) -> float:
    """`1 - distinct word n-grams / total word n-grams` (0 for fewer than n words): a sentence
    looped k times scores about `1 - 1/k`."""
    if n < 1:
        raise ValueError(f"n-gram size must be at least 1, got {n}")
    w = words(text)
    total = len(w) - n + 1
    if total <= 0:
        return 0.0
    distinct = len({tuple(w[i : i + n]) for i in range(total)})
    return 1.0 - distinct / total


def is_refusal(text: str) -> bool:
    return bool(_REFUSAL.search(text.replace("\u2019", "'").replace("\u2018", "'")))


@dataclass(frozen=True)
class AnswerFilter:
    """Thresholds for dropping an answer; reasons: empty, refusal, repetitive, too_short.

    `max_repeated_word_share`: drop when `repeated_word_share` is above it (None: off);
    `min_long_words`: drop when fewer words of >= `long_word_chars` characters;
    `drop_refusals`: drop refusals; `max_ngram_repetition`: drop when the word-`repetition_ngram`
    repetition ratio is above it (None: off)."""

    max_repeated_word_share: float | None = 0.9
    min_long_words: int = 2
    long_word_chars: int = 3
    drop_refusals: bool = True
    max_ngram_repetition: float | None = None
    repetition_ngram: int = 4

    def reason(self, answer: str) -> str | None:
        if not answer.strip():
            return "empty"
        if self.drop_refusals and is_refusal(answer):
            return "refusal"
        if self.max_repeated_word_share is not None and repeated_word_share(answer) > self.max_repeated_word_share:
            return "repetitive"
        if self.max_ngram_repetition is not None and \
                repetition_ratio(answer, self.repetition_ngram) > self.max_ngram_repetition:
            return "repetitive"
        if long_words(answer, self.long_word_chars) < self.min_long_words:
            return "too_short"
        return None


# The LongPO reference's thresholds: chosen answers (refusals dropped, share > 0.9 dropped) and
# rejected answers (refusals KEPT: they are the long-context failures to push down; share > 0.95).
LONGPO_CHOSEN_FILTER = AnswerFilter(max_repeated_word_share=0.9, drop_refusals=True)
LONGPO_REJECTED_FILTER = AnswerFilter(max_repeated_word_share=0.95, drop_refusals=False)


# ---------------------------------------------------------------- lead phrases

# Prefixed to a synthesised question so the instruction points back at the context, one drawn
# at random per instruction (the LongPO reference draws from a list of 20 such phrases).
LEAD_PHRASES: tuple[str, ...] = (
    "As described in the preceding text,",
    "As detailed in the document above,",
    "As mentioned earlier in the text,",
    "As stated in the material above,",
    "As indicated in the preceding pages,",
    "In accordance with the content above,",
    "Following the details provided above,",
    "As explained in the previous passages,",
    "In line with the preceding information,",
    "Reflecting on the content above,",
    "Based on the preceding descriptions,",
    "With reference to the document above,",
    "Drawing on the details above,",
    "Considering the information given above,",
    "As set out in the previous sections,",
    "According to the text above,",
    "As recounted in the earlier part of the document,",
    "Judging from the material presented above,",
    "As outlined in the text you have just read,",
    "Based on the document above,",
)


# ---------------------------------------------------------------- question parsing

_OPENERS = {
    "what", "why", "how", "which", "who", "whom", "whose", "when", "where", "is", "are", "was", "were",
    "does", "do", "did", "can", "could", "should", "would", "will", "has", "have", "had", "in", "on",
    "according", "describe", "explain", "discuss", "compare", "summarize", "summarise", "identify",
    "analyze", "analyse", "based", "to", "for", "from", "given", "if", "under", "at",
}
_TASK_VERBS = {"list", "name", "outline", "evaluate", "assess", "give", "state", "what's", "suggest", "propose"}

_ITEM = re.compile(
    r"""^\s*(?:
        (?:\*\*)?(?:Q(?:uestion)?\s*\d+\s*[:.)\-]|\d+\s*[.):\-]|\(\d+\)|[-*\u2022\u2013])(?:\*\*)?\s*
    )""",
    re.IGNORECASE | re.VERBOSE,
)
_INLINE_NUMBER = re.compile(r"(?:(?<=\s)|^)(?:Q(?:uestion)?\s*)?\d+\s*[.)]\s+(?=[A-Z\"'])")


def _clean_question(text: str) -> str:
    text = text.strip().strip("*_`").strip()
    text = re.sub(r"^(?:Q(?:uestion)?\s*\d*\s*[:.)\-]\s*)", "", text, flags=re.IGNORECASE).strip()
    text = re.sub(r"\s+", " ", text).strip().strip("*_").strip()
    return text.strip("\"'\u201c\u201d").strip()


def parse_questions(output: str, min_words: int = 3, max_words: int = 120) -> list[str]:
    """Questions from a model's list: numbered ("1.", "1)", "(1)", "Q1:", "Question 1 -"), bulleted
    ("-", "*", "•"), Markdown-bold, one per line or several on one line. Falls back to every
    sentence ending in "?" when the output is not a list. Items without a "?" are kept only if the
    list has no item with one, and only when they open with a question word or a task verb
    ("Explain ...", "Describe ..."), so statements are not taken for questions. Duplicates
    (case-insensitive) and fragments are dropped."""
    lines = [ln for ln in output.replace("\r", "").split("\n") if ln.strip()]
    items: list[str] = []
    for line in lines:
        m = _ITEM.match(line)
        if m:
            items.append(line[m.end() :])
        elif items and not re.match(r"^\s*(?:here|sure|these|the following)\b", line, re.IGNORECASE):
            # a continuation line of the previous item (wrapped question)
            if not items[-1].rstrip().rstrip("\"'\u201d*_").endswith("?"):
                items[-1] += " " + line.strip()
    # several numbered questions on one line: "1. What ...? 2. Why ...?"
    expanded: list[str] = []
    for item in items or [output]:
        parts = [p for p in _INLINE_NUMBER.split(item) if p.strip()]
        expanded.extend(parts if len(parts) > 1 or items else parts)
    if not items:
        # not a list: take the sentences that end in a question mark
        expanded = re.findall(r"[^.?!\n]*\?", output)
    candidates = [_clean_question(q) for q in expanded]
    candidates = [q for q in candidates if min_words <= len(words(q)) <= max_words]
    with_mark = [q for q in candidates if q.endswith("?")]
    # without any "?", keep only items that read as a task or a question ("Explain how ...")
    chosen = with_mark or [q for q in candidates if (words(q) or [""])[0] in _OPENERS | _TASK_VERBS]
    seen: set[str] = set()
    out: list[str] = []
    for q in chosen:
        key = q.lower()
        if key not in seen:
            seen.add(key)
            out.append(q)
    return out




def with_lead_phrase(question: str, lead: str) -> str:
    """`"{lead} {question}"`, e.g. "As described in the preceding text, what ...?". The question's
    first letter is lower-cased only when its first word is a common opener (What, How, Which,
    According, ...), so names and acronyms keep their capitals."""
    lead = lead.strip()
    if not lead:
        return question
    first = re.split(r"\W", question, maxsplit=1)[0]
    if first.lower() in _OPENERS and first[:1].isupper():
        question = question[0].lower() + question[1:]
    return f"{lead} {question}"
