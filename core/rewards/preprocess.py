"""Torch-only image preprocessing, matching what each original reward model was fed.

The originals take PIL images (8-bit) and run torchvision / transformers transforms. We
reproduce them on batched float tensors so scoring stays on the device:

- HPS-v2.1 (open_clip, hpsv2's `preprocess_val`): ToTensor, then resize the LONGEST side to
  224 (bicubic on the float tensor), zero-pad to 224x224 (left/top get the smaller half),
  then normalise with the OpenAI CLIP mean/std.
- ImageReward: torchvision Resize(224) on the PIL image (shortest side, bicubic, 8-bit
  output), CenterCrop(224) with torchvision's rounding, ToTensor, OpenAI mean/std.
- PickScore (CLIPImageProcessor): resize shortest edge (PIL bicubic, 8-bit output), centre
  crop with transformers' floor rounding, rescale, OpenAI mean/std.

torch's bicubic with ``antialias=True`` uses the same kernel as PIL (a = -0.5, support
scaled when downsampling), so the results agree with the originals up to 8-bit rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "quantize_uint8",
    "resize_bicubic",
    "resize_longest_and_pad",
    "resize_shortest_and_center_crop",
    "normalize",
    "hps_preprocess",
    "imagereward_preprocess",
    "clip_processor_preprocess",
]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def quantize_uint8(x: torch.Tensor) -> torch.Tensor:
    """Round [0, 1] floats to the 256 levels of an 8-bit image (what a PIL image holds)."""
    return (x.clamp(0.0, 1.0) * 255.0).round() / 255.0


def resize_bicubic(x: torch.Tensor, size: tuple[int, int], antialias: bool = True) -> torch.Tensor:
    """Bicubic resize of Tensor[B, C, H, W] to (h, w); a no-op when the size already matches."""
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {(h, w)}")
    if (x.shape[-2], x.shape[-1]) == (h, w):
        return x
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=antialias)


def resize_longest_and_pad(x: torch.Tensor, size: int, fill: float = 0.0, antialias: bool = True) -> torch.Tensor:
    """open_clip `ResizeMaxSize`: longest side -> `size`, then pad to a `size` square.

    New size is ``round(dim * size / max(h, w))`` (Python rounding, as the original); the
    padding puts ``pad // 2`` on the left/top and the rest on the right/bottom.
    """
    h, w = x.shape[-2], x.shape[-1]
    scale = size / float(max(h, w))
    if scale == 1.0:
        # The original returns the image untouched (even if not square) in this case.
        return x
    nh, nw = round(h * scale), round(w * scale)
    nh, nw = max(nh, 1), max(nw, 1)
    x = resize_bicubic(x, (nh, nw), antialias=antialias)
    pad_h, pad_w = size - nh, size - nw
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def _shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    # torchvision Resize(int) and transformers' shortest_edge both truncate the long side.
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def resize_shortest_and_center_crop(x: torch.Tensor, size: int, crop: int | tuple[int, int],
                                    crop_rounding: str = "round", uint8_output: bool = True,
                                    antialias: bool = True) -> torch.Tensor:
    """Shortest side -> `size` (bicubic), then centre crop to `crop`.

    `crop_rounding`: "round" is torchvision's CenterCrop (``int(round((h - ch) / 2))``),
    "floor" is transformers' ``(h - ch) // 2``. `uint8_output` clamps and rounds after the
    resize, as PIL does when it resizes an 8-bit image.
    """
    h, w = x.shape[-2], x.shape[-1]
    nh, nw = _shortest_edge_size(h, w, size)
    x = resize_bicubic(x, (nh, nw), antialias=antialias)
    if uint8_output:
        x = quantize_uint8(x)
    ch, cw = (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))
    if nh < ch or nw < cw:
        # torchvision pads with zeros when the crop is larger than the image.
        ph, pw = max(ch - nh, 0), max(cw - nw, 0)
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2), value=0.0)
        nh, nw = x.shape[-2], x.shape[-1]
    if crop_rounding == "round":
        top, left = int(round((nh - ch) / 2.0)), int(round((nw - cw) / 2.0))
    elif crop_rounding == "floor":
        top, left = (nh - ch) // 2, (nw - cw) // 2
    else:
        raise ValueError(f"crop_rounding must be 'round' or 'floor', got {crop_rounding!r}")
    return x[..., top:top + ch, left:left + cw]


def normalize(x: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Per-channel (x - mean) / std for Tensor[B, 3, H, W]."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


def hps_preprocess(images: torch.Tensor, size: int = 224, antialias: bool = True,
                   quantize: bool = True) -> torch.Tensor:
    """HPS-v2.1 pixels: 8-bit levels, longest side to `size`, zero pad, OpenAI mean/std.

    `antialias=True` matches torchvision >= 0.17 (its tensor resize default); older
    torchvision resized tensors without antialiasing.
    """
    x = quantize_uint8(images) if quantize else images
    x = resize_longest_and_pad(x, size, fill=0.0, antialias=antialias)
    return normalize(x)


def imagereward_preprocess(images: torch.Tensor, size: int = 224, quantize: bool = True) -> torch.Tensor:
    """ImageReward pixels: Resize(size) + CenterCrop(size) on an 8-bit image, OpenAI mean/std."""
    x = quantize_uint8(images) if quantize else images
    x = resize_shortest_and_center_crop(x, size, size, crop_rounding="round", uint8_output=quantize)
    return normalize(x)


def clip_processor_preprocess(images: torch.Tensor, shortest_edge: int = 224, crop: int | tuple[int, int] = 224,
                              mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, do_center_crop: bool = True,
                              quantize: bool = True) -> torch.Tensor:
    """CLIPImageProcessor pixels (PickScore): shortest edge resize, floor centre crop, mean/std."""
    x = quantize_uint8(images) if quantize else images
    if do_center_crop:
        x = resize_shortest_and_center_crop(x, shortest_edge, crop, crop_rounding="floor", uint8_output=quantize)
    else:
        h, w = x.shape[-2], x.shape[-1]
        x = resize_bicubic(x, _shortest_edge_size(h, w, shortest_edge))
        if quantize:
            x = quantize_uint8(x)
    return normalize(x, mean, std)
