"""Worker: logits of the same tokens from two checkpoints loaded into ONE model built at TP/PP.

usage: reshard_logits.py CKPT_A CKPT_B TP PP TOKENS.pt OUT.pt   (OUT holds {"a": ..., "b": ...})
"""
import sys

import torch

if __name__ == "__main__":
    from megatron.core import parallel_state as ps

    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.models.forward import full_logits
    from megatron_longpo.parallel import ParallelConfig, teardown

    a, b, tp, pp, tokens_path, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
    tokens = torch.load(tokens_path)
    chunks, arch = ckpt.open_model(a, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    logits_a = full_logits(chunks, tokens)
    for c in chunks:  # make sure the second load really overwrites every weight
        with torch.no_grad():
            for p in c.parameters():
                p.fill_(float("nan"))
    ckpt.load_model(chunks, b)
    logits_b = full_logits(chunks, tokens)
    if logits_a is not None and ps.get_tensor_model_parallel_rank() == 0:
        torch.save({"a": logits_a[..., : arch.vocab_size].cpu(), "b": logits_b[..., : arch.vocab_size].cpu()}, out_path)
    teardown()
