#!/usr/bin/env python
"""One LongPO training step (policy forward + backward on one pair, offline reference statistics,
NLL + DPO, optimizer step) with random weights of Mistral-7B layer shapes, two separate sequences
vs. the prefix-shared row, at several lengths. Prints a table; --json writes it.

  # 4 Mistral-7B layers on one GPU (each configuration runs in its own torchrun process)
  python tools/bench_train_step.py --gpus 1 --layers 4 --lengths 16384,32768,65536,131072
  # LongPO's NLL over the whole chosen sequence (the default) next to the responses-only ablation
  python tools/bench_train_step.py --gpus 1 --layers 4 --lengths 65536,131072 --longpo-nll sequence,responses
  # the full 32-layer Mistral-7B on one H200: CPU Adam for 3/4 of the parameters, bf16 gradients,
  # full recompute; then the longest pair (doubling, then bisecting at 8K, one process per probe)
  python tools/bench_train_step.py --gpus 1 --layers 32 --layouts shared --recompute full \
      --offload 0.75 --grad-dtype bf16 --lengths 32768,65536,131072 --warmup 1 --iters 1
  python tools/bench_train_step.py --gpus 1 --layers 32 --layouts shared --recompute full \
      --offload 0.75 --grad-dtype bf16 --lengths 131072 --until-oom --warmup 1 --iters 1

Lengths are tokens per sequence (prompt + response); every pair has a response of --response
tokens on each side. Model FLOPs are those of the layout that runs (metrics.model_flops_per_token:
causal attention counted as half the square, recomputation not counted, the output layer on the
positions it runs on: the responses, and with --longpo-nll sequence every position of the chosen
sequence too); MFU against the dense
bf16 peak of the GPU (metrics.PEAK_TFLOPS: 989 TFLOP/s for H100/H200). Next to the measured peak:
the memory plan's prediction (training/memory_plan.py; docs/training.md "Will it fit").
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


import numpy as np
import torch

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
    from megatron_longpo.training.batch import prepare_batch, prepare_shared_batch

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


def optim_section(spec):
    from megatron_longpo.config import OptimSection

    o = spec.get("optim", {})
    return OptimSection(lr=1e-7, warmup_fraction=0.0, **o)


def describe_memory(spec) -> str:
    """A short label of the memory options of a configuration (the table's `memory` column)."""
    o = spec.get("optim", {})
    parts = []
    if o.get("cpu_offload"):
        parts.append(f"offload {o.get('offload_fraction', 1.0):g}" + (" overlap" if o.get("offload_overlap") else ""))
    elif o.get("precision_aware"):
        parts.append("precision-aware")
    if o.get("grad_dtype", "fp32") != "fp32":
        parts.append(f"{o['grad_dtype']} grads")
    if spec.get("activation_offload"):
        parts.append(f"act-offload {spec['activation_offload']}")
    return ", ".join(parts) or "-"


def recompute_kwargs(spec) -> dict:
    """The recompute of a configuration as ModelOptions and PlanInputs take it."""
    return dict(recompute=spec["recompute"], recompute_method=spec.get("recompute_method") or "uniform",
                recompute_num_layers=spec.get("recompute_layers") or 1,
                recompute_modules=spec.get("recompute_modules") if spec["recompute"] == "selective" else None)


def recompute_name(spec) -> str:
    """A row's recompute column, as the memory plan words it (none, full, "full, block, 12", "selective (mlp)")."""
    from megatron_longpo.training.memory_plan import recompute_words

    k = recompute_kwargs(spec)
    return recompute_words(k["recompute"], k["recompute_method"], k["recompute_num_layers"], k["recompute_modules"])


def predicted(arch, par, spec, row_tokens, scored, world):
    """The memory plan (training/memory_plan.py) of this configuration: peak and host GiB."""
    from megatron_longpo.models.megatron_config import precision_aware
    from megatron_longpo.training import memory_plan as MP

    o = optim_section(spec)
    p = MP.plan(MP.PlanInputs(arch, row_tokens=row_tokens, scored_tokens=scored, cp=par.context_parallel, dp=1,
                              bf16=DEVICE == "cuda", distributed_optimizer=DEVICE == "cuda", grad_dtype=o.grad_dtype,
                              cpu_offload=o.cpu_offload, offload_fraction=o.offload_fraction,
                              precision_aware=precision_aware(o), **recompute_kwargs(spec),
                              activation_offload_layers=spec.get("activation_offload", 0), logprob_chunk=4096),
                MP.device_bytes())
    return p


def run_layout(spec, arch, par, world):
    """One configuration (layout, NLL mode, recompute, memory options) over its lengths, in this
    process; stops at the first out-of-memory length when spec["stop_at_oom"]."""
    import resource

    from megatron_longpo.parallel import current_layout

    from megatron_longpo.losses import LossConfig, SeqStat, sequence_roles
    from megatron_longpo.models.build import ModelOptions
    from megatron_longpo.training import metrics as M
    from megatron_longpo.training.engine import build_engine, engine_forward_backward

    layout, lengths, longpo_nll = spec["layout"], spec["lengths"], spec["nll"]
    response = spec["response"]
    opts = ModelOptions(bf16=DEVICE == "cuda", **recompute_kwargs(spec), prefix_sharing=layout == "shared",
                        skip_unused_trunk=not spec["no_trunk_skip"], max_sequence_length=max(lengths) + response,
                        activation_offload_layers=spec.get("activation_offload", 0))
    t0 = time.perf_counter()
    chunks, optimizer = build_engine(arch, par, opts, optim_section(spec), None)
    _sync()
    build_s = time.perf_counter() - t0
    build_gib = torch.cuda.memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0
    loss_cfg = LossConfig(name="longpo", beta=0.1, longpo_lambda=0.01, longpo_nll=longpo_nll)
    seq_roles = sequence_roles(loss_cfg)
    par_layout = current_layout()
    cp_group, cp_rank = par_layout.cp_group, par_layout.cp_rank
    ref = {"ref_chosen": SeqStat(torch.tensor([-400.0]), torch.tensor([float(response)])),
           "ref_rejected": SeqStat(torch.tensor([-420.0]), torch.tensor([float(response)]))}
    peak = M.peak_tflops(None)
    rows = []
    for length in lengths:
        name = layout + (" (last layer's trunk too)" if layout == "shared" and spec["no_trunk_skip"] else "")
        row = {"layout": name, "nll": longpo_nll, "length": length, "recompute": recompute_name(spec),
               "layers": arch.num_layers, "gpus": world, "memory": describe_memory(spec), "build_gib": build_gib,
               "build_s": build_s}
        batch = step = None
        try:
            batch, spans = batch_for(layout, _PairSample(length, response, seed=length), par.context_parallel,
                                     cp_rank, cp_group, ref, trunk_skip=not spec["no_trunk_skip"], sequence_roles=seq_roles)
            # the output layer: both responses, plus the chosen sequence's other predicted positions
            scored = 2 * response + ((length - 1 - response) if seq_roles else 0)
            tokens_run = sum(s[0] for s in spans)
            plan = predicted(arch, par, spec, tokens_run, scored, world)
            row.update(predicted_peak_gib=plan.peak / 2**30, predicted_host_gib=plan.host / 2**30, tokens_run=tokens_run)
            split = {"fb": [], "opt": []}
            step = partial(train_step, engine_forward_backward, chunks, optimizer, batch, loss_cfg, par_layout, split)
            times = []
            for i in range(spec["warmup"] + spec["iters"]):
                _sync()
                if i == spec["warmup"] and DEVICE == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                step()
                _sync()
                if i >= spec["warmup"]:
                    times.append(time.perf_counter() - t0)
            sec = float(np.median(times))
            if spec.get("profile"):
                profile_step(step, f"{layout} {length}", spec["profile"])
            flops = M.batch_model_flops(arch, spans, scored_tokens=scored)
            tflops = flops / sec / world / 1e12
            row.update(seconds=sec, tokens_per_s=2 * length / sec, model_tflops_per_gpu=tflops,
                       mfu=tflops / peak if peak else None, fb_seconds=float(np.median(split["fb"][spec["warmup"]:])),
                       opt_seconds=float(np.median(split["opt"][spec["warmup"]:])),
                       peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else 0.0,
                       status="ok")
            if DEVICE == "cuda":  # what the allocator reserved (fragmentation included) and what the card has in use
                free, total = torch.cuda.mem_get_info()
                row.update(reserved_peak_gib=torch.cuda.max_memory_reserved() / 2**30,
                           device_used_gib=(total - free) / 2**30, device_gib=total / 2**30)
        except torch.OutOfMemoryError:  # noqa: PERF203
            row.update(status="OOM")
        row["host_peak_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        rows.append(row)
        if torch.distributed.get_rank() == 0:
            print(ROW_TAG + json.dumps(row), flush=True)
        batch = step = None  # the step holds the batch too; an out-of-memory step must let it go as well
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        if row["status"] == "OOM" and spec.get("stop_at_oom", True):
            break
    return rows


def train_step(forward_backward, chunks, optimizer, batch, loss_cfg, par_layout, split=None):
    """One measured step: forward and backward of the pair, then the optimizer (times into `split`)."""
    t0 = time.perf_counter()
    forward_backward(chunks, optimizer, [batch], loss_cfg, 4096, par_layout)
    _sync()
    t1 = time.perf_counter()
    optimizer.step()
    _sync()
    if split is not None:
        split["fb"].append(t1 - t0)
        split["opt"].append(time.perf_counter() - t1)


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
    print(f"\n| layout | LongPO NLL | length | layers | GPUs | recompute | memory options | s / pair (fwd+bwd / optimizer) "
          f"| pair tokens/s | model TFLOP/s/GPU | MFU (peak {peak:g}) | peak GiB | reserved GiB | plan GiB | plan error | after build GiB | host GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["layout"], r.get("memory", "-"), r.get("recompute", ""), r["length"], r.get("nll", "responses"))):
        head = (f"| {r['layout']} | {r.get('nll', 'responses')} | {r['length']} | {r['layers']} | {r['gpus']} | {r['recompute']} "
                f"| {r.get('memory', '-')}")
        plan = f"{r['predicted_peak_gib']:.1f}" if r.get("predicted_peak_gib") is not None else ""
        build = f"{r['build_gib']:.1f}" if r.get("build_gib") is not None else ""
        host = f"{r['host_peak_gib']:.1f}" if r.get("host_peak_gib") is not None else ""
        if r["status"] != "ok":
            print(f"{head} | {r['status']} | | | | | | {plan} | | {build} | {host} |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        err = (f"{100 * (r['predicted_peak_gib'] / r['peak_mem_gib'] - 1):+.0f}%"
               if r.get("predicted_peak_gib") and r.get("peak_mem_gib") else "")
        split = f" ({r['fb_seconds']:.2f} / {r['opt_seconds']:.2f})" if "fb_seconds" in r else ""
        reserved = f"{r['reserved_peak_gib']:.1f}" if r.get("reserved_peak_gib") is not None else ""
        print(f"{head} | {r['seconds']:.3f}{split} | {r['tokens_per_s']:,.0f} | {r['model_tflops_per_gpu']:.0f} | {mfu} "
              f"| {r['peak_mem_gib']:.1f} | {reserved} | {plan} | {err} | {build} | {host} |")


ROW_TAG = "BENCH_ROW "


def spawn(spec, gpus: int, timeout: float, jsonl: str | None = None) -> list[dict]:
    """Run one configuration in its own process(es) (torchrun, `gpus` ranks): an out-of-memory
    error, or a process the host killed, cannot hold memory that the next configuration needs.
    Each row is appended to `jsonl` as it arrives; a length whose row never came back is reported
    as `crashed (rc N)` (killed after `timeout` seconds: rc timeout)."""
    import random
    import subprocess
    import threading

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus),
           f"--master-port={20000 + random.randrange(20000)}", str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    rows = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timed_out = []

    def kill():
        # torchrun starts its workers in sessions of their own: SIGTERM lets it stop them, then SIGKILL it
        timed_out.append(True)
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()

    watchdog = threading.Timer(timeout, kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            if line.startswith(ROW_TAG):
                r = json.loads(line[len(ROW_TAG):])
                rows.append(r)
                if jsonl:
                    with open(jsonl, "a") as f:
                        f.write(json.dumps(r) + "\n")
                print(f"  {r['layout']} {r['nll']} {r['length']} {r['recompute']} [{r['memory']}]: {r['status']}"
                      + (f", {r['seconds']:.2f} s, peak {r['peak_mem_gib']:.1f} GiB (plan {r['predicted_peak_gib']:.1f})"
                         if r["status"] == "ok" else ""), flush=True)
            elif any(k in line for k in ("Error", "error:", "Traceback", "Killed")) and "Warn" not in line:
                print("  | " + line.rstrip()[:300], flush=True)
        rc = proc.wait()
    finally:
        watchdog.cancel()
    if timed_out:
        rc = "timeout"
    done = {r["length"] for r in rows}
    missing = [n for n in spec["lengths"] if n not in done]
    if missing and not (rows and rows[-1]["status"] == "OOM"):
        base = {"layout": spec["layout"], "nll": spec["nll"], "recompute": recompute_name(spec)}
        r = {**base, "length": missing[0], "layers": spec["layers"], "gpus": gpus, "memory": describe_memory(spec),
             "status": f"crashed (rc {rc})"}
        rows.append(r)
        if jsonl:
            with open(jsonl, "a") as f:
                f.write(json.dumps(r) + "\n")
    return rows


def until_oom(probe, start: int, granularity: int, max_length: int, deadline: float | None = None) -> tuple[int | None, list]:
    """The longest length that fits: `probe(lengths)` runs lengths in order in ONE process and returns
    their rows, stopping at the first that does not fit. Doubling from `start` (one process), then
    bisecting between the longest fit and the shortest failure (one process per probe) down to
    `granularity` tokens, or until time.time() passes `deadline`. Returns (longest fitting length or
    None, all rows)."""
    ladder = []
    n = start
    while n < max_length:
        ladder.append(n)
        n *= 2
    if ladder[-1:] != [max_length]:
        ladder.append(max_length)
    rows = probe(ladder)
    ok = [r["length"] for r in rows if r["status"] == "ok"]
    bad = [r["length"] for r in rows if r["status"] != "ok"]
    lo = max(ok) if ok else None
    hi = min(bad) if bad else None
    if hi is None:
        return lo, rows
    lo_b = lo if lo is not None else 0
    while hi - lo_b > granularity and (deadline is None or time.time() < deadline):
        mid = (lo_b + hi) // 2 // granularity * granularity
        if mid <= lo_b:
            break
        got = probe([mid])
        rows += got
        if got and got[-1]["status"] == "ok":
            lo_b = lo = mid
        else:
            hi = mid
    return lo, rows


def worker(spec) -> int:
    os.environ.setdefault("NVTE_FUSED_ATTN", "1")
    from megatron_longpo import parallel, platform
    from megatron_longpo.models.hf_config import arch_from_hf_config

    platform.enable_cpu_fallback()
    _, world = parallel.init_distributed()
    cp = spec.get("cp") or world
    par = parallel.ParallelConfig(context_parallel=cp)
    shape = dict(MISTRAL_7B, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128) \
        if spec["tiny"] else MISTRAL_7B
    arch = arch_from_hf_config({**shape, "num_hidden_layers": spec["layers"],
                                "max_position_embeddings": max(spec["lengths"]) + spec["response"]})
    parallel.setup(par, seed=0, arch=arch, cpu_cp=True)
    run_layout(spec, arch, par, world)
    parallel.teardown()
    return 0


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="Mistral-7B layers (32: the full model)")
    p.add_argument("--lengths", default="16384,32768,65536,131072")
    p.add_argument("--response", type=int, default=512)
    p.add_argument("--layouts", default="two,shared")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per configuration (default: all visible, 1 on the CPU)")
    p.add_argument("--context-parallel", "--cp", dest="cp", type=int, default=None, help="context parallel size (default: --gpus)")
    p.add_argument("--recompute", choices=["full", "selective"], default=None)
    p.add_argument("--recompute-method", choices=["uniform", "block"], default="uniform",
                   help="full recompute: uniform, or block (only the first --recompute-layers layers)")
    p.add_argument("--recompute-layers", type=int, default=1, help="model.recompute_num_layers")
    p.add_argument("--recompute-modules", help="selective recompute: mlp, layernorm, core_attn (comma-separated)")
    p.add_argument("--recompute-on-oom", action="store_true", help="rerun lengths that ran out of memory with full recompute")
    p.add_argument("--until-oom", action="store_true",
                   help="find the longest pair that fits: double from the first of --lengths, then bisect (--granularity)")
    p.add_argument("--granularity", type=int, default=8192, help="--until-oom: bisect down to this many tokens (8192)")
    p.add_argument("--max-length", type=int, default=1 << 20, help="--until-oom: do not try beyond this (1M)")
    p.add_argument("--offload", type=float, default=None, metavar="FRACTION",
                   help="optim.cpu_offload=true with this optim.offload_fraction (and the precision-aware optimizer)")
    p.add_argument("--offload-overlap", action="store_true", help="optim.offload_overlap=true")
    p.add_argument("--grad-dtype", choices=["fp32", "bf16"], default="fp32", help="optim.grad_dtype")
    p.add_argument("--activation-offload", type=int, default=0, metavar="N", help="model.activation_offload_layers")
    p.add_argument("--no-trunk-skip", action="store_true",
                   help="shared layout: compute the last layer's trunk queries too (models/prefix_attention.py skips "
                        "them: no scored token reads them), to measure what the skip saves")
    p.add_argument("--longpo-nll", default="sequence",
                   help="comma-separated loss.longpo_nll modes to run (sequence: the NLL over the whole chosen sequence, "
                        "the paper's; responses: the chosen responses only), e.g. sequence,responses for both side by side")
    p.add_argument("--warmup", type=int, default=1,
                   help="unmeasured steps first (default 1; 0 measures the first step, whose backward runs before Adam's "
                        "moments exist: torch creates them in the first optimizer step, so its peak is low)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing each length, profile one more step and print its N most costly GPU kernels")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration process")
    p.add_argument("--deadline", type=float, default=None, help="--until-oom: start no bisection probe after this many seconds")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--jsonl", help="append the rows here, one JSON object per line")
    p.add_argument("--table", metavar="JSONL", help="print the table of the rows in this file and exit")
    p.add_argument("--tiny", action="store_true", help="a 64-wide model: a quick run of the script itself on the CPU")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    from megatron_longpo.training import metrics as M

    if args.table:
        rows = [json.loads(x) for x in Path(args.table).read_text().splitlines() if x.strip()]
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print("run bench_train_step.py with python (it starts one torchrun per configuration): --gpus N", file=sys.stderr)
        return 2
    gpus = args.gpus or (torch.cuda.device_count() if DEVICE == "cuda" else 1)
    optim = {"grad_dtype": args.grad_dtype}
    if args.offload is not None:
        optim.update(cpu_offload=True, offload_fraction=args.offload, offload_overlap=args.offload_overlap)
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    t_start = time.time()
    for layout in args.layouts.split(","):
        for mode in modes:
            spec = dict(layout=layout, nll=mode, recompute=args.recompute, recompute_method=args.recompute_method,
                        recompute_layers=args.recompute_layers, lengths=lengths, response=args.response,
                        recompute_modules=tuple(args.recompute_modules.split(",")) if args.recompute_modules else None,
                        layers=args.layers, cp=args.cp or gpus, tiny=args.tiny, no_trunk_skip=args.no_trunk_skip,
                        warmup=args.warmup, iters=args.iters, profile=args.profile, optim=optim,
                        activation_offload=args.activation_offload, stop_at_oom=True)
            def probe(ls, spec=spec):
                return spawn({**spec, "lengths": ls}, gpus, args.timeout, args.jsonl)

            if args.until_oom:
                best, got = until_oom(probe, lengths[0], args.granularity, args.max_length,
                                      deadline=t_start + args.deadline if args.deadline else None)
                print(f"longest {layout} pair that fits ({mode} NLL, recompute {recompute_name(spec)}, "
                      f"{describe_memory(spec)}): {best if best else 'none'} tokens per sequence "
                      f"(granularity {args.granularity})", flush=True)
            else:
                got = probe(lengths)
            rows += got
            oom = [r["length"] for r in got if r["status"] != "ok"]
            if oom and args.recompute_on_oom and args.recompute is None and not args.until_oom:
                rows += probe(oom, {**spec, "recompute": "full", "recompute_method": "uniform", "recompute_layers": 1})
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (--tiny)"
    print(f"\n{name} x{gpus}, {'tiny' if args.tiny else 'Mistral-7B'} layer shapes x {args.layers} layers, responses "
          f"{args.response} tokens, CP={args.cp or gpus}, median of {args.iters} steps after {args.warmup} warm-up; "
          f"one process per configuration")
    print_table(rows, M.peak_tflops(None) or 0)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
