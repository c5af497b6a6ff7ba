"""Packaging metadata ComfyUI-Manager and the Comfy registry read: requirements.txt lists exactly
pyproject's [project] dependencies, and [tool.comfy] names the publisher, display name and icon."""

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    name, rest = re.match(r"\s*([A-Za-z0-9_.-]+)(.*)", req).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def test_requirements_txt_matches_pyproject_dependencies():
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [l.split("#", 1)[0].strip() for l in (REPO / "requirements.txt").read_text().splitlines()]
    reqs = [l for l in lines if l]
    assert sorted(map(_norm, reqs)) == sorted(map(_norm, deps)), (
        "requirements.txt and pyproject.toml [project] dependencies differ: "
        f"only in requirements.txt {sorted(set(map(_norm, reqs)) - set(map(_norm, deps)))}, "
        f"only in pyproject.toml {sorted(set(map(_norm, deps)) - set(map(_norm, reqs)))}")


def test_tool_comfy_metadata():
    comfy = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["comfy"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"]), comfy["PublisherId"]
    assert comfy["DisplayName"].strip()
    icon = comfy["Icon"]
    assert icon.startswith("https://") or (REPO / icon).is_file(), f"Icon {icon!r} is neither a URL nor a file here"
    if not icon.startswith("https://"):
        assert (REPO / icon).suffix in (".svg", ".png", ".jpg", ".gif")
