"""Input files (JSONL, Parquet, Arrow, `datasets` directories, Hub datasets) -> numbered raw rows in chunks."""

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
    """The data files behind `paths`: files, `datasets.save_to_disk` directories (read with
    `datasets.load_from_disk`), directories of data files, or a Hugging Face Hub dataset name
    (`datasets.load_dataset`, where the network allows): both datasets paths give the Arrow files
    of the dataset's cache, streamed like any .arrow file."""
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
        elif _looks_like_hub_name(p):
            files += _hub_dataset(p, split)
        else:
            raise PreprocessError(f"input {p} does not exist")
    if not files:
        raise PreprocessError(f"no data files (.jsonl, .parquet, .arrow) found in {', '.join(paths)}")
    return files


def _looks_like_hub_name(p: str) -> bool:
    """owner/name or name: no file extension, no path beyond one slash, not absolute."""
    return (not p.startswith((".", "/", "~")) and p.count("/") <= 1 and Path(p).suffix.lower() not in _EXT
            and all(part and all(c.isalnum() or c in "-_." for c in part) for part in p.split("/")))


HUB_HOST = ("huggingface.co", 443)


def hub_reachable(timeout: float = 5.0) -> str | None:
    """None when the Hub answers; else why not (offline mode set, or the connection error)."""
    import os
    import socket

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError as exc:
        return f"{HUB_HOST[0]} cannot be reached: {exc.strerror or exc}"
    return None


def _arrow_files(ds, display: str) -> list[InputFile]:
    names = [f["filename"] for f in ds.cache_files]
    if not names:
        raise PreprocessError(f"{display} is held in memory, not in Arrow files; save it with save_to_disk and pass that directory")
    return [InputFile(n, "arrow", f"{display}/{Path(n).name}") for n in names]


def _pick_split(dd, split: str | None, display: str):
    splits = list(dd.keys())
    chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else None))
    if chosen not in splits:
        raise PreprocessError(f"{display} holds splits {splits}; name one with --split")
    return dd[chosen], f"{display}/{chosen}"


def _hub_dataset(name: str, split: str | None) -> list[InputFile]:
    why = hub_reachable()
    if why is not None:
        raise PreprocessError(
            f"{name} is not a local file or directory, and the Hugging Face Hub cannot be reached to load it ({why}); "
            f"where there is a network run `datasets.load_dataset({name!r}).save_to_disk(DIR)` and pass --input DIR"
        )
    import datasets

    try:
        dd = datasets.load_dataset(name)
    except Exception as exc:  # noqa: BLE001 - any loading problem is the user's to fix: say it in one line
        raise PreprocessError(f"datasets.load_dataset({name!r}) failed: {type(exc).__name__}: {exc}") from None
    ds, display = _pick_split(dd, split, name) if isinstance(dd, datasets.DatasetDict) else (dd, name)
    return _arrow_files(ds, display)


def _resolve_dir(path: Path, split: str | None, display: str) -> list[InputFile]:
    if (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        import datasets

        try:
            dd = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001
            raise PreprocessError(f"datasets.load_from_disk({display!r}) failed: {type(exc).__name__}: {exc}") from None
        ds, shown = _pick_split(dd, split, display) if isinstance(dd, datasets.DatasetDict) else (dd, display)
        return _arrow_files(ds, shown)
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
