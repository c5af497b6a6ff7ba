"""Group-relative advantages (Eq. 2, Alg. 1 line 15).

Per prompt (the group is the tree's leaves) and per reward model k:
A_i = sum_k w_k (r_i^k - mean^k) / std^k, clipped to +-clip (std: the group's, or the
whole batch's with adv_std="global"). Each reward is normalised on
its own because raw scales differ 100x (HPS ~0.3, PickScore ~22). A reward with zero
variance in the group carries no signal and contributes 0 (never NaN). Non-finite
rewards mark their sample invalid: it gets advantage 0 and is excluded from the stats.
"""

from __future__ import annotations

import torch

_STD_FLOOR = 1e-6
# Scale of a raw score in the reward VALUE of Eq. 11 (not in the advantages, which
# normalise each model anyway): PickScore as the papers report it (raw ~22 -> ~0.22).
REWARD_VALUE_SCALES = {"pickscore": 0.01}


def valid_mask(rewards: torch.Tensor) -> torch.Tensor:
    """[G] bool: samples whose every reward is finite."""
    return torch.isfinite(rewards).all(dim=1)


def reward_std(rewards: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """[K] std of each reward model over the valid rows of rewards [N, K] (0 with < 2 rows)."""
    r = rewards.detach().float().cpu()
    rv = r[valid_mask(r)]
    if rv.shape[0] < 2:
        return torch.zeros(r.shape[1])
    return rv.std(0, unbiased=unbiased)


def group_advantages(
    rewards: torch.Tensor,
    weights=None,
    clip: float | None = 5.0,
    unbiased: bool = False,
    std_eps: float = 0.0,
    std: torch.Tensor | None = None,
) -> torch.Tensor:
    """Advantages [G] from rewards [G, K] of one group (one prompt).

    ``unbiased``/``std_eps``: the std as MixGRPO and DanceGRPO compute it (torch.std + 1e-8).
    ``std`` [K]: divide by this std instead of the group's (Flow-GRPO's global_std: the
    std over the whole batch of the step); the mean stays the group's.
    """
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
    mean = rv.mean(0)
    sd = rv.std(0, unbiased=unbiased) if std is None else torch.as_tensor(std, dtype=torch.float32).flatten()
    if sd.numel() != k:
        raise ValueError(f"std has {sd.numel()} entries for {k} reward models")
    # a reward with no spread carries no signal: 0, never NaN or eps-amplified rounding noise
    z = torch.where(sd > _STD_FLOOR, (rv - mean) / (sd.clamp_min(_STD_FLOOR) + std_eps), torch.zeros_like(rv))
    a = (z * w).sum(1)
    if clip is not None:
        a = a.clamp(-clip, clip)
    adv[ok] = a
    return adv


def combined_reward(rewards: torch.Tensor, weights=None, names=None) -> torch.Tensor:
    """[G] weighted sum of each sample's reward-model scores: the paper's reward value R of
    Eq. 11. ``names`` give each column's scale from REWARD_VALUE_SCALES (PickScore / 100,
    the others raw). Invalid samples (a non-finite score) get 0."""
    r = rewards.detach().float().cpu()
    w = torch.ones(r.shape[1]) if weights is None else torch.as_tensor(weights, dtype=torch.float32).flatten()
    if names is not None:
        w = w * torch.tensor([REWARD_VALUE_SCALES.get(n, 1.0) for n in names], dtype=torch.float32)
    ok = valid_mask(r)
    return torch.where(ok, (torch.nan_to_num(r) * w).sum(1), torch.zeros(r.shape[0]))


def normalized_reward(advantages: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Min-max normalise a group's advantages to [0, 1] (clip_reward="group-minmax"):
    0 = worst leaf of the group, 1 = best, free of the reward models' raw scales."""
    a = advantages.float()
    ok = torch.ones_like(a, dtype=torch.bool) if valid is None else valid
    if int(ok.sum()) == 0:
        return torch.zeros_like(a)
    lo, hi = a[ok].min(), a[ok].max()
    if float(hi - lo) <= _STD_FLOOR:
        return torch.zeros_like(a)
    return ((a - lo) / (hi - lo)).clamp(0, 1) * ok


class RunningNorm:
    """Running mean / std of the combined reward over the whole run (Chan et al.'s merge
    of batch moments), for clip_reward="running": R = softplus((r - mean) / std) >= 0
    (0.69 for an average leaf, ~z above the mean, ~0 far below), so eps spans nearly all of
    [eps_low, eps_high]. Its state goes into checkpoints so a resumed run continues it."""

    def __init__(self, count: float = 0.0, mean: float = 0.0, m2: float = 0.0):
        self.count, self.mean, self.m2 = float(count), float(mean), float(m2)

    def update(self, values: torch.Tensor) -> None:
        v = values.detach().double().flatten()
        if v.numel() == 0:
            return
        n, m = float(v.numel()), float(v.mean())
        m2 = float(((v - m) ** 2).sum())
        total = self.count + n
        delta = m - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.m2 / self.count) ** 0.5 if self.count > 0 else 0.0

    def normalize(self, values: torch.Tensor) -> torch.Tensor:
        sd = self.std
        z = torch.zeros_like(values.float()) if sd <= _STD_FLOOR else (values.float() - self.mean) / sd
        return torch.nn.functional.softplus(z)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}


EDGE_ADVANTAGES = ("leaf", "descendant-mean", "depth-standardised")


def edge_advantages(adv: torch.Tensor, valid: torch.Tensor, edge_of_leaf: torch.Tensor, n_edges: int,
                    mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantage and weight of each edge of one tree layer, for the modes that score an
    edge once instead of once per descendant leaf (Eq. 9's "leaf" reading needs neither).

    "descendant-mean" (TreeGRPO): the mean advantage of the edge's valid descendant leaves,
    weighted by their share of the valid leaves, so at ratio 1 the gradient equals Eq. 9's
    and only the clip sees the edge's mean. "depth-standardised" (BranchGRPO): those means
    standardised over the layer's edges (population std; a layer with one edge, or edges
    that all agree, gets 0), each edge weighted equally, so a shared high-noise edge is not
    shrunk by averaging. Edges without a valid descendant get weight 0.
    Returns (advantages [E], weights [E] summing to 1, or to 0 with no valid leaf).
    """
    if mode not in EDGE_ADVANTAGES[1:]:
        raise ValueError(f"edge advantages must be one of {EDGE_ADVANTAGES[1:]}, got {mode!r}")
    ok = valid.float()
    idx = edge_of_leaf.long()
    count = torch.zeros(n_edges).index_add_(0, idx, ok)
    total = torch.zeros(n_edges).index_add_(0, idx, adv.float() * ok)
    has = count > 0
    mean = torch.where(has, total / count.clamp_min(1), torch.zeros(n_edges))
    if mode == "descendant-mean":
        return mean, count / count.sum().clamp_min(1)
    weight = has.float() / has.sum().clamp_min(1)
    if int(has.sum()) < 2:
        return torch.zeros(n_edges), weight
    m = mean[has]
    sd = m.std(unbiased=False)
    z = torch.zeros(n_edges)
    if float(sd) > _STD_FLOOR:
        z[has] = (m - m.mean()) / sd
    return z, weight
