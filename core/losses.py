"""Training objective: GRPO surrogate over tree edges (Eq. 9) with the dynamic-adaptive
clip (Eq. 11), the LayerTuning SFT term (Eq. 12-13) and an optional KL penalty."""

from __future__ import annotations

import math

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
    ratio used; ``approx_kl_sum``: (new - old)^2 / 2, Flow-GRPO's approx_kl, summed;
    ``log_ratio_sum`` / ``log_ratio_sq_sum``: the log of the ratio the clip sees, and its square,
    summed, for its spread against eps).
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
        log_r = torch.log(r[valid])
        stats = {
            "ratio_sum": float(r[valid].sum()),
            "ratio_raw_sum": float(torch.exp(raw_edge.detach())[idx][valid].sum()),
            "approx_kl_sum": float((raw_edge.detach()[idx][valid] ** 2).sum() / 2),
            "log_ratio_sum": float(log_r.sum()),
            "log_ratio_sq_sum": float((log_r ** 2).sum()),
            "clip_high": int(((r > 1 + e) & (adv > 0) & valid).sum()),
            "clip_low": int(((r < 1 - e) & (adv < 0) & valid).sum()),
            "count": int(valid.sum()),
        }
    return loss, stats


def layer_sft_loss(velocity: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 12: squared distance of each node's predicted velocity at this layer to its
    (detached) target, element mean per node, then the mean over nodes, or the sum with
    ``weight`` [nodes] (a chunk's share of a masked mean: mask / masked nodes of the layer)."""
    t = target.detach().to(velocity.device, velocity.dtype).expand_as(velocity)
    per_node = ((velocity - t) ** 2).flatten(1).mean(1)
    return per_node.mean() if weight is None else (per_node * weight.to(per_node.device)).sum()


def sft_node_mask(parent_of_leaf: torch.Tensor, best: int, nodes: str, branching, k: int) -> torch.Tensor:
    """Which parent rows of window layer ``k`` LayerTuning regresses (bool [P]).

    ``parent_of_leaf`` [L]: each leaf's row at this layer. "all": every node (the paper);
    "best-path": the best leaf's node; "siblings": the best leaf's node and the nodes that
    share its parent (the root alone at the first layer). Nodes are found from the tree's
    shape (leaf i lies under node i // leaves-below at each depth), so the same nodes are
    chosen whether the prefix is shared or every leaf carries its own row.
    """
    if nodes == "all":
        return torch.ones(int(parent_of_leaf.max()) + 1, dtype=torch.bool)
    if nodes not in ("best-path", "siblings"):
        raise ValueError(f"unknown sft_nodes {nodes!r}")
    depth = k if nodes == "best-path" or k == 0 else k - 1  # the ancestor the chosen nodes share
    below = math.prod(branching[depth:])
    leaf = torch.arange(parent_of_leaf.shape[0])
    mask = torch.zeros(int(parent_of_leaf.max()) + 1, dtype=torch.bool)
    mask[parent_of_leaf[leaf // below == best // below]] = True
    return mask


def best_sample_velocity(x: torch.Tensor, x0_best: torch.Tensor, sigma) -> torch.Tensor:
    """The rectified-flow velocity that carries each state ``x`` at ``sigma`` straight to the
    group's best final sample: v* = (x - x0_best) / sigma (x_sigma = (1 - sigma) x0 + sigma * noise,
    v = noise - x0). Regressing onto it is flow-matching SFT on the best leaf (RAFT's
    best-of-N fine-tuning): at the tree's nodes, or at fresh noisings of the best leaf."""
    if bool((torch.as_tensor(sigma) <= 0).any()):
        raise ValueError(f"best_sample_velocity needs sigma > 0, got {sigma}")
    return (x.float() - x0_best.float()) / sigma


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor,
                weight: torch.Tensor | None = None) -> torch.Tensor:
    """KL between two SDE steps of equal std: ||mu - mu_ref||^2 / (2 std^2), element mean per
    edge, then the mean over edges, or the sum with ``weight`` [edges] (a chunk's share of
    per-prompt means: 1 / the prompt's edges)."""
    d = (mean - ref_mean.detach()) ** 2 / (2 * std.reshape(-1, *([1] * (mean.ndim - 1))) ** 2)
    per_edge = d.flatten(1).mean(1)
    return per_edge.mean() if weight is None else (per_edge * weight.to(per_edge.device)).sum()
