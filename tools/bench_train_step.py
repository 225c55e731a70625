#!/usr/bin/env python
"""One LongPO training step (policy forward + backward on one pair, offline reference statistics,
NLL + DPO, optimizer step) with random weights of Mistral-7B layer shapes, two separate sequences
vs. the prefix-shared row, at several lengths. Prints a table; --json writes it.

  # 4 Mistral-7B layers on one GPU
  torchrun --nproc-per-node 1 tools/bench_train_step.py --layers 4 --lengths 16384,32768,65536,131072
  # LongPO's NLL over the whole chosen sequence (the default) next to the responses-only ablation
  torchrun --nproc-per-node 1 tools/bench_train_step.py --layers 4 --lengths 65536,131072 \
      --longpo-nll sequence,responses
  # the longest pair that fits: 32 layers, CP=2 on two GPUs, full recompute
  torchrun --nproc-per-node 2 tools/bench_train_step.py --layers 32 --cp 2 --layouts shared \\
      --recompute full --lengths 65536,131072,196608,262144 --until-oom

Lengths are tokens per sequence (prompt + response); every pair has a response of --response
tokens on each side. Model FLOPs are those of the layout that runs (metrics.model_flops_per_token:
causal attention counted as half the square, recomputation not counted, the output layer on the
positions it runs on: the responses, and with --longpo-nll sequence every position of the chosen
sequence too); MFU against the dense
bf16 peak of the GPU (metrics.PEAK_TFLOPS: 989 TFLOP/s for H100/H200).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1e6,
                  tie_word_embeddings=False, hidden_act="silu")


class _PairSample:
    """A synthetic LongPO pair: a shared prompt and two responses of `response` tokens."""

    def __init__(self, length: int, response: int, seed: int):
        from megatron_longpo.data.schema import Sequence

        rng = np.random.default_rng(seed)
        prompt = rng.integers(10, 32000, length - response)
        self.index = seed
        self._seqs = {}
        for role in ("chosen", "rejected"):
            tokens = np.concatenate([prompt, rng.integers(10, 32000, response)]).astype(np.int64)
            mask = np.zeros(length, bool)
            mask[length - response:] = True
            self._seqs[role] = [Sequence(tokens, mask)]

    def sequences(self, role):
        return self._seqs[role]


def batch_for(layout, sample, cp, cp_rank, cp_group, ref, trunk_skip=True, sequence_roles=()):
    from megatron_longpo.data.packing import pack
    from megatron_longpo.data.prefix_sharing import build_shared_row, flops_spans
    from megatron_longpo.training.step import prepare_batch, prepare_shared_batch

    roles = ("chosen", "rejected")
    pad = 2 * cp if cp > 1 else 1
    if layout == "shared":
        row = build_shared_row([sample], roles, cp_size=cp, pad_multiple=pad, sequence_roles=sequence_roles)
        return prepare_shared_batch(row, ref, cp_rank=cp_rank, cp_group=cp_group, device=DEVICE), \
            flops_spans(row, last_layer_trunk=None if trunk_skip else True)
    packed = pack([sample], roles, pad)
    lens = (packed.cu_seqlens[1:] - packed.cu_seqlens[:-1]).tolist()
    return prepare_batch(packed, ref, thd=DEVICE == "cuda", cp_size=cp, cp_rank=cp_rank, device=DEVICE,
                         sequence_roles=sequence_roles), [(n, n) for n in lens]


def run_layout(args, arch, par, layout, recompute, lengths, world, longpo_nll="sequence"):
    from megatron.core import parallel_state as ps

    from megatron_longpo.config import OptimSection
    from megatron_longpo.losses import LossConfig, SeqStat, sequence_roles
    from megatron_longpo.models.build import ModelOptions
    from megatron_longpo.training import metrics as M
    from megatron_longpo.training.loop import build_engine, engine_forward_backward

    opts = ModelOptions(bf16=DEVICE == "cuda", recompute=recompute, prefix_sharing=layout == "shared",
                        skip_unused_trunk=not args.no_trunk_skip,
                        max_sequence_length=max(lengths))
    chunks, optimizer = build_engine(arch, par, opts, OptimSection(lr=1e-7, warmup_fraction=0.0), None)
    loss_cfg = LossConfig(name="longpo", beta=0.1, longpo_lambda=0.01, longpo_nll=longpo_nll)
    seq_roles = sequence_roles(loss_cfg)
    cp_group = ps.get_context_parallel_group() if par.context_parallel > 1 else None
    cp_rank = ps.get_context_parallel_rank()
    ref = {"ref_chosen": SeqStat(torch.tensor([-400.0]), torch.tensor([float(args.response)])),
           "ref_rejected": SeqStat(torch.tensor([-420.0]), torch.tensor([float(args.response)]))}
    peak = M.peak_tflops(None)
    rows = []
    for length in lengths:
        name = layout + (" (last layer's trunk too)" if layout == "shared" and args.no_trunk_skip else "")
        row = {"layout": name, "nll": longpo_nll, "length": length, "recompute": recompute or "none",
               "layers": arch.num_layers, "gpus": world}
        try:
            batch, spans = batch_for(layout, _PairSample(length, args.response, seed=length), par.context_parallel,
                                     cp_rank, cp_group, ref, trunk_skip=not args.no_trunk_skip, sequence_roles=seq_roles)
            step = partial(train_step, engine_forward_backward, chunks, optimizer, batch, loss_cfg, cp_group)
            times = []
            for i in range(args.warmup + args.iters):
                _sync()
                if i == args.warmup and DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step()
                _sync()
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            sec = float(np.median(times))
            if args.profile:
                profile_step(step, f"{layout} {length}", args.profile)
            # the output layer: both responses, plus the chosen sequence's other predicted positions
            scored = 2 * args.response + ((length - 1 - args.response) if seq_roles else 0)
            flops = M.batch_model_flops(arch, spans, scored_tokens=scored)
            tflops = flops / sec / world / 1e12
            row.update(seconds=sec, tokens_per_s=2 * length / sec, model_tflops_per_gpu=tflops,
                       mfu=tflops / peak if peak else None,
                       peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
                       tokens_run=sum(s[0] for s in spans), status="ok")
        except torch.OutOfMemoryError:  # noqa: PERF203
            row.update(status="OOM")
        rows.append(row)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(row), flush=True)
        batch = step = None  # the step holds the batch too; an out-of-memory step must let it go as well
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if row["status"] == "OOM" and args.until_oom:
            break
    del chunks, optimizer
    gc.collect()
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return rows


def train_step(forward_backward, chunks, optimizer, batch, loss_cfg, cp_group):
    """One measured step: forward and backward of the pair, then the optimizer."""
    forward_backward(chunks, optimizer, [batch], loss_cfg, 4096, cp_group)
    optimizer.step()


def profile_step(step, title: str, top: int):
    """One more step under torch.profiler; rank 0 prints the GPU kernels that took the most time
    (on the CPU: the operators' CPU time), and the step's wall time next to their sum."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    gpu = DEVICE == "cuda"
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])) as prof:
        step()
        _sync()
    wall = time.perf_counter() - t0
    if torch.distributed.get_rank() == 0:
        events = prof.key_averages()
        if gpu:  # kernels only: an operator's row repeats the time of the kernels it launched
            key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
            events = [e for e in events if e.device_type == DeviceType.CUDA]
        else:
            key = "self_cpu_time_total"
        total = sum(getattr(e, key) for e in events) / 1e6
        print(f"\n== profile: {title} (one step under the profiler: {wall:.3f} s wall, "
              f"{'GPU kernels' if gpu else 'CPU operators'} {total:.3f} s)")
        for e in sorted(events, key=lambda e: -getattr(e, key))[:top]:
            t = getattr(e, key) / 1e6
            print(f"{t:8.4f} s {100 * t / total:5.1f}% x{e.count:<5d} {e.key[:110]}")


def print_table(rows, peak):
    print(f"\n| layout | LongPO NLL | length | layers | GPUs | recompute | s / pair | pair tokens/s | model TFLOP/s/GPU | MFU (peak {peak:g}) | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["layout"], r["length"], r.get("nll", "responses"))):
        head = f"| {r['layout']} | {r.get('nll', 'responses')} | {r['length']} | {r['layers']} | {r['gpus']} | {r['recompute']}"
        if r["status"] != "ok":
            print(f"{head} | {r['status']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        print(f"{head} | {r['seconds']:.3f} | "
              f"{r['tokens_per_s']:,.0f} | {r['model_tflops_per_gpu']:.0f} | {mfu} | {r['peak_mem_gib']:.1f} |")


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lengths", default="16384,32768,65536,131072")
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--layouts", default="two,shared")
    p.add_argument("--cp", type=int, default=None, help="context parallel size (default: the world size)")
    p.add_argument("--recompute", choices=["full", "selective"], default=None)
    p.add_argument("--recompute-on-oom", action="store_true", help="rerun lengths that ran out of memory with full recompute")
    p.add_argument("--until-oom", action="store_true", help="stop a layout at its first out-of-memory length")
    p.add_argument("--no-trunk-skip", action="store_true",
                   help="shared layout: compute the last layer's trunk queries too (models/prefix_attention.py skips "
                        "them: no scored token reads them), to measure what the skip saves")
    p.add_argument("--longpo-nll", default="sequence",
                   help="comma-separated loss.longpo_nll modes to run (sequence: the NLL over the whole chosen sequence, "
                        "the paper's; responses: the chosen responses only), e.g. sequence,responses for both side by side")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing each length, profile one more step and print its N most costly GPU kernels")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jsonl", help="append the rows here, one JSON object per line")
    p.add_argument("--table", metavar="JSONL", help="print the table of the rows in this file and exit")
    p.add_argument("--tiny", action="store_true", help="a 64-wide model: a quick run of the script itself on the CPU")
    args = p.parse_args(argv)
    if args.table:
        rows = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]
        from megatron_longpo.training import metrics as M

        print_table(rows, M.peak_tflops(None) or 0)
        return 0
    modes = args.longpo_nll.split(",")
    from megatron_longpo.losses import LONGPO_NLL_MODES

    if any(m not in LONGPO_NLL_MODES for m in modes):
        print(f"--longpo-nll: each mode must be one of {', '.join(LONGPO_NLL_MODES)}, got {args.longpo_nll!r}",
              file=sys.stderr)
        return 2
    if DEVICE != "cuda" and not args.tiny:
        print("bench_train_step measures GPUs (Transformer Engine); on the CPU only --tiny runs", file=sys.stderr)
        return 2
    os.environ.setdefault("NVTE_FUSED_ATTN", "1")
    from megatron_longpo import parallel, platform
    from megatron_longpo.models.hf_config import arch_from_hf_config
    from megatron_longpo.training import metrics as M

    lengths = [int(x) for x in args.lengths.split(",")]
    platform.enable_cpu_fallback()
    _, world = parallel.init_distributed()
    cp = args.cp or world
    par = parallel.ParallelConfig(context_parallel=cp)
    shape = dict(MISTRAL_7B, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128) if args.tiny else MISTRAL_7B
    arch = arch_from_hf_config({**shape, "num_hidden_layers": args.layers, "max_position_embeddings": max(lengths)})
    parallel.setup(par, seed=0, arch=arch, cpu_cp=True)
    rows = []
    for layout in args.layouts.split(","):
        for mode in modes:
            got = run_layout(args, arch, par, layout, args.recompute, lengths, world, mode)
            rows += got
            oom = [r["length"] for r in got if r["status"] == "OOM"]
            if oom and args.recompute_on_oom and args.recompute is None:
                rows += run_layout(args, arch, par, layout, "full", oom, world, mode)
    if torch.distributed.get_rank() == 0:
        name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (--tiny)"
        print(f"\n{name} x{world}, {'tiny' if args.tiny else 'Mistral-7B'} layer shapes x {args.layers} layers, responses "
              f"{args.response} tokens, CP={cp}, median of {args.iters} steps after {args.warmup} warm-up")
        print_table(rows, M.peak_tflops(None) or 0)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=2))
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
    parallel.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
