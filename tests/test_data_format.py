"""Tokens in = tokens out: every role sequence read back equals the chat template's tokens of the
same conversation (SmolLM2, and a SentencePiece model trained here), with the loss mask exactly
on the response tokens and the end-of-turn token after them."""

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.data.format import PairDataset, read_manifest
from megatron_longpo.data.schema import FormatError, Seg
from megatron_longpo.data.preprocess import PreprocessConfig, run_preprocess
from megatron_longpo.data.tokenizer import TokenizerSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "megatron_longpo" / "resources"
TEMPLATE = "{context}\n\n{instruction}"

# rows that stress the boundaries: unicode, braces, special-token-looking text, spaces, newlines
TRICKY_PAIRS = [
    {"prompt": "Format {x} as JSON: {\"a\": 1}", "chosen": " {\"x\": 1}  ", "rejected": "x=1\n"},
    {"system": "", "prompt": "Übersetze: 東京は大きい。", "chosen": "Tokyo is big. 🗼", "rejected": "Tokio\n\nist groß."},
    {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?\n"}],
     "chosen": "6", "rejected": "It is 7, I think."},
]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)


def _rows(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _preprocess(tmp, inputs, kind, spec, **kw):
    cfg = PreprocessConfig(inputs=inputs, kind=kind, output=str(tmp / kind), tokenizer=spec, progress=False, **kw)
    res = run_preprocess(cfg)
    assert res.written and res.exit_code == 0, res.drops
    return PairDataset(res.prefix), res


def _system(r):
    return [{"role": "system", "content": r["system"]}] if r.get("system") is not None else []


def expected_conversations(kind, r):
    """role -> list of message lists, written independently of the package."""
    ctx = lambda c, i: TEMPLATE.format(context=c, instruction=i)  # noqa: E731
    sys_ = _system(r)
    if kind == "pair":
        prompt = r["messages"] if "messages" in r else sys_ + [{"role": "user", "content": r["prompt"]}]
        c = prompt + [{"role": "assistant", "content": r["chosen"]}]
        j = prompt + [{"role": "assistant", "content": r["rejected"]}]
        return {"chosen": [c], "rejected": [j], "ref_chosen": [c], "ref_rejected": [j]}
    if kind == "solopo":
        out = {}
        for name, context in (("", r["short_context"]), ("long_", r["long_context"])):
            for side in ("chosen", "rejected"):
                msgs = sys_ + [{"role": "user", "content": ctx(context, r["instruction"])},
                               {"role": "assistant", "content": r[side]}]
                out[f"{name}{side}"] = [msgs]
                out[f"ref_{name}{side}"] = [msgs]
        return out
    out = {}
    for side in ("chosen", "rejected"):
        msgs = list(sys_)
        for k, t in enumerate(r["turns"]):
            msgs.append({"role": "user", "content": ctx(r["long_context"], t["instruction"]) if k == 0 else t["instruction"]})
            msgs.append({"role": "assistant", "content": t[side]})
        out[side] = [msgs]
        out[f"ref_{side}"] = [
            sys_ + [{"role": "user", "content": ctx(t["short_context"], t["instruction"])},
                    {"role": "assistant", "content": t[side]}]
            for t in r["turns"]
        ]
    return out


def scored_turns(kind, messages):
    """Indices of the scored assistant messages: a pair's history is prompt, only its last
    answer is scored; LongPO scores every turn."""
    answers = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    return answers if kind == "longpo" else answers[-1:]


def expected_mask(hf, messages, ids, scored):
    """ChatML: each scored assistant turn's tokens from the end of its generation prompt up to
    and including the next <|im_end|>."""
    im_end = hf.convert_tokens_to_ids("<|im_end|>")
    mask = np.zeros(len(ids), dtype=bool)
    for k in scored:
        start = len(hf.apply_chat_template(messages[:k], add_generation_prompt=True, tokenize=True)["input_ids"])
        end = ids.index(im_end, start)
        mask[start : end + 1] = True
    return mask


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def datasets(module_tmp, smollm2_dir):
    tmp = module_tmp
    spec = TokenizerSpec(hf_dir=str(smollm2_dir))
    pairs = _write_jsonl(tmp / "pairs.jsonl", _rows(EXAMPLES / "pairs.jsonl") + TRICKY_PAIRS)
    out = {}
    for kind, path in (("pair", pairs), ("longpo", str(EXAMPLES / "longpo.jsonl")), ("solopo", str(EXAMPLES / "solopo.jsonl"))):
        ds, _ = _preprocess(tmp, [path], kind, spec)
        out[kind] = (ds, _rows(path))
    return out


@pytest.mark.parametrize("kind", ["pair", "longpo", "solopo"])
def test_tokens_in_equal_tokens_out(kind, datasets, hf):
    ds, rows = datasets[kind]
    assert len(ds) == len(rows)
    for i, r in enumerate(rows):
        sample = ds.sample(i)
        assert sample.index == i and sample.roles == ds.roles
        for role, convs in expected_conversations(kind, r).items():
            seqs = sample.sequences(role)
            assert len(seqs) == len(convs), (i, role)
            for seq, msgs in zip(seqs, convs):
                ids = hf.apply_chat_template(msgs, tokenize=True)["input_ids"]
                assert seq.tokens.dtype == np.int64 and seq.loss_mask.dtype == bool
                assert seq.tokens.tolist() == ids, (i, role)
                scored = scored_turns(kind, msgs)
                np.testing.assert_array_equal(seq.loss_mask, expected_mask(hf, msgs, ids, scored), err_msg=f"{i} {role}")
                # the masked tokens are the responses, each with its end-of-turn token
                answers = [msgs[k]["content"] for k in scored]
                assert hf.decode(seq.tokens[seq.loss_mask]) == "".join(a + "<|im_end|>" for a in answers)


def test_each_piece_is_stored_once(datasets):
    ds, rows = datasets["longpo"]
    s = ds.sample(0)
    types = [seg.type for seg in s.segments]
    n = len(rows[0]["turns"])
    assert types.count(Seg.LONG_PROMPT) == 1 and types.count(Seg.SHORT_PROMPT) == n
    assert types.count(Seg.CHOSEN) == n and types.count(Seg.REJECTED) == n and types.count(Seg.TURN) == n - 1
    stored = s.stored_tokens
    in_roles = sum(len(q) for role in s.roles for q in s.sequences(role))
    assert stored < in_roles
    # the long prompt opens both long sequences but is stored once
    long_prompt = s.segments[0].tokens
    for role in ("chosen", "rejected"):
        assert s.sequences(role)[0].tokens[: len(long_prompt)].tolist() == long_prompt.tolist()
    m = ds.manifest
    assert m["tokens"]["stored"] < m["tokens"]["in_role_sequences"]
    sol, _ = datasets["solopo"]
    assert [seg.type for seg in sol.sample(0).segments] == [Seg.SHORT_PROMPT, Seg.LONG_PROMPT, Seg.CHOSEN, Seg.REJECTED, Seg.TAIL]


def test_unknown_role_names_kind_and_roles(datasets):
    ds, _ = datasets["pair"]
    with pytest.raises(ValueError, match=r"'pair'.*chosen, rejected, ref_chosen, ref_rejected"):
        ds.sample(0).sequences("long_chosen")
    lp, _ = datasets["longpo"]
    with pytest.raises(ValueError, match="longpo"):
        lp.sample(0).sequences("ref_long_chosen")


def test_manifest_contents(datasets, smollm2_dir):
    ds, rows = datasets["longpo"]
    m = read_manifest(ds.prefix)
    assert m["format_version"] == 1 and m["kind"] == "longpo" and m["num_samples"] == len(rows)
    assert m["tokenizer"]["name"] == "SmolLM2-135M-Instruct" and m["tokenizer"]["hash"].startswith("sha256:")
    assert "<|im_start|>" in m["chat_template"] and m["context_template"] == TEMPLATE
    assert m["token_dtype"] == "uint16"
    assert m["dataset_hash"].startswith("sha256:") and m["files"]["bin_bytes"] == os.path.getsize(ds.prefix + ".bin")
    lengths = m["lengths"]
    assert set(lengths) == {"chosen", "rejected", "ref_chosen", "ref_rejected"}
    turns = sum(len(r["turns"]) for r in rows)
    assert lengths["ref_chosen"]["count"] == turns and lengths["chosen"]["count"] == len(rows)
    real = [len(ds.sample(i).sequences("chosen")[0]) for i in range(len(ds))]
    assert lengths["chosen"]["max"] == max(real) and lengths["chosen"]["p50"] == float(np.percentile(real, 50))
    # the same tokenizer loaded twice has the same hash; the template is part of it
    spec = TokenizerSpec(hf_dir=str(smollm2_dir))
    assert spec.build().fingerprint() == m["tokenizer"]["hash"]


def test_reader_refuses_mismatched_files(tmp_path, datasets):
    ds, _ = datasets["pair"]
    prefix = tmp_path / "copy"
    for ext in (".bin", ".idx", ".json"):
        (tmp_path / f"copy{ext}").write_bytes(Path(ds.prefix + ext).read_bytes())
    copy = PairDataset(prefix, verify_hash=True)  # an exact copy is fine
    import pickle

    again = pickle.loads(pickle.dumps(copy))  # DataLoader workers get a reopened dataset
    assert again.sample(1).sequences("chosen")[0].tokens.tolist() == ds.sample(1).sequences("chosen")[0].tokens.tolist()
    data = bytearray((tmp_path / "copy.bin").read_bytes())
    data[5] ^= 1  # same size, other content
    (tmp_path / "copy.bin").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="hashes"):
        PairDataset(prefix, verify_hash=True)
    (tmp_path / "copy.bin").write_bytes(bytes(data) + b"\0\0")
    with pytest.raises(FormatError, match="do not belong together"):
        PairDataset(prefix)
    with pytest.raises(FormatError, match="preprocess_pairs"):
        PairDataset(tmp_path / "nothing")


def _train_sentencepiece(path):
    import sentencepiece as spm

    words = ("the harbour ledger ship wool fire archive volume chairman year trade city north port "
             "copied public record ten forty answer question text said was were of in to a").split()
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) + "." for _ in range(3000)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path), vocab_size=480, model_type="bpe",
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2,
    )
    return f"{path}.model"


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    model = _train_sentencepiece(tmp_path / "sp")
    (tmp_path / "chatml.jinja").write_text(CHATML)
    spec = TokenizerSpec(sentencepiece=model, chat_template_file=str(tmp_path / "chatml.jinja"))
    ds, _ = _preprocess(tmp_path, [str(EXAMPLES / "longpo.jsonl")], "longpo", spec)
    assert ds.manifest["tokenizer"]["family"] == "sentencepiece"
    tok = spec.build()
    sp = spm.SentencePieceProcessor(model_file=model)
    end = sp.piece_to_id("<|im_end|>")
    for i, r in enumerate(_rows(EXAMPLES / "longpo.jsonl")):
        for role, convs in expected_conversations("longpo", r).items():
            for seq, msgs in zip(ds.sample(i).sequences(role), convs):
                text = tok.render(msgs)
                # the wrapper's reference is SentencePiece's own encoding of the whole text
                assert tok.encode(text) == sp.encode(text)
                assert seq.tokens.tolist() == sp.encode(text), (i, role)
                answers = [m["content"] for m in msgs if m["role"] == "assistant"]
                masked = seq.tokens[seq.loss_mask].tolist()
                assert masked.count(end) == len(answers) and masked[-1] == end
                assert sp.decode([t for t in masked if t != end]) == "".join(answers)


def _metaspace_first_tokenizer(path):
    """A BPE whose Metaspace pre-tokenizer adds '▁' only at the very start of the input
    (prepend_scheme="first"): text between special tokens does NOT tokenize the same alone."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = "the harbour ledger ship wool fire archive volume answer question text".split()
    rng = random.Random(0)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tk.train_from_iterator(
        [" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)],
        trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                            initial_alphabet=list("abcdefghijklmnopqrstuvwxyz\n.?")),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>")
    hf.chat_template = CHATML
    hf.save_pretrained(path)
    return hf


def test_tokenizer_that_is_not_span_safe_is_refused_and_whole_mode_is_exact(tmp_path):
    from megatron_longpo.data.preprocess import PreprocessError

    hf = _metaspace_first_tokenizer(tmp_path / "tok")
    rows = [{"prompt": "the ship wool?", "chosen": "the harbour ledger.", "rejected": "fire."},
            {"system": "answer", "prompt": "question text", "chosen": "volume archive", "rejected": "the text"}]
    src = _write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(PreprocessError, match="--tokenization whole"):
        _preprocess(tmp_path, [src], "pair", TokenizerSpec(hf_dir=str(tmp_path / "tok")))
    ds, _ = _preprocess(tmp_path, [src], "pair", TokenizerSpec(hf_dir=str(tmp_path / "tok"), mode="whole"))
    assert ds.manifest["tokenizer"]["tokenization"] == "whole"
    end = hf.convert_tokens_to_ids("<|im_end|>")
    for i, r in enumerate(rows):
        for role, [msgs] in expected_conversations("pair", r).items():
            [seq] = ds.sample(i).sequences(role)
            ids = hf.apply_chat_template(msgs, tokenize=True)["input_ids"]
            assert seq.tokens.tolist() == ids, (i, role)
            start = len(hf.apply_chat_template(msgs[:-1], add_generation_prompt=True, tokenize=True)["input_ids"])
            want = np.zeros(len(ids), dtype=bool)
            want[start : ids.index(end, start) + 1] = True
            np.testing.assert_array_equal(seq.loss_mask, want)
