"""The reference log-prob sidecar: round trip, writing in pieces, refusals."""

import json

import numpy as np
import pytest

from megatron_longpo.data.format import FORMAT_NAME, FORMAT_VERSION
from megatron_longpo.data.reference import (
    RefLogpError,
    RefLogpWriter,
    load_ref_logps,
    merge_parts,
    part_path,
    sidecar_path,
)

N = 11
HASH = "sha256:" + "ab" * 32


def _manifest(tmp_path, kind="longpo", dataset_hash=HASH, n=N):
    prefix = tmp_path / "data"
    roles = {"longpo": ["chosen", "rejected", "ref_chosen", "ref_rejected"],
             "solopo": ["chosen", "rejected", "long_chosen", "long_rejected", "ref_chosen", "ref_rejected",
                        "ref_long_chosen", "ref_long_rejected"]}[kind]
    (tmp_path / "data.json").write_text(json.dumps({
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "kind": kind, "num_samples": n,
        "roles": roles, "dataset_hash": dataset_hash}))
    return prefix


def _values(role):
    rng = np.random.default_rng(len(role))
    return -rng.random(N) * 100 - 1e-3, rng.integers(1, 500, N)


def test_round_trip_written_in_pieces(tmp_path):
    prefix = _manifest(tmp_path)
    parts = []
    for rank in range(3):  # rank r computed rows r, r+3, r+6, ...
        w = RefLogpWriter.for_dataset(prefix, "SmolLM2-135M-Instruct", computation={"dtype": "fp32", "tp": 1})
        assert w.roles == ("ref_chosen", "ref_rejected")
        rows = np.arange(rank, N, 3)
        for role in w.roles:
            lp, cnt = _values(role)
            w.add(rows, role, lp[rows], cnt[rows])
        parts.append(w.save_part(part_path(prefix, rank)))
    out = merge_parts(parts, sidecar_path(prefix))
    ref = load_ref_logps(prefix)
    assert out == sidecar_path(prefix) and ref.num_samples == N and ref.dataset_hash == HASH
    assert ref.reference_model == "SmolLM2-135M-Instruct" and ref.computation == {"dtype": "fp32", "tp": 1}
    for role in ("ref_chosen", "ref_rejected"):
        lp, cnt = _values(role)
        assert ref.logp_sum[role].dtype == np.float64 and ref.num_tokens[role].dtype == np.int64
        np.testing.assert_array_equal(ref.logp_sum[role], lp)  # float64, bit-exact
        np.testing.assert_array_equal(ref.num_tokens[role], cnt)
        got_lp, got_cnt = ref.batch([4, 0, 10], role)
        np.testing.assert_array_equal(got_lp, lp[[4, 0, 10]])
        assert ref.get(7, role) == (float(lp[7]), int(cnt[7]))


def test_incomplete_sidecar_is_refused(tmp_path):
    prefix = _manifest(tmp_path)
    w = RefLogpWriter.for_dataset(prefix, "m")
    lp, cnt = _values("x")
    w.add(range(N), "ref_chosen", lp, cnt)
    w.add(range(N - 2), "ref_rejected", lp[:-2], cnt[:-2])
    with pytest.raises(RefLogpError, match=r"ref_rejected: 2 rows \(first \[9, 10\]\)"):
        w.save(sidecar_path(prefix))
    w.save_part(part_path(prefix, 0))
    with pytest.raises(RefLogpError, match="missing"):
        merge_parts([part_path(prefix, 0)], sidecar_path(prefix))
    # a partial file put where the sidecar belongs is refused by the reader too
    w.save_part(sidecar_path(prefix))
    with pytest.raises(RefLogpError, match="ref_rejected: 2 rows"):
        load_ref_logps(prefix)


def test_hash_mismatch_is_refused_naming_both_hashes_and_the_fix(tmp_path):
    prefix = _manifest(tmp_path)
    w = RefLogpWriter.for_dataset(prefix, "m")
    for role in w.roles:
        w.add(range(N), role, *_values(role))
    w.save(sidecar_path(prefix))
    load_ref_logps(prefix)
    other = "sha256:" + "cd" * 32
    _manifest(tmp_path, dataset_hash=other)  # the dataset was re-preprocessed
    with pytest.raises(RefLogpError) as err:
        load_ref_logps(prefix)
    msg = str(err.value)
    assert HASH in msg and other in msg and "tools/precompute_ref_logps.py" in msg


def test_missing_roles_and_conflicting_rows(tmp_path):
    prefix = _manifest(tmp_path, kind="solopo")
    w = RefLogpWriter.for_dataset(prefix, "m", roles=["ref_chosen", "ref_long_chosen"])
    for role in w.roles:
        w.add(range(N), role, *_values(role))
    w.save(sidecar_path(prefix))
    assert load_ref_logps(prefix, roles=["ref_long_chosen"]).roles == ("ref_long_chosen",)
    with pytest.raises(RefLogpError, match=r"no reference log-probs for roles \['ref_rejected', 'ref_long_rejected'\]"):
        load_ref_logps(prefix)  # all four SoLoPO ref roles by default
    with pytest.raises(RefLogpError, match="has no roles"):
        RefLogpWriter.for_dataset(prefix, "m", roles=["ref_turn_3"])
    # the same row twice: fine when it agrees (padded last batches), refused when it does not
    w.add([3], "ref_chosen", [_values("ref_chosen")[0][3]], [_values("ref_chosen")[1][3]])
    with pytest.raises(RefLogpError, match="row 3 of role 'ref_chosen' was given twice"):
        w.add([3], "ref_chosen", [-1.0], [5])
    with pytest.raises(ValueError, match="non-finite"):
        w.add([1], "ref_chosen", [float("nan")], [3])
    (tmp_path / "fresh").mkdir()
    with pytest.raises(RefLogpError, match="no reference log-prob sidecar.*precompute_ref_logps"):
        load_ref_logps(_manifest(tmp_path / "fresh"))
