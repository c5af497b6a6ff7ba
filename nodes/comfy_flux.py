"""The engine's FLUX stack over the MODEL, CLIP and VAE that ComfyUI's own loaders made.

`ComfyFluxPolicy` wraps ComfyUI's FLUX diffusion model (comfy/ldm/flux/model.py, inside a MODEL's
ModelPatcher) as a velocity model with the contract of core.models.FluxPolicy:
``v = policy(x[B,16,H,W], sigma[B], cond)`` with cond = {"prompt_embeds": [B,L,D],
"pooled_prompt_embeds": [B,P]}, ``reference()``, ``lora_parameters()``, ``has_lora``, ``dtype``,
``device``, ``latent_channels``, ``guidance``, ``lora_settings``, ``base_identity``.

The LoRA is ComfyUI's own trainable weight adapter (comfy.weight_adapter LoRA, attached with
ModelPatcher.add_weight_wrapper as comfy_extras/nodes_train.py does): the base weights stay in the
dtype the loader chose (fp8 included) and ComfyUI's ops upcast each layer's weight and add the
adapter's delta when the layer runs. The LoRA is saved in ComfyUI's key format
(``diffusion_model.<module>.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``, the layout of
ComfyUI's Train LoRA), which LoraLoaderModelOnly and Load LoRA Model read.

Conventions checked against ComfyUI 0.3.75 (BaseModel._apply_model and the FLUX model): FLUX's
model_sampling feeds the diffusion model ``timestep = sigma`` in [0, 1] (its timestep embedding
multiplies by 1000, as diffusers' does); the diffusion model works on the latents after
``process_latent_in`` ((raw - 0.1159) * 0.3611), which are the engine's latents; it packs 2x2
patches itself and returns the velocity (noise - x0) unpacked. So the policy calls the diffusion
model directly with x, sigma, the T5 sequence as context, the pooled CLIP vector as y and the
guidance value, in the MODEL's compute dtype, exactly as _apply_model does.

Needs ComfyUI (imported inside the functions): used only by the node in comfy_model.py and tests.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

# Module suffixes (ComfyUI / BFL names) that get a LoRA when no targets are given: every attention
# and feed-forward projection of the double blocks and both linears of the single blocks (linear1
# holds q, k, v and the MLP input fused; ComfyUI's adapters act on whole weights).
COMFY_LORA_TARGETS: tuple[str, ...] = (
    "img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2",
    "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2",
    "linear1", "linear2",
)
# Load FLUX's (diffusers) target names -> the ComfyUI modules holding those weights. q, k and v are
# one fused weight in ComfyUI's FLUX (qkv in the double blocks, linear1 in the single blocks).
DIFFUSERS_TO_COMFY: dict[str, tuple[str, ...]] = {
    "attn.to_q": ("img_attn.qkv", "linear1"),
    "attn.to_k": ("img_attn.qkv", "linear1"),
    "attn.to_v": ("img_attn.qkv", "linear1"),
    "attn.to_out.0": ("img_attn.proj",),
    "attn.add_q_proj": ("txt_attn.qkv",),
    "attn.add_k_proj": ("txt_attn.qkv",),
    "attn.add_v_proj": ("txt_attn.qkv",),
    "attn.to_add_out": ("txt_attn.proj",),
    "ff.net.0.proj": ("img_mlp.0",),
    "ff.net.2": ("img_mlp.2",),
    "ff_context.net.0.proj": ("txt_mlp.0",),
    "ff_context.net.2": ("txt_mlp.2",),
    "proj_mlp": ("linear1",),
}
LORA_FILE_FORMAT = "comfyui-lora-v1"  # treerpo.format in the file's header
SUPPORTED = ("supported: a FLUX.1 (dev / schnell architecture, 16 latent channels) MODEL from Load Diffusion "
             "Model (UNETLoader) or Load Checkpoint, weights bf16/fp16/fp32 or fp8 (fp8_e4m3fn / e5m2)")
# LayerNorms whose input the FLUX blocks later add into in place (see _protect_inplace_adds)
_INPLACE_NORMS = ("img_norm1", "img_norm2", "txt_norm1", "txt_norm2", "pre_norm")
_HOOKED = "_treerpo_clone_for_grad"


class NotSupportedModel(ValueError):
    """A MODEL this route cannot train (not FLUX.1, GGUF-quantised, ...): one line naming what works."""


# ---------------------------------------------------------------- checks
def _is_gguf(dm: nn.Module) -> bool:
    """city96's ComfyUI-GGUF: its layers (GGMLLayer) hold GGMLTensor weights and dequantise them in
    their own cast_bias_weight, which applies LoRA patches but never ComfyUI's weight_function list:
    a weight adapter attached there would be silently ignored (read from ComfyUI-GGUF ops.py)."""
    for m in dm.modules():
        quantized = getattr(m, "is_ggml_quantized", None)
        if callable(quantized):
            try:
                if quantized():
                    return True
            except Exception:  # noqa: BLE001 - a layer without weights
                continue
    return any(type(p).__name__ == "GGMLTensor" for p in dm.parameters())


def check_flux_model(model) -> None:
    """Raise NotSupportedModel (one line) unless ``model`` is a ComfyUI MODEL holding FLUX.1."""
    import comfy.ldm.flux.model
    import comfy.model_base

    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    if base is None or dm is None:
        raise NotSupportedModel(f"expected a ComfyUI MODEL, got {type(model).__name__}; {SUPPORTED}")
    if type(base) is not comfy.model_base.Flux or type(dm) is not comfy.ldm.flux.model.Flux:
        config = getattr(base, "model_config", None)
        arch = type(config).__name__ if config is not None else type(base).__name__
        raise NotSupportedModel(f"the MODEL is {arch} ({type(dm).__module__}.{type(dm).__name__}), not FLUX.1; "
                                f"{SUPPORTED}")
    p = dm.params
    if p.in_channels != 16 or p.out_channels != 16 or p.patch_size != 2 or p.global_modulation:
        raise NotSupportedModel(f"the FLUX MODEL has {p.in_channels} input / {p.out_channels} output channels "
                                f"(Fill, Depth or Canny variants condition on extra latents), not 16 / 16; {SUPPORTED}")
    if _is_gguf(dm):
        raise NotSupportedModel("GGUF-quantised MODELs cannot be trained: ComfyUI-GGUF's layers ignore ComfyUI's "
                                "weight adapters, so the LoRA would have no effect; load the model with Load Diffusion "
                                "Model instead (weight_dtype fp8_e4m3fn fits where GGUF Q8 does)")


def comfy_lora_modules(targets: Sequence[str], dm_names: Sequence[str]) -> list[str]:
    """Module names (in the MODEL's BaseModel, e.g. ``diffusion_model.double_blocks.0.img_attn.qkv``)
    matched by ``targets``: ComfyUI/BFL suffixes, or Load FLUX's diffusers names (translated). An
    empty list means COMFY_LORA_TARGETS. A target that matches nothing raises ValueError."""
    targets = [t.strip() for t in targets if t and t.strip()] or list(COMFY_LORA_TARGETS)
    chosen: list[str] = []
    unmatched = []
    for t in targets:
        suffixes = DIFFUSERS_TO_COMFY.get(t, (t,))
        hit = [n for n in dm_names if any(n == s or n.endswith("." + s) for s in suffixes)]
        if not hit:
            unmatched.append(t)
        chosen += [n for n in hit if n not in chosen]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no layer of ComfyUI's FLUX model (use ComfyUI names such "
                         f"as {list(COMFY_LORA_TARGETS[:4])} or Load FLUX's, e.g. attn.to_q)")
    return sorted(chosen, key=dm_names.index)


# ---------------------------------------------------------------- the adapter
class _Switch:
    """Shared on/off state of a policy's adapters (reference() turns them off)."""

    def __init__(self):
        self.on = True


class LoraWrapper(nn.Module):
    """A weight wrapper around ComfyUI's trainable LoRA (comfy.weight_adapter.lora.LoraDiff):
    ``w -> w + alpha / rank * up @ down`` when on, ``w`` when the policy's reference() is active.
    Implements the weight-wrapper protocol ComfyUI's ModelPatcher expects (move_to, passive memory).

    A layer stored as ComfyUI's "scaled fp8" (comfy.ops.scaled_fp8_ops) multiplies its weight by
    ``scale_weight`` after the weight functions ran; the delta is divided by that scale here, so the
    layer computes (w * scale + delta), the weight LoraLoaderModelOnly makes of the saved file, and
    the LoRA learns at the same rate as on any other layer.

    The LoRA stays on ``load_device`` (where the layers compute and the optimizer keeps its state): ComfyUI
    calls move_to(offload device) for the weight functions of layers it offloads (partial loading,
    partially_unload when another model needs the memory), then casts those layers' weights to the
    compute device per forward and applies the weight functions there; a LoRA moved to the CPU would
    meet a GPU weight (ComfyUI's LoraDiff adds without a device cast) and leave its Adam moments behind."""

    def __init__(self, lora: nn.Module, switch: _Switch, layer: nn.Module | None = None,
                 load_device: torch.device | None = None):
        super().__init__()
        self.lora = lora
        object.__setattr__(self, "_switch", switch)  # shared, not a submodule
        object.__setattr__(self, "_layer", layer)  # ComfyUI's layer, not a submodule
        self.load_device = torch.device(load_device) if load_device is not None else None

    def __call__(self, w):
        if not self._switch.on:
            return w
        scale = getattr(self._layer, "scale_weight", None)
        if not isinstance(scale, torch.Tensor):
            return self.lora(w)
        lora = self.lora
        delta = (lora.alpha / lora.rank) * (lora.lora_up.weight @ lora.lora_down.weight).reshape(w.shape)
        return (w + delta / scale.to(device=w.device, dtype=torch.float32)).to(w.dtype)

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device):
        device, home = torch.device(device), self.load_device
        if home is not None and (device.type != home.type or None not in (device.index, home.index)
                                 and device.index != home.index):
            return 0  # an offload: the LoRA stays where the layer computes (see the class docstring)
        self.to(device)
        return self.passive_memory_usage()


# ---------------------------------------------------------------- in-place adds
def _clone_for_grad(module, args):
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return (x.clone(), *args[1:])
    return None


def _protect_inplace_adds(dm: nn.Module) -> None:
    """ComfyUI's FLUX blocks normalise their input, then add into that same tensor in place
    (``img += ...`` in DoubleStreamBlock / SingleStreamBlock): autograd then finds the LayerNorm's
    saved input modified and refuses the backward. A pre-hook gives those norms a copy of their
    input, only while grad is recorded through it (sampling and inference are untouched).
    Registered once per module; idempotent."""
    for name, m in dm.named_modules():
        if name.rsplit(".", 1)[-1] in _INPLACE_NORMS and not getattr(m, _HOOKED, False):
            m.register_forward_pre_hook(_clone_for_grad)
            setattr(m, _HOOKED, True)


def _no_check() -> None:
    return None


@contextlib.contextmanager
def exact_fp8_layers(layers: Sequence[nn.Module]):
    """ComfyUI's fast fp8 layers (weight_dtype fp8_e4m3fn_fast on GPUs with fp8 matmuls, comfy.ops.fp8_ops)
    multiply in fp8 unless the module is in training mode, which would round the adapted weight back
    to fp8; within this context they take the regular upcast path (state restored on exit)."""
    saved = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, t in zip(layers, saved):
            m.training = t


@contextlib.contextmanager
def cancel_between_iterations():
    """ComfyUI's layers check Cancel on every operation (comfy.ops.run_every_op raises mid-forward);
    the trainer checks it between iterations and writes a checkpoint first (as on the Load FLUX
    route). Within this context (our forwards, their recomputation, encoding and decoding) the
    per-operation check is off; the previous function is restored on exit."""
    import comfy.ops

    original = getattr(comfy.ops, "run_every_op", None)
    if original is None or original is _no_check:
        yield
        return
    comfy.ops.run_every_op = _no_check
    try:
        yield
    finally:
        comfy.ops.run_every_op = original


def _checkpointed(block: nn.Module, kind: str, previous, fp8_layers: Sequence[nn.Module] = ()):
    """A ComfyUI block replacement (transformer_options patches_replace "dit") that recomputes the
    block in backward (gradient checkpointing). It calls ``block`` itself: the ``original_block``
    ComfyUI hands over is a closure over its loop variable, which names the LAST block by the time
    backward recomputes. The block mutates its inputs in place, so the checkpointed function works
    on copies: the recomputation sees the inputs the forward saw. A replacement the MODEL already
    had for that block (``previous``) runs inside the checkpoint."""
    from torch.utils.checkpoint import checkpoint

    def original(a):
        if kind == "double":
            img, txt = block(img=a["img"], txt=a["txt"], vec=a["vec"], pe=a["pe"], attn_mask=a.get("attn_mask"),
                             transformer_options=a.get("transformer_options"))
            return {"img": img, "txt": txt}
        return {"img": block(a["img"], vec=a["vec"], pe=a["pe"], attn_mask=a.get("attn_mask"),
                             transformer_options=a.get("transformer_options"))}

    def inner(a):
        with cancel_between_iterations(), exact_fp8_layers(fp8_layers):  # also when backward recomputes it
            return previous(a, {"original_block": original}) if previous is not None else original(a)

    def replace(args, extra):
        if not torch.is_grad_enabled():
            return inner(args)
        rest = {k: v for k, v in args.items() if k not in ("img", "txt")}
        if kind == "double":
            def fn(img, txt):
                out = inner({**rest, "img": img.clone(), "txt": txt.clone()})
                return out["img"], out["txt"]

            img, txt = checkpoint(fn, args["img"], args["txt"], use_reentrant=False)
            return {"img": img, "txt": txt}

        def fn1(img):
            return inner({**rest, "img": img.clone()})["img"]

        return {"img": checkpoint(fn1, args["img"], use_reentrant=False)}

    return replace


# ---------------------------------------------------------------- the policy
class ComfyFluxPolicy(nn.Module):
    """ComfyUI's FLUX (a MODEL's diffusion model) as the engine's velocity model, with a LoRA made of
    ComfyUI's trainable weight adapters. Build it inside ``torch.inference_mode(False)``.

    Args:
        model: a ComfyUI MODEL (ModelPatcher) holding FLUX.1; it is cloned, the input is not changed
            (the diffusion model's LayerNorms get an input-copy hook that acts only under grad).
        lora: core.models.LoraSettings; targets are ComfyUI/BFL module suffixes (COMFY_LORA_TARGETS
            when empty) or Load FLUX's diffusers names. LoRA weights are fp32.
        guidance: FLUX.1-dev's distilled guidance value (ignored by schnell).
        gradient_checkpointing: recompute each block in backward (ComfyUI block replacements).
    """

    def __init__(self, model, lora, guidance: float = 3.5, gradient_checkpointing: bool = False,
                 base_identity: Mapping | None = None):
        super().__init__()
        from comfy.weight_adapter import LoRAAdapter

        check_flux_model(model)
        if lora is None:
            raise ValueError("ComfyFluxPolicy needs LoRA settings (it trains a LoRA on ComfyUI's MODEL)")
        patcher = model.clone()
        object.__setattr__(self, "patcher", patcher)  # not a submodule: ComfyUI places its weights
        base = patcher.model
        dm = base.diffusion_model
        names = [n for n, m in base.named_modules()
                 if hasattr(m, "weight_function") and getattr(m, "weight", None) is not None and m.weight.ndim == 2]
        self.modules_with_lora = comfy_lora_modules(lora.targets, names)
        self.lora_settings = lora
        self.guidance = float(guidance)
        self.gradient_checkpointing = bool(gradient_checkpointing)
        self.latent_channels = int(dm.params.in_channels)
        self.base_identity = dict(base_identity or {})
        self._switch = _Switch()
        self._reference_depth = 0
        self._needs_release = True
        self.adapters = nn.ModuleDict()
        modules = dict(base.named_modules())
        devices = [modules[self.modules_with_lora[0]].weight.device]
        with torch.random.fork_rng(devices=[d for d in devices if d.type == "cuda"]):
            torch.manual_seed(lora.init_seed)  # ComfyUI draws lora_up from the global RNG
            for name in self.modules_with_lora:
                # LoRAAdapter.create_train: lora_up kaiming-uniform, lora_down zero -> the base model at start
                inner = LoRAAdapter.create_train(modules[name].weight, lora.rank, lora.alpha).to(torch.float32)
                inner.alpha.requires_grad_(False)
                for p in (inner.lora_up.weight, inner.lora_down.weight):
                    p.requires_grad_(True)
                wrapper = LoraWrapper(inner, self._switch, modules[name], load_device=patcher.load_device)
                self.adapters[name.replace(".", "/")] = wrapper
                patcher.add_weight_wrapper(f"{name}.weight", wrapper)
        _protect_inplace_adds(dm)
        import comfy.ops

        fp8 = getattr(getattr(comfy.ops, "fp8_ops", None), "Linear", None)
        self._fp8_layers = [m for m in dm.modules() if fp8 is not None and isinstance(m, fp8)]

    # -- LoRA -------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return True

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """Trainable LoRA weights by parameter name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def lora_file_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The LoRA in ComfyUI's key format (what its Train LoRA saves; LoraLoaderModelOnly reads it)."""
        out = {}
        for key, wrapper in self.adapters.items():
            module = key.replace("/", ".")
            lora = wrapper.lora
            out[f"{module}.lora_up.weight"] = lora.lora_up.weight.detach().to("cpu", dtype).contiguous()
            out[f"{module}.lora_down.weight"] = lora.lora_down.weight.detach().to("cpu", dtype).contiguous()
            out[f"{module}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
        return out

    def load_lora_file_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        """The inverse of lora_file_state_dict (alpha = this policy's): core's load_lora checks the keys
        and shapes first and calls this to continue training from a LoRA file of this route."""
        with torch.no_grad():
            for key, wrapper in self.adapters.items():
                module = key.replace("/", ".")
                for part in ("lora_up", "lora_down"):
                    p = getattr(wrapper.lora, part).weight
                    p.copy_(sd[f"{module}.{part}.weight"].to(p.device, p.dtype))

    lora_file_format = LORA_FILE_FORMAT

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Within this context the forward pass is the MODEL as loaded (adapters off)."""
        if self._reference_depth == 0:
            self._switch.on = False
        self._reference_depth += 1
        try:
            yield
        finally:
            self._reference_depth -= 1
            if self._reference_depth == 0:
                self._switch.on = True

    # -- placement ------------------------------------------------------------
    @property
    def diffusion_model(self) -> nn.Module:
        return self.patcher.model.diffusion_model

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype ComfyUI runs the layers in (weights may be stored narrower, e.g. fp8)."""
        base = self.patcher.model
        return base.manual_cast_dtype or base.get_dtype()

    @property
    def weight_dtype(self) -> torch.dtype:
        """How the base weights are stored (fp8, bf16, ...)."""
        return stored_dtype(self.patcher.model)

    @property
    def device(self) -> torch.device:
        return torch.device(self.patcher.load_device)

    def _loaded(self) -> bool:
        import comfy.model_management as mm

        base = self.patcher.model
        if getattr(base, "current_weight_patches_uuid", None) != self.patcher.patches_uuid:
            return False
        return any(lm.model is self.patcher for lm in mm.current_loaded_models)

    def ensure_loaded(self) -> None:
        """Load the MODEL with our adapters through ComfyUI's model management (as its samplers and
        its Train LoRA do) unless it is loaded already; ComfyUI may have unloaded or re-patched it
        since (another node ran, or memory was freed before training)."""
        import comfy.model_management as mm

        if not self._loaded():
            mm.load_models_gpu([self.patcher], force_full_load=True)
            self._needs_release = True
        if self._needs_release and torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            self._release_inference_tensors()  # only a forward that records grad needs it
            self._needs_release = False

    def _release_inference_tensors(self) -> None:
        """Weights created under ComfyUI's inference mode (every loader runs there) cannot be saved for
        backward; layers whose weight is used without a cast copy would fail. Replace them by normal
        tensors with the same values, one at a time (the memory of one weight at most)."""
        import comfy.utils

        base = self.patcher.model
        for name, p in list(base.named_parameters()):
            if p.is_inference():
                comfy.utils.set_attr_param(base, name, p.detach().clone())  # requires_grad=False
            elif p.requires_grad:  # e.g. a scale loaded with assign: no gradient for the base
                p.requires_grad_(False)
        for name, b in list(base.named_buffers()):
            if b.is_inference():
                comfy.utils.set_attr(base, name, b.detach().clone())

    def _transformer_options(self) -> dict:
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        if self.gradient_checkpointing:
            patches = dict(opts.get("patches_replace", {}))
            dit = dict(patches.get("dit", {}))
            dm = self.diffusion_model
            for i, block in enumerate(dm.double_blocks):
                dit[("double_block", i)] = _checkpointed(block, "double", dit.get(("double_block", i)),
                                                         self._fp8_layers)
            for i, block in enumerate(dm.single_blocks):
                dit[("single_block", i)] = _checkpointed(block, "single", dit.get(("single_block", i)),
                                                         self._fp8_layers)
            patches["dit"] = dit
            opts["patches_replace"] = patches
        return opts

    # -- forward --------------------------------------------------------------
    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from ..core.models.flux_policy import check_velocity_inputs

        sigma = check_velocity_inputs(self, x, sigma, cond, "encode prompts with the CLIP")
        self.ensure_loaded()
        b = x.shape[0]
        dm = self.diffusion_model
        device, dtype = self.device, self.dtype
        context = cond["prompt_embeds"].to(device=device, dtype=dtype)
        y = cond["pooled_prompt_embeds"].to(device=device, dtype=dtype)
        p = dm.params
        if context.shape[-1] != p.context_in_dim or (p.vec_in_dim is not None and y.shape[-1] != p.vec_in_dim):
            raise ValueError(f"the text conditioning has {context.shape[-1]} / {y.shape[-1]} features (sequence / "
                             f"pooled), the FLUX model takes {p.context_in_dim} / {p.vec_in_dim}: encode with the CLIP "
                             f"that belongs to it (FLUX: DualCLIPLoader clip_l + t5xxl, type flux)")
        # as BaseModel._apply_model: latents and conditioning in the compute dtype, timestep = sigma in fp32
        guidance = torch.full((b,), self.guidance, device=device, dtype=dtype)
        with cancel_between_iterations(), exact_fp8_layers(self._fp8_layers):
            out = dm(x.to(device=device, dtype=dtype), sigma.float(), context, y=y, guidance=guidance,
                     transformer_options=self._transformer_options())
        return out.to(x.dtype)


# ---------------------------------------------------------------- text and images
class ComfyTextEncoder:
    """``encode(prompts) -> [{"prompt_embeds": [1,L,D], "pooled_prompt_embeds": [1,P]}, ...]`` through a
    ComfyUI CLIP object (tokenize + encode_from_tokens, as CLIPTextEncode does). Each prompt is
    encoded once and kept (on the CPU, as normal tensors usable in backward) for this object's life."""

    def __init__(self, clip):
        self.clip = clip
        self.cache: dict[str, dict[str, torch.Tensor]] = {}

    def _encode(self, prompt: str) -> dict[str, torch.Tensor]:
        tokens = self.clip.tokenize(prompt)
        with cancel_between_iterations():
            out = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        cond, pooled = out["cond"], out.get("pooled_output")
        if pooled is None:
            raise ValueError("the CLIP gives no pooled output; FLUX needs CLIP-L's (DualCLIPLoader clip_l + t5xxl, "
                             "type flux)")
        if not (torch.isfinite(cond).all() and torch.isfinite(pooled).all()):
            raise ValueError(f"the CLIP gave non-finite features for the prompt {prompt!r} (a text encoder file with "
                             f"missing or broken weights? ComfyUI logs 'clip missing: ...' when loading it)")
        with torch.inference_mode(False):
            return {"prompt_embeds": cond.detach().to("cpu").clone(),
                    "pooled_prompt_embeds": pooled.detach().to("cpu").clone()}

    def __call__(self, prompts: Sequence[str]) -> list[dict[str, torch.Tensor]]:
        out = []
        for prompt in prompts:
            if prompt not in self.cache:
                self.cache[prompt] = self._encode(prompt)
            out.append(self.cache[prompt])
        return out


class ComfyDecoder:
    """``decode(latents[B,16,H,W]) -> images[B,3,8H,8W]`` in [0, 1] (float32, CPU) through a ComfyUI VAE:
    the engine's latents are the diffusion model's (after process_latent_in), so they are turned
    back into the VAE's with the MODEL's latent format (FLUX: / 0.3611 + 0.1159), as ComfyUI's
    samplers do before VAE Decode."""

    def __init__(self, vae, latent_format, latent_channels: int = 16):
        got = getattr(vae, "latent_channels", None)
        if got is not None and got != latent_channels:
            raise ValueError(f"the VAE encodes {got} latent channels, the FLUX model {latent_channels}: connect "
                             f"the FLUX autoencoder (ae.safetensors) from Load VAE")
        self.vae = vae
        self.latent_format = latent_format
        self.latent_channels = latent_channels

    @property
    def scale_factor(self) -> int:
        return int(self.vae.spacial_compression_decode())

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        from ..core.models.flux_policy import unpack_latents

        if latents.ndim == 3:
            if height is None or width is None:
                height = width = int(round(latents.shape[1] ** 0.5)) * 2
            latents = unpack_latents(latents, height, width)
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents [B, {self.latent_channels}, H, W] (or packed tokens), "
                             f"got {tuple(latents.shape)}")
        raw = self.latent_format.process_out(latents.detach().float().cpu())
        with cancel_between_iterations():
            images = self.vae.decode(raw)  # [B, H, W, C] in [0, 1]
        return images[..., :3].movedim(-1, 1).float().cpu().contiguous()


@dataclass
class ComfyStack:
    """The engine's stack over ComfyUI's objects: what core.models.FluxStack offers the nodes."""

    policy: ComfyFluxPolicy
    encode: Callable
    decode: Callable
    scale_factor: int = 8
    files: Any = None

    @property
    def latent_channels(self) -> int:
        return self.policy.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return self.scale_factor

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        from ..core.models.stack import latent_shape

        return latent_shape(resolution, self.latent_channels, self.vae_scale_factor)


def stored_dtype(base) -> torch.dtype:
    """The dtype the MODEL's FLUX stores its block weights in (``get_dtype()`` is the declared one:
    it says fp32 for ComfyUI's scaled-fp8 files, whose layers hold fp8)."""
    return base.diffusion_model.double_blocks[0].img_attn.qkv.weight.dtype


def model_identity(model) -> dict:
    """What the LoRA was trained on, for its header (no file path is known from a MODEL)."""
    base = model.model
    dm = base.diffusion_model
    p = dm.params
    return {"route": "comfyui-model", "model": type(base).__name__, "weight_dtype": str(stored_dtype(base)),
            "compute_dtype": str(base.manual_cast_dtype or base.get_dtype()), "hidden_size": p.hidden_size,
            "depth": p.depth, "depth_single_blocks": p.depth_single_blocks, "guidance_embed": p.guidance_embed,
            "context_in_dim": p.context_in_dim, "vec_in_dim": p.vec_in_dim}


def comfy_flux_stack(model, clip, vae, lora, guidance: float = 3.5, gradient_checkpointing: bool = False,
                     encode: Callable | None = None, decode: Callable | None = None) -> ComfyStack:
    """The stack from a MODEL, CLIP and VAE (build inside ``torch.inference_mode(False)``).
    ``encode`` / ``decode`` replace the CLIP / VAE route (tests with encoders ComfyUI cannot load)."""
    check_flux_model(model)
    policy = ComfyFluxPolicy(model, lora, guidance=guidance, gradient_checkpointing=gradient_checkpointing,
                             base_identity=model_identity(model))
    scale = 8
    if decode is None:
        decoder = ComfyDecoder(vae, model.get_model_object("latent_format"), policy.latent_channels)
        decode, scale = decoder, decoder.scale_factor
    else:
        scale = int(getattr(decode, "scale_factor", None) or _scale_of(decode) or 8)
    return ComfyStack(policy=policy, encode=encode or ComfyTextEncoder(clip), decode=decode, scale_factor=scale)


def _scale_of(decode) -> int | None:
    vae = getattr(decode, "vae", None)
    cfg = getattr(vae, "config", None)
    if cfg is not None and hasattr(cfg, "block_out_channels"):
        return 2 ** (len(cfg.block_out_channels) - 1)
    return None
