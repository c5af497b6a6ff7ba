"""Helpers shared by the `treerpo` commands: --set parsing, the run config from the arguments,
atomic JSON output. The commands import this module, never cli/main.py (which imports them)."""

from __future__ import annotations

import json
from pathlib import Path


def parse_set(items: list[str]) -> dict:
    """--set key=value overrides; values are Python literals where they parse."""
    from ..core.presets import parse_settings

    try:
        return parse_settings(items)
    except ValueError as e:
        raise SystemExit(f"--set expects key=value: {e}") from None


def config_from_args(args, **defaults):
    from ..core.presets import make_config

    overrides = {**defaults, **parse_set(args.set)}
    for name in ("num_steps", "lr", "seed"):
        val = getattr(args, name, None)
        if val is not None:
            overrides[name] = val
    try:
        return make_config(args.preset, **overrides)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


def write_json(path, data) -> None:
    from ..core.checkpoint import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1))
