"""`treerpo bench speed` / `bench learn` / the GPU suite, in their quick forms: output shape and
counts against the engine's NFE formula (no test asserts a time)."""

import json

import pytest
import torch

from treerpo.cli.main import main
from treerpo.core.presets import make_config
from treerpo.core.tree import TreeSpec, tree_nfe


def test_flux_flops_formula_matches_a_flop_counter():
    """The FLOP count behind the utilisation estimate equals what torch counts on a real forward
    (math attention, so attention's matmuls are visible); the per-sample modulation it leaves
    out is the small rest."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from treerpo.cli.bench import flux_forward_flops
    from treerpo.cli.models import load_stack

    stack = load_stack("flux-narrow:2:3", rank=2)
    cond = stack.encode(["a red cube"])[0]
    x = torch.randn(1, 16, 16, 16)  # 64 image tokens, 16 text tokens
    with torch.no_grad(), stack.policy.reference(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        stack.policy(x, torch.tensor([0.5]), cond)
    f = flux_forward_flops(stack.policy.transformer.config, 64, cond["prompt_embeds"].shape[1])
    assert f["total"] == f["linear"] + f["attention"] and f["attention"] > 0
    assert fc.get_total_flops() == pytest.approx(f["total"], rel=0.03)
    assert fc.get_total_flops() >= f["total"]  # only per-sample terms are left out


def test_size_presets_have_flux_shapes():
    from treerpo.cli.models import parse_size_preset, random_stack
    from treerpo.core.models import LoraSettings

    assert parse_size_preset("flux-width") == ("flux-width", 2, 4)
    assert parse_size_preset("flux-width:19:38") == ("flux-width", 19, 38)
    with pytest.raises(SystemExit, match="NAME:DOUBLE:SINGLE"):
        parse_size_preset("flux-width:2")
    with pytest.raises(SystemExit, match="unknown size preset"):
        parse_size_preset("flux-huge")
    stack = random_stack("flux-narrow", LoraSettings(2, 2))
    cond = stack.encode(["a", "a", "b"])
    assert torch.equal(cond[0]["prompt_embeds"], cond[1]["prompt_embeds"])  # fixed per prompt
    assert not torch.equal(cond[0]["prompt_embeds"], cond[2]["prompt_embeds"])
    # flux-width on the meta device: the shapes, not the memory
    from diffusers import FluxTransformer2DModel

    from treerpo.core.models import bundled_config

    cfg = {k: v for k, v in bundled_config("flux-dev")["transformer"].items() if not k.startswith("_")}
    with torch.device("meta"):
        t = FluxTransformer2DModel(**dict(cfg, num_layers=2, num_single_layers=4))
    assert t.config.num_attention_heads * t.config.attention_head_dim == 3072
    assert list(t.config.axes_dims_rope) == [16, 56, 56] and t.config.joint_attention_dim == 4096


def test_bench_speed_quick_memory_and_counts(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--quick", "--model", "flux-narrow", "--presets", "dynamic-treerpo,mixgrpo",
                 "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["isolated"] is True and data["num_steps"] == 6 and data["resolution"] == 32
    rows = {r["preset"]: r for r in data["rows"]}
    assert list(rows) == ["dynamic-treerpo", "mixgrpo"]
    for name, r in rows.items():
        cfg = make_config(name, num_steps=6, window_mode="frozen", window_start=data["window_start"])
        nfe = tree_nfe(TreeSpec(6, data["window_start"], cfg.branching), cfg.share_prefix)
        assert r["rollout_forwards"] == nfe["rollout_total"] * data["prompts"]
        assert r["update_forwards"] == nfe["train_total"] * data["prompts"]
        assert r["ratio_first_update"] == 1.0
        assert r["peak_memory_gib"] >= r["memory_at_start_gib"] > 0
        assert r["flops_per_iteration"] > 0 and r["tflops_achieved"] > 0 and r["mfu"] is None  # no known CPU peak
    assert "peak GiB" in capsys.readouterr().out


def test_gpu_script_cpu_smoke(tmp_path):
    """bench/gpu.sh --cpu-smoke --no-venv: the GPU run's whole path on the CPU at tiny sizes."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(script), "--cpu-smoke", "--no-venv"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = (tmp_path / "out" / "gpu-bench.log").read_text()
    assert "checks passed" in log
    data = json.loads((tmp_path / "out" / "gpu-bench.json").read_text())
    assert data["cpu_smoke"] is True and data["ok"] is True
    c = data["checks"]
    assert c["iterations"] == 20 and len(c["ratio_first_update"]) == 20 and c["ratio_first_update"][0] == 1.0
    assert c["non_finite"] == [] and c["lora_weights_finite"] and c["lora_weights_changed"]
    assert len(set(c["window_starts"])) > 1  # the window moved over the schedule
    rows = data["speed"]["rows"]
    assert [r["preset"] for r in rows] == ["dynamic-treerpo", "mixgrpo", "mixgrpo-flash", "dancegrpo"]
    assert data["speed"]["isolated"] is True and data["speed"]["mixed_precision"] == "bf16"
    for r in rows:
        assert r["peak_memory_gib"] > 0 and r["flops_per_iteration"] > 0 and "mfu" in r
    assert rows[0]["samples_per_prompt"] == 8 and rows[1]["samples_per_prompt"] == 12
    assert [r["update_forwards"] for r in rows[:2]] == [15 * 2, 48 * 2]  # tree parents vs 12 x 4 per prompt
