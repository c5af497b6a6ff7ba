"""Load FLUX: a diffusers folder (models/diffusers), ComfyUI single files, the bundled pretrained
tiny-shapes model or the built-in random tiny pipeline; returns the model bundle (policy with LoRA,
cached text encoding, VAE decode)."""

from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.latest import io

from .choices import DIFFUSERS, NONE, SHAPES, SINGLE, TINY, model_source
from .common import (
    CATEGORY, TINY_FOLDER, FluxModel, ModelBundle, grad_enabled, model_folder, queue_check, runs_dir, torch_device,
)

DTYPES = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _diffusers_folders() -> list[str]:
    import folder_paths

    out = []
    for root in folder_paths.get_folder_paths("diffusers"):
        r = Path(root)
        if r.is_dir():
            out += sorted(p.name for p in r.iterdir() if (p / "model_index.json").is_file())
    return out


def _files(kind: str) -> list[str]:
    import folder_paths

    return [f for f in folder_paths.get_filename_list(kind) if f.endswith(".safetensors")]


def tiny_pipeline_dir() -> Path:
    """The tiny FLUX pipeline in models/treerpo_tiny, built on first use (seconds)."""
    from ..testing import build_tiny_flux

    return build_tiny_flux(model_folder(TINY_FOLDER)).diffusers


def shapes_pipeline_dir() -> Path:
    from ..core.shapes.model import pretrained_dir

    return pretrained_dir()


class LoadFlux(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOLoadFlux",
            display_name="Load FLUX (TreeRPO)",
            category=CATEGORY,
            description="Loads FLUX.1 for training: the frozen base with a trainable LoRA, a cached text "
                        "encoder and the VAE decoder.",
            inputs=[
                io.Combo.Input("model",
                               options=[SHAPES, TINY, *(f"{DIFFUSERS}{n}" for n in _diffusers_folders()), SINGLE],
                               default=SHAPES,
                               tooltip="A FLUX pipeline folder from models/diffusers, the single files chosen below, "
                                       "the bundled tiny-shapes model (FLUX.1-dev architecture, 64 px, pretrained on "
                                       "coloured shapes: learns visibly on a CPU), or the random tiny test pipeline "
                                       "(built into models/treerpo_tiny on first use)."),
                io.Combo.Input("transformer", options=[NONE, *_files("diffusion_models")], default=NONE,
                               tooltip="Single-file route: FLUX transformer from models/diffusion_models (or unet); "
                                       "bf16, fp16, fp32 or fp8 files."),
                io.Combo.Input("clip_l", options=[NONE, *_files("text_encoders")], default=NONE,
                               tooltip="Single-file route: CLIP-L text encoder from models/text_encoders (or clip)."),
                io.Combo.Input("t5xxl", options=[NONE, *_files("text_encoders")], default=NONE,
                               tooltip="Single-file route: T5-XXL text encoder from models/text_encoders (or clip)."),
                io.Combo.Input("vae", options=[NONE, *_files("vae")], default=NONE,
                               tooltip="Single-file route: the FLUX autoencoder (ae.safetensors) from models/vae."),
                io.Combo.Input("weight_dtype", options=list(DTYPES), default="auto",
                               tooltip="Base weights' dtype: auto = bf16 on a GPU, fp32 on the CPU. fp8 files are "
                                       "dequantised to it on load."),
                io.Int.Input("lora_rank", default=32, min=1, max=512,
                             tooltip="LoRA rank r (trainable size)."),
                io.Float.Input("lora_alpha", default=64.0, min=0.01, max=4096.0, step=0.5,
                               tooltip="LoRA alpha; the adapter is scaled by alpha / rank."),
                io.String.Input("lora_targets", default="", multiline=False,
                                tooltip="Comma-separated module suffixes that get a LoRA (e.g. attn.to_q, attn.to_k); "
                                        "empty = every attention and feed-forward projection."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute transformer blocks in backward: less memory, slower."),
            ],
            outputs=[FluxModel.Output(display_name="model", tooltip="FLUX policy with LoRA, text encoding, VAE.")],
        )

    @classmethod
    def validate_inputs(cls, model, transformer, clip_l, t5xxl, vae, weight_dtype):
        # the file dropdowns get model_source's messages (a file unused by the chosen route may be gone)
        import folder_paths

        def source():
            files = (model, transformer, clip_l, t5xxl, vae)
            if None not in files:  # a linked one is known at run time only
                model_source(*files, folder_paths)

        return queue_check(cls, {"weight_dtype": weight_dtype}, source)

    @classmethod
    def execute(cls, model, transformer, clip_l, t5xxl, vae, weight_dtype, lora_rank, lora_alpha, lora_targets,
                gradient_checkpointing) -> io.NodeOutput:
        import folder_paths

        from ..core.models import DEFAULT_LORA_TARGETS, LoraSettings, load_flux
        from ..core.models import flux_files_from_single_files
        from ..core.training_run import trainable_snapshot

        targets = [t.strip() for t in str(lora_targets).split(",") if t.strip()] or list(DEFAULT_LORA_TARGETS)
        lora = LoraSettings(rank=lora_rank, alpha=lora_alpha, targets=targets)
        device = torch_device()
        cache = runs_dir() / ".text_embeddings"  # prompt embeddings, computed once per prompt
        with grad_enabled():  # weights made under inference mode could not be used in backward
            choice = model_source(model, transformer, clip_l, t5xxl, vae, folder_paths)
            if choice.kind == "shapes":
                source = shapes_pipeline_dir()
            elif choice.kind == "tiny":
                source = tiny_pipeline_dir()
            elif choice.kind == "single":
                # tokenizers come from the ComfyUI code folder (comfy/sd1_tokenizer, ...)
                transformer_file, clip_file, t5_file, vae_file = choice.files
                source = flux_files_from_single_files(transformer_file, clip_l=clip_file, t5xxl=t5_file, vae=vae_file,
                                                      comfyui_root=Path(folder_paths.__file__).parent)
            else:
                source = choice.folder
            stack = load_flux(source, lora=lora, cache_dir=cache, device=device, dtype=DTYPES[weight_dtype],
                              gradient_checkpointing=gradient_checkpointing)
        bundle = ModelBundle(stack=stack, source=str(model), initial_state=trainable_snapshot(stack.policy),
                             device=device)
        return io.NodeOutput(bundle)


NODES = [LoadFlux]
