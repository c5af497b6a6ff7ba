"""Sliding window of the tree (paper 3.2, Alg. 1 line 22: "update tree root position").

The window position is a pure function of the iteration, so a resumed run continues on
exactly the same schedule without saving any window state.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from .rng import derive_seed

WINDOW_MODES = ("progressive", "random", "frozen")


@dataclass(frozen=True)
class SlidingWindow:
    """``progressive``: start + stride * (iteration // every), wrapping to ``start`` once it
    would pass ``max_start``; ``random``: uniform in [0, max_start] per iteration (seeded);
    ``frozen``: always ``start``. ``max_start`` defaults to num_steps - depth."""

    num_steps: int
    depth: int
    mode: str = "progressive"
    start: int = 0
    stride: int = 1
    every: int = 25
    max_start: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in WINDOW_MODES:
            raise ValueError(f"window mode must be one of {WINDOW_MODES}, got {self.mode!r}")
        limit = self.num_steps - self.depth
        if limit < 0:
            raise ValueError(f"tree depth {self.depth} does not fit in num_steps={self.num_steps}")
        if self.max_start is not None and not 0 <= self.max_start <= limit:
            raise ValueError(f"window max_start must lie in [0, {limit}] (num_steps - depth), got {self.max_start}")
        if not 0 <= self.start <= self.last:
            raise ValueError(f"window start must lie in [0, {self.last}], got {self.start}")
        if self.stride < 1 or self.every < 1:
            raise ValueError(f"window stride and every must be >= 1, got stride={self.stride}, every={self.every}")

    @property
    def last(self) -> int:
        return self.num_steps - self.depth if self.max_start is None else self.max_start

    def position(self, iteration: int) -> int:
        """Window start (tau) used at ``iteration`` (0-based)."""
        if self.mode == "frozen":
            return self.start
        if self.mode == "random":
            return random.Random(derive_seed(self.seed, iteration, "window")).randint(0, self.last)
        span = self.last - self.start + 1
        return self.start + (self.stride * (iteration // self.every)) % span

    def positions(self, iterations: int) -> list[int]:
        return [self.position(i) for i in range(iterations)]
