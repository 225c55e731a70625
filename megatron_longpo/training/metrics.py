"""What users watch: step lines, TensorBoard scalars, throughput, model FLOPs and MFU, memory."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

def rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    """A line on rank 0's stdout."""
    if rank0():
        print(msg, flush=True)


# Dense bf16 peak per GPU (TFLOP/s), used for MFU unless train.peak_tflops is set.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "B200": 2250.0, "GB200": 2450.0}


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return None


def model_flops_per_token(arch, seq_len: float, *, logits: bool = True, attention_layers: int | None = None) -> float:
    """Training FLOPs per token (forward + backward = 3x forward) of a Llama-style model with GQA,
    SwiGLU and causal attention at sequence length `seq_len` (average over the tokens); `logits`:
    with the output layer; `attention_layers`: in how many layers the token's query attends (all by
    default). Recomputation is not counted (model FLOPs, not hardware FLOPs)."""
    h, f, L = arch.hidden_size, arch.ffn_hidden_size, arch.num_layers
    d, nq, nkv = arch.head_dim, arch.num_attention_heads, arch.num_query_groups
    qkv = 2 * h * (nq + 2 * nkv) * d
    proj = 2 * nq * d * h
    mlp = 2 * 3 * h * f
    attn = 2 * 2 * nq * d * seq_len / 2  # QK^T and AV, causal: half the square
    a = L if attention_layers is None else attention_layers
    return 3 * (L * (qkv + proj + mlp) + a * attn) + (output_layer_flops_per_token(arch) if logits else 0)


def output_layer_flops_per_token(arch) -> float:
    """Training FLOPs of the output layer (the logits) for one token: 3 x the forward 2*h*V."""
    return 3 * 2 * arch.hidden_size * arch.vocab_size


def batch_model_flops(arch, spans, scored_tokens: int | None = None) -> float:
    """Model FLOPs of one pass (forward+backward) over sequences: each item a length, or
    (tokens, causal-sequence length whose average attention span they have[, True when their
    queries skip the last layer's attention: a prefix-shared trunk, data/prefix_sharing.flops_spans]).
    The output layer runs only where the loss looks (logprobs.target_logprobs, keep=): pass
    `scored_tokens` to count it on those tokens; without it, it is counted on every token (the
    usual convention)."""
    items = [(s, s, False) if isinstance(s, (int, float)) else (*s, False)[:3] for s in spans]
    body = sum(n * model_flops_per_token(arch, length, logits=False, attention_layers=arch.num_layers - skip)
               for n, length, skip in items)
    n_head = sum(n for n, _, _ in items) if scored_tokens is None else scored_tokens
    return body + n_head * output_layer_flops_per_token(arch)


@dataclass
class StepRecord:
    step: int
    metrics: dict[str, float]
    lr: float
    grad_norm: float | None
    seconds: float
    tokens: int
    flops: float
    peak_mem_gib: float
    skipped: bool = False

    def line(self, total_steps: int, world: int, peak: float | None) -> str:
        m = self.metrics
        parts = [f"step {self.step}/{total_steps}", f"loss {m.get('loss', float('nan')):.4f}"]
        for k in ("loss/nll", "loss/dpo", "loss/po", "loss/solo_ra", "loss/simpo", "loss/or", "loss/ipo"):
            if k in m:
                parts.append(f"{k.split('/')[1]} {m[k]:.4f}")
        for k, short in (("rewards/chosen", "r_w"), ("rewards/rejected", "r_l"), ("rewards/margin", "margin"), ("rewards/accuracy", "acc")):
            if k in m:
                parts.append(f"{short} {m[k]:.4f}")
        parts.append(f"lr {self.lr:.3e}")
        parts.append(f"gnorm {self.grad_norm:.3f}" if self.grad_norm is not None else "gnorm -")
        tps = self.tokens / max(self.seconds, 1e-9)
        tflops = self.flops / max(self.seconds, 1e-9) / world / 1e12
        parts.append(f"{tps:,.0f} tok/s")
        parts.append(f"{tflops:.1f} TFLOP/s/GPU" + (f" MFU {100 * tflops / peak:.1f}%" if peak else ""))
        parts.append(f"{self.seconds:.2f} s")
        if self.peak_mem_gib:
            parts.append(f"mem {self.peak_mem_gib:.1f} GiB")
        if self.skipped:
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)


class Timer:
    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0
        return False


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


class TensorBoard:
    def __init__(self, log_dir: str | None):
        self.w = None
        if log_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.w = SummaryWriter(log_dir)

    def log(self, rec: StepRecord, world: int) -> None:
        if self.w is None:
            return
        for k, v in rec.metrics.items():
            self.w.add_scalar(k, v, rec.step)
        self.w.add_scalar("lr", rec.lr, rec.step)
        if rec.grad_norm is not None:
            self.w.add_scalar("grad_norm", rec.grad_norm, rec.step)
        self.w.add_scalar("throughput/tokens_per_s", rec.tokens / rec.seconds, rec.step)
        self.w.add_scalar("throughput/tflops_per_gpu", rec.flops / rec.seconds / world / 1e12, rec.step)
        if rec.peak_mem_gib:
            self.w.add_scalar("memory/peak_gib", rec.peak_mem_gib, rec.step)

    def close(self) -> None:
        if self.w is not None:
            self.w.close()
