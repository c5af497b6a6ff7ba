"""ComfyUI's partial loading (low VRAM) with the ComfyUI-MODEL route's LoRA, in the real ComfyUI 0.3.75 (CPU).

When ComfyUI needs memory for another model it offloads some of a loaded MODEL's layers
(ModelPatcher.partially_unload; a low-VRAM load offloads them from the start): those layers keep our
weight wrappers in their weight_function list, are switched to comfy_cast_weights, and cast_bias_weight
copies the stored weight to the compute device and applies the wrappers per forward. Checked here on
the tiny-shapes fp8 MODEL from UNETLoader, gradient checkpointing on: after ComfyUI offloads half of the
MODEL while it is loaded for training, velocities and every LoRA gradient equal the fully loaded
policy's, the offloaded adapted layers still hold the wrapper, one tree iteration trains (first ratio 1),
and ComfyUI's move of the offloaded layers' weight functions to the offload device leaves the trainable
LoRA on the load device (on a GPU the weight is cast to the GPU and the LoRA must meet it there).
"""

from __future__ import annotations

import json
from pathlib import Path

from test_comfy_model_source import _fp8_tiny_shapes, _run


LOWVRAM_SIDE = r"""
P = json.loads(ARGS[3])
trainer_mod = importlib.import_module(ARGS[1] + ".core.trainer")
presets = importlib.import_module(ARGS[1] + ".core.presets")
files = core.flux_files_from_single_files(P["path"], clip_l=P["clip_l"], t5xxl=P["t5xxl"], vae=P["vae"],
                                          tokenizers=P["tokenizers"])
ours = core.load_flux(files, lora=core.LoraSettings(4, 4), dtype=torch.float32, cache_dir=P["cache"])
with torch.inference_mode():
    (model,) = nodes.UNETLoader().load_unet(P["file"], "fp8_e4m3fn")
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 8, 8, generator=g)
sigma = torch.tensor([0.8, 0.35])
cond = {k: torch.cat([c[k] for c in ours.encode(P["prompts"])]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
w = torch.randn(x.shape, generator=g)
r = {}

def forward_backward(pol):
    for p in pol.lora_parameters().values():
        p.grad = None
    xa = x.clone().requires_grad_(True)
    v = pol(xa, sigma, cond)
    (v * w).sum().backward()
    return v.detach(), {n: p.grad.clone() for n, p in pol.lora_parameters().items()}, xa.grad

with torch.inference_mode(False), torch.enable_grad():
    pol = cf.ComfyFluxPolicy(model, core.LoraSettings(4, 4, targets=cf.COMFY_LORA_TARGETS), gradient_checkpointing=True)
    with torch.no_grad():  # a trained-looking LoRA: lora_down != 0, so both factors get gradients
        for p in pol.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    v_full, g_full, gx_full = forward_backward(pol)
    base = pol.patcher.model
    r["lowvram_before"] = bool(base.model_lowvram)
    # ComfyUI frees half of the MODEL as it does when another model needs the memory
    size = pol.patcher.model_size()
    freed = pol.patcher.partially_unload(pol.patcher.offload_device, memory_to_free=size // 2)
    r["freed_fraction"] = freed / size
    r["lowvram_after"] = bool(base.model_lowvram)
    r["still_loaded"] = pol._loaded()
    modules = dict(base.named_modules())
    offloaded = [n for n, m in modules.items() if getattr(m, "comfy_patched_weights", None) is False]
    adapted_offloaded = [n for n in pol.modules_with_lora if n in offloaded]
    r["offloaded_layers"] = len(offloaded)
    r["adapted_offloaded"] = len(adapted_offloaded)
    r["adapted_total"] = len(pol.modules_with_lora)
    r["wrapper_kept"] = all(any(isinstance(f, cf.LoraWrapper) for f in modules[n].weight_function)
                            for n in adapted_offloaded)
    r["cast_on"] = all(modules[n].comfy_cast_weights for n in adapted_offloaded)
    v_part, g_part, gx_part = forward_backward(pol)
    r["v_max_abs"] = float((v_part - v_full).abs().max())
    r["v_rel"] = rel(v_part, v_full)
    r["grad_x_rel"] = rel(gx_part, gx_full)
    r["grads_nonzero"] = sum(int(bool(t.abs().sum() > 0)) for t in g_part.values())
    r["n_params"] = len(g_part)
    r["grad_rel_max"] = max(rel(g_part[n], g_full[n]) for n in g_full)
    # ComfyUI moves an offloaded layer's weight functions to the offload device: the LoRA stays put
    wrapper = next(iter(pol.adapters.values()))
    before = [p.data_ptr() for p in wrapper.parameters()]
    r["move_to_offload_returns"] = wrapper.move_to(torch.device("meta"))
    r["lora_devices_after_offload_move"] = sorted({str(p.device) for p in wrapper.parameters()})
    r["lora_storage_kept"] = before == [p.data_ptr() for p in wrapper.parameters()]
    r["move_to_load_returns"] = wrapper.move_to(pol.patcher.load_device)
    # one tree iteration on the partially loaded MODEL
    class Brightness:
        names, weights = ["brightness"], [1.0]
        def __call__(self, images, prompts):
            return images.float().mean(dim=(1, 2, 3)).unsqueeze(1).cpu()
    cfg = presets.make_config("dynamic-treerpo", num_steps=4, branching=[2, 2], seed=0, lr=3e-3, window_every=1)
    tr = trainer_mod.Trainer(pol, cfg, rewards=Brightness(), encode=ours.encode, decode=ours.decode,
                             latent_shape=(16, 8, 8))
    m = tr.step(P["prompts"][:1])
    r["ratio_first_update"] = m["ratio_first_update"]
    r["loss_finite"] = math.isfinite(m["loss"])
    r["still_lowvram_after_iteration"] = bool(base.model_lowvram)
print(json.dumps(r))
"""


def test_partially_unloaded_model_keeps_adapters_and_gradients(comfy_server, tmp_path):
    _, params = _fp8_tiny_shapes(comfy_server.base / "models", tmp_path, "treerpo-lowvram-tiny-shapes-fp8.safetensors")
    path = Path(params["path"])
    try:
        r = _run(comfy_server, LOWVRAM_SIDE, json.dumps(params))
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".json").unlink(missing_ok=True)
    print(json.dumps(r, indent=1))

    assert not r["lowvram_before"] and r["lowvram_after"] and r["still_loaded"], r
    assert r["freed_fraction"] >= 0.4, r
    # adapted layers among the offloaded ones, each still carrying our wrapper, cast per forward
    assert 0 < r["adapted_offloaded"] < r["adapted_total"] and r["wrapper_kept"] and r["cast_on"], r
    # the same velocities and gradients as fully loaded (CPU: the same arithmetic, measured 0.0)
    assert r["v_rel"] < 1e-6 and r["grad_x_rel"] < 1e-6, r
    assert r["grads_nonzero"] == r["n_params"] and r["grad_rel_max"] < 1e-6, r
    # an offload move leaves the LoRA (and its optimizer state) where the layers compute
    assert r["move_to_offload_returns"] == 0 and r["lora_devices_after_offload_move"] == ["cpu"], r
    assert r["lora_storage_kept"] and r["move_to_load_returns"] > 0, r
    assert r["ratio_first_update"] == 1.0 and r["loss_finite"], r
