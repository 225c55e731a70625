import pytest

from megatron_longpo.models.hf_config import ModelArch, UnsupportedModelError, arch_from_hf_config, to_hf_config
from megatron_longpo.parallel import LayoutError, ParallelConfig, validate_layout

LLAMA = dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
             rope_theta=500000.0, tie_word_embeddings=False)


def test_llama_fields():
    a = arch_from_hf_config(LLAMA)
    assert (a.num_query_groups, a.head_dim, a.rope_theta, a.qkv_bias, a.padded_vocab_size) == (8, 128, 500000.0, False, 32000)


def test_qwen2_has_qkv_bias_and_pads_vocab():
    a = arch_from_hf_config({**LLAMA, "model_type": "qwen2", "vocab_size": 152064 + 1, "use_sliding_window": False, "sliding_window": 4096})
    assert a.qkv_bias and a.sliding_window is None
    assert a.padded_vocab_size % 128 == 0 and a.padded_vocab_size - a.vocab_size < 128


def test_transformers5_rope_parameters_and_llama3_scaling():
    cfg = {**LLAMA, "rope_parameters": {"rope_theta": 5e5, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
    cfg.pop("rope_theta")
    a = arch_from_hf_config(cfg)
    assert (a.rope_theta, a.rope_scaling_type, a.rope_scaling_factor) == (5e5, "llama3", 8.0)


@pytest.mark.parametrize("bad, msg", [
    ({"model_type": "gpt2"}, "supported: llama, mistral, qwen2"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling type 'yarn'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
])
def test_unsupported_is_refused_by_name(bad, msg):
    with pytest.raises(UnsupportedModelError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        arch_from_hf_config({**LLAMA, **bad})


def test_mistral_sliding_window_refused_only_when_it_matters():
    a = arch_from_hf_config({**LLAMA, "model_type": "mistral", "sliding_window": 4096})
    a.check_sequence_length(4096)
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        a.check_sequence_length(8192)
    arch_from_hf_config({**LLAMA, "model_type": "mistral", "sliding_window": None}).check_sequence_length(131072)


def test_hf_config_round_trip_keeps_trained_rope_base():
    a = arch_from_hf_config(LLAMA).with_rope_theta(1e7)
    b = arch_from_hf_config(to_hf_config(a, base=LLAMA))
    assert b == a and ModelArch.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("par, world, msg", [
    (ParallelConfig(tensor_parallel=3), 3, "32 attention heads are not divisible by TP=3"),
    (ParallelConfig(tensor_parallel=2, pipeline_parallel=2), 6, "world size 6 is not divisible by TP\\*PP\\*CP"),
    (ParallelConfig(pipeline_parallel=2, virtual_pipeline_parallel=3), 2, "32 layers are not divisible by PP\\*VPP = 6"),
    (ParallelConfig(tensor_parallel=16), 16, "8 KV heads"),
])
def test_layout_errors_name_the_numbers(par, world, msg):
    with pytest.raises(LayoutError, match=msg):
        validate_layout(par, world, arch_from_hf_config(LLAMA))


def test_layout_dp_and_pad_multiple():
    assert validate_layout(ParallelConfig(tensor_parallel=2), 8, arch_from_hf_config(LLAMA)) == 4
    assert ParallelConfig(tensor_parallel=2, context_parallel=2, sequence_parallel=True).pad_multiple() == 8
    with pytest.raises(LayoutError, match="sequence_parallel needs tensor_parallel > 1"):
        ParallelConfig(sequence_parallel=True)
