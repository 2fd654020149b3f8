"""Real data files for tests, found beside the repository (``../shared/assets``) or at $RAYPD_ASSETS."""

import os
from pathlib import Path

import pytest


def assets_dir() -> Path:
    env = os.environ.get("RAYPD_ASSETS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "assets"


def asset(name: str) -> Path:
    """The asset's path, or skip the test saying which file is missing and where it was looked for."""
    path = assets_dir() / name
    if not path.exists():
        pytest.skip(f"offline asset {name} not found in {assets_dir()} (set RAYPD_ASSETS to its folder)")
    return path
