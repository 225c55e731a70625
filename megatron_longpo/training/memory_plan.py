"""The memory plan: what one GPU holds at the peak of a training step, from arithmetic only (the
model's architecture, the parallel layout, the memory keys and the row length), so that a run
that cannot fit says so in seconds, with the knob to turn (docs/training.md, "Will it fit"). Where
a run meets it (the trainer's check before the build, `--plan`): training/memory_check.py.

Static memory is exact bookkeeping of megatron-core 0.19's tensors (checked on the CPU against
the built model and optimizer, tests/test_memory.py):
- parameters: bf16 (fp32 on the CPU); this rank's share under TP/PP;
- gradients: the DDP buffer, fp32 (optim.grad_dtype=fp32) or the parameters' dtype;
- optimizer (this rank's DP×CP shard with the distributed optimizer): without the precision-aware
  optimizer an fp32 copy of the parameters stays ON THE GPU even with optim.cpu_offload (megatron's
  DistributedOptimizer makes it before HybridDeviceOptimizer offloads its own copy: the ~27 GiB of
  a 7B that offloading alone did not remove); Adam's two moments; with cpu_offload the offloaded
  fraction's fp32 master, moments and a pinned fp32 gradient live in host memory instead.
Activations are calibrated (CALIBRATION below) from one H200's measured peaks of 4 Mistral-7B
layers, prefix-shared LongPO pair (docs/prefix_sharing.md): no recompute 76.06 / 132.60 GiB at
64K / 128K (responses NLL) and 76.69 / 133.86 GiB (sequence NLL); full recompute 38 / 57 GiB.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 2**30
FIT = 0.9  # a plan fits at or under this fraction of the GPU (MemoryPlan.verdict; model.recompute=auto's bar)

# Measured peaks (GiB) the activation constants are fitted to: one H200, 4 Mistral-7B layers, bf16,
# TE, prefix-shared pair with 512-token responses (row tokens 66,049 / 131,585), distributed Adam
# with an fp32 gradient buffer, output layer in 2,048-token chunks (docs/prefix_sharing.md).
CALIBRATION = {
    "rows": (66049, 131585),
    "none_responses": (76.06, 132.60),
    "none_sequence": (76.69, 133.86),
    "full_responses": (38.0, 57.0),
}
MISTRAL = dict(h=4096, kv=1024, ffn=14336, layers=4, vocab=32000)


def _layer_elems(h, kv, ffn):
    """Activation elements per token of one layer that the formula scales with (saved tensors of a
    pre-norm GQA SwiGLU layer: norm inputs/outputs, q/k/v, attention output, fc1 output, its gate)."""
    return 7 * h + 2 * kv + 3 * ffn


def _transient_elems(h, ffn):
    """Elements per token of the backward's working set of one layer (fc1's output gradient, ...)."""
    return 2 * ffn + h


def _fit():
    m, c = MISTRAL, CALIBRATION
    static = _mistral_static_gib()
    rows = c["rows"]
    dn = (rows[1] - rows[0])
    slope_none = (c["none_responses"][1] - c["none_responses"][0]) * GIB / dn  # bytes/token, all layers
    slope_full = (c["full_responses"][1] - c["full_responses"][0]) * GIB / dn
    inputs = m["layers"] * 2 * m["h"]  # full recompute keeps each layer's bf16 input
    # none: L·a + t = slope_none ; full: L·2h + a + t = slope_full
    a = (slope_none - (slope_full - inputs)) / (m["layers"] - 1)
    t = slope_none - m["layers"] * a
    seq = ((c["none_sequence"][0] - c["none_responses"][0]) + (c["none_sequence"][1] - c["none_responses"][1])) * GIB / (
        rows[0] + rows[1])
    workspace = c["none_responses"][0] - static - slope_none * rows[0] / GIB
    return dict(saved=a / (2 * _layer_elems(m["h"], m["kv"], m["ffn"])), transient=t / (2 * _transient_elems(m["h"], m["ffn"])),
                sequence_nll=seq / m["h"], workspace_gib=max(workspace, 0.0))


def layer_params(arch) -> int:
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    n = h * (q + 2 * kv) + q * h + 3 * h * arch.ffn_hidden_size + 2 * h
    if arch.qkv_bias:
        n += q + 2 * kv
    return n


def stage_params(arch, tp: int = 1, pp: int = 1) -> int:
    """Parameters on one rank of the largest pipeline stage (the embedding's or the output layer's)."""
    per_layer = layer_params(arch)
    h = arch.hidden_size
    norms = 2 * h  # replicated over TP
    layers = arch.num_layers // pp
    body = layers * ((per_layer - norms) // tp + norms)
    emb = arch.padded_vocab_size * h // tp
    first = body + emb + (h if pp == 1 else 0) + (0 if arch.tie_word_embeddings or pp > 1 else emb)
    last = body + h + (0 if arch.tie_word_embeddings else emb)
    return first if pp == 1 else max(first, last)


def _mistral_static_gib() -> float:
    """The calibration runs' static memory: 18 bytes/parameter (bf16 + fp32 grads + fp32 main + Adam)."""
    m = MISTRAL
    per_layer = m["h"] * (m["h"] + 2 * m["kv"]) + m["h"] * m["h"] + 3 * m["h"] * m["ffn"] + 2 * m["h"]
    n = m["layers"] * per_layer + 2 * m["vocab"] * m["h"] + m["h"]
    return n * 18 / GIB


@dataclass(frozen=True)
class PlanInputs:
    """Everything the plan reads; `from_config` fills it from a RunConfig."""

    arch: object
    row_tokens: int  # tokens of the longest micro-batch row (before the CP split)
    scored_tokens: int  # positions the output layer projects (responses; + the chosen sequence with longpo_nll=sequence)
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sequence_parallel: bool = False
    microbatches: int = 1
    bf16: bool = True
    distributed_optimizer: bool = True
    optimizer: str = "adam"
    grad_dtype: str = "fp32"
    cpu_offload: bool = False
    offload_fraction: float = 1.0
    precision_aware: bool = False
    exp_avg_dtype: str = "fp32"
    exp_avg_sq_dtype: str = "fp32"
    recompute: str | None = None  # None | "full" | "selective" ("auto": choose_recompute first)
    recompute_method: str = "uniform"  # full recompute: "uniform" | "block"
    recompute_num_layers: int = 1
    recompute_modules: tuple[str, ...] | None = None  # selective: what each layer recomputes (None: core_attn)
    te: bool = True  # the Transformer Engine spec (layernorm recompute needs it)
    activation_offload_layers: int = 0
    logprob_chunk: int = 2048

    @classmethod
    def from_config(cls, cfg, arch, *, world: int, row_tokens: int, scored_tokens: int, cuda: bool) -> "PlanInputs":
        from megatron_longpo import platform
        from megatron_longpo.models.build import te_available
        from megatron_longpo.models.megatron_config import precision_aware

        # planning for a GPU from the CPU (--plan) assumes TE; on a GPU, whether it imports
        te = cuda and cfg.model.transformer_engine is not False and (te_available() if platform.cuda_available() else True)
        p = cfg.parallel
        dp = max(world // (p.tensor_parallel * p.pipeline_parallel * p.context_parallel), 1)
        o = cfg.optim
        spm = cfg.data.samples_per_microbatch
        per_rank = max(cfg.data.global_batch_size // max(dp, 1), 1)
        return cls(arch=arch, row_tokens=row_tokens, scored_tokens=scored_tokens, tp=p.tensor_parallel,
                   pp=p.pipeline_parallel, cp=p.context_parallel, dp=dp, sequence_parallel=p.sequence_parallel,
                   microbatches=max(per_rank // spm, 1), bf16=cfg.model.bf16 and cuda,
                   distributed_optimizer=o.distributed_optimizer and cuda, optimizer=o.name, grad_dtype=o.grad_dtype,
                   cpu_offload=o.cpu_offload, offload_fraction=o.offload_fraction, precision_aware=precision_aware(o),
                   exp_avg_dtype=o.exp_avg_dtype, exp_avg_sq_dtype=o.exp_avg_sq_dtype, recompute=cfg.model.recompute,
                   recompute_method=cfg.model.recompute_method, recompute_num_layers=cfg.model.recompute_num_layers,
                   recompute_modules=cfg.model.recompute_modules, activation_offload_layers=cfg.model.activation_offload_layers,
                   logprob_chunk=cfg.model.logprob_chunk_size, te=te)


_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def recompute_words(recompute: str | None, method: str = "uniform", num_layers: int = 1,
                    modules: tuple[str, ...] | None = None, layers: int | None = None) -> str:
    """A recompute in words: none, full, "selective (mlp)", or "full, block, 12 of 32 layers" (of
    `layers`, a stage's; "full, block, 12" without them)."""
    if recompute == "full" and method == "block":
        return f"full, block, {min(num_layers, layers)} of {layers} layers" if layers else f"full, block, {num_layers}"
    if recompute == "selective":
        return f"selective ({', '.join(modules or ('core_attn',))})"
    return recompute or "none"


def recompute_label(i: PlanInputs) -> str:
    """The recompute of `i` in words (recompute_words, with its stage's layers)."""
    return recompute_words(i.recompute, i.recompute_method, i.recompute_num_layers, i.recompute_modules,
                           i.arch.num_layers // i.pp)


@dataclass(frozen=True)
class MemoryPlan:
    inputs: PlanInputs
    params: float  # bytes, GPU
    grads: float
    main_params: float  # fp32 parameter copy kept on the GPU by the optimizer
    optim_states: float  # Adam moments on the GPU
    step_transient: float  # allocated only during the optimizer step (fp32 gradient copies)
    activations: float
    logprobs: float
    workspace: float
    host: float  # host memory for the offloaded optimizer / activations
    device: float | None = None  # bytes the GPU holds (None: not checked)

    @property
    def static(self) -> float:
        return self.params + self.grads + self.main_params + self.optim_states

    @property
    def peak(self) -> float:
        backward = self.static + self.activations + self.logprobs + self.workspace
        return max(backward, self.static + self.step_transient)

    @property
    def ratio(self) -> float | None:
        return None if not self.device else self.peak / self.device

    @property
    def verdict(self) -> str:
        r = self.ratio
        if r is None:
            return "not checked (no GPU)"
        return "fits" if r <= FIT else "tight (within the plan's 10%)" if r <= 1.1 else "does not fit"

    def table(self) -> str:
        g = lambda b: f"{b / GIB:7.1f}"  # noqa: E731
        i = self.inputs
        rec = recompute_label(i)
        opt = (f"{i.optimizer}, distributed over DP×CP={i.dp * i.cp}" if i.distributed_optimizer else i.optimizer)
        if i.cpu_offload:
            opt += f", {i.offload_fraction:g} on the CPU"
        rows = [
            ("parameters", self.params, f"{stage_params(i.arch, i.tp, i.pp):,} x {'bf16' if i.bf16 else 'fp32'}"),
            ("gradients", self.grads, f"DDP buffer, {self._grad_bytes()}-byte"),
            ("fp32 parameter copy", self.main_params, "the optimizer's, on the GPU"),
            ("optimizer states", self.optim_states, opt),
            (f"activations ({i.row_tokens:,} tokens / CP {i.cp})", self.activations,
             f"recompute {rec}" + (f", {i.activation_offload_layers} layers offloaded" if i.activation_offload_layers else "")),
            ("log-prob chunks", self.logprobs, f"{min(i.logprob_chunk, max(i.scored_tokens, 1)):,} positions x vocab/TP, fp32"),
            ("workspace", self.workspace, "calibrated"),
        ]
        lines = ["memory plan (per GPU, GiB):"] + [f"  {name:<40}{g(b)}  {note}" for name, b, note in rows]
        if self.step_transient:
            lines.append(f"  {'(optimizer step: fp32 gradient copies)':<40}{g(self.step_transient)}  not at the backward's peak")
        if self.host:
            lines.append(f"  {'host memory (offloaded)':<40}{g(self.host)}")
        dev = f" of {self.device / GIB:.1f} GiB" if self.device else ""
        pct = f" ({100 * self.ratio:.0f}%)" if self.ratio else ""
        lines.append(f"  {'predicted peak':<40}{g(self.peak)}{dev}{pct}: {self.verdict}")
        return "\n".join(lines)

    def _grad_bytes(self) -> int:
        i = self.inputs
        return 4 if i.grad_dtype == "fp32" else (2 if i.bf16 else 4)


def plan(i: PlanInputs, device_bytes: float | None = None) -> MemoryPlan:
    c = _fit()
    a = i.arch
    n = stage_params(a, i.tp, i.pp)
    pbytes = 2 if i.bf16 else 4
    gbytes = 4 if i.grad_dtype == "fp32" else pbytes
    params, grads = n * pbytes, n * gbytes
    shard = n / (i.dp * i.cp) if i.distributed_optimizer else n
    adam = i.optimizer == "adam"
    moments = (_BYTES[i.exp_avg_dtype] + _BYTES[i.exp_avg_sq_dtype]) if (adam and i.precision_aware) else (8 if adam else 0)
    f = i.offload_fraction if i.cpu_offload else 0.0
    main = optim = transient = host = 0.0
    if i.bf16:
        if i.cpu_offload:
            if not i.precision_aware:
                main = 4 * shard  # DistributedOptimizer's fp32 shard stays on the GPU
                optim = moments * shard * (1 - f)
            else:
                main = 4 * shard * (1 - f)  # HybridDeviceOptimizer's fp32 copy of the GPU part
                optim = moments * shard * (1 - f)
                if gbytes != 4:
                    transient = 4 * shard * (1 - f)  # grad.to(fp32) for the GPU part
            # master, moments, pinned grad (+ the pinned bf16 staging copy, kept by the pinned-memory cache)
            host = shard * f * (4 + (8 if adam else 0) + 4 + (2 if i.precision_aware else 0))
        else:
            main = 4 * shard
            optim = moments * shard
            if gbytes != 4:
                transient = 4 * shard  # main.grad = shard_grad.float()
    else:
        optim = (8 if adam else 0) * n  # fp32 parameters: no copy; Adam's moments
    # activations, per GPU
    e = (2 if i.bf16 else 4) / 2  # the calibration is bf16
    h, kv, ffn = a.hidden_size, a.num_query_groups * a.head_dim, a.ffn_hidden_size
    tok = i.row_tokens / i.cp
    split = i.tp if i.sequence_parallel else 1
    layer = c["saved"] * 2 * e * (5 * h / split + (2 * h + 2 * kv + 3 * ffn) / i.tp) * tok
    trans = c["transient"] * 2 * e * (h / split + 2 * ffn / i.tp) * tok
    layers = a.num_layers // i.pp
    in_flight = min(i.pp, i.microbatches) if i.pp > 1 else 1
    if i.recompute == "auto":
        raise ValueError("model.recompute=auto: plan the recompute choose_recompute picks")
    inp = 2 * e * h / split * tok  # one layer's input (bf16), all a recomputed layer keeps
    if i.recompute == "full" and i.recompute_method == "block":
        # the first k layers of the stage keep their input, the other layers - k all their saved tensors.
        # The backward reaches the recomputed (first) layers after the others' tensors are freed, so one
        # recomputed layer's activations add to the peak only when every layer is recomputed (k = layers:
        # uniform with recompute_num_layers=1)
        k = min(i.recompute_num_layers, layers)
        saved = (k * inp + (layers - k) * layer) * in_flight + (layer if k == layers else 0)
    elif i.recompute == "full":
        k = i.recompute_num_layers
        saved = (layers / k) * inp * in_flight + k * layer
    elif i.activation_offload_layers:
        kept = layers - i.activation_offload_layers + 1  # + one layer's reload buffer
        saved = kept * layer * in_flight
        host += i.activation_offload_layers * layer
    elif i.recompute == "selective":
        # every layer keeps its tensors less those of the recomputed modules: the MLP's fc1 output and gate
        # (3 ffn; its input, the norm's output, stays), the two norms' outputs (2 h); core_attn drops
        # nothing (TE's fused attention saves no score matrix). The backward recomputes one layer's at a time.
        mods = i.recompute_modules or ("core_attn",)
        drop = c["saved"] * 2 * e * ((3 * ffn / i.tp if "mlp" in mods else 0) + (2 * h / split if "layernorm" in mods else 0)) * tok
        saved = layers * (layer - drop) * in_flight + drop
    else:
        saved = layers * layer * in_flight
    seq_extra = c["sequence_nll"] * h * e * i.scored_tokens / i.cp  # whole-sequence NLL's kept statistics
    acts = saved + trans + seq_extra
    logp = min(i.logprob_chunk, max(i.scored_tokens, 1)) * a.padded_vocab_size / i.tp * 4 * 2
    return MemoryPlan(i, params, grads, main, optim, transient, acts, logp, c["workspace_gib"] * GIB, host, device_bytes)


def _full(i: PlanInputs) -> PlanInputs:
    """Every layer recomputed: full, uniform, one layer per chunk."""
    return replace(i, recompute="full", recompute_method="uniform", recompute_num_layers=1)


def _block_short_of_all(i: PlanInputs) -> bool:
    return i.recompute == "full" and i.recompute_method == "block" and i.recompute_num_layers < i.arch.num_layers // i.pp


KNOBS = (
    ("model.recompute=full", lambda i: i.recompute != "full" and i.recompute_method == "uniform" and not i.activation_offload_layers,
     _full),
    ("model.recompute=full model.recompute_method=uniform model.recompute_num_layers=1",
     lambda i: (i.recompute != "full" or _block_short_of_all(i)) and i.recompute_method == "block" and not i.activation_offload_layers,
     _full),
    ("optim.cpu_offload=true", lambda i: i.bf16 and i.distributed_optimizer and not i.cpu_offload,
     lambda i: replace(i, cpu_offload=True, offload_fraction=1.0, precision_aware=i.optimizer == "adam",
                       exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")),
    ("optim.offload_fraction=1.0", lambda i: i.cpu_offload and i.offload_fraction < 1, lambda i: replace(i, offload_fraction=1.0)),
    ("optim.grad_dtype=bf16", lambda i: i.bf16 and i.grad_dtype == "fp32", lambda i: replace(i, grad_dtype="bf16")),
)


def advice(p: MemoryPlan) -> str:
    """The knobs (cumulative, cheapest first) that bring the predicted peak under the GPU's memory."""
    if not p.device or p.peak <= p.device:
        return ""
    i, turned = p.inputs, []
    for name, applies, apply in KNOBS:
        if applies(i):
            i = apply(i)
            turned.append(name)
            q = plan(i, p.device)
            if q.peak <= 0.95 * p.device:
                return f"turn {' '.join(turned)} (predicted {q.peak / GIB:.1f} GiB)"
    q = plan(i, p.device)
    more = f" even with {' '.join(turned)} ({q.peak / GIB:.1f} GiB)" if turned else ""
    return (f"does not fit{more}: split the row over more GPUs (parallel.context_parallel, tensor_parallel) or train "
            f"shorter rows (data.max_tokens)")


def recompute_flops(i: PlanInputs) -> float:
    """The forward FLOPs per token a recompute choice reruns in a stage (what it costs, to order them):
    a whole layer's (its matmuls and its causal attention over the row) per recomputed layer; the MLP's
    three matmuls per layer for selective mlp; the norms nearly nothing."""
    a, layers = i.arch, i.arch.num_layers // i.pp
    h, q, kv, ffn = a.hidden_size, a.num_attention_heads * a.head_dim, a.num_query_groups * a.head_dim, a.ffn_hidden_size
    mlp = 2 * 3 * h * ffn
    layer = 2 * (h * (q + 2 * kv) + q * h) + mlp + 2 * i.row_tokens * q  # causal: half of 4·s·q
    if i.recompute == "full" and i.recompute_method == "block":
        return min(i.recompute_num_layers, layers) * layer
    if i.recompute == "full":
        return layers * layer
    if i.recompute == "selective":
        mods = i.recompute_modules or ()
        return layers * ((mlp if "mlp" in mods else 0) + (10 * h if "layernorm" in mods else 0))
    return 0.0


def choose_recompute(i: PlanInputs, device_bytes: float | None) -> PlanInputs:
    """model.recompute=auto: the cheapest recompute whose plan fits (peak <= 90% of `device_bytes`),
    cheapest by the forward FLOPs it reruns (recompute_flops): none; selective recompute of every
    layer's MLP, and of its MLP and norms (with the TE spec); block recompute of the first N = 1, 2, ..., L - 1 of a
    stage's L layers; else full uniform recompute (every layer, recompute_num_layers=1; block of all
    L plans the same), which comes only when nothing fits: the verdict and the advice then say so.
    Without a device size (no GPU): none."""
    none = replace(i, recompute=None, recompute_method="uniform", recompute_num_layers=1, recompute_modules=None)
    if not device_bytes:
        return none
    layers = i.arch.num_layers // i.pp
    selective = (("mlp",), ("mlp", "layernorm")) if i.te else (("mlp",),)  # norm recompute needs TE
    ladder = [none, *(replace(none, recompute="selective", recompute_modules=m) for m in selective),
              *(replace(none, recompute="full", recompute_method="block", recompute_num_layers=n) for n in range(1, layers))]
    for c in sorted(ladder, key=recompute_flops):  # stable: equal costs keep the ladder's order
        if plan(c, device_bytes).peak <= FIT * device_bytes:
            return c
    return _full(none)


def resolve_recompute(i: PlanInputs, device_bytes: float | None) -> tuple[PlanInputs, str | None]:
    """(the inputs to plan, the log line of model.recompute=auto's choice; None for any other recompute)."""
    if i.recompute != "auto":
        return i, None
    c = choose_recompute(i, device_bytes)
    if not device_bytes:
        return c, "model.recompute=auto: no recompute (no GPU: the device's memory is unknown, nothing to fit)"
    p = plan(c, device_bytes)
    how = ("the cheapest that fits under 90%" if p.peak <= FIT * device_bytes
           else "the most there is, and still over 90%")
    return c, (f"model.recompute=auto: recompute {recompute_label(c)} ({how} of the GPU): predicted peak "
               f"{p.peak / GIB:.1f} of {device_bytes / GIB:.1f} GiB")


def host_bytes() -> float | None:
    import os

    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def describe(p: MemoryPlan) -> str:
    tip = advice(p)
    out = p.table() + (f"\n  to fit: {tip}" if tip else "")
    ram = host_bytes()
    if p.host and ram and p.host > 0.85 * ram:
        out += (f"\n  host: {p.host / GIB:.1f} GiB of this machine's {ram / GIB:.1f} GiB: lower optim.offload_fraction "
                f"(the rest of the optimizer stays on the GPU)")
    return out


def device_bytes() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)


H200_GIB = 139.8  # torch's total_memory of one H200 (--plan's default without a GPU)
