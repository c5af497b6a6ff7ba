"""Torch-only image preprocessing, matching what each original reward model was fed.

The originals take PIL images (8-bit) and run torchvision / transformers transforms. We
reproduce them on batched float tensors so scoring stays on the device:

- HPS-v2.1 (open_clip, hpsv2's `preprocess_val`): ToTensor, then resize the LONGEST side to
  224 (bicubic on the float tensor), zero-pad to 224x224 (left/top get the smaller half),
  then normalise with the OpenAI CLIP mean/std.
- ImageReward: torchvision Resize(224) on the PIL image (shortest side, PIL bicubic),
  CenterCrop(224) with torchvision's rounding, ToTensor, OpenAI mean/std.
- PickScore (CLIPImageProcessor): resize shortest edge (PIL bicubic), centre crop with
  transformers' floor rounding, rescale, OpenAI mean/std.

HPS resizes a float tensor (torchvision, i.e. torch's antialiased bicubic). The other two
resize 8-bit PIL images, and PIL does not do one float 2-D pass: it resamples rows, rounds
and clips to 8 bits, then resamples columns, with fixed-point filter weights. A float pass
differs from it by up to 18 levels on sharp edges, so `resize_bicubic_pil` reproduces PIL
bit for bit: PIL's weights, its 22-bit fixed point, the same two passes (exact in float64,
on any device). On the CPU PIL itself does the same work faster (docs/rewards.md, "Resize").
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "quantize_uint8",
    "resize_bicubic",
    "resize_bicubic_pil",
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


# PIL's fixed-point precision for 8-bit images (Resample.c: 32 - 8 - 2 bits).
_PIL_PRECISION_BITS = 22
# On the CPU hand the resize to PIL itself: same bits, and faster than the dense float64
# passes for 8-16 FLUX-sized images (measured in docs/rewards.md, "Resize").
PIL_ON_CPU = True


def _pil_bicubic(x: float) -> float:
    # PIL's bicubic filter (a = -0.5, support 2), in Resample.c's operation order.
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=32)
def _pil_weights(in_size: int, out_size: int) -> np.ndarray:
    """PIL's fixed-point bicubic weights for one axis, as a dense [out, in] matrix of integers.

    Python floats are C doubles, and every step below is the one PIL takes (including its
    sequential normalising sum and its round-half-away-from-zero), so the integers match.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    inv = 1.0 / filterscale
    one = float(1 << _PIL_PRECISION_BITS)
    w = np.zeros((out_size, in_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        n = min(int(center + support + 0.5), in_size) - xmin
        k = [_pil_bicubic((x + xmin - center + 0.5) * inv) for x in range(n)]
        total = 0.0
        for v in k:
            total += v
        for x, v in enumerate(k):
            if total != 0.0:
                v /= total
            w[xx, xmin + x] = int(v * one + (0.5 if v >= 0 else -0.5))
    return w


def _pil_pass(levels: torch.Tensor, in_size: int, out_size: int, dim: int) -> torch.Tensor:
    # Integer pixels times integer weights: float64 holds every partial sum exactly.
    w = torch.from_numpy(_pil_weights(in_size, out_size)).to(levels.device)
    y = levels @ w.t() if dim == -1 else w @ levels
    half = float(1 << (_PIL_PRECISION_BITS - 1))
    return torch.floor((y + half) / float(1 << _PIL_PRECISION_BITS)).clamp_(0.0, 255.0)


def _resize_with_pil(levels: torch.Tensor, h: int, w: int) -> torch.Tensor:
    from PIL import Image

    arr = levels.to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    out = np.empty((arr.shape[0], h, w, arr.shape[3]), dtype=np.uint8)
    for i, img in enumerate(arr):
        if img.shape[2] == 3:
            out[i] = np.asarray(Image.fromarray(img, "RGB").resize((w, h), Image.BICUBIC))
        else:  # any other channel count: channel by channel ("L" resamples like one RGB band)
            for c in range(img.shape[2]):
                out[i, :, :, c] = np.asarray(Image.fromarray(img[:, :, c], "L").resize((w, h), Image.BICUBIC))
    return torch.from_numpy(out).permute(0, 3, 1, 2)


def resize_bicubic_pil(x: torch.Tensor, size: tuple[int, int], use_pil: bool | None = None) -> torch.Tensor:
    """PIL's bicubic resize of an 8-bit image, bit for bit, for Tensor[B, C, H, W] in [0, 1].

    Pixels are taken as 8-bit levels (rounded) and the result is 8-bit levels / 255: rows
    are resampled first, rounded and clipped, then columns, with PIL's fixed-point weights.
    `use_pil`: True hands the work to PIL, False runs the tensor passes on x's device; by
    default PIL on the CPU (`PIL_ON_CPU`), the tensor passes elsewhere. Both give the same
    bits.
    """
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise ValueError(f"resize target must be positive, got {(h, w)}")
    levels = (x.clamp(0.0, 1.0) * 255.0).round()
    H, W = x.shape[-2], x.shape[-1]
    if (H, W) == (h, w):  # PIL returns a copy in this case
        return levels.div_(255.0)
    if use_pil is None:
        use_pil = PIL_ON_CPU and x.device.type == "cpu"
    if use_pil:
        y = _resize_with_pil(levels.cpu(), h, w).to(x.device)
    else:
        y = levels.to(torch.float64)
        if W != w:  # PIL skips a pass whose size does not change
            y = _pil_pass(y, W, w, -1)
        if H != h:
            y = _pil_pass(y, H, h, -2)
    return y.to(x.dtype if x.is_floating_point() else torch.float32) / 255.0


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
    "floor" is transformers' ``(h - ch) // 2``. `uint8_output=True` resizes as PIL does an
    8-bit image (`resize_bicubic_pil`); False does one float pass (`resize_bicubic`).
    """
    h, w = x.shape[-2], x.shape[-1]
    nh, nw = _shortest_edge_size(h, w, size)
    if uint8_output:
        x = resize_bicubic_pil(x, (nh, nw))
    else:
        x = resize_bicubic(x, (nh, nw), antialias=antialias)
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
        size = _shortest_edge_size(x.shape[-2], x.shape[-1], shortest_edge)
        x = resize_bicubic_pil(x, size) if quantize else resize_bicubic(x, size)
    return normalize(x, mean, std)
