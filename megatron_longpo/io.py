"""Files and directories written under a temporary name and renamed when complete.

A reader never sees half a file: `atomic_write` (and `atomic_write_text` / `atomic_write_json`
over it) write a temporary sibling, flush it to disk and rename it over the target; `atomic_path`
does the same for a writer that wants a path (safetensors, a numpy file). Directories that the
tools produce (a converted or exported checkpoint) are built in a temporary sibling by `atomic_dir`
and swapped in; `check_out_dir` / `mark_output` decide what a later `--overwrite` may replace.
Ground floor: the standard library only.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator


def _sibling(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path next to `path` for a writer to fill; renamed to `path` when the block ends
    without an error, removed otherwise. The file gets the usual 0o644 permissions."""
    path = Path(path)
    tmp = _sibling(path)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """`open(path, mode)` that writes a temporary sibling, fsyncs it and renames it over `path`."""
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """`obj` as indented JSON (non-ASCII kept), one trailing newline."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ---------------------------------------------------------------- output directories of the tools

OUTPUT_MARKER = ".megatron-longpo-output"  # in every directory these tools write: what --overwrite may replace


def _writable_parent(out: Path) -> Path:
    p = out.parent
    while not p.exists():
        p = p.parent
    return p


def check_out_dir(out: Path, src: Path, overwrite: bool, tool: str = "this tool") -> None:
    """Refuse an output directory that would destroy anything but this tool's own earlier output:
    the input itself, a directory inside it or one that contains it, a file, a non-empty directory
    (without --overwrite) or, even with --overwrite, a directory this tool did not write."""
    out, src = Path(os.path.abspath(out)).resolve(), Path(os.path.abspath(src)).resolve()
    if out == src or src in out.parents:
        what = "the input" if tool == "hf-to-megatron" else "the checkpoint directory"
        raise ValueError(f"--out {out} is inside {what} {src}; choose a directory outside it")
    if out in src.parents:
        raise ValueError(f"--out {out} contains the input {src}; replacing it would delete the input: choose a new "
                         f"directory, e.g. {out / (src.name + '-out')}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        marker = out / OUTPUT_MARKER
        if not marker.is_file():
            raise ValueError(
                f"{out} was not written by {tool} (it has no {OUTPUT_MARKER} marker), so --overwrite will not delete "
                f"it; remove it yourself or choose another --out"
            )
        try:
            wrote = set(json.loads(marker.read_text())["entries"])
        except (ValueError, KeyError, TypeError):
            wrote = set()
        added = sorted(p.name for p in out.iterdir() if p.name not in wrote and p.name != OUTPUT_MARKER)
        if added:
            raise ValueError(
                f"{out} holds files this tool did not write ({', '.join(added[:5])}{', ...' if len(added) > 5 else ''}), "
                f"so --overwrite will not delete it; remove it yourself or choose another --out"
            )
    parent = _writable_parent(out)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write --out {out}: {parent} is not writable; choose another --out")


def mark_output(tmp: Path, tool: str, src: Path) -> None:
    """Record that `tmp` is this tool's output (what a later --overwrite may replace)."""
    entries = sorted(p.name for p in tmp.iterdir())
    (tmp / OUTPUT_MARKER).write_text(json.dumps({"tool": tool, "source": str(src), "entries": entries}) + "\n")


def install_dir(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory `tmp` (a sibling of `out`) to `out`; an existing `out`
    is moved aside first and deleted only after the swap."""
    os.chmod(tmp, 0o755)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, prefix: str | None = None) -> Iterator[Path]:
    """A temporary directory next to `out` to fill; installed as `out` (`install_dir`) when the
    block ends without an error, deleted otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix or f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
