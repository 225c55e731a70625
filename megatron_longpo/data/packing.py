"""Packed THD micro-batches: the role sequences of B samples in one row, each padded for CP.

Sequence order in the packed row: sample by sample, and within a sample role by role in the
order asked, each role's sequences in order (LongPO's ref roles have one per turn). Labels,
loss mask and positions never cross a sequence boundary:

    labels[t]    = tokens[t+1] of the same sequence; 0 at a sequence's last token and on padding
    loss_mask[t] = 1 iff labels[t] is a scored response token (Sequence.loss_mask[t+1])
    position_ids restart at 0 for every sequence and keep counting through its padding

`cu_seqlens` holds the real lengths, `cu_seqlens_padded` the offsets in the row (each sequence
padded to a multiple of `pad_multiple` with `pad_token_id`): what `PackedSeqParams(qkv_format=
"thd", cu_seqlens_q=..., cu_seqlens_q_padded=...)` and the CP split expect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence as Seq

import numpy as np
import torch

from megatron_longpo.data.schema import Sample, Sequence


def pad_multiple_for(cp: int, tp: int = 1, sequence_parallel: bool = False) -> int:
    """Per-sequence padding multiple: 2*CP when CP > 1 (the zig-zag split needs 2*CP equal
    chunks), times TP under sequence parallelism (the sequence is also split over TP)."""
    for name, v in (("cp", cp), ("tp", tp)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    multiple = 2 * cp if cp > 1 else 1
    if sequence_parallel and tp > 1:
        multiple *= tp
    return multiple


@dataclass
class PaddedBatch:
    """BSHD form: one sequence per row, right-padded to the longest real length."""

    tokens: torch.LongTensor  # [n, L]
    labels: torch.LongTensor  # [n, L]
    loss_mask: torch.FloatTensor  # [n, L]
    position_ids: torch.LongTensor  # [n, L]
    lengths: torch.LongTensor  # [n] real lengths
    seq_role: list[str]
    seq_sample: list[int]
    sample_ids: list[int]


@dataclass
class PackedBatch:
    """THD: one packed row of n sequences."""

    tokens: torch.LongTensor  # [1, T]
    labels: torch.LongTensor  # [1, T]
    loss_mask: torch.FloatTensor  # [1, T]
    position_ids: torch.LongTensor  # [1, T]
    cu_seqlens: torch.IntTensor  # [n+1] real lengths
    cu_seqlens_padded: torch.IntTensor  # [n+1] offsets of the padded sequences in the row
    max_seqlen: int  # longest padded sequence
    seq_role: list[str]
    seq_sample: list[int]
    sample_ids: list[int]
    pad_token_id: int = 0

    @property
    def num_sequences(self) -> int:
        return len(self.seq_role)

    def to_padded(self) -> PaddedBatch:
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        n, width = self.num_sequences, int(lengths.max())
        tokens = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.zeros((n, width), dtype=torch.long)
        loss_mask = torch.zeros((n, width), dtype=torch.float32)
        for i in range(n):
            start, length = int(self.cu_seqlens_padded[i]), int(lengths[i])
            tokens[i, :length] = self.tokens[0, start : start + length]
            labels[i, :length] = self.labels[0, start : start + length]
            loss_mask[i, :length] = self.loss_mask[0, start : start + length]
        position_ids = torch.arange(width, dtype=torch.long).expand(n, width).clone()
        return PaddedBatch(tokens, labels, loss_mask, position_ids, lengths, list(self.seq_role),
                           list(self.seq_sample), list(self.sample_ids))


def pack(samples: Seq[Sample], roles: Seq[str], pad_multiple: int = 1, pad_token_id: int = 0) -> PackedBatch:
    """Pack the `roles` sequences of `samples` into one THD row (see the module docstring)."""
    if not samples:
        raise ValueError("pack() needs at least one sample")
    if not roles:
        raise ValueError("pack() needs at least one role")
    if not isinstance(pad_multiple, int) or pad_multiple < 1:
        raise ValueError(f"pad_multiple must be a positive integer, got {pad_multiple!r}")
    seqs: list[Sequence] = []
    seq_role: list[str] = []
    seq_sample: list[int] = []
    for b, sample in enumerate(samples):
        for role in roles:
            for s in sample.sequences(role):  # ValueError naming the kind's roles for a bad role
                if len(s) == 0:
                    raise ValueError(f"sample {sample.index} role {role!r} has an empty sequence")
                seqs.append(s)
                seq_role.append(role)
                seq_sample.append(b)
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    padded = -(-lengths // pad_multiple) * pad_multiple
    cu = np.concatenate([[0], np.cumsum(lengths)])
    cu_pad = np.concatenate([[0], np.cumsum(padded)])
    total = int(cu_pad[-1])
    tokens = np.full(total, pad_token_id, dtype=np.int64)
    labels = np.zeros(total, dtype=np.int64)
    loss_mask = np.zeros(total, dtype=np.float32)
    position_ids = np.empty(total, dtype=np.int64)
    for i, s in enumerate(seqs):
        start, length, plen = int(cu_pad[i]), int(lengths[i]), int(padded[i])
        tokens[start : start + length] = s.tokens
        labels[start : start + length - 1] = s.tokens[1:]
        loss_mask[start : start + length - 1] = s.loss_mask[1:]
        position_ids[start : start + plen] = np.arange(plen)
    return PackedBatch(
        tokens=torch.from_numpy(tokens).unsqueeze(0),
        labels=torch.from_numpy(labels).unsqueeze(0),
        loss_mask=torch.from_numpy(loss_mask).unsqueeze(0),
        position_ids=torch.from_numpy(position_ids).unsqueeze(0),
        cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
        cu_seqlens_padded=torch.from_numpy(cu_pad.astype(np.int32)),
        max_seqlen=int(padded.max()),
        seq_role=seq_role,
        seq_sample=seq_sample,
        sample_ids=[int(s.index) for s in samples],
        pad_token_id=pad_token_id,
    )
