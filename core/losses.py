"""Training objective: GRPO surrogate over tree edges (Eq. 9) with the dynamic-adaptive
clip (Eq. 11), the LayerTuning SFT term (Eq. 12-13) and an optional KL penalty."""

from __future__ import annotations

import torch


def dynamic_clip_eps(rewards_norm: torch.Tensor, eps_low: float, eps_high: float, eta: float) -> torch.Tensor:
    """Eq. 11: eps_i = eps_low + (eps_high - eps_low) * exp(-eta * R_i).

    R must be a normalised reward >= 0 (see advantages.normalized_reward); it is clamped
    at 0 so eps always lies in [eps_low, eps_high] and falls as the reward rises: cautious
    steps where the leaf is already good, bolder ones where it is bad.
    """
    if not 0 <= eps_low <= eps_high:
        raise ValueError(f"need 0 <= eps_low <= eps_high, got eps_low={eps_low}, eps_high={eps_high}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    r = torch.as_tensor(rewards_norm, dtype=torch.float32).clamp_min(0)
    return eps_low + (eps_high - eps_low) * torch.exp(-eta * r)


def clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-element PPO/GRPO loss -min(rho A, clip(rho, 1-eps, 1+eps) A) (to minimise)."""
    clipped = torch.maximum(torch.minimum(ratio, 1 + eps), 1 - eps)
    return -torch.minimum(ratio * advantages, clipped * advantages)


def tree_edge_loss(
    new_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    edge_of_leaf: torch.Tensor,
    advantages: torch.Tensor,
    eps: torch.Tensor,
    leaf_weight: torch.Tensor,
) -> tuple[torch.Tensor, dict]:
    """One window layer's share of Eq. 9.

    new/old_log_prob: [E] per edge; edge_of_leaf: [L] edge on each leaf's path. Every leaf
    contributes the clipped term of the edge on its path, so a shared edge counts once per
    descendant leaf. ``leaf_weight`` [L] is 1/(valid leaves * trained layers) for valid
    leaves, 0 for masked ones. Returns the loss and ratio statistics.
    """
    ratio_edge = torch.exp(new_log_prob - old_log_prob.to(new_log_prob.device))
    idx = edge_of_leaf.to(ratio_edge.device)
    ratio = ratio_edge[idx]
    adv = advantages.to(ratio.device)
    e = eps.to(ratio.device)
    per_leaf = clipped_surrogate(ratio, adv, e)
    loss = (per_leaf * leaf_weight.to(ratio.device)).sum()
    with torch.no_grad():
        r = ratio.detach()
        valid = leaf_weight > 0
        stats = {
            "ratio_sum": float(r[valid.to(r.device)].sum()),
            "clip_high": int(((r > 1 + e) & (adv > 0) & valid.to(r.device)).sum()),
            "clip_low": int(((r < 1 - e) & (adv < 0) & valid.to(r.device)).sum()),
            "count": int(valid.sum()),
        }
    return loss, stats


def layer_sft_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 12: mean squared distance of each node's predicted velocity at this layer to
    the (detached) velocity on the best leaf's path at the same layer."""
    t = target.detach().to(velocity.device, velocity.dtype).expand_as(velocity)
    return ((velocity - t) ** 2).flatten(1).mean(1).mean()


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two SDE steps of equal std: ||mu - mu_ref||^2 / (2 std^2), element mean."""
    d = (mean - ref_mean.detach()) ** 2 / (2 * std.reshape(-1, *([1] * (mean.ndim - 1))) ** 2)
    return d.flatten(1).mean(1).mean()
