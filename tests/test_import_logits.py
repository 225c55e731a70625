"""Hugging Face -> Megatron import gives transformers' logits, at TP=1, TP=2, PP=2, and across a
TP=2 -> TP=1 checkpoint round trip (gloo processes on the CPU, fp32)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fixtures import tiny_hf_model
from mp import torchrun

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about long documents.",
    "Explain why the sky is blue in one sentence.",
]


def convert(hf_dir, out, *extra):
    r = subprocess.run([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "hf-to-megatron", "--hf-dir", str(hf_dir),
                        "--out", str(out), *extra], capture_output=True, text=True, timeout=600)
    return r


def hf_logits(hf_dir, tokens):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


@pytest.fixture(scope="module")
def tokens(smollm2_dir, module_tmp):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in PROMPTS]
    rows = [tok(x, add_special_tokens=False)["input_ids"] for x in texts]
    n = min(len(r) for r in rows)
    t = torch.tensor([r[-n:] for r in rows])  # same length, no padding: compare every position
    path = module_tmp / "tokens.pt"
    torch.save(t, path)
    return t, path


def megatron_logits(ckpt, tp, pp, tokens_path, tmp, *save):
    out = tmp / f"logits_tp{tp}_pp{pp}.pt"
    torchrun(tp * pp, "logits.py", ckpt, tp, pp, tokens_path, out, *save)
    return torch.load(out)


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_dir, tokens, tmp_path):
    t, path = tokens
    r = convert(smollm2_dir, tmp_path / "ckpt")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imported llama (30 layers" in r.stdout
    ours = megatron_logits(tmp_path / "ckpt", 1, 1, path, tmp_path)
    ref = hf_logits(smollm2_dir, t)
    next_token = (ours[:, -1] - ref[:, -1]).abs().max().item()
    every = (ours - ref).abs().max().item()
    print(f"SmolLM2 fp32 CPU: max |next-token logits diff| = {next_token:.2e}, over every position {every:.2e}")
    assert next_token <= 1e-4
    assert every <= 2e-4  # 30 fp32 layers; logits are O(10)
    assert torch.equal(ours[:, -1].argmax(-1), ref[:, -1].argmax(-1))


@pytest.fixture(scope="module")
def tiny_ckpts(smollm2_dir, module_tmp):
    tmp = module_tmp
    out = {}
    for name, mt, tied, over in [("llama", "llama", False, {}), ("qwen2", "qwen2", True, {})]:
        hf = tiny_hf_model(tmp / f"{mt}-hf", smollm2_dir, mt, tied, **over)
        r = convert(hf, tmp / f"{name}-ckpt", "--tp", "2", "--pp", "2")
        assert r.returncode == 0, r.stderr[-3000:]
        out[name] = (hf, tmp / f"{name}-ckpt")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen2"])
@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_tiny_models_match_transformers_at_each_layout(name, tp, pp, tiny_ckpts, tokens, tmp_path):
    hf, ckpt = tiny_ckpts[name]
    t, path = tokens
    diff = (megatron_logits(ckpt, tp, pp, path, tmp_path) - hf_logits(hf, t)).abs().max().item()
    assert diff <= 1e-4, f"{name} TP={tp} PP={pp}: max diff {diff}"


@pytest.mark.slow
def test_checkpoint_written_at_tp2_loads_at_tp1(tiny_ckpts, tokens, tmp_path):
    _, ckpt = tiny_ckpts["llama"]
    _, path = tokens
    resaved = tmp_path / "tp2-ckpt"
    at_tp2 = megatron_logits(ckpt, 2, 1, path, tmp_path, resaved)
    shutil.copy(ckpt / "model.json", resaved / "model.json")
    meta = json.loads((resaved / "model.json").read_text())
    assert meta["arch"]["architecture"] == "llama"
    at_tp1 = megatron_logits(resaved, 1, 1, path, tmp_path)
    assert torch.equal(at_tp1, at_tp2) or (at_tp1 - at_tp2).abs().max() < 1e-5


def test_import_errors_are_clear(smollm2_dir, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    r = convert(bad, tmp_path / "o1")
    assert r.returncode == 2 and "model_type 'gpt2' is not supported" in r.stderr
    # config says a smaller vocabulary than the tokenizer has
    small = tmp_path / "small"
    shutil.copytree(smollm2_dir, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (small / "config.json").write_text(json.dumps(cfg))
    r = convert(small, tmp_path / "o2")
    assert r.returncode == 2 and "tokenizer" in r.stderr and "has 49152 tokens" in r.stderr and "1000" in r.stderr
    r = convert(tmp_path / "missing", tmp_path / "o3")
    assert r.returncode == 2 and "no Hugging Face config" in r.stderr
