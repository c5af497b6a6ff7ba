"""The evaluation protocol (core/evaluate.py, core/shapes/world.py): fixed disjoint prompt sets,
bootstrap intervals over prompts checked against an independent computation, paired gains, and
samples that do not depend on how prompts are batched."""

from __future__ import annotations

import contextlib
import random

import pytest
import torch

from treerpo.core.evaluate import Evaluation, bootstrap_interval, evaluate, sample_fixed_noise
from treerpo.core.shapes.world import PROMPT_SETS, parse_prompt, prompt_set


def test_prompt_sets_are_fixed_disjoint_and_readable():
    sets = {name: prompt_set(name) for name in PROMPT_SETS}
    assert {k: len(v) for k, v in sets.items()} == {"test": 128, "validation": 128, "train": 512}
    assert all(len(set(v)) == len(v) for v in sets.values())
    assert not set(sets["test"]) & set(sets["validation"])
    assert not set(sets["train"]) & (set(sets["test"]) | set(sets["validation"]))
    assert sets == {name: prompt_set(name) for name in PROMPT_SETS}  # deterministic
    # the first captions, pinned: a change of the world's generator must not silently move the test set
    assert sets["test"][0] == ("a yellow circle at the bottom left and two green triangles at the top left on a dark "
                               "background")
    assert sets["train"][-1] and all(parse_prompt(p) for v in sets.values() for p in v)
    with pytest.raises(ValueError, match="unknown prompt set 'held-out'"):
        prompt_set("held-out")


def _reference_bootstrap(x: list[float], samples: int, seed: int, level: float = 0.95):
    """Independent computation: a Python loop over the same resampling indices, sorted means and
    linearly interpolated percentiles."""
    idx = torch.randint(len(x), (samples, len(x)), generator=torch.Generator().manual_seed(seed)).tolist()
    means = sorted(sum(x[i] for i in row) / len(x) for row in idx)

    def pct(q):
        pos = q * (samples - 1)
        lo = int(pos)
        return means[lo] + (means[min(lo + 1, samples - 1)] - means[lo]) * (pos - lo)

    return sum(x) / len(x), pct((1 - level) / 2), pct(1 - (1 - level) / 2)


def test_bootstrap_interval_matches_an_independent_computation():
    rng = random.Random(3)
    x = [rng.gauss(0.3, 0.1) for _ in range(37)]
    got = bootstrap_interval(torch.tensor(x, dtype=torch.float64), samples=500, seed=5)
    mean, lo, hi = _reference_bootstrap(x, 500, 5)
    assert (got.mean, got.lo, got.hi) == pytest.approx((mean, lo, hi), abs=1e-12)
    # the interval of a mean of n iid values is about +-1.96 sd / sqrt(n)
    big = torch.randn(400, generator=torch.Generator().manual_seed(0)).double()
    iv = bootstrap_interval(big)
    assert (iv.hi - iv.lo) / 2 == pytest.approx(1.96 * float(big.std()) / 20, rel=0.15)
    one = bootstrap_interval(torch.tensor([0.5]))
    assert (one.mean, one.lo, one.hi) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="at least one prompt"):
        bootstrap_interval(torch.tensor([]))


def test_paired_gain_is_tighter_than_the_difference_of_two_intervals():
    """Prompts differ a lot, the trained state adds +0.05 to each: the paired interval sees the
    gain clearly, while the two means' intervals overlap."""
    g = torch.Generator().manual_seed(1)
    base = torch.rand(64, 1, generator=g).expand(64, 2) + 0.01 * torch.randn(64, 2, generator=g)
    after = base + 0.05 + 0.01 * torch.randn(64, 2, generator=g)
    ev = Evaluation([f"p{i}" for i in range(64)], [0, 1], "test set", scores={"base": base, "after": after})
    gain, a, b = ev.gain("base", "after"), ev.interval("base"), ev.interval("after")
    assert gain.mean == pytest.approx(float((after - base).mean()), abs=1e-7)
    assert 0 < gain.lo < 0.05 < gain.hi and gain.hi - gain.lo < 0.01
    assert a.hi > b.lo  # unpaired intervals overlap
    line = ev.summary()
    assert line.startswith("test set, 64 prompts x 2 seeds") and "after - base +0.05" in line and "(paired)" in line
    d = ev.as_dict()
    assert d["set"] == "test set" and d["gain"]["after-base"]["lo"] == gain.lo
    # a (prompt, seed) cell that is not finite in one state is left out of both
    base2 = base.clone()
    base2[0, 0] = float("nan")
    ev2 = Evaluation(ev.prompts, ev.seeds, scores={"base": base2, "after": after})
    per_prompt_0 = float(after[0, 1] - base[0, 1])
    rest = (after[1:] - base[1:]).mean(1)
    assert ev2.gain("base", "after").mean == pytest.approx(float((rest.sum() + per_prompt_0) / 64), abs=1e-7)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from treerpo.core.models import LoraSettings, load_flux
    from treerpo.core.shapes.model import pretrained_dir

    return load_flux(pretrained_dir(), lora=LoraSettings(rank=4, alpha=4), cache_dir=tmp_path_factory.mktemp("emb"))


SHAPE = (16, 8, 8)  # 32 px on tiny-shapes


def test_samples_do_not_depend_on_the_batching(stack):
    sigmas = torch.linspace(1, 0, 5)
    prompts = prompt_set("validation")[:4]
    one = sample_fixed_noise(stack.policy, stack.encode, stack.decode, sigmas, prompts, [3, 4], SHAPE, batch=2)
    many = sample_fixed_noise(stack.policy, stack.encode, stack.decode, sigmas, prompts, [3, 4], SHAPE, batch=64)
    assert one.shape == (4, 2, 3, 32, 32)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-4)
    # seed 4's noise is the same for every prompt, and a prompt's samples the same in any company
    alone = sample_fixed_noise(stack.policy, stack.encode, stack.decode, sigmas, prompts[2:3], [4], SHAPE)
    torch.testing.assert_close(alone[0, 0], many[2, 1], atol=1e-5, rtol=1e-4)


def test_evaluate_scores_every_prompt_and_keeps_the_first_images(stack):
    from treerpo.core.rewards import load_rewards

    prompts = prompt_set("test")[:5]
    ev = evaluate(stack.policy, stack.encode, stack.decode, load_rewards("brightness"), prompts, [0, 1], SHAPE,
                  torch.linspace(1, 0, 4), {"base": stack.policy.reference, "after": contextlib.nullcontext},
                  name="validation set", keep_images=2)
    assert ev.scores["base"].shape == (5, 2) and ev.images["after"].shape[:2] == (2, 2)
    torch.testing.assert_close(ev.scores["base"], ev.scores["after"])  # LoRA B = 0: the same model
    assert ev.gain("base", "after").mean == pytest.approx(0.0, abs=1e-6)
    assert ev.summary().startswith("validation set, 5 prompts x 2 seeds")


def test_each_reward_of_a_set_gets_its_own_paired_gain(stack):
    """With two rewards the combined value is their weighted sum and each reward's own gain is
    reported beside it; a sample changed after scoring (brighter) moves brightness alone."""
    from treerpo.cli.demo import evaluation_line
    from treerpo.core.rewards import load_rewards

    prompts = prompt_set("test")[:6]
    rewards = load_rewards("brightness:0.5, saturation:0.5")
    ev = evaluate(stack.policy, stack.encode, stack.decode, rewards, prompts, [0, 1], SHAPE,
                  torch.linspace(1, 0, 4), {"base": stack.policy.reference, "after": contextlib.nullcontext})
    own = ev.by_reward["base"]
    assert set(own) == {"brightness", "saturation"}
    torch.testing.assert_close(ev.scores["base"], 0.5 * own["brightness"] + 0.5 * own["saturation"])
    ev.by_reward["after"] = {**ev.by_reward["after"], "brightness": ev.by_reward["after"]["brightness"] + 0.1}
    ev.scores["after"] = ev.scores["after"] + 0.05
    gains = ev.reward_gains("base", "after")
    assert gains["brightness"].mean == pytest.approx(0.1, abs=1e-6)
    assert gains["saturation"].mean == pytest.approx(0.0, abs=1e-6)
    assert "each reward's own gain: brightness +0.1000" in ev.summary()
    line = evaluation_line({**ev.as_dict(), "iteration": 3})
    assert line.endswith("; brightness alone +0.1000 [+0.1000, +0.1000]; saturation alone +0.0000 [+0.0000, +0.0000]")
    assert "brightness + saturation reward" in line
    # a reward of weight 0 is scored beside the other: not in the combined value, its own gain printed
    side = evaluate(stack.policy, stack.encode, stack.decode, load_rewards("brightness:1, saturation:0"), prompts,
                    [0], SHAPE, torch.linspace(1, 0, 4), {"base": stack.policy.reference})
    torch.testing.assert_close(side.scores["base"], side.by_reward["base"]["brightness"])
    side.scores["after"], side.by_reward["after"] = side.scores["base"] + 0.1, {
        "brightness": side.by_reward["base"]["brightness"] + 0.1, "saturation": side.by_reward["base"]["saturation"]}
    d = {**side.as_dict(), "iteration": 3}
    assert d["weights"] == [1.0, 0.0]
    line = evaluation_line(d)
    assert ": brightness reward," in line and line.endswith("; brightness alone +0.1000 [+0.1000, +0.1000]; "
                                                             "saturation beside it +0.0000 [+0.0000, +0.0000]")
    # one reward: no per-reward part
    one = evaluate(stack.policy, stack.encode, stack.decode, load_rewards("brightness"), prompts[:2], [0], SHAPE,
                   torch.linspace(1, 0, 4), {"base": stack.policy.reference, "after": contextlib.nullcontext})
    assert one.by_reward == {} and "reward_gain" not in one.as_dict()
