"""The shapes world: a procedural captioned image dataset (coloured shapes with counts and positions)
that the bundled tiny-shapes FLUX model is pretrained on and the `shapes` reward checks."""

from .world import (
    COLOURS, COUNT_WORDS, PROMPT_SETS, REGIONS, SHAPES, Group, Scene, parse_prompt, prompt_of, prompt_set, render,
    sample_scene, scene_prompts,
)

__all__ = ["COLOURS", "COUNT_WORDS", "PROMPT_SETS", "REGIONS", "SHAPES", "Group", "Scene", "parse_prompt", "prompt_of",
           "prompt_set", "render", "sample_scene", "scene_prompts"]
