"""Deterministic, resumable, data-parallel-sharded order of samples.

Epoch e is the permutation `default_rng(SeedSequence([seed, e])).permutation(N)` (or 0..N-1
without shuffling). Global batch g of an epoch is the fixed slice `perm[g*G:(g+1)*G]`; it is
split evenly over the DP ranks (rank r takes the r-th contiguous G/DP), and each rank's part
into micro-batches of `micro_batch_size`. So the union over ranks and micro-batches of one
global batch is the same set of samples whatever the DP size, and DP=2 sees exactly what DP=1
sees. The incomplete last global batch of an epoch is dropped (the next epoch reshuffles).

`state_dict()` is the position of the next micro-batch; `load_state_dict()` resumes there.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

STATE_VERSION = 1


class PairSampler:
    """Yields this DP rank's micro-batches (lists of dataset indices), epoch after epoch."""

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int = 1,
        dp_size: int = 1,
        dp_rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        for name, v in (("num_samples", num_samples), ("global_batch_size", global_batch_size),
                        ("micro_batch_size", micro_batch_size), ("dp_size", dp_size)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global batch {global_batch_size} is not divisible by micro_batch_size {micro_batch_size} x "
                f"data-parallel size {dp_size} = {micro_batch_size * dp_size}; choose a global batch that is a "
                f"multiple of {micro_batch_size * dp_size}"
            )
        if num_samples < global_batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, fewer than one global batch of {global_batch_size}; "
                "lower the global batch size"
            )
        self.num_samples = int(num_samples)
        self.global_batch_size = int(global_batch_size)
        self.micro_batch_size = int(micro_batch_size)
        self.dp_size = int(dp_size)
        self.dp_rank = int(dp_rank)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.epoch = 0
        self.step = 0  # global batch within the epoch
        self.micro = 0  # next micro-batch within the global batch (this rank)
        self._perm_epoch: int | None = None
        self._perm: np.ndarray | None = None

    # -- geometry ---------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches per global batch on each rank."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def __len__(self) -> int:
        """Micro-batches per epoch on this rank."""
        return self.steps_per_epoch * self.num_micro_batches

    @property
    def consumed_samples(self) -> int:
        """Samples of fully finished global batches, over all ranks and epochs."""
        return (self.epoch * self.steps_per_epoch + self.step) * self.global_batch_size

    # -- order ------------------------------------------------------------------------------
    def epoch_permutation(self, epoch: int) -> np.ndarray:
        if self._perm_epoch != epoch:
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
                self._perm = rng.permutation(self.num_samples)
            else:
                self._perm = np.arange(self.num_samples)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, epoch: int, step: int) -> np.ndarray:
        """All samples of global batch `step` of `epoch` (every rank's part, rank order)."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"global batch {step} out of range: an epoch has {self.steps_per_epoch}")
        g = self.global_batch_size
        return self.epoch_permutation(epoch)[step * g : (step + 1) * g]

    def micro_batches(self, epoch: int, step: int) -> list[list[int]]:
        """This rank's micro-batches of global batch `step` of `epoch`."""
        per_rank = self.global_batch_size // self.dp_size
        mine = self.global_batch(epoch, step)[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        m = self.micro_batch_size
        return [mine[i : i + m].tolist() for i in range(0, per_rank, m)]

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_micro_batch()

    def next_micro_batch(self) -> list[int]:
        batch = self.micro_batches(self.epoch, self.step)[self.micro]
        self.micro += 1
        if self.micro == self.num_micro_batches:
            self.micro = 0
            self.step += 1
            if self.step == self.steps_per_epoch:
                self.step = 0
                self.epoch += 1
        return batch

    def next_global_batch(self) -> list[list[int]]:
        """The rest of the current global batch's micro-batches for this rank (all of them at a
        step boundary)."""
        out = [self.next_micro_batch()]
        while self.micro != 0:
            out.append(self.next_micro_batch())
        return out

    # -- resumption -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "global_batch_size": self.global_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "dp_size": self.dp_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "epoch": self.epoch,
            "step": self.step,
            "micro": self.micro,
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume at the saved position. The order must be the same (dataset size, global batch,
        seed, shuffling); DP size and micro-batch size may change at a global-batch boundary."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        for key in ("num_samples", "global_batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the checkpoint's sampler has {key}={state[key]!r}, this run {getattr(self, key)!r}; "
                    f"resume with the same {key} (the sample order depends on it) or start a new run"
                )
        if state["micro"] and (state["dp_size"], state["micro_batch_size"]) != (self.dp_size, self.micro_batch_size):
            raise ValueError(
                "cannot resume in the middle of a global batch with another data-parallel or micro-batch size "
                f"(saved dp={state['dp_size']} mbs={state['micro_batch_size']}, now dp={self.dp_size} "
                f"mbs={self.micro_batch_size}); resume with the saved sizes"
            )
        if not 0 <= state["step"] < self.steps_per_epoch:
            raise ValueError(f"saved step {state['step']} is outside an epoch of {self.steps_per_epoch} global batches")
        self.epoch, self.step, self.micro = int(state["epoch"]), int(state["step"]), int(state["micro"])
