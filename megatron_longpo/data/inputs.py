"""Input files (JSONL, Parquet, Arrow, `datasets` directories) -> numbered raw rows in chunks."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from megatron_longpo.data.records import PreprocessError

# ------------------------------------------------------------------------------------------
# inputs
@dataclass(frozen=True)
class InputFile:
    path: str
    fmt: str  # "jsonl" | "parquet" | "arrow"
    display: str


_EXT = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}


def resolve_inputs(paths: list[str], split: str | None = None) -> list[InputFile]:
    """The data files behind `paths` (files, `datasets` directories, directories of data files)."""
    files: list[InputFile] = []
    for p in paths:
        path = Path(p)
        if path.is_file():
            fmt = _EXT.get(path.suffix.lower())
            if fmt is None:
                raise PreprocessError(f"cannot tell the format of {p}: name it .jsonl, .parquet or .arrow")
            files.append(InputFile(str(path), fmt, str(p)))
        elif path.is_dir():
            files += _resolve_dir(path, split, str(p))
        else:
            raise PreprocessError(f"input {p} does not exist")
    if not files:
        raise PreprocessError(f"no data files (.jsonl, .parquet, .arrow) found in {', '.join(paths)}")
    return files


def _resolve_dir(path: Path, split: str | None, display: str) -> list[InputFile]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
        if chosen not in splits:
            raise PreprocessError(f"{display} holds splits {splits}; name one with --split")
        return _resolve_dir(path / chosen, None, f"{display}/{chosen}")
    if (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        state = json.loads((path / "state.json").read_text())
        names = [f["filename"] for f in state.get("_data_files", [])]
        if not names:
            raise PreprocessError(f"{display}/state.json lists no data files; is it a datasets.save_to_disk directory?")
        return [InputFile(str(path / n), "arrow", f"{display}/{n}") for n in names]
    found = sorted(q for q in path.rglob("*") if q.is_file() and q.suffix.lower() in _EXT)
    return [InputFile(str(q), _EXT[q.suffix.lower()], f"{display}/{q.relative_to(path)}") for q in found]


@dataclass(frozen=True)
class RawRow:
    file: int  # index into the input file list
    number: int  # JSONL: 1-based line number; tables: 0-based row index
    payload: bytes | dict


@dataclass
class Chunk:
    """`chunk_size` consecutive rows; materialised (`rows()`) only when it is processed."""

    id: int
    parts: list = field(default_factory=list)  # RawRow | (file, first_row, pyarrow.RecordBatch)
    count: int = 0

    def rows(self) -> list[RawRow]:
        out: list[RawRow] = []
        for part in self.parts:
            if isinstance(part, RawRow):
                out.append(part)
            else:
                f, first, batch = part
                out += [RawRow(f, first + k, d) for k, d in enumerate(batch.to_pylist())]
        return out


def _iter_parts(files: list[InputFile], batch_rows: int) -> Iterator[RawRow | tuple]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for fi, f in enumerate(files):
        if f.fmt == "jsonl":
            with open(f.path, "rb") as fh:
                for lineno, line in enumerate(fh, start=1):
                    if lineno == 1 and line.lstrip().startswith(b"["):
                        raise PreprocessError(
                            f"{f.display} is a JSON array; convert it to JSON Lines (one object per line)"
                        )
                    if line.strip():
                        yield RawRow(fi, lineno, line)
        elif f.fmt == "parquet":
            first = 0
            for batch in pq.ParquetFile(f.path).iter_batches(batch_size=batch_rows):
                yield (fi, first, batch)
                first += batch.num_rows
        else:
            source = pa.memory_map(f.path)
            try:
                reader = pa.ipc.open_stream(source)
            except pa.ArrowInvalid:
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                batches = iter(reader)
            first = 0
            for batch in batches:
                yield (fi, first, batch)
                first += batch.num_rows


def iter_chunks(files: list[InputFile], chunk_size: int) -> Iterator[Chunk]:
    """Consecutive chunks of `chunk_size` rows over all input files, in order."""
    chunk = Chunk(0)
    for part in _iter_parts(files, batch_rows=min(chunk_size, 1024)):
        if isinstance(part, RawRow):
            chunk.parts.append(part)
            chunk.count += 1
        else:
            fi, first, batch = part
            off = 0
            while off < batch.num_rows:
                take = min(chunk_size - chunk.count, batch.num_rows - off)
                chunk.parts.append((fi, first + off, batch.slice(off, take)))
                chunk.count += take
                off += take
                if chunk.count == chunk_size:
                    yield chunk
                    chunk = Chunk(chunk.id + 1)
            continue
        if chunk.count == chunk_size:
            yield chunk
            chunk = Chunk(chunk.id + 1)
    if chunk.count:
        yield chunk


def count_rows(files: list[InputFile]) -> int | None:
    """Row count from table metadata (for the progress bar); None when a JSONL file is involved."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    total = 0
    for f in files:
        if f.fmt == "jsonl":
            return None
        if f.fmt == "parquet":
            total += pq.ParquetFile(f.path).metadata.num_rows
        else:
            try:
                total += sum(b.num_rows for b in pa.ipc.open_stream(pa.memory_map(f.path)))
            except pa.ArrowInvalid:
                total += pa.ipc.open_file(pa.memory_map(f.path)).read_all().num_rows
    return total



def iter_records(files: list[InputFile], batch_rows: int = 256) -> Iterator[tuple[InputFile, int, dict]]:
    """Every record of `files`, in order, as (file, row number, record): JSON Lines parsed (1-based
    line numbers; a line that is not JSON is reported with its number), table rows as dicts
    (0-based row indices)."""
    for part in _iter_parts(files, batch_rows):
        if isinstance(part, RawRow):
            try:
                obj = json.loads(part.payload)
            except ValueError as exc:
                raise PreprocessError(f"{files[part.file].display}:{part.number}: not valid JSON ({exc})") from None
            yield files[part.file], part.number, obj
        else:
            fi, first, batch = part
            for k, row in enumerate(batch.to_pylist()):
                yield files[fi], first + k, row
