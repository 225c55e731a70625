"""Hugging Face datasets as the reader: save_to_disk folders (load_from_disk, --split), folders of
Parquet shards, and a Hub name, which on a machine without network stops with one line."""
import importlib.util
import json
from pathlib import Path

import pytest

from megatron_longpo.data.inputs import iter_records, resolve_inputs
from megatron_longpo.data.records import PreprocessError

REPO = Path(__file__).resolve().parent.parent
ROWS = [{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]


def test_save_to_disk_dict_split_and_parquet_shards(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:4]), "test": datasets.Dataset.from_list(ROWS[4:])})
    dd.save_to_disk(str(tmp_path / "dd"))
    def rows(files):
        return [r for _, _, r in iter_records(files)]

    assert rows(resolve_inputs([str(tmp_path / "dd")])) == ROWS[:4]  # train by default
    assert rows(resolve_inputs([str(tmp_path / "dd")], split="test")) == ROWS[4:]
    with pytest.raises(PreprocessError, match=r"holds splits \['train', 'test'\]; name one with --split"):
        resolve_inputs([str(tmp_path / "dd")], split="validation")
    shards = tmp_path / "shards"
    shards.mkdir()
    for k in range(3):
        pq.write_table(pa.Table.from_pylist(ROWS[2 * k:2 * k + 2]), shards / f"train-{k:05d}-of-00003.parquet")
    files = resolve_inputs([str(shards)])
    assert [Path(f.path).name for f in files] == [f"train-{k:05d}-of-00003.parquet" for k in range(3)]
    assert rows(files) == ROWS


def test_hub_name_without_network_is_one_line(tmp_path, capsys, monkeypatch):
    """This machine has no network: a Hub name stops preprocessing with one line naming the fix."""
    spec = importlib.util.spec_from_file_location("preprocess_pairs_cli", REPO / "tools" / "preprocess_pairs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    code = cli.main(["--input", "trl-lib/ultrafeedback_binarized", "--kind", "pair", "--tokenizer", str(tmp_path),
                     "--output", str(tmp_path / "out"), "--no-progress", "--workers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err  # 2: a user's mistake (docs/reliability.md)
    assert err[0].startswith("error: trl-lib/ultrafeedback_binarized is not a local file or directory, and the "
                             "Hugging Face Hub cannot be reached to load it (huggingface.co cannot be reached")
    assert err[0].endswith("save_to_disk(DIR)` and pass --input DIR")
    assert not (tmp_path / "out.json").exists()


def test_column_mapping_bad_spec_is_a_usage_error(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("preprocess_pairs_cli2", REPO / "tools" / "preprocess_pairs.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = tmp_path / "x.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n")
    code = cli.main(["--input", str(src), "--kind", "pair", "--tokenizer", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--columns", "answer=good"])
    assert code == 2
    assert "--columns names 'answer', not a field this format reads" in capsys.readouterr().err
