"""GPU worker (Transformer Engine spec): modes
  te_logits CKPT HF_DIR OUT.json     SmolLM2 bf16 (TE) vs transformers bf16/fp32
  grads OUT.pt key=value ...         loss and flat gradients of the first step of a training config
                                     (megatron_longpo/checks/first_step.py)
"""
import json
import sys

import torch


def te_logits(ckpt_dir, hf_dir, out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.models.build import ModelOptions, te_available
    from megatron_longpo.models.forward import full_logits
    from megatron_longpo.parallel import ParallelConfig

    assert te_available(), "Transformer Engine is not importable"
    tok = AutoTokenizer.from_pretrained(hf_dir)
    prompts = ["What is the capital of France?", "Write a haiku about long documents.", "Explain why the sky is blue."]
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False) for p in prompts]
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(map(len, rows))
    ids = torch.tensor([r[-n:] for r in rows]).cuda()
    chunks, arch = ckpt.open_model(ckpt_dir, ParallelConfig(), ModelOptions(bf16=True, use_te=True))
    spec = type(chunks[0].decoder.layers[0].self_attention.core_attention).__name__
    ours = full_logits(chunks, ids)[..., : arch.vocab_size].float()
    res = {"core_attention": spec, "dtype": str(next(chunks[0].parameters()).dtype)}
    hf = {}
    for dtype in (torch.bfloat16, torch.float32):
        ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).cuda().eval()
        with torch.no_grad():
            r = hf[dtype] = ref(ids).logits.float()
        name = str(dtype).split(".")[1]
        res[f"max_abs_diff_vs_hf_{name}"] = (ours - r).abs().max().item()
        res[f"next_token_max_abs_diff_vs_hf_{name}"] = (ours[:, -1] - r[:, -1]).abs().max().item()
        res[f"next_token_argmax_agree_{name}"] = bool((ours[:, -1].argmax(-1) == r[:, -1].argmax(-1)).all())
        res[f"logit_scale_{name}"] = r.abs().max().item()
        del ref
    # the yardstick: how far transformers' own bf16 run is from its fp32 run
    res["hf_bf16_vs_hf_fp32_next_token_max_abs_diff"] = (hf[torch.bfloat16][:, -1] - hf[torch.float32][:, -1]).abs().max().item()
    res["hf_bf16_vs_hf_fp32_max_abs_diff"] = (hf[torch.bfloat16] - hf[torch.float32]).abs().max().item()
    print(json.dumps(res, indent=2))
    json.dump(res, open(out, "w"), indent=2)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "te_logits":
        te_logits(*sys.argv[2:5])
    elif mode == "grads":
        from megatron_longpo.checks.first_step import first_step_grads

        first_step_grads(sys.argv[2], sys.argv[3:])
    from megatron_longpo import parallel

    parallel.teardown()
