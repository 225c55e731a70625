"""Pure loss functions on per-sequence log-prob statistics (docs/losses.md).

Entry points: ``LossConfig``, ``LOSSES`` (the loss table), ``policy_roles``, ``sequence_roles``, ``reference_roles``,
``compute_loss``.
"""
from .long_context import longpo_loss, solo_dpo_loss, solo_orpo_loss, solo_simpo_loss
from .preference import (
    dpo_loss,
    dpo_reward,
    ipo_loss,
    log1mexp,
    nll_loss,
    orpo_log_odds,
    orpo_loss,
    simpo_loss,
    simpo_reward,
)
from .registry import (
    LONGPO_NLL_MODES,
    LOSS_NAMES,
    LOSSES,
    LossConfig,
    compute_loss,
    policy_roles,
    reference_roles,
    required_roles,
    sequence_roles,
)
from .stats import REFERENCE_ROLES, LossOutput, SeqStat, check_stats, sequence_role

__all__ = [
    "LONGPO_NLL_MODES",
    "LOSS_NAMES",
    "LOSSES",
    "REFERENCE_ROLES",
    "LossConfig",
    "LossOutput",
    "SeqStat",
    "check_stats",
    "compute_loss",
    "dpo_loss",
    "dpo_reward",
    "ipo_loss",
    "log1mexp",
    "longpo_loss",
    "nll_loss",
    "orpo_log_odds",
    "orpo_loss",
    "policy_roles",
    "reference_roles",
    "required_roles",
    "simpo_loss",
    "sequence_role",
    "sequence_roles",
    "simpo_reward",
    "solo_dpo_loss",
    "solo_orpo_loss",
    "solo_simpo_loss",
]
