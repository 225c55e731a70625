"""The trainer's view of the data: dataset + sampler + reference sidecar -> this rank's
StepBatches for one optimizer step, and the state to resume at the exact next sample."""

from __future__ import annotations

import torch

from megatron_longpo.data.format import PairDataset
from megatron_longpo.data.reference import load_ref_logps, sidecar_path
from megatron_longpo.data.sampler import PairSampler
from megatron_longpo.losses import SeqStat
from megatron_longpo.training.batch import BatchSpec, DataConfigError, StepBatch, micro_batch

__all__ = ["DataConfigError", "StepData"]


class StepData:
    def __init__(self, dcfg, *, roles, ref_roles, layout, thd: bool, device, share_prefix: bool = False,
                 sequence_roles=(), ds: PairDataset | None = None):
        """layout: this rank's parallel.Layout (DP shard of the sampler, CP split of the batches);
        ds: the dataset at dcfg.path when the caller has opened it already."""
        if not dcfg.path:
            raise DataConfigError("data.path is not set: point it at a dataset prefix written by tools/preprocess_pairs.py")
        self.ds = ds if ds is not None else PairDataset(dcfg.path)
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
                                   dp_size=layout.dp_size, dp_rank=layout.dp_rank, seed=dcfg.seed)
        self.spec = BatchSpec(roles=self.roles, pad_multiple=layout.pad_multiple, thd=thd, cp_size=layout.cp_size,
                              cp_rank=layout.cp_rank, cp_group=layout.cp_group, device=device, share_prefix=share_prefix,
                              sequence_roles=self.sequence_roles, max_tokens=dcfg.max_tokens)

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
        return micro_batch([self.ds.sample(i) for i in indices], self.spec, self.reference_stats(indices), indices)

    def next_step(self) -> list[StepBatch]:
        """This rank's micro-batches of the next optimizer step (each carries its FLOP spans)."""
        return [self.micro_batch(m) for m in self.sampler.next_global_batch()]

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> str:
        return f"{len(self.ds)} {self.ds.kind} samples"
