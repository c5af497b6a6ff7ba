"""`treerpo`: the command line of Dynamic-TreeRPO.

    treerpo presets                      list presets and their settings
    treerpo demo                         RL on the bundled tiny-shapes model via workflows/tiny-demo.json (CPU)
    treerpo train --model PATH ...       train a LoRA on a FLUX model from local files
    treerpo bench nfe                    model evaluations per preset, paper setting (T=25)
    treerpo bench speed                  seconds per iteration of every preset, side by side
    treerpo bench ratio                  bf16 drift of the mean importance ratio per step (ratio_norm)
    treerpo bench gpu                    the prepared GPU run (bench/gpu.sh): bf16 checks, speed, memory, MFU
    treerpo bench learn                  reward against iterations, NFE and seconds, presets side by side
    treerpo bench memory                 memory plan for FLUX.1-dev: bytes saved per block (CPU), scaled to 19+38
    treerpo run WORKFLOW.json            run a saved ComfyUI workflow headless (docs/cli.md)
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .errors import EXIT_SIGNAL, EXIT_USAGE, CommandError, int_list, non_negative_int, positive_float, positive_int


def cmd_presets(args) -> int:
    from ..core.presets import PRESETS, make_config

    for name in PRESETS:
        c = make_config(name)
        clip = (f"dynamic {c.eps_low:g}..{c.eps_high:g} eta={c.eta} R={c.clip_reward}" if c.clip_mode == "dynamic"
                else f"fixed {c.clip_eps:g}")
        window = (f"{c.window_mode} every {c.window_every} <= {c.window().last}" if c.window_mode == "progressive"
                  else f"{c.window_mode} at {c.window_start}")
        print(f"{name:16s} branching={list(c.branching)[:6]}{'...' if c.depth > 6 else ''} depth={c.depth} "
              f"share_prefix={c.share_prefix} sampler={c.sampler} noise={c.noise_level}({c.noise_schedule}) "
              f"beta={c.beta} window={window} iterations={c.iterations} clip={clip} sft={c.sft_lambda} "
              f"adv_std={c.adv_std}{' unbiased' if c.adv_std_unbiased else ''}"
              f"{f'+{c.adv_std_eps:g}' if c.adv_std_eps else ''} "
              f"weights={'sum-to-1' if c.normalize_reward_weights else 'as given'} "
              f"step={'per layer' if c.step_per_layer else 'accumulated'} compress={c.compress_ratio} "
              f"lr={c.lr:g} (LoRA) ema={c.ema_decay:g} ratio_norm={c.ratio_norm}")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    bench.check_args(args)  # before anything is loaded or written
    if args.what == "nfe":
        return bench.bench_nfe(args)
    if args.what == "gpu":
        from . import bench_gpu

        return bench_gpu.bench_gpu(args)
    if args.what == "learn":
        from . import bench_learn

        return bench_learn.bench_learn(args)
    if args.what == "memory":
        from . import bench_memory

        return bench_memory.bench_memory(args)
    if args.what == "ratio":
        return bench.bench_ratio(args)
    return bench.bench_speed(args)


def cmd_demo(args) -> int:
    from . import demo

    return demo.run_demo(args)


def cmd_train(args) -> int:
    from . import train

    return train.run_train(args)


class Parser(argparse.ArgumentParser):
    """argparse with its error in one line (the usage is one -h away); subcommands inherit it."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} -h)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="treerpo", description="Dynamic-TreeRPO: tree-structured GRPO for FLUX")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("presets", help="list the presets").set_defaults(func=cmd_presets)

    def common(sp, preset="dynamic-treerpo"):
        sp.add_argument("--preset", default=preset,
                        help="dynamic-treerpo, tree, tree-clip, treerpo-plus, mixgrpo, mixgrpo-flash, dancegrpo")
        sp.add_argument("--num-steps", dest="num_steps", type=positive_int, default=None, help="denoising steps T")
        sp.add_argument("--lr", type=float, default=None)
        sp.add_argument("--seed", type=int, default=None)
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any TrainConfig setting")

    d = sub.add_parser("demo", help="run the bundled tiny-demo workflow: RL on the tiny-shapes model (CPU, minutes)",
                       description="Runs workflows/tiny-demo.json headless (ComfyUI's executor, as treerpo run): "
                                   "Dynamic-TreeRPO on the bundled tiny-shapes model against the shapes reward, then "
                                   "the held-out before/after grid, reward curve and tree preview.")
    d.add_argument("--out", default="demo-output", help="ComfyUI base directory for the run (models/, output/)")
    d.add_argument("--iterations", type=positive_int, default=None,
                   help="training iterations (default: the workflow's)")
    d.add_argument("--restart", action="store_true", help="start the run over instead of continuing it")
    d.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms")
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
    t.add_argument("--resolution", type=positive_int, default=512)
    t.add_argument("--max-sequence-length", dest="max_sequence_length", type=positive_int, default=None,
                   help="T5 tokens per prompt (default 512 for dev, 256 for schnell)")
    t.add_argument("--iterations", type=positive_int, default=None,
                   help="default: the preset's run length (100 for the tree)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--rank", type=positive_int, default=32, help="LoRA rank")
    t.add_argument("--alpha", type=positive_float, default=None, help="LoRA alpha (default = rank)")
    t.add_argument("--checkpoint-every", dest="checkpoint_every", type=positive_int, default=10)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--gradient-checkpointing", dest="gradient_checkpointing", action="store_true")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench",
                       help="benchmarks: NFE, speed and memory, bf16 ratio drift, the GPU run, learning curves")
    b.add_argument("what", choices=["nfe", "speed", "ratio", "gpu", "learn", "memory"])
    b.add_argument("--num-steps", dest="num_steps", type=positive_int, default=None,
                   help="T (nfe: 25; speed: 10, --quick 6; learn: 25, --quick 8)")
    b.add_argument("--iterations", type=positive_int, default=None,
                   help="nfe: iterations to average over (default: each preset's own run length); learn: run length")
    b.add_argument("--presets", "--preset", dest="presets", default=None,
                   help="comma list of presets (default: dynamic-treerpo,mixgrpo,mixgrpo-flash,dancegrpo; "
                        "learn: also tree, tree-clip; learn --presets '' runs only --variants)")
    b.add_argument("--model", default=None,
                   help="'tiny' (built in code), a size preset with random weights (flux-width, flux-narrow; "
                        "NAME:DOUBLE:SINGLE sets the block counts) or a FLUX folder (default tiny; learn: its task's)")
    b.add_argument("--rank", type=positive_int, default=8, help="speed, learn: LoRA rank")
    b.add_argument("--resolution", type=positive_int, default=None,
                   help="image size (latent = size/8; speed/ratio default 64, speed --quick 32)")
    b.add_argument("--repeats", type=positive_int, default=None,
                   help="speed: timed iterations per preset after one warm-up (default 2)")
    b.add_argument("--window-start", dest="window_start", type=non_negative_int, default=None,
                   help="speed: window position used by every windowed preset (default: the middle, (T-4)//2)")
    b.add_argument("--mixed-precision", dest="mixed_precision", choices=["auto", "no", "bf16"], default="auto",
                   help="speed: autocast of rollout and update (auto: bf16 on CUDA, none on the CPU)")
    b.add_argument("--peak-tflops", dest="peak_tflops", type=positive_float, default=None,
                   help="speed, gpu: the device's peak TFLOP/s for the utilisation estimate "
                        "(default: from the CUDA card's name)")
    b.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="speed: all presets in this process (peak memory then not per preset)")
    b.add_argument("--profile", type=non_negative_int, default=0, metavar="N",
                   help="speed: profile one more iteration per preset: operator time by kind and the top N operators")
    b.add_argument("--quick", action="store_true",
                   help="speed: T=6, 32 px, 1 repeat; learn: T=8, 8 iterations, 3 seeds (under 15 minutes on 2 cores)")
    b.add_argument("--max-tokens", dest="max_tokens", type=positive_int, default=None,
                   help="memory: count at most this many image tokens; larger sizes are extrapolated linearly "
                        "from counts at N/2 and N (default: count 512 and 720 px directly)")
    b.add_argument("--json", help="also write the results here")
    b.add_argument("--out", default="bench-out",
                   help="gpu, learn: output folder (gpu-bench.json; learn.json, learn.png)")
    b.add_argument("--cpu-smoke", dest="cpu_smoke", action="store_true",
                   help="gpu: the same path on the CPU at tiny sizes")
    b.add_argument("--variants", default=None,
                   help="learn: extra runs: ablation names (R=group-minmax, R=running, adv_std=global, sampler=cps, "
                        "ema=0.9, demo-settings), 'all', or PRESET+KEY=VALUE[+KEY=VALUE]")
    b.add_argument("--replot", action="store_true",
                   help="learn: redraw learn.png and print the summary from --out's learn.json (a run stopped early)")
    b.add_argument("--reward", default=None, help="learn: reward (default: the task's)")
    b.add_argument("--lr-scale", dest="lr_scale", type=positive_float, default=None,
                   help="learn: factor on every preset's own learning rate (default: the task's)")
    b.add_argument("--seeds", type=positive_int, default=None, help="learn: seeds per preset (default 3)")
    b.add_argument("--eval-every", dest="eval_every", type=positive_int, default=None,
                   help="learn: iterations between held-out evaluations")
    b.add_argument("--prompts-per-iteration", dest="prompts_per_iteration", type=positive_int, default=None,
                   help="speed, learn: prompts per iteration (default 2)")
    b.add_argument("--sweep-prompts", dest="sweep_prompts", type=int_list, default=None, metavar="N,N,...",
                   help="speed: measure at each number of prompts per iteration (e.g. 1,2,4,8) and compare")
    b.add_argument("--train-prompts", dest="train_prompts", type=positive_int, default=None,
                   help="learn: training prompts")
    b.add_argument("--eval-prompts", dest="eval_prompts", type=positive_int, default=None,
                   help="learn: evaluation prompts, the first of the set (default 128: all; --quick 8)")
    b.add_argument("--eval-seeds", dest="eval_seeds", type=positive_int, default=None,
                   help="learn: noise seeds per evaluation prompt (default 2; --quick 1)")
    b.add_argument("--eval-set", dest="eval_set", default=None, choices=["validation", "test"],
                   help="learn: the protocol's prompt set to evaluate on: validation (default: choosing settings) "
                        "or test (reporting)")
    b.set_defaults(func=cmd_bench)

    from .run import add_parser as add_run_parser

    add_run_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes (docs/cli.md): 0 done, 1 a run failed, 2 bad input, 3 ComfyUI not available, 130 interrupted."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except CommandError as e:  # one line; the exception still carries the exit code (and the message, for tests)
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return EXIT_SIGNAL[signal.SIGINT]


if __name__ == "__main__":
    sys.exit(main())
