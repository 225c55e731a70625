#!/usr/bin/env python
"""Build SoLoPO short/long preference data from multi-hop QA records (docs/methods.md §3; docs/generation.md).

QA records with supporting and distractor passages -> short context (supporting passages) and
long context (the same passages among distractors, up to --target-long-tokens) -> N
chain-of-thought responses sampled on the short context (reasoning, then "Answer: ...") -> the
final answer of each scored by sub-string exact match against the gold answers -> chosen (a
correct response) and rejected (a wrong one) -> JSONL. Rerunning the same command resumes.

Exit status: 0 done; 3 some records failed (rerun to retry them); 2 usage error or too many
failures in a row.
"""
from __future__ import annotations

import argparse
import sys
import time

from megatron_longpo.generation.backends import SamplingParams
from megatron_longpo.generation.factory import build_backend
from megatron_longpo.generation.output import RunStats, TooManyFailures, finish_run
from megatron_longpo.generation.solopo import (
    DEFAULT_INSTRUCTION, SHORT_ANSWER_INSTRUCTION, SoLoPOBuilder, SoLoPOConfig, read_qa_records)
from megatron_longpo.generation.text import HFTokenCounter

from megatron_longpo.generation.cli import add_backend_args, backend_config_from_args, tokenizer_path_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="QA records: JSONL file (native, MuSiQue or HotpotQA schema) or a directory of them")
    p.add_argument("--output", "-o", required=True, help="output JSONL (appended to; resumable)")
    add_backend_args(p)
    d = p.add_argument_group("data")
    d.add_argument("--target-long-tokens", type=int, default=7500, help="length of the long context")
    d.add_argument("--samples", type=int, default=32, help="responses sampled per record on the short context (paper: 32)")
    d.add_argument("--temperature", type=float, default=0.85, help="paper: 0.85")
    d.add_argument("--top-p", type=float, default=1.0)
    d.add_argument("--max-new-tokens", type=int, default=1024, help="room for the reasoning and the answer line")
    d.add_argument("--instruction-template",
                   help="with {question} (default: reason step by step, then a last line 'Answer: ...'; with "
                        "--score-whole-response: 'Give a short answer.')")
    d.add_argument("--score-whole-response", action="store_true",
                   help="score the whole response by sub-EM instead of its final-answer line (short-answer prompts)")
    d.add_argument("--max-pair-tokens", type=int, default=32768)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--records-per-batch", type=int, default=8)
    d.add_argument("--max-consecutive-failures", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    a = parse_args(argv)
    t0 = time.time()
    stats = RunStats()
    try:
        cfg = SoLoPOConfig(
            target_long_tokens=a.target_long_tokens, n_samples=a.samples,
            sampling=SamplingParams(a.max_new_tokens, a.temperature, a.top_p, 1, a.seed),
            instruction_template=a.instruction_template or (
                SHORT_ANSWER_INSTRUCTION if a.score_whole_response else DEFAULT_INSTRUCTION),
            final_answer=not a.score_whole_response, max_pair_tokens=a.max_pair_tokens, seed=a.seed,
            records_per_batch=a.records_per_batch, max_consecutive_failures=a.max_consecutive_failures,
        )
        records = read_qa_records(a.input, stats)
        counter = HFTokenCounter.from_pretrained(tokenizer_path_from_args(a))
        backend = build_backend(backend_config_from_args(a))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = 0
    try:
        SoLoPOBuilder(backend, counter, cfg, stats).run(records, a.output, progress=not a.no_progress)
    except TooManyFailures as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        status = 130
    stats.count("seconds", round(time.time() - t0, 1))
    failed = any(k != "malformed" for k in stats.failures)
    return finish_run("build_solopo_pairs", f"SoLoPO pairs -> {a.output}", a.output, stats, backend, status,
                      "some records failed: rerun the same command to retry them" if failed else None)


if __name__ == "__main__":
    sys.exit(main())
