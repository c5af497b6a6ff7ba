"""The node pack through a real ComfyUI 0.3.75 server (fixture comfy_server, tests/comfyui_harness.py):
node definitions, the bundled tiny workflows run end to end, progress with previews, Cancel
with a resumable state, a second queue refused, and readable errors for bad input."""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path

import pytest

from comfyui_harness import PromptRejected, ui_to_api

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
ARTIFACTS = REPO / "test-artifacts" / "nodes"

NODES = {  # id -> (output types)
    "TreeRPOLoadFlux": ["TREERPO_MODEL"],
    "TreeRPOPrompts": ["TREERPO_PROMPTS"],
    "TreeRPOLoadReward": ["TREERPO_REWARDS"],
    "TreeRPOCombineRewards": ["TREERPO_REWARDS"],
    "TreeRPOTreeSettings": ["TREERPO_SETTINGS"],
    "TreeRPOTreeSampler": ["TREERPO_TREE", "IMAGE"],
    "TreeRPORewardScorer": ["TREERPO_SCORES", "STRING"],
    "TreeRPOTreePreview": ["IMAGE"],
    "TreeRPOTrainerStep": ["TREERPO_RUN", "LORA_MODEL", "IMAGE"],
    "TreeRPOSaveLora": ["LORA_MODEL", "STRING"],
    "TreeRPOLoadTrainingState": ["TREERPO_STATE"],
    "TreeRPOMetricsPlot": ["IMAGE"],
    "TreeRPOHeldOutEvaluation": ["IMAGE", "STRING"],
}
_API: dict[str, dict] = {}


def load_api(server, name: str) -> dict:
    """A bundled workflow as the API prompt the real frontend makes of it (graphToPrompt)."""
    if not _API:
        try:
            for n in ("tiny-demo", "tree-inspect"):
                _API[n] = ui_to_api(server, WORKFLOWS / f"{n}.json")
        finally:
            # Playwright's sync API allows one instance per thread: free it for other test modules
            if getattr(server, "_frontend", None) is not None:
                server._frontend.close()
                server._frontend = None
    return copy.deepcopy(_API[name])


def node_of(prompt: dict, class_type: str) -> str:
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"{class_type}: {ids}"
    return ids[0]


def errors_of(entry: dict) -> list[dict]:
    return [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]


def files_under(base: Path) -> set[str]:
    skip = ("temp/", "user/", "comfyui.log", "models/treerpo_tiny/", "output/treerpo_runs/.text_embeddings/")
    out = set()
    for p in base.rglob("*"):
        if p.is_file():
            rel = str(p.relative_to(base))
            if not rel.startswith(skip) and "custom_nodes" not in rel:
                out.add(rel)
    return out


# the demo's evaluation and tree outputs are tested in tests/test_demo.py; here only the training chain
_DEMO_EXTRAS = ("TreeRPOHeldOutEvaluation", "SaveImage", "TreeRPOTreeSampler", "TreeRPORewardScorer",
                "TreeRPOTreePreview")


def tiny_demo(server, run_name: str, iterations: int, on_existing: str = "restart") -> dict:
    """The tiny-demo graph: trainer step, Save LoRA and Metrics plot, quick settings (6 steps, 1 prompt)."""
    p = load_api(server, "tiny-demo")
    for nid in [k for k, v in p.items() if v["class_type"] in _DEMO_EXTRAS]:
        p.pop(nid)
    while True:  # and the rewards the evaluation alone scored with (nodes whose output nothing takes)
        used = {v[0] for n in p.values() for v in n["inputs"].values() if isinstance(v, list)}
        idle = [k for k, v in p.items() if k not in used and v["class_type"].startswith(("TreeRPOLoadReward",
                                                                                         "TreeRPOCombineRewards"))]
        if not idle:
            break
        for k in idle:
            p.pop(k)
    p[node_of(p, "TreeRPOTreeSettings")]["inputs"].update(num_steps=6, prompts_per_iteration=1)
    step = node_of(p, "TreeRPOTrainerStep")
    p[step]["inputs"].update(iterations=iterations, run_name=run_name, on_existing=on_existing)
    p[node_of(p, "TreeRPOSaveLora")]["inputs"]["filename_prefix"] = f"treerpo/{run_name}"
    return p


def metric_lines(server, run_name):
    f = server.base / "output" / "treerpo_runs" / run_name / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []


# ------------------------------------------------------------------------------------------ tests
def test_object_info_declares_every_node(comfy_server):
    info = comfy_server.object_info()
    for node_id, outputs in NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        spec = info[node_id]
        assert spec["category"] == "TreeRPO" and spec["output"] == outputs, (node_id, spec["output"])
        inputs = {**spec["input"].get("required", {}), **spec["input"].get("optional", {})}
        assert inputs, node_id
        for name, (kind, *opts) in inputs.items():
            assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"
            if isinstance(kind, str) and kind.startswith("TREERPO") or kind == "LORA_MODEL":
                continue
            assert isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO", "IMAGE"), kind
    model_opts = info["TreeRPOLoadFlux"]["input"]["required"]["model"][1]["options"]
    assert {"tiny-shapes (bundled pretrained, CPU)", "tiny (built-in test pipeline, CPU)"} <= set(model_opts)
    reward_opts = info["TreeRPOLoadReward"]["input"]["required"]["reward"][1]["options"]
    assert {"hps", "pickscore", "imagereward", "brightness", "jpeg_compressibility"} <= set(reward_opts)
    # our LoRA output is ComfyUI's own type: its Load LoRA Model node takes it
    assert info["LoraModelLoader"]["input"]["required"]["lora"][0] == "LORA_MODEL"


def test_workflow_templates_are_served(comfy_server):
    templates = comfy_server.get("/api/workflow_templates")
    ours = next(v for k, v in templates.items() if "TreeRPO" in k)
    assert {"tiny-demo", "tree-inspect", "flux-dev-dynamic-treerpo", "flux-dev-mixgrpo",
            "flux-dev-dancegrpo"} <= set(ours)


def test_tree_inspect_draws_a_preview(comfy_server):
    from PIL import Image

    entry, events = comfy_server.run(load_api(comfy_server, "tree-inspect"), timeout=900)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    prompt = load_api(comfy_server, "tree-inspect")
    out = entry["outputs"][node_of(prompt, "TreeRPOTreePreview")]["images"][0]
    path = comfy_server.base / out["type"] / out["subfolder"] / out["filename"]
    img = Image.open(path)
    assert img.width > 600 and img.height > 600  # 8 leaves, 4 layers of thumbnails
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, ARTIFACTS / "tree-inspect-preview.png")
    assert any(e["type"] == "executed" and e["data"]["node"] == node_of(prompt, "TreeRPOTreePreview") for e in events)


def test_tiny_demo_trains_saves_and_reports_progress(comfy_server):
    from safetensors import safe_open

    prompt = tiny_demo(comfy_server, "demo-test", iterations=2)
    step = node_of(prompt, "TreeRPOTrainerStep")
    entry, events = comfy_server.run(prompt, timeout=900)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    progress = [e["data"] for e in events if e["type"] == "progress" and e["data"].get("node") == step]
    assert [p["value"] for p in progress][-1] == 2 and all(p["max"] == 2 for p in progress)
    previews = [e for e in events if e["type"] == "preview_image"]
    assert len(previews) >= 2 and all(e["data"]["format"] == "JPEG" for e in previews)
    assert [m["iteration"] for m in metric_lines(comfy_server, "demo-test")] == [1, 2]

    saved = entry["outputs"][node_of(prompt, "TreeRPOSaveLora")]["text"][0]
    lora = comfy_server.base / "models" / "loras" / saved.removeprefix("saved ")
    assert lora.is_file() and lora.parent.name == "treerpo" and lora.name.startswith("demo-test_")
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["treerpo.iteration"] == "2" and meta["treerpo.preset"] == "treerpo-plus"
    assert all(k.startswith("transformer.") for k in keys) and any(".lora_A." in k for k in keys)
    assert (lora.with_name(lora.stem + ".state") / "latest").is_file()
    plot = entry["outputs"][node_of(prompt, "TreeRPOMetricsPlot")]["images"]
    assert plot and plot[0]["type"] == "temp"

    # the trained LoRA is a ComfyUI LORA_MODEL: the trainer step's output keys are those of the file
    info = comfy_server.object_info()
    assert "LORA_MODEL" in info["TreeRPOTrainerStep"]["output"]


def test_cancel_checkpoints_second_queue_refused_and_requeue_continues(comfy_server):
    name = "cancel-test"
    prompt = tiny_demo(comfy_server, name, iterations=40)
    pid = comfy_server.queue(prompt)
    deadline = time.monotonic() + 600
    while len(metric_lines(comfy_server, name)) < 1:
        assert time.monotonic() < deadline, comfy_server.log()[-3000:]
        time.sleep(0.5)
    # while it trains, the same graph is refused with the lock holder named
    with pytest.raises(PromptRejected) as rej:
        comfy_server.queue(prompt)
    assert "training now" in json.dumps(rej.value.node_errors)
    comfy_server.interrupt()
    entry = comfy_server.wait(pid, timeout=600)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    done = metric_lines(comfy_server, name)[-1]["iteration"]
    assert 1 <= done < 40
    ckpts = comfy_server.base / "output" / "treerpo_runs" / name / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == f"step-{done:06d}"  # checkpoint first, then stop

    again = tiny_demo(comfy_server, name, iterations=1, on_existing="continue")
    entry, _ = comfy_server.run(again, timeout=900)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    assert [m["iteration"] for m in metric_lines(comfy_server, name)] == list(range(1, done + 2))


def _expect_runtime_error(server, prompt, *needles):
    before = files_under(server.base)
    entry, _ = server.run(prompt, timeout=900)
    errs = errors_of(entry)
    assert entry["status"]["status_str"] == "error" and errs, entry["status"]
    msg = errs[0]["exception_message"]
    for n in needles:
        assert n in msg, msg
    new = files_under(server.base) - before
    stray = [f for f in new if not f.startswith(("models/loras/", "output/treerpo_runs/"))]
    assert not stray, stray
    return errs[0], new


def test_bad_inputs_give_readable_errors_and_write_nothing_else(comfy_server):
    base = comfy_server.base
    # a missing model file, or none chosen: refused at queue time, the input and the file named
    p = tiny_demo(comfy_server, "bad-missing", iterations=1)
    load = node_of(p, "TreeRPOLoadFlux")
    for transformer, needle in (
            ("flux1-dev.safetensors", "'flux1-dev.safetensors' not found in models/diffusion_models"),
            ("(none)", "choose a file from models/diffusion_models")):
        p[load]["inputs"].update(model="single files (below)", transformer=transformer)
        with pytest.raises(PromptRejected) as rej:
            comfy_server.queue(p)
        assert needle in json.dumps(rej.value.node_errors[load]), rej.value
    p[load]["inputs"]["model"] = "diffusers/nowhere"
    with pytest.raises(PromptRejected, match="nowhere"):
        comfy_server.queue(p)

    # an empty prompt file in ComfyUI's input folder, a missing one: refused at queue time (the file is read)
    (base / "input" / "empty.txt").write_text("\n  \n")
    p = tiny_demo(comfy_server, "bad-prompts", iterations=1)
    for file, needle in (("empty.txt", "Prompts: prompt file 'empty.txt' holds no prompts"), ("gone.txt", "gone.txt")):
        p[node_of(p, "TreeRPOPrompts")]["inputs"]["file"] = file
        with pytest.raises(PromptRejected) as rej:
            comfy_server.queue(p)
        assert needle in json.dumps(rej.value.node_errors[node_of(p, "TreeRPOPrompts")]), rej.value

    # a reward folder without weights: refused at queue time, the file and the folder named
    (base / "models" / "treerpo_rewards" / "hps").mkdir(parents=True, exist_ok=True)
    p = tiny_demo(comfy_server, "bad-reward", iterations=1)
    p[node_of(p, "TreeRPOLoadReward")]["inputs"]["reward"] = "hps"
    with pytest.raises(PromptRejected) as rej:
        comfy_server.queue(p)
    msg = json.dumps(rej.value.node_errors[node_of(p, "TreeRPOLoadReward")])
    assert "Load reward: reward 'hps'" in msg and "HPS_v2.1_compressed.pt" in msg, msg
    assert str(base / "models" / "treerpo_rewards") in msg, msg

    # a prefix leaving models/loras is refused before anything runs (ComfyUI queues a prompt while
    # any output node is valid, so the metrics plot is left out here)
    for prefix in ("../../x", "/tmp/x"):
        p = tiny_demo(comfy_server, "bad-prefix", iterations=1)
        p.pop(node_of(p, "TreeRPOMetricsPlot"))
        save = node_of(p, "TreeRPOSaveLora")
        p[save]["inputs"]["filename_prefix"] = prefix
        with pytest.raises(PromptRejected) as rej:
            comfy_server.queue(p)
        assert "filename_prefix" in json.dumps(rej.value.node_errors[save])
    assert not (base / "x").exists() and not (base.parent / "x").exists()

    # bad tree settings: the engine's own ValueError text, at queue time, after the node's name
    p = tiny_demo(comfy_server, "bad-settings", iterations=1)
    st = node_of(p, "TreeRPOTreeSettings")
    p[st]["inputs"]["window_start"] = 5  # 6 steps, depth 4: the window would run past the end
    with pytest.raises(PromptRejected) as rej:
        comfy_server.queue(p)
    assert "Tree settings: " in json.dumps(rej.value.node_errors[st])
    assert "window_start=5" in json.dumps(rej.value.node_errors[st])
    # more_settings: an unknown key, a bad value, a line without '=': each named at queue time
    for text, needle in (("nosuch=1", "nosuch"), ("sft_target=leaf", "sft_target"),
                         ("split_noise", "key=value, got 'split_noise'")):
        p[st]["inputs"].update(window_start=-1, more_settings=text)
        with pytest.raises(PromptRejected) as rej:
            comfy_server.queue(p)
        assert needle in json.dumps(rej.value.node_errors[st]), (text, rej.value.node_errors)


def test_nan_producing_model_stops_with_a_readable_error(comfy_server):
    """A FLUX whose output layer holds NaN makes every image NaN, so every reward is NaN: the
    trainer step stops with a readable error and keeps no checkpoint of that state."""
    import torch
    from safetensors.torch import load_file, save_file

    from treerpo.core.shapes.model import pretrained_dir

    nan = comfy_server.base / "models" / "diffusers" / "nan-flux"
    shutil.copytree(pretrained_dir(), nan, dirs_exist_ok=True)
    f = nan / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(str(f))
    sd["proj_out.weight"] = torch.full_like(sd["proj_out.weight"], math.nan)
    save_file(sd, str(f))

    p = tiny_demo(comfy_server, "nan-test", iterations=2)
    p[node_of(p, "TreeRPOLoadFlux")]["inputs"]["model"] = "diffusers/nan-flux"
    err, new = _expect_runtime_error(comfy_server, p, "no leaf got a finite reward", "shapes")
    assert err["node_type"] == "TreeRPOTrainerStep"
    assert not any("checkpoints" in f for f in new) and not any(f.startswith("models/loras/") for f in new)



def test_chained_steps_continue_one_run_and_a_saved_state_resumes(comfy_server):
    # two trainer steps in one graph train one run: 1 + 1 iterations
    p = tiny_demo(comfy_server, "chain-test", iterations=1)
    first = node_of(p, "TreeRPOTrainerStep")
    second = str(max(int(k) for k in p) + 1)
    p[second] = {"class_type": "TreeRPOTrainerStep", "inputs": dict(p[first]["inputs"], run=[first, 0])}
    for key in ("model", "prompts", "rewards", "settings"):
        p[second]["inputs"].pop(key)
    for n in (node_of(p, "TreeRPOSaveLora"), node_of(p, "TreeRPOMetricsPlot")):
        p[n]["inputs"]["run"] = [second, 0]
    # trees in the same graph: one from the loader (it may run before training and encodes a training
    # prompt: training must still get grad through those cached embeddings), one after the training
    load, st = node_of(p, "TreeRPOLoadFlux"), node_of(p, "TreeRPOTreeSettings")
    # an engine setting without a widget of its own reaches the trainer through more_settings
    p[st]["inputs"]["more_settings"] = "sft_lambda=0.25\nsft_target=best-sample-noised; sft_decay=False"
    tree_in = dict(prompt="a red cube on a table", seed=0, iteration=0, settings=[st, 0])
    p["200"] = {"class_type": "TreeRPOTreeSampler", "inputs": dict(tree_in, model=[load, 0])}
    p["201"] = {"class_type": "PreviewImage", "inputs": {"images": ["200", 1]}}
    p["202"] = {"class_type": "TreeRPOTreeSampler", "inputs": dict(tree_in, run=[second, 0])}
    p["203"] = {"class_type": "TreeRPOTreePreview", "inputs": {"tree": ["202", 0], "thumbnail": 48, "title": ""}}
    entry, _ = comfy_server.run(p, timeout=900)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    lines = metric_lines(comfy_server, "chain-test")
    assert [m["iteration"] for m in lines] == [1, 2]
    assert all(m["sft_lambda"] == 0.25 and m["sft_loss"] > 0 for m in lines)
    assert entry["outputs"]["201"]["images"] and entry["outputs"]["203"]["images"]
    saved = entry["outputs"][node_of(p, "TreeRPOSaveLora")]["text"][0].removeprefix("saved ")
    state = saved.removesuffix(".safetensors") + ".state"
    assert state in comfy_server.object_info()["TreeRPOLoadTrainingState"]["input"]["required"]["state"][1]["options"]

    # Load training state -> a new run folder starts from the saved iteration 2
    q = tiny_demo(comfy_server, "from-state", iterations=1)
    q["100"] = {"class_type": "TreeRPOLoadTrainingState", "inputs": {"state": state}}
    q[node_of(q, "TreeRPOTrainerStep")]["inputs"]["resume_from"] = ["100", 0]
    entry, _ = comfy_server.run(q, timeout=900)
    assert entry["status"]["status_str"] == "success", errors_of(entry)
    assert [m["iteration"] for m in metric_lines(comfy_server, "from-state")] == [1, 2, 3]
