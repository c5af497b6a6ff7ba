"""The pack inside a real ComfyUI 0.3.75 server (tests/comfy.py): it imports cleanly from a folder
with dashes in its name, the server answers, and the pack's pyproject parses for ComfyUI."""

import re

import pytest

from comfy import PACK_DIR_NAME, pack_import_line


def test_server_imports_pack_from_dashed_folder(comfy_server):
    link = comfy_server.base / "custom_nodes" / PACK_DIR_NAME
    assert link.is_symlink() and "-" in link.name

    info = comfy_server.object_info()
    assert "KSampler" in info and "LoraLoaderModelOnly" in info  # core nodes: the server is a real one

    log = comfy_server.log()
    line = pack_import_line(log)
    assert "IMPORT FAILED" not in line, line
    # Nothing else about the pack went wrong while loading it (traceback, skip, bad entry point).
    problems = [l for l in log.splitlines()
                if PACK_DIR_NAME in l and re.search(r"Cannot import|Skip |comfy_entrypoint|Traceback|Error", l)]
    assert not problems, "\n".join(problems)
    # ComfyUI parses the pack's pyproject.toml ([tool.comfy]) while importing it.
    assert "Unable to parse pyproject.toml" not in log



def test_comfyui_reads_pack_metadata(comfy_server):
    """ComfyUI's own parser (comfy_config) reads the pack's pyproject as the registry would."""
    import json
    import tomllib

    from comfy import REPO

    proc = comfy_server.python(
        "import json\n"
        "from comfy_config import config_parser\n"
        "c = config_parser.extract_node_configuration(ARGS[0])\n"
        "print(json.dumps({'name': c.project.name, 'deps': c.project.dependencies,\n"
        "                  'publisher': c.tool_comfy.publisher_id, 'display': c.tool_comfy.display_name,\n"
        "                  'icon': c.tool_comfy.icon}))\n",
        timeout=120, args=[str(comfy_server.base / "custom_nodes" / PACK_DIR_NAME)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert got == {"name": ours["project"]["name"], "deps": ours["project"]["dependencies"],
                   "publisher": ours["tool"]["comfy"]["PublisherId"],
                   "display": ours["tool"]["comfy"]["DisplayName"], "icon": ours["tool"]["comfy"]["Icon"]}


def test_run_returns_history_and_events(comfy_server):
    """ComfyServer.run follows a prompt over the websocket to its end and returns its outputs."""
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 32, "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "harness/red"}},
    }
    history, events = comfy_server.run(prompt, timeout=120)
    assert history["status"]["status_str"] == "success", history["status"]
    (image,) = history["outputs"]["2"]["images"]
    saved = comfy_server.base / "output" / image["subfolder"] / image["filename"]
    assert saved.is_file()
    kinds = [e["type"] for e in events]
    assert kinds[0] == "execution_start" and kinds[-1] in ("execution_success", "executing")
    assert {"type": "executed", "node": "2"} in [{"type": e["type"], "node": e["data"].get("node")} for e in events]


def test_queue_rejects_invalid_prompt(comfy_server):
    from comfy import PromptRejected

    bad = {"1": {"class_type": "EmptyImage", "inputs": {"width": -5, "height": 32, "batch_size": 1, "color": 0}},
           "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(PromptRejected) as e:
        comfy_server.queue(bad)
    assert "1" in e.value.node_errors and "width" in str(e.value.node_errors["1"])
