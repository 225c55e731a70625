"""tools/experiment.py: the experiment YAML -> models with their overrides, GPU slots, and runs whose
commands are faked (each writes the file the real tool writes), so that the schedule and the resume
are checked in a second; the real tiny runs are `python tools/experiment.py
examples/longpo_smollm2/experiment.yaml --profile tiny` (about 15 minutes on a 2-core CPU) and
tests/test_longpo_iterative.py (the rounds)."""
import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("experiment", ROOT / "tools" / "experiment.py")
X = importlib.util.module_from_spec(spec)
sys.modules["experiment"] = X  # dataclasses look their module up there
spec.loader.exec_module(X)
YAML = ROOT / "examples" / "longpo_smollm2" / "experiment.yaml"


def test_the_yaml_names_methods_and_variants_as_overrides():
    exp = X.load(YAML)
    assert [m.name for m in exp.models] == ["longpo", "longpo_resp", "sft", "dpo", "docnll", "base", "base_rope"]
    by = {m.name: m for m in exp.models}
    assert by["longpo"].overrides == ["loss.name=longpo", "loss.longpo_nll=sequence"]
    assert by["dpo"].reference == "long" and by["docnll"].data == "documents"
    assert by["base"].method is None and by["base_rope"].rope_theta == 1e6
    assert exp.references() == ["short", "long"]
    assert by["sft"].eval_lengths == [4096, 8192, 16384]

    v = X.load(YAML, methods=["longpo"], variants=["longpo_lr5e-5"])
    assert [m.name for m in v.models] == ["longpo", "base", "base_rope", "longpo_lr5e-5"]
    assert v.models[-1].overrides[-1] == "optim.lr=5e-5" and v.models[-1].eval_lengths == [8192, 16384]
    assert v.references() == ["short"]

    tiny = X.load(YAML, profile="tiny")
    assert tiny.spec["context"] == 2048 and tiny.spec["pairs"]["compact"] is None
    assert tiny.spec["evaluation"]["tasks"] == ["niah_single", "vt"] and tiny.spec["evaluation"]["args"] == ["--batch-size", "16", "--suite", "smoke"]
    assert tiny.models[0].eval_lengths == [512, 1024]

    for bad in ({"methods": ["nope"]}, {"variants": ["nope"]}, {"profile": "nope"}, {"sets": ["nope"]},
                {"sets": ["pairs=1", "pairs.x=2"]}):
        with pytest.raises(X.SpecError):
            X.load(YAML, **bad)


def test_set_overrides_the_yaml_and_its_profile():
    exp = X.load(YAML, profile="tiny", sets=["pairs.documents.n=7", "train.overrides=[optim.lr=3e-5]", "pairs.grow=true",
                                              "rope_theta=2e6", "hardware.gpus=null"])
    assert exp.spec["pairs"]["documents"] == {"n": 7, "words": 800, "seed": 0}  # the rest of the section stays
    assert exp.spec["train"]["overrides"] == ["optim.lr=3e-5"] and exp.spec["pairs"]["grow"] is True
    assert exp.models[-1].rope_theta == 2e6 and exp.spec["hardware"]["gpus"] is None
    assert X.main([str(YAML), "--plan", "--set", "nope"]) == 2  # a mistake in the arguments: status 2


def test_slots():
    assert X.slot_gpus(0, 1, 1) == [None]  # the CPU: one job at a time
    assert X.slot_gpus(1, 1, 2) == [None]  # one group of GPUs: one job at a time on all of them
    assert X.slot_gpus(2, 1, 1) == ["0", "1"]
    assert X.slot_gpus(2, 1, 2) == ["0", "1", "0", "1"]
    assert X.slot_gpus(4, 2, 1) == ["0,1", "2,3"]
    assert X.slot_gpus(2, 2, 1) == [None]


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


class Fake:
    """Each command writes what the real tool writes; nothing runs."""

    def __init__(self, *a, stopped_gpus=(), **k):
        super().__init__(*a, **k)
        self.calls, self.calls_lock, self.stopped_gpus = [], threading.Lock(), stopped_gpus

    def table(self):
        return "| model | 512 |\n|---|---:|\n" + "".join(f"| {m.name} | 1.0 |\n" for m in self.exp.table_order)

    def sh(self, cmd, log=None, gpus=None, timeout=None, ok=(0,)):
        cmd = [str(c) for c in cmd]
        with self.calls_lock:
            self.calls.append((cmd, gpus))
        tool = _tool(cmd)
        if tool == "tools/convert_checkpoint.py" and cmd[cmd.index(tool) + 1] == "hf-to-megatron":
            Path(_arg(cmd, "--out")).mkdir(parents=True)
            Path(_arg(cmd, "--out"), "latest").write_text("1")
            theta = json.loads(Path(_arg(cmd, "--hf-dir"), "config.json").read_text()).get("rope_theta", 1e4)
            Path(_arg(cmd, "--out"), "model.json").write_text(json.dumps({"arch": {"rope_theta": theta}}))
        elif tool == "tools/convert_checkpoint.py":  # the export declares what the run trained at
            trained = json.loads(Path(_arg(cmd, "--megatron-dir"), "run.json").read_text()) \
                if Path(_arg(cmd, "--megatron-dir"), "run.json").is_file() else {}
            Path(_arg(cmd, "--out")).mkdir(parents=True)
            Path(_arg(cmd, "--out"), "config.json").write_text(json.dumps(trained))
        elif tool == "tools/make_long_documents.py":
            Path(_arg(cmd, "--out")).write_text("".join(f'{{"id": "d{i}"}}\n' for i in range(int(_arg(cmd, "--n")))))
        elif tool == "tools/build_longpo_pairs.py":  # a pair per document, appended (resumable)
            if gpus in self.stopped_gpus:
                return 124  # stopped at the time limit before it wrote anything
            docs = [json.loads(line)["id"] for line in Path(cmd[cmd.index(tool) + 1]).read_text().splitlines()]
            with open(_arg(cmd, "-o"), "a") as f:
                f.write("".join(json.dumps({"meta": {"id": d}}) + "\n" for d in docs))
        elif tool == "tools/pack_pairs.py" and "unpack" in cmd:  # the committed pairs: documents d0 and d2
            Path(_arg(cmd, "-o")).write_text('{"meta": {"id": "d0"}}\n{"meta": {"id": "d2"}}\n')
        elif tool in ("tools/pack_pairs.py", "tools/document_nll_data.py"):
            Path(_arg(cmd, "-o")).write_text("x")
        elif tool == "tools/preprocess_pairs.py":
            Path(_arg(cmd, "--output") + ".json").write_text("{}")
        elif tool == "tools/precompute_ref_logps.py":
            Path(_arg(cmd, "--out") if "--out" in cmd else _arg(cmd, "--data") + ".ref.safetensors").write_text("x")
        elif tool == "megatron_longpo.train":
            save = Path(_arg_eq(cmd, "train.save_dir"))
            save.mkdir(parents=True)
            (save / "summary.json").write_text("{}")
            if any(c.startswith("model.max_position_embeddings=") for c in cmd):
                (save / "run.json").write_text(json.dumps({"rope_theta": float(_arg_eq(cmd, "model.rope_theta")),
                                                           "max_position_embeddings": int(_arg_eq(cmd, "model.max_position_embeddings"))}))
        elif tool == "tools/eval_long.py":
            Path(_arg(cmd, "--out")).write_text("{}")
        return 0


class FakeRunner(Fake, X.Runner):
    pass


class FakeRounds(Fake, X.RoundsRunner):
    pass


def _tool(cmd):
    return next(c for c in cmd if c.startswith("tools/") or c == "megatron_longpo.train")


def _hf(tmp_path, rope_theta=1e4):
    (tmp_path / "hf").mkdir(exist_ok=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"rope_theta": rope_theta}))
    return str(tmp_path / "hf")


def test_a_run_schedules_every_job_on_the_gpus_and_a_rerun_resumes(tmp_path):
    exp = X.load(YAML, profile="tiny", variants=["longpo_lr5e-5"])
    exp.workdir = tmp_path / "w"
    exp.spec["model"] = _hf(tmp_path)  # not the embedded model: nothing is materialised
    exp.spec["hardware"] = {"gpus": 2, "gpus_per_job": 1, "jobs_per_gpu": 1}
    r = FakeRunner(exp, out=lambda line: None)
    assert r.run() == 0
    tools = [_tool(cmd) for cmd, _ in r.calls]
    assert tools.count("tools/build_longpo_pairs.py") == 2  # one shard of the documents per GPU
    assert sorted(g for (cmd, g), t in zip(r.calls, tools) if t == "tools/build_longpo_pairs.py") == ["0", "1"]
    assert (exp.workdir / "pairs.jsonl").read_text().count('"meta"') == 2  # both shards, every document
    assert tools.count("tools/precompute_ref_logps.py") == 2  # short and long (dpo)
    trains = {_arg_eq(cmd, "train.save_dir").rsplit("/", 1)[1]: (cmd, g) for (cmd, g), t in zip(r.calls, tools)
              if t == "megatron_longpo.train"}
    assert set(trains) == {"longpo", "longpo_resp", "sft", "dpo", "docnll", "longpo_lr5e-5"}
    assert {g for _, g in trains.values()} == {"0", "1"}  # both GPUs trained
    dpo = trains["dpo"][0]
    assert _arg_eq(dpo, "data.reference").endswith("data.longref.safetensors") and "loss.name=dpo" in dpo
    assert _arg_eq(trains["docnll"][0], "data.path").endswith("docnll_data")
    lr = trains["longpo_lr5e-5"][0]
    assert lr.index("optim.lr=5e-5") > lr.index("optim.lr=1e-5")  # the variant's override comes last: it wins
    assert "model.max_position_embeddings=2048" in lr and "model.rope_theta=1000000" in lr
    evals = [cmd for cmd, t in zip([c for c, _ in r.calls], tools) if t == "tools/eval_long.py"]
    assert len(evals) == 8
    base_rope = next(c for c in evals if _arg(c, "--out").endswith("eval_base_rope.json"))
    assert _arg(base_rope, "--rope-theta") == "1000000.0" and _arg(base_rope, "--samples") == "1"
    summary = (exp.workdir / "results" / "summary.md").read_text()
    assert "| dpo | dpo: `loss.name=dpo`, reference long |" in summary and "| base_rope | 1.0 |" in summary
    rows = [line.split(" | ")[0][2:] for line in summary.splitlines() if line.endswith("| 1.0 |")]
    assert rows == ["base", "base_rope", "longpo", "longpo_resp", "sft", "dpo", "docnll", "longpo_lr5e-5"]
    assert len(list((exp.workdir / "results").glob("eval_*.json.gz"))) == 8

    again = FakeRunner(exp, out=lambda line: None)
    assert again.run() == 0
    assert again.calls == []  # everything was done: nothing runs twice


def _arg_eq(cmd, key):
    return next(c for c in cmd if c.startswith(key + "=")).split("=", 1)[1]


def test_grow_unpacks_the_committed_pairs_and_generates_on_the_other_documents(tmp_path):
    (tmp_path / "committed.jsonl.gz").write_text("x")
    exp = X.load(YAML, profile="tiny", sets=[f"pairs.compact={tmp_path / 'committed.jsonl.gz'}", "pairs.grow=true",
                                              "pairs.documents.n=5", f"model={_hf(tmp_path)}", "hardware.gpus=2"])
    exp.workdir = tmp_path / "w"
    r = FakeRunner(exp, out=lambda line: None)
    assert r.run() == 0
    shards = [Path(cmd[cmd.index("tools/build_longpo_pairs.py") + 1]).read_text() for cmd, _ in r.calls
              if _tool(cmd) == "tools/build_longpo_pairs.py"]
    assert sorted(shards) == ['{"id": "d1"}\n{"id": "d4"}\n', '{"id": "d3"}\n']  # d0 and d2 have pairs
    pairs = [json.loads(line)["meta"]["id"] for line in (exp.workdir / "pairs.jsonl").read_text().splitlines()]
    assert pairs[:2] == ["d0", "d2"] and sorted(pairs) == ["d0", "d1", "d2", "d3", "d4"]
    pack = next(cmd for cmd, _ in r.calls if _tool(cmd) == "tools/pack_pairs.py" and "pack" in cmd)
    assert _arg(pack, "--docs-n") == "5"


def test_a_generation_stopped_on_two_gpus_resumes_on_one(tmp_path):
    exp = X.load(YAML, profile="tiny", sets=["pairs.documents.n=4", f"model={_hf(tmp_path)}", "hardware.gpus=2"])
    exp.workdir = tmp_path / "w"
    assert FakeRunner(exp, stopped_gpus=("1",), out=lambda line: None).run() == 0  # GPU 1 stopped: rerun to resume
    assert not (exp.workdir / "pairs.jsonl").exists() and (exp.workdir / "pairs.partial").exists()
    exp.spec["hardware"]["gpus"] = 1
    r = FakeRunner(exp, out=lambda line: None)
    assert r.run() == 0
    shard = next(Path(cmd[cmd.index("tools/build_longpo_pairs.py") + 1]) for cmd, _ in r.calls
                 if _tool(cmd) == "tools/build_longpo_pairs.py")
    assert shard.read_text() == '{"id": "d1"}\n{"id": "d3"}\n'  # GPU 0's documents are not generated again
    pairs = [json.loads(line)["meta"]["id"] for line in (exp.workdir / "pairs.jsonl").read_text().splitlines()]
    assert sorted(pairs) == ["d0", "d1", "d2", "d3"]


ROUNDS = ROOT / "examples" / "longpo_iterative" / "experiment.yaml"


def test_rounds_chain_the_exports_and_a_rerun_resumes(tmp_path):
    exp = X.load(ROUNDS, profile="tiny", sets=[f"model={_hf(tmp_path)}", "train.overrides=[optim.lr=1e-3]"])
    assert [(r.length, r.chunk_tokens, r.rope_theta) for r in exp.rounds] == [(512, 128, None), (1024, 256, None)]
    exp.workdir = tmp_path / "w"
    r = FakeRounds(exp, out=lambda line: None)
    assert r.run() == 0
    imports = [_arg(cmd, "--hf-dir") for cmd, _ in r.calls if "hf-to-megatron" in cmd]
    assert imports == [str(tmp_path / "hf"), str(exp.workdir / "round1" / "hf_round1")]  # round 2's pi_S: round 1's export
    trains = [cmd for cmd, _ in r.calls if _tool(cmd) == "megatron_longpo.train"]
    assert [_arg_eq(c, "model.rope_theta") for c in trains] == ["100000.0", "1000000.0"]  # x rope_factor each round
    assert all("train.steps=2" in c and c[-1] == "optim.lr=1e-3" for c in trains)
    gens = [cmd for cmd, _ in r.calls if _tool(cmd) == "tools/build_longpo_pairs.py"]
    assert [_arg(c, "--model") for c in gens] == imports and [_arg(c, "--max-pair-tokens") for c in gens] == ["496", "992"]
    assert [_arg(c, "--seed") for c in gens] == ["1", "2"]
    again = FakeRounds(exp, out=lambda line: None)
    assert again.run() == 0 and again.calls == []

    one = "rounds=[{length: 512, config: examples/longpo_iterative/tiny.yaml, rope_theta: 5e4}]"
    bad = X.load(ROUNDS, profile="tiny", sets=[f"model={_hf(tmp_path)}", one])
    (exp.workdir / "round1" / "hf_round1" / "config.json").write_text(json.dumps({"rope_theta": 1e5, "max_position_embeddings": 512}))
    bad.workdir = exp.workdir
    with pytest.raises(X.ExperimentError, match="rope_theta 100000.0"):  # the export must declare the round's base
        FakeRounds(bad, out=lambda line: None).run()
