"""Pure long-context losses built on the preference losses: LongPO and SoLoPO.

LongPO (docs/methods.md §2): L = NLL(chosen long sequence) + λ · DPO(chosen, rejected, ref_chosen,
ref_rejected) where the policy roles are on the LONG context (multi-turn sums) and the reference
roles on the SHORT contexts; the data layer arranges that, the formula is plain DPO + NLL. The
NLL is the mean over EVERY predicted token of the chosen long sequence (``chosen_sequence``:
document, instructions, template, responses), as the paper and its reference code; given only
``chosen`` it is over the chosen responses (the ``longpo_nll: responses`` ablation).

SoLoPO (docs/methods.md §3): L = L_PO(x_S, y_w, y_l) + α · |r(x_S, y_w) - r(x_L, y_w)|
(+ α · |r(x_S, y_l) - r(x_L, y_l)| in the "both responses" form), r the PO method's reward.
"chosen"/"rejected" are the policy on x_S, "long_chosen"/"long_rejected" on x_L.
"""
from __future__ import annotations

from torch import Tensor

from megatron_longpo.roles import CHOSEN, PAIR, REF_CHOSEN, REF_REJECTED, sequence_role, solo_roles

from .preference import (
    dpo_loss,
    dpo_reward,
    nll,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
    simpo_reward,
)
from .stats import LossOutput, SeqStat, check_stats


def longpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    ref_chosen: SeqStat,
    ref_rejected: SeqStat,
    *,
    beta: float,
    lam: float,
    label_smoothing: float = 0.0,
    chosen_sequence: SeqStat | None = None,
    check: bool = True,
) -> LossOutput:
    """LongPO: NLL + λ · DPO, r(x_L, y) = β log π_θ(y|x_L) / π_ref(y|x_S) (response sums).

    The NLL is the per-sample mean token NLL of ``chosen_sequence`` (every predicted token of
    the chosen long sequence) when given, else of the ``chosen`` responses.
    """
    if check:
        roles = PAIR + (REF_CHOSEN, REF_REJECTED) + ((sequence_role(CHOSEN),) if chosen_sequence is not None else ())
        check_stats(
            dict(chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                 chosen_sequence=chosen_sequence),
            roles,
            "longpo",
        )
    po = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected,
        beta=beta, label_smoothing=label_smoothing, check=False,
    )
    nll_w = nll(chosen if chosen_sequence is None else chosen_sequence)
    metrics = dict(po.metrics)
    metrics["nll_loss"] = nll_w.detach()
    if chosen_sequence is not None:
        metrics["logps/chosen_sequence"] = chosen_sequence.mean.detach()
    return LossOutput(nll_w + lam * po.loss, metrics)


def _with_solo_ra(
    po: LossOutput,
    alpha: float,
    r_short_w: Tensor,
    r_long_w: Tensor,
    long_chosen: SeqStat,
    r_short_l: Tensor | None = None,
    r_long_l: Tensor | None = None,
    long_rejected: SeqStat | None = None,
) -> LossOutput:
    """Add α · SoLo-RA to a short-context PO loss and log the long-context side."""
    ra_w = (r_short_w - r_long_w).abs()
    ra = ra_w
    metrics = dict(po.metrics)
    metrics["loss/po"] = po.loss.detach()
    metrics["loss/solo_ra_chosen"] = ra_w.detach()
    metrics["rewards/long_chosen"] = r_long_w.detach()
    metrics["logps/long_chosen"] = long_chosen.mean.detach()
    if r_short_l is not None:
        ra_l = (r_short_l - r_long_l).abs()
        ra = ra_w + ra_l
        metrics["loss/solo_ra_rejected"] = ra_l.detach()
        metrics["rewards/long_rejected"] = r_long_l.detach()
        metrics["logps/long_rejected"] = long_rejected.mean.detach()
    metrics["loss/solo_ra"] = ra.detach()
    return LossOutput(po.loss + alpha * ra, metrics)


def solo_dpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    long_chosen: SeqStat,
    ref_chosen: SeqStat,
    ref_rejected: SeqStat,
    ref_long_chosen: SeqStat,
    *,
    beta: float,
    alpha: float,
    label_smoothing: float = 0.0,
    long_rejected: SeqStat | None = None,
    ref_long_rejected: SeqStat | None = None,
    check: bool = True,
) -> LossOutput:
    """SoLo-DPO: DPO on x_S + α|r(x_S,y_w) - r(x_L,y_w)|, r = β(log π_θ - log π_ref) (sums).

    Passing ``long_rejected`` selects the "both responses" form (then ``ref_long_rejected``
    is required too).
    """
    both = long_rejected is not None
    if check:
        check_stats(
            dict(chosen=chosen, rejected=rejected, long_chosen=long_chosen,
                 long_rejected=long_rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
                 ref_long_chosen=ref_long_chosen, ref_long_rejected=ref_long_rejected),
            solo_roles(both) + solo_roles(both, reference=True),
            "solo-dpo",
        )
    po = dpo_loss(
        chosen, rejected, ref_chosen, ref_rejected,
        beta=beta, label_smoothing=label_smoothing, check=False,
    )
    r_short_w = dpo_reward(chosen, ref_chosen, beta)  # with grad (po.metrics are detached)
    r_long_w = dpo_reward(long_chosen, ref_long_chosen, beta)
    if not both:
        return _with_solo_ra(po, alpha, r_short_w, r_long_w, long_chosen)
    return _with_solo_ra(
        po, alpha, r_short_w, r_long_w, long_chosen,
        dpo_reward(rejected, ref_rejected, beta),
        dpo_reward(long_rejected, ref_long_rejected, beta),
        long_rejected,
    )


def solo_simpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    long_chosen: SeqStat,
    *,
    beta: float,
    gamma: float,
    alpha: float,
    long_rejected: SeqStat | None = None,
    check: bool = True,
) -> LossOutput:
    """SoLo-SimPO: SimPO on x_S (margin γ) + α|r(x_S,y_w) - r(x_L,y_w)|, r = (β/|y|) log π_θ."""
    both = long_rejected is not None
    if check:
        check_stats(
            dict(chosen=chosen, rejected=rejected, long_chosen=long_chosen,
                 long_rejected=long_rejected),
            solo_roles(both),
            "solo-simpo",
        )
    po = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, check=False)
    r_short_w = simpo_reward(chosen, beta)
    r_long_w = simpo_reward(long_chosen, beta)
    if not both:
        return _with_solo_ra(po, alpha, r_short_w, r_long_w, long_chosen)
    return _with_solo_ra(
        po, alpha, r_short_w, r_long_w, long_chosen,
        simpo_reward(rejected, beta), simpo_reward(long_rejected, beta), long_rejected,
    )


def solo_orpo_loss(
    chosen: SeqStat,
    rejected: SeqStat,
    long_chosen: SeqStat,
    *,
    lam: float,
    alpha: float,
    long_rejected: SeqStat | None = None,
    check: bool = True,
) -> LossOutput:
    """SoLo-ORPO: ORPO on x_S (NLL + λ·OR) + α|log odds(y_w|x_S) - log odds(y_w|x_L)|."""
    both = long_rejected is not None
    if check:
        check_stats(
            dict(chosen=chosen, rejected=rejected, long_chosen=long_chosen,
                 long_rejected=long_rejected),
            solo_roles(both),
            "solo-orpo",
        )
    po = orpo_loss(chosen, rejected, lam=lam, check=False)
    r_short_w = orpo_log_odds(chosen)
    r_long_w = orpo_log_odds(long_chosen)
    if not both:
        return _with_solo_ra(po, alpha, r_short_w, r_long_w, long_chosen)
    return _with_solo_ra(
        po, alpha, r_short_w, r_long_w, long_chosen,
        orpo_log_odds(rejected), orpo_log_odds(long_rejected), long_rejected,
    )
