"""Sliding window of the tree (paper 3.2, Alg. 1 line 22: "update tree root position").

The window position is a pure function of the iteration, so a resumed run continues on
exactly the same schedule without saving any window state.

Upper bound: by default the window's last SDE step must land on sigma > 0, i.e.
tau <= T - d - 1, so the leaves handed to the rewards never carry SDE noise from a step
onto sigma = 0 (MixGRPO never samples the last steps either). ``max_start = T - d``
allows that final SDE step explicitly.
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
    ``frozen``: always ``start``. ``max_start`` defaults to num_steps - depth - 1 (every SDE
    step keeps sigma_next > 0); num_steps - depth is the largest allowed."""

    num_steps: int
    depth: int
    mode: str = "progressive"
    start: int = 0
    stride: int = 1
    every: int = 1
    max_start: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {self.mode!r}")
        limit = self.num_steps - self.depth
        if limit < 0:
            raise ValueError(f"tree depth {self.depth} does not fit in num_steps={self.num_steps}")
        if self.max_start is not None and not 0 <= self.max_start <= limit:
            raise ValueError(f"window_max_start must lie in [0, {limit}] (num_steps - depth), got {self.max_start}")
        if self.max_start is None and limit < 1:
            raise ValueError(
                f"num_steps={self.num_steps} with tree depth {self.depth} leaves no window whose last SDE step lands "
                f"on sigma > 0: use num_steps >= depth + 1, or set window_max_start={limit} to allow an SDE step onto "
                f"sigma = 0"
            )
        if not 0 <= self.start <= self.last:
            raise ValueError(
                f"window_start={self.start} lies past the last window position {self.last} "
                f"(num_steps={self.num_steps}, depth={self.depth}{'' if self.max_start is not None else ', T - d - 1'})"
            )
        if self.stride < 1 or self.every < 1:
            raise ValueError(f"window_stride and window_every must be >= 1, got {self.stride}, {self.every}")

    @property
    def last(self) -> int:
        return self.num_steps - self.depth - 1 if self.max_start is None else self.max_start

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
