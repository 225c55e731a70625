"""Checks of the trainer against independent references, run by tools and tests, never by training:

- `numerics`: one training step's loss and gradient against transformers' (fp32, bf16, float64)
  on the same batch (`tools/check_numerics.py`; docs/logprobs.md "Numerics").
"""
