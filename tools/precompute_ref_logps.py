#!/usr/bin/env python
"""Score a pair dataset with the frozen reference model once and write the reference sidecar.

    torchrun --nproc-per-node G tools/precompute_ref_logps.py --data PREFIX --model CKPT_DIR [--tp N --pp M --cp C]

LongPO: the reference sees each turn's SHORT context; SoLoPO: the chosen response on the short and
the long context; pair kinds: the policy's own sequences (--reference-sees-policy: that for any
kind, e.g. plain DPO on LongPO data). Writes PREFIX.ref.safetensors, tied to the dataset's hash
(the trainer refuses a sidecar of another dataset). The reference runs at the RoPE base its
checkpoint records (model.json; an imported model's config.json): the original base for pi_S, the
enlarged one for a later round's reference (docs/iterative.md); --rope-theta overrides it; the
sidecar records the base that ran.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset prefix from tools/preprocess_pairs.py")
    p.add_argument("--model", required=True, help="reference checkpoint directory (tools/convert_checkpoint.py hf-to-megatron)")
    p.add_argument("--roles", nargs="*", help="reference roles to score (default: all of the dataset kind's)")
    p.add_argument("--out", help="sidecar path (default PREFIX.ref.safetensors)")
    p.add_argument("--reference-sees-policy", action="store_true",
                   help="score the policy's own sequence X for each ref role ref_X: plain DPO on a LongPO dataset "
                        "(the reference on the long context); write it to another --out and train with data.reference=")
    p.add_argument("--rope-theta", type=float, default=None,
                   help="score at this RoPE base instead of the checkpoint's: with --reference-sees-policy, plain DPO "
                        "whose reference is the initial policy at the enlarged base (train with the same model.rope_theta)")
    p.add_argument("--tensor-parallel", "--tp", dest="tp", type=int, default=1)
    p.add_argument("--pipeline-parallel", "--pp", dest="pp", type=int, default=1)
    p.add_argument("--context-parallel", "--cp", dest="cp", type=int, default=1)
    p.add_argument("--samples-per-microbatch", type=int, default=1)
    p.add_argument("--chunk-size", type=int, default=2048, help="sequence chunk of the log-prob computation")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 on GPUs (TE fused attention), fp32 on the CPU")
    p.add_argument("--no-tokenizer-check", action="store_true",
                   help="score a dataset even when its tokenizer (manifest) is not the model's (docs/reliability.md)")
    a = p.parse_args(argv)
    if a.rope_theta is not None and not a.rope_theta > 0:
        print(f"error: --rope-theta must be positive, got {a.rope_theta:g}", file=sys.stderr)
        return 2
    for flag in ("tp", "pp", "cp", "samples_per_microbatch", "chunk_size"):
        if getattr(a, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1, got {getattr(a, flag)}", file=sys.stderr)
            return 2
    from megatron_longpo import parallel
    from megatron_longpo.training.reference import precompute

    try:
        r = precompute(a.data, a.model, parallel.ParallelConfig(a.tp, a.pp, None, a.cp), roles=a.roles,
                       samples_per_microbatch=a.samples_per_microbatch, chunk_size=a.chunk_size, out_path=a.out,
                       bf16={'auto': None, 'bf16': True, 'fp32': False}[a.dtype],
                       policy_sequences=a.reference_sees_policy, check_tokenizer=not a.no_tokenizer_check,
                       rope_theta=a.rope_theta)
        import torch.distributed as dist

        if dist.get_rank() == 0:
            base = "the RoPE base asked for" if a.rope_theta is not None else "the checkpoint's RoPE base"
            print(f"reference log-probs of {r['samples']} samples ({', '.join(r['roles'])}) at {base} "
                  f"{r['arch'].rope_theta:g} -> {r['path']} in {r['seconds']:.1f} s")
    except Exception as e:  # noqa: BLE001 - a user's error or a fixable OS error is one line (errors.py); a bug re-raised
        from megatron_longpo.errors import EXIT_USER, report_user_error

        if not report_user_error(e):
            raise
        return EXIT_USER
    finally:
        parallel.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
