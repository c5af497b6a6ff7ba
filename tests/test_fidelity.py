"""Engine fidelity (issue 7): the clip of Eq. 11 on the reward value, window bounds and
Alg. 1 movement, LoRA learning rates, the baselines as published, and the optional
stabilisers (global std, CPS, EMA, ratio normalisation). Each test fails on the old
behaviour it replaced."""

import math

import pytest
import torch

from toy import Brightness, ToyVelocity, toy_encode
from treerpo.core import trainer as trainer_mod
from treerpo.core.advantages import RunningNorm, combined_reward, group_advantages
from treerpo.core.losses import ratio_norm_log_ratio
from treerpo.core.presets import PRESETS, TrainConfig, make_config
from treerpo.core.schedule import flux_sigmas
from treerpo.core.sde import compressed_steps, sde_step
from treerpo.core.trainer import Trainer
from treerpo.core.tree import TreeSpec, rollout

PROMPTS = ["a cat", "a dog"]
BASELINES = ("mixgrpo", "mixgrpo-flash", "dancegrpo")


class Table:
    """Rewards that ignore the image: the i-th leaf of each prompt scores (0.1 i, 2 + 0.05 i) (two
    models), every leaf of ``constant_prompt`` (1, 1), however the trainer batches its calls."""

    names = ["a", "b"]
    weights = [1.0, 0.5]

    def __init__(self, constant_prompt=None):
        self.constant_prompt = constant_prompt

    def __call__(self, images, prompts):
        i = torch.tensor([prompts[:k].count(p) for k, p in enumerate(prompts)], dtype=torch.float32)
        r = torch.stack([0.1 * i, 2.0 + 0.05 * i], 1)
        r[torch.tensor([p == self.constant_prompt for p in prompts])] = 1.0
        return r


def make(preset="dynamic-treerpo", rewards=None, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_steps", 8)
    kw.setdefault("lr", 3e-2)
    if preset in BASELINES:
        kw.setdefault("group_size", 4)
    return Trainer(ToyVelocity(), make_config(preset, **kw), rewards or Brightness(), encode=toy_encode,
                   latent_shape=(4, 8, 8))


def eps_of(r, el=5e-5, eh=5e-3, eta=0.5):
    return el + (eh - el) * math.exp(-eta * max(r, 0.0))


# ---------------------------------------------------------------- Eq. 11: R = reward value
def test_clip_reads_the_combined_reward_value_by_default():
    t = make(rewards=Table())
    m = t.step(PROMPTS)
    combined = [0.1 * i + 0.5 * (2.0 + 0.05 * i) for i in range(8)]  # weights 1, 0.5
    assert t.config.clip_reward == "combined"
    assert m["eps_min"] == pytest.approx(eps_of(max(combined)), rel=1e-5)
    assert m["eps_max"] == pytest.approx(eps_of(min(combined)), rel=1e-5)
    assert m["eps_mean"] == pytest.approx(sum(eps_of(r) for r in combined) / 8, rel=1e-5)
    # the old reading (min-max of the group's advantages) is an option and gives eps_high at the worst leaf
    g = make(rewards=Table(), clip_reward="group-minmax").step(PROMPTS)
    assert g["eps_max"] == pytest.approx(5e-3) and g["eps_min"] == pytest.approx(eps_of(1.0), rel=1e-5)


def test_running_clip_reward_uses_run_statistics_and_resumes(tmp_path):
    t = make(rewards=Table(), clip_reward="running")
    m = t.step(PROMPTS)
    vals = torch.tensor([0.1 * i + 0.5 * (2.0 + 0.05 * i) for i in range(8)] * 2, dtype=torch.float64)
    z = (vals - vals.mean()) / vals.std(unbiased=False)
    eps = [eps_of(float(torch.nn.functional.softplus(x))) for x in z]
    assert m["eps_min"] == pytest.approx(min(eps), rel=1e-5) and m["eps_max"] == pytest.approx(max(eps), rel=1e-5)
    t.save_checkpoint(tmp_path)
    r = make(rewards=Table(), clip_reward="running")
    r.load_checkpoint(tmp_path)
    assert r.reward_norm.state_dict() == pytest.approx(t.reward_norm.state_dict())


def test_running_norm_merges_batches_exactly():
    a, b = torch.randn(7, dtype=torch.float64), torch.randn(11, dtype=torch.float64) * 3 + 2
    n = RunningNorm()
    n.update(a)
    n.update(b)
    both = torch.cat([a, b])
    assert n.mean == pytest.approx(float(both.mean())) and n.std == pytest.approx(float(both.std(unbiased=False)))
    x = torch.tensor([0.0, 2.0])
    z = (x - both.mean().float()) / both.std(unbiased=False).float()
    torch.testing.assert_close(n.normalize(x), torch.log1p(torch.exp(z)))


def test_combined_reward_weights_scales_and_masks():
    r = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [0.5, -1.0]])
    torch.testing.assert_close(combined_reward(r, [2.0, 0.5]), torch.tensor([3.0, 0.0, 0.5]))
    # PickScore enters R as the papers report it (raw / 100); the others raw
    flux = torch.tensor([[0.313, 22.7, 1.088]])
    R = combined_reward(flux, [1, 1, 1], ["hps", "pickscore", "imagereward"])
    assert float(R) == pytest.approx(0.313 + 0.227 + 1.088)
    assert eps_of(float(R)) == pytest.approx(2.24e-3, rel=0.01)  # base FLUX: eps ~2.2e-3 (docs/engine.md)


# ---------------------------------------------------------------- window bounds, Alg. 1
def test_trainconfig_defaults_are_the_dynamic_treerpo_preset():
    assert TrainConfig() == make_config("dynamic-treerpo")
    assert TrainConfig().window_every == 1  # Alg. 1 line 22: the root moves every iteration
    assert make_config("mixgrpo").window_every == 25 and make_config("mixgrpo-flash").window_every == 20


@pytest.mark.parametrize("T", [6, 12, 25])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_default_windows_never_take_an_sde_step_onto_sigma_zero(preset, T):
    c = make_config(preset, num_steps=T)
    sig = flux_sigmas(T, shift=c.shift)
    for tau in c.window().positions(max(c.iterations, 2 * T)):
        assert float(sig[tau + c.depth]) > 0, (preset, T, tau)  # the last SDE step's sigma_next


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_default_runs_decode_no_leaf_fresh_from_an_sde_step_onto_zero(preset, monkeypatch):
    trees = []
    real = trainer_mod.rollout_batch

    def spy(*a, **k):
        out = real(*a, **k)
        trees.extend(out)
        return out

    monkeypatch.setattr(trainer_mod, "rollout_batch", spy)
    t = make(preset, num_steps=6, window_every=1)
    for _ in range(5):
        t.step(PROMPTS[:1])
    assert trees and all(tree.layers[-1].sigma_next > 0 and tree.spec.tail_steps >= 1 for tree in trees)


def test_window_max_start_can_allow_the_last_step_explicitly():
    c = make_config(num_steps=25, window_max_start=21, window_every=1)
    assert max(c.window().positions(50)) == 21
    with pytest.raises(ValueError, match="window_max_start"):
        make_config(num_steps=25, window_max_start=22)
    with pytest.raises(ValueError, match="sigma > 0"):
        make_config(num_steps=4)  # depth 4 fits only with an SDE step onto sigma = 0


# ---------------------------------------------------------------- learning rates
def test_presets_carry_lora_learning_rates_in_the_papers_ratio():
    tree, mix = make_config("dynamic-treerpo").lr, make_config("mixgrpo").lr
    assert 1e-4 <= tree <= 3e-4 and mix == 3e-4  # Flow-GRPO / DanceGRPO FLUX LoRA runs: 3e-4
    assert mix / tree == pytest.approx(1e-5 / 5e-6)  # the papers' full-fine-tune ratio
    assert all(make_config(p).lr in (tree, mix) for p in PRESETS)


def test_treerpo_plus_is_tree_clip_frozen_at_the_first_step_with_one_std():
    """Our preset differs from the paper's tree-clip ablation in exactly the documented settings."""
    plus, clip = make_config("treerpo-plus").to_dict(), make_config("tree-clip").to_dict()
    changed = {k for k in plus if plus[k] != clip[k]}
    assert changed == {"preset", "window_mode", "adv_std"}
    assert (plus["window_mode"], plus["window_start"], plus["adv_std"]) == ("frozen", 0, "global")
    assert plus["sft_lambda"] == 0.0 and plus["step_per_layer"] is True


# ---------------------------------------------------------------- baselines as published
def test_mixgrpo_weights_sum_to_one_and_std_is_unbiased_plus_eps():
    class Three:
        names, weights = ["hps", "imagereward", "pickscore"], [1.0, 1.0, 1.0]

        def __call__(self, images, prompts):
            return torch.zeros(images.shape[0], 3)

    t = make("mixgrpo", rewards=Three())
    assert t._reward_weights() == pytest.approx([1 / 3] * 3)
    r = torch.tensor([[0.30, 1.2, 22.0], [0.35, 0.9, 22.5], [0.28, 1.5, 21.0], [0.40, 1.1, 21.7]])
    c = t.config
    adv = group_advantages(r, [1 / 3] * 3, c.adv_clip, c.adv_std_unbiased, c.adv_std_eps)
    expected = sum((r[:, k] - r[:, k].mean()) / (r[:, k].std() + 1e-8) / 3 for k in range(3))  # torch.std: unbiased
    torch.testing.assert_close(adv, expected)


def test_flash_post_window_steps_as_their_sampler():
    for n in range(1, 25):
        assert compressed_steps(n, 0.4) == max(1, int(0.4 * (n + 1)) - 1)
    assert compressed_steps(21, 0.4) == 7  # the old ceil(0.4 * n) gave 9


def test_dancegrpo_accumulates_one_optimizer_step_and_scores_x0_at_the_last_step(monkeypatch):
    t = make("dancegrpo", num_steps=6)
    assert t.config.depth == 5 and len(t.config.trained_layers(0)) == 3
    steps = {"n": 0}
    real_step = t.optimizer.step

    def counting(*a, **k):
        steps["n"] += 1
        return real_step(*a, **k)

    monkeypatch.setattr(t.optimizer, "step", counting)
    t.step(PROMPTS)
    assert steps["n"] == 1  # one step over all trained timesteps (not one per timestep)

    # the leaf is the x0 prediction of the last step: x - sigma * v at the last sigma
    torch.manual_seed(0)
    model = ToyVelocity()
    cond = toy_encode(["a cat"])[0]
    sig = flux_sigmas(6, shift=3.0)
    spec = TreeSpec(6, 0, t.config.branching)
    tree = rollout(model, cond, spec, sig, [0.3] * 5, torch.randn(1, 4, 8, 8), torch.Generator().manual_seed(0),
                   share_prefix=False, noise_schedule="constant")
    x = tree.layers[-1].children
    with torch.no_grad():
        v = model(x, torch.full((x.shape[0],), float(sig[5])), {k: v.expand(x.shape[0], -1) for k, v in cond.items()})
    torch.testing.assert_close(tree.leaves, x - float(sig[5]) * v)


# ---------------------------------------------------------------- stabilisers
def test_global_std_divides_by_the_whole_batch_std():
    r1 = torch.tensor([[1.0], [2.0], [3.0]])
    r2 = torch.tensor([[10.0], [10.0], [16.0]])
    std = torch.cat([r1, r2]).std(unbiased=False)
    a1 = group_advantages(r1, None, None, std=std.reshape(1))
    torch.testing.assert_close(a1, (r1[:, 0] - 2.0) / std)
    # in the trainer: a constant group is reported as zero-std
    t = make(rewards=Table(constant_prompt="a dog"), adv_std="global")
    m = t.step(PROMPTS)
    assert m["zero_std_group_frac"] == 0.5 and math.isfinite(m["loss"])


def test_cps_step_formula():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g),
                   torch.randn(3, 2, 4, 4, generator=g))
    s, s1, a = 0.6, 0.45, 0.7
    out = sde_step(x, v, s, s1, a, noise=noise, sampler="cps")
    std = s1 * math.sin(a * math.pi / 2)
    x0, eps = x - s * v, x + (1 - s) * v
    mean = (1 - s1) * x0 + math.sqrt(s1**2 - std**2) * eps
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.x_next, mean + std * noise)
    lp = torch.distributions.Normal(mean, std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, lp)
    # the noise coefficient is preserved: (1 - s1) x0 + s1 * (unit noise) when x0/eps are exact
    assert (s1**2 - std**2) + std**2 == pytest.approx(s1**2)
    with pytest.raises(ValueError, match="sigma_next > 0"):
        sde_step(x, v, 0.1, 0.0, a, sampler="cps")
    with pytest.raises(ValueError, match="sampler"):
        sde_step(x, v, s, s1, a, sampler="ddim")


def test_cps_trains_in_the_tree_with_depth_noise():
    t = make(sampler="cps", sft_lambda=0.02)
    hist = [t.step(PROMPTS) for _ in range(3)]
    assert hist[0]["ratio_first_update"] == 1.0 and all(math.isfinite(h["loss"]) for h in hist)


def test_ema_follows_the_weights_and_is_saved_and_swapped(tmp_path):
    t = make(ema_decay=0.9, ema_every=2)
    ema = {n: p.clone() for n, p in t.trainable_state_dict().items()}
    for it in range(1, 5):
        t.step(PROMPTS)
        if it % 2 == 0:
            ema = {n: 0.9 * ema[n] + 0.1 * w for n, w in t.trainable_state_dict().items()}
    got = t.ema_state_dict()
    for n in ema:
        torch.testing.assert_close(got[n], ema[n])
    trained = t.trainable_state_dict()
    with t.ema_applied():
        for n, p in zip(t.param_names, t.params):
            torch.testing.assert_close(p.detach(), ema[n])
    for n, p in zip(t.param_names, t.params):
        assert torch.equal(p.detach(), trained[n])  # the trained weights are back
    t.save_checkpoint(tmp_path)
    r = make(ema_decay=0.9, ema_every=2)
    r.load_checkpoint(tmp_path)
    for n in ema:
        torch.testing.assert_close(r.ema_state_dict()[n], got[n])
    assert make().ema_state_dict() is None


def test_ratio_norm_formula_recentres_the_ratio():
    g = torch.Generator().manual_seed(0)
    E, D = 4000, 64
    std = torch.full((E,), 0.02)
    old_mean = torch.zeros(E, D)
    new_mean = old_mean + 0.01 * torch.randn(1, D, generator=g)  # a policy change of half a std
    x = old_mean + std[:, None] * torch.randn(E, D, generator=g)
    lp = lambda m: torch.distributions.Normal(m, std[:, None]).log_prob(x).mean(1)  # noqa: E731
    new_lp, old_lp = lp(new_mean), lp(old_mean)
    got = ratio_norm_log_ratio(new_lp, old_lp, new_mean, old_mean, std)
    b = ((new_mean - old_mean) ** 2).mean(1) / (2 * std**2)
    torch.testing.assert_close(got, (new_lp - old_lp + b) * std)
    raw = torch.exp(new_lp - old_lp).mean()
    assert raw < 0.9  # the left-shifted ratio GRPO-Guard reports
    assert abs(float(torch.exp(got).mean()) - 1) < 1e-3


def test_ratio_norm_trains_and_is_on_policy_first():
    t = make(ratio_norm=True)
    hist = [t.step(PROMPTS) for _ in range(2)]
    assert hist[0]["ratio_first_update"] == 1.0 and all(math.isfinite(h["loss"]) for h in hist)
    assert "ratio_mean_raw" in hist[-1]


@pytest.mark.parametrize(
    "kw, name",
    [(dict(clip_reward="advantage"), "clip_reward"), (dict(adv_std="batch"), "adv_std"),
     (dict(sampler="ddim"), "sampler"), (dict(ema_decay=1.0), "ema_decay"), (dict(adv_std_eps=-1.0), "adv_std_eps")],
)
def test_new_settings_are_validated(kw, name):
    with pytest.raises(ValueError, match=name):
        make_config(**kw)


def test_bf16_ratio_drift_measurement_and_ratio_norm():
    """`treerpo bench ratio` re-evaluates fp32-drawn SDE samples under bf16 autocast; the
    normalised ratio stays near 1 whatever the raw drift (its size depends on the model:
    docs/engine.md reports it for the bundled tiny FLUX)."""
    from tiny_flux import LATENT, tiny_encode, tiny_policy
    from treerpo.cli.bench import ratio_drift

    rows = ratio_drift(tiny_policy(), tiny_encode, LATENT, num_steps=6, samples=4, steps=[0, 2])
    assert [r["step"] for r in rows] == [0, 2, 4]  # and always the last SDE step (sigma_next > 0)
    assert all(math.isfinite(r["ratio_raw"]) and r["std"] > 0 for r in rows)
    assert all(abs(r["ratio_norm"] - 1) < 0.01 for r in rows)
