#!/usr/bin/env python3
"""Compare the one-step gradients that `megatron_longpo.checks.first_step` saved for several layouts.

    python tools/compare_grads.py PREFIX

reads PREFIX.cp1.pt (bf16, TE, one GPU), PREFIX.cp2.pt (bf16, TE, CP=2), PREFIX.mb2.pt (bf16, TE,
two samples per micro-batch: the same math packed differently, i.e. the layout-independent noise
floor) and, if present, PREFIX.ref32.pt (fp32, local spec, one GPU: the reference) and
PREFIX.local16.pt (bf16, local spec's unfused attention, one GPU: a floor that reorders much more
than packing, with no CP in it). Prints the
relative error of the whole gradient of each bf16 layout against the fp32 reference, CP=2 against
CP=1 next to the packing floor, and the worst tensors. Used by `tools/gpu_checks.py cpgrads`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

# bf16 runs wrap the model once more (Float16Module); the TE spec fuses each norm into the next linear layer
_RENAMES = (("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
            ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"))


def canonical(name: str) -> str:
    name = name.replace("module.", "")
    for te, local in _RENAMES:
        name = name.replace(te, local)
    return name


def canonical_grads(grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """name -> gradient (float64) under the local spec's names."""
    return {canonical(n): g.double() for n, g in grads.items()}


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check_same_names(p: dict, ref: dict, what: str) -> None:
    if set(p) != set(ref):
        raise ValueError(f"{what} hold different parameters (e.g. {sorted(set(ref) ^ set(p))[:4]})")


def relative_error(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Relative error of a whole gradient (name -> tensor, TE or local-spec names) against a reference."""
    p, ref = canonical_grads(grads), canonical_grads(reference)
    _check_same_names(p, ref, "the two gradients")
    names = sorted(ref)
    return rel(torch.cat([p[n].flatten() for n in names]), torch.cat([ref[n].flatten() for n in names]))


def compare(runs: dict[str, dict], reference: str, names: list[str] | None = None) -> dict:
    """Relative error of every run (gpu_checks.py grads output) against `reference`, whole gradient
    and per tensor."""
    params = {k: canonical_grads(v["per_param"]) for k, v in runs.items()}
    ref = params[reference]
    names = names or sorted(ref)
    for k, p in params.items():
        _check_same_names(p, ref, f"{k} and {reference}")
    flat = {k: torch.cat([p[n].flatten() for n in names]) for k, p in params.items()}
    return {
        "whole": {k: rel(f, flat[reference]) for k, f in flat.items() if k != reference},
        "per_tensor": {k: {n: rel(p[n], ref[n]) for n in names} for k, p in params.items() if k != reference},
        "loss": {k: v["metrics"]["loss"] for k, v in runs.items()},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    prefix = argv[0]
    runs = {}
    for k in ("cp1", "cp2", "mb2", "ref32", "local16"):
        path = Path(f"{prefix}.{k}.pt")
        if path.exists():
            runs[k] = torch.load(path, map_location="cpu")
        elif k not in ("ref32", "local16"):
            print(f"error: {path} is missing (see cp_runs.log)", file=sys.stderr)
            return 2
    if "ref32" in runs:
        c = compare(runs, "ref32")
        w = c["whole"]
        print(f"vs fp32 (local spec, one GPU; loss {c['loss']['ref32']:.6f}): grad rel CP1 {w['cp1']:.2e}, "
              f"CP2 {w['cp2']:.2e}, 2 samples/micro-batch {w['mb2']:.2e}"
              + (f", bf16 local spec {w['local16']:.2e}" if "local16" in w else ""))
        worst = sorted(c["per_tensor"]["cp2"], key=c["per_tensor"]["cp2"].get, reverse=True)[:6]
        for n in worst:
            print(f"  vs fp32 {n:62s} CP2 {c['per_tensor']['cp2'][n]:.2e} CP1 {c['per_tensor']['cp1'][n]:.2e}")
    else:
        print("no fp32 reference (ref32.pt): see cp_runs.log")
    c = compare({k: runs[k] for k in ("cp1", "cp2", "mb2", "local16") if k in runs}, "cp1")
    loss = c["loss"]

    def lr(k):
        return abs(loss[k] - loss["cp1"]) / abs(loss["cp1"])

    print(f"loss CP1 {loss['cp1']:.6f} CP2 {loss['cp2']:.6f} (rel {lr('cp2'):.2e}); grad rel CP2 vs CP1 "
          f"{c['whole']['cp2']:.2e}; floor (2 samples/micro-batch vs 1): loss rel {lr('mb2'):.2e}, "
          f"grad rel {c['whole']['mb2']:.2e}")
    if "local16" in runs:
        print(f"bf16 local spec (unfused attention, one GPU) vs CP1: loss rel {lr('local16'):.2e}, "
              f"grad rel {c['whole']['local16']:.2e}  <- CP2 vs CP1 should be no larger")
    rows = sorted(c["per_tensor"]["cp2"], key=c["per_tensor"]["cp2"].get, reverse=True)
    for n in rows[:6] + rows[-3:]:
        print(f"  {n:66s} CP2 {c['per_tensor']['cp2'][n]:.2e} floor {c['per_tensor']['mb2'][n]:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
