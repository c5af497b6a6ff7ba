"""Benchmarks. Every number is measured side by side in one run and printed as ratios.

bench nfe:   model evaluations of the old policy (rollout) and of the update, per sample,
             averaged over the iterations of each preset's default run (its own length and
             window schedule), and over the distinct window positions that run visits.
bench speed: wall-clock seconds per iteration of each preset on the same model, prompts
             and seed, with rollout / reward / update split, peak memory (each preset in
             its own process) and, on FLUX transformers, model FLOPs and utilisation.
"""

from __future__ import annotations

import copy
import platform
import time

import torch

from ..core.presets import make_config
from ..core.tree import TreeSpec, tree_nfe
from .errors import BadInput, CommandError, output_dir, output_file
from .options import write_json


SPEED_PRESETS = "dynamic-treerpo,mixgrpo,mixgrpo-flash,dancegrpo"  # the tree against the published baselines


def _presets(args) -> list[str]:
    names = [p.strip() for p in args.presets.split(",") if p.strip()]
    if not names:
        raise BadInput("--presets is empty")
    return names


def _config(name: str, **settings):
    try:
        return make_config(name, **settings)
    except ValueError as e:
        raise BadInput(f"--presets {name}: {e}") from None


def check_args(args) -> None:
    """The options of `bench nfe|speed|ratio|gpu|learn|memory`, defaults filled in, checked before anything is
    loaded or written (learn's task settings: bench_learn.learn_settings); raises BadInput on the first bad one."""
    from .models import check_model, check_resolution

    if args.json:
        output_file(args.json, "--json")
    if args.what in ("gpu", "learn"):
        output_dir(args.out, "--out")
    if args.what in ("nfe", "speed"):
        args.presets = args.presets or SPEED_PRESETS
    if args.what == "nfe":
        for name in _presets(args):
            _config(name, num_steps=args.num_steps or 25)
    if args.what == "memory":
        from .models import parse_size_preset

        args.model = args.model or "flux-width:2:1"
        parse_size_preset(args.model)  # BadInput unless a size preset (random weights)
    if args.what in ("speed", "ratio"):
        args.model = args.model or "tiny"
        scale = check_model(args.model)
    if args.what == "speed":
        s = _speed_settings(args)
        check_resolution(s["resolution"], scale)
        for name in _presets(args):
            _speed_config(name, s)
    if args.what == "ratio":
        args.resolution = args.resolution or 64
        check_resolution(args.resolution, scale)
    if args.what == "gpu" and not args.cpu_smoke and not torch.cuda.is_available():
        raise BadInput("bench gpu found no CUDA device (torch.cuda.is_available() is False); "
                       "pass --cpu-smoke for the CPU run of the same path")


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
    rows = nfe_table(_presets(args), T, args.iterations)
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


# ---------------------------------------------------------------------- memory
def _proc_status_bytes(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM) in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory from ``start()`` on: CUDA max_memory_allocated, or on the CPU the peak
    resident set size (VmHWM), reset through /proc/self/clear_refs where the kernel allows it
    (else the process's peak since it started)."""

    def __init__(self):
        self.cuda = torch.cuda.is_available()
        self.kind = "cuda max_memory_allocated" if self.cuda else "peak RSS (VmHWM)"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.at_start = torch.cuda.memory_allocated()
            return
        self.at_start = _proc_status_bytes("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS to the current RSS
            self.reset = True
        except OSError:
            self.reset = False
            self.kind += ", since process start"

    def read(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _proc_status_bytes("VmHWM")
        gib = lambda b: None if b is None else b / 2**30  # noqa: E731
        return {"peak_memory_gib": gib(peak), "memory_at_start_gib": gib(self.at_start), "memory_kind": self.kind}


# ---------------------------------------------------------------------- FLOPs
def flux_forward_flops(config, img_tokens: int, txt_tokens: int) -> dict:
    """FLOPs of one FluxTransformer2DModel forward of one sample (2 per multiply-add).

    Per token, a double block's image stream runs q, k, v, out (4 d^2) and the MLP (8 d^2)
    multiply-adds, its text stream the same; a single block runs q, k, v (3 d^2), the MLP in
    (4 d^2) and the joint out projection ((d + 4d) d = 5 d^2) on every token. Attention over
    S = image + text tokens costs 2 S^2 d multiply-adds per block (QK^T and AV). Embedders
    (64 -> d on image, 4096 -> d on text tokens) and the output projection (d -> 64) are
    counted; the per-sample modulation and time/guidance embeddings (no token factor) and
    the LoRA branches (about 2r/d of a linear) are not."""
    d = config.num_attention_heads * config.attention_head_dim
    blocks = config.num_layers + config.num_single_layers
    S = img_tokens + txt_tokens
    linear = 2 * S * 12 * d * d * blocks
    linear += 2 * d * (img_tokens * config.in_channels + txt_tokens * config.joint_attention_dim)
    linear += 2 * img_tokens * d * (config.out_channels or config.in_channels)
    attention = 4 * S * S * d * blocks
    return {"linear": float(linear), "attention": float(attention), "total": float(linear + attention)}


# dense bf16 tensor-core peak (vendor data sheets, no sparsity), TFLOP/s
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.4, "H200": 989.4, "GH200": 989.4,
                    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 70.0, "RTX 4090": 165.2}


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from PEAK_BF16_TFLOPS (longest matching name), or None."""
    hits = [k for k in PEAK_BF16_TFLOPS if k in device_name]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def iteration_flops(fwd: dict, rollout_forwards: int, update_forwards: int) -> dict:
    """Model FLOPs of one iteration: rollout forwards (no grad) + update forwards with their
    backward. The base weights are frozen, so a linear's backward computes only the input
    gradient (1x its forward) and attention's backward dQ, dK, dV (2x): an update forward
    with backward costs 2 linear + 3 attention."""
    rollout = rollout_forwards * fwd["total"]
    update = update_forwards * (2 * fwd["linear"] + 3 * fwd["attention"])
    return {"rollout": rollout, "update": update, "total": rollout + update}


# ---------------------------------------------------------------------- speed
SPEED_PROMPTS = ["a red cube on a table", "a portrait of an old sailor", "two green spheres in the snow",
                 "a lighthouse at dusk", "a bowl of ramen, top view", "a blue bicycle against a wall",
                 "an owl on a branch at night", "a city street in the rain"]


def speed_prompts(n: int) -> list[str]:
    """n distinct prompts (the text changes nothing in the timing, but each tree has its own)."""
    return [SPEED_PROMPTS[i % len(SPEED_PROMPTS)] + (f", take {i // len(SPEED_PROMPTS) + 1}" if i >= 8 else "")
            for i in range(n)]


def _speed_settings(args) -> dict:
    """--quick: the smallest run that still goes through every phase (tests)."""
    quick = getattr(args, "quick", False)
    mp = getattr(args, "mixed_precision", "auto")
    T = args.num_steps or (6 if quick else 10)
    return dict(
        T=T,
        resolution=args.resolution or (32 if quick else 64),
        repeats=args.repeats or (1 if quick else 2),
        window=args.window_start if args.window_start is not None else (T - 4) // 2,
        mixed_precision=("bf16" if torch.cuda.is_available() else "no") if mp == "auto" else mp,
        profile=getattr(args, "profile", 0) or 0,
        prompts=getattr(args, "prompts_per_iteration", None) or 2,
    )


def _speed_config(name: str, s: dict):
    common = dict(num_steps=s["T"], seed=0, lr=1e-4, mixed_precision=s["mixed_precision"])
    cfg = _config(name, **common)
    if cfg.window_mode != "frozen":  # same window position for every windowed preset
        cfg = _config(name, **common, window_mode="frozen", window_start=min(s["window"], cfg.window().last))
    return cfg


def speed_row(stack, shape, name: str, s: dict, copy_policy: bool = True, peak: float | None = None) -> dict:
    """Seconds per iteration of preset ``name`` (one warm-up, then the mean of s["repeats"]),
    its rollout / reward / update split, peak memory from the start of its trainer, and its
    model FLOPs and throughput where the policy is a FLUX transformer."""
    from ..core.trainer import Trainer
    from .models import brightness_reward

    cfg = _speed_config(name, s)
    memory = PeakMemory()
    memory.start()
    policy = copy.deepcopy(stack.policy) if copy_policy else stack.policy
    trainer = Trainer(policy, cfg, brightness_reward(), encode=stack.encode, decode=stack.decode, latent_shape=shape)
    prompts = speed_prompts(s["prompts"])
    trainer.step(prompts)  # warm-up (allocations, kernels)
    times, parts = [], []
    for _ in range(s["repeats"]):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m = trainer.step(prompts)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        parts.append((m["time_rollout"], m["time_reward"], m["time_update"]))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    nfe = trainer.nfe(trainer.iteration - 1)
    profiled = profile_iteration(trainer, prompts, s["profile"]) if s["profile"] else None
    row = {
        "preset": name,
        "seconds_per_iteration": mean(times),
        "rollout": mean([p[0] for p in parts]),
        "reward": mean([p[1] for p in parts]),
        "update": mean([p[2] for p in parts]),
        "nfe_old_per_sample": m["nfe_old_per_sample"],
        "samples_per_prompt": m["nfe_old_counted"] / len(prompts) / m["nfe_old_per_sample"],
        "rollout_forwards": m["nfe_old_counted"],
        "update_forwards": nfe["train_total"] * len(prompts),
        "ratio_first_update": m["ratio_first_update"],
    }
    row["seconds_per_sample"] = row["seconds_per_iteration"] / (len(prompts) * row["samples_per_prompt"])
    row.update(memory.read())
    if profiled:
        row["profile"] = profiled
    tcfg = getattr(getattr(policy, "transformer", None), "config", None)
    if tcfg is not None:
        txt = stack.encode(prompts[:1])[0]["prompt_embeds"].shape[1]
        fwd = flux_forward_flops(tcfg, (shape[1] // 2) * (shape[2] // 2), txt)
        fl = iteration_flops(fwd, row["rollout_forwards"], row["update_forwards"])
        row["flops_per_forward"] = fwd["total"]
        row["flops_per_iteration"] = fl["total"]
        row["tflops_achieved"] = fl["total"] / row["seconds_per_iteration"] / 1e12
        row["tflops_rollout"] = fl["rollout"] / row["rollout"] / 1e12
        row["tflops_update"] = fl["update"] / row["update"] / 1e12
        row["mfu"] = row["tflops_achieved"] / peak if peak else None
    del trainer, policy
    return row


# operator name fragments -> where the time goes (first match wins; the rest is elementwise
# work, copies, optimizer and Python-side launch overhead)
OP_KINDS = (("attention", ("attention", "softmax", "_flash", "_efficient")),
            ("matmul", ("addmm", "::mm", "bmm", "matmul", "linear", "baddbmm")),
            ("conv (VAE)", ("conv",)),
            ("norm", ("norm",)))


def op_kind(op: str) -> str:
    return next((kind for kind, keys in OP_KINDS if any(k in op for k in keys)), "elementwise & other")


def profile_iteration(trainer, prompts: list[str], top: int) -> dict:
    """One more iteration under torch.profiler: the self time of every operator (device time on
    CUDA), summed by kind (OP_KINDS), and the ``top`` operators."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        trainer.step(prompts)
        if cuda:
            torch.cuda.synchronize()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    ops = [(e.key, e.count, getattr(e, attr) / 1e6) for e in prof.key_averages()]
    total = sum(t for _, _, t in ops) or 1.0
    kinds: dict[str, float] = {}
    for name, _, t in ops:
        kinds[op_kind(name)] = kinds.get(op_kind(name), 0.0) + t
    return {"clock": "device" if cuda else "cpu", "seconds": total,
            "kinds": {k: {"seconds": v, "share": v / total} for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"op": n, "calls": c, "seconds": t, "share": t / total}
                    for n, c, t in sorted(ops, key=lambda o: -o[2])[:top]]}


def print_profiles(rows: list[dict]) -> None:
    kinds = list(dict.fromkeys(k for r in rows for k in r["profile"]["kinds"]))
    print(f"\nwhere the time goes: operator self time of one profiled iteration ({rows[0]['profile']['clock']} clock), "
          "share by kind")
    print(f"{'preset':16s} {'seconds':>8s} " + " ".join(f"{k:>{max(len(k), 8)}s}" for k in kinds))
    for r in rows:
        p = r["profile"]
        print(f"{r['preset']:16s} {p['seconds']:8.3f} "
              + " ".join(f"{p['kinds'].get(k, {'share': 0.0})['share']:{max(len(k), 8)}.1%}" for k in kinds))
    for r in rows:
        print(f"top operators, {r['preset']}: " + ", ".join(
            f"{o['op']} {o['share']:.1%} ({o['calls']} calls)" for o in r["profile"]["top"]))


def _isolated_row(args, name: str, s: dict) -> dict:
    """speed_row of one preset in a fresh process, so its peak memory is its own."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/row.json"
        cmd = [sys.executable, "-m", "treerpo.cli.main", "bench", "speed", "--no-isolate", "--presets", name,
               "--model", args.model, "--num-steps", str(s["T"]), "--resolution", str(s["resolution"]),
               "--repeats", str(s["repeats"]), "--window-start", str(s["window"]), "--rank", str(args.rank),
               "--mixed-precision", s["mixed_precision"], "--profile", str(s["profile"]),
               "--prompts-per-iteration", str(s["prompts"]), "--json", out]
        if args.peak_tflops:
            cmd += ["--peak-tflops", str(args.peak_tflops)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            last = ([line for line in done.stderr.splitlines() if line.strip()] or ["no message"])[-1]
            raise CommandError(f"bench speed of preset {name} failed in its own process (exit {done.returncode}): "
                               f"{last.removeprefix('error: ')}")
        return json.loads(open(out).read())["rows"][0]


def speed_rows(args) -> tuple[list[dict], dict]:
    """Rows of `bench speed` and the settings they were measured with."""
    from .models import latent_shape, load_stack

    s = _speed_settings(args)
    names = _presets(args)
    peak = args.peak_tflops or (peak_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None)
    s["peak_tflops"] = peak
    s["isolated"] = args.isolate
    if args.isolate:
        return [_isolated_row(args, n, s) for n in names], s
    stack = load_stack(args.model, rank=args.rank)
    shape = latent_shape(stack, s["resolution"])
    rows = [speed_row(stack, shape, n, s, copy_policy=len(names) > 1, peak=peak) for n in names]
    return rows, s


def bench_speed(args) -> int:
    """Seconds per iteration for each preset on one model, measured in this run; with
    ``--sweep-prompts``, once per number of prompts per iteration, then how they grow."""
    sweep = getattr(args, "sweep_prompts", None)
    if not sweep:
        return _speed_table(args)
    table = {}
    for n in sweep:
        args.prompts_per_iteration = n
        table[n] = _speed_table(args, keep=True)
        print()
    names = [r["preset"] for r in table[sweep[0]]]
    print(f"prompts per iteration: seconds per iteration / per generated sample (each preset's rows in one batch); "
          f"s/sample over {names[0]}'s")
    print(f"{'preset':16s} " + " ".join(f"{f'P={n}':>26s}" for n in sweep))
    for i, name in enumerate(names):
        cells = []
        for n in sweep:
            r, ref = table[n][i], table[n][0]
            cells.append(f"{r['seconds_per_iteration']:8.3f} {r['seconds_per_sample']:8.4f} "
                         f"{r['seconds_per_sample'] / ref['seconds_per_sample']:7.2f}x")
        print(f"{name:16s} " + " ".join(f"{c:>26s}" for c in cells))
    if args.json:
        write_json(args.json, {"machine": machine(), "sweep_prompts": sweep,
                               "rows": {str(n): rows for n, rows in table.items()}})
    return 0


def _speed_table(args, keep: bool = False):
    rows, s = speed_rows(args)
    ref = rows[0]
    print(f"seconds per iteration, {s['prompts']} prompts, T={s['T']}, window at step {s['window']}, "
          f"model={args.model}, LoRA rank {args.rank}, {s['resolution']}px, mixed precision {s['mixed_precision']}; "
          f"machine: {machine()}")
    print(f"peak memory: {ref['memory_kind']} (over load: peak minus the memory held before the trainer started), "
          f"{'each preset in its own process' if s['isolated'] else 'all presets in one process (not isolated)'}")
    flops = "tflops_achieved" in ref
    print(f"{'preset':16s} {'s/iter':>8s} {'rollout':>8s} {'reward':>8s} {'update':>8s} {'NFE old':>8s} "
          f"{'samples':>8s} {'s/sample':>9s} {'peak GiB':>9s} {'over load':>10s}"
          + (f" {'TFLOP/s':>8s} {'MFU':>6s}" if flops else "")
          + f" {'iteration time / ' + ref['preset']:>34s}")
    for r in rows:
        mem, start = r["peak_memory_gib"], r["memory_at_start_gib"]
        grew = mem - start if mem is not None and start is not None else float("nan")
        extra = ""
        if flops:
            extra = (f" {r['tflops_achieved']:8.3f} "
                     + (f"{r['mfu']:6.1%}" if r.get("mfu") is not None else f"{'-':>6s}"))
        print(f"{r['preset']:16s} {r['seconds_per_iteration']:8.3f} {r['rollout']:8.3f} {r['reward']:8.3f} "
              f"{r['update']:8.3f} {r['nfe_old_per_sample']:8.2f} {r['samples_per_prompt']:8.0f} "
              f"{r['seconds_per_sample']:9.4f} {mem if mem is not None else float('nan'):9.3f} {grew:10.3f}{extra} "
              f"{r['seconds_per_iteration'] / ref['seconds_per_iteration']:33.2f}x")
    if s["profile"]:
        print_profiles(rows)
    if keep:
        return rows
    if args.json:
        write_json(args.json, {"machine": machine(), "num_steps": s["T"], "window_start": s["window"],
                               "model": args.model, "rank": args.rank, "resolution": s["resolution"],
                               "mixed_precision": s["mixed_precision"], "isolated": s["isolated"],
                               "peak_tflops": s["peak_tflops"], "prompts": s["prompts"], "rows": rows})
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
