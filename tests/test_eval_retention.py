"""Short-context retention (megatron_longpo/eval/retention.py): perplexity against a float64
cross-entropy over independently cut windows, and the QA scoring, one question per backend call."""

import math

import pytest
import torch

from megatron_longpo.eval.retention import QA_SYSTEM_SUFFIX, load_qa, perplexity, qa_accuracy


class CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).double().eval()


def test_perplexity_equals_transformers_loss_over_the_windows():
    model, tok = _tiny_llama(), CharTokenizer()
    texts = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(300)) for i in range(2)] + ["x"]  # "x": too short
    out = perplexity(model, tok, texts, window=128)
    nll, n = 0.0, 0
    for t in texts:
        ids = tok(t)["input_ids"]
        for s in range(0, len(ids), 128):
            piece = torch.tensor([ids[s : s + 128]])
            if piece.shape[1] < 2:
                continue
            with torch.no_grad():  # (transformers' own loss casts the logits to fp32: not a float64 reference)
                logits = model(input_ids=piece).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum").item()
            n += piece.shape[1] - 1
    assert out["tokens"] == n == 2 * (127 + 127 + 43)
    assert out["mean_nll"] == pytest.approx(nll / n, rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-12)
    with pytest.raises(ValueError, match="no text"):
        perplexity(model, tok, ["x"], window=128)


class ScriptedBackend:
    name = "scripted"

    def __init__(self, answers):
        self.answers, self.calls = answers, []

    def chat(self, conversations, params):
        self.calls.append(conversations)
        assert params.temperature == 0.0
        return [[self.answers[c[0]["content"]]] for c in conversations]


def test_qa_asks_one_question_per_call_and_scores_any_alias():
    items = [{"question": "Capital of France?", "answers": ["Paris"]},
             {"question": "2 + 3?", "answers": ["5", "five"]},
             {"question": "Largest planet?", "answers": ["Jupiter"]}]
    backend = ScriptedBackend({"Capital of France?" + QA_SYSTEM_SUFFIX: "It is paris.",
                               "2 + 3?" + QA_SYSTEM_SUFFIX: "Five",
                               "Largest planet?" + QA_SYSTEM_SUFFIX: "Saturn"})
    out = qa_accuracy(backend, items)
    assert [len(c) for c in backend.calls] == [1, 1, 1]
    assert [r["score"] for r in out["records"]] == [1.0, 1.0, 0.0]
    assert out["accuracy"] == pytest.approx(200 / 3) and out["n"] == 3


def test_the_shipped_qa_set_loads_and_a_bad_line_is_named(tmp_path):
    assert len(load_qa()) >= 10
    bad = tmp_path / "qa.jsonl"
    bad.write_text('{"question": "ok?", "answers": ["y"]}\n{"question": "no answers", "answers": []}\n')
    with pytest.raises(ValueError, match=r"qa.jsonl:2"):
        load_qa(bad)
