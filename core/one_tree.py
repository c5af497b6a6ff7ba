"""One tree outside training, for the inspection nodes: sample it for a prompt and seed with
the current policy as the Trainer would at an iteration, and score its leaves as the Trainer
scores one group."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .advantages import RunningNorm
from .groups import clip_eps, reward_weights, score_group
from .presets import TrainConfig
from .rng import generator
from .schedule import schedule
from .tree import Tree, TreeSpec, rollout


def sample_tree(policy: Callable, config: TrainConfig, cond, seed: int, latent_shape: Sequence[int],
                iteration: int = 0, device=None) -> Tree:
    """One tree for one prompt (``cond``) with the current policy, as the Trainer samples it at
    ``iteration`` (window position, noise levels); with ``seed == config.seed`` it is the very
    tree the Trainer rolls out for its first prompt there. Velocities are kept (for previews)."""
    config.validate()
    if device is None:
        device = next(policy.parameters()).device if isinstance(policy, torch.nn.Module) else torch.device("cpu")
    sigmas, levels = schedule(config, latent_shape)
    spec = TreeSpec(config.num_steps, config.window().position(iteration), config.branching)
    g = generator(seed, iteration, 0, 0)
    init = torch.randn((1, *latent_shape), generator=g).to(device)
    dtype = next(policy.parameters()).dtype if isinstance(policy, torch.nn.Module) else None
    return rollout(policy, cond, spec, sigmas, levels, init, g, share_prefix=config.share_prefix,
                   compress_ratio=config.compress_ratio, store_velocity=True, micro_batch=config.micro_batch,
                   noise_schedule=config.noise_schedule, model_dtype=dtype, sampler=config.sampler)


@dataclass
class TreeScores:
    """Scores of one group of leaves as the Trainer computes them."""

    rewards: torch.Tensor  # [L, K], NaN where a reward failed
    names: list[str]
    weights: list[float] | None
    advantages: torch.Tensor  # [L]
    eps: torch.Tensor  # [L] clip range each leaf would get
    valid: torch.Tensor  # [L] bool
    best: int | None  # leaf with the largest advantage (None if the group carries no signal)

    def __repr__(self) -> str:
        return f"TreeScores({self.rewards.shape[0]} leaves x {self.names}, best leaf {self.best})"

    def table(self) -> str:
        """A readable per-leaf table (for a node's text output)."""
        head = "leaf  " + "  ".join(f"{n:>12}" for n in self.names) + "     advantage         eps"
        rows = [head]
        for i in range(self.rewards.shape[0]):
            vals = "  ".join(f"{float(v):>12.5g}" for v in self.rewards[i])
            mark = " *" if i == self.best else ""
            rows.append(f"{i:>4}  {vals}  {float(self.advantages[i]):>12.4f}  {float(self.eps[i]):>10.3g}{mark}")
        return "\n".join(rows)


def score_leaves(images: torch.Tensor, prompt: str, rewards: Callable, config: TrainConfig,
                 running_norm: RunningNorm | None = None) -> TreeScores:
    """Rewards [L, K] of one prompt's leaves, the group advantages and the clip eps each leaf
    would get, computed as the Trainer computes them for one group. ``running_norm``: a run's
    running reward statistics (clip_reward="running"; copied, never changed); without it the
    group alone sets them, as on a run's first iteration."""
    r = torch.as_tensor(rewards(images, [prompt] * images.shape[0])).detach().float().cpu()
    if r.ndim == 1:
        r = r[:, None]
    names = list(getattr(rewards, "names", None) or [f"reward{i}" for i in range(r.shape[1])])
    if r.shape != (images.shape[0], len(names)):
        raise ValueError(f"rewards returned shape {tuple(r.shape)}; "
                         f"expected [{images.shape[0]}, {len(names)}] ({names})")
    weights = reward_weights(config, getattr(rewards, "weights", None), names)
    group = score_group(r, weights, config)  # one group: a global std is its own std
    running = RunningNorm(**(running_norm.state_dict() if running_norm is not None else {}))
    clip_eps(config, [group], weights, names, running)
    adv, eps, ok, best = group.adv, group.eps, group.valid, group.best
    return TreeScores(r, names, list(weights) if weights is not None else None, adv, eps, ok, best)


__all__ = ["sample_tree", "TreeScores", "score_leaves"]
