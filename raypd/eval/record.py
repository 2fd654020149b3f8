"""The run's evaluation record: every scored point kept beside the run, so a restarted driver reuses the
teacher's baselines and the finished rounds' scores instead of sampling and scoring them again.

A record belongs to one evaluation set-up (its fingerprint: the eval settings, the reference set and
extractor, the teacher's weights, none of them by where their files live); a record made under another
set-up is set aside, never mixed in. A student's score is keyed by its weights' digest, so a round trained
again is scored again. The teacher's full-sampler images (what every later point's distance is measured to)
are kept beside it as uint8, named by the same fingerprint (``raypd.eval.chunks.FullSamples``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


RECORD = "record.json"


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
