"""A SentencePiece model file with a Jinja chat template, behind data/tokenizer.py's ChatTokenizer
interface (built by `TokenizerSpec(sentencepiece=..., chat_template_file=...)`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from megatron_longpo.data.chat_tokenizer import ChatTokenizer, Message, TokenizerError, Unit


class SentencePieceChatTokenizer(ChatTokenizer):
    """A SentencePiece model file with a Jinja chat template (the template is required)."""

    family = "sentencepiece"

    def __init__(self, model_file: str | os.PathLike, chat_template: str, mode: str = "spans") -> None:
        super().__init__(mode)
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        self.model_file = str(model_file)
        try:
            self._model_bytes = Path(self.model_file).read_bytes()
            proto = pb.ModelProto()
            proto.ParseFromString(self._model_bytes)
            self.sp = spm.SentencePieceProcessor(model_proto=self._model_bytes)
        except Exception as exc:  # noqa: BLE001
            raise TokenizerError(f"cannot load the SentencePiece model {self.model_file!r}: {exc}") from exc
        if not chat_template:
            raise TokenizerError("a SentencePiece tokenizer needs a chat template: pass --chat-template FILE")
        self.chat_template = chat_template
        # the same model without the dummy prefix, for text that does not begin the conversation
        self._dummy_prefix = bool(proto.normalizer_spec.add_dummy_prefix)
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp_cont = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.name = Path(self.model_file).name
        self.vocab_size = self.sp.get_piece_size()
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else None
        self.pad_token_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_token_id
        control = pb.ModelProto.SentencePiece.Type.Value("CONTROL")
        user = pb.ModelProto.SentencePiece.Type.Value("USER_DEFINED")
        self._control = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == control}
        self._control_re = (
            re.compile("|".join(re.escape(c) for c in sorted(self._control, key=len, reverse=True)))
            if self._control
            else None
        )
        atomic = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (control, user)}
        self.atomic_ids = frozenset(atomic.values())
        self._set_specials(atomic if mode == "spans" else self._control)

        def piece(i: int) -> str:
            return self.sp.id_to_piece(i) if i >= 0 else ""

        self._template_vars = {
            "bos_token": piece(self.sp.bos_id()),
            "eos_token": piece(self.sp.eos_id()),
            "unk_token": piece(self.sp.unk_id()),
            "pad_token": piece(self.sp.pad_id()),
        }

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            **self._template_vars,
        )
        return rendered[0]

    def encode(self, text: str) -> list[int]:
        if self._control_re is None:
            return list(self.sp.encode(text))
        ids: list[int] = []
        pos = 0
        for m in self._control_re.finditer(text):
            if m.start() > pos:
                ids.extend(self.encode_span(text[pos : m.start()], at_start=pos == 0))
            ids.append(self._control[m.group(0)])
            pos = m.end()
        if pos < len(text):
            ids.extend(self.encode_span(text[pos:], at_start=pos == 0))
        return ids

    def encode_span(self, text: str, at_start: bool) -> list[int]:
        return list((self.sp if at_start else self.sp_cont).encode(text))

    def leading_ids(self, units: list[Unit]) -> list[int]:
        # SentencePiece adds its dummy-prefix space at the start of the text even when the text
        # opens with a user-defined symbol: "<|im_start|>..." -> ["▁", "<|im_start|>", ...]
        if not units or units[0].special_id is None or units[0].start != 0 or not self._dummy_prefix:
            return []
        sid = units[0].special_id
        if sid in self._control.values():
            return []  # control strings are cut out before SentencePiece sees the text
        ids = list(self.sp.encode(self.sp.id_to_piece(sid)))
        return ids[:-1] if ids and ids[-1] == sid else []

    def _fingerprint_material(self) -> bytes:
        return self._model_bytes
