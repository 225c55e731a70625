"""Megatron -> Hugging Face export (`tools/convert_checkpoint.py megatron-to-hf`).

Streams tensor by tensor: peak memory is about the largest single weight (the embedding, usually),
never the model. How:

* `DistCheckpointReader` reads the `.metadata` of one dist_checkpointing (torch_dist) iteration
  directory and loads any slice of a stored tensor with torch.distributed.checkpoint's own file
  reader: no process group, no model, no megatron import. Layers are stacked on a leading axis
  (`decoder.layers.mlp.linear_fc1.weight` is `(L, 2F, H)`, saved as one chunk per layer and TP
  rank: the SwiGLU `[gate; up]` halves are separate chunks), so layer i is the slice `[i]`.
  Optimizer keys, `_extra_state` bytes and anything else we do not ask for are never read.
* The name/shape mapping is `checkpoint/hf.py`'s, run once per Megatron tensor: the tensor asked
  for is real and the others are `meta` tensors (no memory), so each call produces only the
  Hugging Face tensors that come from that one Megatron tensor.
* `StreamingSafetensorsWriter` plans every shard up front (names and shapes come from the same
  mapping run on `meta` tensors), writes each shard's safetensors header first and then each
  tensor at its planned offset as soon as it exists, so no shard is ever held in memory.

The result is written into a temporary directory next to `--out` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.checkpoint.hf import CheckpointMismatchError, megatron_globals_to_hf, megatron_layer_to_hf
from megatron_longpo.models.hf_config import SUPPORTED_ARCHITECTURES, ModelArch, UnsupportedModelError, to_hf_config

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
_DTYPE_NAME = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
# Top-level key prefixes of model weights in a GPTModel checkpoint (everything else, e.g.
# "optimizer.*", belongs to training state and is ignored).
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


# ----------------------------------------------------------------------------------------------
# Reading a dist_checkpointing iteration directory
# ----------------------------------------------------------------------------------------------


class DistCheckpointReader:
    """Slices of the tensors stored in one dist_checkpointing (torch_dist backend) directory."""

    def __init__(self, iter_dir: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.dir = Path(iter_dir)
        self._reader = FileSystemReader(str(self.dir))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as e:  # truncated/corrupt pickle
            raise ckpt.CheckpointError(
                f"cannot read {self.dir / '.metadata'} ({type(e).__name__}: {e}); the checkpoint is damaged, "
                f"choose another --iteration"
            ) from e
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, key: str, index: int | None = None) -> torch.Tensor:
        """The whole tensor `key`, or its slice `[index]` along the leading (stacked-layer) axis."""
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        if key not in self.tensors:
            raise CheckpointMismatchError(f"tensor {key!r} is not in {self.dir}")
        md = self.tensors[key]
        shape = tuple(md.size)
        if index is None:
            offsets, sizes = (0,) * len(shape), shape
        else:
            offsets, sizes = (index,) + (0,) * (len(shape) - 1), (1,) + shape[1:]
        out = torch.empty(sizes, dtype=md.properties.dtype)
        chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        plan = LoadPlan(create_read_items_for_chunk_list(key, md, [chunk]))
        plan = self._reader.prepare_global_plan([self._reader.prepare_local_plan(plan)])[0]
        self._reader.read_data(plan, _IntoTensor(out)).wait()
        return out[0] if index is not None else out


class _IntoTensor:
    """The part of torch.distributed.checkpoint's LoadPlanner that FileSystemReader.read_data
    uses: where each read item lands in the destination tensor."""

    def __init__(self, out: torch.Tensor):
        self.out = out

    def resolve_tensor(self, item) -> torch.Tensor:
        t = self.out
        for dim, (off, n) in enumerate(zip(item.dest_offsets, item.lengths)):
            t = t.narrow(dim, off, n)
        return t

    def commit_tensor(self, item, tensor) -> None:
        pass

    def load_bytes(self, item, value) -> None:  # never asked for: only tensors are planned
        pass


# ----------------------------------------------------------------------------------------------
# Locating and checking the checkpoint
# ----------------------------------------------------------------------------------------------


def open_checkpoint(megatron_dir: str | os.PathLike, iteration: int | None = None) -> tuple[ModelArch, dict, Path]:
    """(arch, model.json contents, iteration directory), or a CheckpointError / UnsupportedModelError
    that names the problem and the fix."""
    d = Path(megatron_dir)
    try:
        arch, meta = ckpt.read_model_json(d)
    except (TypeError, KeyError, json.JSONDecodeError) as e:
        raise ckpt.CheckpointError(
            f"{d / ckpt.MODEL_JSON} is damaged ({type(e).__name__}: {e}); restore it from the run that wrote it"
        ) from e
    if meta.get("format") == "legacy":
        raise UnsupportedModelError(
            f"{d} holds Megatron-LM's legacy per-rank layout (written by `reshard --format legacy`), which "
            f"this tool cannot export; export the dist_checkpointing checkpoint it was made from"
        )
    if arch.architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"cannot export architecture {arch.architecture!r} from {d}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if iteration is None:
        it = ckpt.latest_iteration_dir(d)
    else:
        it = d / ckpt.iter_name(iteration)
        if not it.is_dir():
            if (d / f".{it.name}.tmp").exists():
                raise ckpt.CheckpointError(
                    f"{d / ('.' + it.name + '.tmp')} is an unfinished write of iteration {iteration} (the save did not "
                    f"complete); choose a finished iteration or re-run the save"
                )
            have = ", ".join(p.name for p in ckpt.list_iterations(d)) or "none"
            raise ckpt.CheckpointError(f"{d} has no iteration {iteration} ({it.name}); finished iterations: {have}")
    backend = it / "metadata.json"
    if not backend.is_file() or not (it / ".metadata").is_file():
        missing = "metadata.json" if not backend.is_file() else ".metadata"
        raise ckpt.CheckpointError(
            f"{it} has no dist_checkpointing metadata ({missing} is missing): the save did not finish or the "
            f"files were not all copied; choose another --iteration or copy the whole directory"
        )
    try:
        be = json.loads(backend.read_text()).get("sharded_backend")
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{backend} is not valid JSON ({e}); the checkpoint is damaged") from e
    if be != "torch_dist":
        raise UnsupportedModelError(
            f"{it} uses the dist_checkpointing backend {be!r}; only 'torch_dist' (megatron-core's default) can be "
            f"exported; re-save it with the torch_dist backend"
        )
    return arch, meta, it


def megatron_shapes(arch: ModelArch) -> dict[str, tuple[int, ...]]:
    """Global shapes of the model weights a dist_checkpointing checkpoint of `arch` stores
    (per-layer weights stacked on a leading axis of length num_layers)."""
    H, F, d, L = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim, arch.num_layers
    qkv = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    shapes = {
        "embedding.word_embeddings.weight": (arch.padded_vocab_size, H),
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight": (L, H),
        "decoder.layers.self_attention.linear_qkv.weight": (L, qkv, H),
        "decoder.layers.self_attention.linear_proj.weight": (L, H, arch.num_attention_heads * d),
        "decoder.layers.mlp.linear_fc1.layer_norm_weight": (L, H),
        "decoder.layers.mlp.linear_fc1.weight": (L, 2 * F, H),
        "decoder.layers.mlp.linear_fc2.weight": (L, H, F),
        "decoder.final_layernorm.weight": (H,),
    }
    if arch.qkv_bias:
        shapes["decoder.layers.self_attention.linear_qkv.bias"] = (L, qkv)
    if not arch.tie_word_embeddings:
        shapes["output_layer.weight"] = (arch.padded_vocab_size, H)
    return shapes


def check_weights(arch: ModelArch, reader: DistCheckpointReader) -> None:
    """Every weight `arch` needs is present with the right shape, and no model weight is left over
    (which would mean an architecture this exporter would silently drop parts of)."""
    want = megatron_shapes(arch)
    for key, shape in want.items():
        if key not in reader.tensors:
            raise CheckpointMismatchError(
                f"{reader.dir} has no tensor {key!r}, which model.json's architecture needs; the checkpoint "
                f"and model.json do not belong together"
            )
        if reader.shape(key) != shape:
            raise CheckpointMismatchError(
                f"{key} in {reader.dir} has shape {reader.shape(key)} but model.json's architecture implies "
                f"{shape}; the checkpoint and model.json do not belong together"
            )
    extra = sorted(k for k in reader.tensors if k.startswith(_MODEL_PREFIXES) and "_extra_state" not in k and k not in want)
    if arch.tie_word_embeddings and "output_layer.weight" in extra:
        extra.remove("output_layer.weight")  # a tied copy some writers keep: the embedding is exported
    if extra:
        raise UnsupportedModelError(
            f"cannot export {reader.dir}: it holds weights a {arch.architecture} model does not have "
            f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}); only Llama/Mistral/Qwen2 GPT "
            f"checkpoints (no MoE, no extra biases, no MTP) can be exported"
        )


# ----------------------------------------------------------------------------------------------
# Streaming the mapping tensor by tensor
# ----------------------------------------------------------------------------------------------


def _global_keys(arch: ModelArch) -> list[str]:
    keys = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight"]
    return keys + ([] if arch.tie_word_embeddings else ["output_layer.weight"])


def _layer_keys(arch: ModelArch, i: int) -> list[str]:
    names = [k.removeprefix("decoder.layers.") for k in megatron_shapes(arch) if k.startswith("decoder.layers.")]
    return [f"decoder.layers.{i}.{n}" for n in names]


def _meta_get(arch: ModelArch) -> Callable[[str], torch.Tensor]:
    shapes = megatron_shapes(arch)

    def get(name: str) -> torch.Tensor:
        m = _LAYER.match(name)
        shape = shapes[f"decoder.layers.{m.group(2)}"][1:] if m else shapes[name]
        return torch.empty(shape, device="meta")

    return get


def hf_plan(arch: ModelArch) -> list[tuple[str, tuple[int, ...]]]:
    """(Hugging Face name, shape) of every exported tensor, in file order, without any data."""
    get = _meta_get(arch)
    items = list(megatron_globals_to_hf(arch, get).items())
    for i in range(arch.num_layers):
        items += megatron_layer_to_hf(arch, i, get).items()
    return [(n, tuple(t.shape)) for n, t in items]


def stream_hf_tensors(arch: ModelArch, reader: DistCheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (Hugging Face name, tensor), reading one Megatron tensor (or layer slice) at a time.

    hf.py's mapping is called once per Megatron tensor with that tensor real and the rest `meta`:
    the real outputs are exactly the Hugging Face tensors made from it."""
    meta = _meta_get(arch)

    def real(name: str) -> torch.Tensor:
        m = _LAYER.match(name)
        if m:
            return reader.read(f"decoder.layers.{m.group(2)}", index=int(m.group(1)))
        return reader.read(name)

    def one(fn, key):
        out = fn(lambda n: real(n) if n == key else meta(n))
        yield from ((n, t) for n, t in out.items() if not t.is_meta)

    for key in _global_keys(arch):
        yield from one(lambda g: megatron_globals_to_hf(arch, g), key)
    for i in range(arch.num_layers):
        for key in _layer_keys(arch, i):
            yield from one(lambda g: megatron_layer_to_hf(arch, i, g), key)


# ----------------------------------------------------------------------------------------------
# Writing safetensors shards without holding them in memory
# ----------------------------------------------------------------------------------------------


def parse_size(text: str | int) -> int:
    """'2GB' -> 2*10**9, '500MiB' -> 500*2**20, '123' -> 123 bytes (Hugging Face's convention)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"cannot read the size {text!r}; write it like 2GB, 500MB or 5GiB")
    unit = (m.group(2) or "B").upper()
    mult = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
            "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    n = int(float(m.group(1)) * mult)
    if n <= 0:
        raise ValueError(f"--max-shard-size must be positive, got {text!r}")
    return n


class StreamingSafetensorsWriter:
    """Writes a planned set of tensors into model.safetensors, or model-0000i-of-0000N.safetensors
    shards of at most `max_shard_bytes` plus model.safetensors.index.json (transformers' layout),
    each tensor written at its offset the moment it is added,
    in any order: memory is the tensor being written."""

    def __init__(self, out_dir: str | os.PathLike, plan: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                 max_shard_bytes: int = 2 * 10**9):
        if dtype not in _SAFETENSORS_DTYPE:
            raise ValueError(f"cannot write dtype {dtype} to safetensors")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        size = torch.empty((), dtype=dtype).element_size()
        shards: list[list[tuple[str, tuple[int, ...], int]]] = []
        cur_bytes = 0
        for name, shape in plan:
            n = size * int(torch.Size(shape).numel())
            if not shards or (shards[-1] and cur_bytes + n > max_shard_bytes):
                shards.append([])
                cur_bytes = 0
            shards[-1].append((name, tuple(shape), n))
            cur_bytes += n
        count = len(shards)
        self.total_bytes = 0
        self._where: dict[str, tuple[Path, int, tuple[int, ...]]] = {}
        self.files: list[Path] = []
        for s, items in enumerate(shards):
            path = self.dir / ("model.safetensors" if count == 1 else f"model-{s + 1:05d}-of-{count:05d}.safetensors")
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            off = 0
            for name, shape, n in items:
                header[name] = {"dtype": _SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
                off += n
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes
            with open(path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)) + raw)
                f.truncate(8 + len(raw) + off)
            start = 8 + len(raw)
            for name, shape, n in items:
                self._where[name] = (path, start + header[name]["data_offsets"][0], shape)
            self.files.append(path)
            self.total_bytes += off
        self._written: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._where:
            raise CheckpointMismatchError(f"tensor {name!r} was not planned for export")
        if name in self._written:
            raise CheckpointMismatchError(f"tensor {name!r} was produced twice")
        path, offset, shape = self._where[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointMismatchError(f"{name} has shape {tuple(tensor.shape)}, planned {shape}")
        t = tensor.detach().to(self.dtype).contiguous().reshape(-1)
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(t.view(torch.uint8).numpy().data if t.numel() else b"")
        self._written.add(name)

    def close(self) -> None:
        missing = [n for n in self._where if n not in self._written]
        if missing:
            raise CheckpointMismatchError(f"export incomplete: {len(missing)} tensors never produced ({missing[:3]})")
        for path in self.files:
            with open(path, "r+b") as f:
                os.fsync(f.fileno())
        if len(self.files) > 1:
            weight_map = {n: w[0].name for n, w in self._where.items()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ----------------------------------------------------------------------------------------------
# The export
# ----------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str, hf_config: dict, reader: DistCheckpointReader) -> torch.dtype:
    """'auto': the dtype of the Hugging Face model the checkpoint was imported from (its
    config.json `dtype` / `torch_dtype`), else the dtype the checkpoint stores."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[dtype]
    src = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if isinstance(src, str) and src in DTYPES:
        return DTYPES[src]
    return reader.dtype("embedding.word_embeddings.weight")


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    if src.is_dir():
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != "config.json" and not f.name.endswith((".safetensors", ".bin", ".pt")):
                shutil.copy2(f, dst / f.name)
                copied.append(f.name)
    return copied


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
    (checked by check_out_dir) is moved aside first and deleted only after the swap."""
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


def megatron_to_hf_checkpoint(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    iteration: int | None = None,
    max_shard_bytes: int = 2 * 10**9,
    dtype: str = "auto",
    overwrite: bool = False,
) -> dict:
    """Export one iteration of a megatron-longpo checkpoint (any TP/PP it was saved at, with or
    without optimizer state) as a Hugging Face model directory. Single process, no GPU."""
    arch, meta, it = open_checkpoint(megatron_dir, iteration)
    out = Path(out_dir).resolve()
    src = Path(megatron_dir).resolve()
    check_out_dir(out, src, overwrite, tool="megatron-to-hf")
    ckpt.verify_checksums(it)  # a damaged file is named here, not exported as garbage
    reader = DistCheckpointReader(it)
    check_weights(arch, reader)
    hf_config = meta.get("hf_config") or {}
    out_dtype = resolve_dtype(dtype, hf_config, reader)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        writer = StreamingSafetensorsWriter(tmp, hf_plan(arch), out_dtype, max_shard_bytes)
        n_params = 0
        for name, tensor in stream_hf_tensors(arch, reader):
            writer.add(name, tensor)
            n_params += tensor.numel()
            del tensor
        writer.close()
        cfg = to_hf_config(arch, base=hf_config)
        cfg["dtype"] = _DTYPE_NAME.get(out_dtype, str(out_dtype).removeprefix("torch."))
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = cfg["dtype"]
        copied = _copy_tokenizer(src / "tokenizer", tmp)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        mark_output(tmp, "megatron-to-hf", src)
        install_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "arch": arch,
        "iteration_dir": str(it),
        "out": str(out),
        "dtype": out_dtype,
        "parameters": n_params,
        "shards": len(writer.files),
        "bytes": writer.total_bytes,
        "tokenizer_files": copied,
    }
