"""The one translation: the model's architecture, the parallel layout, how the model is built
(ModelOptions) and the run's optimizer settings (config.OptimSection) -> megatron-core's
TransformerConfig, DistributedDataParallelConfig and OptimizerConfig.

Every megatron-core config object the package makes is made here (tests/test_architecture.py
checks it), so that a megatron-core API change touches this file only:
  * `transformer_config`: the TransformerConfig of a model (training, reference scoring,
    conversion, resharding: models/build.py builds GPTModel with it);
  * `megatron_configs`: the three objects of a training run, as one `MegatronConfigs`.
What megatron-core 0.19 cannot combine is refused before this, by training/memory.check.

The module imports neither torch nor megatron-core until a config is made: the memory plan
reads `precision_aware` from it without building anything. It lives on the models floor (not in
training/) because conversion and resharding (checkpoint/, below training/) build models too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from megatron_longpo.config import OptimSection, ParallelConfig
from megatron_longpo.models.hf_config import ModelArch

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.transformer import TransformerConfig

    from megatron_longpo.models.build import ModelOptions

# config spelling -> torch dtype name (optim.grad_dtype, exp_avg_dtype, exp_avg_sq_dtype)
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class MegatronConfigs:
    """What megatron-core is given for one training run. The TransformerConfig stays megatron's
    mutable object: the engine sets on it the hooks that need the built objects
    (finalize_model_grads_func, grad_scale_func, no_sync_func)."""

    transformer: TransformerConfig
    ddp: DistributedDataParallelConfig
    optimizer: OptimizerConfig


def precision_aware(optim: OptimSection) -> bool:
    """optim.precision_aware, with None resolved: on with optim.cpu_offload (Adam), so that the
    distributed optimizer keeps no fp32 copy of the parameters on the GPU (the CPU holds it)."""
    if optim.precision_aware is None:
        return bool(optim.cpu_offload) and optim.name == "adam"
    return bool(optim.precision_aware)


def _activation_offload(n: int) -> dict[str, Any]:
    """TransformerConfig keys of model.activation_offload_layers (TE's CPU offloading of n layers' activations)."""
    if not n:
        return {}
    return dict(cpu_offloading=True, cpu_offloading_num_layers=int(n), cpu_offloading_activations=True,
                cpu_offloading_weights=False)


def transformer_config(arch: ModelArch, par: ParallelConfig, opts: ModelOptions, *, cuda: bool,
                       per_token_loss: bool = False) -> TransformerConfig:
    """Megatron's TransformerConfig for `arch` at layout `par`, built as `opts` says (bf16,
    recompute, activation offloading). cuda=False: parameters are initialised on the CPU.
    per_token_loss: the schedule does not divide the loss, finalize_model_grads divides the
    gradients by the global sample count (training; training/engine.py's docstring)."""
    import torch
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    dtype = torch.bfloat16 if opts.bf16 else torch.float32
    kw: dict[str, Any] = dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=par.tensor_parallel,
        pipeline_model_parallel_size=par.pipeline_parallel,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_parallel,
        context_parallel_size=par.context_parallel,
        sequence_parallel=par.sequence_parallel,
        bf16=opts.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        use_cpu_initialization=not cuda,
        masked_softmax_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
        variable_seq_lengths=True,  # pipeline p2p sends shapes: packed batches vary in length
        moe_token_dispatcher_type="alltoall",  # (only to satisfy a check tied to variable_seq_lengths)
        calculate_per_token_loss=per_token_loss,
    )
    if opts.recompute == "auto":
        raise ValueError("model.recompute=auto is chosen by the memory plan (training/memory_check.check_run) before the "
                         "model is built; build with the chosen recompute")
    if opts.recompute:
        kw.update(recompute_granularity=opts.recompute)
        if opts.recompute == "full":
            # uniform: chunks of recompute_num_layers layers keep their input; block: only the first
            # recompute_num_layers layers of each stage are recomputed, the others keep their activations
            kw.update(recompute_method=opts.recompute_method, recompute_num_layers=opts.recompute_num_layers)
        elif opts.recompute_modules:  # selective: these modules of every layer keep their input only
            if "layernorm" in opts.recompute_modules and not opts.resolved_use_te():
                raise ValueError("model.recompute_modules=layernorm needs the Transformer Engine spec (megatron-core "
                                 "0.19's norm checkpoint reads TE's FP8 state); use model.recompute_modules=mlp here")
            kw.update(recompute_modules=list(opts.recompute_modules))
    kw.update(_activation_offload(opts.activation_offload_layers))
    return TransformerConfig(**kw)


def megatron_configs(arch: ModelArch, par: ParallelConfig, opts: ModelOptions, optim: OptimSection, *,
                     cuda: bool) -> MegatronConfigs:
    """The TransformerConfig, DistributedDataParallelConfig and OptimizerConfig of a training run.
    cuda=False (the CPU): no distributed optimizer and no gradient clipping (megatron's need CUDA
    tensors; the engine says so), parameters initialised on the CPU."""
    import torch
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig

    dist_opt = bool(optim.distributed_optimizer) and cuda
    ddp = DistributedDataParallelConfig(
        grad_reduce_in_fp32=optim.grad_dtype == "fp32", overlap_grad_reduce=optim.overlap_grad_reduce,
        use_distributed_optimizer=dist_opt, average_in_collective=False,
    )
    pa = precision_aware(optim)
    dtypes = dict(main_grads_dtype=getattr(torch, DTYPES[optim.grad_dtype]),
                  exp_avg_dtype=getattr(torch, DTYPES[optim.exp_avg_dtype]),
                  exp_avg_sq_dtype=getattr(torch, DTYPES[optim.exp_avg_sq_dtype])) if pa else {}
    optimizer = OptimizerConfig(
        optimizer=optim.name, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        bf16=opts.bf16, params_dtype=torch.bfloat16 if opts.bf16 else torch.float32,
        clip_grad=optim.clip_grad if cuda else 0.0, use_distributed_optimizer=dist_opt,
        optimizer_cpu_offload=bool(optim.cpu_offload),
        optimizer_offload_fraction=float(optim.offload_fraction) if optim.cpu_offload else 0.0,
        overlap_cpu_optimizer_d2h_h2d=bool(optim.offload_overlap), use_precision_aware_optimizer=pa, **dtypes,
    )
    return MegatronConfigs(transformer_config(arch, par, opts, cuda=cuda, per_token_loss=True), ddp, optimizer)
