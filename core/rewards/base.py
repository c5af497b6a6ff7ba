"""Reward interface and the weighted reward set the trainer consumes.

A `Reward` scores a batch of decoded images (Tensor[B, 3, H, W] in [0, 1]) against their
prompts and returns Tensor[B] (float32, CPU). A `RewardSet` stacks K rewards into
Tensor[B, K] with `names` and `weights`; the core engine normalises each column per prompt
(paper Eq. 2) and sums them. A NaN entry means "this sample could not be scored": the
trainer masks such samples and counts them in its metrics.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import Iterator, Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["Reward", "RewardSet", "check_images_and_prompts"]


def check_images_and_prompts(images: torch.Tensor, prompts: Sequence[str], who: str = "reward") -> list[str]:
    """Validate a reward call's inputs; return the prompts as a list of str.

    Raises TypeError/ValueError naming `who` and what was expected.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{who}: images must be a torch.Tensor[B, 3, H, W] in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who}: images must have shape [B, 3, H, W], got {tuple(images.shape)}")
    if images.shape[2] < 1 or images.shape[3] < 1:
        raise ValueError(f"{who}: images have an empty spatial size {tuple(images.shape[2:])}")
    if not images.is_floating_point():
        raise TypeError(f"{who}: images must be floating point in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str):
        raise TypeError(f"{who}: prompts must be a list of str (one per image), got a single str")
    prompts = list(prompts)
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{who}: got {images.shape[0]} images but {len(prompts)} prompts; "
                         "expected one prompt per image")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"{who}: prompt {i} is {type(p).__name__}, expected str")
    return prompts


class Reward(ABC):
    """One reward model: ``score(images[B,3,H,W] in [0,1], prompts) -> Tensor[B]``.

    Subclasses set `name` and `typical_range` (the raw score range seen on real images, for
    display and sanity checks) and implement `_score` on a chunk of finite images that is
    already on `self.device` in float32. `score` handles validation, chunking, no-grad and
    images with non-finite pixels (their score is NaN, so the trainer masks them).
    """

    name: str = "reward"
    typical_range: tuple[float, float] = (0.0, 1.0)

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int | None = None):
        self.device = torch.device(device)
        self.dtype = dtype
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"{self.name}: batch_size must be >= 1 or None, got {batch_size}")
        self.batch_size = batch_size

    # -- device / dtype -------------------------------------------------------------
    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Reward":
        """Move the reward (and its model, if any) to `device` / `dtype`; returns self."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        self._moved()
        return self

    def _moved(self) -> None:
        """Hook for subclasses holding modules: apply self.device / self.dtype."""

    # -- scoring ----------------------------------------------------------------------
    @abstractmethod
    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Score finite images (float32 on self.device, clamped to [0, 1]); return Tensor[b]."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score a batch; returns float32 Tensor[B] on the CPU (NaN where not scorable)."""
        prompts = check_images_and_prompts(images, prompts, self.name)
        b = images.shape[0]
        out = torch.full((b,), float("nan"), dtype=torch.float32)
        if b == 0:
            return out
        # Samples with NaN/inf pixels are never fed to the model: their score stays NaN.
        finite = torch.isfinite(images.detach()).flatten(1).all(dim=1).cpu()
        idx = torch.nonzero(finite).flatten().tolist()
        if not idx:
            return out
        chunk = self.batch_size or len(idx)
        with torch.no_grad():
            for start in range(0, len(idx), chunk):
                sel = idx[start:start + chunk]
                x = images.detach()[sel].to(device=self.device, dtype=torch.float32).clamp(0.0, 1.0)
                r = self._score(x, [prompts[i] for i in sel])
                r = r.detach().float().flatten().cpu()
                if r.shape[0] != len(sel):
                    raise RuntimeError(f"{self.name}: scorer returned {r.shape[0]} values for {len(sel)} images")
                out[sel] = r
        return out

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.score(images, prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


class RewardSet:
    """Weighted set of K rewards: ``rewards(images, prompts) -> Tensor[B, K]`` float32 on CPU.

    `names` and `weights` follow the column order. Non-finite scores are returned as NaN
    (inf is turned into NaN so a single `isnan`/`isfinite` test suffices) and logged with
    the reward name and sample indices; `valid_mask` tells which samples are usable.
    `last_metrics` holds the per-reward statistics of the most recent call.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float] | None = None):
        rewards = list(rewards)
        if not rewards:
            raise ValueError("RewardSet needs at least one reward")
        names = [r.name for r in rewards]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"RewardSet: duplicate reward names {dupes}; each reward may appear once")
        if weights is None:
            weights = [1.0] * len(rewards)
        weights = [float(w) for w in weights]
        if len(weights) != len(rewards):
            raise ValueError(f"RewardSet: {len(rewards)} rewards but {len(weights)} weights")
        for n, w in zip(names, weights):
            if not math.isfinite(w):
                raise ValueError(f"RewardSet: weight of {n!r} must be finite, got {w}")
        if all(w == 0.0 for w in weights):
            raise ValueError("RewardSet: all weights are zero; at least one reward must carry weight")
        self.rewards: list[Reward] = rewards
        self.names: list[str] = names
        self.weights: list[float] = weights
        self.last_metrics: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.rewards)

    def __iter__(self) -> Iterator[Reward]:
        return iter(self.rewards)

    def __getitem__(self, name: str) -> Reward:
        for r in self.rewards:
            if r.name == name:
                return r
        raise KeyError(f"no reward named {name!r} in this set (have {self.names})")

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}:{w:g}" for n, w in zip(self.names, self.weights))
        return f"RewardSet({parts})"

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "RewardSet":
        """Move every reward; returns self."""
        for r in self.rewards:
            r.to(device, dtype)
        return self

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score with every reward; returns Tensor[B, K] (NaN marks unscorable samples)."""
        prompts = check_images_and_prompts(images, prompts, "RewardSet")
        cols = []
        for r in self.rewards:
            s = r.score(images, prompts).to(torch.float32).cpu().reshape(-1)
            bad = ~torch.isfinite(s)
            if bool(bad.any()):
                logger.warning("reward %r returned a non-finite score for samples %s; they are masked",
                               r.name, torch.nonzero(bad).flatten().tolist())
                s = torch.where(bad, torch.full_like(s, float("nan")), s)
            cols.append(s)
        scores = torch.stack(cols, dim=1)
        self.last_metrics = self.metrics(scores)
        return scores

    @staticmethod
    def valid_mask(scores: torch.Tensor) -> torch.Tensor:
        """Bool Tensor[B]: True where every reward gave a finite score."""
        return torch.isfinite(scores).all(dim=1)

    def weighted_sum(self, scores: torch.Tensor) -> torch.Tensor:
        """Raw weighted sum over rewards, Tensor[B]; NaN for masked samples.

        For display only: training normalises each reward per prompt first (paper Eq. 2).
        """
        w = torch.tensor(self.weights, dtype=scores.dtype, device=scores.device)
        total = (torch.nan_to_num(scores, nan=0.0) * w).sum(dim=1)
        return torch.where(self.valid_mask(scores), total, torch.full_like(total, float("nan")))

    def metrics(self, scores: torch.Tensor, prefix: str = "reward") -> dict[str, float]:
        """Per-reward mean/std/min/max over finite entries, non-finite counts, masked samples."""
        if scores.ndim != 2 or scores.shape[1] != len(self.names):
            raise ValueError(f"RewardSet.metrics: expected scores [B, {len(self.names)}], got {tuple(scores.shape)}")
        out: dict[str, float] = {}
        for k, name in enumerate(self.names):
            col = scores[:, k].float()
            ok = torch.isfinite(col)
            vals = col[ok]
            n = int(vals.numel())
            nan = float("nan")
            out[f"{prefix}/{name}/mean"] = float(vals.mean()) if n else nan
            out[f"{prefix}/{name}/std"] = float(vals.std(unbiased=False)) if n else nan
            out[f"{prefix}/{name}/min"] = float(vals.min()) if n else nan
            out[f"{prefix}/{name}/max"] = float(vals.max()) if n else nan
            out[f"{prefix}/{name}/nonfinite"] = float(col.numel() - n)
        valid = self.valid_mask(scores)
        out[f"{prefix}/masked_samples"] = float((~valid).sum())
        ws = self.weighted_sum(scores)[valid]
        out[f"{prefix}/weighted_sum/mean"] = float(ws.mean()) if ws.numel() else float("nan")
        return out
