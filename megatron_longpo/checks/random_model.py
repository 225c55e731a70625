"""Small random Hugging Face models with the SmolLM2 tokenizer: what the tests and the GPU checks
(`tools/gpu_checks.py`) train, import and compare when a real model would only cost time."""

from __future__ import annotations

import shutil
from pathlib import Path

# the GPU checks' random model: TP=2 divides its heads; head dim 64
GPU_LLAMA = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                 num_key_value_heads=4, max_position_embeddings=8192, rms_norm_eps=1e-5)


def random_hf_model(out_dir: Path, tokenizer_dir: Path, model_type: str = "llama", tied: bool = False, layers: int = 4,
                    random_norms: bool = True, **over) -> Path:
    """A small random Llama/Qwen2 (seed 0) with the tokenizer of `tokenizer_dir` (SmolLM2's: its
    vocabulary fits). `over` replaces config fields; random_norms gives the norms and biases random
    values so that their mapping is exercised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(vocab_size=49152 + (64 if model_type == "qwen2" else 0), hidden_size=64, intermediate_size=96,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, tie_word_embeddings=tied)
    cfg = AutoConfig.for_model(model_type, **{**fields, **over})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters() if random_norms else ():
            if "norm" in n or n.endswith("bias"):
                p.copy_(1 + 0.5 * torch.randn_like(p) if "norm" in n else 0.5 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(tokenizer_dir) / f, Path(out_dir) / f)
    return Path(out_dir)


def gpu_llama(out_dir: Path, tokenizer_dir: Path) -> Path:
    """A random 8-layer Llama (hidden 512, 8 / 4 heads), standard initialisation."""
    return random_hf_model(out_dir, tokenizer_dir, "llama", random_norms=False, **GPU_LLAMA)
