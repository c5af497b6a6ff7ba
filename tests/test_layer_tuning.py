"""LayerTuning readings (issue 18 Part 2): the best-sample target and the choice of nodes,
each checked against an independent computation."""

import math

import pytest
import torch

import treerpo.core.trainer as trainer_mod
from toy import Brightness, ToyVelocity, toy_encode
from treerpo.core.losses import best_sample_velocity, layer_sft_loss, sft_node_mask
from treerpo.core.presets import make_config
from treerpo.core.sde import ode_step
from treerpo.core.tree import TreeSpec, rollout


def test_best_sample_velocity_is_the_flow_matching_target():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, generator=g), torch.randn(3, 4, 8, generator=g)
    for sigma in (1.0, 0.6, 0.05):
        x = (1 - sigma) * x0 + sigma * noise  # a state on the straight path from the noise to x0
        v = best_sample_velocity(x, x0, sigma)
        torch.testing.assert_close(v, noise - x0)  # rectified flow's velocity
        torch.testing.assert_close(ode_step(x, v, sigma, 0.0), x0)  # one Euler step lands on the sample
    with pytest.raises(ValueError, match="sigma > 0"):
        best_sample_velocity(x0, x0, 0.0)


def test_layer_sft_loss_weighted_is_the_masked_mean():
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(5, 2, 3, generator=g), torch.randn(5, 2, 3, generator=g)
    mask = torch.tensor([1.0, 0, 1, 0, 0])
    per_node = [float(((v[i] - t[i]) ** 2).mean()) for i in range(5)]
    assert float(layer_sft_loss(v, t, mask / mask.sum())) == pytest.approx((per_node[0] + per_node[2]) / 2)
    assert float(layer_sft_loss(v, t)) == pytest.approx(sum(per_node) / 5)
    # chunks of a masked mean add up to the whole
    w = mask / mask.sum()
    assert float(layer_sft_loss(v[:2], t[:2], w[:2]) + layer_sft_loss(v[2:], t[2:], w[2:])) == pytest.approx(
        float(layer_sft_loss(v, t, w)))


def _explicit_tree(branching):
    """Nodes as (depth, path of child indices) tuples; leaves in rollout order."""
    leaves = [()]
    for b in branching:
        leaves = [p + (c,) for p in leaves for c in range(b)]
    return leaves


@pytest.mark.parametrize("branching", [(2, 2, 2, 1), (8, 1, 1, 1), (3, 2), (1, 4, 2)])
@pytest.mark.parametrize("share_prefix", [True, False])
def test_sft_node_mask_picks_the_best_path_and_its_siblings(branching, share_prefix):
    spec = TreeSpec(num_steps=len(branching) + 1, window_start=0, branching=branching)
    velocity = lambda x, s, c: torch.zeros_like(x)  # noqa: E731 - the tree's index layout only
    tree = rollout(velocity, None, spec, torch.linspace(1, 0, spec.num_steps + 1), [0.5] * len(branching),
                   torch.zeros(1, 2), torch.Generator().manual_seed(0), share_prefix=share_prefix)
    paths = _explicit_tree(branching)
    for best in range(len(paths)):
        for k, layer in enumerate(tree.layers):
            pol = layer.parent_index[layer.edge_of_leaf]
            node = [paths[i][:k] for i in range(len(paths))]  # each leaf's node at depth k (the layer's parent)
            # independent: a row is chosen iff some leaf below it has a chosen node
            want_path = {int(pol[i]) for i in range(len(paths)) if node[i] == node[best]}
            want_sib = {int(pol[i]) for i in range(len(paths)) if node[i][:-1] == node[best][:-1]}
            got = lambda m: set(torch.nonzero(sft_node_mask(pol, best, m, branching, k)).flatten().tolist())  # noqa: E731
            assert got("best-path") == want_path
            assert got("siblings") == want_sib
            assert got("all") == set(range(layer.parents.shape[0]))
    with pytest.raises(ValueError, match="sft_nodes"):
        sft_node_mask(pol, 0, "cousins", branching, 0)


def test_trainer_regresses_the_chosen_nodes_onto_the_best_leaf(monkeypatch):
    """One step with sft_target="best-sample": every SFT call's target and weights equal
    what the captured tree, rewards and the formula give."""
    trees, groups, calls = [], [], []
    real_rollout, real_score, real_sft = trainer_mod.rollout_batch, trainer_mod.score_group, trainer_mod.layer_sft_loss

    def spy_rollout(*a, **kw):
        out = real_rollout(*a, **kw)
        trees.extend((t, t.leaves.clone()) for t in out)
        return out

    def spy_score(*a, **kw):
        g = real_score(*a, **kw)
        groups.append(g)
        return g

    def spy_sft(v, target, weight=None):
        calls.append((target.detach().clone(), weight.clone()))
        return real_sft(v, target, weight)

    monkeypatch.setattr(trainer_mod, "rollout_batch", spy_rollout)
    monkeypatch.setattr(trainer_mod, "score_group", spy_score)
    monkeypatch.setattr(trainer_mod, "layer_sft_loss", spy_sft)
    torch.manual_seed(0)
    cfg = make_config("dynamic-treerpo", num_steps=6, branching=[2, 2, 1], sft_lambda=0.5, sft_target="best-sample",
                      sft_nodes="siblings", window_mode="frozen", lr=1e-2)
    t = trainer_mod.Trainer(ToyVelocity(), cfg, Brightness(), encode=toy_encode, latent_shape=(4, 8, 8))
    m = t.step(["a cat", "a dog"])
    assert m["ratio_first_update"] == 1.0 and m["sft_loss"] > 0
    # one call per trained layer (no micro_batch): both prompts' nodes, prompt-major
    layers = cfg.trained_layers(0)
    assert len(calls) == len(layers)
    for (target, weight), k in zip(calls, layers):
        n = trees[0][0].layers[k].parents.shape[0]
        assert target.shape[0] == weight.shape[0] == 2 * n
        for p in range(2):
            tree, leaves = trees[p]
            layer, best = tree.layers[k], groups[p].best
            x0_best = leaves[best]
            want = (layer.parents.float() - x0_best) / layer.sigma
            torch.testing.assert_close(target[p * n:(p + 1) * n], want)
            w = weight[p * n:(p + 1) * n]
            rows = set(torch.nonzero(w).flatten().tolist())
            below = math.prod(cfg.branching[k - 1:]) if k else math.prod(cfg.branching)
            pol = layer.parent_index[layer.edge_of_leaf]
            assert rows == {int(pol[i]) for i in range(leaves.shape[0]) if i // below == best // below}
            assert float(w.sum()) == pytest.approx(1.0)  # each prompt's masked mean over its nodes


def test_new_sft_settings_are_validated():
    cfg = make_config("dynamic-treerpo", sft_target="best-sample", sft_nodes="best-path")
    assert cfg.sft_target == "best-sample"
    for kw, name in ((dict(sft_target="leaf"), "sft_target"), (dict(sft_nodes="cousins"), "sft_nodes")):
        with pytest.raises(ValueError, match=name):
            make_config("dynamic-treerpo", **kw)


def test_noised_best_sample_is_flow_matching_on_the_best_leaf(monkeypatch):
    """sft_target="best-sample-noised": the logged SFT loss equals flow matching on each
    prompt's best leaf at the seeded schedule steps, computed here with the pre-step weights."""
    import copy

    from treerpo.core.rng import generator

    finals, groups = [], []
    real_rollout, real_score = trainer_mod.rollout_batch, trainer_mod.score_group

    def keep(trees):  # the trees' final latents: the trainer frees them after scoring
        finals.extend(t.leaves.clone() for t in trees)
        return trees
    monkeypatch.setattr(trainer_mod, "rollout_batch", lambda *a, **kw: keep(real_rollout(*a, **kw)))
    monkeypatch.setattr(trainer_mod, "score_group", lambda *a, **kw: groups.append(real_score(*a, **kw)) or groups[-1])
    torch.manual_seed(0)
    cfg = make_config("dynamic-treerpo", num_steps=6, branching=[2, 2, 1], sft_lambda=0.5,
                      sft_target="best-sample-noised", lr=1e-2)
    policy = ToyVelocity()
    before = copy.deepcopy(policy)
    t = trainer_mod.Trainer(policy, cfg, Brightness(), encode=toy_encode, latent_shape=(4, 8, 8))
    prompts = ["a cat", "a dog"]
    m = t.step(prompts)
    n_draws = len(cfg.trained_layers(0))
    want = 0.0
    with torch.no_grad():
        for p, (prompt, g) in enumerate(zip(prompts, groups)):
            assert g.best is not None
            x0 = finals[p][g.best].unsqueeze(0).expand(n_draws, -1, -1, -1)
            gen = generator(cfg.seed, 0, p, "sft")
            steps = torch.randint(0, cfg.num_steps, (n_draws,), generator=gen)
            sig = torch.as_tensor(t.sigmas, dtype=torch.float32)[steps]
            noise = torch.randn(x0.shape, generator=gen)
            x = (1 - sig[:, None, None, None]) * x0 + sig[:, None, None, None] * noise
            cond = {k: v.expand(n_draws, *v.shape[1:]) for k, v in toy_encode([prompt])[0].items()}
            v = before(x, sig, cond)
            want += float(((v - (noise - x0)) ** 2).mean()) / len(prompts)
    assert m["sft_loss"] == pytest.approx(want, rel=1e-5)
    assert m["ratio_first_update"] == 1.0


def test_sft_decay_falls_linearly_to_zero():
    cfg = make_config("dynamic-treerpo", num_steps=4, branching=[2, 1], sft_lambda=0.4, sft_decay=True,
                      iterations=4, lr=1e-2)
    t = trainer_mod.Trainer(ToyVelocity(), cfg, Brightness(), encode=toy_encode, latent_shape=(4, 8, 8))
    got = [t.step(["a cat"])["sft_lambda"] for _ in range(5)]
    assert got == pytest.approx([0.4, 0.3, 0.2, 0.1, 0.0])
    flat = trainer_mod.Trainer(ToyVelocity(), make_config("dynamic-treerpo", num_steps=4, branching=[2, 1],
                                                          iterations=4), Brightness(), encode=toy_encode,
                               latent_shape=(4, 8, 8))
    assert [flat.step(["a cat"])["sft_lambda"] for _ in range(5)] == [0.02] * 5  # the paper's constant lambda
