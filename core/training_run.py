"""A training run: one Trainer plus its run folder, usable from ComfyUI nodes and headless.

Run folder layout::

    <folder>/config.json      the TrainConfig of the latest start or continuation
    <folder>/metrics.jsonl    one JSON line per finished iteration (rewritten from the
                              checkpoint's history on open, so it never runs ahead of it)
    <folder>/metrics.csv      the same table for spreadsheets (one column per metric)
    <folder>/checkpoints/     core.checkpoint step folders + ``latest``
    <folder>/.lock            held (flock) while a process opens or trains the run

Opening a folder that holds a checkpoint continues it (``on_existing="continue"``) or wipes
its checkpoints and metrics and starts from the initial weights (``"restart"``): an explicit
choice, never a guess. ``train(n)`` runs n more iterations with a per-iteration callback; if
the callback raises (a Cancel button, Ctrl-C), a checkpoint is written first and the exception
is re-raised, so the next open continues exactly there.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from . import checkpoint as ckpt
from .run_lock import RunLock
from .trainer import StopWithoutCheckpoint

log = logging.getLogger("treerpo")

ON_EXISTING = ("continue", "restart")
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CONFIG = "config.json"
STATE_SUFFIX = ".state"  # folder written beside a saved LoRA: its resumable training state


class RunDiverged(StopWithoutCheckpoint, ValueError):
    """No leaf of an iteration got a finite reward: nothing to learn from, and weights that
    produce NaN images must not become the checkpoint (the last good one is kept)."""


def write_metrics_csv(path: str | os.PathLike, history: Sequence[dict]) -> None:
    """The metrics as CSV, one row per iteration; columns in order of first appearance (rewritten
    whole and atomically: a column may appear later, e.g. after a restart with other rewards)."""
    import csv
    import io

    columns = list(dict.fromkeys(k for m in history for k in m))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for m in history:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in m.items()})
    ckpt.atomic_write_text(path, buf.getvalue())


def trainable_snapshot(policy: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable weights by parameter name (the Trainer's naming), to restart from."""
    return {n: p.detach().cpu().clone() for n, p in policy.named_parameters() if p.requires_grad}


def has_checkpoint(folder: str | os.PathLike) -> bool:
    return (Path(folder) / CHECKPOINTS / ckpt.LATEST).is_file()


class TrainingRun:
    """A Trainer bound to a run folder.

    trainer: a core.trainer.Trainer. prompts: the prompt dataset. on_existing: "continue"
    (resume the folder's checkpoint if it has one) or "restart" (delete its checkpoints and
    metrics, start over). initial_state: trainable weights to start from when the run starts
    fresh (e.g. the untrained LoRA: the in-memory policy may hold a previous run's weights).
    resume_from: a checkpoint (folder with ``latest`` or a step folder, e.g. the ``.state``
    folder beside a saved LoRA) to start from when the run folder holds no checkpoint or is
    restarted.
    """

    def __init__(self, folder: str | os.PathLike, trainer, prompts: Sequence[str], *, on_existing: str = "continue",
                 checkpoint_every: int = 10, initial_state: Mapping[str, torch.Tensor] | None = None,
                 resume_from: str | os.PathLike | None = None):
        if on_existing not in ON_EXISTING:
            raise ValueError(f"on_existing must be one of {ON_EXISTING}, got {on_existing!r}")
        prompts = [p for p in (str(x).strip() for x in prompts) if p]
        if not prompts:
            raise ValueError("the prompt list is empty: give at least one non-empty prompt")
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.folder = Path(folder)
        self.trainer = trainer
        self.prompts = prompts
        self.checkpoint_every = int(checkpoint_every)
        self.initial_state = dict(initial_state) if initial_state is not None else None
        self.resumed_from: Path | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        with RunLock(self.folder):
            self._open(on_existing, resume_from)

    @property
    def main(self) -> bool:
        return self.trainer.accelerator.is_main_process

    @property
    def checkpoint_dir(self) -> Path:
        return self.folder / CHECKPOINTS

    @property
    def iteration(self) -> int:
        return self.trainer.iteration

    @property
    def history(self) -> list[dict]:
        return self.trainer.history

    def scale(self) -> dict:
        """Processes training this run and the prompts of one iteration over all of them."""
        n = self.trainer.accelerator.num_processes
        return {"world_size": n, "global_prompts_per_iteration": self.trainer.config.prompts_per_iteration * n}

    def _open(self, on_existing: str, resume_from) -> None:
        if on_existing == "restart" and self.main:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            (self.folder / METRICS).unlink(missing_ok=True)
            (self.folder / METRICS_CSV).unlink(missing_ok=True)
        self.trainer.accelerator.wait_for_everyone()
        if has_checkpoint(self.folder):
            self.trainer.load_checkpoint(self.checkpoint_dir)
            self.resumed_from = ckpt.resolve_checkpoint(self.checkpoint_dir)
        elif resume_from is not None:
            self.trainer.load_checkpoint(resume_from)
            self.resumed_from = ckpt.resolve_checkpoint(resume_from)
        else:
            self._reset()
        if self.main:
            ckpt.atomic_write_text(self.folder / CONFIG,
                                   json.dumps({**self.trainer.config.to_dict(), **self.scale()}, indent=1))
            ckpt.atomic_write_text(self.folder / METRICS, "".join(json.dumps(m) + "\n" for m in self.history))
            write_metrics_csv(self.folder / METRICS_CSV, self.history)
        log.info("run %s: %s at iteration %d", self.folder,
                 f"continuing from {self.resumed_from}" if self.resumed_from else "fresh start", self.iteration)

    def _reset(self) -> None:
        t = self.trainer
        t.iteration, t.history = 0, []
        if self.initial_state is None:
            return
        missing = [n for n in t.param_names if n not in self.initial_state]
        if missing:
            raise ValueError(f"initial_state lacks trainable weights {missing[:3]}: it belongs to another model")
        with torch.no_grad():
            for n, p in zip(t.param_names, t.params):
                p.copy_(self.initial_state[n].to(p.device, p.dtype))
        # a fresh optimizer: no moments from an earlier run in this process
        opt = t.optimizer.optimizer if hasattr(t.optimizer, "optimizer") else t.optimizer
        opt.state.clear()

    def train(self, iterations: int, callback: Callable[[dict], None] | None = None) -> list[dict]:
        """Run ``iterations`` more iterations; returns their metrics.

        callback(metrics) runs after each iteration (progress, previews, cancel checks). If it
        raises, a checkpoint is written first and its exception is re-raised.
        """
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        start = self.iteration

        def each(m: dict) -> None:
            means = [v for k, v in m.items() if k.startswith("reward/") and k.endswith("/mean")]
            if means and not any(math.isfinite(v) for v in means):
                raise RunDiverged(
                    f"run {self.folder}: no leaf got a finite reward at iteration {m['iteration']} "
                    f"({', '.join(self.trainer.reward_names)} returned NaN/inf for every image): the policy diverged "
                    f"(lower the learning rate) or a reward model failed; the last good checkpoint "
                    f"(iteration {self._last_checkpoint()}) is kept"
                )
            m.update(self.scale())
            if self.main:
                with open(self.folder / METRICS, "a") as f:
                    f.write(json.dumps(m) + "\n")
                write_metrics_csv(self.folder / METRICS_CSV, self.history)
            if callback is not None:
                callback(m)  # if it raises (Cancel, Ctrl-C), the Trainer checkpoints this iteration first

        with RunLock(self.folder):
            self.trainer.train(self.prompts, start + int(iterations), checkpoint_dir=self.checkpoint_dir,
                               checkpoint_every=self.checkpoint_every, progress=False, callback=each)
        # the Trainer checkpoints every checkpoint_every iterations and always at the end
        return self.history[start:]

    def _last_checkpoint(self) -> int:
        try:
            return int(ckpt.resolve_checkpoint(self.checkpoint_dir).name.split("-")[-1])
        except FileNotFoundError:
            return 0

    def save_checkpoint(self) -> Path:
        self.trainer.save_checkpoint(self.checkpoint_dir)
        return ckpt.resolve_checkpoint(self.checkpoint_dir)

    def save_lora(self, path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> tuple[Path, Path]:
        """Write the policy's LoRA (atomic, training metadata) and its resumable state in
        ``<name>.state/`` beside it. Returns (lora path, state folder). Main process only."""
        from .models import save_lora

        policy = self.trainer.policy
        if not getattr(policy, "has_lora", False):
            raise TypeError(f"saving a LoRA needs a FLUX policy with a LoRA adapter, got {type(policy).__name__}")
        path = Path(path)
        state = state_folder(path)
        if self.main:
            last = self.history[-1] if self.history else {}
            save_lora(path, policy, preset=self.trainer.config.preset, settings=self.trainer.config.to_dict(),
                      iteration=self.iteration, reward_stats={k: v for k, v in last.items() if k.startswith("reward")},
                      extra={"run_folder": str(self.folder)}, dtype=dtype)
        self.trainer.save_checkpoint(state)
        return path, state


def state_folder(lora_path: str | os.PathLike) -> Path:
    """The resumable-state folder written beside a LoRA file."""
    p = Path(lora_path)
    return p.with_name(p.stem + STATE_SUFFIX)


class LeafRecorder:
    """Wraps a reward function as the Trainer calls it and keeps the last scored images
    (downsized, on the CPU) and their scores: live previews of the best leaves without
    touching the Trainer."""

    def __init__(self, rewards: Callable, size: int = 128):
        self.rewards, self.size = rewards, int(size)
        self.names = getattr(rewards, "names", None)
        self.weights = getattr(rewards, "weights", None)
        self.images: torch.Tensor | None = None
        self.scores: torch.Tensor | None = None

    def __call__(self, images, prompts):
        scores = self.rewards(images, prompts)
        if torch.is_tensor(images) and images.ndim == 4 and images.shape[1] == 3:
            x = images.detach().float()
            if max(x.shape[-2:]) > self.size:
                x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
            self.images = x.clamp(0, 1).cpu()
        self.scores = torch.as_tensor(scores).detach().float().cpu().reshape(len(images), -1)
        return scores

    def best(self, k: int = 4) -> torch.Tensor | None:
        """The last batch's k best images [k, 3, h, w] by weighted score (non-finite last)."""
        if self.images is None or self.scores is None:
            return None
        w = torch.tensor(self.weights if self.weights is not None else [1.0] * self.scores.shape[1])
        total = (self.scores * w).sum(1)
        total = torch.where(torch.isfinite(total), total, torch.full_like(total, -math.inf))
        order = torch.argsort(total, descending=True)[: max(1, k)]
        return self.images[order]


__all__ = [
    "ON_EXISTING", "RunDiverged", "LeafRecorder", "TrainingRun", "trainable_snapshot", "has_checkpoint",
    "state_folder", "write_metrics_csv",
]
