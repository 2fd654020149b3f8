"""The run's evaluation record: every scored point kept beside the run, so a restarted driver reuses the
teacher's baselines and the finished rounds' scores instead of sampling and scoring them again.

A record belongs to one evaluation set-up (its fingerprint: the eval settings, the reference set and
extractor, the teacher's weights); a record made under another set-up is set aside, never mixed in. A
student's score is keyed by its weights' digest, so a round trained again is scored again. The teacher's
full-sampler images (what every later point's distance is measured to) are kept in float16.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

RECORD, FULL = "record.json", "teacher-full.safetensors"


def fingerprint(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class EvalRecord:
    """Scored points under one fingerprint, in ``directory/record.json`` (rewritten whole after each point)."""

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint
        self.rows: dict[str, dict] = {}
        path = self.directory / RECORD
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == fingerprint:
                self.rows = dict(saved.get("rows", {}))
            else:
                path.rename(path.with_name(f"record-{saved.get('fingerprint', 'old')}.json"))

    def get(self, key: str) -> dict | None:
        return self.rows.get(key)

    def put(self, key: str, row: dict) -> None:
        self.rows[key] = row
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.directory / RECORD, json.dumps({"fingerprint": self.fingerprint, "rows": self.rows},
                                                          indent=1).encode())

    def full_samples(self) -> Tensor | None:
        """The full sampler's images kept under this fingerprint; None when there are none."""
        from safetensors import safe_open

        path = self.directory / FULL
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != self.fingerprint:
                return None
        return load_file(str(path))["samples"].float()

    def keep_full(self, samples: Tensor) -> Tensor:
        """Store the full sampler's images (float16) and return them as every distance will see them."""
        self.directory.mkdir(parents=True, exist_ok=True)
        half = samples.detach().cpu().to(torch.float16).contiguous()
        tmp = self.directory / f".{FULL}.tmp{os.getpid()}"
        save_file({"samples": half}, str(tmp), metadata={"fingerprint": self.fingerprint})
        os.replace(tmp, self.directory / FULL)
        return half.float()
