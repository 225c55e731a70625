"""Worker for tests/test_prefix_sharing.py and tests/test_gpu.py: per-role log-prob sums and
parameter gradients of one micro-batch, two-sequence layout or prefix-shared, at CP = world size.
CPU: gloo, fp32, local spec. GPU: NCCL, bf16, Transformer Engine spec (THD rows).

  prefix_sharing.py CKPT DATA ROLES SAMPLES SHARE OUT.pt [fp32|auto] [SEQUENCE_ROLES]
  prefix_sharing.py --many JOBS.json    (a list of such argument lists, run one after another in
                                         this one process group)

fp32 (GPU, two-sequence layout, one process): the local spec in fp32, a reference for the bf16 runs.
SEQUENCE_ROLES (comma-separated, e.g. "chosen"): also the whole-sequence statistics of these roles
(StepBatch.whole_index; saved as "chosen_sequence", ...), weighed into the scalar like the others.
"""
import sys

import torch
import torch.distributed as dist


def main(ckpt, data, roles, samples, share, out, precision="auto", sequence_roles="", last_job=True):
    from megatron.core import parallel_state as ps

    from megatron_longpo import parallel, platform
    from megatron_longpo.checkpoint import dist as ck
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.packing import pack
    from megatron_longpo.data.prefix_sharing import build_shared_row
    from megatron_longpo.models.build import ModelOptions, build_model
    from megatron_longpo.training.batch import prepare_batch, prepare_shared_batch
    from megatron_longpo.training.step import run_model, sequence_statistics

    platform.enable_cpu_fallback()
    _, world = parallel.init_distributed()
    share = share == "1"
    roles = tuple(roles.split(","))
    sequence_roles = tuple(r for r in sequence_roles.split(",") if r)
    arch, _ = ck.read_model_json(ckpt)
    par = parallel.ParallelConfig(context_parallel=world)
    layout = parallel.setup(par, arch=arch, cpu_cp=share)
    fp32 = precision == "fp32"
    if fp32 and (share or world > 1):
        raise SystemExit("fp32 is the two-sequence reference on one process")
    gpu = platform.cuda_available() and not fp32  # bf16, Transformer Engine, THD rows
    chunks = build_model(arch, par, ModelOptions(prefix_sharing=share, bf16=gpu, use_te=None if gpu else False))
    ck.load_model(chunks, ckpt)
    model = chunks[0]
    if gpu:  # bf16
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    dev = platform.default_device()
    ds = PairDataset(data)
    batch_samples = [ds.sample(int(i)) for i in samples.split(",")]
    cp_group = ps.get_context_parallel_group() if world > 1 else None
    if share:
        row = build_shared_row(batch_samples, roles, cp_size=world, pad_multiple=2 * world if world > 1 else 1,
                               sequence_roles=sequence_roles)
        batch = prepare_shared_batch(row, None, cp_rank=ps.get_context_parallel_rank(), cp_group=cp_group, device=dev)
        print(f"shared layout: {row.real_tokens} tokens for {row.unshared_tokens} unshared", flush=True)
    else:
        pad = 2 * world if world > 1 else 1
        batch = prepare_batch(pack(batch_samples, roles, pad), None, thd=gpu, cp_size=world,
                              cp_rank=ps.get_context_parallel_rank(), device=dev, sequence_roles=sequence_roles)
    # did the last layer skip its trunk queries (models/prefix_attention.py)? its trunk rows are then zeros
    last = {}
    if share:
        from megatron_longpo.models.build import unwrap

        attn = unwrap(chunks[0]).decoder.layers[-1].self_attention.core_attention
        n_trunk = batch.packed_seq_params.n_trunk
        attn.register_forward_hook(lambda m, a, o: last.update(trunk_zero=bool(n_trunk) and not o[:n_trunk].any()))
    logp = run_model(model, batch, 64, layout)
    stats = sequence_statistics(logp, batch, cp_group)
    roles = roles + tuple(f"{r}_sequence" for r in sequence_roles)
    # a scalar that weighs every role and sample differently
    w = lambda n: torch.arange(1.0, n + 1, device=dev)  # noqa: E731
    loss = sum((stats[r].logps * w(len(stats[r].logps)) * (i + 1)).sum() for i, r in enumerate(roles))
    loss.backward()
    grads = {}
    for n, p in model.named_parameters():
        g = p.grad.detach().float().clone()
        if world > 1:  # every CP rank holds the whole loss: gradients add up to CP x the true ones
            dist.all_reduce(g, group=cp_group)
            g /= world
        grads[n] = g
    if dist.get_rank() == 0:
        torch.save({"stats": {r: (stats[r].logps.detach().cpu(), stats[r].tokens.cpu()) for r in roles},
                    "grads": {n: g.cpu() for n, g in grads.items()}, "last_trunk_skipped": last.get("trunk_zero")}, out)
    if last_job:
        parallel.teardown()
    else:  # the next job sets its own layout up (parallel.setup) in the same process group
        dist.barrier()


if __name__ == "__main__":
    if sys.argv[1] == "--many":
        import json

        jobs = json.loads(open(sys.argv[2]).read())
        for i, job in enumerate(jobs):
            main(*job, last_job=i == len(jobs) - 1)
    else:
        main(*sys.argv[1:9])
