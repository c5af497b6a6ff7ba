"""`treerpo run` killed with SIGKILL at five points (rollout, update, checkpoint write, LoRA write)
and rerun with the same command reaches the same final LoRA as an uninterrupted run; a partly
written checkpoint is never read back (the run resumes from the last complete one)."""

import json

import pytest

from runcli import TRAINER, checkpoint_step, hooked, lora_tensors, loras, max_diff, metrics, run_args, run_folder

# (fault, what it hits); checkpoint:3 is the 2nd checkpoint's first file (each has two tensor files)
KILLS = [
    ("rollout:1", "rollout of iteration 1"),
    ("update:3", "3rd optimizer step"),
    ("checkpoint:3", "checkpoint write of iteration 2 (weights written, checkpoint incomplete)"),
    ("rollout:3", "rollout of iteration 3"),
    ("lora:1", "Save LoRA writing the file, training done"),
]
TABLE = []


@pytest.fixture(scope="module")
def reference(comfy_runtime, tmp_path_factory):
    base = tmp_path_factory.mktemp("kill-ref")
    p = hooked(comfy_runtime, *run_args(base))
    assert p.returncode == 0, p.stderr[-3000:]
    return lora_tensors(loras(base)[-1])


@pytest.mark.parametrize("fault,where", KILLS, ids=[k for k, _ in KILLS])
def test_sigkill_then_rerun_reaches_the_same_lora(comfy_runtime, reference, tmp_path, fault, where):
    killed = hooked(comfy_runtime, *run_args(tmp_path), TREERPO_TEST_KILL=fault)
    assert killed.returncode == -9, f"not killed at {fault}: rc {killed.returncode}\n{killed.stderr[-3000:]}"
    resumed = checkpoint_step(tmp_path)
    journal = json.loads((run_folder(tmp_path) / "headless.json").read_text())
    assert journal["finished"] is False and journal["targets"] == {TRAINER: 3}

    again = hooked(comfy_runtime, *run_args(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    assert checkpoint_step(tmp_path) == 3
    # the metrics hold each iteration once: nothing from the killed attempt past its checkpoint
    assert [m["iteration"] for m in metrics(tmp_path)] == [1, 2, 3]
    diff = max_diff(lora_tensors(loras(tmp_path)[-1]), reference)
    TABLE.append((fault, where, resumed, diff))
    print(f"\nkill {fault:13s} ({where}): resumed at iteration {resumed}, max |dW| vs uninterrupted {diff:.3g}")
    assert diff <= 1e-6
