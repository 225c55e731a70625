#!/usr/bin/env python3
"""The longest LongPO pair the memory plan (megatron_longpo/training/memory_plan.py) predicts to fit
one GPU's memory, for 1, 2, 4, 8, 16 GPUs: context parallel over all of them (CP=N), and tensor
parallel 2 with sequence parallel times CP=N/2. Prefix-shared pair, the paper's whole-sequence NLL,
full recompute, bf16 gradients, with and without the optimizer offloaded to the CPU.

A PROJECTION, not a measurement: the plan's activation constants are calibrated on one H200 at
CP=1 (docs/training.md, "Will it fit"); CP and TP divide them by CP and TP, which no multi-GPU run
has checked yet, and TE's context-parallel communication buffers are not in the plan.

    python tools/plan_longest.py                          # Mistral-7B's shape, 32 layers, H200s
    python tools/plan_longest.py --hf-config config.json --gpus 1,2,4,8 --device-gib 79.1
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1e6,
                  tie_word_embeddings=False, hidden_act="silu", num_hidden_layers=32,
                  max_position_embeddings=1 << 22)


def pair_inputs(base, length: int, response: int):
    """The plan's inputs for one prefix-shared pair of two `length`-token sequences."""
    return replace(base, row_tokens=length + response, scored_tokens=2 * response + (length - response))


def longest(base, device: float, response: int = 512, granularity: int = 8192, limit: int = 1 << 24):
    """The longest pair length (a multiple of `granularity`) whose planned peak is within `device`
    bytes, and its plan; (0, None) when not even `granularity` fits. The peak grows with the length,
    so: double, then bisect."""
    from megatron_longpo.training.memory_plan import plan

    def fits(n):
        p = plan(pair_inputs(base, n, response), device)
        return p.peak <= device, p

    ok, p = fits(granularity)
    if not ok:
        return 0, None
    lo, best = granularity, p
    hi = lo * 2
    while hi <= limit and fits(hi)[0]:
        lo, best, hi = hi, fits(hi)[1], hi * 2
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        ok, p = fits(mid)
        if ok:
            lo, best = mid, p
        else:
            hi = mid
    return lo, best


def layouts(gpus: int):
    yield dict(tp=1, cp=gpus, sequence_parallel=False)
    if gpus >= 2:
        yield dict(tp=2, cp=gpus // 2, sequence_parallel=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-config", help="a Hugging Face config.json (default: Mistral-7B's shape, 32 layers)")
    p.add_argument("--gpus", default="1,2,4,8,16")
    p.add_argument("--device-gib", type=float, default=None, help="memory of one GPU (default: an H200, 139.8)")
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--offload-fraction", type=float, default=0.75)
    a = p.parse_args(argv)

    from megatron_longpo.models.hf_config import arch_from_hf_config
    from megatron_longpo.training.memory_plan import GIB, H200_GIB, PlanInputs

    if a.hf_config:
        if not Path(a.hf_config).is_file():
            print(f"error: --hf-config {a.hf_config} does not exist", file=sys.stderr)
            return 2
        arch = arch_from_hf_config(json.loads(Path(a.hf_config).read_text()))
    else:
        arch = arch_from_hf_config(MISTRAL_7B)
    device = (a.device_gib or H200_GIB) * GIB
    print(f"PROJECTION (memory plan, calibrated at CP=1 on one H200; not measured on several GPUs): "
          f"{arch.architecture}, {arch.num_layers} layers, {a.device_gib or H200_GIB:.1f} GiB per GPU; "
          f"prefix-shared LongPO pair, {a.response}-token responses, whole-sequence NLL, full recompute, bf16 grads\n")
    print("| GPUs | layout | optimizer | longest pair | planned peak GiB | activations GiB | host GiB per GPU |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for n in (int(x) for x in a.gpus.split(",")):
        for lay in layouts(n):
            for off in (False, True):
                base = PlanInputs(arch, row_tokens=0, scored_tokens=0, dp=1, recompute="full", grad_dtype="bf16",
                                  cpu_offload=off, offload_fraction=a.offload_fraction if off else 1.0,
                                  precision_aware=off, **lay)
                length, pl = longest(base, device, a.response)
                name = f"TP={lay['tp']}" + (" SP" if lay["sequence_parallel"] else "") + f" CP={lay['cp']}"
                opt = f"offload {a.offload_fraction:g}" if off else "on the GPU"
                if pl is None:
                    print(f"| {n} | {name} | {opt} | does not fit | | | |")
                else:
                    print(f"| {n} | {name} | {opt} | {length:,} | {pl.peak / GIB:.1f} | {pl.activations / GIB:.1f} | "
                          f"{pl.host / GIB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
