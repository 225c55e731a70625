"""Chunking long documents: paragraph / section boundaries, the token budget, the offline Punkt fallback."""
from pathlib import Path

import nltk
import pytest

from megatron_longpo.generation.text import (
    HFTokenCounter, WhitespaceTokenCounter, chunk_bounds, chunk_document, is_heading, offline_sentence_splitter,
    paragraph_spans, select_chunks)

EXAMPLES = Path(__file__).resolve().parents[1] / "megatron_longpo" / "resources" / "documents"
WS = WhitespaceTokenCounter()


def _para(n_words: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n_words - 1)) + " end."


@pytest.fixture(scope="module")
def hf_counter(smollm2_dir):
    return HFTokenCounter.from_pretrained(str(smollm2_dir))


def test_paragraphs_pack_up_to_the_budget_and_split_only_between_paragraphs():
    paras = [_para(30, f"p{k}_") for k in range(7)]  # 30 words each
    text = "\n\n".join(paras)
    chunks = chunk_document(text, WS, max_tokens=70)
    # two 30-word paragraphs fit in 70 words, three do not
    assert [c.n_tokens for c in chunks] == [60, 60, 60, 30]
    for c in chunks:
        assert c.text == text[c.start : c.end]
        assert c.kinds == ("paragraph",)
        # every chunk starts and ends on a paragraph edge
        assert c.text.split("\n\n")[0] in paras and c.text.split("\n\n")[-1] in paras
    assert "".join(c.text for c in chunks).replace("\n\n", "") == "".join(paras)


def test_headings_start_a_chunk_and_stay_with_their_paragraph():
    text = "\n\n".join([
        "# Title", _para(20, "a"), _para(20, "b"),
        "## Section 2", _para(20, "c"),
        "Chapter 3", _para(20, "d"),
    ])
    spans = paragraph_spans(text)
    assert text[spans[0].start : spans[0].end].startswith("# Title\n\n")  # heading glued to its paragraph
    assert [s.opens_section for s in spans] == [True, False, True, True]
    # title+a (22 words) + b (20) = 42 >= half the budget: "## Section 2" opens a new chunk although
    # it would fit; section 2 (23 words) is under half full, so "Chapter 3" joins it
    chunks = chunk_document(text, WS, max_tokens=60)
    assert [c.text.split("\n")[0] for c in chunks] == ["# Title", "## Section 2"]
    assert [c.n_tokens for c in chunks] == [42, 45]  # "## Section 2"+c = 23, "Chapter 3"+d = 22
    chunks = chunk_document(text, WS, max_tokens=60, section_break_fill=0.3)
    assert [c.text.split("\n")[0] for c in chunks] == ["# Title", "## Section 2", "Chapter 3"]
    assert is_heading("III. RESULTS") and is_heading("Section 2.1: Methods") and not is_heading(_para(20, "x"))


def test_budget_holds_with_the_real_tokenizer_on_the_example_documents(hf_counter):
    for path in sorted(EXAMPLES.glob("*.md")):
        text = path.read_text()
        for budget in (400, 150, 60, 25):
            chunks = chunk_document(text, hf_counter, budget)
            assert chunks, path
            for c in chunks:
                assert c.n_tokens == hf_counter.count(c.text) <= budget
            # in order, no overlap, nothing but whitespace left out
            for a, b in zip(chunks, chunks[1:]):
                assert a.end <= b.start and not text[a.end : b.start].strip()
            covered = "".join(c.text for c in chunks)
            assert "".join(covered.split()) == "".join(text.split())


def test_sections_of_the_lighthouse_document_become_chunks(hf_counter):
    text = (EXAMPLES / "corran_point.md").read_text()
    chunks = chunk_document(text, hf_counter, 300)
    assert [c.text.split("\n")[0] for c in chunks] == [
        "# The Lighthouse Keepers of Corran Point", "## Chapter 2. Life on the Station",
        "## Chapter 3. The Change to Electricity", "## Chapter 4. Automation and the Museum"]


def test_punkt_sentence_fallback_works_offline():
    with pytest.raises(LookupError):  # no punkt data is installed: the splitter must not need it
        nltk.data.find("tokenizers/punkt")
    # the three example documents as ONE paragraph: longer than the budget, so sentences are the units
    flat = " ".join(" ".join(p.read_text().split()) for p in sorted(EXAMPLES.glob("*.md")))
    text = flat.replace("The board commissioned", "The board asked Dr. Keith, who had built two lights. The board commissioned")
    splitter = offline_sentence_splitter(text)
    sentences = [text[s:e] for s, e in splitter.span_tokenize(text)]
    assert 80 <= len(sentences) <= 95
    assert "The board asked Dr. Keith, who had built two lights." in sentences  # "Dr." is no sentence end
    assert "The tower was finished in 1851." in sentences
    chunks = chunk_document(text, WS, max_tokens=60)
    assert all(c.kinds == ("sentence",) for c in chunks)
    assert all(c.n_tokens <= 60 for c in chunks)
    assert all(c.text.endswith((".", "?", "!")) for c in chunks)
    assert sum(c.n_tokens for c in chunks) == len(text.split())


def test_hard_token_split_is_the_last_resort():
    text = " ".join(f"w{i}" for i in range(100))  # one "sentence" of 100 words, no punctuation
    chunks = chunk_document(text, WS, max_tokens=30)
    assert [c.n_tokens for c in chunks] == [30, 30, 30, 10]
    assert all(c.kinds == ("tokens",) for c in chunks)
    assert " ".join(c.text for c in chunks) == text


def test_select_chunks_spreads_over_the_document():
    chunks = chunk_document("\n\n".join(_para(10, f"p{k}_") for k in range(10)), WS, 10)
    assert len(chunks) == 10
    assert [c.index for c in select_chunks(chunks, 4)] == [0, 3, 6, 9]
    assert [c.index for c in select_chunks(chunks, 1)] == [0]
    assert len(select_chunks(chunks[:3], 4)) == 3
    with pytest.raises(ValueError, match="budget"):
        chunk_document("x", WS, 0)


def test_chunk_bounds_scale_the_reference_rule():
    assert chunk_bounds(32768, 1024) == (16384, 30000)  # the reference, Mistral-7B-v0.2's 32K window
    assert chunk_bounds(131072, 1024) == (65536, 120000)
    lo, hi = chunk_bounds(8192, 1024)  # SmolLM2: the answer budget, not the ratio, sets the maximum
    assert hi == 8192 - 1024 - 256 and lo == hi * 16384 // 30000
    for window in (4096, 8192, 32768, 131072):  # chunk + prompt reserve + answer always fit the window
        lo, hi = chunk_bounds(window, 1024)
        assert 0 < lo < hi and hi + 256 + 1024 <= window
    with pytest.raises(ValueError, match="--generator-window"):
        chunk_bounds(1024, 1024)


def test_minimum_chunk_size_drops_the_small_last_group_and_delays_section_breaks():
    paras = [_para(30, f"p{k}_") for k in range(7)]
    chunks = chunk_document("\n\n".join(paras), WS, max_tokens=70, min_tokens=50)
    assert [c.n_tokens for c in chunks] == [60, 60, 60, 30]  # returned, measured ...
    kept = select_chunks(chunks, 4, min_tokens=50)
    assert [c.n_tokens for c in kept] == [60, 60, 60]  # ... and the 30-token tail is not used
    assert [c.index for c in select_chunks(chunks, 2, min_tokens=50)] == [0, 2]
    # a new section closes a chunk at half the budget, and only once it holds min_tokens
    text = "\n\n".join([_para(20, "a"), "# Two", _para(20, "b"), "# Three", _para(20, "c")])
    assert [c.n_tokens for c in chunk_document(text, WS, max_tokens=70)] == [42, 22]
    assert [c.n_tokens for c in chunk_document(text, WS, max_tokens=70, min_tokens=50)] == [64]
    with pytest.raises(ValueError, match="minimum chunk tokens"):
        chunk_document(text, WS, max_tokens=60, min_tokens=61)
