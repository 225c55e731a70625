"""Resumable JSONL output and run statistics for the data builders.

Results are appended one JSON line at a time and flushed, so a crash or a kill loses at most the
item in flight. Beside the output, `<output>.done.jsonl` records every item that has been *settled*
(written, or deliberately produced nothing: all its answers filtered, too short, ...). On restart,
items whose id appears in either file are skipped; items that failed (a request error) are not
settled and are tried again. A torn last line (the process died mid-write) is cut off first.
The run summary is written to `<output>.summary.json` through a temporary file and a rename.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from megatron_longpo.io import atomic_write_json


def _read_jsonl_repairing(path: Path) -> tuple[list[dict], int]:
    """All complete JSON lines of `path`; a torn last line is truncated away. Returns (rows, torn)."""
    if not path.exists():
        return [], 0
    rows: list[dict] = []
    good_end = 0
    torn = 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        line = data[pos:] if nl < 0 else data[pos:nl]
        end = len(data) if nl < 0 else nl + 1
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if nl < 0:  # only a last, unterminated line can be torn by a crash
                    torn = 1
                    break
                lineno = data.count(b"\n", 0, pos) + 1
                raise ValueError(f"{path}: line {lineno} is not valid JSON; fix or remove it before resuming") from None
            if nl < 0:  # complete JSON without its newline: keep it, add the newline
                with open(path, "ab") as fa:
                    fa.write(b"\n")
                end += 1
        good_end = end
        pos = end
    if torn:
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return rows, torn


class ResumableJsonl:
    """Append-only JSONL output keyed by a stable item id, with a `.done.jsonl` ledger."""

    def __init__(self, path: str | os.PathLike, id_of: Callable[[dict], str | None], fsync: bool = False) -> None:
        self.path = Path(path)
        self.ledger_path = self.path.with_name(self.path.name + ".done.jsonl")
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows, torn_out = _read_jsonl_repairing(self.path)
        ledger, torn_ledger = _read_jsonl_repairing(self.ledger_path)
        self.torn_lines = torn_out + torn_ledger
        self.written_ids: set[str] = set()
        self.duplicate_lines = 0
        for row in rows:
            key = id_of(row)
            if key is None:
                raise ValueError(f"{self.path}: a line has no item id (meta.id); this file was not written "
                                 "by this tool; pass a new output path")
            if key in self.written_ids:
                self.duplicate_lines += 1
            self.written_ids.add(key)
        self.settled: dict[str, str] = {str(r["id"]): str(r.get("status", "")) for r in ledger if "id" in r}
        self._out = open(self.path, "a", encoding="utf-8")
        self._ledger = open(self.ledger_path, "a", encoding="utf-8")

    @property
    def done_ids(self) -> set[str]:
        return self.written_ids | set(self.settled)

    def is_done(self, item_id: str) -> bool:
        return item_id in self.written_ids or item_id in self.settled

    def _append(self, f, obj: dict) -> None:
        f.write(json.dumps(obj, ensure_ascii=False) + "\n")
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())

    def write(self, item_id: str, record: dict) -> None:
        """Append a result, then mark its item settled."""
        self._append(self._out, record)
        self.written_ids.add(item_id)
        self.settle(item_id, "written")

    def settle(self, item_id: str, status: str) -> None:
        """Mark an item as finished without output (so a restart does not redo it)."""
        self._append(self._ledger, {"id": item_id, "status": status})
        self.settled[item_id] = status

    def close(self) -> None:
        self._out.close()
        self._ledger.close()

    def __enter__(self) -> "ResumableJsonl":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class RunStats:
    """Counters for one run: `counts` (what was seen/produced), `dropped` (by reason), `failures`."""

    counts: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    failure_examples: list[str] = field(default_factory=list)
    max_examples: int = 20

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def drop(self, reason: str, n: int = 1) -> None:
        self.dropped[reason] += n

    def fail(self, kind: str, item_id: str, error: BaseException | str) -> None:
        self.failures[kind] += 1
        if len(self.failure_examples) < self.max_examples:
            self.failure_examples.append(f"{item_id}: {kind}: {error}")

    def to_dict(self) -> dict:
        return {
            "counts": dict(self.counts),
            "dropped": dict(self.dropped),
            "failures": dict(self.failures),
            "failure_examples": list(self.failure_examples),
        }

    def render(self, title: str) -> str:
        """The summary as a plain-text table (rich renders it when a terminal is attached)."""
        rows: list[tuple[str, str, Any]] = [("", k, v) for k, v in self.counts.items()]
        rows += [("dropped", k, v) for k, v in sorted(self.dropped.items())]
        rows += [("failed", k, v) for k, v in sorted(self.failures.items())]
        width = max([len(f"{g} {k}".strip()) for g, k, _ in rows] + [10])
        lines = [title, "-" * (width + 12)]
        for group, key, value in rows:
            name = f"{group}: {key}" if group else key
            lines.append(f"{name:<{width + 2}}{value:>10}")
        if self.failure_examples:
            lines.append("first failures:")
            lines += [f"  {e}" for e in self.failure_examples]
        return "\n".join(lines)


def iter_jsonl(path: str | os.PathLike) -> Iterable[tuple[int, dict]]:
    """(line number, parsed line) for every non-blank line of a JSONL file; ValueError naming the line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


class TooManyFailures(RuntimeError):
    """Raised after `max_consecutive_failures` items in a row failed (server down, bad model)."""


class FailureStreak:
    """Items (documents, records) that failed in a row; `check` raises TooManyFailures once
    `limit` is reached (0: never)."""

    def __init__(self, limit: int, items: str) -> None:
        self.limit, self.items, self.count = limit, items, 0

    def record(self, failed: bool) -> None:
        self.count = self.count + 1 if failed else 0

    def check(self, stats: "RunStats") -> None:
        if self.count >= self.limit > 0:
            raise TooManyFailures(
                f"{self.count} {self.items} in a row failed (first failures: {stats.failure_examples[:2]}); "
                f"stopping. Fix the cause and rerun the same command: finished {self.items} are kept and skipped"
            )


def meta_id(row: dict) -> str | None:
    """The stable id an output line carries under "meta" (what resumption skips by)."""
    return (row.get("meta") or {}).get("id")


def finish_run(tool: str, title: str, output: str, stats: "RunStats", backend, status: int, retry_hint: str | None) -> int:
    """End of a builder run: summary JSON beside the output, the printed summary, HTTP statistics,
    and exit status 3 when some items failed (`retry_hint` says so; a rerun retries them)."""
    http = getattr(backend, "stats", None)
    summary = {"tool": tool, "output": output, **stats.to_dict(), "http": http.to_dict() if http else None}
    atomic_write_json(output + ".summary.json", summary)
    print(stats.render(title))
    secs, docs = stats.counts.get("seconds"), stats.counts.get("documents_written") or stats.counts.get("pairs_written")
    if secs and docs:
        print(f"rate: {docs / secs:.2f} records/s ({docs} in {secs:.0f} s)")
    prefill = getattr(backend, "decode_stats", None)
    if prefill is not None and prefill.prompt_tokens:
        print(f"prefill: {prefill.prompts} prompts, {prefill.prompt_tokens:,} prompt tokens, "
              f"{prefill.prefilled_tokens:,} run ({1 - prefill.prefilled_tokens / prefill.prompt_tokens:.0%} "
              f"from shared prefixes)")
    if http:
        print(f"http: {http.to_dict()}")
    if status == 0 and retry_hint:
        print(retry_hint, file=sys.stderr)
        status = 3
    return status
