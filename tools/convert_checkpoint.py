#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and Megatron (dist_checkpointing) formats.

  hf-to-megatron  --hf-dir DIR --out DIR [--tp N --pp M]
  megatron-to-hf  --megatron-dir DIR --out DIR [--iteration N] [--max-shard-size 2GB] [--dtype auto|bf16|fp16|fp32]
  reshard         --megatron-dir DIR --out DIR --tp N --pp M [--format dist|legacy] [--iteration N]

See docs/checkpoints.md. Errors (not a checkpoint, unfinished save, bad layout, unsupported
architecture) print one line and exit with status 2.
"""
from __future__ import annotations

import argparse
import sys
import time


def hf_to_megatron(a: argparse.Namespace) -> None:
    from megatron_longpo.checkpoint.convert import hf_to_megatron_checkpoint

    t0 = time.time()
    r = hf_to_megatron_checkpoint(a.hf_dir, a.out, tp=a.tp, pp=a.pp, overwrite=a.overwrite)
    arch = r["arch"]
    print(
        f"imported {arch.architecture} ({arch.num_layers} layers, hidden {arch.hidden_size}, "
        f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads, vocab {arch.vocab_size} "
        f"padded to {arch.padded_vocab_size}, {r['parameters'] / 1e6:.1f}M parameters) -> {r['iteration_dir']} "
        f"in {time.time() - t0:.1f} s; loads at any TP/PP (checked for TP={a.tp}, PP={a.pp})"
    )


def megatron_to_hf(a: argparse.Namespace) -> None:
    from megatron_longpo.checkpoint.export import megatron_to_hf_checkpoint
    from megatron_longpo.checkpoint.safetensors_writer import parse_size

    t0 = time.time()
    r = megatron_to_hf_checkpoint(a.megatron_dir, a.out, iteration=a.iteration, max_shard_bytes=parse_size(a.max_shard_size),
                                  dtype=a.dtype, overwrite=a.overwrite)
    arch = r["arch"]
    print(
        f"exported {r['iteration_dir']} -> {r['out']}: {arch.architecture}, {r['parameters'] / 1e6:.1f}M parameters "
        f"(vocab {arch.vocab_size}), {str(r['dtype']).removeprefix('torch.')}, {r['shards']} shard(s), "
        f"{r['bytes'] / 1e9:.2f} GB, rope_theta {arch.rope_theta:g}, max_position_embeddings "
        f"{arch.max_position_embeddings}, tokenizer files: {', '.join(r['tokenizer_files']) or 'none'} "
        f"in {time.time() - t0:.1f} s"
    )


def reshard(a: argparse.Namespace) -> None:
    from megatron_longpo.checkpoint.reshard import ReshardFailed, reshard_checkpoint

    t0 = time.time()
    try:
        r = reshard_checkpoint(a.megatron_dir, a.out, tp=a.tp, pp=a.pp, fmt=a.format, iteration=a.iteration,
                               names=a.names, overwrite=a.overwrite, timeout=a.timeout)
    except ReshardFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    what = "dist_checkpointing (loads at any TP/PP; optimizer state dropped)" if a.format == "dist" else (
        f"Megatron-LM legacy per-rank files ({a.names} names)")
    print(f"resharded {r['iteration_dir']} at TP={a.tp}, PP={a.pp} -> {r['out']} as {what} in {time.time() - t0:.1f} s")


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hf-to-megatron", help="import a Hugging Face Llama/Mistral/Qwen2 model")
    h.add_argument("--hf-dir", required=True)
    h.add_argument("--out", required=True)
    h.add_argument("--tensor-parallel", "--tp", dest="tp", type=int, default=1, help="tensor-parallel size you will train with (validated)")
    h.add_argument("--pipeline-parallel", "--pp", dest="pp", type=int, default=1, help="pipeline-parallel size you will train with (validated)")
    h.add_argument("--overwrite", action="store_true", help="replace --out if it is this tool's earlier output")
    h.set_defaults(fn=hf_to_megatron)
    e = sub.add_parser("megatron-to-hf", help="export a checkpoint (any TP/PP) as a Hugging Face model directory")
    e.add_argument("--megatron-dir", required=True, help="checkpoint directory (holds model.json and iter_*/)")
    e.add_argument("--out", required=True, help="Hugging Face directory to create")
    e.add_argument("--iteration", type=int, default=None, help="iteration to export (default: the one `latest` names)")
    e.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB, 5GiB")
    e.add_argument("--dtype", default="auto", choices=["auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32"],
                   help="weights dtype (auto: the dtype of the model the checkpoint was imported from)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is this tool's earlier output (anything else is never deleted)")
    e.set_defaults(fn=megatron_to_hf)
    r = sub.add_parser("reshard", help="load at TP/PP and save again (dist), or write Megatron-LM's legacy per-rank layout")
    r.add_argument("--megatron-dir", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tensor-parallel", "--tp", dest="tp", type=int, default=1)
    r.add_argument("--pipeline-parallel", "--pp", dest="pp", type=int, default=1)
    r.add_argument("--format", default="dist", choices=["dist", "legacy"],
                   help="dist: dist_checkpointing (model only); legacy: iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt")
    r.add_argument("--names", default="te", choices=["te", "local"],
                   help="legacy only: Transformer Engine module names (Megatron-LM's default) or the local spec's")
    r.add_argument("--iteration", type=int, default=None, help="iteration to read (default: the one `latest` names)")
    r.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is this tool's earlier output (anything else is never deleted)")
    r.add_argument("--timeout", type=int, default=3600, help="seconds before the worker processes are killed")
    r.set_defaults(fn=reshard)
    a = p.parse_args(argv)
    try:
        a.fn(a)
    except Exception as e:  # noqa: BLE001 - a user's error or a fixable OS error is one line (errors.py); a bug re-raised
        from megatron_longpo.errors import EXIT_USER, report_user_error

        if not report_user_error(e):
            raise
        return EXIT_USER
    finally:
        if "megatron.core.parallel_state" in sys.modules:  # export never imports megatron: keep it that way
            from megatron_longpo import parallel

            parallel.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
