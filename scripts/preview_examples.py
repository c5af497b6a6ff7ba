"""Render the example tree previews of docs/preview.md (no model download, CPU, seconds).

    .venv/bin/python scripts/preview_examples.py OUT_DIR [--thumb 96]

The velocity model is exact for a toy "data set" of small procedural landscapes (sky, sun,
ground): x0_hat(x, sigma) is the posterior mean over the scenes, v = (x - x0_hat) / sigma.
Early nodes therefore show blurred averages and the branches commit to different scenes,
as a real FLUX tree does. The rewards are weight-free colour statistics.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from treerpo.core.advantages import group_advantages, normalized_reward
from treerpo.core.losses import dynamic_clip_eps
from treerpo.core.preview import node_x0, render_tree, to_pil
from treerpo.core.schedule import flux_sigmas
from treerpo.core.sde import depth_noise
from treerpo.core.tree import TreeSpec, rollout

SIZE = 24


def scenes(n: int = 512, seed: int = 0) -> torch.Tensor:
    """n landscapes [n, 3, SIZE, SIZE] in [-1, 1]: sky gradient, a sun, a ground band."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, SIZE), torch.linspace(0, 1, SIZE), indexing="ij")
    out = []
    for _ in range(n):
        u = torch.rand(12, generator=g)
        sky_top = torch.tensor([0.1 + 0.5 * u[0], 0.2 + 0.4 * u[1], 0.5 + 0.5 * u[2]])
        sky_low = torch.tensor([0.9 + 0.1 * u[3], 0.4 + 0.5 * u[4], 0.3 + 0.4 * u[1]])
        ground = torch.tensor([0.1 + 0.4 * u[5], 0.25 + 0.4 * u[6], 0.1 + 0.2 * u[7]])
        horizon = 0.55 + 0.25 * u[8]
        img = sky_top[:, None, None] + (sky_low - sky_top)[:, None, None] * (yy / horizon).clamp(0, 1)
        sun = ((xx - (0.15 + 0.7 * u[9])) ** 2 + (yy - (0.15 + 0.3 * u[10])) ** 2).sqrt() < 0.08 + 0.1 * u[11]
        img = torch.where(sun, torch.tensor([1.0, 0.92, 0.6])[:, None, None], img)
        hill = yy > horizon - 0.08 * torch.sin(xx * math.pi * (1 + 2 * u[4]) + 6 * u[2])
        img = torch.where(hill, ground[:, None, None] * (1.2 - 0.5 * yy), img)
        out.append(img.clamp(0, 1) * 2 - 1)
    return torch.stack(out)


class SceneFlow:
    """Exact rectified-flow velocity for the uniform distribution over ``data``."""

    def __init__(self, data: torch.Tensor):
        self.data = data.flatten(1)

    def __call__(self, x, sigma, cond):
        s = sigma.reshape(-1, 1).float()
        xf = x.flatten(1).float()
        logits = -((xf[:, None] - (1 - s[:, :, None]) * self.data[None]) ** 2).sum(-1) / (2 * s**2)
        x0 = torch.softmax(logits, 1) @ self.data
        return ((xf - x0) / s).reshape(x.shape)


def scene_rewards(x: torch.Tensor) -> torch.Tensor:
    """[L, 3]: warmth (red - blue), brightness, contrast."""
    rgb = (x.clamp(-1, 1) + 1) / 2
    warmth = (rgb[:, 0] - rgb[:, 2]).flatten(1).mean(1)
    bright = rgb.flatten(1).mean(1)
    contrast = rgb.mean(1).flatten(1).std(1)
    return torch.stack([warmth, bright, contrast], 1)


def example(branching, share_prefix, seed, title, thumb=96, window_start=0, num_steps=12):
    spec = TreeSpec(num_steps, window_start, branching)
    levels = [depth_noise(0.9, 0.7, k, spec.depth) for k in range(spec.depth)]
    g = torch.Generator().manual_seed(seed)
    init = torch.randn((1, 3, SIZE, SIZE), generator=g)
    tree = rollout(SceneFlow(scenes()), None, spec, flux_sigmas(num_steps, shift=1.0), levels, init, g,
                   share_prefix=share_prefix)
    x0 = node_x0(tree)
    images = [to_pil((level + 1) / 2) for level in x0]  # the scenes live in [-1, 1]
    r = scene_rewards(tree.leaves)
    adv = group_advantages(r)
    eps = dynamic_clip_eps(normalized_reward(adv), 5e-5, 5e-3, 0.5)
    return render_tree(tree, images, r, ["warmth", "brightness", "contrast"], adv, eps, title=title, thumb=thumb)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--thumb", type=int, default=96)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    runs = {
        "tree-8-leaves": ((2, 2, 2, 1), True, 3, "a quiet landscape at sunset, warm light over rolling hills"),
        "tree-16-leaves": ((2, 2, 2, 2), True, 4, "a quiet landscape at sunset, warm light over rolling hills"),
        "baseline-12": ((12, 1, 1, 1), False, 5, "the same prompt, MixGRPO baseline: 12 independent trajectories"),
    }
    for name, (branching, shared, seed, title) in runs.items():
        img = example(branching, shared, seed, title, a.thumb)
        path = a.out / f"{name}.png"
        img.save(path, optimize=True)
        print(path, img.size)


if __name__ == "__main__":
    main()
