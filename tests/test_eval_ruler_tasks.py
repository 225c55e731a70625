"""RULER's 13 tasks (megatron_longpo/eval/ruler_tasks.py) against RULER's own definitions, and the
provenance of their offline inputs (eval/corpus.py). Tokenizer only, no model."""
import json
import re
from collections import Counter

import pytest

from megatron_longpo.eval import corpus
from megatron_longpo.eval import ruler_tasks as R


@pytest.fixture(scope="module")
def tok(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def inputs():
    qa = corpus.standin_qa()
    return corpus.load_haystack(), {"squad": qa, "hotpotqa": qa}


def test_task_set_and_definitions_are_rulers():
    """scripts/synthetic.yaml and scripts/data/synthetic/constants.py, copied by hand from RULER."""
    assert R.RULER_TASKS == ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                             "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1",
                             "qa_2")
    fam = {t: R.TASKS[t][0] for t in R.RULER_TASKS}
    assert {f: R.TEMPLATES[f]["tokens_to_generate"] for f in set(fam.values())} == {
        "niah": 128, "variable_tracking": 30, "common_words_extraction": 120, "freq_words_extraction": 50, "qa": 32}
    assert {f: R.TEMPLATES[f]["metric"] for f in set(fam.values())} == {
        "niah": "all", "variable_tracking": "all", "common_words_extraction": "all", "freq_words_extraction": "all",
        "qa": "part"}
    a = {t: R.TASKS[t][1] for t in R.RULER_TASKS}
    assert [a[f"niah_single_{i}"]["type_haystack"] for i in (1, 2, 3)] == ["noise", "essay", "essay"]
    assert a["niah_single_3"]["type_needle_v"] == "uuids" and a["niah_multikey_1"]["num_needle_k"] == 4
    assert [a[f"niah_multikey_{i}"]["type_haystack"] for i in (1, 2, 3)] == ["essay", "needle", "needle"]
    assert a["niah_multikey_3"]["type_needle_k"] == a["niah_multikey_3"]["type_needle_v"] == "uuids"
    assert a["niah_multivalue"]["num_needle_v"] == 4 and a["niah_multiquery"]["num_needle_q"] == 4
    assert a["vt"] == {"num_chains": 1, "num_hops": 4} and a["cwe"] == {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}
    assert a["fwe"] == {"alpha": 2.0} and (a["qa_1"]["dataset"], a["qa_2"]["dataset"]) == ("squad", "hotpotqa")
    assert R.TEMPLATES["qa"]["answer_prefix"] == " Answer:"
    assert R.TEMPLATES["common_words_extraction"]["answer_prefix"] == (
        " Answer: The top 10 words that appear most often in the list are:")
    assert R.DEPTHS[:4] == [0, 3, 5, 8] and R.DEPTHS[-1] == 100 and len(R.DEPTHS) == 40


@pytest.mark.parametrize("length", [2048, 4096])
def test_every_length_inside_its_tolerance(tok, inputs, length):
    """Model input + generation budget <= the length (RULER's rule), and >= (1 - tolerance) x the length
    unless one more haystack unit would overshoot; counted exactly as the model is fed."""
    count, ids = R.chat_counter(tok)
    hay, qa = inputs
    fitter = R.Fitter()
    for task in R.RULER_TASKS:
        for i in range(2):
            s = R.generate_sample(task, length, i, count, hay, qa, seed=0, fitter=fitter)
            assert s.n_tokens == len(ids(s.prompt, s.answer_prefix))
            total = s.n_tokens + s.max_new_tokens
            tol = R.TOLERANCE.get(R.TASKS[task][0], 0.02)
            if task == "niah_multikey_3":  # a line of two UUIDs is ~55 tokens: one more overshoots
                tol = 0.07
            assert (1 - tol) * length <= total <= length, (task, total)


def test_answer_prefix_starts_the_assistant_turn(tok, inputs):
    count, ids = R.chat_counter(tok)
    hay, qa = inputs
    s = R.generate_sample("niah_single_2", 2048, 0, count, hay, qa)
    key = s.meta["queries"][0]
    assert s.prompt.startswith("A special magic number is hidden within the following text.")
    assert s.prompt.endswith(f"What is the special magic number for {key} mentioned in the provided text?")
    assert s.answer_prefix == f"The special magic number for {key} mentioned in the provided text is"
    text = tok.decode(ids(s.prompt, s.answer_prefix))
    assert text.endswith("<|im_start|>assistant\n" + s.answer_prefix)
    m = R.generate_sample("niah_multivalue", 2048, 0, count, hay, qa)
    assert m.prompt.startswith("Some special magic numbers are hidden") and m.answer_prefix.endswith("text are")
    q = R.generate_sample("niah_multiquery", 2048, 0, count, hay, qa)
    k = q.meta["queries"]
    assert f"for {k[0]}, {k[1]}, {k[2]}, and {k[3]} mentioned" in q.prompt and len(q.answers) == 4
    v = R.generate_sample("vt", 2048, 0, count, hay, qa)
    assert v.answer_prefix == (f"Answer: According to the chain(s) of variable assignment in the text above, 5 "
                               f"variables are assigned the value {v.meta['value']}, they are: ")


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
                                  "niah_multikey_3", "niah_multivalue", "niah_multiquery"])
def test_needles_and_answers(tok, inputs, task):
    count, _ = R.chat_counter(tok)
    hay, qa = inputs
    s = R.generate_sample(task, 2048, 1, count, hay, qa, seed=5)
    family, args = R.TASKS[task]
    kind = args["type_needle_v"] if args["num_needle_v"] * args["num_needle_q"] > 1 else args["type_needle_v"][:-1]
    for key in s.meta["queries"]:
        for a in s.answers if len(s.meta["queries"]) == 1 else [s.meta["values"][s.meta["keys"].index(key)][0]]:
            assert f"One of the special magic {args['type_needle_v']} for {key} is: {a}." in s.prompt
    for a in s.answers:
        assert s.prompt.count(a) == 1
    assert f"special magic {kind}" in s.prompt
    needles = re.findall(r"One of the special magic \w+ for (\S+) is: (\S+)\.", s.prompt)
    n_needles = args["num_needle_k"] * args["num_needle_v"] if family == "niah" else 0
    if args["type_haystack"] == "needle":
        assert len(needles) > 20  # the haystack is made of needles
    else:
        assert len(needles) == max(args["num_needle_k"], args["num_needle_q"]) * args["num_needle_v"] or n_needles
    if args["type_haystack"] == "noise":
        assert s.prompt.count(R.NOISE) > 20
    if args["type_needle_k"] == "uuids":
        assert re.fullmatch(r"[0-9a-f-]{36}", s.meta["queries"][0])


def test_variable_tracking_chain(tok, inputs):
    count, _ = R.chat_counter(tok)
    s = R.generate_sample("vt", 2048, 0, count, *inputs)
    names = s.answers
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    body = s.prompt.split("Memorize and track", 2)[2]  # the task after the one-shot example
    lines = [x.rstrip() for x in body.split("\n") if x.startswith("VAR ")]  # RULER keeps "VAR B = VAR A "
    assert lines == [f"VAR {names[0]} = {s.meta['value']}"] + [f"VAR {names[j + 1]} = VAR {names[j]}" for j in range(4)]
    shot = s.prompt.split("Memorize and track", 2)[1]
    assert "they are: " in shot and "12345" not in shot and not any(n in shot for n in names)


def test_cwe_and_fwe_answers_are_the_most_frequent(tok, inputs):
    count, _ = R.chat_counter(tok)
    for length, (cw, ucw) in ((2048, (6, 1)), (4096, (30, 3))):
        s = R.generate_sample("cwe", length, 0, count, *inputs)
        listing = s.prompt.rsplit("Memorize the ones that appear most often.\n", 1)[1].split("\nQuestion:")[0]
        c = Counter(re.findall(r"\d+\. (\S+)", listing))
        assert {w for w, _ in c.most_common(10)} == set(s.answers) and len(s.answers) == 10
        assert all(c[w] == cw for w in s.answers) and max(v for w, v in c.items() if w not in s.answers) == ucw
    f = R.generate_sample("fwe", 4096, 0, count, *inputs)
    words = f.prompt.split("coded words. ", 1)[1].split("\nQuestion:")[0].split()
    c = Counter(words)
    assert [w for w, _ in c.most_common(4)] == ["..."] + f.answers  # RULER: the top word is noise


def test_qa_keeps_a_gold_paragraph_among_distractors(tok, inputs):
    count, _ = R.chat_counter(tok)
    hay, qa = inputs
    s = R.generate_sample("qa_1", 4096, 3, count, hay, qa)
    q = qa["squad"].qas[3]
    gold = qa["squad"].docs[q["context"][0]]
    assert s.prompt.count(gold) == 1 and s.prompt.count("Document ") >= 10
    assert q["query"] in s.prompt and s.answers == q["outputs"] and s.answers[0] in gold
    blank = q["query"].split('"')[1]
    assert blank.replace("_____", s.answers[0]) in gold
    s2 = R.generate_sample("qa_2", 4096, 3, count, hay, qa)
    assert s2.meta["question"] != s.meta["question"]  # the stand-in serves qa_2 from its other half
    assert len(qa["squad"].qas) >= 500 and len({x["query"] for x in qa["squad"].qas}) == len(qa["squad"].qas)


def test_same_seed_same_samples(tok, inputs):
    count, _ = R.chat_counter(tok)
    a = [R.generate_sample(t, 2048, 0, count, *inputs, seed=0) for t in ("niah_single_2", "vt", "fwe", "qa_1")]
    b = [R.generate_sample(t, 2048, 0, count, *inputs, seed=0) for t in ("niah_single_2", "vt", "fwe", "qa_1")]
    c = [R.generate_sample(t, 2048, 0, count, *inputs, seed=1) for t in ("niah_single_2", "vt", "fwe")]
    assert [(x.prompt, x.answers) for x in a] == [(x.prompt, x.answers) for x in b]
    assert all(x.prompt != y.prompt for x, y in zip(a, c))


def test_too_short_a_length_is_named(tok, inputs):
    count, _ = R.chat_counter(tok)
    with pytest.raises(R.LengthError, match="niah_single_1 at 150 tokens"):
        R.generate_sample("niah_single_1", 150, 0, count, *inputs)


def test_offline_inputs_provenance():
    """The haystack is neither the training documents nor the perplexity set; each names its source and
    licence; the held-out set has >= 200 documents."""
    hay = corpus.load_haystack()
    p = hay.provenance()
    assert "PSF" in p["licence"] and "Python" in p["source"] and p["words"] > 20000
    training = "\n".join(f.read_text() for f in sorted(corpus.TRAINING_DOCUMENTS.glob("*.md")))
    assert corpus.shared_sentences(hay.text, training) == set()
    docs, prov = corpus.load_heldout()
    assert len(docs) >= 200 and "PSF" in prov["licence"] and prov["documents"] == len(docs)
    assert corpus.shared_sentences(hay.text, "\n".join(docs)) == set()
    assert corpus.shared_sentences(training, "\n".join(docs)) == set()
    qa = corpus.standin_qa()
    assert qa.standin and qa.provenance()["stand_in"] is True


def test_user_files_in_rulers_formats(tmp_path):
    ess = tmp_path / "PaulGrahamEssays.json"
    ess.write_text(json.dumps({"text": "Word and more words. " * 400}))
    h = corpus.load_haystack(ess)
    assert h.provenance()["source"] == "user file PaulGrahamEssays.json" and len(h.words) == 1600
    squad = {"data": [{"paragraphs": [
        {"context": "Paris is the capital of France.", "qas": [
            {"question": "What is the capital of France?", "answers": [{"text": "Paris"}], "is_impossible": False},
            {"question": "Unanswerable?", "answers": [], "is_impossible": True}]},
        {"context": "Berlin is in Germany.", "qas": []}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    s = corpus.load_qa_file("squad", tmp_path / "squad.json")
    assert len(s.qas) == 1 and s.qas[0]["outputs"] == ["Paris"] and s.docs[s.qas[0]["more_context"][0]].startswith(
        "Berlin")
    hot = [{"question": "Q?", "answer": "A", "context": [["T1", ["s1 ", "s2"]], ["T2", ["x"]]]}]
    (tmp_path / "hotpot.json").write_text(json.dumps(hot))
    hq = corpus.load_qa_file("hotpotqa", tmp_path / "hotpot.json")
    assert sorted(hq.docs) == ["T1\ns1 s2", "T2\nx"] and len(hq.qas[0]["context"]) == 2
    with pytest.raises(corpus.CorpusError, match="--qa-file squad=.*no such file"):
        corpus.load_qa_file("squad", tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(corpus.CorpusError, match="not the squad dev JSON"):
        corpus.load_qa_file("squad", tmp_path / "bad.json")
    with pytest.raises(corpus.CorpusError, match="--haystack-file"):
        corpus.load_haystack(tmp_path / "nope.json")


def test_samples_cache_is_reused_only_when_the_settings_agree(tok, inputs, tmp_path):
    from megatron_longpo.eval import suite

    hay, qa = inputs
    cache = tmp_path / "samples.json"
    calls = []
    a, a_ids = suite.cached_samples(str(cache), tok, ["vt"], [1024], 2, 0, hay, qa, {"h": 1}, progress=calls.append)
    cache.write_text(cache.read_text().replace(a[0].prompt[-40:], "X" * 40))  # mark the stored copy
    b, b_ids = suite.cached_samples(str(cache), tok, ["vt"], [1024], 2, 0, hay, qa, {"h": 1})
    assert b[0].prompt.endswith("X" * 40) and b[1].prompt == a[1].prompt  # read back, not rebuilt
    # the model inputs come back with them, tokenized once: the file's ids, not the tokenizer's again
    _, fresh = R.chat_counter(tok)
    b_ids._ids = lambda *_: pytest.fail("tokenized again")
    assert b_ids(b[1].prompt, b[1].answer_prefix) == fresh(a[1].prompt, a[1].answer_prefix) == a_ids(a[1].prompt, a[1].answer_prefix)
    assert len(b_ids(b[0].prompt, b[0].answer_prefix)) == a[0].n_tokens
    c, _ = suite.cached_samples(str(cache), tok, ["vt"], [1024], 2, 1, hay, qa, {"h": 1})  # another seed
    assert c[0].prompt != b[0].prompt and not c[0].prompt.endswith("X" * 40)
    assert sum(calls) == 2


def test_word_lists_are_wonderwords():
    """The copied lists are the package's, read the same way (RULER reads them from wonderwords)."""
    ww = pytest.importorskip("wonderwords.random_word")
    assert R._wonderwords() == tuple(ww._get_words_from_text_file(f) for f in
                                     ("nounlist.txt", "adjectivelist.txt", "verblist.txt"))
