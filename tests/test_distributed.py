"""Data parallel on the CPU: two processes (torch.distributed, gloo) through accelerate."""

import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    sys.path.insert(0, os.path.dirname(__file__))
    from accelerate import Accelerator

    from toy import Brightness, ToyVelocity, toy_encode
    from treerpo.core.presets import make_config
    from treerpo.core.trainer import Trainer

    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    t = Trainer(ToyVelocity(), make_config(num_steps=6, lr=3e-2, window_every=1), Brightness(), encode=toy_encode,
                latent_shape=(4, 8, 8), accelerator=acc)
    initial = t.trainable_state_dict()
    hist = t.train(["a", "b", "c", "d"], 2, progress=False)
    torch.save({"state": t.trainable_state_dict(), "initial": initial, "history": hist, "world": acc.num_processes,
                "prompts": t.prompts_for(["a", "b", "c", "d"], 0)}, os.path.join(out_dir, f"rank{rank}.pt"))
    acc.end_training()


REDUCED = ("reward_mean", "reward/brightness/mean", "reward/brightness/std", "group_reward_std",
           "zero_variance_groups", "zero_std_group_frac", "masked_samples", "ratio_mean", "ratio_mean_raw",
           "ratio_first_update", "approx_kl", "clip_frac_high", "clip_frac_low", "loss", "sft_loss", "kl",
           "grad_norm", "eps_mean", "eps_min", "eps_max", "nfe_old_counted")


@pytest.mark.slow
def test_two_processes_stay_in_sync(tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["world"] == 2
    assert r0["prompts"] != r1["prompts"]  # each process takes its own prompts
    for n in r0["state"]:
        torch.testing.assert_close(r0["state"][n], r1["state"][n])  # gradients were averaged
    # metrics gather rewards of both processes: identical on both ranks
    assert r0["history"][-1]["reward_mean"] == pytest.approx(r1["history"][-1]["reward_mean"])
    assert r0["history"][-1]["nfe_old_counted"] > 0


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_prompts(tmp_path):
    from toy import Brightness, ToyVelocity, toy_encode
    from treerpo.core.presets import make_config
    from treerpo.core.trainer import Trainer

    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.manual_seed(0)
    one = Trainer(ToyVelocity(), make_config(num_steps=6, lr=3e-2, window_every=1, prompts_per_iteration=2),
                  Brightness(), encode=toy_encode, latent_shape=(4, 8, 8))
    assert one.prompts_for(["a", "b", "c", "d"], 0) == ranks[0]["prompts"] + ranks[1]["prompts"]
    hist = one.train(["a", "b", "c", "d"], 2, progress=False)
    for n, t in one.trainable_state_dict().items():
        assert not torch.equal(t, ranks[0]["initial"][n])  # it trained
        torch.testing.assert_close(ranks[0]["state"][n], t, rtol=1e-4, atol=1e-6)
    # rank 0 writes the metrics: every reduced one describes both processes' prompts, as one process
    # over the same global prompts does (and not rank 0's share: its prompts score differently)
    for key in REDUCED:
        for it in range(2):
            assert ranks[0]["history"][it][key] == pytest.approx(hist[it][key], rel=1e-4, abs=1e-9), (key, it)
    assert ranks[0]["history"][-1]["ratio_first_update"] == 1.0 == ranks[1]["history"][-1]["ratio_first_update"]
