"""The one translation (models/megatron_config.py): a run's configuration keys, the architecture
and the layout -> the fields of megatron-core's TransformerConfig, DistributedDataParallelConfig
and OptimizerConfig. Nothing is built (no process group, no model): the config objects only."""
import torch
import torch.nn.functional as F

from megatron_longpo.config import load_config
from megatron_longpo.models.hf_config import arch_from_hf_config
from megatron_longpo.models.megatron_config import MegatronConfigs, megatron_configs, transformer_config

QWEN2 = dict(model_type="qwen2", hidden_size=256, num_attention_heads=8, num_key_value_heads=2, intermediate_size=704,
             vocab_size=1000, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True, hidden_act="silu",
             num_hidden_layers=4, max_position_embeddings=4096)

KEYS = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "model.recompute=full",
        "model.recompute_num_layers=2", "model.bf16=true", "optim.distributed_optimizer=true", "optim.lr=3e-6",
        "optim.min_lr=3e-7", "optim.weight_decay=0.01", "optim.clip_grad=0.5", "optim.adam_beta2=0.98",
        "optim.adam_eps=1e-6", "optim.overlap_grad_reduce=true"]


def _configs(keys, cuda: bool) -> MegatronConfigs:
    """What the trainer hands megatron-core for these config keys (engine.model_options: the keys ->
    ModelOptions; with cuda=True the run's bf16 is as asked, whatever this machine has)."""
    from megatron_longpo.models.build import ModelOptions

    cfg = load_config(None, keys)
    m = cfg.model
    opts = ModelOptions(bf16=m.bf16 and cuda, recompute=m.recompute, recompute_method=m.recompute_method,
                        recompute_num_layers=m.recompute_num_layers,
                        activation_offload_layers=m.activation_offload_layers)
    return megatron_configs(arch_from_hf_config(QWEN2), cfg.parallel, opts, cfg.optim, cuda=cuda)


def test_a_tp2_sequence_parallel_bf16_run_on_gpus():
    c = _configs(KEYS, cuda=True)
    t = c.transformer
    # the architecture
    assert (t.num_layers, t.hidden_size, t.ffn_hidden_size, t.num_attention_heads, t.num_query_groups, t.kv_channels) == (
        4, 256, 704, 8, 2, 32)
    assert (t.normalization, t.layernorm_epsilon, t.gated_linear_unit, t.activation_func) == ("RMSNorm", 1e-6, True, F.silu)
    assert (t.add_bias_linear, t.add_qkv_bias, t.rotary_interleaved) == (False, True, False)  # Qwen2: q/k/v bias only
    assert (t.hidden_dropout, t.attention_dropout) == (0.0, 0.0)
    # the layout
    assert (t.tensor_model_parallel_size, t.pipeline_model_parallel_size, t.context_parallel_size) == (2, 1, 1)
    assert t.sequence_parallel is True and t.virtual_pipeline_model_parallel_size is None
    # precision, recompute, what the training step relies on
    assert t.bf16 is True and t.params_dtype == torch.bfloat16 and t.pipeline_dtype == torch.bfloat16
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "uniform", 2)
    assert t.calculate_per_token_loss is True  # the loss is a sum; gradients are divided by the global sample count
    assert t.variable_seq_lengths is True and t.use_cpu_initialization is False
    assert not (t.masked_softmax_fusion or t.bias_activation_fusion or t.apply_rope_fusion or t.gradient_accumulation_fusion)
    assert t.cpu_offloading is False

    d = c.ddp
    assert (d.use_distributed_optimizer, d.overlap_grad_reduce, d.grad_reduce_in_fp32, d.average_in_collective) == (
        True, True, True, False)

    o = c.optimizer
    assert (o.optimizer, o.lr, o.min_lr, o.weight_decay, o.clip_grad) == ("adam", 3e-6, 3e-7, 0.01, 0.5)
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps) == (0.9, 0.98, 1e-6)
    assert o.bf16 is True and o.params_dtype == torch.bfloat16 and o.use_distributed_optimizer is True
    assert not o.optimizer_cpu_offload and o.optimizer_offload_fraction == 0.0 and not o.use_precision_aware_optimizer


def test_the_cpu_turns_off_what_needs_cuda_tensors():
    """The same keys on the CPU: fp32, no distributed optimizer, no clipping, CPU initialisation."""
    c = _configs(["model.bf16=true", "optim.distributed_optimizer=true", "optim.clip_grad=1.0"], cuda=False)
    assert c.transformer.bf16 is False and c.transformer.params_dtype == torch.float32
    assert c.transformer.use_cpu_initialization is True
    assert c.ddp.use_distributed_optimizer is False and c.optimizer.use_distributed_optimizer is False
    assert c.optimizer.clip_grad == 0.0 and c.optimizer.params_dtype == torch.float32
    assert c.transformer.recompute_granularity is None and c.ddp.overlap_grad_reduce is False


def test_layouts_and_memory_keys():
    c = _configs(["parallel.pipeline_parallel=2", "parallel.virtual_pipeline_parallel=2", "parallel.context_parallel=2",
                  "model.recompute=selective"], cuda=True)
    t = c.transformer
    assert (t.pipeline_model_parallel_size, t.virtual_pipeline_model_parallel_size, t.context_parallel_size) == (2, 2, 2)
    assert t.recompute_granularity == "selective" and t.recompute_method is None

    # block recompute: only the first recompute_num_layers layers of each stage are recomputed
    t = _configs(["model.recompute=full", "model.recompute_method=block", "model.recompute_num_layers=2"], cuda=True).transformer
    assert (t.recompute_granularity, t.recompute_method, t.recompute_num_layers) == ("full", "block", 2)

    # (precision-aware without cpu_offload needs TE's FusedAdam, which megatron-core looks for here: not on this machine)
    c = _configs(["model.activation_offload_layers=3", "optim.cpu_offload=true", "optim.offload_fraction=0.5",
                  "optim.offload_overlap=true", "optim.grad_dtype=bf16"], cuda=True)
    t = c.transformer
    assert (t.cpu_offloading, t.cpu_offloading_num_layers, t.cpu_offloading_activations, t.cpu_offloading_weights) == (
        True, 3, True, False)
    assert c.ddp.grad_reduce_in_fp32 is False
    o = c.optimizer
    assert o.optimizer_cpu_offload and o.optimizer_offload_fraction == 0.5 and o.overlap_cpu_optimizer_d2h_h2d
    assert o.use_precision_aware_optimizer  # optim.precision_aware=None: on with cpu_offload
    assert (o.main_grads_dtype, o.exp_avg_dtype, o.exp_avg_sq_dtype) == (torch.bfloat16, torch.float32, torch.float32)


def test_a_model_only_config_is_the_training_one_less_the_loss_convention():
    """Conversion, resharding and reference scoring build with transformer_config: the same fields,
    the schedule's default loss averaging."""
    from megatron_longpo.models.build import ModelOptions

    cfg = load_config(None, KEYS)
    opts = ModelOptions(bf16=True, recompute="full", recompute_num_layers=2)
    arch = arch_from_hf_config(QWEN2)
    plain = transformer_config(arch, cfg.parallel, opts, cuda=True)
    trained = megatron_configs(arch, cfg.parallel, opts, cfg.optim, cuda=True).transformer
    assert plain.calculate_per_token_loss is False

    def fields(t):  # (megatron makes its init methods per config: partials of the same function, compared by repr)
        return {k: repr(v) for k, v in vars(t).items() if k != "calculate_per_token_loss"}

    assert fields(plain) == fields(trained)

