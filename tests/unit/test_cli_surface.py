"""The command-line surface is frozen: commands, their flags and the ``--help-config`` keys.

A change to any of them must be made on purpose: rerun with RAYPD_UPDATE_GOLDEN=1 to rewrite
``tests/golden/cli_surface.json``, and say so in the change.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden" / "cli_surface.json"
COMMANDS = {"python -m raypd.distill": ["-m", "raypd.distill"]} | {
    f"raypd {name}": ["-m", "raypd.cli", name] for name in ("shards", "sample", "fid", "export")}


def _flags(help_text: str) -> list[str]:
    return sorted(set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text)))


def surface() -> dict:
    found = {}
    for name, args in COMMANDS.items():
        out = subprocess.run([sys.executable, *args, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"{name} --help: {out.stderr[-2000:]}"
        found[name] = _flags(out.stdout)
    top = subprocess.run([sys.executable, "-m", "raypd.cli", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    found["raypd"] = sorted(re.findall(r"^\s+raypd (\w+)", top.stdout, flags=re.M))
    listing = subprocess.run([sys.executable, "-m", "raypd.distill", "--help-config"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    found["--help-config"] = [line.split(" = ", 1)[0] for line in listing.stdout.splitlines()
                              if line and not line[0].isspace()]
    return found


def test_the_command_line_surface_is_unchanged():
    now = surface()
    if os.environ.get("RAYPD_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(now, indent=1) + "\n")
    frozen = json.loads(GOLDEN.read_text())
    for name in sorted(set(frozen) | set(now)):
        assert now.get(name) == frozen.get(name), (
            f"{name}: the surface changed (added {sorted(set(now.get(name, [])) - set(frozen.get(name, [])))}, "
            f"removed {sorted(set(frozen.get(name, [])) - set(now.get(name, [])))}); if on purpose, rerun with "
            "RAYPD_UPDATE_GOLDEN=1")
