"""Hugging Face -> Megatron import (`tools/convert_checkpoint.py hf-to-megatron`)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from megatron_longpo.checkpoint import dist as ckpt
from megatron_longpo.checkpoint.hf import CheckpointMismatchError, hf_to_megatron, to_local_names
from megatron_longpo.checkpoint.hf_files import HFWeights
from megatron_longpo.models.hf_config import ModelArch, load_hf_config, arch_from_hf_config

def check_tokenizer(hf_dir: str | os.PathLike, arch: ModelArch) -> int:
    """Refuse a tokenizer with more tokens than the model's embedding has rows. Returns its size."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir))
    except Exception as e:
        raise CheckpointMismatchError(f"cannot load the tokenizer from {hf_dir}: {e}") from e
    n = len(tok)
    if n > arch.vocab_size:
        raise CheckpointMismatchError(
            f"the tokenizer in {hf_dir} has {n} tokens but the model's vocabulary (config.json "
            f"vocab_size) has {arch.vocab_size}: they do not belong together; use the tokenizer "
            f"that was released with these weights"
        )
    return n


def load_hf_weights_into(model: torch.nn.Module, arch: ModelArch, weights: HFWeights) -> None:
    """Copy Hugging Face weights into a single-stage, TP=1 GPTModel (local or TE spec)."""
    own = model.state_dict()
    uses_local_names = any(k.endswith("input_layernorm.weight") for k in own)
    state = dict(hf_to_megatron(arch, weights.get))
    if uses_local_names:
        state = to_local_names(state)
    if arch.tie_word_embeddings:
        state.pop("output_layer.weight", None)
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")
               and not (arch.tie_word_embeddings and k == "output_layer.weight")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise CheckpointMismatchError(f"weight mapping mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise CheckpointMismatchError(f"{k}: model expects {tuple(own[k].shape)}, weights give {tuple(v.shape)}")
            own[k].copy_(v)


def hf_to_megatron_checkpoint(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
                              overwrite: bool = False) -> dict:
    """Import a Hugging Face model as a megatron-longpo checkpoint (single process).

    The dist_checkpointing format does not depend on the layout: the result loads at any TP/PP.
    `tp`/`pp` are the layout you intend to train with; they are validated against the model now
    (so that a bad choice fails here, not on the cluster) and recorded in model.json.
    """
    from megatron_longpo import parallel
    from megatron_longpo.io import atomic_dir, check_out_dir, mark_output
    from megatron_longpo.models.build import ModelOptions, build_model

    out = Path(os.path.abspath(out_dir)).resolve()
    check_out_dir(out, Path(hf_dir), overwrite, tool="hf-to-megatron")  # never writes into the source or a used dir
    hf_cfg = load_hf_config(hf_dir)
    arch = arch_from_hf_config(hf_cfg)
    weights = HFWeights(hf_dir)  # fails early on missing / corrupt files
    n_tok = check_tokenizer(hf_dir, arch)
    parallel.validate_layout(parallel.ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp), tp * pp, arch)
    par = parallel.ParallelConfig()
    parallel.setup(par, seed=0)
    [model] = build_model(arch, par, ModelOptions(use_te=False))
    load_hf_weights_into(model, arch, weights)
    # written to a temporary sibling and renamed: an interrupted import leaves no half checkpoint at --out
    with atomic_dir(out) as tmp:
        ckpt.save(ckpt.model_sharded_state_dict([model]), tmp, iteration=0)
        copied = ckpt.copy_tokenizer(hf_dir, tmp / "tokenizer")
        ckpt.write_model_json(tmp, arch, hf_cfg, extra={
            "source": str(Path(hf_dir).resolve()),
            "tokenizer_size": n_tok,
            "tokenizer_files": copied,
            "intended_layout": {"tensor_parallel": tp, "pipeline_parallel": pp},
        })
        mark_output(tmp, "hf-to-megatron", Path(hf_dir))
    it = out / ckpt.iter_name(0)
    n_params = sum(p.numel() for p in model.parameters())
    return {"arch": arch, "iteration_dir": str(it), "parameters": n_params}
