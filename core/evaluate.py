"""Evaluation of model states: deterministic samples on fixed prompts and fixed noise, scored by the
run's rewards, compared with intervals; and the before/after figure.

Every state (base model, start of this run, after training) gets the SAME initial noise per
(prompt, seed) and the deterministic ODE sampler, so the only difference between two columns
is the weights. The score is the combined reward value of Eq. 11 (weighted sum of the raw
scores), the number a user compares.

The protocol (docs/demo.md#the-evaluation-protocol): settings are chosen on a validation prompt
set and claims reported on a disjoint test set; every mean comes with a 95 % interval from a
bootstrap over prompts (samples of one prompt are not independent), and a difference between two
states is bootstrapped paired, on the same resampled prompts, since both saw the same noise.
"""

from __future__ import annotations

import contextlib
import textwrap
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from .advantages import combined_reward
from .sde import ode_step

BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same scores always print the same interval


def _batched(conds: list, n: int):
    """Concatenate per-prompt conditions (batch 1), each repeated n times, into one batch; None
    when their shapes differ (then prompts are sampled one by one)."""
    keys = set(conds[0])
    if any(set(c) != keys or any(c[k].shape != conds[0][k].shape for k in keys) for c in conds):
        return None
    return {k: torch.cat([c[k].expand(n, *c[k].shape[1:]) for c in conds]) for k in keys}


@torch.no_grad()
def sample_fixed_noise(policy, encode: Callable, decode: Callable, sigmas: torch.Tensor, prompts: Sequence[str],
                       seeds: Sequence[int], latent_shape: Sequence[int], batch: int = 64) -> torch.Tensor:
    """Images [P, S, 3, H, W]: prompt p from the noise of seed s, ODE-sampled on `sigmas`, up to
    `batch` samples per model forward (prompts are chunked whole, so a state's samples never
    depend on which other states are evaluated)."""
    device = getattr(policy, "device", torch.device("cpu"))
    s = len(seeds)
    noise = torch.stack([torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(seed)))
                         for seed in seeds]).to(device)
    conds = [{k: v.to(device) for k, v in c.items()} for c in encode(list(prompts))]
    per = max(1, batch // s)
    out = []
    for a in range(0, len(conds), per):
        chunk = conds[a:a + per]
        c = _batched(chunk, s)
        groups = [(c, len(chunk))] if c is not None else [(_batched([one], s), 1) for one in chunk]
        for cond, n in groups:
            x = noise.repeat(n, 1, 1, 1)
            for i in range(len(sigmas) - 1):
                v = policy(x, torch.full((len(x),), float(sigmas[i]), device=device), cond)
                x = ode_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
            out.append(decode(x).float().cpu().unflatten(0, (n, s)))
    return torch.cat(out)


@dataclass
class Interval:
    """A mean and its 95 % bootstrap interval over prompts."""

    mean: float
    lo: float
    hi: float

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.lo:.4f}, {self.hi:.4f}]"

    def signed(self) -> str:
        return f"{self.mean:+.4f} [{self.lo:+.4f}, {self.hi:+.4f}]"


def bootstrap_interval(per_prompt: torch.Tensor, level: float = 0.95, samples: int = BOOTSTRAP_SAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> Interval:
    """Mean of ``per_prompt`` [P] (one value per prompt: its mean over seeds, or a paired
    difference) and the percentile interval of the mean over prompts resampled with replacement."""
    x = per_prompt.double().flatten()
    if x.numel() == 0:
        raise ValueError("bootstrap_interval needs at least one prompt with a finite score")
    idx = torch.randint(len(x), (samples, len(x)), generator=torch.Generator().manual_seed(seed))
    means = x[idx].mean(1)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return Interval(float(x.mean()), lo, hi)


@dataclass
class Evaluation:
    """Samples and scores of several model states on the same prompts and seeds."""

    prompts: list[str]
    seeds: list[int]
    name: str = "held-out prompts"  # which prompt set, for the printed line
    rewards: list[str] = field(default_factory=list)  # the reward models scored (their combined value)
    weights: list[float] = field(default_factory=list)  # their weights in it (0: scored beside it only)
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # state -> [P, S, 3, H, W]
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # state -> [P, S] combined reward value
    # with several rewards, each one's own score: state -> reward name -> [P, S]
    by_reward: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def mean(self, state: str) -> float:
        s = self.scores[state]
        return float(s[torch.isfinite(s)].mean())

    def _per_prompt(self, *states: str, reward: str | None = None) -> list[torch.Tensor]:
        """Per-prompt means over seeds of each state (of one reward's own score when `reward` is
        given), on the (prompt, seed) cells finite in all."""
        scores = [self.scores[s] if reward is None else self.by_reward[s][reward] for s in states]
        ok = torch.stack([torch.isfinite(x) for x in scores]).all(0)
        keep = ok.any(1)
        return [(torch.where(ok, x, 0).sum(1) / ok.sum(1).clamp_min(1))[keep] for x in scores]

    def interval(self, state: str) -> Interval:
        return bootstrap_interval(self._per_prompt(state)[0])

    def gain(self, before: str, after: str, reward: str | None = None) -> Interval:
        """``after - before`` with its paired interval (the same resampled prompts for both), of the
        combined value or of one reward's own score."""
        a, b = self._per_prompt(before, after, reward=reward)
        return bootstrap_interval(b - a)

    def reward_gains(self, before: str, after: str) -> dict[str, Interval]:
        """Each reward's own gain, when there are several (empty otherwise)."""
        return {n: self.gain(before, after, reward=n) for n in self.by_reward.get(after, {})}

    def summary(self, before: str | None = None, after: str | None = None) -> str:
        """One line: the set, its size, every state's mean with its interval, and the gain of
        ``after`` over ``before`` (default: the first and last state) with its paired interval."""
        states = list(self.scores)
        before, after = before or states[0], after or states[-1]
        line = (f"{self.name}, {len(self.prompts)} prompts x {len(self.seeds)} seeds (the same noise for every state; "
                f"95 % bootstrap intervals over prompts): "
                + ", ".join(f"{k} {self.interval(k)}" for k in states))
        if before != after:
            line += f"; {after} - {before} {self.gain(before, after).signed()} (paired)"
            parts = self.reward_gains(before, after)
            if parts:
                line += "; each reward's own gain: " + ", ".join(f"{n} {g.signed()}" for n, g in parts.items())
        return line

    def as_dict(self) -> dict:
        states = list(self.scores)
        out = {"set": self.name, "rewards": self.rewards, "weights": self.weights, "prompts": self.prompts,
               "seeds": self.seeds,
               "mean": {k: self.mean(k) for k in states},
               "interval": {k: vars(self.interval(k)) for k in states},
               "scores": {k: v.tolist() for k, v in self.scores.items()}}
        if len(states) > 1:
            out["gain"] = {f"{k}-{states[0]}": vars(self.gain(states[0], k)) for k in states[1:]}
            if self.by_reward:
                out["reward_gain"] = {f"{k}-{states[0]}": {n: vars(g) for n, g in
                                                           self.reward_gains(states[0], k).items()}
                                      for k in states[1:]}
        return out


def evaluate(policy, encode: Callable, decode: Callable, rewards: Callable, prompts: Sequence[str],
             seeds: Sequence[int], latent_shape: Sequence[int], sigmas: torch.Tensor,
             states: Mapping[str, Callable[[], contextlib.AbstractContextManager]], name: str = "held-out prompts",
             keep_images: int | None = None) -> Evaluation:
    """Sample and score every state; `states` maps a name to a context manager factory that puts
    the policy in that state (e.g. `policy.reference` for the base model). ``keep_images``: keep
    the images of the first that many prompts only (all by default)."""
    if not prompts:
        raise ValueError("evaluation needs at least one prompt (set a held-out fraction > 0 in Prompts, "
                         "or choose a prompt set)")
    names, weights = getattr(rewards, "names", None), getattr(rewards, "weights", None)
    ev = Evaluation(list(prompts), [int(s) for s in seeds], name, list(names or []), [float(w) for w in weights or []])
    for state_name, state in states.items():
        with state():
            images = sample_fixed_noise(policy, encode, decode, sigmas, ev.prompts, ev.seeds, latent_shape)
        flat = images.flatten(0, 1)
        raw = torch.as_tensor(rewards(flat, [p for p in ev.prompts for _ in ev.seeds])).float().reshape(len(flat), -1)
        ev.images[state_name] = images[:keep_images]
        ev.scores[state_name] = combined_reward(raw, weights, names).reshape(len(ev.prompts), len(ev.seeds))
        if raw.shape[1] > 1 and names:
            grid = raw.reshape(len(ev.prompts), len(ev.seeds), -1)
            ev.by_reward[state_name] = {n: grid[..., i] for i, n in enumerate(names)}
    return ev


def comparison_grid(ev: Evaluation, left: str, right: str, seed_index: int = 0, columns: int = 4, scale: int = 3):
    """PIL figure: for each prompt with kept images the `left` and `right` samples side by side
    (same noise), the prompt and both scores under the pair; the title gives the means over all
    prompts."""
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
    shown = f"first {len(a)} of {len(ev.prompts)} prompts" if len(a) < len(ev.prompts) else f"{len(a)} prompts"
    draw.text((pad, pad), f"{left} (left) vs {right} (right), seed {ev.seeds[seed_index]}, {shown}; {ev.name} mean "
                          f"{ev.mean(left):.3f} -> {ev.mean(right):.3f}", font=fb, fill=INK)
    for i, prompt in enumerate(ev.prompts[:len(a)]):
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
    """Temporarily load a `core.training_run.trainable_snapshot` into the policy (e.g. the weights a run
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
