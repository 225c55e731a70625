"""Scores, bootstrap CIs and paired differences (megatron_longpo/eval/stats.py), perplexity's CI
(eval/retention.py) and the report (eval/report.py). No model."""
import math
import os
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.eval import report
from megatron_longpo.eval.retention import perplexity_ci
from megatron_longpo.eval.stats import (
    bootstrap_ci,
    cell_table,
    depth_table,
    grouped_ci,
    grouped_paired_ci,
    grouped_paired_table,
    match_all,
    match_part,
    paired_ci,
    paired_table,
    point,
    postprocess,
    score,
)


def test_word_boundary_score_on_3600_vs_60():
    """RULER's sub-string metric credits 'One hour is 3600 minutes' for the gold '60'; the word-boundary
    score does not, and still credits a real answer."""
    pred = "One hour is 3600 minutes"
    assert match_part(pred, ["60"]) == 1.0
    assert match_part(pred, ["60"], words=True) == 0.0
    assert match_part("It is 60 minutes.", ["60"], words=True) == 1.0
    assert match_all("amber-otter, 1234567!", ["Amber-Otter", "1234567"], words=True) == 1.0
    assert match_all("12345678", ["1234567"], words=True) == 0.0 and match_all("12345678", ["1234567"]) == 1.0
    assert match_all("1111111 2222222", ["1111111", "3333333"]) == 0.5
    assert score("\x00 7654321\x01", ["7654321"], "all", words=True) == 1.0
    assert postprocess("  a\tb\n ") == "a\nb"
    with pytest.raises(ValueError):
        match_all("x", [])


def test_bootstrap_ci_agrees_with_scipy():
    """The percentile interval of the mean against scipy.stats.bootstrap on the same 0/1 scores (another
    random stream: they agree to Monte-Carlo error)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = (rng.random(400) < 0.37).astype(float)
    m, lo, hi = bootstrap_ci(x, n_boot=4000)
    ref = scipy_stats.bootstrap((x,), np.mean, n_resamples=4000, method="percentile", random_state=2,
                                confidence_level=0.95).confidence_interval
    assert m == pytest.approx(x.mean())
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)
    se = x.std(ddof=1) / math.sqrt(len(x))  # and the normal approximation
    assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.08)


def test_paired_ci_agrees_with_scipy_and_beats_unpaired():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    a = (rng.random(500) < 0.5).astype(float)
    b = np.where(rng.random(500) < 0.9, a, 1 - a)  # mostly the same answers: strongly paired
    d, lo, hi = paired_ci(a, b, n_boot=4000)
    ref = scipy_stats.bootstrap((a, b), lambda x, y: np.mean(y - x), paired=True, n_resamples=4000,
                                method="percentile", random_state=4).confidence_interval
    assert d == pytest.approx(b.mean() - a.mean())
    assert lo == pytest.approx(ref.low, abs=0.006) and hi == pytest.approx(ref.high, abs=0.006)
    _, lo_a, hi_a = bootstrap_ci(a)
    _, lo_b, hi_b = bootstrap_ci(b)
    unpaired = math.hypot(hi_a - lo_a, hi_b - lo_b)
    assert hi - lo < 0.6 * unpaired


def test_stratified_mean_weighs_tasks_equally():
    vals = [1, 1, 1, 1, 0, 0]
    tasks = ["a", "a", "a", "a", "b", "b"]
    assert point(vals, tasks) == pytest.approx(0.5)  # not 4/6
    m, lo, hi = bootstrap_ci(vals, tasks)
    assert m == pytest.approx(0.5) and lo == hi == pytest.approx(0.5)  # no spread inside either task


def _recs(task, length, scores, sha="x", depth=None):
    return [{"task": task, "length": length, "index": i, "score": s, "score_word": s, "prompt_sha": f"{sha}{i}",
             "depth": depth, "metric": "all"} for i, s in enumerate(scores)]


def test_tables_and_paired_table():
    base = _recs("a", 4096, [1, 0] * 50) + _recs("b", 4096, [0] * 100)
    same = [dict(r) for r in base]
    better = _recs("a", 4096, [1] * 100) + _recs("b", 4096, [0] * 100)
    t = cell_table(base)
    assert t["tasks"]["a"]["4096"]["mean"] == pytest.approx(0.5) and t["tasks"]["a"]["4096"]["n"] == 100
    assert t["average"]["4096"]["mean"] == pytest.approx(0.25) and t["average"]["4096"]["tasks"] == 2
    p0 = paired_table(base, same)
    assert p0["average"]["4096"]["diff"] == 0 and not p0["average"]["4096"]["resolved"]
    p1 = paired_table(base, better)
    assert p1["tasks"]["a"]["4096"]["diff"] == pytest.approx(0.5) and p1["tasks"]["a"]["4096"]["resolved"]
    assert p1["average"]["4096"]["diff"] == pytest.approx(0.25)
    other_prompts = _recs("a", 4096, [1] * 100, sha="y")  # another seed: nothing is paired
    p2 = paired_table(base, other_prompts)
    assert p2["matched"] == 0 and p2["prompt_mismatch"] == 100


def test_depth_table_bins():
    recs = _recs("niah_single_2", 8192, [1, 1], depth=10) + _recs("niah_single_2", 8192, [0], depth=95)
    recs[2]["index"] = 5
    d = depth_table(recs + _recs("niah_multivalue", 8192, [1]))  # several needles: no depth
    assert d["8192"]["0-20"]["n"] == 2 and d["8192"]["0-20"]["mean"] == 1.0
    assert d["8192"]["80-100"]["mean"] == 0.0 and sum(c["n"] for c in d["8192"].values()) == 3


def test_perplexity_ci_by_hand():
    per_doc = [(2.0, 2), (6.0, 2), (0.0, 0)]  # the empty document is dropped
    p = perplexity_ci(per_doc)
    assert p["perplexity"] == pytest.approx(math.exp(8 / 4)) and p["documents"] == 2 and p["tokens"] == 4
    assert math.exp(1.0) <= p["lo"] <= p["perplexity"] <= p["hi"] <= math.exp(3.0) + 1e-9


def test_report_tables_compare_and_picture(tmp_path):
    from rich.console import Console

    base = _recs("niah_single_1", 4096, [1, 0] * 20) + _recs("qa_1", 4096, [0, 1] * 20)
    better = _recs("niah_single_1", 4096, [1] * 40) + _recs("qa_1", 4096, [0, 1] * 20)
    prov = {"qa": {"squad": {"stand_in": True}}}
    ra = report.build(base, "base", {}, prov, {})
    rb = report.build(better, "better", {}, prov, {})
    console = Console(width=250, record=True, file=open(os.devnull, "w"))
    for t in report.render(ra):
        console.print(t)
    text = console.export_text()
    assert "qa_1 (stand-in)" in text and "50.0 [" in text and "average (word boundary)" in text
    tables, data = report.compare([("base", ra), ("better", rb)])
    for t in tables:
        console.print(t)
    text = console.export_text()
    assert data["better"]["tasks"]["niah_single_1"]["4096"]["resolved"]
    assert "+50.0 [" in text and "+0.0 [+0.0, +0.0] ?" in text  # qa unchanged: unresolved
    png = report.plot([("base", ra), ("better", rb)], tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = report.markdown([("base", ra), ("better", rb)])
    assert "| better | 75.0 [" in md


# ---- several runs (training seeds) of a model: the two-level bootstrap


def test_grouped_ci_of_one_run_each_is_the_paired_ci():
    """One results file per group: the same interval as paired_ci, by construction (the prompts are
    drawn first, from the same stream), stratified or not; without a baseline, bootstrap_ci's."""
    rng = np.random.default_rng(5)
    a, b = (rng.random(90) < 0.4).astype(float), (rng.random(90) < 0.6).astype(float)
    tasks = np.repeat(["niah", "vt", "qa"], 30)
    assert grouped_paired_ci([a], [b], tasks) == paired_ci(a, b, tasks)
    assert grouped_paired_ci([a], [b]) == paired_ci(a, b)
    assert grouped_ci([b], strata=tasks) == bootstrap_ci(b, tasks)
    base = _recs("a", 4096, a[:30]) + _recs("b", 4096, a[30:]) + _recs("a", 8192, a[60:])
    other = _recs("a", 4096, b[:30]) + _recs("b", 4096, b[30:]) + _recs("a", 8192, b[60:])
    grouped = grouped_paired_table([base], [other])
    assert grouped.pop("runs") == [1, 1] and grouped == paired_table(base, other)


def test_seeds_that_disagree_widen_the_interval():
    """Three runs of a model that disagree (one much better than the other two) against three alike runs
    of a baseline: the two-level interval is wider than the one of the runs' mean taken as one run,
    which ignores how much another seed could change the result."""
    rng = np.random.default_rng(7)
    base = (rng.random(400) < 0.5).astype(float)
    a = np.stack([base, base, base])
    b = np.stack([np.where(rng.random(400) < 0.9, base, 1 - base), (rng.random(400) < 0.2).astype(float),
                  (rng.random(400) < 0.9).astype(float)])
    d, lo, hi = grouped_paired_ci(a, b)
    d1, lo1, hi1 = grouped_paired_ci(a.mean(0, keepdims=True), b.mean(0, keepdims=True))
    assert d == pytest.approx(d1) and hi - lo > 2 * (hi1 - lo1)
    assert lo < d < hi


def test_grouped_difference_by_hand():
    """The difference of two groups' means: each prompt's mean over the runs, then the task average."""
    a = [[1, 0, 0, 1, 1, 1], [1, 1, 0, 0, 1, 1]]  # two seeds; tasks x x x y y y
    b = [[1, 1, 1, 0, 1, 1], [0, 1, 1, 0, 1, 1], [1, 1, 0, 1, 1, 1]]
    tasks = ["x"] * 3 + ["y"] * 3
    # x: a's run means 1, .5, 0 (mean .5); b's 2/3, 1, 2/3 (7/9). y: a .5, 1, 1 (5/6); b 1/3, 1, 1 (7/9)
    want = ((7 / 9 - 1 / 2) + (7 / 9 - 5 / 6)) / 2
    d, lo, hi = grouped_paired_ci(a, b, tasks)
    assert d == pytest.approx(want) and lo <= d <= hi
    assert grouped_ci(b, strata=tasks)[0] == pytest.approx(7 / 9)


def test_group_table_and_compare_from_files(tmp_path):
    """tools/eval_long.py --compare and --table take NAME=A.json,B.json groups: the mean over the files."""
    import importlib.util
    import json

    from rich.console import Console

    spec = importlib.util.spec_from_file_location("eval_long", Path(__file__).resolve().parents[1] / "tools" / "eval_long.py")
    el = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(el)

    def results(name, scores):
        r = report.build(_recs("niah", 4096, scores[:20]) + _recs("vt", 4096, scores[20:]), name, {}, {}, {})
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(r))
        return str(path)

    base = [results("b0", [0, 1] * 20), results("b1", [1, 0] * 20)]
    runs = [results("m0", [1] * 40), results("m1", [1, 0] * 20), results("m2", [1] * 20 + [0] * 20)]
    groups = el.read_groups([f"base={','.join(base)}", f"m={','.join(runs)}"], named=False)
    assert [(n, len(r)) for n, r in groups] == [("base", 2), ("m", 3)]
    tables, data = report.group_compare(groups)
    avg = data["m"]["average"]["4096"]
    assert avg["diff"] == pytest.approx((1 + 0.5 + 0.5) / 3 - 0.5) and data["m"]["runs"] == [2, 3]
    md = report.group_markdown(groups)
    assert "| m | 66.7 [" in md and "several runs" in md
    assert report.markdown([("m0", json.loads(Path(runs[0]).read_text()))]).startswith("| model | 4K | perplexity |")
    console = Console(width=250, record=True, file=open(os.devnull, "w"))
    assert el.group_compare(groups, False, console, "none") == 0
    assert "m, mean over 3 runs - base, mean over 2 runs" in " ".join(console.export_text().split())
    for bad in (["a.json,b.json"], [f"x={base[0]},"], [f"x={tmp_path / 'none.json'}"]):
        with pytest.raises(ValueError):
            el.read_groups(bad, named=False)
    assert el.main(["--compare", base[0], f"m={','.join(runs)}", "--plot", "none"]) == 0
    assert el.main(["--compare", f"m={runs[0]},{runs[0]}x"]) == 2  # a missing file: one line, status 2
