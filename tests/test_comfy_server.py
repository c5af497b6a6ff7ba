"""The pack inside a real ComfyUI 0.3.75 server (tests/comfy.py): it imports cleanly from a folder
with dashes in its name, the server answers, and the pack's pyproject parses for ComfyUI."""

import re

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

