"""Samples -> this rank's micro-batch on the device: the one place that lays samples out (packed
THD rows, padded rows, or prefix-shared rows), splits them over context-parallel ranks, attaches
megatron's PackedSeqParams and the reference statistics, and records the FLOP spans of the work.

Used by the trainer (training/data.StepData), reference scoring (training/reference.precompute),
the gradient check (checks/numerics.py) and the benchmark (tools/bench_train_step.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megatron_longpo.data.cp_split import cp_partition
from megatron_longpo.data.packing import pack
from megatron_longpo.data.prefix_sharing import build_shared_row, flops_spans, rank_view
from megatron_longpo.losses import SeqStat
from megatron_longpo.models.packed_params import params_for, thd_params, thd_seq_index


class DataConfigError(ValueError):
    """The dataset does not fit the chosen method or layout."""


@dataclass(frozen=True)
class BatchSpec:
    """How this rank lays samples out: which roles, packed or prefix-shared, the CP split, the device."""

    roles: tuple[str, ...]
    pad_multiple: int = 1  # parallel.ParallelConfig.pad_multiple()
    thd: bool = False  # one packed THD row (Transformer Engine) instead of one padded row per sequence
    cp_size: int = 1
    cp_rank: int = 0
    cp_group: object = None
    device: object = "cpu"
    share_prefix: bool = False
    sequence_roles: tuple[str, ...] = ()  # roles whose whole-sequence statistic the loss needs
    max_tokens: int | None = None  # refuse a micro-batch laid out longer than this


def micro_batch(samples, spec: BatchSpec, reference: dict[str, SeqStat] | None = None, indices=None) -> StepBatch:
    """data.format.Samples -> this rank's StepBatch under `spec` (packed or prefix-shared, CP split,
    FLOP spans on the batch). `indices`: the samples' dataset indices, for error messages."""
    indices = list(indices) if indices is not None else [int(s.index) for s in samples]
    if spec.share_prefix:
        row = build_shared_row(samples, spec.roles, cp_size=spec.cp_size, pad_multiple=spec.pad_multiple,
                               sequence_roles=spec.sequence_roles)
        total = row.num_trunk_tokens + row.num_branch_tokens
        if spec.max_tokens and total > spec.max_tokens:
            raise DataConfigError(
                f"samples {indices} lay out to {total} tokens, over data.max_tokens={spec.max_tokens}; raise it, "
                f"lower data.samples_per_microbatch, or re-preprocess with --max-length"
            )
        return prepare_shared_batch(row, reference, cp_rank=spec.cp_rank, cp_group=spec.cp_group, device=spec.device)
    packed = pack(samples, spec.roles, spec.pad_multiple)
    total = int(packed.cu_seqlens_padded[-1])
    if spec.max_tokens and total > spec.max_tokens:
        raise DataConfigError(
            f"samples {indices} pack to {total} tokens, over data.max_tokens={spec.max_tokens}; raise it, lower "
            f"data.samples_per_microbatch, or re-preprocess with --max-length"
        )
    return prepare_batch(packed, reference, thd=spec.thd, cp_size=spec.cp_size, cp_rank=spec.cp_rank,
                         device=spec.device, sequence_roles=spec.sequence_roles)


@dataclass
class StepBatch:
    """This rank's part of one micro-batch, on the device."""

    tokens: torch.Tensor  # [b, s]
    position_ids: torch.Tensor  # [b, s]
    labels: torch.Tensor  # [b, s]
    loss_mask: torch.Tensor  # [b, s]
    seq_index: torch.Tensor  # [b, s] packed-sequence number of each token, -1 on padding
    seq_role: list[str]
    seq_sample: list[int]
    num_samples: int
    reference: dict[str, SeqStat] = field(default_factory=dict)  # per-sample reference statistics
    packed_seq_params: object | None = None  # megatron PackedSeqParams (THD, GPU)
    num_tokens: int = 0  # real (unpadded) tokens in the whole micro-batch, for throughput
    # [b, s] for the whole-sequence statistics (losses.sequence_roles, e.g. LongPO's NLL over the
    # chosen long sequence): the sequence whose sum the token's log-prob adds to, at every position
    # that predicts a token of a sequence of `sequence_roles`; -1 elsewhere. None: none asked for.
    whole_index: torch.Tensor | None = None
    sequence_roles: tuple[str, ...] = ()
    # the work of the whole micro-batch for metrics.batch_model_flops: (tokens, equivalent causal
    # length[, skips the last layer's attention]) per sequence, and the positions the output layer runs on
    flop_spans: list = field(default_factory=list)
    scored_tokens: int = 0

    @property
    def num_sequences(self) -> int:
        return len(self.seq_role)

    @property
    def keep(self) -> torch.Tensor:
        """[b, s] the positions whose log-prob any statistic reads: the output layer runs on these."""
        if self.whole_index is None:
            return self.loss_mask
        return self.loss_mask.bool() | (self.whole_index >= 0)


def whole_sequence_index(seq_index: torch.Tensor, labelled: torch.Tensor, seq_role: list[str],
                         sequence_roles: tuple[str, ...]) -> torch.Tensor | None:
    """seq_index where a position has a label (a next token of its own sequence) and its sequence's
    role is in `sequence_roles`, -1 elsewhere; None when `sequence_roles` is empty."""
    if not sequence_roles:
        return None
    wanted = torch.tensor([r in sequence_roles for r in seq_role] + [False])  # index -1: padding
    return torch.where(labelled & wanted[seq_index], seq_index, torch.full_like(seq_index, -1))


def prepare_batch(packed, reference: dict[str, SeqStat] | None, *, thd: bool, cp_size: int = 1, cp_rank: int = 0,
                  device: torch.device | str = "cpu", sequence_roles: tuple[str, ...] = ()) -> StepBatch:
    """From a data.packing.PackedBatch to this rank's StepBatch.

    thd=True (Transformer Engine): one packed row with PackedSeqParams, split over CP ranks.
    thd=False (local spec, CPU): one padded row per sequence, causal mask, no CP.
    sequence_roles: roles whose whole-sequence statistic the loss needs (losses.sequence_roles):
    every position of their sequences but the last (the n-1 predicted tokens of n) is scored for it.
    """
    n = len(packed.seq_role)
    num_tokens = int(packed.cu_seqlens[-1])
    if thd:
        cu, cu_pad = packed.cu_seqlens.int(), packed.cu_seqlens_padded.int()
        tokens, labels, mask, pos = packed.tokens, packed.labels, packed.loss_mask, packed.position_ids
        seq_index = thd_seq_index(cu_pad, tokens.shape[1]).unsqueeze(0)
        # positions past a sequence's real end are padding: exclude them from the sums
        valid = torch.zeros(tokens.shape[1], dtype=torch.bool)
        for i in range(n):
            valid[int(cu_pad[i]): int(cu_pad[i]) + int(cu[i + 1] - cu[i])] = True
        seq_index = torch.where(valid.unsqueeze(0), seq_index, torch.full_like(seq_index, -1))
        labelled = valid.clone()
        labelled[(cu_pad[:-1] + (cu[1:] - cu[:-1]) - 1).long()] = False  # a sequence's last token has no label
        whole = whole_sequence_index(seq_index, labelled.unsqueeze(0), packed.seq_role, sequence_roles)
        if cp_size > 1:
            idx = cp_partition(cu_pad, cp_size, cp_rank)
            tokens, labels, mask, pos, seq_index = (t[:, idx] for t in (tokens, labels, mask, pos, seq_index))
            whole = whole[:, idx] if whole is not None else None
        params = thd_params(cu_pad, int(packed.max_seqlen), device)
    else:
        if cp_size > 1:
            raise ValueError("context parallelism needs the THD (Transformer Engine) path")
        p = packed.to_padded()
        tokens, labels, mask, pos = p.tokens, p.labels, p.loss_mask, p.position_ids
        seq_index = torch.arange(n).unsqueeze(1).expand_as(tokens).clone()
        labelled = torch.arange(tokens.shape[1]).unsqueeze(0) < (p.lengths - 1).unsqueeze(1)
        whole = whole_sequence_index(seq_index, labelled, packed.seq_role, sequence_roles)
        params = None
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return StepBatch(
        tokens=to(tokens), position_ids=to(pos), labels=to(labels), loss_mask=to(mask.float()),
        seq_index=to(seq_index), seq_role=list(packed.seq_role), seq_sample=list(packed.seq_sample),
        num_samples=len(packed.sample_ids),
        reference={k: SeqStat(to(v.logps), to(v.tokens)) for k, v in (reference or {}).items()},
        packed_seq_params=params, num_tokens=num_tokens,
        whole_index=to(whole) if whole is not None else None, sequence_roles=tuple(sequence_roles),
        flop_spans=[(int(x), float(x)) for x in (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()],
        scored_tokens=scored_positions(packed, sequence_roles),
    )


def prepare_shared_batch(row, reference: dict[str, SeqStat] | None, *, cp_rank: int = 0, cp_group=None,
                         device: torch.device | str = "cpu") -> StepBatch:
    """From a data.prefix_sharing.SharedRow to this CP rank's StepBatch (prefix-shared attention).
    The whole-sequence statistics are those the row was built for (build_shared_row(sequence_roles=))."""
    view = rank_view(row, cp_rank)
    to = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    return StepBatch(
        tokens=to(view.tokens[None]), position_ids=to(view.position_ids[None]), labels=to(view.labels[None]),
        loss_mask=to(view.loss_mask[None].float()), seq_index=to(view.seq_index[None]),
        seq_role=list(row.seq_role), seq_sample=list(row.seq_sample), num_samples=len(row.sample_ids),
        reference={k: SeqStat(to(v.logps), to(v.tokens)) for k, v in (reference or {}).items()},
        packed_seq_params=params_for(view, row, device, cp_group=cp_group, cp_rank=cp_rank),
        num_tokens=row.unshared_tokens,
        whole_index=to(view.whole_index[None]) if row.sequence_roles else None, sequence_roles=tuple(row.sequence_roles),
        flop_spans=flops_spans(row), scored_tokens=row.scored_tokens,
    )


def scored_positions(packed, sequence_roles) -> int:
    """Positions whose log-prob a statistic reads (StepBatch.keep over the whole row): the scored
    response tokens, and every labelled position (n - 1 of n) of a sequence of `sequence_roles`."""
    if not sequence_roles:
        return int(packed.loss_mask.sum())
    n = 0
    for i, role in enumerate(packed.seq_role):
        lo, hi = int(packed.cu_seqlens_padded[i]), int(packed.cu_seqlens_padded[i + 1])
        length = int(packed.cu_seqlens[i + 1] - packed.cu_seqlens[i])
        n += length - 1 if role in sequence_roles else int(packed.loss_mask[0, lo:hi].sum())
    return n
