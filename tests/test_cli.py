"""The `treerpo` command on the bundled tiny FLUX pipeline (both model routes)."""

import json

import pytest
import torch

from treerpo.cli.main import main
from treerpo.testing import build_tiny_flux


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny-flux"))


def test_presets_and_nfe_table(capsys, tmp_path):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert all(p in out for p in ["dynamic-treerpo", "mixgrpo-flash", "dancegrpo"])
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "lr=0.00015 (LoRA)" in lines["dynamic-treerpo"] and "every 1 <= 20" in lines["dynamic-treerpo"]
    assert "R=combined" in lines["dynamic-treerpo"] and "lr=0.0003 (LoRA)" in lines["mixgrpo"]
    assert "every 20" in lines["mixgrpo-flash"] and "weights=sum-to-1" in lines["mixgrpo"]
    assert "step=accumulated" in lines["dancegrpo"]
    assert main(["bench", "nfe", "--json", str(tmp_path / "nfe.json")]) == 0
    rows = {r["preset"]: r for r in json.loads((tmp_path / "nfe.json").read_text())["rows"]}
    tree = rows["dynamic-treerpo"]
    assert tree["iterations"] == 100 and tree["window_positions"] == "0..20"
    assert round(tree["nfe_old_per_sample"], 2) == 14.47 and round(tree["nfe_old_per_sample_positions"], 2) == 14.12
    assert rows["mixgrpo"]["nfe_old_per_sample"] == 25 and rows["dancegrpo"]["nfe_new_per_sample"] == 14
    capsys.readouterr()
    assert main(["bench", "nfe", "--preset", "mixgrpo-flash"]) == 0
    out = capsys.readouterr().out
    assert "each preset's default run" in out
    flash = [line for line in out.splitlines() if line.startswith("mixgrpo-flash")][0].split()
    assert flash[2] == "300" and float(flash[4]) == pytest.approx(15.6)  # their published 16


def test_train_resume_and_lora(tiny, tmp_path, capsys):
    from safetensors import safe_open

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\na blue ball\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny.diffusers), "--prompts", str(prompts), "--rewards", "brightness",
            "--out", str(out), "--resolution", "32", "--num-steps", "6", "--rank", "2", "--lr", "1e-3",
            "--max-sequence-length", "16", "--checkpoint-every", "1"]
    assert main(args + ["--iterations", "2"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    # the run's length is the config's (sft_decay's horizon), not the preset's default 100
    assert json.loads((out / "config.json").read_text())["iterations"] == 2
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any("iteration" in k and v == "2" for k, v in meta.items())
    with pytest.raises(SystemExit, match="--resume"):
        main(args + ["--iterations", "3"])
    assert main(args + ["--iterations", "3", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert (out / "checkpoints" / "step-000003").is_dir()
    assert not (out / "lora_ema.safetensors").exists()


def test_train_writes_the_ema_lora_beside_the_lora(tiny, tmp_path):
    from safetensors.torch import load_file

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny.diffusers), "--prompts", str(prompts), "--rewards", "brightness",
                 "--out", str(out), "--resolution", "32", "--num-steps", "6", "--rank", "2", "--lr", "1e-2",
                 "--max-sequence-length", "16", "--iterations", "2", "--set", "ema_decay=0.5"]) == 0
    lora, ema = load_file(str(out / "lora.safetensors")), load_file(str(out / "lora_ema.safetensors"))
    assert lora.keys() == ema.keys()
    b_keys = [k for k in lora if "lora_B" in k]
    # B starts at 0 and trains, so the EMA (half of it after two updates) differs from the weights
    assert b_keys and any(not torch.equal(lora[k], ema[k]) for k in b_keys)


def test_train_single_files_route(tiny, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["train", "--model", str(tiny.transformer), "--clip-l", str(tiny.clip_l), "--t5", str(tiny.t5xxl),
                 "--vae", str(tiny.vae), "--prompts", str(prompts), "--rewards", "saturation", "--out",
                 str(tmp_path / "r"), "--resolution", "32", "--num-steps", "4", "--iterations", "1", "--rank", "2",
                 "--max-sequence-length", "16", "--set", "branching=[2,1]"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--set", "branching=[2,0]"], "branching"),
        (["--preset", "grpo-xl"], "unknown preset"),
        (["--resolution", "40"], "multiple of 16"),
    ],
)
def test_train_bad_input(tiny, tmp_path, extra, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(SystemExit, match=message):
        main(["train", "--model", str(tiny.diffusers), "--prompts", str(prompts), "--rewards", "brightness",
              "--out", str(tmp_path / "r"), "--max-sequence-length", "16", "--iterations", "1"] + extra)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(SystemExit, match="prompt file"):
        main(["train", "--model", "x", "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "r")])


@pytest.mark.slow
def test_bench_speed_runs_side_by_side(tiny, tmp_path, monkeypatch, capsys):
    import treerpo.cli.models as models

    monkeypatch.setattr(models, "tiny_flux_dir", lambda root=None: tiny.diffusers)
    with pytest.raises(SystemExit, match="sigma > 0"):  # depth 4 in 4 steps: the last SDE step would hit 0
        main(["bench", "speed", "--presets", "dynamic-treerpo", "--num-steps", "4"])
    assert main(["bench", "speed", "--presets", "dynamic-treerpo,mixgrpo", "--num-steps", "5", "--repeats", "1",
                 "--resolution", "32", "--json", str(tmp_path / "s.json")]) == 0
    rows = json.loads((tmp_path / "s.json").read_text())["rows"]
    assert [r["preset"] for r in rows] == ["dynamic-treerpo", "mixgrpo"]
    assert all(r["seconds_per_iteration"] > 0 for r in rows)
    assert rows[0]["samples_per_prompt"] == 8 and rows[1]["samples_per_prompt"] == 12
    assert "iteration time / dynamic-treerpo" in capsys.readouterr().out


@pytest.mark.slow
def test_documented_torchrun_line_starts_the_processes_it_claims(tiny, tmp_path):
    """README: `torchrun --nproc-per-node N -m treerpo.cli.main train ...` runs N data-parallel processes."""
    import os
    import subprocess
    import sys

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\n")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "treerpo.cli.main", "train", "--model", str(tiny.diffusers), "--prompts", str(prompts),
           "--rewards", "brightness", "--out", str(out), "--resolution", "32", "--num-steps", "6", "--rank", "2",
           "--max-sequence-length", "16", "--iterations", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout and "2 prompt(s) per iteration" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2 and config["global_prompts_per_iteration"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes
