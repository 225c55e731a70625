"""tools/precompute_ref_logps.py on the CPU with SmolLM2 = log-probs computed with transformers
(fp32, per sequence), for every reference role of a LongPO and a SoLoPO dataset; the trainer
refuses a sidecar of another dataset."""
import json
from pathlib import Path

import pytest
import torch

from fixtures import ROOT, run_tool

pytestmark = pytest.mark.slow


def transformers_sums(model, sample, role):
    """Sum over the role's sequences of log p(token) at the scored (loss_mask) positions."""
    total, count = 0.0, 0
    for seq in sample.sequences(role):
        ids = torch.as_tensor(seq.tokens, dtype=torch.long).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits.double(), -1)[0]
        mask = torch.as_tensor(seq.loss_mask)
        for t in range(1, len(seq.tokens)):
            if mask[t]:
                total += logp[t - 1, ids[0, t]].item()
                count += 1
    return total, count


def sidecar_error(model, prefix):
    """(max |sidecar - transformers| over every sample and reference role of the dataset at
    `prefix`, the sidecar): `model` is the transformers reference model, in fp32."""
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.reference import load_ref_logps

    ds, ref = PairDataset(prefix), load_ref_logps(prefix)
    worst = 0.0
    for i in range(len(ds)):
        for role in ds.ref_roles:
            want, n = transformers_sums(model, ds.sample(i), role)
            got, got_n = ref.get(i, role)
            assert got_n == n
            worst = max(worst, abs(got - want))
    return worst, ref


@pytest.mark.parametrize("kind", ["longpo", "solopo"])
def test_sidecar_equals_transformers(kind, smollm2_dir, smollm2_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    prefix = tmp_path / kind
    run_tool(ROOT / "tools/preprocess_pairs.py", "--input", ROOT / f"megatron_longpo/resources/{kind}.jsonl", "--kind", kind,
             "--tokenizer", smollm2_dir, "--output", prefix, "--no-progress", "--workers", "1")
    r = run_tool(ROOT / "tools/precompute_ref_logps.py", "--data", prefix, "--model", smollm2_ckpt, "--samples-per-microbatch", "2")
    assert "reference log-probs of" in r.stdout
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    worst, _ = sidecar_error(model, prefix)
    print(f"{kind}: max |sidecar - transformers| per sequence sum = {worst:.2e}")
    assert worst <= 1e-3


def test_trainer_refuses_a_sidecar_of_another_dataset(smollm2_dir, tmp_path, tiny_llama_ckpt):
    import shutil

    from fixtures import build_dataset

    a = build_dataset(tmp_path / "a", "pair", 4, smollm2_dir, tiny_llama_ckpt) if (tmp_path / "a").mkdir() is None else None
    b = build_dataset(tmp_path / "b", "pair", 4, smollm2_dir, None, seed=1) if (tmp_path / "b").mkdir() is None else None
    shutil.copy(f"{a}.ref.safetensors", f"{b}.ref.safetensors")
    r = run_tool(ROOT / "tests/workers/train.py", f"model.checkpoint={tiny_llama_ckpt}", f"data.path={b}", "loss.name=dpo",
                 "data.global_batch_size=2", f"train.save_dir={tmp_path}/run", check=False, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "was computed for dataset" in r.stderr and "precompute_ref_logps" in r.stderr


LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2), "dp2": (1, 1)}


@pytest.fixture(scope="module")
def sidecars_at_layouts(tiny_llama_ckpt, tiny_longpo_data, module_tmp):
    """The sidecar scored at each layout by 2 gloo ranks, all in one launch: {layout: path}."""
    from mp import torchrun

    jobs = {name: {"data": str(tiny_longpo_data), "model": str(tiny_llama_ckpt), "out": str(module_tmp / f"ref-{name}.safetensors"),
                   "tp": tp, "pp": pp} for name, (tp, pp) in LAYOUTS.items()}
    spec = module_tmp / "jobs.json"
    spec.write_text(json.dumps(list(jobs.values())))
    torchrun(2, "precompute.py", "--many", spec, timeout=300)
    return {name: Path(job["out"]) for name, job in jobs.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sidecar_is_the_same_at_every_layout(layout, sidecars_at_layouts, tiny_longpo_data):
    """The fixture's sidecar was computed by one process; TP=2, PP=2 and DP=2 (2 gloo ranks) agree."""
    import numpy as np

    from megatron_longpo.data.reference import load_ref_logps

    a, b = load_ref_logps(tiny_longpo_data), load_ref_logps(tiny_longpo_data, path=sidecars_at_layouts[layout])
    for role in a.roles:
        assert np.array_equal(a.num_tokens[role], b.num_tokens[role])
        assert np.allclose(a.logp_sum[role], b.logp_sum[role], rtol=1e-5, atol=1e-4), role


def test_reference_sees_policy_gives_plain_dpo_on_longpo_data(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """--reference-sees-policy scores the policy's own (long) sequences: a DPO step that starts
    from the reference model has zero rewards, loss log 2, and the tokens the policy scores."""
    import json
    import math

    from megatron_longpo.data.reference import load_ref_logps

    out = tmp_path / "longref.safetensors"
    run_tool(ROOT / "tools/precompute_ref_logps.py", "--data", tiny_longpo_data, "--model", tiny_llama_ckpt, "--out", out,
             "--reference-sees-policy", "--dtype", "bf16")
    short, long = load_ref_logps(tiny_longpo_data), load_ref_logps(tiny_longpo_data, path=out)
    # bf16 was asked for; on the CPU it scores in fp32, and the sidecar says what ran
    assert long.computation["bf16"] is (torch.cuda.is_available())
    assert (long.num_tokens["ref_chosen"] == short.num_tokens["ref_chosen"]).all()  # the same answers are scored
    assert (long.logp_sum["ref_chosen"] != short.logp_sum["ref_chosen"]).any()  # in another context
    r = run_tool(ROOT / "tests/workers/train.py", f"model.checkpoint={tiny_llama_ckpt}", f"data.path={tiny_longpo_data}",
                 f"data.reference={out}", "loss.name=dpo", "data.global_batch_size=2", "train.steps=1",
                 "train.tensorboard=false", f"train.save_dir={tmp_path}/run", timeout=300)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    step = summary["steps"][0]
    assert abs(step["loss"] - math.log(2)) < 1e-4, (step["loss"], r.stdout[-1000:])
    assert abs(step["rewards/margins"]) < 1e-4


def test_reference_at_the_policys_rope_base_starts_dpo_at_log2(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """--rope-theta scores at another RoPE base than the checkpoint's: plain DPO whose reference is
    the initial policy at the enlarged base starts at loss log 2 with zero margin, and the reference
    at the checkpoint's own base scores other log-probs (so the override is what makes them equal)."""
    import json
    import math

    import numpy as np

    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.data.reference import load_ref_logps

    theta = 1e6
    assert ckpt.read_model_json(tiny_llama_ckpt)[0].rope_theta != theta
    for name, extra in (("policy_base", ["--rope-theta", str(theta)]), ("checkpoint_base", [])):
        out = tmp_path / f"{name}.safetensors"
        run_tool(ROOT / "tools/precompute_ref_logps.py", "--data", tiny_longpo_data, "--model", tiny_llama_ckpt,
                 "--out", out, "--reference-sees-policy", *extra)
        got = load_ref_logps(tiny_longpo_data, path=out).computation["rope_theta"]
        assert got == (theta if extra else ckpt.read_model_json(tiny_llama_ckpt)[0].rope_theta), got
    out = tmp_path / "policy_base.safetensors"
    run_tool(ROOT / "tests/workers/train.py", f"model.checkpoint={tiny_llama_ckpt}", f"data.path={tiny_longpo_data}",
             f"data.reference={out}", "loss.name=dpo", "data.global_batch_size=2", "train.steps=1",
             f"model.rope_theta={theta}", "train.tensorboard=false", f"train.save_dir={tmp_path}/run", timeout=300)
    step = json.loads((tmp_path / "run" / "summary.json").read_text())["steps"][0]
    assert abs(step["loss"] - math.log(2)) < 1e-4, step
    assert abs(step["rewards/margins"]) < 1e-4, step
    # the two references differ by the RoPE base alone (the tiny data's short distances keep it small)
    a, b = (load_ref_logps(tiny_longpo_data, path=tmp_path / f"{n}.safetensors") for n in ("policy_base", "checkpoint_base"))
    diff = max(float(np.abs(a.logp_sum[r] - b.logp_sum[r]).max()) for r in a.roles)
    assert diff > 1e-2, diff
    r = run_tool(ROOT / "tools/precompute_ref_logps.py", "--data", tiny_longpo_data, "--model", tiny_llama_ckpt,
                 "--rope-theta", "0", check=False)
    assert r.returncode == 2 and "--rope-theta must be positive" in r.stderr, r.stderr[-500:]


def test_a_sliding_window_shorter_than_the_data_is_refused(tiny_llama_ckpt, tiny_longpo_data, tmp_path):
    """Full causal attention past a Mistral sliding window computes another model: the trainer and
    the reference tool refuse before building it, naming the data key and the fix."""
    import json
    import shutil

    from megatron_longpo.data.format import PairDataset, longest_sequence, read_manifest

    longest = longest_sequence(read_manifest(tiny_longpo_data), ("chosen", "rejected"))
    ds = PairDataset(tiny_longpo_data)
    assert longest == max(len(s.tokens) for i in range(len(ds)) for r in ("chosen", "rejected")
                          for s in ds.sample(i).sequences(r)) > 0
    ckpt = tmp_path / "mistral"
    shutil.copytree(tiny_llama_ckpt, ckpt)
    meta = json.loads((ckpt / "model.json").read_text())
    window = min(longest, longest_sequence(ds.manifest, ds.ref_roles)) - 1  # LongPO's reference sees short contexts
    meta["arch"].update(architecture="mistral", sliding_window=window)
    (ckpt / "model.json").write_text(json.dumps(meta))
    r = run_tool(ROOT / "tests/workers/train.py", f"model.checkpoint={ckpt}", f"data.path={tiny_longpo_data}",
                 "data.global_batch_size=2", f"train.save_dir={tmp_path}/run", "train.steps=1", check=False, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "sliding-window attention (window" in r.stderr and f"the longest sequence of {tiny_longpo_data} (data.path) is {longest} tokens" in r.stderr
    assert f"--max-length {window}" in r.stderr
    r = run_tool(ROOT / "tools/precompute_ref_logps.py", "--data", tiny_longpo_data, "--model", ckpt,
                 "--out", tmp_path / "ref.safetensors", check=False, timeout=300)
    assert r.returncode != 0 and "sliding-window attention (window" in r.stderr and "--data" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "ref.safetensors").exists()
