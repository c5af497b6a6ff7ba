"""Test helpers: a complete tiny FLUX pipeline built in code, in seconds, with no downloads.

    from treerpo.testing import build_tiny_flux
    paths = build_tiny_flux(tmp_path)           # -> TinyFluxPaths
    files = paths.diffusers_files()              # or paths.single_files() / paths.single_files(fp8=True)
    stack = load_flux(files, lora=LoraSettings(4, 8), cache_dir=tmp_path / "emb")

On disk, under `directory`:
- diffusers/            FLUX.1-dev pipeline layout (FluxPipeline.from_pretrained works on it)
- comfyui/              a fake ComfyUI install with the SAME weights as single files:
    models/diffusion_models/tiny-flux.safetensors       BFL key layout (fp32)
    models/diffusion_models/tiny-flux-fp8.safetensors   BFL layout, 'model.diffusion_model.' prefix,
                                                        scaled fp8 (e4m3fn + scale_weight) linears
    models/text_encoders/clip_l_tiny.safetensors, t5xxl_tiny.safetensors   (HF key layout)
    models/vae/ae_tiny.safetensors                     BFL ae layout
    comfy/sd1_tokenizer/, comfy/text_encoders/t5_tokenizer/                tokenizer files
  Each tiny single file has its config beside it as <name>.json (tiny sizes match no
  bundled config). The encoders' vocabularies have the real CLIP-L / T5 sizes, so the real
  tokenizers of a ComfyUI install also fit them.
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from pathlib import Path

import torch

TINY_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": [4, 6, 6],
}
TINY_CLIP_CONFIG = {
    "vocab_size": 49408,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "bos_token_id": 0,
    "eos_token_id": 2,  # as FLUX's CLIP config: pooled output taken at the argmax id (end-of-text)
    "pad_token_id": 1,
}
TINY_T5_CONFIG = {
    "vocab_size": 32128,
    "d_model": 32,
    "d_kv": 8,
    "d_ff": 37,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 8,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}
TINY_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": 64,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
TINY_T5_WORDS = (
    "a an the of on in with and photo painting red green blue yellow black white cube ball cat dog tree "
    "house car sky sea mountain flower person portrait small big bright dark"
).split()
TINY_PROMPTS = ["a red cube", "a blue ball", "a photo of a cat", "a green tree on a mountain"]
_MARKER = ".tiny-flux-complete"


@dataclass
class TinyFluxPaths:
    """Locations written by `build_tiny_flux`."""

    root: Path
    diffusers: Path
    comfyui: Path
    transformer: Path
    transformer_fp8: Path
    clip_l: Path
    t5xxl: Path
    vae: Path
    tokenizers: Path  # folder with clip_l/ and t5xxl/ tokenizer copies

    def diffusers_files(self, **kw):
        """`FluxFiles` of the diffusers folder."""
        from .core.models.files import flux_files_from_diffusers

        return flux_files_from_diffusers(self.diffusers, **kw)

    def single_files(self, fp8: bool = False, **kw):
        """`FluxFiles` of the ComfyUI single files (tokenizers from the fake ComfyUI install)."""
        from .core.models.files import flux_files_from_comfyui

        return flux_files_from_comfyui(
            self.comfyui,
            transformer=(self.transformer_fp8 if fp8 else self.transformer).name,
            clip_l=self.clip_l.name,
            t5xxl=self.t5xxl.name,
            vae=self.vae.name,
            **kw,
        )


def _paths(root: Path) -> TinyFluxPaths:
    c = root / "comfyui"
    return TinyFluxPaths(
        root=root,
        diffusers=root / "diffusers",
        comfyui=c,
        transformer=c / "models" / "diffusion_models" / "tiny-flux.safetensors",
        transformer_fp8=c / "models" / "diffusion_models" / "tiny-flux-fp8.safetensors",
        clip_l=c / "models" / "text_encoders" / "clip_l_tiny.safetensors",
        t5xxl=c / "models" / "text_encoders" / "t5xxl_tiny.safetensors",
        vae=c / "models" / "vae" / "ae_tiny.safetensors",
        tokenizers=root / "tokenizers",
    )


def make_tiny_clip_tokenizer():
    """Byte-level BPE tokenizer with a few merges: 256 chars, their word-final forms, merges, specials."""
    from transformers import CLIPTokenizer

    from .core.shapes.model import byte_chars

    chars = byte_chars()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = []
    for a, b in (("r", "e"), ("c", "a"), ("ca", "t</w>"), ("t", "h"), ("th", "e</w>"), ("b", "l")):
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)  # highest id: the pooled output is read there
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return tok, vocab, merges


def make_tiny_t5_tokenizer():
    """Unigram tokenizer over a small word list plus single characters (no sentencepiece needed)."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in TINY_T5_WORDS] + [("▁", -4.0)]
    pieces += [(c, -6.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=512)


def _randomise(module: torch.nn.Module, generator: torch.Generator, scale: float = 0.2) -> None:
    """Overwrite every parameter with noise (norm scales around 1) so no path is zero-initialised
    and any wrong key mapping changes the outputs."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * scale
            if p.ndim == 1 and ("norm" in name or name.endswith("scale")) and name.endswith("weight"):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)


def _fp8_scaled(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """ComfyUI 'scaled fp8' layout: 2-D weights as float8_e4m3fn with a per-tensor scale_weight."""
    out = {f"{prefix}scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight"):
            scale = v.abs().max().clamp_min(1e-12) / 448.0
            out[prefix + k] = (v / scale).to(torch.float8_e4m3fn)
            out[prefix + k[: -len(".weight")] + ".scale_weight"] = scale.reshape(1).float()
        else:
            out[prefix + k] = v.to(torch.bfloat16)
    return out


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def build_tiny_flux(directory: str | os.PathLike, seed: int = 0, guidance_embeds: bool = True) -> TinyFluxPaths:
    """Write a tiny FLUX pipeline (diffusers layout) and the same weights as ComfyUI/BFL single
    files under `directory`. Deterministic in `seed`; a finished directory is reused."""
    root = Path(directory)
    paths = _paths(root)
    marker = root / _MARKER
    stamp = json.dumps({"seed": seed, "guidance_embeds": guidance_embeds, "version": 1})
    if marker.is_file() and marker.read_text() == stamp:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    import fcntl

    # several processes (the ranks of one run) may ask at once: one builds, the others wait and reuse
    with open(root / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.is_file() and marker.read_text() == stamp:
            return paths
        _build_tiny_flux(root, paths, marker, stamp, seed, guidance_embeds)
    return paths


def _build_tiny_flux(
    root: Path, paths: TinyFluxPaths, marker: Path, stamp: str, seed: int, guidance_embeds: bool
) -> None:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .core.models.configs import bundled_config
    from .core.models.convert import diffusers_to_bfl_transformer, diffusers_to_bfl_vae

    g = torch.Generator().manual_seed(seed)

    tcfg = dict(TINY_TRANSFORMER_CONFIG, guidance_embeds=guidance_embeds)
    transformer = FluxTransformer2DModel(**tcfg)
    _randomise(transformer, g)
    clip = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_CONFIG))
    _randomise(clip, g)
    t5 = T5EncoderModel(T5Config(**TINY_T5_CONFIG))
    _randomise(t5, g)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)
    _randomise(vae, g, scale=0.1)
    for m in (transformer, clip, t5, vae):
        m.eval()
    clip_tok, vocab, merges = make_tiny_clip_tokenizer()
    t5_tok = make_tiny_t5_tokenizer()
    variant = "flux-dev" if guidance_embeds else "flux-schnell"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(bundled_config(variant)["scheduler"])

    # diffusers folder, exactly as FluxPipeline.save_pretrained writes it
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok,
        text_encoder_2=t5, tokenizer_2=t5_tok, transformer=transformer,
    )
    pipe.save_pretrained(str(paths.diffusers), safe_serialization=True)

    # ComfyUI / BFL single files
    tsd = {k: v.detach().float().contiguous() for k, v in transformer.state_dict().items()}
    bfl = diffusers_to_bfl_transformer(tsd)
    paths.transformer.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(paths.transformer))
    save_file(_fp8_scaled(bfl, "model.diffusion_model."), str(paths.transformer_fp8))
    for p in (paths.transformer, paths.transformer_fp8):
        _write_json(p.with_suffix(".json"), tcfg)
    paths.clip_l.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(paths.clip_l))
    _write_json(paths.clip_l.with_suffix(".json"), dict(TINY_CLIP_CONFIG, model_type="clip_text_model"))
    # ComfyUI's t5xxl files carry 'shared.weight' only (embed_tokens is tied to it)
    t5sd = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5sd, str(paths.t5xxl))
    _write_json(paths.t5xxl.with_suffix(".json"), dict(TINY_T5_CONFIG, model_type="t5"))
    paths.vae.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl_vae(vae.state_dict()).items()}, str(paths.vae))
    _write_json(paths.vae.with_suffix(".json"), TINY_VAE_CONFIG)

    # tokenizers: ComfyUI's folders, and a standalone copy
    for clip_dir, t5_dir in (
        (paths.comfyui / "comfy" / "sd1_tokenizer", paths.comfyui / "comfy" / "text_encoders" / "t5_tokenizer"),
        (paths.tokenizers / "clip_l", paths.tokenizers / "t5xxl"),
    ):
        clip_tok.save_pretrained(str(clip_dir))
        (clip_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (clip_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        t5_tok.save_pretrained(str(t5_dir))
    marker.write_text(stamp)
