"""Bad input to every `treerpo` command, as one table (docs/cli.md, "Errors and exit codes"): each
case must end with ONE line on stderr naming the culprit, the documented exit code, no traceback,
and no output folder created. The command runs in-process; the cases that need ComfyUI loaded run
it as a user does (a subprocess, `slow` and, through the fixture, `comfy`)."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from runcli import REPO, TINY, base_dir, run_folder, treerpo
from treerpo.cli.main import main
from treerpo.core.run_lock import RunLock

MODEL = REPO / "pretrained" / "tiny-shapes"
# mode 0200 with no read handler: even root gets EACCES (chmod cannot make a file unreadable to root)
UNREADABLE = Path("/proc/sys/vm/compact_memory")


@dataclass
class Case:
    argv: str  # formatted with the paths of `inputs` and {out}, then split like a shell line
    code: int
    message: str  # in the one line on stderr
    setup: str | None = None  # see _setup
    absent: str | None = "{out}"  # must not exist afterwards


# small enough that a case which wrongly gets past the checks ends in seconds, not hours
TRAIN = "train --model {model} --prompts {prompts} --rewards brightness --out {out} --iterations 1 --resolution 64"
LEARN = "bench learn --quick --out {out}"
RUN = "run {workflow} --cpu"

CASES = {
    # the command line itself
    "no command": Case("", 2, "required: command"),
    "unknown command": Case("nosuch", 2, "invalid choice: 'nosuch'"),
    "presets: extra argument": Case("presets --all", 2, "unrecognized arguments: --all"),
    # train: the prompt file
    "prompts missing": Case(TRAIN + " --prompts {tmp}/none.txt", 2, "--prompts {tmp}/none.txt: no such prompt file"),
    "prompts /dev/null": Case(TRAIN + " --prompts /dev/null", 2, "/dev/null: a character device, not a regular file"),
    "prompts a folder": Case(TRAIN + " --prompts {folder}", 2, "a folder, expected a prompt file"),
    "prompts empty": Case(TRAIN + " --prompts {empty}", 2, "one prompt per line) is empty"),
    "prompts blank lines": Case(TRAIN + " --prompts {blank}", 2, "holds only blank lines"),
    "prompts not UTF-8": Case(TRAIN + " --prompts {latin1}", 2, "not UTF-8 text (byte 0xe9 at offset 1)"),
    "prompts unreadable": Case(TRAIN + f" --prompts {UNREADABLE}", 2, "cannot be read (Permission denied)",
                               setup="unreadable"),
    # train: rewards, presets, settings, numbers
    "rewards unknown": Case(TRAIN + " --rewards nosuch", 2, "--rewards nosuch: unknown reward 'nosuch'"),
    "rewards bad weight": Case(TRAIN + " --rewards brightness:x", 2, "weight 'x' of 'brightness' is not a number"),
    "rewards no models folder": Case(TRAIN + " --rewards hps", 2, "--rewards hps: no models folder given"),
    "rewards files missing": Case(TRAIN + " --rewards hps --reward-models-dir {folder}", 2,
                                  "HPS_v2.1_compressed.pt not found"),
    "preset unknown": Case(TRAIN + " --preset grpo-xl", 2, "unknown preset 'grpo-xl'"),
    "set unknown key": Case(TRAIN + " --set nosuch=1", 2, "unknown setting(s) ['nosuch']"),
    "set wrong type": Case(TRAIN + " --set lr=abc", 2, "--set lr='abc': lr takes values of type float"),
    "set no value": Case(TRAIN + " --set lr", 2, "--set expects key=value"),
    "set bad value": Case(TRAIN + " --set branching=[2,0]", 2, "branching must be a non-empty list"),
    "lr negative": Case(TRAIN + " --lr -1", 2, "lr must be"),
    "lr not a number": Case(TRAIN + " --lr abc", 2, "argument --lr: invalid float value: 'abc'"),
    "iterations negative": Case(TRAIN + " --iterations -3", 2, "argument --iterations: must be an integer >= 1"),
    "num-steps zero": Case(TRAIN + " --num-steps 0", 2, "argument --num-steps: must be an integer >= 1"),
    "rank zero": Case(TRAIN + " --rank 0", 2, "argument --rank: must be an integer >= 1, got 0"),
    "alpha zero": Case(TRAIN + " --alpha 0", 2, "argument --alpha: must be a number > 0"),
    "checkpoint-every zero": Case(TRAIN + " --checkpoint-every 0", 2, "argument --checkpoint-every"),
    "resolution zero": Case(TRAIN + " --resolution 0", 2, "argument --resolution: must be an integer >= 1"),
    "resolution not a multiple": Case(TRAIN + " --resolution 36", 2, "--resolution 36: must be a multiple of 8"),
    # train: the model
    "model missing": Case(TRAIN + " --model {tmp}/nowhere", 2, "FLUX model folder not found"),
    "model empty folder": Case(TRAIN + " --model {folder}", 2, "is missing transformer/"),
    "model truncated weights": Case(TRAIN + " --model {truncated}", 2, "model.safetensors is truncated"),
    "model broken config": Case(TRAIN + " --model {badconfig}", 2, "config.json is not valid JSON"),
    "model not safetensors": Case(TRAIN + " --model {prompts}", 2, "not a safetensors file"),
    "model single file, no config": Case(TRAIN + " --model {model}/transformer/diffusion_pytorch_model.safetensors", 2,
                                         "matches neither bundled config"),
    "model single file alone": Case(TRAIN + " --model {single}", 2, "text encoders were not given"),
    "vae a folder": Case(TRAIN + " --model {single} --vae {folder}", 2, "is a folder, expected a .safetensors file"),
    # train: the run folder
    "out is a file": Case(TRAIN + " --out {file}", 2, "--out {file}: a file is there, expected a folder", absent=None),
    "out below a file": Case(TRAIN + " --out {file}/run", 2, "cannot be created, {file} is a file",
                             absent="{file}/run"),
    "out not creatable": Case(TRAIN + " --out /proc/treerpo-test-run", 2, "/proc/treerpo-test-run: cannot",
                              absent="/proc/treerpo-test-run"),
    "out holds a run": Case(TRAIN, 2, "already holds a run; pass --resume", setup="run", absent=None),
    "resume without a run": Case(TRAIN + " --resume", 2, "--resume: no checkpoint at"),
    "out in use": Case(TRAIN, 2, "in use by another training (process", setup="busy", absent=None),
    # demo
    "demo out is a file": Case("demo --out {file}", 2, "--out {file}: a file is there", absent=None),
    "demo iterations zero": Case("demo --out {out} --iterations 0", 2, "argument --iterations"),
    # bench
    "bench unknown": Case("bench flops", 2, "invalid choice: 'flops'"),
    "nfe preset unknown": Case("bench nfe --presets mixgrpo,nosuch", 2, "--presets nosuch: unknown preset"),
    "nfe presets empty": Case("bench nfe --presets ,", 2, "--presets is empty"),
    "nfe iterations negative": Case("bench nfe --iterations -1", 2, "argument --iterations"),
    "nfe json a folder": Case("bench nfe --json {folder}", 2, "--json {folder}: a folder, expected a file name"),
    "nfe json below a file": Case("bench nfe --json {file}/nfe.json", 2, "cannot be created, {file} is a file"),
    "speed model missing": Case("bench speed --model {tmp}/nowhere", 2, "FLUX model folder not found"),
    "speed size preset": Case("bench speed --model flux-width:2", 2, "expected NAME or NAME:DOUBLE:SINGLE"),
    "speed resolution": Case("bench speed --model tiny-shapes --resolution 36", 2, "must be a multiple of 8"),
    "speed repeats zero": Case("bench speed --repeats 0", 2, "argument --repeats"),
    "speed window negative": Case("bench speed --window-start -2", 2, "--window-start: must be an integer >= 0"),
    "speed peak zero": Case("bench speed --peak-tflops 0", 2, "argument --peak-tflops: must be a number > 0"),
    "speed steps too few": Case("bench speed --presets dynamic-treerpo --num-steps 4", 2, "sigma > 0"),
    "ratio truncated model": Case("bench ratio --model {truncated}", 2, "is truncated"),
    "gpu without a GPU": Case("bench gpu --out {out}", 2, "pass --cpu-smoke", setup="no-cuda"),
    "gpu out is a file": Case("bench gpu --cpu-smoke --out {file}", 2, "--out {file}: a file is there", absent=None),
    "learn preset unknown": Case(LEARN + " --presets tree-x", 2, "unknown preset 'tree-x' in --presets"),
    "learn variant unknown": Case(LEARN + " --variants nope", 2, "--variants 'nope'"),
    "learn variant bad setting": Case(LEARN + " --variants mixgrpo+noise_level=-1", 2, "noise_level must be > 0"),
    "learn reward unknown": Case(LEARN + " --reward nosuch", 2, "--reward nosuch: unknown reward"),
    "learn seeds zero": Case(LEARN + " --seeds 0", 2, "argument --seeds"),
    "learn lr-scale zero": Case(LEARN + " --lr-scale 0", 2, "argument --lr-scale"),
    "learn too many prompts": Case(LEARN + " --eval-prompts 100000", 2, "--eval-prompts 100000: the validation set"),
    "learn model missing": Case(LEARN + " --model {tmp}/nowhere", 2, "FLUX model folder not found"),
    "learn out below a file": Case("bench learn --out {file}/learn", 2, "cannot be created", absent="{file}/learn"),
    "replot without learn.json": Case("bench learn --replot --out {folder}", 2, "no such learn.json"),
    "replot broken learn.json": Case("bench learn --replot --out {out}", 2, "learn.json: not valid JSON",
                                     setup="bad-learn-json", absent=None),
    # run, up to loading ComfyUI (the cases past it: RUN_CASES)
    "run workflow missing": Case("run {tmp}/none.json", 2, "no such workflow file"),
    "run workflow a folder": Case("run {folder}", 2, "a folder, expected a workflow file"),
    "run workflow empty": Case("run {empty}", 2, "the workflow file is empty"),
    "run workflow not UTF-8": Case("run {latin1}", 2, "not UTF-8 text"),
    "run workflow not JSON": Case("run {prompts}", 2, "not valid JSON (line 1"),
    "run gpus zero": Case(RUN + " --gpus 0", 2, "argument --gpus: must be an integer >= 1"),
    "run output is a file": Case(RUN + " --output {file}", 2, "--output {file}: a file is there", absent=None),
    "run base below a file": Case(RUN + " --base-directory {file}/base", 2, "cannot be created, {file} is a file",
                                  absent="{file}/base"),
    "run not a ComfyUI": Case(RUN + " --comfyui {folder}", 3, "is not a ComfyUI folder"),
    "run python missing": Case(RUN + " --comfyui {comfyui} --python {tmp}/python", 3,
                               "--python/COMFYUI_PYTHON {tmp}/python does not exist"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Read-only inputs of the cases: good and bad prompt files, folders, damaged model folders."""
    d = tmp_path_factory.mktemp("inputs")
    paths = {"tmp": d, "model": MODEL, "workflow": TINY, "folder": d / "folder", "file": d / "a-file",
             "prompts": d / "prompts.txt", "empty": d / "empty.txt", "blank": d / "blank.txt",
             "latin1": d / "latin1.txt", "single": d / "single" / "transformer.safetensors", "comfyui": d / "ComfyUI"}
    paths["folder"].mkdir()
    paths["file"].write_text("not a folder\n")
    paths["prompts"].write_text("a red cube\n")
    paths["empty"].write_bytes(b"")
    paths["blank"].write_text("\n   \n\n")
    paths["latin1"].write_bytes("caf\u00e9\n".encode("latin-1")[::-1])  # 0xe9 at offset 1
    # the bundled transformer as a single file, its config beside it (a usable transformer, nothing else)
    paths["single"].parent.mkdir()
    paths["single"].symlink_to(MODEL / "transformer" / "diffusion_pytorch_model.safetensors")
    shutil.copy(MODEL / "transformer" / "config.json", paths["single"].with_suffix(".json"))
    (paths["comfyui"] / "comfy").mkdir(parents=True)  # what passes for a ComfyUI folder
    for name in ("execution.py", "folder_paths.py"):
        (paths["comfyui"] / name).touch()
    for name, damage in (("truncated", "weights"), ("badconfig", "config")):
        paths[name] = _damaged_model(d / name, damage)
    return paths


def _damaged_model(root: Path, damage: str) -> Path:
    """tiny-shapes with one part damaged: its transformer weights cut in half, or its config not JSON;
    the other parts are links to the bundled model."""
    root.mkdir()
    for part in MODEL.iterdir():
        if part.name != "transformer":
            (root / part.name).symlink_to(part)
    t = root / "transformer"
    t.mkdir()
    weights = (MODEL / "transformer" / "diffusion_pytorch_model.safetensors").read_bytes()
    (t / "diffusion_pytorch_model.safetensors").write_bytes(weights[: len(weights) // 2] if damage == "weights"
                                                          else weights)
    config = (MODEL / "transformer" / "config.json").read_text()
    (t / "config.json").write_text("{" if damage == "config" else config)
    return root


@contextlib.contextmanager
def _setup(kind: str | None, out: Path):
    """What a case needs around it: a finished run or a running one in {out}, a broken learn.json."""
    if kind == "unreadable" and (not UNREADABLE.exists() or os.access(UNREADABLE, os.R_OK)):
        pytest.skip(f"{UNREADABLE} is readable here")
    if kind == "no-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if kind == "run":
        (out / "checkpoints").mkdir(parents=True)
        (out / "checkpoints" / "latest").write_text("step-000001")
    if kind == "bad-learn-json":
        out.mkdir()
        (out / "learn.json").write_text("{")
    if kind == "busy":
        with RunLock(out):  # another training: flock refuses a second holder, in this process too
            yield
        return
    yield


@pytest.fixture
def no_processes(monkeypatch):
    """A rejected command starts nothing: a case that got past its checks fails instead of running."""
    def refuse(*a, **k):
        raise AssertionError(f"a process was started: {a[:2]}")

    monkeypatch.setattr(os, "execve", refuse)
    monkeypatch.setattr(subprocess, "call", refuse)
    monkeypatch.setattr(subprocess, "run", refuse)


def _one_line(err: str, allowed: tuple[str, ...] = ()) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(allowed)]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line(name, inputs, tmp_path, capsys, monkeypatch, no_processes):
    case = CASES[name]
    monkeypatch.delenv("TREERPO_MODELS_DIR", raising=False)
    paths = {**inputs, "out": tmp_path / "out"}
    argv = shlex.split(case.argv.format(**paths))
    with _setup(case.setup, paths["out"]):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    line = _one_line(capsys.readouterr().err)
    assert code == case.code and case.message.format(**paths) in line, (code, line)
    assert "error:" in line
    if case.absent:
        assert not Path(case.absent.format(**paths)).exists(), f"{case.absent} was created"


# ---------------------------------------------------------------------------- through ComfyUI
RUN_CASES = {  # --set, the message; ComfyUI's own validation refuses the prompt (--dry-run validates too)
    "negative iterations": (["--set", "TreeRPOTrainerStep.iterations=-1"], "Value -1 smaller than min of 0"),
    "run name outside the runs folder": (["--set", "TreeRPOTrainerStep.run_name=../x"], "must be a relative name"),
    "run folder in use": ([], "is in use by another training"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUN_CASES))
def test_run_rejects_the_prompt_in_one_line(name, comfy_runtime, tmp_path):
    extra, message = RUN_CASES[name]
    base = base_dir(tmp_path)
    folder = run_folder(base)
    busy = name == "run folder in use"
    if busy:
        folder.mkdir(parents=True)
    with RunLock(folder) if busy else contextlib.nullcontext():
        p = treerpo("run", TINY, "--cpu", "--base-directory", base, "--dry-run", *extra)
    line = _one_line(p.stderr, allowed=("ComfyUI ",))  # which ComfyUI runs, printed before it loads
    assert p.returncode == 2 and message in line, (p.returncode, p.stderr[-2000:])
    assert busy or not folder.exists()


@pytest.mark.slow
def test_run_without_a_gpu_runs_on_the_cpu(comfy_runtime, tmp_path):
    """No GPU and no --cpu: a notice, then the run on the CPU (here: its plan), not CUDA's init error."""
    p = treerpo("run", TINY, "--dry-run", "--base-directory", base_dir(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "note: no GPU found" in p.stderr and "running on the CPU, as with --cpu" in p.stderr
    assert "plan (execution order):" in p.stdout


def test_the_table_is_in_the_docs():
    """docs/cli.md lists the errors for users; every exit code used here is documented there."""
    text = (REPO / "docs" / "cli.md").read_text()
    section = text.split("## Errors and exit codes", 1)[1].split("\n## ", 1)[0]
    for code in {c.code for c in CASES.values()} | {0, 1, 130}:
        assert f"| {code} |" in section or f"**{code}**" in section, code
