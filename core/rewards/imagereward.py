"""ImageReward: BLIP ViT + BERT with cross-attention + MLP head, on transformers' BLIP classes.

ImageReward.pt is the state dict of ImageReward's `ImageReward` module:
  blip.visual_encoder.*   timm-style ViT-L/16 at 224 (LayerNorm eps 1e-6, fused qkv)
                          -> BlipVisionModel (class_embedding, position_embedding,
                             patch_embedding, layers.i.{layer_norm1, self_attn.qkv,
                             self_attn.projection, layer_norm2, mlp.fc1/fc2}, post_layernorm)
  blip.text_encoder.*     BLIP's BERT with cross-attention in every layer, no pooler
                          -> BlipTextModel(add_pooling_layer=False), same key names
  mlp.layers.{0,2,4,6,7}  Linear 768-1024-128-64-16-1, no activations (dropouts between)
  blip.vision_proj.*, blip.text_proj.*   contrastive projections, unused by the score
  blip.text_encoder.embeddings.position_ids   a buffer (non-persistent in transformers)

Score: the text is encoded with cross-attention to the image tokens, the [CLS] hidden state
goes through the MLP, and the result is normalised as (r - 0.16717) / 1.03334 (about -2..2).
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .base import Reward
from .checkpoints import check_state_dict_keys, load_state_dict_file, materialize_meta_buffers, read_json
from .preprocess import imagereward_preprocess
from .text import load_bert_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGEREWARD_CHECKPOINT_NAME",
    "IMAGEREWARD_MEAN",
    "IMAGEREWARD_STD",
    "ImageRewardModel",
    "ImageRewardReward",
    "convert_imagereward_state_dict",
    "load_imagereward",
]

IMAGEREWARD_CHECKPOINT_NAME = "ImageReward.pt"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35

# Present in the original checkpoint, not used by the score (or rebuilt by transformers).
UNUSED_KEYS = frozenset({
    "blip.text_encoder.embeddings.position_ids",
    "blip.vision_proj.weight", "blip.vision_proj.bias",
    "blip.text_proj.weight", "blip.text_proj.bias",
})
_MLP_INDICES = (0, 2, 4, 6, 7)


class ImageRewardModel(nn.Module):
    """BlipVisionModel + BlipTextModel (cross-attention) + the MLP head; returns raw rewards [B]."""

    def __init__(self, vision_config, text_config, head_dims: tuple[int, ...]):
        super().__init__()
        from transformers import BlipTextModel, BlipVisionModel

        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        d = head_dims
        # Same Sequential indices as the original (dropouts at 1, 3, 5) so keys line up.
        self.mlp = nn.Module()
        self.mlp.layers = nn.Sequential(
            nn.Linear(d[0], d[1]), nn.Dropout(0.2), nn.Linear(d[1], d[2]), nn.Dropout(0.2),
            nn.Linear(d[2], d[3]), nn.Dropout(0.1), nn.Linear(d[3], d[4]), nn.Linear(d[4], d[5]),
        )

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        # Config is_decoder=True only creates the cross-attention layers; is_decoder=False
        # here gives BLIP's bidirectional "multimodal" encoder mode.
        out = self.text(input_ids=input_ids, attention_mask=attention_mask,
                        encoder_hidden_states=image_embeds, is_decoder=False)
        feat = out.last_hidden_state[:, 0, :].float()
        return self.mlp.layers(feat.to(self.mlp.layers[0].weight.dtype)).squeeze(-1).float()


def _count_layers(keys, pattern: str) -> int:
    rx = re.compile(pattern)
    idx = {int(m.group(1)) for k in keys if (m := rx.match(k))}
    if not idx:
        return 0
    if idx != set(range(max(idx) + 1)):
        raise ValueError(f"layer indices are not contiguous: {sorted(idx)}")
    return max(idx) + 1


def _need(sd: Mapping, key: str, source: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"{source} is not a valid ImageReward checkpoint: missing key {key}")
    return sd[key]


def _configs(sd: Mapping[str, torch.Tensor], source: str, med_config: Mapping | None,
             vision_heads: int | None, token_ids: Mapping[str, int]):
    from transformers import BlipTextConfig, BlipVisionConfig

    v = "blip.visual_encoder."
    width = int(_need(sd, v + "cls_token", source).shape[-1])
    patch = int(_need(sd, v + "patch_embed.proj.weight", source).shape[-1])
    n_pos = int(_need(sd, v + "pos_embed", source).shape[1])
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{source}: {v}pos_embed has {n_pos} positions; expected 1 + a square number")
    v_layers = _count_layers(sd, r"^blip\.visual_encoder\.blocks\.(\d+)\.")
    v_mlp = int(_need(sd, v + "blocks.0.mlp.fc1.weight", source).shape[0])
    heads = int(vision_heads) if vision_heads else max(width // 64, 1)
    if width % heads:
        raise ValueError(f"{source}: vision width {width} is not divisible by vision_heads={heads}")
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=v_mlp, num_hidden_layers=v_layers,
                              num_attention_heads=heads, image_size=grid * patch, patch_size=patch,
                              hidden_act="gelu", layer_norm_eps=1e-6)

    t = "blip.text_encoder."
    vocab, hidden = (int(x) for x in _need(sd, t + "embeddings.word_embeddings.weight", source).shape)
    max_pos = int(_need(sd, t + "embeddings.position_embeddings.weight", source).shape[0])
    t_layers = _count_layers(sd, r"^blip\.text_encoder\.encoder\.layer\.(\d+)\.")
    inter = int(_need(sd, t + "encoder.layer.0.intermediate.dense.weight", source).shape[0])
    enc_w = int(_need(sd, t + "encoder.layer.0.crossattention.self.key.weight", source).shape[1])
    mc = dict(med_config or {})
    inferred = {"hidden_size": hidden, "num_hidden_layers": t_layers, "vocab_size": vocab,
                "intermediate_size": inter, "max_position_embeddings": max_pos}
    bad = {k: (mc[k], x) for k, x in inferred.items() if k in mc and int(mc[k]) != x}
    if bad:
        raise ValueError(f"med_config does not match {source}: " +
                         ", ".join(f"{k}={a} but the checkpoint has {b}" for k, (a, b) in bad.items()))
    t_heads = int(mc.get("num_attention_heads", max(hidden // 64, 1)))
    if hidden % t_heads:
        raise ValueError(f"{source}: text width {hidden} is not divisible by num_attention_heads={t_heads}")
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden, encoder_hidden_size=enc_w, intermediate_size=inter,
                          num_hidden_layers=t_layers, num_attention_heads=t_heads, max_position_embeddings=max_pos,
                          hidden_act=str(mc.get("hidden_act", "gelu")),
                          layer_norm_eps=float(mc.get("layer_norm_eps", 1e-12)), is_decoder=True,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **token_ids)
    head = [int(_need(sd, f"mlp.layers.{_MLP_INDICES[0]}.weight", source).shape[1])]
    for i in _MLP_INDICES:
        head.append(int(_need(sd, f"mlp.layers.{i}.weight", source).shape[0]))
    if head[0] != hidden or head[-1] != 1:
        raise ValueError(f"{source}: MLP head maps {head[0]} -> {head[-1]}; expected {hidden} -> 1")
    return vision, text, tuple(head)


def _to_module_key(k: str) -> str | None:
    """Original ImageReward key -> ImageRewardModel key (None for unused keys)."""
    if k in UNUSED_KEYS:
        return None
    if k.startswith("mlp.layers."):
        return k
    if k.startswith("blip.text_encoder."):
        return "text." + k[len("blip.text_encoder."):]
    v = "blip.visual_encoder."
    if not k.startswith(v):
        return "?" + k  # unknown: reported by the key check
    r = k[len(v):]
    fixed = {"cls_token": "vision.embeddings.class_embedding", "pos_embed": "vision.embeddings.position_embedding",
             "patch_embed.proj.weight": "vision.embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "vision.embeddings.patch_embedding.bias",
             "norm.weight": "vision.post_layernorm.weight", "norm.bias": "vision.post_layernorm.bias"}
    if r in fixed:
        return fixed[r]
    m = re.match(r"^blocks\.(\d+)\.(.+)$", r)
    if m is None:
        return "?" + k
    sub = {"norm1.": "layer_norm1.", "norm2.": "layer_norm2.", "attn.qkv.": "self_attn.qkv.",
           "attn.proj.": "self_attn.projection.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    for a, b in sub.items():
        if m.group(2).startswith(a):
            return f"vision.encoder.layers.{m.group(1)}.{b}{m.group(2)[len(a):]}"
    return "?" + k


def convert_imagereward_state_dict(state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict",
                                   med_config: Mapping | None = None, vision_heads: int | None = None,
                                   token_ids: Mapping[str, int] | None = None) -> ImageRewardModel:
    """Build an ImageRewardModel filled strictly from an original ImageReward state dict.

    Every weight the model needs must be present and nothing else is allowed except the
    known unused entries (position_ids, the contrastive vision/text projections).
    """
    vision, text, head = _configs(state_dict, source, med_config, vision_heads, dict(token_ids or {}))
    with torch.device("meta"):
        model = ImageRewardModel(vision, text, head)
    expected = set(model.state_dict().keys())
    mapped: dict[str, torch.Tensor] = {}
    names: dict[str, str] = {}
    for k, t in state_dict.items():
        mk = _to_module_key(k)
        if mk is None:
            continue
        mapped[mk] = t
        names[mk] = k
    # Report problems with the ORIGINAL key names the user can look up in the file.
    inv_expected = set()
    for mk in expected:
        inv_expected.add(_from_module_key(mk))
    check_state_dict_keys([names[k] for k in mapped], inv_expected, source=source, what="ImageReward")
    try:
        model.load_state_dict(mapped, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: weights do not fit the ImageReward architecture: {e}") from e
    materialize_meta_buffers(model)
    return model.eval().requires_grad_(False)


def _from_module_key(mk: str) -> str:
    """ImageRewardModel key -> original key (inverse of _to_module_key for used keys)."""
    if mk.startswith("mlp.layers."):
        return mk
    if mk.startswith("text."):
        return "blip.text_encoder." + mk[len("text."):]
    fixed = {"vision.embeddings.class_embedding": "cls_token", "vision.embeddings.position_embedding": "pos_embed",
             "vision.embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "vision.embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "vision.post_layernorm.weight": "norm.weight", "vision.post_layernorm.bias": "norm.bias"}
    if mk in fixed:
        return "blip.visual_encoder." + fixed[mk]
    m = re.match(r"^vision\.encoder\.layers\.(\d+)\.(.+)$", mk)
    if m is None:
        raise AssertionError(f"unmapped ImageReward module key {mk}")
    sub = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.qkv.": "attn.qkv.",
           "self_attn.projection.": "attn.proj.", "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}
    for a, b in sub.items():
        if m.group(2).startswith(a):
            return f"blip.visual_encoder.blocks.{m.group(1)}.{b}{m.group(2)[len(a):]}"
    raise AssertionError(f"unmapped ImageReward module key {mk}")


class ImageRewardReward(Reward):
    """ImageReward score, normalised as (r - 0.16717) / 1.03334."""

    name = "imagereward"
    typical_range = (-2.0, 2.0)

    def __init__(self, model: ImageRewardModel, tokenizer, device="cpu", dtype=torch.float32,
                 batch_size: int | None = None, max_length: int = TEXT_MAX_LENGTH):
        super().__init__(device, dtype, batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.image_size = int(model.vision.config.image_size)
        self._moved()

    def _moved(self) -> None:
        self.model.to(device=self.device, dtype=self.dtype)
        self.model.mlp.float()  # the original runs the head on .float() features

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        px = imagereward_preprocess(images, self.image_size).to(self.dtype)
        tok = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        r = self.model(px, tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        return (r - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def load_imagereward(checkpoint: str | os.PathLike, vocab_file: str | os.PathLike, *,
                     med_config: Mapping | str | os.PathLike | None = None, vision_heads: int | None = None,
                     device="cpu", dtype: torch.dtype = torch.float32, trust_checkpoint: bool = False,
                     batch_size: int | None = None) -> ImageRewardReward:
    """Load ImageReward from `checkpoint` (ImageReward.pt) and bert-base-uncased's `vocab_file`.

    med_config: the BERT config ImageReward ships (med_config.json, dict or path); optional,
    only num_attention_heads / layer_norm_eps / hidden_act are read from it (the rest is
    inferred from the weights and checked against it). vision_heads: default width // 64
    (16 for ViT-L).
    """
    src = Path(checkpoint)
    if not src.is_file():
        raise FileNotFoundError(f"ImageReward checkpoint not found: {src} (expected {IMAGEREWARD_CHECKPOINT_NAME}, "
                                "from the Hugging Face repository THUDM/ImageReward)")
    tokenizer = load_bert_tokenizer(vocab_file, what="ImageReward tokenizer")
    if isinstance(med_config, (str, os.PathLike)):
        med_config = read_json(med_config, "ImageReward med_config")
    sd = load_state_dict_file(src, trust_checkpoint=trust_checkpoint)
    token_ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     sep_token_id=tokenizer.sep_token_id)
    model = convert_imagereward_state_dict(sd, source=str(src), med_config=med_config, vision_heads=vision_heads,
                                           token_ids=token_ids)
    vocab = int(model.text.config.vocab_size)
    if len(tokenizer) != vocab:
        raise ValueError(f"ImageReward tokenizer from {vocab_file} has {len(tokenizer)} tokens (with [DEC], [ENC]) "
                         f"but {src} embeds {vocab}; expected bert-base-uncased's vocab.txt")
    return ImageRewardReward(model, tokenizer, device=device, dtype=dtype, batch_size=batch_size)
