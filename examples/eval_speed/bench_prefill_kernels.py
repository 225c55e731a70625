"""The evaluation's attention kernels on one GPU, SmolLM2's shapes (9 query heads on 3 key/value heads,
head size 64), random tensors and a random SmolLM2-shaped Llama (no model file needed):

- a decode step's masked attention over a left-padded cache: SDPA against matmul-softmax-matmul;
- one layer's causal prefill attention at 4K/8K/16K: flash, cuDNN and memory-efficient SDPA, with and
  without enable_gqa, and the first call (cuDNN builds an execution plan per new shape);
- one prompt through the whole model: flash, cuDNN, SDPA's default, and a new length each call.

  python examples/eval_speed/bench_prefill_kernels.py     # prints lines; writes $OUT/micro.json (default /tmp)

results/h100_prefill_kernels.json is its output on one H100 80GB (torch 2.11, cuDNN 91900).
"""
import contextlib
import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

DEV, DT = "cuda", torch.bfloat16
H, G, D = 9, 3, 64
LENGTHS = (4000, 8100, 16200)


def timeit(fn, n=20, warm=3) -> float:
    """Milliseconds a call, CUDA events around n calls after warm ones."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(n):
        fn()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / n


def first_call_ms(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def decode_sdpa(q, k, v, m):
    return F.scaled_dot_product_attention(q.reshape(q.shape[0], G, H // G, D), k, v, attn_mask=m)


def decode_matmul(q, k, v, m):
    s = torch.matmul(q.reshape(q.shape[0], G, H // G, D), k.transpose(-1, -2)) * D ** -0.5
    return torch.matmul(torch.softmax(s.float() + m, dim=-1).to(v.dtype), v)


def decode_rows(res: dict) -> None:
    for b in (16, 64):
        for cap in (5120, 9216, 17408):
            q = torch.randn(b, H, 1, D, device=DEV, dtype=DT)
            k, v = (torch.randn(b, G, cap, D, device=DEV, dtype=DT) for _ in range(2))
            m = torch.zeros(b, 1, 1, cap, device=DEV, dtype=DT)
            m[..., : cap // 4] = torch.finfo(DT).min
            err = (decode_sdpa(q, k, v, m).float() - decode_matmul(q, k, v, m.float()).float()).abs().max().item()
            t1 = timeit(lambda: decode_sdpa(q, k, v, m))
            t2 = timeit(lambda: decode_matmul(q, k, v, m.float()))
            gb = 2 * k.numel() * 2 / 1e9
            res[f"decode b{b} cap{cap}"] = dict(sdpa_ms=t1, mm_ms=t2, err=err, sdpa_GBs=gb / t1 * 1e3, mm_GBs=gb / t2 * 1e3)
            print(f"decode b={b} cap={cap}: sdpa {t1:.3f} ms ({gb / t1 * 1e3:.0f} GB/s), matmul {t2:.3f} ms "
                  f"({gb / t2 * 1e3:.0f} GB/s), max diff {err:.2e}", flush=True)


def prefill_rows(res: dict) -> None:
    kernels = (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
               ("efficient", SDPBackend.EFFICIENT_ATTENTION))
    for L in LENGTHS:
        q = torch.randn(1, H, L, D, device=DEV, dtype=DT)
        k, v = (torch.randn(1, G, L, D, device=DEV, dtype=DT) for _ in range(2))
        kr, vr = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)
        flop = 4 * H * D * L * L / 2
        row = {}
        for name, kernel in kernels:
            for gqa in (True, False):
                def call():
                    if gqa:
                        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                    return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)
                try:
                    with sdpa_kernel([kernel]):
                        first, t = first_call_ms(call), timeit(call)
                except RuntimeError as e:
                    print(f"prefill L={L} {name} gqa={gqa}: {str(e)[:120]}", flush=True)
                    continue
                row[name + ("_gqa" if gqa else "")] = dict(ms=t, first_ms=first, tflops=flop / t / 1e9)
                print(f"prefill L={L} {name} gqa={gqa}: {t:.3f} ms ({flop / t / 1e9:.0f} TFLOP/s), first call "
                      f"{first:.1f} ms", flush=True)
        res[f"prefill L{L}"] = row


def model_rows(res: dict) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=H,
                      num_key_value_heads=G, vocab_size=49152, max_position_embeddings=32768, rope_theta=100000,
                      tie_word_embeddings=True, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(DEV, DT).eval()
    for L in LENGTHS:
        ids = torch.randint(0, cfg.vocab_size, (1, L), device=DEV)
        flop = 2 * 105e6 * L + 4 * 30 * H * D * L * L / 2
        for name, kernels in (("flash", [SDPBackend.FLASH_ATTENTION]), ("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                              ("default", None)):
            with torch.no_grad(), sdpa_kernel(kernels) if kernels else contextlib.nullcontext():
                t = timeit(lambda: model(input_ids=ids, use_cache=True, logits_to_keep=1), n=10)
            res[f"model L{L} {name}"] = dict(ms=t, tflops=flop / t / 1e9)
            print(f"model prefill L={L} {name}: {t:.2f} ms ({flop / t / 1e9:.0f} TFLOP/s)", flush=True)
        new_shapes = {}
        for name, kernel in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            with torch.no_grad(), sdpa_kernel([kernel]):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for j in range(10):  # a length not seen before each call
                    model(input_ids=ids[:, : L - 7 * (j + 1)], use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
                new_shapes[f"{name}_ms"] = (time.perf_counter() - t0) / 10 * 1e3
        res[f"model L{L} new shapes"] = new_shapes
        print(f"model prefill L={L}, a new length each call: cudnn {new_shapes['cudnn_ms']:.2f} ms, flash "
              f"{new_shapes['flash_ms']:.2f} ms", flush=True)


def main() -> None:
    res: dict = {}
    decode_rows(res)
    prefill_rows(res)
    model_rows(res)
    res["versions"] = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                       "cudnn": torch.backends.cudnn.version()}
    out = os.path.join(os.environ.get("OUT", "/tmp"), "micro.json")
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(res["versions"], "->", out)


if __name__ == "__main__":
    main()
