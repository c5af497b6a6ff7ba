"""Tiny reward models of each architecture, written in the ORIGINAL checkpoint formats.

Everything is generated here (weights, CLIP BPE vocabulary, BERT vocab.txt) so the tests
need no downloads. Key names are written out by hand from the original architectures
(open_clip CLIP, BLIP/ImageReward, transformers CLIPModel folder), independently of the
converters under test.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

WORDS = ["a", "red", "blue", "green", "cube", "ball", "cat", "dog", "photo", "of", "the", "on", "table"]
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------- tokenizers
def _byte_chars() -> list[str]:
    """Byte-level BPE's 256 symbols (CLIP, GPT-2) in vocabulary order: the printable bytes
    (their own characters) first, then the other bytes as chr(256), chr(257), ..."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(rest))]


def clip_bpe_merges(words=WORDS) -> list[tuple[str, str]]:
    """The BPE merges that spell each word of `words`, left to right."""
    merges: list[tuple[str, str]] = []
    for w in words:
        if len(w) < 2:
            continue
        left = w[0]
        for i, c in enumerate(w[1:], start=1):
            right = c + "</w>" if i == len(w) - 1 else c
            if (left, right) not in merges:
                merges.append((left, right))
            left = left + right
    return merges


def write_clip_tokenizer(folder: Path, words=WORDS) -> dict:
    """Write vocab.json + merges.txt of a small CLIP BPE vocabulary; return its ids.

    Layout as the real one: 256 byte symbols, the same with '</w>', one token per merge,
    then <|startoftext|> and <|endoftext|> last (so end-of-text is the largest id).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    merges = clip_bpe_merges(words)
    vocab = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    ids = {t: i for i, t in enumerate(vocab)}
    (folder / "vocab.json").write_text(json.dumps(ids), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                       encoding="utf-8")
    return {"vocab_size": len(vocab), "bos": ids["<|startoftext|>"], "eos": ids["<|endoftext|>"], "ids": ids}


def write_open_clip_bpe_gz(path: Path, words=WORDS, extra_merges: int = 0) -> None:
    """open_clip's bpe_simple_vocab_16e6.txt.gz format: a header line, then one merge per line.

    `extra_merges` appends that many more merges (the real file has far more than open_clip
    keeps) to check that only the first 49152 - 256 - 2 are used.
    """
    import gzip

    merges = clip_bpe_merges(words) + [("z", f"{i}") for i in range(extra_merges)]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write('"bpe_simple_vocab_16e6.txt#version: 0.2\n' + "".join(f"{a} {b}\n" for a, b in merges))


def write_bert_vocab(path: Path, words=WORDS) -> int:
    """Write a WordPiece vocab.txt (special tokens, letters, ##letters, words); return its size."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters] + \
        [w for w in words if w not in letters]
    Path(path).write_text("\n".join(toks) + "\n", encoding="utf-8")
    return len(toks)


# --------------------------------------------------------------------------- init helpers
def _lin(g, out_f, in_f):
    return torch.randn(out_f, in_f, generator=g) / math.sqrt(in_f)


def _vec(g, n, scale=0.1):
    return torch.randn(n, generator=g) * scale


def _ln(g, n):
    return 1.0 + _vec(g, n), _vec(g, n)


# --------------------------------------------------------------------------- HPS (open_clip)
def tiny_open_clip_config(vocab_size: int) -> dict:
    """An open_clip model config (the format of model_configs/ViT-H-14.json), tiny."""
    return {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": vocab_size, "width": 32, "heads": 2, "layers": 2},
    }


def make_open_clip_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under open_clip CLIP's key names (visual.*, transformer.*, ...)."""
    g = torch.Generator().manual_seed(seed)
    v, t, e = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"]
    vw, tw, p = v["width"], t["width"], v["patch_size"]
    grid = v["image_size"] // p
    sd: dict[str, torch.Tensor] = {
        "positional_embedding": torch.randn(t["context_length"], tw, generator=g) * 0.3,
        "text_projection": torch.randn(tw, e, generator=g) / math.sqrt(tw),
        "logit_scale": torch.tensor(math.log(1 / 0.07)),
        "token_embedding.weight": torch.randn(t["vocab_size"], tw, generator=g),
        "visual.class_embedding": torch.randn(vw, generator=g) * 0.5,
        "visual.positional_embedding": torch.randn(grid * grid + 1, vw, generator=g) * 0.3,
        "visual.proj": torch.randn(vw, e, generator=g) / math.sqrt(vw),
        "visual.conv1.weight": torch.randn(vw, 3, p, p, generator=g) / math.sqrt(3 * p * p),
    }
    sd["ln_final.weight"], sd["ln_final.bias"] = _ln(g, tw)
    sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"] = _ln(g, vw)
    sd["visual.ln_post.weight"], sd["visual.ln_post.bias"] = _ln(g, vw)
    for prefix, n, d in (("visual.transformer.resblocks", v["layers"], vw), ("transformer.resblocks", t["layers"], tw)):
        for i in range(n):
            b = f"{prefix}.{i}."
            sd[b + "ln_1.weight"], sd[b + "ln_1.bias"] = _ln(g, d)
            sd[b + "attn.in_proj_weight"] = _lin(g, 3 * d, d)
            sd[b + "attn.in_proj_bias"] = _vec(g, 3 * d)
            sd[b + "attn.out_proj.weight"] = _lin(g, d, d)
            sd[b + "attn.out_proj.bias"] = _vec(g, d)
            sd[b + "ln_2.weight"], sd[b + "ln_2.bias"] = _ln(g, d)
            sd[b + "mlp.c_fc.weight"] = _lin(g, 4 * d, d)
            sd[b + "mlp.c_fc.bias"] = _vec(g, 4 * d)
            sd[b + "mlp.c_proj.weight"] = _lin(g, d, 4 * d)
            sd[b + "mlp.c_proj.bias"] = _vec(g, d)
    return sd


def write_hps_folder(folder: Path, seed: int = 0, with_config: bool = True) -> dict:
    """hps/ folder: HPS_v2.1_compressed.pt ({'state_dict': fp16 weights}), BPE files, config."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = write_clip_tokenizer(folder)
    cfg = tiny_open_clip_config(tok["vocab_size"])
    sd = {k: v.half() if v.is_floating_point() else v for k, v in make_open_clip_state_dict(cfg, seed).items()}
    ckpt = folder / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": sd, "epoch": 1}, ckpt)
    if with_config:
        (folder / "open_clip_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return {"checkpoint": ckpt, "config": cfg, "state_dict": sd, "tokenizer": tok}


# --------------------------------------------------------------------------- PickScore (CLIP folder)
def write_pickscore_folder(folder: Path, seed: int = 1) -> dict:
    """pickscore/model (CLIPModel save_pretrained) + pickscore/processor (tokenizer, preprocessor).

    The processor's special tokens are laion/CLIP-ViT-H-14-laion2B-s32B-b79K's: pad_token "!".
    """
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    proc = folder / "processor"
    tok = write_clip_tokenizer(proc)
    (proc / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 24, "width": 24}, "do_center_crop": True, "do_normalize": True,
        "do_resize": True, "image_mean": OPENAI_MEAN, "image_std": OPENAI_STD, "resample": 3,
        "size": {"shortest_edge": 24}, "image_processor_type": "CLIPImageProcessor",
        "processor_class": "CLIPProcessor"}), encoding="utf-8")
    (proc / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")
    (proc / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
        "unk_token": "<|endoftext|>"}), encoding="utf-8")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=tok["vocab_size"], hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=20, hidden_act="gelu",
                         eos_token_id=tok["eos"], bos_token_id=tok["bos"], pad_token_id=tok["ids"]["!"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=24, patch_size=8, hidden_act="gelu"),
        projection_dim=16)
    model = CLIPModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(math.log(100.0))
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.save_pretrained(folder / "model")
    return {"model_dir": folder / "model", "processor_dir": proc, "tokenizer": tok}


# --------------------------------------------------------------------------- ImageReward (BLIP)
TINY_IR = {"v_width": 128, "v_layers": 1, "patch": 8, "image": 16, "t_hidden": 32, "t_heads": 2,
           "t_layers": 2, "t_inter": 64, "max_pos": 40, "head": (32, 48, 24, 12, 6, 1), "proj": 16}


def make_imagereward_state_dict(vocab_size: int, seed: int = 2, arch: dict = TINY_IR) -> dict[str, torch.Tensor]:
    """Random weights under ImageReward.pt's key names (blip.visual_encoder.*, blip.text_encoder.*, mlp.*)."""
    g = torch.Generator().manual_seed(seed)
    a = arch
    W, H, p = a["v_width"], a["t_hidden"], a["patch"]
    n_pos = (a["image"] // p) ** 2 + 1
    v = "blip.visual_encoder."
    sd: dict[str, torch.Tensor] = {
        v + "cls_token": torch.randn(1, 1, W, generator=g) * 0.5,
        v + "pos_embed": torch.randn(1, n_pos, W, generator=g) * 0.3,
        v + "patch_embed.proj.weight": torch.randn(W, 3, p, p, generator=g) / math.sqrt(3 * p * p),
        v + "patch_embed.proj.bias": _vec(g, W),
    }
    for i in range(a["v_layers"]):
        b = f"{v}blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = _ln(g, W)
        sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"] = _lin(g, 3 * W, W), _vec(g, 3 * W)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = _lin(g, W, W), _vec(g, W)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = _ln(g, W)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = _lin(g, 4 * W, W), _vec(g, 4 * W)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = _lin(g, W, 4 * W), _vec(g, W)
    sd[v + "norm.weight"], sd[v + "norm.bias"] = _ln(g, W)
    t = "blip.text_encoder."
    sd[t + "embeddings.word_embeddings.weight"] = torch.randn(vocab_size, H, generator=g)
    sd[t + "embeddings.position_embeddings.weight"] = torch.randn(a["max_pos"], H, generator=g) * 0.3
    sd[t + "embeddings.LayerNorm.weight"], sd[t + "embeddings.LayerNorm.bias"] = _ln(g, H)
    sd[t + "embeddings.position_ids"] = torch.arange(a["max_pos"]).unsqueeze(0)
    for i in range(a["t_layers"]):
        b = f"{t}encoder.layer.{i}."
        for att, kv_in in (("attention", H), ("crossattention", W)):
            sd[b + f"{att}.self.query.weight"], sd[b + f"{att}.self.query.bias"] = _lin(g, H, H), _vec(g, H)
            sd[b + f"{att}.self.key.weight"], sd[b + f"{att}.self.key.bias"] = _lin(g, H, kv_in), _vec(g, H)
            sd[b + f"{att}.self.value.weight"], sd[b + f"{att}.self.value.bias"] = _lin(g, H, kv_in), _vec(g, H)
            sd[b + f"{att}.output.dense.weight"], sd[b + f"{att}.output.dense.bias"] = _lin(g, H, H), _vec(g, H)
            sd[b + f"{att}.output.LayerNorm.weight"], sd[b + f"{att}.output.LayerNorm.bias"] = _ln(g, H)
        sd[b + "intermediate.dense.weight"] = _lin(g, a["t_inter"], H)
        sd[b + "intermediate.dense.bias"] = _vec(g, a["t_inter"])
        sd[b + "output.dense.weight"], sd[b + "output.dense.bias"] = _lin(g, H, a["t_inter"]), _vec(g, H)
        sd[b + "output.LayerNorm.weight"], sd[b + "output.LayerNorm.bias"] = _ln(g, H)
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = _lin(g, a["proj"], W), _vec(g, a["proj"])
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = _lin(g, a["proj"], H), _vec(g, a["proj"])
    d = a["head"]
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(d[:-1], d[1:])):
        sd[f"mlp.layers.{idx}.weight"] = _lin(g, o, i)
        sd[f"mlp.layers.{idx}.bias"] = _vec(g, o)
    return sd


def write_imagereward_folder(folder: Path, seed: int = 2) -> dict:
    """imagereward/ folder: ImageReward.pt (plain state dict), vocab.txt, med_config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = write_bert_vocab(folder / "vocab.txt")
    vocab_size = n + 2  # BLIP adds [DEC] and [ENC]
    sd = make_imagereward_state_dict(vocab_size, seed)
    torch.save(sd, folder / "ImageReward.pt")
    a = TINY_IR
    (folder / "med_config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1, "hidden_size": a["t_hidden"], "initializer_range": 0.02,
        "intermediate_size": a["t_inter"], "layer_norm_eps": 1e-12, "max_position_embeddings": a["max_pos"],
        "model_type": "bert", "num_attention_heads": a["t_heads"], "num_hidden_layers": a["t_layers"],
        "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": vocab_size, "encoder_width": a["v_width"],
        "add_cross_attention": True}), encoding="utf-8")
    return {"checkpoint": folder / "ImageReward.pt", "state_dict": sd, "vocab_size": vocab_size}


def build_models_dir(root: Path) -> dict:
    """<root>/treerpo_rewards/{hps,pickscore,imagereward} with tiny models; returns their info."""
    base = Path(root) / "treerpo_rewards"
    return {
        "root": Path(root),
        "hps": write_hps_folder(base / "hps"),
        "pickscore": write_pickscore_folder(base / "pickscore"),
        "imagereward": write_imagereward_folder(base / "imagereward"),
    }


def sample_images(n: int = 4, h: int = 40, w: int = 56, seed: int = 0) -> torch.Tensor:
    """Smooth random images in [0, 1] of a non-square size (exercises resize + pad / crop)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 5, 7, generator=g)
    return torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)


class Opaque:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse it."""

    def __init__(self):
        self.note = "not a tensor"
