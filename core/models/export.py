"""Export a diffusers FLUX folder as ComfyUI / BFL single files (the other layout users load).

    export_single_files("pretrained/tiny-shapes", "ComfyUI/models", "tiny-shapes")

writes diffusion_models/<name>.safetensors (BFL keys), text_encoders/<name>_clip_l.safetensors and
<name>_t5xxl.safetensors (HF keys; the T5 file holds the tied embedding once, as ComfyUI's do),
vae/<name>_ae.safetensors (BFL keys), each with its config as <file>.json beside it (sizes that
match no bundled config). Tokenizers stay in the diffusers folder: pass it as `tokenizers=`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..checkpoint import atomic_save_safetensors, atomic_write_text
from .convert import diffusers_to_bfl_transformer, diffusers_to_bfl_vae
from .weights import _load_tensors


def export_single_files(folder: str | os.PathLike, models_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Write the single files of the diffusers FLUX folder under `models_dir`; returns their paths."""
    from .files import flux_files_from_diffusers

    files = flux_files_from_diffusers(folder)
    out = Path(models_dir)
    paths = {
        "transformer": out / "diffusion_models" / f"{name}.safetensors",
        "clip_l": out / "text_encoders" / f"{name}_clip_l.safetensors",
        "t5xxl": out / "text_encoders" / f"{name}_t5xxl.safetensors",
        "vae": out / "vae" / f"{name}_ae.safetensors",
    }

    def read(parts):
        sd = {}
        for p in parts:
            sd.update(_load_tensors(p))
        return sd

    t5 = {k: v for k, v in read(files.t5).items() if k != "encoder.embed_tokens.weight"}
    tensors = {
        "transformer": (diffusers_to_bfl_transformer(read(files.transformer)), files.transformer_config),
        "clip_l": (read(files.clip), dict(files.clip_config, model_type="clip_text_model")),
        "t5xxl": (t5, dict(files.t5_config, model_type="t5")),
        "vae": (diffusers_to_bfl_vae(read(files.vae)), files.vae_config),
    }
    for part, (sd, cfg) in tensors.items():
        path = paths[part]
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
        atomic_write_text(path.with_suffix(".json"), json.dumps(cfg, indent=1) + "\n")
    return paths
