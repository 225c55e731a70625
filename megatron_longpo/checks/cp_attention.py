"""GPU diagnosis (2 ranks): Transformer Engine THD attention with context parallelism vs. the
same attention on one GPU, forward and backward, with and without padding between sequences.
Prints, per case, the largest difference over real tokens relative to the largest reference value
and the norm of the difference relative to the reference's norm. Head layouts: 8/2 and SmolLM2's 9/3.

    torchrun --nproc-per-node 2 -m megatron_longpo.checks.cp_attention   # tools/gpu_checks.py attn
"""
import torch
import torch.distributed as dist


def main():
    dist.init_process_group("nccl")
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    from transformer_engine.pytorch import DotProductAttention

    from megatron_longpo.data.cp_split import cp_partition

    d = 64
    bf = torch.bfloat16
    cases = [(8, 2, [1001, 2047], False), (8, 2, [1000, 2048], False), (8, 2, [4093, 3], False),
             (9, 3, [4101, 4133], True), (9, 3, [4100, 4132], False), (9, 3, [8192], False)]
    for h, hkv, lens, pad_in_seq in cases:
        padded = [-(-n // 4) * 4 for n in lens]
        if pad_in_seq:  # padding attended as part of each sequence (training/step.thd_params)
            lens = padded
        cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device="cuda")
        cu_pad = torch.tensor([0] + list(torch.tensor(padded).cumsum(0)), dtype=torch.int32, device="cuda")
        T, maxpad = int(cu_pad[-1]), max(padded)
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(T, h, d, device="cuda", generator=g).to(bf)
        k = torch.randn(T, hkv, d, device="cuda", generator=g).to(bf)
        v = torch.randn(T, hkv, d, device="cuda", generator=g).to(bf)
        dout = torch.randn(T, h * d, device="cuda", generator=g).to(bf)
        valid = torch.zeros(T, dtype=torch.bool, device="cuda")
        for i, n in enumerate(lens):
            valid[int(cu_pad[i]): int(cu_pad[i]) + n] = True
        kw = dict(cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
                  max_seqlen_q=maxpad, max_seqlen_kv=maxpad)
        attn = DotProductAttention(h, d, num_gqa_groups=hkv, qkv_format="thd", attn_mask_type="padding_causal").cuda()
        ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out_ref = attn(*ref, **kw)
        (out_ref.float() * dout.float()).sum().backward()
        cp_attn = DotProductAttention(h, d, num_gqa_groups=hkv, qkv_format="thd", attn_mask_type="padding_causal").cuda()
        cp_attn.set_context_parallel_group(dist.group.WORLD, [0, 1], torch.cuda.Stream(), "p2p")
        idx = cp_partition(cu_pad.cpu(), 2, rank).cuda()
        loc = [x.detach()[idx].clone().requires_grad_() for x in (q, k, v)]
        out = cp_attn(*loc, **kw)
        (out.float() * dout[idx].float()).sum().backward()
        m = valid[idx]
        rows = []
        for name, a, b in (("out", out, out_ref[idx]), ("dq", loc[0].grad, ref[0].grad[idx]),
                           ("dk", loc[1].grad, ref[1].grad[idx]), ("dv", loc[2].grad, ref[2].grad[idx])):
            a, b = a[m].float(), b[m].float()
            rows.append(f"{name} {((a - b).abs().max() / b.abs().max()).item():.2e}/{((a - b).norm() / b.norm()).item():.2e}")
        pad = ~m
        if pad.any():  # what the padding rows carry back: should be nothing
            rows.append("padding rows max |dq|,|dk|,|dv| CP " + " ".join(f"{x.grad[pad].abs().max().item():.2e}" for x in loc)
                        + " / 1 GPU " + " ".join(f"{x.grad[idx][pad].abs().max().item():.2e}" for x in ref))
        print(f"rank {rank} heads {h}/{hkv} lens {lens} CP=2 vs 1 GPU (max diff/max ref, norm rel; real tokens): "
              + ", ".join(rows), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
