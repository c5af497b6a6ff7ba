"""Training objective: GRPO surrogate over tree edges (Eq. 9) with the dynamic-adaptive
clip (Eq. 11), the LayerTuning SFT term (Eq. 12-13) and an optional KL penalty."""

from __future__ import annotations

import torch


def dynamic_clip_eps(rewards_norm: torch.Tensor, eps_low: float, eps_high: float, eta: float) -> torch.Tensor:
    """Eq. 11: eps_i = eps_low + (eps_high - eps_low) * exp(-eta * R_i).

    R is the leaf's reward value (by default the combined raw reward, see
    TrainConfig.clip_reward); it is clamped at 0 so eps always lies in [eps_low, eps_high]
    and falls as the reward rises: cautious steps where the leaf is already good, bolder
    ones where it is bad.
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


def ratio_norm_log_ratio(new_log_prob, old_log_prob, new_mean, old_mean, std) -> torch.Tensor:
    """GRPO-Guard's RatioNorm: (log p - log p_old + b) * std, b = mean||mu - mu_old||^2 / (2 std^2).

    With log-probs averaged over elements, E_old[log p - log p_old] = -b exactly, so the
    raw ratio sits below 1 by an amount that grows as the step's std shrinks (low-noise
    steps); adding b re-centres it at 1 and multiplying by the step's std gives every step
    the same spread. new/old_log_prob [E]; means [E, ...]; std [E] (the step's std).
    """
    s = std.to(new_log_prob.device).float()
    d2 = ((new_mean - old_mean.detach().to(new_mean.device)) ** 2).flatten(1).mean(1)
    b = d2 / (2 * s * s)
    return (new_log_prob - old_log_prob.to(new_log_prob.device) + b) * s


def tree_edge_loss(
    new_log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    edge_of_leaf: torch.Tensor,
    advantages: torch.Tensor,
    eps: torch.Tensor,
    leaf_weight: torch.Tensor,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """One window layer's share of Eq. 9.

    new/old_log_prob: [E] per edge; edge_of_leaf: [L] edge on each leaf's path. Every leaf
    contributes the clipped term of the edge on its path, so a shared edge counts once per
    descendant leaf. ``leaf_weight`` [L] is 1/(valid leaves * trained layers) for valid
    leaves, 0 for masked ones. ``log_ratio`` [E] replaces new - old (ratio_norm).
    Returns the loss and ratio statistics (``ratio_raw_sum``: exp(new - old) whatever the
    ratio used).
    """
    raw_edge = new_log_prob - old_log_prob.to(new_log_prob.device)
    ratio_edge = torch.exp(raw_edge if log_ratio is None else log_ratio)
    idx = edge_of_leaf.to(ratio_edge.device)
    ratio = ratio_edge[idx]
    adv = advantages.to(ratio.device)
    e = eps.to(ratio.device)
    per_leaf = clipped_surrogate(ratio, adv, e)
    loss = (per_leaf * leaf_weight.to(ratio.device)).sum()
    with torch.no_grad():
        r = ratio.detach()
        valid = leaf_weight.to(r.device) > 0
        stats = {
            "ratio_sum": float(r[valid].sum()),
            "ratio_raw_sum": float(torch.exp(raw_edge.detach())[idx][valid].sum()),
            "clip_high": int(((r > 1 + e) & (adv > 0) & valid).sum()),
            "clip_low": int(((r < 1 - e) & (adv < 0) & valid).sum()),
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
