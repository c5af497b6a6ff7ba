"""Finding and checking FLUX files: a diffusers pipeline folder, ComfyUI / BFL single files, or a
ComfyUI install's model folders, plus the tokenizer folders. Every file is checked cheaply
(safetensors header, size, key layout, shapes against the config) BEFORE any weights are read;
the result is a `FluxFiles` record that `build` turns into models.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .configs import (
    _model_config,
    _read_json,
    _resolve_transformer_config,
    _sidecar_section,
    _text_config_single,
    _transformer_shapes,
    bundled_config,
)
from .convert import (
    _BFL_MARKER,
    _DIFFUSERS_MARKER,
    _guess_architecture,
    _strip_prefix,
    bfl_to_diffusers_transformer,
    bfl_to_diffusers_vae,
)
from .weights import MissingModelFile, ModelFileError, SafetensorsInfo, check_safetensors, file_fingerprint


# Optional bundled tokenizer copy: core/models/tokenizers/{clip_l,t5xxl}/ (not shipped by default).
BUNDLED_TOKENIZERS = Path(__file__).resolve().parent / "tokenizers"

# ComfyUI model folders, in the order ComfyUI itself searches them.
COMFY_DIRS = {
    "transformer": ("diffusion_models", "unet"),
    "text_encoder": ("text_encoders", "clip"),
    "vae": ("vae",),
}
# Tokenizer folders inside a ComfyUI install (relative to its root).
COMFY_TOKENIZER_DIRS = {
    "clip_l": ("comfy/sd1_tokenizer",),
    "t5xxl": ("comfy/text_encoders/t5_tokenizer", "comfy/t5_tokenizer"),
}
DIFFUSERS_PARTS = {
    "transformer": "FLUX transformer (FluxTransformer2DModel)",
    "text_encoder": "CLIP-L text encoder (CLIPTextModel)",
    "text_encoder_2": "T5-XXL text encoder (T5EncoderModel)",
    "tokenizer": "CLIP tokenizer",
    "tokenizer_2": "T5 tokenizer",
    "vae": "autoencoder (AutoencoderKL, 16 latent channels)",
    "scheduler": "scheduler config (FlowMatchEulerDiscreteScheduler)",
}


@dataclass
class FluxFiles:
    """Where every FLUX component lives, after checking; nothing is loaded yet.

    route: "diffusers" (a pipeline folder) or "single_file" (ComfyUI / BFL files).
    Per-component entries are paths; configs are plain dicts in diffusers form.
    """

    route: str
    transformer: list[Path]
    transformer_layout: str  # "bfl" | "diffusers"
    transformer_config: dict
    clip: list[Path] | None
    clip_config: dict | None
    t5: list[Path] | None
    t5_config: dict | None
    clip_tokenizer: Path | None
    t5_tokenizer: Path | None
    vae: list[Path] | None
    vae_layout: str | None
    vae_config: dict | None
    scheduler_config: dict
    variant: str  # "flux-dev", "flux-schnell" or "custom"
    root: Path | None = None
    _ids: dict = field(default_factory=dict, repr=False)

    @property
    def max_sequence_length(self) -> int:
        """T5 prompt length: FLUX.1-dev 512, schnell 256; a smaller `model_max_length` in the T5
        tokenizer's config wins (small models trained on short prompts, e.g. tiny-shapes)."""
        full = 256 if self.variant == "flux-schnell" else 512
        cfg = self.t5_tokenizer / "tokenizer_config.json" if self.t5_tokenizer else None
        if cfg is not None and cfg.is_file():
            try:
                n = json.loads(cfg.read_text()).get("model_max_length")
            except (OSError, ValueError):
                n = None
            if isinstance(n, int) and 0 < n < full:
                return n
        return full

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel: 2^(autoencoder levels - 1), 8 for FLUX.1."""
        return 2 ** (len((self.vae_config or {}).get("block_out_channels", [0] * 4)) - 1)

    def transformer_identity(self) -> dict:
        """Identity of the base transformer weights (written into LoRA files)."""
        if "transformer" not in self._ids:
            self._ids["transformer"] = {
                "variant": self.variant,
                "route": self.route,
                "name": self.root.name if self.route == "diffusers" and self.root else self.transformer[0].name,
                "fingerprint": file_fingerprint(self.transformer),
            }
        return dict(self._ids["transformer"])

    def text_encoder_identity(self) -> str:
        """Content identity of CLIP + T5 + tokenizers (the embedding-cache key)."""
        if "text" not in self._ids:
            self._require_text()
            tok_files = sorted(
                q for d in (self.clip_tokenizer, self.t5_tokenizer) for q in Path(d).rglob("*") if q.is_file()
            )
            self._ids["text"] = file_fingerprint([*self.clip, *self.t5, *tok_files])
        return self._ids["text"]

    def check_complete(self) -> "FluxFiles":
        """Everything a training run needs: text encoders with tokenizers, and the autoencoder."""
        self._require_text()
        self._require_vae()
        return self

    def _require_text(self):
        if not (self.clip and self.t5 and self.clip_tokenizer and self.t5_tokenizer):
            raise MissingModelFile(
                "text encoders were not given: pass clip_l / t5xxl files and tokenizer folders "
                "(or use a diffusers FLUX folder)"
            )

    def _require_vae(self):
        if not self.vae:
            raise MissingModelFile("no autoencoder was given: pass the FLUX ae.safetensors (ComfyUI models/vae)")


def _diffusers_weights(folder: Path, part: str, stem: str) -> list[Path]:
    """Weight files of one diffusers component (single file or sharded with an index)."""
    what = f"{DIFFUSERS_PARTS.get(part, part)} in {folder.parent}"
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        idx = _read_json(index, what)
        names = sorted(set((idx.get("weight_map") or {}).values()))
        if not names:
            raise ModelFileError(f"{what}: {index} has no weight_map")
        files = [folder / n for n in names]
    else:
        raise MissingModelFile(
            f"{what}: no weights found; expected {single.name} or {index.name} in {folder}"
        )
    for f in files:
        check_safetensors(f, what)
    return files


def _check_tokenizer_dir(d: Path, what: str, kind: str) -> Path:
    if not d.is_dir():
        raise MissingModelFile(f"{what}: folder not found: {d}")
    names = {p.name for p in d.iterdir()}
    ok = "tokenizer.json" in names or (
        {"vocab.json", "merges.txt"} <= names if kind == "clip" else "spiece.model" in names
    )
    if not ok:
        need = "vocab.json + merges.txt (or tokenizer.json)" if kind == "clip" else "spiece.model or tokenizer.json"
        raise MissingModelFile(f"{what}: {d} holds no tokenizer files; expected {need}, found {sorted(names)}")
    return d


def _resolve_local(path: str | os.PathLike) -> Path:
    """A local folder; a hub id ("owner/name") resolves only from the local HF cache."""
    p = Path(path).expanduser()
    if p.exists():
        return p
    s = str(path)
    if re.fullmatch(r"[\w.-]+/[\w.-]+", s):
        try:
            from huggingface_hub import snapshot_download

            # local_files_only: a cache lookup, never a download (HF_HUB_OFFLINE or not).
            return Path(snapshot_download(s, local_files_only=True))
        except Exception:
            from huggingface_hub.constants import HF_HUB_CACHE

            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            raise MissingModelFile(
                f"{s!r} is neither a local folder nor in the local Hugging Face cache ({HF_HUB_CACHE}); "
                f"nothing is downloaded{' (HF_HUB_OFFLINE is set)' if offline else ''}. "
                "Download the FLUX folder first and pass its path."
            ) from None
    raise MissingModelFile(f"FLUX model folder not found: {p}")


def flux_files_from_diffusers(folder: str | os.PathLike, parts: Iterable[str] | None = None) -> FluxFiles:
    """Check a diffusers FLUX pipeline folder (FLUX.1-dev layout) and return its `FluxFiles`.

    parts: the components needed (default all of transformer, text_encoder, text_encoder_2,
    tokenizer, tokenizer_2, vae, scheduler); missing parts you did not ask for stay None.
    """
    root = _resolve_local(folder)
    if not root.is_dir():
        raise ModelFileError(f"expected a diffusers FLUX folder, got a file: {root}")
    want = set(parts or DIFFUSERS_PARTS)
    unknown = want - set(DIFFUSERS_PARTS)
    if unknown:
        raise ValueError(f"unknown FLUX folder parts {sorted(unknown)}; choose from {list(DIFFUSERS_PARTS)}")
    absent = [p for p in DIFFUSERS_PARTS if p in want and not (root / p).is_dir()]
    if absent:
        raise MissingModelFile(
            f"FLUX folder {root} is missing {', '.join(f'{p}/ ({DIFFUSERS_PARTS[p]})' for p in absent)}; "
            f"expected the diffusers FLUX.1-dev layout with {', '.join(p + '/' for p in DIFFUSERS_PARTS)}"
        )

    def cfg(part: str, name: str = "config.json") -> dict:
        return _read_json(root / part / name, f"{DIFFUSERS_PARTS[part]} config")

    tcfg = _model_config(cfg("transformer"))
    files = _diffusers_weights(root / "transformer", "transformer", "diffusion_pytorch_model")
    _check_transformer_shapes(files, tcfg, "diffusers")
    clip = t5 = vae = None
    ccfg = t5cfg = vcfg = None
    if "text_encoder" in want:
        ccfg = _model_config(cfg("text_encoder"))
        clip = _diffusers_weights(root / "text_encoder", "text_encoder", "model")
    if "text_encoder_2" in want:
        t5cfg = _model_config(cfg("text_encoder_2"))
        t5 = _diffusers_weights(root / "text_encoder_2", "text_encoder_2", "model")
    if "vae" in want:
        vcfg = _model_config(cfg("vae"))
        vae = _diffusers_weights(root / "vae", "vae", "diffusion_pytorch_model")
        if vcfg.get("latent_channels") != tcfg.get("in_channels", 64) // 4:
            raise ModelFileError(
                f"{root / 'vae' / 'config.json'}: latent_channels={vcfg.get('latent_channels')}, "
                f"the transformer needs {tcfg.get('in_channels', 64) // 4}"
            )
    tok1 = _check_tokenizer_dir(root / "tokenizer", "CLIP tokenizer", "clip") if "tokenizer" in want else None
    tok2 = _check_tokenizer_dir(root / "tokenizer_2", "T5 tokenizer", "t5") if "tokenizer_2" in want else None
    sched = (
        _model_config(cfg("scheduler", "scheduler_config.json")) if "scheduler" in want else {}
    )
    variant = "flux-dev" if tcfg.get("guidance_embeds") else "flux-schnell"
    if tcfg.get("num_layers") != 19 or tcfg.get("attention_head_dim") != 128:
        variant = "custom"
    return FluxFiles(
        route="diffusers", transformer=files, transformer_layout="diffusers", transformer_config=tcfg,
        clip=clip, clip_config=ccfg, t5=t5, t5_config=t5cfg, clip_tokenizer=tok1, t5_tokenizer=tok2,
        vae=vae, vae_layout="diffusers" if vae else None, vae_config=vcfg, scheduler_config=sched,
        variant=variant, root=root,
    )


def _check_transformer_shapes(files: list[Path], cfg: Mapping, layout: str) -> None:
    infos = [check_safetensors(f, "FLUX transformer") for f in files]
    shapes: dict[str, tuple[int, ...]] = {}
    for info in infos:
        shapes.update(info.shapes())
    src = ", ".join(str(f) for f in files)
    if layout == "diffusers":
        expected = _transformer_shapes(cfg)
        missing = sorted(set(expected) - set(shapes))
        if _DIFFUSERS_MARKER not in shapes:
            raise ModelFileError(
                f"{src}: not a FLUX transformer in diffusers layout (looks like {_guess_architecture(shapes)})"
            )
        bad = [(k, shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]]
        if missing or bad:
            raise ModelFileError(
                f"{src}: weights do not match the transformer config "
                f"(missing {missing[:3]}, wrong shapes {bad[:3]} as (name, file, expected))"
            )


def _find_in(dirs: Iterable[Path], name: str | os.PathLike, what: str) -> Path:
    p = Path(name).expanduser()
    if p.is_absolute() or p.exists():
        if not p.is_file():
            raise MissingModelFile(f"{what}: file not found: {p}")
        return p
    looked = []
    for d in dirs:
        q = d / name
        looked.append(str(d))
        if q.is_file():
            return q
    raise MissingModelFile(f"{what}: {name} not found; looked in {looked}")


def _comfy_root_of(path: Path) -> Path | None:
    for parent in path.resolve().parents:
        if parent.name == "models" and (parent.parent / "comfy").is_dir():
            return parent.parent
    mod = sys.modules.get("comfy")  # only if ComfyUI is already running us; never imported here
    if mod is not None and getattr(mod, "__file__", None):
        return Path(mod.__file__).resolve().parent.parent
    return None


def _find_tokenizer(kind: str, tokenizers: Path | None, comfy_root: Path | None) -> Path:
    """Tokenizer folder: explicit > bundled copy > the ComfyUI install."""
    names = {
        "clip_l": ("clip_l", "tokenizer", "sd1_tokenizer"),
        "t5xxl": ("t5xxl", "tokenizer_2", "t5_tokenizer"),
    }[kind]
    tk = "clip" if kind == "clip_l" else "t5"
    what = "CLIP-L tokenizer" if kind == "clip_l" else "T5-XXL tokenizer"
    candidates: list[Path] = []
    if tokenizers is not None:
        candidates += [tokenizers / n for n in names]
    candidates += [BUNDLED_TOKENIZERS / kind]
    if comfy_root is not None:
        candidates += [comfy_root / rel for rel in COMFY_TOKENIZER_DIRS[kind]]
    for c in candidates:
        if c.is_dir():
            return _check_tokenizer_dir(c, what, tk)
    raise MissingModelFile(
        f"{what} not found; looked in {[str(c) for c in candidates]}. Pass tokenizers= (a folder with "
        f"{names[0]}/ or {names[1]}/ inside), or comfyui_root= (ComfyUI ships them in "
        f"{COMFY_TOKENIZER_DIRS[kind][0]}/)"
    )


# Suffixes that identify each text encoder regardless of the key prefix ('text_model.' in
# transformers 4 / ComfyUI files, none in transformers 5, 'cond_stage_model.transformer.' ...).
_TEXT_MARKERS = {
    "clip_l": ("embeddings.token_embedding.weight", "final_layer_norm.weight"),
    "t5xxl": ("encoder.final_layer_norm.weight", "encoder.block.0.layer.0.SelfAttention.q.weight"),
}


def _text_prefix(info: SafetensorsInfo, kind: str) -> None:
    shapes = info.shapes()
    guess = (
        "a CLIP-L text encoder (clip_l.safetensors, text_model.* keys)"
        if kind == "clip_l"
        else "a T5 encoder (t5xxl_fp16.safetensors, encoder.block.* keys)"
    )
    if not all(any(k.endswith(m) for k in shapes) for m in _TEXT_MARKERS[kind]):
        raise ModelFileError(f"{info.path}: expected {guess}; this file looks like {_guess_architecture(shapes)}")


def flux_files_from_single_files(
    transformer: str | os.PathLike,
    clip_l: str | os.PathLike | None = None,
    t5xxl: str | os.PathLike | None = None,
    vae: str | os.PathLike | None = None,
    tokenizers: str | os.PathLike | None = None,
    comfyui_root: str | os.PathLike | None = None,
    config: str | Mapping | os.PathLike | None = None,
) -> FluxFiles:
    """Check ComfyUI-style single files and return their `FluxFiles`.

    transformer: FLUX transformer safetensors in BFL key layout (optionally prefixed with
    'model.diffusion_model.', bf16/fp16/fp32 or fp8-stored) or in diffusers layout.
    clip_l / t5xxl: text encoders (HF key layout, as ComfyUI's clip_l / t5xxl files).
    vae: BFL ae.safetensors. Configs: `config` (bundled name, dict or JSON path) >
    `<file>.json` beside a file > the bundled FLUX.1-dev / schnell configs matched by shape.
    Tokenizers: `tokenizers` folder > bundled copy > the ComfyUI install (comfyui_root,
    or found from the file's models/ folder).
    """
    tpath = Path(transformer).expanduser()
    info = check_safetensors(tpath, "FLUX transformer")
    shapes = info.shapes()
    if any(k.endswith(_BFL_MARKER) for k in shapes):
        layout = "bfl"
        pre = _strip_prefix(shapes, _BFL_MARKER)
        bshapes = {k[len(pre):]: v for k, v in shapes.items() if k.startswith(pre)}
        needed = ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight", "final_layer.linear.weight",
                  "double_blocks.0.img_attn.norm.key_norm.scale")
        gone = [k for k in needed if k not in bshapes]
        if gone:
            raise ModelFileError(f"{tpath}: BFL FLUX transformer is missing {gone}")
        tcfg, variant = _resolve_transformer_config(tpath, bshapes, config)
        target = _transformer_shapes(tcfg)
        # Dry-run the conversion on shapes only: architecture mismatches fail before any load.
        fake = {k: torch.empty(v, device="meta") for k, v in bshapes.items()}
        bfl_to_diffusers_transformer(fake, target, source=str(tpath))
    elif _DIFFUSERS_MARKER in shapes:
        layout = "diffusers"
        try:
            tcfg, variant = _resolve_transformer_config(tpath, shapes, config, layout="diffusers")
        except KeyError as e:
            raise ModelFileError(f"{tpath}: diffusers-layout FLUX transformer is missing {e}") from None
        _check_transformer_shapes([tpath], tcfg, "diffusers")
    else:
        raise ModelFileError(
            f"{tpath}: not a FLUX.1 transformer (no double_blocks.* tensors); it looks like "
            f"{_guess_architecture(shapes)}. Expected a FLUX.1-dev/schnell file such as flux1-dev.safetensors "
            "from ComfyUI models/diffusion_models or models/unet"
        )
    root = Path(comfyui_root).expanduser() if comfyui_root else _comfy_root_of(tpath)
    clip = t5 = vae_files = None
    ccfg = t5cfg = vcfg = None
    tok1 = tok2 = None
    tok_dir = Path(tokenizers) if tokenizers else None

    def text_encoder(path, kind: str, what: str):
        """Check one single-file text encoder: (files, config, tokenizer folder)."""
        p = Path(path).expanduser()
        info = check_safetensors(p, what)
        _text_prefix(info, kind)
        return [p], _text_config_single(p, info, kind), _find_tokenizer(kind, tok_dir, root)

    if clip_l is not None:
        clip, ccfg, tok1 = text_encoder(clip_l, "clip_l", "CLIP-L text encoder")
    if t5xxl is not None:
        t5, t5cfg, tok2 = text_encoder(t5xxl, "t5xxl", "T5-XXL text encoder")
    if vae is not None:
        vpath = Path(vae).expanduser()
        vinfo = check_safetensors(vpath, "FLUX autoencoder")
        vshapes = vinfo.shapes()
        vcfg = _sidecar_section(vpath, "vae") or _model_config(bundled_config("flux-vae"))
        vpre = _strip_prefix(vshapes, "decoder.conv_in.weight")
        vshapes = {k[len(vpre):]: v for k, v in vshapes.items() if k.startswith(vpre)}
        if "decoder.conv_in.weight" not in vshapes:
            raise ModelFileError(
                f"{vpath}: not an autoencoder (no decoder.conv_in.weight); it looks like {_guess_architecture(vshapes)}"
            )
        zc = vshapes["decoder.conv_in.weight"][1]
        if zc != vcfg["latent_channels"]:
            raise ModelFileError(
                f"{vpath}: autoencoder with {zc} latent channels; FLUX needs {vcfg['latent_channels']} "
                "(is this an SD/SDXL VAE? use the FLUX ae.safetensors)"
            )
        from diffusers import AutoencoderKL

        with torch.device("meta"):
            target = {k: tuple(v.shape) for k, v in AutoencoderKL.from_config(vcfg).state_dict().items()}
        bfl_to_diffusers_vae({k: torch.empty(v, device="meta") for k, v in vshapes.items()}, target, source=str(vpath))
        vae_files = [vpath]
    sched = dict(bundled_config(variant if variant in ("flux-dev", "flux-schnell") else
                                ("flux-dev" if tcfg.get("guidance_embeds") else "flux-schnell"))["scheduler"])
    return FluxFiles(
        route="single_file", transformer=[tpath], transformer_layout=layout, transformer_config=tcfg,
        clip=clip, clip_config=ccfg, t5=t5, t5_config=t5cfg, clip_tokenizer=tok1, t5_tokenizer=tok2,
        vae=vae_files, vae_layout="bfl" if vae_files else None, vae_config=vcfg,
        scheduler_config=_model_config(sched), variant=variant, root=root,
    )


def flux_files_from_comfyui(
    comfyui_root: str | os.PathLike,
    transformer: str = "flux1-dev.safetensors",
    clip_l: str | None = "clip_l.safetensors",
    t5xxl: str | None = "t5xxl_fp16.safetensors",
    vae: str | None = "ae.safetensors",
    tokenizers: str | os.PathLike | None = None,
    config: str | Mapping | os.PathLike | None = None,
) -> FluxFiles:
    """Find FLUX files by name in a ComfyUI install (models/diffusion_models|unet,
    models/text_encoders|clip, models/vae) and check them; tokenizers from comfy/."""
    root = Path(comfyui_root).expanduser()
    if not (root / "models").is_dir():
        raise MissingModelFile(f"not a ComfyUI folder (no models/ inside): {root}")

    def dirs(kind):
        return [root / "models" / d for d in COMFY_DIRS[kind]]

    return flux_files_from_single_files(
        transformer=_find_in(dirs("transformer"), transformer, "FLUX transformer"),
        clip_l=_find_in(dirs("text_encoder"), clip_l, "CLIP-L text encoder") if clip_l else None,
        t5xxl=_find_in(dirs("text_encoder"), t5xxl, "T5-XXL text encoder") if t5xxl else None,
        vae=_find_in(dirs("vae"), vae, "FLUX autoencoder") if vae else None,
        tokenizers=tokenizers,
        comfyui_root=root,
        config=config,
    )


def find_flux_files(path: str | os.PathLike, **single_file_kwargs) -> FluxFiles:
    """A diffusers FLUX folder, or (given a .safetensors path) the single-file route."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors" or p.is_file():
        return flux_files_from_single_files(p, **single_file_kwargs)
    return flux_files_from_diffusers(p)
