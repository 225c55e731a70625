#!/usr/bin/env python3
"""GPU checks and measurements: every number docs/ quotes for a GPU comes from one of these
subcommands. Run on a GPU machine with Transformer Engine and megatron-core installed (`make gpu`,
docs/quickstart.md). Each subcommand runs the project's own tools / tests and appends their output
(warning lines dropped) to a log in --out; `python tools/gpu_checks.py STAGE --help` lists its options.

    python tools/gpu_checks.py tests --out OUT          # pytest -m gpu tests/test_gpu.py
    python tools/gpu_checks.py all --out OUT            # tests, bench-logprobs, train16
    python tools/gpu_checks.py fit7b --out OUT --dry-run   # print the commands, run nothing

Work files (checkpoints, datasets) go to --work and are reused by later stages and reruns.
Exit status: 0 every command ran (their own verdicts are in the logs), 1 one failed or timed out.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
NOISE = re.compile(r"warn|USDT|it/s\]", re.IGNORECASE)  # warning lines and progress-bar frames
MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                  intermediate_size=14336, vocab_size=32000, rms_norm_eps=1e-5, rope_theta=1e6,
                  tie_word_embeddings=False, hidden_act="silu")  # = tools/bench_train_step.py's


class Checks:
    def __init__(self, a: argparse.Namespace):
        self.a, self.out, self.work = a, Path(a.out).resolve(), Path(a.work).resolve()
        self.dry = a.dry_run
        self.failed: list[str] = []
        self.lock = threading.Lock()
        self._hf = None

    # ---- plumbing
    def log(self, text: str) -> None:
        with self.lock:
            print(f"== {time.strftime('%H:%M:%S')} {text}", flush=True)

    def run(self, cmd: list, log: str | None, *, gpus: str | None = None, timeout: float | None = None,
            env: dict | None = None, keep_warnings: bool = False, tail: int | None = None,
            stop: int = signal.SIGTERM) -> int:
        """`cmd` in the repository root; its output, noise dropped (the last `tail` lines when
        given), appended to OUT/log (None: to the terminal); killed with its children at `timeout`."""
        cmd = [str(c) for c in cmd]
        where = f"CUDA_VISIBLE_DEVICES={gpus} " if gpus is not None else ""
        extra = "".join(f"{k}={v} " for k, v in (env or {}).items())
        self.log(f"{where}{extra}{shlex.join(cmd)}" + (f" >> {log}" if log else ""))
        if self.dry:
            return 0
        e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {}),  # this clone's package, installed or not
             "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        if not keep_warnings:
            e.setdefault("PYTHONWARNINGS", "ignore")
        if gpus is not None:
            e["CUDA_VISIBLE_DEVICES"] = gpus
        proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True)
        timer = threading.Timer(timeout, _kill, (proc, stop)) if timeout else None
        if timer:
            timer.start()
        lines = [line for line in proc.stdout if keep_warnings or not NOISE.search(line)]
        rc = proc.wait()
        if timer:
            timer.cancel()
        text = "".join(lines[-tail:] if tail else lines)
        if log:
            with self.lock, open(self.out / log, "a") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        if rc != 0:
            self.log(f"status {rc}: {shlex.join(cmd[:4])} ...")
            with self.lock:
                self.failed.append(shlex.join(cmd[:4]))
        return rc

    def torchrun(self, n: int) -> list:
        from megatron_longpo.launch import torchrun_command

        return torchrun_command(n)

    @property
    def n_gpus(self) -> int:
        if self.dry:
            return 2
        import torch

        return torch.cuda.device_count()

    def hf(self) -> str:
        """SmolLM2-135M-Instruct as a Hugging Face directory (--hf, or the embedded model)."""
        if self._hf is None:
            if self.a.hf:
                self._hf = self.a.hf
            elif self.dry:
                self._hf = "SMOLLM2_HF_DIR"
            else:
                from megatron_longpo.models.embedded import materialize_default_model

                self._hf = str(materialize_default_model())
        return self._hf

    def smollm2(self, w: Path) -> Path:
        """SmolLM2 as a Megatron checkpoint: w/smol."""
        if not (w / "smol" / "latest").is_file():
            self.run([PY, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", self.hf(), "--out", w / "smol"], "prepare.log")
        return w / "smol"

    def longpo_data(self, w: Path, name: str, words: int, ckpt: Path, nproc: int = 1) -> Path:
        """8 synthetic LongPO samples of `words`-word contexts, preprocessed, with ckpt's reference: w/name."""
        if not (w / f"{name}.ref.safetensors").is_file():
            self.run([PY, "tools/make_synthetic_pairs.py", "--kind", "longpo", "--n", 8, "--context-words", words,
                      "--out", w / f"{name}.jsonl"], "prepare.log")
            self.run([PY, "tools/preprocess_pairs.py", "--input", w / f"{name}.jsonl", "--kind", "longpo", "--tokenizer",
                      self.hf(), "--output", w / name, "--fresh", "--no-progress"], "prepare.log", tail=4)
            self.run([*self.torchrun(nproc), "tools/precompute_ref_logps.py", "--data", w / name, "--model", ckpt],
                     "prepare.log", tail=2)
        return w / name

    def small(self) -> tuple[Path, Path]:
        """SmolLM2's checkpoint and 8 LongPO samples of ~4K tokens with their reference."""
        w = self.work / "small"
        ckpt = self.smollm2(w)
        return ckpt, self.longpo_data(w, "long4k", 3000, ckpt)

    def random_llama(self) -> Path:
        """The GPU tests' random 8-layer Llama (megatron_longpo.checks.random_model.gpu_llama) as a checkpoint."""
        w = self.work / "random"
        if not (w / "ckpt" / "latest").is_file():
            self.log(f"random 8-layer Llama -> {w / 'hf'}")
            if not self.dry:
                from megatron_longpo.checks.random_model import gpu_llama

                gpu_llama(w / "hf", Path(self.hf()))
            self.run([PY, "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", w / "hf", "--out", w / "ckpt"], "prepare.log")
        return w / "ckpt"

    def bench_step(self, log: str, jsonl: str, args: list, gpu: str | None = "0", timeout: float | None = None) -> None:
        self.run([PY, "tools/bench_train_step.py", *args, "--jsonl", self.out / jsonl], log, gpus=gpu, timeout=timeout, tail=30)

    def table(self, jsonl: str, md: str | None = None) -> None:
        self.run([PY, "tools/bench_train_step.py", "--table", self.out / jsonl], md)

    def host_memory(self, name: str) -> None:
        if not self.dry:
            (self.out / name).write_text(Path("/proc/meminfo").read_text() if Path("/proc/meminfo").is_file() else "")


def _kill(proc: subprocess.Popen, first: int = signal.SIGTERM) -> None:
    """`first` to the command's whole process group, SIGKILL 5 s later (`timeout -k 5`; a builder
    given SIGINT keeps what it finished and stops within that)."""
    for sig, wait in ((first, 30 if first == signal.SIGINT else 5), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            pass


# ---- the stages: each takes the Checks and its arguments

def demo(c: Checks, a) -> None:
    """The README's GPU quick start on GPU 0 (bf16, TE spec), Python's warnings left on:
    demo_gpu_warnings.txt holds the warning lines a user would see (megatron_longpo/quiet.py)."""
    t0 = time.time()
    rc = c.run([PY, "-m", "megatron_longpo.demo", "--work-dir", c.work / "demo"], "demo_gpu.log", gpus="0", keep_warnings=True)
    if c.dry:
        return
    with open(c.out / "demo_gpu.log", "a") as f:
        f.write(f"demo rc={rc} wall {time.time() - t0:.0f} s\n")
    pattern = re.compile(r"Warning: |^W\d{4} |^note: |^\[transformers\] |^DistributedDataParallel: |%\|")
    warnings = [line for line in (c.out / "demo_gpu.log").read_text().splitlines(True) if pattern.search(line)]
    (c.out / "demo_gpu_warnings.txt").write_text("".join(warnings))
    c.log(f"{len(warnings)} warning line(s) in demo_gpu_warnings.txt")


def tests(c: Checks, a) -> None:
    """pytest -m gpu tests/test_gpu.py (-k: a selection, e.g. prefix_shared)."""
    c.run([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-s", "-p", "no:cacheprovider",
           *(["-k", a.k] if a.k else [])], "gpu_tests.log")


def numerics(c: Checks, a) -> None:
    """One step's bf16 gradient against transformers' on the same batch: the documents, then the
    word-salad sample (tools/check_numerics.py; docs/logprobs.md "Numerics")."""
    c.run([PY, "tools/check_numerics.py", "--json", c.out / "numerics_documents.json"], "numerics.log")
    c.run([PY, "tools/check_numerics.py", "--synthetic-words", 3000, "--json", c.out / "numerics_synthetic.json"], "numerics.log")


def bench_logprobs(c: Checks, a) -> None:
    """tools/bench_logprobs.py with its defaults."""
    c.run([PY, "tools/bench_logprobs.py"], "bench_logprobs.log")


def attn(c: Checks, a) -> None:
    """TE THD attention at CP=2 against one GPU (megatron_longpo.checks.cp_attention; 2 GPUs)."""
    c.run([*c.torchrun(2), "-m", "megatron_longpo.checks.cp_attention"], "diag.log", timeout=120)


def cpgrads(c: Checks, a) -> None:
    """Per-parameter gradients of one step, CP=2 against CP=1, next to the floors: two samples per
    micro-batch (packing), the local spec in bf16 (unfused attention, no CP) and the fp32 reference
    (local spec); tools/compare_grads.py prints the table into diag.log (docs/logprobs.md)."""
    smol, data = c.small()
    other = "1" if c.n_gpus >= 2 else "0"
    for model in a.models:
        ckpt = c.random_llama() if model == "random" else smol
        for loss in a.losses:
            p = c.work / "small" / f"{model}.{loss}"
            c.log(f"per-parameter gradients, {model}, {loss}, CP=2 vs CP=1")
            common = [f"model.checkpoint={ckpt}", f"data.path={data}", "data.global_batch_size=2", "train.steps=1",
                      f"loss.name={loss}", "loss.longpo_lambda=1.0", "optim.distributed_optimizer=false", "model.bf16=true",
                      f"train.save_dir={c.work / 'small' / 'unused'}", "train.tensorboard=false"]

            def grads(job):
                n, suffix, gpu, *extra = job
                if suffix == "cp2" or not Path(f"{p}.{suffix}.pt").is_file():  # CP=2: always run again
                    c.run([*c.torchrun(n), "-m", "megatron_longpo.checks.first_step", f"{p}.{suffix}.pt", *common, *extra],
                          "cp_runs.log", gpus=gpu, timeout=240, env=dict(e.split("=", 1) for e in a.cp2_env) if n == 2 else None)

            grads((2, "cp2", None, "parallel.context_parallel=2"))
            with ThreadPoolExecutor(2) as pool:  # the one-GPU runs, two at a time
                list(pool.map(grads, [(1, "cp1", "0"), (1, "mb2", other, "data.samples_per_microbatch=2")]))
                list(pool.map(grads, [(1, "ref32", "0", "model.bf16=false", "model.transformer_engine=false"),
                                      (1, "local16", other, "model.transformer_engine=false")]))
            c.run([PY, "tools/compare_grads.py", p], "diag.log")


def prefix(c: Checks, a) -> None:
    """The prefix-sharing checks of tests/test_gpu.py (pytest -m gpu -k prefix_shared)."""
    c.run([PY, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py", "-k", "prefix_shared", "-s", "-p", "no:cacheprovider"],
          "prefix.log", tail=30)


def bench_step(c: Checks, a) -> None:
    """tools/bench_train_step.py on GPU 0, 4 Mistral-7B layers, one process per configuration
    (a process that ran out of memory keeps some); the table into bench_step.log (docs/prefix_sharing.md)."""
    configs = a.config or [f"two none {a.lengths}", f"shared none {a.lengths}", f"two full {a.full_lengths}",
                           f"shared full {a.full_lengths_shared}"]
    for conf in configs:
        layout, recompute, lengths, *flags = conf.split()
        c.bench_step("bench_step.log", "bench_step.jsonl",
                     ["--gpus", 1, "--layers", 4, "--layouts", layout, *(["--recompute", "full"] if recompute == "full" else []),
                      "--lengths", lengths, *flags, "--iters", 2, *(["--profile", a.profile] if a.profile else [])], timeout=200)
    c.table("bench_step.jsonl", "bench_step.log")


def train16(c: Checks, a) -> None:
    """SmolLM2, LongPO, 8 synthetic samples of ~16K tokens: 6 steps at CP=2, then the first step at
    CP=1 (one GPU: 6 steps at CP=1); step lines into train16.log (docs/training.md)."""
    w = c.work / "train"
    ckpt = c.smollm2(w)
    data = c.longpo_data(w, "long16k", 11500, ckpt, nproc=min(max(c.n_gpus, 1), 2))
    for n in ([2, 1] if c.n_gpus >= 2 else [1]):
        steps = 6 if n == 2 or c.n_gpus == 1 else 1
        c.run([*c.torchrun(n), "-m", "megatron_longpo.train", f"model.checkpoint={ckpt}", f"data.path={data}",
               f"parallel.context_parallel={n}", "model.bf16=true", "model.rope_theta=1000000", "loss.name=longpo",
               "loss.longpo_lambda=0.01", "data.global_batch_size=2", f"train.steps={steps}", "optim.lr=2e-5",
               "optim.warmup_fraction=0", f"train.save_dir={w / f'run_cp{n}'}", "train.stall_seconds=40",
               "train.tensorboard=false", *a.extra], "train16.log", timeout=150, tail=14)


def train_tp2(c: Checks, a) -> None:
    """The random 8-layer Llama (8 heads / 4 KV heads: TP=2 divides them) on the ~4K-token LongPO
    data, 4 steps each: TP=1 on one GPU, TP=2, TP=2 with sequence parallelism (docs/training.md)."""
    _, data = c.small()
    ckpt = c.random_llama()
    for i, v in enumerate(a.variant or ["1 parallel.tensor_parallel=1", "2 parallel.tensor_parallel=2",
                                        "2 parallel.tensor_parallel=2 parallel.sequence_parallel=true"]):
        n, *over = v.split()
        if not c.dry:
            with open(c.out / "train_tp2.log", "a") as f:
                f.write(f"== {n} GPU(s): {' '.join(over)}\n")
        c.run([*c.torchrun(int(n)), "-m", "megatron_longpo.train", f"model.checkpoint={ckpt}", f"data.path={data}",
               "model.bf16=true", "loss.name=longpo", "data.global_batch_size=2", "train.steps=4", "optim.lr=1e-4",
               "optim.warmup_fraction=0", f"train.save_dir={c.work / 'random' / f'run_tp{i}'}", "train.tensorboard=false",
               "train.stall_seconds=40", *over], "train_tp2.log", timeout=240, tail=8)


def experiment(c: Checks, a) -> None:
    """An experiment YAML (tools/experiment.py), its work directory under --work; its table,
    results/ and packed pairs copied to --out (commit pairs.compact.jsonl.gz to keep the pairs)."""
    w = c.work / Path(a.yaml).parent.name
    c.run([PY, "tools/experiment.py", a.yaml, "--workdir", w, *a.args], "experiment.log")
    if c.dry:
        return
    import shutil

    for name in ("table.md", "pairs.compact.jsonl.gz", "pairs.jsonl.summary.json"):
        if (w / name).is_file():
            shutil.copy(w / name, c.out / name)
    if (w / "results").is_dir():
        shutil.copytree(w / "results", c.out / "results", dirs_exist_ok=True)


def _full_7b(a) -> list:
    """The full 32-layer Mistral-7B shape (random weights), one prefix-shared LongPO pair, the
    paper's NLL, full recompute, Adam on the CPU for FRACTION of the parameters, bf16 gradients."""
    return ["--layers", 32, "--layouts", "shared", "--longpo-nll", "sequence", "--recompute", "full",
            "--offload", a.fraction, "--grad-dtype", "bf16"]


def maxlen(c: Checks, a) -> None:
    """The longest pair on every GPU here (CP = the GPU count), fit7b's memory settings; one process
    per length (docs/training.md)."""
    n = c.n_gpus
    for length in a.lengths:
        c.bench_step("maxlen.log", "maxlen.jsonl", ["--gpus", n, "--context-parallel", n, *_full_7b(a), "--lengths", length,
                                                    "--warmup", 1, "--iters", 1], gpu=None, timeout=a.seconds)
    c.table("maxlen.jsonl", "maxlen_table.md")
    c.host_memory("maxlen_host.txt")


def fit7b(c: Checks, a) -> None:
    """The full 7B on ONE GPU (docs/training.md, "Will it fit"): the plan, then s/pair, tokens/s and
    the peak against the plan at each length."""
    cfg = c.work / "mistral7b_32l.json"
    if not c.dry:
        c.work.mkdir(parents=True, exist_ok=True)
        cfg.write_text(json.dumps({**MISTRAL_7B, "num_hidden_layers": 32, "max_position_embeddings": 262144}))
    c.run([PY, "-m", "megatron_longpo.train", "--plan", "--hf-config", cfg, "--length", 131072, "data.share_prefix=true",
           "model.recompute=full", "optim.cpu_offload=true", f"optim.offload_fraction={a.fraction}", "optim.grad_dtype=bf16"],
          "fit7b_plan.txt")
    c.bench_step("fit7b_A.log", "fit7b.jsonl", ["--gpus", 1, *_full_7b(a), "--lengths", a.lengths, "--warmup", 1,
                                                "--iters", 1, "--timeout", a.seconds])
    c.table("fit7b.jsonl", "fit7b_table.md")
    c.host_memory("fit7b_host.txt")


def fit7b_longest(c: Checks, a) -> None:
    """The longest pair of the full 7B on ONE GPU: from --probe-from up to --probe-max, bisecting
    at 16K while --deadline allows, each probe after a warm-up step."""
    c.bench_step("fit7b_B.log", "fit7b.jsonl", ["--gpus", 1, *_full_7b(a), "--until-oom", "--lengths", a.probe_from,
                                                "--max-length", a.probe_max, "--granularity", 16384, "--warmup", 1,
                                                "--iters", 1, "--deadline", a.deadline, "--timeout", a.seconds])
    c.table("fit7b.jsonl", "fit7b_table.md")
    c.host_memory("fit7b_host.txt")


def memextra(c: Checks, a) -> None:
    """The other memory keys on 4 Mistral-7B layers: model.activation_offload_layers against none
    (megatron-core refuses it with recompute), and optim.offload_overlap against offload without it."""
    for layers in (0, a.act_layers):
        c.bench_step("memextra.log", "memextra.jsonl", ["--gpus", 1, "--layers", 4, "--layouts", "shared", "--lengths",
                                                        a.act_lengths, "--activation-offload", layers, "--warmup", 1,
                                                        "--iters", 2], timeout=150)
    for overlap in ([], ["--offload-overlap"]):
        c.bench_step("memextra.log", "memextra.jsonl", ["--gpus", 1, "--layers", 4, "--layouts", "shared", "--lengths", 32768,
                                                        "--recompute", "full", "--offload", 1.0, "--grad-dtype", "bf16",
                                                        *overlap, "--warmup", 1, "--iters", 2], timeout=150)
    c.table("memextra.jsonl", "memextra_table.md")


def gen(c: Checks, a) -> None:
    """Self-generated LongPO pairs from SmolLM2 on ~15K-token documents (the settings of
    examples/longpo_smollm2): records/s; --ab N first times N documents with both decoders.
    Resumable: a rerun continues WORK/gen/pairs.jsonl; the pairs come back gzipped in --out."""
    w = c.work / "gen"
    if not c.dry:
        w.mkdir(parents=True, exist_ok=True)
    if not (w / "docs.jsonl").is_file():
        c.run([PY, "tools/make_long_documents.py", "--n", a.docs, "--words", a.words, "--seed", 0, "--out", w / "all.jsonl"],
              "gen20.log")
        if not c.dry:  # documents FROM..: the first FROM were generated before
            lines = (w / "all.jsonl").read_text().splitlines(True)
            (w / "docs.jsonl").write_text("".join(lines[a.skip:]))

    def build(src, out, seconds, *extra, log="gen20.log"):
        c.run([PY, "tools/build_longpo_pairs.py", src, "-o", out, "--backend", "transformers", "--model", c.hf(),
               "--chunk-tokens", 3000, "--max-chunks", 4, "--questions-per-chunk", 1, "--max-pair-tokens", 15872,
               "--max-new-tokens", 256, "--question-max-new-tokens", 128, "--no-progress", "--dtype", "bfloat16", *extra],
              log, timeout=seconds, stop=signal.SIGINT)

    if a.ab and not (c.out / "gen20_ab.log").is_file():
        if not c.dry:
            (w / "ab.jsonl").write_text("".join((w / "docs.jsonl").read_text().splitlines(True)[: a.ab]))
        for decode in ("generate", "prefill"):
            t0 = time.time()
            build(w / "ab.jsonl", w / f"ab_{decode}.jsonl", a.ab_seconds, "--decode", decode, "--batch-size", a.ab_batch_size,
                  "--docs-per-batch", a.ab, log="gen20_ab.log")
            if not c.dry:
                with open(c.out / "gen20_ab.log", "a") as f:
                    f.write(f"--decode {decode}, {a.ab} documents: wall {time.time() - t0:.0f} s\n")
    t0 = time.time()
    build(w / "docs.jsonl", w / "pairs.jsonl", a.seconds, "--batch-size", a.batch_size, "--docs-per-batch", a.docs_per_batch)
    if c.dry or not (w / "pairs.jsonl").is_file():
        return
    import gzip
    import shutil

    n = len((w / "pairs.jsonl").read_text().splitlines())
    with open(c.out / "gen20.log", "a") as f:
        f.write(f"wall {time.time() - t0:.0f} s; {n} records in {w / 'pairs.jsonl'}\n")
    with open(w / "pairs.jsonl", "rb") as src, gzip.open(c.out / "pairs.jsonl.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    if (w / "pairs.jsonl.summary.json").is_file():
        shutil.copy(w / "pairs.jsonl.summary.json", c.out)


def diag(c: Checks, a) -> None:
    """attn, then cpgrads."""
    attn(c, a)
    cpgrads(c, a)


def every(c: Checks, a) -> None:
    """tests, bench-logprobs and train16."""
    a.k = None
    a.extra = []
    for stage in (tests, bench_logprobs, train16):
        stage(c, a)


STAGES = {  # name: (what runs, one line of help)
    "demo": (demo, "the README's GPU quick start on GPU 0; warning lines counted"),
    "tests": (tests, "pytest -m gpu tests/test_gpu.py"),
    "numerics": (numerics, "tools/check_numerics.py: bf16 gradient vs transformers' (documents, word salad)"),
    "bench-logprobs": (bench_logprobs, "tools/bench_logprobs.py"),
    "attn": (attn, "TE THD attention, CP=2 vs one GPU (2 GPUs)"),
    "cpgrads": (cpgrads, "one step's gradients, CP=2 vs CP=1 and the floors; tools/compare_grads.py"),
    "diag": (diag, "attn, then cpgrads"),
    "prefix": (prefix, "pytest -m gpu -k prefix_shared"),
    "bench-step": (bench_step, "tools/bench_train_step.py, 4 Mistral-7B layers, two vs prefix-shared"),
    "train16": (train16, "SmolLM2 LongPO steps at ~16K tokens, CP=2 and CP=1"),
    "train-tp2": (train_tp2, "the random Llama at TP=1, TP=2, TP=2 + sequence parallel"),
    "experiment": (experiment, "an experiment YAML (tools/experiment.py), results copied to --out"),
    "maxlen": (maxlen, "the longest full-7B pair on every GPU here"),
    "fit7b": (fit7b, "the full 7B on one GPU: the plan, then 32K, 64K, 128K"),
    "fit7b-longest": (fit7b_longest, "the full 7B on one GPU: the longest pair"),
    "memextra": (memextra, "activation offload and offload overlap, 4 Mistral-7B layers"),
    "gen": (gen, "self-generated LongPO pairs from SmolLM2: records/s"),
    "all": (every, "tests, bench-logprobs, train16"),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", default="runs/gpu_checks/out", help="where the logs go (default %(default)s)")
    common.add_argument("--work", default="runs/gpu_checks/work", help="checkpoints and data, reused (default %(default)s)")
    common.add_argument("--hf", help="SmolLM2-135M-Instruct as a Hugging Face directory (default: the embedded one)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    sub = p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    s = {name: sub.add_parser(name, parents=[common], help=short, description=fn.__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
         for name, (fn, short) in STAGES.items()}
    s["tests"].add_argument("-k", help="pytest -k: a selection of the GPU tests")
    for name in ("cpgrads", "diag"):
        s[name].add_argument("--models", nargs="+", default=["random", "smollm2"], choices=["random", "smollm2"])
        s[name].add_argument("--losses", nargs="+", default=["longpo", "sft"],
                             help="LongPO, and SFT (NLL only: no chosen-minus-rejected difference in its gradient)")
        s[name].add_argument("--cp2-env", nargs="*", default=[], metavar="KEY=VALUE",
                             help="environment of the CP=2 run, e.g. CUDA_LAUNCH_BLOCKING=1 or NVTE_ALLOW_NONDETERMINISTIC_ALGO=0")
    b = s["bench-step"]
    b.add_argument("--lengths", default="16384,32768,65536,131072", help="of the runs without recompute")
    b.add_argument("--full-lengths", default="65536,131072", help="two sequences, full recompute")
    b.add_argument("--full-lengths-shared", default="131072", help="prefix-shared, full recompute")
    b.add_argument("--config", action="append", metavar='"LAYOUT RECOMPUTE LENGTHS [FLAGS]"',
                   help='instead of the four defaults, e.g. "shared none 65536,131072 --longpo-nll responses" (repeatable)')
    b.add_argument("--profile", type=int, default=0, metavar="N", help="print each step's N costliest kernels")
    s["train16"].add_argument("--extra", nargs="*", default=[], metavar="KEY=VALUE", help="more training overrides")
    s["train-tp2"].add_argument("--variant", action="append", metavar='"GPUS KEY=VALUE ..."',
                                help="instead of TP=1, TP=2, TP=2 + sequence parallel (repeatable)")
    e = s["experiment"]
    e.add_argument("yaml", help="e.g. examples/longpo_smollm2/experiment.yaml (this tool's options come before it)")
    e.add_argument("args", nargs=argparse.REMAINDER, help="tools/experiment.py's options (--profile, --set, --time-limit ...)")
    for name in ("maxlen", "fit7b", "fit7b-longest"):
        s[name].add_argument("--fraction", type=float, default=0.75, help="the optimizer's share on the CPU")
    s["maxlen"].add_argument("--lengths", nargs="+", type=int, default=[262144])
    s["maxlen"].add_argument("--seconds", type=float, default=420, help="per length")
    s["fit7b"].add_argument("--lengths", default="32768,65536,131072")
    s["fit7b"].add_argument("--seconds", type=float, default=390, help="tools/bench_train_step.py --timeout")
    f = s["fit7b-longest"]
    f.add_argument("--probe-from", type=int, default=147456)
    f.add_argument("--probe-max", type=int, default=163840)
    f.add_argument("--deadline", type=float, default=240, help="no bisection probe starts after this many seconds")
    f.add_argument("--seconds", type=float, default=300, help="tools/bench_train_step.py --timeout")
    s["memextra"].add_argument("--act-layers", type=int, default=3, help="model.activation_offload_layers")
    s["memextra"].add_argument("--act-lengths", default="32768")
    g = s["gen"]
    g.add_argument("--docs", type=int, default=512)
    g.add_argument("--words", type=int, default=9300)
    g.add_argument("--from", dest="skip", type=int, default=0, metavar="K",
                   help="only documents K.. (the first K were generated before: the compact file's header says which)")
    g.add_argument("--ab", type=int, default=0, metavar="N", help="first time N documents with --decode generate and prefill")
    g.add_argument("--ab-seconds", type=float, default=150)
    g.add_argument("--ab-batch-size", type=int, default=16)
    g.add_argument("--seconds", type=float, default=420, help="then stop (SIGINT: what is finished is kept; rerun to resume)")
    g.add_argument("--batch-size", type=int, default=128)
    g.add_argument("--docs-per-batch", type=int, default=64)
    s["all"].set_defaults(k=None, extra=[])
    return p


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    c = Checks(a)
    if not c.dry:
        c.out.mkdir(parents=True, exist_ok=True)
        c.work.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"], capture_output=True, text=True)
        (c.out / "gpus.txt").write_text(r.stdout)
        print(r.stdout, end="")
    STAGES[a.stage][0](c, a)
    if c.failed:
        print(f"{len(c.failed)} command(s) failed or timed out (their logs are in {c.out}):", *c.failed, sep="\n  ",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
