"""Where `treerpo run` finds ComfyUI and a Python that imports it, and ComfyUI in-process.

ComfyUI is found, in this order, through ``--comfyui``, ``$COMFYUI_PATH``, the ComfyUI this pack
is installed in (``<ComfyUI>/custom_nodes/<pack>``), and the runtime cached by
scripts/comfyui_runtime.sh. ComfyUI's core imports torchvision and its own requirements, which the
environment `treerpo` was installed in may lack (our package needs neither): then the command
re-executes itself with ComfyUI's Python (``--python`` / ``$COMFYUI_PYTHON``, else the venv beside
or inside that ComfyUI), importing this package from its folder (cli/_launch.py), so nothing has to
be installed into ComfyUI's environment.

`InProcessComfy` is ComfyUI's own prompt executor without the server (REFERENCES.md, "Headless
in-process"): ComfyUI's arguments parsed from a list, folders and extra model paths set as
main.py sets them, nodes initialised (custom nodes included), our nodes registered from this very
package, prompts validated and executed with events delivered to a callback.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from .workflow import UI_ONLY

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_SCRIPT = PACKAGE_ROOT / "cli" / "_launch.py"
COMFY_VERSION = "0.3.75"
# What ComfyUI's core and our nodes import beyond torch: a Python lacking one cannot run ComfyUI here.
NEEDED = ("torchvision", "aiohttp", "yaml", "einops", "torchsde", "safetensors", "diffusers", "transformers", "peft",
          "accelerate")
REEXEC_ENV = "TREERPO_RUN_REEXEC"  # set in the re-executed process: never re-execute twice


class ComfyNotFound(RuntimeError):
    """No usable ComfyUI or no Python that imports it; the message says what to pass."""


def is_comfyui(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / "comfy").is_dir() and (p / "execution.py").is_file() and (p / "folder_paths.py").is_file()


def cached_runtime() -> Path:
    base = os.environ.get("TREERPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "treerpo")
    return Path(base) / f"comfyui-{COMFY_VERSION}"


def find_comfyui(explicit: str | None = None) -> Path:
    """The ComfyUI code folder to run with (see the module docstring for the order)."""
    for what, value in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH"))):
        if value:
            if not is_comfyui(value):
                raise ComfyNotFound(f"{what}={value} is not a ComfyUI folder (expected comfy/, execution.py, "
                                    f"folder_paths.py in it)")
            return Path(value).resolve()
    installed = PACKAGE_ROOT.parent.parent  # <ComfyUI>/custom_nodes/<this pack>
    if PACKAGE_ROOT.parent.name == "custom_nodes" and is_comfyui(installed):
        return installed
    runtime = cached_runtime()
    if (runtime / ".ready").is_file() and is_comfyui(runtime / "ComfyUI"):
        return runtime / "ComfyUI"
    raise ComfyNotFound("no ComfyUI found: pass --comfyui PATH or set COMFYUI_PATH, install this pack in "
                        "ComfyUI/custom_nodes, or build the cached runtime with scripts/comfyui_runtime.sh")


def missing_modules() -> list[str]:
    """Modules ComfyUI or our nodes need that this Python cannot import."""
    return [m for m in NEEDED if importlib.util.find_spec(m) is None]


def comfy_python(comfy_dir: Path, explicit: str | None = None) -> str | None:
    """The Python to run ComfyUI with: None means this one will do."""
    chosen = explicit or os.environ.get("COMFYUI_PYTHON")
    if chosen:
        if not Path(chosen).is_file():
            raise ComfyNotFound(f"--python/COMFYUI_PYTHON {chosen} does not exist")
        return None if _same_python(Path(chosen)) else chosen
    missing = missing_modules()
    if not missing:
        return None
    for cand in (comfy_dir.parent / "venv", comfy_dir / "venv", comfy_dir / ".venv", comfy_dir.parent / ".venv"):
        exe = cand / "bin" / "python"
        if exe.is_file():
            return None if _same_python(exe) else str(exe)
    raise ComfyNotFound(f"this Python ({sys.executable}) cannot run ComfyUI {comfy_dir}: it lacks "
                        f"{', '.join(missing)}; run treerpo from ComfyUI's Python or pass --python PATH")


def _same_python(exe: Path) -> bool:
    """Is ``exe`` this interpreter in this environment? (venv pythons are symlinks to one base
    interpreter: compare the environments, not the binaries)."""
    return Path(exe).absolute() == Path(sys.executable).absolute() or (
        Path(exe).parent.parent.resolve() == Path(sys.prefix).resolve())


def reexec(python: str, argv: list[str], comfy_dir: Path) -> None:
    """Replace this process by ``python cli/_launch.py argv`` (same pid: signals still reach it)."""
    if os.environ.get(REEXEC_ENV):
        raise ComfyNotFound(f"{python} was chosen to run ComfyUI but cannot import {', '.join(missing_modules())}")
    env = dict(os.environ, **{REEXEC_ENV: "1", "COMFYUI_PATH": str(comfy_dir)})
    env.pop("PYTHONPATH", None)  # this environment's packages must not shadow ComfyUI's
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(python, [python, str(LAUNCH_SCRIPT), *argv], env)


# ---------------------------------------------------------------------------- in-process ComfyUI
class _Server:
    """The stand-in for ComfyUI's PromptServer the executor talks to: events go to a callback."""

    def __init__(self, on_event):
        self.client_id = "treerpo-run"
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.on_event = on_event

    def send_sync(self, event, data, sid=None):
        self.on_event(event, data)

    def queue_updated(self):
        pass


class InProcessComfy:
    """ComfyUI loaded into this process. ``comfy_args``: ComfyUI's own command-line arguments
    (e.g. ``--cpu``, ``--base-directory D``, ``--output-directory D``, ``--deterministic``)."""

    def __init__(self, comfy_dir: Path, comfy_args: list[str], custom_nodes: bool = True, quiet: bool = True,
                 need_types=None):
        import asyncio
        import logging

        self.dir = Path(comfy_dir)
        if str(self.dir) not in sys.path:
            sys.path.insert(0, str(self.dir))
        saved_argv = sys.argv
        sys.argv = ["main.py", *comfy_args]
        try:
            import comfy.options

            comfy.options.enable_args_parsing()
            import folder_paths  # noqa: F401 - before nodes: nodes puts comfy/ first on sys.path
            import utils.extra_config  # noqa: F401
            from comfy.cli_args import args
        finally:
            sys.argv = saved_argv
        self.args = args
        root = logging.getLogger()
        # ComfyUI logs its start-up at INFO and optional extras it cannot import (audio without
        # torchaudio) at WARNING: noise for a terminal run unless --debug
        root.setLevel(logging.ERROR if quiet else logging.INFO)
        self._apply_paths()
        import nodes

        paths, exts = folder_paths.folder_names_and_paths["custom_nodes"]
        folder_paths.folder_names_and_paths["custom_nodes"] = ([p for p in paths if os.path.isdir(p)], exts)
        asyncio.run(nodes.init_public_apis())
        asyncio.run(self._register_pack())
        # ComfyUI's extra nodes (comfy_extras, ~30 s to import on a small CPU) and other packs only
        # when the workflow uses a type that neither nodes.py nor this pack defines
        if need_types is None or set(need_types) - set(nodes.NODE_CLASS_MAPPINGS) - UI_ONLY:
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=custom_nodes, init_api_nodes=False))
            asyncio.run(self._register_pack())
        # ComfyUI logs a node's failure with its traceback at ERROR: the command reports it in one
        # line instead (--debug shows everything); our own warnings (checkpoint on stop) stay
        root.setLevel(logging.CRITICAL if quiet else logging.INFO)
        logging.getLogger("treerpo").setLevel(logging.WARNING if quiet else logging.INFO)

    def _apply_paths(self) -> None:
        """What ComfyUI's main.py does with extra_model_paths.yaml and --output-directory & co."""
        import itertools

        import folder_paths
        import utils.extra_config

        a = self.args
        extra = self.dir / "extra_model_paths.yaml"
        if extra.is_file():
            utils.extra_config.load_extra_path_config(str(extra))
        for cfg in itertools.chain(*(a.extra_model_paths_config or [])):
            utils.extra_config.load_extra_path_config(cfg)
        if a.output_directory:
            folder_paths.set_output_directory(os.path.abspath(a.output_directory))
        folder_paths.add_model_folder_path("loras", os.path.join(folder_paths.get_output_directory(), "loras"))
        if a.input_directory:
            folder_paths.set_input_directory(os.path.abspath(a.input_directory))
        if a.user_directory:
            folder_paths.set_user_directory(os.path.abspath(a.user_directory))

    async def _register_pack(self) -> None:
        """Our nodes from the `treerpo` package this command runs from (a copy of the pack in
        ComfyUI's custom_nodes may be another version: the command's own nodes win)."""
        import nodes

        from .. import comfy_entrypoint

        ext = await comfy_entrypoint()
        await ext.on_load()
        for cls in await ext.get_node_list():
            schema = cls.GET_SCHEMA()
            nodes.NODE_CLASS_MAPPINGS[schema.node_id] = cls
            cls.RELATIVE_PYTHON_MODULE = "custom_nodes.treerpo"
            if schema.display_name:
                nodes.NODE_DISPLAY_NAME_MAPPINGS[schema.node_id] = schema.display_name

    # -------------------------------------------------------------- schemas, validation, runs
    def object_info(self, types=None) -> dict:
        """What GET /object_info answers, for ``types`` (default: every node type)."""
        import folder_paths
        import nodes
        from comfy_api.internal import _ComfyNodeInternal

        out = {}
        with folder_paths.cache_helper:
            for name in types if types is not None else list(nodes.NODE_CLASS_MAPPINGS):
                cls = nodes.NODE_CLASS_MAPPINGS.get(name)
                if cls is None:
                    continue
                if issubclass(cls, _ComfyNodeInternal):
                    out[name] = cls.GET_NODE_INFO_V1()
                    continue
                inputs = cls.INPUT_TYPES()
                out[name] = {
                    "input": inputs, "input_order": {k: list(v) for k, v in inputs.items()},
                    "output": cls.RETURN_TYPES, "output_name": getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES),
                    "name": name, "display_name": nodes.NODE_DISPLAY_NAME_MAPPINGS.get(name, name),
                    "output_node": bool(getattr(cls, "OUTPUT_NODE", False)), "category": getattr(cls, "CATEGORY", ""),
                }
        return out

    def known_types(self) -> set[str]:
        import nodes

        return set(nodes.NODE_CLASS_MAPPINGS)

    def validate(self, prompt: dict) -> tuple[bool, dict, list, dict]:
        """ComfyUI's own validation: (ok, error, output node ids, node_errors)."""
        import asyncio
        import copy

        import execution

        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt("validate", copy.deepcopy(prompt), None))
        return ok, err, outputs, node_errors

    def execute(self, prompt: dict, outputs: list, on_event, prompt_id: str = "treerpo-run") -> bool:
        """Run ``prompt`` with ComfyUI's executor; ``on_event(event, data)`` receives every
        event (executing, progress, executed, execution_error, execution_interrupted, ...).
        Returns True on success."""
        import copy

        import comfy.utils
        import execution

        server = _Server(on_event)
        comfy.utils.set_progress_bar_global_hook(
            lambda value, total, preview, node_id=None: on_event("progress", {"node": node_id, "value": value,
                                                                                "max": total, "prompt_id": prompt_id}))
        executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC,
                                            cache_args={"lru": 0, "ram": 0})
        executor.execute(copy.deepcopy(prompt), prompt_id, extra_data={"client_id": server.client_id},
                         execute_outputs=list(outputs))
        return executor.success

    @staticmethod
    def interrupt() -> None:
        """ComfyUI's Cancel: nodes stop at their next interrupt check."""
        import nodes

        nodes.interrupt_processing(True)
