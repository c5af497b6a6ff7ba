"""Benchmarks. Every number is measured side by side in one run and printed as ratios.

bench nfe:   model evaluations of the old policy (rollout) and of the update, per sample,
             averaged over the iterations of each preset's default run (its own length and
             window schedule), and over the distinct window positions that run visits.
bench speed: wall-clock seconds per iteration of each preset on the same model, prompts
             and seed, with rollout / reward / update split.
"""

from __future__ import annotations

import copy
import platform
import time

import torch

from ..core.presets import make_config
from ..core.tree import TreeSpec, tree_nfe
from .options import write_json


def _presets(args) -> list[str]:
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not names:
        raise SystemExit("--presets is empty")
    return names


def nfe_table(presets: list[str], num_steps: int = 25, iterations: int | None = None) -> list[dict]:
    """Per preset: NFE per sample averaged over the iterations of its default run
    (``iterations`` or the preset's own run length, its own window schedule), and averaged
    over the distinct window positions that run visits."""
    rows = []
    for name in presets:
        c = make_config(name, num_steps=num_steps)
        n_iter = iterations or c.iterations
        cost = lambda tau, it: tree_nfe(TreeSpec(c.num_steps, tau, c.branching), c.share_prefix,  # noqa: E731
                                        c.trained_layers(it), c.compress_ratio)
        taus = c.window().positions(n_iter)
        per_run = [cost(t, i) for i, t in enumerate(taus)]
        per_pos = [cost(t, 0) for t in sorted(set(taus))]
        leaves = TreeSpec(c.num_steps, 0, c.branching).leaves
        mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        rows.append({
            "preset": name,
            "group": leaves,
            "iterations": n_iter,
            "window_every": c.window_every if c.window_mode == "progressive" else None,
            "nfe_old_per_sample": mean(per_run, "rollout_per_sample"),
            "nfe_old_per_sample_run": mean(per_run, "rollout_per_sample"),
            "nfe_old_per_sample_positions": mean(per_pos, "rollout_per_sample"),
            "nfe_old_per_prompt_run": mean(per_run, "rollout_total"),
            "nfe_new_per_sample": per_run[0]["train_per_sample"],
            "train_forwards_per_prompt": mean(per_run, "train_total"),
            "window_positions": f"{min(taus)}..{max(taus)}",
        })
    return rows


def bench_nfe(args) -> int:

    T = args.num_steps or 25
    try:
        rows = nfe_table(_presets(args), T, args.iterations)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    ref = rows[0]
    runs = "each preset's default run" if not args.iterations else f"a {args.iterations}-iteration run"
    print(f"Model evaluations (NFE), T={T}, {runs}")
    print("old/sample: mean over the iterations of the run (its window schedule); positions: mean over the "
          "distinct window starts it visits")
    print(f"{'preset':16s} {'group':>5s} {'iters':>5s} {'window':>7s} {'old/sample':>10s} {'positions':>9s} "
          f"{'new/sample':>10s} {'old/prompt':>10s} {'update fwd/prompt':>17s} {'old/sample vs ' + ref['preset']:>31s}")
    for r in rows:
        print(f"{r['preset']:16s} {r['group']:5d} {r['iterations']:5d} {r['window_positions']:>7s} "
              f"{r['nfe_old_per_sample']:10.2f} {r['nfe_old_per_sample_positions']:9.2f} {r['nfe_new_per_sample']:10d} "
              f"{r['nfe_old_per_prompt_run']:10.1f} {r['train_forwards_per_prompt']:17.1f} "
              f"{r['nfe_old_per_sample'] / ref['nfe_old_per_sample']:30.2f}x")
    if args.json:
        write_json(args.json, {"num_steps": T, "iterations": args.iterations, "rows": rows})
    return 0


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), torch {torch.__version__}"
    import os

    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, torch {torch.__version__}"


def bench_speed(args) -> int:
    """Seconds per iteration for each preset on one model, measured in this run."""
    from ..core.trainer import Trainer
    from .models import brightness_reward, load_policy_for_bench

    T = args.num_steps or 10
    base_policy, encode, decode, latent_shape = load_policy_for_bench(args.model, args.resolution)
    prompts = ["a red cube on a table", "a portrait of an old sailor"]
    rows = []
    window = args.window_start if args.window_start is not None else (T - 4) // 2
    for name in _presets(args):
        try:
            cfg = make_config(name, num_steps=T, seed=0, lr=1e-4)
            if cfg.window_mode != "frozen":  # same window position for every windowed preset
                cfg = make_config(name, num_steps=T, seed=0, lr=1e-4, window_mode="frozen",
                                  window_start=min(window, cfg.window().last))
        except ValueError as e:
            raise SystemExit(f"error: preset {name}: {e}") from None
        policy = copy.deepcopy(base_policy)
        trainer = Trainer(policy, cfg, brightness_reward(), encode=encode, decode=decode, latent_shape=latent_shape)
        trainer.step(prompts)  # warm-up (allocations, kernels)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        times, parts = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            m = trainer.step(prompts)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            parts.append((m["time_rollout"], m["time_reward"], m["time_update"]))
        row = {
            "preset": name,
            "seconds_per_iteration": sum(times) / len(times),
            "rollout": sum(p[0] for p in parts) / len(parts),
            "reward": sum(p[1] for p in parts) / len(parts),
            "update": sum(p[2] for p in parts) / len(parts),
            "nfe_old_per_sample": m["nfe_old_per_sample"],
            "samples_per_prompt": m["nfe_old_counted"] / len(prompts) / m["nfe_old_per_sample"],
        }
        row["seconds_per_sample"] = row["seconds_per_iteration"] / (len(prompts) * row["samples_per_prompt"])
        if torch.cuda.is_available():
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        rows.append(row)
        del trainer, policy
    ref = rows[0]
    print(f"seconds per iteration, {len(prompts)} prompts, T={T}, window at step {window}, model={args.model}, "
          f"{args.resolution}px; machine: {machine()}")
    print(f"{'preset':16s} {'s/iter':>8s} {'rollout':>8s} {'reward':>8s} {'update':>8s} {'NFE old':>8s} {'samples':>8s} "
          f"{'s/sample':>9s} {'iteration time / ' + ref['preset']:>34s}")
    for r in rows:
        print(f"{r['preset']:16s} {r['seconds_per_iteration']:8.3f} {r['rollout']:8.3f} {r['reward']:8.3f} {r['update']:8.3f} "
              f"{r['nfe_old_per_sample']:8.2f} {r['samples_per_prompt']:8.0f} {r['seconds_per_sample']:9.4f} "
              f"{r['seconds_per_iteration'] / ref['seconds_per_iteration']:33.2f}x")
    if args.json:
        write_json(args.json, {"machine": machine(), "num_steps": T, "window_start": window, "model": args.model,
                               "resolution": args.resolution, "rows": rows})
    return 0


@torch.no_grad()
def ratio_drift(policy, encode, latent_shape, num_steps: int = 25, samples: int = 8, noise_level: float = 0.7,
                steps: list[int] | None = None, seed: int = 0) -> list[dict]:
    """Mean importance ratio of SDE samples drawn with the policy in fp32 and re-evaluated
    under bf16 autocast (a sampler and a trainer that differ only in precision), per
    denoising step, raw and after GRPO-Guard's ratio normalisation."""
    from ..core.losses import ratio_norm_log_ratio
    from ..core.schedule import flux_sigmas
    from ..core.sde import ode_step, sde_step
    from ..core.tree import expand_cond

    sig = flux_sigmas(num_steps, shift=3.0)
    dev = next(policy.parameters()).device
    cond = expand_cond({k: v.to(dev) for k, v in encode(["a red cube on a table"])[0].items()}, samples)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((samples, *latent_shape), generator=g).to(dev)
    wanted = set(steps if steps is not None else range(0, num_steps - 1, 3)) | {num_steps - 2}
    rows = []
    for i in range(num_steps - 1):  # the last step (onto sigma = 0) has no SDE density
        s, s1 = float(sig[i]), float(sig[i + 1])
        t = torch.full((samples,), s, device=dev)
        v32 = policy(x, t, cond).float()
        if i in wanted:
            noise = torch.randn(x.shape, generator=g).to(dev)
            old = sde_step(x, v32, s, s1, noise_level, noise=noise)
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                v16 = policy(x, t, cond).float()
            new = sde_step(x, v16, s, s1, noise_level, x_next=old.x_next)
            norm = ratio_norm_log_ratio(new.log_prob, old.log_prob, new.mean, old.mean, new.std)
            rows.append({"step": i, "sigma": s, "std": float(old.std[0]),
                         "ratio_raw": float(torch.exp(new.log_prob - old.log_prob).mean()),
                         "ratio_norm": float(torch.exp(norm).mean())})
        x = ode_step(x, v32, s, s1)
    return rows


def bench_ratio(args) -> int:
    """`treerpo bench ratio`: the bf16 drift of the mean importance ratio per step."""
    from .models import load_policy_for_bench

    T = args.num_steps or 25
    policy, encode, _, shape = load_policy_for_bench(args.model, args.resolution)
    rows = ratio_drift(policy, encode, shape, T)
    print(f"mean importance ratio, SDE samples drawn in fp32 and re-evaluated under bf16 autocast; model={args.model}, "
          f"{args.resolution}px, T={T}, noise 0.7; machine: {machine()}")
    print(f"{'step':>4s} {'sigma':>7s} {'step std':>9s} {'raw ratio':>10s} {'ratio_norm':>10s}")
    for r in rows:
        print(f"{r['step']:4d} {r['sigma']:7.4f} {r['std']:9.5f} {r['ratio_raw']:10.6f} {r['ratio_norm']:10.6f}")
    if args.json:
        write_json(args.json, {"machine": machine(), "num_steps": T, "model": args.model, "rows": rows})
    return 0
