"""Zig-zag context-parallel partition of packed sequences: which tokens each CP rank holds.

Megatron's load-balanced CP split (Transformer Engine's `thd_get_partitioned_indices`): every
padded sequence is cut into 2*CP chunks and rank r keeps chunks r and 2*CP-1-r, so every rank gets
the same share of causal attention work. The one home of that rule: plain packed rows
(training/batch.prepare_batch) and the trunks of prefix-shared rows (data/prefix_sharing.rank_view)
both split through here.
"""

from __future__ import annotations

import numpy as np
import torch


def zigzag_cp_indices(padded_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Token positions rank `cp_rank` holds of one sequence of `padded_len` tokens under
    megatron's load-balanced CP split: 2*CP chunks, rank r keeps chunks r and 2*CP-1-r."""
    if padded_len % (2 * cp_size):
        raise ValueError(f"sequence length {padded_len} is not a multiple of 2*CP = {2 * cp_size}")
    c = padded_len // (2 * cp_size)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    second = torch.arange((2 * cp_size - 1 - cp_rank) * c, (2 * cp_size - cp_rank) * c)
    return torch.cat([first, second])


def cp_partition(cu_padded: torch.Tensor, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Indices of a packed row that this CP rank holds (zig-zag per padded sequence, as TE's
    thd_get_partitioned_indices)."""
    parts = [
        int(cu_padded[i]) + zigzag_cp_indices(int(cu_padded[i + 1] - cu_padded[i]), cp_size, cp_rank)
        for i in range(len(cu_padded) - 1)
    ]
    return torch.cat(parts)


def zigzag_indices(cu_pad: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    """Positions of the trunk section CP rank `cp_rank` holds (cp_partition: TE's THD
    zig-zag split of every padded trunk), for numpy offsets."""
    if cp_size == 1:
        return np.arange(int(cu_pad[-1]))
    return cp_partition(torch.from_numpy(cu_pad), cp_size, cp_rank).numpy()
