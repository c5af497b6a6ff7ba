import math

import pytest
import safetensors.torch
import torch

from tiny_flux import LATENT, tiny_encode, tiny_policy
from toy import Brightness, ToyVelocity, toy_encode
from treerpo.core import checkpoint as ckpt
from treerpo.core.presets import PRESETS, make_config
from treerpo.core.sde import ode_step
from treerpo.core import trainer as trainer_mod
from treerpo.core.trainer import Trainer, reward_headline

PROMPTS = ["a cat", "a dog"]


def toy_trainer(preset="dynamic-treerpo", **kw):
    torch.manual_seed(0)
    kw.setdefault("num_steps", 8)
    kw.setdefault("lr", 3e-2)
    kw.setdefault("window_every", 1)
    if preset in ("mixgrpo", "mixgrpo-flash", "dancegrpo"):
        kw.setdefault("group_size", 4)
    return Trainer(ToyVelocity(), make_config(preset, **kw), Brightness(), encode=toy_encode, latent_shape=(4, 8, 8))


@torch.no_grad()
def eval_brightness(policy, sigmas, encode, shape, n=8):
    """Mean brightness of ODE samples from fixed noise: the reward the runs optimise."""
    x0 = torch.randn(n, *shape, generator=torch.Generator().manual_seed(123))
    total = 0.0
    for p in PROMPTS:
        cond = {k: v.expand(n, *v.shape[1:]) for k, v in encode([p])[0].items()}
        x = x0
        for i in range(len(sigmas) - 1):
            v = policy(x, torch.full((n,), float(sigmas[i])), cond)
            x = ode_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        total += float(x.mean())
    return total / len(PROMPTS)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_train_tiny_flux(preset):
    policy = tiny_policy()
    kw = dict(num_steps=6, lr=1e-2, seed=0, window_every=1)
    if preset in ("mixgrpo", "mixgrpo-flash", "dancegrpo"):
        kw["group_size"] = 4
    trainer = Trainer(policy, make_config(preset, **kw), Brightness(), encode=tiny_encode, latent_shape=LATENT)
    before_params = {n: p.detach().clone() for n, p in policy.named_parameters()}
    before = eval_brightness(policy, trainer.sigmas, tiny_encode, LATENT)
    hist = [trainer.step(PROMPTS) for _ in range(8)]
    after = eval_brightness(policy, trainer.sigmas, tiny_encode, LATENT)

    assert hist[0]["ratio_first_update"] == 1.0  # on-policy: rollout and update see the same layout
    assert all(math.isfinite(h["loss"]) for h in hist)
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before_params[n])}
    assert changed, "nothing trained"
    assert all("lora_" in n for n in changed), f"non-LoRA weights changed: {[n for n in changed if 'lora_' not in n]}"
    assert after > before, f"{preset}: brightness {before:.4f} -> {after:.4f}"
    # the NFE the engine counted equals what tree_nfe predicts
    for h in hist:
        leaves = math.prod(trainer.config.branching)
        assert h["nfe_old_counted"] == h["nfe_old_per_sample"] * len(PROMPTS) * leaves


def test_first_update_ratio_exactly_one_with_micro_batches_and_offload():
    a = toy_trainer(micro_batch=3, offload_latents=True, sft_lambda=0.02)
    m = a.step(PROMPTS)
    assert m["ratio_first_update"] == 1.0
    b = toy_trainer()
    mb = b.step(PROMPTS)
    assert m["reward_mean"] == pytest.approx(mb["reward_mean"], abs=1e-5)


class PromptTaggedBrightness(Brightness):
    """Brightness plus an offset per prompt, recording each call's prompts: a leaf scored
    against another prompt's text would get another prompt's offset."""

    offsets = {"a cat": 0.0, "a dog": 100.0, "a fox": 200.0}

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts):
        self.calls.append(list(prompts))
        return super().__call__(images, prompts) + torch.tensor([[self.offsets[p]] for p in prompts])


@pytest.mark.parametrize("micro_batch", [None, 3])
def test_every_prompts_leaves_are_scored_together_against_their_own_prompt(micro_batch, monkeypatch):
    prompts, leaves = ["a cat", "a dog", "a fox"], 8  # [2, 2, 2, 1]
    t = toy_trainer(micro_batch=micro_batch)
    t.rewards = PromptTaggedBrightness()
    groups, real = [], trainer_mod.score_group
    monkeypatch.setattr(trainer_mod, "score_group", lambda r, *a, **kw: groups.append(r) or real(r, *a, **kw))
    t.step(prompts)
    rows = [p for p in prompts for _ in range(leaves)]
    n = micro_batch or len(rows)
    assert t.rewards.calls == [rows[a:a + n] for a in range(0, len(rows), n)]  # chunks of rows, not one call per prompt
    assert [r.shape for r in groups] == [(leaves, 1)] * 3
    for p, r in zip(prompts, groups):
        off = PromptTaggedBrightness.offsets[p]
        assert float(r.min()) > off - 50 and float(r.max()) < off + 50, (p, r.flatten())


def test_kl_term_is_each_prompts_mean_over_its_edges_whatever_the_micro_batch():
    ms = [toy_trainer(kl_beta=0.1, micro_batch=mb).step(PROMPTS) for mb in (None, 1, 3)]
    assert ms[0]["kl"] > 0
    for m in ms[1:]:  # chunks add their share of the mean, not a mean each
        assert m["kl"] == pytest.approx(ms[0]["kl"], rel=1e-5)


def test_metrics_present_and_sane():
    t = toy_trainer(kl_beta=0.1)
    hist = [t.step(PROMPTS) for _ in range(3)]
    m = hist[-1]
    for key in ["reward/brightness/mean", "reward/brightness/std", "reward/brightness/max", "group_reward_std",
                "ratio_mean", "clip_frac_high", "clip_frac_low", "sft_loss", "kl", "grad_norm", "nfe_old_per_sample",
                "nfe_new_per_sample", "time_rollout", "time_reward", "time_update", "window_start", "masked_samples"]:
        assert key in m and math.isfinite(m[key]), key
    assert [h["window_start"] for h in hist] == [0, 1, 2]
    assert m["kl"] > 0 and m["sft_loss"] > 0
    assert m["nfe_new_per_sample"] == 4


class TwoModels(Brightness):
    """Brightness as a PickScore-sized score (x 100, Eq. 11 divides it by 100) and as itself."""

    names = ["pickscore", "brightness"]
    weights = [2.0, 0.5]

    def __call__(self, images, prompts):
        b = super().__call__(images, prompts)
        return torch.cat([100 * b + 20, b], 1)


def test_headline_reward_is_the_combined_reward_with_each_model_beside_it():
    t = Trainer(ToyVelocity(), make_config(num_steps=6, lr=1e-2), TwoModels(), encode=toy_encode,
                latent_shape=(4, 8, 8))
    m = t.step(PROMPTS)
    pick, bright = m["reward/pickscore/mean"], m["reward/brightness/mean"]
    assert pick == pytest.approx(100 * bright + 20, rel=1e-5)
    # weights applied, PickScore at Eq. 11's scale: not the plain mean of the raw means (~10)
    assert m["reward_mean"] == pytest.approx(2.0 * pick / 100 + 0.5 * bright, rel=1e-5)
    assert reward_headline(m) == f"reward {m['reward_mean']:.4g} (pickscore {pick:.4g}, brightness {bright:.4g})"
    one = toy_trainer().step(PROMPTS)
    assert reward_headline(one) == f"reward {one['reward_mean']:.4g}"  # one model: its mean is the headline


def test_approx_kl_is_zero_on_policy_and_grows_off_policy():
    t = toy_trainer(lr=0.3, step_per_layer=True)
    m = t.step(PROMPTS)
    assert m["ratio_first_update"] == 1.0
    # later layers' terms are off-policy after the first optimizer step: approx_kl of their log-ratios
    assert m["approx_kl"] > 0
    assert toy_trainer(lr=0.3, step_per_layer=False).step(PROMPTS)["approx_kl"] == 0.0  # one step: all on-policy


def test_log_ratio_spread_per_trained_step():
    """log_ratio_std/step{j}: 0 on the step updated first (on-policy), > 0 on those after it; the
    overall spread and mean agree with approx_kl, computed separately: E[(log r)^2] = 2 approx_kl."""
    m = toy_trainer(lr=0.3, step_per_layer=True).step(PROMPTS)
    steps = sorted(int(k.split("step")[1]) for k in m if k.startswith("log_ratio_std/step"))
    assert len(steps) == m["trained_layers"] > 1
    assert m[f"log_ratio_std/step{steps[0]}"] == 0.0
    assert all(m[f"log_ratio_std/step{j}"] > 0 for j in steps[1:])
    assert m["log_ratio_std"] > 0 and m["log_ratio_std"] ** 2 <= 2 * m["approx_kl"] + 1e-12
    one = toy_trainer(lr=0.3, step_per_layer=False).step(PROMPTS)
    assert one["log_ratio_std"] == 0.0 and all(v == 0.0 for k, v in one.items() if k.startswith("log_ratio_std/"))


def test_deterministic_kernels_hold_during_the_step_only():
    seen = []

    class Watch(ToyVelocity):
        def forward(self, x, sigma, cond):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return super().forward(x, sigma, cond)

    assert not torch.are_deterministic_algorithms_enabled()
    t = Trainer(Watch(), make_config(num_steps=6, deterministic=True), Brightness(), encode=toy_encode,
                latent_shape=(4, 8, 8))
    assert not torch.are_deterministic_algorithms_enabled()  # building the trainer changes nothing
    t.step(PROMPTS)
    assert seen and all(seen)
    assert not torch.are_deterministic_algorithms_enabled()  # restored: a ComfyUI server runs on after the run
    torch.use_deterministic_algorithms(True, warn_only=False)  # a state of the caller's own is kept too
    try:
        t.step(PROMPTS)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_fp16_and_free_form_extras_are_refused_by_name():
    with pytest.raises(ValueError, match="fp16.*bf16"):
        make_config(mixed_precision="fp16")
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['extra'\]"):
        make_config(extra={"ignored": 1})


def test_nan_rewards_masked_and_counted():
    class Flaky(Brightness):  # the first leaf of each prompt is not scorable
        def __call__(self, images, prompts):
            r = super().__call__(images, prompts)
            r[[k for k, p in enumerate(prompts) if p not in prompts[:k]]] = float("nan")
            return r

    t = Trainer(ToyVelocity(), make_config(num_steps=6, lr=1e-2), Flaky(), encode=toy_encode, latent_shape=(4, 8, 8))
    m = t.step(PROMPTS)
    assert m["masked_samples"] == 2
    assert all(torch.isfinite(p).all() for p in t.params)


def test_reward_shape_mismatch_raises():
    class Wrong:
        names = ["a", "b"]

        def __call__(self, images, prompts):
            return torch.zeros(images.shape[0], 3)

    t = Trainer(ToyVelocity(), make_config(num_steps=6), Wrong(), encode=toy_encode, latent_shape=(4, 8, 8))
    with pytest.raises(ValueError, match="reward function returned shape"):
        t.step(PROMPTS)


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(branching=[2, 0, 2]), "branching"),
        (dict(window_start=23), "window_start"),
        (dict(noise_level=-0.5), "noise_level"),
        (dict(eps_low=1e-2, eps_high=1e-3), "eps_low"),
        (dict(window_mode="backwards"), "window_mode"),
        (dict(learning_rate=1.0), "learning_rate"),
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr="abc"), "lr='abc': lr takes values of type float"),
        (dict(branching="2,2"), "branching takes values of type tuple"),
    ],
)
def test_bad_settings_name_the_setting(kw, name):
    with pytest.raises(ValueError, match=name):
        make_config("dynamic-treerpo", **kw)


def test_no_trainable_parameters_raises():
    m = ToyVelocity()
    for p in m.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="trainable"):
        Trainer(m, make_config(), Brightness(), latent_shape=(4, 8, 8))


def test_resume_equals_straight_run(tmp_path):
    straight = toy_trainer()
    straight.train(PROMPTS, 4, progress=False)

    first = toy_trainer()
    first.train(PROMPTS, 2, checkpoint_dir=tmp_path, checkpoint_every=1, progress=False)
    resumed = toy_trainer()
    resumed.load_checkpoint(tmp_path)
    assert resumed.iteration == 2 and len(resumed.history) == 2
    resumed.train(PROMPTS, 4, progress=False)

    s, r = straight.trainable_state_dict(), resumed.trainable_state_dict()
    for n in s:
        torch.testing.assert_close(r[n], s[n], rtol=1e-5, atol=1e-6)
    assert [h["reward_mean"] for h in resumed.history] == pytest.approx(
        [h["reward_mean"] for h in straight.history], abs=1e-6)


def test_train_uses_dataset_and_checkpoints_on_interrupt(tmp_path):
    t = toy_trainer()
    seen = []

    def stop_after_two(m):
        seen.append(m)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        t.train(["x", "y", "z"], 10, checkpoint_dir=tmp_path, checkpoint_every=100, progress=False,
                callback=stop_after_two)
    _, _, state, folder = ckpt.load_checkpoint(tmp_path)
    assert state["iteration"] == 2 and folder.name == "step-000002"


def test_a_failing_callback_checkpoints_unless_it_asks_not_to(tmp_path):
    from treerpo.core.trainer import StopWithoutCheckpoint

    def fail_at(n, exc):
        def cb(m):
            if m["iteration"] == n:
                raise exc
        return cb

    t = toy_trainer()
    with pytest.raises(ValueError, match="caller's bug"):  # the callback's own exception, not a stand-in
        t.train(["x", "y"], 10, checkpoint_dir=tmp_path, checkpoint_every=100, progress=False,
                callback=fail_at(3, ValueError("caller's bug")))
    assert ckpt.load_checkpoint(tmp_path)[2]["iteration"] == 3  # the finished iteration is kept
    with pytest.raises(StopWithoutCheckpoint):
        t.train(["x", "y"], 10, checkpoint_dir=tmp_path, checkpoint_every=100, progress=False,
                callback=fail_at(5, StopWithoutCheckpoint("bad weights")))
    assert t.iteration == 5 and ckpt.load_checkpoint(tmp_path)[2]["iteration"] == 3  # iteration 5 not saved


def test_ctrl_c_finishes_the_iteration_then_checkpoints(tmp_path):
    import os
    import signal

    t = toy_trainer()
    inner = t.policy.forward
    calls = {"n": 0}

    def forward(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # mid-rollout of the first iteration
            os.kill(os.getpid(), signal.SIGINT)
        return inner(*a, **k)

    t.policy.forward = forward
    with pytest.raises(KeyboardInterrupt):
        t.train(PROMPTS, 10, checkpoint_dir=tmp_path, checkpoint_every=100, progress=False)
    assert t.iteration == 1 and len(t.history) == 1  # the interrupted iteration completed
    _, _, state, _ = ckpt.load_checkpoint(tmp_path)
    assert state["iteration"] == 1


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    t = toy_trainer()
    t.step(PROMPTS)
    t.save_checkpoint(tmp_path)
    t.step(PROMPTS)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        t.save_checkpoint(tmp_path)
    monkeypatch.undo()
    _, _, state, folder = ckpt.load_checkpoint(tmp_path)
    assert state["iteration"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]


def test_damaged_checkpoint_is_a_clear_error(tmp_path):
    t = toy_trainer()
    t.step(PROMPTS)
    t.save_checkpoint(tmp_path)
    f = tmp_path / "step-000001" / "trainable.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    with pytest.raises(ValueError, match="damaged"):
        toy_trainer().load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        toy_trainer().load_checkpoint(tmp_path / "nothing")


def test_lora_init_is_reproducible_and_leaves_global_rng_alone():
    from tiny_flux import tiny_transformer
    from treerpo.core.models import FluxPolicy, LoraSettings

    def build(global_seed, init_seed=0):
        t = tiny_transformer()
        torch.manual_seed(global_seed)
        p = FluxPolicy(t, lora=LoraSettings(rank=4, alpha=4, init_seed=init_seed), dtype=torch.float32)
        return p, torch.rand(1)

    a, after_a = build(1)
    b, _ = build(2)
    c, _ = build(1, init_seed=7)
    torch.manual_seed(1)
    assert torch.equal(after_a, torch.rand(1))  # the caller's random stream is untouched
    la, lb, lc = a.lora_parameters(), b.lora_parameters(), c.lora_parameters()
    assert all(torch.equal(la[n], lb[n]) for n in la)
    assert any(not torch.equal(la[n], lc[n]) for n in la if "lora_A" in n)


def test_bf16_autocast_keeps_first_ratio_exactly_one(tmp_path):
    """Mixed precision (accelerate's bf16 autocast, CPU here): rollout and update run under
    the same autocast, so the on-policy ratio stays exactly 1. A subprocess, because
    accelerate keeps one mixed-precision setting per process."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import sys, json; sys.path.insert(0, sys.argv[1])\n"
        "from tiny_flux import tiny_policy, tiny_encode, LATENT\n"
        "from toy import Brightness\n"
        "from treerpo.core.presets import make_config\n"
        "from treerpo.core.trainer import Trainer\n"
        "out = []\n"
        "for mb in (None, 3):  # chunks of 3 rows straddle the prompts' nodes\n"
        "    t = Trainer(tiny_policy(), make_config(num_steps=6, lr=1e-3, mixed_precision='bf16', micro_batch=mb),"
        " Brightness(), encode=tiny_encode, latent_shape=LATENT)\n"
        "    out += [t.step(['a', 'b', 'c'])['ratio_first_update'] for _ in range(2)]\n"
        "print(json.dumps(out))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                         timeout=300, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [1.0] * 4


def test_descendant_mean_edges_give_eq9s_gradient_and_depth_standardised_does_not():
    """At ratio 1 the clip is inactive, so scoring each edge once with its descendants' mean
    advantage and weight is Eq. 9's gradient exactly; BranchGRPO's depth standardisation
    rescales inner edges, so it moves the weights differently."""
    grads = {}
    for mode in ("leaf", "descendant-mean", "depth-standardised"):
        t = toy_trainer(edge_advantage=mode, branching=[2, 2, 2, 1], step_per_layer=False)
        t._optimizer_step = lambda stats, t=t, mode=mode: grads.setdefault(
            mode, torch.cat([p.grad.flatten() for p in t.params]))
        assert t.step(PROMPTS)["ratio_first_update"] == 1.0
    assert grads["leaf"].abs().max() > 0
    torch.testing.assert_close(grads["descendant-mean"], grads["leaf"], rtol=1e-4, atol=1e-9)
    assert not torch.allclose(grads["depth-standardised"], grads["leaf"], rtol=1e-2, atol=0)
