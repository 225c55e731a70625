"""Which generation backend a run uses: `BackendConfig` (what the tools' command lines fill in) and
`build_backend`, plus `model_context_window`. Apart from backends.py so that the in-process
backend (transformers_backend.py) and the HTTP one both import the interface and neither imports
the chooser (no import circle)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from .backends import DEFAULT_MAX_ATTENTION_CELLS, GenerationBackend, OpenAIChatBackend


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "transformers"  # "transformers" | "openai"
    model: str | None = None  # HF directory (transformers) or served model name (openai; optional)
    base_url: str | None = None
    api_key: str | None = None
    rope_theta: float | None = None
    device: str | None = None
    dtype: str = "auto"
    batch_size: int = 8
    threads: int | None = None
    max_attention_cells: int = DEFAULT_MAX_ATTENTION_CELLS
    decode: str = "auto"  # transformers: "prefill" (kv_decode.py) where the model allows, else "generate"
    concurrency: int = 8
    timeout: float = 600.0
    max_retries: int = 6
    backoff_base: float = 1.0


def build_backend(cfg: BackendConfig) -> GenerationBackend:
    if cfg.kind == "transformers":
        from .transformers_backend import TransformersBackend

        if not cfg.model:
            raise ValueError("--backend transformers needs --model HF_DIR (a Hugging Face model directory)")
        return TransformersBackend(cfg.model, cfg.rope_theta, cfg.device, cfg.dtype, cfg.batch_size, cfg.threads,
                                   cfg.max_attention_cells, cfg.decode)
    if cfg.kind == "openai":
        if not cfg.base_url:
            raise ValueError("--backend openai needs --base-url, e.g. http://127.0.0.1:8000/v1")
        if cfg.rope_theta is not None:
            raise ValueError("--rope-theta applies to --backend transformers only; an HTTP server generates "
                             "with the model it was started with: start it with the extended checkpoint")
        return OpenAIChatBackend(cfg.base_url, cfg.model, cfg.api_key, cfg.concurrency, cfg.timeout,
                                 cfg.max_retries, cfg.backoff_base)
    raise ValueError(f"--backend {cfg.kind}: choose transformers or openai")


def model_context_window(path: str) -> int | None:
    """`max_position_embeddings` from a Hugging Face directory's config.json (also under
    `text_config`), or None when there is none."""
    cfg_path = os.path.join(os.path.expanduser(path), "config.json")
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, encoding="utf-8") as f:
        cfg = json.load(f)
    for c in (cfg, cfg.get("text_config") or {}):
        n = c.get("max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    return None
