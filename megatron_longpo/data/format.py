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

The example itself (segments, roles, `Sample`) is data/schema.py's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from megatron_longpo.data.schema import REF_ROLES, ROLES, FormatError, Sample, Seg, Segment
from megatron_longpo.data.schema import Sequence  # noqa: F401 (checks/numerics.py, data/prefix_sharing.py import it from here)

FORMAT_NAME = "megatron-longpo-pairs"
FORMAT_VERSION = 1


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
        idx = self._ds.index
        if len(idx.sequence_lengths):
            need = int(idx.sequence_pointers[-1]) + int(idx.sequence_lengths[-1]) * idx.dtype_size
            have = os.path.getsize(bin_path(self.prefix))
            if need > have:
                raise FormatError(
                    f"{bin_path(self.prefix)} is {have} bytes but {idx_path(self.prefix)} points to {need}: the .bin is "
                    f"truncated; rerun tools/preprocess_pairs.py --output {self.prefix}"
                )
        #: token ids must be below this (the model's embedding rows); checked on every sample read
        self.vocab_limit: int | None = None
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
        if self.vocab_limit is not None:
            top = max((int(a.max()) for a in arrays if len(a)), default=0)
            if top >= self.vocab_limit:
                raise FormatError(
                    f"sample {i} of the dataset {self.prefix} holds token id {top}, beyond the model's {self.vocab_limit} "
                    f"token embeddings: the .bin is damaged or was written for another model; check it with "
                    f"data.verify_hash=true, or rerun tools/preprocess_pairs.py --output {self.prefix}"
                )
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
