"""Reward models for Dynamic-TreeRPO.

HPS-v2.1, PickScore and ImageReward run on transformers' own classes from the original
checkpoint files (no hpsv2 / image-reward packages, no downloads); weight-free rewards
(including `shapes`, prompt fidelity in the shapes world) need no files. Typical use::

    from treerpo.core.rewards import load_rewards
    rewards = load_rewards("hps:1, pickscore:1, imagereward:1", models_dir="ComfyUI/models",
                           device="cuda", dtype=torch.bfloat16)
    scores = rewards(images, prompts)          # Tensor[B, K], NaN = could not be scored
    rewards.names, rewards.weights, rewards.last_metrics

See docs/rewards.md for the files each model needs and the folder layout.
"""

from .base import Reward, RewardSet, check_images_and_prompts
from .hps import HPSReward, convert_open_clip_state_dict, load_hps
from .imagereward import ImageRewardReward, load_imagereward
from .pickscore import PickScoreReward, load_pickscore
from .registry import (
    MODELS_SUBDIR,
    available_rewards,
    canonical_reward_name,
    clear_reward_cache,
    expected_files,
    load_reward,
    load_rewards,
    parse_reward_spec,
    rewards_root,
)
from .shapes import ShapesColourReward, ShapesCrispAskedReward, ShapesCrispReward, ShapesLayoutReward, ShapesReward
from .simple import Brightness, Colourfulness, JPEGCompressibility, JPEGIncompressibility, Saturation

__all__ = [
    "Reward",
    "RewardSet",
    "check_images_and_prompts",
    "HPSReward",
    "PickScoreReward",
    "ImageRewardReward",
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "Brightness",
    "Saturation",
    "Colourfulness",
    "ShapesColourReward",
    "ShapesCrispAskedReward",
    "ShapesCrispReward",
    "ShapesLayoutReward",
    "ShapesReward",
    "load_hps",
    "load_pickscore",
    "load_imagereward",
    "convert_open_clip_state_dict",
    "MODELS_SUBDIR",
    "available_rewards",
    "canonical_reward_name",
    "expected_files",
    "rewards_root",
    "load_reward",
    "load_rewards",
    "parse_reward_spec",
    "clear_reward_cache",
]
