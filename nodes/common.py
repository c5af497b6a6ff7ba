"""Shared by every node module: the TREERPO_* socket types, the values they carry, and the
ComfyUI glue (model folders, device and memory, grad inside ComfyUI's inference mode,
progress with previews, Cancel, image conversion, safe output names)."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from comfy_api.latest import io

from .choices import check_widget

CATEGORY = "TreeRPO"

# custom socket types (what flows between our nodes)
FluxModel = io.Custom("TREERPO_MODEL")
Prompts = io.Custom("TREERPO_PROMPTS")
Rewards = io.Custom("TREERPO_REWARDS")
Settings = io.Custom("TREERPO_SETTINGS")
TreeT = io.Custom("TREERPO_TREE")
Scores = io.Custom("TREERPO_SCORES")
Run = io.Custom("TREERPO_RUN")
State = io.Custom("TREERPO_STATE")
LoraModel = io.Custom("LORA_MODEL")  # ComfyUI's own type: its "Load LoRA Model" node applies it to a MODEL

REWARDS_FOLDER = "treerpo_rewards"
TINY_FOLDER = "treerpo_tiny"  # models/treerpo_tiny: the built-in tiny pipeline, built on first use
RUNS_FOLDER = "treerpo_runs"  # output/treerpo_runs/<run name>: run folders


# ---------------------------------------------------------------- values on the sockets
@dataclass
class ModelBundle:
    """TREERPO_MODEL: the FLUX stack (policy with LoRA, encode, decode) and what made it."""

    stack: Any  # core.models.FluxStack
    source: str
    initial_state: dict  # the untrained LoRA: a restarted run starts here
    device: torch.device

    @property
    def policy(self):
        return self.stack.policy

    def __repr__(self) -> str:  # shown in ComfyUI error reports: no tensor dumps
        return f"ModelBundle({self.source!r} on {self.device})"


@dataclass
class PromptSet:
    """TREERPO_PROMPTS: the training prompts and the held-out ones."""

    train: list[str]
    held_out: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return f"PromptSet({len(self.train)} training, {len(self.held_out)} held out)"


@dataclass
class TreeSettings:
    """TREERPO_SETTINGS: a validated TrainConfig and the image size."""

    config: Any  # core.presets.TrainConfig
    resolution: int

    def __repr__(self) -> str:
        c = self.config
        return f"TreeSettings({c.preset}, T={c.num_steps}, branching={list(c.branching)}, {self.resolution}px)"

    def latent_shape(self, stack) -> tuple[int, int, int]:
        return stack.latent_shape(self.resolution)


@dataclass
class SampledTree:
    """TREERPO_TREE: one sampled tree, its prompt and the decoded leaves."""

    tree: Any  # core.tree.Tree
    prompt: str
    seed: int
    images: torch.Tensor  # [L, 3, H, W] in [0, 1]
    bundle: ModelBundle
    settings: TreeSettings

    def __repr__(self) -> str:
        return f"SampledTree({self.prompt!r}, seed {self.seed}, {self.tree.spec})"


# ---------------------------------------------------------------- queue-time validation
def queue_check(cls, widgets: dict, *checks) -> bool | str:
    """A validate_inputs answer: True, or a refusal naming the node and the input. ``widgets``
    (name -> constant value) are held against their dropdown or bounds (see check_widget), then
    each of ``checks`` (callables of choices.py raising ValueError) runs."""
    schema = cls.define_schema()
    specs = {i.id: i for i in schema.inputs}
    try:
        for name, value in widgets.items():
            spec = specs[name]
            check_widget(name, value, getattr(spec, "options", None), getattr(spec, "min", None),
                         getattr(spec, "max", None))
        for check in checks:
            check()
    except (ValueError, TypeError, OSError) as e:
        return f"{schema.display_name.removesuffix(' (TreeRPO)')}: {e}"
    return True


# ---------------------------------------------------------------- ComfyUI folders
def register_folders() -> None:
    """Register models/treerpo_rewards (reward checkpoints) and models/treerpo_tiny with ComfyUI."""
    import folder_paths

    for name in (REWARDS_FOLDER, TINY_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name), is_default=True)


def models_dir() -> Path:
    import folder_paths

    return Path(folder_paths.models_dir)


def model_folder(name: str) -> Path:
    """The first (default) folder registered under ``name``."""
    import folder_paths

    return Path(folder_paths.get_folder_paths(name)[0])


def runs_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_output_directory()) / RUNS_FOLDER


# ---------------------------------------------------------------- device, memory, grad
def torch_device() -> torch.device:
    """ComfyUI's device (so --cpu and --cuda-device hold for our models too)."""
    import comfy.model_management as mm

    return mm.get_torch_device()


def free_comfy_memory() -> None:
    """Before training: ComfyUI's own models leave the GPU (ours are not managed by it)."""
    import comfy.model_management as mm

    mm.unload_all_models()
    mm.soft_empty_cache()


@contextlib.contextmanager
def grad_enabled():
    """ComfyUI runs nodes under torch.inference_mode(): tensors made there cannot be saved for
    backward. Loading and training run inside this context instead."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def is_main_process() -> bool:
    """Only rank 0 writes files and previews (a graph may run on N processes)."""
    from accelerate import PartialState

    return PartialState().is_main_process


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if Cancel (POST /interrupt) was pressed."""
    import comfy.model_management as mm

    mm.throw_exception_if_processing_interrupted()


def interrupted() -> bool:
    import comfy.model_management as mm

    return mm.processing_interrupted()


class Progress:
    """ComfyUI progress bar for one node; ``update(i, preview)`` sends a JPEG preview with it."""

    def __init__(self, total: int, node_id=None):
        import comfy.utils

        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.total = total

    def update(self, value: int, preview=None) -> None:
        if not is_main_process():
            return
        self.bar.update_absolute(value, self.total, ("JPEG", preview, 512) if preview is not None else None)


# ---------------------------------------------------------------- images
def to_comfy_images(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> ComfyUI IMAGE [B, H, W, 3] float32 on the CPU."""
    return images.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def from_comfy_images(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE [B, H, W, C] -> [B, 3, H, W] in [0, 1] (alpha dropped)."""
    if images.ndim != 4:
        raise ValueError(f"expected an IMAGE batch [B, H, W, C], got shape {tuple(images.shape)}")
    return images[..., :3].permute(0, 3, 1, 2).float().contiguous()


def pil_to_comfy(img) -> torch.Tensor:
    import numpy as np

    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def image_grid(images: torch.Tensor, columns: int = 4):
    """A PIL grid of [B, 3, H, W] images (progress previews)."""
    from PIL import Image

    from ..core.preview import to_pil

    tiles = to_pil(images)
    w, h = tiles[0].size
    cols = min(columns, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * w, (i // cols) * h))
    return grid
