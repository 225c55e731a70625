"""One RULER evaluation of one model, start to end: the inputs with their provenance, the samples
(identical for every model with the same tokenizer and seed), the model's answers by the fast path or
a backend's chat(), and the retention measures. tools/eval_long.py and tools/bench_eval.py call it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from megatron_longpo.eval import corpus, ruler_tasks
from megatron_longpo.eval.fast import evaluate_fast, record
from megatron_longpo.eval.stats import bootstrap_ci

RETENTION_QA_LENGTH = 2048
RETENTION_QA_SAMPLES = 500


def load_inputs(tasks: Sequence[str], haystack_file: str | None = None,
                qa_files: dict[str, str] | None = None) -> tuple[corpus.Haystack, dict, dict]:
    """(haystack, QA sets by dataset name, provenance); CorpusError names a bad user file."""
    hay = corpus.load_haystack(haystack_file)
    qa_sets: dict[str, corpus.QASet] = {}
    for name, path in (qa_files or {}).items():
        qa_sets[name] = corpus.load_qa_file(name, path)
    for t in tasks:
        family, args = ruler_tasks.TASKS[t]
        if family == "qa" and args["dataset"] not in qa_sets:
            qa_sets[args["dataset"]] = corpus.standin_qa()
    prov = {"haystack": hay.provenance(), "qa": {k: v.provenance() for k, v in qa_sets.items()}}
    return hay, qa_sets, prov


def make_samples(tokenizer, tasks: Sequence[str], lengths: Sequence[int], samples: int, seed: int,
                 haystack, qa_sets: dict, tolerance: float = 0.02,
                 progress: Callable[[int], None] | None = None):
    """(samples, ids): RULER samples counted with `tokenizer`'s chat template, and the function that
    turns (user text, answer prefix) into the model's input ids."""
    count, ids = ruler_tasks.chat_counter(tokenizer)
    out = ruler_tasks.generate(tasks, lengths, samples, count, haystack, qa_sets, seed, tolerance, progress)
    return out, ids


def tokenizer_sha(tokenizer) -> str:
    """What the samples depend on in a tokenizer: its vocabulary and rules, and its chat template."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = (backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items())))
    return hashlib.sha256((text + str(getattr(tokenizer, "chat_template", ""))).encode()).hexdigest()[:16]


class PromptIds:
    """`ids(user, prefix)` that keeps what it tokenized (compact, as numpy arrays), and answers from ids
    given up front: a table of models on one tokenizer tokenizes each prompt once (about 12 s for RULER's
    1,209 samples at 4K/8K/16K on a 2-core machine)."""

    def __init__(self, ids: Callable[[str, str], list[int]], known: dict | None = None) -> None:
        self._ids = ids
        self._known = dict(known or {})

    def array(self, user: str, prefix: str):
        import numpy as np

        got = self._known.get((user, prefix))
        if got is None:
            got = self._known[(user, prefix)] = np.asarray(self._ids(user, prefix), dtype=np.int64)
        return got

    def __call__(self, user: str, prefix: str) -> list[int]:
        return self.array(user, prefix).tolist()


def _pack_ids(a) -> dict:
    import base64

    dtype = "uint16" if a.size == 0 or int(a.max()) < 2**16 else "uint32"
    return {"dtype": dtype, "b64": base64.b64encode(a.astype(dtype).tobytes()).decode("ascii")}


def _unpack_ids(d: dict):
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(d["b64"]), dtype=d["dtype"]).astype(np.int64)


def cached_samples(path: str | None, tokenizer, tasks, lengths, samples: int, seed: int, haystack, qa_sets: dict,
                   provenance: dict, tolerance: float = 0.02, progress: Callable[[int], None] | None = None):
    """make_samples, kept in `path` (JSON, with each sample's model input ids) for the next model with the
    same tokenizer and settings: a table of several models builds and tokenizes its samples once. A file
    made with other settings is rebuilt. The ids function returned is a PromptIds."""
    import json
    from pathlib import Path

    from megatron_longpo.io import atomic_write_json

    key = {"tokenizer": tokenizer_sha(tokenizer), "tasks": list(tasks), "lengths": list(lengths),
           "samples": samples, "seed": seed, "tolerance": tolerance, "provenance": provenance, "format": 2}
    _, ids = ruler_tasks.chat_counter(tokenizer)
    if path and Path(path).is_file():
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError):
            data = {}
        if data.get("key") == key:
            out = [ruler_tasks.Sample(**d) for d in data["samples"]]
            known = {(x.prompt, x.answer_prefix): _unpack_ids(d) for x, d in zip(out, data["ids"], strict=True)}
            if progress:
                progress(len(out))
            return out, PromptIds(ids, known)
    out, ids = make_samples(tokenizer, tasks, lengths, samples, seed, haystack, qa_sets, tolerance, progress)
    ids = PromptIds(ids)
    if path:
        atomic_write_json(path, {"key": key, "samples": [x.to_dict() for x in out],
                                 "ids": [_pack_ids(ids.array(x.prompt, x.answer_prefix)) for x in out]})
    return out, ids


def run_backend(backend, samples: Sequence, batch_size: int = 8,
                progress: Callable[[int], None] | None = None) -> tuple[list[dict], float]:
    """The earlier path: `backend.chat` per group of `batch_size` conversations, in task order. The chat
    API cannot start the assistant turn, so an answer prefix is not sent (the records say so)."""
    from megatron_longpo.generation.backends import GenerationError, SamplingParams

    t0 = time.perf_counter()
    records = []
    by_budget: dict[int, list] = {}
    for s in samples:
        by_budget.setdefault(s.max_new_tokens, []).append(s)
    for budget, group in by_budget.items():
        params = SamplingParams(max_new_tokens=budget, temperature=0.0)
        for start in range(0, len(group), max(1, batch_size)):
            batch = group[start : start + batch_size]
            try:
                outs = backend.chat([[{"role": "user", "content": s.prompt}] for s in batch], params)
            except GenerationError as e:
                outs = e.partial
            for s, o in zip(batch, outs):
                r = record(s, o[0] if o else None)
                if getattr(s, "answer_prefix", ""):
                    r["answer_prefix_sent"] = False
                records.append(r)
            if progress:
                progress(len(batch))
    cuda = getattr(getattr(backend, "torch", None), "cuda", None)
    if cuda is not None and cuda.is_available():
        cuda.synchronize()
    seconds = time.perf_counter() - t0
    for r in records:
        r["seconds"] = round(seconds / max(1, len(records)), 4)
    return records, seconds


def run(backend, samples: Sequence, ids, path: str = "fast", batch_size: int = 64,
        progress: Callable[[int], None] | None = None) -> tuple[list[dict], float]:
    if path == "fast":
        return evaluate_fast(backend, samples, ids, batch_size, progress)
    return run_backend(backend, samples, batch_size, progress)


def retention(backend, tokenizer, ids, qa_sets: dict, seed: int = 0, perplexity_file: str | None = None,
              qa_samples: int = RETENTION_QA_SAMPLES, path: str = "fast", batch_size: int = 64,
              progress: Callable[[int], None] | None = None) -> dict:
    """Held-out perplexity with a CI over documents, and short-context QA (RULER's qa_1 at 2K tokens,
    `qa_samples` questions) with CIs under both metrics."""
    from megatron_longpo.eval.retention import document_nll, perplexity_ci

    out: dict = {}
    model = getattr(backend, "model", None)
    if model is not None:
        docs, prov = corpus.load_heldout(perplexity_file or corpus.DEFAULT_HELDOUT)
        per_doc = document_nll(model, tokenizer, docs)
        out["perplexity"] = {**perplexity_ci(per_doc), "provenance": prov,
                             "per_document": [[round(a, 4), b] for a, b in per_doc]}
    else:
        out["perplexity"] = None
    count, _ = ruler_tasks.chat_counter(tokenizer)
    if "squad" not in qa_sets:
        qa_sets = {**qa_sets, "squad": corpus.standin_qa()}
    hay = corpus.load_haystack(None)
    qs = ruler_tasks.generate(["qa_1"], [RETENTION_QA_LENGTH], qa_samples, count, hay, qa_sets, seed)
    recs, seconds = run(backend, qs, ids, path, batch_size, progress)
    qa = {"task": "qa_1", "length": RETENTION_QA_LENGTH, "n": len(recs), "seconds": round(seconds, 2),
          "dataset": qa_sets["squad"].provenance()}
    for key in ("score", "score_word"):
        m, lo, hi = bootstrap_ci([r[key] for r in recs if r[key] is not None])
        qa[key] = {"mean": m, "lo": lo, "hi": hi}
    qa["records"] = recs
    out["qa"] = qa
    return out
