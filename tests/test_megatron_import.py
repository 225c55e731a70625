"""megatron_import: megatron-core imports without TorchDynamo/Inductor, and what it decorated with
torch.compile still compiles (on first call) and computes the same thing."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_megatron_core_imports_without_the_compiler_and_its_fusions_still_compile():
    code = ("import sys, torch, megatron_longpo\n"
            "import megatron.core, megatron.core.transformer, megatron.core.optimizer\n"
            "from megatron.core.models.gpt import GPTModel\n"
            "assert 'torch._dynamo' not in sys.modules and 'torch._inductor' not in sys.modules, 'compiler imported'\n"
            "assert torch.compile is not megatron_longpo.megatron_import.lazy_compile  # restored after the import\n"
            "from megatron.core.jit import jit_fuser\n"
            "assert jit_fuser is megatron_longpo.megatron_import.lazy_compile, jit_fuser\n"
            "f = megatron_longpo.megatron_import.lazy_compile(lambda x: torch.sin(x) * 2, backend='eager')\n"
            "x = torch.linspace(-3, 3, 7)\n"
            "assert 'torch._dynamo' not in sys.modules\n"
            "assert torch.equal(f(x), torch.sin(x) * 2) and 'torch._dynamo' in sys.modules  # compiled on first call\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_lazy_compile_hands_modules_to_the_real_compile():
    import torch

    from megatron_longpo import megatron_import

    m = torch.nn.Linear(2, 2)
    out = megatron_import.lazy_compile(m, backend="eager")
    assert isinstance(out, torch.nn.Module) and out is not m  # an OptimizedModule around m
    assert megatron_import.lazy_compile()(len) is not len  # the decorator-factory form wraps too
