"""The project's gradient of one training step against transformers' gradient of the same loss on
the same batch (tools/check_numerics.py; docs/logprobs.md "Numerics"). SmolLM2, CPU."""
import json

import pytest
import torch

from fixtures import ROOT, run_tool


def check(tmp_path, smollm2_dir, *args) -> dict:
    out = tmp_path / "numerics.json"
    run_tool(ROOT / "tools/check_numerics.py", "--hf-dir", smollm2_dir, "--rope-scale", "1", "--no-plain",
             "--json", out, *args, timeout=1800, check=False)
    assert out.is_file(), "tools/check_numerics.py wrote no result"
    return json.loads(out.read_text())


LOSSES = ["sft", "longpo"]


@pytest.fixture(scope="module")
def fp32_cases(smollm2_dir, module_tmp):
    """Both losses' fp32 cases from one run of the tool (one model load and import for both): a
    512-token prompt and 256-token responses (768-token sequences; at 1,024 prompt tokens the same
    comparisons read within 1.3x of these, at twice the time and 7.3 GiB against 6.0)."""
    cases = check(module_tmp, smollm2_dir, "--losses", *LOSSES, "--prompt-tokens", "512", "--fp32-only", "--fp64")["cases"]
    assert sorted(c["loss"] for c in cases) == sorted(LOSSES), [c["loss"] for c in cases]
    return {c["loss"]: c for c in cases}


@pytest.mark.slow
@pytest.mark.budget(400, reason="the first case runs the fixture: SmolLM2 in float64 (transformers) and fp32 (the "
                    "project) for both losses, one process; 168 s alone on the 2-core CPU, about twice that "
                    "beside the other xdist worker")
@pytest.mark.parametrize("loss", LOSSES)
def test_fp32_gradient_equals_transformers(loss, fp32_cases):
    """fp32: the project's step (engine, packed batch, chunked log-probs, loss, DDP buffer) has
    transformers' gradient of docs/methods.md's loss, whole and tensor by tensor; and it is as close to
    exact arithmetic (transformers in float64, loss head too) as transformers' fp32 gradient is."""
    case = fp32_cases[loss]
    row = case["rows"]["project fp32 local"]
    # measured (2-core CPU dev machine, the reference's loss head in float64, 512-token prompt): SFT loss
    # 1.6e-8, gradient 2.2e-6, worst tensor 7.6e-6; LongPO 1.4e-7, 2.8e-6, 8.9e-6. With the head in fp32
    # (torch's CPU log_softmax, biased ~1e-6 per element) an earlier comparison at 1,024 tokens read
    # 1.08e-4 / worst 1.0e-3: the reference's error
    assert row["loss_rel_hf_fp32"] < 2e-6, row
    assert row["grad_rel_hf_fp32"] <= 2e-5, row  # issue #17 asks <= 1e-4
    assert row["cos_hf_fp32"] > 1 - 1e-9, row
    worst_name, worst = row["worst_hf_fp32"][0]
    assert worst <= 1e-4, f"{worst_name}: {worst:.2e}"
    # against float64 (SFT: transformers fp32 3.7e-6, the project 3.4e-6; LongPO 2.7e-6 / 2.6e-6): no
    # worse than 2x transformers
    exact = case["fp64"]
    ours, theirs = exact["project fp32 local"], exact["transformers fp32"]
    assert ours["grad_rel"] <= 2 * theirs["grad_rel"], exact
    assert ours["grad_rel"] <= 2e-5, exact
    assert ours["loss_rel"] <= 2e-6, exact


def test_fp32_logprob_head_is_unbiased():
    """The chunked log-probs (logprobs.py) in fp32 against float64, on a 49,152-token vocabulary:
    no bias. A bias does not average out over the vocabulary and the tokens as rounding does; it is
    what made torch's fp32 log_softmax on the CPU (mean error +9.7e-7 on these rows, 2-core CPU dev
    machine) the 1e-4 gradient error of the old reference (docs/logprobs.md "The fp32 floor")."""
    from megatron_longpo.logprobs import target_logprobs

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 1, 64, generator=g)
    weight = torch.randn(49152, 64, generator=g) * (3 / 8)  # logits of std ~3, as a trained model's
    labels = torch.randint(0, 49152, (1, 64), generator=g)
    # (not logprobs.naive_target_logprobs: it casts its logits to fp32, float64 inputs or not)
    exact = torch.log_softmax(hidden.double()[:, 0] @ weight.double().t(), -1).gather(-1, labels.t())[:, 0]
    ours = target_logprobs(hidden, weight, labels, chunk_size=16)[0].double() - exact
    # measured: mean -1.5e-7 (the fp32 logits' own rounding), max 2.2e-6
    assert abs(float(ours.mean())) < 4e-7, float(ours.mean())
    assert float(ours.abs().max()) < 1e-5
