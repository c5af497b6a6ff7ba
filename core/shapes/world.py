"""Scenes of coloured shapes, their captions, and the caption parser the reward uses.

A scene is one or two groups; a group is `count` shapes of one colour and kind in one region
("two red circles on the left and a blue square at the bottom right"). Images are drawn at 4x
and box-filtered down, so edges are soft like a decoder's. Backgrounds are plain or textured
but never saturated, so colour alone finds the objects.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np

# saturated object colours, far apart in hue (the reward classifies pixels by hue)
COLOURS = {
    "red": (220, 40, 40),
    "yellow": (235, 205, 35),
    "green": (40, 175, 60),
    "blue": (40, 85, 230),
    "purple": (150, 50, 210),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
# region -> (x0, y0, x1, y1) in [0, 1] image coordinates (y down); None = anywhere
REGIONS = {
    None: (0.0, 0.0, 1.0, 1.0),
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "top left": (0.0, 0.0, 0.5, 0.5),
    "top right": (0.5, 0.0, 1.0, 0.5),
    "bottom left": (0.0, 0.5, 0.5, 1.0),
    "bottom right": (0.5, 0.5, 1.0, 1.0),
}
_PAIRS = [("left", "right"), ("top", "bottom")] + [
    (a, b) for i, a in enumerate(("top left", "top right", "bottom left", "bottom right"))
    for b in ("top left", "top right", "bottom left", "bottom right")[i + 1:]
]
BACKGROUNDS = ("dark", "light", "gray", "striped", "checkered", "noisy")
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}


@dataclass(frozen=True)
class Group:
    count: int
    colour: str
    shape: str
    region: str | None  # a key of REGIONS

    def phrase(self) -> str:
        noun = self.shape + ("s" if self.count > 1 else "")
        where = ("" if self.region is None
                 else (" on the " if self.region in ("left", "right") else " at the ") + self.region)
        return f"{COUNT_WORDS[self.count]} {self.colour} {noun}{where}"


@dataclass(frozen=True)
class Scene:
    groups: tuple[Group, ...]
    background: str | None = None  # a BACKGROUNDS word named in the caption, or None (plain, unnamed)


def prompt_of(scene: Scene) -> str:
    text = " and ".join(g.phrase() for g in scene.groups)
    return text + (f" on a {scene.background} background" if scene.background else "")


def sample_scene(rng: random.Random) -> Scene:
    """A random scene: one group (anywhere or in a region) or two groups in disjoint regions."""
    colours = rng.sample(list(COLOURS), 2)
    shapes = [rng.choice(SHAPES) for _ in range(2)]
    kind = rng.random()
    if kind < 0.2:
        regions = [None]
    elif kind < 0.5:
        regions = [rng.choice([r for r in REGIONS if r is not None])]
    else:
        regions = list(rng.choice(_PAIRS))
        rng.shuffle(regions)
    groups = []
    for i, region in enumerate(regions):
        most = 2 if region is not None and " " in region else 3  # a quadrant holds two at most
        groups.append(Group(rng.randint(1, most), colours[i], shapes[i], region))
    background = rng.choice(BACKGROUNDS) if rng.random() < 0.5 else None
    return Scene(tuple(groups), background)


def scene_prompts(n: int, seed: int) -> list[str]:
    """`n` distinct captions of random scenes (deterministic in `seed`)."""
    rng, seen = random.Random(seed), []
    while len(seen) < n:
        p = prompt_of(sample_scene(rng))
        if p not in seen:
            seen.append(p)
    return seen


# The evaluation protocol's prompt sets (docs/demo.md#the-evaluation-protocol): disjoint slices of
# one seeded pool, test first, so a longer training set never changes validation or test.
# Settings are chosen on "validation"; claims are reported on "test" only.
PROMPT_SETS = {"test": 128, "validation": 128, "train": 512}
PROMPT_SETS_SEED = 20261202


def prompt_set(name: str) -> list[str]:
    """The protocol's prompt set ``name`` ("train", "validation" or "test"): fixed captions of this
    world, disjoint from the other two."""
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {list(PROMPT_SETS)}")
    pool = scene_prompts(sum(PROMPT_SETS.values()), seed=PROMPT_SETS_SEED)
    start = 0
    for key, n in PROMPT_SETS.items():
        if key == name:
            return pool[start:start + n]
        start += n
    raise AssertionError(name)


def parse_prompt(prompt: str) -> list[Group]:
    """The groups a caption asks for. Accepts this world's captions and close variants
    ("3 blue squares in the top-left corner, a red circle"); raises ValueError naming the
    part it cannot read."""
    text = re.sub(r"\s+", " ", prompt.lower().replace("-", " ")).strip().rstrip(".")
    text = re.sub(r"\bon an? \w+ background\b", "", text)
    groups = []
    for part in re.split(r",| and ", text):
        part = part.strip()
        if not part:
            continue
        words = part.split()
        colour = next((w for w in words if w in COLOURS), None)
        shape = next((s for s in SHAPES for w in words if w in (s, s + "s")), None)
        if colour is None or shape is None:
            raise ValueError(f"cannot read {part!r} in prompt {prompt!r}: need a colour ({', '.join(COLOURS)}) "
                             f"and a shape ({', '.join(SHAPES)})")
        count = next((_NUMBERS[w] for w in words if w in _NUMBERS), 1)
        vert = next((w for w in words if w in ("top", "bottom", "upper", "lower")), None)
        horiz = next((w for w in words if w in ("left", "right")), None)
        vert = {"upper": "top", "lower": "bottom"}.get(vert, vert)
        region = " ".join(w for w in (vert, horiz) if w) or None
        groups.append(Group(count, colour, shape, region))
    if not groups:
        raise ValueError(f"prompt {prompt!r} names no shapes")
    return groups


def _background(rng: random.Random, name: str | None, size: int) -> np.ndarray:
    level = {"dark": rng.uniform(0.05, 0.25), "light": rng.uniform(0.75, 0.95)}.get(name, rng.uniform(0.3, 0.7))
    tint = np.array([rng.uniform(-0.03, 0.03) for _ in range(3)])
    img = np.full((size, size, 3), level) + tint
    yy, xx = np.mgrid[0:size, 0:size]
    amp = rng.uniform(0.08, 0.15)
    if name == "striped":
        period = rng.choice([6, 8, 10])
        axis = xx if rng.random() < 0.5 else yy
        img += (((axis // (period // 2)) % 2) * 2 - 1)[..., None] * amp
    elif name == "checkered":
        period = rng.choice([8, 12, 16])
        img += ((((xx // (period // 2)) + (yy // (period // 2))) % 2) * 2 - 1)[..., None] * amp
    elif name == "noisy":
        nrng = np.random.default_rng(rng.getrandbits(32))
        img += nrng.normal(0, amp * 0.7, (size, size, 1))
    return np.clip(img, 0, 1)


def _place(rng: random.Random, region: str | None, count: int, taken: list, size: int):
    """Centres and radii inside the region with no overlaps (None when it does not fit)."""
    x0, y0, x1, y1 = REGIONS[region]
    out = []
    for _ in range(count):
        for t in range(200):
            r = rng.uniform(0.075, 0.12) * size * (1 - t / 400)  # smaller when crowded
            m = 1.3 * r + 1  # a triangle reaches 1.25 r from its centre
            cx = rng.uniform(x0 * size + m, x1 * size - m)
            cy = rng.uniform(y0 * size + m, y1 * size - m)
            if all((cx - qx) ** 2 + (cy - qy) ** 2 > (1.2 * (r + qr) + 1.5) ** 2 for qx, qy, qr in taken + out):
                out.append((cx, cy, r))
                break
        else:
            return None
    return out


def render(scene: Scene, size: int = 64, seed: int = 0) -> np.ndarray:
    """The scene as float32 [size, size, 3] in [0, 1]; layout, sizes and colour jitter from `seed`."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    for _attempt in range(50):
        taken, placed = [], []
        for g in scene.groups:
            spots = _place(rng, g.region, g.count, taken, size)
            if spots is None:
                break
            taken += spots
            placed.append((g, spots))
        else:
            break
    else:
        raise ValueError(f"cannot place {prompt_of(scene)!r} in {size}px")
    bg = _background(rng, scene.background, size)
    k = 4  # supersampling
    canvas = Image.fromarray((np.kron(bg, np.ones((k, k, 1))) * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for g, spots in placed:
        rgb = tuple(int(np.clip(c + rng.uniform(-18, 18), 0, 255)) for c in COLOURS[g.colour])
        for cx, cy, r in spots:
            cx, cy, r = cx * k, cy * k, r * k
            if g.shape == "circle":
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
            elif g.shape == "square":
                h = r * 0.89  # same area as the circle
                draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=rgb)
            else:
                R = r * 1.25
                pts = [(cx + R * np.sin(a), cy - R * np.cos(a)) for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]
                draw.polygon(pts, fill=rgb)
    small = canvas.resize((size, size), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0
