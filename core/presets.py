"""Presets: Dynamic-TreeRPO (paper defaults), its ablations, and the published baselines,
all as settings of the one engine (a baseline is a tree with branching [G, 1, 1, ...]).

| preset           | tree             | prefix   | clip            | SFT  | after window |
|------------------|------------------|----------|-----------------|------|--------------|
| dynamic-treerpo  | [2,2,2,1], b=0.7 | shared   | dynamic (Eq.11) | 0.02 | ODE          |
| tree-clip        | [2,2,2,1], b=0.7 | shared   | dynamic         | 0    | ODE          |
| tree             | [2,2,2,1], b=0.7 | shared   | fixed 1e-4      | 0    | ODE          |
| mixgrpo          | [12,1,1,1]       | per leaf | fixed 1e-4      | 0    | ODE          |
| mixgrpo-flash    | [12,1,1,1]       | per leaf | fixed 1e-4      | 0    | DPM++ 2M x0.4|
| dancegrpo        | [12,1,...] x T-1 | per leaf | fixed 1e-4      | 0    | x0 (1 step)  |

Every preset's learning rate is a LoRA rate; docs/engine.md gives each field's source.
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass

import torch

from .advantages import EDGE_ADVANTAGES
from .rng import generator
from .sde import NOISE_SCHEDULES, SAMPLERS
from .window import WINDOW_MODES, SlidingWindow

CLIP_MODES = ("dynamic", "fixed")
SFT_TARGETS = ("velocity", "best-sample", "best-sample-noised")
SFT_NODES = ("all", "best-path", "siblings")
CLIP_REWARDS = ("combined", "group-minmax", "running")
ADV_STD_MODES = ("group", "global")


@dataclass
class TrainConfig:
    """Every setting of one training run. Field names follow the paper where it has one.
    ``TrainConfig()`` equals the ``dynamic-treerpo`` preset (tested); docs/engine.md lists
    every field and where its value comes from."""

    preset: str = "dynamic-treerpo"
    # sampling (paper 3.1-3.2)
    num_steps: int = 25  # T
    shift: float | None = 3.0  # static time shift; None with dynamic_shift for diffusers' mu(seq_len)
    dynamic_shift: bool = False
    branching: tuple = (2, 2, 2, 1)  # children per node at each window step; depth d = len
    share_prefix: bool = True  # compute the path to the root once (False: every leaf pays it, as published)
    sampler: str = "sde"  # "sde": Flow-GRPO step (Eq. 5/8); "cps": coefficients-preserving step
    noise_level: float = 0.7  # a of g = a*sqrt(sigma/(1-sigma))
    noise_schedule: str = "flow-grpo"  # or "constant" (DanceGRPO's g = a)
    beta: float = 0.7  # depth noise growth of Eq. 6; 0 = same noise at every layer
    split_noise: float = 1.0  # noise level factor at the window steps where the tree branches (BranchGRPO: 4)
    compress_ratio: float | None = None  # MixGRPO-Flash: DPM-Solver++ on int(ratio*(n+1))-1 steps after the window
    # sliding window
    window_mode: str = "progressive"
    window_start: int = 0
    window_stride: int = 1
    window_every: int = 1  # iterations between window moves (Alg. 1 line 22: every iteration)
    window_max_start: int | None = None  # default num_steps - depth - 1: every SDE step lands on sigma > 0
    iterations: int = 100  # length of the published run: `treerpo train` default, `bench nfe` average
    # which window layers are trained
    train_fraction: float = 1.0  # random fraction of the window layers trained per iteration (DanceGRPO 0.6)
    drop_last_layer: bool = False  # never train the window's last layer
    # objective (3.3-3.4)
    clip_mode: str = "dynamic"
    clip_eps: float = 1e-4  # fixed clip
    eps_low: float = 5e-5
    eps_high: float = 5e-3
    eta: float = 0.5
    clip_reward: str = "combined"  # R of Eq. 11: combined reward value, "group-minmax" or "running"
    sft_lambda: float = 0.02  # LayerTuning-RL lambda
    sft_target: str = "velocity"  # Eq. 12 read literally; "best-sample": v* = (x_t - x0_best) / sigma_t
    sft_nodes: str = "all"  # nodes LayerTuning regresses: "all" (paper), "best-path", "siblings"
    sft_decay: bool = False  # lambda falls linearly to 0 over `iterations` (a reading of Fig. 4b)
    kl_beta: float = 0.0  # optional KL to the reference (adapters off); the paper uses none
    adv_clip: float | None = 5.0
    edge_advantage: str = "leaf"  # Eq. 9: every leaf's advantage on each edge of its path; see EDGE_ADVANTAGES
    adv_std: str = "group"  # "global": one std per reward model over the whole batch (Flow-GRPO global_std)
    adv_std_unbiased: bool = False  # MixGRPO/DanceGRPO: torch.std (unbiased)
    adv_std_eps: float = 0.0  # added to the std (MixGRPO/DanceGRPO 1e-8, Flow-GRPO 1e-4)
    reward_weights: tuple | None = None  # None: the reward set's own weights
    normalize_reward_weights: bool = False  # MixGRPO: weights scaled to sum to 1
    ratio_norm: bool = False  # GRPO-Guard's ratio normalisation
    # optimisation (LoRA learning rates, see docs/engine.md)
    lr: float = 1.5e-4
    weight_decay: float = 1e-4
    adam_betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    step_per_layer: bool = True  # Alg. 1 lines 18-19: one optimizer step per trained tree layer
    ema_decay: float = 0.0  # > 0: keep an EMA of the trainable weights (Flow-GRPO), for evaluation and saving
    ema_every: int = 1  # iterations between EMA updates
    # batch and memory
    prompts_per_iteration: int = 1  # per process
    micro_batch: int | None = None  # rows per model forward, the same in rollout and update
    offload_latents: bool = False  # keep the tree's stored latents on the CPU between rollout and update
    mixed_precision: str = "no"  # "bf16" on CUDA
    seed: int = 0
    # torch deterministic kernels: bit-identical reruns (multi-threaded CPU too), a little slower
    deterministic: bool = False

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
        self.window()  # raises on a bad window_start / window_max_start / window_every
        if self.noise_level <= 0:
            raise ValueError(f"noise_level must be > 0, got {self.noise_level}")
        if self.split_noise <= 0:
            raise ValueError(f"split_noise must be > 0, got {self.split_noise}")
        if self.beta < 0:
            raise ValueError(f"beta (noise growth) must be >= 0, got {self.beta}")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}")
        if self.window_mode not in WINDOW_MODES:
            raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {self.window_mode!r}")
        for name, allowed in (("clip_mode", CLIP_MODES), ("clip_reward", CLIP_REWARDS), ("adv_std", ADV_STD_MODES),
                              ("sampler", SAMPLERS), ("sft_target", SFT_TARGETS),
                              ("sft_nodes", SFT_NODES), ("edge_advantage", EDGE_ADVANTAGES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1) (0 = no EMA), got {self.ema_decay}")
        if self.ema_every < 1 or self.iterations < 1:
            raise ValueError(f"ema_every and iterations must be >= 1, got ema_every={self.ema_every}, "
                             f"iterations={self.iterations}")
        if self.compress_ratio is not None and not 0 < self.compress_ratio <= 1:
            raise ValueError(f"compress_ratio must lie in (0, 1], got {self.compress_ratio}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        if not self.lr > 0:  # 0 would run every forward and backward and change nothing
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("clip_eps", "eps_low", "eps_high", "eta", "sft_lambda", "kl_beta", "weight_decay",
                     "adv_std_eps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eps_low > self.eps_high:
            raise ValueError(f"eps_low ({self.eps_low}) must not exceed eps_high ({self.eps_high})")
        if self.prompts_per_iteration < 1:
            raise ValueError(f"prompts_per_iteration must be >= 1, got {self.prompts_per_iteration}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1 or None, got {self.micro_batch}")
        if self.mixed_precision == "fp16":
            # FLUX's activations overflow fp16, and fp16 needs a loss scaler the update does not keep
            raise ValueError("mixed_precision='fp16' is not supported: use 'bf16' (same memory, no overflow) or 'no'")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")
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


# Dynamic-TreeRPO (paper 4.1, Alg. 1): the tree moves its root every iteration. The paper's
# lr 5e-6 is a full fine-tuning rate; the engine trains a LoRA, so every preset carries the
# LoRA rate of the published FLUX LoRA runs (Flow-GRPO config/base.py train.learning_rate
# 3e-4 with use_lora; DanceGRPO finetune_flux_grpo_8gpus_lora.sh --learning_rate 3e-4),
# keeping the papers' ratio: Dynamic-TreeRPO's 5e-6 is half the baselines' 1e-5.
_TREE = dict(branching=(2, 2, 2, 1), share_prefix=True, beta=0.7, noise_level=0.7, window_every=1, lr=1.5e-4,
             iterations=100)
# MixGRPO, scripts/finetune/finetune_flux_grpo_MixGRPO.sh + fastvideo/train_grpo_flux.py:
# num_generations 12, eta 0.7 (flow_grpo_sampling), window (group_size) 4 moved by 1
# (prog_overlap_step) every iters_per_group=25 iterations, max_train_steps 300, clip_range
# 1e-4, adv_clip_max 5, weight_decay 1e-4, max_grad_norm 1, lr 1e-5 (full; LoRA: 3e-4),
# advantages per reward model with torch.std (unbiased) + 1e-8, reward weights summing to 1.
_MIX = dict(
    branching=(12, 1, 1, 1), share_prefix=False, beta=0.0, noise_level=0.7, clip_mode="fixed", clip_eps=1e-4,
    sft_lambda=0.0, lr=3e-4, weight_decay=1e-4, window_every=25, iterations=300, normalize_reward_weights=True,
    adv_std_unbiased=True, adv_std_eps=1e-8,
)

PRESETS: dict[str, dict] = {
    "dynamic-treerpo": dict(_TREE),
    "tree-clip": dict(_TREE, sft_lambda=0.0),
    "tree": dict(_TREE, sft_lambda=0.0, clip_mode="fixed", clip_eps=1e-4),
    # Ours, chosen on the tiny-shapes validation prompts (docs/benchmarks.md#treerpo-plus): the paper's
    # tree without LayerTuning, its window frozen on the highest-noise steps and one advantage std
    # over the batch. Of window (frozen / moving) x optimizer steps (per layer / one per iteration)
    # on `shapes-crisp`, frozen with a step per layer gained most.
    "treerpo-plus": dict(_TREE, window_mode="frozen", window_start=0, sft_lambda=0.0, adv_std="global"),
    "mixgrpo": dict(_MIX),
    # MixGRPO-Flash, scripts/finetune/finetune_flux_grpo_MixGRPO_Flash.sh: as MixGRPO, but
    # iters_per_group 20 and dpm_post_compress_ratio 0.4 (DPM-Solver++ order 2 after the window,
    # int(0.4 * (n + 1)) - 1 steps, fastvideo/utils/sampling_utils.py).
    "mixgrpo-flash": dict(_MIX, compress_ratio=0.4, window_every=20),
    # DanceGRPO, scripts/finetune/finetune_flux_grpo.sh + fastvideo/train_grpo_flux.py: SDE at
    # every step with eta 0.3 (constant g), num_generations 12, timestep_fraction 0.6, clip_range
    # 1e-4, adv_clip_max 5, torch.std + 1e-8, lr 1e-5 full (LoRA script: 3e-4), one optimizer
    # step per accumulated batch over all its trained timesteps, the image is the x0 prediction
    # of the last step (= our Euler step onto sigma = 0), max_train_steps 300. Branching
    # [G, 1, ...] over T - 1 steps is filled in by make_config.
    "dancegrpo": dict(
        share_prefix=False, beta=0.0, noise_level=0.3, noise_schedule="constant", window_mode="frozen",
        window_start=0, train_fraction=0.6, clip_mode="fixed", clip_eps=1e-4, sft_lambda=0.0, lr=3e-4,
        step_per_layer=False, adv_std_unbiased=True, adv_std_eps=1e-8, iterations=300,
    ),
}
GROUP_SIZE = {"mixgrpo": 12, "mixgrpo-flash": 12, "dancegrpo": 12}


_WORDS = {"true": True, "false": False, "none": None, "null": None}


def parse_settings(items) -> dict:
    """``key=value`` settings from a list (``--set``) or a text (one per line or ``;``-separated,
    the Tree settings node); values are Python literals where they parse (also true / false / null,
    as JSON and YAML spell them, in any case), else strings."""
    if isinstance(items, str):
        items = [part for line in items.splitlines() for part in line.split(";")]
    out = {}
    for item in items or []:
        if not item.strip():
            continue
        if "=" not in item:
            raise ValueError(f"a setting must read key=value, got {item.strip()!r}")
        key, val = item.split("=", 1)
        val = val.strip()
        try:
            out[key.strip()] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key.strip()] = _WORDS.get(val.lower(), val)
    return out


def _fits(value, hint: str) -> bool:
    """Does ``value`` fit the annotation ``hint`` (a string: annotations are postponed) of a field?"""
    allowed = {t.strip() for t in hint.split("|")}
    if value is None:
        return "None" in allowed
    for kind, names in ((bool, {"bool"}), (int, {"int", "float"}), (float, {"float"}), (str, {"str"}),
                        ((list, tuple), {"tuple"}), (dict, {"dict"})):
        if isinstance(value, kind):
            return bool(allowed & names)
    return False


def check_type(key: str, value) -> None:
    """Refuse a value of the wrong kind for a setting (lr='abc', from --set or the node's text)
    by name, before validate() meets it in a comparison."""
    hint = next((f.type for f in dataclasses.fields(TrainConfig) if f.name == key), None)
    if isinstance(hint, str) and not _fits(value, hint):
        kinds = hint.replace(" | ", " or ").replace("tuple[int, ...]", "list of integers")
        raise ValueError(f"{key}={value!r}: {key} takes values of type {kinds}")


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
    for key, value in overrides.items():
        check_type(key, value)
    values = dict(PRESETS[preset])
    values.update(overrides)
    if group_size is not None and preset not in GROUP_SIZE:
        raise ValueError(f"group_size applies to the baselines {sorted(GROUP_SIZE)}; for {preset!r} set branching")
    if preset in GROUP_SIZE and "branching" not in overrides:
        g = group_size or GROUP_SIZE[preset]
        if g < 2:
            raise ValueError(f"group_size must be >= 2 (GRPO compares samples), got {g}")
        # DanceGRPO: SDE on steps 0..T-2; the last step (onto sigma = 0) gives the x0 prediction
        depth = values.get("num_steps", TrainConfig.num_steps) - 1 if preset == "dancegrpo" else 4
        values["branching"] = (g,) + (1,) * (depth - 1)
    return TrainConfig(preset=preset, **values).validate()
