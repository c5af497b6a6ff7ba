"""Helpers for the `treerpo run` tests: the command in our venv or the ComfyUI runtime's Python,
ComfyUI base directories, reading back run folders and LoRA files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "workflows" / "tiny-demo.json"
HOOKS = REPO / "tests" / "run_hooks.py"
# small and quick: 3 iterations of 6 steps on one prompt, a checkpoint after each
FAST = ["--set", "TreeRPOTrainerStep.iterations=3", "--set", "TreeRPOTrainerStep.checkpoint_every=1",
        "--set", "TreeRPOTreeSettings.num_steps=6", "--set", "TreeRPOTreeSettings.prompts_per_iteration=1",
        "--set", "TreeRPOHeldOutEvaluation.seeds=1"]


def node_id(kind: str, workflow: Path = TINY) -> str:
    """The id of the (first) node of type ``kind`` in a UI-format workflow."""
    return next(str(n["id"]) for n in json.loads(workflow.read_text())["nodes"] if n["type"] == kind)


TRAINER = node_id("TreeRPOTrainerStep")


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra)
    return e


def base_dir(root: Path) -> Path:
    for sub in ("models", "input", "output", "user", "custom_nodes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    return root


def treerpo(*args, timeout=900, **extra_env) -> subprocess.CompletedProcess:
    """`treerpo ARGS` as a user runs it from our venv (it re-executes itself in ComfyUI's Python)."""
    return subprocess.run([sys.executable, "-m", "treerpo.cli.main", *map(str, args)], cwd=REPO, env=env(**extra_env),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


def hooked(runtime: Path, *args, timeout=900, **extra_env) -> subprocess.CompletedProcess:
    """`treerpo ARGS` in the runtime's Python through tests/run_hooks.py (faults and probes)."""
    return subprocess.run([str(runtime / "venv" / "bin" / "python"), str(HOOKS), *map(str, args)], cwd=REPO,
                          env=env(**extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=timeout)


def run_args(base: Path, *more) -> list:
    return ["run", TINY, "--cpu", "--base-directory", base, *FAST, *more]


def run_folder(base: Path, name: str = "tiny-demo") -> Path:
    return base / "output" / "treerpo_runs" / name


def checkpoint_step(base: Path) -> int:
    latest = run_folder(base) / "checkpoints" / "latest"
    return int(latest.read_text().strip().split("-")[-1]) if latest.is_file() else 0


def loras(base: Path) -> list[Path]:
    return sorted((base / "models" / "loras" / "treerpo").glob("tiny_demo_*_.safetensors"))


def lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"different tensors: {sorted(set(a) ^ set(b))[:5]}"
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def metrics(base: Path) -> list[dict]:
    path = run_folder(base) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []
