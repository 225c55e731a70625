"""The embedded SmolLM2 materialised from its GGUF file: the special tokens are the file's, whatever
transformers' GGUF conversion says (5.17 made <|im_start|> the eos token; 5.24 does not)."""
import json
import shutil

import pytest


def test_gguf_states_smollm2s_special_tokens():
    from megatron_longpo.models.embedded import gguf_path, gguf_special_token_ids

    # SmolLM2-Instruct's tokenizer: <|endoftext|> 0, <|im_start|> 1, <|im_end|> 2 (eos and pad)
    assert gguf_special_token_ids(gguf_path()) == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}


@pytest.mark.slow
def test_materialised_special_tokens_are_the_gguf_files(smollm2_dir, tmp_path, monkeypatch):
    """A converter that gets eos wrong (as transformers 5.17 does: <|im_start|>) and a cached copy
    written by it: the cache is written again and eos / pad / bos are the GGUF file's in the
    tokenizer, config.json and generation_config.json."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from megatron_longpo.models.embedded import MODEL_NAME, STAMP, materialize_default_model

    cached = tmp_path / MODEL_NAME
    shutil.copytree(smollm2_dir, cached)
    (cached / STAMP).unlink(missing_ok=True)  # a copy the materialiser before the fix wrote
    config = json.loads((cached / "config.json").read_text())
    config["eos_token_id"] = 1
    (cached / "config.json").write_text(json.dumps(config))

    real = transformers.AutoTokenizer.from_pretrained

    def as_5_17(*args, **kwargs):
        tok = real(*args, **kwargs)
        tok.eos_token = "<|im_start|>"
        tok.pad_token = None
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", as_5_17)
    out = materialize_default_model(tmp_path)
    monkeypatch.undo()
    tok, cfg, gen = AutoTokenizer.from_pretrained(out), AutoConfig.from_pretrained(out), GenerationConfig.from_pretrained(out)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id, tok.bos_token_id) == ("<|im_end|>", 2, 2, 1)
    assert (cfg.eos_token_id, cfg.pad_token_id, cfg.bos_token_id) == (2, 2, 1)
    assert (gen.eos_token_id, gen.pad_token_id) == (2, 2)
    assert json.loads((out / STAMP).read_text())["special_token_ids"] == {"bos": 1, "eos": 2, "unk": 0, "pad": 2}
    # an older copy that agrees is kept as it is, and stamped
    (out / STAMP).unlink()
    written = (out / "config.json").stat().st_mtime_ns
    assert materialize_default_model(tmp_path) == out and (out / "config.json").stat().st_mtime_ns == written
    assert (out / STAMP).is_file()
