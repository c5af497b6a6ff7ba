"""Seeds derived from (seed, iteration, prompt, rank, ...): every random draw of a run is
reproducible and a resumed run draws exactly what the uninterrupted run would have."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts) -> int:
    """A 63-bit seed from any sequence of ints/strings (stable across processes,
    unlike Python's salted hash of strings)."""
    h = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (CPU so draws do not depend on the device)."""
    return torch.Generator().manual_seed(derive_seed(*parts))
