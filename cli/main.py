"""`treerpo`: the command line of Dynamic-TreeRPO.

    treerpo presets                      list presets and their settings
    treerpo demo                         train the bundled tiny FLUX on a weight-free reward (CPU, minutes)
    treerpo train --model PATH ...       train a LoRA on a FLUX model from local files
    treerpo bench nfe                    model evaluations per preset, paper setting (T=25)
    treerpo bench speed                  seconds per iteration of every preset, side by side
    treerpo run WORKFLOW.json            run a saved ComfyUI workflow headless (docs/cli.md)
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import sys
from pathlib import Path


def _parse_set(items: list[str]) -> dict:
    """--set key=value overrides; values are Python literals where they parse."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        try:
            out[key.strip()] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            out[key.strip()] = val
    return out


def _config(args, **defaults):
    from ..core.presets import make_config

    overrides = {**defaults, **_parse_set(args.set)}
    for name in ("num_steps", "lr", "seed"):
        val = getattr(args, name, None)
        if val is not None:
            overrides[name] = val
    try:
        return make_config(args.preset, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def cmd_presets(args) -> int:
    from ..core.presets import PRESETS, make_config

    for name in PRESETS:
        c = make_config(name)
        print(f"{name:16s} branching={list(c.branching)[:6]}{'...' if c.depth > 6 else ''} depth={c.depth} "
              f"share_prefix={c.share_prefix} noise={c.noise_level}({c.noise_schedule}) beta={c.beta} "
              f"clip={c.clip_mode}{'' if c.clip_mode == 'dynamic' else ' ' + str(c.clip_eps)} sft={c.sft_lambda} "
              f"compress={c.compress_ratio} lr={c.lr}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    if args.what == "nfe":
        return bench.bench_nfe(args)
    return bench.bench_speed(args)


def cmd_demo(args) -> int:
    from . import demo

    return demo.run_demo(args)


def cmd_train(args) -> int:
    from . import train

    return train.run_train(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="treerpo", description="Dynamic-TreeRPO: tree-structured GRPO for FLUX")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the presets").set_defaults(func=cmd_presets)

    def common(sp, preset="dynamic-treerpo"):
        sp.add_argument("--preset", default=preset, help="dynamic-treerpo, tree, tree-clip, mixgrpo, mixgrpo-flash, dancegrpo")
        sp.add_argument("--num-steps", dest="num_steps", type=int, default=None, help="denoising steps T")
        sp.add_argument("--lr", type=float, default=None)
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any TrainConfig setting")

    d = sub.add_parser("demo", help="train the bundled tiny FLUX model on the CPU (the default job)")
    common(d)
    d.add_argument("--iterations", type=int, default=30)
    d.add_argument("--out", default="runs/demo", help="run folder (checkpoints, LoRA, metrics)")
    d.add_argument("--reward", default="saturation",
                   help="weight-free reward: saturation, brightness, colourfulness, jpeg_compressibility, jpeg_incompressibility")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a LoRA on a FLUX model from local files")
    common(t)
    t.add_argument("--model", required=True, help="diffusers FLUX folder, or a BFL/ComfyUI transformer .safetensors")
    t.add_argument("--clip-l", dest="clip_l", help="clip_l.safetensors (single-file route)")
    t.add_argument("--t5", help="t5xxl .safetensors (single-file route)")
    t.add_argument("--vae", help="ae.safetensors (single-file route)")
    t.add_argument("--prompts", required=True, help="text file, one prompt per line")
    t.add_argument("--rewards", default="hps", help="comma list name[:weight], e.g. hps:1,pickscore:1,imagereward:1")
    t.add_argument("--reward-models-dir", dest="reward_models_dir", help="folder holding treerpo_rewards/")
    t.add_argument("--resolution", type=int, default=512)
    t.add_argument("--max-sequence-length", dest="max_sequence_length", type=int, default=None,
                   help="T5 tokens per prompt (default 512 for dev, 256 for schnell)")
    t.add_argument("--iterations", type=int, default=100)
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--rank", type=int, default=32, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default = rank)")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=int, default=10)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="benchmarks: NFE table, seconds per iteration side by side")
    b.add_argument("what", choices=["nfe", "speed"])
    b.add_argument("--num-steps", dest="num_steps", type=int, default=None, help="T (nfe: 25; speed: 10)")
    b.add_argument("--iterations", type=int, default=100, help="nfe: iterations of the run to average the window over")
    b.add_argument("--presets", default="dynamic-treerpo,mixgrpo,mixgrpo-flash,dancegrpo")
    b.add_argument("--model", default="tiny", help="speed: 'tiny' (built in code) or a FLUX folder")
    b.add_argument("--resolution", type=int, default=64, help="speed: image size (latent = size/8)")
    b.add_argument("--repeats", type=int, default=2, help="speed: timed iterations per preset (after one warm-up)")
    b.add_argument("--window-start", dest="window_start", type=int, default=None,
                   help="speed: window position used by every windowed preset (default: the middle, (T-4)//2)")
    b.add_argument("--json", help="also write the results here")
    b.set_defaults(func=cmd_bench)

    from .run import add_parser as add_run_parser

    add_run_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return int(args.func(args) or 0)


def write_json(path, data) -> None:
    from ..core.checkpoint import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))


if __name__ == "__main__":
    sys.exit(main())
