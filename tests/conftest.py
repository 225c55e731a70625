"""Shared fixtures. Markers: `gpu` (needs CUDA; skipped without it), `slow` (more than a few seconds
on the CPU), `budget(seconds, reason=...)` (a test allowed more than TEST_BUDGET_S, with the reason).

Every test's wall time (setup + call) is held to TEST_BUDGET_S (120 s on the 2-core CI
machine; `MEGATRON_LONGPO_TEST_BUDGET_S` changes it, e.g. on a loaded machine, 0 turns it off): one
slow test must be a decision with a reason, not something that creeps in and pushes CI past its limit."""
import os
import shutil
from pathlib import Path

import pytest
import torch

TEST_BUDGET_S = float(os.environ.get("MEGATRON_LONGPO_TEST_BUDGET_S", 120))

# Under pytest-xdist (`make test`: 2 workers on 2 cores) each worker, and every process it starts,
# computes on one thread: two workers of two OpenMP threads each would put four busy threads on
# two cores, and the threads that spin-wait take the time of the ones that compute.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped where none is found)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on a 2-core CPU")
    config.addinivalue_line("markers", "budget(seconds, reason): allowed more than the default per-test budget")


def budget_of(item) -> float:
    """The wall-time budget of `item`: its budget mark's (which must give the reason), else the default."""
    mark = item.get_closest_marker("budget")
    if mark is None:
        return TEST_BUDGET_S
    if not mark.kwargs.get("reason"):
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.budget needs reason=...")
    return float(mark.args[0])


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Fail a passing test whose setup + call took longer than its budget (the setup includes the
    module and session fixtures the test is the first to need)."""
    outcome = yield
    rep = outcome.get_result()
    spent = item.stash.get(_SPENT, 0.0) + call.duration
    item.stash[_SPENT] = spent
    if rep.when != "call" or TEST_BUDGET_S <= 0 or not rep.passed:
        return
    budget = budget_of(item)
    if spent > budget:
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid} took {spent:.0f} s, over its budget of {budget:.0f} s: make it cheaper, or mark "
                        f"it @pytest.mark.budget(seconds, reason=...) (MEGATRON_LONGPO_TEST_BUDGET_S=0 turns the check off)")


_SPENT = pytest.StashKey[float]()


# The measured seconds of each module (setup + call + teardown of its tests, 2-core CI machine), so that
# `--dist loadfile --no-loadscope-reorder` hands the longest modules out first: two workers finish within
# about one short module of each other instead of one idling while the other runs a long module last.
# Rewrite it with MEGATRON_LONGPO_WRITE_MODULE_SECONDS=tests/module_seconds.json make test.
MODULE_SECONDS = Path(__file__).with_name("module_seconds.json")
_module_seconds: dict[str, float] = {}


def _longest_modules_first(items) -> None:
    import json

    try:
        cost = json.loads(MODULE_SECONDS.read_text())
    except (OSError, ValueError):
        return
    items.sort(key=lambda it: -cost.get(it.nodeid.split("::")[0], 0.0))  # stable: a module's order is kept


def pytest_runtest_logreport(report):
    module = report.nodeid.split("::")[0]
    _module_seconds[module] = _module_seconds.get(module, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MEGATRON_LONGPO_WRITE_MODULE_SECONDS")
    if path and _module_seconds and not os.environ.get("PYTEST_XDIST_WORKER"):
        import json

        Path(path).write_text(json.dumps({k: round(v, 1) for k, v in sorted(_module_seconds.items())}, indent=1) + "\n")


def pytest_collection_modifyitems(config, items):
    _longest_modules_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU found")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _no_distributed_env_leaks():
    """A test that sets a process group up in the pytest process (parallel.init_distributed) writes
    MASTER_PORT & co. into os.environ; every command a later test starts would inherit that port
    and, beside another worker's run, fail with EADDRINUSE. Each test gets the environment back."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def smollm2_dir():
    """The embedded SmolLM2-135M-Instruct as a Hugging Face directory (materialised once, cached)."""
    import fcntl

    from megatron_longpo.models.embedded import default_cache_dir, materialize_default_model

    cache = os.environ.get("MEGATRON_LONGPO_CACHE")
    root = Path(cache) if cache else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    # pytest-xdist workers: one materialises, the others wait and find its copy (two writers would
    # swap the directory under a reader)
    with open(root / ".tests.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return materialize_default_model(cache)


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
    r = run_tool(ROOT / "tools/convert_checkpoint.py", "hf-to-megatron", "--hf-dir", smollm2_dir, "--out", out)
    (out.parent / "convert.log").write_text(r.stdout)  # the converter's report, for the tests that read it
    return out
