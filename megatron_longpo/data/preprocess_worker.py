"""The per-row work of the preprocessing, run in the pool's worker processes (or inline with one
worker): parse each raw row, encode its conversations and lay out its segments, or drop it with
its line number and reason (data/preprocess.py runs the pipeline)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from megatron_longpo.data.encoding import EncodedRecord, RecordEncoder
from megatron_longpo.data.inputs import RawRow
from megatron_longpo.data.records import (
    MALFORMED_JSON, OVERLENGTH, Drop, PreprocessError, RowError, TemplateError, parse_record,
)
from megatron_longpo.data.schema import FormatError
from megatron_longpo.data.tokenizer import TokenizerError, TokenizerSpec


@dataclass
class Kept:
    encoded: EncodedRecord


@dataclass(frozen=True)
class Job:
    kind: str
    context_template: str
    verify: bool
    max_length: int | None
    displays: tuple[str, ...]
    unit: tuple[str, ...]  # per file: "line" | "row"
    columns: tuple[tuple[str, str], ...] = ()  # native field -> the row's column (--columns)


def process_rows(encoder: RecordEncoder, job: Job, rows: list[RawRow]) -> list[Kept | Drop]:
    out: list[Kept | Drop] = []
    for row in rows:
        name, unit = job.displays[row.file], job.unit[row.file]

        def drop(reason: str, detail: str, length: int | None = None) -> Drop:
            return Drop(name, row.number, unit, reason, detail, length)

        try:
            if isinstance(row.payload, bytes):
                try:
                    obj = json.loads(row.payload)
                except ValueError as exc:
                    out.append(drop(MALFORMED_JSON, f"not valid JSON: {exc}"))
                    continue
            else:
                obj = row.payload
            enc = encoder.encode(parse_record(job.kind, obj, dict(job.columns)))
        except RowError as exc:
            out.append(drop(exc.reason, exc.detail))
            continue
        except (TemplateError, TokenizerError, FormatError) as exc:
            raise PreprocessError(f"{name}:{unit} {row.number}: {exc}") from None
        if job.max_length is not None:
            role, length = max(((r, max(v)) for r, v in enc.lengths.items()), key=lambda x: x[1])
            if length > job.max_length:
                out.append(
                    drop(OVERLENGTH, f"the {role!r} sequence is {length} tokens, over --max-length {job.max_length}", length)
                )
                continue
        out.append(Kept(enc))
    return out


# Set in each WORKER process by worker_init (never in the parent): its encoder and job.
_WORKER: tuple[RecordEncoder, Job] | None = None


def die_with_parent() -> None:
    """Linux: the worker gets SIGTERM when the parent dies (even by SIGKILL): no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_init(encoder: RecordEncoder | None = None, spec: TokenizerSpec | None = None,
                job: Job | None = None) -> None:
    """A forked worker gets the parent's `encoder` (inherited, not pickled); a spawned one gets
    None and builds its own from `spec`. Without a job only the signals are set up."""
    import signal

    # A forked worker inherits the parent's Python SIGTERM handler (the CLI turns SIGTERM into
    # KeyboardInterrupt). A Python handler only runs between bytecodes, so a SIGTERM from
    # pool.terminate() that lands just before the worker blocks on the task queue's lock is
    # never acted on, and terminate() waits forever. The kernel's default action has no such
    # window. Ctrl-C reaches the whole process group: the parent alone handles it.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    die_with_parent()
    global _WORKER
    if job is None:
        return
    if encoder is None:  # spawn start method: build here
        encoder = RecordEncoder(spec.build(), job.kind, job.context_template, job.verify)
    _WORKER = (encoder, job)


def worker_task(task: tuple[int, int, list[RawRow]]) -> tuple[int, int, list[Kept | Drop]]:
    chunk_id, part, rows = task
    encoder, job = _WORKER
    return chunk_id, part, process_rows(encoder, job, rows)
