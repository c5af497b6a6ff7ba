"""Model set-up shared by the CLI commands (demo, train, bench)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from .errors import BadInput


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
    (random test pipeline), a size preset (SIZE_PRESETS, random weights) or local files, on device
    ``on`` (default: the first GPU, or the CPU)."""
    from ..core.models import LoraSettings, load_flux

    lora = LoraSettings(rank=rank, alpha=alpha if alpha is not None else rank)
    if model.split(":")[0] in SIZE_PRESETS:
        return random_stack(model, lora, on=on or device(), gradient_checkpointing=gradient_checkpointing)
    if model == "tiny-shapes":
        from ..core.shapes.model import pretrained_dir

        source = pretrained_dir()
    else:
        source = tiny_flux_dir() if model == "tiny" else model
    return load_flux(source, lora=lora, cache_dir=cache_dir, device=on or device(),
                     max_sequence_length=max_sequence_length, gradient_checkpointing=gradient_checkpointing,
                     **{k: v for k, v in single_files.items() if v})


def latent_shape(stack, resolution: int) -> tuple[int, int, int]:
    try:
        return stack.latent_shape(resolution)
    except ValueError as e:
        raise BadInput(f"--resolution: {e}") from None


def _vae_scale(vae_config: dict) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def check_model(model: str, complete: bool = False, **single_files) -> int:
    """Check a --model value (and --clip-l / --t5 / --vae) without reading any weights: a size preset's
    name, or the files' headers, layout and shapes (core.models.find_flux_files); ``complete``: text
    encoders and autoencoder too (training). Returns the autoencoder's scale factor, for check_resolution."""
    from ..core.models import ModelFileError, find_flux_files

    if model.split(":")[0] in SIZE_PRESETS:
        return _vae_scale(_preset_vae_config(parse_size_preset(model)[0]))
    if model == "tiny":  # built on first use (tiny_flux_dir): its config answers without building it
        from ..testing import TINY_VAE_CONFIG

        return _vae_scale(TINY_VAE_CONFIG)
    try:
        from ..core.shapes.model import pretrained_dir

        files = find_flux_files(pretrained_dir() if model == "tiny-shapes" else model,
                                **{k: v for k, v in single_files.items() if v})
        if complete:
            files.check_complete()
    except (ModelFileError, FileNotFoundError) as e:  # the message names the file and what it should be
        raise BadInput(f"--model {model}: {str(e).removeprefix(f'{model}: ')}") from None
    return files.vae_scale_factor


def check_resolution(resolution: int, scale: int) -> None:
    """FLUX packs 2x2 latent patches: the image side must be a multiple of twice the autoencoder's scale."""
    if resolution % (2 * scale):
        raise BadInput(f"--resolution {resolution}: must be a multiple of {2 * scale} for this model (its "
                       f"autoencoder scales by {scale} and FLUX packs 2x2 latent patches)")


def load_policy_for_bench(model: str, resolution: int):
    stack = load_stack(model)
    return stack.policy, stack.encode, stack.decode, latent_shape(stack, resolution)


# Size presets: FLUX-class stacks with random weights and real shapes, for benchmarks of speed,
# memory and FLOPs without the 12B weights. Written NAME or NAME:DOUBLE:SINGLE (block counts;
# flux-width:19:38 is FLUX.1-dev's full depth). The text encoders are replaced by random
# embeddings of the shapes FLUX's cached T5 / CLIP outputs have: a real run encodes each prompt
# once and caches it, so the encoders never enter an iteration's time.
SIZE_PRESETS = {
    # FLUX.1-dev's transformer (hidden 3072 = 24 heads x 128, RoPE axes 16/56/56, T5 width 4096,
    # CLIP pooled 768, guidance embedding) with 2 double + 4 single blocks; FLUX's VAE; 512 tokens
    "flux-width": dict(transformer="flux-dev", double=2, single=4, text_tokens=512, vae="flux-vae"),
    # the same code path at the bundled tiny model's sizes (CPU smoke runs and tests)
    "flux-narrow": dict(transformer="tiny", double=1, single=2, text_tokens=16, vae="tiny"),
}


def parse_size_preset(model: str) -> tuple[str, int, int]:
    name, *blocks = model.split(":")
    if name not in SIZE_PRESETS:
        raise BadInput(f"unknown size preset {name!r}; choose one of {sorted(SIZE_PRESETS)}")
    spec = SIZE_PRESETS[name]
    if not blocks:
        return name, spec["double"], spec["single"]
    try:
        double, single = (int(b) for b in blocks)
        if double < 0 or single < 0 or double + single == 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"--model {model!r}: expected NAME or NAME:DOUBLE:SINGLE with block counts >= 0, "
                       f"not both 0 (e.g. {name}:19:38)") from None
    return name, double, single


def _preset_vae_config(name: str) -> dict:
    from ..core.models import bundled_config
    from ..testing import TINY_VAE_CONFIG

    vae = SIZE_PRESETS[name]["vae"]
    cfg = dict(TINY_VAE_CONFIG) if vae == "tiny" else bundled_config(vae)
    return {k: v for k, v in cfg.items() if not k.startswith("_") and k != "name"}


class RandomTextEmbeddings:
    """``encode(prompts)`` -> one cond per prompt with random T5 sequence [1, tokens, width] and
    CLIP pooled [1, pooled] embeddings, the same for the same prompt (seeded by its CRC32)."""

    def __init__(self, tokens: int, width: int, pooled: int):
        self.tokens, self.width, self.pooled = tokens, width, pooled

    def __call__(self, prompts):
        import zlib

        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(zlib.crc32(p.encode("utf-8")))
            out.append({"prompt_embeds": torch.randn((1, self.tokens, self.width), generator=g),
                        "pooled_prompt_embeds": torch.randn((1, self.pooled), generator=g)})
        return out


def random_stack(model: str, lora, on="cpu", gradient_checkpointing: bool = False):
    """FluxStack of a size preset: random transformer (bf16 on CUDA, fp32 on CPU) with ``lora``,
    random text embeddings, a random VAE of the preset's config (decoder only)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from ..core.models import FluxPolicy, FluxStack, bundled_config, default_dtype
    from ..core.models.vae import FluxDecoder
    from ..testing import TINY_TRANSFORMER_CONFIG

    name, double, single = parse_size_preset(model)
    spec = SIZE_PRESETS[name]
    tcfg = (dict(TINY_TRANSFORMER_CONFIG) if spec["transformer"] == "tiny"
            else bundled_config(spec["transformer"])["transformer"])
    tcfg = {k: v for k, v in tcfg.items() if not k.startswith("_")}
    tcfg.update(num_layers=double, num_single_layers=single)
    vcfg = _preset_vae_config(name)
    dev = torch.device(on)
    dtype = default_dtype(dev)
    old = torch.get_default_dtype()
    # built on the device in its dtype: no fp32 copy of a large model on the host
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), dev:
        torch.manual_seed(0)
        torch.set_default_dtype(dtype)
        try:
            transformer = FluxTransformer2DModel(**tcfg)
            vae = AutoencoderKL(**vcfg)
        finally:
            torch.set_default_dtype(old)
    vae.encoder = None  # only decode runs: the encoder's weights would only take memory
    vae.requires_grad_(False).eval()
    policy = FluxPolicy(transformer, lora=lora, gradient_checkpointing=gradient_checkpointing, dtype=None,
                        base_identity={"random_weights": model})
    encode = RandomTextEmbeddings(spec["text_tokens"], tcfg["joint_attention_dim"], tcfg["pooled_projection_dim"])
    return FluxStack(files=None, policy=policy, encode=encode, decode=FluxDecoder(vae))
