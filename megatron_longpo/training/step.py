"""One micro-batch: packed batch -> this rank's tensors -> GPTModel -> token log-probs ->
per-role statistics -> loss. `forward_step` / `loss_func` follow megatron-core's schedule contract.

Gradient scaling (why the numbers below are what they are):
  * the loss function returns (sum of per-sample losses, number of samples, metrics) and the
    TransformerConfig has calculate_per_token_loss=True, so the schedule does not divide and
    `finalize_model_grads` divides every gradient by the number of samples summed over DP x CP;
  * every context-parallel rank computes the same loss from sequence sums reduced with an
    autograd-aware all-reduce, whose backward sums dL/dsum over the CP ranks: each rank's local
    gradients are CP times the single-device ones; each CP rank also reports the sample count,
    so the divisor is CP times the global sample count and the factors cancel.
  The resulting gradients equal those of one device processing the whole global batch (tested
  for TP=2, DP=2 with 2 micro-batches, and the CP reduction over 2 ranks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch

from megatron_longpo.logprobs import (
    cp_partition,
    reduce_over_context_parallel,
    sequence_sums,
    target_logprobs,
)
from megatron_longpo.losses import LossConfig, SeqStat, compute_loss, sequence_role


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


def _thd_seq_index(cu_padded: torch.Tensor, total: int) -> torch.Tensor:
    lens = (cu_padded[1:] - cu_padded[:-1]).long()
    return torch.repeat_interleave(torch.arange(len(lens)), lens)[:total]


def thd_params(cu_padded: torch.Tensor, max_seqlen: int, device):
    """PackedSeqParams for TE's THD attention. The padding after each sequence is attended as if
    it were part of the sequence (cu_seqlens = cu_seqlens_padded): causal attention keeps it from
    touching the real tokens before it, the loss mask leaves it out of every sum, and TE runs
    without padding between sequences. (With cu_seqlens < cu_seqlens_padded TE's context-parallel
    backward gave wrong gradients on 2xH200: docs/logprobs.md.)"""
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = cu_padded.int().to(torch.device(device))
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)


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
        seq_index = _thd_seq_index(cu_pad, tokens.shape[1]).unsqueeze(0)
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
    )


def prepare_shared_batch(row, reference: dict[str, SeqStat] | None, *, cp_rank: int = 0, cp_group=None,
                         device: torch.device | str = "cpu") -> StepBatch:
    """From a data.prefix_sharing.SharedRow to this CP rank's StepBatch (prefix-shared attention).
    The whole-sequence statistics are those the row was built for (build_shared_row(sequence_roles=))."""
    from megatron_longpo.data.prefix_sharing import rank_view
    from megatron_longpo.models.prefix_attention import params_for

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
    )


def role_stats(sums: torch.Tensor, counts: torch.Tensor, batch: StepBatch, roles=None) -> dict[str, SeqStat]:
    """Per-sequence sums -> per-sample statistics per role (a role may have several sequences per
    sample, e.g. LongPO's per-turn short-context reference sequences: they add up). `roles`: only
    these (default: every role of the batch)."""
    out = {}
    sample = torch.tensor(batch.seq_sample, device=sums.device)
    for role in roles if roles is not None else dict.fromkeys(batch.seq_role):
        sel = torch.tensor([r == role for r in batch.seq_role], device=sums.device)
        z = torch.zeros(batch.num_samples, dtype=sums.dtype, device=sums.device)
        out[role] = SeqStat(z.index_add(0, sample[sel], sums[sel]), z.clone().index_add(0, sample[sel], counts[sel]))
    return out


def sequence_statistics(token_logp: torch.Tensor, batch: StepBatch, cp_group=None) -> dict[str, SeqStat]:
    """Token log-probs of this rank -> per-role per-sample statistics of the whole sequences: the
    response sums of every role, and the whole-sequence sums (role + "_sequence") of
    `batch.sequence_roles`. Sums and counts are reduced over the CP group (one call each)."""
    n = batch.num_sequences
    sums, counts = sequence_sums(token_logp, batch.loss_mask, batch.seq_index, n)
    if batch.whole_index is not None:
        w_sums, w_counts = sequence_sums(token_logp, batch.whole_index >= 0, batch.whole_index, n)
        sums, counts = torch.cat([sums, w_sums]), torch.cat([counts, w_counts])
    sums = reduce_over_context_parallel(sums, cp_group)
    if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
        torch.distributed.all_reduce(counts, group=cp_group)
    out = role_stats(sums[:n], counts[:n], batch)
    if batch.whole_index is not None:
        whole = role_stats(sums[n:], counts[n:], batch, roles=batch.sequence_roles)
        out.update({sequence_role(r): st for r, st in whole.items()})
    return out


def loss_from_token_logprobs(token_logp: torch.Tensor, batch: StepBatch, loss_cfg: LossConfig, cp_group=None):
    """(sum of per-sample losses, number of samples, metrics) — megatron's 3-value loss contract."""
    stats = sequence_statistics(token_logp, batch, cp_group)
    stats.update(batch.reference)
    out = compute_loss(loss_cfg, stats)
    loss_sum = out.loss.sum()
    n = torch.tensor(batch.num_samples, dtype=torch.int, device=token_logp.device)
    metrics = {k: v.detach().float().sum() for k, v in out.metrics.items()}
    metrics["loss"] = loss_sum.detach().float()
    metrics["samples"] = torch.tensor(float(batch.num_samples), device=token_logp.device)
    metrics["tokens"] = torch.tensor(float(batch.num_tokens), device=token_logp.device)
    return loss_sum, n, metrics


def logprob_processor(chunk_size: int, keep: torch.Tensor | None = None):
    """GPTModel `output_processor`: final hidden states -> per-token target log-probs [b, s]
    (only at the `keep` positions, StepBatch.keep, when given: the others are 0)."""

    def process(hidden_states, output_layer, output_weight, labels, config, **_):
        from megatron.core import parallel_state as ps

        weight = output_weight if output_weight is not None else output_layer.weight
        tp_group = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
        vocab_start = ps.get_tensor_model_parallel_rank() * weight.shape[0]
        return target_logprobs(
            hidden_states, weight, labels, chunk_size=chunk_size, tp_group=tp_group,
            vocab_start=vocab_start, sequence_parallel=config.sequence_parallel, keep=keep,
        )

    return process


def run_model(model, batch: StepBatch, chunk_size: int):
    """Forward this rank's pipeline stage: hidden states on inner stages, log-probs on the last."""
    return model(
        batch.tokens, batch.position_ids, None, labels=batch.labels,
        packed_seq_params=batch.packed_seq_params, output_processor=logprob_processor(chunk_size, keep=batch.keep),
    )


def make_forward_step(loss_cfg: LossConfig, chunk_size: int, cp_group=None):
    """forward_step(data_iterator, model) for megatron's pipeline schedules. The iterator yields
    StepBatch objects (already on the device, already split for this CP rank)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = run_model(model, batch, chunk_size)
        return out, partial(loss_from_token_logprobs, batch=batch, loss_cfg=loss_cfg, cp_group=cp_group)

    return forward_step
