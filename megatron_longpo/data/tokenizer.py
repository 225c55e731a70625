"""One small tokenizer interface for preprocessing: a chat template plus a tokenizer.

Two implementations sit behind `ChatTokenizer`:

* `HFChatTokenizer`: a Hugging Face tokenizer directory (fast tokenizer, `tokenizers` library).
  Its reference tokenization of a rendered conversation is exactly what
  `tokenizer.apply_chat_template(messages, tokenize=True)` does: render, then encode the text
  with `add_special_tokens=False`.
* `SentencePieceChatTokenizer` (data/sentencepiece_tokenizer.py): a SentencePiece model plus a Jinja chat-template file. Its
  reference tokenization is SentencePiece's own `encode` of the rendered text, with the strings
  of CONTROL pieces (`<s>`, `</s>`, which SentencePiece never produces from text) mapped to
  their ids; the dummy-prefix space is added at the start of the text only.

Both expose `split(text)`: the text cut at its special (atomic) tokens. Whole-text tokenization
never merges across an atomic token, so the text between two of them can be tokenized on its
own and the results concatenated (`encode_span`). Preprocessing relies on this to tokenize a
64K-token long context once per record instead of once per sequence it appears in; the
`self_check` method proves the property on probe conversations at start-up and fails loudly
(naming the fix, `--tokenization whole`) for a tokenizer where it does not hold.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from megatron_longpo.data.chat_tokenizer import (  # noqa: F401 - the interface, re-exported
    TOKENIZATION_MODES, ChatTokenizer, Message, TokenizerError, Unit,
)


# ------------------------------------------------------------------------------------------
class HFChatTokenizer(ChatTokenizer):
    """A Hugging Face tokenizer directory (must be a fast tokenizer)."""

    family = "huggingface"

    def __init__(self, path: str | os.PathLike, chat_template: str | None = None, mode: str = "spans") -> None:
        super().__init__(mode)
        from transformers import AutoTokenizer

        self.path = str(path)
        if not Path(self.path).is_dir():
            raise TokenizerError(f"tokenizer directory {self.path!r} does not exist (give a Hugging Face model or tokenizer directory)")
        try:
            self.hf = AutoTokenizer.from_pretrained(self.path)
        except Exception as exc:  # noqa: BLE001 - report what transformers said, with the path
            raise TokenizerError(f"cannot load a Hugging Face tokenizer from {self.path!r}: {exc}") from exc
        backend = getattr(self.hf, "backend_tokenizer", None)
        if backend is None:
            raise TokenizerError(
                f"{self.path!r} loads as a slow (Python) tokenizer; preprocessing needs a fast one "
                "(a tokenizer.json). Convert it with transformers, or pass --sentencepiece MODEL --chat-template FILE."
            )
        self.backend = backend
        template = chat_template if chat_template is not None else self.hf.chat_template
        if not template:
            raise TokenizerError(f"tokenizer {self.path!r} has no chat template; pass --chat-template FILE")
        if not isinstance(template, str):
            raise TokenizerError(
                f"tokenizer {self.path!r} has several named chat templates; pass the one to use with --chat-template FILE"
            )
        self.chat_template = template
        self.name = Path(self.path.rstrip("/")).name or self.path
        self.vocab_size = len(self.hf)
        self.eos_token_id = self.hf.eos_token_id
        self.pad_token_id = self.hf.pad_token_id if self.hf.pad_token_id is not None else self.hf.eos_token_id
        specials: dict[str, int] = {}
        strip: dict[str, tuple[bool, bool]] = {}
        single_word = []
        for tid, tok in backend.get_added_tokens_decoder().items():
            if tok.normalized:  # matched after normalisation: stays inside a span, tokenized there
                continue
            specials[tok.content] = tid
            strip[tok.content] = (bool(tok.lstrip), bool(tok.rstrip))
            if tok.single_word:
                single_word.append(tok.content)
        self.atomic_ids = frozenset(specials.values())
        if single_word and mode == "spans":
            raise TokenizerError(
                f"tokenizer {self.name!r} has single-word special tokens {single_word[:5]}; split "
                "tokenization cannot mirror them exactly. Rerun with `--tokenization whole`."
            )
        if mode == "spans":
            self._set_specials(specials, strip)

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=self.chat_template
        )

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def encode_span(self, text: str, at_start: bool) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def _fingerprint_material(self) -> bytes:
        return self.backend.to_str().encode("utf-8")

    def _fingerprint_parts(self) -> dict[str, bytes]:
        d = json.loads(self.backend.to_str())
        model = dict(d.get("model") or {})
        parts = {"vocabulary": model.pop("vocab", None), "merges": model.pop("merges", None), "model options": model,
                 "added tokens": d.get("added_tokens")}
        parts.update({k: d.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")})
        return {k: json.dumps(v, sort_keys=True, ensure_ascii=False).encode("utf-8") for k, v in parts.items()}


# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerSpec:
    """How to build the tokenizer (picklable; what the command line names)."""

    hf_dir: str | None = None
    sentencepiece: str | None = None
    chat_template_file: str | None = None
    mode: str = "spans"

    def build(self) -> ChatTokenizer:
        template = None
        if self.chat_template_file is not None:
            try:
                template = Path(self.chat_template_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise TokenizerError(f"cannot read the chat template file {self.chat_template_file!r}: {exc}") from exc
            template = _maybe_unwrap_json_template(template)
        if (self.hf_dir is None) == (self.sentencepiece is None):
            raise TokenizerError("name exactly one tokenizer: --tokenizer HF_DIR or --sentencepiece MODEL")
        if self.hf_dir is not None:
            return HFChatTokenizer(self.hf_dir, template, self.mode)
        if template is None:
            raise TokenizerError("--sentencepiece needs --chat-template FILE (a Jinja chat template)")
        from megatron_longpo.data.sentencepiece_tokenizer import SentencePieceChatTokenizer

        return SentencePieceChatTokenizer(self.sentencepiece, template, self.mode)


def _maybe_unwrap_json_template(text: str) -> str:
    """Accept a template file that is either raw Jinja or a JSON file with a `chat_template` key."""
    stripped = text.lstrip()
    if stripped.startswith("{") and '"chat_template"' in stripped[:200]:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(obj, dict) and isinstance(obj.get("chat_template"), str):
            return obj["chat_template"]
    return text


# ------------------------------------------------------------------------------------------
class TokenizerMismatch(TokenizerError):
    """A dataset tokenized with another tokenizer than the model's."""


def check_dataset_tokenizer(manifest: dict, data_where: str, model_vocab_size: int, model_where: str,
                            tokenizer_dir: str | os.PathLike | None, skip_key: str) -> list[str]:
    """Refuse a dataset whose tokenizer (its manifest: vocabulary size, hash of the tokenizer
    definition + chat template, the chat template) is not the model's (`tokenizer_dir`, the copy a
    checkpoint keeps; `model_vocab_size`, its embedding rows). Returns notes about what could not be
    checked (old manifests, a checkpoint without a tokenizer copy); raises TokenizerMismatch naming
    both sides and the fix. `skip_key`: how the user turns the check off (named in the message)."""
    t = manifest.get("tokenizer") or {}
    name = t.get("name", "?")
    fix = (f"preprocess the data again with the model's tokenizer (tools/preprocess_pairs.py --tokenizer "
           f"{Path(model_where) / 'tokenizer'}) or use the model the data was made for; {skip_key} skips this check")
    dv = t.get("vocab_size")
    if not isinstance(dv, int):
        return [f"{data_where}: the manifest records no tokenizer; the dataset's tokenizer was not checked"]
    if dv > model_vocab_size:
        raise TokenizerMismatch(
            f"the dataset {data_where} was tokenized with {name!r} ({dv} tokens), but the model {model_where} has "
            f"{model_vocab_size} token embeddings: they do not belong together; {fix}"
        )
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        return [f"the model {model_where} keeps no tokenizer copy: only the vocabulary size of {data_where} "
                f"({dv} <= {model_vocab_size}) was checked"]
    template = manifest.get("chat_template")
    try:
        model_tok = HFChatTokenizer(tokenizer_dir, chat_template=template if isinstance(template, str) else None,
                                    mode="whole")
    except TokenizerError as e:
        return [f"the model's tokenizer copy could not be loaded ({e}); only the vocabulary size was checked"]
    if model_tok.vocab_size != dv:
        raise TokenizerMismatch(
            f"the dataset {data_where} was tokenized with {name!r} ({dv} tokens), the model {model_where} uses "
            f"{model_tok.name!r} ({model_tok.vocab_size} tokens): the token ids mean different things; {fix}"
        )
    notes = []
    if not t.get("hash") or not isinstance(template, str):
        notes.append(f"{data_where}: an older manifest without the tokenizer's hash; only its vocabulary size "
                     f"({dv}) was checked against the model's tokenizer")
    elif t.get("family") != HFChatTokenizer.family:
        notes.append(f"{data_where} was tokenized with a {t.get('family')} tokenizer; only its vocabulary size "
                     f"({dv}) was checked against the model's Hugging Face tokenizer")
    elif model_tok.fingerprint() != t["hash"]:
        theirs, ours = t.get("hash_parts"), model_tok.fingerprint_parts()
        differ = sorted(k for k in ours if k != "chat_template" and theirs.get(k) != ours[k]) if isinstance(theirs, dict) else None
        if differ and set(differ) <= HFChatTokenizer.IDS_NEUTRAL_PARTS:
            notes.append(f"{data_where}: the tokenizer definitions differ only in {', '.join(differ)}, which do not "
                         "change the token ids preprocessing stores; accepted")
        else:
            if differ is None:  # an older manifest: one hash, no parts
                what = "tokens, merges, normaliser or special tokens"
            else:
                what = f"in {', '.join(differ)}; the same: {', '.join(k for k in ours if k not in differ and k != 'chat_template')}"
                if not {"vocabulary", "merges", "added tokens"} & set(differ):
                    what += ("; the same vocabulary converted differently, as two transformers versions do with "
                             "one GGUF file")
            raise TokenizerMismatch(
                f"the dataset {data_where} was tokenized with {name!r} and the model {model_where} uses {model_tok.name!r}: "
                f"both have {dv} tokens, but the tokenizers differ ({what}; "
                f"hash {t['hash'][:19]}... vs {model_tok.fingerprint()[:19]}...); {fix}"
            )
    model_template = model_tok.hf.chat_template
    if isinstance(template, str) and isinstance(model_template, str) and model_template != template:
        raise TokenizerMismatch(
            f"the dataset {data_where} was rendered with another chat template than the model {model_where}'s "
            f"({Path(tokenizer_dir)}): the model would learn a conversation format it is not used with; {fix} "
            f"(or pass the model's template: --chat-template)"
        )
    return notes
