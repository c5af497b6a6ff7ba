"""Building the FLUX modules from checked files (`FluxFiles`): skeletons on the meta device, weights
assigned in the target dtype, converted from the BFL layout where needed.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .convert import _BFL_MARKER, _strip_prefix, bfl_to_diffusers_transformer, bfl_to_diffusers_vae
from .files import FluxFiles
from .flux_policy import FluxPolicy, LoraSettings, default_dtype
from .weights import ModelFileError, _load_tensors, check_safetensors


def _meta_model(cls, cfg):
    """Model skeleton with parameters on the meta device (no memory, no init cost);
    buffers stay real because non-persistent ones (e.g. CLIP position_ids) are not in files."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls.from_config(dict(cfg)) if hasattr(cls, "from_config") else cls(cfg)


def _assign(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], what: str, device, dtype) -> torch.nn.Module:
    sd = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device)) for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = [k for k in result.missing_keys]
    if missing or result.unexpected_keys:
        raise ModelFileError(
            f"{what}: weights do not fit the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
        )
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ModelFileError(f"{what}: no weights for {leftover[:3]}")
    return model.eval()


def load_transformer(files: FluxFiles, dtype: torch.dtype | str = "auto", device="cpu"):
    """Build the FluxTransformer2DModel from checked files (frozen, eval mode)."""
    from diffusers import FluxTransformer2DModel

    dtype = default_dtype(device) if dtype == "auto" else dtype
    what = f"FLUX transformer {', '.join(str(f) for f in files.transformer)}"
    model = _meta_model(FluxTransformer2DModel, files.transformer_config)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd: dict[str, torch.Tensor] = {}
    for f in files.transformer:
        if files.transformer_layout == "bfl":
            info = check_safetensors(f, "FLUX transformer")
            pre = _strip_prefix(info.tensors, _BFL_MARKER)
            # full ComfyUI checkpoints also hold the VAE / text encoders: read only our tensors
            raw = _load_tensors(f, dtype=dtype, names=[k for k in info.tensors if k.startswith(pre)],
                                rename=lambda k, n=len(pre): k[n:])
            sd.update(bfl_to_diffusers_transformer(raw, target, source=str(f)))
        else:
            sd.update(_load_tensors(f, dtype=dtype))
    model = _assign(model, sd, what, device, dtype)
    return model.requires_grad_(False)


def load_text_encoders(files: FluxFiles, dtype: torch.dtype | str = "auto", device="cpu"):
    """(clip_tokenizer, clip_model, t5_tokenizer, t5_model), all frozen, from checked files."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    files._require_text()
    dtype = default_dtype(device) if dtype == "auto" else dtype
    clip_tok = CLIPTokenizer.from_pretrained(str(files.clip_tokenizer), local_files_only=True)
    t5_tok = T5TokenizerFast.from_pretrained(str(files.t5_tokenizer), local_files_only=True)
    if clip_tok.model_max_length > 1000:  # bare vocab folders carry no length: CLIP uses 77
        clip_tok.model_max_length = files.clip_config.get("max_position_embeddings", 77)

    def build(cls_cfg, cls, paths, cfg, kind, marker):
        model = _meta_model(cls, cls_cfg(**cfg))
        expected = set(model.state_dict())
        own = next(k for k in expected if k.endswith(marker))
        sd = {}
        for p in paths:
            info = check_safetensors(p, kind)
            pre = next((k[: -len(own)] for k in info.tensors if k.endswith(own)), "")
            sd.update(_load_tensors(p, dtype=dtype, names=[k for k in info.tensors if k.startswith(pre)],
                                    rename=lambda k, n=len(pre): k[n:]))
        sd = {k: v for k, v in sd.items() if k in expected}  # e.g. CLIP text_projection, logit_scale
        if cls is T5EncoderModel:  # ComfyUI's t5xxl files hold only one copy of the tied embedding
            emb = sd.get("shared.weight", sd.get("encoder.embed_tokens.weight"))
            for k in ("shared.weight", "encoder.embed_tokens.weight"):
                if k in expected and emb is not None:
                    sd.setdefault(k, emb)
        model = _assign(model, sd, f"{kind} {', '.join(str(p) for p in paths)}", device, dtype)
        return model.requires_grad_(False)

    clip = build(CLIPTextConfig, CLIPTextModel, files.clip, files.clip_config, "CLIP-L text encoder",
                 "final_layer_norm.weight")
    t5 = build(T5Config, T5EncoderModel, files.t5, files.t5_config, "T5-XXL text encoder",
               "encoder.final_layer_norm.weight")
    if len(clip_tok) > clip.config.vocab_size or len(t5_tok) > t5.config.vocab_size:
        raise ModelFileError(
            f"tokenizers ({files.clip_tokenizer}: {len(clip_tok)} tokens, {files.t5_tokenizer}: {len(t5_tok)} tokens) "
            f"do not fit the encoders' vocabularies ({clip.config.vocab_size}, {t5.config.vocab_size})"
        )
    return clip_tok, clip, t5_tok, t5


def load_vae(
    files: FluxFiles, dtype: torch.dtype | str = "auto", device="cpu", slicing: bool = True, tiling: bool = False
):
    """Build the AutoencoderKL from checked files; slicing/tiling bound decode memory."""
    from diffusers import AutoencoderKL

    files._require_vae()
    dtype = default_dtype(device) if dtype == "auto" else dtype
    model = _meta_model(AutoencoderKL, files.vae_config)
    target = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = {}
    for f in files.vae:
        if files.vae_layout == "bfl":
            info = check_safetensors(f, "FLUX autoencoder")
            pre = _strip_prefix(info.tensors, "decoder.conv_in.weight")
            raw = _load_tensors(f, dtype=dtype, names=[k for k in info.tensors if k.startswith(pre)],
                                rename=lambda k, n=len(pre): k[n:])
            raw = bfl_to_diffusers_vae(raw, target, source=str(f))
        else:
            raw = _load_tensors(f, dtype=dtype)
        sd.update(raw)
    model = _assign(model, sd, f"FLUX autoencoder {files.vae}", device, dtype).requires_grad_(False)
    if slicing:
        model.enable_slicing()
    if tiling:
        model.enable_tiling()
    return model


def load_flux_policy(
    files: FluxFiles,
    lora: LoraSettings | None = None,
    guidance: float | None = None,
    dtype: torch.dtype | str = "auto",
    device="cpu",
    gradient_checkpointing: bool = False,
    compile: bool = False,
) -> FluxPolicy:
    """Load the transformer and wrap it as a trainable `FluxPolicy` (LoRA on a frozen base)."""
    transformer = load_transformer(files, dtype=dtype, device=device)
    if guidance is None:
        guidance = 0.0 if files.variant == "flux-schnell" else 3.5
    return FluxPolicy(
        transformer, lora=lora, guidance=guidance, gradient_checkpointing=gradient_checkpointing,
        dtype=None, compile=compile, base_identity=files.transformer_identity(),
    )
