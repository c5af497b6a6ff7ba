"""Training on the MODEL, CLIP and VAE that ComfyUI's own loaders made: the "TreeRPO model from ComfyUI"
node (nodes/comfy_model.py) and its policy, a LoRA of ComfyUI's weight adapters on ComfyUI's FLUX
(nodes/comfy_flux.py), in the real ComfyUI 0.3.75 runtime on the CPU.

(a) small width, in the runtime's Python: the bundled tiny-shapes FLUX (hidden 128) as a BFL single
    file in bf16, an fp8_e4m3fn copy and a ComfyUI "scaled fp8" copy, loaded by UNETLoader. ComfyUI's
    FLUX detection fixes 24 heads of 128 (width 3072 only), so a test-only shim gives the detected
    config tiny-shapes' 4 heads and RoPE axes; everything after detection is UNETLoader's own code.
    ComfyUI's CLIP and VAE loaders take only the real FLUX encoders' sizes, so text and images go
    through Load FLUX's cached encoders of the same files here (the CLIP / VAE objects are exercised
    in (c)). Checked against Load FLUX's single-file route on the same file: velocities, input
    gradients with and without gradient checkpointing (the blocks' in-place adds), one tree iteration
    (first ratio exactly 1, fp32 LoRA, base weights left in bf16 / fp8), Cancel deferred to the end of
    the iteration, the saved LoRA through LoraLoaderModelOnly (every key consumed, velocity reproduced).
(b) a MODEL that is not FLUX (SD1.5, on the meta device) and a GGUF-quantised one are refused in one line.
(c) width 3072 (FLUX.1-dev's blocks, one double and one single) through the server: UNETLoader with
    an fp8_e4m3fn file, CLIPLoader (a random CLIP-L) and VAELoader (a random FLUX autoencoder) into the
    node, one tree iteration by the trainer step, Save LoRA; then the saved LoRA through
    LoraLoaderModelOnly reproduces the trained policy (rebuilt from the run's checkpoint), the MODEL's
    velocity equals Load FLUX's on the same file (one forward each: big on the CPU), and the VAE object
    decodes as Load FLUX's decoder does.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from comfyui_harness import LOG_CATCHER, PACK_DIR_NAME

from treerpo.core.models import bundled_config, diffusers_to_bfl_transformer, diffusers_to_bfl_vae
from treerpo.core.models.export import export_single_files
from treerpo.core.shapes.model import pretrained_dir
from treerpo.testing import _fp8_scaled


# Runs in the ComfyUI venv before each script: the pack importable, a helper to log ComfyUI's
# complaints, and the detection shim for small FLUX widths (see the module docstring).
PRELUDE = r"""
import importlib, json, logging, math, os, sys, time
T0 = time.time()
import torch
sys.path.insert(0, os.path.join(ARGS[0], "custom_nodes"))
PACK = __import__("importlib").import_module(ARGS[1])
cf = importlib.import_module(ARGS[1] + ".nodes.comfy_flux")
core = importlib.import_module(ARGS[1] + ".core.models")
import nodes, comfy.model_management as mm, comfy.model_detection as md, comfy.cli_args
""" + LOG_CATCHER + r"""SMALL = json.loads(ARGS[2])  # hidden size -> {"num_heads", "axes_dim"} for the detection shim
_detect = md.detect_unet_config
def _shim(sd, prefix, metadata=None):
    cfg = _detect(sd, prefix, metadata=metadata)
    if cfg and cfg.get("image_model") == "flux" and str(cfg.get("hidden_size")) in SMALL:
        cfg.update(SMALL[str(cfg["hidden_size"])])
    return cfg
md.detect_unet_config = _shim

def not_loaded():
    return [m for m in catch.messages if "lora key not loaded" in m or "NOT LOADED" in m]

def rel(a, b):
    return float((a - b).norm() / b.norm())

def comfy_velocity(patcher, x, sigma, cond, guidance=3.5):
    # the loaded MODEL's own velocity, called as BaseModel._apply_model calls its diffusion model
    mm.load_models_gpu([patcher], force_full_load=True)  # applies (or removes) LoRA patches
    base = patcher.model
    dt = base.manual_cast_dtype or base.get_dtype()
    with torch.no_grad():
        return base.diffusion_model(x.to(dt), sigma.float(), cond["prompt_embeds"].to(dt),
                                    y=cond["pooled_prompt_embeds"].to(dt),
                                    guidance=torch.full((x.shape[0],), guidance, dtype=dt)).float()
"""

SMALL_SIDE = r"""
P = json.loads(ARGS[3])
trainer_mod = importlib.import_module(ARGS[1] + ".core.trainer")
presets = importlib.import_module(ARGS[1] + ".core.presets")

class Brightness:
    names, weights = ["brightness"], [1.0]
    def __call__(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3)).unsqueeze(1).cpu()

report = {"t": [time.time() - T0]}
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 8, 8, generator=g)
sigma = torch.tensor([0.8, 0.35])
for case in P["cases"]:
    r = report[case["name"]] = {}
    comfy.cli_args.args.bf16_unet = case["bf16_unet"]  # as --bf16-unet: keep bf16 weights on the CPU
    with torch.inference_mode():  # as ComfyUI runs nodes
        (model,) = nodes.UNETLoader().load_unet(case["file"], case["weight_dtype"])
    files = core.flux_files_from_single_files(case["path"], clip_l=P["clip_l"], t5xxl=P["t5xxl"], vae=P["vae"],
                                              tokenizers=P["tokenizers"])
    ours = core.load_flux(files, lora=core.LoraSettings(4, 4), dtype=torch.float32, cache_dir=P["cache"])
    cond = {k: torch.cat([c[k] for c in ours.encode(P["prompts"])]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
    with torch.inference_mode(False), torch.enable_grad():
        stack = cf.comfy_flux_stack(model, None, None, core.LoraSettings(4, 4, targets=cf.COMFY_LORA_TARGETS),
                                    encode=ours.encode, decode=ours.decode)
        pol = stack.policy
        r["weights"] = str(model.model.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype)
        r["compute"] = str(pol.dtype)
        with torch.no_grad():
            v_comfy = pol(x, sigma, cond)
            v_ours = ours.policy(x, sigma, cond)
        r["v_rel"] = rel(v_comfy, v_ours)
        report["t"].append(time.time() - T0)
        r["v_max"] = float((v_comfy - v_ours).abs().max())
        w = torch.randn(x.shape, generator=g)
        for ck in ((False, True) if case["name"] == "bf16" else (False,)):  # checkpointing: dtype-independent
            pol.gradient_checkpointing = ck
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            (pol(xa, sigma, cond) * w).sum().backward()
            (ours.policy(xb, sigma, cond) * w).sum().backward()
            r[f"grad_x_rel_ckpt{int(ck)}"] = rel(xa.grad, xb.grad)
            r[f"lora_grads_ckpt{int(ck)}"] = sum(int(p.grad is not None and bool(p.grad.abs().sum() > 0))
                                                 for p in pol.lora_parameters().values())
            for p in pol.lora_parameters().values():
                p.grad = None
        pol.gradient_checkpointing = True
        report["t"].append(time.time() - T0)
        cfg = presets.make_config("dynamic-treerpo", num_steps=4, branching=[2, 2], seed=0, lr=3e-3, window_every=1)
        tr = trainer_mod.Trainer(pol, cfg, rewards=Brightness(), encode=stack.encode, decode=stack.decode,
                                 latent_shape=stack.latent_shape(32))
        before = {n: p.detach().clone() for n, p in pol.named_parameters()}
        t = time.time()
        m = tr.step(P["prompts"][:1])
        r["iteration_s"] = time.time() - t
        r["ratio_first_update"] = m["ratio_first_update"]
        r["loss_finite"] = math.isfinite(m["loss"])
        r["changed"] = sorted({n.rsplit(".", 2)[-2] for n, p in pol.named_parameters()
                               if not torch.equal(p, before[n])})
        r["lora_dtypes"] = sorted({str(p.dtype) for p in pol.lora_parameters().values()})
        r["n_lora_params"] = len(pol.lora_parameters())
        qkv = model.model.diffusion_model.double_blocks[0].img_attn.qkv
        r["base_weight_after"] = str(qkv.weight.dtype)
        r["scaled"] = getattr(qkv, "scale_weight", None) is not None
        path = os.path.join(P["loras"], case["name"] + ".safetensors")
        core.save_lora(path, pol, iteration=tr.iteration)
        r["format"] = core.read_lora_metadata(path)["format"]
        with torch.no_grad():
            v_trained = pol(x, sigma, cond)
            with pol.reference():
                v_ref = pol(x, sigma, cond)
        r["reference_equals_base"] = rel(v_ref, v_comfy)
        r["lora_effect"] = rel(v_trained, v_ref)
        # Cancel pressed: ComfyUI's layers would raise mid-forward; the trainer checks it between iterations
        mm.interrupt_current_processing(True)
        try:
            with torch.no_grad():
                pol(x, sigma, cond)
            r["forward_under_cancel"] = "ran"
        except mm.InterruptProcessingException:
            r["forward_under_cancel"] = "raised"
        r["cancel_still_pending"] = mm.processing_interrupted()
        mm.interrupt_current_processing(False)
    # the file through LoraLoaderModelOnly, (1) on this MODEL (ComfyUI merges the LoRA into the weights
    # and rounds the sum to their dtype) and (2) on the same file loaded with fp32 weights (exact)
    catch.messages.clear()
    (with_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, os.path.basename(path), 1.0)
    r["not_loaded"] = not_loaded()
    r["patched_weights"] = sum(len(p) for p in with_lora.patches.values())
    r["n_modules"] = len(pol.modules_with_lora)
    delta = v_trained - v_ref
    r["loader_same_model_rel"] = rel(comfy_velocity(with_lora, x, sigma, cond) - v_ref, delta)
    comfy.cli_args.args.bf16_unet = False
    with torch.inference_mode():
        (fp32_model,) = nodes.UNETLoader().load_unet(case.get("fp32_file", case["file"]), "default")
        (fp32_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(fp32_model, os.path.basename(path), 1.0)
    r["fp32_weights"] = str(fp32_model.model.get_dtype())
    r["loader_fp32_rel"] = rel(comfy_velocity(fp32_lora, x, sigma, cond) - comfy_velocity(fp32_model, x, sigma, cond),
                               delta)
    del stack, pol, tr, model, with_lora, fp32_model, fp32_lora
    report["t"].append(time.time() - T0)

# (b) refusals: a MODEL that is not FLUX, and GGUF-quantised layers (ComfyUI-GGUF's GGMLLayer interface)
import comfy.model_patcher
SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False}
sd15 = md.model_config_from_unet_config(SD15).get_model({}, "", device=torch.device("meta"))
sd15 = comfy.model_patcher.ModelPatcher(sd15, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
errors = {}
with torch.inference_mode():
    (gguf,) = nodes.UNETLoader().load_unet(P["cases"][0]["file"], "default")
gguf.model.diffusion_model.double_blocks[0].img_attn.qkv.is_ggml_quantized = lambda: True
for name, m in (("sd15", sd15), ("gguf", gguf)):
    try:
        cf.comfy_flux_stack(m, None, None, core.LoraSettings(4, 4), encode=lambda p: p, decode=lambda z: z)
        errors[name] = None
    except cf.NotSupportedModel as e:
        errors[name] = str(e)
report["errors"] = errors
print(json.dumps(report))
"""

SMALL = {"128": {"num_heads": 4, "axes_dim": [8, 12, 12]}}  # tiny-shapes: 4 heads of 32, RoPE axes 8+12+12


def _run(server, code, *args, timeout=900):
    proc = server.python(PRELUDE + code, timeout=timeout,
                         args=[str(server.base), PACK_DIR_NAME, json.dumps(SMALL), *[str(a) for a in args]])
    assert proc.returncode == 0, f"ComfyUI-side script failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fp8_tiny_shapes(models, tmp_path, file: str) -> tuple[dict, dict]:
    """tiny-shapes' transformer as an fp8 single file in ComfyUI's diffusion_models (config beside it),
    and the parameters the ComfyUI-side scripts read: (exported single files, params)."""
    exported = export_single_files(pretrained_dir(), tmp_path / "models", "tiny-shapes")
    path = models / "diffusion_models" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(exported["transformer"]))
    save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in sd.items()}, str(path))
    shutil.copyfile(exported["transformer"].with_suffix(".json"), path.with_suffix(".json"))
    params = dict(file=file, path=str(path), clip_l=str(exported["clip_l"]), t5xxl=str(exported["t5xxl"]),
                  vae=str(exported["vae"]), tokenizers=str(pretrained_dir()), cache=str(tmp_path / "emb"),
                  prompts=["a red square", "a blue circle"])
    return exported, params


def test_small_flux_through_unetloader_equals_load_flux_trains_and_saves(comfy_server, tmp_path):
    models = comfy_server.base / "models"
    exported = export_single_files(pretrained_dir(), tmp_path / "models", "tiny-shapes")
    sd = load_file(str(exported["transformer"]))
    # ComfyUI's "scaled fp8": fp8 weights with a per-tensor scale. ComfyUI makes those layers' biases fp8
    # too, so the file holds biases fp8 can represent (both routes then read the same numbers)
    scaled = _fp8_scaled({k: v.to(torch.float8_e4m3fn).float() if k.endswith(".bias") else v for k, v in sd.items()},
                         "model.diffusion_model.")
    dequantised = {k[len("model.diffusion_model."):].replace(".scale_weight", ".weight"): v for k, v in scaled.items()
                   if k.endswith(".scale_weight")}
    dequantised = {k: (scaled["model.diffusion_model." + k].float() * dequantised[k] if k in dequantised
                       else scaled["model.diffusion_model." + k].float())
                   for k in sd}
    cases = []
    for name, tensors, weight_dtype, bf16_unet in (
            ("bf16", {k: v.to(torch.bfloat16) for k, v in sd.items()}, "default", True),
            ("fp8", {k: v.to(torch.float8_e4m3fn) for k, v in sd.items()}, "fp8_e4m3fn", False),
            ("fp8-scaled", scaled, "default", False),
            ("fp8-scaled-fp32", dequantised, None, False)):  # the fp32 twin for the exact LoRA check
        file = f"treerpo-cms-tiny-shapes-{name}.safetensors"
        path = models / "diffusion_models" / file
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
        shutil.copyfile(exported["transformer"].with_suffix(".json"), path.with_suffix(".json"))
        if weight_dtype is None:
            cases[-1]["fp32_file"] = file
            cases[-1]["extra"] = str(path)
            continue
        cases.append(dict(name=name, file=file, path=str(path), weight_dtype=weight_dtype, bf16_unet=bf16_unet))
    (models / "loras").mkdir(parents=True, exist_ok=True)
    params = dict(cases=cases, clip_l=str(exported["clip_l"]), t5xxl=str(exported["t5xxl"]), vae=str(exported["vae"]),
                  tokenizers=str(pretrained_dir()), cache=str(tmp_path / "emb"), loras=str(models / "loras"),
                  prompts=["a red square", "a blue circle"])
    try:
        report = _run(comfy_server, SMALL_SIDE, json.dumps(params))
    finally:
        for c in cases:
            for p in (c["path"], c["path"].replace(".safetensors", ".json"), c.get("extra", ""),
                      c.get("extra", "").replace(".safetensors", ".json"),
                      str(models / "loras" / f"{c['name']}.safetensors")):
                if os.path.exists(p):
                    os.unlink(p)
    print(json.dumps(report, indent=1))

    assert report["bf16"]["weights"] == "torch.bfloat16" and report["fp8"]["weights"] == "torch.float8_e4m3fn"
    assert report["fp8-scaled"]["weights"] == "torch.float8_e4m3fn" and report["fp8-scaled"]["scaled"]
    assert "grad_x_rel_ckpt1" in report["bf16"]
    for name in ("bf16", "fp8", "fp8-scaled"):
        r = report[name]
        assert r["compute"] == "torch.float32"  # ComfyUI upcasts each layer's weight on the CPU
        # Load FLUX's single-file route on the same file: the same velocity (measured 3e-7) ...
        assert r["v_rel"] < 1e-5, (name, r["v_rel"])
        # ... and the same input gradients, with and without checkpointing (measured 3e-7): ComfyUI's
        # in-place adds inside the blocks do not corrupt the backward
        assert r["grad_x_rel_ckpt0"] < 1e-5 and r.get("grad_x_rel_ckpt1", 0.0) < 1e-5, r
        # lora_down starts at 0, so only it gets a gradient at the first step (lora_up's is 0)
        assert r["lora_grads_ckpt0"] == r.get("lora_grads_ckpt1", r["lora_grads_ckpt0"]) == r["n_lora_params"] // 2, r
        assert r["n_lora_params"] > 0
        # one tree iteration: on-policy first ratio exactly 1, the LoRA trained in fp32, the base untouched
        assert r["ratio_first_update"] == 1.0 and r["loss_finite"], r
        assert r["changed"] == ["lora_down", "lora_up"] or r["changed"] == ["lora_down"], r["changed"]
        assert r["lora_dtypes"] == ["torch.float32"]
        assert r["base_weight_after"] == r["weights"]
        assert r["format"] == "comfyui-lora-v1"
        assert r["reference_equals_base"] == 0.0  # reference(): adapters off
        assert r["lora_effect"] > 1e-4, r
        assert r["forward_under_cancel"] == "ran" and r["cancel_still_pending"], r
        # the saved file: every key consumed by LoraLoaderModelOnly, one patch per trained layer
        assert r["not_loaded"] == [] and r["patched_weights"] == r["n_modules"] == 2 * 8 + 4 * 2, r
        # with fp32-held weights ComfyUI applies exactly the trained LoRA (measured 1e-7 of its effect)
        assert r["fp32_weights"] == "torch.float32" and r["loader_fp32_rel"] < 1e-4, r
    # on the bf16 / fp8 MODEL itself ComfyUI's loader merges the LoRA into the weights and rounds the
    # sum to bf16 / fp8 (stochastically): the training policy adds it after the upcast, unrounded
    assert report["bf16"]["loader_same_model_rel"] < 0.05, report["bf16"]
    assert report["fp8"]["loader_same_model_rel"] < 0.5, report["fp8"]
    assert report["fp8-scaled"]["loader_same_model_rel"] < 0.5, report["fp8-scaled"]

    errors = report["errors"]
    assert errors["sd15"] is not None and "the MODEL is SD15" in errors["sd15"] and "not FLUX.1" in errors["sd15"]
    assert "supported: a FLUX.1" in errors["sd15"] and "\n" not in errors["sd15"]
    assert errors["gguf"] is not None and errors["gguf"].startswith("GGUF-quantised MODELs cannot be trained")
    assert "Load Diffusion Model" in errors["gguf"] and "\n" not in errors["gguf"]


# ------------------------------------------------------------------------------------------ width 3072
DEV = bundled_config("flux-dev")["transformer"]
# FLUX.1-dev's blocks (one double, one single); text widths of the CLIP-L the test's CLIPLoader gives
WIDE = dict(DEV, num_layers=1, num_single_layers=1, joint_attention_dim=768, pooled_projection_dim=768)


def _random_state(model: torch.nn.Module, seed: int, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Weights for a meta-device model, fast (a 1 GB model in about a second): each tensor a slice of
    a repeated pool of N(0, 0.02) draws at its own offset (the pool's length is prime, so rows of a
    matrix differ); normalisation scales 1."""
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1_000_003, generator=g) * 0.02).to(dtype)
    out = {}
    for i, (k, v) in enumerate(model.state_dict().items()):
        n = v.numel()
        if v.ndim == 1 and "norm" in k and k.endswith(".weight"):
            out[k] = torch.ones(v.shape, dtype=dtype)
            continue
        start = (i * 7919) % pool.numel()
        reps = (start + n) // pool.numel() + 1
        out[k] = pool.repeat(reps)[start:start + n].reshape(v.shape).clone()
    return out


def _write_wide_files(models):
    """A width-3072 FLUX (fp8_e4m3fn, BFL keys, its config beside it), a random CLIP-L (HF keys with the
    text_model. prefix ComfyUI expects) and a random FLUX autoencoder (BFL keys)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(WIDE)
        vae = AutoencoderKL.from_config(bundled_config("flux-vae"))
        clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in bundled_config("clip-l").items()
                                               if k != "architectures"}))
    paths = {"unet": models / "diffusion_models" / "treerpo-cms-flux3072-fp8.safetensors",
             "clip": models / "text_encoders" / "treerpo-cms-clip-l-random.safetensors",
             "vae": models / "vae" / "treerpo-cms-ae-random.safetensors"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    sd = diffusers_to_bfl_transformer(_random_state(transformer, 0))
    save_file({k: v.to(torch.float8_e4m3fn).contiguous() for k, v in sd.items()}, str(paths["unet"]))
    paths["unet"].with_suffix(".json").write_text(json.dumps(WIDE))
    del sd
    clip_sd = {"text_model." + k: v for k, v in _random_state(clip, 1, torch.float16).items()}
    clip_sd["text_projection.weight"] = torch.eye(768, dtype=torch.float16)
    save_file(clip_sd, str(paths["clip"]))
    save_file({k: v.contiguous() for k, v in diffusers_to_bfl_vae(_random_state(vae, 2)).items()}, str(paths["vae"]))
    return paths


def _node(info, class_type, **given):
    """An API-prompt node with every required widget at its default, ``given`` on top."""
    spec = info[class_type]["input"]
    inputs = {}
    for name, (kind, *opts) in spec.get("required", {}).items():
        opts = opts[0] if opts else {}
        if name in given:
            continue
        if "default" in opts:
            inputs[name] = opts["default"]
        elif isinstance(kind, list) and kind:
            inputs[name] = kind[0]
        elif kind == "COMBO" and opts.get("options"):
            inputs[name] = opts["options"][0]
    inputs.update(given)
    return {"class_type": class_type, "inputs": inputs}


WIDE_SIDE = r"""
P = json.loads(ARGS[3])
ckpt = importlib.import_module(ARGS[1] + ".core.checkpoint")
from safetensors.torch import load_file
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 16, 4, 4, generator=g)
sigma = torch.tensor([0.7])
cond = {"prompt_embeds": torch.randn(1, 77, 768, generator=g), "pooled_prompt_embeds": torch.randn(1, 768, generator=g)}
r = {"t": [time.time() - T0]}
with torch.inference_mode():  # the fp8 file with fp32-held weights: the same numbers, no rounding of merged LoRAs
    (model,) = nodes.UNETLoader().load_unet(P["unet"], "default")
r["weights"] = str(model.model.get_dtype())
r["t"].append(time.time() - T0)
with torch.inference_mode(False), torch.enable_grad():
    pol = cf.ComfyFluxPolicy(model, core.LoraSettings(P["rank"], P["alpha"], targets=P["targets"]))
    trained, _, _, folder = ckpt.load_checkpoint(P["checkpoints"])
    params = pol.lora_parameters()
    r["checkpoint_keys_match"] = sorted(trained) == sorted(params)
    with torch.no_grad():
        v_base = pol(x, sigma, cond)  # a new LoRA: lora_down = 0
        for n, p in params.items():
            p.copy_(trained[n])
        v_trained = pol(x, sigma, cond)
del pol
r["t"].append(time.time() - T0)
catch.messages.clear()
(with_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, P["lora"], 1.0)
r["not_loaded"] = not_loaded()
r["patched_weights"] = sum(len(p) for p in with_lora.patches.values())
v_loaded = comfy_velocity(with_lora, x, sigma, cond)
r["lora_effect"] = rel(v_trained, v_base)
r["loader_rel"] = rel(v_loaded - v_base, v_trained - v_base)
del with_lora
r["t"].append(time.time() - T0)
# Load FLUX's single-file route on the same files (fp8 dequantised to fp32): one forward; and the
# leaves decoded through VAELoader's VAE (ComfyDecoder) and through Load FLUX's (FluxDecoder)
del model
mm.unload_all_models()
build = importlib.import_module(ARGS[1] + ".core.models.build")
files = core.flux_files_from_single_files(P["unet_path"], vae=P["vae_path"])
ours = build.load_flux_policy(files, lora=None, dtype=torch.float32)
with torch.no_grad():
    r["load_flux_rel"] = rel(v_base, ours(x, sigma, cond))
del ours
import comfy.latent_formats
with torch.inference_mode():
    (vae,) = nodes.VAELoader().load_vae(P["vae"])
z = torch.randn(2, 16, 4, 4, generator=g)
theirs = cf.ComfyDecoder(vae, comfy.latent_formats.Flux())(z)
mine = core.FluxDecoder(build.load_vae(files, dtype=torch.float32))(z)
r["decode_shape"] = list(theirs.shape)
r["decode_max_abs"] = float((theirs - mine).abs().max())
r["decode_range"] = [float(theirs.min()), float(theirs.max())]
r["t"].append(time.time() - T0)
print(json.dumps(r))
"""


def test_wide_flux_from_comfyui_loaders_trains_through_the_node(comfy_server):
    models = comfy_server.base / "models"
    paths = _write_wide_files(models)
    try:
        info = comfy_server.object_info()
        assert info["TreeRPOComfyModel"]["output"] == ["TREERPO_MODEL"]
        p = {
            "1": _node(info, "UNETLoader", unet_name=paths["unet"].name, weight_dtype="fp8_e4m3fn"),
            "2": _node(info, "CLIPLoader", clip_name=paths["clip"].name, type="stable_diffusion"),
            "3": _node(info, "VAELoader", vae_name=paths["vae"].name),
            # two layers (Load FLUX's name for one of them): each LoRA layer costs a weight copy per forward
            "4": _node(info, "TreeRPOComfyModel", model=["1", 0], clip=["2", 0], vae=["3", 0], lora_rank=4,
                       lora_alpha=4.0, lora_targets="attn.to_out.0, linear2", gradient_checkpointing=False),
            "5": _node(info, "TreeRPOPrompts", file="(typed below)", text="a red cube"),
            "6": _node(info, "TreeRPOLoadReward", reward="brightness"),
            "7": _node(info, "TreeRPOTreeSettings", preset="dynamic-treerpo", branching="2", num_steps=2,
                       window_start=0, resolution=32, prompts_per_iteration=1, learning_rate=3e-3),
            "8": _node(info, "TreeRPOTrainerStep", iterations=1, run_name="comfy-model-source", on_existing="restart",
                       checkpoint_every=1, model=["4", 0], prompts=["5", 0], rewards=["6", 0], settings=["7", 0]),
            "9": _node(info, "TreeRPOSaveLora", run=["8", 0], filename_prefix="treerpo/comfy-model-source"),
        }
        entry, _ = comfy_server.run(p, timeout=900)
        errors = [m[1] for m in entry["status"]["messages"] if m[0] == "execution_error"]
        assert entry["status"]["status_str"] == "success", errors
        run = comfy_server.base / "output" / "treerpo_runs" / "comfy-model-source"
        metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [m["iteration"] for m in metrics] == [1] and metrics[0]["ratio_first_update"] == 1.0
        saved = entry["outputs"]["9"]["text"][0].removeprefix("saved ")
        lora = models / "loras" / saved
        from safetensors import safe_open

        with safe_open(str(lora), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
        assert meta["treerpo.format"] == "comfyui-lora-v1" and meta["treerpo.iteration"] == "1"
        assert json.loads(meta["treerpo.base_model"])["weight_dtype"] == "torch.float8_e4m3fn"
        modules = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".alpha")}
        assert modules == {"diffusion_model.double_blocks.0.img_attn.proj", "diffusion_model.single_blocks.0.linear2"}
        assert sorted(keys) == sorted(f"{m}.{part}" for m in modules for part in
                                      ("alpha", "lora_up.weight", "lora_down.weight"))

        r = _run(comfy_server, WIDE_SIDE, json.dumps(dict(
            unet=paths["unet"].name, unet_path=str(paths["unet"]), rank=4, alpha=4.0, lora=saved,
            targets=["attn.to_out.0", "linear2"], vae=paths["vae"].name, vae_path=str(paths["vae"]),
            checkpoints=str(run / "checkpoints"))))
        print(json.dumps(r, indent=1))
    finally:
        for path in paths.values():
            path.unlink(missing_ok=True)
        paths["unet"].with_suffix(".json").unlink(missing_ok=True)
    assert r["checkpoint_keys_match"]
    assert r["not_loaded"] == [] and r["patched_weights"] == 2
    assert r["lora_effect"] > 1e-5, r
    assert r["loader_rel"] < 1e-3, r
    # Load FLUX and ComfyUI's UNETLoader on the same width-3072 file: the same velocity
    assert r["load_flux_rel"] < 1e-4, r
    # the VAE object decodes the engine's latents as Load FLUX's decoder does ([B, 3, 8H, 8W] in [0, 1])
    assert r["decode_shape"] == [2, 3, 32, 32] and 0.0 <= r["decode_range"][0] < r["decode_range"][1] <= 1.0, r
    assert r["decode_max_abs"] < 1e-3, r
