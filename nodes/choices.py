"""The nodes' pure decisions, importable without ComfyUI (the fast test tier calls them
directly): which model files Load FLUX uses, the training settings from the Tree settings
widgets, and user-typed names that must stay inside their folder. ComfyUI's ``folder_paths``
is passed in where files are looked up."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# ------------------------------------------------------------------------ Load FLUX
SHAPES = "tiny-shapes (bundled pretrained, CPU)"
TINY = "tiny (built-in test pipeline, CPU)"
SINGLE = "single files (below)"
NONE = "(none)"
DIFFUSERS = "diffusers/"


@dataclass(frozen=True)
class ModelSource:
    """What Load FLUX loads: ``kind`` "shapes" / "tiny" (bundled), "diffusers" (``folder``) or
    "single" (``files``: transformer, clip_l, t5xxl, vae paths)."""

    kind: str
    folder: Path | None = None
    files: tuple[str, str, str, str] | None = None


def model_source(model: str, transformer: str, clip_l: str, t5xxl: str, vae: str, folder_paths) -> ModelSource:
    """Resolve Load FLUX's choice with ComfyUI's ``folder_paths`` (``get_folder_paths``,
    ``get_full_path``). Raises ValueError naming the input and the folder; the node's
    validate_inputs shows it at queue time, execute raises it."""
    if model == SHAPES:
        return ModelSource("shapes")
    if model == TINY:
        return ModelSource("tiny")
    if model.startswith(DIFFUSERS):
        name = model[len(DIFFUSERS):]
        found = [Path(r) / name for r in folder_paths.get_folder_paths("diffusers")
                 if (Path(r) / name / "model_index.json").is_file()]
        if not found:
            raise ValueError(f"diffusers folder {name!r} (with model_index.json) not found in models/diffusers")
        return ModelSource("diffusers", folder=found[0])
    if model != SINGLE:
        raise ValueError(f"unknown model choice {model!r}")
    files = []
    for kind, name, what in (("diffusion_models", transformer, "transformer"), ("text_encoders", clip_l, "clip_l"),
                             ("text_encoders", t5xxl, "t5xxl"), ("vae", vae, "vae")):
        if name == NONE:
            raise ValueError(f"{what}: choose a file from models/{kind} for the single-file route")
        path = folder_paths.get_full_path(kind, name)
        if path is None:
            raise ValueError(f"{what}: {name!r} not found in models/{kind}")
        files.append(path)
    return ModelSource("single", files=tuple(files))


# ------------------------------------------------------------------------ Tree settings
KEEP = -1  # "use the preset's value" for every tunable number

# (name, kind, TrainConfig field, tooltip, widget options)
TUNABLES = [
    ("num_steps", "int", "num_steps", "Denoising steps T (paper: 25).", dict(min=-1, max=200)),
    ("window_start", "int", "window_start", "First window step tau at iteration 0.", dict(min=-1, max=199)),
    ("window_every", "int", "window_every", "Iterations between window moves (progressive mode).",
     dict(min=-1, max=10000)),
    ("window_stride", "int", "window_stride", "Steps the window moves each time.", dict(min=-1, max=100)),
    ("noise_level", "float", "noise_level", "SDE noise level a of the first tree layer (paper: 0.7).",
     dict(min=-1.0, max=10.0, step=0.05)),
    ("beta", "float", "beta", "Depth noise growth beta of Eq. 6 (paper: 0.7; 0 = same noise at every layer).",
     dict(min=-1.0, max=10.0, step=0.05)),
    ("compress_ratio", "float", "compress_ratio",
     "MixGRPO-Flash compression: DPM-Solver++ on ratio x the steps after the window; 0 = off.",
     dict(min=-1.0, max=1.0, step=0.05)),
    ("clip_eps", "float", "clip_eps", "Fixed clip range (clip_mode fixed; baselines 1e-4).",
     dict(min=-1.0, max=1.0, step=0.00001, round=False)),
    ("eps_low", "float", "eps_low", "Dynamic clip: smallest eps (best leaves), Eq. 11.",
     dict(min=-1.0, max=1.0, step=0.00001, round=False)),
    ("eps_high", "float", "eps_high", "Dynamic clip: largest eps (worst leaves), Eq. 11.",
     dict(min=-1.0, max=1.0, step=0.00001, round=False)),
    ("sft_lambda", "float", "sft_lambda", "LayerTuning-RL weight lambda of the SFT term (paper: 0.02; 0 = off).",
     dict(min=-1.0, max=10.0, step=0.001, round=False)),
    ("learning_rate", "float", "lr", "AdamW learning rate of the LoRA.",
     dict(min=-1.0, max=1.0, step=0.000001, round=False)),
    ("prompts_per_iteration", "int", "prompts_per_iteration", "Prompts (trees) per iteration.", dict(min=-1, max=256)),
    ("step_per_layer", "bool", "step_per_layer",
     "1 = one optimizer step per trained tree layer (Alg. 1, the tree presets); 0 = one step per iteration over all "
     "layers (DanceGRPO).", dict(min=-1, max=1)),
]


def settings_config(preset, branching, group_size, window_mode, clip_reward, resolution, seed, adv_std="preset",
                    more_settings="", **tunables):
    """The validated TrainConfig of the Tree settings widgets (and the image size); the
    engine's ValueError names any bad value or combination."""
    from ..core.presets import make_config, parse_settings

    over = {}
    for name, kind, field_name, _, _ in TUNABLES:
        v = tunables.get(name, KEEP)
        if v is None or v == KEEP:
            continue
        if field_name == "compress_ratio" and v == 0:
            over[field_name] = None
        else:
            over[field_name] = {"int": int, "bool": bool, "float": float}[kind](v)
    text = str(branching).strip()
    if text:
        try:
            over["branching"] = tuple(int(b) for b in text.replace(" ", "").split(",") if b)
        except ValueError:
            raise ValueError(f"branching {branching!r} must be comma-separated integers, e.g. 2,2,2,1") from None
    for name, value in (("window_mode", window_mode), ("clip_reward", clip_reward), ("adv_std", adv_std)):
        if value != "preset":
            over[name] = value
    over["seed"] = int(seed)
    over.update(parse_settings(str(more_settings or "")))
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16 (FLUX packs 2x2 latent patches), got {resolution}")
    return make_config(preset, group_size=group_size if group_size > 0 else None, **over), int(resolution)


# ------------------------------------------------------------------------ names typed by users
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def safe_relative(name: str, what: str, allow_subfolders: bool = True) -> str:
    """A user-typed file or folder name that must stay inside its ComfyUI folder: no absolute
    paths, no '..', no odd characters. Raises ValueError naming the setting."""
    raw = str(name).strip().replace("\\", "/")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in raw.split("/") or not parts:
        raise ValueError(f"{what} {name!r} must be a relative name inside its folder (no absolute path, no '..')")
    if not allow_subfolders and len(parts) > 1:
        raise ValueError(f"{what} {name!r} must be a plain name without '/'")
    bad = [p for p in parts if not _SAFE_NAME.match(p)]
    if bad:
        raise ValueError(f"{what} {name!r}: use letters, digits, '.', '_', '-' and spaces (bad part {bad[0]!r})")
    return "/".join(parts)
