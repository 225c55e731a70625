"""Reading a Megatron checkpoint without megatron: one dist_checkpointing (torch_dist) iteration
directory, tensor by tensor, and its tensors under their Hugging Face names.

* `DistCheckpointReader` reads the `.metadata` of one dist_checkpointing (torch_dist) iteration
  directory and loads any slice of a stored tensor with torch.distributed.checkpoint's own file
  reader: no process group, no model, no megatron import. Layers are stacked on a leading axis
  (`decoder.layers.mlp.linear_fc1.weight` is `(L, 2F, H)`, saved as one chunk per layer and TP
  rank: the SwiGLU `[gate; up]` halves are separate chunks), so layer i is the slice `[i]`.
  Optimizer keys, `_extra_state` bytes and anything else we do not ask for are never read.
* `open_checkpoint` finds and checks the iteration directory; `check_weights` its tensors.
* `stream_hf_tensors` runs `checkpoint/hf.py`'s name/shape mapping once per Megatron tensor: the
  tensor asked for is real and the others are `meta` tensors (no memory), so each call produces
  only the Hugging Face tensors that come from that one Megatron tensor. `hf_plan` is the same
  mapping on `meta` tensors only: every Hugging Face name and shape, without data.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.checkpoint.hf import CheckpointMismatchError, megatron_globals_to_hf, megatron_layer_to_hf
from megatron_longpo.models.hf_config import SUPPORTED_ARCHITECTURES, ModelArch, UnsupportedModelError

# Top-level key prefixes of model weights in a GPTModel checkpoint (everything else, e.g.
# "optimizer.*", belongs to training state and is ignored).
_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


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
