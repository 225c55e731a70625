"""A non-editable `pip install .` runs the demo from outside the checkout: the package carries the
data its defaults read (megatron_longpo/resources), and nothing reaches back into examples/.

The install goes to a scratch `--target` folder (no new venv: torch & co. are the test venv's own),
from a copy of what the wheel is built from (setup.py, README, LICENSE, the package), so that the
build leaves nothing in the checkout. About 30-60 s on a 2-core CPU (the SmolLM2 cache warm)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_runs_the_demo_outside_the_checkout(smollm2_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "megatron_longpo", src / "megatron_longpo", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                        "--no-compile", "--target", str(site), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    pkg = site / "megatron_longpo"
    assert (pkg / "resources" / "longpo.jsonl").is_file() and (pkg / "resources" / "retention_qa.jsonl").is_file()
    assert len(list((pkg / "resources" / "documents").glob("*.md"))) == 3

    elsewhere = tmp_path / "elsewhere"  # not the checkout, and no copy of examples/ anywhere near
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(site))  # before the editable install's finder on sys.path
    where = subprocess.run([sys.executable, "-c", "import megatron_longpo.eval.retention as r, megatron_longpo as m; "
                            "print(m.__file__); print(r.DEFAULT_QA)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert where.returncode == 0, where.stderr[-2000:]
    init, qa = where.stdout.split()
    assert Path(init).is_relative_to(site) and Path(qa).is_relative_to(site) and Path(qa).is_file()

    r = subprocess.run([sys.executable, "-m", "megatron_longpo.demo", "--stages", "3", "--new-tokens", "4",
                        "--work-dir", str(elsewhere / "demo")],
                       cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    for n in (1, 2, 3):
        assert f"[{n}/5] " in r.stdout, r.stdout
    assert "[4/5] " not in r.stdout  # --stages 3 stops there
    assert str(pkg / "resources" / "longpo.jsonl") in r.stdout  # the demo's data: the installed copy
    assert "identical greedy tokens" in r.stdout
    assert "2 samples" in r.stdout
    assert (elsewhere / "demo" / "data" / "longpo.bin").is_file()
