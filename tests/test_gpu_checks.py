"""tools/gpu_checks.py on the CPU: every stage's commands (--dry-run: recorded, none run) name a
tool, module or test that exists, with options that tool declares; nothing of one machine in them."""
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "tools" / "gpu_checks.py")
G = importlib.util.module_from_spec(spec)
sys.modules["gpu_checks"] = G
spec.loader.exec_module(G)

ARGS = {"experiment": ["examples/longpo_smollm2/experiment.yaml", "--profile", "tiny"]}
# where a tool's options are declared besides the tool itself
SHARED = {"tools/build_longpo_pairs.py": ["megatron_longpo/generation/cli.py"], "megatron_longpo.train": ["megatron_longpo/train.py"]}


def commands(stage, tmp_path):
    seen = []

    def record(self, cmd, log, **kw):
        seen.append([str(c) for c in cmd])
        return 0

    orig = G.Checks.run
    G.Checks.run = record
    try:
        argv = [stage, "--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"), *ARGS.get(stage, [])]
        assert G.main(argv) == 0
    finally:
        G.Checks.run = orig
    return seen


def _program(cmd):
    """(what runs, its arguments): tools/X.py, or the module after the last -m."""
    for i, c in enumerate(cmd):
        if c.startswith("tools/") or c.startswith("tests/"):
            return c, cmd[i + 1:]
    i = max(i for i, c in enumerate(cmd) if c == "-m")
    return cmd[i + 1], cmd[i + 2:]


@pytest.mark.parametrize("stage", list(G.STAGES))
def test_every_stage_runs_what_exists(stage, tmp_path):
    cmds = commands(stage, tmp_path)
    assert cmds
    for cmd in cmds:
        prog, args = _program(cmd)
        if prog == "pytest":
            assert all((ROOT / a).is_file() for a in args if a.startswith("tests/"))
            continue
        path = ROOT / prog if prog.startswith(("tools/", "tests/")) else ROOT / (prog.replace(".", "/") + ".py")
        assert path.is_file(), prog
        declared = path.read_text() + "".join((ROOT / s).read_text() for s in SHARED.get(prog, []))
        flags = {a.split("=")[0] for a in args if a.startswith("--")}
        assert [f for f in flags if f'"{f}"' not in declared] == [], f"{prog}: options it does not declare"
        # no path of one machine: every absolute path is under --out / --work or in the clone
        assert [a for a in args if a.startswith("/") and not a.startswith((str(tmp_path), str(ROOT)))] == [], cmd
