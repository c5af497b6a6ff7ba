"""`treerpo demo`: the default job. Runs the bundled workflows/tiny-demo.json headless (the same
`treerpo run` path as any saved workflow): Dynamic-TreeRPO trains a LoRA on the bundled
tiny-shapes model against the shapes prompt-fidelity reward on the CPU, then the workflow writes
the held-out before/after grid, the reward curve and a tree preview. Prints the held-out numbers
and where every output is."""

from __future__ import annotations

import json
from pathlib import Path

WORKFLOW = Path(__file__).resolve().parents[1] / "workflows" / "tiny-demo.json"


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def outputs(base: Path) -> dict[str, Path | None]:
    """The files a demo run leaves under its ComfyUI base directory (newest of each)."""
    run = base / "output" / "treerpo_runs" / "tiny-demo"
    images = base / "output" / "tiny-demo"
    return {
        "LoRA": _newest(base / "models" / "loras" / "treerpo", "tiny_demo_*_.safetensors"),
        "metrics (JSONL)": run / "metrics.jsonl",
        "metrics (CSV)": run / "metrics.csv",
        "held-out evaluation": run / "evaluation.json",
        "before/after grid": _newest(images, "before_after_*.png"),
        "reward curve": _newest(images, "reward_curve_*.png"),
        "tree preview": _newest(images, "tree_*.png"),
    }


def evaluation_line(e: dict) -> str:
    """The demo's result from evaluation.json: each state's mean with its 95 % interval over
    prompts, and the gain of the trained weights over the base model, paired; with several rewards,
    each one's own gain (a reward of weight 0 is scored beside the others, not part of their value)."""
    iv, states = e["interval"], [k for k in ("base", "before", "after") if k in e["interval"]]
    names = {"base": "base model", "before": "start of this run", "after": f"after {e['iteration']} iterations"}
    gain = e["gain"]["after-base"]
    rewards = e.get("rewards") or []
    weights = dict(zip(rewards, e.get("weights") or [1.0] * len(rewards)))
    reward = " + ".join([n for n, w in weights.items() if w] or ["combined"])
    return (f"{e['set']}: {reward} reward, {len(e['prompts'])} prompts x {len(e['seeds'])} seeds (the same noise for "
            f"every state), mean [95 % bootstrap interval over prompts]: "
            + ", ".join(f"{names[k]} {iv[k]['mean']:.4f} [{iv[k]['lo']:.4f}, {iv[k]['hi']:.4f}]" for k in states)
            + f"; gain over the base {gain['mean']:+.4f} [{gain['lo']:+.4f}, {gain['hi']:+.4f}] (paired)"
            + "".join(f"; {n} {'alone' if weights.get(n, 1.0) else 'beside it'} {g['mean']:+.4f} "
                      f"[{g['lo']:+.4f}, {g['hi']:+.4f}]"
                      for n, g in e.get("reward_gain", {}).get("after-base", {}).items()))


def run_demo(args) -> int:
    import subprocess
    import sys

    from .errors import make_dir, output_dir

    base = output_dir(args.out, "--out").resolve()
    for sub in ("models", "input", "output", "user", "custom_nodes"):
        make_dir(base / sub, "--out")
    argv = ["run", str(WORKFLOW), "--cpu", "--base-directory", str(base)]
    if args.iterations is not None:
        argv += ["--set", f"TreeRPOTrainerStep.iterations={args.iterations}"]
    if args.restart:
        argv.append("--restart")
    if args.deterministic:
        argv.append("--deterministic")
    # a child process: `treerpo run` may re-execute itself in ComfyUI's Python, and the summary
    # below must still print afterwards
    code = subprocess.call([sys.executable, "-m", "treerpo.cli.main", *argv])
    if code != 0:
        return code
    files = outputs(base)
    ev = files["held-out evaluation"]
    if ev is not None and ev.is_file():
        print(evaluation_line(json.loads(ev.read_text())))
    found = {what: p if p is not None and p.exists() else None for what, p in files.items()}
    print(f"outputs under {base}:")
    for what, path in found.items():
        print(f"  {what:20s} {path or '(missing)'}")
    return 0 if all(found.values()) else 1
