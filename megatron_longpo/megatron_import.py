"""Megatron-Core's import without torch.compile's compiler stack.

Some megatron-core modules call `torch.compile` when they are imported: its fusions through
`megatron.core.jit.jit_fuser`, the MoE router directly. A decorated function costs nothing until it
is called, but the decoration itself imports TorchDynamo and Inductor: about 3.5 s of every
process's start on a 2-core machine (9.1 s -> 5.6 s for `import megatron.core`, megatron-core 0.19,
torch 2.14), paid by every rank of every launch. This project turns all of those fusions off
(models/megatron_config.py) and uses no MoE, so none of these functions is ever called.

`install()` (run when `megatron_longpo` is imported) makes `torch.compile`, while a `megatron.core`
module is being executed, return a wrapper that compiles on its first call instead: the same
function, compiled at the same place with the same arguments, only later. Modules, and everything
outside megatron.core's own imports, get the real `torch.compile`. Only stdlib is imported here.
"""

from __future__ import annotations

import functools
import sys
from importlib.abc import MetaPathFinder
from importlib.machinery import PathFinder

PREFIX = "megatron.core"
_state = {"depth": 0, "real": None}


def lazy_compile(model=None, **kwargs):
    """`torch.compile` that compiles a function on its first call. A module (or anything not a plain
    callable) is handed to the real `torch.compile` at once."""
    import torch

    real = _state["real"] or torch.compile
    if model is None:  # used as @torch.compile(...)
        return lambda fn: lazy_compile(fn, **kwargs)
    if isinstance(model, torch.nn.Module) or not callable(model):
        return real(model, **kwargs)
    compiled = []

    @functools.wraps(model)
    def call(*args, **kw):
        if not compiled:
            compiled.append(real(model, **kwargs))
        return compiled[0](*args, **kw)

    return call


def _executing_lazily(exec_module):
    def run(module):
        import torch

        if _state["depth"] == 0:
            _state["real"] = torch.compile
            torch.compile = lazy_compile
        _state["depth"] += 1
        try:
            exec_module(module)
        finally:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                torch.compile = _state["real"]
                _state["real"] = None

    return run


class _MegatronCoreFinder(MetaPathFinder):
    """Finds `megatron.core` and its submodules as the standard path finder does, and wraps their
    execution in `_executing_lazily`."""

    def find_spec(self, name, path=None, target=None):
        if name != PREFIX and not name.startswith(PREFIX + "."):
            return None
        spec = PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = _executing_lazily(spec.loader.exec_module)
        return spec


def install() -> None:
    """Put the finder first on sys.meta_path (once). A megatron.core already imported is left as it is."""
    if not any(isinstance(f, _MegatronCoreFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MegatronCoreFinder())
