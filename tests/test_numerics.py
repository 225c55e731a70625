"""The project's gradient of one training step against transformers' gradient of the same loss on
the same batch (tools/check_numerics.py; docs/logprobs.md "Numerics"). SmolLM2, CPU."""
import json

import pytest

from fixtures import ROOT, run_tool

pytestmark = pytest.mark.slow


def check(tmp_path, smollm2_dir, *args) -> dict:
    out = tmp_path / "numerics.json"
    run_tool(ROOT / "tools/check_numerics.py", "--hf-dir", smollm2_dir, "--rope-scale", "1", "--no-plain",
             "--json", out, *args, timeout=1800, check=False)
    assert out.is_file(), "tools/check_numerics.py wrote no result"
    return json.loads(out.read_text())


@pytest.mark.parametrize("loss", ["sft", "longpo"])
def test_fp32_gradient_equals_transformers(loss, smollm2_dir, tmp_path):
    """fp32: the project's step (engine, packed batch, chunked log-probs, loss, DDP buffer) has
    transformers' gradient of METHODS.md's loss, whole and tensor by tensor."""
    [case] = check(tmp_path, smollm2_dir, "--losses", loss, "--prompt-tokens", "1024", "--fp32-only")["cases"]
    row = case["rows"]["project fp32 local"]
    # measured (2-core CPU, 2026-11-29): SFT loss 3.2e-6, gradient 1.08e-4, worst tensor 1.0e-3;
    # LongPO loss 1.07e-5, gradient 6.5e-5, worst 2.2e-4. Transformers fp32 is 4.3e-6 from its own
    # fp64 gradient on the SFT batch, the project 1.1e-4: a 1e-4-level difference that the
    # forward activations (fp32 floor, ~7e-7) do not show is still open (docs/logprobs.md), hence 2e-4
    assert row["loss_rel_hf_fp32"] < 2e-5, row
    assert row["grad_rel_hf_fp32"] <= 2e-4, row
    assert row["cos_hf_fp32"] > 1 - 1e-7, row
    worst_name, worst = row["worst_hf_fp32"][0]
    assert worst <= 5e-3, f"{worst_name}: {worst:.2e}"
