#!/usr/bin/env python
"""Build LongPO preference data with the model itself (METHODS.md §2; docs/generation.md).

long documents -> chunks -> questions per chunk -> chosen (answer given the chunk) and rejected
(answer given the whole document) -> filters -> one multi-turn JSONL line per document.
Rerunning the same command resumes: finished documents in --output are skipped.

Exit status: 0 done; 3 some documents failed (rerun to retry them); 2 usage error or too many
failures in a row (rerun after fixing the cause).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_longpo.generation.backends import (
    SamplingParams, add_backend_args, backend_config_from_args, build_backend, tokenizer_path_from_args)
from megatron_longpo.generation.filters import AnswerFilter
from megatron_longpo.generation.longpo import (
    DEFAULT_QUESTION_PROMPT, LongPOBuilder, LongPOConfig, read_documents)
from megatron_longpo.generation.output import RunStats, TooManyFailures, finish_run
from megatron_longpo.generation.text import HFTokenCounter


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="JSONL/Parquet/.txt/.md file, a directory of them, or a datasets.save_to_disk directory")
    p.add_argument("--output", "-o", required=True, help="output JSONL (appended to; resumable)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id", help="record field with a stable id (default: hash of the text)")
    p.add_argument("--split", help="split of a saved DatasetDict")
    add_backend_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--chunk-tokens", type=int, default=32768, help="token budget of one chunk (short context)")
    d.add_argument("--max-chunks", type=int, default=4, help="chunks used per document")
    d.add_argument("--questions-asked", type=int, default=4, help="questions the model writes per chunk")
    d.add_argument("--questions-per-chunk", type=int, default=1, help="questions kept per chunk (drawn at random)")
    d.add_argument("--question-prompt", default=DEFAULT_QUESTION_PROMPT,
                   help="template with {context} and {n}; @FILE reads it from a file")
    d.add_argument("--lead-phrase", default="", help='prefix of every instruction, e.g. "As described in the preceding text,"')
    d.add_argument("--max-pair-tokens", type=int, default=131072, help="limit on either side's long sequence")
    d.add_argument("--min-doc-tokens", type=int, default=0)
    d.add_argument("--max-doc-tokens", type=int, default=None)
    d.add_argument("--rejected-conditioning", choices=("history", "independent"), default="history",
                   help="history: rejected turn i sees the long context and the earlier kept rejected turns")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--docs-per-batch", type=int, default=8, help="documents generated together")
    d.add_argument("--max-consecutive-failures", type=int, default=8)
    g = p.add_argument_group("sampling")
    g.add_argument("--question-max-new-tokens", type=int, default=256)
    g.add_argument("--question-temperature", type=float, default=0.7)
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answers")
    g.add_argument("--temperature", type=float, default=0.0, help="answers (0 = greedy, as in the paper)")
    g.add_argument("--top-p", type=float, default=1.0, help="answers")
    f = p.add_argument_group("filters")
    f.add_argument("--min-answer-words", type=int, default=4)
    f.add_argument("--max-repetition-ratio", type=float, default=0.9)
    f.add_argument("--keep-refusals", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    a = parse_args(argv)
    t0 = time.time()
    try:
        prompt = a.question_prompt
        if prompt.startswith("@"):
            with open(prompt[1:], encoding="utf-8") as fh:
                prompt = fh.read()
        cfg = LongPOConfig(
            chunk_tokens=a.chunk_tokens, max_chunks=a.max_chunks, questions_asked=a.questions_asked,
            questions_per_chunk=a.questions_per_chunk, question_prompt=prompt, lead_phrase=a.lead_phrase,
            max_pair_tokens=a.max_pair_tokens, min_doc_tokens=a.min_doc_tokens, max_doc_tokens=a.max_doc_tokens,
            rejected_conditioning=a.rejected_conditioning, seed=a.seed, docs_per_batch=a.docs_per_batch,
            max_consecutive_failures=a.max_consecutive_failures,
            question_params=SamplingParams(a.question_max_new_tokens, a.question_temperature, 0.95, 1, a.seed),
            answer_params=SamplingParams(a.max_new_tokens, a.temperature, a.top_p, 1, a.seed),
            answer_filter=AnswerFilter(a.min_answer_words, a.max_repetition_ratio, drop_refusals=not a.keep_refusals),
        )
        if not Path(a.input).exists():
            raise FileNotFoundError(f"input {a.input} does not exist")
        counter = HFTokenCounter.from_pretrained(tokenizer_path_from_args(a))
        backend = build_backend(backend_config_from_args(a))
        docs = read_documents(a.input, a.text_field, a.id_field, a.split)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stats = RunStats()
    status = 0
    try:
        LongPOBuilder(backend, counter, cfg, stats).run(docs, a.output, progress=not a.no_progress)
    except TooManyFailures as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except (ValueError, FileNotFoundError) as e:  # bad input met mid-run: results so far are kept
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        status = 130
    stats.count("seconds", round(time.time() - t0, 1))
    return finish_run("build_longpo_pairs", f"LongPO pairs -> {a.output}", a.output, stats, backend, status,
                      "some documents failed: rerun the same command to retry them" if stats.failures else None)


if __name__ == "__main__":
    sys.exit(main())
