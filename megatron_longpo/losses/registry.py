"""The loss config, which statistics each loss needs, and the one dispatch entry point."""
from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Mapping

from .long_context import longpo_loss, solo_dpo_loss, solo_orpo_loss, solo_simpo_loss
from .preference import dpo_loss, ipo_loss, nll_loss, orpo_loss, simpo_loss
from .stats import LossOutput, SeqStat, check_stats, sequence_role

LOSS_NAMES = (
    "dpo", "ipo", "simpo", "orpo", "sft", "longpo", "solo-dpo", "solo-simpo", "solo-orpo",
)
_SOLO = ("solo-dpo", "solo-simpo", "solo-orpo")
_WITH_LABEL_SMOOTHING = ("dpo", "longpo", "solo-dpo")
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
        if self.label_smoothing and self.name not in _WITH_LABEL_SMOOTHING:
            raise ValueError(
                f"loss config: label_smoothing={self.label_smoothing} has no effect on loss "
                f"'{self.name}' (only {', '.join(_WITH_LABEL_SMOOTHING)} use it); set it to 0"
            )
        if self.longpo_nll not in LONGPO_NLL_MODES:
            raise ValueError(
                f"loss config: longpo_nll must be one of {', '.join(LONGPO_NLL_MODES)} (sequence: NLL over "
                f"every token of the chosen long sequence, the paper's LongPO; responses: over the chosen "
                f"responses only), got {self.longpo_nll!r}"
            )
        if not isinstance(self.solopo_both, bool):
            raise ValueError(f"loss config: solopo_both must be true or false, got {self.solopo_both!r}")
        if self.solopo_both and self.name not in _SOLO:
            raise ValueError(
                f"loss config: solopo_both=True only applies to {', '.join(_SOLO)}, "
                f"not to loss '{self.name}'; set it to false"
            )


def policy_roles(cfg: LossConfig) -> tuple[str, ...]:
    """The policy statistics ``cfg``'s loss needs, in a fixed order."""
    if cfg.name == "sft":
        return ("chosen",)
    if cfg.name in _SOLO:
        return ("chosen", "rejected", "long_chosen") + (("long_rejected",) if cfg.solopo_both else ())
    return ("chosen", "rejected")


def sequence_roles(cfg: LossConfig) -> tuple[str, ...]:
    """The policy roles whose WHOLE-SEQUENCE statistic (every predicted token, not only the
    responses; named ``sequence_role(role)``) ``cfg``'s loss needs besides the response sums."""
    if cfg.name == "longpo" and cfg.longpo_nll == "sequence":
        return ("chosen",)
    return ()


def required_roles(cfg: LossConfig) -> tuple[str, ...]:
    """Every statistic ``compute_loss`` reads: policy, whole-sequence and reference roles."""
    return policy_roles(cfg) + tuple(sequence_role(r) for r in sequence_roles(cfg)) + reference_roles(cfg)


def reference_roles(cfg: LossConfig) -> tuple[str, ...]:
    """The frozen-reference statistics (from the offline sidecar) ``cfg``'s loss needs."""
    if cfg.name in ("dpo", "ipo", "longpo"):
        return ("ref_chosen", "ref_rejected")
    if cfg.name == "solo-dpo":
        return ("ref_chosen", "ref_rejected", "ref_long_chosen") + (
            ("ref_long_rejected",) if cfg.solopo_both else ()
        )
    return ()


def compute_loss(cfg: LossConfig, stats: Mapping[str, SeqStat]) -> LossOutput:
    """Check ``stats`` once, then compute ``cfg``'s loss: [B] per-sample loss + metrics."""
    check_stats(stats, required_roles(cfg), cfg.name)
    s = stats
    n = cfg.name
    if n == "dpo":
        return dpo_loss(s["chosen"], s["rejected"], s["ref_chosen"], s["ref_rejected"],
                        beta=cfg.beta, label_smoothing=cfg.label_smoothing, check=False)
    if n == "ipo":
        return ipo_loss(s["chosen"], s["rejected"], s["ref_chosen"], s["ref_rejected"],
                        beta=cfg.beta, check=False)
    if n == "simpo":
        return simpo_loss(s["chosen"], s["rejected"], beta=cfg.beta, gamma=cfg.simpo_gamma,
                          check=False)
    if n == "orpo":
        return orpo_loss(s["chosen"], s["rejected"], lam=cfg.orpo_lambda, check=False)
    if n == "sft":
        return nll_loss(s["chosen"], check=False)
    if n == "longpo":
        return longpo_loss(s["chosen"], s["rejected"], s["ref_chosen"], s["ref_rejected"],
                           beta=cfg.beta, lam=cfg.longpo_lambda,
                           label_smoothing=cfg.label_smoothing,
                           chosen_sequence=s["chosen_sequence"] if cfg.longpo_nll == "sequence" else None,
                           check=False)
    long_rejected = s["long_rejected"] if cfg.solopo_both else None
    if n == "solo-dpo":
        return solo_dpo_loss(
            s["chosen"], s["rejected"], s["long_chosen"],
            s["ref_chosen"], s["ref_rejected"], s["ref_long_chosen"],
            beta=cfg.beta, alpha=cfg.solopo_alpha, label_smoothing=cfg.label_smoothing,
            long_rejected=long_rejected,
            ref_long_rejected=s["ref_long_rejected"] if cfg.solopo_both else None,
            check=False,
        )
    if n == "solo-simpo":
        return solo_simpo_loss(s["chosen"], s["rejected"], s["long_chosen"],
                               beta=cfg.beta, gamma=cfg.simpo_gamma, alpha=cfg.solopo_alpha,
                               long_rejected=long_rejected, check=False)
    if n == "solo-orpo":
        return solo_orpo_loss(s["chosen"], s["rejected"], s["long_chosen"],
                              lam=cfg.orpo_lambda, alpha=cfg.solopo_alpha,
                              long_rejected=long_rejected, check=False)
    raise AssertionError(f"unhandled loss name {n!r}")  # LossConfig validated the name
