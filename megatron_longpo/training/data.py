"""The trainer's view of the data: dataset + sampler + reference sidecar -> this rank's
StepBatches for one optimizer step, and the state to resume at the exact next sample."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch

from megatron_longpo.data.blend import Blend, BlendError, parse_blend
from megatron_longpo.data.format import PairDataset
from megatron_longpo.data.reference import load_ref_logps, sidecar_path
from megatron_longpo.data.sampler import PairSampler
from megatron_longpo.losses import SeqStat
from megatron_longpo.training.batch import (
    BatchSpec,
    DataConfigError,
    StepBatch,
    micro_batch,
)

__all__ = ["DataConfigError", "EvalData", "StepData"]


class _Sources:
    """The datasets behind a data.path (one prefix or a weighted blend), their reference sidecars,
    and how (dataset, sample) pairs become batches."""

    def __init__(self, spec: str, what: str, *, roles, ref_roles, reference: str | None, spec_key: str,
                 verify_hash: bool = False, vocab_size: int | None = None, datasets: list | None = None):
        try:
            blend = parse_blend(spec)
        except BlendError as e:
            raise DataConfigError(str(e).replace("data.path", spec_key)) from None
        self.weights = [w for w, _ in blend]
        self.prefixes = [p for _, p in blend]
        if datasets is not None and len(datasets) == len(self.prefixes):  # opened once by the caller
            self.datasets = list(datasets)
        else:
            self.datasets = [PairDataset(p, verify_hash=verify_hash) for p in self.prefixes]
        for ds in self.datasets:
            ds.vocab_limit = vocab_size  # a token id beyond the embeddings is named on read, not an IndexError
        kinds = {ds.kind for ds in self.datasets}
        if len(kinds) > 1:
            raise DataConfigError(f"{spec_key} blends datasets of kinds {sorted(kinds)}; blend datasets of one kind")
        for p, ds in zip(self.prefixes, self.datasets):
            missing = [r for r in roles if r not in ds.roles]
            if missing:
                raise DataConfigError(
                    f"the {ds.kind!r} dataset at {p} has no {missing} sequences, which this loss needs "
                    f"(it has {list(ds.roles)}); use a dataset of the right kind (LongPO: longpo, SoLoPO: solopo, "
                    f"DPO/IPO/SimPO/ORPO/SFT: pair) or another loss.name"
                )
        if reference and len(self.prefixes) > 1:
            raise DataConfigError(f"data.reference names one sidecar but {spec_key} blends {len(self.prefixes)} datasets; "
                                  "unset data.reference (each prefix's PREFIX.ref.safetensors is used)")
        self.ref_roles = tuple(ref_roles)
        self.refs = []
        for p in self.prefixes:
            if not self.ref_roles:
                self.refs.append(None)
                continue
            path = reference or sidecar_path(p)
            if not os.path.isfile(path):
                raise DataConfigError(
                    f"this loss needs reference log-probs {list(self.ref_roles)} and {path} does not exist; compute them "
                    f"with `python tools/precompute_ref_logps.py --data {p} --model REFERENCE_CHECKPOINT`"
                )
            self.refs.append(load_ref_logps(p, roles=self.ref_roles, path=path))
        self.kind = self.datasets[0].kind

    def reference_stats(self, draws: list[tuple[int, int]]) -> dict[str, SeqStat]:
        if not self.ref_roles:
            return {}
        out = {}
        for role in self.ref_roles:
            lp = np.zeros(len(draws), dtype=np.float64)
            n = np.zeros(len(draws), dtype=np.float64)
            for d in sorted({d for d, _ in draws}):
                pos = [k for k, (dd, _) in enumerate(draws) if dd == d]
                a, b = self.refs[d].batch([draws[k][1] for k in pos], role)
                lp[pos], n[pos] = a, b
            out[role] = SeqStat(torch.as_tensor(lp, dtype=torch.float32), torch.as_tensor(n, dtype=torch.float32))
        return out

    def samples(self, draws: list[tuple[int, int]]):
        return [self.datasets[d].sample(j) for d, j in draws]

    @property
    def dataset_hash(self) -> str:
        if len(self.datasets) == 1:
            return self.datasets[0].dataset_hash
        text = ";".join(f"{w!r}:{ds.dataset_hash}" for w, ds in zip(self.weights, self.datasets))
        return "blend:sha256:" + hashlib.sha256(text.encode()).hexdigest()

    @property
    def manifest(self) -> dict:
        return self.datasets[0].manifest


def held_out(n: int, fraction: float, seed: int, d: int) -> np.ndarray:
    """The samples of dataset `d` (of n) held out for evaluation: round(fraction*n) (at least 1),
    from a seeded permutation; sorted."""
    k = max(1, round(fraction * n))
    if k >= n:
        raise DataConfigError(f"data.eval_fraction={fraction} holds out all {n} samples of a dataset; lower it")
    perm = np.random.default_rng(np.random.SeedSequence([seed, d, 0xE7A1])).permutation(n)
    return np.sort(perm[n - k:])


class StepData:
    def __init__(self, dcfg, *, roles, ref_roles, layout, thd: bool, device, share_prefix: bool = False,
                 sequence_roles=(), vocab_size: int | None = None, datasets: list[PairDataset] | None = None):
        """layout: this rank's parallel.Layout (DP shard of the sampler, CP split of the batches).
        data.path is one prefix or a weighted blend (data/blend.py); data.eval_path or
        data.eval_fraction give the evaluation split (`self.eval`, None without). vocab_size: the
        model's embedding rows (a token id beyond them is named on read, not an IndexError).
        datasets: the datasets of data.path's prefixes when the caller has opened them already."""
        if not dcfg.path:
            raise DataConfigError("data.path is not set: point it at a dataset prefix written by tools/preprocess_pairs.py")
        self.src = _Sources(dcfg.path, "train", roles=roles, ref_roles=ref_roles, reference=dcfg.reference,
                            spec_key="data.path", verify_hash=getattr(dcfg, "verify_hash", False), vocab_size=vocab_size,
                            datasets=datasets)
        self.datasets = self.src.datasets
        self.ds = self.src if len(self.datasets) > 1 else self.datasets[0]  # .dataset_hash, .manifest, .kind
        self.roles, self.ref_roles = tuple(roles), tuple(ref_roles)
        # roles whose whole-sequence statistic the loss needs: derived from each sequence's length at
        # batch time, so datasets preprocessed before it existed need no re-preprocessing
        self.sequence_roles = tuple(sequence_roles)
        sizes = [len(ds) for ds in self.datasets]
        eval_draws = None
        if dcfg.eval_fraction:
            outs = [held_out(n, dcfg.eval_fraction, dcfg.seed, d) for d, n in enumerate(sizes)]
            pools = [np.setdiff1d(np.arange(n), o) for n, o in zip(sizes, outs)]
            eval_draws = [(d, int(j)) for d, o in enumerate(outs) for j in o]
        else:
            pools = None
        # one dataset and no held-out split: sample i is draw i (the order of earlier versions)
        self.blend = None if (len(sizes) == 1 and pools is None) else Blend(sizes, self.src.weights, dcfg.seed, pools=pools)
        n = len(self.blend) if self.blend is not None else sizes[0]
        self.sampler = PairSampler(n, dcfg.global_batch_size, dcfg.samples_per_microbatch,
                                   dp_size=layout.dp_size, dp_rank=layout.dp_rank, seed=dcfg.seed)
        self.spec = BatchSpec(roles=self.roles, pad_multiple=layout.pad_multiple, thd=thd, cp_size=layout.cp_size,
                              cp_rank=layout.cp_rank, cp_group=layout.cp_group, device=device, share_prefix=share_prefix,
                              sequence_roles=self.sequence_roles, max_tokens=dcfg.max_tokens)
        self.eval = None
        if dcfg.eval_path:
            ev = _Sources(dcfg.eval_path, "eval", roles=roles, ref_roles=ref_roles, reference=None, spec_key="data.eval_path",
                          vocab_size=vocab_size)
            if ev.kind != self.src.kind:
                raise DataConfigError(f"data.eval_path is a {ev.kind!r} dataset, data.path {self.src.kind!r}; use one kind")
            draws = [(d, j) for d, ds in enumerate(ev.datasets) for j in range(len(ds))]
            self.eval = EvalData(ev, draws, self.spec, dcfg, layout)
        elif eval_draws is not None:
            self.eval = EvalData(self.src, eval_draws, self.spec, dcfg, layout)

    def total_steps(self, steps: int | None, epochs: int) -> int:
        return steps if steps else epochs * self.sampler.steps_per_epoch

    def draw(self, i: int, epoch: int | None = None) -> tuple[int, int]:
        """(dataset, sample) of draw i of the sampler's epoch (default: the current one)."""
        if self.blend is None:
            return 0, int(i)
        return self.blend.draw(i, self.sampler.epoch if epoch is None else epoch)

    def micro_batch(self, indices: list[int], epoch: int | None = None) -> StepBatch:
        draws = [self.draw(i, epoch) for i in indices]
        where = indices if self.blend is None else [f"{self.src.prefixes[d]}[{j}]" for d, j in draws]
        return micro_batch(self.src.samples(draws), self.spec, self.src.reference_stats(draws), where)

    def next_step(self) -> list[StepBatch]:
        """This rank's micro-batches of the next optimizer step (each carries its FLOP spans)."""
        epoch = self.sampler.epoch  # a global batch never spans two epochs
        return [self.micro_batch(m, epoch) for m in self.sampler.next_global_batch()]

    @property
    def epoch(self) -> float:
        """Fractional epochs of the training draws consumed so far."""
        s = self.sampler
        return s.epoch + s.step / max(s.steps_per_epoch, 1)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)

    def describe(self) -> str:
        if len(self.datasets) == 1:
            text = f"{len(self.datasets[0])} {self.src.kind} samples"
        else:
            parts = ", ".join(f"{w:.3g} x {p} ({len(ds)})" for w, p, ds in zip(self.src.weights, self.src.prefixes, self.datasets))
            text = f"a blend of {len(self.blend)} {self.src.kind} draws per epoch: {parts}"
        if self.eval is not None:
            text += f"; eval on {self.eval.num_samples} samples"
        return text


class EvalData:
    """The evaluation split: every eval step scores the same samples, the first
    floor(N / global_batch_size) global batches in order, each split over the DP ranks as in
    training, so the reduced metrics do not depend on the DP size."""

    def __init__(self, src: _Sources, draws: list[tuple[int, int]], spec: BatchSpec, dcfg, layout):
        self.src, self.draws, self.spec = src, draws, spec
        g = dcfg.global_batch_size
        if len(draws) < g:
            raise DataConfigError(f"the evaluation split has {len(draws)} samples, fewer than one global batch of {g}; "
                                  "give more evaluation samples or lower data.global_batch_size")
        self.sampler = PairSampler(len(draws), g, dcfg.samples_per_microbatch, dp_size=layout.dp_size,
                                   dp_rank=layout.dp_rank, seed=0, shuffle=False)

    @property
    def num_samples(self) -> int:
        return self.sampler.steps_per_epoch * self.sampler.global_batch_size

    def steps(self):
        """This rank's micro-batches, global batch by global batch."""
        for g in range(self.sampler.steps_per_epoch):
            batches = []
            for m in self.sampler.micro_batches(0, g):
                draws = [self.draws[i] for i in m]
                where = [f"{self.src.prefixes[d]}[{j}]" for d, j in draws]
                batches.append(micro_batch(self.src.samples(draws), self.spec, self.src.reference_stats(draws), where))
            yield batches
