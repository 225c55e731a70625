"""Forward-only passes through megatron's pipeline schedules, for checks and small demos.

`full_logits` gathers the vocabulary across tensor-parallel ranks: fine for a prompt, never for
training (training computes target log-probs vocab-parallel, see megatron_longpo.logprobs).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def run_schedule(chunks, batches: list, forward_step, *, forward_only: bool):
    """Megatron's pipeline schedule (no pipelining, 1F1B or interleaved, as the layout says) over
    `batches`, one per micro-batch; each has a `.tokens` [b, s] tensor. `forward_step(data_iterator,
    model)` follows megatron's contract. Returns what the schedule collected on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iters = [iter(batches) for _ in chunks] if len(chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iters, model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(batches), seq_length=max(b.tokens.shape[1] for b in batches),
        micro_batch_size=batches[0].tokens.shape[0], forward_only=forward_only,
    )


def full_logits(chunks, tokens: torch.Tensor, layout=None) -> torch.Tensor | None:
    """Logits [b, s, V_pad] (all vocabulary entries) for `tokens` [b, s]; None on ranks that are
    not the last pipeline stage. Every rank of the model-parallel group must call it.
    layout: the parallel.Layout (default: the one parallel.setup made)."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_longpo.parallel import current_layout
    from megatron_longpo.platform import default_device

    layout = layout or current_layout()
    dev = default_device()
    tokens = tokens.to(dev)
    pos = torch.arange(tokens.shape[1], device=dev).unsqueeze(0).expand_as(tokens)

    def step(data_iterator, model):
        b = next(data_iterator)
        return model(b.tokens, b.position_ids, None), None  # loss_func None: the schedule collects the output

    with torch.no_grad():
        out = run_schedule(chunks, [SimpleNamespace(tokens=tokens, position_ids=pos)], step, forward_only=True)
    if not layout.is_last_stage:
        return None
    logits = out[0]
    return gather_from_tensor_model_parallel_region(logits)


@torch.no_grad()
def greedy_generate(chunks, tokens: torch.Tensor, max_new_tokens: int, eos_token_id: int | None, vocab_size: int,
                    layout=None) -> torch.Tensor:
    """Greedy decoding without a KV cache (recomputes the prefix each step: for short demos).
    Returns the new token ids [b, n] on every rank (broadcast from the last pipeline stage)."""
    import torch.distributed as dist

    from megatron_longpo.parallel import current_layout

    layout = layout or current_layout()
    new = []
    for _ in range(max_new_tokens):
        logits = full_logits(chunks, tokens, layout)
        nxt = torch.zeros(tokens.shape[0], 1, dtype=torch.long, device=tokens.device)
        if logits is not None:
            nxt = logits[:, -1, :vocab_size].argmax(-1, keepdim=True).to(tokens.device)
        if layout.pp_size > 1:
            dist.broadcast(nxt, src=layout.pp_last_rank, group=layout.pp_group)
        new.append(nxt)
        tokens = torch.cat([tokens, nxt], dim=1)
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
    return torch.cat(new, dim=1)
