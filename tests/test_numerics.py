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
    assert row["loss_rel_hf_fp32"] < 1e-5, row
    assert row["grad_rel_hf_fp32"] <= 1e-4, row
    assert row["cos_hf_fp32"] > 1 - 1e-8, row
    worst_name, worst = row["worst_hf_fp32"][0]
    assert worst <= 5e-3, f"{worst_name}: {worst:.2e}"
