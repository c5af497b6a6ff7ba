"""FLUX sigma schedules.

sigma runs from 1 (pure noise) to 0 (clean image). FLUX.1-dev uses a time shift that
pushes steps towards the noisy end: either a static shift s (MixGRPO uses s = 3) or the
diffusers "dynamic" shift whose strength mu grows linearly with the image's token count.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import torch

from .sde import depth_noise

if TYPE_CHECKING:
    from .presets import TrainConfig

# diffusers' FlowMatchEulerDiscreteScheduler defaults for FLUX.1-dev.
BASE_SEQ_LEN, MAX_SEQ_LEN = 256, 4096
BASE_SHIFT, MAX_SHIFT = 0.5, 1.15


def dynamic_shift_mu(image_seq_len: int) -> float:
    """mu of the dynamic shift: linear in the number of image tokens (0.5 .. 1.15)."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_seq_len - BASE_SEQ_LEN)


def flux_sigmas(num_steps: int, shift: float | None = None, image_seq_len: int | None = None) -> torch.Tensor:
    """Sigma grid of ``num_steps`` steps: a float32 tensor of ``num_steps + 1`` values, 1 -> 0.

    ``shift``: static shift, sigma' = s*sigma / (1 + (s-1)*sigma).
    ``image_seq_len``: dynamic shift, sigma' = e^mu / (e^mu + 1/sigma - 1), mu from the
    sequence length (as diffusers' FluxPipeline does). Give at most one of the two; with
    neither the grid is linear.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if shift is not None and image_seq_len is not None:
        raise ValueError("give either shift (static) or image_seq_len (dynamic shift), not both")
    sig = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if shift is not None:
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        sig = shift * sig / (1 + (shift - 1) * sig)
    elif image_seq_len is not None:
        if image_seq_len < 1:
            raise ValueError(f"image_seq_len must be >= 1, got {image_seq_len}")
        e = math.exp(dynamic_shift_mu(image_seq_len))
        inner = sig[:-1]
        sig = torch.cat([e / (e + (1 / inner - 1)), sig[-1:]])
    return sig.float()


def schedule(config: TrainConfig, latent_shape: Sequence[int]) -> tuple[torch.Tensor, list[float]]:
    """The sigma grid and the per-layer SDE noise levels (Eq. 6) of a run with ``config``."""
    c = config
    if c.dynamic_shift:
        seq = (latent_shape[1] // 2) * (latent_shape[2] // 2)  # FLUX packs 2x2 patches
        sigmas = flux_sigmas(c.num_steps, image_seq_len=seq)
    else:
        sigmas = flux_sigmas(c.num_steps, shift=c.shift)
    # split_noise: extra exploration where the tree branches (BranchGRPO scales the noise at split steps)
    return sigmas, [depth_noise(c.noise_level, c.beta, k, c.depth) * (c.split_noise if b > 1 else 1.0)
                    for k, b in enumerate(c.branching)]
