"""One micro-batch: this rank's StepBatch (training/batch.py) -> GPTModel -> token log-probs ->
per-role statistics -> loss. `forward_step` / `loss_func` follow megatron-core's schedule contract.

Gradient scaling: the loss function returns megatron's 3-value contract; why the gradients come
out right is written beside the engine that sets it up (training/engine.py).
"""

from __future__ import annotations

from functools import partial

import torch

from megatron_longpo.logprobs import reduce_over_context_parallel, sequence_sums, target_logprobs
from megatron_longpo.losses import LossConfig, SeqStat, compute_loss, sequence_role
from megatron_longpo.training.batch import StepBatch


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


def logprob_processor(chunk_size: int, layout, keep: torch.Tensor | None = None):
    """GPTModel `output_processor`: final hidden states -> per-token target log-probs [b, s]
    (only at the `keep` positions, StepBatch.keep, when given: the others are 0). `layout`: the
    parallel.Layout (its TP group and rank: this rank's vocabulary shard)."""

    def process(hidden_states, output_layer, output_weight, labels, config, **_):
        weight = output_weight if output_weight is not None else output_layer.weight
        vocab_start = layout.tp_rank * weight.shape[0]
        return target_logprobs(
            hidden_states, weight, labels, chunk_size=chunk_size, tp_group=layout.tp_group,
            vocab_start=vocab_start, sequence_parallel=config.sequence_parallel, keep=keep,
        )

    return process


def run_model(model, batch: StepBatch, chunk_size: int, layout):
    """Forward this rank's pipeline stage: hidden states on inner stages, log-probs on the last."""
    return model(
        batch.tokens, batch.position_ids, None, labels=batch.labels,
        packed_seq_params=batch.packed_seq_params, output_processor=logprob_processor(chunk_size, layout, keep=batch.keep),
    )


def make_forward_step(loss_cfg: LossConfig, chunk_size: int, layout):
    """forward_step(data_iterator, model) for megatron's pipeline schedules. The iterator yields
    StepBatch objects (already on the device, already split for this CP rank)."""

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        out = run_model(model, batch, chunk_size, layout)
        return out, partial(loss_from_token_logprobs, batch=batch, loss_cfg=loss_cfg, cp_group=layout.cp_group)

    return forward_step
