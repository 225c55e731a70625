"""Worker: import several Hugging Face models as megatron-longpo checkpoints in ONE process
(saves the megatron import per model; same code path as `convert_checkpoint.py hf-to-megatron`).

usage: convert_many.py HF_DIR OUT_DIR [HF_DIR OUT_DIR ...]
"""
import sys

if __name__ == "__main__":  # dist_checkpointing.save starts a spawn manager
    from megatron_longpo.checkpoint.convert import hf_to_megatron_checkpoint
    from megatron_longpo.parallel import teardown

    args = sys.argv[1:]
    for hf_dir, out in zip(args[::2], args[1::2]):
        r = hf_to_megatron_checkpoint(hf_dir, out)
        print(f"converted {hf_dir} -> {r['iteration_dir']}", flush=True)
    teardown()
