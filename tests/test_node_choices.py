"""The nodes' pure decisions (nodes/choices.py), called directly as ComfyUI's own unit tests
call node code: no ComfyUI runtime, and importing them must not import comfy_api."""

import subprocess
import sys

import pytest

from treerpo.nodes.choices import (
    DIFFUSERS, HELD_OUT, KEEP, NO_STATE, NONE, NOT_CONNECTED, SHAPES, SHAPES_TRAIN, SINGLE, TINY, TUNABLES, TYPED,
    check_combined_weights, check_eval_set, check_prompts, check_reward_weight, check_sampler, check_scorer,
    check_settings, check_trainer, check_widget, given, held_out_count, linked, model_source, progress_caption,
    prompt_list, safe_relative, saved_state, settings_config,
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
    # booleans and None as JSON / YAML write them, as well as Python's spelling
    cfg, _ = settings_config(**WIDGETS, more_settings="step_per_layer=true; sft_decay=TRUE\ncompress_ratio=null")
    assert (cfg.step_per_layer, cfg.sft_decay, cfg.compress_ratio) == (True, True, None)
    cfg, _ = settings_config(**WIDGETS, more_settings="step_per_layer=false; ratio_norm=True")
    assert (cfg.step_per_layer, cfg.ratio_norm) == (False, True)


@pytest.mark.parametrize("over, message", [
    (dict(branching="2,two"), "branching '2,two' must be comma-separated positive integers"),
    (dict(resolution=72), "resolution must be a multiple of 16"),
    (dict(more_settings="nosuch=1"), "unknown setting.*nosuch"),
    (dict(more_settings="split_noise"), "key=value, got 'split_noise'"),
    (dict(more_settings="edge_advantage=mean"), "edge_advantage must be one of"),
    (dict(num_steps=6, window_start=5), "window_start"),
])
def test_bad_settings_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        settings_config(**{**WIDGETS, **over})


# ------------------------------------------------------------------ queue-time checks (validate_inputs)
def _out_of_range(t):
    """A value of tunable ``t`` below its rule (never KEEP) and one above its widget's max."""
    step = 0.5 if t.kind == "float" else 1
    below = t.low if t.strict else t.low - step
    return [below if below != KEEP else KEEP - 1, t.opts["max"] + step]


@pytest.mark.parametrize("t", TUNABLES, ids=[t.name for t in TUNABLES])
def test_each_tunable_is_keep_or_in_its_range(t):
    for bad in _out_of_range(t):
        with pytest.raises(ValueError, match=rf"^{t.name} must be -1 \(keep the preset's value\) or "):
            settings_config(**WIDGETS, **{t.name: bad})
    settings_config(**WIDGETS, **{t.name: KEEP})


@pytest.mark.parametrize("over, message", [
    (dict(learning_rate=-0.5), r"^learning_rate must be -1 \(keep the preset's value\) or > 0, got -0.5$"),
    (dict(learning_rate=0.0), r"learning_rate .* or > 0, got 0$"),  # the engine takes lr 0: nothing would train
    (dict(noise_level=-0.25), r"noise_level must be -1 \(keep the preset's value\) or > 0, got -0.25"),
    (dict(step_per_layer=2), r"step_per_layer must be -1 \(keep the preset's value\) or <= 1, got 2"),
    (dict(clip_eps=float("nan")), r"clip_eps .* got nan"),
    (dict(branching="2 2"), "branching '2 2' must be comma-separated positive integers"),  # not 22
    (dict(branching="2,0,2"), "branching '2,0,2' must be comma-separated positive integers"),
    (dict(preset="mixgrpo", group_size=8, branching="4,1,1,1"), r"set group_size \(8\) or branching .*not both"),
    (dict(resolution=0), "resolution must be a multiple of 16.*got 0"),
    (dict(more_settings="split_noise"), "^more_settings: a setting must read key=value"),
])
def test_bad_widgets_are_named(over, message):
    with pytest.raises(ValueError, match=message):
        settings_config(**{**WIDGETS, **over})


def test_trailing_comma_and_spaces_in_branching_are_fine():
    cfg, _ = settings_config(**dict(WIDGETS, branching=" 4, 2,1,1, "))
    assert cfg.branching == (4, 2, 1, 1)


def test_linked_settings_widgets_are_checked_alone():
    """A widget fed by a link is None at queue time: the others are still checked, the whole config later."""
    check_settings(**dict(WIDGETS, seed=None, preset=None), learning_rate=1e-3)
    with pytest.raises(ValueError, match="learning_rate must be -1"):
        check_settings(**dict(WIDGETS, seed=None), learning_rate=-0.5)
    with pytest.raises(ValueError, match="more_settings: "):
        check_settings(**dict(WIDGETS, resolution=None), more_settings="nokey")
    with pytest.raises(ValueError, match="window_start"):  # nothing linked: the engine sees the whole config
        check_settings(**WIDGETS, num_steps=6, window_start=5)


@pytest.mark.parametrize("value, kw, message", [
    ("fp8", dict(options=["auto", "bfloat16"]), r"weight_dtype 'fp8' is not one of \['auto', 'bfloat16'\]"),
    ("x", dict(options=[str(i) for i in range(20)]), "weight_dtype 'x' is not one of the 20 choices"),
    (-1, dict(low=0, high=5), "weight_dtype must be from 0 to 5, got -1"),
    (0.95, dict(low=0.0, high=0.9), "weight_dtype must be from 0 to 0.9, got 0.95"),
    (float("inf"), dict(low=0.0, high=0.9), "got inf"),
])
def test_check_widget(value, kw, message):
    with pytest.raises(ValueError, match=message):
        check_widget("weight_dtype", value, **kw)
    check_widget("weight_dtype", None, **kw)  # linked: checked where it is made


def test_prompt_lists(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "two.jsonl").write_text('{"prompt": "a cat"}\n\n"a dog"\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"nope": 1}\n')
    assert prompt_list(TYPED, " a\n\n b ", tmp_path) == ["a", "b"]
    assert prompt_list("two.jsonl", "", tmp_path) == ["a cat", "a dog"]
    assert len(prompt_list(SHAPES_TRAIN, "", tmp_path)) == 512
    for file, text, message in ((TYPED, " \n ", "^text holds no prompts"),
                                ("empty.txt", "x", "prompt file 'empty.txt' holds no prompts"),
                                ("bad.jsonl", "", "bad.jsonl line 2 has no \"prompt\" field"),
                                ("gone.txt", "", "prompt file 'gone.txt' not found"),
                                ("../x.txt", "", "not found in ComfyUI's input folder")):
        with pytest.raises(ValueError, match=message):
            check_prompts(file, text, 0.0, tmp_path)
    with pytest.raises(ValueError, match="held_out_fraction 0.9 leaves no training prompt out of 2"):
        check_prompts(TYPED, "a\nb", 0.9, tmp_path)
    assert held_out_count(10, 0.2) == 2
    check_prompts(TYPED, None, 0.9, tmp_path)  # linked text: known at run time
    check_prompts(None, "", 0.0, tmp_path)


def test_reward_weights():
    with pytest.raises(ValueError, match="weight must not be 0"):
        check_reward_weight(0.0)
    check_reward_weight(-0.5)
    with pytest.raises(ValueError, match=r"weights of the connected rewards \(weight_1, weight_3\) are all 0"):
        check_combined_weights((0.0, 1.0, 0.0, 1.0), {"rewards_1", "rewards_3"})  # weight_2 has no rewards_2
    check_combined_weights((0.0, 1.0, 0.0, 1.0), {"rewards_1", "rewards_2"})
    check_combined_weights((0.0, None, 0.0, 1.0), {"rewards_1", "rewards_2"})  # a linked weight: run time


def test_links_each_node_needs():
    assert linked(model=None, run=NOT_CONNECTED) == {"model"}  # queue time: a connected link is None
    assert given(model=object(), run=None) == {"model"}  # run time: an unconnected one is None
    with pytest.raises(ValueError, match=r"connect prompts, settings \(or a run from another trainer step\)"):
        check_trainer({"model", "rewards"})
    check_trainer({"run"})
    with pytest.raises(ValueError, match="connect a model"):
        check_sampler("a cat", set())
    with pytest.raises(ValueError, match="prompt is empty"):
        check_sampler("  ", {"model"})
    check_sampler(None, {"run"})
    for connected, prompt, message in ((set(), "x", "connect a tree or images"),
                                       ({"images"}, "x", "connect settings"),
                                       ({"images", "settings"}, " ", "prompt is empty")):
        with pytest.raises(ValueError, match=message):
            check_scorer(prompt, connected)
    check_scorer("", {"tree"})
    with pytest.raises(ValueError, match="needs prompts: connect Prompts"):
        check_eval_set(HELD_OUT, set())
    check_eval_set(HELD_OUT, {"prompts"})
    check_eval_set("shapes: test set", set())


def test_saved_state(tmp_path):
    good = tmp_path / "treerpo" / "run_00001_.state"
    (good / "step-000002").mkdir(parents=True)
    (good / "step-000002" / "state.json").write_text("{}")
    (good / "latest").write_text("step-000002")
    half = tmp_path / "half.state"
    half.mkdir()
    (half / "latest").write_text("step-000009")
    assert saved_state("treerpo/run_00001_.state", tmp_path) == good.resolve()
    for state, message in ((NO_STATE, "none saved yet"), ("gone.state", "not a saved state folder"),
                           ("../x", "relative name"), ("half.state", "step-000009, which is missing")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            saved_state(state, tmp_path)


def test_progress_caption():
    m = {"iteration": 3, "reward_mean": 0.51234, "reward/shapes/mean": 0.51234, "eps_mean": 0.00213}
    assert progress_caption(m) == "it 3  reward 0.512  eps 0.0021"
    m = {"iteration": 3, "reward_mean": 0.51234, "reward/pickscore/mean": 21.93, "reward/pickscore/std": 1.0,
         "reward/hps/mean": 0.2814, "eps_mean": 0.00213}
    assert progress_caption(m) == "it 3  reward 0.512 (pickscore 21.9, hps 0.281)  eps 0.0021"


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
