"""The tiny-shapes model: a FLUX.1-dev-architecture text-to-image pipeline small enough for a CPU,
pretrained on the shapes world (scripts/pretrain_shapes.py) and shipped in pretrained/tiny-shapes.

Same classes as FLUX.1-dev (FluxTransformer2DModel with guidance embedding, CLIPTextModel,
T5EncoderModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler), only smaller: 64x64 images,
a 4x autoencoder (16x16x16 latents, 64 tokens), word-level tokenizers over the world's
vocabulary and 32-token prompts.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

from .world import BACKGROUNDS, COLOURS, SHAPES

PRETRAINED_DIR = Path(__file__).resolve().parents[2] / "pretrained" / "tiny-shapes"
IMAGE_SIZE = 64
MAX_TOKENS = 32  # CLIP and T5 prompt length: the world's longest caption is ~20 words

TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": 64,
    "pooled_projection_dim": 64,
    "guidance_embeds": True,
    "axes_dims_rope": [8, 12, 12],
}
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [8, 16, 32],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 16,
    "norm_num_groups": 4,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # set from the latents' statistics after the autoencoder is trained
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
    "force_upcast": True,
}
WORDS = sorted(set(
    list(COLOURS) + [s for s in SHAPES] + [s + "s" for s in SHAPES] + list(BACKGROUNDS)
    + "a an one two three on the at in of left right top bottom upper lower corner middle center and with "
      "background picture image".split()
))
CLIP_CONFIG = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": MAX_TOKENS,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "bos_token_id": 0,
    "eos_token_id": 2,  # as FLUX's CLIP config: the pooled output is read at the highest id (end of text)
    "pad_token_id": 1,
}
T5_CONFIG = {
    "vocab_size": 192,
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 16,
    "relative_attention_max_distance": 32,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "decoder_start_token_id": 0,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "tie_word_embeddings": False,
}
SCHEDULER_CONFIG = {  # FLUX.1-dev's
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}


def pretrained_dir() -> Path:
    """The shipped weights (diffusers folder); a clear error when a checkout lacks them."""
    if not (PRETRAINED_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"tiny-shapes weights not found in {PRETRAINED_DIR}; regenerate them with "
                                "`python scripts/pretrain_shapes.py` (about an hour on 2 CPU cores)")
    return PRETRAINED_DIR


def byte_chars() -> list[str]:
    """CLIP's byte-to-unicode table: every byte gets a printable character."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    extra, out = 0, []
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def clip_tokenizer():
    """CLIP byte-level BPE with merges built from the world's words (most become one or a few
    tokens; other text falls back to characters); end-of-text is the highest id, where CLIP's
    pooled output is read."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for c in byte_chars():
        vocab[c] = len(vocab)
    for c in byte_chars():
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        pieces = list(w[:-1]) + [w[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in merges:
                merges.append((left, right))
                vocab.setdefault(left + right, len(vocab))
            left += right
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    if len(vocab) > CLIP_CONFIG["vocab_size"]:
        raise AssertionError(f"CLIP vocabulary {len(vocab)} > {CLIP_CONFIG['vocab_size']}")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def t5_tokenizer():
    """T5 unigram tokenizer: the world's words as whole pieces, single characters for the rest."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("▁" + w, -2.0) for w in WORDS] + [("▁", -4.0)]
    pieces += [(c, -6.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    if len(pieces) > T5_CONFIG["vocab_size"]:
        raise AssertionError(f"T5 vocabulary {len(pieces)} > {T5_CONFIG['vocab_size']}")
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def build_modules(seed: int = 0):
    """Freshly initialised (transformer, clip, t5, vae), seeded."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel.from_config(TRANSFORMER_CONFIG)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_CONFIG))
    t5 = T5EncoderModel(T5Config(**T5_CONFIG))
    vae = AutoencoderKL.from_config(VAE_CONFIG)
    return transformer, clip, t5, vae


def save_pipeline(folder: str | Path, transformer, clip, t5, vae) -> Path:
    """Write a FLUX.1-dev-layout diffusers folder (FluxPipeline.from_pretrained reads it)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    transformer.save_pretrained(folder / "transformer")
    vae.save_pretrained(folder / "vae")
    clip.save_pretrained(folder / "text_encoder")
    t5.save_pretrained(folder / "text_encoder_2")
    clip_tokenizer().save_pretrained(folder / "tokenizer")
    t5_tokenizer().save_pretrained(folder / "tokenizer_2")
    for part in ("transformer", "vae"):  # diffusers records where a model was loaded from: not part of it
        cfg = folder / part / "config.json"
        data = json.loads(cfg.read_text())
        if data.pop("_name_or_path", None) is not None:
            cfg.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
