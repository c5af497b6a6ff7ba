"""What `treerpo run` prints: progress bars and short lines on stderr, or one JSON line per event
on stdout (--json); the one-line messages for a failing node or a rejected workflow. Shared by the
in-process run (cli.run) and the server mode (cli.remote). The exit codes of every command are in
cli/errors.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from .errors import EXIT_FAILED
from .workflow import execution_order, show_value


class Reporter:
    """Prints events: progress bars (stderr) and short lines, or JSON lines (stdout)."""

    def __init__(self, as_json: bool, debug: bool, quiet: bool = False):
        self.as_json, self.debug, self.quiet = as_json, debug, quiet
        self.bars: dict = {}

    def emit(self, event: str, **data) -> None:
        if self.quiet:
            return
        if self.as_json:
            print(json.dumps({"event": event, **data}, default=str), flush=True)

    def line(self, text: str) -> None:
        if not self.quiet and not self.as_json:
            self._write(text)

    def _write(self, text: str) -> None:
        if self.bars:
            from tqdm import tqdm

            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def notice(self, text: str) -> None:
        """A line the user must see even with --json (stderr), e.g. a changed device; not on other ranks."""
        if not self.quiet:
            self.emit("notice", message=text)
            self._write(f"note: {text}")

    def error(self, text: str) -> None:
        """Errors always reach stderr (every rank), besides the JSON event."""
        self.close()
        print(f"error: {text}", file=sys.stderr, flush=True)

    def progress(self, nid: str, label: str, value: int, total: int, metrics: dict | None) -> None:
        if self.quiet:
            return
        if self.as_json:
            self.emit("progress", node=nid, value=value, max=total, **({"metrics": metrics} if metrics else {}))
            return
        from tqdm import tqdm

        bar = self.bars.get(nid)
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = self.bars[nid] = tqdm(total=total, desc=label, unit="it", file=sys.stderr, dynamic_ncols=True)
        bar.n = value
        if metrics:
            bar.set_postfix_str(_metrics_text(metrics), refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _metrics_text(m: dict) -> str:
    from ..core.trainer import reward_headline

    parts = [f"iter {m.get('iteration')}"]
    if isinstance(m.get("reward_mean"), (int, float)):
        parts.append(reward_headline(m))
    for key, label, fmt in (("eps_mean", "eps", ".2g"), ("ratio_mean", "ratio", ".4f"), ("approx_kl", "kl~", ".2g"),
                            ("clip_frac_high", "clip+", ".2f"), ("sft_loss", "sft", ".3g"),
                            ("window_start", "tau", "d")):
        if isinstance(m.get(key), (int, float)):
            parts.append(f"{label} {m[key]:{fmt}}")
    return ", ".join(parts)


def _last_metrics(folder: Path) -> dict | None:
    try:
        with open(folder / "metrics.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = [l for l in f.read().decode(errors="replace").splitlines() if l.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def validation_message(err: dict, node_errors: dict, prompt: dict) -> str:
    for nid, ne in sorted((node_errors or {}).items()):
        errs = ne.get("errors") or []
        if errs:
            e = errs[0]
            detail = e.get("details") or ""
            return f"node {nid} ({ne.get('class_type', prompt.get(nid, {}).get('class_type'))}): {e.get('message')}" + (
                f": {detail}" if detail else "")
    return f"workflow rejected: {(err or {}).get('message', 'invalid prompt')}" + (
        f": {err.get('details')}" if err and err.get("details") else "")


def print_plan(prompt: dict, info: dict, runs: dict, rep: Reporter) -> None:
    lines = ["plan (execution order):"]
    for nid in execution_order(prompt):
        node = prompt[nid]
        title = node.get("_meta", {}).get("title") or node["class_type"]
        lines.append(f"  node {nid} {node['class_type']} \"{title}\"")
        for name, v in node["inputs"].items():
            lines.append(f"      {name} = {show_value(v)}")
    for nid, r in runs.items():
        lines.append(f"  trainer node {nid}: run folder {r['folder']}, "
                     f"{prompt[nid]['inputs']['iterations']} iterations now")
    if rep.as_json:
        rep.emit("plan", prompt=prompt, order=execution_order(prompt))
    else:
        print("\n".join(lines), flush=True)


class Events:
    """Turns executor events (in-process, or a server's websocket) into the command's output and
    remembers how the run ended."""

    def __init__(self, prompt: dict, runs: dict, rep: Reporter):
        self.prompt, self.runs, self.rep = prompt, runs, rep
        self.failure: dict = {}
        self.current = None
        self.labels = {n: f"node {n} {v.get('_meta', {}).get('title') or v['class_type']}" for n, v in prompt.items()}

    def __call__(self, event: str, data: dict) -> None:
        rep, prompt = self.rep, self.prompt
        nid = str(data.get("node")) if data.get("node") is not None else None
        if event == "progress" and nid in prompt:
            metrics = _last_metrics(self.runs[nid]["folder"]) if nid in self.runs and self.runs[nid]["folder"] else None
            rep.progress(nid, self.labels[nid], int(data.get("value", 0)), int(data.get("max", 0)), metrics)
        elif event == "executing" and nid in prompt and nid != self.current:  # (ComfyUI may say it twice)
            self.current = nid
            rep.close()  # the previous node's bar is complete
            rep.emit("executing", node=nid, class_type=prompt[nid]["class_type"])
            if nid in self.runs:
                rep.progress(nid, self.labels[nid], 0, int(prompt[nid]["inputs"]["iterations"]), None)
            else:
                rep.line(f"{self.labels[nid]} ...")
        elif event == "executed":
            out = data.get("output") or {}
            rep.emit("executed", node=str(data.get("node")), output={k: v for k, v in out.items() if k == "text"})
            for text in out.get("text", []) or []:
                rep.line(f"node {data.get('node')}: {text}")
        elif event == "execution_error":
            self.failure.update(data)
        elif event == "execution_interrupted":
            self.failure.update(data, interrupted=True)

    def failed(self, rank: int, debug: bool) -> int:
        """Report the failing node in one line; returns the exit code."""
        f = self.failure
        nid, kind = f.get("node_id"), f.get("node_type")
        message = str(f.get("exception_message") or "failed").strip().splitlines()
        msg = f"node {nid} ({kind}): {message[0] if message else 'failed'}"
        if debug and f.get("traceback"):
            print("".join(f["traceback"]), file=sys.stderr)
        self.rep.error(msg if rank == 0 else f"rank {rank}: {msg}")
        self.rep.emit("done", status="error", exit_code=EXIT_FAILED, node=nid, class_type=kind,
                      exception_type=f.get("exception_type"), message="\n".join(message))
        return EXIT_FAILED
