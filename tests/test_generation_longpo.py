"""The LongPO pipeline with a scripted generator: conditioning, filters, failures, resume, readers."""
import json
from dataclasses import replace

import pytest

from megatron_longpo.generation.backends import GenerationError, SamplingParams
from megatron_longpo.generation.documents import Document, read_documents, text_id
from megatron_longpo.generation.longpo import LongPOBuilder, LongPOConfig, validate_longpo_line
from megatron_longpo.generation.output import TooManyFailures
from megatron_longpo.generation.text import WhitespaceTokenCounter

WS = WhitespaceTokenCounter()


def make_doc(tag: str, n_paras: int = 3, words: int = 30) -> Document:
    paras = [f"{tag} paragraph {k}: " + " ".join(f"{tag}w{k}_{i}" for i in range(words - 3)) for k in range(n_paras)]
    text = "\n\n".join(paras)
    return Document(f"doc-{tag}", text, "test")


class ScriptedBackend:
    """Answers by looking at the prompt: questions for a question prompt, otherwise an answer that
    says whether it saw a whole document (long) or a chunk (short)."""

    name = "scripted"

    def __init__(self, docs, answer=None, fail_docs=()):
        self.docs = {d.text: d for d in docs}
        self.calls: list[tuple[list, SamplingParams]] = []
        self.answer = answer or (lambda side, instruction, conv: f"The {side} answer to '{instruction}' has some words.")
        self.fail_docs = set(fail_docs)

    def _doc_of(self, conv):
        first = conv[0]["content"]
        for text, d in self.docs.items():
            if first.startswith(text + "\n\n") or text.find(first.split("\n\n")[0]) >= 0:
                return d
        return None

    def chat(self, conversations, params):
        self.calls.append((conversations, params))
        out, errors = [], {}
        for i, conv in enumerate(conversations):
            d = self._doc_of(conv)
            if d is not None and d.id in self.fail_docs:
                errors[i] = RuntimeError(f"scripted failure for {d.id}")
                out.append(None)
                continue
            last = conv[-1]["content"]
            if "Write 2 questions" in last:
                chunk = last.split("\n\nWrite")[0]
                tag = chunk.split()[2].rstrip(":")  # "<doc> paragraph <k>:" -> k
                out.append([f"Sure!\n1. What does paragraph {tag} say?\n2. Why is paragraph {tag} there?"])
                continue
            side = "long" if conv[0]["content"].startswith(tuple(self.docs)) else "short"
            instruction = last.split("\n\n")[-1]
            out.append([self.answer(side, instruction, conv)] * params.n)
        if errors:
            raise GenerationError(errors, out)
        return out


def config(**kw) -> LongPOConfig:
    base = dict(min_chunk_tokens=0, max_chunk_tokens=40, max_chunks=4, questions_asked=2, questions_per_chunk=1,
                question_prompt="{context}\n\nWrite {n} questions.", max_pair_tokens=10_000, lead_phrases=(),
                docs_per_batch=2, seed=3, max_consecutive_failures=0)
    base.update(kw)
    return LongPOConfig(**base)


def read(path):
    return [json.loads(l) for l in open(path)]


def test_conditioning_of_chosen_and_rejected_turns(tmp_path):
    doc = make_doc("A")
    be = ScriptedBackend([doc])
    stats = LongPOBuilder(be, WS, config(lead_phrases=("As described in the preceding text,",),
                                         rejected_conditioning="history")).run(
        [doc], tmp_path / "o.jsonl", progress=False)
    (row,) = read(tmp_path / "o.jsonl")
    validate_longpo_line(row)
    assert row["long_context"] == doc.text and len(row["turns"]) == 3  # 3 paragraphs -> 3 chunks
    assert row["meta"]["chunk_ids"] == [0, 1, 2] and row["meta"]["id"] == "doc-A"
    for k, t in enumerate(row["turns"]):
        assert t["short_context"] == doc.text.split("\n\n")[k]
        assert t["instruction"].startswith("As described in the preceding text, ")
        assert f"paragraph {k} " in t["instruction"]  # the question is about its own chunk
        assert t["chosen"].startswith("The short answer") and t["rejected"].startswith("The long answer")
    # call 1: questions, one per chunk; call 2: all chosen answers, each on its chunk alone
    q_convs, _ = be.calls[0]
    assert [c[0]["content"] for c in q_convs] == [f"{p}\n\nWrite 2 questions." for p in doc.text.split("\n\n")]
    chosen_convs, _ = be.calls[1]
    assert [c for c in chosen_convs] == [
        [{"role": "user", "content": f"{t['short_context']}\n\n{t['instruction']}"}] for t in row["turns"]]
    # calls 3..5: rejected turn i = long context + the earlier rejected turns of the same document
    rej = [c[0][0] for c in be.calls[2:]]
    assert len(rej) == 3
    t = row["turns"]
    assert rej[0] == [{"role": "user", "content": f"{doc.text}\n\n{t[0]['instruction']}"}]
    assert rej[2] == [
        {"role": "user", "content": f"{doc.text}\n\n{t[0]['instruction']}"},
        {"role": "assistant", "content": t[0]["rejected"]},
        {"role": "user", "content": t[1]["instruction"]},
        {"role": "assistant", "content": t[1]["rejected"]},
        {"role": "user", "content": t[2]["instruction"]},
    ]
    assert stats.counts["documents_written"] == 1 and stats.counts["turns_kept"] == 3


def test_question_draw_is_seeded_and_independent_conditioning_batches(tmp_path):
    docs = [make_doc("A"), make_doc("B")]
    be = ScriptedBackend(docs)
    LongPOBuilder(be, WS, config(rejected_conditioning="independent")).run(docs, tmp_path / "a.jsonl", progress=False)
    assert len(be.calls) == 3  # questions, chosen, rejected: one batched call each
    assert all(len(c) == 1 for c in be.calls[2][0])  # every rejected turn sees [C_L; I] alone
    assert len(be.calls[2][0]) == 6
    first = [t["instruction"] for r in read(tmp_path / "a.jsonl") for t in r["turns"]]
    LongPOBuilder(ScriptedBackend(docs), WS, config(rejected_conditioning="independent")).run(
        docs, tmp_path / "b.jsonl", progress=False)
    assert first == [t["instruction"] for r in read(tmp_path / "b.jsonl") for t in r["turns"]]
    other = [LongPOBuilder(ScriptedBackend(docs), WS, config(seed=s)).run(docs, tmp_path / f"s{s}.jsonl", progress=False)
             for s in range(4)]
    draws = {tuple(t["instruction"] for r in read(tmp_path / f"s{s}.jsonl") for t in r["turns"]) for s in range(4)}
    assert len(draws) > 1 and all(o.counts["turns_kept"] == 6 for o in other)


def test_filters_drop_turns_and_keep_them_out_of_the_history(tmp_path):
    doc = make_doc("A", n_paras=4)

    def answer(side, instruction, conv):
        k = int(conv[0]["content"].split("paragraph ")[1].split(":")[0]) if side == "short" else None
        if side == "short" and k == 1:
            return "I'm sorry, but I can't assist with that."
        if side == "long" and "Why" in instruction and len(conv) > 1:
            return "again and again " * 30
        return f"The {side} answer to '{instruction}' has some words."

    be = ScriptedBackend([doc], answer=answer)
    stats = LongPOBuilder(be, WS, config(rejected_conditioning="history")).run([doc], tmp_path / "o.jsonl",
                                                                              progress=False)
    (row,) = read(tmp_path / "o.jsonl")
    kept_chunks = row["meta"]["chunk_ids"]
    assert 1 not in kept_chunks  # chunk 1's chosen answer was a refusal
    assert stats.dropped["chosen_refusal"] == 1
    # a refused chosen answer needs no rejected answer: 3 rejected requests for 4 questions
    assert sum(len(c) for c, _ in be.calls[2:]) == 3
    for t in row["turns"]:
        assert "again and again" not in t["rejected"]
    n_rep = stats.dropped.get("rejected_repetitive", 0)
    assert len(kept_chunks) + n_rep == 3
    # the history of every rejected request holds only kept turns
    kept_rejected = {t["rejected"] for t in row["turns"]}
    for convs, _ in be.calls[2:]:
        for conv in convs:
            for m in conv[1:-1:2]:
                assert m["role"] == "assistant" and m["content"] in kept_rejected


def test_identical_answers_and_length_limits(tmp_path):
    doc = make_doc("A")
    same = ScriptedBackend([doc], answer=lambda side, ins, conv: "The same answer for both sides here.")
    st = LongPOBuilder(same, WS, config()).run([doc], tmp_path / "a.jsonl", progress=False)
    assert st.dropped["identical_answers"] == 3 and st.dropped["doc_no_turn_kept"] == 1
    assert read(tmp_path / "a.jsonl") == []
    # doc 90 words; a turn adds instruction (5 words + 8) and answer (12 words + 8) = 33 tokens:
    # turn 1 -> 123, turn 2 -> 156, turn 3 -> 189 > 160
    ten = SamplingParams(max_new_tokens=10)
    st = LongPOBuilder(ScriptedBackend([doc]), WS, config(max_pair_tokens=160, chosen_params=ten,
                                                           rejected_params=ten)).run(
        [doc], tmp_path / "b.jsonl", progress=False)
    (row,) = read(tmp_path / "b.jsonl")
    assert len(row["turns"]) == 2 and st.dropped["over_length"] == 1
    st = LongPOBuilder(ScriptedBackend([doc]), WS, config(max_pair_tokens=50)).run([doc], tmp_path / "c.jsonl", progress=False)
    assert st.dropped["doc_over_max_pair_tokens"] == 1
    small = make_doc("S", n_paras=1, words=10)
    st = LongPOBuilder(ScriptedBackend([small]), WS, config()).run([small], tmp_path / "d.jsonl", progress=False)
    assert st.dropped["doc_single_chunk"] == 1


def test_resume_skips_finished_documents_and_repairs_a_torn_line(tmp_path):
    docs = [make_doc(t) for t in "ABCD"]
    out = tmp_path / "o.jsonl"
    LongPOBuilder(ScriptedBackend(docs), WS, config()).run(docs, out, progress=False)
    full = out.read_text()
    assert len(read(out)) == 4
    # second run: nothing to do, no request made
    be = ScriptedBackend(docs)
    st = LongPOBuilder(be, WS, config()).run(docs, out, progress=False)
    assert be.calls == [] and st.counts["documents_already_done"] == 4 and out.read_text() == full
    # a crash in the middle of writing D's line: the torn line is cut off and D is redone
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    ledger = out.with_name(out.name + ".done.jsonl")
    ledger.write_text("".join(l for l in ledger.read_text().splitlines(keepends=True) if "doc-D" not in l))
    be = ScriptedBackend(docs)
    st = LongPOBuilder(be, WS, config()).run(docs, out, progress=False)
    assert st.counts["torn_lines_repaired"] == 1 and st.counts["documents_already_done"] == 3
    assert st.counts["documents_written"] == 1
    rows = read(out)
    assert [r["meta"]["id"] for r in rows] == ["doc-A", "doc-B", "doc-C", "doc-D"]
    assert out.read_text() == full  # the same, deterministic result


def test_failed_documents_are_counted_kept_unsettled_and_retried(tmp_path):
    docs = [make_doc(t) for t in "ABC"]
    out = tmp_path / "o.jsonl"
    st = LongPOBuilder(ScriptedBackend(docs, fail_docs={"doc-B"}), WS, config()).run(docs, out, progress=False)
    assert [r["meta"]["id"] for r in read(out)] == ["doc-A", "doc-C"]
    assert st.counts["documents_failed"] == 1 and st.failures["question_request"] == 1  # once per document
    assert any("doc-B" in e for e in st.failure_examples)
    st = LongPOBuilder(ScriptedBackend(docs), WS, config()).run(docs, out, progress=False)
    assert st.counts["documents_already_done"] == 2 and st.counts["documents_written"] == 1
    ids = [r["meta"]["id"] for r in read(out)]
    assert sorted(ids) == ["doc-A", "doc-B", "doc-C"] and len(ids) == len(set(ids))


def test_too_many_consecutive_failures_stop_the_run(tmp_path):
    docs = [make_doc(t) for t in "ABCDEF"]
    be = ScriptedBackend(docs, fail_docs={d.id for d in docs})
    with pytest.raises(TooManyFailures, match="rerun the same command"):
        LongPOBuilder(be, WS, config(max_consecutive_failures=3, docs_per_batch=1)).run(docs, tmp_path / "o.jsonl",
                                                                                        progress=False)
    assert len(be.calls) == 3  # stopped after the third document


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"\{context\}"):
        LongPOConfig(question_prompt="Write questions.")
    with pytest.raises(ValueError, match="history or independent"):
        LongPOConfig(rejected_conditioning="both")
    with pytest.raises(ValueError, match="--min-chunk-tokens"):
        LongPOConfig(min_chunk_tokens=500, max_chunk_tokens=400)
    with pytest.raises(ValueError, match="--no-lead-phrase"):
        LongPOConfig(lead_phrases=("",))


def test_readers_give_the_same_documents(tmp_path, monkeypatch):
    texts = ["First document.\n\nIt has two paragraphs.", "Second document, one paragraph."]
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i}.txt").write_text(t)
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n")
    (tmp_path / "ided.jsonl").write_text(json.dumps({"id": 7, "body": texts[0]}) + "\n")
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": texts}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "ds"))
    want = [(text_id(t), t) for t in texts]
    for src in ("txt", "docs.jsonl", "docs.parquet", "ds"):
        assert [(d.id, d.text) for d in read_documents(tmp_path / src)] == want, src
    (d,) = read_documents(tmp_path / "ided.jsonl", text_field="body")
    assert d.id == "7"
    with pytest.raises(ValueError, match="--text-field"):
        list(read_documents(tmp_path / "ided.jsonl"))
    with pytest.raises(FileNotFoundError):
        list(read_documents(tmp_path / "missing"))


def test_a_crashing_backend_fails_documents_without_losing_others(tmp_path):
    docs = [make_doc(t) for t in "AB"]

    class Flaky(ScriptedBackend):
        def chat(self, conversations, params):
            if any(c[0]["content"].startswith(docs[1].text.split("\n\n")[0]) for c in conversations):
                raise RuntimeError("CUDA out of memory")
            return super().chat(conversations, params)

    out = tmp_path / "o.jsonl"
    st = LongPOBuilder(Flaky(docs), WS, config(docs_per_batch=1)).run(docs, out, progress=False)
    assert [r["meta"]["id"] for r in read(out)] == ["doc-A"]
    assert st.counts["documents_failed"] == 1
    assert st.failure_examples == ["doc-B: question_request: RuntimeError: CUDA out of memory"]
    ledger = out.with_name(out.name + ".done.jsonl").read_text()
    assert "doc-B" not in ledger  # not settled: a rerun tries it again


def test_output_file_checks(tmp_path):
    from megatron_longpo.generation.output import ResumableJsonl, meta_id

    out = tmp_path / "o.jsonl"
    out.write_text('{"meta": {"id": "a"}}\nnot json\n{"meta": {"id": "b"}}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        ResumableJsonl(out, meta_id)
    out.write_text('{"meta": {"id": "a"}}\n{"meta": {"id": "b"}}')  # complete, only the newline missing
    with ResumableJsonl(out, meta_id) as r:
        assert r.done_ids == {"a", "b"} and r.torn_lines == 0
        r.write("c", {"meta": {"id": "c"}})
    assert [json.loads(l)["meta"]["id"] for l in out.read_text().splitlines()] == ["a", "b", "c"]
    out.write_text('{"long_context": "x"}\n')
    with pytest.raises(ValueError, match="not written by this tool"):
        ResumableJsonl(out, meta_id)


# ---------------------------------------------------------------- the reference's rules (issue #16)

class CountingBackend(ScriptedBackend):
    """Writes `counts[k]` numbered questions ("1: ...") for the chunk of paragraph k."""

    def __init__(self, docs, counts, **kw):
        super().__init__(docs, **kw)
        self.counts = counts

    def chat(self, conversations, params):
        if "questions." not in conversations[0][-1]["content"]:
            return super().chat(conversations, params)
        self.calls.append((conversations, params))
        out = []
        for conv in conversations:
            k = int(conv[-1]["content"].split("paragraph ")[1].split(":")[0])
            out.append(["\n".join(f"{i + 1}: What is point {chr(97 + i)} of paragraph {k}?"
                                  for i in range(self.counts[k]))])
        return out


def test_a_chunk_is_kept_only_when_exactly_n_questions_parse(tmp_path):
    doc = make_doc("A", n_paras=4)
    counts = {0: 4, 1: 3, 2: 5, 3: 4}
    st = LongPOBuilder(CountingBackend([doc], counts), WS, config(questions_asked=4)).run(
        [doc], tmp_path / "o.jsonl", progress=False)
    (row,) = read(tmp_path / "o.jsonl")
    assert row["meta"]["chunk_ids"] == [0, 3]
    assert st.dropped["chunk_too_few_questions"] == 1 and st.dropped["chunk_too_many_questions"] == 1
    assert st.counts["questions_parsed"] == 16 and st.counts["questions_used"] == 2
    for t, k in zip(row["turns"], (0, 3)):  # one of the chunk's own N questions
        assert t["instruction"] in {f"What is point {c} of paragraph {k}?" for c in "abcd"}
    # the old, lenient rule keeps every chunk with at least one question
    st = LongPOBuilder(CountingBackend([doc], counts), WS, config(questions_asked=4, exact_question_count=False)).run(
        [doc], tmp_path / "lenient.jsonl", progress=False)
    assert read(tmp_path / "lenient.jsonl")[0]["meta"]["chunk_ids"] == [0, 1, 2, 3]
    # the pick is seeded: the same seed picks the same question, other seeds others
    picks = []
    for seed in (0, 0, 1, 2, 3, 4, 5):
        LongPOBuilder(CountingBackend([doc], counts), WS, config(questions_asked=4, seed=seed)).run(
            [doc], tmp_path / f"seed{len(picks)}.jsonl", progress=False)
        picks.append(read(tmp_path / f"seed{len(picks)}.jsonl")[0]["turns"][0]["instruction"])
    assert picks[0] == picks[1] and len(set(picks)) > 1


def test_lead_phrases_are_drawn_from_the_list(tmp_path):
    from megatron_longpo.generation.filters import LEAD_PHRASES

    docs = [make_doc(t, n_paras=4) for t in "ABCD"]
    LongPOBuilder(ScriptedBackend(docs), WS, config(lead_phrases=LEAD_PHRASES)).run(docs, tmp_path / "a.jsonl",
                                                                                  progress=False)
    instructions = [t["instruction"] for r in read(tmp_path / "a.jsonl") for t in r["turns"]]
    assert len(instructions) == 16
    used = set()
    for ins in instructions:
        lead = next(p for p in LEAD_PHRASES if ins.startswith(p + " "))
        used.add(lead)
        assert ins[len(lead) + 1 :].startswith(("what does paragraph", "why is paragraph"))  # opener lower-cased
    assert len(used) > 3  # drawn, not fixed
    LongPOBuilder(ScriptedBackend(docs), WS, config(lead_phrases=LEAD_PHRASES)).run(docs, tmp_path / "b.jsonl",
                                                                                  progress=False)
    assert instructions == [t["instruction"] for r in read(tmp_path / "b.jsonl") for t in r["turns"]]


def test_chunk_bounds_drop_small_groups_and_keep_at_most_four(tmp_path):
    doc = make_doc("A", n_paras=11)  # 11 paragraphs of 30 words
    be = ScriptedBackend([doc])
    st = LongPOBuilder(be, WS, config(min_chunk_tokens=50, max_chunk_tokens=70)).run(
        [doc], tmp_path / "o.jsonl", progress=False)
    # five groups of two paragraphs (60 words) and the 30-word last one: that is dropped, 4 of the 5 others used
    assert st.counts["chunks_total"] == 6 and st.dropped["chunk_under_min_tokens"] == 1
    assert st.dropped["chunk_over_max_chunks"] == 1 and st.counts["chunks_used"] == 4
    (row,) = read(tmp_path / "o.jsonl")
    assert 5 not in row["meta"]["chunk_ids"] and len(row["turns"]) == 4
    assert row["meta"]["chunk_bounds"] == [50, 70]
    for t in row["turns"]:
        assert 50 <= WS.count(t["short_context"]) <= 70
    for convs, _ in be.calls[:1]:  # every question prompt holds a chunk within the bounds
        for conv in convs:
            assert 50 <= WS.count(conv[0]["content"].split("\n\nWrite")[0]) <= 70
    # no group reaches the minimum: the document is dropped, and said so
    st = LongPOBuilder(ScriptedBackend([doc]), WS, config(min_chunk_tokens=65, max_chunk_tokens=70)).run(
        [doc], tmp_path / "none.jsonl", progress=False)
    assert st.dropped["chunk_under_min_tokens"] == 6 and st.dropped["doc_no_chunk_in_range"] == 1
    assert read(tmp_path / "none.jsonl") == []


def test_rejected_answers_are_single_turn_by_default(tmp_path):
    doc = make_doc("A")
    be = ScriptedBackend([doc])
    d = LongPOConfig()  # the default sampling settings
    cfg = replace(config(), question_params=d.question_params, chosen_params=d.chosen_params,
                  rejected_params=d.rejected_params)
    assert cfg.rejected_conditioning == "independent"
    LongPOBuilder(be, WS, cfg).run([doc], tmp_path / "o.jsonl", progress=False)
    (row,) = read(tmp_path / "o.jsonl")
    t = row["turns"]
    assert len(be.calls) == 3  # questions, chosen, rejected
    (q_convs, q_params), (_, c_params), (r_convs, r_params) = be.calls
    assert (q_params.temperature, q_params.top_p, q_params.max_new_tokens) == (0.7, 0.9, 1024)
    assert c_params.temperature == 0.0  # greedy chosen (the paper)
    assert (r_params.temperature, r_params.top_p, r_params.max_new_tokens) == (1.0, 1.0, 1024)
    assert r_convs == [[{"role": "user", "content": f"{doc.text}\n\n{x['instruction']}"}] for x in t]
    # the request for turn 2 holds neither turn 1's question nor its rejected answer
    second = r_convs[1][0]["content"]
    assert t[0]["instruction"] not in second and t[0]["rejected"] not in second


def test_long_context_failures_stay_rejected_and_chosen_ones_go(tmp_path):
    doc = make_doc("A", n_paras=3)

    def answer(side, instruction, conv):
        if side == "long":
            return f"The text does not mention anything about '{instruction}'."
        if "paragraph 1:" in conv[0]["content"]:
            return "The text does not mention this at all."
        return f"The short answer to '{instruction}' has some words."

    st = LongPOBuilder(ScriptedBackend([doc], answer=answer), WS, config()).run([doc], tmp_path / "o.jsonl",
                                                                                 progress=False)
    (row,) = read(tmp_path / "o.jsonl")
    assert row["meta"]["chunk_ids"] == [0, 2] and st.dropped["chosen_refusal"] == 1
    assert all(t["rejected"].startswith("The text does not mention") for t in row["turns"])
    assert not any(k.startswith("rejected_") for k in st.dropped)
    # the reference code's post-processing also dropped those: an option
    from megatron_longpo.generation.filters import AnswerFilter

    st = LongPOBuilder(ScriptedBackend([doc], answer=answer), WS,
                       config(rejected_filter=AnswerFilter(0.95, drop_refusals=True))).run(
        [doc], tmp_path / "strict.jsonl", progress=False)
    assert st.dropped["rejected_refusal"] == 2 and read(tmp_path / "strict.jsonl") == []


def test_a_missing_input_is_named_before_anything_else(tmp_path, capsys):
    """A wrong input path is reported as such, even with --backend openai and no --tokenizer (which
    would otherwise be the first complaint)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "build_longpo_pairs.py"
    spec = importlib.util.spec_from_file_location("build_longpo_pairs_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    missing = tmp_path / "nope.jsonl"
    code = cli.main([str(missing), "-o", str(tmp_path / "out.jsonl"), "--backend", "openai",
                     "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert code == 2 and f"input {missing} does not exist" in err and "--tokenizer" not in err
