"""Safe reading of reward checkpoints, strict key checks, atomic safetensors writes.

Policy: `.pt`/`.pth`/`.bin` files are read with ``torch.load(weights_only=True)``, which
refuses to run pickled code. A file that needs full unpickling is refused with a message
naming it; the caller may opt in with ``trust_checkpoint=True`` (logged as a warning) for
a file they trust. safetensors files are read directly.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ..checkpoint import atomic_save_safetensors

logger = logging.getLogger(__name__)

__all__ = [
    "detect_checkpoint_format",
    "load_state_dict_file",
    "check_state_dict_keys",
    "save_safetensors_atomic",
    "materialize_meta_buffers",
]


def detect_checkpoint_format(path: str | os.PathLike) -> str:
    """Return "torch-zip", "torch-pickle" or "safetensors" from the file's first bytes.

    Raises FileNotFoundError if absent, ValueError for a directory or another file type.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint not found: {p}")
    if p.is_dir():
        raise ValueError(f"expected a checkpoint file but {p} is a directory")
    with open(p, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-pickle"
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= 100_000_000 and head[8:9] == b"{" and n <= p.stat().st_size - 8:
            return "safetensors"
    raise ValueError(
        f"{p} is not a PyTorch checkpoint (zip or pickle .pt) nor a safetensors file "
        f"(first bytes {head[:8]!r}); check that the right file was downloaded"
    )


def _torch_load(p: Path, fmt: str, trust_checkpoint: bool):
    try:
        # No mmap: a cached model must not keep pages of a file the user may overwrite.
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            raise ValueError(
                f"{p} holds pickled objects that torch.load(weights_only=True) refuses ({e}). "
                "Loading it would execute code from the file. If you trust this file, pass "
                "trust_checkpoint=True (the trust_checkpoint option) to load it anyway."
            ) from e
    except Exception as e:  # corrupt archive, truncated file, ...
        raise ValueError(f"could not read {p} as a PyTorch checkpoint: {type(e).__name__}: {e}") from e
    logger.warning("loading %s with torch.load(weights_only=False) because trust_checkpoint=True: "
                   "this runs code stored in the file", p)
    return torch.load(p, map_location="cpu", weights_only=False)


def load_state_dict_file(path: str | os.PathLike, *, trust_checkpoint: bool = False,
                         wrapper_keys: Iterable[str] = ("state_dict", "model"),
                         strip_prefixes: Iterable[str] = ("module.",)) -> dict[str, torch.Tensor]:
    """Read a state dict from a .pt/.pth/.bin (torch) or .safetensors file.

    A checkpoint dict wrapping the weights under one of `wrapper_keys` is unwrapped; a
    common prefix from `strip_prefixes` (DataParallel's "module.") is removed. Raises
    ValueError naming the file when the content is not a mapping of names to tensors.
    """
    p = Path(path)
    fmt = detect_checkpoint_format(p)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(p))
        except Exception as e:
            raise ValueError(f"could not read {p} as safetensors: {type(e).__name__}: {e}") from e
    else:
        obj = _torch_load(p, fmt, trust_checkpoint)
    if isinstance(obj, Mapping):
        for k in wrapper_keys:
            inner = obj.get(k)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{p} does not contain a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(
            f"{p} is not a plain state dict: entries {bad[:5]} are not tensors "
            f"(expected a mapping of parameter names to tensors, or one under {list(wrapper_keys)})"
        )
    sd = dict(obj)
    for prefix in strip_prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _short(keys: Iterable[str], n: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def check_state_dict_keys(actual: Iterable[str], expected: Iterable[str], *, source: str, what: str,
                          ignorable: Iterable[str] = ()) -> None:
    """Strict key check: raise ValueError listing missing and unexpected keys.

    Keys in `ignorable` may be present or absent (e.g. buffers such as position_ids).
    """
    actual, expected, ign = set(actual), set(expected), set(ignorable)
    missing = expected - actual - ign
    extra = actual - expected - ign
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_short(missing)}")
        if extra:
            parts.append(f"{len(extra)} unexpected keys: {_short(extra)}")
        raise ValueError(f"{source} is not a valid {what} checkpoint: " + "; ".join(parts))


# One atomic writer for the whole package (temporary file, then rename).
save_safetensors_atomic = atomic_save_safetensors


def materialize_meta_buffers(model: torch.nn.Module) -> None:
    """Recreate `position_ids` buffers left on the meta device after an `assign=True` load.

    Models are built on the meta device (no random init of ~1B parameters) and filled from
    the checkpoint; non-persistent buffers are not in any checkpoint and are rebuilt here.
    """
    for mod_name, mod in model.named_modules():
        for buf_name, buf in list(mod.named_buffers(recurse=False)):
            if not buf.is_meta:
                continue
            if buf_name == "position_ids":
                n = buf.shape[-1]
                new = torch.arange(n, dtype=buf.dtype).expand(buf.shape).clone()
                persistent = buf_name not in getattr(mod, "_non_persistent_buffers_set", set())
                mod.register_buffer(buf_name, new, persistent=persistent)
            else:
                raise RuntimeError(f"buffer {mod_name}.{buf_name} was not filled from the checkpoint")
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors not filled from the checkpoint: {_short(left)}")


def read_json(path: str | os.PathLike, what: str) -> dict:
    """Read a JSON object, raising ValueError naming the file on a parse error."""
    p = Path(path)
    try:
        with open(p, "r", encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} ({what}) is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{p} ({what}) must hold a JSON object, got {type(obj).__name__}")
    return obj
