"""Denoising steps: ODE (Euler), the Flow-GRPO SDE step with its log-probability, the
coefficients-preserving step (CPS) as an alternative sampler, the depth noise growth of
Dynamic-TreeRPO (Eq. 5-8), and 2nd-order DPM-Solver++ for the compressed steps after the
window (MixGRPO-Flash).

Notation: dt = sigma_next - sigma < 0, D = -dt; x0_hat = x - sigma * v.
All SDE / log-prob maths runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class SDEStep:
    x_next: torch.Tensor  # sampled (or given) next latent, fp32
    log_prob: torch.Tensor  # [B] Gaussian log-density, mean over non-batch elements
    mean: torch.Tensor  # drift of the step, fp32
    std: torch.Tensor  # [B] scalar std per sample


def _per_sample(value, x: torch.Tensor) -> torch.Tensor:
    """Broadcast a float or [B] tensor to [B, 1, 1, ...] float32 on x's device."""
    t = torch.as_tensor(value, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    return t.reshape(-1, *([1] * (x.ndim - 1)))


def depth_noise(noise_level: float, beta: float, k: int, depth: int) -> float:
    """Eq. 6: noise level at tree layer k of a depth-d tree, a * (1 + beta * k / d)."""
    if noise_level < 0:
        raise ValueError(f"noise_level must be >= 0, got {noise_level}")
    if depth < 1 or not 0 <= k < depth:
        raise ValueError(f"tree layer k={k} must lie in [0, depth={depth})")
    return noise_level * (1.0 + beta * k / depth)


NOISE_SCHEDULES = ("flow-grpo", "constant")
SAMPLERS = ("sde", "cps")


def sde_std(sigma, sigma_next, noise_level, like: torch.Tensor, schedule: str = "flow-grpo") -> torch.Tensor:
    """g * sqrt(D), shape [B, 1, ...].

    "flow-grpo": g = a * sqrt(sigma / (1 - sigma)); at sigma == 1 the denominator uses
    sigma_next (the guard all public Flow-GRPO code uses). "constant": g = a (DanceGRPO).
    """
    s = _per_sample(sigma, like)
    s_next = _per_sample(sigma_next, like)
    if schedule == "flow-grpo":
        denom = 1 - torch.where(s >= 1, s_next, s)
        g = noise_level * torch.sqrt(s / denom)
    elif schedule == "constant":
        g = torch.full_like(s, float(noise_level))
    else:
        raise ValueError(f"noise schedule must be one of {NOISE_SCHEDULES}, got {schedule!r}")
    return g * torch.sqrt(s - s_next)


def cps_std(sigma_next, noise_level, like: torch.Tensor) -> torch.Tensor:
    """Std of the CPS step, sigma_next * sin(a * pi / 2), shape [B, 1, ...]. The level is
    capped at 1 (full re-noising), which depth growth can exceed (0.7 * 1.525 at k = 3)."""
    angle = min(float(noise_level), 1.0) * math.pi / 2
    return _per_sample(sigma_next, like) * math.sin(angle)


def sde_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigma,
    sigma_next,
    noise_level: float,
    generator: torch.Generator | None = None,
    x_next: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    schedule: str = "flow-grpo",
    sampler: str = "sde",
) -> SDEStep:
    """One stochastic step (Eq. 5 / 8) and the log-density of its result.

    ``sampler="sde"`` (Flow-GRPO): mean = x + dt * (v + g^2 / (2 sigma) * (x + (1 - sigma) v)),
    std = g * sqrt(D). ``sampler="cps"`` (coefficients-preserving, as in Flow-GRPO's and
    MixGRPO's CPS variants): with x0 = x - sigma v and eps = x + (1 - sigma) v,
    mean = (1 - sigma_next) x0 + sqrt(sigma_next^2 - std^2) eps, std = sigma_next sin(a pi/2),
    so the noise coefficient of x_next stays exactly sigma_next. Both return the full
    Gaussian log-density (element mean); Flow-GRPO's CPS drops its constants and the 1/(2 std^2).
    With ``x_next`` given, nothing is sampled: its log-probability under this step is
    returned (this is how the trainer re-evaluates old samples under the new policy).
    ``noise`` may supply eps directly (the tree draws it per child node).
    """
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for an SDE step (its log-prob needs a std), got {noise_level}")
    xf, vf = x.float(), v.float()
    s = _per_sample(sigma, xf)
    s_next = _per_sample(sigma_next, xf)
    if bool((s_next >= s).any()):
        raise ValueError("sigma_next must be smaller than sigma (sigma runs from 1 to 0)")
    if sampler == "cps":
        if bool((s_next <= 0).any()):
            raise ValueError("the CPS step needs sigma_next > 0 (its std is sigma_next * sin(a pi / 2))")
        std = cps_std(sigma_next, noise_level, xf)
        mean = (1 - s_next) * (xf - s * vf) + torch.sqrt(s_next * s_next - std * std) * (xf + (1 - s) * vf)
    elif sampler == "sde":
        std = sde_std(sigma, sigma_next, noise_level, xf, schedule)
        g2 = (std * std) / (s - s_next)
        dt = s_next - s
        mean = xf + dt * (vf + g2 / (2 * s) * (xf + (1 - s) * vf))
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if x_next is None:
        if noise is None:
            noise = torch.randn(xf.shape, generator=generator, device=xf.device, dtype=torch.float32)
        x_next = mean + std * noise.float()
    x_next = x_next.float()
    lp = -((x_next - mean) ** 2) / (2 * std * std) - torch.log(std) - _LOG_SQRT_2PI
    return SDEStep(x_next, lp.flatten(1).mean(1), mean, std.flatten())


def ode_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Euler step of dx = v dt."""
    dt = _per_sample(sigma_next, x) - _per_sample(sigma, x)
    return (x.float() + dt * v.float()).to(x.dtype)


def compressed_steps(n: int, ratio: float) -> int:
    """Steps left after compressing the n steps after the window (MixGRPO-Flash):
    int(ratio * (n + 1)) - 1, at least 1, as their sampler spends (a grid of
    int(ratio * (n + 1)) sigmas from the window's end to 0)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"compress ratio must lie in (0, 1], got {ratio}")
    return max(1, int(ratio * (n + 1) + 1e-9) - 1) if n > 0 else 0


def compressed_grid(sigmas_tail: torch.Tensor, ratio: float) -> torch.Tensor:
    """Re-grid the n steps after the window to compressed_steps(n, ratio) steps.

    The new grid samples the original schedule at evenly spaced fractional indices, so it
    keeps the schedule's shift and ends exactly at the same sigmas.
    """
    n = len(sigmas_tail) - 1
    m = compressed_steps(n, ratio)
    if n <= 0:
        return sigmas_tail
    pos = torch.linspace(0, n, m + 1, dtype=torch.float64)
    lo = pos.floor().long().clamp(max=n - 1)
    frac = (pos - lo).to(sigmas_tail.dtype)
    s = sigmas_tail
    return s[lo] + frac * (s[lo + 1] - s[lo])


def dpm_solver_pp_step(
    x: torch.Tensor,
    x0: torch.Tensor,
    sigma: float,
    sigma_next: float,
    x0_prev: torch.Tensor | None = None,
    sigma_prev: float | None = None,
) -> torch.Tensor:
    """DPM-Solver++ (data prediction) step for rectified flow: alpha = 1 - sigma.

    1st order without history, 2nd order multistep (2M) with the previous x0 estimate;
    the final step to sigma = 0 returns x0 (lower order at the end, as diffusers does).
    """
    if sigma_next <= 0:
        return x0
    lam = lambda s: math.log((1 - s) / s)  # noqa: E731 - log-SNR of the flow
    h = lam(sigma_next) - lam(sigma)
    d = x0
    if x0_prev is not None and sigma_prev is not None and sigma_prev < 1:
        r = (lam(sigma) - lam(sigma_prev)) / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
    return (sigma_next / sigma) * x - (1 - sigma_next) * math.expm1(-h) * d
