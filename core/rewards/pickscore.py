"""PickScore: transformers CLIPModel (PickScore_v1 folder) with CLIP-ViT-H-14 processor files.

Score = logit_scale.exp() * cosine(image embedding, text embedding), about 18-24 on real
images. Pixels follow the folder's preprocessor_config.json (CLIPImageProcessor settings),
computed in torch; text uses the folder's CLIP tokenizer with padding to the longest
prompt, truncation at 77 and the attention mask, as PickScore's reference code does.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Reward
from .checkpoints import read_json
from .preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, clip_processor_preprocess
from .text import load_clip_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["PickScoreReward", "load_pickscore", "PICKSCORE_WEIGHT_FILES", "image_processor_settings"]

PICKSCORE_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                          "pytorch_model.bin.index.json")


def _features(out) -> torch.Tensor:
    # transformers 5 returns an output object whose pooler_output holds the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _size(value, key: str, default: int) -> int | tuple[int, int]:
    if value is None:
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if key in value:
            return int(value[key])
        if "height" in value and "width" in value:
            return (int(value["height"]), int(value["width"]))
    raise ValueError(f"unsupported size setting {value!r}")


def image_processor_settings(processor_dir: str | os.PathLike | None) -> dict:
    """Read CLIPImageProcessor settings from preprocessor_config.json (OpenAI defaults if absent)."""
    s = {"shortest_edge": 224, "crop": 224, "mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD,
         "do_center_crop": True}
    p = Path(processor_dir) / "preprocessor_config.json" if processor_dir is not None else None
    if p is None or not p.is_file():
        return s
    cfg = read_json(p, "CLIP image processor config")
    try:
        if cfg.get("do_resize", True) is False:
            raise ValueError("do_resize=false is not supported")
        size = _size(cfg.get("size"), "shortest_edge", 224)
        if isinstance(size, tuple):
            raise ValueError("a fixed (height, width) resize is not supported; expected size.shortest_edge")
        s["shortest_edge"] = size
        s["crop"] = _size(cfg.get("crop_size"), "height", 224)
        s["do_center_crop"] = bool(cfg.get("do_center_crop", True))
        if cfg.get("do_normalize", True):
            s["mean"] = tuple(float(x) for x in cfg.get("image_mean", OPENAI_CLIP_MEAN))
            s["std"] = tuple(float(x) for x in cfg.get("image_std", OPENAI_CLIP_STD))
        else:
            s["mean"], s["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if cfg.get("resample", 3) != 3:
            logger.warning("%s asks for resample=%s; we always use bicubic (3)", p, cfg.get("resample"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from e
    return s


class PickScoreReward(Reward):
    """PickScore: logit_scale.exp() * cosine similarity from a CLIPModel."""

    name = "pickscore"
    typical_range = (18.0, 24.0)

    def __init__(self, model, tokenizer, image_settings: dict | None = None, device="cpu",
                 dtype=torch.float32, batch_size: int | None = None, max_length: int = 77):
        super().__init__(device, dtype, batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.image_settings = dict(image_settings or image_processor_settings(None))
        self.max_length = min(int(max_length), int(model.config.text_config.max_position_embeddings))
        self._moved()

    def _moved(self) -> None:
        self.model.to(device=self.device, dtype=self.dtype)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        s = self.image_settings
        px = clip_processor_preprocess(images, s["shortest_edge"], s["crop"], s["mean"], s["std"],
                                       do_center_crop=s["do_center_crop"])
        img = _features(self.model.get_image_features(pixel_values=px.to(self.dtype)))
        uniq = list(dict.fromkeys(prompts))
        tok = self.tokenizer(uniq, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        txt = _features(self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                                     attention_mask=tok["attention_mask"].to(self.device)))
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        txt = txt[torch.tensor([uniq.index(p) for p in prompts], device=txt.device)]
        return self.model.logit_scale.float().exp() * (img * txt).sum(dim=-1)


def load_pickscore(model_dir: str | os.PathLike, processor_dir: str | os.PathLike, *, device="cpu",
                   dtype: torch.dtype = torch.float32, batch_size: int | None = None) -> PickScoreReward:
    """Load PickScore from a local PickScore_v1 folder and a CLIP-ViT-H-14 processor folder.

    model_dir: config.json plus model.safetensors or pytorch_model.bin (read with
    weights_only=True by transformers). processor_dir: vocab.json, merges.txt,
    preprocessor_config.json (tokenizer_config.json / special_tokens_map.json if present).
    """
    from transformers import CLIPModel

    md = Path(model_dir)
    if not (md / "config.json").is_file() or not any((md / f).is_file() for f in PICKSCORE_WEIGHT_FILES):
        have = sorted(x.name for x in md.iterdir()) if md.is_dir() else "folder absent"
        raise FileNotFoundError(
            f"PickScore model folder {md} must hold config.json and one of {list(PICKSCORE_WEIGHT_FILES)} "
            f"(the Hugging Face repository yuvalkirstain/PickScore_v1); found: {have}"
        )
    tokenizer = load_clip_tokenizer(processor_dir, what="PickScore processor")
    settings = image_processor_settings(processor_dir)
    try:
        model, info = CLIPModel.from_pretrained(str(md), local_files_only=True, output_loading_info=True)
    except Exception as e:
        raise ValueError(f"could not load a CLIPModel from {md}: {type(e).__name__}: {e}") from e
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"PickScore weights in {md} do not match its config.json: "
                         + "; ".join(f"{k}: {sorted(map(str, v))[:8]}" for k, v in problems.items()))
    eos = model.config.text_config.eos_token_id
    # CLIPTextTransformer pools at argmax(ids) when eos_token_id == 2 (legacy configs), else at
    # the first eos id: either way it must be the tokenizer's end-of-text token.
    if eos != 2 and eos != tokenizer.eos_token_id:
        raise ValueError(f"{md}/config.json has text eos_token_id={eos} but the tokenizer in {processor_dir} "
                         f"ends prompts with id {tokenizer.eos_token_id}; text pooling would read the wrong token")
    vocab = int(model.config.text_config.vocab_size)
    if len(tokenizer) > vocab:
        raise ValueError(f"PickScore tokenizer in {processor_dir} has {len(tokenizer)} tokens but {md} embeds {vocab}")
    model.eval().requires_grad_(False)
    return PickScoreReward(model, tokenizer, settings, device=device, dtype=dtype, batch_size=batch_size)
