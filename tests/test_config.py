from pathlib import Path

import pytest

from megatron_longpo.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("recipe", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_example_recipes_parse(recipe):
    cfg = load_config(str(recipe))
    assert cfg.model.checkpoint and cfg.data.path and cfg.loss.name
    if cfg.model.rope_theta:  # a context extension: the export must declare the trained length (vLLM reads it)
        assert cfg.model.max_position_embeddings, f"{recipe.name} sets model.rope_theta without model.max_position_embeddings"


def _round_recipes():
    """Every round's training recipe named by examples/longpo_iterative/experiment.yaml, its profiles' too."""
    import yaml

    spec = yaml.safe_load((ROOT / "examples/longpo_iterative/experiment.yaml").read_text())
    rounds = spec["rounds"] + [r for prof in spec.get("profiles", {}).values() for r in prof.get("rounds", [])]
    return sorted({ROOT / r["config"] for r in rounds})


@pytest.mark.parametrize("recipe", _round_recipes(), ids=lambda p: p.name)
def test_iterative_round_recipes_parse(recipe):
    # tools/experiment.py gives every round these keys on the command line
    cfg = load_config(str(recipe), ["model.checkpoint=ckpt", "data.path=data", "model.rope_theta=1e7",
                                    "model.max_position_embeddings=131072", "train.save_dir=runs/x"])
    assert cfg.loss.name == "longpo" and cfg.model.max_position_embeddings == 131072


def test_overrides_are_typed():
    c = load_config(None, ["optim.lr=1e-6", "parallel.tensor_parallel=2", "loss.name=solo-dpo", "model.rope_theta=1e6",
                           "data.reference=null", "model.bf16=false"])
    assert (c.optim.lr, c.parallel.tensor_parallel, c.loss.name, c.model.rope_theta, c.data.reference, c.model.bf16) == \
        (1e-6, 2, "solo-dpo", 1e6, None, False)


@pytest.mark.parametrize("override, msg", [
    ("optim.lrr=1", "unknown config key optim.lrr"),
    ("parallel.tensor_parallel=1.5", "parallel.tensor_parallel must be an integer"),
    ("loss.name=foo", "unknown loss name 'foo'"),
    ("model.bf16=maybe", "model.bf16 must be true or false"),
    ("optim.name=lion", "optim.name must be adam or sgd"),
    ("nosection", "must look like section.key=value"),
])
def test_bad_config_names_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_prefix_sharing_refuses_sequence_parallel():
    with pytest.raises(ConfigError, match="data.share_prefix=true does not support parallel.sequence_parallel"):
        # TP=2: sequence parallelism needs it (ParallelConfig refuses SP at TP=1 first, a rule of its own)
        load_config(None, ["data.share_prefix=true", "parallel.sequence_parallel=true", "parallel.tensor_parallel=2"])
    assert load_config(None, ["data.share_prefix=true"]).data.share_prefix


def test_missing_recipe_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent.yaml")


def test_run_overrides_reach_the_recorded_architecture():
    """model.rope_theta and model.max_position_embeddings change the architecture the checkpoints
    record (and the export writes); model.transformer_engine parses as an optional bool."""
    from megatron_longpo.models.hf_config import arch_from_hf_config
    from megatron_longpo.training.engine import policy_arch

    arch = arch_from_hf_config(dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=8192, rope_theta=10000.0))
    c = load_config(None, ["model.rope_theta=1e6", "model.max_position_embeddings=16384", "model.transformer_engine=false"])
    got = policy_arch(arch, c.model)
    assert (got.rope_theta, got.max_position_embeddings, c.model.transformer_engine) == (1e6, 16384, False)
    assert policy_arch(arch, load_config(None, []).model) == arch
    assert load_config(None, []).model.transformer_engine is None


@pytest.mark.parametrize("override, msg", [
    ("train.steps=0", "train.steps must be >= 1 (leave it unset, or null, for train.epochs epochs), got 0"),
    ("train.steps=-3", "train.steps must be >= 1"),
    ("train.epochs=0", "train.epochs must be > 0"),
    ("train.log_interval=0", "train.log_interval must be > 0"),
    ("train.keep_last=-1", "train.keep_last must be >= 0"),
    ("train.exit_after=0", "train.exit_after must be > 0"),
    ("train.max_nonfinite_in_a_row=0", "train.max_nonfinite_in_a_row must be > 0"),
    ("train.stall_seconds=-1", "train.stall_seconds must be >= 0"),
    ("data.global_batch_size=0", "data.global_batch_size must be > 0"),
    ("data.samples_per_microbatch=-1", "data.samples_per_microbatch must be > 0"),
    ("data.max_tokens=0", "data.max_tokens must be > 0"),
    ("optim.lr=0", "optim.lr must be > 0 (a learning rate of 0 trains nothing)"),
    ("optim.lr=-1e-6", "optim.lr must be > 0"),
    ("optim.lr=.nan", "optim.lr must be > 0"),
    ("optim.warmup_fraction=1.5", "optim.warmup_fraction must be in [0, 1]"),
    ("optim.adam_beta2=1.0", "optim.adam_beta2 must be in [0, 1)"),
    ("optim.adam_eps=0", "optim.adam_eps must be > 0"),
    ("optim.clip_grad=-1", "optim.clip_grad must be >= 0"),
    ("optim.min_lr=1", "optim.min_lr (1) must not exceed optim.lr"),
    ("model.logprob_chunk_size=0", "model.logprob_chunk_size must be > 0"),
    ("model.rope_theta=0", "model.rope_theta must be > 0"),
    ("model.recompute=partial", "model.recompute must be null, full, selective or auto, got 'partial'"),
    ("model.recompute_method=chunked", "model.recompute_method must be uniform or block, got 'chunked'"),
    ("parallel.tensor_parallel=0", "parallel.tensor_parallel must be > 0"),
    ("parallel.context_parallel=-2", "parallel.context_parallel must be > 0"),
])
def test_counts_and_sizes_that_make_no_sense_are_refused_by_name(override, msg):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert msg in str(e.value) and str(e.value).count(override.split("=")[0]) == 1, str(e.value)


def test_recompute_auto_needs_the_plan_and_no_activation_offload():
    """model.recompute=auto is the memory plan's choice: refused, in one line naming the keys, where
    the plan is off or megatron-core could not combine the choice with activation offloading."""
    cfg = load_config(None, ["model.recompute=auto", "model.recompute_method=block"])
    assert (cfg.model.recompute, cfg.model.recompute_method) == ("auto", "block")
    assert load_config(None, []).model.recompute_method == "uniform"
    for keys, msg in ((["model.recompute=auto", "train.memory_check=off"], "model.recompute=auto is chosen by the memory "
                       "plan, which train.memory_check=off turns off"),
                      (["model.recompute=auto", "model.activation_offload_layers=2"], "model.recompute=auto cannot be "
                       "combined with model.activation_offload_layers=2")):
        with pytest.raises(ConfigError) as e:
            load_config(None, keys)
        assert msg in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_unset_steps_still_means_epochs():
    assert load_config(None, []).train.steps is None and load_config(None, ["train.steps=null"]).train.steps is None
    assert load_config(None, ["train.steps=5", "train.keep_last=0", "train.save_interval=0"]).train.steps == 5


def test_longpo_lambda_zero_is_the_nll_alone_and_negative_is_refused():
    """loss.longpo_lambda=0: LongPO's whole-sequence NLL alone (the experiment's longpo_lam0 baseline)."""
    assert load_config(None, ["loss.name=longpo", "loss.longpo_lambda=0"]).loss.longpo_lambda == 0
    with pytest.raises(ConfigError, match="longpo_lambda must be >= 0"):
        load_config(None, ["loss.name=longpo", "loss.longpo_lambda=-0.01"])
