"""`treerpo run --server URL`: submit a workflow to a running ComfyUI and follow it.

The node schemas come from the server's GET /object_info (UI -> API conversion, --set checks);
POST /prompt queues it (the server validates: a rejection is reported in one line, exit 2); the
run is followed over the server's websocket (websocket-client, when installed) or by polling
/history. Ctrl-C / SIGTERM sends POST /interrupt: the trainer checkpoints and stops, as with the
UI's Cancel. The run folder lives on the server's machine: rerunning continues the run there and
trains the workflow's iterations once more (the UI's re-queue); the exact resume-to-target of
in-process runs needs the run folder, so it is in-process only.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .errors import EXIT_OK, EXIT_SIGNAL
from .report import Events, print_plan, validation_message
from .workflow import WorkflowError, build_prompt

EXIT_NO_SERVER = 3


class ServerError(RuntimeError):
    pass


class Server:
    def __init__(self, url: str, timeout: float = 30.0):
        url = url.rstrip("/")
        if "://" not in url:
            url = "http://" + url
        self.url, self.timeout = url, timeout

    def request(self, path: str, data=None, timeout=None):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
                raw = r.read()
        except urllib.error.HTTPError as e:
            raise e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ServerError(f"cannot reach ComfyUI at {self.url}: {reason}") from None
        return json.loads(raw) if raw else None

    def queue(self, prompt: dict, client_id: str) -> str:
        try:
            return self.request("/prompt", {"prompt": prompt, "client_id": client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            try:
                body = json.loads(e.read() or b"{}")
            except ValueError:
                body = {}
            if e.code == 400:
                raise WorkflowError(validation_message(body.get("error") or {}, body.get("node_errors") or {}, prompt))
            raise ServerError(f"ComfyUI at {self.url} answered POST /prompt with HTTP {e.code}") from None

    def ws_url(self, client_id: str) -> str:
        u = urllib.parse.urlparse(self.url)
        return f"{'wss' if u.scheme == 'https' else 'ws'}://{u.netloc}/ws?clientId={client_id}"


def run_remote(args, wf: dict, rep) -> int:

    server = Server(args.server)
    try:
        info = server.request("/object_info", timeout=60)
    except ServerError as e:
        rep.error(str(e))
        rep.emit("done", status="no_server", exit_code=EXIT_NO_SERVER, message=str(e))
        return EXIT_NO_SERVER
    prompt, trainers, _ = build_prompt(wf, info, args.sets, args.workflow, f"on {server.url}")
    if args.restart:
        for n in trainers:
            prompt[n]["inputs"]["on_existing"] = "restart"
    runs = {n: {"folder": None} for n in trainers}
    rep.line(f"ComfyUI server {server.url}")
    if args.dry_run:  # the server has no validate-only endpoint: schemas checked here, nothing queued
        print_plan(prompt, info, {}, rep)
        rep.emit("done", status="dry_run", exit_code=EXIT_OK)
        return EXIT_OK

    events = Events(prompt, runs, rep)
    cid = uuid.uuid4().hex
    ws = _connect(server, cid)
    stopped: list[int] = []

    def on_signal(signum, frame):
        if stopped:
            raise KeyboardInterrupt
        stopped.append(signum)
        rep.line(f"{signal.Signals(signum).name}: asking the server to stop after this iteration (POST /interrupt)")
        try:
            server.request("/interrupt", {})
        except (ServerError, urllib.error.HTTPError):
            pass

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pid = server.queue(prompt, cid)
        rep.emit("queued", prompt_id=pid)
        ok = _follow_ws(ws, pid, events) if ws is not None else _poll(server, pid, events)
    except KeyboardInterrupt:
        ok = False
    except ServerError as e:
        rep.error(str(e))
        return EXIT_NO_SERVER
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if ws is not None:
            ws.close()
        rep.close()
    if ok:
        rep.emit("done", status="success", exit_code=EXIT_OK)
        rep.line("done")
        return EXIT_OK
    if events.failure.get("interrupted") or stopped:
        code = EXIT_SIGNAL.get(stopped[0] if stopped else signal.SIGINT, 130)
        rep.error("stopped on the server; rerun the command to continue the run")
        rep.emit("done", status="interrupted", exit_code=code)
        return code
    return events.failed(0, args.debug)


def _connect(server: Server, cid: str):
    try:
        import websocket  # websocket-client: live progress; without it the history is polled
    except ImportError:
        return None
    try:
        return websocket.create_connection(server.ws_url(cid), timeout=30)
    except Exception:  # noqa: BLE001 - a proxy without websockets: poll instead
        return None


def _follow_ws(ws, pid: str, events) -> bool:
    import websocket

    while True:
        ws.settimeout(5)
        try:
            msg = ws.recv()
        except websocket.WebSocketTimeoutException:
            continue
        if isinstance(msg, bytes):
            continue  # preview frames
        ev = json.loads(msg)
        kind, data = ev.get("type"), ev.get("data") or {}
        if data.get("prompt_id") not in (pid, None) or kind == "status":
            continue
        events(kind, data)
        if kind == "execution_success":
            return True
        if kind in ("execution_error", "execution_interrupted"):
            return False
        if kind == "executing" and data.get("node") is None and data.get("prompt_id") == pid:
            return not events.failure


def _poll(server: Server, pid: str, events) -> bool:
    while True:
        hist = server.request(f"/history/{pid}") or {}
        entry = hist.get(pid)
        if entry:
            status = entry.get("status") or {}
            for name, data in status.get("messages", []):
                if name in ("execution_error", "execution_interrupted"):
                    events(name, data)
            return status.get("status_str") == "success"
        time.sleep(2)
