"""Tiny models for the core tests (no FLUX): a frozen conv 'base' plus a trainable
low-rank adapter, and a prompt encoder from hashed characters."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class ToyVelocity(nn.Module):
    """v = base(x, sigma, cond) + scale * adapter(...); only the adapter trains."""

    def __init__(self, channels: int = 4, hidden: int = 16, cond_dim: int = 8, rank: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.inp = nn.Conv2d(channels + 1, hidden, 3, padding=1)
        self.cond = nn.Linear(cond_dim, hidden)
        self.out = nn.Conv2d(hidden, channels, 3, padding=1)
        for p in self.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            p.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, hidden, generator=g) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(channels, rank))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.adapters_on = True

    def forward(self, x, sigma, cond):
        s = sigma.to(x.dtype).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        h = torch.tanh(self.inp(torch.cat([x, s], 1)))
        if cond is not None:
            h = h + self.cond(cond["emb"].to(x.dtype))[:, :, None, None]
        v = self.out(h)
        if self.adapters_on:
            delta = torch.einsum("rh,bhxy->brxy", self.lora_A, h)
            v = v + torch.einsum("cr,brxy->bcxy", self.lora_B, delta) + self.bias[None, :, None, None]
        return v

    @contextlib.contextmanager
    def reference(self):
        self.adapters_on = False
        try:
            yield
        finally:
            self.adapters_on = True


def toy_encode(prompts, dim: int = 8):
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(p)))
        out.append({"emb": torch.randn(1, dim, generator=g)})
    return out


class Brightness:
    """Weight-free reward on latents: mean value (and a second, noisy-scale copy)."""

    names = ["brightness"]
    weights = [1.0]

    def __call__(self, images, prompts):
        return images.float().flatten(1).mean(1, keepdim=True)
