"""`treerpo train`: train a LoRA on a FLUX model from local files (one process, or one per
GPU under `accelerate launch`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .models import check_model, check_resolution, latent_shape, load_stack
from .errors import BadInput, make_dir, output_dir, read_text
from .options import config_from_args


def read_prompts(path) -> list[str]:
    text = read_text(path, "prompt file (a text file, one prompt per line)", "--prompts")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise BadInput(f"--prompts {path}: the prompt file holds only blank lines")
    return prompts


def _busy(out: Path, e) -> BadInput:
    return BadInput(f"--out {out}: in use by another training ({e.holder}); wait for it to finish or choose "
                    "another --out")


def _lock(out: Path):
    """The run folder's lock (core/run_lock.py), held for the whole training."""
    from ..core.run_lock import RunBusy, RunLock

    try:
        return RunLock(out).acquire()
    except RunBusy as e:
        raise _busy(out, e) from None


def check_args(args):
    """Every check of `treerpo train` that reads no weights, before anything is written: returns
    (config, prompts) or raises BadInput naming the option, file or value at fault."""
    from ..core.checkpoint import resolve_checkpoint
    from ..core.rewards.registry import check_rewards
    from ..core.run_lock import RunBusy, check_free

    cfg = config_from_args(args, mixed_precision="bf16" if torch.cuda.is_available() else "no")
    prompts = read_prompts(args.prompts)
    try:
        check_rewards(args.rewards, args.reward_models_dir)
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(f"--rewards {args.rewards}: {e}") from None
    scale = check_model(args.model, complete=True, clip_l=args.clip_l, t5xxl=args.t5, vae=args.vae)
    check_resolution(args.resolution, scale)
    out = output_dir(args.out, "--out")
    if out.is_dir():
        try:
            check_free(out)
        except RunBusy as e:
            raise _busy(out, e) from None
        ckpt_dir = out / "checkpoints"
        if (ckpt_dir / "latest").exists() and not args.resume:
            raise BadInput(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")
    if args.resume:
        try:
            resolve_checkpoint(out / "checkpoints")
        except FileNotFoundError as e:
            raise BadInput(f"--resume: {e}") from None
    return cfg, prompts


def run_train(args) -> int:
    cfg, prompts = check_args(args)
    out = make_dir(args.out, "--out")
    lock = _lock(out)
    try:
        return _train(args, cfg, prompts, out)
    finally:
        lock.release()


def _train(args, cfg, prompts: list[str], out: Path) -> int:
    from accelerate import Accelerator

    from ..core.checkpoint import atomic_write_text
    from ..core.models import save_lora
    from ..core.rewards import load_rewards
    from ..core.trainer import Trainer

    ckpt_dir = out / "checkpoints"
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

    trainer.train(prompts, cfg.iterations, checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every,
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
    # every rank leaves together, after rank 0's writes, with its process group shut down: a rank
    # exiting while the group's threads still run can abort ("terminate called without an active exception")
    acc.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0
