"""`treerpo bench memory`: the memory plan for FLUX.1-dev, from bytes counted on the CPU.

One training forward of a FLUX transformer at FLUX.1-dev's width (the ``flux-width`` size preset,
2 double + 1 single block, random weights: the first double block's inputs need no grad, the second
one stands for the other 18) runs under ``torch.autograd.graph.saved_tensors_hooks``:
every tensor autograd keeps for the backward is attributed to the block that saved it and counted
once by its storage (weights, frozen or LoRA, are not activations and are left out). The setting
is the GPU one: bf16 base weights, LoRA in fp32 (what FluxPolicy builds on CUDA). Attention runs
through ``scaled_dot_product_attention`` (flash kernel on the CPU: q, k, v, out and the log-sum-exp
are kept, as by the GPU's flash / memory-efficient kernels, no L x L matrix).

With gradient checkpointing (diffusers' non-reentrant checkpoint per block) a block keeps only its
inputs, which are counted as the tensors the checkpoint call holds; the backward then recomputes
one block at a time, so the peak adds one block's full saved set once.

The per-block numbers are then scaled to FLUX.1-dev's 19 double + 38 single blocks and added to
weights (exact parameter counts from a meta-device build of core/models/configs/flux-dev.json),
LoRA + AdamW state, reward models and the VAE decoder. Everything is bytes counted, not measured
on a GPU: the CUDA context, allocator fragmentation, cuBLAS workspaces and transient activation
gradients are not in the counts (a fixed headroom is added before "fits").
"""

from __future__ import annotations

import time

import torch

GIB = 1024 ** 3
TEXT_TOKENS = 512
FLUX_DOUBLE, FLUX_SINGLE = 19, 38
CAPACITIES_GIB = (24, 48, 80)
HEADROOM_GIB = 1.5  # assumed: CUDA context + cuBLAS/attention workspaces + fragmentation
MICRO_BATCHES = (1, 2, 4)
RESOLUTIONS = (512, 720)
# Reward models: parameter counts (from meta-device builds of their transformers configs when
# transformers is importable, else these). HPS-v2.1 and PickScore are open_clip / HF ViT-H-14
# CLIP models (image + text tower); ImageReward is BLIP ViT-L/16 + a BERT-base text encoder with
# cross-attention and an MLP head (REFERENCES.md). Scored without grad, in bf16 on a GPU.
ASSUMED_REWARD_PARAMS = {"hps-v2.1": 986_000_000, "pickscore": 986_000_000, "imagereward": 447_000_000}
T5_XXL_ENCODER_PARAMS = 4_762_000_000  # assumed (google/t5-v1_1-xxl encoder); offloaded: prompt cache
CLIP_L_TEXT_PARAMS = 123_000_000  # assumed; offloaded with T5


def image_tokens(px: int) -> int:
    """FLUX tokens of a px x px image: latent px/8, 2x2 patches -> (px/16)^2."""
    return (px // 16) ** 2


# ---------------------------------------------------------------------- counting
def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr()), s.nbytes()


class SavedBytes:
    """Counts the storages autograd saves for the backward, attributed to the current label
    (set by ``label``); a storage is counted once, for the first label that saved it. Storages in
    ``exclude`` (weights) are skipped."""

    def __init__(self, exclude=()):
        self.exclude = {_storage_key(t)[0] for t in exclude}
        self.seen: dict = {}
        self.by_label: dict[str, int] = {}
        self.current = "rest"

    def add(self, t: torch.Tensor, label: str | None = None) -> None:
        if not isinstance(t, torch.Tensor):
            return
        key, nbytes = _storage_key(t)
        if key in self.exclude or key in self.seen:
            return
        label = label or self.current
        self.seen[key] = label
        self.by_label[label] = self.by_label.get(label, 0) + nbytes

    def _pack(self, t):
        self.add(t)
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def count_saved(policy, px_or_tokens, batch: int = 1, text_tokens: int = TEXT_TOKENS,
                checkpointing: bool = False) -> dict:
    """Bytes of the tensors one training forward of ``policy`` (a FluxPolicy with LoRA) keeps for
    the backward, by block: ``{"double": [...], "single": [...], "shared": n, "rest": n}``.

    ``px_or_tokens``: image size in px (int), or ("tokens", N) for N image tokens (a square-ish
    latent). ``shared``: the time embedding and RoPE tables every block receives (counted once);
    ``rest``: embedders and the output layer. With ``checkpointing`` the transformer's blocks are
    checkpointed (non-reentrant, as diffusers does) and a block's count is the inputs its
    checkpoint holds; the weights' storages are never counted."""
    tr = policy.transformer
    if isinstance(px_or_tokens, tuple):
        n = px_or_tokens[1]
        h = 1
        while (h * 2) * (h * 2) <= n:  # the largest power-of-two-free split: h x (n // h) tokens
            h *= 2
        hw = (h, n // h) if n % h == 0 else (1, n)
    else:
        side = px_or_tokens // 16
        hw = (side, side)
    tokens = hw[0] * hw[1]
    was = tr.is_gradient_checkpointing
    if checkpointing and not was:
        tr.enable_gradient_checkpointing()
    if not checkpointing and was:
        tr.disable_gradient_checkpointing()
    counter = SavedBytes(exclude=[p for p in tr.parameters()] + [b for b in tr.buffers()])
    handles = []
    blocks = [("double", i, b) for i, b in enumerate(tr.transformer_blocks)] + \
             [("single", i, b) for i, b in enumerate(tr.single_transformer_blocks)]
    labels = {id(b): f"{kind}{i}" for kind, i, b in blocks}

    def pre(module, args, kwargs):
        counter.current = labels[id(module)]
        for name in ("temb", "image_rotary_emb"):
            for t in _tensors(kwargs.get(name)):
                counter.add(t, "shared")

    def post(module, args, kwargs, out):
        counter.current = "rest"

    for _, _, b in blocks:
        handles.append(b.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(b.register_forward_hook(post, with_kwargs=True))
    ckpt_func = getattr(tr, "_gradient_checkpointing_func", None)
    if checkpointing:
        def held(module, *args):
            # what the non-reentrant checkpoint keeps: its arguments (the block's inputs)
            label = labels.get(id(module), "rest")
            for name, t in zip(("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb"), args):
                for x in _tensors(t):
                    counter.add(x, "shared" if name in ("temb", "image_rotary_emb") else label)
            return ckpt_func(module, *args)
        tr._gradient_checkpointing_func = held
    g = torch.Generator().manual_seed(0)
    cfg = tr.config
    x = torch.randn(batch, policy.latent_channels, 2 * hw[0], 2 * hw[1], generator=g)
    cond = {"prompt_embeds": torch.randn(batch, text_tokens, cfg.joint_attention_dim, generator=g),
            "pooled_prompt_embeds": torch.randn(batch, cfg.pooled_projection_dim, generator=g)}
    try:
        with counter.hooks():
            out = policy(x, torch.full((batch,), 0.5), cond)
        assert out.requires_grad, "no LoRA parameter reached the output"
        del out
    finally:
        for hd in handles:
            hd.remove()
        if checkpointing:
            tr._gradient_checkpointing_func = ckpt_func
        if checkpointing and not was:
            tr.disable_gradient_checkpointing()
        if was and not checkpointing:
            tr.enable_gradient_checkpointing()
    by = counter.by_label
    return {"image_tokens": tokens, "text_tokens": text_tokens, "batch": batch, "checkpointing": checkpointing,
            "double": [by.get(f"double{i}", 0) for i in range(len(tr.transformer_blocks))],
            "single": [by.get(f"single{i}", 0) for i in range(len(tr.single_transformer_blocks))],
            "shared": by.get("shared", 0), "rest": by.get("rest", 0)}


def scaled_activations(no_ckpt: dict, ckpt: dict, n_double: int, n_single: int, rows: int) -> dict:
    """Activation bytes of a model with ``n_double`` + ``n_single`` blocks for ``rows`` rows of a
    micro-batch, from per-row counts of the blocks of a model with at least one block of each kind."""
    def blocks(c, kind, n):
        # the first block of a kind can differ (the first double block's inputs come from the
        # embedders and need no grad); the last one measured stands for the others
        return (c[kind][0] + (n - 1) * c[kind][-1]) if n else 0

    d, s = no_ckpt["double"][-1], no_ckpt["single"][-1]
    full = (no_ckpt["rest"] + no_ckpt["shared"] + blocks(no_ckpt, "double", n_double)
            + blocks(no_ckpt, "single", n_single))
    held = ckpt["rest"] + ckpt["shared"] + blocks(ckpt, "double", n_double) + blocks(ckpt, "single", n_single)
    recompute = max(d if n_double else 0, s if n_single else 0)  # one block's full set during its backward
    return {"no_checkpointing": rows * full, "checkpointing": rows * (held + recompute),
            "checkpointing_held": rows * held, "checkpointing_recompute": rows * recompute}


# ---------------------------------------------------------------------- static sizes
def _meta_flux(n_double=FLUX_DOUBLE, n_single=FLUX_SINGLE):
    from diffusers import FluxTransformer2DModel

    from ..core.models import bundled_config

    cfg = {k: v for k, v in bundled_config("flux-dev")["transformer"].items() if not k.startswith("_")}
    cfg.update(num_layers=n_double, num_single_layers=n_single)
    with torch.device("meta"):
        return FluxTransformer2DModel(**cfg)


def _lora_params(model, targets, rank: int) -> int:
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            n += rank * (m.in_features + m.out_features)
    return n


def flux_sizes(rank: int = 32) -> dict:
    """Exact parameter counts of FLUX.1-dev's transformer (meta build), its LoRA at ``rank`` on the
    default targets, and the weights the ComfyUI route's adapters act on (double/single block)."""
    from ..core.models.flux_policy import DEFAULT_LORA_TARGETS

    m = _meta_flux()
    total = sum(p.numel() for p in m.parameters())
    lora = _lora_params(m, DEFAULT_LORA_TARGETS, rank)

    def adapted(block, names):
        return sum(mod.weight.numel() for n, mod in block.named_modules()
                   if isinstance(mod, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in names))

    # ComfyUI's COMFY_LORA_TARGETS as diffusers modules: all attention/FF projections of a double
    # block (q, k, v fused there), proj_mlp + q, k, v (linear1) and proj_out (linear2) of a single one
    double_names = DEFAULT_LORA_TARGETS
    single_names = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
    d = adapted(m.transformer_blocks[0], double_names)
    s = adapted(m.single_transformer_blocks[0], single_names)
    return {"transformer_params": total, "lora_params": lora, "lora_rank": rank,
            "comfy_adapted_params_double": d, "comfy_adapted_params_single": s,
            "comfy_adapted_params_total": FLUX_DOUBLE * d + FLUX_SINGLE * s}


def vae_decoder_params() -> int:
    from diffusers import AutoencoderKL

    from ..core.models import bundled_config

    cfg = {k: v for k, v in bundled_config("flux-vae").items() if not k.startswith("_") and k != "name"}
    with torch.device("meta"):
        vae = AutoencoderKL(**cfg)
    return sum(p.numel() for n, p in vae.named_parameters() if not n.startswith("encoder."))


def reward_params() -> tuple[dict, str]:
    """Parameter counts of the three reward models: meta builds of transformers' classes with the
    ViT-H-14 CLIP and BLIP (ViT-L/16 + BERT-base) shapes, or the assumed counts."""
    try:
        from transformers import BlipTextConfig, BlipVisionConfig, CLIPConfig, CLIPModel
        from transformers.models.blip.modeling_blip import BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        with torch.device("meta"):
            clip = CLIPModel(CLIPConfig(
                text_config=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                 num_hidden_layers=24, vocab_size=49408, projection_dim=1024),
                vision_config=dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
                                   num_hidden_layers=32, patch_size=14, image_size=224, projection_dim=1024),
                projection_dim=1024))
            vis = BlipVisionModel(BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                   num_attention_heads=16, patch_size=16, image_size=224))
            txt = BlipTextModel(BlipTextConfig(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024,
                                               num_hidden_layers=12, num_attention_heads=12,
                                               intermediate_size=3072), add_pooling_layer=False)
        n_clip = sum(p.numel() for p in clip.parameters())
        head = 768 * 1024 + 1024 + 1024 * 128 + 128 + 128 * 64 + 64 + 64 * 16 + 16 + 16 + 1
        n_ir = sum(p.numel() for p in vis.parameters()) + sum(p.numel() for p in txt.parameters()) + head
        return {"hps-v2.1": n_clip, "pickscore": n_clip, "imagereward": n_ir}, "meta-device builds (transformers)"
    except Exception as e:  # noqa: BLE001 - fall back to the stated assumption
        return dict(ASSUMED_REWARD_PARAMS), f"assumed counts ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------- the plan
def memory_plan(per_res: dict, sizes: dict, rewards: dict, vae_params: int) -> dict:
    """The FLUX.1-dev table: fixed parts and one total per (weights dtype, route, resolution,
    checkpointing, micro-batch), with which capacities it fits."""
    P = sizes["transformer_params"]
    fixed = {
        "weights_bf16": 2 * P,
        "weights_fp8": 1 * P,
        "lora_adamw_fp32": 16 * sizes["lora_params"],  # weights + grads + 2 AdamW moments, fp32
        "reward_models_bf16": 2 * sum(rewards.values()),
        "vae_decoder_bf16": 2 * vae_params,
        "text_encoders": 0,  # offloaded: the prompt cache holds T5 / CLIP outputs
    }
    comfy = {"no_checkpointing": 2 * sizes["comfy_adapted_params_total"],
             "checkpointing": 2 * max(sizes["comfy_adapted_params_double"], sizes["comfy_adapted_params_single"])}
    rows = []
    for px, m in per_res.items():
        for ck in (False, True):
            key = "checkpointing" if ck else "no_checkpointing"
            for mb in MICRO_BATCHES:
                act = scaled_activations(m["no_ckpt"], m["ckpt"], FLUX_DOUBLE, FLUX_SINGLE, mb)[key]
                for wdt in ("bf16", "fp8"):
                    for route in ("load-flux", "comfyui"):
                        if route == "load-flux" and wdt == "fp8":
                            continue  # Load FLUX trains a bf16 base; fp8 is ComfyUI's loader
                        extra = comfy[key] if route == "comfyui" else 0
                        total = (fixed[f"weights_{wdt}"] + fixed["lora_adamw_fp32"] + fixed["reward_models_bf16"]
                                 + fixed["vae_decoder_bf16"] + act + extra)
                        need = total + HEADROOM_GIB * GIB
                        rows.append({"resolution": px, "checkpointing": ck, "micro_batch": mb, "weights": wdt,
                                     "route": route, "activations": act, "comfy_weight_copies": extra,
                                     "total": total, "fits_gib": [c for c in CAPACITIES_GIB if need <= c * GIB]})
    return {"fixed": fixed, "comfy_weight_copies": comfy, "rows": rows}


def _gib(n: float) -> str:
    return f"{n / GIB:7.2f}"


def run(max_tokens: int | None = None, model: str = "flux-width:2:1", rank: int = 32,
        log=print) -> dict:
    """Counts per block at 512 and 720 px (or, above ``max_tokens`` image tokens, at two smaller
    token counts and extrapolated linearly), then the scaled plan."""
    from ..core.models import LoraSettings
    from .models import random_stack

    t0 = time.time()
    old = torch.get_default_dtype()
    stack = random_stack(model, LoraSettings(rank=rank, alpha=rank), on="cpu")
    policy = stack.policy
    policy.transformer.to(torch.bfloat16)  # the GPU setting: bf16 base, LoRA kept in fp32
    for n, p in policy.transformer.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    assert torch.get_default_dtype() == old
    per_res, notes = {}, []
    linearity = None
    for px in RESOLUTIONS:
        n = image_tokens(px)
        if max_tokens and n > max_tokens:
            a, b = max_tokens // 2, max_tokens
            ca = {k: count_saved(policy, ("tokens", a), checkpointing=k == "ckpt") for k in ("no_ckpt", "ckpt")}
            cb = {k: count_saved(policy, ("tokens", b), checkpointing=k == "ckpt") for k in ("no_ckpt", "ckpt")}
            per_res[px] = {k: extrapolate(ca[k], cb[k], n) for k in ca}
            per_res[px]["measured_at_tokens"] = [a, b]
            notes.append(f"{px} px ({n} image tokens) extrapolated linearly from {a} and {b} image tokens")
            linearity = (ca, cb)
        else:
            per_res[px] = {k: count_saved(policy, px, checkpointing=k == "ckpt") for k in ("no_ckpt", "ckpt")}
            per_res[px]["measured_at_tokens"] = [n]
        log(f"  counted {px} px ({n} image + {TEXT_TOKENS} text tokens) in {time.time() - t0:.0f} s")
    if linearity is None and len(RESOLUTIONS) >= 2:
        linearity = tuple(per_res[px] for px in RESOLUTIONS[:2])
    sizes = flux_sizes(rank)
    rewards, reward_source = reward_params()
    vae = vae_decoder_params()
    plan = memory_plan({px: per_res[px] for px in RESOLUTIONS}, sizes, rewards, vae)
    return {"model": model, "setting": "bf16 weights, LoRA fp32, grad on (training forward), batch 1 row",
            "text_tokens": TEXT_TOKENS, "lora_rank": rank, "per_resolution": {str(k): v for k, v in per_res.items()},
            "linear_in_tokens": _linearity_report(linearity), "sizes": sizes, "reward_params": rewards,
            "reward_source": reward_source, "vae_decoder_params": vae, "plan": plan, "notes": notes,
            "headroom_gib": HEADROOM_GIB, "seconds": round(time.time() - t0, 1)}


def extrapolate(a: dict, b: dict, tokens: int) -> dict:
    """Linear extrapolation in total tokens (image + text) of two counts at the same text length."""
    ta, tb = a["image_tokens"] + a["text_tokens"], b["image_tokens"] + b["text_tokens"]
    t = tokens + a["text_tokens"]

    def lin(x, y):
        return int(round(x + (y - x) * (t - ta) / (tb - ta)))

    out = dict(a, image_tokens=tokens, extrapolated=True)
    for k in ("double", "single"):
        out[k] = [lin(x, y) for x, y in zip(a[k], b[k])]
    for k in ("shared", "rest"):
        out[k] = lin(a[k], b[k])
    return out


def _linearity_report(pair) -> dict | None:
    """Bytes per token of each block kind at the two token counts: equal means linear."""
    if not pair:
        return None
    a, b = pair
    rep = {}
    for k in ("no_ckpt", "ckpt"):
        for kind in ("double", "single"):
            per = [x[k][kind][-1] / (x[k]["image_tokens"] + x[k]["text_tokens"]) for x in (a, b)]
            rep[f"{kind}_{k}_bytes_per_token"] = per
    return rep


def print_plan(res: dict) -> None:
    print(f"Memory plan for FLUX.1-dev ({FLUX_DOUBLE} double + {FLUX_SINGLE} single blocks), bytes counted on "
          f"{res['model']} ({res['setting']}); GiB = 2^30 bytes")
    print("Per block, per row of the micro-batch (saved for backward; MiB):")
    print(f"{'px':>5s} {'img tok':>7s} {'double':>9s} {'single':>9s} {'double ckpt':>11s} {'single ckpt':>11s} "
          f"{'shared':>7s} {'rest':>7s}")
    for px, m in res["per_resolution"].items():
        a, c = m["no_ckpt"], m["ckpt"]
        mib = lambda n: f"{n / 2**20:.1f}"  # noqa: E731
        print(f"{px:>5s} {a['image_tokens']:7d} {mib(a['double'][-1]):>9s} {mib(a['single'][-1]):>9s} "
              f"{mib(c['double'][-1]):>11s} {mib(c['single'][-1]):>11s} {mib(a['shared']):>7s} {mib(a['rest']):>7s}"
              f"{'  (extrapolated)' if a.get('extrapolated') else ''}")
    lin = res["linear_in_tokens"]
    if lin:
        print("Bytes per token (image + text) at the two token counts (equal = linear in tokens): " +
              ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in lin.items() if "ckpt" in k))
    for n in res["notes"]:
        print("Note:", n)
    s, f = res["sizes"], res["plan"]["fixed"]
    rw = ", ".join(f"{k} {v / 1e6:.0f} M" for k, v in res["reward_params"].items())
    print(f"Fixed parts (GiB): transformer {s['transformer_params'] / 1e9:.3f} B params -> "
          f"bf16 {_gib(f['weights_bf16']).strip()}, fp8 {_gib(f['weights_fp8']).strip()}; "
          f"LoRA r={s['lora_rank']} {s['lora_params'] / 1e6:.1f} M params, fp32 weights+grads+2 AdamW moments "
          f"{_gib(f['lora_adamw_fp32']).strip()}; rewards ({rw}; {res['reward_source']}) bf16 "
          f"{_gib(f['reward_models_bf16']).strip()}; VAE decoder bf16 {_gib(f['vae_decoder_bf16']).strip()}; "
          f"text encoders offloaded (prompt cache) 0 (T5-XXL ~{T5_XXL_ENCODER_PARAMS / 1e9:.1f} B params "
          f"would be {_gib(2 * T5_XXL_ENCODER_PARAMS).strip()} in bf16)")
    cw = res["plan"]["comfy_weight_copies"]
    print(f"ComfyUI route: compute-dtype (bf16) copies of the adapted layers' weights kept for backward: "
          f"without checkpointing {_gib(cw['no_checkpointing']).strip()} (all blocks), with checkpointing "
          f"{_gib(cw['checkpointing']).strip()} (one block)")
    print(f"Totals (GiB) and fits (total + {res['headroom_gib']} GiB assumed headroom <= 24 / 48 / 80 GiB):")
    print(f"{'px':>4s} {'ckpt':>4s} {'mb':>2s} {'weights':>7s} {'route':>9s} {'activ.':>7s} {'comfy':>6s} "
          f"{'total':>7s}  fits")
    for r in res["plan"]["rows"]:
        fits = ",".join(str(c) for c in r["fits_gib"]) or "none"
        print(f"{r['resolution']:4d} {'yes' if r['checkpointing'] else 'no':>4s} {r['micro_batch']:2d} "
              f"{r['weights']:>7s} {r['route']:>9s} {_gib(r['activations'])} {_gib(r['comfy_weight_copies'])[1:]} "
              f"{_gib(r['total'])}  {fits}")
    print(f"({res['seconds']} s; bytes counted with saved_tensors_hooks, not a GPU measurement)")


def bench_memory(args) -> int:
    from .options import write_json

    res = run(max_tokens=args.max_tokens, model=args.model or "flux-width:2:1")
    print_plan(res)
    if args.json:
        write_json(args.json, res)
    return 0


def comfy_route_prediction(weight_bytes: int, lora_params: int, block_copy_bytes: int, activations: int) -> dict:
    """The plan's total for a ComfyUI-route run as `bench gpu` measures it (no reward model, no VAE, no
    headroom): stored weights + LoRA with AdamW (fp32 weights, grads, 2 moments) + activations (checkpointed
    or not, as counted) + the compute-dtype copies of one block's adapted weights (checkpointing)."""
    parts = {"weights": weight_bytes, "lora_adamw_fp32": 16 * lora_params, "activations": activations,
             "comfy_weight_copies": block_copy_bytes}
    parts["total"] = sum(parts.values())
    return parts
