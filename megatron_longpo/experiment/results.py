"""A comparison's models on disk and what is made of them: each model's training stamp, checkpoint and
evaluation file; WORKDIR/results (the evaluations, the stamps, the frozen references), the table and
summary.md; the sweep's picks (pick, picks.json and picks.md)."""
from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

from .spec import SEED_KEYS, ExperimentError, Model, _settings, picks_file
from .steps import PY, Steps


class Results(Steps):
    """The bookkeeping half of a comparison's Runner (self.exp: its Experiment): where each model's
    training and evaluation are, and the table, the summary and the picks made of them."""

    def train_settings(self, m: Model) -> dict:
        """What makes a trained model what it is (no paths: a moved work directory still resumes)."""
        spec = self.spec
        return {"config": spec["train"]["config"], "data": m.data, "reference": m.reference,
                "overrides": [f"model.rope_theta={spec['rope_theta']}", f"model.max_position_embeddings={spec['context']}",
                              *spec["train"].get("overrides", []), *m.overrides, *[f"{k}={m.seed}" for k in SEED_KEYS]]}

    def stamp_file(self, name: str) -> Path:
        """WORKDIR/NAME.train.json: the settings model NAME was trained with, and its training's directory."""
        return self.w / f"{name}.train.json"

    def stamp(self, name: str) -> dict | None:
        f = self.stamp_file(name)
        return json.loads(f.read_text()) if f.is_file() else None

    def checkpoint(self, m: Model) -> str:
        """The training a model is: its own (WORKDIR/NAME), or, for seed 0 of a picked method, its sweep
        point's, where that was trained with the same settings."""
        own = self.stamp(m.name)
        if own and own.get("checkpoint") and (self.w / own["checkpoint"]).is_dir():
            return own["checkpoint"]  # what it was made from on its first run
        point = self.stamp(m.reuse) if m.reuse else None
        return m.reuse if point is not None and _settings(point) == self.train_settings(m) else m.name

    def eval_file(self, m: Model) -> Path:
        return self.w / (f"eval_dev_{m.name}.json" if m.dev else f"eval_{m.name}.json")

    def collect(self) -> Path:
        """WORKDIR/results: every evaluation made so far (gzipped), each trained model's stamp and the
        frozen references (what --evaluations-from takes to another machine)."""
        res = self.w / "results"
        res.mkdir(parents=True, exist_ok=True)
        for k in self.exp.references():
            if self.exp.reference_file(k).is_file():
                shutil.copyfile(self.exp.reference_file(k), res / self.exp.reference_file(k).name)
        for m in self.exp.models:
            if self.eval_file(m).is_file():
                with open(self.eval_file(m), "rb") as src, \
                        gzip.GzipFile(res / (self.eval_file(m).name + ".gz"), "wb", mtime=0) as dst:
                    shutil.copyfileobj(src, dst)
            if self.stamp_file(m.name).is_file():
                shutil.copyfile(self.stamp_file(m.name), res / self.stamp_file(m.name).name)
        return res

    def results(self, failed: list[str]) -> int:
        w = self.w
        res = self.collect()
        missing = [m.name for m in self.exp.models if not self.eval_file(m).is_file()]
        if missing:
            if not failed and self.deadline:
                self.log(f"time limit: {', '.join(missing)} not evaluated yet; rerun to resume")
                return 0
            print(f"error: no evaluation of {', '.join(missing)} (see {w}/train_NAME.log, eval_NAME.log); "
                  f"rerun to retry", file=sys.stderr)
            return 1
        if self.exp.sweep:
            return self.write_picks(res)
        table = self.table()
        (w / "table.md").write_text(table)
        made = self.made_table()
        (res / "summary.md").write_text(self.summary(table, made))
        self.log(f"table ({res / 'summary.md'})")
        print(made + "\n\n" + table, end="")
        return 0

    def table_args(self) -> list[str]:
        """tools/eval_long.py --table's arguments: a row per model, or per method over its seeds (NAME=A,B,C)."""
        return [f"{row}={','.join(str(self.eval_file(m)) for m in ms)}" for row, ms in self.exp.groups()]

    def table(self) -> str:
        """tools/eval_long.py --table over every model's evaluation: a Markdown table, a row per model
        (a method's seeds: one row, their mean)."""
        r = subprocess.run([PY, "tools/eval_long.py", "--table", *self.table_args()], cwd=self.root, capture_output=True, text=True)
        if r.returncode != 0:
            raise ExperimentError(f"the table: {r.stderr[-2000:]}")
        return r.stdout

    def tokens(self, m: Model) -> tuple[int, int, bool] | None:
        """(optimizer steps, tokens processed, whether every step is counted) of a model's training, from
        its summary.json's step lines (a resumed run's summary holds its own steps only)."""
        f = self.w / self.checkpoint(m) / "summary.json"
        s = json.loads(f.read_text()) if f.is_file() else {}
        steps = s.get("steps") or []
        if not steps:
            return None
        return s.get("iteration", len(steps)), int(sum(x.get("tokens", 0) for x in steps)), len(steps) >= s.get("iteration", 0)

    def made_table(self) -> str:
        """How each row was made: the method and its overrides, the seeds, the steps and the tokens processed
        (the mean over the seeds: equal compute shows as equal tokens)."""
        rows = []
        for row, ms in self.exp.groups():
            m = ms[0]
            how = ("untrained" + (f", RoPE base {m.rope_theta:g}" if m.rope_theta else "")) if not m.method else \
                f"{m.method}: `{' '.join(m.overrides)}`" + (f", reference {m.reference}" if m.reference != "short" else "") + \
                (", documents only" if m.data == "documents" else "") + \
                (" (picked on the dev samples)" if self.exp.picks.get(m.method) and m.group == m.method else "")
            counts = [t for x in ms if x.method and (t := self.tokens(x))]
            steps = f"{sum(t[0] for t in counts) / len(counts):,.0f}" if counts else "-"
            mean = sum(t[1] for t in counts) / len(counts) if counts else 0
            tokens = (("" if all(t[2] for t in counts) else ">=") + (f"{mean / 1e6:.2f}M" if mean >= 1e6 else f"{mean:,.0f}")) \
                if counts else "-"
            seeds = ", ".join(str(x.seed) for x in ms) if m.method else "-"
            rows.append(f"| {row} | {how} | {seeds} | {steps} | {tokens} |")
        return "\n".join(["| model | how it was made | seeds | steps | tokens processed |", "|---|---|---|---:|---:|", *rows])

    def differences(self) -> str:
        """With several seeds: each trained row minus sft and minus base_rope (means over the seeds), with
        the two-level interval (prompts and seeds resampled: stats.grouped_paired_ci)."""
        from megatron_longpo.eval import report

        groups = [(row, [json.loads(self.eval_file(m).read_text()) for m in ms]) for row, ms in self.exp.groups()]
        against = [b for b in ("sft", "base_rope") if b in dict(groups)]
        return report.difference_markdown(groups, against, skip=("base",))

    def summary(self, table: str, made: str) -> str:
        s = self.spec
        gpus = f"{self.n_gpus} GPU(s)" if self.n_gpus else "the CPU"
        several = any(len(ms) > 1 for _, ms in self.exp.groups())
        picks = picks_file(self.w).with_suffix(".md")
        return "\n".join([
            f"# {s.get('name', self.w.name)}", "",
            f"Base model {s['model']}, context {s['context']}, policy RoPE base {s['rope_theta']:g}; "
            f"training `{s['train']['config']}` + `{' '.join(s['train'].get('overrides', []))}`; {gpus}.", "",
            made, "", table.rstrip(), "",
            *(["## Differences (means over the seeds)", "", self.differences(), ""] if several else []),
            *(["## Picked on the development samples", "", picks.read_text().rstrip(), ""]
              if self.exp.picks and picks.is_file() else []),
            "`eval_NAME.json.gz`: every sample of each model's evaluation (tools/eval_long.py).", ""])

    # ---- the sweep: a pick per method on the development samples
    def write_picks(self, res: Path) -> int:
        """Per method, the point with the highest dev score among those whose held-out perplexity is within
        sweep.retention.max_perplexity_ratio of the base's (none: the lowest perplexity): picks.json
        (merged over an earlier one: methods swept apart keep theirs) and picks.md."""
        from megatron_longpo.eval import report

        ratio = float(((self.spec.get("sweep") or {}).get("retention") or {}).get("max_perplexity_ratio", 1.15))
        base_model = next(m for m in self.exp.models if not m.method)
        base = report.perplexity(json.loads(self.eval_file(base_model).read_text()))
        limit = ratio * base if base is not None else None
        old = json.loads(picks_file(self.w).read_text()) if picks_file(self.w).is_file() else {}
        out = {"dev": (self.spec.get("sweep") or {}).get("dev"), "max_perplexity_ratio": ratio, "base_perplexity": base,
               "methods": dict(old.get("methods") or {})}
        for method in dict.fromkeys(m.method for m in self.exp.trained):
            points = []
            for m in (x for x in self.exp.trained if x.method == method):
                r = json.loads(self.eval_file(m).read_text())
                mean, lo, hi, n = report.dev_score(r)
                points.append({"name": m.name, "overrides": m.overrides[len(m.overrides) - len(self.point_keys(m)):],
                               "score": mean, "lo": lo, "hi": hi, "samples": n, "perplexity": report.perplexity(r)})
            chosen, why = pick(points, limit)
            self.log(f"{method}: picked {chosen['name']} ({why})")
            out["methods"][method] = {"pick": chosen["name"], "overrides": chosen["overrides"], "why": why, "points": points}
        picks_file(self.w).write_text(json.dumps(out, indent=1))
        md = picks_markdown(out)
        picks_file(self.w).with_suffix(".md").write_text(md + "\n")
        self.log(f"picks ({picks_file(self.w)}); a plain run now trains each method with its pick")
        print(md)
        return 0

    def point_keys(self, m: Model) -> list[str]:
        sw = self.spec.get("sweep") or {}
        return list({**(sw.get("grid") or {}), **((sw.get("per_method") or {}).get(m.method) or {})})


def pick(points: list[dict], limit: float | None) -> tuple[dict, str]:
    """The point with the highest dev `score` among those with `perplexity` <= limit (the first of equals);
    none within it: the lowest perplexity; no limit (the base's perplexity unknown): the highest score."""
    if limit is None:
        return max(points, key=lambda p: p["score"]), "the highest dev score; no base perplexity to hold it to"
    within = [p for p in points if p["perplexity"] is not None and p["perplexity"] <= limit]
    if within:
        return max(within, key=lambda p: p["score"]), f"the highest dev score with perplexity <= {limit:.2f}"
    low = min(points, key=lambda p: p["perplexity"] if p["perplexity"] is not None else math.inf)
    return low, f"no point keeps perplexity <= {limit:.2f}: the lowest perplexity"


def picks_markdown(picks: dict) -> str:
    base, ratio = picks.get("base_perplexity"), picks.get("max_perplexity_ratio")
    lines = ["| method | point | overrides | dev score [95% CI] | perplexity (x base) | |", "|---|---|---|---:|---:|---|"]
    for method, e in picks["methods"].items():
        for p in e["points"]:
            ppl = "-" if p["perplexity"] is None else f"{p['perplexity']:.2f}" + (f" ({p['perplexity'] / base:.3f})" if base else "")
            lines.append(f"| {method} | {p['name']} | `{' '.join(p['overrides'])}` | {100 * p['score']:.1f} "
                         f"[{100 * p['lo']:.1f}, {100 * p['hi']:.1f}] | {ppl} | {'**pick**' if p['name'] == e['pick'] else ''} |")
    dev = picks.get("dev") or {}
    lines += ["", f"Dev samples: seed {dev.get('seed', 1)}, lengths {', '.join(map(str, dev.get('lengths', [])))}; the "
                  f"task average x100 over them. A pick: the highest dev score whose held-out perplexity is within "
                  f"{ratio} x the base's ({'-' if base is None else f'{base:.2f}'}); none within it: the lowest perplexity."]
    return "\n".join(lines)
