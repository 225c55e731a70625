"""The fast path (megatron_longpo/eval/fast.py) against today's path, tools/eval_long.py's RULER suite
and tools/bench_eval.py, in process on a tiny random Llama (fp32 on the CPU)."""
import importlib.util
import json

import pytest
from fixtures import ROOT


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(smollm2_dir, tmp_path_factory):
    from fixtures import tiny_hf_model

    return tiny_hf_model(tmp_path_factory.mktemp("tiny_eval") / "hf", smollm2_dir, "llama", layers=2,
                         max_position_embeddings=2048)


@pytest.fixture(scope="module")
def terse(tiny, tmp_path_factory):
    """The tiny model with every token an end of turn: each answer stops after one step, so the tool
    tests pay for prefill, not for 128 random decoding steps a sample."""
    import shutil

    out = tmp_path_factory.mktemp("terse") / "hf"
    shutil.copytree(tiny, out)
    cfg = json.loads((out / "generation_config.json").read_text())
    cfg["eos_token_id"] = list(range(49152))
    (out / "generation_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def backend(tiny):
    from megatron_longpo.generation.transformers_backend import TransformersBackend

    return TransformersBackend(str(tiny), device="cpu", dtype="float32", batch_size=3, threads=2, decode="prefill")


def test_fast_path_gives_todays_predictions(backend):
    """Same samples, same ids: the old path (runner.evaluate, batches of 3 in task order) and the fast
    path (one length-sorted stream, batches up to 64) decode the same tokens in fp32."""
    from megatron_longpo.eval import fast, ruler, runner

    samples = ruler.generate_tasks(["niah_single", "vt"], [256, 384], 2, ruler.chat_prompt_counter(
        backend.tokenizer), seed=0)
    for s in samples:
        s.max_new_tokens = 8
    old = runner.evaluate(backend, samples, batch_size=3)
    new, seconds = fast.evaluate_fast(backend, samples, lambda user, prefix: backend._prompt_ids(
        [{"role": "user", "content": user}]), batch_size=64)
    def key(r):
        return r["task"], r["length"], r["index"]

    assert len(old) == len(new) == 8 and {key(r) for r in old} == {key(r) for r in new}
    assert {key(r): r["prediction"] for r in old} == {key(r): r["prediction"] for r in new}
    assert all(r["prediction"] for r in new) and seconds > 0  # a random model still says something


def test_static_step_gives_the_eager_steps_predictions(backend):
    """The fast path with graph_decode's static step (the GPU's CUDA-graph code, run eagerly) and with
    kv_decode's eager steps: the same predictions in fp32, and the counters say where the time went."""
    from megatron_longpo.eval import fast, ruler
    from megatron_longpo.generation import kv_decode

    samples = ruler.generate_tasks(["niah_single", "vt"], [256, 384], 2, ruler.chat_prompt_counter(
        backend.tokenizer), seed=0)
    for s in samples:
        s.max_new_tokens = 8

    def ids(user, prefix):
        return backend._prompt_ids([{"role": "user", "content": user}])

    preds, stats = {}, {}
    for step in ("eager", "static"):
        backend.decode_stats = kv_decode.DecodeStats()
        recs, _ = fast.evaluate_fast(backend, samples, ids, batch_size=64, step=step)
        preds[step], stats[step] = [r["prediction"] for r in recs], backend.decode_stats
    assert preds["static"] == preds["eager"] and all(preds["static"])
    for st in stats.values():
        assert st.batches >= 2 and st.rows == 8 and st.decode_steps > 0 and st.prefill_s > 0 and st.decode_s > 0
    assert stats["static"].graphs == 0 and stats["static"].capture_s == 0


def test_eval_long_ruler_end_to_end(terse, tmp_path, capsys):
    """Four of RULER's tasks at 1K on the tiny model: results with CIs, provenance, retention (perplexity
    with a CI over documents, short QA), the picture, --compare and --table."""
    from megatron_longpo.eval.corpus import DEFAULT_HELDOUT

    ppl = tmp_path / "heldout.jsonl"
    ppl.write_text("\n".join(DEFAULT_HELDOUT.read_text().splitlines()[:6]) + "\n")
    out = tmp_path / "r.json"
    tool = _tool("eval_long")
    rc = tool.main(["--model", str(terse), "--lengths", "1024", "--tasks", "niah_single_2", "vt", "qa_1",
                    "--samples", "2", "--threads", "2", "--dtype", "float32", "--out", str(out), "--no-progress",
                    "--retention", "--retention-qa-samples", "2", "--perplexity-file", str(ppl)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["version"] == 2 and set(r["table"]["tasks"]) == {"niah_single_2", "vt", "qa_1"}
    assert r["config"]["prefill_tokens"] == 0  # the CPU's default: one prompt a prefill call (a GPU: 32768)
    cell = r["table"]["tasks"]["vt"]["1024"]
    assert cell["n"] == 2 and cell["lo"] <= cell["mean"] <= cell["hi"]
    assert r["provenance"]["qa"]["squad"]["stand_in"] and "PSF" in r["provenance"]["haystack"]["licence"]
    assert all(s["n_tokens"] + {"niah_single_2": 128, "vt": 30, "qa_1": 32}[s["task"]] <= 1024
               for s in r["samples"])
    p = r["retention"]["perplexity"]
    assert p["documents"] == 6 and p["lo"] <= p["perplexity"] <= p["hi"] and p["perplexity"] > 100  # random model
    assert r["retention"]["qa"]["n"] == 2
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "qa_1 (stand-in)" in text and "average (word boundary)" in text and "samples/s" in text
    w = r["seconds"]  # where the time went: the parts are measured apart and fit inside the total
    assert set(w) == {"samples", "load", "model", "retention", "total"} and w["retention"] > 0
    assert w["samples"] + w["load"] + w["model"] + w["retention"] <= w["total"] + 0.01
    assert tool.main(["--compare", f"a={out}", f"b={out}", "--plot", str(tmp_path / "c.png")]) == 0
    text = capsys.readouterr().out
    assert "b - a" in text and "+0.0 [+0.0, +0.0] ?" in text and (tmp_path / "c.png").exists()
    assert tool.main(["--table", f"a={out}"]) == 0
    assert "| a | " in capsys.readouterr().out


def test_usage_errors_are_one_line(tiny, tmp_path, capsys):
    tool = _tool("eval_long")
    assert tool.main(["--model", str(tiny), "--tasks", "niah_single", "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "--tasks niah_single: not one of RULER's tasks (a smoke task: add --suite smoke)" in err
    assert tool.main(["--model", str(tiny), "--qa-file", f"squad={tmp_path}/none.json", "--tasks", "qa_1",
                      "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tool.main(["--model", str(tiny), "--prefill-tokens", "-1", "--out", str(tmp_path / "r.json")]) == 2
    assert "--prefill-tokens -1: give 0" in capsys.readouterr().err


def test_bench_eval_runs_on_the_cpu(terse, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = _tool("bench_eval").main(["--model", str(terse), "--old-length", "512", "--old-samples", "2",
                                   "--smoke-tasks", "cwe", "--lengths", "1024", "--samples", "2",
                                   "--tasks", "cwe", "--dtype", "float32", "--device", "cpu",
                                   "--threads", "2", "--compare-step", "static", "--models", str(terse),
                                   "--prefill-tokens", "4096", "--compare-prefill-tokens", "0", "--samples-cache",
                                   str(tmp_path / "s.json"), "--out", str(out)])
    assert rc == 0
    b = json.loads(out.read_text())
    assert len(json.loads((tmp_path / "s.json").read_text())["samples"]) == 2  # kept for the next table
    assert [(r["suite"], r["length"], r["samples"]) for r in b["rows"]] == [("smoke", 512, 2)] * 3 + [("ruler", 1024, 2)] * 4
    # the table's second model (the same one here) sees the same samples and decodes the same tokens
    assert [r["score"] for r in b["rows"][6:]] == [b["rows"][3]["score"]] and b["rows"][6]["path"].endswith(terse.name)
    assert b["old_vs_new"]["predictions_identical"] == 2  # fp32: the same tokens (the new path with --prefill-tokens)
    assert b["args"]["prefill_tokens"] == 4096
    # the two prompts of a batch in one prefill call, against one call each (--compare-prefill-tokens 0): the same tokens
    assert [r["prefill_calls"] for r in b["rows"][1:6]] == [1, 2, 1, 2, 1]
    assert [(c["suite"], c["prefill_tokens"], c["predictions_identical"]) for c in b["prefill_compare"]] == [
        ("smoke", [4096, 0], 2), ("ruler", [4096, 0], 2)]
    assert b["decode_step"] == "eager" and b["rows"][5]["path"].endswith("static)")  # the CPU: eager, then static
    assert b["step_compare"][0]["predictions_identical"] == 2
    assert all(r["samples_per_s"] > 0 and r["prefill_s"] > 0 and r["decode_s"] >= 0 for r in b["rows"])
    assert b["ruler_total_s"] > 0 and b["ruler_prefill_s"] > 0
    text = capsys.readouterr().out
    assert "samples/s" in text and "decode s" in text and "eager vs static step at 1024" in text
    assert "prefill 4096 vs 0 tokens a call, ruler at 1024, the same 2 samples: 2 identical predictions" in text


def test_backend_path_groups_by_budget_and_says_the_prefix_was_not_sent():
    """--path backend (a server): chat() in --batch-size groups of one generation budget; RULER's
    answer prefix cannot start the assistant turn there, and each record says so."""
    from megatron_longpo.eval import suite
    from megatron_longpo.eval.ruler_tasks import Sample

    class Echo:
        def __init__(self):
            self.calls = []

        def chat(self, convs, params):
            self.calls.append((len(convs), params.max_new_tokens))
            return [[c[0]["content"][-7:]] for c in convs]

    samples = [Sample("niah_single_1", 1024, i, f"x {7000000 + i}", "The number is", [str(7000000 + i)], "all", 900,
                      128) for i in range(5)] + [Sample("vt", 1024, 0, "VAR ABCDE", "Answer:", ["ABCDE"], "all", 900, 30)]
    b = Echo()
    recs, _ = suite.run(b, samples, None, path="backend", batch_size=2)
    assert sorted(b.calls) == [(1, 30), (1, 128), (2, 128), (2, 128)]
    assert [r["score"] for r in recs] == [1.0] * 6 and all(r["answer_prefix_sent"] is False for r in recs)


def test_plan_puts_shared_prefixes_together_within_budget_and_length():
    from megatron_longpo.eval.fast import plan

    prompts = [[1, 2, 9], [5, 5, 5, 5], [1, 2, 3], [1, 2, 3, 4], [7], [1, 2, 8]]
    budgets = [10, 10, 10, 10, 10, 30]
    groups = [4096, 4096, 4096, 8192, 4096, 4096]
    assert plan(prompts, budgets, groups, 64, None) == [[2, 0, 1, 4], [3], [5]]
    assert plan(prompts, budgets, groups, 2, None) == [[2, 0], [1, 4], [3], [5]]
    # rows x (widest prompt + budget) <= 30 tokens: [1,2,3] and [1,2,9] (2 x 13), not [5,5,5,5] too (3 x 14)
    assert plan(prompts, budgets, groups, 64, 30) == [[2, 0], [1, 4], [3], [5]]
