"""Configs of the FLUX components: the bundled ones (core/models/configs/), a sidecar JSON beside a
single file (custom sizes), or sizes derived from the tensor shapes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import torch

from .convert import _count_blocks
from .weights import MissingModelFile, ModelFileError, SafetensorsInfo


CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def bundled_config(name: str) -> dict:
    """Read a config shipped in core/models/configs/ (flux-dev, flux-schnell, flux-vae, clip-l, t5-xxl)."""
    p = CONFIG_DIR / f"{name}.json"
    if not p.is_file():
        have = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
        raise ModelFileError(f"no bundled config named {name!r} in {CONFIG_DIR} (have {have})")
    return json.loads(p.read_text())


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MissingModelFile(f"{what}: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{what}: {path} must hold a JSON object")
    return data


def _model_config(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _sidecar_config(path: Path) -> Path | None:
    """`model.safetensors` may carry its config as `model.json` beside it (custom sizes)."""
    p = path.with_suffix(".json")
    return p if p.is_file() else None


_SIDECAR_SECTIONS = ("transformer", "clip_l", "t5xxl", "vae")


def _sidecar_section(path: Path, section: str) -> dict | None:
    """The config for `section` from the sidecar JSON: the whole file, or its `section` entry
    when the file holds several components (all-in-one checkpoints)."""
    side = _sidecar_config(path)
    if side is None:
        return None
    data = _read_json(side, f"config beside {path.name}")
    if any(k in data for k in _SIDECAR_SECTIONS):
        if section not in data:
            return None
        data = data[section]
    return _model_config(data)


def _transformer_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], layout: str = "bfl") -> dict:
    """Derive a FluxTransformer2DModel config from tensor shapes (sizes only; RoPE axes are
    not stored in weights and are filled in by the caller)."""
    if layout == "bfl":
        names = ("img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "txt_in.weight",
                 "vector_in.in_layer.weight", "final_layer.linear.weight", "guidance_in.in_layer.weight",
                 "double_blocks", "single_blocks")
    else:
        names = ("x_embedder.weight", "transformer_blocks.0.attn.norm_k.weight", "context_embedder.weight",
                 "time_text_embed.text_embedder.linear_1.weight", "proj_out.weight",
                 "time_text_embed.guidance_embedder.linear_1.weight", "transformer_blocks", "single_transformer_blocks")
    img_in, norm_k, txt_in, vec_in, final, guid, dbl, sgl = names
    inner, in_ch = shapes[img_in]
    head_dim = shapes[norm_k][0]
    cfg = {
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": None,
        "num_layers": _count_blocks(shapes, dbl),
        "num_single_layers": _count_blocks(shapes, sgl),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes[txt_in][1],
        "pooled_projection_dim": shapes[vec_in][1],
        "guidance_embeds": guid in shapes,
    }
    if shapes[final][0] != in_ch:
        cfg["out_channels"] = shapes[final][0]
    return cfg


def _transformer_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a FluxTransformer2DModel with this config (built on the meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(dict(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _resolve_transformer_config(
    path: Path, shapes: Mapping[str, tuple[int, ...]], config: str | Mapping | os.PathLike | None, layout: str = "bfl"
) -> tuple[dict, str]:
    """Config for a single file: explicit > sidecar JSON > bundled config matching the shapes
    > sizes derived from the shapes (head dim 128 only: FLUX.1's RoPE axes 16/56/56)."""
    if config is not None:
        variant = "custom"
        if isinstance(config, Mapping):
            cfg = dict(config)
        elif isinstance(config, str) and (CONFIG_DIR / f"{config}.json").is_file():
            cfg = bundled_config(config)
            variant = config if config in ("flux-dev", "flux-schnell") else "custom"
        else:
            cfg = _read_json(Path(config), "FLUX transformer config")
        cfg = dict(cfg.get("transformer", cfg))
    elif (side := _sidecar_section(path, "transformer")) is not None:
        cfg, variant = side, "custom"
    else:
        derived = _transformer_config_from_shapes(shapes, layout)
        cfg, variant = None, "custom"
        for name in ("flux-dev", "flux-schnell"):
            c = bundled_config(name)["transformer"]
            if all(derived[k] == c.get(k, derived[k]) for k in derived if k != "out_channels"):
                cfg, variant = dict(c), name
                break
        if cfg is None:
            if derived["attention_head_dim"] != 128:
                raise ModelFileError(
                    f"{path}: FLUX-architecture transformer with head dim {derived['attention_head_dim']} "
                    f"and {derived['num_layers']}+{derived['num_single_layers']} blocks matches neither bundled "
                    f"config (flux-dev, flux-schnell in {CONFIG_DIR}); pass config= or put "
                    f"{path.with_suffix('.json').name} (a FluxTransformer2DModel config) beside it"
                )
            cfg = dict(derived, axes_dims_rope=[16, 56, 56])
    cfg = _model_config(cfg)
    return cfg, variant


def _text_config_single(path: Path, info: SafetensorsInfo, kind: str) -> dict:
    side = _sidecar_section(path, kind)
    if side is not None:
        return side
    cfg = _model_config(bundled_config("clip-l" if kind == "clip_l" else "t5-xxl"))
    shapes = info.shapes()
    key = "embeddings.token_embedding.weight" if kind == "clip_l" else "shared.weight"
    have = next((v for k, v in shapes.items() if k.endswith(key)), None)
    want = (cfg["vocab_size"], cfg["hidden_size"] if kind == "clip_l" else cfg["d_model"])
    if have is not None and tuple(have) != want:
        raise ModelFileError(
            f"{path}: {key} has shape {tuple(have)}, the bundled {kind} config expects {want}; "
            f"put a config {path.with_suffix('.json').name} beside it for other sizes"
        )
    return cfg
