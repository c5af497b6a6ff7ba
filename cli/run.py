"""`treerpo run WORKFLOW.json`: run a saved ComfyUI workflow headless.

In-process with ComfyUI's own executor (cli.comfy_env), on one process or, with ``--gpus N``, on N
processes started by torch.distributed's launcher (torchrun); or, with ``--server URL``, submitted
to a running ComfyUI (cli.remote). Output: a progress bar per trainer node with the iteration's
metrics, or one JSON line per event with ``--json``. Exit codes: 0 success, 1 a node failed, 2 bad
input (workflow, --set, options), 3 ComfyUI or the server not available, 130/143 stopped by
SIGINT/SIGTERM with a resumable state.

Stopping and resuming: the first SIGINT/SIGTERM asks the trainer to stop after the running
iteration (it writes a checkpoint, as the UI's Cancel does); a second one stops at once. Each
command keeps a small journal in its run folder (``headless.json``: which iteration every trainer
node trains up to); rerunning the same command after a stop or a kill trains only what is left, so
it ends where an uninterrupted run ends. A command that finished starts a new journal: rerunning
it trains its iterations once more on the same run, as re-queueing does in the UI. ``--restart``
starts the run over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from .workflow import (
    TRAINER, WorkflowError, apply_set, execution_order, is_api_format, load_workflow, node_types, show_value, to_api,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_COMFY = 0, 1, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
JOURNAL = "headless.json"


def add_parser(sub) -> None:
    r = sub.add_parser("run", help="run a saved ComfyUI workflow headless (one process, N GPUs, or a server)",
                       description="Run a saved ComfyUI workflow (UI or API format) without a browser.")
    r.add_argument("workflow", help="workflow .json (saved from ComfyUI, or an API-format prompt)")
    r.add_argument("--set", dest="sets", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="override a widget value; NODE is a node id, title or type (repeatable)")
    r.add_argument("--output", help="ComfyUI output directory (run folders, images); default: ComfyUI's")
    r.add_argument("--base-directory", dest="base_directory",
                   help="ComfyUI base directory (models/, input/, output/, custom_nodes/)")
    r.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="validate and print the plan without loading models")
    r.add_argument("--json", action="store_true", help="one JSON line per event on stdout")
    r.add_argument("--restart", action="store_true", help="start the run folders over instead of continuing")
    r.add_argument("--debug", action="store_true", help="tracebacks and ComfyUI's log")
    r.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, the ComfyUI this pack is installed "
                                     "in, or the cached runtime)")
    r.add_argument("--python", help="Python of ComfyUI's environment (default: this one if it imports ComfyUI, "
                                    "else the venv beside ComfyUI)")
    r.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI's --cpu; gloo across processes)")
    r.add_argument("--deterministic", action="store_true",
                   help="deterministic torch algorithms (ComfyUI's --deterministic)")
    r.add_argument("--gpus", type=int, default=1, help="processes on this machine, one per GPU (torchrun)")
    r.add_argument("--server", help="submit to a running ComfyUI at this URL instead of running in-process")
    r.set_defaults(func=main)


# ---------------------------------------------------------------------------- output
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
    parts = [f"iter {m.get('iteration')}"]
    for key, label, fmt in (("reward_mean", "reward", ".4g"), ("eps_mean", "eps", ".2g"), ("ratio_mean", "ratio", ".4f"),
                            ("clip_frac_high", "clip+", ".2f"), ("sft_loss", "sft", ".3g"), ("window_start", "tau", "d")):
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


# ---------------------------------------------------------------------------- trainer runs
def checkpoint_iteration(run_folder: Path) -> int:
    """Iteration of the run folder's newest complete checkpoint (0 if none)."""
    from ..core.checkpoint import resolve_checkpoint

    try:
        return int(resolve_checkpoint(run_folder / "checkpoints").name.split("-")[-1])
    except (FileNotFoundError, ValueError):
        return 0


def trainer_runs(prompt: dict, runs_dir: Path) -> dict[str, dict]:
    """For every trainer node: its run folder, its chain position (a step fed the ``run`` of
    another step trains the same run after it) and its iterations."""
    out: dict[str, dict] = {}
    for nid in execution_order(prompt):
        node = prompt[nid]
        if node["class_type"] != TRAINER:
            continue
        src = node["inputs"].get("run")
        parent = src[0] if isinstance(src, list) and src and src[0] in out else None
        folder = out[parent]["folder"] if parent else runs_dir / str(node["inputs"].get("run_name", "treerpo-run")).strip()
        out[nid] = {"folder": folder, "parent": parent, "iterations": int(node["inputs"].get("iterations", 1))}
    return out


def command_key(prompt: dict) -> str:
    """What identifies 'the same command' for resuming: the prompt without on_existing."""
    clean = {k: {**v, "inputs": {n: x for n, x in v["inputs"].items() if not (v["class_type"] == TRAINER and n == "on_existing")},
                 "_meta": None} for k, v in prompt.items()}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_resume(prompt: dict, runs: dict, restart: bool) -> tuple[dict, list[str]]:
    """Decide, per run folder, the iteration every trainer node trains up to, and rewrite the
    prompt's trainer inputs (iterations left, continue/restart). Returns (journals, notes)."""
    key = command_key(prompt)
    journals, notes = {}, []
    for nid, r in runs.items():
        folder = r["folder"]
        if folder in journals:
            continue
        chain = [n for n, x in runs.items() if x["folder"] == folder]
        old = _read_json(folder / JOURNAL)
        current = checkpoint_iteration(folder)
        resume = not restart and old is not None and old.get("command") == key and not old.get("finished")
        if resume:
            targets = {n: int(old["targets"][n]) for n in chain}
            notes.append(f"{folder.name}: resuming an interrupted run at iteration {current} "
                         f"(training up to {targets[chain[-1]]})")
        else:
            start = 0 if (restart or prompt[chain[0]]["inputs"].get("on_existing") == "restart") else current
            targets, total = {}, start
            for n in chain:
                total += runs[n]["iterations"]
                targets[n] = total
            notes.append(f"{folder.name}: {'restarting' if start == 0 and current else 'continuing' if start else 'starting'} "
                         f"at iteration {start}, training up to {total}")
        done = current if resume else targets[chain[0]] - runs[chain[0]]["iterations"]
        for n in chain:
            prev = targets[runs[n]["parent"]] if runs[n]["parent"] else targets[n] - runs[n]["iterations"]
            prompt[n]["inputs"]["iterations"] = max(0, targets[n] - max(done, prev))
        head = prompt[chain[0]]["inputs"]
        # a resume continues whatever the workflow says; otherwise --restart or the workflow decides
        head["on_existing"] = "continue" if resume else "restart" if restart else head.get("on_existing", "continue")
        journals[folder] = {"command": key, "targets": targets, "finished": False}
    return journals, notes


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_journal(folder: Path, journal: dict) -> None:
    from ..core.checkpoint import atomic_write_text

    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / JOURNAL, json.dumps(journal, indent=1))


# ---------------------------------------------------------------------------- processes
def _strip_gpus(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--gpus":
            skip = True
            continue
        if a.startswith("--gpus="):
            continue
        out.append(a)
    return out


def launch_command(python: str, nproc: int, run_argv: list[str]) -> list[str]:
    """The torchrun line that starts ``nproc`` ranks of ``treerpo run`` on this machine."""
    from .comfy_env import LAUNCH_SCRIPT

    return [python, str(LAUNCH_SCRIPT), "--torchrun", "--standalone", f"--nproc-per-node={nproc}",
            str(LAUNCH_SCRIPT), "run", *run_argv]


def _select_device() -> None:
    """Under a launcher: this rank sees only its own GPU (before torch or ComfyUI is imported)."""
    from ..core.distributed import local_rank

    lr = local_rank()
    if lr is None:
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = [d for d in visible.split(",") if d.strip()] if visible else None
    if devices is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(lr)
    elif lr < len(devices):
        os.environ["CUDA_VISIBLE_DEVICES"] = devices[lr]


# ---------------------------------------------------------------------------- the command
def main(args) -> int:
    rep = Reporter(args.json, args.debug)
    try:
        return _main(args, rep)
    except WorkflowError as e:
        rep.error(str(e))
        rep.emit("done", status="bad_input", exit_code=EXIT_USAGE, message=str(e))
        return EXIT_USAGE
    finally:
        rep.close()


def _main(args, rep: Reporter) -> int:
    from . import comfy_env
    from ..core import distributed as dist

    wf = load_workflow(args.workflow)  # a broken file fails before anything heavy
    if args.gpus < 1:
        raise WorkflowError(f"--gpus must be >= 1, got {args.gpus}")
    if args.server:
        from .remote import run_remote

        return run_remote(args, wf, rep)
    try:
        comfy_dir = comfy_env.find_comfyui(args.comfyui)
        python = comfy_env.comfy_python(comfy_dir, args.python)
    except comfy_env.ComfyNotFound as e:
        rep.error(str(e))
        return EXIT_NO_COMFY
    run_argv = _rebuild_argv(args)
    if args.gpus > 1 and dist.world_size() == 1:
        cmd = launch_command(python or sys.executable, args.gpus, _strip_gpus(run_argv))
        rep.line(f"starting {args.gpus} processes: {' '.join(cmd)}")
        env = dict(os.environ, COMFYUI_PATH=str(comfy_dir), **{comfy_env.REEXEC_ENV: "1"})
        env.pop("PYTHONPATH", None)
        sys.stdout.flush()
        os.execve(cmd[0], cmd, env)
    if python is not None:
        comfy_env.reexec(python, ["run", *run_argv], comfy_dir)
    _select_device()
    world, rank = dist.world_size(), dist.rank()
    rep.quiet = rank != 0

    comfy_args = ["--cpu"] if args.cpu else []
    if args.base_directory:
        comfy_args += ["--base-directory", str(Path(args.base_directory).resolve())]
    if args.output:
        comfy_args += ["--output-directory", str(Path(args.output).resolve())]
    if args.deterministic:
        comfy_args += ["--deterministic"]
    t0 = time.time()
    rep.line(f"ComfyUI {comfy_dir} ({sys.executable})")
    try:
        comfy = comfy_env.InProcessComfy(comfy_dir, comfy_args, quiet=not args.debug, need_types=node_types(wf))
    except ImportError as e:
        if args.debug:
            raise
        rep.error(f"ComfyUI {comfy_dir} cannot be imported by {sys.executable}: {e} (pass --python with ComfyUI's Python)")
        return EXIT_NO_COMFY
    rep.emit("comfyui", path=str(comfy_dir), python=sys.executable, seconds=round(time.time() - t0, 1))

    info = comfy.object_info(sorted(node_types(wf)))
    if is_api_format(wf):
        for nid, v in sorted(wf.items()):
            if v["class_type"] not in info:
                raise WorkflowError(f"node {nid} ({v['class_type']}): unknown node type (not installed in this ComfyUI)")
    prompt = to_api(wf, info)
    for item in args.sets:
        nid, name, value = apply_set(prompt, item, info)
        rep.emit("set", node=nid, input=name, value=value)
    trainers = [n for n in execution_order(prompt) if prompt[n]["class_type"] == TRAINER]
    if not trainers:
        raise WorkflowError(f"{args.workflow}: no GRPO trainer step ({TRAINER}) in this workflow: nothing to train")

    import folder_paths

    from ..nodes.common import RUNS_FOLDER

    runs = trainer_runs(prompt, Path(folder_paths.get_output_directory()) / RUNS_FOLDER)
    journals, notes = plan_resume(prompt, runs, args.restart)
    ok, err, outputs, node_errors = comfy.validate(prompt)
    if not ok or node_errors:  # ComfyUI runs the valid outputs and drops the others: a headless run must not
        raise WorkflowError(_validation_message(err, node_errors, prompt))

    rep.line(describe_batch(prompt, world))
    rep.emit("start", world_size=world, workflow=str(args.workflow), runs={str(f): j["targets"] for f, j in journals.items()})
    for note in notes:
        rep.line(note)
    if args.dry_run:
        _print_plan(prompt, info, runs, rep)
        rep.emit("done", status="dry_run", exit_code=EXIT_OK)
        return EXIT_OK

    # no barrier needed: a rank reading the journal rank 0 just wrote computes the same plan (same
    # command, same checkpoint), and the process group is accelerate's, made when the trainer opens
    for folder, j in journals.items():
        j["world_size"] = world
        if rank == 0:
            _write_journal(folder, j)
    return _execute(comfy, prompt, outputs, runs, journals, rep, args, rank)


def describe_batch(prompt: dict, world: int) -> str:
    """The start line: processes, and prompts per iteration per process and in all."""
    from ..core.presets import make_config

    per = []
    for v in prompt.values():
        if v["class_type"] == "TreeRPOTreeSettings":
            n = v["inputs"].get("prompts_per_iteration", -1)
            if not isinstance(n, int) or n < 1:
                n = make_config(str(v["inputs"].get("preset", "dynamic-treerpo"))).prompts_per_iteration
            per.append(n)
    batch = (f"{per[0]} prompt(s) per process per iteration, global batch {per[0] * world} prompt trees"
             if len(per) == 1 else "prompts per iteration as each settings node says")
    return f"world size {world} ({'one process' if world == 1 else f'{world} processes'}): {batch}"


def _rebuild_argv(args) -> list[str]:
    out = [args.workflow]
    for s in args.sets:
        out += ["--set", s]
    for flag in ("output", "base_directory", "comfyui", "python", "server"):
        v = getattr(args, flag)
        if v:
            out += [f"--{flag.replace('_', '-')}", str(v)]
    for flag in ("dry_run", "json", "restart", "debug", "cpu", "deterministic"):
        if getattr(args, flag):
            out.append(f"--{flag.replace('_', '-')}")
    out += ["--gpus", str(args.gpus)]
    return out


def _validation_message(err: dict, node_errors: dict, prompt: dict) -> str:
    for nid, ne in sorted((node_errors or {}).items()):
        errs = ne.get("errors") or []
        if errs:
            e = errs[0]
            detail = e.get("details") or ""
            return f"node {nid} ({ne.get('class_type', prompt.get(nid, {}).get('class_type'))}): {e.get('message')}" + (
                f": {detail}" if detail else "")
    return f"workflow rejected: {(err or {}).get('message', 'invalid prompt')}" + (
        f": {err.get('details')}" if err and err.get("details") else "")


def _print_plan(prompt: dict, info: dict, runs: dict, rep: Reporter) -> None:
    lines = ["plan (execution order):"]
    for nid in execution_order(prompt):
        node = prompt[nid]
        title = node.get("_meta", {}).get("title") or node["class_type"]
        lines.append(f"  node {nid} {node['class_type']} \"{title}\"")
        for name, v in node["inputs"].items():
            lines.append(f"      {name} = {show_value(v)}")
    for nid, r in runs.items():
        lines.append(f"  trainer node {nid}: run folder {r['folder']}, {prompt[nid]['inputs']['iterations']} iterations now")
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


def _execute(comfy, prompt, outputs, runs, journals, rep: Reporter, args, rank: int) -> int:
    events = Events(prompt, runs, rep)
    stopped: list[int] = []

    def on_signal(signum, frame):
        if stopped:
            raise KeyboardInterrupt
        stopped.append(signum)
        rep.line(f"{signal.Signals(signum).name}: stopping after this iteration with a checkpoint "
                 f"(again to stop at once)")
        comfy.interrupt()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    interrupted = False
    try:
        ok = comfy.execute(prompt, outputs, events)
    except KeyboardInterrupt:
        ok, interrupted = False, True
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        rep.close()
    status = {str(f): checkpoint_iteration(f) for f in journals}
    if ok:
        if rank == 0:
            for folder, j in journals.items():
                _write_journal(folder, {**j, "finished": True})
        for folder, it in status.items():
            rep.line(f"done: {folder} at iteration {it}")
        rep.emit("done", status="success", exit_code=EXIT_OK, iterations=status)
        return EXIT_OK
    if interrupted or events.failure.get("interrupted") or stopped:
        code = EXIT_SIGNAL.get(stopped[0] if stopped else signal.SIGINT, 130)
        where = ", ".join(f"{Path(f).name} at iteration {it}" for f, it in status.items())
        if rank == 0:
            rep.error(f"stopped ({where}); rerun the same command to continue")
        rep.emit("done", status="interrupted", exit_code=code, iterations=status)
        return code
    return events.failed(rank, args.debug)
