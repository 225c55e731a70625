"""Prefix-shared rows: the layout, and log-probs and gradients equal to the two-sequence layout
(fp32, CPU), at CP=1 and at CP=2 over gloo."""
import numpy as np
import pytest
import torch
from mp import torchrun

from megatron_longpo.data.format import PairDataset
from megatron_longpo.data.packing import pack
from megatron_longpo.data.prefix_sharing import build_shared_row, rank_view, shared_prefix_length


@pytest.fixture(scope="module")
def pair_data(smollm2_dir, module_tmp):
    from fixtures import build_dataset

    return build_dataset(module_tmp, "pair", 4, smollm2_dir, None)


@pytest.fixture(scope="module")
def solopo_data(smollm2_dir, module_tmp):
    from fixtures import build_dataset

    return build_dataset(module_tmp, "solopo", 3, smollm2_dir, None)


def test_layout_keeps_every_token_and_label(tiny_longpo_data):
    ds = PairDataset(tiny_longpo_data)
    samples = [ds.sample(0), ds.sample(1), ds.sample(2)]
    roles = ("chosen", "rejected")
    row = build_shared_row(samples, roles)
    plain = pack(samples, roles)
    assert row.seq_role == list(plain.seq_role) and row.seq_sample == list(plain.seq_sample)
    # every sequence is its trunk followed by its branch, and the scored labels are the same
    for j, (a, b) in enumerate(zip(row.seq_role[::2], row.seq_role[1::2])):
        c, r = samples[j].sequences(a)[0], samples[j].sequences(b)[0]
        k = shared_prefix_length(c, r)
        assert k > 0.5 * len(c)  # the 2-turn sample shares its document
        trunk = row.t_tokens[row.cu_pad[j]:row.cu_pad[j] + k]
        for s, seq in ((c, 2 * j), (r, 2 * j + 1)):
            sel = (row.b_branch == seq)
            np.testing.assert_array_equal(np.concatenate([trunk, row.b_tokens[sel]]), s.tokens)
            np.testing.assert_array_equal(row.b_pos[sel], np.arange(k, len(s)))
            scored = row.b_labels[sel][row.b_mask[sel] > 0]
            np.testing.assert_array_equal(scored, s.tokens[1:][s.loss_mask[1:] > 0])
            assert (row.b_seq[sel][row.b_mask[sel] > 0] == seq).all()
    assert row.t_mask.sum() == 0  # no scored token in a shared prefix
    assert row.real_tokens < 0.75 * row.unshared_tokens


def test_cp_views_cover_the_row_once(tiny_longpo_data):
    ds = PairDataset(tiny_longpo_data)
    row = build_shared_row([ds.sample(0), ds.sample(1)], ("chosen", "rejected"), cp_size=2, pad_multiple=4)
    views = [rank_view(row, r) for r in range(2)]
    assert len(views[0].tokens) == len(views[1].tokens)
    got = np.sort(np.concatenate([v.tokens.numpy() for v in views]))
    want = np.sort(np.concatenate([row.t_tokens, row.b_tokens]))
    np.testing.assert_array_equal(got, want)
    # each branch piece attends to its whole trunk: the trunk's real tokens are in its key set
    for v in views:
        for lo, hi, kv, tail in v.parts:
            assert tail  # every branch piece is a lower-right causal tail of its keys
            trunk = v.meta["trunk"][kv][v.meta["branch"][kv] == -1]
            assert len(trunk) == int(row.cu[int(trunk[0]) + 1] - row.cu[int(trunk[0])])


def test_unshareable_pairs_fall_back_to_separate_sequences(tiny_longpo_data):
    ds = PairDataset(tiny_longpo_data)
    s = ds.sample(0)
    row = build_shared_row([s], ("chosen", "rejected"), min_shared=10**9)
    assert row.num_branch_tokens == 0 and len(row.cu) == 3
    assert row.real_tokens == row.unshared_tokens


def _job(tmp, name, ckpt, data, roles, samples, share, sequence_roles=()):
    return [str(ckpt), str(data), ",".join(roles), samples, "1" if share else "0", str(tmp / f"{name}.pt"), "auto",
            ",".join(sequence_roles)]


def _run_many(tmp, nproc, jobs: dict) -> dict:
    """{name: worker arguments} run one after another in ONE launch of `nproc` ranks (CP = nproc):
    {name: the worker's saved result}."""
    spec = tmp / f"jobs{nproc}.json"
    spec.write_text(__import__("json").dumps(list(jobs.values())))
    torchrun(nproc, "prefix_sharing.py", "--many", str(spec), timeout=600)
    return {name: torch.load(job[5]) for name, job in jobs.items()}


def _assert_same(a, b, tol=1e-5):
    for r, (lp, n) in a["stats"].items():
        lp2, n2 = b["stats"][r]
        assert torch.equal(n, n2), (r, n, n2)
        assert ((lp - lp2).abs() / lp.abs()).max() <= tol, (r, lp, lp2)
    for name, g in a["grads"].items():
        rel = ((g - b["grads"][name]).norm() / g.norm().clamp_min(1e-30)).item()
        assert rel <= tol, (name, rel)


CASES = {
    "longpo_2turn_3pairs": ("longpo", ("chosen", "rejected"), "0,1,2"),
    "pair_1turn_4pairs": ("pair", ("chosen", "rejected"), "0,1,2,3"),
    "solopo_with_unshared_long_chosen": ("solopo", ("chosen", "rejected", "long_chosen"), "0,2"),
}


SEQ = ("chosen",)  # LongPO's whole-sequence NLL over the chosen long sequence


@pytest.fixture(scope="module")
def runs(tiny_llama_ckpt, tiny_longpo_data, pair_data, solopo_data, module_tmp):
    """Every worker result the tests below compare, from two launches (one process; two ranks at
    CP=2): {name: result}. "two/CASE" is the two-sequence layout, "shared/CASE" prefix-shared."""
    data = {"longpo": tiny_longpo_data, "pair": pair_data, "solopo": solopo_data}
    one, two = {}, {}
    for case, (kind, roles, samples) in CASES.items():
        one[f"two/{case}"] = _job(module_tmp, f"two-{case}", tiny_llama_ckpt, data[kind], roles, samples, False)
        one[f"shared/{case}"] = _job(module_tmp, f"shared-{case}", tiny_llama_ckpt, data[kind], roles, samples, True)
    roles = ("chosen", "rejected")
    one["two/seq"] = _job(module_tmp, "two-seq", tiny_llama_ckpt, tiny_longpo_data, roles, "0,1,2", False, SEQ)
    one["shared/seq/1"] = _job(module_tmp, "shared-seq-1", tiny_llama_ckpt, tiny_longpo_data, roles, "0,1,2", True, SEQ)
    two["cp2"] = _job(module_tmp, "cp2", tiny_llama_ckpt, tiny_longpo_data, roles, "0,1,2", True)
    two["shared/seq/2"] = _job(module_tmp, "shared-seq-2", tiny_llama_ckpt, tiny_longpo_data, roles, "0,1,2", True, SEQ)
    return {**_run_many(module_tmp, 1, one), **_run_many(module_tmp, 2, two)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_shared_equals_two_sequences(case, runs):
    _, roles, _ = CASES[case]
    ref, shared = runs[f"two/{case}"], runs[f"shared/{case}"]
    _assert_same(ref, shared)
    # the last layer skips the trunk queries exactly when no trunk token is scored (SoLoPO's long_chosen is)
    assert shared["last_trunk_skipped"] == ("long_chosen" not in roles)


def test_shared_at_cp2_equals_two_sequences(runs):
    # the two-sequence reference on one process is the longpo_2turn_3pairs case's (the same samples and roles)
    assert CASES["longpo_2turn_3pairs"] == ("longpo", ("chosen", "rejected"), "0,1,2")
    ref, cp2 = runs["two/longpo_2turn_3pairs"], runs["cp2"]
    _assert_same(ref, cp2)
    assert cp2["last_trunk_skipped"]


def _predicted(pos, labels, sel):
    """(positions, labels) of the selected tokens, in position order."""
    order = np.argsort(pos[sel], kind="stable")
    return pos[sel][order], labels[sel][order]


def test_whole_sequence_scores_every_chosen_token_exactly_once(tiny_longpo_data):
    """sequence_roles=("chosen",): the trunk's positions (its last one predicts the branch's first
    token) and the chosen branch's predict every token of the chosen sequence but its first, each
    once; nothing of the rejected side; on both CP views together too. The trunk is then scored,
    so the last layer must compute it."""
    ds = PairDataset(tiny_longpo_data)
    samples = [ds.sample(0), ds.sample(1), ds.sample(2)]
    roles = ("chosen", "rejected")
    assert not build_shared_row(samples, roles).trunk_scored
    row = build_shared_row(samples, roles, sequence_roles=("chosen",))
    assert row.trunk_scored
    for j, sample in enumerate(samples):
        c = sample.sequences("chosen")[0]
        pos = np.concatenate([row.t_pos, row.b_pos])
        lab = np.concatenate([row.t_labels, row.b_labels])
        whole = np.concatenate([row.t_whole, row.b_whole])
        p, lb = _predicted(pos, lab, whole == 2 * j)
        np.testing.assert_array_equal(p, np.arange(len(c) - 1))
        np.testing.assert_array_equal(lb, c.tokens[1:])
        assert not (whole == 2 * j + 1).any()  # the rejected sequence has no whole-sequence statistic
    # the response sums are those of the row without sequence roles
    plain = build_shared_row(samples, roles)
    for name in ("t_seq", "b_seq", "t_mask", "b_mask", "t_tokens", "b_tokens"):
        np.testing.assert_array_equal(getattr(row, name), getattr(plain, name))
    # CP=2: the two ranks' views hold every whole-sequence position once
    row2 = build_shared_row(samples, roles, cp_size=2, pad_multiple=4, sequence_roles=("chosen",))
    views = [rank_view(row2, r) for r in range(2)]
    got = np.concatenate([v.whole_index.numpy() for v in views])
    for j, sample in enumerate(samples):
        assert (got == 2 * j).sum() == len(sample.sequences("chosen")[0]) - 1


@pytest.mark.parametrize("thd,cp", [(False, 1), (True, 1), (True, 2)])
def test_whole_sequence_index_of_plain_packing(tiny_longpo_data, thd, cp):
    """prepare_batch(sequence_roles=("chosen",)): every position of a chosen sequence but its last
    (n - 1 predicted tokens of n) and no padding, over the CP ranks together; response masks unchanged."""
    from megatron_longpo.training.batch import prepare_batch

    ds = PairDataset(tiny_longpo_data)
    samples = [ds.sample(0), ds.sample(3)]
    packed = pack(samples, ("chosen", "rejected", "ref_chosen"), 2 * cp if cp > 1 else 1)
    labels, counts = [], torch.zeros(packed.num_sequences, dtype=torch.long)
    for r in range(cp):
        b = prepare_batch(packed, None, thd=thd, cp_size=cp, cp_rank=r, sequence_roles=("chosen",))
        plain = prepare_batch(packed, None, thd=thd, cp_size=cp, cp_rank=r)
        assert plain.whole_index is None and torch.equal(b.loss_mask, plain.loss_mask)
        assert torch.equal(b.keep, b.loss_mask.bool() | (b.whole_index >= 0))
        sel = b.whole_index >= 0
        counts += torch.bincount(b.whole_index[sel], minlength=packed.num_sequences)
        labels.append(b.labels[sel])
    want = [len(s.sequences("chosen")[0]) - 1 if role == "chosen" else 0
            for s, role in zip([samples[i] for i in packed.seq_sample], packed.seq_role)]
    assert counts.tolist() == want
    chosen_labels = np.concatenate([s.sequences("chosen")[0].tokens[1:] for s in samples])
    np.testing.assert_array_equal(np.sort(torch.cat(labels).numpy()), np.sort(chosen_labels))


@pytest.mark.parametrize("nproc", [1, 2])
def test_whole_sequence_statistic_shared_equals_two_sequences(nproc, runs):
    """LongPO's NLL over the chosen long sequence (chosen_sequence): the prefix-shared row at CP=1
    and CP=2 gives the statistics and gradients of the two-sequence layout, and its last layer
    computes the (now scored) trunk."""
    ref, shared = runs["two/seq"], runs[f"shared/seq/{nproc}"]
    assert set(ref["stats"]) == {"chosen", "rejected", "chosen_sequence"}
    _assert_same(ref, shared)
    assert shared["last_trunk_skipped"] is False


def test_tail_causal_attention_equals_the_masked_reference(tiny_longpo_data):
    """The fused lower-right causal call a branch piece takes equals the explicit mask built from
    the token metadata (float64), for the pieces of both CP ranks."""
    from megatron_longpo.models.prefix_attention import allowed, masked_attention, tail_causal_attention

    ds = PairDataset(tiny_longpo_data)
    row = build_shared_row([ds.sample(0), ds.sample(1)], ("chosen", "rejected"), cp_size=2, pad_multiple=4)
    g = torch.Generator().manual_seed(0)
    n = 2 * len(rank_view(row, 0).tokens)
    k = torch.randn(n, 2, 8, generator=g, dtype=torch.float64)
    v = torch.randn(n, 2, 8, generator=g, dtype=torch.float64)
    pieces = 0
    for r in range(2):
        view = rank_view(row, r)
        t = len(view.tokens)
        q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
        qmeta = {name: x[r * t:(r + 1) * t] for name, x in view.meta.items()}
        for lo, hi, kv, tail in view.parts:
            mask = allowed({name: x[lo:hi] for name, x in qmeta.items()}, {name: x[kv] for name, x in view.meta.items()})
            ref = masked_attention(q[lo:hi], k[kv], v[kv], mask, 0.35)
            got = tail_causal_attention(q[lo:hi], k[kv], v[kv], 0.35)
            torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
            # lower-right causal: the last query sees every key, the first (of several) does not
            assert mask[-1].all() and (hi - lo == 1 or not mask[0].all())
            pieces += 1
    assert pieces >= 4  # 2 samples x 2 branches, some cut between the ranks


def test_only_the_last_layer_skips_and_only_when_asked():
    """ModelOptions.skip_unused_trunk reaches the attention through the layer spec; only the
    model's last layer (global numbering) skips."""
    from megatron.core.transformer import TransformerConfig

    from megatron_longpo.models.build import layer_spec
    from megatron_longpo.models.prefix_attention import PrefixSharedAttention

    cfg = TransformerConfig(num_layers=3, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True)
    for skip in (True, False):
        make = layer_spec(False, True, {}, skip_unused_trunk=skip).submodules.self_attention.submodules.core_attention
        assert make.func is PrefixSharedAttention
        got = [make(config=cfg, layer_number=n, attn_mask_type=None).skip_unused_trunk for n in (1, 2, 3)]
        assert got == [False, False, skip]
