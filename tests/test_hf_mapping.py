"""Hugging Face <-> Megatron name/shape mapping, pure (no model): bit-exact round trips."""
import pytest
import torch

from megatron_longpo.checkpoint.hf import CheckpointMismatchError, hf_names, hf_to_megatron, megatron_to_hf
from megatron_longpo.models.hf_config import arch_from_hf_config

BASE = dict(vocab_size=1000, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)


def random_hf_state(arch, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, H, F = arch.head_dim, arch.hidden_size, arch.ffn_hidden_size
    shapes = {"q_proj.weight": (arch.num_attention_heads * d, H), "k_proj.weight": (arch.num_query_groups * d, H),
              "v_proj.weight": (arch.num_query_groups * d, H), "o_proj.weight": (H, arch.num_attention_heads * d),
              "q_proj.bias": (arch.num_attention_heads * d,), "k_proj.bias": (arch.num_query_groups * d,),
              "v_proj.bias": (arch.num_query_groups * d,), "gate_proj.weight": (F, H), "up_proj.weight": (F, H),
              "down_proj.weight": (H, F), "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,),
              "model.norm.weight": (H,), "model.embed_tokens.weight": (arch.vocab_size, H), "lm_head.weight": (arch.vocab_size, H)}
    state = {}
    for n in hf_names(arch):
        key = next(k for k in shapes if n.endswith(k))
        state[n] = torch.randn(shapes[key], generator=g)
    return state


@pytest.mark.parametrize("model_type, tied, groups", [("llama", False, 2), ("mistral", False, 1), ("qwen2", True, 3), ("qwen2", False, 6)])
def test_round_trip_is_bit_exact(model_type, tied, groups):
    arch = arch_from_hf_config({**BASE, "model_type": model_type, "tie_word_embeddings": tied, "num_key_value_heads": groups})
    hf = random_hf_state(arch)
    mcore = dict(hf_to_megatron(arch, hf.__getitem__))
    assert mcore["embedding.word_embeddings.weight"].shape[0] == arch.padded_vocab_size == 1024
    assert ("output_layer.weight" in mcore) == (not tied)
    back = dict(megatron_to_hf(arch, mcore.__getitem__))
    assert back.keys() == hf.keys()
    for k in hf:
        assert torch.equal(back[k], hf[k]), k


def test_qkv_layout_groups_queries_with_their_kv_head():
    arch = arch_from_hf_config({**BASE, "model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 8})
    d = arch.head_dim  # 2
    hf = random_hf_state(arch)
    p = "model.layers.0.self_attn."
    qkv = dict(hf_to_megatron(arch, hf.__getitem__))["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k, v = hf[p + "q_proj.weight"], hf[p + "k_proj.weight"], hf[p + "v_proj.weight"]
    # group 0 = query heads 0,1 then k head 0 then v head 0
    assert torch.equal(qkv[: 2 * d], q[: 2 * d]) and torch.equal(qkv[2 * d: 3 * d], k[:d]) and torch.equal(qkv[3 * d: 4 * d], v[:d])
    assert torch.equal(qkv[4 * d: 6 * d], q[2 * d:]) and torch.equal(qkv[6 * d: 7 * d], k[d:])


def test_wrong_shape_missing_tensor_and_corrupt_file_are_named(tmp_path):
    from safetensors.torch import save_file

    from megatron_longpo.checkpoint.hf_files import HFWeights

    arch = arch_from_hf_config({**BASE, "model_type": "llama"})
    hf = random_hf_state(arch)
    hf["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError, match=r"model.layers.1.mlp.up_proj.weight has shape \(3, 3\)"):
        dict(hf_to_megatron(arch, hf.__getitem__))
    del hf["model.layers.1.mlp.up_proj.weight"]
    save_file(hf, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointMismatchError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        dict(hf_to_megatron(arch, HFWeights(tmp_path).get))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointMismatchError, match="corrupt"):
        w = HFWeights(tmp_path)
        dict(hf_to_megatron(arch, w.get))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        (tmp_path / "empty").mkdir()
        HFWeights(tmp_path / "empty")
