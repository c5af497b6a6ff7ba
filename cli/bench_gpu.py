"""`treerpo bench gpu`: the prepared, unattended run for a GPU machine (bench/gpu.sh calls it).

1. checks that only a GPU can answer: under bf16 autocast the first update of every
   iteration is on-policy, so its mean importance ratio must be exactly 1; and 20 iterations
   of dynamic-treerpo must stay finite (metrics, gradients, LoRA weights);
2. `bench speed` of the tree against the baselines (8 leaves vs 12 trajectories) on a
   FLUX-width transformer with random weights (LoRA, 512 px, T = 25, bf16), each preset in its
   own process for its peak memory, with the model-FLOPs utilisation estimate;
3. the tree and MixGRPO at 1, 2, 4 and 8 prompts per iteration (one timed iteration each).

The JSON is rewritten after every step, so a run stopped by its time limit keeps what it
measured. `--cpu-smoke` runs the same path on the CPU at tiny sizes (tests, a minute or two).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from .bench import SPEED_PRESETS as PRESETS, machine, speed_prompts, speed_rows
from .errors import make_dir
from .options import write_json

# the GPU setting: FLUX-width random transformer, LoRA, 512x512, T=25, bf16
GPU = dict(model="flux-width", resolution=512, num_steps=25, rank=32, repeats=2, check_iterations=20,
           mixed_precision="bf16", sweep_prompts=(1, 2, 4, 8))
SWEEP_PRESETS = ("dynamic-treerpo", "mixgrpo")
# the same path at sizes a 2-core CPU runs in a minute or two
CPU_SMOKE = dict(model="flux-narrow", resolution=32, num_steps=6, rank=4, repeats=1, check_iterations=20,
                 mixed_precision="bf16", sweep_prompts=(1, 2))


def run_checks(settings: dict, iterations: int) -> dict:
    """Train dynamic-treerpo for ``iterations`` iterations (its window moving every iteration,
    so low-noise steps where bf16 drifts most are visited) and check the on-policy ratio and
    that everything stays finite."""
    from ..core.presets import make_config
    from ..core.trainer import Trainer
    from .models import brightness_reward, latent_shape, load_stack

    stack = load_stack(settings["model"], rank=settings["rank"])
    shape = latent_shape(stack, settings["resolution"])
    cfg = make_config("dynamic-treerpo", num_steps=settings["num_steps"], seed=0,
                      mixed_precision=settings["mixed_precision"])
    trainer = Trainer(stack.policy, cfg, brightness_reward(), encode=stack.encode, decode=stack.decode,
                      latent_shape=shape)
    start = {n: p.detach().clone() for n, p in zip(trainer.param_names, trainer.params)}
    keys = ("reward_mean", "loss", "grad_norm", "ratio_mean", "eps_mean")
    ratios, bad = [], []
    for _ in range(iterations):
        m = trainer.step(speed_prompts(2))
        ratios.append(m["ratio_first_update"])
        bad += [f"iteration {m['iteration']}: {k}={m[k]}" for k in keys if not math.isfinite(m[k])]
        if m["skipped_steps"]:
            bad.append(f"iteration {m['iteration']}: {m['skipped_steps']} optimizer step(s) skipped "
                       "(non-finite gradient)")
    weights_finite = all(bool(torch.isfinite(p).all()) for p in trainer.params)
    moved = any(not torch.equal(start[n], p.detach()) for n, p in zip(trainer.param_names, trainer.params))
    out = {
        "preset": "dynamic-treerpo",
        "iterations": iterations,
        "mixed_precision": settings["mixed_precision"],
        "ratio_first_update": ratios,
        "ratio_first_update_exactly_1": ratios[0] == 1.0,
        "ratio_first_update_all_exactly_1": all(r == 1.0 for r in ratios),
        "max_abs_ratio_deviation": max(abs(r - 1.0) for r in ratios),
        "non_finite": bad,
        "lora_weights_finite": weights_finite,
        "lora_weights_changed": moved,
        "window_starts": [h["window_start"] for h in trainer.history],
    }
    out["ok"] = out["ratio_first_update_exactly_1"] and not bad and weights_finite and moved
    del trainer, stack
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def bench_gpu(args) -> int:
    t_start = time.perf_counter()
    settings = dict(CPU_SMOKE if args.cpu_smoke else GPU)
    out = make_dir(args.out, "--out")  # checked with the other options by bench.check_args
    path = out / "gpu-bench.json"
    result = {"machine": machine(), "torch": torch.__version__, "cpu_smoke": bool(args.cpu_smoke),
              "settings": settings, "presets": PRESETS.split(","), "checks": None, "speed": None, "ok": None}

    def save():
        result["elapsed_s"] = time.perf_counter() - t_start
        write_json(path, result)

    save()
    print(f"bench gpu: {result['machine']}; {settings}", flush=True)
    result["checks"] = run_checks(settings, settings["check_iterations"])
    c = result["checks"]
    print(f"checks: first-update ratio {c['ratio_first_update'][0]!r} (exactly 1: {c['ratio_first_update_exactly_1']}; "
          f"all {c['iterations']} iterations: {c['ratio_first_update_all_exactly_1']}, max |ratio-1| "
          f"{c['max_abs_ratio_deviation']:.3g}); non-finite: {c['non_finite'] or 'none'}; LoRA finite "
          f"{c['lora_weights_finite']}, changed {c['lora_weights_changed']} -> {'ok' if c['ok'] else 'FAILED'}",
          flush=True)
    save()

    rows = []
    result["speed"] = {"rows": rows}
    for name in PRESETS.split(","):
        ns = argparse.Namespace(presets=name, model=settings["model"], num_steps=settings["num_steps"],
                                resolution=settings["resolution"], repeats=settings["repeats"], window_start=None,
                                rank=settings["rank"], mixed_precision=settings["mixed_precision"],
                                peak_tflops=args.peak_tflops, isolate=True, quick=False, profile=8)
        new, s = speed_rows(ns)
        rows += new
        result["speed"].update({k: v for k, v in s.items()})
        r = new[0]
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "- (peak unknown: --peak-tflops)"
        print(f"speed {name:16s} {r['seconds_per_iteration']:8.3f} s/iter (rollout {r['rollout']:.3f}, reward "
              f"{r['reward']:.3f}, update {r['update']:.3f}), peak {r['peak_memory_gib']:.2f} GiB, "
              f"{r.get('tflops_achieved', float('nan')):.4g} TFLOP/s, MFU {mfu}; operator time: " + ", ".join(
                  f"{k} {v['share']:.0%}" for k, v in r["profile"]["kinds"].items()), flush=True)
        save()
    ref = rows[0]["seconds_per_iteration"]
    for r in rows:
        r["time_vs_first"] = r["seconds_per_iteration"] / ref
    result["ok"] = bool(c["ok"] and all(r["ratio_first_update"] == 1.0 for r in rows))
    save()

    # how an iteration grows with its prompts: all prompts' trees run as one batch, so the narrow
    # layers stop being batch-starved (last: a run stopped by its time limit keeps the above)
    sweep = result["prompts_sweep"] = []
    for n in settings["sweep_prompts"]:
        for name in SWEEP_PRESETS:
            ns = argparse.Namespace(presets=name, model=settings["model"], num_steps=settings["num_steps"],
                                    resolution=settings["resolution"], repeats=1, window_start=None,
                                    rank=settings["rank"], mixed_precision=settings["mixed_precision"],
                                    peak_tflops=args.peak_tflops, isolate=True, quick=False, profile=0,
                                    prompts_per_iteration=n)
            r = speed_rows(ns)[0][0]
            sweep.append({"prompts": n, **r})
            print(f"sweep {name:16s} {n} prompt(s): {r['seconds_per_iteration']:8.3f} s/iter, "
                  f"{r['seconds_per_sample']:.4f} s/sample, peak {r['peak_memory_gib']:.2f} GiB", flush=True)
            save()
    print(f"wrote {path} ({result['elapsed_s']:.0f} s); checks {'passed' if result['ok'] else 'FAILED'}", flush=True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- the ComfyUI fp8 route
# FLUX.1-dev through ComfyUI's UNETLoader path (comfy.sd.load_diffusion_model_state_dict, the function
# UNETLoader calls on the file's tensors) at weight_dtype fp8_e4m3fn, random weights, the LoRA of
# ComfyUI's weight adapters (nodes/comfy_flux.py), gradient checkpointing, micro-batch 1. Text comes
# as random T5/CLIP features and the reward scores the latents (no VAE, no reward model: the plan's
# prediction below leaves them out too). A small tree keeps it within the script's budget.
COMFY_GPU = dict(double=19, single=38, resolutions=(512, 720), text_tokens=512, num_steps=8, branching=(2, 2),
                 iterations=2, rank=32, count_model="flux-width:2:1", count_tokens=(64, 128), tiny=False)
# the same path on the CPU at the tiny test transformer's sizes (hidden 32; flux-narrow counts the same
# shapes). ComfyUI's FLUX detection assumes 24 heads of 128 (hidden 3072), so for this size only its
# detected heads and RoPE axes are set to the tiny model's (as tests/test_comfy_model_source.py does);
# everything after detection is ComfyUI's loading code. Width 3072 on the CPU takes ~100 s per iteration.
COMFY_SMOKE = dict(double=1, single=1, resolutions=(32, 48), text_tokens=16, num_steps=4, branching=(2, 2),
                   iterations=1, rank=4, count_model="flux-narrow:1:1", count_tokens=None, tiny=True)


def _transformer_config(settings: dict) -> dict:
    from ..core.models import bundled_config
    from ..testing import TINY_TRANSFORMER_CONFIG

    cfg = dict(TINY_TRANSFORMER_CONFIG) if settings["tiny"] else dict(bundled_config("flux-dev")["transformer"])
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update(num_layers=settings["double"], num_single_layers=settings["single"])
    return cfg


def _fp8_flux_state_dict(cfg: dict, seed: int = 0) -> dict:
    """A FLUX-shaped BFL state dict (single-file keys) of random fp8_e4m3fn weights, built fast: each
    tensor a slice of a repeated pool of N(0, 0.02) draws at its own offset; norm scales 1."""
    from diffusers import FluxTransformer2DModel

    from ..core.models import diffusers_to_bfl_transformer

    with torch.device("meta"):
        meta = diffusers_to_bfl_transformer(FluxTransformer2DModel(**cfg).state_dict())
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1_000_003, generator=g) * 0.02).to(torch.float8_e4m3fn)
    out = {}
    for i, (k, v) in enumerate(meta.items()):
        n = v.numel()
        if k.endswith(".scale") or (v.ndim == 1 and "norm" in k):
            out[k] = torch.ones(v.shape, dtype=torch.float8_e4m3fn)
            continue
        start = (i * 7919) % pool.numel()
        reps = (start + n) // pool.numel() + 1
        out[k] = pool.repeat(reps)[start:start + n].reshape(v.shape).clone()
    return out


class _LatentBrightness:
    """The reward of latents (no VAE in this benchmark): their mean."""

    names, weights = ["brightness"], [1.0]

    def __call__(self, latents, prompts):
        return latents.float().mean(dim=tuple(range(1, latents.ndim))).unsqueeze(1).cpu()


def _activation_counts(settings: dict, px: int) -> dict:
    """Per-block saved bytes (bench memory's count) at ``px`` and the benchmark's text length, exact or
    extrapolated linearly from two small token counts (the plan shows them linear in tokens)."""
    from ..core.models import LoraSettings
    from . import bench_memory as bm
    from .models import random_stack

    key = (settings["count_model"], settings["rank"])
    if _COUNT_STACK.get("key") != key:
        stack = random_stack(settings["count_model"], LoraSettings(rank=settings["rank"], alpha=settings["rank"]),
                             on="cpu")
        policy = stack.policy
        policy.transformer.to(torch.bfloat16)  # the plan's GPU setting: bf16 activations, LoRA in fp32
        for n, p in policy.transformer.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
        _COUNT_STACK.update(key=key, policy=policy)
    policy, text = _COUNT_STACK["policy"], settings["text_tokens"]

    def count(what, ck):  # each count once (both resolutions extrapolate from the same two)
        key = (what, ck, text)
        if key not in _COUNTS:
            _COUNTS[key] = bm.count_saved(policy, what, text_tokens=text, checkpointing=ck)
        return _COUNTS[key]

    out = {}
    for ck in (False, True):
        name = "ckpt" if ck else "no_ckpt"
        if settings["count_tokens"]:
            a, b = (count(("tokens", t), ck) for t in settings["count_tokens"])
            out[name] = bm.extrapolate(a, b, bm.image_tokens(px))
        else:
            out[name] = count(px, ck)
    return out


_COUNT_STACK: dict = {}
_COUNTS: dict = {}


def comfy_fp8_route(settings: dict, log=print, out: dict | None = None, save=lambda: None) -> dict:
    """Peak memory and seconds per iteration of the ComfyUI fp8 route at each resolution, beside the
    memory plan's prediction for the same parts. Needs ComfyUI importable (its folder on sys.path).
    Fills ``out`` as it goes and calls ``save()`` after each step (a run stopped by its time limit keeps
    what it measured)."""
    import comfy.model_detection as md
    import comfy.model_management as mm
    import comfy.sd

    from ..core.models import LoraSettings
    from ..core.presets import make_config
    from ..core.trainer import Trainer
    from ..nodes.comfy_flux import COMFY_LORA_TARGETS, ComfyFluxPolicy
    from . import bench_memory as bm

    t0 = time.perf_counter()
    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    cfg = _transformer_config(settings)
    sd = _fp8_flux_state_dict(cfg)
    detect = md.detect_unet_config
    if settings["tiny"]:
        def detect_tiny(state_dict, prefix, metadata=None):
            found = detect(state_dict, prefix, metadata=metadata)
            if found and found.get("image_model") == "flux":
                found.update(num_heads=cfg["num_attention_heads"], axes_dim=list(cfg["axes_dims_rope"]))
            return found

        md.detect_unet_config = detect_tiny
    try:
        with torch.inference_mode():  # as ComfyUI runs UNETLoader
            model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float8_e4m3fn})
    finally:
        md.detect_unet_config = detect
    del sd
    if model is None:
        raise RuntimeError("ComfyUI did not recognise the FLUX.1-dev-shaped state dict")
    dm = model.model.diffusion_model
    weight_bytes = sum(p.numel() * p.element_size() for p in dm.parameters())
    out = out if out is not None else {}
    out.update({"device": str(dev), "blocks": [settings["double"], settings["single"]], "weight_dtype": None,
                "weights_gib": weight_bytes / bm.GIB, "load_s": time.perf_counter() - t0, "rows": [], "ok": None})
    save()
    log(f"comfy fp8: {settings['double']}+{settings['single']} blocks, {weight_bytes / bm.GIB:.2f} GiB of weights "
        f"loaded by ComfyUI in {out['load_s']:.0f} s on {dev}")
    with torch.inference_mode(False), torch.enable_grad():
        lora = LoraSettings(rank=settings["rank"], alpha=settings["rank"], targets=COMFY_LORA_TARGETS)
        policy = ComfyFluxPolicy(model, lora, gradient_checkpointing=True)
        out["weight_dtype"] = str(policy.weight_dtype)
        out["compute_dtype"] = str(policy.dtype)
        lora_params = sum(p.numel() for p in policy.lora_parameters().values())
        adapted = {}
        for name in policy.modules_with_lora:  # the weights a block's adapters copy in the compute dtype
            kind = "double" if ".double_blocks." in name else "single"
            block = name.split(".")[2]
            m = model.model.get_submodule(name)
            adapted.setdefault(kind, {}).setdefault(block, 0)
            adapted[kind][block] += m.weight.numel()
        per_block = max(max(v.values()) for v in adapted.values())
        g = torch.Generator().manual_seed(0)
        p = dm.params
        cond = {"prompt_embeds": torch.randn(1, settings["text_tokens"], p.context_in_dim, generator=g),
                "pooled_prompt_embeds": torch.randn(1, p.vec_in_dim, generator=g)}
        for px in settings["resolutions"]:
            cfg = make_config("dynamic-treerpo", num_steps=settings["num_steps"], branching=list(settings["branching"]),
                              seed=0, micro_batch=1, mixed_precision="bf16" if cuda else "no")
            trainer = Trainer(policy, cfg, _LatentBrightness(), encode=lambda prompts: [cond for _ in prompts],
                              decode=None, latent_shape=(16, px // 8, px // 8))
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, ratios = [], []
            for _ in range(settings["iterations"]):
                t = time.perf_counter()
                m = trainer.step(["a photo"])
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
                ratios.append(m["ratio_first_update"])
            peak = torch.cuda.max_memory_allocated() / bm.GIB if cuda else None
            row = {"resolution": px, "seconds_per_iteration": times, "ratio_first_update": ratios, "peak_gib": peak}
            out["rows"].append(row)
            save()
            counts = _activation_counts(settings, px)
            act = bm.scaled_activations(counts["no_ckpt"], counts["ckpt"], settings["double"], settings["single"],
                                        1)["checkpointing"]
            compute_bytes = torch.empty((), dtype=policy.dtype).element_size()
            pred = bm.comfy_route_prediction(weight_bytes, lora_params, per_block * compute_bytes, act)
            row.update(predicted_gib=pred["total"] / bm.GIB,
                       predicted_parts_gib={k: v / bm.GIB for k, v in pred.items()},
                       measured_over_predicted=(peak / (pred["total"] / bm.GIB)) if peak is not None else None)
            save()
            ratio = f"{row['measured_over_predicted']:.2f}" if peak is not None else "- (no GPU)"
            log(f"comfy fp8 {px} px: {min(times):.2f} s/iter (of {len(times)}), peak "
                f"{'-' if peak is None else f'{peak:.2f}'} GiB, plan {row['predicted_gib']:.2f} GiB "
                f"(weights + LoRA/AdamW + activations + weight copies), measured/plan {ratio}; first ratio "
                f"{ratios[0]!r}")
            del trainer
    out["ok"] = all(r == 1.0 for row in out["rows"] for r in row["ratio_first_update"][:1])
    out["seconds"] = time.perf_counter() - t0
    save()
    return out


def main_comfy(argv=None) -> int:
    """``python -m treerpo.cli.bench_gpu --comfy-dir DIR --out DIR [--cpu-smoke]`` (bench/gpu.sh): the ComfyUI
    fp8 route in its own process, with ComfyUI's folder importable; writes gpu-bench-comfy.json."""
    import sys

    ap = argparse.ArgumentParser(prog="bench_gpu")
    ap.add_argument("--comfy-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--cpu-smoke", action="store_true")
    a = ap.parse_args(argv)
    sys.path.insert(0, a.comfy_dir)
    sys.argv = ["main.py", *(["--cpu"] if a.cpu_smoke else [])]  # ComfyUI parses its own arguments on import
    import comfy.options

    comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401 - before comfy's modules, as main.py does

    settings = dict(COMFY_SMOKE if a.cpu_smoke else COMFY_GPU)
    out = make_dir(a.out, "--out")
    result = {"settings": settings, "cpu_smoke": a.cpu_smoke, "comfy": {}}
    path = out / "gpu-bench-comfy.json"
    try:
        comfy_fp8_route(settings, log=lambda s: print(s, flush=True), out=result["comfy"],
                        save=lambda: write_json(path, result))
    finally:
        write_json(path, result)
    ok = bool(result["comfy"] and result["comfy"]["ok"])
    print(f"wrote {out / 'gpu-bench-comfy.json'}; comfy fp8 route {'passed' if ok else 'FAILED'}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main_comfy())
