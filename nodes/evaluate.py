"""Held-out evaluation: the base model, the run's starting weights and the trained weights sampled
on held-out prompts (the Prompts node's, or the shapes world's validation or test set) with the
same noise, scored, compared with 95 % bootstrap intervals and drawn side by side
(core/evaluate.py)."""

from __future__ import annotations

import contextlib
import json

from comfy_api.latest import io, ui

from .choices import HELD_OUT, NOT_CONNECTED, SET_CHOICES, check_eval_set, linked
from .common import CATEGORY, Prompts, Rewards, Run, is_main_process, pil_to_comfy, queue_check

GRID_PROMPTS = 16  # prompts drawn in the before/after figure (every prompt is scored)


def eval_prompts(prompt_set: str, prompts) -> tuple[list[str], str]:
    """The prompts and the set's name for the printed line."""
    if prompt_set not in SET_CHOICES:
        raise ValueError(f"Held-out evaluation: unknown prompt_set {prompt_set!r}; choose one of {list(SET_CHOICES)}")
    split = SET_CHOICES[prompt_set]
    if split is None:
        if prompts is None or not prompts.held_out:
            raise ValueError("Held-out evaluation: no held-out prompts: connect Prompts with held_out_fraction > 0, "
                             "or choose a shapes prompt_set")
        return list(prompts.held_out), "held-out prompts"
    from ..core.shapes.world import prompt_set as shapes_set

    return shapes_set(split), f"shapes {split} set"


class HeldOutEvaluation(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOHeldOutEvaluation",
            display_name="Held-out evaluation (TreeRPO)",
            category=CATEGORY,
            description="Samples held-out prompts with the base model, the weights this run started from and the "
                        "trained weights (same noise, deterministic sampler), scores them with the rewards, prints "
                        "each mean and the gain with 95 % bootstrap intervals over prompts, and draws the first "
                        f"{GRID_PROMPTS} pairs with their prompts. Writes evaluation.json to the run folder.",
            is_output_node=True,
            inputs=[
                Run.Input("run", tooltip="The run from a GRPO trainer step."),
                Prompts.Input("prompts", optional=True,
                              tooltip="Its held-out prompts are evaluated when prompt_set says so (Prompts: "
                                      "held_out_fraction > 0)."),
                io.Int.Input("seeds", default=2, min=1, max=64, tooltip="Noise seeds per prompt."),
                io.Int.Input("first_seed", default=1000, min=0, max=2**31 - 1,
                             tooltip="Seeds first_seed .. first_seed + seeds - 1, the same for every state."),
                Rewards.Input("rewards", optional=True, tooltip="Rewards to score with (default: the run's)."),
                io.Combo.Input("prompt_set", options=list(SET_CHOICES), default=HELD_OUT, optional=True,
                               tooltip="Which prompts: the Prompts input's held-out ones, or the shapes world's fixed "
                                       "validation set (for choosing settings) or test set (for reporting), 128 "
                                       "prompts each, never trained on."),
            ],
            outputs=[
                io.Image.Output(display_name="image", tooltip="Base (left) and trained (right) samples with prompts."),
                io.String.Output(display_name="summary",
                                 tooltip="Each state's mean with its interval and the gain over the base."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kw):
        return float("nan")  # the run's weights change between queues

    @classmethod
    def validate_inputs(cls, prompt_set=HELD_OUT, prompts=NOT_CONNECTED):
        return queue_check(cls, {"prompt_set": prompt_set},
                           lambda: check_eval_set(prompt_set, linked(prompts=prompts)))

    @classmethod
    def execute(cls, run, seeds, first_seed, prompts=None, rewards=None, prompt_set=HELD_OUT) -> io.NodeOutput:
        from ..core.checkpoint import atomic_write_text
        from ..core.evaluate import comparison_grid, evaluate, trainable_weights

        chosen, name = eval_prompts(prompt_set, prompts)
        policy, trainer = run.bundle.policy, run.run.trainer
        states = {"base": policy.reference}
        start_iteration, start = run.start or (run.run.iteration, None)
        if start is not None and start_iteration > 0:  # continued run: also where this queue started
            states["before"] = lambda: trainable_weights(policy, start)
        states["after"] = contextlib.nullcontext
        ev = evaluate(policy, run.bundle.stack.encode, run.bundle.stack.decode, rewards or run.recorder.rewards,
                      chosen, range(first_seed, first_seed + seeds), run.settings.latent_shape(run.bundle.stack),
                      trainer.sigmas, states, name=name, keep_images=GRID_PROMPTS)
        summary = f"{ev.summary('base', 'after')}; after {run.run.iteration} iterations"
        print(f"[TreeRPO] {summary}", flush=True)
        atomic_write_text(run.run.folder / "evaluation.json",
                          json.dumps({**ev.as_dict(), "iteration": run.run.iteration}, indent=1) + "\n")
        img = pil_to_comfy(comparison_grid(ev, "base", "after"))
        return io.NodeOutput(img, summary, ui=ui.PreviewImage(img, cls=cls) if is_main_process() else None)


NODES = [HeldOutEvaluation]
