"""An export by tools/convert_checkpoint.py megatron-to-hf loads and runs in lm-evaluation-harness's HF
model class offline, on a tiny local multiple-choice task (docs/evaluation.md). Skipped where lm-eval
is not installed (it is not a dependency of this package)."""
import json
import os

import pytest


def test_megatron_export_runs_in_lm_eval_offline(tiny_llama_ckpt, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from fixtures import ROOT, run_tool

    export = tmp_path / "hf"
    run_tool(ROOT / "tools/convert_checkpoint.py", "megatron-to-hf", "--megatron-dir", tiny_llama_ckpt, "--out", export)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(k, "1")
    data = tmp_path / "tiny.jsonl"
    rows = [{"question": f"{a} plus {b} is", "choices": [str(a + b), str(a + b + 1)], "label": 0}
            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_local.yaml").write_text(
        "task: tiny_local\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "metric_list:\n  - metric: acc\n")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    res = simple_evaluate(model="hf", model_args=f"pretrained={export},dtype=float32", tasks=["tiny_local"],
                          device="cpu", batch_size=2, task_manager=TaskManager(include_path=str(tasks)))
    acc = res["results"]["tiny_local"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"]["tiny_local"]["effective"] == 4
    assert os.path.samefile(res["config"]["model_args"].split("=", 1)[1].split(",")[0], export)
