"""`treerpo bench gpu`: the prepared, unattended run for a GPU machine (bench/gpu.sh calls it).

1. checks that only a GPU can answer: under bf16 autocast the first update of every
   iteration is on-policy, so its mean importance ratio must be exactly 1; and 20 iterations
   of dynamic-treerpo must stay finite (metrics, gradients, LoRA weights);
2. `bench speed` of the tree against the baselines (8 leaves vs 12 trajectories) on a
   FLUX-width transformer with random weights (LoRA, 512 px, T = 25, bf16), each preset in its
   own process for its peak memory, with the model-FLOPs utilisation estimate;
3. the tree and MixGRPO at 1, 2, 4 and 8 prompts per iteration (one timed iteration each).

The JSON is rewritten after every step, so a run stopped by its time limit keeps what it
measured. `--cpu-smoke` runs the same path on the CPU at tiny sizes (tests, a minute or two).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .bench import SPEED_PRESETS as PRESETS, machine, speed_prompts, speed_rows
from .errors import make_dir
from .options import write_json

# the GPU setting: FLUX-width random transformer, LoRA, 512x512, T=25, bf16
GPU = dict(model="flux-width", resolution=512, num_steps=25, rank=32, repeats=2, check_iterations=20,
           mixed_precision="bf16", sweep_prompts=(1, 2, 4, 8))
SWEEP_PRESETS = ("dynamic-treerpo", "mixgrpo")
# the same path at sizes a 2-core CPU runs in a minute or two
CPU_SMOKE = dict(model="flux-narrow", resolution=32, num_steps=6, rank=4, repeats=1, check_iterations=20,
                 mixed_precision="bf16", sweep_prompts=(1, 2))


def run_checks(settings: dict, iterations: int) -> dict:
    """Train dynamic-treerpo for ``iterations`` iterations (its window moving every iteration,
    so low-noise steps where bf16 drifts most are visited) and check the on-policy ratio and
    that everything stays finite."""
    from ..core.presets import make_config
    from ..core.trainer import Trainer
    from .models import brightness_reward, latent_shape, load_stack

    stack = load_stack(settings["model"], rank=settings["rank"])
    shape = latent_shape(stack, settings["resolution"])
    cfg = make_config("dynamic-treerpo", num_steps=settings["num_steps"], seed=0,
                      mixed_precision=settings["mixed_precision"])
    trainer = Trainer(stack.policy, cfg, brightness_reward(), encode=stack.encode, decode=stack.decode,
                      latent_shape=shape)
    start = {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params)}
    keys = ("reward_mean", "loss", "grad_norm", "ratio_mean", "eps_mean")
    ratios, bad = [], []
    for _ in range(iterations):
        m = trainer.step(speed_prompts(2))
        ratios.append(m["ratio_first_update"])
        bad += [f"iteration {m['iteration']}: {k}={m[k]}" for k in keys if not math.isfinite(m[k])]
        if m["skipped_steps"]:
            bad.append(f"iteration {m['iteration']}: {m['skipped_steps']} optimizer step(s) skipped "
                       "(non-finite gradient)")
    weights_finite = all(bool(torch.isfinite(p).all()) for p in trainer.params)
    moved = any(not torch.equal(start[n], p.detach()) for n, p in zip(trainer.param_names, trainer.params))
    out = {
        "preset": "dynamic-treerpo",
        "iterations": iterations,
        "mixed_precision": settings["mixed_precision"],
        "ratio_first_update": ratios,
        "ratio_first_update_exactly_1": ratios[0] == 1.0,
        "ratio_first_update_all_exactly_1": all(r == 1.0 for r in ratios),
        "max_abs_ratio_deviation": max(abs(r - 1.0) for r in ratios),
        "non_finite": bad,
        "lora_weights_finite": weights_finite,
        "lora_weights_changed": moved,
        "window_starts": [h["window_start"] for h in trainer.history],
    }
    out["ok"] = out["ratio_first_update_exactly_1"] and not bad and weights_finite and moved
    del trainer, stack
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bench_gpu(args) -> int:
    t_start = time.perf_counter()
    settings = dict(CPU_SMOKE if args.cpu_smoke else GPU)
    out = make_dir(args.out, "--out")  # checked with the other options by bench.check_args
    path = out / "gpu-bench.json"
    result = {"machine": machine(), "torch": torch.__version__, "cpu_smoke": bool(args.cpu_smoke),
              "settings": settings, "presets": PRESETS.split(","), "checks": None, "speed": None, "ok": None}

    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        write_json(path, result)

    save()
    print(f"bench gpu: {result['machine']}; {settings}", flush=True)
    result["checks"] = run_checks(settings, settings["check_iterations"])
    c = result["checks"]
    print(f"checks: first-update ratio {c['ratio_first_update'][0]!r} (exactly 1: {c['ratio_first_update_exactly_1']}; "
          f"all {c['iterations']} iterations: {c['ratio_first_update_all_exactly_1']}, max |ratio-1| "
          f"{c['max_abs_ratio_deviation']:.3g}); non-finite: {c['non_finite'] or 'none'}; LoRA finite "
          f"{c['lora_weights_finite']}, changed {c['lora_weights_changed']} -> {'ok' if c['ok'] else 'FAILED'}",
          flush=True)
    save()

    rows = []
    result["speed"] = {"rows": rows}
    for name in PRESETS.split(","):
        ns = argparse.Namespace(presets=name, model=settings["model"], num_steps=settings["num_steps"],
                                resolution=settings["resolution"], repeats=settings["repeats"], window_start=None,
                                rank=settings["rank"], mixed_precision=settings["mixed_precision"],
                                peak_tflops=args.peak_tflops, isolate=True, quick=False, profile=8)
        new, s = speed_rows(ns)
        rows += new
        result["speed"].update({k: v for k, v in s.items()})
        r = new[0]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "- (peak unknown: --peak-tflops)"
        print(f"speed {name:16s} {r['seconds_per_iteration']:8.3f} s/iter (rollout {r['rollout']:.3f}, reward "
              f"{r['reward']:.3f}, update {r['update']:.3f}), peak {r['peak_memory_gib']:.2f} GiB, "
              f"{r.get('tflops_achieved', float('nan')):.4g} TFLOP/s, MFU {mfu}; operator time: " + ", ".join(
                  f"{k} {v['share']:.0%}" for k, v in r["profile"]["kinds"].items()), flush=True)
        save()
    ref = rows[0]["seconds_per_iteration"]
    for r in rows:
        r["time_vs_first"] = r["seconds_per_iteration"] / ref
    result["ok"] = bool(c["ok"] and all(r["ratio_first_update"] == 1.0 for r in rows))
    save()

    # how an iteration grows with its prompts: all prompts' trees run as one batch, so the narrow
    # layers stop being batch-starved (last: a run stopped by its time limit keeps the above)
    sweep = result["prompts_sweep"] = []
    for n in settings["sweep_prompts"]:
        for name in SWEEP_PRESETS:
            ns = argparse.Namespace(presets=name, model=settings["model"], num_steps=settings["num_steps"],
                                    resolution=settings["resolution"], repeats=1, window_start=None,
                                    rank=settings["rank"], mixed_precision=settings["mixed_precision"],
                                    peak_tflops=args.peak_tflops, isolate=True, quick=False, profile=0,
                                    prompts_per_iteration=n)
            r = speed_rows(ns)[0][0]
            sweep.append({"prompts": n, **r})
            print(f"sweep {name:16s} {n} prompt(s): {r['seconds_per_iteration']:8.3f} s/iter, "
                  f"{r['seconds_per_sample']:.4f} s/sample, peak {r['peak_memory_gib']:.2f} GiB", flush=True)
            save()
    print(f"wrote {path} ({result['elapsed_s']:.0f} s); checks {'passed' if result['ok'] else 'FAILED'}", flush=True)
    return 0 if result["ok"] else 1
