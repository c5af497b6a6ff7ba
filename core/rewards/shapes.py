"""Prompt fidelity in the shapes world (GenEval-like): colour, count, shape and position of the
objects found in the image, checked against the caption. Weight-free, score in [0, 1].

Detection (batched torch, on the reward's device; images larger than 128 px are scaled down
first; every threshold below is a fraction of the image, so 64 px, 128 px, ... all work):

1. Object pixels: chroma ``max(rgb) - min(rgb)`` (the world's backgrounds are never saturated,
   chroma <= ~0.06) assigned to the palette colour of nearest hue. A pixel belongs to colour k
   when its chroma is >= max(0.12, 0.4 x the highest chroma of colour k in that image): the
   relative part keeps blurred halos and colour bleed out.
2. Blobs: 4-connected components per colour (4, not 8: the world's squares may touch at a
   corner), by max-filter label propagation with pointer jumping.
3. Per blob, on the soft coverage ``m = clamp(chroma / P, 0, 1)`` (P: mean chroma of the blob's
   pixels above 0.75 x its maximum; for an object on a grey background m is the pixel's
   coverage, and its sums hardly change under blur):
   area ``A = sum m``; width ``W = sum_x max_y m``, height ``H = sum_y max_x m``;
   fill ``A / (W H)`` (square 1, circle pi/4, triangle 1/2); diag = the same widths along the
   two diagonals (x+y, x-y), summed, over ``W + H`` (square 2, circle and triangle ~1.41);
   drop ``(centroid_y - centre of the row profile) / H`` (an upward triangle's mass sits low:
   1/6; circle and square 0). Shape probabilities, with ``sig`` the logistic function:

       p(triangle) = sig((drop - 0.04) / 0.008)
       p(square)   = (1 - p(triangle)) sig((diag - 1.56) / 0.05 + (fill - 0.88) / 0.05)
       p(circle)   = 1 - p(triangle) - p(square)

   Weight ``w = min(clamp((a - 0.0015) / 0.0025, 0, 1), clamp((0.25 - a) / 0.13, 0, 1))``,
   a = A / image area: specks count 0, small blobs partly, washes over a quarter of the
   image 0. Position ``pos(R) = clamp(1 - (d - 0.02) / 0.15, 0, 1)``, d the distance of the
   centroid (in [0, 1] image units) outside the region's box in ``world.REGIONS``.

Scoring, per prompt group g (k objects of colour c, shape s, region R; blobs of colour c go to
the group of that colour whose shape and region they match best):

    n_g        = sum of w over its blobs
    count_g    = (min(n_g, k) / max(n_g, k))^2            (0 when n_g = 0)
    shape_g    = sum w p(s) / n_g                          (0 when n_g = 0)
    position_g = sum w pos(R) / n_g                        (0 when n_g = 0)
    score_g    = (count_g shape_g position_g + (count_g + shape_g + position_g) / 3) / 2

The product is the strict GenEval-style "all right" half, the mean gives partial credit, so the
score stays dense for RL. Objects in colours the prompt does not ask for lower everything by the
purity ``N / (N + n_extra)`` (N = sum n_g, n_extra = sum w of the other blobs; 1 with no blobs):

    total    = purity x mean_g score_g
    colour   = purity x mean_g min(n_g, 1)
    count, shape, position = mean_g of the per-group values

``ShapesReward.parts`` returns all five, each Tensor[B] in [0, 1]; ``score`` is ``total``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..shapes.world import COLOURS, REGIONS, SHAPES, Group, parse_prompt
from .base import Reward, check_images_and_prompts

__all__ = ["ShapesColourReward", "ShapesCrispAskedReward", "ShapesCrispReward", "ShapesLayoutReward", "ShapesReward",
           "crispness", "detect_objects"]

MAX_SIZE = 128           # larger images are scaled down to this longer side first
CHROMA_MIN = 0.12        # absolute chroma floor of an object pixel (backgrounds stay below ~0.06)
CHROMA_REL = 0.4         # ... and relative to the strongest pixel of that colour in the image
MIN_AREA = 0.0015        # blob coverage (fraction of the image) counting 0 ...
FULL_AREA = 0.004        # ... and 1 (the world's objects cover ~0.017 .. 0.045, >= 0.003 crowded)
WASH_AREA = (0.12, 0.25)  # above: weight falls to 0, a tinted background is no object
REGION_SLACK = 0.02      # centroid distance outside a region box that still counts fully ...
REGION_FALLOFF = 0.15    # ... and the further distance over which it falls to 0
# shape boundaries (centre, scale of the logistic), set between the features measured on render()
# output, sharp and blurred (docs/rewards.md): drop is ~0.15 sharp, >= ~0.07 blurred for
# triangles, 0 +- 0.015 otherwise; diag ~1.4 for circles, 1.9 sharp .. 1.6 blurred for squares;
# fill 0.78..0.80 for circles, 1.0 sharp .. 0.9 blurred for squares
TRIANGLE_DROP, TRIANGLE_DROP_SCALE = 0.04, 0.008
SQUARE_DIAG, SQUARE_DIAG_SCALE = 1.56, 0.05
SQUARE_FILL, SQUARE_FILL_SCALE = 0.88, 0.05
# crispness: of the pixels above CRISP_OBJECT x the peak chroma of their colour (object pixels),
# the share above CRISP_SOLID x that peak (solid ones); renders of the world score ~0.83
CRISP_OBJECT, CRISP_SOLID = 0.18, 0.72
CRISP_SIZE = 64  # larger images are scaled down to this side first: the share of edge pixels depends on it

_NAMES = list(COLOURS)


def _opponent_hue(rgb: torch.Tensor) -> torch.Tensor:
    """Hue angle (radians) of [..., 3] RGB from its opponent axes."""
    r, g, b = rgb.unbind(-1)
    return torch.atan2(math.sqrt(3) / 2 * (g - b), r - (g + b) / 2)


_PALETTE_HUE = _opponent_hue(torch.tensor([COLOURS[c] for c in _NAMES], dtype=torch.float32) / 255)


def _max_cross(x: torch.Tensor) -> torch.Tensor:
    """Max over each pixel and its 4 neighbours of [N, H, W] (zero padding)."""
    p = F.pad(x, (1, 1, 1, 1))
    return torch.stack([p[:, 1:-1, 1:-1], p[:, :-2, 1:-1], p[:, 2:, 1:-1], p[:, 1:-1, :-2], p[:, 1:-1, 2:]]).amax(0)


def _components(mask: torch.Tensor) -> torch.Tensor:
    """4-connected component labels of a bool [N, H, W] mask: each pixel gets 1 + the largest
    flat index in its component, 0 off the mask."""
    n, h, w = mask.shape
    lab = torch.zeros(n, h, w, dtype=torch.float32, device=mask.device)
    used = mask.flatten(1).any(1).nonzero().flatten()  # most images have one or two colours
    if used.numel() == 0:
        return lab.long()
    m = mask[used].float()
    cur = torch.arange(1, h * w + 1, device=mask.device, dtype=torch.float32).view(1, h, w) * m
    for _ in range(h * w):
        new = _max_cross(cur) * m
        # pointer jumping: take the label held by the pixel our label names (same component,
        # never smaller), so long chains converge in log steps
        flat = new.view(len(used), -1)
        new = torch.gather(flat, 1, (flat.long() - 1).clamp_min(0)).view_as(m) * m
        if torch.equal(new, cur):
            break
        cur = new
    lab[used] = cur
    return lab.long()


def _scaled_down(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, H, W] area-averaged down so that its longer side is at most ``size``."""
    scale = size / max(x.shape[-2:])
    if scale >= 1:
        return x
    return F.interpolate(x, size=(round(x.shape[-2] * scale), round(x.shape[-1] * scale)), mode="area")


def _chroma_by_colour(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pixel of [B, 3, H, W] assigned to the palette colour of nearest hue: the assignment,
    bool [B, K, H, W], and the pixel's chroma ``max(rgb) - min(rgb)`` in its colour's plane (0 elsewhere)."""
    rgb = x.permute(0, 2, 3, 1)
    chroma = rgb.amax(-1) - rgb.amin(-1)                                       # [B, H, W]
    diff = (_opponent_hue(rgb).unsqueeze(-1) - _PALETTE_HUE.to(x.device)).remainder(2 * math.pi)
    cls = torch.minimum(diff, 2 * math.pi - diff).argmin(-1)                   # nearest hue
    onehot = F.one_hot(cls, len(_NAMES)).permute(0, 3, 1, 2).bool()           # [B, K, H, W]
    return onehot, chroma.unsqueeze(1) * onehot


def detect_objects(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """The coloured blobs of images [B, 3, H, W] in [0, 1], one row per blob (weight > 0):
    image, colour (index into COLOURS), weight, area (fraction of the image), cx, cy (in [0, 1]),
    fill, drop, diag and shape_p [n, len(SHAPES)] (see the module docstring)."""
    x = _scaled_down(images.float(), MAX_SIZE)  # the world's objects stay >= ~10 px wide
    b, _, h, w = x.shape
    k = len(_NAMES)
    onehot, per_colour = _chroma_by_colour(x)
    peak = per_colour.amax(dim=(2, 3), keepdim=True)
    mask = onehot & (per_colour >= torch.clamp(CHROMA_REL * peak, min=CHROMA_MIN))
    lab = _components(mask.reshape(b * k, h, w)).view(b, k, h, w)

    # one row per component: key = (image * K + colour) * HW + label - 1
    on = lab > 0
    base = torch.arange(b * k, device=x.device).view(b, k, 1, 1) * (h * w)
    keys, comp = torch.unique((base + lab - 1)[on], return_inverse=True)
    nc = keys.shape[0]
    c = per_colour[on]
    ys, xs = torch.meshgrid(torch.arange(h, device=x.device), torch.arange(w, device=x.device), indexing="ij")
    ys, xs = ys.expand(b, k, h, w)[on].float(), xs.expand(b, k, h, w)[on].float()
    zeros = torch.zeros(nc, device=x.device)
    cmax = zeros.scatter_reduce(0, comp, c, "amax", include_self=False)
    # P: mean chroma of the blob's inner pixels (>= 0.75 of its maximum), robust to noise
    inner = (c >= 0.75 * cmax[comp]).float()
    p = zeros.index_add(0, comp, c * inner) / zeros.index_add(0, comp, inner)
    m = (c / p[comp]).clamp(0, 1)
    area = zeros.index_add(0, comp, m)
    cx = zeros.index_add(0, comp, m * xs) / area
    cy = zeros.index_add(0, comp, m * ys) / area

    def profile(bins: torch.Tensor, n: int) -> torch.Tensor:
        """[nc, n]: the largest m of each blob in each of n bins (columns, rows, diagonals)."""
        return torch.zeros(nc * n, device=x.device).scatter_reduce(0, comp * n + bins.long(), m, "amax").view(nc, n)

    cols, rows = profile(xs, w), profile(ys, h)
    width, height = cols.sum(1), rows.sum(1)
    dl, dr = profile(xs + ys, h + w), profile(xs - ys + h - 1, h + w)
    diag = (dl.sum(1) + dr.sum(1)) / (width + height)
    row_centre = (rows * torch.arange(h, device=x.device)).sum(1) / height
    fill = area / (width * height)
    drop = (cy - row_centre) / height
    frac = area / (h * w)
    weight = torch.minimum(((frac - MIN_AREA) / (FULL_AREA - MIN_AREA)).clamp(0, 1),
                           ((WASH_AREA[1] - frac) / (WASH_AREA[1] - WASH_AREA[0])).clamp(0, 1))
    # soft shape classes: an upward triangle's mass sits low; a square reaches further along the
    # diagonals (x+y, x-y) than along the axes (ratio 2 vs sqrt 2 for a circle) and fills its box
    tri = torch.sigmoid((drop - TRIANGLE_DROP) / TRIANGLE_DROP_SCALE)
    sq = torch.sigmoid((diag - SQUARE_DIAG) / SQUARE_DIAG_SCALE + (fill - SQUARE_FILL) / SQUARE_FILL_SCALE)
    by_name = {"triangle": tri, "square": (1 - tri) * sq, "circle": (1 - tri) * (1 - sq)}
    shape_p = torch.stack([by_name[s] for s in SHAPES], 1)
    keep = weight > 0
    img_col = torch.div(keys, h * w, rounding_mode="floor")
    return {
        "image": torch.div(img_col, k, rounding_mode="floor")[keep], "colour": (img_col % k)[keep],
        "weight": weight[keep], "area": frac[keep], "cx": ((cx + 0.5) / w)[keep], "cy": ((cy + 0.5) / h)[keep],
        "fill": fill[keep], "drop": drop[keep], "diag": diag[keep], "shape_p": shape_p[keep],
    }


def _position(cx: float, cy: float, region: str | None) -> float:
    x0, y0, x1, y1 = REGIONS[region]
    d = math.hypot(max(x0 - cx, 0.0, cx - x1), max(y0 - cy, 0.0, cy - y1))
    return min(1.0, max(0.0, 1.0 - (d - REGION_SLACK) / REGION_FALLOFF))


@lru_cache(maxsize=4096)
def _groups(prompt: str) -> tuple[Group, ...]:
    return tuple(parse_prompt(prompt))


def _score_one(groups: tuple[Group, ...], blobs: list[tuple]) -> dict[str, float]:
    """Parts of one image from its blobs [(colour name, weight, cx, cy, {shape: p})]."""
    acc = [[0.0, 0.0, 0.0] for _ in groups]  # per group: n, sum w p(shape), sum w pos
    extra = 0.0
    for colour, wgt, cx, cy, probs in blobs:
        cands = [i for i, g in enumerate(groups) if g.colour == colour]
        if not cands:
            extra += wgt
            continue
        fits = [(probs[groups[i].shape], _position(cx, cy, groups[i].region)) for i in cands]
        best = max(range(len(cands)), key=lambda j: fits[j][0] * fits[j][1])
        a = acc[cands[best]]
        a[0] += wgt
        a[1] += wgt * fits[best][0]
        a[2] += wgt * fits[best][1]
    parts = {"colour": 0.0, "count": 0.0, "shape": 0.0, "position": 0.0, "total": 0.0}
    found = 0.0
    for g, (n, sp, ps) in zip(groups, acc):
        found += n
        if n <= 0:
            continue
        count = (min(n, g.count) / max(n, g.count)) ** 2
        shape, pos = sp / n, ps / n
        parts["colour"] += min(n, 1.0)
        parts["count"] += count
        parts["shape"] += shape
        parts["position"] += pos
        parts["total"] += (count * shape * pos + (count + shape + pos) / 3) / 2
    purity = found / (found + extra) if found + extra > 0 else 1.0
    out = {key: v / len(groups) for key, v in parts.items()}
    out["colour"] *= purity
    out["total"] *= purity
    return out


class ShapesReward(Reward):
    """Prompt fidelity for the shapes world in [0, 1] (see the module docstring for the formula).

    ``parts(images, prompts)`` gives the per-attribute scores colour, count, shape, position and
    their combination total (= ``score``). Prompts must be readable by
    ``treerpo.core.shapes.parse_prompt`` (ValueError naming the prompt otherwise)."""

    name = "shapes"
    typical_range = (0.0, 1.0)
    PARTS = ("colour", "count", "shape", "position", "total")

    def _parts(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        groups = [_groups(p) for p in prompts]  # parse first: a bad prompt fails before any work
        det = detect_objects(images)
        rows = zip(det["image"].tolist(), det["colour"].tolist(), det["weight"].tolist(), det["cx"].tolist(),
                   det["cy"].tolist(), det["shape_p"].tolist())
        blobs: list[list] = [[] for _ in prompts]
        for i, col, wgt, cx, cy, probs in rows:
            blobs[i].append((_NAMES[col], wgt, cx, cy, dict(zip(SHAPES, probs))))
        scored = [_score_one(g, bl) for g, bl in zip(groups, blobs)]
        return {key: torch.tensor([s[key] for s in scored], dtype=torch.float32) for key in self.PARTS}

    def _score(self, images, prompts):
        return self._parts(images, prompts)["total"]

    def parts(self, images: torch.Tensor, prompts) -> dict[str, torch.Tensor]:
        """Per-attribute scores {colour, count, shape, position, total}, each float32 Tensor[B] on
        the CPU in [0, 1]; images as for ``score`` (non-finite images give NaN)."""
        prompts = check_images_and_prompts(images, prompts, self.name)
        b = images.shape[0]
        out = {key: torch.full((b,), float("nan")) for key in self.PARTS}
        finite = torch.isfinite(images.detach()).flatten(1).all(dim=1).cpu()
        sel = torch.nonzero(finite).flatten().tolist()
        if sel:
            with torch.no_grad():
                x = images.detach()[sel].to(device=self.device, dtype=torch.float32).clamp(0, 1)
                got = self._parts(x, [prompts[i] for i in sel])
            for key in self.PARTS:
                out[key][sel] = got[key]
        return out


class ShapesLayoutReward(ShapesReward):
    """The layout half of prompt fidelity: ``(colour + count + position) / 3`` of ``ShapesReward.parts``,
    in [0, 1]. It leaves out the shape part, which on the bundled tiny-shapes model is set mostly by
    the decoder (it softens corners) rather than by the transformer RL trains (docs/demo.md)."""

    name = "shapes-layout"

    def _score(self, images, prompts):
        p = self._parts(images, prompts)
        return (p["colour"] + p["count"] + p["position"]) / 3


class ShapesColourReward(ShapesReward):
    """Colour fidelity (GenEval's "colors" task in the shapes world): the ``colour`` part of
    ``ShapesReward.parts``, ``purity x mean_g min(n_g, 1)``: every colour the prompt asks for is there
    and no other (docs/rewards.md)."""

    name = "shapes-colour"

    def _score(self, images, prompts):
        return self._parts(images, prompts)["colour"]


def crispness(images: torch.Tensor, asked: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor[B] in [0, 1]: the share of object pixels of [B, 3, H, W] images in [0, 1] that are
    solid, i.e. at least CRISP_SOLID of the peak chroma of their palette colour in that image (object
    pixels: chroma >= CHROMA_MIN and >= CRISP_OBJECT of that peak). Blurred edges, halos and washed-out
    fills lower it; an image without object pixels scores 0. ``asked``: bool [B, len(COLOURS)], the
    colours each image's prompt asks for; pixels of any other colour then stay object pixels but
    never count as solid."""
    # at the world's own size, so the share of edge pixels does not grow with the resolution
    _, per_colour = _chroma_by_colour(_scaled_down(images.float(), CRISP_SIZE))
    peak = per_colour.amax(dim=(2, 3), keepdim=True)
    obj = per_colour >= torch.clamp(CRISP_OBJECT * peak, min=CHROMA_MIN)
    solid = obj & (per_colour >= CRISP_SOLID * peak)
    if asked is not None:
        solid = solid & asked.to(solid.device)[:, :, None, None]
    return solid.flatten(1).sum(1).float() / obj.flatten(1).sum(1).clamp_min(1).float()


class ShapesCrispReward(Reward):
    """How cleanly the objects are drawn, in [0, 1]: ``crispness``, the share of object pixels at
    nearly full colour strength (crisp edges, even fills). Prompt-independent: the shapes world's
    stand-in for an image-quality reward such as an aesthetic score (docs/rewards.md). Renders of
    the world score about 0.83, the bundled tiny-shapes model about 0.46."""

    name = "shapes-crisp"
    typical_range = (0.0, 1.0)

    def _score(self, images, prompts):
        return crispness(images)


class ShapesCrispAskedReward(ShapesCrispReward):
    """``shapes-crisp`` counting only the colours the prompt asks for as solid: objects drawn cleanly
    in the prompt's colours. A policy can no longer raise it by turning objects into another, easier
    colour (what ``shapes-crisp`` alone learns on tiny-shapes, docs/demo.md)."""

    name = "shapes-crisp-asked"

    def _score(self, images, prompts):
        asked = torch.zeros(len(prompts), len(_NAMES), dtype=torch.bool)
        for i, p in enumerate(prompts):
            for g in _groups(p):
                asked[i, _NAMES.index(g.colour)] = True
        return crispness(images, asked)
