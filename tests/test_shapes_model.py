"""The bundled tiny-shapes model: the shipped weights load through every route users take on FLUX
(diffusers folder, ComfyUI/BFL single files, diffusers' own FluxPipeline), and the pretraining
script is reproducible."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from treerpo.core.evaluate import sample_fixed_noise
from treerpo.core.models import load_flux
from treerpo.core.models.export import export_single_files
from treerpo.core.models.files import flux_files_from_single_files
from treerpo.core.shapes import model as M
from treerpo.core.shapes import parse_prompt, scene_prompts

ROOT = Path(__file__).resolve().parents[1]
FIDELITY_MARGIN = 0.15  # measured (16 prompts x 3 seeds): pretrained 0.255, random weights 0.039
PROMPT = "two red circles on the left and a blue square at the bottom right"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    return load_flux(M.pretrained_dir(), cache_dir=tmp_path_factory.mktemp("emb"))


def test_shipped_files_are_small_and_complete():
    d = M.pretrained_dir()
    size = sum(p.stat().st_size for p in d.rglob("*") if p.is_file())
    assert size <= 25e6, f"{size / 1e6:.1f} MB"
    info = json.loads((d / "pretrain.json").read_text())
    for rel, digest in info["files"].items():  # the weights are the ones the recorded run wrote
        import hashlib

        assert hashlib.sha256((d / rel).read_bytes()).hexdigest() == digest, rel
    index = json.loads((d / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"][1] == "FluxTransformer2DModel"


def test_loads_through_the_normal_loaders(stack):
    assert stack.files.route == "diffusers" and stack.files.variant == "custom"
    assert stack.files.max_sequence_length == M.MAX_TOKENS  # from the tokenizer, not FLUX.1-dev's 512
    assert stack.vae_scale_factor == 4 and stack.latent_shape(64) == (16, 16, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        stack.latent_shape(60)
    cond = stack.encode([PROMPT])[0]
    assert cond["prompt_embeds"].shape == (1, M.MAX_TOKENS, 64) and cond["pooled_prompt_embeds"].shape == (1, 64)
    # the words of the world are whole T5 tokens: the caption is read as words
    ids = M.t5_tokenizer()(PROMPT).input_ids
    assert len(ids) == len(PROMPT.split()) + 1


def test_fluxpipeline_generates_what_the_engine_samples(stack):
    """diffusers' FluxPipeline (its text encoding, scheduler, packing, VAE scaling) and our
    policy + ODE + decoder give the same image from the same noise."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(M.pretrained_dir()), local_files_only=True)
    noise = torch.randn((1, 16, 16, 16), generator=torch.Generator().manual_seed(7))
    img = pipe(prompt=PROMPT, latents=pipe._pack_latents(noise, 1, 16, 16, 16), height=64, width=64,
               num_inference_steps=6, guidance_scale=3.5, max_sequence_length=M.MAX_TOKENS, output_type="pt").images
    sigmas = torch.tensor(pipe.scheduler.sigmas.tolist())
    ours = sample_fixed_noise(stack.policy, stack.encode, stack.decode, sigmas, [PROMPT], [7], (16, 16, 16))[0]
    assert img.shape == ours.shape == (1, 3, 64, 64)
    torch.testing.assert_close(ours, img.float(), rtol=0, atol=2e-3)


def test_single_file_layout_matches_the_diffusers_folder(stack, tmp_path):
    paths = export_single_files(M.pretrained_dir(), tmp_path / "models", "tiny-shapes")
    files = flux_files_from_single_files(paths["transformer"], clip_l=paths["clip_l"], t5xxl=paths["t5xxl"],
                                         vae=paths["vae"], tokenizers=M.pretrained_dir())
    single = load_flux(files, cache_dir=tmp_path / "emb")
    assert single.files.route == "single_file" and single.files.max_sequence_length == M.MAX_TOKENS
    x = torch.randn((2, 16, 16, 16), generator=torch.Generator().manual_seed(0))
    c1, c2 = stack.encode([PROMPT])[0], single.encode([PROMPT])[0]
    torch.testing.assert_close(c1["prompt_embeds"], c2["prompt_embeds"])
    sig = torch.tensor([0.8, 0.3])
    with torch.no_grad():
        v1 = stack.policy(x, sig, {k: v.expand(2, *v.shape[1:]) for k, v in c1.items()})
        v2 = single.policy(x, sig, {k: v.expand(2, *v.shape[1:]) for k, v in c2.items()})
    torch.testing.assert_close(v1, v2, rtol=0, atol=1e-5)
    torch.testing.assert_close(stack.decode(x), single.decode(x), rtol=0, atol=1e-6)


def test_held_out_prompts_are_in_the_world():
    for p in scene_prompts(40, seed=123):
        assert parse_prompt(p)


MICRO = ["--data", "64", "--vae-steps", "2", "--vae-batch", "4", "--steps", "4", "--stop-after", "2", "--steps2", "2",
         "--decoder-steps", "2", "--batch", "4", "--threads", "1"]


def _pretrain(out: Path, *more) -> dict:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "pretrain_shapes.py"), "--out", str(out), *MICRO, *more],
                   check=True, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    return json.loads((out / "pretrain.json").read_text())


@pytest.mark.slow
def test_pretraining_is_reproducible_bit_for_bit(tmp_path):
    a = _pretrain(tmp_path / "a", "--snapshot-every", "2")
    b = _pretrain(tmp_path / "b")
    assert a["files"] == b["files"]  # every weight file hashes the same
    assert a["flow_loss"] == b["flow_loss"]
    # resuming at phase 2 or at the decoder stage from the saved output of the stage before (how the
    # shipped weights were made) gives the same weights
    for stage in ("phase2", "decoder"):
        prev = "a.phase1" if stage == "phase2" else "a.phase2"
        c = _pretrain(tmp_path / stage, "--init", str(tmp_path / prev), "--init-stage", stage)
        assert c["files"] == a["files"], stage
    d = load_flux(tmp_path / "a", cache_dir=tmp_path / "emb")  # and it is a loadable pipeline
    assert d.latent_shape(64) == (16, 16, 16)


def _fidelity(stack, prompts, seeds) -> float:
    import contextlib

    from treerpo.core.evaluate import evaluate
    from treerpo.core.presets import make_config
    from treerpo.core.rewards import load_rewards
    from treerpo.core.schedule import schedule

    sigmas, _ = schedule(make_config("dynamic-treerpo", num_steps=16), (16, 16, 16))
    ev = evaluate(stack.policy, stack.encode, stack.decode, load_rewards("shapes"), prompts, seeds, (16, 16, 16),
                  sigmas, {"model": contextlib.nullcontext})
    return ev.mean("model")


def test_pretrained_model_follows_prompts_but_leaves_room_to_learn(stack, tmp_path):
    """Held-out prompts (not the demo's), fixed seeds: the shipped weights score well above the same
    architecture with random weights, and well below a perfect score."""
    prompts, seeds = scene_prompts(16, seed=4242), [0, 1, 2]
    trained = _fidelity(stack, prompts, seeds)
    M.save_pipeline(tmp_path / "random", *M.build_modules(seed=0))
    random_weights = _fidelity(load_flux(tmp_path / "random", cache_dir=tmp_path / "emb"), prompts, seeds)
    print(f"shapes reward, 16 held-out prompts x 3 seeds: pretrained {trained:.3f}, "
          f"random weights {random_weights:.3f}")
    assert trained > random_weights + FIDELITY_MARGIN and trained < 0.9


@pytest.mark.slow
def test_lora_check_in_diffusers_runs_and_an_untrained_lora_gains_nothing(tmp_path):
    """scripts/check_lora_in_diffusers.py (the demo's FluxPipeline check): an untrained LoRA (B = 0)
    gives the base model's images, so exactly no gain; a perturbed one changes the scores."""
    from treerpo.core.models import LoraSettings, save_lora

    policy = load_flux(M.pretrained_dir(), lora=LoraSettings(rank=4, alpha=4), cache_dir=tmp_path / "emb").policy
    zero = save_lora(tmp_path / "zero.safetensors", policy)
    script = ROOT / "scripts" / "check_lora_in_diffusers.py"
    args = [sys.executable, str(script), "--prompts", "3", "--seeds", "1", "--steps", "4", "--set", "validation"]
    out = subprocess.run([*args, str(zero)], check=True, capture_output=True, text=True).stdout
    assert ("shapes-crisp-asked in diffusers FluxPipeline, 4 steps, shapes validation set, 3 prompts x 1 seeds" in out
            and "lora - base +0.0000 [+0.0000, +0.0000]" in out), out
    # the demo's reward with both prompt-fidelity rewards scored beside it, each with its own gain
    zeros = ", ".join(f"{n} +0.0000 [+0.0000, +0.0000]" for n in ("shapes-crisp-asked", "shapes-layout", "shapes"))
    assert f"each reward's own gain: {zeros}" in out, out
    with torch.no_grad():
        for p in policy.lora_parameters().values():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    moved = save_lora(tmp_path / "moved.safetensors", policy)
    out = subprocess.run([*args, str(moved)], check=True, capture_output=True, text=True).stdout
    assert "lora - base +0.0000 [+0.0000, +0.0000]" not in out, out
    missing = subprocess.run([*args, str(tmp_path / "none.safetensors")], capture_output=True, text=True)
    assert missing.returncode != 0 and "not found" in missing.stderr
