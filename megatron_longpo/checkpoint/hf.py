"""Hugging Face <-> Megatron weight names and shapes for Llama, Mistral and Qwen2.

Megatron names here are the per-layer *canonical* names that `dist_checkpointing` stores (the
Transformer Engine names, which the local spec maps its own names to):

    embedding.word_embeddings.weight                      [V_pad, H]
    decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight   (input_layernorm)
    decoder.layers.{i}.self_attention.linear_qkv.weight   [(nq + 2 nkv) d, H], per KV group g:
                                                          [q heads of g; k_g; v_g]
    decoder.layers.{i}.self_attention.linear_qkv.bias     (Qwen2) same row order
    decoder.layers.{i}.self_attention.linear_proj.weight  (o_proj)
    decoder.layers.{i}.mlp.linear_fc1.layer_norm_weight   (post_attention_layernorm)
    decoder.layers.{i}.mlp.linear_fc1.weight              [2F, H] = [gate; up]
    decoder.layers.{i}.mlp.linear_fc2.weight              (down_proj)
    decoder.final_layernorm.weight
    output_layer.weight                                   [V_pad, H] (absent when tied)

The vocabulary is padded with zero rows on import and the padding is dropped on export.
All functions are pure: dicts of tensors in, dicts of tensors out, so each direction streams layer
by layer when the caller feeds it layer by layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from megatron_longpo.models.hf_config import ModelArch


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the config (missing, unexpected, or wrongly shaped tensors)."""


# The local spec's module names -> canonical (TE) names.
_LOCAL_TO_CANONICAL = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}
_CANONICAL_TO_LOCAL = {v: k for k, v in _LOCAL_TO_CANONICAL.items()}


def to_local_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for canon, local in _CANONICAL_TO_LOCAL.items():
            if k.endswith(canon):
                k = k[: -len(canon)] + local
                break
        out[k] = v
    return out


def to_canonical_names(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state.items():
        for local, canon in _LOCAL_TO_CANONICAL.items():
            if k.endswith(local):
                k = k[: -len(local)] + canon
                break
        out[k] = v
    return out


def _expect(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise CheckpointMismatchError(
            f"{name} has shape {tuple(t.shape)} but the config implies {tuple(shape)}; "
            f"the weights and config.json do not belong together"
        )
    return t


def _qkv_to_megatron(arch: ModelArch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d, g = arch.head_dim, arch.num_query_groups
    per = arch.num_attention_heads // g
    rest = q.shape[1:]
    q = q.reshape(g, per * d, *rest)
    k = k.reshape(g, d, *rest)
    v = v.reshape(g, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(g * (per + 2) * d, *rest)


def _qkv_from_megatron(arch: ModelArch, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, g = arch.head_dim, arch.num_query_groups
    per = arch.num_attention_heads // g
    rest = qkv.shape[1:]
    x = qkv.reshape(g, (per + 2) * d, *rest)
    q, k, v = torch.split(x, [per * d, d, d], dim=1)
    return (
        q.reshape(g * per * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


def _pad_vocab(arch: ModelArch, w: torch.Tensor) -> torch.Tensor:
    pad = arch.padded_vocab_size - w.shape[0]
    return torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w


def hf_layer_names(i: int, arch: ModelArch) -> list[str]:
    p = f"model.layers.{i}."
    names = [
        p + "input_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "self_attn.k_proj.weight",
        p + "self_attn.v_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "post_attention_layernorm.weight",
        p + "mlp.gate_proj.weight",
        p + "mlp.up_proj.weight",
        p + "mlp.down_proj.weight",
    ]
    if arch.qkv_bias:
        names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"]
    return names


def hf_names(arch: ModelArch) -> list[str]:
    """Every Hugging Face tensor name of `arch`, spelled independently of the mapping functions
    (the tests check the mapping against it)."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not arch.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(arch.num_layers):
        names += hf_layer_names(i, arch)
    return names


def hf_to_megatron(arch: ModelArch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (canonical megatron name, tensor) from Hugging Face tensors fetched by `get(name)`.
    Shapes are checked against the config; a missing tensor raises CheckpointMismatchError."""
    H, F, d = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    nq, nkv = arch.num_attention_heads * d, arch.num_query_groups * d

    emb = _expect("model.embed_tokens.weight", get("model.embed_tokens.weight"), (arch.vocab_size, H))
    yield "embedding.word_embeddings.weight", _pad_vocab(arch, emb)
    for i in range(arch.num_layers):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        g = lambda n, shape: _expect(p + n, get(p + n), shape)  # noqa: E731
        yield m + "self_attention.linear_qkv.layer_norm_weight", g("input_layernorm.weight", (H,))
        q, k, v = g("self_attn.q_proj.weight", (nq, H)), g("self_attn.k_proj.weight", (nkv, H)), g("self_attn.v_proj.weight", (nkv, H))
        yield m + "self_attention.linear_qkv.weight", _qkv_to_megatron(arch, q, k, v)
        if arch.qkv_bias:
            qb, kb, vb = g("self_attn.q_proj.bias", (nq,)), g("self_attn.k_proj.bias", (nkv,)), g("self_attn.v_proj.bias", (nkv,))
            yield m + "self_attention.linear_qkv.bias", _qkv_to_megatron(arch, qb, kb, vb)
        yield m + "self_attention.linear_proj.weight", g("self_attn.o_proj.weight", (H, nq))
        yield m + "mlp.linear_fc1.layer_norm_weight", g("post_attention_layernorm.weight", (H,))
        gate, up = g("mlp.gate_proj.weight", (F, H)), g("mlp.up_proj.weight", (F, H))
        yield m + "mlp.linear_fc1.weight", torch.cat([gate, up], dim=0)
        yield m + "mlp.linear_fc2.weight", g("mlp.down_proj.weight", (H, F))
    yield "decoder.final_layernorm.weight", _expect("model.norm.weight", get("model.norm.weight"), (H,))
    if not arch.tie_word_embeddings:
        head = _expect("lm_head.weight", get("lm_head.weight"), (arch.vocab_size, H))
        yield "output_layer.weight", _pad_vocab(arch, head)


def megatron_layer_to_hf(arch: ModelArch, i: int, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors of layer i from canonical megatron tensors fetched by `get(name)`."""
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    out = {p + "input_layernorm.weight": get(m + "self_attention.linear_qkv.layer_norm_weight")}
    q, k, v = _qkv_from_megatron(arch, get(m + "self_attention.linear_qkv.weight"))
    out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v})
    if arch.qkv_bias:
        qb, kb, vb = _qkv_from_megatron(arch, get(m + "self_attention.linear_qkv.bias"))
        out.update({p + "self_attn.q_proj.bias": qb, p + "self_attn.k_proj.bias": kb, p + "self_attn.v_proj.bias": vb})
    out[p + "self_attn.o_proj.weight"] = get(m + "self_attention.linear_proj.weight")
    out[p + "post_attention_layernorm.weight"] = get(m + "mlp.linear_fc1.layer_norm_weight")
    gate, up = torch.chunk(get(m + "mlp.linear_fc1.weight"), 2, dim=0)
    out[p + "mlp.gate_proj.weight"] = gate.contiguous()
    out[p + "mlp.up_proj.weight"] = up.contiguous()
    out[p + "mlp.down_proj.weight"] = get(m + "mlp.linear_fc2.weight")
    return out


def megatron_globals_to_hf(arch: ModelArch, get: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
    """Embedding, final norm and LM head (vocabulary padding dropped)."""
    out = {
        "model.embed_tokens.weight": get("embedding.word_embeddings.weight")[: arch.vocab_size].contiguous(),
        "model.norm.weight": get("decoder.final_layernorm.weight"),
    }
    if not arch.tie_word_embeddings:
        out["lm_head.weight"] = get("output_layer.weight")[: arch.vocab_size].contiguous()
    return out


def megatron_to_hf(arch: ModelArch, get: Callable[[str], torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    yield from megatron_globals_to_hf(arch, get).items()
    for i in range(arch.num_layers):
        yield from megatron_layer_to_hf(arch, i, get).items()
