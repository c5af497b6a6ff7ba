"""Model set-up shared by the CLI commands (demo, train, bench)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def brightness_reward():
    """Weight-free reward for benchmarks (mean of the decoded image), so the benchmark
    measures the engine, not a reward model."""
    from ..core.rewards import load_rewards

    return load_rewards("brightness")


def tiny_flux_dir(root=None) -> Path:
    """Build (once) the bundled tiny FLUX pipeline and return its diffusers folder."""
    from ..testing import build_tiny_flux

    root = Path(root) if root else Path(tempfile.gettempdir()) / "treerpo-tiny-flux"
    return build_tiny_flux(root).diffusers


def load_stack(model: str, rank: int = 8, alpha: float | None = None, cache_dir=None, gradient_checkpointing=False,
               max_sequence_length: int | None = None, on=None, **single_files):
    """FluxStack (policy with LoRA, encode, decode) from 'tiny-shapes' (bundled, pretrained), 'tiny'
    (random test pipeline) or local files, on device ``on``
    (default: the first GPU, or the CPU)."""
    from ..core.models import LoraSettings, load_flux

    if model == "tiny-shapes":
        from ..core.shapes.model import pretrained_dir

        source = pretrained_dir()
    else:
        source = tiny_flux_dir() if model == "tiny" else model
    lora = LoraSettings(rank=rank, alpha=alpha if alpha is not None else rank)
    return load_flux(source, lora=lora, cache_dir=cache_dir, device=on or device(), max_sequence_length=max_sequence_length,
                     gradient_checkpointing=gradient_checkpointing, **{k: v for k, v in single_files.items() if v})


def latent_shape(stack, resolution: int) -> tuple[int, int, int]:
    try:
        return stack.latent_shape(resolution)
    except ValueError as e:
        raise SystemExit(f"--resolution: {e}") from None


def load_policy_for_bench(model: str, resolution: int):
    stack = load_stack(model)
    return stack.policy, stack.encode, stack.decode, latent_shape(stack, resolution)
