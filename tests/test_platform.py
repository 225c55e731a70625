"""platform.enable_cpu_fallback patches torch.cuda for megatron-core on the CPU; libraries imported
afterwards must still import (a fresh process: in this one transformers may be imported already)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback only patches on machines without a GPU")
def test_transformers_imports_after_the_cpu_fallback():
    code = ("from megatron_longpo import platform\n"
            "assert platform.enable_cpu_fallback()\n"
            "import torch\n"
            "s = torch.cuda.Stream()\n"
            "with s: s.wait_stream(torch.cuda.current_stream())\n"
            "assert isinstance(s, torch.cuda.Stream) and (torch.cuda.Stream | None) is not None\n"
            "import transformers.generation.continuous_batching  # annotates with torch.cuda.Stream | None\n"
            "from transformers import LlamaConfig\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# the demo itself: tests/test_demo_output.py
