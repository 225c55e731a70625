#!/usr/bin/env python3
"""One training step's loss and gradient, side by side, on ONE batch: transformers fp32 and bf16,
the project in fp32 (local spec) and bf16 (local spec; TE spec when a GPU with Transformer Engine
is present). Every bf16 row is compared with its own implementation's fp32 AND with transformers
fp32 (whole-gradient relative error, cosine, worst tensors). docs/logprobs.md "Numerics".

    python tools/check_numerics.py                       # SmolLM2, SFT + LongPO, RoPE base as is and x10
    python tools/check_numerics.py --hf-dir DIR --losses longpo --prompt-tokens 3072 --rope-scale 1 8

The batch: a prompt of --prompt-tokens tokens (megatron_longpo/resources/documents) and 256-token
responses; SFT scores the chosen response, LongPO (λ = --lam, β = 0.1) both, with reference
log-probs from transformers fp32 on a 256-token context (constants). The transformers rows' loss
head (log_softmax of their logits) runs in float64 (--hf-head). On the CPU it takes minutes
(2-core machine: about 3-4 minutes per loss and RoPE base at 3K tokens).
Exit status 1 when a bf16 row misses the bar (--bar: its gradient's distance to transformers fp32
at most bar x transformers bf16's in every case; its loss's distance on the mean over the cases,
since one case's loss error is a single draw); 0 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch



class _Rows(dict):
    """name -> (loss, gradient), with a progress line per row."""

    def __init__(self, t0: float):
        super().__init__()
        self.t0 = t0

    def __setitem__(self, name, value):
        print(f"  {name}: loss {value[0]:.6f} ({time.time() - self.t0:.0f} s)", flush=True)
        super().__setitem__(name, value)


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", help="a Hugging Face checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--losses", nargs="+", default=["sft", "longpo"], choices=["sft", "longpo"])
    ap.add_argument("--prompt-tokens", type=int, default=3072)
    ap.add_argument("--response-tokens", type=int, default=256)
    ap.add_argument("--rope-scale", type=float, nargs="+", default=[1.0, 10.0],
                    help="RoPE base multipliers to run (1 = the policy's base unchanged)")
    ap.add_argument("--data", help="a preprocessed LongPO dataset prefix (tools/preprocess_pairs.py): check on its sample "
                    "--sample instead of the example documents")
    ap.add_argument("--sample", type=int, default=0)
    ap.add_argument("--synthetic-words", type=int, default=0,
                    help="check on a synthetic word-salad LongPO sample of this many context words (the data of "
                         "tools/gpu_checks.py cpgrads: 3000)")
    ap.add_argument("--lam", type=float, default=1.0, help="LongPO's λ (1: the DPO term weighs as much as the NLL)")
    ap.add_argument("--fp32-only", action="store_true", help="only transformers fp32 and the project fp32 (the equality check)")
    ap.add_argument("--hf-attention", default="sdpa", choices=["sdpa", "eager"],
                    help="transformers' attention (eager: the same unfused arithmetic as the local spec)")
    ap.add_argument("--fp64", action="store_true",
                    help="also transformers in float64: how far each fp32 row is from exact arithmetic (the fp32 floor)")
    ap.add_argument("--hf-head", default="float64", choices=["float64", "float32"],
                    help="dtype of the transformers rows' loss head (log_softmax of the logits, sums); float64 makes it "
                         "exact given the logits; float32 is transformers' own loss, 1e-4 off on the CPU (docs/logprobs.md)")
    ap.add_argument("--json", help="also write the numbers to this JSON file")
    ap.add_argument("--bar", type=float, default=2.0)
    ap.add_argument("--no-te", action="store_true", help="skip the TE-spec row even where TE is present")
    ap.add_argument("--no-plain", action="store_true", help="skip the param.grad reading (no DDP) of the project's bf16 rows")
    args = ap.parse_args(argv)

    from megatron_longpo import platform
    from megatron_longpo.models.embedded import materialize_default_model

    platform.enable_cpu_fallback()
    if platform.cuda_available():  # the fp32 rows are the references: no TF32 in them
        print(f"TF32 was: matmul {torch.backends.cuda.matmul.allow_tf32}, cuDNN {torch.backends.cudnn.allow_tf32}; off for this run")
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    hf_dir = Path(args.hf_dir) if args.hf_dir else materialize_default_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    work = Path(tempfile.mkdtemp(prefix="check_numerics_"))
    try:
        return _run(args, hf_dir, tok, work)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


def _run(args, hf_dir, tok, work) -> int:
    from megatron_longpo import platform
    from megatron_longpo.checkpoint.convert import hf_to_megatron_checkpoint
    from megatron_longpo.models.build import te_available
    from megatron_longpo.checks import numerics as N

    dev = platform.default_device()
    t0 = time.time()
    hf_to_megatron_checkpoint(hf_dir, work / "ckpt")
    from megatron_longpo.checkpoint.dist import read_model_json

    base = read_model_json(work / "ckpt")[0].rope_theta
    if args.synthetic_words:
        import subprocess

        from megatron_longpo.data.synthetic import write_jsonl

        write_jsonl(work / "syn.jsonl", "longpo", 1, 0, context_words=args.synthetic_words)
        subprocess.run([sys.executable, str(Path(__file__).parent / "preprocess_pairs.py"), "--input", str(work / "syn.jsonl"),
                        "--kind", "longpo", "--tokenizer", str(hf_dir), "--output", str(work / "syn"), "--fresh",
                        "--no-progress", "--workers", "1"], check=True, stdout=subprocess.DEVNULL)
        args.data = str(work / "syn")
    use_te = te_available() and not args.no_te
    te_row = "yes" if use_te else f"skipped ({'--no-te' if args.no_te else 'no GPU with Transformer Engine'})"
    print(f"model {hf_dir} | device {dev} | TE spec row: {te_row}")
    failures = []
    loss_dist: dict[str, list[tuple[float, float]]] = {}
    report: list[dict] = []
    for loss in args.losses:
        for scale in args.rope_scale:
            report.append(_case(args, N, hf_dir, tok, dev, work, base * scale, scale, loss, use_te, t0, failures,
                                loss_dist))
            gc.collect()
    # The loss is ONE scalar per case: its bf16 error is a draw whose size varies by 100x between
    # cases (transformers on the GPU: 2.3e-4 to 6.7e-2 over 8 cases), so the loss bar compares the
    # mean distance over the run's cases; each case's numbers are printed and written all the same.
    for name, pairs in loss_dist.items():
        ours, theirs = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
        print(f"mean loss distance to transformers fp32 over {len(pairs)} cases: {name} {ours:.2e}, "
              f"transformers bf16 {theirs:.2e}")
        if ours > args.bar * max(theirs, 1e-4):
            failures.append(f"{name}: mean loss distance {ours:.2e} > {args.bar:g} x {theirs:.2e}")
    print(f"\nbar: a project bf16 row within {args.bar:g}x transformers' bf16-vs-fp32 distance (gradient: in every "
          f"case; loss: on the mean over the cases)")
    print("FAIL: " + "; ".join(failures) if failures else "PASS")
    if args.json:
        import json

        from megatron_longpo.io import atomic_write_text

        atomic_write_text(args.json, json.dumps({"cases": report, "failures": failures, "device": str(dev), "te": use_te}, indent=1))
    return 1 if failures else 0


def _case(args, N, hf_dir, tok, dev, work, theta, scale, loss, use_te, t0, failures, loss_dist) -> dict:
    """One loss at one RoPE base: every row, printed and compared; its gradients are freed on return."""
    batch = (N.dataset_batch(args.data, args.sample, loss, lam=args.lam) if args.data
             else N.make_batch(tok, loss, args.prompt_tokens, args.response_tokens, lam=args.lam))
    rows = _Rows(t0)
    m = N.hf_model(hf_dir, torch.float32, theta, dev, attn=args.hf_attention)
    N.fill_reference(m, batch, device=dev)
    head = getattr(torch, args.hf_head)
    rows["transformers fp32"] = N.hf_step(m, batch, dev, head)
    if not args.fp32_only:
        m = m.to(torch.bfloat16)
        rows["transformers bf16"] = N.hf_step(m, batch, dev, head)
    del m
    gc.collect()
    specs = [] if args.fp32_only else [("local", False)] + ([("TE", True)] if use_te else [])
    eng = N.project_engine(work / "ckpt", bf16=False, use_te=False, rope_theta=theta)
    loss32, g32, _ = N.project_step(eng, batch, plain=False)
    rows["project fp32 local"] = (loss32, g32)
    del eng
    for spec, te in specs:
        eng = N.project_engine(work / "ckpt", bf16=True, use_te=te, rope_theta=theta)
        l16, main16, plain16 = N.project_step(eng, batch, plain=not args.no_plain)
        rows[f"project bf16 {spec}"] = (l16, main16)
        if not args.no_plain:
            rows[f"project bf16 {spec} (param.grad, no DDP)"] = (l16, plain16)
        del eng
        gc.collect()
    print(f"\n== {loss} | RoPE base {theta:g} ({scale:g}x) | {batch.describe()}"
          + (f" | λ {batch.lam:g}, β {batch.beta:g}" if loss == "longpo" else ""))
    print(f"{'row':40s} {'loss':>10s} {'vs own fp32':>11s} {'vs HF fp32':>10s} | {'grad rel own':>12s} {'cos own':>9s} "
          f"| {'grad rel HF32':>13s} {'cos HF32':>9s}")
    l_hf, g_hf = rows["transformers fp32"]
    if not args.fp32_only:
        hf_bf16 = N.compare(rows["transformers bf16"][1], g_hf)
        hf_loss_rel = N.rel_diff(rows["transformers bf16"][0], l_hf)
    case = {"loss": loss, "rope_theta": theta, "batch": batch.describe(), "rows": {}}
    for name, (lv, g) in rows.items():
        own_name = "transformers fp32" if name.startswith("transformers") else "project fp32 local"
        own_l, own_g = rows[own_name]
        c_own = N.compare(g, own_g) if name != own_name else None
        c_hf = N.compare(g, g_hf) if name != "transformers fp32" else None
        case["rows"][name] = {
            "loss": lv, "loss_rel_own_fp32": N.rel_diff(lv, own_l), "loss_rel_hf_fp32": N.rel_diff(lv, l_hf),
            **({"grad_rel_own_fp32": c_own["rel"], "cos_own_fp32": c_own["cos"]} if c_own else {}),
            **({"grad_rel_hf_fp32": c_hf["rel"], "cos_hf_fp32": c_hf["cos"], "worst_hf_fp32": c_hf["worst"]} if c_hf else {}),
        }
        f = lambda c, k: f"{c[k]:.3e}" if c else "-"  # noqa: E731
        print(f"{name:40s} {lv:10.6f} {N.rel_diff(lv, own_l):11.2e} {N.rel_diff(lv, l_hf):10.2e} | "
              f"{f(c_own, 'rel'):>12s} {(format(c_own['cos'], '.6f') if c_own else '-'):>9s} | "
              f"{f(c_hf, 'rel'):>13s} {(format(c_hf['cos'], '.6f') if c_hf else '-'):>9s}")
        if name.startswith("project bf16") and "param.grad" not in name:
            if c_hf["rel"] > args.bar * hf_bf16["rel"]:
                failures.append(f"{loss} x{scale:g} {name}: gradient")
            loss_dist.setdefault(name, []).append((N.rel_diff(lv, l_hf), hf_loss_rel))
    for name, (lv, g) in rows.items():
        if name == "transformers fp32":
            continue
        w = N.compare(g, g_hf)["worst"]
        print(f"  worst vs HF fp32, {name}: " + ", ".join(f"{n.replace('model.', '')} {v:.2e}" for n, v in w))
    if args.fp64:
        m = N.hf_model(hf_dir, torch.float64, theta, dev, attn="eager")
        l64, g64 = N.hf_step(m, batch, dev, torch.float64)  # fp64 throughout, the head too
        del m
        case["fp64"] = {"loss": l64}
        for name in ("transformers fp32", "project fp32 local"):
            c = N.compare(rows[name][1], g64)
            case["fp64"][name] = {"grad_rel": c["rel"], "loss_rel": N.rel_diff(rows[name][0], l64), "worst": c["worst"]}
            print(f"  vs transformers fp64 (loss {l64:.8f}): {name} loss rel {N.rel_diff(rows[name][0], l64):.2e}, "
                  f"grad rel {c['rel']:.3e}, worst " + ", ".join(f"{n.replace('model.', '')} {v:.2e}" for n, v in c["worst"][:2]))
    print(f"({time.time() - t0:.0f} s so far, peak resident memory {_peak_rss_gb():.1f} GB)", flush=True)
    return case


if __name__ == "__main__":
    sys.exit(main())
