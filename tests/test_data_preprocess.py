"""tools/preprocess_pairs.py: bad rows reported with their line numbers, exit codes, the
over-length policy, Parquet and `datasets` inputs, worker-count independence."""

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_longpo.data.format import PairDataset
from megatron_longpo.data.preprocess import (
    EXIT_DROPPED,
    EXIT_ERROR,
    EXIT_OK,
    PreprocessConfig,
    PreprocessError,
    run_preprocess,
)
from megatron_longpo.data.tokenizer import TokenizerSpec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "megatron_longpo" / "resources"


def _load_cli():
    spec = importlib.util.spec_from_file_location("preprocess_pairs_cli", REPO / "tools" / "preprocess_pairs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


cli = _load_cli()

GOOD = {"prompt": "Name a prime number.", "chosen": "7 is prime.", "rejected": "9 is prime."}
LONG = {"prompt": "word " * 400, "chosen": "ok", "rejected": "no"}

# (line text, expected reason or None for kept); line numbers are 1-based
BAD_FILE = [
    (json.dumps(GOOD), None),  # 1
    ('{"prompt": "x", "chosen": ', "malformed_json"),  # 2
    (json.dumps({"prompt": "x", "chosen": "y"}), "missing_field"),  # 3
    (json.dumps({"prompt": "x", "chosen": ["y"], "rejected": "z"}), "wrong_type"),  # 4
    (json.dumps({"prompt": "x", "chosen": "y", "rejected": "  \n"}), "empty_response"),  # 5
    ("", None),  # 6: blank line, not a row
    (json.dumps(LONG), "overlength"),  # 7
    (json.dumps([1, 2]), "not_an_object"),  # 8
    (json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                 "chosen": "a", "rejected": "b"}), "bad_messages"),  # 9: does not end with a user turn
    (json.dumps({"prompt": "Why?", "chosen": "\n\n\nBecause.", "rejected": "No."}), "token_boundary"),  # 10
    (json.dumps({**GOOD, "prompt": "Name another prime."}), None),  # 11
]


def _pair_rows(n):
    return [
        {"prompt": f"Question {i}: what is {i} + {i}?", "chosen": f"{i} + {i} = {2 * i}.",
         "rejected": f"It is {2 * i + 1}.", **({"system": "Be exact."} if i % 3 == 0 else {})}
        for i in range(n)
    ]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(smollm2_dir):
    return str(smollm2_dir)


def test_bad_rows_reported_with_line_numbers(tmp_path, tok_dir, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(line for line, _ in BAD_FILE) + "\n")
    out = tmp_path / "bad"
    code = cli.main(["--input", str(src), "--kind", "pair", "--tokenizer", tok_dir, "--output", str(out),
                     "--max-length", "200", "--on-overlength", "skip", "--workers", "1", "--no-progress"])
    assert code == EXIT_DROPPED == 3
    expected = {i + 1: reason for i, (_, reason) in enumerate(BAD_FILE) if reason}
    report = [json.loads(line) for line in open(f"{out}.dropped.jsonl")]
    assert {d["number"]: d["reason"] for d in report} == expected
    assert all(d["unit"] == "line" and d["file"] == str(src) for d in report)
    over = next(d for d in report if d["reason"] == "overlength")
    assert over["length"] > 200 and "over --max-length 200" in over["detail"]
    assert "field 'rejected'" in next(d for d in report if d["number"] == 3)["detail"]
    assert "must be a string, got array" in next(d for d in report if d["number"] == 4)["detail"]
    err = capsys.readouterr().err
    for line_no in expected:
        assert f"{src}:line {line_no}:" in err
    ds = PairDataset(out)
    assert len(ds) == 2 and ds.manifest["source"]["rows_read"] == 10 and ds.manifest["source"]["rows_dropped"] == 8


def test_overlength_fail_names_line_and_length(tmp_path, tok_dir, capsys):
    src = _write_jsonl(tmp_path / "long.jsonl", [GOOD, GOOD, LONG])
    code = cli.main(["--input", src, "--kind", "pair", "--tokenizer", tok_dir, "--output", str(tmp_path / "o"),
                     "--max-length", "200", "--workers", "1", "--no-progress"])
    assert code == EXIT_ERROR
    err = capsys.readouterr().err
    assert f"{src}:line 3" in err and "--max-length 200" in err and "--on-overlength skip" in err
    assert not (tmp_path / "o.json").exists() and not (tmp_path / "o.bin").exists()


def test_exit_codes_clean_and_all_dropped(tmp_path, tok_dir, capsys):
    clean = _write_jsonl(tmp_path / "ok.jsonl", _pair_rows(3))
    assert cli.main(["--input", clean, "--kind", "pair", "--tokenizer", tok_dir, "--output", str(tmp_path / "ok"),
                     "--workers", "1", "--no-progress"]) == EXIT_OK
    assert not (tmp_path / "ok.dropped.jsonl").exists() and not (tmp_path / "ok.work").exists()
    junk = tmp_path / "junk.jsonl"
    junk.write_text("{oops\n[]\n")
    assert cli.main(["--input", str(junk), "--kind", "pair", "--tokenizer", tok_dir, "--output", str(tmp_path / "j"),
                     "--workers", "1", "--no-progress"]) == EXIT_ERROR
    assert "all 2 rows were dropped" in capsys.readouterr().err
    # a bad argument value is an error that names the fix
    assert cli.main(["--input", clean, "--kind", "longpo", "--tokenizer", tok_dir, "--output", str(tmp_path / "t"),
                     "--context-template", "{document}", "--no-progress"]) == EXIT_ERROR
    assert "{context} and {instruction}" in capsys.readouterr().err


def test_replacing_a_dataset_is_said(tmp_path, tok_dir, capsys):
    """Preprocessing into the prefix of an existing dataset replaces it, and says so (its reference
    sidecars no longer match); the same data again replaces nothing a sidecar depends on."""
    out = str(tmp_path / "ds")
    args = ["--kind", "pair", "--tokenizer", tok_dir, "--output", out, "--workers", "1", "--no-progress"]
    assert cli.main(["--input", _write_jsonl(tmp_path / "a.jsonl", _pair_rows(3)), *args]) == EXIT_OK
    first = json.load(open(f"{out}.json"))["dataset_hash"]
    assert "replaced" not in capsys.readouterr().err
    assert cli.main(["--input", str(tmp_path / "a.jsonl"), *args]) == EXIT_OK
    assert "replaced" not in capsys.readouterr().err  # same rows, same hash
    assert cli.main(["--input", _write_jsonl(tmp_path / "b.jsonl", _pair_rows(4)), *args]) == EXIT_OK
    err = capsys.readouterr().err
    assert f"replaced the dataset that was at {out} (dataset hash {first})" in err
    assert f"precompute_ref_logps.py --data {out}" in err
    assert len(PairDataset(out)) == 4


def test_parquet_and_datasets_dir_inputs_match_jsonl(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in open(EXAMPLES / "longpo.jsonl")]
    # every row names every column (pyarrow infers a table's schema from the first row)
    rows = [{"system": r.get("system"), **r} for r in rows]
    spec = TokenizerSpec(hf_dir=tok_dir)

    def run(inputs, name, **kw):
        return run_preprocess(PreprocessConfig(inputs=inputs, kind="longpo", output=str(tmp_path / name),
                                               tokenizer=spec, progress=False, chunk_size=1, **kw))

    ref = run([str(EXAMPLES / "longpo.jsonl")], "jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hfds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hfdict"))
    (tmp_path / "files").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "files" / "part-0.parquet")
    _write_jsonl(tmp_path / "files" / "part-1.jsonl", rows[1:])
    for inputs, name in (([str(tmp_path / "rows.parquet")], "pq"), ([str(tmp_path / "hfds")], "ds"),
                         ([str(tmp_path / "hfdict")], "dd"), ([str(tmp_path / "files")], "dir")):
        res = run(inputs, name)
        assert res.exit_code == EXIT_OK and res.kept == len(rows), name
        assert res.manifest["dataset_hash"] == ref.manifest["dataset_hash"], name
        for ext in (".bin", ".idx"):
            assert (tmp_path / f"{name}{ext}").read_bytes() == (tmp_path / f"jsonl{ext}").read_bytes()
    # a bad table row is reported by its 0-based row index
    broken = [dict(rows[0]), dict(rows[1])]
    broken[1]["turns"] = [{**t, "chosen": ""} for t in broken[1]["turns"]]
    pq.write_table(pa.Table.from_pylist(broken), tmp_path / "broken.parquet")
    res = run([str(tmp_path / "broken.parquet")], "broken")
    assert res.exit_code == EXIT_DROPPED
    [d] = res.drops
    assert (d.unit, d.number, d.reason) == ("row", 1, "empty_response") and "turns[0].chosen" in d.detail


def test_workers_and_chunking_do_not_change_the_bytes(tmp_path, tok_dir):
    src = _write_jsonl(tmp_path / "p.jsonl", _pair_rows(25))
    spec = TokenizerSpec(hf_dir=tok_dir)
    outs = {}
    for name, workers in (("one", 1), ("two", 2)):
        res = run_preprocess(PreprocessConfig(inputs=[src], kind="pair", output=str(tmp_path / name), tokenizer=spec,
                                              workers=workers, chunk_size=4, progress=False))
        assert res.exit_code == EXIT_OK and res.chunks == 7
        manifest = json.loads((tmp_path / f"{name}.json").read_text())
        del manifest["files"]["bin"], manifest["files"]["idx"]  # the file names differ
        outs[name] = [(tmp_path / f"{name}{e}").read_bytes() for e in (".bin", ".idx")] + [manifest]
    assert outs["one"] == outs["two"]
    # order is preserved: sample i is row i
    ds = PairDataset(tmp_path / "two")
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    for i in (0, 13, 24):
        assert f"{i} + {i} = {2 * i}." in hf.decode(ds.sample(i).sequences("chosen")[0].tokens)


def test_whole_mode_matches_span_mode_and_verify(tmp_path, tok_dir):
    spec_span = TokenizerSpec(hf_dir=tok_dir, mode="spans")
    spec_whole = TokenizerSpec(hf_dir=tok_dir, mode="whole")
    src = str(EXAMPLES / "solopo.jsonl")
    a = run_preprocess(PreprocessConfig([src], "solopo", str(tmp_path / "a"), spec_span, verify=True, progress=False))
    b = run_preprocess(PreprocessConfig([src], "solopo", str(tmp_path / "b"), spec_whole, progress=False))
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "b.bin").read_bytes()
    assert a.manifest["dataset_hash"] == b.manifest["dataset_hash"]


def test_workdir_of_another_run_is_refused(tmp_path, tok_dir):
    src = _write_jsonl(tmp_path / "p.jsonl", _pair_rows(2))
    (tmp_path / "o.work").mkdir()
    (tmp_path / "o.work" / "run.json").write_text(json.dumps({"kind": "longpo"}))
    cfg = PreprocessConfig([src], "pair", str(tmp_path / "o"), TokenizerSpec(hf_dir=tok_dir), progress=False)
    with pytest.raises(PreprocessError, match="--fresh"):
        run_preprocess(cfg)
    cfg.fresh = True
    assert run_preprocess(cfg).exit_code == EXIT_OK
