"""`treerpo demo`: the default job. Builds the bundled tiny FLUX pipeline, trains a LoRA on
it with Dynamic-TreeRPO against a weight-free reward on the CPU, and shows the reward
rising, the same way a real run on FLUX.1-dev does (only the model is tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import load_stack

DEMO_PROMPTS = ["a red cube", "a blue ball", "a photo of a cat", "a green tree on a mountain"]


@torch.no_grad()
def sample_images(stack, sigmas, prompts, latent_shape, seed=1234):
    """Deterministic ODE samples (fixed noise) of the current policy, decoded."""
    from ..core.sde import ode_step

    g = torch.Generator().manual_seed(seed)
    out = []
    for cond in stack.encode(prompts):
        x = torch.randn((1, *latent_shape), generator=g).to(stack.policy.device)
        cond = {k: v.to(stack.policy.device) for k, v in cond.items()}
        for i in range(len(sigmas) - 1):
            v = stack.policy(x, torch.full((1,), float(sigmas[i]), device=x.device), cond)
            x = ode_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        out.append(stack.decode(x).float().cpu())
    return torch.cat(out)


def save_grid(before, after, path: Path):
    from PIL import Image

    rows = [torch.cat(list(t), dim=2) for t in (before, after)]  # [3, H, W*n] each
    grid = torch.cat(rows, dim=1).clamp(0, 1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    img = Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4), Image.NEAREST)
    img.save(path)


def run_demo(args) -> int:
    from ..core.checkpoint import atomic_write_text
    from ..core.models import save_lora
    from ..core.rewards import load_rewards
    from ..core.trainer import Trainer
    from .options import config_from_args

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stack = load_stack("tiny", rank=8, cache_dir=out / "embeddings")
    shape = (stack.latent_channels, 16, 16)  # 128 px images
    rewards = load_rewards(args.reward)
    # every demo prompt in every iteration: a steadier gradient than one prompt at a time
    cfg = config_from_args(args, num_steps=args.num_steps or 12, lr=args.lr or 3e-2,
                  prompts_per_iteration=len(DEMO_PROMPTS), deterministic=True)
    trainer = Trainer(stack.policy, cfg, rewards, encode=stack.encode, decode=stack.decode, latent_shape=shape)
    ckpt_dir = out / "checkpoints"
    if (ckpt_dir / "latest").is_file():
        trainer.load_checkpoint(ckpt_dir)
        print(f"resuming {ckpt_dir} at iteration {trainer.iteration}")
    name = rewards.names[0]
    with stack.policy.reference():
        base = sample_images(stack, trainer.sigmas, DEMO_PROMPTS, shape)
    # a new run starts at the base model (LoRA B = 0); a resumed one somewhere else
    before = sample_images(stack, trainer.sigmas, DEMO_PROMPTS, shape) if trainer.iteration else base
    print(f"Dynamic-TreeRPO demo: preset {cfg.preset}, tiny FLUX, reward '{args.reward}', T={cfg.num_steps}, "
          f"tree {list(cfg.branching)} ({trainer.nfe()['rollout_per_sample']:.1f} NFE/sample at tau=0)")
    trainer.train(DEMO_PROMPTS, args.iterations, checkpoint_dir=ckpt_dir, checkpoint_every=10)
    after = sample_images(stack, trainer.sigmas, DEMO_PROMPTS, shape)

    hist = trainer.history
    lora = save_lora(out / "lora.safetensors", stack.policy, preset=cfg.preset, settings=cfg.to_dict(),
                     iteration=trainer.iteration, reward_stats={k: v for k, v in hist[-1].items() if k.startswith("reward")})
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in hist))
    save_grid(base, after, out / "samples.png")
    k = max(1, min(5, len(hist) // 2))
    blocks = [hist[i : i + k] for i in range(0, len(hist), k)]
    curve = " ".join(f"{sum(h['reward_mean'] for h in b) / len(b):.4f}" for b in blocks)
    print(f"training reward ({name}), mean of every {k} iterations: {curve}")
    r_base, r_before, r_after = (rewards(x, DEMO_PROMPTS)[:, 0] for x in (base, before, after))
    print(f"fixed-noise samples ({name}): base model {r_base.mean():.4f}, start of this run {r_before.mean():.4f}, "
          f"after {trainer.iteration} iterations {r_after.mean():.4f} "
          f"({(r_after.mean() - r_base.mean()) / max(float(r_base.std()), 1e-12):+.1f} x the spread of the base samples)")
    print(f"ratio on the first update of the last iteration: {hist[-1]['ratio_first_update']:.6f}")
    print(f"wrote {lora}, {out / 'metrics.jsonl'}, {out / 'samples.png'} (top: base model, bottom: trained), "
          f"checkpoints in {ckpt_dir}")
    return 0
