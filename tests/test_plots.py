"""Metrics plot: panels for the Trainer's keys, NaN gaps, clear errors."""

import math

import pytest

from toy import Brightness, ToyVelocity, toy_encode
from treerpo.core.plots import PURPLE, nice_ticks, plot_metrics
from treerpo.core.presets import make_config
from treerpo.core.trainer import Trainer


def _titles(img):
    return [p["title"] for p in img.info["treerpo_panels"]]


def _px(panel, x, y):
    xlo, xhi, a, b = panel["x_map"]
    ylo, yhi, c, d = panel["y_map"]
    return a + (x - xlo) / (xhi - xlo) * (b - a), c + (y - ylo) / (yhi - ylo) * (d - c)


def _is(img, point, colour, radius=1, tol=60):
    x, y = (int(round(v)) for v in point)
    return any(
        sum(abs(p - q) for p, q in zip(img.getpixel((x + dx, y + dy)), colour)) <= tol
        for dx in range(-radius, radius + 1)
        for dy in range(-radius, radius + 1)
    )


def test_real_trainer_history_gets_a_panel_per_metric():
    trainer = Trainer(ToyVelocity(), make_config("dynamic-treerpo", num_steps=6, window_every=1), Brightness(),
                      encode=toy_encode, latent_shape=(4, 6, 6))
    history = [trainer.step(["a cat"]) for _ in range(3)]
    img = plot_metrics(history, title="toy run")
    titles = _titles(img)
    for want in ("reward: brightness (mean ± std)", "reward std within a group", "clipped fraction",
                 "ratio (mean)", "LayerTuning SFT loss", "window start (step)"):
        assert want in titles
    assert any(t.startswith("clip eps") for t in titles)
    assert "KL to reference" not in titles  # kl_beta = 0: always 0, not drawn
    assert img.mode == "RGB" and img.width >= 3 * 300


def test_missing_keys_are_skipped_and_layout_grows():
    one = plot_metrics([{"iteration": i, "eps_mean": 1e-3 * i} for i in range(4)])
    assert _titles(one) == ["clip eps (mean)"]
    band = plot_metrics([{"iteration": i, "eps_mean": 2e-3, "eps_min": 1e-3, "eps_max": 3e-3} for i in range(4)])
    assert _titles(band) == ["clip eps (mean, min-max)"]
    many = [{"iteration": i, "reward/hps/mean": 0.3, "reward/pick/mean": 21.0, "clip_frac_high": 0.1,
             "sft_loss": 0.2, "ratio_mean": 1.0} for i in range(4)]
    img = plot_metrics(many)
    assert _titles(img) == ["reward: hps", "reward: pick", "clipped fraction", "ratio (mean)", "LayerTuning SFT loss"]
    assert img.width > one.width and img.height > one.height


def test_points_are_placed_on_their_values_and_nan_breaks_the_line():
    vals = [0.0, 1.0, math.nan, None, 0.5]
    img = plot_metrics([{"iteration": 10 + i, "ratio_mean": v} for i, v in enumerate(vals)])
    (panel,) = img.info["treerpo_panels"]
    px0, py0, px1, py1 = panel["box"]
    lo_pt, hi_pt = _px(panel, 10, 0.0), _px(panel, 11, 1.0)
    assert lo_pt[1] > hi_pt[1]  # larger values higher up
    assert py0 < hi_pt[1] < lo_pt[1] < py1 and px0 < lo_pt[0] < hi_pt[0] < px1
    for x, y in ((10, 0.0), (11, 1.0), (14, 0.5)):  # markers on every finite point
        assert _is(img, _px(panel, x, y), PURPLE), (x, y)
    assert _is(img, _px(panel, 10.5, 0.5), PURPLE)  # the segment 10 -> 11
    # nothing bridges the NaN/None gap between iterations 11 and 14
    assert not _is(img, _px(panel, 12.5, 0.75), PURPLE, radius=2)


def test_all_nan_panel_and_single_iteration_render():
    img = plot_metrics([{"iteration": 0, "sft_loss": math.nan, "ratio_mean": 1.0}])
    panels = {p["title"]: p for p in img.info["treerpo_panels"]}
    assert panels["LayerTuning SFT loss"]["y_map"] is None  # "no finite values"
    assert _is(img, _px(panels["ratio (mean)"], 0, 1.0), PURPLE)


@pytest.mark.parametrize(
    "history, match",
    [
        ([], "history is empty"),
        (None, "history is empty"),
        ([{"iteration": 0}, "x"], r"history\[1\] is a str, expected a dict"),
        ([{"iteration": 0, "foo": 1.0}], "none of the Trainer's metric keys"),
    ],
)
def test_bad_history(history, match):
    with pytest.raises(ValueError, match=match):
        plot_metrics(history)


def test_nice_ticks():
    assert nice_ticks(0, 1, 5) == [0, 0.25, 0.5, 0.75, 1.0]
    t = nice_ticks(0.013, 0.087, 5)
    assert t[0] >= 0.013 and t[-1] <= 0.087 and len(t) >= 3
    steps = {round(b - a, 12) for a, b in zip(t, t[1:])}
    assert steps == {0.02}
