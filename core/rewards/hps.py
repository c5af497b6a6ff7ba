"""HPS-v2.1: open_clip ViT-H-14 checkpoint converted onto transformers' CLIPModel.

HPS_v2.1_compressed.pt holds an open_clip CLIP state dict under 'state_dict'. Its layout
maps one-to-one onto CLIPModel:

    open_clip                                   transformers CLIPModel
    visual.conv1.weight                         vision_model.embeddings.patch_embedding.weight
    visual.class_embedding                      vision_model.embeddings.class_embedding
    visual.positional_embedding                 vision_model.embeddings.position_embedding.weight
    visual.ln_pre / visual.ln_post              vision_model.pre_layrnorm / post_layernorm
    visual.proj [D, E]                          visual_projection.weight [E, D] (transposed)
    token_embedding / positional_embedding      text_model.embeddings.token/position_embedding
    ln_final                                    text_model.final_layer_norm
    text_projection [D, E]                      text_projection.weight [E, D] (transposed)
    *.resblocks.i.attn.in_proj_{weight,bias}    *.layers.i.self_attn.{q,k,v}_proj (split in 3)
    *.resblocks.i.attn.out_proj                 *.layers.i.self_attn.out_proj
    *.resblocks.i.ln_1 / ln_2                   *.layers.i.layer_norm1 / layer_norm2
    *.resblocks.i.mlp.c_fc / c_proj             *.layers.i.mlp.fc1 / fc2
    logit_scale                                 logit_scale

Score = cosine of the L2-normalised image and text embeddings (no logit scale), about
0.2-0.4 on real images. Text features are pooled at the end-of-text token, found as the
argmax of the token ids exactly as open_clip does.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F

from .base import Reward
from .checkpoints import (
    check_state_dict_keys,
    load_state_dict_file,
    materialize_meta_buffers,
    read_json,
    save_safetensors_atomic,
)
from .preprocess import hps_preprocess
from .text import load_clip_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "VIT_H_14_CONFIG",
    "HPS_CHECKPOINT_NAME",
    "HPSReward",
    "open_clip_expected_keys",
    "convert_open_clip_state_dict",
    "build_clip_model",
    "load_hps",
]

HPS_CHECKPOINT_NAME = "HPS_v2.1_compressed.pt"
CONVERTED_SUFFIX = ".transformers.safetensors"
_CONVERTER_VERSION = "1"

# open_clip's model_configs/ViT-H-14.json (the architecture hpsv2 builds), in its own format.
VIT_H_14_CONFIG: dict = {
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24},
}


def _arch(cfg: Mapping) -> dict:
    """Fill open_clip's defaults into an open_clip model config."""
    v, t = dict(cfg.get("vision_cfg", {})), dict(cfg.get("text_cfg", {}))
    try:
        a = {
            "embed_dim": int(cfg["embed_dim"]),
            "quick_gelu": bool(cfg.get("quick_gelu", False)),
            "v_width": int(v["width"]), "v_layers": int(v["layers"]), "v_patch": int(v["patch_size"]),
            "v_image": int(v["image_size"]), "v_head_width": int(v.get("head_width", 64)),
            "v_mlp": int(int(v["width"]) * float(v.get("mlp_ratio", 4.0))),
            "t_width": int(t["width"]), "t_layers": int(t["layers"]), "t_heads": int(t.get("heads", 8)),
            "t_vocab": int(t["vocab_size"]), "t_context": int(t["context_length"]),
            "t_mlp": int(int(t["width"]) * float(t.get("mlp_ratio", 4.0))),
        }
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"open_clip config is missing or has a bad field ({e}); expected the format of "
                         "open_clip's model_configs/ViT-H-14.json") from e
    for k in ("v_layers", "v_patch", "v_image", "t_layers", "t_heads", "t_vocab", "t_context"):
        if a[k] < 1:
            raise ValueError(f"open_clip config: {k} must be positive, got {a[k]}")
    if a["v_width"] % a["v_head_width"] or a["t_width"] % a["t_heads"]:
        raise ValueError("open_clip config: widths must be divisible by the head width / number of heads")
    return a


def open_clip_expected_keys(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Every key (and shape) an open_clip CLIP state dict of this config holds."""
    a = _arch(cfg)
    grid = a["v_image"] // a["v_patch"]
    keys: dict[str, tuple[int, ...]] = {
        "logit_scale": (),
        "visual.class_embedding": (a["v_width"],),
        "visual.positional_embedding": (grid * grid + 1, a["v_width"]),
        "visual.conv1.weight": (a["v_width"], 3, a["v_patch"], a["v_patch"]),
        "visual.ln_pre.weight": (a["v_width"],), "visual.ln_pre.bias": (a["v_width"],),
        "visual.ln_post.weight": (a["v_width"],), "visual.ln_post.bias": (a["v_width"],),
        "visual.proj": (a["v_width"], a["embed_dim"]),
        "token_embedding.weight": (a["t_vocab"], a["t_width"]),
        "positional_embedding": (a["t_context"], a["t_width"]),
        "ln_final.weight": (a["t_width"],), "ln_final.bias": (a["t_width"],),
        "text_projection": (a["t_width"], a["embed_dim"]),
    }
    for prefix, n, d, m in (("visual.transformer.resblocks", a["v_layers"], a["v_width"], a["v_mlp"]),
                            ("transformer.resblocks", a["t_layers"], a["t_width"], a["t_mlp"])):
        for i in range(n):
            b = f"{prefix}.{i}."
            keys.update({
                b + "ln_1.weight": (d,), b + "ln_1.bias": (d,),
                b + "attn.in_proj_weight": (3 * d, d), b + "attn.in_proj_bias": (3 * d,),
                b + "attn.out_proj.weight": (d, d), b + "attn.out_proj.bias": (d,),
                b + "ln_2.weight": (d,), b + "ln_2.bias": (d,),
                b + "mlp.c_fc.weight": (m, d), b + "mlp.c_fc.bias": (m,),
                b + "mlp.c_proj.weight": (d, m), b + "mlp.c_proj.bias": (d,),
            })
    return keys


def _clip_config(cfg: Mapping, eos_token_id: int | None = None, bos_token_id: int | None = None,
                 pad_token_id: int | None = None):
    from transformers import CLIPConfig

    a = _arch(cfg)
    act = "quick_gelu" if a["quick_gelu"] else "gelu"
    text = dict(vocab_size=a["t_vocab"], hidden_size=a["t_width"], intermediate_size=a["t_mlp"],
                num_hidden_layers=a["t_layers"], num_attention_heads=a["t_heads"],
                max_position_embeddings=a["t_context"], hidden_act=act, layer_norm_eps=1e-5,
                projection_dim=a["embed_dim"])
    # Our scorer pools at argmax(ids) itself; the ids below only keep the config coherent.
    eos = eos_token_id if eos_token_id is not None else a["t_vocab"] - 1
    text.update(eos_token_id=eos, bos_token_id=bos_token_id if bos_token_id is not None else max(eos - 1, 0),
                pad_token_id=pad_token_id if pad_token_id is not None else 0)
    vision = dict(hidden_size=a["v_width"], intermediate_size=a["v_mlp"], num_hidden_layers=a["v_layers"],
                  num_attention_heads=a["v_width"] // a["v_head_width"], image_size=a["v_image"],
                  patch_size=a["v_patch"], hidden_act=act, layer_norm_eps=1e-5, projection_dim=a["embed_dim"])
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=a["embed_dim"])


_RES_MAP = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_TOP_MAP = {
    "logit_scale": "logit_scale",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_RES_RE = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(.+)$")


def convert_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor], open_clip_config: Mapping | None = None,
                                 source: str = "state dict", **token_ids) -> tuple[dict[str, torch.Tensor], object]:
    """Convert an open_clip CLIP state dict to (CLIPModel state dict, CLIPConfig).

    Strict: every key of the open_clip architecture `open_clip_config` (default ViT-H-14)
    must be present with the right shape and no other key is allowed. `token_ids` may
    carry eos_token_id / bos_token_id / pad_token_id for the text config.
    """
    cfg = dict(open_clip_config or VIT_H_14_CONFIG)
    expected = open_clip_expected_keys(cfg)
    check_state_dict_keys(state_dict.keys(), expected.keys(), source=source,
                          what="open_clip CLIP (HPS)", ignorable=("attn_mask",))
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {shape}" for k, shape in expected.items()
             if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise ValueError(f"{source}: tensor shapes do not match the open_clip config "
                         f"(pass open_clip_config for another architecture): {wrong[:6]}")
    out: dict[str, torch.Tensor] = {}
    for k in expected:
        v = state_dict[k]
        if k in _TOP_MAP:
            out[_TOP_MAP[k]] = v
        elif k == "visual.proj":
            out["visual_projection.weight"] = v.t().contiguous()
        elif k == "text_projection":
            out["text_projection.weight"] = v.t().contiguous()
        else:
            m = _RES_RE.match(k)
            if m is None:
                raise AssertionError(f"unmapped open_clip key {k}")
            tower = "vision_model" if m.group(1) == "visual.transformer" else "text_model"
            base = f"{tower}.encoder.layers.{m.group(2)}.self_attn."
            rest = m.group(3)
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                # nn.MultiheadAttention stacks the projections in the order q, k, v.
                for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                    out[f"{base}{name}.{kind}"] = part.contiguous()
            else:
                out[f"{tower}.encoder.layers.{m.group(2)}.{_RES_MAP[rest]}"] = v
    return out, _clip_config(cfg, **token_ids)


def build_clip_model(config, state_dict: Mapping[str, torch.Tensor], source: str = "state dict"):
    """CLIPModel from `config`, filled strictly from `state_dict` (built on meta, no random init)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{source}: converted weights do not fit transformers CLIPModel: {e}") from e
    materialize_meta_buffers(model)
    return model.eval().requires_grad_(False)


def open_clip_clean(text: str) -> str:
    """open_clip's prompt cleaning: ftfy.fix_text (only if ftfy is installed: it is not a
    dependency; it straightens curly quotes, repairs mojibake), HTML unescaped twice,
    whitespace collapsed."""
    try:
        import ftfy
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


class HPSReward(Reward):
    """HPS-v2.1 score: cosine(image embedding, text embedding) from a CLIPModel."""

    name = "hps"
    typical_range = (0.2, 0.4)

    def __init__(self, model, tokenizer, device="cpu", dtype=torch.float32, batch_size: int | None = None,
                 antialias: bool = True):
        super().__init__(device, dtype, batch_size)
        self.model = model
        self.tokenizer = tokenizer
        self.antialias = antialias
        self.image_size = int(model.config.vision_config.image_size)
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self._moved()

    def _moved(self) -> None:
        self.model.to(device=self.device, dtype=self.dtype)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids [B, context_length] as open_clip's tokenizer gives them (padding aside)."""
        # open_clip reads a literal "<|endoftext|>" in a prompt as text, not as the end token.
        return self.tokenizer([open_clip_clean(p) for p in prompts], padding="max_length",
                              max_length=self.context_length, truncation=True, split_special_tokens=True,
                              return_tensors="pt")["input_ids"]

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """Projected (unnormalised) text embeddings, pooled at argmax(ids) like open_clip."""
        ids = self.tokenize(prompts).to(self.device)
        hidden = self.model.text_model(input_ids=ids).last_hidden_state
        pooled = hidden[torch.arange(ids.shape[0], device=self.device), ids.argmax(dim=-1)]
        return self.model.text_projection(pooled)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Projected (unnormalised) image embeddings from preprocessed pixels."""
        pooled = self.model.vision_model(pixel_values=pixel_values.to(self.dtype)).pooler_output
        return self.model.visual_projection(pooled)

    def _score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        px = hps_preprocess(images, self.image_size, antialias=self.antialias)
        img = F.normalize(self.image_features(px).float(), dim=-1)
        uniq = list(dict.fromkeys(prompts))  # many tree leaves share a prompt: encode it once
        txt = F.normalize(self.text_features(uniq).float(), dim=-1)
        txt = txt[torch.tensor([uniq.index(p) for p in prompts], device=txt.device)]
        return (img * txt).sum(dim=-1)


def _source_stamp(path: Path) -> dict[str, str]:
    st = path.stat()
    return {"source_name": path.name, "source_size": str(st.st_size), "source_mtime_ns": str(st.st_mtime_ns)}


def _load_cached(cache: Path, src: Path):
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import CLIPConfig

    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata() or {}
        stamp = _source_stamp(src)
        if meta.get("converter") != f"treerpo-hps-clip-{_CONVERTER_VERSION}" or any(
                meta.get(k) != v for k, v in stamp.items()):
            logger.info("ignoring stale converted HPS cache %s", cache)
            return None
        config = CLIPConfig.from_dict(json.loads(meta["clip_config"]))
        return load_file(str(cache)), config
    except Exception as e:  # a broken cache is rebuilt, never fatal
        logger.warning("could not use converted HPS cache %s (%s); converting again", cache, e)
        return None


def load_hps(checkpoint: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
             open_clip_config: Mapping | str | os.PathLike | None = None, device="cpu",
             dtype: torch.dtype = torch.float32, trust_checkpoint: bool = False, cache_converted: bool = False,
             batch_size: int | None = None, antialias: bool = True) -> HPSReward:
    """Load HPS-v2.1 from `checkpoint` (HPS_v2.1_compressed.pt) and CLIP BPE files in `tokenizer_dir`.

    tokenizer_dir: vocab.json + merges.txt or open_clip's bpe_simple_vocab_16e6.txt.gz. The
    tokenizer is built from the vocabulary alone, as open_clip builds it; any tokenizer
    settings in the folder are ignored.

    open_clip_config: open_clip model config (dict or JSON file); default ViT-H-14.
    cache_converted: also keep the converted CLIPModel weights as ``<checkpoint stem>
    .transformers.safetensors`` beside the original (opt-in: about 2 GB more on disk), and
    load from it, without unpickling, while the original is unchanged.
    """
    src = Path(checkpoint)
    if not src.is_file():
        raise FileNotFoundError(f"HPS checkpoint not found: {src} (expected {HPS_CHECKPOINT_NAME}, "
                                "from the Hugging Face repository xswu/HPSv2)")
    tokenizer = load_clip_tokenizer(tokenizer_dir, what="HPS tokenizer", use_folder_config=False)
    if isinstance(open_clip_config, (str, os.PathLike)):
        open_clip_config = read_json(open_clip_config, "open_clip model config")
    token_ids = dict(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    cache = src.with_name(src.stem + CONVERTED_SUFFIX)
    loaded = _load_cached(cache, src) if cache_converted and cache.is_file() else None
    if loaded is not None:
        sd, config = loaded
        source = str(cache)
    else:
        raw = load_state_dict_file(src, trust_checkpoint=trust_checkpoint)
        sd, config = convert_open_clip_state_dict(raw, open_clip_config, source=str(src), **token_ids)
        source = str(src)
        if cache_converted:
            meta = {"converter": f"treerpo-hps-clip-{_CONVERTER_VERSION}", "clip_config": config.to_json_string(),
                    **_source_stamp(src)}
            try:
                save_safetensors_atomic(sd, cache, meta)
                logger.info("cached converted HPS weights at %s", cache)
            except OSError as e:
                logger.info("could not cache converted HPS weights beside %s (%s); continuing", src, e)
    vocab = int(config.text_config.vocab_size)
    if tokenizer.eos_token_id >= vocab or len(tokenizer) > vocab:
        raise ValueError(f"HPS tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the checkpoint "
                         f"{src} embeds {vocab}; expected the CLIP BPE vocab of the same model")
    model = build_clip_model(config, sd, source=source)
    return HPSReward(model, tokenizer, device=device, dtype=dtype, batch_size=batch_size, antialias=antialias)
