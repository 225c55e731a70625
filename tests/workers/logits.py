"""Worker: load a checkpoint at a layout, write the full-vocabulary logits of fixed tokens.

usage: logits.py CKPT TP PP TOKENS.pt OUT.pt [SAVE_DIR]
"""
import sys

import torch

if __name__ == "__main__":
    from megatron.core import parallel_state as ps

    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.models.forward import full_logits
    from megatron_longpo.parallel import ParallelConfig, teardown

    ckpt_dir, tp, pp, tokens_path, out_path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    chunks, arch = ckpt.open_model(ckpt_dir, ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp))
    logits = full_logits(chunks, torch.load(tokens_path))
    if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
        torch.save(logits[..., : arch.vocab_size].cpu(), out_path)
    if len(sys.argv) > 6:  # re-save at this layout
        ckpt.save(ckpt.model_sharded_state_dict(chunks), sys.argv[6], iteration=0)
    teardown()
