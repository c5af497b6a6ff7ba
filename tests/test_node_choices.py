"""The nodes' pure decisions (nodes/choices.py), called directly as ComfyUI's own unit tests
call node code: no ComfyUI runtime, and importing them must not import comfy_api."""

import subprocess
import sys

import pytest

from treerpo.nodes.choices import (
    DIFFUSERS, NONE, SHAPES, SINGLE, TINY, TUNABLES, model_source, safe_relative, settings_config,
)


def test_importing_the_choices_imports_no_comfyui():
    code = "import sys, treerpo.nodes.choices; print(sorted(m for m in sys.modules if m.startswith('comfy')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class FakeFolders:
    """ComfyUI's folder_paths over a temporary models folder."""

    def __init__(self, root):
        self.root = root

    def get_folder_paths(self, kind):
        return [str(self.root / kind)]

    def get_full_path(self, kind, name):
        p = self.root / kind / name
        return str(p) if p.is_file() else None


@pytest.fixture
def folders(tmp_path):
    for kind, name in (("diffusion_models", "flux1-dev.safetensors"), ("text_encoders", "clip_l.safetensors"),
                       ("text_encoders", "t5xxl.safetensors"), ("vae", "ae.safetensors")):
        (tmp_path / kind).mkdir(exist_ok=True)
        (tmp_path / kind / name).write_bytes(b"")
    (tmp_path / "diffusers" / "flux-dev").mkdir(parents=True)
    (tmp_path / "diffusers" / "flux-dev" / "model_index.json").write_text("{}")
    (tmp_path / "diffusers" / "half-copied").mkdir()
    return FakeFolders(tmp_path)


def test_model_source_resolves_each_route(folders):
    files = ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl.safetensors", "ae.safetensors")
    assert model_source(SHAPES, NONE, NONE, NONE, NONE, folders).kind == "shapes"
    assert model_source(TINY, NONE, NONE, NONE, NONE, folders).kind == "tiny"
    d = model_source(DIFFUSERS + "flux-dev", NONE, NONE, NONE, NONE, folders)
    assert d.kind == "diffusers" and d.folder == folders.root / "diffusers" / "flux-dev"
    s = model_source(SINGLE, *files, folders)
    assert s.kind == "single" and s.files == tuple(
        str(folders.root / k / n) for k, n in zip(("diffusion_models", "text_encoders", "text_encoders", "vae"), files))


@pytest.mark.parametrize("choice, files, message", [
    (DIFFUSERS + "half-copied", None, "diffusers folder 'half-copied' (with model_index.json) not found"),
    (DIFFUSERS + "nowhere", None, "'nowhere'"),
    ("flux-schnell", None, "unknown model choice 'flux-schnell'"),
    (SINGLE, (NONE, "clip_l.safetensors", "t5xxl.safetensors", "ae.safetensors"),
     "transformer: choose a file from models/diffusion_models"),
    (SINGLE, ("flux1-dev.safetensors", "clip_l.safetensors", "gone.safetensors", "ae.safetensors"),
     "t5xxl: 'gone.safetensors' not found in models/text_encoders"),
    (SINGLE, ("flux1-dev.safetensors", "clip_l.safetensors", "t5xxl.safetensors", NONE),
     "vae: choose a file from models/vae"),
])
def test_model_source_names_the_missing_input(folders, choice, files, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_source(choice, *(files or (NONE,) * 4), folders)


WIDGETS = dict(preset="dynamic-treerpo", branching="", group_size=0, window_mode="preset", clip_reward="preset",
               resolution=64, seed=3)


def test_settings_from_the_widgets():
    cfg, res = settings_config(**WIDGETS)
    assert res == 64 and cfg.seed == 3 and cfg.branching == (2, 2, 2, 1) and cfg.lr == 1.5e-4  # the preset
    cfg, _ = settings_config(**dict(WIDGETS, branching="8, 1,1,1", window_mode="frozen"), num_steps=8,
                             learning_rate=1e-3, step_per_layer=0, compress_ratio=-1, noise_level=-1)
    assert (cfg.branching, cfg.window_mode, cfg.num_steps, cfg.lr, cfg.step_per_layer) == (
        (8, 1, 1, 1), "frozen", 8, 1e-3, False)
    assert cfg.noise_level == 0.7  # -1 keeps the preset's value
    flash, _ = settings_config(**dict(WIDGETS, preset="mixgrpo-flash"), compress_ratio=0)
    assert flash.compress_ratio is None  # 0 turns the compression off
    assert {name for name, *_ in TUNABLES} >= {"num_steps", "learning_rate", "step_per_layer", "sft_lambda"}


def test_more_settings_reach_the_engine_and_win():
    cfg, _ = settings_config(**WIDGETS, sft_lambda=0.5,
                             more_settings="sft_lambda=0.1\nsft_target=best-sample-noised; split_noise=1.5\n\n")
    assert (cfg.sft_lambda, cfg.sft_target, cfg.split_noise) == (0.1, "best-sample-noised", 1.5)


@pytest.mark.parametrize("over, message", [
    (dict(branching="2,two"), "branching '2,two' must be comma-separated integers"),
    (dict(resolution=72), "resolution must be a multiple of 16"),
    (dict(more_settings="nosuch=1"), "unknown setting.*nosuch"),
    (dict(more_settings="split_noise"), "key=value, got 'split_noise'"),
    (dict(more_settings="edge_advantage=mean"), "edge_advantage must be one of"),
    (dict(num_steps=6, window_start=5), "window_start"),
])
def test_bad_settings_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        settings_config(**{**WIDGETS, **over})


@pytest.mark.parametrize("name, ok", [
    ("treerpo/run 1", "treerpo/run 1"), ("./a//b/", "a/b"), ("a\\b", "a/b"),
    ("../x", None), ("/tmp/x", None), ("C:/x", None), ("a/../b", None), ("", None), ("a/$b", None), (".hidden", None),
])
def test_safe_relative(name, ok):
    if ok is None:
        with pytest.raises(ValueError, match="filename_prefix"):
            safe_relative(name, "filename_prefix")
    else:
        assert safe_relative(name, "filename_prefix") == ok
    with pytest.raises(ValueError, match="plain name without '/'"):
        safe_relative("a/b", "run_name", allow_subfolders=False)
