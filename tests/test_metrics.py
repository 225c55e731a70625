"""Model-FLOP accounting (training/metrics.py) against hand-computed numbers."""

from types import SimpleNamespace

import pytest

from megatron_longpo.training import metrics as M

ARCH = SimpleNamespace(hidden_size=4, ffn_hidden_size=8, num_layers=1, head_dim=2, num_attention_heads=2,
                       num_query_groups=1, vocab_size=10)


def test_flops_per_token_by_hand():
    # qkv 2*4*(2+2)*2 = 64, proj 2*2*2*4 = 32, mlp 2*3*4*8 = 192, attention at length 10: 2*2*2*2*10/2 = 80,
    # output layer 2*4*10 = 80; forward + backward = 3x
    assert M.model_flops_per_token(ARCH, 10) == 3 * (64 + 32 + 192 + 80 + 80)
    assert M.model_flops_per_token(ARCH, 10, logits=False) == 3 * (64 + 32 + 192 + 80)


def test_output_layer_counted_on_the_scored_tokens_only_when_given():
    body, head = 3 * (64 + 32 + 192 + 80), 3 * 80
    assert M.batch_model_flops(ARCH, [10]) == 10 * (body + head)
    assert M.batch_model_flops(ARCH, [(10, 10.0)], scored_tokens=3) == 10 * body + 3 * head
    # a branch of 4 tokens with the attention span of a length-10 sequence, next to a trunk of 10
    assert M.batch_model_flops(ARCH, [(10, 10.0), (4, 10.0)], scored_tokens=0) == pytest.approx(14 * body)


def test_trunk_that_skips_the_last_layers_attention():
    # 1 layer: a trunk token skipping the last layer's attention does no attention at all (80 fewer)
    body = 3 * (64 + 32 + 192 + 80)
    assert M.batch_model_flops(ARCH, [(10, 10.0, True), (4, 10.0)], scored_tokens=0) == 10 * (body - 3 * 80) + 4 * body
    two = SimpleNamespace(**{**vars(ARCH), "num_layers": 2})
    assert M.model_flops_per_token(two, 10, logits=False, attention_layers=1) == 3 * (2 * (64 + 32 + 192) + 80)


def test_flops_spans_of_a_shared_row_mark_unscored_trunks(tiny_longpo_data):
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.prefix_sharing import build_shared_row, flops_spans

    ds = PairDataset(tiny_longpo_data)
    row = build_shared_row([ds.sample(0), ds.sample(1)], ("chosen", "rejected"))
    spans = flops_spans(row)
    trunks = len(row.cu) - 1
    assert [s[2] for s in spans[:trunks]] == [True] * trunks  # pairs: no scored trunk token
    assert not any(s[2] for s in flops_spans(row, last_layer_trunk=True))
    assert sum(s[0] for s in spans) == row.real_tokens


def test_the_step_line_shows_the_reserved_peak_beside_the_allocated_one():
    """The card holds what the allocator reserves (measured: 24.8 GiB allocated, 50.8 GiB on the card),
    so the step line and the scalars carry both."""
    r = M.StepRecord(3, {"loss": 0.5}, 1e-5, 1.0, 2.0, 4000, 1e12, 24.84, reserved_mem_gib=50.12)
    assert r.line(10, 1, None).endswith("| mem 24.8 GiB (reserved 50.1)")
    assert r.scalars(1)["train/memory/reserved_peak_gib"] == 50.12 and r.scalars(1)["train/memory/peak_gib"] == 24.84
    cpu = M.StepRecord(3, {"loss": 0.5}, 1e-5, 1.0, 2.0, 4000, 1e12, 0.0)
    assert "mem" not in cpu.line(10, 1, None) and "train/memory/reserved_peak_gib" not in cpu.scalars(1)
