"""Run RULER-style samples through a generation backend, score them, and report.

`evaluate` sends each group of samples of one length and one generation budget (tasks with the
same budget share batches: the four niah tasks do) through `backend.chat` greedily and scores
every output with the task's metric; `summarize` averages per task and length (x100), with the
standard error of each mean (`standard_error`: sample standard deviation / sqrt(n) of the per-sample
scores); `averages` is RULER's per-length mean over tasks and `average_errors` its standard error,
propagated from the tasks' (sqrt(sum of SE_t^2) / T: the samples of different tasks are
independent, and the task set is fixed, so its spread between tasks is not noise); the results
dict is written as JSON atomically (`megatron_longpo.io.atomic_write_json`), rendered as a rich
table, and plotted as a hand-written SVG (matplotlib is not a dependency). `compare_table` prints
the difference between two result files (before / after training).
"""

from __future__ import annotations

import html
import math
import time
from collections import defaultdict
from typing import Callable, Sequence

from megatron_longpo.eval.ruler import Sample, score
from megatron_longpo.eval.stats import length_label
from megatron_longpo.generation.backends import GenerationBackend, GenerationError, SamplingParams

RESULTS_VERSION = 1


def evaluate(backend: GenerationBackend, samples: Sequence[Sample], batch_size: int = 8,
             max_new_tokens: int | None = None, progress: Callable[[int], None] | None = None) -> list[dict]:
    """One record per sample: prompt tokens, answers, prediction, score (None if generation failed)."""
    groups: dict[tuple[int, int], list[Sample]] = defaultdict(list)
    for s in samples:
        groups[(s.length, max_new_tokens or s.max_new_tokens)].append(s)
    records: list[dict] = []
    for (length, budget), group in groups.items():
        params = SamplingParams(max_new_tokens=budget, temperature=0.0)
        for start in range(0, len(group), max(1, batch_size)):
            batch = group[start : start + batch_size]
            convs = [[{"role": "user", "content": s.prompt}] for s in batch]
            t0 = time.monotonic()
            errors: dict[int, str] = {}
            try:
                outs: list = backend.chat(convs, params)
            except GenerationError as e:
                outs = e.partial
                errors = {i: str(err) for i, err in e.errors.items()}
            seconds = (time.monotonic() - t0) / len(batch)
            for i, (s, out) in enumerate(zip(batch, outs)):
                pred = out[0] if out else None
                rec = {"task": s.task, "length": length, "index": s.index, "n_tokens": s.n_tokens,
                       "metric": s.metric, "answers": s.answers, "prediction": pred,
                       "score": None if pred is None else score(pred, s.answers, s.metric),
                       "seconds": round(seconds, 3)}
                if i in errors:
                    rec["error"] = errors[i]
                records.append(rec)
            if progress:
                progress(len(batch))
    return records


def standard_error(scores: Sequence[float]) -> float | None:
    """Standard error (x100) of the mean of per-sample scores in [0, 1]: the sample standard
    deviation (n - 1) over sqrt(n); None for fewer than two samples."""
    n = len(scores)
    if n < 2:
        return None
    mean = sum(scores) / n
    var = sum((x - mean) ** 2 for x in scores) / (n - 1)
    return 100.0 * math.sqrt(var / n)


def summarize(records: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{task: {str(length): {score (x100, mean over scored samples), se (its standard error, x100;
    None under two samples), n, failed, mean_tokens}}}."""
    acc: dict[str, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        acc[r["task"]][r["length"]].append(r)
    out: dict[str, dict[str, dict]] = {}
    for task, by_len in acc.items():
        out[task] = {}
        for length in sorted(by_len):
            rs = by_len[length]
            scored = [r["score"] for r in rs if r["score"] is not None]
            out[task][str(length)] = {
                "score": 100.0 * sum(scored) / len(scored) if scored else None,
                "se": standard_error(scored),
                "n": len(scored), "failed": len(rs) - len(scored),
                "mean_tokens": sum(r["n_tokens"] for r in rs) / len(rs),
                "metric": rs[0]["metric"],
            }
    return out


def averages(summary: dict[str, dict[str, dict]]) -> dict[str, float | None]:
    """Mean score over tasks at each length (RULER's per-length average)."""
    by_len: dict[str, list[float]] = defaultdict(list)
    for task in summary.values():
        for length, cell in task.items():
            if cell["score"] is not None:
                by_len[length].append(cell["score"])
    return {k: sum(v) / len(v) for k, v in sorted(by_len.items(), key=lambda kv: int(kv[0]))}


def average_errors(summary: dict[str, dict[str, dict]]) -> dict[str, float | None]:
    """Standard error of `averages` at each length, propagated from the tasks' standard errors:
    sqrt(sum_t SE_t^2) / T over the T tasks with a score there; None when one of them has no SE."""
    by_len: dict[str, list[float | None]] = defaultdict(list)
    for task in summary.values():
        for length, cell in task.items():
            if cell["score"] is not None:
                by_len[length].append(cell.get("se"))
    return {k: (None if any(e is None for e in v) else math.sqrt(sum(e * e for e in v)) / len(v))
            for k, v in sorted(by_len.items(), key=lambda kv: int(kv[0]))}


def with_errors(results: dict) -> tuple[dict, dict, dict]:
    """(summary, average, average SE) of a results dict; files written before the standard errors
    existed get them from their per-sample records."""
    summary = results["summary"]
    if results.get("samples") and any("se" not in c for t in summary.values() for c in t.values()):
        summary = summarize(results["samples"])
    return summary, results.get("average") or averages(summary), results.get("average_se") or average_errors(summary)


def mean_se(value: float | None, se: float | None, digits: int = 1) -> str:
    """`44.0 ± 3.1`; `-` for no value; the value alone without a standard error."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def qa_error(qa: dict) -> float | None:
    """Standard error (x100) of the retention QA accuracy, from its per-question records."""
    recs = qa.get("records") or []
    return standard_error([r["score"] for r in recs]) if recs else None


def _lengths(summary: dict) -> list[str]:
    return sorted({length for task in summary.values() for length in task}, key=int)


def render_table(results: dict, title: str | None = None):
    from rich.table import Table

    summary, avg, avg_se = with_errors(results)
    lengths = _lengths(summary)
    table = Table(title=title or f"RULER-style scores (x100 ± standard error) -- {results.get('backend', '')}")
    table.add_column("task")
    table.add_column("metric")
    for n in lengths:
        table.add_column(n, justify="right")
    for task, cells in summary.items():
        row = [task, next(iter(cells.values()))["metric"]]
        for n in lengths:
            c = cells.get(n)
            row.append("-" if c is None else mean_se(c["score"], c.get("se")))
        table.add_row(*row)
    table.add_row("average", "", *[mean_se(avg.get(n), avg_se.get(n)) for n in lengths], style="bold")
    return table


def render_retention(retention: dict):
    from rich.table import Table

    t = Table(title="short-context retention")
    t.add_column("measure")
    t.add_column("value", justify="right")
    qa = retention.get("qa")
    if qa:
        t.add_row(f"QA accuracy ({qa['n']} questions, part-match)", mean_se(qa["accuracy"], qa_error(qa)))
    ppl = retention.get("perplexity")
    t.add_row("held-out perplexity" + (f" ({ppl['tokens']} tokens)" if ppl else ""),
              f"{ppl['perplexity']:.3f}" if ppl else "skipped")
    return t


def compare_table(before: dict, after: dict):
    """Rows: every (task, length) in both files, plus the retention measures, with after - before."""
    from rich.table import Table

    t = Table(title=f"after - before ({after.get('backend', '?')} vs {before.get('backend', '?')})")
    for col in ("measure", "before", "after", "delta"):
        t.add_column(col, justify="left" if col == "measure" else "right")

    def row(name: str, a, b, fmt: str = "{:.1f}") -> None:
        if a is None or b is None:
            t.add_row(name, "-" if a is None else fmt.format(a), "-" if b is None else fmt.format(b), "-")
        else:
            t.add_row(name, fmt.format(a), fmt.format(b), ("{:+" + fmt[2:]).format(b - a))

    sa, sb = before.get("summary", {}), after.get("summary", {})
    for task in sa:
        for length in sa[task]:
            if task in sb and length in sb[task]:
                row(f"{task} @ {length}", sa[task][length]["score"], sb[task][length]["score"])
    for length, v in (before.get("average") or {}).items():
        if length in (after.get("average") or {}):
            row(f"average @ {length}", v, after["average"][length])
    ra, rb = before.get("retention") or {}, after.get("retention") or {}
    if ra.get("qa") and rb.get("qa"):
        row("retention QA accuracy", ra["qa"]["accuracy"], rb["qa"]["accuracy"])
    if ra.get("perplexity") and rb.get("perplexity"):
        row("retention perplexity", ra["perplexity"]["perplexity"], rb["perplexity"]["perplexity"], "{:.3f}")
    return t


def models_markdown(named: list[tuple[str, dict]]) -> str:
    """The LongPO paper's kind of table, one row per model: the task-average score at each length,
    then the short-context retention measures, each score with its standard error (`44.0 ± 3.1`;
    the average's propagated from its tasks': `average_errors`). `named`: (row name, results JSON)
    pairs."""
    stats = [(name, r, *with_errors(r)) for name, r in named]
    lengths = sorted({n for *_, avg, _ in stats for n in avg}, key=int)
    head = ["model", *map(length_label, lengths), "QA acc.", "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, r, _, avg, avg_se in stats:
        ret = r.get("retention") or {}
        qa, ppl = ret.get("qa"), ret.get("perplexity")
        cells = [mean_se(avg.get(n), avg_se.get(n)) for n in lengths]
        cells += [mean_se(qa["accuracy"], qa_error(qa)) if qa else "-", f"{ppl['perplexity']:.2f}" if ppl else "-"]
        lines.append("| " + " | ".join([name, *cells]) + " |")
    counts = sorted({sum(c["n"] for t in summary.values() for k, c in t.items() if k == n)
                     for _, _, summary, _, _ in stats for n in lengths})
    span = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    lines += ["", f"Scores x100 ± one standard error (a task: sd/sqrt(n) of its samples' scores; the average: "
                  f"propagated from its tasks'); {span} scored samples per model and length."]
    return "\n".join(lines)


def svg_plot(summary: dict[str, dict[str, dict]], title: str = "score vs prompt length") -> str:
    """A small line chart (score 0-100 against length, log2 x axis) as standalone SVG text."""
    import math

    lengths = [int(n) for n in _lengths(summary)]
    W, H, L, R, T, B = 640, 400, 60, 160, 40, 50
    pw, ph = W - L - R, H - T - B
    xs = [math.log2(n) for n in lengths]
    x0, x1 = (min(xs), max(xs)) if xs else (0, 1)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1

    def X(n: int) -> float:
        return L + (math.log2(n) - x0) / (x1 - x0) * pw

    def Y(s: float) -> float:
        return T + (1 - s / 100) * ph

    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
              "#bcbd22", "#17becf"]
    e = html.escape
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
             f'font-size="12"><rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{e(title)}</text>',
             f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="black"/>',
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="black"/>']
    for s in range(0, 101, 20):
        parts.append(f'<line x1="{L}" y1="{Y(s)}" x2="{L + pw}" y2="{Y(s)}" stroke="#ddd"/>'
                     f'<text x="{L - 6}" y="{Y(s) + 4}" text-anchor="end">{s}</text>')
    for n in lengths:
        parts.append(f'<text x="{X(n)}" y="{T + ph + 16}" text-anchor="middle">{n}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 10}" text-anchor="middle">prompt tokens</text>')
    parts.append(f'<text x="14" y="{T + ph / 2}" text-anchor="middle" transform="rotate(-90 14 {T + ph / 2})">'
                 f'score (x100)</text>')
    for i, (task, cells) in enumerate(summary.items()):
        c = colors[i % len(colors)]
        pts = [(X(int(n)), Y(cell["score"])) for n, cell in sorted(cells.items(), key=lambda kv: int(kv[0]))
               if cell["score"] is not None]
        if len(pts) > 1:
            parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="'
                         + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + '"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{c}"/>' for x, y in pts]
        ly = T + 14 * i + 6
        parts.append(f'<rect x="{L + pw + 12}" y="{ly - 8}" width="10" height="10" fill="{c}"/>'
                     f'<text x="{L + pw + 26}" y="{ly + 1}">{e(task)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def build_results(records: Sequence[dict], backend_name: str, config: dict, seconds: float,
                  retention: dict | None = None) -> dict:
    summary = summarize(records)
    return {"version": RESULTS_VERSION, "backend": backend_name, "config": config, "summary": summary,
            "average": averages(summary), "average_se": average_errors(summary), "retention": retention, "seconds": round(seconds, 2),
            "samples": list(records)}
