"""RULER-style tasks (megatron_longpo/eval/ruler.py), the runner and tools/eval_long.py."""
import json
import os
import re
from collections import Counter

import pytest

from megatron_longpo.eval.ruler import (BASE_TASKS, LengthError, chat_prompt_counter, generate_sample,
                                        generate_tasks, score, string_match_all, string_match_part)
from megatron_longpo.eval.runner import build_results, compare_table, evaluate, svg_plot
from megatron_longpo.generation.backends import GenerationError


@pytest.fixture(scope="module")
def count(smollm2_dir):
    from transformers import AutoTokenizer

    return chat_prompt_counter(AutoTokenizer.from_pretrained(smollm2_dir))


def context_of(prompt: str) -> str:
    """The haystack part: between the instruction line and the final question."""
    body = prompt.split("\n", 1)[1]
    return re.split(r"\n(?:Question:|What (?:is|are all) the special)", body)[0]


def test_deterministic_for_a_seed(count):
    tasks = ["niah_single", "niah_multikey_uuid", "niah_multivalue_word", "vt", "cwe", "fwe"]
    a = generate_tasks(tasks, [512], 2, count, seed=0)
    b = generate_tasks(tasks, [512], 2, count, seed=0)
    c = generate_tasks(tasks, [512], 2, count, seed=1)
    assert [(s.prompt, s.answers) for s in a] == [(s.prompt, s.answers) for s in b]
    for x, y in zip(a, c):
        assert x.prompt != y.prompt and x.answers != y.answers
    assert a[0].prompt != a[1].prompt  # samples of one task differ


@pytest.mark.parametrize("length", [512, 1024, 4096])
def test_prompt_length_within_two_percent(count, length):
    for task in [*BASE_TASKS, "niah_single_uuid", "niah_multiquery_word"]:
        s = generate_sample(task, length, 0, count, seed=3)
        assert s.n_tokens == count(s.prompt)
        assert 0.98 * length <= s.n_tokens <= length, (task, s.n_tokens)


def test_too_short_length_is_an_error(count):
    with pytest.raises(LengthError):
        generate_sample("niah_multiquery_uuid", 128, 0, count)


def test_scorer_hand_checked():
    assert string_match_all("The number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("The number is 123456.", ["1234567"]) == 0.0
    assert string_match_all("amber-OTTER and Tiger-Apple", ["amber-otter", "tiger-apple"]) == 1.0  # case
    assert string_match_all("1111111, 2222222", ["1111111", "2222222", "3333333", "4444444"]) == 0.5
    assert string_match_part("1111111, 2222222", ["1111111", "3333333"]) == 1.0
    assert string_match_part("nothing here", ["1111111", "3333333"]) == 0.0
    assert score("  KYRKH QUKOO  ", ["kyrkh", "qukoo", "daydm"], "all") == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        string_match_all("x", [])


@pytest.mark.parametrize("task", ["niah_single", "niah_multikey_uuid", "niah_multivalue_word", "niah_multiquery"])
def test_needles_present_exactly_once(count, task):
    for length in (512, 2048):
        s = generate_sample(task, length, 1, count, seed=0)
        needles = s.meta["needles"]
        for n in needles:
            needle = f"for {n['key']} is: {n['value']}."
            assert s.prompt.count(needle) == 1
            assert s.prompt.count(n["value"]) == 1  # the value occurs nowhere else
        for a in s.answers:
            assert a in context_of(s.prompt)
        n_keys = len({n["key"] for n in needles})
        expected = {"niah_single": (1, 1), "niah_multikey_uuid": (4, 1), "niah_multivalue_word": (1, 4),
                    "niah_multiquery": (4, 4)}[task]
        assert (n_keys, len(s.answers)) == expected


def test_variable_tracking_chain_resolves(count):
    for length in (512, 2048):
        s = generate_sample("vt", length, 0, count, seed=0)
        value = s.meta["value"]
        env: dict[str, str] = {}
        for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d+)\.", context_of(s.prompt)):
            env[name] = env[rhs[4:]] if rhs.startswith("VAR ") else rhs  # in text order: defined before use
        holders = sorted(n for n, v in env.items() if v == value)
        assert holders == sorted(s.answers) and len(s.answers) == 5
        assert f"assigned the value {value}" in s.prompt


def test_cwe_and_fwe_gold_words_are_most_frequent(count):
    for length in (512, 4096):
        s = generate_sample("cwe", length, 0, count, seed=0)
        words = re.findall(r"^\d+\. (\S+)$", context_of(s.prompt), flags=re.M)
        c = Counter(words).most_common()
        top = {w for w, _ in c[:10]}
        assert top == set(s.answers)
        assert c[9][1] > c[10][1]  # strictly more frequent than the rest
        f = generate_sample("fwe", length, 0, count, seed=0)
        c = Counter(re.findall(r"[a-z]+", context_of(f.prompt))).most_common()
        assert {w for w, _ in c[:3]} == set(f.answers) and c[2][1] > c[3][1]


class FakeBackend:
    name = "fake"

    def __init__(self, fail_index=None):
        self.fail_index = fail_index
        self.calls = []  # (batch size, max_new_tokens)

    def chat(self, conversations, params):
        self.calls.append((len(conversations), params.max_new_tokens))
        outs = []
        for conv in conversations:  # answer with the first needle value or variable name in the prompt
            m = re.search(r"is: (\d{7})\.|VAR ([A-Z]{5}) =", conv[0]["content"])
            outs.append([m.group(1) or m.group(2)])
        if self.fail_index is not None:
            partial = [None if i == self.fail_index else o for i, o in enumerate(outs)]
            raise GenerationError({self.fail_index: RuntimeError("boom")}, partial)
        return outs


def test_runner_scores_and_reports(count, tmp_path):
    samples = generate_tasks(["niah_single", "vt"], [256, 512], 2, count, seed=0)
    recs = evaluate(FakeBackend(), samples, batch_size=3)
    res = build_results(recs, "fake", {}, 0.0)
    assert res["summary"]["niah_single"]["256"]["score"] == 100.0
    assert res["summary"]["vt"]["512"]["score"] == pytest.approx(20.0)  # 1 of 5 variables
    assert res["average"]["256"] == pytest.approx(60.0)
    assert svg_plot(res["summary"]).startswith("<svg") and "niah_single" in svg_plot(res["summary"])
    recs = evaluate(FakeBackend(fail_index=0), samples[:2], batch_size=2)
    assert recs[0]["score"] is None and "boom" in recs[0]["error"] and recs[1]["score"] == 1.0
    assert build_results(recs, "fake", {}, 0.0)["summary"]["niah_single"]["256"]["failed"] == 1
    compare_table(res, res)  # renders


def test_tasks_with_one_budget_share_batches(count):
    """The niah tasks (budget 128) of one length go out together; vt (30) on its own; each record
    keeps its own task."""
    samples = generate_tasks(["niah_single", "niah_multikey", "vt"], [256], 2, count, seed=0)
    backend = FakeBackend()
    recs = evaluate(backend, samples, batch_size=8)
    assert sorted(backend.calls) == [(2, 30), (4, 128)]
    assert sorted(r["task"] for r in recs) == ["niah_multikey"] * 2 + ["niah_single"] * 2 + ["vt"] * 2


@pytest.mark.slow
def test_eval_long_end_to_end(smollm2_dir, tmp_path):
    from fixtures import ROOT, run_tool, tiny_hf_model

    model = tiny_hf_model(tmp_path / "tiny", smollm2_dir, "llama", layers=2)  # the pipeline, not the answers
    out = tmp_path / "r.json"
    r = run_tool(ROOT / "tools/eval_long.py", "--suite", "smoke", "--model", model, "--lengths", "256", "512", "--tasks",
                 "niah_single", "vt", "--samples", "1", "--max-new-tokens", "8", "--threads", "2", "--seed", "0",
                 "--out", out, "--no-progress", timeout=300)
    res = json.loads(out.read_text())
    assert set(res["summary"]) == {"niah_single", "vt"}
    assert {k: res["config"][k] for k in ("batch_size", "dtype", "rope_theta", "max_attention_cells")} == {
        "batch_size": 8, "dtype": "auto", "rope_theta": None, "max_attention_cells": 2**32}
    assert set(res["summary"]["vt"]) == {"256", "512"}
    assert len(res["samples"]) == 4 and all(0 <= s["score"] <= 1 for s in res["samples"])
    assert all(0.98 * s["length"] <= s["n_tokens"] <= s["length"] for s in res["samples"])
    assert "niah_single" in r.stdout and "average" in r.stdout
    assert out.with_suffix(".svg").read_text().startswith("<svg")
    c = run_tool(ROOT / "tools/eval_long.py", "--compare", out, out)
    assert "+0.0" in c.stdout
    t = run_tool(ROOT / "tools/eval_long.py", "--table", f"base={out}", f"again={out}")
    rows = [x for x in t.stdout.splitlines() if x.startswith("| base") or x.startswith("| again")]
    avg = res["average"]
    assert rows[0].split(" | ")[1:3] == [f"{avg['256']:.1f}", f"{avg['512']:.1f}"]
    assert rows[0].split(" | ")[1:] == rows[1].split(" | ")[1:]


def test_standard_errors_by_hand():
    """Per cell: sd (n - 1) / sqrt(n) of the per-sample scores (x100); the average: propagated,
    sqrt(sum SE_t^2) / T; printed as `mean ± se`; old result files get them from their samples."""
    from megatron_longpo.eval.runner import models_markdown, render_table, standard_error

    def rec(task, length, score):
        return {"task": task, "length": length, "n_tokens": length, "metric": "all", "score": score}

    recs = [rec("a", 256, x) for x in (1, 0, 1, 1)] + [rec("b", 256, x) for x in (0.2, 0.4, 0.6)] + [rec("a", 512, 1)]
    res = build_results(recs, "fake", {}, 0.0, retention={
        "qa": {"accuracy": 50.0, "n": 2, "records": [{"score": 1.0}, {"score": 0.0}]}, "perplexity": None})
    # a: mean 0.75, sd^2 = (3 * 0.0625 + 0.5625) / 3 = 0.25, SE = 0.5 / 2 = 0.25 -> 25.0
    assert res["summary"]["a"]["256"]["score"] == pytest.approx(75.0)
    assert res["summary"]["a"]["256"]["se"] == pytest.approx(25.0)
    # b: mean 0.4, sd^2 = (0.04 + 0 + 0.04) / 2 = 0.04, SE = 0.2 / sqrt(3) -> 11.547
    assert res["summary"]["b"]["256"]["se"] == pytest.approx(20.0 / 3 ** 0.5)
    assert res["summary"]["a"]["512"]["se"] is None and standard_error([]) is None  # one sample: no SE
    assert res["average"]["256"] == pytest.approx(57.5)
    assert res["average_se"]["256"] == pytest.approx((25.0 ** 2 + 400.0 / 3) ** 0.5 / 2)  # 13.844
    assert res["average_se"]["512"] is None
    md = models_markdown([("m", res)])
    row = next(x for x in md.splitlines() if x.startswith("| m "))
    assert row == "| m | 57.5 ± 13.8 | 100.0 | 50.0 ± 50.0 | - |"
    assert "7-1 scored samples" not in md and "1-7 scored samples per model and length" in md
    # a results file from before the standard errors: recomputed from its samples
    old = dict(res, summary={t: {n: {k: v for k, v in c.items() if k != "se"} for n, c in cells.items()}
                             for t, cells in res["summary"].items()})
    del old["average_se"]
    assert models_markdown([("m", old)]) == md
    from rich.console import Console

    console = Console(width=200, record=True, file=open(os.devnull, "w"))
    console.print(render_table(res))
    text = console.export_text()
    assert "75.0 ± 25.0" in text and "40.0 ± 11.5" in text and "57.5 ± 13.8" in text


def test_a_directory_without_a_model_is_named(tmp_path):
    """An empty or Megatron-only directory passed as --model gets one message naming it and the fix
    (it was a transformers tokenizer-conversion error about sentencepiece and tiktoken)."""
    from fixtures import ROOT, run_tool

    empty = tmp_path / "not_a_model"
    empty.mkdir()
    r = run_tool(ROOT / "tools/eval_long.py", "--model", empty, "--lengths", "256", "--samples", "1",
                 "--out", tmp_path / "r.json", check=False, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"--model {empty}: no tokenizer in it" in r.stderr and "megatron-to-hf" in r.stderr
    assert "sentencepiece" not in r.stderr and "Traceback" not in r.stderr
