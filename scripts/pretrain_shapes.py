"""Pretrain the bundled tiny-shapes model (core/shapes/model.py) on the shapes world, on a CPU.

    python scripts/pretrain_shapes.py        # the shipped run: about 40 minutes on 2 cores
    python scripts/pretrain_shapes.py --out /tmp/t --data 256 --vae-steps 5 --steps 10 --stop-after 5 --steps2 5

Stages, all seeded: (1) render the captioned dataset; (2) train the autoencoder on the images,
then set its shift/scale from the latents' mean/std (as FLUX's VAE config does); (3) phase 1:
train the transformer and both text encoders together with the rectified-flow loss (logit-normal
sigma, velocity target noise - x0) through the same FluxPolicy the trainer uses; (4) phase 2:
from phase 1's EMA weights with a fresh optimizer, sigma shifted towards high noise (where the
layout, i.e. count and position, is decided); (5) more training for the decoder alone (the
encoder and so the latent space stay fixed), colour-weighted. The transformer's and text
encoders' EMA weights are what is saved.

With --deterministic (default), the same thread count and torch version the result is bit-for-bit
the same; `--init <folder> --init-stage phase2|decoder` (the folders <out>.phase1 / <out>.phase2
that --snapshot-every writes) resumes there with the same result as one full run
(tests/test_shapes_model.py checks this). The
written pretrain.json records the settings, the losses, the time and a hash of every file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

from treerpo.core.models.flux_policy import FluxPolicy
from treerpo.core.shapes import model as M
from treerpo.core.shapes.world import prompt_of, render, sample_scene


def _example(i_seed):
    i, seed = i_seed
    scene = sample_scene(random.Random(seed * 1_000_003 + i))
    return prompt_of(scene), (render(scene, M.IMAGE_SIZE, seed=seed * 1_000_003 + i) * 255).round().astype(np.uint8)


def make_dataset(n: int, seed: int, workers: int):
    """(prompts, uint8 images [n, H, W, 3]); example i depends only on (seed, i)."""
    with Pool(workers) as pool:
        out = pool.map(_example, [(i, seed) for i in range(n)], chunksize=256)
    return [p for p, _ in out], np.stack([im for _, im in out])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def lr_at(lr: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of `lr` over `steps`."""
    return lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def train_vae(vae, images: np.ndarray, steps: int, batch: int, lr: float, gen: torch.Generator):
    """Reconstruction (MSE) + a light KL term, Adam; returns the loss history."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    hist = []
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = (rec - x).pow(2).mean()
        kl = 0.5 * (post.mean.pow(2) + post.var - 1 - post.logvar).mean()
        loss = mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(lr, step, steps, warmup=50)
        opt.step()
        hist.append(float(mse.detach()))
        if step % 50 == 0 or step == steps - 1:
            log(f"autoencoder {step + 1}/{steps}: mse {np.mean(hist[-50:]):.5f}")
    return vae.eval().requires_grad_(False), hist


def refine_decoder(vae, raw: torch.Tensor, images: np.ndarray, steps: int, batch: int, lr: float,
                   gen: torch.Generator, latent_noise: float = 0.1):
    """More training for the decoder alone, from the frozen encoder's latent means (the latent
    space the transformer learned stays exactly the same): colour-weighted MSE, the coloured
    object pixels weighted 5x (telling blue from purple and squares from circles is what the
    shapes reward needs), and latents jittered by `latent_noise` std as generated ones are."""
    dec = [vae.decoder, *([vae.post_quant_conv] if vae.post_quant_conv is not None else [])]
    params = [p for m in dec for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.decoder.train()
    std = float(raw.std())
    hist = []
    for step in range(steps):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x = to_tensor(images[idx.numpy()])
        z = raw[idx] + latent_noise * std * torch.randn(raw[idx].shape, generator=gen)
        rec = vae.decode(z).sample
        rgb = (x + 1) / 2
        sat = (rgb.amax(1) - rgb.amin(1)) / rgb.amax(1).clamp_min(1e-3)
        weight = 1 + 4 * (sat > 0.35).float().unsqueeze(1)
        loss = (weight * (rec - x).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = lr_at(lr, step, steps, warmup=50)
        opt.step()
        hist.append(float((rec - x).pow(2).mean().detach()))
        if step % 50 == 0 or step == steps - 1:
            log(f"decoder {step + 1}/{steps}: mse {np.mean(hist[-50:]):.5f}")
    vae.eval().requires_grad_(False)
    return hist


@torch.no_grad()
def encode_all(vae, images: np.ndarray, batch: int = 256) -> torch.Tensor:
    return torch.cat([vae.encode(to_tensor(images[i : i + batch])).latent_dist.mean
                      for i in range(0, len(images), batch)])


def tokenize(prompts):
    clip_tok, t5_tok = M.clip_tokenizer(), M.t5_tokenizer()
    kw = dict(padding="max_length", max_length=M.MAX_TOKENS, truncation=True, return_tensors="pt")
    return clip_tok(prompts, **kw).input_ids, t5_tok(prompts, **kw).input_ids


def train_flow(transformer, clip, t5, latents, clip_ids, t5_ids, steps, batch, lr, ema_decay, gen, snapshot=None,
               sigma_shift: float = 1.0, stop: int | None = None):
    """Rectified flow on the normalised latents, text encoders trained jointly; returns EMA copies
    (they start at the given weights). The schedule spans `steps`; `stop` ends early. sigma is
    logit-normal, then time-shifted by `sigma_shift` (> 1: more high-noise steps, where the
    layout of the image is decided)."""
    import copy

    policy = FluxPolicy(transformer, lora=None, dtype=None)
    modules = [transformer, clip, t5]
    for m in modules:
        m.train().requires_grad_(True)
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [copy.deepcopy(m).eval().requires_grad_(False) for m in modules]
    hist = []
    for step in range(steps if stop is None else min(stop, steps)):
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))  # logit-normal, as SD3 / FLUX training
        sigma = sigma_shift * sigma / (1 + (sigma_shift - 1) * sigma)
        xt = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * noise
        cond = {"prompt_embeds": t5(t5_ids[idx])[0], "pooled_prompt_embeds": clip(clip_ids[idx]).pooler_output}
        loss = (policy(xt, sigma, cond) - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = lr_at(lr, step, steps, warmup=100)
        opt.step()
        d = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, m in zip(ema, modules):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - d)
        hist.append(float(loss.detach()))
        if step % 50 == 0 or step == steps - 1:
            log(f"flow {step + 1}/{steps}{f' (stop at {stop})' if stop else ''}: loss {np.mean(hist[-50:]):.4f}")
        if snapshot and (step + 1) % snapshot[0] == 0:
            snapshot[1](ema)  # look at a long run before it ends
    return ema, hist


def load_modules(folder):
    """(transformer, clip, t5, vae) of a saved pipeline, in training precision (fp32)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    f = Path(folder)
    return (FluxTransformer2DModel.from_pretrained(f / "transformer"),
            CLIPTextModel.from_pretrained(f / "text_encoder"),
            T5EncoderModel.from_pretrained(f / "text_encoder_2"), AutoencoderKL.from_pretrained(f / "vae").eval())


def file_hashes(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "pretrain.json"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(M.PRETRAINED_DIR), help="folder to write (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", type=int, default=20000, help="captioned images rendered")
    ap.add_argument("--vae-steps", type=int, default=500)
    ap.add_argument("--vae-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2000, help="phase 1: transformer steps of its learning-rate schedule")
    ap.add_argument("--stop-after", type=int, default=1000, help="phase 1 ends after this many of them")
    ap.add_argument("--steps2", type=int, default=1100, help="phase 2: steps from phase 1's EMA weights, new optimizer")
    ap.add_argument("--sigma-shift2", type=float, default=3.0, help="phase 2 time shift of sigma (more high noise)")
    ap.add_argument("--decoder-steps", type=int, default=800, help="last: decoder-only refinement steps")
    ap.add_argument("--init", help="start from this saved pipeline, skipping the stages before --init-stage "
                                   "(their output; gives the same result as one full run)")
    ap.add_argument("--init-stage", choices=["phase2", "decoder"], default="phase2")
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--snapshot-every", type=int, default=0,
                    help="also write <out>.partial every N transformer steps, and <out>.phase1")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (results depend on it)")
    ap.add_argument("--no-deterministic", dest="deterministic", action="store_false")
    a = ap.parse_args(argv)

    t0 = time.time()
    torch.set_num_threads(a.threads)
    if a.deterministic:
        torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(a.seed)
    log(f"rendering {a.data} captioned {M.IMAGE_SIZE}px scenes")
    prompts, images = make_dataset(a.data, a.seed, max(1, a.threads))
    transformer, clip, t5, vae = M.build_modules(a.seed)
    out = Path(a.out)

    def snapshot(name):
        return lambda ema: M.save_pipeline(out.with_name(f"{out.name}.{name}"), *ema, vae)

    if a.init:
        transformer, clip, t5, vae = load_modules(a.init)
        vae_hist, flow_hist = [], []
    else:
        log(f"training the autoencoder ({sum(p.numel() for p in vae.parameters()) / 1e6:.2f} M parameters)")
        vae, vae_hist = train_vae(vae, images, a.vae_steps, a.vae_batch, 2e-3, gen)
    raw = encode_all(vae, images)
    if not a.init:
        vae.register_to_config(shift_factor=round(float(raw.mean()), 4), scaling_factor=round(float(1 / raw.std()), 4))
    latents = (raw - vae.config.shift_factor) * vae.config.scaling_factor  # what the pipeline's latents are
    log(f"latents {tuple(raw.shape[1:])}: shift {vae.config.shift_factor}, scale {vae.config.scaling_factor}")
    clip_ids, t5_ids = tokenize(prompts)
    n_params = sum(p.numel() for m in (transformer, clip, t5) for p in m.parameters())
    if a.init:
        log(f"resuming at {a.init_stage} from {a.init}")
    else:
        log(f"phase 1: the transformer and text encoders ({n_params / 1e6:.2f} M parameters)")
        snap = (a.snapshot_every, snapshot("partial")) if a.snapshot_every else None
        (transformer, clip, t5), flow_hist = train_flow(transformer, clip, t5, latents, clip_ids, t5_ids, a.steps,
                                                        a.batch, a.lr, a.ema, gen, snap, stop=a.stop_after)
        if a.snapshot_every:
            snapshot("phase1")((transformer, clip, t5))
    if a.init_stage == "phase2":
        log(f"phase 2: {a.steps2} steps with sigma shift {a.sigma_shift2}")
        # phase 2's draws (its batches, noise, T5's dropout) do not depend on how phase 1 ran
        gen2 = torch.Generator().manual_seed(a.seed + 1)
        torch.manual_seed(a.seed + 1)
        snap = (a.snapshot_every, snapshot("partial")) if a.snapshot_every else None
        (transformer, clip, t5), flow_hist2 = train_flow(transformer, clip, t5, latents, clip_ids, t5_ids, a.steps2,
                                                         a.batch, a.lr, a.ema, gen2, snap, sigma_shift=a.sigma_shift2)
        flow_hist = flow_hist + flow_hist2
        if a.snapshot_every:
            snapshot("phase2")((transformer, clip, t5))
    log(f"refining the decoder: {a.decoder_steps} steps")
    dec_hist = refine_decoder(vae, raw, images, a.decoder_steps, a.vae_batch, 1e-3,
                              torch.Generator().manual_seed(a.seed + 2))

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    M.save_pipeline(tmp, transformer, clip, t5, vae)
    info = {
        "settings": vars(a), "torch": torch.__version__, "seconds": round(time.time() - t0, 1),
        "vae_mse_last100": float(np.mean(vae_hist[-100:])) if vae_hist else None,
        "flow_loss_last100": float(np.mean(flow_hist[-100:])) if flow_hist else None,
        "decoder_mse_last100": float(np.mean(dec_hist[-100:])) if dec_hist else None,
        "vae_mse": vae_hist[::10], "flow_loss": flow_hist[::10], "decoder_mse": dec_hist[::10],
        "files": file_hashes(tmp),
    }
    info["settings"]["out"] = out.name
    (tmp / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB) in {info['seconds'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
