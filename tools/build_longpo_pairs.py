#!/usr/bin/env python
"""Build LongPO preference data with the model itself (docs/methods.md §2; docs/generation.md).

long documents -> chunks (bounds derived from the generator's window) -> N questions per chunk,
one kept, with a lead phrase -> chosen (answer given the chunk) and rejected (single-turn answer
given the whole document) -> filters -> one multi-turn JSONL line per document. The defaults
follow the LongPO reference code (docs/generation.md lists each with its source).
Rerunning the same command resumes: finished documents in --output are skipped.

Exit status: 0 done; 3 some documents failed (rerun to retry them); 2 usage error or too many
failures in a row (rerun after fixing the cause).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatron_longpo.generation.backends import SamplingParams
from megatron_longpo.generation.factory import build_backend, model_context_window
from megatron_longpo.generation.documents import read_documents
from megatron_longpo.generation.filters import LEAD_PHRASES, AnswerFilter
from megatron_longpo.generation.longpo import DEFAULT_QUESTION_PROMPT, LongPOBuilder, LongPOConfig
from megatron_longpo.generation.output import RunStats, TooManyFailures, finish_run
from megatron_longpo.generation.text import REFERENCE_MAX_CHUNK, REFERENCE_MIN_CHUNK, HFTokenCounter, chunk_bounds

from megatron_longpo.generation.cli import add_backend_args, backend_config_from_args, tokenizer_path_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="JSONL/Parquet/.txt/.md file, a directory of them, or a datasets.save_to_disk directory")
    p.add_argument("--output", "-o", required=True, help="output JSONL (appended to; resumable)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--id-field", default="id", help="record field with a stable id (default: hash of the text)")
    p.add_argument("--split", help="split of a saved DatasetDict")
    add_backend_args(p)
    d = p.add_argument_group("chunks and questions")
    d.add_argument("--generator-window", type=int,
                   help="the generator's native context window in tokens, from which the chunk bounds are derived "
                        "(default: max_position_embeddings of the model / --tokenizer config.json)")
    d.add_argument("--max-chunk-tokens", "--chunk-tokens", dest="max_chunk_tokens", type=int,
                   help="largest chunk (short context); default: window x 30000/32768, leaving room for the "
                        "answers (the reference: 30,000 for a 32K generator)")
    d.add_argument("--min-chunk-tokens", type=int,
                   help="smallest chunk kept; default: max x 16384/30000 (the reference: 16,384)")
    d.add_argument("--max-chunks", type=int, default=4, help="chunks used per document")
    d.add_argument("--questions-asked", type=int, default=4, help="N: questions the model writes per chunk")
    d.add_argument("--any-question-count", action="store_true",
                   help="keep a chunk whatever number of questions parse (default: exactly N, as the reference)")
    d.add_argument("--questions-per-chunk", type=int, default=1, help="questions kept per chunk (drawn at random)")
    d.add_argument("--question-prompt", default=DEFAULT_QUESTION_PROMPT,
                   help="template with {context} and {n}; @FILE reads it from a file")
    d.add_argument("--lead-phrase", action="append",
                   help="prefix of the instructions, drawn at random when given several times "
                        "(default: 20 phrases such as 'As described in the preceding text,')")
    d.add_argument("--no-lead-phrase", action="store_true", help="no prefix")
    d.add_argument("--max-pair-tokens", type=int, default=131072, help="limit on either side's long sequence")
    d.add_argument("--min-doc-tokens", type=int, default=0)
    d.add_argument("--max-doc-tokens", type=int, default=None)
    d.add_argument("--rejected-conditioning", choices=("independent", "history"), default="independent",
                   help="independent (default, as the reference): each rejected answer single-turn from the "
                        "document and its question; history: after the earlier kept rejected turns")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--docs-per-batch", type=int, default=8, help="documents generated together")
    d.add_argument("--max-consecutive-failures", type=int, default=8)
    g = p.add_argument_group("sampling (defaults: the reference code; chosen greedy as in the paper)")
    g.add_argument("--question-max-new-tokens", type=int, default=1024)
    g.add_argument("--question-temperature", type=float, default=0.7)
    g.add_argument("--question-top-p", type=float, default=0.9)
    g.add_argument("--max-new-tokens", type=int, default=1024, help="answers, chosen and rejected")
    g.add_argument("--chosen-temperature", type=float, default=0.0, help="0 = greedy (the paper)")
    g.add_argument("--chosen-top-p", type=float, default=1.0)
    g.add_argument("--rejected-temperature", type=float, default=1.0)
    g.add_argument("--rejected-top-p", type=float, default=1.0)
    f = p.add_argument_group("filters (defaults: the reference code)")
    f.add_argument("--min-answer-words", type=int, default=2, help="fewer words of >= 3 characters: dropped")
    f.add_argument("--chosen-max-repeated-share", type=float, default=0.9,
                   help="chosen answers whose share of repeated words is above this are dropped")
    f.add_argument("--rejected-max-repeated-share", type=float, default=0.95)
    f.add_argument("--max-ngram-repetition", type=float, default=None,
                   help="also drop answers whose word 4-gram repetition ratio is above this (off by default)")
    f.add_argument("--keep-refusals", action="store_true", help="keep chosen answers that refuse")
    f.add_argument("--drop-rejected-refusals", action="store_true",
                   help="also drop rejected answers that refuse or say the text lacks the answer (the reference "
                        "code's post-processing; default: kept, they are the long-context failures to push down)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve_chunk_bounds(a: argparse.Namespace) -> tuple[int, int]:
    """(min, max) chunk tokens: the flags, else `chunk_bounds` of the generator's window."""
    if a.max_chunk_tokens is not None:
        hi = a.max_chunk_tokens
        lo = hi * REFERENCE_MIN_CHUNK // REFERENCE_MAX_CHUNK
    else:
        window = a.generator_window or model_context_window(tokenizer_path_from_args(a))
        if window is None:
            raise ValueError("the generator's context window is unknown (no max_position_embeddings in its "
                             "config.json): pass --generator-window or --max-chunk-tokens")
        lo, hi = chunk_bounds(window, max(a.max_new_tokens, a.question_max_new_tokens))
    return (a.min_chunk_tokens if a.min_chunk_tokens is not None else lo), hi


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    a = parse_args(argv)
    t0 = time.time()
    try:
        if not Path(a.input).exists():  # first: a wrong path is the likeliest mistake, and says nothing else is wrong
            raise FileNotFoundError(f"input {a.input} does not exist")
        prompt = a.question_prompt
        if prompt.startswith("@"):
            with open(prompt[1:], encoding="utf-8") as fh:
                prompt = fh.read()
        lo, hi = resolve_chunk_bounds(a)
        leads = () if a.no_lead_phrase else tuple(a.lead_phrase or LEAD_PHRASES)
        cfg = LongPOConfig(
            min_chunk_tokens=lo, max_chunk_tokens=hi, max_chunks=a.max_chunks, questions_asked=a.questions_asked,
            exact_question_count=not a.any_question_count, questions_per_chunk=a.questions_per_chunk,
            question_prompt=prompt, lead_phrases=leads,
            max_pair_tokens=a.max_pair_tokens, min_doc_tokens=a.min_doc_tokens, max_doc_tokens=a.max_doc_tokens,
            rejected_conditioning=a.rejected_conditioning, seed=a.seed, docs_per_batch=a.docs_per_batch,
            max_consecutive_failures=a.max_consecutive_failures,
            question_params=SamplingParams(a.question_max_new_tokens, a.question_temperature, a.question_top_p, 1,
                                           a.seed),
            chosen_params=SamplingParams(a.max_new_tokens, a.chosen_temperature, a.chosen_top_p, 1, a.seed),
            rejected_params=SamplingParams(a.max_new_tokens, a.rejected_temperature, a.rejected_top_p, 1, a.seed),
            chosen_filter=AnswerFilter(a.chosen_max_repeated_share, a.min_answer_words,
                                       drop_refusals=not a.keep_refusals, max_ngram_repetition=a.max_ngram_repetition),
            rejected_filter=AnswerFilter(a.rejected_max_repeated_share, a.min_answer_words,
                                         drop_refusals=a.drop_rejected_refusals,
                                         max_ngram_repetition=a.max_ngram_repetition),
        )
        print(f"chunks of {lo}-{hi} tokens, up to {a.max_chunks} per document", file=sys.stderr)
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
