"""A real ComfyUI for tests: the cached runtime (scripts/comfyui_runtime.sh) and a server harness.

The server runs in its own venv (torch 2.14.1 + torchvision, see the script), never in the test
venv; tests talk to it over HTTP/websocket, or run code in its venv with ``ComfyServer.python``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNTIME_SCRIPT = REPO / "scripts" / "comfyui_runtime.sh"
# Users clone the pack under a dashed name; ComfyUI imports it as a package named after the folder.
PACK_DIR_NAME = "ComfyUI-Dynamic-TreeRPO"
# Test-only extension beside the pack: a validate-without-queueing route (see the file).
HARNESS_NODE = Path(__file__).resolve().parent / "data" / "comfy_harness_node.py"
START_TIMEOUT = 180


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: ``error`` and ``node_errors`` are the server's own."""

    def __init__(self, error, node_errors):
        self.error = error
        self.node_errors = node_errors
        super().__init__(f"prompt rejected: {json.dumps(error)}; node_errors: {json.dumps(node_errors)}")


# Code for scripts run in ComfyUI's venv: `catch.messages` collects what ComfyUI logs (its complaints
# about keys it did not consume, for example). Needs `import logging` before it.
LOG_CATCHER = r"""
class Catch(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []
    def emit(self, record):
        self.messages.append(record.getMessage())

catch = Catch()
logging.getLogger().addHandler(catch)
logging.getLogger().setLevel(logging.INFO)
"""


def ensure_runtime() -> Path:
    """The ComfyUI runtime directory; builds it (once, minutes) when missing or out of date."""
    proc = subprocess.run(["bash", str(RUNTIME_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{RUNTIME_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    runtime = Path(proc.stdout.strip().splitlines()[-1])
    if not (runtime / ".ready").is_file():
        raise RuntimeError(f"{RUNTIME_SCRIPT} returned {runtime} without a .ready stamp")
    return runtime


def make_base(base: Path, pack: Path = REPO) -> Path:
    """A fresh ComfyUI base directory with the pack linked into custom_nodes/ as users clone it."""
    for sub in ("models", "input", "output", "user", "temp", "custom_nodes"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(pack, target_is_directory=True)
    shutil.copyfile(HARNESS_NODE, base / "custom_nodes" / "treerpo_test_harness.py")
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A running ``ComfyUI/main.py --cpu`` on 127.0.0.1 with its own base directory."""

    def __init__(self, runtime: Path, base: Path, port: int, extra_args=()):
        self.runtime = Path(runtime)
        self.base = Path(base)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = self.base / "comfyui.log"
        self._log_file = open(self.log_path, "wb")
        self._frontend = None
        cmd = [str(self.python_exe), "-u", str(self.comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(port), "--base-directory", str(self.base), "--disable-auto-launch",
               # its default database sits in the shared runtime's code folder: keep it per server
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}", *extra_args]
        # Own process group: stop() ends the server and anything it started, nothing else.
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log_file, stderr=subprocess.STDOUT,
                                     env=self._env(), start_new_session=True)

    @property
    def comfy_dir(self) -> Path:
        return self.runtime / "ComfyUI"

    @property
    def python_exe(self) -> Path:
        return self.runtime / "venv" / "bin" / "python"

    def _env(self):
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        return env

    # --- lifecycle -------------------------------------------------------------------------
    def wait_ready(self, timeout: float = START_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-6000:]}")
            try:
                self._get("/system_stats", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-6000:]}")

    def stop(self):
        if self._frontend is not None:
            self._frontend.close()
            self._frontend = None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self._log_file.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # --- HTTP ------------------------------------------------------------------------------
    def _request(self, path, data=None, timeout=60):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def _get(self, path, timeout=60):
        return self._request(path, timeout=timeout)

    def get(self, path: str, timeout: float = 60):
        """GET a JSON endpoint, e.g. ``/api/workflow_templates``."""
        return self._get(path, timeout=timeout)

    def object_info(self) -> dict:
        return self._get("/object_info")

    def _submit(self, path, payload):
        try:
            return self._request(path, payload)
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
            err = json.loads(e.read() or b"{}")
            raise PromptRejected(err.get("error"), err.get("node_errors", {})) from None

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        return self._submit("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})["prompt_id"]

    def validate(self, prompt: dict) -> dict:
        """Raise PromptRejected unless the server's validation (the code POST /prompt runs)
        accepts ``prompt``; nothing is queued, so nothing runs. Returns {"outputs", "node_errors"}."""
        return self._submit("/treerpo-test/validate", {"prompt": prompt})

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        """The /history entry once the prompt has finished (success, error or interrupt)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self._get(f"/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry:  # ComfyUI writes the entry once the prompt is done (status: success / error)
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-6000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} not finished within {timeout} s:\n{self.log()[-4000:]}")

    def run(self, prompt: dict, timeout: float = 600) -> tuple[dict, list[dict]]:
        """Queue ``prompt`` and follow it over the websocket, as the frontend does.

        Returns the /history entry and every event for this prompt in arrival order: JSON events
        as ``{"type", "data"}``; binary preview frames as ``{"type": "preview_image", "data":
        {"format", "image": bytes, ...metadata}}``."""
        import websocket  # websocket-client (test extra)

        cid = uuid.uuid4().hex
        ws = websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={cid}", timeout=timeout)
        events = []
        try:
            pid = self.queue(prompt, client_id=cid)
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    msg = ws.recv()
                except websocket.WebSocketTimeoutException:
                    raise TimeoutError(f"prompt {pid}: no end event within {timeout} s:\n{self.log()[-4000:]}")
                if isinstance(msg, bytes):
                    ev = _binary_event(msg)
                    if ev.get("data", {}).get("prompt_id", pid) == pid:
                        events.append(ev)
                    continue
                ev = json.loads(msg)
                data = ev.get("data") or {}
                if data.get("prompt_id") != pid:
                    continue
                events.append(ev)
                done = ev["type"] in ("execution_error", "execution_interrupted", "execution_success") or (
                    ev["type"] == "executing" and data.get("node") is None)
                if done:
                    break
        finally:
            ws.close()
        return self.wait(pid, timeout=60), events

    def frontend(self) -> "Frontend":
        """This server's frontend in headless Chromium (one per server, started on first use)."""
        if self._frontend is None:
            self._frontend = Frontend(self)
        return self._frontend

    def interrupt(self):
        self._request("/interrupt", {})

    # --- in the runtime venv ----------------------------------------------------------------
    def python(self, code: str, timeout: float = 600, args=()) -> subprocess.CompletedProcess:
        """Run ``code`` in the runtime venv with ComfyUI importable and its arguments parsed as the
        server's (``--cpu``, this base directory), so folder_paths sees the server's models.
        ``args`` reach the code as the list ``ARGS`` (sys.argv holds ComfyUI's arguments)."""
        prelude = (
            "import sys\n"
            "ARGS = sys.argv[1:]\n"
            f"sys.path.insert(0, {str(self.comfy_dir)!r})\n"
            f"sys.argv = ['main.py', '--cpu', '--base-directory', {str(self.base)!r}]\n"
            "import comfy.options\n"
            "comfy.options.enable_args_parsing()\n"
            "import folder_paths, utils.extra_config  # before nodes: nodes puts comfy/ first on sys.path\n"
        )
        return subprocess.run([str(self.python_exe), "-c", prelude + code, *args], cwd=self.comfy_dir,
                              env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)


CHROMIUM = os.environ.get("TREERPO_CHROMIUM", "/usr/bin/chromium")
# Settings a first visit would otherwise answer with pop-ups (the template browser for new users);
# no minimap over the screenshots.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


class Frontend:
    """The server's own frontend (comfyui-frontend-package) in headless Chromium via Playwright.

    Playwright's bundled browsers are not downloadable here: apt's chromium is driven through
    ``executable_path``."""

    def __init__(self, server: ComfyServer, executable: str = CHROMIUM):
        from playwright.sync_api import sync_playwright

        if not Path(executable).is_file():
            raise FileNotFoundError(f"{executable} not found: install chromium "
                                    "(make test does: apt-get install chromium)")
        self.server = server
        self.console_errors: list[str] = []  # console.error lines (offline: failed external fetches)
        self.page_errors: list[str] = []  # uncaught exceptions in the page
        for key, value in FRONTEND_SETTINGS.items():
            server._request(f"/settings/{key}", value)
        self._pw = sync_playwright().start()
        try:
            self._browser = self._pw.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
            self.page = self._browser.new_page(viewport={"width": 1600, "height": 1000})
            # the "Nodes 2.0" announcement banner, as dismissed by its close button
            self.page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")
            self.page.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
            self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
            self.reload()
        except BaseException:
            self.close()
            raise

    def reload(self):
        """(Re)open the page, so the frontend fetches /object_info afresh."""
        self.page.goto(self.server.url, wait_until="domcontentloaded")
        self.page.wait_for_function("() => window.app && window.app.graph && window.app.canvas", timeout=120_000)
        self.page.wait_for_timeout(500)
        self.close_dialogs()

    def close_dialogs(self):
        for _ in range(5):
            if not self.dialogs():
                return
            self.page.keyboard.press("Escape")
            self.page.wait_for_timeout(200)

    def dialogs(self) -> list[str]:
        """Text of every visible dialog and error toast (missing nodes, invalid workflow, ...)."""
        return self.page.evaluate(
            "() => [...document.querySelectorAll('.p-dialog, [role=dialog], .p-toast-message-error')]"
            """
            .filter(e => e.offsetParent !== null || getComputedStyle(e).position === 'fixed')
            .map(e => e.innerText.trim()).filter(t => t.length > 0)""")

    def load(self, workflow: dict, name: str = "workflow") -> dict:
        """Load a UI-format workflow as the user's "Open" does. Returns what the frontend made of
        it: ``dialogs`` it raised, ``missing`` node types it has no definition for, ``nodes``,
        ``widget_mismatch`` (nodes whose widgets_values do not survive loading: values on the
        wrong inputs) and the ``page_errors`` / ``console_errors`` seen while loading."""
        self.close_dialogs()
        self.console_errors.clear()
        self.page_errors.clear()
        self.page.evaluate("async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name); }",
                           [workflow, name])
        self.page.wait_for_timeout(1000)
        state = self.page.evaluate("""(wf) => {
            const g = window.app.graph;
            const known = window.LiteGraph.registered_node_types;
            // A widget value list that does not survive loading (the frontend has a different
            // number or kind of widgets, e.g. the control_after_generate it adds after every
            // "seed") means the values landed on the wrong inputs.
            const given = Object.fromEntries(wf.nodes.map(n => [String(n.id), n.widgets_values]));
            const shifted = g.serialize().nodes
              .filter(n => given[String(n.id)] !== undefined &&
                      JSON.stringify(n.widgets_values ?? []) !== JSON.stringify(given[String(n.id)] ?? []))
              .map(n => ({id: n.id, type: n.type, given: given[String(n.id)], loaded: n.widgets_values,
                          widgets: (g.getNodeById(n.id).widgets ?? []).map(w => w.name)}));
            return {
              nodes: g.nodes.map(n => n.type),
              missing: g.nodes.filter(n => !(n.type in known) || n.has_errors).map(n => n.type),
              widget_mismatch: shifted,
            };
        }""", workflow)
        state["dialogs"] = self.dialogs()
        state["console_errors"] = list(self.console_errors)
        state["page_errors"] = list(self.page_errors)
        return state

    def fit_view(self):
        """Zoom the canvas to the whole graph (the UI's "fit view" command)."""
        self.page.evaluate("() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(300)

    def graph_to_prompt(self) -> dict:
        """The API prompt the frontend would POST for the loaded graph (``app.graphToPrompt``)."""
        return self.page.evaluate("async () => (await window.app.graphToPrompt()).output")

    def screenshot(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path))
        return path

    def close(self):
        browser, pw = getattr(self, "_browser", None), getattr(self, "_pw", None)
        if browser is not None:
            browser.close()
        if pw is not None:
            pw.stop()
        self._browser = self._pw = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# Inputs that name a model file or folder, by (node class, input) -> models/ subfolder. Workflows
# for FLUX.1-dev name models a test machine does not have: placeholder_models() puts empty stand-ins
# there so the server's validation (which only checks that the name is listed) can be exercised.
MODEL_INPUTS = {
    ("CheckpointLoaderSimple", "ckpt_name"): "checkpoints",
    ("UNETLoader", "unet_name"): "diffusion_models",
    ("DualCLIPLoader", "clip_name1"): "text_encoders",
    ("DualCLIPLoader", "clip_name2"): "text_encoders",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("VAELoader", "vae_name"): "vae",
    ("LoraLoader", "lora_name"): "loras",
    ("LoraLoaderModelOnly", "lora_name"): "loras",
    ("TreeRPOLoadFlux", "model"): "diffusers",  # "diffusers/<folder>" (a folder with model_index.json)
    ("TreeRPOLoadFlux", "transformer"): "diffusion_models",
    ("TreeRPOLoadFlux", "clip_l"): "text_encoders",
    ("TreeRPOLoadFlux", "t5xxl"): "text_encoders",
    ("TreeRPOLoadFlux", "vae"): "vae",
}
# Values that mean "no file" rather than a file name.
NOT_A_FILE = {"", "none", "(none)", "None"}
# The files a model reward's folder models/treerpo_rewards/<name>/ must hold (Load reward checks they
# are there at queue time, reading none of them).
REWARD_FILES = {
    "hps": ("HPS_v2.1_compressed.pt", "vocab.json", "merges.txt"),
    "pickscore": ("model/config.json", "model/model.safetensors", "processor/preprocessor_config.json",
                  "processor/vocab.json", "processor/merges.txt", "processor/tokenizer_config.json"),
    "imagereward": ("ImageReward.pt", "vocab.txt"),
}


def placeholder_models(server: ComfyServer, prompt: dict) -> list[Path]:
    """Create an empty file for every model the API ``prompt`` names (see MODEL_INPUTS, and a Load
    reward's files, REWARD_FILES) that the server's models/ folders lack; a diffusers model
    ``diffusers/<name>`` becomes a folder models/diffusers/<name> with a model_index.json.
    Returns what was created."""
    made = []
    for node in prompt.values():
        for name, value in node.get("inputs", {}).items():
            folder = MODEL_INPUTS.get((node.get("class_type"), name))
            if not isinstance(value, str) or value in NOT_A_FILE:
                continue
            if folder == "diffusers":
                if not value.startswith("diffusers/"):
                    continue  # the built-in tiny pipeline or the single-file route
                target = server.base / "models" / "diffusers" / value[len("diffusers/"):]
                if not target.exists():
                    target.mkdir(parents=True)
                    (target / "model_index.json").write_text("{}")
                    made.append(target)
            elif folder is not None:
                made += _touch(server.base / "models" / folder / value)
        if node.get("class_type") == "TreeRPOLoadReward":
            reward = node.get("inputs", {}).get("reward")
            for rel in REWARD_FILES.get(reward, ()):
                made += _touch(server.base / "models" / "treerpo_rewards" / reward / rel)
    return made


def _touch(target: Path) -> list[Path]:
    """An empty stand-in file at ``target`` unless one is there; returns what was created."""
    if target.exists():
        return []
    target.parent.mkdir(parents=True, exist_ok=True)
    target.touch()
    return [target]


def ui_to_api(server: ComfyServer, workflow_json) -> dict:
    """Convert a UI-format workflow (dict, JSON text or path) to the API prompt exactly as the
    frontend does when the user presses Run: load it in the server's frontend, ``graphToPrompt``.
    Reuses one browser per server (closed by ``server.stop()``)."""
    if (isinstance(workflow_json, (str, os.PathLike)) and Path(workflow_json).suffix == ".json"
            and Path(workflow_json).is_file()):
        workflow_json = json.loads(Path(workflow_json).read_text())
    elif isinstance(workflow_json, (str, bytes)):
        workflow_json = json.loads(workflow_json)
    fe = server.frontend()
    state = fe.load(workflow_json)
    if state["missing"]:
        raise ValueError(f"the frontend has no definition for node types {state['missing']}")
    if state["widget_mismatch"]:  # the prompt would carry values on the wrong inputs
        raise ValueError(f"widget values do not fit the nodes' widgets: {state['widget_mismatch']}")
    return fe.graph_to_prompt()


def _binary_event(msg: bytes) -> dict:
    kind = struct.unpack(">I", msg[:4])[0]
    if kind == 1:  # PREVIEW_IMAGE: format code then the encoded image
        fmt = {1: "JPEG", 2: "PNG"}.get(struct.unpack(">I", msg[4:8])[0], "?")
        return {"type": "preview_image", "data": {"format": fmt, "image": bytes(msg[8:])}}
    if kind == 4:  # PREVIEW_IMAGE_WITH_METADATA: metadata length, metadata JSON, image
        n = struct.unpack(">I", msg[4:8])[0]
        meta = json.loads(msg[8:8 + n])
        fmt = "PNG" if meta.get("image_type") == "image/png" else "JPEG"
        return {"type": "preview_image", "data": {**meta, "format": fmt, "image": bytes(msg[8 + n:])}}
    return {"type": f"binary_{kind}", "data": {"bytes": bytes(msg[4:])}}


def start_server(runtime: Path, base: Path, pack: Path = REPO, extra_args=()) -> ComfyServer:
    make_base(base, pack)
    return ComfyServer(runtime, base, free_port(), extra_args).wait_ready()


def pack_import_line(log: str, pack_dir_name: str = PACK_DIR_NAME) -> str:
    """The line of ComfyUI's 'Import times for custom nodes' listing for the pack (it ends with
    the pack's path and says '(IMPORT FAILED)' when loading it failed)."""
    for line in log.splitlines():
        if "seconds" in line and line.rstrip().endswith(os.sep + pack_dir_name):
            return line.strip()
    raise AssertionError(f"no import line for {pack_dir_name} in the ComfyUI log:\n{log[-4000:]}")


if __name__ == "__main__":  # manual use: python tests/comfyui_harness.py -> a server on a temp base until Ctrl-C
    import tempfile

    srv = start_server(ensure_runtime(), Path(tempfile.mkdtemp(prefix="comfy-base-")))
    print(srv.url, srv.base, file=sys.stderr)
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
