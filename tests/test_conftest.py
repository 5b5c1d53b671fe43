"""The CI rule of tests/conftest.py: under CI=true every skip is a failure, outside CI a skip stays a skip.

skip_or_fail and require_llama_cpp only skip; conftest.py's report hooks turn the skip into a failure when
CI=true (as .ci/run sets it). The real conftest.py runs here in a pytester session of its own.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

INNER_TESTS = """
import pytest
from conftest import skip_or_fail

def test_passes():
    pass

def test_skips():
    pytest.skip("no Go toolchain here")

def test_skip_or_fail():
    skip_or_fail("no converter here")

@pytest.mark.skipif(True, reason="marked off")
def test_marked():
    pass

@pytest.fixture
def tool():
    pytest.skip("the fixture found no tool")

def test_fixture(tool):
    pass

@pytest.mark.xfail(strict=True, reason="a known bug")
def test_xfails():
    assert False
"""
REASONS = ["no Go toolchain here", "no converter here", "marked off", "the fixture found no tool"]
# require_llama_cpp where llama_cpp cannot be imported (None in sys.modules makes the import fail)
NO_LLAMA_CPP = """
import sys
from conftest import require_llama_cpp

def test_needs_llama_cpp(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    require_llama_cpp()
"""


@pytest.fixture
def inner(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(test_inner=INNER_TESTS, test_no_llama_cpp=NO_LLAMA_CPP,
                        test_module_skip="import pytest\npytest.importorskip('so8t_no_such_module')\n\n"
                                         "def test_never():\n    pass\n")
    return pytester


def test_skips_stay_skips_outside_ci(inner, monkeypatch):
    monkeypatch.setenv("CI", "false")  # only CI=true is CI, as in .ci/run
    inner.runpytest("test_inner.py").assert_outcomes(passed=1, skipped=4, xfailed=1)
    inner.runpytest("test_module_skip.py").assert_outcomes(skipped=1)
    inner.runpytest("test_no_llama_cpp.py").assert_outcomes(skipped=1)


def test_every_skip_fails_under_ci(inner, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("test_inner.py", "-rfE")
    # a skip in the test is a failure, a skip in setup (a mark, a fixture) an error; the xfail stays
    result.assert_outcomes(passed=1, failed=2, errors=2, xfailed=1)
    for reason in REASONS:
        result.stdout.fnmatch_lines([f"*{reason}*"])
    result.stdout.fnmatch_lines(["*CI=true: every tool is installed there, so this test must run, not be "
                                 "skipped*"])
    module = inner.runpytest("test_module_skip.py")
    module.assert_outcomes(errors=1)
    module.stdout.fnmatch_lines(["*so8t_no_such_module*", "*CI=true: every tool is installed there*"])


def test_require_llama_cpp_fails_under_ci(inner, monkeypatch):
    """The helper tests/test_gguf_tokenizer.py and tests/test_quants.py use instead of inline CI checks."""
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("test_no_llama_cpp.py", "-rf")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*llama-cpp-python is not importable*",
                                 "*CI=true: every tool is installed there*"])
