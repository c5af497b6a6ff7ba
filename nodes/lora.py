"""Save LoRA (models/loras, prefix + counter, metadata, resumable state beside it) and Load
training state (continue a saved run)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from comfy_api.latest import io

from .choices import NO_STATE, safe_relative, saved_state
from .common import CATEGORY, LoraModel, Run, State, queue_check


def loras_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0])


def next_lora_path(prefix: str) -> Path:
    """models/loras/<prefix>_<counter:05>_.safetensors with the next free counter (ComfyUI's
    naming); the prefix must stay inside models/loras."""
    import folder_paths

    prefix = safe_relative(prefix, "filename_prefix")
    root = loras_dir().resolve()
    folder, name, counter, _, _ = folder_paths.get_save_image_path(prefix, str(root))
    path = (Path(folder) / f"{name}_{counter:05}_.safetensors").resolve()
    if root not in path.parents:  # belt and braces: ComfyUI checks this too
        raise ValueError(f"filename_prefix {prefix!r} leads outside models/loras")
    return path


class SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOSaveLora",
            display_name="Save LoRA (TreeRPO)",
            category=CATEGORY,
            description="Writes the run's LoRA to models/loras/<prefix>_<counter>_.safetensors (diffusers/peft keys "
                        "ComfyUI and diffusers load, training metadata in the header) and its resumable training "
                        "state beside it (<name>.state/).",
            is_output_node=True,
            inputs=[
                Run.Input("run", tooltip="The run from a GRPO trainer step."),
                io.String.Input("filename_prefix", default="treerpo/flux_treerpo",
                                tooltip="Name inside models/loras (subfolders allowed); a counter is appended. "
                                        "Absolute paths and '..' are refused."),
                io.Combo.Input("dtype", options=["float32", "bfloat16"], default="float32",
                               tooltip="Precision of the saved LoRA weights (bfloat16 halves the file)."),
            ],
            outputs=[
                LoraModel.Output(display_name="lora", tooltip="The saved LoRA as ComfyUI's LORA_MODEL."),
                io.String.Output(display_name="path", tooltip="The written file (relative to models/loras)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, filename_prefix, dtype):
        return queue_check(cls, {"dtype": dtype},
                           lambda: filename_prefix is None or safe_relative(filename_prefix, "filename_prefix"))

    @classmethod
    def execute(cls, run, filename_prefix, dtype) -> io.NodeOutput:
        from ..core.models import lora_state_dict

        path = next_lora_path(filename_prefix)
        # every rank calls it: it writes on rank 0 only and synchronises the ranks (a rank-0-only
        # call would leave rank 0 alone in the checkpoint's barrier)
        run.run.save_lora(path, dtype=getattr(torch, dtype))
        rel = os.path.relpath(path, loras_dir().resolve())
        return io.NodeOutput(lora_state_dict(run.bundle.policy, dtype=getattr(torch, dtype)), rel,
                             ui={"text": [f"saved {rel}"]})


def _state_folders() -> list[str]:
    from ..core.training_run import STATE_SUFFIX

    root = loras_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{STATE_SUFFIX}") if (p / "latest").is_file())


class LoadTrainingState(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="TreeRPOLoadTrainingState",
            display_name="Load training state (TreeRPO)",
            category=CATEGORY,
            description="A training state saved beside a LoRA by Save LoRA (weights, optimizer, iteration, metric "
                        "history): connect it to a trainer step's resume_from to continue that run.",
            inputs=[
                io.Combo.Input("state", options=_state_folders() or [NO_STATE],
                               tooltip="A <name>.state folder in models/loras written by Save LoRA."),
            ],
            outputs=[State.Output(display_name="state", tooltip="The saved state, for resume_from.")],
        )

    @classmethod
    def validate_inputs(cls, state):
        return queue_check(cls, {}, lambda: state is None or saved_state(state, loras_dir()))

    @classmethod
    def execute(cls, state) -> io.NodeOutput:
        return io.NodeOutput(saved_state(state, loras_dir()))


NODES = [SaveLora, LoadTrainingState]
