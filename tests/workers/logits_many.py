"""Worker: load checkpoints at several layouts, one after another in ONE process group, and write
each one's full-vocabulary logits of fixed tokens.

usage: logits_many.py JOBS.json
JOBS.json: a list of {"ckpt", "tp", "pp", "tokens", "out"} with optional "save" (re-save the loaded
weights at that layout into this directory) and "meta_from" (copy model.json from there into "save").
A layout smaller than the world runs data-parallel: every replica computes the same logits.
"""
import json
import shutil
import sys
from pathlib import Path

import torch

if __name__ == "__main__":
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.models.forward import full_logits
    from megatron_longpo.parallel import ParallelConfig, teardown

    for job in json.loads(Path(sys.argv[1]).read_text()):
        chunks, arch = ckpt.open_model(job["ckpt"], ParallelConfig(tensor_parallel=job["tp"], pipeline_parallel=job["pp"]))
        logits = full_logits(chunks, torch.load(job["tokens"]))
        if logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0:
            torch.save(logits[..., : arch.vocab_size].cpu(), job["out"])
        if job.get("save"):
            ckpt.save(ckpt.model_sharded_state_dict(chunks), job["save"], iteration=0)
            if dist.get_rank() == 0 and job.get("meta_from"):
                shutil.copy(Path(job["meta_from"]) / "model.json", Path(job["save"]) / "model.json")
        dist.barrier()
    teardown()
