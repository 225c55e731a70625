"""Chunked vocab-parallel target log-probs and the context-parallel reduction, against float64
references; TP and CP over gloo processes."""
import pytest
import torch

from megatron_longpo.data.cp_split import zigzag_cp_indices
from megatron_longpo.logprobs import naive_target_logprobs, sequence_sums, target_logprobs
from mp import torchrun


def _inputs(s=13, b=2, h=8, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, s), generator=g)
    return hidden, weight, labels


@pytest.mark.parametrize("chunk", [1, 4, 13, 100])
def test_chunked_equals_full_logits_forward_and_backward(chunk):
    hidden, weight, labels = _inputs()
    gout = torch.randn(labels.shape, dtype=torch.float64)
    ref = naive_target_logprobs(hidden, weight, labels)
    gh, gw = torch.autograd.grad((ref.double() * gout).sum(), (hidden, weight))
    ours = target_logprobs(hidden, weight, labels, chunk_size=chunk)
    oh, ow = torch.autograd.grad((ours.double() * gout).sum(), (hidden, weight))
    # the module computes in fp32 (as on the GPU): compare at fp32 precision
    assert torch.allclose(ours.double(), ref.double(), atol=1e-5)
    assert torch.allclose(oh, gh, atol=1e-5) and torch.allclose(ow, gw, atol=1e-5)


def test_logprobs_are_log_softmax_gather_exactly_in_float64():
    hidden, weight, labels = _inputs(s=5, b=1, h=4, v=7)
    logits = (hidden.detach() @ weight.detach().t())  # [s, b, v]
    for t in range(5):
        row = logits[t, 0]
        expected = row[labels[0, t]] - torch.logsumexp(row, 0)
        got = target_logprobs(hidden, weight, labels, chunk_size=2)[0, t]
        assert abs(got.item() - expected.item()) < 1e-5


def test_sequence_sums_match_a_python_loop():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(2, 10, generator=g)
    mask = torch.rand(2, 10, generator=g) > 0.3
    seq = torch.tensor([[0] * 4 + [1] * 4 + [-1] * 2, [2] * 7 + [3] * 3])
    sums, counts = sequence_sums(logp, mask, seq, 4)
    for i in range(4):
        sel = (seq == i) & mask
        assert torch.isclose(sums[i], logp[sel].double().sum()) and counts[i] == sel.sum()


def test_zigzag_indices_cover_every_position_once():
    parts = [zigzag_cp_indices(16, 2, r) for r in range(2)]
    assert parts[0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15] and parts[1].tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(torch.cat([zigzag_cp_indices(24, 3, r) for r in range(3)]).tolist()) == list(range(24))
    with pytest.raises(ValueError, match="not a multiple of 2\\*CP = 4"):
        zigzag_cp_indices(10, 2, 0)


def test_chunk_size_must_be_positive():
    hidden, weight, labels = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        target_logprobs(hidden, weight, labels, chunk_size=0)


@pytest.mark.slow
def test_vocab_parallel_tp2_and_cp2_reduction(tmp_path):
    """Two gloo ranks: (1) TP=2 vocabulary shards give the unsharded log-probs and gradients;
    (2) zig-zag CP halves of each sequence, reduced with the autograd-aware all-reduce and the
    training step's loss scaling, give the unsplit sequence's loss and token gradients."""
    out = torchrun(2, "logprobs_parallel.py", tmp_path, timeout=240)
    assert "TP2 OK" in out and "CP2 OK" in out, out[-3000:]


def test_keep_computes_only_the_kept_positions_with_the_same_values_and_gradients():
    torch.manual_seed(3)
    s, b, h, v = 11, 2, 8, 13
    hidden = torch.randn(s, b, h, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (b, s))
    keep = torch.rand(b, s) > 0.6
    keep[0, 0] = True
    full = target_logprobs(hidden, weight, labels, chunk_size=3)
    part = target_logprobs(hidden, weight, labels, chunk_size=3, keep=keep.float())
    torch.testing.assert_close(part[keep], full[keep], rtol=1e-12, atol=1e-12)
    assert (part[~keep] == 0).all()
    w = torch.randn(b, s, dtype=torch.float64)
    gf = torch.autograd.grad((full * w * keep).sum(), (hidden, weight))
    gp = torch.autograd.grad((part * w).sum(), (hidden, weight))
    for a, c in zip(gp, gf):  # the weight gradient accumulates in fp32 over chunks (other boundaries here)
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-6)
    # nothing kept: zeros, and still differentiable
    none = target_logprobs(hidden, weight, labels, chunk_size=3, keep=torch.zeros(b, s))
    assert none.abs().sum() == 0 and none.requires_grad
