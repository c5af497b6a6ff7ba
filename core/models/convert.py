"""Key conversion between the BFL layout (ComfyUI / BFL single files) and diffusers' layout,
for the FLUX transformer and the autoencoder, in both directions.

The transformer table (`transformer_key_table`) is our own: diffusers' converter fixes the width to
3072, ours reads the sizes from the target shapes, so it also serves the small test models. The
autoencoder's BFL -> diffusers direction is diffusers' own converter behind our checks; the rule
table `_VAE_RULES` gives the expected BFL names and the inverse direction (writing BFL files).
"""

from __future__ import annotations

import re
from typing import Iterable, Mapping

import torch

from .weights import ModelFileError, _is_aux_key


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
    bad = [
        (k, tuple(v.shape), tuple(target_shapes[k]))
        for k, v in out.items()
        if tuple(v.shape) != tuple(target_shapes[k])
    ]
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
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)$",
     lambda m, n: f"encoder.down.{m[1]}.downsample.conv.{m[2]}"),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}.{m[3]}"),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$",
     lambda m, n: f"decoder.up.{n - 1 - int(m[1])}.upsample.conv.{m[2]}"),
    (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)$", lambda m, n: f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)$",
     lambda m, n: (f"{m[1]}.mid.attn_1."
                   + {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}[m[2]]
                   + f".{m[3]}")),
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
    """Convert an LDM/BFL autoencoder state dict (ae.safetensors) into diffusers AutoencoderKL keys.

    diffusers' own converter does the renaming; we add the checks it lacks (missing, foreign and
    misshapen tensors are named with the file) and size it from the target, not a fixed config."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    n_up = _count_blocks(target_shapes, "decoder.up_blocks")
    expected = {vae_key_to_bfl(k, n_up) for k in target_shapes}
    missing = sorted(expected - set(bfl))
    if missing:
        raise ModelFileError(f"{source}: {len(missing)} autoencoder tensors missing, e.g. {missing[:3]}")
    blocks = {"down_block_types": [None] * _count_blocks(target_shapes, "encoder.down_blocks"),
              "up_block_types": [None] * n_up}
    out = convert_ldm_vae_checkpoint({k: bfl[k] for k in expected}, blocks)
    bad = [(k, tuple(out[k].shape) if k in out else None, tuple(shape)) for k, shape in target_shapes.items()
           if k not in out or tuple(out[k].shape) != tuple(shape)]
    if bad:
        raise ModelFileError(
            f"{source}: autoencoder shapes do not match the FLUX VAE config, e.g. {bad[:3]} (name, file, expected)"
        )
    extra = sorted(k for k in bfl if k not in expected and not _is_aux_key(k))
    if extra:
        raise ModelFileError(f"{source}: {len(extra)} tensors are not part of this autoencoder, e.g. {extra[:3]}")
    return {k: out[k] for k in target_shapes}


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
