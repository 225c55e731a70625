"""Rows as users bring them -> the native record fields (data/records.py parses those).

Two steps, both per row:

* `rename_columns`: a column mapping (`--columns prompt=question,chosen=good`) gives the native
  field names to other names; a row without a mapped column is reported as missing THAT column.
* `pair_fields`: TRL's preference and SFT formats become the native `pair` fields:

  | TRL format | row | native |
  |---|---|---|
  | standard, explicit prompt | `prompt`, `chosen`, `rejected` strings | the same |
  | standard, implicit prompt | `chosen`, `rejected` strings holding prompt + response | `prompt` = their common start (TRL's rule), responses the rest |
  | conversational, explicit | `prompt` messages, `chosen`/`rejected` one assistant message each | `messages` = `prompt` |
  | conversational, implicit | `chosen`/`rejected` whole conversations | `messages` = their common messages, responses the last assistant message |
  | prompt-completion (SFT) | `prompt` (string or messages), `completion` (string or one assistant message) | `chosen` = `rejected` = the completion |
  | conversational SFT | `messages` ending with an assistant turn | `messages` = all but it, `chosen` = `rejected` = it |

The native `pair` row (`prompt` or `messages` ending with a user turn, `chosen`, `rejected`
strings) passes unchanged. Every problem is a RowError naming the field (the row is reported
with its line number).
"""

from __future__ import annotations

from typing import Any

from megatron_longpo.data.row_errors import (
    BAD_MESSAGES,
    MISSING_FIELD,
    WRONG_TYPE,
    PreprocessError,
    RowError,
    _json_type,
)

NATIVE_FIELDS = ("prompt", "messages", "chosen", "rejected", "completion", "system",
                 "long_context", "short_context", "instruction", "turns")


# ------------------------------------------------------------------------------------------
# column mapping
def parse_columns(spec: str | dict | None) -> dict[str, str]:
    """`"prompt=question,chosen=good"` (or a dict) -> {native name: source column}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        pairs = list(spec.items())
    else:
        pairs = []
        for part in spec.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise PreprocessError(f"--columns entry {part.strip()!r} must look like NATIVE=COLUMN (e.g. prompt=question)")
            k, v = part.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[str, str] = {}
    for native, source in pairs:
        if native not in NATIVE_FIELDS:
            raise PreprocessError(f"--columns names {native!r}, not a field this format reads; use one of {', '.join(NATIVE_FIELDS)}")
        if not source:
            raise PreprocessError(f"--columns gives {native!r} an empty column name")
        out[native] = source
    return out


def rename_columns(obj: Any, columns: dict[str, str]) -> Any:
    """The row with each mapped source column under its native name (other columns kept)."""
    if not columns or not isinstance(obj, dict):
        return obj
    out = {k: v for k, v in obj.items() if k not in columns}  # a native name that is mapped comes only from its source
    for native, source in columns.items():
        if source in obj:
            out[native] = obj[source]
        elif native in ("prompt", "chosen", "rejected", "long_context", "short_context", "instruction", "turns"):
            raise RowError(MISSING_FIELD, f"missing column '{source}' (mapped to '{native}' by --columns)")
    return out


# ------------------------------------------------------------------------------------------
# TRL formats
def _is_messages(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(m, dict) and "role" in m for m in v)


def _message(m: Any, where: str) -> dict:
    if not isinstance(m, dict):
        raise RowError(WRONG_TYPE, f"'{where}' must be a message object, got {_json_type(m)}")
    return {"role": m.get("role"), "content": m.get("content")}


def _one_assistant(v: Any, field: str) -> str:
    """The text of a response given as a string or as a list of one assistant message."""
    if isinstance(v, str):
        return v
    if not isinstance(v, (list, tuple)):
        raise RowError(WRONG_TYPE, f"field '{field}' must be a string or a list of messages, got {_json_type(v)}")
    if len(v) != 1 or not isinstance(v[0], dict) or v[0].get("role") != "assistant":
        roles = [m.get("role") if isinstance(m, dict) else _json_type(m) for m in v]
        raise RowError(BAD_MESSAGES, f"field '{field}' must hold exactly one assistant message, got roles {roles}")
    content = v[0].get("content")
    if not isinstance(content, str):
        raise RowError(WRONG_TYPE, f"'{field}[0].content' must be a string, got {_json_type(content)}")
    return content


def _common_text_prefix(a: str, b: str) -> int:
    """TRL's implicit-prompt split of two strings: the index of the first differing character,
    moved back by one when the character before it is a space (the space goes with the response)."""
    n = min(len(a), len(b))
    idx = n
    for i in range(n):
        if a[i] != b[i]:
            idx = i - 1 if i > 0 and a[i - 1] == " " else i
            break
    return idx


def _split_conversations(chosen: list, rejected: list) -> tuple[list[dict], str, str]:
    """Implicit conversational prompt: the messages both conversations share, then one assistant
    message each."""
    c = [_message(m, f"chosen[{i}]") for i, m in enumerate(chosen)]
    r = [_message(m, f"rejected[{i}]") for i, m in enumerate(rejected)]
    k = 0
    while k < min(len(c), len(r)) and c[k] == r[k]:
        k += 1
    if k == 0:
        raise RowError(BAD_MESSAGES, "'chosen' and 'rejected' share no first message: with no 'prompt' they must "
                                     "be the same conversation up to the responses")
    for name, side in (("chosen", c), ("rejected", r)):
        rest = side[k:]
        if len(rest) != 1 or rest[0]["role"] != "assistant":
            raise RowError(BAD_MESSAGES, f"'{name}' must end with exactly one assistant message after the messages "
                                         f"it shares with the other side, got roles {[m['role'] for m in rest]}")
    return c[:k], _one_assistant([chosen[k]], f"chosen[{k}]"), _one_assistant([rejected[k]], f"rejected[{k}]")


def _prompt_fields(prompt: Any) -> dict:
    if _is_messages(prompt):
        return {"messages": list(prompt)}
    return {"prompt": prompt}


def pair_fields(obj: Any) -> Any:
    """A row in any TRL preference or SFT format -> the native `pair` fields (see the module doc)."""
    if not isinstance(obj, dict):
        return obj
    extra = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "chosen", "rejected", "completion")}
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    prompt, messages, completion = obj.get("prompt"), obj.get("messages"), obj.get("completion")
    # SFT: prompt + completion
    if completion is not None and chosen is None and rejected is None:
        if prompt is None:
            raise RowError(MISSING_FIELD, "missing field 'prompt' (a 'completion' row needs one)")
        text = _one_assistant(completion, "completion")
        return {**extra, **_prompt_fields(prompt), "chosen": text, "rejected": text}
    # SFT: a conversation ending with the assistant turn to learn
    if chosen is None and rejected is None and _is_messages(messages) and messages[-1].get("role") == "assistant":
        text = _one_assistant([messages[-1]], f"messages[{len(messages) - 1}]")
        return {**extra, "messages": list(messages[:-1]), "chosen": text, "rejected": text}
    conversational = _is_messages(chosen) or _is_messages(rejected)
    if conversational:
        if prompt is None and messages is None:
            if not (_is_messages(chosen) and _is_messages(rejected)):
                raise RowError(WRONG_TYPE, "'chosen' and 'rejected' must both be lists of messages (or both strings)")
            history, c, r = _split_conversations(chosen, rejected)
            return {**extra, "messages": history, "chosen": c, "rejected": r}
        head = {"messages": messages} if messages is not None else _prompt_fields(prompt)
        if messages is not None and prompt is not None:
            head["prompt"] = prompt  # both: records.py refuses it with its message
        return {**extra, **head, "chosen": _one_assistant(chosen, "chosen"), "rejected": _one_assistant(rejected, "rejected")}
    if _is_messages(prompt):  # conversational prompt with string responses
        return {**extra, "messages": list(prompt), "chosen": chosen, "rejected": rejected}
    if prompt is None and messages is None and isinstance(chosen, str) and isinstance(rejected, str):
        idx = _common_text_prefix(chosen, rejected)
        if not chosen[:idx].strip():
            raise RowError(MISSING_FIELD, "missing field 'prompt' (and 'chosen' and 'rejected' share no common "
                                          "start to take it from, as TRL's implicit-prompt format has)")
        return {**extra, "prompt": chosen[:idx], "chosen": chosen[idx:], "rejected": rejected[idx:]}
    return obj
