"""A Ray Train callback that appends every report's metrics (per worker) to a JSON-lines file.

Ray Train calls it in its controller process, so what it sees comes back through the file."""

from __future__ import annotations

import json

from ray.train import UserCallback


class MetricsToFile(UserCallback):
    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
