#!/usr/bin/env python
"""Benchmark: target log-probs of a long sequence, chunked (megatron_longpo.logprobs) vs the naive
full-logits way (logits -> log_softmax -> gather), forward + backward, on one GPU.

    python tools/bench_logprobs.py [--tokens 32768 131072] [--vocab 32000 152064] [--hidden 4096]

Prints one row per (tokens, vocab, method): time of forward+backward and the peak memory above
the inputs (hidden states and output weight, bf16). OOM is reported as such.
"""
import argparse
import time

import torch

from megatron_longpo.logprobs import naive_target_logprobs, target_logprobs


def run(method, s, v, h, chunk, reps=3):
    torch.cuda.empty_cache()
    hidden = torch.randn(s, 1, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    labels = torch.randint(0, v, (1, s), device="cuda")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    try:
        for _ in range(reps):
            hidden.grad = weight.grad = None
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            lp = target_logprobs(hidden, weight, labels, chunk_size=chunk) if method == "chunked" else naive_target_logprobs(hidden, weight, labels)
            lp.sum().backward()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return None, None
    finally:
        del hidden, weight, labels
    return min(times[1:] or times), (torch.cuda.max_memory_allocated() - base) / 2**30


def main():
    from megatron_longpo import quiet

    quiet.install()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 152064])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--chunk", type=int, default=2048)
    a = p.parse_args()
    print(f"GPU: {torch.cuda.get_device_name()}, hidden {a.hidden}, bf16 inputs, fp32 log-softmax, chunk {a.chunk}")
    print(f"{'tokens':>8} {'vocab':>7} {'method':>8} {'fwd+bwd s':>10} {'peak extra GiB':>15}")
    for s in a.tokens:
        for v in a.vocab:
            for m in ("chunked", "naive"):
                t, mem = run(m, s, v, a.hidden, a.chunk)
                if t is None:
                    print(f"{s:>8} {v:>7} {m:>8} {'OOM':>10} {'OOM':>15}", flush=True)
                else:
                    print(f"{s:>8} {v:>7} {m:>8} {t:>10.3f} {mem:>15.2f}", flush=True)


if __name__ == "__main__":
    main()
