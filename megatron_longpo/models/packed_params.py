"""megatron's PackedSeqParams for the two row layouts the trainer feeds the model.

* plain packed THD rows (data/packing.py): `thd_params`, what Transformer Engine's THD attention
  reads (cu_seqlens, max_seqlen); `thd_seq_index`, the packed-sequence number of each token;
* prefix-shared rows (data/prefix_sharing.py): `PrefixSharedParams`, a PackedSeqParams whose
  fields describe the trunk section (TE sees the trunks as plain THD sequences, `trunk_params`)
  plus the branch layout that models/prefix_attention.py reads; `params_for` builds it for one
  CP rank.

Ground rules: this module knows megatron and the data layouts; it knows nothing of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from megatron.core.packed_seq_params import PackedSeqParams


def thd_seq_index(cu_padded: torch.Tensor, total: int) -> torch.Tensor:
    """[total] the packed-sequence number of each position of a row laid out by `cu_padded`."""
    lens = (cu_padded[1:] - cu_padded[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lens)), lens)[:total]


def thd_params(cu_padded: torch.Tensor, max_seqlen: int, device) -> PackedSeqParams:
    """PackedSeqParams for TE's THD attention. The padding after each sequence is attended as if
    it were part of the sequence (cu_seqlens = cu_seqlens_padded): causal attention keeps it from
    touching the real tokens before it, the loss mask leaves it out of every sum, and TE runs
    without padding between sequences. (With cu_seqlens < cu_seqlens_padded TE's context-parallel
    backward gave wrong gradients on 2xH200: docs/logprobs.md.)"""
    cu = cu_padded.int().to(torch.device(device))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


@dataclass
class PrefixSharedParams(PackedSeqParams):
    """PackedSeqParams (its fields describe the trunk section, for TE) plus the branch layout."""

    position_ids: torch.Tensor | None = None  # [t] this rank's positions
    n_trunk: int = 0  # this rank's first n_trunk tokens are trunk tokens
    meta: dict = field(default_factory=dict)  # gathered-token metadata (prefix_sharing.RankView)
    parts: list = field(default_factory=list)  # (lo, hi, kv index) per branch piece on this rank
    cp_rank: int = 0
    shared_cp_group: object = None  # the CP process group when CP > 1
    max_position: int = 0
    trunk_scored: bool = True  # a trunk token (of any rank) is scored: the last layer computes trunk queries


def trunk_params(p: PrefixSharedParams) -> PackedSeqParams:
    """The trunks as plain THD sequences for TE; their padding is attended as part of the trunk
    (thd_params says why), branches never see it (meta["valid"])."""
    return thd_params(p.cu_seqlens_q_padded, p.max_seqlen_q, p.cu_seqlens_q_padded.device)


def params_for(view, row, device, cp_group=None, cp_rank: int = 0) -> PrefixSharedParams:
    """PrefixSharedParams of one rank from prefix_sharing.rank_view / build_shared_row."""
    dev = torch.device(device)
    cu = torch.from_numpy(row.cu).to(dev)
    cu_pad = torch.from_numpy(row.cu_pad).to(dev)
    return PrefixSharedParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
        max_seqlen_q=row.max_trunk_seqlen, max_seqlen_kv=row.max_trunk_seqlen,
        position_ids=view.position_ids.to(dev), n_trunk=view.n_trunk,
        meta={n: x.to(dev) for n, x in view.meta.items()},
        parts=[(lo, hi, kv.to(dev), tail) for lo, hi, kv, tail in view.parts],
        cp_rank=cp_rank, shared_cp_group=cp_group, max_position=int(view.meta["pos"].max()),
        trunk_scored=row.trunk_scored,
    )
