"""The one place that builds Megatron-Core's GPTModel.

Everything megatron-specific about model construction lives here (the layer spec choice, the
deprecated-but-stable GPTModel constructor, pipeline stages and virtual stages), so that an API
change in megatron-core touches this file only; the TransformerConfig it builds with is
models/megatron_config.py's.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import torch

from megatron_longpo import platform
from megatron_longpo.models.hf_config import ModelArch
from megatron_longpo.models.megatron_config import transformer_config
from megatron_longpo.parallel import ParallelConfig, current_layout, validate_layout


@dataclass(frozen=True)
class ModelOptions:
    """How to build (not what to build: that is ModelArch)."""

    bf16: bool = False
    use_te: bool | None = None  # None: TE spec when Transformer Engine imports and CUDA is present
    recompute: str | None = None  # None | "full" | "selective" ("auto" is resolved by the memory plan before this)
    recompute_method: str = "uniform"  # full recompute: "uniform" | "block" (model.recompute_method)
    recompute_num_layers: int = 1
    recompute_modules: tuple[str, ...] | None = None  # selective: what each layer recomputes (model.recompute_modules)
    max_sequence_length: int | None = None  # defaults to the model's max_position_embeddings
    prefix_sharing: bool = False  # core attention for prefix-shared rows (models/prefix_attention.py)
    skip_unused_trunk: bool = True  # prefix sharing: the last layer skips unscored trunk queries (exact; off to measure it)
    activation_offload_layers: int = 0  # TE's CPU offloading of this many layers' activations (model.activation_offload_layers)

    def resolved_use_te(self) -> bool:
        """Whether the model is built with the TE spec (and batches are packed THD rows for it)."""
        if self.use_te is None:
            return te_available()
        if self.use_te and not te_available():
            raise RuntimeError("use_te=True but Transformer Engine with CUDA is not available on this machine")
        return self.use_te


def te_available() -> bool:
    if not platform.cuda_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # a broken TE install: fall back to the local spec, loudly
        logging.getLogger(__name__).warning("transformer_engine is installed but does not import; using the local spec")
        return False
    return True


def layer_spec(use_te: bool, prefix_sharing: bool = False, rope: dict | None = None, skip_unused_trunk: bool = True):
    """The layer spec; with prefix sharing its core attention is PrefixSharedAttention (the
    ModuleSpec way: one submodule swapped, the rest of the layer as megatron builds it)."""
    import copy
    from functools import partial

    from megatron.core.models.gpt import gpt_layer_specs as specs

    spec = specs.get_gpt_layer_with_transformer_engine_spec() if use_te else specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if prefix_sharing:
        from megatron_longpo.models.prefix_attention import PrefixSharedAttention

        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = partial(
            PrefixSharedAttention, use_te=use_te, rope=rope or {}, skip_unused_trunk=skip_unused_trunk)
    return spec


def build_model(
    arch: ModelArch, par: ParallelConfig, opts: ModelOptions = ModelOptions(), config=None
) -> list[torch.nn.Module]:
    """GPTModel chunks for this rank's pipeline stage (one chunk, or VPP chunks when interleaved).
    `config`: the TransformerConfig to build with (training passes megatron_configs(...).transformer);
    None: models/megatron_config.transformer_config of arch, par and opts.

    Parallel state must be set up (megatron_longpo.parallel.setup) before calling this; the stage
    flags come from its Layout (megatron's GPTModel layers read the same state themselves).
    """
    from megatron.core.models.gpt import GPTModel

    use_te = opts.resolved_use_te()
    validate_layout(par, use_te=use_te, prefix_sharing=opts.prefix_sharing)  # the rules that depend on the spec
    layout = current_layout()
    if config is None:
        config = transformer_config(arch, par, opts, cuda=platform.cuda_available())
    rope_kw = {}
    if arch.rope_scaling_type == "llama3":
        rope_kw = dict(rope_scaling=True, rope_scaling_factor=arch.rope_scaling_factor)
    elif arch.rope_scaling_type == "linear":
        rope_kw = dict(seq_len_interpolation_factor=arch.rope_scaling_factor)
    spec = layer_spec(use_te, opts.prefix_sharing, dict(rotary_base=arch.rope_theta, **rope_kw), opts.skip_unused_trunk)
    vpp = par.virtual_pipeline_parallel
    chunks = []
    # GPTModel logs a deprecation notice (HybridModel is its successor); it is stable in 0.19.
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    for vp_stage in range(vpp) if vpp else [None]:
        # a virtual chunk is the first (last) stage when it is the first (last) chunk of the first (last) rank
        pre = layout.is_first_stage and vp_stage in (None, 0)
        post = layout.is_last_stage and vp_stage in (None, (vpp or 1) - 1)
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size,
            max_sequence_length=opts.max_sequence_length or arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            vp_stage=vp_stage,
            # prefix sharing: RoPE from explicit positions inside the core attention
            **(dict(position_embedding_type="none") if opts.prefix_sharing
               else dict(position_embedding_type="rope", rotary_base=arch.rope_theta, **rope_kw)),
        )
        if platform.cuda_available():
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    return chunks


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
