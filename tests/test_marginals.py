"""SDE sampling (with depth noise growth) keeps the ODE's marginals: checked on a 2-D
Gaussian data distribution where the rectified-flow velocity is known exactly."""

import torch

from treerpo.core.sde import depth_noise, ode_step, sde_step

M = torch.tensor([1.0, -0.5])
S = torch.tensor([[0.5, 0.3], [0.3, 0.8]])


def velocity(x, t):
    """E[eps - x0 | x_t] for x0 ~ N(M, S), x_t = (1-t) x0 + t eps."""
    xf = x.flatten(1).double()
    m, s = M.double(), S.double()
    cov = (1 - t) ** 2 * s + t**2 * torch.eye(2, dtype=torch.float64)
    r = torch.linalg.solve(cov, (xf - (1 - t) * m).T).T
    e_eps = t * r
    e_x0 = m + (1 - t) * (r @ s.T)
    return (e_eps - e_x0).float().reshape(x.shape)


def sample(n, steps, window, beta, a=0.7, seed=0, sampler="sde", levels=None):
    """ODE samples with SDE steps in ``window`` (start, depth) at Eq. 6's levels, or ``levels``."""
    g = torch.Generator().manual_seed(seed)
    sig = torch.linspace(1, 0, steps + 1)
    x = torch.randn(n, 2, 1, 1, generator=g)
    start, depth = window
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        v = velocity(x, s)
        if start <= i < start + depth:
            level = levels[i - start] if levels is not None else depth_noise(a, beta, i - start, depth)
            x = sde_step(x, v, s, s1, level, generator=g, sampler=sampler).x_next
        else:
            x = ode_step(x, v, s, s1)
    return x.flatten(1)


def stats(x):
    return x.mean(0), torch.cov(x.T)


def test_sde_with_depth_noise_matches_ode_marginals():
    n, steps = 20000, 60
    ode_m, ode_c = stats(sample(n, steps, (0, 0), 0.0))
    for window, beta in [((10, 8), 0.7), ((0, 60), 0.0)]:
        sde_m, sde_c = stats(sample(n, steps, window, beta, seed=1))
        assert torch.allclose(sde_m, ode_m, atol=0.04), (window, sde_m, ode_m)
        assert torch.allclose(sde_c, ode_c, atol=0.06), (window, sde_c, ode_c)
    # and both reach the data distribution
    assert torch.allclose(ode_m, M, atol=0.03)
    assert torch.allclose(ode_c, S, atol=0.05)


def test_cps_with_depth_noise_keeps_the_mean_and_shrinks_the_spread_with_its_level():
    """The coefficients-preserving step (with depth noise growth) keeps the mean, and the
    covariance at a small level; it re-noises a fixed fraction sin(a pi/2) of sigma_next
    per step around the posterior-mean x0, so at a = 0.7 the spread shrinks measurably
    (documented in docs/engine.md), unlike the Flow-GRPO SDE step above."""
    n, steps, window = 20000, 60, (10, 8)
    ode_m, ode_c = stats(sample(n, steps, (0, 0), 0.0))
    low_m, low_c = stats(sample(n, steps, window, 0.7, a=0.3, seed=3, sampler="cps"))
    assert torch.allclose(low_m, ode_m, atol=0.04) and torch.allclose(low_c, ode_c, atol=0.03), (low_m, low_c)
    high_m, high_c = stats(sample(n, steps, window, 0.7, a=0.7, seed=3, sampler="cps"))
    assert torch.allclose(high_m, ode_m, atol=0.04), high_m
    shrink = torch.diagonal(ode_c) - torch.diagonal(high_c)
    assert (shrink > 0.03).all() and (shrink < 0.15).all(), shrink


def test_noise_only_on_the_density_would_break_marginals():
    """The pitfall REFERENCES.md warns of: scaling the injected noise by the depth factor
    without the matching drift correction widens the final distribution; the test above
    would catch it."""
    n, steps, a, beta = 20000, 60, 0.7, 0.7
    g = torch.Generator().manual_seed(2)
    sig = torch.linspace(1, 0, steps + 1)
    x = torch.randn(n, 2, 1, 1, generator=g)
    for i in range(steps):
        s, s1 = float(sig[i]), float(sig[i + 1])
        v = velocity(x, s)
        if 10 <= i < 18:
            base = sde_step(x, v, s, s1, a, generator=g)  # drift for noise a
            k = i - 10
            x = base.mean + base.std.reshape(-1, 1, 1, 1) * (1 + beta * k / 8) * torch.randn(x.shape, generator=g)
        else:
            x = ode_step(x, v, s, s1)
    _, c = stats(x.flatten(1))
    assert not torch.allclose(c, S, atol=0.06)


def test_split_noise_keeps_the_marginals_up_to_a_factor_2_and_not_at_4():
    """split_noise scales the level at the branching steps. In continuous time the Flow-GRPO
    SDE keeps the ODE's marginals at any level, but its first-order step does not: at 60
    steps a factor 2 keeps them, BranchGRPO's factor 4 inflates the covariance by ~0.19
    (at 25 steps already a factor 2 errs by ~0.09; docs/engine.md)."""
    from treerpo.core.presets import make_config
    from treerpo.core.schedule import schedule

    cfg = make_config("dynamic-treerpo", num_steps=60, branching=[2, 1, 2, 1], split_noise=2.0, beta=0.0)
    levels = schedule(cfg, (16, 8, 8))[1]
    assert levels == [1.4, 0.7, 1.4, 0.7]
    ode_m, ode_c = stats(sample(20000, 60, (0, 0), 0.0))
    sde_m, sde_c = stats(sample(20000, 60, (10, 4), 0.0, seed=5, levels=levels))
    assert torch.allclose(sde_m, ode_m, atol=0.04), (sde_m, ode_m)
    assert torch.allclose(sde_c, ode_c, atol=0.06), (sde_c, ode_c)
    _, wide_c = stats(sample(20000, 60, (10, 4), 0.0, seed=5, levels=[2.8, 0.7, 2.8, 0.7]))
    assert float((wide_c - ode_c).abs().max()) > 0.1, wide_c
