"""Frozen reference log-probs: a forward-only pass of the reference model over the reference
roles' sequences (LongPO: each turn's short context; SoLoPO: the chosen response on the short and
the long context; pairs: the policy's own sequences), reduced to per-sample statistics."""

from __future__ import annotations

from functools import partial

import torch
import torch.distributed as dist

from megatron_longpo.training.batch import BatchSpec, StepBatch, micro_batch
from megatron_longpo.training.step import run_model, sequence_statistics


def _collect(token_logp, batch: StepBatch, cp_group):
    stats = sequence_statistics(token_logp.detach(), batch, cp_group)
    data = {role: (s.logps.double().cpu(), s.tokens.cpu()) for role, s in stats.items()}
    return torch.zeros((), device=token_logp.device), torch.tensor(batch.num_samples, dtype=torch.int), data


@torch.no_grad()
def score(chunks, batches: list[StepBatch], chunk_size: int, layout) -> list[dict] | None:
    """Per micro-batch {role: (logp_sum [B] float64, num_tokens [B])} on the last pipeline stage
    (None elsewhere). layout: the parallel.Layout."""
    from megatron_longpo.models.forward import run_schedule

    def step(data_iterator, model):
        b = next(data_iterator)
        return run_model(model, b, chunk_size, layout), partial(_collect, batch=b, cp_group=layout.cp_group)

    for c in chunks:
        c.eval()
    out = run_schedule(chunks, batches, step, forward_only=True)
    return out if layout.is_last_stage else None


def precompute(dataset_prefix: str, model_dir: str, par, *, roles=None, samples_per_microbatch: int = 1,
               chunk_size: int = 2048, out_path: str | None = None, bf16: bool | None = None, progress: bool = True,
               policy_sequences: bool = False, check_tokenizer: bool = True, rope_theta: float | None = None) -> dict:
    """Score every sample of the dataset with the reference checkpoint and write the sidecar.
    Collective over all ranks (any TP/PP/CP/DP). Returns a summary on every rank.
    policy_sequences: each ref role ref_X gets the reference's log-probs of the policy's own
    sequence X (plain DPO on a LongPO dataset: the reference sees the long context).
    rope_theta: score at this RoPE base instead of the checkpoint's (recorded in the sidecar)."""
    import os
    import time

    from tqdm import tqdm

    from megatron_longpo import parallel, platform
    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.data.format import PairDataset, longest_sequence
    from megatron_longpo.data.reference import RefLogpWriter, merge_parts, part_path, sidecar_path
    from megatron_longpo.models.build import ModelOptions

    t0 = time.time()
    if bf16 is None:  # Transformer Engine's fused attention on packed (THD) rows needs bf16/fp16
        bf16 = platform.cuda_available()
    ds = PairDataset(dataset_prefix)
    ds.vocab_limit = ckpt.read_model_json(model_dir)[0].vocab_size  # an id beyond the embeddings is named on read
    if check_tokenizer:
        from pathlib import Path

        from megatron_longpo.data.tokenizer import check_dataset_tokenizer

        ref_arch, _ = ckpt.read_model_json(model_dir)
        for note in check_dataset_tokenizer(ds.manifest, str(dataset_prefix), ref_arch.vocab_size, str(model_dir),
                                            Path(model_dir) / "tokenizer", skip_key="--no-tokenizer-check"):
            if os.environ.get("RANK", "0") == "0":
                print(f"note: {note}", flush=True)
    roles = tuple(roles or ds.ref_roles)
    ckpt.read_model_json(model_dir)[0].check_sequence_length(  # a sliding window is refused before the build
        longest_sequence(ds.manifest, [r[4:] if policy_sequences else r for r in roles]), f"the longest sequence of --data {dataset_prefix}")
    bf16 = platform.resolve_bf16(bf16)  # what runs (fp32 on the CPU whatever was asked), and what the sidecar records
    opts = ModelOptions(bf16=bf16)
    chunks, arch = ckpt.open_model(model_dir, par, opts, rope_theta=rope_theta)
    layout = parallel.current_layout()  # open_model set the parallel state up
    dp, dp_rank = layout.dp_size, layout.dp_rank
    mine = list(range(dp_rank, len(ds), dp))
    groups = [mine[i:i + samples_per_microbatch] for i in range(0, len(mine), samples_per_microbatch)]
    scored = roles
    if policy_sequences:
        bad = [r for r in roles if not r.startswith("ref_") or r[4:] not in ds.roles]
        if bad:
            raise ValueError(f"--reference-sees-policy: no policy sequence for the ref roles {bad} of this {ds.kind} dataset")
        scored = tuple(r[4:] for r in roles)
    writer = RefLogpWriter.for_dataset(dataset_prefix, roles=roles, reference_model=str(model_dir),
                                       computation={"tp": par.tensor_parallel, "pp": par.pipeline_parallel,
                                                    "cp": par.context_parallel, "dp": dp, "bf16": bool(bf16),
                                                    "chunk_size": chunk_size, "rope_theta": arch.rope_theta,
                                                    "sequences": "policy" if policy_sequences else "reference"})
    writes = layout.is_last_stage and layout.tp_rank == 0 and layout.cp_rank == 0
    tokens = 0
    thd = opts.resolved_use_te()  # packed THD rows exactly when the model was built with TE
    bar = tqdm(groups, desc="reference log-probs", disable=not (progress and dist.get_rank() == 0))
    spec = BatchSpec(roles=scored, pad_multiple=layout.pad_multiple, thd=thd, cp_size=layout.cp_size,
                     cp_rank=layout.cp_rank, cp_group=layout.cp_group, device=platform.default_device())
    for idx in bar:
        b = micro_batch([ds.sample(i) for i in idx], spec, None, idx)
        tokens += b.num_tokens
        res = score(chunks, [b], chunk_size, layout)
        if writes:
            for role, (lp, n) in res[0].items():
                writer.add(idx, roles[scored.index(role)], lp.tolist(), [int(x) for x in n.tolist()])
    out = out_path or sidecar_path(dataset_prefix)
    rank = dist.get_rank()
    if writes:
        writer.save_part(part_path(dataset_prefix, rank))
    dist.barrier()
    if rank == 0:
        parts = [part_path(dataset_prefix, r) for r in range(dist.get_world_size()) if os.path.exists(part_path(dataset_prefix, r))]
        merge_parts(parts, out)
        for p in parts:
            os.remove(p)
    dist.barrier()
    return {"samples": len(ds), "roles": roles, "tokens_this_rank": tokens, "path": out, "seconds": time.time() - t0,
            "arch": arch}
