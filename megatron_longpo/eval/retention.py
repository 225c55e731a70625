"""Short-context retention: does the model still do short things after long-context training?

Two measurements, reported the same way before and after training (one model per run; compare two
result files with `tools/eval_long.py --compare BEFORE.json AFTER.json`):

- held-out perplexity: the offline prose of `megatron_longpo/resources/documents` (each document tokenized
  on its own, without the chat template, cut into non-overlapping windows of `window` tokens; the
  perplexity is exp of the mean next-token negative log-likelihood over all predicted tokens). Needs
  the weights in process (the transformers backend); skipped for an HTTP server.
- a small hand-written QA set (`megatron_longpo/resources/retention_qa.jsonl`: simple factual and arithmetic
  questions), answered greedily through any `GenerationBackend`, one question per call (so the
  answers do not depend on the batch size), and scored by RULER's
  string_match_part (1 if any gold alias is a case-insensitive sub-string of the answer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Sequence

from megatron_longpo import resources
from megatron_longpo.eval.ruler import DEFAULT_DOCUMENTS, string_match_part
from megatron_longpo.generation.backends import GenerationBackend, SamplingParams

DEFAULT_QA = resources.RETENTION_QA
QA_SYSTEM_SUFFIX = " Answer briefly."


def load_qa(path: str | Path = DEFAULT_QA) -> list[dict]:
    items = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for i, it in enumerate(items):
        if not it.get("question") or not it.get("answers"):
            raise ValueError(f"{path}:{i + 1}: each line needs 'question' and a non-empty 'answers' list")
    return items


def load_texts(directory: str | Path = DEFAULT_DOCUMENTS) -> list[str]:
    d = Path(directory)
    paths = sorted(d.glob("*.md")) + sorted(d.glob("*.txt")) if d.is_dir() else [d]
    return [p.read_text(encoding="utf-8") for p in paths]


def perplexity(model, tokenizer, texts: Sequence[str], window: int = 512) -> dict:
    """exp(mean NLL) of next-token prediction over non-overlapping `window`-token pieces of each text."""
    per_doc = document_nll(model, tokenizer, texts, window)
    total_nll, total_tokens = sum(d[0] for d in per_doc), sum(d[1] for d in per_doc)
    if not total_tokens:
        raise ValueError("no text to measure perplexity on")
    mean = total_nll / total_tokens
    return {"perplexity": math.exp(mean), "mean_nll": mean, "tokens": total_tokens, "window": window}


def qa_accuracy(backend: GenerationBackend, items: Sequence[dict], max_new_tokens: int = 32,
                progress: Callable[[int], None] | None = None) -> dict:
    # One question per call: greedy decoding in bf16 depends on the padding a batch adds around a
    # prompt, and the answers must not change with --batch-size (two GPU runs at batch 8 and 16 disagreed on 2 of 16)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    records = []
    for it in items:
        pred = backend.chat([[{"role": "user", "content": it["question"] + QA_SYSTEM_SUFFIX}]], params)[0][0]
        records.append({"question": it["question"], "answers": it["answers"], "prediction": pred,
                        "score": string_match_part(pred, it["answers"])})
    if progress:
        progress(len(items))
    acc = 100.0 * sum(r["score"] for r in records) / max(1, len(records))
    return {"accuracy": acc, "n": len(records), "metric": "part", "records": records}


def run_retention(backend: GenerationBackend, model=None, tokenizer=None, qa_path: str | Path = DEFAULT_QA,
                  documents: str | Path = DEFAULT_DOCUMENTS, window: int = 512, max_new_tokens: int = 32) -> dict:
    out: dict = {"qa": qa_accuracy(backend, load_qa(qa_path), max_new_tokens)}
    out["qa"]["path"] = str(qa_path)
    if model is not None and tokenizer is not None:
        out["perplexity"] = perplexity(model, tokenizer, load_texts(documents), window)
        out["perplexity"]["documents"] = str(documents)
    else:
        out["perplexity"] = None
        out["perplexity_skipped"] = "needs the weights in process (--backend transformers)"
    return out


def document_nll(model, tokenizer, texts: Sequence[str], window: int = 1024) -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) per document: each tokenized alone (no chat template),
    cut into non-overlapping windows of `window` tokens."""
    import torch

    device = next(model.parameters()).device
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        nll, n = 0.0, 0
        for start in range(0, len(ids), window):
            piece = ids[start : start + window]
            if len(piece) < 2:
                continue
            x = torch.tensor([piece], device=device)
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least fp32
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(piece) - 1
        out.append((nll, n))
    return out


def perplexity_ci(per_doc: Sequence[tuple[float, int]], n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """exp(total NLL / total tokens) with a percentile bootstrap interval over documents (a document's
    tokens stay together: they are not independent)."""
    import numpy as np

    nll = np.array([d[0] for d in per_doc], float)
    tok = np.array([d[1] for d in per_doc], float)
    keep = tok > 0
    nll, tok = nll[keep], tok[keep]
    if not len(tok):
        raise ValueError("no text to measure perplexity on")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(tok), size=(n_boot, len(tok)))
    boots = np.exp(nll[idx].sum(1) / tok[idx].sum(1))
    lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2])
    return {"perplexity": float(math.exp(nll.sum() / tok.sum())), "lo": float(lo), "hi": float(hi),
            "documents": int(len(tok)), "tokens": int(tok.sum())}
