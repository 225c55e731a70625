"""Checks of the trainer against independent references, run by tools and tests, never by training:

- `numerics`: one training step's loss and gradient against transformers' (fp32, bf16, float64)
  on the same batch (`tools/check_numerics.py`; docs/logprobs.md "Numerics").
- `first_step`: the loss and gradients of a config's first step, saved to compare layouts (CP=2
  against CP=1, `tools/compare_grads.py`).
- `cp_attention`: Transformer Engine's THD attention at CP=2 against one GPU (2 GPUs).
- `random_model`: small random Hugging Face models with the SmolLM2 tokenizer.
"""
