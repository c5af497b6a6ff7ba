"""`treerpo bench learn`: how fast each preset learns, side by side.

Every run (preset or variant x seed) trains its own copy of the same LoRA policy on the same
prompts with the same reward; runs advance round-robin, one iteration each, in a rotating
order, so machine noise hits all alike. Per iteration: training reward, within-group reward
std, the clip eps used, cumulative NFE (counted by the rollout) and cumulative compute
seconds (the run's own iterations only). At fixed iterations: the evaluation protocol's reward
(core/evaluate.py) of fixed-noise ODE samples on the validation set (default; --eval-set test to
report), the same prompts and noise for every run, with a 95 % bootstrap interval over prompts and
the gain over the base model, paired. Writes learn.json (all curves) and learn.png (mean and
min-max over seeds against iterations, NFE and seconds).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

from ..core.presets import PRESETS, make_config
from .bench import machine
from .errors import BadInput, make_dir, read_text
from .options import parse_set, write_json

# The task of the benchmark, in ONE place: the bundled tiny-shapes model and the shapes reward
# (prompt fidelity in [0, 1]), as in the demo. lr_scale multiplies every preset's own (FLUX LoRA)
# learning rate, keeping their ratio: 5 gives the tree 7.5e-4, near the demo's 7e-4 (3e-3 makes
# the tree collapse within 40 iterations on this model, docs/demo.md).
DEFAULT_TASK = {"model": "tiny-shapes", "reward": "shapes", "resolution": 64, "lr_scale": 5.0, "eval_set": "validation"}

LEARN_PRESETS = ("dynamic-treerpo", "tree", "tree-clip", "mixgrpo", "mixgrpo-flash", "dancegrpo")
# ablations of the fidelity issue's open questions, each a preset with settings changed
ABLATIONS = {
    "R=group-minmax": ("dynamic-treerpo", {"clip_reward": "group-minmax"}),  # Eq. 11's R: group min-max
    "R=running": ("dynamic-treerpo", {"clip_reward": "running"}),  # ... running normalisation
    # (R=combined, the combined reward value, is dynamic-treerpo itself)
    "adv_std=global": ("dynamic-treerpo", {"adv_std": "global"}),  # one std over the whole batch
    "sampler=cps": ("dynamic-treerpo", {"sampler": "cps"}),  # coefficients-preserving SDE step
    "ema=0.9": ("dynamic-treerpo", {"ema_decay": 0.9}),  # held-out samples from the EMA weights
    # the demo's two changes together: no LayerTuning SFT term, one advantage std over the batch
    "demo-settings": ("dynamic-treerpo", {"sft_lambda": 0.0, "adv_std": "global"}),
}
# full run: the paper's T and run length, the protocol's whole validation set; quick: under 15
# minutes on 2 cores
FULL = dict(num_steps=25, iterations=100, seeds=3, prompts_per_iteration=2, train_prompts=512, eval_prompts=128,
            eval_seeds=2, eval_every=10)
QUICK = dict(num_steps=8, iterations=8, seeds=3, prompts_per_iteration=2, train_prompts=16, eval_prompts=8,
             eval_seeds=1, eval_every=4)
EVAL_SEED = 1234  # the evaluation samples' first noise seed, the same for every run
EVAL_SETS = ("validation", "test")


def _top_level_split(text: str) -> list[str]:
    """Split on commas outside brackets, so a variant may set a list (branching=[8,1,1,1])."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def parse_variants(presets: str, variants: str | None) -> dict[str, tuple[str, dict]]:
    """Run names -> (preset, overrides). ``variants``: ablation names (ABLATIONS), "all", or
    PRESET+KEY=VALUE[+KEY=VALUE...] for any other setting."""
    out: dict[str, tuple[str, dict]] = {}
    for name in [p.strip() for p in presets.split(",") if p.strip()]:
        if name not in PRESETS:
            raise BadInput(f"unknown preset {name!r} in --presets; choose from {sorted(PRESETS)}")
        out[name] = (name, {})
    items = [v.strip() for v in _top_level_split(variants or "") if v.strip()]
    if items == ["all"]:
        items = list(ABLATIONS)
    for item in items:
        if item in ABLATIONS:
            out[item] = (ABLATIONS[item][0], dict(ABLATIONS[item][1]))
            continue
        preset, *sets = item.split("+")
        if preset not in PRESETS or not sets:
            raise BadInput(f"--variants {item!r}: expected one of {sorted(ABLATIONS)}, 'all', or "
                           f"PRESET+KEY=VALUE[+KEY=VALUE] with PRESET one of {sorted(PRESETS)}")
        out[item] = (preset, parse_set(sets))
    if not out:
        raise BadInput("nothing to run: --presets and --variants are both empty")
    return out


def task_prompts(n_train: int, n_eval: int, eval_set: str = "validation") -> tuple[list[str], list[str]]:
    """The first prompts of the protocol's training set and of its validation (or test) set
    (core/shapes/world.py: fixed and disjoint)."""
    from ..core.shapes.world import PROMPT_SETS, prompt_set

    for name, n, flag in (("train", n_train, "--train-prompts"), (eval_set, n_eval, "--eval-prompts")):
        if n > PROMPT_SETS[name]:
            raise BadInput(f"{flag} {n}: the {name} set has {PROMPT_SETS[name]} prompts")
    return prompt_set("train")[:n_train], prompt_set(eval_set)[:n_eval]


@dataclasses.dataclass
class Run:
    name: str
    preset: str
    seed: int
    trainer: object
    stack: object  # the shared stack with this run's policy
    curve: list = dataclasses.field(default_factory=list)
    evals: list = dataclasses.field(default_factory=list)
    nfe_old: int = 0
    nfe_update: int = 0
    seconds: float = 0.0


def evaluation(run: Run, rewards, prompts: list[str], seeds: list[int], shape, name: str):
    """The protocol's Evaluation of the run's current weights (the EMA's when the run keeps one)."""
    from ..core.evaluate import evaluate

    return evaluate(run.stack.policy, run.stack.encode, run.stack.decode, rewards, prompts, seeds, shape,
                    run.trainer.sigmas, {"model": run.trainer.ema_applied}, name=name, keep_images=0)


def eval_point(run: Run, ev, base) -> dict:
    """One evaluation of a run: mean with its interval over prompts, gain over the base model
    (paired: same prompts and noise), per-prompt scores for pooling over seeds, NFE and seconds."""
    ev.scores["base"] = base.scores["model"]
    iv, gain = ev.interval("model"), ev.gain("base", "model")
    return {"iteration": run.trainer.iteration, "reward": iv.mean, "lo": iv.lo, "hi": iv.hi, "gain": gain.mean,
            "gain_lo": gain.lo, "gain_hi": gain.hi, "scores": ev.scores["model"].tolist(), "nfe_old": run.nfe_old,
            "seconds": run.seconds}


def run_config(name: str, preset: str, overrides: dict, settings: dict, seed: int = 0):
    """The config of one run of a preset or variant: its own learning rate times lr_scale."""
    try:
        base_lr = make_config(preset, **overrides).lr
        # the run's length is the config's `iterations` (sft_decay's horizon) unless a variant sets it
        return make_config(preset, num_steps=settings["num_steps"], seed=seed,
                           prompts_per_iteration=settings["prompts_per_iteration"],
                           **{"lr": base_lr * settings["lr_scale"], "iterations": settings["iterations"], **overrides})
    except (ValueError, TypeError) as e:
        raise BadInput(f"run {name!r}: {e}") from None


def make_runs(stack, variants: dict, settings: dict, rewards, shape) -> list[Run]:
    from ..core.trainer import Trainer

    runs = []
    for name, (preset, overrides) in variants.items():
        for seed in range(settings["seeds"]):
            cfg = run_config(name, preset, overrides, settings, seed)
            policy = copy.deepcopy(stack.policy)
            trainer = Trainer(policy, cfg, rewards, encode=stack.encode, decode=stack.decode, latent_shape=shape)
            runs.append(Run(name, preset, seed, trainer, dataclasses.replace(stack, policy=policy)))
    return runs


def train_round(runs: list[Run], prompts: list[str], it: int) -> None:
    """One iteration of every run, in an order rotated each round."""
    k = it % len(runs)
    for run in runs[k:] + runs[:k]:
        t = run.trainer
        before = t.nfe(t.iteration)
        t0 = time.perf_counter()
        m = t.step(t.prompts_for(prompts, t.iteration))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        run.seconds += time.perf_counter() - t0
        run.nfe_old += m["nfe_old_counted"]
        run.nfe_update += before["train_total"] * t.config.prompts_per_iteration
        run.curve.append({
            "iteration": t.iteration, "reward_mean": m["reward_mean"], "group_reward_std": m["group_reward_std"],
            "eps_min": m["eps_min"], "eps_mean": m["eps_mean"], "eps_max": m["eps_max"],
            "nfe_old": run.nfe_old, "nfe_update": run.nfe_update, "seconds": run.seconds,
            "window_start": m["window_start"], "ratio_first_update": m["ratio_first_update"],
            # how often the clip bound (share of clipped ratio terms), the SFT term, the gradient
            "clip_frac": m["clip_frac_high"] + m["clip_frac_low"], "sft_loss": m["sft_loss"],
            "grad_norm": m["grad_norm"],
        })


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def pooled(scores: list, base: list) -> dict:
    """Interval over prompts of a run name's reward (its scores averaged over training seeds) and of
    its gain over the base model, paired on the same prompts and noise."""
    from ..core.evaluate import Evaluation

    ev = Evaluation([], [], scores={"base": torch.tensor(base), "model": torch.tensor(scores).mean(0)})
    return {"reward": vars(ev.interval("model")), "gain": vars(ev.gain("base", "model"))}


def aggregate(runs: list[Run], base: list) -> dict[str, dict]:
    """Per run name: eval points with mean / spread over seeds of reward, NFE and seconds, and the
    intervals over prompts of the seed-pooled reward and of its gain over the base (``base``:
    the base model's scores [P, S])."""
    out = {}
    for name in dict.fromkeys(r.name for r in runs):
        mine = [r for r in runs if r.name == name]
        points = []
        for j, e in enumerate(mine[0].evals):
            points.append({"iteration": e["iteration"],
                           **{k: _stats([r.evals[j][k] for r in mine]) for k in ("reward", "nfe_old", "seconds")},
                           "pooled": pooled([r.evals[j]["scores"] for r in mine], base)})
        train = [{"iteration": c["iteration"],
                  **{k: _stats([r.curve[i][k] for r in mine])
                     for k in ("reward_mean", "group_reward_std", "eps_mean", "clip_frac")}}
                 for i, c in enumerate(mine[0].curve)]
        out[name] = {"preset": mine[0].preset, "seeds": len(mine), "eval": points, "train": train}
    return out


def summary(agg: dict) -> list[dict]:
    """Per run name: compute time and NFE (means over seeds) at its first eval point whose mean
    held-out reward reaches the reference's final one, and both as ratios to the reference's own.
    The reference is the first run of the mixgrpo preset (plain or a variant of it). Also the
    within-group reward std and the share of clipped ratio terms, averaged over the run."""
    reference = next((name for name, a in agg.items() if a["preset"] == "mixgrpo"), None)
    if reference is None:
        return []
    target = agg[reference]["eval"][-1]["reward"]["mean"]

    def reach(points):
        return next((p for p in points if p["reward"]["mean"] >= target), None)

    ref = reach(agg[reference]["eval"])
    rows = []
    for name, a in agg.items():
        hit = reach(a["eval"])
        row = {"name": name, "final": a["eval"][-1]["reward"]["mean"], "final_std": a["eval"][-1]["reward"]["std"],
               "start": a["eval"][0]["reward"]["mean"], "target": target, "reference": reference,
               "reached": hit is not None,
               **{key: sum(t[key]["mean"] for t in a["train"]) / max(1, len(a["train"]))
                  for key in ("group_reward_std", "clip_frac")},
               "iteration": hit and hit["iteration"], "seconds": hit and hit["seconds"]["mean"],
               "nfe_old": hit and hit["nfe_old"]["mean"], "seconds_ratio": None, "nfe_ratio": None}
        if hit and ref and ref["seconds"]["mean"] > 0:
            row["seconds_ratio"] = hit["seconds"]["mean"] / ref["seconds"]["mean"]
            row["nfe_ratio"] = hit["nfe_old"]["mean"] / ref["nfe_old"]["mean"]
        rows.append(row)
    return rows


def figure(agg: dict, title: str, subtitle: str):
    from ..core.plots import SERIES_COLOURS, plot_comparison

    colours = {name: SERIES_COLOURS[i % len(SERIES_COLOURS)] for i, name in enumerate(agg)}

    def series(key, x_key=None, part="eval"):
        out = []
        for name, a in agg.items():
            pts = a[part]
            ys = [p[key]["mean"] for p in pts]
            xs = [p["iteration"] if x_key is None else p[x_key]["mean"] for p in pts]
            out.append(dict(label=name, x=xs, y=ys, colour=colours[name],
                            band=([p[key]["min"] for p in pts], [p[key]["max"] for p in pts])))
        return out

    panels = [
        dict(title="held-out reward", xlabel="iteration", series=series("reward")),
        dict(title="held-out reward", xlabel="NFE (old policy, per run)", series=series("reward", "nfe_old")),
        dict(title="held-out reward", xlabel="compute seconds (per run)", series=series("reward", "seconds")),
        dict(title="training reward", xlabel="iteration", series=series("reward_mean", part="train")),
        dict(title="reward std within a group", xlabel="iteration", series=series("group_reward_std", part="train")),
        dict(title="clip eps (mean)", xlabel="iteration", series=series("eps_mean", part="train")),
        dict(title="share of ratio terms clipped", xlabel="iteration", series=series("clip_frac", part="train")),
    ]
    return plot_comparison(panels, title, subtitle, cols=4)


def report(data: dict, out: Path) -> None:
    """learn.png and the summary table from learn.json's data: at the end of a run, or with
    --replot for a run stopped early (learn.json is rewritten at every evaluation)."""
    settings, agg = data["settings"], data["aggregate"]
    reached = next(iter(agg.values()))["eval"][-1]["iteration"]
    length = f"{settings['iterations']} iterations" if reached == settings["iterations"] else \
        f"stopped at iteration {reached} of {settings['iterations']}"
    img = figure(agg, f"bench learn: {settings['reward']} on {settings['model']}",
                 f"{settings['seeds']} seeds (mean, min-max), T={settings['num_steps']}, {length}; {data['machine']}")
    img.save(out / "learn.png")

    where = (f"{settings['eval_set']} set, {len(data['eval_prompts'])} prompts x {settings['eval_seeds']} seeds "
             f"(same noise for every run)")
    print(f"\n{settings['reward']} on the {where}, {length}: final = mean over {settings['seeds']} training seeds "
          f"± their std; [95 % interval over prompts] of the seed-pooled mean and of its gain over the base model "
          f"(paired)")
    for name, a in agg.items():
        p = a["eval"][-1]["pooled"]
        print(f"{name:24s} {a['eval'][-1]['reward']['mean']:.4f} ± {a['eval'][-1]['reward']['std']:.4f} "
              f"[{p['reward']['lo']:.4f}, {p['reward']['hi']:.4f}]  gain {p['gain']['mean']:+.4f} "
              f"[{p['gain']['lo']:+.4f}, {p['gain']['hi']:+.4f}]")
    ref = data["summary"][0].get("reference", "mixgrpo") if data["summary"] else "mixgrpo"
    print(f"\ntime and NFE to reach {ref}'s final reward, as ratios to {ref}'s own; within-group reward std "
          f"and share of clipped ratio terms, means over the run")
    print(f"{'run':24s} {'start':>8s} {'final':>8s} {'± std':>7s} {'group std':>9s} {'clipped':>7s} "
          f"{'reached at':>10s} {'seconds':>9s} {'NFE old':>9s} {'time ratio':>10s} {'NFE ratio':>9s}")
    for r in data["summary"] or [{"name": n, "final": a["eval"][-1]["reward"]["mean"],
                                   "start": a["eval"][0]["reward"]["mean"],
                                   "final_std": a["eval"][-1]["reward"]["std"], "reached": None}
                                  for n, a in agg.items()]:
        if r["reached"]:
            tail = (f"{r['iteration']:10d} {r['seconds']:9.1f} {r['nfe_old']:9.0f} "
                    + (f"{r['seconds_ratio']:10.2f} {r['nfe_ratio']:9.2f}" if r["seconds_ratio"] is not None
                       else f"{'-':>10s} {'-':>9s}"))
        else:
            tail = "not reached" if r["reached"] is False else "(no mixgrpo run: no target)"
        extra = (f"{r['group_reward_std']:9.4f} {r['clip_frac']:7.3f}" if "clip_frac" in r else f"{'-':>9s} {'-':>7s}")
        print(f"{r['name']:24s} {r['start']:8.4f} {r['final']:8.4f} {r['final_std']:7.4f} {extra} {tail}")
    if any(r["reached"] and r["seconds_ratio"] is None for r in data["summary"]):
        print("(mixgrpo's final reward is not above the start: there is no time or NFE to reach it, no ratio)")
    print(f"wrote {out / 'learn.json'}, {out / 'learn.png'}")


def replot(out: Path) -> int:
    import json

    path = out / "learn.json"
    text = read_text(path, "learn.json (--out must be the output folder of a `treerpo bench learn` run)", "--replot")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise BadInput(f"--replot {path}: not valid JSON ({e})") from None
    missing = sorted({"settings", "aggregate", "summary", "machine", "eval_prompts"} - set(data)) \
        if isinstance(data, dict) else ["everything"]
    if missing:
        raise BadInput(f"--replot {path}: not the learn.json of a `treerpo bench learn` run (no {', '.join(missing)})")
    report(data, out)
    return 0


def learn_settings(args):
    """The run's settings (full or --quick, the task, the options given), its variants and its prompts,
    checked before anything is loaded or written: (settings, variants, train prompts, held-out prompts)."""
    from ..core.rewards.registry import check_rewards
    from .models import check_model, check_resolution

    settings = {**(QUICK if args.quick else FULL), **DEFAULT_TASK}
    for key in settings:  # an option given on the command line wins (argparse checked its range)
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    variants = parse_variants(",".join(LEARN_PRESETS) if args.presets is None else args.presets, args.variants)
    for name, (preset, overrides) in variants.items():
        run_config(name, preset, overrides, settings)
    check_resolution(settings["resolution"], check_model(settings["model"]))
    try:
        check_rewards(settings["reward"])
    except (ValueError, FileNotFoundError) as e:
        raise BadInput(f"--reward {settings['reward']}: {e}") from None
    train, held = task_prompts(settings["train_prompts"], settings["eval_prompts"], settings["eval_set"])
    return settings, variants, train, held


def bench_learn(args) -> int:
    from ..core.evaluate import Evaluation, evaluate
    from ..core.rewards import load_rewards
    from .models import latent_shape, load_stack

    if getattr(args, "replot", False):
        return replot(Path(args.out))
    settings, variants, train, held = learn_settings(args)
    out = make_dir(args.out, "--out")
    seeds = [EVAL_SEED + i for i in range(settings["eval_seeds"])]
    rewards = load_rewards(settings["reward"])
    stack = load_stack(settings["model"], rank=args.rank)
    shape = latent_shape(stack, settings["resolution"])
    runs = make_runs(stack, variants, settings, rewards, shape)
    n_it = settings["iterations"]
    eval_at = sorted({0, n_it, *range(settings["eval_every"], n_it, settings["eval_every"])})
    set_name = f"{settings['eval_set']} set"
    print(f"bench learn: {len(variants)} presets/variants x {settings['seeds']} seeds, {n_it} iterations, "
          f"T={settings['num_steps']}, model {settings['model']}, reward {settings['reward']}, "
          f"{settings['resolution']} px, {settings['prompts_per_iteration']} prompts/iteration; evaluated on the "
          f"{set_name} ({len(held)} prompts x {len(seeds)} seeds) at {eval_at}; machine: {machine()}", flush=True)
    t_start = time.perf_counter()
    with torch.no_grad():
        base = evaluate(stack.policy, stack.encode, stack.decode, rewards, held, seeds, shape, runs[0].trainer.sigmas,
                        {"model": stack.policy.reference}, name=set_name, keep_images=0)

    def save():
        agg = aggregate(runs, base.scores["model"].tolist())
        data = {"machine": machine(), "torch": torch.__version__, "settings": settings, "eval_at": eval_at,
                "eval_seeds": seeds, "train_prompts": train, "eval_prompts": held,
                "base": {"scores": base.scores["model"].tolist(), "reward": vars(base.interval("model"))},
                "variants": {k: {"preset": p, "overrides": o} for k, (p, o) in variants.items()},
                "wall_seconds": time.perf_counter() - t_start,
                "runs": [{"name": r.name, "preset": r.preset, "seed": r.seed, "config": r.trainer.config.to_dict(),
                          "curve": r.curve, "eval": r.evals} for r in runs],
                "aggregate": agg, "summary": summary(agg)}
        write_json(out / "learn.json", data)
        return data

    try:
        for it in range(n_it + 1):
            if it in eval_at:
                for run in runs:
                    # before its first step every run is the base model (LoRA up weights 0: the same
                    # samples to the bit, tested), so its evaluation is the base's, not sampled again
                    ev = Evaluation(held, seeds, set_name, scores={"model": base.scores["model"]}) if it == 0 \
                        else evaluation(run, rewards, held, seeds, shape, set_name)
                    run.evals.append(eval_point(run, ev, base))
                agg = save()["aggregate"]
                print(f"  iteration {it:4d}: {set_name} (base {base.mean('model'):.4f}) " + ", ".join(
                    f"{name} {a['eval'][-1]['reward']['mean']:.4f}" for name, a in agg.items()), flush=True)
            if it < n_it:
                train_round(runs, train, it)
    except KeyboardInterrupt:
        print(f"\nstopped: {out / 'learn.json'} holds the evaluations so far; "
              f"`treerpo bench learn --replot --out {out}` draws them", file=sys.stderr)
        return 130
    report(save(), out)
    print(f"bench learn took {time.perf_counter() - t_start:.0f} s")
    return 0
