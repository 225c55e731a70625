"""The reference log-prob sidecar: frozen reference statistics, computed once, tied to a dataset.

`PREFIX.ref.safetensors` holds, for each reference role (e.g. ref_chosen, ref_rejected) and
each sample i (row i = sample i of the dataset at PREFIX):

    logp_sum/<role>    float64 [N]  sum over the role's sequences of the reference log-probs of
                                    the scored tokens (loss_mask); LongPO: summed over turns
    num_tokens/<role>  int64   [N]  the number of scored tokens summed the same way
    filled/<role>      uint8   [N]  1 where the row was written

and, as string metadata, the format and version, the dataset hash (from PREFIX.json), the
number of samples, the roles, the reference model's name and how the numbers were computed.

Several writers (one per DP rank) may each write the rows they computed to a part file
(`save_part`); `merge_parts` combines them and refuses unless every row of every role is filled
exactly once (or twice with matching values). The reader refuses a sidecar whose dataset hash
is not the manifest's, names missing roles, and checks that every row is filled.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence as Seq

import numpy as np

from megatron_longpo import __version__
from megatron_longpo.data.format import read_manifest
from megatron_longpo.data.schema import REF_ROLES
from megatron_longpo.io import atomic_path

SIDECAR_FORMAT = "megatron-longpo-ref-logps"
SIDECAR_VERSION = 1
RECOMPUTE = "recompute it with tools/precompute_ref_logps.py"


class RefLogpError(ValueError):
    """The sidecar is missing, incomplete, or belongs to another dataset (the message names the fix)."""


def sidecar_path(prefix: str | os.PathLike) -> str:
    return f"{prefix}.ref.safetensors"


def part_path(prefix: str | os.PathLike, rank: int) -> str:
    return f"{prefix}.ref.part-{rank:05d}.safetensors"


@dataclass
class RefLogps:
    """A complete, checked sidecar."""

    dataset_hash: str
    reference_model: str
    roles: tuple[str, ...]
    computation: dict
    logp_sum: dict[str, np.ndarray]
    num_tokens: dict[str, np.ndarray]

    @property
    def num_samples(self) -> int:
        return int(next(iter(self.logp_sum.values())).shape[0])

    def _role(self, role: str) -> None:
        if role not in self.logp_sum:
            raise KeyError(f"the sidecar has no role {role!r}; it has {', '.join(self.roles)}")

    def get(self, index: int, role: str) -> tuple[float, int]:
        self._role(role)
        return float(self.logp_sum[role][index]), int(self.num_tokens[role][index])

    def batch(self, indices: Seq[int], role: str) -> tuple[np.ndarray, np.ndarray]:
        self._role(role)
        idx = np.asarray(indices, dtype=np.int64)
        return self.logp_sum[role][idx], self.num_tokens[role][idx]


@dataclass
class RefLogpWriter:
    """Collects rows (from any order, any number of calls) and writes the sidecar atomically."""

    num_samples: int
    roles: tuple[str, ...]
    dataset_hash: str
    reference_model: str
    computation: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {self.num_samples}")
        if not self.roles:
            raise ValueError("a sidecar needs at least one role")
        self.roles = tuple(self.roles)
        n = self.num_samples
        self._logp = {r: np.zeros(n, np.float64) for r in self.roles}
        self._count = {r: np.zeros(n, np.int64) for r in self.roles}
        self._filled = {r: np.zeros(n, np.uint8) for r in self.roles}

    @classmethod
    def for_dataset(
        cls, prefix: str | os.PathLike, reference_model: str, roles: Seq[str] | None = None,
        computation: dict | None = None,
    ) -> "RefLogpWriter":
        """A writer for the dataset at `prefix` (its size, hash and, by default, its ref roles)."""
        m = read_manifest(prefix)
        roles = tuple(roles) if roles is not None else REF_ROLES[m["kind"]]
        unknown = [r for r in roles if r not in m["roles"]]
        if unknown:
            raise RefLogpError(f"the {m['kind']!r} dataset has no roles {unknown}; its roles are {m['roles']}")
        return cls(m["num_samples"], roles, m["dataset_hash"], reference_model, dict(computation or {}))

    def add(self, indices: Seq[int], role: str, logp_sum: Seq[float], num_tokens: Seq[int],
            tolerance: float = 1e-4) -> None:
        """Rows `indices` of `role`. A row given again must match (same count, log-prob within
        `tolerance` relative): that happens when DP ranks pad their last batch."""
        if role not in self._logp:
            raise RefLogpError(f"role {role!r} is not in this sidecar's roles {self.roles}")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        lp = np.asarray(logp_sum, dtype=np.float64).reshape(-1)
        cnt = np.asarray(num_tokens, dtype=np.int64).reshape(-1)
        if not len(idx) == len(lp) == len(cnt):
            raise ValueError(f"add(): {len(idx)} indices, {len(lp)} log-prob sums, {len(cnt)} token counts")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise IndexError(f"row indices must be in [0, {self.num_samples}), got {idx.min()}..{idx.max()}")
        if not np.all(np.isfinite(lp)):
            bad = idx[~np.isfinite(lp)][:5].tolist()
            raise ValueError(f"non-finite log-prob sums for role {role!r} at rows {bad}")
        _put(self._logp[role], self._count[role], self._filled[role], idx, lp, cnt, role, tolerance)

    def missing(self) -> dict[str, np.ndarray]:
        """Rows not written yet, per role."""
        return {r: np.flatnonzero(f == 0) for r, f in self._filled.items() if not f.all()}

    def save(self, path: str | os.PathLike) -> str:
        """Write the complete sidecar; refuses while rows are missing."""
        _check_complete(self.missing(), str(path), "add the missing rows before save()")
        return self._write(path)

    def save_part(self, path: str | os.PathLike) -> str:
        """Write this writer's rows (a part; combine the parts with merge_parts)."""
        return self._write(path)

    def _write(self, path: str | os.PathLike) -> str:
        tensors: dict[str, np.ndarray] = {}
        for r in self.roles:
            tensors[f"logp_sum/{r}"] = self._logp[r]
            tensors[f"num_tokens/{r}"] = self._count[r]
            tensors[f"filled/{r}"] = self._filled[r]
        meta = {
            "format": SIDECAR_FORMAT,
            "format_version": str(SIDECAR_VERSION),
            "dataset_hash": self.dataset_hash,
            "num_samples": str(self.num_samples),
            "roles": json.dumps(list(self.roles)),
            "reference_model": self.reference_model,
            "computation": json.dumps(self.computation, sort_keys=True),
            "created_by": f"megatron-longpo {__version__}",
        }
        from safetensors.numpy import save_file

        path = str(path)
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        return path


def _put(logp, count, filled, idx, lp, cnt, role, tolerance) -> None:
    """Write rows; a row written before (or twice in this call) must carry the same values."""

    def agree(a_lp, a_cnt, b_lp, b_cnt):
        return (a_cnt == b_cnt) & (np.abs(a_lp - b_lp) <= tolerance * np.maximum(1.0, np.abs(b_lp)))

    seen = np.flatnonzero(filled[idx] > 0)
    ok = agree(logp[idx[seen]], count[idx[seen]], lp[seen], cnt[seen])
    if not ok.all():
        k = seen[~ok][0]
        raise RefLogpError(
            f"row {int(idx[k])} of role {role!r} was given twice with different values "
            f"({logp[idx[k]]!r}, {int(count[idx[k]])} tokens) vs ({lp[k]!r}, {int(cnt[k])} tokens)"
        )
    order = np.argsort(idx, kind="stable")
    dup = idx[order][1:] == idx[order][:-1]
    a, b = order[:-1][dup], order[1:][dup]
    if not agree(lp[a], cnt[a], lp[b], cnt[b]).all():
        raise RefLogpError(f"role {role!r}: rows {np.unique(idx[a])[:5].tolist()} given twice with different values")
    logp[idx] = lp
    count[idx] = cnt
    filled[idx] = 1


def _check_complete(missing: dict[str, np.ndarray], where: str, fix: str) -> None:
    if missing:
        desc = "; ".join(f"{r}: {len(m)} rows (first {m[:5].tolist()})" for r, m in missing.items())
        raise RefLogpError(f"{where}: reference log-probs are missing for {desc}; {fix}")


def _read(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise RefLogpError(f"no reference log-prob sidecar at {path}; compute it with tools/precompute_ref_logps.py")
    try:
        with safe_open(path, framework="np") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - a damaged file: say which and what to do
        raise RefLogpError(f"cannot read {path} ({exc}); {RECOMPUTE}") from exc
    if meta.get("format") != SIDECAR_FORMAT:
        raise RefLogpError(f"{path} is not a reference log-prob sidecar (format={meta.get('format')!r})")
    if meta.get("format_version") != str(SIDECAR_VERSION):
        raise RefLogpError(f"{path} has sidecar version {meta.get('format_version')}, this code reads {SIDECAR_VERSION}; {RECOMPUTE}")
    return meta, tensors


def merge_parts(part_paths: Seq[str | os.PathLike], out_path: str | os.PathLike, tolerance: float = 1e-4) -> str:
    """Combine part files (same dataset, roles, model) into one complete sidecar."""
    if not part_paths:
        raise ValueError("merge_parts() needs at least one part file")
    writer: RefLogpWriter | None = None
    for p in part_paths:
        meta, tensors = _read(str(p))
        roles = tuple(json.loads(meta["roles"]))
        if writer is None:
            writer = RefLogpWriter(int(meta["num_samples"]), roles, meta["dataset_hash"], meta["reference_model"],
                                   json.loads(meta["computation"]))
        else:
            for key, mine in (("dataset_hash", writer.dataset_hash), ("reference_model", writer.reference_model),
                              ("num_samples", str(writer.num_samples))):
                if meta[key] != mine:
                    raise RefLogpError(f"{p} has {key}={meta[key]!r}, the other parts {mine!r}: they cannot be merged")
            if roles != writer.roles:
                raise RefLogpError(f"{p} has roles {roles}, the other parts {writer.roles}: they cannot be merged")
        for r in roles:
            idx = np.flatnonzero(tensors[f"filled/{r}"])
            _put(writer._logp[r], writer._count[r], writer._filled[r], idx, tensors[f"logp_sum/{r}"][idx],
                 tensors[f"num_tokens/{r}"][idx], r, tolerance)
    _check_complete(writer.missing(), str(out_path), "a rank's part is missing or incomplete; rerun those ranks")
    return writer._write(out_path)


def load_ref_logps(prefix: str | os.PathLike, roles: Seq[str] | None = None,
                   path: str | os.PathLike | None = None) -> RefLogps:
    """The sidecar of the dataset at `prefix`, checked against its manifest.

    `roles`: the roles the trainer needs (default: all the dataset kind's ref roles)."""
    manifest = read_manifest(prefix)
    path = str(path or sidecar_path(prefix))
    meta, tensors = _read(path)
    if meta["dataset_hash"] != manifest["dataset_hash"]:
        raise RefLogpError(
            f"{path} was computed for dataset {meta['dataset_hash']}, but {prefix}.json is dataset "
            f"{manifest['dataset_hash']} (the data was re-preprocessed or changed); {RECOMPUTE} --data {prefix}"
        )
    n = int(meta["num_samples"])
    if n != manifest["num_samples"]:
        raise RefLogpError(f"{path} has {n} rows, the dataset {manifest['num_samples']}; {RECOMPUTE}")
    have = tuple(json.loads(meta["roles"]))
    want = tuple(roles) if roles is not None else REF_ROLES[manifest["kind"]]
    missing_roles = [r for r in want if r not in have]
    if missing_roles:
        raise RefLogpError(
            f"{path} has no reference log-probs for roles {missing_roles} (it has {list(have)}); "
            f"{RECOMPUTE} --roles {' '.join(want)}"
        )
    bad = [f"{k} has shape {tuple(tensors[k].shape) if k in tensors else 'none (missing)'}" for r in want
           for k in (f"logp_sum/{r}", f"num_tokens/{r}", f"filled/{r}") if k not in tensors or tensors[k].shape != (n,)]
    if bad:
        raise RefLogpError(f"{path}: {bad[0]}, the dataset has {n} rows (the sidecar is damaged); {RECOMPUTE}")
    missing = {r: np.flatnonzero(tensors[f"filled/{r}"] == 0) for r in want}
    _check_complete({r: m for r, m in missing.items() if len(m)}, path, RECOMPUTE)
    return RefLogps(
        dataset_hash=meta["dataset_hash"],
        reference_model=meta["reference_model"],
        roles=want,
        computation=json.loads(meta["computation"]),
        logp_sum={r: tensors[f"logp_sum/{r}"] for r in want},
        num_tokens={r: tensors[f"num_tokens/{r}"] for r in want},
    )
