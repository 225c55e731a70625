"""Short answers: the final answer of a chain-of-thought response, and sub-string exact match
(SQuAD-style normalisation) against gold answers (SoLoPO's correctness check)."""

from __future__ import annotations

import re
import string
from typing import Iterable


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"\u2018", "\u2019", "\u201c", "\u201d", "\u2013", "\u2014"}


def normalize_answer(s: str) -> str:
    """SQuAD / MuSiQue normalisation: lower-case, drop punctuation, drop articles, collapse spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def sub_exact_match(prediction: str, golds: Iterable[str]) -> bool:
    """True when some normalised gold answer is a sub-string of the normalised prediction."""
    pred = normalize_answer(prediction)
    return any((g := normalize_answer(gold)) and g in pred for gold in golds)


_LABEL = re.compile(
    r"^[\s>#*_\-]*(?:\*\*|__)?\s*(?:the\s+|my\s+)?(?:final\s+answer|short\s+answer|answer)\s*(?:\*\*|__)?\s*[:\uff1a]"
    r"\s*(?:\*\*|__)?\s*(.*)$",
    re.IGNORECASE,
)
_PHRASE = re.compile(r"\b(?:the|my) (?:final |short )?answer is\s*:?\s*", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def _clean_answer(text: str) -> str:
    text = text.strip().replace("**", "").replace("__", "").strip("`*_ \t")
    return text.strip("\"'\u201c\u201d").strip().rstrip(".").strip()


def extract_final_answer(response: str) -> str | None:
    """The final answer of a chain-of-thought response, or None when it states none.

    Read, per line, a `\\boxed{X}`, else an answer label at the start of the line ("Answer: X",
    "**Final Answer:** X", "- answer: X"; X on the next line when the label ends the line), else
    "the (final) answer is X" (X up to the end of its sentence). The LAST line that holds one
    wins, so "Answer:" lines in the reasoning are overridden by the last. Markdown bold, quotes and
    a final period are stripped."""
    lines = response.replace("\r", "").split("\n")
    found: str | None = None
    for i, line in enumerate(lines):
        cand = None
        boxed = _BOXED.findall(line)
        if boxed:
            cand = boxed[-1]
        elif (m := _LABEL.match(line)) is not None:
            cand = m.group(1)
            if not _clean_answer(cand):  # "Answer:" alone: the answer is on the next non-empty line
                cand = next((ln for ln in lines[i + 1 :] if ln.strip()), "")
        else:
            phrases = list(_PHRASE.finditer(line))
            if phrases:  # the text after the last "the answer is" of the line
                rest = line[phrases[-1].end() :]
                end = _SENTENCE_END.search(rest)
                cand = rest[: end.start()] if end else rest
        if cand is not None and _clean_answer(cand):
            found = _clean_answer(cand)
    return found
