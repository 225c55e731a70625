"""Deterministic shuffling, the DP union property, exact resumption, clear errors."""

import itertools

import numpy as np
import pytest

from megatron_longpo.data.sampler import PairSampler


def take(sampler, n):
    return [sampler.next_micro_batch() for _ in range(n)]


def test_deterministic_by_seed_and_epoch():
    a, b = PairSampler(50, 8, 2, seed=7), PairSampler(50, 8, 2, seed=7)
    assert take(a, 30) == take(b, 30)
    assert not np.array_equal(PairSampler(50, 8, seed=7).epoch_permutation(0), PairSampler(50, 8, seed=8).epoch_permutation(0))
    s = PairSampler(50, 8, seed=7)
    p0, p1 = s.epoch_permutation(0).copy(), s.epoch_permutation(1).copy()
    assert sorted(p0) == list(range(50)) and not np.array_equal(p0, p1)
    assert PairSampler(10, 5, shuffle=False).micro_batches(0, 1) == [[5], [6], [7], [8], [9]]


def test_epoch_covers_each_sample_at_most_once_and_wraps():
    s = PairSampler(50, 8, 2, seed=1)
    assert s.steps_per_epoch == 6 and len(s) == 24
    seen = [i for mb in take(s, len(s)) for i in mb]
    assert len(seen) == 48 == len(set(seen))  # 2 samples dropped with the incomplete batch
    assert (s.epoch, s.step, s.micro) == (1, 0, 0)
    assert list(itertools.chain(*take(s, 4))) == s.epoch_permutation(1)[:8].tolist()


@pytest.mark.parametrize("dp,mbs", [(2, 1), (2, 2), (4, 1), (4, 2), (8, 1)])
def test_dp_union_equals_single_rank(dp, mbs):
    n, g, seed = 100, 16, 3
    single = PairSampler(n, g, 1, dp_size=1, seed=seed)
    ranks = [PairSampler(n, g, mbs, dp_size=dp, dp_rank=r, seed=seed) for r in range(dp)]
    for step in range(6):  # crosses an epoch boundary (6 steps per epoch)
        whole = single.next_global_batch()
        assert len(whole) == g
        parts = [r.next_global_batch() for r in ranks]
        assert all(len(p) == g // (mbs * dp) and all(len(mb) == mbs for mb in p) for p in parts)
        union = [i for p in parts for mb in p for i in mb]
        assert sorted(union) == sorted(i for mb in whole for i in mb)
        # rank order then micro-batch order is the single rank's order
        assert union == [i for mb in whole for i in mb]


def test_state_restores_exact_next_sample():
    s = PairSampler(37, 12, 2, dp_size=2, dp_rank=1, seed=5)
    take(s, 7)  # mid global batch (3 micro-batches per step)
    state = s.state_dict()
    expected = take(s, 20)
    t = PairSampler(37, 12, 2, dp_size=2, dp_rank=1, seed=5)
    t.load_state_dict(state)
    assert take(t, 20) == expected
    assert t.consumed_samples == s.consumed_samples


def test_resume_at_step_boundary_with_other_dp_size():
    s = PairSampler(64, 16, 2, dp_size=2, dp_rank=0, seed=9)
    s.next_global_batch()
    s.next_global_batch()
    state = s.state_dict()
    union_after = sorted(i for r in range(4) for mb in _rank(state, 4, r).next_global_batch() for i in mb)
    assert union_after == sorted(PairSampler(64, 16, seed=9).global_batch(0, 2).tolist())
    mid = PairSampler(64, 16, 2, dp_size=2, seed=9)
    mid.next_micro_batch()
    with pytest.raises(ValueError, match="middle of a global batch"):
        PairSampler(64, 16, 1, dp_size=4, seed=9).load_state_dict(mid.state_dict())
    with pytest.raises(ValueError, match="seed"):
        PairSampler(64, 16, 2, dp_size=2, seed=10).load_state_dict(state)


def _rank(state, dp, r):
    s = PairSampler(64, 16, 1, dp_size=dp, dp_rank=r, seed=9)
    s.load_state_dict(state)
    return s


def test_clear_errors():
    with pytest.raises(ValueError, match=r"global batch 10 is not divisible by micro_batch_size 2 x data-parallel size 4 = 8"):
        PairSampler(100, 10, 2, dp_size=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairSampler(5, 8)
    with pytest.raises(ValueError, match="dp_rank"):
        PairSampler(100, 8, dp_size=2, dp_rank=2)
