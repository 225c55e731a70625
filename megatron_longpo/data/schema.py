"""The schema of a preprocessed preference example: typed token segments, the role sequences
assembled from them, and the kinds of dataset (data/format.py stores them in files).

Segment layouts (one document; `*` = repeated, n = number of turns):

    pair    PROMPT CHOSEN REJECTED TAIL
    longpo  LONG_PROMPT CHOSEN REJECTED (TURN CHOSEN REJECTED)* TAIL SHORT_PROMPT{n}
    solopo  SHORT_PROMPT LONG_PROMPT CHOSEN REJECTED TAIL

A prompt segment ends right after the assistant header (the generation prompt); a response
segment holds the response tokens plus the chat template's end-of-turn token after them; TURN
holds what lies between one response's end-of-turn token and the next response (the next user
turn and assistant header); TAIL what follows the last end-of-turn token (e.g. ChatML's "\\n").
Segment boundaries are token boundaries of the whole-conversation tokenization (preprocessing
checks this), so concatenating segments gives exactly the chat template's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Iterable

import numpy as np

from megatron_longpo.roles import (
    CHOSEN, LONG_CHOSEN, LONG_REJECTED, PAIR, REF_CHOSEN, REF_REJECTED, REJECTED, is_reference, ref, solo_roles,
)

KINDS = ("pair", "longpo", "solopo")


class Seg(IntEnum):
    """Segment type = the item's mode byte in the IndexedDataset."""

    PROMPT = 1
    LONG_PROMPT = 2
    SHORT_PROMPT = 3
    CHOSEN = 4
    REJECTED = 5
    TURN = 6
    TAIL = 7


RESPONSE_SEGMENTS = frozenset({Seg.CHOSEN, Seg.REJECTED})

ROLES: dict[str, tuple[str, ...]] = {
    "pair": PAIR + (REF_CHOSEN, REF_REJECTED),
    "longpo": PAIR + (REF_CHOSEN, REF_REJECTED),
    "solopo": solo_roles(True) + solo_roles(True, reference=True),
}
REF_ROLES: dict[str, tuple[str, ...]] = {k: tuple(r for r in v if is_reference(r)) for k, v in ROLES.items()}

# The roles whose sequences are computed independently at preprocessing time (the others are
# the same sequences under another name, e.g. pair's ref_chosen = chosen).
PRIMARY_ROLES: dict[str, tuple[str, ...]] = {
    "pair": PAIR,
    "longpo": PAIR + (REF_CHOSEN, REF_REJECTED),
    "solopo": solo_roles(True),
}
ALIASES: dict[str, dict[str, str]] = {
    "pair": {REF_CHOSEN: CHOSEN, REF_REJECTED: REJECTED},
    "longpo": {},
    "solopo": {ref(r): r for r in solo_roles(True)},
}


class FormatError(ValueError):
    """A dataset file is missing, inconsistent or of another version (the message names the fix)."""


def check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; choose one of {', '.join(KINDS)}")
    return kind


def check_role(kind: str, role: str) -> None:
    if role not in ROLES[check_kind(kind)]:
        raise ValueError(f"a {kind!r} sample has no role {role!r}; its roles are {', '.join(ROLES[kind])}")


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sequence:
    """One token sequence; `loss_mask[t]` is True iff token t is a scored response token
    (predicted from position t-1): the response tokens and the end-of-turn token after them."""

    tokens: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass(frozen=True)
class Segment:
    type: Seg
    tokens: np.ndarray


def _cat(segments: Iterable[Segment]) -> Sequence:
    segs = list(segments)
    tokens = np.concatenate([s.tokens for s in segs]).astype(np.int64, copy=False) if segs else np.zeros(0, np.int64)
    mask = np.concatenate([np.full(len(s.tokens), s.type in RESPONSE_SEGMENTS, dtype=bool) for s in segs])
    return Sequence(tokens, mask)


@dataclass(frozen=True)
class _Parsed:
    """Named view of one document's segments."""

    long_prompt: Segment | None
    short_prompts: list[Segment]
    prompt: Segment | None
    chosen: list[Segment]
    rejected: list[Segment]
    turns: list[Segment]  # TURN segments, turns[k] precedes response k+1
    tail: Segment


def _parse(kind: str, segments: list[Segment], where: str) -> _Parsed:
    types = [s.type for s in segments]

    def bad(expected: str) -> FormatError:
        names = " ".join(t.name for t in types)
        return FormatError(f"{where}: segments [{names}] do not follow the {kind!r} layout {expected}")

    if kind == "pair":
        if types != [Seg.PROMPT, Seg.CHOSEN, Seg.REJECTED, Seg.TAIL]:
            raise bad("PROMPT CHOSEN REJECTED TAIL")
        return _Parsed(None, [], segments[0], [segments[1]], [segments[2]], [], segments[3])
    if kind == "solopo":
        if types != [Seg.SHORT_PROMPT, Seg.LONG_PROMPT, Seg.CHOSEN, Seg.REJECTED, Seg.TAIL]:
            raise bad("SHORT_PROMPT LONG_PROMPT CHOSEN REJECTED TAIL")
        return _Parsed(segments[1], [segments[0]], None, [segments[2]], [segments[3]], [], segments[4])
    if kind == "longpo":
        expected = "LONG_PROMPT CHOSEN REJECTED (TURN CHOSEN REJECTED)* TAIL SHORT_PROMPT{n}"
        if len(types) < 5 or types[0] != Seg.LONG_PROMPT:
            raise bad(expected)
        chosen, rejected, turns = [], [], []
        i = 1
        while True:
            if types[i : i + 2] != [Seg.CHOSEN, Seg.REJECTED]:
                raise bad(expected)
            chosen.append(segments[i])
            rejected.append(segments[i + 1])
            i += 2
            if i < len(types) and types[i] == Seg.TURN:
                turns.append(segments[i])
                i += 1
                continue
            break
        if i >= len(types) or types[i] != Seg.TAIL:
            raise bad(expected)
        tail = segments[i]
        shorts = segments[i + 1 :]
        if len(shorts) != len(chosen) or any(s.type != Seg.SHORT_PROMPT for s in shorts):
            raise bad(expected)
        return _Parsed(segments[0], list(shorts), None, chosen, rejected, turns, tail)
    raise ValueError(f"unknown dataset kind {kind!r}")


def assemble(kind: str, segments: list[Segment], role: str, where: str = "sample") -> list[Sequence]:
    """The sequences of `role` assembled from one document's segments."""
    check_role(kind, role)
    p = _parse(kind, segments, where)
    role = ALIASES[kind].get(role, role)
    if kind == "pair":
        side = p.chosen if role == CHOSEN else p.rejected
        return [_cat([p.prompt, side[0], p.tail])]
    if kind == "solopo":
        prompt = p.long_prompt if role in (LONG_CHOSEN, LONG_REJECTED) else p.short_prompts[0]
        side = p.chosen if role in (CHOSEN, LONG_CHOSEN) else p.rejected
        return [_cat([prompt, side[0], p.tail])]
    # longpo
    if role in PAIR:
        side = p.chosen if role == CHOSEN else p.rejected
        parts: list[Segment] = [p.long_prompt, side[0]]
        for turn, resp in zip(p.turns, side[1:]):
            parts += [turn, resp]
        parts.append(p.tail)
        return [_cat(parts)]
    side = p.chosen if role == REF_CHOSEN else p.rejected
    return [_cat([short, resp, p.tail]) for short, resp in zip(p.short_prompts, side)]


@dataclass(frozen=True)
class Sample:
    """One example: its typed segments, and the role sequences assembled from them."""

    index: int
    kind: str
    segments: tuple[Segment, ...]

    @property
    def roles(self) -> tuple[str, ...]:
        return ROLES[self.kind]

    def sequences(self, role: str) -> list[Sequence]:
        """The sequences of `role` (one, or one per turn for LongPO's ref roles)."""
        return assemble(self.kind, list(self.segments), role, where=f"sample {self.index}")

    @property
    def num_turns(self) -> int:
        return sum(1 for s in self.segments if s.type == Seg.CHOSEN)

    @property
    def stored_tokens(self) -> int:
        return int(sum(len(s.tokens) for s in self.segments))


def layout(kind: str, runs: dict[str, list[list[np.ndarray]]]) -> list[Segment]:
    """Segments for one document from the role sequences computed at preprocessing time.

    `runs[role][j]` = sequence j of `role` as alternating runs [glue, response, glue, ...,
    response, glue] (response runs at odd positions). Shared pieces are taken once; the caller
    checks with `assemble` that every role comes back exactly.
    """
    check_kind(kind)
    c = runs[CHOSEN][0]
    r = runs[REJECTED][0]
    if kind == "pair":
        return [Segment(Seg.PROMPT, c[0]), Segment(Seg.CHOSEN, c[1]), Segment(Seg.REJECTED, r[1]), Segment(Seg.TAIL, c[2])]
    if kind == "solopo":
        lc = runs[LONG_CHOSEN][0]
        return [
            Segment(Seg.SHORT_PROMPT, c[0]),
            Segment(Seg.LONG_PROMPT, lc[0]),
            Segment(Seg.CHOSEN, c[1]),
            Segment(Seg.REJECTED, r[1]),
            Segment(Seg.TAIL, c[2]),
        ]
    segs = [Segment(Seg.LONG_PROMPT, c[0])]
    n = (len(c) - 1) // 2
    for k in range(n):
        if k > 0:
            segs.append(Segment(Seg.TURN, c[2 * k]))
        segs += [Segment(Seg.CHOSEN, c[2 * k + 1]), Segment(Seg.REJECTED, r[2 * k + 1])]
    segs.append(Segment(Seg.TAIL, c[-1]))
    segs += [Segment(Seg.SHORT_PROMPT, short[0]) for short in runs[REF_CHOSEN]]
    return segs
