"""Tests of megatron_longpo.losses against an independent float reference (docs/methods.md).

The reference below works on plain Python floats, one sample at a time, with `math` and,
for log(1 - exp(p)), `decimal` at 60 digits; it never calls the module under test.
"""
from __future__ import annotations

import math
import random
import zlib
from decimal import Decimal, localcontext

import pytest
import torch

from megatron_longpo.losses import (
    LOSS_NAMES,
    LossConfig,
    SeqStat,
    compute_loss,
    dpo_loss,
    log1mexp,
    orpo_log_odds,
    orpo_loss,
    policy_roles,
    reference_roles,
    required_roles,
    sequence_roles,
    solo_simpo_loss,
)

ALL_ROLES = ("chosen", "rejected", "long_chosen", "long_rejected",
             "ref_chosen", "ref_rejected", "ref_long_chosen", "ref_long_rejected", "chosen_sequence")


# =======================================================================================
# independent reference (plain floats, one sample)
# =======================================================================================
def ref_log_sigmoid(z: float) -> float:
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def ref_log1mexp(p: float) -> float:
    """log(1 - exp(p)) for p < 0, in 60-digit decimal arithmetic."""
    with localcontext() as ctx:
        ctx.prec = 60
        x = Decimal(p)
        if x > -1:  # 1 - exp(x) = -(x + x²/2! + x³/3! + ...): no cancellation for tiny |x|
            term, total, k = x, Decimal(0), 1
            while term != 0 and abs(term) > abs(total) * Decimal("1e-70"):
                total += term
                k += 1
                term = term * x / k
            one_minus_exp = -total
        else:
            one_minus_exp = Decimal(1) - x.exp()
        return float(one_minus_exp.ln())


def ref_log_odds(logps: float, tokens: float) -> float:
    p = logps / tokens
    return p - ref_log1mexp(p)


def ref_sample(cfg: LossConfig, s: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Loss and rewards of one sample; s maps role -> (sum logp, tokens)."""
    b = cfg.beta
    lp = {r: v[0] for r, v in s.items()}
    avg = {r: v[0] / v[1] for r, v in s.items()}

    def dpo_r(pol, ref):
        return b * (lp[pol] - lp[ref])

    def dpo():
        z = dpo_r("chosen", "ref_chosen") - dpo_r("rejected", "ref_rejected")
        eps = cfg.label_smoothing
        return (-(1 - eps) * ref_log_sigmoid(z) - eps * ref_log_sigmoid(-z),
                dpo_r("chosen", "ref_chosen"), dpo_r("rejected", "ref_rejected"))

    def simpo():
        rw, rl = b * avg["chosen"], b * avg["rejected"]
        return -ref_log_sigmoid(rw - rl - cfg.simpo_gamma), rw, rl

    def orpo():
        lw, ll = ref_log_odds(*s["chosen"]), ref_log_odds(*s["rejected"])
        return -avg["chosen"] - cfg.orpo_lambda * ref_log_sigmoid(lw - ll), lw, ll

    n = cfg.name
    if n == "sft":
        return {"loss": -avg["chosen"]}
    if n == "dpo":
        loss, rw, rl = dpo()
    elif n == "ipo":
        d = (avg["chosen"] - avg["ref_chosen"]) - (avg["rejected"] - avg["ref_rejected"])
        loss = (d - 1 / (2 * b)) ** 2
        rw, rl = b * (avg["chosen"] - avg["ref_chosen"]), b * (avg["rejected"] - avg["ref_rejected"])
    elif n == "simpo":
        loss, rw, rl = simpo()
    elif n == "orpo":
        loss, rw, rl = orpo()
    elif n == "longpo":  # the NLL over the whole chosen long sequence, or the responses (ablation)
        d, rw, rl = dpo()
        loss = -avg["chosen_sequence" if cfg.longpo_nll == "sequence" else "chosen"] + cfg.longpo_lambda * d
    else:  # SoLo-X = X on the short pair + α |r(x_S, y) - r(x_L, y)|
        po = {"solo-dpo": dpo, "solo-simpo": simpo, "solo-orpo": orpo}[n]
        loss, rw, rl = po()
        if n == "solo-dpo":
            r = {y: (dpo_r(y, "ref_" + y), dpo_r("long_" + y, "ref_long_" + y))
                 for y in ("chosen", "rejected")}
        elif n == "solo-simpo":
            r = {y: (b * avg[y], b * avg["long_" + y]) for y in ("chosen", "rejected")}
        else:
            r = {y: (ref_log_odds(*s[y]), ref_log_odds(*s["long_" + y]))
                 for y in ("chosen", "rejected")}
        loss += cfg.solopo_alpha * abs(r["chosen"][0] - r["chosen"][1])
        if cfg.solopo_both:
            loss += cfg.solopo_alpha * abs(r["rejected"][0] - r["rejected"][1])
    return {"loss": loss, "rw": rw, "rl": rl}


# =======================================================================================
# helpers
# =======================================================================================
def make_stats(rows: list[dict[str, tuple[float, float]]], requires_grad=False):
    """rows[i][role] = (logps, tokens) -> {role: SeqStat of float64 tensors}."""
    out = {}
    for role in rows[0]:
        logps = torch.tensor([r[role][0] for r in rows], dtype=torch.float64,
                             requires_grad=requires_grad and not role.startswith("ref_"))
        tokens = torch.tensor([r[role][1] for r in rows], dtype=torch.float64)
        out[role] = SeqStat(logps, tokens)
    return out


def random_rows(rng: random.Random, n: int, roles=ALL_ROLES, scale=3.0, max_tokens=400):
    rows = []
    for _ in range(n):
        row = {}
        for role in roles:
            tokens = rng.randint(1, max_tokens)
            row[role] = (tokens * rng.uniform(-scale, -0.01), tokens)
        rows.append(row)
    return rows


def check_against_reference(cfg: LossConfig, rows, rel=1e-12, abs_=1e-12):
    out = compute_loss(cfg, make_stats(rows))
    for i, row in enumerate(rows):
        want = ref_sample(cfg, row)
        assert out.loss[i].item() == pytest.approx(want["loss"], rel=rel, abs=abs_), (cfg, i)
        if "rw" in want:
            assert out.metrics["rewards/chosen"][i].item() == pytest.approx(want["rw"], rel=rel, abs=abs_)
            assert out.metrics["rewards/rejected"][i].item() == pytest.approx(want["rl"], rel=rel, abs=abs_)
            assert out.metrics["rewards/accuracies"][i].item() == float(want["rw"] > want["rl"])
    return out


CONFIGS = [
    LossConfig("dpo", beta=0.1),
    LossConfig("dpo", beta=0.5, label_smoothing=0.2),
    LossConfig("ipo", beta=0.1),
    LossConfig("ipo", beta=2.0),
    LossConfig("simpo", beta=2.0, simpo_gamma=1.0),
    LossConfig("simpo", beta=0.1, simpo_gamma=0.0),
    LossConfig("orpo", orpo_lambda=0.1),
    LossConfig("orpo", orpo_lambda=1.0),
    LossConfig("sft"),
    LossConfig("longpo", beta=0.1, longpo_lambda=0.01, longpo_nll="responses"),
    LossConfig("longpo", beta=0.01, longpo_lambda=0.5, label_smoothing=0.1, longpo_nll="responses"),
    LossConfig("longpo", beta=0.1, longpo_lambda=0.01),
    LossConfig("longpo", beta=0.01, longpo_lambda=0.5, label_smoothing=0.1),
    LossConfig("solo-dpo", beta=0.1, solopo_alpha=3.0),
    LossConfig("solo-dpo", beta=0.1, solopo_alpha=3.0, label_smoothing=0.1, solopo_both=True),
    LossConfig("solo-simpo", beta=2.0, simpo_gamma=0.5, solopo_alpha=1.0),
    LossConfig("solo-simpo", beta=2.0, simpo_gamma=0.5, solopo_alpha=1.0, solopo_both=True),
    LossConfig("solo-orpo", orpo_lambda=0.1, solopo_alpha=4.0),
    LossConfig("solo-orpo", orpo_lambda=0.1, solopo_alpha=1.0, solopo_both=True),
]


def cfg_id(c: LossConfig) -> str:
    nll = f"-nll_{c.longpo_nll}" if c.name == "longpo" else ""
    return f"{c.name}-b{c.beta}-ls{c.label_smoothing}-both{int(c.solopo_both)}-a{c.solopo_alpha}{nll}"


# =======================================================================================
# values against the reference
# =======================================================================================
@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_random_inputs_match_reference(cfg):
    rng = random.Random(zlib.crc32(cfg_id(cfg).encode()))
    check_against_reference(cfg, random_rows(rng, 7))


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_long_multi_turn_sums_match_reference(cfg):
    # multi-turn sums over 1e4 response tokens: |logps| around 5e4
    rng = random.Random(7)
    rows = [{r: (-5e4 + rng.uniform(-300, 300), 1e4 + rng.randint(-50, 50)) for r in ALL_ROLES}
            for _ in range(4)]
    rows.append({r: (-5e4, 1e4) for r in ALL_ROLES})
    # relative error of the float64 inputs (~1e-16 of 5e4) is amplified by β·|Δ| differences
    check_against_reference(cfg, rows, rel=1e-10, abs_=1e-10)


def test_dpo_equal_logps_is_log2_exactly():
    rows = [{r: (-123.25, 50.0) for r in ALL_ROLES}] * 3
    for cfg in (LossConfig("dpo"), LossConfig("dpo", label_smoothing=0.3)):
        out = compute_loss(cfg, make_stats(rows))
        assert torch.all((out.loss - math.log(2.0)).abs() <= 1e-15)
        assert torch.all(out.metrics["rewards/margins"] == 0)
        assert torch.all(out.metrics["rewards/accuracies"] == 0)  # 1[r_w > r_l], ties are 0


def test_ipo_uses_average_logprobs():
    # equal average log-ratios but very different lengths: Δ = 0, loss = (1/(2β))²
    rows = [{"chosen": (-10.0, 10.0), "rejected": (-1000.0, 1000.0),
             "ref_chosen": (-20.0, 10.0), "ref_rejected": (-2000.0, 1000.0)}]
    out = compute_loss(LossConfig("ipo", beta=0.25), make_stats(rows))
    assert out.loss.item() == pytest.approx(4.0, abs=1e-14)  # Δ = 1 - 1 = 0 → (0 - 1/(2β))² = 4
    rows[0]["chosen"] = (-5.0, 10.0)  # Δ = 1.5 - 1 = 0.5 → (0.5 - 2)² = 2.25
    out = compute_loss(LossConfig("ipo", beta=0.25), make_stats(rows))
    assert out.loss.item() == pytest.approx(2.25, abs=1e-14)
    check_against_reference(LossConfig("ipo", beta=0.25), rows)


def test_longpo_is_nll_plus_lambda_dpo():
    rows = random_rows(random.Random(3), 5)
    stats = make_stats(rows)
    for lam in (0.0, 0.01, 1.0):
        out = compute_loss(LossConfig("longpo", beta=0.1, longpo_lambda=lam, longpo_nll="responses"), stats)
        dpo = compute_loss(LossConfig("dpo", beta=0.1), stats)
        nll = -stats["chosen"].logps / stats["chosen"].tokens
        torch.testing.assert_close(out.loss, nll + lam * dpo.loss, rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(out.metrics["loss/dpo"], dpo.loss)
        torch.testing.assert_close(out.metrics["nll_loss"], nll.detach())


def test_longpo_sequence_nll_is_over_the_whole_chosen_sequence():
    """The default NLL averages chosen_sequence (every token of the chosen long sequence); the DPO
    term still uses the response sums, and the responses mode is today's formula bit for bit."""
    rows = random_rows(random.Random(13), 5)
    stats = make_stats(rows)
    dpo = compute_loss(LossConfig("dpo", beta=0.1), stats)
    seq = compute_loss(LossConfig("longpo", beta=0.1, longpo_lambda=0.3), stats)
    nll = -stats["chosen_sequence"].logps / stats["chosen_sequence"].tokens
    torch.testing.assert_close(seq.loss, nll + 0.3 * dpo.loss, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(seq.metrics["nll_loss"], nll)
    torch.testing.assert_close(seq.metrics["logps/chosen_sequence"], -nll)
    torch.testing.assert_close(seq.metrics["loss/dpo"], dpo.loss)
    # responses: exactly the expression the loss had before longpo_nll existed
    old = -stats["chosen"].mean + 0.3 * dpo.loss
    resp = compute_loss(LossConfig("longpo", beta=0.1, longpo_lambda=0.3, longpo_nll="responses"), stats)
    assert torch.equal(resp.loss, old)
    assert "logps/chosen_sequence" not in resp.metrics
    # the whole-sequence statistic changes the sequence loss and nothing else
    other = dict(stats, chosen_sequence=SeqStat(stats["chosen_sequence"].logps * 2, stats["chosen_sequence"].tokens))
    assert torch.equal(compute_loss(resp_cfg := LossConfig("longpo", longpo_nll="responses"), other).loss,
                       compute_loss(resp_cfg, stats).loss)
    assert not torch.equal(compute_loss(LossConfig("longpo"), other).loss, compute_loss(LossConfig("longpo"), stats).loss)


def test_longpo_sequence_roles():
    assert sequence_roles(LossConfig("longpo")) == ("chosen",)
    assert required_roles(LossConfig("longpo")) == ("chosen", "rejected", "chosen_sequence", "ref_chosen", "ref_rejected")
    assert sequence_roles(LossConfig("longpo", longpo_nll="responses")) == ()
    assert all(sequence_roles(c) == () for c in CONFIGS if c.name != "longpo")
    stats = make_stats(random_rows(random.Random(2), 2, roles=("chosen", "rejected", "ref_chosen", "ref_rejected")))
    with pytest.raises(ValueError, match="missing: 'chosen_sequence'") as e:
        compute_loss(LossConfig("longpo"), stats)
    assert "whole-sequence roles are computed by the trainer" in str(e.value)


@pytest.mark.parametrize("name", ["solo-dpo", "solo-simpo", "solo-orpo"])
def test_solopo_is_po_plus_alpha_ra(name):
    rows = random_rows(random.Random(11), 6)
    stats = make_stats(rows)
    po_name = name.removeprefix("solo-")
    po = compute_loss(LossConfig(po_name, beta=0.3), stats)
    for both in (False, True):
        out = compute_loss(LossConfig(name, beta=0.3, solopo_alpha=2.5, solopo_both=both), stats)
        torch.testing.assert_close(out.metrics["loss/po"], po.loss)
        ra = out.metrics["loss/solo_ra"]
        torch.testing.assert_close(out.loss, po.loss + 2.5 * ra, rtol=1e-14, atol=1e-14)
        if both:
            torch.testing.assert_close(
                ra, out.metrics["loss/solo_ra_chosen"] + out.metrics["loss/solo_ra_rejected"])
            assert torch.all(out.metrics["loss/solo_ra_rejected"] > 0)
        else:
            torch.testing.assert_close(ra, out.metrics["loss/solo_ra_chosen"])
    # α = 0 gives the plain PO loss
    out = compute_loss(LossConfig(name, beta=0.3, solopo_alpha=0.0), stats)
    torch.testing.assert_close(out.loss, po.loss, rtol=0, atol=0)


# =======================================================================================
# ORPO numerics
# =======================================================================================
ORPO_P = [-1e3, -50.0, -5.0, -1.0, -math.log(2) - 1e-9, -math.log(2), -math.log(2) + 1e-9,
          -0.5, -1e-3, -1e-6, -1e-9, -1e-12]


def test_log1mexp_matches_decimal():
    x = torch.tensor(ORPO_P + [-1e-300, -2.0, -10.0, -20.0, -30.0, -40.0, -700.0], dtype=torch.float64)
    got = log1mexp(x)
    for xi, gi in zip(x.tolist(), got.tolist()):
        want = ref_log1mexp(xi)
        assert gi == pytest.approx(want, rel=1e-14, abs=1e-300), xi


@pytest.mark.parametrize("p", ORPO_P)
def test_orpo_log_odds_and_loss_extremes(p):
    tokens = 7.0
    stat = SeqStat(torch.tensor([p * tokens], dtype=torch.float64), torch.tensor([tokens]))
    want = ref_log_odds(p * tokens, tokens)
    assert orpo_log_odds(stat).item() == pytest.approx(want, rel=1e-13, abs=1e-13)
    rows = [{"chosen": (p * tokens, tokens), "rejected": (q * 3.0, 3.0)} for q in (-50.0, -0.7, -1e-6)]
    check_against_reference(LossConfig("orpo", orpo_lambda=0.5), rows, rel=1e-12, abs_=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p_w,p_l", [(-1e-12, -1e3), (-1e3, -1e-12), (-1e-12, -1e-12),
                                     (-1e3, -1e3), (0.0, -1.0), (1e-7, 0.0)])
def test_orpo_finite_loss_and_grad(dtype, p_w, p_l):
    # p̄ >= 0 (last two cases) only arises from rounding; it is clamped, still finite.
    tokens = torch.tensor([5.0, 5.0])
    lw = torch.tensor([p_w * 5.0] * 2, dtype=dtype, requires_grad=True)
    ll = torch.tensor([p_l * 5.0] * 2, dtype=dtype, requires_grad=True)
    for name in ("orpo", "solo-orpo"):
        stats = {"chosen": SeqStat(lw, tokens), "rejected": SeqStat(ll, tokens),
                 "long_chosen": SeqStat(ll, tokens)}
        out = compute_loss(LossConfig(name, orpo_lambda=1.0), stats)
        assert out.loss.dtype in (torch.float32, torch.float64)
        lw.grad = ll.grad = None
        out.loss.sum().backward()
        assert torch.isfinite(out.loss).all(), (name, out.loss)
        assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
        for v in out.metrics.values():
            assert torch.isfinite(v).all()


# =======================================================================================
# gradients
# =======================================================================================
def _gradcheck(fn, roles, seed):
    rows = random_rows(random.Random(seed), 3, roles=roles, scale=2.0, max_tokens=20)
    stats = make_stats(rows)
    pol = [r for r in roles if not r.startswith("ref_")]
    inputs = tuple(stats[r].logps.clone().requires_grad_(True) for r in pol)

    def f(*logps):
        s = dict(stats)
        s.update({r: SeqStat(x, stats[r].tokens) for r, x in zip(pol, logps)})
        return fn(s).loss

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_dpo():
    _gradcheck(lambda s: dpo_loss(s["chosen"], s["rejected"], s["ref_chosen"], s["ref_rejected"],
                                  beta=0.7, label_smoothing=0.1),
               ("chosen", "rejected", "ref_chosen", "ref_rejected"), 1)


def test_gradcheck_orpo():
    _gradcheck(lambda s: orpo_loss(s["chosen"], s["rejected"], lam=0.8), ("chosen", "rejected"), 2)


def test_gradcheck_solo_simpo_both():
    _gradcheck(lambda s: solo_simpo_loss(s["chosen"], s["rejected"], s["long_chosen"],
                                         beta=2.0, gamma=0.5, alpha=1.5,
                                         long_rejected=s["long_rejected"]),
               ("chosen", "rejected", "long_chosen", "long_rejected"), 3)


@pytest.mark.parametrize("cfg", [LossConfig("ipo"), LossConfig("longpo"), LossConfig("longpo", longpo_nll="responses"),
                                 LossConfig("solo-dpo", solopo_both=True),
                                 LossConfig("solo-orpo")], ids=cfg_id)
def test_gradcheck_via_compute_loss(cfg):
    _gradcheck(lambda s: compute_loss(cfg, s), required_roles(cfg), 4)


def test_reference_statistics_get_no_gradient():
    rows = random_rows(random.Random(5), 3)
    stats = make_stats(rows, requires_grad=True)
    ref = SeqStat(stats["ref_chosen"].logps.clone().requires_grad_(True), stats["ref_chosen"].tokens)
    stats["ref_chosen"] = ref
    out = compute_loss(LossConfig("solo-dpo"), stats)
    out.loss.sum().backward()
    assert ref.logps.grad is None
    assert stats["chosen"].logps.grad is not None and stats["long_chosen"].logps.grad is not None


# =======================================================================================
# conventions: per-sample output, metrics, dtypes
# =======================================================================================
EXPECTED_METRICS = {
    "dpo": {"loss/dpo"},
    "ipo": {"loss/ipo"},
    "simpo": {"loss/simpo"},
    "orpo": {"nll_loss", "loss/or"},
    "longpo": {"nll_loss", "loss/dpo"},
    "solo-dpo": {"loss/dpo"},
    "solo-simpo": {"loss/simpo"},
    "solo-orpo": {"nll_loss", "loss/or"},
}
PAIR = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
        "logps/chosen", "logps/rejected"}
SOLO = {"loss/po", "loss/solo_ra", "loss/solo_ra_chosen", "rewards/long_chosen", "logps/long_chosen"}
SOLO_BOTH = {"loss/solo_ra_rejected", "rewards/long_rejected", "logps/long_rejected"}


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_metric_names_shapes_detached_and_microbatch_invariance(cfg):
    rows = random_rows(random.Random(9), 6)
    stats = make_stats(rows, requires_grad=True)
    out = compute_loss(cfg, stats)
    if cfg.name == "sft":
        want = {"logps/chosen", "nll_loss"}
    else:
        want = PAIR | EXPECTED_METRICS[cfg.name]
        if cfg.name == "longpo" and cfg.longpo_nll == "sequence":
            want |= {"logps/chosen_sequence"}
        if cfg.name.startswith("solo-"):
            want |= SOLO | (SOLO_BOTH if cfg.solopo_both else set())
    assert set(out.metrics) == want
    assert out.loss.shape == (6,) and out.loss.requires_grad
    for k, v in out.metrics.items():
        assert v.shape == (6,) and not v.requires_grad, k
    # per-sample: two micro-batches of 3 give the same per-sample losses as one of 6
    halves = [compute_loss(cfg, {r: SeqStat(s.logps[sl], s.tokens[sl]) for r, s in stats.items()})
              for sl in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(torch.cat([h.loss for h in halves]), out.loss, rtol=1e-14, atol=0)


def test_low_precision_inputs_are_computed_in_float32():
    rows = random_rows(random.Random(4), 4)
    s64 = make_stats(rows)
    sbf = {r: SeqStat(s.logps.to(torch.bfloat16), s.tokens.to(torch.int64)) for r, s in s64.items()}
    for cfg in CONFIGS:
        out = compute_loss(cfg, sbf)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all()


def test_integer_token_counts():
    rows = random_rows(random.Random(8), 3)
    s = make_stats(rows)
    s_int = {r: SeqStat(v.logps, v.tokens.to(torch.int32)) for r, v in s.items()}
    for cfg in CONFIGS:
        torch.testing.assert_close(compute_loss(cfg, s_int).loss, compute_loss(cfg, s).loss)


# =======================================================================================
# roles
# =======================================================================================
@pytest.mark.parametrize("cfg,pol,ref", [
    (LossConfig("dpo"), ("chosen", "rejected"), ("ref_chosen", "ref_rejected")),
    (LossConfig("ipo"), ("chosen", "rejected"), ("ref_chosen", "ref_rejected")),
    (LossConfig("simpo"), ("chosen", "rejected"), ()),
    (LossConfig("orpo"), ("chosen", "rejected"), ()),
    (LossConfig("sft"), ("chosen",), ()),
    (LossConfig("longpo", longpo_nll="responses"), ("chosen", "rejected"), ("ref_chosen", "ref_rejected")),
    (LossConfig("solo-dpo"), ("chosen", "rejected", "long_chosen"),
     ("ref_chosen", "ref_rejected", "ref_long_chosen")),
    (LossConfig("solo-dpo", solopo_both=True), ("chosen", "rejected", "long_chosen", "long_rejected"),
     ("ref_chosen", "ref_rejected", "ref_long_chosen", "ref_long_rejected")),
    (LossConfig("solo-simpo"), ("chosen", "rejected", "long_chosen"), ()),
    (LossConfig("solo-simpo", solopo_both=True), ("chosen", "rejected", "long_chosen", "long_rejected"), ()),
    (LossConfig("solo-orpo"), ("chosen", "rejected", "long_chosen"), ()),
    (LossConfig("solo-orpo", solopo_both=True), ("chosen", "rejected", "long_chosen", "long_rejected"), ()),
], ids=lambda v: cfg_id(v) if isinstance(v, LossConfig) else "")
def test_roles(cfg, pol, ref):
    assert policy_roles(cfg) == pol
    assert reference_roles(cfg) == ref
    # exactly these roles suffice
    rows = random_rows(random.Random(1), 2, roles=pol + ref)
    assert compute_loss(cfg, make_stats(rows)).loss.shape == (2,)


def test_every_loss_name_is_covered():
    assert {c.name for c in CONFIGS} == set(LOSS_NAMES)


# =======================================================================================
# errors
# =======================================================================================
def _stats_for(cfg, n=3, seed=0):
    return make_stats(random_rows(random.Random(seed), n, roles=required_roles(cfg)))


def test_error_missing_reference_role():
    cfg = LossConfig("dpo")
    stats = _stats_for(cfg)
    del stats["ref_rejected"]
    with pytest.raises(ValueError, match="missing: 'ref_rejected'") as e:
        compute_loss(cfg, stats)
    assert "reference sidecar" in str(e.value) and "'dpo'" in str(e.value)


def test_error_missing_policy_role():
    cfg = LossConfig("solo-simpo", solopo_both=True)
    stats = _stats_for(cfg)
    del stats["long_rejected"]
    with pytest.raises(ValueError, match="missing: 'long_rejected'") as e:
        compute_loss(cfg, stats)
    assert "data kind" in str(e.value) and "solo-simpo" in str(e.value)


def test_error_zero_tokens():
    cfg = LossConfig("longpo")
    stats = _stats_for(cfg)
    stats["rejected"] = SeqStat(stats["rejected"].logps, torch.tensor([5.0, 3.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sample 2 of role 'rejected' has no response tokens"):
        compute_loss(cfg, stats)
    # the pure functions check too by default
    s = stats
    with pytest.raises(ValueError, match="sample 2 of role 'rejected' has no response tokens"):
        dpo_loss(s["chosen"], s["rejected"], s["ref_chosen"], s["ref_rejected"], beta=0.1)


def test_error_batch_shape_mismatch():
    cfg = LossConfig("solo-dpo")
    stats = _stats_for(cfg)
    stats["ref_long_chosen"] = _stats_for(cfg, n=4)["ref_long_chosen"]
    with pytest.raises(ValueError, match=r"role 'ref_long_chosen' has batch shape \(4,\)"):
        compute_loss(cfg, stats)


def test_error_not_one_dimensional():
    cfg = LossConfig("simpo")
    stats = _stats_for(cfg)
    c = stats["chosen"]
    stats["chosen"] = SeqStat(c.logps[:, None], c.tokens[:, None])
    with pytest.raises(ValueError, match="role 'chosen' logps must be a 1-D tensor"):
        compute_loss(cfg, stats)


def test_error_logps_tokens_mismatch_within_role():
    cfg = LossConfig("orpo")
    stats = _stats_for(cfg)
    stats["chosen"] = SeqStat(stats["chosen"].logps, torch.ones(2))
    with pytest.raises(ValueError, match="role 'chosen' has logps of shape"):
        compute_loss(cfg, stats)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(name="solo_dpo"), "unknown loss name 'solo_dpo' (did you mean 'solo-dpo'?); known loss names: dpo, ipo"),
    (dict(name="kto"), "known loss names: dpo, ipo, simpo, orpo, sft, longpo, solo-dpo, solo-simpo, solo-orpo"),
    (dict(beta=-0.1), "beta must be > 0"),
    (dict(beta=0.0), "beta must be > 0"),
    (dict(beta=float("nan")), "beta must be a finite number"),
    (dict(beta="0.1"), "beta must be a finite number"),
    (dict(name="dpo", label_smoothing=0.5), "label_smoothing must be in [0, 0.5)"),
    (dict(name="dpo", label_smoothing=-0.1), "label_smoothing must be in [0, 0.5)"),
    (dict(name="simpo", label_smoothing=0.1), "has no effect on loss 'simpo'"),
    (dict(name="dpo", solopo_both=True), "solopo_both=True only applies to"),
    (dict(name="solo-dpo", solopo_both="yes"), "solopo_both must be true or false"),
    (dict(solopo_alpha=-1.0), "solopo_alpha must be >= 0"),
    (dict(longpo_lambda=-0.01), "longpo_lambda must be >= 0"),
    (dict(orpo_lambda=-1), "orpo_lambda must be >= 0"),
    (dict(simpo_gamma=-0.5), "simpo_gamma must be >= 0"),
    (dict(longpo_nll="response"), "longpo_nll must be one of sequence, responses"),
])
def test_config_errors(kwargs, msg):
    with pytest.raises(ValueError) as e:
        LossConfig(**kwargs)
    assert msg in str(e.value)


def test_config_defaults():
    c = LossConfig()
    assert (c.name, c.beta, c.label_smoothing, c.simpo_gamma, c.orpo_lambda, c.longpo_lambda,
            c.solopo_alpha, c.solopo_both) == ("longpo", 0.1, 0.0, 0.5, 0.1, 0.01, 1.0, False)
    assert c.longpo_nll == "sequence"  # the paper's LongPO


def test_empty_micro_batch():
    cfg = LossConfig("solo-dpo", solopo_both=True)
    empty = {r: SeqStat(torch.zeros(0, dtype=torch.float64), torch.zeros(0)) for r in ALL_ROLES}
    out = compute_loss(cfg, empty)
    assert out.loss.shape == (0,) and all(v.shape == (0,) for v in out.metrics.values())
