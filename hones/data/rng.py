"""Stable, process-independent random streams keyed by names (never Python's salted ``hash``)."""

from __future__ import annotations

import hashlib
import random


def stable_seed(*parts: object) -> int:
    """A 64-bit seed derived from ``parts`` (their ``str``), identical in every process."""
    key = "\x1f".join(str(part) for part in parts).encode("utf-8")
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little")


def stable_rng(*parts: object) -> random.Random:
    """A ``random.Random`` seeded by :func:`stable_seed` of ``parts``."""
    return random.Random(stable_seed(*parts))
