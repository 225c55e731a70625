"""megatron-longpo: long-context preference optimisation on Megatron-Core."""

__version__ = "0.1.0"
