"""Resume and Cancel on the *TreeRPO model from ComfyUI* route, in the real ComfyUI 0.3.75 runtime (CPU).

The tiny-shapes FLUX as an fp8 single file through UNETLoader (weight_dtype fp8_e4m3fn: fp8 weights,
ComfyUI's upcast per layer), gradient checkpointing on. Each run goes through the trainer node's own code
(TrainerStep.execute: free ComfyUI's memory, open the run folder, Cancel checked after every iteration)
on a bundle built as TreeRPOComfyModel builds it; text and images go through Load FLUX's encoders of the
same files, because ComfyUI's CLIP and VAE loaders accept only the real FLUX encoders' sizes.

- 4 iterations straight vs 2 + Cancel (pressed inside iteration 2) + a fresh policy on the same MODEL
  continuing the run folder for 2 more, and the same with Ctrl-C (SIGINT) instead of Cancel: the same LoRA
  weights and the same metrics (timings aside).
- The trainer step's LORA_MODEL output through ComfyUI's Load LoRA Model (LoraModelLoader) reproduces the
  trained velocity.
- The LoRA file this route writes (ComfyUI key format) continues training on this route:
  lora_settings_from_file + load_lora into a fresh policy give the trained velocity; Load FLUX's policy
  refuses it in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from test_comfy_model_source import _fp8_tiny_shapes, _run


RESUME_SIDE = r"""
import signal
from types import SimpleNamespace
P = json.loads(ARGS[3])
train_nodes = importlib.import_module(ARGS[1] + ".nodes.train")
common = importlib.import_module(ARGS[1] + ".nodes.common")
training_run = importlib.import_module(ARGS[1] + ".core.training_run")
presets = importlib.import_module(ARGS[1] + ".core.presets")
lora_files = importlib.import_module(ARGS[1] + ".core.models.lora_files")
from comfy_extras.nodes_train import LoraModelLoader
train_nodes.TrainerStep.hidden = SimpleNamespace(unique_id="resume-test")  # what ComfyUI sets per execution

files = core.flux_files_from_single_files(P["path"], clip_l=P["clip_l"], t5xxl=P["t5xxl"], vae=P["vae"],
                                          tokenizers=P["tokenizers"])
ours = core.load_flux(files, lora=core.LoraSettings(4, 4), dtype=torch.float32, cache_dir=P["cache"])
with torch.inference_mode():  # as ComfyUI runs nodes
    (model,) = nodes.UNETLoader().load_unet(P["file"], "fp8_e4m3fn")
    (model32,) = nodes.UNETLoader().load_unet(P["file"], "default")  # the same numbers held in fp32
LORA = core.LoraSettings(4, 4, targets=cf.COMFY_LORA_TARGETS)

def bundle():
    # what TreeRPOComfyModel.execute builds (a fresh policy on the same MODEL each time)
    with torch.inference_mode(False), torch.enable_grad():
        stack = cf.comfy_flux_stack(model, None, None, LORA, gradient_checkpointing=True, encode=ours.encode,
                                    decode=ours.decode)
        initial = training_run.trainable_snapshot(stack.policy)
        return common.ModelBundle(stack=stack, source="test", initial_state=initial, device=torch.device("cpu"))

class Brightness:
    names, weights = ["brightness"], [1.0]
    def __init__(self, stop_at=None, how=None):
        self.calls, self.stop_at, self.how = 0, stop_at, how
    def __call__(self, images, prompts):  # one call per iteration (one prompt per iteration)
        self.calls += 1
        if self.calls == self.stop_at:  # pressed in the middle of the iteration (after the rollout)
            if self.how == "cancel":
                mm.interrupt_current_processing(True)
            else:
                os.kill(os.getpid(), signal.SIGINT)
        return images.float().mean(dim=(1, 2, 3)).unsqueeze(1).cpu()

cfg = presets.make_config("dynamic-treerpo", num_steps=4, branching=[2, 2], seed=0, lr=3e-3, window_every=1)
SETTINGS = common.TreeSettings(config=cfg, resolution=32)
PROMPTS = common.PromptSet(train=P["prompts"])

def step(b, name, iterations, on_existing, rewards):
    with torch.inference_mode():  # as ComfyUI runs nodes
        out = train_nodes.TrainerStep.execute(iterations=iterations, run_name=name, on_existing=on_existing,
                                              checkpoint_every=10, preview_leaves=2, model=b, prompts=PROMPTS,
                                              rewards=rewards, settings=SETTINGS)
    return out.result

def strip(history):
    return [{k: v for k, v in m.items() if not k.startswith("time_")} for m in history]

def runs_root():
    return common.runs_dir()

r = {"t": [time.time() - T0]}
b = bundle()
run, lora_model, _ = step(b, "straight", 4, "restart", Brightness())
straight = training_run.trainable_snapshot(b.policy)
r["straight_iterations"] = run.run.iteration
r["t"].append(time.time() - T0)

for how in P["stops"]:
    name = f"stopped-{how}"
    b1 = bundle()
    try:
        step(b1, name, 4, "restart", Brightness(stop_at=2, how=how))
        r[how + "_raised"] = None
    except (mm.InterruptProcessingException, KeyboardInterrupt) as e:
        r[how + "_raised"] = type(e).__name__
    mm.interrupt_current_processing(False)
    folder = runs_root() / name
    r[how + "_latest"] = (folder / "checkpoints" / "latest").read_text().strip()
    r[how + "_metric_lines"] = len((folder / "metrics.jsonl").read_text().splitlines())
    del b1
    b2 = bundle()  # a fresh policy from the same MODEL (e.g. after a server restart)
    r[how + "_fresh_equals_initial"] = all(torch.equal(v, b.initial_state[k])
                                           for k, v in training_run.trainable_snapshot(b2.policy).items())
    run2, _, _ = step(b2, name, 2, "continue", Brightness())
    r[how + "_resumed_from"] = run2.run.resumed_from.name
    r[how + "_iterations"] = run2.run.iteration
    resumed = training_run.trainable_snapshot(b2.policy)
    r[how + "_keys_equal"] = sorted(resumed) == sorted(straight)
    r[how + "_max_abs_diff"] = max(float((resumed[k] - straight[k]).abs().max()) for k in straight)
    r[how + "_max_weight"] = max(float(straight[k].abs().max()) for k in straight)
    r[how + "_metrics_equal"] = strip(run2.run.history) == strip(run.run.history)
    if not r[how + "_metrics_equal"]:
        r[how + "_metrics"] = [strip(run.run.history), strip(run2.run.history)]
    del b2, run2
    r["t"].append(time.time() - T0)

# the LORA_MODEL output through ComfyUI's Load LoRA Model, on the fp32-held twin of the MODEL (exact)
# and on the fp8 MODEL itself (ComfyUI merges and rounds to fp8)
g = torch.Generator().manual_seed(0)
x = torch.randn(2, 16, 8, 8, generator=g)
sigma = torch.tensor([0.8, 0.35])
cond = {k: torch.cat([c[k] for c in ours.encode(P["prompts"])]) for k in ("prompt_embeds", "pooled_prompt_embeds")}
pol = b.policy
with torch.inference_mode(False), torch.no_grad():
    v_trained = pol(x, sigma, cond)
    with pol.reference():
        v_ref = pol(x, sigma, cond)
r["lora_effect"] = rel(v_trained, v_ref)
r["lora_model_keys"] = sorted(lora_model)[:2]
catch.messages.clear()
with torch.inference_mode():
    (m32,) = LoraModelLoader.execute(model32, lora_model, 1.0).result
    (m8,) = LoraModelLoader.execute(model, lora_model, 1.0).result
r["not_loaded"] = not_loaded()
r["patched_weights"] = sum(len(p) for p in m32.patches.values())
r["n_modules"] = len(pol.modules_with_lora)
v_base32 = comfy_velocity(model32, x, sigma, cond)
r["loader_fp32_rel"] = rel(comfy_velocity(m32, x, sigma, cond) - v_base32, v_trained - v_ref)
r["loader_fp8_rel"] = rel(comfy_velocity(m8, x, sigma, cond) - v_ref, v_trained - v_ref)
del m32, m8

# the saved file (ComfyUI key format) back into a fresh policy of this route, and into Load FLUX's
path = os.path.join(P["loras"], "resume-test.safetensors")
core.save_lora(path, pol, iteration=4)
settings = core.lora_settings_from_file(path)
r["file_settings"] = [settings.rank, settings.alpha, sorted(settings.targets)]
with torch.inference_mode(False), torch.enable_grad():
    fresh = cf.ComfyFluxPolicy(model, settings)
    r["file_meta_iteration"] = core.load_lora(path, fresh)["iteration"]
    with torch.no_grad():
        r["file_reload_rel"] = rel(fresh(x, sigma, cond), v_trained)
try:
    core.load_lora(path, ours.policy)
    r["load_flux_error"] = None
except Exception as e:
    r["load_flux_error"] = f"{type(e).__name__}: {e}"
r["t"].append(time.time() - T0)
print(json.dumps(r))
"""


def test_comfy_route_resumes_after_cancel_and_ctrl_c_and_its_lora_loads(comfy_server, tmp_path):
    models = comfy_server.base / "models"
    _, params = _fp8_tiny_shapes(models, tmp_path, "treerpo-resume-tiny-shapes-fp8.safetensors")
    path = Path(params["path"])
    (models / "loras").mkdir(parents=True, exist_ok=True)
    params.update(loras=str(models / "loras"), stops=["cancel", "sigint"])
    try:
        r = _run(comfy_server, RESUME_SIDE, json.dumps(params))
    finally:
        for p in (path, path.with_suffix(".json"), models / "loras" / "resume-test.safetensors"):
            p.unlink(missing_ok=True)
    print(json.dumps(r, indent=1))

    assert r["straight_iterations"] == 4
    for how, exc in (("cancel", "InterruptProcessingException"), ("sigint", "KeyboardInterrupt")):
        # pressed inside iteration 2: the iteration finishes, a checkpoint is written, then the run stops
        assert r[how + "_raised"] == exc, r
        assert r[how + "_latest"] == "step-000002" and r[how + "_metric_lines"] == 2, r
        assert r[how + "_fresh_equals_initial"], r  # a fresh policy starts from the same LoRA init
        assert r[how + "_resumed_from"] == "step-000002" and r[how + "_iterations"] == 4, r
        assert r[how + "_keys_equal"], r
        # the same LoRA as the straight run: CPU maths is deterministic here (measured 0.0); 1e-6 of the
        # largest weight allows for a reordered reduction
        assert r[how + "_max_abs_diff"] <= 1e-6 * r[how + "_max_weight"], r
        assert r[how + "_metrics_equal"], r.get(how + "_metrics")
    # LORA_MODEL -> Load LoRA Model: every key consumed, one patch per trained layer, the trained velocity
    assert r["lora_effect"] > 1e-4, r
    assert r["not_loaded"] == [] and r["patched_weights"] == r["n_modules"] == 2 * 8 + 4 * 2, r
    assert r["lora_model_keys"][0].startswith("diffusion_model.")
    assert r["loader_fp32_rel"] < 1e-4, r  # exact up to fp32 rounding
    assert r["loader_fp8_rel"] < 0.5, r  # merged into fp8 weights and rounded (as any LoRA on an fp8 MODEL)
    # the file this route writes continues training on this route, and Load FLUX refuses it in one line
    assert r["file_settings"][:2] == [4, 4.0] and sorted(r["file_settings"][2]) == sorted(
        ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0",
         "txt_mlp.2", "linear1", "linear2"]), r
    assert r["file_meta_iteration"] == 4
    assert r["file_reload_rel"] < 1e-6, r
    err = r["load_flux_error"]
    assert err is not None and err.startswith("ModelFileError") and "ComfyUI" in err and "\n" not in err, err
    assert "TreeRPO model from ComfyUI" in err, err
