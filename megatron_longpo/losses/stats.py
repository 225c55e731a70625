"""Per-sequence statistics the losses consume, the loss output, and the input checks.

A loss never sees logits or token ids: it sees, for every sample of a micro-batch and
every ROLE it needs (``"chosen"``, ``"ref_chosen"``, ``"long_chosen"``, ...), the SUM of
the response tokens' log-probs and the number of response tokens. That keeps every loss
a pure function, testable without a model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import Tensor

from megatron_longpo.roles import REFERENCE_ROLES, SEQUENCE_SUFFIX, sequence_role  # noqa: F401 (re-exported)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype losses are computed in: float64 stays, everything else becomes float32.

    Sums of 1e4..1e5 token log-probs lose all their fractional digits in bf16/fp16.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SeqStat:
    """Statistics of one role for a micro-batch of B samples.

    logps:  [B] SUM of the response tokens' log-probs of each sample (multi-turn: summed
            over all turns). Any float dtype; losses compute in float32 (float64 kept).
    tokens: [B] number of response tokens (int or float); every entry must be > 0.
    """

    logps: Tensor
    tokens: Tensor

    @property
    def mean(self) -> Tensor:
        """[B] average log-prob per response token (in the compute dtype)."""
        logps = self.logps.to(compute_dtype(self.logps.dtype))
        return logps / self.tokens.to(logps.dtype)

    def promoted(self) -> SeqStat:
        """The same statistics with logps in the compute dtype and tokens in that dtype."""
        dt = compute_dtype(self.logps.dtype)
        return SeqStat(self.logps.to(dt), self.tokens.to(dt))

    def detached(self) -> SeqStat:
        return SeqStat(self.logps.detach(), self.tokens.detach())


@dataclass
class LossOutput:
    """What every loss returns.

    loss:    [B] PER-SAMPLE loss. The trainer sums it over the micro-batch and divides by
             the GLOBAL number of samples in the step, so gradients do not depend on how
             the step is split into micro-batches / data-parallel ranks.
    metrics: name -> [B] detached per-sample values (see docs/losses.md for the names).
    """

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


def check_stats(stats: Mapping[str, SeqStat], roles: tuple[str, ...], method: str) -> None:
    """Raise one clear ValueError if ``stats`` cannot feed ``method``.

    Checks that every role in ``roles`` is present, that logps/tokens are 1-D float/number
    tensors of one batch size shared by all roles, and that every sample has at least
    one response token. Only the token check reads tensor values (one host sync in all).
    """
    missing = [r for r in roles if r not in stats or stats[r] is None]
    if missing:
        need_ref = [r for r in roles if r in REFERENCE_ROLES]
        need_pol = [r for r in roles if r not in REFERENCE_ROLES and not r.endswith(SEQUENCE_SUFFIX)]
        hints = []
        if any(r in REFERENCE_ROLES for r in missing):
            hints.append(
                "reference roles come from the offline reference sidecar: precompute it for "
                f"loss '{method}' (it must hold {', '.join(need_ref)})"
            )
        if any(r.endswith(SEQUENCE_SUFFIX) for r in missing):
            hints.append(
                "whole-sequence roles are computed by the trainer from the data's sequences: pass "
                "the loss's sequence_roles to the batch preparation (training/batch.py)"
            )
        if any(r not in REFERENCE_ROLES and not r.endswith(SEQUENCE_SUFFIX) for r in missing):
            hints.append(
                "policy roles come from the data kind: use a data set that provides "
                f"{', '.join(need_pol)} for loss '{method}'"
            )
        raise ValueError(
            f"loss '{method}' needs statistics for roles {tuple(roles)}; missing: "
            f"{', '.join(repr(r) for r in missing)}. " + "; ".join(hints) + "."
        )

    batch_shape = None
    first_role = None
    for role in roles:
        stat = stats[role]
        if not isinstance(stat, SeqStat):
            raise ValueError(
                f"loss '{method}': role '{role}' must be a SeqStat(logps, tokens), "
                f"got {type(stat).__name__}"
            )
        for name in ("logps", "tokens"):
            t = getattr(stat, name)
            if not isinstance(t, Tensor):
                raise ValueError(
                    f"loss '{method}': role '{role}' {name} must be a torch.Tensor, "
                    f"got {type(t).__name__}"
                )
            if t.dim() != 1:
                raise ValueError(
                    f"loss '{method}': role '{role}' {name} must be a 1-D tensor [B] (one "
                    f"value per sample), got shape {tuple(t.shape)}; sum the token "
                    "log-probs / count the tokens of each sample's response first"
                )
        if not stat.logps.is_floating_point():
            raise ValueError(
                f"loss '{method}': role '{role}' logps must be a float tensor, got "
                f"{stat.logps.dtype}"
            )
        if stat.tokens.shape != stat.logps.shape:
            raise ValueError(
                f"loss '{method}': role '{role}' has logps of shape {tuple(stat.logps.shape)} "
                f"but tokens of shape {tuple(stat.tokens.shape)}; both must be [B]"
            )
        if batch_shape is None:
            batch_shape, first_role = stat.logps.shape, role
        elif stat.logps.shape != batch_shape:
            raise ValueError(
                f"loss '{method}': role '{role}' has batch shape {tuple(stat.logps.shape)} "
                f"but role '{first_role}' has {tuple(batch_shape)}; all roles of one "
                "micro-batch must hold the same B samples in the same order"
            )

    # Token counts: one host sync for all roles together; locate the culprit only on error.
    if not roles or batch_shape.numel() == 0:
        return
    flags = [(stats[r].tokens <= 0).any() for r in roles]
    device = flags[0].device
    if not bool(torch.stack([f.to(device) for f in flags]).any()):
        return
    for role in roles:
        tokens = stats[role].tokens
        bad = (tokens <= 0).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            raise ValueError(
                f"loss '{method}': sample {i} of role '{role}' has no response tokens "
                f"(tokens={tokens[i].item()}); drop samples whose response is empty or "
                "fully truncated when building the data, or raise the length limit"
            )
