"""Results of the RULER suite: the JSON a run writes, the tables it prints (scores with 95 % CIs,
per task and length, the word-boundary score, needle depth, retention), the comparison of two or more
result files (paired differences with CIs) or groups of them (a model's runs, one per training seed:
its mean over them, with a two-level interval), and the picture (score against length with CI bars).

A group is (name, [results, ...]); a single results file is a group of one, whose numbers are the
file's own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from megatron_longpo.eval.stats import (bootstrap_ci, cell_table, depth_table, fmt_ci, grouped_average,
                                        grouped_paired_table, length_label)

RESULTS_VERSION = 2


def build(records: Sequence[dict], name: str, config: dict, provenance: dict, seconds: dict,
          retention: dict | None = None) -> dict:
    return {"version": RESULTS_VERSION, "suite": "ruler", "name": name, "config": config,
            "provenance": provenance, "table": cell_table(records), "table_word": cell_table(records, "score_word"),
            "depth": depth_table(records), "retention": retention, "seconds": seconds, "samples": list(records)}


def _lengths(table: dict) -> list[str]:
    return sorted({n for cells in table["tasks"].values() for n in cells}, key=int)


def _task_label(results: dict, task: str) -> str:
    qa = (results.get("provenance") or {}).get("qa") or {}
    if task.startswith("qa_") and any(v.get("stand_in") for v in qa.values()):
        return f"{task} (stand-in)"
    return task


def render(results: dict):
    """rich Tables: scores per task and length (x100, 95 % CI), the averages under both metrics, the
    needle-depth table and retention."""
    from rich.table import Table

    t, tw = results["table"], results["table_word"]
    lengths = _lengths(t)
    out = []
    main = Table(title=f"RULER -- {results['name']} (x100, mean [95% CI]; n per cell below)")
    main.add_column("task")
    main.add_column("metric")
    for n in lengths:
        main.add_column(n, justify="right")
    metric = {r["task"]: r["metric"] for r in results["samples"]}
    for task, cells in t["tasks"].items():
        main.add_row(_task_label(results, task), metric.get(task, ""),
                     *[fmt_ci(c["mean"], c["lo"], c["hi"]) if (c := cells.get(n)) else "-" for n in lengths])
    main.add_row("average (RULER metric)", "", *[fmt_ci(a["mean"], a["lo"], a["hi"]) if (a := t["average"].get(n))
                                                 else "-" for n in lengths], style="bold")
    main.add_row("average (word boundary)", "", *[fmt_ci(a["mean"], a["lo"], a["hi"]) if (a := tw["average"].get(n))
                                                  else "-" for n in lengths])
    main.add_row("samples", "", *[str(t["average"][n]["n"]) if n in t["average"] else "-" for n in lengths],
                 style="dim")
    out.append(main)
    depth = results.get("depth") or {}
    if depth:
        bins = sorted({b for cells in depth.values() for b in cells}, key=lambda b: int(b.split("-")[0]))
        d = Table(title="by depth of the one gold item (% of the context; single-needle niah, vt's first "
                        "statement, qa's gold document)")
        d.add_column("length")
        for b in bins:
            d.add_column(b, justify="right")
        for n in sorted(depth, key=int):
            d.add_row(n, *[fmt_ci(c["mean"], c["lo"], c["hi"]) + f" n={c['n']}" if (c := depth[n].get(b)) else "-"
                           for b in bins])
        out.append(d)
    ret = results.get("retention")
    if ret and ret.get("perplexity"):
        r = Table(title="retention")
        r.add_column("measure")
        r.add_column("value [95% CI]", justify="right")
        p = ret["perplexity"]
        r.add_row(f"held-out perplexity ({p['documents']} documents, {p['tokens']} tokens)",
                  f"{p['perplexity']:.3f} [{p['lo']:.3f}, {p['hi']:.3f}]")
        out.append(r)
    return out


def compare(files: Sequence[tuple[str, dict]], key: str = "score"):
    """(rich Tables, data): each result after the first minus the first, paired on identical prompts."""
    return group_compare([(name, [r]) for name, r in files], key)


def _runs(runs: Sequence[dict]) -> str:
    return f", mean over {len(runs)} runs" if len(runs) > 1 else ""


def group_compare(groups: Sequence[tuple[str, Sequence[dict]]], key: str = "score"):
    """(rich Tables, data): each group after the first minus the first (means over their runs), paired
    on the prompts every run scored, with two-level 95 % CIs (stats.grouped_paired_table)."""
    from rich.table import Table

    (base_name, base), others = groups[0], groups[1:]
    tables, data = [], {}
    for name, other in others:
        p = grouped_paired_table([r["samples"] for r in base], [r["samples"] for r in other], key)
        data[name] = p
        lengths = sorted({n for cells in p["tasks"].values() for n in cells}, key=int)
        t = Table(title=f"{name}{_runs(other)} - {base_name}{_runs(base)} ({'RULER metric' if key == 'score' else 'word boundary'}; "
                        f"x100, paired 95% CI; '?' = CI contains 0: unresolved)")
        t.add_column("task")
        for n in lengths:
            t.add_column(n, justify="right")

        def cell(c):
            if not c:
                return "-"
            return f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]" + ("" if c["resolved"] else " ?")

        for task, cells in p["tasks"].items():
            t.add_row(_task_label(base[0], task), *[cell(cells.get(n)) for n in lengths])
        t.add_row("average", *[cell(p["average"].get(n)) for n in lengths], style="bold")
        t.add_row("paired samples", *[str(p["average"][n]["n"]) if n in p["average"] else "-" for n in lengths],
                  style="dim")
        if p["prompt_mismatch"]:
            t.caption = f"{p['prompt_mismatch']} samples left out: their prompts differ (another seed or tokenizer)"
        tables.append(t)
    return tables, data


def group_average(runs: Sequence[dict], key: str = "score") -> dict:
    """{length: {mean, lo, hi, n, ...}}: one file's stored task average (RULER results), or the mean over
    several runs (or of smoke results) from their samples (stats.grouped_average)."""
    if len(runs) == 1 and key == "score" and "table" in runs[0]:
        return runs[0]["table"]["average"]
    return grouped_average([r["samples"] for r in runs], key)


def dev_score(results: dict, key: str = "score") -> tuple[float, float, float, int]:
    """(mean, low, high, samples): the task average over every length of one results file (each task
    at each length weighs the same), with its 95 % bootstrap CI: a development split's one number."""
    rs = [r for r in results["samples"] if r.get(key) is not None]
    if not rs:
        raise ValueError(f"{results.get('name', 'results')}: no scored sample")
    m, lo, hi = bootstrap_ci([r[key] for r in rs], [f"{r['task']}@{r['length']}" for r in rs])
    return m, lo, hi, len(rs)


def perplexity(results: dict) -> float | None:
    """The held-out perplexity of --retention, or None."""
    p = (results.get("retention") or {}).get("perplexity")
    return float(p["perplexity"]) if p else None


def plot(files: Sequence[tuple[str, dict]], path: str | Path, title: str = "RULER score against length") -> Path:
    """PNG: each model's task-average score against length (log2 axis) with 95 % CI bars; a single
    model also gets its tasks as thin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for name, r in files:
        avg = r["table"]["average"]
        ns = sorted(avg, key=int)
        x = [int(n) for n in ns]
        y = [100 * avg[n]["mean"] for n in ns]
        err = [[100 * (avg[n]["mean"] - avg[n]["lo"]) for n in ns], [100 * (avg[n]["hi"] - avg[n]["mean"]) for n in ns]]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=4, linewidth=2, label=f"{name} (average)")
        if len(files) == 1:
            for task, cells in r["table"]["tasks"].items():
                ts = sorted(cells, key=int)
                ax.plot([int(n) for n in ts], [100 * cells[n]["mean"] for n in ts], linewidth=0.8, alpha=0.6,
                        label=task)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt + generation budget (tokens)")
    ax.set_ylabel("score (x100), 95% CI")
    ax.set_ylim(-2, 102)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(files: Sequence[tuple[str, dict]]) -> str:
    """One row per model: the task average at each length with its 95 % CI, and retention."""
    return group_markdown([(name, [r]) for name, r in files])


def group_markdown(groups: Sequence[tuple[str, Sequence[dict]]]) -> str:
    """One row per group: its mean over its runs of the task average at each length with a two-level
    95 % CI (a single file: its own CI), and the held-out perplexity (several runs: their mean and
    range)."""
    avgs = [(name, runs, group_average(runs)) for name, runs in groups]
    lengths = sorted({n for *_, avg in avgs for n in avg}, key=int)
    head = ["model", *map(length_label, lengths), "perplexity"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for name, runs, avg in avgs:
        cells = [fmt_ci(a["mean"], a["lo"], a["hi"]) if (a := avg.get(n)) else "-" for n in lengths]
        ppl = [p for r in runs if (p := (r.get("retention") or {}).get("perplexity"))]
        if len(runs) == 1 and ppl and "lo" in ppl[0]:
            cells.append(f"{ppl[0]['perplexity']:.2f} [{ppl[0]['lo']:.2f}, {ppl[0]['hi']:.2f}]")
        elif ppl:
            v = [p["perplexity"] for p in ppl]
            cells.append(f"{sum(v) / len(v):.2f}" + (f" ({min(v):.2f}-{max(v):.2f})" if len(v) > 1 else ""))
        else:
            cells.append("-")
        lines.append("| " + " | ".join([name, *cells]) + " |")
    n = sorted({a["n"] for *_, avg in avgs for a in avg.values()})
    lines += ["", f"RULER task average x100, [95% bootstrap CI]; {n[0]}-{n[-1]} samples per model and length."]
    if any(len(runs) > 1 for _, runs in groups):
        lines[-1] += (" A row of several runs (training seeds): their mean, on the prompts all of them scored; its "
                      "CI resamples the prompts and the runs; perplexity: their mean (lowest-highest).")
    return "\n".join(lines)


def difference_markdown(groups: Sequence[tuple[str, Sequence[dict]]], against: Sequence[str],
                        skip: Sequence[str] = ()) -> str:
    """A Markdown table: every group minus each group named in `against` (means over their runs), the
    task average at each length with the two-level paired 95 % CI; `?`: the CI contains 0."""
    by = dict(groups)
    rows = []
    for b in against:
        for name, runs in groups:
            if name == b or name in skip or name in against and against.index(name) > against.index(b):
                continue
            p = grouped_paired_table([r["samples"] for r in by[b]], [r["samples"] for r in runs])
            rows.append((f"{name} - {b}", p["average"]))
    lengths = sorted({n for _, avg in rows for n in avg}, key=int)
    head = ["difference", *map(length_label, lengths)]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(lengths) + "|"]
    for label, avg in rows:
        cells = [f"{100 * c['diff']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}]" + ("" if c["resolved"] else " ?")
                 if (c := avg.get(n)) else "-" for n in lengths]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    lines += ["", "Task average x100, each row's mean over its seeds minus the other's, paired on the prompts every "
                  "run scored; 95% CI resampling the prompts (within each task) and each side's seeds; '?': the CI "
                  "contains 0 (unresolved)."]
    return "\n".join(lines)
