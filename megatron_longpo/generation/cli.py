"""The generation backend's command-line options, shared by tools/build_longpo_pairs.py,
tools/build_solopo_pairs.py and tools/eval_long.py."""
from __future__ import annotations

import argparse
import os

from megatron_longpo.generation.backends import DEFAULT_MAX_ATTENTION_CELLS
from megatron_longpo.generation.factory import BackendConfig


def add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation backend")
    g.add_argument("--backend", choices=("transformers", "openai"), default="transformers")
    g.add_argument("--model", help="transformers: HF model directory (any round's checkpoint); "
                                   "openai: the served model name (default: the first the server lists)")
    g.add_argument("--base-url", help="openai: server address, e.g. http://127.0.0.1:8000/v1")
    g.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="openai: bearer token (default $OPENAI_API_KEY)")
    g.add_argument("--rope-theta", type=float, help="transformers: override the RoPE base (an extended round's generator)")
    g.add_argument("--device", help="transformers: cpu, cuda, cuda:1 (default: cuda if available)")
    g.add_argument("--dtype", default="auto", help="transformers: auto|float32|bfloat16|float16")
    g.add_argument("--batch-size", type=int, default=8, help="transformers: conversations decoded together")
    g.add_argument("--decode", choices=("auto", "prefill", "generate"), default="auto",
                   help="transformers: prefill = each prompt prefilled alone (a shared prefix once), then batched "
                        "decoding (default where the model allows: no sliding window); generate = model.generate() "
                        "over a left-padded batch")
    g.add_argument("--max-attention-cells", type=int, default=DEFAULT_MAX_ATTENTION_CELLS,
                   help="transformers --decode generate: fewer conversations per call where batch x longest prompt^2 "
                        "would pass this (the padded attention mask; default 2^32: batch 4 at 32K tokens, 1 at 64K)")
    g.add_argument("--threads", type=int, help="transformers on the CPU: torch threads (1 is fastest on a busy machine)")
    g.add_argument("--concurrency", type=int, default=8, help="openai: requests in flight")
    g.add_argument("--timeout", type=float, default=600.0, help="openai: seconds per request")
    g.add_argument("--max-retries", type=int, default=6, help="openai: retries per request (exponential back-off)")
    g.add_argument("--tokenizer", help="HF tokenizer directory for token counts (default: --model for transformers)")


def backend_config_from_args(a: argparse.Namespace) -> BackendConfig:
    return BackendConfig(kind=a.backend, model=a.model, base_url=a.base_url, api_key=a.api_key,
                         rope_theta=a.rope_theta, device=a.device, dtype=a.dtype, batch_size=a.batch_size,
                         max_attention_cells=a.max_attention_cells, decode=a.decode,
                         threads=a.threads, concurrency=a.concurrency, timeout=a.timeout, max_retries=a.max_retries)


def tokenizer_path_from_args(a: argparse.Namespace) -> str:
    path = a.tokenizer or (a.model if a.backend == "transformers" else None)
    if not path:
        raise ValueError("--backend openai needs --tokenizer HF_DIR (the served model's tokenizer) to count tokens")
    flag = "--tokenizer" if a.tokenizer else "--model"
    local = os.path.expanduser(path)
    if path.startswith(("/", ".", "~")) and not os.path.isdir(local):
        raise ValueError(f"{flag} {path}: no such directory (give a Hugging Face model or tokenizer directory)")
    if os.path.isdir(local) and not any(os.path.exists(os.path.join(local, f)) for f in TOKENIZER_FILES):
        raise ValueError(f"{flag} {path}: no tokenizer in it (none of {', '.join(TOKENIZER_FILES)}); give a Hugging Face "
                         f"model directory (a Megatron checkpoint exports to one with tools/convert_checkpoint.py "
                         f"megatron-to-hf)")
    return local


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
