"""Worker for tests/test_logprobs.py (2 ranks, gloo)."""
import torch
import torch.distributed as dist

from megatron_longpo.logprobs import naive_target_logprobs, target_logprobs
from megatron_longpo.losses import LossConfig, SeqStat
from megatron_longpo.training.batch import StepBatch
from megatron_longpo.training.step import loss_from_token_logprobs


def tp_check(rank):
    g = torch.Generator().manual_seed(0)
    s, b, h, v = 11, 2, 8, 40
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s), generator=g)
    gout = torch.randn(b, s, generator=g, dtype=torch.float64)
    hf = hidden.clone().requires_grad_()
    wf = weight.clone().requires_grad_()
    ref = naive_target_logprobs(hf, wf, labels)
    (ref.double() * gout).sum().backward()
    shard = v // 2
    hl = hidden.clone().requires_grad_()
    wl = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    from megatron.core import parallel_state as ps

    ours = target_logprobs(hl, wl, labels, chunk_size=3, tp_group=ps.get_tensor_model_parallel_group(), vocab_start=rank * shard)
    (ours.double() * gout).sum().backward()
    assert torch.allclose(ours.double(), ref.double(), atol=1e-5), (ours - ref).abs().max()
    assert torch.allclose(hl.grad, hf.grad, atol=1e-5), (hl.grad - hf.grad).abs().max()
    assert torch.allclose(wl.grad, wf.grad[rank * shard:(rank + 1) * shard], atol=1e-5)
    # only the kept (loss-mask) positions: the same values there, zeros elsewhere, the same gradients
    keep = torch.rand(b, s, generator=g) > 0.5
    hk, wk = hidden.clone().requires_grad_(), weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    kept = target_logprobs(hk, wk, labels, chunk_size=3, tp_group=ps.get_tensor_model_parallel_group(),
                           vocab_start=rank * shard, keep=keep)
    (kept.double() * gout).sum().backward()
    hr, wr = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (naive_target_logprobs(hr, wr, labels).double() * gout * keep).sum().backward()
    assert torch.allclose(kept[keep].double(), ref[keep].double(), atol=1e-5) and (kept[~keep] == 0).all()
    assert torch.allclose(hk.grad, hr.grad, atol=1e-5), (hk.grad - hr.grad).abs().max()
    assert torch.allclose(wk.grad, wr.grad[rank * shard:(rank + 1) * shard], atol=1e-5)
    print(f"rank {rank}: TP2 OK", flush=True)


def cp_check(rank, cp_group):
    """Packed row of 2 sequences (lengths 8 and 12, padded to multiples of 4) for 2 samples of a
    DPO pair; the policy token log-probs are the leaves whose gradients we compare."""
    from megatron_longpo.data.cp_split import cp_partition
    from megatron_longpo.models.packed_params import thd_seq_index

    g = torch.Generator().manual_seed(3)
    cu_pad = torch.tensor([0, 8, 20, 28, 40])  # 4 sequences: chosen/rejected of samples 0 and 1
    total = 40
    logp_full = -torch.rand(1, total, generator=g, dtype=torch.float64) * 3
    mask = (torch.rand(1, total, generator=g) > 0.3).float()
    seq_index = thd_seq_index(cu_pad, total).unsqueeze(0)
    roles, samples = ["chosen", "rejected", "chosen", "rejected"], [0, 0, 1, 1]
    ref = {"ref_chosen": SeqStat(torch.tensor([-20.0, -25.0], dtype=torch.float64), torch.tensor([5.0, 6.0])),
           "ref_rejected": SeqStat(torch.tensor([-21.0, -19.0], dtype=torch.float64), torch.tensor([5.0, 6.0]))}
    cfg = LossConfig(name="dpo", beta=0.5)

    def batch(idx):
        return StepBatch(tokens=None, position_ids=None, labels=None, loss_mask=mask[:, idx], seq_index=seq_index[:, idx],
                         seq_role=roles, seq_sample=samples, num_samples=2, reference=ref)

    # single device: whole row
    full = logp_full.clone().requires_grad_()
    loss, n, _ = loss_from_token_logprobs(full, batch(torch.arange(total)), cfg, None)
    (loss / n).backward()
    # CP=2: each rank its zig-zag part; grads summed over CP ranks, divided by the count summed over CP
    idx = cp_partition(cu_pad, 2, rank)
    part = logp_full[:, idx].clone().requires_grad_()
    loss_r, n_r, _ = loss_from_token_logprobs(part, batch(idx), cfg, cp_group)
    total_n = n_r.clone()
    dist.all_reduce(total_n, group=cp_group)
    (loss_r / total_n).backward()
    assert torch.allclose(loss_r, loss), (loss_r, loss)
    grad_here = torch.zeros_like(logp_full)
    grad_here[:, idx] = part.grad
    dist.all_reduce(grad_here, group=cp_group)  # every token lives on exactly one rank
    assert torch.allclose(grad_here, full.grad, atol=1e-12), (grad_here - full.grad).abs().max()
    print(f"rank {rank}: CP2 OK", flush=True)


if __name__ == "__main__":
    from megatron_longpo import parallel

    parallel.setup(parallel.ParallelConfig(tensor_parallel=2))
    rank = dist.get_rank()
    tp_check(rank)
    # the CP reduction itself is plain torch.distributed: the 2-rank world group stands for the CP group
    cp_check(rank, dist.group.WORLD)
    parallel.teardown()
