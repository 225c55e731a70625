"""Hugging Face -> Megatron import gives transformers' logits, at TP=1, TP=2, PP=2, and across a
TP=2 -> TP=1 checkpoint round trip (gloo processes on the CPU, fp32)."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fixtures import run_captured, tiny_hf_model
from mp import torchrun

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about long documents.",
    "Explain why the sky is blue in one sentence.",
]


def convert(hf_dir, out, *extra):
    r = run_captured([sys.executable, str(ROOT / "tools/convert_checkpoint.py"), "hf-to-megatron", "--hf-dir", str(hf_dir),
                      "--out", str(out), *extra], timeout=600)
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


LAYOUTS = [(1, 1), (2, 1), (1, 2)]


@pytest.fixture(scope="module")
def megatron_logits(smollm2_ckpt, tiny_ckpts, tokens, module_tmp):
    """The logits of every (model, TP, PP) below, all from ONE 2-rank launch (tests/workers/
    logits_many.py): {(name, tp, pp): logits}; ("llama-resaved", 1, 1) is the llama checkpoint
    re-saved at TP=2 by that launch and loaded back at TP=1 after it (in the same process group)."""
    _, path = tokens
    jobs, keys = [], []

    def job(key, ckpt, tp, pp, **extra):
        out = module_tmp / f"logits_{key[0]}_tp{tp}_pp{pp}.pt"
        jobs.append({"ckpt": str(ckpt), "tp": tp, "pp": pp, "tokens": str(path), "out": str(out),
                     **{k: str(v) for k, v in extra.items()}})
        keys.append((key, out))

    job(("smollm2", 1, 1), smollm2_ckpt, 1, 1)
    for name, (_, ckpt) in tiny_ckpts.items():
        for tp, pp in LAYOUTS:
            extra = dict(save=module_tmp / "tp2-ckpt", meta_from=ckpt) if (name, tp, pp) == ("llama", 2, 1) else {}
            job((name, tp, pp), ckpt, tp, pp, **extra)
    job(("llama-resaved", 1, 1), module_tmp / "tp2-ckpt", 1, 1)
    spec = module_tmp / "jobs.json"
    spec.write_text(json.dumps(jobs))
    torchrun(2, "logits_many.py", spec, timeout=600)
    return {key: torch.load(out) for key, out in keys}


@pytest.mark.slow
@pytest.mark.budget(300, reason="the module's first test runs the one launch that loads all 8 checkpoint layouts "
                    "(SmolLM2 included); 149 s in the 2-worker CI run")
def test_smollm2_matches_transformers(smollm2_dir, smollm2_ckpt, megatron_logits, tokens):
    t, path = tokens
    assert "imported llama (30 layers" in (smollm2_ckpt.parent / "convert.log").read_text()
    ours = megatron_logits[("smollm2", 1, 1)]
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
@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_tiny_models_match_transformers_at_each_layout(name, tp, pp, tiny_ckpts, megatron_logits, tokens):
    hf, _ = tiny_ckpts[name]
    t, _ = tokens
    diff = (megatron_logits[(name, tp, pp)] - hf_logits(hf, t)).abs().max().item()
    assert diff <= 1e-4, f"{name} TP={tp} PP={pp}: max diff {diff}"


@pytest.mark.slow
def test_checkpoint_written_at_tp2_loads_at_tp1(megatron_logits, module_tmp):
    meta = json.loads((module_tmp / "tp2-ckpt" / "model.json").read_text())
    assert meta["arch"]["architecture"] == "llama"
    at_tp2, at_tp1 = megatron_logits[("llama", 2, 1)], megatron_logits[("llama-resaved", 1, 1)]
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
