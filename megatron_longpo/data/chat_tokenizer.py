"""The chat-tokenizer interface (`ChatTokenizer`, `Unit`, `TokenizerError`) that every
implementation subclasses: data/tokenizer.py (Hugging Face) and data/sentencepiece_tokenizer.py.
Its own module so that an implementation imports the interface, not the module that chooses
between implementations (no import circle)."""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

Message = dict[str, str]

TOKENIZATION_MODES = ("spans", "whole")


class TokenizerError(ValueError):
    """The tokenizer or its chat template cannot be used as asked (the message names the fix)."""


@dataclass(frozen=True)
class Unit:
    """A run of the rendered text: plain text to tokenize (`special_id is None`) or one atomic token."""

    start: int
    end: int
    special_id: int | None


class ChatTokenizer(ABC):
    """What preprocessing needs from a tokenizer: render, split at atomic tokens, encode."""

    family: str
    name: str
    chat_template: str
    vocab_size: int
    eos_token_id: int | None
    pad_token_id: int | None

    def __init__(self, mode: str = "spans") -> None:
        if mode not in TOKENIZATION_MODES:
            raise TokenizerError(f"unknown tokenization mode {mode!r}; choose one of {TOKENIZATION_MODES}")
        self.mode = mode
        self._split_re: re.Pattern | None = None
        self._special_ids: dict[str, int] = {}
        self._strip: dict[str, tuple[bool, bool]] = {}
        self.atomic_ids: frozenset[int] = frozenset()  # ids of special / atomic tokens

    # -- what each implementation provides -------------------------------------------------
    @abstractmethod
    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        """The chat template applied to `messages` (text, not tokens)."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Reference tokenization of a whole rendered conversation."""

    @abstractmethod
    def encode_span(self, text: str, at_start: bool) -> list[int]:
        """Tokenize text that lies between two atomic tokens (`at_start`: it begins the text)."""

    @abstractmethod
    def _fingerprint_material(self) -> bytes:
        """Everything that determines the token ids (vocabulary, merges, normaliser, ...)."""

    def _fingerprint_parts(self) -> dict[str, bytes]:
        """The definition cut into named parts, so that a hash mismatch can say what differs
        (implementations with more structure than one blob override this)."""
        return {"definition": self._fingerprint_material()}

    # Parts that do not change the ids preprocessing stores (decoding, special tokens that only
    # `add_special_tokens=True` adds): a mismatch confined to them is a note, not an error.
    IDS_NEUTRAL_PARTS = frozenset({"decoder", "post_processor"})

    # -- shared ---------------------------------------------------------------------------
    def fingerprint_parts(self) -> dict[str, str]:
        """sha256 (16 hex digits) of each part of the definition, the chat template among them."""
        parts = dict(self._fingerprint_parts())
        parts["chat_template"] = self.chat_template.encode("utf-8")
        return {k: hashlib.sha256(v).hexdigest()[:16] for k, v in parts.items()}

    def fingerprint(self) -> str:
        """sha256 over the tokenizer's definition and its chat template."""
        if getattr(self, "_fingerprint", None) is None:
            h = hashlib.sha256()
            h.update(self._fingerprint_material())
            h.update(b"\0chat_template\0")
            h.update(self.chat_template.encode("utf-8"))
            self._fingerprint = "sha256:" + h.hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        return {
            "family": self.family,
            "name": self.name,
            "hash": self.fingerprint(),
            "hash_parts": self.fingerprint_parts(),
            "vocab_size": self.vocab_size,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "tokenization": self.mode,
        }

    def split(self, text: str) -> list[Unit]:
        """The text cut at its atomic tokens. In `whole` mode nothing is cut (SentencePiece: only
        the CONTROL strings, which its reference tokenization cuts out too)."""
        if self._split_re is None:
            return [Unit(0, len(text), None)] if text else []
        units: list[Unit] = []
        pos = 0
        for m in self._split_re.finditer(text):
            start, end = m.start(), m.end()
            if start < pos:  # swallowed by the previous token's rstrip
                continue
            lstrip, rstrip = self._strip.get(m.group("tok"), (False, False))
            if lstrip:
                while start > pos and text[start - 1].isspace():
                    start -= 1
            if rstrip:
                while end < len(text) and text[end].isspace():
                    end += 1
            if start > pos:
                units.append(Unit(pos, start, None))
            units.append(Unit(start, end, self._special_ids[m.group("tok")]))
            pos = end
        if pos < len(text):
            units.append(Unit(pos, len(text), None))
        return units

    def leading_ids(self, units: list[Unit]) -> list[int]:
        """Ids emitted at the very start of a text whose first unit is an atomic token (before
        it); none for Hugging Face tokenizers, SentencePiece's dummy-prefix piece."""
        return []

    def encode_units(self, text: str) -> list[int]:
        """Tokenize `text` unit by unit (the way preprocessing does)."""
        units = self.split(text)
        ids: list[int] = list(self.leading_ids(units))
        for u in units:
            if u.special_id is not None:
                ids.append(u.special_id)
            else:
                ids.extend(self.encode_span(text[u.start : u.end], at_start=u.start == 0))
        return ids

    def self_check(self) -> None:
        """Prove on probe conversations that unit-by-unit tokenization equals whole-text
        tokenization; raise TokenizerError naming the fix otherwise."""
        if self.mode == "whole":
            return
        checked, refusal = 0, None
        for messages in _PROBES:
            for gen in (False, True):
                msgs = messages[:-1] if gen else messages
                try:
                    text = self.render(msgs, add_generation_prompt=gen)
                except Exception as exc:  # noqa: BLE001 - a template may refuse e.g. a system turn
                    refusal = exc
                    continue
                checked += 1
                if self.encode_units(text) != self.encode(text):
                    raise TokenizerError(
                        f"tokenizer {self.name!r}: tokenizing the text between special tokens separately "
                        "does not give the same ids as tokenizing the whole conversation (for example a "
                        "normaliser or pre-tokenizer that looks across special tokens); exact, fast "
                        "preprocessing is not possible with it. Rerun with `--tokenization whole` "
                        "(exact for any tokenizer, slower on long multi-turn contexts)."
                    )
        if not checked:
            raise TokenizerError(f"the chat template of {self.name!r} refused every probe conversation ({refusal}); "
                                 "pass --chat-template FILE with a template that renders user/assistant turns")

    def _set_specials(self, specials: dict[str, int], strip: dict[str, tuple[bool, bool]] | None = None) -> None:
        """Compile the splitting regex: longest token first (leftmost-longest, as `tokenizers`).
        `strip[content] = (lstrip, rstrip)`: the token also swallows the whitespace on that side."""
        self._special_ids = dict(specials)
        self._strip = {c: f for c, f in (strip or {}).items() if f[0] or f[1]}
        if not specials:
            self._split_re = None
            return
        body = "|".join(re.escape(c) for c in sorted(specials, key=len, reverse=True))
        self._split_re = re.compile(f"(?P<tok>{body})")


# Conversations that exercise whitespace, digits, unicode and message boundaries.
_PROBES: list[list[Message]] = [
    [
        {"role": "system", "content": "You are  a careful\ttester.\n"},
        {"role": "user", "content": " Read this:\n\n  Chapter 1. It was 1999; \"quotes\", émigrés, 東京.\n\nQ: why?  "},
        {"role": "assistant", "content": " Because 42.\n"},
        {"role": "user", "content": "\nAnd then?"},
        {"role": "assistant", "content": "Then\n\n- a\n- b  c"},
    ],
    [
        {"role": "user", "content": "Summarise:\n\n  A long text .\n\nIn one line."},
        {"role": "assistant", "content": "A text,  summarised."},
        {"role": "user", "content": "Shorter."},
        {"role": "assistant", "content": " Text."},
    ],
    [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "y"},
    ],
]
