"""The loss config and the loss table: one entry per loss says which function computes it, which
statistics (roles) it reads and which hyper-parameters; adding a loss is adding one entry."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from megatron_longpo.roles import (
    CHOSEN,
    LONG_CHOSEN,
    LONG_REJECTED,
    PAIR,
    REF_CHOSEN,
    REF_LONG_CHOSEN,
    REF_LONG_REJECTED,
    REF_REJECTED,
    REJECTED,
    solo_roles,
)

from .long_context import longpo_loss, solo_dpo_loss, solo_orpo_loss, solo_simpo_loss
from .preference import dpo_loss, ipo_loss, nll_loss, orpo_loss, simpo_loss
from .stats import LossOutput, SeqStat, check_stats, sequence_role

LONGPO_NLL_MODES = ("sequence", "responses")


@dataclass(frozen=True)
class LossConfig:
    """Which loss to train with and its hyper-parameters (docs/losses.md).

    name:            one of LOSS_NAMES.
    beta:            β > 0; reward scale of DPO/IPO/SimPO/LongPO and the SoLo-DPO/SimPO rewards
                     (ORPO does not use it).
    label_smoothing: ε in [0, 0.5); only for dpo, longpo (its DPO term), solo-dpo (its PO term).
    simpo_gamma:     SimPO margin γ >= 0 in REWARD units: -log σ(r_w - r_l - γ). (TRL's
                     CPOConfig.simpo_gamma has this meaning too; the SimPO paper reports γ/β.)
    orpo_lambda:     λ >= 0 weighting ORPO's odds-ratio term (orpo, solo-orpo).
    longpo_lambda:   λ >= 0 in L = NLL + λ·DPO (paper: 0.01).
    longpo_nll:      what LongPO's NLL averages over: "sequence" (the paper and its code: every
                     predicted token of the chosen long sequence, document and instructions
                     included) or "responses" (the chosen responses only: an ablation). Only
                     longpo reads it.
    solopo_alpha:    α >= 0 weighting SoLo-RA (paper: 3 for DPO, 1 for SimPO/ORPO on Qwen2.5-7B).
    solopo_both:     also align the rejected response (needs long_rejected); solo-* only.
    """

    name: str = "longpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    longpo_lambda: float = 0.01
    longpo_nll: str = "sequence"
    solopo_alpha: float = 1.0
    solopo_both: bool = False

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            close = difflib.get_close_matches(str(self.name), LOSS_NAMES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(
                f"unknown loss name {self.name!r}{hint}; known loss names: {', '.join(LOSS_NAMES)}"
            )
        for fname in ("beta", "label_smoothing", "simpo_gamma", "orpo_lambda",
                      "longpo_lambda", "solopo_alpha"):
            v = getattr(self, fname)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"loss config: {fname} must be a finite number, got {v!r}")
        if self.beta <= 0:
            raise ValueError(f"loss config: beta must be > 0, got {self.beta}")
        for fname in ("simpo_gamma", "orpo_lambda", "longpo_lambda", "solopo_alpha"):
            if getattr(self, fname) < 0:
                raise ValueError(
                    f"loss config: {fname} must be >= 0, got {getattr(self, fname)}"
                )
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(
                f"loss config: label_smoothing must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.label_smoothing and not LOSSES[self.name].smooths:
            raise ValueError(
                f"loss config: label_smoothing={self.label_smoothing} has no effect on loss "
                f"'{self.name}' (only {', '.join(n for n, e in LOSSES.items() if e.smooths)} use it); set it to 0"
            )
        if self.longpo_nll not in LONGPO_NLL_MODES:
            raise ValueError(
                f"loss config: longpo_nll must be one of {', '.join(LONGPO_NLL_MODES)} (sequence: NLL over "
                f"every token of the chosen long sequence, the paper's LongPO; responses: over the chosen "
                f"responses only), got {self.longpo_nll!r}"
            )
        if not isinstance(self.solopo_both, bool):
            raise ValueError(f"loss config: solopo_both must be true or false, got {self.solopo_both!r}")
        if self.solopo_both and not LOSSES[self.name].solo:
            raise ValueError(
                f"loss config: solopo_both=True only applies to {', '.join(n for n, e in LOSSES.items() if e.solo)}, "
                f"not to loss '{self.name}'; set it to false"
            )


Stats = Mapping[str, SeqStat]


@dataclass(frozen=True)
class LossEntry:
    """One loss of the table.

    compute:   (cfg, stats) -> LossOutput; stats hold every role the entry names (checked once).
    policy:    the policy statistics it reads, in a fixed order.
    reference: the frozen-reference statistics it reads (from the offline sidecar).
    params:    the LossConfig fields it reads. ``label_smoothing`` among them: it supports label
               smoothing; ``solopo_both``: a SoLoPO loss, whose both-responses form adds
               long_rejected (and its reference, where it reads references).
    sequence:  policy roles whose WHOLE-SEQUENCE statistic it reads when cfg.longpo_nll is
               "sequence" (LongPO's paper NLL).
    """

    compute: Callable[[LossConfig, Stats], LossOutput]
    policy: tuple[str, ...]
    reference: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    sequence: tuple[str, ...] = ()

    @property
    def smooths(self) -> bool:
        return "label_smoothing" in self.params

    @property
    def solo(self) -> bool:
        return "solopo_both" in self.params


def _long_rejected(cfg: LossConfig, s: Stats, role: str = LONG_REJECTED) -> SeqStat | None:
    return s[role] if cfg.solopo_both else None


LOSSES: dict[str, LossEntry] = {
    "dpo": LossEntry(
        lambda c, s: dpo_loss(s[CHOSEN], s[REJECTED], s[REF_CHOSEN], s[REF_REJECTED],
                              beta=c.beta, label_smoothing=c.label_smoothing, check=False),
        PAIR, (REF_CHOSEN, REF_REJECTED), ("beta", "label_smoothing")),
    "ipo": LossEntry(
        lambda c, s: ipo_loss(s[CHOSEN], s[REJECTED], s[REF_CHOSEN], s[REF_REJECTED], beta=c.beta, check=False),
        PAIR, (REF_CHOSEN, REF_REJECTED), ("beta",)),
    "simpo": LossEntry(
        lambda c, s: simpo_loss(s[CHOSEN], s[REJECTED], beta=c.beta, gamma=c.simpo_gamma, check=False),
        PAIR, (), ("beta", "simpo_gamma")),
    "orpo": LossEntry(
        lambda c, s: orpo_loss(s[CHOSEN], s[REJECTED], lam=c.orpo_lambda, check=False),
        PAIR, (), ("orpo_lambda",)),
    "sft": LossEntry(lambda c, s: nll_loss(s[CHOSEN], check=False), (CHOSEN,)),
    "longpo": LossEntry(
        lambda c, s: longpo_loss(
            s[CHOSEN], s[REJECTED], s[REF_CHOSEN], s[REF_REJECTED], beta=c.beta, lam=c.longpo_lambda,
            label_smoothing=c.label_smoothing,
            chosen_sequence=s[sequence_role(CHOSEN)] if c.longpo_nll == "sequence" else None, check=False),
        PAIR, (REF_CHOSEN, REF_REJECTED), ("beta", "longpo_lambda", "label_smoothing", "longpo_nll"), (CHOSEN,)),
    "solo-dpo": LossEntry(
        lambda c, s: solo_dpo_loss(
            s[CHOSEN], s[REJECTED], s[LONG_CHOSEN], s[REF_CHOSEN], s[REF_REJECTED], s[REF_LONG_CHOSEN],
            beta=c.beta, alpha=c.solopo_alpha, label_smoothing=c.label_smoothing,
            long_rejected=_long_rejected(c, s), ref_long_rejected=_long_rejected(c, s, REF_LONG_REJECTED),
            check=False),
        solo_roles(False), solo_roles(False, reference=True),
        ("beta", "solopo_alpha", "label_smoothing", "solopo_both")),
    "solo-simpo": LossEntry(
        lambda c, s: solo_simpo_loss(s[CHOSEN], s[REJECTED], s[LONG_CHOSEN], beta=c.beta, gamma=c.simpo_gamma,
                                     alpha=c.solopo_alpha, long_rejected=_long_rejected(c, s), check=False),
        solo_roles(False), (), ("beta", "simpo_gamma", "solopo_alpha", "solopo_both")),
    "solo-orpo": LossEntry(
        lambda c, s: solo_orpo_loss(s[CHOSEN], s[REJECTED], s[LONG_CHOSEN], lam=c.orpo_lambda,
                                    alpha=c.solopo_alpha, long_rejected=_long_rejected(c, s), check=False),
        solo_roles(False), (), ("orpo_lambda", "solopo_alpha", "solopo_both")),
}
LOSS_NAMES = tuple(LOSSES)


def policy_roles(cfg: LossConfig) -> tuple[str, ...]:
    """The policy statistics ``cfg``'s loss needs, in a fixed order."""
    e = LOSSES[cfg.name]
    return e.policy + ((LONG_REJECTED,) if e.solo and cfg.solopo_both else ())


def sequence_roles(cfg: LossConfig) -> tuple[str, ...]:
    """The policy roles whose WHOLE-SEQUENCE statistic (every predicted token, not only the
    responses; named ``sequence_role(role)``) ``cfg``'s loss needs besides the response sums."""
    return LOSSES[cfg.name].sequence if cfg.longpo_nll == "sequence" else ()


def required_roles(cfg: LossConfig) -> tuple[str, ...]:
    """Every statistic ``compute_loss`` reads: policy, whole-sequence and reference roles."""
    return policy_roles(cfg) + tuple(sequence_role(r) for r in sequence_roles(cfg)) + reference_roles(cfg)


def reference_roles(cfg: LossConfig) -> tuple[str, ...]:
    """The frozen-reference statistics (from the offline sidecar) ``cfg``'s loss needs."""
    e = LOSSES[cfg.name]
    return e.reference + ((REF_LONG_REJECTED,) if e.solo and e.reference and cfg.solopo_both else ())


def compute_loss(cfg: LossConfig, stats: Stats) -> LossOutput:
    """Check ``stats`` once, then compute ``cfg``'s loss: [B] per-sample loss + metrics."""
    check_stats(stats, required_roles(cfg), cfg.name)
    return LOSSES[cfg.name].compute(cfg, stats)
