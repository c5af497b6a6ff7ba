"""GRPO trainer step: N iterations of the engine on a run (core.training_run.TrainingRun), with
ComfyUI's progress bar carrying a preview of the best leaves, Cancel honoured between
iterations (checkpoint first), grad re-enabled inside ComfyUI's inference mode."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

from .choices import NOT_CONNECTED, check_trainer, given, linked, progress_caption, safe_relative
from .common import (
    CATEGORY, FluxModel, LoraModel, ModelBundle, Progress, PromptSet, Prompts, Rewards, Run, Settings, State,
    TreeSettings, check_interrupt, free_comfy_memory, grad_enabled, image_grid, queue_check, runs_dir,
    to_comfy_images,
)


@dataclass
class RunHandle:
    """TREERPO_RUN: the core run plus the bundle and settings it trains (chained steps share it)."""

    run: Any  # core.training_run.TrainingRun
    bundle: ModelBundle
    settings: TreeSettings
    recorder: Any  # core.training_run.LeafRecorder
    start: tuple[int, dict] | None = None  # (iteration, trainable weights) where this queue's training began

    def __repr__(self) -> str:
        return f"RunHandle({self.run.folder}, iteration {self.run.iteration})"


def _caption(img, text: str):
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, img.width, 14], fill=(0, 0, 0))
    draw.text((3, 1), text, fill=(255, 255, 255))
    return img


def open_run(model: ModelBundle, prompts: PromptSet, rewards, settings: TreeSettings, run_name: str, on_existing: str,
             checkpoint_every: int, resume_from=None) -> RunHandle:
    from accelerate import Accelerator

    from ..core.training_run import LeafRecorder, TrainingRun
    from ..core.trainer import Trainer

    folder = runs_dir() / safe_relative(run_name, "run_name")
    cfg = settings.config
    device = model.device
    if device.type == "cuda" and cfg.mixed_precision == "no":
        cfg = dataclasses.replace(cfg, mixed_precision="bf16")  # bf16 autocast on GPUs, fp32 maths on the CPU
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision=cfg.mixed_precision)
    recorder = LeafRecorder(rewards)
    trainer = Trainer(model.policy, cfg, recorder, encode=model.stack.encode, decode=model.stack.decode,
                      latent_shape=settings.latent_shape(model.stack), accelerator=acc)
    run = TrainingRun(folder, trainer, prompts.train, on_existing=on_existing, checkpoint_every=checkpoint_every,
                      initial_state=model.initial_state, resume_from=resume_from)
    return RunHandle(run=run, bundle=model, settings=settings, recorder=recorder)


class TrainerStep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        from ..core.training_run import ON_EXISTING

        return io.Schema(
            node_id="TreeRPOTrainerStep",
            display_name="GRPO trainer step (TreeRPO)",
            category=CATEGORY,
            description="Runs N training iterations (rollout tree -> rewards -> advantages -> clipped update + "
                        "LayerTuning) on a run folder in output/treerpo_runs. Chain steps to continue one run; "
                        "re-queueing continues from the run's checkpoint or restarts, as chosen.",
            inputs=[
                io.Int.Input("iterations", default=10, min=0, max=100000,
                             tooltip="Iterations this node runs (0: open or continue the run without training, "
                                     "e.g. to save it; treerpo run uses it to resume a finished step)."),
                io.String.Input("run_name", default="treerpo-run",
                                tooltip="Run folder name under output/treerpo_runs (checkpoints, metrics, config)."),
                io.Combo.Input("on_existing", options=list(ON_EXISTING), default="continue",
                               tooltip="When the run folder already holds a checkpoint: continue from it, or "
                                       "restart (delete its checkpoints and metrics, start from the untrained LoRA)."),
                io.Int.Input("checkpoint_every", default=10, min=1, max=100000,
                             tooltip="Iterations between checkpoints (one is always written at the end "
                                     "and on Cancel)."),
                io.Int.Input("preview_leaves", default=4, min=1, max=16,
                             tooltip="Best leaves shown in the progress preview."),
                FluxModel.Input("model", optional=True, tooltip="FLUX bundle from Load FLUX (not needed with run)."),
                Prompts.Input("prompts", optional=True, tooltip="Training prompts (not needed with run)."),
                Rewards.Input("rewards", optional=True, tooltip="Reward set (not needed with run)."),
                Settings.Input("settings", optional=True, tooltip="Training settings (not needed with run)."),
                Run.Input("run", optional=True,
                          tooltip="Continue the run of a previous trainer step (chaining); the inputs above are then "
                                  "taken from it."),
                State.Input("resume_from", optional=True,
                            tooltip="A saved training state (Load training state) to start from when the run folder "
                                    "has no checkpoint or is restarted."),
            ],
            outputs=[
                Run.Output(display_name="run", tooltip="The run, for more trainer steps, Save LoRA, Metrics plot."),
                LoraModel.Output(display_name="lora",
                                 tooltip="The trained LoRA as ComfyUI's LORA_MODEL (for its Load LoRA Model node)."),
                io.Image.Output(display_name="best_leaves", tooltip="The best leaves of the last iteration."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")  # training changes state: never reuse a cached result

    @classmethod
    def validate_inputs(cls, run_name, on_existing, model=NOT_CONNECTED, prompts=NOT_CONNECTED,
                        rewards=NOT_CONNECTED, settings=NOT_CONNECTED, run=NOT_CONNECTED):
        from ..core.run_lock import run_busy

        def free_run():
            if run_name is not None:
                busy = run_busy(runs_dir() / safe_relative(run_name, "run_name"))
                if busy:
                    raise ValueError(f"this run is training now, queue refused: {busy}")

        links = linked(model=model, prompts=prompts, rewards=rewards, settings=settings, run=run)
        return queue_check(cls, {"on_existing": on_existing}, lambda: check_trainer(links), free_run)

    @classmethod
    def execute(cls, iterations, run_name, on_existing, checkpoint_every, preview_leaves, model=None, prompts=None,
                rewards=None, settings=None, run=None, resume_from=None) -> io.NodeOutput:
        from ..core.models import lora_state_dict

        with grad_enabled():
            free_comfy_memory()
            if run is None:
                check_trainer(given(model=model, prompts=prompts, rewards=rewards, settings=settings))
                run = open_run(model, prompts, rewards, settings, run_name, on_existing, checkpoint_every,
                               resume_from=resume_from)
            bar = Progress(iterations, node_id=cls.hidden.unique_id)
            start = run.run.iteration
            if run.start is None:  # the first step of a chain: what held-out evaluation calls "before"
                from ..core.training_run import trainable_snapshot

                run.start = (start, trainable_snapshot(run.bundle.policy))

            def each(m):
                check_interrupt()  # Cancel: TrainingRun checkpoints first, then re-raises
                best = run.recorder.best(preview_leaves)
                preview = None
                if best is not None:
                    preview = _caption(image_grid(best, columns=min(4, len(best))), progress_caption(m))
                bar.update(m["iteration"] - start, preview)

            if iterations > 0:
                run.run.train(iterations, callback=each)
        best = run.recorder.best(preview_leaves)  # every iteration decodes and scores leaves
        image = to_comfy_images(best) if best is not None else torch.zeros(1, 64, 64, 3)
        return io.NodeOutput(run, lora_state_dict(run.bundle.policy), image)


NODES = [TrainerStep]
