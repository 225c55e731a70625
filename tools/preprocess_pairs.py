#!/usr/bin/env python
"""Raw preference pairs (JSONL / Parquet / `datasets` directory) -> indexed dataset + manifest.

    python tools/preprocess_pairs.py --input data.jsonl --kind longpo \\
        --tokenizer HF_DIR --output data/longpo_train [--workers 8] [--max-length 131072]

Exit codes (docs/reliability.md): 0 every row kept; 3 dataset written but rows were dropped (listed
in the summary and in PREFIX.dropped.jsonl); 2 a user's mistake, bad input or an OS error the user
can fix (one line, nothing written); 1 a bug; 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading


from megatron_longpo.data.schema import KINDS
from megatron_longpo.data.preprocess import (
    DEFAULT_CONTEXT_TEMPLATE,
    EXIT_ERROR,
    PreprocessConfig,
    PreprocessError,
    PreprocessResult,
    run_preprocess,
)
from megatron_longpo.data.row_formats import parse_columns
from megatron_longpo.data.tokenizer import TokenizerSpec

MAX_LISTED = 10  # dropped rows listed per reason in the summary


def _unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` in a command-line template become newline, tab and backslash."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="JSONL/Parquet/.arrow files, a datasets directory, or a directory of data files")
    p.add_argument("--kind", required=True, choices=KINDS)
    p.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.json")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="Hugging Face tokenizer directory")
    tok.add_argument("--sentencepiece", help="SentencePiece model file (needs --chat-template)")
    p.add_argument("--chat-template", help="Jinja chat template file (overrides the tokenizer's)")
    p.add_argument("--context-template", default=DEFAULT_CONTEXT_TEMPLATE,
                   help="user message of a context turn; \\n is a newline (default: %(default)r)")
    p.add_argument("--max-length", type=int, help="longest allowed sequence, in tokens")
    p.add_argument("--on-overlength", choices=("fail", "skip"), default="fail",
                   help="fail: stop at the first over-length row; skip: drop and report it")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--chunk-size", type=int, default=256, help="rows per shard, the unit of resumption")
    p.add_argument("--columns", help="the inputs' column names for the native fields, e.g. "
                                     "prompt=question,chosen=good,rejected=bad (docs/data.md)")
    p.add_argument("--split", help="split to read from a datasets DatasetDict directory (default: train)")
    p.add_argument("--tokenization", choices=("spans", "whole"), default="spans",
                   help="spans: tokenize the text between special tokens once per record (fast, exact, "
                        "checked at start-up); whole: tokenize every sequence in full")
    p.add_argument("--verify", action="store_true", help="also tokenize every sequence whole and compare (slow)")
    p.add_argument("--fresh", action="store_true", help="discard an unfinished run's work directory")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug-chunk-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> PreprocessConfig:
    return PreprocessConfig(
        inputs=args.input,
        kind=args.kind,
        output=args.output,
        tokenizer=TokenizerSpec(args.tokenizer, args.sentencepiece, args.chat_template, args.tokenization),
        context_template=_unescape(args.context_template),
        max_length=args.max_length,
        on_overlength=args.on_overlength,
        workers=args.workers,
        chunk_size=args.chunk_size,
        split=args.split,
        columns=parse_columns(args.columns),
        verify=args.verify,
        fresh=args.fresh,
        progress=not args.no_progress,
        chunk_delay=args.debug_chunk_delay,
    )


def print_summary(res: PreprocessResult, console) -> None:
    from rich.table import Table

    t = Table(title=f"{res.kind} preprocessing summary", show_header=False)
    t.add_row("rows read", f"{res.rows_read:,}")
    t.add_row("kept", f"{res.kept:,}")
    t.add_row("dropped", f"{len(res.drops):,}")
    if res.chunks_resumed:
        t.add_row("resumed", f"{res.chunks_resumed} of {res.chunks} shards were already done")
    if res.stored_tokens:
        t.add_row("tokens stored", f"{res.stored_tokens:,} (role sequences hold {res.role_tokens:,}; "
                                   f"{res.role_tokens / res.stored_tokens:.2f}x)")
    t.add_row("time", f"{res.elapsed_s:.1f} s ({res.role_tokens / max(res.elapsed_s, 1e-9):,.0f} role tokens/s)")
    console.print(t)
    if res.kept:
        lt = Table(title="sequence lengths (tokens)")
        for col in ("role", "sequences", "min", "p50", "p90", "p99", "max", "mean"):
            lt.add_column(col, justify="right" if col != "role" else "left")
        for role, s in res.lengths.items():
            if s.get("count"):
                lt.add_row(role, f"{s['count']:,}", str(s["min"]), f"{s['p50']:.0f}", f"{s['p90']:.0f}",
                           f"{s['p99']:.0f}", str(s["max"]), f"{s['mean']:.1f}")
        console.print(lt)
    for reason, drops in res.drops_by_reason().items():
        console.print(f"[bold yellow]dropped {len(drops)} row(s): {reason}[/]")
        for d in drops[:MAX_LISTED]:
            console.print(f"  {d.location}: {d.detail}", markup=False, highlight=False)
        if len(drops) > MAX_LISTED:
            console.print(f"  ... and {len(drops) - MAX_LISTED} more (all in {res.prefix}.dropped.jsonl)")
    if res.written:
        console.print(f"wrote {res.prefix}.bin, .idx, .json (dataset hash {res.manifest['dataset_hash']})",
                      markup=False, highlight=False)
        if res.replaced_hash is not None and res.replaced_hash != res.manifest["dataset_hash"]:
            console.print(f"note: this replaced the dataset that was at {res.prefix} (dataset hash {res.replaced_hash}); "
                          f"reference sidecars computed for it no longer match: recompute them with "
                          f"tools/precompute_ref_logps.py --data {res.prefix}", markup=False, highlight=False)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from megatron_longpo.errors import cli_main

    return cli_main(_main, argv, "--output")


def _main(argv: list[str] | None = None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)  # never wrap file:line messages
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    # SIGTERM: clean up the worker pool and keep the finished shards, like Ctrl-C
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    try:
        cfg = config_from_args(args)
    except PreprocessError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return 2
    try:
        res = run_preprocess(cfg, log=lambda m: console.print(m, markup=False))
    except PreprocessError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("interrupted: rerun the same command to resume from the finished shards")
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print_summary(res, console)
    if not res.written:
        what = "no rows found" if res.rows_read == 0 else f"all {res.rows_read} rows were dropped"
        console.print(f"error: {what}; nothing written", markup=False)
    return res.exit_code


if __name__ == "__main__":
    sys.exit(main())
