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
import string
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from megatron_longpo import __version__
from megatron_longpo.data.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    PRIMARY_ROLES,
    REF_ROLES,
    ROLES,
    ALIASES,
    FormatError,
    Seg,
    Segment,
    ShardWriter,
    assemble,
    bin_path,
    check_kind,
    file_info,
    idx_path,
    layout,
    length_stats,
    manifest_path,
    merge_shards,
    token_dtype,
    write_json_atomic,
)
from megatron_longpo.data.tokenizer import ChatTokenizer, TokenizerError, TokenizerSpec

DEFAULT_CONTEXT_TEMPLATE = "{context}\n\n{instruction}"

EXIT_OK = 0  # every row kept
EXIT_ERROR = 1  # nothing written (bad input, template problem, over-length row under `fail`, ...)
EXIT_USAGE = 2  # bad command line
EXIT_DROPPED = 3  # dataset written, some rows dropped (see the summary / PREFIX.dropped.jsonl)

# why a row was dropped
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_FIELD = "empty_field"
EMPTY_RESPONSE = "empty_response"
BAD_MESSAGES = "bad_messages"
TEMPLATE_ERROR = "template_error"
TOKEN_BOUNDARY = "token_boundary"
OVERLENGTH = "overlength"

Message = dict[str, str]


class PreprocessError(Exception):
    """Preprocessing cannot go on; the message says where and what to do."""


class TemplateError(ValueError):
    """The chat template does not behave as this format needs (a property of the template)."""


class RowError(ValueError):
    """One row cannot be used; it is dropped and reported with its line number."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Drop:
    """A dropped row: where it is (JSONL: 1-based line; tables: 0-based row) and why."""

    file: str
    number: int
    unit: str  # "line" | "row"
    reason: str
    detail: str
    length: int | None = None

    @property
    def location(self) -> str:
        return f"{self.file}:{self.unit} {self.number}"


# ------------------------------------------------------------------------------------------
# records
@dataclass(frozen=True)
class PairRecord:
    prompt: tuple[Message, ...]  # system? + history + final user turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Turn:
    short_context: str
    instruction: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class LongPORecord:
    long_context: str
    turns: tuple[Turn, ...]
    system: str | None


@dataclass(frozen=True)
class SoLoPORecord:
    short_context: str
    long_context: str
    instruction: str
    chosen: str
    rejected: str
    system: str | None


Record = PairRecord | LongPORecord | SoLoPORecord


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _req_str(obj: dict, key: str, where: str = "", response: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise RowError(MISSING_FIELD, f"missing field '{where}{key}'")
    v = obj[key]
    if not isinstance(v, str):
        raise RowError(WRONG_TYPE, f"field '{where}{key}' must be a string, got {_json_type(v)}")
    if not v.strip():
        raise RowError(EMPTY_RESPONSE if response else EMPTY_FIELD, f"field '{where}{key}' is empty")
    return v


def _opt_str(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise RowError(WRONG_TYPE, f"field '{key}' must be a string, got {_json_type(v)}")
    return v


def _parse_messages(obj: dict, system: str | None) -> tuple[Message, ...]:
    msgs = obj["messages"]
    if not isinstance(msgs, (list, tuple)):
        raise RowError(WRONG_TYPE, f"field 'messages' must be an array, got {_json_type(msgs)}")
    if not msgs:
        raise RowError(BAD_MESSAGES, "field 'messages' is empty")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(WRONG_TYPE, f"'messages[{i}]' must be an object, got {_json_type(m)}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RowError(BAD_MESSAGES, f"'messages[{i}].role' must be system, user or assistant, got {role!r}")
        if role == "system":
            if i != 0:
                raise RowError(BAD_MESSAGES, f"'messages[{i}]' is a system message; only the first may be")
            if system is not None:
                raise RowError(BAD_MESSAGES, "both a 'system' field and a system message; keep one")
            content = m.get("content")
            if not isinstance(content, str):
                raise RowError(WRONG_TYPE, f"'messages[{i}].content' must be a string, got {_json_type(content)}")
        else:
            content = _req_str(m, "content", where=f"messages[{i}].")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise RowError(BAD_MESSAGES, f"'messages' must end with a user turn, it ends with {out[-1]['role']!r}")
    if system is not None:
        out.insert(0, {"role": "system", "content": system})
    return tuple(out)


def parse_record(kind: str, obj: Any) -> Record:
    """Validate one row of `kind`; raises RowError naming the field and the problem."""
    if not isinstance(obj, dict):
        raise RowError(NOT_AN_OBJECT, f"a row must be a JSON object, got {_json_type(obj)}")
    system = _opt_str(obj, "system")
    if kind == "pair":
        has_prompt = obj.get("prompt") is not None
        has_messages = obj.get("messages") is not None
        if has_prompt and has_messages:
            raise RowError(BAD_MESSAGES, "both 'prompt' and 'messages'; keep one")
        if has_messages:
            prompt = _parse_messages(obj, system)
        else:
            if not has_prompt:
                raise RowError(MISSING_FIELD, "missing field 'prompt' (or 'messages')")
            text = _req_str(obj, "prompt")
            prompt = (({"role": "system", "content": system},) if system is not None else ()) + (
                {"role": "user", "content": text},
            )
        return PairRecord(prompt, _req_str(obj, "chosen", response=True), _req_str(obj, "rejected", response=True))
    if kind == "longpo":
        long_context = _req_str(obj, "long_context")
        if obj.get("turns") is None:
            raise RowError(MISSING_FIELD, "missing field 'turns'")
        turns = obj["turns"]
        if not isinstance(turns, (list, tuple)):
            raise RowError(WRONG_TYPE, f"field 'turns' must be an array, got {_json_type(turns)}")
        if not turns:
            raise RowError(EMPTY_FIELD, "field 'turns' is empty")
        parsed = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise RowError(WRONG_TYPE, f"'turns[{i}]' must be an object, got {_json_type(t)}")
            w = f"turns[{i}]."
            parsed.append(
                Turn(
                    _req_str(t, "short_context", w),
                    _req_str(t, "instruction", w),
                    _req_str(t, "chosen", w, response=True),
                    _req_str(t, "rejected", w, response=True),
                )
            )
        return LongPORecord(long_context, tuple(parsed), system)
    if kind == "solopo":
        return SoLoPORecord(
            _req_str(obj, "short_context"),
            _req_str(obj, "long_context"),
            _req_str(obj, "instruction"),
            _req_str(obj, "chosen", response=True),
            _req_str(obj, "rejected", response=True),
            system,
        )
    raise ValueError(f"unknown dataset kind {kind!r}")


# ------------------------------------------------------------------------------------------
# conversations
@dataclass(frozen=True)
class Conversation:
    """Messages and the indices of the assistant messages whose tokens are scored."""

    messages: tuple[Message, ...]
    scored: tuple[int, ...]


def check_context_template(template: str) -> str:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise PreprocessError(f"context template {template!r} is not a valid format string: {exc}") from exc
    unknown = fields - {"context", "instruction"}
    if unknown or fields != {"context", "instruction"}:
        raise PreprocessError(
            f"context template {template!r} must use exactly {{context}} and {{instruction}} "
            f"(found {sorted(fields) or 'none'}); write literal braces as {{{{ and }}}}"
        )
    return template


def _user(content: str) -> Message:
    return {"role": "user", "content": content}


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def _single(system: str | None, user: str, answer: str) -> Conversation:
    head = ({"role": "system", "content": system},) if system is not None else ()
    return Conversation(head + (_user(user), _assistant(answer)), (len(head) + 1,))


def build_conversations(kind: str, record: Record, context_template: str) -> dict[str, list[Conversation]]:
    """The conversations of the kind's primary roles (the others alias them, see format.ALIASES)."""

    def ctx(context: str, instruction: str) -> str:
        return context_template.format_map({"context": context, "instruction": instruction})

    if kind == "pair":
        n = len(record.prompt)
        return {
            "chosen": [Conversation(record.prompt + (_assistant(record.chosen),), (n,))],
            "rejected": [Conversation(record.prompt + (_assistant(record.rejected),), (n,))],
        }
    if kind == "solopo":
        r = record
        return {
            "chosen": [_single(r.system, ctx(r.short_context, r.instruction), r.chosen)],
            "rejected": [_single(r.system, ctx(r.short_context, r.instruction), r.rejected)],
            "long_chosen": [_single(r.system, ctx(r.long_context, r.instruction), r.chosen)],
            "long_rejected": [_single(r.system, ctx(r.long_context, r.instruction), r.rejected)],
        }
    r = record
    head = ({"role": "system", "content": r.system},) if r.system is not None else ()

    def multi(side: str) -> Conversation:
        msgs = list(head)
        scored = []
        for i, t in enumerate(r.turns):
            msgs.append(_user(ctx(r.long_context, t.instruction) if i == 0 else t.instruction))
            scored.append(len(msgs))
            msgs.append(_assistant(getattr(t, side)))
        return Conversation(tuple(msgs), tuple(scored))

    return {
        "chosen": [multi("chosen")],
        "rejected": [multi("rejected")],
        "ref_chosen": [_single(r.system, ctx(t.short_context, t.instruction), t.chosen) for t in r.turns],
        "ref_rejected": [_single(r.system, ctx(t.short_context, t.instruction), t.rejected) for t in r.turns],
    }


# ------------------------------------------------------------------------------------------
# encoding
@dataclass
class EncodedRecord:
    segments: list[tuple[int, np.ndarray]]  # (Seg value, tokens in the dataset dtype)
    lengths: dict[str, list[int]]  # role -> length of each of its sequences
    stored_tokens: int
    role_tokens: int  # tokens over all role sequences (what a per-sequence pipeline produces)


class RecordEncoder:
    """Turns a validated record into typed segments (exactly the chat template's tokens)."""

    def __init__(
        self, tokenizer: ChatTokenizer, kind: str, context_template: str = DEFAULT_CONTEXT_TEMPLATE,
        verify: bool = False,
    ) -> None:
        self.tok = tokenizer
        self.kind = check_kind(kind)
        self.context_template = check_context_template(context_template)
        self.verify = verify
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._spans: dict[tuple[str, bool], list[int]] = {}
        self._pieces: dict[tuple[tuple[str, ...], bool], list[list[int]] | None] = {}

    # -- one conversation -----------------------------------------------------------------
    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self.tok.render(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception(...) and friends: this row only
            raise RowError(TEMPLATE_ERROR, f"the chat template refused the conversation: {exc}") from exc

    def _regions(self, conv: Conversation, text: str) -> list[tuple[int, int]]:
        regions = []
        for k in conv.scored:
            prefix = self._render(list(conv.messages[:k]), add_generation_prompt=True)
            if not text.startswith(prefix):
                raise TemplateError(
                    "the chat template does not render a conversation as (its prompt with the generation "
                    "prompt) + (the response): the scored tokens cannot be located. Pass --chat-template "
                    "FILE with a template whose earlier turns render the same with and without later ones."
                )
            content = conv.messages[k]["content"]
            start = len(prefix)
            if text.startswith(content, start):
                end = start + len(content)
            elif text.startswith(content.strip(), start):  # a template that trims content
                end = start + len(content.strip())
            else:
                raise TemplateError(
                    "the chat template changes the assistant message text (beyond trimming whitespace), "
                    "so the response tokens cannot be located; pass --chat-template FILE with a template "
                    "that inserts message content verbatim"
                )
            regions.append((start, end))
        return regions

    def _span(self, text: str, at_start: bool) -> list[int]:
        key = (text, at_start)
        ids = self._spans.get(key)
        if ids is None:
            ids = self._spans[key] = self.tok.encode_span(text, at_start)
        return ids

    def _split_pieces(self, pieces: tuple[str, ...], at_start: bool) -> list[list[int]] | None:
        """The unit's tokens cut where the pieces meet, or None when a cut is not a token
        boundary. A cut is a boundary when the tokens of the text up to it are a prefix of the
        tokens of the whole unit (the prompt tokenized alone, as at generation time, is exactly
        the start of the conversation's tokens); the parts are slices of the whole unit's
        tokens, so they always concatenate to it."""
        key = (pieces, at_start)
        if key not in self._pieces:
            whole = self._span("".join(pieces), at_start)
            cuts, done = [0], ""
            for piece in pieces[:-1]:
                done += piece
                head = self._span(done, at_start)
                if len(head) < cuts[-1] or whole[: len(head)] != head:
                    cuts = None
                    break
                cuts.append(len(head))
            self._pieces[key] = None if cuts is None else [
                whole[a:b] for a, b in zip(cuts, cuts[1:] + [len(whole)])
            ]
        return self._pieces[key]

    def encode_conversation(self, conv: Conversation) -> list[np.ndarray]:
        """Alternating runs [glue, response, glue, ..., response, glue] of the conversation's
        tokens; a response run = the response tokens + the end-of-turn token right after them."""
        text = self._render(list(conv.messages))
        regions = self._regions(conv, text)
        bounds = sorted({b for r in regions for b in r})
        ends = {e for _, e in regions}

        def inside(pos: int) -> bool:
            return any(s <= pos < e for s, e in regions)

        units = self.tok.split(text)
        # (token ids, is response, starts at a response's end)
        labelled: list[tuple[list[int], bool, bool]] = [(self.tok.leading_ids(units), False, False)]
        for u in units:
            if u.special_id is not None:
                labelled.append(([u.special_id], inside(u.start), u.start in ends))
                continue
            cuts = [b for b in bounds if u.start < b < u.end]
            if not cuts:
                ids = self._span(text[u.start : u.end], u.start == 0)
                labelled.append((ids, inside(u.start), u.start in ends))
                continue
            edges = [u.start, *cuts, u.end]
            pieces = tuple(text[a:b] for a, b in zip(edges, edges[1:]))
            parts = self._split_pieces(pieces, u.start == 0)
            if parts is None:
                near = text[max(u.start, cuts[0] - 12) : cuts[0] + 12]
                raise RowError(
                    TOKEN_BOUNDARY,
                    f"a response boundary falls inside a token (near {near!r}): the response's first or last "
                    "characters merge with the chat template's text; strip leading/trailing whitespace from responses",
                )
            labelled += [(ids, inside(a), a in ends) for ids, a in zip(parts, edges)]
        runs: list[list[int]] = [[]]
        current = False
        for ids, is_response, after_response in labelled:
            if after_response and not is_response and ids and ids[0] in self.tok.atomic_ids:
                # the end-of-turn token right after a response is scored with it
                runs[-1].append(ids[0])
                ids = ids[1:]
            if is_response != current:
                runs.append([])
                current = is_response
            runs[-1].extend(ids)
        if current:
            runs.append([])
        if len(runs) != 2 * len(conv.scored) + 1 or any(not runs[i] for i in range(1, len(runs), 2)):
            raise RowError(
                EMPTY_RESPONSE, "a response produced no tokens, or two responses touch (no template text between them)"
            )
        if self.verify:
            whole = self.tok.encode(text)
            if [t for r in runs for t in r] != whole:
                raise TokenizerError(
                    "split tokenization differs from whole-text tokenization for this conversation; "
                    "rerun with --tokenization whole and please report the tokenizer"
                )
        return [np.asarray(r, dtype=np.int64) for r in runs]

    # -- one record -----------------------------------------------------------------------
    def encode(self, record: Record) -> EncodedRecord:
        try:
            convs = build_conversations(self.kind, record, self.context_template)
            runs = {role: [self.encode_conversation(c) for c in convs[role]] for role in PRIMARY_ROLES[self.kind]}
        finally:
            self._spans.clear()
            self._pieces.clear()
        segments = layout(self.kind, runs)
        lengths: dict[str, list[int]] = {}
        for role in PRIMARY_ROLES[self.kind]:
            got = assemble(self.kind, segments, role)
            want = runs[role]
            ok = len(got) == len(want) and all(
                np.array_equal(g.tokens, np.concatenate(w))
                and np.array_equal(g.loss_mask, np.concatenate([np.full(len(x), i % 2 == 1) for i, x in enumerate(w)]))
                for g, w in zip(got, want)
            )
            if not ok:
                raise TemplateError(
                    f"the chat template renders the shared parts of the {role!r} sequence differently from the "
                    f"other sequences of the record (for example the text between turns depends on the earlier "
                    f"response), so the {self.kind!r} layout cannot store them once; pass --chat-template FILE "
                    "with a template whose turns render independently"
                )
            lengths[role] = [len(g) for g in got]
        for alias, target in ALIASES[self.kind].items():
            lengths[alias] = list(lengths[target])
        stored = [(int(s.type), s.tokens.astype(self.dtype)) for s in segments]
        return EncodedRecord(
            segments=stored,
            lengths={r: lengths[r] for r in ROLES[self.kind]},
            stored_tokens=int(sum(len(t) for _, t in stored)),
            role_tokens=int(sum(sum(v) for v in lengths.values())),
        )


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


# ------------------------------------------------------------------------------------------
# the per-row work (runs in the workers)
@dataclass
class Kept:
    encoded: EncodedRecord


@dataclass(frozen=True)
class _Job:
    kind: str
    context_template: str
    verify: bool
    max_length: int | None
    displays: tuple[str, ...]
    unit: tuple[str, ...]  # per file: "line" | "row"


def process_rows(encoder: RecordEncoder, job: _Job, rows: list[RawRow]) -> list[Kept | Drop]:
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
            enc = encoder.encode(parse_record(job.kind, obj))
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


_WORKER: tuple[RecordEncoder, _Job] | None = None
_WORKER_BUILD: tuple[TokenizerSpec, _Job] | None = None


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM when the parent dies (even by SIGKILL): no orphans."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_init() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _die_with_parent()
    global _WORKER
    if _WORKER is None and _WORKER_BUILD is not None:  # spawn start method: build here
        spec, job = _WORKER_BUILD
        _WORKER = (RecordEncoder(spec.build(), job.kind, job.context_template, job.verify), job)


def _worker_task(task: tuple[int, int, list[RawRow]]) -> tuple[int, int, list[Kept | Drop]]:
    chunk_id, part, rows = task
    encoder, job = _WORKER
    return chunk_id, part, process_rows(encoder, job, rows)


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
    write_json_atomic(run_file, key)


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
    write_json_atomic(_meta_path(work, chunk_id), meta)
    return meta


def _ordered(pool, tasks: Iterator, window: int) -> Iterator:
    """Like pool.imap, but with at most `window` tasks in flight (imap reads its input eagerly)."""
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(_worker_task, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def run_preprocess(cfg: PreprocessConfig, log: Callable[[str], None] | None = None) -> PreprocessResult:
    """Preprocess `cfg.inputs` into the dataset at `cfg.output` (see the module docstring)."""
    global _WORKER, _WORKER_BUILD
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
    job = _Job(
        cfg.kind,
        cfg.context_template,
        cfg.verify,
        cfg.max_length,
        tuple(f.display for f in files),
        tuple("line" if f.fmt == "jsonl" else "row" for f in files),
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
            _WORKER, _WORKER_BUILD = (encoder, job), (cfg.tokenizer, job)
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            pool = ctx.Pool(cfg.workers, initializer=_worker_init)
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
        _WORKER = _WORKER_BUILD = None

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
        os.remove(manifest_path(prefix))
    os.replace(tmp_bin, bin_path(prefix))
    os.replace(tmp_idx, idx_path(prefix))
    report = f"{prefix}.dropped.jsonl"
    if drops:
        with open(report + ".tmp", "w", encoding="utf-8") as f:
            for d in drops:
                f.write(json.dumps({"location": d.location, **asdict(d)}, ensure_ascii=False) + "\n")
        os.replace(report + ".tmp", report)
    elif os.path.exists(report):
        os.remove(report)
    write_json_atomic(manifest_path(prefix), manifest)
    shutil.rmtree(work)
    result.written = True
    result.manifest = manifest
    result.elapsed_s = time.monotonic() - t0
    return result
