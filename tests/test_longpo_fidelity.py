"""LongPO as the paper's reference code computes it (docs/methods.md §2), against the trainer, on the CPU.

The reference here is written from the formula alone, on a plain Hugging Face forward of each
UNPACKED sequence in float64 (no code of the package computes it):

    L_i = NLL_i + λ · -log σ(β [(log π_θ(y_w|x_L) - log π_ref(y_w|x_S)) - (log π_θ(y_l|x_L) - log π_ref(y_l|x_S))])
    NLL_i = mean over the n - 1 predicted tokens of the chosen long sequence [C_L; I_1; y_w,1; ...; y_w,n]
            (the reference code labels every input id; the model shifts them)
    log π(y|x) = the response tokens' log-probs summed over the turns; π_ref on the short contexts
    L = mean_i L_i over the global batch

The trainer runs one plain-SGD step (no clipping) on 2-turn samples; its first loss must equal L
and its weight update -lr · dL/dθ, read back through the Hugging Face export, in every layout:
several samples packed in one row, prefix-shared rows, TP=2, PP=2, DP=2 with two micro-batches
per rank, and CP=2 (prefix-shared: the only CPU path with CP). The random 4-layer Llama runs all
layouts, SmolLM2-135M-Instruct (a trained model) the one-process one.
"""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mp import torchrun

BETA, LAM, LR = 0.5, 1.0, 100.0  # λ = 1 so that the DPO term is not lost in the NLL's rounding


def _forward(model, tokens, mask):
    """(Σ_t log p(x_t | x_<t) over the tokens t >= 1 with mask[t] (the response tokens), the mean
    token NLL of every predicted token (HF's shifted cross-entropy)), float64."""
    x = torch.as_tensor(tokens, dtype=torch.long)[None]
    logits = model(x).logits[0, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, x[0, 1:, None])[:, 0]
    return (logp * torch.as_tensor(mask[1:], dtype=torch.float64)).sum(), F.cross_entropy(logits, x[0, 1:])


def _hf(path):
    """The Hugging Face model in float64, with the gradient of every embedding row: transformers
    builds `embed_tokens` as nn.Embedding(padding_idx=config.pad_token_id), whose backward drops the
    input gradient of that row. SmolLM2's pad_token_id is 2, its <|im_end|>, a real token of every
    chat turn: with padding_idx the reference's tied embedding gradient was 4.8e-2 off the trainer's
    (row 2 alone; 2.5e-6 without it). The trainer differentiates the loss, so the reference must too."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, attn_implementation="eager")
    model.get_input_embeddings().padding_idx = None
    return model


def reference_loss_and_grads(policy_dir, ref_dir, data, indices, nll="sequence"):
    """(L, {HF name: dL/dθ}) of the formula above, float64 (one sample's graph at a time: the
    gradient of the mean is accumulated sample by sample)."""
    from megatron_longpo.data.format import PairDataset  # the token sequences are the input

    ds = PairDataset(data)
    policy, ref = _hf(policy_dir), _hf(ref_dir)
    loss = 0.0
    for i in indices:
        s = ds.sample(i)
        (cw,), (cl,) = s.sequences("chosen"), s.sequences("rejected")
        with torch.no_grad():
            ref_w = sum(_forward(ref, q.tokens, q.loss_mask)[0] for q in s.sequences("ref_chosen"))
            ref_l = sum(_forward(ref, q.tokens, q.loss_mask)[0] for q in s.sequences("ref_rejected"))
        (lw, seq_nll), (ll, _) = _forward(policy, cw.tokens, cw.loss_mask), _forward(policy, cl.tokens, cl.loss_mask)
        nll_i = seq_nll if nll == "sequence" else -lw / float(cw.loss_mask[1:].sum())
        loss_i = (nll_i - LAM * F.logsigmoid(BETA * ((lw - ref_w) - (ll - ref_l)))) / len(indices)
        loss_i.backward()
        loss += loss_i.item()
    return loss, {n: p.grad.detach().clone() for n, p in policy.named_parameters()}


def _global_batch(data, gbs):
    """The sample indices of the trainer's first global batch (its sampler, default seed)."""
    from megatron_longpo.config import load_config
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.sampler import PairSampler

    seed = load_config(None).data.seed
    sampler = PairSampler(len(PairDataset(data)), gbs, 1, dp_size=1, dp_rank=0, seed=seed)
    return sorted(i for mb in sampler.next_global_batch() for i in mb)


def one_step_overrides(ckpt, data, save_dir, lr=LR, **kw) -> list[str]:
    """One plain-SGD step of the trainer (no clipping)."""
    base = {"model.checkpoint": ckpt, "data.path": data, "train.save_dir": save_dir, "train.tensorboard": "false",
            "data.global_batch_size": 4, "data.samples_per_microbatch": 1, "train.steps": 1, "optim.name": "sgd",
            "optim.lr": lr, "optim.warmup_fraction": 0, "optim.clip_grad": 0.0, "loss.name": "longpo",
            "loss.longpo_lambda": LAM, "loss.beta": BETA, **kw}
    return [f"{k}={v}" for k, v in base.items()]


def train_steps(nproc, runs: dict, tmp) -> dict:
    """{name: overrides} trained one after another in ONE launch of `nproc` ranks (tests/workers/
    train_many.py), each exported to Hugging Face in fp32: {name: (first loss, exported weights)}."""
    from megatron_longpo.checkpoint.export import megatron_to_hf_checkpoint

    spec = tmp / f"runs{nproc}.json"
    spec.write_text(json.dumps(list(runs.values())))
    torchrun(nproc, "train_many.py", spec, timeout=600)
    out = {}
    for name, overrides in runs.items():
        save = next(o.split("=", 1)[1] for o in overrides if o.startswith("train.save_dir="))
        summary = json.loads((tmp / save / "summary.json").read_text())
        megatron_to_hf_checkpoint(save, f"{save}-hf", dtype="fp32")
        out[name] = summary["first_loss"], _hf_weights(Path(f"{save}-hf"))
    return out


def _hf_weights(d):
    from safetensors.torch import load_file

    w = {}
    for f in sorted(d.glob("*.safetensors")):
        w.update(load_file(str(f)))
    return w


def check_step(loss, after, before, ref_loss, ref_grads, tol_loss=1e-5, tol_grad=1e-4, lr=LR):
    assert abs(loss - ref_loss) <= tol_loss * abs(ref_loss), (loss, ref_loss)
    diff2 = ref2 = 0.0
    worst = ("", 0.0)
    for name, g_ref in ref_grads.items():
        if name not in after:  # a tied output layer: exported once, as the embedding
            continue
        g = (before[name].double() - after[name].double()) / lr
        diff2 += (g - g_ref).pow(2).sum().item()
        ref2 += g_ref.pow(2).sum().item()
        rel = ((g - g_ref).norm() / g_ref.norm()).item()
        worst = max(worst, (name, rel), key=lambda x: x[1])
        assert rel <= 10 * tol_grad, f"{name}: gradient differs by {rel:.2e} (relative)"
    whole = (diff2 / ref2) ** 0.5
    print(f"loss {loss!r} vs reference {ref_loss!r} (rel {abs(loss - ref_loss) / abs(ref_loss):.2e}); "
          f"gradient rel {whole:.2e}, worst tensor {worst[1]:.2e} ({worst[0]})")
    assert whole <= tol_grad, f"whole gradient differs by {whole:.2e}"


@pytest.fixture(scope="module")
def tiny_hf(tiny_llama_ckpt):
    return tiny_llama_ckpt.parent / "hf"  # conftest: the HF model the checkpoint was converted from


@pytest.fixture(scope="module")
def tiny_reference(tiny_hf, tiny_longpo_data):
    idx = _global_batch(tiny_longpo_data, 4)
    seq = reference_loss_and_grads(tiny_hf, tiny_hf, tiny_longpo_data, idx, "sequence")
    resp = reference_loss_and_grads(tiny_hf, tiny_hf, tiny_longpo_data, idx, "responses")
    # the test can fail: the two modes are 100x the tolerances below apart, in the loss and the gradient
    assert abs(seq[0] - resp[0]) > 100 * 1e-5 * abs(seq[0]), (seq[0], resp[0])
    d2 = sum((seq[1][n] - resp[1][n]).pow(2).sum().item() for n in seq[1])
    assert (d2 / sum(g.pow(2).sum().item() for g in seq[1].values())) ** 0.5 > 100 * 1e-4
    return {"sequence": seq, "responses": resp}


LAYOUTS = {
    "packed_2_samples_per_row": (1, {"data.samples_per_microbatch": 2}),
    "prefix_shared": (1, {"data.share_prefix": "true"}),
    "tp2": (2, {"parallel.tensor_parallel": 2}),
    "pp2": (2, {"parallel.pipeline_parallel": 2}),
    "dp2_two_microbatches": (2, {}),
    "cp2_prefix_shared": (2, {"data.share_prefix": "true", "parallel.context_parallel": 2}),
}


SMOLLM2_LR = 1e6  # the update dominates the weights, so fp32 rounding cannot hide in it


@pytest.fixture(scope="module")
def steps(tiny_llama_ckpt, tiny_longpo_data, smollm2_ckpt, module_tmp):
    """Every trainer step the tests below check, from two launches (the one-process runs; the
    2-rank layouts): {name: (first loss, exported HF weights)}."""
    one, two = {}, {}
    for name, (nproc, kw) in LAYOUTS.items():
        (one if nproc == 1 else two)[name] = one_step_overrides(tiny_llama_ckpt, tiny_longpo_data, module_tmp / name, **kw)
    # longpo_nll=responses: the NLL over the chosen responses only (prefix-shared, so the trunk skip is on again)
    one["responses"] = one_step_overrides(tiny_llama_ckpt, tiny_longpo_data, module_tmp / "responses",
                                          **{"loss.longpo_nll": "responses", "data.share_prefix": "true"})
    one["smollm2"] = one_step_overrides(smollm2_ckpt, tiny_longpo_data, module_tmp / "smollm2", lr=SMOLLM2_LR,
                                        **{"data.samples_per_microbatch": 2})
    return {**train_steps(1, one, module_tmp), **train_steps(2, two, module_tmp)}


@pytest.mark.slow
@pytest.mark.budget(300, reason="the first layout runs the fixture: 9 trainer steps in two launches and their "
                    "exports; 162 s in the 2-worker CI run")
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_longpo_step_equals_the_reference_formula(layout, steps, tiny_hf, tiny_reference):
    loss, after = steps[layout]
    check_step(loss, after, _hf_weights(tiny_hf), *tiny_reference["sequence"])


@pytest.mark.slow
def test_responses_ablation_equals_its_formula(steps, tiny_hf, tiny_reference):
    """longpo_nll=responses: the NLL over the chosen responses only (prefix-shared, so the trunk
    skip is on again)."""
    loss, after = steps["responses"]
    check_step(loss, after, _hf_weights(tiny_hf), *tiny_reference["responses"])


@pytest.mark.slow
@pytest.mark.budget(300, reason="the float64 transformers reference of SmolLM2's LongPO gradient, one sample's graph "
                    "at a time; 152 s in the 2-worker CI run")
def test_smollm2_step_equals_the_reference_formula(steps, smollm2_dir, tiny_llama_ckpt, tiny_longpo_data):
    """A trained model (SmolLM2-135M-Instruct, tied embeddings, pad_token_id = <|im_end|>) as the
    policy; the data's reference statistics came from the tiny Llama, which is the reference model
    here too. The embedding's gradient holds both uses of the tied weight and the input gradient of
    <|im_end|> (see _hf)."""
    idx = _global_batch(tiny_longpo_data, 4)
    ref_loss, ref_grads = reference_loss_and_grads(smollm2_dir, tiny_llama_ckpt.parent / "hf", tiny_longpo_data, idx)
    loss, after = steps["smollm2"]
    assert "lm_head.weight" not in ref_grads and "model.embed_tokens.weight" in after  # the tied weight is compared
    check_step(loss, after, _hf_weights(smollm2_dir), ref_loss, ref_grads, lr=SMOLLM2_LR)


def test_step_statistics_and_the_responses_mode_bit_for_bit(tiny_longpo_data):
    """On one packed micro-batch and arbitrary token log-probs (CPU, padded path): asking for the
    whole-sequence statistic leaves the response sums bit-identical; chosen_sequence is the sum of
    the first n - 1 positions of each chosen sequence; longpo_nll=responses gives exactly the loss
    written as before the option (-mean(chosen) + λ·DPO from the same sums)."""
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.packing import pack
    from megatron_longpo.losses import LossConfig, SeqStat, dpo_loss
    from megatron_longpo.training.batch import prepare_batch
    from megatron_longpo.training.step import loss_from_token_logprobs, sequence_statistics

    ds = PairDataset(tiny_longpo_data)
    samples = [ds.sample(1), ds.sample(4)]
    packed = pack(samples, ("chosen", "rejected"))
    ref = {r: SeqStat(torch.tensor([-40.0, -55.0]), torch.tensor([20.0, 30.0])) for r in ("ref_chosen", "ref_rejected")}
    old = prepare_batch(packed, ref, thd=False)
    new = prepare_batch(packed, ref, thd=False, sequence_roles=("chosen",))
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(old.loss_mask.shape, generator=g, dtype=torch.float32) * 5
    s_old, s_new = sequence_statistics(logp, old), sequence_statistics(logp, new)
    assert set(s_old) == {"chosen", "rejected"} and set(s_new) == {"chosen", "rejected", "chosen_sequence"}
    for r in s_old:
        assert torch.equal(s_old[r].logps, s_new[r].logps) and torch.equal(s_old[r].tokens, s_new[r].tokens)
    for b, sample in enumerate(samples):
        i = packed.seq_role.index("chosen") + 2 * b
        n = len(sample.sequences("chosen")[0])
        assert s_new["chosen_sequence"].tokens[b] == n - 1
        torch.testing.assert_close(s_new["chosen_sequence"].logps[b], logp[i, :n - 1].double().sum())
    cfg = LossConfig("longpo", beta=0.5, longpo_lambda=0.3, longpo_nll="responses")
    loss, count, _ = loss_from_token_logprobs(logp, old, cfg)
    dpo = dpo_loss(s_old["chosen"], s_old["rejected"], ref["ref_chosen"], ref["ref_rejected"], beta=0.5)
    assert torch.equal(loss, (-s_old["chosen"].mean + 0.3 * dpo.loss).sum()) and int(count) == 2
    seq_loss, _, metrics = loss_from_token_logprobs(logp, new, LossConfig("longpo", beta=0.5, longpo_lambda=0.3))
    want = (-s_new["chosen_sequence"].mean + 0.3 * dpo.loss).sum()
    torch.testing.assert_close(seq_loss, want, rtol=1e-6, atol=0)
    assert "logps/chosen_sequence" in metrics
