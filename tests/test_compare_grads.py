"""tools/compare_grads.py: gradients saved by different layouts compared under one naming."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_grads  # noqa: E402

LOCAL = ["decoder.layers.0.input_layernorm.weight", "decoder.layers.0.pre_mlp_layernorm.weight",
         "decoder.layers.0.self_attention.linear_qkv.weight", "output_layer.weight"]
TE = {"decoder.layers.0.input_layernorm.weight": "module.module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
      "decoder.layers.0.pre_mlp_layernorm.weight": "module.module.decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
      "decoder.layers.0.self_attention.linear_qkv.weight": "module.module.decoder.layers.0.self_attention.linear_qkv.weight",
      "output_layer.weight": "module.module.output_layer.weight"}


def _run(grads: dict[str, torch.Tensor], te: bool, loss: float) -> dict:
    return {"per_param": {(TE[n] if te else n): g for n, g in grads.items()}, "metrics": {"loss": loss}}


def test_te_and_local_names_meet_and_errors_are_relative_norms():
    g = torch.Generator().manual_seed(0)
    ref = {n: torch.randn(3, 5, generator=g, dtype=torch.float64) for n in LOCAL}
    noise = {n: torch.randn(3, 5, generator=g, dtype=torch.float64) for n in LOCAL}
    bf = {n: ref[n] + 0.1 * noise[n] for n in LOCAL}
    c = compare_grads.compare({"ref32": _run(ref, False, 2.0), "cp1": _run(bf, True, 2.1)}, "ref32")
    whole = torch.cat([noise[n].flatten() for n in sorted(LOCAL)]).norm() * 0.1
    expect = (whole / torch.cat([ref[n].flatten() for n in sorted(LOCAL)]).norm()).item()
    assert c["whole"]["cp1"] == pytest.approx(expect, rel=1e-12)
    n = LOCAL[0]
    assert c["per_tensor"]["cp1"][n] == pytest.approx((0.1 * noise[n].norm() / ref[n].norm()).item(), rel=1e-12)
    assert c["loss"] == {"ref32": 2.0, "cp1": 2.1}


def test_a_missing_parameter_is_named():
    ref = {n: torch.ones(2) for n in LOCAL}
    short = {n: torch.ones(2) for n in LOCAL[1:]}
    with pytest.raises(ValueError, match="input_layernorm"):
        compare_grads.compare({"ref32": _run(ref, False, 1.0), "cp1": _run(short, True, 1.0)}, "ref32")


def test_cli_prints_every_comparison(tmp_path, capsys):
    g = torch.Generator().manual_seed(1)
    ref = {n: torch.randn(4, generator=g) for n in LOCAL}
    for k, scale in (("cp1", 0.0), ("cp2", 0.01), ("mb2", 0.001)):
        torch.save(_run({n: t + scale for n, t in ref.items()}, True, 1.0 + scale), tmp_path / f"x.{k}.pt")
    assert compare_grads.main([str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "no fp32 reference" in out and "grad rel CP2 vs CP1" in out
    torch.save(_run(ref, False, 1.0), tmp_path / "x.ref32.pt")
    assert compare_grads.main([str(tmp_path / "x")]) == 0
    assert "vs fp32" in capsys.readouterr().out
    torch.save(_run({n: t + 0.02 for n, t in ref.items()}, False, 1.02), tmp_path / "x.local16.pt")
    assert compare_grads.main([str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "bf16 local spec" in out and "loss rel 2.00e-02" in out
    (tmp_path / "x.cp2.pt").unlink()
    assert compare_grads.main([str(tmp_path / "x")]) == 2


def test_relative_error_of_a_whole_gradient_across_namings():
    g = torch.Generator().manual_seed(2)
    ref = {n: torch.randn(3, generator=g, dtype=torch.float64) for n in LOCAL}
    run = {TE[n]: 1.5 * t for n, t in ref.items()}  # TE names, every tensor scaled: relative error 0.5
    assert compare_grads.relative_error(run, ref) == pytest.approx(0.5, rel=1e-12)
    with pytest.raises(ValueError, match="input_layernorm"):
        compare_grads.relative_error({TE[n]: t for n, t in ref.items() if n != LOCAL[0]}, ref)
