"""Decoding FLUX latents to images for the reward models."""

from __future__ import annotations

import torch

from .flux_policy import unpack_latents


class FluxDecoder:
    """`decode(latents[B,16,H,W]) -> images[B,3,8H,8W]` in [0, 1] (float32, on the VAE's device).

    Packed latents [B, (H/2)(W/2), 64] are accepted too (pass `height`/`width` in latent
    pixels; a square grid is assumed otherwise). As in FluxPipeline: latents / scaling
    + shift, then VAE decode. Slicing/tiling are set on the VAE (see build.load_vae).
    """

    def __init__(self, vae, scaling_factor: float | None = None, shift_factor: float | None = None):
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(scaling_factor if scaling_factor is not None else cfg.scaling_factor)
        shift = shift_factor if shift_factor is not None else getattr(cfg, "shift_factor", None)
        self.shift_factor = float(shift or 0.0)
        self.latent_channels = int(cfg.latent_channels)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        if latents.ndim == 3:
            n = latents.shape[1]
            if height is None or width is None:
                side = int(round((n) ** 0.5)) * 2
                height = width = side
            latents = unpack_latents(latents, height, width)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(
                f"decode expects latents [B, {self.latent_channels}, H, W] (or packed tokens), "
                f"got {tuple(latents.shape)}"
            )
        p = next(self.vae.parameters())
        z = latents.to(device=p.device, dtype=torch.float32) / self.scaling_factor + self.shift_factor
        image = self.vae.decode(z.to(p.dtype), return_dict=False)[0]
        return (image.float() / 2 + 0.5).clamp_(0.0, 1.0)
