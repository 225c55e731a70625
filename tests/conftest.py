"""Shared fixtures. Markers: `gpu` (needs CUDA; skipped without it), `slow` (minutes on the CPU)."""
import os

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


import sys as _sys
from pathlib import Path as _Path

_sys.path.insert(0, str(_Path(__file__).parent))  # tests/mp.py and tests/workers
