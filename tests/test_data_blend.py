"""Weighted blends of datasets (data.path "0.3 A 0.7 B", data/blend.py): each dataset is drawn in
its weight's share, deterministically, resumably, the same at any DP size; a held-out evaluation
fraction never reaches training. In-process: two small pair datasets, no model."""
from types import SimpleNamespace

import numpy as np
import pytest

from megatron_longpo.config import DataSection
from megatron_longpo.data.blend import Blend, BlendError, greedy_assignment, parse_blend
from megatron_longpo.data.sampler import PairSampler
from megatron_longpo.training.batch import DataConfigError
from megatron_longpo.training.data import StepData


def test_parse_blend():
    assert parse_blend("data/a") == [(1.0, "data/a")]
    assert parse_blend("3 A 7 B") == [(0.3, "A"), (0.7, "B")]
    for bad in ("0.3 A 0.7", "A 0.3 B 0.7", "0 A 1 B", "0.5 A 0.5 A", ""):
        with pytest.raises(BlendError):
            parse_blend(bad)


def test_greedy_shares_are_within_one_sample_at_every_prefix():
    w = np.array([0.2, 0.5, 0.3])
    d = greedy_assignment(w, 1000)
    counts = np.cumsum(np.eye(3, dtype=int)[d], axis=0)
    expected = w[None, :] * np.arange(1, 1001)[:, None]
    assert np.abs(counts - expected).max() <= 1.0


def test_blend_draws_by_weight_over_many_steps_and_repeats_a_small_dataset():
    b = Blend([40, 400], [0.3, 0.7], seed=5)  # 132 draws of a 40-sample dataset: each sample 3-4 times
    assert len(b) == 440 and list(b.counts()) == [132, 308]
    epoch0 = [b.draw(i, 0) for i in range(len(b))]
    small = np.array([j for d, j in epoch0 if d == 0])
    assert set(small.tolist()) == set(range(40)) and np.bincount(small).min() >= 3
    big = [j for d, j in epoch0 if d == 1]
    assert len(set(big)) == 308  # subsampled: no repeat within one pass
    epoch1 = [j for d, j in (b.draw(i, 1) for i in range(len(b))) if d == 1]
    assert set(big) | set(epoch1) == set(range(400))  # the next blend epoch goes on with the pass
    smp = PairSampler(len(b), 8, seed=5)
    seen = np.array([b.dataset[i] for _ in range(500) for i in smp.next_global_batch()[0]])  # 500 steps, 4000 draws
    assert abs((seen == 0).mean() - 0.3) < 0.02
    again = Blend([40, 400], [0.3, 0.7], seed=5)
    assert [again.draw(i, 2) for i in range(len(b))] == [b.draw(i, 2) for i in range(len(b))]
    assert [Blend([40, 400], [0.3, 0.7], seed=6).draw(i) for i in range(len(b))] != epoch0


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, smollm2_dir):
    from megatron_longpo.data.preprocess import PreprocessConfig, run_preprocess
    from megatron_longpo.data.synthetic import write_jsonl
    from megatron_longpo.data.tokenizer import TokenizerSpec

    tmp = tmp_path_factory.mktemp("blend")
    out = []
    for name, n, seed in (("a", 12, 1), ("b", 20, 2)):
        src = write_jsonl(tmp / f"{name}.jsonl", "pair", n, seed=seed)
        res = run_preprocess(PreprocessConfig([str(src)], "pair", str(tmp / name), progress=False,
                                              tokenizer=TokenizerSpec(str(smollm2_dir), None, None, "spans")))
        assert res.written
        out.append(str(tmp / name))
    return out


def _data(path, dp_size=1, dp_rank=0, **kw):
    layout = SimpleNamespace(dp_size=dp_size, dp_rank=dp_rank, pad_multiple=1, cp_size=1, cp_rank=0, cp_group=None)
    dcfg = DataSection(path=path, global_batch_size=4, samples_per_microbatch=1, seed=3, **kw)
    return StepData(dcfg, roles=("chosen", "rejected"), ref_roles=(), layout=layout, thd=True, device="cpu")


def _draws(data, steps):
    out = []
    for _ in range(steps):
        epoch = data.sampler.epoch
        out.append([data.draw(i, epoch) for m in data.sampler.next_global_batch() for i in m])
    return out


def test_stepdata_blend_tokens_shares_resume_and_dp(two_datasets):
    a, b = two_datasets
    spec = f"0.25 {a} 0.75 {b}"
    data = _data(spec)
    assert len(data.blend) == 32 and "blend" in data.describe()
    # a batch holds exactly the draws' tokens, from the right dataset
    state0 = data.state_dict()
    batch = data.next_step()[0]
    data.load_state_dict(state0)
    (d, j), = _draws(data, 1)[0][:1]
    chosen = data.datasets[d].sample(j).sequences("chosen")[0].tokens
    assert batch.tokens.flatten()[:len(chosen)].tolist() == chosen.tolist()
    # shares over many steps: a full blend epoch is 8 of 32 draws from a (25%)
    data = _data(spec)
    run = _draws(data, 40)  # 5 blend epochs
    from_a = sum(d == 0 for step in run for d, _ in step)
    assert from_a == 40 * 4 // 4
    # resume at step 13 from the saved state: the same draws after it
    data = _data(spec)
    _draws(data, 13)
    state = data.state_dict()
    fresh = _data(spec)
    fresh.load_state_dict(state)
    assert _draws(fresh, 27) == run[13:]
    # DP=2: the two ranks' draws together are DP=1's, step by step
    r0, r1 = _data(spec, 2, 0), _data(spec, 2, 1)
    for want, x, y in zip(run[:10], _draws(r0, 10), _draws(r1, 10)):
        assert x + y == want


def test_eval_fraction_is_held_out_of_training(two_datasets):
    a, b = two_datasets
    data = _data(f"1 {a} 1 {b}", eval_fraction=0.25)  # 9 + 15 left to train on, 12 draws each per blend epoch
    held = set(data.eval.draws)
    assert len(held) == 3 + 5 and data.eval.num_samples == 8
    trained = {x for step in _draws(data, 30) for x in step}
    assert not trained & held and len(trained) == 32 - 8
    with pytest.raises(DataConfigError, match="fewer than one global batch"):
        _data(a, eval_fraction=0.1)  # 1 held-out sample < a global batch of 4
    with pytest.raises(DataConfigError, match="data.path"):
        _data(f"0.5 {a} 0.5")


def test_reference_sidecar_per_prefix(two_datasets, tmp_path):
    """Each prefix of a blend reads its own sidecar; a prefix without one is named."""
    import shutil

    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.reference import RefLogpWriter, sidecar_path

    a, b = two_datasets
    refs = ("ref_chosen", "ref_rejected")
    c = str(tmp_path / "c")  # a copy of b without a sidecar
    for ext in (".bin", ".idx", ".json"):
        shutil.copy(b + ext, c + ext)
    for d, prefix in enumerate((a, b)):
        w = RefLogpWriter.for_dataset(prefix, reference_model="fake", roles=refs, computation={})
        n = len(PairDataset(prefix))
        for k, role in enumerate(refs):
            w.add(list(range(n)), role, [-(1000.0 * d + 10.0 * j + k) for j in range(n)], [5 + d] * n)
        w.save(sidecar_path(prefix))
    layout = SimpleNamespace(dp_size=1, dp_rank=0, pad_multiple=1, cp_size=1, cp_rank=0, cp_group=None)
    dcfg = DataSection(path=f"0.5 {a} 0.5 {b}", global_batch_size=4, seed=3)
    data = StepData(dcfg, roles=("chosen", "rejected"), ref_roles=refs, layout=layout, thd=True, device="cpu")
    for _ in range(5):
        epoch = data.sampler.epoch
        draws = [data.draw(i, epoch) for m in data.sampler.micro_batches(epoch, data.sampler.step) for i in m]
        batches = data.next_step()
        for (d, j), mb in zip(draws, batches):
            assert mb.reference["ref_rejected"].logps.tolist() == [-(1000.0 * d + 10.0 * j + 1)]
            assert mb.reference["ref_chosen"].tokens.tolist() == [5 + d]
    with pytest.raises(DataConfigError, match=f"{c}.ref.safetensors does not exist.*--data {c} "):
        StepData(DataSection(path=f"0.5 {a} 0.5 {c}", global_batch_size=4), roles=("chosen", "rejected"),
                 ref_roles=refs, layout=layout, thd=True, device="cpu")
