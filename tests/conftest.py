import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/toy.py and other helpers

import pytest


@pytest.fixture(scope="session")
def comfy_runtime():
    """The cached ComfyUI 0.3.75 runtime directory (built by scripts/comfyui_runtime.sh if needed)."""
    from comfyui_harness import ensure_runtime

    return ensure_runtime()


@pytest.fixture(scope="session")
def comfy_server(comfy_runtime, tmp_path_factory):
    """A real ComfyUI server (--cpu, 127.0.0.1, a free port) on a fresh base directory with this
    repo linked as custom_nodes/ComfyUI-Dynamic-TreeRPO; stopped at the end of the session."""
    from comfyui_harness import start_server

    server = start_server(comfy_runtime, tmp_path_factory.mktemp("comfy-base"))
    try:
        yield server
    finally:
        server.stop()


COMFY_FIXTURES = {"comfy_runtime", "comfy_server"}


def pytest_collection_modifyitems(config, items):
    """Test tiers (pyproject.toml registers the markers): every test that uses the ComfyUI runtime
    is marked `comfy` here, so none can be missed; `slow` is marked in the test modules."""
    for item in items:
        if COMFY_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.comfy)
