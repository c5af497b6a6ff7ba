"""Tree preview: node x0 predictions of a real rollout, and the picture's structure."""

import pytest
import torch
from PIL import Image

from toy import ToyVelocity, toy_encode
from treerpo.core.preview import EDGE, GOLD, node_x0, render_tree, shown_layers, to_pil
from treerpo.core.schedule import flux_sigmas
from treerpo.core.tree import TreeSpec, rollout


def _tree(branching=(2, 2, 2, 1), share_prefix=True, steps=10, tau=2, store_velocity=True):
    model = ToyVelocity(seed=1)
    spec = TreeSpec(steps, tau, branching)
    g = torch.Generator().manual_seed(0)
    init = torch.randn((1, 4, 6, 6), generator=g)
    levels = [0.7 + 0.1 * k for k in range(len(branching))]
    cond = toy_encode(["a red fox"])[0]
    tree = rollout(model, cond, spec, flux_sigmas(steps, shift=3.0), levels, init, g,
                   share_prefix=share_prefix, store_velocity=store_velocity)
    return tree, model, cond


def _colour(k, j):
    """A distinct solid colour per (level, row)."""
    return (40 + 50 * k % 200, 30 + (37 * j) % 200, 200 - 20 * k)


def _solid_images(tree):
    rows = [layer.parents.shape[0] for layer in tree.layers] + [tree.leaves.shape[0]]
    return [[Image.new("RGB", (8, 8), _colour(k, j)) for j in range(n)] for k, n in enumerate(rows)]


def _near(pixel, colour, tol=40):
    return sum(abs(a - b) for a, b in zip(pixel, colour)) <= tol


def _line_colour_at(img, point, colour):
    """Whether a pixel within one pixel of ``point`` (an anti-aliased line's centre) has ``colour``."""
    x, y = (int(c) for c in point)
    return any(_near(img.getpixel((x + dx, y + dy)), colour) for dx in (-1, 0, 1) for dy in (-1, 0, 1))


@pytest.mark.parametrize("share_prefix", [True, False])
def test_node_x0_is_parents_minus_sigma_times_the_models_velocity(share_prefix):
    tree, model, cond = _tree(share_prefix=share_prefix)
    x0 = node_x0(tree)
    assert len(x0) == tree.spec.depth + 1
    for k, layer in enumerate(tree.layers):
        n = layer.parents.shape[0]
        assert n == (tree.spec.nodes(k) if share_prefix else tree.spec.leaves)
        # independent: call the model again on the stored parents
        with torch.no_grad():
            v = model(layer.parents, torch.full((n,), layer.sigma), {"emb": cond["emb"].expand(n, -1)})
        torch.testing.assert_close(x0[k], layer.parents - layer.sigma * v, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(x0[k], layer.parents)  # sigma * v is not negligible
    torch.testing.assert_close(x0[-1], tree.leaves)


def test_node_x0_needs_velocities_and_leaves():
    tree, _, _ = _tree(store_velocity=False)
    with pytest.raises(ValueError, match="store_velocity=True"):
        node_x0(tree)
    tree, _, _ = _tree()
    tree.leaves = None
    with pytest.raises(ValueError, match="tree.leaves"):
        node_x0(tree)


def _render(tree, **kw):
    L = tree.spec.leaves
    rewards = torch.stack([torch.linspace(0, 1, L), torch.linspace(1, 0, L) ** 2], 1)
    kw.setdefault("rewards", rewards)
    kw.setdefault("reward_names", ["hps", "pickscore"])
    kw.setdefault("advantages", torch.linspace(-1, 1, L))
    kw.setdefault("eps", torch.full((L,), 1e-3))
    return render_tree(tree, kw.pop("images", _solid_images(tree)), title="a red fox", **kw)


def test_size_grows_with_leaves_and_thumb():
    t8, t16 = _tree((2, 2, 2, 1))[0], _tree((2, 2, 2, 2))[0]
    a, b = _render(t8), _render(t16)
    assert b.width > a.width + 6 * 96  # 8 more leaf columns
    assert _render(t8, thumb=128).height > a.height


def test_thumbnails_sit_on_their_nodes_and_best_path_is_gold():
    tree, _, _ = _tree((2, 2, 2, 1))
    L = tree.spec.leaves
    adv = torch.zeros(L)
    adv[5], adv[1] = 2.0, -1.0
    img = _render(tree, advantages=adv)
    layout = img.info["treerpo_layout"]
    assert layout["best_leaf"] == 5
    # every node shows the thumbnail of its row (shared prefix: node n is row n)
    for (k, n), box in layout["nodes"].items():
        centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
        assert img.getpixel(centre) == _colour(k, n), (k, n)
    # the gold edges are exactly leaf 5's path, computed from the tree's own indices
    path = [int(layer.parent_index[layer.edge_of_leaf[5]]) for layer in tree.layers] + [5]
    want = {((k, path[k]), (k + 1, path[k + 1])) for k in range(tree.spec.depth)}
    got = {(e["parent"], e["child"]) for e in layout["edges"] if e["best"]}
    assert got == want
    for e in layout["edges"]:
        assert _line_colour_at(img, e["mid"], GOLD if e["best"] else EDGE), (e["parent"], e["child"])
        assert not _line_colour_at(img, e["mid"], EDGE if e["best"] else GOLD), (e["parent"], e["child"])
    # a gold ring around the best leaf, none around another leaf
    box, other = layout["nodes"][(4, 5)], layout["nodes"][(4, 2)]
    assert _near(img.getpixel((box[0] - 5, box[1] + 10)), GOLD)
    assert not _near(img.getpixel((other[0] - 5, other[1] + 10)), GOLD)


def test_best_path_falls_back_to_rewards_and_none_when_all_equal():
    tree, _, _ = _tree((2, 2, 1))
    L = tree.spec.leaves
    r = torch.zeros(L, 2)
    r[2] = torch.tensor([0.5, 1.0])
    r[3, 0] = float("nan")  # an invalid leaf never wins, and still renders
    img = _render(tree, rewards=r, advantages=None)
    assert img.info["treerpo_layout"]["best_leaf"] == 2
    img = _render(tree, rewards=torch.ones(L, 2), advantages=torch.zeros(L))
    layout = img.info["treerpo_layout"]
    assert layout["best_leaf"] is None
    assert not any(e["best"] for e in layout["edges"])
    assert all(_line_colour_at(img, e["mid"], EDGE) for e in layout["edges"])
    assert not any(_line_colour_at(img, e["mid"], GOLD) for e in layout["edges"])


def test_unshared_baseline_draws_one_root_and_g_chains():
    tree, _, _ = _tree((12, 1, 1, 1), share_prefix=False)
    assert [layer.parents.shape[0] for layer in tree.layers] == [12] * 4
    adv = torch.linspace(-1, 1, 12)
    img = _render(tree, advantages=adv)
    layout = img.info["treerpo_layout"]
    per_level = [sum(1 for (k, _) in layout["nodes"] if k == lvl) for lvl in range(5)]
    assert per_level == [1, 12, 12, 12, 12]
    # node n of layer k >= 1 shows row n; the root shows row 0
    for (k, n), box in layout["nodes"].items():
        assert img.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)) == _colour(k, n)
    best = [(e["parent"], e["child"]) for e in layout["edges"] if e["best"]]
    assert best == [((0, 0), (1, 11)), ((1, 11), (2, 11)), ((2, 11), (3, 11)), ((3, 11), (4, 11))]
    # wide enough for 12 thumbnails side by side
    assert img.width >= 12 * 96


def test_deep_window_skips_single_child_layers():
    tree, _, _ = _tree((3,) + (1,) * 13, steps=16, tau=1)
    levels = shown_layers(tree, max_layers=6)
    # layer 0, the first layer after the branching, the last layer, the leaves, then evenly spaced
    assert levels == [0, 1, 2, 7, 12, 13, 14]
    assert shown_layers(tree, max_layers=20) == list(range(15))
    images = _solid_images(tree)
    images = [row if k in levels else None for k, row in enumerate(images)]
    img = _render(tree, images=images, max_layers=6)
    layout = img.info["treerpo_layout"]
    assert sorted({k for (k, _) in layout["nodes"]}) == levels
    assert any(e["child"][0] - e["parent"][0] > 1 for e in layout["edges"])  # dashed jumps


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(images="drop"), r"images has 4 entries, expected depth \+ 1 = 5"),
        (dict(images="short"), r"images\[2\] has 3 thumbnails, expected 4"),
        (dict(images="none"), r"images\[1\] has None"),
        (dict(images="tensor"), r"images\[0\]\[0\] is a Tensor, expected a PIL image"),
        (dict(rewards=torch.zeros(7, 2)), r"rewards has shape \(7, 2\), expected \[leaves=8"),
        (dict(reward_names=["hps"]), r"reward_names has 1 names for the 2 reward columns"),
        (dict(advantages=torch.zeros(9)), r"advantages has 9 values, expected one per leaf \(8\)"),
        (dict(eps=torch.zeros(3)), r"eps has 3 values"),
        (dict(thumb=4), r"thumb must be an integer >= 16"),
    ],
)
def test_bad_input_names_the_argument(kw, match):
    tree, _, _ = _tree((2, 2, 2, 1))
    images = _solid_images(tree)
    mode = kw.pop("images", None)
    if mode == "drop":
        images = images[:-1]
    elif mode == "short":
        images[2] = images[2][:3]
    elif mode == "none":
        images[1] = None
    elif mode == "tensor":
        images[0] = [torch.zeros(3, 8, 8)]
    with pytest.raises(ValueError, match=match):
        _render(tree, images=images, **kw)


def test_large_thumbnails_are_downscaled_to_thumb():
    tree, _, _ = _tree((2, 1))
    images = [[Image.new("RGB", (300, 200), (10, 200, 30)) for _ in range(n)] for n in (1, 2, 2)]
    img = render_tree(tree, images, thumb=64)
    box = img.info["treerpo_layout"]["nodes"][(2, 1)]
    assert box[2] - box[0] == 64 and box[3] - box[1] == 64
    # letterboxed: the colour fills the middle, not the top rows of the square
    assert img.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)) == (10, 200, 30)
    assert img.getpixel(((box[0] + box[2]) // 2, box[1] + 2)) != (10, 200, 30)


def test_to_pil_converts_a_decoded_batch():
    batch = torch.zeros(2, 3, 4, 5)
    batch[1, 0] = 1.0  # red
    batch[0, :, 0, 0] = torch.tensor([0.5, 2.0, -1.0])  # clamped into [0, 1]
    a, b = to_pil(batch)
    assert a.size == (5, 4) and a.mode == "RGB"
    assert b.getpixel((3, 2)) == (255, 0, 0)
    assert a.getpixel((0, 0)) == (128, 255, 0)
    assert to_pil(torch.ones(1, 1, 2, 2))[0].getpixel((1, 1)) == (255, 255, 255)
    with pytest.raises(ValueError, match=r"\[batch, 3 or 1, height, width\]"):
        to_pil(torch.zeros(3, 4, 4))


def test_the_layout_step_is_pure_and_is_what_the_picture_uses():
    """tree_layout computes the geometry without drawing; render_tree paints exactly it."""
    from treerpo.core.preview import best_leaf, tree_layout

    tree, _, _ = _tree()
    adv = torch.linspace(-1, 1, tree.spec.leaves)
    img = render_tree(tree, _solid_images(tree), advantages=adv, thumb=48)
    lay = tree_layout(tree, shown_layers(tree), 48, [], (False, True, False), best_leaf(adv, None), "")
    assert (lay.width, lay.height) == img.size
    info = img.info["treerpo_layout"]
    assert lay.boxes == info["nodes"] and lay.edges == info["edges"] and lay.best == info["best_leaf"]
    assert lay.leaves == tree.spec.leaves and lay.on_path == {(k, lay.best // lay.span[k]) for k in lay.levels}
