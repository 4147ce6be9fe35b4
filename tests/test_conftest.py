"""The suite's own rules (tests/conftest.py), run on small test files by a pytest of their own.

A test that needs a service skips without it and fails under ``CI=true``; an aiohttp session left open
(issue 27, item 8) fails the run instead of printing a warning after its pass line.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

LEAKS = """
import asyncio

import aiohttp

kept = []


async def open_session(keep: bool, close: bool) -> None:
    session = aiohttp.ClientSession()
    if keep:
        kept.append(session)
    if close:
        await session.close()


def test_keeps_one_open() -> None:
    asyncio.run(open_session(keep=True, close=False))


def test_drops_one_unclosed() -> None:
    asyncio.run(open_session(keep=False, close=False))


def test_closes_its_own() -> None:
    asyncio.run(open_session(keep=True, close=True))
"""

SERVICES = """
import pytest

import tests.conftest

tests.conftest.SERVICES["redis"] = lambda: "redis-server not installed (Debian package 'redis-server')"
tests.conftest.SERVICES["nginx"] = lambda: None  # present, whatever this machine has: the test skips by itself


@pytest.mark.redis
def test_needs_redis() -> None:
    pass


@pytest.mark.nginx
def test_skips_by_itself() -> None:
    pytest.skip("no database URL")
"""


ROOT = Path(__file__).resolve().parents[1]
QUIET = ("-W", "ignore::pytest.PytestUnknownMarkWarning")  # the markers are registered in pyproject.toml


def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, source: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_it=source)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # only the suite's own hooks: a quicker start
    # `-p tests.conftest` imports the suite's package: the repository's root must be on the path, as it is
    # for `python -m pytest` run there, whatever the environment says.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return pytester.runpytest_subprocess("-p", "tests.conftest", "-p", "no:cacheprovider", "-rs", *QUIET, *args)


def test_an_aiohttp_session_left_open_fails_the_run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(pytester, monkeypatch, LEAKS, "-k", "not closes")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of aiohttp sessions closed*",
            "*test_it.py::test_drops_one_unclosed: Unclosed client session*",
            "*still open at the end: <aiohttp.client.ClientSession*",
            "*2 passed*1 error*",
        ]
    )


def test_closed_sessions_pass(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    result = run(pytester, monkeypatch, LEAKS, "-k", "closes")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()


def test_a_missing_service_skips_naming_its_package(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = run(pytester, monkeypatch, SERVICES)
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    result.stdout.fnmatch_lines(["*SKIPPED*needs redis*Debian package 'redis-server'*", "*2 skipped*"])


def test_under_ci_a_missing_service_fails(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = run(pytester, monkeypatch, SERVICES)
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str()
    result.stdout.fnmatch_lines(
        [
            "*needs redis*Debian package 'redis-server'*(under CI=true a missing service is a failure)*",
            "*under CI=true a test that needs nginx may not skip: no database URL*",
            "*1 failed*1 error*",
        ]
    )
