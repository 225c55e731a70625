"""The documents self-generated LongPO data is made from: text and Markdown files (one document
each) and the records of JSONL / Parquet / Arrow files and `datasets` directories, read by
data/inputs.py as the preprocessing reads them."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megatron_longpo.data.inputs import iter_records, resolve_inputs
from megatron_longpo.data.records import PreprocessError


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    source: str = ""


def text_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _doc(row: dict, text_field: str, id_field: str, source: str) -> Document | None:
    if not isinstance(row, dict):
        raise ValueError(f"{source}: the record is not a JSON object")
    text = row.get(text_field)
    if not isinstance(text, str):
        raise ValueError(f"{source}: the record has no string field {text_field!r} (fields: {sorted(row)}); "
                         "pass --text-field")
    if not text.strip():
        return None
    rid = row.get(id_field)
    return Document(str(rid) if rid not in (None, "") else text_id(text), text, source)


_TEXT = (".txt", ".md")
_RECORDS = (".jsonl", ".ndjson", ".json", ".parquet", ".arrow")


def read_documents(path: str | Path, text_field: str = "text", id_field: str = "id",
                   split: str | None = None) -> Iterator[Document]:
    """Documents from: a JSONL / JSON-lines file, a Parquet or Arrow file, a plain-text / Markdown
    file (one document), a directory of such files (recursively, sorted), or a
    `datasets.save_to_disk` directory. Records are read by data/inputs.py (as the preprocessing
    reads them). Ids: the record's `id_field` when present, else a hash of the text."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_dir() and not ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _TEXT + _RECORDS)
        if not files:
            raise FileNotFoundError(f"{path}: no .jsonl/.json/.parquet/.txt/.md files in this directory")
        for f in files:
            yield from _read_file(f, text_field, id_field, None)
        return
    if path.is_file() and path.suffix.lower() not in _TEXT + _RECORDS:
        raise ValueError(f"{path}: unknown input type; use .jsonl, .json, .parquet, .txt, .md or a directory")
    yield from _read_file(path, text_field, id_field, split)


def _read_file(path: Path, text_field: str, id_field: str, split: str | None) -> Iterator[Document]:
    """One text file (one document), or the records of one data file or saved `datasets` directory."""
    if path.suffix.lower() in _TEXT:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield Document(text_id(text), text, str(path))
        return
    try:
        files = resolve_inputs([str(path)], split)
        for f, number, row in iter_records(files):
            where = f"{f.display}:{number}" if f.fmt == "jsonl" else f"{f.display}:row{number + 1}"
            d = _doc(row, text_field, id_field, where)
            if d:
                yield d
    except PreprocessError as e:  # the generation tools report ValueErrors
        raise ValueError(str(e)) from None
