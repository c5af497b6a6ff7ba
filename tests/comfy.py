"""A real ComfyUI for tests: the cached runtime (scripts/comfyui_runtime.sh) and a server harness.

The server runs in its own venv (torch 2.14.1 + torchvision, see the script), never in the test
venv; tests talk to it over HTTP/websocket, or run code in its venv with ``ComfyServer.python``.
"""

from __future__ import annotations

import json
import os
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
START_TIMEOUT = 180


class PromptRejected(RuntimeError):
    """POST /prompt answered 400: ``error`` and ``node_errors`` are the server's own."""

    def __init__(self, error, node_errors):
        self.error = error
        self.node_errors = node_errors
        super().__init__(f"prompt rejected: {json.dumps(error)}; node_errors: {json.dumps(node_errors)}")


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
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-6000:]}")
            try:
                self._get("/system_stats", timeout=5)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"ComfyUI did not answer within {timeout} s:\n{self.log()[-6000:]}")

    def stop(self):
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

    def queue(self, prompt: dict, client_id: str | None = None) -> str:
        payload = {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex}
        try:
            out = self._request("/prompt", payload)
        except urllib.error.HTTPError as e:
            if e.code != 400:
                raise
            err = json.loads(e.read() or b"{}")
            raise PromptRejected(err.get("error"), err.get("node_errors", {})) from None
        return out["prompt_id"]

    def validate(self, prompt: dict) -> None:
        """Raise PromptRejected unless the server accepts ``prompt``; accepted prompts are dropped
        from the queue again (they never run)."""
        pid = self.queue(prompt)
        self._request("/queue", {"delete": [pid]})
        self._request("/history", {"delete": [pid]})

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

    def interrupt(self):
        self._request("/interrupt", {})

    # --- in the runtime venv ----------------------------------------------------------------
    def python(self, code: str, timeout: float = 600, args=()) -> subprocess.CompletedProcess:
        """Run ``code`` in the runtime venv with ComfyUI importable and its arguments parsed as the
        server's (``--cpu``, this base directory), so folder_paths sees the server's models."""
        prelude = (
            "import sys\n"
            f"sys.path.insert(0, {str(self.comfy_dir)!r})\n"
            f"sys.argv = ['main.py', '--cpu', '--base-directory', {str(self.base)!r}]\n"
            "import comfy.options\n"
            "comfy.options.enable_args_parsing()\n"
            "import folder_paths, utils.extra_config  # before nodes: nodes puts comfy/ first on sys.path\n"
        )
        return subprocess.run([str(self.python_exe), "-c", prelude + code, *args], cwd=self.comfy_dir,
                              env=self._env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              timeout=timeout)


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


if __name__ == "__main__":  # manual use: python tests/comfy.py -> a server on a temp base until Ctrl-C
    import tempfile

    srv = start_server(ensure_runtime(), Path(tempfile.mkdtemp(prefix="comfy-base-")))
    print(srv.url, srv.base, file=sys.stderr)
    try:
        srv.proc.wait()
    except KeyboardInterrupt:
        srv.stop()
