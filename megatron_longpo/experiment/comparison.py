"""A comparison of methods (the YAML has `methods`): the base model, the pairs, the datasets and frozen
references, then one job per model (train, export, evaluate) on the GPU slots, then the results."""
from __future__ import annotations

import gzip
import json
import queue
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .results import Results
from .spec import Experiment, ExperimentError, Model, SpecError, _settings, picks_file, samples_per_task
from .steps import PY, last_line, slot_gpus


class Runner(Results):
    """A comparison: the base, the pairs and references, then one job per model, then the table."""

    def __init__(self, exp: Experiment, time_limit: float | None = None, out=print, evaluations_from: Path | None = None):
        super().__init__(exp.spec, exp.workdir, exp.root, time_limit, out)
        self.exp, self.evaluations_from = exp, evaluations_from
        jobs = int(self.hw.get("jobs_per_gpu", 1))
        self.slots = slot_gpus(self.n_gpus, int(self.hw.get("gpus_per_job", 1)), jobs)
        # jobs sharing a GPU: each capped at its share (its allocator frees its cache before going past it),
        # 10% left to the processes' CUDA contexts. Not part of a model's settings: memory, not the model.
        self.memory_fraction = round(0.9 / jobs, 3) if jobs > 1 and self.n_gpus > 0 else None

    def nproc(self, gpus: str | None) -> int:
        return len(gpus.split(",")) if gpus else max(self.n_gpus, 1)

    # ---- the steps
    def run(self) -> int:
        self.w.mkdir(parents=True, exist_ok=True)
        if self.evaluations_from:
            self.bring(Path(self.evaluations_from))
        self.check_stamps()
        if self.exp.picks:
            self.log(f"the overrides picked on the dev samples ({picks_file(self.w)}): "
                     + ", ".join(f"{k} {' '.join(v['overrides'])}" for k, v in self.exp.picks.items()
                                 if k in {m.method for m in self.exp.trained}))
        if all(self.eval_file(m).is_file() for m in self.exp.models):
            return self.results([])  # every model evaluated: the table only
        self.hf = self.base_model()
        if not (self.pairs() and self.datasets()):
            return 0
        failed = self.jobs()
        return self.results(failed)

    def base_model(self) -> str:
        model = self.hf_model(self.spec["model"])
        if not (self.w / "base" / "latest").is_file():
            self.log("import the base model")
            self.sh([PY, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", model, "--out", self.w / "base"],
                    self.w / "import.log")
        return model

    def max_pair_tokens(self) -> int:
        ctx = int(self.spec["context"])
        return ctx - ctx // 32  # the generator counts the chat template approximately: a margin under the context

    def pairs(self) -> bool:
        p, w = self.spec.get("pairs") or {}, self.w
        if (w / "data.json").is_file() or (w / "pairs.jsonl").is_file() and not (w / "pairs.partial").is_file():
            return True
        compact = p.get("compact")
        if compact and not (self.root / compact).is_file():
            raise SpecError(f"pairs.compact: no file {compact} (null: generate the pairs)")
        grow = bool(p.get("grow"))
        if compact and not grow:
            self.log(f"pairs unpacked from {compact}")
            self.sh([PY, "tools/pack_pairs.py", "unpack", compact, "-o", w / "pairs.jsonl", "--docs-out", w / "docs.jsonl"],
                    w / "unpack.log")
            return True
        if not self.time_for("generation"):
            return False
        (w / "pairs.partial").touch()
        committed = w / "pairs.committed.jsonl"  # grow: the committed pairs, the new ones come after them
        if compact and grow and not committed.is_file():
            self.log(f"pairs unpacked from {compact}; generating on over the documents without a pair")
            self.sh([PY, "tools/pack_pairs.py", "unpack", compact, "-o", committed], w / "unpack.log")
        docs = p.get("documents", {})
        if not (w / "docs.jsonl").is_file():
            self.log("documents")
            self.sh([PY, "tools/make_long_documents.py", "--n", docs["n"], "--words", docs["words"], "--seed",
                     docs.get("seed", 0), "--out", w / "docs.jsonl"], w / "documents.log")
        # the documents still without a pair: not in the committed pairs (those tried before and dropped
        # are not in the compact form: tried again), nor in a shard's output of an earlier run (which
        # may have had another number of GPUs)
        earlier = sorted(w.glob("pairs.s*.jsonl"), key=lambda f: int(f.name[len("pairs.s"):-len(".jsonl")]))
        have = {str((json.loads(line).get("meta") or {}).get("id")) for f in [committed, *earlier] if f.is_file()
                for line in f.read_text().splitlines() if line.strip()}
        lines = [line for line in (w / "docs.jsonl").read_text().splitlines(True) if str(json.loads(line)["id"]) not in have]
        gpus = self.per_gpu()
        self.log(f"self-generated pairs ({p['chunk_tokens']}-token chunks, {len(lines)} documents, on "
                 f"{len(gpus)} {'GPU' if self.n_gpus else 'process'}{'s' if len(gpus) > 1 else ''})")
        shards = [w / f"docs.s{i}.jsonl" for i in range(len(gpus))]
        for i, shard in enumerate(shards):
            shard.write_text("".join(lines[i::len(gpus)]))
        outs = [w / f"pairs.s{i}.jsonl" for i in range(len(shards))]
        timeout = self.deadline - time.time() if self.deadline else None

        def generate(i):
            return self.sh([PY, "tools/build_longpo_pairs.py", shards[i], "-o", outs[i], "--backend", "transformers",
                            "--model", self.hf, "--chunk-tokens", p["chunk_tokens"], "--max-chunks", 4,
                            "--questions-per-chunk", 1, "--max-pair-tokens", self.max_pair_tokens(),
                            "--max-new-tokens", p["answer_tokens"], "--question-max-new-tokens", 128, "--no-progress",
                            *p.get("generator_args", [])], w / f"generate.s{i}.log", gpus[i], timeout, ok=(0, 3, 124, 130))

        with ThreadPoolExecutor(len(shards)) as pool:
            codes = list(pool.map(generate, range(len(shards))))
        if any(c in (124, 130) for c in codes):
            self.log("time limit: generation stopped; rerun to resume")
            return False
        parts = ([committed] if committed.is_file() else []) + sorted(set(earlier) | {o for o in outs if o.is_file()},
                                                                      key=lambda f: int(f.name[len("pairs.s"):-len(".jsonl")]))
        (w / "pairs.jsonl").write_text("".join(o.read_text() for o in parts))
        (w / "pairs.partial").unlink()
        self.log("packing the pairs (commit WORKDIR/pairs.compact.jsonl.gz as the YAML's pairs.compact to keep them)")
        kept = [f"generator={Path(self.hf).name}", f"chunk_tokens={p['chunk_tokens']}", "max_chunks=4",
                "questions_per_chunk=1", f"max_pair_tokens={self.max_pair_tokens()}",
                f"max_new_tokens={p['answer_tokens']}", "question_max_new_tokens=128",
                f"extra={' '.join(map(str, p.get('generator_args', [])))}", f"status={max(codes)}"]
        self.sh([PY, "tools/pack_pairs.py", "pack", w / "pairs.jsonl", "-o", w / "pairs.compact.jsonl.gz",
                 "--docs-n", docs["n"], "--docs-words", docs["words"], "--docs-seed", docs.get("seed", 0),
                 *[a for s in kept for a in ("--setting", s)]], w / "pack.log")
        return True

    def datasets(self) -> bool:
        w, ctx = self.w, self.spec["context"]
        if not (w / "data.json").is_file():
            if not self.time_for("preprocessing"):
                return False
            self.log("preprocess")
            self.sh([PY, "tools/preprocess_pairs.py", "--input", w / "pairs.jsonl", "--kind", "longpo", "--tokenizer",
                     self.hf, "--output", w / "data", "--max-length", ctx, "--no-progress"], w / "preprocess.log")
        todo = [k for k in self.exp.references() if not self.exp.reference_file(k).is_file()]
        if todo and not self.time_for("references"):
            return False
        flags = {"short": [], "long": ["--reference-sees-policy"],
                 "long_policy": ["--reference-sees-policy", "--rope-theta", self.spec["rope_theta"]]}
        gpus = self.per_gpu()

        def reference(i_kind):
            i, kind = i_kind
            g = gpus[i % len(gpus)]
            self.log(f"reference: {kind}")
            self.sh([*self.torchrun(1 if g is not None else max(self.n_gpus, 1)), "tools/precompute_ref_logps.py",
                     "--data", w / "data", "--model", w / "base", *flags[kind], "--out", self.exp.reference_file(kind)],
                    w / f"ref_{kind}.log", g)

        with ThreadPoolExecutor(len(gpus)) as pool:
            list(pool.map(reference, enumerate(todo)))
        if any(m.data == "documents" for m in self.exp.trained) and not (w / "docnll_data.json").is_file():
            self.log("preprocess the documents-only control")
            self.sh([PY, "tools/document_nll_data.py", w / "pairs.jsonl", "-o", w / "docnll.jsonl"], w / "docnll.log")
            self.sh([PY, "tools/preprocess_pairs.py", "--input", w / "docnll.jsonl", "--kind", "pair", "--tokenizer",
                     self.hf, "--output", w / "docnll_data", "--max-length", ctx, "--no-progress"], w / "docnll_preprocess.log")
        return True

    def check_stamps(self) -> None:
        """A model already trained (or evaluated) under its name with other settings (another pick, other
        overrides): refused in one line, before anything runs."""
        for m in self.exp.trained:
            old = self.stamp(m.name)
            now = self.train_settings(m)
            if old is None or _settings(old) == now:
                continue
            was, new = [o for o in old.get("overrides", []) if o not in now["overrides"]], \
                [o for o in now["overrides"] if o not in old.get("overrides", [])]
            there = [f for f in (m.name, f"hf_{m.name}", f"eval_{m.name}.json", f"eval_dev_{m.name}.json",
                                 self.stamp_file(m.name).name) if (self.w / f).exists()]
            raise SpecError(f"{m.name} in {self.w} was made with other settings (then {' '.join(was) or '-'}, now "
                            f"{' '.join(new) or '-'}{', ' + old['data'] + ' data' if old.get('data') != m.data else ''}); "
                            f"remove {', '.join(there)} there, or use another --workdir")

    def train_command(self, m: Model, gpus: str | None, name: str | None = None) -> list:
        w, spec = self.w, self.spec
        data = w / ("docnll_data" if m.data == "documents" else "data")
        ref = [f"data.reference={self.exp.reference_file(m.reference)}"] if m.reference != "short" else []
        return [*self.torchrun(self.nproc(gpus)), "-m", "megatron_longpo.train", "--config", spec["train"]["config"],
                f"model.checkpoint={w / 'base'}", f"data.path={data}", f"train.save_dir={w / (name or m.name)}",
                *self.train_settings(m)["overrides"], *ref,
                *([f"train.memory_fraction={self.memory_fraction}"] if self.memory_fraction else [])]

    def job(self, m: Model, gpus: str | None) -> None:
        w, where = self.w, f" on GPU {gpus}" if gpus else ""
        model_dir = self.hf
        out = self.eval_file(m)
        if out.is_file():
            return  # evaluated (on this machine, or its file brought from an earlier one): no training either
        if m.method:
            ck = self.checkpoint(m)
            if self.stamp(m.name) is None:
                self.stamp_file(m.name).write_text(json.dumps({**self.train_settings(m), "checkpoint": ck}, indent=1))
            if not (w / ck / "summary.json").is_file():
                if not self.time_for("training"):
                    return
                self.log(f"train {ck}{where}")
                self.timed("training", self.train_command(m, gpus, ck), w / f"train_{ck}.log", gpus)
                self.log(f"trained {ck}: {last_line(w / f'train_{ck}.log', 'done')}")
            elif ck != m.name:
                self.log(f"{m.name}: the sweep's training {ck} (the same settings)")
            if not (w / f"hf_{ck}" / "config.json").is_file():
                self.sh([PY, "tools/convert_checkpoint.py", "megatron-to-hf", "--megatron-dir", w / ck, "--out",
                         w / f"hf_{ck}"], w / f"export_{ck}.log", gpus)
            model_dir = w / f"hf_{ck}"
        if not self.time_for("evaluation"):
            return
        ev, dev = self.spec["evaluation"], (self.spec.get("sweep") or {}).get("dev") or {}
        self.log(f"evaluate {m.name}{' on the dev samples' if m.dev else ''}{where}")
        self.timed("evaluation", [
            PY, "tools/eval_long.py", "--model", model_dir, *(["--rope-theta", m.rope_theta] if m.rope_theta else []),
            "--lengths", *m.eval_lengths, *(["--tasks", *ev["tasks"]] if ev.get("tasks") else []),
            "--samples", samples_per_task(self.spec, m.dev), "--seed", int(dev.get("seed", 1)) if m.dev else 0,
            "--retention", "--no-progress", "--out", out, "--samples-cache", w / f"samples_{'dev' if m.dev else 'test'}.json",
            *(["--memory-fraction", self.memory_fraction] if self.memory_fraction else []),
            *ev.get("args", []), *(dev.get("args", []) if m.dev else [])],
            out.with_suffix(".log"), gpus.split(",")[0] if gpus else None, ok=(0, 3))
        self.log(f"evaluated {m.name}")

    def jobs(self) -> list[str]:
        """Every model's job on a free slot; the names of those that failed."""
        free: queue.Queue = queue.Queue()
        for s in self.slots:
            free.put(s)
        failed = []

        def one(m: Model):
            gpus = free.get()
            try:
                self.job(m, gpus)
            except ExperimentError as e:
                self.log(f"{m.name} failed: {e}")
                failed.append(m.name)
            finally:
                free.put(gpus)

        with ThreadPoolExecutor(len(self.slots)) as pool:
            list(pool.map(one, self.exp.models))
        return failed

    def bring(self, folder: Path) -> None:
        """--evaluations-from: what another machine made (e.g. a committed WORKDIR/results), copied into the
        work directory where missing: the evaluations and their training stamps (those models are done),
        and the frozen references (small, and tied to the dataset's hash: the trainer refuses another's)."""
        from megatron_longpo.io import atomic_write

        names = [n for m in self.exp.models for n in (self.eval_file(m).name, self.stamp_file(m.name).name)]
        brought = []
        for name in names + [self.exp.reference_file(k).name for k in self.exp.references()]:
            src = next((f for f in (folder / name, folder / f"{name}.gz") if f.is_file()), None)
            if src is None or (self.w / name).is_file():
                continue
            with (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as f, \
                    atomic_write(self.w / name, "wb") as dst:
                shutil.copyfileobj(f, dst)
            brought.append(name)
        self.log(f"{len(brought)} files from {folder}" + (f": {', '.join(brought)}" if brought else ""))
