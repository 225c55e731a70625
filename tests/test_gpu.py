"""GPU checks with the Transformer Engine spec (skipped where no CUDA GPU is found).

Run on a GPU machine with `pytest -m gpu tests/test_gpu.py -s`; the numbers they print are the
ones quoted in docs/foundation.md and docs/logprobs.md."""
import json
import sys

import pytest
import torch

from fixtures import ROOT, build_dataset
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


@pytest.fixture(scope="module")
def gpu_llama_ckpt(smollm2_dir, tmp_path_factory):
    """The random 8-layer Llama of fixtures.gpu_llama (hidden 512, 8 / 4 heads) as a checkpoint."""
    from fixtures import ROOT, gpu_llama, run_tool

    tmp = tmp_path_factory.mktemp("gpu_llama")
    run_tool(ROOT / "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", gpu_llama(tmp / "hf", smollm2_dir),
             "--out", tmp / "ckpt")
    return tmp / "ckpt"


def _checkpoint(request, model):
    return request.getfixturevalue("gpu_llama_ckpt" if model == "random" else "smollm2_ckpt")


def _grad_rel(grads, reference) -> float:
    """Relative error of a whole gradient (name -> tensor) against a reference; names mapped between
    the TE and the local spec (tools/compare_grads.py)."""
    sys.path.insert(0, str(ROOT / "tools"))
    from compare_grads import relative_error

    return relative_error(grads, reference)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("model", ["random", "smollm2"])
def test_cp2_longpo_step_matches_cp1(model, request, long_longpo, tmp_path):
    """A LongPO step at CP=2 gives CP=1's loss and gradients. Random Llama: within 1e-2 (the bar of
    issue #3). SmolLM2: its bf16 gradient of this step is itself far from fp32 at CP=1
    (docs/logprobs.md), so CP=2 must be no further than CP=1 from an fp32 reference (local spec)."""
    common = [f"model.checkpoint={_checkpoint(request, model)}", f"data.path={long_longpo}", "data.global_batch_size=2",
              "train.steps=1", "loss.name=longpo", "loss.longpo_lambda=1.0", "optim.distributed_optimizer=false",
              "model.bf16=true", f"train.save_dir={tmp_path}/unused", "train.tensorboard=false"]

    def grads(n, name, *extra):
        torchrun(n, "gpu_checks.py", "grads", tmp_path / f"{name}.pt", *common, *extra, timeout=600)
        return torch.load(tmp_path / f"{name}.pt")

    a, b = grads(1, "cp1"), grads(2, "cp2", "parallel.context_parallel=2")
    rel_loss = abs(a["metrics"]["loss"] - b["metrics"]["loss"]) / abs(a["metrics"]["loss"])
    rel_grad = _grad_rel(b["per_param"], a["per_param"])
    print(f"CP=2 vs CP=1 (bf16, {model}, LongPO): loss {a['metrics']['loss']:.6f} vs {b['metrics']['loss']:.6f} "
          f"(rel {rel_loss:.2e}); gradient rel. error {rel_grad:.2e}")
    assert rel_loss <= 1e-2

    def vs_fp32():
        ref = grads(1, "ref32", "model.bf16=false", "model.transformer_engine=false")
        return _grad_rel(a["per_param"], ref["per_param"]), _grad_rel(b["per_param"], ref["per_param"])

    _assert_gradients_agree(model, rel_grad, vs_fp32, "CP=1", "CP=2")


def _assert_gradients_agree(model, rel, vs_fp32, base, tested):
    """Random Llama: the two bf16 gradients within 1e-2 of each other. SmolLM2 (ill-conditioned in
    bf16): the tested layout no further than 1.25x the base layout from an fp32 reference
    (vs_fp32() -> their two distances)."""
    if model == "random":
        assert rel <= 1e-2
        return
    d_base, d_tested = vs_fp32()
    print(f"  vs fp32 (local spec): {base} {d_base:.2e}, {tested} {d_tested:.2e}")
    assert d_tested <= 1.25 * d_base


def _rel_errors(a, b):
    """(log-prob sums, whole gradient) relative errors of b against a (prefix_sharing.py outputs)."""
    stats = max(((a["stats"][r][0] - b["stats"][r][0]).abs() / a["stats"][r][0].abs()).max().item() for r in a["stats"])
    return stats, _grad_rel(b["grads"], a["grads"])


@pytest.fixture(scope="module")
def prefix_runs(request, long_longpo, tmp_path_factory):
    """run(model, gpus, share, precision) -> prefix_sharing.py's output for samples 0 and 1, each
    layout run once for all the tests below."""
    tmp, done = tmp_path_factory.mktemp("prefix"), {}

    def run(model, n, share, precision="auto"):
        key = (model, n, share, precision)
        if key not in done:
            out = tmp / ("-".join(map(str, key)) + ".pt")
            torchrun(n, "prefix_sharing.py", _checkpoint(request, model), long_longpo, "chosen,rejected", "0,1",
                     share, out, precision, timeout=600)
            done[key] = torch.load(out)
        return done[key]

    return run


@pytest.mark.parametrize("model", ["random", "smollm2"])
@pytest.mark.parametrize("cp", [1, 2])
def test_prefix_shared_te_matches_two_sequences(cp, model, prefix_runs):
    """Prefix-shared rows with TE (bf16) give the two-sequence log-prob sums and gradients. Random
    Llama: within 1e-2. SmolLM2 (ill-conditioned in bf16, see above): the shared layout no further
    from an fp32 two-sequence reference (local spec) than the bf16 two-sequence run is."""
    if torch.cuda.device_count() < cp:
        pytest.skip(f"needs {cp} GPUs")
    a, b = prefix_runs(model, 1, "0"), prefix_runs(model, cp, "1")
    stats, grads = _rel_errors(a, b)
    print(f"prefix-shared (TE, bf16, CP={cp}, {model}) vs two sequences (CP=1): log-prob sums rel. err {stats:.2e}, "
          f"gradient rel. err {grads:.2e}")
    assert stats <= 1e-2

    def vs_fp32():
        ref = prefix_runs(model, 1, "0", "fp32")
        return _rel_errors(ref, a)[1], _rel_errors(ref, b)[1]

    _assert_gradients_agree(model, grads, vs_fp32, "two sequences", "shared")


@pytest.mark.parametrize("data", ["documents", "synthetic"])
def test_bf16_gradient_as_close_to_fp32_as_transformers(data, smollm2_dir, tmp_path):
    """tools/check_numerics.py on one GPU (docs/logprobs.md "Numerics"): SFT and LongPO (λ = 1)
    on ~3.4K-token sequences, RoPE base as is and x10; every project bf16 row (TE spec with the
    packed THD batch, and the local spec) within 2x transformers' own bf16-vs-fp32 distance on
    the same batch: the gradient in every case, the loss on the mean over the cases (one case's
    loss error is a single draw: transformers' own ranged 2.3e-4 to 6.7e-2 over the 8 cases
    measured on an H200, 2026-11-29; docs/logprobs.md)."""
    from fixtures import run_tool

    out = tmp_path / "numerics.json"
    extra = ["--synthetic-words", "3000"] if data == "synthetic" else ["--prompt-tokens", "3072"]
    r = run_tool(ROOT / "tools/check_numerics.py", "--hf-dir", smollm2_dir, "--json", out, *extra, timeout=1800, check=False)
    print(r.stdout[-6000:])
    res = json.loads(out.read_text())
    assert res["te"], "the TE-spec row did not run (Transformer Engine missing?)"
    assert not res["failures"], res["failures"]
