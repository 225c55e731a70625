"""The compact pairs form (generation/compact.py, tools/pack_pairs.py): real LongPO pairs made by the
pipeline from make_long_documents.py documents (scripted answers) pack and unpack to the same
records; a document that does not match its rebuild, and an edited compact file, are refused by line."""
import gzip
import json
import os
import sys

import pytest

from megatron_longpo.generation.documents import read_documents
from megatron_longpo.generation.longpo import LongPOBuilder, LongPOConfig
from megatron_longpo.generation.text import WhitespaceTokenCounter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import make_long_documents  # noqa: E402
import pack_pairs  # noqa: E402


class QABackend:
    """Two numbered questions per question prompt; answers that differ by side (and are not ASCII)."""

    name = "scripted"

    def chat(self, conversations, params):
        out = []
        for conv in conversations:
            last = conv[-1]["content"]
            if "Write 2 questions" in last:
                out.append(["1: Which town is first?\n2: Which river is longest?"])
            else:
                side = "long" if len(conv[0]["content"]) > 3000 else "short"
                out.append([f"The {side} answer — about “{last[-30:]}” with some words."])
        return out


@pytest.fixture
def pairs(tmp_path):
    docs = tmp_path / "docs.jsonl"
    assert make_long_documents.main(["--n", "3", "--words", "900", "--seed", "7", "--out", str(docs)]) == 0
    cfg = LongPOConfig(min_chunk_tokens=100, max_chunk_tokens=300, max_chunks=3, questions_asked=2,
                       question_prompt="{context}\n\nWrite {n} questions.", max_pair_tokens=100_000, seed=1)
    out = tmp_path / "pairs.jsonl"
    stats = LongPOBuilder(QABackend(), WhitespaceTokenCounter(), cfg).run(read_documents(docs), out, progress=False)
    assert stats.counts["documents_written"] == 3
    return out


def test_round_trip_is_identical(pairs, tmp_path):
    packed, back, docs_back = tmp_path / "p.jsonl.gz", tmp_path / "back.jsonl", tmp_path / "docs_back.jsonl"
    assert pack_pairs.main(["pack", str(pairs), "-o", str(packed), "--docs-n", "3", "--docs-words", "900",
                            "--docs-seed", "7", "--setting", "chunk_tokens=300"]) == 0
    assert pack_pairs.main(["unpack", str(packed), "-o", str(back), "--docs-out", str(docs_back)]) == 0
    orig = [json.loads(l) for l in open(pairs, encoding="utf-8")]
    new = [json.loads(l) for l in open(back, encoding="utf-8")]
    assert len(orig) == 3 and sum(len(r["turns"]) for r in orig) >= 6
    assert new == orig  # record by record
    assert back.read_bytes() == pairs.read_bytes()  # and byte for byte, in the builder's key order
    assert docs_back.read_bytes() == (tmp_path / "docs.jsonl").read_bytes()
    with gzip.open(packed, "rt", encoding="utf-8") as f:
        header = json.loads(f.readline())
        lines = [json.loads(l) for l in f]
    assert header["documents"] == {"generator": "gazetteer", "n": 3, "words": 900, "seed": 7}
    assert header["generation"]["chunk_tokens"] == "300" and header["records"] == 3
    assert all("long_context" not in l and "short_context" not in json.dumps(l) for l in lines)
    assert os.path.getsize(packed) < os.path.getsize(pairs) / 4
    # reproducible bytes (gzip without a time stamp): a re-pack is the same file
    again = tmp_path / "again.jsonl.gz"
    pack_pairs.main(["pack", str(pairs), "-o", str(again), "--docs-n", "3", "--docs-words", "900",
                     "--docs-seed", "7", "--setting", "chunk_tokens=300"])
    assert again.read_bytes() == packed.read_bytes()


def test_a_document_that_is_not_its_rebuild_is_refused_by_line(pairs, tmp_path, capsys):
    rows = [json.loads(l) for l in open(pairs, encoding="utf-8")]
    rows[1]["long_context"] = rows[1]["long_context"].replace("River", "Creek", 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "p.jsonl.gz"
    assert pack_pairs.main(["pack", str(bad), "-o", str(out), "--docs-n", "3", "--docs-words", "900",
                            "--docs-seed", "7"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: its long_context is not the rebuilt document" in err and not out.exists()
    # the wrong document parameters are refused at line 1, naming the flags
    assert pack_pairs.main(["pack", str(pairs), "-o", str(out), "--docs-n", "3", "--docs-words", "800",
                            "--docs-seed", "7"]) == 2
    assert f"{pairs}:1:" in capsys.readouterr().err
    assert pack_pairs.main(["pack", str(pairs), "-o", str(out), "--docs-n", "2", "--docs-words", "900",
                            "--docs-seed", "7"]) == 2
    assert "is not one of the 2 documents of seed 7" in capsys.readouterr().err


def test_an_edited_compact_file_is_refused_by_line(pairs, tmp_path, capsys):
    packed = tmp_path / "p.jsonl.gz"
    pack_pairs.main(["pack", str(pairs), "-o", str(packed), "--docs-n", "3", "--docs-words", "900", "--docs-seed", "7"])
    with gzip.open(packed, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    line = json.loads(lines[2])
    line["turns"][0]["chosen"] += " (edited)"
    lines[2] = json.dumps(line, ensure_ascii=False)
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    back = tmp_path / "back.jsonl"
    assert pack_pairs.main(["unpack", str(packed), "-o", str(back)]) == 2
    assert f"{packed}:3: the rebuilt record differs" in capsys.readouterr().err and not back.exists()
    # a truncated file (a record lost) is refused too
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines[:2]) + "\n")
    assert pack_pairs.main(["unpack", str(packed), "-o", str(back)]) == 2
    assert "the header says 3: the file is truncated" in capsys.readouterr().err and not back.exists()
