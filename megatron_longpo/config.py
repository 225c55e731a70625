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


@dataclass(frozen=True)
class ModelSection:
    checkpoint: str = ""  # megatron-longpo checkpoint dir (tools/convert_checkpoint.py hf-to-megatron)
    rope_theta: float | None = None  # policy RoPE base (LongPO context extension); None = the checkpoint's
    max_position_embeddings: int | None = None  # the trained context, recorded in the checkpoint and the export (None: the checkpoint's)
    bf16: bool = True
    transformer_engine: bool | None = None  # None: TE when it imports and a GPU is present; false: the local spec (fp32 reference runs)
    recompute: str | None = None  # None | "full" | "selective"
    recompute_num_layers: int = 1
    logprob_chunk_size: int = 2048


@dataclass(frozen=True)
class ParallelSection:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    virtual_pipeline_parallel: int | None = None
    context_parallel: int = 1
    sequence_parallel: bool = False


@dataclass(frozen=True)
class DataSection:
    path: str = ""  # dataset prefix (tools/preprocess_pairs.py --output)
    reference: str | None = None  # reference sidecar; None: <path>.ref.* if present, else online reference
    samples_per_microbatch: int = 1
    global_batch_size: int = 8  # samples (pairs) per optimizer step, over all data-parallel ranks
    seed: int = 1234
    max_tokens: int | None = None  # refuse a micro-batch longer than this (packed tokens)
    share_prefix: bool = False  # chosen/rejected share their common prefix in one row (docs/prefix_sharing.md)


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


    def __post_init__(self):
        if self.name not in ("adam", "sgd"):
            raise ValueError(f"optim.name must be adam or sgd, got {self.name!r}")


@dataclass(frozen=True)
class TrainSection:
    steps: int | None = None  # optimizer steps; None = one epoch
    epochs: int = 1
    save_dir: str = "runs/longpo"
    save_interval: int = 0  # 0: only at the end
    keep_last: int = 2
    log_interval: int = 1
    tensorboard: bool = True
    max_nonfinite_in_a_row: int = 3
    exit_after: int | None = None  # stop (and save) after this many steps of THIS run: job time limits
    stall_seconds: float = 1800.0  # a step (or save) taking longer prints every thread's stack on each rank; 0: off
    seed: int = 1234
    peak_tflops: float | None = None  # per-GPU dense bf16 peak for MFU; None = guess from the device name


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
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
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from e


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
    if cfg.data.share_prefix and cfg.parallel.sequence_parallel:
        raise ConfigError("data.share_prefix=true does not support parallel.sequence_parallel yet; set one of them to false")
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)
