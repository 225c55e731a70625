"""Shared fixtures. Markers: `gpu` (needs CUDA; skipped without it), `slow` (minutes on the CPU)."""
import os
import shutil

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where none is found)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU found")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (materialised once, cached)."""
    from megatron_longpo.models.embedded import materialize_default_model

    return materialize_default_model(os.environ.get("MEGATRON_LONGPO_CACHE"))


@pytest.fixture(scope="module")
def module_tmp(request, tmp_path_factory):
    """A directory for one test module's fixtures (checkpoints: up to a GB), removed when the module
    ends unless a test failed meanwhile (then it stays for debugging, like a failed tmp_path)."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    failed = request.session.testsfailed
    yield path
    if request.session.testsfailed == failed:
        shutil.rmtree(path, ignore_errors=True)


import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).parent))  # tests/mp.py and tests/workers


@pytest.fixture(scope="session")
def tiny_llama_ckpt(smollm2_dir, tmp_path_factory):
    """A 4-layer random Llama (hidden 64, GQA 4/2) imported as a megatron-longpo checkpoint."""
    from fixtures import ROOT, run_tool, tiny_hf_model

    tmp = tmp_path_factory.mktemp("tiny_llama")
    hf = tiny_hf_model(tmp / "hf", smollm2_dir, "llama", tied=False)
    run_tool(ROOT / "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", hf, "--out", tmp / "ckpt")
    return tmp / "ckpt"


@pytest.fixture(scope="session")
def tiny_longpo_data(tiny_llama_ckpt, smollm2_dir, tmp_path_factory):
    """8 synthetic 2-turn LongPO samples with reference log-probs from the tiny Llama."""
    from fixtures import build_dataset

    return build_dataset(tmp_path_factory.mktemp("longpo_data"), "longpo", 8, smollm2_dir, tiny_llama_ckpt)


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_dir, tmp_path_factory):
    """SmolLM2 imported as a megatron-longpo checkpoint."""
    from fixtures import ROOT, run_tool

    out = tmp_path_factory.mktemp("smol") / "ckpt"
    run_tool(ROOT / "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", smollm2_dir, "--out", out)
    return out
