"""Seeds for the randomness of one update on one rank.

Every rank starts from the same initial weights (seeded by ``run.seed`` alone), then draws its
noise, times and dropout masks from a seed derived from (run seed, data stream, rank, update)
through a cryptographic hash: distinct for every combination (no arithmetic collisions between
ranks and updates), and the same again when a stage resumes at that update.
"""

from __future__ import annotations

import hashlib


def update_seed(seed: int, stream: int, rank: int, update: int) -> int:
    """A 63-bit seed for update ``update`` (1-based) of data stream ``stream`` on ``rank``."""
    digest = hashlib.blake2b(f"raypd/{seed}/{stream}/{rank}/{update}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
