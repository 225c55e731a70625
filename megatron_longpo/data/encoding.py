"""Conversations -> exactly the chat template's tokens, laid out as typed segments."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_longpo.data.conversations import (
    DEFAULT_CONTEXT_TEMPLATE,
    Conversation,
    build_conversations,
    check_context_template,
)
from megatron_longpo.data.format import token_dtype
from megatron_longpo.data.schema import ALIASES, PRIMARY_ROLES, ROLES, assemble, check_kind, layout
from megatron_longpo.data.records import (
    EMPTY_RESPONSE,
    TEMPLATE_ERROR,
    TOKEN_BOUNDARY,
    Message,
    Record,
    RowError,
    TemplateError,
)
from megatron_longpo.data.tokenizer import ChatTokenizer, TokenizerError

# ------------------------------------------------------------------------------------------
# encoding
@dataclass
class EncodedRecord:
    segments: list[tuple[int, np.ndarray]]  # (Seg value, tokens in the dataset dtype)
    lengths: dict[str, list[int]]  # role -> length of each of its sequences
    stored_tokens: int
    role_tokens: int  # tokens over all role sequences (what a per-sequence pipeline produces)


class RecordEncoder:
    """Turns a validated record into typed segments (exactly the chat template's tokens)."""

    def __init__(
        self, tokenizer: ChatTokenizer, kind: str, context_template: str = DEFAULT_CONTEXT_TEMPLATE,
        verify: bool = False,
    ) -> None:
        self.tok = tokenizer
        self.kind = check_kind(kind)
        self.context_template = check_context_template(context_template)
        self.verify = verify
        self.dtype = token_dtype(tokenizer.vocab_size)
        self._spans: dict[tuple[str, bool], list[int]] = {}
        self._pieces: dict[tuple[tuple[str, ...], bool], list[list[int]] | None] = {}

    # -- one conversation -----------------------------------------------------------------
    def _render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        try:
            return self.tok.render(messages, add_generation_prompt=add_generation_prompt)
        except Exception as exc:  # noqa: BLE001 - jinja raise_exception(...) and friends: this row only
            raise RowError(TEMPLATE_ERROR, f"the chat template refused the conversation: {exc}") from exc

    def _regions(self, conv: Conversation, text: str) -> list[tuple[int, int]]:
        regions = []
        for k in conv.scored:
            prefix = self._render(list(conv.messages[:k]), add_generation_prompt=True)
            if not text.startswith(prefix):
                raise TemplateError(
                    "the chat template does not render a conversation as (its prompt with the generation "
                    "prompt) + (the response): the scored tokens cannot be located. Pass --chat-template "
                    "FILE with a template whose earlier turns render the same with and without later ones."
                )
            content = conv.messages[k]["content"]
            start = len(prefix)
            if text.startswith(content, start):
                end = start + len(content)
            elif text.startswith(content.strip(), start):  # a template that trims content
                end = start + len(content.strip())
            else:
                raise TemplateError(
                    "the chat template changes the assistant message text (beyond trimming whitespace), "
                    "so the response tokens cannot be located; pass --chat-template FILE with a template "
                    "that inserts message content verbatim"
                )
            regions.append((start, end))
        return regions

    def _span(self, text: str, at_start: bool) -> list[int]:
        key = (text, at_start)
        ids = self._spans.get(key)
        if ids is None:
            ids = self._spans[key] = self.tok.encode_span(text, at_start)
        return ids

    def _split_pieces(self, pieces: tuple[str, ...], at_start: bool) -> list[list[int]] | None:
        """The unit's tokens cut where the pieces meet, or None when a cut is not a token
        boundary. A cut is a boundary when the tokens of the text up to it are a prefix of the
        tokens of the whole unit (the prompt tokenized alone, as at generation time, is exactly
        the start of the conversation's tokens); the parts are slices of the whole unit's
        tokens, so they always concatenate to it."""
        key = (pieces, at_start)
        if key not in self._pieces:
            whole = self._span("".join(pieces), at_start)
            cuts, done = [0], ""
            for piece in pieces[:-1]:
                done += piece
                head = self._span(done, at_start)
                if len(head) < cuts[-1] or whole[: len(head)] != head:
                    cuts = None
                    break
                cuts.append(len(head))
            self._pieces[key] = None if cuts is None else [
                whole[a:b] for a, b in zip(cuts, cuts[1:] + [len(whole)])
            ]
        return self._pieces[key]

    def encode_conversation(self, conv: Conversation) -> list[np.ndarray]:
        """Alternating runs [glue, response, glue, ..., response, glue] of the conversation's
        tokens; a response run = the response tokens + the end-of-turn token right after them."""
        text = self._render(list(conv.messages))
        regions = self._regions(conv, text)
        bounds = sorted({b for r in regions for b in r})
        ends = {e for _, e in regions}

        def inside(pos: int) -> bool:
            return any(s <= pos < e for s, e in regions)

        units = self.tok.split(text)
        # (token ids, is response, starts at a response's end)
        labelled: list[tuple[list[int], bool, bool]] = [(self.tok.leading_ids(units), False, False)]
        for u in units:
            if u.special_id is not None:
                labelled.append(([u.special_id], inside(u.start), u.start in ends))
                continue
            cuts = [b for b in bounds if u.start < b < u.end]
            if not cuts:
                ids = self._span(text[u.start : u.end], u.start == 0)
                labelled.append((ids, inside(u.start), u.start in ends))
                continue
            edges = [u.start, *cuts, u.end]
            pieces = tuple(text[a:b] for a, b in zip(edges, edges[1:]))
            parts = self._split_pieces(pieces, u.start == 0)
            if parts is None:
                near = text[max(u.start, cuts[0] - 12) : cuts[0] + 12]
                raise RowError(
                    TOKEN_BOUNDARY,
                    f"a response boundary falls inside a token (near {near!r}): the response's first or last "
                    "characters merge with the chat template's text; strip leading/trailing whitespace from responses",
                )
            labelled += [(ids, inside(a), a in ends) for ids, a in zip(parts, edges)]
        runs: list[list[int]] = [[]]
        current = False
        for ids, is_response, after_response in labelled:
            if after_response and not is_response and ids and ids[0] in self.tok.atomic_ids:
                # the end-of-turn token right after a response is scored with it
                runs[-1].append(ids[0])
                ids = ids[1:]
            if is_response != current:
                runs.append([])
                current = is_response
            runs[-1].extend(ids)
        if current:
            runs.append([])
        if len(runs) != 2 * len(conv.scored) + 1 or any(not runs[i] for i in range(1, len(runs), 2)):
            raise RowError(
                EMPTY_RESPONSE, "a response produced no tokens, or two responses touch (no template text between them)"
            )
        if self.verify:
            whole = self.tok.encode(text)
            if [t for r in runs for t in r] != whole:
                raise TokenizerError(
                    "split tokenization differs from whole-text tokenization for this conversation; "
                    "rerun with --tokenization whole and please report the tokenizer"
                )
        return [np.asarray(r, dtype=np.int64) for r in runs]

    # -- one record -----------------------------------------------------------------------
    def encode(self, record: Record) -> EncodedRecord:
        try:
            convs = build_conversations(self.kind, record, self.context_template)
            runs = {role: [self.encode_conversation(c) for c in convs[role]] for role in PRIMARY_ROLES[self.kind]}
        finally:
            self._spans.clear()
            self._pieces.clear()
        segments = layout(self.kind, runs)
        lengths: dict[str, list[int]] = {}
        for role in PRIMARY_ROLES[self.kind]:
            got = assemble(self.kind, segments, role)
            want = runs[role]
            ok = len(got) == len(want) and all(
                np.array_equal(g.tokens, np.concatenate(w))
                and np.array_equal(g.loss_mask, np.concatenate([np.full(len(x), i % 2 == 1) for i, x in enumerate(w)]))
                for g, w in zip(got, want)
            )
            if not ok:
                raise TemplateError(
                    f"the chat template renders the shared parts of the {role!r} sequence differently from the "
                    f"other sequences of the record (for example the text between turns depends on the earlier "
                    f"response), so the {self.kind!r} layout cannot store them once; pass --chat-template FILE "
                    "with a template whose turns render independently"
                )
            lengths[role] = [len(g) for g in got]
        for alias, target in ALIASES[self.kind].items():
            lengths[alias] = list(lengths[target])
        stored = [(int(s.type), s.tokens.astype(self.dtype)) for s in segments]
        return EncodedRecord(
            segments=stored,
            lengths={r: lengths[r] for r in ROLES[self.kind]},
            stored_tokens=int(sum(len(t) for _, t in stored)),
            role_tokens=int(sum(sum(v) for v in lengths.values())),
        )

