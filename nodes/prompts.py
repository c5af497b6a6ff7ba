"""Prompts: from a .txt / .jsonl file in ComfyUI's input folder, or typed in; seeded shuffle
and a held-out split."""

from __future__ import annotations

from pathlib import Path

import torch
from comfy_api.latest import io

from .choices import SHAPES_TRAIN, TYPED, check_prompts, held_out_count, prompt_list
from .common import CATEGORY, PromptSet, Prompts, queue_check


def _prompt_files() -> list[str]:
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())


class PromptsNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOPrompts",
            display_name="Prompts (TreeRPO)",
            category=CATEGORY,
            description="The training prompts: a file from ComfyUI's input folder, typed lines, or the shapes "
                        "world's training set.",
            inputs=[
                io.Combo.Input("file", options=[TYPED, SHAPES_TRAIN, *_prompt_files()], default=TYPED,
                               tooltip="A .txt (one prompt per line) or .jsonl (\"prompt\" field) file in ComfyUI's "
                                       "input folder, the typed text below, or the shapes world's training set (512 "
                                       "captions, disjoint from the validation and test sets of Held-out "
                                       "evaluation)."),
                io.String.Input("text", default="a photo of a cat\na red cube on a table", multiline=True,
                                tooltip="Prompts, one per line (used when file is '(typed below)')."),
                io.Int.Input("shuffle_seed", default=0, min=-1, max=2**31 - 1,
                             tooltip="Seed of the prompt order; -1 keeps the file order."),
                io.Float.Input("held_out_fraction", default=0.0, min=0.0, max=0.9, step=0.05,
                               tooltip="Fraction of prompts kept out of training (for evaluation)."),
            ],
            outputs=[Prompts.Output(display_name="prompts", tooltip="Training and held-out prompts.")],
        )

    @classmethod
    def execute(cls, file, text, shuffle_seed, held_out_fraction) -> io.NodeOutput:
        import folder_paths

        prompts = prompt_list(file, text, folder_paths.get_input_directory())
        if shuffle_seed >= 0:
            perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(int(shuffle_seed)))
            prompts = [prompts[i] for i in perm.tolist()]
        n_held = held_out_count(len(prompts), held_out_fraction)
        return io.NodeOutput(PromptSet(train=prompts[n_held:], held_out=prompts[:n_held]))

    @classmethod
    def validate_inputs(cls, file, text, held_out_fraction):
        # reads the prompt file (a text file): an empty one is refused before any model loads
        import folder_paths

        return queue_check(cls, {"held_out_fraction": held_out_fraction},
                           lambda: check_prompts(file, text, held_out_fraction, folder_paths.get_input_directory()))

    @classmethod
    def fingerprint_inputs(cls, file, text, shuffle_seed, held_out_fraction):
        # a prompt file edited on disk must be re-read
        if file in (TYPED, SHAPES_TRAIN):
            return ""
        import folder_paths

        p = Path(folder_paths.get_input_directory()) / file
        return p.stat().st_mtime_ns if p.is_file() else float("nan")


NODES = [PromptsNode]
