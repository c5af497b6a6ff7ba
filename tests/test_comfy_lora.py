"""The LoRA files we write (core.models.save_lora) load in ComfyUI's own LoRA code with every key
consumed - no "lora key not loaded" - and change a FLUX model's output exactly as our policy does.

(a) key coverage and shapes on FLUX.1-dev itself, built on the meta device on both sides (no
    weights): our FluxPolicy + peft LoRA from the bundled flux-dev config, ComfyUI's model from
    FLUX.1-dev's BFL config;
(b) end to end on the smallest FLUX transformer ComfyUI's detection accepts (hidden 3072, 24
    heads, one double and one single block, written by the test into the server's
    models/diffusion_models in BFL layout), through UNETLoader + LoraLoaderModelOnly: the output
    changes with the LoRA and equals our policy's output with and without it.
"""

import gc
import json

import torch
from comfyui_harness import LOG_CATCHER
from safetensors.torch import load_file, save_file

from treerpo.core.models import FluxPolicy, LoraSettings, bundled_config, diffusers_to_bfl_transformer, save_lora

DEV = bundled_config("flux-dev")["transformer"]
# FLUX.1-dev in ComfyUI's terms (comfy/model_detection.py), see REFERENCES.md.
DEV_UNET_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, patch_size=2, hidden_size=3072,
                       num_heads=24, depth=19, depth_single_blocks=38, context_in_dim=4096, vec_in_dim=768,
                       axes_dim=[16, 56, 56], mlp_ratio=4.0, theta=10000, qkv_bias=True, guidance_embed=True)

# Runs in the ComfyUI venv: load the LoRA file the ComfyUI way and report what was consumed.
KEY_REPORT = r"""
import json, logging
import comfy.lora, comfy.lora_convert, comfy.utils
""" + LOG_CATCHER + r"""
def lora_report(model, lora_path):
    sd = comfy.utils.load_torch_file(lora_path, safe_load=True)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(sd), key_map)
    params = dict(model.named_parameters())
    bad_shapes = []
    for target, patch in patches.items():
        key, slice_ = (target, None) if isinstance(target, str) else target
        shape = list(params[key].shape)
        if slice_ is not None:  # q/k/v land in slices of the fused qkv / linear1 weights
            dim, offset, size = slice_
            shape[dim] = size
        up, down = patch.weights[0], patch.weights[1]
        if [up.shape[0], down.shape[1]] != shape:
            bad_shapes.append([str(target), list(up.shape), list(down.shape), shape])
    return dict(keys=len(sd), patches=len(patches), bad_shapes=bad_shapes,
                not_loaded=[m for m in catch.messages if "lora key not loaded" in m or "NOT LOADED" in m])
"""


def _run(server, code, *args, timeout=900):
    proc = server.python(KEY_REPORT + code, timeout=timeout, args=[str(a) for a in args])
    assert proc.returncode == 0, f"ComfyUI-side check failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _lora_modules(path):
    return {k.rsplit(".", 2)[0] for k in load_file(str(path)) if ".lora_A." in k}


def test_flux_dev_lora_keys_all_consumed_by_comfyui(comfy_server, tmp_path):
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(DEV)
    policy = FluxPolicy(transformer, lora=LoraSettings(rank=2, alpha=2), dtype=None)
    # Only the LoRA weights are written: give just those real (CPU) storage.
    for name, module in policy.transformer.named_modules():
        if name.endswith((".lora_A", ".lora_B")):
            module.to_empty(device="cpu")
            for p in module.parameters():
                p.data.zero_()
    lora = save_lora(tmp_path / "flux-dev-lora.safetensors", policy)
    modules = _lora_modules(lora)
    # Default targets on FLUX.1-dev: 12 per double block x 19, 3 (q, k, v) per single block x 38.
    assert len(modules) == 12 * 19 + 3 * 38

    # The check can fail: raw peft names (no "transformer." prefix) are a format ComfyUI skips.
    raw_peft = tmp_path / "raw-peft.safetensors"
    save_file({"base_model.model." + k[len("transformer."):]: v for k, v in load_file(str(lora)).items()},
              str(raw_peft))

    reports = _run(comfy_server, r"""
import torch
import comfy.model_detection
cfg = comfy.model_detection.model_config_from_unet_config(json.loads(ARGS[0]))
model = cfg.get_model({}, "", device=torch.device("meta"))
out = []
for path in ARGS[1:]:
    catch.messages.clear()
    out.append(lora_report(model, path))
print(json.dumps(out))
""", json.dumps(DEV_UNET_CONFIG), lora, raw_peft)
    report, control = reports
    assert control["patches"] == 0 and len(control["not_loaded"]) == control["keys"] == 3 * len(modules)
    assert report["not_loaded"] == []
    assert report["keys"] == 3 * len(modules)  # lora_A, lora_B, alpha per module
    assert report["patches"] == len(modules)
    assert report["bad_shapes"] == []


# Runs in the ComfyUI venv: the model through UNETLoader, the LoRA through LoraLoaderModelOnly, then
# the transformer's velocity for the test's inputs with and without the LoRA patches.
COMFY_SIDE = r"""
import sys, torch
from safetensors.torch import load_file, save_file
import nodes, comfy.model_management as mm
unet_name, lora_name, inputs, out = ARGS
i = load_file(inputs)
(base,) = nodes.UNETLoader().load_unet(unet_name, "default")
report = lora_report(base.model, folder_paths.get_full_path_or_raise("loras", lora_name))
catch.messages.clear()
(with_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(base, lora_name, 1.0)

def velocity(patcher):
    mm.load_models_gpu([patcher], force_full_load=True)  # applies (or removes) the LoRA patches
    dm = patcher.model.diffusion_model
    dtype = patcher.model.get_dtype()
    with torch.no_grad():
        v = dm(i["x"].to(dtype), i["sigma"].to(dtype), i["context"].to(dtype), y=i["y"].to(dtype),
               guidance=torch.full((1,), 3.5, dtype=dtype))
    return v.float()

res = {"lora": velocity(with_lora), "base": velocity(base)}
save_file(res, out)
report["not_loaded_by_node"] = [m for m in catch.messages if "lora key not loaded" in m or "NOT LOADED" in m]
report["dtype"] = str(base.model.get_dtype())
report["patches_on_model"] = sum(len(p) for p in with_lora.patches.values())  # q/k/v share one fused weight
print(json.dumps(report))
"""


def _small_flux_dev():
    """FLUX.1-dev's shapes with one double and one single block (531M parameters), weights
    rounded to bf16 so the bf16 file and the fp32 model hold the same numbers."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(dict(DEV, num_layers=1, num_single_layers=1))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


def test_lora_end_to_end_through_unetloader_and_loraloader(comfy_server, tmp_path):
    models = comfy_server.base / "models"
    (models / "diffusion_models").mkdir(parents=True, exist_ok=True)
    (models / "loras").mkdir(parents=True, exist_ok=True)
    unet_name, lora_name = "treerpo-test-flux-3072-1-1.safetensors", "treerpo-test-flux-3072-1-1-lora.safetensors"

    policy = FluxPolicy(_small_flux_dev(), lora=LoraSettings(rank=4, alpha=8), dtype=torch.float32)
    with torch.no_grad():  # a trained-looking LoRA: lora_B starts at zero
        g = torch.Generator().manual_seed(1)
        for name, p in policy.lora_parameters().items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 8, 8, generator=g)
    cond = {"prompt_embeds": torch.randn(1, 8, 4096, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 768, generator=g)}
    sigma = torch.tensor([0.7])
    with torch.no_grad():
        ours_lora = policy(x, sigma, cond)
        with policy.reference():
            ours_base = policy(x, sigma, cond)
    lora = save_lora(models / "loras" / lora_name, policy)
    n_modules = len(_lora_modules(lora))
    base_sd = {k: v for k, v in policy.transformer.state_dict().items() if "lora_" not in k}
    base_sd = {k.replace(".base_layer", ""): v for k, v in base_sd.items()}  # peft wraps targets
    save_file({k: v.bfloat16().contiguous() for k, v in diffusers_to_bfl_transformer(base_sd).items()},
              str(models / "diffusion_models" / unet_name))
    inputs = tmp_path / "inputs.safetensors"
    save_file({"x": x, "context": cond["prompt_embeds"], "y": cond["pooled_prompt_embeds"], "sigma": sigma},
              str(inputs))
    del policy, base_sd
    gc.collect()

    out = tmp_path / "comfy_out.safetensors"
    try:
        report = _run(comfy_server, COMFY_SIDE, unet_name, lora_name, inputs, out)
    finally:  # 1 GB, and other tests share this server's model folders
        (models / "diffusion_models" / unet_name).unlink()
        (models / "loras" / lora_name).unlink()

    assert report["not_loaded"] == [] and report["not_loaded_by_node"] == []
    assert report["keys"] == 3 * n_modules and report["patches"] == n_modules
    assert report["patches_on_model"] == n_modules
    assert report["bad_shapes"] == []
    comfy = load_file(str(out))
    delta_ours, delta_comfy = ours_lora - ours_base, comfy["lora"] - comfy["base"]
    assert delta_comfy.abs().mean() > 1e-3 * comfy["base"].abs().mean(), "the LoRA did not change ComfyUI's output"
    # ComfyUI computes what our policy computes, with and without the LoRA.
    torch.testing.assert_close(comfy["base"], ours_base, rtol=1e-4, atol=1e-5 * ours_base.abs().max().item())
    err = (delta_comfy - delta_ours).norm() / delta_ours.norm()
    assert err < 2e-3, (f"LoRA effect in ComfyUI differs from ours by {err:.3g} (relative); "
                        f"ComfyUI dtype {report['dtype']}")
