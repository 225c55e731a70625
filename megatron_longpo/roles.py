"""Role names: the one place they are spelled.

A ROLE names one sequence statistic of a sample: the policy's log-probs of the chosen response
(``chosen``), of the rejected one (``rejected``), SoLoPO's long-context pair (``long_chosen``,
``long_rejected``), and the frozen reference's of each (``ref_`` + the role). The data layer stores
the sequences under these names and the losses read their statistics under them.
"""
from __future__ import annotations

CHOSEN = "chosen"
REJECTED = "rejected"
LONG_CHOSEN = "long_chosen"
LONG_REJECTED = "long_rejected"

#: Prefix of a reference role: ``ref_chosen`` is the frozen reference's statistic of ``chosen``.
REF_PREFIX = "ref_"


def ref(role: str) -> str:
    """The reference role of a policy role ("chosen" -> "ref_chosen")."""
    return REF_PREFIX + role


def is_reference(role: str) -> bool:
    return role.startswith(REF_PREFIX)


REF_CHOSEN, REF_REJECTED = ref(CHOSEN), ref(REJECTED)
REF_LONG_CHOSEN, REF_LONG_REJECTED = ref(LONG_CHOSEN), ref(LONG_REJECTED)

#: Roles computed by the frozen reference (precomputed offline into the reference sidecar).
REFERENCE_ROLES = (REF_CHOSEN, REF_REJECTED, REF_LONG_CHOSEN, REF_LONG_REJECTED)

#: Suffix of a WHOLE-SEQUENCE statistic: ``"chosen_sequence"`` is the sum of the log-probs of
#: every predicted token of the chosen sequence (document, instructions, chat template and
#: responses; padding excluded) and their count, where ``"chosen"`` has the responses only.
SEQUENCE_SUFFIX = "_sequence"


def sequence_role(role: str) -> str:
    """The name of `role`'s whole-sequence statistic ("chosen" -> "chosen_sequence")."""
    return role + SEQUENCE_SUFFIX


#: A preference pair.
PAIR = (CHOSEN, REJECTED)


def solo_roles(both: bool, reference: bool = False) -> tuple[str, ...]:
    """SoLoPO's policy roles (the pair on the short context x_S, ``long_chosen`` on x_L, and
    ``long_rejected`` in the both-responses form), or with ``reference`` their reference roles."""
    roles = PAIR + (LONG_CHOSEN,) + ((LONG_REJECTED,) if both else ())
    return tuple(ref(r) for r in roles) if reference else roles
