"""The test session's machine cache (``RAYPD_CACHE``) is its own temporary folder: no test reads what a user's
runs cached, and nothing is left in the home folder. Set before any test starts Ray, so its workers and the
drivers the tests run as commands inherit it."""

from __future__ import annotations

import os
import shutil
import tempfile

_CACHE = None


def pytest_configure(config) -> None:
    global _CACHE
    if "RAYPD_CACHE" not in os.environ:
        _CACHE = tempfile.mkdtemp(prefix="raypd-test-cache-")
        os.environ["RAYPD_CACHE"] = _CACHE


def pytest_unconfigure(config) -> None:
    if _CACHE is not None:
        shutil.rmtree(_CACHE, ignore_errors=True)
