#!/usr/bin/env python
"""Offline long-context evaluation (docs/evaluation.md): RULER-style synthetic tasks regenerated at the
asked token lengths with the model's tokenizer, plus optional short-context retention.

  python tools/eval_long.py --model HF_DIR --lengths 1024 2048 --tasks niah_single vt cwe \\
      --samples 5 --seed 0 --out results.json [--backend openai --base-url URL --tokenizer HF_DIR] [--retention]
  python tools/eval_long.py --compare before.json after.json
  python tools/eval_long.py --table base=base.json longpo=longpo.json ...   (a Markdown table, a row per model)

Writes OUT (JSON, atomically) and OUT with .svg (score against length), prints a table.
Exit status: 0 done; 2 usage error; 3 some generations failed (their scores are left out).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from megatron_longpo.eval.retention import DEFAULT_QA, run_retention
from megatron_longpo.eval.ruler import (DEFAULT_DOCUMENTS, DEFAULT_TASKS, chat_prompt_counter,
                                        generate_tasks)
from megatron_longpo.eval.runner import (build_results, compare_table, evaluate, models_markdown, render_retention,
                                         render_table, svg_plot)
from megatron_longpo.generation.factory import build_backend
from megatron_longpo.io import atomic_write_json

from megatron_longpo.generation.cli import add_backend_args, backend_config_from_args, tokenizer_path_from_args


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt token counts")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                   help="niah_single niah_multikey niah_multivalue niah_multiquery vt cwe fwe "
                        "(niah_* may end in _number, _word or _uuid)")
    p.add_argument("--samples", type=int, default=5, help="samples per task and length")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON (required unless --compare or --table)")
    p.add_argument("--plot", help="SVG plot path (default: OUT with .svg; 'none' to skip)")
    p.add_argument("--max-new-tokens", type=int, help="override the per-task budgets (niah 128, vt 30, cwe 120, fwe 50)")
    p.add_argument("--tolerance", type=float, default=0.02, help="prompts are within this fraction below the length")
    p.add_argument("--documents", default=str(DEFAULT_DOCUMENTS), help="offline prose for the needle haystacks")
    p.add_argument("--retention", action="store_true", help="also measure short-context retention")
    p.add_argument("--retention-qa", default=str(DEFAULT_QA))
    p.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="print after - before of two result files")
    p.add_argument("--table", nargs="+", metavar="NAME=RESULTS", help="print a Markdown table of these result files")
    p.add_argument("--no-progress", action="store_true")
    add_backend_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    from rich.console import Console

    a = parse_args(argv)
    console = Console()
    if a.compare:
        try:
            before, after = (json.loads(Path(f).read_text()) for f in a.compare)
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        console.print(compare_table(before, after))
        return 0
    if a.table:
        try:
            named = [(x.split("=", 1)[0], json.loads(Path(x.split("=", 1)[1]).read_text())) for x in a.table]
        except (IndexError, OSError, json.JSONDecodeError) as e:
            print(f"error: --table takes NAME=RESULTS.json ...: {e}", file=sys.stderr)
            return 2
        print(models_markdown(named))
        return 0
    t0 = time.time()
    try:
        if not a.out:
            raise ValueError("--out RESULTS.json is required")
        if a.samples < 1:
            raise ValueError("--samples must be at least 1")
        if a.backend == "transformers" and not a.model:
            from megatron_longpo.models.embedded import materialize_default_model

            a.model = str(materialize_default_model())
            print(f"--model not given: using the embedded SmolLM2-135M-Instruct at {a.model}", file=sys.stderr)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path_from_args(a))
        samples = generate_tasks(a.tasks, a.lengths, a.samples, chat_prompt_counter(tokenizer), a.seed,
                                 a.documents, a.tolerance)
        backend = build_backend(backend_config_from_args(a))
    except (ValueError, FileNotFoundError, OSError) as e:  # LengthError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = len(samples) + (1 if a.retention else 0)
    from tqdm import tqdm

    bar = tqdm(total=total, desc="eval", unit="sample", disable=a.no_progress, file=sys.stderr)
    try:
        records = evaluate(backend, samples, a.batch_size, a.max_new_tokens, bar.update)
        retention = None
        if a.retention:
            retention = run_retention(backend, getattr(backend, "model", None), getattr(backend, "tokenizer", None),
                                      a.retention_qa)
            bar.update(1)
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    finally:
        bar.close()
    config = {"tasks": a.tasks, "lengths": a.lengths, "samples": a.samples, "seed": a.seed,
              "tolerance": a.tolerance, "max_new_tokens": a.max_new_tokens, "documents": a.documents,
              "backend": a.backend, "model": a.model, "base_url": a.base_url,
              "tokenizer": tokenizer_path_from_args(a), "rope_theta": a.rope_theta,
              # greedy outputs depend on the batch (padding) and the dtype: compare runs made alike
              "batch_size": a.batch_size, "max_attention_cells": a.max_attention_cells, "dtype": a.dtype,
              "length_counted": "chat template (user message, "
              "generation prompt, template's system prompt) tokenized without extra special tokens"}
    results = build_results(records, backend.name, config, time.time() - t0, retention)
    atomic_write_json(a.out, results)
    console.print(render_table(results))
    if retention:
        console.print(render_retention(retention))
    plot = a.plot or str(Path(a.out).with_suffix(".svg"))
    if plot != "none":
        Path(plot).write_text(svg_plot(results["summary"], f"{backend.name}: score vs prompt length"))
    failed = sum(r["score"] is None for r in records)
    console.print(f"{len(records)} samples, {failed} failed, {results['seconds']:.1f} s -> {a.out}"
                  + ("" if plot == "none" else f", plot {plot}"))
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
