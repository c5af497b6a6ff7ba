"""Held-out evaluation: the base model, the run's starting weights and the trained weights sampled
on the held-out prompts with the same noise, scored, and drawn side by side (core/evaluate.py)."""

from __future__ import annotations

import contextlib
import json

from comfy_api.latest import io, ui

from .common import CATEGORY, Prompts, Rewards, Run, is_main_process, pil_to_comfy


class HeldOutEvaluation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOHeldOutEvaluation",
            display_name="Held-out evaluation (TreeRPO)",
            category=CATEGORY,
            description="Samples the held-out prompts with the base model, the weights this run started from and "
                        "the trained weights (same noise, deterministic sampler), scores them with the rewards and "
                        "draws each pair with its prompt. Writes evaluation.json to the run folder.",
            is_output_node=True,
            inputs=[
                Run.Input("run", tooltip="The run from a GRPO trainer step."),
                Prompts.Input("prompts", tooltip="Its held-out prompts are evaluated (Prompts: held_out_fraction > 0)."),
                io.Int.Input("seeds", default=2, min=1, max=64, tooltip="Noise seeds per prompt."),
                io.Int.Input("first_seed", default=1000, min=0, max=2**31 - 1,
                             tooltip="Seeds first_seed .. first_seed + seeds - 1, the same for every state."),
                Rewards.Input("rewards", optional=True, tooltip="Rewards to score with (default: the run's)."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="Base (left) and trained (right) samples with prompts."),
                io.String.Output(display_name="summary", tooltip="Mean held-out reward of each state."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")  # the run's weights change between queues

    @classmethod
    def execute(cls, run, prompts, seeds, first_seed, rewards=None) -> io.NodeOutput:
        from ..core.checkpoint import atomic_write_text
        from ..core.evaluate import comparison_grid, evaluate, trainable_weights

        policy, trainer = run.bundle.policy, run.run.trainer
        states = {"base": policy.reference}
        start_iteration, start = run.start or (run.run.iteration, None)
        if start is not None and start_iteration > 0:  # continued run: also where this queue started
            states["before"] = lambda: trainable_weights(policy, start)
        states["after"] = contextlib.nullcontext
        ev = evaluate(policy, run.bundle.stack.encode, run.bundle.stack.decode, rewards or run.recorder.rewards,
                      prompts.held_out, range(first_seed, first_seed + seeds), run.settings.latent_shape(run.bundle.stack),
                      trainer.sigmas, states)
        summary = f"{ev.summary()}; after {run.run.iteration} iterations"
        print(f"[TreeRPO] {summary}", flush=True)
        atomic_write_text(run.run.folder / "evaluation.json",
                          json.dumps({**ev.as_dict(), "iteration": run.run.iteration}, indent=1) + "\n")
        img = pil_to_comfy(comparison_grid(ev, "base", "after"))
        return io.NodeOutput(img, summary, ui=ui.PreviewImage(img, cls=cls) if is_main_process() else None)


NODES = [HeldOutEvaluation]
