"""The on-disk format of a preprocessed preference dataset, and its reader.

A dataset at PREFIX is three files:

* `PREFIX.bin` / `PREFIX.idx`: a Megatron `IndexedDataset` written with `multimodal=True`.
  One document per example; its items are typed token segments, the item's one-byte mode is
  the `Seg` type. Each distinct piece is stored once (the long-context prompt of a LongPO
  example is stored once, not in the chosen and the rejected sequence); `Sample` assembles the
  role sequences on read.
* `PREFIX.json`: a small versioned manifest (kind, tokenizer and its hash, templates, counts,
  length percentiles per role, sha256 of .bin and .idx = the dataset hash that the reference
  log-prob sidecar is tied to).

Segment layouts (one document; `*` = repeated, n = number of turns):

    pair    PROMPT CHOSEN REJECTED TAIL
    longpo  LONG_PROMPT CHOSEN REJECTED (TURN CHOSEN REJECTED)* TAIL SHORT_PROMPT{n}
    solopo  SHORT_PROMPT LONG_PROMPT CHOSEN REJECTED TAIL

A prompt segment ends right after the assistant header (the generation prompt); a response
segment holds the response tokens plus the chat template's end-of-turn token after them; TURN
holds what lies between one response's end-of-turn token and the next response (the next user
turn and assistant header); TAIL what follows the last end-of-turn token (e.g. ChatML's "\\n").
Segment boundaries are token boundaries of the whole-conversation tokenization (preprocessing
checks this), so concatenating segments gives exactly the chat template's tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Iterable

import numpy as np

from megatron_longpo.roles import (
    CHOSEN, LONG_CHOSEN, LONG_REJECTED, PAIR, REF_CHOSEN, REF_REJECTED, REJECTED, is_reference, ref, solo_roles,
)

FORMAT_NAME = "megatron-longpo-pairs"
FORMAT_VERSION = 1
KINDS = ("pair", "longpo", "solopo")


class Seg(IntEnum):
    """Segment type = the item's mode byte in the IndexedDataset."""

    PROMPT = 1
    LONG_PROMPT = 2
    SHORT_PROMPT = 3
    CHOSEN = 4
    REJECTED = 5
    TURN = 6
    TAIL = 7


RESPONSE_SEGMENTS = frozenset({Seg.CHOSEN, Seg.REJECTED})

ROLES: dict[str, tuple[str, ...]] = {
    "pair": PAIR + (REF_CHOSEN, REF_REJECTED),
    "longpo": PAIR + (REF_CHOSEN, REF_REJECTED),
    "solopo": solo_roles(True) + solo_roles(True, reference=True),
}
REF_ROLES: dict[str, tuple[str, ...]] = {k: tuple(r for r in v if is_reference(r)) for k, v in ROLES.items()}

# The roles whose sequences are computed independently at preprocessing time (the others are
# the same sequences under another name, e.g. pair's ref_chosen = chosen).
PRIMARY_ROLES: dict[str, tuple[str, ...]] = {
    "pair": PAIR,
    "longpo": PAIR + (REF_CHOSEN, REF_REJECTED),
    "solopo": solo_roles(True),
}
ALIASES: dict[str, dict[str, str]] = {
    "pair": {REF_CHOSEN: CHOSEN, REF_REJECTED: REJECTED},
    "longpo": {},
    "solopo": {ref(r): r for r in solo_roles(True)},
}


class FormatError(ValueError):
    """A dataset file is missing, inconsistent or of another version (the message names the fix)."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def check_role(kind: str, role: str) -> None:
    if role not in ROLES[check_kind(kind)]:
        raise ValueError(f"a {kind!r} sample has no role {role!r}; its roles are {', '.join(ROLES[kind])}")


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sequence:
    """One token sequence; `loss_mask[t]` is True iff token t is a scored response token
    (predicted from position t-1): the response tokens and the end-of-turn token after them."""

    tokens: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class Segment:
    type: Seg
    tokens: np.ndarray


def _cat(segments: Iterable[Segment]) -> Sequence:
    segs = list(segments)
    tokens = np.concatenate([s.tokens for s in segs]).astype(np.int64, copy=False) if segs else np.zeros(0, np.int64)
    mask = np.concatenate([np.full(len(s.tokens), s.type in RESPONSE_SEGMENTS, dtype=bool) for s in segs])
    return Sequence(tokens, mask)


@dataclass(frozen=True)
class _Parsed:
    """Named view of one document's segments."""

    long_prompt: Segment | None
    short_prompts: list[Segment]
    prompt: Segment | None
    chosen: list[Segment]
    rejected: list[Segment]
    turns: list[Segment]  # TURN segments, turns[k] precedes response k+1
    tail: Segment


def _parse(kind: str, segments: list[Segment], where: str) -> _Parsed:
    types = [s.type for s in segments]

    def bad(expected: str) -> FormatError:
        names = " ".join(t.name for t in types)
        return FormatError(f"{where}: segments [{names}] do not follow the {kind!r} layout {expected}")

    if kind == "pair":
        if types != [Seg.PROMPT, Seg.CHOSEN, Seg.REJECTED, Seg.TAIL]:
            raise bad("PROMPT CHOSEN REJECTED TAIL")
        return _Parsed(None, [], segments[0], [segments[1]], [segments[2]], [], segments[3])
    if kind == "solopo":
        if types != [Seg.SHORT_PROMPT, Seg.LONG_PROMPT, Seg.CHOSEN, Seg.REJECTED, Seg.TAIL]:
            raise bad("SHORT_PROMPT LONG_PROMPT CHOSEN REJECTED TAIL")
        return _Parsed(segments[1], [segments[0]], None, [segments[2]], [segments[3]], [], segments[4])
    if kind == "longpo":
        expected = "LONG_PROMPT CHOSEN REJECTED (TURN CHOSEN REJECTED)* TAIL SHORT_PROMPT{n}"
        if len(types) < 5 or types[0] != Seg.LONG_PROMPT:
            raise bad(expected)
        chosen, rejected, turns = [], [], []
        i = 1
        while True:
            if types[i : i + 2] != [Seg.CHOSEN, Seg.REJECTED]:
                raise bad(expected)
            chosen.append(segments[i])
            rejected.append(segments[i + 1])
            i += 2
            if i < len(types) and types[i] == Seg.TURN:
                turns.append(segments[i])
                i += 1
                continue
            break
        if i >= len(types) or types[i] != Seg.TAIL:
            raise bad(expected)
        tail = segments[i]
        shorts = segments[i + 1 :]
        if len(shorts) != len(chosen) or any(s.type != Seg.SHORT_PROMPT for s in shorts):
            raise bad(expected)
        return _Parsed(segments[0], list(shorts), None, chosen, rejected, turns, tail)
    raise ValueError(f"unknown dataset kind {kind!r}")


def assemble(kind: str, segments: list[Segment], role: str, where: str = "sample") -> list[Sequence]:
    """The sequences of `role` assembled from one document's segments."""
    check_role(kind, role)
    p = _parse(kind, segments, where)
    role = ALIASES[kind].get(role, role)
    if kind == "pair":
        side = p.chosen if role == CHOSEN else p.rejected
        return [_cat([p.prompt, side[0], p.tail])]
    if kind == "solopo":
        prompt = p.long_prompt if role in (LONG_CHOSEN, LONG_REJECTED) else p.short_prompts[0]
        side = p.chosen if role in (CHOSEN, LONG_CHOSEN) else p.rejected
        return [_cat([prompt, side[0], p.tail])]
    # longpo
    if role in PAIR:
        side = p.chosen if role == CHOSEN else p.rejected
        parts: list[Segment] = [p.long_prompt, side[0]]
        for turn, resp in zip(p.turns, side[1:]):
            parts += [turn, resp]
        parts.append(p.tail)
        return [_cat(parts)]
    side = p.chosen if role == REF_CHOSEN else p.rejected
    return [_cat([short, resp, p.tail]) for short, resp in zip(p.short_prompts, side)]


@dataclass(frozen=True)
class Sample:
    """One example: its typed segments, and the role sequences assembled from them."""

    index: int
    kind: str
    segments: tuple[Segment, ...]

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[self.kind]

    def sequences(self, role: str) -> list[Sequence]:
        """The sequences of `role` (one, or one per turn for LongPO's ref roles)."""
        return assemble(self.kind, list(self.segments), role, where=f"sample {self.index}")

    @property
    def num_turns(self) -> int:
        return sum(1 for s in self.segments if s.type == Seg.CHOSEN)

    @property
    def stored_tokens(self) -> int:
        return int(sum(len(s.tokens) for s in self.segments))


def layout(kind: str, runs: dict[str, list[list[np.ndarray]]]) -> list[Segment]:
    """Segments for one document from the role sequences computed at preprocessing time.

    `runs[role][j]` = sequence j of `role` as alternating runs [glue, response, glue, ...,
    response, glue] (response runs at odd positions). Shared pieces are taken once; the caller
    checks with `assemble` that every role comes back exactly.
    """
    check_kind(kind)
    c = runs[CHOSEN][0]
    r = runs[REJECTED][0]
    if kind == "pair":
        return [Segment(Seg.PROMPT, c[0]), Segment(Seg.CHOSEN, c[1]), Segment(Seg.REJECTED, r[1]), Segment(Seg.TAIL, c[2])]
    if kind == "solopo":
        lc = runs[LONG_CHOSEN][0]
        return [
            Segment(Seg.SHORT_PROMPT, c[0]),
            Segment(Seg.LONG_PROMPT, lc[0]),
            Segment(Seg.CHOSEN, c[1]),
            Segment(Seg.REJECTED, r[1]),
            Segment(Seg.TAIL, c[2]),
        ]
    segs = [Segment(Seg.LONG_PROMPT, c[0])]
    n = (len(c) - 1) // 2
    for k in range(n):
        if k > 0:
            segs.append(Segment(Seg.TURN, c[2 * k]))
        segs += [Segment(Seg.CHOSEN, c[2 * k + 1]), Segment(Seg.REJECTED, r[2 * k + 1])]
    segs.append(Segment(Seg.TAIL, c[-1]))
    segs += [Segment(Seg.SHORT_PROMPT, short[0]) for short in runs[REF_CHOSEN]]
    return segs


# ------------------------------------------------------------------------------------------
def token_dtype(vocab_size: int) -> type:
    """uint16 below 65500 ids (Megatron's convention), int32 above."""
    return np.uint16 if vocab_size < 65500 else np.int32


def bin_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.bin"


def idx_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.idx"


def manifest_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.json"


def sha256_file(path: str | os.PathLike, block: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def dataset_hash_of(bin_sha: str, idx_sha: str) -> str:
    """The dataset hash: sha256 over the .idx and .bin digests (what the sidecar is tied to)."""
    return "sha256:" + hashlib.sha256(f"idx:{idx_sha}\nbin:{bin_sha}\n".encode()).hexdigest()


class ShardWriter:
    """Writes documents (lists of segments) to an IndexedDataset at `prefix` (to temporary
    names, renamed by `close`)."""

    def __init__(self, prefix: str | os.PathLike, dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = str(prefix)
        self.dtype = dtype
        self._tmp_bin = bin_path(self.prefix) + ".tmp"
        self._tmp_idx = idx_path(self.prefix) + ".tmp"
        self._builder = IndexedDatasetBuilder(self._tmp_bin, dtype=dtype, multimodal=True)
        self.documents = 0

    def add(self, segments: list[Segment]) -> None:
        if not segments:
            raise ValueError("a document needs at least one segment")
        info = np.iinfo(self.dtype)
        tokens = np.concatenate([np.asarray(s.tokens) for s in segments])
        if tokens.size and (tokens.min() < info.min or tokens.max() > info.max):
            raise ValueError(f"token ids outside {self.dtype.__name__}: the vocabulary does not fit the dataset dtype")
        self._builder.add_document(
            tokens.astype(self.dtype, copy=False), [len(s.tokens) for s in segments], [int(s.type) for s in segments]
        )
        self.documents += 1

    def close(self) -> None:
        self._builder.finalize(self._tmp_idx)
        os.replace(self._tmp_bin, bin_path(self.prefix))
        os.replace(self._tmp_idx, idx_path(self.prefix))


def merge_shards(shard_prefixes: list[str], out_prefix: str, dtype: type) -> None:
    """Concatenate shard datasets in order into `out_prefix.{bin,idx}.tmp` (not renamed).

    Document by document through `add_document`: `IndexedDatasetBuilder.add_index` runs
    `gc.collect()` per shard, half a second each in a process that holds torch."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(bin_path(out_prefix) + ".tmp", dtype=dtype, multimodal=True)
    for p in shard_prefixes:
        shard = IndexedDataset(p, multimodal=True)
        docs = shard.index.document_indices
        for d in range(len(docs) - 1):
            arrays, modes = shard[int(docs[d]) : int(docs[d + 1])]
            builder.add_document(np.concatenate(arrays), [len(a) for a in arrays], modes.tolist())
        del shard
    builder.finalize(idx_path(out_prefix) + ".tmp")


def length_stats(lengths: Iterable[int]) -> dict:
    arr = np.asarray(list(lengths), dtype=np.int64)
    if arr.size == 0:
        return {"count": 0}
    p = np.percentile(arr, [50, 90, 95, 99])
    return {
        "count": int(arr.size),
        "min": int(arr.min()),
        "p50": float(p[0]),
        "p90": float(p[1]),
        "p95": float(p[2]),
        "p99": float(p[3]),
        "max": int(arr.max()),
        "mean": round(float(arr.mean()), 3),
        "total": int(arr.sum()),
    }


def read_manifest(prefix: str | os.PathLike) -> dict:
    """The manifest of the dataset at `prefix`, checked for format and version."""
    path = manifest_path(prefix)
    if not os.path.isfile(path):
        raise FormatError(
            f"no dataset manifest at {path}; write the dataset with tools/preprocess_pairs.py --output {prefix}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path} is not valid JSON ({exc}); rerun tools/preprocess_pairs.py") from exc
    if m.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not a {FORMAT_NAME} manifest (format={m.get('format')!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise FormatError(
            f"{path} has format version {m.get('format_version')}, this code reads version {FORMAT_VERSION}; "
            "rerun tools/preprocess_pairs.py with this version"
        )
    return m


def longest_sequence(manifest: dict, roles: Iterable[str]) -> int:
    """The longest sequence of these roles in the dataset, from the manifest's length statistics."""
    lengths = manifest.get("lengths", {})
    return max((int(lengths[r]["max"]) for r in roles if lengths.get(r, {}).get("count")), default=0)


# ------------------------------------------------------------------------------------------
class PairDataset:
    """Reader of a preprocessed dataset: `len(ds)`, `ds.sample(i) -> Sample`, `ds.manifest`.

    The files are checked against the manifest on open (document count and file sizes);
    `verify()` recomputes the sha256 hashes.
    """

    def __init__(self, prefix: str | os.PathLike, verify_hash: bool = False) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix = str(prefix)
        self.manifest = read_manifest(self.prefix)
        files = self.manifest["files"]
        for path, key in ((bin_path(self.prefix), "bin_bytes"), (idx_path(self.prefix), "idx_bytes")):
            if not os.path.isfile(path):
                raise FormatError(f"{path} is missing; rerun tools/preprocess_pairs.py --output {self.prefix}")
            if os.path.getsize(path) != files[key]:
                raise FormatError(
                    f"{path} is {os.path.getsize(path)} bytes but the manifest says {files[key]}: the files "
                    f"do not belong together; rerun tools/preprocess_pairs.py --output {self.prefix}"
                )
        self._ds = IndexedDataset(self.prefix, multimodal=True)
        n_docs = len(self._ds.index.document_indices) - 1
        if n_docs != self.manifest["num_samples"]:
            raise FormatError(
                f"{idx_path(self.prefix)} holds {n_docs} examples, the manifest says {self.manifest['num_samples']}; "
                f"rerun tools/preprocess_pairs.py --output {self.prefix}"
            )
        self._doc = self._ds.index.document_indices
        if verify_hash:
            self.verify()

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memory maps
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[self.kind]

    @property
    def ref_roles(self) -> tuple[str, ...]:
        return REF_ROLES[self.kind]

    @property
    def dataset_hash(self) -> str:
        return self.manifest["dataset_hash"]

    def __len__(self) -> int:
        return int(self.manifest["num_samples"])

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i)

    def sample(self, i: int) -> Sample:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for a dataset of {n} examples")
        i = int(i) % n
        start, end = int(self._doc[i]), int(self._doc[i + 1])
        # slicing reads the modes from ds.index.sequence_modes (ds.sequence_modes is broken in 0.19.2)
        arrays, modes = self._ds[start:end]
        segments = tuple(Segment(Seg(int(m)), a) for a, m in zip(arrays, modes))
        return Sample(index=i, kind=self.kind, segments=segments)

    def verify(self) -> None:
        """Recompute the sha256 of .bin and .idx and compare with the manifest."""
        files = self.manifest["files"]
        got_bin, got_idx = sha256_file(bin_path(self.prefix)), sha256_file(idx_path(self.prefix))
        if got_bin != files["bin_sha256"] or got_idx != files["idx_sha256"]:
            raise FormatError(
                f"{self.prefix}.bin/.idx do not match the hashes in {manifest_path(self.prefix)}; the files were "
                f"changed after writing: rerun tools/preprocess_pairs.py --output {self.prefix}"
            )


def file_info(bin_file: str | os.PathLike, idx_file: str | os.PathLike, prefix: str | os.PathLike) -> dict:
    """Sizes and sha256 of the dataset files (possibly still under temporary names) and the
    dataset hash, for the manifest of the dataset at `prefix`."""
    bin_sha, idx_sha = sha256_file(bin_file), sha256_file(idx_file)
    return {
        "files": {
            "bin": Path(bin_path(prefix)).name,
            "idx": Path(idx_path(prefix)).name,
            "bin_bytes": os.path.getsize(bin_file),
            "idx_bytes": os.path.getsize(idx_file),
            "bin_sha256": bin_sha,
            "idx_sha256": idx_sha,
        },
        "dataset_hash": dataset_hash_of(bin_sha, idx_sha),
    }
