"""Answer filters for self-generated preference data (METHODS.md §2 step 5), and question parsing.

Each filter returns the *reason* an answer is dropped (a short stable string that the run summary
counts) or None when the answer is kept.

Repetition ratio
    The fraction of an answer's word n-grams (lower-cased `\\w+` words, n = 4 by default) that
    repeat an n-gram seen earlier in the same answer: `1 - distinct / total`. Ordinary prose scores
    near 0; a sentence looped k times scores about `1 - 1/k`; "yes yes yes ..." scores 1. An
    answer with fewer than n words scores 0. LongPO drops answers whose ratio exceeds 0.9.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_WORD = re.compile(r"\w+", re.UNICODE)

# Phrasings of a refusal or of a model declining to use the context. Matched case-insensitively
# after curly apostrophes are straightened.
REFUSAL_PATTERNS: tuple[str, ...] = (
    r"\bI (?:can ?not|can't|am unable to|'m unable to|am not able to|'m not able to|won't|will not) "
    r"(?:assist|help|answer|provide|comply|fulfil|fulfill|do that|complete|process|access)",
    r"\bI'?m sorry,? (?:but )?(?:I|that|this)\b",
    r"\bI apologi[sz]e,? but\b",
    r"\bas an AI(?: language)? (?:model|assistant)\b",
    r"\bI do(?: not|n't) have (?:access|enough information|the (?:text|document|context))\b",
    r"\b(?:the|this) (?:text|document|context|passage) does(?: not|n't) (?:provide|contain|mention|say)\b",
)
_REFUSAL = re.compile("|".join(f"(?:{p})" for p in REFUSAL_PATTERNS), re.IGNORECASE)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def repetition_ratio(text: str, n: int = 4) -> float:
    """`1 - distinct word n-grams / total word n-grams` (0 for fewer than n words)."""
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
    """Thresholds for dropping an answer; reasons: empty, refusal, repetitive, too_short."""

    min_words: int = 4
    max_repetition_ratio: float = 0.9
    repetition_ngram: int = 4
    drop_refusals: bool = True

    def reason(self, answer: str) -> str | None:
        if not answer.strip():
            return "empty"
        if self.drop_refusals and is_refusal(answer):
            return "refusal"
        if repetition_ratio(answer, self.repetition_ngram) > self.max_repetition_ratio:
            return "repetitive"
        if len(words(answer)) < self.min_words:
            return "too_short"
        return None


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
            if not items[-1].rstrip().endswith("?"):
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
