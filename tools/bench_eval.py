#!/usr/bin/env python
"""Time the evaluation paths on one model and identical samples, and print a table.

1. old vs new on the same samples: the smoke tasks (7 tasks x --old-samples at --old-length), through
   today's path (eval/runner.evaluate: TransformersBackend.chat in --batch-size groups) and through the
   fast path (eval/fast.py: one length-sorted stream, decode batches up to --fast-batch-size), with the
   same token ids; their predictions are compared one by one.
2. the new path on RULER's 13 tasks: --samples per task (31: 403 per length) at each of --lengths,
   with the time to build the samples and the time of the whole evaluation.
3. with --compare-step STEP: the same RULER samples again with another decode step (graph, static,
   eager), predictions and scores compared one by one: `--compare-step static` on a GPU checks the
   CUDA graphs against the same static step run eagerly (identical predictions expected).
4. with --compare-prefill-tokens N: the smoke samples of part 1 and the RULER samples again with
   another --prefill-tokens (several prompts a prefill call), predictions and scores compared one by one.

Every row says where the model time went: prefill seconds, decode seconds and decode steps (model
calls after the prefills), and for the graph step the capture seconds and graphs captured.

  python tools/bench_eval.py [--model HF_DIR] --out bench.json
  python tools/bench_eval.py --skip-old --lengths 16384 --compare-step static --out graphs.json
  python tools/bench_eval.py --compare-prefill-tokens 32768 --out prefill.json
  (defaults: the embedded SmolLM2-135M-Instruct; old path at 16K on 56 samples; new path at 4K, 8K,
  16K with 403 samples each; the new path's decode step: auto = CUDA graphs on a GPU)

Writes --out (JSON) and prints: path, suite, length, samples, seconds, prefill s, decode s, decode
steps, samples/s, score [95% CI].
Exit status: 0 done; 2 usage error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--old-length", type=int, default=16384)
    p.add_argument("--old-samples", type=int, default=8, help="per smoke task (7 tasks)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--samples", type=int, default=31, help="per RULER task (13 tasks)")
    p.add_argument("--tasks", nargs="+", help="RULER tasks (default: all 13)")
    p.add_argument("--smoke-tasks", nargs="+", help="smoke tasks of the old-vs-new part (default: all 7)")
    p.add_argument("--batch-size", type=int, default=8, help="the old path's batch (today's default)")
    p.add_argument("--fast-batch-size", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--skip-old", action="store_true", help="only the new path on RULER's tasks")
    p.add_argument("--prefill-tokens", type=int, metavar="N",
                   help="ruler --path fast: prefill several prompts a call, right-padded, up to N tokens a call "
                        "(0: one prompt a call; default: 32768 on a GPU, 0 on the CPU)")
    p.add_argument("--decode-step", choices=("auto", "graph", "static", "eager"), default="auto",
                   help="the new path's decode step (generation/graph_decode.py): graph = static buffers and "
                        "CUDA graphs, static = the same without capture, eager = kv_decode's steps; auto: graph "
                        "on a GPU, else eager")
    p.add_argument("--compare-step", choices=("graph", "static", "eager"),
                   help="also decode the RULER samples with this step and compare predictions and scores")
    p.add_argument("--compare-prefill-tokens", type=int, metavar="N",
                   help="also run the new path with --prefill-tokens N on the same samples (smoke and RULER, first "
                        "model) and compare predictions, scores and speed")
    p.add_argument("--models", nargs="+", default=[], metavar="HF_DIR",
                   help="more models evaluated on the same RULER samples after --model (new path only): the time "
                        "of a whole table of models")
    p.add_argument("--samples-cache", metavar="FILE",
                   help="keep the RULER samples in FILE and reuse them while the tokenizer and settings agree "
                        "(eval_long.py's --samples-cache)")
    p.add_argument("--out", default="bench_eval.json")
    return p.parse_args(argv)


def load(model_dir: str, a: argparse.Namespace):
    """The TransformersBackend of one model, with the new path's decode step and prefill settings."""
    from megatron_longpo.generation import graph_decode, kv_decode
    from megatron_longpo.generation.transformers_backend import TransformersBackend

    backend = TransformersBackend(model_dir, device=a.device, dtype=a.dtype, batch_size=a.batch_size,
                                  threads=a.threads, decode="prefill")
    backend.decode_step = graph_decode.choose(backend.model, a.decode_step)
    backend.prefill_tokens = kv_decode.prefill_tokens(backend.device, a.prefill_tokens)
    return backend


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    a = parse_args(argv)
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    from megatron_longpo.eval import fast, ruler, ruler_tasks, runner, suite
    from megatron_longpo.eval.stats import bootstrap_ci, score
    from megatron_longpo.generation import graph_decode, kv_decode
    from megatron_longpo.io import atomic_write_json

    console = Console(width=None if sys.stdout.isatty() else 160)  # a log keeps the whole table
    t_start = time.time()
    try:
        if a.model is None:
            from megatron_longpo.models.embedded import materialize_default_model

            a.model = str(materialize_default_model())
        for flag, n in (("--prefill-tokens", a.prefill_tokens), ("--compare-prefill-tokens", a.compare_prefill_tokens)):
            if n is not None and n < 0:
                raise ValueError(f"{flag} {n}: give 0 (one prompt a call) or a token count")
        tasks = a.tasks or list(ruler_tasks.RULER_TASKS)
        bad = [t for t in tasks if t not in ruler_tasks.TASKS]
        if bad:
            raise ValueError(f"--tasks {bad[0]}: not one of RULER's tasks ({' '.join(ruler_tasks.RULER_TASKS)})")
        t0 = time.time()
        backend = load(a.model, a)
        load_s = time.time() - t0
        if a.compare_step:
            graph_decode.choose(backend.model, a.compare_step)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    tok = backend.tokenizer
    import torch

    device = f"{backend.device}" + (f" ({torch.cuda.get_device_name()})" if backend.device.startswith("cuda") else "")
    rows: list[dict] = []

    def timed(fn):
        """fn()'s result and the decode counters of its run (prefill and decode seconds, steps)."""
        backend.decode_stats = kv_decode.DecodeStats()
        return fn(), backend.decode_stats.to_dict()

    def row(path, suite_name, length, recs, seconds, st, **extra):
        scores = [r["score"] for r in recs if r["score"] is not None]
        m, lo, hi = bootstrap_ci(scores, [r["task"] for r in recs if r["score"] is not None])
        rows.append({"path": path, "suite": suite_name, "length": length, "samples": len(recs),
                     "seconds": round(seconds, 3), "samples_per_s": round(len(recs) / max(seconds, 1e-9), 3),
                     "score": round(100 * m, 2), "ci": [round(100 * lo, 2), round(100 * hi, 2)],
                     **{k: st[k] for k in ("prefill_s", "decode_s", "decode_steps", "capture_s", "graphs",
                                           "batches", "rows", "padded_rows", "prefill_calls", "padded_tokens")},
                     **extra})

    def same(a_recs, b_recs):
        by_key = {(r["task"], r["length"], r["index"]): r for r in b_recs}
        pairs = [(o, by_key[(o["task"], o["length"], o["index"])]) for o in a_recs]
        return (sum(o["prediction"] == n["prediction"] for o, n in pairs),
                sum(o["score"] == n["score"] for o, n in pairs))

    prefill_compare = []

    def prefill_name(n):
        return f", prefill {n}" if n else ""

    def with_prefill(n, fn):
        """fn() run with the backend's prefill_tokens set to n, then set back."""
        keep, backend.prefill_tokens = backend.prefill_tokens, n
        try:
            return fn()
        finally:
            backend.prefill_tokens = keep

    def compare_prefill(suite_name, length, samples, ids, recs, secs, old_s=None):
        """The same samples again with --compare-prefill-tokens: their row, and predictions, scores and
        seconds against `recs` (the default prefill's, in `secs`)."""
        n = a.compare_prefill_tokens
        bar = tqdm(total=len(samples), desc=f"new path {length}, prefill {n}", unit="sample", file=sys.stderr)
        (other, other_s), st = with_prefill(n, lambda: timed(
            lambda: fast.evaluate_fast(backend, samples, ids, a.fast_batch_size, bar.update)))
        bar.close()
        extra = {} if old_s is None else {"speedup": round(old_s / max(other_s, 1e-9), 2)}
        row(f"new (fast, batch <= {a.fast_batch_size}, {backend.decode_step}){prefill_name(n)}", suite_name, length,
            other, other_s, st, **extra)
        same_pred, same_score = same(recs, other)
        prefill_compare.append({"suite": suite_name, "length": length, "prefill_tokens": [backend.prefill_tokens, n],
                                "predictions_identical": same_pred, "scores_identical": same_score,
                                "samples": len(recs), "seconds": [round(secs, 2), round(other_s, 2)]})

    # warm-up: kernels and allocator, outside every timing
    fast.greedy_stream(backend, [tok("Hello there, how are you?")["input_ids"]], [4], 1)

    compare = None
    if not a.skip_old:
        count = ruler.chat_prompt_counter(tok)
        smoke = ruler.generate_tasks(a.smoke_tasks or list(ruler.DEFAULT_TASKS), [a.old_length], a.old_samples, count)
        bar = tqdm(total=len(smoke), desc=f"old path {a.old_length}", unit="sample", file=sys.stderr)
        t0 = time.perf_counter()
        old, old_st = timed(lambda: runner.evaluate(backend, smoke, a.batch_size, progress=bar.update))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        old_s = time.perf_counter() - t0
        bar.close()
        for r in old:  # rescored like the new path's (RULER's post-processing)
            r["score"] = None if r["prediction"] is None else score(r["prediction"], r["answers"], r["metric"])
        bar = tqdm(total=len(smoke), desc=f"new path {a.old_length}", unit="sample", file=sys.stderr)

        def chat_ids(user, prefix):  # the smoke tasks have no answer prefix
            return backend._prompt_ids([{"role": "user", "content": user}])

        (new, new_s), new_st = timed(lambda: fast.evaluate_fast(backend, smoke, chat_ids, a.fast_batch_size,
                                                                bar.update))
        bar.close()
        same_pred, same_score = same(old, new)
        compare = {"predictions_identical": same_pred, "scores_identical": same_score, "samples": len(smoke)}
        row(f"old (runner.evaluate, batch {a.batch_size})", "smoke", a.old_length, old, old_s, old_st)
        row(f"new (fast, batch <= {a.fast_batch_size}, {backend.decode_step}){prefill_name(backend.prefill_tokens)}",
            "smoke", a.old_length, new, new_s, new_st, speedup=round(old_s / max(new_s, 1e-9), 2))
        if a.compare_prefill_tokens is not None:
            compare_prefill("smoke", a.old_length, smoke, chat_ids, new, new_s, old_s)

    t_eval = time.time()
    hay, qa_sets, prov = suite.load_inputs(tasks)
    sample_s, model_s, prefill_s, decode_s, capture_s = 0.0, 0.0, 0.0, 0.0, 0.0
    step_compare = []
    by_length = {}
    t0 = time.time()  # the samples, once for every model (one tokenizer)
    bar = tqdm(total=len(tasks) * a.samples * len(a.lengths), desc="samples", unit="sample", file=sys.stderr)
    built, ids = suite.cached_samples(a.samples_cache, tok, tasks, a.lengths, a.samples, 0, hay, qa_sets, prov,
                                      progress=bar.update)
    bar.close()
    sample_s += time.time() - t0
    for length in a.lengths:
        by_length[length] = [x for x in built if x.length == length], ids
    more_load_s = 0.0
    for m, model_dir in enumerate([a.model] + a.models):
        if m:  # the next model of the table, in the first one's place
            del backend
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            t0 = time.time()
            backend = load(model_dir, a)
            more_load_s += time.time() - t0
        name = "" if not a.models else f", {os.path.basename(os.path.normpath(model_dir))}"
        for length in a.lengths:
            samples, ids = by_length[length]
            bar = tqdm(total=len(samples), desc=f"new path {length}{name}", unit="sample", file=sys.stderr)
            (recs, secs), st = timed(lambda: fast.evaluate_fast(backend, samples, ids, a.fast_batch_size, bar.update))
            bar.close()
            model_s += secs
            prefill_s, decode_s, capture_s = (prefill_s + st["prefill_s"], decode_s + st["decode_s"],
                                              capture_s + st["capture_s"])
            row(f"new (fast, batch <= {a.fast_batch_size}, {backend.decode_step}){prefill_name(backend.prefill_tokens)}{name}",
                "ruler", length, recs, secs, st)
            if a.compare_prefill_tokens is not None and not m:
                compare_prefill("ruler", length, samples, ids, recs, secs)
            if a.compare_step and not m:
                bar = tqdm(total=len(samples), desc=f"{a.compare_step} step {length}", unit="sample", file=sys.stderr)
                (other, other_s), st = timed(lambda: fast.evaluate_fast(backend, samples, ids, a.fast_batch_size,
                                                                        bar.update, a.compare_step))
                bar.close()
                row(f"new (fast, batch <= {a.fast_batch_size}, {a.compare_step})", "ruler", length, other, other_s, st)
                same_pred, same_score = same(recs, other)
                step_compare.append({"length": length, "steps": [backend.decode_step, a.compare_step],
                                     "predictions_identical": same_pred, "scores_identical": same_score,
                                     "samples": len(recs), "seconds": [round(secs, 2), round(other_s, 2)]})
    total_eval = time.time() - t_eval

    table = Table(title=f"evaluation paths on {os.path.basename(os.path.normpath(a.model))}, {device}, "
                        f"dtype {backend.model.dtype}")
    for c in ("path", "suite", "length", "samples", "seconds", "prefill s", "decode s", "steps", "samples/s",
              "score [95% CI]"):
        table.add_column(c, justify="left" if c in ("path", "suite") else "right")
    for r in rows:
        table.add_row(r["path"], r["suite"], str(r["length"]), str(r["samples"]), f"{r['seconds']:.1f}",
                      f"{r['prefill_s']:.1f}", f"{r['decode_s']:.1f}", str(r["decode_steps"]),
                      f"{r['samples_per_s']:.2f}", f"{r['score']:.1f} [{r['ci'][0]:.1f}, {r['ci'][1]:.1f}]")
    console.print(table)
    if compare:
        console.print(f"old vs new on the same {compare['samples']} smoke samples: {compare['predictions_identical']} "
                      f"identical predictions, {compare['scores_identical']} identical scores; speed-up "
                      f"{rows[1]['speedup']:.1f}x")
    for c in step_compare:
        console.print(f"{c['steps'][0]} vs {c['steps'][1]} step at {c['length']} on the same {c['samples']} RULER "
                      f"samples: {c['predictions_identical']} identical predictions, {c['scores_identical']} "
                      f"identical scores; {c['seconds'][0]:.1f} s vs {c['seconds'][1]:.1f} s")
    for c in prefill_compare:
        console.print(f"prefill {c['prefill_tokens'][0]} vs {c['prefill_tokens'][1]} tokens a call, {c['suite']} at "
                      f"{c['length']}, the same {c['samples']} samples: {c['predictions_identical']} identical "
                      f"predictions, {c['scores_identical']} identical scores; {c['seconds'][0]:.1f} s vs "
                      f"{c['seconds'][1]:.1f} s")
    n_ruler = len(tasks) * a.samples * len(a.lengths)
    if a.models:
        n_ruler *= 1 + len(a.models)
        console.print(f"the table: {1 + len(a.models)} models x {len(a.lengths)} lengths x {len(tasks) * a.samples} samples; "
                      f"the {len(a.models)} models after the first loaded in {more_load_s:.1f} s")
    console.print(f"RULER, {n_ruler} samples ({len(tasks)} tasks x {a.samples} x {len(a.lengths)} lengths, "
                  f"{backend.decode_step} step): {total_eval:.1f} s in all (samples built {sample_s:.1f} s on the CPU, "
                  f"model {model_s:.1f} s: prefill {prefill_s:.1f} s, decode {decode_s:.1f} s, graph capture "
                  f"{capture_s:.1f} s); model load {load_s:.1f} s")
    out = {"model": a.model, "device": device, "dtype": str(backend.model.dtype), "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "decode_step": backend.decode_step,
           "prefill_tokens": backend.prefill_tokens,
           "rows": rows, "old_vs_new": compare, "step_compare": step_compare,
           "prefill_compare": prefill_compare,
           "ruler_total_s": round(total_eval, 2), "ruler_samples_s": round(sample_s, 2),
           "ruler_model_s": round(model_s, 2), "ruler_prefill_s": round(prefill_s, 2),
           "ruler_decode_s": round(decode_s, 2), "ruler_capture_s": round(capture_s, 2),
           "load_s": round(load_s, 2), "more_models_load_s": round(more_load_s, 2), "provenance": prov,
           "wall_s": round(time.time() - t_start, 2), "args": vars(a)}
    atomic_write_json(a.out, out)
    console.print(f"-> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
