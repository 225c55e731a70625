#!/usr/bin/env python
"""Offline long-context evaluation (docs/evaluation.md).

RULER's 13 tasks as RULER defines them (the default suite), regenerated at the asked lengths with the
model's tokenizer, scored with RULER's metric and a word-boundary one, with 95 % bootstrap CIs:

  python tools/eval_long.py --model HF_DIR --lengths 4096 8192 16384 --samples 31 --out r.json \\
      [--haystack-file PaulGrahamEssays.json] [--qa-file squad=squad.json --qa-file hotpotqa=hotpotqa.json] \\
      [--retention]
  python tools/eval_long.py --compare base.json longpo.json sft.json     (paired differences with CIs)
  python tools/eval_long.py --table base=base.json longpo=longpo.json   (a Markdown table, a row per model)
  python tools/eval_long.py --compare sft=sft.json,sft.s1.json longpo=longpo.json,longpo.s1.json
                                         (groups: a model's runs, one per training seed; their means)

The seven RULER-style smoke tasks of earlier versions: --suite smoke (fast; not comparable to RULER).
Writes OUT (JSON, atomically) and a picture beside it (ruler: OUT with .png, score against length with
CI bars; smoke: .svg), prints the tables.
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
from megatron_longpo.generation import graph_decode, kv_decode
from megatron_longpo.generation.factory import build_backend
from megatron_longpo.io import atomic_write_json

from megatron_longpo.generation.cli import add_backend_args, backend_config_from_args, tokenizer_path_from_args

from megatron_longpo.eval.ruler_tasks import RULER_TASKS  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("ruler", "smoke"), default="ruler",
                   help="ruler: RULER's 13 tasks as RULER defines them; smoke: the 7 fast RULER-style tasks")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096],
                   help="token counts (ruler: prompt + generation budget, as RULER's max_seq_length)")
    p.add_argument("--tasks", nargs="+",
                   help="ruler: any of " + " ".join(RULER_TASKS) + " (default: all); smoke: niah_single "
                        "niah_multikey niah_multivalue niah_multiquery vt cwe fwe (niah_* may end in _number, "
                        "_word or _uuid)")
    p.add_argument("--samples", type=int, help="samples per task and length (ruler: 31, 403 a length; smoke: 5)")
    p.add_argument("--haystack-file", help="ruler: RULER's PaulGrahamEssays.json or a plain-text file "
                                           "(default: the offline Python-reference prose)")
    p.add_argument("--qa-file", action="append", default=[], metavar="NAME=PATH",
                   help="ruler: squad=SQuAD-v2-dev.json (qa_1), hotpotqa=hotpot_dev_distractor.json (qa_2), as "
                        "RULER's download_qa_dataset.sh writes them (default: the offline cloze stand-in)")
    p.add_argument("--samples-cache", metavar="FILE",
                   help="ruler: keep the built samples here and reuse them while the tokenizer and settings agree "
                        "(a table of several models builds them once)")
    p.add_argument("--perplexity-file", help="ruler --retention: held-out documents, JSON lines with 'text'")
    p.add_argument("--retention-qa-samples", type=int, default=500,
                   help="ruler --retention: short-context questions (qa_1 at 2K tokens)")
    p.add_argument("--path", choices=("fast", "backend"), default="fast",
                   help="ruler: fast = one length-sorted stream, decode batches up to --fast-batch-size "
                        "(transformers only); backend = the backend's chat() in --batch-size groups (the path of "
                        "earlier versions; sends no answer prefix)")
    p.add_argument("--fast-batch-size", type=int, default=64, help="ruler --path fast: rows decoded together at "
                                                                   "most (also bounded by the key/value memory)")
    p.add_argument("--prefill-tokens", type=int, metavar="N",
                   help="ruler --path fast: prefill several prompts a call, right-padded, up to N tokens a call "
                        "(0: one prompt a call; default: 32768 on a GPU, 0 on the CPU)")
    p.add_argument("--memory-fraction", type=float, metavar="F",
                   help="ruler: a GPU shared with other jobs: cap this process's allocator at F of the GPU; the decode "
                        "batches are sized to fit under the cap (default: the card's free memory)")
    p.add_argument("--decode-step", choices=("auto", "graph", "static", "eager"), default="auto",
                   help="ruler --path fast: graph = static buffers and a CUDA graph a step, static = the same "
                        "without capture, eager = kv_decode's steps (auto: graph on a GPU, else eager)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="results JSON (required unless --compare or --table)")
    p.add_argument("--plot", help="picture path (default: OUT with .png, smoke: .svg; --compare: compare.png; "
                                  "'none' to skip)")
    p.add_argument("--max-new-tokens", type=int, help="smoke: override the per-task budgets (niah 128, vt 30, cwe 120, "
                                                      "fwe 50); ruler keeps RULER's")
    p.add_argument("--tolerance", type=float, default=0.02, help="prompts are within this fraction below the length")
    p.add_argument("--documents", default=str(DEFAULT_DOCUMENTS), help="smoke: offline prose for the needle haystacks")
    p.add_argument("--retention", action="store_true", help="also measure short-context retention")
    p.add_argument("--retention-qa", default=str(DEFAULT_QA))
    p.add_argument("--compare", nargs="+", metavar="RESULTS",
                   help="ruler results: each file minus the first, paired on identical prompts, with 95%% CIs "
                        "(NAME=RESULTS names a row; NAME=A.json,B.json,... a group: one model's runs, one per "
                        "training seed, compared by their mean with a CI over prompts and runs); smoke results: two "
                        "files, after - before (or groups)")
    p.add_argument("--table", nargs="+", metavar="NAME=RESULTS",
                   help="print a Markdown table of these result files (NAME=A.json,B.json,...: a row of their mean)")
    p.add_argument("--no-progress", action="store_true")
    add_backend_args(p)
    return p.parse_args(argv)


def read_groups(items, named: bool) -> list[tuple[str, list[dict]]]:
    """[(name, [results, ...])] from RESULTS, NAME=RESULTS or NAME=A.json,B.json,... (a group: one
    model's runs) arguments; ValueError names a bad one."""
    out = []
    for x in items:
        name, paths = x.split("=", 1) if "=" in x else ("", x)
        if named and not name:
            raise ValueError(f"--table takes NAME=RESULTS.json ...; got {x!r}")
        files = paths.split(",")
        if len(files) > 1 and not name:
            raise ValueError(f"{x!r}: a group of result files needs a name: NAME={x}")
        if not all(files):
            raise ValueError(f"{x!r}: an empty file name; write NAME=A.json,B.json")
        runs = []
        for path in files:
            try:
                runs.append(json.loads(Path(path).read_text()))
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}: not a results file ({e})") from None
        out.append((name or Path(files[0]).stem, runs))
    return out


def group_compare(groups, table: bool, console, plot: str | None) -> int:
    """RULER results, or groups of several runs (RULER or smoke): differences to the first, paired on
    identical prompts, with 95 % CIs (a group's mean over its runs); with `table` a Markdown table."""
    from megatron_longpo.eval import report

    if table:
        print(report.group_markdown(groups))
        return 0
    if len(groups) < 2:
        print("error: --compare takes two or more result files or groups (the first is the baseline)", file=sys.stderr)
        return 2
    for key in ("score", "score_word"):
        if all(key in r for _, runs in groups for run in runs for r in run["samples"][:1]):  # smoke: no score_word
            for t in report.group_compare(groups, key)[0]:
                console.print(t)
    if plot != "none":
        path = plot or "compare.png"
        try:
            report.plot([(name, runs[0] if len(runs) == 1 and "table" in runs[0] else
                          {"table": {"average": report.group_average(runs), "tasks": {}}})
                         for name, runs in groups], path, "RULER task average against length")
            console.print(f"plot {path}")
        except ImportError:
            print("no picture: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def ruler_main(a, console) -> int:
    """RULER's tasks for one model: samples, answers, scores with CIs, the picture."""
    from tqdm import tqdm

    from megatron_longpo.eval import corpus, report, suite

    t0 = time.time()
    tasks = a.tasks or list(RULER_TASKS)
    samples_per = 31 if a.samples is None else a.samples
    try:
        if not a.out:
            raise ValueError("--out RESULTS.json is required")
        if samples_per < 1:
            raise ValueError("--samples must be at least 1")
        if a.prefill_tokens is not None and a.prefill_tokens < 0:
            raise ValueError(f"--prefill-tokens {a.prefill_tokens}: give 0 (one prompt a call) or a token count")
        unknown = [t for t in tasks if t not in RULER_TASKS]
        if unknown:
            hint = " (a smoke task: add --suite smoke)" if unknown[0] in DEFAULT_TASKS or "_" in unknown[0] else ""
            raise ValueError(f"--tasks {unknown[0]}: not one of RULER's tasks{hint}; choose from "
                             + " ".join(RULER_TASKS))
        if a.path == "fast" and a.backend != "transformers":
            raise ValueError("--path fast needs --backend transformers (use --path backend with a server)")
        qa_files = {}
        for x in a.qa_file:
            if "=" not in x:
                raise ValueError(f"--qa-file {x}: give NAME=PATH, NAME squad or hotpotqa")
            k, v = x.split("=", 1)
            qa_files[k] = v
        if a.backend == "transformers" and not a.model:
            from megatron_longpo.models.embedded import materialize_default_model

            a.model = str(materialize_default_model())
            print(f"--model not given: using the embedded SmolLM2-135M-Instruct at {a.model}", file=sys.stderr)
        hay, qa_sets, prov = suite.load_inputs(tasks, a.haystack_file, qa_files)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path_from_args(a))
        n_samples = len(tasks) * len(a.lengths) * samples_per
        bar = tqdm(total=n_samples, desc="samples", unit="sample", disable=a.no_progress, file=sys.stderr)
        samples, ids = suite.cached_samples(a.samples_cache, tokenizer, tasks, a.lengths, samples_per, a.seed, hay,
                                            qa_sets, prov, a.tolerance, bar.update)
        bar.close()
        t_samples = time.time() - t0
        if a.memory_fraction is not None and not 0 < a.memory_fraction <= 1:
            raise ValueError(f"--memory-fraction {a.memory_fraction}: give a fraction in (0, 1]")
        from megatron_longpo import platform

        if a.backend == "transformers":
            platform.limit_gpu_memory(a.memory_fraction)  # before the model loads; the decode batches fit under it
        backend = build_backend(backend_config_from_args(a))
        t_load = time.time() - t0 - t_samples
        if a.path == "fast":
            backend.decode_step = graph_decode.choose(backend.model, a.decode_step)
            backend.prefill_tokens = kv_decode.prefill_tokens(backend.device, a.prefill_tokens)
    except (ValueError, FileNotFoundError, OSError) as e:  # CorpusError and LengthError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=len(samples), desc="eval", unit="sample", disable=a.no_progress, file=sys.stderr)
    try:
        records, seconds = suite.run(backend, samples, ids, a.path,
                                     a.fast_batch_size if a.path == "fast" else a.batch_size, bar.update)
        bar.close()
        retention, t_retention = None, 0.0
        if a.retention:
            t1 = time.time()
            bar = tqdm(total=a.retention_qa_samples, desc="retention QA", unit="sample",
                       disable=a.no_progress, file=sys.stderr)
            retention = suite.retention(backend, tokenizer, ids, qa_sets, a.seed, a.perplexity_file,
                                        a.retention_qa_samples, a.path, a.fast_batch_size, bar.update)
            bar.close()
            t_retention = time.time() - t1
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return 130
    except corpus.CorpusError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = {"tasks": tasks, "lengths": a.lengths, "samples": samples_per, "seed": a.seed,
              "tolerance": a.tolerance, "backend": a.backend, "model": a.model, "path": a.path,
              "batch_size": a.fast_batch_size if a.path == "fast" else a.batch_size, "dtype": a.dtype,
              "decode_step": getattr(backend, "decode_step", None) if a.path == "fast" else None,
              "prefill_tokens": getattr(backend, "prefill_tokens", None) if a.path == "fast" else None,
              "rope_theta": a.rope_theta, "tokenizer": tokenizer_path_from_args(a),
              "length_counted": "chat template around the task text (generation prompt, the template's system "
                                "prompt) + RULER's answer prefix + the task's generation budget"}
    wall = {"samples": round(t_samples, 2), "load": round(t_load, 2), "model": round(seconds, 2),
            "retention": round(t_retention, 2), "total": round(time.time() - t0, 2)}
    results = report.build(records, getattr(backend, "name", a.model or "model"), config, prov, wall, retention)
    atomic_write_json(a.out, results)
    for t in report.render(results):
        console.print(t)
    plot = a.plot or str(Path(a.out).with_suffix(".png"))
    if plot != "none":
        try:
            report.plot([(results["name"], results)], plot, f"{results['name']}: RULER score against length")
        except ImportError:
            print("no picture: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
            plot = "none"
    failed = sum(r["score"] is None for r in records)
    console.print(f"{len(records)} samples ({len(records) / max(seconds, 1e-9):.2f} samples/s on the model), "
                  f"{failed} failed; samples built in {t_samples:.1f} s, model loaded in {t_load:.1f} s, model "
                  f"{seconds:.1f} s" + (f", retention {t_retention:.1f} s" if a.retention else "")
                  + f", total {wall['total']:.1f} s -> {a.out}" + ("" if plot == "none" else f", plot {plot}"))
    return 3 if failed else 0


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    from rich.console import Console

    a = parse_args(argv)
    console = Console()
    if a.compare or a.table:
        try:
            groups = read_groups(a.compare or a.table, named=bool(a.table))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        versions = {r.get("version", 1) >= 2 for _, runs in groups for r in runs}
        if len(versions) > 1:
            print("error: RULER results (version 2) and smoke results cannot be compared", file=sys.stderr)
            return 2
        files = [(name, runs[0]) for name, runs in groups]
        if any(len(runs) > 1 for _, runs in groups) or all(r.get("version", 1) >= 2 for _, r in files):
            return group_compare(groups, bool(a.table), console, a.plot)
        if a.table:
            print(models_markdown(files))
            return 0
        if len(files) != 2:
            print("error: --compare of smoke results takes two files, BEFORE AFTER", file=sys.stderr)
            return 2
        console.print(compare_table(files[0][1], files[1][1]))
        return 0
    if a.suite == "ruler":
        return ruler_main(a, console)
    a.tasks = a.tasks or list(DEFAULT_TASKS)
    a.samples = 5 if a.samples is None else a.samples
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
