"""The gradient of one training step, next to transformers' gradient of the same loss on the same
batch (`tools/check_numerics.py`, tests/test_numerics.py, docs/logprobs.md "Numerics").

Two implementations of one step:
  * the project's: build_engine (Float16Module + megatron DDP + optimizer, exactly as training
    builds them), prepare_batch (padded rows on the local spec, one packed THD row on the TE
    spec), megatron's schedule, the chunked log-probs, losses.compute_loss; the gradient is read
    where the optimizer reads it (each parameter's `main_grad`, the DDP buffer after
    finalize_model_grads) and, as a second reading, from `param.grad` of a plain autograd pass
    through the same (unwrapped-from-DDP) model;
  * an independent one: transformers' model, its logits, log_softmax and the loss formula of
    docs/methods.md written out here (NLL = mean token NLL of the chosen response; LongPO = NLL +
    λ·DPO, DPO = -log σ(β[(log π(y_w) - ref_w) - (log π(y_l) - ref_l)]) with summed log-probs and
    the reference log-probs as constants), no project code on its path; this loss head runs in
    float64 on the model's logits (HEAD_DTYPE), so the reference's error is its model's.
Gradients are compared per tensor under Hugging Face names (checkpoint/hf.py maps them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron_longpo import resources

DOCS_DIR = resources.DOCUMENTS


# ---------------------------------------------------------------- the batch


@dataclass
class Seq:
    tokens: np.ndarray  # int64 [L]
    loss_mask: np.ndarray  # bool [L]: token t is scored (predicted from t-1)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class CheckBatch:
    """One micro-batch of one sample: its role sequences and the reference statistics."""

    loss: str  # "sft" | "longpo"
    roles: dict[str, Seq]  # "chosen" (and "rejected")
    ref_logps: dict[str, float] = field(default_factory=dict)  # "ref_chosen"/"ref_rejected" summed log-probs
    beta: float = 0.1
    lam: float = 1.0
    ref_sequences: dict[str, list[Seq]] | None = None  # LongPO data: the short-context reference sequences

    def describe(self) -> str:
        return ", ".join(f"{r} {len(s)} tokens ({int(s.loss_mask.sum())} scored)" for r, s in self.roles.items())


class _Sample:
    """The data layer's Sample contract that data.packing.pack reads: .index and .sequences(role)."""

    def __init__(self, roles: dict[str, Seq]):
        self.index = 0
        self._roles = roles

    def sequences(self, role: str):
        from megatron_longpo.data.format import Sequence

        s = self._roles[role]
        return [Sequence(tokens=s.tokens, loss_mask=s.loss_mask)]


def document_tokens(tokenizer, min_tokens: int) -> np.ndarray:
    """The example documents (megatron_longpo/resources/documents), concatenated until `min_tokens`."""
    texts = [p.read_text() for p in sorted(DOCS_DIR.glob("*.md"))]
    if not texts:
        raise FileNotFoundError(f"no example documents under {DOCS_DIR}")
    ids: list[int] = []
    i = 0
    while len(ids) < min_tokens:
        ids += tokenizer(texts[i % len(texts)] + "\n\n", add_special_tokens=False)["input_ids"]
        i += 1
    return np.asarray(ids, dtype=np.int64)


def make_batch(tokenizer, loss: str, prompt_tokens: int, response_tokens: int = 256, *, lam: float = 1.0,
               beta: float = 0.1, sft_all_tokens: bool = False) -> CheckBatch:
    """A long prompt (the example documents) and one (SFT) or two (LongPO) responses of
    `response_tokens` tokens: the chosen one continues the prompt, the rejected one is a passage
    from elsewhere. The reference log-probs are filled in by `fill_reference`."""
    ids = document_tokens(tokenizer, prompt_tokens + 3 * response_tokens)
    prompt = ids[:prompt_tokens]
    chosen = ids[prompt_tokens: prompt_tokens + response_tokens]
    rejected = ids[prompt_tokens + 2 * response_tokens: prompt_tokens + 3 * response_tokens]

    def seq(resp):
        t = np.concatenate([prompt, resp])
        m = np.zeros(len(t), dtype=bool)
        m[1 if sft_all_tokens else len(prompt):] = True
        return Seq(t, m)

    roles = {"chosen": seq(chosen)}
    if loss == "longpo":
        roles["rejected"] = seq(rejected)
    elif loss != "sft":
        raise ValueError(f"loss must be sft or longpo, got {loss!r}")
    return CheckBatch(loss, roles, beta=beta, lam=lam)


def dataset_batch(prefix, index: int, loss: str, *, lam: float = 1.0, beta: float = 0.1) -> CheckBatch:
    """Sample `index` of a preprocessed dataset (data/format.py) as the training step sees it:
    its policy role sequences, tokens and loss masks as stored. LongPO's reference sequences
    (short contexts) are kept for `fill_reference`."""
    from megatron_longpo.data.format import PairDataset

    ds = PairDataset(prefix)
    sample = ds.sample(index)
    roles = ("chosen",) if loss == "sft" else ("chosen", "rejected")
    seqs = {}
    for r in roles:
        [s] = sample.sequences(r)
        seqs[r] = Seq(np.asarray(s.tokens, dtype=np.int64), np.asarray(s.loss_mask, dtype=bool))
    b = CheckBatch(loss, seqs, beta=beta, lam=lam)
    if loss == "longpo":
        b.ref_sequences = {f"ref_{r}": [Seq(np.asarray(s.tokens, dtype=np.int64), np.asarray(s.loss_mask, dtype=bool))
                                        for s in sample.sequences(f"ref_{r}")] for r in ("chosen", "rejected")}
    return b


# ---------------------------------------------------------------- the independent reference (transformers)


def hf_model(hf_dir, dtype: torch.dtype, rope_theta: float | None = None, device="cpu", attn: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hf_dir)
    if rope_theta is not None:
        cfg.rope_theta = rope_theta
        rp = getattr(cfg, "rope_parameters", None)
        if isinstance(rp, dict):
            rp["rope_theta"] = rope_theta
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=cfg, torch_dtype=torch.float32, attn_implementation=attn)
    model = model.to(device=device, dtype=dtype).train()  # dropout is 0 in these configs
    # transformers' nn.Embedding(padding_idx=pad_token_id) drops that row's input gradient; SmolLM2's
    # pad token is <|im_end|> (id 2), a real token of chat data: the reference must differentiate the loss
    model.get_input_embeddings().padding_idx = None
    # recompute each layer in the backward (the same arithmetic): at thousands of tokens the
    # saved attention probabilities of 30 layers would not fit a small machine
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# The reference's loss head (log_softmax of transformers' logits, gather, sums) runs in float64
# whatever the model's dtype: it is exact given the logits, so the reference's error is its model's.
# In fp32 it would not be on the CPU: torch's fp32 log_softmax/softmax kernels there are biased by
# ~1e-6 per element (rows of 49K logits, 2-core CPU dev machine: mean +9.0e-7, max 9.5e-6, against
# 4e-9 / 2.1e-6 for exp-sum-log written out), which made transformers fp32 (and the old "fp64"
# reference, whose logits were cast back to fp32) 1e-4 off an fp64 gradient (docs/logprobs.md).
HEAD_DTYPE = torch.float64


def hf_token_logps(model, s: Seq, device="cpu", whole: bool = False, head_dtype: torch.dtype = HEAD_DTYPE
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs of the tokens transformers' logits predict, in `head_dtype` and differentiable; the
    loss mask of those tokens). whole=False: from the first scored token on (only those logits are
    computed); whole=True: every token but the first."""
    tokens = torch.as_tensor(s.tokens, device=device).unsqueeze(0)
    mask = torch.as_tensor(s.loss_mask, device=device)
    first = 1 if whole else max(int(np.argmax(s.loss_mask)), 1)  # the first predicted token; logits from first-1 on
    keep = len(s) - first + 1
    logits = model(tokens, logits_to_keep=keep).logits[0, :-1].to(head_dtype)  # predicts tokens first..L-1
    logp = torch.log_softmax(logits, dim=-1).gather(-1, tokens[0, first:].unsqueeze(-1)).squeeze(-1)
    return logp, mask[first:].to(head_dtype)


def hf_sequence_logps(model, s: Seq, device="cpu", head_dtype: torch.dtype = HEAD_DTYPE) -> torch.Tensor:
    """Summed log-prob of the scored tokens of `s` (in `head_dtype`, differentiable)."""
    logp, mask = hf_token_logps(model, s, device, head_dtype=head_dtype)
    return (logp * mask).sum()


def hf_loss(model, batch: CheckBatch, device="cpu", head_dtype: torch.dtype = HEAD_DTYPE) -> torch.Tensor:
    """docs/methods.md's loss from transformers' logits (one sample; the loss head in `head_dtype`)."""
    if batch.loss == "sft":
        pc = hf_sequence_logps(model, batch.roles["chosen"], device, head_dtype=head_dtype)
        return -pc / float(batch.roles["chosen"].loss_mask.sum())
    # LongPO (docs/methods.md §2, the default loss.longpo_nll=sequence): the NLL over every predicted token
    # of the chosen long sequence; the chosen responses' sum from the same forward
    chosen = batch.roles["chosen"]
    logp, mask = hf_token_logps(model, chosen, device, whole=True, head_dtype=head_dtype)
    pc = (logp * mask).sum()
    nll = -logp.sum() / float(len(chosen) - 1)
    pr = hf_sequence_logps(model, batch.roles["rejected"], device, head_dtype=head_dtype)
    z = batch.beta * ((pc - batch.ref_logps["ref_chosen"]) - (pr - batch.ref_logps["ref_rejected"]))
    return nll + batch.lam * -torch.nn.functional.logsigmoid(z)


@torch.no_grad()
def fill_reference(model, batch: CheckBatch, short_prompt: int = 256, device="cpu") -> None:
    """LongPO's reference log-probs: the same model on a SHORT context (the prompt's last
    `short_prompt` tokens), as constants."""
    if batch.loss != "longpo":
        return
    if batch.ref_sequences:
        for k, seqs in batch.ref_sequences.items():
            batch.ref_logps[k] = float(sum(hf_sequence_logps(model, s, device) for s in seqs))
        return
    for role in ("chosen", "rejected"):
        s = batch.roles[role]
        first = int(np.argmax(s.loss_mask))
        cut = max(first - short_prompt, 0)
        batch.ref_logps["ref_" + role] = float(hf_sequence_logps(model, Seq(s.tokens[cut:], s.loss_mask[cut:]), device))


def hf_step(model, batch: CheckBatch, device="cpu", head_dtype: torch.dtype = HEAD_DTYPE
            ) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, gradients by HF name on the CPU, in the model's dtype: exact, and half the memory of
    float64 for an fp32 model)."""
    model.zero_grad(set_to_none=True)
    loss = hf_loss(model, batch, device, head_dtype)
    loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return float(loss), grads


# ---------------------------------------------------------------- the project's step


def project_batch(batch: CheckBatch, *, thd: bool, device):
    from megatron_longpo.data.packing import pack
    from megatron_longpo.losses import SeqStat
    from megatron_longpo.training.batch import prepare_batch

    roles = list(batch.roles)
    packed = pack([_Sample(batch.roles)], roles)
    ref = {k: SeqStat(torch.tensor([v], dtype=torch.float64), torch.tensor([1.0])) for k, v in batch.ref_logps.items()}
    # tokens of the reference do not enter DPO; NLL uses the policy's own count
    from megatron_longpo.losses import sequence_roles

    return prepare_batch(packed, ref, thd=thd, device=device, sequence_roles=sequence_roles(loss_config(batch)))


def loss_config(batch: CheckBatch):
    from megatron_longpo.losses import LossConfig

    if batch.loss == "sft":
        return LossConfig(name="sft")
    return LossConfig(name="longpo", beta=batch.beta, longpo_lambda=batch.lam)  # the default longpo_nll=sequence, as hf_loss


def megatron_to_hf_grads(arch, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradients under megatron names (any wrapper prefix, local or TE spec) -> Hugging Face names."""
    from megatron_longpo.checkpoint.hf import megatron_to_hf, to_canonical_names

    canon = to_canonical_names({n.replace("module.", ""): g for n, g in grads.items()})
    return dict(megatron_to_hf(arch, canon.__getitem__))


@dataclass
class ProjectEngine:
    chunks: list
    optimizer: object
    arch: object
    use_te: bool
    bf16: bool


def project_engine(ckpt_dir, *, bf16: bool, use_te: bool, rope_theta: float | None = None,
                   recompute: str | None = "full") -> ProjectEngine:
    """The model, DDP and optimizer exactly as training/engine.py's build_engine makes them
    (full recompute by default: the same arithmetic, less memory at long lengths)."""
    from megatron_longpo import parallel
    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.config import OptimSection
    from megatron_longpo.models.build import ModelOptions
    from megatron_longpo.training.engine import build_engine

    arch, _ = ckpt.read_model_json(ckpt_dir)
    if rope_theta is not None:
        arch = arch.with_rope_theta(rope_theta)
    par = parallel.ParallelConfig()
    parallel.setup(par, seed=0, arch=arch)
    opts = ModelOptions(bf16=bf16, use_te=use_te, recompute=recompute)
    optim = OptimSection(distributed_optimizer=False, clip_grad=0.0)
    # the main grads are what the optimizer reads (megatron's bf16 optimizer copies main_grad into its
    # fp32 main params' .grad); it is left out: it needs CUDA tensors in bf16
    chunks, optimizer = build_engine(arch, par, opts, optim, str(ckpt_dir), with_optimizer=False)
    return ProjectEngine(chunks, optimizer, arch, use_te, bf16)


def project_step(eng: ProjectEngine, batch: CheckBatch, chunk_size: int = 2048, plain: bool = True
                 ) -> tuple[float, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """One forward/backward of the training step. Returns (loss, main_grad by HF name, and with
    `plain` the param.grad autograd hands each parameter in a second pass, by HF name), fp64 on the CPU."""
    from megatron_longpo.parallel import current_layout
    from megatron_longpo.platform import default_device
    from megatron_longpo.training.engine import engine_forward_backward
    from megatron_longpo.training.step import loss_from_token_logprobs, run_model

    dev = default_device()
    sb = project_batch(batch, thd=eng.use_te, device=dev)
    cfg = loss_config(batch)
    layout = current_layout()  # project_engine set it up
    collected = engine_forward_backward(eng.chunks, eng.optimizer, [sb], cfg, chunk_size, layout)
    loss = float(collected[0]["loss"]) / sb.num_samples
    main = {n: p.main_grad.detach().to("cpu", copy=True) for c in eng.chunks for n, p in c.named_parameters()
            if getattr(p, "main_grad", None) is not None}
    for c in eng.chunks:
        c.zero_grad_buffer()
    if not plain:
        return loss, megatron_to_hf_grads(eng.arch, main), None
    # param.grad: the gradient autograd hands each parameter (read by a tensor hook, before DDP's
    # hook adds it to the buffer), through the model under DDP (Float16Module + GPTModel)
    inner = eng.chunks[0].module
    plain: dict[str, torch.Tensor] = {}
    hooks = [p.register_hook(lambda g, n=n: plain.__setitem__(n, g.detach().to("cpu", copy=True)))
             for n, p in inner.named_parameters() if p.requires_grad]
    try:
        out = run_model(inner, sb, chunk_size, layout)
        loss_sum, n, _ = loss_from_token_logprobs(out, sb, cfg)
        (loss_sum / n).backward()  # recompute does not support torch.autograd.grad
    finally:
        for h in hooks:
            h.remove()
        for c in eng.chunks:
            c.zero_grad_buffer()
    return loss, megatron_to_hf_grads(eng.arch, main), megatron_to_hf_grads(eng.arch, plain)


# ---------------------------------------------------------------- comparing


def compare(g: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], worst: int = 4) -> dict:
    """Whole-gradient relative error and cosine of `g` against `ref` (same names), and the worst
    tensors; sums in float64, one tensor at a time (no float64 copy of a whole gradient)."""
    if set(g) != set(ref):
        raise ValueError(f"the gradients hold different tensors, e.g. {sorted(set(g) ^ set(ref))[:4]}")
    diff2 = ref2 = g2 = dot = 0.0
    per = {}
    for n in sorted(ref):
        a, b = g[n].double(), ref[n].double()
        d2, b2 = float((a - b).pow(2).sum()), float(b.pow(2).sum())
        diff2, ref2, g2, dot = diff2 + d2, ref2 + b2, g2 + float(a.pow(2).sum()), dot + float((a * b).sum())
        per[n] = math.sqrt(d2) / max(math.sqrt(b2), 1e-30)
    return {
        "rel": math.sqrt(diff2) / max(math.sqrt(ref2), 1e-30),
        "cos": dot / max(math.sqrt(g2) * math.sqrt(ref2), 1e-30),
        "worst": sorted(per.items(), key=lambda kv: -kv[1])[:worst],
        "per_tensor": per,
    }


def rel_diff(x: float, ref: float) -> float:
    return abs(x - ref) / max(abs(ref), 1e-30) if math.isfinite(x) else math.inf
