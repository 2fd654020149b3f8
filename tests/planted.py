"""A doctored file for tests of untrusted storage: unpickling it creates a file, so a test sees whether it ran."""

from __future__ import annotations

import builtins
import io
from pathlib import Path


class Plant:
    """Unpickling it creates ``path`` (``open(path, "w")``)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return builtins.open, (self.path, "w")


def planted_torch_file(path: Path) -> bytes:
    """A ``torch.save`` file, as DeepSpeed writes them, whose unpickling creates ``path``."""
    import torch

    buffer = io.BytesIO()
    torch.save({"module": Plant(path)}, buffer)
    return buffer.getvalue()
