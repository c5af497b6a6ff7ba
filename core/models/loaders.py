"""Offline FLUX loading: diffusers folders and ComfyUI / BFL single files.

Everything here reads local files only. Locating files (`flux_files_from_diffusers`,
`flux_files_from_single_files`, `flux_files_from_comfyui`, `find_flux_files`) checks every
file cheaply (safetensors header, size, key layout, shapes against the config) BEFORE any
weights are read, and returns a `FluxFiles` record. The `load_*` functions then build the
models. Errors (`ModelFileError`, a ValueError; `MissingModelFile`, also a
FileNotFoundError) name the file, what was expected and where it was looked for.

The BFL -> diffusers key conversion is our own table (`transformer_key_table`), used in
both directions: `bfl_to_diffusers_transformer` for loading, `diffusers_to_bfl_transformer`
for writing BFL-layout files (test fixtures, exports).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from .flux_policy import FluxPolicy, LoraSettings, default_dtype

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# Optional bundled tokenizer copy: core/models/tokenizers/{clip_l,t5xxl}/ (not shipped by default).
BUNDLED_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"

# ComfyUI model folders, in the order ComfyUI itself searches them.
COMFY_DIRS = {
    "transformer": ("diffusion_models", "unet"),
    "text_encoder": ("text_encoders", "clip"),
    "vae": ("vae",),
}
# Tokenizer folders inside a ComfyUI install (relative to its root).
COMFY_TOKENIZER_DIRS = {
    "clip_l": ("comfy/sd1_tokenizer",),
    "t5xxl": ("comfy/text_encoders/t5_tokenizer", "comfy/t5_tokenizer"),
}
DIFFUSERS_PARTS = {
    "transformer": "FLUX transformer (FluxTransformer2DModel)",
    "text_encoder": "CLIP-L text encoder (CLIPTextModel)",
    "text_encoder_2": "T5-XXL text encoder (T5EncoderModel)",
    "tokenizer": "CLIP tokenizer",
    "tokenizer_2": "T5 tokenizer",
    "vae": "autoencoder (AutoencoderKL, 16 latent channels)",
    "scheduler": "scheduler config (FlowMatchEulerDiscreteScheduler)",
}
_FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)
)
# Auxiliary tensors of fp8-quantised files (ComfyUI "scaled fp8" and newer formats).
_QUANT_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
_QUANT_MARKERS = ("scaled_fp8",)


class ModelFileError(ValueError):
    """A model file or folder is malformed or of the wrong kind."""


class MissingModelFile(ModelFileError, FileNotFoundError):
    """A required model file or folder does not exist."""


# =============================================================== safetensors checks
_ST_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


@dataclass
class SafetensorsInfo:
    """Header of a checked safetensors file: tensor name -> (dtype string, shape)."""

    path: Path
    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str]
    header_bytes: bytes = field(repr=False, default=b"")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v[1] for k, v in self.tensors.items()}


def check_safetensors(path: str | os.PathLike, what: str) -> SafetensorsInfo:
    """Validate a safetensors file without reading its tensors.

    Checks that it exists, that the JSON header parses, and that the file is as long as
    the header says (a truncated download fails here, not halfway through a load).
    """
    p = Path(path)
    if not p.is_file():
        raise MissingModelFile(f"{what}: file not found: {p}")
    size = p.stat().st_size
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ModelFileError(f"{what}: {p} is {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n <= 0 or 8 + n > size:
                raise ModelFileError(
                    f"{what}: {p} is truncated or not a safetensors file "
                    f"(header claims {n} bytes, file has {size} bytes)"
                )
            header_bytes = f.read(n)
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{what}: {p} has an unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{what}: {p} has a malformed safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, info in header.items():
        try:
            dtype, shape, (start, stop) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{what}: {p} has a malformed entry for tensor {name!r}") from None
        nbytes = _ST_DTYPE_BYTES.get(dtype)
        numel = 1
        for s in shape:
            numel *= s
        if nbytes is not None and stop - start != numel * nbytes:
            raise ModelFileError(f"{what}: {p}: tensor {name!r} has inconsistent size in its header")
        end = max(end, stop)
        tensors[name] = (dtype, shape)
    if 8 + n + end > size:
        raise ModelFileError(
            f"{what}: {p} is truncated: expected {8 + n + end} bytes from its header, found {size} "
            "(incomplete download or copy?)"
        )
    return SafetensorsInfo(p, tensors, dict(metadata), header_bytes)


def file_fingerprint(paths: Iterable[str | os.PathLike]) -> str:
    """Cheap content identity of (large) files: size, header and a few sampled 64 KiB blocks.

    Stable when files are moved or renamed; changes when their content changes.
    """
    h = hashlib.sha256()
    for path in paths:
        p = Path(path)
        size = p.stat().st_size
        h.update(str(size).encode())
        with open(p, "rb") as f:
            if size <= 8 << 20:
                h.update(f.read())
                continue
            for i in range(9):
                f.seek((size - 65536) * i // 8)
                h.update(f.read(65536))
    return h.hexdigest()[:16]


def _load_tensors(
    path: Path,
    names: Iterable[str] | None = None,
    dtype: torch.dtype | None = None,
    rename: Callable[[str], str] | None = None,
) -> dict[str, torch.Tensor]:
    """Read tensors (optionally a subset), dequantising fp8-stored weights to `dtype`."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        wanted = keys if names is None else [k for k in names if k in keys]
        for k in wanted:
            if k.endswith(_QUANT_SUFFIXES) or k in _QUANT_MARKERS or k.endswith(tuple("." + m for m in _QUANT_MARKERS)):
                continue
            t = f.get_tensor(k)
            if t.dtype in _FP8_DTYPES:
                t = t.to(torch.float32)
                base = k[: -len(".weight")] if k.endswith(".weight") else k
                for sfx in (".scale_weight", ".weight_scale"):
                    if base + sfx in keys:
                        t = t * f.get_tensor(base + sfx).to(torch.float32)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[rename(k) if rename else k] = t
    return out


def _is_aux_key(k: str) -> bool:
    return k.endswith(_QUANT_SUFFIXES) or k.split(".")[-1] in _QUANT_MARKERS


# =============================================================== configs
def bundled_config(name: str) -> dict:
    """Read a config shipped in core/models/configs/ (flux-dev, flux-schnell, flux-vae, clip-l, t5-xxl)."""
    p = CONFIG_DIR / f"{name}.json"
    if not p.is_file():
        have = sorted(q.stem for q in CONFIG_DIR.glob("*.json"))
        raise ModelFileError(f"no bundled config named {name!r} in {CONFIG_DIR} (have {have})")
    return json.loads(p.read_text())


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise MissingModelFile(f"{what}: {path} not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{what}: {path} must hold a JSON object")
    return data


def _model_config(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _sidecar_config(path: Path) -> Path | None:
    """`model.safetensors` may carry its config as `model.json` beside it (custom sizes)."""
    p = path.with_suffix(".json")
    return p if p.is_file() else None


_SIDECAR_SECTIONS = ("transformer", "clip_l", "t5xxl", "vae")


def _sidecar_section(path: Path, section: str) -> dict | None:
    """The config for `section` from the sidecar JSON: the whole file, or its `section` entry
    when the file holds several components (all-in-one checkpoints)."""
    side = _sidecar_config(path)
    if side is None:
        return None
    data = _read_json(side, f"config beside {path.name}")
    if any(k in data for k in _SIDECAR_SECTIONS):
        if section not in data:
            return None
        data = data[section]
    return _model_config(data)


# =============================================================== transformer keys
def transformer_key_table(num_layers: int, num_single_layers: int, guidance: bool) -> list[tuple[str, list[str], str]]:
    """(BFL key, diffusers keys, how) for every FLUX transformer parameter.

    how: "same" (one tensor), "cat" (BFL tensor = concatenation of the diffusers tensors
    along dim 0, e.g. fused qkv), "swap" (the two halves exchanged: BFL's final
    modulation is (shift, scale), diffusers' AdaLayerNormContinuous is (scale, shift)).
    """
    rows: list[tuple[str, list[str], str]] = []

    def lin(bfl: str, dif: str, how: str = "same", parts: list[str] | None = None):
        for s in ("weight", "bias"):
            if parts is None:
                rows.append((f"{bfl}.{s}", [f"{dif}.{s}"], how))
            else:
                rows.append((f"{bfl}.{s}", [f"{dif}.{p}.{s}" for p in parts], "cat"))

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    lin("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    lin("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    lin("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    lin("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if guidance:
        lin("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        lin("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    for i in range(num_layers):
        b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{d}.norm1.linear")
        lin(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
        lin(f"{b}.img_attn.qkv", f"{d}.attn", parts=["to_q", "to_k", "to_v"])
        lin(f"{b}.txt_attn.qkv", f"{d}.attn", parts=["add_q_proj", "add_k_proj", "add_v_proj"])
        rows.append((f"{b}.img_attn.norm.query_norm.scale", [f"{d}.attn.norm_q.weight"], "same"))
        rows.append((f"{b}.img_attn.norm.key_norm.scale", [f"{d}.attn.norm_k.weight"], "same"))
        rows.append((f"{b}.txt_attn.norm.query_norm.scale", [f"{d}.attn.norm_added_q.weight"], "same"))
        rows.append((f"{b}.txt_attn.norm.key_norm.scale", [f"{d}.attn.norm_added_k.weight"], "same"))
        lin(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
        lin(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
        lin(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
        lin(f"{b}.img_mlp.2", f"{d}.ff.net.2")
        lin(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
        lin(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for i in range(num_single_layers):
        b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lin(f"{b}.modulation.lin", f"{d}.norm.linear")
        lin(f"{b}.linear1", d, parts=["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"])
        rows.append((f"{b}.norm.query_norm.scale", [f"{d}.attn.norm_q.weight"], "same"))
        rows.append((f"{b}.norm.key_norm.scale", [f"{d}.attn.norm_k.weight"], "same"))
        lin(f"{b}.linear2", f"{d}.proj_out")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear", how="swap")
    return rows


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _count_blocks(keys: Iterable[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ModelFileError(f"{prefix} indices are not contiguous: {sorted(idx)}")
    return max(idx) + 1 if idx else 0


def bfl_to_diffusers_transformer(
    bfl: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, ...]], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Convert a BFL-layout FLUX state dict into diffusers keys.

    `target_shapes` are the diffusers model's parameter shapes (they decide how fused qkv /
    linear1 tensors split). Every BFL key must be used and every target key produced.
    """
    nd = _count_blocks(target_shapes, "transformer_blocks")
    ns = _count_blocks(target_shapes, "single_transformer_blocks")
    guidance = any(k.startswith("time_text_embed.guidance_embedder") for k in target_shapes)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing: list[str] = []
    for bkey, dkeys, how in transformer_key_table(nd, ns, guidance):
        if bkey not in bfl:
            missing.append(bkey)
            continue
        t = bfl[bkey]
        used.add(bkey)
        if how == "cat":
            sizes = [target_shapes[k][0] for k in dkeys]
            if sum(sizes) != t.shape[0]:
                raise ModelFileError(
                    f"{source}: {bkey} has {t.shape[0]} rows, the config expects {sum(sizes)} ({sizes})"
                )
            for k, part in zip(dkeys, torch.split(t, sizes, dim=0)):
                out[k] = part.contiguous()
        elif how == "swap":
            out[dkeys[0]] = _swap_halves(t)
        else:
            out[dkeys[0]] = t
    if missing:
        raise ModelFileError(
            f"{source}: {len(missing)} FLUX transformer tensors missing, e.g. {missing[:3]} "
            "(another architecture, or a config with more blocks than the file?)"
        )
    extra = sorted(k for k in bfl if k not in used and not _is_aux_key(k))
    if extra:
        raise ModelFileError(
            f"{source}: {len(extra)} tensors are not part of this FLUX transformer, e.g. {extra[:3]} "
            "(another architecture, or a config with fewer blocks than the file?)"
        )
    bad = [(k, tuple(v.shape), tuple(target_shapes[k])) for k, v in out.items() if tuple(v.shape) != tuple(target_shapes[k])]
    if bad:
        raise ModelFileError(
            f"{source}: tensor shapes do not match the FLUX config, e.g. {bad[:3]} (name, file, expected)"
        )
    return out


def diffusers_to_bfl_transformer(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `bfl_to_diffusers_transformer`: diffusers FLUX keys -> original BFL keys."""
    nd = _count_blocks(sd, "transformer_blocks")
    ns = _count_blocks(sd, "single_transformer_blocks")
    guidance = any(k.startswith("time_text_embed.guidance_embedder") for k in sd)
    out = {}
    for bkey, dkeys, how in transformer_key_table(nd, ns, guidance):
        if how == "cat":
            out[bkey] = torch.cat([sd[k] for k in dkeys], dim=0)
        elif how == "swap":
            out[bkey] = _swap_halves(sd[dkeys[0]])
        else:
            out[bkey] = sd[dkeys[0]]
    return out


def _transformer_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], layout: str = "bfl") -> dict:
    """Derive a FluxTransformer2DModel config from tensor shapes (sizes only; RoPE axes are
    not stored in weights and are filled in by the caller)."""
    if layout == "bfl":
        names = ("img_in.weight", "double_blocks.0.img_attn.norm.key_norm.scale", "txt_in.weight",
                 "vector_in.in_layer.weight", "final_layer.linear.weight", "guidance_in.in_layer.weight",
                 "double_blocks", "single_blocks")
    else:
        names = ("x_embedder.weight", "transformer_blocks.0.attn.norm_k.weight", "context_embedder.weight",
                 "time_text_embed.text_embedder.linear_1.weight", "proj_out.weight",
                 "time_text_embed.guidance_embedder.linear_1.weight", "transformer_blocks", "single_transformer_blocks")
    img_in, norm_k, txt_in, vec_in, final, guid, dbl, sgl = names
    inner, in_ch = shapes[img_in]
    head_dim = shapes[norm_k][0]
    cfg = {
        "patch_size": 1,
        "in_channels": in_ch,
        "out_channels": None,
        "num_layers": _count_blocks(shapes, dbl),
        "num_single_layers": _count_blocks(shapes, sgl),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": shapes[txt_in][1],
        "pooled_projection_dim": shapes[vec_in][1],
        "guidance_embeds": guid in shapes,
    }
    if shapes[final][0] != in_ch:
        cfg["out_channels"] = shapes[final][0]
    return cfg


_BFL_MARKER = "double_blocks.0.img_attn.norm.key_norm.scale"
_DIFFUSERS_MARKER = "transformer_blocks.0.attn.norm_k.weight"


def _guess_architecture(keys: Iterable[str]) -> str:
    keys = list(keys)
    joined = "\n".join(keys[:5000])
    for pat, name in (
        ("input_blocks.", "a Stable Diffusion 1.x/2.x/XL UNet"),
        ("joint_blocks.", "a Stable Diffusion 3 MMDiT"),
        ("single_stream_modulation", "a FLUX.2 transformer"),
        ("encoder.down.", "a VAE (put it in models/vae)"),
        ("text_model.encoder.", "a CLIP text encoder (models/text_encoders)"),
        ("encoder.block.", "a T5 text encoder (models/text_encoders)"),
        ("lora_", "a LoRA file (models/loras)"),
    ):
        if pat in joined:
            return name
    return "an unknown architecture"


def _strip_prefix(keys: Iterable[str], marker: str) -> str:
    """The prefix in front of `marker` in these keys ('' if none), e.g. 'model.diffusion_model.'."""
    for k in keys:
        if k.endswith(marker):
            return k[: -len(marker)]
    return ""


# =============================================================== VAE keys
_VAE_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.(.*)$", lambda m, n: f"{m[1]}.norm_out.{m[2]}"),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", lambda m, n: f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$", lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$",
     lambda m, n: f"{m[1]}.mid.attn_1." + {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]] + f".{m[3]}"),
    (r"^(.*)$", lambda m, n: m[1]),  # conv_in, conv_out, quant convs keep their names
]


def vae_key_to_bfl(key: str, num_up_blocks: int) -> str:
    """BFL / LDM name of one diffusers AutoencoderKL parameter."""
    for pat, fn in _VAE_RULES:
        m = re.match(pat, key)
        if m:
            return fn(m, num_up_blocks).replace("conv_shortcut", "nin_shortcut")
    raise AssertionError(key)


def bfl_to_diffusers_vae(
    bfl: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple[int, ...]], source: str = "state dict"
) -> dict[str, torch.Tensor]:
    """Convert an LDM/BFL autoencoder state dict (ae.safetensors) into diffusers AutoencoderKL keys."""
    n_up = _count_blocks(target_shapes, "decoder.up_blocks")
    out, missing, bad = {}, [], []
    used = set()
    for dkey, shape in target_shapes.items():
        bkey = vae_key_to_bfl(dkey, n_up)
        if bkey not in bfl:
            missing.append(bkey)
            continue
        t = bfl[bkey]
        used.add(bkey)
        if t.numel() != _numel(shape):
            bad.append((bkey, tuple(t.shape), tuple(shape)))
            continue
        out[dkey] = t.reshape(shape)  # attention 1x1 convs become Linear weights
    if missing:
        raise ModelFileError(f"{source}: {len(missing)} autoencoder tensors missing, e.g. {missing[:3]}")
    if bad:
        raise ModelFileError(f"{source}: autoencoder shapes do not match the FLUX VAE config, e.g. {bad[:3]} (name, file, expected)")
    extra = sorted(k for k in bfl if k not in used and not _is_aux_key(k))
    if extra:
        raise ModelFileError(f"{source}: {len(extra)} tensors are not part of this autoencoder, e.g. {extra[:3]}")
    return out


def diffusers_to_bfl_vae(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of `bfl_to_diffusers_vae` (attention projections stored as 1x1 convs, as in ae.safetensors)."""
    n_up = _count_blocks(sd, "decoder.up_blocks")
    out = {}
    for k, v in sd.items():
        b = vae_key_to_bfl(k, n_up)
        if ".mid.attn_1." in b and b.endswith(".weight") and v.ndim == 2:
            v = v[:, :, None, None]
        out[b] = v
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# =============================================================== file records
@dataclass
class FluxFiles:
    """Where every FLUX component lives, after checking; nothing is loaded yet.

    route: "diffusers" (a pipeline folder) or "single_file" (ComfyUI / BFL files).
    Per-component entries are paths; configs are plain dicts in diffusers form.
    """

    route: str
    transformer: list[Path]
    transformer_layout: str  # "bfl" | "diffusers"
    transformer_config: dict
    clip: list[Path] | None
    clip_config: dict | None
    t5: list[Path] | None
    t5_config: dict | None
    clip_tokenizer: Path | None
    t5_tokenizer: Path | None
    vae: list[Path] | None
    vae_layout: str | None
    vae_config: dict | None
    scheduler_config: dict
    variant: str  # "flux-dev", "flux-schnell" or "custom"
    root: Path | None = None
    _ids: dict = field(default_factory=dict, repr=False)

    @property
    def max_sequence_length(self) -> int:
        return 256 if self.variant == "flux-schnell" else 512

    def transformer_identity(self) -> dict:
        """Identity of the base transformer weights (written into LoRA files)."""
        if "transformer" not in self._ids:
            self._ids["transformer"] = {
                "variant": self.variant,
                "route": self.route,
                "name": self.root.name if self.route == "diffusers" and self.root else self.transformer[0].name,
                "fingerprint": file_fingerprint(self.transformer),
            }
        return dict(self._ids["transformer"])

    def text_encoder_identity(self) -> str:
        """Content identity of CLIP + T5 + tokenizers (the embedding-cache key)."""
        if "text" not in self._ids:
            self._require_text()
            tok_files = sorted(
                q for d in (self.clip_tokenizer, self.t5_tokenizer) for q in Path(d).rglob("*") if q.is_file()
            )
            self._ids["text"] = file_fingerprint([*self.clip, *self.t5, *tok_files])
        return self._ids["text"]

    def _require_text(self):
        if not (self.clip and self.t5 and self.clip_tokenizer and self.t5_tokenizer):
            raise MissingModelFile(
                "text encoders were not given: pass clip_l / t5xxl files and tokenizer folders "
                "(or use a diffusers FLUX folder)"
            )

    def _require_vae(self):
        if not self.vae:
            raise MissingModelFile("no autoencoder was given: pass the FLUX ae.safetensors (ComfyUI models/vae)")


def _diffusers_weights(folder: Path, part: str, stem: str) -> list[Path]:
    """Weight files of one diffusers component (single file or sharded with an index)."""
    what = f"{DIFFUSERS_PARTS.get(part, part)} in {folder.parent}"
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        idx = _read_json(index, what)
        names = sorted(set((idx.get("weight_map") or {}).values()))
        if not names:
            raise ModelFileError(f"{what}: {index} has no weight_map")
        files = [folder / n for n in names]
    else:
        raise MissingModelFile(
            f"{what}: no weights found; expected {single.name} or {index.name} in {folder}"
        )
    for f in files:
        check_safetensors(f, what)
    return files


def _check_tokenizer_dir(d: Path, what: str, kind: str) -> Path:
    if not d.is_dir():
        raise MissingModelFile(f"{what}: folder not found: {d}")
    names = {p.name for p in d.iterdir()}
    ok = "tokenizer.json" in names or (
        {"vocab.json", "merges.txt"} <= names if kind == "clip" else "spiece.model" in names
    )
    if not ok:
        need = "vocab.json + merges.txt (or tokenizer.json)" if kind == "clip" else "spiece.model or tokenizer.json"
        raise MissingModelFile(f"{what}: {d} holds no tokenizer files; expected {need}, found {sorted(names)}")
    return d


def _resolve_local(path: str | os.PathLike) -> Path:
    """A local folder; a hub id ("owner/name") resolves only from the local HF cache."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        try:
            from huggingface_hub import snapshot_download

            # local_files_only: a cache lookup, never a download (HF_HUB_OFFLINE or not).
            return Path(snapshot_download(s, local_files_only=True))
        except Exception:
            from huggingface_hub.constants import HF_HUB_CACHE

            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            raise MissingModelFile(
                f"{s!r} is neither a local folder nor in the local Hugging Face cache ({HF_HUB_CACHE}); "
                f"nothing is downloaded{' (HF_HUB_OFFLINE is set)' if offline else ''}. "
                "Download the FLUX folder first and pass its path."
            ) from None
    raise MissingModelFile(f"FLUX model folder not found: {p}")


def flux_files_from_diffusers(folder: str | os.PathLike, parts: Iterable[str] | None = None) -> FluxFiles:
    """Check a diffusers FLUX pipeline folder (FLUX.1-dev layout) and return its `FluxFiles`.

    parts: the components needed (default all of transformer, text_encoder, text_encoder_2,
    tokenizer, tokenizer_2, vae, scheduler); missing parts you did not ask for stay None.
    """
    root = _resolve_local(folder)
    if not root.is_dir():
        raise ModelFileError(f"expected a diffusers FLUX folder, got a file: {root}")
    want = set(parts or DIFFUSERS_PARTS)
    unknown = want - set(DIFFUSERS_PARTS)
    if unknown:
        raise ValueError(f"unknown FLUX folder parts {sorted(unknown)}; choose from {list(DIFFUSERS_PARTS)}")
    absent = [p for p in DIFFUSERS_PARTS if p in want and not (root / p).is_dir()]
    if absent:
        raise MissingModelFile(
            f"FLUX folder {root} is missing {', '.join(f'{p}/ ({DIFFUSERS_PARTS[p]})' for p in absent)}; "
            f"expected the diffusers FLUX.1-dev layout with {', '.join(p + '/' for p in DIFFUSERS_PARTS)}"
        )

    def cfg(part: str, name: str = "config.json") -> dict:
        return _read_json(root / part / name, f"{DIFFUSERS_PARTS[part]} config")

    tcfg = _model_config(cfg("transformer"))
    files = _diffusers_weights(root / "transformer", "transformer", "diffusion_pytorch_model")
    _check_transformer_shapes(files, tcfg, "diffusers")
    clip = t5 = vae = None
    ccfg = t5cfg = vcfg = None
    if "text_encoder" in want:
        ccfg = _model_config(cfg("text_encoder"))
        clip = _diffusers_weights(root / "text_encoder", "text_encoder", "model")
    if "text_encoder_2" in want:
        t5cfg = _model_config(cfg("text_encoder_2"))
        t5 = _diffusers_weights(root / "text_encoder_2", "text_encoder_2", "model")
    if "vae" in want:
        vcfg = _model_config(cfg("vae"))
        vae = _diffusers_weights(root / "vae", "vae", "diffusion_pytorch_model")
        if vcfg.get("latent_channels") != tcfg.get("in_channels", 64) // 4:
            raise ModelFileError(
                f"{root / 'vae' / 'config.json'}: latent_channels={vcfg.get('latent_channels')}, "
                f"the transformer needs {tcfg.get('in_channels', 64) // 4}"
            )
    tok1 = _check_tokenizer_dir(root / "tokenizer", "CLIP tokenizer", "clip") if "tokenizer" in want else None
    tok2 = _check_tokenizer_dir(root / "tokenizer_2", "T5 tokenizer", "t5") if "tokenizer_2" in want else None
    sched = (
        _model_config(cfg("scheduler", "scheduler_config.json")) if "scheduler" in want else {}
    )
    variant = "flux-dev" if tcfg.get("guidance_embeds") else "flux-schnell"
    if tcfg.get("num_layers") != 19 or tcfg.get("attention_head_dim") != 128:
        variant = "custom"
    return FluxFiles(
        route="diffusers", transformer=files, transformer_layout="diffusers", transformer_config=tcfg,
        clip=clip, clip_config=ccfg, t5=t5, t5_config=t5cfg, clip_tokenizer=tok1, t5_tokenizer=tok2,
        vae=vae, vae_layout="diffusers" if vae else None, vae_config=vcfg, scheduler_config=sched,
        variant=variant, root=root,
    )


def _transformer_shapes(cfg: Mapping) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a FluxTransformer2DModel with this config (built on the meta device)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel.from_config(dict(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_transformer_shapes(files: list[Path], cfg: Mapping, layout: str) -> None:
    infos = [check_safetensors(f, "FLUX transformer") for f in files]
    shapes: dict[str, tuple[int, ...]] = {}
    for info in infos:
        shapes.update(info.shapes())
    src = ", ".join(str(f) for f in files)
    if layout == "diffusers":
        expected = _transformer_shapes(cfg)
        missing = sorted(set(expected) - set(shapes))
        if _DIFFUSERS_MARKER not in shapes:
            raise ModelFileError(
                f"{src}: not a FLUX transformer in diffusers layout (looks like {_guess_architecture(shapes)})"
            )
        bad = [(k, shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]]
        if missing or bad:
            raise ModelFileError(
                f"{src}: weights do not match the transformer config "
                f"(missing {missing[:3]}, wrong shapes {bad[:3]} as (name, file, expected))"
            )


def _resolve_transformer_config(
    path: Path, shapes: Mapping[str, tuple[int, ...]], config: str | Mapping | os.PathLike | None, layout: str = "bfl"
) -> tuple[dict, str]:
    """Config for a single file: explicit > sidecar JSON > bundled config matching the shapes
    > sizes derived from the shapes (head dim 128 only: FLUX.1's RoPE axes 16/56/56)."""
    if config is not None:
        variant = "custom"
        if isinstance(config, Mapping):
            cfg = dict(config)
        elif isinstance(config, str) and (CONFIG_DIR / f"{config}.json").is_file():
            cfg = bundled_config(config)
            variant = config if config in ("flux-dev", "flux-schnell") else "custom"
        else:
            cfg = _read_json(Path(config), "FLUX transformer config")
        cfg = dict(cfg.get("transformer", cfg))
    elif (side := _sidecar_section(path, "transformer")) is not None:
        cfg, variant = side, "custom"
    else:
        derived = _transformer_config_from_shapes(shapes, layout)
        cfg, variant = None, "custom"
        for name in ("flux-dev", "flux-schnell"):
            c = bundled_config(name)["transformer"]
            if all(derived[k] == c.get(k, derived[k]) for k in derived if k != "out_channels"):
                cfg, variant = dict(c), name
                break
        if cfg is None:
            if derived["attention_head_dim"] != 128:
                raise ModelFileError(
                    f"{path}: FLUX-architecture transformer with head dim {derived['attention_head_dim']} "
                    f"and {derived['num_layers']}+{derived['num_single_layers']} blocks matches neither bundled "
                    f"config (flux-dev, flux-schnell in {CONFIG_DIR}); pass config= or put "
                    f"{path.with_suffix('.json').name} (a FluxTransformer2DModel config) beside it"
                )
            cfg = dict(derived, axes_dims_rope=[16, 56, 56])
    cfg = _model_config(cfg)
    return cfg, variant


def _find_in(dirs: Iterable[Path], name: str | os.PathLike, what: str) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists():
        if not p.is_file():
            raise MissingModelFile(f"{what}: file not found: {p}")
        return p
    looked = []
    for d in dirs:
        q = d / name
        looked.append(str(d))
        if q.is_file():
            return q
    raise MissingModelFile(f"{what}: {name} not found; looked in {looked}")


def _comfy_root_of(path: Path) -> Path | None:
    for parent in path.resolve().parents:
        if parent.name == "models" and (parent.parent / "comfy").is_dir():
            return parent.parent
    mod = sys.modules.get("comfy")  # only if ComfyUI is already running us; never imported here
    if mod is not None and getattr(mod, "__file__", None):
        return Path(mod.__file__).resolve().parent.parent
    return None


def _find_tokenizer(kind: str, tokenizers: Path | None, comfy_root: Path | None) -> Path:
    """Tokenizer folder: explicit > bundled copy > the ComfyUI install."""
    names = {"clip_l": ("clip_l", "tokenizer", "sd1_tokenizer"), "t5xxl": ("t5xxl", "tokenizer_2", "t5_tokenizer")}[kind]
    tk = "clip" if kind == "clip_l" else "t5"
    what = "CLIP-L tokenizer" if kind == "clip_l" else "T5-XXL tokenizer"
    candidates: list[Path] = []
    if tokenizers is not None:
        candidates += [tokenizers / n for n in names]
    candidates += [BUNDLED_TOKENIZERS / kind]
    if comfy_root is not None:
        candidates += [comfy_root / rel for rel in COMFY_TOKENIZER_DIRS[kind]]
    for c in candidates:
        if c.is_dir():
            return _check_tokenizer_dir(c, what, tk)
    raise MissingModelFile(
        f"{what} not found; looked in {[str(c) for c in candidates]}. Pass tokenizers= (a folder with "
        f"{names[0]}/ or {names[1]}/ inside), or comfyui_root= (ComfyUI ships them in "
        f"{COMFY_TOKENIZER_DIRS[kind][0]}/)"
    )


# Suffixes that identify each text encoder regardless of the key prefix ('text_model.' in
# transformers 4 / ComfyUI files, none in transformers 5, 'cond_stage_model.transformer.' ...).
_TEXT_MARKERS = {
    "clip_l": ("embeddings.token_embedding.weight", "final_layer_norm.weight"),
    "t5xxl": ("encoder.final_layer_norm.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
}


def _text_config_single(path: Path, info: SafetensorsInfo, kind: str) -> dict:
    side = _sidecar_section(path, kind)
    if side is not None:
        return side
    cfg = _model_config(bundled_config("clip-l" if kind == "clip_l" else "t5-xxl"))
    shapes = info.shapes()
    key = "embeddings.token_embedding.weight" if kind == "clip_l" else "shared.weight"
    have = next((v for k, v in shapes.items() if k.endswith(key)), None)
    want = (cfg["vocab_size"], cfg["hidden_size"] if kind == "clip_l" else cfg["d_model"])
    if have is not None and tuple(have) != want:
        raise ModelFileError(
            f"{path}: {key} has shape {tuple(have)}, the bundled {kind} config expects {want}; "
            f"put a config {path.with_suffix('.json').name} beside it for other sizes"
        )
    return cfg


def _text_prefix(info: SafetensorsInfo, kind: str) -> None:
    shapes = info.shapes()
    guess = (
        "a CLIP-L text encoder (clip_l.safetensors, text_model.* keys)"
        if kind == "clip_l"
        else "a T5 encoder (t5xxl_fp16.safetensors, encoder.block.* keys)"
    )
    if not all(any(k.endswith(m) for k in shapes) for m in _TEXT_MARKERS[kind]):
        raise ModelFileError(f"{info.path}: expected {guess}; this file looks like {_guess_architecture(shapes)}")


def flux_files_from_single_files(
    transformer: str | os.PathLike,
    clip_l: str | os.PathLike | None = None,
    t5xxl: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    tokenizers: str | os.PathLike | None = None,
    comfyui_root: str | os.PathLike | None = None,
    config: str | Mapping | os.PathLike | None = None,
) -> FluxFiles:
    """Check ComfyUI-style single files and return their `FluxFiles`.

    transformer: FLUX transformer safetensors in BFL key layout (optionally prefixed with
    'model.diffusion_model.', bf16/fp16/fp32 or fp8-stored) or in diffusers layout.
    clip_l / t5xxl: text encoders (HF key layout, as ComfyUI's clip_l / t5xxl files).
    vae: BFL ae.safetensors. Configs: `config` (bundled name, dict or JSON path) >
    `<file>.json` beside a file > the bundled FLUX.1-dev / schnell configs matched by shape.
    Tokenizers: `tokenizers` folder > bundled copy > the ComfyUI install (comfyui_root,
    or found from the file's models/ folder).
    """
    tpath = Path(transformer).expanduser()
    info = check_safetensors(tpath, "FLUX transformer")
    shapes = info.shapes()
    if any(k.endswith(_BFL_MARKER) for k in shapes):
        layout = "bfl"
        pre = _strip_prefix(shapes, _BFL_MARKER)
        bshapes = {k[len(pre):]: v for k, v in shapes.items() if k.startswith(pre)}
        needed = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                  "double_blocks.0.img_attn.norm.key_norm.scale")
        gone = [k for k in needed if k not in bshapes]
        if gone:
            raise ModelFileError(f"{tpath}: BFL FLUX transformer is missing {gone}")
        tcfg, variant = _resolve_transformer_config(tpath, bshapes, config)
        target = _transformer_shapes(tcfg)
        # Dry-run the conversion on shapes only: architecture mismatches fail before any load.
        fake = {k: torch.empty(v, device="meta") for k, v in bshapes.items()}
        bfl_to_diffusers_transformer(fake, target, source=str(tpath))
    elif _DIFFUSERS_MARKER in shapes:
        layout = "diffusers"
        try:
            tcfg, variant = _resolve_transformer_config(tpath, shapes, config, layout="diffusers")
        except KeyError as e:
            raise ModelFileError(f"{tpath}: diffusers-layout FLUX transformer is missing {e}") from None
        _check_transformer_shapes([tpath], tcfg, "diffusers")
    else:
        raise ModelFileError(
            f"{tpath}: not a FLUX.1 transformer (no double_blocks.* tensors); it looks like "
            f"{_guess_architecture(shapes)}. Expected a FLUX.1-dev/schnell file such as flux1-dev.safetensors "
            "from ComfyUI models/diffusion_models or models/unet"
        )
    root = Path(comfyui_root).expanduser() if comfyui_root else _comfy_root_of(tpath)
    clip = t5 = vae_files = None
    ccfg = t5cfg = vcfg = None
    tok1 = tok2 = None
    tok_dir = Path(tokenizers) if tokenizers else None

    def text_encoder(path, kind: str, what: str):
        """Check one single-file text encoder: (files, config, tokenizer folder)."""
        p = Path(path).expanduser()
        info = check_safetensors(p, what)
        _text_prefix(info, kind)
        return [p], _text_config_single(p, info, kind), _find_tokenizer(kind, tok_dir, root)

    if clip_l is not None:
        clip, ccfg, tok1 = text_encoder(clip_l, "clip_l", "CLIP-L text encoder")
    if t5xxl is not None:
        t5, t5cfg, tok2 = text_encoder(t5xxl, "t5xxl", "T5-XXL text encoder")
    if vae is not None:
        vpath = Path(vae).expanduser()
        vinfo = check_safetensors(vpath, "FLUX autoencoder")
        vshapes = vinfo.shapes()
        vcfg = _sidecar_section(vpath, "vae") or _model_config(bundled_config("flux-vae"))
        vpre = _strip_prefix(vshapes, "decoder.conv_in.weight")
        vshapes = {k[len(vpre):]: v for k, v in vshapes.items() if k.startswith(vpre)}
        if "decoder.conv_in.weight" not in vshapes:
            raise ModelFileError(
                f"{vpath}: not an autoencoder (no decoder.conv_in.weight); it looks like {_guess_architecture(vshapes)}"
            )
        zc = vshapes["decoder.conv_in.weight"][1]
        if zc != vcfg["latent_channels"]:
            raise ModelFileError(
                f"{vpath}: autoencoder with {zc} latent channels; FLUX needs {vcfg['latent_channels']} "
                "(is this an SD/SDXL VAE? use the FLUX ae.safetensors)"
            )
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            target = {k: tuple(v.shape) for k, v in AutoencoderKL.from_config(vcfg).state_dict().items()}
        bfl_to_diffusers_vae({k: torch.empty(v, device="meta") for k, v in vshapes.items()}, target, source=str(vpath))
        vae_files = [vpath]
    sched = dict(bundled_config(variant if variant in ("flux-dev", "flux-schnell") else
                                ("flux-dev" if tcfg.get("guidance_embeds") else "flux-schnell"))["scheduler"])
    return FluxFiles(
        route="single_file", transformer=[tpath], transformer_layout=layout, transformer_config=tcfg,
        clip=clip, clip_config=ccfg, t5=t5, t5_config=t5cfg, clip_tokenizer=tok1, t5_tokenizer=tok2,
        vae=vae_files, vae_layout="bfl" if vae_files else None, vae_config=vcfg,
        scheduler_config=_model_config(sched), variant=variant, root=root,
    )


def flux_files_from_comfyui(
    comfyui_root: str | os.PathLike,
    transformer: str = "flux1-dev.safetensors",
    clip_l: str | None = "clip_l.safetensors",
    t5xxl: str | None = "t5xxl_fp16.safetensors",
    vae: str | None = "ae.safetensors",
    tokenizers: str | os.PathLike | None = None,
    config: str | Mapping | os.PathLike | None = None,
) -> FluxFiles:
    """Find FLUX files by name in a ComfyUI install (models/diffusion_models|unet,
    models/text_encoders|clip, models/vae) and check them; tokenizers from comfy/."""
    root = Path(comfyui_root).expanduser()
    if not (root / "models").is_dir():
        raise MissingModelFile(f"not a ComfyUI folder (no models/ inside): {root}")

    def dirs(kind):
        return [root / "models" / d for d in COMFY_DIRS[kind]]

    return flux_files_from_single_files(
        transformer=_find_in(dirs("transformer"), transformer, "FLUX transformer"),
        clip_l=_find_in(dirs("text_encoder"), clip_l, "CLIP-L text encoder") if clip_l else None,
        t5xxl=_find_in(dirs("text_encoder"), t5xxl, "T5-XXL text encoder") if t5xxl else None,
        vae=_find_in(dirs("vae"), vae, "FLUX autoencoder") if vae else None,
        tokenizers=tokenizers,
        comfyui_root=root,
        config=config,
    )


def find_flux_files(path: str | os.PathLike, **single_file_kwargs) -> FluxFiles:
    """A diffusers FLUX folder, or (given a .safetensors path) the single-file route."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        return flux_files_from_single_files(p, **single_file_kwargs)
    return flux_files_from_diffusers(p)


# =============================================================== loading
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
        raise ModelFileError(f"{what}: weights do not fit the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
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


def load_vae(files: FluxFiles, dtype: torch.dtype | str = "auto", device="cpu", slicing: bool = True, tiling: bool = False):
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


@dataclass
class FluxStack:
    """What the engine needs: the policy, `encode(prompts)` and `decode(latents)`."""

    files: FluxFiles
    policy: FluxPolicy
    encode: Callable
    decode: Callable

    @property
    def latent_channels(self) -> int:
        return self.policy.latent_channels


def load_flux(
    source: str | os.PathLike | FluxFiles,
    lora: LoraSettings | None = None,
    cache_dir: str | os.PathLike | None = None,
    device="cpu",
    dtype: torch.dtype | str = "auto",
    guidance: float | None = None,
    max_sequence_length: int | None = None,
    gradient_checkpointing: bool = False,
    compile: bool = False,
    vae_slicing: bool = True,
    vae_tiling: bool = False,
    **single_file_kwargs,
) -> FluxStack:
    """Everything for training from one call: policy (LoRA), cached text encoding, VAE decode.

    Text encoders are only built when a prompt is missing from the embedding cache, and
    freed right after; the VAE is loaded now (decode runs every iteration).
    """
    from .text import FluxTextEncoder
    from .vae import FluxDecoder

    files = source if isinstance(source, FluxFiles) else find_flux_files(source, **single_file_kwargs)
    policy = load_flux_policy(files, lora=lora, guidance=guidance, dtype=dtype, device=device,
                              gradient_checkpointing=gradient_checkpointing, compile=compile)
    encoder = FluxTextEncoder(files, cache_dir=cache_dir, max_sequence_length=max_sequence_length,
                              device=device, dtype=dtype)
    decoder = FluxDecoder(load_vae(files, dtype=dtype, device=device, slicing=vae_slicing, tiling=vae_tiling))
    return FluxStack(files=files, policy=policy, encode=encoder, decode=decoder)
