"""Held-out evaluation: deterministic samples of a model state on fixed prompts and fixed noise,
scored by the run's rewards, and the before/after figure.

Every state (base model, start of this run, after training) gets the SAME initial noise per
(prompt, seed) and the deterministic ODE sampler, so the only difference between two columns
is the weights. The score shown is the combined reward value of Eq. 11 (weighted sum of the raw
scores), the number a user compares.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .advantages import combined_reward
from .sde import ode_step


@torch.no_grad()
def sample_fixed_noise(policy, encode: Callable, decode: Callable, sigmas: torch.Tensor, prompts: Sequence[str],
                       seeds: Sequence[int], latent_shape: Sequence[int]) -> torch.Tensor:
    """Images [P, S, 3, H, W]: prompt p from the noise of seed s, ODE-sampled on `sigmas`."""
    device = getattr(policy, "device", torch.device("cpu"))
    noise = torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(device)
    out = []
    for cond in encode(list(prompts)):
        x = noise.clone()
        c = {k: v.to(device).expand(len(seeds), *v.shape[1:]) for k, v in cond.items()}
        for i in range(len(sigmas) - 1):
            v = policy(x, torch.full((len(seeds),), float(sigmas[i]), device=device), c)
            x = ode_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        out.append(decode(x).float().cpu())
    return torch.stack(out)


@dataclass
class Evaluation:
    """Samples and scores of several model states on the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # state -> [P, S, 3, H, W]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # state -> [P, S] combined reward value

    def mean(self, state: str) -> float:
        s = self.scores[state]
        return float(s[torch.isfinite(s)].mean())

    def summary(self) -> str:
        states = ", ".join(f"{k} {self.mean(k):.4f}" for k in self.scores)
        return (f"held-out reward ({len(self.prompts)} prompts x seeds {self.seeds}, same noise for every state): "
                f"{states}")

    def as_dict(self) -> dict:
        return {"prompts": self.prompts, "seeds": self.seeds,
                "mean": {k: self.mean(k) for k in self.scores},
                "scores": {k: v.tolist() for k, v in self.scores.items()}}


def evaluate(policy, encode: Callable, decode: Callable, rewards: Callable, prompts: Sequence[str],
             seeds: Sequence[int], latent_shape: Sequence[int], sigmas: torch.Tensor,
             states: Mapping[str, Callable[[], contextlib.AbstractContextManager]]) -> Evaluation:
    """Sample and score every state; `states` maps a name to a context manager factory that puts
    the policy in that state (e.g. `policy.reference` for the base model)."""
    if not prompts:
        raise ValueError("held-out evaluation needs at least one prompt (set a held-out fraction > 0 in Prompts)")
    ev = Evaluation(list(prompts), [int(s) for s in seeds])
    names, weights = getattr(rewards, "names", None), getattr(rewards, "weights", None)
    for name, state in states.items():
        with state():
            images = sample_fixed_noise(policy, encode, decode, sigmas, ev.prompts, ev.seeds, latent_shape)
        flat = images.flatten(0, 1)
        raw = torch.as_tensor(rewards(flat, [p for p in ev.prompts for _ in ev.seeds])).float().reshape(len(flat), -1)
        ev.images[name] = images
        ev.scores[name] = combined_reward(raw, weights, names).reshape(len(ev.prompts), len(ev.seeds))
    return ev


def comparison_grid(ev: Evaluation, left: str, right: str, seed_index: int = 0, columns: int = 4, scale: int = 3):
    """PIL figure: for each prompt the `left` and `right` samples side by side (same noise), the
    prompt and both scores under the pair."""
    from PIL import Image, ImageDraw

    from .preview import BG, INK, MUTED, font, to_pil

    a = to_pil(ev.images[left][:, seed_index])
    b = to_pil(ev.images[right][:, seed_index])
    w, h = a[0].width * scale, a[0].height * scale
    pad, fs = 8, max(11, w // 11)
    f, fb = font(fs), font(fs + 1)
    lines = 4
    cell_w, cell_h = 2 * w + 3 * pad, h + pad * 2 + (lines + 1) * (fs + 3) + fs + 4
    cols = min(columns, len(a))
    rows = (len(a) + cols - 1) // cols
    title_h = fb.size + 2 * pad
    img = Image.new("RGB", (cols * cell_w, rows * cell_h + title_h), BG)
    draw = ImageDraw.Draw(img)
    draw.text((pad, pad), f"{left} (left) vs {right} (right), seed {ev.seeds[seed_index]}: held-out mean "
                          f"{ev.mean(left):.3f} -> {ev.mean(right):.3f}", font=fb, fill=INK)
    for i, prompt in enumerate(ev.prompts):
        x0, y0 = (i % cols) * cell_w, (i // cols) * cell_h + title_h
        draw.text((x0 + pad, y0 + 2), left, font=f, fill=MUTED)
        draw.text((x0 + 2 * pad + w, y0 + 2), right, font=f, fill=MUTED)
        y = y0 + fs + 4
        img.paste(a[i].resize((w, h), Image.NEAREST), (x0 + pad, y))
        img.paste(b[i].resize((w, h), Image.NEAREST), (x0 + 2 * pad + w, y))
        y += h + 3
        sl, sr = float(ev.scores[left][i, seed_index]), float(ev.scores[right][i, seed_index])
        draw.text((x0 + pad, y), f"{sl:.2f}", font=f, fill=INK)
        draw.text((x0 + 2 * pad + w, y), f"{sr:.2f}", font=f, fill=INK)
        wrap = textwrap.wrap(prompt, width=max(10, int(cell_w / (fs * 0.55))))[:lines]
        for j, line in enumerate(wrap):
            draw.text((x0 + pad, y + (j + 1) * (fs + 3)), line, font=f, fill=INK)
    return img


@contextlib.contextmanager
def trainable_weights(policy: torch.nn.Module, snapshot: Mapping[str, torch.Tensor]):
    """Temporarily load a `core.run.trainable_snapshot` into the policy (e.g. the weights a run
    started from), restoring the current weights afterwards."""
    params = {n: p for n, p in policy.named_parameters() if n in snapshot}
    current = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(snapshot[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(current[n])
