"""core/training_run.py, core/run_lock.py, core/one_tree.py: run folder, resume-or-restart, lock,
cancel with checkpoint, LoRA + state, and the one-tree helpers (sample and score as the Trainer does)."""

import json
import threading

import pytest
import torch

from tiny_flux import LATENT, tiny_encode, tiny_policy
from toy import Brightness, ToyVelocity, toy_encode
from treerpo.core import checkpoint as ckpt
from treerpo.core.presets import make_config
from treerpo.core.one_tree import sample_tree, score_leaves
from treerpo.core.run_lock import RunBusy, RunLock, run_busy
from treerpo.core.training_run import TrainingRun, state_folder, trainable_snapshot
from treerpo.core.trainer import Trainer

PROMPTS = ["a cat", "a dog", "a tree"]


def toy_trainer(policy=None, **kw):
    kw = dict(dict(num_steps=6, lr=3e-2, window_every=1), **kw)
    return Trainer(policy or ToyVelocity(), make_config("dynamic-treerpo", **kw), Brightness(), encode=toy_encode,
                   latent_shape=(4, 8, 8))


def metrics_lines(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_fresh_run_writes_folder_and_continues_exactly(tmp_path):
    straight = toy_trainer()
    TrainingRun(tmp_path / "straight", straight, PROMPTS).train(4)

    run = TrainingRun(tmp_path / "run", toy_trainer(), PROMPTS, checkpoint_every=100)
    assert run.resumed_from is None and run.iteration == 0
    got = run.train(2)
    assert [m["iteration"] for m in got] == [1, 2]
    folder = tmp_path / "run"
    assert json.loads((folder / "config.json").read_text())["preset"] == "dynamic-treerpo"
    assert [m["iteration"] for m in metrics_lines(folder)] == [1, 2]
    assert ckpt.resolve_checkpoint(folder / "checkpoints").name == "step-000002"  # the end always checkpoints

    # a new process (new policy, new trainer) continues from the folder
    again = TrainingRun(folder, toy_trainer(), PROMPTS)
    assert again.iteration == 2 and again.resumed_from.name == "step-000002"
    again.train(2)
    assert [m["iteration"] for m in metrics_lines(folder)] == [1, 2, 3, 4]
    s, r = straight.trainable_state_dict(), again.trainer.trainable_state_dict()
    for n in s:
        torch.testing.assert_close(r[n], s[n], atol=1e-6, rtol=1e-5)


def test_restart_wipes_and_starts_from_initial_weights(tmp_path):
    policy = ToyVelocity()
    initial = trainable_snapshot(policy)
    run = TrainingRun(tmp_path, toy_trainer(policy), PROMPTS, initial_state=initial)
    run.train(2)
    assert not torch.equal(policy.lora_B, initial["lora_B"])  # it trained

    # same in-memory policy (as a cached ComfyUI loader passes it), explicit restart
    restarted = TrainingRun(tmp_path, toy_trainer(policy), PROMPTS, on_existing="restart", initial_state=initial)
    assert restarted.iteration == 0 and restarted.resumed_from is None
    assert torch.equal(policy.lora_B, initial["lora_B"]) and torch.equal(policy.lora_A, initial["lora_A"])
    assert not (tmp_path / "checkpoints").exists()
    assert metrics_lines(tmp_path) == []


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="on_existing"):
        TrainingRun(tmp_path, toy_trainer(), PROMPTS, on_existing="maybe")
    with pytest.raises(ValueError, match="prompt list is empty"):
        TrainingRun(tmp_path, toy_trainer(), ["", "  "])
    with pytest.raises(ValueError, match="iterations"):
        TrainingRun(tmp_path, toy_trainer(), PROMPTS).train(0)


def test_cancel_in_callback_checkpoints_then_reraises(tmp_path):
    class Cancel(Exception):
        pass

    seen = []

    def cb(m):
        seen.append(m["iteration"])
        if m["iteration"] == 2:
            raise Cancel("user pressed cancel")

    run = TrainingRun(tmp_path, toy_trainer(), PROMPTS, checkpoint_every=100)
    with pytest.raises(Cancel, match="user pressed cancel"):
        run.train(5, callback=cb)
    assert seen == [1, 2]
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints").name == "step-000002"
    assert run_busy(tmp_path) is None  # the lock is released after a cancel
    again = TrainingRun(tmp_path, toy_trainer(), PROMPTS)
    assert again.iteration == 2
    assert [m["iteration"] for m in again.train(1)] == [3]


def test_lock_refuses_a_second_user_with_a_clear_message(tmp_path):
    with RunLock(tmp_path):
        msg = run_busy(tmp_path)
        assert msg and "in use by another training" in msg and str(tmp_path) in msg
        with pytest.raises(RunBusy, match="in use by another training"):
            TrainingRun(tmp_path, toy_trainer(), PROMPTS)
        # another thread is refused too (flock is per open file, not per process)
        errors = []
        t = threading.Thread(target=lambda: errors.append(run_busy(tmp_path)))
        t.start()
        t.join()
        assert errors[0] is not None
    assert run_busy(tmp_path) is None
    TrainingRun(tmp_path, toy_trainer(), PROMPTS)  # free again


def test_lock_is_held_while_training(tmp_path):
    states = []
    run = TrainingRun(tmp_path, toy_trainer(), PROMPTS)
    run.train(1, callback=lambda m: states.append(run_busy(tmp_path)))
    assert states[0] is not None and run_busy(tmp_path) is None


def test_save_lora_writes_metadata_and_resumable_state(tmp_path):
    from treerpo.core.models import read_lora_metadata

    policy = tiny_policy()
    cfg = make_config("dynamic-treerpo", num_steps=5, lr=1e-2, window_every=1)
    trainer = Trainer(policy, cfg, Brightness(), encode=tiny_encode, latent_shape=LATENT)
    run = TrainingRun(tmp_path / "run", trainer, PROMPTS)
    run.train(1)
    lora, state = run.save_lora(tmp_path / "loras" / "x_00001_.safetensors")
    assert state == state_folder(lora) == tmp_path / "loras" / "x_00001_.state"
    meta = read_lora_metadata(lora)
    assert meta["iteration"] == 1 and meta["preset"] == "dynamic-treerpo" and meta["rank"] == 4
    assert "reward/brightness/mean" in meta["reward_stats"]
    # the state continues a new run in another folder
    other = Trainer(tiny_policy(), cfg, Brightness(), encode=tiny_encode, latent_shape=LATENT)
    cont = TrainingRun(tmp_path / "run2", other, PROMPTS, resume_from=state)
    assert cont.iteration == 1
    for n, t in trainer.trainable_state_dict().items():
        assert torch.equal(other.trainable_state_dict()[n], t)
    with pytest.raises(TypeError, match="LoRA"):
        TrainingRun(tmp_path / "toy", toy_trainer(), PROMPTS).save_lora(tmp_path / "t.safetensors")


@pytest.mark.parametrize("clip_reward,sampler", [("combined", "sde"), ("group-minmax", "sde"), ("running", "sde"),
                                                 ("combined", "cps")])
def test_sample_tree_and_scores_are_the_trainers(clip_reward, sampler):
    cfg = make_config("dynamic-treerpo", num_steps=6, window_every=1, window_start=1, seed=7, clip_reward=clip_reward,
                      sampler=sampler)
    policy = ToyVelocity()
    cond = toy_encode(["a cat"])[0]
    tree = sample_tree(policy, cfg, cond, seed=7, latent_shape=(4, 8, 8), iteration=2)
    assert tree.spec.window_start == cfg.window().position(2)
    assert tree.leaves.shape == (8, 4, 8, 8) and all(layer.old_velocity is not None for layer in tree.layers)
    # the Trainer at iteration 2 rolls out the same leaves for its first prompt (seed == config.seed)
    # and gives them the same advantages and clip eps
    trainer = toy_trainer(policy, window_start=1, seed=7, clip_reward=clip_reward, sampler=sampler)
    trainer.iteration = 2
    captured = {}
    real_score, real_eps = trainer._score, trainer._clip_eps

    def spy_score(leaves, prompts):
        assert prompts == ["a cat"] * len(leaves)
        captured["leaves"] = leaves.clone()
        return real_score(leaves, prompts)

    def spy_eps(groups, weights):
        real_eps(groups, weights)
        captured["group"] = groups[0]

    trainer._score, trainer._clip_eps = spy_score, spy_eps
    trainer.step(["a cat"])
    torch.testing.assert_close(captured["leaves"], tree.leaves)

    scores = score_leaves(tree.leaves, "a cat", Brightness(), cfg)
    g = captured["group"]
    torch.testing.assert_close(scores.rewards, g.rewards)
    torch.testing.assert_close(scores.advantages, g.adv)
    torch.testing.assert_close(scores.eps, g.eps)
    assert scores.best == g.best == int(scores.rewards[:, 0].argmax())
    assert float(scores.eps.min()) >= cfg.eps_low and float(scores.eps.max()) <= cfg.eps_high
    assert "advantage" in scores.table() and scores.table().count("\n") == 8


def test_score_leaves_uses_the_runs_reward_weights():
    class Two:
        names, weights = ["up", "down"], [1.0, 3.0]

        def __call__(self, images, prompts):
            b = images.float().mean(dim=(1, 2, 3))
            return torch.stack([b, (b - 0.3).abs()], 1)

    leaves = torch.randn(12, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cfg = make_config("mixgrpo", num_steps=6)  # MixGRPO: weights scaled to sum to 1
    scores = score_leaves(leaves, "a cat", Two(), cfg)
    assert scores.weights == pytest.approx([0.25, 0.75])
    from treerpo.core.advantages import group_advantages

    want = group_advantages(scores.rewards, [0.25, 0.75], cfg.adv_clip, cfg.adv_std_unbiased, cfg.adv_std_eps)
    torch.testing.assert_close(scores.advantages, want)


def test_score_leaves_fixed_clip_and_running_statistics():
    from treerpo.core.advantages import RunningNorm

    leaves = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    fixed = score_leaves(leaves, "a cat", Brightness(), make_config("tree", num_steps=6))
    assert torch.all(fixed.eps == 1e-4)
    cfg = make_config("dynamic-treerpo", num_steps=6, clip_reward="running")
    norm = RunningNorm(count=100, mean=5.0, m2=100.0)  # a run whose rewards were far higher
    low = score_leaves(leaves, "a cat", Brightness(), cfg, running_norm=norm)
    alone = score_leaves(leaves, "a cat", Brightness(), cfg)
    assert norm.count == 100  # the run's statistics are not changed by inspecting a tree
    assert float(low.eps.mean()) > float(alone.eps.mean())  # below the run's mean: bolder steps (Eq. 11)


def test_score_leaves_masks_nan_rewards():
    class Half:
        names = ["half"]

        def __call__(self, images, prompts):
            r = images.flatten(1).mean(1)
            r[0] = float("nan")
            return r

    cfg = make_config("dynamic-treerpo", num_steps=6)
    s = score_leaves(torch.randn(4, 4, 8, 8), "p", Half(), cfg)
    assert s.valid.tolist() == [False, True, True, True] and float(s.advantages[0]) == 0.0


def test_all_nan_rewards_stop_the_run_without_a_checkpoint(tmp_path):
    from treerpo.core.training_run import RunDiverged

    class NaNAfterOne(Brightness):
        calls = 0

        def __call__(self, images, prompts):
            NaNAfterOne.calls += 1
            r = super().__call__(images, prompts)
            return r if NaNAfterOne.calls <= 1 else torch.full_like(r, float("nan"))

    trainer = Trainer(ToyVelocity(), make_config("dynamic-treerpo", num_steps=6, window_every=1,
                                                 prompts_per_iteration=1), NaNAfterOne(), encode=toy_encode,
                      latent_shape=(4, 8, 8))
    run = TrainingRun(tmp_path, trainer, PROMPTS, checkpoint_every=1)
    with pytest.raises(RunDiverged, match="no leaf got a finite reward at iteration 2.*iteration 1\\) is kept"):
        run.train(3)
    assert ckpt.resolve_checkpoint(tmp_path / "checkpoints").name == "step-000001"
    assert [m["iteration"] for m in metrics_lines(tmp_path)] == [1]


def test_leaf_recorder_keeps_the_best_leaves_for_previews():
    from treerpo.core.training_run import LeafRecorder

    class Mean:
        names, weights = ["mean"], [1.0]

        def __call__(self, images, prompts):
            return images.flatten(1).mean(1, keepdim=True)

    rec = LeafRecorder(Mean(), size=16)
    assert rec.best() is None and rec.names == ["mean"]
    images = torch.stack([torch.full((3, 32, 32), v) for v in (0.2, 0.9, 0.5, 0.1)])
    out = rec(images, ["p"] * 4)
    assert out.shape == (4, 1)
    best = rec.best(2)
    assert best.shape == (2, 3, 16, 16)
    assert best[0].mean().item() == pytest.approx(0.9) and best[1].mean().item() == pytest.approx(0.5)
    # used by a Trainer, it records what the trainer scored (decoded leaves)
    trainer = toy_trainer()
    trainer.rewards = rec_t = LeafRecorder(Brightness())
    trainer.step(["a cat"])
    assert rec_t.scores.shape == (8, 1)
