"""Hugging Face `config.json` <-> a typed architecture description (`ModelArch`; its Megatron
`TransformerConfig` is models/megatron_config.py's).

Supported: Llama, Mistral and Qwen2 (decoder-only, RMSNorm, SwiGLU, RoPE with rotate-half,
grouped-query attention, tied or untied embeddings, Qwen2's q/k/v bias). Anything else is refused
with a message that names what is unsupported and what is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")
# Megatron pads the vocabulary so that it splits evenly over tensor-parallel ranks. We pad to a
# fixed multiple (not one that depends on TP), so the checkpoint shape is the same at every layout.
VOCAB_PAD_MULTIPLE = 128


class UnsupportedModelError(ValueError):
    """The Hugging Face model uses something this project cannot build or convert."""


@dataclass(frozen=True)
class ModelArch:
    """What defines the network, read from a Hugging Face config (layout-independent)."""

    architecture: str  # "llama" | "mistral" | "qwen2"
    vocab_size: int  # the Hugging Face (unpadded) vocabulary size
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # = num_key_value_heads (GQA)
    head_dim: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling_type: str = "default"  # "default" | "linear" | "llama3"
    rope_scaling_factor: float = 1.0
    sliding_window: int | None = None

    @property
    def padded_vocab_size(self) -> int:
        m = VOCAB_PAD_MULTIPLE
        return (self.vocab_size + m - 1) // m * m

    def with_rope_theta(self, rope_theta: float) -> "ModelArch":
        """The same network with another RoPE base (LongPO's context extension)."""
        return dataclasses.replace(self, rope_theta=float(rope_theta))

    def with_max_position_embeddings(self, n: int) -> "ModelArch":
        """The same network recorded for another context length (what a context extension trained for)."""
        return dataclasses.replace(self, max_position_embeddings=int(n))

    def check_sequence_length(self, seq_length: int, source: str = "the sequence") -> None:
        """Refuse a sliding-window model run past its window (we use full causal attention).
        `source` names where the length comes from, e.g. "the longest sequence of data.path=X"."""
        if self.sliding_window is not None and seq_length > self.sliding_window:
            raise UnsupportedModelError(
                f"{self.architecture} uses sliding-window attention (window {self.sliding_window}) and "
                f"{source} is {seq_length} tokens, past it; this project implements full causal "
                f"attention only, so it would silently compute another model. Use a model without a sliding "
                f"window (e.g. Mistral-7B-Instruct-v0.2, whose config has sliding_window=null) or sequences of "
                f"at most {self.sliding_window} tokens (tools/preprocess_pairs.py --max-length {self.sliding_window})."
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelArch":
        return cls(**d)


def load_hf_config(hf_dir_or_file: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir_or_file)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no Hugging Face config at {path}: pass the model directory that holds config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or fix the model's config.json") from e


def _rope(cfg: dict[str, Any]) -> tuple[float, str, float]:
    # transformers >= 5 nests RoPE settings in "rope_parameters"; older configs use rope_theta +
    # rope_scaling at the top level.
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rtype = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    merged = {**scaling, **params}
    factor = float(merged.get("factor", 1.0))
    if rtype == "default":
        return float(theta), "default", 1.0
    if rtype == "linear":
        return float(theta), "linear", factor
    if rtype == "llama3":
        # megatron-core fixes low/high frequency factors and the original context at Llama-3.1's values.
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for k, v in expected.items():
            if k in merged and float(merged[k]) != v:
                raise UnsupportedModelError(
                    f"llama3 RoPE scaling with {k}={merged[k]} is not supported (megatron-core fixes it at {v})"
                )
        return float(theta), "llama3", factor
    raise UnsupportedModelError(
        f"RoPE scaling type {rtype!r} is not supported; supported: default, linear, llama3"
    )


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only silu / SwiGLU)")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("mlp_bias=true is not supported (Llama/Mistral/Qwen2 MLPs have no bias)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta, rtype, factor = _rope(cfg)
    qkv_bias = model_type == "qwen2" or bool(cfg.get("attention_bias", False))
    if model_type == "llama" and cfg.get("attention_bias"):
        # o_proj would carry a bias too; Megatron's Llama layout has no output-projection bias.
        raise UnsupportedModelError("Llama with attention_bias=true is not supported")
    sliding = None
    if model_type == "mistral":
        sliding = cfg.get("sliding_window")
    elif model_type == "qwen2" and cfg.get("use_sliding_window"):
        sliding = cfg.get("sliding_window")
    return ModelArch(
        architecture=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        rope_scaling_type=rtype,
        rope_scaling_factor=factor,
        sliding_window=int(sliding) if sliding else None,
    )


def to_hf_config(arch: ModelArch, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Hugging Face config of `arch` (the trained RoPE base and context length included),
    starting from the original config when we have it so that unrelated fields survive."""
    cfg = dict(base or {})
    cls = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    cfg.update(
        architectures=[cls[arch.architecture]],
        model_type=arch.architecture,
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.head_dim,
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.rms_norm_eps,
        tie_word_embeddings=arch.tie_word_embeddings,
        hidden_act="silu",
    )
    rope: dict[str, Any] = {"rope_theta": arch.rope_theta, "rope_type": arch.rope_scaling_type}
    if arch.rope_scaling_type != "default":
        rope["factor"] = arch.rope_scaling_factor
    cfg.pop("rope_scaling", None)
    cfg["rope_parameters"] = rope
    cfg["rope_theta"] = arch.rope_theta
    if arch.architecture == "llama":
        cfg["attention_bias"] = False
        cfg["mlp_bias"] = False
    return cfg

