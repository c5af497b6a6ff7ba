"""A tiny diffusers FluxTransformer2DModel policy built in code, for engine tests."""

import torch

from treerpo.core.models import FluxPolicy, LoraSettings

LATENT = (16, 8, 8)


def tiny_transformer(seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=[4, 6, 6],
    )


def tiny_policy(seed: int = 0, rank: int = 4):
    return FluxPolicy(tiny_transformer(seed), lora=LoraSettings(rank=rank, alpha=rank), dtype=torch.float32)


def tiny_encode(prompts):
    out = []
    for p in prompts:
        g = torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(p)))
        out.append({"prompt_embeds": torch.randn(1, 6, 32, generator=g),
                    "pooled_prompt_embeds": torch.randn(1, 16, generator=g)})
    return out
