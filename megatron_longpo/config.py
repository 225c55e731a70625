"""Typed run configuration: nested dataclasses, read from YAML, with `section.key=value` overrides.

Unknown keys, wrong types and bad values are reported with the key's full name and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_longpo.losses import LossConfig


class ConfigError(ValueError):
    """A configuration value a user set is unknown, of the wrong type or out of range."""


def _require(section: str, obj, **rules) -> None:
    """Refuse values that make no sense, naming the key: rules are key=(predicate, what it must be).
    A None value is left to the field's own meaning (e.g. train.steps=None: one epoch)."""
    for key, (ok, need) in rules.items():
        v = getattr(obj, key)
        if v is not None and not ok(v):
            raise ValueError(f"{section}.{key} must be {need}, got {v!r}")


def _pos(v) -> bool:
    return v > 0


def _nonneg(v) -> bool:
    return v >= 0


POSITIVE = (_pos, "> 0")
NON_NEGATIVE = (_nonneg, ">= 0")


RECOMPUTE_MODULES = ("core_attn", "layernorm", "mlp")  # a dense layer's selective recompute in megatron-core 0.19


@dataclass(frozen=True)
class ModelSection:
    checkpoint: str = ""  # megatron-longpo checkpoint dir (tools/convert_checkpoint.py hf-to-megatron)
    rope_theta: float | None = None  # policy RoPE base (LongPO context extension); None = the checkpoint's
    max_position_embeddings: int | None = None  # the trained context, recorded in the checkpoint and the export (None: the checkpoint's)
    bf16: bool = True
    transformer_engine: bool | None = None  # None: TE when it imports and a GPU is present; false: the local spec (fp32 reference runs)
    recompute: str | None = None  # None | "full" | "selective" | "auto" (the memory plan chooses: training/memory_plan.choose_recompute)
    # full recompute: "uniform" (chunks of recompute_num_layers layers) | "block" (only the first recompute_num_layers of each stage)
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    # selective recompute: what megatron-core recomputes in every layer (core_attn, layernorm, mlp; "mlp,layernorm"
    # or a list; None: its default, core_attn, which TE's fused attention makes a no-op)
    recompute_modules: tuple[str, ...] | None = None
    logprob_chunk_size: int = 2048
    activation_offload_layers: int = 0  # TE CPU offloading of this many layers' activations (docs/training.md "Will it fit"); 0: off

    def __post_init__(self):
        if self.recompute not in (None, "full", "selective", "auto"):
            raise ValueError(f"model.recompute must be null, full, selective or auto, got {self.recompute!r}")
        if self.recompute_method not in ("uniform", "block"):
            raise ValueError(f"model.recompute_method must be uniform or block, got {self.recompute_method!r}")
        if self.recompute_modules is not None:
            mods = self.recompute_modules.split(",") if isinstance(self.recompute_modules, str) else self.recompute_modules
            mods = tuple(dict.fromkeys(str(m).strip() for m in mods if str(m).strip()))
            bad = [m for m in mods if m not in RECOMPUTE_MODULES]
            if bad or not mods:
                raise ValueError(f"model.recompute_modules: {bad[0] if bad else 'empty'!r} is not one of "
                                 f"{', '.join(RECOMPUTE_MODULES)} (e.g. model.recompute_modules=mlp,layernorm)")
            if self.recompute != "selective":
                raise ValueError(f"model.recompute_modules={','.join(mods)} needs model.recompute=selective (got "
                                 f"{self.recompute}: full recompute reruns whole layers)")
            object.__setattr__(self, "recompute_modules", mods)
        if self.recompute == "auto" and self.activation_offload_layers:
            raise ValueError(f"model.recompute=auto cannot be combined with model.activation_offload_layers="
                             f"{self.activation_offload_layers} (megatron-core 0.19 cannot recompute offloaded layers); "
                             f"choose one")
        _require("model", self, rope_theta=POSITIVE, max_position_embeddings=POSITIVE, recompute_num_layers=POSITIVE,
                 logprob_chunk_size=POSITIVE, activation_offload_layers=NON_NEGATIVE)


class LayoutError(ValueError):
    """The parallel layout does not fit the world size, the model or the other settings."""


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel layout (the run config's `parallel` section)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    context_parallel: int = 1
    sequence_parallel: bool = False

    def __post_init__(self):
        try:
            _require("parallel", self, tensor_parallel=POSITIVE, pipeline_parallel=POSITIVE,
                     virtual_pipeline_parallel=POSITIVE, context_parallel=POSITIVE)
        except ValueError as e:
            raise LayoutError(str(e)) from None
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise LayoutError("parallel.sequence_parallel needs tensor_parallel > 1; set sequence_parallel=false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel_size

    def pad_multiple(self) -> int:
        """Every packed sequence is padded to this many tokens (CP zig-zag split, SP split)."""
        m = 2 * self.context_parallel if self.context_parallel > 1 else 1
        return m * (self.tensor_parallel if self.sequence_parallel else 1)


def validate_layout(par: ParallelConfig, world_size: int | None = None, arch=None, seq_lengths=(), *,
                    cpu_cp: bool = False, use_te: bool | None = None, prefix_sharing: bool = False) -> int | None:
    """Every layout and compatibility rule, in one place; raises LayoutError naming the numbers and
    the fix. Each rule runs when its inputs are given:
      * always: prefix sharing (data.share_prefix) and sequence parallelism;
      * world_size: TP*PP*CP divides it; context parallelism without a GPU only for prefix sharing
        (its reference attention runs CP on the CPU) or `cpu_cp`;
      * arch (models.hf_config.ModelArch): heads, KV heads, layers and the vocabulary split evenly;
      * seq_lengths: multiples of the pad multiple;
      * use_te (the resolved ModelOptions.use_te): CP and SP need the Transformer Engine spec.
    Returns the data-parallel size when world_size is given (else None)."""
    if prefix_sharing and par.sequence_parallel:
        raise LayoutError("data.share_prefix=true does not support parallel.sequence_parallel yet; set one of them to false")
    if use_te is False and (par.sequence_parallel or (par.context_parallel > 1 and not prefix_sharing)):
        raise LayoutError("context and sequence parallelism need the Transformer Engine spec (a GPU with TE)")
    mp = par.model_parallel_size
    if world_size is not None and world_size % mp:
        raise LayoutError(
            f"world size {world_size} is not divisible by TP*PP*CP = {par.tensor_parallel}*"
            f"{par.pipeline_parallel}*{par.context_parallel} = {mp}; launch a multiple of {mp} "
            f"processes or change the layout"
        )
    if arch is not None:
        tp = par.tensor_parallel
        if arch.num_attention_heads % tp:
            raise LayoutError(
                f"{arch.num_attention_heads} attention heads are not divisible by TP={tp}; "
                f"pick a TP that divides {arch.num_attention_heads}"
            )
        if arch.num_query_groups % tp:
            raise LayoutError(
                f"{arch.num_query_groups} KV heads (query groups) are not divisible by TP={tp}; "
                f"pick a TP that divides {arch.num_query_groups}"
            )
        chunks = par.pipeline_parallel * (par.virtual_pipeline_parallel or 1)
        if arch.num_layers % chunks:
            raise LayoutError(
                f"{arch.num_layers} layers are not divisible by PP*VPP = {chunks}; "
                f"pick pipeline sizes whose product divides {arch.num_layers}"
            )
        if par.virtual_pipeline_parallel and par.pipeline_parallel == 1:
            raise LayoutError("virtual_pipeline_parallel needs pipeline_parallel > 1")
        if arch.padded_vocab_size % tp:
            raise LayoutError(f"padded vocabulary {arch.padded_vocab_size} is not divisible by TP={tp}")
    m = par.pad_multiple()
    for s in seq_lengths:
        if s % m:
            raise LayoutError(
                f"sequence length {s} is not a multiple of {m} (2*CP{'*TP with sequence parallel' if par.sequence_parallel else ''}); "
                f"use a multiple of {m}"
            )
    if world_size is None:
        return None
    from megatron_longpo import platform

    if par.context_parallel > 1 and not platform.cuda_available() and not (cpu_cp or prefix_sharing):
        raise LayoutError("context parallelism needs Transformer Engine on GPUs; set context_parallel=1 on the CPU "
                          "(or data.share_prefix=true, whose reference attention runs CP on the CPU)")
    return world_size // mp


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # dataset prefix (tools/preprocess_pairs.py --output), or a weighted blend "0.3 PREFIX_A 0.7 PREFIX_B" (docs/data.md)
    eval_path: str | None = None  # held-out dataset prefix(es) scored every train.eval_interval steps
    eval_fraction: float = 0.0  # or: hold out this fraction of data.path's samples (per prefix) for evaluation
    reference: str | None = None  # reference sidecar; None: <path>.ref.* if present, else online reference
    samples_per_microbatch: int = 1
    global_batch_size: int = 8  # samples (pairs) per optimizer step, over all data-parallel ranks
    seed: int = 1234
    max_tokens: int | None = None  # refuse a micro-batch longer than this (packed tokens)
    share_prefix: bool = False  # chosen/rejected share their common prefix in one row (docs/prefix_sharing.md)
    check_tokenizer: bool = True  # refuse a dataset tokenized with another tokenizer than the model's (docs/reliability.md)
    verify_hash: bool = False  # recompute the dataset's sha256 against its manifest before training (docs/reliability.md)

    def __post_init__(self):
        _require("data", self, samples_per_microbatch=POSITIVE, global_batch_size=POSITIVE, seed=NON_NEGATIVE,
                 max_tokens=POSITIVE, eval_fraction=(lambda v: 0 <= v < 1, "in [0, 1)"))
        if self.eval_path and self.eval_fraction:
            raise ValueError("set data.eval_path or data.eval_fraction, not both")


@dataclass(frozen=True)
class OptimSection:
    name: str = "adam"  # "adam" | "sgd"
    lr: float = 5e-7
    min_lr: float = 0.0
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True
    overlap_grad_reduce: bool = False
    # memory (docs/training.md "Will it fit"; models/megatron_config.py maps them onto megatron-core's configs)
    cpu_offload: bool = False  # optimizer states and their update on the CPU (megatron's HybridDeviceOptimizer)
    offload_fraction: float = 1.0  # with cpu_offload: the fraction of the parameters whose optimizer lives on the CPU
    offload_overlap: bool = False  # with cpu_offload: overlap the gradient/parameter copies with the CPU step (more host memory)
    precision_aware: bool | None = None  # megatron's precision-aware optimizer; None: on with cpu_offload (no fp32 copy of the parameters on the GPU)
    grad_dtype: str = "fp32"  # the DDP gradient buffer (and reduction) dtype: fp32 | bf16
    exp_avg_dtype: str = "fp32"  # Adam's first moment: fp32 | bf16 | fp16 (not fp32: needs precision_aware, GPU optimizer)
    exp_avg_sq_dtype: str = "fp32"  # Adam's second moment: fp32 | bf16 | fp16 (same)

    def __post_init__(self):
        if self.name not in ("adam", "sgd"):
            raise ValueError(f"optim.name must be adam or sgd, got {self.name!r}")
        for key, allowed in (("grad_dtype", ("fp32", "bf16")), ("exp_avg_dtype", ("fp32", "bf16", "fp16")),
                             ("exp_avg_sq_dtype", ("fp32", "bf16", "fp16"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"optim.{key} must be {' or '.join(allowed)}, got {getattr(self, key)!r}")
        _require("optim", self, offload_fraction=(lambda v: 0 < v <= 1, "in (0, 1]"))
        unit = (lambda v: 0 <= v < 1, "in [0, 1)")
        _require("optim", self, lr=(_pos, "> 0 (a learning rate of 0 trains nothing)"), min_lr=NON_NEGATIVE,
                 warmup_fraction=(lambda v: 0 <= v <= 1, "in [0, 1]"), weight_decay=NON_NEGATIVE, adam_beta1=unit,
                 adam_beta2=unit, adam_eps=POSITIVE, clip_grad=(_nonneg, ">= 0 (0: no clipping)"))
        if self.min_lr > self.lr:
            raise ValueError(f"optim.min_lr ({self.min_lr:g}) must not exceed optim.lr ({self.lr:g})")


@dataclass(frozen=True)
class TrainSection:
    steps: int | None = None  # optimizer steps; None = one epoch
    epochs: int = 1
    save_dir: str = "runs/longpo"
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    log_interval: int = 1
    tensorboard: bool = True
    wandb_project: str | None = None  # log to Weights & Biases too (pip install 'megatron-longpo[wandb]'; WANDB_MODE=offline works)
    wandb_run_name: str | None = None  # W&B run name (default: W&B's)
    eval_interval: int = 0  # score data.eval_path / data.eval_fraction every this many steps (and at the end); 0: off
    max_nonfinite_in_a_row: int = 3
    exit_after: int | None = None  # stop (and save) after this many steps of THIS run: job time limits
    stall_seconds: float = 1800.0  # a step (or save) taking longer prints every thread's stack on each rank; 0: off
    seed: int = 1234
    peak_tflops: float | None = None  # per-GPU dense bf16 peak for MFU; None = guess from the device name
    resume_fallback: bool = False  # the newest checkpoint is damaged: resume from the newest intact one (said in the log)
    memory_check: str = "refuse"  # the memory plan predicts more than the GPU holds: refuse | warn | off (docs/training.md "Will it fit")
    # jobs sharing a GPU: cap this process's allocator at this fraction of it (it frees its cache before
    # going past it); the memory plan fits against the cap
    memory_fraction: float | None = None

    def __post_init__(self):
        _require("train", self, steps=(_pos, ">= 1 (leave it unset, or null, for train.epochs epochs)"),
                 epochs=POSITIVE, save_interval=(_nonneg, ">= 0 (0: save only at the end)"),
                 keep_last=(_nonneg, ">= 0 (0: keep every checkpoint)"), log_interval=POSITIVE,
                 max_nonfinite_in_a_row=POSITIVE, exit_after=POSITIVE, stall_seconds=(_nonneg, ">= 0 (0: off)"),
                 seed=NON_NEGATIVE, peak_tflops=POSITIVE, eval_interval=NON_NEGATIVE,
                 memory_fraction=(lambda v: 0 < v <= 1, "in (0, 1] (e.g. 0.47 for two jobs on one GPU), or null"))
        if self.memory_check in ("False", "false", "no"):  # YAML reads `off` as false
            object.__setattr__(self, "memory_check", "off")
        if self.memory_check not in ("refuse", "warn", "off"):
            raise ValueError(f"train.memory_check must be refuse, warn or off, got {self.memory_check!r}")


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataSection = field(default_factory=DataSection)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)


def _convert(name: str, typ: Any, value: Any) -> Any:
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(name, a, value)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{name}: cannot be {value!r}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if typ in (int, float):
        v = None
        if not isinstance(value, bool):
            try:
                v = typ(value) if isinstance(value, (int, str)) or typ is float else None
            except ValueError:
                v = None
            if typ is int and isinstance(value, float) and value.is_integer():
                v = int(value)
        if v is None:
            raise ConfigError(f"{name} must be {'an integer' if typ is int else 'a number'}, got {value!r}")
        return v
    if typ is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{name} must be a string, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        if k not in fields:
            close = [n for n in fields if n.startswith(k[:3])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix}{k}{hint}; known: {', '.join(fields)}")
        t = hints[k]
        if dataclasses.is_dataclass(t):
            kwargs[k] = _build(t, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _convert(f"{prefix}{k}", t, v)
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        raise ConfigError(msg if prefix and msg.startswith(prefix) else f"{prefix.rstrip('.') or 'config'}: {msg}") from e


def _set_dotted(d: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    d[parts[-1]] = value


def load_config(path: str | None = None, overrides: list[str] = ()) -> RunConfig:
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from e
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"override {o!r} must look like section.key=value (e.g. optim.lr=1e-6)")
        k, v = o.split("=", 1)
        _set_dotted(data, k.strip(), yaml.safe_load(v) if v.strip() else "")
    cfg = _build(RunConfig, data, "")
    if cfg.model.recompute == "auto" and cfg.train.memory_check == "off":
        raise ConfigError("model.recompute=auto is chosen by the memory plan, which train.memory_check=off turns off; "
                          "set train.memory_check=warn (or refuse), or a model.recompute of your own")
    try:  # the rules that need neither the world size nor the model (those run at parallel.setup)
        validate_layout(cfg.parallel, prefix_sharing=cfg.data.share_prefix)
    except LayoutError as e:
        raise ConfigError(str(e)) from None
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    """The effective configuration (defaults filled in) as YAML that load_config reads back."""
    import json

    return yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False)
