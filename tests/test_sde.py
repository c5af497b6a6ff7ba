import math

import pytest
import torch

from treerpo.core.schedule import flux_sigmas
from treerpo.core.sde import compressed_grid, depth_noise, dpm_solver_pp_step, ode_step, sde_std, sde_step


def test_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 5, generator=g)
    v = torch.randn(3, 4, 5, 5, generator=g)
    sigma, sigma_next, a = 0.6, 0.5, 0.7
    out = sde_step(x, v, sigma, sigma_next, a, generator=g)
    std = a * math.sqrt(sigma / (1 - sigma)) * math.sqrt(sigma - sigma_next)
    ref = torch.distributions.Normal(out.mean, std).log_prob(out.x_next).flatten(1).mean(1)
    torch.testing.assert_close(out.log_prob, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.std, torch.full((3,), std), rtol=1e-6, atol=1e-7)
    # the mean is Eq. 5 written out
    g2 = (a * math.sqrt(sigma / (1 - sigma))) ** 2
    mean = x + (sigma_next - sigma) * (v + g2 / (2 * sigma) * (x + (1 - sigma) * v))
    torch.testing.assert_close(out.mean, mean, rtol=1e-5, atol=1e-6)


def test_reevaluating_a_sample_gives_its_log_prob():
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    s = sde_step(x, v, 0.8, 0.7, 0.9, generator=g)
    again = sde_step(x, v, 0.8, 0.7, 0.9, x_next=s.x_next)
    assert torch.equal(again.log_prob, s.log_prob)
    # a different velocity gives a different (lower on average) density
    other = sde_step(x, v + 0.5, 0.8, 0.7, 0.9, x_next=s.x_next)
    assert (other.log_prob < s.log_prob).all()


def test_sigma_one_guard_and_constant_schedule():
    x = torch.zeros(1, 1, 2, 2)
    std = sde_std(1.0, 0.9, 0.7, x).flatten()
    assert torch.isfinite(std).all()
    torch.testing.assert_close(std, torch.tensor([0.7 * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1)]))
    const = sde_std(0.5, 0.4, 0.3, x, schedule="constant").flatten()
    torch.testing.assert_close(const, torch.tensor([0.3 * math.sqrt(0.1)]))


def test_per_sample_sigmas_and_fp32():
    x = torch.randn(2, 3, 2, 2).to(torch.bfloat16)
    v = torch.randn(2, 3, 2, 2).to(torch.bfloat16)
    s = sde_step(x, v, torch.tensor([0.9, 0.5]), torch.tensor([0.8, 0.4]), 0.7,
                 generator=torch.Generator().manual_seed(0))
    assert s.x_next.dtype == torch.float32 and s.log_prob.dtype == torch.float32
    assert s.std[0] != s.std[1]


def test_depth_noise_eq6():
    assert depth_noise(0.7, 0.7, 0, 4) == pytest.approx(0.7)
    assert depth_noise(0.7, 0.7, 2, 4) == pytest.approx(0.7 * 1.35)
    levels = [depth_noise(0.7, 0.7, k, 4) for k in range(4)]
    assert levels == sorted(levels)


@pytest.mark.parametrize("bad", [-0.1, 0.0])
def test_bad_noise_raises(bad):
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="noise_level"):
        sde_step(x, x, 0.5, 0.4, bad)
    if bad < 0:
        with pytest.raises(ValueError, match="noise_level"):
            depth_noise(bad, 0.7, 0, 4)


def test_ode_step_is_euler():
    x, v = torch.ones(1, 2, 2, 2), torch.full((1, 2, 2, 2), 2.0)
    torch.testing.assert_close(ode_step(x, v, 0.5, 0.25), x - 0.25 * v)


def test_schedules():
    s = flux_sigmas(4)
    torch.testing.assert_close(s, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    s3 = flux_sigmas(4, shift=3.0)
    assert s3[0] == 1 and s3[-1] == 0 and s3[2] == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    d = flux_sigmas(28, image_seq_len=4096)
    mu = 1.15
    assert d[14] == pytest.approx(math.exp(mu) / (math.exp(mu) + 1 / 0.5 - 1), rel=1e-5)
    assert (d[1:] < d[:-1]).all()
    with pytest.raises(ValueError):
        flux_sigmas(4, shift=3.0, image_seq_len=256)


def test_compressed_grid_and_dpm_on_exact_linear_flow():
    sig = flux_sigmas(20, shift=3.0)[8:]
    grid = compressed_grid(sig, 0.4)
    assert len(grid) - 1 == int(0.4 * 13) - 1 and grid[0] == sig[0] and grid[-1] == 0  # MixGRPO-Flash: 4 steps
    # data = a fixed point c: x_sigma = (1-sigma) c + sigma eps, v = eps - c exactly;
    # DPM-Solver++ must land on c whatever the grid.
    c, eps = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    s0 = float(grid[0])
    x = (1 - s0) * c + s0 * eps
    x0_prev = sp = None
    for i in range(len(grid) - 1):
        x0 = c.clone()  # x - sigma * v for this flow
        x = dpm_solver_pp_step(x, x0, float(grid[i]), float(grid[i + 1]), x0_prev, sp)
        x0_prev, sp = x0, float(grid[i])
    torch.testing.assert_close(x, c)
