"""SoLoPO data: answer normalisation and sub-EM (hand-checked), record schemas, long contexts."""
import json
import random
from pathlib import Path

import pytest

from megatron_longpo.generation.answers import extract_final_answer, normalize_answer, sub_exact_match
from megatron_longpo.generation.solopo import build_long_context, join_passages, qa_record_from_dict, read_qa_records
from megatron_longpo.generation.output import RunStats
from megatron_longpo.generation.text import WhitespaceTokenCounter

QA = Path(__file__).resolve().parents[1] / "examples" / "generation" / "qa.jsonl"


def test_normalize_answer_hand_checked():
    assert normalize_answer("The Venn River!") == "venn river"
    assert normalize_answer("  a   White-Heron ") == "whiteheron"  # punctuation removed, not spaced
    assert normalize_answer("An apple, the pear and a plum.") == "apple pear and plum"
    assert normalize_answer("Théâtre") == "théâtre"
    assert normalize_answer("“Meridian”") == "meridian"


@pytest.mark.parametrize("pred,golds,expected", [
    ("Talvik", ["Talvik"], True),
    ("She was born in the town of TALVIK.", ["Talvik"], True),
    ("It flows under the Venn.", ["Venn River", "Venn"], True),   # an alias matches
    ("The river is the Venn River", ["the Venn River"], True),    # articles dropped on both sides
    ("Marport", ["Venn River"], False),
    ("The ship sank in 1888.", ["1887"], False),
    ("The ship sank in 1887.", ["1887"], True),
    ("a white heron", ["heron"], True),
    ("A heron.", ["a white heron"], False),                       # the gold must be inside the prediction
    ("anything", ["", "  "], False),                              # empty golds never match
    ("", ["Talvik"], False),
])
def test_sub_exact_match_hand_checked(pred, golds, expected):
    assert sub_exact_match(pred, golds) is expected


def test_native_musique_and_hotpot_schemas():
    native = qa_record_from_dict({"id": "a", "question": "Q?", "answers": ["x", "x", "y"],
                                  "paragraphs": [{"title": "T", "text": "t", "is_supporting": True}]})
    assert native.answers == ("x", "y") and native.supporting[0].text == "t"
    musique = qa_record_from_dict({"id": "2hop_1", "question": "Q?", "answer": "x", "answer_aliases": ["X1"],
                                   "paragraphs": [{"idx": 0, "title": "A", "paragraph_text": "pa", "is_supporting": False},
                                                  {"idx": 1, "title": "B", "paragraph_text": "pb", "is_supporting": True}]})
    assert musique.answers == ("x", "X1") and [p.title for p in musique.supporting] == ["B"]
    hotpot = qa_record_from_dict({"_id": "h1", "question": "Q?", "answer": "yes",
                                  "supporting_facts": [["B", 0]],
                                  "context": [["A", ["s1. ", "s2."]], ["B", ["t1."]]]})
    assert hotpot.id == "h1" and [p.supporting for p in hotpot.passages] == [False, True]
    assert hotpot.passages[0].text == "s1. s2."
    no_id = qa_record_from_dict({"question": "Q?", "answers": ["x"], "paragraphs": []})
    assert no_id.id == qa_record_from_dict({"question": "Q?", "answers": ["x"], "paragraphs": []}).id
    with pytest.raises(ValueError, match="gold answer"):
        qa_record_from_dict({"question": "Q?", "paragraphs": []}, "f:1")
    with pytest.raises(ValueError, match="'question'"):
        qa_record_from_dict({"answers": ["x"]}, "f:1")


def test_malformed_records_are_counted(tmp_path):
    p = tmp_path / "qa.jsonl"
    good = {"question": "Q?", "answers": ["x"], "paragraphs": [{"title": "T", "text": "t", "is_supporting": True}]}
    p.write_text(json.dumps(good) + "\n" + json.dumps({"question": "Q?"}) + "\n")
    stats = RunStats()
    assert len(read_qa_records(p, stats)) == 1
    assert stats.dropped["record_malformed"] == 1 and stats.failures["malformed"] == 1
    with pytest.raises(ValueError):
        read_qa_records(p)


def test_long_context_holds_the_supporting_passages_among_distractors():
    records = read_qa_records(QA)
    assert len(records) == 10 and all(len(r.supporting) == 2 for r in records)
    pool = [p for r in records for p in r.passages]
    ws = WhitespaceTokenCounter()
    rec = records[0]
    for target in (120, 250, 600):
        text, n, n_distract = build_long_context(rec, pool, ws, target, random.Random(0))
        assert n == ws.count(text) <= target
        for p in rec.supporting:
            assert p.text in text
        # no distractor from another record contains the gold answer
        assert text.count("Talvik") == sum(p.text.count("Talvik") for p in rec.passages)
        assert n_distract >= 3 or target < 200
    # the same seed gives the same context, another seed another order
    a = build_long_context(rec, pool, ws, 600, random.Random(1))[0]
    assert a == build_long_context(rec, pool, ws, 600, random.Random(1))[0]
    assert a != build_long_context(rec, pool, ws, 600, random.Random(2))[0]
    assert join_passages(rec.supporting).startswith("Passage 1 (Winter Harbour)\n")


class Sampler:
    """Scripted samples per record: the answer list is chosen by a word of the question."""

    name = "sampler"

    def __init__(self, by_record, fail=()):
        self.by_record, self.fail, self.calls = by_record, set(fail), []

    def chat(self, conversations, params):
        from megatron_longpo.generation.backends import GenerationError

        self.calls.append((conversations, params))
        out, errors = [], {}
        for i, conv in enumerate(conversations):
            content = conv[0]["content"]
            key = next(k for k in self.by_record if k in content)
            if key in self.fail:
                errors[i] = RuntimeError("down")
                out.append(None)
            else:
                out.append(self.by_record[key][: params.n])
        if errors:
            raise GenerationError(errors, out)
        return out


def _solopo(records, backend, out, **kw):
    from megatron_longpo.generation.solopo import SoLoPOBuilder, SoLoPOConfig
    from megatron_longpo.generation.backends import SamplingParams

    cfg = SoLoPOConfig(target_long_tokens=200, n_samples=4, sampling=SamplingParams(max_new_tokens=8, temperature=0.9),
                       records_per_batch=kw.pop("records_per_batch", 4), max_consecutive_failures=0, **kw)
    return SoLoPOBuilder(backend, WhitespaceTokenCounter(), cfg).run(records, out, progress=False)


def test_solopo_pairs_counts_and_resume(tmp_path):
    from megatron_longpo.generation.solopo import validate_solopo_line

    records = read_qa_records(QA)[:4]
    samples = {  # chain-of-thought responses; sub-EM scores the final answer only
        "Winter Harbour": ["Passage 2: Ilse Marten was born in Talvik.\nAnswer: Talvik",
                           "The symphony is by Ilse Marten.\n**Final Answer:** Talvik.",
                           "Passage 2 mentions Talvik, but the orchestra is in the capital.\nAnswer: Oslo",
                           "Answer: Bergen"],                                                          # pair
        "Harlow Tower": ["Answer: Marport", "Answer: the Thames", "Answer: Marport", "It is a river."],  # none correct
        "Ostra Lakes": ["Answer: A white heron", "The answer is heron.", "Answer: The heron.",
                        "The flag shows \\boxed{herons}"],                                             # none wrong
        "Carrow Music": ["Edwin Hale founded it; he was a cellist.\nAnswer: cello", "Answer: piano", "Answer: violin",
                         "I cannot tell from these passages."],                                        # pair
    }
    be = Sampler(samples)
    out = tmp_path / "s.jsonl"
    st = _solopo(records, be, out)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [r["meta"]["id"] for r in rows] == ["q01", "q04"]
    by_id = {r.id: r for r in records}
    for r in rows:
        validate_solopo_line(r)
        for p in by_id[r["meta"]["id"]].supporting:  # the same passages, renumbered among distractors
            assert p.text in r["short_context"] and p.text in r["long_context"]
        assert r["meta"]["n_distractors"] >= 3
    w = samples["Winter Harbour"]
    assert rows[0]["chosen"] in w[:2] and rows[0]["rejected"] in w[2:]  # the whole responses, reasoning included
    assert rows[0]["meta"]["chosen_answer"] == "Talvik" and rows[0]["meta"]["rejected_answer"] in ("Oslo", "Bergen")
    assert rows[1]["chosen"] == samples["Carrow Music"][0] and rows[1]["meta"]["n_no_final_answer"] == 1
    assert rows[0]["meta"]["n_correct"] == 2 and rows[0]["meta"]["n_samples"] == 4
    assert st.dropped["record_no_correct_answer"] == 1 and st.dropped["record_no_wrong_answer"] == 1
    assert st.counts["samples_no_final_answer"] == 2  # neither chosen nor rejected, and counted
    assert st.counts["samples"] == 16
    # the chosen / rejected user message is the short context + instruction, sampled n times
    conv, params = be.calls[0][0][0], be.calls[0][1]
    assert params.n == 4 and conv[0]["content"].endswith("Question: " + records[0].question)
    # rerun: nothing left, no request
    be2 = Sampler(samples)
    st2 = _solopo(records, be2, out)
    assert be2.calls == [] and st2.counts["records_already_done"] == 4


def test_solopo_failures_are_retried_on_rerun(tmp_path):
    records = read_qa_records(QA)[:3]
    samples = {"Winter Harbour": ["Answer: Talvik", "Answer: Oslo"] * 2,
               "Harlow Tower": ["Answer: Venn River", "Answer: Marport"] * 2,
               "Ostra Lakes": ["Answer: heron", "Answer: swan"] * 2}
    out = tmp_path / "s.jsonl"
    st = _solopo(records, Sampler(samples, fail={"Harlow Tower"}), out)
    assert st.counts["records_failed"] == 1 and st.failures["sample_request"] == 1
    assert [json.loads(l)["meta"]["id"] for l in out.read_text().splitlines()] == ["q01", "q03"]
    st = _solopo(records, Sampler(samples), out)
    ids = [json.loads(l)["meta"]["id"] for l in out.read_text().splitlines()]
    assert ids == ["q01", "q03", "q02"] and st.counts["records_already_done"] == 2


def test_large_distractor_pool_is_drawn_lazily():
    import time

    from megatron_longpo.generation.solopo import Passage

    rec = read_qa_records(QA)[0]
    pool = [Passage(f"T{i}", f"passage {i} " + "filler " * 20) for i in range(50_000)]
    t0 = time.monotonic()
    text, n, k = build_long_context(rec, pool, WhitespaceTokenCounter(), 2000, random.Random(0))
    assert time.monotonic() - t0 < 2.0
    assert 1900 <= n <= 2000 and k > 50


@pytest.mark.parametrize("response,expected", [
    ("Passage 1 names the composer.\nAnswer: Talvik", "Talvik"),
    ("Reasoning.\n**Answer:** Talvik", "Talvik"),
    ("Reasoning.\n**Answer: Talvik**", "Talvik"),
    ("Step 1 ...\nFinal Answer: the Venn River.", "the Venn River"),
    ("- answer: 1887", "1887"),
    ("ANSWER\uff1a Talvik", "Talvik"),                                     # full-width colon
    ("So the final answer is Talvik. It was her birthplace.", "Talvik"),
    ('The answer is: "a white heron"', "a white heron"),
    ("The answer is: The answer is: 1887", "1887"),                        # the last phrase of the line
    ("Therefore \\boxed{1887}.", "1887"),
    ("Answer:\n\nTalvik", "Talvik"),                                       # the answer on the next line
    ("First guess.\nAnswer: Oslo\nWait, passage 2 says otherwise.\nAnswer: Talvik", "Talvik"),  # the last wins
    ("Answer: Oslo\nAnswer: Bergen\nAnswer: Talvik", "Talvik"),
    ("She was born in Talvik.", None),                                     # no final answer
    ("Answer the question: where was she born?", None),
    ("Answer:", None),
    ("", None),
])
def test_final_answer_extraction(response, expected):
    assert extract_final_answer(response) == expected


def test_sub_em_scores_the_extracted_answer():
    golds = ["Talvik"]
    mentions = "Passage 2 says she was born in Talvik, but I think not.\nAnswer: Oslo"
    assert sub_exact_match(mentions, golds)  # the whole response mentions the gold ...
    assert not sub_exact_match(extract_final_answer(mentions), golds)  # ... its final answer is wrong
    assert sub_exact_match(extract_final_answer("Reasoning.\nAnswer: the town of TALVIK."), golds)
    assert extract_final_answer("No answer here.") is None


def test_records_without_any_final_answer_and_the_whole_response_option(tmp_path):
    records = read_qa_records(QA)[:2]
    samples = {"Winter Harbour": ["She was born in Talvik.", "Oslo, I think."] * 2,
               "Harlow Tower": ["Answer: Venn River", "Answer: Marport", "no idea", "Answer: Marport"]}
    st = _solopo(records, Sampler(samples), tmp_path / "cot.jsonl")
    rows = [json.loads(l) for l in (tmp_path / "cot.jsonl").read_text().splitlines()]
    assert [r["meta"]["id"] for r in rows] == ["q02"]
    assert st.dropped["record_no_final_answer"] == 1 and st.counts["samples_no_final_answer"] == 5
    assert rows[0]["chosen"] == "Answer: Venn River" and rows[0]["rejected"] == "Answer: Marport"
    # the short-answer mode scores the whole response
    st = _solopo(records, Sampler(samples), tmp_path / "whole.jsonl", final_answer=False)
    rows = [json.loads(l) for l in (tmp_path / "whole.jsonl").read_text().splitlines()]
    assert [r["meta"]["id"] for r in rows] == ["q01", "q02"] and st.counts.get("samples_no_final_answer", 0) == 0
    assert rows[0]["chosen"] == "She was born in Talvik." and rows[0]["rejected"] == "Oslo, I think."
