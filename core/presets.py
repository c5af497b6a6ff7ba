"""Presets: Dynamic-TreeRPO (paper defaults), its ablations, and the published baselines,
all as settings of the one engine (a baseline is a tree with branching [G, 1, 1, ...]).

| preset           | tree             | prefix   | clip            | SFT  | after window |
|------------------|------------------|----------|-----------------|------|--------------|
| dynamic-treerpo  | [2,2,2,1], b=0.7 | shared   | dynamic (Eq.11) | 0.02 | ODE          |
| tree-clip        | [2,2,2,1], b=0.7 | shared   | dynamic         | 0    | ODE          |
| tree             | [2,2,2,1], b=0.7 | shared   | fixed 1e-4      | 0    | ODE          |
| mixgrpo          | [12,1,1,1]       | per leaf | fixed 1e-4      | 0    | ODE          |
| mixgrpo-flash    | [12,1,1,1]       | per leaf | fixed 1e-4      | 0    | DPM++ 2M x0.4|
| dancegrpo        | [12,1,...] x T   | per leaf | fixed 1e-4      | 0    | (SDE all T)  |
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from .rng import generator
from .sde import NOISE_SCHEDULES
from .window import WINDOW_MODES, SlidingWindow

CLIP_MODES = ("dynamic", "fixed")


@dataclass
class TrainConfig:
    """Every setting of one training run. Field names follow the paper where it has one."""

    preset: str = "dynamic-treerpo"
    # sampling (paper 3.1-3.2)
    num_steps: int = 25  # T
    shift: float | None = 3.0  # static time shift; None with dynamic_shift for diffusers' mu(seq_len)
    dynamic_shift: bool = False
    branching: tuple = (2, 2, 2, 1)  # children per node at each window step; depth d = len
    share_prefix: bool = True  # compute the path to the root once (False: every leaf pays it, as published)
    noise_level: float = 0.7  # a of g = a*sqrt(sigma/(1-sigma))
    noise_schedule: str = "flow-grpo"  # or "constant" (DanceGRPO's g = a)
    beta: float = 0.7  # depth noise growth of Eq. 6; 0 = same noise at every layer
    compress_ratio: float | None = None  # MixGRPO-Flash: DPM-Solver++ on ceil(ratio*n) steps after the window
    # sliding window
    window_mode: str = "progressive"
    window_start: int = 0
    window_stride: int = 1
    window_every: int = 25  # iterations between window moves
    window_max_start: int | None = None  # default num_steps - depth
    # which window layers are trained
    train_fraction: float = 1.0  # random fraction of the window layers trained per iteration (DanceGRPO 0.6)
    drop_last_layer: bool = False  # DanceGRPO trains no step that lands on sigma = 0
    # objective (3.3-3.4)
    clip_mode: str = "dynamic"
    clip_eps: float = 1e-4  # fixed clip
    eps_low: float = 5e-5
    eps_high: float = 5e-3
    eta: float = 0.5
    sft_lambda: float = 0.02  # LayerTuning-RL lambda
    kl_beta: float = 0.0  # optional KL to the reference (adapters off); the paper uses none
    adv_clip: float | None = 5.0
    reward_weights: tuple | None = None  # None: the reward set's own weights
    # optimisation
    lr: float = 5e-6
    weight_decay: float = 1e-4
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    step_per_layer: bool = True  # Alg. 1 lines 18-19: one optimizer step per trained tree layer
    # batch and memory
    prompts_per_iteration: int = 1  # per process
    micro_batch: int | None = None  # rows per model forward, the same in rollout and update
    offload_latents: bool = False  # keep the tree's stored latents on the CPU between rollout and update
    mixed_precision: str = "no"  # "bf16" on CUDA
    seed: int = 0
    deterministic: bool = False  # torch deterministic kernels: bit-identical reruns (multi-threaded CPU too), a little slower
    extra: dict = field(default_factory=dict)

    @property
    def depth(self) -> int:
        return len(self.branching)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the first bad setting."""
        self.branching = tuple(int(b) for b in self.branching)
        if not self.branching or any(b < 1 for b in self.branching):
            raise ValueError(f"branching must be a non-empty list of positive integers, got {list(self.branching)}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.depth > self.num_steps:
            raise ValueError(f"branching has depth {self.depth} > num_steps {self.num_steps}")
        if not 0 <= self.window_start <= self.num_steps - self.depth:
            raise ValueError(
                f"window_start={self.window_start} puts the window past the last step "
                f"(must lie in [0, {self.num_steps - self.depth}] for num_steps={self.num_steps}, depth={self.depth})"
            )
        if self.noise_level <= 0:
            raise ValueError(f"noise_level must be > 0, got {self.noise_level}")
        if self.beta < 0:
            raise ValueError(f"beta (noise growth) must be >= 0, got {self.beta}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {self.window_mode!r}")
        if self.clip_mode not in CLIP_MODES:
            raise ValueError(f"clip_mode must be one of {CLIP_MODES}, got {self.clip_mode!r}")
        if self.compress_ratio is not None and not 0 < self.compress_ratio <= 1:
            raise ValueError(f"compress_ratio must lie in (0, 1], got {self.compress_ratio}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        for name in ("clip_eps", "eps_low", "eps_high", "eta", "sft_lambda", "kl_beta", "lr", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eps_low > self.eps_high:
            raise ValueError(f"eps_low ({self.eps_low}) must not exceed eps_high ({self.eps_high})")
        if self.prompts_per_iteration < 1:
            raise ValueError(f"prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or None, got {self.micro_batch}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        return self

    def window(self) -> SlidingWindow:
        return SlidingWindow(self.num_steps, self.depth, self.window_mode, self.window_start, self.window_stride,
                             self.window_every, self.window_max_start, self.seed)

    def trained_layers(self, iteration: int) -> list[int]:
        """Window layers trained at ``iteration``: all of them, or a seeded random fraction
        (the same for the whole group, so rollout and update keep one batch layout)."""
        candidates = list(range(self.depth - 1 if self.drop_last_layer and self.depth > 1 else self.depth))
        if self.train_fraction >= 1:
            return candidates
        n = max(1, int(self.train_fraction * len(candidates)))
        pick = torch.randperm(len(candidates), generator=generator(self.seed, iteration, "layers"))[:n]
        return sorted(candidates[i] for i in pick.tolist())

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["branching"] = list(self.branching)
        d["adam_betas"] = list(self.adam_betas)
        return d


# The paper's 13.8 NFE is the average over every window start 0..21 (T=25, d=4): moving the
# window every 4 iterations visits all 22 starts within its 100-iteration run.
_TREE = dict(branching=(2, 2, 2, 1), share_prefix=True, beta=0.7, noise_level=0.7, window_every=4)
_MIX = dict(
    branching=(12, 1, 1, 1), share_prefix=False, beta=0.0, noise_level=0.7, clip_mode="fixed", clip_eps=1e-4,
    sft_lambda=0.0, lr=1e-5, weight_decay=1e-4,
)

PRESETS: dict[str, dict] = {
    "dynamic-treerpo": dict(_TREE),
    "tree-clip": dict(_TREE, sft_lambda=0.0),
    "tree": dict(_TREE, sft_lambda=0.0, clip_mode="fixed", clip_eps=1e-4),
    "mixgrpo": dict(_MIX),
    "mixgrpo-flash": dict(_MIX, compress_ratio=0.4),
    # branching is filled in from num_steps and group_size by make_config
    "dancegrpo": dict(
        share_prefix=False, beta=0.0, noise_level=0.3, noise_schedule="constant", window_mode="frozen",
        window_start=0, train_fraction=0.6, drop_last_layer=True, clip_mode="fixed", clip_eps=1e-4,
        sft_lambda=0.0, lr=1e-5,
    ),
}
GROUP_SIZE = {"mixgrpo": 12, "mixgrpo-flash": 12, "dancegrpo": 12}


def make_config(preset: str = "dynamic-treerpo", group_size: int | None = None, **overrides) -> TrainConfig:
    """A validated TrainConfig for ``preset`` with any field overridden.

    ``group_size`` sets G of the baselines (trajectories per prompt, branching [G, 1, ...]).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    bad = sorted(set(overrides) - fields)
    if bad:
        raise ValueError(f"unknown setting(s) {bad} for preset {preset!r}; valid settings: {sorted(fields)}")
    values = dict(PRESETS[preset])
    values.update(overrides)
    if group_size is not None and preset not in GROUP_SIZE:
        raise ValueError(f"group_size applies to the baselines {sorted(GROUP_SIZE)}; for {preset!r} set branching")
    if preset in GROUP_SIZE and "branching" not in overrides:
        g = group_size or GROUP_SIZE[preset]
        if g < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares samples), got {g}")
        depth = values.get("num_steps", TrainConfig.num_steps) if preset == "dancegrpo" else 4
        values["branching"] = (g,) + (1,) * (depth - 1)
    return TrainConfig(preset=preset, **values).validate()
