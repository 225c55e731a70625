"""Pure preference losses on per-sequence statistics: DPO, IPO, SimPO, ORPO, NLL (SFT).

Every function takes ``SeqStat``s and floats and returns a ``LossOutput`` whose ``loss`` is
[B] per sample. Formulas: docs/methods.md §1 (docs/losses.md repeats them).
Reference statistics are treated as constants (detached).

``check=True`` validates the inputs (see ``stats.check_stats``); ``compute_loss`` validates
once and passes ``check=False``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_longpo.roles import CHOSEN, PAIR, REF_CHOSEN, REF_REJECTED

from .stats import LossOutput, SeqStat, check_stats

_LN2 = math.log(2.0)
# Largest average log-prob ORPO's log odds accepts: log(1 - exp(p)) is -inf at p = 0.
_ORPO_MAX_AVG_LOGP = -1e-12


# ---------------------------------------------------------------------------------------
# rewards and numerics shared with the long-context losses
# ---------------------------------------------------------------------------------------
def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable over the whole range (Maechler's two branches).

    Near 0 use log(-expm1(x)); below -ln2 use log1p(-exp(x)). Both branches are fed only
    inputs where they are finite, so ``torch.where`` gives no NaN gradient.
    """
    near_zero = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -_LN2))))
    b = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -_LN2), x)))
    return torch.where(near_zero, a, b)


def orpo_log_odds(stat: SeqStat) -> Tensor:
    """[B] log odds(y|x) = p̄ - log(1 - exp(p̄)), p̄ the AVERAGE response log-prob."""
    p = stat.mean
    # p̄ is an average of log-probs, each <= 0, so p̄ < 0 for any non-degenerate model; a
    # p̄ >= 0 only comes from rounding (a float32 log_softmax can return exactly 0 for a
    # very confident token). Clamp it to a tiny negative so the log odds stay finite
    # (-1e-12 - log(1e-12) ≈ 27.6 at the clamp) instead of +inf / NaN.
    p = p.clamp(max=_ORPO_MAX_AVG_LOGP)
    return p - log1mexp(p)


def dpo_reward(policy: SeqStat, ref: SeqStat, beta: float) -> Tensor:
    """[B] r = β (log π_θ(y|x) - log π_ref(y|x)) with SUMMED log-probs."""
    return beta * (policy.promoted().logps - ref.promoted().logps.detach())


def simpo_reward(policy: SeqStat, beta: float) -> Tensor:
    """[B] r = (β/|y|) log π_θ(y|x)."""
    return beta * policy.mean


def nll(stat: SeqStat) -> Tensor:
    """[B] mean token NLL = -logps / tokens."""
    return -stat.mean


def _accuracy(r_w: Tensor, r_l: Tensor) -> Tensor:
    return (r_w > r_l).to(r_w.dtype)


def pair_metrics(chosen: SeqStat, rejected: SeqStat, r_w: Tensor, r_l: Tensor) -> dict[str, Tensor]:
    """The metrics every preference loss logs, detached, each [B]."""
    r_w, r_l = r_w.detach(), r_l.detach()
    return {
        "rewards/chosen": r_w,
        "rewards/rejected": r_l,
        "rewards/margins": r_w - r_l,
        "rewards/accuracies": _accuracy(r_w, r_l),
        "logps/chosen": chosen.mean.detach(),
        "logps/rejected": rejected.mean.detach(),
    }


def _smoothed_sigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """-(1-ε) log σ(z) - ε log σ(-z)."""
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------
def dpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    ref_chosen: SeqStat,
    ref_rejected: SeqStat,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    check: bool = True,
) -> LossOutput:
    """DPO (sigmoid): -(1-ε) log σ(r_w - r_l) - ε log σ(r_l - r_w), r = β(log π_θ - log π_ref)."""
    if check:
        check_stats(
            dict(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected),
            PAIR + (REF_CHOSEN, REF_REJECTED),
            "dpo",
        )
    r_w = dpo_reward(chosen, ref_chosen, beta)
    r_l = dpo_reward(rejected, ref_rejected, beta)
    loss = _smoothed_sigmoid_loss(r_w - r_l, label_smoothing)
    metrics = pair_metrics(chosen, rejected, r_w, r_l)
    metrics["loss/dpo"] = loss.detach()
    return LossOutput(loss, metrics)


def ipo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    ref_chosen: SeqStat,
    ref_rejected: SeqStat,
    *,
    beta: float,
    check: bool = True,
) -> LossOutput:
    """IPO: (Δ - 1/(2β))², Δ from AVERAGE log-probs. Rewards logged: β × average log-ratio."""
    if check:
        check_stats(
            dict(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected),
            PAIR + (REF_CHOSEN, REF_REJECTED),
            "ipo",
        )
    ratio_w = chosen.mean - ref_chosen.mean.detach()
    ratio_l = rejected.mean - ref_rejected.mean.detach()
    loss = (ratio_w - ratio_l - 1.0 / (2.0 * beta)) ** 2
    metrics = pair_metrics(chosen, rejected, beta * ratio_w, beta * ratio_l)
    metrics["loss/ipo"] = loss.detach()
    return LossOutput(loss, metrics)


def simpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    *,
    beta: float,
    gamma: float,
    check: bool = True,
) -> LossOutput:
    """SimPO: -log σ(r_w - r_l - γ), r = (β/|y|) log π_θ(y|x); γ is the margin in reward units."""
    if check:
        check_stats(dict(chosen=chosen, rejected=rejected), PAIR, "simpo")
    r_w = simpo_reward(chosen, beta)
    r_l = simpo_reward(rejected, beta)
    loss = -F.logsigmoid(r_w - r_l - gamma)
    metrics = pair_metrics(chosen, rejected, r_w, r_l)
    metrics["loss/simpo"] = loss.detach()
    return LossOutput(loss, metrics)


def orpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    *,
    lam: float,
    check: bool = True,
) -> LossOutput:
    """ORPO: NLL(y_w|x) - λ log σ(log odds(y_w|x) - log odds(y_l|x)). Rewards: the log odds."""
    if check:
        check_stats(dict(chosen=chosen, rejected=rejected), PAIR, "orpo")
    lo_w = orpo_log_odds(chosen)
    lo_l = orpo_log_odds(rejected)
    or_loss = -F.logsigmoid(lo_w - lo_l)
    nll_w = nll(chosen)
    loss = nll_w + lam * or_loss
    metrics = pair_metrics(chosen, rejected, lo_w, lo_l)
    metrics["nll_loss"] = nll_w.detach()
    metrics["loss/or"] = or_loss.detach()
    return LossOutput(loss, metrics)


def nll_loss(chosen: SeqStat, *, check: bool = True) -> LossOutput:
    """SFT: mean token NLL of the chosen response."""
    if check:
        check_stats(dict(chosen=chosen), (CHOSEN,), "sft")
    loss = nll(chosen)
    return LossOutput(loss, {"logps/chosen": chosen.mean.detach(), "nll_loss": loss.detach()})
