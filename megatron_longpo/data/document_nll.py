"""The document-NLL control: plain next-token NLL on the long documents alone, as SFT data.

"What does continued training on the same documents recover, without any preference signal?"
Each document becomes a `pair` record whose chosen response IS the document, after a fixed
one-line user prompt; trained with `loss.name=sft` (whose loss is the mean NLL of the chosen
response's tokens, and which reads no rejected sequence: the `rejected` field is a placeholder the
`pair` schema requires), the loss is the mean NLL of the document's tokens, plus the chat template's
one end-of-turn token, given the template's header and the prompt. tests/test_document_nll.py
checks that against transformers.
"""

from __future__ import annotations

from typing import Iterable, Iterator

DOC_NLL_PROMPT = "Write the document."
PLACEHOLDER_REJECTED = "-"  # required by the pair schema; loss.name=sft never reads it


def document_nll_record(text: str) -> dict:
    return {"prompt": DOC_NLL_PROMPT, "chosen": text, "rejected": PLACEHOLDER_REJECTED}


def document_nll_records(long_contexts: Iterable[str]) -> Iterator[dict]:
    """One record per distinct document, in first-seen order (a LongPO pairs file has one line per
    document; a document repeated across lines is trained on once, as LongPO sees it once)."""
    seen: set[str] = set()
    for text in long_contexts:
        if text not in seen:
            seen.add(text)
            yield document_nll_record(text)
