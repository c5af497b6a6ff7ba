"""`load_flux`: everything the engine needs from one call (policy, cached text encoding, decode)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from .build import load_flux_policy, load_vae
from .files import FluxFiles, find_flux_files
from .flux_policy import FluxPolicy, LoraSettings
from .text import FluxTextEncoder
from .vae import FluxDecoder


@dataclass
class FluxStack:
    """What the engine needs: the policy, `encode(prompts)` and `decode(latents)`."""

    files: FluxFiles
    policy: FluxPolicy
    encode: Callable
    decode: Callable

    @property
    def latent_channels(self) -> int:
        return self.policy.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, from the autoencoder's config (8 for FLUX.1)."""
        vae = getattr(self.decode, "vae", None)
        if vae is not None:
            return 2 ** (len(vae.config.block_out_channels) - 1)
        return self.files.vae_scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        return latent_shape(resolution, self.latent_channels, self.vae_scale_factor)


def latent_shape(resolution: int, channels: int, vae_scale_factor: int) -> tuple[int, int, int]:
    """[C, H, W] latents of a square image of `resolution` pixels (FLUX packs 2x2 latent patches)."""
    step = 2 * vae_scale_factor
    if resolution % step:
        raise ValueError(f"resolution must be a multiple of {step} for this model (its autoencoder scales "
                         f"by {vae_scale_factor} and FLUX packs 2x2 latent patches), got {resolution}")
    return (channels, resolution // vae_scale_factor, resolution // vae_scale_factor)


def load_flux(
    source: str | os.PathLike | FluxFiles,
    lora: LoraSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    device="cpu",
    dtype: torch.dtype | str = "auto",
    guidance: float | None = None,
    max_sequence_length: int | None = None,
    gradient_checkpointing: bool = False,
    compile: bool = False,
    vae_slicing: bool = True,
    vae_tiling: bool = False,
    **single_file_kwargs,
) -> FluxStack:
    """Everything for training from one call: policy (LoRA), cached text encoding, VAE decode.

    Text encoders are only built when a prompt is missing from the embedding cache, and
    freed right after; the VAE is loaded now (decode runs every iteration).
    """
    files = source if isinstance(source, FluxFiles) else find_flux_files(source, **single_file_kwargs)
    policy = load_flux_policy(files, lora=lora, guidance=guidance, dtype=dtype, device=device,
                              gradient_checkpointing=gradient_checkpointing, compile=compile)
    encoder = FluxTextEncoder(files, cache_dir=cache_dir, max_sequence_length=max_sequence_length,
                              device=device, dtype=dtype)
    decoder = FluxDecoder(load_vae(files, dtype=dtype, device=device, slicing=vae_slicing, tiling=vae_tiling))
    return FluxStack(files=files, policy=policy, encode=encoder, decode=decoder)
