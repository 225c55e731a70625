"""Megatron checkpoint directories: `dist_checkpointing` save/load, atomic, `latest`, keep-K.

Layout of a checkpoint directory (the same for an imported model and a training run):

    DIR/model.json        architecture (ModelArch), the source Hugging Face config, tokenizer info
    DIR/tokenizer/        the Hugging Face tokenizer files and chat template
    DIR/iter_0000012/     one dist_checkpointing checkpoint (layout-independent: loads at any TP/PP)
    DIR/latest            the name of the newest complete iteration directory
    DIR/iter_0000012/checksums.json   size and sha256 of every file of the iteration

An iteration is written to `DIR/.iter_0000012.tmp` and renamed when every rank has finished, and
`latest` is replaced atomically after that: a crash leaves at worst an ignored `.tmp` directory.
Before the rename the files are hashed (spread over the ranks) into `checksums.json`; every load
verifies them first, so a damaged file is reported by name instead of loading garbage
(docs/reliability.md). Iterations written before checksums existed load unverified, with a note.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_longpo.io import atomic_write_text  # noqa: F401 (also ckpt.atomic_write_text for the trainer)
from megatron_longpo.models.hf_config import ModelArch

MODEL_JSON = "model.json"
LATEST = "latest"
CHECKSUMS = "checksums.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A directory that is not a (complete) megatron-longpo checkpoint."""


class CheckpointDamaged(CheckpointError):
    """An iteration whose files do not match the checksums written when it was saved."""

    def __init__(self, iteration_dir: Path, problems: list[str], hint: str = ""):
        self.iteration_dir, self.problems = Path(iteration_dir), problems
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"checkpoint {iteration_dir} is damaged: {problems[0]}{more}; "
                         f"{hint or 'restore the file from a copy or use another iteration'}")


def iter_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


#: The Hugging Face tokenizer files a checkpoint keeps in DIR/tokenizer/ (and an export writes back).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "added_tokens.json",
)


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (TOKENIZER_FILES) of directory `src` into `dst` (created); the names
    copied, none if `src` is not a directory."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return []
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def write_model_json(ckpt_dir: str | os.PathLike, arch: ModelArch, hf_config: dict, extra: dict | None = None) -> None:
    meta = {"format_version": FORMAT_VERSION, "arch": arch.to_dict(), "hf_config": hf_config, **(extra or {})}
    atomic_write_text(Path(ckpt_dir) / MODEL_JSON, json.dumps(meta, indent=2, sort_keys=True))


def read_model_json(ckpt_dir: str | os.PathLike) -> tuple[ModelArch, dict[str, Any]]:
    path = Path(ckpt_dir) / MODEL_JSON
    if not Path(ckpt_dir).is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"{ckpt_dir} is not a megatron-longpo checkpoint (no {MODEL_JSON}); create one with "
            f"`python tools/convert_checkpoint.py hf-to-megatron --hf-dir HF_DIR --out {ckpt_dir}`"
        )
    meta = json.loads(path.read_text())
    return ModelArch.from_dict(meta["arch"]), meta


def latest_iteration_dir(ckpt_dir: str | os.PathLike) -> Path:
    d = Path(ckpt_dir)
    marker = d / LATEST
    if not marker.is_file():
        partial = sorted(p.name for p in d.glob(".iter_*.tmp")) if d.is_dir() else []
        why = f" (unfinished writes found: {', '.join(partial)})" if partial else ""
        raise CheckpointError(
            f"{d} has no '{LATEST}' marker, so it holds no complete checkpoint{why}; "
            f"point at a finished checkpoint directory or re-run the save"
        )
    it = d / marker.read_text().strip()
    if not it.is_dir() or not (it / "metadata.json").is_file():
        raise CheckpointError(f"{marker} names {it.name}, which is missing or incomplete; the checkpoint is damaged")
    return it


def list_iterations(ckpt_dir: str | os.PathLike) -> list[Path]:
    return sorted(p for p in Path(ckpt_dir).glob("iter_*") if p.is_dir())


# ---------------------------------------------------------------- checksums


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _iteration_files(it: Path) -> list[str]:
    return sorted(str(p.relative_to(it)) for p in it.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def _gather(local: dict) -> dict:
    """Union of every rank's dict (collective when distributed)."""
    if not dist.is_initialized() or _world() == 1:
        return local
    parts: list = [None] * _world()
    dist.all_gather_object(parts, local)
    return {k: v for p in parts for k, v in p.items()}


def _sha256(path: Path) -> str:
    from megatron_longpo.data.format import sha256_file

    return sha256_file(path)


def write_checksums(it: Path) -> None:
    """Collective: hash the iteration's files (round-robin over the ranks) into checksums.json."""
    names = _iteration_files(it)
    mine = {n: {"size": (it / n).stat().st_size, "sha256": _sha256(it / n)} for n in names[_rank()::_world()]}
    files = _gather(mine)
    if _rank() == 0:
        atomic_write_text(it / CHECKSUMS, json.dumps({"algorithm": "sha256", "files": files}, indent=1, sort_keys=True))
    _barrier()


def verify_checksums(it: str | os.PathLike) -> bool:
    """Collective: check every file of the iteration against its checksums.json (hashing spread over
    the ranks). Raises CheckpointDamaged naming the first bad file; False if the iteration has no
    checksums (written before they existed), True if all files match."""
    it = Path(it)
    path = it / CHECKSUMS
    if not path.is_file():
        return False
    try:
        files = json.loads(path.read_text())["files"]
        names = sorted(files)
        [(files[n]["size"], files[n]["sha256"]) for n in names]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointDamaged(it, [f"{path} is unreadable ({type(e).__name__}: {e})"]) from None
    problems = {}
    for n in names[_rank()::_world()]:
        f = it / n
        if not f.is_file():
            problems[n] = f"{f} is missing"
            continue
        size = f.stat().st_size
        if size != files[n]["size"]:
            problems[n] = f"{f} has {size} bytes, {files[n]['size']} were written (truncated or replaced)"
        elif _sha256(f) != files[n]["sha256"]:
            problems[n] = f"{f} does not match its sha256 in {CHECKSUMS} (its contents changed after the save)"
    problems = _gather(problems)
    if problems:
        raise CheckpointDamaged(it, [problems[n] for n in sorted(problems)])
    return True


def save(sharded_state_dict: dict, ckpt_dir: str | os.PathLike, iteration: int, keep_last: int | None = None) -> Path:
    """Collective: every rank calls it with its own sharded state dict."""
    from megatron.core import dist_checkpointing

    d = Path(ckpt_dir)
    final = d / iter_name(iteration)
    tmp = d / f".{iter_name(iteration)}.tmp"
    if _rank() == 0:
        d.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    try:
        dist_checkpointing.save(sharded_state_dict, str(tmp))
    except BaseException as e:  # a full disk or a file-size limit arrives without its errno: name it
        from megatron_longpo.errors import diagnose_write_failure

        os_err = diagnose_write_failure(tmp, _tensor_bytes(sharded_state_dict))
        if os_err is not None:
            raise os_err from e
        raise
    _barrier()
    write_checksums(tmp)
    if _rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(d / LATEST, final.name + "\n")
        if keep_last:
            for old in list_iterations(d)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def _tensor_bytes(obj) -> int:
    """The bytes of the tensors in a (sharded) state dict: about what this rank's save writes."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    data = getattr(obj, "data", None)  # ShardedTensor
    return _tensor_bytes(data) if isinstance(data, torch.Tensor) else 0


def load(sharded_state_dict: dict, ckpt_dir: str | os.PathLike, iteration_dir: str | os.PathLike | None = None,
         verified: bool | None = None) -> dict:
    """Collective: load into the structure of `sharded_state_dict` (any TP/PP layout), after
    checking the files against their checksums (`verified`: the caller's verify_checksums result)."""
    from megatron.core import dist_checkpointing

    it = Path(iteration_dir) if iteration_dir else latest_iteration_dir(ckpt_dir)
    if verified is None:
        verified = verify_checksums(it)
    if verified:
        return dist_checkpointing.load(sharded_state_dict, str(it))
    try:
        return dist_checkpointing.load(sharded_state_dict, str(it))
    except Exception as e:  # noqa: BLE001 - an unverified (pre-checksum) iteration that does not load
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise CheckpointError(
            f"cannot load checkpoint {it} ({type(e).__name__}: {first}); it was written before checksums existed, "
            f"so it cannot be verified and may be damaged: use another iteration"
        ) from e


def model_sharded_state_dict(chunks: list) -> dict:
    """The sharded state dict of this rank's model chunks (one per virtual pipeline stage)."""
    from megatron_longpo.models.build import unwrap

    if len(chunks) == 1:
        return {"model": unwrap(chunks[0]).sharded_state_dict()}
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def load_model(chunks: list, ckpt_dir: str | os.PathLike, iteration_dir: str | os.PathLike | None = None) -> Path:
    """Load model weights from a checkpoint directory into this rank's chunks (any TP/PP)."""
    it = Path(iteration_dir) if iteration_dir else latest_iteration_dir(ckpt_dir)
    apply_model_state(chunks, load(model_sharded_state_dict(chunks), ckpt_dir, it))
    return it


def apply_model_state(chunks: list, state: dict) -> None:
    """Copy the model part of a loaded state (keys as model_sharded_state_dict made them) into the chunks."""
    from megatron_longpo.models.build import unwrap

    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    for c, k in zip(chunks, keys):
        unwrap(c).load_state_dict(state[k], strict=False)


def open_model(ckpt_dir: str | os.PathLike, par, opts=None, rope_theta: float | None = None):
    """Set up parallel state for `par`, build this rank's chunks and load the newest weights.
    Returns (chunks, arch). `rope_theta` overrides the RoPE base (LongPO's context extension)."""
    from megatron_longpo import parallel
    from megatron_longpo.models.build import ModelOptions, build_model

    arch, _ = read_model_json(ckpt_dir)
    if rope_theta is not None:
        arch = arch.with_rope_theta(rope_theta)
    parallel.setup(par, arch=arch)
    chunks = build_model(arch, par, opts or ModelOptions())
    load_model(chunks, ckpt_dir)
    return chunks, arch
