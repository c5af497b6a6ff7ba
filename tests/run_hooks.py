"""Test launcher: ``python tests/run_hooks.py run ...`` is ``treerpo run ...`` (package imported
from this repository, as cli/_launch.py does) with faults and probes the tests set through the
environment, so production code carries no test switches:

TREERPO_TEST_KILL=phase:n   SIGKILL this process at the n-th (1-based) call of phase:
                            rollout (a tree rollout), update (an optimizer step),
                            checkpoint (a tensor file of a training checkpoint, written but the
                            checkpoint not yet complete), lora (a tensor file written by Save LoRA)
TREERPO_TEST_RAISE=rank:n   raise RuntimeError on that rank at its n-th optimizer step (the time
                            goes to DIR/raised_at when TREERPO_TEST_DUMP is set)
TREERPO_TEST_DUMP=DIR       after every optimizer step, save this rank's trainable weights to
                            DIR/rank<r>-step<k>.pt
"""

import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _counter(phase: str):
    spec = os.environ.get("TREERPO_TEST_KILL", "")
    want = int(spec.split(":")[1]) if spec.startswith(phase + ":") else None
    seen = [0]

    def hit() -> None:
        seen[0] += 1
        if want is not None and seen[0] == want:
            sys.stderr.write(f"test hook: SIGKILL at {phase} #{want}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def install() -> None:
    import safetensors.torch as st
    import torch

    from treerpo.core import trainer as trainer_mod

    rollout_hit, update_hit = _counter("rollout"), _counter("update")
    ckpt_hit, lora_hit = _counter("checkpoint"), _counter("lora")
    rank = int(os.environ.get("RANK", "0"))
    raise_spec = os.environ.get("TREERPO_TEST_RAISE", "")
    dump = os.environ.get("TREERPO_TEST_DUMP")

    real_rollout = trainer_mod.rollout_batch

    def rollout(*a, **k):
        rollout_hit()
        return real_rollout(*a, **k)

    trainer_mod.rollout_batch = rollout
    real_step = trainer_mod.Trainer._optimizer_step
    steps = [0]

    def optimizer_step(self, stats):
        steps[0] += 1
        update_hit()
        if raise_spec and raise_spec == f"{rank}:{steps[0]}":
            if dump:
                Path(dump).mkdir(parents=True, exist_ok=True)
                (Path(dump) / "raised_at").write_text(repr(time.time()))
            raise RuntimeError(f"test hook: failure on rank {rank} at optimizer step {steps[0]}")
        real_step(self, stats)
        if dump:
            Path(dump).mkdir(parents=True, exist_ok=True)
            torch.save({n: p.detach().cpu().clone() for n, p in zip(self.param_names, self.params)},
                       Path(dump) / f"rank{rank}-step{steps[0]}.pt")

    trainer_mod.Trainer._optimizer_step = optimizer_step
    real_save = st.save_file

    def save_file(tensors, filename, *a, **k):
        real_save(tensors, filename, *a, **k)
        name = str(filename)
        if "/checkpoints/.step-" in name:
            ckpt_hit()
        elif ".state/" in name or "/loras/" in name:
            lora_hit()

    st.save_file = save_file


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
    sys.path.insert(0, str(REPO / "cli"))
    from _launch import _import_package  # noqa: E402

    sys.path.pop(0)
    _import_package(REPO)
    install()
    from treerpo.cli.main import main

    sys.exit(main(sys.argv[1:]))
