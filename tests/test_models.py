"""FLUX model stack: loaders (diffusers folder and ComfyUI/BFL single files), policy,
embedding cache, decoding and LoRA files, all on the tiny pipeline of treerpo.testing."""

import inspect
import json
import shutil
import weakref

import pytest
import torch

from treerpo.core.models import (
    FluxDecoder,
    FluxPolicy,
    FluxTextEncoder,
    LoraSettings,
    MissingModelFile,
    ModelFileError,
    load_lora,
    lora_settings_from_file,
    pack_latents,
    read_lora_metadata,
    save_lora,
    unpack_latents,
)
from treerpo.core.models import build, convert, weights
from treerpo.core.models.build import load_transformer, load_vae
from treerpo.core.models.files import (
    flux_files_from_comfyui,
    flux_files_from_diffusers,
    flux_files_from_single_files,
)
from treerpo.testing import build_tiny_flux

PROMPTS = ["a red cube", "a photo of a cat on the tree"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux"))


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(tiny.diffusers), local_files_only=True)


def _inputs(b=2, h=8, w=8, seq=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, h, w, generator=g)
    cond = {"prompt_embeds": torch.randn(b, seq, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(b, 32, generator=g)}
    sigma = torch.rand(b, generator=g) * 0.9 + 0.05
    return x, sigma, cond


def _randomise_lora(policy, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.lora_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


# ------------------------------------------------------------------ policy
def test_pack_unpack_roundtrip_matches_diffusers(pipe):
    x = torch.randn(3, 16, 6, 10)
    ours = pack_latents(x)
    theirs = pipe._pack_latents(x, 3, 16, 6, 10)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_latents(ours, 6, 10), x)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.randn(1, 16, 5, 6))


def test_policy_forward_is_fluxpipeline_convention(tiny, pipe):
    """Same velocity as the transformer called the way FluxPipeline calls it."""
    policy = FluxPolicy(load_transformer(tiny.diffusers_files()), guidance=3.5)
    x, sigma, cond = _inputs(h=8, w=6)
    v = policy(x, sigma, cond)
    assert v.shape == x.shape and v.dtype == x.dtype
    tr = pipe.transformer
    with torch.no_grad():
        out = tr(
            hidden_states=pipe._pack_latents(x, 2, 16, 8, 6),
            timestep=(sigma * 1000) / 1000,  # FluxPipeline: t = sigma * 1000, passes t / 1000
            guidance=torch.full([2], 3.5),
            pooled_projections=cond["pooled_prompt_embeds"],
            encoder_hidden_states=cond["prompt_embeds"],
            txt_ids=torch.zeros(7, 3),
            img_ids=pipe._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
            return_dict=False,
        )[0]
    expected = pipe._unpack_latents(out, 8 * 8, 6 * 8, 8)
    torch.testing.assert_close(v, expected, rtol=0, atol=1e-6)
    # the guidance value reaches the model
    assert not torch.allclose(FluxPolicy(policy.transformer, guidance=1.0)(x, sigma, cond), v)


def test_policy_euler_sampling_equals_fluxpipeline(tiny, pipe):
    """A 3-step Euler loop over the policy reproduces FluxPipeline's latents (timestep scale, ids, guidance)."""
    policy = FluxPolicy(load_transformer(tiny.diffusers_files()))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 16, 8, 8, generator=g)
    pe, pp = torch.randn(1, 5, 32, generator=g), torch.randn(1, 32, generator=g)
    out = pipe(
        prompt_embeds=pe, pooled_prompt_embeds=pp, latents=pipe._pack_latents(x0, 1, 16, 8, 8),
        height=64, width=64, num_inference_steps=3, guidance_scale=3.5, output_type="latent",
    ).images
    sigmas = pipe.scheduler.sigmas.tolist()
    x = x0
    with torch.no_grad():
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (s_next - s) * policy(x, torch.tensor([s]), {"prompt_embeds": pe, "pooled_prompt_embeds": pp})
    torch.testing.assert_close(x, pipe._unpack_latents(out, 64, 64, 8), rtol=1e-5, atol=1e-5)


def test_lora_trainable_reference_and_checkpointing(tiny):
    policy = FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=4, alpha=8))
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    modules = {n.split(".lora_")[0].split("transformer.", 1)[1] for n in trainable}
    for t in ("attn.to_q", "attn.add_v_proj", "attn.to_add_out", "ff.net.2", "ff_context.net.0.proj"):
        assert any(m.endswith(t) for m in modules), t
    x, sigma, cond = _inputs()
    with torch.no_grad():
        base = policy(x, sigma, cond)  # B = 0 at init: the policy starts at the base model
        with policy.reference():
            assert torch.equal(policy(x, sigma, cond), base)
    _randomise_lora(policy)
    v = policy(x, sigma, cond)
    assert not torch.allclose(v, base)
    with torch.no_grad(), policy.reference():
        with policy.reference():  # nesting keeps adapters off until the outer exit
            pass
        torch.testing.assert_close(policy(x, sigma, cond), base)
    torch.testing.assert_close(policy(x, sigma, cond), v)
    # gradient checkpointing: same gradients, only LoRA receives them
    grads = []
    for ckpt in (False, True):
        policy.zero_grad(set_to_none=True)
        if ckpt:
            policy.transformer.enable_gradient_checkpointing()
        policy(x, sigma, cond).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(trainable) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="match no module"):
        FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=2, alpha=2, targets=["attn.nope"]))
    with pytest.raises(ValueError, match="prompt_embeds"):
        policy(x, sigma, {"pooled_prompt_embeds": cond["pooled_prompt_embeds"]})


# ------------------------------------------------------------------ loaders
def test_both_routes_give_identical_transformer_outputs(tiny):
    fd, fs = tiny.diffusers_files(), tiny.single_files()
    assert (fd.route, fs.route, fs.transformer_layout) == ("diffusers", "single_file", "bfl")
    pd, ps = FluxPolicy(load_transformer(fd)), FluxPolicy(load_transformer(fs))
    x, sigma, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(pd(x, sigma, cond), ps(x, sigma, cond))
    sd_d, sd_s = pd.transformer.state_dict(), ps.transformer.state_dict()
    assert sd_d.keys() == sd_s.keys() and all(torch.equal(sd_d[k], sd_s[k]) for k in sd_d)


def test_fp8_single_file_dequantises(tiny):
    """Scaled-fp8 file with 'model.diffusion_model.' prefix: weights = fp8 * scale_weight."""
    from safetensors import safe_open

    t8 = load_transformer(tiny.single_files(fp8=True))
    ref = load_transformer(tiny.diffusers_files())
    with safe_open(str(tiny.transformer_fp8), "pt") as f:
        q = f.get_tensor("model.diffusion_model.double_blocks.0.img_mlp.0.weight")
        s = f.get_tensor("model.diffusion_model.double_blocks.0.img_mlp.0.scale_weight")
    assert q.dtype == torch.float8_e4m3fn
    got = t8.state_dict()["transformer_blocks.0.ff.net.0.proj.weight"]
    assert torch.equal(got, q.float() * s.float())
    x, sigma, cond = _inputs()
    with torch.no_grad():
        a, b = FluxPolicy(t8)(x, sigma, cond), FluxPolicy(ref)(x, sigma, cond)
    assert not torch.equal(a, b)  # really quantised ...
    assert (a - b).norm() / b.norm() < 0.3  # ... and close (e4m3 keeps 3 mantissa bits)


def test_real_flux_configs_recognised_from_bfl_shapes():
    """FLUX.1-dev / schnell BFL files pick the bundled configs from their shapes alone; a
    pruned FLUX-architecture file (fewer blocks) gets a derived config. Meta tensors: no memory."""
    from pathlib import Path

    from treerpo.core.models.configs import _resolve_transformer_config, _transformer_shapes, bundled_config

    def bfl_shapes(cfg):
        meta = {k: torch.empty(v, device="meta") for k, v in _transformer_shapes(cfg).items()}
        return {k: tuple(v.shape) for k, v in convert.diffusers_to_bfl_transformer(meta).items()}

    dev = bundled_config("flux-dev")["transformer"]
    shapes = bfl_shapes(dev)
    assert shapes["double_blocks.0.img_attn.qkv.weight"] == (9216, 3072)
    assert shapes["single_blocks.37.linear1.weight"] == (21504, 3072)
    cfg, variant = _resolve_transformer_config(Path("/x/flux1-dev.safetensors"), shapes, None)
    assert variant == "flux-dev" and cfg["guidance_embeds"] and cfg["num_single_layers"] == 38
    schnell = bundled_config("flux-schnell")["transformer"]
    assert _resolve_transformer_config(Path("/x/s.safetensors"), bfl_shapes(schnell), None)[1] == "flux-schnell"
    pruned = dict(dev, num_layers=2, num_single_layers=3)
    cfg, variant = _resolve_transformer_config(Path("/x/lite.safetensors"), bfl_shapes(pruned), None)
    assert variant == "custom" and (cfg["num_layers"], cfg["num_single_layers"]) == (2, 3)
    assert list(cfg["axes_dims_rope"]) == [16, 56, 56]


def test_diffusers_layout_single_file(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tiny.diffusers / "transformer" / "diffusion_pytorch_model.safetensors"))
    f = tmp_path / "flux-diffusers-keys.safetensors"
    save_file(sd, str(f))
    shutil.copy(tiny.transformer.with_suffix(".json"), f.with_suffix(".json"))
    files = flux_files_from_single_files(f)
    assert files.transformer_layout == "diffusers"
    x, sigma, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(FluxPolicy(load_transformer(files))(x, sigma, cond),
                           FluxPolicy(load_transformer(tiny.diffusers_files()))(x, sigma, cond))


def test_all_in_one_comfyui_checkpoint(tiny, tmp_path):
    """One file with transformer, VAE and both text encoders under ComfyUI's prefixes
    (as Comfy-Org's flux1-dev-fp8 checkpoint); the sidecar JSON holds one section per part."""
    from safetensors.torch import load_file, save_file

    sd = {"model.diffusion_model." + k: v for k, v in load_file(str(tiny.transformer)).items()}
    sd.update({"vae." + k: v for k, v in load_file(str(tiny.vae)).items()})
    sd.update({"text_encoders.clip_l.transformer.text_model." + k: v for k, v in load_file(str(tiny.clip_l)).items()})
    sd.update({"text_encoders.t5xxl.transformer." + k: v for k, v in load_file(str(tiny.t5xxl)).items()})
    f = tmp_path / "flux-all-in-one.safetensors"
    save_file(sd, str(f))
    sections = {"transformer": "tiny-flux", "clip_l": "clip_l_tiny", "t5xxl": "t5xxl_tiny", "vae": "ae_tiny"}
    f.with_suffix(".json").write_text(json.dumps({
        s: json.loads(next(tiny.comfyui.rglob(n + ".json")).read_text()) for s, n in sections.items()}))
    files = flux_files_from_single_files(f, clip_l=f, t5xxl=f, vae=f, tokenizers=tiny.tokenizers)
    ref = tiny.single_files()
    x, sigma, cond = _inputs()
    with torch.no_grad():
        assert torch.equal(FluxPolicy(load_transformer(files))(x, sigma, cond),
                           FluxPolicy(load_transformer(ref))(x, sigma, cond))
    z = torch.randn(1, 16, 2, 2)
    assert torch.equal(FluxDecoder(load_vae(files))(z), FluxDecoder(load_vae(ref))(z))
    a = FluxTextEncoder(files, cache_dir=tmp_path / "a", max_sequence_length=8)(PROMPTS)
    b = FluxTextEncoder(ref, cache_dir=tmp_path / "b", max_sequence_length=8)(PROMPTS)
    assert all(torch.equal(a[i][k], b[i][k]) for i in range(2) for k in a[i])


def _patched_diffusers_converter(inner_dim):
    """diffusers' own BFL->diffusers converter as an independent oracle (its width is fixed to
    FLUX.1's 3072; patched to the tiny width for this comparison only)."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    if "inner_dim = 3072" not in src:
        pytest.skip("diffusers' converter changed shape; oracle unavailable")
    ns = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), ns)  # noqa: S102 - diffusers' converter as oracle
    return ns["convert_flux_transformer_checkpoint_to_diffusers"]


def test_our_converters_agree_with_diffusers_converters(tiny):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from safetensors.torch import load_file

    bfl = load_file(str(tiny.transformer))
    ours = load_transformer(tiny.single_files()).state_dict()
    theirs = _patched_diffusers_converter(32)(dict(bfl))
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)

    ae = load_file(str(tiny.vae))
    fs = tiny.single_files()
    ours_vae = load_vae(fs).state_dict()
    theirs_vae = convert_ldm_vae_checkpoint(dict(ae), fs.vae_config)
    assert set(theirs_vae) == set(ours_vae)
    assert all(torch.equal(theirs_vae[k], ours_vae[k]) for k in ours_vae)


def test_vae_conversion_names_missing_foreign_and_misshapen_tensors(tiny):
    from safetensors.torch import load_file

    ae = load_file(str(tiny.vae))
    fs = tiny.single_files()
    target = {k: tuple(v.shape) for k, v in load_vae(fs).state_dict().items()}
    assert set(convert.bfl_to_diffusers_vae(ae, target)) == set(target)
    gone = dict(ae)
    del gone["decoder.conv_in.weight"]
    with pytest.raises(ModelFileError, match=r"ae\.x: 1 autoencoder tensors missing.*decoder\.conv_in\.weight"):
        convert.bfl_to_diffusers_vae(gone, target, source="ae.x")
    with pytest.raises(ModelFileError, match=r"not part of this autoencoder.*encoder\.down\.9\.block\.0\.x"):
        convert.bfl_to_diffusers_vae(dict(ae, **{"encoder.down.9.block.0.x": torch.zeros(1)}), target, source="ae.x")
    wide = dict(ae, **{"decoder.conv_in.weight": torch.zeros(7, *ae["decoder.conv_in.weight"].shape[1:])})
    with pytest.raises(ModelFileError, match=r"shapes do not match.*decoder\.conv_in\.weight"):
        convert.bfl_to_diffusers_vae(wide, target, source="ae.x")


def test_decode_routes_agree_and_match_pipeline(tiny, pipe):
    z = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    dec_d = FluxDecoder(load_vae(tiny.diffusers_files()))
    dec_s = FluxDecoder(load_vae(tiny.single_files()))
    img = dec_d(z)
    assert img.shape == (2, 3, 32, 32) and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert torch.equal(img, dec_s(z))
    with torch.no_grad():
        ref = pipe.vae.decode(z / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor, return_dict=False)[0]
    ref = pipe.image_processor.postprocess(ref, output_type="pt")
    torch.testing.assert_close(img, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(dec_d(pack_latents(z), height=4, width=4), img)  # packed input


# ------------------------------------------------------------------ text + cache
def test_text_encoders_both_routes_match_pipeline(tiny, pipe, tmp_path):
    enc_d = FluxTextEncoder(tiny.diffusers_files(), cache_dir=tmp_path / "d", max_sequence_length=24)
    enc_s = FluxTextEncoder(tiny.single_files(), cache_dir=tmp_path / "s", max_sequence_length=24)
    a, b = enc_d(PROMPTS), enc_s(PROMPTS)
    pe, pp, _ = pipe.encode_prompt(PROMPTS, prompt_2=None, max_sequence_length=24)
    for i in range(len(PROMPTS)):
        assert a[i]["prompt_embeds"].shape == (1, 24, 32) and a[i]["pooled_prompt_embeds"].shape == (1, 32)
        for k in a[i]:
            assert torch.equal(a[i][k], b[i][k])
        torch.testing.assert_close(a[i]["prompt_embeds"], pe[i : i + 1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a[i]["pooled_prompt_embeds"], pp[i : i + 1], rtol=1e-5, atol=1e-5)
    assert not torch.equal(a[0]["prompt_embeds"], a[1]["prompt_embeds"])


def test_embedding_cache_second_run_builds_no_text_encoders(tiny, tmp_path, monkeypatch):
    import transformers

    files = tiny.diffusers_files()
    first = FluxTextEncoder(files, cache_dir=tmp_path, max_sequence_length=16)
    out1 = first(PROMPTS + [PROMPTS[0]])
    assert first.encoder_loads == 1 and first.misses == 2
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert not list(tmp_path.glob("*.tmp"))
    assert first._models is None  # encoders freed after encoding

    built = []
    for cls in (transformers.CLIPTextModel, transformers.T5EncoderModel):
        orig = cls.__init__

        def spy(self, *a, _orig=orig, **k):
            built.append(type(self).__name__)
            _orig(self, *a, **k)

        monkeypatch.setattr(cls, "__init__", spy)
    second = FluxTextEncoder(tiny.diffusers_files(), cache_dir=tmp_path, max_sequence_length=16)
    out2 = second(list(reversed(PROMPTS)))
    assert built == [] and second.encoder_loads == 0 and second.hits == 2
    assert torch.equal(out2[0]["prompt_embeds"], out1[1]["prompt_embeds"])
    assert torch.equal(out2[1]["pooled_prompt_embeds"], out1[0]["pooled_prompt_embeds"])
    # the key includes the max length: another length is a miss and builds the encoders
    third = FluxTextEncoder(tiny.diffusers_files(), cache_dir=tmp_path, max_sequence_length=8)
    assert third([PROMPTS[0]])[0]["prompt_embeds"].shape == (1, 8, 32)
    assert set(built) == {"CLIPTextModel", "T5EncoderModel"} and third.encoder_loads == 1


def test_text_encoders_are_released(tiny, tmp_path):
    enc = FluxTextEncoder(tiny.diffusers_files(), cache_dir=tmp_path, max_sequence_length=8, keep_loaded=True)
    enc(["a dog"])
    ref = weakref.ref(enc._models[3])
    enc.release()
    import gc

    gc.collect()
    assert ref() is None


# ------------------------------------------------------------------ LoRA files
def test_lora_save_load_roundtrip_reproduces_outputs(tiny, tmp_path):
    fd = tiny.diffusers_files()
    policy = FluxPolicy(load_transformer(fd), lora=LoraSettings(rank=4, alpha=8),
                        base_identity=fd.transformer_identity())
    x, sigma, cond = _inputs()
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a "trained" LoRA (B no longer zero)
        opt.zero_grad()
        (policy(x, sigma, cond) - 1).square().mean().backward()
        opt.step()
    with torch.no_grad():
        v = policy(x, sigma, cond)
    path = save_lora(tmp_path / "run" / "lora.safetensors", policy, preset="dynamic-treerpo",
                     settings={"lr": 1e-2, "num_steps": 6}, iteration=3, reward_stats={"mean": 0.25, "std": 0.1})
    assert [p.name for p in path.parent.iterdir()] == ["lora.safetensors"]  # no temp file left
    meta = read_lora_metadata(path)
    assert meta["rank"] == 4 and meta["alpha"] == 8.0 and meta["iteration"] == 3
    assert meta["preset"] == "dynamic-treerpo" and meta["settings"]["num_steps"] == 6
    assert meta["reward_stats"] == {"mean": 0.25, "std": 0.1}
    assert meta["base_model"]["fingerprint"] == fd.transformer_identity()["fingerprint"]
    assert meta["targets"] == list(policy.lora_settings.targets)

    # continue training from the file: a fresh policy from the OTHER loading route
    settings = lora_settings_from_file(path)
    assert (settings.rank, settings.alpha) == (4, 8.0)
    fresh = FluxPolicy(load_transformer(tiny.single_files()), lora=settings)
    with torch.no_grad():
        assert not torch.allclose(fresh(x, sigma, cond), v)
        load_lora(path, fresh)
        torch.testing.assert_close(fresh(x, sigma, cond), v, rtol=0, atol=1e-6)
    # a policy with another alpha still reproduces the file's function (alpha folded into B)
    other = FluxPolicy(load_transformer(fd), lora=LoraSettings(rank=4, alpha=4))
    load_lora(path, other)
    with torch.no_grad():
        torch.testing.assert_close(other(x, sigma, cond), v, rtol=1e-5, atol=1e-5)


def test_lora_file_loads_in_diffusers_pipeline_every_key_used(tiny, tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    policy = FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=4, alpha=16))
    _randomise_lora(policy)
    path = save_lora(tmp_path / "lora.safetensors", policy)
    sd = load_file(str(path))
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight", ".alpha")) for k in sd)

    pipe = FluxPipeline.from_pretrained(str(tiny.diffusers), local_files_only=True)
    pipe.load_lora_weights(str(path), adapter_name="treerpo")
    params = dict(pipe.transformer.named_parameters())
    used = 0
    for k, t in sd.items():
        if k.endswith(".alpha"):
            continue
        module, part = k[len("transformer."):].rsplit(".", 2)[0], k.rsplit(".", 2)[1]
        name = f"{module}.{part}.treerpo.weight"
        assert name in params, f"{k} was not loaded by diffusers"
        assert torch.equal(params[name].detach(), t)
        used += 1
    loaded = [n for n in params if ".treerpo." in n]
    assert used == len(loaded) == len(policy.lora_parameters())
    # same function, so the alpha / rank scale is read the same way
    pipe.transformer.requires_grad_(False)
    x, sigma, cond = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(FluxPolicy(pipe.transformer)(x, sigma, cond), policy(x, sigma, cond),
                                   rtol=0, atol=1e-6)


# ------------------------------------------------------------------ bad input
def _copy_diffusers(tiny, dst, drop=None):
    shutil.copytree(tiny.diffusers, dst)
    if drop:
        p = dst / drop
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


def test_missing_folder_parts_are_named(tiny, tmp_path):
    d = _copy_diffusers(tiny, tmp_path / "no_t5", drop="text_encoder_2")
    with pytest.raises(MissingModelFile, match=r"text_encoder_2/ \(T5-XXL"):
        flux_files_from_diffusers(d)
    files = flux_files_from_diffusers(d, parts=["transformer", "vae", "scheduler"])  # enough for decode + policy
    assert files.t5 is None
    with pytest.raises(MissingModelFile, match="text encoders"):
        FluxTextEncoder(files, cache_dir=tmp_path / "c")

    d2 = _copy_diffusers(tiny, tmp_path / "no_weights", drop="vae/diffusion_pytorch_model.safetensors")
    with pytest.raises(MissingModelFile, match=r"diffusion_pytorch_model\.safetensors.*no_weights/vae"):
        flux_files_from_diffusers(d2)
    with pytest.raises(FileNotFoundError, match="not found"):
        flux_files_from_diffusers(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        flux_files_from_diffusers("black-forest-labs/FLUX.1-dev-not-cached")
    with pytest.raises(MissingModelFile, match=r"nope\.safetensors not found; looked in"):
        flux_files_from_comfyui(tiny.comfyui, transformer="nope.safetensors")


def test_truncated_safetensors_fails_before_loading(tiny, tmp_path, monkeypatch):
    bad = tmp_path / "models" / "diffusion_models" / "cut.safetensors"
    bad.parent.mkdir(parents=True)
    data = tiny.transformer.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    shutil.copy(tiny.transformer.with_suffix(".json"), bad.with_suffix(".json"))
    # the expensive part (reading tensors) must never start
    for module in (weights, build):
        monkeypatch.setattr(module, "_load_tensors", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ModelFileError, match=r"cut\.safetensors is truncated: expected \d+ bytes"):
        flux_files_from_single_files(bad)
    bad.write_bytes(b"\x00" * 4)
    with pytest.raises(ModelFileError, match="too short"):
        flux_files_from_single_files(bad)
    d = _copy_diffusers(tiny, tmp_path / "cut_folder")
    t5 = d / "text_encoder_2" / "model.safetensors"
    t5.write_bytes(t5.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match=r"T5-XXL.*text_encoder_2/model\.safetensors is truncated"):
        flux_files_from_diffusers(d)


def test_transformer_of_another_architecture(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    unet = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4)}, str(unet))
    with pytest.raises(ModelFileError, match="not a FLUX.1 transformer.*Stable Diffusion"):
        flux_files_from_single_files(unet)
    with pytest.raises(ModelFileError, match="not a FLUX.1 transformer.*VAE"):
        flux_files_from_single_files(tiny.vae)
    # FLUX-like file whose blocks do not match its config (one double block removed)
    sd = load_file(str(tiny.transformer))
    cfg = json.loads(tiny.transformer.with_suffix(".json").read_text())
    two = tmp_path / "two_blocks.safetensors"
    save_file(sd, str(two))
    (tmp_path / "two_blocks.json").write_text(json.dumps(dict(cfg, num_layers=2)))
    with pytest.raises(ModelFileError, match="tensors missing.*double_blocks.1"):
        flux_files_from_single_files(two)
    # a wider transformer than the config says
    wide = {k: (torch.cat([v, v]) if k == "img_in.weight" else v) for k, v in sd.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    (tmp_path / "wide.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match="shapes do not match"):
        flux_files_from_single_files(tmp_path / "wide.safetensors")
    # tiny sizes match no bundled FLUX.1 config: without a sidecar the error says what to do
    bare = tmp_path / "bare.safetensors"
    shutil.copy(tiny.transformer, bare)
    with pytest.raises(ModelFileError, match="matches neither bundled config.*bare.json"):
        flux_files_from_single_files(bare)
    # an SD VAE (4 latent channels) where the FLUX ae is expected
    ae = load_file(str(tiny.vae))
    ae["decoder.conv_in.weight"] = ae["decoder.conv_in.weight"][:, :4].contiguous()
    save_file(ae, str(tmp_path / "sd_vae.safetensors"))
    shutil.copy(tiny.vae.with_suffix(".json"), tmp_path / "sd_vae.json")
    with pytest.raises(ModelFileError, match="4 latent channels; FLUX needs 16"):
        flux_files_from_single_files(tiny.transformer, vae=tmp_path / "sd_vae.safetensors")
    # text encoders swapped
    with pytest.raises(ModelFileError, match="expected a CLIP-L text encoder.*T5"):
        flux_files_from_single_files(tiny.transformer, clip_l=tiny.t5xxl, tokenizers=tiny.tokenizers)


def test_lora_with_mismatched_keys_changes_nothing(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    policy = FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=4, alpha=4))
    _randomise_lora(policy, seed=5)
    good = save_lora(tmp_path / "good.safetensors", policy)
    target = FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=4, alpha=4))
    before = {n: p.detach().clone() for n, p in target.lora_parameters().items()}

    def unchanged():
        return all(torch.equal(p, before[n]) for n, p in target.lora_parameters().items())

    sd = load_file(str(good))
    # keys of a deeper model (block 7 does not exist here); the other keys are valid and must not be copied
    extra = dict(sd, **{k.replace("transformer_blocks.0.", "transformer_blocks.7."): v for k, v in sd.items()
                        if k.startswith("transformer.transformer_blocks.0.") for v in [v.clone()]})
    save_file(extra, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(ModelFileError, match="match no LoRA module.*transformer_blocks.7"):
        load_lora(tmp_path / "deeper.safetensors", target)
    assert unchanged()
    # another rank
    small = FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=2, alpha=2))
    save_lora(tmp_path / "rank2.safetensors", small)
    with pytest.raises(ModelFileError, match="shape mismatches.*rank"):
        load_lora(tmp_path / "rank2.safetensors", target)
    assert unchanged()
    # fewer modules than the adapter has (strict), and a non-LoRA file
    partial = {k: v for k, v in sd.items() if "ff" not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ModelFileError, match="absent from the file"):
        load_lora(tmp_path / "partial.safetensors", target)
    assert unchanged()
    load_lora(tmp_path / "partial.safetensors", target, strict=False)
    assert not unchanged()
    with pytest.raises(ModelFileError, match="not a diffusers/peft LoRA"):
        load_lora(tiny.vae, target)


def test_lora_write_is_atomic(tiny, tmp_path, monkeypatch):
    import safetensors.torch

    policy = FluxPolicy(load_transformer(tiny.diffusers_files()), lora=LoraSettings(rank=2, alpha=2))
    path = save_lora(tmp_path / "lora.safetensors", policy, iteration=1)
    original = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    _randomise_lora(policy)
    with pytest.raises(OSError, match="disk full"):
        save_lora(path, policy, iteration=2)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora.safetensors"]
