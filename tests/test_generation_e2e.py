"""End to end on the embedded SmolLM2-135M-Instruct, in-process (transformers, CPU, 1 thread):
the LongPO tool on the offline example documents and the SoLoPO tool on the synthetic QA set.
Every output line is validated against the schema tools/preprocess_pairs.py reads."""
import importlib.util
import json
import math
import time
from pathlib import Path

import pytest

from megatron_longpo.generation.longpo import validate_longpo_line
from megatron_longpo.generation.answers import extract_final_answer, sub_exact_match
from megatron_longpo.generation.solopo import validate_solopo_line
from megatron_longpo.generation.text import HFTokenCounter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "generation"
LEAD = "As described in the preceding text,"


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_longpo_end_to_end_with_smollm2(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "longpo.jsonl"
    t0 = time.time()
    rc = load_tool("build_longpo_pairs").main([
        str(ROOT / "megatron_longpo" / "resources" / "documents"), "-o", str(out), "--model", str(smollm2_dir), "--threads", "1",
        "--batch-size", "4", "--chunk-tokens", "300", "--max-chunks", "2", "--questions-asked", "3",
        "--question-max-new-tokens", "80", "--max-new-tokens", "40", "--min-answer-words", "3",
        "--max-pair-tokens", "4000", "--docs-per-batch", "3", "--lead-phrase", LEAD, "--seed", "1", "--no-progress"])
    elapsed = time.time() - t0
    printed = capsys.readouterr().out
    assert rc == 0, printed
    counter = HFTokenCounter.from_pretrained(str(smollm2_dir))
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    assert summary["counts"]["documents_seen"] == 3 and summary["counts"]["chunks_used"] == 6
    assert summary["failures"] == {}
    assert rows and summary["counts"]["documents_written"] == len(rows)
    docs = {p.read_text() for p in (ROOT / "megatron_longpo" / "resources" / "documents").glob("*.md")}
    from megatron_longpo.data.records import parse_record

    for row in rows:
        validate_longpo_line(row)
        parse_record("longpo", row)  # what tools/preprocess_pairs.py reads
        assert row["long_context"] in docs
        assert row["meta"]["generator"] == "transformers:SmolLM2-135M-Instruct"
        for t in row["turns"]:
            assert t["short_context"] in row["long_context"] and counter.count(t["short_context"]) <= 300
            assert t["instruction"].startswith(LEAD + " ") and len(t["instruction"]) > len(LEAD) + 10
            assert t["chosen"] != t["rejected"]
    kept = sum(len(r["turns"]) for r in rows)
    # every question used is a kept turn or a counted drop
    assert kept + sum(v for k, v in summary["dropped"].items() if k.startswith(("chosen_", "rejected_", "identical", "over_"))) \
        == summary["counts"]["questions_used"]
    print(f"\nLongPO end to end: {len(rows)} documents, {kept} turns in {elapsed:.0f} s\n{printed}")


@pytest.mark.slow
def test_solopo_end_to_end_with_smollm2(smollm2_dir, tmp_path, capsys):
    out = tmp_path / "solopo.jsonl"
    t0 = time.time()
    rc = load_tool("build_solopo_pairs").main([
        str(EXAMPLES / "qa.jsonl"), "-o", str(out), "--model", str(smollm2_dir), "--threads", "1",
        "--batch-size", "10", "--samples", "4", "--max-new-tokens", "128", "--target-long-tokens", "400",
        "--records-per-batch", "10", "--seed", "0", "--no-progress"])
    elapsed = time.time() - t0
    printed = capsys.readouterr().out
    assert rc == 0, printed
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    summary = json.loads(Path(str(out) + ".summary.json").read_text())
    c, d = summary["counts"], summary["dropped"]
    assert c["records_seen"] == 10 and c["samples"] == 40
    # every record is accounted for: a pair, or a counted reason
    assert len(rows) + d.get("record_no_final_answer", 0) + d.get("record_no_correct_answer", 0) \
        + d.get("record_no_wrong_answer", 0) + d.get("record_correct_answers_filtered", 0) \
        + d.get("over_length", 0) == 10
    assert rows, "SmolLM2 answered no question right: the sampling or the scoring is broken"
    qa = {json.loads(l)["id"]: json.loads(l) for l in (EXAMPLES / "qa.jsonl").read_text().splitlines()}
    counter = HFTokenCounter.from_pretrained(str(smollm2_dir))
    from megatron_longpo.data.records import parse_record

    for row in rows:
        validate_solopo_line(row)
        parse_record("solopo", row)  # what tools/preprocess_pairs.py reads
        rec = qa[row["meta"]["id"]]
        # sub-EM on the final answers of the chain-of-thought responses
        chosen, rejected = extract_final_answer(row["chosen"]), extract_final_answer(row["rejected"])
        assert (chosen, rejected) == (row["meta"]["chosen_answer"], row["meta"]["rejected_answer"])
        assert sub_exact_match(chosen, rec["answers"]) and not sub_exact_match(rejected, rec["answers"])
        for p in rec["paragraphs"]:
            if p["is_supporting"]:
                assert p["text"] in row["short_context"] and p["text"] in row["long_context"]
            else:
                assert p["text"] not in row["short_context"]
        assert counter.count(row["long_context"]) == row["meta"]["long_tokens"] <= 400
        assert row["instruction"].endswith(rec["question"])
    print(f"\nSoLoPO end to end: {len(rows)} pairs from 10 records in {elapsed:.0f} s\n{printed}")


def test_rope_theta_override(smollm2_dir):
    from megatron_longpo.generation.backends import SamplingParams
    from megatron_longpo.generation.transformers_backend import TransformersBackend

    be = TransformersBackend(str(smollm2_dir), rope_theta=1e6, device="cpu", threads=1)
    assert be.model.config.rope_parameters["rope_theta"] == 1e6
    assert be.name == "transformers:SmolLM2-135M-Instruct:rope_theta=1e+06"
    inv_freq = be.model.model.rotary_emb.inv_freq
    d = be.model.config.head_dim
    assert math.isclose(inv_freq[1].item(), 1e6 ** (-2 / d), rel_tol=1e-5)
    (out,) = be.chat([[{"role": "user", "content": "Say hello."}]], SamplingParams(max_new_tokens=4))
    assert len(out) == 1 and isinstance(out[0], str)


def test_batches_are_capped_by_the_padded_attention_mask():
    from megatron_longpo.generation.transformers_backend import plan_batches

    # shortest first, at most batch_size, and batch x longest^2 <= the budget (a batch of one always goes)
    lengths = [4096, 32768, 1000, 32768, 32768, 32768, 32768, 65536, 4000]
    batches = plan_batches(lengths, batch_size=8, max_attention_cells=2**32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert [[lengths[i] for i in b] for b in batches] == [
        [1000, 4000, 4096, 32768], [32768, 32768, 32768, 32768], [65536]]
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) ** 2 <= 2**32 for b in batches)
    assert plan_batches([10] * 5, batch_size=2) == [[0, 1], [2, 3], [4]]
    assert plan_batches([], batch_size=4) == []


def test_generate_calls_follow_the_plan(smollm2_dir, monkeypatch):
    from megatron_longpo.generation.backends import SamplingParams
    from megatron_longpo.generation.transformers_backend import TransformersBackend

    be = TransformersBackend(str(smollm2_dir), device="cpu", threads=1, batch_size=8, max_attention_cells=3 * 60**2,
                            decode="generate")
    shapes, real = [], be.model.generate

    def spy(**kw):
        shapes.append(tuple(kw["input_ids"].shape))
        return real(**kw)

    monkeypatch.setattr(be.model, "generate", spy)
    convs = [[{"role": "user", "content": "word " * n}] for n in (1, 30, 2, 3)]
    outs = be.chat(convs, SamplingParams(max_new_tokens=2))
    widths = sorted(len(be._prompt_ids(c)) for c in convs)
    assert len(outs) == 4 and all(len(o) == 1 for o in outs)
    assert [s[0] for s in shapes] == [3, 1] and shapes[1][1] == widths[-1] > 60
