"""From the leaves' rewards to what the update needs, per prompt (one group = one tree's
leaves): the reward weights of a run, advantages and the best leaf (Eq. 2), and each leaf's
clip range (Eq. 11). Shared by the trainer and the one-tree helpers of core/one_tree.py."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .advantages import RunningNorm, combined_reward, group_advantages, normalized_reward, valid_mask
from .losses import dynamic_clip_eps
from .presets import TrainConfig


@dataclass
class Group:
    """One prompt's leaves: rewards [L, K], advantages [L], the valid mask [L], the best leaf
    (None when every advantage is 0: LayerTuning has nothing to follow), eps [L] (set by
    ``clip_eps``) and, for the best-sample LayerTuning targets only, the best leaf's final latent."""

    rewards: torch.Tensor
    adv: torch.Tensor
    valid: torch.Tensor
    best: int | None
    eps: torch.Tensor | None = None
    best_x0: torch.Tensor | None = None


def reward_weights(config: TrainConfig, weights, names: Sequence[str]) -> list[float] | None:
    """The weights a run gives its reward models: the config's, else the reward set's
    (``weights``); scaled to sum to 1 where the config says so (MixGRPO)."""
    w = config.reward_weights or weights
    if w is not None and len(w) != len(names):
        raise ValueError(f"reward_weights has {len(w)} entries for {len(names)} rewards {list(names)}")
    if config.normalize_reward_weights:  # MixGRPO: weights sum to 1
        w = [1.0] * len(names) if w is None else [float(x) for x in w]
        total = sum(w)
        if total <= 0:
            raise ValueError(f"normalize_reward_weights needs reward weights with a positive sum, got {w}")
        w = [x / total for x in w]
    return w


def score_group(rewards: torch.Tensor, weights, config: TrainConfig, std: torch.Tensor | None = None) -> Group:
    """One prompt's group from its rewards [L, K]: advantages, the valid mask and the best leaf."""
    c = config
    ok = valid_mask(rewards)
    adv = group_advantages(rewards, weights, c.adv_clip, c.adv_std_unbiased, c.adv_std_eps, std)
    # LayerTuning needs a best leaf; a group whose rewards are all equal has none
    informative = bool(adv.abs().sum() > 0)
    best = int(torch.where(ok, adv, torch.full_like(adv, -math.inf)).argmax()) if informative else None
    return Group(rewards=rewards, adv=adv, valid=ok, best=best)


def clip_eps(config: TrainConfig, groups: list[Group], weights, names: Sequence[str],
             running: RunningNorm | None = None, gather: Callable = lambda t: t) -> None:
    """eps of Eq. 11 for every leaf (``group.eps``), from R = the setting clip_reward.
    ``running`` (clip_reward="running") is updated with this step's values, ``gather``ed
    over processes."""
    c = config
    if c.clip_mode == "fixed":
        for g in groups:
            g.eps = torch.full_like(g.adv, c.clip_eps)
        return
    if c.clip_reward == "group-minmax":
        values = [normalized_reward(g.adv, g.valid) for g in groups]
    else:
        values = [combined_reward(g.rewards, weights, names) for g in groups]
        if c.clip_reward == "running":
            all_vals = gather(torch.cat(values))
            all_ok = gather(torch.cat([g.valid for g in groups])).bool()
            running.update(all_vals[all_ok])
            values = [running.normalize(v) for v in values]
    for g, r in zip(groups, values):
        g.eps = dynamic_clip_eps(r, c.eps_low, c.eps_high, c.eta)
