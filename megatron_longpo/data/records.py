"""Row schemas of the raw preference records, why a row is dropped, and the field checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_longpo.data.row_errors import (  # noqa: F401 - re-exported: the records' vocabulary
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    MISSING_FIELD,
    WRONG_TYPE,
    EMPTY_FIELD,
    EMPTY_RESPONSE,
    BAD_MESSAGES,
    TEMPLATE_ERROR,
    TOKEN_BOUNDARY,
    OVERLENGTH,
    Drop,
    PreprocessError,
    RowError,
    TemplateError,
    _json_type,
)

Message = dict[str, str]


# ------------------------------------------------------------------------------------------
# records
@dataclass(frozen=True)
class PairRecord:
    prompt: tuple[Message, ...]  # system? + history + final user turn
    chosen: str
    rejected: str


@dataclass(frozen=True)
class Turn:
    short_context: str
    instruction: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class LongPORecord:
    long_context: str
    turns: tuple[Turn, ...]
    system: str | None


@dataclass(frozen=True)
class SoLoPORecord:
    short_context: str
    long_context: str
    instruction: str
    chosen: str
    rejected: str
    system: str | None


Record = PairRecord | LongPORecord | SoLoPORecord


def _req_str(obj: dict, key: str, where: str = "", response: bool = False) -> str:
    if key not in obj or obj[key] is None:
        raise RowError(MISSING_FIELD, f"missing field '{where}{key}'")
    v = obj[key]
    if not isinstance(v, str):
        raise RowError(WRONG_TYPE, f"field '{where}{key}' must be a string, got {_json_type(v)}")
    if not v.strip():
        raise RowError(EMPTY_RESPONSE if response else EMPTY_FIELD, f"field '{where}{key}' is empty")
    return v


def _opt_str(obj: dict, key: str) -> str | None:
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise RowError(WRONG_TYPE, f"field '{key}' must be a string, got {_json_type(v)}")
    return v


def _parse_messages(obj: dict, system: str | None) -> tuple[Message, ...]:
    msgs = obj["messages"]
    if not isinstance(msgs, (list, tuple)):
        raise RowError(WRONG_TYPE, f"field 'messages' must be an array, got {_json_type(msgs)}")
    if not msgs:
        raise RowError(BAD_MESSAGES, "field 'messages' is empty")
    out: list[Message] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RowError(WRONG_TYPE, f"'messages[{i}]' must be an object, got {_json_type(m)}")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RowError(BAD_MESSAGES, f"'messages[{i}].role' must be system, user or assistant, got {role!r}")
        if role == "system":
            if i != 0:
                raise RowError(BAD_MESSAGES, f"'messages[{i}]' is a system message; only the first may be")
            if system is not None:
                raise RowError(BAD_MESSAGES, "both a 'system' field and a system message; keep one")
            content = m.get("content")
            if not isinstance(content, str):
                raise RowError(WRONG_TYPE, f"'messages[{i}].content' must be a string, got {_json_type(content)}")
        else:
            content = _req_str(m, "content", where=f"messages[{i}].")
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "user":
        raise RowError(BAD_MESSAGES, f"'messages' must end with a user turn, it ends with {out[-1]['role']!r}")
    if system is not None:
        out.insert(0, {"role": "system", "content": system})
    return tuple(out)


def parse_record(kind: str, obj: Any, columns: dict[str, str] | None = None) -> Record:
    """Validate one row of `kind`; raises RowError naming the field and the problem. `columns`
    maps native field names to the row's own column names (data/row_formats.py); a `pair` row may
    be in any of TRL's preference or SFT formats."""
    if not isinstance(obj, dict):
        raise RowError(NOT_AN_OBJECT, f"a row must be a JSON object, got {_json_type(obj)}")
    from megatron_longpo.data.row_formats import pair_fields, rename_columns

    obj = rename_columns(obj, columns or {})
    if kind == "pair":
        obj = pair_fields(obj)
    system = _opt_str(obj, "system")
    if kind == "pair":
        has_prompt = obj.get("prompt") is not None
        has_messages = obj.get("messages") is not None
        if has_prompt and has_messages:
            raise RowError(BAD_MESSAGES, "both 'prompt' and 'messages'; keep one")
        if has_messages:
            prompt = _parse_messages(obj, system)
        else:
            if not has_prompt:
                raise RowError(MISSING_FIELD, "missing field 'prompt' (or 'messages')")
            text = _req_str(obj, "prompt")
            prompt = (({"role": "system", "content": system},) if system is not None else ()) + (
                {"role": "user", "content": text},
            )
        return PairRecord(prompt, _req_str(obj, "chosen", response=True), _req_str(obj, "rejected", response=True))
    if kind == "longpo":
        long_context = _req_str(obj, "long_context")
        if obj.get("turns") is None:
            raise RowError(MISSING_FIELD, "missing field 'turns'")
        turns = obj["turns"]
        if not isinstance(turns, (list, tuple)):
            raise RowError(WRONG_TYPE, f"field 'turns' must be an array, got {_json_type(turns)}")
        if not turns:
            raise RowError(EMPTY_FIELD, "field 'turns' is empty")
        parsed = []
        for i, t in enumerate(turns):
            if not isinstance(t, dict):
                raise RowError(WRONG_TYPE, f"'turns[{i}]' must be an object, got {_json_type(t)}")
            w = f"turns[{i}]."
            parsed.append(
                Turn(
                    _req_str(t, "short_context", w),
                    _req_str(t, "instruction", w),
                    _req_str(t, "chosen", w, response=True),
                    _req_str(t, "rejected", w, response=True),
                )
            )
        return LongPORecord(long_context, tuple(parsed), system)
    if kind == "solopo":
        return SoLoPORecord(
            _req_str(obj, "short_context"),
            _req_str(obj, "long_context"),
            _req_str(obj, "instruction"),
            _req_str(obj, "chosen", response=True),
            _req_str(obj, "rejected", response=True),
            system,
        )
    raise ValueError(f"unknown dataset kind {kind!r}")

