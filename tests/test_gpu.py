"""GPU checks with the Transformer Engine spec (skipped where no CUDA GPU is found).

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py -s`; the numbers they print are the
ones quoted in docs/foundation.md and docs/logprobs.md."""
import json

import pytest
import torch

from fixtures import build_dataset
from mp import torchrun

pytestmark = pytest.mark.gpu


def test_smollm2_bf16_te_matches_transformers(smollm2_ckpt, smollm2_dir, tmp_path):
    torchrun(1, "gpu_checks.py", "te_logits", smollm2_ckpt, smollm2_dir, tmp_path / "r.json", timeout=600)
    r = json.loads((tmp_path / "r.json").read_text())
    print("SmolLM2 TE bf16 vs transformers:", r)
    assert "TEDotProductAttention" in r["core_attention"] and "bfloat16" in r["dtype"]
    # bf16 (8 bits of mantissa) over 30 layers, logits of magnitude ~20-30: agree to about 1-2%
    assert r["next_token_max_abs_diff_vs_hf_float32"] < 0.05 * r["logit_scale_float32"]
    assert r["next_token_argmax_agree_float32"]


@pytest.fixture(scope="module")
def long_longpo(smollm2_ckpt, smollm2_dir, tmp_path_factory):
    """Synthetic LongPO samples with ~4K-token long contexts, reference from SmolLM2."""
    tmp = tmp_path_factory.mktemp("long")
    return build_dataset(tmp, "longpo", 4, smollm2_dir, smollm2_ckpt, context_words=3000)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp2_longpo_step_matches_cp1(smollm2_ckpt, long_longpo, tmp_path):
    common = [f"model.checkpoint={smollm2_ckpt}", f"data.path={long_longpo}", "data.global_batch_size=2",
              "train.steps=1", "loss.name=longpo", "loss.longpo_lambda=1.0", "optim.distributed_optimizer=false",
              "model.bf16=true", f"train.save_dir={tmp_path}/unused"]
    torchrun(1, "gpu_checks.py", "grads", tmp_path / "cp1.pt", *common, timeout=600)
    torchrun(2, "gpu_checks.py", "grads", tmp_path / "cp2.pt", *common, "parallel.context_parallel=2", timeout=600)
    a, b = torch.load(tmp_path / "cp1.pt"), torch.load(tmp_path / "cp2.pt")
    rel_loss = abs(a["metrics"]["loss"] - b["metrics"]["loss"]) / abs(a["metrics"]["loss"])
    rel_grad = ((a["grad"] - b["grad"]).norm() / a["grad"].norm()).item()
    print(f"CP=2 vs CP=1 (bf16, SmolLM2, LongPO): loss {a['metrics']['loss']:.6f} vs {b['metrics']['loss']:.6f} "
          f"(rel {rel_loss:.2e}); gradient rel. error {rel_grad:.2e}")
    assert rel_loss <= 1e-2 and rel_grad <= 1e-2


def _rel_errors(a, b):
    stats = max(((a["stats"][r][0] - b["stats"][r][0]).abs() / a["stats"][r][0].abs()).max().item() for r in a["stats"])
    ga = torch.cat([g.flatten() for g in a["grads"].values()])
    gb = torch.cat([b["grads"][n].flatten() for n in a["grads"]])
    return stats, ((ga - gb).norm() / ga.norm()).item()


@pytest.mark.parametrize("cp", [1, 2])
def test_prefix_shared_te_matches_two_sequences(cp, smollm2_ckpt, long_longpo, tmp_path):
    """Prefix-shared rows with TE (bf16) give the two-sequence log-prob sums and gradients."""
    if torch.cuda.device_count() < cp:
        pytest.skip(f"needs {cp} GPUs")
    roles, samples = "chosen,rejected", "0,1"
    torchrun(1, "prefix_sharing.py", smollm2_ckpt, long_longpo, roles, samples, "0", tmp_path / "two.pt", timeout=600)
    torchrun(cp, "prefix_sharing.py", smollm2_ckpt, long_longpo, roles, samples, "1", tmp_path / "shared.pt", timeout=600)
    a, b = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "shared.pt")
    stats, grads = _rel_errors(a, b)
    print(f"prefix-shared (TE, bf16, CP={cp}) vs two sequences (CP=1): log-prob sums rel. err {stats:.2e}, "
          f"gradient rel. err {grads:.2e}; sums {[a['stats'][r][0].tolist() for r in a['stats']]} vs "
          f"{[b['stats'][r][0].tolist() for r in b['stats']]}")
    assert stats <= 1e-2 and grads <= 3e-2
