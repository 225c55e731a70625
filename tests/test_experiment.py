"""tools/experiment.py and its runner, megatron_longpo.experiment: the experiment YAML -> models with
their overrides, GPU slots, and runs whose commands are faked (each writes the file the real tool writes),
so that the schedule and the resume are checked in a second; the real tiny runs are `python
tools/experiment.py examples/longpo_smollm2/experiment.yaml --profile tiny` (about 15 minutes on a
2-core CPU) and tests/test_longpo_iterative.py (the rounds)."""
import importlib.util
import json
import re
import shutil
import threading
from pathlib import Path

import pytest

from megatron_longpo import experiment as X

ROOT = Path(__file__).resolve().parents[1]  # the clone: the YAML's paths are relative to it (load's root)
spec = importlib.util.spec_from_file_location("experiment", ROOT / "tools" / "experiment.py")
TOOL = importlib.util.module_from_spec(spec)  # the command line: TOOL.main
spec.loader.exec_module(TOOL)
YAML = ROOT / "examples" / "longpo_smollm2" / "experiment.yaml"


def test_the_yaml_names_methods_and_variants_as_overrides():
    exp = X.load(YAML, root=ROOT, workdir="/nonexistent")  # no picks.json there: the YAML's overrides
    assert [m.name for m in exp.models] == ["longpo", "longpo_lam0", "longpo_resp", "sft", "sft_tokens", "dpo_policy",
                                            "docnll", "base", "base_rope"]
    by = {m.name: m for m in exp.models}
    assert by["longpo"].overrides == ["loss.name=longpo", "loss.longpo_nll=sequence"]
    assert by["longpo_lam0"].overrides[-1] == "loss.longpo_lambda=0" and by["sft_tokens"].overrides[-1] == "train.epochs=2"
    assert by["dpo_policy"].reference == "long_policy" and by["docnll"].data == "documents"
    assert by["base"].method is None and by["base_rope"].rope_theta == 1e6
    assert exp.references() == ["short", "long_policy"]
    assert by["sft"].eval_lengths == [4096, 8192, 16384]
    assert X.load(YAML, root=ROOT, methods=["dpo"]).models[0].reference == "long"  # defined, not in the default run

    v = X.load(YAML, root=ROOT, methods=["longpo"], variants=["longpo_lr5e-5"])
    assert [m.name for m in v.models] == ["longpo", "base", "base_rope", "longpo_lr5e-5"]
    assert v.models[-1].overrides[-1] == "optim.lr=5e-5" and v.models[-1].eval_lengths == [8192, 16384]
    assert v.references() == ["short"]

    tiny = X.load(YAML, root=ROOT, profile="tiny")
    assert tiny.spec["context"] == 2048 and tiny.spec["pairs"]["compact"] is None
    assert tiny.spec["evaluation"]["tasks"] == ["niah_single", "vt"] and tiny.spec["evaluation"]["args"] == ["--batch-size", "16", "--suite", "smoke"]
    assert tiny.models[0].eval_lengths == [512, 1024]

    for bad in ({"methods": ["nope"]}, {"variants": ["nope"]}, {"profile": "nope"}, {"sets": ["nope"]},
                {"sets": ["pairs=1", "pairs.x=2"]}):
        with pytest.raises(X.SpecError):
            X.load(YAML, root=ROOT, **bad)


def test_set_overrides_the_yaml_and_its_profile():
    exp = X.load(YAML, root=ROOT, profile="tiny", sets=["pairs.documents.n=7", "train.overrides=[optim.lr=3e-5]", "pairs.grow=true",
                                                         "rope_theta=2e6", "hardware.gpus=null"])
    assert exp.spec["pairs"]["documents"] == {"n": 7, "words": 800, "seed": 0}  # the rest of the section stays
    assert exp.spec["train"]["overrides"] == ["optim.lr=3e-5"] and exp.spec["pairs"]["grow"] is True
    assert exp.models[-1].rope_theta == 2e6 and exp.spec["hardware"]["gpus"] is None
    assert TOOL.main([str(YAML), "--plan", "--set", "nope"]) == 2  # a mistake in the arguments: status 2


def test_slots():
    assert X.slot_gpus(0, 1, 1) == [None]  # the CPU: one job at a time
    assert X.slot_gpus(1, 1, 2) == [None, None]  # one GPU: two jobs side by side on it
    assert X.slot_gpus(1, 1, 1) == [None]
    assert X.slot_gpus(2, 1, 1) == ["0", "1"]
    assert X.slot_gpus(2, 1, 2) == ["0", "1", "0", "1"]
    assert X.slot_gpus(4, 2, 1) == ["0,1", "2,3"]
    assert X.slot_gpus(2, 2, 1) == [None]


def _arg(cmd, flag):
    return cmd[cmd.index(flag) + 1]


def _quality(overrides):
    """The fake evaluation's score and perplexity of a model trained with these overrides (the base: none)."""
    kv = dict(o.split("=", 1) for o in overrides)
    lr, seed = float(kv.get("optim.lr", 0)), int(kv.get("data.seed", 0))
    return min(1.0, lr * 2e4 + 0.3 * seed), 30.0 * (1 + lr * 2e3)  # a higher lr: more score, more perplexity


class Fake:
    """Each command writes what the real tool writes; nothing runs. A training writes summary.json with
    its step lines' tokens (pairs: 2 per sample of an epoch, as LongPO's chosen and rejected; sft: 1);
    an evaluation writes per-sample results whose scores and perplexity follow _quality of the overrides
    the model was trained with (the export's config.json carries them)."""

    def __init__(self, *a, stopped_gpus=(), quality=_quality, **k):
        super().__init__(*a, **k)
        self.calls, self.calls_lock, self.stopped_gpus, self.quality = [], threading.Lock(), stopped_gpus, quality

    def table(self):
        from megatron_longpo.eval import report

        groups = [(arg.split("=", 1)[0], [json.loads(Path(f).read_text()) for f in arg.split("=", 1)[1].split(",")])
                  for arg in self.table_args()]
        return report.group_markdown(groups) + "\n"

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
            overrides = [c for c in cmd[cmd.index(tool) + 1:] if "=" in c and not c.split("=")[0].endswith(("dir", "path", "checkpoint"))]
            kv = dict(o.split("=", 1) for o in overrides)
            per_step = 2000 if "loss.name=sft" in overrides else 4000
            steps = [{"step": i + 1, "tokens": per_step} for i in range(3 * int(kv.get("train.epochs", 1)))]
            (save / "summary.json").write_text(json.dumps({"iteration": len(steps), "steps": steps}))
            if any(c.startswith("model.max_position_embeddings=") for c in cmd):
                (save / "run.json").write_text(json.dumps({"rope_theta": float(_arg_eq(cmd, "model.rope_theta")),
                                                           "max_position_embeddings": int(_arg_eq(cmd, "model.max_position_embeddings")),
                                                           "overrides": overrides}))
        elif tool == "tools/eval_long.py":
            config = json.loads(Path(_arg(cmd, "--model"), "config.json").read_text())
            score, ppl = self.quality(config.get("overrides", []))
            n, lengths = int(_arg(cmd, "--samples")), cmd[cmd.index("--lengths") + 1:cmd.index("--tasks")]
            samples = [{"task": t, "length": int(L), "index": i, "prompt_sha": f"{_arg(cmd, '--seed')}{t}{L}{i}",
                        "score": float(i < int(score * n + 0.5))} for t in ("niah_single", "vt") for L in lengths for i in range(n)]
            Path(_arg(cmd, "--out")).write_text(json.dumps({"samples": samples, "config": {"seed": int(_arg(cmd, "--seed"))},
                                                            "retention": {"perplexity": {"perplexity": ppl}}}))
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
    exp = X.load(YAML, root=ROOT, profile="tiny", variants=["longpo_lr5e-5"])
    exp.workdir = tmp_path / "w"
    exp.spec["model"] = _hf(tmp_path)  # not the embedded model: nothing is materialised
    exp.spec["hardware"] = {"gpus": 2, "gpus_per_job": 1, "jobs_per_gpu": 1}
    r = FakeRunner(exp, out=lambda line: None)
    assert r.run() == 0
    tools = [_tool(cmd) for cmd, _ in r.calls]
    assert tools.count("tools/build_longpo_pairs.py") == 2  # one shard of the documents per GPU
    assert sorted(g for (cmd, g), t in zip(r.calls, tools) if t == "tools/build_longpo_pairs.py") == ["0", "1"]
    assert (exp.workdir / "pairs.jsonl").read_text().count('"meta"') == 2  # both shards, every document
    assert tools.count("tools/precompute_ref_logps.py") == 2  # short and long_policy (dpo_policy)
    trains = {_arg_eq(cmd, "train.save_dir").rsplit("/", 1)[1]: (cmd, g) for (cmd, g), t in zip(r.calls, tools)
              if t == "megatron_longpo.train"}
    assert set(trains) == {"longpo", "longpo_lam0", "longpo_resp", "sft", "sft_tokens", "dpo_policy", "docnll", "longpo_lr5e-5"}
    assert {g for _, g in trains.values()} == {"0", "1"}  # both GPUs trained
    dpo = trains["dpo_policy"][0]
    assert _arg_eq(dpo, "data.reference").endswith("data.longref_policy.safetensors") and "loss.name=dpo" in dpo
    assert all(_arg_eq(c, "train.seed") == "0" and _arg_eq(c, "data.seed") == "0" for c, _ in trains.values())
    assert _arg_eq(trains["docnll"][0], "data.path").endswith("docnll_data")
    lr = trains["longpo_lr5e-5"][0]
    assert lr.index("optim.lr=5e-5") > lr.index("optim.lr=1e-5")  # the variant's override comes last: it wins
    assert "model.max_position_embeddings=2048" in lr and "model.rope_theta=1000000" in lr
    evals = [cmd for cmd, t in zip([c for c, _ in r.calls], tools) if t == "tools/eval_long.py"]
    assert len(evals) == 10
    base_rope = next(c for c in evals if _arg(c, "--out").endswith("eval_base_rope.json"))
    assert _arg(base_rope, "--rope-theta") == "1000000.0" and _arg(base_rope, "--samples") == "1"
    assert {_arg(c, "--seed") for c in evals} == {"0"}  # the test samples
    assert {_arg(c, "--samples-cache") for c in evals} == {str(exp.workdir / "samples_test.json")}  # built once
    summary = (exp.workdir / "results" / "summary.md").read_text()
    assert "| dpo_policy | dpo_policy: `loss.name=dpo`, reference long_policy | 0 | 3 | 12,000 |" in summary
    # equal compute shows: LongPO's 3 steps of 4,000 tokens; SFT's 3 of 2,000; SFT at 2 epochs 6 of 2,000
    assert "| longpo | longpo: `loss.name=longpo loss.longpo_nll=sequence` | 0 | 3 | 12,000 |" in summary
    assert "| sft | sft: `loss.name=sft` | 0 | 3 | 6,000 |" in summary
    assert "| sft_tokens | sft_tokens: `loss.name=sft train.epochs=2` | 0 | 6 | 12,000 |" in summary
    rows = [line.split(" | ")[0][2:] for line in summary.splitlines() if line.startswith("| ") and "[" in line]
    assert rows == ["base", "base_rope", "longpo", "longpo_lam0", "longpo_resp", "sft", "sft_tokens", "dpo_policy",
                    "docnll", "longpo_lr5e-5"]
    assert "Differences" not in summary  # one seed: no seed CIs
    assert len(list((exp.workdir / "results").glob("eval_*.json.gz"))) == 10

    again = FakeRunner(exp, out=lambda line: None)
    assert again.run() == 0
    assert again.calls == []  # everything was done: nothing runs twice

    # on another machine, with only the evaluations brought along: no model is trained again
    for name in trains:
        shutil.rmtree(exp.workdir / name)
    elsewhere = FakeRunner(exp, out=lambda line: None)
    assert elsewhere.run() == 0
    assert elsewhere.calls == []

    # a fresh machine given the committed results folder: the table again, nothing trained or evaluated
    results = exp.workdir / "results"
    assert len(list(results.glob("*.train.json"))) == 8  # every trained model's stamp beside its evaluation
    exp.workdir = tmp_path / "fresh"
    fresh = FakeRunner(exp, out=lambda line: None, evaluations_from=results)
    assert fresh.run() == 0 and fresh.calls == []
    assert (exp.workdir / "results" / "summary.md").read_text().count("\n| ") == summary.count("\n| ")

    # one evaluation missing there: only that model is made; the references come along, not recomputed
    part = tmp_path / "part"
    shutil.copytree(results, part)
    (part / "eval_sft.json.gz").unlink()
    assert {"data.ref.safetensors", "data.longref_policy.safetensors"} <= {f.name for f in part.iterdir()}
    exp.workdir = tmp_path / "third"
    third = FakeRunner(exp, out=lambda line: None, evaluations_from=part)
    assert third.run() == 0
    made = [_tool(c) for c, _ in third.calls]
    assert "tools/precompute_ref_logps.py" not in made and made.count("megatron_longpo.train") == 1
    assert _arg(next(c for c, _ in third.calls if _tool(c) == "tools/eval_long.py"), "--out").endswith("eval_sft.json")


def _arg_eq(cmd, key):
    return next(c for c in cmd if c.startswith(key + "=")).split("=", 1)[1]


def test_grow_unpacks_the_committed_pairs_and_generates_on_the_other_documents(tmp_path):
    (tmp_path / "committed.jsonl.gz").write_text("x")
    exp = X.load(YAML, root=ROOT, profile="tiny", sets=[f"pairs.compact={tmp_path / 'committed.jsonl.gz'}", "pairs.grow=true",
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
    exp = X.load(YAML, root=ROOT, profile="tiny", sets=["pairs.documents.n=4", f"model={_hf(tmp_path)}", "hardware.gpus=2"])
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
    exp = X.load(ROUNDS, root=ROOT, profile="tiny", sets=[f"model={_hf(tmp_path)}", "train.overrides=[optim.lr=1e-3]"])
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
    bad = X.load(ROUNDS, root=ROOT, profile="tiny", sets=[f"model={_hf(tmp_path)}", one])
    (exp.workdir / "round1" / "hf_round1" / "config.json").write_text(json.dumps({"rope_theta": 1e5, "max_position_embeddings": 512}))
    bad.workdir = exp.workdir
    with pytest.raises(X.ExperimentError, match="rope_theta 100000.0"):  # the export must declare the round's base
        FakeRounds(bad, out=lambda line: None).run()


def _quiet(exp, **k):
    return FakeRunner(exp, out=lambda line: None, **k)


def test_seeds_train_each_method_per_seed_and_the_table_shows_their_mean(tmp_path):
    exp = X.load(YAML, root=ROOT, profile="tiny", methods=["longpo", "sft"], workdir=tmp_path / "w",
                 sets=["seeds=[0,1,2]", f"model={_hf(tmp_path)}", "evaluation.min_samples=20"])
    assert [m.name for m in exp.trained] == ["longpo", "longpo.s1", "longpo.s2", "sft", "sft.s1", "sft.s2"]
    r = _quiet(exp)
    assert r.run() == 0
    trains = {_arg_eq(c, "train.save_dir").rsplit("/", 1)[1]: c for c, _ in r.calls if _tool(c) == "megatron_longpo.train"}
    assert {k: (_arg_eq(c, "train.seed"), _arg_eq(c, "data.seed")) for k, c in trains.items()} == {
        "longpo": ("0", "0"), "longpo.s1": ("1", "1"), "longpo.s2": ("2", "2"), "sft": ("0", "0"), "sft.s1": ("1", "1"),
        "sft.s2": ("2", "2")}
    assert r.table_args()[2] == "longpo=" + ",".join(str(exp.workdir / f"eval_{n}.json") for n in ("longpo", "longpo.s1", "longpo.s2"))
    summary = (exp.workdir / "results" / "summary.md").read_text()
    # _quality: seed k adds 0.3 to the score; at lr 1e-5, 0.2, 0.5, 0.8 of 10 samples a task -> mean 50.0
    assert "| longpo | longpo: `loss.name=longpo loss.longpo_nll=sequence` | 0, 1, 2 | 3 | 12,000 |" in summary
    assert "| longpo | 50.0 [" in summary and "several runs" in summary
    assert "## Differences (means over the seeds)" in summary
    # the same scores per seed: a difference of 0 whose CI still spans the seeds' spread (each side's resampled)
    assert re.search(r"\| longpo - sft \| \+0.0 \[-[1-9][0-9.]*, \+[1-9][0-9.]*\] \? \|", summary)
    assert "| longpo - base_rope | +50.0 [" in summary
    assert "| sft - base_rope |" in summary and "base - " not in summary and "base_rope - sft" not in summary
    assert _quiet(exp).run() == 0 and len((exp.workdir / "results" / "summary.md").read_text()) == len(summary)
    with pytest.raises(X.SpecError, match="seeds"):
        X.load(YAML, root=ROOT, sets=["seeds=[0,0]"])


def test_the_sweep_picks_per_method_and_a_run_trains_the_picks(tmp_path):
    sets = [f"model={_hf(tmp_path)}", "seeds=[0,1]", "sweep.grid={optim.lr: [1e-5, 2e-5, 4e-5]}",
            "sweep.per_method={sft: {optim.lr: [4e-5, 8e-5]}}", "sweep.dev.min_samples=20",
            "sweep.retention.max_perplexity_ratio=1.05"]
    w = tmp_path / "w"
    sweep = X.load(YAML, root=ROOT, profile="tiny", methods=["longpo", "sft"], sets=sets, workdir=w, sweep=True)
    assert [m.name for m in sweep.models] == ["longpo@lr1e-5", "longpo@lr2e-5", "longpo@lr4e-5", "sft@lr4e-5",
                                              "sft@lr8e-5", "base"]
    log = []
    r = FakeRunner(sweep, out=log.append)
    assert r.run() == 0
    evals = [c for c, _ in r.calls if _tool(c) == "tools/eval_long.py"]
    assert len(evals) == 6 and {(_arg(c, "--seed"), _arg(c, "--samples"), _arg(c, "--lengths")) for c in evals} == {("1", "10", "1024")}
    assert all(_arg(c, "--out").rsplit("/", 1)[1].startswith("eval_dev_") and "--retention" in c for c in evals)
    assert {_arg(c, "--samples-cache") for c in evals} == {str(w / "samples_dev.json")}  # never the test samples' file
    picks = json.loads((w / "results" / "picks.json").read_text())
    # perplexity 30 (1 + lr 2e3): 30.6, 31.2, 32.4, 34.8 against the base's 30 x 1.05 = 31.5; score lr 2e4
    assert picks["base_perplexity"] == 30.0 and picks["methods"]["longpo"]["pick"] == "longpo@lr2e-5"
    assert picks["methods"]["longpo"]["overrides"] == ["optim.lr=2e-5"]
    assert [p["score"] for p in picks["methods"]["longpo"]["points"]] == [0.2, 0.4, 0.8]
    assert picks["methods"]["sft"]["pick"] == "sft@lr4e-5" and "lowest perplexity" in picks["methods"]["sft"]["why"]
    assert any("sft: picked sft@lr4e-5 (no point keeps perplexity <= 31.50: the lowest perplexity)" in x for x in log)
    assert len(list((w / "results").glob("eval_dev_*.json.gz"))) == 6
    md = (w / "results" / "picks.md").read_text()
    assert "| longpo | longpo@lr2e-5 | `optim.lr=2e-5` | 40.0 [" in md and md.count("**pick**") == 2
    assert _quiet(sweep).run() == 0  # resumes: nothing trains again

    run = X.load(YAML, root=ROOT, profile="tiny", methods=["longpo", "sft"], sets=sets, workdir=w)
    by = {m.name: m for m in run.models}
    assert by["longpo"].overrides[-1] == "optim.lr=2e-5" and by["longpo.s1"].overrides[-1] == "optim.lr=2e-5"
    assert by["longpo"].reuse == "longpo@lr2e-5" and by["longpo.s1"].reuse is None
    r = _quiet(run)
    assert r.run() == 0
    trained = [_arg_eq(c, "train.save_dir").rsplit("/", 1)[1] for c, _ in r.calls if _tool(c) == "megatron_longpo.train"]
    assert sorted(trained) == ["longpo.s1", "sft.s1"]  # seed 0: the sweep's training of the pick
    ev = {_arg(c, "--out").rsplit("/", 1)[1]: c for c, _ in r.calls if _tool(c) == "tools/eval_long.py"}
    assert _arg(ev["eval_longpo.json"], "--model").endswith("hf_longpo@lr2e-5") and _arg(ev["eval_longpo.json"], "--seed") == "0"
    s1 = next(c for c, _ in r.calls if _tool(c) == "megatron_longpo.train" and c[-1] == "data.seed=1" and "loss.name=sft" in c)
    assert s1.index("optim.lr=4e-5") > s1.index("optim.lr=1e-5")  # the pick comes after train.overrides: it wins
    summary = (w / "results" / "summary.md").read_text()
    assert "(picked on the dev samples)" in summary and "## Picked on the development samples" in summary
    assert "| longpo | longpo: `loss.name=longpo loss.longpo_nll=sequence optim.lr=2e-5` (picked on the dev samples) | 0, 1 | 3 | 12,000 |" in summary
    assert "run: 2 trainings (4 models; 2 of them the sweep's picks" in X.plan_text(run)

    # another pick later (a wider sweep): the models made with the old one are refused, by name, in one line
    picks["methods"]["longpo"].update(pick="longpo@lr4e-5", overrides=["optim.lr=4e-5"])
    (w / "results" / "picks.json").write_text(json.dumps(picks))
    stale = X.load(YAML, root=ROOT, profile="tiny", methods=["longpo", "sft"], sets=sets, workdir=w)
    with pytest.raises(X.SpecError) as e:
        _quiet(stale).run()
    assert str(e.value).startswith("longpo in ") and "(then optim.lr=2e-5, now optim.lr=4e-5)" in str(e.value)
    assert "remove eval_longpo.json, longpo.train.json there" in str(e.value) and "\n" not in str(e.value)


def test_pick_and_point_names():
    pts = [{"name": "a", "score": 0.5, "perplexity": 40.0}, {"name": "b", "score": 0.3, "perplexity": 30.0},
           {"name": "c", "score": 0.9, "perplexity": None}]
    assert X.pick(pts, 31.0)[0]["name"] == "b" and X.pick(pts, 50.0)[0]["name"] == "a"
    assert X.pick(pts, 20.0)[0]["name"] == "b" and X.pick(pts, None)[0]["name"] == "c"
    assert X.point_name("longpo", {"optim.lr": 0, "loss.beta": 0}, ["2e-5", 0.01]) == "longpo@lr2e-5+beta0.01"
    assert X.point_name("m", {"a.lr": 0, "b.lr": 0, "c.x": 0}, [1e-6, "p/q", True]) == "m@a.lr1e-06+b.lrpq+xTrue"
    assert X.seed_name("sft", 0) == "sft" and X.seed_name("sft", 2) == "sft.s2"


def test_sweep_and_seed_mistakes_are_one_line(tmp_path):
    for kw in ({"sweep": True, "sets": ["sweep=null"]}, {"sweep": True, "sets": ["sweep.dev.seed=0"]},
               {"sweep": True, "sets": ["sweep.grid={lr: [1]}"]}, {"sweep": True, "variants": ["longpo_s30"]},
               {"sets": ["seeds=3"]}, {"sets": ["seeds=[-1]"]}):
        with pytest.raises(X.SpecError) as e:
            X.load(YAML, root=ROOT, workdir=tmp_path, **kw)
        assert "\n" not in str(e.value)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "picks.json").write_text("{}")
    with pytest.raises(X.SpecError, match="not a picks file"):
        X.load(YAML, root=ROOT, workdir=tmp_path)


def test_samples_per_task_count_the_suite_eval_long_runs():
    spec = X.load(YAML, root=ROOT).spec
    assert X.eval_tasks(spec) == list(__import__("megatron_longpo.eval.ruler_tasks", fromlist=["x"]).RULER_TASKS)
    assert X.samples_per_task(spec) == 31 and X.samples_per_task(spec, dev=True) == 10  # 403 and 130 over 13 tasks
    tiny = X.load(YAML, root=ROOT, profile="tiny").spec
    assert X.samples_per_task(tiny) == 1 and X.samples_per_task(tiny, dev=True) == 1
    smoke = X.load(YAML, root=ROOT, profile="tiny", sets=["evaluation.tasks=[]", "evaluation.min_samples=14"]).spec
    assert len(X.eval_tasks(smoke)) == 7 and X.samples_per_task(smoke) == 2  # --suite smoke: its 7 tasks


def test_plan_prints_the_cost_of_the_sweep_and_the_run(capsys):
    assert TOOL.main([str(YAML), "--plan", "--set", "seeds=[0,1,2]", "--workdir", "/nonexistent"]) == 0
    out = capsys.readouterr().out
    assert "seeds: 0, 1, 2 (train.seed and data.seed)" in out and "longpo.s2" in out
    assert "sweep (--sweep): 24 trainings (longpo 6, longpo_lam0 3, longpo_resp 3, sft 3, sft_tokens 3, dpo_policy 3, " \
           "docnll 3), 25 evaluations of 10 samples a task x 13 tasks = 130 a length at 16384 (seed 1)" in out
    assert "run: 21 trainings (21 models; after a sweep, 7 fewer: seed 0 of each method is its pick), 23 evaluations " \
           "of 31 samples a task x 13 tasks = 403 a length at 4096, 8192, 16384 (seed 0)" in out
    assert TOOL.main([str(YAML), "--plan", "--sweep", "--set", "seeds=[0,1,2]"]) == 0
    out = capsys.readouterr().out
    assert "longpo@lr2e-5+beta0.01" in out and "then the run: 14 trainings (21 models" in out


def test_every_model_the_yaml_trains_is_a_valid_config():
    """Each method (and each sweep point) with the experiment's overrides and a seed parses as the trainer
    reads it: e.g. loss.longpo_lambda=0 and train.epochs=2 are accepted."""
    from megatron_longpo.config import load_config

    spec = X.load(YAML, root=ROOT).spec
    models = X.run_models(spec, list(spec["methods"]), ["all"], {}) + X.sweep_models(spec, list(spec["methods"]))
    for m in (m for m in models if m.method):
        cfg = load_config(str(ROOT / spec["train"]["config"]), ["model.checkpoint=x", "data.path=y", *spec["train"]["overrides"],
                                                                *m.overrides, "train.seed=2", "data.seed=2"])
        assert cfg.data.seed == 2
    lam0 = load_config(str(ROOT / spec["train"]["config"]), spec["methods"]["longpo_lam0"]["overrides"])
    assert lam0.loss.longpo_lambda == 0 and lam0.loss.name == "longpo"


def test_jobs_sharing_a_gpu_are_each_capped_at_their_share(tmp_path):
    """hardware.jobs_per_gpu=2 on one GPU: two slots, and every training and evaluation capped at 0.45 of the
    GPU (one 16K training held 50.8 GiB of an 80 GB card uncapped, and the second job ran out of memory); the
    cap is not a setting of the model (its stamp has none)."""
    exp = X.load(YAML, profile="tiny", methods=["longpo", "sft"], root=ROOT, workdir=tmp_path / "w",
                 sets=[f"model={_hf(tmp_path)}", "hardware.gpus=1", "hardware.jobs_per_gpu=2"])
    r = _quiet(exp)
    assert r.slots == [None, None] and r.run() == 0
    trains = [c for c, _ in r.calls if _tool(c) == "megatron_longpo.train"]
    evals = [c for c, _ in r.calls if _tool(c) == "tools/eval_long.py"]
    assert len(trains) == 2 and all(c[-1] == "train.memory_fraction=0.45" for c in trains)
    assert len(evals) == 4 and all(_arg(c, "--memory-fraction") == "0.45" for c in evals)
    assert "memory_fraction" not in (tmp_path / "w" / "longpo.train.json").read_text()
    alone = X.load(YAML, profile="tiny", methods=["longpo"], root=ROOT, workdir=tmp_path / "w",
                   sets=[f"model={_hf(tmp_path)}", "hardware.gpus=1"])
    assert _quiet(alone).memory_fraction is None
