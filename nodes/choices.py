"""The nodes' pure decisions, importable without ComfyUI (the fast test tier calls them
directly): which model files Load FLUX uses, the training settings from the Tree settings
widgets, the prompt list, the checks each node's validate_inputs runs when a graph is queued,
the trainer's preview caption, and user-typed names that must stay inside their folder.
ComfyUI's ``folder_paths`` (or a folder) is passed in where files are looked up."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

# ------------------------------------------------------------------------ Load FLUX
SHAPES = "tiny-shapes (bundled pretrained, CPU)"
TINY = "tiny (built-in test pipeline, CPU)"
SINGLE = "single files (below)"
NONE = "(none)"
DIFFUSERS = "diffusers/"


@dataclass(frozen=True)
class ModelSource:
    """What Load FLUX loads: ``kind`` "shapes" / "tiny" (bundled), "diffusers" (``folder``) or
    "single" (``files``: transformer, clip_l, t5xxl, vae paths)."""

    kind: str
    folder: Path | None = None
    files: tuple[str, str, str, str] | None = None


def model_source(model: str, transformer: str, clip_l: str, t5xxl: str, vae: str, folder_paths) -> ModelSource:
    """Resolve Load FLUX's choice with ComfyUI's ``folder_paths`` (``get_folder_paths``,
    ``get_full_path``). Raises ValueError naming the input and the folder; the node's
    validate_inputs shows it at queue time, execute raises it."""
    if model == SHAPES:
        return ModelSource("shapes")
    if model == TINY:
        return ModelSource("tiny")
    if model.startswith(DIFFUSERS):
        name = model[len(DIFFUSERS):]
        found = [Path(r) / name for r in folder_paths.get_folder_paths("diffusers")
                 if (Path(r) / name / "model_index.json").is_file()]
        if not found:
            raise ValueError(f"diffusers folder {name!r} (with model_index.json) not found in models/diffusers")
        return ModelSource("diffusers", folder=found[0])
    if model != SINGLE:
        raise ValueError(f"unknown model choice {model!r}")
    files = []
    for kind, name, what in (("diffusion_models", transformer, "transformer"), ("text_encoders", clip_l, "clip_l"),
                             ("text_encoders", t5xxl, "t5xxl"), ("vae", vae, "vae")):
        if name == NONE:
            raise ValueError(f"{what}: choose a file from models/{kind} for the single-file route")
        path = folder_paths.get_full_path(kind, name)
        if path is None:
            raise ValueError(f"{what}: {name!r} not found in models/{kind}")
        files.append(path)
    return ModelSource("single", files=tuple(files))


# ------------------------------------------------------------------------ queue-time checks
# The default of a link input that a validate_inputs takes: at queue time ComfyUI passes a
# connected link as None (its value is made later) and leaves an unconnected one out.
NOT_CONNECTED = object()


def linked(**links) -> set[str]:
    """Queue time: the names of the link inputs that are connected."""
    return {name for name, value in links.items() if value is not NOT_CONNECTED}


def given(**links) -> set[str]:
    """Run time: the names of the optional link inputs that are connected (the others are None)."""
    return {name for name, value in links.items() if value is not None}


def _num(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def check_widget(name: str, value, options=None, low=None, high=None) -> None:
    """One constant widget value against its dropdown or its bounds: ComfyUI 0.3.75 checks no
    dropdown of the new node API, and skips min/max of every input a validate_inputs takes.
    None (a linked input) is checked where it is made."""
    if value is None:
        return
    if options is not None:
        if value not in options:
            shown = list(options) if len(options) <= 8 else f"the {len(options)} choices"
            raise ValueError(f"{name} {value!r} is not one of {shown}")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        if not (math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)):
            raise ValueError(f"{name} must be from {_num(low)} to {_num(high)}, got {_num(value)}")


# ------------------------------------------------------------------------ Tree settings
KEEP = -1  # "use the preset's value" for every tunable number


class Tunable(NamedTuple):
    """A Tree settings number: KEEP, or a value from ``low`` (``strict``: above it) up to the
    widget's max. The widget's min is KEEP, so the UI lets -0.5 through: ``check`` refuses it."""

    name: str
    kind: str  # "int", "float" or "bool" (0 / 1)
    field: str  # the TrainConfig field it sets
    tip: str
    opts: dict  # widget options
    low: float
    strict: bool = False

    def check(self, v) -> None:
        if v is None or v == KEEP:  # linked, or the preset's value
            return
        if not math.isfinite(v) or v < self.low or (self.strict and v == self.low):
            want = f"{'>' if self.strict else '>='} {_num(self.low)}"
        elif v > self.opts["max"]:
            want = f"<= {_num(self.opts['max'])}"
        else:
            return
        raise ValueError(f"{self.name} must be -1 (keep the preset's value) or {want}, got {_num(v)}")

    def value(self, v):
        """The TrainConfig value of a checked widget value other than KEEP."""
        if self.field == "compress_ratio" and v == 0:
            return None  # 0 turns the compression off
        return {"int": int, "bool": bool, "float": float}[self.kind](v)


TUNABLES = [
    Tunable("num_steps", "int", "num_steps", "Denoising steps T (paper: 25).", dict(min=-1, max=200), 1),
    Tunable("window_start", "int", "window_start", "First window step tau at iteration 0.", dict(min=-1, max=199),
            0),
    Tunable("window_every", "int", "window_every", "Iterations between window moves (progressive mode).",
            dict(min=-1, max=10000), 1),
    Tunable("window_stride", "int", "window_stride", "Steps the window moves each time.", dict(min=-1, max=100), 1),
    Tunable("noise_level", "float", "noise_level", "SDE noise level a of the first tree layer (paper: 0.7).",
            dict(min=-1.0, max=10.0, step=0.05), 0, strict=True),
    Tunable("beta", "float", "beta", "Depth noise growth beta of Eq. 6 (paper: 0.7; 0 = same noise at every layer).",
            dict(min=-1.0, max=10.0, step=0.05), 0),
    Tunable("compress_ratio", "float", "compress_ratio",
            "MixGRPO-Flash compression: DPM-Solver++ on ratio x the steps after the window; 0 = off.",
            dict(min=-1.0, max=1.0, step=0.05), 0),
    Tunable("clip_eps", "float", "clip_eps", "Fixed clip range (clip_mode fixed; baselines 1e-4).",
            dict(min=-1.0, max=1.0, step=0.00001, round=False), 0),
    Tunable("eps_low", "float", "eps_low", "Dynamic clip: smallest eps (best leaves), Eq. 11.",
            dict(min=-1.0, max=1.0, step=0.00001, round=False), 0),
    Tunable("eps_high", "float", "eps_high", "Dynamic clip: largest eps (worst leaves), Eq. 11.",
            dict(min=-1.0, max=1.0, step=0.00001, round=False), 0),
    Tunable("sft_lambda", "float", "sft_lambda",
            "LayerTuning-RL weight lambda of the SFT term (paper: 0.02; 0 = off).",
            dict(min=-1.0, max=10.0, step=0.001, round=False), 0),
    Tunable("learning_rate", "float", "lr", "AdamW learning rate of the LoRA.",
            dict(min=-1.0, max=1.0, step=0.000001, round=False), 0, strict=True),
    Tunable("prompts_per_iteration", "int", "prompts_per_iteration", "Prompts (trees) per iteration.",
            dict(min=-1, max=256), 1),
    Tunable("step_per_layer", "bool", "step_per_layer",
            "1 = one optimizer step per trained tree layer (Alg. 1, the tree presets); 0 = one step per iteration "
            "over all layers (DanceGRPO).", dict(min=-1, max=1), 0),
]
TUNABLE_NAMES = {t.name for t in TUNABLES}


def parse_branching(text) -> tuple[int, ...] | None:
    """Children per node from the branching widget ("2,2,2,1"); None when empty (the preset's tree)."""
    items = [b.strip() for b in str(text).split(",")]
    if not any(items):
        return None
    try:
        out = tuple(int(b) for b in items if b)
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise ValueError(f"branching {text!r} must be comma-separated positive integers, e.g. 2,2,2,1")
    return out


def _overrides(branching="", group_size=0, window_mode="preset", clip_reward="preset", adv_std="preset",
               resolution=None, seed=None, more_settings="", preset=None, **tunables) -> dict:
    """The TrainConfig fields the Tree settings widgets set, each widget checked on its own; a
    linked one (None) is skipped. ``preset`` is make_config's."""
    from ..core.presets import parse_settings

    over = {}
    for t in TUNABLES:
        v = tunables.get(t.name, KEEP)
        t.check(v)
        if v is not None and v != KEEP:
            over[t.field] = t.value(v)
    if branching is not None and (tree := parse_branching(branching)):
        if group_size:  # make_config would drop group_size without a word
            raise ValueError(f"set group_size ({group_size}) or branching ({branching!r}), not both: group_size G "
                             "means branching G,1,1,...")
        over["branching"] = tree
    for name, value in (("window_mode", window_mode), ("clip_reward", clip_reward), ("adv_std", adv_std)):
        if value is not None and value != "preset":
            over[name] = value
    if resolution is not None and (resolution < 16 or resolution % 16):
        raise ValueError(f"resolution must be a multiple of 16 (the VAE scales by 8 and FLUX packs 2x2 latent "
                         f"patches), got {resolution}")
    if seed is not None:
        over["seed"] = int(seed)
    try:
        over.update(parse_settings(str(more_settings or "")))
    except ValueError as e:
        raise ValueError(f"more_settings: {e}") from None
    return over


def settings_config(preset, group_size, resolution, **widgets):
    """The validated TrainConfig of the Tree settings widgets (``widgets``: the others by name)
    and the image size. A bad widget is named; a bad combination gets the engine's ValueError."""
    from ..core.presets import make_config

    over = _overrides(group_size=group_size, resolution=resolution, **widgets)
    return make_config(preset, group_size=group_size if group_size > 0 else None, **over), int(resolution)


def check_settings(**widgets) -> None:
    """Queue time: each constant widget, and the whole configuration once no widget is linked."""
    if any(v is None for v in widgets.values()):
        _overrides(**widgets)
    else:
        settings_config(**widgets)


# ------------------------------------------------------------------------ Prompts
TYPED = "(typed below)"
# the shapes world's fixed training set of the evaluation protocol (core/shapes/world.py): the
# bundled tiny-shapes model's RL prompts, disjoint from the validation and test sets
SHAPES_TRAIN = "(shapes world: training set)"


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
            raise ValueError(f"{path.name} line {n} is not JSON ({e.msg})") from None
        text = row if isinstance(row, str) else next((row[k] for k in ("prompt", "caption", "text") if k in row), None)
        if not isinstance(text, str):
            raise ValueError(f"{path.name} line {n} has no \"prompt\" field")
        if text.strip():
            out.append(text.strip())
    return out


def prompt_list(file: str, text: str, input_dir) -> list[str]:
    """The prompts of the Prompts node's ``file`` choice (a file of ComfyUI's ``input_dir``, the
    typed ``text`` or the shapes training set). Raises ValueError naming the widget when none."""
    if file == TYPED:
        prompts, where = [s.strip() for s in str(text).splitlines() if s.strip()], "text"
    elif file == SHAPES_TRAIN:
        from ..core.shapes.world import prompt_set

        prompts, where = prompt_set("train"), "the shapes training set"
    else:
        root = Path(input_dir).resolve()
        path = (root / file).resolve()
        if root not in path.parents or not path.is_file():
            raise ValueError(f"prompt file {file!r} not found in ComfyUI's input folder")
        prompts, where = read_prompt_file(path), f"prompt file {file!r}"
    if not prompts:
        raise ValueError(f"{where} holds no prompts (expected one prompt per line)")
    return prompts


def held_out_count(n: int, fraction: float) -> int:
    """Prompts kept out of training; at least one must be left to train on."""
    held = int(round(n * float(fraction)))
    if held >= n:
        raise ValueError(f"held_out_fraction {_num(fraction)} leaves no training prompt out of {n}")
    return held


def check_prompts(file, text, held_out_fraction, input_dir) -> None:
    """Queue time: the prompt list is not empty and keeps a training prompt (cheap: a text file)."""
    if file is None or (file == TYPED and text is None):  # linked
        return
    prompts = prompt_list(file, text, input_dir)
    if held_out_fraction is not None:
        held_out_count(len(prompts), held_out_fraction)


# ------------------------------------------------------------------------ rewards
def check_reward_weight(weight) -> None:
    if weight == 0:  # a one-reward set of weight 0 has nothing to train on (RewardSet refuses it)
        raise ValueError("weight must not be 0 (to only watch a reward, set its weight_N in Combine rewards to 0)")


def check_combined_weights(weights, connected: set[str]) -> None:
    """Combine rewards: ``weights`` are weight_1 .. weight_4; those of the connected rewards_N must
    not all be 0. A linked weight (None) is known at run time only."""
    used = {f"weight_{i}": w for i, w in enumerate(weights, 1) if f"rewards_{i}" in connected}
    if used and None not in used.values() and all(w == 0 for w in used.values()):
        raise ValueError(f"the weights of the connected rewards ({', '.join(used)}) are all 0: at least one reward "
                         "must carry weight")


# ------------------------------------------------------------------------ links each node needs
TRAINER_NEEDS = ("model", "prompts", "rewards", "settings")


def check_trainer(connected: set[str]) -> None:
    missing = [] if "run" in connected else [n for n in TRAINER_NEEDS if n not in connected]
    if missing:
        raise ValueError(f"connect {', '.join(missing)} (or a run from another trainer step)")


def check_sampler(prompt, connected: set[str]) -> None:
    if prompt is not None and not str(prompt).strip():
        raise ValueError("prompt is empty")
    if not {"model", "run"} & connected:
        raise ValueError("connect a model (Load FLUX) or a run (GRPO trainer step)")


def check_scorer(prompt, connected: set[str]) -> None:
    if "tree" in connected:
        return  # the tree's prompt is scored
    if "images" not in connected:
        raise ValueError("connect a tree or images")
    if "settings" not in connected:
        raise ValueError("connect settings when scoring images without a tree")
    if prompt is not None and not str(prompt).strip():
        raise ValueError("prompt is empty: type the prompt of the images")


HELD_OUT = "held-out prompts (Prompts input)"
# the evaluation protocol's fixed sets of the shapes world (core/shapes/world.py): choose settings on
# validation, report on test
SET_CHOICES = {HELD_OUT: None, "shapes: validation set": "validation", "shapes: test set": "test"}


def check_eval_set(prompt_set, connected: set[str]) -> None:
    if prompt_set == HELD_OUT and "prompts" not in connected:
        raise ValueError(f"prompt_set {HELD_OUT!r} needs prompts: connect Prompts with held_out_fraction > 0, or "
                         "choose a shapes prompt_set")


# ------------------------------------------------------------------------ saved training states
NO_STATE = "(none saved yet)"


def saved_state(state: str, root) -> Path:
    """The folder of Load training state's ``state`` in models/loras (``root``), its latest
    checkpoint checked."""
    from ..core.checkpoint import resolve_checkpoint

    if state == NO_STATE:
        raise ValueError("state: none saved yet (Save LoRA writes one beside its LoRA)")
    root = Path(root).resolve()
    path = (root / safe_relative(state, "state")).resolve()
    if root not in path.parents or not path.is_dir():
        raise ValueError(f"state {state!r} is not a saved state folder in models/loras")
    resolve_checkpoint(path)  # names a missing or incomplete checkpoint
    return path


# ------------------------------------------------------------------------ trainer preview
def progress_caption(m: dict) -> str:
    """The trainer's preview caption (the headline reward as the progress bars show it)."""
    from ..core.trainer import reward_headline

    return f"it {m['iteration']}  {reward_headline(m, '.3g')}  eps {m['eps_mean']:.2g}"


# ------------------------------------------------------------------------ names typed by users
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")


def safe_relative(name: str, what: str, allow_subfolders: bool = True) -> str:
    """A user-typed file or folder name that must stay inside its ComfyUI folder: no absolute
    paths, no '..', no odd characters. Raises ValueError naming the setting."""
    raw = str(name).strip().replace("\\", "/")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if not raw or raw.startswith("/") or re.match(r"^[A-Za-z]:", raw) or ".." in raw.split("/") or not parts:
        raise ValueError(f"{what} {name!r} must be a relative name inside its folder (no absolute path, no '..')")
    if not allow_subfolders and len(parts) > 1:
        raise ValueError(f"{what} {name!r} must be a plain name without '/'")
    bad = [p for p in parts if not _SAFE_NAME.match(p)]
    if bad:
        raise ValueError(f"{what} {name!r}: use letters, digits, '.', '_', '-' and spaces (bad part {bad[0]!r})")
    return "/".join(parts)
