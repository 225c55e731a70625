"""The trainer's view of the data: dataset + sampler + reference sidecar -> this rank's
StepBatches for one optimizer step, and the state to resume at the exact next sample."""

from __future__ import annotations

import torch

from megatron_longpo.data.format import PairDataset
from megatron_longpo.data.packing import pack
from megatron_longpo.data.reference import load_ref_logps, sidecar_path
from megatron_longpo.data.sampler import PairSampler
from megatron_longpo.losses import SeqStat
from megatron_longpo.training.step import StepBatch, prepare_batch, prepare_shared_batch


class DataConfigError(ValueError):
    """The dataset does not fit the chosen method or layout."""


def _scored_positions(packed, sequence_roles) -> int:
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


class StepData:
    def __init__(self, dcfg, *, roles, ref_roles, dp_rank: int, dp_size: int, pad_multiple: int, thd: bool,
                 cp_size: int, cp_rank: int, device, reference=None, share_prefix: bool = False,
                 sequence_roles=()):
        if not dcfg.path:
            raise DataConfigError("data.path is not set: point it at a dataset prefix written by tools/preprocess_pairs.py")
        self.ds = PairDataset(dcfg.path)
        missing = [r for r in roles if r not in self.ds.roles]
        if missing:
            raise DataConfigError(
                f"the {self.ds.kind!r} dataset at {dcfg.path} has no {missing} sequences, which this loss needs "
                f"(it has {list(self.ds.roles)}); use a dataset of the right kind (LongPO: longpo, SoLoPO: solopo, "
                f"DPO/IPO/SimPO/ORPO/SFT: pair) or another loss.name"
            )
        self.roles, self.ref_roles = tuple(roles), tuple(ref_roles)
        # roles whose whole-sequence statistic the loss needs: derived from each sequence's length at
        # batch time, so datasets preprocessed before it existed need no re-preprocessing
        self.sequence_roles = tuple(sequence_roles)
        self.ref = None
        if self.ref_roles:
            import os

            path = dcfg.reference or sidecar_path(dcfg.path)
            if not os.path.isfile(path):
                raise DataConfigError(
                    f"this loss needs reference log-probs {list(self.ref_roles)} and {path} does not exist; compute them "
                    f"with `python tools/precompute_ref_logps.py --data {dcfg.path} --model REFERENCE_CHECKPOINT`"
                )
            self.ref = load_ref_logps(dcfg.path, roles=self.ref_roles, path=path)
        self.sampler = PairSampler(len(self.ds), dcfg.global_batch_size, dcfg.samples_per_microbatch,
                                   dp_size=dp_size, dp_rank=dp_rank, seed=dcfg.seed)
        self.max_tokens = dcfg.max_tokens
        self.pad_multiple, self.thd = pad_multiple, thd
        self.cp_size, self.cp_rank, self.device = cp_size, cp_rank, device
        self.share_prefix = share_prefix
        self._last_spans: list[tuple] = []  # metrics.batch_model_flops items
        self._last_scored = 0  # scored tokens of the last step (StepBatch.keep): the output layer runs on these

    def total_steps(self, steps: int | None, epochs: int) -> int:
        return steps if steps else epochs * self.sampler.steps_per_epoch

    def reference_stats(self, indices: list[int]) -> dict[str, SeqStat]:
        if self.ref is None:
            return {}
        out = {}
        for role in self.ref_roles:
            lp, n = self.ref.batch(indices, role)
            out[role] = SeqStat(torch.as_tensor(lp, dtype=torch.float32), torch.as_tensor(n, dtype=torch.float32))
        return out

    def micro_batch(self, indices: list[int]) -> StepBatch:
        if self.share_prefix:
            return self._shared_micro_batch(indices)
        packed = pack([self.ds.sample(i) for i in indices], self.roles, self.pad_multiple)
        total = int(packed.cu_seqlens_padded[-1])
        if self.max_tokens and total > self.max_tokens:
            raise DataConfigError(
                f"samples {indices} pack to {total} tokens, over data.max_tokens={self.max_tokens}; raise it, lower "
                f"data.samples_per_microbatch, or re-preprocess with --max-length"
            )
        lens = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
        self._last_spans.extend((int(x), float(x)) for x in lens)
        batch = prepare_batch(packed, self.reference_stats(indices), thd=self.thd, cp_size=self.cp_size,
                              cp_rank=self.cp_rank, device=self.device, sequence_roles=self.sequence_roles)
        self._last_scored += _scored_positions(packed, self.sequence_roles)
        return batch

    def _shared_micro_batch(self, indices: list[int]) -> StepBatch:
        from megatron_longpo.data.prefix_sharing import build_shared_row, flops_spans

        row = build_shared_row([self.ds.sample(i) for i in indices], self.roles, cp_size=self.cp_size,
                               pad_multiple=self.pad_multiple, sequence_roles=self.sequence_roles)
        total = row.num_trunk_tokens + row.num_branch_tokens
        if self.max_tokens and total > self.max_tokens:
            raise DataConfigError(
                f"samples {indices} lay out to {total} tokens, over data.max_tokens={self.max_tokens}; raise it, "
                f"lower data.samples_per_microbatch, or re-preprocess with --max-length"
            )
        self._last_spans.extend(flops_spans(row))
        self._last_scored += row.scored_tokens
        return prepare_shared_batch(row, self.reference_stats(indices), cp_rank=self.cp_rank, cp_group=self.cp_group(),
                                    device=self.device)

    def next_step(self) -> list[StepBatch]:
        self._last_spans, self._last_scored = [], 0
        return [self.micro_batch(m) for m in self.sampler.next_global_batch()]

    def last_step_spans(self) -> list[tuple]:
        """(tokens, sequence length for metrics.model_flops_per_token) of the last step's work."""
        return list(self._last_spans)

    def last_step_scored_tokens(self) -> int:
        """Scored tokens of the last step (the output layer's work: metrics.batch_model_flops)."""
        return self._last_scored

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def cp_group(self):
        if self.cp_size == 1:
            return None
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    def describe(self) -> str:
        return f"{len(self.ds)} {self.ds.kind} samples"
