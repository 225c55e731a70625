"""Scores, bootstrap CIs and paired differences (megatron_longpo/eval/stats.py), perplexity's CI
(eval/retention.py) and the report (eval/report.py). No model."""
import math
import os

import numpy as np
import pytest

from megatron_longpo.eval import report
from megatron_longpo.eval.retention import perplexity_ci
from megatron_longpo.eval.stats import (
    bootstrap_ci,
    cell_table,
    depth_table,
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
