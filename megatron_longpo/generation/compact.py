"""A compact, committable form of LongPO pairs made from gazetteer documents (tools/pack_pairs.py).

A LongPO pairs JSONL (generation/longpo.py) repeats its document in every line (`long_context`)
and again in slices (each turn's `short_context`). When the documents are gazetteers
(generation/gazetteer.py), both are rebuilt from (seed, index, words), so the compact form keeps
only what generation produced: gzip JSONL whose first line is a header

    {"format": FORMAT, "version": 1, "documents": {"generator": "gazetteer", "n", "words", "seed"},
     "generation": {free-form settings}, "records": N}

and then one line per pairs record:

    {"doc": document index, "turns": [{"span": [start, end], "instruction", "chosen", "rejected"}],
     "meta": the record's meta, verbatim (absent when the record had none), "sha": digest}

`span` is the short context's character range in the document. `sha` is the first 16 hex digits
of the SHA-256 of the original record (canonical JSON), so `unpack` proves each rebuilt record is
the packed one (a changed generator or an edited file is refused, naming the line). `pack` refuses
a record whose document is not the rebuilt gazetteer, naming the pairs file's line.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Iterator

from megatron_longpo.io import atomic_write

from .gazetteer import gazetteer, parse_gazetteer_id, write_gazetteers
from .output import iter_jsonl

FORMAT = "megatron-longpo/compact-longpo-pairs"
VERSION = 1
TURN_KEYS = ("short_context", "instruction", "chosen", "rejected")


class CompactError(ValueError):
    """A pairs or compact file that cannot be packed / unpacked; the message names the line."""


@dataclass(frozen=True)
class Gazetteers:
    """The make_long_documents parameters the pairs' documents were made with."""

    n: int
    words: int
    seed: int

    def text(self, index: int) -> tuple[str, str]:
        return gazetteer(self.seed, index, self.words)


def digest(record: dict) -> str:
    canon = json.dumps(record, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def _span(long_context: str, short: str, hint) -> list[int] | None:
    """The character range of `short` in the document: the builder's recorded span when it matches,
    else the first occurrence; None when the short context is not a slice of the document."""
    if isinstance(hint, (list, tuple)) and len(hint) == 2 and all(isinstance(x, int) for x in hint):
        s, e = hint
        if 0 <= s <= e and long_context[s:e] == short:
            return [s, e]
    s = long_context.find(short)
    return None if s < 0 else [s, s + len(short)]


def compact_record(rec: dict, docs: Gazetteers, where: str) -> dict:
    """One pairs record -> its compact line; CompactError (prefixed by `where`) when it cannot be."""
    if not isinstance(rec, dict):
        raise CompactError(f"{where}: not a JSON object")
    extra = set(rec) - {"long_context", "turns", "meta"}
    if extra:
        raise CompactError(f"{where}: keys {sorted(extra)} are not kept by the compact form (only long_context, "
                           "turns, meta)")
    meta = rec.get("meta")
    doc_id = meta.get("id") if isinstance(meta, dict) else None
    parsed = parse_gazetteer_id(doc_id) if isinstance(doc_id, str) else None
    if parsed is None:
        raise CompactError(f"{where}: meta.id {doc_id!r} is not a gazetteer document id (gazetteer-SEED-INDEX-NAME); "
                           "only pairs made from tools/make_long_documents.py documents can be packed")
    seed, index = parsed
    if seed != docs.seed or index >= docs.n:
        raise CompactError(f"{where}: document {doc_id} is not one of the {docs.n} documents of seed {docs.seed}; "
                           "pass the --docs-n/--docs-seed make_long_documents.py was run with")
    rid, text = docs.text(index)
    long_context = rec.get("long_context")
    if rid != doc_id or long_context != text:
        at = next((i for i, (a, b) in enumerate(zip(long_context or "", text)) if a != b),
                  min(len(long_context or ""), len(text)))
        raise CompactError(f"{where}: its long_context is not the rebuilt document {doc_id} (seed {docs.seed}, "
                           f"{docs.words} words; first difference at character {at}): pass the --docs-words/--docs-seed "
                           "the documents were made with, or the pairs were edited")
    turns = rec.get("turns")
    if not isinstance(turns, list) or not turns:
        raise CompactError(f"{where}: turns must be a non-empty list")
    spans = meta.get("chunk_spans") if isinstance(meta.get("chunk_spans"), list) else []
    out_turns = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or set(t) != set(TURN_KEYS):
            raise CompactError(f"{where}: turns[{i}] must have exactly the keys {list(TURN_KEYS)}")
        span = _span(text, t["short_context"], spans[i] if i < len(spans) else None)
        if span is None:
            raise CompactError(f"{where}: turns[{i}].short_context is not a slice of the document")
        out_turns.append({"span": span, "instruction": t["instruction"], "chosen": t["chosen"],
                          "rejected": t["rejected"]})
    line = {"doc": index, "turns": out_turns}
    if "meta" in rec:
        line["meta"] = meta
    line["sha"] = digest(rec)
    return line


def expand_record(line: dict, docs: Gazetteers) -> dict:
    """A compact line -> the pairs record it was packed from (key order as generation/longpo.py writes)."""
    _, text = docs.text(line["doc"])
    rec = {"long_context": text,
           "turns": [{"short_context": text[t["span"][0]:t["span"][1]], "instruction": t["instruction"],
                      "chosen": t["chosen"], "rejected": t["rejected"]} for t in line["turns"]]}
    if "meta" in line:
        rec["meta"] = line["meta"]
    return rec


def pack(pairs: str, out: str, docs: Gazetteers, generation: dict | None = None) -> dict:
    """Write the compact form of the pairs JSONL `pairs` to `out` (gzip, reproducible bytes); returns
    the header. CompactError for a record that cannot be packed, ValueError for a line that is not
    JSON (both name the line)."""
    lines = [compact_record(rec, docs, f"{pairs}:{lineno}") for lineno, rec in iter_jsonl(pairs)]
    header = {"format": FORMAT, "version": VERSION,
              "documents": {"generator": "gazetteer", "n": docs.n, "words": docs.words, "seed": docs.seed},
              "generation": generation or {}, "records": len(lines)}
    with atomic_write(out, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
            for obj in [header, *lines]:
                gz.write((json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))
    return header


def read_compact(path: str) -> tuple[dict, Iterator[tuple[int, dict]]]:
    """(header, (line number, compact line) ...) of a compact file; CompactError on a bad header."""
    if not os.path.isfile(path):
        raise CompactError(f"{path} does not exist")
    f = gzip.open(path, "rt", encoding="utf-8")
    try:
        header = json.loads(f.readline())
    except (OSError, json.JSONDecodeError, EOFError) as e:
        f.close()
        raise CompactError(f"{path}: not a gzip JSONL compact pairs file ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        f.close()
        raise CompactError(f"{path}: line 1 is not a {FORMAT} header; pack the pairs with tools/pack_pairs.py pack")
    if header.get("version") != VERSION:
        f.close()
        raise CompactError(f"{path}: version {header.get('version')} is not {VERSION}: this code cannot read it")

    def rows() -> Iterator[tuple[int, dict]]:
        with f:
            for lineno, raw in enumerate(f, 2):
                if raw.strip():
                    try:
                        yield lineno, json.loads(raw)
                    except (json.JSONDecodeError, EOFError, OSError) as e:
                        raise CompactError(f"{path}:{lineno}: unreadable ({e})") from None

    return header, rows()


def unpack(path: str, out: str, docs_out: str | None = None) -> dict:
    """Rebuild the pairs JSONL (each record checked against its digest) and, with `docs_out`, the
    documents JSONL make_long_documents.py wrote; returns the header."""
    header, rows = read_compact(path)
    d = header["documents"]
    docs = Gazetteers(int(d["n"]), int(d["words"]), int(d["seed"]))
    n = 0
    with atomic_write(out) as f:
        for lineno, line in rows:
            try:
                rec = expand_record(line, docs)
                ok = digest(rec) == line["sha"]
            except (KeyError, TypeError, IndexError) as e:
                raise CompactError(f"{path}:{lineno}: malformed compact line ({type(e).__name__}: {e})") from None
            if not ok:
                raise CompactError(f"{path}:{lineno}: the rebuilt record differs from the packed one (digest "
                                   "mismatch): the file was edited or the gazetteer generator changed")
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
        if n != header.get("records"):  # inside the block: nothing is written
            raise CompactError(f"{path}: {n} records, the header says {header.get('records')}: the file is truncated")
    if docs_out:
        write_gazetteers(docs_out, docs.n, docs.words, docs.seed)
    return header
