"""Helpers shared by the `treerpo` commands: --set parsing (its values checked), the run config from
the arguments, atomic JSON output. The commands import this module, never cli/main.py (which imports
them); the errors and the checks of files and numbers are in cli/errors.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import BadInput, CommandError


def parse_set(items: list[str]) -> dict:
    """--set key=value overrides; values are Python literals where they parse. A value of the wrong
    kind for its setting (lr=abc) is refused here, naming it; unknown keys are left to make_config."""
    from ..core.presets import check_type, parse_settings

    try:
        values = parse_settings(items)
    except ValueError as e:
        raise BadInput(f"--set expects key=value: {e}") from None
    for key, value in values.items():
        try:
            check_type(key, value)
        except ValueError as e:
            raise BadInput(f"--set {e}") from None
    return values


def config_from_args(args, **defaults):
    from ..core.presets import make_config

    overrides = {**defaults, **parse_set(args.set)}
    for name in ("num_steps", "lr", "seed", "iterations"):  # iterations: also the horizon of sft_decay
        val = getattr(args, name, None)
        if val is not None:
            overrides[name] = val
    try:
        return make_config(args.preset, **overrides)
    except (ValueError, TypeError) as e:
        raise BadInput(str(e)) from None


def write_json(path, data) -> None:
    from ..core.checkpoint import atomic_write_text

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(data, indent=1))
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None
