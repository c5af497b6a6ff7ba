"""Weight-free rewards: JPEG (in)compressibility, brightness, saturation, colourfulness.

Cheap, deterministic, prompt-independent. The JPEG rewards follow DDPO / Flow-GRPO: the
image is rounded to 8 bits and saved as JPEG at quality 95; the size in kilobytes (1000
bytes) is the incompressibility, its negative the compressibility.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from .base import Reward

__all__ = [
    "JPEGCompressibility",
    "JPEGIncompressibility",
    "Brightness",
    "Saturation",
    "Colourfulness",
    "jpeg_size_kb",
]


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """JPEG file size in kB of each image of Tensor[B, 3, H, W] in [0, 1] (8-bit, `quality`)."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


class JPEGIncompressibility(Reward):
    """JPEG size in kB at quality 95 (larger = more detail). ~20-200 kB at 512x512."""

    name = "jpeg_incompressibility"
    typical_range = (20.0, 200.0)

    def __init__(self, quality: int = 95, device="cpu", dtype=torch.float32, batch_size=None):
        super().__init__(device, dtype, batch_size)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"{self.name}: JPEG quality must be in 1..100, got {quality}")
        self.quality = int(quality)

    def _score(self, images, prompts):
        return jpeg_size_kb(images, self.quality)


class JPEGCompressibility(JPEGIncompressibility):
    """Negative JPEG size in kB at quality 95 (larger = simpler image)."""

    name = "jpeg_compressibility"
    typical_range = (-200.0, -20.0)

    def _score(self, images, prompts):
        return -jpeg_size_kb(images, self.quality)


class Brightness(Reward):
    """Mean Rec. 601 luma in [0, 1]."""

    name = "brightness"
    typical_range = (0.0, 1.0)

    def _score(self, images, prompts):
        w = torch.tensor([0.299, 0.587, 0.114], device=images.device).view(1, 3, 1, 1)
        return (images * w).sum(dim=1).mean(dim=(1, 2))


class Saturation(Reward):
    """Mean HSV saturation (max - min) / max in [0, 1]; black pixels count as 0."""

    name = "saturation"
    typical_range = (0.0, 1.0)

    def _score(self, images, prompts):
        mx = images.amax(dim=1)
        mn = images.amin(dim=1)
        sat = torch.where(mx > 0, (mx - mn) / mx.clamp_min(1e-8), torch.zeros_like(mx))
        return sat.mean(dim=(1, 2))


class Colourfulness(Reward):
    """Hasler-Suesstrunk colourfulness on [0, 1] RGB: sigma_rgyb + 0.3 * mu_rgyb (~0-0.6)."""

    name = "colourfulness"
    typical_range = (0.0, 0.6)

    def _score(self, images, prompts):
        r, g, b = images[:, 0].flatten(1), images[:, 1].flatten(1), images[:, 2].flatten(1)
        rg = r - g
        yb = 0.5 * (r + g) - b
        std = torch.sqrt(rg.var(dim=1, unbiased=False) + yb.var(dim=1, unbiased=False))
        mean = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
        return std + 0.3 * mean
