"""FLUX model stack: policy (LoRA velocity model), loaders, text-embedding cache, VAE decode, LoRA files.

Heavy modules (diffusers / transformers) are imported lazily on first attribute access so
that `import treerpo.core.models` stays cheap.
"""

from .flux_policy import (
    DEFAULT_LORA_TARGETS,
    FluxPolicy,
    LoraSettings,
    default_dtype,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)

_LAZY = {
    # files, configs, key conversion, building (see docs/models.md, "Where things live")
    "ModelFileError": "weights",
    "MissingModelFile": "weights",
    "FluxFiles": "files",
    "FluxStack": "stack",
    "check_safetensors": "weights",
    "bundled_config": "configs",
    "flux_files_from_diffusers": "files",
    "flux_files_from_single_files": "files",
    "flux_files_from_comfyui": "files",
    "find_flux_files": "files",
    "load_transformer": "build",
    "load_text_encoders": "build",
    "load_vae": "build",
    "load_flux_policy": "build",
    "load_flux": "stack",
    "bfl_to_diffusers_transformer": "convert",
    "diffusers_to_bfl_transformer": "convert",
    "bfl_to_diffusers_vae": "convert",
    "diffusers_to_bfl_vae": "convert",
    # text
    "FluxTextEncoder": "text",
    "EmbeddingCache": "text",
    "default_cache_dir": "text",
    # vae
    "FluxDecoder": "vae",
    # lora files
    "save_lora": "lora_files",
    "load_lora": "lora_files",
    "read_lora_metadata": "lora_files",
    "lora_state_dict": "lora_files",
    "lora_settings_from_file": "lora_files",
}

__all__ = [
    "DEFAULT_LORA_TARGETS",
    "FluxPolicy",
    "LoraSettings",
    "default_dtype",
    "latent_image_ids",
    "pack_latents",
    "unpack_latents",
    *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
