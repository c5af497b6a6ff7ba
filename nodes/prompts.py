"""Prompts: from a .txt / .jsonl file in ComfyUI's input folder, or typed in; seeded shuffle
and a held-out split."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from comfy_api.latest import io

from .common import CATEGORY, PromptSet, Prompts

TYPED = "(typed below)"
# the shapes world's fixed training set of the evaluation protocol (core/shapes/world.py): the
# bundled tiny-shapes model's RL prompts, disjoint from the validation and test sets
SHAPES_TRAIN = "(shapes world: training set)"


def _prompt_files() -> list[str]:
    import folder_paths

    root = Path(folder_paths.get_input_directory())
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line (.txt), or per JSON line with a "prompt" (or "caption", "text") field."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return [s.strip() for s in lines if s.strip()]
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"Prompts: {path.name} line {n} is not JSON ({e.msg})") from None
        text = row if isinstance(row, str) else next((row[k] for k in ("prompt", "caption", "text") if k in row), None)
        if not isinstance(text, str):
            raise ValueError(f"Prompts: {path.name} line {n} has no \"prompt\" field")
        if text.strip():
            out.append(text.strip())
    return out


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

        if file == TYPED:
            prompts = [s.strip() for s in str(text).splitlines() if s.strip()]
            where = "the typed text"
        elif file == SHAPES_TRAIN:
            from ..core.shapes.world import prompt_set

            prompts, where = prompt_set("train"), "the shapes training set"
        else:
            root = Path(folder_paths.get_input_directory()).resolve()
            path = (root / file).resolve()
            if root not in path.parents or not path.is_file():
                raise FileNotFoundError(f"Prompts: file {file!r} not found in ComfyUI's input folder")
            prompts = read_prompt_file(path)
            where = f"prompt file {file!r}"
        if not prompts:
            raise ValueError(f"Prompts: {where} holds no prompts (expected one prompt per line)")
        if shuffle_seed >= 0:
            perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(int(shuffle_seed)))
            prompts = [prompts[i] for i in perm.tolist()]
        n_held = int(round(len(prompts) * float(held_out_fraction)))
        if n_held >= len(prompts):
            raise ValueError(f"Prompts: held_out_fraction {held_out_fraction} leaves no training prompt "
                             f"out of {len(prompts)}")
        return io.NodeOutput(PromptSet(train=prompts[n_held:], held_out=prompts[:n_held]))

    @classmethod
    def validate_inputs(cls, file):
        import folder_paths

        if file not in (TYPED, SHAPES_TRAIN) and not (Path(folder_paths.get_input_directory()) / file).is_file():
            return f"prompt file {file!r} not found in ComfyUI's input folder"
        return True

    @classmethod
    def fingerprint_inputs(cls, file, text, shuffle_seed, held_out_fraction):
        # a prompt file edited on disk must be re-read
        if file in (TYPED, SHAPES_TRAIN):
            return ""
        import folder_paths

        p = Path(folder_paths.get_input_directory()) / file
        return p.stat().st_mtime_ns if p.is_file() else float("nan")


NODES = [PromptsNode]
