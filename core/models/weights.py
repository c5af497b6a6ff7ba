"""Reading safetensors files: header checks before any weights are read, cheap content
fingerprints, tensor reads that dequantise fp8-stored weights, and the errors every loader raises
(`ModelFileError`, a ValueError; `MissingModelFile`, also a FileNotFoundError), which name the
file, what was expected and where it was looked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch


_FP8_DTYPES = tuple(
    getattr(torch, n)
    for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)
# Auxiliary tensors of fp8-quantised files (ComfyUI "scaled fp8" and newer formats).
_QUANT_SUFFIXES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale", ".comfy_quant")
_QUANT_MARKERS = ("scaled_fp8",)


class ModelFileError(ValueError):
    """A model file or folder is malformed or of the wrong kind."""


class MissingModelFile(ModelFileError, FileNotFoundError):
    """A required model file or folder does not exist."""


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
    if not p.exists():
        raise MissingModelFile(f"{what}: file not found: {p}")
    if not p.is_file():
        raise ModelFileError(f"{what}: {p} is {'a folder' if p.is_dir() else 'not a regular file'}, "
                             "expected a .safetensors file")
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
    except OSError as e:  # permissions, an I/O error: the file is there but cannot be read
        raise ModelFileError(f"{what}: {p} cannot be read ({e.strerror or e})") from None
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
