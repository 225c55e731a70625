"""Raw preference records -> chat-templated token segments -> the on-disk format (data/format.py).

The pipeline (`run_preprocess`):

1. Inputs (JSONL, Parquet, a `datasets.save_to_disk` directory, or a directory of data files)
   are streamed in chunks of `chunk_size` rows; nothing holds the whole corpus.
2. Workers (a fork pool, order preserved, a bounded number of tasks in flight) parse and
   validate each row, build the conversations of every role, tokenize them exactly (below) and
   lay the result out as typed segments. A bad row becomes a `Drop` with its line number.
3. The parent writes one shard per chunk into `PREFIX.work/` (temporary names, renamed, then a
   small JSON marker). A killed run restarted with the same arguments skips the finished
   chunks, so the result is byte-identical to an uninterrupted run.
4. The shards are merged in order into `PREFIX.bin/.idx`, hashed, and the manifest is written
   last; all three under temporary names first.

Exact tokenization, fast: a role sequence is the chat template's rendering of its conversation,
tokenized the way `apply_chat_template(tokenize=True)` does. Whole-text tokenization never
merges across a special token, so each stretch of text between special tokens is tokenized on
its own and cached within the record: the long-context user turn of a LongPO record is
tokenized once although it opens both the chosen and the rejected sequence (and the responses
once although they appear in the long and the reference sequences). Response boundaries are
located in the rendered text; the stretch that holds one is tokenized whole and in pieces, and
the pieces are used only when they concatenate to the whole (a token straddling the boundary
drops the row as `token_boundary`). Every record's segments are re-assembled and compared with
the sequences computed for each role before they are kept.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from megatron_longpo import __version__
from megatron_longpo.data.conversations import DEFAULT_CONTEXT_TEMPLATE, check_context_template
from megatron_longpo.data.encoding import RecordEncoder
from megatron_longpo.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    ShardWriter,
    bin_path,
    file_info,
    idx_path,
    length_stats,
    manifest_path,
    merge_shards,
    read_manifest,
    token_dtype,
)
from megatron_longpo.data.inputs import InputFile, RawRow, count_rows, iter_chunks, resolve_inputs
from megatron_longpo.data.preprocess_worker import Job, Kept, process_rows, worker_init, worker_task
from megatron_longpo.data.records import OVERLENGTH, Drop, PreprocessError
from megatron_longpo.data.schema import REF_ROLES, ROLES, Seg, Segment, check_kind
from megatron_longpo.data.tokenizer import ChatTokenizer, TokenizerError, TokenizerSpec
from megatron_longpo.io import atomic_write, atomic_write_json

EXIT_OK = 0  # every row kept
EXIT_ERROR = 2  # nothing written (bad input, template problem, over-length row under `fail`, ...): errors.EXIT_USER
EXIT_USAGE = 2  # bad command line
EXIT_DROPPED = 3  # dataset written, some rows dropped (see the summary / PREFIX.dropped.jsonl)


# ------------------------------------------------------------------------------------------
# the run
@dataclass
class PreprocessConfig:
    inputs: list[str]
    kind: str
    output: str
    tokenizer: TokenizerSpec
    context_template: str = DEFAULT_CONTEXT_TEMPLATE
    max_length: int | None = None
    on_overlength: str = "fail"  # "fail" | "skip"
    workers: int = 1
    chunk_size: int = 256  # rows per shard (the unit of resumption)
    split: str | None = None
    columns: dict[str, str] = field(default_factory=dict)  # native field -> the inputs' column (data/row_formats.py)
    verify: bool = False
    fresh: bool = False
    progress: bool = True
    chunk_delay: float = 0.0  # seconds to sleep after each shard (to test resumption)


@dataclass
class PreprocessResult:
    prefix: str
    kind: str
    written: bool
    manifest: dict | None
    rows_read: int
    kept: int
    drops: list[Drop]
    lengths: dict[str, dict]
    stored_tokens: int
    role_tokens: int
    chunks: int
    chunks_resumed: int
    elapsed_s: float
    warnings: list[str] = field(default_factory=list)
    replaced_hash: str | None = None  # the dataset hash of a dataset this run replaced at the same prefix

    @property
    def exit_code(self) -> int:
        if not self.written:
            return EXIT_ERROR
        return EXIT_DROPPED if self.drops else EXIT_OK

    def drops_by_reason(self) -> dict[str, list[Drop]]:
        out: dict[str, list[Drop]] = {}
        for d in self.drops:
            out.setdefault(d.reason, []).append(d)
        return out


def _check_config(cfg: PreprocessConfig) -> None:
    check_kind(cfg.kind)
    if cfg.kind != "pair":
        check_context_template(cfg.context_template)
    if cfg.max_length is not None and cfg.max_length < 1:
        raise PreprocessError(f"--max-length must be a positive number of tokens, got {cfg.max_length}")
    if cfg.on_overlength not in ("fail", "skip"):
        raise PreprocessError(f"--on-overlength must be fail or skip, got {cfg.on_overlength!r}")
    if cfg.workers < 1:
        raise PreprocessError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.chunk_size < 1:
        raise PreprocessError(f"--chunk-size must be at least 1, got {cfg.chunk_size}")
    parent = Path(cfg.output).absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise PreprocessError(f"--output {cfg.output}: {parent} is a file, not a directory; choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PreprocessError(f"--output {cfg.output}: {parent} is not writable; choose another --output")


def _run_key(cfg: PreprocessConfig, files: list[InputFile], tok: ChatTokenizer) -> dict:
    """What must not change for a work directory to be resumed."""
    return {
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "inputs": [[f.display, os.path.getsize(f.path), os.stat(f.path).st_mtime_ns] for f in files],
        "tokenizer": tok.fingerprint(),
        "tokenization": tok.mode,
        "context_template": cfg.context_template if cfg.kind != "pair" else None,
        "max_length": cfg.max_length,
        "on_overlength": cfg.on_overlength,
        "chunk_size": cfg.chunk_size,
        **({"columns": sorted(cfg.columns.items())} if cfg.columns else {}),
    }


def _prepare_workdir(work: Path, key: dict, fresh: bool) -> None:
    run_file = work / "run.json"
    if work.exists() and fresh:
        shutil.rmtree(work)
    if work.exists():
        try:
            old = json.loads(run_file.read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old != key:
            differs = sorted(k for k in key if old is None or old.get(k) != key[k])
            raise PreprocessError(
                f"{work} holds a run with other arguments or inputs (differs in: {', '.join(differs) or 'everything'}); "
                "rerun with the same arguments to resume it, or pass --fresh to discard it"
            )
        for stale in work.glob("*.tmp"):
            stale.unlink()
        return
    work.mkdir(parents=True)
    atomic_write_json(run_file, key)


def _shard_prefix(work: Path, chunk_id: int) -> Path:
    return work / f"shard-{chunk_id:06d}"


def _meta_path(work: Path, chunk_id: int) -> Path:
    return work / f"shard-{chunk_id:06d}.json"


def _write_shard(work: Path, chunk_id: int, results: list[Kept | Drop], rows: int, dtype: type) -> dict:
    kept = [r.encoded for r in results if isinstance(r, Kept)]
    prefix = _shard_prefix(work, chunk_id)
    if kept:
        writer = ShardWriter(prefix, dtype)
        for enc in kept:
            writer.add([Segment(Seg(t), a) for t, a in enc.segments])
        writer.close()
    lengths: dict[str, list[int]] = {}
    for enc in kept:
        for role, ls in enc.lengths.items():
            lengths.setdefault(role, []).extend(ls)
    meta = {
        "chunk": chunk_id,
        "rows": rows,
        "kept": len(kept),
        "drops": [asdict(d) for d in results if isinstance(d, Drop)],
        "stored_tokens": sum(e.stored_tokens for e in kept),
        "role_tokens": sum(e.role_tokens for e in kept),
        "lengths": lengths,
    }
    atomic_write_json(_meta_path(work, chunk_id), meta)
    return meta


def _ordered(pool, tasks: Iterator, window: int) -> Iterator:
    """Like pool.imap, but with at most `window` tasks in flight (imap reads its input eagerly)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(worker_task, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = None) -> PreprocessResult:
    """Preprocess `cfg.inputs` into the dataset at `cfg.output` (see the module docstring)."""
    t0 = time.monotonic()
    _check_config(cfg)
    files = resolve_inputs(cfg.inputs, cfg.split)
    try:
        tok = cfg.tokenizer.build()
        tok.self_check()
    except TokenizerError as exc:
        raise PreprocessError(str(exc)) from None
    prefix = str(cfg.output)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    work = Path(prefix + ".work")
    _prepare_workdir(work, _run_key(cfg, files, tok), cfg.fresh)
    dtype = token_dtype(tok.vocab_size)
    job = Job(
        cfg.kind,
        cfg.context_template,
        cfg.verify,
        cfg.max_length,
        tuple(f.display for f in files),
        tuple("line" if f.fmt == "jsonl" else "row" for f in files),
        tuple(sorted(cfg.columns.items())),
    )
    encoder = RecordEncoder(tok, cfg.kind, cfg.context_template, cfg.verify)

    from tqdm import tqdm

    bar = tqdm(total=count_rows(files), unit="row", desc=f"preprocess {cfg.kind}", disable=not cfg.progress,
               dynamic_ncols=True)
    metas: dict[int, dict] = {}
    resumed = 0
    pool = None
    try:
        done = {int(p.stem.split("-")[1]) for p in work.glob("shard-*.json")}
        pending_chunks: dict[int, dict] = {}  # chunk id -> {"rows", "parts", "results"}

        def tasks() -> Iterator[tuple[int, int, list[RawRow]]]:
            nonlocal resumed
            for chunk in iter_chunks(files, cfg.chunk_size):
                if chunk.id in done:
                    metas[chunk.id] = json.loads(_meta_path(work, chunk.id).read_text())
                    resumed += 1
                    bar.update(chunk.count)
                    continue
                rows = chunk.rows()
                # several tasks per worker, so that a few long records still spread over the pool
                n_parts = max(1, min(len(rows), 4 * cfg.workers)) if cfg.workers > 1 else 1
                size = math.ceil(len(rows) / n_parts)
                pieces = [rows[i : i + size] for i in range(0, len(rows), size)]
                pending_chunks[chunk.id] = {"rows": len(rows), "parts": len(pieces), "results": {}}
                for k, piece in enumerate(pieces):
                    yield chunk.id, k, piece

        if cfg.workers > 1:
            fork = "fork" in mp.get_all_start_methods()
            ctx = mp.get_context("fork" if fork else "spawn")
            pool = ctx.Pool(cfg.workers, initializer=worker_init, initargs=(encoder if fork else None, cfg.tokenizer, job))
            results_iter = _ordered(pool, tasks(), window=2 * cfg.workers)
        else:
            results_iter = ((c, k, process_rows(encoder, job, rows)) for c, k, rows in tasks())

        for chunk_id, part, results in results_iter:
            entry = pending_chunks[chunk_id]
            entry["results"][part] = results
            bar.update(len(results))
            if len(entry["results"]) < entry["parts"]:
                continue
            ordered = [r for k in range(entry["parts"]) for r in entry["results"][k]]
            del pending_chunks[chunk_id]
            if cfg.on_overlength == "fail":
                over = next((d for d in ordered if isinstance(d, Drop) and d.reason == OVERLENGTH), None)
                if over is not None:
                    raise PreprocessError(
                        f"{over.location}: {over.detail}. Raise --max-length, or pass --on-overlength skip to drop such rows"
                    )
            metas[chunk_id] = _write_shard(work, chunk_id, ordered, entry["rows"], dtype)
            if cfg.chunk_delay:
                time.sleep(cfg.chunk_delay)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()

    return _finish(cfg, tok, files, work, metas, resumed, dtype, t0, log)


def _finish(cfg, tok, files, work, metas, resumed, dtype, t0, log) -> PreprocessResult:
    prefix = str(cfg.output)
    ids = sorted(metas)
    if ids != list(range(len(ids))):
        raise PreprocessError(f"{work} is missing shards {sorted(set(range(max(ids) + 1)) - set(ids))}; rerun with --fresh")
    drops = [Drop(**d) for i in ids for d in metas[i]["drops"]]
    rows_read = sum(metas[i]["rows"] for i in ids)
    kept = sum(metas[i]["kept"] for i in ids)
    lengths_raw: dict[str, list[int]] = {r: [] for r in ROLES[cfg.kind]}
    for i in ids:
        for role, ls in metas[i]["lengths"].items():
            lengths_raw[role].extend(ls)
    lengths = {r: length_stats(v) for r, v in lengths_raw.items()}
    stored = sum(metas[i]["stored_tokens"] for i in ids)
    role_tokens = sum(metas[i]["role_tokens"] for i in ids)
    result = PreprocessResult(
        prefix, cfg.kind, False, None, rows_read, kept, drops, lengths, stored, role_tokens, len(ids), resumed, 0.0
    )
    if kept == 0:  # nothing to resume either: every row was read and dropped
        shutil.rmtree(work, ignore_errors=True)
        result.elapsed_s = time.monotonic() - t0
        return result
    if log:
        log(f"merging {len(ids)} shards and hashing")
    merge_shards([str(_shard_prefix(work, i)) for i in ids if metas[i]["kept"]], prefix, dtype)
    tmp_bin, tmp_idx = bin_path(prefix) + ".tmp", idx_path(prefix) + ".tmp"
    info = file_info(tmp_bin, tmp_idx, prefix)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": cfg.kind,
        "num_samples": kept,
        "roles": list(ROLES[cfg.kind]),
        "ref_roles": list(REF_ROLES[cfg.kind]),
        "token_dtype": np.dtype(dtype).name,
        "tokenizer": tok.describe(),
        "chat_template": tok.chat_template,
        "context_template": cfg.context_template if cfg.kind != "pair" else None,
        "loss_mask": "response tokens plus the chat template's end-of-turn token right after each response",
        "segment_types": {s.name: int(s) for s in Seg},
        "max_length": cfg.max_length,
        "on_overlength": cfg.on_overlength,
        "source": {
            "inputs": [f.display for f in files],
            "rows_read": rows_read,
            "rows_kept": kept,
            "rows_dropped": len(drops),
            "dropped_by_reason": dict(sorted(Counter(d.reason for d in drops).items())),
        },
        "tokens": {"stored": stored, "in_role_sequences": role_tokens},
        "lengths": lengths,
        **info,
        "created_by": f"megatron-longpo {__version__} tools/preprocess_pairs.py",
    }
    # publish: the manifest goes last, so a dataset with a manifest is always complete
    if os.path.exists(manifest_path(prefix)):
        try:
            result.replaced_hash = str(read_manifest(prefix).get("dataset_hash"))
        except Exception:  # an unreadable old manifest is replaced all the same
            result.replaced_hash = "unreadable"
        os.remove(manifest_path(prefix))
    os.replace(tmp_bin, bin_path(prefix))
    os.replace(tmp_idx, idx_path(prefix))
    report = f"{prefix}.dropped.jsonl"
    if drops:
        with atomic_write(report) as f:
            for d in drops:
                f.write(json.dumps({"location": d.location, **asdict(d)}, ensure_ascii=False) + "\n")
    elif os.path.exists(report):
        os.remove(report)
    atomic_write_json(manifest_path(prefix), manifest)
    shutil.rmtree(work)
    result.written = True
    result.manifest = manifest
    result.elapsed_s = time.monotonic() - t0
    return result
