"""`treerpo bench speed` / `bench learn` / the GPU suite, in their quick forms: output shape and
counts against the engine's NFE formula (no test asserts a time)."""

import json

import pytest
import torch

from treerpo.cli.main import main
from treerpo.core.presets import make_config
from treerpo.core.shapes.world import prompt_set
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_bench_speed_profile_splits_operator_time(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--quick", "--no-isolate", "--model", "flux-narrow", "--presets", "dynamic-treerpo",
                 "--profile", "4", "--json", str(out)]) == 0
    p = json.loads(out.read_text())["rows"][0]["profile"]
    assert p["clock"] == "cpu" and p["seconds"] > 0 and len(p["top"]) == 4
    assert abs(sum(k["share"] for k in p["kinds"].values()) - 1) < 1e-6
    assert p["kinds"]["matmul"]["share"] > 0 and p["kinds"]["attention"]["share"] > 0  # a transformer ran
    tops = [o["seconds"] for o in p["top"]]
    assert tops == sorted(tops, reverse=True) and all(o["calls"] >= 1 for o in p["top"])
    text = capsys.readouterr().out
    assert "where the time goes" in text and "top operators, dynamic-treerpo" in text


def test_op_kinds():
    from treerpo.cli.bench import op_kind

    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu_backward") == "attention"
    assert op_kind("aten::addmm") == op_kind("aten::mm") == "matmul"
    assert op_kind("aten::mkldnn_convolution") == "conv (VAE)"
    assert op_kind("aten::native_layer_norm") == "norm"
    assert op_kind("aten::mul") == "elementwise & other"


@pytest.mark.slow
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
        assert len(r["profile"]["top"]) == 8 and "matmul" in r["profile"]["kinds"]
    assert rows[0]["samples_per_prompt"] == 8 and rows[1]["samples_per_prompt"] == 12
    assert [r["update_forwards"] for r in rows[:2]] == [15 * 2, 48 * 2]  # tree parents vs 12 x 4 per prompt
    sweep = data["prompts_sweep"]  # the tree and MixGRPO at 1 and 2 prompts per iteration
    assert [(r["prompts"], r["preset"]) for r in sweep] == [(1, "dynamic-treerpo"), (1, "mixgrpo"),
                                                            (2, "dynamic-treerpo"), (2, "mixgrpo")]
    assert [r["update_forwards"] for r in sweep] == [15, 48, 30, 96]


def test_learn_variants_parse():
    from treerpo.cli.bench_learn import ABLATIONS, parse_variants, run_config

    v = parse_variants("dynamic-treerpo,mixgrpo", "R=running,mixgrpo+sampler=cps+noise_level=0.9")
    assert v == {"dynamic-treerpo": ("dynamic-treerpo", {}), "mixgrpo": ("mixgrpo", {}),
                 "R=running": ("dynamic-treerpo", {"clip_reward": "running"}),
                 "mixgrpo+sampler=cps+noise_level=0.9": ("mixgrpo", {"sampler": "cps", "noise_level": 0.9})}
    assert set(parse_variants("", "all")) == set(ABLATIONS)
    # a list value keeps its commas: variants split on commas outside brackets only
    v = parse_variants("", "dynamic-treerpo+branching=[8,1,1,1]+lr=1e-3,mixgrpo+window_mode='frozen'")
    assert v == {"dynamic-treerpo+branching=[8,1,1,1]+lr=1e-3": ("dynamic-treerpo", {"branching": [8, 1, 1, 1],
                                                                                      "lr": 1e-3}),
                 "mixgrpo+window_mode='frozen'": ("mixgrpo", {"window_mode": "frozen"})}
    for p, v, match in [("tree-x", None, "unknown preset"), ("", "nope", "--variants 'nope'"),
                        ("", "mixgrpo", "PRESET\\+KEY=VALUE"), ("", "", "nothing to run")]:
        with pytest.raises(SystemExit, match=match):
            parse_variants(p, v)
    for name, (preset, overrides) in ABLATIONS.items():  # every ablation is a valid config
        make_config(preset, **overrides)
    # a run's config lasts the run (sft_decay's horizon) unless the variant sets its own length
    settings = {"num_steps": 8, "prompts_per_iteration": 8, "lr_scale": 1.0, "iterations": 25}
    assert run_config("a", "dynamic-treerpo", {}, settings).iterations == 25
    assert run_config("b", "dynamic-treerpo", {"iterations": 7}, settings).iterations == 7


def test_learn_summary_ratios():
    from treerpo.cli.bench_learn import summary

    def pts(rewards, step_s, step_nfe, preset, group_std=0.1):
        return {"preset": preset,
                "eval": [{"iteration": 5 * i, "reward": {"mean": r, "std": 0.0}, "seconds": {"mean": step_s * i},
                          "nfe_old": {"mean": step_nfe * i}} for i, r in enumerate(rewards)],
                "train": [{"group_reward_std": {"mean": group_std * i}, "clip_frac": {"mean": 0.5}} for i in (1, 2)]}

    agg = {"mixgrpo+lr=1e-3": pts([0.1, 0.2, 0.3, 0.4], 10.0, 300, "mixgrpo"),
           "dynamic-treerpo": pts([0.1, 0.35, 0.45, 0.5], 4.0, 100, "dynamic-treerpo", group_std=0.2),
           "dancegrpo": pts([0.1, 0.15, 0.2, 0.25], 12.0, 300, "dancegrpo")}
    rows = {r["name"]: r for r in summary(agg)}
    ref = rows["mixgrpo+lr=1e-3"]  # the first run of the mixgrpo preset is the reference, variant or not
    assert ref["iteration"] == 15 and ref["seconds_ratio"] == 1.0 and ref["reference"] == "mixgrpo+lr=1e-3"
    assert rows["dynamic-treerpo"]["group_reward_std"] == pytest.approx(0.3) and ref["clip_frac"] == 0.5
    tree = rows["dynamic-treerpo"]  # first reaches 0.4 at its third point: 8 s, 200 NFE vs 30 s, 900 NFE
    assert tree["iteration"] == 10 and tree["seconds_ratio"] == pytest.approx(8 / 30)
    assert tree["nfe_ratio"] == pytest.approx(200 / 900)
    assert rows["dancegrpo"]["reached"] is False and rows["dancegrpo"]["seconds_ratio"] is None
    assert summary({"tree": agg["dynamic-treerpo"]}) == []  # no mixgrpo: no target


def test_a_fresh_run_samples_exactly_as_the_base_model():
    """bench learn scores every run at iteration 0 with the base model's evaluation: that holds only
    if a fresh run (LoRA up weights 0, with or without an EMA) samples the base's images bit for bit."""
    from treerpo.cli.bench_learn import DEFAULT_TASK, QUICK, evaluation, make_runs, parse_variants
    from treerpo.cli.models import latent_shape, load_stack
    from treerpo.core.evaluate import evaluate
    from treerpo.core.rewards import load_rewards

    stack = load_stack("tiny")
    shape, rewards = latent_shape(stack, 32), load_rewards("brightness")
    settings = {**QUICK, **DEFAULT_TASK, "num_steps": 5, "seeds": 1}
    runs = make_runs(stack, parse_variants("dynamic-treerpo,mixgrpo", "ema=0.9"), settings, rewards, shape)
    prompts, seeds = prompt_set("validation")[:2], [7, 8]
    base = evaluate(stack.policy, stack.encode, stack.decode, rewards, prompts, seeds, shape, runs[0].trainer.sigmas,
                    {"model": stack.policy.reference}, keep_images=0)
    for run in runs:
        assert torch.equal(evaluation(run, rewards, prompts, seeds, shape, "x").scores["model"], base.scores["model"])
    runs[0].trainer.step(prompts)  # one step later the scores differ: the comparison can fail
    assert not torch.equal(evaluation(runs[0], rewards, prompts, seeds, shape, "x").scores["model"],
                           base.scores["model"])


def test_bench_learn_tiny_run_counts_nfe_by_the_formula(tmp_path, capsys):
    from PIL import Image

    from treerpo.cli.bench import nfe_table

    out = tmp_path / "learn"
    assert main(["bench", "learn", "--model", "tiny", "--reward", "brightness", "--presets", "dynamic-treerpo,mixgrpo",
                 "--variants", "ema=0.9", "--iterations", "2", "--seeds", "2", "--eval-every", "1", "--num-steps", "6",
                 "--resolution", "32", "--train-prompts", "4", "--eval-prompts", "2", "--eval-seeds", "1",
                 "--out", str(out)]) == 0
    data = json.loads((out / "learn.json").read_text())
    assert data["eval_at"] == [0, 1, 2] and len(data["eval_prompts"]) == 2
    # the protocol's sets: the first training prompts, evaluated on the validation set
    assert data["train_prompts"] == prompt_set("train")[:4] and data["eval_prompts"] == prompt_set("validation")[:2]
    assert len(data["base"]["scores"]) == 2 and data["settings"]["eval_set"] == "validation"
    runs = data["runs"]
    assert sorted((r["name"], r["seed"]) for r in runs) == sorted(
        (n, s) for n in ("dynamic-treerpo", "mixgrpo", "ema=0.9") for s in (0, 1))
    P = data["settings"]["prompts_per_iteration"]
    for r in runs:
        assert [c["iteration"] for c in r["curve"]] == [1, 2] and [e["iteration"] for e in r["eval"]] == [0, 1, 2]
        row = nfe_table([r["preset"]], num_steps=6, iterations=2)[0]  # `treerpo bench nfe`'s formula
        assert r["curve"][-1]["nfe_old"] == row["nfe_old_per_prompt_run"] * 2 * P
        assert r["curve"][-1]["nfe_update"] == row["train_forwards_per_prompt"] * 2 * P
        assert r["eval"][-1]["nfe_old"] == r["curve"][-1]["nfe_old"]
        assert r["curve"][0]["seconds"] < r["curve"][1]["seconds"]  # cumulative
        c = r["curve"][0]
        assert c["eps_min"] <= c["eps_mean"] <= c["eps_max"] and c["group_reward_std"] >= 0
        assert c["ratio_first_update"] == 1.0
        assert 0 <= c["clip_frac"] <= 1 and c["grad_norm"] >= 0
        assert (c["sft_loss"] > 0) == (r["config"]["sft_lambda"] > 0)  # LayerTuning's term only where it is on
    fixed = [r for r in runs if r["preset"] == "mixgrpo"]
    assert all(c["eps_min"] == c["eps_max"] == pytest.approx(1e-4) for r in fixed for c in r["curve"])
    # every run starts at the base model (LoRA B = 0): its point at 0 is the base's, no gain
    assert len({r["eval"][0]["reward"] for r in runs}) == 1
    assert all(r["eval"][0]["scores"] == data["base"]["scores"] and r["eval"][0]["gain"] == 0 for r in runs)
    for r in runs:  # each point's interval brackets its mean
        e = r["eval"][-1]
        assert e["lo"] <= e["reward"] <= e["hi"] and e["gain_lo"] <= e["gain"] <= e["gain_hi"]
        assert e["reward"] == pytest.approx(sum(map(sum, e["scores"])) / 2, abs=1e-6)
    agg = data["aggregate"]
    assert set(agg) == {"dynamic-treerpo", "mixgrpo", "ema=0.9"} and agg["mixgrpo"]["seeds"] == 2
    assert [p["iteration"] for p in agg["mixgrpo"]["eval"]] == [0, 1, 2]
    pooled = agg["mixgrpo"]["eval"][-1]["pooled"]  # seed-pooled per-prompt scores, paired with the base
    per_prompt = [sum(r["eval"][-1]["scores"][i][0] for r in fixed) / 2 for i in range(2)]
    assert pooled["reward"]["mean"] == pytest.approx(sum(per_prompt) / 2, abs=1e-6)
    assert pooled["gain"]["mean"] == pytest.approx(sum(per_prompt) / 2 - sum(map(sum, data["base"]["scores"])) / 2,
                                                   abs=1e-6)
    assert {s["name"] for s in data["summary"]} == set(agg)
    assert Image.open(out / "learn.png").size[0] > 900
    printed = capsys.readouterr().out
    assert ("time and NFE to reach mixgrpo's final reward" in printed
            and "validation set, 2 prompts x 1 seeds" in printed)
    # --replot: the figure and the summary again from learn.json alone (a run stopped early)
    (out / "learn.png").unlink()
    assert main(["bench", "learn", "--replot", "--out", str(out)]) == 0
    assert Image.open(out / "learn.png").size[0] > 900
    assert "dynamic-treerpo" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no .*learn.json"):
        main(["bench", "learn", "--replot", "--out", str(tmp_path / "nothing")])
