"""The `shapes` prompt-fidelity reward: correct renders score high, each kind of wrong image
clearly lower, robust to blur and noise, dense partial credit, parts, registry, errors."""

import dataclasses
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from treerpo.core.rewards import ShapesReward, available_rewards, load_reward, load_rewards, parse_reward_spec
from treerpo.core.rewards.shapes import _components, detect_objects
from treerpo.core.shapes import COLOURS, SHAPES, Group, Scene, prompt_of, render, sample_scene

PARTS = {"colour", "count", "shape", "position", "total"}


def tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).repeat(3, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(3, 1, 1, -1), groups=3)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(3, 1, -1, 1), groups=3)


def down_up(x: torch.Tensor, size: int) -> torch.Tensor:
    small = F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(small, size=x.shape[-2:], mode="bilinear", align_corners=False)


def noisy(x: torch.Tensor, std: float) -> torch.Tensor:
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)


def _with(scene: Scene, j: int, **change) -> Scene:
    groups = tuple(dataclasses.replace(g, **change) if i == j else g for i, g in enumerate(scene.groups))
    return Scene(groups, scene.background)


@pytest.fixture(scope="module")
def reward():
    return ShapesReward()


@pytest.fixture(scope="module")
def cases():
    """200 random scenes rendered at 64 px, and for each the wrong variants that exist, all
    scored against the correct scene's caption: {kind: (images [N,3,64,64], prompts, index of
    the correct image)}."""
    rng = random.Random(1)
    out: dict[str, tuple[list, list, list]] = {}

    def add(kind, img, prompt, i):
        imgs, prompts, idx = out.setdefault(kind, ([], [], []))
        imgs.append(tensor(img))
        prompts.append(prompt)
        idx.append(i)

    for i in range(200):
        s = sample_scene(rng)
        p = prompt_of(s)
        add("correct", render(s, 64, seed=i), p, i)
        unused = [c for c in COLOURS if c not in {g.colour for g in s.groups}]
        recoloured = Scene(tuple(dataclasses.replace(g, colour=unused[k]) for k, g in enumerate(s.groups)),
                           s.background)
        add("colour", render(recoloured, 64, seed=i), p, i)
        j = rng.randrange(len(s.groups))
        g = s.groups[j]
        add("shape", render(_with(s, j, shape=SHAPES[(SHAPES.index(g.shape) + 1) % 3]), 64, seed=i), p, i)
        if g.count > 1:
            add("one fewer", render(_with(s, j, count=g.count - 1), 64, seed=i), p, i)
        if g.count < 3:
            try:
                add("one more", render(_with(s, j, count=g.count + 1), 64, seed=i), p, i)
            except ValueError:  # a quadrant full already
                pass
        if any(h.region is not None and h.region.endswith(("left", "right")) for h in s.groups):
            add("mirrored", render(s, 64, seed=i)[:, ::-1], p, i)
        add("empty", render(Scene((), s.background), 64, seed=i), p, i)
    return {k: (torch.stack(v[0]), v[1], v[2]) for k, v in out.items()}


# ---------------------------------------------------------------------------- correct vs wrong
def test_correct_renders_score_high(reward, cases):
    x, prompts, _ = cases["correct"]
    parts = reward.parts(x, prompts)
    assert parts["total"].mean() > 0.97 and parts["total"].min() > 0.85  # measured 0.995, 0.94
    for key in ("colour", "count", "shape", "position"):
        assert parts[key].mean() > 0.97, key


# kind: (bound on the mean total, the part that must drop, bound on that part's mean);
# measured means: colour 0.000, shape 0.504 (shape part 0.26), one fewer 0.655 (count 0.49),
# one more 0.686 (count 0.53), mirrored 0.358 (position 0.04), empty 0.000
WRONG = {
    "colour": (0.05, "colour", 0.05),
    "shape": (0.6, "shape", 0.4),
    "one fewer": (0.75, "count", 0.6),
    "one more": (0.75, "count", 0.65),
    "mirrored": (0.45, "position", 0.1),
    "empty": (0.01, "colour", 0.01),
}


@pytest.mark.parametrize("kind", list(WRONG))
def test_wrong_images_score_clearly_lower(reward, cases, kind):
    x, prompts, idx = cases[kind]
    assert len(prompts) >= 100
    parts = reward.parts(x, prompts)
    bound, part, part_bound = WRONG[kind]
    assert parts["total"].mean() < bound
    assert parts[part].mean() < part_bound
    # image by image: below the correct image of the same scene
    right = reward.score(cases["correct"][0][idx], prompts)
    assert (parts["total"] < right - 0.1).float().mean() > 0.95


@pytest.mark.parametrize("kind", ["colour", "shape", "one fewer", "mirrored", "empty"])
def test_wrong_images_stay_wrong_when_blurred_or_noisy(reward, cases, kind):
    x, prompts, _ = cases[kind]
    assert reward.score(gaussian_blur(x, 1.0), prompts).mean() < WRONG[kind][0]
    assert reward.score(noisy(x, 0.05), prompts).mean() < WRONG[kind][0]  # no specks taken for objects


# ---------------------------------------------------------------------------- robustness
# transform: bound on the mean total of the correct images; measured: 0.990, 0.958, 0.854, 0.993,
# 0.992 (bleed: 30% of a sigma-3 blur mixed in, then sigma 0.7), 0.984 (chroma x 0.35, then blur)
ROBUST = {
    "gaussian sigma 1": (lambda x: gaussian_blur(x, 1.0), 0.95),
    "down to 24 px and up": (lambda x: down_up(x, 24), 0.9),
    "down to 16 px and up": (lambda x: down_up(x, 16), 0.78),
    "noise 0.03": (lambda x: noisy(x, 0.03), 0.97),
    "colour bleed": (lambda x: gaussian_blur(0.7 * x + 0.3 * gaussian_blur(x, 3.0), 0.7), 0.95),
    "faded and blurred": (lambda x: gaussian_blur(x.mean(1, keepdim=True) * 0.65 + 0.35 * x, 1.0), 0.93),
}


@pytest.mark.parametrize("name", list(ROBUST))
def test_robust_to_blur_noise_and_bleed(reward, cases, name):
    transform, bound = ROBUST[name]
    x, prompts, _ = cases["correct"]
    score = reward.score(transform(x), prompts)
    assert score.mean() > bound
    # still above every wrong kind's sharp mean
    assert score.mean() > max(b for b, _, _ in WRONG.values())


def test_other_image_sizes():
    rng = random.Random(5)
    scenes = [sample_scene(rng) for _ in range(60)]
    prompts = [prompt_of(s) for s in scenes]
    reward = ShapesReward()
    for size in (48, 128, 256):
        x = torch.stack([tensor(render(s, size, seed=i)) for i, s in enumerate(scenes)])
        assert reward.score(x, prompts).mean() > 0.95, size
        assert reward.score(x.flip(-1), prompts).mean() < 0.9, size  # many captions name left/right


# ---------------------------------------------------------------------------- hand-drawn images
def draw(objects, size=64, background=(110, 110, 110)):
    """[3, size, size] image of (shape, colour, cx, cy, radius) objects in pixel units."""
    img = Image.new("RGB", (size * 4, size * 4), background)
    d = ImageDraw.Draw(img)
    for shape, colour, cx, cy, r in objects:
        cx, cy, r, rgb = cx * 4, cy * 4, r * 4, COLOURS[colour]
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        else:
            d.polygon([(cx, cy - r), (cx + r * 0.87, cy + r / 2), (cx - r * 0.87, cy + r / 2)], fill=rgb)
    small = img.resize((size, size), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255).permute(2, 0, 1)


def test_hand_drawn_red_circle_on_the_left(reward):
    x = draw([("circle", "red", 16, 38, 7)]).unsqueeze(0).repeat(6, 1, 1, 1)
    prompts = ["a red circle on the left", "a red square on the left", "a blue circle on the left",
               "two red circles on the left", "a red circle on the right", "a red circle at the top left"]
    parts = reward.parts(x, prompts)
    total = parts["total"].tolist()
    assert total[0] > 0.95
    assert total[1] < 0.6 and parts["shape"][1] < 0.1      # wrong shape
    assert total[2] == 0.0 and parts["colour"][2] == 0.0   # wrong colour
    assert total[3] < 0.7 and parts["count"][3].item() == pytest.approx(0.25, abs=0.02)  # (1/2)^2
    assert total[4] < 0.4 and parts["position"][4] == 0.0  # wrong side
    assert 0.3 < parts["position"][5] < 0.7                # centre at 0.6 of the height: just below the box


def test_count_and_position_give_partial_credit(reward):
    """Dense: closer counts and positions score higher, step by step."""
    squares = [("square", "blue", 12 + 20 * i, 32, 5) for i in range(3)]
    counts = [reward.score(draw(squares[:n]).unsqueeze(0), ["three blue squares"]).item() for n in range(4)]
    assert counts[0] == 0.0 and counts[0] < counts[1] < counts[2] < counts[3] and counts[3] > 0.95
    xs = [20, 34, 38, 42, 46]  # a circle moving right, prompt wants it on the left (box ends at x = 32)
    pos = reward.parts(torch.stack([draw([("circle", "green", cx, 32, 6)]) for cx in xs]),
                       ["a green circle on the left"] * len(xs))["position"].tolist()
    assert pos[0] == 1.0 and all(a > b for a, b in zip(pos[1:], pos[2:])) and pos[1] > 0.5 and pos[-1] == 0.0


def test_extra_colours_lower_the_score(reward):
    one = draw([("triangle", "yellow", 20, 20, 8)])
    extra = draw([("triangle", "yellow", 20, 20, 8), ("circle", "purple", 45, 45, 7)])
    s = {k: v.tolist() for k, v in reward.parts(torch.stack([one, extra]), ["a yellow triangle"] * 2).items()}
    assert s["total"][0] > 0.95 and s["total"][1] == pytest.approx(s["total"][0] / 2, abs=0.02)
    assert s["colour"][1] == pytest.approx(0.5, abs=0.02)


def test_two_groups_of_one_colour_are_told_apart(reward):
    scene = Scene((Group(1, "red", "circle", "left"), Group(2, "red", "square", "right")))
    x = tensor(render(scene, 64, seed=3)).unsqueeze(0)
    prompt = prompt_of(scene)
    assert reward.score(x, [prompt]).item() > 0.95
    assert reward.score(x.flip(-1), [prompt]).item() < 0.5


def test_detect_objects_finds_the_rendered_objects():
    scene = Scene((Group(3, "green", "triangle", None), Group(2, "blue", "square", "bottom")), "checkered")
    det = detect_objects(tensor(render(scene, 64, seed=7)).unsqueeze(0))
    colours = [list(COLOURS)[c] for c in det["colour"].tolist()]
    assert sorted(colours) == ["blue", "blue", "green", "green", "green"]
    assert (det["weight"] == 1).all()
    best = [SHAPES[i] for i in det["shape_p"].argmax(1).tolist()]
    assert [b for b, c in zip(best, colours) if c == "blue"] == ["square", "square"]
    assert [b for b, c in zip(best, colours) if c == "green"] == ["triangle"] * 3
    assert (det["cy"][[c == "blue" for c in colours]] > 0.5).all()


def test_components_match_a_flood_fill():
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(6, 17, 23, generator=g) < torch.linspace(0.3, 0.7, 6).view(6, 1, 1)
    labels = _components(masks)
    for m, lab in zip(masks.tolist(), labels.tolist()):
        h, w = len(m), len(m[0])
        ref = [[0] * w for _ in range(h)]
        n = 0
        for y in range(h):
            for x in range(w):
                if m[y][x] and not ref[y][x]:
                    n += 1
                    ref[y][x], stack = n, [(y, x)]
                    while stack:
                        a, b = stack.pop()
                        for yy, xx in ((a - 1, b), (a + 1, b), (a, b - 1), (a, b + 1)):
                            if 0 <= yy < h and 0 <= xx < w and m[yy][xx] and not ref[yy][xx]:
                                ref[yy][xx] = n
                                stack.append((yy, xx))
        pairs = {(ref[y][x], lab[y][x]) for y in range(h) for x in range(w) if m[y][x]}
        assert n > 3 and len(pairs) == n == len({p[1] for p in pairs})  # one label per component
        assert all(lab[y][x] == 0 for y in range(h) for x in range(w) if not m[y][x])


# ---------------------------------------------------------------------------- interface
def test_parts_keys_ranges_and_nan(reward, cases):
    x, prompts, _ = cases["shape"]
    x, prompts = x[:20].clone(), prompts[:20]
    x[3, 0, 5, 5] = float("nan")
    parts = reward.parts(x, prompts)
    assert set(parts) == PARTS
    for key, v in parts.items():
        assert v.shape == (20,) and v.dtype == torch.float32
        ok = torch.ones(20, dtype=torch.bool)
        ok[3] = False
        assert torch.isnan(v[3]) and ((v[ok] >= 0) & (v[ok] <= 1)).all(), key
    assert torch.equal(reward.score(x, prompts)[ok], parts["total"][ok])
    assert set(reward.parts(x[:0], []).keys()) == PARTS


def test_registry_and_combination_with_a_weight_free_reward(cases):
    assert "shapes" in available_rewards()
    assert parse_reward_spec("Shapes:1.0, brightness:0.2") == [("shapes", 1.0), ("brightness", 0.2)]
    assert isinstance(load_reward("shapes"), ShapesReward)
    rs = load_rewards("shapes:1.0,brightness:0.2")
    x, prompts, _ = cases["correct"]
    x, prompts = x[:8], prompts[:8]
    s = rs(x, prompts)
    assert rs.names == ["shapes", "brightness"] and rs.weights == [1.0, 0.2] and s.shape == (8, 2)
    assert torch.equal(s[:, 0], ShapesReward().score(x, prompts))
    assert torch.allclose(s[:, 1], load_reward("brightness").score(x, prompts))
    assert torch.allclose(rs.weighted_sum(s), s[:, 0] + 0.2 * s[:, 1])
    assert ShapesReward.typical_range == (0.0, 1.0) and ShapesReward.name == "shapes"


def test_unreadable_prompt_names_it(reward):
    x = torch.rand(2, 3, 64, 64)
    with pytest.raises(ValueError, match="a pink hexagon"):
        reward.score(x, ["a red circle", "a pink hexagon on the left"])
    with pytest.raises(ValueError, match="a pink hexagon"):
        reward.parts(x, ["a red circle", "a pink hexagon on the left"])


def test_layout_reward_is_the_mean_of_colour_count_and_position(reward, cases):
    """shapes-layout leaves the shape part out: a wrong shape costs it nothing, a wrong colour or
    a missing object as much as in the parts."""
    from treerpo.core.rewards import ShapesLayoutReward

    assert isinstance(load_reward("shapes-layout"), ShapesLayoutReward)
    layout = ShapesLayoutReward()
    for kind in ("correct", "shape", "colour", "empty"):
        x, prompts, _ = cases[kind]
        x, prompts = x[:12], prompts[:12]
        p = reward.parts(x, prompts)
        torch.testing.assert_close(layout.score(x, prompts), (p["colour"] + p["count"] + p["position"]) / 3)
    x, prompts, _ = cases["shape"]
    assert float(layout.score(x, prompts).mean()) > float(reward.score(x, prompts).mean()) + 0.3


def test_colour_reward_is_the_colour_part(reward, cases):
    """shapes-colour scores only whether the asked colours are there and no others: a wrong shape,
    count or place costs it nothing, a wrong colour everything."""
    from treerpo.core.rewards import ShapesColourReward

    assert isinstance(load_reward("shapes-color"), ShapesColourReward)
    colour = ShapesColourReward()
    for kind in ("correct", "shape", "colour", "empty"):
        x, prompts, _ = cases[kind]
        x, prompts = x[:12], prompts[:12]
        torch.testing.assert_close(colour.score(x, prompts), reward.parts(x, prompts)["colour"])
    assert float(colour.score(*cases["shape"][:2]).mean()) > 0.9
    assert float(colour.score(*cases["colour"][:2]).mean()) < 0.5


def test_crisp_reward_falls_with_blur_and_ignores_the_prompt(cases):
    """shapes-crisp: sharp renders score high, every blur lower and more blur lower still, a washed-out
    fill fill lower, an image without objects 0; the prompt does not matter; hand-made counts are exact."""
    from treerpo.core.rewards import ShapesCrispReward
    from treerpo.core.rewards.shapes import crispness

    assert isinstance(load_reward("shapes-crisp"), ShapesCrispReward)
    crisp = ShapesCrispReward()
    x, prompts, _ = cases["correct"]
    x, prompts = x[:40], prompts[:40]
    sharp = crisp.score(x, prompts)
    assert float(sharp.mean()) > 0.75
    torch.testing.assert_close(crisp.score(x, ["three purple triangles"] * len(x)), sharp)
    blurred = [crisp.score(gaussian_blur(x, s), prompts) for s in (0.7, 1.2, 2.0)]
    for lo, hi in zip(blurred[1:], [sharp] + blurred[:-1]):
        assert float(lo.mean()) < float(hi.mean()) - 0.05
    assert float(crisp.score(down_up(x, 24), prompts).mean()) < float(sharp.mean()) - 0.1
    grey = torch.full((1, 3, 64, 64), 0.5)
    uneven = 0.5 + (x - 0.5) * torch.linspace(0.3, 1.0, 64)  # chroma fading from right to left
    assert float(crisp.score(uneven, prompts).mean()) < float(sharp.mean()) - 0.1
    grey_noise = (grey + 0.1 * torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert float(crisp.score(torch.cat([grey, grey_noise]), ["a red circle"] * 2).abs().max()) == 0.0

    # by hand: a red square of 10 x 10 pixels at full chroma with a 1-pixel ring at 0.5 of it
    # (11 x 11 ... 12 x 12 minus the core: 44 pixels) and a ring at 0.1 (below CRISP_OBJECT: not counted)
    img = torch.full((3, 32, 32), 0.5)
    red = torch.tensor([0.86, 0.16, 0.16]).view(3, 1, 1)
    for lo, hi, t in ((9, 23, 0.1), (10, 22, 0.5), (11, 21, 1.0)):
        img[:, lo:hi, lo:hi] = 0.5 + t * (red - 0.5)
    torch.testing.assert_close(crispness(img[None]), torch.tensor([100 / 144]))
    # large images are scaled down to 64 px first, so a 4x upsample scores as the original
    up = F.interpolate(x[:8], scale_factor=4, mode="nearest")
    torch.testing.assert_close(crisp.score(up, prompts[:8]), sharp[:8])


def test_crisp_asked_counts_only_the_prompts_colours(cases):
    """shapes-crisp-asked: renders drawn in the prompt's colours score as shapes-crisp; drawn in other
    colours they score 0 (no solid pixel of an asked colour); a by-hand image with one asked and one
    other colour counts only the asked one's solid pixels over both objects' pixels."""
    from treerpo.core.rewards import ShapesCrispAskedReward, ShapesCrispReward
    from treerpo.core.rewards.shapes import crispness

    assert isinstance(load_reward("shapes-crisp-asked"), ShapesCrispAskedReward)
    asked, crisp = ShapesCrispAskedReward(), ShapesCrispReward()
    x, prompts, _ = cases["correct"]
    x, prompts = x[:40], prompts[:40]
    # (edge pixels blended between two colours may fall nearer a third hue: a few hundredths at most)
    diff = crisp.score(x, prompts) - asked.score(x, prompts)
    assert float(diff.min()) >= 0 and float(diff.max()) < 0.03 and float(diff.mean()) < 0.002
    wrong, wrong_prompts, _ = cases["colour"]  # renders in colours the prompts do not ask for
    wrong, wrong_prompts = wrong[:40], wrong_prompts[:40]
    assert float(asked.score(wrong, wrong_prompts).mean()) < 0.5 * float(crisp.score(wrong, wrong_prompts).mean())

    # by hand: a solid 10 x 10 red square and a solid 6 x 6 blue one; "a red square" counts 100 of 136
    img = torch.full((3, 32, 32), 0.5)
    img[:, 2:12, 2:12] = torch.tensor([220, 40, 40]).view(3, 1, 1) / 255
    img[:, 20:26, 20:26] = torch.tensor([40, 85, 230]).view(3, 1, 1) / 255
    torch.testing.assert_close(crispness(img[None]), torch.tensor([1.0]))
    torch.testing.assert_close(asked.score(img[None], ["a red square"]), torch.tensor([100 / 136]))
    torch.testing.assert_close(asked.score(img[None], ["a red square and a blue circle"]), torch.tensor([1.0]))
