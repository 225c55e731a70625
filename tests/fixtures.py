"""Builders shared by the tests: tiny random Hugging Face models, synthetic pair data, CLI calls."""
import subprocess
import sys
from pathlib import Path

import torch

from megatron_longpo.checks.random_model import GPU_LLAMA, gpu_llama, random_hf_model  # noqa: F401 (the tests import them from here)

ROOT = Path(__file__).resolve().parents[1]


def run_captured(cmd, *, timeout: float, cwd=ROOT, env=None) -> subprocess.CompletedProcess:
    """subprocess.run(cmd, capture_output=True, text=True) that cannot hang on what the command leaves
    behind: the output goes to files (not pipes a leftover grandchild would hold open, such as the
    multiprocessing helpers megatron's checkpoint writer spawns), and the command's own process session
    is killed once it has exited."""
    import os
    import signal
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err, text=True, cwd=cwd, env=env,
                                start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # on a time-out the command, else only its leftovers
            except ProcessLookupError:
                pass
            proc.wait()
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, code, out.read(), err.read())


def run_tool(*args, timeout=600, check=True):
    r = run_captured([sys.executable, *map(str, args)], timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args[0]} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


# tiny_hf_model(out_dir, smollm2_dir, model_type="llama", tied=False, layers=4, random_norms=True, **config):
# a small random Llama/Qwen2 with the SmolLM2 tokenizer; gpu_llama: the GPU tests' random 8-layer Llama
tiny_hf_model = random_hf_model


def build_dataset(tmp: Path, kind: str, n: int, tokenizer_dir: Path, ref_ckpt: Path | None, **kw):
    from megatron_longpo.data.synthetic import write_jsonl

    src = write_jsonl(tmp / f"{kind}.jsonl", kind, n, **kw)
    prefix = tmp / kind
    run_tool(ROOT / "tools/preprocess_pairs.py", "--input", src, "--kind", kind, "--tokenizer", tokenizer_dir,
             "--output", prefix, "--no-progress", "--workers", "1")
    if ref_ckpt is not None:
        run_tool(ROOT / "tools/precompute_ref_logps.py", "--data", prefix, "--model", ref_ckpt)
    return prefix


def read_model_tensors(iteration_dir: Path) -> dict:
    """The model tensors of a dist_checkpointing (torch_dist) iteration directory, read directly
    with torch.distributed.checkpoint in this process (optimizer state left out)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(iteration_dir))
    md = reader.read_metadata()
    sd = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in md.state_dict_metadata.items()
          if isinstance(v, TensorStorageMetadata) and not k.startswith("optimizer")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(sd, storage_reader=reader, no_dist=True)
    return sd
