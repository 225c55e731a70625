#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron (dist_checkpointing) formats.

  hf-to-megatron  --hf-dir DIR --out DIR [--tp N --pp M]
"""
from __future__ import annotations

import argparse
import sys
import time


def hf_to_megatron(a: argparse.Namespace) -> None:
    from megatron_longpo.checkpoint.convert import hf_to_megatron_checkpoint

    t0 = time.time()
    r = hf_to_megatron_checkpoint(a.hf_dir, a.out, tp=a.tp, pp=a.pp)
    arch = r["arch"]
    print(
        f"imported {arch.architecture} ({arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads, vocab {arch.vocab_size} "
        f"padded to {arch.padded_vocab_size}, {r['parameters'] / 1e6:.1f}M parameters) -> {r['iteration_dir']} "
        f"in {time.time() - t0:.1f} s; loads at any TP/PP (checked for TP={a.tp}, PP={a.pp})"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hf-to-megatron", help="import a Hugging Face Llama/Mistral/Qwen2 model")
    h.add_argument("--hf-dir", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--tp", type=int, default=1, help="tensor-parallel size you will train with (validated)")
    h.add_argument("--pp", type=int, default=1, help="pipeline-parallel size you will train with (validated)")
    h.set_defaults(fn=hf_to_megatron)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        from megatron_longpo import parallel

        parallel.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
