"""Measure the peak memory (RSS) of `convert_checkpoint.py megatron-to-hf` against the checkpoint.

Not part of the test suite (it writes and reads several GB); run by hand, the numbers go to
docs/checkpoints.md:

    .venv/bin/python tests/workers/export_memory.py --smollm2 ~/.cache/megatron-longpo/SmolLM2-135M-Instruct \
        --work /tmp/export-memory [--synthetic]

Peak RSS is the kernel's ru_maxrss of each child process (os.wait4), so short spikes count.
`--synthetic` builds a random Llama (hidden 2048, 12 layers, untied 49152-token vocabulary,
742M parameters, 2.97 GB in fp32) as a megatron checkpoint in a subprocess, exports it and
deletes both afterwards.
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CLI = ROOT / "tools" / "convert_checkpoint.py"


def run_measured(cmd: list[str], timeout: int = 3600) -> tuple[float, float, str]:
    """(peak RSS in MiB, seconds, output) of `cmd` run as a child process."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return usage.ru_maxrss / 1024, time.time() - t0, out


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


def largest_read(iter_dir: Path) -> int:
    """Bytes of the largest tensor the exporter reads at once (a whole global or one layer slice)."""
    from megatron_longpo.checkpoint.dist_reader import DistCheckpointReader

    r = DistCheckpointReader(iter_dir)
    best = 0
    for k, md in r.tensors.items():
        shape = tuple(md.size)[1:] if k.startswith("decoder.layers.") else tuple(md.size)
        n = 1
        for s in shape:
            n *= s
        best = max(best, n * md.properties.dtype.itemsize)
    return best


def build_synthetic(out: str, tokenizer_from: str) -> None:
    from megatron_longpo import parallel
    from megatron_longpo.checkpoint import dist as ckpt
    from megatron_longpo.models.build import ModelOptions, build_model
    from megatron_longpo.models.hf_config import ModelArch, to_hf_config

    arch = ModelArch(architecture="llama", vocab_size=49152, hidden_size=2048, ffn_hidden_size=5632, num_layers=12,
                     num_attention_heads=16, num_query_groups=4, head_dim=128, max_position_embeddings=4096,
                     rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, qkv_bias=False)
    par = parallel.ParallelConfig()
    parallel.setup(par, seed=0)
    [model] = build_model(arch, par, ModelOptions(use_te=False))
    ckpt.save(ckpt.model_sharded_state_dict([model]), out, iteration=0)
    ckpt.write_model_json(out, arch, {**to_hf_config(arch), "dtype": "float32"})
    tok = Path(out) / "tokenizer"
    tok.mkdir(exist_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (Path(tokenizer_from) / f).is_file():
            shutil.copy(Path(tokenizer_from) / f, tok / f)
    parallel.teardown()


def measure(name: str, ckpt_dir: Path, hf_out: Path, baseline: float) -> str:
    from megatron_longpo.checkpoint import dist as ckpt

    it = ckpt.latest_iteration_dir(ckpt_dir)
    size, big = dir_bytes(it), largest_read(it)
    peak, secs, out = run_measured([sys.executable, str(CLI), "megatron-to-hf", "--megatron-dir", str(ckpt_dir),
                                    "--out", str(hf_out), "--overwrite", "--dtype", "fp32"])
    print(out.strip().splitlines()[-1], flush=True)
    mib = 2**20
    return (f"| {name} | {size / mib:,.0f} MiB | {big / mib:,.0f} MiB | {peak:,.0f} MiB | {baseline:,.0f} MiB | "
            f"{peak - baseline:,.0f} MiB ({(peak - baseline) * mib / big:.1f}x largest) | {secs:.0f} s |")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--smollm2", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--synthetic", action="store_true")
    p.add_argument("--build-synthetic", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.build_synthetic:
        build_synthetic(a.build_synthetic, a.smollm2)
        sys.exit(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    baseline, _, _ = run_measured([sys.executable, "-c", "import torch.distributed.checkpoint, megatron_longpo.checkpoint.export"])
    rows = []
    smol = work / "smollm2-ckpt"
    if not (smol / "latest").is_file():
        run_measured([sys.executable, str(CLI), "hf-to-megatron", "--hf-dir", a.smollm2, "--out", str(smol)])
    rows.append(measure("SmolLM2-135M (tied, 30 layers)", smol, work / "smollm2-hf", baseline))
    shutil.rmtree(work / "smollm2-hf", ignore_errors=True)
    if a.synthetic:
        syn = work / "synthetic-ckpt"
        try:
            peak, secs, _ = run_measured([sys.executable, __file__, "--smollm2", a.smollm2, "--work", str(work),
                                          "--build-synthetic", str(syn)])
            print(f"built the synthetic checkpoint in {secs:.0f} s (peak RSS {peak:,.0f} MiB)", flush=True)
            rows.append(measure("random Llama 742M (untied, 12 layers, hidden 2048)", syn, work / "synthetic-hf", baseline))
        finally:
            shutil.rmtree(syn, ignore_errors=True)
            shutil.rmtree(work / "synthetic-hf", ignore_errors=True)
    print("| checkpoint | size on disk | largest tensor read | peak RSS | baseline (imports) | above baseline | time |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
