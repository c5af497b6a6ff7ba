"""`treerpo train`: train a LoRA on a FLUX model from local files (one process, or one per
GPU under `accelerate launch`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import latent_shape, load_stack


def read_prompts(path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: prompt file {p} does not exist (expected a text file, one prompt per line)")
    prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise SystemExit(f"error: prompt file {p} holds no prompts")
    return prompts


def run_train(args) -> int:
    from accelerate import Accelerator

    from ..core.checkpoint import atomic_write_text
    from ..core.models import save_lora
    from ..core.rewards import load_rewards
    from ..core.trainer import Trainer
    from .options import config_from_args

    prompts = read_prompts(args.prompts)
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    if (ckpt_dir / "latest").exists() and not args.resume:
        raise SystemExit(f"error: {out} already holds a run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_from_args(args, mixed_precision="bf16" if torch.cuda.is_available() else "no")
    # one process per GPU under torchrun: every model goes to this process's device
    # cpu=True on a machine without CUDA: accelerate otherwise ignores torchrun's WORLD_SIZE there
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    world = {"world_size": acc.num_processes,
             "global_prompts_per_iteration": cfg.prompts_per_iteration * acc.num_processes}
    if acc.is_main_process:
        print(f"treerpo train: {world['world_size']} process(es) on {acc.device.type}, "
              f"{world['global_prompts_per_iteration']} prompt(s) per iteration in all", flush=True)
    rewards = load_rewards(args.rewards, models_dir=args.reward_models_dir, device=acc.device)
    stack = load_stack(args.model, rank=args.rank, alpha=args.alpha, cache_dir=out / "embeddings", on=acc.device,
                       gradient_checkpointing=args.gradient_checkpointing, max_sequence_length=args.max_sequence_length,
                       clip_l=args.clip_l, t5xxl=args.t5, vae=args.vae)
    shape = latent_shape(stack, args.resolution)
    trainer = Trainer(stack.policy, cfg, rewards, encode=stack.encode, decode=stack.decode, latent_shape=shape,
                      accelerator=acc)
    if args.resume:
        trainer.load_checkpoint(ckpt_dir)
    log_path = out / "metrics.jsonl"

    def log_metrics(m):
        if trainer.accelerator.is_main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(m) + "\n")

    iterations = args.iterations or cfg.iterations  # default: the preset's run length
    trainer.train(prompts, iterations, checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every,
                  callback=log_metrics)
    if trainer.accelerator.is_main_process:
        last = trainer.history[-1] if trainer.history else {}
        meta = dict(preset=cfg.preset, settings=cfg.to_dict(), iteration=trainer.iteration,
                    reward_stats={k: v for k, v in last.items() if k.startswith("reward")})
        paths = [save_lora(out / "lora.safetensors", stack.policy, **meta)]
        if trainer.ema is not None:  # the EMA weights, beside the trained ones (ema_decay > 0)
            with trainer.ema_applied():
                paths.append(save_lora(out / "lora_ema.safetensors", stack.policy, **meta))
        atomic_write_text(out / "config.json", json.dumps({**cfg.to_dict(), **world}, indent=1))
        print(f"wrote {', '.join(str(p) for p in paths)}")
    return 0
