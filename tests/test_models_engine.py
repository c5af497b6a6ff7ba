"""End to end: the core engine trains the tiny FLUX policy loaded through our loaders
(single files, embedding cache, VAE decode), and the trained LoRA is saved and reloaded."""

import math

import pytest
import torch

from treerpo.core.models import (
    LoraSettings, load_flux, load_lora, lora_settings_from_file, read_lora_metadata, save_lora,
)
from treerpo.core.models.build import load_flux_policy
from treerpo.testing import build_tiny_flux

PROMPTS = ["a red cube", "a blue ball"]


class MeanBrightness:
    """Reward: mean pixel value of each decoded image -> Tensor[B, 1] on the CPU."""

    names = ["brightness"]
    weights = [1.0]

    def __init__(self):
        self.shapes = []

    def __call__(self, images, prompts):
        assert len(prompts) == images.shape[0]
        self.shapes.append(tuple(images.shape))
        return images.float().mean(dim=(1, 2, 3)).unsqueeze(1).cpu()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux_engine"))


def test_engine_trains_tiny_flux_through_loaders(tiny, tmp_path):
    trainer_mod = pytest.importorskip("treerpo.core.trainer")
    from treerpo.core.presets import make_config

    files = tiny.single_files()  # BFL transformer, ComfyUI text encoders, ae file
    stack = load_flux(files, lora=LoraSettings(rank=4, alpha=4), cache_dir=tmp_path / "emb", max_sequence_length=16)
    policy = stack.policy
    reward = MeanBrightness()
    cfg = make_config("dynamic-treerpo", num_steps=6, seed=0, lr=1e-2, window_every=1)
    trainer = trainer_mod.Trainer(policy, cfg, rewards=reward, encode=stack.encode, decode=stack.decode,
                                  latent_shape=(16, 4, 4))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    hist = [trainer.step(PROMPTS) for _ in range(3)]

    assert all(math.isfinite(h["loss"]) for h in hist)
    assert hist[0]["ratio_first_update"] == 1.0
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all("lora_" in n for n in changed), [n for n in changed if "lora_" not in n]
    assert reward.shapes and all(s[1:] == (3, 32, 32) for s in reward.shapes)  # decoded by the tiny VAE
    assert stack.encode.encoder_loads == 1 and stack.encode.misses == len(PROMPTS)

    # the trained LoRA, saved with the run's metadata, reproduces the policy on the other route
    path = save_lora(tmp_path / "lora.safetensors", policy, preset=cfg.preset, settings=cfg.to_dict(),
                     iteration=trainer.iteration, reward_stats={"brightness": hist[-1].get("reward_mean", 0.0)})
    meta = read_lora_metadata(path)
    assert meta["iteration"] == 3 and meta["preset"] == "dynamic-treerpo" and meta["settings"]["num_steps"] == 6
    again = load_flux_policy(tiny.diffusers_files(), lora=lora_settings_from_file(path))
    load_lora(path, again)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=g)
    cond = {k: torch.cat([c[k] for c in stack.encode(PROMPTS)]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
    with torch.no_grad():
        torch.testing.assert_close(again(x, torch.tensor([0.9, 0.4]), cond), policy(x, torch.tensor([0.9, 0.4]), cond),
                                   rtol=0, atol=1e-6)
