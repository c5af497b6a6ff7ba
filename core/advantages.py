"""Group-relative advantages (Eq. 2, Alg. 1 line 15).

Per prompt (the group is the tree's leaves) and per reward model k:
A_i = sum_k w_k (r_i^k - mean^k) / std^k, clipped to +-clip. Each reward is normalised on
its own because raw scales differ 100x (HPS ~0.3, PickScore ~22). A reward with zero
variance in the group carries no signal and contributes 0 (never NaN). Non-finite
rewards mark their sample invalid: it gets advantage 0 and is excluded from the stats.
"""

from __future__ import annotations

import torch

_STD_FLOOR = 1e-6


def valid_mask(rewards: torch.Tensor) -> torch.Tensor:
    """[G] bool: samples whose every reward is finite."""
    return torch.isfinite(rewards).all(dim=1)


def group_advantages(rewards: torch.Tensor, weights=None, clip: float | None = 5.0) -> torch.Tensor:
    """Advantages [G] from rewards [G, K] of one group (one prompt)."""
    if rewards.ndim != 2:
        raise ValueError(f"rewards must have shape [group, reward_models], got {tuple(rewards.shape)}")
    g, k = rewards.shape
    w = torch.ones(k) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
    if w.numel() != k:
        raise ValueError(f"reward weights has {w.numel()} entries for {k} reward models")
    r = rewards.detach().float().cpu()
    ok = valid_mask(r)
    adv = torch.zeros(g)
    if int(ok.sum()) < 2:
        return adv
    rv = r[ok]
    mean, std = rv.mean(0), rv.std(0, unbiased=False)
    z = torch.where(std > _STD_FLOOR, (rv - mean) / std.clamp_min(_STD_FLOOR), torch.zeros_like(rv))
    a = (z * w).sum(1)
    if clip is not None:
        a = a.clamp(-clip, clip)
    adv[ok] = a
    return adv


def normalized_reward(advantages: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise a group's advantages to [0, 1]: the R of Eq. 11, free of the
    reward models' raw scales (0 = worst leaf of the group, 1 = best)."""
    a = advantages.float()
    ok = torch.ones_like(a, dtype=torch.bool) if valid is None else valid
    if int(ok.sum()) == 0:
        return torch.zeros_like(a)
    lo, hi = a[ok].min(), a[ok].max()
    if float(hi - lo) <= _STD_FLOOR:
        return torch.zeros_like(a)
    return ((a - lo) / (hi - lo)).clamp(0, 1) * ok
