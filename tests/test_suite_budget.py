"""The suite's own rule (tests/conftest.py): a test over its wall-time budget fails, unless it is
marked @pytest.mark.budget(seconds, reason=...); a budget mark without a reason is refused."""
import shutil
from pathlib import Path

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py")


def _run(pytester, source: str):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_inner=source)
    for helper in ("fixtures.py", "mp.py"):  # the conftest puts tests/ on sys.path for these
        shutil.copy(CONFTEST.with_name(helper), pytester.path / helper)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q",
                                         "-o", "tmp_path_retention_policy=all")


def test_a_test_over_its_budget_fails_and_a_marked_one_passes(pytester, monkeypatch):
    monkeypatch.setenv("MEGATRON_LONGPO_TEST_BUDGET_S", "0.5")
    r = _run(pytester, """
import time, pytest

def test_slow():
    time.sleep(0.8)

@pytest.mark.budget(5, reason="sleeps on purpose")
def test_slow_but_allowed():
    time.sleep(0.8)

def test_fast():
    pass
""")
    r.assert_outcomes(passed=2, failed=1)
    out = r.stdout.str()
    assert "test_inner.py::test_slow took 1 s, over its budget of 0 s" in out
    assert "FAILED test_inner.py::test_slow " in out


def test_a_budget_mark_needs_a_reason(pytester, monkeypatch):
    monkeypatch.setenv("MEGATRON_LONGPO_TEST_BUDGET_S", "60")
    r = _run(pytester, """
import pytest

@pytest.mark.budget(500)
def test_no_reason():
    pass
""")
    assert r.ret != 0
    assert "@pytest.mark.budget needs reason=" in r.stdout.str() + r.stderr.str()
