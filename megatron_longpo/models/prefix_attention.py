"""Core attention for prefix-shared rows (data/prefix_sharing.py), swapped into the layer spec.

Rows hold trunks (causal sequences; shared prefixes among them) and branches (the responses of a
pair, each continuing its trunk). This module
  1. applies RoPE from explicit position ids (branch positions continue the trunk, so the
     model is built with position_embedding_type="none" and RoPE happens here);
  2. trunk queries: causal attention within their trunk. GPU: Transformer Engine's fused THD
     attention, with its context parallelism (ring over the zig-zag halves), exactly as for
     plain packed sequences. CPU / reference: masked attention over the gathered keys;
  3. branch queries: attention over [their trunk | their own branch up to themselves], one
     masked SDPA call per branch piece on this rank, over keys and values all-gathered from
     the CP group and recomputed in the backward (torch.utils.checkpoint) so the gathered
     copies are not kept. Branches are short (responses), so this is a small part of the cost.
Every query sees exactly the keys it sees in the two-sequence layout, so the results are the
same up to floating point.

In the model's last layer, trunk queries are not computed at all when no trunk token is scored
(every pair's trunk: its scored tokens all lie in the branches): their outputs would only feed
final hidden states that no log-prob reads, while the branches need the trunk's keys and values,
which the layer still computes. The trunk rows of that layer get zeros; the loss and every
gradient are unchanged (the zeros' gradient is never used), and 1/num_layers of the trunk's
attention is saved.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_longpo.models.packed_params import PrefixSharedParams, trunk_params


class _GatherCP(torch.autograd.Function):
    """All-gather along dim 0 over the CP group; the backward sums the gradients over the group
    and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        n = dist.get_world_size(group)
        out = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(out, x.contiguous(), group=group)
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        n, r = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(n, 0)[r].clone(), None


def gather_cp(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherCP.apply(x, group)


def allowed(qm: dict, km: dict) -> torch.Tensor:
    """[q, k] mask: same trunk; a trunk key if causal (or the query is in a branch); a branch key
    only from the query's own branch, causal. Padding queries see every valid key (finite, unused)."""
    same_trunk = qm["trunk"][:, None] == km["trunk"][None, :]
    causal = km["pos"][None, :] <= qm["pos"][:, None]
    q_br, k_br = qm["branch"][:, None], km["branch"][None, :]
    trunk_key = (k_br == -1) & ((q_br >= 0) | causal)
    branch_key = (k_br >= 0) & (k_br == q_br) & causal
    m = same_trunk & (trunk_key | branch_key) & km["valid"][None, :]
    pad_q = ~qm["valid"][:, None]
    return m | (pad_q & km["valid"][None, :])


def _heads(q, k, v):
    h, hkv = q.shape[1], k.shape[1]
    if h != hkv:
        k = k.repeat_interleave(h // hkv, dim=1)
        v = v.repeat_interleave(h // hkv, dim=1)
    return (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))


def masked_attention(q, k, v, mask, scale):
    """q [lq, h, d], k/v [lk, hkv, d] (GQA: heads repeated), mask [lq, lk] bool -> [lq, h, dv]."""
    qh, kh, vh = _heads(q, k, v)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale).squeeze(0).transpose(0, 1)


def tail_causal_attention(q, k, v, scale):
    """q [lq, h, d] are the last lq of the lk keys (k/v [lk, hkv, d], GQA without copies): query i
    sees keys 0 .. lk - lq + i (lower-right causal; SDPA's flash kernel, no mask tensor)."""
    from torch.nn.attention.bias import causal_lower_right

    qh, kh, vh = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=causal_lower_right(q.shape[0], k.shape[0]), scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


class PrefixSharedAttention(MegatronModule):
    """Drop-in core attention (same constructor and forward as megatron's core attentions)."""

    _tail_failed = False  # set once if the fused lower-right causal kernel is unavailable

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self", cp_comm_type=None,
                 softmax_scale=None, pg_collection=None, *, use_te: bool, rope: dict, skip_unused_trunk: bool = True, **_):
        super().__init__(config=config)
        from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

        self.rope = RotaryEmbedding(kv_channels=config.kv_channels, rotary_percent=1.0,
                                    use_cpu_initialization=True, **rope)
        d = config.kv_channels
        self.scale = softmax_scale if softmax_scale is not None else d ** -0.5
        # the last layer (global layer numbers: pipeline offsets included) may skip unscored trunk queries
        self.skip_unused_trunk = skip_unused_trunk and layer_number == config.num_layers
        self.trunk_attention = None
        if use_te:
            from megatron.core.extensions.transformer_engine import TEDotProductAttention

            self.trunk_attention = TEDotProductAttention(
                config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
                attention_type=attention_type, softmax_scale=softmax_scale,
                cp_comm_type=cp_comm_type or "p2p", pg_collection=pg_collection)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        return {}  # no weights; TE's fp8 extra state is not used (bf16)

    def _rotate(self, x, freqs):
        """RoPE of x [t, h, d] with per-token freqs [t, 1, d]: Transformer Engine's fused kernel
        (sbhd, one frequency row per token) with the TE spec, PyTorch ops otherwise."""
        from megatron.core.models.common.embeddings import rope_utils

        x, freqs = x.unsqueeze(1), freqs.unsqueeze(1)
        if self.trunk_attention is not None and rope_utils.fused_apply_rotary_pos_emb is not None:
            return rope_utils.fused_apply_rotary_pos_emb(x, freqs).squeeze(1)
        return rope_utils._apply_rotary_pos_emb_bshd(x, freqs).squeeze(1)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params: PrefixSharedParams | None = None, **_):
        p = packed_seq_params
        if not isinstance(p, PrefixSharedParams):
            raise TypeError("PrefixSharedAttention needs PrefixSharedParams (data.share_prefix=true batches)")
        if self.rope.inv_freq.device != query.device:
            self.rope.inv_freq = self.rope.inv_freq.to(query.device)
        freqs = self.rope.get_emb(p.max_position + 1)[p.position_ids].squeeze(1)  # [t, 1, d]
        q, k, v = self._rotate(query, freqs), self._rotate(key, freqs), value
        nt, meta, t_local = p.n_trunk, p.meta, query.shape[0]
        me = slice(p.cp_rank * t_local, (p.cp_rank + 1) * t_local)
        qmeta = {n: x[me] for n, x in meta.items()}
        group = p.shared_cp_group

        outs = []
        if nt and self.skip_unused_trunk and not p.trunk_scored:
            outs.append(q.new_zeros(nt, q.shape[1] * v.shape[2]))  # read by nothing (module doc)
        elif nt:
            if self.trunk_attention is not None:
                o = self.trunk_attention(q[:nt], k[:nt], v[:nt], None, attn_mask_type=attn_mask_type,
                                         packed_seq_params=trunk_params(p))
                outs.append(o.reshape(nt, -1))
            else:
                kg, vg = gather_cp(k, group), gather_cp(v, group)
                kv = torch.nonzero(meta["branch"] == -1).squeeze(1)
                mask = allowed({n: x[:nt] for n, x in qmeta.items()}, {n: x[kv] for n, x in meta.items()})
                outs.append(masked_attention(q[:nt], kg[kv], vg[kv], mask, self.scale).reshape(nt, -1))
        if t_local > nt:
            if self.config.recompute_granularity is None:  # not inside megatron's recompute already
                outs.append(torch.utils.checkpoint.checkpoint(
                    self._branches, q[nt:], k, v, p, qmeta, meta, use_reentrant=False))
            else:
                outs.append(self._branches(q[nt:], k, v, p, qmeta, meta))
        return torch.cat(outs, 0) if len(outs) > 1 else outs[0]

    def _branches(self, qb, k, v, p, qmeta, meta):
        nt = p.n_trunk
        kg, vg = gather_cp(k, p.shared_cp_group), gather_cp(v, p.shared_cp_group)
        out = qb.new_zeros(qb.shape[0], qb.shape[1], v.shape[2])
        for lo, hi, kv, tail in p.parts:
            if tail and not PrefixSharedAttention._tail_failed:
                try:  # keys 0..n-1 in order, queries the last ones: lower-right causal, no mask tensor
                    out[lo - nt:hi - nt] = tail_causal_attention(qb[lo - nt:hi - nt], kg[kv], vg[kv], self.scale)
                    continue
                except RuntimeError as e:  # a kernel without lower-right causal support: the masked path
                    import logging

                    logging.getLogger(__name__).warning("lower-right causal SDPA failed (%s); using masks", e)
                    PrefixSharedAttention._tail_failed = True
            mask = allowed({n: x[lo:hi] for n, x in qmeta.items()}, {n: x[kv] for n, x in meta.items()})
            out[lo - nt:hi - nt] = masked_attention(qb[lo - nt:hi - nt], kg[kv], vg[kv], mask, self.scale)
        return out.reshape(out.shape[0], -1)
