"""examples/longpo_iterative/experiment.yaml on the CPU (`tools/experiment.py ... --profile tiny`): two
LongPO rounds, 512 -> 1024 tokens, with a random 2-layer Llama (SmolLM2 tokenizer) as pi_S. Round 2's generator, initial policy and
reference are round 1's export; every export declares the RoPE base and the length its round
trained at; each reference sidecar is what transformers computes with that round's pi_S."""
import json
import math
import os
import sys
import time

import pytest
import torch

from fixtures import ROOT, run_captured, run_tool, tiny_hf_model
from test_reference_logps import sidecar_error

pytestmark = pytest.mark.slow

L1, THETA0, FACTOR = 512, 10000.0, 10.0


def question_writing_llama(out, smollm2_dir):
    """tiny_hf_model (a random 2-layer Llama, hidden 64, SmolLM2 tokenizer) whose sampled text holds
    a "?" every ~20 tokens, so that tools/build_longpo_pairs.py parses questions from it: every
    embedding gets a constant 0.5 in dimension 0, which survives the small random layers and the
    final norm, and the output row of "?" reads only that dimension (logit ~5.5 over ~0 elsewhere).
    Answers are sampled too (pairs.answer_temperature): greedy decoding would write only "?". The query
    and key projections are 8x larger, so that attention is sharp and the RoPE base changes the
    log-probs (by ~1e-2 per sequence between 1e4 and 1e5, against ~3e-5 between Megatron and
    transformers at the same base)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny_hf_model(out, smollm2_dir, "llama", layers=2, random_norms=False, max_position_embeddings=256, rope_theta=THETA0)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    q = AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("?")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] += 0.5
        model.lm_head.weight[q] = 0.0
        model.lm_head.weight[q, 0] = 0.72
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 8
            layer.self_attn.k_proj.weight *= 8
    model.save_pretrained(out)
    return out


def hf_tensors(d):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def sidecar_matches(prefix, hf_dir, rope_theta=None):
    """max |sidecar - transformers| over every sample and reference role, transformers loading
    hf_dir (at its own RoPE base unless rope_theta is given)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(hf_dir)
    if rope_theta is not None:
        cfg.rope_parameters["rope_theta"] = rope_theta
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=cfg, dtype=torch.float32).eval()
    return sidecar_error(model, prefix)


@pytest.mark.budget(480, reason="two whole rounds of the recipe (generate, import, preprocess, reference, train, "
                    "export; twice); 182 s on the 2-core CI machine")
def test_two_rounds_on_the_cpu(smollm2_dir, tmp_path):
    pi_s = question_writing_llama(tmp_path / "pi_s", smollm2_dir)
    w = tmp_path / "w"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.time()
    r = run_captured([sys.executable, ROOT / "tools/experiment.py", ROOT / "examples/longpo_iterative/experiment.yaml",
                      "--profile", "tiny", "--workdir", w,
                      "--set", f"model={pi_s}", "pairs.answer_temperature=0.7",
                      "train.overrides=[optim.lr=1e-3]"],  # 2 steps must move the weights visibly (checked below)
                     env=env, cwd=ROOT, timeout=1500)
    elapsed = time.time() - t0
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    stages = [l for l in r.stdout.splitlines() if l.startswith("== ")]
    print(f"\ntiny two-round run: {elapsed:.0f} s\n" + "\n".join(stages))

    r1, r2 = w / "round1", w / "round2"
    # each export declares the RoPE base and the length its round trained at, and transformers reads them
    from transformers import AutoConfig

    for rd, theta, length in ((r1, THETA0 * FACTOR, L1), (r2, THETA0 * FACTOR**2, 2 * L1)):
        cfg = json.loads((rd / f"hf_{rd.name}" / "config.json").read_text())
        assert (cfg["rope_theta"], cfg["max_position_embeddings"]) == (theta, length), (rd.name, cfg)
        loaded = AutoConfig.from_pretrained(rd / f"hf_{rd.name}")
        assert (loaded.rope_parameters["rope_theta"], loaded.max_position_embeddings) == (theta, length)
        summary = json.loads((rd / "train" / "summary.json").read_text())
        assert summary["steps_run"] == 2 and summary["skipped_nonfinite"] == 0
        assert all(math.isfinite(x) for x in summary["losses"]), summary["losses"]

    # round 2's initial policy / reference is round 1's export, bit for bit; round 1 moved the weights
    run_tool(ROOT / "tools/convert_checkpoint.py", "megatron-to-hf", "--megatron-dir", r2 / "init", "--out", tmp_path / "r2_init_hf")
    exported, again, base = hf_tensors(r1 / "hf_round1"), hf_tensors(tmp_path / "r2_init_hf"), hf_tensors(pi_s)
    assert exported.keys() == again.keys() == base.keys()
    assert all(torch.equal(exported[k], again[k]) for k in exported)
    moved = max((exported[k].float() - base[k].float()).abs().max().item() for k in exported)
    assert moved > 1e-4, "round 1 did not change the weights: the test could not tell pi_S from round 1's model"

    # the generators: pi_S in round 1, round 1's export in round 2
    for rd, name in ((r1, "pi_s"), (r2, "hf_round1")):
        rows = [json.loads(l) for l in (rd / "pairs.jsonl").read_text().splitlines()]
        assert rows and {row["meta"]["generator"] for row in rows} == {f"transformers:{name}"}

    # the references: round 1 = pi_S at its own base 1e4; round 2 = round 1's export at ITS base 1e5
    for rd, ref_hf, theta in ((r1, pi_s, THETA0), (r2, r1 / "hf_round1", THETA0 * FACTOR)):
        worst, ref = sidecar_matches(rd / "data", ref_hf)
        print(f"{rd.name}: max |sidecar - transformers({ref_hf.name})| = {worst:.2e}")
        assert worst <= 1e-3
        assert ref.computation["rope_theta"] == theta and ref.reference_model == str(rd / "init")
    # and the comparison tells the bases apart: round 1's model at pi_S's base gives other numbers
    wrong_base, _ = sidecar_matches(r2 / "data", r1 / "hf_round1", rope_theta=THETA0)
    print(f"round2 against round 1's model at pi_S's base 1e4: {wrong_base:.2e}")
    assert wrong_base > 10 * worst, (wrong_base, worst)
