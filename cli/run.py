"""`treerpo run WORKFLOW.json`: run a saved ComfyUI workflow headless.

In-process with ComfyUI's own executor (cli.comfy_env), on one process or, with ``--gpus N``, on N
processes started by torch.distributed's launcher (torchrun); or, with ``--server URL``, submitted
to a running ComfyUI (cli.remote). Output: a progress bar per trainer node with the iteration's
metrics, or one JSON line per event with ``--json``. Exit codes: 0 success, 1 a node failed, 2 bad
input (workflow, --set, options), 3 ComfyUI or the server not available, 130/143 stopped by
SIGINT/SIGTERM with a resumable state. Without a GPU (and without ``--cpu``) it runs on the CPU and says so.

Stopping and resuming: the first SIGINT/SIGTERM asks the trainer to stop after the running
iteration (it writes a checkpoint, as the UI's Cancel does); a second one stops at once. Each
command keeps a small journal in its run folder (``headless.json``: which iteration every trainer
node trains up to); rerunning the same command after a stop or a kill trains only what is left, so
it ends where an uninterrupted run ends. A command that finished starts a new journal: rerunning
it trains its iterations once more on the same run, as re-queueing does in the UI. ``--restart``
starts the run over.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from pathlib import Path

from .errors import EXIT_NO_COMFY, EXIT_OK, EXIT_SIGNAL, EXIT_USAGE, BadInput, output_dir, positive_int
from .report import Events, Reporter, print_plan, validation_message
from .workflow import TRAINER, WorkflowError, build_prompt, execution_order, load_workflow, node_types

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
    r.add_argument("--gpus", type=positive_int, default=1, help="processes on this machine, one per GPU (torchrun)")
    r.add_argument("--server", help="submit to a running ComfyUI at this URL instead of running in-process")
    r.set_defaults(func=main)


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
        folder = (out[parent]["folder"] if parent
                  else runs_dir / str(node["inputs"].get("run_name", "treerpo-run")).strip())
        out[nid] = {"folder": folder, "parent": parent, "iterations": int(node["inputs"].get("iterations", 1))}
    return out


def command_key(prompt: dict) -> str:
    """What identifies 'the same command' for resuming: the prompt without on_existing."""
    clean = {k: {**v, "inputs": {n: x for n, x in v["inputs"].items()
                                 if not (v["class_type"] == TRAINER and n == "on_existing")},
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
            notes.append(f"{folder.name}: "
                         f"{'restarting' if start == 0 and current else 'continuing' if start else 'starting'} "
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
    except (WorkflowError, BadInput) as e:
        rep.error(str(e))
        rep.emit("done", status="bad_input", exit_code=EXIT_USAGE, message=str(e))
        return EXIT_USAGE
    finally:
        rep.close()


def _main(args, rep: Reporter) -> int:
    from . import comfy_env
    from ..core import distributed as dist

    wf = load_workflow(args.workflow)  # a broken file fails before anything heavy
    if args.server:
        from .remote import run_remote

        return run_remote(args, wf, rep)
    for option in ("output", "base_directory"):  # ComfyUI creates them; a file there fails late and obscurely
        if getattr(args, option):
            output_dir(getattr(args, option), f"--{option.replace('_', '-')}")
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
    if not args.cpu and not _accelerator():
        rep.notice("no GPU found (torch sees no CUDA, MPS or XPU device): running on the CPU, as with --cpu")
        args.cpu = True

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
        rep.error(f"ComfyUI {comfy_dir} cannot be imported by {sys.executable}: {e} "
                  "(pass --python with ComfyUI's Python)")
        return EXIT_NO_COMFY
    rep.emit("comfyui", path=str(comfy_dir), python=sys.executable, seconds=round(time.time() - t0, 1))

    info = comfy.object_info(sorted(node_types(wf)))
    prompt, _, applied = build_prompt(wf, info, args.sets, args.workflow, "in this ComfyUI")
    for nid, name, value in applied:
        rep.emit("set", node=nid, input=name, value=value)

    import folder_paths

    from ..nodes.common import RUNS_FOLDER

    # validated as given, before plan_resume rewrites the trainers' iterations (never below 0, so a
    # negative count would slip through) and on_existing; ComfyUI runs the valid outputs and drops
    # the others: a headless run must not
    ok, err, outputs, node_errors = comfy.validate(prompt)
    if not ok or node_errors:
        raise WorkflowError(validation_message(err, node_errors, prompt))
    runs = trainer_runs(prompt, Path(folder_paths.get_output_directory()) / RUNS_FOLDER)
    journals, notes = plan_resume(prompt, runs, args.restart)

    rep.line(describe_batch(prompt, world))
    rep.emit("start", world_size=world, workflow=str(args.workflow),
             runs={str(f): j["targets"] for f, j in journals.items()})
    for note in notes:
        rep.line(note)
    if args.dry_run:
        print_plan(prompt, info, runs, rep)
        rep.emit("done", status="dry_run", exit_code=EXIT_OK)
        return EXIT_OK

    # no barrier needed: a rank reading the journal rank 0 just wrote computes the same plan (same
    # command, same checkpoint), and the process group is accelerate's, made when the trainer opens
    for folder, j in journals.items():
        j["world_size"] = world
        if rank == 0:
            _write_journal(folder, j)
    return _execute(comfy, prompt, outputs, runs, journals, rep, args, rank)


def _accelerator() -> bool:
    """Would ComfyUI find a device besides the CPU? (without --cpu it initialises CUDA unless it finds MPS or
    XPU, and dies with a driver error on a machine with neither)."""
    import torch

    xpu = getattr(torch, "xpu", None)
    return bool(torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu and xpu.is_available()))


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
