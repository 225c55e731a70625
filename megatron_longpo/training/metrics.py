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


def timestamp(t: float | None = None) -> str:
    """UTC wall-clock time of a step line: 2026-01-31 12:00:00."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(time.time() if t is None else t))


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
    consumed_samples: int = 0  # samples of all finished steps, over all data-parallel ranks
    epoch: float = 0.0  # fractional epochs of the (blended) training data
    time: float = 0.0  # wall clock (time.time()) at the step's end
    reserved_mem_gib: float = 0.0  # the caching allocator's peak reservation: what the card must hold

    def line(self, total_steps: int, world: int, peak: float | None) -> str:
        m = self.metrics
        parts = [f"{timestamp(self.time or None)} step {self.step}/{total_steps}", f"samples {self.consumed_samples}",
                 f"loss {m.get('loss', float('nan')):.4f}"]
        for k in ("nll_loss", "loss/dpo", "loss/po", "loss/solo_ra", "loss/simpo", "loss/or", "loss/ipo"):
            if k in m:
                parts.append(f"{k.split('/')[-1].replace('_loss', '')} {m[k]:.4f}")
        for k, short in (("rewards/chosen", "r_w"), ("rewards/rejected", "r_l"), ("rewards/margins", "margin"), ("rewards/accuracies", "acc")):
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
            parts.append(f"mem {self.peak_mem_gib:.1f} GiB" + (f" (reserved {self.reserved_mem_gib:.1f})"
                                                                if self.reserved_mem_gib else ""))
        if self.skipped:
            parts.append("SKIPPED (non-finite)")
        return " | ".join(parts)

    def scalars(self, world: int) -> dict[str, float]:
        """The step's scalars under TRL's / the Hugging Face Trainer's names (`train/` + name):
        loss, learning_rate, grad_norm, epoch, rewards/*, logps/*, nll_loss, ..."""
        out = {k: v for k, v in self.metrics.items() if k not in ("samples", "tokens")}
        out["learning_rate"] = self.lr
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        out["epoch"] = self.epoch
        out["consumed_samples"] = float(self.consumed_samples)
        out["throughput/tokens_per_s"] = self.tokens / max(self.seconds, 1e-9)
        out["throughput/tflops_per_gpu"] = self.flops / max(self.seconds, 1e-9) / world / 1e12
        out["step_seconds"] = self.seconds
        if self.peak_mem_gib:
            out["memory/peak_gib"] = self.peak_mem_gib
        if self.reserved_mem_gib:
            out["memory/reserved_peak_gib"] = self.reserved_mem_gib
        return {f"train/{k}": float(v) for k, v in out.items()}


def eval_scalars(metrics: dict[str, float]) -> dict[str, float]:
    """Evaluation metrics under the Trainer's names: eval/loss, eval/rewards/accuracies, ..."""
    return {f"eval/{k}": float(v) for k, v in metrics.items() if k not in ("tokens",)}


def eval_line(step: int, metrics: dict[str, float]) -> str:
    parts = [f"{timestamp()} eval at step {step}", f"samples {int(metrics.get('samples', 0))}",
             f"loss {metrics.get('loss', float('nan')):.4f}"]
    for k, short in (("rewards/margins", "margin"), ("rewards/accuracies", "acc"), ("nll_loss", "nll")):
        if k in metrics:
            parts.append(f"{short} {metrics[k]:.4f}")
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


def reserved_memory_gib() -> float:
    """The allocator's peak reservation (allocated + its cached, fragmented blocks)."""
    return torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else 0.0


class Writers:
    """TensorBoard (`<save_dir>/tensorboard`) and, with train.wandb_project, Weights & Biases;
    rank 0 only. Scalars are logged by name and step (TRL's names, see StepRecord.scalars).
    W&B honours its own environment (WANDB_MODE=offline writes a local run under
    `<save_dir>/wandb` to `wandb sync` later)."""

    def __init__(self, tensorboard_dir: str | None = None, wandb_project: str | None = None, wandb_dir: str | None = None,
                 run_name: str | None = None, config: dict | None = None):
        self.tb = None
        self.wandb = None
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise ValueError("train.wandb_project is set but wandb is not installed: pip install "
                                 "'megatron-longpo[wandb]' (or unset train.wandb_project)") from None
            import os
            import uuid

            os.makedirs(wandb_dir, exist_ok=True)
            id_file = os.path.join(wandb_dir, "run_id")  # a resumed training continues its W&B run
            with open(id_file, "a+") as f:
                f.seek(0)
                run_id = f.read().strip() or uuid.uuid4().hex[:8]
            with open(id_file, "w") as f:
                f.write(run_id)
            try:
                self.wandb = wandb.init(project=wandb_project, name=run_name, dir=wandb_dir, config=config or {},
                                        id=run_id, resume="allow")
            except Exception as exc:  # noqa: BLE001 - no API key, no network, ...: the user's to fix, in one line
                raise ValueError(f"train.wandb_project={wandb_project} but W&B did not start ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); run `wandb login`, or set "
                                 f"WANDB_MODE=offline to write the run locally") from None

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
