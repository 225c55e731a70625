"""Users' rows as they come: TRL's preference/SFT formats and renamed columns give exactly the
tokens of the equivalent native record (data/row_formats.py)."""

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_longpo.data.encoding import RecordEncoder
from megatron_longpo.data.records import (
    BAD_MESSAGES,
    MISSING_FIELD,
    RowError,
    parse_record,
)
from megatron_longpo.data.row_formats import parse_columns
from megatron_longpo.data.tokenizer import TokenizerSpec

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"
SYS = "You are a concise assistant."
Q, C, R = "What is the capital of Australia?", "Canberra, not Sydney.", "Sydney."
HIST = [{"role": "user", "content": "Tips for a haiku?"}, {"role": "assistant", "content": "Count 5-7-5."},
        {"role": "user", "content": "Give me one."}]


def U(t):
    return {"role": "user", "content": t}


def A(t):
    return {"role": "assistant", "content": t}


@pytest.fixture(scope="module")
def encoder(smollm2_dir):
    return RecordEncoder(TokenizerSpec(str(smollm2_dir), None, None, "spans").build(), "pair")


def _tokens(encoder, row, columns=None):
    enc = encoder.encode(parse_record("pair", row, columns))
    return [(t, a.tolist()) for t, a in enc.segments]


# (TRL-format row, the equivalent native row)
CASES = {
    "standard_explicit": ({"prompt": Q, "chosen": C, "rejected": R}, {"prompt": Q, "chosen": C, "rejected": R}),
    "standard_implicit": ({"chosen": "The sky on a clear day is blue.", "rejected": "The sky on a clear day is green."},
                          {"prompt": "The sky on a clear day is", "chosen": " blue.", "rejected": " green."}),
    "conversational_explicit": ({"prompt": [U(Q)], "chosen": [A(C)], "rejected": [A(R)]},
                                {"prompt": Q, "chosen": C, "rejected": R}),
    "conversational_explicit_system": ({"prompt": [{"role": "system", "content": SYS}, U(Q)], "chosen": [A(C)], "rejected": [A(R)]},
                                       {"system": SYS, "prompt": Q, "chosen": C, "rejected": R}),
    "conversational_explicit_history": ({"prompt": HIST, "chosen": [A(C)], "rejected": [A(R)]},
                                        {"messages": HIST, "chosen": C, "rejected": R}),
    "conversational_implicit": ({"chosen": [U(Q), A(C)], "rejected": [U(Q), A(R)]},
                                {"prompt": Q, "chosen": C, "rejected": R}),
    "conversational_implicit_history": ({"chosen": HIST + [A(C)], "rejected": HIST + [A(R)]},
                                        {"messages": HIST, "chosen": C, "rejected": R}),
    "sft_prompt_completion": ({"prompt": Q, "completion": C}, {"prompt": Q, "chosen": C, "rejected": C}),
    "sft_conversational_prompt_completion": ({"prompt": [U(Q)], "completion": [A(C)]},
                                             {"prompt": Q, "chosen": C, "rejected": C}),
    "sft_messages": ({"messages": HIST + [A(C)]}, {"messages": HIST, "chosen": C, "rejected": C}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trl_format_gives_the_native_tokens(encoder, name):
    trl, native = CASES[name]
    assert _tokens(encoder, trl) == _tokens(encoder, native)


def test_conversational_turns_are_the_chat_templates_tokens(encoder, smollm2_dir):
    """A multi-turn conversational row: the chosen sequence is apply_chat_template of the whole
    conversation, scored on the last assistant turn only (as the native `messages` path)."""
    from transformers import AutoTokenizer

    from megatron_longpo.data.schema import Seg, Segment, assemble

    enc = encoder.encode(parse_record("pair", {"chosen": HIST + [A(C)], "rejected": HIST + [A(R)]}))
    segs = [Segment(Seg(t), np.asarray(a)) for t, a in enc.segments]
    hf = AutoTokenizer.from_pretrained(str(smollm2_dir))
    for role, answer in (("chosen", C), ("rejected", R)):
        seq = assemble("pair", segs, role)[0]
        want = hf.apply_chat_template(HIST + [A(answer)], tokenize=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert seq.tokens.tolist() == list(want)
        scored = hf.decode(seq.tokens[seq.loss_mask])
        assert scored.startswith(answer) and "Count 5-7-5" not in scored


def test_column_mapping(encoder):
    cols = parse_columns("prompt=question,chosen=good,rejected=bad")
    row = {"question": Q, "good": C, "bad": R, "id": 7}
    assert _tokens(encoder, row, cols) == _tokens(encoder, {"prompt": Q, "chosen": C, "rejected": R})
    with pytest.raises(RowError, match="missing column 'good'") as e:
        parse_record("pair", {"question": Q, "bad": R}, cols)
    assert e.value.reason == MISSING_FIELD


def test_bad_trl_rows_name_the_field():
    with pytest.raises(RowError, match="exactly one assistant message") as e:
        parse_record("pair", {"prompt": [U(Q)], "chosen": [A(C), U("more")], "rejected": [A(R)]})
    assert e.value.reason == BAD_MESSAGES
    with pytest.raises(RowError, match="share no first message"):
        parse_record("pair", {"chosen": [U("a"), A(C)], "rejected": [U("b"), A(R)]})
    with pytest.raises(RowError, match="share no common start"):
        parse_record("pair", {"chosen": "yes", "rejected": "no"})


def test_example_files_preprocess(tmp_path, smollm2_dir):
    """Every examples/data file of a TRL format preprocesses with no row dropped, and each gives
    the tokens of its native counterpart (the same questions as examples in other formats)."""
    from megatron_longpo.data.format import PairDataset
    from megatron_longpo.data.preprocess import PreprocessConfig, run_preprocess

    def build(name, **kw):
        res = run_preprocess(PreprocessConfig([str(EXAMPLES / name)], "pair", str(tmp_path / name), progress=False,
                                              tokenizer=TokenizerSpec(str(smollm2_dir), None, None, "spans"), **kw))
        assert res.written and not res.drops, [d.detail for d in res.drops]
        ds = PairDataset(str(tmp_path / name))
        return [[s.tokens.tolist() for s in ds.sample(i).segments] for i in range(len(ds))]

    conv = build("trl_conversational.jsonl")
    assert build("trl_conversational_implicit.jsonl") == conv
    std = build("trl_standard.jsonl")
    assert std[:2] == conv[:1] + std[1:2] and std[0] == conv[0]
    assert build("renamed_columns.jsonl", columns=parse_columns("prompt=question,chosen=good,rejected=bad")) == std
    for name in ("trl_standard_implicit.jsonl", "sft_prompt_completion.jsonl", "sft_messages.jsonl"):
        assert len(build(name)) == sum(1 for line in (EXAMPLES / name).read_text().splitlines() if line.strip())
    rows = [json.loads(x) for x in (EXAMPLES / "sft_messages.jsonl").read_text().splitlines()]
    assert rows[0]["messages"][-1]["role"] == "assistant"
