"""LoRA files in the diffusers/peft FLUX format.

Keys: "transformer.<module>.lora_A.weight" [r, in], "transformer.<module>.lora_B.weight"
[out, r] and "transformer.<module>.alpha" (scalar). diffusers' FluxPipeline.load_lora_weights
and ComfyUI's LoraLoader both read this (the ".alpha" keys give scale alpha / r in both).
Training information sits in the safetensors header metadata under "treerpo.*" keys.

A policy with a file layout of its own (``lora_file_state_dict`` / ``load_lora_file_state_dict``,
``lora_file_format``: the one over ComfyUI's MODEL, nodes/comfy_flux.py) is saved in that layout;
ComfyUI's key format ("diffusion_model.<module>.lora_up.weight" [out, r], ".lora_down.weight"
[r, in], ".alpha") is read back into such a policy and refused, in one line, by Load FLUX's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..checkpoint import atomic_save_safetensors
from .flux_policy import ADAPTER_NAME, FluxPolicy, LoraSettings
from .weights import ModelFileError, check_safetensors

PREFIX = "transformer."
META_PREFIX = "treerpo."
COMFY_PREFIX = "diffusion_model."  # ComfyUI's key format (its Train LoRA; the ComfyUI-MODEL route)
COMFY_PARTS = (".lora_up.weight", ".lora_down.weight", ".alpha")


def _module_of(param_name: str) -> tuple[str, str] | None:
    """'a.b.lora_A.default.weight' -> ('a.b', 'lora_A')."""
    for part in ("lora_A", "lora_B"):
        tag = f".{part}.{ADAPTER_NAME}.weight"
        if param_name.endswith(tag):
            return param_name[: -len(tag)], part
    return None


def lora_state_dict(policy: FluxPolicy, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The policy's LoRA as a diffusers-format state dict (with ".alpha" entries). A policy with a file
    layout of its own (``policy.lora_file_state_dict(dtype)``, e.g. the one over ComfyUI's MODEL, whose
    LoRA is saved in ComfyUI's key format) gives that instead."""
    own = getattr(policy, "lora_file_state_dict", None)
    if callable(own):
        return own(dtype)
    if not policy.has_lora:
        raise ValueError("this FluxPolicy has no LoRA adapter (built with lora=None)")
    out: dict[str, torch.Tensor] = {}
    alpha = torch.tensor(float(policy.lora_settings.alpha), dtype=torch.float32)
    for name, p in policy.lora_parameters().items():
        mp = _module_of(name)
        if mp is None:
            continue
        module, part = mp
        out[f"{PREFIX}{module}.{part}.weight"] = p.detach().to("cpu", dtype).contiguous()
        out[f"{PREFIX}{module}.alpha"] = alpha.clone()
    return out


def save_lora(
    path: str | os.PathLike,
    policy: FluxPolicy,
    *,
    preset: str | None = None,
    settings: Mapping[str, Any] | None = None,
    iteration: int | None = None,
    reward_stats: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the policy's LoRA atomically (temp file + rename) with training metadata.

    Metadata: rank, alpha, targets, base model identity, preset, settings (JSON), iteration,
    reward statistics (JSON). `dtype` (fp32 default) may be torch.bfloat16 to halve the size.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA files are written as .safetensors, got {path.name}")
    s = policy.lora_settings
    sd = lora_state_dict(policy, dtype=dtype)
    meta = {
        "format": "pt",
        f"{META_PREFIX}format": getattr(policy, "lora_file_format", "diffusers-peft-flux-lora-v1"),
        f"{META_PREFIX}rank": str(s.rank),
        f"{META_PREFIX}alpha": repr(float(s.alpha)),
        f"{META_PREFIX}targets": json.dumps(list(s.targets)),
        f"{META_PREFIX}base_model": json.dumps(policy.base_identity, sort_keys=True, default=str),
        f"{META_PREFIX}guidance": repr(float(policy.guidance)),
    }
    if preset is not None:
        meta[f"{META_PREFIX}preset"] = str(preset)
    if settings is not None:
        meta[f"{META_PREFIX}settings"] = json.dumps(dict(settings), sort_keys=True, default=str)
    if iteration is not None:
        meta[f"{META_PREFIX}iteration"] = str(int(iteration))
    if reward_stats is not None:
        meta[f"{META_PREFIX}reward_stats"] = json.dumps(dict(reward_stats), sort_keys=True, default=str)
    for k, v in (extra or {}).items():
        meta[f"{META_PREFIX}{k}"] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    atomic_save_safetensors(sd, path, metadata=meta)
    return path


def read_lora_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The "treerpo.*" metadata of a LoRA file, JSON values decoded (prefix removed)."""
    info = check_safetensors(path, "LoRA file")
    out: dict[str, Any] = {}
    for k, v in info.metadata.items():
        if not k.startswith(META_PREFIX):
            continue
        name = k[len(META_PREFIX):]
        try:
            out[name] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            out[name] = v
    return out


def _read_lora_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """(weights keyed '<module>.lora_A|B', alphas keyed '<module>') from a LoRA file."""
    from safetensors.torch import load_file

    info = check_safetensors(path, "LoRA file")
    if not any(".lora_A." in k or ".lora_B." in k for k in info.tensors):
        kohya = any(".lora_down." in k for k in info.tensors)
        raise ModelFileError(
            f"{path}: not a diffusers/peft LoRA (no '*.lora_A.weight' keys)"
            + ("; kohya-format (lora_down/lora_up) files are not supported for continued training" if kohya else "")
        )
    raw = load_file(str(path))
    weights, alphas = {}, {}
    for k, v in raw.items():
        name = k[len(PREFIX):] if k.startswith(PREFIX) else k
        if name.endswith(".alpha"):
            alphas[name[: -len(".alpha")]] = float(v)
        elif name.endswith((".lora_A.weight", ".lora_B.weight")):
            weights[name[: -len(".weight")]] = v
        else:
            raise ModelFileError(f"{path}: unexpected tensor {k!r} in a FLUX LoRA file")
    return weights, alphas


def _is_comfy_format(keys) -> bool:
    return any(k.startswith(COMFY_PREFIX) and k.endswith(".lora_up.weight") for k in keys)


def _read_comfy_lora(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA in ComfyUI's key format; any other key raises ModelFileError."""
    from safetensors.torch import load_file

    raw = load_file(str(path))
    bad = [k for k in raw if not (k.startswith(COMFY_PREFIX) and k.endswith(COMFY_PARTS))]
    if bad:
        raise ModelFileError(f"{path}: unexpected tensors {bad[:3]} in a LoRA in ComfyUI's key format "
                             f"(expected diffusion_model.<layer>.lora_up.weight / .lora_down.weight / .alpha)")
    return raw


def _comfy_settings(path: Path) -> LoraSettings:
    raw = _read_comfy_lora(path)
    meta = read_lora_metadata(path)
    ranks = {v.shape[0] for k, v in raw.items() if k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in raw.items() if k.endswith(".alpha")} or {float(meta.get("alpha", min(ranks)))}
    if len(ranks) != 1 or len(alphas) != 1:
        raise ModelFileError(f"{path}: LoRA with mixed ranks {sorted(ranks)} or alphas {sorted(alphas)} is not "
                             f"supported for continued training")
    targets = meta.get("targets")
    if not targets:  # layer suffixes: 'diffusion_model.double_blocks.3.img_attn.qkv' -> 'img_attn.qkv'
        mods = {k[len(COMFY_PREFIX):].rsplit(".lora_", 1)[0] for k in raw if ".lora_" in k}
        targets = sorted({m.split(".", 2)[2] if m.split(".")[1].isdigit() else m for m in mods})
    return LoraSettings(rank=ranks.pop(), alpha=alphas.pop(), targets=targets)


def _load_comfy_lora(path: Path, policy) -> None:
    """ComfyUI-format file -> a policy with that file layout; every key checked before any copy."""
    expected = policy.lora_file_state_dict(torch.float32)
    raw = _read_comfy_lora(path)
    unknown = sorted(set(raw) - set(expected))
    missing = sorted(set(expected) - set(raw))
    wrong = [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in raw.items()
             if k in expected and not k.endswith(".alpha") and v.shape != expected[k].shape]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys match no LoRA layer of the model, e.g. {unknown[:3]}")
    if wrong:
        problems.append(f"shape mismatches (key, file, model), e.g. {wrong[:3]} (different rank or model size?)")
    if missing:
        problems.append(f"{len(missing)} LoRA layers of the model are absent from the file, e.g. {missing[:3]}")
    if problems:
        raise ModelFileError(f"{path}: LoRA does not match this policy (rank {policy.lora_settings.rank}, targets "
                             f"{list(policy.lora_settings.targets)}): " + "; ".join(problems))
    own_alpha = float(policy.lora_settings.alpha)
    out = {}
    for k, v in raw.items():
        if k.endswith(".lora_up.weight"):  # a file alpha other than the policy's is folded into lora_up
            module = k[: -len(".lora_up.weight")]
            v = v.float() * (float(raw.get(module + ".alpha", own_alpha)) / own_alpha)
        if not k.endswith(".alpha"):
            out[k] = v
    policy.load_lora_file_state_dict(out)


def lora_settings_from_file(path: str | os.PathLike) -> LoraSettings:
    """Rank, alpha and targets of an existing LoRA file (to build a matching policy); diffusers format,
    or ComfyUI's key format (targets are then ComfyUI layer names, for ComfyFluxPolicy)."""
    path = Path(path)
    if _is_comfy_format(check_safetensors(path, "LoRA file").tensors):
        return _comfy_settings(path)
    weights, alphas = _read_lora_tensors(path)
    meta = read_lora_metadata(path)
    ranks = {v.shape[0] for k, v in weights.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise ModelFileError(f"{path}: LoRA with mixed ranks {sorted(ranks)} is not supported for continued training")
    rank = ranks.pop()
    alpha_set = set(alphas.values()) or {float(meta.get("alpha", rank))}
    if len(alpha_set) != 1:
        raise ModelFileError(f"{path}: LoRA with per-module alphas {sorted(alpha_set)} is not supported")
    targets = meta.get("targets")
    if not targets:
        # Suffixes from the module names: strip the block prefix (e.g. 'transformer_blocks.3.').
        mods = {k.rsplit(".", 1)[0] for k in weights}
        targets = sorted({m.split(".", 2)[2] if m.split(".")[1].isdigit() else m for m in mods})
    return LoraSettings(rank=rank, alpha=alpha_set.pop(), targets=targets)


def load_lora(path: str | os.PathLike, policy: FluxPolicy, strict: bool = True) -> dict[str, Any]:
    """Load a LoRA file into the policy's adapter (to continue training); returns its metadata.
    A file in ComfyUI's key format goes into a policy with that layout (ComfyFluxPolicy); each policy
    refuses the other format with a one-line ModelFileError.

    Every key is checked against the policy before anything is copied: modules the model
    does not have, shape (rank) mismatches and, with strict=True, adapter modules missing
    from the file raise ModelFileError and leave the policy untouched. A file alpha that
    differs from the policy's is folded into lora_B so the outputs are the file's.
    """
    path = Path(path)
    if not policy.has_lora:
        raise ValueError("the policy has no LoRA adapter: build FluxPolicy(..., lora=lora_settings_from_file(path))")
    comfy_file = _is_comfy_format(check_safetensors(path, "LoRA file").tensors)
    own_layout = callable(getattr(policy, "load_lora_file_state_dict", None))
    if comfy_file and own_layout:
        _load_comfy_lora(path, policy)
        return read_lora_metadata(path)
    if comfy_file:  # fused qkv / linear1 layers: not Load FLUX's (peft) modules
        raise ModelFileError(f"{path}: a LoRA in ComfyUI's key format (diffusion_model.*.lora_up/lora_down) cannot "
                             f"continue training on Load FLUX's model; continue it with the 'TreeRPO model from "
                             f"ComfyUI' node (or resume its run from the .state folder beside it)")
    if own_layout:
        raise ModelFileError(f"{path}: a diffusers-format LoRA (transformer.*.lora_A/lora_B) cannot continue training "
                             f"on ComfyUI's MODEL (TreeRPO model from ComfyUI); continue it with Load FLUX")
    weights, alphas = _read_lora_tensors(path)
    params = {}
    for name, p in policy.lora_parameters().items():
        mp = _module_of(name)
        if mp is not None:
            params[f"{mp[0]}.{mp[1]}"] = p
    unknown = sorted(set(weights) - set(params))
    missing = sorted(set(params) - set(weights))
    wrong = [
        (k, tuple(v.shape), tuple(params[k].shape))
        for k, v in weights.items()
        if k in params and v.shape != params[k].shape
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} keys match no LoRA module of the model, e.g. {unknown[:3]}")
    if wrong:
        problems.append(f"shape mismatches (key, file, model), e.g. {wrong[:3]} (different rank or model size?)")
    if strict and missing:
        problems.append(f"{len(missing)} adapter modules of the model are absent from the file, e.g. {missing[:3]}")
    if problems:
        raise ModelFileError(
            f"{path}: LoRA does not match this FLUX policy (rank {policy.lora_settings.rank}, "
            f"targets {list(policy.lora_settings.targets)}): " + "; ".join(problems)
        )
    own_alpha = float(policy.lora_settings.alpha)
    with torch.no_grad():
        for k, v in weights.items():
            v = v.to(params[k].dtype)
            if k.endswith(".lora_B"):
                module = k[: -len(".lora_B")]
                v = v * (alphas.get(module, own_alpha) / own_alpha)
            params[k].copy_(v)
    return read_lora_metadata(path)
