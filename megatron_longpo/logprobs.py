"""Per-token target log-probs without full-vocabulary logits, and per-sequence sums.

1. `target_logprobs(hidden, weight, labels)`: log p(label_t | ...) for every position, computed
   from the final hidden states and this rank's vocabulary shard of the output weight, CHUNK BY
   CHUNK along the sequence. Forward keeps only the per-token log-sum-exp; backward recomputes each
   chunk's logits. Peak extra memory is one chunk of logits [chunk, b, V/TP] in fp32 instead of
   [s, b, V] (at 128K tokens and a 32K vocabulary: 16 GiB -> 256 MiB with chunk 2048).
   The vocabulary is never gathered: max, sum-exp and the target logit are all-reduced over the
   tensor-parallel group (three [chunk, b] reductions per chunk). With `keep` (training/batch.py's
   StepBatch.keep: the loss mask, plus every position of a sequence whose whole-sequence statistic
   is wanted, e.g. LongPO's NLL over the chosen long sequence) only those positions are projected:
   under a responses-only loss a long prompt or a shared trunk costs no output-layer work at all
   (at 64K tokens and a 32K vocabulary that is ~51 TFLOP of a 7B-shaped step).
2. `sequence_sums(logp, mask, seq_index, n)`: masked sums per packed sequence.
3. `reduce_over_context_parallel(x)`: autograd-aware sum over the CP group (its backward sums the
   gradients too, so every CP rank computing the same loss gives each rank the full dL/dx).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DEFAULT_CHUNK = 2048


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


class _ChunkedVocabParallelLogProb(torch.autograd.Function):
    """hidden [s, b, h] (replicated over TP), weight [V_local, h], labels [s, b] -> logp [s, b] fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, vocab_start, chunk, tp_group):
        s = hidden.shape[0]
        v_local = weight.shape[0]
        out = torch.empty(labels.shape, dtype=torch.float32, device=hidden.device)
        lse_all = torch.empty_like(out)
        for a in range(0, s, chunk):
            b_ = min(a + chunk, s)
            logits = torch.matmul(hidden[a:b_], weight.t()).float()  # [c, b, V_local]
            mx = logits.max(dim=-1).values
            _all_reduce(mx, dist.ReduceOp.MAX, tp_group)
            logits.sub_(mx.unsqueeze(-1))
            local = labels[a:b_] - vocab_start
            in_shard = (local >= 0) & (local < v_local)
            tgt = torch.gather(logits, -1, local.clamp(0, v_local - 1).unsqueeze(-1)).squeeze(-1)
            tgt = torch.where(in_shard, tgt, torch.zeros_like(tgt))
            sumexp = logits.exp_().sum(dim=-1)
            _all_reduce(sumexp, dist.ReduceOp.SUM, tp_group)
            _all_reduce(tgt, dist.ReduceOp.SUM, tp_group)
            lse = sumexp.log()
            out[a:b_] = tgt - lse
            lse_all[a:b_] = lse + mx
        ctx.save_for_backward(hidden, weight, labels, lse_all)
        ctx.vocab_start, ctx.chunk = vocab_start, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse_all = ctx.saved_tensors
        s, v_local = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        for a in range(0, s, ctx.chunk):
            b_ = min(a + ctx.chunk, s)
            h = hidden[a:b_]
            logits = torch.matmul(h, weight.t()).float()
            # d logp / d logits = onehot(label) - softmax
            probs = logits.sub_(lse_all[a:b_].unsqueeze(-1)).exp_()
            g = grad_out[a:b_].float()
            grad_logits = probs.mul_(-g.unsqueeze(-1))
            local = labels[a:b_] - ctx.vocab_start
            in_shard = (local >= 0) & (local < v_local)
            idx = local.clamp(0, v_local - 1).unsqueeze(-1)
            grad_logits.scatter_add_(-1, idx, torch.where(in_shard, g, torch.zeros_like(g)).unsqueeze(-1))
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[a:b_] = torch.matmul(grad_logits, weight)
            if grad_weight is not None:
                grad_weight += torch.matmul(grad_logits.reshape(-1, v_local).t(), h.reshape(-1, h.shape[-1])).float()
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def target_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK,
    tp_group=None,
    vocab_start: int = 0,
    sequence_parallel: bool = False,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-probs of `labels` [b, s] from final hidden states [s(/TP if SP), b, h] and this rank's
    output-weight shard [V/TP, h] whose first row is vocabulary id `vocab_start`. Returns [b, s] fp32.
    `keep` [b, s] (nonzero = wanted): only those positions are computed, the others are 0 and
    carry no gradient. Every rank of a TP group must pass the same `keep` (same batch).

    Inside a tensor-parallel group the hidden states enter through megatron's region functions
    (identity forward / all-reduce backward, or all-gather / reduce-scatter with sequence
    parallelism) so that gradients flowing back to the replicated hidden states are summed over
    the vocabulary shards.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        from megatron.core import tensor_parallel

        if sequence_parallel:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=tp_group)
        else:
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=tp_group)
    elif sequence_parallel:
        raise ValueError("sequence_parallel needs a tensor-parallel group")
    lab = labels.t().contiguous()  # [s, b]
    if lab.shape != hidden.shape[:2]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match hidden states {tuple(hidden.shape)} ([s, b, h])")
    if keep is None:
        return _ChunkedVocabParallelLogProb.apply(hidden, weight, lab, vocab_start, chunk_size, tp_group).t()
    if keep.shape != labels.shape:
        raise ValueError(f"keep {tuple(keep.shape)} does not match labels {tuple(labels.shape)}")
    s, b = lab.shape
    idx = torch.nonzero(keep.t().reshape(-1)).squeeze(1)  # positions in [s, b] order
    picked = _ChunkedVocabParallelLogProb.apply(
        hidden.reshape(s * b, 1, hidden.shape[-1])[idx], weight, lab.reshape(s * b, 1)[idx], vocab_start, chunk_size, tp_group)
    out = torch.zeros(s * b, dtype=picked.dtype, device=picked.device).index_copy(0, idx, picked.squeeze(1))
    return out.view(s, b).t()


def naive_target_logprobs(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Reference: full logits, log_softmax, gather (TP=1). For tests and the benchmark only."""
    logits = torch.matmul(hidden, weight.t()).float()  # [s, b, V]
    return torch.gather(torch.log_softmax(logits, -1), -1, labels.t().unsqueeze(-1)).squeeze(-1).t()


def sequence_sums(logp: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, num_sequences: int):
    """Sum of masked log-probs and count of masked tokens per sequence.

    logp, mask, seq_index: [b, s] (seq_index = which packed sequence a token belongs to, -1 for
    padding). Returns (sums [n] fp64 with grad, counts [n] fp64). Summed in float64: an fp32 sum
    of 256 log-probs (~-800) is off by ~2e-4, which DPO's difference of sums turns into a 1e-5
    loss error (LongPO on SmolLM2: 9x transformers' fp32 distance to float64; docs/logprobs.md)."""
    m = mask.bool() & (seq_index >= 0)
    idx = seq_index[m].long()
    sums = torch.zeros(num_sequences, dtype=torch.float64, device=logp.device).index_add(0, idx, logp[m].double())
    counts = torch.zeros(num_sequences, dtype=torch.float64, device=logp.device).index_add(
        0, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    return sums, counts


def reduce_over_context_parallel(x: torch.Tensor, cp_group) -> torch.Tensor:
    """Sum over the context-parallel group; autograd-aware (the backward sums gradients too)."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return x
    import torch.distributed.nn.functional as dnn

    return dnn.all_reduce(x, op=dist.ReduceOp.SUM, group=cp_group)
