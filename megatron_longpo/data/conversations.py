"""Validated records -> the conversations (messages + scored turns) of each role."""

from __future__ import annotations

import string
from dataclasses import dataclass

from megatron_longpo.data.records import Message, PreprocessError, Record
from megatron_longpo.roles import CHOSEN, LONG_CHOSEN, LONG_REJECTED, REF_CHOSEN, REF_REJECTED, REJECTED

DEFAULT_CONTEXT_TEMPLATE = "{context}\n\n{instruction}"


# ------------------------------------------------------------------------------------------
# conversations
@dataclass(frozen=True)
class Conversation:
    """Messages and the indices of the assistant messages whose tokens are scored."""

    messages: tuple[Message, ...]
    scored: tuple[int, ...]


def check_context_template(template: str) -> str:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise PreprocessError(f"context template {template!r} is not a valid format string: {exc}") from exc
    unknown = fields - {"context", "instruction"}
    if unknown or fields != {"context", "instruction"}:
        raise PreprocessError(
            f"context template {template!r} must use exactly {{context}} and {{instruction}} "
            f"(found {sorted(fields) or 'none'}); write literal braces as {{{{ and }}}}"
        )
    return template


def _user(content: str) -> Message:
    return {"role": "user", "content": content}


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def _single(system: str | None, user: str, answer: str) -> Conversation:
    head = ({"role": "system", "content": system},) if system is not None else ()
    return Conversation(head + (_user(user), _assistant(answer)), (len(head) + 1,))


def build_conversations(kind: str, record: Record, context_template: str) -> dict[str, list[Conversation]]:
    """The conversations of the kind's primary roles (the others alias them, see format.ALIASES)."""

    def ctx(context: str, instruction: str) -> str:
        return context_template.format_map({"context": context, "instruction": instruction})

    if kind == "pair":
        n = len(record.prompt)
        return {
            CHOSEN: [Conversation(record.prompt + (_assistant(record.chosen),), (n,))],
            REJECTED: [Conversation(record.prompt + (_assistant(record.rejected),), (n,))],
        }
    if kind == "solopo":
        r = record
        return {
            CHOSEN: [_single(r.system, ctx(r.short_context, r.instruction), r.chosen)],
            REJECTED: [_single(r.system, ctx(r.short_context, r.instruction), r.rejected)],
            LONG_CHOSEN: [_single(r.system, ctx(r.long_context, r.instruction), r.chosen)],
            LONG_REJECTED: [_single(r.system, ctx(r.long_context, r.instruction), r.rejected)],
        }
    r = record
    head = ({"role": "system", "content": r.system},) if r.system is not None else ()

    def multi(side: str) -> Conversation:
        msgs = list(head)
        scored = []
        for i, t in enumerate(r.turns):
            msgs.append(_user(ctx(r.long_context, t.instruction) if i == 0 else t.instruction))
            scored.append(len(msgs))
            msgs.append(_assistant(getattr(t, side)))
        return Conversation(tuple(msgs), tuple(scored))

    return {
        CHOSEN: [multi("chosen")],
        REJECTED: [multi("rejected")],
        REF_CHOSEN: [_single(r.system, ctx(t.short_context, t.instruction), t.chosen) for t in r.turns],
        REF_REJECTED: [_single(r.system, ctx(t.short_context, t.instruction), t.rejected) for t in r.turns],
    }

