
import pytest
import torch

from treerpo.core.advantages import group_advantages, normalized_reward
from treerpo.core.losses import clipped_surrogate, dynamic_clip_eps, tree_edge_loss


def test_per_reward_normalisation_and_sum():
    r = torch.tensor([[0.30, 20.0], [0.32, 22.0], [0.34, 21.0]])
    a = group_advantages(r)
    z0 = (r[:, 0] - r[:, 0].mean()) / r[:, 0].std(unbiased=False)
    z1 = (r[:, 1] - r[:, 1].mean()) / r[:, 1].std(unbiased=False)
    torch.testing.assert_close(a, z0 + z1)
    w = group_advantages(r, weights=[2.0, 0.0])
    torch.testing.assert_close(w, 2 * z0)


def test_zero_variance_gives_zeros_not_nan():
    assert torch.equal(group_advantages(torch.ones(8, 2)), torch.zeros(8))
    r = torch.tensor([[1.0, 5.0], [1.0, 6.0]])  # first reward constant: contributes 0
    a = group_advantages(r)
    assert torch.isfinite(a).all() and torch.allclose(a, torch.tensor([-1.0, 1.0]))


def test_nan_rewards_are_masked():
    r = torch.tensor([[1.0], [float("nan")], [3.0], [float("inf")]])
    a = group_advantages(r)
    assert torch.isfinite(a).all()
    assert a[1] == 0 and a[3] == 0 and a[0] == -1 and a[2] == 1


def test_clip_and_shape_errors():
    r = torch.zeros(10, 1)
    r[0] = 100.0
    assert group_advantages(r, clip=1.5).max() == 1.5
    with pytest.raises(ValueError, match="shape"):
        group_advantages(torch.zeros(4))
    with pytest.raises(ValueError, match="weights"):
        group_advantages(torch.zeros(4, 2), weights=[1.0])


def test_dynamic_eps_monotone_and_bounded():
    R = torch.linspace(0, 1, 11)
    eps = dynamic_clip_eps(R, 5e-5, 5e-3, 0.5)
    assert (eps[1:] < eps[:-1]).all()
    assert eps.max() <= 5e-3 and eps.min() >= 5e-5
    assert eps[0] == pytest.approx(5e-3)
    assert dynamic_clip_eps(torch.tensor([-3.0]), 5e-5, 5e-3, 0.5)[0] == pytest.approx(5e-3)
    huge = dynamic_clip_eps(torch.tensor([1e4]), 5e-5, 5e-3, 0.5)[0]
    assert huge == pytest.approx(5e-5)
    with pytest.raises(ValueError):
        dynamic_clip_eps(R, 1e-2, 1e-3, 0.5)
    n = normalized_reward(torch.tensor([-2.0, 0.0, 2.0]))
    assert n.tolist() == [0.0, 0.5, 1.0]


def test_edge_loss_counts_shared_edge_once_per_leaf():
    # two edges, three leaves: edge 0 lies on leaves 0 and 1
    new = torch.tensor([0.0, 0.0], requires_grad=True)
    old = torch.zeros(2)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, stats = tree_edge_loss(new, old, torch.tensor([0, 0, 1]), adv, torch.full((3,), 0.1), torch.ones(3))
    loss.backward()
    # d(-rho*A)/d logp = -A at ratio 1: edge 0 gets -2, edge 1 gets +1
    assert new.grad.tolist() == [-2.0, 1.0]
    assert stats["count"] == 3 and stats["ratio_sum"] == 3.0


def test_clipped_surrogate_clips():
    rho = torch.tensor([1.5, 0.5])
    out = clipped_surrogate(rho, torch.tensor([1.0, -1.0]), torch.tensor(0.2))
    assert out.tolist() == pytest.approx([-1.2, 0.8])


def _edge_means(adv, valid, edge_of_leaf, n_edges):
    """Independent: loops over edges."""
    out = []
    for e in range(n_edges):
        below = [float(adv[i]) for i in range(len(adv)) if int(edge_of_leaf[i]) == e and bool(valid[i])]
        out.append((sum(below) / len(below), len(below)) if below else (0.0, 0))
    return out


def test_edge_advantages_descendant_mean_and_depth_standardised():
    from treerpo.core.advantages import edge_advantages

    adv = torch.tensor([1.0, 0.5, -0.5, -1.0, 2.0, 0.0, -2.0, 0.0])
    valid = torch.tensor([True, True, True, True, True, True, False, True])
    edge_of_leaf = torch.arange(8) // 2  # 4 edges of 2 leaves each
    means = _edge_means(adv, valid, edge_of_leaf, 4)
    a, w = edge_advantages(adv, valid, edge_of_leaf, 4, "descendant-mean")
    assert a.tolist() == pytest.approx([m for m, _ in means])
    assert w.tolist() == pytest.approx([n / 7 for _, n in means])  # share of the 7 valid leaves
    # at ratio 1 the weighted edge advantages sum to Eq. 9's weighted leaf advantages
    assert float((a * w).sum()) == pytest.approx(float(adv[valid].sum() / 7))
    z, w = edge_advantages(adv, valid, edge_of_leaf, 4, "depth-standardised")
    m = torch.tensor([m for m, _ in means])
    assert z.tolist() == pytest.approx(((m - m.mean()) / m.std(unbiased=False)).tolist())
    assert w.tolist() == pytest.approx([0.25] * 4)
    # one edge at a depth, and edges that all agree, carry no signal; all-invalid edges weigh 0
    z, w = edge_advantages(adv, valid, torch.zeros(8, dtype=torch.long), 1, "depth-standardised")
    assert z.tolist() == [0.0] and w.tolist() == [1.0]
    z, w = edge_advantages(torch.ones(4), torch.tensor([True, True, False, False]), torch.arange(4) // 2, 2,
                           "depth-standardised")
    assert z.tolist() == [0.0, 0.0] and w.tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="edge advantages"):
        edge_advantages(adv, valid, edge_of_leaf, 4, "leaf")


def test_approx_kl_is_half_the_mean_squared_log_ratio_over_valid_terms():
    new = torch.tensor([0.3, -0.2, 0.1])
    old = torch.tensor([0.1, 0.1, 0.1])
    edge_of_leaf = torch.tensor([0, 0, 1, 2])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last leaf is masked
    _, stats = tree_edge_loss(new, old, edge_of_leaf, torch.ones(4), torch.full((4,), 0.1), weight)
    # independent: one term per valid leaf, (new - old)^2 / 2 of the edge on its path
    expect = sum((float(new[e]) - float(old[e])) ** 2 / 2 for e, w in zip([0, 0, 1, 2], weight) if w > 0)
    assert stats["approx_kl_sum"] == pytest.approx(expect)
    assert stats["approx_kl_sum"] / stats["count"] == pytest.approx((0.2**2 * 2 + 0.3**2) / 2 / 3)
    # the log of the ratio the clip sees, per valid term: +0.2, +0.2, -0.3 (the masked leaf left out)
    assert stats["log_ratio_sum"] == pytest.approx(0.2 + 0.2 - 0.3)
    assert stats["log_ratio_sq_sum"] == pytest.approx(0.2**2 * 2 + 0.3**2)
    _, normed = tree_edge_loss(new, old, edge_of_leaf, torch.ones(4), torch.full((4,), 0.1), weight,
                               log_ratio=torch.tensor([0.5, 0.0, 0.0]))
    assert normed["log_ratio_sum"] == pytest.approx(1.0)  # ratio_norm's log-ratio, not new - old
