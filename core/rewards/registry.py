"""Load rewards by name from a models folder or explicit paths; build weighted RewardSets.

Folder layout (``<models>`` is e.g. ComfyUI's ``models`` folder; ``models_dir`` may point
at ``<models>`` or directly at ``<models>/treerpo_rewards``)::

    <models>/treerpo_rewards/
      hps/
        HPS_v2.1_compressed.pt      xswu/HPSv2 (open_clip ViT-H-14 state dict)
        vocab.json, merges.txt      CLIP BPE files, or open_clip's bpe_simple_vocab_16e6.txt.gz
                                    (optional here if pickscore/processor/ has vocab + merges)
        open_clip_config.json       optional; default open_clip ViT-H-14
      pickscore/
        model/                      yuvalkirstain/PickScore_v1: config.json + model.safetensors
                                    (or pytorch_model.bin)
        processor/                  laion/CLIP-ViT-H-14-laion2B-s32B-b79K small files:
                                    preprocessor_config.json, vocab.json, merges.txt,
                                    tokenizer_config.json, special_tokens_map.json
      imagereward/
        ImageReward.pt              THUDM/ImageReward
        vocab.txt                   google-bert/bert-base-uncased
        med_config.json             optional; THUDM/ImageReward (BERT settings)

Weight-free rewards (jpeg_compressibility, jpeg_incompressibility, brightness, saturation,
colourfulness, shapes*) need no files. Loaded rewards are cached per (files, device, dtype, options)
and reused: loading the same reward twice returns the same object.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .base import Reward, RewardSet
from .hps import CONVERTED_SUFFIX, HPS_CHECKPOINT_NAME, load_hps
from .imagereward import IMAGEREWARD_CHECKPOINT_NAME, load_imagereward
from .pickscore import load_pickscore
from .shapes import ShapesColourReward, ShapesCrispAskedReward, ShapesCrispReward, ShapesLayoutReward, ShapesReward
from .simple import Brightness, Colourfulness, JPEGCompressibility, JPEGIncompressibility, Saturation
from .text import BERT_VOCAB_FILE, CLIP_TOKENIZER_FILES, OPEN_CLIP_VOCAB_FILE, has_clip_bpe_files

logger = logging.getLogger(__name__)

__all__ = [
    "MODELS_SUBDIR",
    "MODEL_REWARDS",
    "SIMPLE_REWARDS",
    "available_rewards",
    "canonical_reward_name",
    "rewards_root",
    "expected_files",
    "check_rewards",
    "load_reward",
    "parse_reward_spec",
    "load_rewards",
    "clear_reward_cache",
]

MODELS_SUBDIR = "treerpo_rewards"
MODELS_DIR_ENV = "TREERPO_MODELS_DIR"
MODEL_REWARDS = ("hps", "pickscore", "imagereward")
SIMPLE_REWARDS = {
    "jpeg_compressibility": JPEGCompressibility,
    "jpeg_incompressibility": JPEGIncompressibility,
    "brightness": Brightness,
    "saturation": Saturation,
    "colourfulness": Colourfulness,
    "shapes": ShapesReward,  # prompt fidelity in the shapes world (core/shapes)
    "shapes-layout": ShapesLayoutReward,  # its colour, count and position parts
    "shapes-colour": ShapesColourReward,  # its colour part
    "shapes-crisp": ShapesCrispReward,  # how cleanly objects are drawn (prompt-independent)
    "shapes-crisp-asked": ShapesCrispAskedReward,  # ... in the colours the prompt asks for
}
_ALIASES = {
    "hpsv2": "hps", "hpsv2.1": "hps", "hps_v2.1": "hps", "hps-v2.1": "hps", "hpsv21": "hps",
    "pick": "pickscore", "pick_score": "pickscore",
    "image_reward": "imagereward", "image-reward": "imagereward", "ir": "imagereward",
    "jpeg": "jpeg_compressibility", "compressibility": "jpeg_compressibility",
    "incompressibility": "jpeg_incompressibility", "colorfulness": "colourfulness", "shapes-color": "shapes-colour",
}

_EXPECTED = {
    "hps": f"{HPS_CHECKPOINT_NAME}, {' + '.join(CLIP_TOKENIZER_FILES)} or {OPEN_CLIP_VOCAB_FILE} "
           "(or vocab + merges in pickscore/processor/), "
           "optional open_clip_config.json",
    "pickscore": "model/{config.json, model.safetensors or pytorch_model.bin}, "
                 "processor/{preprocessor_config.json, vocab.json, merges.txt, tokenizer_config.json}",
    "imagereward": f"{IMAGEREWARD_CHECKPOINT_NAME}, {BERT_VOCAB_FILE}, optional med_config.json",
}

_CACHE: dict[tuple, Reward] = {}
_LOCK = threading.Lock()


def available_rewards() -> list[str]:
    """Canonical names accepted by `load_reward`."""
    return list(MODEL_REWARDS) + list(SIMPLE_REWARDS)


def canonical_reward_name(name: str) -> str:
    """Map a name or alias (case-insensitive) to its canonical reward name."""
    n = str(name).strip().lower()
    n = _ALIASES.get(n, n)
    if n not in MODEL_REWARDS and n not in SIMPLE_REWARDS:
        raise ValueError(f"unknown reward {name!r}; available: {available_rewards()} "
                         f"(aliases: {sorted(_ALIASES)})")
    return n


def expected_files(name: str) -> str:
    """Human-readable list of the files reward `name` needs in its folder ('' if none)."""
    return _EXPECTED.get(canonical_reward_name(name), "")


def rewards_root(models_dir: str | os.PathLike | None) -> Path:
    """The ``treerpo_rewards`` folder for `models_dir` (or $TREERPO_MODELS_DIR)."""
    if models_dir is None:
        models_dir = os.environ.get(MODELS_DIR_ENV)
        if not models_dir:
            raise ValueError(f"no models folder given: pass models_dir=... (treerpo train: --reward-models-dir) "
                             f"or set ${MODELS_DIR_ENV}, or give an explicit path for the reward")
    d = Path(models_dir).expanduser()
    if d.name == MODELS_SUBDIR:
        return d
    return d / MODELS_SUBDIR


def _missing(name: str, folder: Path, detail: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"reward {name!r}: {detail}. Expected in {folder}: {_EXPECTED[name]}. "
        "See docs/rewards.md for where to obtain each file."
    )


def _stamp(paths: Iterable[Path | None]) -> tuple:
    """Identity of the files a reward was loaded from (a changed file means a reload)."""
    out = []
    for p in paths:
        if p is None:
            out.append(None)
        elif p.is_dir():
            # Stamp the files inside, not the folder: our converted-weights cache written
            # into the folder must not invalidate the entry.
            files = sorted(f for f in p.iterdir() if f.is_file()
                           and not f.name.endswith((".tmp", CONVERTED_SUFFIX)))
            out.append((str(p.resolve()), tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files)))
        else:
            st = p.stat()
            out.append((str(p.resolve()), st.st_mtime_ns, st.st_size))
    return tuple(out)


def _checkpoint_and_folder(name: str, filename: str, path: Path | None, root: Path | None) -> tuple[Path, Path]:
    """An explicit checkpoint file, or ``filename`` in the given folder / <root>/<name>."""
    if path is not None and path.is_file():
        return path, path.parent
    folder = path if path is not None else root / name
    ckpt = folder / filename
    if not ckpt.is_file():
        raise _missing(name, folder, f"{ckpt} not found")
    return ckpt, folder


def _resolve_hps(path: Path | None, root: Path | None) -> dict:
    ckpt, folder = _checkpoint_and_folder("hps", HPS_CHECKPOINT_NAME, path, root)
    candidates = [folder]
    if root is not None:
        candidates.append(root / "pickscore" / "processor")
    # Only the vocabulary is read from the fallback folder (load_hps ignores its settings).
    tok = next((c for c in candidates if has_clip_bpe_files(c)), None)
    if tok is None:
        raise _missing("hps", folder, f"no CLIP tokenizer files {list(CLIP_TOKENIZER_FILES)} (or "
                                      f"{OPEN_CLIP_VOCAB_FILE}) in {' or '.join(str(c) for c in candidates)}")
    cfg = folder / "open_clip_config.json"
    return {"checkpoint": ckpt, "tokenizer_dir": tok, "open_clip_config": cfg if cfg.is_file() else None}


def _resolve_pickscore(path: Path | None, root: Path | None) -> dict:
    folder = path if path is not None else root / "pickscore"
    if not folder.is_dir():
        raise _missing("pickscore", folder, f"folder {folder} not found")
    model_dir = folder / "model" if (folder / "model").is_dir() else folder
    proc_dir = folder / "processor" if (folder / "processor").is_dir() else folder
    if not (model_dir / "config.json").is_file():
        raise _missing("pickscore", folder, f"{model_dir / 'config.json'} not found")
    if not has_clip_bpe_files(proc_dir, hf_only=True):
        raise _missing("pickscore", folder, f"no {list(CLIP_TOKENIZER_FILES)} in {proc_dir}")
    return {"model_dir": model_dir, "processor_dir": proc_dir}


def _resolve_imagereward(path: Path | None, root: Path | None) -> dict:
    ckpt, folder = _checkpoint_and_folder("imagereward", IMAGEREWARD_CHECKPOINT_NAME, path, root)
    vocab = folder / BERT_VOCAB_FILE
    if not vocab.is_file():
        raise _missing("imagereward", folder, f"{vocab} not found (bert-base-uncased vocab)")
    med = folder / "med_config.json"
    return {"checkpoint": ckpt, "vocab_file": vocab, "med_config": med if med.is_file() else None}


def _reward_files(n: str, models_dir, path) -> dict:
    """The files reward ``n`` (a canonical name) loads, found and checked to exist; {} for a
    weight-free reward. Nothing is read."""
    if n in SIMPLE_REWARDS:
        return {}
    p = Path(path).expanduser() if path is not None else None
    root = rewards_root(models_dir) if (p is None or models_dir is not None or os.environ.get(MODELS_DIR_ENV)) else None
    if p is not None and not p.exists():
        raise _missing(n, p if p.suffix == "" else p.parent, f"explicit path {p} does not exist")
    return {"hps": _resolve_hps, "pickscore": _resolve_pickscore, "imagereward": _resolve_imagereward}[n](p, root)


def check_rewards(spec, models_dir: str | os.PathLike | None = None, *,
                  paths: Mapping[str, str | os.PathLike] | None = None) -> list[tuple[str, float]]:
    """What `load_rewards` checks before it loads anything: the spec parses, every name is known and
    every model reward's files are there (ValueError / FileNotFoundError naming the culprit).
    Returns the parsed [(canonical name, weight)]."""
    parsed = parse_reward_spec(spec)
    paths = {canonical_reward_name(k): v for k, v in (paths or {}).items()}
    for n, _ in parsed:
        _reward_files(n, models_dir, paths.get(n))
    return parsed


def load_reward(name: str, models_dir: str | os.PathLike | None = None, *, path: str | os.PathLike | None = None,
                device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                trust_checkpoint: bool = False, batch_size: int | None = None, use_cache: bool = True,
                **options) -> Reward:
    """Load one reward by name.

    name: "hps", "pickscore", "imagereward" or a weight-free reward (see available_rewards()).
    models_dir: folder holding ``treerpo_rewards/`` (or that folder itself); default
      $TREERPO_MODELS_DIR. Not needed for weight-free rewards or when `path` is given.
    path: explicit location overriding the layout: the reward's folder (same layout as its
      ``treerpo_rewards/<name>/`` folder) or, for hps / imagereward, the checkpoint file
      itself (tokenizer files beside it).
    trust_checkpoint: allow torch.load(weights_only=False) for a file that needs it (logged).
    options: passed to the model loader (hps: antialias, cache_converted, open_clip_config;
      imagereward: vision_heads, med_config; jpeg: quality).
    """
    n = canonical_reward_name(name)
    dev = torch.device(device)
    files = _reward_files(n, models_dir, path)
    if n in SIMPLE_REWARDS:
        key = (n, None, str(dev), str(dtype), batch_size, tuple(sorted(options.items())))
    else:
        stamp = _stamp(v if isinstance(v, Path) else None for v in files.values())
        key = (n, stamp, str(dev), str(dtype), bool(trust_checkpoint), batch_size,
               tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _LOCK:
        if use_cache and key in _CACHE:
            return _CACHE[key]
        if n in SIMPLE_REWARDS:
            reward = SIMPLE_REWARDS[n](device=dev, dtype=dtype, batch_size=batch_size, **options)
        elif n == "hps":
            opts = dict(options)
            cfg = opts.pop("open_clip_config", files["open_clip_config"])
            reward = load_hps(files["checkpoint"], files["tokenizer_dir"], open_clip_config=cfg, device=dev,
                              dtype=dtype, trust_checkpoint=trust_checkpoint, batch_size=batch_size, **opts)
        elif n == "pickscore":
            reward = load_pickscore(files["model_dir"], files["processor_dir"], device=dev, dtype=dtype,
                                    batch_size=batch_size, **options)
        else:
            opts = dict(options)
            med = opts.pop("med_config", files["med_config"])
            reward = load_imagereward(files["checkpoint"], files["vocab_file"], med_config=med, device=dev,
                                      dtype=dtype, trust_checkpoint=trust_checkpoint, batch_size=batch_size,
                                      **opts)
        logger.info("loaded reward %s on %s (%s)", n, dev, dtype)
        if use_cache:
            _CACHE[key] = reward
        return reward


def clear_reward_cache() -> None:
    """Forget every cached reward (their memory is freed once nothing else holds them)."""
    with _LOCK:
        _CACHE.clear()


def parse_reward_spec(spec) -> list[tuple[str, float]]:
    """Parse a reward specification into [(canonical name, weight)].

    Accepted: "hps:1.0, pickscore:0.5, imagereward" (weight defaults to 1; ':' or '='),
    a list of names or (name, weight) pairs, or a {name: weight} mapping.
    """
    items: list[tuple[str, float]] = []
    if isinstance(spec, str):
        parts = [s.strip() for s in spec.replace(";", ",").replace("\n", ",").split(",")]
        for part in parts:
            if not part:
                continue
            sep = ":" if ":" in part else ("=" if "=" in part else None)
            if sep is None:
                items.append((part, 1.0))
                continue
            name, w = part.split(sep, 1)
            try:
                items.append((name.strip(), float(w)))
            except ValueError:
                raise ValueError(f"reward spec {spec!r}: weight {w.strip()!r} of {name.strip()!r} "
                                 "is not a number") from None
    elif isinstance(spec, Mapping):
        items = [(str(k), float(v)) for k, v in spec.items()]
    elif isinstance(spec, Sequence):
        for s in spec:
            if isinstance(s, str):
                items.append((s, 1.0))
            elif isinstance(s, Sequence) and len(s) == 2:
                items.append((str(s[0]), float(s[1])))
            else:
                raise ValueError(f"reward spec entry {s!r}: expected a name or a (name, weight) pair")
    else:
        raise TypeError(f"reward spec must be a str, list or dict, got {type(spec).__name__}")
    if not items:
        raise ValueError(f"reward spec {spec!r} names no reward")
    out = [(canonical_reward_name(n), w) for n, w in items]
    names = [n for n, _ in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"reward spec {spec!r} names {dupes} more than once")
    return out


def load_rewards(spec, models_dir: str | os.PathLike | None = None, *,
                 paths: Mapping[str, str | os.PathLike] | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, trust_checkpoint: bool = False, batch_size: int | None = None,
                 options: Mapping[str, Mapping] | None = None, use_cache: bool = True) -> RewardSet:
    """Build a weighted RewardSet from a spec such as "hps:1, pickscore:1, imagereward:1".

    paths: {reward name: explicit folder or checkpoint} overriding the models folder layout.
    options: {reward name: {option: value}} passed to that reward's loader.
    """
    parsed = check_rewards(spec, models_dir, paths=paths)  # every reward's files before any is loaded
    paths = {canonical_reward_name(k): v for k, v in (paths or {}).items()}
    options = {canonical_reward_name(k): dict(v) for k, v in (options or {}).items()}
    rewards = [load_reward(n, models_dir, path=paths.get(n), device=device, dtype=dtype,
                           trust_checkpoint=trust_checkpoint, batch_size=batch_size, use_cache=use_cache,
                           **options.get(n, {}))
               for n, _ in parsed]
    return RewardSet(rewards, [w for _, w in parsed])
