"""Rounds: LongPO's iterative context extension (examples/longpo_iterative/experiment.yaml; docs/iterative.md)."""
from __future__ import annotations

import json
from pathlib import Path

from .spec import ExperimentError, Round, Rounds
from .steps import PY, Steps, last_line


class RoundsRunner(Steps):
    """Round r: import G (round r-1's export; round 1: `model`), documents, pairs by G, preprocess
    at L_r, G's reference log-probs at G's own RoPE base, train at θ_r, export, check the export."""

    def __init__(self, exp: Rounds, time_limit: float | None = None, out=print):
        super().__init__(exp.spec, exp.workdir, exp.root, time_limit, out)
        self.exp = exp

    def launcher(self) -> list:
        """The reference's and the training's launcher: `hardware.launcher` (a list: your torchrun
        for several nodes), else torchrun with one process per GPU here."""
        own = self.hw.get("launcher")
        return list(own) if own else self.torchrun(max(self.n_gpus, 1))

    def run(self) -> int:
        self.w.mkdir(parents=True, exist_ok=True)
        gen = self.hf_model(self.spec["model"])
        for r in self.exp.rounds:
            gen = self.round(r, gen)
            if gen is None:
                return 0
        self.log(f"final model: {gen}")
        return 0

    def round(self, r: Round, gen: str) -> str | None:
        """Round r with generator `gen`; the export's directory (None: stopped by the time limit)."""
        s, d, L, n = self.spec, self.w / f"round{r.index}", r.length, r.index
        d.mkdir(parents=True, exist_ok=True)
        self.log(f"round {n}: generator / initial policy / reference = {gen}; target length {L}")
        if not (d / "init" / "latest").is_file():
            self.log(f"round {n}: import {gen} (HF -> Megatron): the initial policy and the reference")
            self.sh([PY, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", gen, "--out", d / "init"],
                    d / "import.log")
        base_theta = float(json.loads((d / "init" / "model.json").read_text())["arch"]["rope_theta"])
        theta = r.rope_theta if r.rope_theta is not None else base_theta * float(s.get("rope_factor", 10))
        self.log(f"round {n}: RoPE base {base_theta:g} (reference) -> {theta:g} (policy); chunks of {r.chunk_tokens} "
                 f"tokens; pairs up to {L} tokens; {r.config}")
        docs_spec, p = s["documents"], s["pairs"]
        docs = docs_spec.get("path") or d / "docs.jsonl"
        if not docs_spec.get("path") and not Path(docs).is_file():
            self.log(f"round {n}: documents")
            self.sh([PY, "tools/make_long_documents.py", "--n", docs_spec["n"], "--words",
                     int(L * float(docs_spec["words_per_token"])), "--seed", n, "--out", docs], d / "documents.log")
        if not (d / "data.json").is_file():
            if not self.time_for("generation"):
                return None
            self.log(f"round {n}: self-generated pairs with {gen}")
            self.sh([PY, "tools/build_longpo_pairs.py", docs, "-o", d / "pairs.jsonl", "--backend", "transformers",
                     "--model", gen, "--max-chunk-tokens", r.chunk_tokens, "--max-chunks", 4, "--questions-per-chunk", 1,
                     "--max-pair-tokens", L - L // 32, "--max-new-tokens", p.get("answer_tokens", 1024),
                     "--chosen-temperature", p.get("answer_temperature", 0), "--seed", n, "--no-progress",
                     *p.get("generator_args", [])], d / "generate.log", ok=(0, 3))
            if not (d / "pairs.jsonl").is_file() or (d / "pairs.jsonl").stat().st_size == 0:
                raise ExperimentError(f"round {n} generated no pair (see {d / 'pairs.jsonl.summary.json'}, {d / 'generate.log'})")
            self.log(f"round {n}: preprocess at {L} tokens")
            self.sh([PY, "tools/preprocess_pairs.py", "--input", d / "pairs.jsonl", "--kind", "longpo", "--tokenizer", gen,
                     "--output", d / "data", "--max-length", L, "--no-progress"], d / "preprocess.log")
        if not (d / "data.ref.safetensors").is_file():
            if not self.time_for("references"):
                return None
            self.log(f"round {n}: reference log-probs on the short contexts (pi_S at RoPE base {base_theta:g})")
            self.sh([*self.launcher(), "tools/precompute_ref_logps.py", "--data", d / "data", "--model", d / "init"],
                    d / "reference.log")
        if not (d / "train" / "summary.json").is_file():
            if not self.time_for("training"):
                return None
            t = s.get("train") or {}
            self.log(f"round {n}: train the policy at RoPE base {theta:g}, max_position_embeddings {L}")
            self.sh([*self.launcher(), "-m", "megatron_longpo.train", "--config", r.config, f"model.checkpoint={d / 'init'}",
                     f"data.path={d / 'data'}", f"model.rope_theta={theta}", f"model.max_position_embeddings={L}",
                     f"train.save_dir={d / 'train'}", *([f"train.steps={t['steps']}"] if t.get("steps") else []),
                     *t.get("overrides", [])], d / "train.log")
            self.log(f"round {n}: {last_line(d / 'train.log', 'done')}")
        hf = d / f"hf_round{n}"
        if not (hf / "config.json").is_file():
            self.log(f"round {n}: export to HF")
            self.sh([PY, "tools/convert_checkpoint.py", "megatron-to-hf", "--megatron-dir", d / "train", "--out", hf],
                    d / "export.log")
        cfg = json.loads((hf / "config.json").read_text())
        got_theta, got_len = cfg.get("rope_theta"), cfg.get("max_position_embeddings")
        if got_theta is None or float(got_theta) != theta or int(got_len) != L:
            raise ExperimentError(f"{hf / 'config.json'} says rope_theta {got_theta}, max_position_embeddings {got_len}; "
                                  f"round {n} trained at {theta:g}, {L}")
        self.log(f"round {n} done: {hf} (rope_theta {float(got_theta):g}, max_position_embeddings {got_len})")
        return str(hf)
