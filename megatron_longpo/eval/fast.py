"""The fast evaluation path: every sample of a run in one stream, tokenized once, ordered by generation
budget, asked length and tokens (prompts that share a prefix side by side); each prompt prefilled
alone with SDPA's fused causal kernel (a token prefix shared with the prompt before it -- the same
template and essay haystack up to the first needle -- is kept, not recomputed, where
kv_decode.Prefiller's rule says it pays: any on the CPU, at least half the prompt on a GPU; only the
last position's logits are computed), then decoded greedily in batches as large as the key/value memory
allows, stopping when every row of a batch has ended its turn: on a GPU over fixed-shape buffers with
each step replayed from a CUDA graph (generation/graph_decode.py), else with kv_decode's eager steps
(generation/kv_decode.py); the backend's `decode_stats` say where the time went (prefill, decode).

Against the path `TransformersBackend.chat` gives eval/runner.py (batches of `--batch-size`, 8 by
default, in task order, each conversation re-tokenized), the outputs are the same greedy decoding;
only the batch a prompt is decoded in changes, which can flip a bf16 near-tie (fp32: identical).

The model input is `ids(user, answer_prefix)`: the chat template around the task text, then RULER's
answer prefix as the start of the assistant turn.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from megatron_longpo.eval.stats import prompt_hash, score
from megatron_longpo.generation import graph_decode, kv_decode

IdsFn = Callable[[str, str], list[int]]


def plan(prompts: Sequence[list[int]], budgets: Sequence[int], groups: Sequence[int] | None, batch_size: int,
         token_budget: int | None) -> list[list[int]]:
    """Decode batches: rows of one generation budget and one group (the asked length), in token order,
    so that prompts sharing a prefix (the same template and haystack up to the first needle) are
    neighbours and the prefix is prefilled once; at most `batch_size` rows and, unless a batch is one
    row, rows x (longest prompt + budget) <= `token_budget` (None: no limit)."""
    g = groups or [0] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], g[i], prompts[i]))
    batches: list[list[int]] = []
    width = 0
    for i in order:
        cur = batches[-1] if batches else None
        same = cur is not None and (budgets[cur[0]], g[cur[0]]) == (budgets[i], g[i])
        w = max(width, len(prompts[i])) if same else len(prompts[i])
        fits = token_budget is None or (len(cur or []) + 1) * (w + budgets[i]) <= token_budget
        if same and len(cur) < batch_size and fits:
            cur.append(i)
            width = w
        else:
            batches.append([i])
            width = len(prompts[i])
    return batches


def greedy_stream(backend, prompts: Sequence[list[int]], budgets: Sequence[int], batch_size: int = 64,
                  progress: Callable[[int], None] | None = None, groups: Sequence[int] | None = None,
                  step: str | None = None) -> list[str]:
    """Greedy completions of token-id prompts with per-prompt generation budgets, decoded by
    `backend`'s model (a TransformersBackend) in the batches `plan` makes. `step` (default: the
    backend's `decode_step`, else auto): graph_decode.STEPS. The backend's `prefill_tokens` (default 0:
    one prompt a call) lets kv_decode.Prefiller prefill several prompts a call."""
    model, tok = backend.model, backend.tokenizer
    eos = backend._eos_ids()
    out: list[str | None] = [None] * len(prompts)
    prefiller = kv_decode.Prefiller(model, backend.decode_stats, batch_tokens=getattr(backend, "prefill_tokens", 0))
    batches = plan(prompts, budgets, groups, batch_size, backend._token_budget())
    step = graph_decode.choose(model, step or getattr(backend, "decode_step", "auto"))
    decoder = None
    if step != "eager":
        decoder = graph_decode.StaticDecoder(model, prefiller, graphs=step == "graph")
        decoder.reserve([(len(idx), max(len(prompts[r]) for r in idx) + budgets[idx[0]]) for idx in batches])
    try:
        for idx in batches:
            rows = [prompts[r] for r in idx]
            if decoder is not None:
                new = decoder(rows, budgets[idx[0]], eos, tok.pad_token_id)
            else:
                new = kv_decode.decode_batch(model, rows, budgets[idx[0]], eos, tok.pad_token_id, prefiller=prefiller)
            for r, ids in zip(idx, new, strict=True):
                out[r] = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
            if progress:
                progress(len(idx))
    finally:
        if decoder is not None:
            decoder.close()
    return out  # type: ignore[return-value]


def record(sample, prediction: str | None, seconds: float = 0.0) -> dict:
    """One scored sample: RULER's metric (`score`) and the word-boundary one (`score_word`)."""
    depths = (sample.meta or {}).get("depths") or []
    return {"task": sample.task, "length": sample.length, "index": sample.index, "n_tokens": sample.n_tokens,
            "metric": sample.metric, "answers": sample.answers, "prediction": prediction,
            "score": None if prediction is None else score(prediction, sample.answers, sample.metric),
            "score_word": None if prediction is None else score(prediction, sample.answers, sample.metric, True),
            "depth": depths[0] if len(depths) == 1 else None,
            "prompt_sha": prompt_hash(sample.prompt, getattr(sample, "answer_prefix", "")),
            "seconds": round(seconds, 4)}


def evaluate_fast(backend, samples: Sequence, ids: IdsFn, batch_size: int = 64,
                  progress: Callable[[int], None] | None = None, step: str | None = None) -> tuple[list[dict], float]:
    """(records, seconds of model time) for RULER samples (eval/ruler_tasks.py) or the smoke tasks'
    samples (eval/ruler.py, no answer prefix); `step`: greedy_stream's."""
    prompts = [ids(s.prompt, getattr(s, "answer_prefix", "")) for s in samples]
    sync = getattr(getattr(backend, "torch", None), "cuda", None)
    t0 = time.perf_counter()
    preds = greedy_stream(backend, prompts, [s.max_new_tokens for s in samples], batch_size, progress,
                          [s.length for s in samples], step)
    if sync is not None and sync.is_available():
        sync.synchronize()
    seconds = time.perf_counter() - t0
    per = seconds / max(1, len(samples))
    return [record(s, p, per) for s, p in zip(samples, preds)], seconds
