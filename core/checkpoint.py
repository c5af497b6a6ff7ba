"""Atomic, safetensors-only checkpoints of a training run.

Layout: <dir>/step-000010/{trainable.safetensors, optimizer.safetensors, state.json} and
<dir>/latest (the newest complete step). A step folder is written under a temporary name
and renamed into place, and ``latest`` is replaced atomically afterwards, so a crash or
Ctrl-C at any moment leaves the previous checkpoint intact and loadable.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import safetensors.torch as st
import torch

LATEST = "latest"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """save_file into a temporary file beside ``path``, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        st.save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def flatten_optimizer(state: dict) -> tuple[dict, dict]:
    """torch optimizer state_dict -> (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for idx, slot in state["state"].items():
        for key, val in slot.items():
            if torch.is_tensor(val):
                tensors[f"{idx}.{key}"] = val
            else:
                scalars[f"{idx}.{key}"] = val
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for name, val in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory, step: int, trainable: dict, optimizer_state: dict, state: dict, keep: int = 3) -> Path:
    """Write one checkpoint atomically; keep the newest ``keep`` step folders."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    try:
        st.save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()},
                     str(tmp / "trainable.safetensors"))
        opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
        st.save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}, indent=1))
        if final.exists():  # re-saving the same step: move the old one aside first
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name)
    steps = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path) -> Path:
    """A step folder, or a run folder whose ``latest`` names one."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    latest = p / LATEST
    if latest.is_file():
        q = p / latest.read_text().strip()
        if (q / "state.json").is_file():
            return q
        raise FileNotFoundError(f"checkpoint {latest} names {q.name}, which is missing or incomplete")
    raise FileNotFoundError(f"no checkpoint at {p}: expected a step folder with state.json "
                            f"or a run folder with '{LATEST}'")


def load_checkpoint(path) -> tuple[dict, dict, dict, Path]:
    """-> (trainable tensors, optimizer state_dict, run state, step folder)."""
    folder = resolve_checkpoint(path)
    try:
        state = json.loads((folder / "state.json").read_text())
        trainable = st.load_file(str(folder / "trainable.safetensors"))
        opt_tensors = st.load_file(str(folder / "optimizer.safetensors"))
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"checkpoint {folder} is damaged or incomplete: {e}") from e
    optimizer = unflatten_optimizer(opt_tensors, state.pop("optimizer"))
    return trainable, optimizer, state, folder
