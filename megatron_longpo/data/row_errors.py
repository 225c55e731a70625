"""Why a raw row is dropped, and the errors preprocessing raises: the vocabulary the row schemas
(data/records.py) and the row-format conversions (data/row_formats.py) share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# why a row was dropped
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
WRONG_TYPE = "wrong_type"
EMPTY_FIELD = "empty_field"
EMPTY_RESPONSE = "empty_response"
BAD_MESSAGES = "bad_messages"
TEMPLATE_ERROR = "template_error"
TOKEN_BOUNDARY = "token_boundary"
OVERLENGTH = "overlength"

class PreprocessError(Exception):
    """Preprocessing cannot go on; the message says where and what to do."""


class TemplateError(ValueError):
    """The chat template does not behave as this format needs (a property of the template)."""


class RowError(ValueError):
    """One row cannot be used; it is dropped and reported with its line number."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Drop:
    """A dropped row: where it is (JSONL: 1-based line; tables: 0-based row) and why."""

    file: str
    number: int
    unit: str  # "line" | "row"
    reason: str
    detail: str
    length: int | None = None

    @property
    def location(self) -> str:
        return f"{self.file}:{self.unit} {self.number}"


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, (list, tuple)):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__
