"""Tree-structured rollout of Dynamic-TreeRPO (paper 3.2).

A tree of depth d sits in a window of d denoising steps starting at step tau
(``window_start``). The path from the initial noise to the root (steps 0..tau-1) is an
ODE computed once; inside the window, window step k evaluates the model once on all
nodes of layer k in ONE batched forward and samples ``branching[k]`` SDE children per
node with the layer's noise level (Eq. 6); after the window every leaf is finished with
the ODE (or DPM-Solver++ on a compressed grid). A baseline is the same tree with
branching [G, 1, 1, ...] and, as published, without prefix sharing.

The Tree record keeps what training needs per window layer: parent latents, child
latents, which parent each child came from, the old log-probs and the old velocities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .sde import compressed_grid, compressed_steps, dpm_solver_pp_step, ode_step, sde_step

Cond = Any  # dict[str, Tensor] with batch dim first, a Tensor, or None


@dataclass(frozen=True)
class TreeSpec:
    """Shape of one tree: ``num_steps`` denoising steps, window at ``window_start``,
    ``branching[k]`` children per node at window step k (depth = len(branching))."""

    num_steps: int
    window_start: int
    branching: tuple[int, ...]

    def __post_init__(self):
        object.__setattr__(self, "branching", tuple(int(b) for b in self.branching))
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        if not self.branching:
            raise ValueError("branching must list at least one window layer, e.g. [2, 2, 2, 1]")
        if any(b < 1 for b in self.branching):
            raise ValueError(f"branching must be positive integers (children per node), got {list(self.branching)}")
        if self.window_start < 0 or self.window_start + self.depth > self.num_steps:
            raise ValueError(
                f"window_start={self.window_start} with depth {self.depth} runs past the last step: "
                f"window_start must lie in [0, {self.num_steps - self.depth}] for num_steps={self.num_steps}"
            )

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def leaves(self) -> int:
        return math.prod(self.branching)

    def nodes(self, k: int) -> int:
        """Nodes evaluated at window step k (1, 2, 4, 8 for branching [2, 2, 2, 1])."""
        return math.prod(self.branching[:k])

    @property
    def tail_steps(self) -> int:
        return self.num_steps - self.window_start - self.depth


def tree_nfe(
    spec: TreeSpec,
    share_prefix: bool = True,
    trained_layers: list[int] | None = None,
    compress_ratio: float | None = None,
) -> dict:
    """Model evaluations of one tree (one prompt).

    rollout_total with a shared prefix: window_start + sum_k nodes_k + leaves * tail;
    without it every leaf pays its whole path (leaves * num_steps). ``compress_ratio``
    replaces the tail by int(ratio * (tail + 1)) - 1 DPM steps (at least 1). ``train_per_sample`` is the number
    of trained steps on each leaf's path (the papers' "NFE new"); ``train_total`` the
    forwards the update runs (parents of trained layers, or leaves x layers unshared).
    """
    tail = spec.tail_steps if compress_ratio is None else compressed_steps(spec.tail_steps, compress_ratio)
    layers = list(range(spec.depth)) if trained_layers is None else list(trained_layers)
    if share_prefix:
        rollout = spec.window_start + sum(spec.nodes(k) for k in range(spec.depth)) + spec.leaves * tail
        train = sum(spec.nodes(k) for k in layers)
    else:
        rollout = spec.leaves * (spec.window_start + spec.depth + tail)
        train = spec.leaves * len(layers)
    return {
        "rollout_total": rollout,
        "rollout_per_sample": rollout / spec.leaves,
        "train_total": train,
        "train_per_sample": len(layers),
    }


def expand_cond(cond: Cond, n: int) -> Cond:
    """Repeat per-prompt conditioning (batch dim 1) to a batch of n, without copying."""
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return cond.expand(n, *cond.shape[1:])
    if isinstance(cond, dict):
        return {k: expand_cond(v, n) for k, v in cond.items()}
    raise TypeError(f"conditioning must be a Tensor, a dict of Tensors or None, got {type(cond).__name__}")


@dataclass
class TreeLayer:
    """One window step: P parents -> E children (edges).

    ``parent_index[e]`` is the parent row of child e; ``edge_of_leaf[i]`` the edge of
    layer k on leaf i's path (a shared edge appears under every descendant leaf).
    """

    k: int
    step: int
    sigma: float
    sigma_next: float
    noise_level: float
    std: float  # of every edge of this layer (same sigma pair and noise level)
    parents: torch.Tensor
    children: torch.Tensor
    parent_index: torch.Tensor
    edge_of_leaf: torch.Tensor
    old_log_prob: torch.Tensor
    old_velocity: torch.Tensor | None = None


@dataclass
class Tree:
    spec: TreeSpec
    sigmas: torch.Tensor
    layers: list[TreeLayer]
    leaves: torch.Tensor  # final latents [L, ...]
    nfe: int  # model evaluations actually run
    share_prefix: bool = True

    def to(self, device) -> "Tree":
        """Move stored latents (e.g. back from a CPU offload) to ``device``."""
        for layer in self.layers:
            for name in ("parents", "children", "old_log_prob", "old_velocity"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.to(device, non_blocking=True))
        return self


class PromptRows:
    """Conditioning of a batch that holds several prompts' nodes, prompt-major: row r belongs to
    prompt r // per_prompt. ``rows(a, b)`` is the conditioning of rows a..b-1 (no copy when they
    all belong to one prompt)."""

    def __init__(self, conds: list[Cond], per_prompt: int):
        self.conds, self.per_prompt = list(conds), int(per_prompt)

    def rows(self, a: int, b: int) -> Cond:
        parts = []  # (prompt, rows of it) in row order
        while a < b:
            p = a // self.per_prompt
            end = min(b, (p + 1) * self.per_prompt)
            parts.append(expand_cond(self.conds[p], end - a))
            a = end
        return parts[0] if len(parts) == 1 else _cat_conds(parts)


def _cat_conds(parts: list[Cond]) -> Cond:
    if parts[0] is None:
        return None
    if isinstance(parts[0], torch.Tensor):
        shapes = {tuple(t.shape[1:]) for t in parts}
        if len(shapes) > 1:
            raise ValueError(f"prompts batched together need conditioning of one shape, got {sorted(shapes)} "
                             "(pad the text encoder's output to a fixed length)")
        return torch.cat(parts)
    return {k: _cat_conds([c[k] for c in parts]) for k in parts[0]}


class CountingModel:
    """Calls a velocity model in micro-batches and counts model evaluations (rows)."""

    def __init__(self, model: Callable, micro_batch: int | None = None):
        self.model, self.micro_batch, self.nfe = model, micro_batch, 0

    def __call__(self, x: torch.Tensor, sigma: float, cond: PromptRows) -> torch.Tensor:
        n = x.shape[0]
        self.nfe += n
        mb = self.micro_batch or n
        outs = []
        for i in range(0, n, mb):
            xb = x[i : i + mb]
            s = torch.full((xb.shape[0],), float(sigma), device=x.device, dtype=torch.float32)
            outs.append(self.model(xb, s, cond.rows(i, i + xb.shape[0])).float())
        return torch.cat(outs)


@torch.no_grad()
def rollout(model: Callable, cond: Cond, spec: TreeSpec, sigmas: torch.Tensor, noise_levels: list[float],
            init_noise: torch.Tensor, generator: torch.Generator, **kw) -> Tree:
    """Sample one tree for one prompt (``rollout_batch`` with one prompt; same arguments)."""
    return rollout_batch(model, [cond], spec, sigmas, noise_levels, [init_noise], [generator], **kw)[0]


@torch.no_grad()
def rollout_batch(
    model: Callable,
    conds: list[Cond],
    spec: TreeSpec,
    sigmas: torch.Tensor,
    noise_levels: list[float],
    init_noises: list[torch.Tensor],
    generators: list[torch.Generator],
    share_prefix: bool = True,
    compress_ratio: float | None = None,
    store_velocity: bool = True,
    micro_batch: int | None = None,
    offload: bool = False,
    noise_schedule: str = "flow-grpo",
    model_dtype: torch.dtype | None = None,
    sampler: str = "sde",
) -> list[Tree]:
    """Sample one tree per prompt under the current (old) policy, without grad, all prompts'
    trees grown together: every step evaluates the model once on the nodes of every prompt
    (prompt-major rows, in chunks of ``micro_batch``), so the narrow layers near the root run
    at P times their width.

    ``init_noises[p]`` [1, ...] is shared by prompt p's group. ``noise_levels[k]`` is the SDE
    noise of window layer k. SDE noise is drawn per child node from prompt p's
    ``generators[p]`` (on the CPU), in the order one prompt's rollout draws it, so a tree does
    not depend on the prompts batched with it. ``offload`` keeps the stored latents on the CPU
    until training needs them.
    """
    P = len(conds)
    if P < 1 or len(init_noises) != P or len(generators) != P:
        raise ValueError(f"rollout_batch needs one init noise and generator per prompt: {P} conds, "
                         f"{len(init_noises)} init noises, {len(generators)} generators")
    if len(sigmas) != spec.num_steps + 1:
        raise ValueError(f"sigmas has {len(sigmas)} values, expected num_steps + 1 = {spec.num_steps + 1}")
    if len(noise_levels) != spec.depth:
        raise ValueError(f"noise_levels has {len(noise_levels)} entries, expected depth {spec.depth}")
    for lvl in noise_levels:
        if lvl <= 0:
            raise ValueError(f"noise_level must be > 0 inside the window, got {lvl}")
    dtype = model_dtype or torch.float32
    net = CountingModel(model, micro_batch)
    sig = [float(s) for s in sigmas]
    store = (lambda t: t.to("cpu", non_blocking=True)) if offload else (lambda t: t)
    device = init_noises[0].device

    def each(t: torch.Tensor) -> list[torch.Tensor]:  # prompt-major rows -> one tensor per prompt
        return list(t.chunk(P)) if P > 1 else [t]

    width = 1 if share_prefix else spec.leaves  # rows per prompt that carry one node each
    x = torch.cat([n.float().expand(width, *n.shape[1:]) for n in init_noises])
    for step in range(spec.window_start):  # shared ODE prefix, computed once per prompt (or per leaf)
        v = net(x.to(dtype), sig[step], PromptRows(conds, width))
        x = ode_step(x, v, sig[step], sig[step + 1])

    layers: list[list[TreeLayer]] = [[] for _ in range(P)]
    for k in range(spec.depth):
        step = spec.window_start + k
        b = spec.branching[k]
        n_nodes = spec.nodes(k)
        rows = x.shape[0] // P
        v = net(x.to(dtype), sig[step], PromptRows(conds, rows))
        # One eps per child NODE, so an unshared rollout samples the very same tree.
        eps = torch.cat([torch.randn((n_nodes * b, *x.shape[1:]), generator=g, dtype=torch.float32)
                         for g in generators]).to(device)
        if share_prefix:
            parent_index = torch.arange(n_nodes).repeat_interleave(b)
            child_node = torch.arange(n_nodes * b)
        else:
            leaves_per_child = spec.leaves // (n_nodes * b)
            child_node = torch.arange(spec.leaves) // leaves_per_child
            parent_index = torch.arange(spec.leaves)
        # the same per-prompt indices, offset to each prompt's rows
        parent_rows = torch.cat([parent_index + p * rows for p in range(P)]).to(device)
        child_rows = torch.cat([child_node + p * n_nodes * b for p in range(P)]).to(device)
        out = sde_step(x[parent_rows], v[parent_rows], sig[step], sig[step + 1], noise_levels[k],
                       noise=eps[child_rows], schedule=noise_schedule, sampler=sampler)
        leaves_below = math.prod(spec.branching[k + 1 :])
        edge_of_leaf = torch.arange(spec.leaves) // leaves_below if share_prefix else torch.arange(spec.leaves)
        vs = each(v) if store_velocity else [None] * P
        for p, (xp, cp, lp, vp) in enumerate(zip(each(x), each(out.x_next), each(out.log_prob), vs)):
            layers[p].append(TreeLayer(
                k=k, step=step, sigma=sig[step], sigma_next=sig[step + 1], noise_level=noise_levels[k],
                std=float(out.std[0]), parents=store(xp), children=store(cp), parent_index=parent_index,
                edge_of_leaf=edge_of_leaf, old_log_prob=store(lp), old_velocity=store(vp) if vp is not None else None,
            ))
        x = out.x_next

    rows = PromptRows(conds, x.shape[0] // P)
    if compress_ratio is None:
        for step in range(spec.window_start + spec.depth, spec.num_steps):
            v = net(x.to(dtype), sig[step], rows)
            x = ode_step(x, v, sig[step], sig[step + 1])
    else:  # MixGRPO-Flash: fewer, higher-order steps after the window only
        grid = [float(s) for s in compressed_grid(sigmas[spec.window_start + spec.depth :], compress_ratio)]
        x0_prev = sigma_prev = None
        for i in range(len(grid) - 1):
            v = net(x.to(dtype), grid[i], rows)
            x0 = x - grid[i] * v
            x = dpm_solver_pp_step(x, x0, grid[i], grid[i + 1], x0_prev, sigma_prev)
            x0_prev, sigma_prev = x0, grid[i]

    return [Tree(spec=spec, sigmas=sigmas, layers=layers[p], leaves=leaves, nfe=net.nfe // P,
                 share_prefix=share_prefix) for p, leaves in enumerate(each(x))]
